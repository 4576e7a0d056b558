-- 02_functions.sql - behaviour of the functions, triggers and constraints.
--
-- check_transaction: the check-back answer for every state, no row, NULL,
-- deadlines.  cleanup_transactions / inbox_cleanup: delete only what is old
-- enough (and, for transactions, resolved) and return the count.
-- inbox_claim: first claim true, duplicate false, per consumer group, a
-- rolled-back claim is released.  Constraints: every rule an application
-- can break gets its SQLSTATE and the constraint's name.  messages: the
-- trigger assigns ids (ignoring a given one) in increasing order, and a
-- keyed insert holds the per-(topic, key) advisory lock until the end of the
-- transaction: a second session writing the same key waits (shown with
-- lock_timeout, so nothing depends on timing), other keys and unkeyed rows
-- do not.
--
-- Run by tests/sql/pgtap.sh as the superuser (needs the dblink extension for
-- the second session, which connects back over TCP to the same server).
-- One transaction, rolled back: it leaves nothing behind.

BEGIN;
SELECT plan(89);

-- ---------------------------------------------------------------- check_transaction
INSERT INTO outbox.transactions (txid, state, deadline) VALUES
    ('c-commit', 'commit', NULL),
    ('c-rollback', 'rollback', NULL),
    ('c-pending', 'pending', NULL),
    ('c-late', 'pending', now() - interval '1 second'),
    ('c-due-now', 'pending', now()),
    ('c-future', 'pending', now() + interval '1 hour'),
    ('c-commit-late', 'commit', now() - interval '1 hour'),
    ('c-rollback-future', 'rollback', now() + interval '1 hour');
