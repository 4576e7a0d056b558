/*
 * test_delay.c - delayed delivery (broker/delay.h): levels and limits,
 * invisibility until due, delivery with every field, ordering, restart,
 * crash exploration (each acknowledged send delivered exactly once),
 * delivery failures and retries, compaction, retention, memory per pending
 * message, and concurrent senders with the background thread.
 *
 * Most tests run on the simulated disk with a fake clock and no background
 * threads, and call brk_delay_tick by hand.
 *
 * Environment:
 *   BRK_DELAY_CRASH_STATES  crash states explored (default 3000; 1000
 *                           under a sanitizer)
 *   BRK_DELAY_CRASH_SEED    first workload seed (default 1)
 *   BRK_DELAY_CRASH_POINT, BRK_DELAY_CRASH_MODE  replay one crash state of
 *                           workload BRK_DELAY_CRASH_SEED (from a failure)
 *   BRK_DELAY_MEM_COUNT     pending messages in the memory test (default
 *                           1000000; 100000 under a sanitizer)
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "broker/delay.h"
#include "broker/store.h"
#include "crash_util.h"
#include "fake_clock.h"
#include "io_sim.h"
#include "timerheap.h"
#include "tmpdir.h"

#define DIR "/d"
#define T0  1700000000000LL

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif
#ifndef UNDER_ASAN
#define UNDER_ASAN 0
#endif
#if defined(__SANITIZE_THREAD__)
#define UNDER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define UNDER_TSAN 1
#endif
#endif
#ifndef UNDER_TSAN
#define UNDER_TSAN 0
#endif
/* Sanitizers slow the big loops down 5-20x: smaller defaults there. */
#define UNDER_SAN (UNDER_ASAN || UNDER_TSAN)

/* ---- fixture --------------------------------------------------------------- */

typedef struct fx {
    brk_sim *sim;
    brk_fake_clock clk;
    brk_store_opts so;
    brk_delay_opts dopt;
    brk_store *s;
    brk_delay *d;
    char err[256];
} fx;

static int setup(void **state)
{
    fx *f = calloc(1, sizeof *f);
    assert_non_null(f);
    assert_int_equal(brk_sim_open(&f->sim, 42), BRK_OK);
    brk_fake_clock_init(&f->clk, T0);
    brk_store_opts_init(&f->so);
    f->so.io = brk_sim_io(f->sim);
    f->so.clock = &f->clk.clock;
    f->so.no_background = true;
    f->so.flush_mode = BRK_FLUSH_SYNC;
    f->so.uuid_seed = 7;
    brk_delay_opts_init(&f->dopt);
    f->dopt.no_background = true;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    brk_delay_close(f->d);
    brk_store_close(f->s);
    brk_sim_close(f->sim);
    free(f);
    return 0;
}

static void open_all(fx *f)
{
    f->so.uuid_seed++;   /* reproducible ids, not repeated after a reopen */
    brk_status st = brk_store_open(&f->s, DIR, &f->so, f->err, sizeof f->err);
    if (st != BRK_OK)
        fail_msg("store open: %s: %s", brk_status_name(st), f->err);
    st = brk_delay_open(&f->d, f->s, &f->dopt, f->err, sizeof f->err);
    if (st != BRK_OK)
        fail_msg("delay open: %s: %s", brk_status_name(st), f->err);
}

static void close_all(fx *f)
{
    assert_int_equal(brk_delay_close(f->d), BRK_OK);
    f->d = NULL;
    assert_int_equal(brk_store_close(f->s), BRK_OK);
    f->s = NULL;
}

static void reopen_all(fx *f)
{
    close_all(f);
    open_all(f);
}

static brk_status send_full(fx *f, const char *topic, const char *key,
                            const char *body, int64_t at, brk_delay_res *res)
{
    brk_append_req r;
    memset(&r, 0, sizeof r);
    r.topic = topic;
    r.queue = -1;
    r.key = (brk_bytes){ key, key ? strlen(key) : 0 };
    r.body = (brk_bytes){ body, strlen(body) };
    brk_delay_res tmp;
    return brk_delay_send(f->d, &r, at, res ? res : &tmp);
}

static brk_status send_in(fx *f, const char *topic, const char *body,
                          int64_t delay_ms, brk_delay_res *res)
{
    int64_t now = f->clk.clock.now_ms(f->clk.clock.ctx);
    return send_full(f, topic, NULL, body, now + delay_ms, res);
}

static int64_t now_of(fx *f)
{
    return f->clk.clock.now_ms(f->clk.clock.ctx);
}

static unsigned tick(fx *f)
{
    unsigned n = 0;
    (void)brk_delay_tick(f->d, &n);
    return n;
}

/* Messages visible in `topic` over all its queues (0 if it does not exist). */
static uint64_t visible(brk_store *s, const char *topic)
{
    brk_topic_info ti;
    if (brk_topic_get(s, topic, &ti) != BRK_OK)
        return 0;
    uint64_t total = 0;
    for (uint16_t q = 0; q < ti.queues; q++) {
        uint64_t min, max;
        assert_int_equal(brk_store_queue_range(s, topic, q, &min, &max), BRK_OK);
        total += max - min;
    }
    return total;
}

/* Every record of `topic`, all queues, queue by queue; caller frees with
 * free_recs.  Each batch owns its records' bytes, so batches are kept. */
typedef struct recs {
    brk_batch **b;
    size_t nb;
    const brk_record **r;
    size_t n;
} recs;

static void read_topic(brk_store *s, const char *topic, recs *out)
{
    memset(out, 0, sizeof *out);
    brk_topic_info ti;
    if (brk_topic_get(s, topic, &ti) != BRK_OK)
        return;
    for (uint16_t q = 0; q < ti.queues; q++) {
        uint64_t min, max;
        assert_int_equal(brk_store_queue_range(s, topic, q, &min, &max), BRK_OK);
        uint64_t next = min;
        while (next < max) {
            brk_batch *b = NULL;
            assert_int_equal(brk_store_read(s, topic, q, next, 512, &b), BRK_OK);
            assert_true(b->count > 0);
            out->b = realloc(out->b, (out->nb + 1) * sizeof *out->b);
            out->b[out->nb++] = b;
            out->r = realloc(out->r, (out->n + b->count) * sizeof *out->r);
            for (size_t i = 0; i < b->count; i++)
                out->r[out->n++] = &b->recs[i];
            next = b->next_offset;
        }
    }
}

static void free_recs(recs *r)
{
    for (size_t i = 0; i < r->nb; i++)
        brk_batch_free(r->b[i]);
    free(r->b);
    free(r->r);
    memset(r, 0, sizeof *r);
}

static brk_delay_stats stats(fx *f)
{
    brk_delay_stats st;
    brk_delay_get_stats(f->d, &st);
    return st;
}

/* ---- levels, options, input checks --------------------------------------------- */

static void levels_match_rocketmq_and_others_are_invalid(void **state)
{
    (void)state;
    static const int64_t want[BRK_DELAY_LEVELS] = {
        1000, 5000, 10000, 30000, 60000, 120000, 180000, 240000, 300000,
        360000, 420000, 480000, 540000, 600000, 1200000, 1800000, 3600000,
        7200000
    };
    for (int l = 1; l <= BRK_DELAY_LEVELS; l++)
        assert_int_equal(brk_delay_level_ms(l), want[l - 1]);
    assert_int_equal(brk_delay_level_ms(0), -1);
    assert_int_equal(brk_delay_level_ms(-1), -1);
    assert_int_equal(brk_delay_level_ms(19), -1);
    assert_int_equal(brk_delay_level_ms(1000), -1);
}

static void opts_init_gives_documented_defaults(void **state)
{
    (void)state;
    brk_delay_opts o;
    memset(&o, 0xAB, sizeof o);
    brk_delay_opts_init(&o);
    assert_int_equal(o.max_delay_ms, 40LL * 24 * 3600 * 1000);
    assert_int_equal(o.fire_batch, 256);
    assert_int_equal(o.compact_after_ms, 24LL * 3600 * 1000);
    assert_int_equal(o.state_interval_ms, 1000);
    assert_false(o.no_background);
}

