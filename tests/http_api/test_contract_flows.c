/*
 * test_contract_flows.c - the HTTP API's round trips as a client sees them
 * (docs/http-api.md), over real sockets: bodies (any JSON value, base64
 * bytes with NULs), headers with traceparent, keys and tags; delays
 * (delay_ms, delay_level, deliver_at with an offset); prepare -> commit ->
 * receive -> ack and prepare -> rollback; nack and redelivery; FIFO order;
 * dead letters and their replay; Idempotency-Key replays; topics, groups,
 * the probes and /metrics.  The failure statuses are in test_contract.c.
 *
 * Each test gets a server over a fresh store (live_server.h).  The tests
 * that wait use the smallest delay the API allows (1 s: delay_ms 1000,
 * delay_level 1, and a nack's delay_ms 1, which the broker rounds up to the
 * first delay level, see broker/group.h) and long polls, so the file runs
 * in a few seconds.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "live_server.h"

static live_env env;

/* ---- fixture --------------------------------------------------------------- */

static int env_setup(void **state)
{
    (void)state;
    live_open(&env, NULL);
    return 0;
}

static int env_teardown(void **state)
{
    (void)state;
    live_close(&env);
    return 0;
}

/* ---- helpers --------------------------------------------------------------- */

/* ms since the epoch as RFC 3339 with a +01:00 offset. */
static void format_plus_one_hour(int64_t ms, char *out, size_t cap)
{
    time_t t = (time_t)(ms / 1000) + 3600;
    struct tm tm;
    gmtime_r(&t, &tm);
    snprintf(out, cap, "%04d-%02d-%02dT%02d:%02d:%02d.%03d+01:00", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ms % 1000));
}

/* ---- round trips ------------------------------------------------------------- */

