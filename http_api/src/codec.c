/*
 * codec.c - JSON <-> broker structs (see codec.h).
 *
 * The one file that knows jansson's reference rules in depth: values built
 * here are handed out as new references, json_object_set_new/ api_json_put
 * steal, and every error path drops what it made.  The routes only build
 * response objects with api_json_put and free them through the reply
 * helpers.
 *
 * Text out: api_json_dump writes trees without reals itself (api_jbuf,
 * "direct JSON text" below) and leaves reals to jansson; the hot routes'
 * fixed-shape answers are written with api_jbuf, no tree at all.  Both
 * give jansson's compact bytes exactly (tests/http_api/test_jbuf.c); they
 * exist because jansson's dump walks strings one code point at a time
 * through a callback (a 1 KiB body cost 6.7 us, now 0.3 us).
 *
 * Message body rules (docs/http-api.md, "Messages"):
 *   "body"         any JSON value, stored as compact JSON text, record flag
 *                  BRK_RECF_BODY_JSON; returned as the same JSON value.
 *   "body_base64"  bytes; returned as "body_base64" (standard base64 with
 *                  padding).  Exactly one of the two.
 * A flagged body that does not parse back (written by another producer) is
 * returned as body_base64 rather than failing the whole response.
 */
#include "codec.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- errors ------------------------------------------------------------------ */

static brk_status inval(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static brk_status inval(char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return BRK_INVAL;
}

/* Callers print err on every failure, out of memory included. */
static brk_status nomem(char *err, size_t errlen)
{
    if (err && errlen)
        snprintf(err, errlen, "out of memory");
    return BRK_NOMEM;
}

static char *dup_bytes(const void *p, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        if (n)
            memcpy(d, p, n);
        d[n] = 0;
    }
    return d;
}

/* ---- request objects --------------------------------------------------------- */

static json_t *load_any(const char *buf, size_t len, json_error_t *je)
{
    /* DECODE_ANY so a scalar gets "must be an object", not a parse error. */
    return json_loadb(buf ? buf : "", len,
                      JSON_DECODE_ANY | JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL,
                      je);
}

brk_status api_json_parse_object(const char *buf, size_t len, json_t **out,
                                 char *err, size_t errlen)
{
    json_error_t je;
    *out = NULL;
    json_t *v = load_any(buf, len, &je);
    /* Out of memory is not the client's fault (503, not 400), but jansson
     * reports a failed allocation inside a string or key as a syntax error
     * (and one in its lexer's setup with an empty text).  A second parse
     * tells them apart: a real syntax error fails again.  Only bodies that
     * failed are parsed twice. */
    if (!v && json_error_code(&je) != json_error_out_of_memory
        && je.text[0] != 0)
        v = load_any(buf, len, &je);
    if (!v && (json_error_code(&je) == json_error_out_of_memory
               || je.text[0] == 0))
        return nomem(err, errlen);
    if (!v)
        return inval(err, errlen, "request body is not valid JSON: %s "
                     "(line %d, column %d)", je.text, je.line, je.column);
    if (!json_is_object(v)) {
        json_decref(v);
        return inval(err, errlen, "request body must be a JSON object");
    }
    *out = v;
    return BRK_OK;
}

brk_status api_json_check_fields(const json_t *obj, const char *const *allowed,
                                 const char *prefix, char *err, size_t errlen)
{
    if (!obj)
        return BRK_OK;
    for (void *it = json_object_iter((json_t *)obj); it;
         it = json_object_iter_next((json_t *)obj, it)) {
        const char *k = json_object_iter_key(it);
        size_t kl = json_object_iter_key_len(it);
        bool known = false;
        for (size_t i = 0; allowed[i] && !known; i++)
            known = strlen(allowed[i]) == kl && memcmp(allowed[i], k, kl) == 0;
        if (!known)
            return inval(err, errlen, "unknown field '%s%.64s'", prefix, k);
    }
    return BRK_OK;
}

/* "in 1..256", or for the wide ranges of u32/i64 fields just the side
 * that matters ("must be >= 1"). */
static const char *range_text(int64_t lo, int64_t hi, bool over, char *buf,
                              size_t cap)
{
    if (hi < (int64_t)UINT32_MAX)
        snprintf(buf, cap, "in %lld..%lld", (long long)lo, (long long)hi);
    else if (over)
        snprintf(buf, cap, "<= %lld", (long long)hi);
    else
        snprintf(buf, cap, ">= %lld", (long long)lo);
    return buf;
}

