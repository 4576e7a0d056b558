/*
 * test_group_crash.c - crash exploration of consumer-group progress.
 *
 * For many random workloads (produce, receive, ack, nack with and without
 * a delay, clock steps with ticks that time out invisibility, fire retries
 * and persist progress, retention runs, clean restarts) on a SYNC store on
 * the simulated disk with a fake clock, run the workload once to count its
 * mutating I/O operations, then run it again with the disk dying after k
 * operations, lose unsynced bytes (all of them, a random subset by sector,
 * or a torn last write), reopen the store and the groups, drain every group
 * (receive + ack until nothing comes, moving the clock past every retry),
 * and check, per group:
 *   - both open (a crash is never "corruption");
 *   - every durable append that the group had not acked before the
 *     crash is delivered at least once in the drain: nothing is lost,
 *     whatever was in flight, nacked or waiting for a retry.  An ack that
 *     returned OK is acked; one that failed on I/O (the disk died under
 *     its save) may or may not have taken effect, so its message is
 *     neither required nor forbidden after the crash (it counts in the
 *     duplicate bound);
 *   - the duplicates are bounded by the last persist: a message whose ack
 *     returned OK and was persisted before the crash is not delivered
 *     again.  "Persisted" as the model knows it: with persist_every_ack at
 *     once (the ack returned OK); otherwise by a successful tick at least
 *     persist_interval_ms after the ack, or by a clean close - in both cases
 *     only while the disk was still alive afterwards;
 *   - every delivered message is one the workload appended;
 *   - after the drain and a clean restart, nothing is delivered again.
 * Store modes: one workload in three (by a hash of its seed, so a replay
 * of a seed uses the same mode) runs on an ASYNC store, where an append
 * that returned OK is only in the page cache.  There an append counts as
 * durable once a durable point covers it: the model reads
 * brk_store_get_stats() after every operation, and only while the sim is
 * still alive (after the crash point the store's own figures are no longer
 * evidence), keeping the highest durable_offset seen; an append is durable
 * when the log end right after it (its record's end: the workload appends
 * from one thread, nothing else appends in between) is at or below that
 * offset, or when a clean store close returned OK with the sim alive.
 * Durable points: the module's saves (each flushes the log before it
 * writes state.groups), the store's tick, clean restarts and an OP_FLUSH
 * (brk_store_flush) that only ASYNC workloads contain.  In SYNC mode every
 * append that returned OK is durable.  Every other check is the same in
 * both modes: acks are persisted by state.groups, which is written synced
 * (and after a log flush) in either mode, so "acked and persisted" means
 * the same thing; a non-durable append is neither required nor forbidden
 * after the crash (it may or may not have reached the disk).
 * Groups: "gi" (clustering, persisted every persist_interval_ms), "ge"
 * (clustering, persist_every_ack) and "gf" (FIFO, persist_every_ack), all
 * on one topic with two queues.
 *
 * Size: BRK_GROUP_CRASH_STATES crash states in all (default 80000, about
 * 25 s in Release; 8000 in sanitizer builds).  BRK_GROUP_CRASH_SEED picks the first
 * workload seed.  Replay one failing state exactly with
 * BRK_GROUP_CRASH_SEED=<workload seed> BRK_GROUP_CRASH_POINT=<crash point>;
 * the crash mode and any second crash during recovery derive from those
 * two.  A failure prints the store mode (SYNC or ASYNC, which the seed
 * decides) and "mode m" (0 DROP_ALL, 1 KEEP_RANDOM, 2 TORN_LAST) or, with
 * a second crash during recovery, "mode 10*m1 + m2".  Setting
 * BRK_GROUP_CRASH_TRACE as well prints every operation, status, delivery
 * and receipt of the replayed state.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker/group.h"
#include "broker/store.h"
#include "crash_util.h"
#include "fake_clock.h"
#include "io_sim.h"

#define DIR       "/grpcrash"
#define TOPIC     "t"
#define MAX_OPS   60
#define MAX_MSGS  (3 * MAX_OPS)
#define MAX_HELD  64
#define NGROUPS   3
#define PERSIST_MS 200
#define T0        1700000000000LL

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define DEFAULT_STATES 8000
#else
#define DEFAULT_STATES 80000
#endif

static const char *const GROUPS[NGROUPS] = { "gi", "ge", "gf" };
static const bool EVERY_ACK[NGROUPS] = { false, true, true };
static const bool FIFO[NGROUPS] = { false, false, true };

enum { OP_PRODUCE, OP_RECEIVE, OP_ACK, OP_NACK, OP_TICK, OP_RESTART,
       OP_RETENTION, OP_FLUSH };

typedef struct op {
    int kind;
    int group;
    unsigned n;             /* PRODUCE: messages; RECEIVE: max */
    unsigned pick;          /* ACK / NACK: which held receipt */
    uint32_t inv_ms;        /* RECEIVE */
    uint32_t delay_ms;      /* NACK */
    int64_t advance_ms;     /* TICK */
} op;

