/*
 * test_jbuf.c - the direct JSON writer (codec.h, api_jbuf) and the answers
 * written with it: byte for byte what jansson's compact dump of the same
 * value is (json_dumps with JSON_COMPACT | JSON_ENCODE_ANY, the old path),
 * for every kind of value, every ASCII byte and control character inside
 * strings, multi-byte and non-BMP UTF-8, NULs, integer extremes, random
 * trees; invalid UTF-8 refused as jansson refuses it; and the fixed-shape
 * answers of send, prepare, commit and rollback (field order, escaping of
 * a txid holding '"' and '\', deliver_at, idempotent replays) equal to the
 * same fields dumped by jansson in the documented order.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "codec.h"
#include "handler_fx.h"

/* ---- helpers --------------------------------------------------------------------- */

/* What the old path wrote: jansson's compact dump. */
static char *jansson_text(const json_t *v)
{
    return json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
}

/* api_json_dump(v) must equal jansson's dump of v, byte for byte. */
static void expect_same_dump(const json_t *v, const char *what)
{
    char *want = jansson_text(v);
    size_t len = 0;
    char *got = api_json_dump(v, &len);
    if (!want || !got)
        fail_msg("%s: jansson %s, direct %s", what, want ? "ok" : "NULL",
                 got ? "ok" : "NULL");
    if (len != strlen(want) || memcmp(got, want, len) != 0)
        fail_msg("%s: direct '%.*s' != jansson '%s'", what, (int)len, got, want);
    free(want);
    free(got);
}

/* The writer's text of a string s[n], or NULL when it refused it. */
static char *jbuf_string(const void *s, size_t n, size_t *len)
{
    api_jbuf b;
    api_jbuf_init(&b, 0);
    api_jbuf_str(&b, s, n);
    return api_jbuf_take(&b, len);
}

static uint64_t rng = 0x9E3779B97F4A7C15u;

static uint32_t rnd(uint32_t n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng % n);
}

/* UTF-8 of code point cp (no surrogates) at o; returns the length. */
static size_t utf8_put(uint32_t cp, char *o)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xc0 | cp >> 6);
        o[1] = (char)(0x80 | (cp & 63));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | cp >> 12);
        o[1] = (char)(0x80 | ((cp >> 6) & 63));
        o[2] = (char)(0x80 | (cp & 63));
        return 3;
    }
    o[0] = (char)(0xf0 | cp >> 18);
    o[1] = (char)(0x80 | ((cp >> 12) & 63));
    o[2] = (char)(0x80 | ((cp >> 6) & 63));
    o[3] = (char)(0x80 | (cp & 63));
    return 4;
}

/* A random valid UTF-8 string, weighted to what needs escaping. */
static size_t random_text(char *o, size_t max_chars)
{
    size_t n = 0, chars = rnd((uint32_t)max_chars + 1);
    for (size_t i = 0; i < chars; i++) {
        uint32_t cp;
        switch (rnd(6)) {
        case 0: cp = rnd(0x20); break;                         /* controls, NUL */
        case 1: cp = "\"\\/\x7f"[rnd(4)]; break;
        case 2: cp = 0x80 + rnd(0x780); break;
        case 3: cp = 0x800 + rnd(0xf800); break;
        case 4: cp = 0x10000 + rnd(0x100000); break;
        default: cp = 0x20 + rnd(0x5f); break;
        }
        if (cp >= 0xd800 && cp <= 0xdfff)
            cp = 'x';
        n += utf8_put(cp, o + n);
    }
    return n;
}

