-- Audit changes of versions and instances too, as an 'update' of their extension with the
-- changed row under "versions" or "instances". Operational fields (health_status,
-- last_health_check, stamps) are not configuration and do not produce audit rows. Rows removed
-- by the cascade of an extension's delete are covered by that delete's own audit row, and
-- children inserted with a new extension by its 'create' row.
CREATE OR REPLACE FUNCTION extreg_audit_child() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    kind text := CASE TG_TABLE_NAME WHEN 'extension_versions' THEN 'versions' ELSE 'instances' END;
    old_doc jsonb;
    new_doc jsonb;
    ext_id text;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        old_doc := to_jsonb(OLD) - 'updated_at' - 'created_at' - 'health_status' - 'last_health_check';
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_doc := to_jsonb(NEW) - 'updated_at' - 'created_at' - 'health_status' - 'last_health_check';
    END IF;
    IF old_doc IS NOT DISTINCT FROM new_doc THEN
        RETURN NULL;
    END IF;
    ext_id := coalesce(new_doc, old_doc) ->> (CASE kind WHEN 'versions' THEN 'id' ELSE 'extension_id' END);
    IF NOT EXISTS (SELECT 1 FROM extensions WHERE id = ext_id) THEN
        RETURN NULL;
    END IF;
    -- Children written in the transaction that created their extension belong to that
    -- 'create' (the audit row's changed_at is the transaction's start time, like now()).
    IF EXISTS (SELECT 1 FROM extension_audit_log
               WHERE extension_id = ext_id AND action = 'create' AND changed_at = now()) THEN
        RETURN NULL;
    END IF;
    INSERT INTO extension_audit_log (extension_id, action, old_values, new_values, changed_by)
    VALUES (ext_id, 'update', jsonb_build_object(kind, old_doc), jsonb_build_object(kind, new_doc),
            extreg_actor());
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS extreg_audit ON extension_versions;
CREATE TRIGGER extreg_audit AFTER INSERT OR UPDATE OR DELETE ON extension_versions
    FOR EACH ROW EXECUTE FUNCTION extreg_audit_child();
DROP TRIGGER IF EXISTS extreg_audit ON extension_instances;
CREATE TRIGGER extreg_audit AFTER INSERT OR UPDATE OR DELETE ON extension_instances
    FOR EACH ROW EXECUTE FUNCTION extreg_audit_child();
