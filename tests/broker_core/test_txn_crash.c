/*
 * test_txn_crash.c - crash exploration of the transaction module.
 *
 * For many random workloads of transactions (prepares, some repeated as
 * replays; client commits and rollbacks, some of them conflicting or
 * repeated; clock steps with ticks that run check-backs, whose answers
 * resolve, count, expire, hold or fail; compaction copies of old half
 * messages; store checkpoints; clean restarts), on a SYNC store on the
 * simulated disk, run the workload once to count its mutating I/O
 * operations, then run it again with the disk dying after k operations,
 * lose unsynced bytes (all of them, a random subset by sector, or a torn
 * last write), reopen the store and the transaction module, and check:
 *   - both open (a crash is never "corruption");
 *   - every acknowledged prepare (brk_txn_prepare returned OK) is still
 *     known: pending, or resolved;
 *   - every acknowledged verdict - a commit or rollback that returned OK,
 *     the state a CONFLICT reported, a terminal state brk_txn_get showed
 *     after a tick - is still that verdict (never lost, never reversed);
 *     a transaction seen stuck, with no client verdict tried since, is
 *     still pending and stuck; a pending one has at least the checks seen;
 *     a pending one that is not stuck has a next check time;
 *   - the target topic holds each committed transaction's message exactly
 *     once (counted by message id over every queue), nothing of a rolled
 *     back or pending one, and nothing else;
 *   - the expiry topic holds one expiry message for each transaction that
 *     expired under a policy with an expiry topic, and nothing else;
 *   - the recovered module works: every pending transaction commits, its
 *     message lands once, and everything holds across a clean restart.
 * Some states also crash again while recovering, before the final reopen.
 *
 * Store modes: one workload in three (by a hash of its seed, so a replay
 * of a seed uses the same mode) runs on an ASYNC store, where a record
 * that was appended is only in the page cache.  There "acknowledged" needs
 * a durable point too: after every operation the model notes the log end
 * (every record the operation wrote lies below it: one caller thread, and
 * ticks are quiesced) and, only while the sim is still alive, the store's
 * durable_offset; a prepare, verdict, stuck flag or check count counts as
 * acknowledged-and-durable when the log end noted with it is at or below
 * the highest durable offset seen (or a clean close returned OK with the
 * sim alive).  Durable points: state saves in ticks (they flush the log),
 * clean restarts and OP_FLUSH (brk_store_flush, ASYNC workloads only).  In
 * SYNC mode every acknowledgement is durable.  The checks above then apply
 * to the durable ones; of the others, a prepare may be lost, and a verdict
 * may be lost (the transaction is pending again) but still never reversed,
 * in either mode.  Every check on what the recovered state is (message
 * exactly once per committed transaction, expiry messages, schedules, the
 * recovered module working) is the same in both modes.
 *
 * Workers: one checker thread, and every tick is followed by
 * brk_txn_quiesce, so a workload performs the same I/O in the same order on
 * every run and crash point k means the same thing each time.
 *
 * Size: BRK_TXN_CRASH_STATES crash states in all (default 40000, about
 * 20 s in Release; 5000 in sanitizer builds).  BRK_TXN_CRASH_SEED picks the
 * first workload seed.  Replay one failing state exactly with
 * BRK_TXN_CRASH_SEED=<workload seed> BRK_TXN_CRASH_POINT=<crash point>: the
 * crash mode and any second crash derive from those two.  A failure prints
 * "mode m" (m = 0 DROP_ALL, 1 KEEP_RANDOM, 2 TORN_LAST) or, with a second
 * crash during recovery, "mode 10*m1 + m2"; the store mode (SYNC or
 * ASYNC, which the seed decides) is printed with it.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker/store.h"
#include "broker/txn.h"
#include "crash_util.h"
#include "fake_clock.h"
#include "io_sim.h"

#define DIR      "/txncrash"
#define TOPIC    "t"
#define EXPIRY   "exp"
#define MAX_OPS  64
#define MAX_TX   MAX_OPS
#define MAX_BODY 600
#define T0       1700000000000LL

/* Crash states per run by default: about 20 s in Release; the sanitizer
 * builds (Debug, several times slower) explore fewer. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define DEFAULT_STATES 5000
#else
#define DEFAULT_STATES 40000
#endif

enum { OP_PREPARE, OP_COMMIT, OP_ROLLBACK, OP_TICK, OP_RESTART, OP_CKPT,
       OP_FLUSH };

/* Policies, by transaction index. */
enum { POL_ROLLBACK, POL_EXPIRY, POL_HOLD, POL_SLOW, POL_COUNT_ };

