"""Names a user types go into the API's paths; none may turn a request into another
(httpx resolves `..`: `ferry network delete ../vms/web` would delete VM web)."""

from __future__ import annotations

import pytest

from ferry.cli.client import Client, api_path
from ferry.domain.errors import InvalidInput


@pytest.mark.parametrize("path", [
    "/v1/networks/../vms/web", "/v1/networks/./x", "/v1/vms/a?force=true",
    "/v1/vms/a#b", "/v1/vms/a%2f..", "/v1/vms/a\\b", "/v1/vms/", "/v1/vms//start",
    "/v1/vms/a\nb"])
def test_a_path_a_name_could_redirect_is_refused(path: str) -> None:
    with pytest.raises(InvalidInput, match="is not an API path"):
        api_path(path)


def test_a_refused_path_sends_nothing() -> None:
    # Port 9 on loopback (discard): a request that went out would fail differently.
    client = Client("http://127.0.0.1:9", timeout_s=1.0)
    with pytest.raises(InvalidInput, match=r"'\.\.' cannot be part of one"):
        client.call("DELETE", "/v1/networks/../vms/web")


@pytest.mark.parametrize("path", ["/v1/vms", "/v1/vms/web-1/start",
                                  "/v1/migrations/3f2a9c/events", "/healthz"])
def test_ordinary_paths_pass_unchanged(path: str) -> None:
    assert api_path(path) == path
