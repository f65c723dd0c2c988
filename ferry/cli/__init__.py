"""The `ferry` command: a typed client of the control plane's API, plus the lab."""