static void json_bodies_come_back_identical(void **state)
{
    (void)state;
    static const char *const bodies[] = {
        "{\"order\":{\"id\":42,\"lines\":[{\"sku\":\"a\",\"qty\":2,\"note\":null}]},"
        "\"ok\":true,\"name\":\"Zo\\u00eb \\u2713 \\ud834\\udd1e \xe6\x97\xa5\\n\\\"q\\\"\"}",
        "[1,\"two\",3.5,false,null,{\"deep\":[[[]]]}]",
        "\"just a string with \\u0000 NUL\"",
        "12345678901234567",
        "-7.25",
        "null",
        "true",
        "{}",
        "[]",
    };
    size_t nb = sizeof bodies / sizeof bodies[0];
    live_put_topic(&env, "rt", 1);
    for (size_t i = 0; i < nb; i++) {
        char req[512];
        snprintf(req, sizeof req, "{\"body\":%s}", bodies[i]);
        live_send(&env, "rt", req, NULL);
    }
    json_t *m = live_receive(&env, "g", "rt", 16, 0);
    assert_int_equal(json_array_size(m), nb);
    for (size_t i = 0; i < nb; i++) {
        json_t *want = json_loads(bodies[i], JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
        assert_non_null(want);
        json_t *msg = json_array_get(m, i);
        json_t *got = json_object_get(msg, "body");
        if (!got || !json_equal(want, got)) {
            char *s = json_dumps(msg, JSON_ENCODE_ANY);
            fail_msg("body %zu: sent %s, received %s", i, bodies[i], s ? s : "?");
        }
        assert_null(json_object_get(msg, "body_base64"));
        json_decref(want);
    }
    json_decref(m);
}

static void base64_body_with_nul_bytes_comes_back_identical(void **state)
{
    (void)state;
    /* bytes 00 01 02 00 ff 00 61 */
    char id[37];
    live_send(&env, "orders", "{\"body_base64\":\"AAECAP8AYQ==\"}", id);
    json_t *m = live_receive(&env, "g", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 1);
    assert_string_equal(live_msg_str(m, 0, "msg_id"), id);
    assert_string_equal(live_msg_str(m, 0, "body_base64"), "AAECAP8AYQ==");
    assert_null(json_object_get(json_array_get(m, 0), "body"));
    json_decref(m);
}

static void headers_with_traceparent_come_back(void **state)
{
    (void)state;
    const char *hdrs = "{\"traceparent\":\"00-4bf92f3577b34da6a3ce929d0e0e4736-"
                       "00f067aa0ba902b7-01\",\"x-request-id\":\"r-1\",\"empty\":\"\"}";
    char req[512];
    snprintf(req, sizeof req, "{\"headers\":%s,\"body\":1}", hdrs);
    live_send(&env, "orders", req, NULL);
    json_t *m = live_receive(&env, "g", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 1);
    json_t *want = json_loads(hdrs, 0, NULL);
    assert_true(json_equal(want, json_object_get(json_array_get(m, 0), "headers")));
    json_decref(want);
    json_decref(m);
}

static void key_and_tag_come_back(void **state)
{
    (void)state;
    live_send(&env, "orders", "{\"key\":\"order-42\",\"tag\":\"paid\",\"body\":1}", NULL);
    json_t *m = live_receive(&env, "g", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 1);
    assert_string_equal(live_msg_str(m, 0, "key"), "order-42");
    assert_string_equal(live_msg_str(m, 0, "tag"), "paid");
    assert_string_equal(live_msg_str(m, 0, "topic"), "orders");
    assert_int_equal(live_int(json_array_get(m, 0), "delivery_count"), 1);
    assert_true(live_parse_time(live_msg_str(m, 0, "born_at")) > 0);
    json_decref(m);
}

/* Send a delayed message (req is the request object), check it is not
 * receivable at once, then long-poll for it: it must come between
 * min_ms and max_ms after the send. */
static void expect_delayed_delivery(const char *req, int64_t min_ms, int64_t max_ms)
{
    int64_t t0 = live_now_ms();
    live_resp r;
    live_call(&env, "POST", "/v1/topics/orders/messages", req, &r);
    live_expect_status(&r, 201);
    char id[37];
    snprintf(id, sizeof id, "%s", live_str(&r, "msg_id"));
    int64_t due = live_parse_time(live_str(&r, "deliver_at"));
    assert_null(json_object_get(r.json, "queue"));
    live_resp_free(&r);
    if (due < t0 + min_ms - 50 || due > t0 + max_ms)
        fail_msg("deliver_at is %lld ms after the send", (long long)(due - t0));
    json_t *m = live_receive(&env, "g", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 0);
    json_decref(m);
    m = live_receive(&env, "g", "orders", 16, 5000);
    int64_t took = live_now_ms() - t0;
    assert_int_equal(json_array_size(m), 1);
    assert_string_equal(live_msg_str(m, 0, "msg_id"), id);
    json_decref(m);
    if (took < min_ms - 50 || took > max_ms + 1500)
        fail_msg("delivered %lld ms after the send (want %lld..%lld)", (long long)took,
                 (long long)min_ms, (long long)max_ms);
}

static void delayed_message_is_receivable_only_after_its_delay(void **state)
{
    (void)state;
    expect_delayed_delivery("{\"body\":\"later\",\"delay_ms\":1000}", 1000, 1300);
}

static void delay_level_1_delivers_after_a_second(void **state)
{
    (void)state;
    expect_delayed_delivery("{\"body\":\"later\",\"delay_level\":1}", 1000, 1300);
}

static void deliver_at_with_an_offset_is_honoured_and_answered_in_utc(void **state)
{
    (void)state;
    int64_t at = live_now_ms() + 1000;
    char when[64], req[128];
    format_plus_one_hour(at, when, sizeof when);
    snprintf(req, sizeof req, "{\"body\":\"at\",\"deliver_at\":\"%s\"}", when);
    live_resp r;
    live_call(&env, "POST", "/v1/topics/orders/messages", req, &r);
    live_expect_status(&r, 201);
    assert_int_equal(live_parse_time(live_str(&r, "deliver_at")), at);
    live_resp_free(&r);
    json_t *m = live_receive(&env, "g", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 0);
    json_decref(m);
    m = live_receive(&env, "g", "orders", 16, 5000);
    assert_int_equal(json_array_size(m), 1);
    assert_true(live_now_ms() >= at);
    json_decref(m);
}

static void prepare_commit_receive_ack_delivers_the_message_once(void **state)
{
    (void)state;
    live_resp r;
    live_call(&env, "POST", "/v1/transactions",
              "{\"topic\":\"orders\",\"txid\":\"order-1\",\"key\":\"o-1\","
              "\"body\":{\"o\":1}}",
              &r);
    live_expect_status(&r, 201);
    assert_string_equal(live_str(&r, "txid"), "order-1");
    assert_string_equal(live_str(&r, "state"), "prepared");
    char id[37];
    snprintf(id, sizeof id, "%s", live_str(&r, "msg_id"));
    assert_int_equal(strlen(id), 36);
    live_resp_free(&r);

    json_t *m = live_receive(&env, "g", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 0);   /* half messages are invisible */
    json_decref(m);
    live_call(&env, "GET", "/v1/transactions/order-1", NULL, &r);
    live_expect_status(&r, 200);
    assert_string_equal(live_str(&r, "state"), "prepared");
    assert_string_equal(live_str(&r, "msg_id"), id);
    assert_string_equal(live_str(&r, "topic"), "orders");
    assert_string_equal(live_str(&r, "key"), "o-1");
    live_resp_free(&r);

    for (int i = 0; i < 2; i++) {           /* a repeated commit is 200 again */
        live_call(&env, "POST", "/v1/transactions/order-1/commit", i ? "{}" : NULL, &r);
        live_expect_status(&r, 200);
        assert_string_equal(live_str(&r, "state"), "committed");
        assert_string_equal(live_str(&r, "msg_id"), id);
        assert_null(json_object_get(r.json, "deliver_at"));
        live_resp_free(&r);
    }
    m = live_receive(&env, "g", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 1);
    assert_string_equal(live_msg_str(m, 0, "msg_id"), id);
    json_t *want = json_pack("{s:i}", "o", 1);
    assert_true(json_equal(want, json_object_get(json_array_get(m, 0), "body")));
    json_decref(want);
    json_t *a = live_settle(&env, "g", "ack", live_msg_str(m, 0, "receipt"), NULL);
    assert_int_equal(live_int(a, "acked"), 1);
    assert_int_equal(json_array_size(json_object_get(a, "failed")), 0);
    json_decref(a);
    json_decref(m);
    m = live_receive(&env, "g", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 0);
    json_decref(m);
    live_call(&env, "GET", "/v1/transactions/order-1", NULL, &r);
    live_expect_status(&r, 200);
    assert_string_equal(live_str(&r, "state"), "committed");
    live_resp_free(&r);
}

static void prepare_rollback_leaves_nothing_to_receive(void **state)
{
    (void)state;
    live_ok(&env, "POST", "/v1/transactions",
            "{\"topic\":\"orders\",\"txid\":\"order-2\",\"body\":1}", 201);
    live_resp r;
    for (int i = 0; i < 2; i++) {
        live_call(&env, "POST", "/v1/transactions/order-2/rollback", NULL, &r);
        live_expect_status(&r, 200);
        assert_string_equal(live_str(&r, "txid"), "order-2");
        assert_string_equal(live_str(&r, "state"), "rolled_back");
        live_resp_free(&r);
    }
    json_t *m = live_receive(&env, "g", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 0);
    json_decref(m);
    live_call(&env, "GET", "/v1/transactions/order-2", NULL, &r);
    live_expect_status(&r, 200);
    assert_string_equal(live_str(&r, "state"), "rolled_back");
    live_resp_free(&r);
}

static void delayed_commit_answers_deliver_at(void **state)
{
    (void)state;
    live_ok(&env, "POST", "/v1/transactions",
            "{\"topic\":\"orders\",\"txid\":\"late\",\"body\":1,\"delay_ms\":60000}", 201);
    int64_t t0 = live_now_ms();
    live_resp r;
    live_call(&env, "POST", "/v1/transactions/late/commit", NULL, &r);
    live_expect_status(&r, 200);
    assert_string_equal(live_str(&r, "state"), "committed");
    int64_t due = live_parse_time(live_str(&r, "deliver_at"));
    live_resp_free(&r);
    if (due < t0 + 59000 || due > t0 + 61000)
        fail_msg("deliver_at is %lld ms after the commit", (long long)(due - t0));
    json_t *m = live_receive(&env, "g", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 0);
    json_decref(m);
}

static void transactions_are_listed_oldest_first_with_details(void **state)
{
    (void)state;
    live_ok(&env, "POST", "/v1/transactions",
            "{\"topic\":\"orders\",\"txid\":\"a-1\",\"body\":1}", 201);
    live_sleep_ms(5);
    live_ok(&env, "POST", "/v1/transactions",
            "{\"topic\":\"orders\",\"txid\":\"a-2\",\"body\":1,\"check\":"
            "{\"first_check_ms\":600000,\"interval_ms\":1000,\"max_checks\":3,"
            "\"on_exhausted\":\"hold\"}}", 201);
    live_resp r;
    live_call(&env, "GET", "/v1/transactions?limit=10", NULL, &r);
    live_expect_status(&r, 200);
    json_t *list = json_object_get(r.json, "transactions");
    assert_int_equal(json_array_size(list), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(list, 0), "txid")),
                        "a-1");
    json_t *t2 = json_array_get(list, 1);
    assert_string_equal(json_string_value(json_object_get(t2, "txid")), "a-2");
    json_t *chk = json_object_get(t2, "check");
    assert_int_equal(live_int(chk, "max_checks"), 3);
    assert_int_equal(live_int(chk, "interval_ms"), 1000);
    assert_string_equal(json_string_value(json_object_get(chk, "on_exhausted")), "hold");
    assert_true(live_parse_time(json_string_value(json_object_get(t2, "next_check_at")))
                > live_now_ms() + 500000);
    assert_true(json_is_false(json_object_get(t2, "stuck")));
    live_resp_free(&r);
    live_call(&env, "GET", "/v1/transactions?limit=1", NULL, &r);
    live_expect_status(&r, 200);
    assert_int_equal(json_array_size(json_object_get(r.json, "transactions")), 1);
    live_resp_free(&r);
    live_call(&env, "GET", "/v1/transactions?state=stuck", NULL, &r);
    live_expect_status(&r, 200);
    assert_int_equal(json_array_size(json_object_get(r.json, "transactions")), 0);
    live_resp_free(&r);
}

