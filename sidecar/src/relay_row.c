/*
 * relay_row.c - a row of outbox.messages into a message (relay_row.h; the
 * relay itself is relay.c).
 *
 * Mapping (relay.h): topic, key, tag as they are; msg_id is the row's
 * uuid; born_ms its created_at.  Headers, a JSON object of strings, are
 * checked with the HTTP API's rules (names 1..255 printable ASCII bytes,
 * string values of at most 65535 bytes, at most BRK_PROPS_MAX bytes
 * encoded) and encoded as properties.  body (jsonb) is parsed with jansson
 * and dumped compactly with the same flags and real precision rule as the
 * HTTP API, so the stored bytes equal what POST .../messages stores for
 * the same JSON value (jsonb orders object keys by length, then bytes, and
 * drops duplicates; what it gives is what is compacted).  jsonb prints
 * every number in plain decimal, so 1e20 comes back as
 * 100000000000000000000, an integer jansson cannot hold: widen_numbers
 * rewrites such an integer as the double the HTTP API makes of 1e20 when
 * that is the very same number, and refuses the row otherwise (its value
 * would change).  A body or headers the HTTP API would refuse is refused
 * here too.  body_bytes is stored as it is.
 *
 * Rejected rows go to "__relay_rejected" with the row's msg_id, key, tag,
 * born time and body (the compact JSON when there is one, else the raw
 * text or bytes), and properties "reason", "topic" (the row's topic) and
 * "headers" (the row's headers as JSON text, so nothing is lost and no user
 * header can collide with ours).  When even that is refused (a body over
 * the store's limit), the body and headers are left out and "dropped" says
 * so.  Because the copy carries the row's msg_id, a retried batch finds it
 * like any stored row.
 */
#define _GNU_SOURCE
#include "relay_row.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker/uuid.h"
#include "relay.h"

int64_t sc_relay_ld_be64(const char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | (uint8_t)p[i];
    return (int64_t)v;
}

bool sc_relay_row_read(const PGresult *res, int i, sc_relay_row *w)
{
    memset(w, 0, sizeof *w);
    if (PQgetlength(res, i, SC_RELAY_C_ID) != 8
        || PQgetlength(res, i, SC_RELAY_C_MSGID) != 16
        || PQgetlength(res, i, SC_RELAY_C_CREATED) != 8
        || PQgetisnull(res, i, SC_RELAY_C_TOPIC))
        return false;
    w->id = sc_relay_ld_be64(PQgetvalue(res, i, SC_RELAY_C_ID));
    w->msg_id = (const uint8_t *)PQgetvalue(res, i, SC_RELAY_C_MSGID);
    w->topic = PQgetvalue(res, i, SC_RELAY_C_TOPIC);
    /* Text in binary format is its bytes; libpq adds a NUL after each. */
    if (!PQgetisnull(res, i, SC_RELAY_C_KEY))
        w->key = (brk_bytes){ PQgetvalue(res, i, SC_RELAY_C_KEY),
                              (size_t)PQgetlength(res, i, SC_RELAY_C_KEY) };
    if (!PQgetisnull(res, i, SC_RELAY_C_TAG))
        w->tag = (brk_bytes){ PQgetvalue(res, i, SC_RELAY_C_TAG),
                              (size_t)PQgetlength(res, i, SC_RELAY_C_TAG) };
    if (!PQgetisnull(res, i, SC_RELAY_C_HEADERS)) {
        w->headers = PQgetvalue(res, i, SC_RELAY_C_HEADERS);
        w->headers_len = (size_t)PQgetlength(res, i, SC_RELAY_C_HEADERS);
    }
    if (!PQgetisnull(res, i, SC_RELAY_C_BODY)) {
        w->json = true;
        w->body = PQgetvalue(res, i, SC_RELAY_C_BODY);
        w->body_len = (size_t)PQgetlength(res, i, SC_RELAY_C_BODY);
    } else if (!PQgetisnull(res, i, SC_RELAY_C_BYTES)) {
        w->body = PQgetvalue(res, i, SC_RELAY_C_BYTES);
        w->body_len = (size_t)PQgetlength(res, i, SC_RELAY_C_BYTES);
    } else {
        return false;           /* the table's CHECK forbids it */
    }
    w->created_ms = sc_relay_ld_be64(PQgetvalue(res, i, SC_RELAY_C_CREATED));
    return true;
}

/* jansson's parse flags of the HTTP API for request text. */
#define LOAD_FLAGS (JSON_DECODE_ANY | JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL)

