"""metald's console read API (what gatewayd serves as ``/v1/deployments/{id}/logs``)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from unkey_deploy.metald import models
from unkey_deploy.metald.api import read_consoles
from unkey_deploy.metald.console import compact


def add_vm(engine: Engine, vm_id: str, dep: str, log: Path | None, at: float) -> None:
    with engine.begin() as c:
        c.execute(
            models.vms.insert().values(
                vm_id=vm_id, host_id="host_x", deployment_id=dep, customer_id="cust_a",
                state="running", desired="running", instance_id=f"inst_{vm_id}", vcpus=1,
                memory_bytes=1 << 26, port=8080, rootfs="/x", env={},
                runtime={"log_path": str(log)} if log else None, created_at=at, updated_at=at,
            )
        )  # fmt: skip


def test_reads_from_offset_keeps_to_tail_and_filters(engine: Engine, tmp_path: Path) -> None:
    log1 = tmp_path / "vm1.log"
    log1.write_bytes(b"booting\nready \xff\n")
    add_vm(engine, "vm_1", "dep_a", log1, 1.0)
    add_vm(engine, "vm_2", "dep_a", tmp_path / "not-yet.log", 2.0)  # not booted yet
    add_vm(engine, "vm_3", "dep_a", None, 3.0)  # no runtime
    add_vm(engine, "vm_9", "dep_b", log1, 1.0)
    with engine.connect() as c:
        whole = read_consoles(c, "dep_a")
        assert [x.vm_id for x in whole] == ["vm_1", "vm_2", "vm_3"]
        first = whole[0]
        assert (first.data, first.offset, first.size, first.truncated) == (
            b"booting\nready \xff\n", 0, 16, False
        )  # fmt: skip
        assert (first.state, first.instance_id) == ("running", "inst_vm_1")
        assert [(x.data, x.size) for x in whole[1:]] == [(b"", 0), (b"", 0)]
        # a follower asks from where it stopped and only gets what is new
        log1.write_bytes(b"booting\nready \xff\nGET /\n")
        (new,) = read_consoles(c, "dep_a", vm_id="vm_1", offset=first.size)
        assert (new.data, new.offset, new.size, new.truncated) == (b"GET /\n", 16, 22, False)
        # at most the last ``tail`` bytes, saying some were skipped
        (tail,) = read_consoles(c, "dep_a", vm_id="vm_1", tail=4)
        assert (tail.data, tail.offset, tail.truncated) == (b"T /\n"[-4:], 18, True)
        # a file shorter than the offset is a new console (the VM restarted): from its start
        log1.write_bytes(b"again\n")
        (restarted,) = read_consoles(c, "dep_a", vm_id="vm_1", offset=22)
        assert (restarted.data, restarted.offset) == (b"again\n", 0)
        assert read_consoles(c, "dep_a", vm_id="vm_9") == []


def test_compact_frees_the_old_part_while_the_vmm_appends(engine: Engine, tmp_path: Path) -> None:
    """A console past twice ``keep`` on disk keeps its last ``keep`` bytes (at least): the
    writer goes on appending at the same offsets, a follower's offset stays valid, and a reader
    from the start gets the kept part, told it was truncated (never the freed zeros)."""
    log = tmp_path / "console.log"
    line = b"a chatty app says the same thing again and again\n"
    with open(log, "ab", buffering=0) as vmm:  # as a VMM holds it: appending
        vmm.write(line * 20_000)  # ~1 MB
        size = log.stat().st_size
        assert compact(log, keep=1 << 20) == 0  # under twice keep: left alone
        assert compact(log, keep=64 << 10) > 0
        st = log.stat()
        assert st.st_size == size, "the size (and so every offset) must stay"
        assert st.st_blocks * 512 <= 2 * (64 << 10) + 8192, "the old part still takes the disk"
        assert compact(log, keep=64 << 10) == 0  # nothing more to free
        add_vm(engine, "vm_1", "dep_a", log, 1.0)
        with engine.connect() as c:
            (whole,) = read_consoles(c, "dep_a", tail=10 << 20)
            assert whole.truncated and whole.offset >= size - (64 << 10) - 4096
            assert b"\0" not in whole.data and whole.data.endswith(line)
            assert whole.size == size
            vmm.write(b"later\n")
            (new,) = read_consoles(c, "dep_a", offset=size)
            assert (new.data, new.offset, new.truncated) == (b"later\n", size, False)
    assert log.read_bytes()[-len(line) - 6 :] == line + b"later\n"
