/*
 * handler.c - the transport-free request handler (see http_api/api.h):
 * open/close, the route table and dispatch, the checks every route shares,
 * drain, and the small shared services of the routes (names, query
 * strings, Idempotency-Key use, the receive-filter cache).
 *
 * ROUTE TABLE (docs/http-api.md; api_routes() lists it in this order)
 *
 *   method path                                    flags          route function
 *   POST   /v1/transactions                        WRITE BODY     api_route_txn_prepare
 *   GET    /v1/transactions                        -              api_route_txn_list
 *   GET    /v1/transactions/{txid}                 -              api_route_txn_get
 *   POST   /v1/transactions/{txid}/commit          OPTBODY        api_route_txn_commit
 *   POST   /v1/transactions/{txid}/rollback        OPTBODY        api_route_txn_rollback
 *   GET    /v1/topics                              -              api_route_topic_list
 *   GET    /v1/topics/{topic}                      -              api_route_topic_get
 *   PUT    /v1/topics/{topic}                      WRITE BODY     api_route_topic_put
 *   POST   /v1/topics/{topic}/messages             WRITE BODY     api_route_send
 *   GET    /v1/groups/{group}                      -              api_route_group_get
 *   PUT    /v1/groups/{group}                      WRITE BODY     api_route_group_put
 *   POST   /v1/groups/{group}/receive              BODY           api_route_group_receive
 *   POST   /v1/groups/{group}/ack                  BODY           api_route_group_ack
 *   POST   /v1/groups/{group}/nack                 BODY           api_route_group_nack
 *   GET    /v1/groups/{group}/dead-letters         -              api_route_group_dlq_list
 *   POST   /v1/groups/{group}/dead-letters/replay  WRITE OPTBODY  api_route_group_dlq_replay
 *   GET    /healthz                                -              api_route_healthz
 *   GET    /readyz                                 -              api_route_readyz
 *   GET    /metrics                                -              api_route_metrics
 *
 *   WRITE    refused with 503 shutting-down (Retry-After 5) once draining
 *   BODY     needs a JSON object body: empty is 400
 *   OPTBODY  no body, or a JSON object (the route refuses unknown fields)
 *   HEAD is served by the GET route of a path (the transport sends no
 *   body).  A path that matches a template but not the method is 405 with
 *   the template's Allow; no template at all is 404.
 *
 * ORDER OF CHECKS: route (404/405) -> body size (413) -> draining (503) ->
 * content type of a non-empty POST/PUT body (415) -> JSON object (400) ->
 * the route's own validation and broker call.
 */
#include "api_priv.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "codec.h"

#define R_WRITE   1u
#define R_BODY    2u
#define R_OPTBODY 4u

#define ROUTE_MAP(X)                                                               \
    X("POST", "/v1/transactions", R_WRITE | R_BODY, api_route_txn_prepare,        \
      "GET, HEAD, POST")                                                           \
    X("GET", "/v1/transactions", 0, api_route_txn_list, "GET, HEAD, POST")         \
    X("GET", "/v1/transactions/{txid}", 0, api_route_txn_get, "GET, HEAD")         \
    X("POST", "/v1/transactions/{txid}/commit", R_OPTBODY, api_route_txn_commit,  \
      "POST")                                                                      \
    X("POST", "/v1/transactions/{txid}/rollback", R_OPTBODY,                       \
      api_route_txn_rollback, "POST")                                              \
    X("GET", "/v1/topics", 0, api_route_topic_list, "GET, HEAD")                   \
    X("GET", "/v1/topics/{topic}", 0, api_route_topic_get, "GET, HEAD, PUT")       \
    X("PUT", "/v1/topics/{topic}", R_WRITE | R_BODY, api_route_topic_put,         \
      "GET, HEAD, PUT")                                                            \
    X("POST", "/v1/topics/{topic}/messages", R_WRITE | R_BODY, api_route_send,    \
      "POST")                                                                      \
    X("GET", "/v1/groups/{group}", 0, api_route_group_get, "GET, HEAD, PUT")       \
    X("PUT", "/v1/groups/{group}", R_WRITE | R_BODY, api_route_group_put,         \
      "GET, HEAD, PUT")                                                            \
    X("POST", "/v1/groups/{group}/receive", R_BODY, api_route_group_receive,      \
      "POST")                                                                      \
    X("POST", "/v1/groups/{group}/ack", R_BODY, api_route_group_ack, "POST")       \
    X("POST", "/v1/groups/{group}/nack", R_BODY, api_route_group_nack, "POST")     \
    X("GET", "/v1/groups/{group}/dead-letters", 0, api_route_group_dlq_list,      \
      "GET, HEAD")                                                                 \
    X("POST", "/v1/groups/{group}/dead-letters/replay", R_WRITE | R_OPTBODY,       \
      api_route_group_dlq_replay, "POST")                                          \
    X("GET", "/healthz", 0, api_route_healthz, "GET, HEAD")                        \
    X("GET", "/readyz", 0, api_route_readyz, "GET, HEAD")                          \
    X("GET", "/metrics", 0, api_route_metrics, "GET, HEAD")

