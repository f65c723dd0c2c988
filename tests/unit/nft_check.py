"""Whether nftables accepts a script the agent would run (its filters' tests)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def assert_nft_accepts(script: str) -> None:
    """-c: parsed and checked by the kernel, nothing applied; without root (make
    test-fast) in a network namespace of a user namespace of its own."""
    if shutil.which("nft") is None:
        pytest.fail("nft is missing: `make deps` installs nftables")
    argv = ["nft", "-c", "-f", "-"]
    if os.geteuid() != 0:
        argv = ["unshare", "--net", "--map-root-user", *argv]
    done = subprocess.run(argv, input=script, text=True, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
