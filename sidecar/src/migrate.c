/*
 * migrate.c - `outboxd db migrate` / `outboxd db status` (see migrate.h).
 *
 * The SQL: sql/migrations/NNNN_name.sql, compiled in at build time by
 * sidecar/embed_sql.cmake into migrations_gen.c (the build checks the names
 * and that versions run 1, 2, 3, ... without gaps, so this file can trust
 * the table's order).  Each file is sent whole, with one PQexec, exactly as
 * `psql -f` would run it: it holds its own BEGIN ... COMMIT and ends by
 * inserting its row into outbox.schema_version, so the version row and the
 * objects it describes commit together or not at all.
 *
 * One run of `db migrate`:
 *
 *   connect ──► pg_advisory_lock(SC_MIGRATE_LOCK_CLASS, 0) ──► read version V
 *                 (blocks while another       │
 *                  run holds it)              ├─ V > latest: refuse (65)
 *                                             ▼
 *               for each file with version > V, in order:
 *                   PQexec(text) ─ error ─► ROLLBACK, stop (65, or 69
 *                      │                    when the connection went away)
 *                      ▼
 *                   re-read V; V != file's version ─► stop (65: the file
 *                      │                    did not record itself)
 *                      ▼
 *                   print "applied NNNN_name"
 *               ──► print the final version ──► unlock ──► PQfinish
 *
 * The lock is a session lock, so it is released if this process dies (the
 * server ends the session); the version is read only after the lock is
 * held, so a run that waited for another one finds nothing left to do.
 *
 * Statement timeout: the configured db_statement_timeout bounds the
 * daemon's per-message queries (check-backs, relay rounds).  A migration
 * may legitimately run longer (an index build on a big table), and a second
 * concurrent run must wait out the first one's lock, so both commands run
 * with statement_timeout 0; the connect timeout still applies.
 *
 * Every statement of ours is parameterised (PQexecParams); the migration
 * texts are the one exception, by nature: they are the program's own
 * compiled-in files, never input.  Messages name files, versions and
 * PostgreSQL's own error text, never the connection's password.
 */
#define _GNU_SOURCE
#include "migrate.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>

/* Defined in the generated migrations_gen.c (sidecar/embed_sql.cmake). */
extern const sc_migration sc_migrations_embedded[];
extern const size_t sc_migrations_embedded_count;

const sc_migration *sc_migrations(size_t *count)
{
    if (count) *count = sc_migrations_embedded_count;
    return sc_migrations_embedded;
}

int sc_migrations_latest(void)
{
    size_t n = sc_migrations_embedded_count;
    return n ? sc_migrations_embedded[n - 1].version : 0;
}

/* The reason a result failed, one line: the server's primary message when
 * there is one, else libpq's (connection trouble). */
static void result_reason(PGconn *c, const PGresult *res, char *out, size_t cap)
{
    const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    const char *text = primary ? primary
                     : (res && *PQresultErrorMessage(res)) ? PQresultErrorMessage(res)
                     : c ? PQerrorMessage(c) : "no connection";
    snprintf(out, cap, "%s", text && *text ? text : "unknown error");
    sc_pg_one_line(out);
}

/* Exit code for a query that failed: the connection's trouble is 69 (the
 * server went away), the query's own is 65. */
static int failure_code(PGconn *c, const PGresult *res)
{
    return sc_pg_result_fail(c, res) == SC_PG_UNREACHABLE ? EX_UNAVAILABLE : EX_DATAERR;
}

/* One parameterless query of ours that returns one value.  Returns the
 * result (caller clears it) when it is PGRES_TUPLES_OK with a row, else
 * NULL with err set and *code the exit code. */