typedef struct route_row {
    unsigned flags;
    api_route_fn fn;
    const char *allow;              /* every method of this path */
} route_row;

#define ROUTE_INFO_(m, p, f, fn, a) { m, p },
static const api_route_info ROUTE_INFO[] = { ROUTE_MAP(ROUTE_INFO_) };
#undef ROUTE_INFO_
#define ROUTE_ROW_(m, p, f, fn, a) { f, fn, a },
static const route_row ROUTES[] = { ROUTE_MAP(ROUTE_ROW_) };
#undef ROUTE_ROW_
#define NROUTES (sizeof ROUTES / sizeof ROUTES[0])

const api_route_info *api_routes(size_t *count)
{
    if (count)
        *count = NROUTES;
    return ROUTE_INFO;
}

/* ---- configuration and lifecycle ----------------------------------------------------- */

void api_config_init(api_config *c)
{
    memset(c, 0, sizeof *c);
    c->bind_addr = "127.0.0.1";
    c->port = 8080;
    c->threads = 0;
    c->workers = 64;
    c->max_connections = 4096;
    c->idle_timeout_s = 60;
    c->token = NULL;
    c->max_body_bytes = 1u << 20;
    c->idem_window_ms = 24LL * 3600 * 1000;
    c->idem_max_keys = 100000;
    c->default_wait_ms = 0;
    brk_check_policy_init(&c->default_check);
    c->logger = NULL;
}

static brk_status open_fail(brk_status st, char *errbuf, size_t errlen,
                            const char *why)
{
    if (errbuf && errlen)
        snprintf(errbuf, errlen, "api_handler_open: %s", why);
    return st;
}

static const char *config_problem(const api_config *cfg)
{
    const brk_check_policy *p = &cfg->default_check;
    if (cfg->max_body_bytes == 0)
        return "max_body_bytes must be > 0";
    if (cfg->default_wait_ms > BRK_WAIT_MAX_MS)
        return "default_wait_ms must be at most 30000";
    if (p->interval_ms == 0 || p->max_checks == 0
        || (p->on_exhausted != BRK_EXHAUSTED_ROLLBACK
            && p->on_exhausted != BRK_EXHAUSTED_HOLD))
        return "default_check: interval_ms and max_checks must be >= 1, "
               "on_exhausted rollback or hold";
    if (p->expiry_topic && p->expiry_topic[0]
        && (api_topic_problem(p->expiry_topic, strlen(p->expiry_topic))
            || p->on_exhausted != BRK_EXHAUSTED_ROLLBACK))
        return "default_check.expiry_topic must be a valid topic name, "
               "with on_exhausted rollback";
    return NULL;
}

brk_status api_handler_open(api_handler **out, const api_config *cfg,
                            const api_broker *b, char *errbuf, size_t errlen)
{
    if (!out)
        return BRK_INVAL;
    *out = NULL;
    if (!b || !b->store || !b->txn || !b->delay || !b->groups)
        return open_fail(BRK_INVAL, errbuf, errlen,
                         "store, txn, delay and groups are all required");
    api_config def;
    if (!cfg) {
        api_config_init(&def);
        cfg = &def;
    }
    const char *why = config_problem(cfg);
    if (why)
        return open_fail(BRK_INVAL, errbuf, errlen, why);
    api_handler *h = calloc(1, sizeof *h);
    if (!h)
        return open_fail(BRK_NOMEM, errbuf, errlen, "out of memory");
    h->cfg = *cfg;
    if (cfg->default_check.expiry_topic)
        snprintf(h->expiry_topic, sizeof h->expiry_topic, "%s",
                 cfg->default_check.expiry_topic);
    h->cfg.default_check.expiry_topic = h->expiry_topic[0] ? h->expiry_topic
                                                           : NULL;
    h->b = *b;
    h->clock = brk_store_clock(b->store);
    atomic_init(&h->draining, false);
    brk_status st = api_metrics_open(&h->metrics, ROUTE_INFO, NROUTES);
    if (st != BRK_OK) {
        free(h);
        return open_fail(st, errbuf, errlen, "out of memory");
    }
    st = api_idem_open(&h->idem, b->store, cfg->idem_window_ms,
                       cfg->idem_max_keys, errbuf, errlen);
    if (st != BRK_OK) {
        api_metrics_close(h->metrics);
        free(h);
        return st;
    }
    pthread_mutex_init(&h->fc_mu, NULL);
    *out = h;
    return BRK_OK;
}

