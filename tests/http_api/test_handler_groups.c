/*
 * test_handler_groups.c - the consumer-group routes of the request handler
 * driven in process (handler_fx.h): PUT and GET of groups, receive (its
 * field errors, 404, 429 at the in-flight bound, tag filters applied,
 * re-applied, and not trusted after overlapping puts), ack and nack
 * (counts, stale and malformed receipts, 404), dead letters (listing,
 * paging, replay).  Long polling is in test_handler.c.
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

#include "handler_fx.h"

/* ---- groups ------------------------------------------------------------------------------ */

static void group_put_is_201_then_200_and_get_shows_lag(void **state)
{
    fx *f = *state;
    res r;
    call(f, "PUT", "/v1/groups/billing", "{'topic':'orders','max_deliveries':5}", &r);
    expect_json(&r, 201);
    assert_string_equal(str(&r, "group"), "billing");
    assert_string_equal(str(&r, "topic"), "orders");
    assert_true(json_is_true(json_object_get(r.json, "created")));
    res_free(&r);
    call(f, "PUT", "/v1/groups/billing", "{'topic':'orders','filter':'paid'}", &r);
    expect_json(&r, 200);
    assert_true(json_is_false(json_object_get(r.json, "created")));
    res_free(&r);
    send_ok(f, "orders", "{'tag':'paid','key':'a','body':1}");
    call(f, "GET", "/v1/groups/billing", NULL, &r);
    expect_json(&r, 200);
    assert_string_equal(str(&r, "group"), "billing");
    json_t *subs = json_object_get(r.json, "subscriptions");
    assert_int_equal(json_array_size(subs), 1);
    json_t *s = json_array_get(subs, 0);
    assert_string_equal(json_string_value(json_object_get(s, "topic")), "orders");
    assert_true(json_is_null(json_object_get(s, "member")));
    assert_int_equal(num(s, "lag"), 1);
    assert_int_equal(num(s, "inflight"), 0);
    assert_int_equal(num(s, "dead_letters"), 0);
    assert_int_equal(json_array_size(json_object_get(s, "queues")), 4);
    res_free(&r);
}

static void group_errors_are_400_404_and_409(void **state)
{
    fx *f = *state;
    res r;
    call(f, "PUT", "/v1/groups/g1", "{'fifo':true}", &r);
    expect_problem(&r, 400, "bad-request", "field 'topic' is required");
    res_free(&r);
    call(f, "PUT", "/v1/groups/g1", "{'topic':'o','filter':'a || '}", &r);
    expect_problem(&r, 400, "bad-request", "field 'filter'");
    res_free(&r);
    call(f, "PUT", "/v1/groups/g1", "{'topic':'o','max_deliveries':0}", &r);
    expect_problem(&r, 400, "bad-request", "field 'max_deliveries' must be in 1..1000");
    res_free(&r);
    call(f, "PUT", "/v1/groups/g1", "{'topic':'o','fifo':'yes'}", &r);
    expect_problem(&r, 400, "bad-request", "field 'fifo' must be true or false");
    res_free(&r);
    call(f, "PUT", "/v1/groups/__g", "{'topic':'o'}", &r);
    expect_problem(&r, 400, "bad-request", "internal");
    res_free(&r);
    call(f, "GET", "/v1/groups/nobody", NULL, &r);
    expect_problem(&r, 404, "not-found", "group 'nobody' not found");
    res_free(&r);
    /* Progress, then a mode change. */
    send_ok(f, "o", "{'body':1}");
    json_t *m = recv_msgs(f, "g1", "{'topic':'o'}");
    char rc[128];
    snprintf(rc, sizeof rc, "{'receipts':['%s']}", msg_str(m, 0, "receipt"));
    json_decref(m);
    call(f, "POST", "/v1/groups/g1/ack", rc, &r);
    expect_json(&r, 200);
    res_free(&r);
    call(f, "PUT", "/v1/groups/g1", "{'topic':'o','fifo':true}", &r);
    expect_problem(&r, 409, "conflict", "group 'g1' has progress");
    res_free(&r);
}

/* Changing one setting of a FIFO group with progress keeps it FIFO (and so
 * is not the 409 a reset to defaults would cause). */
