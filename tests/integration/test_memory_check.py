"""The destination's RAM is compared with the source's before it runs, and repaired.

The lab's fault hook makes three pages of the paused destination stale right before
the control plane asks for its digests (as a write lost by TCG's dirty tracking leaves
them); the migration must find them, copy them again, and the guest run on intact.
Without the check the probe's memory sweep or the guest kernel would hit stale pages.
"""

from __future__ import annotations

import httpx
import pytest

from ferry.cli.client import Client
from ferry.cli.demo import wait_heartbeat
from ferry.lab.config import LabConfig
from tests.integration.helpers import (
    agent_call,
    arm_fault,
    assert_intact,
    boot_probe,
    disarm_faults,
    follow,
    remove_vm,
)

pytestmark = pytest.mark.slow


def test_stale_pages_on_the_destination_are_repaired(client: Client, lab: LabConfig) -> None:
    name = "memchk1"
    boot_probe(client, lab, name, "host1", dirty=8)
    try:
        before = wait_heartbeat(client, name)
        arm_fault(lab, "host2", name, "ram_digests", "corrupt_ram")
        rec = client.call("POST", "/v1/migrations", {"vm": name, "target": "host2"})
        rec = follow(client, rec["id"])
        assert rec["phase"] == "completed", rec
        check = rec["memory_check"]
        assert check is not None and check["skipped"] is None, check
        # the fault's three pages lie in three chunks; a real lost write may add more
        assert check["repaired_pages"] >= 3 and check["differing_chunks"] >= 3, check
        assert check["chunks"] == 192 * 2**20 // (2 << 20)
        before = assert_intact(client, name, "host2", lab, before)

        # the way back, no fault: checked too (TCG hosts), nothing or little to repair
        rec = follow(client, client.call("POST", "/v1/migrations",
                                         {"vm": name, "target": "host1"})["id"])
        assert rec["phase"] == "completed", rec
        assert rec["memory_check"]["skipped"] is None, rec["memory_check"]
        assert_intact(client, name, "host1", lab, before)

        # a running guest's memory is neither read nor written through its agent
        for path, body in (("ram/digests", {}), ("ram/read", {"pages": [0]}),
                           ("ram/write", {"pages": [0], "data": ""})):
            with pytest.raises(httpx.HTTPStatusError) as err:
                agent_call(lab, "host1", "POST", f"/v1/vms/{name}/{path}", body)
            assert err.value.response.status_code == 409, (path, err.value.response.text)
            assert "running" in err.value.response.text
    finally:
        disarm_faults(lab, "host2")
        remove_vm(client, name)