static void nack_redelivers_with_delivery_count_2(void **state)
{
    (void)state;
    char id[37];
    live_send(&env, "orders", "{\"body\":\"retry me\"}", id);
    json_t *m = live_receive(&env, "g", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 1);
    int64_t t0 = live_now_ms();
    /* delay_ms 1 is rounded up to the first delay level (1 s). */
    json_t *n = live_settle(&env, "g", "nack", live_msg_str(m, 0, "receipt"), ",\"delay_ms\":1");
    assert_int_equal(live_int(n, "nacked"), 1);
    json_decref(n);
    json_decref(m);
    m = live_receive(&env, "g", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 0);
    json_decref(m);
    m = live_receive(&env, "g", "orders", 16, 5000);
    int64_t took = live_now_ms() - t0;
    assert_int_equal(json_array_size(m), 1);
    assert_string_equal(live_msg_str(m, 0, "msg_id"), id);
    assert_string_equal(live_msg_str(m, 0, "topic"), "orders");
    assert_int_equal(live_int(json_array_get(m, 0), "delivery_count"), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(m, 0), "body")),
                        "retry me");
    json_decref(m);
    if (took < 950 || took > 3000)
        fail_msg("redelivered %lld ms after the nack", (long long)took);
}

static void stale_and_malformed_receipts_are_reported_not_fatal(void **state)
{
    (void)state;
    live_send(&env, "orders", "{\"body\":1}", NULL);
    json_t *m = live_receive(&env, "g", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 1);
    char receipt[128];
    snprintf(receipt, sizeof receipt, "%s", live_msg_str(m, 0, "receipt"));
    json_decref(m);
    json_t *a = live_settle(&env, "g", "ack", receipt, NULL);
    assert_int_equal(live_int(a, "acked"), 1);
    json_decref(a);
    a = live_settle(&env, "g", "ack", receipt, NULL);
    assert_int_equal(live_int(a, "acked"), 0);
    json_t *f = json_array_get(json_object_get(a, "failed"), 0);
    assert_string_equal(json_string_value(json_object_get(f, "receipt")), receipt);
    assert_string_equal(json_string_value(json_object_get(f, "reason")), "stale");
    json_decref(a);
    a = live_settle(&env, "g", "nack", "garbage", NULL);
    assert_int_equal(live_int(a, "nacked"), 0);
    f = json_array_get(json_object_get(a, "failed"), 0);
    assert_string_equal(json_string_value(json_object_get(f, "reason")), "malformed");
    json_decref(a);
}

