/*
 * group.c - consumer groups over a brk_store (see broker/group.h).
 *
 * A group is memory plus three kinds of topics in the store: the topics it
 * subscribes to (never written by this module), its retry topic(s) and its
 * dead-letter topic.  Progress lives in memory and in one state file.
 *
 * CONSUMER STATE
 * ==============
 * Registry (brk_groups) -> group -> member -> per subscription -> per queue.
 *
 *   group       name, config, subscriptions (topic + tag filter), members,
 *               dlq replay offset, a receipt generation counter.
 *   member      clustering groups have exactly one, named "" (the whole
 *               group); broadcast groups one per member name, created by the
 *               member's first receive.  A member owns its in-flight
 *               counters (the flow-control bound applies per member, which
 *               for clustering is per group), its retry topic and a rotating
 *               queue index for receive.
 *   qstate      per (member, subscription, queue), for the topic's queues
 *               ("main") and, non-FIFO, the subscription's 18 retry queues:
 *                 committed  lowest queue offset not settled
 *                 next       lowest offset never handed out (>= committed)
 *                 fl[]       deliveries in flight, sorted by offset
 *                 sp[]       settled ranges [lo, hi) above committed
 *               Every offset in [committed, next) is either in fl or in sp;
 *               committed absorbs sp ranges as it reaches them.
 *
 * A receive (or wait) names a topic: an unknown group is created
 * (clustering, defaults, no filter) and a known group that does not
 * consume the topic yet gets a subscription to it (no filter), as topics
 * are created on first use.  Subscriptions are never removed.
 *
 * "Settled" means acked, skipped by the tag filter, dead-lettered, or (non-
 * FIFO) copied into the retry topic.  A filter is a set of tags; consume-
 * queue entries whose tag_hash is not in the set are skipped without
 * reading the record, a matching hash is confirmed on the record itself
 * (hash collisions are skipped too).
 *
 * STATE MACHINE OF A DELIVERED MESSAGE (per member)
 * =================================================
 *
 *          receive: count 1 (a retry copy: its "count" + 1), new gen
 *   NEW -----------------------------------------------------> OUT(c)
 *
 *   OUT(c) --ack (receipt gen matches)---------------------> SETTLED
 *   OUT(c) --change_invisibility--> OUT(c), new visible_at, same receipt
 *   OUT(c) --nack, or visible_at passed:
 *              c >= max_deliveries: dead letter appended --> SETTLED
 *              non-FIFO: retry copy appended ------------> SETTLED
 *                 (the copy is a NEW message of a retry queue, not
 *                  delivered before failure time + delay)
 *              FIFO: -----------------------------------> WAIT(c)
 *                 (keeps blocking its queue until failure time + delay)
 *   WAIT(c) --receive once due: count c+1, new gen--------> OUT(c+1)
 *   OUT(c) --the append of the copy failed---------------> OUT(c), due
 *                                                 again FAIL_BACKOFF_MS later
 *
 * delay = the nack's delay_ms rounded up to a level (at most 2 h), else
 * brk_group_retry_delay_ms(c).  The failure time is now for a nack and
 * visible_at for an expiry, however late the tick notices it.
 *
 * Expiry is found by brk_groups_tick (the background thread) at the
 * group's timer, and by a receive for the member, which handles its own
 * expired deliveries first.  An ack that comes after visible_at but before
 * the expiry was handled is still accepted (the receipt is still current).
 * A receipt is stale (BRK_CONFLICT) once its message is settled,
 * redelivered (new gen) or moved to WAIT, and after a restart (epoch).
 *
 * RECEIPTS
 * ========
 *   "<epoch>.<sub>.<member>.<kind>.<queue>.<offset>.<gen>"
 *   epoch   16 lower-case hex digits, random per brk_groups_open
 *   sub     subscription index in the group (decimal)
 *   member  member index in the group (decimal; 0 for clustering)
 *   kind    'm' a queue of the subscribed topic, 'r' a retry queue
 *   queue   queue id in that topic (retry: sub * 18 + level - 1)
 *   offset  queue offset (u64)
 *   gen     the group's delivery generation (u64, unique per delivery)
 * At most 16+1+2+1+10+1+1+1+4+1+20+1+20 = 79 characters.
 *
 * RETRY TOPICS (non-FIFO)
 * =======================
 * "__retry.<group>" (clustering) or "__retry.<group>.<member>" (broadcast).
 * 18 queues per subscription: queue sub*18 + (level-1) holds retries whose
 * delay is level's (brk_delay_level_ms), so every queue is in due order and
 * only its head needs looking at.  (With one subscription this is "queue i
 * = level i+1"; more subscriptions grow the topic by 18 queues each, so a
 * receive for one topic never sees another topic's retries; hence at most
 * BRK_QUEUES_MAX/18 = 56 subscriptions per group.)  Names that would
 * collide ("__retry.a.b" for group "a" member "b" and group "a.b") are
 * refused with BRK_CONFLICT when the second one is created.
 *
 * A retry copy: same msg_id, key, tag, body, flags and born_ms; props are
 * the user's pairs followed by these system pairs (values little-endian):
 *   "\x1fotopic"     original topic
 *   "\x1foqueue"     u16, original queue
 *   "\x1fooffset"    u64, original queue offset
 *   "\x1fcount"      u32, deliveries so far (the copy's first delivery has
 *                    count + 1)
 *   "\x1fnotbefore"  i64, wall ms; the queue's head is not delivered before
 *   "\x1freason"     the last nack reason, <= 1024 bytes (optional)
 * A retry of a retry keeps otopic/oqueue/ooffset.  The copy is appended
 * (allow_internal) before the original is settled; in SYNC mode the copies
 * of one expiry round are appended with defer_sync and made durable by one
 * brk_store_flush before any original is settled.
 *
 * DEAD LETTERS
 * ============
 * "__dlq.<group>", 1 queue.  The message (same msg_id, key, tag, body,
 * flags, born_ms) with its user props (system pairs and earlier
 * "outboxd-dlq-*" pairs dropped) plus these user-visible headers, values
 * in decimal text:
 *   outboxd-dlq-topic       original topic
 *   outboxd-dlq-queue       original queue
 *   outboxd-dlq-offset      original queue offset
 *   outboxd-dlq-deliveries  deliveries made
 *   outboxd-dlq-reason      last reason (nack's, "invisibility timed out",
 *                           or the retry copy's), when there is one
 *   outboxd-dlq-group       the group
 *   outboxd-dlq-member      broadcast member (broadcast groups only)
 * Replay appends a dead letter back to outboxd-dlq-topic (queue by key, same
 * msg_id, the outboxd-dlq-* headers dropped) and moves the group's replay
 * offset past it.  Dead letters are not held against retention.  In a
 * broadcast group a replayed message goes to every member again.
 *
 * STATE FILE "state.groups" (brk_store_state_write frames it and adds the
 * CRC), little-endian:
 *
 *   u32  magic 0x31505247 (bytes "GRP1")
 *   u32  version 1
 *   u32  ngroups
 *   per group:
 *     u8   name length, name
 *     u8   flags: 1 fifo, 2 broadcast, 4 persist_every_ack, 8 progress
 *     u16  max_deliveries
 *     u32  max_inflight
 *     u64  max_inflight_bytes
 *     u64  dlq replay offset (next dead letter to replay)
 *     u16  nsubs
 *     per subscription: u8 topic length, topic, u16 filter length, filter
 *                       (as given; "*" for all)
 *     u32  nmembers
 *     per member: u8 name length, name (length 0: the clustering member)
 *       per subscription:
 *         u16 nmain, nmain x QUEUE for the topic's queues 0..nmain-1
 *         u8  nretry (0 or 18), nretry x QUEUE for its retry queues
 *   QUEUE:
 *     u64  committed offset
 *     u32  nspans, nspans x { u64 lo, u64 hi }: offsets [lo, hi) above
 *          committed that were settled out of order (ascending, disjoint,
 *          lo > committed), so an ack past an older open message survives
 *          a restart too
 * A missing file is an empty registry; a bad CRC or framing refuses open
 * (BRK_CORRUPT): starting over would redeliver every retained message.
 * At open, next = committed and the receive steps over the saved spans.
 *
 * PERSISTENCE, RETENTION AND THE DUPLICATE BOUND
 * ==============================================
 * Progress is memory first: an ack changes the qstate and marks the
 * registry dirty (an atomic counter).  The file is rewritten whole when
 * something changed: by the tick every persist_interval_ms, at close,
 * synchronously by brk_group_put and by every ack/nack of a group with
 * persist_every_ack.  After each save every
 * (member, subscription) moves its retention cursor
 * "grp:<group>:<topic>[:<member>]" to the lowest log offset of the entries
 * at its committed offsets (main and retry queues); a fully consumed queue
 * counts as the durable end read before the save.  Cursors are registered
 * again at open, before the first retention run if the groups are opened
 * right after the store.  Close leaves them registered (they die with the
 * store; registering again returns the same one), so a store that stays
 * open after brk_groups_close keeps what the groups have not consumed.
 *
 * After a restart consumption resumes at the saved committed offsets: in-
 * flight deliveries are simply delivered again (delivery counts start at 1
 * for main-queue messages; retry copies carry theirs).  What a crash can
 * deliver twice, per member and queue:
 *   - messages acked (or skipped) since the last save: at most
 *     persist_interval_ms worth (none with persist_every_ack, whose ack
 *     returns after the save);
 *   - every message in flight at the crash (it was never acked);
 *   - a message nacked or expired since the last save: its retry copy (or
 *     dead letter) is in the log but the original is not committed, so both
 *     come back;
 *   - dead letters replayed since the replay offset was last saved (it is
 *     saved at the end of each replay call).
 * Nothing acked-and-saved is redelivered (committed plus the spans are
 * saved) and nothing is lost: a message is settled in memory only after its
 * copy (retry or dead letter) is stored, and every save flushes the log
 * (brk_store_flush) before it writes the file, so in ASYNC mode too no
 * saved settle is without its copy after a power loss.  An ack of a persist_every_ack
 * group whose save fails returns the store's error (IO, FAILED, ...) with
 * the ack applied in memory; whether the save reached the disk is unknown
 * (the store is failed from then on), so after a crash that message may or
 * may not come back - like any write whose outcome is unknown.
 *
 * LAG
 * ===
 * A row per main queue (max, committed, lag = max - committed, deliveries
 * in flight or waiting (FIFO), store time of the message at committed),
 * then a totals row per (subscription, member): sums of the rows, plus the
 * deliveries in flight from the retry queues, plus, as lag, the messages
 * waiting in the retry queues (they are not acked either; committed_offset
 * of the totals row is max - lag), and the dead-letter topic's count.
 *
 * LONG POLLING
 * ============
 * Waiters {id, group, topic, member, deadline, fn, ctx} are kept in a hash
 * of topic buckets and a hash of ids, their deadlines in a timer heap (lazy
 * cancel).  The store listener's `appended` wakes every waiter of the topic
 * when the record is visible (ASYNC mode, or below the durable end in SYNC
 * mode); otherwise the topic is remembered with its highest pending log
 * offset and woken when `durable` passes it.  Retry and FIFO due times and
 * invisibility expiries are group timers (a second heap, one live entry per
 * group: armed[group idx], later entries of a group are redundant); at a
 * group timer the tick handles expiries, wakes the waiters of every
 * (member, subscription) that has work, and arms the group's next due
 * time.  A callback runs with no lock of this module
 * held (taken out of the lists under wmu, called, then freed under wmu);
 * when the store runs the listener on a thread that holds a group lock
 * (its own retry or dead-letter append, or a flush, may lead a group
 * commit), the taken waiters are parked in a thread-local list and fired
 * once that lock is dropped.  brk_group_wait_cancel on a running callback
 * waits for it (wdone).  An append wakes every waiter of its topic (all
 * members of a broadcast group must hear it; for clustering groups this is
 * a herd when thousands wait on one topic: each receives, one wins).
 * brk_group_wait registers before it looks for work, so an append between
 * the look and the registration cannot be missed.  Idle waiters cost no
 * CPU: the background thread sleeps until the earliest timer (with the
 * system clock exactly; with another clock at most 200 ms, since a test
 * clock moves without telling anyone) or, with nothing timed, until
 * signalled.  brk_group_receive_wait parks such a waiter whose callback
 * signals the caller's condition variable; the store clock decides its
 * deadline and a CLOCK_MONOTONIC timeout of wait_ms bounds the sleep too.
 * has_work applies room() to the next entry, as the receive does, so a
 * member at its byte bound sleeps; a receive or has_work refused by room()
 * sets member.blocked, and the next ack or nack of that member then looks
 * at every one of its subscriptions and wakes those with work.
 *
 * CLOSE
 * =====
 * Every public call counts itself in G->busy (call_enter/call_leave, under
 * wmu) and refuses with BRK_CLOSED once G->closing is set;
 * brk_group_wait checks the flag again where it registers.  Close sets it,
 * joins the thread, removes the listener (which waits for calls in
 * flight), fires every waiter (brk_group_receive_wait callers wake, see
 * the flag and return BRK_CLOSED), waits until busy and nwaiters are 0,
 * saves, and frees.  brk_group_wait_cancel counts itself even while
 * closing: its caller frees the callback's context once it returns.
 *
 * MEMORY
 * ======
 * Per delivery in flight a 48-byte flight; per (member, subscription,
 * queue) a qstate (~64 bytes) plus its settled spans (16 bytes each, only
 * while acks run ahead of an older open message); per waiter ~320 bytes
 * and a 16-byte heap entry.  Nothing per message that is not in flight.
 *
 * LOCKS (take in this order; store calls are made under save_mu, replay_mu
 * and g->mu, never under reg_mu or wmu)
 *   save_mu   one state save at a time; held across the state-file write
 *   replay_mu per group, one dead-letter replay at a time; g->mu is taken
 *             inside it only briefly (replay appends to user topics
 *             without g->mu, so their listener calls fire at once)
 *   g->mu     one group: its config, subscriptions, members, every qstate;
 *             held across record reads and the appends of retry copies and
 *             dead letters (callbacks the listener takes meanwhile are
 *             parked until it is dropped, see LONG POLLING)
 *   reg_mu    the group array and the set of retry-topic names; held briefly
 *   wmu       waiters, both heaps, the pending-visibility list, armed[],
 *             the background thread's sleep (cond) and wdone
 * The background thread is joined outside every lock.
 */
#define _GNU_SOURCE
#include "broker/group.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "broker/delay.h"
#include "le.h"
#include "timerheap.h"

#define STATE_NAME       "groups"
#define STATE_MAGIC      0x31505247u        /* "GRP1" */
#define STATE_VERSION    1u

#define LEVELS           BRK_DELAY_LEVELS    /* 18 */
#define SUBS_MAX         (BRK_QUEUES_MAX / LEVELS)
#define INVISIBLE_MAX_MS (12LL * 3600 * 1000)
#define REASON_MAX       1024
#define INFLIGHT_MAX     1000000u
#define INFLIGHT_BYTES_MAX (UINT64_C(1) << 40)
#define MAX_DELIVERIES_MAX 1000
#define ENTRY_CHUNK      64
#define WBUCKETS         256
#define SLEEP_MAX_MS     200                 /* non-system clocks */
#define FAIL_BACKOFF_MS  1000                /* a failed retry/DLQ append */
#define TIMEOUT_REASON   "invisibility timed out"

#define SYS_OTOPIC       "\x1fotopic"
#define SYS_OQUEUE       "\x1foqueue"
#define SYS_OOFFSET      "\x1fooffset"
#define SYS_COUNT        "\x1f" "count"
#define SYS_NOTBEFORE    "\x1fnotbefore"
#define SYS_REASON       "\x1freason"

#define DLQ_PREFIX       "outboxd-dlq-"

enum { FL_OUT = 1, FL_WAIT = 2 };
enum { W_WAITING = 1, W_RUNNING = 2 };

/* ---- types ----------------------------------------------------------------------- */

typedef struct filter {
    bool all;
    uint32_t n;
    uint64_t *hash;             /* n tag hashes */
    char **tag;                 /* n tags, pointing into buf */
    uint16_t *len;
    char *buf;                  /* normalized tags, NUL separated */
    char *text;                 /* as given ("*" for all), persisted */
} filter;

typedef struct flight {
    uint64_t off;               /* queue offset */
    uint64_t log_off;           /* where the record is */
    uint64_t gen;               /* receipt generation */
    int64_t  visible_at;        /* OUT: expiry; WAIT: FIFO redelivery time */
    uint32_t count;             /* deliveries so far, this one included */
    uint32_t bytes;             /* record size (flow control) */
    uint8_t  state;             /* FL_OUT, FL_WAIT */
} flight;

typedef struct span {
    uint64_t lo, hi;
} span;

typedef struct qstate {
    uint64_t committed;
    uint64_t next;
    flight *fl;                 /* sorted by off */
    uint32_t nfl, cfl;
    span *sp;                   /* sorted, disjoint, > committed */
    uint32_t nsp, csp;
    uint64_t head_off;          /* retry queues: head_due is for this offset */
    int64_t  head_due;          /* INT64_MIN: unknown */
} qstate;

typedef struct substate {
    qstate *mq;                 /* the topic's queues */
    uint32_t nmq;
    qstate *rq;                 /* LEVELS retry queues, or none */
    uint32_t nrq;
    uint32_t cursor;
    bool has_cursor;
} substate;

typedef struct member {
    char name[BRK_MEMBER_MAX + 1];
    char retry_topic[BRK_TOPIC_MAX + 1];
    uint32_t idx;
    substate *ss;               /* one per subscription (grows lazily) */
    uint32_t nss;
    uint32_t inflight;          /* FL_OUT deliveries */
    uint64_t inflight_bytes;
    uint32_t retry_nq;          /* queues of the retry topic (0: none yet) */
    uint32_t rr;                /* rotating start for receive */
    int64_t min_vis;            /* <= every FL_OUT visible_at (expiry scans
                                   are skipped before it) */
    bool blocked;               /* a receive or has_work found a message that
                                   did not fit room() since the last settle
                                   that looked: the next settle wakes */
} member;

typedef struct subscr {
    char topic[BRK_TOPIC_MAX + 1];
    filter f;
} subscr;

