"""The CLI's client of the control plane: finds it, calls it, raises FerryErrors."""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx_sse

from ferry.domain.errors import FerryError, HostUnavailable, InvalidInput
from ferry.lab.config import DEFAULT_LAB_DIR, LabConfig, load
from ferry.pki.layout import client_context
from ferry.wire import error_from_body, error_from_response

DEFAULT_URL = "https://127.0.0.1:8700"
RECONNECT_S = 1.0  # before resuming a lost event stream
# The server pings an idle event stream every 15 s: four pings missed, the connection is
# taken for dead and resumed.
STREAM_READ_S = 60.0


def lab_running(lab: LabConfig) -> bool:
    """The lab's bridge exists: its addresses are on this machine, nothing leaves it."""
    from ferry.lab import net
    return net.exists(lab)


def connect(url: str | None = None, timeout_s: float = 60.0,
            lab_dir: Path | None = None) -> Client:
    """A client of the control plane: --url, else $FERRY_URL, else the lab's; the token
    from $FERRY_TOKEN, else the lab's admin token; the CA from $FERRY_CA, else the lab's.

    A request meant for the lab never leaves the machine: when the lab's bridge is down
    its addresses would route off the machine (with a token in the request), so the
    client refuses before connecting."""
    lab = load(lab_dir or DEFAULT_LAB_DIR)
    url = url or os.environ.get("FERRY_URL") or (lab.control_url if lab else DEFAULT_URL)
    is_lab = lab is not None and url.rstrip("/") in lab.control_urls
    if is_lab and lab is not None and not lab_running(lab):
        raise HostUnavailable("the lab is not running: `ferry lab up`",
                              f"(its control plane {lab.control_url} is a lab address; "
                              "nothing is sent there while the lab is down)")
    token = os.environ.get("FERRY_TOKEN") or (_read(lab.admin_token_file)
                                               if is_lab and lab else None)
    ca_env = os.environ.get("FERRY_CA")
    ca = Path(ca_env) if ca_env else (lab.ca_file if lab and lab.ca_file.exists() else None)
    others = lab.control_urls if is_lab and lab is not None else ()
    return Client(url, timeout_s, token=token, ca=ca, others=others)


def lab_client(lab: LabConfig, timeout_s: float = 60.0) -> Client:
    """The lab's admin client (for the demo, benchmarks and tests)."""
    return Client(lab.control_url, timeout_s, token=_read(lab.admin_token_file),
                  ca=lab.ca_file, others=lab.control_urls)


def _code(content: bytes) -> str | None:
    """The error code of an error body, if it is one."""
    try:
        body = json.loads(content)
    except ValueError:
        return None
    err = body.get("error") if isinstance(body, dict) else None
    return str(err.get("code")) if isinstance(err, dict) else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def api_path(path: str) -> str:
    """`path` as given, if no name put into it (a VM's, a network's...) can make it
    another request: httpx resolves `..` (`/v1/networks/../vms/web` is a VM), and `?`,
    `#` and `%` would start a query, a fragment or an escape."""
    segments = path.split("/")
    bad = next((seg for seg in segments if seg in (".", "..")
                or any(c in seg for c in "?#%\\") or not seg.isprintable()), None)
    if bad is not None or "" in segments[1:]:
        raise InvalidInput(f"{path!r} is not an API path: {bad or 'an empty name'!r} "
                           "cannot be part of one",
                           "names are letters, digits and '-' (see `--help`)")
    return path


class Client:
    """`others`: every replica's URL (one leads, the others stand by). A call that finds
    its replica down (the connection refused: nothing was sent) or standing by (503
    not_leader: nothing changed) is sent to the next one; any other failure is not
    retried, as the request may have been acted on."""

    def __init__(self, url: str, timeout_s: float = 60.0, token: str | None = None,
                 ca: Path | None = None, others: tuple[str, ...] = ()) -> None:
        self.url = url
        self.urls = tuple(dict.fromkeys((url.rstrip("/"), *others)))
        headers = {"authorization": f"Bearer {token}"} if token else {}
        verify: ssl.SSLContext | bool = client_context(ca) if ca is not None else True
        self._http = httpx.Client(base_url=url, timeout=timeout_s, trust_env=False,
                                  headers=headers, verify=verify)

    def _switch(self, tried: int) -> bool:
        """Move on to the next replica, unless every one was tried."""
        if tried + 1 >= len(self.urls):
            return False
        at = self.urls.index(self.url.rstrip("/")) if self.url.rstrip("/") in self.urls else 0
        self.url = self.urls[(at + 1) % len(self.urls)]
        self._http.base_url = httpx.URL(self.url)
        return True

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        path = api_path(path)
        query = {k: v for k, v in params.items() if v is not None}
        tried = 0
        while True:
            try:
                resp = self._http.request(method, path, json=body, params=query)
            except httpx.ConnectError as exc:
                if self._switch(tried):
                    tried += 1
                    continue
                raise self._unreachable(exc) from exc
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from exc
            if resp.status_code == 503 and _code(resp.content) == "not_leader" and \
                    self._switch(tried):
                tried += 1
                continue
            if resp.status_code >= 400:
                raise error_from_response(resp.status_code, resp.content)
            return resp.json() if resp.content else None

    def _unreachable(self, exc: Exception) -> HostUnavailable:
        where = self.url if len(self.urls) == 1 else ", ".join(self.urls)
        return HostUnavailable(f"cannot reach the control plane at {where}: {exc}",
                               "start it with `ferry lab up` or set --url/FERRY_URL")

    def follow(self, path: str, last_id: int | None = None, **params: Any
               ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Follow the event log's stream (httpx-sse): (id, event) pairs, forever. A lost
        connection is resumed after the last id received (`Last-Event-ID`), so no event
        is missed or repeated; a refusal (bad token, bad parameter) is raised."""
        path = api_path(path)
        query = {k: v for k, v in params.items() if v is not None}
        while True:
            headers = {"last-event-id": str(last_id)} if last_id is not None else {}
            try:
                with httpx_sse.connect_sse(self._http, "GET", path, params=query,
                                           headers=headers,
                                           timeout=httpx.Timeout(60.0, read=STREAM_READ_S)
                                           ) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        raise error_from_response(source.response.status_code,
                                                  source.response.content)
                    for sse in source.iter_sse():
                        if sse.id:
                            last_id = int(sse.id)
                        if sse.data:
                            yield last_id or 0, json.loads(sse.data)
            except (httpx.TransportError, httpx_sse.SSEError) as exc:
                if last_id is None:  # nothing received yet: not a stream worth resuming
                    raise HostUnavailable(f"cannot follow events at {self.url}: {exc}",
                                          "check the control plane is running") from exc
            # The server ended the stream (a restart, a proxy's limit) or it broke:
            # resume after a pause, from the last id.
            time.sleep(RECONNECT_S)

    def events(self, path: str) -> Iterator[dict[str, Any]]:
        """Follow a server-sent event stream, yielding each event's JSON."""
        path = api_path(path)
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
