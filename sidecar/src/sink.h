/*
 * sink.h - where committed messages are forwarded (issue 7): the seam
 * between the forwarder and a downstream engine.
 *
 * STATUS: contract only.  Written at the end of issue 6 as the plan for
 * issue 7; nothing includes it yet.  The next session implements it
 * (forwarder.c, sink_nats.c, sink_redis.c) or revises it, saying why.
 *
 * A sink publishes a batch of messages of ONE queue (same topic, same
 * queue, in queue order) and answers per message.  The forwarder hands a
 * queue's next batch only after the previous one of that queue was
 * answered, so per-key order (key -> queue) holds downstream as long as
 * the sink keeps the order within a batch (NATS: one subject per topic,
 * async publishes acked in order per subject; Redis: one XADD pipeline).
 *
 *   publish(ctx, msgs, n, out)  ->  out[i] per message:
 *     SC_SINK_STORED     the engine has it (acked: JetStream PubAck,
 *                        XADD reply)
 *     SC_SINK_DUPLICATE  the engine already had it (JetStream
 *                        "duplicate": true within the duplicate window;
 *                        the Redis script saw the id) - counts as stored
 *     SC_SINK_RETRY      not now (timeout, connection refused, 503,
 *                        no responders): the message and every later one
 *                        of its queue wait; the forwarder backs off with
 *                        jitter; N consecutive failures mark the sink down
 *                        and start spooling (spool.h)
 *     SC_SINK_REJECTED   never (too large for the engine, invalid
 *                        subject): dead-lettered to "__sink_dlq.<sink>"
 *                        with the reason as a header, and its queue moves on
 *   The return value is the sink's state after the call: SC_SINK_UP or
 *   SC_SINK_DOWN (the forwarder's metrics and spool decision use it).
 *
 * Ids: every message carries its outboxd msg_id; the sink sends it as the
 * engine's de-duplication id (NATS: the Nats-Msg-Id header; Redis: the id
 * recorded by the idempotent XADD script with a TTL), so a batch sent
 * twice around a failure is stored once downstream.
 *
 * Threads: one forwarder thread per sink calls publish; a sink need not be
 * thread-safe.  close() after the forwarder stopped.
 */
#ifndef SC_SINK_H
#define SC_SINK_H

#include <stddef.h>
#include <stdint.h>

#include "broker/record.h"

typedef enum sc_sink_result {
    SC_SINK_STORED = 1,
    SC_SINK_DUPLICATE,
    SC_SINK_RETRY,
    SC_SINK_REJECTED
} sc_sink_result;

typedef enum sc_sink_state {
    SC_SINK_UP = 1,
    SC_SINK_DOWN
} sc_sink_state;

/* One message as the forwarder hands it over: a view of a stored record
 * (valid during the call), and the reason a REJECTED answer is filled in. */
typedef struct sc_sink_msg {
    const brk_record *rec;           /* topic, key, tag, props, body, msg_id */
    char reason[160];                /* set by the sink with SC_SINK_REJECTED */
} sc_sink_msg;

typedef struct sc_sink {
    const char *name;                /* "nats", "redis": metrics, logs, DLQ */
    sc_sink_state (*publish)(void *ctx, sc_sink_msg *msgs, size_t n,
                             sc_sink_result *out);
    /* Start-up checks (stream exists / duplicate window long enough / Redis
     * persistence) and connection; 0, or 78 (configuration) / 69 (not
     * reachable: the forwarder starts anyway and spools) with err set. */
    int  (*open)(void *ctx, char *err, size_t errlen);
    void (*close)(void *ctx);
    void *ctx;
} sc_sink;

#endif /* SC_SINK_H */
