-- Rollups: AggregatingMergeTree with aggregate-state columns ONLY (a plain column keeps one
-- arbitrary row per key on merge: the seed design's metrics_5min bug). Read with -Merge for
-- AggregateFunction columns and max()/sum() for SimpleAggregateFunction columns.
-- The dedup window on the rollups is what makes a retried raw insert (same token) skip the views
-- too: measured, without it the raw table drops the retry but every rollup counts it twice.
-- Inserts always carry a token (Storage adds a random one), so identical-looking aggregate
-- blocks from different inserts are never dropped by hash.
CREATE TABLE IF NOT EXISTS metrics_5min
(
    customer_id LowCardinality(String),
    vm_id LowCardinality(String),
    bucket DateTime('UTC'),
    cpu_avg AggregateFunction(avg, Float32),
    cpu_max SimpleAggregateFunction(max, Float32),
    cpu_p95 AggregateFunction(quantileTDigest(0.95), Float32),
    mem_avg AggregateFunction(avg, UInt64),
    mem_max SimpleAggregateFunction(max, UInt64),
    mem_total_max SimpleAggregateFunction(max, UInt64),
    vcpus_max SimpleAggregateFunction(max, UInt16),
    cpu_time_ns SimpleAggregateFunction(sum, UInt64),
    network_rx_bytes SimpleAggregateFunction(sum, UInt64),
    network_tx_bytes SimpleAggregateFunction(sum, UInt64),
    disk_read_bytes SimpleAggregateFunction(sum, UInt64),
    disk_write_bytes SimpleAggregateFunction(sum, UInt64),
    gap_ns SimpleAggregateFunction(sum, UInt64),
    sample_count SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMMDD(bucket)
ORDER BY (customer_id, vm_id, bucket)
TTL bucket + INTERVAL 30 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS metrics_hourly
(
    customer_id LowCardinality(String),
    vm_id LowCardinality(String),
    hour DateTime('UTC'),
    cpu_avg AggregateFunction(avg, Float32),
    cpu_max SimpleAggregateFunction(max, Float32),
    cpu_p95 AggregateFunction(quantileTDigest(0.95), Float32),
    mem_avg AggregateFunction(avg, UInt64),
    mem_max SimpleAggregateFunction(max, UInt64),
    mem_total_max SimpleAggregateFunction(max, UInt64),
    vcpus_max SimpleAggregateFunction(max, UInt16),
    cpu_time_ns SimpleAggregateFunction(sum, UInt64),
    network_rx_bytes SimpleAggregateFunction(sum, UInt64),
    network_tx_bytes SimpleAggregateFunction(sum, UInt64),
    disk_read_bytes SimpleAggregateFunction(sum, UInt64),
    disk_write_bytes SimpleAggregateFunction(sum, UInt64),
    gap_ns SimpleAggregateFunction(sum, UInt64),
    sample_count SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (customer_id, vm_id, hour)
TTL hour + INTERVAL 400 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS metrics_daily
(
    customer_id LowCardinality(String),
    vm_id LowCardinality(String),
    day Date,
    cpu_avg AggregateFunction(avg, Float32),
    cpu_max SimpleAggregateFunction(max, Float32),
    cpu_p95 AggregateFunction(quantileTDigest(0.95), Float32),
    mem_avg AggregateFunction(avg, UInt64),
    mem_max SimpleAggregateFunction(max, UInt64),
    mem_total_max SimpleAggregateFunction(max, UInt64),
    vcpus_max SimpleAggregateFunction(max, UInt16),
    cpu_time_ns SimpleAggregateFunction(sum, UInt64),
    network_rx_bytes SimpleAggregateFunction(sum, UInt64),
    network_tx_bytes SimpleAggregateFunction(sum, UInt64),
    disk_read_bytes SimpleAggregateFunction(sum, UInt64),
    disk_write_bytes SimpleAggregateFunction(sum, UInt64),
    gap_ns SimpleAggregateFunction(sum, UInt64),
    sample_count SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYear(day)
ORDER BY (customer_id, vm_id, day)
SETTINGS non_replicated_deduplication_window = 10000;

-- The chain: raw -> 5 min (-State), 5 min -> hourly -> daily (-MergeState). A chained view sees
-- the block just written to its source, so it re-aggregates states, never final values.
CREATE MATERIALIZED VIEW IF NOT EXISTS metrics_5min_mv TO metrics_5min AS
SELECT
    customer_id,
    vm_id,
    toStartOfFiveMinutes(timestamp) AS bucket,
    avgState(cpu_usage_percent) AS cpu_avg,
    max(cpu_usage_percent) AS cpu_max,
    quantileTDigestState(0.95)(cpu_usage_percent) AS cpu_p95,
    avgState(memory_used_bytes) AS mem_avg,
    max(memory_used_bytes) AS mem_max,
    max(memory_total_bytes) AS mem_total_max,
    max(vcpus) AS vcpus_max,
    sum(cpu_time_ns) AS cpu_time_ns,
    sum(network_rx_bytes) AS network_rx_bytes,
    sum(network_tx_bytes) AS network_tx_bytes,
    sum(disk_read_bytes) AS disk_read_bytes,
    sum(disk_write_bytes) AS disk_write_bytes,
    sum(gap_ns) AS gap_ns,
    count() AS sample_count
FROM metrics_raw
GROUP BY customer_id, vm_id, bucket;

CREATE MATERIALIZED VIEW IF NOT EXISTS metrics_hourly_mv TO metrics_hourly AS
SELECT
    customer_id,
    vm_id,
    toStartOfHour(bucket) AS hour,
    avgMergeState(cpu_avg) AS cpu_avg,
    max(cpu_max) AS cpu_max,
    quantileTDigestMergeState(0.95)(cpu_p95) AS cpu_p95,
    avgMergeState(mem_avg) AS mem_avg,
    max(mem_max) AS mem_max,
    max(mem_total_max) AS mem_total_max,
    max(vcpus_max) AS vcpus_max,
    sum(cpu_time_ns) AS cpu_time_ns,
    sum(network_rx_bytes) AS network_rx_bytes,
    sum(network_tx_bytes) AS network_tx_bytes,
    sum(disk_read_bytes) AS disk_read_bytes,
    sum(disk_write_bytes) AS disk_write_bytes,
    sum(gap_ns) AS gap_ns,
    sum(sample_count) AS sample_count
FROM metrics_5min
GROUP BY customer_id, vm_id, hour;

CREATE MATERIALIZED VIEW IF NOT EXISTS metrics_daily_mv TO metrics_daily AS
SELECT
    customer_id,
    vm_id,
    toDate(hour) AS day,
    avgMergeState(cpu_avg) AS cpu_avg,
    max(cpu_max) AS cpu_max,
    quantileTDigestMergeState(0.95)(cpu_p95) AS cpu_p95,
    avgMergeState(mem_avg) AS mem_avg,
    max(mem_max) AS mem_max,
    max(mem_total_max) AS mem_total_max,
    max(vcpus_max) AS vcpus_max,
    sum(cpu_time_ns) AS cpu_time_ns,
    sum(network_rx_bytes) AS network_rx_bytes,
    sum(network_tx_bytes) AS network_tx_bytes,
    sum(disk_read_bytes) AS disk_read_bytes,
    sum(disk_write_bytes) AS disk_write_bytes,
    sum(gap_ns) AS gap_ns,
    sum(sample_count) AS sample_count
FROM metrics_hourly
GROUP BY customer_id, vm_id, day;
