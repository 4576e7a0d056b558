/*
 * test_group.c - the consumer-group contract (broker/group.h): receive and
 * its bounds, invisibility and receipts, ack / nack / change of
 * invisibility, the retry schedule to the millisecond, dead letters and
 * their replay, FIFO ordering, work sharing between more consumers than
 * queues, tag filters, broadcast, flow control, lag rows, restart and the
 * bound on duplicates after a crash, retention cursors, long polling
 * (waiters and the blocking receive), group configuration, and a
 * concurrent mix of producers, consumers and a ticking thread.
 *
 * Setup: a SYNC store on the simulated disk (tests/support/io_sim) with a
 * fake clock and no background thread, topics created up front (the store
 * does not auto-create, so an unknown topic is NOTFOUND); the groups are
 * opened with no_background too, so timeouts fire only when a test moves
 * the clock and calls brk_groups_tick.  A "crash" arms the sim to fail
 * every write, closes everything, drops what was not synced and reopens.
 * A few long-polling tests use the real clock (and the groups' thread)
 * because they measure real waiting.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "broker/group.h"
#include "broker/store.h"
#include "fake_clock.h"
#include "io_sim.h"

#define DIR      "/grp"
#define T0       1700000000000LL    /* fake wall clock at setup */
#define LONG_INV 300000u            /* invisibility that no test outlives */

static const struct {
    const char *name;
    uint16_t queues;
} TOPICS[] = { { "orders", 4 }, { "one", 1 }, { "two", 2 }, { "other", 1 } };

/* ---- fixture ------------------------------------------------------------- */

typedef struct fx {
    brk_sim *sim;
    brk_fake_clock clk;
    bool real_clock;            /* store on the system clock, groups threaded */
    brk_store_opts so;
    brk_store *s;
    brk_groups_opts go;
    brk_groups *g;
    char err[256];
} fx;

static void open_all(fx *f)
{
    brk_status st = brk_store_open(&f->s, DIR, &f->so, f->err, sizeof f->err);
    if (st != BRK_OK)
        fail_msg("store open: %s: %s", brk_status_name(st), f->err);
    for (size_t i = 0; i < sizeof TOPICS / sizeof TOPICS[0]; i++) {
        st = brk_topic_create(f->s, TOPICS[i].name, TOPICS[i].queues);
        assert_true(st == BRK_OK || st == BRK_EXISTS);
    }
    st = brk_groups_open(&f->g, f->s, &f->go, f->err, sizeof f->err);
    if (st != BRK_OK)
        fail_msg("groups open: %s: %s", brk_status_name(st), f->err);
}

static void close_all(fx *f)
{
    if (f->g)
        assert_int_equal(brk_groups_close(f->g), BRK_OK);
    f->g = NULL;
    if (f->s)
        assert_int_equal(brk_store_close(f->s), BRK_OK);
    f->s = NULL;
}

/* Clean restart on the same disk and clock (also: apply changed options). */
static void restart(fx *f)
{
    close_all(f);
    open_all(f);
}

/* Power loss: from now on every write fails, everything closes (whatever
 * it manages to persist is lost with the disk), then only what was synced
 * survives and everything reopens. */
static void crash_restart(fx *f)
{
    brk_sim_set_crash_after(f->sim, 0);
    if (f->g)
        (void)brk_groups_close(f->g);
    f->g = NULL;
    if (f->s)
        (void)brk_store_close(f->s);
    f->s = NULL;
    assert_int_equal(brk_sim_crash(f->sim, BRK_SIM_DROP_ALL), BRK_OK);
    open_all(f);
}

static int setup_common(void **state, bool real_clock)
{
    fx *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->real_clock = real_clock;
    assert_int_equal(brk_sim_open(&f->sim, 42), BRK_OK);
    brk_fake_clock_init(&f->clk, T0);
    brk_store_opts_init(&f->so);
    f->so.io = brk_sim_io(f->sim);
    f->so.clock = real_clock ? NULL : &f->clk.clock;
    f->so.no_background = true;
    f->so.flush_mode = BRK_FLUSH_SYNC;
    f->so.uuid_seed = 7;
    f->so.auto_create_topics = false;
    brk_groups_opts_init(&f->go);
    f->go.no_background = !real_clock;
    open_all(f);
    *state = f;
    return 0;
}

static int setup(void **state)
{
    return setup_common(state, false);
}

static int setup_real(void **state)
{
    return setup_common(state, true);
}

static int teardown(void **state)
{
    fx *f = *state;
    if (f->g)
        brk_groups_close(f->g);
    if (f->s)
        brk_store_close(f->s);
    brk_sim_close(f->sim);
    free(f);
    return 0;
}

/* ---- helpers ------------------------------------------------------------- */

static int64_t now_ms(fx *f)
{
    return brk_store_clock(f->s)->now_ms(brk_store_clock(f->s)->ctx);
}

static void tick(fx *f)
{
    brk_status st = brk_groups_tick(f->g);
    if (st != BRK_OK)
        fail_msg("brk_groups_tick: %s", brk_status_name(st));
}

/* Move the fake clock and run the groups' timeouts. */
static void advance(fx *f, int64_t ms)
{
    brk_fake_clock_advance(&f->clk, ms);
    tick(f);
}

static brk_append_res produce_full(fx *f, const char *topic, int32_t queue,
                                   const char *key, const char *tag,
                                   const void *body, size_t body_len,
                                   const char *hk, const char *hv)
{
    uint8_t pbuf[512];
    size_t plen = 0;
    if (hk) {
        brk_prop p = { { hk, strlen(hk) }, { hv, strlen(hv) } };
        assert_int_equal(brk_props_encode(&p, 1, pbuf, sizeof pbuf, &plen), BRK_OK);
    }
    brk_append_req r;
    memset(&r, 0, sizeof r);
    r.topic = topic;
    r.queue = queue;
    r.key = (brk_bytes){ key, key ? strlen(key) : 0 };
    r.tag = (brk_bytes){ tag, tag ? strlen(tag) : 0 };
    r.props = (brk_bytes){ pbuf, plen };
    r.body = (brk_bytes){ body, body_len };
    brk_append_res res;
    memset(&res, 0, sizeof res);
    brk_status st = brk_store_append(f->s, &r, &res);
    if (st != BRK_OK)
        fail_msg("append to %s: %s", topic, brk_status_name(st));
    return res;
}

static brk_append_res produce_q(fx *f, const char *topic, int32_t queue,
                                const char *body)
{
    return produce_full(f, topic, queue, NULL, NULL, body, strlen(body), NULL,
                        NULL);
}

static brk_append_res produce(fx *f, const char *topic, const char *body)
{
    return produce_q(f, topic, -1, body);
}

static brk_append_res produce_tag(fx *f, const char *topic, const char *tag,
                                  const char *body)
{
    return produce_full(f, topic, -1, NULL, tag, body, strlen(body), NULL, NULL);
}

/* What a test keeps of a received message (the batch is freed at once). */
typedef struct got {
    char receipt[BRK_RECEIPT_MAX + 1];
    uint16_t queue;
    uint64_t offset;
    uint32_t delivery_count;
    char topic[BRK_TOPIC_MAX + 1];
    char key[64];
    char tag[64];
    char body[64];              /* first 63 bytes, NUL-terminated */
    size_t body_len;
    char hdr[64];               /* value of user header "h", "" if none */
    bool has_sys;               /* system properties leaked through */
    uint8_t msg_id[BRK_UUID_LEN];
    int64_t store_ms;
} got;

#define GOT_MAX 512

static void copy_str(char *dst, size_t cap, brk_bytes b)
{
    size_t n = b.len < cap - 1 ? b.len : cap - 1;
    if (n)
        memcpy(dst, b.ptr, n);
    dst[n] = '\0';
}

static brk_status recv_st(fx *f, const char *group, const char *topic,
                          const char *member, uint32_t max, uint32_t inv,
                          got *out, size_t *n)
{
    brk_receive_req r;
    memset(&r, 0, sizeof r);
    r.group = group;
    r.topic = topic;
    r.member = member;
    r.max = max;
    r.invisible_ms = inv;
    brk_receive_batch *b = NULL;
    brk_status st = brk_group_receive(f->g, &r, &b);
    *n = 0;
    if (!b)
        return st;
    assert_true(b->count <= max);
    for (size_t i = 0; i < b->count; i++) {
        const brk_received *m = &b->msgs[i];
        assert_true(out != NULL && i < GOT_MAX);
        got *x = &out[i];
        memset(x, 0, sizeof *x);
        size_t rl = strnlen(m->receipt, sizeof m->receipt);
        assert_true(rl > 0 && rl <= BRK_RECEIPT_MAX);
        memcpy(x->receipt, m->receipt, rl);
        x->queue = m->queue;
        x->offset = m->offset;
        x->delivery_count = m->delivery_count;
        copy_str(x->topic, sizeof x->topic, m->rec.topic);
        copy_str(x->key, sizeof x->key, m->rec.key);
        copy_str(x->tag, sizeof x->tag, m->rec.tag);
        copy_str(x->body, sizeof x->body, m->rec.body);
        x->body_len = m->rec.body.len;
        brk_bytes v;
        if (brk_props_get(m->rec.props, "h", &v) == BRK_OK)
            copy_str(x->hdr, sizeof x->hdr, v);
        x->has_sys = brk_props_has_sys(m->rec.props);
        memcpy(x->msg_id, m->rec.msg_id, BRK_UUID_LEN);
        x->store_ms = m->rec.store_ms;
    }
    *n = b->count;
    brk_receive_batch_free(b);
    return st;
}

/* Receive that must succeed; returns how many came. */
static size_t recv(fx *f, const char *group, const char *topic, uint32_t max,
                   uint32_t inv, got *out)
{
    size_t n;
    brk_status st = recv_st(f, group, topic, NULL, max, inv, out, &n);
    if (st != BRK_OK)
        fail_msg("receive %s/%s: %s", group, topic, brk_status_name(st));
    return n;
}

static size_t recv_member(fx *f, const char *group, const char *topic,
                          const char *member, uint32_t max, uint32_t inv,
                          got *out)
{
    size_t n;
    brk_status st = recv_st(f, group, topic, member, max, inv, out, &n);
    if (st != BRK_OK)
        fail_msg("receive %s/%s as %s: %s", group, topic, member,
                 brk_status_name(st));
    return n;
}

/* Receive exactly one message and return it. */
static got recv_one(fx *f, const char *group, const char *topic, uint32_t inv)
{
    got g[GOT_MAX];
    size_t n = recv(f, group, topic, 16, inv, g);
    if (n != 1)
        fail_msg("receive %s/%s: %zu messages, wanted 1", group, topic, n);
    return g[0];
}

static void expect_none(fx *f, const char *group, const char *topic)
{
    got g[GOT_MAX];
    size_t n = recv(f, group, topic, BRK_RECEIVE_MAX, LONG_INV, g);
    if (n != 0)
        fail_msg("receive %s/%s: %zu messages (first \"%s\"), wanted none",
                 group, topic, n, g[0].body);
}

static int find_body(const got *g, size_t n, const char *body)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(g[i].body, body) == 0)
            return (int)i;
    return -1;
}

static void ack_ok(fx *f, const char *group, const char *receipt)
{
    brk_status st = brk_group_ack(f->g, group, receipt);
    if (st != BRK_OK)
        fail_msg("ack in %s: %s", group, brk_status_name(st));
}

static void nack_ok(fx *f, const char *group, const char *receipt,
                    uint32_t delay_ms, const char *reason)
{
    brk_status st = brk_group_nack(f->g, group, receipt, delay_ms, reason);
    if (st != BRK_OK)
        fail_msg("nack in %s: %s", group, brk_status_name(st));
}

static brk_status put_st(fx *f, const char *group, const char *topic,
                         const char *filter, const brk_group_config *cfg,
                         bool *created)
{
    brk_group_config c;
    if (!cfg) {
        brk_group_config_init(&c);
        cfg = &c;
    }
    bool tmp;
    return brk_group_put(f->g, group, topic, filter, cfg, created ? created : &tmp);
}

static void put_ok(fx *f, const char *group, const char *topic,
                   const char *filter, const brk_group_config *cfg)
{
    brk_status st = put_st(f, group, topic, filter, cfg, NULL);
    if (st != BRK_OK)
        fail_msg("group put %s on %s: %s", group, topic, brk_status_name(st));
}

/* The lag row of (topic, member, queue); fails when absent. */
static brk_group_lag_row lag_row(fx *f, const char *group, const char *topic,
                                 const char *member, int32_t queue)
{
    brk_group_lag_row *rows = NULL;
    size_t n = 0;
    assert_int_equal(brk_group_lag(f->g, group, &rows, &n), BRK_OK);
    brk_group_lag_row out;
    bool found = false;
    for (size_t i = 0; i < n; i++) {
        if (strcmp(rows[i].topic, topic) == 0
            && strcmp(rows[i].member, member ? member : "") == 0
            && rows[i].queue == queue) {
            out = rows[i];
            found = true;
        }
    }
    free(rows);
    if (!found)
        fail_msg("no lag row for %s/%s member \"%s\" queue %d", group, topic,
                 member ? member : "", queue);
    return out;
}