typedef struct op {
    int kind;
    int tx;                 /* PREPARE / COMMIT / ROLLBACK */
    int64_t advance_ms;     /* TICK */
} op;

typedef struct workload {
    uint64_t seed;
    bool async;             /* ASYNC store (one workload in three) */
    uint64_t segment_bytes;
    size_t nops;
    int ntx;                /* distinct transactions */
    op ops[MAX_OPS];
} workload;

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
    w->segment_bytes = crash_rng_next(&r) % 2 ? 4096 : 8192;
    w->nops = 30 + crash_rng_next(&r) % (MAX_OPS - 30);
    for (size_t i = 0; i < w->nops; i++) {
        op *o = &w->ops[i];
        unsigned d = (unsigned)(crash_rng_next(&r) % 100);
        if (d < 35 || w->ntx == 0) {
            o->kind = OP_PREPARE;
            /* One prepare in eight repeats an earlier one (a replay). */
            o->tx = w->ntx > 0 && crash_rng_next(&r) % 8 == 0
                    ? (int)(crash_rng_next(&r) % (uint64_t)w->ntx) : w->ntx++;
        } else if (d < 50) {
            o->kind = OP_COMMIT;
            o->tx = (int)(crash_rng_next(&r) % (uint64_t)w->ntx);
        } else if (d < 60) {
            o->kind = OP_ROLLBACK;
            o->tx = (int)(crash_rng_next(&r) % (uint64_t)w->ntx);
        } else if (w->async && d < 66) {
            /* ASYNC workloads only (SYNC ones stay as they were): an
             * explicit durable point. */
            o->kind = OP_FLUSH;
        } else if (d < 90) {
            o->kind = OP_TICK;
            o->advance_ms = 20 + (int64_t)(crash_rng_next(&r) % 200);
        } else if (d < 95) {
            o->kind = OP_RESTART;
        } else {
            o->kind = OP_CKPT;
        }
    }
}

/* Deterministic content of transaction tx. */
static void tx_name(int tx, char *buf, size_t cap)
{
    snprintf(buf, cap, "tx-%d", tx);
}

static int tx_of(const char *txid)
{
    int tx = -1;
    if (sscanf(txid, "tx-%d", &tx) != 1 || tx < 0 || tx >= MAX_TX)
        return -1;
    return tx;
}

static int tx_policy(const workload *w, int tx)
{
    uint64_t r = w->seed * 31 + (uint64_t)tx;
    return (int)(crash_rng_next(&r) % POL_COUNT_);
}

static brk_check_policy policy_of(int pol)
{
    brk_check_policy p;
    memset(&p, 0, sizeof p);
    p.interval_ms = 100;
    p.max_checks = 2;
    p.on_exhausted = BRK_EXHAUSTED_ROLLBACK;
    switch (pol) {
    case POL_EXPIRY:
        p.expiry_topic = EXPIRY;
        break;
    case POL_HOLD:
        p.max_checks = 1;
        p.on_exhausted = BRK_EXHAUSTED_HOLD;
        break;
    case POL_SLOW:
        p.first_check_ms = 300;
        p.interval_ms = 150;
        p.max_checks = 3;
        break;
    default:
        break;
    }
    return p;
}

