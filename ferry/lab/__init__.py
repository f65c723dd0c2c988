"""A local cluster on one machine: hosts as network namespaces on a bridge, a shared
datastore directory, one ferry-agent per host and the control plane. Needs root."""
