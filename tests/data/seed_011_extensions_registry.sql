-- A reconstruction of the seed's sql/011_extensions_registry.sql from its documented layout
-- (shared/reference/schema.md), used to prove that such a database migrates cleanly.
CREATE TABLE extensions (
    id VARCHAR(255) PRIMARY KEY,
    type VARCHAR(32) NOT NULL CHECK (type IN ('pre', 'validator', 'post', 'provider')),
    subject VARCHAR(512) NOT NULL,
    timeout_ms INTEGER NOT NULL DEFAULT 5000 CHECK (timeout_ms > 0),
    retry INTEGER NOT NULL DEFAULT 0 CHECK (retry >= 0),
    enabled BOOLEAN NOT NULL DEFAULT true,
    version VARCHAR(32) NOT NULL DEFAULT 'v1',
    config JSONB DEFAULT '{}',
    metadata JSONB DEFAULT '{}',
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    created_by VARCHAR(255),
    updated_by VARCHAR(255)
);
CREATE INDEX idx_extensions_type ON extensions(type);
CREATE INDEX idx_extensions_enabled ON extensions(enabled) WHERE enabled = true;
CREATE INDEX idx_extensions_subject ON extensions(subject);
CREATE INDEX idx_extensions_updated_at ON extensions(updated_at);

CREATE TABLE extension_versions (
    id VARCHAR(255) NOT NULL REFERENCES extensions(id) ON DELETE CASCADE,
    version VARCHAR(32) NOT NULL,
    subject VARCHAR(512) NOT NULL,
    timeout_ms INTEGER NOT NULL,
    retry INTEGER NOT NULL,
    config JSONB DEFAULT '{}',
    metadata JSONB DEFAULT '{}',
    routing_rules JSONB DEFAULT '{}',
    enabled BOOLEAN NOT NULL DEFAULT true,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    created_by VARCHAR(255),
    PRIMARY KEY (id, version)
);

CREATE TABLE extension_instances (
    extension_id VARCHAR(255) NOT NULL REFERENCES extensions(id) ON DELETE CASCADE,
    instance_id VARCHAR(255) NOT NULL,
    subject VARCHAR(512) NOT NULL,
    weight INTEGER DEFAULT 100 CHECK (weight >= 0 AND weight <= 100),
    enabled BOOLEAN NOT NULL DEFAULT true,
    health_status VARCHAR(32) DEFAULT 'unknown' CHECK (health_status IN ('healthy', 'degraded', 'unhealthy', 'unknown')),
    last_health_check TIMESTAMP WITH TIME ZONE,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    PRIMARY KEY (extension_id, instance_id)
);

CREATE TABLE extension_health (
    extension_id VARCHAR(255) PRIMARY KEY REFERENCES extensions(id) ON DELETE CASCADE,
    last_success TIMESTAMP WITH TIME ZONE,
    last_failure TIMESTAMP WITH TIME ZONE,
    success_count BIGINT DEFAULT 0,
    failure_count BIGINT DEFAULT 0,
    avg_latency_ms NUMERIC(10,2),
    p50_latency_ms NUMERIC(10,2),
    p95_latency_ms NUMERIC(10,2),
    p99_latency_ms NUMERIC(10,2),
    last_latency_ms INTEGER,
    latency_samples BIGINT DEFAULT 0,
    latency_sum BIGINT DEFAULT 0,
    latency_samples_window_start TIMESTAMP WITH TIME ZONE,
    circuit_breaker_state VARCHAR(32) DEFAULT 'closed' CHECK (circuit_breaker_state IN ('closed', 'open', 'half_open')),
    circuit_breaker_opened_at TIMESTAMP WITH TIME ZONE,
    circuit_breaker_failure_threshold INTEGER DEFAULT 5,
    circuit_breaker_error_rate_threshold NUMERIC(5,2) DEFAULT 0.5 CHECK (circuit_breaker_error_rate_threshold >= 0 AND circuit_breaker_error_rate_threshold <= 1),
    circuit_breaker_window_seconds INTEGER DEFAULT 60,
    half_open_max_requests INTEGER DEFAULT 3,
    half_open_requests_count INTEGER DEFAULT 0,
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);

CREATE TABLE extension_audit_log (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    extension_id VARCHAR(255) NOT NULL REFERENCES extensions(id) ON DELETE CASCADE,
    action VARCHAR(32) NOT NULL CHECK (action IN ('create', 'update', 'delete', 'enable', 'disable')),
    old_values JSONB,
    new_values JSONB,
    changed_by VARCHAR(255),
    changed_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);
CREATE INDEX idx_extension_audit_log_extension_id ON extension_audit_log(extension_id);
CREATE INDEX idx_extension_audit_log_changed_at ON extension_audit_log(changed_at);
CREATE INDEX idx_extension_audit_log_action ON extension_audit_log(action);

CREATE OR REPLACE FUNCTION update_extensions_updated_at() RETURNS TRIGGER AS $$
BEGIN
    NEW.updated_at = NOW();
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER trigger_extensions_updated_at BEFORE UPDATE ON extensions
    FOR EACH ROW EXECUTE FUNCTION update_extensions_updated_at();

INSERT INTO extensions (id, type, subject, timeout_ms, retry, enabled, version, config, metadata) VALUES
    ('normalize_text', 'pre', 'beamline.ext.pre.normalize_text.v1', 100, 0, true, 'v1', '{}', '{}'),
    ('pii_guard', 'validator', 'beamline.ext.validate.pii_guard.v1', 200, 0, true, 'v1', '{}', '{}'),
    ('mask_pii', 'post', 'beamline.ext.post.mask_pii.v1', 150, 0, true, 'v1', '{}', '{}');
INSERT INTO extension_health (extension_id, circuit_breaker_state) VALUES
    ('normalize_text', 'closed'), ('pii_guard', 'closed'), ('mask_pii', 'closed');