static size_t tx_body(const workload *w, int tx, uint8_t *buf)
{
    uint64_t r = w->seed * 1000003u + (uint64_t)tx;
    size_t len = crash_rng_next(&r) % 4 == 0 ? crash_rng_next(&r) % MAX_BODY
                                       : crash_rng_next(&r) % 100;
    for (size_t k = 0; k < len; k++)
        buf[k] = (uint8_t)crash_rng_next(&r);
    return len;
}

#define CHECKS_TRACKED 8

/* What the workload was told, each with the log end noted when it was
 * told (durable once the durable offset seen reaches it; see the top). */
typedef struct txrec {
    bool prepared;          /* a prepare returned OK */
    uint64_t prepared_end;
    uint8_t msg_id[BRK_UUID_LEN];
    int acked;              /* 0, or the terminal brk_txn_state acknowledged */
    uint64_t acked_end;
    bool stuck_seen;        /* observed stuck ... */
    uint64_t stuck_end;
    bool verdict_since;     /* ... and a client verdict was tried since */
    uint32_t checks_seen;   /* highest check count observed while pending */
    uint64_t checks_end[CHECKS_TRACKED]; /* [c]: when >= c checks were seen */
} txrec;

typedef struct run {
    brk_sim *sim;
    brk_fake_clock clk;
    brk_store_opts so;
    brk_txn_opts to;
    brk_checker checker;
    brk_store *s;
    brk_txn *t;
    const workload *w;
    pthread_mutex_t mu;     /* calls[] (the checker runs on a worker) */
    unsigned calls[MAX_TX];
    txrec tx[MAX_TX];
    uint64_t log_end;       /* noted after the current operation */
    uint64_t durable_seen;  /* highest durable offset seen alive */
    char err[256];
} run;

/* The checker: a deterministic answer per (workload, txid, attempt, call). */
static brk_check_result crash_check(void *ctx, const brk_check_req *req)
{
    run *r = ctx;
    int tx = tx_of(req->txid);
    if (tx < 0)
        return BRK_CHECK_ERROR;
    pthread_mutex_lock(&r->mu);
    unsigned c = r->calls[tx]++;
    pthread_mutex_unlock(&r->mu);
    uint64_t h = r->w->seed ^ ((uint64_t)tx * 1000003u)
                 ^ ((uint64_t)req->attempt * 7919u) ^ ((uint64_t)c * 104729u);
    switch (crash_rng_next(&h) % 10) {
    case 0: case 1: return BRK_CHECK_COMMIT;
    case 2: case 3: return BRK_CHECK_ROLLBACK;
    case 8: return BRK_CHECK_ERROR;
    default: return BRK_CHECK_UNKNOWN;
    }
}

static void run_init(run *r, const workload *w, uint64_t sim_seed)
{
    memset(r, 0, sizeof *r);
    r->w = w;
    pthread_mutex_init(&r->mu, NULL);
    if (brk_sim_open(&r->sim, sim_seed) != BRK_OK)
        fail_msg("sim open");
    brk_fake_clock_init(&r->clk, T0);
    brk_store_opts_init(&r->so);
    r->so.io = brk_sim_io(r->sim);
    r->so.clock = &r->clk.clock;
    r->so.no_background = true;
    r->so.flush_mode = w->async ? BRK_FLUSH_ASYNC : BRK_FLUSH_SYNC;
    r->so.segment_bytes = w->segment_bytes;
    r->so.cq_entries_per_file = 16;
    r->so.default_queues = 2;
    r->so.auto_create_topics = false;
    r->so.uuid_seed = 1;
    r->checker.check = crash_check;
    r->checker.ctx = r;
    brk_txn_opts_init(&r->to);
    r->to.checker = &r->checker;
    r->to.workers = 1;
    r->to.no_background = true;
    r->to.error_backoff_min_ms = 50;
    r->to.error_backoff_max_ms = 200;
    r->to.state_interval_ms = 250;
    r->to.compact_after_ms = 700;     /* copies happen within a workload */
}

