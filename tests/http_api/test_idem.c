/*
 * test_idem.c - the Idempotency-Key table (http_api/src/idem.h): verdicts
 * (NEW, REPLAY, MISMATCH, BUSY, REDO, ERROR), what survives a restart, the
 * window and the max_keys bound, scopes, key validation, the request hash,
 * and durability on the simulated disk (an INTENT written with defer_sync
 * is durable only once a later synced append covers it).
 *
 * Setup: a real store in a temporary directory (no background thread) with
 * a fake clock, so window expiry is tested without sleeping.  The crash and
 * fault tests open their store on tests/support io_sim instead.
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

#include "broker/store.h"
#include "broker/uuid.h"
#include "fake_clock.h"
#include "idem.h"
#include "io_sim.h"
#include "tmpdir.h"

#define T0      1700000000000LL
#define HOUR_MS 3600000LL
#define SCOPE_SEND "POST /v1/topics/{topic}/messages"
#define SCOPE_PREP "POST /v1/transactions"
#define PATH_SEND  "/v1/topics/orders/messages"
#define SIM_DIR    "/idem"

typedef struct fx {
    char dir[256];
    brk_sim *sim;               /* NULL: the store is on the real disk */
    brk_fake_clock clk;
    brk_store_opts so;
    brk_store *s;
    api_idem *t;
    int64_t window_ms;
    size_t max_keys;
} fx;

static void open_all(fx *f)
{
    char err[256] = "";
    const char *dir = f->sim ? SIM_DIR : f->dir;
    assert_int_equal(brk_store_open(&f->s, dir, &f->so, err, sizeof err), BRK_OK);
    brk_status st = api_idem_open(&f->t, f->s, f->window_ms, f->max_keys, err,
                                  sizeof err);
    if (st != BRK_OK)
        fail_msg("api_idem_open: %s (%s)", brk_status_name(st), err);
}

static void close_all(fx *f)
{
    api_idem_close(f->t);
    f->t = NULL;
    (void)brk_store_close(f->s);
    f->s = NULL;
}

static void restart(fx *f)
{
    close_all(f);
    open_all(f);
}

static fx *fx_new(bool on_sim)
{
    fx *f = calloc(1, sizeof *f);
    assert_non_null(f);
    brk_fake_clock_init(&f->clk, T0);
    brk_store_opts_init(&f->so);
    f->so.clock = &f->clk.clock;
    f->so.no_background = true;
    if (on_sim) {
        assert_int_equal(brk_sim_open(&f->sim, 7), BRK_OK);
        f->so.io = brk_sim_io(f->sim);
        f->so.flush_mode = BRK_FLUSH_SYNC;
    } else {
        assert_int_equal(brk_tmpdir_new("idem", f->dir, sizeof f->dir), 0);
    }
    f->window_ms = 24 * HOUR_MS;
    f->max_keys = 1000;
    return f;
}

static int setup(void **state)
{
    fx *f = fx_new(false);
    open_all(f);
    *state = f;
    return 0;
}

static int setup_sim(void **state)
{
    fx *f = fx_new(true);
    open_all(f);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    close_all(f);
    if (f->sim)
        brk_sim_close(f->sim);
    else
        brk_tmpdir_remove(f->dir);
    free(f);
    return 0;
}

/* ---- helpers ------------------------------------------------------------- */

static uint64_t hash_of(const char *body)
{
    return api_idem_hash("POST", PATH_SEND, body, strlen(body));
}

/* begin in SCOPE_SEND for the request with `body`; asserts no error. */
static api_idem_verdict begin_in(fx *f, const char *scope, const char *key,
                                 const char *body, api_idem_ticket *tk)
{
    brk_status err = BRK_OK;
    api_idem_verdict v = api_idem_begin(f->t, scope, key, hash_of(body), NULL,
                                        tk, &err);
    if (v == API_IDEM_ERROR)
        fail_msg("api_idem_begin: %s", brk_status_name(err));
    assert_int_equal(err, BRK_OK);
    return v;
}

static api_idem_verdict begin(fx *f, const char *key, const char *body,
                              api_idem_ticket *tk)
{
    return begin_in(f, SCOPE_SEND, key, body, tk);
}

static void finish_str(fx *f, api_idem_ticket *tk, int status, const char *resp)
{
    api_idem_finish(f->t, tk, status, resp, strlen(resp));
}

