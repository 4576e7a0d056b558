-- 0001_outbox.sql - schema `outbox`: transaction states, relay messages, inbox.
--
-- Forward-only.  Run it with `psql -v ON_ERROR_STOP=1 -f` or let
-- `outboxd db migrate` apply it; either way it is one transaction, and it
-- records itself in outbox.schema_version, so a second run fails cleanly
-- (nothing changes).  Needs a role that may create schemas in the database.
--
-- The three tables and who writes them:
--
--   outbox.transactions  the application, inside its own transaction, one
--                        row per transactional message (txid = the half
--                        message's txid).  outboxd only reads it, through
--                        outbox.check_transaction(), when it checks back.
--   outbox.messages      the application, for events it only writes as rows
--                        (relay mode).  outboxd reads them in id order,
--                        stores them, and deletes them.
--   outbox.inbox         consumers, to process each message once.
--
-- Why relaying is commit-order safe: outboxd never keeps a cursor over
-- outbox.messages.  It reads whatever rows are visible, oldest id first,
-- stores them and deletes them, so a row whose transaction commits late is
-- simply found by a later round; nothing can be skipped.  Per-key order:
-- the insert trigger takes a transaction-scoped advisory lock on
-- (topic, key) and only then draws the row's id, so two transactions
-- writing the same key are serialised from that insert to their commit,
-- and ids within a key follow commit order.  Different keys never wait on
-- each other.

BEGIN;

CREATE SCHEMA outbox;
COMMENT ON SCHEMA outbox IS
    'outboxd: transactional outbox (transaction states for check-backs, relay messages, consumer inbox)';

-- ---------------------------------------------------------------- versions
CREATE TABLE outbox.schema_version (
    version    integer     PRIMARY KEY CHECK (version > 0),
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE outbox.schema_version IS
    'One row per applied migration of sql/migrations; outboxd refuses a database newer than it knows';
COMMENT ON COLUMN outbox.schema_version.version IS 'Migration number (the file''s numeric prefix)';
COMMENT ON COLUMN outbox.schema_version.name IS 'Migration file name without .sql';
COMMENT ON COLUMN outbox.schema_version.applied_at IS 'When the migration was applied';

-- ---------------------------------------------------------------- transactions
CREATE TABLE outbox.transactions (
    txid       text        PRIMARY KEY
                           CONSTRAINT transactions_txid_format
                           CHECK (txid ~ '^[!-~]{1,128}$'),
    state      text        NOT NULL DEFAULT 'pending'
                           CONSTRAINT transactions_state_valid
                           CHECK (state IN ('pending', 'commit', 'rollback')),
    deadline   timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE outbox.transactions IS
    'Written by the application in its own transaction; read by outboxd to answer check-backs';
COMMENT ON COLUMN outbox.transactions.txid IS
    'The half message''s txid (printable ASCII, 1-128 bytes), e.g. the order id';
COMMENT ON COLUMN outbox.transactions.state IS
    'pending (not decided yet: checked again later), commit (publish) or rollback (drop)';
COMMENT ON COLUMN outbox.transactions.deadline IS
    'Optional: a pending transaction past its deadline is answered as rollback';
COMMENT ON COLUMN outbox.transactions.created_at IS 'When the row was written';
COMMENT ON COLUMN outbox.transactions.updated_at IS 'Last change (set by trigger); clean-up age';

CREATE INDEX transactions_resolved_idx ON outbox.transactions (updated_at)
    WHERE state <> 'pending';
COMMENT ON INDEX outbox.transactions_resolved_idx IS
    'Finds resolved rows for outbox.cleanup_transactions()';

CREATE FUNCTION outbox.touch_updated_at() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION outbox.touch_updated_at() IS
    'Trigger: keeps outbox.transactions.updated_at current';

CREATE TRIGGER transactions_touch BEFORE UPDATE ON outbox.transactions
    FOR EACH ROW EXECUTE FUNCTION outbox.touch_updated_at();
COMMENT ON TRIGGER transactions_touch ON outbox.transactions IS
    'Sets updated_at on every update';

-- The default check-back query is `SELECT outbox.check_transaction($1)`.
-- NULL (no row) means "not known yet": the application's transaction may
-- not have committed, so outboxd asks again later.
CREATE FUNCTION outbox.check_transaction(p_txid text) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
               WHEN t.state = 'pending' AND t.deadline IS NOT NULL
                    AND t.deadline <= now() THEN 'rollback'
               ELSE t.state
           END
      FROM outbox.transactions t
     WHERE t.txid = p_txid
$$;
COMMENT ON FUNCTION outbox.check_transaction(text) IS
    'Check-back answer for a txid: commit, rollback, pending, or NULL when there is no row; pending past its deadline is rollback';

CREATE FUNCTION outbox.cleanup_transactions(p_older_than interval) RETURNS bigint
    LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM outbox.transactions
         WHERE state <> 'pending' AND updated_at < now() - p_older_than
        RETURNING 1
    )
    SELECT count(*) FROM gone
$$;
COMMENT ON FUNCTION outbox.cleanup_transactions(interval) IS
    'Deletes resolved (commit/rollback) rows last changed longer ago than the interval; returns how many. Keep the interval longer than outboxd''s check schedule';

-- ---------------------------------------------------------------- messages (relay)
CREATE SEQUENCE outbox.messages_id_seq AS bigint;
COMMENT ON SEQUENCE outbox.messages_id_seq IS
    'Row ids of outbox.messages, drawn by the insert trigger after the key lock';

CREATE TABLE outbox.messages (
    id         bigint      PRIMARY KEY,
    msg_id     uuid        NOT NULL DEFAULT gen_random_uuid()
                           CONSTRAINT messages_msg_id_unique UNIQUE,
    topic      text        NOT NULL
                           CONSTRAINT messages_topic_format
                           CHECK (topic ~ '^[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}$'
                                  AND topic !~ '^__'),
    key        text        CONSTRAINT messages_key_length
                           CHECK (octet_length(key) <= 1024),
    tag        text        CONSTRAINT messages_tag_length
                           CHECK (octet_length(tag) <= 255),
    headers    jsonb       CONSTRAINT messages_headers_object
                           CHECK (headers IS NULL OR jsonb_typeof(headers) = 'object'),
    body       jsonb,
    body_bytes bytea,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT messages_one_body CHECK ((body IS NULL) <> (body_bytes IS NULL))
);
COMMENT ON TABLE outbox.messages IS
    'Relay mode: rows the application writes in its own transaction; outboxd publishes each into its store once and deletes it';
COMMENT ON COLUMN outbox.messages.id IS
    'Order of publication; assigned by the insert trigger (any value given is replaced)';
COMMENT ON COLUMN outbox.messages.msg_id IS
    'The published message''s id; outboxd stores a row once per id, so a replay after a crash is not stored twice';
COMMENT ON COLUMN outbox.messages.topic IS
    'Target topic: 1-127 bytes of [A-Za-z0-9._-], not starting with . or __';
COMMENT ON COLUMN outbox.messages.key IS
    'Optional message key: same key, same queue, commit order kept (at most 1024 bytes)';
COMMENT ON COLUMN outbox.messages.tag IS 'Optional tag for consumer filters (at most 255 bytes)';
COMMENT ON COLUMN outbox.messages.headers IS
    'Optional object of string values, published as message headers (traceparent kept)';
COMMENT ON COLUMN outbox.messages.body IS 'JSON body (stored compactly); exactly one of body, body_bytes';
COMMENT ON COLUMN outbox.messages.body_bytes IS 'Binary body; exactly one of body, body_bytes';
COMMENT ON COLUMN outbox.messages.created_at IS 'Insert time (clock_timestamp); relay lag is measured from it';

CREATE FUNCTION outbox.messages_before_insert() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    -- Same (topic, key): wait for the other writer's commit, then draw the
    -- id, so ids of one key follow commit order.  1869707361 is 'obxa'.
    IF NEW.key IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(1869707361, hashtext(NEW.topic || '/' || NEW.key));
    END IF;
    NEW.id := nextval('outbox.messages_id_seq');
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION outbox.messages_before_insert() IS
    'Trigger: serialises writers of one (topic, key) and assigns ids in their commit order';

CREATE TRIGGER messages_order BEFORE INSERT ON outbox.messages
    FOR EACH ROW EXECUTE FUNCTION outbox.messages_before_insert();
COMMENT ON TRIGGER messages_order ON outbox.messages IS
    'Per-key lock and id assignment (see outbox.messages_before_insert)';

CREATE FUNCTION outbox.messages_notify() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_messages', '');
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION outbox.messages_notify() IS
    'Trigger: wakes the relay (NOTIFY outbox_messages) when the inserting transaction commits';

CREATE TRIGGER messages_wake AFTER INSERT ON outbox.messages
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.messages_notify();
COMMENT ON TRIGGER messages_wake ON outbox.messages IS
    'One notification per statement; PostgreSQL folds duplicates within a transaction';

-- ---------------------------------------------------------------- inbox
CREATE TABLE outbox.inbox (
    consumer_group text        NOT NULL
                               CONSTRAINT inbox_group_length
                               CHECK (octet_length(consumer_group) BETWEEN 1 AND 255),
    msg_id         text        NOT NULL
                               CONSTRAINT inbox_msg_id_length
                               CHECK (octet_length(msg_id) BETWEEN 1 AND 255),
    claimed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, msg_id)
);
COMMENT ON TABLE outbox.inbox IS
    'Consumer de-duplication: one row per (group, message) processed';
COMMENT ON COLUMN outbox.inbox.consumer_group IS 'The consumer group (or any consumer name)';
COMMENT ON COLUMN outbox.inbox.msg_id IS 'The message id as delivered (msg_id)';
COMMENT ON COLUMN outbox.inbox.claimed_at IS 'When the message was first claimed; clean-up age';

CREATE INDEX inbox_claimed_at_idx ON outbox.inbox (claimed_at);
COMMENT ON INDEX outbox.inbox_claimed_at_idx IS 'Finds old entries for outbox.inbox_cleanup()';

CREATE FUNCTION outbox.inbox_claim(p_group text, p_msg_id text) RETURNS boolean
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox.inbox (consumer_group, msg_id) VALUES (p_group, p_msg_id)
        ON CONFLICT DO NOTHING;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION outbox.inbox_claim(text, text) IS
    'Call inside the consumer''s transaction: true the first time (process it), false for a duplicate (skip it). A rollback releases the claim';

CREATE FUNCTION outbox.inbox_cleanup(p_older_than interval) RETURNS bigint
    LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM outbox.inbox WHERE claimed_at < now() - p_older_than RETURNING 1
    )
    SELECT count(*) FROM gone