static json_t *random_value(int depth)
{
    char s[64 * 4];
    switch (rnd(depth > 4 ? 5 : 7)) {
    case 0: return json_null();
    case 1: return json_boolean(rnd(2));
    case 2: {
        static const json_int_t edge[] = { 0, -1, 1, INT64_MIN, INT64_MAX,
                                           1000000007, -99 };
        return json_integer(rnd(2) ? edge[rnd(7)]
                                   : (json_int_t)(rng >> 1) * (rnd(2) ? 1 : -1));
    }
    case 3:
    case 4: return json_stringn(s, random_text(s, 48));
    case 5: {
        json_t *a = json_array();
        for (uint32_t i = rnd(5); i > 0; i--)
            json_array_append_new(a, random_value(depth + 1));
        return a;
    }
    default: {
        json_t *o = json_object();
        for (uint32_t i = rnd(5); i > 0; i--) {
            size_t kl = random_text(s, 12);
            json_object_setn_new(o, s, kl, random_value(depth + 1));
        }
        return o;
    }
    }
}

/* ---- codec: the writer against jansson -------------------------------------------------------- */

static void every_kind_of_value_dumps_as_jansson_does(void **state)
{
    (void)state;
    static const char *const texts[] = {
        "null", "true", "false", "0", "-0", "7", "-7",
        "9223372036854775807", "-9223372036854775808",
        "\"\"", "\"plain\"", "\"q\\\"b\\\\s/\"", "\"a\\u0000b\"",
        "\"\\b\\f\\n\\r\\t\\u0001\\u001f\\u007f\"",
        "\"\\u00e9\\u20ac\\ud83d\\ude00\"", "\"\\u2028\\u2029\"",
        "[]", "{}", "[[]]", "{\"\":{}}", "[1,\"2\",[3,{\"4\":null}],true]",
        "{\"a\":1,\"b\":[1,2],\"c\":{\"d\":\"e\"},\"z\":false}",
        "{\"z\":1,\"a\":2,\"m\":3}",
        "{\"\\\"q\\\"\":\"\\\\\"}",
        "{\"\\u00fc\\u00df\":\"\\ud834\\udd1e\"}",
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        json_error_t e;
        json_t *v = json_loads(texts[i], JSON_DECODE_ANY | JSON_ALLOW_NUL, &e);
        if (!v)
            fail_msg("bad test JSON %s: %s", texts[i], e.text);
        expect_same_dump(v, texts[i]);
        json_decref(v);
    }
    /* a NUL inside a key (the parser refuses those; setn makes one) */
    json_t *o = json_object();
    json_object_setn_new(o, "k\0ey", 4, json_string("nul in a key"));
    expect_same_dump(o, "NUL in a key");
    json_decref(o);
}

static void every_ascii_byte_in_a_string_escapes_as_jansson_does(void **state)
{
    (void)state;
    for (int ch = 0; ch < 0x80; ch++) {
        /* alone, and inside runs longer than a word on both sides */
        char s[40];
        memset(s, 'a', sizeof s);
        s[0] = (char)ch;
        s[17] = (char)ch;
        s[39] = (char)ch;
        for (size_t n = 1; n <= sizeof s; n += 19) {
            json_t *v = json_stringn(s, n);
            assert_non_null(v);
            char *want = jansson_text(v);
            size_t len = 0;
            char *got = jbuf_string(s, n, &len);
            assert_non_null(got);
            if (len != strlen(want) || memcmp(got, want, len) != 0)
                fail_msg("byte 0x%02x, %zu bytes: '%s' != '%s'", ch, n, got, want);
            free(want);
            free(got);
            json_decref(v);
        }
    }
}

static void random_trees_dump_as_jansson_does(void **state)
{
    (void)state;
    for (int i = 0; i < 3000; i++) {
        json_t *v = random_value(0);
        char what[32];
        snprintf(what, sizeof what, "random tree %d", i);
        expect_same_dump(v, what);
        json_decref(v);
    }
}

/* Strings jansson would not dump (made with the unchecked constructor):
 * the writer refuses the same ones and writes the others identically. */