/* Assert a REPLAY with exactly these bytes, and free the copy. */
static void assert_replay(fx *f, const char *key, const char *body, int status,
                          const char *resp)
{
    api_idem_ticket tk;
    assert_int_equal(begin(f, key, body, &tk), API_IDEM_REPLAY);
    assert_int_equal(tk.status, status);
    assert_int_equal(tk.response_len, strlen(resp));
    assert_memory_equal(tk.response, resp, strlen(resp));
    assert_null(tk.priv_);
    free(tk.response);
}

/* NEW, then finish with a response naming the msg_id; returns the ticket. */
static api_idem_ticket new_done(fx *f, const char *key, const char *body)
{
    api_idem_ticket tk;
    assert_int_equal(begin(f, key, body, &tk), API_IDEM_NEW);
    char resp[128];
    char id[BRK_UUID_STR_LEN + 1];
    brk_uuid_format(tk.msg_id, id);
    snprintf(resp, sizeof resp, "{\"msg_id\":\"%s\"}", id);
    api_idem_ticket copy = tk;
    finish_str(f, &tk, 201, resp);
    return copy;
}

static void expect_response_of(fx *f, const char *key, const char *body,
                               const api_idem_ticket *first)
{
    char resp[128];
    char id[BRK_UUID_STR_LEN + 1];
    brk_uuid_format(first->msg_id, id);
    snprintf(resp, sizeof resp, "{\"msg_id\":\"%s\"}", id);
    assert_replay(f, key, body, 201, resp);
}

static api_idem_stats stats(fx *f)
{
    api_idem_stats s;
    api_idem_get_stats(f->t, &s);
    return s;
}

/* ---- verdicts ------------------------------------------------------------ */

static void new_then_finish_then_replay_returns_identical_bytes(void **state)
{
    fx *f = *state;
    api_idem_ticket tk;
    assert_int_equal(begin(f, "k1", "{\"body\":1}", &tk), API_IDEM_NEW);
    assert_non_null(tk.priv_);
    /* no txid given: the msg_id's text */
    char id[BRK_UUID_STR_LEN + 1];
    brk_uuid_format(tk.msg_id, id);
    assert_string_equal(tk.txid, id);
    assert_int_equal(brk_uuid_time_ms(tk.msg_id), T0);
    assert_int_equal(tk.deliver_at_ms, 0);
    static const char resp[] = "{\"msg_id\":\"x\",\"queue\":0,\"offset\":7}";
    api_idem_finish(f->t, &tk, 201, resp, sizeof resp - 1);
    assert_null(tk.priv_);

    assert_replay(f, "k1", "{\"body\":1}", 201, resp);
    assert_replay(f, "k1", "{\"body\":1}", 201, resp);
    api_idem_stats s = stats(f);
    assert_int_equal(s.keys, 1);
    assert_int_equal(s.replays_total, 2);
    assert_int_equal(s.mismatches_total, 0);
}

static void new_uses_the_given_txid_and_deliver_at(void **state)
{
    fx *f = *state;
    api_idem_intent in = { .txid = "order-42", .deliver_at_ms = T0 + 5000 };
    api_idem_ticket tk;
    brk_status err;
    assert_int_equal(api_idem_begin(f->t, SCOPE_PREP, "k", hash_of("a"), &in,
                                    &tk, &err), API_IDEM_NEW);
    assert_string_equal(tk.txid, "order-42");
    assert_int_equal(tk.deliver_at_ms, T0 + 5000);
    api_idem_abort(f->t, &tk);
    /* the redo carries the recorded values, whatever the intent says now */
    api_idem_intent other = { .txid = NULL, .deliver_at_ms = 1 };
    api_idem_ticket tk2;
    assert_int_equal(api_idem_begin(f->t, SCOPE_PREP, "k", hash_of("a"), &other,
                                    &tk2, &err), API_IDEM_REDO);
    assert_string_equal(tk2.txid, "order-42");
    assert_int_equal(tk2.deliver_at_ms, T0 + 5000);
    assert_memory_equal(tk2.msg_id, tk.msg_id, BRK_UUID_LEN);
    api_idem_abort(f->t, &tk2);
}

