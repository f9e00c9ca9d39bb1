"""``unkey usage import``: JSON Lines of raw samples -> billaged batches -> JetStream -> the
aggregator, the same path live metering takes (for backfills and replays).

One line per sample::

    {"vm_id": "...", "instance_id": "...", "customer_id": "...", "vcpus": 2,
     "memory_total_bytes": 2147483648, "t": 1793491080000000000, "cpu_time_ns": 0,
     "net_rx_bytes": 0, "net_tx_bytes": 0, "disk_read_bytes": 0, "disk_write_bytes": 0,
     "memory_used_bytes": 0}

Every line is checked (names, integer types, ranges); any bad line stops the import before
anything is sent, naming the line and the field. The spool directory is kept between imports, so
batch ids keep growing per series; importing the same file twice bills it once (the samples of
a series up to the last one imported are rejected, as BILLING.md "Cleaning" 2 would ignore them).
Series that are also metered live should not be imported (their batch numbering belongs to the
live billaged).
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bus.interface import Bus
from ..bus.jetstream import connect
from ..core.errors import Problem, Unavailable, ValidationFailed
from ..metering.billaged import Billaged
from ..metering.codec import COLUMNS, ID_RE
from ..metering.model import SeriesKey

KEY_FIELDS = ("customer_id", "vm_id", "instance_id", "vcpus", "memory_total_bytes")
FIELDS = (*KEY_FIELDS, *COLUMNS)
MAX_PROBLEMS = 20


@dataclass
class ImportReport:
    lines: int
    series: int
    samples_accepted: int
    samples_rejected: int
    batches_published: int
    duplicates: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_lines(text_lines: list[str]) -> dict[SeriesKey, np.ndarray]:
    """Validate every line; samples grouped per series, sorted by t."""
    problems: list[Problem] = []
    series: dict[SeriesKey, list[list[int]]] = defaultdict(list)
    for n, line in enumerate(text_lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(loc=f"line {n}", msg=f"not JSON: {exc.msg}"))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(loc=f"line {n}", msg="not a JSON object"))
            continue
        missing = [f for f in FIELDS if f not in obj]
        unknown = [f for f in obj if f not in FIELDS]
        if missing or unknown:
            msg = "; ".join(
                x
                for x in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unknown {', '.join(unknown)}" if unknown else "",
                )
                if x
            )
            problems.append(Problem(loc=f"line {n}", msg=msg))
            continue
        bad = False
        for f in ("customer_id", "vm_id", "instance_id"):
            if not isinstance(obj[f], str) or not ID_RE.match(obj[f]):
                problems.append(Problem(loc=f"line {n}.{f}", msg="must be an id [A-Za-z0-9_-]"))
                bad = True
        for f in ("vcpus", "memory_total_bytes", *COLUMNS):
            v = obj[f]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
                problems.append(Problem(loc=f"line {n}.{f}", msg="must be an integer >= 0"))
                bad = True
        if not bad and obj["vcpus"] < 1:
            problems.append(Problem(loc=f"line {n}.vcpus", msg="must be >= 1"))
            bad = True
        if bad:
            continue
        key = SeriesKey(*(obj[f] for f in KEY_FIELDS))
        series[key].append([obj[c] for c in COLUMNS])
        if len(problems) >= MAX_PROBLEMS:
            break
    if problems:
        raise ValidationFailed(f"usage import: {len(problems)} bad line(s)", problems)
    out = {}
    for key, rows in series.items():
        arr = np.array(rows, dtype=np.int64)
        out[key] = arr[np.argsort(arr[:, 0], kind="stable")]
    return out


async def import_file(
    path: Path, *, nats_url: str, spool_dir: Path, batch_samples: int = 600
) -> ImportReport:
    lines = Path(path).read_text().splitlines()
    series = parse_lines(lines)

    async def factory() -> Bus:
        return await connect(nats_url, name="usage-import")

    bd = Billaged(spool_dir, bus_factory=factory, batch_samples=batch_samples, journal=False)
    try:
        keys = list(series)
        slots = np.array([bd.slot(k) for k in keys], dtype=np.int64)
        longest = max((len(a) for a in series.values()), default=0)
        for i in range(longest):
            live = [j for j, k in enumerate(keys) if i < len(series[k])]
            rows = np.stack([series[keys[j]][i] for j in live])
            bd.ingest(slots[live], rows)
        # Spool the partial batches but leave the series open (not ``stop``): billaged refuses
        # to reopen a stopped series, so running the import again (the same file, a longer one,
        # or after NATS did not take everything) would fail instead of sending what is new and
        # publishing what is still spooled. Samples at or before a series' last one are
        # rejected at ingest: a re-import sends nothing twice.
        bd.checkpoint(keys)
        if not await bd.drain(timeout_s=120):
            raise Unavailable(
                "usage import: could not publish everything to NATS within 120 s",
                suggestion="check the NATS URL; run the import again (it is idempotent)",
            )
        st = bd.stats
        return ImportReport(
            lines=len(lines),
            series=len(keys),
            samples_accepted=st.accepted,
            samples_rejected=st.rejected,
            batches_published=st.batches_published,
            duplicates=st.duplicates,
        )
    finally:
        await bd.close()


def import_file_sync(path: Path, *, nats_url: str, spool_dir: Path) -> ImportReport:
    return asyncio.run(import_file(path, nats_url=nats_url, spool_dir=spool_dir))
