/*
 * test_txn_faults.c - the transaction module under failures and races that
 * a review found and the contract tests do not reach: a failed open, a
 * state save racing a prepare or a commit, a verdict that fails while its
 * check comes due, and a module with no checker.
 *
 * A pass-through I/O layer over the simulated disk lets a test run code in
 * the middle of a store write (to place a tick exactly between two steps of
 * a verdict) or fail one write.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker/store.h"
#include "broker/txn.h"
#include "fake_clock.h"
#include "io_sim.h"

#define DIR "/tf"
#define T0  1700000000000LL

/* ---- a pass-through I/O layer with one hook on pwrite ------------------- */

typedef struct hook_io {
    brk_io io;                   /* first: handed to the store */
    brk_io *inner;
    /* When armed and a pwrite's bytes contain `needle`: disarm, call fn,
     * then fail that write with fail_rc (0: let it through). */
    const char *needle;
    void (*fn)(void *ctx);
    void *ctx;
    int fail_rc;
} hook_io;

static brk_io *in_(brk_io *io) { return ((hook_io *)io)->inner; }
static int h_open(brk_io *io, const char *p, int fl, brk_file **o)
{ return in_(io)->open(in_(io), p, fl, o); }
static int h_close(brk_io *io, brk_file *f) { return in_(io)->close(in_(io), f); }
static int h_pread(brk_io *io, brk_file *f, void *b, size_t l, uint64_t o, size_t *n)
{ return in_(io)->pread(in_(io), f, b, l, o, n); }
static int h_sync(brk_io *io, brk_file *f) { return in_(io)->sync(in_(io), f); }
static int h_truncate(brk_io *io, brk_file *f, uint64_t s)
{ return in_(io)->truncate(in_(io), f, s); }
static int h_size(brk_io *io, brk_file *f, uint64_t *s) { return in_(io)->size(in_(io), f, s); }
static int h_mkdir(brk_io *io, const char *p) { return in_(io)->mkdir(in_(io), p); }
static int h_unlink(brk_io *io, const char *p) { return in_(io)->unlink(in_(io), p); }
static int h_rmdir(brk_io *io, const char *p) { return in_(io)->rmdir(in_(io), p); }
static int h_rename(brk_io *io, const char *a, const char *b)
{ return in_(io)->rename(in_(io), a, b); }
static int h_sync_dir(brk_io *io, const char *p) { return in_(io)->sync_dir(in_(io), p); }
static int h_list(brk_io *io, const char *d, brk_io_list_fn fn, void *a)
{ return in_(io)->list(in_(io), d, fn, a); }
static int h_exists(brk_io *io, const char *p) { return in_(io)->exists(in_(io), p); }
static int h_lock(brk_io *io, const char *p, brk_file **o) { return in_(io)->lock(in_(io), p, o); }

static int h_pwrite(brk_io *io, brk_file *f, const void *b, size_t l, uint64_t o)
{
    hook_io *h = (hook_io *)io;
    if (h->needle && memmem(b, l, h->needle, strlen(h->needle))) {
        h->needle = NULL;
        if (h->fn)
            h->fn(h->ctx);
        if (h->fail_rc)
            return h->fail_rc;
    }
    return h->inner->pwrite(h->inner, f, b, l, o);
}

static void hook_init(hook_io *h, brk_io *inner)
{
    memset(h, 0, sizeof *h);
    h->io = (brk_io){
        .open = h_open, .close = h_close, .pread = h_pread, .pwrite = h_pwrite,
        .sync = h_sync, .truncate = h_truncate, .size = h_size,
        .mkdir = h_mkdir, .unlink = h_unlink, .rmdir = h_rmdir,
        .rename = h_rename, .sync_dir = h_sync_dir, .list = h_list,
        .exists = h_exists, .lock = inner->lock ? h_lock : NULL,
    };
    h->inner = inner;
}

/* ---- fixture --------------------------------------------------------------- */

typedef struct fx {
    brk_sim *sim;
    hook_io hook;
    brk_fake_clock clk;
    brk_store_opts so;
    brk_txn_opts to;
    brk_checker checker;
    int calls;
    brk_check_result answer;
    brk_store *s;
    brk_txn *t;
    char err[256];
} fx;

static brk_check_result fx_check(void *ctx, const brk_check_req *r)
{
    (void)r;
    fx *f = ctx;
    __atomic_fetch_add(&f->calls, 1, __ATOMIC_SEQ_CST);
    return f->answer;
}

static void open_store(fx *f)
{
    brk_status st = brk_store_open(&f->s, DIR, &f->so, f->err, sizeof f->err);
    if (st != BRK_OK)
        fail_msg("store open: %s: %s", brk_status_name(st), f->err);
    st = brk_topic_create(f->s, "orders", 1);
    assert_true(st == BRK_OK || st == BRK_EXISTS);
}

