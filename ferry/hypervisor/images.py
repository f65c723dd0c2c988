"""Disk images with qemu-img: create (thin or thick), inspect, remove."""

from __future__ import annotations

import json
from pathlib import Path

from ferry import commands
from ferry.domain.errors import InvalidInput
from ferry.domain.specs import DiskFormat, Provisioning
from ferry.domain.storage import ImageInfo
from ferry.hypervisor.errors import HypervisorError


async def _qemu_img(*args: str, timeout_s: float = 300.0) -> str:
    try:
        done = await commands.run("qemu-img", *args, timeout_s=timeout_s)
    except TimeoutError:
        raise HypervisorError(f"qemu-img {args[0]} took longer than {timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise HypervisorError(f"qemu-img {args[0]} failed: {done.err}")
    return done.out


async def create_image(path: Path, fmt: DiskFormat, size: int,
                       provisioning: Provisioning) -> None:
    """Create an image; thick allocates every byte now (it fails at once if space is short)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    args = ["create", "-q", "-f", fmt.value]
    if provisioning is Provisioning.THICK:
        args += ["-o", "preallocation=full"]
    try:
        await _qemu_img(*args, str(path), str(size))
    except HypervisorError:
        path.unlink(missing_ok=True)  # noqa: ASYNC240 (a local unlink, no real blocking)
        raise


async def image_info(path: Path) -> ImageInfo:
    data = json.loads(await _qemu_img("info", "--force-share", "--output=json", str(path),
                                      timeout_s=30.0))
    formats = [f.value for f in DiskFormat]
    if data.get("format") not in formats:
        raise InvalidInput(f"image {path} is {data.get('format')}, which Ferry does not run",
                           f"convert it with `qemu-img convert -O qcow2` ({' or '.join(formats)})")
    return ImageInfo(path=str(path), format=DiskFormat(data["format"]),
                     virtual_size=int(data["virtual-size"]),
                     allocated=int(data.get("actual-size", 0)),
                     backing=data.get("full-backing-filename") or data.get("backing-filename"))
