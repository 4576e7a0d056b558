/*
 * live_server.h - "a server over a fresh store" and a small HTTP client, for
 * the tests that talk to outboxd's API over real sockets (test_contract.c,
 * test_openapi.c).  Header-only (static inline) because tests/support links
 * broker_core alone, and these helpers need http_api and libcurl.
 *
 * live_open builds the stack the way the daemon does: brk_store_open (a
 * fresh directory from brk_tmpdir_new), brk_delay_open, brk_txn_open with
 * .delay, brk_groups_open, then api_server_open on 127.0.0.1, port 0.  Every
 * thread runs (store flush, delay firing, group timeouts), so delays and
 * long polls behave as in production.  live_close stops the server first
 * and removes the directory.
 *
 * live_call sends one request on the env's curl handle, which keeps its
 * connection alive between calls (so a request after api_server_drain goes
 * over a connection accepted before it).  The answer (status, a few
 * headers, body, the body parsed as JSON when it is JSON) is in a
 * live_resp the caller frees with live_resp_free.
 *
 * The live_expect_* and other shorthands at the end fail the test
 * (cmocka) when the answer is not the one named, so the includer must
 * include cmocka.h first.
 */
#ifndef OUTBOXD_TEST_LIVE_SERVER_H
#define OUTBOXD_TEST_LIVE_SERVER_H

#include <curl/curl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "broker/delay.h"
#include "broker/group.h"
#include "broker/store.h"
#include "broker/txn.h"
#include "http_api/api.h"
#include "tmpdir.h"

typedef struct live_opts {
    const char *token;          /* NULL: no auth */
    uint64_t disk_budget_bytes; /* 0: unlimited */
    uint64_t segment_bytes;     /* 0: 1 MiB */
    size_t   max_body_bytes;    /* 0: the API default (1 MiB) */
    bool     no_auto_create;    /* unknown topics are 404, not created */
} live_opts;

typedef struct live_env {
    char dir[512];
    brk_store  *store;
    brk_delay  *delay;
    brk_txn    *txn;
    brk_groups *groups;
    api_server *srv;
    uint16_t    port;
    const char *token;          /* sent by live_call when set (auth tests) */
    CURL       *curl;           /* keep-alive connection for live_call */
    char err[256];
} live_env;

typedef struct live_resp {
    long   status;              /* 0: no answer (curl failed) */
    int    curl_rc;
    char  *body;                /* NUL-terminated, malloc'ed */
    size_t len;
    char   content_type[128];
    char   allow[128];
    char   retry_after[32];
    json_t *json;               /* the body parsed, NULL when it is not JSON */
} live_resp;

static inline int64_t live_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline void live_sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0) {
    }
}

/* Open the whole stack; o may be NULL (defaults). */
static inline void live_open(live_env *e, const live_opts *o)
{
    static const live_opts none = { 0 };
    if (!o)
        o = &none;
    memset(e, 0, sizeof *e);
    if (brk_tmpdir_new("api-live", e->dir, sizeof e->dir) != 0)
        fail_msg("cannot make a temporary directory");
    brk_store_opts so;
    brk_store_opts_init(&so);
    so.segment_bytes = o->segment_bytes ? o->segment_bytes : (1u << 20);
    so.disk_budget_bytes = o->disk_budget_bytes;
    so.auto_create_topics = !o->no_auto_create;
    brk_status st = brk_store_open(&e->store, e->dir, &so, e->err, sizeof e->err);
    if (st != BRK_OK)
        fail_msg("brk_store_open: %s: %s", brk_status_name(st), e->err);
    brk_delay_opts dopt;
    brk_delay_opts_init(&dopt);
    st = brk_delay_open(&e->delay, e->store, &dopt, e->err, sizeof e->err);
    if (st != BRK_OK)
        fail_msg("brk_delay_open: %s: %s", brk_status_name(st), e->err);
    brk_txn_opts topt;
    brk_txn_opts_init(&topt);
    topt.delay = e->delay;
    topt.workers = 1;
    st = brk_txn_open(&e->txn, e->store, &topt, e->err, sizeof e->err);
    if (st != BRK_OK)
        fail_msg("brk_txn_open: %s: %s", brk_status_name(st), e->err);
    brk_groups_opts gopt;
    brk_groups_opts_init(&gopt);
    st = brk_groups_open(&e->groups, e->store, &gopt, e->err, sizeof e->err);
    if (st != BRK_OK)
        fail_msg("brk_groups_open: %s: %s", brk_status_name(st), e->err);

    api_config cfg;
    api_config_init(&cfg);
    cfg.bind_addr = "127.0.0.1";
    cfg.port = 0;
    cfg.threads = 2;
    cfg.token = o->token;
    if (o->max_body_bytes)
        cfg.max_body_bytes = o->max_body_bytes;
    api_broker b = { e->store, e->txn, e->delay, e->groups };
    st = api_server_open(&e->srv, &cfg, &b, e->err, sizeof e->err);
    if (st != BRK_OK)
        fail_msg("api_server_open: %s: %s", brk_status_name(st), e->err);
    e->port = api_server_port(e->srv);
    if (e->port == 0)
        fail_msg("api_server_port is 0 after binding port 0");
    e->token = o->token;
    e->curl = curl_easy_init();
    if (!e->curl)
        fail_msg("curl_easy_init failed");
}

