/*
 * test_codec.c - the HTTP API's JSON codec (http_api/src/codec.h): message
 * round trips (JSON and base64 bodies, key, tag, headers), every malformed
 * input the codec refuses and the field its reason names, base64 (RFC 4648
 * vectors and strictness), RFC 3339 parsing and formatting, the typed
 * field getters and the request-object checks.
 *
 * No store, no sockets: bytes and jansson values in, structs out.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"

/* ---- helpers ----------------------------------------------------------------- */

static json_t *obj(const char *text)
{
    json_error_t e;
    json_t *v = json_loads(text, JSON_ALLOW_NUL, &e);
    if (!v)
        fail_msg("bad test JSON %s: %s", text, e.text);
    return v;
}

/* Parse a message object; returns the status, reason in err. */
static brk_status parse(const char *text, api_msg *m, char *err, size_t cap)
{
    json_t *o = obj(text);
    err[0] = 0;
    brk_status st = api_msg_parse(o, m, err, cap);
    json_decref(o);
    return st;
}

/* The message parsed from `text` must be refused with a reason holding
 * `needle`. */
static void expect_refused(const char *text, const char *needle)
{
    api_msg m;
    char err[256];
    brk_status st = parse(text, &m, err, sizeof err);
    if (st != BRK_INVAL)
        fail_msg("%s: status %s, want INVAL", text, brk_status_name(st));
    if (!strstr(err, needle))
        fail_msg("%s: reason '%s' lacks '%s'", text, err, needle);
    assert_null(m.body);
    assert_null(m.key);
    assert_null(m.props);
}

/* A record view over a parsed message (as the store would return it). */
static brk_record rec_of(const api_msg *m)
{
    brk_record r;
    memset(&r, 0, sizeof r);
    r.key = (brk_bytes){ m->key, m->key_len };
    r.tag = (brk_bytes){ m->tag, m->tag_len };
    r.props = (brk_bytes){ m->props, m->props_len };
    r.body = (brk_bytes){ m->body, m->body_len };
    r.flags = m->flags;
    return r;
}

/* Parse `in`, encode it back, return the response object. */
static json_t *round_trip(const char *in)
{
    api_msg m;
    char err[256];
    brk_status st = parse(in, &m, err, sizeof err);
    if (st != BRK_OK)
        fail_msg("%s: %s (%s)", in, brk_status_name(st), err);
    brk_record r = rec_of(&m);
    json_t *out = json_object();
    assert_int_equal(api_msg_to_json(out, &r, NULL), BRK_OK);
    api_msg_free(&m);
    return out;
}

/* ---- message round trips ---------------------------------------------------------- */

static void json_body_round_trips_as_the_same_value(void **state)
{
    (void)state;
    const char *in = "{\"key\":\"order-1\",\"tag\":\"paid\","
                     "\"headers\":{\"traceparent\":\"00-abc-def-01\",\"x\":\"\"},"
                     "\"body\":{\"id\":42,\"lines\":[{\"sku\":\"a\",\"qty\":2}],"
                     "\"note\":null,\"ok\":true,\"name\":\"Zo\\u00eb \\ud834\\udd1e\"}}";
    json_t *want = obj(in);
    json_t *got = round_trip(in);
    assert_true(json_equal(json_object_get(got, "body"),
                           json_object_get(want, "body")));
    assert_true(json_equal(json_object_get(got, "headers"),
                           json_object_get(want, "headers")));
    assert_string_equal(json_string_value(json_object_get(got, "key")), "order-1");
    assert_string_equal(json_string_value(json_object_get(got, "tag")), "paid");
    assert_null(json_object_get(got, "body_base64"));
    json_decref(want);
    json_decref(got);
}