INSERT INTO outbox.transactions (txid) VALUES ('c-default');
INSERT INTO outbox.transactions (txid, state)
    VALUES ($$o'k";--/*x*/\$1%_$$, 'commit');

SELECT is(outbox.check_transaction('c-commit'), 'commit', 'check_transaction: commit');
SELECT is(outbox.check_transaction('c-rollback'), 'rollback', 'check_transaction: rollback');
SELECT is(outbox.check_transaction('c-pending'), 'pending', 'check_transaction: pending without deadline');
SELECT is(outbox.check_transaction('c-default'), 'pending', 'a row written with only its txid is pending');
SELECT is(outbox.check_transaction('no-such-txid'), NULL,
    'check_transaction: no row is NULL (unknown: the writer may not have committed)');
SELECT is(outbox.check_transaction(NULL), NULL, 'check_transaction(NULL) is NULL');
SELECT is(outbox.check_transaction('c-late'), 'rollback', 'pending past its deadline answers rollback');
SELECT is(outbox.check_transaction('c-due-now'), 'rollback', 'pending at exactly its deadline answers rollback');
SELECT is(outbox.check_transaction('c-future'), 'pending', 'pending before its deadline stays pending');
SELECT is(outbox.check_transaction('c-commit-late'), 'commit', 'a deadline does not undo a commit');
SELECT is(outbox.check_transaction('c-rollback-future'), 'rollback', 'a future deadline does not undo a rollback');
SELECT is(outbox.check_transaction($$o'k";--/*x*/\$1%_$$), 'commit',
    'a txid full of SQL metacharacters is just a value');
SELECT is(outbox.check_transaction('C-COMMIT'), NULL, 'txids are case-sensitive');
SELECT is((SELECT state FROM outbox.transactions WHERE txid = 'c-late'), 'pending',
    'check_transaction only answers: the late row itself stays pending');

-- ---------------------------------------------------------------- updated_at trigger
INSERT INTO outbox.transactions (txid, created_at, updated_at)
    VALUES ('u-1', now() - interval '2 days', now() - interval '2 days');
UPDATE outbox.transactions SET state = 'commit' WHERE txid = 'u-1';
SELECT is((SELECT updated_at FROM outbox.transactions WHERE txid = 'u-1'), now(),
    'an UPDATE sets updated_at to now()');
SELECT is((SELECT created_at FROM outbox.transactions WHERE txid = 'u-1'), now() - interval '2 days',
    'an UPDATE leaves created_at alone');
UPDATE outbox.transactions SET updated_at = now() - interval '9 days' WHERE txid = 'u-1';
SELECT is((SELECT updated_at FROM outbox.transactions WHERE txid = 'u-1'), now(),
    'updated_at cannot be set back by an UPDATE (clean-up age is honest)');

-- ---------------------------------------------------------------- cleanup_transactions
-- The trigger only runs on UPDATE, so old ages are written directly.
INSERT INTO outbox.transactions (txid, state, updated_at) VALUES
    ('k-commit-old', 'commit', now() - interval '8 days'),
    ('k-rollback-old', 'rollback', now() - interval '30 days'),
    ('k-pending-old', 'pending', now() - interval '30 days'),
    ('k-pending-old-deadline', 'pending', now() - interval '30 days'),
    ('k-commit-edge', 'commit', now() - interval '7 days'),
    ('k-commit-young', 'commit', now() - interval '6 days');
UPDATE outbox.transactions SET deadline = now() - interval '29 days' WHERE txid = 'k-pending-old-deadline';

SELECT is(outbox.cleanup_transactions('7 days'), 2::bigint,
    'cleanup_transactions returns how many rows it deleted');
SELECT set_eq(
    $$SELECT txid FROM outbox.transactions WHERE txid LIKE 'k-%'$$,
    ARRAY['k-pending-old', 'k-pending-old-deadline', 'k-commit-edge', 'k-commit-young'],
    'only resolved rows strictly older than the interval are deleted; pending rows never');
SELECT is((SELECT count(*) FROM outbox.transactions WHERE txid LIKE 'c-%'), 9::bigint,
    'young resolved rows are kept');
SELECT is(outbox.cleanup_transactions('7 days'), 0::bigint, 'a second clean-up finds nothing');

-- ---------------------------------------------------------------- transactions constraints
SELECT lives_ok($$INSERT INTO outbox.transactions (txid) VALUES (repeat('x', 128))$$,
    'a 128-byte txid is accepted');
SELECT lives_ok($$INSERT INTO outbox.transactions (txid) VALUES ('!~{}[]"''\`')$$,
    'any printable ASCII is accepted in a txid');
SELECT throws_ok($$INSERT INTO outbox.transactions (txid) VALUES (repeat('x', 129))$$,
    '23514', 'new row for relation "transactions" violates check constraint "transactions_txid_format"',
    'a 129-byte txid is refused');
SELECT throws_ok($$INSERT INTO outbox.transactions (txid) VALUES ('')$$,
    '23514', 'new row for relation "transactions" violates check constraint "transactions_txid_format"',
    'an empty txid is refused');
SELECT throws_ok($$INSERT INTO outbox.transactions (txid) VALUES ('order 42')$$,
    '23514', 'new row for relation "transactions" violates check constraint "transactions_txid_format"',
    'a txid with a space is refused');
SELECT throws_ok($$INSERT INTO outbox.transactions (txid) VALUES (E'order\t42')$$,
    '23514', 'new row for relation "transactions" violates check constraint "transactions_txid_format"',
    'a txid with a control character is refused');
SELECT throws_ok($$INSERT INTO outbox.transactions (txid) VALUES ('bestellung-ä')$$,
    '23514', 'new row for relation "transactions" violates check constraint "transactions_txid_format"',
    'a txid with non-ASCII characters is refused');
SELECT throws_ok($$INSERT INTO outbox.transactions (txid) VALUES (NULL)$$,
    '23502', NULL, 'a NULL txid is refused');
SELECT throws_ok($$INSERT INTO outbox.transactions (txid) VALUES ('c-commit')$$,
    '23505', NULL, 'a txid is written once');
SELECT throws_ok($$INSERT INTO outbox.transactions (txid, state) VALUES ('s-1', 'committed')$$,
    '23514', 'new row for relation "transactions" violates check constraint "transactions_state_valid"',
    'an unknown state is refused');
SELECT throws_ok($$UPDATE outbox.transactions SET state = 'COMMIT' WHERE txid = 'c-pending'$$,
    '23514', 'new row for relation "transactions" violates check constraint "transactions_state_valid"',
    'states are lower case');
SELECT throws_ok($$INSERT INTO outbox.transactions (txid, state) VALUES ('s-2', NULL)$$,
    '23502', NULL, 'a NULL state is refused');

-- ---------------------------------------------------------------- messages: the per-key lock
-- Before any keyed insert in this transaction: no lock of class 'obxa'.
CREATE TEMP VIEW my_key_locks AS
SELECT objid FROM pg_locks
 WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
   AND classid = 1869707361 AND objsubid = 2;

INSERT INTO outbox.messages (topic, body) VALUES ('orders', '{"n": 0}');
SELECT is_empty('SELECT * FROM my_key_locks', 'an insert without a key takes no key lock');

INSERT INTO outbox.messages (topic, key, body) VALUES ('orders', '42', '{"n": 1}');
SELECT results_eq('SELECT objid FROM my_key_locks',
    $$VALUES (hashtext('orders/42')::oid)$$,
    'an insert with a key holds the transaction-scoped advisory lock on (topic, key)');
INSERT INTO outbox.messages (topic, key, body) VALUES ('orders', '42', '{"n": 2}');
SELECT results_eq('SELECT objid FROM my_key_locks',
    $$VALUES (hashtext('orders/42')::oid)$$,
    'a second row of the same key in the same transaction reuses the lock');

-- A second session (dblink back to this server) that writes the same key
-- must wait for this transaction; lock_timeout turns the wait into an error.
DO $$
BEGIN
    PERFORM dblink_connect('other',
        format('host=%s port=%s dbname=%s user=%s',
               host(inet_server_addr()), inet_server_port(), current_database(), current_user));
    PERFORM dblink_exec('other', 'BEGIN');
    PERFORM dblink_exec('other', $q$SET LOCAL lock_timeout = '250ms'$q$);
END
$$;
SELECT throws_ok(
    $$SELECT dblink_exec('other', 'INSERT INTO outbox.messages (topic, key, body) VALUES (''orders'', ''42'', ''1'')')$$,
    '55P03', NULL,
    'another transaction writing the same (topic, key) waits for this one to end');
DO $$
BEGIN
    PERFORM dblink_exec('other', 'ROLLBACK');
    PERFORM dblink_exec('other', 'BEGIN');
    PERFORM dblink_exec('other', $q$SET LOCAL lock_timeout = '250ms'$q$);
END
$$;
SELECT lives_ok(
    $$SELECT dblink_exec('other', 'INSERT INTO outbox.messages (topic, key, body) VALUES (''orders'', ''43'', ''1'')')$$,
    'another transaction writing a different key does not wait');
SELECT lives_ok(
    $$SELECT dblink_exec('other', 'INSERT INTO outbox.messages (topic, key, body) VALUES (''payments'', ''42'', ''1'')')$$,
    'the same key on another topic is another lock');
SELECT lives_ok(
    $$SELECT dblink_exec('other', 'INSERT INTO outbox.messages (topic, body) VALUES (''orders'', ''1'')')$$,
    'another transaction writing a row without a key does not wait');
DO $$
BEGIN
    PERFORM dblink_exec('other', 'ROLLBACK');
    PERFORM dblink_disconnect('other');
END
$$;

-- ---------------------------------------------------------------- messages: ids
SELECT results_eq(
    $$INSERT INTO outbox.messages (id, topic, body) VALUES (-7, 'orders', '{}') RETURNING id = -7$$,
    ARRAY[false], 'an id given in the INSERT is replaced by the trigger');
SELECT is((SELECT max(id) FROM outbox.messages), currval('outbox.messages_id_seq'),
    'the id comes from outbox.messages_id_seq');
CREATE TEMP TABLE ids AS
WITH ins AS (
    INSERT INTO outbox.messages (topic, key, body)
    SELECT 'orders', 'seq', jsonb_build_object('n', g) FROM generate_series(1, 5) g
    RETURNING id, body
) SELECT id, (body->>'n')::int AS n FROM ins;
SELECT results_eq('SELECT n FROM ids ORDER BY id', 'SELECT generate_series(1, 5)',
    'ids increase in insert order');
INSERT INTO outbox.messages (topic, body) VALUES ('orders', '{"after": true}');
SELECT cmp_ok((SELECT max(id) FROM outbox.messages WHERE body = '{"after": true}'),
    '>', (SELECT max(id) FROM ids), 'a later statement gets a larger id');
SELECT isnt((SELECT msg_id FROM outbox.messages WHERE body = '{"after": true}'), NULL,
    'msg_id defaults to a random uuid');
SELECT results_eq(
    $$INSERT INTO outbox.messages (msg_id, topic, body)
      VALUES ('6b0f3c1e-0000-4000-8000-000000000001', 'orders', '{}') RETURNING msg_id::text$$,
    ARRAY['6b0f3c1e-0000-4000-8000-000000000001'], 'a msg_id given by the application is kept');
SELECT throws_ok(
    $$INSERT INTO outbox.messages (msg_id, topic, body)
      VALUES ('6b0f3c1e-0000-4000-8000-000000000001', 'orders', '{}')$$,
    '23505', 'duplicate key value violates unique constraint "messages_msg_id_unique"',
    'a msg_id is written once');
SELECT is((SELECT created_at FROM outbox.messages WHERE body = '{"after": true}') > now(), true,
    'created_at is set (clock_timestamp, not the transaction start)');

-- ---------------------------------------------------------------- messages constraints
SELECT lives_ok($$INSERT INTO outbox.messages (topic, body) VALUES (repeat('t', 127), '{}')$$,
    'a 127-byte topic is accepted');
SELECT lives_ok($$INSERT INTO outbox.messages (topic, body) VALUES ('Orders.v2_x-y', '{}')$$,
    'letters, digits, dot, underscore and dash are accepted in a topic');
SELECT lives_ok($$INSERT INTO outbox.messages (topic, body) VALUES ('_single', '{}')$$,
    'one leading underscore is accepted');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, body) VALUES ('__x', '{}')$$,
    '23514', 'new row for relation "messages" violates check constraint "messages_topic_format"',
    'a topic starting with __ (internal) is refused');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, body) VALUES ('.x', '{}')$$,
    '23514', 'new row for relation "messages" violates check constraint "messages_topic_format"',
    'a topic starting with a dot is refused');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, body) VALUES (repeat('t', 128), '{}')$$,
    '23514', 'new row for relation "messages" violates check constraint "messages_topic_format"',
    'a 128-byte topic is refused');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, body) VALUES ('', '{}')$$,
    '23514', 'new row for relation "messages" violates check constraint "messages_topic_format"',
    'an empty topic is refused');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, body) VALUES ('a/b', '{}')$$,
    '23514', 'new row for relation "messages" violates check constraint "messages_topic_format"',
    'a topic with a slash is refused');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, body) VALUES ('a b', '{}')$$,
    '23514', 'new row for relation "messages" violates check constraint "messages_topic_format"',
    'a topic with a space is refused');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, body) VALUES (E'orders\n', '{}')$$,
    '23514', 'new row for relation "messages" violates check constraint "messages_topic_format"',
    'a topic with a trailing newline is refused');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, body) VALUES (NULL, '{}')$$,
    '23502', NULL, 'a NULL topic is refused');