static brk_status rejected(char *reason, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static brk_status rejected(char *reason, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, cap, fmt, ap);
    va_end(ap);
    return BRK_INVAL;
}

/* Same header-name rule as the HTTP API. */
static bool header_name_ok(const char *k, size_t n)
{
    if (n < 1 || n > 255) return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)k[i] < 0x21 || (unsigned char)k[i] > 0x7e)
            return false;
    return true;
}

/* Headers (JSON object text) -> props.  BRK_INVAL with a reason for
 * what the HTTP API would refuse too; BRK_NOMEM. */
static brk_status convert_headers(const sc_relay_row *w, uint8_t *props,
                                  size_t *len, char *reason, size_t cap)
{
    *len = 0;
    if (!w->headers) return BRK_OK;
    json_error_t je;
    json_t *h = json_loadb(w->headers, w->headers_len, LOAD_FLAGS, &je);
    if (!h)
        return json_error_code(&je) == json_error_out_of_memory
                   ? BRK_NOMEM
                   : rejected(reason, cap, "headers are not JSON: %s", je.text);
    brk_status st = BRK_OK;
    brk_prop *pp = NULL;
    size_t n = json_is_object(h) ? json_object_size(h) : 0;
    if (!json_is_object(h))
        st = rejected(reason, cap, "headers are not a JSON object");
    else if (n > BRK_PROPS_MAX / 5)
        st = rejected(reason, cap, "headers are larger than %u bytes encoded",
                      (unsigned)BRK_PROPS_MAX);
    else if (n > 0 && !(pp = calloc(n, sizeof *pp)))
        st = BRK_NOMEM;
    size_t i = 0;
    for (void *it = st == BRK_OK && n ? json_object_iter(h) : NULL;
         it && st == BRK_OK; it = json_object_iter_next(h, it), i++) {
        const char *k = json_object_iter_key(it);
        size_t kl = json_object_iter_key_len(it);
        json_t *v = json_object_iter_value(it);
        if (!header_name_ok(k, kl))
            st = rejected(reason, cap, "header name '%.64s' is not 1..255 "
                          "printable ASCII bytes", k);
        else if (!json_is_string(v))
            st = rejected(reason, cap, "header '%.64s' is not a string", k);
        else if (json_string_length(v) > 65535)
            st = rejected(reason, cap, "header '%.64s' is longer than 65535 "
                          "bytes", k);
        else {
            pp[i].key = (brk_bytes){ k, kl };
            pp[i].value = (brk_bytes){ json_string_value(v),
                                       json_string_length(v) };
        }
    }
    if (st == BRK_OK && n > 0) {
        st = brk_props_encode(pp, n, props, BRK_PROPS_MAX, len);
        if (st == BRK_TOOBIG || st == BRK_RANGE)
            st = rejected(reason, cap, "headers are larger than %u bytes "
                          "encoded", (unsigned)BRK_PROPS_MAX);
        else if (st != BRK_OK)
            st = rejected(reason, cap, "headers are not a valid set of "
                          "headers");
    }
    free(pp);
    json_decref(h);
    return st;
}

static bool has_real(const json_t *v)
{
    if (json_is_real(v)) return true;
    if (json_is_array(v)) {
        for (size_t i = 0; i < json_array_size(v); i++)
            if (has_real(json_array_get(v, i))) return true;
    } else if (json_is_object(v)) {
        const char *k;
        json_t *x;
        json_object_foreach((json_t *)v, k, x)
            if (has_real(x)) return true;
    }
    return false;
}

/* The HTTP API's compact text of v: JSON_COMPACT | JSON_ENCODE_ANY, reals
 * with the fewest digits (15, 16, else 17) that read back equal. */
static char *dump_compact(const json_t *v)
{
    if (has_real(v)) {
        for (int p = 15; p <= 16; p++) {
            char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY
                                        | JSON_REAL_PRECISION(p));
            if (!s) return NULL;
            json_t *back = json_loads(s, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
            bool same = back && json_equal(back, (json_t *)v);
            json_decref(back);
            if (same) return s;
            free(s);
        }
    }
    return json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_REAL_PRECISION(17));
}

/* Whether the integer token t[n] (an optional '-', then digits) is the
 * number the HTTP API would make of it: the double nearest to it, written
 * with the fewest digits that read back (as api_json_dump does), must
 * denote the very same number.  *rep gets that text. */
