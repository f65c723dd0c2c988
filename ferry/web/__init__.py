"""The dashboard: static files the control plane serves at `/`.

Nothing here talks to the control plane's internals: the page is plain HTML, CSS and one
hand-written script that calls the same REST API as the CLI, from the browser, with the
operator's bearer token. This package only says where the files are and which headers
the page must be served with.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# The page runs only its own script and styles and talks only to the origin that served
# it: an injected tag (a VM name is user input) can neither run nor phone home.
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # The page holds no data itself, but a stale app.js against a newer API misleads.
    "Cache-Control": "no-cache",
}


def static_dir() -> Path:
    """The directory of index.html, app.js and app.css, as installed with the package."""
    return Path(str(files("ferry.web") / "static"))