static void txid_longer_than_128_bytes_is_an_error(void **state)
{
    fx *f = *state;
    char txid[BRK_TXID_MAX + 2];
    memset(txid, 't', sizeof txid - 1);
    txid[sizeof txid - 1] = 0;
    api_idem_intent in = { .txid = txid };
    api_idem_ticket tk;
    brk_status err = BRK_OK;
    assert_int_equal(api_idem_begin(f->t, SCOPE_PREP, "k", 1, &in, &tk, &err),
                     API_IDEM_ERROR);
    assert_int_equal(err, BRK_INVAL);
    assert_int_equal(stats(f).keys, 0);
}

static void same_key_with_another_request_is_mismatch(void **state)
{
    fx *f = *state;
    new_done(f, "k1", "{\"a\":1}");
    api_idem_ticket tk;
    assert_int_equal(begin(f, "k1", "{\"a\":2}", &tk), API_IDEM_MISMATCH);
    assert_null(tk.response);
    assert_null(tk.priv_);
    /* another path, same body */
    brk_status err;
    uint64_t h = api_idem_hash("POST", "/v1/topics/other/messages", "{\"a\":1}", 7);
    assert_int_equal(api_idem_begin(f->t, SCOPE_SEND, "k1", h, NULL, &tk, &err),
                     API_IDEM_MISMATCH);
    assert_int_equal(stats(f).mismatches_total, 2);
    assert_int_equal(stats(f).replays_total, 0);
}

static void same_key_while_reserved_is_busy_and_another_request_mismatch(void **state)
{
    fx *f = *state;
    api_idem_ticket tk, tk2;
    assert_int_equal(begin(f, "k1", "b", &tk), API_IDEM_NEW);
    assert_int_equal(begin(f, "k1", "b", &tk2), API_IDEM_BUSY);
    assert_null(tk2.priv_);
    assert_int_equal(begin(f, "k1", "other", &tk2), API_IDEM_MISMATCH);
    finish_str(f, &tk, 201, "{}");
    assert_replay(f, "k1", "b", 201, "{}");
}

static void abort_then_retry_is_redo_with_the_same_ids(void **state)
{
    fx *f = *state;
    api_idem_ticket tk, tk2;
    assert_int_equal(begin(f, "k1", "b", &tk), API_IDEM_NEW);
    api_idem_abort(f->t, &tk);
    assert_null(tk.priv_);
    brk_fake_clock_advance(&f->clk, 10);
    assert_int_equal(begin(f, "k1", "b", &tk2), API_IDEM_REDO);
    assert_memory_equal(tk2.msg_id, tk.msg_id, BRK_UUID_LEN);
    assert_string_equal(tk2.txid, tk.txid);
    /* a REDO reserves too */
    api_idem_ticket tk3;
    assert_int_equal(begin(f, "k1", "b", &tk3), API_IDEM_BUSY);
    finish_str(f, &tk2, 201, "{\"ok\":true}");
    assert_replay(f, "k1", "b", 201, "{\"ok\":true}");
    assert_int_equal(stats(f).keys, 1);
}

static void finish_and_abort_without_a_reservation_do_nothing(void **state)
{
    fx *f = *state;
    api_idem_ticket tk;
    memset(&tk, 0, sizeof tk);
    api_idem_finish(f->t, &tk, 201, "{}", 2);
    api_idem_abort(f->t, &tk);
    api_idem_finish(NULL, &tk, 201, "{}", 2);
    api_idem_abort(NULL, NULL);
    assert_int_equal(stats(f).keys, 0);
}

static void concurrent_begins_of_one_key_reserve_it_once(void **state);

/* ---- restart ------------------------------------------------------------- */

static void restart_replays_done_and_redoes_intent_only(void **state)
{
    fx *f = *state;
    api_idem_ticket a = new_done(f, "a", "A");
    api_idem_intent in = { .txid = "tx-b", .deliver_at_ms = T0 + 60000 };
    api_idem_ticket b;
    brk_status err;
    assert_int_equal(api_idem_begin(f->t, SCOPE_PREP, "b", hash_of("B"), &in,
                                    &b, &err), API_IDEM_NEW);
    /* the process "dies" with b in flight (the store closes cleanly) */
    restart(f);
    assert_int_equal(stats(f).keys, 2);
    expect_response_of(f, "a", "A", &a);
    api_idem_ticket b2;
    assert_int_equal(api_idem_begin(f->t, SCOPE_PREP, "b", hash_of("B"), NULL,
                                    &b2, &err), API_IDEM_REDO);
    assert_memory_equal(b2.msg_id, b.msg_id, BRK_UUID_LEN);
    assert_string_equal(b2.txid, "tx-b");
    assert_int_equal(b2.deliver_at_ms, T0 + 60000);
    /* a mismatch survives a restart too */
    api_idem_ticket x;
    assert_int_equal(begin(f, "a", "not A", &x), API_IDEM_MISMATCH);
    api_idem_finish(f->t, &b2, 201, "{\"b\":1}", 7);
    restart(f);
    api_idem_ticket b3;
    assert_int_equal(api_idem_begin(f->t, SCOPE_PREP, "b", hash_of("B"), NULL,
                                    &b3, &err), API_IDEM_REPLAY);
    assert_int_equal(b3.status, 201);
    assert_string_equal(b3.response, "{\"b\":1}");
    free(b3.response);
}

