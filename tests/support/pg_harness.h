/*
 * pg_harness.h - a real, throwaway PostgreSQL server for tests.
 *
 * Wraps scripts/pgtmp.sh: the server runs from a fresh temporary folder on
 * 127.0.0.1 and a free port, as `nobody` when the test runs as root, and is
 * stopped by its PID.  One server per test program (start it in a group
 * setup); each test makes its own database with pgh_create_db, so tests do
 * not see each other's rows.
 *
 * Superuser access is `postgres` without a password.  Roles that are
 * members of `password_required` must authenticate with their password
 * (for wrong-password tests); every other role is trusted.
 *
 * SQL is run through psql, so this file needs no libpq.
 */
#ifndef OUTBOXD_TEST_PG_HARNESS_H
#define OUTBOXD_TEST_PG_HARNESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct pgh pgh;

/* Unset the environment variables that steer libpq (PGHOST, PGPORT,
 * PGUSER, PGPASSWORD, PGSERVICE, PGSSLMODE, PGOPTIONS, PGAPPNAME, ...), so
 * that only what a test sets itself reaches a connection, psql's included.
 * Call it once, before pgh_start. */
void pgh_clear_libpq_env(void);

/* Start a server; `source_dir` is the project root (OUTBOXD_SOURCE_DIR),
 * for scripts/ and sql/.  NULL (with the reason on stderr) on failure. */
pgh *pgh_start(const char *source_dir);

/* Stop the server (fast shutdown) and remove its folder.  NULL is a no-op. */
void pgh_destroy(pgh *h);

/* Fast shutdown, keeping the data: pgh_restart brings it back on the same
 * port.  pgh_kill is SIGKILL of the postmaster (a crash).  0 or -1. */
int pgh_stop(pgh *h);
int pgh_kill(pgh *h);
int pgh_restart(pgh *h);

uint16_t pgh_port(const pgh *h);

/* Create database `db` (dropped first if it exists).  With `migrate`, apply
 * every sql/migrations/NNNN_*.sql file in order with psql, as the
 * superuser.  0 or -1 (psql's output on stderr). */
int pgh_create_db(pgh *h, const char *db, bool migrate);

/* A connection URL for `db` as `user` (NULL = postgres) with `password`
 * (NULL = none), written into out[cap]. */
void pgh_url(const pgh *h, const char *db, const char *user,
             const char *password, char *out, size_t cap);

/* Run `sql` (any number of statements) in `db` as the superuser with
 * ON_ERROR_STOP.  The unaligned, tuples-only output (`psql -At`, fields
 * separated by '|', rows by '\n', trailing newline removed) goes into
 * out[cap] when out is not NULL.  Returns psql's exit status (0 = every
 * statement succeeded), -1 if psql could not be run. */
int pgh_sql(pgh *h, const char *db, const char *sql, char *out, size_t cap);

/* pgh_sql returning the first output line as an integer (e.g. a count);
 * -1 on any failure. */
long long pgh_sql_int(pgh *h, const char *db, const char *sql);

#endif /* OUTBOXD_TEST_PG_HARNESS_H */
