"""Files of one VM's run directory and the boot files it names: the spec kept for a
restarted agent, the serial console's tail, a kernel image's sanity."""

from __future__ import annotations

import os
from pathlib import Path

from ferry.domain.errors import InvalidInput
from ferry.domain.specs import VmSpec
from ferry.hypervisor.argv import RunPaths

SERIAL_TAIL_BYTES = 64 * 1024


def tail_lines(path: Path, max_lines: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - SERIAL_TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    # Only whole lines: the guest may be half-way through one (a heartbeat cut after
    # "boot=455511" would read as another boot), and a tail read from the middle of the
    # file starts inside one.
    end = data.rfind(b"\n")
    start = data.find(b"\n") + 1 if size > SERIAL_TAIL_BYTES else 0
    if end < start:
        return []
    lines = data[start:end].decode(errors="replace").splitlines()
    return lines[-max_lines:]


def check_kernel_image(path: Path) -> None:
    """QEMU's -kernel boots a Linux bzImage (or an ELF kernel); given another file (the
    initramfs, say) QEMU exited at start, a 502 for what is the request's mistake (found
    fuzzing), or ran whatever the bytes were."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x206)
    except OSError as exc:
        raise InvalidInput(f"cannot read boot file {path}: {exc.strerror}") from None
    if head[:4] == b"\x7fELF" or head[0x202:0x206] == b"HdrS":
        return
    raise InvalidInput(f"boot file {path} is not a Linux kernel (no bzImage header, not ELF)",
                       "name the kernel image (vmlinuz) as kernel and the initramfs as initrd")


def write_spec(paths: RunPaths, spec: VmSpec) -> None:
    """Replace spec.json atomically: a crash mid-write leaves the old one or the new one,
    never a torn file that a restarted agent could not read."""
    tmp = paths.spec_file.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        f.write(spec.model_dump_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, paths.spec_file)


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_time_s(pid: int | None) -> float | None:
    """utime + stime of a process from /proc (None if it is gone)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return None
