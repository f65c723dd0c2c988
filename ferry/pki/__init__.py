"""The cluster's trust: its CA, host and control-plane certificates, TLS servers that
know who called them. Public API re-exported here; the modules are private helpers."""

from ferry.pki.certs import (
    ClusterCa,
    Identity,
    Role,
    identity_of,
    make_key_and_csr,
    write_private,
)
from ferry.pki.layout import ControlPki, HostTls

__all__ = ["ClusterCa", "ControlPki", "HostTls", "Identity", "Role", "identity_of",
           "make_key_and_csr", "write_private"]
