-- Capacity planning per customer and hour, from the 5-minute rollup. Reading p95 from the
-- per-VM hourly states merged ~1000 t-digests per hour (measured 466 ms p50 for 24 h x 1000
-- VMs); one state per customer-hour merges 20x fewer (4 ms vs 45 ms on 3 h x 1000 VMs, same p95
-- to 0.03 points).
CREATE TABLE IF NOT EXISTS capacity_hourly
(
    customer_id LowCardinality(String),
    hour DateTime('UTC'),
    cpu_p95 AggregateFunction(quantileTDigest(0.95), Float32),
    cpu_max SimpleAggregateFunction(max, Float32),
    mem_max SimpleAggregateFunction(max, UInt64),
    active_vms AggregateFunction(uniqExact, String),
    sample_count SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (customer_id, hour)
TTL hour + INTERVAL 400 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS capacity_hourly_mv TO capacity_hourly AS
SELECT
    customer_id,
    toStartOfHour(bucket) AS hour,
    quantileTDigestMergeState(0.95)(cpu_p95) AS cpu_p95,
    max(cpu_max) AS cpu_max,
    max(mem_max) AS mem_max,
    uniqExactState(toString(vm_id)) AS active_vms,
    sum(sample_count) AS sample_count
FROM metrics_5min
GROUP BY customer_id, hour;
