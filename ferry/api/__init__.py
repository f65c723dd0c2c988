"""The control plane's REST API and event stream; the only place errors become HTTP."""
