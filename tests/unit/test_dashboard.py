"""The dashboard's server side: the load it shows is the planner's, its files are served
with a strict Content-Security-Policy and without a token, while its data needs one."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ferry.api.app import create_app
from ferry.control.service import ControlPlane
from ferry.domain.auth import TokenRole, format_token, new_secret
from ferry.domain.drs import ClusterSnapshot, DrsHost, DrsVm, loads
from ferry.pki import ControlPki
from ferry.store import Store
from ferry.store.store import sqlite_url
from ferry.web import CONTENT_SECURITY_POLICY, static_dir


def test_loads_are_demand_over_capacity_with_arrivals_on_their_target() -> None:
    snap = ClusterSnapshot(
        hosts=(DrsHost(name="a", cpus=4, memory_mib=1000),
               DrsHost(name="b", cpus=2, memory_mib=2000)),
        vms=(DrsVm(name="v1", host="a", memory_mib=500, vcpus=2, cpu_demand=1.0,
                   mem_demand_mib=250),
             DrsVm(name="v2", host="a", memory_mib=100, vcpus=1, cpu_demand=1.0,
                   mem_demand_mib=400)),  # uses at most what it was given
        incoming_mib={"b": 500})
    result = loads(snap)
    assert result["a"].cpu == pytest.approx(0.5)
    assert result["a"].memory == pytest.approx(0.35)
    assert result["b"].cpu == 0.0
    assert result["b"].memory == pytest.approx(0.25)


def test_the_static_files_ship_in_the_package() -> None:
    names = {p.name for p in static_dir().iterdir()}
    assert {"index.html", "app.js", "view.js", "app.css", "favicon.svg"} <= names


def test_the_page_runs_no_inline_or_foreign_code() -> None:
    page = (static_dir() / "index.html").read_text()
    script = "".join((static_dir() / f).read_text() for f in ("app.js", "view.js"))
    assert "<script>" not in page and not re.search(r"\son[a-z]+\s*=", page)
    assert "style=" not in page
    assert "http://" not in page and "https://" not in page  # no CDN
    # API data reaches the page only as text (VM names are user input).
    assert "innerHTML" not in script and "outerHTML" not in script
    assert "insertAdjacentHTML" not in script and "document.write" not in script
    assert "localStorage" not in script  # the token lives in the tab only


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """The control plane's app (no agents) and an admin token, called as from 127.0.0.1."""
    pki = ControlPki(tmp_path / "pki")
    pki.init(("127.0.0.1",))
    store = await Store.open(sqlite_url(str(tmp_path / "ferry.db")))
    secret = new_secret()
    info = await store.security.add_token("admin", TokenRole.ADMIN, secret, None)
    control = ControlPlane(store, pki)
    # The API as a lone control plane serves it, its loops not started: leading,
    # and its job writes unfenced (no other replica's term to guard against).
    control.leadership.leading, control.store.fence = True, None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(control)),
                                 base_url="http://127.0.0.1") as client:
        yield client, format_token(info.id, secret)
    await control.close()


async def test_the_page_is_served_without_a_token_under_a_strict_csp(
        api: tuple[httpx.AsyncClient, str]) -> None:
    client, _ = api
    for path in ("/", "/ui/app.js", "/ui/view.js", "/ui/app.css"):
        resp = await client.get(path)
        assert resp.status_code == 200, path
        assert resp.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert resp.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    page = await client.get("/")
    assert page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/ui/app.js">' in page.text
    assert (await client.get("/ui/../app.py")).status_code == 404


async def test_load_needs_a_token_and_lists_each_host(
        api: tuple[httpx.AsyncClient, str]) -> None:
    client, token = api
    assert (await client.get("/v1/load")).status_code == 401
    resp = await client.get("/v1/load", headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200
    assert resp.json() == {}  # no host has reported yet
