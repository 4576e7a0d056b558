/*
 * broker/group.h - consumer groups: POP-style receive, ack/nack, retries,
 * dead letters, FIFO groups, progress and lag.
 *
 * A group consumes one or more topics (one subscription per topic, each
 * with an optional tag filter).  Receiving hands out a batch of messages,
 * each with a receipt, and makes them invisible to the group for
 * invisible_ms; the consumer acks each one after processing it.  An unacked
 * message comes back: on nack, or when its invisibility runs out, it is
 * redelivered on RocketMQ's retry schedule (10 s, 30 s, 1 min, 2 min, ...
 * 2 h: the delay levels from 3 on), and after max_deliveries it moves to the
 * group's dead-letter topic.  A non-FIFO retry is a copy of the message in
 * the group's internal retry topic (one queue per delay level, so each
 * queue is in due order), which lets the original queue's progress move
 * on; a FIFO retry keeps its place in its queue.  The broker picks the queues for each receive,
 * so any number of consumers share a topic's work.
 *
 * Modes
 *   clustering (default)  each message goes to one member at a time; the
 *                         group has one progress per queue.
 *   broadcast             every member (named in the receive) gets every
 *                         message, with its own progress.
 *   fifo                  (with either) a queue's messages are delivered one
 *                         after another: the next only once the previous is
 *                         acked or dead-lettered; a retry keeps its place;
 *                         other queues keep flowing.
 *
 * Progress and duplicates
 *   Per group (member) and queue the committed offset is the lowest offset
 *   not yet acked.  It is persisted every persist_interval_ms, at close, and
 *   on every ack when the group sets persist_every_ack.  After a crash,
 *   delivery resumes at the persisted offset: every message is delivered at
 *   least once, and the duplicates are at most what was acked since the
 *   last persist (bound documented in src/group.c).  Each subscription
 *   holds a retention cursor, so segments stay until consumed.
 *
 * Long polling
 *   brk_group_receive never blocks.  A caller with nothing to do registers
 *   a waiter (brk_group_wait) with a callback; the callback runs once, on a
 *   broker thread, when the group may have something for it (an append to
 *   the topic, a retry or an invisibility coming due, a FIFO queue
 *   unblocked) or when its deadline passes, and the caller then receives
 *   again.  A waiter costs memory, no thread and no CPU while idle, so an
 *   HTTP server can park thousands of requests.  brk_group_receive_wait is
 *   the blocking convenience for in-process consumers.
 *
 * Threads: every function is thread-safe.  Unless opts.no_background, one
 * thread handles timeouts (invisibility, waiter deadlines, FIFO retry
 * times) and periodic persistence; brk_groups_tick does it on the caller's
 * thread.
 */
#ifndef BROKER_GROUP_H
#define BROKER_GROUP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/status.h"
#include "broker/store.h"

typedef struct brk_groups brk_groups;

#define BRK_GROUP_MAX          64    /* name: 1..64 of [A-Za-z0-9._-] */
#define BRK_MEMBER_MAX         48    /* broadcast member name, same charset */
#define BRK_FILTER_MAX         512   /* "*", "tag", "a || b || c" */
#define BRK_RECEIPT_MAX        95    /* receipt text, NUL not counted */
#define BRK_RECEIVE_MAX        256   /* messages per receive */
#define BRK_WAIT_MAX_MS        30000
#define BRK_MAX_DELIVERIES_DEFAULT 16

/* Delay before the n-th redelivery (n >= 1: after the first delivery
 * failed): 10 s, 30 s, 1 min, 2 min, 3 min, ... 10 min, 20 min, 30 min,
 * 1 h, 2 h, then 2 h. */
int64_t brk_group_retry_delay_ms(uint32_t n);

typedef struct brk_groups_opts {
    uint32_t persist_interval_ms;   /* default 1000 */
    uint32_t default_invisible_ms;  /* when a receive gives 0; default 30000 */
    bool     no_background;         /* tests: call brk_groups_tick */
} brk_groups_opts;

