/*
 * test_delay_faults.c - the delay scheduler in two corners a review found:
 * a fired record whose segment retention already took, seen again at
 * restart; and a record whose properties leave no room for the pair a
 * compaction copy adds.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "broker/delay.h"
#include "broker/store.h"
#include "fake_clock.h"
#include "io_sim.h"

#define T0 1700000000000LL

typedef struct fx {
    brk_sim *sim;
    brk_fake_clock clk;
    brk_store_opts so;
    brk_delay_opts dopt;
    brk_store *s;
    brk_delay *d;
    char err[256];
} fx;

static void open_all(fx *f)
{
    f->so.uuid_seed++;              /* ids never repeat across reopens */
    if (brk_store_open(&f->s, "/d", &f->so, f->err, sizeof f->err) != BRK_OK)
        fail_msg("store open: %s", f->err);
    if (brk_delay_open(&f->d, f->s, &f->dopt, f->err, sizeof f->err) != BRK_OK)
        fail_msg("delay open: %s", f->err);
}

static void close_all(fx *f)
{
    brk_delay_close(f->d);
    brk_store_close(f->s);
    f->d = NULL;
    f->s = NULL;
}

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
    if (f->d || f->s)
        close_all(f);
    brk_sim_close(f->sim);
    free(f);
    return 0;
}

static brk_status send_at(fx *f, const char *topic, const void *body,
                          size_t len, int64_t at, brk_bytes props)
{
    brk_append_req r;
    memset(&r, 0, sizeof r);
    r.topic = topic;
    r.queue = -1;
    r.body = (brk_bytes){ body, len };
    r.props = props;
    brk_delay_res res;
    return brk_delay_send(f->d, &r, at, &res);
}

static void pad(fx *f, size_t len)
{
    static char b[8192];
    brk_append_req r;
    memset(&r, 0, sizeof r);
    r.topic = "pad";
    r.queue = -1;
    r.body = (brk_bytes){ b, len };
    brk_append_res ar;
    assert_int_equal(brk_store_append(f->s, &r, &ar), BRK_OK);
}

static void delivered_record_gone_by_retention_is_not_retried_forever(void **state)
{
    fx *f = *state;
    /* One fire op names L1 (delivered) and L2 (its delivery fails: the
     * disk budget is reached); retention then takes L1's segment, and the
     * process restarts with that op still above effect_from. */
    f->so.segment_bytes = 4096;
    f->so.retention_ms = 1;
    f->so.disk_budget_bytes = 60000;
    f->dopt.state_interval_ms = 1;
    f->dopt.compact_after_ms = 0;
    open_all(f);
    assert_int_equal(brk_topic_create(f->s, "t", 1), BRK_OK);
    assert_int_equal(brk_topic_create(f->s, "pad", 1), BRK_OK);
    assert_int_equal(send_at(f, "t", "L1", 2, T0 + 100, (brk_bytes){ 0 }), BRK_OK);
    for (int i = 0; i < 4; i++)
        pad(f, 3000);
    static char big[3000];
    assert_int_equal(send_at(f, "t", big, sizeof big, T0 + 100, (brk_bytes){ 0 }),
                     BRK_OK);
    brk_store_stats ss;
    for (;;) {
        brk_store_get_stats(f->s, &ss);
        if (ss.disk_bytes + 3400 > f->so.disk_budget_bytes)
            break;
        pad(f, ss.disk_bytes + 3600 > f->so.disk_budget_bytes ? 50 : 1500);
    }
    brk_fake_clock_advance(&f->clk, 200);
    unsigned n = 0;
    (void)brk_delay_tick(f->d, &n);
    assert_int_equal(n, 1);                   /* L1 out, L2 refused: FULL */
    brk_fake_clock_advance(&f->clk, 10);
    (void)brk_delay_tick(f->d, NULL);
    unsigned deleted = 0;
    assert_int_equal(brk_store_retention_run(f->s, &deleted), BRK_OK);
    close_all(f);
    open_all(f);
    brk_delay_stats st;
    brk_delay_get_stats(f->d, &st);
    /* L2 is still owed; L1 is done, whatever the log still holds of it. */
    assert_true(st.pending <= 1);
    /* Make room and let the retries run: everything settles. */
    for (int i = 0; i < 40; i++) {
        brk_fake_clock_advance(&f->clk, 31000);
        (void)brk_delay_tick(f->d, NULL);
        (void)brk_store_retention_run(f->s, &deleted);
    }
    brk_delay_get_stats(f->d, &st);
    uint64_t errors = st.errors_total;
    for (int i = 0; i < 5; i++) {
        brk_fake_clock_advance(&f->clk, 31000);
        (void)brk_delay_tick(f->d, NULL);
    }
    brk_delay_get_stats(f->d, &st);
    /* No record keeps failing for ever: either all delivered, or only the
     * genuinely undeliverable L2 (the disk is still full) is retried. */
    assert_true(st.pending <= 1);
    if (st.pending == 0)
        assert_int_equal(st.errors_total, errors);
}

static void record_without_room_for_a_compaction_copy_is_refused(void **state)
{
    fx *f = *state;
    f->dopt.compact_after_ms = 1000;
    open_all(f);
    assert_int_equal(brk_topic_create(f->s, "t", 1), BRK_OK);
    size_t vlen = 65501;
    char *v = malloc(vlen);
    uint8_t *buf = malloc(70000);
    assert_non_null(v);
    assert_non_null(buf);
    memset(v, 'a', vlen);
    brk_prop p = { { "k", 1 }, { v, vlen } };
    size_t len = 0;
    assert_int_equal(brk_props_encode(&p, 1, buf, 70000, &len), BRK_OK);
    /* Fits the send's own pairs, not a copy's extra one: refused now. */
    assert_int_equal(send_at(f, "t", "x", 1, T0 + 3600000, (brk_bytes){ buf, len }),
                     BRK_TOOBIG);
    /* And ordinary records keep compacting. */
    assert_int_equal(send_at(f, "t", "y", 1, T0 + 3600000, (brk_bytes){ 0 }), BRK_OK);
    for (int i = 0; i < 5; i++) {
        brk_fake_clock_advance(&f->clk, 31000);
        assert_int_equal(brk_delay_tick(f->d, NULL), BRK_OK);
    }
    brk_delay_stats st;
    brk_delay_get_stats(f->d, &st);
    assert_true(st.compacted_total >= 1);
    free(v);
    free(buf);
}

static void never_compacting_does_not_overflow(void **state)
{
    fx *f = *state;
    f->dopt.compact_after_ms = INT64_MAX;
    open_all(f);
    assert_int_equal(send_at(f, "t", "y", 1, T0 + 3600000, (brk_bytes){ 0 }), BRK_OK);
    for (int i = 0; i < 5; i++) {
        brk_fake_clock_advance(&f->clk, 800000);
        assert_int_equal(brk_delay_tick(f->d, NULL), BRK_OK);
    }
    brk_delay_stats st;
    brk_delay_get_stats(f->d, &st);
    assert_int_equal(st.compacted_total, 0);
    assert_int_equal(st.fired_total, 1);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(delivered_record_gone_by_retention_is_not_retried_forever),
        T(record_without_room_for_a_compaction_copy_is_refused),
        T(never_compacting_does_not_overflow),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