static PGresult *query_one(PGconn *c, const char *sql, int nparams,
                           const char *const *params, const char *what,
                           int *code, char *err, size_t errlen)
{
    PGresult *res = PQexecParams(c, sql, nparams, NULL, params, NULL, NULL, 0);
    if (res && PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1
        && PQnfields(res) >= 1)
        return res;
    char why[512];
    if (res && PQresultStatus(res) == PGRES_TUPLES_OK)
        snprintf(why, sizeof why, "unexpected answer (%d rows)", PQntuples(res));
    else
        result_reason(c, res, why, sizeof why);
    if (code) *code = failure_code(c, res);
    snprintf(err, errlen, "%s: %s", what, why);
    PQclear(res);
    return NULL;
}

int sc_db_schema_version(PGconn *c, int *version, char *err, size_t errlen)
{
    /* Two statements: the second names a table that may not exist, which
     * would fail at parse time whatever a CASE around it said. */
    PGresult *res = query_one(c,
        "SELECT to_regclass('outbox.schema_version') IS NOT NULL", 0, NULL,
        "cannot read the database schema version", NULL, err, errlen);
    if (!res) return -1;
    bool exists = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    PQclear(res);
    if (!exists) {
        *version = 0;
        return 0;
    }
    res = query_one(c, "SELECT coalesce(max(version), 0) FROM outbox.schema_version",
                    0, NULL, "cannot read the database schema version", NULL,
                    err, errlen);
    if (!res) return -1;
    *version = atoi(PQgetvalue(res, 0, 0));
    PQclear(res);
    return 0;
}

/* The exit code when sc_db_schema_version failed on c. */
static int version_failure_code(PGconn *c)
{
    return PQstatus(c) == CONNECTION_OK ? EX_DATAERR : EX_UNAVAILABLE;
}

/* Connect for `db`: the caller's options, without a statement timeout
 * (see the top comment).  NULL with the exit code in *code. */
static PGconn *connect_for_db(const sc_pg_opts *pg, int *code, char *err,
                              size_t errlen)
{
    if (!pg) {
        *code = EX_CONFIG;
        snprintf(err, errlen, "no database is configured (database_url)");
        return NULL;
    }
    sc_pg_opts o = *pg;
    o.statement_timeout_ms = 0;
    sc_pg_fail fail = SC_PG_OK;
    PGconn *c = sc_pg_connect(&o, &fail, err, errlen);
    if (!c) *code = fail == SC_PG_REFUSED ? EX_CONFIG : EX_UNAVAILABLE;
    return c;
}

/* "1869707363" for the lock's parameters. */
static void lock_params(char *key1, size_t cap)
{
    snprintf(key1, cap, "%d", (int)SC_MIGRATE_LOCK_CLASS);
}

/* Take the migration lock; waits while another run holds it. */
static int take_lock(PGconn *c, char *err, size_t errlen)
{
    char key1[16];
    lock_params(key1, sizeof key1);
    const char *params[1] = { key1 };
    int code = EX_SOFTWARE;
    PGresult *res = query_one(c, "SELECT pg_advisory_lock($1::int4, 0)", 1, params,
                              "cannot take the migration lock", &code, err, errlen);
    if (!res) return code;
    PQclear(res);
    return 0;
}

/* Release it.  Best effort: PQfinish right after would release it too. */
static void release_lock(PGconn *c)
{
    char key1[16];
    lock_params(key1, sizeof key1);
    const char *params[1] = { key1 };
    PQclear(PQexecParams(c, "SELECT pg_advisory_unlock($1::int4, 0)", 1, NULL,
                         params, NULL, NULL, 0));
}