brk_status api_json_int(const json_t *obj, const char *prefix,
                        const char *name, int64_t lo, int64_t hi,
                        int64_t *out, bool *present, char *err, size_t errlen)
{
    if (present)
        *present = false;
    json_t *v = obj ? json_object_get(obj, name) : NULL;
    if (!v)
        return BRK_OK;
    char rt[64];
    if (!json_is_integer(v))
        return inval(err, errlen, "field '%s%s' must be an integer %s",
                     prefix, name, range_text(lo, hi, false, rt, sizeof rt));
    json_int_t x = json_integer_value(v);
    if (x < lo || x > hi)
        return inval(err, errlen, "field '%s%s' must be %s", prefix, name,
                     range_text(lo, hi, x > hi, rt, sizeof rt));
    *out = (int64_t)x;
    if (present)
        *present = true;
    return BRK_OK;
}

brk_status api_json_bool(const json_t *obj, const char *prefix,
                         const char *name, bool *out, bool *present,
                         char *err, size_t errlen)
{
    if (present)
        *present = false;
    json_t *v = obj ? json_object_get(obj, name) : NULL;
    if (!v)
        return BRK_OK;
    if (!json_is_boolean(v))
        return inval(err, errlen, "field '%s%s' must be true or false",
                     prefix, name);
    *out = json_is_true(v);
    if (present)
        *present = true;
    return BRK_OK;
}

brk_status api_json_str(const json_t *obj, const char *prefix,
                        const char *name, size_t max, bool nonempty,
                        const char **out, size_t *len, bool *present,
                        char *err, size_t errlen)
{
    if (present)
        *present = false;
    json_t *v = obj ? json_object_get(obj, name) : NULL;
    if (!v)
        return BRK_OK;
    if (!json_is_string(v))
        return inval(err, errlen, "field '%s%s' must be a string", prefix,
                     name);
    size_t n = json_string_length(v);
    if (n > max)
        return inval(err, errlen, "field '%s%s' is longer than %zu bytes",
                     prefix, name, max);
    if (nonempty && n == 0)
        return inval(err, errlen, "field '%s%s' must not be empty", prefix,
                     name);
    *out = json_string_value(v);
    if (len)
        *len = n;
    if (present)
        *present = true;
    return BRK_OK;
}

brk_status api_json_cstr(const json_t *obj, const char *prefix,
                         const char *name, size_t max, bool nonempty,
                         const char **out, bool *present, char *err,
                         size_t errlen)
{
    size_t n = 0;
    const char *s = NULL;
    bool has = false;
    brk_status st = api_json_str(obj, prefix, name, max, nonempty, &s, &n,
                                 &has, err, errlen);
    if (st != BRK_OK)
        return st;
    if (has && strlen(s) != n)
        return inval(err, errlen, "field '%s%s' must not contain NUL "
                     "characters", prefix, name);
    if (has)
        *out = s;
    if (present)
        *present = has;
    return BRK_OK;
}

/* ---- message fields ---------------------------------------------------------- */

void api_msg_free(api_msg *m)
{
    if (!m)
        return;
    free(m->key);
    free(m->tag);
    free(m->props);
    free(m->body);
    memset(m, 0, sizeof *m);
}

static bool header_name_ok(const char *k, size_t n)
{
    if (n < 1 || n > 255)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)k[i] < 0x21 || (unsigned char)k[i] > 0x7e)
            return false;
    return true;
}

/* Collect the "headers" pairs as views into `h` (valid while h is). */
static brk_status headers_collect(json_t *h, brk_prop *pp, char *err,
                                  size_t errlen)
{
    size_t i = 0;
    for (void *it = json_object_iter(h); it;
         it = json_object_iter_next(h, it), i++) {
        const char *k = json_object_iter_key(it);
        size_t kl = json_object_iter_key_len(it);
        json_t *v = json_object_iter_value(it);
        if (!header_name_ok(k, kl))
            return inval(err, errlen, "field 'headers': name '%.64s' must "
                         "be 1..255 printable ASCII bytes", k);
        if (!json_is_string(v))
            return inval(err, errlen, "field 'headers.%s' must be a string",
                         k);
        if (json_string_length(v) > 65535)
            return inval(err, errlen, "field 'headers.%s' is longer than "
                         "65535 bytes", k);
        pp[i].key = (brk_bytes){ k, kl };
        pp[i].value = (brk_bytes){ json_string_value(v),
                                   json_string_length(v) };
    }
    return BRK_OK;
}