static void deadline_in(struct timespec *ts, int ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* A waiter callback target: counts its runs. */
typedef struct waker {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int fired;
} waker;

static void waker_init(waker *w)
{
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    w->fired = 0;
}

static void waker_destroy(waker *w)
{
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
}

static void wake_cb(void *ctx)
{
    waker *w = ctx;
    pthread_mutex_lock(&w->mu);
    w->fired++;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static int fired(waker *w)
{
    pthread_mutex_lock(&w->mu);
    int n = w->fired;
    pthread_mutex_unlock(&w->mu);
    return n;
}

/* Wait (real time, at most ms) until the callback ran at least n times,
 * ticking the groups meanwhile (without moving the clock) in case callbacks
 * are dispatched by the tick.  Returns the count. */
static int wait_fired(fx *f, waker *w, int n, int ms)
{
    int64_t end = mono_ms() + ms;
    for (;;) {
        if (f->g && f->go.no_background)
            (void)brk_groups_tick(f->g);
        pthread_mutex_lock(&w->mu);
        if (w->fired < n) {
            struct timespec dl;
            deadline_in(&dl, 10);
            pthread_cond_timedwait(&w->cv, &w->mu, &dl);
        }
        int got_n = w->fired;
        pthread_mutex_unlock(&w->mu);
        if (got_n >= n || mono_ms() >= end)
            return got_n;
    }
}

static brk_receive_req req_of(const char *group, const char *topic,
                              uint32_t max)
{
    brk_receive_req r;
    memset(&r, 0, sizeof r);
    r.group = group;
    r.topic = topic;
    r.max = max;
    r.invisible_ms = LONG_INV;
    return r;
}

/* ==== receive basics ====================================================== */

static void receive_auto_creates_the_group_and_returns_record_fields(void **state)
{
    fx *f = *state;
    brk_append_res a = produce_full(f, "orders", -1, "k1", "t1", "hello", 5,
                                    "h", "v");
    got g = recv_one(f, "basic", "orders", LONG_INV);
    assert_int_equal(g.delivery_count, 1);
    assert_int_equal(g.queue, a.queue);
    assert_int_equal(g.offset, a.queue_offset);
    assert_string_equal(g.topic, "orders");
    assert_string_equal(g.key, "k1");
    assert_string_equal(g.tag, "t1");
    assert_string_equal(g.body, "hello");
    assert_string_equal(g.hdr, "v");
    assert_false(g.has_sys);
    assert_memory_equal(g.msg_id, a.msg_id, BRK_UUID_LEN);
    assert_int_equal(g.store_ms, a.store_ms);
    /* The group exists now: it has lag rows, and put says it is not new. */
    brk_group_lag_row tot = lag_row(f, "basic", "orders", NULL, -1);
    assert_int_equal(tot.max_offset, 1);
    assert_int_equal(tot.inflight, 1);
    bool created = true;
    assert_int_equal(put_st(f, "basic", "orders", NULL, NULL, &created), BRK_OK);
    assert_false(created);
}

static void receive_returns_a_batch_with_distinct_receipts_up_to_max(void **state)
{
    fx *f = *state;
    char body[16];
    for (int i = 0; i < 5; i++) {
        snprintf(body, sizeof body, "m%d", i);
        produce(f, "orders", body);
    }
    got g[GOT_MAX], h[GOT_MAX];
    size_t n = recv(f, "batch", "orders", 3, LONG_INV, g);
    assert_int_equal(n, 3);
    size_t m = recv(f, "batch", "orders", 10, LONG_INV, h);
    assert_int_equal(m, 2);
    memcpy(&g[3], h, 2 * sizeof *h);
    for (size_t i = 0; i < 5; i++) {
        snprintf(body, sizeof body, "m%zu", i);
        assert_true(find_body(g, 5, body) >= 0);
        assert_int_equal(g[i].delivery_count, 1);
        for (size_t j = 0; j < i; j++)
            assert_string_not_equal(g[i].receipt, g[j].receipt);
    }
    expect_none(f, "batch", "orders");
}

static void receive_with_max_0_or_above_256_is_invalid(void **state)
{
    fx *f = *state;
    produce(f, "one", "x");
    got g[GOT_MAX];
    size_t n;
    assert_int_equal(recv_st(f, "b", "one", NULL, 0, LONG_INV, g, &n), BRK_INVAL);
    assert_int_equal(recv_st(f, "b", "one", NULL, BRK_RECEIVE_MAX + 1, LONG_INV,
                             g, &n), BRK_INVAL);
    assert_int_equal(recv_st(f, "b", "one", NULL, BRK_RECEIVE_MAX, LONG_INV, g,
                             &n), BRK_OK);
    assert_int_equal(n, 1);
}

static void receive_with_bad_group_or_unknown_topic_is_refused(void **state)
{
    fx *f = *state;
    got g[GOT_MAX];
    size_t n;
    assert_int_equal(recv_st(f, "__internal", "one", NULL, 1, 0, g, &n), BRK_INVAL);
    assert_int_equal(recv_st(f, "bad name", "one", NULL, 1, 0, g, &n), BRK_INVAL);
    assert_int_equal(recv_st(f, NULL, "one", NULL, 1, 0, g, &n), BRK_INVAL);
    assert_int_equal(recv_st(f, "g", NULL, NULL, 1, 0, g, &n), BRK_INVAL);
    assert_int_equal(recv_st(f, "g", "nosuch", NULL, 1, 0, g, &n), BRK_NOTFOUND);
}

/* ==== invisibility and receipts =========================================== */

static void received_message_is_invisible_then_reappears_with_a_new_receipt(void **state)
{
    fx *f = *state;
    produce(f, "one", "m");
    got a = recv_one(f, "inv", "one", 5000);
    assert_int_equal(a.delivery_count, 1);
    expect_none(f, "inv", "one");
    advance(f, 4999);
    expect_none(f, "inv", "one");
    /* Invisibility ran out: the retry schedule applies (10 s after the
     * first delivery), counted from the expiry. */
    advance(f, 1);
    expect_none(f, "inv", "one");
    advance(f, 9999);
    expect_none(f, "inv", "one");
    advance(f, 1);
    got b = recv_one(f, "inv", "one", 5000);
    assert_string_equal(b.body, "m");
    assert_int_equal(b.delivery_count, 2);
    assert_string_not_equal(a.receipt, b.receipt);
    assert_memory_equal(a.msg_id, b.msg_id, BRK_UUID_LEN);
    /* The first receipt is stale now. */
    assert_int_equal(brk_group_ack(f->g, "inv", a.receipt), BRK_CONFLICT);
    ack_ok(f, "inv", b.receipt);
}

static void default_invisibility_applies_when_receive_gives_zero(void **state)
{
    fx *f = *state;
    f->go.default_invisible_ms = 20000;
    restart(f);
    produce(f, "one", "m");
    got a = recv_one(f, "dinv", "one", 0);
    (void)a;
    advance(f, 19999);
    expect_none(f, "dinv", "one");
    advance(f, 1);                            /* expired: + 10 s retry delay */
    advance(f, 9999);
    expect_none(f, "dinv", "one");
    advance(f, 1);
    assert_int_equal(recv_one(f, "dinv", "one", 0).delivery_count, 2);
}

static void ack_removes_the_message_for_good(void **state)
{
    fx *f = *state;
    produce(f, "one", "m");
    got a = recv_one(f, "ack", "one", 5000);
    ack_ok(f, "ack", a.receipt);
    advance(f, 3 * 3600 * 1000LL);
    expect_none(f, "ack", "one");
    brk_group_lag_row tot = lag_row(f, "ack", "one", NULL, -1);
    assert_int_equal(tot.committed_offset, 1);
    assert_int_equal(tot.lag, 0);
    assert_int_equal(tot.inflight, 0);
}

static void ack_twice_is_conflict(void **state)
{
    fx *f = *state;
    produce(f, "one", "m");
    got a = recv_one(f, "ack2", "one", LONG_INV);
    ack_ok(f, "ack2", a.receipt);
    assert_int_equal(brk_group_ack(f->g, "ack2", a.receipt), BRK_CONFLICT);
    assert_int_equal(brk_group_nack(f->g, "ack2", a.receipt, 0, NULL), BRK_CONFLICT);
    assert_int_equal(brk_group_change_invisibility(f->g, "ack2", a.receipt, 1000),
                     BRK_CONFLICT);
}

static void malformed_receipt_is_invalid(void **state)
{
    fx *f = *state;
    produce(f, "one", "m");
    got a = recv_one(f, "mal", "one", LONG_INV);
    static const char *const bad[] = { "", "junk", "0", "!!!!!!!!" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(brk_group_ack(f->g, "mal", bad[i]), BRK_INVAL);
        assert_int_equal(brk_group_nack(f->g, "mal", bad[i], 0, NULL), BRK_INVAL);
        assert_int_equal(brk_group_change_invisibility(f->g, "mal", bad[i], 1000),
                         BRK_INVAL);
    }
    char longer[BRK_RECEIPT_MAX + 10];
    memset(longer, 'A', sizeof longer - 1);
    longer[sizeof longer - 1] = '\0';
    assert_int_equal(brk_group_ack(f->g, "mal", longer), BRK_INVAL);
    /* A good receipt with its last character changed is not acked. */
    char mangled[BRK_RECEIPT_MAX + 1];
    snprintf(mangled, sizeof mangled, "%s", a.receipt);
    size_t l = strlen(mangled);
    mangled[l - 1] = mangled[l - 1] == 'x' ? 'y' : 'x';
    brk_status st = brk_group_ack(f->g, "mal", mangled);
    assert_true(st == BRK_INVAL || st == BRK_CONFLICT);
    ack_ok(f, "mal", a.receipt);
}

static void ack_in_unknown_group_is_notfound(void **state)
{
    fx *f = *state;
    produce(f, "one", "m");
    got a = recv_one(f, "known", "one", LONG_INV);
    assert_int_equal(brk_group_ack(f->g, "unknown", a.receipt), BRK_NOTFOUND);
    assert_int_equal(brk_group_nack(f->g, "unknown", a.receipt, 0, NULL),
                     BRK_NOTFOUND);
    assert_int_equal(brk_group_change_invisibility(f->g, "unknown", a.receipt, 1),
                     BRK_NOTFOUND);
    brk_group_lag_row *rows = NULL;
    size_t n = 0;
    assert_int_equal(brk_group_lag(f->g, "unknown", &rows, &n), BRK_NOTFOUND);
    free(rows);
    ack_ok(f, "known", a.receipt);
}

/* ==== nack and the retry schedule ========================================= */

static void retry_delay_follows_the_rocketmq_schedule(void **state)
{
    (void)state;
    static const int64_t want[] = {
        10000, 30000, 60000, 120000, 180000, 240000, 300000, 360000, 420000,
        480000, 540000, 600000, 1200000, 1800000, 3600000, 7200000, 7200000,
    };
    for (uint32_t n = 1; n <= sizeof want / sizeof want[0]; n++)
        assert_int_equal(brk_group_retry_delay_ms(n), want[n - 1]);
    assert_int_equal(brk_group_retry_delay_ms(100), 7200000);
    assert_int_equal(brk_group_retry_delay_ms(UINT32_MAX), 7200000);
}

static void nack_redelivers_on_the_retry_schedule_to_the_millisecond(void **state)
{
    fx *f = *state;
    produce_full(f, "one", -1, "k", "tg", "n", 1, "h", "v");
    got a = recv_one(f, "nk", "one", LONG_INV);
    int64_t delays[] = { 10000, 30000, 60000, 120000 };
    for (uint32_t i = 0; i < 4; i++) {
        assert_int_equal(a.delivery_count, i + 1);
        nack_ok(f, "nk", a.receipt, 0, "again");
        expect_none(f, "nk", "one");
        advance(f, delays[i] - 1);
        expect_none(f, "nk", "one");
        advance(f, 1);
        got b = recv_one(f, "nk", "one", LONG_INV);
        /* The redelivery is the same message as the consumer saw it. */
        assert_string_equal(b.body, "n");
        assert_string_equal(b.topic, "one");
        assert_string_equal(b.key, "k");
        assert_string_equal(b.tag, "tg");
        assert_string_equal(b.hdr, "v");
        assert_false(b.has_sys);
        assert_memory_equal(b.msg_id, a.msg_id, BRK_UUID_LEN);
        assert_int_equal(b.queue, a.queue);
        assert_int_equal(b.offset, a.offset);
        assert_string_not_equal(b.receipt, a.receipt);
        assert_int_equal(brk_group_ack(f->g, "nk", a.receipt), BRK_CONFLICT);
        a = b;
    }
    ack_ok(f, "nk", a.receipt);
    advance(f, 3 * 3600 * 1000LL);
    expect_none(f, "nk", "one");
}

static void nack_delay_rounds_up_to_a_delay_level(void **state)
{
    fx *f = *state;
    /* delay asked -> level it must wait */
    static const struct { uint32_t ask; int64_t level; } cases[] = {
        { 1000, 1000 }, { 1500, 5000 }, { 12000, 30000 },
        { 150000, 180000 }, { 3 * 3600 * 1000u, 7200000 },
    };
    char body[16];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(body, sizeof body, "d%zu", i);
        produce(f, "one", body);
        got a = recv_one(f, "nd", "one", LONG_INV);
        assert_string_equal(a.body, body);
        nack_ok(f, "nd", a.receipt, cases[i].ask, NULL);
        advance(f, cases[i].level - 1);
        expect_none(f, "nd", "one");
        advance(f, 1);
        got b = recv_one(f, "nd", "one", LONG_INV);
        assert_string_equal(b.body, body);
        assert_int_equal(b.delivery_count, 2);
        ack_ok(f, "nd", b.receipt);
    }
}

static void change_invisibility_extends_and_shortens(void **state)
{
    fx *f = *state;
    produce(f, "one", "e");
    got a = recv_one(f, "ci", "one", 5000);
    advance(f, 1000);
    assert_int_equal(brk_group_change_invisibility(f->g, "ci", a.receipt, 20000),
                     BRK_OK);
    advance(f, 19999);          /* past the first 5 s, 1 ms short of the new end */
    expect_none(f, "ci", "one");
    advance(f, 1);              /* expired now; + 10 s retry delay */
    advance(f, 9999);
    expect_none(f, "ci", "one");
    advance(f, 1);
    got b = recv_one(f, "ci", "one", LONG_INV);
    assert_int_equal(b.delivery_count, 2);
    /* Shorten: 60 s asked, cut to 1 s. */
    ack_ok(f, "ci", b.receipt);
    produce(f, "one", "s");
    got c = recv_one(f, "ci", "one", 60000);
    assert_int_equal(brk_group_change_invisibility(f->g, "ci", c.receipt, 1000),
                     BRK_OK);
    advance(f, 999);
    expect_none(f, "ci", "one");
    advance(f, 1);              /* expired: + 10 s retry delay */
    advance(f, 9999);
    expect_none(f, "ci", "one");
    advance(f, 1);
    got d = recv_one(f, "ci", "one", LONG_INV);
    assert_string_equal(d.body, "s");
    assert_int_equal(d.delivery_count, 2);
}

static void receipt_stays_valid_after_change_invisibility(void **state)
{
    fx *f = *state;
    produce(f, "one", "r");
    got a = recv_one(f, "civ", "one", 5000);
    assert_int_equal(brk_group_change_invisibility(f->g, "civ", a.receipt, 60000),
                     BRK_OK);
    advance(f, 30000);
    ack_ok(f, "civ", a.receipt);
    advance(f, 3 * 3600 * 1000LL);
    expect_none(f, "civ", "one");
}

/* ==== dead letters ======================================================== */

static bool dlq_header(const brk_record *r, const char *name, char *out,
                       size_t cap)
{
    brk_bytes v;
    if (brk_props_get(r->props, name, &v) != BRK_OK)
        return false;
    copy_str(out, cap, v);
    return true;
}

static void max_deliveries_moves_the_message_to_the_dead_letters(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    c.max_deliveries = 2;
    put_ok(f, "dl", "one", NULL, &c);
    produce(f, "one", "filler");            /* offset 0 */
    brk_append_res x = produce_full(f, "one", -1, "kx", "tx", "x", 1, "h", "v");
    got g[GOT_MAX];
    assert_int_equal(recv(f, "dl", "one", 10, LONG_INV, g), 2);
    int ix = find_body(g, 2, "x"), ifl = find_body(g, 2, "filler");
    assert_true(ix >= 0 && ifl >= 0);
    ack_ok(f, "dl", g[ifl].receipt);
    nack_ok(f, "dl", g[ix].receipt, 0, "first");
    advance(f, 10000);
    got b = recv_one(f, "dl", "one", LONG_INV);
    assert_int_equal(b.delivery_count, 2);
    nack_ok(f, "dl", b.receipt, 0, "boom: it broke");
    advance(f, 3 * 3600 * 1000LL);
    expect_none(f, "dl", "one");

    brk_batch *d = NULL;
    assert_int_equal(brk_group_dead_letters(f->g, "dl", 0, 10, &d), BRK_OK);
    assert_int_equal(d->count, 1);
    const brk_record *r = &d->recs[0];
    assert_memory_equal(r->msg_id, x.msg_id, BRK_UUID_LEN);
    assert_int_equal(r->body.len, 1);
    assert_memory_equal(r->body.ptr, "x", 1);
    assert_false(brk_props_has_sys(r->props));
    char v[256];
    assert_true(dlq_header(r, "h", v, sizeof v));
    assert_string_equal(v, "v");
    assert_true(dlq_header(r, "outboxd-dlq-topic", v, sizeof v));
    assert_string_equal(v, "one");
    assert_true(dlq_header(r, "outboxd-dlq-queue", v, sizeof v));
    assert_string_equal(v, "0");
    assert_true(dlq_header(r, "outboxd-dlq-offset", v, sizeof v));
    assert_string_equal(v, "1");
    assert_true(dlq_header(r, "outboxd-dlq-deliveries", v, sizeof v));
    assert_string_equal(v, "2");
    assert_true(dlq_header(r, "outboxd-dlq-reason", v, sizeof v));
    assert_string_equal(v, "boom: it broke");
    brk_batch_free(d);

    brk_group_lag_row tot = lag_row(f, "dl", "one", NULL, -1);
    assert_int_equal(tot.dead_letters, 1);
    assert_int_equal(tot.inflight, 0);
    assert_int_equal(tot.lag, 0);
}

static void reason_of_an_earlier_nack_survives_a_reasonless_nack_of_its_retry(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    c.max_deliveries = 3;
    put_ok(f, "dr", "one", NULL, &c);
    produce(f, "one", "x");
    got a = recv_one(f, "dr", "one", LONG_INV);
    nack_ok(f, "dr", a.receipt, 0, "first reason");
    advance(f, 10000);
    got b = recv_one(f, "dr", "one", LONG_INV);      /* the retry copy */
    assert_int_equal(b.delivery_count, 2);
    nack_ok(f, "dr", b.receipt, 0, NULL);            /* a copy of the copy */
    advance(f, 30000);
    got d = recv_one(f, "dr", "one", LONG_INV);
    assert_int_equal(d.delivery_count, 3);
    nack_ok(f, "dr", d.receipt, 0, NULL);            /* dead-lettered */
    expect_none(f, "dr", "one");

    brk_batch *dl = NULL;
    assert_int_equal(brk_group_dead_letters(f->g, "dr", 0, 10, &dl), BRK_OK);
    assert_int_equal(dl->count, 1);
    char v[256];
    assert_true(dlq_header(&dl->recs[0], "outboxd-dlq-deliveries", v, sizeof v));
    assert_string_equal(v, "3");
    assert_true(dlq_header(&dl->recs[0], "outboxd-dlq-reason", v, sizeof v));
    assert_string_equal(v, "first reason");
    brk_batch_free(dl);
}

static void invisibility_running_out_at_max_deliveries_dead_letters_too(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    c.max_deliveries = 1;
    put_ok(f, "dlt", "one", NULL, &c);
    produce(f, "one", "t");
    got a = recv_one(f, "dlt", "one", 5000);
    (void)a;
    advance(f, 3 * 3600 * 1000LL);
    expect_none(f, "dlt", "one");
    brk_batch *d = NULL;
    assert_int_equal(brk_group_dead_letters(f->g, "dlt", 0, 10, &d), BRK_OK);
    assert_int_equal(d->count, 1);
    brk_batch_free(d);
}

static void dead_letters_list_oldest_first_from_an_index(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    c.max_deliveries = 1;
    put_ok(f, "dll", "one", NULL, &c);
    char body[16];
    for (int i = 0; i < 3; i++) {
        snprintf(body, sizeof body, "d%d", i);
        produce(f, "one", body);
        got a = recv_one(f, "dll", "one", LONG_INV);
        nack_ok(f, "dll", a.receipt, 0, NULL);
    }
    brk_batch *d = NULL;
    assert_int_equal(brk_group_dead_letters(f->g, "dll", 0, 10, &d), BRK_OK);
    assert_int_equal(d->count, 3);
    for (size_t i = 0; i < 3; i++) {
        snprintf(body, sizeof body, "d%zu", i);
        assert_int_equal(d->recs[i].body.len, 2);
        assert_memory_equal(d->recs[i].body.ptr, body, 2);
    }
    brk_batch_free(d);
    assert_int_equal(brk_group_dead_letters(f->g, "dll", 1, 1, &d), BRK_OK);
    assert_int_equal(d->count, 1);
    assert_memory_equal(d->recs[0].body.ptr, "d1", 2);
    brk_batch_free(d);
    assert_int_equal(brk_group_dead_letters(f->g, "dll", 3, 10, &d), BRK_OK);
    assert_int_equal(d->count, 0);
    brk_batch_free(d);
    assert_int_equal(brk_group_dead_letters(f->g, "nosuch", 0, 10, &d),
                     BRK_NOTFOUND);
}

static void replay_appends_dead_letters_back_once_with_their_ids(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    c.max_deliveries = 1;
    put_ok(f, "rp", "one", NULL, &c);
    brk_append_res x = produce_full(f, "one", -1, NULL, NULL, "x", 1, "h", "v");
    got a = recv_one(f, "rp", "one", LONG_INV);
    nack_ok(f, "rp", a.receipt, 0, "bad");
    expect_none(f, "rp", "one");

    size_t replayed = 99;
    assert_int_equal(brk_group_replay_dead_letters(f->g, "rp", 10, &replayed),
                     BRK_OK);
    assert_int_equal(replayed, 1);
    uint64_t min, max;
    assert_int_equal(brk_store_queue_range(f->s, "one", 0, &min, &max), BRK_OK);
    assert_int_equal(max, 2);
    got b = recv_one(f, "rp", "one", LONG_INV);
    assert_string_equal(b.body, "x");
    assert_string_equal(b.hdr, "v");
    assert_false(b.has_sys);
    assert_memory_equal(b.msg_id, x.msg_id, BRK_UUID_LEN);
    assert_int_equal(b.delivery_count, 1);
    assert_int_equal(b.offset, 1);
    ack_ok(f, "rp", b.receipt);

    /* A second replay finds nothing left to replay. */
    assert_int_equal(brk_group_replay_dead_letters(f->g, "rp", 10, &replayed),
                     BRK_OK);
    assert_int_equal(replayed, 0);
    assert_int_equal(brk_store_queue_range(f->s, "one", 0, &min, &max), BRK_OK);
    assert_int_equal(max, 2);
    expect_none(f, "rp", "one");
    /* ... also after a restart. */
    restart(f);
    assert_int_equal(brk_group_replay_dead_letters(f->g, "rp", 10, &replayed),
                     BRK_OK);
    assert_int_equal(replayed, 0);
    assert_int_equal(brk_store_queue_range(f->s, "one", 0, &min, &max), BRK_OK);
    assert_int_equal(max, 2);
}

/* ==== FIFO ================================================================= */

static void fifo_put(fx *f, const char *group, const char *topic,
                     uint16_t max_deliveries)
{
    brk_group_config c;
    brk_group_config_init(&c);
    c.fifo = true;
    if (max_deliveries)
        c.max_deliveries = max_deliveries;
    put_ok(f, group, topic, NULL, &c);
}

static void fifo_delivers_one_message_per_queue_until_acked(void **state)
{
    fx *f = *state;
    fifo_put(f, "ff", "two", 0);
    produce_q(f, "two", 0, "a0");
    produce_q(f, "two", 0, "a1");
    produce_q(f, "two", 0, "a2");
    produce_q(f, "two", 1, "b0");
    produce_q(f, "two", 1, "b1");
    got g[GOT_MAX];
    size_t n = recv(f, "ff", "two", 10, LONG_INV, g);
    assert_int_equal(n, 2);
    int ia = find_body(g, n, "a0"), ib = find_body(g, n, "b0");
    assert_true(ia >= 0 && ib >= 0);
    expect_none(f, "ff", "two");
    ack_ok(f, "ff", g[ia].receipt);
    got a1 = recv_one(f, "ff", "two", LONG_INV);
    assert_string_equal(a1.body, "a1");
    expect_none(f, "ff", "two");
    ack_ok(f, "ff", a1.receipt);
    ack_ok(f, "ff", g[ib].receipt);
    n = recv(f, "ff", "two", 10, LONG_INV, g);
    assert_int_equal(n, 2);
    assert_true(find_body(g, n, "a2") >= 0 && find_body(g, n, "b1") >= 0);
}

static void fifo_nack_keeps_its_place_in_the_queue(void **state)
{
    fx *f = *state;
    fifo_put(f, "fn", "one", 0);
    produce(f, "one", "m0");
    produce(f, "one", "m1");
    got a = recv_one(f, "fn", "one", LONG_INV);
    assert_string_equal(a.body, "m0");
    nack_ok(f, "fn", a.receipt, 0, NULL);
    /* m1 must not overtake m0 while m0 waits for its retry. */
    expect_none(f, "fn", "one");
    advance(f, 9999);
    expect_none(f, "fn", "one");
    advance(f, 1);
    got b = recv_one(f, "fn", "one", LONG_INV);
    assert_string_equal(b.body, "m0");
    assert_int_equal(b.delivery_count, 2);
    assert_int_equal(b.offset, 0);
    expect_none(f, "fn", "one");
    ack_ok(f, "fn", b.receipt);
    got c = recv_one(f, "fn", "one", LONG_INV);
    assert_string_equal(c.body, "m1");
    assert_int_equal(c.delivery_count, 1);
}

static void fifo_invisibility_timeout_keeps_its_place(void **state)
{
    fx *f = *state;
    fifo_put(f, "ft", "one", 0);
    produce(f, "one", "m0");
    produce(f, "one", "m1");
    got a = recv_one(f, "ft", "one", 5000);
    assert_string_equal(a.body, "m0");
    advance(f, 4999);
    expect_none(f, "ft", "one");
    /* Order, not timing, is the point here: give any retry delay time. */
    advance(f, 5 * 60 * 1000);
    got b = recv_one(f, "ft", "one", LONG_INV);
    assert_string_equal(b.body, "m0");
    assert_int_equal(b.delivery_count, 2);
    ack_ok(f, "ft", b.receipt);
    assert_string_equal(recv_one(f, "ft", "one", LONG_INV).body, "m1");
}

static void fifo_other_queues_keep_flowing_while_one_is_blocked(void **state)
{
    fx *f = *state;
    fifo_put(f, "fo", "two", 0);
    produce_q(f, "two", 0, "a0");
    produce_q(f, "two", 0, "a1");
    for (int i = 0; i < 5; i++) {
        char body[8];
        snprintf(body, sizeof body, "b%d", i);
        produce_q(f, "two", 1, body);
    }
    got g[GOT_MAX];
    size_t n0 = recv(f, "fo", "two", 10, LONG_INV, g);
    assert_int_equal(n0, 2);
    int ia = find_body(g, n0, "a0"), ib = find_body(g, n0, "b0");
    assert_true(ia >= 0 && ib >= 0);
    got a = g[ia];
    ack_ok(f, "fo", g[ib].receipt);
    nack_ok(f, "fo", a.receipt, 60000, NULL);
    /* Queue 1 drains while queue 0 waits for a0's retry. */
    for (int k = 0; k < 5; k++) {
        size_t n = recv(f, "fo", "two", 10, LONG_INV, g);
        if (n == 0)
            break;
        assert_int_equal(n, 1);
        assert_int_equal(g[0].queue, 1);
        ack_ok(f, "fo", g[0].receipt);
    }
    assert_int_equal(lag_row(f, "fo", "two", NULL, 1).lag, 0);
    expect_none(f, "fo", "two");
    advance(f, 60000);
    got b = recv_one(f, "fo", "two", LONG_INV);
    assert_string_equal(b.body, "a0");
}

static void fifo_dead_letter_unblocks_the_queue(void **state)
{
    fx *f = *state;
    fifo_put(f, "fd", "one", 2);
    produce(f, "one", "m0");
    produce(f, "one", "m1");
    got a = recv_one(f, "fd", "one", LONG_INV);
    assert_string_equal(a.body, "m0");
    nack_ok(f, "fd", a.receipt, 0, "1");
    advance(f, 10000);
    got b = recv_one(f, "fd", "one", LONG_INV);
    assert_string_equal(b.body, "m0");
    nack_ok(f, "fd", b.receipt, 0, "2");
    /* m0 is dead-lettered; m1 comes next without waiting for anything. */
    got c = recv_one(f, "fd", "one", LONG_INV);
    assert_string_equal(c.body, "m1");
    brk_batch *d = NULL;
    assert_int_equal(brk_group_dead_letters(f->g, "fd", 0, 10, &d), BRK_OK);
    assert_int_equal(d->count, 1);
    assert_memory_equal(d->recs[0].body.ptr, "m0", 2);
    brk_batch_free(d);
}

/* ==== sharing, filters, broadcast ======================================== */

static void more_consumers_than_queues_all_get_work(void **state)
{
    fx *f = *state;
    char body[16];
    for (int i = 0; i < 12; i++) {
        snprintf(body, sizeof body, "w%02d", i);
        produce(f, "orders", body);           /* round robin over 4 queues */
    }
    got all[10];
    got g[GOT_MAX];
    for (int c = 0; c < 10; c++) {
        assert_int_equal(recv(f, "share", "orders", 1, LONG_INV, g), 1);
        all[c] = g[0];
        for (int j = 0; j < c; j++)
            assert_string_not_equal(all[c].body, all[j].body);
    }
    assert_int_equal(recv(f, "share", "orders", 10, LONG_INV, g), 2);
}

static void tag_filter(fx *f, const char *group, const char *filter,
                       const char *const *want, size_t nwant)
{
    put_ok(f, group, "orders", filter, NULL);
    got g[GOT_MAX];
    size_t n = recv(f, group, "orders", 50, LONG_INV, g);
    if (n != nwant)
        fail_msg("filter \"%s\": %zu messages, wanted %zu", filter ? filter : "(null)",
                 n, nwant);
    for (size_t i = 0; i < nwant; i++)
        if (find_body(g, n, want[i]) < 0)
            fail_msg("filter \"%s\": %s missing", filter ? filter : "(null)",
                     want[i]);
    for (size_t i = 0; i < n; i++)
        ack_ok(f, group, g[i].receipt);
    /* Skipped messages count as consumed: nothing is left behind. */
    brk_group_lag_row tot = lag_row(f, group, "orders", NULL, -1);
    if (tot.lag != 0 || tot.inflight != 0)
        fail_msg("filter \"%s\": lag %llu inflight %llu after acking every match",
                 filter ? filter : "(null)", (unsigned long long)tot.lag,
                 (unsigned long long)tot.inflight);
}

static void tag_filters_select_tags_and_skip_the_others(void **state)
{
    fx *f = *state;
    produce_tag(f, "orders", "a", "ta");
    produce_tag(f, "orders", "b", "tb");
    produce_tag(f, "orders", "c", "tc");
    produce_tag(f, "orders", NULL, "none");
    produce_tag(f, "orders", "ab", "tab");
    static const char *const all[] = { "ta", "tb", "tc", "none", "tab" };
    static const char *const a[] = { "ta" };
    static const char *const ab[] = { "ta", "tb" };
    static const char *const abc[] = { "ta", "tb", "tc" };
    tag_filter(f, "f-null", NULL, all, 5);
    tag_filter(f, "f-star", "*", all, 5);
    tag_filter(f, "f-a", "a", a, 1);
    tag_filter(f, "f-ab", "a || b", ab, 2);
    tag_filter(f, "f-ab-tight", "a||b", ab, 2);
    tag_filter(f, "f-ab-spaces", "  a ||   b  ", ab, 2);
    tag_filter(f, "f-abc", "c || a || b", abc, 3);
    tag_filter(f, "f-none", "zzz", NULL, 0);
}

static void broadcast_gives_every_member_every_message(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    c.broadcast = true;
    put_ok(f, "bc", "one", NULL, &c);
    produce(f, "one", "x0");
    produce(f, "one", "x1");
    produce(f, "one", "x2");
    got g[GOT_MAX], h[GOT_MAX];
    size_t n;
    assert_int_equal(recv_st(f, "bc", "one", NULL, 10, LONG_INV, g, &n), BRK_INVAL);
    assert_int_equal(recv_st(f, "bc", "one", "bad member", 10, LONG_INV, g, &n),
                     BRK_INVAL);
    assert_int_equal(recv_member(f, "bc", "one", "m1", 10, 5000, g), 3);
    assert_int_equal(recv_member(f, "bc", "one", "m2", 10, 5000, h), 3);
    for (int i = 0; i < 3; i++) {
        char body[8];
        snprintf(body, sizeof body, "x%d", i);
        assert_true(find_body(g, 3, body) >= 0);
        assert_true(find_body(h, 3, body) >= 0);
    }
    /* Own progress: m1 acks everything, m2 nothing. */
    for (int i = 0; i < 3; i++)
        ack_ok(f, "bc", g[i].receipt);
    /* A receipt of one member is no use to... nothing else to check: acks
     * are per receipt.  Now m2's messages time out (and wait 10 s for their
     * retry), m1's do not. */
    advance(f, 5000);
    advance(f, 10000);
    assert_int_equal(recv_member(f, "bc", "one", "m1", 10, LONG_INV, g), 0);
    assert_int_equal(recv_member(f, "bc", "one", "m2", 10, LONG_INV, h), 3);
    for (int i = 0; i < 3; i++)
        assert_int_equal(h[i].delivery_count, 2);
    brk_group_lag_row r1 = lag_row(f, "bc", "one", "m1", -1);
    brk_group_lag_row r2 = lag_row(f, "bc", "one", "m2", -1);
    assert_int_equal(r1.committed_offset, 3);
    assert_int_equal(r1.lag, 0);
    assert_int_equal(r2.committed_offset, 0);
    assert_int_equal(r2.lag, 3);
    assert_int_equal(r2.inflight, 3);
    /* A member that joins later starts ... at least it gets work. */
    produce(f, "one", "x3");
    assert_true(recv_member(f, "bc", "one", "m1", 10, LONG_INV, g) == 1);
    assert_string_equal(g[0].body, "x3");
}

/* ==== flow control ======================================================== */

static void max_inflight_bounds_the_batch_and_then_says_limit(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    c.max_inflight = 3;
    put_ok(f, "fc", "one", NULL, &c);
    for (int i = 0; i < 10; i++)
        produce(f, "one", "m");
    got g[GOT_MAX];
    size_t n;
    assert_int_equal(recv(f, "fc", "one", 10, LONG_INV, g), 3);
    assert_int_equal(recv_st(f, "fc", "one", NULL, 10, LONG_INV, g, &n), BRK_LIMIT);
    assert_int_equal(n, 0);
    ack_ok(f, "fc", g[0].receipt);
    got h[GOT_MAX];
    assert_int_equal(recv(f, "fc", "one", 10, LONG_INV, h), 1);
    assert_int_equal(lag_row(f, "fc", "one", NULL, -1).inflight, 3);
}

static void max_inflight_bytes_bounds_the_batch(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    c.max_inflight_bytes = 2500;
    put_ok(f, "fb", "one", NULL, &c);
    static char big[1000];
    memset(big, 'b', sizeof big);
    for (int i = 0; i < 10; i++)
        produce_full(f, "one", -1, NULL, NULL, big, sizeof big, NULL, NULL);
    got g[GOT_MAX];
    size_t n = recv(f, "fb", "one", 10, LONG_INV, g);
    assert_true(n >= 1 && n <= 3);
    size_t m;
    assert_int_equal(recv_st(f, "fb", "one", NULL, 10, LONG_INV, g + n, &m),
                     BRK_LIMIT);
    assert_int_equal(m, 0);
    for (size_t i = 0; i < n; i++)
        ack_ok(f, "fb", g[i].receipt);
    assert_true(recv(f, "fb", "one", 10, LONG_INV, g) >= 1);
}

static void waiter_at_the_byte_bound_sleeps_until_an_ack_frees_room(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    c.max_inflight_bytes = 1000;        /* one 600-byte message at a time */
    put_ok(f, "wb", "one", NULL, &c);
    static char body[600];
    memset(body, 'w', sizeof body);
    produce_full(f, "one", -1, NULL, NULL, body, sizeof body, NULL, NULL);
    produce_full(f, "one", -1, NULL, NULL, body, sizeof body, NULL, NULL);
    got g[GOT_MAX];
    assert_int_equal(recv(f, "wb", "one", 1, LONG_INV, g), 1);
    size_t n;
    assert_int_equal(recv_st(f, "wb", "one", NULL, 1, LONG_INV, g + 1, &n),
                     BRK_LIMIT);
    /* The next message does not fit: the waiter must not fire (a consumer
     * would wake, find nothing, wait again, at 100% CPU)... */
    waker w;
    waker_init(&w);
    brk_receive_req r = req_of("wb", "one", 1);
    uint64_t id = 0;
    assert_int_equal(brk_group_wait(f->g, &r, now_ms(f) + 20000, wake_cb, &w,
                                    &id), BRK_OK);
    assert_int_equal(wait_fired(f, &w, 1, 100), 0);
    /* ...until the ack frees the bytes. */
    ack_ok(f, "wb", g[0].receipt);
    assert_int_equal(wait_fired(f, &w, 1, 5000), 1);
    assert_int_equal(recv(f, "wb", "one", 1, LONG_INV, g), 1);
    waker_destroy(&w);
}

static void receive_wait_at_the_byte_bound_does_not_spin(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    c.max_inflight_bytes = 1000;
    put_ok(f, "ws", "one", NULL, &c);
    static char body[600];
    memset(body, 's', sizeof body);
    produce_full(f, "one", -1, NULL, NULL, body, sizeof body, NULL, NULL);
    produce_full(f, "one", -1, NULL, NULL, body, sizeof body, NULL, NULL);
    got g[GOT_MAX];
    assert_int_equal(recv(f, "ws", "one", 1, LONG_INV, g), 1);
    brk_receive_req r = req_of("ws", "one", 1);
    brk_receive_batch *b = NULL;
    struct timespec c0, c1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
    int64_t t0 = mono_ms();
    brk_status st = brk_group_receive_wait(f->g, &r, 300, &b);
    int64_t took = mono_ms() - t0;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
    brk_receive_batch_free(b);
    int64_t cpu = (int64_t)(c1.tv_sec - c0.tv_sec) * 1000
                  + (c1.tv_nsec - c0.tv_nsec) / 1000000;
    assert_true(st == BRK_OK || st == BRK_LIMIT);
    assert_true(took >= 250);
    if (cpu > took / 4)
        fail_msg("receive_wait used %lld ms of CPU in %lld ms",
                 (long long)cpu, (long long)took);
}

static void ack_at_the_bound_wakes_waiters_of_the_other_topic(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    c.max_inflight = 1;
    put_ok(f, "mt", "one", NULL, &c);
    put_ok(f, "mt", "other", NULL, &c);
    produce(f, "one", "a");
    produce(f, "other", "b");
    got a = recv_one(f, "mt", "one", LONG_INV);
    got g[GOT_MAX];
    size_t n;
    assert_int_equal(recv_st(f, "mt", "other", NULL, 1, LONG_INV, g, &n),
                     BRK_LIMIT);
    waker w;
    waker_init(&w);
    brk_receive_req r = req_of("mt", "other", 1);
    uint64_t id = 0;
    assert_int_equal(brk_group_wait(f->g, &r, now_ms(f) + 20000, wake_cb, &w,
                                    &id), BRK_OK);
    assert_int_equal(wait_fired(f, &w, 1, 100), 0);
    ack_ok(f, "mt", a.receipt);         /* frees room for "other" too */
    assert_int_equal(wait_fired(f, &w, 1, 5000), 1);
    got b = recv_one(f, "mt", "other", LONG_INV);
    assert_string_equal(b.body, "b");
    waker_destroy(&w);
}

/* ==== lag ================================================================= */

static void lag_rows_report_per_queue_and_totals(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    c.max_deliveries = 1;
    put_ok(f, "lag", "two", NULL, &c);
    brk_append_res r[5];
    const int32_t qs[5] = { 0, 0, 0, 1, 1 };
    for (int i = 0; i < 5; i++) {
        char body[8];
        snprintf(body, sizeof body, "l%d", i);
        r[i] = produce_q(f, "two", qs[i], body);
        advance(f, 1000);
    }
    got g[GOT_MAX];
    assert_int_equal(recv(f, "lag", "two", 10, LONG_INV, g), 5);
    /* Ack l0 and l2 of queue 0 (l1 stays), nothing of queue 1. */
    ack_ok(f, "lag", g[find_body(g, 5, "l0")].receipt);
    ack_ok(f, "lag", g[find_body(g, 5, "l2")].receipt);

    brk_group_lag_row q0 = lag_row(f, "lag", "two", NULL, 0);
    assert_int_equal(q0.max_offset, 3);
    assert_int_equal(q0.committed_offset, 1);
    assert_int_equal(q0.lag, 2);
    assert_int_equal(q0.inflight, 1);
    assert_int_equal(q0.oldest_unacked_ms, r[1].store_ms);
    brk_group_lag_row q1 = lag_row(f, "lag", "two", NULL, 1);
    assert_int_equal(q1.max_offset, 2);
    assert_int_equal(q1.committed_offset, 0);
    assert_int_equal(q1.lag, 2);
    assert_int_equal(q1.inflight, 2);
    assert_int_equal(q1.oldest_unacked_ms, r[3].store_ms);
    brk_group_lag_row tot = lag_row(f, "lag", "two", NULL, -1);
    assert_int_equal(tot.max_offset, 5);
    assert_int_equal(tot.committed_offset, 1);
    assert_int_equal(tot.lag, 4);
    assert_int_equal(tot.inflight, 3);
    assert_int_equal(tot.oldest_unacked_ms, r[1].store_ms);
    assert_int_equal(tot.dead_letters, 0);

    /* l1 goes to the dead letters, then the rest is acked. */
    nack_ok(f, "lag", g[find_body(g, 5, "l1")].receipt, 0, NULL);
    ack_ok(f, "lag", g[find_body(g, 5, "l3")].receipt);
    ack_ok(f, "lag", g[find_body(g, 5, "l4")].receipt);
    tot = lag_row(f, "lag", "two", NULL, -1);
    assert_int_equal(tot.committed_offset, 5);
    assert_int_equal(tot.lag, 0);
    assert_int_equal(tot.inflight, 0);
    assert_int_equal(tot.oldest_unacked_ms, 0);
    assert_int_equal(tot.dead_letters, 1);
}

static void lag_covers_every_subscribed_topic(void **state)
{
    fx *f = *state;
    bool created = false;
    assert_int_equal(put_st(f, "multi", "one", NULL, NULL, &created), BRK_OK);
    assert_true(created);
    assert_int_equal(put_st(f, "multi", "two", NULL, NULL, &created), BRK_OK);
    assert_false(created);
    produce(f, "one", "o");
    produce_q(f, "two", 1, "t");
    assert_string_equal(recv_one(f, "multi", "two", LONG_INV).body, "t");
    assert_int_equal(lag_row(f, "multi", "one", NULL, -1).lag, 1);
    assert_int_equal(lag_row(f, "multi", "one", NULL, 0).max_offset, 1);
    assert_int_equal(lag_row(f, "multi", "two", NULL, -1).inflight, 1);
    assert_int_equal(lag_row(f, "multi", "two", NULL, 1).max_offset, 1);
    assert_int_equal(lag_row(f, "multi", "two", NULL, 0).max_offset, 0);
}

/* ==== restart, persistence, duplicates ===================================== */

static void restart_redelivers_in_flight_messages_and_not_acked_ones(void **state)
{
    fx *f = *state;
    put_ok(f, "rs", "one", NULL, NULL);
    produce(f, "one", "r0");
    produce(f, "one", "r1");
    produce(f, "one", "r2");
    got g[GOT_MAX];
    assert_int_equal(recv(f, "rs", "one", 10, LONG_INV, g), 3);
    int i1 = find_body(g, 3, "r1");
    ack_ok(f, "rs", g[i1].receipt);           /* out of order: r0 still open */
    restart(f);
    /* Receipts from before the restart are stale. */
    assert_int_equal(brk_group_ack(f->g, "rs", g[find_body(g, 3, "r0")].receipt),
                     BRK_CONFLICT);
    got h[GOT_MAX];
    size_t n = recv(f, "rs", "one", 10, LONG_INV, h);
    assert_int_equal(n, 2);
    assert_true(find_body(h, n, "r0") >= 0);
    assert_true(find_body(h, n, "r2") >= 0);
    for (size_t i = 0; i < n; i++)
        ack_ok(f, "rs", h[i].receipt);
    restart(f);
    expect_none(f, "rs", "one");
    assert_int_equal(lag_row(f, "rs", "one", NULL, -1).committed_offset, 3);
}

static void persist_every_ack_keeps_acks_across_a_crash(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    c.persist_every_ack = true;
    put_ok(f, "pe", "one", NULL, &c);
    char body[8];
    for (int i = 0; i < 5; i++) {
        snprintf(body, sizeof body, "p%d", i);
        produce(f, "one", body);
    }
    got g[GOT_MAX];
    assert_int_equal(recv(f, "pe", "one", 10, LONG_INV, g), 5);
    ack_ok(f, "pe", g[find_body(g, 5, "p0")].receipt);
    ack_ok(f, "pe", g[find_body(g, 5, "p2")].receipt);
    ack_ok(f, "pe", g[find_body(g, 5, "p3")].receipt);
    crash_restart(f);
    got h[GOT_MAX];
    size_t n = recv(f, "pe", "one", 10, LONG_INV, h);
    assert_int_equal(n, 2);
    assert_true(find_body(h, n, "p1") >= 0 && find_body(h, n, "p4") >= 0);
}

static void persist_interval_keeps_acks_across_a_crash(void **state)
{
    fx *f = *state;
    f->go.persist_interval_ms = 1000;
    restart(f);
    put_ok(f, "pi", "one", NULL, NULL);
    char body[8];
    for (int i = 0; i < 5; i++) {
        snprintf(body, sizeof body, "p%d", i);
        produce(f, "one", body);
    }
    got g[GOT_MAX];
    assert_int_equal(recv(f, "pi", "one", 10, LONG_INV, g), 5);
    ack_ok(f, "pi", g[find_body(g, 5, "p0")].receipt);
    ack_ok(f, "pi", g[find_body(g, 5, "p2")].receipt);
    ack_ok(f, "pi", g[find_body(g, 5, "p3")].receipt);
    advance(f, 1000);                         /* persistence is due */
    crash_restart(f);
    got h[GOT_MAX];
    size_t n = recv(f, "pi", "one", 10, LONG_INV, h);
    assert_int_equal(n, 2);
    assert_true(find_body(h, n, "p1") >= 0 && find_body(h, n, "p4") >= 0);
}

static void duplicates_after_a_crash_are_at_most_the_acks_since_last_persist(void **state)
{
    fx *f = *state;
    f->go.persist_interval_ms = 1000;
    restart(f);
    put_ok(f, "dup", "one", NULL, NULL);
    char body[8];
    for (int i = 0; i < 10; i++) {
        snprintf(body, sizeof body, "d%d", i);
        produce(f, "one", body);
    }
    got g[GOT_MAX];
    assert_int_equal(recv(f, "dup", "one", 10, LONG_INV, g), 10);
    /* d0..d3 acked and persisted; d4..d6 acked after the last persist; d7..d9
     * never acked. */
    for (int i = 0; i < 4; i++) {
        snprintf(body, sizeof body, "d%d", i);
        ack_ok(f, "dup", g[find_body(g, 10, body)].receipt);
    }
    advance(f, 1000);
    for (int i = 4; i < 7; i++) {
        snprintf(body, sizeof body, "d%d", i);
        ack_ok(f, "dup", g[find_body(g, 10, body)].receipt);
    }
    crash_restart(f);
    got h[GOT_MAX];
    size_t n = recv(f, "dup", "one", 64, LONG_INV, h);
    for (int i = 0; i < 10; i++) {
        snprintf(body, sizeof body, "d%d", i);
        int at = find_body(h, n, body);
        if (i < 4 && at >= 0)
            fail_msg("%s was acked and persisted before the crash, yet came again",
                     body);
        if (i >= 7 && at < 0)
            fail_msg("%s was never acked, yet was not redelivered", body);
    }
    assert_true(n >= 3 && n <= 6);
    /* After draining, nothing more comes. */
    for (size_t i = 0; i < n; i++)
        ack_ok(f, "dup", h[i].receipt);
    advance(f, 3 * 3600 * 1000LL);
    expect_none(f, "dup", "one");
}

static void async_nacked_message_survives_power_loss_after_a_save(void **state)
{
    fx *f = *state;
    f->so.flush_mode = BRK_FLUSH_ASYNC;
    f->go.persist_interval_ms = 100;
    restart(f);
    put_ok(f, "an", "one", NULL, NULL);
    produce(f, "one", "precious");
    assert_int_equal(brk_store_flush(f->s), BRK_OK);   /* durable */
    got m = recv_one(f, "an", "one", LONG_INV);
    nack_ok(f, "an", m.receipt, 0, "later");    /* retry copy, not synced */
    advance(f, 200);                            /* state.groups saved */
    crash_restart(f);
    /* The original is settled in the saved state, so its retry copy must
     * have survived too: it comes after the retry delay (10 s). */
    size_t seen = 0;
    for (int i = 0; i < 6; i++) {
        got g[GOT_MAX];
        size_t n = recv(f, "an", "one", 10, LONG_INV, g);
        for (size_t j = 0; j < n; j++) {
            assert_string_equal(g[j].body, "precious");
            ack_ok(f, "an", g[j].receipt);
        }
        seen += n;
        advance(f, 10000);
    }
    assert_true(seen >= 1);
}

static void group_configuration_survives_a_crash(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    c.fifo = true;
    c.max_deliveries = 7;
    put_ok(f, "cfg", "one", "a || b", &c);
    crash_restart(f);
    /* Still FIFO with the filter: c is skipped, a then b one at a time. */
    produce_tag(f, "one", "c", "c0");
    produce_tag(f, "one", "a", "a0");
    produce_tag(f, "one", "b", "b0");
    got a = recv_one(f, "cfg", "one", LONG_INV);
    assert_string_equal(a.body, "a0");
    expect_none(f, "cfg", "one");
    ack_ok(f, "cfg", a.receipt);
    assert_string_equal(recv_one(f, "cfg", "one", LONG_INV).body, "b0");
    bool created = true;
    assert_int_equal(put_st(f, "cfg", "one", "a || b", &c, &created), BRK_OK);
    assert_false(created);
}

/* ==== retention =========================================================== */

static void group_cursor_holds_segments_until_consumed(void **state)
{
    fx *f = *state;
    f->so.segment_bytes = 4096;
    f->so.retention_ms = 1000;
    f->go.persist_interval_ms = 1000;
    restart(f);
    put_ok(f, "ret", "one", NULL, NULL);
    char body[48];
    for (int i = 0; i < 200; i++) {
        snprintf(body, sizeof body, "retained-message-%03d-0123456789", i);
        produce(f, "one", body);
    }
    brk_store_stats st;
    brk_store_get_stats(f->s, &st);
    assert_true(st.segments >= 4);
    advance(f, 5000);
    unsigned del = 99;
    assert_int_equal(brk_store_retention_run(f->s, &del), BRK_OK);
    assert_int_equal(del, 0);
    /* Consume the first half: only segments wholly below it may go. */
    got g[GOT_MAX];
    size_t total = 0;
    while (total < 100) {
        size_t n = recv(f, "ret", "one", 100 - (uint32_t)total, LONG_INV, g);
        assert_true(n > 0);
        for (size_t i = 0; i < n; i++) {
            snprintf(body, sizeof body, "retained-message-%03zu-0123456789",
                     total + i);
            assert_string_equal(g[i].body, body);
            ack_ok(f, "ret", g[i].receipt);
        }
        total += n;
    }
    advance(f, 5000);
    assert_int_equal(brk_store_retention_run(f->s, &del), BRK_OK);
    uint64_t min, max;
    assert_int_equal(brk_store_queue_range(f->s, "one", 0, &min, &max), BRK_OK);
    assert_true(min <= 100);
    /* Everything not consumed is still delivered, in order. */
    while (total < 200) {
        size_t n = recv(f, "ret", "one", 64, LONG_INV, g);
        assert_true(n > 0);
        for (size_t i = 0; i < n; i++) {
            snprintf(body, sizeof body, "retained-message-%03zu-0123456789",
                     total + i);
            assert_string_equal(g[i].body, body);
            ack_ok(f, "ret", g[i].receipt);
        }
        total += n;
    }
    advance(f, 5000);
    assert_int_equal(brk_store_retention_run(f->s, &del), BRK_OK);
    brk_store_get_stats(f->s, &st);
    assert_true(st.segments <= 2);
    assert_int_equal(brk_store_queue_range(f->s, "one", 0, &min, &max), BRK_OK);
    assert_true(min > 100);
}

static void retention_cursor_is_restored_after_a_restart(void **state)
{
    fx *f = *state;
    f->so.segment_bytes = 4096;
    f->so.retention_ms = 1000;
    restart(f);
    put_ok(f, "ret2", "one", NULL, NULL);
    char body[48];
    for (int i = 0; i < 150; i++) {
        snprintf(body, sizeof body, "kept-across-restart-%03d-012345678", i);
        produce(f, "one", body);
    }
    restart(f);
    advance(f, 5000);
    unsigned del = 99;
    assert_int_equal(brk_store_retention_run(f->s, &del), BRK_OK);
    assert_int_equal(del, 0);
    got g[GOT_MAX];
    size_t n = recv(f, "ret2", "one", 200, LONG_INV, g);
    assert_int_equal(n, 150);
    assert_string_equal(g[0].body, "kept-across-restart-000-012345678");
}

static void cursor_holds_segments_while_groups_are_closed_and_store_open(void **state)
{
    fx *f = *state;
    f->so.segment_bytes = 4096;
    f->so.retention_ms = 1000;
    restart(f);
    put_ok(f, "ret3", "one", NULL, NULL);
    char body[48];
    for (int i = 0; i < 150; i++) {
        snprintf(body, sizeof body, "kept-while-closed-%03d-0123456789", i);
        produce(f, "one", body);
    }
    assert_int_equal(brk_groups_close(f->g), BRK_OK);
    f->g = NULL;
    /* The store stays open: retention must keep what the group has not
     * consumed. */
    brk_fake_clock_advance(&f->clk, 5000);
    unsigned del = 99;
    assert_int_equal(brk_store_retention_run(f->s, &del), BRK_OK);
    assert_int_equal(del, 0);
    assert_int_equal(brk_groups_open(&f->g, f->s, &f->go, f->err,
                                     sizeof f->err), BRK_OK);
    got g[GOT_MAX];
    size_t n = recv(f, "ret3", "one", 200, LONG_INV, g);
    assert_int_equal(n, 150);
    assert_string_equal(g[0].body, "kept-while-closed-000-0123456789");
}

/* ==== long polling ========================================================= */

static void waiter_fires_on_an_append_to_the_topic(void **state)
{
    fx *f = *state;
    put_ok(f, "lp", "one", NULL, NULL);
    waker w;
    waker_init(&w);
    brk_receive_req r = req_of("lp", "one", 10);
    uint64_t id = 0;
    assert_int_equal(brk_group_wait(f->g, &r, now_ms(f) + 20000, wake_cb, &w, &id),
                     BRK_OK);
    assert_int_equal(wait_fired(f, &w, 1, 100), 0);
    produce(f, "other", "not for us");
    assert_int_equal(wait_fired(f, &w, 1, 100), 0);
    produce(f, "one", "m");
    assert_int_equal(wait_fired(f, &w, 1, 5000), 1);
    /* It ran once and is gone. */
    assert_false(brk_group_wait_cancel(f->g, id));
    advance(f, 30000);
    assert_int_equal(wait_fired(f, &w, 2, 100), 1);
    assert_string_equal(recv_one(f, "lp", "one", LONG_INV).body, "m");
    waker_destroy(&w);
}

/* No thundering herd: an append wakes one parked receive per group, and a
 * receive that fills its batch passes the wake on to the next waiter. */
static void append_wakes_one_waiter_per_group_and_a_full_batch_wakes_the_next(void **state)
{
    fx *f = *state;
    put_ok(f, "ga", "one", NULL, NULL);
    put_ok(f, "gb", "one", NULL, NULL);
    enum { NA = 10, NB = 3 };
    waker wa, wb;
    waker_init(&wa);
    waker_init(&wb);
    brk_receive_req ra = req_of("ga", "one", 1), rb = req_of("gb", "one", 1);
    uint64_t ids[NA + NB];
    for (int i = 0; i < NA; i++)
        assert_int_equal(brk_group_wait(f->g, &ra, now_ms(f) + 20000, wake_cb,
                                        &wa, &ids[i]), BRK_OK);
    for (int i = 0; i < NB; i++)
        assert_int_equal(brk_group_wait(f->g, &rb, now_ms(f) + 20000, wake_cb,
                                        &wb, &ids[NA + i]), BRK_OK);
    produce(f, "one", "m1");
    produce(f, "one", "m2");
    /* Two appends: two waiters of each group, not all thirteen. */
    assert_int_equal(wait_fired(f, &wa, 2, 5000), 2);
    assert_int_equal(wait_fired(f, &wb, 2, 5000), 2);
    assert_int_equal(wait_fired(f, &wa, 3, 100), 2);
    /* A receive of max 1 fills its batch: one more waiter of ga wakes, none
     * of gb. */
    brk_receive_batch *b = NULL;
    assert_int_equal(brk_group_receive(f->g, &ra, &b), BRK_OK);
    assert_int_equal(b->count, 1);
    brk_receive_batch_free(b);
    assert_int_equal(wait_fired(f, &wa, 3, 5000), 3);
    assert_int_equal(wait_fired(f, &wb, 3, 100), 2);
    /* A batch with room to spare wakes nobody. */
    ra.max = 10;
    assert_int_equal(brk_group_receive(f->g, &ra, &b), BRK_OK);
    assert_int_equal(b->count, 1);
    brk_receive_batch_free(b);
    assert_int_equal(wait_fired(f, &wa, 4, 100), 3);
    for (int i = 0; i < NA + NB; i++)
        (void)brk_group_wait_cancel(f->g, ids[i]);
    waker_destroy(&wa);
    waker_destroy(&wb);
}

static void waiter_fires_at_its_deadline_when_nothing_comes(void **state)
{
    fx *f = *state;
    put_ok(f, "lpd", "one", NULL, NULL);
    waker w;
    waker_init(&w);
    brk_receive_req r = req_of("lpd", "one", 10);
    uint64_t id;
    assert_int_equal(brk_group_wait(f->g, &r, now_ms(f) + 5000, wake_cb, &w, &id),
                     BRK_OK);
    advance(f, 4999);
    assert_int_equal(wait_fired(f, &w, 1, 50), 0);
    advance(f, 1);
    assert_int_equal(wait_fired(f, &w, 1, 5000), 1);
    advance(f, 60000);
    assert_int_equal(wait_fired(f, &w, 2, 50), 1);
    waker_destroy(&w);
}

static void waiter_fires_before_wait_returns_when_messages_are_ready(void **state)
{
    fx *f = *state;
    put_ok(f, "lpr", "one", NULL, NULL);
    produce(f, "one", "ready");
    waker w;
    waker_init(&w);
    brk_receive_req r = req_of("lpr", "one", 10);
    uint64_t id;
    assert_int_equal(brk_group_wait(f->g, &r, now_ms(f) + 20000, wake_cb, &w, &id),
                     BRK_OK);
    assert_int_equal(fired(&w), 1);
    assert_false(brk_group_wait_cancel(f->g, id));
    waker_destroy(&w);
}

static void waiter_fires_when_a_retry_comes_due(void **state)
{
    fx *f = *state;
    put_ok(f, "lpt", "one", NULL, NULL);
    produce(f, "one", "m");
    got a = recv_one(f, "lpt", "one", LONG_INV);
    nack_ok(f, "lpt", a.receipt, 0, NULL);
    waker w;
    waker_init(&w);
    brk_receive_req r = req_of("lpt", "one", 10);
    uint64_t id;
    assert_int_equal(brk_group_wait(f->g, &r, now_ms(f) + 25000, wake_cb, &w, &id),
                     BRK_OK);
    advance(f, 9999);
    assert_int_equal(wait_fired(f, &w, 1, 50), 0);
    advance(f, 1);
    assert_int_equal(wait_fired(f, &w, 1, 5000), 1);
    assert_int_equal(recv_one(f, "lpt", "one", LONG_INV).delivery_count, 2);
    waker_destroy(&w);
}

static void cancelled_waiter_never_fires(void **state)
{
    fx *f = *state;
    put_ok(f, "lpc", "one", NULL, NULL);
    waker w;
    waker_init(&w);
    brk_receive_req r = req_of("lpc", "one", 10);
    uint64_t id;
    assert_int_equal(brk_group_wait(f->g, &r, now_ms(f) + 5000, wake_cb, &w, &id),
                     BRK_OK);
    assert_true(brk_group_wait_cancel(f->g, id));
    assert_false(brk_group_wait_cancel(f->g, id));
    produce(f, "one", "m");
    advance(f, 10000);
    assert_int_equal(wait_fired(f, &w, 1, 100), 0);
    waker_destroy(&w);
}

static void waiter_in_sync_mode_fires_only_once_the_record_is_durable(void **state)
{
    fx *f = *state;
    put_ok(f, "lps", "one", NULL, NULL);
    waker w;
    waker_init(&w);
    brk_receive_req r = req_of("lps", "one", 10);
    uint64_t id;
    assert_int_equal(brk_group_wait(f->g, &r, now_ms(f) + 20000, wake_cb, &w, &id),
                     BRK_OK);
    brk_append_req a;
    memset(&a, 0, sizeof a);
    a.topic = "one";
    a.queue = -1;
    a.body = (brk_bytes){ "deferred", 8 };
    a.defer_sync = true;
    brk_append_res res;
    assert_int_equal(brk_store_append(f->s, &a, &res), BRK_OK);
    /* Written, not yet durable: invisible, and the waiter keeps waiting. */
    expect_none(f, "lps", "one");
    assert_int_equal(wait_fired(f, &w, 1, 100), 0);
    assert_int_equal(brk_store_flush(f->s), BRK_OK);
    assert_int_equal(wait_fired(f, &w, 1, 5000), 1);
    assert_string_equal(recv_one(f, "lps", "one", LONG_INV).body, "deferred");
    waker_destroy(&w);
}

typedef struct many_waiters {
    atomic_int runs[1000];
} many_waiters;

typedef struct mw_slot {
    many_waiters *m;
    int i;
} mw_slot;

static void mw_cb(void *ctx)
{
    mw_slot *s = ctx;
    atomic_fetch_add(&s->m->runs[s->i], 1);
}

static void thousand_waiters_all_fire_at_their_deadline(void **state)
{
    fx *f = *state;
    put_ok(f, "lpm", "one", NULL, NULL);
    many_waiters *m = calloc(1, sizeof *m);
    mw_slot *slots = calloc(1000, sizeof *slots);
    assert_non_null(m);
    assert_non_null(slots);
    brk_receive_req r = req_of("lpm", "one", 1);
    int64_t dl = now_ms(f) + 3000;
    for (int i = 0; i < 1000; i++) {
        slots[i].m = m;
        slots[i].i = i;
        uint64_t id;
        assert_int_equal(brk_group_wait(f->g, &r, dl, mw_cb, &slots[i], &id), BRK_OK);
    }
    advance(f, 2999);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(atomic_load(&m->runs[i]), 0);
    advance(f, 1);
    int64_t end = mono_ms() + 5000;
    int done = 0;
    while (mono_ms() < end) {
        done = 0;
        for (int i = 0; i < 1000; i++)
            done += atomic_load(&m->runs[i]) > 0;
        if (done == 1000)
            break;
        tick(f);
        sleep_ms(5);
    }
    assert_int_equal(done, 1000);
    sleep_ms(20);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(atomic_load(&m->runs[i]), 1);
    free(slots);
    free(m);
}

static void close_runs_every_pending_waiter(void **state)
{
    fx *f = *state;
    put_ok(f, "lpx", "one", NULL, NULL);
    waker w;
    waker_init(&w);
    brk_receive_req r = req_of("lpx", "one", 10);
    uint64_t id;
    assert_int_equal(brk_group_wait(f->g, &r, now_ms(f) + 20000, wake_cb, &w, &id),
                     BRK_OK);
    assert_int_equal(brk_groups_close(f->g), BRK_OK);
    f->g = NULL;
    assert_int_equal(fired(&w), 1);
    waker_destroy(&w);
}

typedef struct rw_call {
    fx *f;
    brk_status st;
    size_t count;
    atomic_bool done;
} rw_call;

static void *rw_call_main(void *arg)
{
    rw_call *c = arg;
    brk_receive_req r = req_of("cw", "one", 10);
    brk_receive_batch *b = NULL;
    c->st = brk_group_receive_wait(c->f->g, &r, 20000, &b);
    c->count = b ? b->count : 0;
    brk_receive_batch_free(b);
    atomic_store(&c->done, true);
    return NULL;
}

static void close_while_receive_wait_blocks_returns_both(void **state)
{
    fx *f = *state;
    put_ok(f, "cw", "one", NULL, NULL);
    rw_call c = { .f = f, .st = BRK_AGAIN };
    atomic_init(&c.done, false);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, rw_call_main, &c), 0);
    sleep_ms(200);                      /* it is waiting by now */
    assert_false(atomic_load(&c.done));
    int64_t t0 = mono_ms();
    assert_int_equal(brk_groups_close(f->g), BRK_OK);
    int64_t took = mono_ms() - t0;
    pthread_join(th, NULL);
    f->g = NULL;
    assert_true(took < 5000);
    assert_true(c.st == BRK_OK || c.st == BRK_CLOSED);
    assert_int_equal(c.count, 0);
}

