"""The proof tools prove something: the double-run watcher fires on a guest running on two
hosts, the probe's verifier notices a corrupted word, a rebooted guest is not intact."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from ferry.cli.client import Client
from ferry.lab.config import LabConfig
from tests.integration.helpers import boot_probe, qemu_hosts, remove_vm, wait_until
from tests.integration.watcher import Watcher


def qemu_pid(lab: LabConfig, vm: str, host: str) -> int:
    return int((lab.host_dir(host) / "run" / "vms" / vm / "qemu.pid").read_text())


def test_the_watcher_sees_a_guest_executing_on_two_hosts(
        client: Client, lab: LabConfig, watcher: Watcher | None) -> None:
    assert watcher is not None
    boot_probe(client, lab, "twin1", "host1", dirty=20)
    rogue_dir = lab.host_dir("host2") / "rogue" / "twin1"
    try:
        wait_until(lambda: watcher.seen_running("twin1") == {"host1"}, 30,
                   "the watcher to see twin1 executing on host1")
        assert watcher.double_runs(["twin1"]) == []
        # A second QEMU of the same VM, as a split brain would start it: the same
        # command line, its files under host2's directory, cold-booting the same guest.
        argv = Path(f"/proc/{qemu_pid(lab, 'twin1', 'host1')}/cmdline").read_bytes()
        run_dir = str(lab.host_dir("host1") / "run" / "vms" / "twin1")
        rogue_argv = [a.decode().replace(run_dir, str(rogue_dir))
                      for a in argv.rstrip(b"\0").split(b"\0")]
        rogue_argv = [a for a in rogue_argv if a != "-S"]  # run, not wait for `cont`
        assert not any(str(lab.host_dir("host1")) in a for a in rogue_argv)
        rogue_dir.mkdir(parents=True)
        started = time.monotonic()
        rogue = subprocess.Popen(rogue_argv, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: qemu_hosts(lab, "twin1") == ["host1", "host2"], 30,
                       "the second QEMU to appear")
            wait_until(lambda: bool(watcher.double_runs(["twin1"])), 60,
                       "the watcher to see twin1 executing on two hosts")
        finally:
            rogue.kill()
            rogue.wait()
        watcher.allow_double_run("twin1")  # this test's own doing: do not fail it
        hits = watcher.double_runs(["twin1"])
        assert [h.hosts for h in hits] == [("host1", "host2")] * len(hits)
        assert all(h.end > started for h in hits), (started, hits)
        assert watcher.seen_running("twin1") == {"host1", "host2"}
    finally:
        shutil.rmtree(rogue_dir.parent, ignore_errors=True)
        remove_vm(client, "twin1")
