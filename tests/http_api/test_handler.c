/*
 * test_handler.c - the transport-free request handler (api_handle) driven
 * in process over a real store (handler_fx.h): routing (404, 405 with
 * Allow, HEAD), the shared checks (413, 415, bad JSON), transactions,
 * sends, idempotency keys (replay, 422, 409 in flight, the redo of an
 * intent whose answer was lost), topics, the long poll rounds with a
 * recording wake callback, drain (503, readyz), the metrics page, and
 * concurrent callers (run under TSan too).  The consumer-group routes are
 * in test_handler_groups.c; the metrics hook (api_config.metrics_ext) in
 * test_handler_metrics.c; failing allocations and nesting limits in
 * test_handler_faults.c.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "handler_fx.h"
#include "idem.h"

/* ---- routing and the shared checks ------------------------------------------------------- */

static void unknown_path_is_404_unmatched(void **state)
{
    fx *f = *state;
    res r;
    call(f, "GET", "/v1/nope", NULL, &r);
    expect_problem(&r, 404, "not-found", "no route for '/v1/nope'");
    assert_string_equal(r.route, "unmatched");
    res_free(&r);
    call(f, "GET", "/v1/topics/", NULL, &r);        /* empty parameter */
    expect_problem(&r, 404, "not-found", NULL);
    res_free(&r);
}

/* The Allow header of every path lists exactly the table's methods (plus
 * HEAD where GET is served). */
static void wrong_method_is_405_with_allow_for_every_path(void **state)
{
    fx *f = *state;
    size_t n;
    const api_route_info *rt = api_routes(&n);
    assert_int_equal(n, 19);
    for (size_t i = 0; i < n; i++) {
        char path[256], allow[64] = "";
        size_t o = 0;
        for (const char *p = rt[i].path; *p;) {
            if (*p == '{') {
                o += (size_t)snprintf(path + o, sizeof path - o, "x1");
                p = strchr(p, '}') + 1;
            } else {
                path[o++] = *p++;
            }
        }
        path[o] = 0;
        static const char *const order[] = { "GET", "HEAD", "POST", "PUT" };
        for (size_t k = 0; k < 4; k++) {
            bool has = false;
            for (size_t j = 0; j < n; j++)
                if (strcmp(rt[j].path, rt[i].path) == 0
                    && (strcmp(rt[j].method, order[k]) == 0
                        || (k == 1 && strcmp(rt[j].method, "GET") == 0)))
                    has = true;
            if (has)
                snprintf(allow + strlen(allow), sizeof allow - strlen(allow),
                         "%s%s", allow[0] ? ", " : "", order[k]);
        }
        res r;
        call(f, "DELETE", path, NULL, &r);
        expect_problem(&r, 405, "method-not-allowed", "'DELETE'");
        if (!r.allow || strcmp(r.allow, allow) != 0)
            fail_msg("%s: Allow '%s', want '%s'", rt[i].path,
                     r.allow ? r.allow : "(none)", allow);
        assert_string_equal(r.route, rt[i].path);
        res_free(&r);
    }
}

static void head_is_served_by_the_get_route(void **state)
{
    fx *f = *state;
    res r;
    call(f, "HEAD", "/healthz", NULL, &r);
    expect_json(&r, 200);
    assert_string_equal(r.route, "/healthz");
    res_free(&r);
}

static void body_over_the_limit_is_413(void **state)
{
    fx *f = *state;
    size_t n = f->cfg.max_body_bytes + 1;
    char *big = malloc(n + 1);
    memset(big, ' ', n);
    big[0] = '{';
    big[n - 1] = '}';
    big[n] = 0;
    res r;
    req_opts o = { .raw = true };
    call_with(f, "POST", "/v1/topics/t/messages", big, &o, &r);
    expect_problem(&r, 413, "payload-too-large", "limit");
    res_free(&r);
    free(big);
}

static void non_json_content_type_is_415_and_json_types_are_accepted(void **state)
{
    fx *f = *state;
    res r;
    req_opts o = { .ctype = "text/plain" };
    call_with(f, "POST", "/v1/topics/t/messages", "{'body':1}", &o, &r);
    expect_problem(&r, 415, "unsupported-media-type", "text/plain");
    res_free(&r);
    o.ctype = "";                   /* no Content-Type at all */
    call_with(f, "POST", "/v1/topics/t/messages", "{'body':1}", &o, &r);
    expect_problem(&r, 415, "unsupported-media-type", NULL);
    res_free(&r);
    o.ctype = "application/jsonx";
    call_with(f, "PUT", "/v1/topics/t", "{'queues':1}", &o, &r);
    expect_problem(&r, 415, "unsupported-media-type", NULL);
    res_free(&r);
    static const char *const good[] = { "application/json; charset=utf-8",
                                        "Application/JSON",
                                        "application/vnd.outboxd+json" };
    for (size_t i = 0; i < 3; i++) {
        o.ctype = good[i];
        call_with(f, "POST", "/v1/topics/t/messages", "{'body':1}", &o, &r);
        expect_json(&r, 201);
        res_free(&r);
    }
}

static void bad_json_and_non_objects_are_400(void **state)
{
    fx *f = *state;
    res r;
    call(f, "POST", "/v1/topics/t/messages", "{'body':", &r);
    expect_problem(&r, 400, "bad-request", "not valid JSON");
    res_free(&r);
    call(f, "POST", "/v1/topics/t/messages", "[1]", &r);
    expect_problem(&r, 400, "bad-request", "must be a JSON object");
    res_free(&r);
    call(f, "POST", "/v1/topics/t/messages", "{'body':1,'body':2}", &r);
    expect_problem(&r, 400, "bad-request", "duplicate");
    res_free(&r);
    call(f, "POST", "/v1/topics/t/messages", NULL, &r);
    expect_problem(&r, 400, "bad-request", "request body is required");
    res_free(&r);
}

/* ---- transactions ------------------------------------------------------------------------ */

