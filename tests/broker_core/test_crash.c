/*
 * test_crash.c - crash exploration of the storage engine.
 *
 * For many random workloads (appends with and without keys, sync and async
 * appends, flushes, checkpoints, topic growth, clean restarts, segment and
 * consume-queue file rolls), run the workload once to count its mutating
 * I/O operations, then run it again with the simulated disk dying after k
 * operations, lose unsynced bytes (all of them, a random subset by sector,
 * or a torn last write), reopen, and check:
 *   - the store opens (a crash is never "corruption");
 *   - every append acknowledged as durable (SYNC mode, req.sync, or followed
 *     by a successful flush/checkpoint) is present at the queue offset it
 *     was given, with its id, key and body;
 *   - every record that is present is intact and is one the workload tried
 *     to append, with the same content, at the position it was given;
 *   - queue offsets are dense from the queue minimum, and per queue the
 *     records appear in append order (no gap, no reordering);
 *   - the recovered store takes new appends and survives a clean restart.
 * Some states also crash again during recovery before the final reopen.
 *
 * Size: BRK_CRASH_STATES crash states in all (default 20000 for `make test`;
 * `make crash` explores 200000).  BRK_CRASH_SEED picks
 * the first workload seed, so a failure replays exactly.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker/store.h"
#include "crash_util.h"
#include "fake_clock.h"
#include "io_sim.h"

#define DIR "/crash"
#define MAX_OPS 90
#define MAX_BODY 700

enum { OP_APPEND, OP_FLUSH, OP_CKPT, OP_GROW, OP_RESTART };

typedef struct op {
    int kind;
    int topic;          /* 0 "a", 1 "b" */
    int key;            /* -1 none, else k0..k3 */
    size_t body_len;
    bool sync;
    uint16_t grow_to;
} op;

typedef struct workload {
    uint64_t seed;
    brk_flush_mode mode;
    uint64_t segment_bytes;
    size_t nops;
    op ops[MAX_OPS];
} workload;

typedef struct ack {
    bool ok;            /* append returned BRK_OK */
    bool durable;       /* covered by a successful flush */
    uint16_t queue;
    uint64_t qoff;
} ack;

static const char *topic_name(int t) { return t ? "b" : "a"; }

static void make_workload(workload *w, uint64_t seed)
{
    uint64_t r = seed;
    memset(w, 0, sizeof *w);
    w->seed = seed;
    w->mode = crash_rng_next(&r) % 2 ? BRK_FLUSH_SYNC : BRK_FLUSH_ASYNC;
    w->segment_bytes = crash_rng_next(&r) % 2 ? 4096 : 8192;
    w->nops = 40 + crash_rng_next(&r) % (MAX_OPS - 40);
    uint16_t queues[2] = { 2, 2 };
    for (size_t i = 0; i < w->nops; i++) {
        op *o = &w->ops[i];
        unsigned d = (unsigned)(crash_rng_next(&r) % 100);
        o->topic = (int)(crash_rng_next(&r) % 2);
        if (d < 80) {
            o->kind = OP_APPEND;
            o->key = crash_rng_next(&r) % 3 ? (int)(crash_rng_next(&r) % 4) : -1;
            o->body_len = crash_rng_next(&r) % 4 == 0 ? crash_rng_next(&r) % MAX_BODY
                                                : crash_rng_next(&r) % 120;
            o->sync = crash_rng_next(&r) % 5 == 0;
        } else if (d < 87) {
            o->kind = OP_FLUSH;
        } else if (d < 94) {
            o->kind = OP_CKPT;
        } else if (d < 97 && queues[o->topic] < 6) {
            o->kind = OP_GROW;
            o->grow_to = ++queues[o->topic];
        } else {
            o->kind = OP_RESTART;
        }
    }
}

/* Deterministic content of attempt i of workload w. */
static void make_id(const workload *w, size_t i, uint8_t id[BRK_UUID_LEN])
{
    memset(id, 0, BRK_UUID_LEN);
    for (int b = 0; b < 6; b++)
        id[b] = (uint8_t)(w->seed >> (8 * b));
    id[6] = 0x70;       /* version 7 */
    id[8] = 0x80;       /* variant */
    id[12] = (uint8_t)(i >> 8);
    id[13] = (uint8_t)i;
    id[14] = 0xC5;
    id[15] = 0x3A;
}