static void fc_clear(api_handler *h)
{
    for (size_t i = 0; i < API_FC_BUCKETS; i++) {
        api_fc_entry *e = h->fc[i];
        while (e) {
            api_fc_entry *nx = e->next;
            free(e->gt);
            free(e->filter);
            free(e);
            e = nx;
        }
        h->fc[i] = NULL;
    }
    h->fc_n = 0;
}

void api_handler_close(api_handler *h)
{
    if (!h)
        return;
    api_idem_close(h->idem);
    api_metrics_close(h->metrics);
    fc_clear(h);
    pthread_mutex_destroy(&h->fc_mu);
    free(h);
}

void api_handler_drain(api_handler *h)
{
    if (h)
        atomic_store(&h->draining, true);
}

bool api_handler_draining(api_handler *h)
{
    return h && atomic_load(&h->draining);
}

void api_handler_observe(api_handler *h, const char *method, const char *route,
                         int status, double seconds)
{
    if (h)
        api_metrics_observe(h->metrics, method, route, status, seconds);
}

void api_response_free(api_response *r)
{
    if (!r)
        return;
    free(r->body);
    r->body = NULL;
    r->body_len = 0;
}

/* ---- dispatch ------------------------------------------------------------------------- */

/* Does `path` fit `tmpl`?  A "{x}" segment takes one non-empty segment,
 * whose place is returned in *seg / *seglen. */
static bool tmpl_match(const char *tmpl, const char *path, const char **seg,
                       size_t *seglen)
{
    const char *t = tmpl, *p = path;
    while (*t && *p) {
        if (*t != '/' || *p != '/')
            return false;
        t++;
        p++;
        size_t tl = strcspn(t, "/"), pl = strcspn(p, "/");
        if (tl > 0 && t[0] == '{') {
            if (pl == 0)
                return false;
            *seg = p;
            *seglen = pl;
        } else if (tl != pl || memcmp(t, p, tl) != 0) {
            return false;
        }
        t += tl;
        p += pl;
    }
    return *t == 0 && *p == 0;
}

static const char *header(const api_request *req, const char *name)
{
    return req->header ? req->header(req->header_ctx, name) : NULL;
}

/* "application/json" or any "<type>/<subtype>+json", parameters allowed. */
static bool json_media_type(const char *ct)
{
    if (!ct)
        return false;
    while (*ct == ' ' || *ct == '\t')
        ct++;
    size_t n = strcspn(ct, ";");
    while (n > 0 && (ct[n - 1] == ' ' || ct[n - 1] == '\t'))
        n--;
    const char *slash = memchr(ct, '/', n);
    if (!slash || slash == ct || slash + 1 == ct + n)
        return false;
    if (n == 16 && strncasecmp(ct, "application/json", 16) == 0)
        return true;
    size_t sub = (size_t)(ct + n - (slash + 1));
    return sub > 5 && strncasecmp(ct + n - 5, "+json", 5) == 0;
}

