"""The nftables script that admits only a cleartext migration's source to its
listeners (agent/stream_filter.py); tests/integration/test_stream_filter.py runs it
through the kernel and in a lab migration."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from ferry.agent.stream_filter import TABLE, Address, StreamGuard, free_port, ruleset
from ferry.domain.streams import unsent_hint
from tests.unit.nft_check import assert_nft_accepts


def test_each_port_admits_its_source_only() -> None:
    script = ruleset({40001: IPv4Address("198.18.5.11"), 40002: IPv6Address("fd00::2")})
    refuse = "counter reject with tcp reset"
    assert f"tcp dport 40001 ip saddr != 198.18.5.11 {refuse}" in script
    assert f"meta nfproto ipv6 tcp dport 40001 {refuse}" in script
    assert f"tcp dport 40002 ip6 saddr != fd00::2 {refuse}" in script
    assert f"meta nfproto ipv4 tcp dport 40002 {refuse}" in script
    assert script.startswith(f"add table inet {TABLE}\ndelete table inet {TABLE}\n")
    assert ruleset({}) == f"add table inet {TABLE}\ndelete table inet {TABLE}\n"


@pytest.mark.parametrize("ports", [{}, {40001: "10.0.0.1"},
                                   {40001: "10.0.0.1", 40002: "fd00::2"}])
def test_nft_accepts_the_script(ports: dict[int, str]) -> None:
    assert_nft_accepts(ruleset({p: ip_address(a) for p, a in ports.items()}))


async def test_a_vms_rules_go_with_it_and_no_other(monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []

    async def apply(script: str, purpose: str) -> None:
        written.append(script)

    monkeypatch.setattr("ferry.agent.stream_filter.nft.apply", apply)
    guard = StreamGuard()
    a: Address = IPv4Address("10.0.0.1")
    await guard.admit("web", 40001, a)
    await guard.admit("web", 40002, a)  # its NBD server
    await guard.admit("db", 40003, IPv4Address("10.0.0.2"))
    await guard.release("web")
    assert written[-1] == ruleset({40003: IPv4Address("10.0.0.2")})
    await guard.release("web")  # nothing held: nothing written
    assert len(written) == 4
    assert 1024 <= free_port("127.0.0.1") <= 65535
    # a port a rule holds (its listener closed, its VM not running yet) is not handed
    # to another stream
    offered = iter([40003, 40003, 40004])
    monkeypatch.setattr("ferry.agent.stream_filter.free_port", lambda _: next(offered))
    assert guard.pick("127.0.0.1") == 40004
    await guard.reset()
    assert written[-1] == ruleset({})


def test_a_cleartext_stream_refused_before_a_byte_names_the_admitted_address() -> None:
    hint = unsent_hint(encrypted=False, sent_bytes=0, source="host1", target="host2")
    assert "host2 admits this cleartext stream only from the address host1 reports" in hint
    assert "migration_address" in hint
    # Once bytes went, or with TLS (QEMU checks the certificate instead), no such hint.
    assert unsent_hint(encrypted=False, sent_bytes=4096, source="host1", target="host2") == ""
    assert unsent_hint(encrypted=True, sent_bytes=0, source="host1", target="host2") == ""