static void json_body_is_stored_compact_and_flagged(void **state)
{
    (void)state;
    api_msg m;
    char err[256];
    assert_int_equal(parse("{\"body\": { \"a\" : [ 1 , 2 ] , \"b\" : \"x\" }}",
                           &m, err, sizeof err), BRK_OK);
    assert_int_equal(m.flags, BRK_RECF_BODY_JSON);
    assert_int_equal(m.body_len, strlen("{\"a\":[1,2],\"b\":\"x\"}"));
    assert_memory_equal(m.body, "{\"a\":[1,2],\"b\":\"x\"}", m.body_len);
    api_msg_free(&m);
}

static void json_body_null_and_scalars_are_bodies(void **state)
{
    (void)state;
    static const char *const cases[][2] = {
        { "{\"body\":null}", "null" },
        { "{\"body\":true}", "true" },
        { "{\"body\":\"s\"}", "\"s\"" },
        { "{\"body\":-7}", "-7" },
        { "{\"body\":[]}", "[]" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        api_msg m;
        char err[256];
        assert_int_equal(parse(cases[i][0], &m, err, sizeof err), BRK_OK);
        assert_int_equal(m.body_len, strlen(cases[i][1]));
        assert_memory_equal(m.body, cases[i][1], m.body_len);
        assert_int_equal(m.flags, BRK_RECF_BODY_JSON);
        api_msg_free(&m);
    }
}

static void json_body_reals_keep_their_shortest_exact_form(void **state)
{
    (void)state;
    static const char *const cases[][2] = {
        { "{\"body\":0.1}", "0.1" },
        { "{\"body\":[12.5,-7.25]}", "[12.5,-7.25]" },
        { "{\"body\":1e300}", "1e300" },
        { "{\"body\":0.30000000000000004}", "0.30000000000000004" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        api_msg m;
        char err[256];
        assert_int_equal(parse(cases[i][0], &m, err, sizeof err), BRK_OK);
        char *got = strndup((const char *)m.body, m.body_len);
        if (strcmp(got, cases[i][1]) != 0)
            fail_msg("%s stored as %s, want %s", cases[i][0], got, cases[i][1]);
        free(got);
        api_msg_free(&m);
    }
}

static void json_string_body_with_nul_round_trips(void **state)
{
    (void)state;
    json_t *got = round_trip("{\"body\":\"a\\u0000b\"}");
    json_t *b = json_object_get(got, "body");
    assert_true(json_is_string(b));
    assert_int_equal(json_string_length(b), 3);
    assert_memory_equal(json_string_value(b), "a\0b", 3);
    json_decref(got);
}

static void base64_body_round_trips_bytes(void **state)
{
    (void)state;
    /* 00 ff 10 80 41 */
    api_msg m;
    char err[256];
    assert_int_equal(parse("{\"body_base64\":\"AP8QgEE=\"}", &m, err, sizeof err),
                     BRK_OK);
    assert_int_equal(m.flags, 0);
    assert_int_equal(m.body_len, 5);
    assert_memory_equal(m.body, "\x00\xff\x10\x80\x41", 5);
    brk_record r = rec_of(&m);
    json_t *out = json_object();
    assert_int_equal(api_msg_to_json(out, &r, NULL), BRK_OK);
    assert_null(json_object_get(out, "body"));
    assert_string_equal(json_string_value(json_object_get(out, "body_base64")),
                        "AP8QgEE=");
    json_decref(out);
    api_msg_free(&m);
}

static void empty_base64_body_is_an_empty_body(void **state)
{
    (void)state;
    json_t *got = round_trip("{\"body_base64\":\"\"}");
    assert_string_equal(json_string_value(json_object_get(got, "body_base64")), "");
    json_decref(got);
}

static void flagged_body_that_does_not_parse_comes_back_as_base64(void **state)
{
    (void)state;
    brk_record r;
    memset(&r, 0, sizeof r);
    r.flags = BRK_RECF_BODY_JSON;
    r.body = (brk_bytes){ "{oops", 5 };
    json_t *out = json_object();
    assert_int_equal(api_msg_to_json(out, &r, NULL), BRK_OK);
    assert_null(json_object_get(out, "body"));
    assert_string_equal(json_string_value(json_object_get(out, "body_base64")),
                        "e29vcHM=");
    json_decref(out);
}

static void absent_key_tag_headers_come_back_empty(void **state)
{
    (void)state;
    json_t *got = round_trip("{\"body\":1}");
    assert_string_equal(json_string_value(json_object_get(got, "key")), "");
    assert_string_equal(json_string_value(json_object_get(got, "tag")), "");
    assert_true(json_is_object(json_object_get(got, "headers")));
    assert_int_equal(json_object_size(json_object_get(got, "headers")), 0);
    json_decref(got);
}

static void invalid_utf8_in_a_record_becomes_replacement_chars(void **state)
{
    (void)state;
    brk_record r;
    memset(&r, 0, sizeof r);
    r.key = (brk_bytes){ "a\xff" "b\xc0\xaf", 5 };     /* bad byte, overlong */
    r.tag = (brk_bytes){ "\xed\xa0\x80", 3 };          /* a surrogate */
    json_t *out = json_object();
    assert_int_equal(api_msg_to_json(out, &r, NULL), BRK_OK);
    assert_string_equal(json_string_value(json_object_get(out, "key")),
                        "a\xef\xbf\xbd" "b\xef\xbf\xbd\xef\xbf\xbd");
    assert_string_equal(json_string_value(json_object_get(out, "tag")),
                        "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
    char *dump = json_dumps(out, 0);
    assert_non_null(dump);                /* the whole object is valid JSON */
    free(dump);
    json_decref(out);
}

static void headers_with_the_skip_prefix_are_left_out(void **state)
{
    (void)state;
    api_msg m;
    char err[256];
    assert_int_equal(parse("{\"headers\":{\"outboxd-dlq-topic\":\"t\","
                           "\"keep\":\"v\"},\"body\":1}", &m, err, sizeof err),
                     BRK_OK);
    brk_record r = rec_of(&m);
    json_t *out = json_object();
    assert_int_equal(api_msg_to_json(out, &r, "outboxd-dlq-"), BRK_OK);
    json_t *h = json_object_get(out, "headers");
    assert_int_equal(json_object_size(h), 1);
    assert_string_equal(json_string_value(json_object_get(h, "keep")), "v");
    json_decref(out);
    api_msg_free(&m);
}

static void key_and_tag_at_their_limits_are_accepted(void **state)
{
    (void)state;
    char *in = malloc(2000);
    char key[BRK_KEY_MAX + 1], tag[BRK_TAG_MAX + 1];
    memset(key, 'k', BRK_KEY_MAX);
    key[BRK_KEY_MAX] = 0;
    memset(tag, 't', BRK_TAG_MAX);
    tag[BRK_TAG_MAX] = 0;
    snprintf(in, 2000, "{\"key\":\"%s\",\"tag\":\"%s\",\"body\":1}", key, tag);
    api_msg m;
    char err[256];
    assert_int_equal(parse(in, &m, err, sizeof err), BRK_OK);
    assert_int_equal(m.key_len, BRK_KEY_MAX);
    assert_int_equal(m.tag_len, BRK_TAG_MAX);
    api_msg_free(&m);
    free(in);
}

/* ---- malformed messages ------------------------------------------------------------- */

static void both_body_fields_are_refused(void **state)
{
    (void)state;
    expect_refused("{\"body\":1,\"body_base64\":\"AA==\"}", "mutually exclusive");
}

static void neither_body_field_is_refused(void **state)
{
    (void)state;
    expect_refused("{\"key\":\"k\"}", "'body' or 'body_base64' is required");
}

static void bad_base64_is_refused_naming_the_field(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "{\"body_base64\":\"AAA\"}",       /* not a multiple of 4 */
        "{\"body_base64\":\"AA=A\"}",      /* '=' inside */
        "{\"body_base64\":\"A===\"}",      /* too much padding */
        "{\"body_base64\":\"====\"}",
        "{\"body_base64\":\"AB==\"}",      /* unused bits set */
        "{\"body_base64\":\"AAB=\"}",
        "{\"body_base64\":\"AA==AA==\"}",  /* padding before the end */
        "{\"body_base64\":\"A-_A\"}",      /* URL alphabet */
        "{\"body_base64\":\"AA A\"}",      /* whitespace */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_refused(bad[i], "field 'body_base64' is not valid base64");
    expect_refused("{\"body_base64\":12}", "field 'body_base64' must be a string");
}

static void non_string_header_values_are_refused(void **state)
{
    (void)state;
    expect_refused("{\"headers\":{\"n\":1},\"body\":1}",
                   "field 'headers.n' must be a string");
    expect_refused("{\"headers\":{\"n\":null},\"body\":1}",
                   "field 'headers.n' must be a string");
    expect_refused("{\"headers\":{\"n\":{}},\"body\":1}",
                   "field 'headers.n' must be a string");
    expect_refused("{\"headers\":[\"a\"],\"body\":1}",
                   "field 'headers' must be an object");
}

static void bad_header_names_are_refused(void **state)
{
    (void)state;
    expect_refused("{\"headers\":{\"\":\"v\"},\"body\":1}", "field 'headers': name");
    expect_refused("{\"headers\":{\"a b\":\"v\"},\"body\":1}", "name 'a b'");
    expect_refused("{\"headers\":{\"a\\u0001\":\"v\"},\"body\":1}", "printable");
    char in[600], name[257];
    memset(name, 'n', 256);
    name[256] = 0;
    snprintf(in, sizeof in, "{\"headers\":{\"%s\":\"v\"},\"body\":1}", name);
    expect_refused(in, "1..255 printable");
}

static void oversized_key_tag_and_headers_are_refused(void **state)
{
    (void)state;
    char *in = malloc(140000);
    char *big = malloc(70000);
    memset(big, 'x', 69999);
    big[BRK_KEY_MAX + 1] = 0;
    snprintf(in, 140000, "{\"key\":\"%s\",\"body\":1}", big);
    expect_refused(in, "field 'key' is longer than 1024 bytes");
    big[BRK_TAG_MAX + 1] = 0;
    snprintf(in, 140000, "{\"tag\":\"%s\",\"body\":1}", big);
    expect_refused(in, "field 'tag' is longer than 255 bytes");
    memset(big, 'x', 69999);
    big[65536] = 0;
    snprintf(in, 140000, "{\"headers\":{\"h\":\"%s\"},\"body\":1}", big);
    expect_refused(in, "field 'headers.h' is longer than 65535 bytes");
    /* Two values that fit alone but not together. */
    big[40000] = 0;
    snprintf(in, 140000, "{\"headers\":{\"a\":\"%s\",\"b\":\"%s\"},\"body\":1}",
             big, big);
    expect_refused(in, "field 'headers' is larger than 65535 bytes encoded");
    free(big);
    free(in);
}

static void non_string_key_and_tag_are_refused(void **state)
{
    (void)state;
    expect_refused("{\"key\":7,\"body\":1}", "field 'key' must be a string");
    expect_refused("{\"tag\":[],\"body\":1}", "field 'tag' must be a string");
}

/* ---- request objects and field getters ------------------------------------------------- */

static void request_body_must_be_a_json_object(void **state)
{
    (void)state;
    json_t *o;
    char err[256];
    assert_int_equal(api_json_parse_object("[1]", 3, &o, err, sizeof err),
                     BRK_INVAL);
    assert_null(o);
    assert_non_null(strstr(err, "must be a JSON object"));
    assert_int_equal(api_json_parse_object("42", 2, &o, err, sizeof err),
                     BRK_INVAL);
    assert_non_null(strstr(err, "must be a JSON object"));
    assert_int_equal(api_json_parse_object("{\"a\":", 5, &o, err, sizeof err),
                     BRK_INVAL);
    assert_non_null(strstr(err, "not valid JSON"));
    assert_non_null(strstr(err, "line 1"));
    assert_int_equal(api_json_parse_object("{\"a\":1,\"a\":2}", 13, &o, err,
                                           sizeof err), BRK_INVAL);
    assert_non_null(strstr(err, "not valid JSON"));
    const char *nul = "{\"a\":\"\\u0000\"}";
    assert_int_equal(api_json_parse_object(nul, strlen(nul), &o, err, sizeof err),
                     BRK_OK);
    json_decref(o);
}

static void unknown_fields_are_named_with_their_prefix(void **state)
{
    (void)state;
    static const char *const allowed[] = { "interval_ms", "max_checks", NULL };
    json_t *o = obj("{\"interval_ms\":1,\"intervall_ms\":2}");
    char err[256];
    assert_int_equal(api_json_check_fields(o, allowed, "check.", err, sizeof err),
                     BRK_INVAL);
    assert_string_equal(err, "unknown field 'check.intervall_ms'");
    json_decref(o);
    o = obj("{\"max_checks\":1}");
    assert_int_equal(api_json_check_fields(o, allowed, "", err, sizeof err), BRK_OK);
    json_decref(o);
}

static void integer_fields_check_type_and_range(void **state)
{
    (void)state;
    json_t *o = obj("{\"interval_ms\":0,\"max\":300,\"f\":1.5,\"s\":\"1\",\"ok\":7}");
    char err[256];
    int64_t v = -1;
    bool has = true;
    assert_int_equal(api_json_int(o, "check.", "interval_ms", 1, INT64_MAX, &v,
                                  &has, err, sizeof err), BRK_INVAL);
    assert_string_equal(err, "field 'check.interval_ms' must be >= 1");
    assert_int_equal(api_json_int(o, "", "max", 1, 256, &v, &has, err, sizeof err),
                     BRK_INVAL);
    assert_string_equal(err, "field 'max' must be in 1..256");
    assert_int_equal(api_json_int(o, "", "f", 0, 9, &v, &has, err, sizeof err),
                     BRK_INVAL);
    assert_string_equal(err, "field 'f' must be an integer in 0..9");
    assert_int_equal(api_json_int(o, "", "s", 0, 9, &v, &has, err, sizeof err),
                     BRK_INVAL);
    assert_int_equal(api_json_int(o, "", "ok", 0, 9, &v, &has, err, sizeof err),
                     BRK_OK);
    assert_true(has);
    assert_int_equal(v, 7);
    v = 99;
    assert_int_equal(api_json_int(o, "", "absent", 0, 9, &v, &has, err,
                                  sizeof err), BRK_OK);
    assert_false(has);
    assert_int_equal(v, 99);
    json_decref(o);
}

static void string_and_bool_fields_check_type_and_length(void **state)
{
    (void)state;
    json_t *o = obj("{\"s\":\"abcd\",\"e\":\"\",\"b\":true,\"n\":null}");
    char err[256];
    const char *s;
    size_t n;
    bool has, b = false;
    assert_int_equal(api_json_str(o, "", "s", 3, false, &s, &n, &has, err,
                                  sizeof err), BRK_INVAL);
    assert_string_equal(err, "field 's' is longer than 3 bytes");
    assert_int_equal(api_json_str(o, "", "e", 3, true, &s, &n, &has, err,
                                  sizeof err), BRK_INVAL);
    assert_string_equal(err, "field 'e' must not be empty");
    assert_int_equal(api_json_str(o, "", "n", 3, false, &s, &n, &has, err,
                                  sizeof err), BRK_INVAL);
    assert_string_equal(err, "field 'n' must be a string");
    assert_int_equal(api_json_str(o, "", "s", 4, true, &s, &n, &has, err,
                                  sizeof err), BRK_OK);
    assert_string_equal(s, "abcd");
    assert_int_equal(api_json_bool(o, "", "b", &b, &has, err, sizeof err), BRK_OK);
    assert_true(b);
    assert_int_equal(api_json_bool(o, "", "s", &b, &has, err, sizeof err),
                     BRK_INVAL);
    assert_string_equal(err, "field 's' must be true or false");
    json_decref(o);
}

/* Values used as C strings must not carry a NUL: "b\u0000x" read up to
 * the NUL would silently be "b". */
static void cstr_fields_refuse_an_embedded_nul(void **state)
{
    (void)state;
    json_t *o = obj("{\"f\":\"b\\u0000x\",\"g\":\"b\",\"h\":\"\"}");
    char err[256];
    const char *s = NULL;
    bool has = true;
    assert_int_equal(api_json_cstr(o, "x.", "f", 16, true, &s, &has, err,
                                   sizeof err), BRK_INVAL);
    assert_string_equal(err, "field 'x.f' must not contain NUL characters");
    assert_null(s);
    assert_int_equal(api_json_cstr(o, "", "g", 16, true, &s, &has, err,
                                   sizeof err), BRK_OK);
    assert_true(has);
    assert_string_equal(s, "b");
    assert_int_equal(api_json_cstr(o, "", "h", 16, true, &s, &has, err,
                                   sizeof err), BRK_INVAL);
    assert_int_equal(api_json_cstr(o, "", "absent", 16, true, &s, &has, err,
                                   sizeof err), BRK_OK);
    assert_false(has);
    json_decref(o);
}

/* jansson allocations left before one fails; -1: none (see below). */
static long oom_left = -1;

static void *oom_malloc(size_t n)
{
    if (oom_left == 0) {
        oom_left = -1;
        return NULL;
    }
    if (oom_left > 0)
        oom_left--;
    return malloc(n);
}

/* Callers print the reason on every failure ("%s", err), so a failure
 * from a lack of memory must write one too, not leave stack garbage. */
static void out_of_memory_still_writes_a_reason(void **state)
{
    (void)state;
    const char *text = "{\"key\":\"k\",\"headers\":{\"h\":\"v\"},"
                       "\"body\":{\"a\":[1,2.5,\"x\"]}}";
    json_t *o = obj(text);
    json_set_alloc_funcs(oom_malloc, free);
    for (long nth = 0; nth < 1000; nth++) {
        char err[64];
        memset(err, 'X', sizeof err);
        api_msg m;
        oom_left = nth;
        brk_status st = api_msg_parse(o, &m, err, sizeof err);
        bool hit = oom_left == -1;
        oom_left = -1;
        if (st == BRK_OK)
            api_msg_free(&m);
        else
            assert_non_null(memchr(err, 0, sizeof err));
        memset(err, 'X', sizeof err);
        json_t *v = NULL;
        oom_left = nth;
        st = api_json_parse_object(text, strlen(text), &v, err, sizeof err);
        hit = hit || oom_left == -1;
        oom_left = -1;
        if (st == BRK_OK)
            json_decref(v);
        else
            assert_non_null(memchr(err, 0, sizeof err));
        if (!hit)
            break;
    }
    json_set_alloc_funcs(malloc, free);
    json_decref(o);
}

/* ---- base64 ---------------------------------------------------------------------------- */

static void base64_matches_rfc4648_vectors(void **state)
{
    (void)state;
    static const char *const v[][2] = {
        { "", "" }, { "f", "Zg==" }, { "fo", "Zm8=" }, { "foo", "Zm9v" },
        { "foob", "Zm9vYg==" }, { "fooba", "Zm9vYmE=" }, { "foobar", "Zm9vYmFy" },
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        size_t n = 99;
        char *e = api_base64_encode(v[i][0], strlen(v[i][0]), &n);
        assert_string_equal(e, v[i][1]);
        assert_int_equal(n, strlen(v[i][1]));
        uint8_t *d;
        size_t dl;
        assert_int_equal(api_base64_decode(e, n, &d, &dl), BRK_OK);
        assert_int_equal(dl, strlen(v[i][0]));
        assert_memory_equal(d, v[i][0], dl);
        free(d);
        free(e);
    }
}

static void base64_round_trips_every_byte_value(void **state)
{
    (void)state;
    uint8_t all[256];
    for (int i = 0; i < 256; i++)
        all[i] = (uint8_t)i;
    for (size_t len = 0; len <= 256; len += 37) {
        size_t n;
        char *e = api_base64_encode(all, len, &n);
        uint8_t *d;
        size_t dl;
        assert_int_equal(api_base64_decode(e, n, &d, &dl), BRK_OK);
        assert_int_equal(dl, len);
        if (len)
            assert_memory_equal(d, all, len);
        free(d);
        free(e);
    }
}

/* ---- RFC 3339 ------------------------------------------------------------------------------ */

static void times_are_formatted_in_utc_with_milliseconds(void **state)
{
    (void)state;
    char t[API_TIME_LEN + 1];
    api_time_format(0, t);
    assert_string_equal(t, "1970-01-01T00:00:00.000Z");
    api_time_format(1795612442123LL, t);
    assert_string_equal(t, "2026-11-25T13:14:02.123Z");
    api_time_format(1709251199999LL, t);
    assert_string_equal(t, "2024-02-29T23:59:59.999Z");
    api_time_format(-1, t);
    assert_string_equal(t, "1969-12-31T23:59:59.999Z");
    api_time_format(253402300799999LL, t);
    assert_string_equal(t, "9999-12-31T23:59:59.999Z");
    api_time_format(INT64_MAX, t);
    assert_string_equal(t, "9999-12-31T23:59:59.999Z");
}

static void time_parse_accepts_offsets_fractions_and_lower_case(void **state)
{
    (void)state;
    static const struct {
        const char *s;
        int64_t ms;
    } ok[] = {
        { "2026-11-25T13:14:02.123Z", 1795612442123LL },
        { "2026-11-25T13:14:02Z", 1795612442000LL },
        { "2026-11-25t13:14:02.123z", 1795612442123LL },
        { "2026-11-25T14:14:02.123+01:00", 1795612442123LL },
        { "2026-11-25T12:44:02.123-00:30", 1795612442123LL },
        { "2026-11-25T13:14:02.1239999Z", 1795612442123LL },
        { "2026-11-25T13:14:02.5Z", 1795612442500LL },
        { "2026-11-25T13:14:02-00:00", 1795612442000LL },
        { "2024-02-29T23:59:59.999Z", 1709251199999LL },
        { "1970-01-01T00:00:00Z", 0 },
        { "1969-12-31T23:59:59.999Z", -1 },
        { "2000-02-29T00:00:00Z", 951782400000LL },
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        int64_t ms = 0;
        if (api_time_parse(ok[i].s, strlen(ok[i].s), &ms) != BRK_OK)
            fail_msg("%s refused", ok[i].s);
        if (ms != ok[i].ms)
            fail_msg("%s -> %lld, want %lld", ok[i].s, (long long)ms,
                     (long long)ok[i].ms);
    }
}

static void time_parse_refuses_malformed_and_impossible_times(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "", "2026-11-25", "2026-11-25T13:14:02", "2026-11-25 13:14:02Z",
        "2026-11-25T13:14Z", "2026-1-25T13:14:02Z", "2026-13-01T00:00:00Z",
        "2026-00-01T00:00:00Z", "2026-02-30T00:00:00Z", "2100-02-29T00:00:00Z",
        "2026-04-31T00:00:00Z", "2026-11-25T24:00:00Z", "2026-11-25T13:60:00Z",
        "2026-11-25T13:14:61Z", "2026-11-25T13:14:02.Z", "2026-11-25T13:14:02ZZ",
        "2026-11-25T13:14:02+0100", "2026-11-25T13:14:02+24:00",
        "2026-11-25T13:14:02+01:60", "2026-11-25T13:14:02 Z", "+2026-11-25T13:14:02Z",
        "2026-11-25T13:14:02.123Zjunk", "now",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int64_t ms = 0;
        if (api_time_parse(bad[i], strlen(bad[i]), &ms) != BRK_INVAL)
            fail_msg("'%s' accepted as %lld", bad[i], (long long)ms);
    }
}

static void formatted_times_parse_back(void **state)
{
    (void)state;
    for (int64_t ms = -86400000LL * 800; ms < 86400000LL * 365 * 500;
         ms += 86400000LL * 97 + 3600007) {
        char t[API_TIME_LEN + 1];
        api_time_format(ms, t);
        int64_t back = 0;
        assert_int_equal(api_time_parse(t, strlen(t), &back), BRK_OK);
        if (back != ms)
            fail_msg("%lld -> %s -> %lld", (long long)ms, t, (long long)back);
    }
}

static void text_values_keep_valid_utf8_and_nul(void **state)
{
    (void)state;
    json_t *s = api_json_text("a\0\xe6\x97\xa5\xf0\x9d\x84\x9e", 9);
    assert_non_null(s);
    assert_int_equal(json_string_length(s), 9);
    assert_memory_equal(json_string_value(s), "a\0\xe6\x97\xa5\xf0\x9d\x84\x9e", 9);
    json_decref(s);
    s = api_json_text("\xf4\x90\x80\x80", 4);      /* above U+10FFFF */
    assert_int_equal(json_string_length(s), 12);
    json_decref(s);
    s = api_json_text("\xe6\x97", 2);               /* cut sequence */
    assert_string_equal(json_string_value(s), "\xef\xbf\xbd\xef\xbf\xbd");
    json_decref(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(json_body_round_trips_as_the_same_value),
        cmocka_unit_test(json_body_is_stored_compact_and_flagged),
        cmocka_unit_test(json_body_null_and_scalars_are_bodies),
        cmocka_unit_test(json_body_reals_keep_their_shortest_exact_form),
        cmocka_unit_test(json_string_body_with_nul_round_trips),
        cmocka_unit_test(base64_body_round_trips_bytes),
        cmocka_unit_test(empty_base64_body_is_an_empty_body),
        cmocka_unit_test(flagged_body_that_does_not_parse_comes_back_as_base64),
        cmocka_unit_test(absent_key_tag_headers_come_back_empty),
        cmocka_unit_test(invalid_utf8_in_a_record_becomes_replacement_chars),
        cmocka_unit_test(headers_with_the_skip_prefix_are_left_out),
        cmocka_unit_test(key_and_tag_at_their_limits_are_accepted),
        cmocka_unit_test(both_body_fields_are_refused),
        cmocka_unit_test(neither_body_field_is_refused),
        cmocka_unit_test(bad_base64_is_refused_naming_the_field),
        cmocka_unit_test(non_string_header_values_are_refused),
        cmocka_unit_test(bad_header_names_are_refused),
        cmocka_unit_test(oversized_key_tag_and_headers_are_refused),
        cmocka_unit_test(non_string_key_and_tag_are_refused),
        cmocka_unit_test(request_body_must_be_a_json_object),
        cmocka_unit_test(unknown_fields_are_named_with_their_prefix),
        cmocka_unit_test(integer_fields_check_type_and_range),
        cmocka_unit_test(string_and_bool_fields_check_type_and_length),
        cmocka_unit_test(cstr_fields_refuse_an_embedded_nul),
        cmocka_unit_test(out_of_memory_still_writes_a_reason),
        cmocka_unit_test(base64_matches_rfc4648_vectors),
        cmocka_unit_test(base64_round_trips_every_byte_value),
        cmocka_unit_test(times_are_formatted_in_utc_with_milliseconds),
        cmocka_unit_test(time_parse_accepts_offsets_fractions_and_lower_case),
        cmocka_unit_test(time_parse_refuses_malformed_and_impossible_times),
        cmocka_unit_test(formatted_times_parse_back),
        cmocka_unit_test(text_values_keep_valid_utf8_and_nul),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
