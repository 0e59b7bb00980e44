-- extreg's additions: audit rows outlive their extension, every change is stamped and
-- audited by triggers (so plain SQL outside extreg is covered), and every change of the three
-- record tables sends a notification carrying the extension id.

-- The seed ties the audit log to extensions with ON DELETE CASCADE, which erases the history
-- of a deleted extension. Drop that foreign key, whatever the seed named it.
DO $$
DECLARE fk record;
BEGIN
    FOR fk IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'extension_audit_log'::regclass AND contype = 'f'
    LOOP
        EXECUTE format('ALTER TABLE extension_audit_log DROP CONSTRAINT %I', fk.conname);
    END LOOP;
END $$;

-- Lets the periodic sync find changed versions, which the seed does not stamp.
ALTER TABLE extension_versions ADD COLUMN IF NOT EXISTS updated_at timestamptz DEFAULT now();
CREATE INDEX IF NOT EXISTS idx_extension_versions_updated_at ON extension_versions (updated_at);
CREATE INDEX IF NOT EXISTS idx_extension_instances_updated_at ON extension_instances (updated_at);

-- Who is changing things: the session setting extreg.actor, else the database user.
CREATE OR REPLACE FUNCTION extreg_actor() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('extreg.actor', true), ''), current_user::text)
$$;

CREATE OR REPLACE FUNCTION extreg_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'extensions' THEN
        IF TG_OP = 'INSERT' THEN
            NEW.created_at := coalesce(NEW.created_at, now());
            NEW.created_by := coalesce(NEW.created_by, extreg_actor());
        END IF;
        NEW.updated_by := extreg_actor();
    ELSIF TG_TABLE_NAME = 'extension_versions' AND TG_OP = 'INSERT' THEN
        NEW.created_by := coalesce(NEW.created_by, extreg_actor());
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION extreg_audit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    action text;
    old_doc jsonb;
    new_doc jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO extension_audit_log (extension_id, action, old_values, new_values, changed_by)
        VALUES (NEW.id, 'create', NULL, to_jsonb(NEW), extreg_actor());
        RETURN NULL;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO extension_audit_log (extension_id, action, old_values, new_values, changed_by)
        VALUES (OLD.id, 'delete', to_jsonb(OLD), NULL, extreg_actor());
        RETURN NULL;
    END IF;
    old_doc := to_jsonb(OLD) - 'updated_at' - 'updated_by';
    new_doc := to_jsonb(NEW) - 'updated_at' - 'updated_by';
    IF old_doc = new_doc THEN
        RETURN NULL;  -- nothing but the stamp changed
    ELSIF old_doc - 'enabled' = new_doc - 'enabled' THEN
        action := CASE WHEN NEW.enabled THEN 'enable' ELSE 'disable' END;
    ELSE
        action := 'update';
    END IF;
    INSERT INTO extension_audit_log (extension_id, action, old_values, new_values, changed_by)
    VALUES (NEW.id, action, to_jsonb(OLD), to_jsonb(NEW), extreg_actor());
    RETURN NULL;
END $$;

-- One notification per changed extension id; '*' (after TRUNCATE) asks for a full reload.
CREATE OR REPLACE FUNCTION extreg_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    doc jsonb;
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        PERFORM pg_notify('extreg_changes', '*');
        RETURN NULL;
    END IF;
    doc := to_jsonb(coalesce(NEW, OLD));
    PERFORM pg_notify('extreg_changes', coalesce(doc ->> 'extension_id', doc ->> 'id'));
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS extreg_stamp ON extensions;
CREATE TRIGGER extreg_stamp BEFORE INSERT OR UPDATE ON extensions
    FOR EACH ROW EXECUTE FUNCTION extreg_stamp();
DROP TRIGGER IF EXISTS extreg_stamp ON extension_versions;
CREATE TRIGGER extreg_stamp BEFORE INSERT OR UPDATE ON extension_versions
    FOR EACH ROW EXECUTE FUNCTION extreg_stamp();
DROP TRIGGER IF EXISTS extreg_stamp ON extension_instances;
CREATE TRIGGER extreg_stamp BEFORE INSERT OR UPDATE ON extension_instances
    FOR EACH ROW EXECUTE FUNCTION extreg_stamp();

DROP TRIGGER IF EXISTS extreg_audit ON extensions;
CREATE TRIGGER extreg_audit AFTER INSERT OR UPDATE OR DELETE ON extensions
    FOR EACH ROW EXECUTE FUNCTION extreg_audit();

DROP TRIGGER IF EXISTS extreg_notify ON extensions;
CREATE TRIGGER extreg_notify AFTER INSERT OR UPDATE OR DELETE ON extensions
    FOR EACH ROW EXECUTE FUNCTION extreg_notify();
DROP TRIGGER IF EXISTS extreg_notify ON extension_versions;
CREATE TRIGGER extreg_notify AFTER INSERT OR UPDATE OR DELETE ON extension_versions
    FOR EACH ROW EXECUTE FUNCTION extreg_notify();
DROP TRIGGER IF EXISTS extreg_notify ON extension_instances;
CREATE TRIGGER extreg_notify AFTER INSERT OR UPDATE OR DELETE ON extension_instances
    FOR EACH ROW EXECUTE FUNCTION extreg_notify();

DROP TRIGGER IF EXISTS extreg_notify_truncate ON extensions;
CREATE TRIGGER extreg_notify_truncate AFTER TRUNCATE ON extensions
    FOR EACH STATEMENT EXECUTE FUNCTION extreg_notify();
