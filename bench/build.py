"""Image -> compressed rootfs asset, against the native tools in the same run.

    sudo .venv/bin/python bench/build.py [--mb 200] [--layers 4] [--runs 3] [--keep]

Generates a ~``--mb`` MB (uncompressed) multi-layer image from real files of this machine
(shared libraries, Python and Perl trees: real ELF and text, so compression ratios are realistic),
plus a last layer with whiteouts, writes it as an OCI layout and pushes it (``skopeo copy``) to a
Debian ``docker-registry`` started on 127.0.0.1 for the run. Then, from that registry:

* ``baseline``: ``skopeo copy docker://... oci:`` + ``umoci unpack`` + ``truncate`` (sized from
  ``du``) + ``mkfs.ext4 -d`` + ``zstd -3 -T2``: the native tools, one after the other.
* ``unkey``: builderd (``open_builder``: SQLite queue, local asset store): ``submit`` ->
  ``wait`` until the asset is registered. It does more than the baseline: digest and diff_id
  checks, safe layer application, hardening (shell policy, setid, clutter, ``strip``), init
  injection, reproducible ext4 with ``e2fsck -fy``/``resize2fs -M``/``e2fsck -fn``, zstd, sha256
  of both images, and copying the blob into the content-addressed store.
* ``cached``: the same image submitted again (cache hit on manifest digest + options).

Baseline and unkey runs alternate (``--runs``, the machine is shared) and medians are compared.
Last line: ``RESULT seconds=... baseline_seconds=... ratio=... cached_seconds=...``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from unkey_deploy.core.net import free_port

SOURCES = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/python3",
    "/usr/lib/python3.11",
    "/usr/share/perl",
    "/usr/share/perl5",
    "/usr/lib/gcc",
    "/usr/share/locale",
    "/usr/bin",
)
MTIME = 1_600_000_000
MAX_FILE = 8 * 1024 * 1024  # a spread of file sizes, like a real image, not a few huge libs
GEN_DIR = Path(tempfile.gettempdir()) / "unkey-bench-build-image"


def _pick_files(total_mb: int) -> list[Path]:
    """Regular files and symlinks from SOURCES, in a fixed order, up to ``total_mb`` MB."""
    out: list[Path] = []
    budget = total_mb * 1024 * 1024
    seen: set[str] = set()
    for src in SOURCES:
        if not os.path.isdir(src) or os.path.realpath(src) in seen:
            continue
        seen.add(os.path.realpath(src))
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                try:
                    st = p.lstat()
                except OSError:
                    continue
                if p.is_symlink():
                    out.append(p)
                elif p.is_file() and os.access(p, os.R_OK) and st.st_size <= MAX_FILE:
                    out.append(p)
                    budget -= st.st_size
                if budget <= 0:
                    return out
    return out


def _add_dirs(tf: tarfile.TarFile, path: str, done: set[str]) -> None:
    parts = path.strip("/").split("/")[:-1]
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if d not in done:
            done.add(d)
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tf.addfile(ti)


def _layer(entries: Sequence[tuple[str, Path | bytes | str, int]]) -> tuple[bytes, str]:
    """(gzip blob, diff_id) of a layer from (name, host file | bytes | symlink target, mode)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        done: set[str] = set()
        for name, what, mode in entries:
            _add_dirs(tf, name, done)
            ti = tarfile.TarInfo(name.strip("/"))
            ti.mtime, ti.mode = MTIME, mode
            if isinstance(what, str):
                ti.type, ti.linkname = tarfile.SYMTYPE, what
                tf.addfile(ti)
            elif isinstance(what, bytes):
                ti.size = len(what)
                tf.addfile(ti, io.BytesIO(what))
            elif what.is_symlink():
                ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(what)
                tf.addfile(ti)
            else:
                ti.size = what.stat().st_size
                with open(what, "rb") as f:
                    tf.addfile(ti, f)
    tar = raw.getvalue()
    return gzip.compress(tar, compresslevel=6, mtime=0), "sha256:" + hashlib.sha256(tar).hexdigest()