static void prepare_is_201_prepared_and_visible_by_get(void **state)
{
    fx *f = *state;
    res r;
    call(f, "POST", "/v1/transactions",
         "{'topic':'orders','txid':'tx-1','key':'o-1','body':{'a':1},"
         "'check':{'first_check_ms':60000,'max_checks':3}}", &r);
    expect_json(&r, 201);
    assert_string_equal(str(&r, "txid"), "tx-1");
    assert_string_equal(str(&r, "state"), "prepared");
    assert_int_equal(strlen(str(&r, "msg_id")), 36);
    char id[37];
    snprintf(id, sizeof id, "%s", str(&r, "msg_id"));
    res_free(&r);
    call(f, "GET", "/v1/transactions/tx-1", NULL, &r);
    expect_json(&r, 200);
    assert_string_equal(str(&r, "msg_id"), id);
    assert_string_equal(str(&r, "topic"), "orders");
    assert_string_equal(str(&r, "key"), "o-1");
    assert_string_equal(str(&r, "state"), "prepared");
    assert_string_equal(str(&r, "prepared_at"), "2026-11-25T13:14:02.123Z");
    assert_int_equal(num(r.json, "checks"), 0);
    assert_false(json_is_true(json_object_get(r.json, "stuck")));
    json_t *chk = json_object_get(r.json, "check");
    assert_int_equal(num(chk, "first_check_ms"), 60000);
    assert_int_equal(num(chk, "interval_ms"), 60000);   /* the default */
    assert_int_equal(num(chk, "max_checks"), 3);
    assert_string_equal(json_string_value(json_object_get(chk, "on_exhausted")),
                        "rollback");
    res_free(&r);
}

static void prepare_without_txid_generates_one(void **state)
{
    fx *f = *state;
    res r;
    call(f, "POST", "/v1/transactions", "{'topic':'orders','body':'x'}", &r);
    expect_json(&r, 201);
    assert_int_equal(strlen(str(&r, "txid")), 36);
    res_free(&r);
}

static void prepare_field_errors_are_400_naming_the_field(void **state)
{
    fx *f = *state;
    static const char *const cases[][2] = {
        { "{'body':1}", "field 'topic' is required" },
        { "{'topic':'__txn_half','body':1}", "field 'topic'" },
        { "{'topic':'a b','body':1}", "field 'topic'" },
        { "{'topic':'o','body':1,'txid':'a/b'}", "field 'txid'" },
        { "{'topic':'o','body':1,'check':{'interval_ms':0}}",
          "field 'check.interval_ms' must be >= 1" },
        { "{'topic':'o','body':1,'check':{'max_checks':70000}}",
          "field 'check.max_checks' must be in 1..65535" },
        { "{'topic':'o','body':1,'check':{'every':1}}",
          "unknown field 'check.every'" },
        { "{'topic':'o','body':1,'check':{'on_exhausted':'later'}}",
          "field 'check.on_exhausted'" },
        { "{'topic':'o','body':1,'check':{'on_exhausted':'hold',"
          "'expiry_topic':'x'}}", "field 'check.expiry_topic' is only allowed" },
        { "{'topic':'o','body':1,'check':5}", "field 'check' must be an object" },
        { "{'topic':'o','body':1,'delay_ms':-1}", "field 'delay_ms'" },
        { "{'topic':'o','body':1,'delay_ms':999999999999}",
          "field 'delay_ms' is beyond the maximum delay" },
        { "{'topic':'o','body':1,'delay_ms':5,'deliver_at':'2026-11-25T13:14:02Z'}",
          "mutually exclusive" },
        { "{'topic':'o','body':1,'deliver_at':'tomorrow'}", "field 'deliver_at'" },
        { "{'topic':'o','body':1,'colour':'red'}", "unknown field 'colour'" },
        { "{'topic':'o'}", "'body' or 'body_base64' is required" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        res r;
        call(f, "POST", "/v1/transactions", cases[i][0], &r);
        expect_problem(&r, 400, "bad-request", cases[i][1]);
        res_free(&r);
    }
}

/* strcmp would read "hold\u0000x" as "hold": the whole string must match. */
static void on_exhausted_with_a_nul_byte_is_400(void **state)
{
    fx *f = *state;
    res r;
    call(f, "POST", "/v1/transactions", "{'topic':'o','body':1,"
         "'check':{'on_exhausted':'hold\\u0000junk'}}", &r);
    expect_problem(&r, 400, "bad-request", "field 'check.on_exhausted'");
    res_free(&r);
}

static void prepare_same_txid_replays_and_other_content_is_409(void **state)
{
    fx *f = *state;
    res a, b;
    call(f, "POST", "/v1/transactions", "{'topic':'orders','txid':'t-9','body':1}", &a);
    expect_json(&a, 201);
    call(f, "POST", "/v1/transactions", "{'topic':'orders','txid':'t-9','body':1}", &b);
    expect_json(&b, 201);
    assert_string_equal(str(&a, "msg_id"), str(&b, "msg_id"));
    res_free(&a);
    res_free(&b);
    call(f, "POST", "/v1/transactions", "{'topic':'orders','txid':'t-9','body':2}", &a);
    expect_problem(&a, 409, "conflict", "transaction 't-9'");
    res_free(&a);
}

static void prepare_into_unknown_topic_without_auto_create_is_404(void **state)
{
    fx *f = *state;
    res r;
    call(f, "POST", "/v1/transactions", "{'topic':'ghost','body':1}", &r);
    expect_problem(&r, 404, "not-found", "topic 'ghost'");
    res_free(&r);
}

static void commit_is_200_and_the_message_is_received(void **state)
{
    fx *f = *state;
    prepare_ok(f, "c-1");
    res r;
    call(f, "POST", "/v1/transactions/c-1/commit", NULL, &r);
    expect_json(&r, 200);
    assert_string_equal(str(&r, "state"), "committed");
    assert_string_equal(str(&r, "txid"), "c-1");
    assert_null(json_object_get(r.json, "deliver_at"));
    char id[37];
    snprintf(id, sizeof id, "%s", str(&r, "msg_id"));
    res_free(&r);
    call(f, "POST", "/v1/transactions/c-1/commit", "{}", &r);   /* repeat */
    expect_json(&r, 200);
    assert_string_equal(str(&r, "state"), "committed");
    res_free(&r);
    json_t *m = recv_msgs(f, "g", "{'topic':'orders'}");
    assert_int_equal(json_array_size(m), 1);
    assert_string_equal(msg_str(m, 0, "msg_id"), id);
    assert_string_equal(msg_str(m, 0, "key"), "k-c-1");
    json_decref(m);
}

static void commit_after_rollback_is_409_saying_rolled_back(void **state)
{
    fx *f = *state;
    prepare_ok(f, "tx-1");
    res r;
    call(f, "POST", "/v1/transactions/tx-1/rollback", NULL, &r);
    expect_json(&r, 200);
    assert_string_equal(str(&r, "state"), "rolled_back");
    assert_null(json_object_get(r.json, "msg_id"));
    res_free(&r);
    call(f, "POST", "/v1/transactions/tx-1/commit", NULL, &r);
    expect_problem(&r, 409, "conflict", "transaction 'tx-1' is rolled_back");
    res_free(&r);
}

static void rollback_after_commit_is_409_saying_committed(void **state)
{
    fx *f = *state;
    prepare_ok(f, "tx-2");
    res r;
    call(f, "POST", "/v1/transactions/tx-2/commit", NULL, &r);
    expect_json(&r, 200);
    res_free(&r);
    call(f, "POST", "/v1/transactions/tx-2/rollback", NULL, &r);
    expect_problem(&r, 409, "conflict", "transaction 'tx-2' is committed");
    res_free(&r);
}

static void verdicts_on_unknown_txids_are_404(void **state)
{
    fx *f = *state;
    res r;
    call(f, "POST", "/v1/transactions/nope/commit", NULL, &r);
    expect_problem(&r, 404, "not-found", "transaction 'nope' not found");
    res_free(&r);
    call(f, "POST", "/v1/transactions/nope/rollback", NULL, &r);
    expect_problem(&r, 404, "not-found", "transaction 'nope'");
    res_free(&r);
    call(f, "GET", "/v1/transactions/nope", NULL, &r);
    expect_problem(&r, 404, "not-found", "transaction 'nope'");
    res_free(&r);
}

static void verdict_bodies_other_than_empty_object_are_refused(void **state)
{
    fx *f = *state;
    prepare_ok(f, "tx-3");
    res r;
    call(f, "POST", "/v1/transactions/tx-3/commit", "{'force':true}", &r);
    expect_problem(&r, 400, "bad-request", "unknown field 'force'");
    res_free(&r);
    req_opts o = { .ctype = "text/plain" };
    call_with(f, "POST", "/v1/transactions/tx-3/commit", "{}", &o, &r);
    expect_problem(&r, 415, "unsupported-media-type", NULL);
    res_free(&r);
    char path[300], id[200];
    memset(id, 'a', 140);
    id[140] = 0;
    snprintf(path, sizeof path, "/v1/transactions/%s/commit", id);
    call(f, "POST", path, NULL, &r);
    expect_problem(&r, 400, "bad-request", "txid");
    res_free(&r);
}

static void delayed_commit_answers_deliver_at(void **state)
{
    fx *f = *state;
    res r;
    call(f, "POST", "/v1/transactions",
         "{'topic':'orders','txid':'d-1','body':1,'delay_ms':60000}", &r);
    expect_json(&r, 201);
    res_free(&r);
    call(f, "POST", "/v1/transactions/d-1/commit", NULL, &r);
    expect_json(&r, 200);
    assert_string_equal(str(&r, "deliver_at"), "2026-11-25T13:15:02.123Z");
    res_free(&r);
}

static void transactions_are_listed_oldest_first_and_filtered(void **state)
{
    fx *f = *state;
    prepare_ok(f, "l-1");
    brk_fake_clock_advance(&f->clk, 10);
    prepare_ok(f, "l-2");
    res r;
    req_opts o = { .query = "limit=10" };
    call_with(f, "GET", "/v1/transactions", NULL, &o, &r);
    expect_json(&r, 200);
    json_t *v = json_object_get(r.json, "transactions");
    assert_int_equal(json_array_size(v), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(v, 0),
                                                          "txid")), "l-1");
    res_free(&r);
    o.query = "state=stuck";
    call_with(f, "GET", "/v1/transactions", NULL, &o, &r);
    expect_json(&r, 200);
    assert_int_equal(json_array_size(json_object_get(r.json, "transactions")), 0);
    res_free(&r);
    o.query = "state=done";
    call_with(f, "GET", "/v1/transactions", NULL, &o, &r);
    expect_problem(&r, 400, "bad-request", "query parameter 'state'");
    res_free(&r);
    o.query = "limit=0";
    call_with(f, "GET", "/v1/transactions", NULL, &o, &r);
    expect_problem(&r, 400, "bad-request", "query parameter 'limit'");
    res_free(&r);
    o.query = "limt=5";
    call_with(f, "GET", "/v1/transactions", NULL, &o, &r);
    expect_problem(&r, 400, "bad-request", "unknown query parameter 'limt'");
    res_free(&r);
    o.query = "limit=1&limit=2";
    call_with(f, "GET", "/v1/transactions", NULL, &o, &r);
    expect_problem(&r, 400, "bad-request", "twice");
    res_free(&r);
    o.query = "state=%70repared&limit=%31";      /* escapes decode */
    call_with(f, "GET", "/v1/transactions", NULL, &o, &r);
    expect_json(&r, 200);
    assert_int_equal(json_array_size(json_object_get(r.json, "transactions")), 1);
    res_free(&r);
}

