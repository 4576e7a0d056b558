/*
 * test_store_state.c - what the store offers the modules layered on it:
 * named state files (atomic replace, CRC-checked), the system-property rule
 * on user appends, and the clock/auto-create accessors.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "broker/store.h"
#include "fake_clock.h"
#include "io_sim.h"

#define DIR "/s"

typedef struct fx {
    brk_sim *sim;
    brk_fake_clock clk;
    brk_store_opts o;
    brk_store *s;
    char err[256];
} fx;

static void reopen(fx *f)
{
    brk_store_close(f->s);
    f->s = NULL;
    brk_status st = brk_store_open(&f->s, DIR, &f->o, f->err, sizeof f->err);
    if (st != BRK_OK)
        fail_msg("open failed: %s: %s", brk_status_name(st), f->err);
}

static int setup(void **state)
{
    fx *f = calloc(1, sizeof *f);
    assert_non_null(f);
    assert_int_equal(brk_sim_open(&f->sim, 9), BRK_OK);
    brk_fake_clock_init(&f->clk, 1700000000000LL);
    brk_store_opts_init(&f->o);
    f->o.io = brk_sim_io(f->sim);
    f->o.clock = &f->clk.clock;
    f->o.no_background = true;
    f->o.flush_mode = BRK_FLUSH_SYNC;
    reopen(f);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    brk_store_close(f->s);
    brk_sim_close(f->sim);
    free(f);
    return 0;
}

static void state_file_round_trips_and_survives_power_loss(void **state)
{
    fx *f = *state;
    const char data[] = "watermarks 1 2 3";
    assert_int_equal(brk_store_state_write(f->s, "txn", data, sizeof data), BRK_OK);
    assert_int_equal(brk_sim_crash(f->sim, BRK_SIM_DROP_ALL), BRK_OK);
    reopen(f);
    void *buf = NULL;
    size_t len = 0;
    assert_int_equal(brk_store_state_read(f->s, "txn", &buf, &len), BRK_OK);
    assert_int_equal(len, sizeof data);
    assert_memory_equal(buf, data, sizeof data);
    free(buf);
}

static void rewriting_a_state_file_replaces_it_whole(void **state)
{
    fx *f = *state;
    assert_int_equal(brk_store_state_write(f->s, "delay", "a long first value", 18), BRK_OK);
    assert_int_equal(brk_store_state_write(f->s, "delay", "b", 1), BRK_OK);
    void *buf = NULL;
    size_t len = 0;
    assert_int_equal(brk_store_state_read(f->s, "delay", &buf, &len), BRK_OK);
    assert_int_equal(len, 1);
    assert_memory_equal(buf, "b", 1);
    free(buf);
}

static void empty_state_file_is_allowed(void **state)
{
    fx *f = *state;
    assert_int_equal(brk_store_state_write(f->s, "x", NULL, 0), BRK_OK);
    void *buf = NULL;
    size_t len = 7;
    assert_int_equal(brk_store_state_read(f->s, "x", &buf, &len), BRK_OK);
    assert_int_equal(len, 0);
    free(buf);
}

static void missing_state_file_is_notfound(void **state)
{
    fx *f = *state;
    void *buf = (void *)1;
    size_t len = 7;
    assert_int_equal(brk_store_state_read(f->s, "never", &buf, &len), BRK_NOTFOUND);
    assert_null(buf);
    assert_int_equal(len, 0);
}

static void bad_state_names_are_refused(void **state)
{
    fx *f = *state;
    const char *bad[] = { "", "Upper", "a/b", "..", "a.b", "sp ace",
                          "0123456789012345678901234567890123456789012345678901234567890123456789" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(brk_store_state_write(f->s, bad[i], "x", 1), BRK_INVAL);
        void *buf;
        size_t len;
        assert_int_equal(brk_store_state_read(f->s, bad[i], &buf, &len), BRK_INVAL);
    }
    assert_int_equal(brk_store_state_write(f->s, NULL, "x", 1), BRK_INVAL);
}

static void oversized_state_is_toobig(void **state)
{
    fx *f = *state;
    size_t n = (size_t)BRK_STATE_MAX + 1;
    char *big = calloc(1, n);
    assert_non_null(big);
    assert_int_equal(brk_store_state_write(f->s, "big", big, n), BRK_TOOBIG);
    free(big);
}

static void damaged_state_file_is_reported_corrupt(void **state)
{
    fx *f = *state;
    assert_int_equal(brk_store_state_write(f->s, "txn", "0123456789", 10), BRK_OK);
    /* Flip one payload byte on the simulated disk. */
    uint8_t b = 'X';
    assert_int_equal(brk_sim_write_raw(f->sim, DIR "/state.txn", 14, &b, 1), BRK_OK);
    void *buf = NULL;
    size_t len = 0;
    assert_int_equal(brk_store_state_read(f->s, "txn", &buf, &len), BRK_CORRUPT);
    assert_null(buf);
    assert_non_null(strstr(brk_store_errstr(f->s), "state.txn"));
}

