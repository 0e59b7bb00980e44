-- Health written behind the hot path by every router process (node), additively and exactly
-- once (see extreg/sources/health.py and docs/design.md, "Health").

-- The exact latency total (the seed's latency_sum is a bigint of whole milliseconds, kept as
-- the rounded total), the merged DDSketch of every node's latencies (so p50/p95/p99 are
-- cluster-wide), and the time of the latest call (so last_latency_ms is the latest's).
ALTER TABLE extension_health ADD COLUMN IF NOT EXISTS latency_total_ms double precision NOT NULL DEFAULT 0;
ALTER TABLE extension_health ADD COLUMN IF NOT EXISTS latency_sketch jsonb;
ALTER TABLE extension_health ADD COLUMN IF NOT EXISTS last_call_at timestamptz;
UPDATE extension_health SET latency_total_ms = latency_sum
WHERE latency_total_ms = 0 AND coalesce(latency_sum, 0) <> 0;

-- Lets each node read back only the rows changed since its last read.
CREATE INDEX IF NOT EXISTS idx_extension_health_updated_at ON extension_health (updated_at);

-- One row per node: the number of the last health batch it applied. A batch is written in the
-- same transaction that moves last_seq forward, so a retried batch is recognised and skipped.
CREATE TABLE IF NOT EXISTS extreg_health_nodes (
    node_id     varchar(255) PRIMARY KEY,
    last_seq    bigint       NOT NULL CHECK (last_seq > 0),
    started_at  timestamptz  NOT NULL DEFAULT now(),
    flushed_at  timestamptz  NOT NULL DEFAULT now()
);
