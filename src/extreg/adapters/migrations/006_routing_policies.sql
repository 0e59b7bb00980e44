-- Routing policies (SPEC.md, "Routing policies and the pipeline"): stored beside extensions,
-- stamped, audited into extension_audit_log (actions prefixed policy_, rows outliving the
-- policy) and announced on the same channel as extensions, as `policy:<id>`. An extension id
-- cannot hold ':', so a listener tells the two apart without ambiguity.

CREATE TABLE IF NOT EXISTS routing_policies (
    policy_id  text         PRIMARY KEY CHECK (length(policy_id) BETWEEN 1 AND 255),
    tenant_id  text,
    enabled    boolean      NOT NULL DEFAULT true,
    -- pre, validators, providers, post: the pipeline, validated by extreg when read
    body       jsonb        NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(body) = 'object'),
    created_at timestamptz  DEFAULT now(),
    updated_at timestamptz  DEFAULT now(),
    created_by varchar(255),
    updated_by varchar(255)
);

-- The seed's CHECK on the audit log's action knows only the five extension actions. Replace
-- it, whatever the seed named it, with one that also knows the policy actions.
DO $$
DECLARE ck record;
BEGIN
    FOR ck IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'extension_audit_log'::regclass AND contype = 'c'
          AND pg_get_constraintdef(oid) LIKE '%action%'
    LOOP
        EXECUTE format('ALTER TABLE extension_audit_log DROP CONSTRAINT %I', ck.conname);
    END LOOP;
END $$;
ALTER TABLE extension_audit_log ADD CONSTRAINT extension_audit_log_action_check CHECK (action IN (
    'create', 'update', 'delete', 'enable', 'disable',
    'policy_create', 'policy_update', 'policy_delete', 'policy_enable', 'policy_disable'));

CREATE OR REPLACE FUNCTION extreg_stamp_policy() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.created_at := coalesce(NEW.created_at, now());
        NEW.created_by := coalesce(NEW.created_by, extreg_actor());
    END IF;
    NEW.updated_at := now();
    NEW.updated_by := extreg_actor();
    RETURN NEW;
END $$;

-- As extreg_audit does for extensions: an update of nothing but the stamps is no change, and
-- one of nothing but `enabled` is an enable or disable.
CREATE OR REPLACE FUNCTION extreg_audit_policy() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    action text;
    old_doc jsonb;
    new_doc jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO extension_audit_log (extension_id, action, old_values, new_values, changed_by)
        VALUES (NEW.policy_id, 'policy_create', NULL, to_jsonb(NEW), extreg_actor());
        RETURN NULL;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO extension_audit_log (extension_id, action, old_values, new_values, changed_by)
        VALUES (OLD.policy_id, 'policy_delete', to_jsonb(OLD), NULL, extreg_actor());
        RETURN NULL;
    END IF;
    old_doc := to_jsonb(OLD) - 'updated_at' - 'updated_by';
    new_doc := to_jsonb(NEW) - 'updated_at' - 'updated_by';
    IF old_doc = new_doc THEN
        RETURN NULL;
    ELSIF old_doc - 'enabled' = new_doc - 'enabled' THEN
        action := CASE WHEN NEW.enabled THEN 'policy_enable' ELSE 'policy_disable' END;
    ELSE
        action := 'policy_update';
    END IF;
    INSERT INTO extension_audit_log (extension_id, action, old_values, new_values, changed_by)
    VALUES (NEW.policy_id, action, to_jsonb(OLD), to_jsonb(NEW), extreg_actor());
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION extreg_notify_policy() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('extreg_changes', 'policy:' || coalesce(NEW.policy_id, OLD.policy_id));
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS extreg_stamp ON routing_policies;
CREATE TRIGGER extreg_stamp BEFORE INSERT OR UPDATE ON routing_policies
    FOR EACH ROW EXECUTE FUNCTION extreg_stamp_policy();
DROP TRIGGER IF EXISTS extreg_audit ON routing_policies;
CREATE TRIGGER extreg_audit AFTER INSERT OR UPDATE OR DELETE ON routing_policies
    FOR EACH ROW EXECUTE FUNCTION extreg_audit_policy();
DROP TRIGGER IF EXISTS extreg_notify ON routing_policies;
CREATE TRIGGER extreg_notify AFTER INSERT OR UPDATE OR DELETE ON routing_policies
    FOR EACH ROW EXECUTE FUNCTION extreg_notify_policy();
-- extreg_notify sends '*' (a full reload) at statement level.
DROP TRIGGER IF EXISTS extreg_notify_truncate ON routing_policies;
CREATE TRIGGER extreg_notify_truncate AFTER TRUNCATE ON routing_policies
    FOR EACH STATEMENT EXECUTE FUNCTION extreg_notify();