typedef struct workload {
    uint64_t seed;
    bool async;             /* ASYNC store (one workload in three) */
    size_t nops;
    op ops[MAX_OPS];
} workload;

static bool g_trace;            /* BRK_GROUP_CRASH_TRACE: print every step */

#define TRACE(...)                                                           \
    do {                                                                     \
        if (g_trace)                                                         \
            fprintf(stderr, __VA_ARGS__);                                    \
    } while (0)

static const char *mode_name(const workload *w)
{
    return w->async ? "ASYNC" : "SYNC";
}

static void make_workload(workload *w, uint64_t seed)
{
    uint64_t r = seed;
    memset(w, 0, sizeof *w);
    w->seed = seed;
    w->async = crash_seed_async(seed);
    w->nops = 25 + crash_rng_next(&r) % (MAX_OPS - 25);
    for (size_t i = 0; i < w->nops; i++) {
        op *o = &w->ops[i];
        unsigned d = (unsigned)(crash_rng_next(&r) % 100);
        o->group = (int)(crash_rng_next(&r) % NGROUPS);
        if (d < 15 || i == 0) {
            o->kind = OP_PRODUCE;
            o->n = 1 + (unsigned)(crash_rng_next(&r) % 3);
        } else if (d < 40) {
            o->kind = OP_RECEIVE;
            o->n = 1 + (unsigned)(crash_rng_next(&r) % 4);
            o->inv_ms = 300 + (uint32_t)(crash_rng_next(&r) % 1200);
        } else if (d < 68) {
            o->kind = OP_ACK;
            o->pick = (unsigned)crash_rng_next(&r);
        } else if (d < 75) {
            static const uint32_t delays[] = { 0, 0, 1000, 5000 };
            o->kind = OP_NACK;
            o->pick = (unsigned)crash_rng_next(&r);
            o->delay_ms = delays[crash_rng_next(&r) % 4];
        } else if (w->async && d < 79) {
            /* ASYNC workloads only (SYNC ones stay as they were): an
             * explicit durable point. */
            o->kind = OP_FLUSH;
        } else if (d < 93) {
            o->kind = OP_TICK;
            o->advance_ms = 50 + (int64_t)(crash_rng_next(&r) % 700);
        } else if (d < 96) {
            o->kind = OP_RESTART;
        } else {
            o->kind = OP_RETENTION;
        }
    }
}

static size_t msg_body(const workload *w, int idx, char *buf, size_t cap)
{
    uint64_t r = w->seed * 1000003u + (uint64_t)idx;
    size_t len = (size_t)snprintf(buf, cap, "m%03d|", idx);
    size_t pad = crash_rng_next(&r) % 4 == 0 ? crash_rng_next(&r) % 400 : crash_rng_next(&r) % 40;
    for (size_t k = 0; k < pad && len < cap - 1; k++)
        buf[len++] = (char)('a' + crash_rng_next(&r) % 26);
    buf[len] = '\0';
    return len;
}

