"""One host's QEMU: argv from a VmSpec, processes, and a typed QMP layer.

Knows nothing of clusters. Errors:

    HypervisorError
     ├── QemuStartError     the process could not start or exited at once
     ├── MonitorError       QMP could not connect, or a command failed
     └── NotRunning         the operation needs a running QEMU
"""
