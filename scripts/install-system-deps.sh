#!/usr/bin/env bash
# Install the Debian packages the platform and its tests use, only those that are missing.
set -euo pipefail
PKGS=(
  python3-venv gcc libc6-dev make          # venv, the static guest init
  e2fsprogs zstd fakeroot binutils          # rootfs.ext4, compression, strip
  busybox-static cpio lz4                   # initramfs, vmlinux extraction
  qemu-system-x86 bubblewrap                # VM drivers: qemu (TCG/KVM), sandbox
  iproute2 iptables nftables                # taps, bridges, netns, NAT, isolation
  docker-registry skopeo umoci wrk          # local OCI registry for tests/demo, bench baseline + load
  postgresql                                # control-plane store tests against PostgreSQL
  chromium chromium-driver libjs-chart.js   # dashboard (Chart.js) and its browser tests
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${missing[*]}" >&2
  echo "run as root, or: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
