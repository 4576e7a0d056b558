-- 03_roles.sql - least privilege: what outbox_sidecar and outbox_app may do.
--
-- Two kinds of assertions.  The complete privilege sets of both group roles
-- (and of PUBLIC, seen through a login role that belongs to neither) over
-- every table, sequence, function and the schema, from has_*_privilege, so a
-- grant added anywhere in schema outbox shows up here.  And behaviour: the
-- statements outboxd and applications run, executed under SET ROLE to a
-- login role that is a member (as in production), succeed; everything else
-- fails with 42501 (insufficient_privilege).
--
-- Login roles (created by tests/sql/pgtap.sh; roles are cluster-wide):
--   pgtap_sidecar  LOGIN, member of outbox_sidecar
--   pgtap_app      LOGIN, member of outbox_app
--   pgtap_nobody   LOGIN, member of neither (what PUBLIC gets)
--
-- Run as the superuser; one transaction, rolled back.

BEGIN;
SELECT plan(88);

-- ---------------------------------------------------------------- fixtures
CREATE TABLE public.orders (id text PRIMARY KEY, status text NOT NULL);
INSERT INTO public.orders VALUES ('o-paid', 'paid'), ('o-new', 'new'), ('o-cancelled', 'cancelled');
INSERT INTO outbox.transactions (txid, state) VALUES ('r-commit', 'commit'), ('r-pending', 'pending');
INSERT INTO outbox.messages (topic, key, body)
    SELECT 'orders', 'k' || g, jsonb_build_object('n', g) FROM generate_series(1, 3) g;
INSERT INTO outbox.inbox (consumer_group, msg_id) VALUES ('billing', 'm-1');

-- Every privilege a role holds on schema outbox and its objects, directly,
-- through a group or through PUBLIC.
CREATE TEMP VIEW outbox_privs AS
SELECT r.role, 'schema outbox' AS obj, p.priv
  FROM (VALUES ('outbox_sidecar'), ('outbox_app'), ('pgtap_nobody')) r(role)
 CROSS JOIN unnest(ARRAY['USAGE', 'CREATE']) p(priv)
 WHERE has_schema_privilege(r.role, 'outbox', p.priv)
UNION ALL
SELECT r.role, 'table ' || c.relname COLLATE "default", p.priv
  FROM (VALUES ('outbox_sidecar'), ('outbox_app'), ('pgtap_nobody')) r(role)
 CROSS JOIN pg_class c
 CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) p(priv)
 WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
   AND has_table_privilege(r.role, c.oid, p.priv)
UNION ALL
SELECT r.role, 'sequence ' || c.relname COLLATE "default", p.priv
  FROM (VALUES ('outbox_sidecar'), ('outbox_app'), ('pgtap_nobody')) r(role)
 CROSS JOIN pg_class c
 CROSS JOIN unnest(ARRAY['USAGE', 'SELECT', 'UPDATE']) p(priv)
 WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind = 'S'
   AND has_sequence_privilege(r.role, c.oid, p.priv)
UNION ALL
SELECT r.role, 'function ' || (f.oid::regprocedure::text COLLATE "default"), 'EXECUTE'
  FROM (VALUES ('outbox_sidecar'), ('outbox_app'), ('pgtap_nobody')) r(role)
 CROSS JOIN pg_proc f
 WHERE f.pronamespace = 'outbox'::regnamespace
   AND has_function_privilege(r.role, f.oid, 'EXECUTE');

-- ---------------------------------------------------------------- the roles themselves
SELECT results_eq(
    $$SELECT rolname::text COLLATE "default", rolcanlogin, rolsuper, rolcreaterole, rolcreatedb,
             rolreplication, rolbypassrls, rolinherit
        FROM pg_roles WHERE rolname IN ('outbox_app', 'outbox_sidecar') ORDER BY 1$$,
    $$VALUES ('outbox_app', false, false, false, false, false, false, true),
             ('outbox_sidecar', false, false, false, false, false, false, true)$$,
    'both roles are plain NOLOGIN groups with no special attributes');