static brk_status parse_headers(const json_t *obj, api_msg *m, char *err,
                                size_t errlen)
{
    json_t *h = json_object_get(obj, "headers");
    if (!h)
        return BRK_OK;
    if (!json_is_object(h))
        return inval(err, errlen, "field 'headers' must be an object of "
                     "string values");
    size_t n = json_object_size(h);
    if (n == 0)
        return BRK_OK;
    /* Each pair takes at least 5 bytes encoded: more cannot fit. */
    if (n > BRK_PROPS_MAX / 5)
        return inval(err, errlen, "field 'headers' is larger than %u bytes "
                     "encoded", (unsigned)BRK_PROPS_MAX);
    brk_prop *pp = calloc(n, sizeof *pp);
    uint8_t *buf = malloc(BRK_PROPS_MAX);
    if (!pp || !buf) {
        free(pp);
        free(buf);
        return BRK_NOMEM;
    }
    brk_status st = headers_collect(h, pp, err, errlen);
    size_t len = 0;
    if (st == BRK_OK) {
        st = brk_props_encode(pp, n, buf, BRK_PROPS_MAX, &len);
        if (st == BRK_TOOBIG || st == BRK_RANGE)
            st = inval(err, errlen, "field 'headers' is larger than %u bytes "
                       "encoded", (unsigned)BRK_PROPS_MAX);
        else if (st != BRK_OK)
            st = inval(err, errlen, "field 'headers' is not a valid set of "
                       "headers");
    }
    free(pp);
    if (st != BRK_OK) {
        free(buf);
        return st;
    }
    m->props = buf;
    m->props_len = len;
    return BRK_OK;
}

static brk_status parse_body(const json_t *obj, api_msg *m, char *err,
                             size_t errlen)
{
    json_t *b = json_object_get(obj, "body");
    json_t *b64 = json_object_get(obj, "body_base64");
    if (b && b64)
        return inval(err, errlen, "fields 'body' and 'body_base64' are "
                     "mutually exclusive");
    if (!b && !b64)
        return inval(err, errlen, "one of the fields 'body' or "
                     "'body_base64' is required");
    if (b) {
        char *text = api_json_dump(b, &m->body_len);
        if (!text)
            return BRK_NOMEM;
        m->body = (uint8_t *)text;
        m->flags |= BRK_RECF_BODY_JSON;
        return BRK_OK;
    }
    if (!json_is_string(b64))
        return inval(err, errlen, "field 'body_base64' must be a string");
    brk_status st = api_base64_decode(json_string_value(b64),
                                      json_string_length(b64), &m->body,
                                      &m->body_len);
    if (st == BRK_INVAL)
        return inval(err, errlen, "field 'body_base64' is not valid base64 "
                     "(standard alphabet, with padding)");
    return st;
}

brk_status api_msg_parse(const json_t *obj, api_msg *m, char *err,
                         size_t errlen)
{
    memset(m, 0, sizeof *m);
    const char *s = NULL;
    size_t n = 0;
    bool has = false;
    brk_status st = api_json_str(obj, "", "key", BRK_KEY_MAX, false, &s, &n,
                                 &has, err, errlen);
    if (st == BRK_OK && has && n > 0 && !(m->key = dup_bytes(s, n)))
        st = BRK_NOMEM;
    m->key_len = m->key ? n : 0;
    if (st == BRK_OK)
        st = api_json_str(obj, "", "tag", BRK_TAG_MAX, false, &s, &n, &has,
                          err, errlen);
    if (st == BRK_OK && has && n > 0 && !(m->tag = dup_bytes(s, n)))
        st = BRK_NOMEM;
    m->tag_len = m->tag ? n : 0;
    if (st == BRK_OK)
        st = parse_headers(obj, m, err, errlen);
    if (st == BRK_OK)
        st = parse_body(obj, m, err, errlen);
    if (st == BRK_NOMEM)
        nomem(err, errlen);
    if (st != BRK_OK)
        api_msg_free(m);
    return st;
}