typedef struct group {
    char name[BRK_GROUP_MAX + 1];
    char dlq_topic[BRK_TOPIC_MAX + 1];
    uint32_t idx;               /* in the registry, for timers */
    pthread_mutex_t mu;
    pthread_mutex_t replay_mu;
    /* --- mu --- */
    brk_group_config cfg;
    bool progress;              /* something was handed out or skipped */
    subscr *subs;
    uint32_t nsubs;
    member **members;
    uint32_t nmembers;
    uint64_t dlq_replay;
    uint64_t gen;
} group;

typedef struct waiter {
    uint64_t id;
    char topic[BRK_TOPIC_MAX + 1];
    char group[BRK_GROUP_MAX + 1];
    char member[BRK_MEMBER_MAX + 1];
    int64_t deadline;
    brk_group_wake_fn fn;
    void *ctx;
    uint8_t state;
    struct waiter *tprev, *tnext;   /* topic bucket (WAITING only) */
    struct waiter *inext;           /* id bucket */
    struct waiter *fnext;           /* a firing list */
} waiter;

typedef struct pend {
    char topic[BRK_TOPIC_MAX + 1];
    uint64_t max_off;               /* wake when durable passes this */
} pend;

struct brk_groups {
    brk_store *s;
    const brk_clock *clock;
    brk_groups_opts o;
    bool sync_mode;
    bool sys_clock;
    char epoch[17];
    brk_store_listener listener;
    atomic_int listener_active;

    pthread_mutex_t save_mu;
    _Atomic uint64_t saved_seq;
    _Atomic uint64_t dirty_seq;
    _Atomic int64_t next_persist;

    pthread_mutex_t reg_mu;
    group **groups;
    uint32_t ngroups, cgroups;
    char **rnames;
    size_t nrnames, crnames;

    pthread_mutex_t wmu;
    pthread_cond_t cond;            /* background sleep, CLOCK_MONOTONIC */
    pthread_cond_t wdone;           /* a firing finished */
    waiter *tb[WBUCKETS];
    waiter *ib[WBUCKETS];
    size_t nwaiters;
    uint64_t next_wid;
    brk_timerheap wheap;            /* (deadline, waiter id) */
    brk_timerheap gheap;            /* (due, group idx) */
    int64_t *armed;                 /* per group idx: earliest armed due */
    uint32_t narmed;
    pend *pend;
    size_t npend, cpend;
    uint64_t durable_seen;
    int64_t wake_at;
    bool stop;
    bool closing;                   /* close began: public calls refuse */
    uint32_t busy;                  /* public calls in progress */
    pthread_cond_t idle;            /* busy dropped to 0 while closing */

    pthread_t thr;
    bool has_thr;
};

/* ---- small helpers ---------------------------------------------------------------- */

/* Every public call runs between call_enter and call_leave, so close can
 * wait for the calls in progress before it frees anything.  false: close
 * began, the call must return BRK_CLOSED.  `always` counts the call even
 * then (brk_group_wait_cancel: its caller may free the callback's context
 * once it returns, so it must keep working until close is done). */
static bool call_enter(brk_groups *G, bool always)
{
    pthread_mutex_lock(&G->wmu);
    bool ok = always || !G->closing;
    if (ok)
        G->busy++;
    pthread_mutex_unlock(&G->wmu);
    return ok;
}

static void call_leave(brk_groups *G)
{
    pthread_mutex_lock(&G->wmu);
    if (--G->busy == 0 && G->closing)
        pthread_cond_broadcast(&G->idle);
    pthread_mutex_unlock(&G->wmu);
}

static bool is_closing(brk_groups *G)
{
    pthread_mutex_lock(&G->wmu);
    bool c = G->closing;
    pthread_mutex_unlock(&G->wmu);
    return c;
}

static int64_t now_ms(brk_groups *G)
{
    return G->clock->now_ms(G->clock->ctx);
}