typedef struct late_producer {
    fx *f;
    int delay_ms;
    atomic_bool appended;
    atomic_bool done;           /* the receiver returned */
} late_producer;

static void *late_producer_main(void *arg)
{
    late_producer *p = arg;
    sleep_ms(p->delay_ms);
    produce(p->f, "one", "late");
    atomic_store(&p->appended, true);
    /* Should the wake be lost, end the wait (on the fake clock) after 8 s
     * of real time so the test fails instead of hanging. */
    int64_t end = mono_ms() + 8000;
    while (!atomic_load(&p->done) && mono_ms() < end)
        sleep_ms(5);
    if (!atomic_load(&p->done)) {
        brk_fake_clock_advance(&p->f->clk, 60000);
        (void)brk_groups_tick(p->f->g);
    }
    return NULL;
}

static void receive_wait_returns_when_a_producer_thread_appends(void **state)
{
    fx *f = *state;
    put_ok(f, "rw", "one", NULL, NULL);
    late_producer p = { .f = f, .delay_ms = 100 };
    atomic_init(&p.appended, false);
    atomic_init(&p.done, false);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, late_producer_main, &p), 0);
    brk_receive_req r = req_of("rw", "one", 10);
    brk_receive_batch *b = NULL;
    int64_t t0 = mono_ms();
    brk_status st = brk_group_receive_wait(f->g, &r, 10000, &b);
    int64_t took = mono_ms() - t0;
    atomic_store(&p.done, true);
    pthread_join(th, NULL);
    assert_int_equal(st, BRK_OK);
    assert_non_null(b);
    assert_int_equal(b->count, 1);
    assert_int_equal(b->msgs[0].rec.body.len, 4);
    assert_memory_equal(b->msgs[0].rec.body.ptr, "late", 4);
    brk_receive_batch_free(b);
    assert_true(took >= 50);
    assert_true(took < 5000);
}