static void fifo_group_delivers_a_queue_in_order_one_at_a_time(void **state)
{
    (void)state;
    live_put_topic(&env, "fifo", 1);
    live_ok(&env, "PUT", "/v1/groups/ff", "{\"topic\":\"fifo\",\"fifo\":true}", 201);
    for (int i = 1; i <= 3; i++) {
        char req[64];
        snprintf(req, sizeof req, "{\"key\":\"k\",\"body\":%d}", i);
        live_send(&env, "fifo", req, NULL);
    }
    for (int i = 1; i <= 3; i++) {
        json_t *m = live_receive(&env, "ff", "fifo", 16, 0);
        assert_int_equal(json_array_size(m), 1);
        assert_int_equal(live_int(json_array_get(m, 0), "body"), i);
        json_t *again = live_receive(&env, "ff", "fifo", 16, 0); /* the next waits */
        assert_int_equal(json_array_size(again), 0);
        json_decref(again);
        json_t *a = live_settle(&env, "ff", "ack", live_msg_str(m, 0, "receipt"), NULL);
        assert_int_equal(live_int(a, "acked"), 1);
        json_decref(a);
        json_decref(m);
    }
}

static void dead_letter_after_max_deliveries_is_listed_with_reason_and_replayed(void **state)
{
    (void)state;
    live_ok(&env, "PUT", "/v1/groups/dl", "{\"topic\":\"orders\",\"max_deliveries\":1}", 201);
    char id[37];
    live_send(&env, "orders", "{\"key\":\"p\",\"tag\":\"t\",\"body\":\"poison\"}", id);
    json_t *m = live_receive(&env, "dl", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 1);
    json_t *n = live_settle(&env, "dl", "nack", live_msg_str(m, 0, "receipt"),
                            ",\"reason\":\"cannot parse\"");
    assert_int_equal(live_int(n, "nacked"), 1);
    json_decref(n);
    json_decref(m);

    live_resp r;
    live_call(&env, "GET", "/v1/groups/dl/dead-letters", NULL, &r);
    live_expect_status(&r, 200);
    json_t *list = json_object_get(r.json, "dead_letters");
    assert_int_equal(json_array_size(list), 1);
    json_t *d = json_array_get(list, 0);
    assert_string_equal(json_string_value(json_object_get(d, "msg_id")), id);
    assert_string_equal(json_string_value(json_object_get(d, "topic")), "orders");
    assert_string_equal(json_string_value(json_object_get(d, "reason")), "cannot parse");
    assert_string_equal(json_string_value(json_object_get(d, "key")), "p");
    assert_string_equal(json_string_value(json_object_get(d, "body")), "poison");
    assert_int_equal(live_int(d, "delivery_count"), 1);
    assert_true(live_int(r.json, "next") > live_int(d, "index"));
    live_resp_free(&r);
    live_call(&env, "GET", "/v1/groups/dl", NULL, &r);
    live_expect_status(&r, 200);
    json_t *sub = json_array_get(json_object_get(r.json, "subscriptions"), 0);
    assert_int_equal(live_int(sub, "dead_letters"), 1);
    live_resp_free(&r);

    live_call(&env, "POST", "/v1/groups/dl/dead-letters/replay", "{\"max\":10}", &r);
    live_expect_status(&r, 200);
    assert_int_equal(live_int(r.json, "replayed"), 1);
    live_resp_free(&r);
    m = live_receive(&env, "dl", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 1);
    assert_string_equal(live_msg_str(m, 0, "msg_id"), id);
    assert_string_equal(json_string_value(json_object_get(json_array_get(m, 0), "body")),
                        "poison");
    json_decref(m);
}