static void invalid_utf8_is_refused_as_jansson_refuses_it(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "\x80", "a\xbf", "\xc0\x80", "\xc1\xbf", "\xe0\x80\x80",
        "\xed\xa0\x80", "\xf0\x80\x80\x80", "\xf4\x90\x80\x80", "\xf5\x80\x80\x80",
        "\xff", "\xc3", "ok\xe2\x82", "\xe2\x28\xa1",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        json_t *v = json_stringn_nocheck(bad[i], strlen(bad[i]));
        char *j = jansson_text(v);
        size_t len = 0;
        char *got = jbuf_string(bad[i], strlen(bad[i]), &len);
        if (j || got)
            fail_msg("case %zu: jansson %s, direct %s (want both refused)", i,
                     j ? j : "NULL", got ? got : "NULL");
        assert_null(api_json_dump(v, &len));
        json_decref(v);
    }
    for (int i = 0; i < 20000; i++) {
        unsigned char s[12];
        size_t n = rnd(sizeof s + 1);
        for (size_t k = 0; k < n; k++)
            s[k] = (unsigned char)(rnd(3) ? 0x80 + rnd(0x80) : rnd(0x80));
        json_t *v = json_stringn_nocheck((const char *)s, n);
        char *want = jansson_text(v);
        size_t len = 0;
        char *got = jbuf_string(s, n, &len);
        if ((want == NULL) != (got == NULL)
            || (want && (len != strlen(want) || memcmp(got, want, len) != 0)))
            fail_msg("random bytes %d: jansson %s, direct %s", i,
                     want ? want : "NULL", got ? got : "NULL");
        free(want);
        free(got);
        json_decref(v);
    }
}

static void integers_and_flat_objects_are_written_as_jansson_does(void **state)
{
    (void)state;
    static const int64_t ints[] = { 0, 1, -1, 9, 10, -10, 123456789,
                                    INT64_MAX, INT64_MIN, INT64_MIN + 1 };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        api_jbuf b;
        api_jbuf_init(&b, 8);
        api_jbuf_int(&b, ints[i]);
        size_t len = 0;
        char *got = api_jbuf_take(&b, &len);
        char want[32];
        snprintf(want, sizeof want, "%lld", (long long)ints[i]);
        assert_string_equal(got, want);
        assert_int_equal(len, strlen(want));
        free(got);
    }
    api_jbuf b;
    api_jbuf_init(&b, 0);
    api_jbuf_end(&b);
    char *empty = api_jbuf_take(&b, NULL);
    assert_string_equal(empty, "{}");
    free(empty);
    /* A flat object grows past its first allocation. */
    api_jbuf_init(&b, 1);
    json_t *o = json_object();
    for (int i = 0; i < 40; i++) {
        char k[16];
        snprintf(k, sizeof k, "key\"%d", i);
        api_jbuf_key(&b, k);
        api_jbuf_int(&b, i * 1000003LL);
        json_object_set_new(o, k, json_integer(i * 1000003LL));
    }
    api_jbuf_end(&b);
    size_t len = 0;
    char *got = api_jbuf_take(&b, &len);
    char *want = jansson_text(o);
    assert_int_equal(len, strlen(want));
    assert_string_equal(got, want);
    free(got);
    free(want);
    json_decref(o);
}

/* uuid and time helpers write what api_json_uuid / api_json_time do. */
static void uuid_and_time_values_match_their_json_t_forms(void **state)
{
    (void)state;
    static const int64_t times[] = { 0, -1, 1, 1795612442123LL,
                                     253402300799999LL, INT64_MAX, INT64_MIN };
    for (size_t i = 0; i < sizeof times / sizeof times[0]; i++) {
        uint8_t id[BRK_UUID_LEN];
        for (size_t k = 0; k < BRK_UUID_LEN; k++)
            id[k] = (uint8_t)rnd(256);
        api_jbuf b;
        api_jbuf_init(&b, 0);
        api_jbuf_key(&b, "msg_id");
        api_jbuf_uuid(&b, id);
        api_jbuf_key(&b, "deliver_at");
        api_jbuf_time(&b, times[i]);
        api_jbuf_end(&b);
        char *got = api_jbuf_take(&b, NULL);
        json_t *o = json_object();
        api_json_put(o, "msg_id", api_json_uuid(id));
        api_json_put(o, "deliver_at", api_json_time(times[i], false));
        char *want = jansson_text(o);
        assert_string_equal(got, want);
        free(got);
        free(want);
        json_decref(o);
    }
}