SELECT is_empty(
    $$SELECT member::regrole::text FROM pg_auth_members
       WHERE member IN ('outbox_sidecar'::regrole, 'outbox_app'::regrole)$$,
    'neither group role is itself a member of any role');
SELECT is_member_of('outbox_sidecar', ARRAY['pgtap_sidecar'], 'the test login role pgtap_sidecar is in outbox_sidecar');
SELECT is_member_of('outbox_app', ARRAY['pgtap_app'], 'the test login role pgtap_app is in outbox_app');
SELECT isnt_member_of('outbox_app', ARRAY['pgtap_sidecar'], 'outbox_sidecar''s login role is not an application');

-- ---------------------------------------------------------------- complete privilege sets
SELECT set_eq(
    $$SELECT obj, priv FROM outbox_privs WHERE role = 'outbox_sidecar'$$,
    $$VALUES ('schema outbox', 'USAGE'),
             ('table schema_version', 'SELECT'),
             ('table transactions', 'SELECT'),
             ('table messages', 'SELECT'), ('table messages', 'DELETE'),
             ('function outbox.check_transaction(text)', 'EXECUTE')$$,
    'outbox_sidecar holds exactly what outboxd''s queries need in schema outbox');
SELECT set_eq(
    $$SELECT obj, priv FROM outbox_privs WHERE role = 'outbox_app'$$,
    $$VALUES ('schema outbox', 'USAGE'),
             ('table schema_version', 'SELECT'),
             ('table transactions', 'SELECT'), ('table transactions', 'INSERT'),
             ('table transactions', 'UPDATE'), ('table transactions', 'DELETE'),
             ('table messages', 'SELECT'), ('table messages', 'INSERT'),
             ('table inbox', 'SELECT'), ('table inbox', 'INSERT'), ('table inbox', 'DELETE'),
             ('sequence messages_id_seq', 'USAGE'),
             ('function outbox.check_transaction(text)', 'EXECUTE'),
             ('function outbox.cleanup_transactions(interval)', 'EXECUTE'),
             ('function outbox.inbox_claim(text,text)', 'EXECUTE'),
             ('function outbox.inbox_cleanup(interval)', 'EXECUTE'),
             ('function outbox.touch_updated_at()', 'EXECUTE'),
             ('function outbox.messages_before_insert()', 'EXECUTE'),
             ('function outbox.messages_notify()', 'EXECUTE')$$,
    'outbox_app holds exactly what applications need in schema outbox');
SELECT is_empty(
    $$SELECT obj, priv FROM outbox_privs WHERE role = 'pgtap_nobody'$$,
    'PUBLIC holds nothing in schema outbox (not even EXECUTE on its functions)');
SELECT is_empty(
    $$SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
       WHERE c.relnamespace = 'outbox'::regnamespace AND a.attacl IS NOT NULL$$,
    'no column-level grants hide beside the table grants');
SELECT is(has_schema_privilege('public', 'public', 'CREATE'), false,
    'PUBLIC may not create in schema public (the PostgreSQL 15 default; revoke it on upgraded clusters)');
SELECT is(has_schema_privilege('outbox_sidecar', 'public', 'CREATE'), false,
    'outbox_sidecar may not create in schema public');
SELECT is(has_database_privilege('outbox_sidecar', current_database(), 'CREATE'), false,
    'outbox_sidecar may not create schemas in the database');
SELECT is(has_table_privilege('outbox_sidecar', 'public.orders', 'SELECT'), false,
    'outbox_sidecar cannot read the application''s own tables unless the DBA grants it');

-- ---------------------------------------------------------------- as outboxd
SET ROLE pgtap_sidecar;
SELECT is(current_user::text, 'pgtap_sidecar', 'now running as outboxd''s login role');

PREPARE outboxd_check(text) AS SELECT outbox.check_transaction($1);
SELECT results_eq('EXECUTE outboxd_check(''r-commit'')', ARRAY['commit'],
    'outboxd: the default check-back query answers commit');
SELECT results_eq('EXECUTE outboxd_check(''r-pending'')', ARRAY['pending'],
    'outboxd: the default check-back query answers pending');
