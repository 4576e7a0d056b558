/*
 * http_api/api.h - outboxd's HTTP API (v1, JSON, localhost) over broker_core.
 *
 * Two layers, so the request logic can be tested and fuzzed without sockets:
 *
 *   api_handler  transport-free: takes a parsed request (method, path,
 *                query, headers, body bytes) and fills a response (status,
 *                content type, body).  Routes, validation, the JSON codec,
 *                the brk_status -> HTTP mapping, idempotency keys and the
 *                metrics counters all live here.  Long polling is the one
 *                asynchronous case: the handler says API_WAIT and the
 *                transport parks the request until the wake callback runs,
 *                then calls api_handle() again with the same request.
 *   api_server   libmicrohttpd: sockets, keep-alive, body accumulation,
 *                bearer tokens, request worker threads (api_handle may
 *                block in fdatasync), suspend/resume of long polls, request
 *                timing, draining on shutdown.  Owns one api_handler.
 *
 * The routes, fields and status codes are the contract in DESIGN.md ("HTTP
 * API"); docs/openapi.json describes them and tests check both agree
 * (api_routes()).
 *
 * Threads: every function is thread-safe unless it says otherwise.  The
 * broker handles (api_broker) are owned by the caller and outlive the
 * handler/server.
 */
#ifndef HTTP_API_API_H
#define HTTP_API_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "broker/delay.h"
#include "broker/group.h"
#include "broker/status.h"
#include "broker/store.h"
#include "broker/txn.h"

/* ---- logging seam -------------------------------------------------------- */

typedef enum api_log_level {
    API_LOG_DEBUG = 0,
    API_LOG_INFO  = 1,
    API_LOG_WARN  = 2,
    API_LOG_ERROR = 3
} api_log_level;

/* One structured field of a log line ("txid" -> "abc"). */
typedef struct api_log_field {
    const char *key;
    const char *value;
} api_log_field;

/* The sidecar's JSON-lines logger implements this; NULL logs nothing.
 * log() must be thread-safe and must not block for long. */
typedef struct api_logger {
    void (*log)(void *ctx, api_log_level level, const char *msg,
                const api_log_field *fields, size_t nfields);
    void *ctx;
} api_logger;

/* ---- metrics seam --------------------------------------------------------- */

/* More families for GET /metrics from outside http_api (the sidecar's
 * PostgreSQL adapters).  render() writes complete families (# HELP, # TYPE,
 * samples) in Prometheus text format 0.0.4 to `out`; they are appended after
 * http_api's own.  It runs on an HTTP thread for every scrape, possibly on
 * several at once, so it must be thread-safe and quick (read counters; no
 * I/O besides `out`).  A missing newline after the last line is added.
 * The families' names must differ from http_api's own (metrics.c lists
 * them).  The struct and ctx are borrowed and must outlive the
 * handler/server. */
typedef struct api_metrics_ext {
    void (*render)(void *ctx, FILE *out);
    void *ctx;
} api_metrics_ext;

/* ---- configuration --------------------------------------------------------- */

/* The broker handles the API works on.  store, txn, delay and groups are all
 * required (txn opened with `delay`). */
typedef struct api_broker {
    brk_store  *store;
    brk_txn    *txn;
    brk_delay  *delay;
    brk_groups *groups;
} api_broker;

typedef struct api_config {
    /* transport (api_server only) */
    const char *bind_addr;           /* default "127.0.0.1"; IPv4 or IPv6 literal */
    uint16_t    port;                /* default 8080; 0 = any free port (tests),
                                        api_server_port() says which */
    unsigned    threads;             /* MHD worker threads; 0 = online cores */
    unsigned    workers;             /* threads that run requests (broker
                                        calls may block in fdatasync); 0 =
                                        default 64.  A request's connection
                                        is suspended while a worker handles
                                        it, so MHD's threads only move bytes,
                                        and up to `workers` appends share one
                                        fdatasync. */
    unsigned    max_connections;     /* default 4096 */
    unsigned    idle_timeout_s;      /* a connection silent this long (slow or
                                        stuck client) is closed; default 60.
                                        Parked long polls are not idle. */
    const char *token;               /* NULL/"": no auth.  Else every request
                                        but /healthz and /readyz needs
                                        "Authorization: Bearer <token>" (401) */
    /* request handling (api_handler) */
    size_t   max_body_bytes;         /* request body limit, default 1 MiB (413) */
    int64_t  idem_window_ms;         /* Idempotency-Key replay window, default 24 h */
    size_t   idem_max_keys;          /* keys remembered at most (oldest forgotten
                                        first), default 100000 */
    uint32_t default_wait_ms;        /* receive without wait_ms; default 0 */
    brk_check_policy default_check;  /* fields a prepare's "check" object
                                        leaves out; brk_check_policy_init().
                                        expiry_topic is borrowed. */
    const api_logger *logger;        /* NULL: silent */
    const api_metrics_ext *metrics_ext; /* NULL: none; see above */
} api_config;

/* Fill with the defaults above. */
void api_config_init(api_config *c);

/* ---- transport-free request handling -------------------------------------- */

typedef struct api_handler api_handler;

