/*
 * test_contract.c - the HTTP API's failures as a client sees them
 * (docs/http-api.md), over real sockets: every failure status the spec
 * lists - 400 (malformed JSON, wrong-typed, unknown and out-of-range fields
 * named in the detail, both or neither body, bad txids and names, bad
 * query values), 401, 404, 405 with Allow, 409, 413, 415, 422, 429 with
 * Retry-After, 503 while draining (and what still works then), 507 - each
 * checked for the RFC 9457 shape: application/problem+json with type,
 * title, detail and status equal to the HTTP status (live_expect_problem).
 * The successes and round trips are in test_contract_flows.c.
 *
 * Each test gets a server over a fresh store (live_server.h: the daemon's
 * wiring, every background thread running, 127.0.0.1 port 0); a few open
 * theirs with a token, a tiny disk budget or auto-creation off.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>

#include "live_server.h"

static live_env env;

/* ---- fixture --------------------------------------------------------------- */

static int env_setup(void **state)
{
    (void)state;
    live_open(&env, NULL);
    return 0;
}

static int env_setup_token(void **state)
{
    (void)state;
    live_opts o = { .token = "s3cret" };
    live_open(&env, &o);
    return 0;
}

static int env_setup_tiny_budget(void **state)
{
    (void)state;
    live_opts o = { .disk_budget_bytes = 1u << 20, .segment_bytes = 64u << 10 };
    live_open(&env, &o);
    return 0;
}

static int env_setup_no_auto_create(void **state)
{
    (void)state;
    live_opts o = { .no_auto_create = true };
    live_open(&env, &o);
    return 0;
}

static int env_teardown(void **state)
{
    (void)state;
    live_close(&env);
    return 0;
}

/* ---- 400 ------------------------------------------------------------------- */

static void malformed_json_is_400(void **state)
{
    (void)state;
    live_expect_bad(&env, "POST", "/v1/topics/orders/messages", "{\"body\": [1,", NULL);
    live_expect_bad(&env, "PUT", "/v1/topics/orders", "{queues: 2}", NULL);
    live_expect_bad(&env, "POST", "/v1/transactions", "[1, 2]", NULL);
}

static void wrong_typed_field_is_400_naming_the_field(void **state)
{
    (void)state;
    live_expect_bad(&env, "POST", "/v1/transactions",
                    "{\"topic\":\"orders\",\"key\":5,\"body\":1}", "key");
    live_expect_bad(&env, "PUT", "/v1/topics/orders", "{\"queues\":\"2\"}", "queues");
    live_expect_bad(&env, "POST", "/v1/groups/g/receive",
                    "{\"topic\":\"orders\",\"max\":\"16\"}", "max");
    live_expect_bad(&env, "POST", "/v1/topics/orders/messages",
                    "{\"body\":1,\"headers\":{\"a\":1}}", "headers");
}

static void unknown_field_is_400_naming_the_field(void **state)
{
    (void)state;
    live_expect_bad(&env, "POST", "/v1/topics/orders/messages",
                    "{\"body\":1,\"colour\":\"red\"}", "colour");
    live_expect_bad(&env, "POST", "/v1/transactions",
                    "{\"topic\":\"orders\",\"body\":1,\"check\":{\"intervall_ms\":5}}",
                    "intervall_ms");
    live_expect_bad(&env, "PUT", "/v1/groups/g", "{\"topic\":\"orders\",\"fifoo\":true}", "fifoo");
}

static void body_and_body_base64_together_is_400(void **state)
{
    (void)state;
    live_expect_bad(&env, "POST", "/v1/topics/orders/messages",
                    "{\"body\":{\"a\":1},\"body_base64\":\"AAE=\"}", "body");
    live_expect_bad(&env, "POST", "/v1/transactions",
                    "{\"topic\":\"orders\",\"body\":1,\"body_base64\":\"AAE=\"}", "body");
}

static void neither_body_nor_body_base64_is_400(void **state)
{
    (void)state;
    live_expect_bad(&env, "POST", "/v1/topics/orders/messages", "{\"key\":\"k\"}", "body");
    live_expect_bad(&env, "POST", "/v1/topics/orders/messages",
                    "{\"body_base64\":\"not base64!\"}", "body_base64");
}

