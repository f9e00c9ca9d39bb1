"""The raw -> 5 min -> hourly -> daily chain combines partial aggregates (the seed design's
metrics_5min lost them: it kept one arbitrary row per key on merge)."""

from __future__ import annotations

from datetime import timedelta

from chdata import T0, T0_NS, batch

from unkey_deploy.clickhouse import queries
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage

MIN = 60_000_000_000


def _two_batches_one_bucket(store: ChdbStorage) -> None:
    # two 60 s batches (600 intervals each) inside the same 5-minute bucket, as two inserts
    store.insert_raw(
        batch(start_ns=T0_NS + 1, n=600, cpu=10.0, memory_used_bytes=100, cpu_time_ns=7)
    )
    store.insert_raw(
        batch(start_ns=T0_NS + MIN + 1, n=600, cpu=90.0, memory_used_bytes=300, cpu_time_ns=3)
    )
    for table in ("metrics_raw", "metrics_5min", "metrics_hourly", "metrics_daily"):
        store.command("OPTIMIZE TABLE " + table + " FINAL")


def test_chain_combines_states_after_merge(store: ChdbStorage) -> None:
    _two_batches_one_bucket(store)
    # after OPTIMIZE FINAL each rollup holds ONE row for the bucket ...
    for table in ("metrics_5min", "metrics_hourly", "metrics_daily"):
        n = store.query("SELECT count() AS n FROM " + table)[0]["n"]  # noqa: S608
        assert n == 1, table
    # ... and that row combines both batches at every level of the chain
    for resolution in ("5min", "hour", "day"):
        (p,) = queries.vm_usage(
            store,
            customer_id="cust_a",
            start=T0 - timedelta(days=1),
            end=T0 + timedelta(days=1),
            resolution=resolution,  # type: ignore[arg-type]
        )
        assert p.samples == 1200, resolution
        assert p.avg_cpu == 50.0, resolution
        assert p.max_cpu == 90.0, resolution
        assert p.p95_cpu == 90.0, resolution
        assert p.avg_memory_bytes == 200.0, resolution
        assert p.max_memory_bytes == 300, resolution
        assert p.cpu_time_ns == 600 * 7 + 600 * 3, resolution
    (five,) = queries.vm_usage(
        store, customer_id="cust_a", start=T0, end=T0 + timedelta(hours=1), resolution="5min"
    )
    assert five.t == T0


def test_seed_design_table_loses_data_where_ours_does_not(store: ChdbStorage) -> None:
    """Reproduce the seed design's plain-column AggregatingMergeTree beside ours, same inserts:
    it reports 10/10/600 after a merge, ours 50/90/1200."""
    store.command(
        "CREATE TABLE seed_5min (vm_id String, bucket DateTime, cpu_avg Float64, "
        "cpu_max Float32, sample_count UInt64) ENGINE = AggregatingMergeTree "
        "ORDER BY (vm_id, bucket)"
    )
    store.command(
        "CREATE MATERIALIZED VIEW seed_5min_mv TO seed_5min AS SELECT vm_id, "
        "toStartOfFiveMinutes(timestamp) AS bucket, avg(cpu_usage_percent) AS cpu_avg, "
        "max(cpu_usage_percent) AS cpu_max, count() AS sample_count FROM metrics_raw "
        "GROUP BY vm_id, bucket"
    )
    _two_batches_one_bucket(store)
    store.command("OPTIMIZE TABLE seed_5min FINAL")
    (seed,) = store.query("SELECT cpu_avg, cpu_max, sample_count FROM seed_5min")
    assert (seed["cpu_avg"], seed["sample_count"]) != (50.0, 1200)  # the seed bug is real
    (ours,) = store.query(
        "SELECT avgMerge(cpu_avg) AS a, max(cpu_max) AS m, sum(sample_count) AS n FROM metrics_5min"
    )
    assert (ours["a"], ours["m"], ours["n"]) == (50.0, 90.0, 1200)


def test_buckets_split_on_five_minute_boundaries(store: ChdbStorage) -> None:
    # 3000 intervals over exactly 300 s starting at T0+100ms: the last one lands on T0+5min
    store.insert_raw(batch(start_ns=T0_NS + 100_000_000, n=3000, cpu=20.0, network_rx_bytes=2))
    pts = queries.vm_usage(
        store, customer_id="cust_a", start=T0, end=T0 + timedelta(hours=1), resolution="5min"
    )
    assert [(p.t, p.samples, p.network_rx_bytes) for p in pts] == [
        (T0, 2999, 5998),
        (T0 + timedelta(minutes=5), 1, 2),
    ]
    (hour,) = queries.vm_usage(
        store, customer_id="cust_a", start=T0, end=T0 + timedelta(hours=1), resolution="hour"
    )
    assert (hour.samples, hour.network_rx_bytes) == (3000, 6000)