SELECT lives_ok($$INSERT INTO outbox.messages (topic, key, body) VALUES ('t', repeat('k', 1024), '{}')$$,
    'a 1024-byte key is accepted');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, key, body) VALUES ('t', repeat('k', 1025), '{}')$$,
    '23514', 'new row for relation "messages" violates check constraint "messages_key_length"',
    'a 1025-byte key is refused');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, key, body) VALUES ('t', repeat('é', 513), '{}')$$,
    '23514', 'new row for relation "messages" violates check constraint "messages_key_length"',
    'the key limit counts bytes, not characters (513 x 2 bytes)');
SELECT lives_ok($$INSERT INTO outbox.messages (topic, tag, body) VALUES ('t', repeat('g', 255), '{}')$$,
    'a 255-byte tag is accepted');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, tag, body) VALUES ('t', repeat('g', 256), '{}')$$,
    '23514', 'new row for relation "messages" violates check constraint "messages_tag_length"',
    'a 256-byte tag is refused');
SELECT lives_ok($$INSERT INTO outbox.messages (topic, headers, body)
                  VALUES ('t', '{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}', '{}')$$,
    'headers as a JSON object are accepted');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, headers, body) VALUES ('t', '["a"]', '{}')$$,
    '23514', 'new row for relation "messages" violates check constraint "messages_headers_object"',
    'headers as a JSON array are refused');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, headers, body) VALUES ('t', '"a"', '{}')$$,
    '23514', 'new row for relation "messages" violates check constraint "messages_headers_object"',
    'headers as a JSON string are refused');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, headers, body) VALUES ('t', 'null', '{}')$$,
    '23514', 'new row for relation "messages" violates check constraint "messages_headers_object"',
    'headers as JSON null are refused (leave the column NULL instead)');