/* ---- sending --------------------------------------------------------------------------------- */

static void send_is_201_with_queue_and_offset_and_round_trips(void **state)
{
    fx *f = *state;
    res r;
    call(f, "POST", "/v1/topics/orders/messages",
         "{'key':'o-1','tag':'paid','headers':{'traceparent':'00-1-2-01'},"
         "'body':{'total':12.5}}", &r);
    expect_json(&r, 201);
    assert_int_equal(num(r.json, "offset"), 0);
    assert_true(json_is_integer(json_object_get(r.json, "queue")));
    char id[37];
    snprintf(id, sizeof id, "%s", str(&r, "msg_id"));
    res_free(&r);
    json_t *m = recv_msgs(f, "g", "{'topic':'orders'}");
    assert_int_equal(json_array_size(m), 1);
    json_t *x = json_array_get(m, 0);
    assert_string_equal(msg_str(m, 0, "msg_id"), id);
    assert_string_equal(msg_str(m, 0, "topic"), "orders");
    assert_string_equal(msg_str(m, 0, "tag"), "paid");
    assert_string_equal(msg_str(m, 0, "born_at"), "2026-11-25T13:14:02.123Z");
    assert_int_equal(num(x, "delivery_count"), 1);
    assert_true(json_real_value(json_object_get(json_object_get(x, "body"),
                                                "total")) == 12.5);
    assert_string_equal(json_string_value(json_object_get(
                            json_object_get(x, "headers"), "traceparent")),
                        "00-1-2-01");
    assert_true(strlen(msg_str(m, 0, "receipt")) > 10);
    json_decref(m);
}