static void a_later_generation_of_a_key_overrides_the_earlier_on_restart(void **state)
{
    fx *f = *state;
    f->max_keys = 2;
    restart(f);
    new_done(f, "k", "old");
    new_done(f, "j", "j");
    new_done(f, "i", "i");                         /* evicts k */
    api_idem_ticket n = new_done(f, "k", "new");   /* a new generation of k */
    /* with room for all, the log holds both generations of k: the later wins */
    f->max_keys = 10;
    restart(f);
    assert_int_equal(stats(f).keys, 3);
    expect_response_of(f, "k", "new", &n);
    api_idem_ticket x;
    assert_int_equal(begin(f, "k", "old", &x), API_IDEM_MISMATCH);
}

static void malformed_records_in_the_topic_are_skipped(void **state)
{
    fx *f = *state;
    api_idem_ticket a = new_done(f, "a", "A");
    brk_append_req rq;
    memset(&rq, 0, sizeof rq);
    rq.topic = API_IDEM_TOPIC;
    rq.queue = 0;
    rq.key = (brk_bytes){ "a", 1 };
    rq.body = (brk_bytes){ "garbage", 7 };
    rq.type = BRK_REC_OP;
    rq.allow_internal = true;
    brk_append_res res;
    assert_int_equal(brk_store_append(f->s, &rq, &res), BRK_OK);
    rq.type = BRK_REC_MSG;
    assert_int_equal(brk_store_append(f->s, &rq, &res), BRK_OK);
    restart(f);
    assert_int_equal(stats(f).keys, 1);
    expect_response_of(f, "a", "A", &a);
}

/* Open reads only the newest 4 x max_keys records of "__idem", so its cost
 * does not grow with the log's retention: a key whose records all lie
 * further back is not read (a full read would have kept it). */
static void open_reads_no_further_back_than_4x_max_keys_records(void **state)
{
    fx *f = *state;
    f->max_keys = 2;                               /* reads 8 records */
    restart(f);
    api_idem_ticket old = new_done(f, "old", "o"); /* INTENT, DONE */
    brk_append_req rq;
    memset(&rq, 0, sizeof rq);
    rq.topic = API_IDEM_TOPIC;
    rq.queue = 0;
    rq.key = (brk_bytes){ "junk", 4 };
    rq.body = (brk_bytes){ "not a record", 12 };
    rq.type = BRK_REC_OP;
    rq.allow_internal = true;
    brk_append_res res;
    for (int i = 0; i < 4; i++)
        assert_int_equal(brk_store_append(f->s, &rq, &res), BRK_OK);
    api_idem_ticket n = new_done(f, "new", "n");
    restart(f);                                    /* all 8 */
    assert_int_equal(stats(f).keys, 2);
    expect_response_of(f, "old", "o", &old);
    assert_int_equal(brk_store_append(f->s, &rq, &res), BRK_OK);
    restart(f);                                    /* old's DONE alone */
    assert_int_equal(stats(f).keys, 2);
    expect_response_of(f, "old", "o", &old);
    assert_int_equal(brk_store_append(f->s, &rq, &res), BRK_OK);
    restart(f);                                    /* nothing of old */
    assert_int_equal(stats(f).keys, 1);
    expect_response_of(f, "new", "n", &n);
    api_idem_ticket tk;
    assert_int_equal(begin(f, "old", "o", &tk), API_IDEM_NEW);
    api_idem_abort(f->t, &tk);
}

/* ---- window and bound ----------------------------------------------------- */

