-- 01_schema.sql - the shape of schema `outbox` after every migration.
--
-- Pins what applications, outboxd and DBAs rely on: the objects and nothing
-- else (tables_are/functions_are fail on a stray object too), column types,
-- NULLability and defaults, keys, CHECK constraints by name (their names
-- appear in the errors applications see), indexes, triggers (timing, event,
-- level, function), function signatures and volatility, no SECURITY DEFINER
-- anywhere (every function runs with the caller's rights, which is what the
-- grants in 0002_roles.sql assume), and a COMMENT ON every schema object.
--
-- Run by tests/sql/pgtap.sh as the superuser in a database where every file
-- of sql/migrations/ has been applied.  Changes nothing (one transaction,
-- rolled back).

BEGIN;
SELECT plan(50);

-- ---------------------------------------------------------------- objects
SELECT has_schema('outbox', 'schema outbox exists');
SELECT tables_are('outbox', ARRAY['schema_version', 'transactions', 'messages', 'inbox'],
    'schema outbox has exactly the four tables');
SELECT sequences_are('outbox', ARRAY['messages_id_seq'],
    'schema outbox has exactly one sequence, messages_id_seq');
SELECT views_are('outbox', ARRAY[]::name[], 'schema outbox has no views');
SELECT functions_are('outbox',
    ARRAY['touch_updated_at', 'check_transaction', 'cleanup_transactions',
          'messages_before_insert', 'messages_notify', 'inbox_claim', 'inbox_cleanup'],
    'schema outbox has exactly the seven functions');

-- ---------------------------------------------------------------- columns
-- (name, type, NOT NULL, default) in column order, one assertion per table.
CREATE TEMP VIEW outbox_columns AS
SELECT c.relname::text AS tbl, a.attnum::int AS pos, a.attname::text COLLATE "default" AS col,
       format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS not_null,
       pg_get_expr(d.adbin, d.adrelid) COLLATE "default" AS dflt
  FROM pg_attribute a
  JOIN pg_class c ON c.oid = a.attrelid
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind = 'r'
   AND a.attnum > 0 AND NOT a.attisdropped;

SELECT results_eq(
    $$SELECT col, type, not_null, dflt FROM outbox_columns WHERE tbl = 'schema_version' ORDER BY pos$$,
    $$VALUES ('version', 'integer', true, NULL::text),
             ('name', 'text', true, NULL),
             ('applied_at', 'timestamp with time zone', true, 'now()')$$,
    'outbox.schema_version columns: types, NOT NULL, defaults');