static void delayed_send_answers_deliver_at_and_arrives_when_due(void **state)
{
    fx *f = *state;
    res r;
    call(f, "POST", "/v1/topics/later/messages", "{'body':1,'delay_ms':5000}", &r);
    expect_json(&r, 201);
    assert_string_equal(str(&r, "deliver_at"), "2026-11-25T13:14:07.123Z");
    assert_null(json_object_get(r.json, "offset"));
    res_free(&r);
    call(f, "POST", "/v1/topics/later/messages", "{'body':2,'delay_level':1}", &r);
    expect_json(&r, 201);
    assert_string_equal(str(&r, "deliver_at"), "2026-11-25T13:14:03.123Z");
    res_free(&r);
    call(f, "POST", "/v1/topics/later/messages",
         "{'body':3,'deliver_at':'2026-11-25T14:14:03.000+01:00'}", &r);
    expect_json(&r, 201);
    assert_string_equal(str(&r, "deliver_at"), "2026-11-25T13:14:03.000Z");
    res_free(&r);
    json_t *m = recv_msgs(f, "g", "{'topic':'later'}");
    assert_int_equal(json_array_size(m), 0);
    json_decref(m);
    brk_fake_clock_advance(&f->clk, 6000);
    unsigned fired = 0;
    assert_int_equal(brk_delay_tick(f->d, &fired), BRK_OK);
    assert_int_equal(fired, 3);
    m = recv_msgs(f, "g", "{'topic':'later','max':10}");
    assert_int_equal(json_array_size(m), 3);
    json_decref(m);
}

static void past_deliver_at_and_zero_delay_are_plain_sends(void **state)
{
    fx *f = *state;
    res r;
    call(f, "POST", "/v1/topics/now/messages",
         "{'body':1,'deliver_at':'2020-01-01T00:00:00Z'}", &r);
    expect_json(&r, 201);
    assert_int_equal(num(r.json, "offset"), 0);
    res_free(&r);
    call(f, "POST", "/v1/topics/now/messages", "{'body':1,'delay_ms':0}", &r);
    expect_json(&r, 201);
    assert_non_null(json_object_get(r.json, "queue"));
    res_free(&r);
}

static void send_field_errors_are_400_naming_the_field(void **state)
{
    fx *f = *state;
    static const char *const cases[][3] = {
        { "orders", "{'body':1,'delay_ms':5,'delay_level':2}", "at most one" },
        { "orders", "{'body':1,'delay_level':19}", "field 'delay_level' must be in 1..18" },
        { "orders", "{'body':1,'delay_ms':3500000000}",
          "field 'delay_ms' is beyond the maximum delay" },
        { "orders", "{'body':1,'deliver_at':'2099-01-01T00:00:00Z'}",
          "field 'deliver_at' is beyond the maximum delay" },
        { "orders", "{'body':1,'deliver_at':'2026-02-30T00:00:00Z'}",
          "field 'deliver_at' must be an RFC 3339 time" },
        { "orders", "{'body':1,'topic':'x'}", "unknown field 'topic'" },
        { "orders", "{'body':1,'body_base64':'AA=='}", "mutually exclusive" },
        { "orders", "{'body_base64':'***'}", "field 'body_base64'" },
        { "orders", "{'body':1,'headers':{'a':1}}", "field 'headers.a'" },
        { "__delay", "{'body':1}", "internal" },
        { "a:b", "{'body':1}", "[A-Za-z0-9._-]" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char path[128];
        snprintf(path, sizeof path, "/v1/topics/%s/messages", cases[i][0]);
        res r;
        call(f, "POST", path, cases[i][1], &r);
        expect_problem(&r, 400, "bad-request", cases[i][2]);
        res_free(&r);
    }
}

static void send_to_unknown_topic_without_auto_create_is_404(void **state)
{
    fx *f = *state;
    res r;
    call(f, "POST", "/v1/topics/ghost/messages", "{'body':1}", &r);
    expect_problem(&r, 404, "not-found", "topic 'ghost'");
    res_free(&r);
    call(f, "POST", "/v1/topics/ghost/messages", "{'body':1,'delay_ms':1000}", &r);
    expect_problem(&r, 404, "not-found", "topic 'ghost'");
    res_free(&r);
}

static void send_into_a_full_store_is_507(void **state)
{
    fx *f = *state;
    res r;
    int status = 201;
    char body[1200];
    snprintf(body, sizeof body, "{'body_base64':'");
    size_t o = strlen(body);
    memset(body + o, 'A', 1000);
    snprintf(body + o + 1000, sizeof body - o - 1000, "'}");
    for (int i = 0; i < 2000 && status == 201; i++) {
        call(f, "POST", "/v1/topics/fill/messages", body, &r);
        status = r.status;
        if (status != 201)
            expect_problem(&r, 507, "store-full", "store full");
        res_free(&r);
    }
    assert_int_equal(status, 507);
}

static void message_bigger_than_the_store_takes_is_413(void **state)
{
    fx *f = *state;
    char body[3000];
    snprintf(body, sizeof body, "{'body_base64':'");
    size_t o = strlen(body);
    memset(body + o, 'A', 2000);
    snprintf(body + o + 2000, sizeof body - o - 2000, "'}");
    res r;
    call(f, "POST", "/v1/topics/big/messages", body, &r);
    expect_problem(&r, 413, "payload-too-large", "larger than the store");
    res_free(&r);
}

/* ---- idempotency keys ---------------------------------------------------------------------- */

static void idempotency_key_replays_the_first_answer(void **state)
{
    fx *f = *state;
    res a, b;
    req_opts o = { .idem_key = "order-7" };
    call_with(f, "POST", "/v1/topics/idem/messages", "{'body':{'n':7}}", &o, &a);
    expect_json(&a, 201);
    call_with(f, "POST", "/v1/topics/idem/messages", "{'body':{'n':7}}", &o, &b);
    expect_json(&b, 201);
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.body, b.body, a.len);
    res_free(&a);
    res_free(&b);
    json_t *m = recv_msgs(f, "g", "{'topic':'idem'}");
    assert_int_equal(json_array_size(m), 1);
    json_decref(m);
    o.idem_key = "prep-7";
    call_with(f, "POST", "/v1/transactions", "{'topic':'idem','body':1}", &o, &a);
    expect_json(&a, 201);
    call_with(f, "POST", "/v1/transactions", "{'topic':'idem','body':1}", &o, &b);
    expect_json(&b, 201);
    assert_string_equal(str(&a, "txid"), str(&b, "txid"));
    assert_memory_equal(a.body, b.body, a.len);
    res_free(&a);
    res_free(&b);
}