SELECT results_eq('EXECUTE outboxd_check(''r-none'')', ARRAY[NULL::text],
    'outboxd: the default check-back query answers NULL for an unknown txid');
SELECT results_eq($$SELECT state FROM outbox.transactions WHERE txid = 'r-commit'$$, ARRAY['commit'],
    'outboxd: may SELECT outbox.transactions');
SELECT results_eq('SELECT version FROM outbox.schema_version ORDER BY version', ARRAY[1, 2],
    'outboxd: may read outbox.schema_version');
SELECT lives_ok($$SELECT id, msg_id, topic, key, tag, headers, body, body_bytes, created_at
                    FROM outbox.messages ORDER BY id LIMIT 500$$,
    'outboxd: may read a relay batch of outbox.messages');
SELECT lives_ok($$DELETE FROM outbox.messages WHERE id IN (SELECT id FROM outbox.messages WHERE key = 'k1')$$,
    'outboxd: may DELETE relayed rows of outbox.messages');
SELECT is((SELECT count(*) FROM outbox.messages WHERE key IN ('k1', 'k2', 'k3')), 2::bigint,
    'outboxd: the DELETE removed the row');
SELECT lives_ok('LISTEN outbox_messages', 'outboxd: may LISTEN outbox_messages (no grant needed)');
SELECT lives_ok('UNLISTEN outbox_messages', 'outboxd: may UNLISTEN');
SELECT is(pg_try_advisory_lock(1869707362, 0), true,
    'outboxd: may take the relay''s leadership advisory lock (no grant needed)');
SELECT is(pg_advisory_unlock(1869707362, 0), true, 'outboxd: and release it');

SELECT throws_ok($$INSERT INTO outbox.transactions (txid) VALUES ('x')$$, '42501', NULL,
    'outboxd: cannot INSERT into outbox.transactions');
SELECT throws_ok($$UPDATE outbox.transactions SET state = 'commit' WHERE txid = 'r-pending'$$, '42501', NULL,
    'outboxd: cannot UPDATE outbox.transactions (it never decides a transaction)');
SELECT throws_ok($$DELETE FROM outbox.transactions$$, '42501', NULL,
    'outboxd: cannot DELETE from outbox.transactions');
SELECT throws_ok($$TRUNCATE outbox.transactions$$, '42501', NULL,
    'outboxd: cannot TRUNCATE outbox.transactions');
SELECT throws_ok($$SELECT outbox.cleanup_transactions('1 day')$$, '42501', NULL,
    'outboxd: cannot run outbox.cleanup_transactions');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, body) VALUES ('t', '{}')$$, '42501', NULL,
    'outboxd: cannot INSERT into outbox.messages');
SELECT throws_ok($$UPDATE outbox.messages SET topic = 'other'$$, '42501', NULL,
    'outboxd: cannot UPDATE outbox.messages');
SELECT throws_ok($$TRUNCATE outbox.messages$$, '42501', NULL,
    'outboxd: cannot TRUNCATE outbox.messages');
SELECT throws_ok($$SELECT nextval('outbox.messages_id_seq')$$, '42501', NULL,
    'outboxd: cannot use the id sequence');
SELECT throws_ok($$SELECT setval('outbox.messages_id_seq', 1)$$, '42501', NULL,
    'outboxd: cannot set the id sequence');
SELECT throws_ok($$SELECT * FROM outbox.inbox$$, '42501', NULL,
    'outboxd: cannot read outbox.inbox');
SELECT throws_ok($$INSERT INTO outbox.inbox (consumer_group, msg_id) VALUES ('g', 'm')$$, '42501', NULL,
    'outboxd: cannot write outbox.inbox');
SELECT throws_ok($$DELETE FROM outbox.inbox$$, '42501', NULL,
    'outboxd: cannot delete from outbox.inbox');
SELECT throws_ok($$SELECT outbox.inbox_claim('g', 'm')$$, '42501', NULL,
    'outboxd: cannot run outbox.inbox_claim');
SELECT throws_ok($$SELECT outbox.inbox_cleanup('1 day')$$, '42501', NULL,
    'outboxd: cannot run outbox.inbox_cleanup');