static void idempotency_key_replay_is_byte_identical_and_adds_no_message(void **state)
{
    (void)state;
    live_put_topic(&env, "idem", 1);
    const char *body = "{\"key\":\"o-7\",\"body\":{\"total\":12.5}}";
    live_resp a, b;
    live_send_keyed(&env, "/v1/topics/idem/messages", "order-7-created", body, &a);
    live_expect_status(&a, 201);
    live_send_keyed(&env, "/v1/topics/idem/messages", "order-7-created", body, &b);
    live_expect_status(&b, 201);
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.body, b.body, a.len);
    live_resp_free(&a);
    live_resp_free(&b);
    json_t *m = live_receive(&env, "g", "idem", 16, 0);
    assert_int_equal(json_array_size(m), 1);
    json_decref(m);

    const char *prep = "{\"topic\":\"idem\",\"body\":\"half\"}";
    live_send_keyed(&env, "/v1/transactions", "order-8-prepare", prep, &a);
    live_expect_status(&a, 201);
    live_send_keyed(&env, "/v1/transactions", "order-8-prepare", prep, &b);
    live_expect_status(&b, 201);
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.body, b.body, a.len);
    live_resp_free(&a);
    live_resp_free(&b);
    live_call(&env, "GET", "/v1/transactions?state=prepared", NULL, &a);
    live_expect_status(&a, 200);
    assert_int_equal(json_array_size(json_object_get(a.json, "transactions")), 1);
    live_resp_free(&a);
}