static void idempotency_key_with_another_body_or_path_is_422(void **state)
{
    fx *f = *state;
    res r;
    req_opts o = { .idem_key = "k-1" };
    call_with(f, "POST", "/v1/topics/orders/messages", "{'body':1}", &o, &r);
    expect_json(&r, 201);
    res_free(&r);
    call_with(f, "POST", "/v1/topics/orders/messages", "{'body':2}", &o, &r);
    expect_problem(&r, 422, "idempotency-key-reused", "'k-1'");
    res_free(&r);
    call_with(f, "POST", "/v1/topics/other/messages", "{'body':1}", &o, &r);
    expect_problem(&r, 422, "idempotency-key-reused", NULL);
    res_free(&r);
    o.idem_key = "bad key";
    call_with(f, "POST", "/v1/topics/orders/messages", "{'body':1}", &o, &r);
    expect_problem(&r, 400, "bad-request", "header 'Idempotency-Key'");
    res_free(&r);
}

static void idempotency_key_in_flight_is_409(void **state)
{
    fx *f = *state;
    /* Reserve the key the way a concurrent request would. */
    const char *body = "{\"body\":1}";
    api_idem_ticket tk;
    brk_status err;
    api_idem_intent in = { NULL, 0 };
    uint64_t hash = api_idem_hash("POST", "/v1/topics/orders/messages", body,
                                  strlen(body));
    assert_int_equal(api_idem_begin(f->h->idem, "v1", "busy-1", hash, &in, &tk,
                                    &err), API_IDEM_NEW);
    res r;
    req_opts o = { .idem_key = "busy-1" };
    call_with(f, "POST", "/v1/topics/orders/messages", "{'body':1}", &o, &r);
    expect_problem(&r, 409, "conflict", "still being handled");
    res_free(&r);
    api_idem_abort(f->h->idem, &tk);
    call_with(f, "POST", "/v1/topics/orders/messages", "{'body':1}", &o, &r);
    expect_json(&r, 201);
    res_free(&r);
}

static void failed_send_with_a_key_can_be_retried(void **state)
{
    fx *f = *state;
    res r;
    req_opts o = { .idem_key = "retry-1" };
    call_with(f, "POST", "/v1/topics/ghost/messages", "{'body':1}", &o, &r);
    expect_problem(&r, 404, "not-found", NULL);
    res_free(&r);
    call(f, "PUT", "/v1/topics/ghost", "{'queues':1}", &r);
    expect_json(&r, 201);
    res_free(&r);
    call_with(f, "POST", "/v1/topics/ghost/messages", "{'body':1}", &o, &r);
    expect_json(&r, 201);
    res_free(&r);
}

/* A key whose INTENT was recorded but never finished (the process died
 * between the two) comes back as a REDO: the retry must carry the ids the
 * intent recorded, so it matches what the lost attempt may have stored. */
static void lost_intent(fx *f, const char *key, const char *path,
                        const char *body, int64_t deliver_at,
                        api_idem_ticket *tk)
{
    char *b = jq(body);
    brk_status err;
    api_idem_intent in = { NULL, deliver_at };
    uint64_t hash = api_idem_hash("POST", path, b, strlen(b));
    assert_int_equal(api_idem_begin(f->h->idem, "v1", key, hash, &in, tk,
                                    &err), API_IDEM_NEW);
    api_idem_abort(f->h->idem, tk);
    free(b);
}

static void retried_send_after_a_lost_intent_uses_the_recorded_msg_id(void **state)
{
    fx *f = *state;
    api_idem_ticket tk;
    lost_intent(f, "redo-1", "/v1/topics/redo/messages", "{'body':5}", 0, &tk);
    char want[BRK_UUID_STR_LEN + 1];
    brk_uuid_format(tk.msg_id, want);
    res r;
    req_opts o = { .idem_key = "redo-1" };
    call_with(f, "POST", "/v1/topics/redo/messages", "{'body':5}", &o, &r);
    expect_json(&r, 201);
    assert_string_equal(str(&r, "msg_id"), want);
    res_free(&r);
    json_t *m = recv_msgs(f, "g", "{'topic':'redo'}");
    assert_int_equal(json_array_size(m), 1);
    assert_string_equal(msg_str(m, 0, "msg_id"), want);
    json_decref(m);
}

static void retried_delayed_send_after_a_lost_intent_keeps_the_recorded_time(void **state)
{
    fx *f = *state;
    api_idem_ticket tk;
    lost_intent(f, "redo-2", "/v1/topics/redo/messages",
                "{'body':5,'delay_ms':5000}", T0 + 5000, &tk);
    char want[BRK_UUID_STR_LEN + 1];
    brk_uuid_format(tk.msg_id, want);
    brk_fake_clock_advance(&f->clk, 2000);      /* the retry comes later */
    res r;
    req_opts o = { .idem_key = "redo-2" };
    call_with(f, "POST", "/v1/topics/redo/messages", "{'body':5,'delay_ms':5000}",
              &o, &r);
    expect_json(&r, 201);
    assert_string_equal(str(&r, "msg_id"), want);
    assert_string_equal(str(&r, "deliver_at"), "2026-11-25T13:14:07.123Z");
    res_free(&r);
}

static void retried_prepare_after_a_lost_intent_uses_the_recorded_txid(void **state)
{
    fx *f = *state;
    api_idem_ticket tk;
    lost_intent(f, "redo-3", "/v1/transactions", "{'topic':'redo','body':5}", 0,
                &tk);
    res r;
    req_opts o = { .idem_key = "redo-3" };
    call_with(f, "POST", "/v1/transactions", "{'topic':'redo','body':5}", &o, &r);
    expect_json(&r, 201);
    assert_string_equal(str(&r, "txid"), tk.txid);
    res_free(&r);
}

/* ---- topics ------------------------------------------------------------------------------ */