/* ---- responses ------------------------------------------------------------------ */

bool api_json_put(json_t *obj, const char *key, json_t *v)
{
    if (!v)
        return false;
    return json_object_set_new(obj, key, v) == 0;
}

static bool has_real(const json_t *v)
{
    if (json_is_real(v))
        return true;
    if (json_is_array(v)) {
        for (size_t i = 0; i < json_array_size(v); i++)
            if (has_real(json_array_get(v, i)))
                return true;
        return false;
    }
    if (json_is_object(v)) {
        const char *k;
        json_t *x;
        json_object_foreach((json_t *)v, k, x)
            if (has_real(x))
                return true;
    }
    return false;
}

/* The dump at `precision` if it reads back equal to v; NULL otherwise. */
static char *dump_exact(const json_t *v, int precision)
{
    char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY
                                | JSON_REAL_PRECISION(precision));
    if (!s)
        return NULL;
    json_t *back = json_loads(s, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
    bool same = back && json_equal(back, (json_t *)v);
    json_decref(back);
    if (!same) {
        free(s);
        return NULL;
    }
    return s;
}

/* Length of the valid UTF-8 sequence at p[avail] (RFC 3629), 0 if none. */
static size_t utf8_seq(const unsigned char *p, size_t avail)
{
    unsigned char c = p[0];
    size_t n;
    unsigned char lo = 0x80, hi = 0xbf;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        n = 2;
    else if (c >= 0xe0 && c <= 0xef)
        n = 3;
    else if (c >= 0xf0 && c <= 0xf4)
        n = 4;
    else
        return 0;
    if (c == 0xe0)
        lo = 0xa0;
    else if (c == 0xed)
        hi = 0x9f;
    else if (c == 0xf0)
        lo = 0x90;
    else if (c == 0xf4)
        hi = 0x8f;
    if (avail < n || p[1] < lo || p[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if (p[i] < 0x80 || p[i] > 0xbf)
            return 0;
    return n;
}

/* ---- direct JSON text --------------------------------------------------------- */

/* Deeper than jansson's parser goes (2048): a tree built otherwise is left
 * to jansson's dump, which also refuses cycles. */
#define JBUF_MAX_DEPTH 2100

/* The buffer comes from jansson's allocator, as json_dumps' text did (the
 * caller frees either with free()): an allocation failure injected there
 * reaches this writer too. */
static void *jb_alloc(size_t n)
{
    json_malloc_t m;
    json_free_t f;
    json_get_alloc_funcs(&m, &f);
    return m(n);
}

static void jb_release(void *p)
{
    json_malloc_t m;
    json_free_t f;
    json_get_alloc_funcs(&m, &f);
    f(p);
}

void api_jbuf_init(api_jbuf *b, size_t hint)
{
    b->cap = hint < 64 ? 64 : hint;
    b->len = 0;
    b->p = jb_alloc(b->cap);
    b->failed = b->p == NULL;
}

/* Room for n more bytes. */
static bool jb_room(api_jbuf *b, size_t n)
{
    if (b->failed)
        return false;
    if (b->cap - b->len >= n)
        return true;
    size_t nc = b->cap * 2 > b->len + n ? b->cap * 2 : b->len + n + 64;
    char *np = jb_alloc(nc);
    if (!np) {
        b->failed = true;
        return false;
    }
    memcpy(np, b->p, b->len);
    jb_release(b->p);
    b->p = np;
    b->cap = nc;
    return true;
}

static void jb_raw(api_jbuf *b, const void *s, size_t n)
{
    if (jb_room(b, n)) {
        memcpy(b->p + b->len, s, n);
        b->len += n;
    }
}

/* Does the 8-byte word hold a byte < 0x20, '"', '\\' or >= 0x80?  (Exact
 * for the word as a whole, which is all the caller asks.) */
static bool word_special(uint64_t x)
{
    const uint64_t ones = 0x0101010101010101u, highs = 0x8080808080808080u;
    uint64_t q = x ^ (ones * '"'), bs = x ^ (ones * '\\');
    uint64_t hit = ((x - ones * 0x20) & ~x) | ((q - ones) & ~q)
                   | ((bs - ones) & ~bs) | x;
    return (hit & highs) != 0;
}

/* Bytes from p[0] that go out as they are: printable ASCII but '"' and
 * '\\'.  8 at a time while none is special. */
static size_t plain_run(const unsigned char *p, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x;
        memcpy(&x, p + i, 8);
        if (word_special(x))
            break;
    }
    while (i < n && p[i] >= 0x20 && p[i] < 0x80 && p[i] != '"' && p[i] != '\\')
        i++;
    return i;
}

static size_t utf8_seq(const unsigned char *p, size_t avail);

/* The escape jansson writes for a control character. */
static void jb_control(api_jbuf *b, unsigned char ch)
{
    static const char hex[] = "0123456789ABCDEF";
    char e[6] = { '\\', 'u', '0', '0', hex[ch >> 4], hex[ch & 15] };
    const char *two = ch == '\b' ? "\\b" : ch == '\f' ? "\\f" : ch == '\n' ? "\\n"
                      : ch == '\r' ? "\\r" : ch == '\t' ? "\\t" : NULL;
    if (two)
        jb_raw(b, two, 2);
    else
        jb_raw(b, e, 6);
}

void api_jbuf_str(api_jbuf *b, const void *ptr, size_t n)
{
    const unsigned char *p = ptr ? ptr : (const unsigned char *)"";
    jb_raw(b, "\"", 1);
    size_t i = 0, from = 0;         /* p[from..i) goes out as it is */
    while (i < n && !b->failed) {
        i += plain_run(p + i, n - i);
        if (i == n)
            break;
        if (p[i] >= 0x80) {         /* non-ASCII goes out as it is */
            size_t sl = utf8_seq(p + i, n - i);
            if (!sl) {
                b->failed = true;   /* jansson will not write it either */
                return;
            }
            i += sl;
            continue;
        }
        jb_raw(b, p + from, i - from);
        if (p[i] == '"' || p[i] == '\\')
            jb_raw(b, p[i] == '"' ? "\\\"" : "\\\\", 2);
        else
            jb_control(b, p[i]);
        from = ++i;
    }
    jb_raw(b, p + from, i - from);
    jb_raw(b, "\"", 1);
}

void api_jbuf_int(api_jbuf *b, int64_t v)
{
    char d[24];
    size_t o = sizeof d;
    uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;
    do {
        d[--o] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        d[--o] = '-';
    jb_raw(b, d + o, sizeof d - o);
}

void api_jbuf_uuid(api_jbuf *b, const uint8_t id[BRK_UUID_LEN])
{
    char t[BRK_UUID_STR_LEN + 1];
    brk_uuid_format(id, t);
    api_jbuf_str(b, t, BRK_UUID_STR_LEN);
}

void api_jbuf_time(api_jbuf *b, int64_t ms)
{
    char t[API_TIME_LEN + 1];
    api_time_format(ms, t);
    api_jbuf_str(b, t, API_TIME_LEN);
}

void api_jbuf_key(api_jbuf *b, const char *key)
{
    jb_raw(b, b->len == 0 ? "{" : ",", 1);
    api_jbuf_str(b, key, strlen(key));
    jb_raw(b, ":", 1);
}

void api_jbuf_end(api_jbuf *b)
{
    if (b->len == 0)
        jb_raw(b, "{", 1);
    jb_raw(b, "}", 1);
}

/* One value, recursively; false when it holds a real or is too deep. */
static bool jb_value(api_jbuf *b, const json_t *v, int depth)
{
    if (depth > JBUF_MAX_DEPTH)
        return false;
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        jb_raw(b, "{", 1);
        for (void *it = json_object_iter((json_t *)v); it;) {
            api_jbuf_str(b, json_object_iter_key(it), json_object_iter_key_len(it));
            jb_raw(b, ":", 1);
            if (!jb_value(b, json_object_iter_value(it), depth + 1))
                return false;
            it = json_object_iter_next((json_t *)v, it);
            if (it)
                jb_raw(b, ",", 1);
        }
        jb_raw(b, "}", 1);
        return true;
    case JSON_ARRAY:
        jb_raw(b, "[", 1);
        for (size_t i = 0; i < json_array_size(v); i++) {
            if (i)
                jb_raw(b, ",", 1);
            if (!jb_value(b, json_array_get(v, i), depth + 1))
                return false;
        }
        jb_raw(b, "]", 1);
        return true;
    case JSON_STRING:
        api_jbuf_str(b, json_string_value(v), json_string_length(v));
        return true;
    case JSON_INTEGER:
        api_jbuf_int(b, (int64_t)json_integer_value(v));
        return true;
    case JSON_TRUE:
        jb_raw(b, "true", 4);
        return true;
    case JSON_FALSE:
        jb_raw(b, "false", 5);
        return true;
    case JSON_NULL:
        jb_raw(b, "null", 4);
        return true;
    case JSON_REAL:
    default:
        return false;
    }
}

bool api_jbuf_value(api_jbuf *b, const json_t *v)
{
    size_t mark = b->len;
    if (v && jb_value(b, v, 0))
        return true;
    b->len = b->failed ? b->len : mark;
    return false;
}

char *api_jbuf_take(api_jbuf *b, size_t *len)
{
    char *s = NULL;
    if (jb_room(b, 1)) {
        b->p[b->len] = 0;
        s = b->p;
        if (len)
            *len = b->len;
    } else {
        jb_release(b->p);
    }
    memset(b, 0, sizeof *b);
    return s;
}

char *api_json_dump(const json_t *v, size_t *len)
{
    if (!has_real(v)) {
        api_jbuf b;
        api_jbuf_init(&b, 256);
        bool done = api_jbuf_value(&b, v);
        char *s = api_jbuf_take(&b, len);
        if (done && s)
            return s;
        free(s);                    /* too deep, or failed: jansson decides */
    }
    char *s = NULL;
    if (has_real(v))
        for (int p = 15; p <= 16 && !s; p++)
            s = dump_exact(v, p);
    if (!s)
        s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY
                              | JSON_REAL_PRECISION(17));
    if (s && len)
        *len = strlen(s);   /* NULs inside strings are written as \u0000 */
    return s;
}