static void bad_txid_is_400(void **state)
{
    (void)state;
    char path[512], long_id[130];
    memset(long_id, 'a', 129);
    long_id[129] = '\0';
    live_expect_bad(&env, "POST", "/v1/transactions",
                    "{\"topic\":\"orders\",\"txid\":\"has space\",\"body\":1}", "txid");
    snprintf(path, sizeof path, "{\"topic\":\"orders\",\"txid\":\"%s\",\"body\":1}", long_id);
    live_expect_bad(&env, "POST", "/v1/transactions", path, "txid");
    snprintf(path, sizeof path, "/v1/transactions/%s", long_id);
    live_expect_bad(&env, "GET", path, NULL, NULL);
    snprintf(path, sizeof path, "/v1/transactions/%s/commit", long_id);
    live_expect_bad(&env, "POST", path, NULL, NULL);
}

static void internal_and_malformed_names_are_400(void **state)
{
    (void)state;
    live_expect_bad(&env, "PUT", "/v1/topics/__mine", "{\"queues\":1}", NULL);
    live_expect_bad(&env, "POST", "/v1/topics/__txn_half/messages", "{\"body\":1}", NULL);
    live_expect_bad(&env, "PUT", "/v1/groups/__g", "{\"topic\":\"orders\"}", NULL);
    live_expect_bad(&env, "PUT", "/v1/topics/bad%21name", "{\"queues\":1}", NULL);
    live_expect_bad(&env, "POST", "/v1/transactions", "{\"topic\":\"__delay\",\"body\":1}",
                    "topic");
}

static void empty_body_where_one_is_needed_is_400(void **state)
{
    (void)state;
    live_resp r;
    live_request(&env, "POST", "/v1/topics/orders/messages", "application/json", "", 0, NULL,
                 &r);
    live_expect_problem(&r, 400, "bad-request");
    live_resp_free(&r);
    live_request(&env, "PUT", "/v1/topics/orders", NULL, NULL, 0, NULL, &r);
    live_expect_problem(&r, 400, "bad-request");
    live_resp_free(&r);
}

static void out_of_range_values_are_400(void **state)
{
    (void)state;
    live_expect_bad(&env, "PUT", "/v1/topics/t", "{\"queues\":0}", "queues");
    live_expect_bad(&env, "PUT", "/v1/topics/t", "{\"queues\":1025}", "queues");
    live_expect_bad(&env, "POST", "/v1/groups/g/receive", "{\"topic\":\"t\",\"max\":257}", "max");
    live_expect_bad(&env, "POST", "/v1/groups/g/receive", "{\"topic\":\"t\",\"wait_ms\":30001}",
                    "wait_ms");
    live_expect_bad(&env, "POST", "/v1/groups/g/receive",
                    "{\"topic\":\"t\",\"invisible_ms\":999}", "invisible_ms");
    live_expect_bad(&env, "POST", "/v1/topics/t/messages", "{\"body\":1,\"delay_level\":19}",
                    "delay_level");
    live_expect_bad(&env, "POST", "/v1/topics/t/messages", "{\"body\":1,\"delay_ms\":-1}",
                    "delay_ms");
    live_expect_bad(&env, "PUT", "/v1/groups/g", "{\"topic\":\"t\",\"max_deliveries\":1001}",
                    "max_deliveries");
    live_expect_bad(&env, "POST", "/v1/transactions",
                    "{\"topic\":\"t\",\"body\":1,\"check\":{\"max_checks\":0}}", "max_checks");
}

static void delay_beyond_the_maximum_is_400(void **state)
{
    (void)state;
    char body[128];
    snprintf(body, sizeof body, "{\"body\":1,\"delay_ms\":%lld}",
             (long long)BRK_DELAY_MAX_DEFAULT_MS + 1);
    live_expect_bad(&env, "POST", "/v1/topics/orders/messages", body, "delay");
}