/* The checks every route shares; false when c->resp is final. */
static bool common_checks(api_call *c, const route_row *r)
{
    const api_request *req = c->req;
    api_handler *h = c->h;
    if (req->body_len > h->cfg.max_body_bytes) {
        api_problem(c, API_PROB_TOO_LARGE, "request body is %zu bytes; the "
                    "limit is %zu", req->body_len, h->cfg.max_body_bytes);
        return false;
    }
    if ((r->flags & R_WRITE) && atomic_load(&h->draining)) {
        api_problem(c, API_PROB_SHUTTING_DOWN, "outboxd is shutting down and "
                    "takes no new writes; retry against a running instance");
        return false;
    }
    bool post_put = strcmp(req->method, "POST") == 0
                    || strcmp(req->method, "PUT") == 0;
    if (post_put && req->body_len > 0
        && !json_media_type(header(req, "Content-Type"))) {
        const char *ct = header(req, "Content-Type");
        api_problem(c, API_PROB_MEDIA_TYPE, "request body must be "
                    "application/json (or a +json type), not '%.64s'",
                    ct ? ct : "(no Content-Type)");
        return false;
    }
    if (!(r->flags & (R_BODY | R_OPTBODY)))
        return true;
    if (req->body_len == 0) {
        if (r->flags & R_BODY) {
            api_problem(c, API_PROB_BAD_REQUEST, "request body is required: "
                        "a JSON object");
            return false;
        }
        return true;
    }
    char err[256];
    brk_status st = api_json_parse_object(req->body, req->body_len, &c->body,
                                          err, sizeof err);
    if (st != BRK_OK) {
        api_fail(c, st, "%s", err);
        return false;
    }
    return true;
}

/* Index of the route for (method, path); -1 when none.  *path_hit is the
 * first route whose template fits the path (for 405), or -1. */
static int find_route(const char *method, const char *path, int *path_hit,
                      const char **seg, size_t *seglen)
{
    bool head = strcmp(method, "HEAD") == 0;
    *path_hit = -1;
    for (size_t i = 0; path && i < NROUTES; i++) {
        const char *s = NULL;
        size_t sl = 0;
        if (!tmpl_match(ROUTE_INFO[i].path, path, &s, &sl))
            continue;
        if (*path_hit < 0) {
            *path_hit = (int)i;
            *seg = s;
            *seglen = sl;
        }
        if (strcmp(ROUTE_INFO[i].method, method) == 0
            || (head && strcmp(ROUTE_INFO[i].method, "GET") == 0)) {
            *seg = s;
            *seglen = sl;
            return (int)i;
        }
    }
    return -1;
}

api_outcome api_handle(api_handler *h, const api_request *req,
                       api_response *resp, api_wait *w)
{
    memset(resp, 0, sizeof *resp);
    resp->route = "unmatched";
    api_call c;
    memset(&c, 0, sizeof c);
    c.h = h;
    c.req = req;
    c.resp = resp;
    c.w = w;
    c.now_ms = h->clock->now_ms(h->clock->ctx);
    const char *method = req->method ? req->method : "";
    api_request fixed;
    if (!req->method) {
        fixed = *req;
        fixed.method = method;
        c.req = &fixed;
    }
    int path_hit;
    const char *seg = NULL;
    size_t seglen = 0;
    int i = find_route(method, req->path, &path_hit, &seg, &seglen);
    if (path_hit < 0)
        return api_problem(&c, API_PROB_NOT_FOUND, "no route for '%.200s'",
                           req->path ? req->path : "");
    if (i < 0) {
        resp->route = ROUTE_INFO[path_hit].path;
        api_problem(&c, API_PROB_METHOD, "method '%.16s' is not allowed on "
                    "'%s' (allowed: %s)", method, ROUTE_INFO[path_hit].path,
                    ROUTES[path_hit].allow);
        resp->allow = ROUTES[path_hit].allow;
        return API_DONE;
    }
    resp->route = ROUTE_INFO[i].path;
    c.param_len = seglen;
    size_t cp = seglen < API_PARAM_MAX ? seglen : API_PARAM_MAX;
    if (seg)
        memcpy(c.param, seg, cp);
    c.param[cp] = 0;
    api_outcome o = API_DONE;
    if (common_checks(&c, &ROUTES[i]))
        o = ROUTES[i].fn(&c);
    json_decref(c.body);
    return o;
}

/* ---- names -------------------------------------------------------------------------------- */

static bool name_chars(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z')
              || (ch >= '0' && ch <= '9') || ch == '.' || ch == '_'
              || ch == '-'))
            return false;
    }
    return true;
}

static bool internal_name(const char *s, size_t n)
{
    return n >= 2 && s[0] == '_' && s[1] == '_';
}

const char *api_topic_problem(const char *s, size_t n)
{
    if (n == 0 || n > BRK_TOPIC_MAX || !name_chars(s, n))
        return "must be 1..127 bytes of [A-Za-z0-9._-]";
    if (internal_name(s, n))
        return "names starting with '__' are internal";
    if (s[0] == '.')
        return "must not start with '.'";
    return NULL;
}