json_t *api_json_text(const void *ptr, size_t n)
{
    const unsigned char *p = ptr ? ptr : (const unsigned char *)"";
    size_t i = 0;
    while (i < n) {
        size_t k = utf8_seq(p + i, n - i);
        if (!k)
            break;
        i += k;
    }
    if (i == n)
        return json_stringn((const char *)p, n);
    /* Worst case every byte becomes the 3-byte U+FFFD. */
    unsigned char *buf = malloc(n * 3 + 1);
    if (!buf)
        return NULL;
    size_t o = 0;
    for (i = 0; i < n;) {
        size_t k = utf8_seq(p + i, n - i);
        if (k) {
            memcpy(buf + o, p + i, k);
            o += k;
            i += k;
        } else {
            memcpy(buf + o, "\xef\xbf\xbd", 3);
            o += 3;
            i++;
        }
    }
    json_t *s = json_stringn((const char *)buf, o);
    free(buf);
    return s;
}

json_t *api_json_time(int64_t ms, bool zero_is_null)
{
    if (zero_is_null && ms <= 0)
        return json_null();
    char t[API_TIME_LEN + 1];
    api_time_format(ms, t);
    return json_string(t);
}

json_t *api_json_uuid(const uint8_t id[BRK_UUID_LEN])
{
    char t[BRK_UUID_STR_LEN + 1];
    brk_uuid_format(id, t);
    return json_string(t);
}