static inline void live_close(live_env *e)
{
    if (e->curl)
        curl_easy_cleanup(e->curl);
    if (e->srv)
        api_server_close(e->srv);
    if (e->groups)
        brk_groups_close(e->groups);
    if (e->txn)
        brk_txn_close(e->txn);
    if (e->delay)
        brk_delay_close(e->delay);
    if (e->store)
        brk_store_close(e->store);
    if (e->dir[0])
        brk_tmpdir_remove(e->dir);
    memset(e, 0, sizeof *e);
}

static inline void live_resp_free(live_resp *r)
{
    free(r->body);
    if (r->json)
        json_decref(r->json);
    memset(r, 0, sizeof *r);
}

typedef struct live_buf {
    char  *p;
    size_t len, cap;
} live_buf;

static inline size_t live_write_cb(char *ptr, size_t size, size_t n, void *ud)
{
    live_buf *b = ud;
    size_t add = size * n;
    if (b->len + add + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + add + 1)
            cap *= 2;
        char *np = realloc(b->p, cap);
        if (!np)
            return 0;
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->len, ptr, add);
    b->len += add;
    b->p[b->len] = '\0';
    return add;
}

/* Copy the value of header `name` from one header line into out[cap]. */
static inline void live_header_value(const char *line, size_t len,
                                     const char *name, char *out, size_t cap)
{
    size_t nl = strlen(name);
    if (len <= nl || strncasecmp(line, name, nl) != 0 || line[nl] != ':')
        return;
    const char *v = line + nl + 1;
    const char *end = line + len;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' '))
        end--;
    size_t n = (size_t)(end - v) < cap - 1 ? (size_t)(end - v) : cap - 1;
    memcpy(out, v, n);
    out[n] = '\0';
}

static inline size_t live_header_cb(char *ptr, size_t size, size_t n, void *ud)
{
    live_resp *r = ud;
    size_t len = size * n;
    if (len >= 5 && strncmp(ptr, "HTTP/", 5) == 0) {
        /* a new response (after a 100 Continue): forget the previous one */
        r->content_type[0] = r->allow[0] = r->retry_after[0] = '\0';
    }
    live_header_value(ptr, len, "Content-Type", r->content_type, sizeof r->content_type);
    live_header_value(ptr, len, "Allow", r->allow, sizeof r->allow);
    live_header_value(ptr, len, "Retry-After", r->retry_after, sizeof r->retry_after);
    return len;
}

/* Send `method path` with `body` (len bytes; NULL: none) of `ctype` (NULL:
 * no Content-Type header) plus `extra` headers (NULL-terminated list of
 * "Name: value", may be NULL).  Fills *r. */