static void put_with_one_config_field_keeps_the_others(void **state)
{
    fx *f = *state;
    res r;
    call(f, "PUT", "/v1/groups/ff", "{'topic':'o','fifo':true,'max_deliveries':4}", &r);
    expect_json(&r, 201);
    res_free(&r);
    send_ok(f, "o", "{'body':1}");
    json_t *m = recv_msgs(f, "ff", "{'topic':'o','max':5}");
    assert_int_equal(json_array_size(m), 1);
    json_decref(m);
    call(f, "PUT", "/v1/groups/ff", "{'topic':'o','max_inflight':50}", &r);
    expect_json(&r, 200);
    res_free(&r);
    brk_group_config cfg;
    assert_int_equal(brk_group_get_config(f->g, "ff", &cfg), BRK_OK);
    assert_true(cfg.fifo);
    assert_int_equal(cfg.max_deliveries, 4);
    assert_int_equal(cfg.max_inflight, 50);
}

static void put_without_config_fields_keeps_the_config(void **state)
{
    fx *f = *state;
    res r;
    call(f, "PUT", "/v1/groups/lim", "{'topic':'q','max_inflight':1}", &r);
    expect_json(&r, 201);
    res_free(&r);
    call(f, "PUT", "/v1/groups/lim", "{'topic':'q2'}", &r);   /* 2nd topic */
    expect_json(&r, 200);
    res_free(&r);
    send_ok(f, "q", "{'body':1}");
    send_ok(f, "q", "{'body':2}");
    json_t *m = recv_msgs(f, "lim", "{'topic':'q','max':5}");
    assert_int_equal(json_array_size(m), 1);       /* still max_inflight 1 */
    json_decref(m);
}

static void receive_at_max_inflight_is_429_with_retry_after(void **state)
{
    fx *f = *state;
    res r;
    call(f, "PUT", "/v1/groups/one", "{'topic':'fc','max_inflight':1}", &r);
    expect_json(&r, 201);
    res_free(&r);
    send_ok(f, "fc", "{'body':1}");
    send_ok(f, "fc", "{'body':2}");
    json_t *m = recv_msgs(f, "one", "{'topic':'fc','max':2}");
    assert_int_equal(json_array_size(m), 1);
    json_decref(m);
    call(f, "POST", "/v1/groups/one/receive", "{'topic':'fc'}", &r);
    expect_problem(&r, 429, "too-many-requests", "max_inflight");
    assert_int_equal(r.retry, 1);
    res_free(&r);
}