static void more_than_one_delay_is_400(void **state)
{
    (void)state;
    live_expect_bad(&env, "POST", "/v1/topics/orders/messages",
                    "{\"body\":1,\"delay_ms\":1000,\"delay_level\":1}", NULL);
    live_expect_bad(&env, "POST", "/v1/transactions",
                    "{\"topic\":\"orders\",\"body\":1,\"delay_ms\":1000,"
                    "\"deliver_at\":\"2030-01-01T00:00:00Z\"}",
                    NULL);
}

static void bad_query_values_are_400(void **state)
{
    (void)state;
    live_expect_bad(&env, "GET", "/v1/transactions?state=bogus", NULL, "state");
    live_expect_bad(&env, "GET", "/v1/transactions?limit=0", NULL, "limit");
    live_expect_bad(&env, "GET", "/v1/transactions?limit=10001", NULL, "limit");
    live_expect_bad(&env, "GET", "/v1/transactions?limit=ten", NULL, "limit");
    live_ok(&env, "PUT", "/v1/groups/g", "{\"topic\":\"orders\"}", 201);
    live_expect_bad(&env, "GET", "/v1/groups/g/dead-letters?limit=1001", NULL, "limit");
}

/* ---- 401 ------------------------------------------------------------------- */

static void without_the_token_everything_but_the_probes_is_401(void **state)
{
    (void)state;
    env.token = NULL;
    live_expect_code(&env, "GET", "/v1/topics", NULL, 401, "unauthorized");
    live_expect_code(&env, "POST", "/v1/topics/orders/messages", "{\"body\":1}", 401,
                     "unauthorized");
    live_expect_code(&env, "GET", "/metrics", NULL, 401, "unauthorized");
    live_ok(&env, "GET", "/healthz", NULL, 200);
    live_ok(&env, "GET", "/readyz", NULL, 200);
    env.token = "wrong";
    live_expect_code(&env, "GET", "/v1/topics", NULL, 401, "unauthorized");
    env.token = "s3cret";
    live_ok(&env, "GET", "/v1/topics", NULL, 200);
    live_ok(&env, "POST", "/v1/topics/orders/messages", "{\"body\":1}", 201);
}

/* ---- 404 ------------------------------------------------------------------- */

static void unknown_txid_is_404(void **state)
{
    (void)state;
    live_expect_code(&env, "GET", "/v1/transactions/nope", NULL, 404, "not-found");
    live_expect_code(&env, "POST", "/v1/transactions/nope/commit", NULL, 404, "not-found");
    live_expect_code(&env, "POST", "/v1/transactions/nope/rollback", NULL, 404, "not-found");
}

static void unknown_topic_is_404(void **state)
{
    (void)state;
    live_expect_code(&env, "GET", "/v1/topics/nope", NULL, 404, "not-found");
}

static void unknown_topic_with_auto_creation_off_is_404(void **state)
{
    (void)state;
    live_expect_code(&env, "POST", "/v1/topics/nope/messages", "{\"body\":1}", 404, "not-found");
    live_expect_code(&env, "POST", "/v1/topics/nope/messages", "{\"body\":1,\"delay_ms\":5000}",
                     404, "not-found");
    live_expect_code(&env, "POST", "/v1/transactions", "{\"topic\":\"nope\",\"body\":1}", 404,
                     "not-found");
    live_expect_code(&env, "PUT", "/v1/groups/g", "{\"topic\":\"nope\"}", 404, "not-found");
    live_expect_code(&env, "POST", "/v1/groups/g/receive", "{\"topic\":\"nope\"}", 404,
                     "not-found");
    live_ok(&env, "PUT", "/v1/topics/nope", "{\"queues\":1}", 201); /* PUT still creates */
    live_ok(&env, "POST", "/v1/topics/nope/messages", "{\"body\":1}", 201);
}

static void unknown_group_is_404(void **state)
{
    (void)state;
    live_expect_code(&env, "GET", "/v1/groups/nope", NULL, 404, "not-found");
    live_expect_code(&env, "POST", "/v1/groups/nope/ack", "{\"receipts\":[\"x\"]}", 404,
                     "not-found");
    live_expect_code(&env, "POST", "/v1/groups/nope/nack", "{\"receipts\":[\"x\"]}", 404,
                     "not-found");
    live_expect_code(&env, "GET", "/v1/groups/nope/dead-letters", NULL, 404, "not-found");
    live_expect_code(&env, "POST", "/v1/groups/nope/dead-letters/replay", NULL, 404, "not-found");
}

