-- Notifications that carry the changed record (issue 15; docs/design.md, "Change feed").
--
-- Before: every row change of the three record tables notified its extension id at once, and
-- every listener re-read the record. Now one notification per extension and transaction is
-- sent at commit, carrying the record as committed (the JSON shape of the adapter's reads) and
-- the writing transaction's id, so a listener applies it without a read. A record whose
-- notification would not fit the 8,000-byte payload is notified by id, read back as before.
--
-- Why a deferred constraint trigger: it runs at commit, after every statement of the
-- transaction, so the record it renders is the one the transaction leaves. Before rendering it
-- takes the extension row's lock (FOR NO KEY UPDATE: it does not conflict with the KEY SHARE
-- lock that inserting a version or instance holds), so two transactions changing one extension
-- render in turn, each seeing the other's commit: notifications arrive in commit order, and
-- each one carries everything committed before it.
--
-- The `xid` lets a listener skip a notification whose transaction its last read of that
-- record had already seen (`pg_current_snapshot()` is read with every load).

-- The record of one extension as the adapter's reads render it (adapters/postgres.py,
-- `_RECORDS`; tests/test_notify_records.py checks both decode to the same record), or NULL.
CREATE OR REPLACE FUNCTION extreg_record(p_id text) RETURNS json LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'id', e.id, 'type', e.type, 'subject', e.subject, 'timeout_ms', e.timeout_ms,
        'retry', e.retry, 'enabled', e.enabled, 'version', e.version,
        'config', coalesce(e.config, '{}'), 'metadata', coalesce(e.metadata, '{}'),
        'versions', coalesce((
            SELECT json_agg(json_build_object(
                'version', version, 'subject', subject, 'timeout_ms', timeout_ms,
                'retry', retry, 'config', coalesce(config, '{}'),
                'metadata', coalesce(metadata, '{}'),
                'routing_rules', coalesce(routing_rules, '{}'), 'enabled', enabled,
                'created_at', created_at, 'created_by', created_by)
                ORDER BY created_at, version)
            FROM extension_versions WHERE id = p_id), '[]'),
        'instances', coalesce((
            SELECT json_agg(json_build_object(
                'instance_id', instance_id, 'subject', subject,
                'weight', coalesce(weight, 100), 'enabled', enabled,
                'health_status', coalesce(health_status, 'unknown'))
                ORDER BY instance_id)
            FROM extension_instances WHERE extension_id = p_id), '[]'),
        'created_at', e.created_at, 'updated_at', e.updated_at,
        'created_by', e.created_by, 'updated_by', e.updated_by)
    FROM extensions e WHERE e.id = p_id
$$;

-- Times are rendered in UTC whatever the writer's session says (the adapter's reads are too),
-- so a notified record and a read one encode alike. A transaction that does not run READ
-- COMMITTED renders with its own snapshot, taken before commits it does not see, so its
-- notification names the id only, to be read back.
CREATE OR REPLACE FUNCTION extreg_notify_record() RETURNS trigger LANGUAGE plpgsql
SET TimeZone = 'UTC' AS $$
DECLARE
    doc jsonb := to_jsonb(coalesce(NEW, OLD));
    ext_id text := coalesce(doc ->> 'extension_id', doc ->> 'id');
    xid text := pg_current_xact_id()::text;
    rec json;
    payload text;
BEGIN
    -- Each changed row of an extension renders it again, all alike (they run at commit):
    -- PostgreSQL sends identical payloads of one transaction once.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM pg_notify('extreg_changes', json_build_object('id', ext_id, 'xid', xid)::text);
        RETURN NULL;
    END IF;
    PERFORM 1 FROM extensions WHERE id = ext_id FOR NO KEY UPDATE;
    rec := extreg_record(ext_id);
    IF rec IS NULL THEN
        payload := json_build_object('id', ext_id, 'xid', xid, 'gone', true)::text;
    ELSE
        payload := json_build_object('id', ext_id, 'xid', xid, 'record', rec)::text;
        IF octet_length(payload) >= 8000 THEN
            payload := json_build_object('id', ext_id, 'xid', xid)::text;
        END IF;
    END IF;
    PERFORM pg_notify('extreg_changes', payload);
    RETURN NULL;
END $$;

-- Same trigger name as before (operators and tests drop `extreg_notify` to silence them).
DROP TRIGGER IF EXISTS extreg_notify ON extensions;
CREATE CONSTRAINT TRIGGER extreg_notify AFTER INSERT OR UPDATE OR DELETE ON extensions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION extreg_notify_record();
DROP TRIGGER IF EXISTS extreg_notify ON extension_versions;
CREATE CONSTRAINT TRIGGER extreg_notify AFTER INSERT OR UPDATE OR DELETE ON extension_versions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION extreg_notify_record();
DROP TRIGGER IF EXISTS extreg_notify ON extension_instances;
CREATE CONSTRAINT TRIGGER extreg_notify AFTER INSERT OR UPDATE OR DELETE ON extension_instances
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION extreg_notify_record();