SELECT throws_ok($$INSERT INTO outbox.schema_version (version, name) VALUES (99, 'x')$$, '42501', NULL,
    'outboxd: cannot record a schema version');
SELECT throws_ok($$DELETE FROM outbox.schema_version$$, '42501', NULL,
    'outboxd: cannot erase schema versions');
SELECT throws_ok($$CREATE TABLE outbox.sidecar_table (x int)$$, '42501', NULL,
    'outboxd: cannot create a table in schema outbox');
SELECT throws_ok($$CREATE FUNCTION outbox.sidecar_fn() RETURNS int LANGUAGE sql AS 'SELECT 1'$$, '42501', NULL,
    'outboxd: cannot create a function in schema outbox');
SELECT throws_ok($$CREATE TABLE public.sidecar_table (x int)$$, '42501', NULL,
    'outboxd: cannot create a table in schema public');
SELECT throws_ok($$CREATE SCHEMA sidecar_schema$$, '42501', NULL,
    'outboxd: cannot create a schema');
SELECT throws_ok($$ALTER TABLE outbox.messages ADD COLUMN x int$$, '42501', NULL,
    'outboxd: cannot alter outbox.messages');
SELECT throws_ok($$DROP TABLE outbox.transactions$$, '42501', NULL,
    'outboxd: cannot drop outbox.transactions');
SELECT throws_ok($$SELECT * FROM public.orders$$, '42501', NULL,
    'outboxd: cannot read a table the DBA made in schema public');
-- (SET ROLE is checked against the session user, the superuser here, so
-- membership is what is asserted.)
SELECT is(pg_has_role('pgtap_sidecar', 'outbox_app', 'MEMBER'), false,
    'outboxd: cannot become outbox_app');

-- The DBA grants SELECT on the application's table: a custom check query
-- then answers from it, with no outbox table involved.
RESET ROLE;
GRANT SELECT ON public.orders TO outbox_sidecar;
SET ROLE pgtap_sidecar;
PREPARE orders_check(text) AS
    SELECT CASE status WHEN 'paid' THEN 'commit' WHEN 'cancelled' THEN 'rollback'
                       ELSE 'pending' END
      FROM public.orders WHERE id = $1;
SELECT results_eq('EXECUTE orders_check(''o-paid'')', ARRAY['commit'],
    'custom check query over orders.status (granted): paid is commit');
SELECT results_eq('EXECUTE orders_check(''o-cancelled'')', ARRAY['rollback'],
    'custom check query: cancelled is rollback');
SELECT results_eq('EXECUTE orders_check(''o-new'')', ARRAY['pending'],
    'custom check query: anything else is pending');
SELECT is_empty('EXECUTE orders_check(''o-missing'')',
    'custom check query: no row for an order not (yet) visible');
SELECT throws_ok($$UPDATE public.orders SET status = 'paid'$$, '42501', NULL,
    'outboxd: SELECT on orders does not let it change orders');
RESET ROLE;

-- ---------------------------------------------------------------- as the application
SET ROLE pgtap_app;
SELECT is(current_user::text, 'pgtap_app', 'now running as the application''s login role');

SELECT lives_ok($$INSERT INTO outbox.transactions (txid, deadline) VALUES ('a-1', now() + interval '15 minutes')$$,
    'app: may INSERT a pending transaction with a deadline');
SELECT lives_ok($$UPDATE outbox.transactions SET state = 'commit' WHERE txid = 'a-1'$$,
    'app: may UPDATE it to commit (the update trigger runs with the app''s rights)');
SELECT is(outbox.check_transaction('a-1'), 'commit', 'app: may call check_transaction');
SELECT lives_ok($$DELETE FROM outbox.transactions WHERE txid = 'a-1'$$,
    'app: may DELETE its transaction rows');
WITH ins AS (
    INSERT INTO outbox.messages (topic, key, body)
    VALUES ('orders', 'o-9', '{"event": "placed"}') RETURNING msg_id
) SELECT isnt((SELECT msg_id::text FROM ins), NULL,
    'app: may INSERT into outbox.messages ... RETURNING msg_id (trigger: key lock + id)');