static void send_with_level_delay_fires_at_level_time(void **state)
{
    fx *f = *state;
    open_all(f);
    for (int l = 1; l <= BRK_DELAY_LEVELS; l++) {
        char body[8];
        snprintf(body, sizeof body, "%d", l);
        assert_int_equal(send_in(f, "lv", body, brk_delay_level_ms(l), NULL),
                         BRK_OK);
    }
    int64_t start = now_of(f);
    for (int l = 1; l <= BRK_DELAY_LEVELS; l++) {
        int64_t due = start + brk_delay_level_ms(l);
        brk_fake_clock_set_wall(&f->clk, due - 1);
        assert_int_equal(tick(f), 0);
        brk_fake_clock_set_wall(&f->clk, due);
        assert_int_equal(tick(f), 1);
        assert_int_equal(visible(f->s, "lv"), (uint64_t)l);
    }
}

static void delayed_message_is_invisible_until_due_then_arrives_intact(void **state)
{
    fx *f = *state;
    open_all(f);
    assert_int_equal(brk_topic_create(f->s, "orders", 1), BRK_OK);
    brk_prop props[2] = {
        { { "traceparent", 11 }, { "00-abc-def-01", 13 } },
        { { "x-user", 6 }, { "", 0 } },
    };
    uint8_t pbuf[256];
    size_t plen = 0;
    assert_int_equal(brk_props_encode(props, 2, pbuf, sizeof pbuf, &plen), BRK_OK);
    brk_append_req r;
    memset(&r, 0, sizeof r);
    r.topic = "orders";
    r.queue = -1;
    r.key = (brk_bytes){ "order-1", 7 };
    r.tag = (brk_bytes){ "created", 7 };
    r.props = (brk_bytes){ pbuf, plen };
    r.body = (brk_bytes){ "{\"a\":1}", 7 };
    r.flags = BRK_RECF_BODY_JSON;
    r.born_ms = 1234;
    brk_delay_res res;
    int64_t due = now_of(f) + 5000;
    assert_int_equal(brk_delay_send(f->d, &r, due, &res), BRK_OK);
    assert_true(res.delayed);
    assert_int_equal(res.deliver_at_ms, due);
    assert_int_equal(stats(f).pending, 1);
    assert_int_equal(stats(f).scheduled_total, 1);
    int64_t nd = 0;
    assert_true(brk_delay_next_due(f->d, &nd));
    assert_int_equal(nd, due);

    brk_fake_clock_advance(&f->clk, 4999);
    assert_int_equal(tick(f), 0);
    uint64_t min, max;
    assert_int_equal(brk_store_queue_range(f->s, "orders", 0, &min, &max), BRK_OK);
    assert_int_equal(max, 0);

    brk_fake_clock_advance(&f->clk, 1);
    assert_int_equal(tick(f), 1);
    assert_int_equal(brk_store_queue_range(f->s, "orders", 0, &min, &max), BRK_OK);
    assert_int_equal(max, 1);
    brk_batch *b = NULL;
    assert_int_equal(brk_store_read(f->s, "orders", 0, 0, 10, &b), BRK_OK);
    assert_int_equal(b->count, 1);
    const brk_record *m = &b->recs[0];
    assert_memory_equal(m->msg_id, res.msg_id, BRK_UUID_LEN);
    assert_int_equal(m->type, BRK_REC_MSG);
    assert_int_equal(m->key.len, 7);
    assert_memory_equal(m->key.ptr, "order-1", 7);
    assert_int_equal(m->tag.len, 7);
    assert_memory_equal(m->tag.ptr, "created", 7);
    assert_int_equal(m->body.len, 7);
    assert_memory_equal(m->body.ptr, "{\"a\":1}", 7);
    assert_int_equal(m->flags, BRK_RECF_BODY_JSON);
    assert_int_equal(m->born_ms, 1234);
    assert_true(m->store_ms >= due);
    /* Headers: the user's pairs, in order, and no system pair. */
    assert_int_equal(m->props.len, plen);
    assert_memory_equal(m->props.ptr, pbuf, plen);
    assert_false(brk_props_has_sys(m->props));
    brk_batch_free(b);

    brk_delay_stats st = stats(f);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.fired_total, 1);
    assert_int_equal(st.next_due_ms, 0);
    assert_false(brk_delay_next_due(f->d, &nd));
    /* Nothing fires twice. */
    brk_fake_clock_advance(&f->clk, 100000);
    assert_int_equal(tick(f), 0);
    assert_int_equal(visible(f->s, "orders"), 1);
}

static void delayed_message_keeps_given_msg_id_and_new_ones_get_one(void **state)
{
    fx *f = *state;
    open_all(f);
    uint8_t id[BRK_UUID_LEN] = { 1, 2, 3, 4, 5, 6, 0x70, 8, 0x80, 10, 11, 12, 13,
                                 14, 15, 16 };
    brk_append_req r;
    memset(&r, 0, sizeof r);
    r.topic = "ids";
    r.queue = -1;
    r.body = (brk_bytes){ "x", 1 };
    r.msg_id = id;
    brk_delay_res res1, res2;
    assert_int_equal(brk_delay_send(f->d, &r, now_of(f) + 10, &res1), BRK_OK);
    assert_memory_equal(res1.msg_id, id, BRK_UUID_LEN);
    r.msg_id = NULL;
    assert_int_equal(brk_delay_send(f->d, &r, now_of(f) + 10, &res2), BRK_OK);
    assert_memory_not_equal(res2.msg_id, id, BRK_UUID_LEN);
    brk_fake_clock_advance(&f->clk, 10);
    assert_int_equal(tick(f), 2);
    recs rs;
    read_topic(f->s, "ids", &rs);
    assert_int_equal(rs.n, 2);
    bool seen1 = false, seen2 = false;
    for (size_t i = 0; i < rs.n; i++) {
        seen1 |= memcmp(rs.r[i]->msg_id, res1.msg_id, BRK_UUID_LEN) == 0;
        seen2 |= memcmp(rs.r[i]->msg_id, res2.msg_id, BRK_UUID_LEN) == 0;
    }
    assert_true(seen1 && seen2);
    free_recs(&rs);
}

static void send_due_now_or_past_appends_directly(void **state)
{
    fx *f = *state;
    open_all(f);
    brk_delay_res res;
    assert_int_equal(send_full(f, "now", "k", "a", now_of(f), &res), BRK_OK);
    assert_false(res.delayed);
    assert_int_equal(res.queue_offset, 0);
    assert_int_equal(send_full(f, "now", "k", "b", now_of(f) - 60000, &res),
                     BRK_OK);
    assert_false(res.delayed);
    assert_int_equal(res.queue_offset, 1);
    assert_int_equal(visible(f->s, "now"), 2);
    brk_batch *b = NULL;
    assert_int_equal(brk_store_read(f->s, "now", res.queue, 1, 1, &b), BRK_OK);
    assert_memory_equal(b->recs[0].msg_id, res.msg_id, BRK_UUID_LEN);
    brk_batch_free(b);
    brk_delay_stats st = stats(f);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.scheduled_total, 0);
    assert_int_equal(visible(f->s, BRK_DELAY_TOPIC), 0);
}

static void delay_ms_beyond_max_is_range_and_max_itself_is_accepted(void **state)
{
    fx *f = *state;
    open_all(f);
    assert_int_equal(send_in(f, "far", "x", BRK_DELAY_MAX_DEFAULT_MS + 1, NULL),
                     BRK_RANGE);
    assert_int_equal(send_in(f, "far", "x", INT64_MAX - now_of(f), NULL),
                     BRK_RANGE);
    assert_int_equal(send_in(f, "far", "x", BRK_DELAY_MAX_DEFAULT_MS, NULL),
                     BRK_OK);
    close_all(f);
    f->dopt.max_delay_ms = 60000;
    open_all(f);
    assert_int_equal(send_in(f, "far", "x", 60001, NULL), BRK_RANGE);
    assert_int_equal(send_in(f, "far", "x", 60000, NULL), BRK_OK);
    assert_int_equal(stats(f).pending, 2);
}