static void topic_put_is_201_then_200_and_get_lists_ranges(void **state)
{
    fx *f = *state;
    res r;
    call(f, "PUT", "/v1/topics/t1", "{'queues':2}", &r);
    expect_json(&r, 201);
    assert_string_equal(str(&r, "name"), "t1");
    assert_int_equal(num(r.json, "queues"), 2);
    res_free(&r);
    call(f, "PUT", "/v1/topics/t1", "{'queues':3}", &r);
    expect_json(&r, 200);
    assert_int_equal(num(r.json, "writable"), 3);
    res_free(&r);
    send_ok(f, "t1", "{'key':'a','body':1}");
    call(f, "GET", "/v1/topics/t1", NULL, &r);
    expect_json(&r, 200);
    assert_int_equal(num(r.json, "messages"), 1);
    assert_string_equal(str(&r, "created_at"), "2026-11-25T13:14:02.123Z");
    json_t *qo = json_object_get(r.json, "queue_offsets");
    assert_int_equal(json_array_size(qo), 3);
    assert_int_equal(num(json_array_get(qo, 0), "min_offset"), 0);
    res_free(&r);
    call(f, "PUT", "/v1/topics/a0", "{'queues':1}", &r);
    expect_json(&r, 201);
    res_free(&r);
    call(f, "GET", "/v1/topics", NULL, &r);
    expect_json(&r, 200);
    json_t *v = json_object_get(r.json, "topics");
    assert_true(json_array_size(v) >= 2);
    const char *prev = "";
    for (size_t i = 0; i < json_array_size(v); i++) {
        json_t *t = json_array_get(v, i);
        const char *name = json_string_value(json_object_get(t, "name"));
        assert_true(strncmp(name, "__", 2) != 0);
        assert_true(strcmp(prev, name) < 0);
        assert_null(json_object_get(t, "queue_offsets"));
        prev = name;
    }
    res_free(&r);
}

static void topic_errors_are_400_and_404(void **state)
{
    fx *f = *state;
    res r;
    call(f, "PUT", "/v1/topics/t2", "{'queues':0}", &r);
    expect_problem(&r, 400, "bad-request", "field 'queues' must be in 1..1024");
    res_free(&r);
    call(f, "PUT", "/v1/topics/t2", "{}", &r);
    expect_problem(&r, 400, "bad-request", "field 'queues' is required");
    res_free(&r);
    call(f, "PUT", "/v1/topics/t2", "{'queues':1,'retention':5}", &r);
    expect_problem(&r, 400, "bad-request", "unknown field 'retention'");
    res_free(&r);
    call(f, "PUT", "/v1/topics/__idem", "{'queues':1}", &r);
    expect_problem(&r, 400, "bad-request", "internal");
    res_free(&r);
    call(f, "GET", "/v1/topics/missing", NULL, &r);
    expect_problem(&r, 404, "not-found", "topic 'missing'");
    res_free(&r);
    call(f, "GET", "/v1/topics/__txn_op", NULL, &r);
    expect_problem(&r, 400, "bad-request", "internal");
    res_free(&r);
}

/* ---- long polling ---------------------------------------------------------------------------- */

typedef struct wake_rec {
    atomic_int calls;
} wake_rec;

static void record_wake(void *ctx)
{
    wake_rec *w = ctx;
    atomic_fetch_add(&w->calls, 1);
}

/* A waiter whose wake-ups are counted in *rec. */
static void wait_init(api_wait *w, wake_rec *rec)
{
    memset(w, 0, sizeof *w);
    w->wake = record_wake;
    w->wake_ctx = rec;
}

static void poll_round(fx *f, api_wait *w, const char *body, res *r)
{
    req_opts o = { .w = w };
    call_with(f, "POST", "/v1/groups/lp/receive", body, &o, r);
}

static void long_poll_parks_then_a_send_wakes_it_and_it_delivers(void **state)
{
    fx *f = *state;
    wake_rec rec = { 0 };
    api_wait w;
    wait_init(&w, &rec);
    res r;
    poll_round(f, &w, "{'topic':'lpt','wait_ms':5000}", &r);
    assert_int_equal(r.out, API_WAIT);
    assert_true(w.registered);
    assert_int_equal(w.deadline_ms, T0 + 5000);
    assert_int_equal(atomic_load(&rec.calls), 0);
    res_free(&r);
    send_ok(f, "lpt", "{'body':'hello'}");
    assert_int_equal(atomic_load(&rec.calls), 1);
    poll_round(f, &w, "{'topic':'lpt','wait_ms':5000}", &r);
    expect_json(&r, 200);
    assert_false(w.registered);
    json_t *m = json_object_get(r.json, "messages");
    assert_int_equal(json_array_size(m), 1);
    assert_string_equal(msg_str(m, 0, "topic"), "lpt");
    res_free(&r);
    assert_int_equal(atomic_load(&rec.calls), 1);
}

static void long_poll_after_the_deadline_answers_an_empty_list(void **state)
{
    fx *f = *state;
    wake_rec rec = { 0 };
    api_wait w;
    wait_init(&w, &rec);
    res r;
    poll_round(f, &w, "{'topic':'lpt','wait_ms':1000}", &r);
    assert_int_equal(r.out, API_WAIT);
    res_free(&r);
    brk_fake_clock_advance(&f->clk, 500);      /* not yet: parks again */
    poll_round(f, &w, "{'topic':'lpt','wait_ms':1000}", &r);
    assert_int_equal(r.out, API_WAIT);
    assert_int_equal(w.deadline_ms, T0 + 1000);
    res_free(&r);
    brk_fake_clock_advance(&f->clk, 600);
    poll_round(f, &w, "{'topic':'lpt','wait_ms':1000}", &r);
    expect_json(&r, 200);
    assert_int_equal(json_array_size(json_object_get(r.json, "messages")), 0);
    assert_false(w.registered);
    res_free(&r);
    /* The early rounds' waiters are gone: a send wakes nobody. */
    send_ok(f, "lpt", "{'body':1}");
    assert_int_equal(atomic_load(&rec.calls), 0);
}

static void long_poll_returns_at_once_after_drain(void **state)
{
    fx *f = *state;
    wake_rec rec = { 0 };
    api_wait w;
    wait_init(&w, &rec);
    res r;
    poll_round(f, &w, "{'topic':'lpt','wait_ms':5000}", &r);
    assert_int_equal(r.out, API_WAIT);
    res_free(&r);
    api_handler_drain(f->h);
    poll_round(f, &w, "{'topic':'lpt','wait_ms':5000}", &r);
    expect_json(&r, 200);
    assert_int_equal(json_array_size(json_object_get(r.json, "messages")), 0);
    res_free(&r);
    api_wait w2;
    wait_init(&w2, &rec);
    poll_round(f, &w2, "{'topic':'lpt','wait_ms':5000}", &r);   /* never parks */
    expect_json(&r, 200);
    assert_false(w2.registered);
    res_free(&r);
}

