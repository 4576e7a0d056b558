/*
 * test_handler_faults.c - the request handler (api_handle, in process over
 * a real store: handler_fx.h) when things go wrong underneath or the input
 * is hostile: every jansson allocation of every route failing in turn
 * (run under ASan: no crash, leak or double free, and a 503 rather than a
 * 400 blaming the client), and bodies at and past jansson's nesting limit.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "handler_fx.h"

/* ---- nesting ---------------------------------------------------------------------------- */

/* jansson stops at depth 2048 (a 400); anything it accepts must store,
 * dump and load back without trouble (the codec recurses over it). */
static char *nested_body(int depth)
{
    char *b = malloc((size_t)depth * 2 + 32);
    size_t o = (size_t)sprintf(b, "{\"body\":");
    for (int i = 0; i < depth; i++)
        b[o++] = '[';
    o += (size_t)sprintf(b + o, "1.5");
    for (int i = 0; i < depth; i++)
        b[o++] = ']';
    sprintf(b + o, "}");
    return b;
}

static void deeply_nested_bodies_are_400_or_round_trip(void **state)
{
    fx *f = *state;
    req_opts o = { .raw = true };
    res r;
    char *b = nested_body(5000);
    call_with(f, "POST", "/v1/topics/deep/messages", b, &o, &r);
    expect_problem(&r, 400, "bad-request", "not valid JSON");
    res_free(&r);
    free(b);
    b = nested_body(2040);
    call_with(f, "POST", "/v1/topics/deep/messages", b, &o, &r);
    expect_json(&r, 201);
    res_free(&r);
    free(b);
    json_t *m = recv_msgs(f, "g", "{'topic':'deep'}");
    assert_int_equal(json_array_size(m), 1);
    json_t *v = json_object_get(json_array_get(m, 0), "body");
    for (int i = 0; i < 2040; i++)
        v = json_array_get(v, 0);
    assert_true(json_real_value(v) == 1.5);
    json_decref(m);
}

/* ---- allocation failures ------------------------------------------------------------------ */

/* jansson allocations left before one fails (then all succeed again);
 * -1: none fails.  jansson's allocator is process-wide, so only this
 * single-threaded test installs it. */
static atomic_long oom_left = -1;

static void *oom_malloc(size_t n)
{
    long left = atomic_load(&oom_left);
    if (left == 0) {
        atomic_store(&oom_left, -1);
        return NULL;
    }
    if (left > 0)
        atomic_store(&oom_left, left - 1);
    return malloc(n);
}

typedef struct oom_case {
    const char *method, *path, *body;
    int status;                     /* the answer when nothing fails */
} oom_case;

/* Requests that can be repeated with the same answer (sends add a message
 * each time, which changes nothing the next one checks). */
static const oom_case OOM_CASES[] = {
    { "POST", "/v1/transactions", "{'topic':'oom','txid':'tx-oom','key':'k',"
      "'headers':{'h':'v'},'body':{'a':[1,2.5,null]}}", 201 },
    { "GET", "/v1/transactions/tx-oom", NULL, 200 },
    { "GET", "/v1/transactions", NULL, 200 },
    { "POST", "/v1/transactions/tx-oom/commit", "{}", 200 },
    { "POST", "/v1/topics/oom/messages", "{'key':'k','tag':'t','headers':"
      "{'h':'v'},'body':{'x':1.5}}", 201 },
    { "POST", "/v1/topics/oom/messages", "{'tag':'t','body_base64':'AAEC',"
      "'delay_ms':1000}", 201 },
    { "PUT", "/v1/topics/oom", "{'queues':12}", 200 },     /* > 8: arrays grow */
    { "GET", "/v1/topics/oom", NULL, 200 },
    { "GET", "/v1/topics", NULL, 200 },
    { "PUT", "/v1/groups/goom", "{'topic':'oom','filter':'t'}", 200 },
    { "GET", "/v1/groups/goom", NULL, 200 },
    { "POST", "/v1/groups/goom/receive", "{'topic':'oom','max':12,"
      "'filter':'t'}", 200 },
    { "POST", "/v1/groups/goom/ack", "{'receipts':['a','b','c','d','e','f',"
      "'g','h','i','j']}", 200 },
    { "POST", "/v1/groups/goom/nack", "{'receipts':['a','b','c','d','e','f',"
      "'g','h','i','j'],'reason':'r'}", 200 },
    { "GET", "/v1/groups/gdl/dead-letters", NULL, 200 },
    { "POST", "/v1/groups/goom/dead-letters/replay", "{'max':5}", 200 },
    { "GET", "/v1/topics/missing", NULL, 404 },
    { "GET", "/readyz", NULL, 200 },
    { "GET", "/healthz", NULL, 200 },
};