static void invalid_sends_are_refused_and_leave_nothing(void **state)
{
    fx *f = *state;
    open_all(f);
    int64_t at = now_of(f) + 1000;
    brk_append_req r;
    brk_delay_res res;
    memset(&r, 0, sizeof r);
    r.queue = -1;
    r.body = (brk_bytes){ "x", 1 };

    /* System properties in the user's headers. */
    brk_prop sys = { { "\x1ftopic", 6 }, { "other", 5 } };
    uint8_t pbuf[64];
    size_t plen = 0;
    assert_int_equal(brk_props_encode(&sys, 1, pbuf, sizeof pbuf, &plen), BRK_OK);
    r.topic = "t";
    r.props = (brk_bytes){ pbuf, plen };
    assert_int_equal(brk_delay_send(f->d, &r, at, &res), BRK_INVAL);
    /* ... also on the direct path. */
    assert_int_equal(brk_delay_send(f->d, &r, now_of(f), &res), BRK_INVAL);
    r.props = (brk_bytes){ "\x05\x00", 2 };   /* malformed block */
    assert_int_equal(brk_delay_send(f->d, &r, at, &res), BRK_INVAL);
    r.props = (brk_bytes){ NULL, 0 };

    const char *bad[] = { "__delay", "__orders", "", "a/b", ".hidden", "..",
                          "sp ace" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        r.topic = bad[i];
        assert_int_equal(brk_delay_send(f->d, &r, at, &res), BRK_INVAL);
    }
    r.topic = NULL;
    assert_int_equal(brk_delay_send(f->d, &r, at, &res), BRK_INVAL);
    r.topic = "t";
    r.queue = 0;
    assert_int_equal(brk_delay_send(f->d, &r, at, &res), BRK_INVAL);
    r.queue = -1;
    r.type = BRK_REC_OP;
    assert_int_equal(brk_delay_send(f->d, &r, at, &res), BRK_INVAL);
    r.type = 0;
    r.flags = 1u << 30;
    assert_int_equal(brk_delay_send(f->d, &r, at, &res), BRK_INVAL);
    r.flags = 0;
    assert_int_equal(brk_delay_send(f->d, NULL, at, &res), BRK_INVAL);

    assert_int_equal(stats(f).pending, 0);
    assert_int_equal(visible(f->s, BRK_DELAY_TOPIC), 0);
    brk_topic_info ti;
    assert_int_equal(brk_topic_get(f->s, "t", &ti), BRK_NOTFOUND);
}

static void unknown_topic_is_notfound_only_without_auto_create(void **state)
{
    fx *f = *state;
    open_all(f);
    assert_int_equal(send_in(f, "fresh", "x", 1000, NULL), BRK_OK);
    close_all(f);
    f->so.auto_create_topics = false;
    open_all(f);
    assert_int_equal(send_in(f, "never", "x", 1000, NULL), BRK_NOTFOUND);
    assert_int_equal(send_in(f, "never", "x", 0, NULL), BRK_NOTFOUND);
    assert_int_equal(brk_topic_create(f->s, "made", 2), BRK_OK);
    assert_int_equal(send_in(f, "made", "x", 1000, NULL), BRK_OK);
    assert_int_equal(stats(f).pending, 2);
}

/* ---- ordering -------------------------------------------------------------------- */

static void equal_due_times_fire_in_send_order(void **state)
{
    fx *f = *state;
    f->dopt.fire_batch = 7;   /* several ops for one due time */
    open_all(f);
    assert_int_equal(brk_topic_create(f->s, "eq", 1), BRK_OK);
    int64_t due = now_of(f) + 3000;
    for (int i = 0; i < 50; i++) {
        char body[16];
        snprintf(body, sizeof body, "%d", i);
        /* A later-due message between them must not disturb the order. */
        if (i == 25)
            assert_int_equal(send_full(f, "eq", NULL, "late", due + 1, NULL),
                             BRK_OK);
        assert_int_equal(send_full(f, "eq", NULL, body, due, NULL), BRK_OK);
    }
    brk_fake_clock_advance(&f->clk, 3001);
    assert_int_equal(tick(f), 51);
    brk_batch *b = NULL;
    assert_int_equal(brk_store_read(f->s, "eq", 0, 0, 100, &b), BRK_OK);
    assert_int_equal(b->count, 51);
    for (int i = 0; i < 50; i++) {
        char body[16];
        snprintf(body, sizeof body, "%d", i);
        assert_int_equal(b->recs[i].body.len, strlen(body));
        assert_memory_equal(b->recs[i].body.ptr, body, strlen(body));
    }
    assert_memory_equal(b->recs[50].body.ptr, "late", 4);
    brk_batch_free(b);
}

static void random_due_times_fire_in_due_order_and_never_early(void **state)
{
    fx *f = *state;
    f->so.flush_mode = BRK_FLUSH_ASYNC;
    f->dopt.fire_batch = 16;
    open_all(f);
    assert_int_equal(brk_topic_create(f->s, "rnd", 1), BRK_OK);
    enum { N = 2000 };
    uint64_t r = 99;
    int64_t start = now_of(f);
    for (int i = 0; i < N; i++) {
        char body[32];
        int64_t due = start + 1 + (int64_t)(crash_rng_next(&r) % 60000);
        snprintf(body, sizeof body, "%" PRId64, due);
        assert_int_equal(send_full(f, "rnd", NULL, body, due, NULL), BRK_OK);
    }
    unsigned total = 0;
    while (total < N) {
        brk_fake_clock_advance(&f->clk, 1 + (int64_t)(crash_rng_next(&r) % 700));
        total += tick(f);
        assert_true(now_of(f) < start + 200000);
    }
    recs rs;
    read_topic(f->s, "rnd", &rs);
    assert_int_equal(rs.n, N);
    int64_t prev = 0;
    for (size_t i = 0; i < rs.n; i++) {
        char body[32] = { 0 };
        memcpy(body, rs.r[i]->body.ptr, rs.r[i]->body.len);
        int64_t due = strtoll(body, NULL, 10);
        assert_true(due >= prev);           /* due order */
        assert_true(rs.r[i]->store_ms >= due);   /* never early */
        prev = due;
    }
    free_recs(&rs);
}

/* ---- restart ----------------------------------------------------------------------- */

static void restart_fires_due_timers_once_and_keeps_later_ones_waiting(void **state)
{
    fx *f = *state;
    open_all(f);
    assert_int_equal(brk_topic_create(f->s, "rs", 1), BRK_OK);
    for (int i = 0; i < 10; i++) {
        char body[8];
        snprintf(body, sizeof body, "%d", i);
        assert_int_equal(send_in(f, "rs", body, 1000 * (i + 1), NULL), BRK_OK);
    }
    /* Fire the first three, then restart before and after a state save. */
    brk_fake_clock_advance(&f->clk, 3000);
    assert_int_equal(tick(f), 3);
    reopen_all(f);
    assert_int_equal(stats(f).pending, 7);
    int64_t nd;
    assert_true(brk_delay_next_due(f->d, &nd));
    assert_int_equal(nd, T0 + 4000);
    assert_int_equal(tick(f), 0);

    /* Due while down: fire once after reopen. */
    brk_fake_clock_advance(&f->clk, 2000);
    reopen_all(f);
    assert_int_equal(stats(f).pending, 7);
    assert_int_equal(tick(f), 2);
    assert_int_equal(visible(f->s, "rs"), 5);
    reopen_all(f);
    assert_int_equal(stats(f).pending, 5);
    assert_int_equal(tick(f), 0);
    brk_fake_clock_advance(&f->clk, 10000);
    assert_int_equal(tick(f), 5);
    reopen_all(f);
    assert_int_equal(stats(f).pending, 0);
    assert_int_equal(tick(f), 0);
    assert_int_equal(visible(f->s, "rs"), 10);

    brk_batch *b = NULL;
    assert_int_equal(brk_store_read(f->s, "rs", 0, 0, 100, &b), BRK_OK);
    assert_int_equal(b->count, 10);
    for (int i = 0; i < 10; i++)
        assert_int_equal(((const char *)b->recs[i].body.ptr)[0], '0' + i);
    brk_batch_free(b);
}

