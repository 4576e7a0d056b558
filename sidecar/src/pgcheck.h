/*
 * pgcheck.h - broker_core's checker answered by a PostgreSQL query.
 *
 * The check-back query takes one parameter (the txid, sent as text) and
 * returns at most one row of one text column:
 *
 *   'commit'  (or 'committed')    -> BRK_CHECK_COMMIT
 *   'rollback' (or 'rolled_back') -> BRK_CHECK_ROLLBACK
 *   'pending', NULL, or no row    -> BRK_CHECK_UNKNOWN   (the application's
 *                                    transaction may not have committed yet)
 *   anything else                 -> BRK_CHECK_ERROR, logged (a query that
 *                                    answers garbage must never roll back)
 *   query error, statement_timeout, no connection -> BRK_CHECK_ERROR
 *
 * ERROR never counts as a check (broker_core retries it with backoff), so
 * a database outage of any length rolls nothing back.  Case and
 * surrounding blanks of the answer are ignored.
 *
 * The default query, SC_PGCHECK_DEFAULT_QUERY, reads outbox.transactions
 * through outbox.check_transaction() (sql/migrations/0001_outbox.sql),
 * which also turns "pending past its deadline" into rollback.  A custom
 * query can answer from the application's own tables, e.g.
 *   SELECT CASE status WHEN 'paid' THEN 'commit' WHEN 'cancelled'
 *          THEN 'rollback' ELSE 'pending' END FROM orders WHERE id = $1
 *
 * Pool: `pool_size` connections, each with the query prepared once
 * (statement "outboxd_check").  A check takes a free connection, waiting at
 * most statement_timeout (connect_timeout when there is none) for one; a
 * connection that failed is reconnected by the next check that takes it,
 * after its backoff (exponential with jitter, sc_pg_backoff_ms): until then
 * checks answer ERROR at once instead of queueing behind a dead server
 * (unless another connection is alive and merely busy: then they wait for
 * it).  A connection found dead by the check using it (terminated while
 * idle, server restarted) is replaced at once and the query asked again,
 * once.
 *
 * Deadline: every round trip waits at most statement_timeout +
 * connect_timeout for its answer, also when the server process is stopped
 * or the network went silent (which neither statement_timeout nor TCP
 * keepalives notice); then the connection is dropped and the check answers
 * ERROR.
 *
 * Start-up (sc_pgcheck_open) connects one connection and prepares and
 * describes the query: exactly one parameter and one column of a text type
 * (text, varchar, char, name) or it fails with a message naming what is
 * wrong, exit 78.  A refused connection (bad password, no such database
 * or role) is also 78.  An unreachable server is not fatal: outboxd starts,
 * warns, and validates on the first connection (an invalid query then
 * makes every check ERROR and is logged at error level).
 *
 * Threads: check() is thread-safe (broker_core calls it from its check
 * workers).
 */
#ifndef SC_PGCHECK_H
#define SC_PGCHECK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/txn.h"
#include "log.h"
#include "pg.h"

#define SC_PGCHECK_DEFAULT_QUERY "SELECT outbox.check_transaction($1)"
#define SC_PGCHECK_POOL_MAX      64

typedef struct sc_pgcheck sc_pgcheck;

typedef struct sc_pgcheck_opts {
    sc_pg_opts pg;
    unsigned pool_size;              /* 1..SC_PGCHECK_POOL_MAX, default 2 */
    const char *query;               /* NULL/"": SC_PGCHECK_DEFAULT_QUERY */
    sc_log *log;                     /* may be NULL */
} sc_pgcheck_opts;

void sc_pgcheck_opts_init(sc_pgcheck_opts *o);

/* Returns 0; 78 (EX_CONFIG) when the query does not fit, the connection
 * was refused, or the default query's schema is missing ("run `outboxd db
 * migrate`"); 70 on out of memory.  err holds one line on failure. */
int sc_pgcheck_open(sc_pgcheck **out, const sc_pgcheck_opts *o, char *err,
                    size_t errlen);

/* Wakes checks waiting for a connection (they answer ERROR), waits for
 * checks in flight (each ends by its deadlines, see above), then frees
 * everything.  No check may start after close begins (broker_core's
 * workers must be stopped first: brk_txn_close).  NULL is a no-op. */
void sc_pgcheck_close(sc_pgcheck *c);

/* The checker for brk_txn_opts.checker; valid until close. */
const brk_checker *sc_pgcheck_checker(sc_pgcheck *c);

typedef struct sc_pgcheck_stats {
    uint64_t queries;                /* queries sent */
    uint64_t answers[5];             /* by brk_check_result (index 1..4) */
    uint64_t timeouts;               /* statement_timeout hits, and round
                                        trips with no answer by the
                                        deadline (connection dropped) */
    uint64_t connect_failures;
    uint64_t reconnects;             /* successful connects after the first */
    unsigned connected;              /* healthy connections now */
    unsigned pool_size;
    bool     validated;              /* the query was prepared and checked */
} sc_pgcheck_stats;

void sc_pgcheck_get_stats(sc_pgcheck *c, sc_pgcheck_stats *out);

#endif /* SC_PGCHECK_H */