static void set_err(char *errbuf, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *errbuf, size_t errlen, const char *fmt, ...)
{
    if (!errbuf || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
}

static bool name_chars_ok(const char *s, size_t max)
{
    if (!s)
        return false;
    size_t n = strnlen(s, max + 1);
    if (n == 0 || n > max)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

static bool group_name_ok(const char *s)
{
    return name_chars_ok(s, BRK_GROUP_MAX) && !(s[0] == '_' && s[1] == '_');
}

static bool member_name_ok(const char *s)
{
    return name_chars_ok(s, BRK_MEMBER_MAX);
}

static bool topic_ok(const char *t)
{
    if (!t)
        return false;
    size_t n = strnlen(t, BRK_TOPIC_MAX + 1);
    return n > 0 && n <= BRK_TOPIC_MAX && t[0] != '.'
           && brk_topic_name_valid(t, n, false);
}

static uint32_t str_hash(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

/* ---- delays ---------------------------------------------------------------------- */

int64_t brk_group_retry_delay_ms(uint32_t n)
{
    if (n < 1)
        n = 1;
    uint32_t level = n >= LEVELS - 2 ? LEVELS : n + 2;
    return brk_delay_level_ms((int)level);
}

/* The smallest level whose delay is >= ms (at most the last). */
static int level_for(int64_t ms)
{
    for (int l = 1; l < LEVELS; l++)
        if (brk_delay_level_ms(l) >= ms)
            return l;
    return LEVELS;
}

void brk_groups_opts_init(brk_groups_opts *o)
{
    memset(o, 0, sizeof *o);
    o->persist_interval_ms = 1000;
    o->default_invisible_ms = 30000;
}

void brk_group_config_init(brk_group_config *c)
{
    memset(c, 0, sizeof *c);
    c->max_deliveries = BRK_MAX_DELIVERIES_DEFAULT;
    c->max_inflight = 1000;
    c->max_inflight_bytes = 100u << 20;
}

static bool config_ok(const brk_group_config *c)
{
    return c->max_deliveries >= 1 && c->max_deliveries <= MAX_DELIVERIES_MAX
           && c->max_inflight >= 1 && c->max_inflight <= INFLIGHT_MAX
           && c->max_inflight_bytes >= 1
           && c->max_inflight_bytes <= INFLIGHT_BYTES_MAX;
}

/* ---- tag filters ------------------------------------------------------------------ */

static void filter_free(filter *f)
{
    free(f->hash);
    free(f->tag);
    free(f->len);
    free(f->buf);
    free(f->text);
    memset(f, 0, sizeof *f);
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t';
}

/* Parse NULL, "*" or "a || b || c".  BRK_INVAL for an empty part, a part
 * with '|' or over BRK_TAG_MAX, or text over BRK_FILTER_MAX. */
static brk_status filter_parse(const char *text, filter *out)
{
    memset(out, 0, sizeof *out);
    filter f;
    memset(&f, 0, sizeof f);
    if (!text)
        text = "*";
    size_t tl = strnlen(text, BRK_FILTER_MAX + 1);
    if (tl > BRK_FILTER_MAX)
        return BRK_INVAL;
    f.text = strdup(text);
    f.buf = malloc(tl + 1);
    size_t maxparts = tl / 2 + 1;
    f.hash = malloc(maxparts * sizeof *f.hash);
    f.tag = malloc(maxparts * sizeof *f.tag);
    f.len = malloc(maxparts * sizeof *f.len);
    if (!f.text || !f.buf || !f.hash || !f.tag || !f.len) {
        filter_free(&f);
        return BRK_NOMEM;
    }
    size_t bpos = 0;
    const char *p = text, *end = text + tl;
    for (;;) {
        const char *sep = strstr(p, "||");
        const char *pe = sep ? sep : end;
        const char *a = p, *b = pe;
        while (a < b && is_space(*a))
            a++;
        while (b > a && is_space(b[-1]))
            b--;
        size_t n = (size_t)(b - a);
        if (n == 0 || n > BRK_TAG_MAX || memchr(a, '|', n)) {
            filter_free(&f);
            return BRK_INVAL;
        }
        if (n == 1 && *a == '*') {
            f.all = true;
        } else {
            memcpy(f.buf + bpos, a, n);
            f.buf[bpos + n] = 0;
            f.tag[f.n] = f.buf + bpos;
            f.len[f.n] = (uint16_t)n;
            f.hash[f.n] = brk_tag_hash(a, n);
            f.n++;
            bpos += n + 1;
        }
        if (!sep)
            break;
        p = sep + 2;
    }
    *out = f;
    return BRK_OK;
}

static bool filter_hash_ok(const filter *f, uint64_t h)
{
    if (f->all)
        return true;
    for (uint32_t i = 0; i < f->n; i++)
        if (f->hash[i] == h)
            return true;
    return false;
}

static bool filter_tag_ok(const filter *f, brk_bytes tag)
{
    if (f->all)
        return true;
    for (uint32_t i = 0; i < f->n; i++)
        if (f->len[i] == tag.len && memcmp(f->tag[i], tag.ptr, tag.len) == 0)
            return true;
    return false;
}

/* ---- qstate: flights and settled spans (g->mu held) ------------------------------- */

static void q_init(qstate *q, uint64_t at)
{
    memset(q, 0, sizeof *q);
    q->committed = q->next = at;
    q->head_due = INT64_MIN;
}

static void q_free(qstate *q)
{
    free(q->fl);
    free(q->sp);
}

/* Mark [lo, hi) settled.  Nothing in it may be in flight. */
static brk_status q_settle(qstate *q, uint64_t lo, uint64_t hi)
{
    if (hi <= lo)
        return BRK_OK;
    if (lo <= q->committed) {
        if (hi > q->committed)
            q->committed = hi;
    } else {
        /* Find the first span with hi >= lo (candidates to merge). */
        uint32_t a = 0, b = q->nsp;
        while (a < b) {
            uint32_t mid = a + (b - a) / 2;
            if (q->sp[mid].hi < lo)
                a = mid + 1;
            else
                b = mid;
        }
        uint32_t i = a, j = a;
        while (j < q->nsp && q->sp[j].lo <= hi)
            j++;
        if (i == j) {                     /* no overlap: insert at i */
            if (q->nsp == q->csp) {
                uint32_t nc = q->csp ? q->csp * 2 : 8;
                span *ns = realloc(q->sp, nc * sizeof *ns);
                if (!ns)
                    return BRK_NOMEM;
                q->sp = ns;
                q->csp = nc;
            }
            memmove(q->sp + i + 1, q->sp + i, (q->nsp - i) * sizeof *q->sp);
            q->sp[i] = (span){ lo, hi };
            q->nsp++;
        } else {                          /* merge spans i..j-1 with it */
            uint64_t nlo = q->sp[i].lo < lo ? q->sp[i].lo : lo;
            uint64_t nhi = q->sp[j - 1].hi > hi ? q->sp[j - 1].hi : hi;
            q->sp[i] = (span){ nlo, nhi };
            memmove(q->sp + i + 1, q->sp + j, (q->nsp - j) * sizeof *q->sp);
            q->nsp -= j - i - 1;
        }
    }
    uint32_t k = 0;
    while (k < q->nsp && q->sp[k].lo <= q->committed) {
        if (q->sp[k].hi > q->committed)
            q->committed = q->sp[k].hi;
        k++;
    }
    if (k) {
        memmove(q->sp, q->sp + k, (q->nsp - k) * sizeof *q->sp);
        q->nsp -= k;
    }
    return BRK_OK;
}

/* Move q->next past the settled spans it points into (after a restart,
 * offsets acked out of order lie above next) and return where the next
 * span above it starts (UINT64_MAX: none). */
static uint64_t q_skip_settled(qstate *q)
{
    uint32_t a = 0, b = q->nsp;
    while (a < b) {                 /* first span with hi > next */
        uint32_t mid = a + (b - a) / 2;
        if (q->sp[mid].hi <= q->next)
            a = mid + 1;
        else
            b = mid;
    }
    for (uint32_t i = a; i < q->nsp; i++) {
        if (q->sp[i].lo > q->next)
            return q->sp[i].lo;
        q->next = q->sp[i].hi;
    }
    return UINT64_MAX;
}

static int64_t flight_find(const qstate *q, uint64_t off)
{
    uint32_t a = 0, b = q->nfl;
    while (a < b) {
        uint32_t mid = a + (b - a) / 2;
        if (q->fl[mid].off < off)
            a = mid + 1;
        else if (q->fl[mid].off > off)
            b = mid;
        else
            return mid;
    }
    return -1;
}

static brk_status flight_reserve(qstate *q)
{
    if (q->nfl < q->cfl)
        return BRK_OK;
    uint32_t nc = q->cfl ? q->cfl * 2 : 8;
    flight *nf = realloc(q->fl, nc * sizeof *nf);
    if (!nf)
        return BRK_NOMEM;
    q->fl = nf;
    q->cfl = nc;
    return BRK_OK;
}

/* Add a flight (room reserved); offsets only grow, so it goes last. */
static void flight_push(qstate *q, const flight *f)
{
    uint32_t i = q->nfl;
    while (i > 0 && q->fl[i - 1].off > f->off) {
        q->fl[i] = q->fl[i - 1];
        i--;
    }
    q->fl[i] = *f;
    q->nfl++;
}

/* Remove flight i and settle its offset. */
static void settle_flight(member *m, qstate *q, uint32_t i)
{
    flight f = q->fl[i];
    if (f.state == FL_OUT) {
        m->inflight--;
        m->inflight_bytes -= f.bytes;
    }
    memmove(q->fl + i, q->fl + i + 1, (q->nfl - i - 1) * sizeof *q->fl);
    q->nfl--;
    (void)q_settle(q, f.off, f.off + 1);
}

/* ---- dirty tracking and timers ---------------------------------------------------- */

/* Progress changed: the next persist is due.  Wakes the background thread
 * if it sleeps past the persist time (only on the first change after a
 * save, so an ack costs an atomic increment). */
static void mark_dirty(brk_groups *G)
{
    uint64_t prev = atomic_fetch_add(&G->dirty_seq, 1);
    if (prev != atomic_load(&G->saved_seq))
        return;
    pthread_mutex_lock(&G->wmu);
    if (G->wake_at > atomic_load(&G->next_persist))
        pthread_cond_signal(&G->cond);
    pthread_mutex_unlock(&G->wmu);
}

static bool gheap_keep(const brk_timer *t, void *ctx)
{
    brk_groups *G = ctx;
    return t->ref < G->narmed && t->due_ms <= G->armed[t->ref];
}

/* Make sure the group's timer fires at `due` or earlier.  Only the entry
 * at armed[idx] matters: processing a group re-arms its next due time, so
 * later entries of the same group are redundant and dropped when they pile
 * up. */
static void arm(brk_groups *G, const group *g, int64_t due)
{
    if (due == INT64_MAX)
        return;
    pthread_mutex_lock(&G->wmu);
    if (g->idx < G->narmed && due < G->armed[g->idx]) {
        if (G->gheap.n > 2 * (size_t)G->narmed + 1024)
            brk_timerheap_filter(&G->gheap, gheap_keep, G);
        if (brk_timerheap_push(&G->gheap, due, g->idx) == BRK_OK) {
            G->armed[g->idx] = due;
            if (due < G->wake_at)
                pthread_cond_signal(&G->cond);
        }
    }
    pthread_mutex_unlock(&G->wmu);
}

/* ---- waiters ---------------------------------------------------------------------- */

static waiter **id_slot(brk_groups *G, uint64_t id)
{
    waiter **pp = &G->ib[id % WBUCKETS];
    while (*pp && (*pp)->id != id)
        pp = &(*pp)->inext;
    return pp;
}

static void topic_unlink(brk_groups *G, waiter *w)
{
    uint32_t b = str_hash(w->topic) % WBUCKETS;
    if (w->tprev)
        w->tprev->tnext = w->tnext;
    else
        G->tb[b] = w->tnext;
    if (w->tnext)
        w->tnext->tprev = w->tprev;
    w->tprev = w->tnext = NULL;
}

/* WAITING -> RUNNING, onto *list.  wmu held. */
static void w_take(brk_groups *G, waiter *w, waiter **list)
{
    topic_unlink(G, w);
    w->state = W_RUNNING;
    w->fnext = *list;
    *list = w;
}

/* A thread that holds a group lock across store appends or flushes (retry
 * copies, dead letters) may run the store listener itself; the waiters that
 * listener takes are parked here and fired once the lock is dropped
 * (defer_end), so no callback ever runs under a group lock. */
static _Thread_local int tl_defer_depth;
static _Thread_local waiter *tl_deferred;

static void defer_begin(void)
{
    tl_defer_depth++;
}

static void w_fire(brk_groups *G, waiter *list);

static void defer_end(brk_groups *G)
{
    if (--tl_defer_depth > 0)
        return;
    waiter *list = tl_deferred;
    tl_deferred = NULL;
    w_fire(G, list);
}

/* Run the callbacks of a firing list with no lock held, then free them. */
static void w_fire(brk_groups *G, waiter *list)
{
    if (!list)
        return;
    if (tl_defer_depth > 0) {
        waiter *last = list;
        while (last->fnext)
            last = last->fnext;
        last->fnext = tl_deferred;
        tl_deferred = list;
        return;
    }
    for (waiter *w = list; w; w = w->fnext)
        w->fn(w->ctx);
    pthread_mutex_lock(&G->wmu);
    while (list) {
        waiter *w = list;
        list = w->fnext;
        waiter **pp = id_slot(G, w->id);
        if (*pp)
            *pp = w->inext;
        G->nwaiters--;
        free(w);
    }
    pthread_cond_broadcast(&G->wdone);
    pthread_mutex_unlock(&G->wmu);
}

/* Take the waiters of `topic` (and of group/member when not NULL).  wmu
 * held. */
static void take_topic(brk_groups *G, const char *topic, const char *grp,
                       const char *mem, waiter **list)
{
    waiter *w = G->tb[str_hash(topic) % WBUCKETS];
    while (w) {
        waiter *nx = w->tnext;
        if (strcmp(w->topic, topic) == 0
            && (!grp || strcmp(w->group, grp) == 0)
            && (!mem || strcmp(w->member, mem) == 0))
            w_take(G, w, list);
        w = nx;
    }
}

static void wake_topic(brk_groups *G, const char *topic, const char *grp,
                       const char *mem)
{
    waiter *list = NULL;
    pthread_mutex_lock(&G->wmu);
    take_topic(G, topic, grp, mem, &list);
    pthread_mutex_unlock(&G->wmu);
    w_fire(G, list);
}

/* The store listener.  Runs on the appending/flushing thread, no store
 * lock held. */
static void on_appended(void *ctx, const char *topic, uint16_t queue,
                        uint64_t log_offset)
{
    (void)queue;
    brk_groups *G = ctx;
    if (topic[0] == '_' && topic[1] == '_')
        return;        /* retry/DLQ/internal: group timers cover retries */
    atomic_fetch_add(&G->listener_active, 1);
    waiter *list = NULL;
    pthread_mutex_lock(&G->wmu);
    if (!G->sync_mode || log_offset < G->durable_seen) {
        take_topic(G, topic, NULL, NULL, &list);
    } else {
        size_t i = 0;
        while (i < G->npend && strcmp(G->pend[i].topic, topic) != 0)
            i++;
        if (i < G->npend) {
            if (log_offset > G->pend[i].max_off)
                G->pend[i].max_off = log_offset;
        } else {
            if (G->npend == G->cpend) {
                size_t nc = G->cpend ? G->cpend * 2 : 8;
                pend *np = realloc(G->pend, nc * sizeof *np);
                if (np) {
                    G->pend = np;
                    G->cpend = nc;
                }
            }
            if (G->npend < G->cpend) {
                snprintf(G->pend[G->npend].topic, sizeof G->pend[0].topic,
                         "%s", topic);
                G->pend[G->npend].max_off = log_offset;
                G->npend++;
            } else {
                take_topic(G, topic, NULL, NULL, &list);  /* no memory: early */
            }
        }
    }
    pthread_mutex_unlock(&G->wmu);
    w_fire(G, list);
    atomic_fetch_sub(&G->listener_active, 1);
}

static void on_durable(void *ctx, uint64_t end)
{
    brk_groups *G = ctx;
    atomic_fetch_add(&G->listener_active, 1);
    waiter *list = NULL;
    pthread_mutex_lock(&G->wmu);
    if (end > G->durable_seen)
        G->durable_seen = end;
    for (size_t i = 0; i < G->npend;) {
        if (G->pend[i].max_off < end) {
            take_topic(G, G->pend[i].topic, NULL, NULL, &list);
            G->pend[i] = G->pend[--G->npend];
        } else {
            i++;
        }
    }
    pthread_mutex_unlock(&G->wmu);
    w_fire(G, list);
    atomic_fetch_sub(&G->listener_active, 1);
}

/* ---- registry --------------------------------------------------------------------- */

/* Free m; with G, also unregister its retention cursors (a member that is
 * gone for good).  At close G is NULL: the cursors stay registered, holding
 * what the group has not consumed, for as long as the store is open. */
static void member_free(brk_groups *G, member *m)
{
    if (!m)
        return;
    for (uint32_t k = 0; k < m->nss; k++) {
        substate *ss = &m->ss[k];
        for (uint32_t i = 0; i < ss->nmq; i++)
            q_free(&ss->mq[i]);
        for (uint32_t i = 0; i < ss->nrq; i++)
            q_free(&ss->rq[i]);
        free(ss->mq);
        free(ss->rq);
        if (ss->has_cursor && G)
            brk_store_cursor_unregister(G->s, ss->cursor);
    }
    free(m->ss);
    free(m);
}

static void group_free(brk_groups *G, group *g)
{
    if (!g)
        return;
    for (uint32_t i = 0; i < g->nmembers; i++)
        member_free(G, g->members[i]);
    free(g->members);
    for (uint32_t k = 0; k < g->nsubs; k++)
        filter_free(&g->subs[k].f);
    free(g->subs);
    pthread_mutex_destroy(&g->mu);
    pthread_mutex_destroy(&g->replay_mu);
    free(g);
}

static group *find_group_locked(brk_groups *G, const char *name)
{
    for (uint32_t i = 0; i < G->ngroups; i++)
        if (strcmp(G->groups[i]->name, name) == 0)
            return G->groups[i];
    return NULL;
}

static group *find_group(brk_groups *G, const char *name)
{
    pthread_mutex_lock(&G->reg_mu);
    group *g = find_group_locked(G, name);
    pthread_mutex_unlock(&G->reg_mu);
    return g;
}

/* Reserve a retry-topic name; BRK_CONFLICT when taken.  reg_mu held. */
static brk_status rname_add_locked(brk_groups *G, const char *name)
{
    for (size_t i = 0; i < G->nrnames; i++)
        if (strcmp(G->rnames[i], name) == 0)
            return BRK_CONFLICT;
    if (G->nrnames == G->crnames) {
        size_t nc = G->crnames ? G->crnames * 2 : 16;
        char **nr = realloc(G->rnames, nc * sizeof *nr);
        if (!nr)
            return BRK_NOMEM;
        G->rnames = nr;
        G->crnames = nc;
    }
    char *c = strdup(name);
    if (!c)
        return BRK_NOMEM;
    G->rnames[G->nrnames++] = c;
    return BRK_OK;
}

static member *member_new(const group *g, const char *name, uint32_t idx)
{
    member *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    snprintf(m->name, sizeof m->name, "%s", name);
    if (name[0])
        snprintf(m->retry_topic, sizeof m->retry_topic, "__retry.%s.%s",
                 g->name, name);
    else
        snprintf(m->retry_topic, sizeof m->retry_topic, "__retry.%s",
                 g->name);
    m->idx = idx;
    m->min_vis = INT64_MAX;
    return m;
}

static void note_vis(member *m, int64_t v)
{
    if (v < m->min_vis)
        m->min_vis = v;
}

static brk_status members_push(group *g, member *m)
{
    member **nm = realloc(g->members, (g->nmembers + 1) * sizeof *nm);
    if (!nm)
        return BRK_NOMEM;
    g->members = nm;
    g->members[g->nmembers++] = m;
    return BRK_OK;
}

/* Add a subscription (g->mu held or g unpublished). */
static brk_status sub_add(group *g, const char *topic, filter *f, uint32_t *k)
{
    if (g->nsubs >= SUBS_MAX)
        return BRK_LIMIT;
    subscr *ns = realloc(g->subs, (g->nsubs + 1) * sizeof *ns);
    if (!ns)
        return BRK_NOMEM;
    g->subs = ns;
    subscr *s = &g->subs[g->nsubs];
    memset(s, 0, sizeof *s);
    snprintf(s->topic, sizeof s->topic, "%s", topic);
    s->f = *f;
    memset(f, 0, sizeof *f);
    *k = g->nsubs++;
    return BRK_OK;
}

static int64_t sub_find(const group *g, const char *topic)
{
    for (uint32_t k = 0; k < g->nsubs; k++)
        if (strcmp(g->subs[k].topic, topic) == 0)
            return k;
    return -1;
}

/* A new group, not yet in the registry. */
static brk_status group_new(const char *name, const brk_group_config *cfg,
                            group **out)
{
    group *g = calloc(1, sizeof *g);
    if (!g)
        return BRK_NOMEM;
    snprintf(g->name, sizeof g->name, "%s", name);
    snprintf(g->dlq_topic, sizeof g->dlq_topic, "__dlq.%s", name);
    pthread_mutex_init(&g->mu, NULL);
    pthread_mutex_init(&g->replay_mu, NULL);
    if (cfg)
        g->cfg = *cfg;
    else
        brk_group_config_init(&g->cfg);
    if (!g->cfg.broadcast) {
        member *m = member_new(g, "", 0);
        if (!m || members_push(g, m) != BRK_OK) {
            free(m);
            group_free(NULL, g);
            return BRK_NOMEM;
        }
    }
    *out = g;
    return BRK_OK;
}

/* Publish a new group (reg_mu held): reserve its retry name, give it a
 * timer slot. */
static brk_status group_publish_locked(brk_groups *G, group *g)
{
    char rn[BRK_TOPIC_MAX + 1];
    snprintf(rn, sizeof rn, "__retry.%s", g->name);
    if (G->ngroups == G->cgroups) {
        uint32_t nc = G->cgroups ? G->cgroups * 2 : 16;
        group **ng = realloc(G->groups, nc * sizeof *ng);
        if (!ng)
            return BRK_NOMEM;
        G->groups = ng;
        G->cgroups = nc;
    }
    pthread_mutex_lock(&G->wmu);
    brk_status st = BRK_OK;
    if (G->narmed <= G->ngroups) {
        int64_t *na = realloc(G->armed, (G->ngroups + 1) * sizeof *na);
        if (!na)
            st = BRK_NOMEM;
        else {
            G->armed = na;
            G->narmed = G->ngroups + 1;
        }
    }
    if (st == BRK_OK)
        G->armed[G->ngroups] = INT64_MAX;
    pthread_mutex_unlock(&G->wmu);
    if (st != BRK_OK)
        return st;
    if ((st = rname_add_locked(G, rn)) != BRK_OK)
        return st;
    for (uint32_t i = 0; i < g->nmembers; i++)
        if (g->members[i]->name[0]
            && (st = rname_add_locked(G, g->members[i]->retry_topic)) != BRK_OK)
            return st;
    g->idx = G->ngroups;
    G->groups[G->ngroups++] = g;
    return BRK_OK;
}

/* The member of a receive (g->mu held): clustering's one, or the broadcast
 * member by name, created if new. */
static brk_status member_get(brk_groups *G, group *g, const char *name,
                             member **out, bool create)
{
    if (!g->cfg.broadcast) {
        *out = g->nmembers ? g->members[0] : NULL;
        return *out ? BRK_OK : BRK_NOTFOUND;
    }
    for (uint32_t i = 0; i < g->nmembers; i++)
        if (strcmp(g->members[i]->name, name) == 0) {
            *out = g->members[i];
            return BRK_OK;
        }
    if (!create)
        return BRK_NOTFOUND;
    member *m = member_new(g, name, g->nmembers);
    if (!m)
        return BRK_NOMEM;
    pthread_mutex_lock(&G->reg_mu);
    brk_status st = rname_add_locked(G, m->retry_topic);
    pthread_mutex_unlock(&G->reg_mu);
    if (st == BRK_OK && (st = members_push(g, m)) != BRK_OK) {
        /* The reserved name stays reserved: harmless. */
    }
    if (st != BRK_OK) {
        free(m);
        return st;
    }
    g->progress = true;
    mark_dirty(G);
    *out = m;
    return BRK_OK;
}

/* Bring m's state for subscription k up to date with the topics: new
 * queues of the subscribed topic start at their first readable offset,
 * retry queues exist once the retry topic has them.  g->mu held. */
static brk_status ss_ensure(brk_groups *G, group *g, member *m, uint32_t k,
                            substate **out)
{
    if (m->nss < g->nsubs) {
        substate *ns = realloc(m->ss, g->nsubs * sizeof *ns);
        if (!ns)
            return BRK_NOMEM;
        memset(ns + m->nss, 0, (g->nsubs - m->nss) * sizeof *ns);
        m->ss = ns;
        m->nss = g->nsubs;
    }
    substate *ss = &m->ss[k];
    const char *topic = g->subs[k].topic;
    if (!ss->has_cursor) {
        char cname[BRK_GROUP_MAX + BRK_TOPIC_MAX + BRK_MEMBER_MAX + 8];
        snprintf(cname, sizeof cname, "grp:%s:%s%s%s", g->name, topic,
                 m->name[0] ? ":" : "", m->name);
        if (brk_store_cursor_register(G->s, cname, &ss->cursor) == BRK_OK)
            ss->has_cursor = true;
    }
    brk_topic_info ti;
    brk_status st = brk_topic_get(G->s, topic, &ti);
    if (st == BRK_OK && ti.queues > ss->nmq) {
        qstate *nq = realloc(ss->mq, ti.queues * sizeof *nq);
        if (!nq)
            return BRK_NOMEM;
        ss->mq = nq;
        for (uint32_t i = ss->nmq; i < ti.queues; i++) {
            uint64_t mn = 0, mx = 0;
            (void)brk_store_queue_range(G->s, topic, (uint16_t)i, &mn, &mx);
            q_init(&ss->mq[i], mn);
        }
        ss->nmq = ti.queues;
    } else if (st != BRK_OK && st != BRK_NOTFOUND) {
        return st;
    }
    if (!g->cfg.fifo && ss->nrq == 0) {
        if (m->retry_nq < (k + 1) * LEVELS
            && brk_topic_get(G->s, m->retry_topic, &ti) == BRK_OK)
            m->retry_nq = ti.queues;
        if (m->retry_nq >= (k + 1) * LEVELS) {
            qstate *rq = calloc(LEVELS, sizeof *rq);
            if (!rq)
                return BRK_NOMEM;
            for (uint32_t i = 0; i < LEVELS; i++) {
                uint64_t mn = 0, mx = 0;
                (void)brk_store_queue_range(G->s, m->retry_topic,
                                            (uint16_t)(k * LEVELS + i), &mn,
                                            &mx);
                q_init(&rq[i], mn);
            }
            ss->rq = rq;
            ss->nrq = LEVELS;
        }
    }
    *out = ss;
    return BRK_OK;
}

/* Make sure m's retry topic has subscription k's queues.  g->mu held. */
static brk_status retry_topic_ensure(brk_groups *G, group *g, member *m,
                                     uint32_t k)
{
    uint32_t need = (g->nsubs > k + 1 ? g->nsubs : k + 1) * LEVELS;
    if (m->retry_nq >= (k + 1) * LEVELS)
        return BRK_OK;
    brk_topic_info ti;
    brk_status st = brk_topic_get(G->s, m->retry_topic, &ti);
    if (st == BRK_NOTFOUND) {
        st = brk_topic_create(G->s, m->retry_topic, (uint16_t)need);
        if (st == BRK_EXISTS)
            st = brk_topic_get(G->s, m->retry_topic, &ti);
        else if (st == BRK_OK)
            ti.queues = (uint16_t)need;
    }
    if (st != BRK_OK)
        return st;
    if (ti.writable < need) {
        bool created = false;
        if ((st = brk_topic_resize(G->s, m->retry_topic, (uint16_t)need,
                                   &created)) != BRK_OK)
            return st;
        ti.queues = (uint16_t)need;
    }
    m->retry_nq = ti.queues;
    substate *ss;
    return ss_ensure(G, g, m, k, &ss);
}

/* ---- copies: retry and dead letter ------------------------------------------------ */

/* A new props block: the user pairs of `user` (system pairs dropped, and
 * with drop_dlq the "outboxd-dlq-*" pairs), then `extra`.  *out is
 * malloc'ed. */
static brk_status props_build(brk_bytes user, const brk_prop *extra,
                              size_t nextra, bool drop_dlq, uint8_t **out,
                              size_t *len)
{
    size_t n = 0, pos = 0, cap = 2 + user.len;
    brk_prop p;
    brk_status st;
    while ((st = brk_props_next(user, &pos, &p)) == BRK_OK)
        n++;
    if (st != BRK_EMPTY)
        return BRK_BADREC;
    for (size_t i = 0; i < nextra; i++)
        cap += 4 + extra[i].key.len + extra[i].value.len;
    brk_prop *v = malloc((n + nextra + 1) * sizeof *v);
    uint8_t *buf = malloc(cap);
    if (!v || !buf) {
        free(v);
        free(buf);
        return BRK_NOMEM;
    }
    size_t k = 0;
    pos = 0;
    while (brk_props_next(user, &pos, &p) == BRK_OK) {
        const char *key = p.key.ptr;
        if (p.key.len > 0 && key[0] == BRK_SYSPROP_CHAR)
            continue;
        if (drop_dlq && p.key.len >= sizeof DLQ_PREFIX - 1
            && memcmp(key, DLQ_PREFIX, sizeof DLQ_PREFIX - 1) == 0)
            continue;
        v[k++] = p;
    }
    for (size_t i = 0; i < nextra; i++)
        v[k++] = extra[i];
    st = brk_props_encode(v, k, buf, cap, len);
    free(v);
    if (st != BRK_OK) {
        free(buf);
        return st;
    }
    *out = buf;
    return BRK_OK;
}

/* Where a delivered record came from: its own topic/queue/offset, or for
 * a retry copy what its system props say. */
typedef struct orig {
    const char *topic;
    size_t tlen;
    uint16_t queue;
    uint64_t off;
    uint32_t count;             /* retry copies: deliveries before the copy */
    int64_t  notbefore;
    brk_bytes reason;
} orig;

static void orig_of(const brk_record *rec, bool retry, const char *topic,
                    uint16_t queue, uint64_t off, orig *o)
{
    memset(o, 0, sizeof *o);
    o->topic = topic;
    o->tlen = strlen(topic);
    o->queue = queue;
    o->off = off;
    if (!retry)
        return;
    brk_bytes v;
    if (brk_props_get(rec->props, SYS_OTOPIC, &v) == BRK_OK && v.len > 0
        && v.len <= BRK_TOPIC_MAX) {
        o->topic = v.ptr;
        o->tlen = v.len;
    }
    if (brk_props_get(rec->props, SYS_OQUEUE, &v) == BRK_OK && v.len == 2)
        o->queue = brk_ld16(v.ptr);
    if (brk_props_get(rec->props, SYS_OOFFSET, &v) == BRK_OK && v.len == 8)
        o->off = brk_ld64(v.ptr);
    if (brk_props_get(rec->props, SYS_COUNT, &v) == BRK_OK && v.len == 4)
        o->count = brk_ld32(v.ptr);
    if (brk_props_get(rec->props, SYS_NOTBEFORE, &v) == BRK_OK && v.len == 8)
        o->notbefore = (int64_t)brk_ld64(v.ptr);
    if (brk_props_get(rec->props, SYS_REASON, &v) == BRK_OK)
        o->reason = v;
}

static void req_from(brk_append_req *q, const brk_record *rec)
{
    memset(q, 0, sizeof *q);
    q->key = rec->key;
    q->tag = rec->tag;
    q->body = rec->body;
    q->flags = rec->flags;
    q->type = BRK_REC_MSG;
    q->msg_id = rec->msg_id;
    q->born_ms = rec->born_ms;
}

/* Append a copy of rec to m's retry queue for `level`, due at notbefore. */
static brk_status retry_copy(brk_groups *G, group *g, member *m, uint32_t k,
                             const brk_record *rec, const orig *o,
                             uint32_t count, int level, int64_t notbefore,
                             brk_bytes reason, bool defer)
{
    brk_status st = retry_topic_ensure(G, g, m, k);
    if (st != BRK_OK)
        return st;
    uint8_t oq[2], oo[8], cn[4], nb[8];
    brk_st16(oq, o->queue);
    brk_st64(oo, o->off);
    brk_st32(cn, count);
    brk_st64(nb, (uint64_t)notbefore);
    brk_prop sys[6] = {
        { { SYS_OTOPIC, sizeof SYS_OTOPIC - 1 }, { o->topic, o->tlen } },
        { { SYS_OQUEUE, sizeof SYS_OQUEUE - 1 }, { oq, 2 } },
        { { SYS_OOFFSET, sizeof SYS_OOFFSET - 1 }, { oo, 8 } },
        { { SYS_COUNT, sizeof SYS_COUNT - 1 }, { cn, 4 } },
        { { SYS_NOTBEFORE, sizeof SYS_NOTBEFORE - 1 }, { nb, 8 } },
        { { SYS_REASON, sizeof SYS_REASON - 1 }, reason },
    };
    size_t nsys = reason.len > 0 ? 6 : 5;
    uint8_t *props = NULL;
    size_t plen = 0;
    st = props_build(rec->props, sys, nsys, false, &props, &plen);
    if (st == BRK_TOOBIG && nsys == 6)      /* no room for the reason */
        st = props_build(rec->props, sys, 5, false, &props, &plen);
    if (st != BRK_OK)
        return st;
    brk_append_req q;
    req_from(&q, rec);
    q.topic = m->retry_topic;
    q.queue = (int32_t)(k * LEVELS + (uint32_t)(level - 1));
    q.props = (brk_bytes){ props, plen };
    q.allow_internal = true;
    q.defer_sync = defer;
    brk_append_res ar;
    st = brk_store_append(G->s, &q, &ar);
    free(props);
    if (st == BRK_OK)
        arm(G, g, notbefore);
    return st;
}

/* Append rec to the group's dead-letter topic. */
static brk_status dead_letter(brk_groups *G, group *g, const member *m,
                              const brk_record *rec, const orig *o,
                              uint32_t count, brk_bytes reason, bool defer)
{
    brk_status st = brk_topic_create(G->s, g->dlq_topic, 1);
    if (st != BRK_OK && st != BRK_EXISTS)
        return st;
    char qs[8], os[24], cs[12];
    snprintf(qs, sizeof qs, "%u", (unsigned)o->queue);
    snprintf(os, sizeof os, "%" PRIu64, o->off);
    snprintf(cs, sizeof cs, "%u", count);
    if (reason.len > REASON_MAX)
        reason.len = REASON_MAX;
#define P_(k, v, l) { { k, sizeof k - 1 }, { v, l } }
    brk_prop h[7] = {
        P_(DLQ_PREFIX "topic", o->topic, o->tlen),
        P_(DLQ_PREFIX "queue", qs, strlen(qs)),
        P_(DLQ_PREFIX "offset", os, strlen(os)),
        P_(DLQ_PREFIX "deliveries", cs, strlen(cs)),
        P_(DLQ_PREFIX "group", g->name, strlen(g->name)),
    };
    size_t nh = 5;
    if (m->name[0]) {
        brk_prop p = P_(DLQ_PREFIX "member", m->name, strlen(m->name));
        h[nh++] = p;
    }
    if (reason.len > 0) {
        brk_prop p = P_(DLQ_PREFIX "reason", reason.ptr, reason.len);
        h[nh++] = p;
    }
#undef P_
    uint8_t *props = NULL;
    size_t plen = 0;
    st = props_build(rec->props, h, nh, true, &props, &plen);
    if (st == BRK_TOOBIG && reason.len > 0)
        st = props_build(rec->props, h, nh - 1, true, &props, &plen);
    if (st != BRK_OK)
        return st;
    brk_append_req q;
    req_from(&q, rec);
    q.topic = g->dlq_topic;
    q.queue = 0;
    q.props = (brk_bytes){ props, plen };
    q.allow_internal = true;
    q.defer_sync = defer;
    brk_append_res ar;
    st = brk_store_append(G->s, &q, &ar);
    free(props);
    return st;
}

/* A location of a flight that survives reallocations. */
typedef struct floc {
    uint32_t k;                 /* subscription */
    bool retry;                 /* a retry queue (else a main queue) */
    uint32_t i;                 /* index among the main or retry queues */
    uint64_t off;
} floc;

static qstate *loc_q(member *m, const floc *l, bool *retry, uint16_t *queue)
{
    if (l->k >= m->nss)
        return NULL;
    substate *ss = &m->ss[l->k];
    *retry = l->retry;
    if (!l->retry) {
        if (l->i >= ss->nmq)
            return NULL;
        *queue = (uint16_t)l->i;
        return &ss->mq[l->i];
    }
    if (l->i >= ss->nrq)
        return NULL;
    *queue = (uint16_t)(l->k * LEVELS + l->i);
    return &ss->rq[l->i];
}

/* A delivery failed (nack, expiry): dead-letter it at max_deliveries,
 * else (non-FIFO) copy it to the retry queue, or (FIFO) put it in WAIT.
 * The retry delay counts from the failure: now for a nack, the moment the
 * invisibility ran out for an expiry (however late the tick noticed it).
 * *settle says the caller must settle it once the copy is durable.  On a
 * failed append the flight stays OUT, due again after a backoff.  g->mu
 * held. */
static brk_status fail_one(brk_groups *G, group *g, member *m, const floc *l,
                           int64_t delay_ms, brk_bytes reason, bool defer,
                           bool expired, int64_t now, bool *settle)
{
    *settle = false;
    bool retry;
    uint16_t queue;
    qstate *q = loc_q(m, l, &retry, &queue);
    int64_t i = q ? flight_find(q, l->off) : -1;
    if (i < 0)
        return BRK_CONFLICT;
    flight *f = &q->fl[i];
    uint32_t count = f->count;
    int64_t base = expired && f->visible_at < now ? f->visible_at : now;
    bool dlq = count >= g->cfg.max_deliveries;
    int64_t delay = delay_ms > 0 ? brk_delay_level_ms(level_for(delay_ms))
                                 : brk_group_retry_delay_ms(count);
    if (g->cfg.fifo && !dlq) {
        if (f->state == FL_OUT) {
            m->inflight--;
            m->inflight_bytes -= f->bytes;
        }
        f->state = FL_WAIT;
        f->visible_at = base + delay;
        arm(G, g, f->visible_at);
        return BRK_OK;
    }
    brk_batch *b = NULL;
    brk_status st = brk_store_read_at(G->s, f->log_off, &b);
    if (st == BRK_NOTFOUND) {       /* removed by retention: nothing to keep */
        *settle = true;
        return BRK_OK;
    }
    if (st == BRK_OK && b->count != 1)
        st = BRK_CORRUPT;
    if (st == BRK_OK) {
        const brk_record *rec = &b->recs[0];
        orig o;
        orig_of(rec, retry, g->subs[l->k].topic, queue, l->off, &o);
        brk_bytes rs = reason.len ? reason : o.reason;
        if (dlq) {
            st = dead_letter(G, g, m, rec, &o, count, rs, defer);
        } else {
            int level = level_for(delay);
            st = retry_copy(G, g, m, l->k, rec, &o, count, level,
                            base + brk_delay_level_ms(level), rs, defer);
        }
    }
    brk_batch_free(b);
    if (st == BRK_OK) {
        *settle = true;
    } else {
        q = loc_q(m, l, &retry, &queue);
        i = q ? flight_find(q, l->off) : -1;
        if (i >= 0) {
            q->fl[i].visible_at = now + FAIL_BACKOFF_MS;
            note_vis(m, q->fl[i].visible_at);
            arm(G, g, q->fl[i].visible_at);
        }
    }
    return st;
}

/* Settle the flight at l (after fail_one said so). */
static void settle_loc(brk_groups *G, group *g, member *m, const floc *l)
{
    bool retry;
    uint16_t queue;
    qstate *q = loc_q(m, l, &retry, &queue);
    int64_t i = q ? flight_find(q, l->off) : -1;
    if (i >= 0) {
        settle_flight(m, q, (uint32_t)i);
        mark_dirty(G);
        (void)g;
    }
}

/* Handle m's deliveries whose invisibility ran out.  In SYNC mode the
 * copies of one round are appended with defer_sync and made durable by one
 * flush before any original is settled.  g->mu held. */
static brk_status expire_member(brk_groups *G, group *g, member *m,
                                int64_t now)
{
    if (now < m->min_vis)
        return BRK_OK;
    floc *ex = NULL;
    size_t n = 0, cap = 0;
    brk_status st = BRK_OK;
    int64_t rest = INT64_MAX;       /* earliest expiry that stays */
    for (uint32_t k = 0; k < m->nss; k++) {
        substate *ss = &m->ss[k];
        uint32_t nq = ss->nmq + ss->nrq;
        for (uint32_t qi = 0; qi < nq; qi++) {
            qstate *q = qi < ss->nmq ? &ss->mq[qi] : &ss->rq[qi - ss->nmq];
            for (uint32_t i = 0; i < q->nfl; i++) {
                if (q->fl[i].state != FL_OUT)
                    continue;
                if (q->fl[i].visible_at > now) {
                    if (q->fl[i].visible_at < rest)
                        rest = q->fl[i].visible_at;
                    continue;
                }
                if (n == cap) {
                    size_t nc = cap ? cap * 2 : 16;
                    floc *ne = realloc(ex, nc * sizeof *ne);
                    if (!ne) {
                        st = BRK_NOMEM;
                        goto scan_done;
                    }
                    ex = ne;
                    cap = nc;
                }
                bool r = qi >= ss->nmq;
                ex[n++] = (floc){ k, r, r ? qi - ss->nmq : qi, q->fl[i].off };
            }
        }
    }
scan_done:
    if (st == BRK_OK)
        m->min_vis = rest;      /* failures below lower it again */
    if (n == 0) {
        free(ex);
        return st;
    }
    bool defer = G->sync_mode && n > 1;
    bool *ok = calloc(n, sizeof *ok);
    if (!ok) {
        free(ex);
        return BRK_NOMEM;
    }
    size_t nok = 0;
    brk_bytes reason = { TIMEOUT_REASON, sizeof TIMEOUT_REASON - 1 };
    for (size_t i = 0; i < n; i++) {
        brk_status s1 = fail_one(G, g, m, &ex[i], 0, reason, defer, true, now,
                                 &ok[i]);
        if (s1 != BRK_OK && st == BRK_OK)
            st = s1;
        nok += ok[i];
    }
    if (defer && nok > 0) {
        brk_status s2 = brk_store_flush(G->s);
        if (s2 != BRK_OK) {      /* keep them all; they come back */
            if (st == BRK_OK)
                st = s2;
            for (size_t i = 0; i < n; i++)
                if (ok[i]) {
                    ok[i] = false;
                    bool r;
                    uint16_t qq;
                    qstate *q = loc_q(m, &ex[i], &r, &qq);
                    int64_t j = q ? flight_find(q, ex[i].off) : -1;
                    if (j >= 0) {
                        q->fl[j].visible_at = now + FAIL_BACKOFF_MS;
                        note_vis(m, q->fl[j].visible_at);
                    }
                }
            arm(G, g, now + FAIL_BACKOFF_MS);
        }
    }
    for (size_t i = 0; i < n; i++)
        if (ok[i])
            settle_loc(G, g, m, &ex[i]);
    free(ok);
    free(ex);
    return st;
}

/* ---- receive ---------------------------------------------------------------------- */

typedef struct rbuild {
    brk_receive_batch *b;
    void **chunks;              /* b->priv_: one malloc'ed copy per message */
    uint32_t max;
} rbuild;

void brk_receive_batch_free(brk_receive_batch *b)
{
    if (!b)
        return;
    void **chunks = b->priv_;
    if (chunks)
        for (size_t i = 0; i < b->count; i++)
            free(chunks[i]);
    free(chunks);
    free(b->msgs);
    free(b);
}

static brk_status rb_init(rbuild *rb, uint32_t max)
{
    rb->max = max;
    rb->b = calloc(1, sizeof *rb->b);
    if (!rb->b)
        return BRK_NOMEM;
    rb->b->msgs = calloc(max, sizeof *rb->b->msgs);
    rb->chunks = calloc(max, sizeof *rb->chunks);
    rb->b->priv_ = rb->chunks;
    if (!rb->b->msgs || !rb->chunks) {
        brk_receive_batch_free(rb->b);
        rb->b = NULL;
        return BRK_NOMEM;
    }
    return BRK_OK;
}

/* Copy rec into the batch as seen by the consumer: `o` gives the topic,
 * queue and offset it reports, props lose their system pairs. */
static brk_status rb_add(rbuild *rb, const brk_record *rec, const orig *o,
                         uint32_t count, const char *receipt)
{
    size_t need = o->tlen + rec->key.len + rec->tag.len + rec->props.len
                  + rec->body.len + 1;
    uint8_t *c = malloc(need);
    if (!c)
        return BRK_NOMEM;
    brk_received *r = &rb->b->msgs[rb->b->count];
    memset(r, 0, sizeof *r);
    snprintf(r->receipt, sizeof r->receipt, "%s", receipt);
    r->queue = o->queue;
    r->offset = o->off;
    r->delivery_count = count;
    r->rec = *rec;
    size_t p = 0;
    memcpy(c + p, o->topic, o->tlen);
    r->rec.topic = (brk_bytes){ c + p, o->tlen };
    p += o->tlen;
    memcpy(c + p, rec->key.ptr, rec->key.len);
    r->rec.key = (brk_bytes){ c + p, rec->key.len };
    p += rec->key.len;
    memcpy(c + p, rec->tag.ptr, rec->tag.len);
    r->rec.tag = (brk_bytes){ c + p, rec->tag.len };
    p += rec->tag.len;
    size_t plen = 0;
    if (rec->props.len > 0
        && brk_props_strip_sys(rec->props, c + p, rec->props.len, &plen)
               != BRK_OK)
        plen = 0;
    r->rec.props = (brk_bytes){ c + p, plen };
    p += plen;
    memcpy(c + p, rec->body.ptr, rec->body.len);
    r->rec.body = (brk_bytes){ c + p, rec->body.len };
    r->rec.queue = o->queue;
    r->rec.queue_offset = o->off;
    rb->chunks[rb->b->count] = c;
    rb->b->count++;
    return BRK_OK;
}

static void make_receipt(const brk_groups *G, uint32_t k, uint32_t midx,
                         bool retry, uint16_t queue, uint64_t off,
                         uint64_t gen, char out[BRK_RECEIPT_MAX + 1])
{
    snprintf(out, BRK_RECEIPT_MAX + 1, "%s.%u.%u.%c.%u.%" PRIu64 ".%" PRIu64,
             G->epoch, k, midx, retry ? 'r' : 'm', (unsigned)queue, off, gen);
}

/* Whether one more message of `bytes` fits m's in-flight bounds (a lone
 * message always fits, however large). */
static bool room(const group *g, const member *m, uint32_t bytes)
{
    if (m->inflight >= g->cfg.max_inflight)
        return false;
    return m->inflight == 0
           || m->inflight_bytes + bytes <= g->cfg.max_inflight_bytes;
}

typedef struct rctx {
    int64_t now;
    uint32_t invisible;
    rbuild *rb;
    bool limited;               /* stopped by the in-flight bound */
    bool handed;                /* something was handed out */
} rctx;

/* Settle offset `off` == q->next without delivering it. */
static void skip_one(brk_groups *G, group *g, qstate *q, uint64_t off)
{
    (void)q_settle(q, off, off + 1);
    q->next = off + 1;
    g->progress = true;
    mark_dirty(G);
}

/* Deliver from one queue of subscription k into rc->rb.  g->mu held. */
static brk_status take_from(brk_groups *G, group *g, member *m, uint32_t k,
                            uint32_t qi, rctx *rc)
{
    substate *ss = &m->ss[k];
    bool retry = qi >= ss->nmq;
    uint32_t ri = retry ? qi - ss->nmq : 0;
    qstate *q = retry ? &ss->rq[ri] : &ss->mq[qi];
    const char *topic = retry ? m->retry_topic : g->subs[k].topic;
    uint16_t queue = (uint16_t)(retry ? k * LEVELS + ri : qi);
    const filter *f = &g->subs[k].f;
    bool fifo = g->cfg.fifo;
    char receipt[BRK_RECEIPT_MAX + 1];
    brk_status st;

    if (fifo && q->nfl > 0) {       /* blocked, or its retry is due */
        flight *fl = &q->fl[0];
        if (fl->state != FL_WAIT || fl->visible_at > rc->now)
            return BRK_OK;
        if (!room(g, m, fl->bytes)) {
            rc->limited = true;
            return BRK_OK;
        }
        brk_batch *b = NULL;
        st = brk_store_read_at(G->s, fl->log_off, &b);
        if (st == BRK_NOTFOUND) {
            settle_flight(m, q, 0);
            mark_dirty(G);
            return BRK_OK;
        }
        if (st == BRK_OK && b->count != 1)
            st = BRK_CORRUPT;
        if (st != BRK_OK) {
            brk_batch_free(b);
            return st;
        }
        uint64_t gen = ++g->gen;
        orig o;
        orig_of(&b->recs[0], false, g->subs[k].topic, queue, fl->off, &o);
        make_receipt(G, k, m->idx, false, queue, fl->off, gen, receipt);
        st = rb_add(rc->rb, &b->recs[0], &o, fl->count + 1, receipt);
        brk_batch_free(b);
        if (st != BRK_OK)
            return st;
        fl->count++;
        fl->gen = gen;
        fl->state = FL_OUT;
        fl->visible_at = rc->now + rc->invisible;
        note_vis(m, fl->visible_at);
        m->inflight++;
        m->inflight_bytes += fl->bytes;
        rc->handed = true;
        return BRK_OK;
    }

    uint32_t want = fifo ? 1 : rc->rb->max - (uint32_t)rc->rb->b->count;
    brk_cq_entry ents[ENTRY_CHUNK];
    while (want > 0) {
        size_t n = 0;
        uint64_t first = q->next;
        size_t ask = f->all ? (want < ENTRY_CHUNK ? want : ENTRY_CHUNK)
                            : ENTRY_CHUNK;
        uint64_t span_lo = q_skip_settled(q);
        if (span_lo - q->next < ask)
            ask = (size_t)(span_lo - q->next);
        st = brk_store_read_entries(G->s, topic, queue, q->next, ents, ask, &n,
                                    &first);
        if (st == BRK_NOTFOUND)
            return BRK_OK;
        if (st == BRK_RANGE) {
            /* next is beyond the queue's end (it lost data): restart there. */
            uint64_t mn = 0, mx = 0;
            if (brk_store_queue_range(G->s, topic, queue, &mn, &mx) == BRK_OK
                && q->nfl == 0 && mx < q->next) {
                q->committed = q->next = mx;
                q->nsp = 0;
                mark_dirty(G);
            }
            return BRK_OK;
        }
        if (st != BRK_OK)
            return st;
        if (first > q->next) {      /* retention removed what we had not read */
            (void)q_settle(q, q->next, first);
            q->next = first;
            mark_dirty(G);
        }
        if (n == 0)
            return BRK_OK;
        for (size_t j = 0; j < n; j++) {
            uint64_t off = first + j;
            const brk_cq_entry *e = &ents[j];
            if (!filter_hash_ok(f, e->tag_hash)) {
                skip_one(G, g, q, off);
                continue;
            }
            if (!room(g, m, e->size)) {
                rc->limited = true;
                return BRK_OK;
            }
            brk_batch *b = NULL;
            st = brk_store_read_at(G->s, e->log_offset, &b);
            if (st == BRK_NOTFOUND) {
                skip_one(G, g, q, off);
                continue;
            }
            if (st == BRK_OK && b->count != 1)
                st = BRK_CORRUPT;
            if (st != BRK_OK) {
                brk_batch_free(b);
                return st;
            }
            const brk_record *rec = &b->recs[0];
            if (!filter_tag_ok(f, rec->tag)) {
                brk_batch_free(b);
                skip_one(G, g, q, off);
                continue;
            }
            orig o;
            orig_of(rec, retry, g->subs[k].topic, queue, off, &o);
            uint32_t count = 1;
            if (retry) {
                if (o.notbefore > rc->now) {     /* head not due yet */
                    q->head_off = off;
                    q->head_due = o.notbefore;
                    arm(G, g, o.notbefore);
                    brk_batch_free(b);
                    return BRK_OK;
                }
                count = o.count + 1;
            }
            if ((st = flight_reserve(q)) != BRK_OK) {
                brk_batch_free(b);
                return st;
            }
            uint64_t gen = ++g->gen;
            make_receipt(G, k, m->idx, retry, queue, off, gen, receipt);
            st = rb_add(rc->rb, rec, &o, count, receipt);
            brk_batch_free(b);
            if (st != BRK_OK)
                return st;
            flight fl = { off, e->log_offset, gen, rc->now + rc->invisible,
                          count, e->size, FL_OUT };
            flight_push(q, &fl);
            note_vis(m, fl.visible_at);
            m->inflight++;
            m->inflight_bytes += e->size;
            q->next = off + 1;
            g->progress = true;
            rc->handed = true;
            mark_dirty(G);
            if (--want == 0)
                return BRK_OK;
        }
    }
    return BRK_OK;
}

/* The due time of retry queue ri's head: INT64_MAX when empty, <= now when
 * deliverable.  g->mu held. */
static int64_t retry_head(brk_groups *G, member *m, uint32_t k, uint32_t ri,
                          qstate *q)
{
    if (q->head_due != INT64_MIN && q->head_off == q->next)
        return q->head_due;
    uint16_t queue = (uint16_t)(k * LEVELS + ri);
    brk_cq_entry e;
    size_t n = 0;
    uint64_t first = q->next;
    if (brk_store_read_entries(G->s, m->retry_topic, queue, q->next, &e, 1, &n,
                               &first) != BRK_OK)
        return INT64_MAX;
    if (n == 0)
        return INT64_MAX;
    if (first != q->next)
        return INT64_MIN + 1;       /* a receive must fix next: "due" */
    brk_batch *b = NULL;
    if (brk_store_read_at(G->s, e.log_offset, &b) != BRK_OK || b->count != 1) {
        brk_batch_free(b);
        return INT64_MIN + 1;
    }
    brk_bytes v;
    int64_t due = INT64_MIN + 1;
    if (brk_props_get(b->recs[0].props, SYS_NOTBEFORE, &v) == BRK_OK
        && v.len == 8)
        due = (int64_t)brk_ld64(v.ptr);
    brk_batch_free(b);
    q->head_off = q->next;
    q->head_due = due;
    return due;
}

/* Whether a message of `bytes` fits m's in-flight bounds, as room() says;
 * a refusal is remembered in m->blocked so that the next settle wakes the
 * member's waiters. */
static bool fits(const group *g, member *m, uint32_t bytes)
{
    if (room(g, m, bytes))
        return true;
    m->blocked = true;
    return false;
}

/* Whether the entry at q->next of (topic, queue) fits m's bounds (true when
 * it cannot be read: a receive will find out).  g->mu held. */
static bool next_fits(brk_groups *G, const group *g, member *m,
                      const char *topic, uint16_t queue, qstate *q)
{
    if (m->inflight == 0)
        return fits(g, m, 0);
    (void)q_skip_settled(q);
    brk_cq_entry e;
    size_t n = 0;
    uint64_t first = q->next;
    if (brk_store_read_entries(G->s, topic, queue, q->next, &e, 1, &n,
                               &first) != BRK_OK || n == 0)
        return true;
    return fits(g, m, e.size);
}

/* Whether a receive by m for subscription k would find something now: a
 * message that is ready and fits the in-flight bounds (the same room()
 * test the receive applies, so that a waiter at the byte bound sleeps
 * until a settle frees room instead of waking at once, again and again).
 * g->mu held. */
static bool has_work(brk_groups *G, group *g, member *m, uint32_t k,
                     int64_t now)
{
    if (!fits(g, m, 0))
        return false;
    substate *ss;
    if (ss_ensure(G, g, m, k, &ss) != BRK_OK)
        return false;
    for (uint32_t qi = 0; qi < ss->nmq; qi++) {
        qstate *q = &ss->mq[qi];
        if (g->cfg.fifo && q->nfl > 0) {
            if (q->fl[0].state == FL_WAIT && q->fl[0].visible_at <= now
                && fits(g, m, q->fl[0].bytes))
                return true;
            continue;
        }
        uint64_t mn = 0, mx = 0;
        if (brk_store_queue_range(G->s, g->subs[k].topic, (uint16_t)qi, &mn,
                                  &mx) == BRK_OK && q->next < mx
            && next_fits(G, g, m, g->subs[k].topic, (uint16_t)qi, q))
            return true;
    }
    for (uint32_t ri = 0; !g->cfg.fifo && ri < ss->nrq; ri++)
        if (retry_head(G, m, k, ri, &ss->rq[ri]) <= now
            && next_fits(G, g, m, m->retry_topic,
                         (uint16_t)(k * LEVELS + ri), &ss->rq[ri]))
            return true;
    return false;
}

/* The earliest time after `now` something of g comes due: an expiry, a
 * FIFO retry, a retry queue's head (what is due already was handled or
 * announced by the caller).  g->mu held. */
static int64_t next_event(brk_groups *G, group *g, int64_t now)
{
    int64_t next = INT64_MAX;
    for (uint32_t mi = 0; mi < g->nmembers; mi++) {
        member *m = g->members[mi];
        for (uint32_t k = 0; k < m->nss; k++) {
            substate *ss = &m->ss[k];
            uint32_t nq = ss->nmq + ss->nrq;
            for (uint32_t qi = 0; qi < nq; qi++) {
                qstate *q = qi < ss->nmq ? &ss->mq[qi] : &ss->rq[qi - ss->nmq];
                for (uint32_t i = 0; i < q->nfl; i++)
                    if (q->fl[i].visible_at > now && q->fl[i].visible_at < next)
                        next = q->fl[i].visible_at;
            }
            for (uint32_t ri = 0; !g->cfg.fifo && ri < ss->nrq; ri++) {
                int64_t d = retry_head(G, m, k, ri, &ss->rq[ri]);
                if (d > now && d < next)
                    next = d;
            }
        }
    }
    return next;
}

typedef struct wake_ent {
    char topic[BRK_TOPIC_MAX + 1];
    char member[BRK_MEMBER_MAX + 1];
} wake_ent;

typedef struct wake_list {
    wake_ent *v;
    size_t n, cap;
} wake_list;

/* Remember to wake the waiters of (topic, member); false when out of
 * memory. */
static bool wake_add(wake_list *wl, const char *topic, const char *mem)
{
    if (wl->n == wl->cap) {
        size_t nc = wl->cap ? wl->cap * 2 : 4;
        wake_ent *nv = realloc(wl->v, nc * sizeof *nv);
        if (!nv)
            return false;
        wl->v = nv;
        wl->cap = nc;
    }
    snprintf(wl->v[wl->n].topic, sizeof wl->v[0].topic, "%s", topic);
    snprintf(wl->v[wl->n].member, sizeof wl->v[0].member, "%s", mem);
    wl->n++;
    return true;
}

/* Wake what wl names (no lock held), and free it. */
static void wake_run(brk_groups *G, wake_list *wl, const char *group_name,
                     bool broadcast)
{
    for (size_t i = 0; i < wl->n; i++)
        wake_topic(G, wl->v[i].topic, group_name,
                   broadcast ? wl->v[i].member : NULL);
    free(wl->v);
    wl->v = NULL;
    wl->n = wl->cap = 0;
}

/* A group timer fired: handle expiries, wake whoever has work, re-arm. */
static brk_status process_group(brk_groups *G, group *g, int64_t now)
{
    brk_status st = BRK_OK;
    wake_list wl = { 0 };
    defer_begin();
    pthread_mutex_lock(&g->mu);
    for (uint32_t mi = 0; mi < g->nmembers; mi++) {
        brk_status s1 = expire_member(G, g, g->members[mi], now);
        if (s1 != BRK_OK && st == BRK_OK)
            st = s1;
    }
    for (uint32_t mi = 0; mi < g->nmembers; mi++) {
        member *m = g->members[mi];
        for (uint32_t k = 0; k < g->nsubs; k++) {
            if (has_work(G, g, m, k, now)
                && !wake_add(&wl, g->subs[k].topic, m->name))
                break;
        }
    }
    arm(G, g, next_event(G, g, now));
    bool bc = g->cfg.broadcast;
    pthread_mutex_unlock(&g->mu);
    defer_end(G);
    wake_run(G, &wl, g->name, bc);
    return st;
}

/* ---- state file ------------------------------------------------------------------- */

typedef struct wbuf {
    uint8_t *p;
    size_t len, cap;
    bool fail;
} wbuf;

static void wb_put(wbuf *w, const void *v, size_t n)
{
    if (w->fail)
        return;
    if (w->len + n > w->cap) {
        size_t nc = w->cap ? w->cap : 4096;
        while (nc < w->len + n)
            nc *= 2;
        uint8_t *np = realloc(w->p, nc);
        if (!np) {
            w->fail = true;
            return;
        }
        w->p = np;
        w->cap = nc;
    }
    memcpy(w->p + w->len, v, n);
    w->len += n;
}

static void wb_u8(wbuf *w, uint8_t v)
{
    wb_put(w, &v, 1);
}

static void wb_u16(wbuf *w, uint16_t v)
{
    uint8_t b[2];
    brk_st16(b, v);
    wb_put(w, b, 2);
}

static void wb_u32(wbuf *w, uint32_t v)
{
    uint8_t b[4];
    brk_st32(b, v);
    wb_put(w, b, 4);
}

static void wb_u64(wbuf *w, uint64_t v)
{
    uint8_t b[8];
    brk_st64(b, v);
    wb_put(w, b, 8);
}

/* A queue's progress: committed, then the settled spans above it. */
static void wb_q(wbuf *w, const qstate *q)
{
    wb_u64(w, q->committed);
    wb_u32(w, q->nsp);
    for (uint32_t i = 0; i < q->nsp; i++) {
        wb_u64(w, q->sp[i].lo);
        wb_u64(w, q->sp[i].hi);
    }
}

typedef struct rdr {
    const uint8_t *p;
    size_t len, pos;
    bool bad;
} rdr;

static const uint8_t *rd_take(rdr *r, size_t n)
{
    if (r->bad || r->len - r->pos < n) {
        r->bad = true;
        return NULL;
    }
    const uint8_t *p = r->p + r->pos;
    r->pos += n;
    return p;
}

/* Readers return 0 past the end and mark the reader bad. */
static uint8_t rd_u8(rdr *r)
{
    const uint8_t *p = rd_take(r, 1);
    return p ? p[0] : 0;
}

static uint16_t rd_u16(rdr *r)
{
    const uint8_t *p = rd_take(r, 2);
    return p ? brk_ld16(p) : 0;
}

static uint32_t rd_u32(rdr *r)
{
    const uint8_t *p = rd_take(r, 4);
    return p ? brk_ld32(p) : 0;
}

static uint64_t rd_u64(rdr *r)
{
    const uint8_t *p = rd_take(r, 8);
    return p ? brk_ld64(p) : 0;
}

/* Read a length-prefixed string into out[cap] (NUL-terminated). */
static void rd_str(rdr *r, size_t n, char *out, size_t cap)
{
    const uint8_t *p = rd_take(r, n);
    if (!p || n >= cap) {
        r->bad = true;
        out[0] = 0;
        return;
    }
    memcpy(out, p, n);
    out[n] = 0;
}

static void rd_q(rdr *r, qstate *q)
{
    q_init(q, rd_u64(r));
    uint32_t n = rd_u32(r);
    if (r->bad || n > (r->len - r->pos) / 16) {
        r->bad = true;
        return;
    }
    q->sp = n ? malloc(n * sizeof *q->sp) : NULL;
    if (n && !q->sp) {
        r->bad = true;
        return;
    }
    q->csp = q->nsp = n;
    uint64_t prev = q->committed;
    for (uint32_t i = 0; i < n; i++) {
        q->sp[i].lo = rd_u64(r);
        q->sp[i].hi = rd_u64(r);
        if (q->sp[i].lo <= prev || q->sp[i].hi <= q->sp[i].lo)
            r->bad = true;
        prev = q->sp[i].hi;
    }
}

typedef struct cursor_pos {
    uint32_t id;
    uint64_t off;
} cursor_pos;

/* Lowest log offset still needed by (m, k): the entry at each committed
 * offset, `end` for a fully consumed queue.  g->mu held. */
static uint64_t ss_low(brk_groups *G, const group *g, const member *m,
                       uint32_t k, uint64_t end)
{
    const substate *ss = &m->ss[k];
    uint64_t low = end;
    for (uint32_t i = 0; i < ss->nmq + ss->nrq; i++) {
        bool r = i >= ss->nmq;
        const qstate *q = r ? &ss->rq[i - ss->nmq] : &ss->mq[i];
        const char *t = r ? m->retry_topic : g->subs[k].topic;
        uint16_t queue = (uint16_t)(r ? k * LEVELS + (i - ss->nmq) : i);
        brk_cq_entry e;
        size_t n = 0;
        uint64_t first;
        if (brk_store_read_entries(G->s, t, queue, q->committed, &e, 1, &n,
                                   &first) == BRK_OK && n == 1
            && e.log_offset < low)
            low = e.log_offset;
    }
    return low;
}

/* Serialize g (g->mu held) and collect its cursor positions. */
static void group_serialize(brk_groups *G, group *g, wbuf *w, uint64_t end,
                            cursor_pos **cp, size_t *ncp, size_t *ccp)
{
    size_t nl = strlen(g->name);
    wb_u8(w, (uint8_t)nl);
    wb_put(w, g->name, nl);
    wb_u8(w, (uint8_t)((g->cfg.fifo ? 1 : 0) | (g->cfg.broadcast ? 2 : 0)
                       | (g->cfg.persist_every_ack ? 4 : 0)
                       | (g->progress ? 8 : 0)));
    wb_u16(w, g->cfg.max_deliveries);
    wb_u32(w, g->cfg.max_inflight);
    wb_u64(w, g->cfg.max_inflight_bytes);
    wb_u64(w, g->dlq_replay);
    wb_u16(w, (uint16_t)g->nsubs);
    for (uint32_t k = 0; k < g->nsubs; k++) {
        size_t tl = strlen(g->subs[k].topic);
        size_t fl = strlen(g->subs[k].f.text);
        wb_u8(w, (uint8_t)tl);
        wb_put(w, g->subs[k].topic, tl);
        wb_u16(w, (uint16_t)fl);
        wb_put(w, g->subs[k].f.text, fl);
    }
    wb_u32(w, g->nmembers);
    for (uint32_t mi = 0; mi < g->nmembers; mi++) {
        member *m = g->members[mi];
        for (uint32_t k = 0; k < g->nsubs; k++) {
            substate *sp;       /* registers the cursor of a new one */
            (void)ss_ensure(G, g, m, k, &sp);
        }
        size_t ml = strlen(m->name);
        wb_u8(w, (uint8_t)ml);
        wb_put(w, m->name, ml);
        for (uint32_t k = 0; k < g->nsubs; k++) {
            const substate *ss = k < m->nss ? &m->ss[k] : NULL;
            uint32_t nmq = ss ? ss->nmq : 0, nrq = ss ? ss->nrq : 0;
            wb_u16(w, (uint16_t)nmq);
            for (uint32_t i = 0; i < nmq; i++)
                wb_q(w, &ss->mq[i]);
            wb_u8(w, (uint8_t)nrq);
            for (uint32_t i = 0; i < nrq; i++)
                wb_q(w, &ss->rq[i]);
            if (ss && ss->has_cursor && cp) {
                if (*ncp == *ccp) {
                    size_t nc = *ccp ? *ccp * 2 : 16;
                    cursor_pos *n2 = realloc(*cp, nc * sizeof *n2);
                    if (!n2)
                        continue;
                    *cp = n2;
                    *ccp = nc;
                }
                (*cp)[(*ncp)++] = (cursor_pos){ ss->cursor,
                                                ss_low(G, g, m, k, end) };
            }
        }
    }
}

static size_t groups_snapshot(brk_groups *G, group ***out)
{
    pthread_mutex_lock(&G->reg_mu);
    size_t n = G->ngroups;
    *out = n ? malloc(n * sizeof **out) : NULL;
    if (*out)
        memcpy(*out, G->groups, n * sizeof **out);
    else
        n = 0;
    pthread_mutex_unlock(&G->reg_mu);
    return n;
}

/* Write state.groups when something changed (or `force`), then move the
 * retention cursors.  With !write only the cursors move (open). */
static brk_status save_state_ex(brk_groups *G, bool force, bool write)
{
    pthread_mutex_lock(&G->save_mu);
    uint64_t seq = atomic_load(&G->dirty_seq);
    if (!force && seq == atomic_load(&G->saved_seq)) {
        pthread_mutex_unlock(&G->save_mu);
        return BRK_OK;
    }
    brk_store_stats ss;
    brk_store_get_stats(G->s, &ss);
    uint64_t end = ss.durable_offset;
    group **gs = NULL;
    size_t ng = groups_snapshot(G, &gs);
    wbuf w = { 0 };
    wb_u32(&w, STATE_MAGIC);
    wb_u32(&w, STATE_VERSION);
    wb_u32(&w, (uint32_t)ng);
    cursor_pos *cp = NULL;
    size_t ncp = 0, ccp = 0;
    for (size_t i = 0; i < ng; i++) {
        pthread_mutex_lock(&gs[i]->mu);
        group_serialize(G, gs[i], &w, end, &cp, &ncp, &ccp);
        pthread_mutex_unlock(&gs[i]->mu);
    }
    free(gs);
    brk_status st = BRK_OK;
    /* An original is settled only after its retry copy or dead letter was
     * appended, but in ASYNC mode that append is not synced: make it
     * durable before the file that says the original is done (a no-op when
     * nothing is unsynced).  After the serialization, so it covers every
     * copy whose settle the file records. */
    if (write)
        st = w.fail ? BRK_NOMEM : brk_store_flush(G->s);
    if (write && st == BRK_OK)
        st = brk_store_state_write(G->s, STATE_NAME, w.p, w.len);
    free(w.p);
    if (st == BRK_OK) {
        if (write)
            atomic_store(&G->saved_seq, seq);
        for (size_t i = 0; i < ncp; i++)
            (void)brk_store_cursor_set(G->s, cp[i].id, cp[i].off);
    }
    free(cp);
    atomic_store(&G->next_persist, now_ms(G) + G->o.persist_interval_ms);
    pthread_mutex_unlock(&G->save_mu);
    return st;
}

static brk_status save_state(brk_groups *G, bool force)
{
    return save_state_ex(G, force, true);
}

/* Make sure every change counted up to `target` (a dirty_seq value read
 * after the change) is on disk.  Callers that queue behind a save in
 * progress usually find it covered theirs: one write serves them all, as a
 * group commit does. */
static brk_status save_covering(brk_groups *G, uint64_t target)
{
    pthread_mutex_lock(&G->save_mu);
    bool done = atomic_load(&G->saved_seq) >= target;
    pthread_mutex_unlock(&G->save_mu);
    return done ? BRK_OK : save_state(G, false);
}

/* Load state.groups into an empty registry (open). */
static brk_status load_state(brk_groups *G, char *errbuf, size_t errlen)
{
    void *buf = NULL;
    size_t len = 0;
    brk_status st = brk_store_state_read(G->s, STATE_NAME, &buf, &len);
    if (st == BRK_NOTFOUND)
        return BRK_OK;
    if (st != BRK_OK) {
        set_err(errbuf, errlen, "reading state.groups: %s: %s",
                brk_strerror(st), brk_store_errstr(G->s));
        return st;
    }
    rdr r = { buf, len, 0, false };
    group *g = NULL;
    if (rd_u32(&r) != STATE_MAGIC || rd_u32(&r) != STATE_VERSION) {
        set_err(errbuf, errlen, "state.groups: bad magic or version");
        free(buf);
        return BRK_CORRUPT;
    }
    uint32_t ng = rd_u32(&r);
    st = BRK_OK;
    for (uint32_t gi = 0; gi < ng && !r.bad && st == BRK_OK; gi++) {
        char name[BRK_GROUP_MAX + 1];
        rd_str(&r, rd_u8(&r), name, sizeof name);
        brk_group_config cfg;
        brk_group_config_init(&cfg);
        uint8_t fl = rd_u8(&r);
        cfg.fifo = fl & 1;
        cfg.broadcast = fl & 2;
        cfg.persist_every_ack = fl & 4;
        cfg.max_deliveries = rd_u16(&r);
        cfg.max_inflight = rd_u32(&r);
        cfg.max_inflight_bytes = rd_u64(&r);
        uint64_t replay = rd_u64(&r);
        if (r.bad || !group_name_ok(name) || !config_ok(&cfg)) {
            r.bad = true;
            break;
        }
        brk_group_config c2 = cfg;
        c2.broadcast = true;            /* members come from the file */
        if ((st = group_new(name, &c2, &g)) != BRK_OK)
            break;
        g->cfg = cfg;
        g->progress = fl & 8;
        g->dlq_replay = replay;
        uint16_t nsubs = rd_u16(&r);
        for (uint32_t k = 0; k < nsubs && !r.bad && st == BRK_OK; k++) {
            char topic[BRK_TOPIC_MAX + 1], ftext[BRK_FILTER_MAX + 1];
            rd_str(&r, rd_u8(&r), topic, sizeof topic);
            rd_str(&r, rd_u16(&r), ftext, sizeof ftext);
            filter f;
            if (r.bad || filter_parse(ftext, &f) != BRK_OK) {
                r.bad = true;
                break;
            }
            uint32_t kk;
            if ((st = sub_add(g, topic, &f, &kk)) != BRK_OK)
                filter_free(&f);
        }
        uint32_t nm = rd_u32(&r);
        for (uint32_t mi = 0; mi < nm && !r.bad && st == BRK_OK; mi++) {
            char mname[BRK_MEMBER_MAX + 1];
            rd_str(&r, rd_u8(&r), mname, sizeof mname);
            member *m = member_new(g, mname, g->nmembers);
            if (!m || (st = members_push(g, m)) != BRK_OK) {
                free(m);
                st = BRK_NOMEM;
                break;
            }
            m->ss = calloc(g->nsubs ? g->nsubs : 1, sizeof *m->ss);
            if (!m->ss) {
                st = BRK_NOMEM;
                break;
            }
            m->nss = g->nsubs;
            for (uint32_t k = 0; k < g->nsubs && !r.bad; k++) {
                substate *ss = &m->ss[k];
                uint32_t nmq = rd_u16(&r);
                ss->mq = nmq ? calloc(nmq, sizeof *ss->mq) : NULL;
                if (nmq && !ss->mq) {
                    st = BRK_NOMEM;
                    break;
                }
                ss->nmq = nmq;
                for (uint32_t i = 0; i < nmq; i++)
                    rd_q(&r, &ss->mq[i]);
                uint32_t nrq = rd_u8(&r);
                if (nrq != 0 && nrq != LEVELS) {
                    r.bad = true;
                    break;
                }
                ss->rq = nrq ? calloc(nrq, sizeof *ss->rq) : NULL;
                if (nrq && !ss->rq) {
                    st = BRK_NOMEM;
                    break;
                }
                ss->nrq = nrq;
                for (uint32_t i = 0; i < nrq; i++)
                    rd_q(&r, &ss->rq[i]);
                if (nrq)
                    m->retry_nq = (k + 1) * LEVELS;
            }
        }
        if (r.bad || st != BRK_OK)
            break;
        if ((!cfg.broadcast && (g->nmembers != 1 || g->members[0]->name[0]))
            || (cfg.broadcast && g->nmembers > 0 && !g->members[0]->name[0])) {
            r.bad = true;
            break;
        }
        pthread_mutex_lock(&G->reg_mu);
        st = group_publish_locked(G, g);
        pthread_mutex_unlock(&G->reg_mu);
        if (st != BRK_OK)
            break;
        g = NULL;
    }
    group_free(G, g);
    free(buf);
    if (r.bad) {
        set_err(errbuf, errlen, "state.groups: malformed at byte %zu", r.pos);
        return BRK_CORRUPT;
    }
    if (st != BRK_OK)
        set_err(errbuf, errlen, "state.groups: loading: %s", brk_strerror(st));
    return st;
}

/* ---- public API: receive and wait ------------------------------------------------- */

static brk_status req_check(const brk_receive_req *req)
{
    if (!req || !group_name_ok(req->group) || !topic_ok(req->topic))
        return BRK_INVAL;
    if (req->invisible_ms > INVISIBLE_MAX_MS)
        return BRK_INVAL;
    if (req->member && !member_name_ok(req->member))
        return BRK_INVAL;
    return BRK_OK;
}

/* The group of a receive, created (clustering, defaults, subscribed to
 * topic) when unknown. */
static brk_status group_for(brk_groups *G, const char *name, const char *topic,
                            group **out)
{
    brk_topic_info ti;
    brk_status st = brk_topic_get(G->s, topic, &ti);
    if (st == BRK_NOTFOUND && !brk_store_auto_create(G->s))
        return BRK_NOTFOUND;
    if (st != BRK_OK && st != BRK_NOTFOUND)
        return st;
    pthread_mutex_lock(&G->reg_mu);
    group *g = find_group_locked(G, name);
    st = BRK_OK;
    if (!g) {
        filter f;
        uint32_t k;
        if ((st = group_new(name, NULL, &g)) == BRK_OK
            && (st = filter_parse(NULL, &f)) == BRK_OK
            && (st = sub_add(g, topic, &f, &k)) != BRK_OK)
            filter_free(&f);
        if (st == BRK_OK)
            st = group_publish_locked(G, g);
        if (st != BRK_OK) {
            group_free(NULL, g);
            g = NULL;
        }
    }
    pthread_mutex_unlock(&G->reg_mu);
    if (st == BRK_OK && !g)
        st = BRK_NOMEM;
    if (st == BRK_OK)
        mark_dirty(G);
    *out = g;
    return st;
}

/* The subscription of a receive, added (no filter) when the group does not
 * consume the topic yet.  g->mu held. */
static brk_status sub_for(brk_groups *G, group *g, const char *topic,
                          uint32_t *k)
{
    int64_t i = sub_find(g, topic);
    if (i >= 0) {
        *k = (uint32_t)i;
        return BRK_OK;
    }
    filter f;
    brk_status st = filter_parse(NULL, &f);
    if (st == BRK_OK && (st = sub_add(g, topic, &f, k)) != BRK_OK)
        filter_free(&f);
    if (st == BRK_OK)
        mark_dirty(G);
    return st;
}

/* Group, subscription and member of a request; g->mu is held on success. */
static brk_status req_resolve(brk_groups *G, const brk_receive_req *req,
                              group **gp, uint32_t *k, member **m)
{
    group *g;
    brk_status st = group_for(G, req->group, req->topic, &g);
    if (st != BRK_OK)
        return st;
    pthread_mutex_lock(&g->mu);
    if (g->cfg.broadcast && !req->member)
        st = BRK_INVAL;
    if (st == BRK_OK)
        st = sub_for(G, g, req->topic, k);
    if (st == BRK_OK)
        st = member_get(G, g, req->member, m, true);
    substate *ss;
    if (st == BRK_OK)
        st = ss_ensure(G, g, *m, *k, &ss);
    if (st != BRK_OK) {
        pthread_mutex_unlock(&g->mu);
        return st;
    }
    *gp = g;
    return BRK_OK;
}

/* Arm the member's retry heads of subscription k that are not due yet.
 * g->mu held. */
static void arm_heads(brk_groups *G, group *g, member *m, uint32_t k,
                      int64_t now)
{
    substate *ss = &m->ss[k];
    for (uint32_t ri = 0; !g->cfg.fifo && ri < ss->nrq; ri++) {
        int64_t d = retry_head(G, m, k, ri, &ss->rq[ri]);
        if (d > now && d != INT64_MAX)
            arm(G, g, d);
    }
}

static brk_status receive_impl(brk_groups *G, const brk_receive_req *req,
                               brk_receive_batch **out)
{
    if (!out)
        return BRK_INVAL;
    *out = NULL;
    if (!G || req_check(req) != BRK_OK || req->max < 1
        || req->max > BRK_RECEIVE_MAX)
        return BRK_INVAL;
    group *g;
    uint32_t k;
    member *m;
    brk_status st = req_resolve(G, req, &g, &k, &m);
    if (st != BRK_OK)
        return st;
    int64_t now = now_ms(G);
    defer_begin();
    (void)expire_member(G, g, m, now);   /* failures stay in flight */
    rbuild rb;
    if ((st = rb_init(&rb, req->max)) != BRK_OK) {
        pthread_mutex_unlock(&g->mu);
        defer_end(G);
        return st;
    }
    rctx rc = { now, req->invisible_ms ? req->invisible_ms
                                       : G->o.default_invisible_ms,
                &rb, false, false };
    substate *ss = &m->ss[k];
    uint32_t nq = ss->nmq + (g->cfg.fifo ? 0 : ss->nrq);
    if (!room(g, m, 0)) {
        rc.limited = true;
    } else if (nq > 0) {
        uint32_t start = m->rr++ % nq;
        for (uint32_t i = 0; i < nq; i++) {
            st = take_from(G, g, m, k, (start + i) % nq, &rc);
            if (st != BRK_OK || rc.limited || rb.b->count >= req->max)
                break;
        }
    }
    if (rc.limited)
        m->blocked = true;
    if (rc.handed)
        arm(G, g, now + rc.invisible);
    arm_heads(G, g, m, k, now);
    pthread_mutex_unlock(&g->mu);
    defer_end(G);
    if (rb.b->count == 0) {
        brk_receive_batch_free(rb.b);
        if (st != BRK_OK)
            return st;
        if (rc.limited)
            return BRK_LIMIT;
        rb.b = NULL;
        if ((st = rb_init(&rb, 1)) != BRK_OK)
            return st;
    }
    *out = rb.b;
    return BRK_OK;
}

brk_status brk_group_receive(brk_groups *G, const brk_receive_req *req,
                             brk_receive_batch **out)
{
    if (!G)
        return receive_impl(G, req, out);
    if (!call_enter(G, false)) {
        if (out)
            *out = NULL;
        return BRK_CLOSED;
    }
    brk_status st = receive_impl(G, req, out);
    call_leave(G);
    return st;
}

static brk_status wait_impl(brk_groups *G, const brk_receive_req *req,
                            int64_t deadline_ms, brk_group_wake_fn fn,
                            void *ctx, uint64_t *id)
{
    if (id)
        *id = 0;
    if (!G || !fn || req_check(req) != BRK_OK)
        return BRK_INVAL;
    group *g;
    uint32_t k;
    member *m;
    brk_status st = req_resolve(G, req, &g, &k, &m);
    if (st != BRK_OK)
        return st;
    bool bc = g->cfg.broadcast;
    pthread_mutex_unlock(&g->mu);
    waiter *w = calloc(1, sizeof *w);
    if (!w)
        return BRK_NOMEM;
    snprintf(w->topic, sizeof w->topic, "%s", req->topic);
    snprintf(w->group, sizeof w->group, "%s", req->group);
    if (bc && req->member)
        snprintf(w->member, sizeof w->member, "%s", req->member);
    w->fn = fn;
    w->ctx = ctx;
    w->state = W_WAITING;
    int64_t now = now_ms(G);
    if (deadline_ms > now + BRK_WAIT_MAX_MS)
        deadline_ms = now + BRK_WAIT_MAX_MS;
    w->deadline = deadline_ms;

    /* Register first, then look: an append after the look finds us.  Not
     * once close began: it has swept (or is about to sweep) the waiters
     * and would never fire this one. */
    pthread_mutex_lock(&G->wmu);
    if (G->closing) {
        pthread_mutex_unlock(&G->wmu);
        free(w);
        return BRK_CLOSED;
    }
    if (brk_timerheap_push(&G->wheap, deadline_ms, G->next_wid + 1) != BRK_OK) {
        pthread_mutex_unlock(&G->wmu);
        free(w);
        return BRK_NOMEM;
    }
    w->id = ++G->next_wid;
    uint64_t wid = w->id;
    waiter **ip = &G->ib[wid % WBUCKETS];
    w->inext = *ip;
    *ip = w;
    uint32_t b = str_hash(w->topic) % WBUCKETS;
    w->tnext = G->tb[b];
    if (w->tnext)
        w->tnext->tprev = w;
    G->tb[b] = w;
    G->nwaiters++;
    if (deadline_ms < G->wake_at)
        pthread_cond_signal(&G->cond);
    pthread_mutex_unlock(&G->wmu);
    if (id)
        *id = wid;

    bool ready = deadline_ms <= now;
    if (!ready) {
        pthread_mutex_lock(&g->mu);
        int64_t ki = sub_find(g, req->topic);
        member *mm = NULL;
        if (ki >= 0 && member_get(G, g, req->member, &mm, false) == BRK_OK)
            ready = has_work(G, g, mm, (uint32_t)ki, now);
        pthread_mutex_unlock(&g->mu);
    }
    if (ready) {
        waiter *list = NULL;
        pthread_mutex_lock(&G->wmu);
        waiter *x = *id_slot(G, wid);
        if (x && x->state == W_WAITING)
            w_take(G, x, &list);
        pthread_mutex_unlock(&G->wmu);
        w_fire(G, list);
    }
    return BRK_OK;
}

brk_status brk_group_wait(brk_groups *G, const brk_receive_req *req,
                          int64_t deadline_ms, brk_group_wake_fn fn,
                          void *ctx, uint64_t *id)
{
    if (!G)
        return wait_impl(G, req, deadline_ms, fn, ctx, id);
    if (!call_enter(G, false)) {
        if (id)
            *id = 0;
        return BRK_CLOSED;
    }
    brk_status st = wait_impl(G, req, deadline_ms, fn, ctx, id);
    call_leave(G);
    return st;
}

static bool wait_cancel_impl(brk_groups *G, uint64_t id)
{
    if (!G || id == 0)
        return false;
    pthread_mutex_lock(&G->wmu);
    for (;;) {
        waiter **pp = id_slot(G, id);
        waiter *w = *pp;
        if (!w) {
            pthread_mutex_unlock(&G->wmu);
            return false;
        }
        if (w->state == W_WAITING) {
            topic_unlink(G, w);
            *pp = w->inext;
            G->nwaiters--;
            pthread_mutex_unlock(&G->wmu);
            free(w);
            return true;
        }
        pthread_cond_wait(&G->wdone, &G->wmu);   /* its callback runs */
    }
}

bool brk_group_wait_cancel(brk_groups *G, uint64_t id)
{
    if (!G || id == 0)
        return false;
    (void)call_enter(G, true);
    bool done = wait_cancel_impl(G, id);
    call_leave(G);
    return done;
}

typedef struct rw_sync {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool fired;
} rw_sync;

static void rw_wake(void *ctx)
{
    rw_sync *s = ctx;
    pthread_mutex_lock(&s->mu);
    s->fired = true;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

static int64_t mono_ms_real(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static struct timespec mono_ts(int64_t ms)
{
    struct timespec ts = { (time_t)(ms / 1000), (long)(ms % 1000) * 1000000L };
    return ts;
}

static brk_status receive_wait_impl(brk_groups *G, const brk_receive_req *req,
                                    uint32_t wait_ms, brk_receive_batch **out)
{
    if (!out)
        return BRK_INVAL;
    *out = NULL;
    if (!G || wait_ms > BRK_WAIT_MAX_MS)
        return BRK_INVAL;
    int64_t deadline = now_ms(G) + wait_ms;
    /* The store clock decides the deadline; the real one bounds the sleep
     * too, so a test clock that stands still cannot hang a caller. */
    int64_t real_end = mono_ms_real() + wait_ms;
    for (;;) {
        brk_status st = receive_impl(G, req, out);
        if (st == BRK_OK && (*out)->count > 0)
            return BRK_OK;
        if (st != BRK_OK && st != BRK_LIMIT)
            return st;
        if (now_ms(G) >= deadline || mono_ms_real() >= real_end)
            return st;
        brk_receive_batch_free(*out);
        *out = NULL;
        rw_sync sy;
        pthread_mutex_init(&sy.mu, NULL);
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&sy.cv, &ca);
        pthread_condattr_destroy(&ca);
        sy.fired = false;
        uint64_t wid = 0;
        st = wait_impl(G, req, deadline, rw_wake, &sy, &wid);
        if (st == BRK_OK) {
            struct timespec ts = mono_ts(real_end);
            pthread_mutex_lock(&sy.mu);
            while (!sy.fired)
                if (pthread_cond_timedwait(&sy.cv, &sy.mu, &ts) == ETIMEDOUT)
                    break;
            pthread_mutex_unlock(&sy.mu);
            (void)wait_cancel_impl(G, wid);   /* waits for a running one */
        }
        pthread_cond_destroy(&sy.cv);
        pthread_mutex_destroy(&sy.mu);
        if (st != BRK_OK)
            return st;
        if (is_closing(G))              /* close woke us: do not retry */
            return BRK_CLOSED;
    }
}

brk_status brk_group_receive_wait(brk_groups *G, const brk_receive_req *req,
                                  uint32_t wait_ms, brk_receive_batch **out)
{
    if (!G)
        return receive_wait_impl(G, req, wait_ms, out);
    if (!call_enter(G, false)) {
        if (out)
            *out = NULL;
        return BRK_CLOSED;
    }
    brk_status st = receive_wait_impl(G, req, wait_ms, out);
    call_leave(G);
    return st;
}

/* ---- public API: settling --------------------------------------------------------- */

typedef struct rcpt {
    char epoch[17];
    uint32_t k, midx;
    bool retry;
    uint16_t queue;
    uint64_t off, gen;
} rcpt;

/* Parse a decimal field ending at '.' or NUL; false when malformed. */
static bool parse_dec(const char **pp, uint64_t max, uint64_t *out)
{
    const char *p = *pp;
    uint64_t v = 0;
    size_t n = 0;
    while (*p >= '0' && *p <= '9') {
        uint64_t d = (uint64_t)(*p - '0');
        if (v > (max - d) / 10)
            return false;
        v = v * 10 + d;
        p++;
        n++;
    }
    if (n == 0 || n > 20)
        return false;
    *out = v;
    *pp = p;
    return true;
}

static bool parse_receipt(const char *s, rcpt *r)
{
    if (!s || strnlen(s, BRK_RECEIPT_MAX + 1) > BRK_RECEIPT_MAX)
        return false;
    for (int i = 0; i < 16; i++) {
        char c = s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return false;
        r->epoch[i] = c;
    }
    r->epoch[16] = 0;
    const char *p = s + 16;
    uint64_t v;
    if (*p++ != '.' || !parse_dec(&p, UINT32_MAX, &v))
        return false;
    r->k = (uint32_t)v;
    if (*p++ != '.' || !parse_dec(&p, UINT32_MAX, &v))
        return false;
    r->midx = (uint32_t)v;
    if (*p++ != '.' || (*p != 'm' && *p != 'r'))
        return false;
    r->retry = *p++ == 'r';
    if (*p++ != '.' || !parse_dec(&p, UINT16_MAX, &v))
        return false;
    r->queue = (uint16_t)v;
    if (*p++ != '.' || !parse_dec(&p, UINT64_MAX, &r->off))
        return false;
    if (*p++ != '.' || !parse_dec(&p, UINT64_MAX, &r->gen))
        return false;
    return *p == 0;
}

/* Find the delivery a receipt names; BRK_CONFLICT when it is not in flight
 * under that receipt any more.  g->mu held. */
static brk_status locate(group *g, const rcpt *r, member **mp, floc *l,
                         qstate **qp, uint32_t *ip)
{
    if (r->midx >= g->nmembers || r->k >= g->nsubs)
        return BRK_CONFLICT;
    member *m = g->members[r->midx];
    if (r->k >= m->nss)
        return BRK_CONFLICT;
    substate *ss = &m->ss[r->k];
    l->k = r->k;
    l->retry = r->retry;
    l->off = r->off;
    if (r->retry) {
        if (r->queue < r->k * LEVELS || r->queue - r->k * LEVELS >= ss->nrq)
            return BRK_CONFLICT;
        l->i = r->queue - r->k * LEVELS;
    } else {
        if (r->queue >= ss->nmq)
            return BRK_CONFLICT;
        l->i = r->queue;
    }
    bool retry;
    uint16_t queue;
    qstate *q = loc_q(m, l, &retry, &queue);
    int64_t i = q ? flight_find(q, r->off) : -1;
    if (i < 0 || q->fl[i].gen != r->gen || q->fl[i].state != FL_OUT)
        return BRK_CONFLICT;
    *mp = m;
    *qp = q;
    *ip = (uint32_t)i;
    return BRK_OK;
}

/* Common front of ack/nack/change_invisibility: on BRK_OK g->mu is held. */
static brk_status settle_begin(brk_groups *G, const char *group_name,
                               const char *receipt, group **gp, rcpt *r)
{
    if (!G || !group_name || !receipt)
        return BRK_INVAL;
    if (!group_name_ok(group_name) || !parse_receipt(receipt, r))
        return BRK_INVAL;
    group *g = find_group(G, group_name);
    if (!g)
        return BRK_NOTFOUND;
    if (strcmp(r->epoch, G->epoch) != 0)
        return BRK_CONFLICT;
    pthread_mutex_lock(&g->mu);
    *gp = g;
    return BRK_OK;
}

/* Whether m's waiters may be held back by the in-flight bounds: the same
 * room() test a receive applies (for the smallest message), or a receive
 * or has_work that found the next message too big. */
static bool at_bound(const group *g, const member *m)
{
    return m->blocked || !room(g, m, 1);
}

/* After a settle of a delivery of m's subscription k (g->mu held): the
 * waiters to wake.  A member that was at its bound may now have room for
 * every one of its subscriptions, not only k; a FIFO settle unblocks k's
 * queue. */
static void wake_after(brk_groups *G, group *g, member *m, uint32_t k,
                       bool was_bound, wake_list *wl)
{
    int64_t now = now_ms(G);
    if (was_bound) {
        m->blocked = false;         /* has_work sets it again if still so */
        for (uint32_t j = 0; j < g->nsubs; j++)
            if (has_work(G, g, m, j, now)
                && !wake_add(wl, g->subs[j].topic, m->name))
                return;
    } else if (g->cfg.fifo && has_work(G, g, m, k, now)) {
        (void)wake_add(wl, g->subs[k].topic, m->name);
    }
}

static brk_status ack_impl(brk_groups *G, const char *group_name,
                           const char *receipt)
{
    group *g;
    rcpt r;
    brk_status st = settle_begin(G, group_name, receipt, &g, &r);
    if (st != BRK_OK)
        return st;
    member *m;
    floc l;
    qstate *q;
    uint32_t i;
    st = locate(g, &r, &m, &l, &q, &i);
    bool pae = false, bc = g->cfg.broadcast;
    uint64_t target = 0;
    wake_list wl = { 0 };
    if (st == BRK_OK) {
        bool was = at_bound(g, m);
        settle_flight(m, q, i);
        mark_dirty(G);
        target = atomic_load(&G->dirty_seq);
        wake_after(G, g, m, l.k, was, &wl);
        pae = g->cfg.persist_every_ack;
    }
    pthread_mutex_unlock(&g->mu);
    if (st == BRK_OK && pae)
        st = save_covering(G, target);
    wake_run(G, &wl, g->name, bc);
    return st;
}

brk_status brk_group_ack(brk_groups *G, const char *group_name,
                         const char *receipt)
{
    if (!G)
        return ack_impl(G, group_name, receipt);
    if (!call_enter(G, false))
        return BRK_CLOSED;
    brk_status st = ack_impl(G, group_name, receipt);
    call_leave(G);
    return st;
}

static brk_status nack_impl(brk_groups *G, const char *group_name,
                            const char *receipt, uint32_t delay_ms,
                            const char *reason)
{
    if (reason && strnlen(reason, REASON_MAX + 1) > REASON_MAX)
        return BRK_INVAL;
    group *g;
    rcpt r;
    defer_begin();
    brk_status st = settle_begin(G, group_name, receipt, &g, &r);
    if (st != BRK_OK) {
        defer_end(G);
        return st;
    }
    member *m;
    floc l;
    qstate *q;
    uint32_t i;
    st = locate(g, &r, &m, &l, &q, &i);
    bool pae = false, bc = g->cfg.broadcast;
    uint64_t target = 0;
    wake_list wl = { 0 };
    if (st == BRK_OK) {
        bool was = at_bound(g, m), settle = false;
        brk_bytes rs = { reason ? reason : "", reason ? strlen(reason) : 0 };
        st = fail_one(G, g, m, &l, delay_ms, rs, false, false, now_ms(G),
                      &settle);
        if (st == BRK_OK && settle)
            settle_loc(G, g, m, &l);
        if (st == BRK_OK) {
            mark_dirty(G);
            target = atomic_load(&G->dirty_seq);
            wake_after(G, g, m, l.k, was, &wl);
            pae = g->cfg.persist_every_ack;
        }
    }
    pthread_mutex_unlock(&g->mu);
    defer_end(G);
    if (st == BRK_OK && pae)
        st = save_covering(G, target);
    wake_run(G, &wl, g->name, bc);
    return st;
}

brk_status brk_group_nack(brk_groups *G, const char *group_name,
                          const char *receipt, uint32_t delay_ms,
                          const char *reason)
{
    if (!G)
        return nack_impl(G, group_name, receipt, delay_ms, reason);
    if (!call_enter(G, false))
        return BRK_CLOSED;
    brk_status st = nack_impl(G, group_name, receipt, delay_ms, reason);
    call_leave(G);
    return st;
}

static brk_status change_invisibility_impl(brk_groups *G,
                                           const char *group_name,
                                           const char *receipt,
                                           uint32_t invisible_ms)
{
    if (invisible_ms > INVISIBLE_MAX_MS)
        return BRK_INVAL;
    group *g;
    rcpt r;
    brk_status st = settle_begin(G, group_name, receipt, &g, &r);
    if (st != BRK_OK)
        return st;
    member *m;
    floc l;
    qstate *q;
    uint32_t i;
    st = locate(g, &r, &m, &l, &q, &i);
    if (st == BRK_OK) {
        q->fl[i].visible_at = now_ms(G) + invisible_ms;
        note_vis(m, q->fl[i].visible_at);
        arm(G, g, q->fl[i].visible_at);
    }
    pthread_mutex_unlock(&g->mu);
    return st;
}

brk_status brk_group_change_invisibility(brk_groups *G, const char *group_name,
                                         const char *receipt,
                                         uint32_t invisible_ms)
{
    if (!G)
        return change_invisibility_impl(G, group_name, receipt, invisible_ms);
    if (!call_enter(G, false))
        return BRK_CLOSED;
    brk_status st = change_invisibility_impl(G, group_name, receipt, invisible_ms);
    call_leave(G);
    return st;
}

/* ---- public API: configuration ---------------------------------------------------- */

static brk_status put_impl(brk_groups *G, const char *name, const char *topic,
                           const char *filter_text,
                           const brk_group_config *cfg, bool *created)
{
    if (created)
        *created = false;
    if (!G || !group_name_ok(name) || !topic_ok(topic))
        return BRK_INVAL;
    if (cfg && !config_ok(cfg))
        return BRK_INVAL;
    filter f;
    brk_status st = filter_parse(filter_text, &f);
    if (st != BRK_OK)
        return st;
    brk_topic_info ti;
    st = brk_topic_get(G->s, topic, &ti);
    if (st == BRK_NOTFOUND && !brk_store_auto_create(G->s)) {
        filter_free(&f);
        return BRK_NOTFOUND;
    }
    if (st != BRK_OK && st != BRK_NOTFOUND) {
        filter_free(&f);
        return st;
    }
    bool made = false;
    pthread_mutex_lock(&G->reg_mu);
    group *g = find_group_locked(G, name);
    st = BRK_OK;
    if (!g) {
        uint32_t k;
        if ((st = group_new(name, cfg, &g)) == BRK_OK
            && (st = sub_add(g, topic, &f, &k)) == BRK_OK)
            st = group_publish_locked(G, g);
        if (st != BRK_OK) {
            group_free(NULL, g);
            g = NULL;
        } else {
            made = true;
        }
    }
    pthread_mutex_unlock(&G->reg_mu);
    if (st == BRK_OK && !made) {
        pthread_mutex_lock(&g->mu);
        if (cfg && (cfg->fifo != g->cfg.fifo
                    || cfg->broadcast != g->cfg.broadcast)) {
            if (g->progress) {
                st = BRK_CONFLICT;
            } else if (cfg->broadcast != g->cfg.broadcast) {
                /* No progress: no broadcast member exists; rebuild. */
                for (uint32_t i = 0; i < g->nmembers; i++)
                    member_free(G, g->members[i]);
                g->nmembers = 0;
                if (!cfg->broadcast) {
                    member *m = member_new(g, "", 0);
                    if (!m || members_push(g, m) != BRK_OK) {
                        free(m);
                        st = BRK_NOMEM;
                    }
                }
            }
        }
        if (st == BRK_OK && cfg)
            g->cfg = *cfg;
        if (st == BRK_OK) {
            int64_t k = sub_find(g, topic);
            if (k >= 0) {
                filter_free(&g->subs[k].f);
                g->subs[k].f = f;
                memset(&f, 0, sizeof f);
            } else {
                uint32_t kk;
                st = sub_add(g, topic, &f, &kk);
            }
        }
        pthread_mutex_unlock(&g->mu);
    }
    filter_free(&f);
    if (st != BRK_OK)
        return st;
    mark_dirty(G);
    st = save_state(G, true);
    if (st == BRK_OK && created)
        *created = made;
    return st;
}

brk_status brk_group_put(brk_groups *G, const char *name, const char *topic,
                         const char *filter_text, const brk_group_config *cfg,
                         bool *created)
{
    if (!G)
        return put_impl(G, name, topic, filter_text, cfg, created);
    if (!call_enter(G, false)) {
        if (created)
            *created = false;
        return BRK_CLOSED;
    }
    brk_status st = put_impl(G, name, topic, filter_text, cfg, created);
    call_leave(G);
    return st;
}

/* ---- public API: dead letters ----------------------------------------------------- */

static brk_status empty_batch(uint64_t from, brk_batch **out)
{
    brk_batch *b = calloc(1, sizeof *b);
    if (!b)
        return BRK_NOMEM;
    b->first_offset = b->next_offset = from;
    *out = b;
    return BRK_OK;
}

static brk_status dead_letters_impl(brk_groups *G, const char *group_name,
                                    uint64_t from, size_t max,
                                    brk_batch **out)
{
    if (!out)
        return BRK_INVAL;
    *out = NULL;
    if (!G || !group_name_ok(group_name))
        return BRK_INVAL;
    group *g = find_group(G, group_name);
    if (!g)
        return BRK_NOTFOUND;
    if (max == 0)
        return empty_batch(from, out);
    if (max > 1000)
        max = 1000;
    brk_status st = brk_store_read(G->s, g->dlq_topic, 0, from, max, out);
    if (st == BRK_NOTFOUND || st == BRK_RANGE)
        return empty_batch(from, out);
    return st;
}

brk_status brk_group_dead_letters(brk_groups *G, const char *group_name,
                                  uint64_t from, size_t max, brk_batch **out)
{
    if (!G)
        return dead_letters_impl(G, group_name, from, max, out);
    if (!call_enter(G, false)) {
        if (out)
            *out = NULL;
        return BRK_CLOSED;
    }
    brk_status st = dead_letters_impl(G, group_name, from, max, out);
    call_leave(G);
    return st;
}

static brk_status replay_impl(brk_groups *G, const char *group_name,
                              size_t max, size_t *replayed)
{
    if (replayed)
        *replayed = 0;
    if (!G || !group_name_ok(group_name))
        return BRK_INVAL;
    group *g = find_group(G, group_name);
    if (!g)
        return BRK_NOTFOUND;
    if (max == 0)
        return BRK_OK;
    if (max > 1000)
        max = 1000;
    pthread_mutex_lock(&g->replay_mu);
    pthread_mutex_lock(&g->mu);
    uint64_t from = g->dlq_replay;
    pthread_mutex_unlock(&g->mu);
    brk_batch *b = NULL;
    brk_status st = brk_store_read(G->s, g->dlq_topic, 0, from, max, &b);
    if (st == BRK_NOTFOUND || st == BRK_RANGE) {
        pthread_mutex_unlock(&g->replay_mu);
        return BRK_OK;
    }
    size_t done = 0;
    for (size_t i = 0; st == BRK_OK && i < b->count; i++) {
        const brk_record *rec = &b->recs[i];
        brk_bytes v;
        char topic[BRK_TOPIC_MAX + 1];
        bool ok = brk_props_get(rec->props, DLQ_PREFIX "topic", &v) == BRK_OK
                  && v.len > 0 && v.len <= BRK_TOPIC_MAX;
        if (ok) {
            memcpy(topic, v.ptr, v.len);
            topic[v.len] = 0;
            ok = topic_ok(topic);
        }
        if (ok) {
            uint8_t *props = NULL;
            size_t plen = 0;
            st = props_build(rec->props, NULL, 0, true, &props, &plen);
            if (st != BRK_OK)
                break;
            brk_append_req q;
            req_from(&q, rec);
            q.topic = topic;
            q.queue = -1;
            q.props = (brk_bytes){ props, plen };
            brk_append_res ar;
            st = brk_store_append(G->s, &q, &ar);
            free(props);
            if (st != BRK_OK)
                break;
            done++;
        }
        /* A dead letter without a valid origin is passed over. */
        pthread_mutex_lock(&g->mu);
        g->dlq_replay = rec->queue_offset + 1;
        pthread_mutex_unlock(&g->mu);
        mark_dirty(G);
    }
    brk_batch_free(b);
    pthread_mutex_unlock(&g->replay_mu);
    brk_status s2 = save_state(G, false);
    if (st == BRK_OK)
        st = s2;
    if (replayed)
        *replayed = done;
    return st;
}

brk_status brk_group_replay_dead_letters(brk_groups *G, const char *group_name,
                                         size_t max, size_t *replayed)
{
    if (!G)
        return replay_impl(G, group_name, max, replayed);
    if (!call_enter(G, false)) {
        if (replayed)
            *replayed = 0;
        return BRK_CLOSED;
    }
    brk_status st = replay_impl(G, group_name, max, replayed);
    call_leave(G);
    return st;
}

/* ---- public API: lag -------------------------------------------------------------- */

static int64_t store_ms_at(brk_groups *G, const char *topic, uint16_t queue,
                           uint64_t off)
{
    brk_cq_entry e;
    size_t n = 0;
    uint64_t first;
    if (brk_store_read_entries(G->s, topic, queue, off, &e, 1, &n, &first)
            != BRK_OK || n == 0)
        return 0;
    brk_batch *b = NULL;
    int64_t ms = 0;
    if (brk_store_read_at(G->s, e.log_offset, &b) == BRK_OK && b->count == 1)
        ms = b->recs[0].store_ms;
    brk_batch_free(b);
    return ms;
}

static brk_status lag_impl(brk_groups *G, const char *group_name,
                           brk_group_lag_row **rows, size_t *count)
{
    if (!rows || !count)
        return BRK_INVAL;
    *rows = NULL;
    *count = 0;
    if (!G || !group_name_ok(group_name))
        return BRK_INVAL;
    group *g = find_group(G, group_name);
    if (!g)
        return BRK_NOTFOUND;
    uint64_t dl = 0, mn = 0, mx = 0;
    if (brk_store_queue_range(G->s, g->dlq_topic, 0, &mn, &mx) == BRK_OK)
        dl = mx - mn;
    brk_group_lag_row *v = NULL;
    size_t n = 0, cap = 0;
    brk_status st = BRK_OK;
    pthread_mutex_lock(&g->mu);
    for (uint32_t mi = 0; mi < g->nmembers && st == BRK_OK; mi++) {
        member *m = g->members[mi];
        for (uint32_t k = 0; k < g->nsubs && st == BRK_OK; k++) {
            substate *ss;
            if ((st = ss_ensure(G, g, m, k, &ss)) != BRK_OK)
                break;
            size_t need = n + ss->nmq + 1;
            if (need > cap) {
                size_t nc = cap ? cap * 2 : 16;
                while (nc < need)
                    nc *= 2;
                brk_group_lag_row *nv = realloc(v, nc * sizeof *nv);
                if (!nv) {
                    st = BRK_NOMEM;
                    break;
                }
                v = nv;
                cap = nc;
            }
            brk_group_lag_row tot;
            memset(&tot, 0, sizeof tot);
            snprintf(tot.topic, sizeof tot.topic, "%s", g->subs[k].topic);
            snprintf(tot.member, sizeof tot.member, "%s", m->name);
            tot.queue = -1;
            tot.dead_letters = dl;
            for (uint32_t i = 0; i < ss->nmq; i++) {
                qstate *q = &ss->mq[i];
                brk_group_lag_row *r = &v[n++];
                memset(r, 0, sizeof *r);
                snprintf(r->topic, sizeof r->topic, "%s", g->subs[k].topic);
                snprintf(r->member, sizeof r->member, "%s", m->name);
                r->queue = (int32_t)i;
                uint64_t qmn = 0, qmx = 0;
                (void)brk_store_queue_range(G->s, g->subs[k].topic,
                                            (uint16_t)i, &qmn, &qmx);
                uint64_t c = q->committed > qmx ? qmx : q->committed;
                r->max_offset = qmx;
                r->committed_offset = c;
                r->lag = qmx - c;
                r->inflight = q->nfl;
                if (c < qmx)
                    r->oldest_unacked_ms = store_ms_at(G, g->subs[k].topic,
                                                       (uint16_t)i, c);
                tot.max_offset += r->max_offset;
                tot.committed_offset += r->committed_offset;
                tot.lag += r->lag;
                tot.inflight += r->inflight;
                if (r->oldest_unacked_ms
                    && (!tot.oldest_unacked_ms
                        || r->oldest_unacked_ms < tot.oldest_unacked_ms))
                    tot.oldest_unacked_ms = r->oldest_unacked_ms;
            }
            /* Messages waiting in the retry queues are not acked either:
             * the totals row counts them as lag (committed = max - lag). */
            for (uint32_t i = 0; i < ss->nrq; i++) {
                qstate *q = &ss->rq[i];
                uint64_t rmn = 0, rmx = 0;
                tot.inflight += q->nfl;
                if (brk_store_queue_range(G->s, m->retry_topic,
                                          (uint16_t)(k * LEVELS + i), &rmn,
                                          &rmx) == BRK_OK
                    && rmx > q->committed) {
                    uint64_t back = rmx - q->committed;
                    tot.lag += back;
                    tot.committed_offset = tot.committed_offset > back
                                               ? tot.committed_offset - back
                                               : 0;
                }
            }
            v[n++] = tot;
        }
    }
    pthread_mutex_unlock(&g->mu);
    if (st != BRK_OK) {
        free(v);
        return st;
    }
    *rows = v;
    *count = n;
    return BRK_OK;
}

brk_status brk_group_lag(brk_groups *G, const char *group_name,
                         brk_group_lag_row **rows, size_t *count)
{
    if (!G)
        return lag_impl(G, group_name, rows, count);
    if (!call_enter(G, false))
        return BRK_CLOSED;
    brk_status st = lag_impl(G, group_name, rows, count);
    call_leave(G);
    return st;
}

/* ---- tick, background thread, open and close -------------------------------------- */

static group *group_at(brk_groups *G, uint64_t idx)
{
    pthread_mutex_lock(&G->reg_mu);
    group *g = idx < G->ngroups ? G->groups[idx] : NULL;
    pthread_mutex_unlock(&G->reg_mu);
    return g;
}

static brk_status tick_once(brk_groups *G)
{
    int64_t now = now_ms(G);
    brk_status st = BRK_OK;

    /* Group timers that are due. */
    uint64_t *due = NULL;
    size_t nd = 0, cd = 0;
    pthread_mutex_lock(&G->wmu);
    brk_timer t;
    while (brk_timerheap_peek(&G->gheap, &t) && t.due_ms <= now) {
        brk_timerheap_pop(&G->gheap, &t);
        if (t.ref >= G->narmed)
            continue;
        if (G->armed[t.ref] == t.due_ms || G->armed[t.ref] <= now)
            G->armed[t.ref] = INT64_MAX;
        bool seen = false;
        for (size_t i = 0; i < nd; i++)
            seen |= due[i] == t.ref;
        if (seen)
            continue;
        if (nd == cd) {
            size_t nc = cd ? cd * 2 : 8;
            uint64_t *n2 = realloc(due, nc * sizeof *n2);
            if (!n2) {
                /* Keep it for the next round. */
                (void)brk_timerheap_push(&G->gheap, t.due_ms, t.ref);
                G->armed[t.ref] = t.due_ms;
                break;
            }
            due = n2;
            cd = nc;
        }
        due[nd++] = t.ref;
    }
    pthread_mutex_unlock(&G->wmu);
    for (size_t i = 0; i < nd; i++) {
        group *g = group_at(G, due[i]);
        if (!g)
            continue;
        brk_status s1 = process_group(G, g, now);
        if (s1 != BRK_OK && st == BRK_OK)
            st = s1;
    }
    free(due);

    /* Waiter deadlines. */
    waiter *list = NULL;
    pthread_mutex_lock(&G->wmu);
    while (brk_timerheap_peek(&G->wheap, &t) && t.due_ms <= now) {
        brk_timerheap_pop(&G->wheap, &t);
        waiter *w = *id_slot(G, t.ref);
        if (w && w->state == W_WAITING)
            w_take(G, w, &list);
    }
    pthread_mutex_unlock(&G->wmu);
    w_fire(G, list);

    /* Persistence. */
    if (atomic_load(&G->dirty_seq) != atomic_load(&G->saved_seq)
        && now >= atomic_load(&G->next_persist)) {
        brk_status s2 = save_state(G, false);
        if (s2 != BRK_OK && st == BRK_OK)
            st = s2;
    }
    return st;
}

brk_status brk_groups_tick(brk_groups *G)
{
    if (!G)
        return BRK_INVAL;
    if (!call_enter(G, false))
        return BRK_CLOSED;
    brk_status st = tick_once(G);
    call_leave(G);
    return st;
}

static void *bg_main(void *arg)
{
    brk_groups *G = arg;
    pthread_mutex_lock(&G->wmu);
    while (!G->stop) {
        pthread_mutex_unlock(&G->wmu);
        (void)tick_once(G);               /* failures come back as retries */
        pthread_mutex_lock(&G->wmu);
        if (G->stop)
            break;
        int64_t now = now_ms(G);
        int64_t next = INT64_MAX;
        brk_timer t;
        if (brk_timerheap_peek(&G->gheap, &t) && t.due_ms < next)
            next = t.due_ms;
        if (brk_timerheap_peek(&G->wheap, &t) && t.due_ms < next)
            next = t.due_ms;
        if (atomic_load(&G->dirty_seq) != atomic_load(&G->saved_seq)) {
            int64_t p = atomic_load(&G->next_persist);
            if (p < next)
                next = p;
        }
        if (next <= now)
            continue;
        if (!G->sys_clock && next - now > SLEEP_MAX_MS)
            next = now + SLEEP_MAX_MS;   /* a test clock moves silently */
        G->wake_at = next;
        if (next == INT64_MAX) {
            pthread_cond_wait(&G->cond, &G->wmu);
        } else {
            /* The due decision is the store clock's; this monotonic wait
             * only paces the thread. */
            struct timespec ts = mono_ts(mono_ms_real() + (next - now));
            pthread_cond_timedwait(&G->cond, &G->wmu, &ts);
        }
        G->wake_at = INT64_MIN;
    }
    pthread_mutex_unlock(&G->wmu);
    return NULL;
}

static void groups_free(brk_groups *G)
{
    for (uint32_t i = 0; i < G->ngroups; i++)
        group_free(NULL, G->groups[i]);  /* cursors stay: see member_free */
    free(G->groups);
    for (size_t i = 0; i < G->nrnames; i++)
        free(G->rnames[i]);
    free(G->rnames);
    for (size_t b = 0; b < WBUCKETS; b++) {
        waiter *w = G->ib[b];
        while (w) {
            waiter *nx = w->inext;
            free(w);
            w = nx;
        }
    }
    brk_timerheap_free(&G->wheap);
    brk_timerheap_free(&G->gheap);
    free(G->armed);
    free(G->pend);
    pthread_cond_destroy(&G->cond);
    pthread_cond_destroy(&G->wdone);
    pthread_cond_destroy(&G->idle);
    pthread_mutex_destroy(&G->wmu);
    pthread_mutex_destroy(&G->reg_mu);
    pthread_mutex_destroy(&G->save_mu);
    free(G);
}

brk_status brk_groups_open(brk_groups **out, brk_store *s,
                           const brk_groups_opts *opts, char *errbuf,
                           size_t errlen)
{
    if (!out)
        return BRK_INVAL;
    *out = NULL;
    if (!s) {
        set_err(errbuf, errlen, "no store");
        return BRK_INVAL;
    }
    brk_groups_opts o;
    brk_groups_opts_init(&o);
    if (opts) {
        o = *opts;
        if (o.persist_interval_ms == 0)
            o.persist_interval_ms = 1000;
        if (o.default_invisible_ms == 0)
            o.default_invisible_ms = 30000;
        if (o.default_invisible_ms > INVISIBLE_MAX_MS) {
            set_err(errbuf, errlen, "default_invisible_ms over 12 h");
            return BRK_INVAL;
        }
    }
    brk_groups *G = calloc(1, sizeof *G);
    if (!G) {
        set_err(errbuf, errlen, "out of memory");
        return BRK_NOMEM;
    }
    G->s = s;
    G->clock = brk_store_clock(s);
    G->o = o;
    G->sync_mode = brk_store_flush_mode(s) == BRK_FLUSH_SYNC;
    G->sys_clock = G->clock == brk_clock_system();
    G->wake_at = INT64_MIN;
    uint64_t ep = 0;
    if (getrandom(&ep, sizeof ep, 0) != (ssize_t)sizeof ep)
        ep = (uint64_t)G->clock->mono_ns(G->clock->ctx)
             ^ ((uint64_t)(uintptr_t)G << 17) ^ 0x9E3779B97F4A7C15ull;
    snprintf(G->epoch, sizeof G->epoch, "%016" PRIx64, ep);
    pthread_mutex_init(&G->save_mu, NULL);
    pthread_mutex_init(&G->reg_mu, NULL);
    pthread_mutex_init(&G->wmu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&G->cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_cond_init(&G->wdone, NULL);
    pthread_cond_init(&G->idle, NULL);
    brk_timerheap_init(&G->wheap);
    brk_timerheap_init(&G->gheap);
    atomic_init(&G->listener_active, 0);
    atomic_init(&G->saved_seq, 0);
    atomic_init(&G->dirty_seq, 0);
    atomic_init(&G->next_persist, now_ms(G) + o.persist_interval_ms);
    brk_store_stats ss;
    brk_store_get_stats(s, &ss);
    G->durable_seen = ss.durable_offset;

    brk_status st = load_state(G, errbuf, errlen);
    if (st != BRK_OK) {
        groups_free(G);
        return st;
    }
    /* Register every cursor and place it before the first retention run,
     * and let the first tick look at every group (retry heads). */
    int64_t now = now_ms(G);
    for (uint32_t i = 0; i < G->ngroups; i++) {
        group *g = G->groups[i];
        pthread_mutex_lock(&g->mu);
        for (uint32_t mi = 0; mi < g->nmembers; mi++)
            for (uint32_t k = 0; k < g->nsubs; k++) {
                substate *sp;
                (void)ss_ensure(G, g, g->members[mi], k, &sp);
            }
        pthread_mutex_unlock(&g->mu);
        arm(G, g, now);
    }
    (void)save_state_ex(G, true, false);
    G->listener.appended = on_appended;
    G->listener.durable = on_durable;
    G->listener.ctx = G;
    brk_store_set_listener(s, &G->listener);
    if (!o.no_background) {
        int rc = pthread_create(&G->thr, NULL, bg_main, G);
        if (rc != 0) {
            brk_store_set_listener(s, NULL);
            set_err(errbuf, errlen, "starting the groups thread: %s",
                    strerror(rc));
            groups_free(G);
            return BRK_NOMEM;
        }
        G->has_thr = true;
    }
    *out = G;
    return BRK_OK;
}

brk_status brk_groups_close(brk_groups *G)
{
    if (!G)
        return BRK_OK;
    /* From here on public calls return BRK_CLOSED and no waiter registers
     * (the flag is checked under wmu by both). */
    pthread_mutex_lock(&G->wmu);
    G->closing = true;
    G->stop = true;
    pthread_cond_signal(&G->cond);
    pthread_mutex_unlock(&G->wmu);
    if (G->has_thr)
        pthread_join(G->thr, NULL);
    brk_store_set_listener(G->s, NULL);     /* waits for calls in flight */
    while (atomic_load(&G->listener_active) > 0)
        sched_yield();
    /* Every waiter's callback runs, as at a deadline: this also wakes the
     * brk_group_receive_wait callers, which then return. */
    waiter *list = NULL;
    pthread_mutex_lock(&G->wmu);
    for (size_t b = 0; b < WBUCKETS; b++)
        while (G->tb[b])
            w_take(G, G->tb[b], &list);
    pthread_mutex_unlock(&G->wmu);
    w_fire(G, list);
    /* The calls in progress finish (they may still settle, and fire the
     * waiters they took), then nothing uses the registry any more. */
    pthread_mutex_lock(&G->wmu);
    while (G->busy > 0)
        pthread_cond_wait(&G->idle, &G->wmu);
    while (G->nwaiters > 0)
        pthread_cond_wait(&G->wdone, &G->wmu);
    pthread_mutex_unlock(&G->wmu);
    brk_status st = save_state(G, true);
    groups_free(G);
    return st;
}
