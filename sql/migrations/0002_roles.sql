-- 0002_roles.sql - least-privilege group roles for outboxd and applications.
--
-- Forward-only, one transaction, records itself in outbox.schema_version.
-- Needs CREATEROLE (or a superuser).  Both roles are NOLOGIN groups: grant
-- them to the login roles you use, e.g.
--
--     CREATE ROLE orders_outboxd LOGIN PASSWORD '...' IN ROLE outbox_sidecar;
--     CREATE ROLE orders_app     LOGIN PASSWORD '...' IN ROLE outbox_app;
--
-- Roles are cluster-wide, so they are created only when missing: a second
-- database in the same cluster reuses them, and its grants are added here.
--
-- outbox_sidecar can do exactly what outboxd's queries need and nothing
-- else: answer check-backs (read outbox.transactions through
-- outbox.check_transaction), relay (read and delete outbox.messages), read
-- the schema version.  LISTEN and advisory locks need no grant.  A custom
-- check query over the application's own tables needs SELECT on them,
-- granted by the DBA.

BEGIN;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_sidecar') THEN
        CREATE ROLE outbox_sidecar NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_app') THEN
        CREATE ROLE outbox_app NOLOGIN;
    END IF;
END
$$;
COMMENT ON ROLE outbox_sidecar IS
    'outboxd: read transaction states, read and delete relay messages (grant to outboxd''s login role)';
COMMENT ON ROLE outbox_app IS
    'Applications: write transaction states and relay messages, use the inbox (grant to the application''s login role)';

-- Functions are executable by PUBLIC by default; here only by the roles
-- that need them.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON SCHEMA outbox FROM PUBLIC;

GRANT USAGE ON SCHEMA outbox TO outbox_sidecar, outbox_app;
GRANT SELECT ON outbox.schema_version TO outbox_sidecar, outbox_app;

-- outboxd
GRANT SELECT ON outbox.transactions TO outbox_sidecar;
GRANT EXECUTE ON FUNCTION outbox.check_transaction(text) TO outbox_sidecar;
GRANT SELECT, DELETE ON outbox.messages TO outbox_sidecar;

-- applications
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.transactions TO outbox_app;
GRANT EXECUTE ON FUNCTION outbox.check_transaction(text) TO outbox_app;
GRANT EXECUTE ON FUNCTION outbox.cleanup_transactions(interval) TO outbox_app;
GRANT SELECT, INSERT ON outbox.messages TO outbox_app;   -- SELECT: INSERT ... RETURNING msg_id
GRANT USAGE ON SEQUENCE outbox.messages_id_seq TO outbox_app;
GRANT SELECT, INSERT, DELETE ON outbox.inbox TO outbox_app;
GRANT EXECUTE ON FUNCTION outbox.inbox_claim(text, text) TO outbox_app;
GRANT EXECUTE ON FUNCTION outbox.inbox_cleanup(interval) TO outbox_app;
-- Trigger functions run with the inserting role's rights.
GRANT EXECUTE ON FUNCTION outbox.touch_updated_at() TO outbox_app;
GRANT EXECUTE ON FUNCTION outbox.messages_before_insert() TO outbox_app;
GRANT EXECUTE ON FUNCTION outbox.messages_notify() TO outbox_app;

INSERT INTO outbox.schema_version (version, name) VALUES (2, '0002_roles');

COMMIT;