SELECT results_eq(
    $$SELECT col, type, not_null, dflt FROM outbox_columns WHERE tbl = 'transactions' ORDER BY pos$$,
    $$VALUES ('txid', 'text', true, NULL::text),
             ('state', 'text', true, '''pending''::text'),
             ('deadline', 'timestamp with time zone', false, NULL),
             ('created_at', 'timestamp with time zone', true, 'now()'),
             ('updated_at', 'timestamp with time zone', true, 'now()')$$,
    'outbox.transactions columns: types, NOT NULL, defaults');
SELECT results_eq(
    $$SELECT col, type, not_null, dflt FROM outbox_columns WHERE tbl = 'messages' ORDER BY pos$$,
    $$VALUES ('id', 'bigint', true, NULL::text),
             ('msg_id', 'uuid', true, 'gen_random_uuid()'),
             ('topic', 'text', true, NULL),
             ('key', 'text', false, NULL),
             ('tag', 'text', false, NULL),
             ('headers', 'jsonb', false, NULL),
             ('body', 'jsonb', false, NULL),
             ('body_bytes', 'bytea', false, NULL),
             ('created_at', 'timestamp with time zone', true, 'clock_timestamp()')$$,
    'outbox.messages columns: types, NOT NULL, defaults (id has none: the trigger assigns it)');
SELECT results_eq(
    $$SELECT col, type, not_null, dflt FROM outbox_columns WHERE tbl = 'inbox' ORDER BY pos$$,
    $$VALUES ('consumer_group', 'text', true, NULL::text),
             ('msg_id', 'text', true, NULL),
             ('claimed_at', 'timestamp with time zone', true, 'now()')$$,
    'outbox.inbox columns: types, NOT NULL, defaults');

-- ---------------------------------------------------------------- keys
SELECT col_is_pk('outbox', 'schema_version', 'version', 'schema_version is keyed by version');
SELECT col_is_pk('outbox', 'transactions', 'txid', 'transactions is keyed by txid');
SELECT col_is_pk('outbox', 'messages', 'id', 'messages is keyed by id');
SELECT col_is_pk('outbox', 'inbox', ARRAY['consumer_group', 'msg_id'],
    'inbox is keyed by (consumer_group, msg_id)');
SELECT col_is_unique('outbox', 'messages', 'msg_id', 'messages.msg_id is unique');
SELECT is_empty(
    $$SELECT conname FROM pg_constraint
       WHERE connamespace = 'outbox'::regnamespace AND contype IN ('f', 'x', 't')$$,
    'no foreign keys, exclusion or constraint triggers: every table stands alone');
SELECT is((SELECT seqtypid::regtype::text FROM pg_sequence
            WHERE seqrelid = 'outbox.messages_id_seq'::regclass),
          'bigint', 'messages_id_seq is a bigint sequence');

-- ---------------------------------------------------------------- CHECK constraints
CREATE TEMP VIEW outbox_checks AS
SELECT conrelid::regclass::text AS tbl, conname::text COLLATE "default" AS name,
       pg_get_constraintdef(oid) COLLATE "default" AS def
  FROM pg_constraint
 WHERE connamespace = 'outbox'::regnamespace AND contype = 'c';

SELECT set_eq($$SELECT name FROM outbox_checks$$,
    ARRAY['schema_version_version_check', 'transactions_txid_format', 'transactions_state_valid',
          'messages_topic_format', 'messages_key_length', 'messages_tag_length',
          'messages_headers_object', 'messages_one_body', 'inbox_group_length',
          'inbox_msg_id_length'],
    'exactly the expected CHECK constraints, by name');
SELECT is((SELECT def FROM outbox_checks WHERE name = 'transactions_txid_format'),
    $$CHECK ((txid ~ '^[!-~]{1,128}$'::text))$$,
    'txid: 1-128 printable ASCII characters, no space');
SELECT is((SELECT def FROM outbox_checks WHERE name = 'transactions_state_valid'),
    $$CHECK ((state = ANY (ARRAY['pending'::text, 'commit'::text, 'rollback'::text])))$$,
    'state: pending, commit or rollback');
SELECT is((SELECT def FROM outbox_checks WHERE name = 'messages_topic_format'),
    $$CHECK (((topic ~ '^[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}$'::text) AND (topic !~ '^__'::text)))$$,
    'topic: the broker''s topic-name rule (1-127 bytes, no leading . or __)');
SELECT is((SELECT def FROM outbox_checks WHERE name = 'messages_key_length'),
    'CHECK ((octet_length(key) <= 1024))', 'key: at most 1024 bytes (BRK_KEY_MAX)');
SELECT is((SELECT def FROM outbox_checks WHERE name = 'messages_tag_length'),
    'CHECK ((octet_length(tag) <= 255))', 'tag: at most 255 bytes (BRK_TAG_MAX)');
SELECT is((SELECT def FROM outbox_checks WHERE name = 'messages_one_body'),
    'CHECK (((body IS NULL) <> (body_bytes IS NULL)))', 'exactly one of body, body_bytes');

-- ---------------------------------------------------------------- indexes
SELECT indexes_are('outbox', 'schema_version', ARRAY['schema_version_pkey'],
    'schema_version has only its primary key index');
SELECT indexes_are('outbox', 'transactions', ARRAY['transactions_pkey', 'transactions_resolved_idx'],
    'transactions has its key and the resolved-rows index');
SELECT indexes_are('outbox', 'messages', ARRAY['messages_pkey', 'messages_msg_id_unique'],
    'messages has its key and the msg_id index');
SELECT indexes_are('outbox', 'inbox', ARRAY['inbox_pkey', 'inbox_claimed_at_idx'],
    'inbox has its key and the claimed_at index');
SELECT is(pg_get_indexdef('outbox.transactions_resolved_idx'::regclass),
    $$CREATE INDEX transactions_resolved_idx ON outbox.transactions USING btree (updated_at) WHERE (state <> 'pending'::text)$$,
    'transactions_resolved_idx: partial index over updated_at of resolved rows (cleanup_transactions)');
SELECT is(pg_get_indexdef('outbox.inbox_claimed_at_idx'::regclass),
    'CREATE INDEX inbox_claimed_at_idx ON outbox.inbox USING btree (claimed_at)',
    'inbox_claimed_at_idx: btree over claimed_at (inbox_cleanup)');

-- ---------------------------------------------------------------- triggers
SELECT triggers_are('outbox', 'schema_version', ARRAY[]::name[], 'schema_version has no triggers');
SELECT triggers_are('outbox', 'transactions', ARRAY['transactions_touch'],
    'transactions has one trigger');
SELECT triggers_are('outbox', 'messages', ARRAY['messages_order', 'messages_wake'],
    'messages has two triggers');
SELECT triggers_are('outbox', 'inbox', ARRAY[]::name[], 'inbox has no triggers');
SELECT results_eq(
    $$SELECT event_object_table::text COLLATE "default", trigger_name::text COLLATE "default",
             action_timing::text COLLATE "default", event_manipulation::text COLLATE "default",
             action_orientation::text COLLATE "default", action_statement::text COLLATE "default"
        FROM information_schema.triggers
       WHERE trigger_schema = 'outbox'
       ORDER BY 1, 2$$,
    $$VALUES ('messages', 'messages_order', 'BEFORE', 'INSERT', 'ROW',
              'EXECUTE FUNCTION outbox.messages_before_insert()'),
             ('messages', 'messages_wake', 'AFTER', 'INSERT', 'STATEMENT',
              'EXECUTE FUNCTION outbox.messages_notify()'),
             ('transactions', 'transactions_touch', 'BEFORE', 'UPDATE', 'ROW',
              'EXECUTE FUNCTION outbox.touch_updated_at()')$$,
    'triggers: timing, event, level and function');
SELECT is_empty(
    $$SELECT tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
       WHERE c.relnamespace = 'outbox'::regnamespace AND NOT t.tgisinternal AND t.tgenabled <> 'O'$$,
    'every trigger is enabled');

-- ---------------------------------------------------------------- functions
SELECT function_returns('outbox', 'check_transaction', ARRAY['text'], 'text',
    'check_transaction(text) returns text');
SELECT function_returns('outbox', 'cleanup_transactions', ARRAY['interval'], 'bigint',
    'cleanup_transactions(interval) returns bigint');
SELECT function_returns('outbox', 'inbox_claim', ARRAY['text', 'text'], 'boolean',
    'inbox_claim(text, text) returns boolean');
SELECT function_returns('outbox', 'inbox_cleanup', ARRAY['interval'], 'bigint',
    'inbox_cleanup(interval) returns bigint');
SELECT function_returns('outbox', 'touch_updated_at', ARRAY[]::name[], 'trigger',
    'touch_updated_at() is a trigger function');
SELECT function_returns('outbox', 'messages_before_insert', ARRAY[]::name[], 'trigger',
    'messages_before_insert() is a trigger function');
SELECT function_returns('outbox', 'messages_notify', ARRAY[]::name[], 'trigger',
    'messages_notify() is a trigger function');
SELECT volatility_is('outbox', 'check_transaction', ARRAY['text'], 'stable',
    'check_transaction is STABLE (a read; usable in a prepared SELECT)');
SELECT volatility_is('outbox', 'cleanup_transactions', ARRAY['interval'], 'volatile',
    'cleanup_transactions is VOLATILE (it deletes)');
SELECT volatility_is('outbox', 'inbox_claim', ARRAY['text', 'text'], 'volatile',
    'inbox_claim is VOLATILE (it inserts)');
SELECT is_empty(
    $$SELECT p.oid::regprocedure::text FROM pg_proc p
       WHERE p.pronamespace = 'outbox'::regnamespace AND p.prosecdef$$,
    'no SECURITY DEFINER function: every function runs with the caller''s privileges');
SELECT is_empty(
    $$SELECT p.oid::regprocedure::text FROM pg_proc p
       WHERE p.pronamespace = 'outbox'::regnamespace
         AND p.prolang NOT IN (SELECT oid FROM pg_language WHERE lanname IN ('sql', 'plpgsql'))$$,
    'every function is SQL or PL/pgSQL (nothing to compile or install)');

-- ---------------------------------------------------------------- comments
-- Every schema object a DBA browses carries a COMMENT ON.  Indexes that
-- only implement a constraint (primary keys, UNIQUE) are described by the
-- constraint's comment.
SELECT is_empty($$
    SELECT 'schema outbox' WHERE obj_description('outbox'::regnamespace, 'pg_namespace') IS NULL
    UNION ALL
    SELECT CASE c.relkind WHEN 'r' THEN 'table ' WHEN 'S' THEN 'sequence '
                          WHEN 'i' THEN 'index ' ELSE 'relation ' END || c.relname
      FROM pg_class c
     WHERE c.relnamespace = 'outbox'::regnamespace
       AND NOT EXISTS (SELECT FROM pg_constraint k WHERE k.conindid = c.oid AND c.relkind = 'i')
       AND obj_description(c.oid, 'pg_class') IS NULL
    UNION ALL
    SELECT 'column ' || c.relname || '.' || a.attname
      FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
     WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind = 'r'
       AND a.attnum > 0 AND NOT a.attisdropped
       AND col_description(c.oid, a.attnum) IS NULL
    UNION ALL
    SELECT 'function ' || p.oid::regprocedure::text
      FROM pg_proc p
     WHERE p.pronamespace = 'outbox'::regnamespace
       AND obj_description(p.oid, 'pg_proc') IS NULL
    UNION ALL
    SELECT 'trigger ' || t.tgname || ' on ' || c.relname
      FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
     WHERE c.relnamespace = 'outbox'::regnamespace AND NOT t.tgisinternal
       AND obj_description(t.oid, 'pg_trigger') IS NULL
    UNION ALL
    SELECT 'constraint ' || k.conname
      FROM pg_constraint k
     WHERE k.connamespace = 'outbox'::regnamespace
       AND obj_description(k.oid, 'pg_constraint') IS NULL
$$, 'every schema, table, sequence, index, constraint, column, function and trigger in outbox has a comment');
SELECT is_empty(
    $$SELECT rolname FROM pg_roles
       WHERE rolname IN ('outbox_sidecar', 'outbox_app')
         AND shobj_description(oid, 'pg_authid') IS NULL$$,
    'both roles have a comment');
-- The comment check above must have something to check.
SELECT cmp_ok(
    (SELECT count(*)::int FROM pg_description d JOIN pg_class c ON c.oid = d.objoid
      WHERE d.classoid = 'pg_class'::regclass AND c.relnamespace = 'outbox'::regnamespace),
    '>=', 27, 'pg_description holds the comments of schema outbox (tables, columns, indexes)');

SELECT * FROM finish();
ROLLBACK;
