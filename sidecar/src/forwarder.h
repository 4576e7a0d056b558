/*
 * forwarder.h - committed topics -> a sink, in queue order, resumable
 * (issue 7).
 *
 * STATUS: contract only (plan written at the end of issue 6; nothing
 * includes it yet).  See sink.h for the per-message answers.
 *
 * Design:
 *   - Which topics: all user topics (not "__*"), or a configured list, each
 *     with its subject/stream name (`<prefix>.<topic>` for NATS,
 *     `<prefix><topic>` for Redis).  Topics created later are picked up.
 *   - Progress: per (topic, queue) the next queue offset to forward,
 *     persisted with brk_store_state_write("fwd-<sink>") at most every
 *     state_interval_ms and at close; a restart resumes from it and the
 *     engine de-duplicates what was sent again (msg_id).  The forwarder
 *     registers a store retention cursor ("fwd-<sink>") at the lowest log
 *     offset it still needs, so unforwarded messages are never deleted by
 *     retention (the disk budget then turns writes away with 507 instead:
 *     the file spool is the store itself).
 *   - Order: one batch per queue in flight; a RETRY answer stops that queue
 *     at that message (later messages of the queue wait), other queues go
 *     on.  Backoff per queue: exponential with full jitter
 *     (sc_pg_backoff_ms-style, min/max configurable).
 *   - Wake-up: the store listener (brk_store_set_listener) wakes the
 *     forwarder on append; a poll interval is the fallback.
 *   - Sink down (N consecutive RETRY batches, or open() said unreachable):
 *     state DOWN since <time>; with spool = redis the backlog is moved to
 *     Redis (spool.h) and forwarding resumes from the spool first when the
 *     sink is back, so new messages of a queue go behind its spooled
 *     backlog; with spool = file (default) the backlog simply stays in the
 *     store behind the retention cursor.
 *   - Metrics / status: sink state and since, lag per topic (messages and
 *     oldest age), spool depth and oldest age, forwarded / duplicate /
 *     rejected / retried totals.
 *
 * State machine per sink:  UP --N failures--> DOWN --probe ok--> DRAINING
 * (spool replay, then store backlog) --caught up--> UP.
 */
#ifndef SC_FORWARDER_H
#define SC_FORWARDER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/store.h"
#include "log.h"
#include "sink.h"

typedef struct sc_forwarder sc_forwarder;

typedef struct sc_forwarder_opts {
    brk_store *store;                /* borrowed */
    const sc_sink *sink;             /* borrowed; opened by the forwarder */
    const char *const *topics;       /* NULL: every user topic */
    size_t   ntopics;
    uint32_t batch;                  /* messages per publish, default 256 */
    uint32_t down_after;             /* consecutive failed batches, default 5 */
    int64_t  backoff_min_ms;         /* default 100 */
    int64_t  backoff_max_ms;         /* default 30000 */
    int64_t  poll_interval_ms;       /* default 1000 */
    int64_t  state_interval_ms;      /* progress persisted, default 1000 */
    sc_log  *log;
} sc_forwarder_opts;

void sc_forwarder_opts_init(sc_forwarder_opts *o);
int  sc_forwarder_open(sc_forwarder **out, const sc_forwarder_opts *o,
                       char *err, size_t errlen);
void sc_forwarder_close(sc_forwarder *f);

typedef struct sc_forwarder_stats {
    bool     up;
    int64_t  state_since_ms;
    uint64_t forwarded, duplicates, rejected, retries;
    uint64_t lag_messages;           /* committed, not yet forwarded */
    int64_t  oldest_unforwarded_ms;  /* store time, 0 when none */
    uint64_t spool_depth;            /* with a redis spool */
    int64_t  spool_oldest_ms;
} sc_forwarder_stats;

void sc_forwarder_get_stats(sc_forwarder *f, sc_forwarder_stats *out);

#endif /* SC_FORWARDER_H */