static void run_free(run *r)
{
    if (r->t)
        brk_txn_close(r->t);
    if (r->s)
        brk_store_close(r->s);
    r->t = NULL;
    r->s = NULL;
    brk_sim_close(r->sim);
    pthread_mutex_destroy(&r->mu);
}

/* Open store and module; create the topics when missing (errors are the
 * dying disk's). */
static brk_status open_both(run *r)
{
    brk_status st = brk_store_open(&r->s, DIR, &r->so, r->err, sizeof r->err);
    if (st != BRK_OK)
        return st;
    (void)brk_topic_create(r->s, TOPIC, 2);
    (void)brk_topic_create(r->s, EXPIRY, 1);
    st = brk_txn_open(&r->t, r->s, &r->to, r->err, sizeof r->err);
    if (st != BRK_OK) {
        brk_store_close(r->s);
        r->s = NULL;
    }
    return st;
}

static void close_both(run *r)
{
    if (r->t)
        brk_txn_close(r->t);
    r->t = NULL;
    if (r->s)
        brk_store_close(r->s);
    r->s = NULL;
}

/* Note the log end, and the durable offset only while the sim is alive:
 * after the crash point the store's figures are no evidence of what is on
 * disk. */
static void note_end(run *r)
{
    if (!r->s)
        return;
    brk_store_stats ss;
    brk_store_get_stats(r->s, &ss);
    r->log_end = ss.log_end;
    if (!brk_sim_is_dead(r->sim) && ss.durable_offset > r->durable_seen)
        r->durable_seen = ss.durable_offset;
}

/* A clean close in the workload: everything is durable once the store
 * closed OK (it flushes) with the sim alive. */
static void close_noting(run *r)
{
    if (r->t)
        brk_txn_close(r->t);
    r->t = NULL;
    if (!r->s)
        return;
    note_end(r);
    brk_status st = brk_store_close(r->s);
    r->s = NULL;
    if (st == BRK_OK && !brk_sim_is_dead(r->sim) && r->log_end > r->durable_seen)
        r->durable_seen = r->log_end;
}

/* Whether something told with log end `end` is durable. */
static bool durable(const run *r, uint64_t end)
{
    return !r->w->async || end <= r->durable_seen;
}

static void note_terminal(run *r, txrec *x, brk_txn_state st)
{
    if (st == BRK_TXN_COMMITTED || st == BRK_TXN_ROLLED_BACK)
        if (x->acked == 0) {
            x->acked = (int)st;
            x->acked_end = r->log_end;
        }
}

/* After a tick: what brk_txn_get shows of every acknowledged prepare. */
static void observe(run *r)
{
    char id[32];
    for (int tx = 0; tx < r->w->ntx; tx++) {
        txrec *x = &r->tx[tx];
        if (!x->prepared)
            continue;
        tx_name(tx, id, sizeof id);
        brk_txn_info i;
        if (brk_txn_get(r->t, id, &i) != BRK_OK)
            continue;
        if (i.state == BRK_TXN_PREPARED) {
            for (uint32_t c = x->checks_seen + 1;
                 c <= i.checks && c < CHECKS_TRACKED; c++)
                x->checks_end[c] = r->log_end;
            if (i.checks > x->checks_seen)
                x->checks_seen = i.checks;
            if (i.stuck && !x->stuck_seen) {
                x->stuck_seen = true;
                x->stuck_end = r->log_end;
                x->verdict_since = false;
            }
        } else {
            note_terminal(r, x, i.state);
        }
    }
}

/* Run the workload; I/O may start failing at any point, which the
 * workload shrugs off (as a dying process would). */