static void receive_field_errors_are_400(void **state)
{
    fx *f = *state;
    static const char *const cases[][2] = {
        { "{}", "field 'topic' is required" },
        { "{'topic':'o','max':0}", "field 'max' must be in 1..256" },
        { "{'topic':'o','wait_ms':30001}", "field 'wait_ms' must be in 0..30000" },
        { "{'topic':'o','invisible_ms':999}", "field 'invisible_ms'" },
        { "{'topic':'o','filter':''}", "field 'filter' must not be empty" },
        { "{'topic':'o','filter':'a||'}", "field 'filter' must be a tag expression" },
        { "{'topic':'o','member':'a b'}", "field 'member'" },
        { "{'topic':'o','group':'x'}", "unknown field 'group'" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        res r;
        call(f, "POST", "/v1/groups/rg/receive", cases[i][0], &r);
        expect_problem(&r, 400, "bad-request", cases[i][1]);
        res_free(&r);
    }
    res r;
    call(f, "PUT", "/v1/groups/bc", "{'topic':'o','broadcast':true}", &r);
    expect_json(&r, 201);
    res_free(&r);
    call(f, "POST", "/v1/groups/bc/receive", "{'topic':'o'}", &r);
    expect_problem(&r, 400, "bad-request", "field 'member' is required");
    res_free(&r);
    json_t *m = recv_msgs(f, "bc", "{'topic':'o','member':'m1'}");
    assert_int_equal(json_array_size(m), 0);
    json_decref(m);
}

static void receive_from_unknown_topic_without_auto_create_is_404(void **state)
{
    fx *f = *state;
    res r;
    call(f, "POST", "/v1/groups/g/receive", "{'topic':'ghost'}", &r);
    expect_problem(&r, 404, "not-found", "topic 'ghost'");
    res_free(&r);
    call(f, "PUT", "/v1/groups/g", "{'topic':'ghost'}", &r);
    expect_problem(&r, 404, "not-found", "topic 'ghost'");
    res_free(&r);
}

static void receive_filter_applies_and_is_reapplied_after_a_put(void **state)
{
    fx *f = *state;
    send_ok(f, "tags", "{'tag':'a','key':'k','body':1}");
    send_ok(f, "tags", "{'tag':'b','key':'k','body':2}");
    json_t *m = recv_msgs(f, "flt", "{'topic':'tags','filter':'b','max':10}");
    assert_int_equal(json_array_size(m), 1);
    assert_string_equal(msg_str(m, 0, "tag"), "b");
    json_decref(m);
    res r;
    call(f, "PUT", "/v1/groups/flt", "{'topic':'tags','filter':'zzz'}", &r);
    expect_json(&r, 200);
    res_free(&r);
    send_ok(f, "tags", "{'tag':'b','key':'k','body':3}");
    /* Same filter text as before the PUT: it must be applied again. */
    m = recv_msgs(f, "flt", "{'topic':'tags','filter':'b','max':10}");
    assert_int_equal(json_array_size(m), 1);
    assert_string_equal(msg_str(m, 0, "tag"), "b");
    json_decref(m);
}

/* A filter is passed on as a C string: "b\u0000x" must not become "b". */
static void filter_with_a_nul_byte_is_400_not_cut_short(void **state)
{
    fx *f = *state;
    res r;
    call(f, "POST", "/v1/groups/nul/receive", "{'topic':'o','filter':'b\\u0000x'}",
         &r);
    expect_problem(&r, 400, "bad-request", "field 'filter'");
    res_free(&r);
    call(f, "PUT", "/v1/groups/nul", "{'topic':'o','filter':'b\\u0000x'}", &r);
    expect_problem(&r, 400, "bad-request", "field 'filter'");
    res_free(&r);
}

/* The receive-filter cache (api_filter_*): a receive whose filter this
 * handler applied last skips the durable brk_group_put.  Two puts of one
 * (group, topic) at once leave the broker with whichever landed last, which
 * neither caller knows; remembering either would make every later receive
 * with it skip the put and filter by the other one.  So an application
 * that overlapped another is not remembered. */
static void overlapping_filter_puts_are_not_remembered(void **state)
{
    fx *f = *state;
    api_handler *h = f->h;
    api_filter_begin(h, "g", "t");
    api_filter_end(h, "g", "t", "a");
    assert_true(api_filter_known(h, "g", "t", "a"));
    api_filter_begin(h, "g", "t");              /* forgotten while it runs */
    assert_false(api_filter_known(h, "g", "t", "a"));
    api_filter_begin(h, "g", "t");
    api_filter_end(h, "g", "t", "b");           /* ends first ... */
    api_filter_end(h, "g", "t", "a");           /* ... but put first, maybe */
    assert_false(api_filter_known(h, "g", "t", "a"));
    assert_false(api_filter_known(h, "g", "t", "b"));
    api_filter_begin(h, "g", "t");              /* alone again: trusted */
    api_filter_end(h, "g", "t", "b");
    assert_true(api_filter_known(h, "g", "t", "b"));
    api_filter_begin(h, "g", "t");              /* a failed put: unknown */
    api_filter_end(h, "g", "t", NULL);
    assert_false(api_filter_known(h, "g", "t", "b"));
}

typedef struct flt_worker {
    fx *f;
    const char *body;
} flt_worker;

static void *filter_storm(void *arg)
{
    flt_worker *w = arg;
    for (int i = 0; i < 100; i++) {
        res r;
        call(w->f, "POST", "/v1/groups/race/receive", w->body, &r);
        res_free(&r);
    }
    return NULL;
}

/* The same claim end to end, with real threads (and TSan): after receives
 * with two filters race, a receive with the filter the cache vouches for
 * gets a message carrying that tag. */
static void racing_filters_leave_the_cache_agreeing_with_the_broker(void **state)
{
    fx *f = *state;
    for (int round = 0; round < 10; round++) {
        flt_worker wa = { f, "{'topic':'rt','filter':'a'}" };
        flt_worker wb = { f, "{'topic':'rt','filter':'b'}" };
        pthread_t ta, tb;
        pthread_create(&ta, NULL, filter_storm, &wa);
        pthread_create(&tb, NULL, filter_storm, &wb);
        pthread_join(ta, NULL);
        pthread_join(tb, NULL);
        const char *tag = api_filter_known(f->h, "race", "rt", "a") ? "a" : "b";
        char body[128];
        snprintf(body, sizeof body, "{'tag':'%s','body':%d}", tag, round);
        send_ok(f, "rt", body);
        snprintf(body, sizeof body, "{'topic':'rt','filter':'%s'}", tag);
        json_t *m = recv_msgs(f, "race", body);
        if (json_array_size(m) != 1)
            fail_msg("round %d: receive with filter '%s' got %zu messages",
                     round, tag, json_array_size(m));
        json_decref(m);
    }
}

static void ack_and_nack_report_counts_and_failures(void **state)
{
    fx *f = *state;
    send_ok(f, "work", "{'key':'k','body':1}");
    send_ok(f, "work", "{'key':'k','body':2}");
    json_t *m = recv_msgs(f, "w", "{'topic':'work','max':2}");
    assert_int_equal(json_array_size(m), 2);
    char body[512];
    snprintf(body, sizeof body, "{'receipts':['%s','garbage']}",
             msg_str(m, 0, "receipt"));
    res r;
    call(f, "POST", "/v1/groups/w/ack", body, &r);
    expect_json(&r, 200);
    assert_int_equal(num(r.json, "acked"), 1);
    json_t *fl = json_object_get(r.json, "failed");
    assert_int_equal(json_array_size(fl), 1);
    assert_string_equal(json_string_value(json_object_get(json_array_get(fl, 0),
                                                          "reason")), "malformed");
    res_free(&r);
    call(f, "POST", "/v1/groups/w/ack", body, &r);         /* again: stale */
    expect_json(&r, 200);
    assert_int_equal(num(r.json, "acked"), 0);
    assert_string_equal(json_string_value(json_object_get(
                            json_array_get(json_object_get(r.json, "failed"), 0),
                            "reason")), "stale");
    res_free(&r);
    snprintf(body, sizeof body, "{'receipts':['%s'],'delay_ms':1,'reason':'db down'}",
             msg_str(m, 1, "receipt"));
    call(f, "POST", "/v1/groups/w/nack", body, &r);
    expect_json(&r, 200);
    assert_int_equal(num(r.json, "nacked"), 1);
    assert_int_equal(json_array_size(json_object_get(r.json, "failed")), 0);
    res_free(&r);
    json_decref(m);
}

static void settle_errors_are_400_and_404(void **state)
{
    fx *f = *state;
    res r;
    call(f, "POST", "/v1/groups/nobody/ack", "{'receipts':['x']}", &r);
    expect_problem(&r, 404, "not-found", "group 'nobody'");
    res_free(&r);
    call(f, "POST", "/v1/groups/nobody/nack", "{'receipts':['x']}", &r);
    expect_problem(&r, 404, "not-found", "group 'nobody'");
    res_free(&r);
    call(f, "POST", "/v1/groups/g/ack", "{'receipts':[]}", &r);
    expect_problem(&r, 400, "bad-request", "field 'receipts'");
    res_free(&r);
    call(f, "POST", "/v1/groups/g/ack", "{'receipts':'r'}", &r);
    expect_problem(&r, 400, "bad-request", "field 'receipts'");
    res_free(&r);
    call(f, "POST", "/v1/groups/g/ack", "{'receipts':['r',5]}", &r);
    expect_problem(&r, 400, "bad-request", "field 'receipts[1]' must be a string");
    res_free(&r);
    call(f, "POST", "/v1/groups/g/nack", "{'receipts':['r'],'delay_ms':-1}", &r);
    expect_problem(&r, 400, "bad-request", "field 'delay_ms'");
    res_free(&r);
    call(f, "POST", "/v1/groups/g/ack", NULL, &r);
    expect_problem(&r, 400, "bad-request", "request body is required");
    res_free(&r);
}

/* docs: "otherwise rounded up to the next delay level, at most 2 h" (the
 * broker clamps), and openapi allows any u32. */
static void nack_delay_beyond_two_hours_is_clamped_not_refused(void **state)
{
    fx *f = *state;
    send_ok(f, "later", "{'body':1}");
    json_t *m = recv_msgs(f, "nk", "{'topic':'later'}");
    char body[256];
    snprintf(body, sizeof body, "{'receipts':['%s'],'delay_ms':10800000}",
             msg_str(m, 0, "receipt"));
    json_decref(m);
    res r;
    call(f, "POST", "/v1/groups/nk/nack", body, &r);
    expect_json(&r, 200);
    assert_int_equal(num(r.json, "nacked"), 1);
    res_free(&r);
    call(f, "POST", "/v1/groups/nk/nack", "{'receipts':['r'],'delay_ms':4294967296}",
         &r);
    expect_problem(&r, 400, "bad-request", "field 'delay_ms'");
    res_free(&r);
}

static void dead_letters_are_listed_and_replayed(void **state)
{
    fx *f = *state;
    res r;
    call(f, "PUT", "/v1/groups/dl", "{'topic':'jobs','max_deliveries':1}", &r);
    expect_json(&r, 201);
    res_free(&r);
    send_ok(f, "jobs", "{'key':'j-1','headers':{'h':'v'},'body':{'job':1}}");
    json_t *m = recv_msgs(f, "dl", "{'topic':'jobs'}");
    char body[256];
    snprintf(body, sizeof body, "{'receipts':['%s'],'reason':'boom'}",
             msg_str(m, 0, "receipt"));
    char id[37];
    snprintf(id, sizeof id, "%s", msg_str(m, 0, "msg_id"));
    json_decref(m);
    call(f, "POST", "/v1/groups/dl/nack", body, &r);
    expect_json(&r, 200);
    res_free(&r);
    call(f, "GET", "/v1/groups/dl/dead-letters", NULL, &r);
    expect_json(&r, 200);
    json_t *d = json_object_get(r.json, "dead_letters");
    assert_int_equal(json_array_size(d), 1);
    json_t *x = json_array_get(d, 0);
    assert_int_equal(num(x, "index"), 0);
    assert_string_equal(json_string_value(json_object_get(x, "msg_id")), id);
    assert_string_equal(json_string_value(json_object_get(x, "topic")), "jobs");
    assert_string_equal(json_string_value(json_object_get(x, "reason")), "boom");
    assert_int_equal(num(x, "delivery_count"), 1);
    assert_int_equal(num(x, "offset"), 0);
    json_t *h = json_object_get(x, "headers");
    assert_int_equal(json_object_size(h), 1);       /* outboxd-dlq-* dropped */
    assert_string_equal(json_string_value(json_object_get(h, "h")), "v");
    assert_int_equal(num(json_object_get(x, "body"), "job"), 1);
    assert_int_equal(num(r.json, "next"), 1);
    res_free(&r);
    req_opts o = { .query = "from=1&limit=5" };
    call_with(f, "GET", "/v1/groups/dl/dead-letters", NULL, &o, &r);
    expect_json(&r, 200);
    assert_int_equal(json_array_size(json_object_get(r.json, "dead_letters")), 0);
    assert_int_equal(num(r.json, "next"), 1);
    res_free(&r);
    o.query = "limit=1001";
    call_with(f, "GET", "/v1/groups/dl/dead-letters", NULL, &o, &r);
    expect_problem(&r, 400, "bad-request", "query parameter 'limit'");
    res_free(&r);
    call(f, "POST", "/v1/groups/dl/dead-letters/replay", NULL, &r);
    expect_json(&r, 200);
    assert_int_equal(num(r.json, "replayed"), 1);
    res_free(&r);
    call(f, "POST", "/v1/groups/dl/dead-letters/replay", "{'max':0}", &r);
    expect_problem(&r, 400, "bad-request", "field 'max'");
    res_free(&r);
    m = recv_msgs(f, "dl", "{'topic':'jobs'}");
    assert_int_equal(json_array_size(m), 1);
    assert_string_equal(msg_str(m, 0, "msg_id"), id);
    json_decref(m);
    call(f, "GET", "/v1/groups/nobody/dead-letters", NULL, &r);
    expect_problem(&r, 404, "not-found", "group 'nobody'");
    res_free(&r);
    call(f, "POST", "/v1/groups/nobody/dead-letters/replay", "{}", &r);
    expect_problem(&r, 404, "not-found", "group 'nobody'");
    res_free(&r);
}
/* ---- main ------------------------------------------------------------------------------------ */

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
#define T_NOAUTO(fn) cmocka_unit_test_setup_teardown(fn, setup_no_auto, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(group_put_is_201_then_200_and_get_shows_lag),
        T(group_errors_are_400_404_and_409),
        T(put_without_config_fields_keeps_the_config),
        T(put_with_one_config_field_keeps_the_others),
        T(receive_at_max_inflight_is_429_with_retry_after),
        T(receive_field_errors_are_400),
        T_NOAUTO(receive_from_unknown_topic_without_auto_create_is_404),
        T(receive_filter_applies_and_is_reapplied_after_a_put),
        T(filter_with_a_nul_byte_is_400_not_cut_short),
        T(overlapping_filter_puts_are_not_remembered),
        T(racing_filters_leave_the_cache_agreeing_with_the_broker),
        T(ack_and_nack_report_counts_and_failures),
        T(settle_errors_are_400_and_404),
        T(nack_delay_beyond_two_hours_is_clamped_not_refused),
        T(dead_letters_are_listed_and_replayed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
