/*
 * spool.h - where the backlog waits while the sink is down (issue 7).
 *
 * STATUS: contract only (plan written at the end of issue 6; nothing
 * includes it yet).
 *
 * Two kinds:
 *   file (default)  nothing moves: the backlog stays in outboxd's own store,
 *                   held by the forwarder's retention cursor, within the
 *                   disk budget.  This vtable is then a no-op.
 *   redis           the backlog is moved to Redis under a spool key
 *                   (`<prefix>spool:<instance>`, configurable), one Redis
 *                   Stream per (topic, queue) so replay keeps queue order:
 *                   XADD of the whole record (msg_id, topic, key, tag,
 *                   headers, body, born/store times).  A message counts as
 *                   spooled only after Redis acknowledged it (and, when
 *                   Redis is not configured with appendfsync always, outboxd
 *                   warns at start: an acknowledged entry can be lost by a
 *                   Redis crash).  After that the forwarder's cursor may
 *                   pass it, so the pod's disk is no longer needed for it.
 *
 * Replay: any outboxd started with the same spool key drains it first
 * (oldest per queue first, XRANGE + XDEL after the sink's answer), then the
 * store's backlog; messages keep their original msg_id, so the engine
 * de-duplicates whatever was sent twice around a failure.
 *
 * SIGTERM with the sink down and a redis spool: the unforwarded backlog is
 * moved to Redis within the shutdown grace.  Redis failing while spooling:
 * fall back to file (the cursor simply stops advancing) and say so in the
 * log and in the metrics.
 */
#ifndef SC_SPOOL_H
#define SC_SPOOL_H

#include <stddef.h>
#include <stdint.h>

#include "sink.h"

typedef struct sc_spool {
    const char *name;                /* "file", "redis" */
    /* Store n messages of one queue, in order; 0 or -1 (then fall back). */
    int  (*put)(void *ctx, const sc_sink_msg *msgs, size_t n);
    /* Up to max oldest messages of the spool, for replay, into a buffer the
     * spool owns until the next call; 0 with *n = 0 when empty. */
    int  (*peek)(void *ctx, const sc_sink_msg **msgs, size_t max, size_t *n);
    /* Drop the first n peeked messages (the sink stored them). */
    int  (*drop)(void *ctx, size_t n);
    uint64_t (*depth)(void *ctx, int64_t *oldest_ms);
    void (*close)(void *ctx);
    void *ctx;
} sc_spool;

#endif /* SC_SPOOL_H */