/* A failed buffer stays failed: later writes are dropped, take is NULL. */
static void a_failed_buffer_gives_no_text(void **state)
{
    (void)state;
    api_jbuf b;
    api_jbuf_init(&b, 0);
    api_jbuf_key(&b, "a");
    api_jbuf_str(&b, "\xff", 1);
    assert_true(b.failed);
    api_jbuf_key(&b, "b");
    api_jbuf_int(&b, 1);
    api_jbuf_end(&b);
    assert_null(api_jbuf_take(&b, NULL));
    /* a real is not the writer's: the buffer is left as it was */
    json_t *r = json_loads("[1,2.5]", 0, NULL);
    api_jbuf_init(&b, 0);
    assert_false(api_jbuf_value(&b, r));
    assert_false(b.failed);
    assert_int_equal(b.len, 0);
    free(api_jbuf_take(&b, NULL));
    json_decref(r);
}

/* jansson allocations left before one fails; -1: none. */
static long oom_left = -1;

static void *oom_malloc(size_t n)
{
    if (oom_left == 0)
        return NULL;                /* and every one after it */
    if (oom_left > 0)
        oom_left--;
    return malloc(n);
}

/* The buffer comes from jansson's allocator, so an injected failure (the
 * first allocation, or the growth) leaves a failed buffer, no text and
 * nothing leaked (ASan); api_json_dump then answers NULL. */
static void a_failed_allocation_gives_no_text(void **state)
{
    (void)state;
    char big[300];
    memset(big, 'x', sizeof big);
    json_t *v = json_stringn(big, sizeof big);
    json_set_alloc_funcs(oom_malloc, free);
    for (long nth = 0; nth < 2; nth++) {
        oom_left = nth;
        api_jbuf b;
        api_jbuf_init(&b, 0);
        api_jbuf_str(&b, big, sizeof big);
        assert_true(b.failed);
        assert_null(api_jbuf_take(&b, NULL));
        oom_left = nth;
        size_t len = 0;
        assert_null(api_json_dump(v, &len));
    }
    oom_left = -1;
    json_set_alloc_funcs(malloc, free);
    json_decref(v);
}

/* ---- the answers of the hot routes ------------------------------------------------------------ */

/* The body must be the jansson dump of its own fields in `order`: the
 * bytes the json_t path wrote (field order, compact, escaping). */
static void expect_shape(const res *r, const char *const *order)
{
    json_t *want = json_object();
    for (size_t i = 0; order[i]; i++) {
        json_t *v = json_object_get(r->json, order[i]);
        if (!v)
            fail_msg("no '%s' in %s", order[i], r->body);
        json_object_set(want, order[i], v);
    }
    assert_int_equal(json_object_size(want), json_object_size(r->json));
    char *text = jansson_text(want);
    assert_int_equal(r->len, strlen(text));
    if (memcmp(r->body, text, r->len) != 0)
        fail_msg("answer %s, json_t path %s", r->body, text);
    free(text);
    json_decref(want);
}