static void failed_state_write_leaves_the_old_contents(void **state)
{
    fx *f = *state;
    assert_int_equal(brk_store_state_write(f->s, "txn", "old", 3), BRK_OK);
    assert_int_equal(brk_sim_fail_next(f->sim, BRK_SIM_OP_RENAME, EIO, 1), BRK_OK);
    assert_int_not_equal(brk_store_state_write(f->s, "txn", "new", 3), BRK_OK);
    reopen(f);
    void *buf = NULL;
    size_t len = 0;
    assert_int_equal(brk_store_state_read(f->s, "txn", &buf, &len), BRK_OK);
    assert_memory_equal(buf, "old", 3);
    free(buf);
}

static void user_append_with_system_property_is_refused(void **state)
{
    fx *f = *state;
    brk_prop p = { { "\x1ftopic", 6 }, { "x", 1 } };
    uint8_t block[64];
    size_t blen;
    assert_int_equal(brk_props_encode(&p, 1, block, sizeof block, &blen), BRK_OK);
    brk_append_req r;
    memset(&r, 0, sizeof r);
    r.topic = "orders";
    r.queue = -1;
    r.props.ptr = block;
    r.props.len = blen;
    brk_append_res res;
    assert_int_equal(brk_store_append(f->s, &r, &res), BRK_INVAL);
    r.allow_internal = true;
    assert_int_equal(brk_store_append(f->s, &r, &res), BRK_OK);
}

static void strip_sys_keeps_only_user_properties(void **state)
{
    (void)state;
    brk_prop p[3] = {
        { { "a", 1 }, { "1", 1 } },
        { { "\x1fsys", 4 }, { "zz", 2 } },
        { { "traceparent", 11 }, { "00-x", 4 } },
    };
    uint8_t block[128], out[128];
    size_t blen, olen;
    assert_int_equal(brk_props_encode(p, 3, block, sizeof block, &blen), BRK_OK);
    brk_bytes b = { block, blen };
    assert_true(brk_props_has_sys(b));
    assert_int_equal(brk_props_strip_sys(b, out, sizeof out, &olen), BRK_OK);
    brk_bytes o = { out, olen };
    assert_false(brk_props_has_sys(o));
    assert_int_equal(brk_props_validate(o), BRK_OK);
    brk_bytes v;
    assert_int_equal(brk_props_get(o, "a", &v), BRK_OK);
    assert_int_equal(brk_props_get(o, "traceparent", &v), BRK_OK);
    assert_memory_equal(v.ptr, "00-x", 4);
    assert_int_equal(brk_props_get(o, "\x1fsys", &v), BRK_NOTFOUND);
    /* Only system properties: the result is the empty block. */
    assert_int_equal(brk_props_encode(&p[1], 1, block, sizeof block, &blen), BRK_OK);
    b.len = blen;
    assert_int_equal(brk_props_strip_sys(b, out, sizeof out, &olen), BRK_OK);
    assert_int_equal(olen, 0);
    /* Too small an output buffer. */
    assert_int_equal(brk_props_encode(p, 3, block, sizeof block, &blen), BRK_OK);
    b.len = blen;
    assert_int_equal(brk_props_strip_sys(b, out, 4, &olen), BRK_RANGE);
}