static void keys_older_than_the_window_are_forgotten(void **state)
{
    fx *f = *state;
    f->window_ms = 1000;
    restart(f);
    api_idem_ticket first = new_done(f, "k", "b");
    brk_fake_clock_advance(&f->clk, 1000);
    expect_response_of(f, "k", "b", &first);      /* exactly the window: kept */
    brk_fake_clock_advance(&f->clk, 1);
    api_idem_ticket tk;
    assert_int_equal(begin(f, "k", "other body", &tk), API_IDEM_NEW);
    assert_memory_not_equal(tk.msg_id, first.msg_id, BRK_UUID_LEN);
    api_idem_abort(f->t, &tk);
    assert_int_equal(stats(f).keys, 1);
    assert_int_equal(stats(f).evicted_total, 0);
}

static void window_expiry_also_applies_across_a_restart(void **state)
{
    fx *f = *state;
    f->window_ms = 1000;
    restart(f);
    new_done(f, "old", "o");
    brk_fake_clock_advance(&f->clk, 600);
    api_idem_ticket young = new_done(f, "young", "y");
    brk_fake_clock_advance(&f->clk, 500);          /* old: 1100 ms, young: 500 */
    restart(f);
    assert_int_equal(stats(f).keys, 1);
    expect_response_of(f, "young", "y", &young);
    api_idem_ticket tk;
    assert_int_equal(begin(f, "old", "o", &tk), API_IDEM_NEW);
    api_idem_abort(f->t, &tk);
}

static void reserved_keys_do_not_expire(void **state)
{
    fx *f = *state;
    f->window_ms = 1000;
    restart(f);
    api_idem_ticket tk, tk2;
    assert_int_equal(begin(f, "k", "b", &tk), API_IDEM_NEW);
    brk_fake_clock_advance(&f->clk, 5000);
    assert_int_equal(begin(f, "k", "b", &tk2), API_IDEM_BUSY);
    finish_str(f, &tk, 201, "{}");
}

static void max_keys_evicts_the_oldest_first(void **state)
{
    fx *f = *state;
    f->max_keys = 3;
    restart(f);
    api_idem_ticket k1 = new_done(f, "k1", "1");
    api_idem_ticket k2 = new_done(f, "k2", "2");
    api_idem_ticket k3 = new_done(f, "k3", "3");
    api_idem_ticket k4 = new_done(f, "k4", "4");
    assert_int_equal(stats(f).keys, 3);
    assert_int_equal(stats(f).evicted_total, 1);
    expect_response_of(f, "k2", "2", &k2);
    expect_response_of(f, "k3", "3", &k3);
    expect_response_of(f, "k4", "4", &k4);
    /* k1 was forgotten: a fresh operation (and k2 goes now) */
    api_idem_ticket tk;
    assert_int_equal(begin(f, "k1", "1", &tk), API_IDEM_NEW);
    assert_memory_not_equal(tk.msg_id, k1.msg_id, BRK_UUID_LEN);
    finish_str(f, &tk, 201, "{}");
    assert_int_equal(stats(f).evicted_total, 2);
    assert_int_equal(begin(f, "k2", "2", &tk), API_IDEM_NEW);
    api_idem_abort(f->t, &tk);
    /* a restart keeps the newest max_keys */
    restart(f);
    assert_int_equal(stats(f).keys, 3);
    expect_response_of(f, "k4", "4", &k4);
    assert_replay(f, "k1", "1", 201, "{}");
}

static void a_reserved_key_is_never_evicted(void **state)
{
    fx *f = *state;
    f->max_keys = 2;
    restart(f);
    api_idem_ticket held, tk;
    assert_int_equal(begin(f, "held", "h", &held), API_IDEM_NEW);
    new_done(f, "k2", "2");
    api_idem_ticket k3 = new_done(f, "k3", "3");   /* evicts k2, not held */
    assert_int_equal(stats(f).keys, 2);
    assert_int_equal(stats(f).evicted_total, 1);
    assert_int_equal(begin(f, "held", "h", &tk), API_IDEM_BUSY);
    expect_response_of(f, "k3", "3", &k3);
    assert_int_equal(begin(f, "k2", "2", &tk), API_IDEM_NEW);   /* evicts k3 */
    api_idem_abort(f->t, &tk);
    assert_int_equal(begin(f, "held", "h", &tk), API_IDEM_BUSY);
    finish_str(f, &held, 201, "{}");
}

