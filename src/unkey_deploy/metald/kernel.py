"""The guest kernel asset: a Debian cloud kernel, a tiny initramfs, and an uncompressed vmlinux.

``prepare_kernel(native_dir)`` is idempotent (a step of ``make native``):

1. ``apt-get download linux-image-cloud-amd64`` resolves to ``linux-image-<ver>-cloud-amd64``,
   which is downloaded and unpacked with ``dpkg -x`` (never installed system-wide).
2. An initramfs (busybox-static + the 13 virtio/vsock modules, insmod'ed in dependency order,
   no modules.dep needed) mounts ``/dev/vda``, configures ``eth0`` from our kernel command line
   parameters and ``switch_root``s into ``/.vminit/init`` (``/sbin/init`` when absent).
3. ``vmlinux``: the bzImage's LZ4 payload decompressed (Firecracker needs an ELF kernel).

Kernel command line parameters understood by the initramfs (see :func:`guest_cmdline`):
``unkey.ip=<addr>/<prefix>``, ``unkey.gw=<addr>``, ``unkey.dns=<addr>``. Without ``unkey.ip`` the
guest uses QEMU's user-mode (slirp) defaults, 10.0.2.15/24 via 10.0.2.2.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import VmError

KERNEL_PACKAGE = "linux-image-cloud-amd64"
# Dependency order: each module only needs the ones before it (vm.md §2).
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    # ACPI power button -> input event: lets `system_powerdown` ask the guest to shut down
    "button",
    "evdev",
)
BUSYBOX = Path("/bin/busybox")
_LZ4_MAGIC = b"\x02!L\x18"
_INITRAMFS_VERSION = "9"  # bump when the init script changes, so prepare_kernel rebuilds

INIT_SCRIPT = r"""#!/bin/busybox sh
# /dev first: every redirection below (2>/dev/null) needs it (the kernel does not mount it here)
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
if grep -q unkey.probe /proc/cmdline; then
  echo UNKEY_PROBE_OK > /dev/ttyS0
  poweroff -f
fi
for m in __MODULES__; do
  insmod /lib/modules/$m.ko 2>/dev/null
done
ip=""; gw=""; dns=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    unkey.ip=*) ip="${arg#unkey.ip=}" ;;
    unkey.gw=*) gw="${arg#unkey.gw=}" ;;
    unkey.dns=*) dns="${arg#unkey.dns=}" ;;
  esac
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do usleep 10000; i=$((i+1)); done
if ! mount -t ext4 -o rw /dev/vda /newroot; then
  echo "UNKEY_INITRAMFS: cannot mount /dev/vda" > /dev/ttyS0
  poweroff -f
fi
if [ -z "$ip" ]; then ip=10.0.2.15/24; gw=10.0.2.2; dns=${dns:-10.0.2.3}; fi
ip link set lo up
ip link set eth0 up 2>/dev/null
ip addr add "$ip" dev eth0 2>/dev/null
[ -n "$gw" ] && ip route add default via "$gw" 2>/dev/null
if [ -n "$dns" ] && [ -d /newroot/etc ]; then
  echo "nameserver $dns" > /newroot/etc/resolv.conf 2>/dev/null
