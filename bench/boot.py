"""Deploy-to-HTTP-ready per VM driver, against the bare VMM command line in the same run.

    sudo .venv/bin/python bench/boot.py [--qemu-runs 3] [--sandbox-runs 10] [--concurrent 20]

* ``sandbox``: metald ``create_vm`` + ``boot`` + ``wait_ready`` (loop+overlay mount, netns +
  veth, cgroup, bwrap as an unprivileged uid) vs a bare ``bwrap`` of the same tree (already
  extracted) on the host network, both until the first HTTP 200. ``sandbox`` runs metald's
  defaults: a network namespace made ahead of time (``MetaldConfig.netns_pool``) and the
  image still mounted from the previous VM of it (``image_keep_s``); ``sandbox-new-image``
  mounts the image at the boot (a host's first VM of an image); ``sandbox-cold`` also makes
  the namespace during the boot (``netns_pool=0``).
* ``sandbox`` also against ``bare-isolated``: the same isolation metald gives a sandbox, done by
  one shell script as an operator would (``ip -batch`` for the netns + veth + addresses, ``mount``
  for the loop + overlay, the cgroup with its limits, then the very command line metald runs:
  ``SandboxDriver.command``), from the first command to the first HTTP 200. The 10 % goal is
  measured against the bare bwrap, which isolates nothing (host network, no cgroup, no overlay);
  this second baseline says what metald's orchestration costs over the same work by hand.
* ``qemu``: metald (jail with the rootfs copy, tap + nftables, cgroup, -chroot/-runas/-sandbox)
  vs the bare ``qemu-system-x86_64 -M microvm`` command of notes/vm.md (user-mode net) with the
  same kernel, initramfs and image, both until the first HTTP 200.
* ``concurrent``: N sandbox VMs booted at once on one host; all must answer.

``--rcu-expedited`` runs with ``/sys/kernel/rcu_expedited`` = 1 (restored after): a host tuning
(docs/operations.md) that turns the RCU grace period a VM's cgroup join waits for (~8 ms after
an idle spell on this machine) into ~0.1 ms; the RESULT lines say which setting they ran with.

Readiness is seen the same way everywhere: metald's ``wait_ready`` probes the app every half
millisecond (``service.http_status``), and the baselines poll with that function as often. Our
clock stops when ``wait_ready`` returns (the app answered and the VM is recorded ``running``);
the answer being a 200 is checked after.

Prints medians; the last lines are ``RESULT driver=... seconds=... baseline=... ratio=...``.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from unkey_deploy.core.config import MetaldConfig  # noqa: E402
from unkey_deploy.core.ids import CustomerId, InstanceId, VmId  # noqa: E402
from unkey_deploy.core.net import free_port  # noqa: E402
from unkey_deploy.metald.cgroups import CgroupManager  # noqa: E402
from unkey_deploy.metald.drivers.base import NetAttachment, VmSpec  # noqa: E402
from unkey_deploy.metald.drivers.qemu import QEMU, host_tsc_khz  # noqa: E402
from unkey_deploy.metald.drivers.sandbox import SandboxDriver  # noqa: E402
from unkey_deploy.metald.kernel import guest_cmdline, prepare_kernel  # noqa: E402
from unkey_deploy.metald.service import CreateVm, Metald, http_status  # noqa: E402
from unkey_deploy.store.db import make_engine, upgrade  # noqa: E402
from unkey_deploy.testing.rootfs import build_test_rootfs  # noqa: E402

RCU_KNOB = Path("/sys/kernel/rcu_expedited")
HTTP = httpx.Client(trust_env=False, headers={"Connection": "close"})


def wait_http(url: str, timeout: float) -> None:
    """Until ``url`` answers 200, looking as often and in the same way as metald's
    ``wait_ready`` (``http_status`` every half millisecond): the baselines' clocks stop as
    promptly as metald's readiness does."""
    deadline = time.monotonic() + timeout
    base, _, path = url.partition("://")[2].partition("/")
    while http_status(f"http://{base}", "/" + path, connect_timeout=0.1, timeout=0.5) != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(url)
        time.sleep(0.0005)


def bare_tree(tree: Path, port: int) -> Path:
    """The test image serving on ``port``, extracted to ``tree`` (what a bare bwrap binds)."""
    image = build_test_rootfs(tree.with_suffix(".ext4"), port=port)
    tree.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {tree}", str(image)], check=True,
                   capture_output=True)  # fmt: skip
    return tree