static int msg_idx(brk_bytes body)
{
    int idx = -1;
    char tmp[8];
    if (body.len < 5 || body.len > 600)
        return -1;
    memcpy(tmp, body.ptr, 5);
    tmp[5] = '\0';
    if (sscanf(tmp, "m%03d|", &idx) != 1 || idx < 0 || idx >= MAX_MSGS)
        return -1;
    return idx;
}

typedef struct held {
    char receipt[BRK_RECEIPT_MAX + 1];
    int idx;
} held;

/* What the workload was told, per group and message. */
typedef struct gstate {
    bool acked[MAX_MSGS];       /* an ack returned OK */
    bool persisted[MAX_MSGS];   /* ... and the model knows it was persisted */
    int64_t acked_at[MAX_MSGS];
    held held[MAX_HELD];
    size_t nheld;
} gstate;

typedef struct run {
    brk_sim *sim;
    brk_fake_clock clk;
    brk_store_opts so;
    brk_groups_opts go;
    brk_store *s;
    brk_groups *g;
    const workload *w;
    int nmsgs;                  /* appends tried */
    bool appended[MAX_MSGS];    /* append returned OK */
    uint64_t end[MAX_MSGS];     /* log end right after that append */
    uint64_t durable_seen;      /* highest durable offset seen alive */
    gstate gs[NGROUPS];
    unsigned delivered[NGROUPS][MAX_MSGS];  /* in the verification drain */
    char err[256];
} run;

static int64_t clk_now(run *r)
{
    return r->clk.clock.now_ms(r->clk.clock.ctx);
}

static void run_init(run *r, const workload *w, uint64_t sim_seed)
{
    memset(r, 0, sizeof *r);
    r->w = w;
    if (brk_sim_open(&r->sim, sim_seed) != BRK_OK)
        fail_msg("sim open");
    brk_fake_clock_init(&r->clk, T0);
    brk_store_opts_init(&r->so);
    r->so.io = brk_sim_io(r->sim);
    r->so.clock = &r->clk.clock;
    r->so.no_background = true;
    r->so.flush_mode = w->async ? BRK_FLUSH_ASYNC : BRK_FLUSH_SYNC;
    r->so.segment_bytes = 4096;
    r->so.cq_entries_per_file = 16;
    r->so.retention_ms = 400;
    r->so.auto_create_topics = false;
    r->so.uuid_seed = 1;
    brk_groups_opts_init(&r->go);
    r->go.no_background = true;
    r->go.persist_interval_ms = PERSIST_MS;
    r->go.default_invisible_ms = 1000;
}

static void note_all_persisted(run *r);

/* Note the store's durable offset, only while the sim is alive: after the
 * crash point the store's figures are no evidence of what is on disk. */
static void note_durable(run *r)
{
    if (!r->s || brk_sim_is_dead(r->sim))
        return;
    brk_store_stats ss;
    brk_store_get_stats(r->s, &ss);
    if (ss.durable_offset > r->durable_seen)
        r->durable_seen = ss.durable_offset;
}

/* Whether append m is durable as far as the model knows. */
static bool append_durable(const run *r, int m)
{
    if (!r->appended[m])
        return false;
    return !r->w->async || r->end[m] <= r->durable_seen;
}

/* A clean close in the workload: everything appended is durable once the
 * store closed OK (it flushes) with the sim alive. */
static void close_noting(run *r)
{
    brk_status st = BRK_OK;
    if (r->g)
        st = brk_groups_close(r->g);
    r->g = NULL;
    if (st == BRK_OK && !brk_sim_is_dead(r->sim))
        note_all_persisted(r);
    if (!r->s)
        return;
    brk_store_stats ss;
    brk_store_get_stats(r->s, &ss);
    note_durable(r);
    brk_status st2 = brk_store_close(r->s);
    r->s = NULL;
    TRACE("  close: groups %s, store %s%s\n", brk_status_name(st),
          brk_status_name(st2), brk_sim_is_dead(r->sim) ? " (dead)" : "");
    if (st2 == BRK_OK && !brk_sim_is_dead(r->sim)
        && ss.log_end > r->durable_seen)
        r->durable_seen = ss.log_end;
}

