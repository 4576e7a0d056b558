/*
 * handler_fx.h - the fixture and request helpers of the in-process handler
 * tests (test_handler.c, test_handler_groups.c, test_handler_metrics.c).
 * Header-only (static inline), as tests/support links broker_core alone;
 * include cmocka.h first.
 *
 * The fixture: a store in a fresh temporary directory on a fake clock
 * (T0), ASYNC flush, every broker module with no_background (a test moves
 * time and ticks the delay scheduler itself), no checker, and an
 * api_handler over them.  Variants: topics not auto-created; a tiny disk
 * budget and store body limit.  Requests go straight to api_handle; their
 * bodies are written with ' for " (jq) to keep them readable.
 */
#ifndef OUTBOXD_TEST_HANDLER_FX_H
#define OUTBOXD_TEST_HANDLER_FX_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>

#include "api_priv.h"
#include "fake_clock.h"
#include "http_api/api.h"
#include "tmpdir.h"

#define T0 1795612442123LL              /* 2026-11-25T13:14:02.123Z */

/* ---- fixture ------------------------------------------------------------------ */

typedef struct fx_opts {
    bool no_auto_create;
    uint64_t disk_budget;
    uint32_t store_max_body;
} fx_opts;

typedef struct fx {
    char dir[256];
    brk_fake_clock clk;
    brk_store *s;
    brk_delay *d;
    brk_txn *t;
    brk_groups *g;
    api_handler *h;
    api_config cfg;
} fx;

static inline void fx_open(fx *f, const fx_opts *o)
{
    char err[256];
    brk_store_opts so;
    brk_store_opts_init(&so);
    so.clock = &f->clk.clock;
    so.no_background = true;
    so.flush_mode = BRK_FLUSH_ASYNC;
    so.uuid_seed = 11;
    so.auto_create_topics = !o->no_auto_create;
    if (o->disk_budget) {
        so.disk_budget_bytes = o->disk_budget;
        so.segment_bytes = 64u << 10;
    }
    if (o->store_max_body)
        so.max_body_bytes = o->store_max_body;
    if (brk_store_open(&f->s, f->dir, &so, err, sizeof err) != BRK_OK)
        fail_msg("store: %s", err);
    brk_delay_opts dopt;
    brk_delay_opts_init(&dopt);
    dopt.no_background = true;
    if (brk_delay_open(&f->d, f->s, &dopt, err, sizeof err) != BRK_OK)
        fail_msg("delay: %s", err);
    brk_txn_opts to;
    brk_txn_opts_init(&to);
    to.delay = f->d;
    to.no_background = true;
    to.workers = 1;
    if (brk_txn_open(&f->t, f->s, &to, err, sizeof err) != BRK_OK)
        fail_msg("txn: %s", err);
    brk_groups_opts go;
    brk_groups_opts_init(&go);
    go.no_background = true;
    if (brk_groups_open(&f->g, f->s, &go, err, sizeof err) != BRK_OK)
        fail_msg("groups: %s", err);
    api_config_init(&f->cfg);
    f->cfg.max_body_bytes = 256u << 10;
    api_broker b = { f->s, f->t, f->d, f->g };
    brk_status st = api_handler_open(&f->h, &f->cfg, &b, err, sizeof err);
    if (st != BRK_OK)
        fail_msg("handler: %s: %s", brk_status_name(st), err);
}

static inline int setup_with(void **state, const fx_opts *o)
{
    fx *f = calloc(1, sizeof *f);
    assert_non_null(f);
    assert_int_equal(brk_tmpdir_new("handler", f->dir, sizeof f->dir), 0);
    brk_fake_clock_init(&f->clk, T0);
    fx_open(f, o);
    *state = f;
    return 0;
}

static inline int setup(void **state)
{
    fx_opts o = { 0 };
    return setup_with(state, &o);
}

static inline int setup_no_auto(void **state)
{
    fx_opts o = { .no_auto_create = true };
    return setup_with(state, &o);
}

static inline int setup_tiny(void **state)
{
    fx_opts o = { .disk_budget = 512u << 10, .store_max_body = 1024 };
    return setup_with(state, &o);
}

static inline int teardown(void **state)
{
    fx *f = *state;
    api_handler_close(f->h);
    assert_int_equal(brk_groups_close(f->g), BRK_OK);
    assert_int_equal(brk_txn_close(f->t), BRK_OK);
    assert_int_equal(brk_delay_close(f->d), BRK_OK);
    (void)brk_store_close(f->s);
    brk_tmpdir_remove(f->dir);
    free(f);
    return 0;
}

/* ---- requests ------------------------------------------------------------------- */

typedef struct hdrs {
    const char *name[4];
    const char *value[4];
    size_t n;
} hdrs;

static inline const char *hdr_get(void *ctx, const char *name)
{
    const hdrs *h = ctx;
    for (size_t i = 0; i < h->n; i++)
        if (strcasecmp(h->name[i], name) == 0)
            return h->value[i];
    return NULL;
}

typedef struct res {
    api_outcome out;
    int status;
    char *body;
    size_t len;
    json_t *json;
    const char *ct, *allow, *route;
    unsigned retry;
} res;

static inline void res_free(res *r)
{
    json_decref(r->json);
    free(r->body);
    memset(r, 0, sizeof *r);
}

