#!/usr/bin/env bash
# Install the Debian packages Ferry needs, only those missing (idempotent, fast when done).
set -euo pipefail
PKGS=(qemu-system-x86 qemu-utils busybox-static iproute2 nftables cpio gzip kmod xz-utils
      zstd gcc libc6-dev make python3-venv
      postgresql  # the store's tests run on it too (a private server each session)
      chromium)  # the dashboard's browser test (Playwright drives it headless)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