static inline void live_request(live_env *e, const char *method,
                                const char *path, const char *ctype,
                                const void *body, size_t len,
                                const char *const *extra, live_resp *r)
{
    memset(r, 0, sizeof *r);
    char url[2048];
    snprintf(url, sizeof url, "http://127.0.0.1:%u%s", (unsigned)e->port, path);
    CURL *c = e->curl;
    curl_easy_reset(c);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 40000L);
    /* Paths are sent as given (tests send odd ones on purpose). */
    curl_easy_setopt(c, CURLOPT_PATH_AS_IS, 1L);
    struct curl_slist *hl = NULL;
    char hbuf[256];
    /* No "Expect: 100-continue" for ordinary bodies (one round trip less);
     * curl sends it for bodies over 1 MiB, so a server may refuse those
     * (413) before they are sent. */
    if (len <= (1u << 20))
        hl = curl_slist_append(hl, "Expect:");
    if (ctype) {
        snprintf(hbuf, sizeof hbuf, "Content-Type: %s", ctype);
        hl = curl_slist_append(hl, hbuf);
    } else {
        hl = curl_slist_append(hl, "Content-Type:");
    }
    if (e->token) {
        snprintf(hbuf, sizeof hbuf, "Authorization: Bearer %s", e->token);
        hl = curl_slist_append(hl, hbuf);
    }
    for (size_t i = 0; extra && extra[i]; i++)
        hl = curl_slist_append(hl, extra[i]);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hl);
    if (body) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    } else if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        /* a bodyless POST/PUT: Content-Length: 0 */
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, "");
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)0);
    }
    live_buf b = { 0 };
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, live_write_cb);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, live_header_cb);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, r);
    r->curl_rc = (int)curl_easy_perform(c);
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r->status);
    curl_slist_free_all(hl);
    r->body = b.p ? b.p : calloc(1, 1);
    r->len = b.len;
    if (r->len)
        r->json = json_loadb(r->body, r->len, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
}

/* A JSON request: body is JSON text (NULL: no body, no Content-Type). */
static inline void live_call(live_env *e, const char *method, const char *path,
                             const char *json_body, live_resp *r)
{
    live_request(e, method, path, json_body ? "application/json" : NULL,
                 json_body, json_body ? strlen(json_body) : 0, NULL, r);
}

/* The member `name` of the response object as a string ("" when absent). */
static inline const char *live_str(const live_resp *r, const char *name)
{
    const char *s = json_string_value(json_object_get(r->json, name));
    return s ? s : "";
}

/* ---- assertions and shorthands for the contract tests ----------------------- */

/* live_call with a printf-formatted JSON body (fmt NULL: no body). */
static inline void live_callf(live_env *e, live_resp *r, const char *method,
                              const char *path, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static inline void live_callf(live_env *e, live_resp *r, const char *method,
                              const char *path, const char *fmt, ...)
{
    char *body = NULL;
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        if (vasprintf(&body, fmt, ap) < 0)
            body = NULL;
        va_end(ap);
        assert_non_null(body);
    }
    live_call(e, method, path, body, r);
    free(body);
}

static inline void live_expect_status(const live_resp *r, long want)
{
    if (r->status != want)
        fail_msg("status %ld, want %ld (curl %d); body: %.500s", r->status, want,
                 r->curl_rc, r->body);
}

/* An RFC 9457 problem of `status` and slug, with type, title, status and
 * detail; returns the detail. */
static inline const char *live_expect_problem(const live_resp *r, long status,
                                              const char *slug)
{
    live_expect_status(r, status);
    if (strncmp(r->content_type, "application/problem+json", 24) != 0)
        fail_msg("%ld: Content-Type \"%s\", want application/problem+json", status,
                 r->content_type);
    if (!json_is_object(r->json))
        fail_msg("%ld: body is not a JSON object: %.300s", status, r->body);
    char type[96];
    snprintf(type, sizeof type, "urn:outboxd:problem:%s", slug);
    assert_string_equal(live_str(r, "type"), type);
    assert_true(strlen(live_str(r, "title")) > 0);
    assert_true(json_is_integer(json_object_get(r->json, "status")));
    assert_int_equal(json_integer_value(json_object_get(r->json, "status")), status);
    assert_true(strlen(live_str(r, "detail")) > 0);
    return live_str(r, "detail");
}

static inline void live_expect_detail(const live_resp *r, const char *field)
{
    if (!strstr(live_str(r, "detail"), field))
        fail_msg("detail \"%s\" does not name \"%s\"", live_str(r, "detail"), field);
}

/* The call is answered with a problem of `status` / slug. */
static inline void live_expect_code(live_env *e, const char *method, const char *path,
                                    const char *body, long status, const char *slug)
{
    live_resp r;
    live_call(e, method, path, body, &r);
    live_expect_problem(&r, status, slug);
    live_resp_free(&r);
}

