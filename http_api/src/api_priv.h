/*
 * api_priv.h - the request handler's insides, shared by handler.c,
 * problem.c and the routes_*.c files (http_api private).
 *
 * A request runs as one api_call on the caller's (MHD) thread: handler.c
 * matches the route, applies the checks every route shares (413, 503 while
 * draining, 415, the JSON body), then calls the route function, which
 * validates its fields, calls broker_core and fills the response through
 * the reply helpers of problem.c.  Nothing in an api_call outlives the
 * api_handle call, except what the transport keeps in api_wait.
 *
 * Locks (all leaves: nothing else is taken while one is held, and no
 * broker call is made under one):
 *   api_handler.fc_mu   the receive-filter cache
 *   api_metrics.mu      request counters and the duration histogram
 */
#ifndef HTTP_API_API_PRIV_H
#define HTTP_API_API_PRIV_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "http_api/api.h"
#include "idem.h"
#include "metrics.h"

#define API_CT_JSON     "application/json"
#define API_CT_PROBLEM  "application/problem+json"
#define API_CT_METRICS  "text/plain; version=0.0.4; charset=utf-8"

#define API_PARAM_MAX   255         /* longest path parameter we look at */
#define API_FC_BUCKETS  64          /* receive-filter cache */
#define API_FC_MAX      4096        /* entries before the cache starts over */

/* One (group, topic) -> filter this handler has applied with brk_group_put. */
typedef struct api_fc_entry {
    struct api_fc_entry *next;
    uint32_t hash;
    char *gt;                       /* "group\0topic\0" */
    size_t gt_len;
    char *filter;                   /* as given */
} api_fc_entry;

struct api_handler {
    api_config cfg;                 /* copy; strings borrowed from the caller
                                       except default_check.expiry_topic */
    char expiry_topic[BRK_TOPIC_MAX + 1]; /* own copy of that one */
    api_broker b;                   /* borrowed; outlive the handler */
    const brk_clock *clock;         /* the store's */
    api_idem *idem;                 /* owned */
    api_metrics *metrics;           /* owned */
    atomic_bool draining;           /* set once by api_handler_drain */
    pthread_mutex_t fc_mu;          /* guards fc, fc_n, fc_applying,
                                       fc_overlap */
    api_fc_entry *fc[API_FC_BUCKETS];
    size_t fc_n;
    unsigned fc_applying;           /* filter puts between begin and end */
    bool fc_overlap;                /* two of them ran at once since
                                       fc_applying was last 0 */
};

/* The request being handled. */
typedef struct api_call {
    api_handler *h;
    const api_request *req;
    api_response *resp;
    api_wait *w;                    /* NULL: never park */
    char param[API_PARAM_MAX + 1];  /* the route's {txid}/{topic}/{group},
                                       NUL-terminated ("" when none) */
    size_t param_len;               /* real length; > API_PARAM_MAX when
                                       the segment was cut */
    json_t *body;                   /* the request object; NULL when the
                                       body was empty */
    int64_t now_ms;                 /* store clock at the start */
} api_call;

typedef api_outcome (*api_route_fn)(api_call *c);

/* ---- routes (routes_*.c) ------------------------------------------------------ */

api_outcome api_route_txn_prepare(api_call *c);
api_outcome api_route_txn_list(api_call *c);
api_outcome api_route_txn_get(api_call *c);
api_outcome api_route_txn_commit(api_call *c);
api_outcome api_route_txn_rollback(api_call *c);
api_outcome api_route_send(api_call *c);
api_outcome api_route_topic_list(api_call *c);
api_outcome api_route_topic_get(api_call *c);
api_outcome api_route_topic_put(api_call *c);
api_outcome api_route_group_put(api_call *c);
api_outcome api_route_group_get(api_call *c);
api_outcome api_route_group_receive(api_call *c);
api_outcome api_route_group_ack(api_call *c);
api_outcome api_route_group_nack(api_call *c);
api_outcome api_route_group_dlq_list(api_call *c);
api_outcome api_route_group_dlq_replay(api_call *c);
api_outcome api_route_healthz(api_call *c);
api_outcome api_route_readyz(api_call *c);
api_outcome api_route_metrics(api_call *c);

/* ---- responses (problem.c) ------------------------------------------------------ */

/* Problem kinds: the rows of the status table at the top of problem.c. */
typedef enum api_prob {
    API_PROB_BAD_REQUEST = 0,       /* 400 */
    API_PROB_UNAUTHORIZED,          /* 401 */
    API_PROB_NOT_FOUND,             /* 404 */
    API_PROB_METHOD,                /* 405 */
    API_PROB_CONFLICT,              /* 409 */
    API_PROB_TOO_LARGE,             /* 413 */
    API_PROB_MEDIA_TYPE,            /* 415 */
    API_PROB_IDEM_REUSED,           /* 422 */
    API_PROB_TOO_MANY,              /* 429 */
    API_PROB_INTERNAL,              /* 500 */
    API_PROB_SHUTTING_DOWN,         /* 503, Retry-After 5 */
    API_PROB_UNAVAILABLE,           /* 503, Retry-After 1 (out of memory) */
    API_PROB_STORE_FULL,            /* 507 */
    API_PROB_COUNT_
} api_prob;