static json_t *headers_json(brk_bytes block, const char *skip_prefix)
{
    json_t *h = json_object();
    if (!h)
        return NULL;
    size_t skip = skip_prefix ? strlen(skip_prefix) : 0;
    size_t pos = 0;
    brk_prop p;
    while (brk_props_next(block, &pos, &p) == BRK_OK) {
        if (skip && p.key.len >= skip && memcmp(p.key.ptr, skip_prefix, skip) == 0)
            continue;
        char *k = dup_bytes(p.key.ptr, p.key.len);
        bool ok = k && api_json_put(h, k, api_json_text(p.value.ptr,
                                                        p.value.len));
        free(k);
        if (!ok) {
            json_decref(h);
            return NULL;
        }
    }
    return h;
}

brk_status api_msg_to_json(json_t *obj, const brk_record *rec,
                           const char *skip_prefix)
{
    bool ok = api_json_put(obj, "key", api_json_text(rec->key.ptr,
                                                     rec->key.len))
              && api_json_put(obj, "tag", api_json_text(rec->tag.ptr,
                                                        rec->tag.len))
              && api_json_put(obj, "headers",
                              headers_json(rec->props, skip_prefix));
    if (!ok)
        return BRK_NOMEM;
    if (rec->flags & BRK_RECF_BODY_JSON) {
        json_t *v = json_loadb(rec->body.ptr ? rec->body.ptr : "",
                               rec->body.len,
                               JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
        if (v)
            return api_json_put(obj, "body", v) ? BRK_OK : BRK_NOMEM;
    }
    size_t n = 0;
    char *b64 = api_base64_encode(rec->body.ptr, rec->body.len, &n);
    ok = b64 && api_json_put(obj, "body_base64", json_stringn(b64, n));
    free(b64);
    return ok ? BRK_OK : BRK_NOMEM;
}

/* ---- base64 ------------------------------------------------------------------------ */

static const char B64[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

char *api_base64_encode(const void *ptr, size_t n, size_t *outlen)
{
    const uint8_t *p = ptr;
    size_t len = (n + 2) / 3 * 4;
    char *out = malloc(len + 1);
    if (!out)
        return NULL;
    size_t o = 0, i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];
        out[o++] = B64[v >> 18];
        out[o++] = B64[(v >> 12) & 63];
        out[o++] = B64[(v >> 6) & 63];
        out[o++] = B64[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)p[i] << 16;
        out[o++] = B64[v >> 18];
        out[o++] = B64[(v >> 12) & 63];
        out[o++] = '=';
        out[o++] = '=';
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8;
        out[o++] = B64[v >> 18];
        out[o++] = B64[(v >> 12) & 63];
        out[o++] = B64[(v >> 6) & 63];
        out[o++] = '=';
    }
    out[o] = 0;
    if (outlen)
        *outlen = o;
    return out;
}