/* The call is a 400 whose detail names `field` (NULL: any detail). */
static inline void live_expect_bad(live_env *e, const char *method, const char *path,
                                   const char *body, const char *field)
{
    live_resp r;
    live_call(e, method, path, body, &r);
    live_expect_problem(&r, 400, "bad-request");
    if (field)
        live_expect_detail(&r, field);
    live_resp_free(&r);
}

/* Call and demand `want`; the answer is freed. */
static inline void live_ok(live_env *e, const char *method, const char *path,
                           const char *body, long want)
{
    live_resp r;
    live_call(e, method, path, body, &r);
    live_expect_status(&r, want);
    live_resp_free(&r);
}

static inline void live_put_topic(live_env *e, const char *topic, int queues)
{
    char path[256], body[64];
    snprintf(path, sizeof path, "/v1/topics/%s", topic);
    snprintf(body, sizeof body, "{\"queues\":%d}", queues);
    live_ok(e, "PUT", path, body, 201);
}

/* Send `body` (the whole request object) to topic: 201; the msg_id into
 * id[37] when id is not NULL. */
static inline void live_send(live_env *e, const char *topic, const char *body, char *id)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/topics/%s/messages", topic);
    live_resp r;
    live_call(e, "POST", path, body, &r);
    live_expect_status(&r, 201);
    assert_int_equal(strlen(live_str(&r, "msg_id")), 36);
    if (id)
        snprintf(id, 37, "%s", live_str(&r, "msg_id"));
    live_resp_free(&r);
}

/* POST `body` to path with an Idempotency-Key header. */
static inline void live_send_keyed(live_env *e, const char *path, const char *key,
                                   const char *body, live_resp *r)
{
    char h[300];
    snprintf(h, sizeof h, "Idempotency-Key: %s", key);
    const char *extra[] = { h, NULL };
    live_request(e, "POST", path, "application/json", body, strlen(body), extra, r);
}

/* Receive: 200; returns the messages array (a new reference). */
static inline json_t *live_receive(live_env *e, const char *group, const char *topic,
                                   int max, int wait_ms)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/groups/%s/receive", group);
    live_resp r;
    live_callf(e, &r, "POST", path, "{\"topic\":\"%s\",\"max\":%d,\"wait_ms\":%d}", topic,
               max, wait_ms);
    live_expect_status(&r, 200);
    json_t *msgs = json_object_get(r.json, "messages");
    if (!json_is_array(msgs))
        fail_msg("receive: no messages array: %.300s", r.body);
    json_incref(msgs);
    live_resp_free(&r);
    return msgs;
}

/* Member `name` of message i as a string ("" when absent). */
static inline const char *live_msg_str(json_t *msgs, size_t i, const char *name)
{
    const char *s = json_string_value(json_object_get(json_array_get(msgs, i), name));
    return s ? s : "";
}

/* POST one receipt to /v1/groups/<group>/<verb> ("ack" or "nack") with
 * `more` members (",\"reason\":\"x\"", or NULL): 200; returns the response
 * object (a new reference). */
static inline json_t *live_settle(live_env *e, const char *group, const char *verb,
                                  const char *receipt, const char *more)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/groups/%s/%s", group, verb);
    live_resp r;
    live_callf(e, &r, "POST", path, "{\"receipts\":[\"%s\"]%s}", receipt, more ? more : "");
    live_expect_status(&r, 200);
    json_t *o = json_incref(r.json);
    live_resp_free(&r);
    return o;
}

/* Integer member `name` of o (fails the test when it is not one). */
static inline int64_t live_int(json_t *o, const char *name)
{
    json_t *v = json_object_get(o, name);
    if (!json_is_integer(v))
        fail_msg("member \"%s\" is not an integer", name);
    return json_integer_value(v);
}

/* "2026-11-25T13:14:02.123Z" -> ms since the epoch; -1 if not that shape. */
static inline int64_t live_parse_time(const char *s)
{
    struct tm tm;
    memset(&tm, 0, sizeof tm);
    int ms = 0, n = 0;
    if (!s || sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d.%3dZ%n", &tm.tm_year, &tm.tm_mon,
                     &tm.tm_mday, &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &ms, &n) != 7
        || n != 24 || s[24] != '\0')
        return -1;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    return (int64_t)timegm(&tm) * 1000 + ms;
}

#endif /* OUTBOXD_TEST_LIVE_SERVER_H */