static void make_body(const workload *w, size_t i, uint8_t *buf, size_t len)
{
    uint64_t r = w->seed * 1000003u + i;
    for (size_t k = 0; k < len; k++)
        buf[k] = (uint8_t)crash_rng_next(&r);
}

static bool id_attempt(const workload *w, const uint8_t id[BRK_UUID_LEN],
                       size_t *i)
{
    uint8_t want[BRK_UUID_LEN];
    *i = ((size_t)id[12] << 8) | id[13];
    if (*i >= w->nops)
        return false;
    make_id(w, *i, want);
    return memcmp(want, id, BRK_UUID_LEN) == 0;
}

typedef struct run {
    brk_sim *sim;
    brk_fake_clock clk;
    brk_store_opts o;
    brk_store *s;
    ack acks[MAX_OPS];
    uint16_t grown[2];  /* queues of a resize that returned OK, per topic */
    char err[256];
} run;

static void run_init(run *r, const workload *w, uint64_t sim_seed)
{
    memset(r, 0, sizeof *r);
    if (brk_sim_open(&r->sim, sim_seed) != BRK_OK)
        fail_msg("sim open");
    brk_fake_clock_init(&r->clk, 1700000000000LL);
    brk_store_opts_init(&r->o);
    r->o.io = brk_sim_io(r->sim);
    r->o.clock = &r->clk.clock;
    r->o.no_background = true;
    r->o.flush_mode = w->mode;
    r->o.segment_bytes = w->segment_bytes;
    r->o.cq_entries_per_file = 16;
    r->o.default_queues = 2;
    r->o.uuid_seed = 1;
}

static void mark_durable(run *r, size_t upto)
{
    for (size_t i = 0; i < upto; i++)
        if (r->acks[i].ok)
            r->acks[i].durable = true;
}

/* Run the workload; I/O may start failing at any point, which the
 * workload shrugs off (as a dying process would). */
static void run_workload(run *r, const workload *w)
{
    if (brk_store_open(&r->s, DIR, &r->o, r->err, sizeof r->err) != BRK_OK)
        return;
    uint8_t body[MAX_BODY];
    for (size_t i = 0; i < w->nops; i++) {
        const op *o = &w->ops[i];
        brk_fake_clock_advance(&r->clk, 3);
        switch (o->kind) {
        case OP_APPEND: {
            uint8_t id[BRK_UUID_LEN];
            char key[4] = "k0";
            make_id(w, i, id);
            make_body(w, i, body, o->body_len);
            brk_append_req q;
            memset(&q, 0, sizeof q);
            q.topic = topic_name(o->topic);
            q.queue = -1;
            if (o->key >= 0) {
                key[1] = (char)('0' + o->key);
                q.key = (brk_bytes){ key, 2 };
            }
            q.body = (brk_bytes){ body, o->body_len };
            q.msg_id = id;
            q.sync = o->sync;
            brk_append_res res;
            if (brk_store_append(r->s, &q, &res) == BRK_OK) {
                r->acks[i].ok = true;
                r->acks[i].queue = res.queue;
                r->acks[i].qoff = res.queue_offset;
                if (w->mode == BRK_FLUSH_SYNC || o->sync)
                    mark_durable(r, i + 1);
            }
            break;
        }
        case OP_FLUSH:
            if (brk_store_flush(r->s) == BRK_OK)
                mark_durable(r, i);
            break;
        case OP_CKPT:
            if (brk_store_checkpoint(r->s) == BRK_OK)
                mark_durable(r, i);
            break;
        case OP_GROW:
            /* The topic table is a state file written tmp -> fsync ->
             * rename -> fsync dir: an acknowledged resize must survive. */
            if (brk_topic_resize(r->s, topic_name(o->topic), o->grow_to, NULL)
                == BRK_OK)
                r->grown[o->topic] = o->grow_to;
            break;
        case OP_RESTART:
            if (brk_store_close(r->s) == BRK_OK)
                mark_durable(r, i);
            r->s = NULL;
            if (brk_store_open(&r->s, DIR, &r->o, r->err, sizeof r->err) != BRK_OK)
                return;
            break;
        }
    }
    if (brk_store_close(r->s) == BRK_OK)
        mark_durable(r, w->nops);
    r->s = NULL;
}

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (!(cond)) {                                                       \
            print_error("workload seed %llu crash point %llu mode %d: ",     \
                        (unsigned long long)w->seed,                         \
                        (unsigned long long)k, mode);                        \
            fail_msg(__VA_ARGS__);                                           \
        }                                                                    \
    } while (0)

