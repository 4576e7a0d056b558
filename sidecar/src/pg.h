/*
 * pg.h - PostgreSQL connections for the check-back adapter, the relay and
 * `outboxd db`: one way to connect, one way to classify failures.
 *
 * Connection parameters come from `conninfo` (a postgresql:// URL or
 * "key=value" pairs); what it leaves out comes from libpq's standard PG*
 * environment variables (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD,
 * PGSERVICE, PGSSLMODE, ...).  A password file's first line, when one is
 * given, is passed as the password and overrides any other.  Every
 * connection gets TCP keepalives and a TCP user timeout (a dead host or
 * network is noticed within about connect_timeout; a server process that
 * stops answering while its kernel still ACKs is not: bound such waits
 * with sc_pg_wait_result), `application_name`, and
 * `statement_timeout`; messages never include the password (ours print
 * only host, port, database and user, and the conninfo's password is
 * masked in libpq's, which quote a malformed URL whole).  Server notices
 * (NOTICE, WARNING) are dropped instead of going to stderr.
 *
 * Failure classes (sc_pg_fail) decide what callers do:
 *   SC_PG_UNREACHABLE  connection refused, timeout, server shutting down or
 *                      starting up, connection lost: retry with backoff
 *   SC_PG_REFUSED      the server answered and said no: bad password,
 *                      unknown role or database, pg_hba rejection; or the
 *                      conninfo itself is malformed or has an invalid
 *                      option value, or the password file cannot be read.
 *                      (A host name that does not resolve is UNREACHABLE:
 *                      DNS may not be ready yet in a starting pod.)  At
 *                      start-up this is a configuration error (exit 78);
 *                      later it is retried like UNREACHABLE (a DBA may be
 *                      rotating the password).
 *
 * Threads: a PGconn is used by one thread at a time; these functions keep
 * no shared state.
 */
#ifndef SC_PG_H
#define SC_PG_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/clock.h"

typedef enum sc_pg_fail {
    SC_PG_OK = 0,
    SC_PG_UNREACHABLE,
    SC_PG_REFUSED
} sc_pg_fail;

typedef struct sc_pg_opts {
    const char *conninfo;            /* NULL/"": libpq defaults (PG*) */
    const char *password_file;       /* NULL/"": none */
    const char *application_name;    /* NULL: "outboxd" */
    int64_t statement_timeout_ms;    /* 0: no timeout (overrides role and
                                        database settings; migrations) */
    int64_t connect_timeout_ms;      /* also bounds keepalive detection;
                                        default (0) 5000 */
    int64_t backoff_min_ms;          /* reconnect backoff; default 100 */
    int64_t backoff_max_ms;          /* default 30000 */
    const brk_clock *clock;          /* backoff timing; NULL: system clock */
    int stop_fd;                     /* -1 (default): none.  When it becomes
                                        readable, sc_pg_connect gives up at
                                        once (UNREACHABLE, "connect
                                        interrupted"); it is polled, never
                                        read, so it must stay readable */
} sc_pg_opts;

void sc_pg_opts_init(sc_pg_opts *o);

/* Connect (blocking, at most connect_timeout in all, over every host the
 * conninfo names, plus the time name resolution takes) and apply the
 * session settings; opts.stop_fd cuts the wait short.  On failure returns
 * NULL, *fail says which class, and err holds "cannot connect to
 * PostgreSQL at HOST:PORT/DB as USER: <libpq reason>" (one line, no
 * password; the reason is "timeout expired" at the deadline and "connect
 * interrupted" when stop_fd fired). */
PGconn *sc_pg_connect(const sc_pg_opts *o, sc_pg_fail *fail, char *err,
                      size_t errlen);

/* Wait at most timeout_ms (<= 0: no limit) for the outcome of the one
 * command sent on c with PQsend* (PQsendQueryPrepared, PQsendPrepare,
 * PQsendDescribePrepared, ...), reading every result it produces.  Returns
 * the first failed result if there was one, else the last result; NULL
 * with *timed_out set when the deadline passed first.  A connection that
 * timed out has the command still in flight: the caller must PQfinish it.
 * NULL without *timed_out only when libpq returned no result at all (then
 * PQerrorMessage(c) says why; treat it as a lost connection).
 *
 * This is what bounds a query when the server stops answering without the
 * network noticing (a stopped or wedged backend whose kernel still ACKs,
 * so neither keepalives nor tcp_user_timeout fire, and statement_timeout
 * runs in the very process that is stuck). */
PGresult *sc_pg_wait_result(PGconn *c, int64_t timeout_ms, bool *timed_out);

/* The class of a failed query result (NULL res: look at the connection):
 * connection-level trouble is UNREACHABLE, anything else is SC_PG_OK with
 * the error being the query's own (see sc_pg_is_timeout). */
sc_pg_fail sc_pg_result_fail(PGconn *c, const PGresult *res);

/* True when res failed because statement_timeout cancelled it (57014). */
bool sc_pg_is_timeout(const PGresult *res);

/* Flatten PostgreSQL's (or libpq's) message onto one line: runs of blanks
 * and line breaks become one space, none at either end. */
void sc_pg_one_line(char *s);

/* "host:port/db as user" for messages; never the password. */
void sc_pg_describe(PGconn *c, char *out, size_t cap);

/* Reconnect backoff with full jitter: the delay before attempt n (0-based
 * failures so far), between min and min(max, min * 2^n), scaled by
 * `jitter` in [0, 1) (the caller's random draw). */
int64_t sc_pg_backoff_ms(const sc_pg_opts *o, unsigned failures, double jitter);

#endif /* SC_PG_H */