/* ---- topics and groups -------------------------------------------------------- */

static void topic_put_is_201_then_200_and_topics_are_listed(void **state)
{
    (void)state;
    live_resp r;
    live_call(&env, "PUT", "/v1/topics/payments", "{\"queues\":2}", &r);
    live_expect_status(&r, 201);
    assert_string_equal(live_str(&r, "name"), "payments");
    assert_int_equal(live_int(r.json, "queues"), 2);
    live_resp_free(&r);
    live_call(&env, "PUT", "/v1/topics/payments", "{\"queues\":3}", &r);
    live_expect_status(&r, 200);
    assert_int_equal(live_int(r.json, "queues"), 3);
    assert_int_equal(live_int(r.json, "writable"), 3);
    live_resp_free(&r);
    live_put_topic(&env, "audit", 1);
    live_send(&env, "payments", "{\"body\":1}", NULL);

    live_call(&env, "GET", "/v1/topics", NULL, &r);
    live_expect_status(&r, 200);
    json_t *list = json_object_get(r.json, "topics");
    assert_int_equal(json_array_size(list), 2);   /* internal topics not listed */
    assert_string_equal(json_string_value(json_object_get(json_array_get(list, 0), "name")),
                        "audit");
    assert_string_equal(json_string_value(json_object_get(json_array_get(list, 1), "name")),
                        "payments");
    live_resp_free(&r);

    live_call(&env, "GET", "/v1/topics/payments", NULL, &r);
    live_expect_status(&r, 200);
    assert_int_equal(live_int(r.json, "messages"), 1);
    assert_true(live_parse_time(live_str(&r, "created_at")) > 0);
    json_t *qo = json_object_get(r.json, "queue_offsets");
    assert_int_equal(json_array_size(qo), 3);
    int64_t total = 0;
    for (size_t i = 0; i < 3; i++) {
        json_t *q = json_array_get(qo, i);
        assert_int_equal(live_int(q, "queue"), (int64_t)i);
        total += live_int(q, "max_offset") - live_int(q, "min_offset");
    }
    assert_int_equal(total, 1);
    live_resp_free(&r);
}

static void group_put_is_201_then_200_and_get_shows_lag(void **state)
{
    (void)state;
    live_put_topic(&env, "orders", 2);
    live_resp r;
    live_call(&env, "PUT", "/v1/groups/billing", "{\"topic\":\"orders\",\"max_deliveries\":5}",
              &r);
    live_expect_status(&r, 201);
    assert_string_equal(live_str(&r, "group"), "billing");
    assert_string_equal(live_str(&r, "topic"), "orders");
    assert_true(json_is_true(json_object_get(r.json, "created")));
    live_resp_free(&r);
    live_call(&env, "PUT", "/v1/groups/billing",
              "{\"topic\":\"orders\",\"filter\":\"paid || created\"}", &r);
    live_expect_status(&r, 200);
    assert_true(json_is_false(json_object_get(r.json, "created")));
    live_resp_free(&r);
    int64_t t0 = live_now_ms();
    live_send(&env, "orders", "{\"tag\":\"paid\",\"body\":1}", NULL);
    live_send(&env, "orders", "{\"tag\":\"paid\",\"body\":2}", NULL);
    live_call(&env, "GET", "/v1/groups/billing", NULL, &r);
    live_expect_status(&r, 200);
    assert_string_equal(live_str(&r, "group"), "billing");
    json_t *subs = json_object_get(r.json, "subscriptions");
    assert_int_equal(json_array_size(subs), 1);
    json_t *s = json_array_get(subs, 0);
    assert_string_equal(json_string_value(json_object_get(s, "topic")), "orders");
    assert_int_equal(live_int(s, "lag"), 2);
    assert_int_equal(live_int(s, "inflight"), 0);
    /* the oldest message not yet acked: the first send */
    int64_t oldest = live_parse_time(json_string_value(json_object_get(s, "oldest_unacked_at")));
    assert_true(oldest >= t0 - 5 && oldest <= live_now_ms());
    assert_int_equal(json_array_size(json_object_get(s, "queues")), 2);
    live_resp_free(&r);
}