/* The kind a broker status maps to. */
api_prob api_prob_of(brk_status st);

/* HTTP status of a kind. */
int api_prob_http(api_prob k);

/* Fill c->resp with a problem+json of kind k; detail is printf-style and
 * should name the field or object.  Returns API_DONE. */
api_outcome api_problem(api_call *c, api_prob k, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* api_problem for a broker status; 500s are logged with the store's last
 * error. */
api_outcome api_fail(api_call *c, brk_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Send `obj` (taken: freed here) as a compact application/json body.
 * `built` false (a put failed while building it) answers 503 instead. */
api_outcome api_reply(api_call *c, int status, json_t *obj, bool built);

/* A new object, or NULL (then api_reply answers 503 for lack of memory). */
json_t *api_obj(void);

struct api_jbuf;
/* api_reply for a body written directly (codec.h, api_jbuf; taken: the
 * buffer is handed over or freed).  A failed buffer answers 503. */
api_outcome api_reply_jbuf(api_call *c, int status, struct api_jbuf *b);

/* Log through cfg.logger when there is one. */
void api_log(api_handler *h, api_log_level lv, const char *msg,
             const api_log_field *fields, size_t n);

/* ---- shared checks (handler.c) --------------------------------------------------- */

/* Validate the route's path parameter as a topic / group / txid name;
 * on failure the 400 is in c->resp and false comes back. */
bool api_param_topic(api_call *c);
bool api_param_group(api_call *c);
bool api_param_txid(api_call *c);

/* Name rules (docs/http-api.md, "Names"), for body fields too.  NULL when
 * fine, else the reason ("... must be 1..127 bytes of [A-Za-z0-9._-]"). */
const char *api_topic_problem(const char *s, size_t n);
const char *api_group_problem(const char *s, size_t n);
const char *api_member_problem(const char *s, size_t n);
const char *api_txid_problem(const char *s, size_t n);

/* A name field of a request object (prefix "" or e.g. "check."), checked
 * with `check` and copied into out[cap].  Absent: *present false, a 400
 * when required.  On error false, with the 400 in c->resp. */
bool api_body_name(api_call *c, const json_t *obj, const char *prefix,
                   const char *field, bool required,
                   const char *(*check)(const char *, size_t), char *out,
                   size_t cap, bool *present);

/* The request's unknown fields -> 400.  `allowed` is NULL-terminated. */
bool api_fields_ok(api_call *c, const char *const *allowed);

/* Query string parameters of a route that takes some (others ignore the
 * query).  Unknown or repeated names, bad escapes and values over 63
 * bytes are a 400 (in c->resp; false returned). */
typedef struct api_qparam {
    const char *name;               /* in */
    bool present;                   /* out */
    char value[64];                 /* out, decoded */
} api_qparam;
bool api_query(api_call *c, api_qparam *ps, size_t n);

/* A present parameter as an integer in lo..hi (else def); false + 400. */
bool api_query_int(api_call *c, const api_qparam *p, int64_t lo, int64_t hi,
                   int64_t def, int64_t *out);

/* ---- idempotency keys (handler.c) ------------------------------------------------ */

/* State of one request under an Idempotency-Key. */
typedef struct api_idem_use {
    bool active;                    /* a key was given and reserved */
    api_idem_ticket tk;
} api_idem_use;

/* Look the request's Idempotency-Key up.  Returns true when the caller
 * goes on with the operation (u->active tells whether the ticket's ids
 * must be used); false when c->resp is final already (replay, 400, 409,
 * 422, store error). */
bool api_idem_start(api_call *c, const api_idem_intent *in, api_idem_use *u);

/* After the response is set: remember a 2xx (finish), release otherwise
 * (abort).  No-op when !u->active. */
void api_idem_end(api_call *c, api_idem_use *u);

/* ---- receive-filter cache (handler.c) ------------------------------------------- */

/* True when this handler applied exactly `filter` to (group, topic), so a
 * receive repeating it may skip the durable brk_group_put. */
bool api_filter_known(api_handler *h, const char *group, const char *topic,
                      const char *filter);

/* Bracket every brk_group_put of a filter: begin forgets (group, topic);
 * end remembers `filter` (NULL: the put failed) unless another put of any
 * pair ran at the same time, because the broker then keeps whichever put
 * landed last and that order is unknown here. */
void api_filter_begin(api_handler *h, const char *group, const char *topic);
void api_filter_end(api_handler *h, const char *group, const char *topic,
                    const char *filter);

#endif /* HTTP_API_API_PRIV_H */