static void unknown_path_is_404(void **state)
{
    (void)state;
    live_expect_code(&env, "GET", "/", NULL, 404, "not-found");
    live_expect_code(&env, "GET", "/v2/topics", NULL, 404, "not-found");
    live_expect_code(&env, "GET", "/v1/topics/orders/nothing", NULL, 404, "not-found");
    live_expect_code(&env, "POST", "/v1/groups/g/receive/more", "{}", 404, "not-found");
}

/* ---- 405 ------------------------------------------------------------------- */

static void expect_405(const char *method, const char *path, const char *const *allowed,
                       const char *const *not_allowed)
{
    live_resp r;
    live_call(&env, method, path, NULL, &r);
    live_expect_problem(&r, 405, "method-not-allowed");
    for (size_t i = 0; allowed[i]; i++)
        if (!strstr(r.allow, allowed[i]))
            fail_msg("%s %s: Allow \"%s\" lacks %s", method, path, r.allow, allowed[i]);
    for (size_t i = 0; not_allowed[i]; i++)
        if (strstr(r.allow, not_allowed[i]))
            fail_msg("%s %s: Allow \"%s\" has %s", method, path, r.allow, not_allowed[i]);
    live_resp_free(&r);
}

static void wrong_method_is_405_with_allow(void **state)
{
    (void)state;
    expect_405("DELETE", "/v1/topics/orders", (const char *[]){ "GET", "PUT", NULL },
               (const char *[]){ "POST", "DELETE", NULL });
    expect_405("PATCH", "/v1/transactions", (const char *[]){ "GET", "POST", NULL },
               (const char *[]){ "PUT", NULL });
    expect_405("POST", "/healthz", (const char *[]){ "GET", NULL },
               (const char *[]){ "POST", NULL });
    expect_405("GET", "/v1/groups/g/ack", (const char *[]){ "POST", NULL },
               (const char *[]){ "GET", NULL });
}

/* ---- 409 ------------------------------------------------------------------- */

static void commit_after_rollback_is_409_naming_the_state(void **state)
{
    (void)state;
    live_ok(&env, "POST", "/v1/transactions",
            "{\"topic\":\"orders\",\"txid\":\"t-1\",\"body\":1}", 201);
    live_ok(&env, "POST", "/v1/transactions/t-1/rollback", NULL, 200);
    live_resp r;
    live_call(&env, "POST", "/v1/transactions/t-1/commit", NULL, &r);
    live_expect_problem(&r, 409, "conflict");
    live_expect_detail(&r, "rolled_back");
    live_resp_free(&r);
}

static void rollback_after_commit_is_409(void **state)
{
    (void)state;
    live_ok(&env, "POST", "/v1/transactions",
            "{\"topic\":\"orders\",\"txid\":\"t-2\",\"body\":1}", 201);
    live_ok(&env, "POST", "/v1/transactions/t-2/commit", NULL, 200);
    live_expect_code(&env, "POST", "/v1/transactions/t-2/rollback", NULL, 409, "conflict");
}

static void prepare_of_a_used_txid_with_another_body_is_409(void **state)
{
    (void)state;
    const char *first = "{\"topic\":\"orders\",\"txid\":\"t-3\",\"body\":{\"v\":1}}";
    live_resp a, b;
    live_call(&env, "POST", "/v1/transactions", first, &a);
    live_expect_status(&a, 201);
    live_call(&env, "POST", "/v1/transactions", first, &b); /* identical: a replay */
    live_expect_status(&b, 201);
    assert_string_equal(live_str(&a, "msg_id"), live_str(&b, "msg_id"));
    assert_string_equal(live_str(&b, "state"), "prepared");
    live_resp_free(&a);
    live_resp_free(&b);
    live_expect_code(&env, "POST", "/v1/transactions",
                     "{\"topic\":\"orders\",\"txid\":\"t-3\",\"body\":{\"v\":2}}", 409,
                     "conflict");
}