def bare_bwrap_argv(tree: Path) -> list[str]:
    """The bare command line: bwrap of ``tree`` on the host network, as an unprivileged uid."""
    argv = ["bwrap", "--unshare-user", "--uid", "0", "--gid", "0", "--unshare-pid", "--as-pid-1",
            "--unshare-ipc", "--unshare-uts", "--bind", str(tree), "/", "--proc", "/proc",
            "--dev", "/dev", "--tmpfs", "/tmp", "--new-session", "--die-with-parent",
            "--clearenv", "--setenv", "PATH", "/bin", "/.vminit/init"]  # fmt: skip
    if os.geteuid() == 0:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *argv]
    return argv


def bare_bwrap(tree: Path, port: int) -> float:
    argv = bare_bwrap_argv(tree)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/", 10)
        return time.perf_counter() - t0
    finally:
        proc.kill()
        proc.wait()


def bare_isolated(image: Path, work: Path, net: str, n: int) -> float:
    """The sandbox's isolation by hand (see the module docstring); ``net``: a free /30."""
    hosts = list(ipaddress.IPv4Network(net).hosts())
    host_ip, guest_ip = str(hosts[0]), str(hosts[1])
    ns, veth, base = (
        f"unkey-bench-{os.getpid()}-{n}",
        f"ubb{os.getpid() % 100000}x{n}",
        work / f"bi{n}",
    )
    cg = CgroupManager(parent_name="unkey-bench-bare").paths_for(f"vm{n}")
    driver = SandboxDriver()
    # one unprivileged uid (run_as), as metald's sandbox had it until it gave each sandbox a
    # range of ids of its own seen through an idmapped copy of the image's mount: util-linux
    # 2.38's mount cannot make one, so this baseline does a little less than metald
    spec = VmSpec(
        vm_id=VmId(f"vm_bench{n}"), instance_id=InstanceId("inst_bench"),
        customer_id=CustomerId("cust_bench"), vcpus=1, memory_bytes=256 << 20, port=8080,
        workdir=base, rootfs=image, cgroup=cg, run_as=(65534, 65534),
        net=NetAttachment(mode="netns", netns=ns, host_iface=veth, host_ip=host_ip,
                          guest_ip=guest_ip),
    )  # fmt: skip
    root = base / "root"
    limits = []
    for ctrl, d in cg.v1.items():
        limits.append(f"mkdir -p {d}")
        if ctrl == "cpu":
            limits.append(
                f"echo 100000 > {d}/cpu.cfs_period_us; echo 100000 > {d}/cpu.cfs_quota_us"
            )
        elif ctrl == "memory":
            limits.append(f"echo {256 << 20} > {d}/memory.limit_in_bytes")
    if cg.v2 is not None:
        limits.append(f"mkdir -p {cg.v2}; echo '100000 100000' > {cg.v2}/cpu.max")
    joins = " ".join(str(f) for f in cg.procs_files())
    argv = driver.command(spec, root)
    # the test image's init (command() looks for it in the tree, which is not mounted yet)
    argv[argv.index("/sbin/init")] = "/.vminit/init"
    script = "\n".join([
        "set -e",
        f"ip netns add {ns}",
        f"ip -batch - <<EOF\nlink add {veth} type veth peer name eth0 netns {ns}\n"
        f"addr add {host_ip}/30 dev {veth}\nlink set {veth} up\nEOF",
        f"ip -n {ns} -batch - <<EOF\nlink set lo up\naddr add {guest_ip}/30 dev eth0\n"
        f"link set eth0 up\nroute add default via {host_ip}\nEOF",
        # (the guest's address exists from here; connects before would leave by the default
        # route, and on some networks a transparent proxy answers them)
        "echo net-ready",
        f"mkdir -p {base}/lower {base}/upper {base}/work {root}",
        f"mount -o loop,ro,noload {image} {base}/lower",
        f"mount -t overlay overlay -o lowerdir={base}/lower,upperdir={base}/upper,"
        f"workdir={base}/work {root}",
        *limits,
        f"for f in {joins}; do echo $$ > $f; done",
        "exec " + " ".join(f"'{a}'" for a in argv),
    ])  # fmt: skip
    base.mkdir(parents=True)
    os.chmod(base, 0o755)  # noqa: S103 - the unprivileged bwrap reaches the tree through it
    t0 = time.perf_counter()
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        wait_http(f"http://{guest_ip}:8080/", 10)
        return time.perf_counter() - t0
    except TimeoutError:
        cg.kill_all()
        raise RuntimeError(f"bare-isolated: {proc.communicate()[1].decode()[-600:]}") from None
    finally:
        cg.remove()
        proc.wait()
        for m in (root, base / "lower"):
            subprocess.run(["umount", "-d", str(m)], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
        with contextlib.suppress(OSError):
            for d in cg.dirs():
                d.parent.rmdir()


def concurrent_boots(md: Metald, image: Path, n: int) -> str:
    """N sandbox VMs booted at once on one host; all must answer."""
    t0 = time.perf_counter()

    def one(_: int) -> str:
        vm = md.create_vm(CreateVm("dep_many", "cust_bench", image, memory_bytes=64 << 20))
        md.boot(vm.vm_id)
        md.wait_ready(vm.vm_id, timeout=60)
        wait_http(md.endpoint(vm.vm_id) + "/", 30)
        return vm.vm_id

    with ThreadPoolExecutor(max_workers=n) as ex:
        futs = [ex.submit(one, i) for i in range(n)]
        ok = [f for f in futs if f.exception() is None]
    total = time.perf_counter() - t0
    for f in futs:
        if f.exception() is not None:
            print(f"concurrent boot failed: {f.exception()}", file=sys.stderr)
    for vm in md.list():
        md.delete(vm.vm_id)
    return (f"RESULT driver=sandbox concurrent={n} ok={len(ok)} failed={n - len(ok)} "
            f"seconds={total:.3f}")  # fmt: skip


def bare_qemu(kernel_bz: Path, initrd: Path, image: Path, work: Path) -> float:
    disk = work / "bare.ext4"
    shutil.copyfile(image, disk)
    hp = free_port()
    argv = [QEMU, "-M", "microvm", "-nodefaults", "-no-user-config", "-accel", "tcg",
            "-cpu", "max", "-m", "256", "-smp", "1", "-kernel", str(kernel_bz),
            "-initrd", str(initrd), "-append", guest_cmdline(tsc_khz=host_tsc_khz()),
            "-drive", f"id=root,file={disk},format=raw,if=none,cache=writeback",
            "-device", "virtio-blk-device,drive=root",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{hp}-:8080",
            "-device", "virtio-net-device,netdev=n0",
            "-serial", f"file:{work / 'bare-serial.log'}",
            "-display", "none", "-no-reboot"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{hp}/", 120)
        return time.perf_counter() - t0
    finally:
        proc.kill()
        proc.wait()


def ours(md: Metald, image: Path, timeout: float) -> tuple[float, str]:
    """Until metald says ``running``: its ``wait_ready`` got an HTTP answer from the app (and
    wrote the state); that it was a 200 is checked after the clock stops."""
    t0 = time.perf_counter()
    vm = md.create_vm(CreateVm("dep_bench", "cust_bench", image, memory_bytes=256 << 20))
    md.boot(vm.vm_id)
    md.wait_ready(vm.vm_id, timeout=timeout)
    took = time.perf_counter() - t0
    url = md.endpoint(vm.vm_id) + "/"
    if HTTP.get(url, timeout=5).status_code != 200:
        raise RuntimeError(f"{url} answers, but not 200")
    return took, vm.vm_id


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qemu-runs", type=int, default=3)
    ap.add_argument("--sandbox-runs", type=int, default=10)
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--subnet", default="172.31.16.0/22")
    ap.add_argument(
        "--native-dir", default=os.environ.get("UNKEY_NATIVE_DIR", str(REPO / ".native"))
    )
    ap.add_argument(
        "--rcu-expedited", action="store_true", help="/sys/kernel/rcu_expedited=1, restored after"
    )
    args = ap.parse_args()
    before = RCU_KNOB.read_text().strip() if RCU_KNOB.exists() else None
    if args.rcu_expedited:
        RCU_KNOB.write_text("1")
    try:
        return run(args)
    finally:
        if args.rcu_expedited and before is not None:
            RCU_KNOB.write_text(before)


def run(args: argparse.Namespace) -> int:
    tag = f" rcu_expedited={RCU_KNOB.read_text().strip() if RCU_KNOB.exists() else 'na'}"
    kernel = prepare_kernel(Path(args.native_dir))
    results: list[str] = []
    with tempfile.TemporaryDirectory(prefix="unkey-bench-boot-") as tmpd:
        tmp = Path(tmpd)
        # the unprivileged bwrap of the baseline must reach the tree inside
        os.chmod(tmp, 0o755)  # noqa: S103
        image = build_test_rootfs(tmp / "app.ext4", port=8080)
        engine = make_engine(f"sqlite:///{tmp / 'bench.db'}")
        upgrade(engine)

        # -- sandbox
        bport = free_port()
        tree = bare_tree(tmp / "bare", bport)
        # sandbox: metald's defaults: a netns + veth made ahead is taken (netns_pool; refilled
        # between runs, as on a host whose boots are not back to back) and the image is still
        # mounted from the previous run's VM (image_keep_s: a restart, scale-out or redeploy of
        # an image the host ran lately);
        # sandbox-new-image: the same with the image mounted at the boot (the first VM of an
        # image on this host: image_keep_s=0);
        # sandbox-cold: everything made during the boot (netns_pool=0 too).
        # Hosts on one machine: each needs its own part of the subnet (slots are per host), its
        # own database (or the scheduler would place VMs on another) and its own copy of the
        # image (the image mounts are shared host-wide).
        nets = [str(n) for n in ipaddress.IPv4Network(args.subnet).subnets(prefixlen_diff=2)]
        bare_net = nets.pop()
        variants = {
            "sandbox": {},
            "sandbox-new-image": {"image_keep_s": 0},
            "sandbox-cold": {"image_keep_s": 0, "netns_pool": 0},
        }
        mds: dict[str, Metald] = {}
        images: dict[str, Path] = {}
        engines = []
        for (name, over), subnet in zip(variants.items(), nets, strict=True):
            cfg = MetaldConfig(driver="sandbox", host_name=f"bench-{name}", subnet=subnet,
                               cpus=256, memory_mib=65536, stop_timeout_s=0.2,
                               **over)  # fmt: skip
            eng = engine if name == "sandbox" else make_engine(f"sqlite:///{tmp / name}.db")
            upgrade(eng)
            engines.append(eng)
            mds[name] = Metald(cfg, eng, tmp / name, kernel=kernel)
            images[name] = tmp / f"{name}.ext4"
            shutil.copyfile(image, images[name])
        md = mds["sandbox"]
        try:
            base: list[float] = []
            isolated: list[float] = []
            mine: dict[str, list[float]] = {k: [] for k in mds}
            for i in range(args.sandbox_runs):  # interleaved so load affects all alike
                base.append(bare_bwrap(tree, bport))
                if os.geteuid() == 0:
                    isolated.append(bare_isolated(image, tmp, bare_net, i))
                for name, m in mds.items():
                    if m.netns_pool is not None:
                        m.netns_pool.wait_full()
                    s, vm_id = ours(m, images[name], 10)
                    mine[name].append(s)
                    m.delete(vm_id)
            b = statistics.median(base)
            print(f"bare bwrap {[round(x * 1000) for x in base]} ms", file=sys.stderr)
            if isolated:
                bi = statistics.median(isolated)
                print(f"bare-isolated {[round(x * 1000) for x in isolated]} ms", file=sys.stderr)
            for name, runs in mine.items():
                m_ = statistics.median(runs)
                print(f"{name}: ours {[round(x * 1000) for x in runs]} ms", file=sys.stderr)
                results.append(f"RESULT driver={name} seconds={m_:.4f} baseline={b:.4f} "
                               f"ratio={m_ / b:.2f} overhead_ms={(m_ - b) * 1000:.0f}")  # fmt: skip
                if isolated:
                    results.append(f"RESULT driver={name} vs=bare-isolated seconds={m_:.4f} "
                                   f"baseline={bi:.4f} ratio={m_ / bi:.2f}")  # fmt: skip

            if args.concurrent > 0:
                results.append(concurrent_boots(md, image, args.concurrent))
        finally:
            for m in mds.values():
                m.shutdown()
            for eng in engines[1:]:
                eng.dispose()

        # -- qemu
        if shutil.which(QEMU) and args.qemu_runs > 0:
            cfg = MetaldConfig(driver="qemu", host_name="bench-qemu", subnet=args.subnet,
                               cpus=256, memory_mib=65536, stop_timeout_s=0.2)  # fmt: skip
            md = Metald(cfg, engine, tmp / "qemu", kernel=kernel)
            try:
                base, mine = [], []
                for _ in range(args.qemu_runs):
                    base.append(bare_qemu(kernel.bzimage, kernel.initramfs, image, tmp))
                    s, vm_id = ours(md, image, 120)
                    mine.append(s)
                    md.delete(vm_id)
                b, m = statistics.median(base), statistics.median(mine)
                print(f"qemu ({md.status()['drivers']['qemu']['accel']}): ours "
                      f"{[round(x, 2) for x in mine]} s, bare {[round(x, 2) for x in base]} s",
                      file=sys.stderr)  # fmt: skip
                results.append(f"RESULT driver=qemu seconds={m:.3f} baseline={b:.3f} "
                               f"ratio={m / b:.2f} overhead_ms={(m - b) * 1000:.0f}")  # fmt: skip
            finally:
                md.shutdown()
        engine.dispose()
    for line in results:
        print(line + tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
