/*
 * problem.c - responses: the status table and the RFC 9457 problem bodies,
 * and the JSON reply helper every route answers through.
 *
 * STATUS TABLE (docs/http-api.md, "Conventions")
 *
 *   brk_status                 HTTP  slug (urn:outboxd:problem:<slug>)   Retry-After
 *   INVAL, RANGE               400   bad-request
 *   (transport: no token)      401   unauthorized
 *   NOTFOUND                   404   not-found
 *   (no route for the method)  405   method-not-allowed (+ Allow)
 *   CONFLICT, EXISTS, READONLY 409   conflict
 *   TOOBIG                     413   payload-too-large
 *   (content type)             415   unsupported-media-type
 *   (Idempotency-Key reuse)    422   idempotency-key-reused
 *   LIMIT                      429   too-many-requests                    1
 *   FAILED, IO, CORRUPT,       500   internal (logged with the store's
 *   BADREC, LOCKED, and the          last error)
 *   non-errors OK/AGAIN/EMPTY
 *   CLOSED (and draining)      503   shutting-down                        5
 *   NOMEM                      503   unavailable                          1
 *   FULL, NOSPC                507   store-full
 *
 * Why NOMEM is not "shutting-down": a client told "shutting down" goes to
 * another instance for good; out of memory is momentary, so it gets its
 * own slug and a short Retry-After.
 */
#include "api_priv.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"

typedef struct prob_row {
    int http;
    const char *slug;
    const char *title;
    unsigned retry_after_s;
} prob_row;

static const prob_row PROBS[API_PROB_COUNT_] = {
    [API_PROB_BAD_REQUEST]   = { 400, "bad-request", "Bad Request", 0 },
    [API_PROB_UNAUTHORIZED]  = { 401, "unauthorized", "Unauthorized", 0 },
    [API_PROB_NOT_FOUND]     = { 404, "not-found", "Not Found", 0 },
    [API_PROB_METHOD]        = { 405, "method-not-allowed",
                                 "Method Not Allowed", 0 },
    [API_PROB_CONFLICT]      = { 409, "conflict", "Conflict", 0 },
    [API_PROB_TOO_LARGE]     = { 413, "payload-too-large",
                                 "Payload Too Large", 0 },
    [API_PROB_MEDIA_TYPE]    = { 415, "unsupported-media-type",
                                 "Unsupported Media Type", 0 },
    [API_PROB_IDEM_REUSED]   = { 422, "idempotency-key-reused",
                                 "Idempotency-Key Reused", 0 },
    [API_PROB_TOO_MANY]      = { 429, "too-many-requests",
                                 "Too Many Requests", 1 },
    [API_PROB_INTERNAL]      = { 500, "internal", "Internal Server Error", 0 },
    [API_PROB_SHUTTING_DOWN] = { 503, "shutting-down", "Shutting Down", 5 },
    [API_PROB_UNAVAILABLE]   = { 503, "unavailable", "Service Unavailable", 1 },
    [API_PROB_STORE_FULL]    = { 507, "store-full", "Insufficient Storage", 0 },
};

static const api_prob BRK_PROBS[BRK_STATUS_COUNT_] = {
    [BRK_OK]       = API_PROB_INTERNAL,
    [BRK_AGAIN]    = API_PROB_INTERNAL,
    [BRK_EMPTY]    = API_PROB_INTERNAL,
    [BRK_NOTFOUND] = API_PROB_NOT_FOUND,
    [BRK_EXISTS]   = API_PROB_CONFLICT,
    [BRK_INVAL]    = API_PROB_BAD_REQUEST,
    [BRK_NOMEM]    = API_PROB_UNAVAILABLE,
    [BRK_IO]       = API_PROB_INTERNAL,
    [BRK_NOSPC]    = API_PROB_STORE_FULL,
    [BRK_FULL]     = API_PROB_STORE_FULL,
    [BRK_CORRUPT]  = API_PROB_INTERNAL,
    [BRK_FAILED]   = API_PROB_INTERNAL,
    [BRK_TOOBIG]   = API_PROB_TOO_LARGE,
    [BRK_RANGE]    = API_PROB_BAD_REQUEST,
    [BRK_READONLY] = API_PROB_CONFLICT,
    [BRK_CLOSED]   = API_PROB_SHUTTING_DOWN,
    [BRK_LIMIT]    = API_PROB_TOO_MANY,
    [BRK_BADREC]   = API_PROB_INTERNAL,
    [BRK_LOCKED]   = API_PROB_INTERNAL,
    [BRK_CONFLICT] = API_PROB_CONFLICT,
};