static void close_both(run *r)
{
    if (r->g)
        brk_groups_close(r->g);
    r->g = NULL;
    if (r->s)
        brk_store_close(r->s);
    r->s = NULL;
}

static void run_free(run *r)
{
    close_both(r);
    brk_sim_close(r->sim);
}

/* Open store and groups, create topic and groups when missing (errors are
 * the dying disk's). */
static brk_status open_both(run *r)
{
    brk_status st = brk_store_open(&r->s, DIR, &r->so, r->err, sizeof r->err);
    if (st != BRK_OK)
        return st;
    (void)brk_topic_create(r->s, TOPIC, 2);
    st = brk_groups_open(&r->g, r->s, &r->go, r->err, sizeof r->err);
    if (st != BRK_OK) {
        brk_store_close(r->s);
        r->s = NULL;
        return st;
    }
    for (int i = 0; i < NGROUPS; i++) {
        brk_group_config c;
        brk_group_config_init(&c);
        c.fifo = FIFO[i];
        c.persist_every_ack = EVERY_ACK[i];
        c.max_deliveries = 1000;
        bool created;
        (void)brk_group_put(r->g, GROUPS[i], TOPIC, NULL, &c, &created);
    }
    return BRK_OK;
}

static void drop_held(gstate *gs, size_t i)
{
    gs->held[i] = gs->held[--gs->nheld];
}

/* After a successful tick: acks old enough for a persist to have covered
 * them are persisted. */
static void note_tick_persist(run *r)
{
    if (brk_sim_is_dead(r->sim))
        return;
    int64_t now = clk_now(r);
    gstate *gs = &r->gs[0];
    for (int m = 0; m < r->nmsgs; m++)
        if (gs->acked[m] && !gs->persisted[m]
            && now - gs->acked_at[m] >= PERSIST_MS)
            gs->persisted[m] = true;
}

static void note_all_persisted(run *r)
{
    for (int gi = 0; gi < NGROUPS; gi++)
        for (int m = 0; m < r->nmsgs; m++)
            if (r->gs[gi].acked[m])
                r->gs[gi].persisted[m] = true;
}

static void do_receive(run *r, const op *o)
{
    gstate *gs = &r->gs[o->group];
    brk_receive_req q;
    memset(&q, 0, sizeof q);
    q.group = GROUPS[o->group];
    q.topic = TOPIC;
    q.max = o->n;
    q.invisible_ms = o->inv_ms;
    brk_receive_batch *b = NULL;
    brk_status st = brk_group_receive(r->g, &q, &b);
    TRACE("    %s receive max %u inv %u: %s, %zu\n", GROUPS[o->group], o->n,
          o->inv_ms, brk_status_name(st), b ? b->count : 0);
    if (st == BRK_OK && b) {
        for (size_t i = 0; i < b->count; i++) {
            int idx = msg_idx(b->msgs[i].rec.body);
            TRACE("      m%03d queue %u offset %llu count %u %s\n", idx,
                  b->msgs[i].queue, (unsigned long long)b->msgs[i].offset,
                  b->msgs[i].delivery_count, b->msgs[i].receipt);
            if (idx < 0)
                fail_msg("workload seed %llu (%s store): received a message "
                         "that is not the workload's",
                         (unsigned long long)r->w->seed, mode_name(r->w));
            if (gs->nheld < MAX_HELD) {
                held *h = &gs->held[gs->nheld++];
                snprintf(h->receipt, sizeof h->receipt, "%s", b->msgs[i].receipt);
                h->idx = idx;
            }
        }
    }
    if (b)
        brk_receive_batch_free(b);
}

/* Run the workload; I/O may start failing at any point, which the workload
 * shrugs off (as a dying process would). */