static void cancelled_long_poll_is_never_woken(void **state)
{
    fx *f = *state;
    wake_rec rec = { 0 };
    api_wait w;
    wait_init(&w, &rec);
    res r;
    poll_round(f, &w, "{'topic':'lpt','wait_ms':5000}", &r);
    assert_int_equal(r.out, API_WAIT);
    res_free(&r);
    api_wait_cancel(f->h, &w);
    assert_false(w.registered);
    api_wait_cancel(f->h, &w);                  /* idempotent */
    send_ok(f, "lpt", "{'body':1}");
    assert_int_equal(atomic_load(&rec.calls), 0);
}

static void receive_without_a_wait_state_never_parks(void **state)
{
    fx *f = *state;
    json_t *m = recv_msgs(f, "lp", "{'topic':'lpt','wait_ms':5000}");
    assert_int_equal(json_array_size(m), 0);
    json_decref(m);
}

/* ---- drain, probes and metrics --------------------------------------------------------------- */

static void writes_while_draining_are_503_and_reads_still_work(void **state)
{
    fx *f = *state;
    prepare_ok(f, "dr-1");
    send_ok(f, "dr", "{'body':1}");
    assert_false(api_handler_draining(f->h));
    api_handler_drain(f->h);
    api_handler_drain(f->h);
    assert_true(api_handler_draining(f->h));
    static const char *const writes[][3] = {
        { "POST", "/v1/transactions", "{'topic':'dr','body':1}" },
        { "POST", "/v1/topics/dr/messages", "{'body':1}" },
        { "PUT", "/v1/topics/dr", "{'queues':2}" },
        { "PUT", "/v1/groups/gd", "{'topic':'dr'}" },
        { "POST", "/v1/groups/gd/dead-letters/replay", NULL },
    };
    for (size_t i = 0; i < sizeof writes / sizeof writes[0]; i++) {
        res r;
        call(f, writes[i][0], writes[i][1], writes[i][2], &r);
        expect_problem(&r, 503, "shutting-down", "shutting down");
        assert_int_equal(r.retry, 5);
        res_free(&r);
    }
    res r;
    call(f, "POST", "/v1/transactions/dr-1/commit", NULL, &r);
    expect_json(&r, 200);
    res_free(&r);
    json_t *m = recv_msgs(f, "gd", "{'topic':'dr','max':5}");
    assert_int_equal(json_array_size(m), 1);
    char body[256];
    snprintf(body, sizeof body, "{'receipts':['%s']}", msg_str(m, 0, "receipt"));
    json_decref(m);
    call(f, "POST", "/v1/groups/gd/ack", body, &r);
    expect_json(&r, 200);
    assert_int_equal(num(r.json, "acked"), 1);
    res_free(&r);
    call(f, "GET", "/v1/topics/dr", NULL, &r);
    expect_json(&r, 200);
    res_free(&r);
}

static void readyz_is_ready_then_503_after_drain_and_healthz_stays_ok(void **state)
{
    fx *f = *state;
    res r;
    call(f, "GET", "/readyz", NULL, &r);
    expect_json(&r, 200);
    assert_string_equal(str(&r, "status"), "ready");
    res_free(&r);
    api_handler_drain(f->h);
    call(f, "GET", "/readyz", NULL, &r);
    expect_json(&r, 503);
    assert_string_equal(str(&r, "status"), "shutting_down");
    assert_int_equal(r.retry, 5);
    res_free(&r);
    call(f, "GET", "/healthz", NULL, &r);
    expect_json(&r, 200);
    assert_string_equal(str(&r, "status"), "ok");
    res_free(&r);
}

static void metrics_page_names_every_family_and_counts(void **state)
{
    fx *f = *state;
    send_ok(f, "mt", "{'key':'a','body':1}");
    send_ok(f, "mt", "{'body':1,'delay_ms':1000}");
    prepare_ok(f, "m-1");
    json_t *m = recv_msgs(f, "mg", "{'topic':'mt'}");
    json_decref(m);
    api_handler_observe(f->h, "GET", "/v1/topics", 200, 0.002);
    api_handler_observe(f->h, "GET", "/v1/topics", 200, 0.2);
    api_handler_observe(f->h, "BREW", "/coffee", 404, 0.001);
    res r;
    call(f, "GET", "/metrics", NULL, &r);
    expect_status(&r, 200);
    assert_string_equal(r.ct, "text/plain; version=0.0.4; charset=utf-8");
    static const char *const lines[] = {
        "outboxd_http_requests_total{route=\"/v1/topics\",method=\"GET\",code=\"200\"} 2",
        "outboxd_http_requests_total{route=\"unmatched\",method=\"OTHER\",code=\"404\"} 1",
        "outboxd_http_request_duration_seconds_bucket{route=\"/v1/topics\",le=\"0.005\"} 1",
        "outboxd_http_request_duration_seconds_bucket{route=\"/v1/topics\",le=\"+Inf\"} 2",
        "outboxd_http_request_duration_seconds_count{route=\"/v1/topics\"} 2",
        "# TYPE outboxd_http_request_duration_seconds histogram",
        "outboxd_messages_published_total{kind=\"send\"} 1",
        "outboxd_messages_published_total{kind=\"delayed\"} 1",
        "outboxd_messages_published_total{kind=\"commit\"} 0",
        "# TYPE outboxd_store_fsync_seconds histogram",
        "outboxd_transactions_total{outcome=\"prepared\"} 1",
        "outboxd_transactions_pending 1",
        "outboxd_delayed_pending 1",
        "outboxd_group_lag{group=\"mg\",topic=\"mt\"} 1",
        "outboxd_group_inflight{group=\"mg\",topic=\"mt\"} 1",
        "outboxd_group_dead_letters{group=\"mg\"} 0",
        "outboxd_idempotency_keys 0",
        "outboxd_ready 1",
        "# TYPE outboxd_store_appends_total counter",
    };
    for (size_t i = 0; i < sizeof lines / sizeof lines[0]; i++)
        if (!has_line(r.body, lines[i]))
            fail_msg("metrics lack '%s':\n%s", lines[i], r.body);
    static const char *const names[] = {
        "outboxd_store_bytes", "outboxd_store_segments", "outboxd_store_failed",
        "outboxd_checkbacks_total", "outboxd_transactions_stuck",
        "outboxd_transactions_oldest_pending_age_seconds",
        "outboxd_delayed_fired_total", "outboxd_group_oldest_unacked_age_seconds",
        "outboxd_idempotency_replays_total", "outboxd_build_info",
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char help[128];
        snprintf(help, sizeof help, "# HELP %s ", names[i]);
        if (!strstr(r.body, help))
            fail_msg("metrics lack %s", help);
    }
    /* Cumulative fsync buckets end in +Inf equal to the count. */
    assert_non_null(strstr(r.body, "outboxd_store_fsync_seconds_bucket{le=\"+Inf\"}"));
    res_free(&r);
    api_handler_drain(f->h);
    call(f, "GET", "/metrics", NULL, &r);
    assert_true(has_line(r.body, "outboxd_ready 0"));
    res_free(&r);
}