SELECT lives_ok($$INSERT INTO outbox.messages (topic, body_bytes) VALUES ('t', '\x00ff')$$,
    'a binary body alone is accepted');
SELECT lives_ok($$INSERT INTO outbox.messages (topic, body) VALUES ('t', 'null')$$,
    'JSON null is a body (it is not SQL NULL)');
SELECT throws_ok($$INSERT INTO outbox.messages (topic, body, body_bytes) VALUES ('t', '{}', '\x00')$$,
    '23514', 'new row for relation "messages" violates check constraint "messages_one_body"',
    'both body and body_bytes are refused');
SELECT throws_ok($$INSERT INTO outbox.messages (topic) VALUES ('t')$$,
    '23514', 'new row for relation "messages" violates check constraint "messages_one_body"',
    'neither body nor body_bytes is refused');

-- ---------------------------------------------------------------- inbox
SELECT is(outbox.inbox_claim('billing', 'm-1'), true, 'inbox_claim: the first claim is true');
SELECT is(outbox.inbox_claim('billing', 'm-1'), false, 'inbox_claim: a duplicate is false');
SELECT is(outbox.inbox_claim('shipping', 'm-1'), true, 'inbox_claim: each consumer group claims on its own');
SELECT is(outbox.inbox_claim('billing', 'm-2'), true, 'inbox_claim: another message of the group is true');
SELECT is(outbox.inbox_claim('billing', 'M-1'), true, 'inbox_claim: message ids are case-sensitive');
SELECT set_eq($$SELECT consumer_group, msg_id FROM outbox.inbox$$,
    $$VALUES ('billing', 'm-1'), ('shipping', 'm-1'), ('billing', 'm-2'), ('billing', 'M-1')$$,
    'inbox holds one row per (group, message) claimed');