static void run_workload(run *r)
{
    const workload *w = r->w;
    if (open_both(r) != BRK_OK)
        return;
    char body[512];
    for (size_t i = 0; i < w->nops; i++) {
        const op *o = &w->ops[i];
        brk_fake_clock_advance(&r->clk, 3);
        gstate *gs = &r->gs[o->group];
        switch (o->kind) {
        case OP_PRODUCE:
            for (unsigned k = 0; k < o->n && r->nmsgs < MAX_MSGS; k++) {
                int idx = r->nmsgs++;
                brk_append_req q;
                memset(&q, 0, sizeof q);
                q.topic = TOPIC;
                q.queue = -1;
                q.body = (brk_bytes){ body, msg_body(w, idx, body, sizeof body) };
                brk_append_res res;
                brk_status st = brk_store_append(r->s, &q, &res);
                if (st == BRK_OK) {
                    brk_store_stats ss;
                    brk_store_get_stats(r->s, &ss);
                    r->appended[idx] = true;
                    r->end[idx] = ss.log_end;
                    if (!w->async && !brk_sim_is_dead(r->sim)
                        && ss.durable_offset < ss.log_end)
                        fail_msg("workload seed %llu (SYNC store): append returned OK "
                                 "before it was durable",
                                 (unsigned long long)w->seed);
                }
                TRACE("op %zu: append m%03d: %s (queue %u offset %llu, log "
                      "%llu..%llu)\n", i, idx, brk_status_name(st),
                      st == BRK_OK ? res.queue : 0,
                      st == BRK_OK ? (unsigned long long)res.queue_offset : 0,
                      st == BRK_OK ? (unsigned long long)res.log_offset : 0,
                      st == BRK_OK ? (unsigned long long)r->end[idx] : 0);
                note_durable(r);
            }
            break;
        case OP_RECEIVE:
            do_receive(r, o);
            break;
        case OP_ACK:
        case OP_NACK: {
            if (gs->nheld == 0)
                break;
            size_t hi = o->pick % gs->nheld;
            held h = gs->held[hi];
            drop_held(gs, hi);
            if (o->kind == OP_ACK) {
                brk_status st = brk_group_ack(r->g, GROUPS[o->group], h.receipt);
                TRACE("op %zu: %s ack m%03d %s: %s\n", i, GROUPS[o->group],
                      h.idx, h.receipt, brk_status_name(st));
                if (st == BRK_OK && !gs->acked[h.idx]) {
                    gs->acked[h.idx] = true;
                    gs->acked_at[h.idx] = clk_now(r);
                    if (EVERY_ACK[o->group])
                        gs->persisted[h.idx] = true;
                } else if (st != BRK_OK && st != BRK_CONFLICT
                           && !gs->acked[h.idx]) {
                    /* An ack that failed on I/O (the save of a
                     * persist_every_ack group, say) has an unknown effect,
                     * like an append whose fdatasync failed: it may have
                     * reached the disk.  Neither required nor forbidden
                     * after the crash: it counts in the duplicate bound. */
                    gs->acked[h.idx] = true;
                    gs->acked_at[h.idx] = INT64_MAX / 2;
                }
            } else {
                brk_status st = brk_group_nack(r->g, GROUPS[o->group],
                                               h.receipt, o->delay_ms,
                                               "crash test");
                TRACE("op %zu: %s nack m%03d delay %u %s: %s\n", i,
                      GROUPS[o->group], h.idx, o->delay_ms, h.receipt,
                      brk_status_name(st));
            }
            break;
        }
        case OP_TICK: {
            brk_fake_clock_advance(&r->clk, o->advance_ms);
            (void)brk_store_tick(r->s);
            brk_status st = brk_groups_tick(r->g);
            TRACE("op %zu: tick +%lld -> %lld: %s%s\n", i,
                  (long long)o->advance_ms, (long long)(clk_now(r) - T0),
                  brk_status_name(st), brk_sim_is_dead(r->sim) ? " (dead)" : "");
            if (st == BRK_OK)
                note_tick_persist(r);
            break;
        }
        case OP_RETENTION: {
            unsigned del = 0;
            brk_status st = brk_store_retention_run(r->s, &del);
            TRACE("op %zu: retention: %s, %u segments deleted\n", i,
                  brk_status_name(st), del);
            break;
        }
        case OP_RESTART: {
            TRACE("op %zu: restart\n", i);
            close_noting(r);
            for (int gi = 0; gi < NGROUPS; gi++)
                r->gs[gi].nheld = 0;
            if (open_both(r) != BRK_OK)
                return;
            break;
        }
        case OP_FLUSH: {
            brk_status st = brk_store_flush(r->s);
            TRACE("op %zu: flush: %s%s\n", i, brk_status_name(st),
                  brk_sim_is_dead(r->sim) ? " (dead)" : "");
            break;
        }
        }
        note_durable(r);
        TRACE("  durable %llu, %llu I/O operations%s\n",
              (unsigned long long)r->durable_seen,
              (unsigned long long)brk_sim_ops(r->sim),
              brk_sim_is_dead(r->sim) ? " (dead)" : "");
    }
    close_noting(r);
}

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (!(cond)) {                                                       \
            print_error("workload seed %llu (%s store) crash point %llu "    \
                        "mode %d: ", (unsigned long long)w->seed,            \
                        mode_name(w), (unsigned long long)k, mode);          \
            fail_msg(__VA_ARGS__);                                           \
        }                                                                    \
    } while (0)

