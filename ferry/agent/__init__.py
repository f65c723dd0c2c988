"""The host agent: exposes one host's hypervisor/ to the control plane over HTTP."""
