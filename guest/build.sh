#!/bin/bash
# Build the Ferry test guest: a Debian cloud kernel plus a tiny initramfs
# (busybox + /init + the probe workload + the echo server).
#
#   guest/build.sh OUTDIR
#
# Produces OUTDIR/vmlinuz, OUTDIR/initrd.img (gzip'd newc cpio) and
# OUTDIR/probe.  The kernel .deb is cached in OUTDIR/cache.  If the outputs
# are already newer than probe.c, echod.c, init and this script, nothing is
# done.
#
# Needs: gcc + static libc (libc6-dev), busybox-static, cpio, kmod (modinfo),
# apt (to fetch linux-image-*-cloud-amd64), xz/zstd if modules are compressed.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
cache=$out/cache
inputs=("$here/probe.c" "$here/echod.c" "$here/init" "$here/build.sh")
outputs=("$out/vmlinuz" "$out/initrd.img" "$out/probe")

report() {
    echo "guest kernel: $out/vmlinuz${kver:+ ($kver)}"
    echo "guest initrd: $out/initrd.img"
    echo "guest probe:  $out/probe"
}

up_to_date() {
    local o i
    for o in "${outputs[@]}"; do
        [ -f "$o" ] || return 1
        for i in "${inputs[@]}"; do
            [ "$o" -nt "$i" ] || return 1
        done
    done
}

kver=$(cat "$out/kernel-version" 2>/dev/null || true)
if up_to_date; then
    echo "guest: up to date"
    report
    exit 0
fi

die() { echo "guest/build.sh: $*" >&2; exit 1; }

for tool in gcc cpio gzip modinfo dpkg-deb apt-get apt-cache; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
busybox=/bin/busybox
[ -x "$busybox" ] || die "missing $busybox (apt-get install busybox-static)"
# A dynamically linked busybox would need its libraries in the initramfs.
if ldd "$busybox" >/dev/null 2>&1; then
    die "$busybox is dynamically linked (apt-get install busybox-static)"
fi

work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# ---- probe ----------------------------------------------------------------
echo "guest: compiling probe"
gcc -O2 -static -Wall -Wextra -o "$work/probe" "$here/probe.c"
echo "guest: compiling echod"
gcc -O2 -static -Wall -Wextra -o "$work/echod" "$here/echod.c"

# ---- kernel ---------------------------------------------------------------
# The metapackage names the current ABI (linux-image-6.1.0-NN-cloud-amd64);
# never hard-code NN, it changes with every Debian point release.
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
       awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
[ -n "$kpkg" ] || die "cannot resolve linux-image-cloud-amd64 (run apt-get update?)"
mkdir -p "$cache"
deb=$(ls "$cache/${kpkg}"_*.deb 2>/dev/null | head -1 || true)
if [ -z "$deb" ]; then
    echo "guest: downloading $kpkg"
    # Download into the work dir first so an interrupted fetch never leaves
    # a truncated .deb in the cache.
    mkdir -p "$work/dl"
    (cd "$work/dl" && apt-get download -q "$kpkg" 2>&1 |
        grep -v 'unsandboxed as root' >&2 || true)
    dl=$(ls "$work/dl/${kpkg}"_*.deb 2>/dev/null | head -1 || true)
    [ -n "$dl" ] || die "apt-get download $kpkg failed"
    mv "$dl" "$cache/"
    deb=$cache/$(basename "$dl")
fi
echo "guest: using $(basename "$deb")"
dpkg-deb -x "$deb" "$work/kernel"

vmlinuz=$(ls "$work"/kernel/boot/vmlinuz-* | head -1)
kver=${vmlinuz##*/vmlinuz-}
kmods=$work/kernel/lib/modules/$kver
[ -d "$kmods" ] || die "no modules for $kver in $deb"

# ---- initramfs tree -------------------------------------------------------
root=$work/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,lib/modules/"$kver"}
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in sh ash mount umount insmod lsmod sleep cat echo ls mkdir \
              dmesg uname ps top free poweroff reboot halt sync ip; do
    ln -s busybox "$root/bin/$applet"
done
install -m 0755 "$here/init" "$root/init"
install -m 0755 "$work/probe" "$root/bin/probe"
install -m 0755 "$work/echod" "$root/bin/echod"
# The kernel opens /dev/console for init before devtmpfs exists; without the
# node init starts with no stdio (init recovers, but early errors get lost).
if [ "$(id -u)" = 0 ]; then
    mknod -m 0600 "$root/dev/console" c 5 1
fi

# Find a module file (possibly compressed) in the unpacked kernel.
find_module() {
    find "$kmods/kernel" -name "$1.ko" -o -name "$1.ko.xz" -o \
         -name "$1.ko.zst" -o -name "$1.ko.gz" | head -1
}

is_builtin() {
    grep -q "/$1.ko\$" "$kmods/modules.builtin" 2>/dev/null
}

# Copy a module and, first, everything it depends on.  busybox insmod only
# takes plain .ko files, so decompress.
declare -A copied=()
copy_module() {
    local name=$1 src dep dst
    [ -n "${copied[$name]:-}" ] && return 0
    copied[$name]=1
    src=$(find_module "$name")
    if [ -z "$src" ]; then
        is_builtin "$name" && return 0
        die "module $name not found in $kpkg"
    fi
    dst=$root/lib/modules/$kver/$name.ko
    case $src in
        *.ko.xz)  xz -dc "$src" >"$dst" ;;
        *.ko.zst) zstd -qdc "$src" >"$dst" ;;
        *.ko.gz)  gzip -dc "$src" >"$dst" ;;
        *)        cp "$src" "$dst" ;;
    esac
    for dep in $(modinfo -F depends "$dst" | tr ',' ' '); do
        copy_module "${dep//-/_}"
    done
}
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev \
         virtio_pci virtio_blk virtio_net; do
    copy_module "$m"
done
# init loads a fixed list in dependency order; make sure it covers whatever
# this kernel needed.
for f in "$root/lib/modules/$kver"/*.ko; do
    [ -e "$f" ] || continue
    m=$(basename "$f" .ko)
    grep -qw "$m" "$here/init" || die "init does not load module $m (needed by this kernel)"
done
echo "guest: modules: $(cd "$root/lib/modules/$kver" && ls | tr '\n' ' ')"

# ---- assemble ---------------------------------------------------------------
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --quiet) | gzip -9 -n >"$work/initrd.img"

cp "$vmlinuz" "$work/vmlinuz"
echo "$kver" >"$work/kernel-version"
# Move into place last, probe and kernel-version first: initrd.img and vmlinuz
# are then the newest files, and a half-finished build never looks complete.
for f in kernel-version probe initrd.img vmlinuz; do
    mv -f "$work/$f" "$out/$f"
done

echo "guest: built ($(du -h "$out/initrd.img" | cut -f1) initrd)"
report