static void restart_without_clean_close_rebuilds_from_the_log(void **state)
{
    fx *f = *state;
    f->dopt.state_interval_ms = 100;
    open_all(f);
    for (int i = 0; i < 20; i++)
        assert_int_equal(send_in(f, "nc", "x", 1000 + 100 * i, NULL), BRK_OK);
    brk_fake_clock_advance(&f->clk, 1500);
    assert_int_equal(tick(f), 6);          /* saves state too */
    brk_fake_clock_advance(&f->clk, 300);
    assert_int_equal(tick(f), 3);
    /* Power loss: the delay never closes, the disk keeps what was synced. */
    brk_sim_set_crash_after(f->sim, 0);
    brk_delay_close(f->d);
    f->d = NULL;
    brk_store_close(f->s);
    f->s = NULL;
    assert_int_equal(brk_sim_crash(f->sim, BRK_SIM_DROP_ALL), BRK_OK);
    open_all(f);
    assert_int_equal(stats(f).pending, 11);
    brk_fake_clock_advance(&f->clk, 10000);
    assert_int_equal(tick(f), 11);
    assert_int_equal(visible(f->s, "nc"), 20);
}

static void restart_of_many_pending_rebuilds_each_timer(void **state)
{
    fx *f = *state;
    f->so.flush_mode = BRK_FLUSH_ASYNC;
    f->so.segment_bytes = 1 << 20;
    open_all(f);
    enum { N = 20000 };
    uint64_t r = 5;
    int64_t start = now_of(f);
    for (int i = 0; i < N; i++) {
        char body[16];
        snprintf(body, sizeof body, "%d", i);
        int64_t due = start + 1000 + (int64_t)(crash_rng_next(&r) % 100000);
        assert_int_equal(send_full(f, "many", NULL, body, due, NULL), BRK_OK);
    }
    /* Fire about a third, then restart twice (the second without changes). */
    brk_fake_clock_advance(&f->clk, 34000);
    unsigned first = tick(f);
    assert_true(first > N / 4 && first < N / 2);
    int64_t nd_before;
    assert_true(brk_delay_next_due(f->d, &nd_before));
    reopen_all(f);
    reopen_all(f);
    assert_int_equal(stats(f).pending, N - first);
    int64_t nd_after;
    assert_true(brk_delay_next_due(f->d, &nd_after));
    assert_int_equal(nd_after, nd_before);
    brk_fake_clock_advance(&f->clk, 100000);
    assert_int_equal(tick(f), N - first);
    assert_int_equal(visible(f->s, "many"), N);
}

/* ---- failures and retries --------------------------------------------------------- */

static void delivery_to_missing_topic_retries_and_delivers_once(void **state)
{
    fx *f = *state;
    open_all(f);
    assert_int_equal(send_in(f, "gone", "x", 1000, NULL), BRK_OK);
    assert_int_equal(send_in(f, "there", "y", 1000, NULL), BRK_OK);
    close_all(f);
    /* The target topic was never created, and now cannot be by an append. */
    f->so.auto_create_topics = false;
    open_all(f);
    assert_int_equal(brk_topic_create(f->s, "there", 1), BRK_OK);
    brk_fake_clock_advance(&f->clk, 1000);
    unsigned n = 0;
    assert_int_equal(brk_delay_tick(f->d, &n), BRK_NOTFOUND);
    assert_int_equal(n, 1);                /* the other one went through */
    brk_delay_stats st = stats(f);
    assert_int_equal(st.pending, 1);
    assert_int_equal(st.errors_total, 1);
    assert_int_equal(st.fired_total, 1);
    assert_int_equal(visible(f->s, "there"), 1);

    /* A restart right after the failure keeps it pending: the op that
     * named it is older than the delivery that went through after it. */
    reopen_all(f);
    assert_int_equal(stats(f).pending, 1);
    assert_int_equal(brk_delay_tick(f->d, &n), BRK_NOTFOUND);
    assert_int_equal(n, 0);
    assert_int_equal(stats(f).errors_total, 1);

    /* Backoff: nothing before it, another failure after it. */
    assert_int_equal(tick(f), 0);
    assert_int_equal(stats(f).errors_total, 1);
    brk_fake_clock_advance(&f->clk, 150);
    assert_int_equal(tick(f), 0);
    assert_int_equal(stats(f).errors_total, 2);

    /* A restart while it is in the retry list keeps it, once. */
    reopen_all(f);
    assert_int_equal(stats(f).pending, 1);
    assert_int_equal(brk_topic_create(f->s, "gone", 1), BRK_OK);
    assert_int_equal(tick(f), 1);
    assert_int_equal(stats(f).pending, 0);
    assert_int_equal(visible(f->s, "gone"), 1);
    brk_fake_clock_advance(&f->clk, 60000);
    assert_int_equal(tick(f), 0);
    reopen_all(f);
    brk_fake_clock_advance(&f->clk, 60000);
    assert_int_equal(tick(f), 0);
    assert_int_equal(visible(f->s, "gone"), 1);
    assert_int_equal(visible(f->s, "there"), 1);
}

/* Store full: first the op cannot be written, later the delivery cannot;
 * retention frees room and the message arrives once. */
static void delivery_failure_when_store_is_full_retries_and_delivers_once(void **state)
{
    fx *f = *state;
    f->so.segment_bytes = 4096;
    f->so.retention_ms = 1000;
    f->dopt.state_interval_ms = 10;
    open_all(f);
    assert_int_equal(brk_topic_create(f->s, "full", 1), BRK_OK);
    /* Old data that retention may drop once we are full. */
    char junk[1000];
    memset(junk, 'j', sizeof junk);
    junk[sizeof junk - 1] = '\0';
    for (int i = 0; i < 12; i++) {
        brk_append_req q;
        memset(&q, 0, sizeof q);
        q.topic = "junk";
        q.queue = -1;
        q.body = (brk_bytes){ junk, strlen(junk) };
        brk_append_res ar;
        assert_int_equal(brk_store_append(f->s, &q, &ar), BRK_OK);
    }
    brk_fake_clock_advance(&f->clk, 5000);
    brk_delay_res res;
    assert_int_equal(send_in(f, "full", junk, 1000, &res), BRK_OK);
    brk_fake_clock_advance(&f->clk, 20);
    assert_int_equal(tick(f), 0);           /* saves state: cursor moves */
    close_all(f);

    brk_store_stats ss;
    assert_int_equal(brk_store_open(&f->s, DIR, &f->so, f->err, sizeof f->err),
                     BRK_OK);
    brk_store_get_stats(f->s, &ss);
    brk_store_close(f->s);
    f->s = NULL;
    /* Room for nothing: the op append fails. */
    f->so.disk_budget_bytes = ss.disk_bytes + 16;
    open_all(f);
    brk_fake_clock_advance(&f->clk, 1000);
    unsigned n = 0;
    assert_int_equal(brk_delay_tick(f->d, &n), BRK_FULL);
    assert_int_equal(n, 0);
    assert_int_equal(stats(f).pending, 1);
    assert_int_equal(stats(f).errors_total, 1);
    assert_int_equal(visible(f->s, "full"), 0);
    close_all(f);

    /* Room for the op but not the delivery. */
    assert_int_equal(brk_store_open(&f->s, DIR, &f->so, f->err, sizeof f->err),
                     BRK_OK);
    brk_store_get_stats(f->s, &ss);
    brk_store_close(f->s);
    f->s = NULL;
    f->so.disk_budget_bytes = ss.disk_bytes + 400;
    open_all(f);
    assert_int_equal(brk_delay_tick(f->d, &n), BRK_FULL);
    assert_int_equal(n, 0);
    assert_int_equal(stats(f).pending, 1);
    assert_int_equal(visible(f->s, BRK_DELAY_OP_TOPIC), 1);
    assert_int_equal(visible(f->s, "full"), 0);
    brk_fake_clock_advance(&f->clk, 150);
    assert_int_equal(brk_delay_tick(f->d, &n), BRK_FULL);   /* retried */
    assert_true(stats(f).errors_total >= 2);

    /* Retention frees the old segments (the delay's cursor allows it). */
    unsigned deleted = 0;
    assert_int_equal(brk_store_retention_run(f->s, &deleted), BRK_OK);
    assert_true(deleted >= 2);
    brk_fake_clock_advance(&f->clk, 60000);
    assert_int_equal(tick(f), 1);
    assert_int_equal(stats(f).pending, 0);
    recs rs;
    read_topic(f->s, "full", &rs);
    assert_int_equal(rs.n, 1);
    assert_memory_equal(rs.r[0]->msg_id, res.msg_id, BRK_UUID_LEN);
    free_recs(&rs);
    reopen_all(f);
    brk_fake_clock_advance(&f->clk, 60000);
    assert_int_equal(tick(f), 0);
    assert_int_equal(visible(f->s, "full"), 1);
}