const char *api_group_problem(const char *s, size_t n)
{
    if (n == 0 || n > BRK_GROUP_MAX || !name_chars(s, n))
        return "must be 1..64 bytes of [A-Za-z0-9._-]";
    if (internal_name(s, n))
        return "names starting with '__' are internal";
    return NULL;
}

const char *api_member_problem(const char *s, size_t n)
{
    if (n == 0 || n > BRK_MEMBER_MAX || !name_chars(s, n))
        return "must be 1..48 bytes of [A-Za-z0-9._-]";
    return NULL;
}

const char *api_txid_problem(const char *s, size_t n)
{
    if (n == 0 || n > BRK_TXID_MAX)
        return "must be 1..128 bytes of printable ASCII without '/'";
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e
            || s[i] == '/')
            return "must be 1..128 bytes of printable ASCII without '/'";
    return NULL;
}

static bool param_check(api_call *c, const char *what,
                        const char *(*check)(const char *, size_t))
{
    const char *why = check(c->param, c->param_len);
    if (!why)
        return true;
    api_problem(c, API_PROB_BAD_REQUEST, "%s '%.64s%s' in the path: %s", what,
                c->param, c->param_len > 64 ? "..." : "", why);
    return false;
}

bool api_param_topic(api_call *c)
{
    return param_check(c, "topic", api_topic_problem);
}

bool api_param_group(api_call *c)
{
    return param_check(c, "group", api_group_problem);
}

bool api_param_txid(api_call *c)
{
    return param_check(c, "txid", api_txid_problem);
}

bool api_body_name(api_call *c, const json_t *obj, const char *prefix,
                   const char *field, bool required,
                   const char *(*check)(const char *, size_t), char *out,
                   size_t cap, bool *present)
{
    char err[256];
    const char *s = NULL;
    size_t n = 0;
    bool has = false;
    if (present)
        *present = false;
    out[0] = 0;
    if (api_json_str(obj, prefix, field, cap - 1, false, &s, &n, &has, err,
                     sizeof err) != BRK_OK) {
        const char *why = check("", 0);
        api_problem(c, API_PROB_BAD_REQUEST, "field '%s%s' %s", prefix, field,
                    json_is_string(json_object_get(obj, field))
                        ? why : "must be a string");
        return false;
    }
    if (!has) {
        if (required)
            api_problem(c, API_PROB_BAD_REQUEST, "field '%s%s' is required",
                        prefix, field);
        return !required;
    }
    const char *why = check(s, n);
    if (why) {
        api_problem(c, API_PROB_BAD_REQUEST, "field '%s%s' ('%.64s'): %s",
                    prefix, field, s, why);
        return false;
    }
    memcpy(out, s, n);
    out[n] = 0;
    if (present)
        *present = true;
    return true;
}

bool api_fields_ok(api_call *c, const char *const *allowed)
{
    char err[256];
    if (api_json_check_fields(c->body, allowed, "", err, sizeof err)
        == BRK_OK)
        return true;
    api_problem(c, API_PROB_BAD_REQUEST, "%s", err);
    return false;
}

/* ---- query strings ---------------------------------------------------------------------- */

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* Percent-decode s[n] ('+' is a space) into out[cap]; -1 for a bad escape
 * or a NUL, -2 when it does not fit. */
static int qdecode(const char *s, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int ch = (unsigned char)s[i];
        if (ch == '+') {
            ch = ' ';
        } else if (ch == '%') {
            if (i + 2 >= n)
                return -1;
            int hi = hexval(s[i + 1]), lo = hexval(s[i + 2]);
            if (hi < 0 || lo < 0)
                return -1;
            ch = hi * 16 + lo;
            i += 2;
        }
        if (ch == 0)
            return -1;
        if (o + 1 >= cap)
            return -2;
        out[o++] = (char)ch;
    }
    out[o] = 0;
    return 0;
}