static uint64_t g_records_checked, g_durable_checked;

static void verify(run *r, const workload *w, uint64_t k, int mode)
{
    brk_status st = brk_store_open(&r->s, DIR, &r->o, r->err, sizeof r->err);
    CHECK(st == BRK_OK, "reopen after crash failed: %s: %s",
          brk_status_name(st), r->err);
    bool seen[MAX_OPS] = { false };
    uint8_t body[MAX_BODY];
    for (int t = 0; t < 2; t++) {
        brk_topic_info ti;
        if (brk_topic_get(r->s, topic_name(t), &ti) != BRK_OK) {
            CHECK(r->grown[t] == 0, "topic %s was resized to %u queues but "
                  "is gone", topic_name(t), r->grown[t]);
            continue;
        }
        CHECK(ti.queues >= r->grown[t], "topic %s has %u queues; a resize to "
              "%u was acknowledged", topic_name(t), ti.queues, r->grown[t]);
        for (uint16_t q = 0; q < ti.queues; q++) {
            uint64_t min, max;
            CHECK(brk_store_queue_range(r->s, topic_name(t), q, &min, &max)
                  == BRK_OK, "queue range");
            CHECK(min == 0, "queue min %llu without retention",
                  (unsigned long long)min);
            uint64_t next = 0;
            size_t last_attempt = 0;
            bool any = false;
            while (next < max) {
                brk_batch *b = NULL;
                st = brk_store_read(r->s, topic_name(t), q, next, 64, &b);
                CHECK(st == BRK_OK, "read %s/%u@%llu: %s (%s)", topic_name(t),
                      q, (unsigned long long)next, brk_status_name(st),
                      brk_store_errstr(r->s));
                CHECK(b->count > 0, "empty read before max");
                for (size_t j = 0; j < b->count; j++) {
                    const brk_record *m = &b->recs[j];
                    size_t i;
                    CHECK(m->queue_offset == next, "gap: offset %llu, want %llu",
                          (unsigned long long)m->queue_offset,
                          (unsigned long long)next);
                    CHECK(id_attempt(w, m->msg_id, &i), "unknown message id");
                    const op *o = &w->ops[i];
                    CHECK(o->kind == OP_APPEND && o->topic == t,
                          "message in wrong topic");
                    CHECK(!seen[i], "message %zu appears twice", i);
                    seen[i] = true;
                    CHECK(!any || i > last_attempt, "queue order broken");
                    any = true;
                    last_attempt = i;
                    make_body(w, i, body, o->body_len);
                    CHECK(m->body.len == o->body_len
                          && memcmp(m->body.ptr, body, o->body_len) == 0,
                          "body of message %zu differs", i);
                    CHECK(m->key.len == (o->key >= 0 ? 2u : 0u), "key differs");
                    if (r->acks[i].ok)
                        CHECK(r->acks[i].queue == q && r->acks[i].qoff == next,
                              "acknowledged message %zu moved", i);
                    next++;
                    g_records_checked++;
                }
                brk_batch_free(b);
            }
        }
    }
    for (size_t i = 0; i < w->nops; i++) {
        g_durable_checked += r->acks[i].durable;
        CHECK(!r->acks[i].durable || seen[i],
              "durably acknowledged message %zu (topic %s queue %u offset %llu) "
              "is missing", i, topic_name(w->ops[i].topic), r->acks[i].queue,
              (unsigned long long)r->acks[i].qoff);
    }

    /* The recovered store works and survives a clean restart. */
    brk_append_req q;
    memset(&q, 0, sizeof q);
    q.topic = "a";
    q.queue = -1;
    q.body = (brk_bytes){ "after", 5 };
    brk_append_res res;
    CHECK(brk_store_append(r->s, &q, &res) == BRK_OK, "append after recovery");
    CHECK(brk_store_close(r->s) == BRK_OK, "clean close after recovery");
    r->s = NULL;
    st = brk_store_open(&r->s, DIR, &r->o, r->err, sizeof r->err);
    CHECK(st == BRK_OK, "second reopen: %s", r->err);
    brk_batch *b = NULL;
    CHECK(brk_store_read(r->s, "a", res.queue, res.queue_offset, 1, &b) == BRK_OK
          && b->count == 1 && b->recs[0].body.len == 5, "post-recovery append lost");
    brk_batch_free(b);
    brk_store_close(r->s);
    r->s = NULL;
}