static void changing_fifo_of_a_group_with_progress_is_409(void **state)
{
    (void)state;
    live_ok(&env, "PUT", "/v1/groups/g", "{\"topic\":\"orders\"}", 201);
    live_send(&env, "orders", "{\"body\":1}", NULL);
    json_t *m = live_receive(&env, "g", "orders", 1, 0);
    assert_int_equal(json_array_size(m), 1);
    json_t *a = live_settle(&env, "g", "ack", live_msg_str(m, 0, "receipt"), NULL);
    assert_int_equal(live_int(a, "acked"), 1);
    json_decref(a);
    json_decref(m);
    live_expect_code(&env, "PUT", "/v1/groups/g", "{\"topic\":\"orders\",\"fifo\":true}", 409,
                     "conflict");
}

/* ---- 413, 415 ---------------------------------------------------------------- */

static void body_over_the_limit_is_413(void **state)
{
    (void)state;
    size_t n = 2u << 20;
    char *big = malloc(n + 32);
    assert_non_null(big);
    memcpy(big, "{\"body\":\"", 9);
    memset(big + 9, 'x', n);
    memcpy(big + 9 + n, "\"}", 3);
    live_resp r;
    live_request(&env, "POST", "/v1/topics/orders/messages", "application/json", big,
                 strlen(big), NULL, &r);
    free(big);
    live_expect_problem(&r, 413, "payload-too-large");
    live_resp_free(&r);
    live_ok(&env, "GET", "/healthz", NULL, 200); /* the server is fine afterwards */
}

static void non_json_body_is_415_and_json_types_are_accepted(void **state)
{
    (void)state;
    const char *body = "{\"body\":1}";
    live_resp r;
    live_request(&env, "POST", "/v1/topics/orders/messages", "text/plain", body, strlen(body),
                 NULL, &r);
    live_expect_problem(&r, 415, "unsupported-media-type");
    live_resp_free(&r);
    live_request(&env, "PUT", "/v1/topics/orders", NULL, "{\"queues\":1}", 12, NULL, &r);
    live_expect_problem(&r, 415, "unsupported-media-type");
    live_resp_free(&r);
    live_request(&env, "POST", "/v1/topics/orders/messages", "application/json; charset=utf-8",
                 body, strlen(body), NULL, &r);
    live_expect_status(&r, 201);
    live_resp_free(&r);
    live_request(&env, "POST", "/v1/topics/orders/messages", "application/cloudevents+json",
                 body, strlen(body), NULL, &r);
    live_expect_status(&r, 201);
    live_resp_free(&r);
}

/* ---- 422 ----------------------------------------- */

static void idempotency_key_reused_with_another_request_is_422(void **state)
{
    (void)state;
    live_resp r;
    live_send_keyed(&env, "/v1/topics/orders/messages", "k-1", "{\"body\":1}", &r);
    live_expect_status(&r, 201);
    live_resp_free(&r);
    live_send_keyed(&env, "/v1/topics/orders/messages", "k-1", "{\"body\":2}", &r);
    live_expect_problem(&r, 422, "idempotency-key-reused");
    live_resp_free(&r);
    live_send_keyed(&env, "/v1/topics/other/messages", "k-1", "{\"body\":1}", &r);
    live_expect_problem(&r, 422, "idempotency-key-reused");
    live_resp_free(&r);
}


/* ---- 429 ------------------------------------------------------------------- */

static void receive_at_max_inflight_is_429_with_retry_after(void **state)
{
    (void)state;
    live_ok(&env, "PUT", "/v1/groups/fc", "{\"topic\":\"orders\",\"max_inflight\":1}", 201);
    live_send(&env, "orders", "{\"body\":1}", NULL);
    live_send(&env, "orders", "{\"body\":2}", NULL);
    json_t *m = live_receive(&env, "fc", "orders", 16, 0);
    assert_int_equal(json_array_size(m), 1);
    json_decref(m);
    live_resp r;
    live_call(&env, "POST", "/v1/groups/fc/receive", "{\"topic\":\"orders\"}", &r);
    live_expect_problem(&r, 429, "too-many-requests");
    assert_string_equal(r.retry_after, "1");
    live_resp_free(&r);
}

/* ---- draining (503) ---------------------------------------------------------- */