static void accessors_report_clock_and_auto_create(void **state)
{
    fx *f = *state;
    assert_ptr_equal(brk_store_clock(f->s), &f->clk.clock);
    assert_true(brk_store_auto_create(f->s));
    f->o.auto_create_topics = false;
    reopen(f);
    assert_false(brk_store_auto_create(f->s));
}

typedef struct heard {
    int appended, durable;
    char topic[32];
    uint16_t queue;
    uint64_t log_offset, durable_end;
} heard;

static void on_appended(void *ctx, const char *topic, uint16_t queue,
                        uint64_t log_offset)
{
    heard *h = ctx;
    h->appended++;
    snprintf(h->topic, sizeof h->topic, "%s", topic);
    h->queue = queue;
    h->log_offset = log_offset;
}

static void on_durable(void *ctx, uint64_t end)
{
    heard *h = ctx;
    h->durable++;
    h->durable_end = end;
}

static void listener_hears_appends_and_durable_advances(void **state)
{
    fx *f = *state;
    heard h;
    memset(&h, 0, sizeof h);
    brk_store_listener l = { on_appended, on_durable, &h };
    brk_store_set_listener(f->s, &l);
    brk_append_req r;
    memset(&r, 0, sizeof r);
    r.topic = "orders";
    r.queue = 2;
    r.body = (brk_bytes){ "x", 1 };
    brk_append_res res;
    assert_int_equal(brk_store_append(f->s, &r, &res), BRK_OK);
    assert_int_equal(h.appended, 1);
    assert_string_equal(h.topic, "orders");
    assert_int_equal(h.queue, 2);
    assert_int_equal(h.log_offset, res.log_offset);
    /* SYNC mode: the append was made durable, and the listener heard it. */
    assert_true(h.durable >= 1);
    assert_true(h.durable_end > res.log_offset);
    /* A refused append is not heard. */
    r.queue = 99;
    assert_int_not_equal(brk_store_append(f->s, &r, &res), BRK_OK);
    assert_int_equal(h.appended, 1);
    /* Removed: silence. */
    brk_store_set_listener(f->s, NULL);
    r.queue = 0;
    assert_int_equal(brk_store_append(f->s, &r, &res), BRK_OK);
    assert_int_equal(h.appended, 1);
}

typedef struct slow_listener {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool in_callback, release, removed;
    brk_store *s;
} slow_listener;

static void slow_appended(void *ctx, const char *topic, uint16_t queue,
                          uint64_t log_offset)
{
    (void)topic;
    (void)queue;
    (void)log_offset;
    slow_listener *sl = ctx;
    pthread_mutex_lock(&sl->mu);
    sl->in_callback = true;
    pthread_cond_broadcast(&sl->cv);
    while (!sl->release)
        pthread_cond_wait(&sl->cv, &sl->mu);
    pthread_mutex_unlock(&sl->mu);
}

static void *append_once(void *arg)
{
    slow_listener *sl = arg;
    brk_append_req r;
    memset(&r, 0, sizeof r);
    r.topic = "orders";
    r.queue = -1;
    r.body = (brk_bytes){ "x", 1 };
    brk_append_res res;
    (void)brk_store_append(sl->s, &r, &res);
    return NULL;
}

static void *remove_listener(void *arg)
{
    slow_listener *sl = arg;
    brk_store_set_listener(sl->s, NULL);
    pthread_mutex_lock(&sl->mu);
    sl->removed = true;
    pthread_cond_broadcast(&sl->cv);
    pthread_mutex_unlock(&sl->mu);
    return NULL;
}