static void open_txn(fx *f)
{
    brk_status st = brk_txn_open(&f->t, f->s, &f->to, f->err, sizeof f->err);
    if (st != BRK_OK)
        fail_msg("txn open: %s: %s", brk_status_name(st), f->err);
}

static void close_all(fx *f)
{
    if (f->t)
        brk_txn_close(f->t);
    f->t = NULL;
    if (f->s)
        brk_store_close(f->s);
    f->s = NULL;
}

/* The machine dies: from now on no write reaches the disk (closing the
 * handles writes nothing), then everything not fdatasync'ed is lost. */
static void power_loss(fx *f)
{
    brk_sim_set_crash_after(f->sim, 0);
    close_all(f);
    assert_int_equal(brk_sim_crash(f->sim, BRK_SIM_DROP_ALL), BRK_OK);
}

static int setup(void **state)
{
    fx *f = calloc(1, sizeof *f);
    assert_non_null(f);
    assert_int_equal(brk_sim_open(&f->sim, 5), BRK_OK);
    hook_init(&f->hook, brk_sim_io(f->sim));
    brk_fake_clock_init(&f->clk, T0);
    brk_store_opts_init(&f->so);
    f->so.io = &f->hook.io;
    f->so.clock = &f->clk.clock;
    f->so.no_background = true;
    f->so.flush_mode = BRK_FLUSH_SYNC;
    f->answer = BRK_CHECK_UNKNOWN;
    f->checker = (brk_checker){ fx_check, f };
    brk_txn_opts_init(&f->to);
    f->to.checker = &f->checker;
    f->to.no_background = true;
    f->to.workers = 1;
    open_store(f);
    open_txn(f);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    close_all(f);
    brk_sim_close(f->sim);
    free(f);
    return 0;
}

static void prepare(fx *f, const char *txid)
{
    brk_txn_prepare_req r;
    memset(&r, 0, sizeof r);
    r.topic = "orders";
    r.txid = txid;
    r.body = (brk_bytes){ "hi", 2 };
    brk_txn_result res;
    assert_int_equal(brk_txn_prepare(f->t, &r, &res), BRK_OK);
}

static void tick(fx *f)
{
    assert_int_equal(brk_txn_tick(f->t), BRK_OK);
    brk_txn_quiesce(f->t);
}

static size_t messages_in_orders(fx *f)
{
    uint64_t lo, hi;
    assert_int_equal(brk_store_queue_range(f->s, "orders", 0, &lo, &hi), BRK_OK);
    return (size_t)(hi - lo);
}

/* ---- tests ------------------------------------------------------------------ */

static void failed_open_does_not_forget_pending_transactions(void **state)
{
    fx *f = *state;
    prepare(f, "tx-1");
    tick(f);
    close_all(f);
    open_store(f);
    /* One transient read error while the module rebuilds: open fails ... */
    assert_int_equal(brk_sim_fail_next(f->sim, BRK_SIM_OP_PREAD, EIO, 1), BRK_OK);
    assert_int_not_equal(brk_txn_open(&f->t, f->s, &f->to, f->err, sizeof f->err),
                         BRK_OK);
    assert_null(f->t);
    /* ... and must not have overwritten its state: the next open finds it. */
    assert_int_equal(brk_sim_fail_next(f->sim, BRK_SIM_OP_PREAD, EIO, 0), BRK_OK);
    open_txn(f);
    brk_txn_info i;
    assert_int_equal(brk_txn_get(f->t, "tx-1", &i), BRK_OK);
    assert_int_equal(i.state, BRK_TXN_PREPARED);
}

static void tick_now(void *ctx)
{
    fx *f = ctx;
    (void)brk_txn_tick(f->t);
}

static void tick_after_half(void *ctx, const char *topic, uint16_t queue,
                            uint64_t log_offset)
{
    (void)queue;
    (void)log_offset;
    if (strcmp(topic, BRK_TXN_HALF_TOPIC) == 0)
        tick_now(ctx);
}

static void state_saved_while_a_prepare_is_written_keeps_that_prepare(void **state)
{
    fx *f = *state;
    /* The state is saved right after the half record is stored and before
     * prepare returns (nothing else pending), then the machine dies. */
    brk_store_listener l = { tick_after_half, NULL, f };
    brk_store_set_listener(f->s, &l);
    prepare(f, "tx-1");
    brk_store_set_listener(f->s, NULL);
    power_loss(f);
    open_store(f);
    open_txn(f);
    brk_txn_info i;
    assert_int_equal(brk_txn_get(f->t, "tx-1", &i), BRK_OK);
    assert_int_equal(i.state, BRK_TXN_PREPARED);
}

static void flush_now(void *ctx)
{
    fx *f = ctx;
    (void)brk_store_flush(f->s);
}

