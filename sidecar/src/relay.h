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
 *      Standbys never block the leader.  A leader whose store refused
 *      three batches in a row (full, I/O errors) steps down for its retry
 *      backoff, so that a replica whose store works can take over.
 *   2. LISTEN outbox_messages (the insert trigger NOTIFYs on commit) and
 *      wait for a notification or poll_interval, whichever comes first.
 *   3. A batch: BEGIN; SELECT the oldest `batch` rows by id; append a
 *      small marker record (the batch's id range) to the internal topic
 *      SC_RELAY_MARKER_TOPIC, then each row -- unless it is a row an
 *      unfinished earlier batch may have stored (a crash before its DELETE
 *      committed) and the store has its msg_id already, so that no row is
 *      stored twice; fdatasync the store (brk_store_flush) whatever the
 *      flush mode, because deleting the row is the acknowledgement; DELETE
 *      the rows by id; COMMIT.  A full batch is followed at once by the
 *      next.  Only rows of unfinished batches are looked up (the markers
 *      say which, and from which log offset on), so a restart with a
 *      backlog does not pay a store-wide lookup per row; see relay.c.
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
 * relay reconnects with exponential backoff and jitter.  Without any
 * marker (a store that never had one, or whose markers retention removed)
 * nothing is looked up: at worst a row is stored twice with the same
 * msg_id (at-least-once).
 *
 * Threads: open starts the relay thread (unless opts.no_thread: tests call
 * sc_relay_run_once); close stops it after the batch in hand, cancelling
 * a batch still blocked in PostgreSQL after a grace period of 2 s.
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
#define SC_RELAY_MARKER_TOPIC  "__relay"   /* one marker per batch */
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
    uint32_t fail_before_commit_test;/* tests only: the next N batches that
                                        have rows fail after their DELETE,
                                        instead of COMMIT, as if the session
                                        died there (rows stored, not
                                        deleted); 0 in production */
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

/* Stop the thread (finishing the batch in hand; one still blocked in
 * PostgreSQL after 2 s, e.g. on a row lock an application holds, is
 * cancelled and rolls back, its rows staying in the table), release
 * leadership, close the connection.  NULL is a no-op. */
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
    uint64_t lookups;                /* msg_id lookups in the store: rows of
                                        batches that may not have finished
                                        (counted when made, committed or
                                        not); every other row is appended
                                        without one */
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