static void failed_delivery_before_restart_is_delivered_once_after(void **state)
{
    fx *f = *state;
    open_all(f);
    char body[1200];
    memset(body, 'b', sizeof body);
    body[sizeof body - 1] = '\0';
    assert_int_equal(send_in(f, "late", body, 1000, NULL), BRK_OK);
    close_all(f);
    brk_store_stats ss;
    assert_int_equal(brk_store_open(&f->s, DIR, &f->so, f->err, sizeof f->err),
                     BRK_OK);
    brk_store_get_stats(f->s, &ss);
    brk_store_close(f->s);
    f->s = NULL;
    f->so.disk_budget_bytes = ss.disk_bytes + 400;
    open_all(f);
    brk_fake_clock_advance(&f->clk, 1000);
    assert_int_equal(tick(f), 0);
    assert_int_equal(visible(f->s, BRK_DELAY_OP_TOPIC), 1);
    assert_int_equal(visible(f->s, "late"), 0);
    close_all(f);
    f->so.disk_budget_bytes = 0;
    open_all(f);
    assert_int_equal(stats(f).pending, 1);
    assert_int_equal(tick(f), 1);
    assert_int_equal(visible(f->s, "late"), 1);
    reopen_all(f);
    assert_int_equal(stats(f).pending, 0);
    brk_fake_clock_advance(&f->clk, 60000);
    assert_int_equal(tick(f), 0);
    assert_int_equal(visible(f->s, "late"), 1);
}

/* ---- compaction and retention ------------------------------------------------------ */

static void compaction_copies_old_pending_records_that_still_fire_once(void **state)
{
    fx *f = *state;
    f->dopt.compact_after_ms = 10000;
    open_all(f);
    assert_int_equal(brk_topic_create(f->s, "cp", 1), BRK_OK);
    brk_delay_res res[5];
    for (int i = 0; i < 5; i++) {
        char body[8];
        snprintf(body, sizeof body, "%d", i);
        assert_int_equal(send_full(f, "cp", "k", body, T0 + 60000 + i, &res[i]),
                         BRK_OK);
        brk_fake_clock_advance(&f->clk, 1000);
    }
    /* t = +5 s: nothing old enough.  t = +12.5 s: the first three. */
    assert_int_equal(tick(f), 0);
    assert_int_equal(stats(f).compacted_total, 0);
    brk_fake_clock_advance(&f->clk, 7500);
    assert_int_equal(tick(f), 0);
    assert_int_equal(stats(f).compacted_total, 3);
    assert_int_equal(stats(f).pending, 5);
    assert_int_equal(visible(f->s, BRK_DELAY_TOPIC), 8);
    reopen_all(f);
    assert_int_equal(stats(f).pending, 5);
    /* Copies of copies, across another restart. */
    brk_fake_clock_advance(&f->clk, 25000);
    assert_int_equal(tick(f), 0);
    assert_true(stats(f).compacted_total >= 5);
    reopen_all(f);
    assert_int_equal(stats(f).pending, 5);
    int64_t nd;
    assert_true(brk_delay_next_due(f->d, &nd));
    assert_int_equal(nd, T0 + 60000);
    brk_fake_clock_set_wall(&f->clk, T0 + 60004);
    assert_int_equal(tick(f), 5);
    reopen_all(f);
    brk_fake_clock_advance(&f->clk, 100000);
    assert_int_equal(tick(f), 0);
    recs rs;
    read_topic(f->s, "cp", &rs);
    assert_int_equal(rs.n, 5);
    for (int i = 0; i < 5; i++) {
        assert_memory_equal(rs.r[i]->msg_id, res[i].msg_id, BRK_UUID_LEN);
        assert_int_equal(((const char *)rs.r[i]->body.ptr)[0], '0' + i);
        assert_int_equal(rs.r[i]->key.len, 1);
        assert_false(brk_props_has_sys(rs.r[i]->props));
    }
    free_recs(&rs);
}

static void retention_keeps_segments_holding_pending_records(void **state)
{
    fx *f = *state;
    f->so.segment_bytes = 4096;
    f->so.retention_ms = 1000;
    f->dopt.compact_after_ms = 0;     /* never: only the cursor protects */
    f->dopt.state_interval_ms = 10;
    open_all(f);
    char body[600];
    memset(body, 'p', sizeof body);
    body[sizeof body - 1] = '\0';
    assert_int_equal(send_in(f, "keep", body, 3600000, NULL), BRK_OK);
    /* Lots of traffic after it, fired and plain. */
    for (int i = 0; i < 40; i++) {
        assert_int_equal(send_in(f, "short", body, 10, NULL), BRK_OK);
        brk_fake_clock_advance(&f->clk, 20);
        tick(f);
    }
    assert_int_equal(visible(f->s, "short"), 40);
    brk_fake_clock_advance(&f->clk, 10000);
    tick(f);
    unsigned deleted = 0;
    assert_int_equal(brk_store_retention_run(f->s, &deleted), BRK_OK);
    assert_int_equal(deleted, 0);     /* the oldest segment is pinned */
    brk_fake_clock_set_wall(&f->clk, T0 + 3600000 + 100000);
    assert_int_equal(tick(f), 1);
    assert_int_equal(visible(f->s, "keep"), 1);
    /* Now everything below may go. */
    brk_fake_clock_advance(&f->clk, 100);
    tick(f);
    assert_int_equal(brk_store_retention_run(f->s, &deleted), BRK_OK);
    assert_true(deleted > 0);
    reopen_all(f);
    assert_int_equal(stats(f).pending, 0);
}

/* ---- crash exploration --------------------------------------------------------------- */

#define CR_MAX_OPS  40
#define CR_TOPICS   2

enum { CR_SEND, CR_SEND_NOW, CR_ADVANCE, CR_TICK, CR_FLUSH, CR_RESTART };

typedef struct cr_op {
    int kind;
    int topic;
    int64_t arg;        /* delay or advance ms */
    bool keyed;
} cr_op;

typedef struct cr_work {
    uint64_t seed;
    brk_flush_mode mode;
    uint64_t budget;    /* disk budget while the workload runs, 0 none */
    size_t nops;
    cr_op ops[CR_MAX_OPS];
} cr_work;

typedef struct cr_run {
    fx f;
    bool acked[CR_MAX_OPS];
    bool durable[CR_MAX_OPS];   /* acked in SYNC mode, or before a flush */
    uint8_t id[CR_MAX_OPS][BRK_UUID_LEN];
} cr_run;

static const char *cr_topic(int t) { return t ? "cb" : "ca"; }

