-- The seed's five tables (sql/011_extensions_registry.sql), with its names and types.
-- Written with IF NOT EXISTS so that a database laid out by the seed migrates cleanly.

CREATE TABLE IF NOT EXISTS extensions (
    id          varchar(255) PRIMARY KEY,
    type        varchar(32)  NOT NULL CHECK (type IN ('pre', 'validator', 'post', 'provider')),
    subject     varchar(512) NOT NULL,
    timeout_ms  integer      NOT NULL DEFAULT 5000 CHECK (timeout_ms > 0),
    retry       integer      NOT NULL DEFAULT 0 CHECK (retry >= 0),
    enabled     boolean      NOT NULL DEFAULT true,
    version     varchar(32)  NOT NULL DEFAULT 'v1',
    config      jsonb        DEFAULT '{}'::jsonb,
    metadata    jsonb        DEFAULT '{}'::jsonb,
    created_at  timestamptz  DEFAULT now(),
    updated_at  timestamptz  DEFAULT now(),
    created_by  varchar(255),
    updated_by  varchar(255)
);
CREATE INDEX IF NOT EXISTS idx_extensions_type ON extensions (type);
CREATE INDEX IF NOT EXISTS idx_extensions_enabled ON extensions (enabled) WHERE enabled = true;
CREATE INDEX IF NOT EXISTS idx_extensions_subject ON extensions (subject);
CREATE INDEX IF NOT EXISTS idx_extensions_updated_at ON extensions (updated_at);

CREATE TABLE IF NOT EXISTS extension_versions (
    id            varchar(255) NOT NULL REFERENCES extensions (id) ON DELETE CASCADE,
    version       varchar(32)  NOT NULL,
    subject       varchar(512) NOT NULL,
    timeout_ms    integer      NOT NULL,
    retry         integer      NOT NULL,
    config        jsonb        DEFAULT '{}'::jsonb,
    metadata      jsonb        DEFAULT '{}'::jsonb,
    routing_rules jsonb        DEFAULT '{}'::jsonb,
    enabled       boolean      NOT NULL DEFAULT true,
    created_at    timestamptz  DEFAULT now(),
    created_by    varchar(255),
    PRIMARY KEY (id, version)
);

CREATE TABLE IF NOT EXISTS extension_instances (
    extension_id      varchar(255) NOT NULL REFERENCES extensions (id) ON DELETE CASCADE,
    instance_id       varchar(255) NOT NULL,
    subject           varchar(512) NOT NULL,
    weight            integer      DEFAULT 100 CHECK (weight >= 0 AND weight <= 100),
    enabled           boolean      NOT NULL DEFAULT true,
    health_status     varchar(32)  DEFAULT 'unknown'
                      CHECK (health_status IN ('healthy', 'degraded', 'unhealthy', 'unknown')),
    last_health_check timestamptz,
    created_at        timestamptz  DEFAULT now(),
    updated_at        timestamptz  DEFAULT now(),
    PRIMARY KEY (extension_id, instance_id)
);

CREATE TABLE IF NOT EXISTS extension_health (
    extension_id                       varchar(255) PRIMARY KEY REFERENCES extensions (id) ON DELETE CASCADE,
    last_success                       timestamptz,
    last_failure                       timestamptz,
    success_count                      bigint DEFAULT 0,
    failure_count                      bigint DEFAULT 0,
    avg_latency_ms                     numeric(10, 2),
    p50_latency_ms                     numeric(10, 2),
    p95_latency_ms                     numeric(10, 2),
    p99_latency_ms                     numeric(10, 2),
    last_latency_ms                    integer,
    latency_samples                    bigint DEFAULT 0,
    latency_sum                        bigint DEFAULT 0,
    latency_samples_window_start       timestamptz,
    circuit_breaker_state              varchar(32) DEFAULT 'closed'
                                       CHECK (circuit_breaker_state IN ('closed', 'open', 'half_open')),
    circuit_breaker_opened_at          timestamptz,
    circuit_breaker_failure_threshold  integer DEFAULT 5,
    circuit_breaker_error_rate_threshold numeric(5, 2) DEFAULT 0.5
                                       CHECK (circuit_breaker_error_rate_threshold >= 0
                                              AND circuit_breaker_error_rate_threshold <= 1),
    circuit_breaker_window_seconds     integer DEFAULT 60,
    half_open_max_requests             integer DEFAULT 3,
    half_open_requests_count           integer DEFAULT 0,
    updated_at                         timestamptz DEFAULT now()
);

CREATE TABLE IF NOT EXISTS extension_audit_log (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    extension_id varchar(255) NOT NULL,
    action       varchar(32)  NOT NULL CHECK (action IN ('create', 'update', 'delete', 'enable', 'disable')),
    old_values   jsonb,
    new_values   jsonb,
    changed_by   varchar(255),
    changed_at   timestamptz DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_extension_audit_log_extension_id ON extension_audit_log (extension_id);
CREATE INDEX IF NOT EXISTS idx_extension_audit_log_changed_at ON extension_audit_log (changed_at);
CREATE INDEX IF NOT EXISTS idx_extension_audit_log_action ON extension_audit_log (action);