/* Run one migration file.  0, or an exit code with err set. */
static int apply_one(PGconn *c, const sc_migration *m, char *err, size_t errlen)
{
    PGresult *res = PQexec(c, m->sql);
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY) {
        PQclear(res);
        /* A file that forgot its COMMIT would leave us inside its
         * transaction: nothing of it is committed, so it has failed. */
        if (PQtransactionStatus(c) != PQTRANS_IDLE) {
            PQclear(PQexec(c, "ROLLBACK"));
            snprintf(err, errlen,
                     "migration %s failed: it left its transaction open (no COMMIT); rolled back",
                     m->name);
            return EX_DATAERR;
        }
        return 0;
    }

    int code = failure_code(c, res);
    char why[512];
    result_reason(c, res, why, sizeof why);
    PQclear(res);
    /* The file's BEGIN left the session in an aborted transaction; the
     * server discards it on ROLLBACK (or when the session ends). */
    if (PQstatus(c) == CONNECTION_OK && PQtransactionStatus(c) != PQTRANS_IDLE)
        PQclear(PQexec(c, "ROLLBACK"));
    if (code == EX_UNAVAILABLE)
        /* Whether its COMMIT got through is unknown, but a file and its
         * version row commit together, so running again is always safe. */
        snprintf(err, errlen, "migration %s interrupted: %s; run `outboxd db migrate` again",
                 m->name, why);
    else
        snprintf(err, errlen, "migration %s failed: %s", m->name, why);
    return code;
}

int sc_db_migrate(const sc_pg_opts *pg, FILE *out, char *err, size_t errlen)
{
    if (errlen) err[0] = '\0';
    int code = 0;
    PGconn *c = connect_for_db(pg, &code, err, errlen);
    if (!c) return code;

    code = take_lock(c, err, errlen);
    if (code != 0) {
        PQfinish(c);
        return code;
    }

    size_t n;
    const sc_migration *all = sc_migrations(&n);
    int latest = sc_migrations_latest();
    int version = 0;
    if (sc_db_schema_version(c, &version, err, errlen) != 0) {
        code = version_failure_code(c);
        goto done;
    }
    if (version > latest) {
        snprintf(err, errlen,
                 "database schema version %d is newer than this outboxd knows (%d); "
                 "upgrade outboxd", version, latest);
        code = EX_DATAERR;
        goto done;
    }

    int applied = 0;
    for (size_t i = 0; i < n; i++) {
        const sc_migration *m = &all[i];
        if (m->version <= version) continue;
        code = apply_one(c, m, err, errlen);
        if (code != 0) goto done;
        if (sc_db_schema_version(c, &version, err, errlen) != 0) {
            code = version_failure_code(c);
            goto done;
        }
        if (version != m->version) {
            snprintf(err, errlen,
                     "migration %s ran but the database schema version is %d, not %d: "
                     "the file did not record itself in outbox.schema_version",
                     m->name, version, m->version);
            code = EX_DATAERR;
            goto done;
        }
        fprintf(out, "applied %s\n", m->name);
        fflush(out);
        applied++;
    }
    if (applied)
        fprintf(out, "database schema is at version %d\n", version);
    else
        fprintf(out, "database schema is up to date (version %d)\n", version);
    fflush(out);

done:
    if (PQstatus(c) == CONNECTION_OK) release_lock(c);
    PQfinish(c);
    return code;
}

int sc_db_status(const sc_pg_opts *pg, FILE *out, char *err, size_t errlen)
{
    if (errlen) err[0] = '\0';
    int code = 0;
    PGconn *c = connect_for_db(pg, &code, err, errlen);
    if (!c) return code;

    int version = 0;
    if (sc_db_schema_version(c, &version, err, errlen) != 0) {
        code = version_failure_code(c);
        PQfinish(c);
        return code;
    }
    PQfinish(c);

    size_t n;
    const sc_migration *all = sc_migrations(&n);
    int latest = sc_migrations_latest();
    fprintf(out, "database schema version: %d\n", version);
    fprintf(out, "outboxd knows: %d\n", latest);
    if (version > latest) {
        fflush(out);
        snprintf(err, errlen,
                 "database schema version %d is newer than this outboxd knows (%d); "
                 "upgrade outboxd", version, latest);
        return EX_DATAERR;
    }
    bool any = false;
    for (size_t i = 0; i < n; i++) {
        if (all[i].version <= version) continue;
        fprintf(out, "pending: %s\n", all[i].name);
        any = true;
    }
    if (!any) fprintf(out, "pending: none\n");
    fflush(out);
    return 0;
}
