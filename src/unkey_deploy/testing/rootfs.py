"""A small test ``rootfs.ext4`` built WITHOUT the builder: busybox-static + an HTTP server.

The image follows the builder's contract (``/.vminit/init`` is what metald starts) so every VM
driver can boot it. Here ``/.vminit/init`` is a busybox shell script (fine for tests only; the
builder's init is a static C binary):

* mounts /proc, /sys and /tmp when it can (PID 1 in a VM; inside bubblewrap they are already
  there),
* in ``burn`` mode starts ``burn_cpus`` busy loops (for metering tests),
* serves ``/www`` with ``busybox httpd -f -p <port>``: ``/`` answers ``unkey-test-app``,
  ``/cgi-bin/env`` prints the environment, ``/cgi-bin/hostname`` the hostname,
  ``/cgi-bin/fail`` always answers 500,
  ``/cgi-bin/write?<MiB>:<file>`` writes a file of that size (how much the app may write),
  ``/cgi-bin/log?<KiB>`` writes that much to the console, ``/cgi-bin/users`` shows the
  image's users (root; ``app``, uid 1000, owning ``/home/app``) writing files.

Build cost: one ``mkfs.ext4 -d`` of a ~2 MB tree, ~20-50 ms.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")

_INIT = r"""#!/bin/busybox sh
export PATH=/bin:/sbin
# /.vminit/env holds NUL-separated KEY=VALUE entries (the builder's format)
if [ -r /.vminit/env ]; then
  eval "$(busybox tr '\0' '\n' < /.vminit/env | busybox sed -n \
    -e "s/'/'\\\\''/g" -e "s/^\([A-Za-z_][A-Za-z0-9_]*\)=\(.*\)$/export \1='\2'/p")"
fi
busybox mount -t proc proc /proc 2>/dev/null
busybox mount -t sysfs sys /sys 2>/dev/null
busybox mount -t tmpfs tmp /tmp 2>/dev/null
busybox hostname "${HOSTNAME:-unkey-test}" 2>/dev/null
i=0
while [ "$i" -lt "${BURN_CPUS:-0}" ]; do
  (while :; do :; done) &
  i=$((i+1))
done
echo "UNKEY_TEST_APP: serving on port ${PORT}"
exec busybox httpd -f -p "${PORT}" -h /www
"""

_INDEX = "unkey-test-app\n"
_CGI_ENV = "#!/bin/busybox sh\necho 'Content-Type: text/plain'\necho\nenv\n"
_CGI_HOSTNAME = "#!/bin/busybox sh\necho 'Content-Type: text/plain'\necho\nbusybox hostname\n"
# an unhealthy endpoint: always 500
_CGI_FAIL = (
    "#!/bin/busybox sh\necho 'Status: 500 Internal Server Error'\n"
    "echo 'Content-Type: text/plain'\necho\necho unhealthy\n"
)
# ?<MiB>:<file>: writes that many MiB of zeros to <file> (kept), then says what dd said, its
# exit status and the file's size
_CGI_WRITE = r"""#!/bin/busybox sh
echo 'Content-Type: text/plain'
echo
busybox dd if=/dev/zero of="${QUERY_STRING#*:}" bs=1048576 count="${QUERY_STRING%%:*}" 2>&1
echo "exit=$?"
echo "size=$(busybox wc -c < "${QUERY_STRING#*:}")"
"""
# ?<KiB>: writes that many KiB of lines to the console (the app's stderr), then "console-end"
_CGI_LOG = r"""#!/bin/busybox sh
echo 'Content-Type: text/plain'
echo
busybox yes "unkey-test-app console line" | busybox head -c "$((QUERY_STRING * 1024))" >&2
echo console-end >&2
echo done
"""

# the image's users at work: root writes root's directory, "app" (uid 1000) its own home and
# not root's, and who owns what as the app sees it
_CGI_USERS = r"""#!/bin/busybox sh
echo 'Content-Type: text/plain'
echo
echo "root-writes-root=$( (echo x > /www/by-root) 2>&1 && echo ok)"
echo "app-writes-app=$(busybox su -s /bin/sh app -c 'echo x > /home/app/by-app && echo ok' 2>&1)"
echo "app-writes-root=$(busybox su -s /bin/sh app -c 'echo x > /www/by-app && echo ok' 2>&1)"
for f in /www /www/by-root /home/app /home/app/by-app; do
  echo "owner $(busybox stat -c '%n %u:%g' "$f")"
done
"""


def build_test_tree(root: Path, *, port: int = 8080, burn_cpus: int = 0) -> Path:
    """Write the test image's file tree into ``root`` (created)."""
    for d in ("bin", "sbin", "proc", "sys", "dev", "tmp", "etc", "www/cgi-bin", ".vminit", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "env", "sleep", "mount", "ip", "poweroff"):
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    # world-writable, as in most images: what a sandbox's app (whose root owns no file of the
    # image) can write to its root file system
    (root / "var" / "tmp").mkdir(parents=True, exist_ok=True)
    (root / "var" / "tmp").chmod(0o1777)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\n")
    (root / "home" / "app").mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(root / "home" / "app", 1000, 1000)
    (root / "www" / "index.html").write_text(_INDEX)
    for name, body in (
        ("env", _CGI_ENV),
        ("hostname", _CGI_HOSTNAME),
        ("write", _CGI_WRITE),
        ("log", _CGI_LOG),
        ("users", _CGI_USERS),
        ("fail", _CGI_FAIL),
    ):
        p = root / "www" / "cgi-bin" / name
        p.write_text(body)
        p.chmod(0o755)
    init = root / ".vminit" / "init"
    init.write_text(_INIT)
    init.chmod(0o755)
    # The same files the builder writes (NUL-separated argv and env).
    (root / ".vminit" / "argv").write_bytes(b"/bin/busybox\0httpd\0-f\0-p\0" + str(port).encode())
    (root / ".vminit" / "cwd").write_text("/")
    (root / ".vminit" / "user").write_text("0:0")
    (root / ".vminit" / "env").write_bytes(f"PORT={port}\0BURN_CPUS={burn_cpus}\0".encode())
    return root


def build_test_rootfs(
    out: Path, *, port: int = 8080, burn_cpus: int = 0, size_mib: int = 16
) -> Path:
    """Build the test image as an ext4 file at ``out`` (root-owned files even when not root)."""
    if not BUSYBOX.exists():
        raise RuntimeError("busybox-static is not installed (apt-get install busybox-static)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tree = build_test_tree(Path(tmp) / "tree", port=port, burn_cpus=burn_cpus)
        mkfs = ["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(tree), str(out), f"{size_mib}M"]
        if os.geteuid() != 0:
            # fakeroot makes the files root-owned inside the image (vm.md §3).
            script = 'chown -R 0:0 "$1" && chown 1000:1000 "$1/home/app" && shift && exec "$@"'
            mkfs = ["fakeroot", "sh", "-c", script, "sh", str(tree), *mkfs]
        subprocess.run(mkfs, check=True, capture_output=True)
    return out