static void send_answers_are_the_json_t_bytes(void **state)
{
    fx *f = *state;
    static const char *const placed[] = { "msg_id", "queue", "offset", NULL };
    static const char *const delayed[] = { "msg_id", "deliver_at", NULL };
    res r;
    for (int i = 0; i < 20; i++) {
        call(f, "POST", "/v1/topics/orders/messages", "{'key':'k','body':'x'}", &r);
        expect_json(&r, 201);
        expect_shape(&r, placed);
        res_free(&r);
    }
    call(f, "POST", "/v1/topics/orders/messages", "{'body':1,'delay_ms':5000}", &r);
    expect_json(&r, 201);
    expect_shape(&r, delayed);
    assert_string_equal(str(&r, "deliver_at"), "2026-11-25T13:14:07.123Z");
    res_free(&r);
    /* a replay gives the same bytes again */
    req_opts o = { .idem_key = "jbuf-1" };
    res again;
    call_with(f, "POST", "/v1/topics/orders/messages", "{'body':2}", &o, &r);
    call_with(f, "POST", "/v1/topics/orders/messages", "{'body':2}", &o, &again);
    expect_json(&r, 201);
    expect_shape(&r, placed);
    expect_json(&again, 201);
    assert_int_equal(again.len, r.len);
    assert_memory_equal(again.body, r.body, r.len);
    res_free(&again);
    res_free(&r);
}

static void transaction_answers_are_the_json_t_bytes(void **state)
{
    fx *f = *state;
    static const char *const prepared[] = { "txid", "msg_id", "state", NULL };
    static const char *const rolled[] = { "txid", "state", NULL };
    static const char *const delayed[] = { "txid", "msg_id", "state",
                                           "deliver_at", NULL };
    req_opts raw = { .raw = true };
    res r;
    /* a txid with '"' and '\' in it, escaped in the answer */
    call_with(f, "POST", "/v1/transactions", "{\"topic\":\"orders\","
              "\"txid\":\"a\\\"b\\\\c\",\"body\":{}}", &raw, &r);
    expect_json(&r, 201);
    expect_shape(&r, prepared);
    assert_string_equal(str(&r, "txid"), "a\"b\\c");
    assert_non_null(strstr(r.body, "\"txid\":\"a\\\"b\\\\c\""));
    res_free(&r);
    call(f, "POST", "/v1/transactions/a\"b\\c/commit", NULL, &r);
    expect_json(&r, 200);
    expect_shape(&r, prepared);
    assert_string_equal(str(&r, "state"), "committed");
    res_free(&r);
    /* generated txid, rollback */
    call(f, "POST", "/v1/transactions", "{'topic':'orders','body':1}", &r);
    expect_json(&r, 201);
    expect_shape(&r, prepared);
    char path[256];
    snprintf(path, sizeof path, "/v1/transactions/%s/rollback", str(&r, "txid"));
    res_free(&r);
    call(f, "POST", path, NULL, &r);
    expect_json(&r, 200);
    expect_shape(&r, rolled);
    assert_string_equal(str(&r, "state"), "rolled_back");
    res_free(&r);
    /* delayed: the commit carries deliver_at */
    call(f, "POST", "/v1/transactions", "{'topic':'orders','txid':'t-delay',"
         "'body':1,'delay_ms':60000}", &r);
    expect_json(&r, 201);
    expect_shape(&r, prepared);
    res_free(&r);
    call(f, "POST", "/v1/transactions/t-delay/commit", NULL, &r);
    expect_json(&r, 200);
    expect_shape(&r, delayed);
    assert_string_equal(str(&r, "deliver_at"), "2026-11-25T13:15:02.123Z");
    res_free(&r);
}

/* ---- main ------------------------------------------------------------------------------------ */

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_kind_of_value_dumps_as_jansson_does),
        cmocka_unit_test(every_ascii_byte_in_a_string_escapes_as_jansson_does),
        cmocka_unit_test(random_trees_dump_as_jansson_does),
        cmocka_unit_test(invalid_utf8_is_refused_as_jansson_refuses_it),
        cmocka_unit_test(integers_and_flat_objects_are_written_as_jansson_does),
        cmocka_unit_test(uuid_and_time_values_match_their_json_t_forms),
        cmocka_unit_test(a_failed_buffer_gives_no_text),
        cmocka_unit_test(a_failed_allocation_gives_no_text),
        T(send_answers_are_the_json_t_bytes),
        T(transaction_answers_are_the_json_t_bytes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