static void cr_make(cr_work *w, uint64_t seed)
{
    uint64_t r = seed;
    memset(w, 0, sizeof *w);
    w->seed = seed;
    w->mode = crash_rng_next(&r) % 3 ? BRK_FLUSH_SYNC : BRK_FLUSH_ASYNC;
    /* A third of the workloads fill the disk budget: sends, ops,
     * deliveries and copies then fail with FULL and are retried. */
    w->budget = crash_rng_next(&r) % 3 == 0 ? 2500 + crash_rng_next(&r) % 4000 : 0;
    w->nops = 15 + crash_rng_next(&r) % (CR_MAX_OPS - 15);
    for (size_t i = 0; i < w->nops; i++) {
        cr_op *o = &w->ops[i];
        unsigned d = (unsigned)(crash_rng_next(&r) % 100);
        o->topic = (int)(crash_rng_next(&r) % CR_TOPICS);
        o->keyed = crash_rng_next(&r) % 2;
        if (d < 45) {
            o->kind = CR_SEND;
            /* Few distinct due times: ties and batches. */
            o->arg = 100 * (1 + (int64_t)(crash_rng_next(&r) % 30));
        } else if (d < 50) {
            o->kind = CR_SEND_NOW;
        } else if (d < 70) {
            o->kind = CR_ADVANCE;
            o->arg = 1 + (int64_t)(crash_rng_next(&r) % 1500);
        } else if (d < 90) {
            o->kind = CR_TICK;
        } else if (d < 95) {
            o->kind = CR_FLUSH;
        } else {
            o->kind = CR_RESTART;
        }
    }
}

static void cr_init(cr_run *r, const cr_work *w, uint64_t sim_seed)
{
    memset(r, 0, sizeof *r);
    fx *f = &r->f;
    if (brk_sim_open(&f->sim, sim_seed) != BRK_OK)
        fail_msg("sim open");
    brk_fake_clock_init(&f->clk, T0);
    brk_store_opts_init(&f->so);
    f->so.io = brk_sim_io(f->sim);
    f->so.clock = &f->clk.clock;
    f->so.no_background = true;
    f->so.flush_mode = w->mode;
    f->so.segment_bytes = 4096;
    f->so.cq_entries_per_file = 16;
    f->so.default_queues = 2;
    f->so.uuid_seed = w->seed << 16;
    f->so.disk_budget_bytes = w->budget;
    brk_delay_opts_init(&f->dopt);
    f->dopt.no_background = true;
    f->dopt.fire_batch = 3;
    f->dopt.compact_after_ms = 1200;
    f->dopt.state_interval_ms = 200;
}

static bool cr_open(fx *f)
{
    /* Reproducible ids, but never the same sequence twice: the scheduler
     * tells deliveries apart by message id, as ids are unique in real use. */
    f->so.uuid_seed++;
    if (brk_store_open(&f->s, DIR, &f->so, f->err, sizeof f->err) != BRK_OK)
        return false;
    if (brk_delay_open(&f->d, f->s, &f->dopt, f->err, sizeof f->err) != BRK_OK) {
        brk_store_close(f->s);
        f->s = NULL;
        return false;
    }
    return true;
}

static uint64_t g_cr_compacted, g_cr_errors, g_cr_full;

static void cr_close(fx *f)
{
    if (f->d) {
        brk_delay_stats st;
        brk_delay_get_stats(f->d, &st);
        g_cr_compacted += st.compacted_total;
        g_cr_errors += st.errors_total;
    }
    brk_delay_close(f->d);
    f->d = NULL;
    brk_store_close(f->s);
    f->s = NULL;
}

/* Run the workload; once the disk dies every call fails, and the workload
 * carries on as a dying process would. */
static void cr_workload(cr_run *r, const cr_work *w)
{
    fx *f = &r->f;
    if (!cr_open(f))
        return;
    for (size_t i = 0; i < w->nops; i++) {
        const cr_op *o = &w->ops[i];
        switch (o->kind) {
        case CR_SEND:
        case CR_SEND_NOW: {
            char body[24];
            snprintf(body, sizeof body, "%zu", i);
            brk_delay_res res;
            int64_t at = o->kind == CR_SEND ? now_of(f) + o->arg : now_of(f);
            brk_status st = send_full(f, cr_topic(o->topic),
                                      o->keyed ? "key" : NULL, body, at, &res);
            g_cr_full += st == BRK_FULL;
            if (st == BRK_OK) {
                r->acked[i] = true;
                r->durable[i] = w->mode == BRK_FLUSH_SYNC;
                memcpy(r->id[i], res.msg_id, BRK_UUID_LEN);
            }
            break;
        }
        case CR_FLUSH:
            /* ASYNC: what was acknowledged before a good flush is durable. */
            if (brk_store_flush(f->s) == BRK_OK)
                for (size_t j = 0; j < i; j++)
                    r->durable[j] |= r->acked[j];
            break;
        case CR_ADVANCE:
            brk_fake_clock_advance(&f->clk, o->arg);
            break;
        case CR_TICK:
            (void)brk_delay_tick(f->d, NULL);
            break;
        case CR_RESTART:
            cr_close(f);
            if (!cr_open(f))
                return;
            break;
        }
    }
    cr_close(f);
}

#define CR_CHECK(cond, ...)                                                   \
    do {                                                                      \
        if (!(cond)) {                                                        \
            print_error("delay crash: workload seed %llu (%s, budget %llu) "  \
                        "crash point %llu mode %d: ",                         \
                        (unsigned long long)w->seed,                          \
                        w->mode == BRK_FLUSH_SYNC ? "SYNC" : "ASYNC",         \
                        (unsigned long long)w->budget,                        \
                        (unsigned long long)k, mode);                         \
            fail_msg(__VA_ARGS__);                                            \
        }                                                                     \
    } while (0)

static uint64_t g_cr_delivered, g_cr_acked;

static void cr_verify(cr_run *r, const cr_work *w, uint64_t k, int mode)
{
    fx *f = &r->f;
    f->so.uuid_seed++;
    f->so.disk_budget_bytes = 0;    /* room to deliver everything */
    brk_status st = brk_store_open(&f->s, DIR, &f->so, f->err, sizeof f->err);
    CR_CHECK(st == BRK_OK, "store reopen: %s: %s", brk_status_name(st), f->err);
    st = brk_delay_open(&f->d, f->s, &f->dopt, f->err, sizeof f->err);
    CR_CHECK(st == BRK_OK, "delay reopen: %s: %s", brk_status_name(st), f->err);
    /* Let everything become due, past every backoff, and fire it; restart
     * once in the middle for good measure. */
    for (int round = 0; round < 6; round++) {
        brk_fake_clock_advance(&f->clk, 40000);
        st = brk_delay_tick(f->d, NULL);
        CR_CHECK(st == BRK_OK, "tick after recovery: %s: %s",
                 brk_status_name(st), brk_store_errstr(f->s));
        if (round == 2) {
            cr_close(f);
            CR_CHECK(cr_open(f), "clean reopen: %s", f->err);
        }
    }
    brk_delay_stats ds = stats(f);
    CR_CHECK(ds.pending == 0, "%llu still pending",
             (unsigned long long)ds.pending);

    unsigned count[CR_MAX_OPS] = { 0 };
    for (int t = 0; t < CR_TOPICS; t++) {
        recs rs;
        read_topic(f->s, cr_topic(t), &rs);
        for (size_t j = 0; j < rs.n; j++) {
            const brk_record *m = rs.r[j];
            char body[24] = { 0 };
            CR_CHECK(m->body.len > 0 && m->body.len < sizeof body, "odd body");
            memcpy(body, m->body.ptr, m->body.len);
            size_t i = strtoul(body, NULL, 10);
            CR_CHECK(i < w->nops && (w->ops[i].kind == CR_SEND
                                     || w->ops[i].kind == CR_SEND_NOW)
                     && w->ops[i].topic == t, "unknown message %s in %s", body,
                     cr_topic(t));
            CR_CHECK(!brk_props_has_sys(m->props), "system props delivered");
            if (r->acked[i])
                CR_CHECK(memcmp(m->msg_id, r->id[i], BRK_UUID_LEN) == 0,
                         "message %zu has another id than acknowledged", i);
            count[i]++;
            g_cr_delivered++;
        }
        free_recs(&rs);
    }
    for (size_t i = 0; i < w->nops; i++) {
        CR_CHECK(count[i] <= 1, "message %zu delivered %u times", i, count[i]);
        /* An acknowledged send that was durable (SYNC mode, or flushed
         * after) must arrive. */
        if (r->durable[i]) {
            CR_CHECK(count[i] == 1, "acknowledged message %zu (%s) lost", i,
                     w->ops[i].kind == CR_SEND ? "delayed" : "direct");
            g_cr_acked++;
        }
    }
    cr_close(f);
}

