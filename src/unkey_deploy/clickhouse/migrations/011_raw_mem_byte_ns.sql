-- metrics_raw.mem_byte_ns (a.memory_used_bytes x dt of an interval of at most 1 s) passes 2^64
-- for 17 GiB held a whole second (32 GiB for 0.6 s): as a UInt64 it wrapped. Decimal(38, 0)
-- holds any gauge (< 2^63) times 1 s exactly, as billing_hourly.mem_byte_ns does. Rows written
-- before keep their values.
ALTER TABLE metrics_raw MODIFY COLUMN mem_byte_ns Decimal(38, 0) CODEC(ZSTD(1));