/* ---- probes and metrics -------------------------------------------------------- */

static void healthz_is_ok(void **state)
{
    (void)state;
    live_resp r;
    live_call(&env, "GET", "/healthz", NULL, &r);
    live_expect_status(&r, 200);
    assert_true(strncmp(r.content_type, "application/json", 16) == 0);
    assert_string_equal(live_str(&r, "status"), "ok");
    live_resp_free(&r);
}

static const char *const METRICS[][2] = {
    { "outboxd_http_requests_total", "counter" },
    { "outboxd_http_request_duration_seconds", "histogram" },
    { "outboxd_messages_published_total", "counter" },
    { "outboxd_store_appends_total", "counter" },
    { "outboxd_store_bytes", "gauge" },
    { "outboxd_store_segments", "gauge" },
    { "outboxd_store_fsync_seconds", "histogram" },
    { "outboxd_store_failed", "gauge" },
    { "outboxd_transactions_total", "counter" },
    { "outboxd_checkbacks_total", "counter" },
    { "outboxd_transactions_pending", "gauge" },
    { "outboxd_transactions_stuck", "gauge" },
    { "outboxd_transactions_oldest_pending_age_seconds", "gauge" },
    { "outboxd_delayed_pending", "gauge" },
    { "outboxd_delayed_fired_total", "counter" },
    { "outboxd_group_lag", "gauge" },
    { "outboxd_group_inflight", "gauge" },
    { "outboxd_group_oldest_unacked_age_seconds", "gauge" },
    { "outboxd_group_dead_letters", "gauge" },
    { "outboxd_idempotency_keys", "gauge" },
    { "outboxd_idempotency_replays_total", "counter" },
    { "outboxd_ready", "gauge" },
    { "outboxd_build_info", "gauge" },
};

/* The value of the first sample line of `name` whose labels contain every
 * fragment of `labels` (NULL-terminated); -1 when there is none. */
static double sample(const char *text, const char *name, const char *const *labels)
{
    size_t nl = strlen(name);
    for (const char *line = text; line && *line; line = strchr(line, '\n')) {
        if (*line == '\n')
            line++;
        if (strncmp(line, name, nl) != 0 || (line[nl] != '{' && line[nl] != ' '))
            continue;
        const char *eol = strchr(line, '\n');
        size_t len = eol ? (size_t)(eol - line) : strlen(line);
        char buf[1024];
        snprintf(buf, sizeof buf, "%.*s", (int)(len < sizeof buf ? len : sizeof buf - 1), line);
        bool all = true;
        for (size_t i = 0; labels && labels[i]; i++)
            all &= strstr(buf, labels[i]) != NULL;
        if (all) {
            const char *sp = strrchr(buf, ' ');
            return sp ? strtod(sp + 1, NULL) : -1;
        }
    }
    return -1;
}