static void crash_at_any_point_delivers_each_acknowledged_send_exactly_once(
    void **state)
{
    (void)state;
    uint64_t budget = crash_env_u64("BRK_DELAY_CRASH_STATES", UNDER_SAN ? 1000 : 3000);
    uint64_t seed = crash_env_u64("BRK_DELAY_CRASH_SEED", 1);
    static cr_work w;
    static cr_run r;
    uint64_t states = 0, works = 0, second = 0;
    /* Replay one state of a failure report: BRK_DELAY_CRASH_SEED=<workload
     * seed> BRK_DELAY_CRASH_POINT=<crash point> BRK_DELAY_CRASH_MODE=<mode>
     * (without the second crash some states add). */
    uint64_t only = crash_env_u64("BRK_DELAY_CRASH_POINT", UINT64_MAX);
    if (only != UINT64_MAX) {
        int mode = (int)crash_env_u64("BRK_DELAY_CRASH_MODE", 0);
        cr_make(&w, seed);
        cr_init(&r, &w, w.seed + only);
        brk_sim_set_crash_after(r.f.sim, only);
        cr_workload(&r, &w);
        assert_int_equal(brk_sim_crash(r.f.sim, mode), BRK_OK);
        cr_verify(&r, &w, only, mode);
        brk_sim_close(r.f.sim);
        return;
    }
    while (states < budget) {
        cr_make(&w, seed + works);
        cr_init(&r, &w, w.seed);
        cr_workload(&r, &w);
        uint64_t n = brk_sim_ops(r.f.sim);
        brk_sim_close(r.f.sim);
        uint64_t per = budget - states < 150 ? budget - states : 150;
        uint64_t stride = n / per ? n / per : 1;
        uint64_t rs = w.seed ^ 0x5EED;
        for (uint64_t k = crash_rng_next(&rs) % stride; k < n && states < budget;
             k += stride) {
            int mode = (int)(crash_rng_next(&rs) % 3);
            cr_init(&r, &w, w.seed + k);
            brk_sim_set_crash_after(r.f.sim, k);
            cr_workload(&r, &w);
            if (brk_sim_crash(r.f.sim, mode) != BRK_OK)
                fail_msg("sim crash");
            if (crash_rng_next(&rs) % 8 == 0) {
                /* Crash again while recovering and firing. */
                brk_sim_set_crash_after(r.f.sim, crash_rng_next(&rs) % 30);
                if (cr_open(&r.f)) {
                    brk_fake_clock_advance(&r.f.clk, 40000);
                    (void)brk_delay_tick(r.f.d, NULL);
                    cr_close(&r.f);
                }
                if (brk_sim_crash(r.f.sim, (int)(crash_rng_next(&rs) % 3)) != BRK_OK)
                    fail_msg("sim crash");
                second++;
            }
            cr_verify(&r, &w, k, mode);
            brk_sim_close(r.f.sim);
            states++;
        }
        works++;
    }
    print_message("delay crash exploration: %llu states over %llu workloads "
                  "(%llu crashed twice); %llu deliveries checked, %llu "
                  "durable sends found exactly once; %llu compaction copies, "
                  "%llu failed appends on the way, %llu sends refused FULL\n",
                  (unsigned long long)states, (unsigned long long)works,
                  (unsigned long long)second,
                  (unsigned long long)g_cr_delivered,
                  (unsigned long long)g_cr_acked,
                  (unsigned long long)g_cr_compacted,
                  (unsigned long long)g_cr_errors,
                  (unsigned long long)g_cr_full);
    assert_true(states >= budget);
}

/* ---- memory ---------------------------------------------------------------------------- */

static void a_million_pending_cost_at_most_128_bytes_each(void **state)
{
    (void)state;
    uint64_t count = crash_env_u64("BRK_DELAY_MEM_COUNT", UNDER_SAN ? 100000 : 1000000);
    char dir[512];
    assert_int_equal(brk_tmpdir_new("delay_mem", dir, sizeof dir), 0);
    brk_fake_clock clk;
    brk_fake_clock_init(&clk, T0);
    brk_store_opts so;
    brk_store_opts_init(&so);
    so.clock = &clk.clock;
    so.no_background = true;
    so.flush_mode = BRK_FLUSH_ASYNC;
    so.segment_bytes = 64u << 20;
    brk_store *s = NULL;
    char err[256];
    assert_int_equal(brk_store_open(&s, dir, &so, err, sizeof err), BRK_OK);
    brk_delay_opts dopt;
    brk_delay_opts_init(&dopt);
    dopt.no_background = true;
    brk_delay *d = NULL;
    assert_int_equal(brk_delay_open(&d, s, &dopt, err, sizeof err), BRK_OK);
    brk_append_req r;
    memset(&r, 0, sizeof r);
    r.topic = "mem";
    r.queue = -1;
    r.body = (brk_bytes){ "payload", 7 };
    uint64_t x = 3;
    brk_delay_res res;
    for (uint64_t i = 0; i < count; i++) {
        int64_t at = T0 + 1000 + (int64_t)(crash_rng_next(&x) % 86400000);
        if (brk_delay_send(d, &r, at, &res) != BRK_OK)
            fail_msg("send %" PRIu64 " failed", i);
    }
    brk_delay_stats st;
    brk_delay_get_stats(d, &st);
    assert_int_equal(st.pending, count);
    double per = (double)st.memory_bytes / (double)st.pending;
    print_message("%" PRIu64 " pending delayed messages: %" PRIu64 " bytes of "
                  "scheduler memory, %.1f bytes each\n", st.pending,
                  st.memory_bytes, per);
    assert_true(per <= 128.0);
    assert_int_equal(brk_delay_close(d), BRK_OK);
    assert_int_equal(brk_store_close(s), BRK_OK);
    brk_tmpdir_remove(dir);
}

/* ---- concurrency ----------------------------------------------------------------------- */

typedef struct conc_arg {
    brk_delay *d;
    int thread;
    int n;
    int failures;
} conc_arg;

static void *conc_sender(void *p)
{
    conc_arg *a = p;
    const brk_clock *c = brk_clock_system();
    uint64_t r = (uint64_t)a->thread + 11;
    for (int i = 0; i < a->n; i++) {
        char body[32];
        snprintf(body, sizeof body, "%d-%d", a->thread, i);
        brk_append_req q;
        memset(&q, 0, sizeof q);
        q.topic = "conc";
        q.queue = -1;
        q.key = (brk_bytes){ body, 1 };
        q.body = (brk_bytes){ body, strlen(body) };
        brk_delay_res res;
        int64_t at = c->now_ms(c->ctx) + (int64_t)(crash_rng_next(&r) % 150) - 10;
        if (brk_delay_send(a->d, &q, at, &res) != BRK_OK)
            a->failures++;
    }
    return NULL;
}