static void receive_wait_returns_at_once_when_messages_are_ready(void **state)
{
    fx *f = *state;
    produce(f, "one", "now");
    brk_receive_req r = req_of("rwn", "one", 10);
    brk_receive_batch *b = NULL;
    int64_t t0 = mono_ms();
    assert_int_equal(brk_group_receive_wait(f->g, &r, 10000, &b), BRK_OK);
    assert_true(mono_ms() - t0 < 1000);
    assert_int_equal(b->count, 1);
    brk_receive_batch_free(b);
    b = NULL;
    assert_int_equal(brk_group_receive_wait(f->g, &r, BRK_WAIT_MAX_MS + 1, &b),
                     BRK_INVAL);
    if (b)
        brk_receive_batch_free(b);
}

/* Real clock, groups' own thread. */
static void receive_wait_gives_an_empty_batch_after_wait_ms(void **state)
{
    fx *f = *state;
    put_ok(f, "rwe", "one", NULL, NULL);
    brk_receive_req r = req_of("rwe", "one", 10);
    brk_receive_batch *b = NULL;
    int64_t t0 = mono_ms();
    assert_int_equal(brk_group_receive_wait(f->g, &r, 300, &b), BRK_OK);
    int64_t took = mono_ms() - t0;
    assert_non_null(b);
    assert_int_equal(b->count, 0);
    brk_receive_batch_free(b);
    assert_true(took >= 250);
    assert_true(took < 3000);
}