static void writes_while_draining_are_503_with_retry_after(void **state)
{
    (void)state;
    live_ok(&env, "PUT", "/v1/groups/g", "{\"topic\":\"orders\"}", 201);
    api_server_drain(env.srv);
    static const char *const calls[][3] = {
        { "POST", "/v1/transactions", "{\"topic\":\"orders\",\"body\":1}" },
        { "POST", "/v1/topics/orders/messages", "{\"body\":1}" },
        { "PUT", "/v1/topics/orders", "{\"queues\":2}" },
        { "PUT", "/v1/groups/g", "{\"topic\":\"orders\"}" },
        { "POST", "/v1/groups/g/dead-letters/replay", NULL },
    };
    for (size_t i = 0; i < sizeof calls / sizeof calls[0]; i++) {
        live_resp r;
        live_call(&env, calls[i][0], calls[i][1], calls[i][2], &r);
        if (r.status != 503)
            fail_msg("%s %s while draining: %ld", calls[i][0], calls[i][1], r.status);
        live_expect_problem(&r, 503, "shutting-down");
        assert_string_equal(r.retry_after, "5");
        live_resp_free(&r);
    }
}

static void reads_verdicts_and_settles_still_work_while_draining(void **state)
{
    (void)state;
    live_ok(&env, "POST", "/v1/transactions",
            "{\"topic\":\"orders\",\"txid\":\"c\",\"body\":1}", 201);
    live_ok(&env, "POST", "/v1/transactions",
            "{\"topic\":\"orders\",\"txid\":\"r\",\"body\":1}", 201);
    live_send(&env, "orders", "{\"body\":1}", NULL);
    json_t *m = live_receive(&env, "g", "orders", 1, 0);
    assert_int_equal(json_array_size(m), 1);
    api_server_drain(env.srv);
    live_ok(&env, "POST", "/v1/transactions/c/commit", NULL, 200);
    live_ok(&env, "POST", "/v1/transactions/r/rollback", NULL, 200);
    json_t *a = live_settle(&env, "g", "ack", live_msg_str(m, 0, "receipt"), NULL);
    assert_int_equal(live_int(a, "acked"), 1);
    json_decref(a);
    json_decref(m);
    live_ok(&env, "GET", "/v1/topics", NULL, 200);
    live_ok(&env, "GET", "/v1/topics/orders", NULL, 200);
    live_ok(&env, "GET", "/v1/transactions/c", NULL, 200);
    live_ok(&env, "GET", "/v1/groups/g", NULL, 200);
    live_ok(&env, "GET", "/metrics", NULL, 200);
    m = live_receive(&env, "g", "orders", 16, 0); /* the committed message */
    assert_int_equal(json_array_size(m), 1);
    json_decref(m);
}

static void readyz_is_ready_then_503_after_drain(void **state)
{
    (void)state;
    live_resp r;
    live_call(&env, "GET", "/readyz", NULL, &r);
    live_expect_status(&r, 200);
    assert_string_equal(live_str(&r, "status"), "ready");
    live_resp_free(&r);
    api_server_drain(env.srv);
    assert_true(api_handler_draining(api_server_handler(env.srv)));
    live_call(&env, "GET", "/readyz", NULL, &r);
    live_expect_status(&r, 503);
    assert_string_equal(live_str(&r, "status"), "shutting_down");
    assert_true(strncmp(r.content_type, "application/json", 16) == 0);
    live_resp_free(&r);
    live_call(&env, "GET", "/healthz", NULL, &r);
    live_expect_status(&r, 200);
    assert_string_equal(live_str(&r, "status"), "ok");
    live_resp_free(&r);
}

typedef struct parked {
    live_env e;                 /* a copy of env with its own connection */
    live_resp r;
    int64_t took_ms;
} parked;

static void *parked_receive(void *arg)
{
    parked *p = arg;
    int64_t t0 = live_now_ms();
    live_call(&p->e, "POST", "/v1/groups/g/receive",
              "{\"topic\":\"orders\",\"wait_ms\":20000}", &p->r);
    p->took_ms = live_now_ms() - t0;
    return NULL;
}