static bool int_is_exact_double(const char *t, size_t n, char *rep, size_t cap)
{
    char tok[340];
    if (n >= sizeof tok) return false;      /* beyond DBL_MAX anyway */
    memcpy(tok, t, n);
    tok[n] = '\0';
    double d = strtod(tok, NULL);
    if (!isfinite(d)) return false;
    int p;
    for (p = 15; p <= 17; p++) {
        snprintf(rep, cap, "%.*e", p - 1, d);
        if (strtod(rep, NULL) == d) break;
    }
    /* rep is [-]D.DDDDe[+-]XX: its digits M and exponent E denote
     * M * 10^(E - (len(M) - 1)); the token must be M followed by zeros. */
    const char *digits = tok[0] == '-' ? tok + 1 : tok;
    if ((tok[0] == '-') != (rep[0] == '-')) return false;
    const char *m = rep[0] == '-' ? rep + 1 : rep;
    char mant[24];
    size_t ml = 0;
    for (; *m && *m != 'e' && ml < sizeof mant - 1; m++)
        if (*m != '.') mant[ml++] = *m;
    mant[ml] = '\0';
    while (ml > 1 && mant[ml - 1] == '0') mant[--ml] = '\0';
    if (*m != 'e') return false;
    long e = strtol(m + 1, NULL, 10);
    size_t dl = strlen(digits);
    if (e < 0 || (size_t)e + 1 != dl || dl < ml || memcmp(digits, mant, ml) != 0)
        return false;
    for (size_t i = ml; i < dl; i++)
        if (digits[i] != '0') return false;
    return true;
}

/* jsonb writes every number in plain decimal, so a body written as 1e20
 * comes back as 100000000000000000000, an integer jansson (and with it the
 * HTTP API) cannot hold.  Rewrite such integers as the double the HTTP API
 * makes of 1e20 when that is the same number; refuse any other (it would
 * change).  Text inside strings is copied as it is.  *out is malloc'ed. */
static brk_status widen_numbers(const char *in, size_t len, char **out,
                                size_t *olen, char *reason, size_t cap)
{
    /* A rewritten token has at least 19 digits and becomes at most 24
     * characters: the text at most doubles. */
    char *b = malloc(2 * len + 64);
    if (!b) return BRK_NOMEM;
    size_t i = 0, o = 0;
    while (i < len) {
        char c = in[i];
        if (c == '"') {
            b[o++] = in[i++];
            while (i < len && in[i] != '"') {
                if (in[i] == '\\' && i + 1 < len) b[o++] = in[i++];
                b[o++] = in[i++];
            }
            if (i < len) b[o++] = in[i++];
            continue;
        }
        if (c != '-' && (c < '0' || c > '9')) {
            b[o++] = in[i++];
            continue;
        }
        size_t s = i;
        bool integral = true;
        while (i < len && in[i] && strchr("-+0123456789.eE", in[i])) {
            if (in[i] == '.' || in[i] == 'e' || in[i] == 'E') integral = false;
            i++;
        }
        char tok[32];
        bool fits = false;
        if (integral && i - s < sizeof tok) {
            memcpy(tok, in + s, i - s);
            tok[i - s] = '\0';
            errno = 0;
            (void)strtoll(tok, NULL, 10);
            fits = errno != ERANGE;
        }
        char rep[40];
        if (!integral || fits) {
            memcpy(b + o, in + s, i - s);
            o += i - s;
        } else if (int_is_exact_double(in + s, i - s, rep, sizeof rep)) {
            memcpy(b + o, rep, strlen(rep));
            o += strlen(rep);
        } else {
            free(b);
            return rejected(reason, cap, "body holds the number %.*s%s, "
                            "which is neither a 64-bit integer nor a double",
                            (int)(i - s > 40 ? 40 : i - s), in + s,
                            i - s > 40 ? "..." : "");
        }
    }
    *out = b;
    *olen = o;
    return BRK_OK;
}

brk_status sc_relay_row_convert(const sc_relay_row *w, uint8_t *props,
                                sc_relay_conv *c, char *reason, size_t cap)
{
    memset(c, 0, sizeof *c);
    /* The body first: a row rejected for its headers keeps the compact
     * body in its rejected copy. */
    if (w->json) {
        json_error_t je;
        json_t *v = json_loadb(w->body, w->body_len, LOAD_FLAGS, &je);
        if (!v && json_error_code(&je) == json_error_numeric_overflow) {
            char *text = NULL;
            size_t tlen = 0;
            brk_status st = widen_numbers(w->body, w->body_len, &text, &tlen,
                                          reason, cap);
            if (st != BRK_OK) return st;
            v = json_loadb(text, tlen, LOAD_FLAGS, &je);
            free(text);
        }
        if (!v)
            return json_error_code(&je) == json_error_out_of_memory
                       ? BRK_NOMEM
                       : rejected(reason, cap, "body is JSON the broker "
                                  "cannot hold: %s", je.text);
        c->text = dump_compact(v);
        json_decref(v);
        if (!c->text) return BRK_NOMEM;
        c->text_len = strlen(c->text);  /* NULs in strings are \u0000 */
    }
    return convert_headers(w, props, &c->props_len, reason, cap);
}