/* ---- concurrency (TSan) ---------------------------------------------------------------------- */

typedef struct worker {
    fx *f;
    int id;
    int sent, got;
    atomic_int *acked;              /* shared by the consumers */
} worker;

static void *producer(void *arg)
{
    worker *w = arg;
    for (int i = 0; i < 50; i++) {
        char body[128], key[32];
        snprintf(body, sizeof body, "{'key':'k%d','body':{'i':%d}}", i % 7, i);
        snprintf(key, sizeof key, "p%d-%d", w->id, i);
        req_opts o = { .idem_key = i % 5 == 0 ? key : NULL };
        res r;
        call_with(w->f, "POST", "/v1/topics/conc/messages", body, &o, &r);
        if (r.status == 201)
            w->sent++;
        res_free(&r);
        api_handler_observe(w->f->h, "POST", "/v1/topics/{topic}/messages", 201,
                            0.001);
    }
    return NULL;
}

static void *consumer(void *arg)
{
    worker *w = arg;
    for (int round = 0; round < 400 && atomic_load(w->acked) < 100; round++) {
        res r;
        call(w->f, "POST", "/v1/groups/cg/receive", "{'topic':'conc','max':16,"
             "'filter':'*'}", &r);
        json_t *m = json_object_get(r.json, "messages");
        for (size_t i = 0; i < json_array_size(m); i++) {
            char body[256];
            snprintf(body, sizeof body, "{'receipts':['%s']}",
                     json_string_value(json_object_get(json_array_get(m, i),
                                                       "receipt")));
            res a;
            call(w->f, "POST", "/v1/groups/cg/ack", body, &a);
            if (a.status == 200 && num(a.json, "acked") == 1) {
                w->got++;
                atomic_fetch_add(w->acked, 1);
            }
            res_free(&a);
        }
        res_free(&r);
        call(w->f, "GET", "/metrics", NULL, &r);
        res_free(&r);
    }
    return NULL;
}

static void concurrent_sends_receives_and_scrapes_are_consistent(void **state)
{
    fx *f = *state;
    res r;
    call(f, "PUT", "/v1/topics/conc", "{'queues':4}", &r);
    expect_json(&r, 201);
    res_free(&r);
    atomic_int acked = 0;
    worker w[4] = { { f, 0, 0, 0, &acked }, { f, 1, 0, 0, &acked },
                    { f, 2, 0, 0, &acked }, { f, 3, 0, 0, &acked } };
    pthread_t th[4];
    pthread_create(&th[0], NULL, producer, &w[0]);
    pthread_create(&th[1], NULL, producer, &w[1]);
    pthread_create(&th[2], NULL, consumer, &w[2]);
    pthread_create(&th[3], NULL, consumer, &w[3]);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    assert_int_equal(w[0].sent + w[1].sent, 100);
    int got = w[2].got + w[3].got;
    json_t *m = recv_msgs(f, "cg", "{'topic':'conc','max':256}");
    got += (int)json_array_size(m);
    json_decref(m);
    assert_int_equal(got, 100);
}

/* ---- main ------------------------------------------------------------------------------------ */

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
#define T_NOAUTO(fn) cmocka_unit_test_setup_teardown(fn, setup_no_auto, teardown)
#define T_TINY(fn) cmocka_unit_test_setup_teardown(fn, setup_tiny, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(unknown_path_is_404_unmatched),
        T(wrong_method_is_405_with_allow_for_every_path),
        T(head_is_served_by_the_get_route),
        T(body_over_the_limit_is_413),
        T(non_json_content_type_is_415_and_json_types_are_accepted),
        T(bad_json_and_non_objects_are_400),
        T(prepare_is_201_prepared_and_visible_by_get),
        T(prepare_without_txid_generates_one),
        T(prepare_field_errors_are_400_naming_the_field),
        T(on_exhausted_with_a_nul_byte_is_400),
        T(prepare_same_txid_replays_and_other_content_is_409),
        T_NOAUTO(prepare_into_unknown_topic_without_auto_create_is_404),
        T(commit_is_200_and_the_message_is_received),
        T(commit_after_rollback_is_409_saying_rolled_back),
        T(rollback_after_commit_is_409_saying_committed),
        T(verdicts_on_unknown_txids_are_404),
        T(verdict_bodies_other_than_empty_object_are_refused),
        T(delayed_commit_answers_deliver_at),
        T(transactions_are_listed_oldest_first_and_filtered),
        T(send_is_201_with_queue_and_offset_and_round_trips),
        T(delayed_send_answers_deliver_at_and_arrives_when_due),
        T(past_deliver_at_and_zero_delay_are_plain_sends),
        T(send_field_errors_are_400_naming_the_field),
        T_NOAUTO(send_to_unknown_topic_without_auto_create_is_404),
        T_TINY(send_into_a_full_store_is_507),
        T_TINY(message_bigger_than_the_store_takes_is_413),
        T(idempotency_key_replays_the_first_answer),
        T(idempotency_key_with_another_body_or_path_is_422),
        T(idempotency_key_in_flight_is_409),
        T_NOAUTO(failed_send_with_a_key_can_be_retried),
        T(retried_send_after_a_lost_intent_uses_the_recorded_msg_id),
        T(retried_delayed_send_after_a_lost_intent_keeps_the_recorded_time),
        T(retried_prepare_after_a_lost_intent_uses_the_recorded_txid),
        T(topic_put_is_201_then_200_and_get_lists_ranges),
        T(topic_errors_are_400_and_404),
        T(long_poll_parks_then_a_send_wakes_it_and_it_delivers),
        T(long_poll_after_the_deadline_answers_an_empty_list),
        T(long_poll_returns_at_once_after_drain),
        T(cancelled_long_poll_is_never_woken),
        T(receive_without_a_wait_state_never_parks),
        T(writes_while_draining_are_503_and_reads_still_work),
        T(readyz_is_ready_then_503_after_drain_and_healthz_stays_ok),
        T(metrics_page_names_every_family_and_counts),
        T(concurrent_sends_receives_and_scrapes_are_consistent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