static bool query_pair(api_call *c, const char *q, size_t n, api_qparam *ps,
                       size_t np)
{
    const char *eq = memchr(q, '=', n);
    size_t nl = eq ? (size_t)(eq - q) : n;
    char name[64];
    int r = qdecode(q, nl, name, sizeof name);
    if (r == -1) {
        api_problem(c, API_PROB_BAD_REQUEST, "query string: bad percent "
                    "escape");
        return false;
    }
    api_qparam *p = NULL;
    for (size_t i = 0; r == 0 && i < np && !p; i++)
        if (strcmp(ps[i].name, name) == 0)
            p = &ps[i];
    if (!p) {
        api_problem(c, API_PROB_BAD_REQUEST, "unknown query parameter "
                    "'%.*s'", (int)(nl > 64 ? 64 : nl), q);
        return false;
    }
    if (p->present) {
        api_problem(c, API_PROB_BAD_REQUEST, "query parameter '%s' is given "
                    "twice", p->name);
        return false;
    }
    const char *v = eq ? eq + 1 : q + n;
    r = qdecode(v, (size_t)(q + n - v), p->value, sizeof p->value);
    if (r != 0) {
        api_problem(c, API_PROB_BAD_REQUEST, r == -2 ? "query parameter '%s' "
                    "is longer than 63 bytes" : "query parameter '%s': bad "
                    "percent escape", p->name);
        return false;
    }
    p->present = true;
    return true;
}

bool api_query(api_call *c, api_qparam *ps, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        ps[i].present = false;
        ps[i].value[0] = 0;
    }
    const char *q = c->req->query;
    while (q && *q) {
        size_t len = strcspn(q, "&");
        if (len > 0 && !query_pair(c, q, len, ps, n))
            return false;
        q += len;
        if (*q == '&')
            q++;
    }
    return true;
}

bool api_query_int(api_call *c, const api_qparam *p, int64_t lo, int64_t hi,
                   int64_t def, int64_t *out)
{
    if (!p->present) {
        *out = def;
        return true;
    }
    const char *s = p->value;
    bool ok = *s != 0 && strlen(s) <= 18;
    int64_t v = 0;
    for (; ok && *s; s++) {
        ok = *s >= '0' && *s <= '9';
        v = v * 10 + (*s - '0');
    }
    if (!ok || v < lo || v > hi) {
        api_problem(c, API_PROB_BAD_REQUEST, "query parameter '%s' must be "
                    "an integer in %lld..%lld", p->name, (long long)lo,
                    (long long)hi);
        return false;
    }
    *out = v;
    return true;
}

/* ---- Idempotency-Key ------------------------------------------------------------------- */

bool api_idem_start(api_call *c, const api_idem_intent *in, api_idem_use *u)
{
    memset(u, 0, sizeof *u);
    const char *key = header(c->req, "Idempotency-Key");
    if (!key)
        return true;
    if (!api_idem_key_valid(key)) {
        api_problem(c, API_PROB_BAD_REQUEST, "header 'Idempotency-Key' must "
                    "be 1..255 bytes of printable ASCII");
        return false;
    }
    /* One scope for every route: docs/http-api.md makes the same key with
     * another path a 422, so keys must meet across paths; the request hash
     * (method, path, body) tells the requests apart. */
    const char *scope = "v1";
    uint64_t hash = api_idem_hash(c->req->method, c->req->path, c->req->body,
                                  c->req->body_len);
    brk_status err = BRK_OK;
    switch (api_idem_begin(c->h->idem, scope, key, hash, in, &u->tk, &err)) {
    case API_IDEM_NEW:
    case API_IDEM_REDO:
        u->active = true;
        return true;
    case API_IDEM_REPLAY:
        c->resp->status = u->tk.status;
        c->resp->content_type = API_CT_JSON;
        c->resp->body = u->tk.response;
        c->resp->body_len = u->tk.response_len;
        u->tk.response = NULL;
        return false;
    case API_IDEM_MISMATCH:
        api_problem(c, API_PROB_IDEM_REUSED, "Idempotency-Key '%s' was used "
                    "for another request (method, path or body differ)", key);
        return false;
    case API_IDEM_BUSY:
        api_problem(c, API_PROB_CONFLICT, "a request with Idempotency-Key "
                    "'%s' is still being handled", key);
        return false;
    case API_IDEM_ERROR:
    default:
        api_fail(c, err, "the Idempotency-Key could not be recorded: %s",
                 brk_strerror(err));
        return false;
    }
}