/* Open over the broker handles: creates or reloads the idempotency-key
 * table (internal topic "__idem", rebuilt from the last idem_window_ms).
 * On failure *out is NULL and errbuf says why. */
brk_status api_handler_open(api_handler **out, const api_config *cfg,
                            const api_broker *b, char *errbuf, size_t errlen);
void api_handler_close(api_handler *h);

/* A request as the transport parsed it.  All views stay valid for the
 * whole exchange, including every API_WAIT round. */
typedef struct api_request {
    const char *method;              /* "GET", "POST", ... */
    const char *path;                /* decoded path, no query: "/v1/topics/a" */
    const char *query;               /* raw query string without '?', or NULL */
    /* Header lookup (case-insensitive name); NULL when absent. */
    const char *(*header)(void *ctx, const char *name);
    void *header_ctx;
    const char *body;                /* NULL when there is none */
    size_t body_len;
} api_request;

/* What to send back.  api_handle fills it; the transport sends it and then
 * calls api_response_free. */
typedef struct api_response {
    int status;                      /* HTTP status code */
    const char *content_type;        /* static string */
    char *body;                      /* malloc'ed, may be NULL */
    size_t body_len;
    const char *allow;               /* 405: the Allow header value (static) */
    unsigned retry_after_s;          /* 429/503: Retry-After when > 0 */
    const char *route;               /* route template for metrics, e.g.
                                        "/v1/transactions/{txid}/commit";
                                        "unmatched" when none; static */
} api_response;

void api_response_free(api_response *r);

/* Per-exchange long-poll state, owned by the transport, zeroed before the
 * first api_handle of an exchange.  The handler fills the private part; the
 * transport sets wake/wake_ctx before calling api_handle. */
typedef struct api_wait {
    /* transport -> handler */
    void (*wake)(void *ctx);         /* called once (any thread) when the
                                        parked request should be handled
                                        again; may run before api_handle
                                        returns API_WAIT */
    void *wake_ctx;
    /* handler private */
    int64_t  deadline_ms;            /* 0 until the first round */
    uint64_t waiter_id;
    bool     registered;
} api_wait;

typedef enum api_outcome {
    API_DONE = 0,                    /* *resp is complete: send it */
    API_WAIT = 1                     /* park the request; call api_handle
                                        again after wake() ran */
} api_outcome;

/* Handle one request.  Every error is an application/problem+json body
 * (RFC 9457: type, title, status, detail) with the status DESIGN.md names.
 * `w` may be NULL (then receive never waits: the fuzzer, simple tests). */
api_outcome api_handle(api_handler *h, const api_request *req,
                       api_response *resp, api_wait *w);

/* Forget a parked request (the client went away or the server stops):
 * cancels the broker waiter if its callback has not run.  After it returns
 * wake() will not be called for `w`. */
void api_wait_cancel(api_handler *h, api_wait *w);

/* Shutdown, step 1: /readyz answers 503 at once; new prepares, sends,
 * topic and group PUTs and dead-letter replays get 503 with Retry-After
 * (commits, rollbacks, acks, nacks and reads still work: they finish what
 * clients started); parked long polls, when handled again, return what
 * they have.  Idempotent. */
void api_handler_drain(api_handler *h);
bool api_handler_draining(api_handler *h);

/* Metrics the transport measures (request count by route and status code,
 * request duration histogram).  seconds: wall time from the first byte
 * read to the response queued. */
void api_handler_observe(api_handler *h, const char *method, const char *route,
                         int status, double seconds);

/* ---- route table (for the OpenAPI check and 405s) ------------------------- */

typedef struct api_route_info {
    const char *method;              /* "GET" */
    const char *path;                /* OpenAPI template: "/v1/transactions/{txid}" */
} api_route_info;

/* Every route the handler serves, in table order.  Static storage. */
const api_route_info *api_routes(size_t *count);

/* ---- the libmicrohttpd server --------------------------------------------- */

typedef struct api_server api_server;

/* Open the handler, start cfg->workers request threads and listen (MHD
 * internal thread pool with poll(), cfg->threads I/O threads, suspend/resume
 * for requests in a worker and for long polls).  Errors: INVAL (bad address
 * or config), IO (cannot bind: errbuf names the address and errno text;
 * or cannot start a thread). */
brk_status api_server_open(api_server **out, const api_config *cfg,
                           const api_broker *b, char *errbuf, size_t errlen);

/* The port bound (useful after port 0). */
uint16_t api_server_port(api_server *srv);

api_handler *api_server_handler(api_server *srv);

/* Shutdown, step 1 (api_handler_drain) plus: stop accepting new
 * connections once in-flight exchanges on them are done, and resume every
 * parked long poll so it answers now. */
void api_server_drain(api_server *srv);

/* Wait until no exchange is in flight or timeout_ms passed; true when idle. */
bool api_server_wait_idle(api_server *srv, uint32_t timeout_ms);

/* Drain, let the request workers finish every request they hold or have
 * queued, stop MHD (closing whatever is left), close the handler, free. */
void api_server_close(api_server *srv);

#endif /* HTTP_API_API_H */