static void scopes_are_isolated(void **state)
{
    fx *f = *state;
    api_idem_ticket a, b;
    assert_int_equal(begin_in(f, SCOPE_SEND, "same", "x", &a), API_IDEM_NEW);
    assert_int_equal(begin_in(f, SCOPE_PREP, "same", "x", &b), API_IDEM_NEW);
    assert_memory_not_equal(a.msg_id, b.msg_id, BRK_UUID_LEN);
    finish_str(f, &a, 201, "send");
    finish_str(f, &b, 201, "prepare");
    /* a request that mismatches in one scope is new in the other */
    api_idem_ticket tk;
    assert_int_equal(begin_in(f, SCOPE_SEND, "same", "y", &tk), API_IDEM_MISMATCH);
    assert_int_equal(begin_in(f, SCOPE_PREP, "same", "x", &tk), API_IDEM_REPLAY);
    assert_string_equal(tk.response, "prepare");
    free(tk.response);
    restart(f);
    assert_int_equal(begin_in(f, SCOPE_SEND, "same", "x", &tk), API_IDEM_REPLAY);
    assert_string_equal(tk.response, "send");
    free(tk.response);
    assert_int_equal(stats(f).keys, 2);
}

/* ---- validation and hashing ------------------------------------------------ */

static void key_validation(void **state)
{
    (void)state;
    char k[API_IDEM_KEY_MAX + 2];
    memset(k, 'a', sizeof k);
    k[API_IDEM_KEY_MAX] = 0;
    assert_true(api_idem_key_valid(k));             /* 255 bytes */
    k[API_IDEM_KEY_MAX] = 'a';
    k[API_IDEM_KEY_MAX + 1] = 0;
    assert_false(api_idem_key_valid(k));            /* 256 bytes */
    assert_true(api_idem_key_valid("!"));
    assert_true(api_idem_key_valid("~A-b_c.9/+="));
    assert_false(api_idem_key_valid(""));
    assert_false(api_idem_key_valid(NULL));
    assert_false(api_idem_key_valid("a b"));
    assert_false(api_idem_key_valid("a\tb"));
    assert_false(api_idem_key_valid("a\x7f"));
    assert_false(api_idem_key_valid("caf\xc3\xa9"));
}

static void begin_with_an_invalid_key_or_scope_is_inval(void **state)
{
    fx *f = *state;
    api_idem_ticket tk;
    brk_status err = BRK_OK;
    assert_int_equal(api_idem_begin(f->t, SCOPE_SEND, "a b", 1, NULL, &tk, &err),
                     API_IDEM_ERROR);
    assert_int_equal(err, BRK_INVAL);
    err = BRK_OK;
    assert_int_equal(api_idem_begin(f->t, "", "k", 1, NULL, &tk, &err),
                     API_IDEM_ERROR);
    assert_int_equal(err, BRK_INVAL);
    assert_int_equal(stats(f).keys, 0);
}

static void hash_distinguishes_method_path_and_body(void **state)
{
    (void)state;
    uint64_t h = api_idem_hash("POST", "/v1/topics/a/messages", "{}", 2);
    assert_int_equal(h, api_idem_hash("POST", "/v1/topics/a/messages", "{}", 2));
    assert_int_not_equal(h, api_idem_hash("PUT", "/v1/topics/a/messages", "{}", 2));
    assert_int_not_equal(h, api_idem_hash("POST", "/v1/topics/b/messages", "{}", 2));
    assert_int_not_equal(h, api_idem_hash("POST", "/v1/topics/a/messages", "{ }", 3));
    assert_int_not_equal(h, api_idem_hash("POST", "/v1/topics/a/messages", "{", 1));
    /* the NUL separators keep field boundaries apart */
    assert_int_not_equal(api_idem_hash("POST", "/ab", "c", 1),
                         api_idem_hash("POST", "/a", "bc", 2));
    assert_int_not_equal(api_idem_hash("POS", "T/a", NULL, 0),
                         api_idem_hash("POST", "/a", NULL, 0));
    /* no body and an empty body are the same request */
    assert_int_equal(api_idem_hash("POST", "/a", NULL, 0),
                     api_idem_hash("POST", "/a", "", 0));
    /* FNV-1a 64 of "GET\0/\0": fixed, so the hash never changes silently
     * across versions (stored hashes must keep matching) */
    assert_int_equal(api_idem_hash("GET", "/", NULL, 0), 0xef79a9c3209ce04aULL);
}