void api_idem_end(api_call *c, api_idem_use *u)
{
    if (!u->active)
        return;
    int s = c->resp->status;
    if (s >= 200 && s < 300)
        api_idem_finish(c->h->idem, &u->tk, s, c->resp->body,
                        c->resp->body_len);
    else
        api_idem_abort(c->h->idem, &u->tk);
    u->active = false;
}

/* ---- receive-filter cache ------------------------------------------------------------------ */

/* "group\0topic\0" and its FNV-1a hash. */
static size_t fc_key(const char *group, const char *topic, char *buf,
                     size_t cap, uint32_t *hash)
{
    size_t gl = strlen(group), tl = strlen(topic);
    if (gl + tl + 2 > cap)
        return 0;
    memcpy(buf, group, gl + 1);
    memcpy(buf + gl + 1, topic, tl + 1);
    size_t n = gl + tl + 2;
    uint32_t x = 2166136261u;
    for (size_t i = 0; i < n; i++)
        x = (x ^ (uint8_t)buf[i]) * 16777619u;
    *hash = x;
    return n;
}

/* The entry's link; fc_mu held. */
static api_fc_entry **fc_find(api_handler *h, const char *k, size_t n,
                              uint32_t hash)
{
    api_fc_entry **pp = &h->fc[hash % API_FC_BUCKETS];
    while (*pp && !((*pp)->hash == hash && (*pp)->gt_len == n
                    && memcmp((*pp)->gt, k, n) == 0))
        pp = &(*pp)->next;
    return pp;
}

bool api_filter_known(api_handler *h, const char *group, const char *topic,
                      const char *filter)
{
    char k[BRK_GROUP_MAX + BRK_TOPIC_MAX + 2];
    uint32_t hash = 0;
    size_t n = fc_key(group, topic, k, sizeof k, &hash);
    if (!n)
        return false;
    pthread_mutex_lock(&h->fc_mu);
    api_fc_entry *e = *fc_find(h, k, n, hash);
    bool known = e && strcmp(e->filter, filter) == 0;
    pthread_mutex_unlock(&h->fc_mu);
    return known;
}

/* Unlink and free the entry for k; fc_mu held. */
static void fc_drop(api_handler *h, const char *k, size_t n, uint32_t hash)
{
    api_fc_entry **pp = fc_find(h, k, n, hash);
    api_fc_entry *e = *pp;
    if (!e)
        return;
    *pp = e->next;
    h->fc_n--;
    free(e->gt);
    free(e->filter);
    free(e);
}

void api_filter_begin(api_handler *h, const char *group, const char *topic)
{
    char k[BRK_GROUP_MAX + BRK_TOPIC_MAX + 2];
    uint32_t hash = 0;
    size_t n = fc_key(group, topic, k, sizeof k, &hash);
    pthread_mutex_lock(&h->fc_mu);
    if (h->fc_applying++ > 0)
        h->fc_overlap = true;
    if (n)
        fc_drop(h, k, n, hash);
    pthread_mutex_unlock(&h->fc_mu);
}

/* Remember filter f (taken) for k; fc_mu held.  A failed allocation only
 * costs a repeated put. */
static void fc_insert(api_handler *h, const char *k, size_t n, uint32_t hash,
                      char *f)
{
    if (h->fc_n >= API_FC_MAX)      /* bounded: starting over is cheap */
        fc_clear(h);
    api_fc_entry *e = calloc(1, sizeof *e);
    char *gt = malloc(n);
    if (!e || !gt) {
        free(e);
        free(gt);
        free(f);
        return;
    }
    memcpy(gt, k, n);
    *e = (api_fc_entry){ h->fc[hash % API_FC_BUCKETS], hash, gt, n, f };
    h->fc[hash % API_FC_BUCKETS] = e;
    h->fc_n++;
}

void api_filter_end(api_handler *h, const char *group, const char *topic,
                    const char *filter)
{
    char k[BRK_GROUP_MAX + BRK_TOPIC_MAX + 2];
    uint32_t hash = 0;
    size_t n = fc_key(group, topic, k, sizeof k, &hash);
    char *f = filter ? strdup(filter) : NULL;
    pthread_mutex_lock(&h->fc_mu);
    bool alone = !h->fc_overlap;
    if (--h->fc_applying == 0)
        h->fc_overlap = false;
    if (n && f && alone) {
        fc_drop(h, k, n, hash);
        fc_insert(h, k, n, hash, f);
        f = NULL;
    }
    pthread_mutex_unlock(&h->fc_mu);
    free(f);
}