/* A status added to status.h would map to row 0 (400, blaming the client)
 * until given a row here. */
_Static_assert(BRK_CONFLICT + 1 == BRK_STATUS_COUNT_,
               "give every brk_status a row in BRK_PROBS");

api_prob api_prob_of(brk_status st)
{
    return (unsigned)st < BRK_STATUS_COUNT_ ? BRK_PROBS[st] : API_PROB_INTERNAL;
}

int api_prob_http(api_prob k)
{
    return (unsigned)k < API_PROB_COUNT_ ? PROBS[k].http : 500;
}

void api_log(api_handler *h, api_log_level lv, const char *msg,
             const api_log_field *fields, size_t n)
{
    const api_logger *lg = h ? h->cfg.logger : NULL;
    if (lg && lg->log)
        lg->log(lg->ctx, lv, msg, fields, n);
}

/* Last resort when even the problem body cannot be built. */
static api_outcome bare(api_call *c, int status)
{
    free(c->resp->body);
    c->resp->body = NULL;
    c->resp->body_len = 0;
    c->resp->status = status;
    c->resp->content_type = API_CT_PROBLEM;
    return API_DONE;
}

static api_outcome problem_v(api_call *c, api_prob k, const char *fmt,
                             va_list ap)
{
    if ((unsigned)k >= API_PROB_COUNT_)
        k = API_PROB_INTERNAL;
    const prob_row *p = &PROBS[k];
    char detail[512];
    vsnprintf(detail, sizeof detail, fmt, ap);
    char type[64];
    snprintf(type, sizeof type, "urn:outboxd:problem:%s", p->slug);
    json_t *o = json_object();
    bool ok = o && api_json_put(o, "type", json_string(type))
              && api_json_put(o, "title", json_string(p->title))
              && api_json_put(o, "status", json_integer(p->http))
              && api_json_put(o, "detail", api_json_text(detail,
                                                         strlen(detail)));
    size_t len = 0;
    char *text = ok ? api_json_dump(o, &len) : NULL;
    json_decref(o);
    c->resp->retry_after_s = p->retry_after_s;
    if (!text)
        return bare(c, p->http);
    free(c->resp->body);
    c->resp->body = text;
    c->resp->body_len = len;
    c->resp->status = p->http;
    c->resp->content_type = API_CT_PROBLEM;
    return API_DONE;
}

api_outcome api_problem(api_call *c, api_prob k, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    api_outcome o = problem_v(c, k, fmt, ap);
    va_end(ap);
    return o;
}

api_outcome api_fail(api_call *c, brk_status st, const char *fmt, ...)
{
    api_prob k = api_prob_of(st);
    va_list ap;
    va_start(ap, fmt);
    api_outcome o = problem_v(c, k, fmt, ap);
    va_end(ap);
    if (k == API_PROB_INTERNAL || k == API_PROB_UNAVAILABLE) {
        const char *why = c->h->b.store ? brk_store_errstr(c->h->b.store) : "";
        api_log_field f[] = {
            { "method", c->req->method ? c->req->method : "" },
            { "path", c->req->path ? c->req->path : "" },
            { "status", brk_status_name(st) },
            { "store_error", why ? why : "" },
        };
        api_log(c->h, API_LOG_ERROR, "request failed in broker_core", f,
                sizeof f / sizeof f[0]);
    }
    return o;
}

json_t *api_obj(void)
{
    return json_object();
}

static api_outcome reply_text(api_call *c, int status, char *text, size_t len)
{
    if (!text)
        return api_problem(c, API_PROB_UNAVAILABLE, "out of memory while "
                           "building the response");
    free(c->resp->body);
    c->resp->body = text;
    c->resp->body_len = len;
    c->resp->status = status;
    c->resp->content_type = API_CT_JSON;
    c->resp->retry_after_s = 0;
    return API_DONE;
}

api_outcome api_reply(api_call *c, int status, json_t *obj, bool built)
{
    size_t len = 0;
    char *text = obj && built ? api_json_dump(obj, &len) : NULL;
    json_decref(obj);
    return reply_text(c, status, text, len);
}

api_outcome api_reply_jbuf(api_call *c, int status, api_jbuf *b)
{
    size_t len = 0;
    char *text = api_jbuf_take(b, &len);
    return reply_text(c, status, text, len);
}