def generate(out: Path, total_mb: int, n_layers: int) -> Path:
    """An OCI layout at ``out`` (tag ``latest``); reused if already generated with these params."""
    stamp = out / "params.json"
    params = json.dumps({"mb": total_mb, "layers": n_layers, "v": 2})
    if stamp.is_file() and stamp.read_text() == params:
        return out
    shutil.rmtree(out, ignore_errors=True)
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return {"digest": f"sha256:{d}", "size": len(data)}

    files = _pick_files(total_mb)
    base: list[tuple[str, Path | bytes | str, int]] = [
        ("bin/busybox", Path("/bin/busybox"), 0o755),
        ("bin/sh", "busybox", 0o777),
        ("bin/httpd", "busybox", 0o777),
        ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n", 0o644),
        ("etc/group", b"root:x:0:\napp:x:1000:\n", 0o644),
        ("app/index.html", b"<h1>bench</h1>\n", 0o644),
    ]
    per = max(1, len(files) // n_layers)
    chunks = [files[i * per : (i + 1) * per] for i in range(n_layers - 1)]
    chunks.append(files[(n_layers - 1) * per :])
    layer_entries: list[list[tuple[str, Path | bytes | str, int]]] = []
    for i, chunk in enumerate(chunks):
        ents: list[tuple[str, Path | bytes | str, int]] = [
            (str(p), p, p.lstat().st_mode & 0o7777) for p in chunk
        ]
        layer_entries.append((base if i == 0 else []) + ents)
    # A last small layer deleting a few files of the first layers (whiteouts, as real images do).
    wh = [p for p in files[:200] if not p.is_symlink()][:20]
    last: list[tuple[str, Path | bytes | str, int]] = [
        (str(p.parent / (".wh." + p.name)), b"", 0o644) for p in wh
    ]
    layer_entries.append([*last, ("app/version", b"1\n", 0o644)])
    layer_descs, diff_ids = [], []
    for layer in layer_entries:
        blob, diff_id = _layer(layer)
        layer_descs.append(
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(blob)}
        )
        diff_ids.append(diff_id)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/busybox", "httpd", "-f", "-p", "8080"],
            "Cmd": ["-h", "/app"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/app",
            "User": "1000:1000",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cdesc = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        **put(json.dumps(config, sort_keys=True).encode()),
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cdesc,
        "layers": layer_descs,
    }
    mdesc = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **put(json.dumps(manifest, sort_keys=True).encode()),
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
    }
    (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    stamp.write_text(params)
    return out


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def start_registry(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cfg = work / "registry.yml"
    cfg.write_text(
        "version: 0.1\nlog: {level: error, accesslog: {disabled: true}}\n"
        f"storage: {{filesystem: {{rootdirectory: {work / 'registry-data'}}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}, secret: bench-secret}}\n"
    )
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    host = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{host}/v2/", timeout=1).status_code == 200:
                return proc, host
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("docker-registry did not start")


def baseline(ref: str, work: Path, phases: dict[str, float] | None = None) -> float:
    """skopeo copy + umoci unpack + truncate/mkfs.ext4 -d + zstd -3 -T2 (seconds); ``phases``
    gets each step's seconds."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    marks = [t0]

    def mark(name: str) -> None:
        marks.append(time.monotonic())
        if phases is not None:
            phases[name] = marks[-1] - marks[-2]

    _run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
          f"oci:{work / 'layout'}:latest"])  # fmt: skip
    mark("skopeo")
    _run(["umoci", "unpack", "--image", f"{work / 'layout'}:latest", str(work / "bundle")])
    mark("umoci")
    rootfs = work / "bundle" / "rootfs"
    du_kb = int(subprocess.run(["du", "-sk", str(rootfs)], check=True, capture_output=True,
                               text=True).stdout.split()[0])  # fmt: skip
    img = work / "rootfs.ext4"
    with open(img, "wb") as f:
        f.truncate(int(du_kb * 1.2 + 16384) * 1024)
    _run(["mkfs.ext4", "-q", "-F", "-d", str(rootfs), "-O", "^has_journal", "-m", "0",
          "-b", "4096", str(img)])  # fmt: skip
    mark("mkfs")
    _run(["zstd", "-q", "-3", "-T2", "-f", str(img), "-o", str(work / "rootfs.ext4.zst")])
    mark("zstd")
    return time.monotonic() - t0


# build-log line prefix -> the phase that ends with it (times are when wait() saw the line)
_PHASE_ENDS = (("extract: ", "resolve+extract"), ("rootfs: ", "harden+init"),
               ("compress: ", "ext4+zstd"), ("asset ready", "store"))  # fmt: skip


def _phases(stamped: list[tuple[float, str]], t0: float) -> dict[str, float]:
    out: dict[str, float] = {}
    last = t0
    for prefix, name in _PHASE_ENDS:
        hit = next((t for t, line in stamped
                    if line.startswith(prefix) and " layers of " not in line), None)  # fmt: skip
        if hit is not None:
            out[name] = hit - last
            last = hit
    return out


def _fmt(phases: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in phases.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mb", type=int, default=200, help="uncompressed image size (MB)")
    ap.add_argument("--layers", type=int, default=4, help="content layers (+1 whiteout layer)")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs (medians reported)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()

    from unkey_deploy.builder.api import BuildOptions, BuildRequest, BuildState
    from unkey_deploy.builder.service import open_builder
    from unkey_deploy.core.config import Settings
    from unkey_deploy.core.ids import new_customer_id
    from unkey_deploy.store.db import make_engine, upgrade

    t = time.monotonic()
    layout = generate(GEN_DIR, a.mb, a.layers)
    blob_bytes = sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())
    print(f"image: {layout} ({a.layers + 1} layers, {blob_bytes / 1e6:.1f} MB compressed blobs; "
          f"generated/reused in {time.monotonic() - t:.1f} s)", flush=True)  # fmt: skip

    work = Path(tempfile.mkdtemp(prefix="unkey-bench-build-"))
    reg, host = start_registry(work)
    svc = None
    try:
        ref = f"{host}/bench/app:latest"
        _run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:latest",
              f"docker://{ref}"])  # fmt: skip

        settings = Settings(data_dir=work / "data")
        settings.data_dir.mkdir(parents=True)
        upgrade(make_engine(settings.resolved_database_url))
        svc = open_builder(settings)
        svc.start(1)
        customer = new_customer_id()
        lines: list[str] = []

        stamped: list[tuple[float, str]] = []

        def on_log(line: str) -> None:
            lines.append(line)
            stamped.append((time.monotonic(), line))

        def run_once() -> tuple[float, bool, str]:
            stamped.clear()
            t0 = time.monotonic()
            bid = svc.submit(BuildRequest(image=ref, customer_id=customer, options=BuildOptions()))
            b = svc.wait(bid, timeout=1800, on_log=on_log)
            dt = time.monotonic() - t0
            ours_phases.update(_phases(stamped, t0))
            if b.state != BuildState.SUCCEEDED or b.asset_id is None:
                print("\n".join(lines), file=sys.stderr)
                raise SystemExit(f"build {bid} {b.state}: {b.error}")
            return dt, b.cached, b.asset_id

        # Alternate baseline and unkey runs (this machine is shared: load drifts) and compare
        # medians. Between unkey runs the asset is deleted so the next one really builds.
        base_runs: list[float] = []
        ours_runs: list[float] = []
        base_phases: dict[str, float] = {}
        ours_phases: dict[str, float] = {}
        asset_id = ""
        for i in range(a.runs):
            base_s = baseline(ref, work / "baseline", base_phases)
            base_zst = (work / "baseline" / "rootfs.ext4.zst").stat().st_size
            shutil.rmtree(work / "baseline", ignore_errors=True)
            base_runs.append(base_s)
            if asset_id:
                svc.assets.delete(asset_id)  # type: ignore[arg-type]
            lines.clear()
            ours_s, cached, asset_id = run_once()
            if cached:
                raise SystemExit("a fresh build was served from the cache")
            ours_runs.append(ours_s)
            asset = svc.assets.get(asset_id)  # type: ignore[arg-type]
            print(f"run {i + 1}: baseline (skopeo copy + umoci unpack + mkfs.ext4 -d + zstd -3 "
                  f"-T2) {base_s:.2f} s, zstd {base_zst / 1e6:.1f} MB | unkey (builderd submit "
                  f"-> asset ready) {ours_s:.2f} s, ext4 {asset.ext4_bytes / 1e6:.1f} MB, "
                  f"zstd {asset.compressed_bytes / 1e6:.1f} MB", flush=True)  # fmt: skip
            print(f"  phases (s): baseline {_fmt(base_phases)} | unkey {_fmt(ours_phases)} "
                  "(unkey's end when wait() sees the log line)", flush=True)  # fmt: skip
        for line in lines:
            print(f"  | {line}")
        lines.clear()
        cached_s, cached2, asset_id2 = run_once()
        print(f"cached rebuild: {cached_s:.3f} s (cached={cached2}, same asset: "
              f"{asset_id2 == asset_id})", flush=True)  # fmt: skip
        if not cached2 or asset_id2 != asset_id:
            raise SystemExit("second build of the same image was not a cache hit")
        base_s, ours_s = statistics.median(base_runs), statistics.median(ours_runs)
    finally:
        if svc is not None:
            svc.stop()
        reg.terminate()
        try:
            reg.wait(10)
        except subprocess.TimeoutExpired:
            reg.kill()
            reg.wait()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"RESULT seconds={ours_s:.2f} baseline_seconds={base_s:.2f} "
          f"ratio={ours_s / base_s:.2f} cached_seconds={cached_s:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