bool sc_relay_refused_for_good(brk_status st)
{
    return st == BRK_INVAL || st == BRK_TOOBIG || st == BRK_NOTFOUND
        || st == BRK_READONLY || st == BRK_RANGE;
}

brk_status sc_relay_row_append(brk_store *s, const sc_relay_row *w,
                               const sc_relay_conv *c, const uint8_t *props,
                               brk_append_res *res)
{
    brk_append_req q;
    memset(&q, 0, sizeof q);
    q.topic = w->topic;
    q.queue = -1;
    q.key = w->key;
    q.tag = w->tag;
    q.props = (brk_bytes){ props, c->props_len };
    if (c->text) {
        q.body = (brk_bytes){ c->text, c->text_len };
        q.flags = BRK_RECF_BODY_JSON;
    } else {
        q.body = (brk_bytes){ w->body, w->body_len };
    }
    q.msg_id = w->msg_id;
    q.born_ms = w->created_ms ? w->created_ms : 1;
    q.defer_sync = true;        /* one brk_store_flush per batch */
    return brk_store_append(s, &q, res);
}

brk_status sc_relay_row_reject(brk_store *s, sc_log *log, uint8_t *rprops,
                               const sc_relay_row *w, const sc_relay_conv *c,
                               const char *reason)
{
    char id[BRK_UUID_STR_LEN + 1];
    brk_uuid_format(w->msg_id, id);
    sc_log_kv(log, API_LOG_ERROR, "relay rejected an outbox row; kept in "
              SC_RELAY_REJECT_TOPIC, "msg_id", id, "topic", w->topic,
              "reason", reason, NULL);
    brk_append_req q;
    memset(&q, 0, sizeof q);
    q.topic = SC_RELAY_REJECT_TOPIC;
    q.queue = -1;
    q.key = w->key;
    q.tag = w->tag;
    q.msg_id = w->msg_id;
    q.born_ms = w->created_ms ? w->created_ms : 1;
    q.allow_internal = true;
    q.defer_sync = true;
    brk_append_res res;
    brk_status st = BRK_INVAL;
    for (int full = 1; full >= 0; full--) {
        brk_prop pp[3];
        size_t n = 0;
        pp[n].key = (brk_bytes){ "reason", 6 };
        pp[n++].value = (brk_bytes){ reason, strlen(reason) };
        pp[n].key = (brk_bytes){ "topic", 5 };
        pp[n++].value = (brk_bytes){ w->topic, strlen(w->topic) };
        if (full && w->headers) {
            pp[n].key = (brk_bytes){ "headers", 7 };
            pp[n++].value = (brk_bytes){ w->headers, w->headers_len };
        } else if (!full) {
            pp[n].key = (brk_bytes){ "dropped", 7 };
            pp[n++].value = (brk_bytes){ "body, headers", 13 };
        }
        size_t len = 0;
        st = brk_props_encode(pp, n, rprops, BRK_PROPS_MAX, &len);
        if (st != BRK_OK) continue;     /* headers too long: drop them */
        q.props = (brk_bytes){ rprops, len };
        q.flags = 0;
        if (!full)
            q.body = (brk_bytes){ "", 0 };
        else if (c && c->text) {
            q.body = (brk_bytes){ c->text, c->text_len };
            q.flags = BRK_RECF_BODY_JSON;
        } else {
            q.body = (brk_bytes){ w->body, w->body_len };
        }
        st = brk_store_append(s, &q, &res);
        if (st == BRK_NOTFOUND) {
            /* Auto-creation is off: the topic is ours to create. */
            brk_status cs = brk_topic_create(s, SC_RELAY_REJECT_TOPIC, 1);
            if (cs != BRK_OK && cs != BRK_EXISTS) return cs;
            st = brk_store_append(s, &q, &res);
        }
        if (st == BRK_OK || !sc_relay_refused_for_good(st)) return st;
    }
    /* Even the bare record is refused: nothing more can be kept. */
    sc_log_kv(log, API_LOG_ERROR, "relay could not keep a rejected row",
              "msg_id", id, "status", brk_status_name(st), NULL);
    return BRK_OK;
}
