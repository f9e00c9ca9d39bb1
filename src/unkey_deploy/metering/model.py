"""The data every stage of metering and billing agrees on (see ../shared/design/BILLING.md).

A *series* is one VM instance (one boot of one VM). Counters are cumulative from 0 at boot, so
deltas are exact; memory is a gauge; the allocation (vcpus, memory_total_bytes) is fixed per
instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Sample:
    """One 100 ms reading of one VM instance. ``t`` is ns since the epoch (UTC)."""

    t: int
    cpu_time_ns: int
    memory_used_bytes: int
    net_rx_bytes: int
    net_tx_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int


@dataclass(frozen=True, slots=True)
class SeriesKey:
    """Who a series belongs to and what it was allocated."""

    customer_id: str
    vm_id: str
    instance_id: str
    vcpus: int
    memory_total_bytes: int


@dataclass(frozen=True, slots=True)
class Batch:
    """Up to 600 consecutive samples of one series. ``seq`` counts from 0 per instance, so the
    batch id ``<vm_id>:<instance_id>:<seq>`` is unique and stable across retries."""

    key: SeriesKey
    seq: int
    samples: tuple[Sample, ...]

    @property
    def batch_id(self) -> str:
        return f"{self.key.vm_id}:{self.key.instance_id}:{self.seq}"


@dataclass(frozen=True, slots=True)
class MeterTarget:
    """What the collector needs to read one running VM's host-side counters.

    metald's drivers produce one per running VM instance; every field that does not apply to a
    driver is None (e.g. no QMP socket for the sandbox driver).
    """

    key: SeriesKey
    pid: int
    # cgroup directories of the VM's processes (v1 per-controller dirs, or one v2 dir)
    cgroup_v2_dir: Path | None = None
    cgroup_v1_cpuacct_dir: Path | None = None
    cgroup_v1_memory_dir: Path | None = None
    # network: host-side interface whose counters are the VM's traffic (tap or veth);
    # rx/tx are from the VM's point of view (host iface tx = VM rx).
    host_iface: str | None = None
    # disk: QEMU QMP socket, or Firecracker metrics FIFO/file
    qmp_socket: Path | None = None
    firecracker_metrics: Path | None = None
    # True when the counters above existed before this instance booted (a reused cgroup or
    # interface): the collector then subtracts its first reading instead of counting from 0.
    baseline_at_first_read: bool = False
