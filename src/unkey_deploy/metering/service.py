"""The metering loop on a host: collector -> billaged every 100 ms, publisher alongside.

``targets`` is metald's view of the running VM instances (its drivers build one
:class:`~unkey_deploy.metering.model.MeterTarget` per instance); an instance that disappears
from it is stopped in billaged, which flushes its partial batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

import numpy as np

from ..bus.interface import Bus
from ..bus.jetstream import connect
from ..core.config import Settings
from ..core.errors import InvalidInput
from ..core.log import event
from ..core.log import get as get_logger
from .billaged import Billaged
from .collector import Collector
from .model import MeterTarget, SeriesKey

TargetsFn = Callable[[], Iterable[MeterTarget]]
log = get_logger("metering")


class MeteringLoop:
    def __init__(
        self,
        collector: Collector,
        billaged: Billaged,
        targets: TargetsFn,
        *,
        interval_s: float = 0.1,
        targets_every: int = 10,
    ) -> None:
        if not 0 < interval_s < 1.0:
            # BILLING.md bills memory only over intervals of at most 1 s: sampling every second
            # or slower would meter every VM's memory as gaps, never billed
            raise InvalidInput(
                f"metering: the sampling interval must be under 1 s (100 ms by design), "
                f"got {interval_s} s",
                suggestion="set metering.interval_ms below 1000",
            )
        self.collector = collector
        self.billaged = billaged
        self.targets = targets
        self.interval_s = interval_s
        self.targets_every = targets_every
        self._slots: dict[SeriesKey, int] = {}
        # targets billaged refused (e.g. a series retired while its VM kept running): logged
        # once each and skipped, so one bad series never stops the host's metering
        self._refused: set[SeriesKey] = set()
        self._ticks = 0

    def refresh_targets(self) -> None:
        for key in self.collector.set_targets(self.targets()):
            self.billaged.stop(key)
            self._slots.pop(key, None)
            self._refused.discard(key)

    def _try_refresh(self, when: str) -> None:
        """:meth:`refresh_targets`, logging a failure (e.g. the control-plane database away for
        a moment) and keeping the targets known: sampling needs no database, and a VM that
        went meanwhile ends its series at the next refresh that works."""
        try:
            self.refresh_targets()
        except Exception as exc:
            event(log, "metering targets not refreshed", logging.WARNING, when=when,
                  error=f"{type(exc).__name__}: {exc}")  # fmt: skip

    def tick(self) -> int:
        """One sweep: read every target, hand the samples to billaged. Returns samples taken."""
        if self._ticks % self.targets_every == 0:
            self._try_refresh("tick")
        self._ticks += 1
        keys, rows = self.collector.sample()
        if not keys:
            return 0
        slots = np.empty(len(keys), dtype=np.int64)
        ok = np.ones(len(keys), dtype=bool)
        for i, k in enumerate(keys):
            s = self._slots.get(k)
            if s is None:
                if k in self._refused:
                    ok[i] = False
                    continue
                try:
                    s = self._slots[k] = self.billaged.slot(k)
                except InvalidInput as exc:
                    self._refused.add(k)
                    ok[i] = False
                    event(log, "VM not metered", logging.ERROR, vm_id=k.vm_id,
                          instance_id=k.instance_id, customer_id=k.customer_id,
                          error=exc.message)  # fmt: skip
                    continue
            slots[i] = s
        if not ok.all():
            slots, rows = slots[ok], rows[ok]
        return self.billaged.ingest(slots, rows) if len(slots) else 0

    async def run(self, stop: asyncio.Event, *, retire: bool = True) -> None:
        """Sample every ``interval_s`` on a fixed schedule (no drift) until ``stop`` is set,
        publishing in the background; then close. ``retire``: the VMs are gone for good, so
        every series is stopped; otherwise (metald restarting, its VMs running on) only
        their partial batches are spooled and the next loop continues each series (a
        retired series cannot be continued: its instance would go unmetered)."""
        loop = asyncio.get_running_loop()
        publisher = asyncio.create_task(self.billaged.run_publisher())
        next_at = loop.time()
        try:
            while not stop.is_set():
                self.tick()
                next_at += self.interval_s
                delay = next_at - loop.time()
                if delay < 0:  # overran: skip the missed ticks rather than burst
                    next_at = loop.time()
                    delay = 0
                waiter = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({waiter}, timeout=delay)
                finally:
                    waiter.cancel()
        finally:
            self._try_refresh("stop")  # VMs deleted since the last look end here
            if retire:
                for key in self.collector.keys:
                    self.billaged.stop(key)
            else:
                self.billaged.checkpoint(self.collector.keys)
            self.collector.close()
            self.billaged.stop_publisher()
            try:
                await asyncio.wait_for(asyncio.shield(publisher), 15.0)
            except TimeoutError:
                publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publisher


def build(settings: Settings, targets: TargetsFn, nats_url: str) -> MeteringLoop:
    """A host's metering loop from the settings: spool under ``<data_dir>/billaged``, batches
    of ``metering.batch_samples``, sampled every ``metering.interval_ms``, published to
    ``nats_url`` (see :func:`unkey_deploy.bus.resolve_nats`). Run it with
    ``await loop.run(stop_event)``."""

    async def factory() -> Bus:
        return await connect(nats_url)

    billaged = Billaged(
        settings.data_dir / "billaged",
        bus_factory=factory,
        bus_config=settings.bus,
        batch_samples=settings.metering.batch_samples,
    )
    return MeteringLoop(
        Collector(), billaged, targets, interval_s=settings.metering.interval_ms / 1000
    )
