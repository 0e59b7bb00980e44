-- Bearer tokens of the admin API. Only a SHA-256 hash of each token is kept: tokens are 256
-- random bits, so a fast hash is as safe as a slow one and lets every request be checked in
-- microseconds (see extreg/auth.py). A revoked token keeps its row, so `extreg token list`
-- shows when it stopped working; its name may be reused by a new token.
CREATE TABLE IF NOT EXISTS extreg_api_tokens (
    name        varchar(64)  PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.@:-]*$'),
    role        varchar(16)  NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    token_hash  char(64)     NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    created_at  timestamptz  NOT NULL DEFAULT now(),
    created_by  varchar(255),
    revoked_at  timestamptz
);

-- Every change tells the running servers to re-read the table, so a revoke takes effect at
-- once instead of at the next periodic refresh.
CREATE OR REPLACE FUNCTION extreg_tokens_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('extreg_tokens', coalesce(NEW.name, OLD.name));
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS extreg_tokens_notify ON extreg_api_tokens;
CREATE TRIGGER extreg_tokens_notify AFTER INSERT OR UPDATE OR DELETE ON extreg_api_tokens
    FOR EACH ROW EXECUTE FUNCTION extreg_tokens_notify();
