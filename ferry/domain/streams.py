"""What an agent accepts as the other end of a memory or disk stream, and whether a
stream is encrypted (pure).

An agent passes a migration URI straight to QEMU, and QEMU would run `exec:` commands,
write `file:` paths or open any socket: so only `tcp:` to an IPv4 address and port is
ever accepted, and only NBD servers given as address:port.
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum

from ferry.domain.errors import InvalidInput

_TCP_URI = re.compile(r"^tcp:(?P<host>[0-9.]{7,15}):(?P<port>[0-9]{1,5})$")
_ADDRESS = re.compile(r"^(?P<host>[0-9.]{7,15}):(?P<port>[0-9]{1,5})$")


class Encryption(StrEnum):
    """TLS for memory and disk streams (vSphere's encrypted vMotion modes)."""

    REQUIRED = "required"  # refuse a migration that cannot be encrypted
    OPPORTUNISTIC = "opportunistic"  # encrypt when both hosts can
    DISABLED = "disabled"


def _endpoint(match: re.Match[str] | None, what: str, given: str) -> tuple[str, int]:
    if match is None:
        raise InvalidInput(f"{what} {given[:80]!r} is refused: only tcp:<IPv4>:<port> "
                           "(address:port for NBD) of a cluster host is accepted",
                           "let the control plane choose the address")
    try:
        address = ipaddress.IPv4Address(match.group("host"))
    except ValueError:
        raise InvalidInput(f"{what} {given[:80]!r} has no valid IPv4 address") from None
    port = int(match.group("port"))
    if not 1 <= port <= 65535 or address.is_multicast or address.is_unspecified:
        raise InvalidInput(f"{what} {given[:80]!r} names no usable address and port")
    return str(address), port


def migration_endpoint(uri: str) -> tuple[str, int]:
    """(address, port) of a `tcp:` migration URI; InvalidInput for anything else
    (exec:, file:, unix:, fd:, rdma:, host names)."""
    return _endpoint(_TCP_URI.match(uri), "migration URI", uri)


def nbd_endpoint(address: str) -> tuple[str, int]:
    return _endpoint(_ADDRESS.match(address), "NBD server", address)


def encrypt(mode: Encryption, source_can: bool, target_can: bool) -> bool | None:
    """Whether a stream between two hosts is encrypted; None if `required` cannot be met."""
    both = source_can and target_can
    if mode is Encryption.DISABLED:
        return False
    if mode is Encryption.OPPORTUNISTIC:
        return both
    return True if both else None


def unsent_hint(encrypted: bool, sent_bytes: int, source: str, target: str) -> str:
    """What to add to a stream that failed before a byte went: a cleartext stream's
    destination refuses every address but the one the source host reports (its agent's
    migration_address, else its listen address), so a source that reaches the target
    from another of its addresses is refused at connect."""
    if encrypted or sent_bytes > 0:
        return ""
    return (f" (nothing was sent: {target} admits this cleartext stream only from the "
            f"address {source} reports; if {source} reaches {target} from another of its "
            "addresses, set that as its agent's migration_address)")
