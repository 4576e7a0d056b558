/*
 * migrate.h - `outboxd db migrate` and `outboxd db status`: the SQL of
 * sql/migrations/ compiled into the binary, applied in order.
 *
 * The migration files are the ones a DBA can also run with `psql -f`: each
 * is one transaction (BEGIN ... COMMIT) that ends by recording itself in
 * outbox.schema_version.  `outboxd db migrate`:
 *
 *   1. connects (sc_pg_connect), takes the session advisory lock
 *      (SC_MIGRATE_LOCK_CLASS, 0), so two concurrent runs apply each file
 *      once: the second waits, then finds nothing pending;
 *   2. reads the recorded version (0 when schema outbox does not exist);
 *      a version newer than the newest compiled in is refused: this
 *      outboxd is older than the database;
 *   3. runs every newer file in order, each as its own transaction; a file
 *      that fails is rolled back whole and stops the run (the files before
 *      it stay applied);
 *   4. prints one line per file applied, and the final version.
 *
 * Exit codes (sysexits): 0 done (also when nothing was pending); 69
 * EX_UNAVAILABLE the server cannot be reached; 78 EX_CONFIG the connection
 * was refused (password, role, database) or no database is configured; 65
 * EX_DATAERR the database is newer than this outboxd, or a migration
 * failed (the message names the file and PostgreSQL's error); 70 out of
 * memory.
 */
#ifndef SC_MIGRATE_H
#define SC_MIGRATE_H

#include <stddef.h>
#include <stdio.h>

#include <libpq-fe.h>

#include "pg.h"

#define SC_MIGRATE_LOCK_CLASS 1869707363   /* 'obxc': advisory lock key 1 */

typedef struct sc_migration {
    int version;                 /* the file's numeric prefix */
    const char *name;            /* file name without ".sql" */
    const char *sql;             /* the file's text, NUL-terminated */
} sc_migration;

/* The compiled-in migrations, by ascending version. */
const sc_migration *sc_migrations(size_t *count);

/* The newest compiled-in version. */
int sc_migrations_latest(void);

/* The database's recorded version into *version (0 when schema outbox or
 * its version table does not exist).  0, or -1 with err set. */
int sc_db_schema_version(PGconn *c, int *version, char *err, size_t errlen);

/* `outboxd db migrate`: progress lines to `out`; returns an exit code
 * (above), with the one-line reason in err when it is not 0. */
int sc_db_migrate(const sc_pg_opts *pg, FILE *out, char *err, size_t errlen);

/* `outboxd db status`: "database version N, outboxd knows M" and one line
 * per pending migration; exit code as for migrate (65 when the database is
 * newer). */
int sc_db_status(const sc_pg_opts *pg, FILE *out, char *err, size_t errlen);

#endif /* SC_MIGRATE_H */
