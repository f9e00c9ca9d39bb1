-- One row per VM instance per UTC hour (BILLING.md "Per VM-hour"), integer base units, cost
-- unrounded. A recomputation inserts a row with a larger version; ReplacingMergeTree keeps the
-- largest only after a merge, so EVERY read uses FINAL (else re-issued rows count twice).
-- mem_byte_ns / storage_byte_ns overflow UInt64 within one hour (1 GiB x 1 h = 3.9e21): Decimal(38,0).
CREATE TABLE IF NOT EXISTS billing_hourly
(
    customer_id LowCardinality(String),
    hour DateTime('UTC'),
    vm_id LowCardinality(String),
    instance_id LowCardinality(String),
    cpu_time_ns UInt64,
    mem_byte_ns Decimal(38, 0),
    net_rx_bytes UInt64,
    net_tx_bytes UInt64,
    disk_read_bytes UInt64,
    disk_write_bytes UInt64,
    gap_ns UInt64,
    sample_count UInt64,
    storage_byte_ns Decimal(38, 0),
    cost Decimal(38, 12),
    pricing_version LowCardinality(String),
    version UInt64,
    updated_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(hour)
ORDER BY (customer_id, hour, vm_id, instance_id);

-- Invalid samples with their reason: never billed, never lost.
CREATE TABLE IF NOT EXISTS metrics_quarantine
(
    customer_id LowCardinality(String),
    vm_id LowCardinality(String),
    instance_id LowCardinality(String),
    batch_id String DEFAULT '',
    timestamp DateTime64(9, 'UTC'),
    reason LowCardinality(String),
    sample_json String DEFAULT '' CODEC(ZSTD(3)),
    received_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (customer_id, vm_id, timestamp)
TTL toDateTime(timestamp) + INTERVAL 400 DAY
SETTINGS non_replicated_deduplication_window = 10000;

-- Batch ids whose effects are committed (exactly-once by batch id, kept in ClickHouse itself so
-- the marker and the data live and die together). Read with FINAL or DISTINCT.
CREATE TABLE IF NOT EXISTS processed_batches
(
    batch_id String,
    processed_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree
ORDER BY batch_id
TTL toDateTime(processed_at) + INTERVAL 35 DAY;
