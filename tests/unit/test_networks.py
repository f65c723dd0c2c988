"""VM networks as pure values: names, validation, what each host is told."""

import json
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from ferry.agent.stream_settings import announce_of, incoming_parameters
from ferry.domain.compat import RefusalReason, check_migration
from ferry.domain.errors import Conflict
from ferry.domain.migration import StreamOptions
from ferry.domain.networks import (
    HostNetwork,
    NetworkSpec,
    bridge_name,
    host_view,
    next_vni,
    out_of_step,
    tap_name,
    vxlan_name,
)
from ferry.domain.records import ClientView
from ferry.domain.specs import NicSpec, VmSpec
from tests.unit.test_compat_placement import SPEC, facts, host


def test_interface_names_fit_linux_limits_and_are_stable() -> None:
    for vni in (1, 100, 2**24 - 1):
        assert len(bridge_name(vni)) <= 15 and len(vxlan_name(vni)) <= 15
    tap = tap_name("1b4e28ba-2fa1-11d2-883f-0016d3cca427", "nic0")
    assert len(tap) == 15 and tap.startswith("fyt")
    assert tap == tap_name("1b4e28ba-2fa1-11d2-883f-0016d3cca427", "nic0")
    assert tap != tap_name("1b4e28ba-2fa1-11d2-883f-0016d3cca427", "nic1")