static void parked_receive_returns_at_once_on_drain(void **state)
{
    (void)state;
    live_ok(&env, "PUT", "/v1/groups/g", "{\"topic\":\"orders\"}", 201);
    parked p;
    memset(&p, 0, sizeof p);
    p.e = env;
    p.e.curl = curl_easy_init();
    assert_non_null(p.e.curl);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, parked_receive, &p), 0);
    live_sleep_ms(400);                     /* let it park */
    int64_t t0 = live_now_ms();
    api_server_drain(env.srv);
    assert_int_equal(pthread_join(th, NULL), 0);
    int64_t after_drain = live_now_ms() - t0;
    curl_easy_cleanup(p.e.curl);
    live_expect_status(&p.r, 200);
    assert_int_equal(json_array_size(json_object_get(p.r.json, "messages")), 0);
    live_resp_free(&p.r);
    if (p.took_ms < 300 || after_drain > 3000)
        fail_msg("the parked receive took %lld ms, %lld ms after the drain",
                 (long long)p.took_ms, (long long)after_drain);
}

/* ---- 507 ------------------------------------------------------------------- */

static void sends_into_a_full_store_are_507(void **state)
{
    (void)state;
    /* 16 KiB of base64 per message: the 1 MiB budget is full well before
     * 200 sends. */
    size_t n = 16384;
    char *body = malloc(n + 64);
    assert_non_null(body);
    int k = snprintf(body, 64, "{\"body_base64\":\"");
    memset(body + k, 'A', n);
    memcpy(body + k + n, "\"}", 3);
    int sent = 0;
    live_resp r = { 0 };
    for (int i = 0; i < 200; i++) {
        live_call(&env, "POST", "/v1/topics/full/messages", body, &r);
        if (r.status != 201)
            break;
        sent++;
        live_resp_free(&r);
    }
    free(body);
    live_expect_problem(&r, 507, "store-full");
    live_resp_free(&r);
    assert_true(sent > 0);
    live_ok(&env, "GET", "/v1/topics/full", NULL, 200); /* reads still work */
    live_ok(&env, "GET", "/readyz", NULL, 200);         /* full is not failed */
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
#define T(f) cmocka_unit_test_setup_teardown(f, env_setup, env_teardown)
    const struct CMUnitTest tests[] = {
        T(malformed_json_is_400),
        T(wrong_typed_field_is_400_naming_the_field),
        T(unknown_field_is_400_naming_the_field),
        T(body_and_body_base64_together_is_400),
        T(neither_body_nor_body_base64_is_400),
        T(bad_txid_is_400),
        T(internal_and_malformed_names_are_400),
        T(empty_body_where_one_is_needed_is_400),
        T(out_of_range_values_are_400),
        T(delay_beyond_the_maximum_is_400),
        T(more_than_one_delay_is_400),
        T(bad_query_values_are_400),
        cmocka_unit_test_setup_teardown(without_the_token_everything_but_the_probes_is_401,
                                        env_setup_token, env_teardown),
        T(unknown_txid_is_404),
        T(unknown_topic_is_404),
        cmocka_unit_test_setup_teardown(unknown_topic_with_auto_creation_off_is_404,
                                        env_setup_no_auto_create, env_teardown),
        T(unknown_group_is_404),
        T(unknown_path_is_404),
        T(wrong_method_is_405_with_allow),
        T(commit_after_rollback_is_409_naming_the_state),
        T(rollback_after_commit_is_409),
        T(prepare_of_a_used_txid_with_another_body_is_409),
        T(changing_fifo_of_a_group_with_progress_is_409),
        T(body_over_the_limit_is_413),
        T(non_json_body_is_415_and_json_types_are_accepted),
        T(idempotency_key_reused_with_another_request_is_422),
        T(receive_at_max_inflight_is_429_with_retry_after),
        T(writes_while_draining_are_503_with_retry_after),
        T(reads_verdicts_and_settles_still_work_while_draining),
        T(readyz_is_ready_then_503_after_drain),
        T(parked_receive_returns_at_once_on_drain),
        cmocka_unit_test_setup_teardown(sends_into_a_full_store_are_507,
                                        env_setup_tiny_budget, env_teardown),
    };
#undef T
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