static uint64_t g_checked_msgs, g_redelivered, g_dups, g_dup_bound;
static uint64_t g_persisted_checked;   /* acked + persisted: must not come back */
static uint64_t g_async_states;        /* crash states on an ASYNC store */
static uint64_t g_not_durable;         /* ASYNC appends OK but not yet durable */
static uint64_t g_last_ops;     /* mutating I/O of the last workload run */

/* Receive + ack everything group gi has, moving the clock past every retry
 * and invisibility; counts deliveries into r->delivered[gi]. */
static void drain(run *r, const workload *w, uint64_t k, int mode, int gi,
                  unsigned *total)
{
    brk_receive_req q;
    memset(&q, 0, sizeof q);
    q.group = GROUPS[gi];
    q.topic = TOPIC;
    q.max = 64;
    q.invisible_ms = 3600 * 1000;
    int empty = 0;
    *total = 0;
    for (int round = 0; round < 400 && empty < 3; round++) {
        brk_receive_batch *b = NULL;
        brk_status st = brk_group_receive(r->g, &q, &b);
        CHECK(st == BRK_OK, "drain %s: receive: %s", GROUPS[gi],
              brk_status_name(st));
        size_t n = b ? b->count : 0;
        for (size_t i = 0; i < n; i++) {
            int idx = msg_idx(b->msgs[i].rec.body);
            CHECK(idx >= 0, "drain %s: a message that is not the workload's",
                  GROUPS[gi]);
            CHECK(idx < r->nmsgs, "drain %s: m%03d was never appended",
                  GROUPS[gi], idx);
            r->delivered[gi][idx]++;
            TRACE("drain %s: m%03d queue %u offset %llu count %u\n",
                  GROUPS[gi], idx, b->msgs[i].queue,
                  (unsigned long long)b->msgs[i].offset,
                  b->msgs[i].delivery_count);
            (*total)++;
            st = brk_group_ack(r->g, GROUPS[gi], b->msgs[i].receipt);
            CHECK(st == BRK_OK, "drain %s: ack of m%03d: %s", GROUPS[gi], idx,
                  brk_status_name(st));
        }
        if (b)
            brk_receive_batch_free(b);
        if (n == 0) {
            empty++;
            brk_fake_clock_advance(&r->clk, 10 * 60 * 1000);
            st = brk_groups_tick(r->g);
            CHECK(st == BRK_OK, "drain %s: tick: %s", GROUPS[gi],
                  brk_status_name(st));
        } else {
            empty = 0;
        }
    }
    CHECK(empty >= 3, "drain %s never ran dry", GROUPS[gi]);
}