@pytest.mark.parametrize("fields, message", [
    ({"name": "user", "vni": 100}, "user-mode networking"),
    ({"name": "Bad Name", "vni": 100}, "pattern"),
    ({"name": "net", "vni": 0}, "greater than or equal to 1"),
    ({"name": "net", "vni": 2**24}, "less than or equal to"),
    ({"name": "net", "vni": 5, "mtu": 100}, "greater than or equal to 576"),
    ({"name": "net", "vni": 5, "vteps": ["224.0.0.1"]}, "not a unicast"),
    ({"name": "net", "vni": 5, "vteps": ["127.0.0.1"]}, "not a unicast"),
    ({"name": "net", "vni": 5, "vteps": ["example.com"]}, "IPv4"),
    ({"name": "net", "vni": 5, "vteps": ["10.0.0.1", "10.0.0.1"]}, "listed twice"),
    ({"name": "net", "vni": 5, "vteps": [f"10.0.1.{i}" for i in range(1, 66)]},
     "at most 64 items"),
    # JSON true, "7" and 7.5 are not VNIs (lax pydantic would take true and "7").
    ({"name": "net", "vni": True}, "valid integer"),
    ({"name": "net", "vni": "7"}, "valid integer"),
    ({"name": "net", "vni": 7.5}, "valid integer"),
    ({"name": "net", "vni": 5, "mtu": "1400"}, "valid integer"),
])
def test_bad_networks_are_refused_with_the_reason(fields: dict[str, object],
                                                  message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        NetworkSpec.model_validate(fields)


def test_next_vni_is_the_lowest_free_from_100() -> None:
    assert next_vni([]) == 100
    assert next_vni([100, 101, 103]) == 102
    assert next_vni([1, 5]) == 100
    with pytest.raises(Conflict, match="no VXLAN network identifier from 100 up is free"):
        next_vni(range(100, 2**24))


def test_each_host_floods_to_every_other_host_and_the_extra_endpoints() -> None:
    nets = [NetworkSpec(name="b", vni=7, vteps=(IPv4Address("10.0.0.99"),)),
            NetworkSpec(name="a", vni=9)]
    view = host_view(nets, "10.0.0.1", ["10.0.0.2", "10.0.0.1", "10.0.0.3"])
    assert [n.name for n in view] == ["a", "b"]
    assert [str(p) for p in view[0].peers] == ["10.0.0.2", "10.0.0.3"]
    assert [str(p) for p in view[1].peers] == ["10.0.0.2", "10.0.0.3", "10.0.0.99"]
    # An extra endpoint that is this host itself is not a peer of it (it is of the others).
    own = [NetworkSpec(name="c", vni=3, vteps=(IPv4Address("10.0.0.1"),))]
    assert [str(p) for p in host_view(own, "10.0.0.1", ["10.0.0.1", "10.0.0.2"])[0].peers] \
        == ["10.0.0.2"]
    assert [str(p) for p in host_view(own, "10.0.0.2", ["10.0.0.1", "10.0.0.2"])[0].peers] \
        == ["10.0.0.1"]


@given(st.permutations([IPv4Address(f"10.0.0.{i}") for i in range(2, 9)]))
def test_digest_ignores_peer_order_but_not_peers(peers: list[IPv4Address]) -> None:
    base = HostNetwork(name="n", vni=5, peers=tuple(sorted(peers, key=int)))
    assert HostNetwork(name="n", vni=5, peers=tuple(peers)).digest() == base.digest()
    assert HostNetwork(name="n", vni=5, peers=tuple(peers[1:])).digest() != base.digest()
    assert HostNetwork(name="n", vni=6, peers=tuple(peers)).digest() != base.digest()


def _vm(network: str) -> VmSpec:
    return VmSpec.model_validate({
        "name": "vm1", "kernel": {"kernel": "/srv/k"},
        "nics": [NicSpec(name="nic0", network=network, mac="52:54:00:00:00:01")]})


def test_announce_only_for_bridged_nics_and_only_when_on() -> None:
    on, off = StreamOptions(), StreamOptions(announce=False)
    assert announce_of(on, _vm("vmnet")) is not None
    assert announce_of(on, _vm("user")) is None
    assert announce_of(off, _vm("vmnet")) is None
    # QEMU's own announce at the end of the stream follows the same switch.
    assert incoming_parameters(on)["announce-rounds"] > 0
    assert incoming_parameters(off)["announce-rounds"] == 0


def test_a_target_without_the_vms_network_is_refused_but_user_needs_none() -> None:
    without = host("host2", networks=())
    bridged = SPEC
    user = SPEC.model_copy(update={"nics": (NicSpec(name="nic0", network="user",
                                                    mac="52:54:00:00:00:01"),)})
    refusals = check_migration(bridged, "host1", without)
    assert [r.reason for r in refusals] == [RefusalReason.NETWORK_MISSING]
    assert "no network vmnet" in refusals[0].message
    assert check_migration(user, "host1", without) == []


@pytest.mark.parametrize("body", [
    {"gap_ms": 12.5, "tcp_survived": "yes"},
    {"gap_ms": "12"},
    {"gap_ms": -1},
    {"gap_ms": 1, "udp_lost": 2.5},
    {"gap_ms": 1, "udp_lost": -3},
])
def test_a_client_view_takes_only_numbers_and_booleans_as_such(body: dict[str, object]
                                                                ) -> None:
    with pytest.raises(ValidationError):
        ClientView.model_validate_json(json.dumps(body))
    assert ClientView.model_validate_json('{"gap_ms": 250}').gap_ms == 250.0


def test_a_network_applied_as_another_segment_is_out_of_step() -> None:
    """A host that missed a change (here: network vmnet deleted and made again with
    another VNI while it was away) still reports vmnet; a VM sent there would land on
    the old segment. A peer list it has yet to lengthen is the same segment."""
    new = NetworkSpec(name="vmnet", vni=101)
    other = NetworkSpec(name="back", vni=102)
    f = facts("host2", address="10.0.0.2", networks=("vmnet", "back"),
              network_segments={"vmnet": (100, 1450), "back": (102, 1450)})
    assert out_of_step({"vmnet", "back"}, [new, other], f) == ["vmnet"]
    assert out_of_step({"back"}, [new, other], f) == []
    smaller = NetworkSpec(name="back", vni=102, mtu=1400)
    assert out_of_step({"back"}, [smaller], f) == ["back"]
    # in step once applied; one it lacks is not "out of step" (check_migration refuses
    # it as missing), nor is anything on a host that reports no segments (older agent)
    f = f.model_copy(update={"network_segments": {"vmnet": (101, 1450), "back": (102, 1450)}})
    assert out_of_step({"vmnet", "back", "nonet"}, [new, other], f) == []
    assert out_of_step({"vmnet"}, [new], f.model_copy(update={"network_segments": {}})) == []
