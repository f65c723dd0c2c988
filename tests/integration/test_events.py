"""The event log and metrics in the lab: one real migration, then its events through
GET /v1/events, the SSE stream and `ferry events --vm`; a refused request as an event;
the migration counted in /metrics; and the guest intact."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from ferry.cli.client import Client, lab_client
from ferry.cli.demo import wait_heartbeat
from ferry.cli.main import app
from ferry.lab.config import LabConfig
from ferry.pki.layout import client_context
from tests.integration.helpers import assert_intact, boot_probe, follow, remove_vm

VM = "ev1"


def _completed(lab: LabConfig) -> float:
    token = lab.admin_token_file.read_text().strip()
    resp = httpx.get(f"{lab.control_url}/metrics", verify=client_context(lab.ca_file),
                     trust_env=False, headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name == "ferry_migrations_total" and \
                    sample.labels == {"outcome": "completed"}:
                return sample.value
    raise AssertionError(f"no ferry_migrations_total in {resp.text[:2000]}")


def _stream_until_ended(lab: LabConfig, after: int) -> list[tuple[int, dict[str, Any]]]:
    """Follow /v1/events/stream (what `ferry events --follow` does) from `after` until
    the VM's migration_ended arrives."""
    got: list[tuple[int, dict[str, Any]]] = []
    for event_id, event in lab_client(lab).follow("/v1/events/stream", last_id=after,
                                                  vm=VM):
        got.append((event_id, event))
        if event["kind"] == "migration_ended":
            return got
    return got


def test_a_migration_is_logged_streamed_and_counted(client: Client, lab: LabConfig) -> None:
    boot_probe(client, lab, VM, "host1")
    try:
        before = wait_heartbeat(client, VM)
        mark = max((e["id"] for e in client.call("GET", "/v1/events", limit=1)), default=0)
        counted = _completed(lab)
        with ThreadPoolExecutor(1) as pool:
            streamed = pool.submit(_stream_until_ended, lab, mark)
            rec = client.call("POST", "/v1/migrations", {"vm": VM, "target": "host2"})
            rec = follow(client, rec["id"])
            assert rec["phase"] == "completed", rec
            stream = streamed.result(timeout=120)
        assert_intact(client, VM, "host2", lab, before)

        # GET /v1/events, paged after the mark: started then ended, by the lab's token
        logged = client.call("GET", "/v1/events", after=mark, vm=VM, limit=100)
        mine = [e for e in logged if e["object"] == rec["id"]]
        assert [e["kind"] for e in mine] == ["migration_started", "migration_ended"], logged
        started, ended = mine
        assert "host1 -> host2" in started["detail"]
        assert ended["outcome"] == "ok" and "now on host2" in ended["detail"]
        assert all(e["actor"].startswith("token ") for e in mine), mine

        # the SSE stream delivered the same events, each with its id as the SSE id
        ids = [i for i, _ in stream]
        assert ids == sorted(ids) and all(i == e["id"] for i, e in stream), stream
        assert {(e["kind"], e["id"]) for e in mine} <= {(e["kind"], e["id"])
                                                        for _, e in stream}

        # `ferry events --vm` prints them
        env = {"FERRY_URL": lab.control_url, "FERRY_CA": str(lab.ca_file),
               "FERRY_TOKEN": lab.admin_token_file.read_text().strip()}
        out = CliRunner().invoke(app, ["events", "--vm", VM, "--json"], env=env)
        assert out.exit_code == 0, out.output
        printed = json.loads(out.output)
        assert {started["id"], ended["id"]} <= {e["id"] for e in printed}, printed
        out = CliRunner().invoke(app, ["events", "--vm", VM, "--since", "bogus"], env=env)
        assert out.exit_code == 1 and "since" in out.output, out.output

        # a refused request (a bad token) is an event too
        resp = httpx.get(f"{lab.control_url}/v1/vms",
                         verify=client_context(lab.ca_file), trust_env=False,
                         headers={"authorization": "Bearer fy_nobody_" + "x" * 24})
        assert resp.status_code == 401, resp.text
        refused = [e for e in client.call("GET", "/v1/events", after=ended["id"], limit=100)
                   if e["kind"] == "request_refused" and e["object"] == "/v1/vms"]
        assert refused and "unknown or revoked" in refused[-1]["detail"], refused

        # /metrics counts it (derived from the store's migration records)
        assert _completed(lab) == counted + 1
    finally:
        remove_vm(client, VM)