static void crash_at_every_operation_keeps_acknowledged_appends(void **state)
{
    (void)state;
    uint64_t budget = crash_env_u64("BRK_CRASH_STATES", 20000);
    uint64_t seed = crash_env_u64("BRK_CRASH_SEED", 1);
    /* Replay one state of a failure report: BRK_CRASH_SEED=<workload seed>
     * BRK_CRASH_POINT=<crash point>. */
    uint64_t only_point = crash_env_u64("BRK_CRASH_POINT", UINT64_MAX);
    if (only_point != UINT64_MAX) {
        static workload w1;
        static run r1;
        int mode = (int)crash_env_u64("BRK_CRASH_MODE", 0);
        make_workload(&w1, seed);
        run_init(&r1, &w1, seed + only_point);
        brk_sim_set_crash_after(r1.sim, only_point);
        run_workload(&r1, &w1);
        assert_int_equal(brk_sim_crash(r1.sim, mode), BRK_OK);
        verify(&r1, &w1, only_point, mode);
        brk_sim_close(r1.sim);
        return;
    }
    uint64_t states = 0, workloads = 0, recovery_crashes = 0;
    static workload w;
    static run r;
    while (states < budget) {
        make_workload(&w, seed + workloads);
        /* Count the workload's operations on a clean run. */
        run_init(&r, &w, seed);
        run_workload(&r, &w);
        uint64_t n = brk_sim_ops(r.sim);
        brk_sim_close(r.sim);
        /* Every crash point when the budget allows, else an even sample;
         * 300 states per workload keeps workloads varied. */
        uint64_t per = budget - states < 300 ? budget - states : 300;
        uint64_t stride = n / per ? n / per : 1;
        uint64_t rs = w.seed ^ 0xABCDEF;
        for (uint64_t k = crash_rng_next(&rs) % stride; k < n && states < budget;
             k += stride) {
            int mode = (int)(crash_rng_next(&rs) % 3);
            run_init(&r, &w, w.seed + k);
            brk_sim_set_crash_after(r.sim, k);
            run_workload(&r, &w);
            if (brk_sim_crash(r.sim, mode) != BRK_OK)
                fail_msg("sim crash");
            if (crash_rng_next(&rs) % 10 == 0) {
                /* Crash again while recovering. */
                brk_sim_set_crash_after(r.sim, crash_rng_next(&rs) % 40);
                if (brk_store_open(&r.s, DIR, &r.o, r.err, sizeof r.err) == BRK_OK)
                    brk_store_close(r.s);
                r.s = NULL;
                if (brk_sim_crash(r.sim, (int)(crash_rng_next(&rs) % 3)) != BRK_OK)
                    fail_msg("sim crash");
                recovery_crashes++;
            }
            verify(&r, &w, k, mode);
            brk_sim_close(r.sim);
            states++;
        }
        workloads++;
    }
    print_message("crash exploration: %llu crash states over %llu workloads "
                  "(%llu with a second crash during recovery); %llu records "
                  "verified intact, %llu durable acknowledgements verified\n",
                  (unsigned long long)states, (unsigned long long)workloads,
                  (unsigned long long)recovery_crashes,
                  (unsigned long long)g_records_checked,
                  (unsigned long long)g_durable_checked);
    assert_true(states >= budget);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(crash_at_every_operation_keeps_acknowledged_appends),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