static void metrics_name_every_metric_and_count_requests_by_route(void **state)
{
    (void)state;
    live_put_topic(&env, "m", 1);
    live_ok(&env, "PUT", "/v1/groups/mg", "{\"topic\":\"m\"}", 201);
    live_send(&env, "m", "{\"body\":1}", NULL);
    live_send(&env, "m", "{\"body\":2}", NULL);
    live_ok(&env, "POST", "/v1/transactions", "{\"topic\":\"m\",\"body\":3}", 201);
    live_expect_code(&env, "GET", "/v1/topics/nope", NULL, 404, "not-found");
    live_resp r;
    live_call(&env, "GET", "/metrics", NULL, &r);
    live_expect_status(&r, 200);
    assert_true(strncmp(r.content_type, "text/plain", 10) == 0);
    for (size_t i = 0; i < sizeof METRICS / sizeof METRICS[0]; i++) {
        char type_line[160];
        snprintf(type_line, sizeof type_line, "# TYPE %s %s\n", METRICS[i][0], METRICS[i][1]);
        if (!strstr(r.body, type_line))
            fail_msg("/metrics lacks \"# TYPE %s %s\"", METRICS[i][0], METRICS[i][1]);
    }
    struct {
        const char *name;
        const char *labels[4];
        double min;
    } want[] = {
        { "outboxd_http_requests_total",
          { "route=\"/v1/topics/{topic}/messages\"", "method=\"POST\"", "code=\"201\"" }, 2 },
        { "outboxd_http_requests_total",
          { "route=\"/v1/topics/{topic}\"", "method=\"PUT\"", "code=\"201\"" }, 1 },
        { "outboxd_http_requests_total",
          { "route=\"/v1/topics/{topic}\"", "method=\"GET\"", "code=\"404\"" }, 1 },
        { "outboxd_http_requests_total",
          { "route=\"/v1/transactions\"", "method=\"POST\"", "code=\"201\"" }, 1 },
        { "outboxd_http_request_duration_seconds_bucket",
          { "route=\"/v1/topics/{topic}/messages\"", "le=\"+Inf\"" }, 2 },
        { "outboxd_http_request_duration_seconds_count",
          { "route=\"/v1/topics/{topic}/messages\"" }, 2 },
        { "outboxd_messages_published_total", { "kind=\"send\"" }, 2 },
        { "outboxd_transactions_total", { "outcome=\"prepared\"" }, 1 },
        { "outboxd_transactions_pending", { NULL }, 1 },
        { "outboxd_store_appends_total", { NULL }, 3 },
        { "outboxd_group_lag", { "group=\"mg\"", "topic=\"m\"" }, 2 },
        { "outboxd_group_dead_letters", { "group=\"mg\"" }, 0 },
        { "outboxd_build_info", { "version=\"" }, 1 },
        { "outboxd_ready", { NULL }, 1 },
        { "outboxd_store_failed", { NULL }, 0 },
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        double v = sample(r.body, want[i].name, want[i].labels);
        if (v < want[i].min)
            fail_msg("/metrics: %s{%s,%s,%s} is %g, want >= %g", want[i].name,
                     want[i].labels[0] ? want[i].labels[0] : "",
                     want[i].labels[1] ? want[i].labels[1] : "",
                     want[i].labels[2] ? want[i].labels[2] : "", v, want[i].min);
    }
    live_resp_free(&r);
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
#define T(f) cmocka_unit_test_setup_teardown(f, env_setup, env_teardown)
    const struct CMUnitTest tests[] = {
        T(json_bodies_come_back_identical),
        T(base64_body_with_nul_bytes_comes_back_identical),
        T(headers_with_traceparent_come_back),
        T(key_and_tag_come_back),
        T(delayed_message_is_receivable_only_after_its_delay),
        T(delay_level_1_delivers_after_a_second),
        T(deliver_at_with_an_offset_is_honoured_and_answered_in_utc),
        T(prepare_commit_receive_ack_delivers_the_message_once),
        T(prepare_rollback_leaves_nothing_to_receive),
        T(delayed_commit_answers_deliver_at),
        T(transactions_are_listed_oldest_first_with_details),
        T(nack_redelivers_with_delivery_count_2),
        T(stale_and_malformed_receipts_are_reported_not_fatal),
        T(fifo_group_delivers_a_queue_in_order_one_at_a_time),
        T(dead_letter_after_max_deliveries_is_listed_with_reason_and_replayed),
        T(idempotency_key_replay_is_byte_identical_and_adds_no_message),
        T(topic_put_is_201_then_200_and_topics_are_listed),
        T(group_put_is_201_then_200_and_get_shows_lag),
        T(healthz_is_ok),
        T(metrics_name_every_metric_and_count_requests_by_route),
    };
#undef T
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