void brk_groups_opts_init(brk_groups_opts *o);

/* Open over a store (which outlives it), loading every group's
 * configuration and progress, and install the store listener
 * (brk_store_set_listener) that wakes long-polling waiters. */
brk_status brk_groups_open(brk_groups **out, brk_store *s,
                           const brk_groups_opts *opts, char *errbuf,
                           size_t errlen);

/* Persist progress, wake every waiter (its callback runs, as at a
 * deadline), stop the thread, free.  Calls in progress on other threads
 * finish first (a blocked brk_group_receive_wait returns BRK_CLOSED at
 * once); calls that begin while close runs return BRK_CLOSED; none may
 * begin after it returned.  The groups' retention cursors stay registered
 * with the store, so a store that stays open keeps every segment the
 * groups have not consumed until they are opened again (or the store
 * closes). */
brk_status brk_groups_close(brk_groups *g);

typedef struct brk_group_config {
    bool     fifo;
    bool     broadcast;
    uint16_t max_deliveries;        /* 1..1000, default 16 */
    uint32_t max_inflight;          /* messages, default 1000 */
    uint64_t max_inflight_bytes;    /* default 100 MiB */
    bool     persist_every_ack;
} brk_group_config;

void brk_group_config_init(brk_group_config *c);

/* Create a group subscribed to `topic` with `filter` (NULL or "*": every
 * tag), or change an existing one (*created says which).  A group may
 * subscribe to several topics: putting another topic adds a subscription.
 * Changing fifo or broadcast of a group with progress is BRK_CONFLICT.
 * BRK_INVAL for a bad name, filter or config; BRK_NOTFOUND for an unknown
 * topic when the store does not auto-create.  Durable before it returns. */
brk_status brk_group_put(brk_groups *g, const char *group, const char *topic,
                         const char *filter, const brk_group_config *cfg,
                         bool *created);

typedef struct brk_receive_req {
    const char *group;
    const char *topic;
    const char *member;             /* broadcast groups: required */
    uint32_t max;                   /* 1..BRK_RECEIVE_MAX */
    uint32_t invisible_ms;          /* 0: opts.default_invisible_ms */
} brk_receive_req;

typedef struct brk_received {
    char receipt[BRK_RECEIPT_MAX + 1];
    uint16_t queue;
    uint64_t offset;                /* queue offset in the topic */
    uint32_t delivery_count;        /* 1 on the first delivery */
    brk_record rec;                 /* a view into the batch; props hold only
                                       user headers (system ones stripped) */
} brk_received;

typedef struct brk_receive_batch {
    size_t count;
    brk_received *msgs;
    void *priv_;
} brk_receive_batch;

void brk_receive_batch_free(brk_receive_batch *b);

/* Receive up to req->max messages now; an empty batch when nothing is
 * ready.  A group unknown so far is created (clustering, defaults,
 * subscribed to req->topic with no filter).  Fewer messages than asked when
 * the group is at its in-flight bound (BRK_LIMIT when it returns none for
 * that reason).  Errors: INVAL (bad request), NOTFOUND (unknown topic and
 * no auto-creation). */
brk_status brk_group_receive(brk_groups *g, const brk_receive_req *req,
                             brk_receive_batch **out);

/* Long polling.  Registers `fn(ctx)` to run once (on a broker thread; it
 * must not block nor call back into brk_groups synchronously... it may
 * signal, enqueue or resume an HTTP connection) when req's group may have
 * messages or at deadline_ms (wall ms).  *id identifies the waiter for
 * brk_group_wait_cancel; after the callback ran it is gone.  If messages
 * are ready already, fn runs before brk_group_wait returns. */
typedef void (*brk_group_wake_fn)(void *ctx);
brk_status brk_group_wait(brk_groups *g, const brk_receive_req *req,
                          int64_t deadline_ms, brk_group_wake_fn fn,
                          void *ctx, uint64_t *id);