static void open_refuses_a_bad_window_or_bound(void **state)
{
    fx *f = *state;
    api_idem *t = (api_idem *)1;
    char err[128];
    assert_int_equal(api_idem_open(&t, f->s, 0, 10, err, sizeof err), BRK_INVAL);
    assert_null(t);
    assert_non_null(strstr(err, "window"));
    assert_int_equal(api_idem_open(&t, f->s, 1000, 0, err, sizeof err), BRK_INVAL);
    assert_null(t);
    assert_int_equal(api_idem_open(&t, NULL, 1000, 10, err, sizeof err), BRK_INVAL);
}

/* ---- durability on the simulated disk -------------------------------------- */

/* Power loss: every later write fails, the store closes as well as it can,
 * then only synced bytes survive. */
static void crash_and_reopen(fx *f)
{
    brk_sim_set_crash_after(f->sim, 0);
    close_all(f);
    assert_int_equal(brk_sim_crash(f->sim, BRK_SIM_DROP_ALL), BRK_OK);
    open_all(f);
}

static void sync_append_to(fx *f, const char *topic)
{
    brk_append_req rq;
    memset(&rq, 0, sizeof rq);
    rq.topic = topic;
    rq.queue = -1;
    rq.body = (brk_bytes){ "m", 1 };
    brk_append_res res;
    assert_int_equal(brk_store_append(f->s, &rq, &res), BRK_OK);
}

static void unsynced_intent_vanishes_but_a_later_sync_append_keeps_it(void **state)
{
    fx *f = *state;
    api_idem_ticket lost, kept, tk;
    /* an INTENT alone is written with defer_sync: not durable */
    assert_int_equal(begin(f, "lost", "l", &lost), API_IDEM_NEW);
    crash_and_reopen(f);
    assert_int_equal(stats(f).keys, 0);
    assert_int_equal(begin(f, "lost", "l", &tk), API_IDEM_NEW);
    assert_memory_not_equal(tk.msg_id, lost.msg_id, BRK_UUID_LEN);
    api_idem_abort(f->t, &tk);

    /* the operation's own (synced) append covers the INTENT before it */
    assert_int_equal(begin(f, "kept", "k", &kept), API_IDEM_NEW);
    sync_append_to(f, "orders");
    crash_and_reopen(f);
    assert_int_equal(begin(f, "kept", "k", &tk), API_IDEM_REDO);
    assert_memory_equal(tk.msg_id, kept.msg_id, BRK_UUID_LEN);
    assert_string_equal(tk.txid, kept.txid);
    api_idem_abort(f->t, &tk);
}

static void done_record_lost_in_a_crash_turns_replay_into_redo(void **state)
{
    fx *f = *state;
    api_idem_ticket tk;
    assert_int_equal(begin(f, "k", "b", &tk), API_IDEM_NEW);
    api_idem_ticket first = tk;
    sync_append_to(f, "orders");                   /* the operation */
    finish_str(f, &tk, 201, "{\"done\":1}");       /* DONE: deferred */
    assert_replay(f, "k", "b", 201, "{\"done\":1}");
    crash_and_reopen(f);
    assert_int_equal(begin(f, "k", "b", &tk), API_IDEM_REDO);
    assert_memory_equal(tk.msg_id, first.msg_id, BRK_UUID_LEN);
    finish_str(f, &tk, 201, "{\"done\":1}");
    sync_append_to(f, "orders");                   /* covers the DONE */
    crash_and_reopen(f);
    assert_replay(f, "k", "b", 201, "{\"done\":1}");
}

static void intent_that_cannot_be_stored_is_an_error_and_reserves_nothing(void **state)
{
    fx *f = *state;
    api_idem_ticket tk;
    brk_status err = BRK_OK;
    assert_int_equal(brk_sim_fail_next(f->sim, BRK_SIM_OP_PWRITE, ENOSPC, 1), BRK_OK);
    assert_int_equal(api_idem_begin(f->t, SCOPE_SEND, "k", hash_of("b"), NULL,
                                    &tk, &err), API_IDEM_ERROR);
    assert_int_equal(err, BRK_NOSPC);
    assert_null(tk.priv_);
    assert_int_equal(stats(f).keys, 0);
    /* the retry is handled anew, not BUSY */
    assert_int_equal(begin(f, "k", "b", &tk), API_IDEM_NEW);
    finish_str(f, &tk, 201, "{}");
    assert_replay(f, "k", "b", 201, "{}");
}

