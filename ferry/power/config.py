"""A host's power settings, as its record carries them: one model per driver, told
apart by `driver`. Secrets are never in here: IPMI's password lives in a file that
only the control plane's user reads, and the settings name that file."""

from __future__ import annotations

import ipaddress
import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from ferry.domain.errors import InvalidInput
from ferry.domain.specs import Frozen
from ferry.wire import describe_validation

M = TypeVar("M", bound=Frozen)

_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$", re.IGNORECASE)
_MAC = re.compile(r"^[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}$", re.IGNORECASE)


def check_address(value: str) -> str:
    """An IP address or an RFC 1123 host name (so never an option: no leading '-')."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _HOSTNAME.match(value):
        raise ValueError(f"address {value!r} is neither an IP address nor a host name "
                         f"(letters, digits, '-' and '.', no spaces)")
    return value.lower()


def check_ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"broadcast {value!r} is not an IPv4 address such as "
                         f"255.255.255.255 or 192.0.2.255 (Wake-on-LAN is IPv4 only)") from None


def parse_mac(value: str) -> bytes:
    """Six bytes of a unicast MAC, written aa:bb:cc:dd:ee:ff or aa-bb-cc-dd-ee-ff."""
    if not _MAC.match(value):
        raise ValueError(f"MAC address {value!r} is not six hex pairs joined by ':' or '-' "
                         f"such as 52:54:00:12:34:56")
    raw = bytes.fromhex(value.replace(":", "").replace("-", ""))
    if raw[0] & 1:
        raise ValueError(f"MAC address {value!r} is a multicast address, not a NIC's")
    if raw == bytes(6):
        raise ValueError(f"MAC address {value!r} is all zeros, not a NIC's")
    return raw


class IpmiPowerConfig(Frozen):
    driver: Literal["ipmi"]
    address: str
    username: str = Field(min_length=1, max_length=16)  # IPMI 2.0 caps user names at 16
    password_file: str
    interface: Literal["lan", "lanplus"] = "lanplus"
    timeout_s: float = Field(default=20.0, gt=0, le=300)
    graceful_off: bool = True  # ACPI shutdown (`chassis power soft`), not a hard cut

    @model_validator(mode="before")
    @classmethod
    def _no_password(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise ValueError("a password is never stored in the settings: write it to a "
                             "file readable only by Ferry and give its path as password_file")
        return data

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_address(value)

    @field_validator("username")
    @classmethod
    def _username(cls, value: str) -> str:
        if not value.isprintable() or any(c.isspace() for c in value):
            raise ValueError(f"username {value!r} has spaces or control characters")
        return value

    @field_validator("password_file")
    @classmethod
    def _password_file(cls, value: str) -> str:
        if "\0" in value or not PurePosixPath(value).is_absolute():
            raise ValueError(f"password_file {value!r} must be an absolute path, "
                             f"such as /etc/ferry/bmc-host1.pw")
        return value


class WolPowerConfig(Frozen):
    driver: Literal["wol"]
    mac: str
    broadcast: str = "255.255.255.255"
    port: int = Field(default=9, ge=1, le=65535)  # 9 (discard) or 7 (echo), by custom

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str) -> str:
        return ":".join(f"{b:02x}" for b in parse_mac(value))

    @field_validator("broadcast")
    @classmethod
    def _broadcast(cls, value: str) -> str:
        return check_ipv4(value)


class LabPowerConfig(Frozen):
    """The lab's driver: everything it needs it finds from the host's name and the lab."""

    driver: Literal["lab"]


PowerConfig = Annotated[IpmiPowerConfig | WolPowerConfig | LabPowerConfig,
                        Field(discriminator="driver")]
_ADAPTER: TypeAdapter[PowerConfig] = TypeAdapter(PowerConfig)


def validated(model: type[M], data: dict[str, Any]) -> M:
    """One driver's settings, or `InvalidInput` naming each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"power settings: {describe_validation(exc.errors())}") from None


def parse_power_config(data: object) -> PowerConfig:
    """A host's power settings from JSON-like data, or `InvalidInput` naming each field."""
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise InvalidInput(f"power settings: {describe_validation(exc.errors())}",
                           'set "driver" to "ipmi", "wol" or "lab" with that driver\'s '
                           "fields") from None
