-- Recent health and charts (see extreg/core/intervals.py and docs/design.md, "Health"):
-- every node's calls per 10-second interval, added in the same transaction as the totals of
-- extension_health, so they stay exact across nodes and restarts. Pruned after 6 hours.
CREATE TABLE IF NOT EXISTS extension_health_intervals (
    extension_id     varchar(255)     NOT NULL REFERENCES extensions (id) ON DELETE CASCADE,
    interval_start   timestamptz      NOT NULL,
    success_count    bigint           NOT NULL DEFAULT 0,
    failure_count    bigint           NOT NULL DEFAULT 0,
    latency_total_ms double precision NOT NULL DEFAULT 0,
    latency_sketch   jsonb            NOT NULL,
    PRIMARY KEY (extension_id, interval_start)
);
CREATE INDEX IF NOT EXISTS idx_extension_health_intervals_start
    ON extension_health_intervals (interval_start);

-- Circuit transitions, for the charts' marks: written with the batch of the node whose breaker
-- moved (so exactly once), kept as long as the intervals. Kept for deleted extensions too,
-- like their audit rows; the charts ask for one extension or for the registry's.
CREATE TABLE IF NOT EXISTS extreg_circuit_events (
    extension_id varchar(255) NOT NULL,
    at           timestamptz  NOT NULL,
    state        varchar(32)  NOT NULL CHECK (state IN ('closed', 'open', 'half_open')),
    node_id      varchar(255) NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_extreg_circuit_events_at ON extreg_circuit_events (at);
CREATE INDEX IF NOT EXISTS idx_extreg_circuit_events_ext ON extreg_circuit_events (extension_id, at);
