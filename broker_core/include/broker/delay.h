/*
 * broker/delay.h - delayed delivery on top of a brk_store.
 *
 * A delayed message is appended at once (durably, per the store's flush
 * mode) to the internal topic "__delay", with its target topic and due time
 * as system properties, and keeps its final message id.  When it is due, the
 * scheduler appends it to its target topic (same id, key, tag, headers,
 * body, born time; queue chosen by key as for any append) and it becomes
 * visible to consumers there.
 *
 * Guarantees
 *   - A delayed message that brk_delay_send acknowledged is delivered once
 *     into its topic, also across restarts and crashes: the scheduler never
 *     appends it twice (see src/delay.c for how firing is recorded).
 *   - Timers survive restart: they are rebuilt from the log at open.
 *   - Equal due times fire in send order (the log order of the sends).
 *   - Memory per pending delayed message is a 16-byte timer plus an 8-byte
 *     slot in a sorted array of pending log offsets: 24..36 bytes with
 *     growth slack (bench/README.md has the measured figures).
 *   - No message is delivered before its due time by the store's clock;
 *     the background thread fires within milliseconds of it (bench).
 *
 * Caveats
 *   - "Acknowledged" means as durable as the store's flush mode makes it:
 *     in ASYNC mode a power loss can lose a send (or a delivery, which is
 *     then redone) that was not yet flushed, never duplicate one.
 *   - After a crash, whether a fired message reached its topic is decided
 *     by finding a record with its message id in its target topic, so ids
 *     must be unique (UUIDv7 from the store, or the caller's own unique id).
 *   - The scheduler holds its records against retention with an in-memory
 *     cursor: open it right after the store, before the store's first
 *     retention run.
 *   - With compaction, a copied message keeps its due time but ranks behind
 *     equal due times sent after it.
 *
 * Threads: every function is thread-safe.  Unless opts.no_background, one
 * thread sleeps until the next due time and fires it; brk_delay_tick does
 * the same work on the caller's thread.
 */
#ifndef BROKER_DELAY_H
#define BROKER_DELAY_H

#include <stdbool.h>
#include <stdint.h>

#include "broker/status.h"
#include "broker/store.h"

typedef struct brk_delay brk_delay;

#define BRK_DELAY_TOPIC      "__delay"
#define BRK_DELAY_OP_TOPIC   "__delay_op"
#define BRK_DELAY_LEVELS     18
#define BRK_DELAY_MAX_DEFAULT_MS (40LL * 24 * 3600 * 1000)   /* 40 days */

/* RocketMQ's levels: 1 -> 1 s, 2 -> 5 s, 3 -> 10 s, 4 -> 30 s, 5 -> 1 min,
 * 6..14 -> 2..10 min, 15 -> 20 min, 16 -> 30 min, 17 -> 1 h, 18 -> 2 h.
 * Returns the delay in ms, or -1 for a level outside 1..18. */
int64_t brk_delay_level_ms(int level);

typedef struct brk_delay_opts {
    int64_t  max_delay_ms;      /* sends further out are BRK_RANGE; default 40 days */
    uint32_t fire_batch;        /* messages fired per op record, default 256 */
    int64_t  compact_after_ms;  /* a pending record older than this is copied
                                   to the log's end so retention can free its
                                   segment; default 24 h; <= 0 never */
    uint32_t state_interval_ms; /* how often tick saves state.delay, default 1000 */
    bool     no_background;     /* tests: no thread, call brk_delay_tick */
} brk_delay_opts;

void brk_delay_opts_init(brk_delay_opts *o);

/* Open the scheduler over an open store (which must outlive it), creating
 * its internal topics if needed and rebuilding pending timers from the log.
 * On failure *out is NULL and errbuf (if given) says why. */
brk_status brk_delay_open(brk_delay **out, brk_store *s,
                          const brk_delay_opts *opts, char *errbuf,
                          size_t errlen);

/* Stop the thread, save state, free.  Pending timers stay in the log. */
brk_status brk_delay_close(brk_delay *d);

typedef struct brk_delay_res {
    uint8_t  msg_id[BRK_UUID_LEN];
    int64_t  deliver_at_ms;     /* when it becomes visible */
    bool     delayed;           /* false: it was due already and was appended
                                   straight to its topic (queue/offset set) */
    uint16_t queue;
    uint64_t queue_offset;
} brk_delay_res;

/* Send `req` (as for brk_store_append; req->queue must be -1) for delivery
 * at deliver_at_ms (wall ms).  A time at or before now appends it at once.
 * Errors: INVAL (bad field, explicit queue, system properties), RANGE
 * (further out than max_delay_ms), NOTFOUND (unknown topic and the store
 * does not auto-create), and the store's append errors.  req->msg_id, when
 * given, is kept (a committed transaction keeps its half message's id). */
brk_status brk_delay_send(brk_delay *d, const brk_append_req *req,
                          int64_t deliver_at_ms, brk_delay_res *res);

/* Fire everything due by the clock's now on the caller's thread, copy
 * forward pending records older than compact_after_ms, and save state when
 * state_interval_ms has passed.  *fired (may be NULL) counts messages
 * delivered.  A delivery that fails (e.g. the store is full) stays pending
 * and is retried on a later tick, 100 ms after the failure doubling up to
 * 30 s; the call then returns the first error met (BRK_OK otherwise). */
brk_status brk_delay_tick(brk_delay *d, unsigned *fired);

/* The longest delay brk_delay_send accepts (opts.max_delay_ms), so a
 * transaction can refuse at prepare a delay its commit could not honour. */
int64_t brk_delay_max_ms(brk_delay *d);

/* Earliest pending due time, false when nothing is pending. */
bool brk_delay_next_due(brk_delay *d, int64_t *due_ms);

typedef struct brk_delay_stats {
    uint64_t pending;           /* scheduled, not yet delivered */
    uint64_t scheduled_total;   /* sends that were delayed, since open */
    uint64_t fired_total;       /* delivered into their topic, since open */
    uint64_t errors_total;      /* failed appends of ops, deliveries and
                                   compaction copies, since open */
    uint64_t compacted_total;   /* records copied forward, since open */
    int64_t  next_due_ms;       /* 0 when nothing is pending */
    uint64_t memory_bytes;      /* heap + index memory held for timers */
} brk_delay_stats;

void brk_delay_get_stats(brk_delay *d, brk_delay_stats *out);

#endif /* BROKER_DELAY_H */