static int b64_val(char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* Decode one 4-character group; pad = how many '=' end it (last group
 * only).  Returns the bytes written, or -1. */
static int b64_group(const char *s, bool last, uint8_t *o)
{
    int pad = 0;
    if (last && s[3] == '=')
        pad = s[2] == '=' ? 2 : 1;
    int v[4] = { 0, 0, 0, 0 };
    for (int i = 0; i < 4 - pad; i++)
        if ((v[i] = b64_val(s[i])) < 0)
            return -1;
    uint32_t x = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12
                 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
    /* Bits the padding drops must be zero: one canonical text per value. */
    if ((pad == 2 && (x & 0xffff)) || (pad == 1 && (x & 0xff)))
        return -1;
    o[0] = (uint8_t)(x >> 16);
    if (pad < 2)
        o[1] = (uint8_t)(x >> 8);
    if (pad < 1)
        o[2] = (uint8_t)x;
    return 3 - pad;
}

brk_status api_base64_decode(const char *s, size_t n, uint8_t **out,
                             size_t *outlen)
{
    *out = NULL;
    *outlen = 0;
    if (n % 4 != 0)
        return BRK_INVAL;
    uint8_t *buf = malloc(n / 4 * 3 + 1);
    if (!buf)
        return BRK_NOMEM;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 4) {
        int k = b64_group(s + i, i + 4 == n, buf + o);
        if (k < 0) {
            free(buf);
            return BRK_INVAL;
        }
        o += (size_t)k;
    }
    *out = buf;
    *outlen = o;
    return BRK_OK;
}

/* ---- RFC 3339 --------------------------------------------------------------------- */

/* Days since 1970-01-01 of a proleptic Gregorian date (era arithmetic, so
 * it holds for any year without a table). */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d)
{
    z += 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    *d = (unsigned)(doy - (153 * mp + 2) / 5 + 1);
    *m = (unsigned)(mp < 10 ? mp + 3 : mp - 9);
    *y = yoe + era * 400 + (*m <= 2);
}