static void done_that_cannot_be_stored_is_still_answered_in_process(void **state)
{
    fx *f = *state;
    api_idem_ticket tk;
    assert_int_equal(begin(f, "k", "b", &tk), API_IDEM_NEW);
    api_idem_ticket first = tk;
    assert_int_equal(brk_sim_fail_next(f->sim, BRK_SIM_OP_PWRITE, ENOSPC, 1), BRK_OK);
    finish_str(f, &tk, 201, "{\"r\":1}");
    assert_replay(f, "k", "b", 201, "{\"r\":1}");
    /* after a clean restart only the INTENT is known: a REDO */
    restart(f);
    assert_int_equal(begin(f, "k", "b", &tk), API_IDEM_REDO);
    assert_memory_equal(tk.msg_id, first.msg_id, BRK_UUID_LEN);
    api_idem_abort(f->t, &tk);
}

/* ---- threads ------------------------------------------------------------- */

#define RACERS 8

typedef struct racer {
    fx *f;
    pthread_barrier_t *go;
    api_idem_ticket tk;
    api_idem_verdict v;
} racer;

static void *race_one(void *arg)
{
    racer *r = arg;
    pthread_barrier_wait(r->go);
    brk_status err;
    r->v = api_idem_begin(r->f->t, SCOPE_SEND, "race", hash_of("b"), NULL,
                          &r->tk, &err);
    return NULL;
}

static void concurrent_begins_of_one_key_reserve_it_once(void **state)
{
    fx *f = *state;
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, RACERS);
    racer r[RACERS];
    pthread_t th[RACERS];
    for (int i = 0; i < RACERS; i++) {
        r[i] = (racer){ .f = f, .go = &go };
        assert_int_equal(pthread_create(&th[i], NULL, race_one, &r[i]), 0);
    }
    int news = 0, busy = 0;
    for (int i = 0; i < RACERS; i++) {
        pthread_join(th[i], NULL);
        if (r[i].v == API_IDEM_NEW) {
            news++;
            finish_str(f, &r[i].tk, 201, "{\"race\":1}");
        } else if (r[i].v == API_IDEM_BUSY) {
            busy++;
        } else if (r[i].v == API_IDEM_REPLAY) {
            free(r[i].tk.response);
        }
    }
    pthread_barrier_destroy(&go);
    assert_int_equal(news, 1);
    assert_true(busy >= 1);
    assert_replay(f, "race", "b", 201, "{\"race\":1}");
}

int main(void)
{
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
#define S(fn) cmocka_unit_test_setup_teardown(fn, setup_sim, teardown)
    const struct CMUnitTest tests[] = {
        T(new_then_finish_then_replay_returns_identical_bytes),
        T(new_uses_the_given_txid_and_deliver_at),
        T(txid_longer_than_128_bytes_is_an_error),
        T(same_key_with_another_request_is_mismatch),
        T(same_key_while_reserved_is_busy_and_another_request_mismatch),
        T(abort_then_retry_is_redo_with_the_same_ids),
        T(finish_and_abort_without_a_reservation_do_nothing),
        T(concurrent_begins_of_one_key_reserve_it_once),
        T(restart_replays_done_and_redoes_intent_only),
        T(a_later_generation_of_a_key_overrides_the_earlier_on_restart),
        T(malformed_records_in_the_topic_are_skipped),
        T(open_reads_no_further_back_than_4x_max_keys_records),
        T(keys_older_than_the_window_are_forgotten),
        T(window_expiry_also_applies_across_a_restart),
        T(reserved_keys_do_not_expire),
        T(max_keys_evicts_the_oldest_first),
        T(a_reserved_key_is_never_evicted),
        T(scopes_are_isolated),
        cmocka_unit_test(key_validation),
        T(begin_with_an_invalid_key_or_scope_is_inval),
        cmocka_unit_test(hash_distinguishes_method_path_and_body),
        T(open_refuses_a_bad_window_or_bound),
        S(unsynced_intent_vanishes_but_a_later_sync_append_keeps_it),
        S(done_record_lost_in_a_crash_turns_replay_into_redo),
        S(intent_that_cannot_be_stored_is_an_error_and_reserves_nothing),
        S(done_that_cannot_be_stored_is_still_answered_in_process),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