static void verify(run *r, const workload *w, uint64_t k, int mode)
{
    brk_status st = brk_store_open(&r->s, DIR, &r->so, r->err, sizeof r->err);
    CHECK(st == BRK_OK, "store reopen after crash failed: %s: %s",
          brk_status_name(st), r->err);
    st = brk_groups_open(&r->g, r->s, &r->go, r->err, sizeof r->err);
    CHECK(st == BRK_OK, "groups reopen after crash failed: %s: %s",
          brk_status_name(st), r->err);
    /* A group whose put was lost in the crash never saw a message. */
    (void)brk_topic_create(r->s, TOPIC, 2);
    for (int gi = 0; gi < NGROUPS; gi++) {
        brk_group_config c;
        brk_group_config_init(&c);
        c.fifo = FIFO[gi];
        c.persist_every_ack = EVERY_ACK[gi];
        c.max_deliveries = 1000;
        bool created;
        st = brk_group_put(r->g, GROUPS[gi], TOPIC, NULL, &c, &created);
        CHECK(st == BRK_OK, "group put %s after recovery: %s", GROUPS[gi],
              brk_status_name(st));
    }
    for (int gi = 0; gi < NGROUPS; gi++) {
        const gstate *gs = &r->gs[gi];
        unsigned total;
        drain(r, w, k, mode, gi, &total);
        unsigned bound = 0, dups = 0;
        for (int m = 0; m < r->nmsgs; m++) {
            unsigned d = r->delivered[gi][m];
            if (gs->acked[m] && !gs->persisted[m])
                bound++;
            if (!r->appended[m])
                continue;
            if (!append_durable(r, m)) {
                /* ASYNC, not covered by a durable point before the crash:
                 * it may or may not be in the log now; if it is, it is
                 * delivered like any other (the drain counts it). */
                g_not_durable++;
                continue;
            }
            g_checked_msgs++;
            if (!gs->acked[m]) {
                CHECK(d >= 1, "group %s: m%03d (appended%s, never acked) was "
                      "not delivered after the crash", GROUPS[gi], m,
                      w->async ? " and durable" : "");
                g_redelivered++;
            } else if (gs->persisted[m]) {
                g_persisted_checked++;
                CHECK(d == 0, "group %s: m%03d was acked and persisted before "
                      "the crash, and delivered %u times after it%s",
                      GROUPS[gi], m, d,
                      EVERY_ACK[gi] ? " (persist_every_ack)" : "");
            } else {
                dups += d > 0;
            }
        }
        CHECK(dups <= bound, "group %s: %u duplicates, bound %u", GROUPS[gi],
              dups, bound);
        g_dups += dups;
        g_dup_bound += bound;
    }
    /* Drained and acked: a clean restart delivers nothing again. */
    CHECK(brk_groups_close(r->g) == BRK_OK, "groups close after recovery");
    r->g = NULL;
    CHECK(brk_store_close(r->s) == BRK_OK, "store close after recovery");
    r->s = NULL;
    st = brk_store_open(&r->s, DIR, &r->so, r->err, sizeof r->err);
    CHECK(st == BRK_OK, "second store reopen: %s", r->err);
    st = brk_groups_open(&r->g, r->s, &r->go, r->err, sizeof r->err);
    CHECK(st == BRK_OK, "second groups reopen: %s", r->err);
    for (int gi = 0; gi < NGROUPS; gi++) {
        memset(r->delivered[gi], 0, sizeof r->delivered[gi]);
        unsigned total;
        drain(r, w, k, mode, gi, &total);
        CHECK(total == 0, "group %s: %u messages delivered again after the "
              "drain and a clean restart", GROUPS[gi], total);
    }
    close_both(r);
}