fi
# images from the builder may lack the usual mount points (the disk is the VM's own copy)
mkdir -p /newroot/dev /newroot/proc /newroot/sys /newroot/tmp /newroot/run 2>/dev/null
# Graceful stop: QEMU's ACPI power button (QMP system_powerdown) becomes an input event;
# this watcher survives switch_root, sends SIGTERM to the new init (the builder's init forwards
# it to the app and powers off when the app exits) and powers off itself after a grace period.
# switch_root empties the initramfs, so the watcher keeps busybox on a small tmpfs of its own.
# The watcher must not open anything under /dev itself: /dev moves into the new root just
# below, and a watcher scheduled after that (a loaded host) found no device and no /dev/null
# ("/init: can't open /dev/null") and died, so the guest ignored the button. The button is
# opened here, before the move, and handed over as fd 3.
btn=""
i=0
while [ -z "$btn" ] && [ $i -lt 50 ]; do
  for ev in /sys/class/input/event*; do
    grep -qi "power button" "$ev/device/name" 2>/dev/null && btn=/dev/input/${ev##*/}
  done
  [ -n "$btn" ] || { usleep 20000; i=$((i+1)); }
done
if [ -n "$btn" ] && mkdir -p /keep && mount -t tmpfs -o size=4m keep /keep \
   && cp /bin/busybox /keep/busybox && command exec 3<"$btn"; then
  (/keep/busybox touch /keep/started
   /keep/busybox head -c 1 <&3 >/keep/event; exec 3<&-; kill -TERM 1
   /keep/busybox sleep 3; /keep/busybox sync; /keep/busybox poweroff -f) &
  exec 3<&-
  # ash opens /dev/null as a background job's stdin in the child, before its first command:
  # /dev must stay until the watcher has started (it says so by touching /keep/started)
  i=0
  while [ ! -e /keep/started ] && [ $i -lt 500 ]; do usleep 10000; i=$((i+1)); done
  echo "UNKEY_INITRAMFS: power button watcher on $btn" > /dev/ttyS0
else
  echo "UNKEY_INITRAMFS: no ACPI power button; the VM can only be stopped hard" > /dev/ttyS0
fi
echo "UNKEY_INITRAMFS: switching root" > /dev/ttyS0
mount --move /dev /newroot/dev 2>/dev/null || mount -t devtmpfs dev /newroot/dev
umount /proc /sys
init=/.vminit/init
[ -x /newroot$init ] || init=/sbin/init
exec switch_root /newroot $init
"""


@dataclass(frozen=True)
class KernelPaths:
    """Where the prepared kernel pieces are (all under the native dir)."""

    bzimage: Path
    vmlinux: Path
    initramfs: Path
    version: str


def guest_cmdline(
    *,
    ip: str | None = None,
    gw: str | None = None,
    dns: str | None = None,
    tsc_khz: int | None = None,
) -> str:
    """The kernel command line our initramfs understands; ``ip`` is ``addr/prefix``."""
    parts = ["console=ttyS0", "root=/dev/vda", "rw", "panic=-1", "reboot=t", "quiet"]
    if tsc_khz:
        parts.append(f"tsc_early_khz={tsc_khz}")
    if ip:
        parts.append(f"unkey.ip={ip}")
    if gw:
        parts.append(f"unkey.gw={gw}")
    if dns:
        parts.append(f"unkey.dns={dns}")
    return " ".join(parts)


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise VmError(
            f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}",
            suggestion="check apt sources; dpkg, lz4, cpio and busybox-static must be installed",
        )
    return proc.stdout


def _resolve_kernel_package() -> str:
    out = _run(["apt-cache", "depends", KERNEL_PACKAGE])
    for raw in out.splitlines():
        line = raw.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise VmError(f"cannot resolve the kernel package behind {KERNEL_PACKAGE}")


def _unpack_kernel(kdir: Path) -> tuple[Path, str]:
    """Download and unpack the kernel package into ``kdir`` unless already there."""
    existing = sorted((kdir / "root" / "boot").glob("vmlinuz-*")) if kdir.exists() else []
    if existing:
        vmlinuz = existing[-1]
        return vmlinuz, vmlinuz.name.removeprefix("vmlinuz-")
    pkg = _resolve_kernel_package()
    kdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kdir) as tmp:
        _run(["apt-get", "download", pkg], cwd=Path(tmp))
        debs = list(Path(tmp).glob("*.deb"))
        if not debs:
            raise VmError(f"apt-get download {pkg} produced no .deb")
        staging = Path(tmp) / "root"
        _run(["dpkg", "-x", str(debs[0]), str(staging)])
        staging.replace(kdir / "root")
    vmlinuz = sorted((kdir / "root" / "boot").glob("vmlinuz-*"))[-1]
    return vmlinuz, vmlinuz.name.removeprefix("vmlinuz-")


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Decompress the LZ4 payload of a bzImage into an ELF vmlinux (like extract-vmlinux)."""
    data = bzimage.read_bytes()
    pos = data.find(_LZ4_MAGIC)
    while pos >= 0:
        proc = subprocess.run(
            ["lz4", "-d", "-c"], input=data[pos:], capture_output=True, check=False
        )
        # lz4 complains about trailing garbage after the frame but still writes the payload.
        if proc.stdout[:4] == b"\x7fELF":
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(proc.stdout)
            tmp.replace(out)
            return
        pos = data.find(_LZ4_MAGIC, pos + 1)
    raise VmError(f"no LZ4-compressed ELF kernel found in {bzimage}")


def build_initramfs(modules_dir: Path, out: Path) -> None:
    """A gzip'd newc cpio with busybox, the virtio modules and our init script."""
    if not BUSYBOX.exists():
        raise VmError(
            "busybox-static is not installed", suggestion="apt-get install busybox-static"
        )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "newroot", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        for m in VIRTIO_MODULES:
            found = list(modules_dir.rglob(f"{m}.ko")) + list(modules_dir.rglob(f"{m}.ko.xz"))
            if not found:
                raise VmError(f"kernel module {m} not found under {modules_dir}")
            src = found[0]
            if src.suffix == ".xz":
                _run(["xz", "-dkc", str(src)])  # pragma: no cover - Debian 12 ships plain .ko
            shutil.copy2(src, root / "lib" / "modules" / f"{m}.ko")
        init = root / "init"
        init.write_text(INIT_SCRIPT.replace("__MODULES__", " ".join(VIRTIO_MODULES)))
        init.chmod(0o755)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        proc = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            input=("\n".join([".", *files]) + "\n").encode(),
            cwd=root,
            capture_output=True,
            check=False,
        )
        if proc.returncode != 0:
            raise VmError(f"cpio failed: {proc.stderr.decode(errors='replace')[-300:]}")
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_bytes(gzip.compress(proc.stdout, compresslevel=1))
        tmp_out.replace(out)


