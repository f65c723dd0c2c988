"""The CLI's client of the control plane: finds it, calls it, raises FerryErrors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from ferry.domain.errors import FerryError, HostUnavailable
from ferry.lab.config import DEFAULT_LAB_DIR, load
from ferry.wire import error_from_body, error_from_response

DEFAULT_URL = "http://127.0.0.1:8700"


def resolve_url(url: str | None, lab_dir: Path | None = None) -> str:
    """--url, else $FERRY_URL, else the lab's control plane, else localhost."""
    if url:
        return url
    if os.environ.get("FERRY_URL"):
        return os.environ["FERRY_URL"]
    lab = load(lab_dir or DEFAULT_LAB_DIR)
    return lab.control_url if lab is not None else DEFAULT_URL


class Client:
    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        self.url = url
        self._http = httpx.Client(base_url=url, timeout=timeout_s, trust_env=False)

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        try:
            resp = self._http.request(method, path, json=body,
                                      params={k: v for k, v in params.items() if v is not None})
        except httpx.HTTPError as exc:
            raise HostUnavailable(f"cannot reach the control plane at {self.url}: {exc}",
                                  "start it with `ferry lab up` or set --url/FERRY_URL"
                                  ) from exc
        if resp.status_code >= 400:
            raise error_from_response(resp.status_code, resp.content)
        return resp.json() if resp.content else None

    def events(self, path: str) -> Iterator[dict[str, Any]]:
        """Follow a server-sent event stream, yielding each event's JSON."""
        try:
            with self._http.stream("GET", path, timeout=httpx.Timeout(60.0, read=None)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise error_from_body(resp.status_code, resp.json())
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        yield json.loads(line[6:])
        except httpx.HTTPError as exc:
            raise FerryError(f"lost the event stream from {self.url}: {exc}",
                             "see `ferry migration show ID`") from exc
