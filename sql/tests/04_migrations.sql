-- 04_migrations.sql - outbox.schema_version records every migration file.
--
-- tests/sql/pgtap.sh passes the names of the files it applied, in order, as
-- the psql variable `migrations` (comma-separated, without .sql); run by
-- hand, the variable defaults to the two files of issue 6.  What a second
-- run of a file does (it fails and changes nothing) is checked by the runner
-- itself, with psql's exit status.
--
-- Run as the superuser; one transaction, rolled back.

\if :{?migrations}
\else
\set migrations '0001_outbox,0002_roles'
\endif

BEGIN;
SELECT plan(8);

CREATE TEMP TABLE migration_files AS
SELECT f.name, split_part(f.name, '_', 1)::int AS version, f.ord
  FROM unnest(string_to_array(:'migrations', ',')) WITH ORDINALITY AS f(name, ord);

SELECT results_eq(
    'SELECT version, name FROM outbox.schema_version WHERE version <= 2 ORDER BY version',
    $$VALUES (1, '0001_outbox'), (2, '0002_roles')$$,
    'schema_version holds 1 0001_outbox and 2 0002_roles');
SELECT results_eq(
    'SELECT version, name FROM outbox.schema_version ORDER BY version',
    'SELECT version, name FROM migration_files ORDER BY ord',
    'schema_version holds one row per file of sql/migrations, named after it');
SELECT results_eq(
    'SELECT version FROM outbox.schema_version ORDER BY version',
    'SELECT generate_series(1, (SELECT max(version) FROM outbox.schema_version))',
    'versions run from 1 without a gap');
SELECT is_empty(
    $$SELECT version FROM outbox.schema_version WHERE applied_at IS NULL OR applied_at > now()$$,
    'every version has a time of application in the past');
SELECT is_empty(
    $$SELECT a.version FROM outbox.schema_version a JOIN outbox.schema_version b
          ON b.version = a.version + 1
       WHERE b.applied_at < a.applied_at$$,
    'migrations were applied in version order');
SELECT throws_ok($$INSERT INTO outbox.schema_version (version, name) VALUES (0, 'zero')$$,
    '23514', NULL, 'a version must be positive');
SELECT throws_ok($$INSERT INTO outbox.schema_version (version, name) VALUES (1, 'again')$$,
    '23505', NULL, 'a version is recorded once (what makes a second run of a file fail)');

-- Everything in the schema belongs to whoever ran the migrations, so one
-- role (the DBA's) can later ALTER or DROP all of it.
SELECT is_empty($$
    SELECT 'relation ' || c.relname FROM pg_class c
     WHERE c.relnamespace = 'outbox'::regnamespace
       AND c.relowner <> (SELECT nspowner FROM pg_namespace WHERE nspname = 'outbox')
    UNION ALL
    SELECT 'function ' || p.oid::regprocedure::text FROM pg_proc p
     WHERE p.pronamespace = 'outbox'::regnamespace
       AND p.proowner <> (SELECT nspowner FROM pg_namespace WHERE nspname = 'outbox')
$$, 'every object of schema outbox has the schema''s owner');

SELECT * FROM finish();
ROLLBACK;