/* Each jansson allocation of each route fails once in turn: the answer is
 * the normal one or a 503 problem (never a crash, leak or double free:
 * run under ASan), and nothing is left behind for the next request. */
static void a_failed_json_allocation_is_a_503_on_every_route(void **state)
{
    fx *f = *state;
    /* More than 8 of each listed thing, so the arrays grow. */
    for (int i = 0; i < 12; i++) {
        char txid[16], topic[16];
        snprintf(txid, sizeof txid, "tx-oom-%d", i);
        prepare_ok(f, txid);
        snprintf(topic, sizeof topic, "oom%d", i);
        send_ok(f, topic, "{'body':1}");
        send_ok(f, "oom", "{'tag':'t','body':1}");
    }
    res r;
    call(f, "PUT", "/v1/groups/goom", "{'topic':'oom','max_inflight':1000000}", &r);
    expect_json(&r, 201);
    res_free(&r);
    call(f, "PUT", "/v1/groups/gdl", "{'topic':'dlt','max_deliveries':1}", &r);
    expect_json(&r, 201);
    res_free(&r);
    for (int i = 0; i < 12; i++)
        send_ok(f, "dlt", "{'key':'k','headers':{'h':'v'},'body':[1]}");
    json_t *m = recv_msgs(f, "gdl", "{'topic':'dlt','max':12}");
    for (size_t i = 0; i < json_array_size(m); i++) {
        char body[256];
        snprintf(body, sizeof body, "{'receipts':['%s'],'reason':'x'}",
                 msg_str(m, i, "receipt"));
        call(f, "POST", "/v1/groups/gdl/nack", body, &r);
        expect_json(&r, 200);
        res_free(&r);
    }
    json_decref(m);
    call(f, "GET", "/v1/groups/gdl/dead-letters", NULL, &r);
    expect_json(&r, 200);
    assert_int_equal(json_array_size(json_object_get(r.json, "dead_letters")), 12);
    res_free(&r);
    json_set_alloc_funcs(oom_malloc, free);
    for (size_t i = 0; i < sizeof OOM_CASES / sizeof OOM_CASES[0]; i++) {
        const oom_case *k = &OOM_CASES[i];
        for (long nth = 0; nth < 10000; nth++) {
            send_ok(f, "oom", "{'tag':'t','body':1}");
            char *b = k->body ? jq(k->body) : NULL;
            hdrs h = { .n = 0 };
            if (b) {
                h.name[h.n] = "Content-Type";
                h.value[h.n++] = "application/json";
            }
            api_request rq = { k->method, k->path, NULL, hdr_get, &h, b,
                               b ? strlen(b) : 0 };
            api_response resp;
            atomic_store(&oom_left, nth);
            api_outcome o = api_handle(f->h, &rq, &resp, NULL);
            bool failed_one = atomic_load(&oom_left) == -1;
            atomic_store(&oom_left, -1);
            free(b);
            assert_int_equal(o, API_DONE);
            if (resp.status != k->status && resp.status != 503)
                fail_msg("%s %s, allocation %ld failed: status %d, want %d or "
                         "503: %.*s", k->method, k->path, nth, resp.status,
                         k->status, (int)resp.body_len,
                         resp.body ? resp.body : "");
            api_response_free(&resp);
            if (!failed_one)
                break;              /* every allocation of this route was hit */
        }
    }
    json_set_alloc_funcs(malloc, free);
}

/* ---- main ------------------------------------------------------------------------------------ */

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(deeply_nested_bodies_are_400_or_round_trip),
        T(a_failed_json_allocation_is_a_503_on_every_route),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