SELECT lives_ok($$INSERT INTO outbox.messages (topic, body_bytes) VALUES ('blobs', '\x0102')$$,
    'app: may INSERT a row without a key');
SELECT lives_ok($$SELECT count(*) FROM outbox.messages$$, 'app: may read outbox.messages');
SELECT is(outbox.inbox_claim('billing', 'm-2'), true, 'app: inbox_claim of a new message is true');
SELECT is(outbox.inbox_claim('billing', 'm-1'), false, 'app: inbox_claim of a processed message is false');
SELECT lives_ok($$SELECT * FROM outbox.inbox WHERE consumer_group = 'billing'$$, 'app: may read outbox.inbox');
SELECT lives_ok($$SELECT outbox.inbox_cleanup('30 days')$$, 'app: may run inbox_cleanup');
SELECT lives_ok($$SELECT outbox.cleanup_transactions('7 days')$$, 'app: may run cleanup_transactions');
SELECT lives_ok($$DELETE FROM outbox.inbox WHERE consumer_group = 'billing' AND msg_id = 'm-2'$$,
    'app: may DELETE an inbox entry (to release a claim by hand)');
SELECT results_eq('SELECT max(version) FROM outbox.schema_version', ARRAY[2],
    'app: may read outbox.schema_version');
SELECT lives_ok('LISTEN outbox_messages', 'app: may LISTEN');

SELECT throws_ok($$DELETE FROM outbox.messages$$, '42501', NULL,
    'app: cannot DELETE from outbox.messages (publishing is outboxd''s job)');
SELECT throws_ok($$UPDATE outbox.messages SET topic = 'other'$$, '42501', NULL,
    'app: cannot UPDATE outbox.messages (a written event is final)');
SELECT throws_ok($$TRUNCATE outbox.messages$$, '42501', NULL, 'app: cannot TRUNCATE outbox.messages');
SELECT throws_ok($$TRUNCATE outbox.transactions$$, '42501', NULL, 'app: cannot TRUNCATE outbox.transactions');
SELECT throws_ok($$UPDATE outbox.inbox SET claimed_at = now()$$, '42501', NULL,
    'app: cannot UPDATE outbox.inbox');
SELECT throws_ok($$SELECT setval('outbox.messages_id_seq', 1)$$, '42501', NULL,
    'app: cannot set the id sequence back');
SELECT throws_ok($$INSERT INTO outbox.schema_version (version, name) VALUES (99, 'x')$$, '42501', NULL,
    'app: cannot record a schema version');
SELECT throws_ok($$UPDATE outbox.schema_version SET name = 'x'$$, '42501', NULL,
    'app: cannot change schema versions');
SELECT throws_ok($$CREATE TABLE outbox.app_table (x int)$$, '42501', NULL,
    'app: cannot create a table in schema outbox');
SELECT throws_ok($$DROP TABLE outbox.messages$$, '42501', NULL, 'app: cannot drop outbox.messages');
SELECT throws_ok($$ALTER TABLE outbox.transactions DISABLE TRIGGER transactions_touch$$, '42501', NULL,
    'app: cannot disable the triggers');
SELECT is(pg_has_role('pgtap_app', 'outbox_sidecar', 'MEMBER'), false, 'app: cannot become outbox_sidecar');
RESET ROLE;

-- ---------------------------------------------------------------- as anyone else
SET ROLE pgtap_nobody;
SELECT throws_ok($$SELECT outbox.check_transaction('r-commit')$$, '42501', NULL,
    'a role in neither group cannot call check_transaction');
SELECT throws_ok($$SELECT * FROM outbox.transactions$$, '42501', NULL,
    'a role in neither group cannot read outbox.transactions');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, body) VALUES ('t', '{}')$$, '42501', NULL,
    'a role in neither group cannot write outbox.messages');
SELECT throws_ok($$SELECT outbox.inbox_claim('g', 'm')$$, '42501', NULL,
    'a role in neither group cannot claim inbox entries');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;