/* Real clock, groups' own thread: the deadline fires without any tick. */
static void waiter_deadline_fires_on_the_groups_thread(void **state)
{
    fx *f = *state;
    put_ok(f, "lpb", "one", NULL, NULL);
    waker w;
    waker_init(&w);
    brk_receive_req r = req_of("lpb", "one", 10);
    uint64_t id;
    int64_t t0 = mono_ms();
    assert_int_equal(brk_group_wait(f->g, &r, now_ms(f) + 200, wake_cb, &w, &id),
                     BRK_OK);
    assert_int_equal(wait_fired(f, &w, 1, 5000), 1);
    int64_t took = mono_ms() - t0;
    assert_true(took >= 150 && took < 3000);
    waker_destroy(&w);
}

/* ==== group configuration ================================================= */

static void group_put_creates_then_updates(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    assert_int_equal(c.max_deliveries, BRK_MAX_DELIVERIES_DEFAULT);
    assert_int_equal(c.max_inflight, 1000);
    assert_int_equal(c.max_inflight_bytes, 100u << 20);
    assert_false(c.fifo);
    assert_false(c.broadcast);
    assert_false(c.persist_every_ack);
    bool created = false;
    assert_int_equal(put_st(f, "pg", "one", NULL, &c, &created), BRK_OK);
    assert_true(created);
    assert_int_equal(put_st(f, "pg", "one", NULL, &c, &created), BRK_OK);
    assert_false(created);
    c.max_deliveries = 5;
    assert_int_equal(put_st(f, "pg", "one", "a", &c, &created), BRK_OK);
    assert_false(created);
    /* No progress yet: the mode may still change. */
    c.fifo = true;
    assert_int_equal(put_st(f, "pg", "one", "a", &c, &created), BRK_OK);
    c.fifo = false;
    assert_int_equal(put_st(f, "pg", "one", "a", &c, &created), BRK_OK);
    /* The filter changed to "a": b is skipped. */
    produce_tag(f, "one", "b", "b");
    produce_tag(f, "one", "a", "a");
    got a = recv_one(f, "pg", "one", LONG_INV);
    assert_string_equal(a.body, "a");
    ack_ok(f, "pg", a.receipt);
    /* Survives a restart. */
    restart(f);
    assert_int_equal(put_st(f, "pg", "one", "a", &c, &created), BRK_OK);
    assert_false(created);
}