/* Remove a waiter whose callback has not run; false when it already ran
 * (or is running: cancel then waits for it to return). */
bool brk_group_wait_cancel(brk_groups *g, uint64_t id);

/* Blocking receive for in-process consumers: receive, and if empty wait up
 * to wait_ms (<= BRK_WAIT_MAX_MS) for messages. */
brk_status brk_group_receive_wait(brk_groups *g, const brk_receive_req *req,
                                  uint32_t wait_ms, brk_receive_batch **out);

/* Settle a message by receipt.  BRK_OK; BRK_INVAL for a malformed receipt;
 * BRK_NOTFOUND for an unknown group; BRK_CONFLICT for a stale receipt (the
 * message was redelivered since, acked already, or the receipt is from
 * before a restart). */
brk_status brk_group_ack(brk_groups *g, const char *group, const char *receipt);

/* Give a message back: it is redelivered after delay_ms (0: the retry
 * schedule for its delivery count; otherwise rounded up to the next delay
 * level, at most 2 h), or dead-lettered when it has had max_deliveries.  `reason` (may be NULL, <= 1024 bytes) is kept with it
 * and shown with the dead letter. */
brk_status brk_group_nack(brk_groups *g, const char *group, const char *receipt,
                          uint32_t delay_ms, const char *reason);

/* Extend or shorten a message's invisibility to invisible_ms from now.
 * The receipt stays valid. */
brk_status brk_group_change_invisibility(brk_groups *g, const char *group,
                                         const char *receipt,
                                         uint32_t invisible_ms);

/* Dead letters of a group, oldest first, starting at `from` (an index in
 * the group's dead-letter topic), at most max.  Each record carries the
 * original topic, queue, offset, delivery count and last reason as user
 * headers "outboxd-dlq-*" (documented in src/group.c). */
brk_status brk_group_dead_letters(brk_groups *g, const char *group,
                                  uint64_t from, size_t max, brk_batch **out);

/* Append up to max dead letters (oldest not yet replayed first) back to
 * their original topics, with their original message ids; *replayed says
 * how many. */
brk_status brk_group_replay_dead_letters(brk_groups *g, const char *group,
                                         size_t max, size_t *replayed);

typedef struct brk_group_lag_row {
    char topic[BRK_TOPIC_MAX + 1];
    char member[BRK_MEMBER_MAX + 1];/* broadcast: the member; else "" */
    int32_t  queue;                 /* -1: the topic's totals */
    uint64_t max_offset;
    uint64_t committed_offset;
    uint64_t lag;                   /* max - committed */
    uint64_t inflight;
    int64_t  oldest_unacked_ms;     /* store time of the oldest unacked
                                       message; 0 when none */
    uint64_t dead_letters;          /* totals row only */
} brk_group_lag_row;

/* Lag of every subscription, a row per queue then a totals row per topic
 * (and member).  *rows is malloc'ed. */
brk_status brk_group_lag(brk_groups *g, const char *group,
                         brk_group_lag_row **rows, size_t *count);

/* A group's current configuration (so a caller can change one setting
 * with brk_group_put without resetting the others).  NOTFOUND for an
 * unknown group, INVAL for a bad name, CLOSED after close. */
brk_status brk_group_get_config(brk_groups *g, const char *group,
                                brk_group_config *out);

/* Names of every group, in creation order (for metrics and listings).
 * *names is malloc'ed (free with free()); BRK_CLOSED after close. */
typedef char brk_group_name[BRK_GROUP_MAX + 1];
brk_status brk_groups_list(brk_groups *g, brk_group_name **names,
                           size_t *count);

/* Timeouts and persistence on the caller's thread (no_background). */
brk_status brk_groups_tick(brk_groups *g);

#endif /* BROKER_GROUP_H */