static void concurrent_senders_and_background_thread_deliver_each_once(void **state)
{
    (void)state;
    enum { THREADS = 4, PER = 400 };
    char dir[512];
    assert_int_equal(brk_tmpdir_new("delay_conc", dir, sizeof dir), 0);
    brk_store_opts so;
    brk_store_opts_init(&so);
    so.flush_interval_ms = 20;
    so.checkpoint_interval_ms = 50;
    brk_store *s = NULL;
    char err[256];
    assert_int_equal(brk_store_open(&s, dir, &so, err, sizeof err), BRK_OK);
    brk_delay_opts dopt;
    brk_delay_opts_init(&dopt);
    dopt.fire_batch = 32;
    dopt.state_interval_ms = 20;
    brk_delay *d = NULL;
    assert_int_equal(brk_delay_open(&d, s, &dopt, err, sizeof err), BRK_OK);

    pthread_t th[THREADS];
    conc_arg args[THREADS];
    for (int t = 0; t < THREADS; t++) {
        args[t] = (conc_arg){ d, t, PER, 0 };
        assert_int_equal(pthread_create(&th[t], NULL, conc_sender, &args[t]), 0);
    }
    /* Ticks from this thread race the background thread. */
    for (int i = 0; i < 20; i++) {
        (void)brk_delay_tick(d, NULL);
        brk_delay_stats st;
        brk_delay_get_stats(d, &st);
        usleep(2000);
    }
    for (int t = 0; t < THREADS; t++) {
        assert_int_equal(pthread_join(th[t], NULL), 0);
        assert_int_equal(args[t].failures, 0);
    }
    brk_delay_stats st;
    for (int waited = 0; waited < 30000; waited += 10) {
        brk_delay_get_stats(d, &st);
        if (st.pending == 0)
            break;
        usleep(10000);
    }
    assert_int_equal(st.pending, 0);
    assert_int_equal(visible(s, "conc"), THREADS * PER);
    recs rs;
    read_topic(s, "conc", &rs);
    assert_int_equal(rs.n, THREADS * PER);
    static unsigned char seen[THREADS][PER];
    memset(seen, 0, sizeof seen);
    for (size_t j = 0; j < rs.n; j++) {
        char body[32] = { 0 };
        memcpy(body, rs.r[j]->body.ptr, rs.r[j]->body.len);
        int t = 0, i = 0;
        assert_int_equal(sscanf(body, "%d-%d", &t, &i), 2);
        assert_true(t >= 0 && t < THREADS && i >= 0 && i < PER);
        assert_int_equal(seen[t][i], 0);
        seen[t][i] = 1;
    }
    free_recs(&rs);
    assert_int_equal(brk_delay_close(d), BRK_OK);
    /* Reopen: nothing left, nothing fires again. */
    assert_int_equal(brk_delay_open(&d, s, &dopt, err, sizeof err), BRK_OK);
    brk_delay_get_stats(d, &st);
    assert_int_equal(st.pending, 0);
    assert_int_equal(brk_delay_close(d), BRK_OK);
    assert_int_equal(visible(s, "conc"), THREADS * PER);
    assert_int_equal(brk_store_close(s), BRK_OK);
    brk_tmpdir_remove(dir);
}

static void background_thread_fires_on_time_with_the_real_clock(void **state)
{
    (void)state;
    char dir[512];
    assert_int_equal(brk_tmpdir_new("delay_bg", dir, sizeof dir), 0);
    brk_store_opts so;
    brk_store_opts_init(&so);
    brk_store *s = NULL;
    char err[256];
    assert_int_equal(brk_store_open(&s, dir, &so, err, sizeof err), BRK_OK);
    brk_delay *d = NULL;
    assert_int_equal(brk_delay_open(&d, s, NULL, err, sizeof err), BRK_OK);
    const brk_clock *c = brk_clock_system();
    /* A far timer first: the thread sleeps towards it, and a nearer send
     * must wake it. */
    brk_append_req q;
    memset(&q, 0, sizeof q);
    q.topic = "bg";
    q.queue = -1;
    q.body = (brk_bytes){ "x", 1 };
    brk_delay_res res;
    assert_int_equal(brk_delay_send(d, &q, c->now_ms(c->ctx) + 3600000, &res),
                     BRK_OK);
    usleep(50000);
    int64_t due = c->now_ms(c->ctx) + 120;
    assert_int_equal(brk_delay_send(d, &q, due, &res), BRK_OK);
    int64_t seen_at = 0;
    for (int i = 0; i < 2000 && !seen_at; i++) {
        if (visible(s, "bg") == 1)
            seen_at = c->now_ms(c->ctx);
        else
            usleep(1000);
    }
    assert_true(seen_at >= due);
    assert_true(seen_at - due < 1000);
    assert_int_equal(brk_delay_close(d), BRK_OK);
    assert_int_equal(brk_store_close(s), BRK_OK);
    brk_tmpdir_remove(dir);
}

/* ---- the timer heap's bulk removal (used after compaction) ------------------------------ */

static bool keep_even(const brk_timer *t, void *ctx)
{
    (void)ctx;
    return t->ref % 2 == 0;
}

static void timerheap_filter_keeps_survivors_in_due_order(void **state)
{
    (void)state;
    brk_timerheap h;
    brk_timerheap_init(&h);
    uint64_t r = 17;
    for (uint64_t i = 0; i < 5000; i++)
        assert_int_equal(brk_timerheap_push(&h, (int64_t)(crash_rng_next(&r) % 1000), i),
                         BRK_OK);
    brk_timerheap_filter(&h, keep_even, NULL);
    assert_int_equal(h.n, 2500);
    brk_timer prev = { INT64_MIN, 0 }, t;
    size_t n = 0;
    while (brk_timerheap_pop(&h, &t)) {
        assert_int_equal(t.ref % 2, 0);
        assert_true(t.due_ms > prev.due_ms
                    || (t.due_ms == prev.due_ms && t.ref > prev.ref));
        prev = t;
        n++;
    }
    assert_int_equal(n, 2500);
    brk_timerheap_free(&h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(levels_match_rocketmq_and_others_are_invalid),
        cmocka_unit_test(opts_init_gives_documented_defaults),
        cmocka_unit_test(timerheap_filter_keeps_survivors_in_due_order),
        cmocka_unit_test_setup_teardown(send_with_level_delay_fires_at_level_time, setup, teardown),
        cmocka_unit_test_setup_teardown(delayed_message_is_invisible_until_due_then_arrives_intact, setup, teardown),
        cmocka_unit_test_setup_teardown(delayed_message_keeps_given_msg_id_and_new_ones_get_one, setup, teardown),
        cmocka_unit_test_setup_teardown(send_due_now_or_past_appends_directly, setup, teardown),
        cmocka_unit_test_setup_teardown(delay_ms_beyond_max_is_range_and_max_itself_is_accepted, setup, teardown),
        cmocka_unit_test_setup_teardown(invalid_sends_are_refused_and_leave_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(unknown_topic_is_notfound_only_without_auto_create, setup, teardown),
        cmocka_unit_test_setup_teardown(equal_due_times_fire_in_send_order, setup, teardown),
        cmocka_unit_test_setup_teardown(random_due_times_fire_in_due_order_and_never_early, setup, teardown),
        cmocka_unit_test_setup_teardown(restart_fires_due_timers_once_and_keeps_later_ones_waiting, setup, teardown),
        cmocka_unit_test_setup_teardown(restart_without_clean_close_rebuilds_from_the_log, setup, teardown),
        cmocka_unit_test_setup_teardown(restart_of_many_pending_rebuilds_each_timer, setup, teardown),
        cmocka_unit_test_setup_teardown(delivery_to_missing_topic_retries_and_delivers_once, setup, teardown),
        cmocka_unit_test_setup_teardown(delivery_failure_when_store_is_full_retries_and_delivers_once, setup, teardown),
        cmocka_unit_test_setup_teardown(failed_delivery_before_restart_is_delivered_once_after, setup, teardown),
        cmocka_unit_test_setup_teardown(compaction_copies_old_pending_records_that_still_fire_once, setup, teardown),
        cmocka_unit_test_setup_teardown(retention_keeps_segments_holding_pending_records, setup, teardown),
        cmocka_unit_test(crash_at_any_point_delivers_each_acknowledged_send_exactly_once),
        cmocka_unit_test(a_million_pending_cost_at_most_128_bytes_each),
        cmocka_unit_test(concurrent_senders_and_background_thread_deliver_each_once),
        cmocka_unit_test(background_thread_fires_on_time_with_the_real_clock),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