static bool is_leap(int64_t y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

static unsigned days_in_month(int64_t y, unsigned m)
{
    static const unsigned dim[12] = { 31, 28, 31, 30, 31, 30,
                                      31, 31, 30, 31, 30, 31 };
    return m == 2 && is_leap(y) ? 29 : dim[m - 1];
}

/* Read exactly `n` digits at s[*i]. */
static bool digits(const char *s, size_t len, size_t *i, size_t n,
                   unsigned *out)
{
    if (*i + n > len)
        return false;
    unsigned v = 0;
    for (size_t k = 0; k < n; k++) {
        char c = s[*i + k];
        if (c < '0' || c > '9')
            return false;
        v = v * 10 + (unsigned)(c - '0');
    }
    *i += n;
    *out = v;
    return true;
}

static bool lit(const char *s, size_t len, size_t *i, char a, char b)
{
    if (*i >= len || (s[*i] != a && s[*i] != b))
        return false;
    (*i)++;
    return true;
}

/* The fraction after the seconds (none is fine), as milliseconds. */
static bool fraction(const char *s, size_t len, size_t *i, unsigned *ms)
{
    *ms = 0;
    if (*i >= len || s[*i] != '.')
        return true;
    (*i)++;
    size_t start = *i;
    unsigned scale = 100;
    while (*i < len && s[*i] >= '0' && s[*i] <= '9') {
        *ms += (unsigned)(s[*i] - '0') * scale;
        scale /= 10;
        (*i)++;
    }
    return *i > start;
}

/* "Z" or "+HH:MM" / "-HH:MM" at the end, as seconds east of UTC. */
static bool zone(const char *s, size_t len, size_t *i, int64_t *off_s)
{
    *off_s = 0;
    if (lit(s, len, i, 'Z', 'z'))
        return *i == len;
    if (*i >= len || (s[*i] != '+' && s[*i] != '-'))
        return false;
    int sign = s[*i] == '-' ? -1 : 1;
    (*i)++;
    unsigned oh, om;
    if (!digits(s, len, i, 2, &oh) || !lit(s, len, i, ':', ':')
        || !digits(s, len, i, 2, &om) || oh > 23 || om > 59)
        return false;
    *off_s = sign * (int64_t)(oh * 3600 + om * 60);
    return *i == len;
}

brk_status api_time_parse(const char *s, size_t len, int64_t *ms)
{
    size_t i = 0;
    unsigned y = 0, mo = 0, d = 0, h = 0, mi = 0, sec = 0, frac = 0;
    int64_t off = 0;
    if (!s || !digits(s, len, &i, 4, &y) || !lit(s, len, &i, '-', '-')
        || !digits(s, len, &i, 2, &mo) || !lit(s, len, &i, '-', '-')
        || !digits(s, len, &i, 2, &d) || !lit(s, len, &i, 'T', 't')
        || !digits(s, len, &i, 2, &h) || !lit(s, len, &i, ':', ':')
        || !digits(s, len, &i, 2, &mi) || !lit(s, len, &i, ':', ':')
        || !digits(s, len, &i, 2, &sec) || !fraction(s, len, &i, &frac)
        || !zone(s, len, &i, &off))
        return BRK_INVAL;
    if (mo < 1 || mo > 12 || d < 1 || d > days_in_month(y, mo) || h > 23
        || mi > 59 || sec > 60)     /* 60: a leap second, as the next one */
        return BRK_INVAL;
    int64_t days = days_from_civil(y, mo, d);
    int64_t secs = days * 86400 + h * 3600 + mi * 60 + sec - off;
    *ms = secs * 1000 + frac;
    return BRK_OK;
}

/* n decimal digits of v at p (v < 10^n). */
static void put_digits(char *p, unsigned v, int n)
{
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (char)('0' + v % 10);
        v /= 10;
    }
}

void api_time_format(int64_t ms, char out[API_TIME_LEN + 1])
{
    const int64_t lo = days_from_civil(0, 1, 1) * 86400000LL;
    const int64_t hi = days_from_civil(10000, 1, 1) * 86400000LL - 1;
    if (ms < lo)
        ms = lo;
    if (ms > hi)
        ms = hi;
    int64_t days = ms >= 0 ? ms / 86400000 : -((-ms + 86399999) / 86400000);
    unsigned rem = (unsigned)(ms - days * 86400000);
    int64_t y;
    unsigned m, d;
    civil_from_days(days, &y, &m, &d);
    memcpy(out, "0000-00-00T00:00:00.000Z", API_TIME_LEN + 1);
    put_digits(out, (unsigned)y, 4);
    put_digits(out + 5, m, 2);
    put_digits(out + 8, d, 2);
    put_digits(out + 11, rem / 3600000, 2);
    put_digits(out + 14, rem / 60000 % 60, 2);
    put_digits(out + 17, rem / 1000 % 60, 2);
    put_digits(out + 20, rem % 1000, 3);
}