static void run_workload(run *r)
{
    const workload *w = r->w;
    if (open_both(r) != BRK_OK)
        return;
    uint8_t body[MAX_BODY];
    char id[32], key[4] = "k0";
    for (size_t i = 0; i < w->nops; i++) {
        const op *o = &w->ops[i];
        brk_fake_clock_advance(&r->clk, 3);
        txrec *x = o->kind <= OP_ROLLBACK ? &r->tx[o->tx] : NULL;
        switch (o->kind) {
        case OP_PREPARE: {
            brk_check_policy pol = policy_of(tx_policy(w, o->tx));
            tx_name(o->tx, id, sizeof id);
            key[1] = (char)('0' + o->tx % 3);
            brk_txn_prepare_req q;
            memset(&q, 0, sizeof q);
            q.topic = TOPIC;
            q.txid = id;
            q.key = (brk_bytes){ key, 2 };
            q.body = (brk_bytes){ body, tx_body(w, o->tx, body) };
            q.policy = &pol;
            brk_txn_result res;
            memset(&res, 0, sizeof res);
            if (brk_txn_prepare(r->t, &q, &res) == BRK_OK) {
                if (x->prepared && memcmp(x->msg_id, res.msg_id, BRK_UUID_LEN) != 0)
                    fail_msg("workload seed %llu (%s store): prepare replay of "
                             "%s gave another message id",
                             (unsigned long long)w->seed, mode_name(w), id);
                note_end(r);
                if (!x->prepared)
                    x->prepared_end = r->log_end;
                x->prepared = true;
                memcpy(x->msg_id, res.msg_id, BRK_UUID_LEN);
                note_terminal(r, x, res.state);
            }
            break;
        }
        case OP_COMMIT:
        case OP_ROLLBACK: {
            tx_name(o->tx, id, sizeof id);
            brk_txn_result res;
            memset(&res, 0, sizeof res);
            bool c = o->kind == OP_COMMIT;
            x->verdict_since = true;
            brk_status st = c ? brk_txn_commit(r->t, id, &res)
                              : brk_txn_rollback(r->t, id, &res);
            note_end(r);
            if (st == BRK_OK)
                note_terminal(r, x, c ? BRK_TXN_COMMITTED : BRK_TXN_ROLLED_BACK);
            else if (st == BRK_CONFLICT)
                note_terminal(r, x, res.state);
            break;
        }
        case OP_TICK:
            brk_fake_clock_advance(&r->clk, o->advance_ms);
            (void)brk_txn_tick(r->t);
            brk_txn_quiesce(r->t);
            note_end(r);
            observe(r);
            break;
        case OP_CKPT:
            (void)brk_store_checkpoint(r->s);
            break;
        case OP_FLUSH:
            (void)brk_store_flush(r->s);
            break;
        case OP_RESTART:
            close_noting(r);
            if (open_both(r) != BRK_OK)
                return;
            break;
        }
        note_end(r);
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

/* Message ids found in a topic, with their expiry txid header if any. */
typedef struct found {
    size_t n;
    uint8_t ids[4 * MAX_TX][BRK_UUID_LEN];
    char txid[4 * MAX_TX][BRK_TXID_MAX + 1];
} found;

static brk_status collect(brk_store *s, const char *topic, found *out)
{
    out->n = 0;
    brk_topic_info ti;
    if (brk_topic_get(s, topic, &ti) != BRK_OK)
        return BRK_OK;
    for (uint16_t q = 0; q < ti.queues; q++) {
        uint64_t min, max;
        brk_status st = brk_store_queue_range(s, topic, q, &min, &max);
        if (st != BRK_OK)
            return st;
        uint64_t next = min;
        while (next < max) {
            brk_batch *b = NULL;
            st = brk_store_read(s, topic, q, next, 64, &b);
            if (st != BRK_OK)
                return st;
            if (b->count == 0) {
                brk_batch_free(b);
                return BRK_BADREC;
            }
            for (size_t i = 0; i < b->count; i++) {
                if (out->n < sizeof out->ids / sizeof out->ids[0]) {
                    memcpy(out->ids[out->n], b->recs[i].msg_id, BRK_UUID_LEN);
                    brk_bytes v;
                    out->txid[out->n][0] = '\0';
                    if (brk_props_get(b->recs[i].props, "outboxd-txid", &v) == BRK_OK
                        && v.len <= BRK_TXID_MAX) {
                        memcpy(out->txid[out->n], v.ptr, v.len);
                        out->txid[out->n][v.len] = '\0';
                    }
                }
                out->n++;
            }
            next = b->next_offset;
            brk_batch_free(b);
        }
    }
    return BRK_OK;
}

static size_t count_id(const found *f, const uint8_t *id)
{
    size_t n = 0;
    for (size_t i = 0; i < f->n && i < sizeof f->ids / sizeof f->ids[0]; i++)
        n += memcmp(f->ids[i], id, BRK_UUID_LEN) == 0;
    return n;
}

static size_t count_txid(const found *f, const char *txid)
{
    size_t n = 0;
    for (size_t i = 0; i < f->n && i < sizeof f->ids / sizeof f->ids[0]; i++)
        n += strcmp(f->txid[i], txid) == 0;
    return n;
}

static uint64_t g_tx_checked, g_acked_checked, g_committed_checked;
static uint64_t g_async_states, g_not_durable;

/* The invariants on an open store + module; `after_fix` is the second
 * pass (everything pending was committed by the verifier). */
static void check_state(run *r, const workload *w, uint64_t k, int mode,
                        bool after_fix)
{
    static found msgs, exps;
    brk_status st = collect(r->s, TOPIC, &msgs);
    CHECK(st == BRK_OK, "reading topic %s: %s (%s)", TOPIC, brk_status_name(st),
          brk_store_errstr(r->s));
    CHECK(msgs.n <= sizeof msgs.ids / sizeof msgs.ids[0], "too many messages");
    st = collect(r->s, EXPIRY, &exps);
    CHECK(st == BRK_OK, "reading topic %s: %s", EXPIRY, brk_status_name(st));
    CHECK(exps.n <= sizeof exps.ids / sizeof exps.ids[0], "too many expiry messages");
    size_t committed = 0, expiries = 0;
    char id[32];
    for (int tx = 0; tx < w->ntx; tx++) {
        const txrec *x = &r->tx[tx];
        tx_name(tx, id, sizeof id);
        brk_txn_info i;
        st = brk_txn_get(r->t, id, &i);
        bool prep_durable = x->prepared && durable(r, x->prepared_end);
        if (st == BRK_NOTFOUND) {
            /* ASYNC: a prepare not yet durable may be lost (a verdict after
             * it is later in the log, so not durable either). */
            CHECK(!prep_durable, "acknowledged%s prepare of %s is lost",
                  w->async ? " and durable" : "", id);
            g_not_durable += x->prepared && !after_fix;
            CHECK(count_txid(&exps, id) == 0, "expiry message for unknown %s", id);
            continue;
        }
        CHECK(st == BRK_OK, "get %s: %s", id, brk_status_name(st));
        g_tx_checked++;
        if (x->prepared)
            CHECK(memcmp(i.msg_id, x->msg_id, BRK_UUID_LEN) == 0,
                  "%s has another message id after recovery", id);
        if (x->acked && durable(r, x->acked_end)) {
            g_acked_checked++;
            CHECK((int)i.state == x->acked, "acknowledged%s %s of %s is now %s",
                  w->async ? " and durable" : "",
                  brk_txn_state_name((brk_txn_state)x->acked), id,
                  brk_txn_state_name(i.state));
        } else if (x->acked) {
            /* ASYNC, the verdict not yet durable: its op record may be
             * lost, leaving the transaction pending; never the opposite
             * verdict (nothing after it in the log can decide otherwise). */
            g_not_durable += !after_fix;
            CHECK((int)i.state == x->acked || i.state == BRK_TXN_PREPARED,
                  "acknowledged (not yet durable) %s of %s is now %s",
                  brk_txn_state_name((brk_txn_state)x->acked), id,
                  brk_txn_state_name(i.state));
        }
        if (!after_fix && x->stuck_seen && !x->verdict_since
            && durable(r, x->stuck_end))
            CHECK(i.state == BRK_TXN_PREPARED && i.stuck,
                  "%s was stuck and is now %s%s", id,
                  brk_txn_state_name(i.state), i.stuck ? " (stuck)" : "");
        /* Check counts: the highest count seen whose op record is durable
         * (in SYNC mode, the highest seen). */
        uint32_t checks_min = 0;
        for (uint32_t c = 1; c <= x->checks_seen && c < CHECKS_TRACKED; c++)
            if (durable(r, x->checks_end[c]))
                checks_min = c;
        if (!w->async)
            checks_min = x->checks_seen;
        size_t n = count_id(&msgs, i.msg_id);
        switch (i.state) {
        case BRK_TXN_COMMITTED:
            committed++;
            g_committed_checked++;
            CHECK(n == 1, "committed %s has its message %zu times", id, n);
            break;
        case BRK_TXN_ROLLED_BACK:
            CHECK(n == 0, "rolled back %s has its message %zu times", id, n);
            break;
        case BRK_TXN_PREPARED:
            CHECK(!after_fix, "%s still pending after the verifier committed it", id);
            CHECK(n == 0, "pending %s has its message %zu times", id, n);
            CHECK(i.checks >= checks_min, "%s had %u checks (%u durable), "
                  "now %u", id, x->checks_seen, checks_min, i.checks);
            CHECK(i.stuck || i.next_check_ms > 0,
                  "pending %s has no check scheduled", id);
            break;
        default:
            CHECK(false, "%s in state %d", id, (int)i.state);
        }
        size_t e = count_txid(&exps, id);
        bool want_exp = i.state == BRK_TXN_ROLLED_BACK && i.expired
                        && i.expiry_topic[0] != '\0';
        CHECK(e == (want_exp ? 1u : 0u), "%s (%s%s) has %zu expiry messages",
              id, brk_txn_state_name(i.state), i.expired ? ", expired" : "", e);
        expiries += e;
    }
    CHECK(msgs.n == committed, "%zu messages in the topic for %zu committed "
          "transactions", msgs.n, committed);
    CHECK(exps.n == expiries, "%zu expiry messages, %zu explained", exps.n,
          expiries);
}

static void verify(run *r, const workload *w, uint64_t k, int mode)
{
    brk_status st = brk_store_open(&r->s, DIR, &r->so, r->err, sizeof r->err);
    CHECK(st == BRK_OK, "store reopen after crash failed: %s: %s",
          brk_status_name(st), r->err);
    st = brk_txn_open(&r->t, r->s, &r->to, r->err, sizeof r->err);
    CHECK(st == BRK_OK, "txn reopen after crash failed: %s: %s",
          brk_status_name(st), r->err);
    check_state(r, w, k, mode, false);

    /* The recovered module works: commit everything pending. */
    char id[32];
    for (int tx = 0; tx < w->ntx; tx++) {
        tx_name(tx, id, sizeof id);
        brk_txn_info i;
        if (brk_txn_get(r->t, id, &i) != BRK_OK || i.state != BRK_TXN_PREPARED)
            continue;
        brk_txn_result res;
        st = brk_txn_commit(r->t, id, &res);
        CHECK(st == BRK_OK, "commit of pending %s after recovery: %s", id,
              brk_status_name(st));
        /* The verifier's verdict, acknowledged now (it replaces an ASYNC
         * verdict the crash lost; in SYNC mode there is none to replace).
         * No crash follows: it counts as durable. */
        r->tx[tx].acked = BRK_TXN_COMMITTED;
        r->tx[tx].acked_end = 0;
    }
    check_state(r, w, k, mode, true);
    /* And all of it survives a clean restart. */
    CHECK(brk_txn_close(r->t) == BRK_OK, "txn close after recovery");
    r->t = NULL;
    CHECK(brk_store_close(r->s) == BRK_OK, "store close after recovery");
    r->s = NULL;
    st = brk_store_open(&r->s, DIR, &r->so, r->err, sizeof r->err);
    CHECK(st == BRK_OK, "second store reopen: %s", r->err);
    st = brk_txn_open(&r->t, r->s, &r->to, r->err, sizeof r->err);
    CHECK(st == BRK_OK, "second txn reopen: %s", r->err);
    check_state(r, w, k, mode, true);
    close_both(r);
}

/* One crash state: workload w, crash point k.  Everything else (crash
 * mode, whether recovery crashes again, where and how) derives from
 * (w->seed, k), so BRK_TXN_CRASH_SEED + BRK_TXN_CRASH_POINT replay it. */
static bool run_crash_state(run *r, const workload *w, uint64_t k)
{
    uint64_t ss = w->seed * 0x100000001B3ull ^ (k + 1) * 0x9E3779B97F4A7C15ull;
    int mode = (int)(crash_rng_next(&ss) % 3);
    bool again = crash_rng_next(&ss) % 10 == 0;
    uint64_t again_after = crash_rng_next(&ss) % 40;
    int again_mode = (int)(crash_rng_next(&ss) % 3);
    run_init(r, w, w->seed + k);
    g_async_states += w->async;
    brk_sim_set_crash_after(r->sim, k);
    run_workload(r);
    if (brk_sim_crash(r->sim, mode) != BRK_OK)
        fail_msg("sim crash");
    if (again) {
        /* Crash again while recovering. */
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

static void crash_at_every_operation_keeps_acknowledged_transactions(void **state)
{
    (void)state;
    uint64_t budget = crash_env_u64("BRK_TXN_CRASH_STATES", DEFAULT_STATES);
    uint64_t seed = crash_env_u64("BRK_TXN_CRASH_SEED", 1);
    uint64_t only_point = crash_env_u64("BRK_TXN_CRASH_POINT", UINT64_MAX);
    static workload w;
    static run r;
    if (only_point != UINT64_MAX) {
        make_workload(&w, seed);
        run_crash_state(&r, &w, only_point);
        return;
    }
    uint64_t states = 0, workloads = 0, recovery_crashes = 0, ops_total = 0;
    while (states < budget) {
        make_workload(&w, seed + workloads);
        /* Count the workload's operations on a clean run, and check that
         * a run without a crash passes the same checks. */
        run_init(&r, &w, seed);
        run_workload(&r);
        uint64_t n = brk_sim_ops(r.sim);
        if (n == 0)
            fail_msg("workload seed %llu did no I/O", (unsigned long long)w.seed);
        verify(&r, &w, UINT64_MAX, -1);
        run_free(&r);
        ops_total += n;
        /* Every crash point when the budget allows, else an even sample;
         * at most 200 states per workload keeps workloads varied. */
        uint64_t per = budget - states < 200 ? budget - states : 200;
        uint64_t stride = n / per ? n / per : 1;
        uint64_t rs = w.seed ^ 0xABCDEF;
        for (uint64_t k = crash_rng_next(&rs) % stride; k < n && states < budget;
             k += stride) {
            recovery_crashes += run_crash_state(&r, &w, k);
            states++;
        }
        workloads++;
    }
    print_message("txn crash exploration: %llu crash states over %llu workloads "
                  "(%llu I/O operations each on average; %llu with a second "
                  "crash during recovery; %llu on an ASYNC store); %llu "
                  "transactions checked, %llu acknowledged outcomes "
                  "verified, %llu committed messages counted; %llu ASYNC "
                  "prepares or verdicts not yet durable at the crash\n",
                  (unsigned long long)states, (unsigned long long)workloads,
                  (unsigned long long)(workloads ? ops_total / workloads : 0),
                  (unsigned long long)recovery_crashes,
                  (unsigned long long)g_async_states,
                  (unsigned long long)g_tx_checked,
                  (unsigned long long)g_acked_checked,
                  (unsigned long long)g_committed_checked,
                  (unsigned long long)g_not_durable);
    assert_true(states >= budget);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(crash_at_every_operation_keeps_acknowledged_transactions),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