/* One crash state: workload w, crash point k (UINT64_MAX: no crash). */
static bool run_crash_state(run *r, const workload *w, uint64_t k)
{
    uint64_t ss = w->seed * 0x100000001B3ull ^ (k + 1) * 0x9E3779B97F4A7C15ull;
    int mode = (int)(crash_rng_next(&ss) % 3);
    bool again = k != UINT64_MAX && crash_rng_next(&ss) % 10 == 0;
    uint64_t again_after = crash_rng_next(&ss) % 40;
    int again_mode = (int)(crash_rng_next(&ss) % 3);
    run_init(r, w, w->seed + (k == UINT64_MAX ? 0 : k));
    g_async_states += w->async && k != UINT64_MAX;
    if (k != UINT64_MAX)
        brk_sim_set_crash_after(r->sim, k);
    run_workload(r);
    g_last_ops = brk_sim_ops(r->sim);
    if (k == UINT64_MAX) {
        mode = -1;
    } else if (brk_sim_crash(r->sim, mode) != BRK_OK) {
        fail_msg("sim crash");
    }
    TRACE("crash (%s store, mode %d) after %llu operations; durable %llu\n",
          mode_name(w), mode, (unsigned long long)k,
          (unsigned long long)r->durable_seen);
    if (again) {
        TRACE("recovery crashes after %llu more (mode %d)\n",
              (unsigned long long)again_after, again_mode);
        brk_sim_set_crash_after(r->sim, again_after);
        if (open_both(r) == BRK_OK)
            close_both(r);
        if (brk_sim_crash(r->sim, again_mode) != BRK_OK)
            fail_msg("sim crash");
    }
    verify(r, w, k, again ? mode * 10 + again_mode : mode);
    run_free(r);
    return again;
}

static void crash_at_every_operation_loses_no_message_and_bounds_duplicates(void **state)
{
    (void)state;
    uint64_t budget = crash_env_u64("BRK_GROUP_CRASH_STATES", DEFAULT_STATES);
    uint64_t seed = crash_env_u64("BRK_GROUP_CRASH_SEED", 1);
    uint64_t only_point = crash_env_u64("BRK_GROUP_CRASH_POINT", UINT64_MAX);
    g_trace = getenv("BRK_GROUP_CRASH_TRACE") != NULL;
    static workload w;
    static run r;
    if (getenv("BRK_GROUP_CRASH_POINT")) {
        make_workload(&w, seed);
        run_crash_state(&r, &w, only_point);
        return;
    }
    uint64_t states = 0, workloads = 0, recovery_crashes = 0, ops_total = 0;
    while (states < budget) {
        make_workload(&w, seed + workloads);
        /* Count the workload's operations on a run without a crash, which
         * must pass the same checks. */
        run_crash_state(&r, &w, UINT64_MAX);
        uint64_t n = g_last_ops;
        if (n == 0)
            fail_msg("workload seed %llu did no I/O", (unsigned long long)w.seed);
        ops_total += n;
        uint64_t per = budget - states < 150 ? budget - states : 150;
        uint64_t stride = n / per ? n / per : 1;
        uint64_t rs = w.seed ^ 0xABCDEF;
        for (uint64_t k = crash_rng_next(&rs) % stride; k < n && states < budget;
             k += stride) {
            recovery_crashes += run_crash_state(&r, &w, k);
            states++;
        }
        workloads++;
    }
    print_message("group crash exploration: %llu crash states over %llu "
                  "workloads (%llu I/O operations each on average; %llu with "
                  "a second crash during recovery; %llu on an ASYNC store); "
                  "%llu (group, message) pairs checked, %llu unacked ones "
                  "redelivered, %llu acked and persisted ones not "
                  "redelivered, %llu duplicates of acked ones against a "
                  "bound of %llu; %llu ASYNC appends not yet durable at the "
                  "crash (not checked)\n",
                  (unsigned long long)states, (unsigned long long)workloads,
                  (unsigned long long)(workloads ? ops_total / workloads : 0),
                  (unsigned long long)recovery_crashes,
                  (unsigned long long)g_async_states,
                  (unsigned long long)g_checked_msgs,
                  (unsigned long long)g_redelivered,
                  (unsigned long long)g_persisted_checked,
                  (unsigned long long)g_dups, (unsigned long long)g_dup_bound,
                  (unsigned long long)g_not_durable);
    assert_true(states >= budget);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(crash_at_every_operation_loses_no_message_and_bounds_duplicates),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