$$;
COMMENT ON FUNCTION outbox.inbox_cleanup(interval) IS
    'Deletes inbox entries claimed longer ago than the interval (keep it longer than any redelivery); returns how many';

-- ---------------------------------------------------------------- constraints
COMMENT ON CONSTRAINT schema_version_pkey ON outbox.schema_version IS 'One row per migration';
COMMENT ON CONSTRAINT schema_version_version_check ON outbox.schema_version IS 'Versions start at 1';
COMMENT ON CONSTRAINT transactions_pkey ON outbox.transactions IS 'One state per txid';
COMMENT ON CONSTRAINT transactions_txid_format ON outbox.transactions IS
    'txid as outboxd accepts it: 1-128 bytes of printable ASCII without spaces';
COMMENT ON CONSTRAINT transactions_state_valid ON outbox.transactions IS
    'The three answers a check-back understands';
COMMENT ON CONSTRAINT messages_pkey ON outbox.messages IS 'Relay order';
COMMENT ON CONSTRAINT messages_msg_id_unique ON outbox.messages IS
    'A message id is published once';
COMMENT ON CONSTRAINT messages_topic_format ON outbox.messages IS
    'Topic names outboxd accepts; __ names are internal';
COMMENT ON CONSTRAINT messages_key_length ON outbox.messages IS 'outboxd''s key limit (1024 bytes)';
COMMENT ON CONSTRAINT messages_tag_length ON outbox.messages IS 'outboxd''s tag limit (255 bytes)';
COMMENT ON CONSTRAINT messages_headers_object ON outbox.messages IS
    'Headers are a JSON object (its values must be strings; outboxd rejects others)';
COMMENT ON CONSTRAINT messages_one_body ON outbox.messages IS 'Exactly one of body, body_bytes';
COMMENT ON CONSTRAINT inbox_pkey ON outbox.inbox IS 'A message is claimed once per group';
COMMENT ON CONSTRAINT inbox_group_length ON outbox.inbox IS 'Group names of 1-255 bytes';
COMMENT ON CONSTRAINT inbox_msg_id_length ON outbox.inbox IS 'Message ids of 1-255 bytes';

INSERT INTO outbox.schema_version (version, name) VALUES (1, '0001_outbox');

COMMIT;