static void group_put_changing_fifo_or_broadcast_with_progress_is_conflict(void **state)
{
    fx *f = *state;
    brk_group_config c;
    brk_group_config_init(&c);
    put_ok(f, "pc", "one", NULL, &c);
    produce(f, "one", "m");
    ack_ok(f, "pc", recv_one(f, "pc", "one", LONG_INV).receipt);
    c.fifo = true;
    assert_int_equal(put_st(f, "pc", "one", NULL, &c, NULL), BRK_CONFLICT);
    c.fifo = false;
    c.broadcast = true;
    assert_int_equal(put_st(f, "pc", "one", NULL, &c, NULL), BRK_CONFLICT);
    c.broadcast = false;
    c.max_inflight = 10;
    assert_int_equal(put_st(f, "pc", "one", NULL, &c, NULL), BRK_OK);
    /* Still clustering: the message stays acked. */
    expect_none(f, "pc", "one");
}

static void group_put_refuses_bad_names(void **state)
{
    fx *f = *state;
    char long_name[BRK_GROUP_MAX + 2];
    memset(long_name, 'g', sizeof long_name - 1);
    long_name[sizeof long_name - 1] = '\0';
    static const char *const bad[] = { "", "__internal", "a b", "a/b", "a:b",
                                       "caf\xc3\xa9", "tab\t" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (put_st(f, bad[i], "one", NULL, NULL, NULL) != BRK_INVAL)
            fail_msg("group name \"%s\" accepted", bad[i]);
    assert_int_equal(put_st(f, long_name, "one", NULL, NULL, NULL), BRK_INVAL);
    assert_int_equal(put_st(f, NULL, "one", NULL, NULL, NULL), BRK_INVAL);
    long_name[BRK_GROUP_MAX] = '\0';          /* exactly 64: fine */
    assert_int_equal(put_st(f, long_name, "one", NULL, NULL, NULL), BRK_OK);
    assert_int_equal(put_st(f, "Az09._-", "one", NULL, NULL, NULL), BRK_OK);
}

static void group_put_refuses_bad_filters_and_config(void **state)
{
    fx *f = *state;
    static const char *const bad[] = { "a ||", "|| a", "a || || b", "||" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (put_st(f, "bf", "one", bad[i], NULL, NULL) != BRK_INVAL)
            fail_msg("filter \"%s\" accepted", bad[i]);
    char longf[BRK_FILTER_MAX + 2];
    memset(longf, 'x', sizeof longf - 1);
    longf[sizeof longf - 1] = '\0';
    assert_int_equal(put_st(f, "bf", "one", longf, NULL, NULL), BRK_INVAL);
    brk_group_config c;
    brk_group_config_init(&c);
    c.max_deliveries = 0;
    assert_int_equal(put_st(f, "bf", "one", NULL, &c, NULL), BRK_INVAL);
    c.max_deliveries = 1001;
    assert_int_equal(put_st(f, "bf", "one", NULL, &c, NULL), BRK_INVAL);
    c.max_deliveries = 1000;
    assert_int_equal(put_st(f, "bf", "one", NULL, &c, NULL), BRK_OK);
    /* Unknown topic (the store does not auto-create); bad topic name. */
    assert_int_equal(put_st(f, "bf", "nosuch", NULL, NULL, NULL), BRK_NOTFOUND);
    assert_int_equal(put_st(f, "bf", NULL, NULL, NULL, NULL), BRK_INVAL);
    assert_int_equal(put_st(f, "bf", "__txn_half", NULL, NULL, NULL), BRK_INVAL);
}

/* ==== concurrency ========================================================== */

#define CC_PRODUCERS 4
#define CC_PER_PRODUCER 400
#define CC_TOTAL (CC_PRODUCERS * CC_PER_PRODUCER)
#define CC_CONSUMERS 4

typedef struct conc {
    fx *f;
    atomic_bool stop;
    atomic_int acked_distinct;
    atomic_uchar acked[CC_TOTAL];
    atomic_uint bad;              /* unexpected statuses */
    atomic_int bad_status;
    atomic_uint nacks, drops, conflicts, receives;
} conc;

typedef struct cc_thread {
    conc *c;
    int id;
    pthread_t th;
} cc_thread;

static void cc_bad(conc *c, brk_status st)
{
    if (atomic_fetch_add(&c->bad, 1) == 0)
        atomic_store(&c->bad_status, (int)st);
}

static void *cc_producer(void *arg)
{
    cc_thread *t = arg;
    char body[16];
    for (int i = 0; i < CC_PER_PRODUCER; i++) {
        snprintf(body, sizeof body, "c%05d", t->id * CC_PER_PRODUCER + i);
        brk_append_req r;
        memset(&r, 0, sizeof r);
        r.topic = "orders";
        r.queue = -1;
        r.body = (brk_bytes){ body, strlen(body) };
        brk_append_res res;
        brk_status st = brk_store_append(t->c->f->s, &r, &res);
        if (st != BRK_OK)
            cc_bad(t->c, st);
    }
    return NULL;
}

static void *cc_consumer(void *arg)
{
    cc_thread *t = arg;
    conc *c = t->c;
    brk_groups *g = c->f->g;
    uint64_t rng = 0x9E3779B97F4A7C15ull * (uint64_t)(t->id + 1);
    brk_receive_req r = req_of("cc", "orders", 8);
    r.invisible_ms = 30000;
    while (!atomic_load(&c->stop)) {
        brk_receive_batch *b = NULL;
        brk_status st = t->id % 2
                        ? brk_group_receive_wait(g, &r, 20, &b)
                        : brk_group_receive(g, &r, &b);
        if (st != BRK_OK && st != BRK_LIMIT) {
            cc_bad(c, st);
            if (b)
                brk_receive_batch_free(b);
            continue;
        }
        atomic_fetch_add(&c->receives, 1);
        size_t n = b ? b->count : 0;
        for (size_t i = 0; i < n; i++) {
            const brk_received *m = &b->msgs[i];
            char body[16];
            copy_str(body, sizeof body, m->rec.body);
            int idx = -1;
            if (sscanf(body, "c%d", &idx) != 1 || idx < 0 || idx >= CC_TOTAL) {
                cc_bad(c, BRK_BADREC);
                continue;
            }
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            unsigned d = (unsigned)(rng >> 33) % 100;
            if (m->delivery_count <= 2 && d < 15) {
                st = brk_group_nack(g, "cc", m->receipt, 0, "random");
                if (st == BRK_OK)
                    atomic_fetch_add(&c->nacks, 1);
                else if (st == BRK_CONFLICT)
                    atomic_fetch_add(&c->conflicts, 1);
                else
                    cc_bad(c, st);
            } else if (m->delivery_count <= 2 && d < 25) {
                atomic_fetch_add(&c->drops, 1);       /* let it time out */
            } else {
                st = brk_group_ack(g, "cc", m->receipt);
                if (st == BRK_OK) {
                    if (atomic_exchange(&c->acked[idx], 1) == 0)
                        atomic_fetch_add(&c->acked_distinct, 1);
                } else if (st == BRK_CONFLICT) {
                    atomic_fetch_add(&c->conflicts, 1);
                } else {
                    cc_bad(c, st);
                }
            }
        }
        if (b)
            brk_receive_batch_free(b);
        if (n == 0 && t->id % 2 == 0)
            sleep_ms(1);
    }
    return NULL;
}

static void *cc_ticker(void *arg)
{
    cc_thread *t = arg;
    conc *c = t->c;
    while (!atomic_load(&c->stop)) {
        brk_fake_clock_advance(&c->f->clk, 50);
        brk_status st = brk_groups_tick(c->f->g);
        if (st != BRK_OK)
            cc_bad(c, st);
        sleep_ms(1);
    }
    return NULL;
}

static void concurrent_producers_consumers_and_ticks_lose_nothing(void **state)
{
    fx *f = *state;
    put_ok(f, "cc", "orders", NULL, NULL);
    conc *c = calloc(1, sizeof *c);
    assert_non_null(c);
    c->f = f;
    cc_thread prod[CC_PRODUCERS], cons[CC_CONSUMERS], tk;
    for (int i = 0; i < CC_CONSUMERS; i++) {
        cons[i] = (cc_thread){ .c = c, .id = i };
        assert_int_equal(pthread_create(&cons[i].th, NULL, cc_consumer, &cons[i]), 0);
    }
    tk = (cc_thread){ .c = c, .id = 0 };
    assert_int_equal(pthread_create(&tk.th, NULL, cc_ticker, &tk), 0);
    for (int i = 0; i < CC_PRODUCERS; i++) {
        prod[i] = (cc_thread){ .c = c, .id = i };
        assert_int_equal(pthread_create(&prod[i].th, NULL, cc_producer, &prod[i]), 0);
    }
    for (int i = 0; i < CC_PRODUCERS; i++)
        pthread_join(prod[i].th, NULL);
    int64_t end = mono_ms() + 120000;
    while (atomic_load(&c->acked_distinct) < CC_TOTAL && mono_ms() < end
           && atomic_load(&c->bad) == 0)
        sleep_ms(10);
    atomic_store(&c->stop, true);
    for (int i = 0; i < CC_CONSUMERS; i++)
        pthread_join(cons[i].th, NULL);
    pthread_join(tk.th, NULL);
    print_message("concurrency: %d acked, %u nacks, %u dropped, %u conflicts, "
                  "%u receives\n", atomic_load(&c->acked_distinct),
                  atomic_load(&c->nacks), atomic_load(&c->drops),
                  atomic_load(&c->conflicts), atomic_load(&c->receives));
    if (atomic_load(&c->bad))
        fail_msg("%u unexpected statuses, first %s", atomic_load(&c->bad),
                 brk_status_name((brk_status)atomic_load(&c->bad_status)));
    int missing = -1;
    for (int i = 0; i < CC_TOTAL; i++)
        if (!atomic_load(&c->acked[i])) {
            missing = i;
            break;
        }
    if (missing >= 0)
        fail_msg("%d of %d messages acked; c%05d never was",
                 atomic_load(&c->acked_distinct), CC_TOTAL, missing);
    brk_batch *d = NULL;
    assert_int_equal(brk_group_dead_letters(f->g, "cc", 0, 10, &d), BRK_OK);
    assert_int_equal(d->count, 0);
    brk_batch_free(d);
    tick(f);
    brk_group_lag_row tot = lag_row(f, "cc", "orders", NULL, -1);
    assert_int_equal(tot.max_offset, CC_TOTAL);
    assert_int_equal(tot.lag, 0);
    assert_int_equal(tot.inflight, 0);
    free(c);
}

static void get_config_returns_what_put_set(void **state)
{
    fx *f = *state;
    brk_group_config c, cur;
    brk_group_config_init(&c);
    c.fifo = true;
    c.max_deliveries = 3;
    c.max_inflight = 77;
    assert_int_equal(brk_group_get_config(f->g, "cfgd", &cur), BRK_NOTFOUND);
    put_ok(f, "cfgd", "orders", NULL, &c);
    assert_int_equal(brk_group_get_config(f->g, "cfgd", &cur), BRK_OK);
    assert_true(cur.fifo);
    assert_false(cur.broadcast);
    assert_int_equal(cur.max_deliveries, 3);
    assert_int_equal(cur.max_inflight, 77);
    restart(f);
    assert_int_equal(brk_group_get_config(f->g, "cfgd", &cur), BRK_OK);
    assert_int_equal(cur.max_inflight, 77);
    assert_int_equal(brk_group_get_config(f->g, "bad name!", &cur), BRK_INVAL);
}

static void groups_list_names_every_group_in_creation_order(void **state)
{
    fx *f = *state;
    brk_group_name *names = NULL;
    size_t n = 7;
    assert_int_equal(brk_groups_list(f->g, &names, &n), BRK_OK);
    assert_int_equal(n, 0);
    assert_null(names);
    produce_full(f, "orders", -1, "k", "t", "x", 1, "h", "v");
    put_ok(f, "zeta", "orders", NULL, NULL);
    recv_one(f, "alpha", "orders", LONG_INV);   /* created by receive */
    assert_int_equal(brk_groups_list(f->g, &names, &n), BRK_OK);
    assert_int_equal(n, 2);
    assert_string_equal(names[0], "zeta");
    assert_string_equal(names[1], "alpha");
    free(names);
    restart(f);
    assert_int_equal(brk_groups_list(f->g, &names, &n), BRK_OK);
    assert_int_equal(n, 2);
    free(names);
    assert_int_equal(brk_groups_list(f->g, NULL, &n), BRK_INVAL);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
#define TR(fn) cmocka_unit_test_setup_teardown(fn, setup_real, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        /* receive basics */
        T(receive_auto_creates_the_group_and_returns_record_fields),
        T(receive_returns_a_batch_with_distinct_receipts_up_to_max),
        T(receive_with_max_0_or_above_256_is_invalid),
        T(receive_with_bad_group_or_unknown_topic_is_refused),
        T(groups_list_names_every_group_in_creation_order),
        T(get_config_returns_what_put_set),
        /* invisibility and receipts */
        T(received_message_is_invisible_then_reappears_with_a_new_receipt),
        T(default_invisibility_applies_when_receive_gives_zero),
        T(ack_removes_the_message_for_good),
        T(ack_twice_is_conflict),
        T(malformed_receipt_is_invalid),
        T(ack_in_unknown_group_is_notfound),
        /* nack and retries */
        cmocka_unit_test(retry_delay_follows_the_rocketmq_schedule),
        T(nack_redelivers_on_the_retry_schedule_to_the_millisecond),
        T(nack_delay_rounds_up_to_a_delay_level),
        T(change_invisibility_extends_and_shortens),
        T(receipt_stays_valid_after_change_invisibility),
        /* dead letters */
        T(max_deliveries_moves_the_message_to_the_dead_letters),
        T(reason_of_an_earlier_nack_survives_a_reasonless_nack_of_its_retry),
        T(invisibility_running_out_at_max_deliveries_dead_letters_too),
        T(dead_letters_list_oldest_first_from_an_index),
        T(replay_appends_dead_letters_back_once_with_their_ids),
        /* FIFO */
        T(fifo_delivers_one_message_per_queue_until_acked),
        T(fifo_nack_keeps_its_place_in_the_queue),
        T(fifo_invisibility_timeout_keeps_its_place),
        T(fifo_other_queues_keep_flowing_while_one_is_blocked),
        T(fifo_dead_letter_unblocks_the_queue),
        /* sharing, filters, broadcast */
        T(more_consumers_than_queues_all_get_work),
        T(tag_filters_select_tags_and_skip_the_others),
        T(broadcast_gives_every_member_every_message),
        /* flow control */
        T(max_inflight_bounds_the_batch_and_then_says_limit),
        T(max_inflight_bytes_bounds_the_batch),
        T(waiter_at_the_byte_bound_sleeps_until_an_ack_frees_room),
        TR(receive_wait_at_the_byte_bound_does_not_spin),
        T(ack_at_the_bound_wakes_waiters_of_the_other_topic),
        /* lag */
        T(lag_rows_report_per_queue_and_totals),
        T(lag_covers_every_subscribed_topic),
        /* restart and persistence */
        T(restart_redelivers_in_flight_messages_and_not_acked_ones),
        T(persist_every_ack_keeps_acks_across_a_crash),
        T(persist_interval_keeps_acks_across_a_crash),
        T(duplicates_after_a_crash_are_at_most_the_acks_since_last_persist),
        T(async_nacked_message_survives_power_loss_after_a_save),
        T(group_configuration_survives_a_crash),
        /* retention */
        T(group_cursor_holds_segments_until_consumed),
        T(retention_cursor_is_restored_after_a_restart),
        T(cursor_holds_segments_while_groups_are_closed_and_store_open),
        /* long polling */
        T(waiter_fires_on_an_append_to_the_topic),
        T(append_wakes_one_waiter_per_group_and_a_full_batch_wakes_the_next),
        T(waiter_fires_at_its_deadline_when_nothing_comes),
        T(waiter_fires_before_wait_returns_when_messages_are_ready),
        T(waiter_fires_when_a_retry_comes_due),
        T(cancelled_waiter_never_fires),
        T(waiter_in_sync_mode_fires_only_once_the_record_is_durable),
        T(thousand_waiters_all_fire_at_their_deadline),
        T(close_runs_every_pending_waiter),
        TR(close_while_receive_wait_blocks_returns_both),
        T(receive_wait_returns_when_a_producer_thread_appends),
        T(receive_wait_returns_at_once_when_messages_are_ready),
        TR(receive_wait_gives_an_empty_batch_after_wait_ms),
        TR(waiter_deadline_fires_on_the_groups_thread),
        /* configuration */
        T(group_put_creates_then_updates),
        T(group_put_changing_fifo_or_broadcast_with_progress_is_conflict),
        T(group_put_refuses_bad_names),
        T(group_put_refuses_bad_filters_and_config),
        /* concurrency */
        T(concurrent_producers_consumers_and_ticks_lose_nothing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