static void removing_the_listener_waits_for_a_callback_in_flight(void **state)
{
    fx *f = *state;
    slow_listener sl;
    memset(&sl, 0, sizeof sl);
    pthread_mutex_init(&sl.mu, NULL);
    pthread_cond_init(&sl.cv, NULL);
    sl.s = f->s;
    brk_store_listener l = { slow_appended, NULL, &sl };
    brk_store_set_listener(f->s, &l);
    pthread_t ta, tr;
    assert_int_equal(pthread_create(&ta, NULL, append_once, &sl), 0);
    pthread_mutex_lock(&sl.mu);
    while (!sl.in_callback)
        pthread_cond_wait(&sl.cv, &sl.mu);
    pthread_mutex_unlock(&sl.mu);
    assert_int_equal(pthread_create(&tr, NULL, remove_listener, &sl), 0);
    usleep(50000);
    pthread_mutex_lock(&sl.mu);
    assert_false(sl.removed);           /* still inside the callback */
    sl.release = true;
    pthread_cond_broadcast(&sl.cv);
    pthread_mutex_unlock(&sl.mu);
    pthread_join(ta, NULL);
    pthread_join(tr, NULL);
    assert_true(sl.removed);
    pthread_mutex_destroy(&sl.mu);
    pthread_cond_destroy(&sl.cv);
}

static void queue_seek_finds_the_first_entry_at_or_after_a_log_offset(void **state)
{
    fx *f = *state;
    brk_append_res mine[10], other;
    for (int i = 0; i < 10; i++) {
        brk_append_req r;
        memset(&r, 0, sizeof r);
        r.topic = "mine";
        r.queue = 0;
        r.body = (brk_bytes){ "m", 1 };
        assert_int_equal(brk_store_append(f->s, &r, &mine[i]), BRK_OK);
        r.topic = "other";              /* interleaved: gaps in log offsets */
        assert_int_equal(brk_store_append(f->s, &r, &other), BRK_OK);
    }
    uint64_t q;
    for (int i = 0; i < 10; i++) {
        assert_int_equal(brk_store_queue_seek(f->s, "mine", 0, 0,
                                              mine[i].log_offset, &q), BRK_OK);
        assert_int_equal(q, (uint64_t)i);
        /* Just past a record: the next one. */
        assert_int_equal(brk_store_queue_seek(f->s, "mine", 0, 0,
                                              mine[i].log_offset + 1, &q),
                         BRK_OK);
        assert_int_equal(q, (uint64_t)i + 1);
        /* A correct hint gives the same answer. */
        assert_int_equal(brk_store_queue_seek(f->s, "mine", 0, (uint64_t)i,
                                              mine[i].log_offset, &q), BRK_OK);
        assert_int_equal(q, (uint64_t)i);
    }
    assert_int_equal(brk_store_queue_seek(f->s, "mine", 0, 0, 0, &q), BRK_OK);
    assert_int_equal(q, 0);
    assert_int_equal(brk_store_queue_seek(f->s, "mine", 0, 0, UINT64_MAX, &q),
                     BRK_OK);
    assert_int_equal(q, 10);
    assert_int_equal(brk_store_queue_seek(f->s, "nosuch", 0, 0, 0, &q),
                     BRK_NOTFOUND);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(state_file_round_trips_and_survives_power_loss),
        T(rewriting_a_state_file_replaces_it_whole),
        T(empty_state_file_is_allowed),
        T(missing_state_file_is_notfound),
        T(bad_state_names_are_refused),
        T(oversized_state_is_toobig),
        T(damaged_state_file_is_reported_corrupt),
        T(failed_state_write_leaves_the_old_contents),
        T(user_append_with_system_property_is_refused),
        cmocka_unit_test(strip_sys_keeps_only_user_properties),
        T(accessors_report_clock_and_auto_create),
        T(listener_hears_appends_and_durable_advances),
        T(removing_the_listener_waits_for_a_callback_in_flight),
        T(queue_seek_finds_the_first_entry_at_or_after_a_log_offset),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