def prepare_kernel(native_dir: Path) -> KernelPaths:
    """Fetch/unpack the kernel and build the initramfs and vmlinux under ``native_dir/kernel``."""
    kdir = Path(native_dir).resolve() / "kernel"
    vmlinuz, version = _unpack_kernel(kdir)
    vmlinux = kdir / "vmlinux"
    if not vmlinux.exists():
        extract_vmlinux(vmlinuz, vmlinux)
    initramfs = kdir / "initramfs.img"
    stamp = kdir / "initramfs.version"
    if not initramfs.exists() or not stamp.exists() or stamp.read_text() != _INITRAMFS_VERSION:
        build_initramfs(kdir / "root" / "lib" / "modules", initramfs)
        stamp.write_text(_INITRAMFS_VERSION)
    return KernelPaths(bzimage=vmlinuz, vmlinux=vmlinux, initramfs=initramfs, version=version)


def find_kernel(path: Path) -> KernelPaths | None:
    """The prepared kernel under ``path`` (the native dir, or its ``kernel`` subdirectory) if
    ``make native`` has run, else None. Does no downloads."""
    kdir = Path(path).resolve()
    if not (kdir / "initramfs.img").exists():
        kdir = kdir / "kernel"
    bz = sorted((kdir / "root" / "boot").glob("vmlinuz-*"))
    vmlinux, initramfs = kdir / "vmlinux", kdir / "initramfs.img"
    if not bz or not vmlinux.exists() or not initramfs.exists():
        return None
    return KernelPaths(bz[-1], vmlinux, initramfs, bz[-1].name.removeprefix("vmlinuz-"))
