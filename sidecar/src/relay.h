/*
 * relay.h - the outbox relay: rows of outbox.messages into the store.
 *
 * For applications that only write rows.  One relay thread holds one
 * PostgreSQL connection and loops:
 *
 *   1. Leadership: pg_try_advisory_lock(SC_RELAY_LOCK_CLASS, 0) on its
 *      session.  Only the holder relays, so several outboxd replicas on one
 *      database never relay the same row at once and per-key order is kept
 *      across them; the others stand by and try again every poll interval.
 *      The lock goes with the session, so a dead leader's lock is freed as
 *      soon as PostgreSQL notices (TCP keepalives) and a standby takes over.
 *      Standbys never block the leader.
 *   2. LISTEN outbox_messages (the insert trigger NOTIFYs on commit) and
 *      wait for a notification or poll_interval, whichever comes first.
 *   3. A batch: BEGIN; SELECT the oldest `batch` rows by id; for each row
 *      look its msg_id up in the store (brk_store_lookup) and append it
 *      unless it is there (a row stored before a crash, whose DELETE never
 *      committed, is not stored twice); fdatasync the store
 *      (brk_store_flush) whatever the flush mode, because deleting the row
 *      is the acknowledgement; DELETE the rows by id; COMMIT.  A full batch
 *      is followed at once by the next.
 *
 * Why no row is ever skipped, and why per-key order follows commit order:
 * see sql/migrations/0001_outbox.sql (no cursor: visible rows are taken in
 * id order and deleted; the insert trigger serialises writers of one key
 * and numbers their rows in commit order).
 *
 * Mapping of a row to a message: topic, key, tag as they are; msg_id is
 * the row's uuid; headers (a JSON object of strings) become message
 * properties; body (jsonb) is stored compactly with the JSON flag, exactly
 * as POST /v1/topics/{topic}/messages stores a JSON body; body_bytes is
 * stored as bytes.  born_ms is the row's created_at.
 *
 * A row the store refuses for good (unknown topic with auto-creation off,
 * too large, bad header) is not retried forever: it is deleted from
 * outbox.messages and its content is kept in the store's internal topic
 * "__relay_rejected" with the reason as a header, and logged at error
 * level.  Store errors that may pass (FULL, NOSPC, IO) stop the batch,
 * roll back the PostgreSQL transaction (the rows stay) and retry after a
 * backoff.
 *
 * Failures of PostgreSQL (lost connection, server down) roll nothing into
 * the store twice: rows already stored are found by msg_id next time.  The
 * relay reconnects with exponential backoff and jitter.
 *
 * Threads: open starts the relay thread (unless opts.no_thread: tests call
 * sc_relay_run_once); close stops it after the batch in hand.
 */
#ifndef SC_RELAY_H
#define SC_RELAY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/store.h"
#include "log.h"
#include "pg.h"

#define SC_RELAY_LOCK_CLASS    1869707362   /* 'obxb': advisory lock key 1 */
#define SC_RELAY_CHANNEL       "outbox_messages"
#define SC_RELAY_REJECT_TOPIC  "__relay_rejected"
#define SC_RELAY_BATCH_MAX     10000

typedef struct sc_relay sc_relay;

typedef struct sc_relay_opts {
    sc_pg_opts pg;
    brk_store *store;                /* borrowed; outlives the relay */
    uint32_t batch;                  /* rows per transaction, 1..10000,
                                        default 500 */
    int64_t  poll_interval_ms;       /* fallback poll and standby retry,
                                        default 1000 */
    bool     no_thread;              /* tests: no thread; call run_once */
    sc_log  *log;                    /* may be NULL */
} sc_relay_opts;

void sc_relay_opts_init(sc_relay_opts *o);

/* Check the schema when the server answers (outbox.messages readable and
 * deletable, else 78 with "run `outboxd db migrate`" or the missing
 * grant), then start the thread.  An unreachable server is not fatal: the
 * relay warns and keeps trying.  Returns 0, 78, or 70 (out of memory,
 * thread). */
int sc_relay_open(sc_relay **out, const sc_relay_opts *o, char *err,
                  size_t errlen);

/* Stop the thread (finishing the batch in hand), release leadership,
 * close the connection.  NULL is a no-op. */
void sc_relay_close(sc_relay *r);

/* no_thread mode: connect if needed, try for leadership, relay one batch.
 * *rows (may be NULL) counts rows handled (stored, found already stored,
 * or rejected).  Returns 0 (a batch ran, maybe empty), 1 (another replica
 * leads: nothing done), -1 (PostgreSQL or store failure: the rows stay in
 * the table; stats.last_error says why). */
int sc_relay_run_once(sc_relay *r, size_t *rows);

/* Wake the relay thread now (as a NOTIFY would). */
void sc_relay_wake(sc_relay *r);

typedef struct sc_relay_stats {
    bool     connected;
    bool     leader;
    uint64_t rows_stored;            /* appended to the store */
    uint64_t rows_duplicate;         /* already in the store (after a crash) */
    uint64_t rows_rejected;          /* refused for good, kept in __relay_rejected */
    uint64_t batches;                /* committed PostgreSQL transactions */
    uint64_t errors;                 /* failed batches (PostgreSQL or store) */
    uint64_t notifies;               /* notifications received */
    int64_t  last_batch_ms;          /* clock time of the last committed batch */
    int64_t  lag_ms;                 /* age of the newest row stored in the
                                        last batch when it was stored */
    char     last_error[256];        /* "" when none since the last success */
} sc_relay_stats;

void sc_relay_get_stats(sc_relay *r, sc_relay_stats *out);

#endif /* SC_RELAY_H */