-- A claim made in a transaction that rolls back is released: the consumer
-- failed, so the redelivered message must be processed.  The subtransaction
-- is run inside a function so that no pgTAP bookkeeping is rolled back.
CREATE FUNCTION pg_temp.claim_then_fail(p_group text, p_msg text) RETURNS boolean
    LANGUAGE plpgsql AS $$
DECLARE
    first boolean;
BEGIN
    BEGIN
        first := outbox.inbox_claim(p_group, p_msg);
        RAISE EXCEPTION 'consumer failed';
    EXCEPTION WHEN raise_exception THEN
        RETURN first;
    END;
END
$$;
SELECT is(pg_temp.claim_then_fail('billing', 'm-3'), true, 'a claim inside a failing transaction is true ...');
SELECT is(outbox.inbox_claim('billing', 'm-3'), true, '... and is released by the rollback');

-- Two consumers racing for one message: the second claim waits until the
-- first transaction ends (then it gets false, or true if the first rolled
-- back), so both never get true.  lock_timeout makes the wait visible.
DO $$
BEGIN
    PERFORM dblink_connect('other',
        format('host=%s port=%s dbname=%s user=%s',
               host(inet_server_addr()), inet_server_port(), current_database(), current_user));
    PERFORM dblink_exec('other', 'BEGIN');
    PERFORM dblink_exec('other', $q$SET LOCAL lock_timeout = '250ms'$q$);
END
$$;
SELECT throws_ok(
    $$SELECT * FROM dblink('other', 'SELECT outbox.inbox_claim(''billing'', ''m-1'')') AS t(claimed boolean)$$,
    '55P03', NULL,
    'a concurrent claim of a message claimed by an open transaction waits for it');
DO $$
BEGIN
    PERFORM dblink_exec('other', 'ROLLBACK');
    PERFORM dblink_disconnect('other');
END
$$;

SELECT throws_ok($$SELECT outbox.inbox_claim('', 'm-1')$$,
    '23514', 'new row for relation "inbox" violates check constraint "inbox_group_length"',
    'an empty consumer group is refused');
SELECT throws_ok($$SELECT outbox.inbox_claim(repeat('g', 256), 'm-1')$$,
    '23514', 'new row for relation "inbox" violates check constraint "inbox_group_length"',
    'a 256-byte consumer group is refused');
SELECT throws_ok($$SELECT outbox.inbox_claim('billing', '')$$,
    '23514', 'new row for relation "inbox" violates check constraint "inbox_msg_id_length"',
    'an empty message id is refused');
SELECT throws_ok($$SELECT outbox.inbox_claim('billing', NULL)$$,
    '23502', NULL, 'a NULL message id is refused');

INSERT INTO outbox.inbox (consumer_group, msg_id, claimed_at) VALUES
    ('old', 'o-1', now() - interval '40 days'),
    ('old', 'o-2', now() - interval '31 days'),
    ('old', 'o-edge', now() - interval '30 days'),
    ('old', 'o-young', now() - interval '29 days');
SELECT is(outbox.inbox_cleanup('30 days'), 2::bigint, 'inbox_cleanup returns how many entries it deleted');
SELECT set_eq($$SELECT msg_id FROM outbox.inbox WHERE consumer_group = 'old'$$,
    ARRAY['o-edge', 'o-young'], 'only entries claimed strictly longer ago than the interval are deleted');
SELECT is((SELECT count(*) FROM outbox.inbox WHERE consumer_group <> 'old'), 5::bigint,
    'fresh claims are kept');
SELECT is(outbox.inbox_claim('old', 'o-1'), true,
    'a message claimed again after its entry was cleaned up counts as new (keep entries longer than redelivery)');

SELECT * FROM finish();
ROLLBACK;