static void async_commit_survives_power_loss_after_a_state_save(void **state)
{
    fx *f = *state;
    close_all(f);
    f->so.flush_mode = BRK_FLUSH_ASYNC;
    open_store(f);
    open_txn(f);
    prepare(f, "tx-1");
    /* The commit's op becomes durable (a background flush lands just then);
     * the message after it is only in the page cache. */
    f->hook.needle = "orders";       /* the message write: flush before it */
    f->hook.fn = flush_now;
    f->hook.ctx = f;
    brk_txn_result res;
    assert_int_equal(brk_txn_commit(f->t, "tx-1", &res), BRK_OK);
    brk_fake_clock_advance(&f->clk, 2000);
    tick(f);                          /* state saved */
    power_loss(f);
    open_store(f);
    open_txn(f);
    brk_txn_info i;
    brk_status st = brk_txn_get(f->t, "tx-1", &i);
    /* Either the commit survived, and then so did its message, or neither
     * did; never a committed transaction without its message. */
    if (st == BRK_OK && i.state == BRK_TXN_COMMITTED)
        assert_int_equal(messages_in_orders(f), 1);
    else
        assert_int_equal(messages_in_orders(f), 0);
}

static void advance_and_tick(void *ctx)
{
    fx *f = ctx;
    brk_fake_clock_advance(&f->clk, 10000);
    (void)brk_txn_tick(f->t);
}

static void failed_commit_while_its_check_came_due_is_checked_later(void **state)
{
    fx *f = *state;
    prepare(f, "tx-1");              /* first check at 6 s */
    tick(f);
    /* The commit's op write fails (no space) while the check comes due and
     * the scheduler ticks; the client then gives up. */
    f->hook.needle = "__txn_op";
    f->hook.fn = advance_and_tick;
    f->hook.ctx = f;
    f->hook.fail_rc = -ENOSPC;
    brk_txn_result res;
    assert_int_not_equal(brk_txn_commit(f->t, "tx-1", &res), BRK_OK);
    for (int i = 0; i < 5; i++) {
        brk_fake_clock_advance(&f->clk, 60000);
        tick(f);
    }
    brk_txn_info i;
    assert_int_equal(brk_txn_get(f->t, "tx-1", &i), BRK_OK);
    assert_true(f->calls >= 1);
    assert_true(i.checks >= 1);
}

static void without_a_checker_timers_do_not_pile_up(void **state)
{
    fx *f = *state;
    close_all(f);
    f->to.checker = NULL;
    f->to.resolved_keep_ms = 1;      /* resolved ones leave at once */
    f->so.flush_mode = BRK_FLUSH_ASYNC;
    open_store(f);
    open_txn(f);
    prepare(f, "keep");
    char id[32];
    for (int i = 0; i < 20000; i++) {
        snprintf(id, sizeof id, "tx-%d", i);
        prepare(f, id);
        brk_txn_result res;
        assert_int_equal(brk_txn_rollback(f->t, id, &res), BRK_OK);
        if (i % 1000 == 0) {
            brk_fake_clock_advance(&f->clk, 10000);
            tick(f);
        }
    }
    brk_fake_clock_advance(&f->clk, 10000);
    tick(f);
    brk_txn_stats st;
    brk_txn_get_stats(f->t, &st);
    assert_int_equal(st.pending, 1);
    /* With resolved ones forgotten, what is held is small: the timers of
     * 20 000 transactions (16 bytes each) must not be among it. */
    assert_true(st.memory_bytes < 20000u * 16u);
    brk_txn_info i;
    assert_int_equal(brk_txn_get(f->t, "keep", &i), BRK_OK);
    assert_int_equal(i.state, BRK_TXN_PREPARED);
}

static void forever_settings_do_not_overflow(void **state)
{
    fx *f = *state;
    close_all(f);
    f->to.resolved_keep_ms = INT64_MAX;
    f->to.compact_after_ms = INT64_MAX;
    open_store(f);
    open_txn(f);
    prepare(f, "tx-1");
    brk_txn_result res;
    assert_int_equal(brk_txn_commit(f->t, "tx-1", &res), BRK_OK);
    prepare(f, "tx-2");
    brk_fake_clock_advance(&f->clk, 24 * 3600 * 1000LL);
    tick(f);
    /* Kept "forever": still a replay; nothing was compacted. */
    assert_int_equal(brk_txn_commit(f->t, "tx-1", &res), BRK_OK);
    assert_true(res.replay);
    brk_txn_stats st;
    brk_txn_get_stats(f->t, &st);
    assert_int_equal(st.compacted_total, 0);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(failed_open_does_not_forget_pending_transactions),
        T(state_saved_while_a_prepare_is_written_keeps_that_prepare),
        T(async_commit_survives_power_loss_after_a_state_save),
        T(failed_commit_while_its_check_came_due_is_checked_later),
        T(without_a_checker_timers_do_not_pile_up),
        T(forever_settings_do_not_overflow),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
