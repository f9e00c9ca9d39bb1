"""The design's three queries over a 1,000-VM fleet with 24 h of data, on embedded chDB.

    .venv/bin/python bench/queries.py [--vms 1000] [--customers 50] [--hours 24] [--hz 1]
                                      [--hot-minutes 10] [--hot-hz 10] [--runs 30]

Data (say exactly what was generated; 10 Hz x 24 h x 1000 VMs = 864M rows is too much for this
2-core machine): ``--hz`` samples/s per VM for the first ``hours - hot_minutes``, then
``--hot-hz`` for the last ``--hot-minutes`` (what the dashboard reads), inserted through
``Storage.insert_raw`` with the full schema (rollup MV chain attached), in 1-hour chunks; plus
``billing_hourly``: every VM x every hour of a 30-day month, and 5% of the rows re-issued with a
newer version (so FINAL has real work).

Queries (``unkey_deploy.clickhouse.queries``, tenant-scoped where the design's are):
  dashboard   one customer's VMs, last 5 min, from metrics_raw deltas       goal < 50 ms
  bill        one customer's month from billing_hourly FINAL                 goal < 20 ms
  capacity    platform-wide per hour, last 24 h, from capacity_hourly's
              per-hour projection p_platform                                 goal < 100 ms
Each runs ``--runs`` times (after one warm-up, rotating customers) once background merges have
finished (up to ``--settle-s``); the CPU time of the process per query is printed too (the
machine is shared: wall time includes waiting for a core, CPU time does not).
Baselines in the same run: the same capacity SQL with projections disabled (one t-digest per
customer-hour) and the seed design's capacity query (quantile over metrics_raw).
Last line: ``RESULT dashboard_p50_ms=... bill_p50_ms=... capacity_p50_ms=... ... load=...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from unkey_deploy.clickhouse import queries  # noqa: E402
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage  # noqa: E402
from unkey_deploy.clickhouse.synth import Fleet, billing_rows, raw_chunk  # noqa: E402

S = 1_000_000_000


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--customers", type=int, default=50)
    ap.add_argument("--hours", type=int, default=24)
    ap.add_argument("--hz", type=float, default=1.0)
    ap.add_argument("--hot-minutes", type=int, default=10)
    ap.add_argument("--hot-hz", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--settle-s", type=float, default=300.0)
    args = ap.parse_args()

    fleet = Fleet(vms=args.vms, customers=args.customers)
    now = datetime.now(UTC).replace(microsecond=0)
    now_ns = int(now.timestamp()) * S
    start_ns = now_ns - args.hours * 3600 * S
    hot_start_ns = now_ns - args.hot_minutes * 60 * S

    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    store = ChdbStorage(Path(tmp.name) / "ch")
    try:
        store.migrate()
        total = 0
        t_ins = 0.0
        t_gen = 0.0
        step = int(S / args.hz)
        t = start_ns
        while t < hot_start_ns:
            span = min(3600 * S, hot_start_ns - t)
            g0 = time.perf_counter()
            tbl = raw_chunk(fleet, t, span // step, step)
            g1 = time.perf_counter()
            store.insert_raw(tbl, f"bench-{t}")
            t_ins += time.perf_counter() - g1
            t_gen += g1 - g0
            total += tbl.num_rows
            t += span
        hot_step = int(S / args.hot_hz)
        t = hot_start_ns
        while t < now_ns:
            span = min(60 * S, now_ns - t)
            g0 = time.perf_counter()
            tbl = raw_chunk(fleet, t, span // hot_step, hot_step)
            g1 = time.perf_counter()
            store.insert_raw(tbl, f"bench-hot-{t}")
            t_ins += time.perf_counter() - g1
            t_gen += g1 - g0
            total += tbl.num_rows
            t += span
        print(
            f"raw: {total:,} rows ({args.vms} VMs, {args.hz:g} Hz for "
            f"{args.hours} h - {args.hot_minutes} min, {args.hot_hz:g} Hz for the last "
            f"{args.hot_minutes} min); generate {t_gen:.1f} s, insert {t_ins:.1f} s = "
            f"{total / t_ins:,.0f} rows/s with the rollup chain",
            flush=True,
        )

        month_start = now.replace(day=1, hour=0, minute=0, second=0)
        hours = [month_start + timedelta(hours=h) for h in range(30 * 24)]
        g0 = time.perf_counter()
        rows = billing_rows(fleet, hours, version=1)
        reissued = rows[::20]
        store.upsert_billing_hourly(rows)
        store.upsert_billing_hourly(
            [type(r)(**{**{f: getattr(r, f) for f in r.__slots__}, "version": 2}) for r in reissued]
        )
        print(
            f"billing_hourly: {len(rows):,} rows + {len(reissued):,} re-issued "
            f"({time.perf_counter() - g0:.1f} s)",
            flush=True,
        )
        sizes = store.query(
            "SELECT table, sum(rows) AS rows, sum(data_compressed_bytes) AS c, "
            "sum(data_uncompressed_bytes) AS u FROM system.parts WHERE active "
            "AND database = currentDatabase() GROUP BY table ORDER BY table"
        )
        for s in sizes:
            ratio = s["u"] / s["c"] if s["c"] else 0
            print(
                f"  {s['table']:<20} {s['rows']:>12,} rows "
                f"{s['c'] / 2**20:8.1f} MiB ({ratio:.1f}:1)"
            )

        # query in steady state: wait for the background merges the inserts started
        w0 = time.perf_counter()
        while time.perf_counter() - w0 < args.settle_s:
            if store.query("SELECT count() AS n FROM system.merges")[0]["n"] == 0:
                break
            time.sleep(1)
        print(
            f"waited {time.perf_counter() - w0:.0f} s for merges; "
            f"load average {loadavg()} on {os.cpu_count()} CPUs",
            flush=True,
        )

        month = now.strftime("%Y-%m")
        custs = [fleet.customer_of(i) for i in range(fleet.customers)]
        seed_capacity = (
            "SELECT toStartOfHour(timestamp) AS hour, quantile(0.95)(cpu_usage_percent) AS p95, "
            "max(memory_used_bytes) AS peak, count(DISTINCT vm_id) AS active FROM metrics_raw "
            "WHERE timestamp > {since:DateTime64(3, 'UTC')} GROUP BY hour ORDER BY hour DESC"
        )
        since = (now - timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S")

        def run(name: str, fn: object, runs: int, goal_ms: float | None = None) -> list[float]:
            out: list[float] = []
            cpu: list[float] = []
            for i in range(runs + 1):
                c0 = time.process_time()
                t0 = time.perf_counter()
                fn(i)  # type: ignore[operator]
                ms = (time.perf_counter() - t0) * 1000
                if i:
                    out.append(ms)
                    cpu.append((time.process_time() - c0) * 1000)
            verdict = ""
            if goal_ms is not None:
                met = pct(out, 95) < goal_ms
                verdict = f"   goal < {goal_ms:g} ms: {'met' if met else 'NOT met'} (p95)"
            print(
                f"{name:<26} p50 {statistics.median(out):7.1f} ms   p95 {pct(out, 95):7.1f} ms"
                f"   cpu p50 {statistics.median(cpu):6.1f} ms   (n={runs}){verdict}",
                flush=True,
            )
            return out

        res_d = run(
            "dashboard (5 min)",
            lambda i: queries.dashboard(store, customer_id=custs[i % len(custs)], now=now),
            args.runs,
            50,
        )
        res_b = run(
            "monthly bill (FINAL)",
            lambda i: queries.monthly_bill(store, customer_id=custs[i % len(custs)], month=month),
            args.runs,
            20,
        )
        res_c = run(
            "capacity (24 h)",
            lambda i: queries.capacity_planning(
                store,
                customer_id=None,
                start=now - timedelta(hours=24),
                end=now + timedelta(hours=1),
            ),
            args.runs,
            100,
        )
        cap_params = {
            "start": (now - timedelta(hours=24)).strftime("%Y-%m-%d %H:%M:%S"),
            "end": (now + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S"),
        }
        res_noproj = run(
            "capacity, no projection",
            lambda i: store.query(
                queries.SQL_CAPACITY + "SETTINGS optimize_use_projections = 0", cap_params
            ),
            args.runs,
        )
        res_seed = run(
            "seed capacity (raw)",
            lambda i: store.query(seed_capacity, {"since": since}),
            max(3, args.runs // 10),
        )
        # correctness spot check: FINAL bill equals the plain sum of the newest rows
        b = queries.monthly_bill(store, customer_id=custs[0], month=month)
        print(f"spot check {custs[0]} {month}: vm_hours={b.vm_hours} cost={b.cost}")
        print(
            "RESULT "
            f"rows={total} dashboard_p50_ms={statistics.median(res_d):.1f} "
            f"dashboard_p95_ms={pct(res_d, 95):.1f} bill_p50_ms={statistics.median(res_b):.1f} "
            f"bill_p95_ms={pct(res_b, 95):.1f} capacity_p50_ms={statistics.median(res_c):.1f} "
            f"capacity_p95_ms={pct(res_c, 95):.1f} "
            f"capacity_noproj_p50_ms={statistics.median(res_noproj):.1f} "
            f"capacity_noproj_p95_ms={pct(res_noproj, 95):.1f} "
            f"seed_capacity_raw_p50_ms={statistics.median(res_seed):.1f} load={loadavg()}"
        )
    finally:
        store.close()
        tmp.cleanup()


if __name__ == "__main__":
    main()