/* ' -> " so request bodies read naturally in C. */
static inline char *jq(const char *s)
{
    char *d = strdup(s);
    for (char *p = d; *p; p++)
        if (*p == '\'')
            *p = '"';
    return d;
}

typedef struct req_opts {
    const char *query;
    const char *ctype;              /* NULL: application/json with a body */
    const char *idem_key;
    api_wait *w;
    bool raw;                       /* body as given (no ' -> ") */
} req_opts;

static inline void call_with(fx *f, const char *method, const char *path,
                             const char *body, const req_opts *o, res *r)
{
    memset(r, 0, sizeof *r);
    char *b = body ? (o->raw ? strdup(body) : jq(body)) : NULL;
    hdrs h = { .n = 0 };
    if (b && o->ctype && o->ctype[0]) {
        h.name[h.n] = "content-type";
        h.value[h.n++] = o->ctype;
    } else if (b && !o->ctype) {
        h.name[h.n] = "Content-Type";
        h.value[h.n++] = "application/json";
    }
    if (o->idem_key) {
        h.name[h.n] = "Idempotency-Key";
        h.value[h.n++] = o->idem_key;
    }
    api_request rq = { method, path, o->query, hdr_get, &h, b,
                       b ? strlen(b) : 0 };
    api_response resp;
    r->out = api_handle(f->h, &rq, &resp, o->w);
    r->status = resp.status;
    r->ct = resp.content_type;
    r->allow = resp.allow;
    r->route = resp.route;
    r->retry = resp.retry_after_s;
    if (resp.body) {
        r->body = strndup(resp.body, resp.body_len);
        r->len = resp.body_len;
        r->json = json_loadb(resp.body, resp.body_len,
                             JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
    }
    api_response_free(&resp);
    free(b);
}

static inline void call(fx *f, const char *method, const char *path,
                        const char *body, res *r)
{
    req_opts o = { 0 };
    call_with(f, method, path, body, &o, r);
}

static inline void expect_status(const res *r, int want)
{
    if (r->status != want)
        fail_msg("status %d, want %d; body %s", r->status, want,
                 r->body ? r->body : "(none)");
    assert_int_equal(r->out, API_DONE);
}

static inline void expect_json(const res *r, int want)
{
    expect_status(r, want);
    assert_string_equal(r->ct, "application/json");
    assert_non_null(r->json);
}

/* An RFC 9457 problem with this status and slug whose detail holds needle. */
static inline void expect_problem(const res *r, int want, const char *slug,
                                  const char *needle)
{
    expect_status(r, want);
    assert_string_equal(r->ct, "application/problem+json");
    if (!json_is_object(r->json))
        fail_msg("problem body is not a JSON object: %s", r->body);
    char type[96];
    snprintf(type, sizeof type, "urn:outboxd:problem:%s", slug);
    assert_string_equal(json_string_value(json_object_get(r->json, "type")), type);
    assert_int_equal(json_integer_value(json_object_get(r->json, "status")), want);
    assert_non_null(json_string_value(json_object_get(r->json, "title")));
    const char *detail = json_string_value(json_object_get(r->json, "detail"));
    assert_non_null(detail);
    if (needle && !strstr(detail, needle))
        fail_msg("detail '%s' lacks '%s'", detail, needle);
}

static inline const char *str(const res *r, const char *name)
{
    const char *s = json_string_value(json_object_get(r->json, name));
    if (!s)
        fail_msg("no string '%s' in %s", name, r->body);
    return s;
}

static inline json_int_t num(const json_t *o, const char *name)
{
    json_t *v = json_object_get(o, name);
    if (!json_is_integer(v))
        fail_msg("no integer '%s'", name);
    return json_integer_value(v);
}

/* ---- shorthands --------------------------------------------------------------------- */

static inline void send_ok(fx *f, const char *topic, const char *body)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/topics/%s/messages", topic);
    res r;
    call(f, "POST", path, body, &r);
    expect_json(&r, 201);
    res_free(&r);
}

/* Receive from group g; returns the messages array (new reference). */
static inline json_t *recv_msgs(fx *f, const char *group, const char *body)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/groups/%s/receive", group);
    res r;
    call(f, "POST", path, body, &r);
    expect_json(&r, 200);
    json_t *m = json_incref(json_object_get(r.json, "messages"));
    assert_true(json_is_array(m));
    res_free(&r);
    return m;
}

static inline const char *msg_str(json_t *msgs, size_t i, const char *name)
{
    const char *s = json_string_value(json_object_get(json_array_get(msgs, i),
                                                      name));
    assert_non_null(s);
    return s;
}

static inline void prepare_ok(fx *f, const char *txid)
{
    char body[256];
    snprintf(body, sizeof body, "{'topic':'orders','txid':'%s','key':'k-%s',"
             "'body':{'id':1}}", txid, txid);
    res r;
    call(f, "POST", "/v1/transactions", body, &r);
    expect_json(&r, 201);
    res_free(&r);
}

/* Whether `page` (a /metrics page) holds `line` as a whole line. */
static inline bool has_line(const char *page, const char *line)
{
    size_t n = strlen(line);
    for (const char *p = page; (p = strstr(p, line)); p++)
        if ((p == page || p[-1] == '\n') && (p[n] == '\n' || p[n] == 0))
            return true;
    return false;
}

#endif /* OUTBOXD_TEST_HANDLER_FX_H */
