"""Who may do what: API token roles and their privileges (pure, no I/O).

    viewer    reads everything
    operator  viewer + power, create and delete VMs, migrate, relocate, maintenance,
              DRS apply
    admin     operator + policy, tokens of any role, host enrolment, the audit log

A token never exceeds its creator's rights: one may only create tokens whose role is
at most one's own (as Proxmox's API tokens are bounded by their user's privileges).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum

from ferry.domain.errors import Forbidden, Unauthenticated

TOKEN_PREFIX = "fy"


class TokenRole(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(TokenRole).index(self)


class Privilege(StrEnum):
    READ = "read"
    VM_CREATE = "vm.create"
    VM_POWER = "vm.power"
    VM_DELETE = "vm.delete"
    VM_MIGRATE = "vm.migrate"
    VM_RELOCATE = "vm.relocate"
    HOST_MAINTENANCE = "host.maintenance"
    DRS_APPLY = "drs.apply"
    POLICY_SET = "policy.set"
    NETWORK_MANAGE = "network.manage"  # create and delete VM networks
    TOKEN_CREATE = "token.create"
    TOKEN_ADMIN = "token.admin"  # see and revoke every token, not only one's own
    HOST_ENROL = "host.enrol"
    AUDIT_READ = "audit.read"


_OPERATOR = frozenset({
    Privilege.READ, Privilege.VM_CREATE, Privilege.VM_POWER, Privilege.VM_DELETE,
    Privilege.VM_MIGRATE, Privilege.VM_RELOCATE, Privilege.HOST_MAINTENANCE,
    Privilege.DRS_APPLY, Privilege.TOKEN_CREATE})

PRIVILEGES: dict[TokenRole, frozenset[Privilege]] = {
    TokenRole.VIEWER: frozenset({Privilege.READ, Privilege.TOKEN_CREATE}),
    TokenRole.OPERATOR: _OPERATOR,
    TokenRole.ADMIN: frozenset(Privilege),
}


@dataclass(frozen=True)
class Principal:
    """The verified bearer of a request's token."""

    token_id: str
    name: str
    role: TokenRole

    def has(self, privilege: Privilege) -> bool:
        return privilege in PRIVILEGES[self.role]

    def require(self, privilege: Privilege) -> None:
        if not self.has(privilege):
            raise Forbidden(f"token {self.name!r} ({self.role}) lacks the privilege "
                            f"{privilege}", "use a token whose role grants it "
                            "(see `ferry token list`)")

    def may_grant(self, role: TokenRole) -> None:
        self.require(Privilege.TOKEN_CREATE)
        if role.rank > self.role.rank:
            raise Forbidden(f"a {self.role} token cannot create a {role} token",
                            "a token never exceeds its creator's rights")


def hash_secret(secret: str) -> str:
    """Tokens are 256 random bits, so one SHA-256 is enough (no password stretching)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def format_token(token_id: str, secret: str) -> str:
    return f"{TOKEN_PREFIX}_{token_id}_{secret}"


def parse_token(token: str) -> tuple[str, str]:
    """(id, secret) of a bearer token; Unauthenticated if it is not one of ours."""
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not token_id.isalnum() or len(secret) < 16:
        raise Unauthenticated("the bearer token is malformed",
                              "pass a token made by `ferry token create`")
    return token_id, secret


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)
