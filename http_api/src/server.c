/*
 * server.c - the libmicrohttpd transport: api_server_* of http_api/api.h.
 *
 * THREADS
 * =======
 * MHD runs an internal thread pool (cfg->threads I/O threads, each polling
 * its own connections with poll(): see start_daemon for why not epoll).  A
 * connection lives on one I/O thread; the access handler and the
 * completion callback of its requests run there.  Those threads
 * only move bytes: once a request's body is complete the access handler
 * suspends the connection and hands the request to the request workers
 * (workers.c, cfg->workers threads), where api_handle runs and may block in
 * a SYNC append's fdatasync.  With many requests in workers at once, the
 * store's group commit covers them all with one fdatasync; on the I/O
 * thread only two appends (one per core) could ever be in flight.  The
 * worker stores the response and resumes the connection; the access handler
 * then queues it on the I/O thread (MHD_queue_response must run there).
 * /healthz, /readyz, /metrics and the server's own 401/413 answers run
 * inline on the I/O thread, so liveness answers while every worker blocks;
 * the inline routes never wait (api_handle gets no api_wait).
 *
 * Wake callbacks run on whatever thread the broker fires them from (a
 * sender, the groups timer thread, or a worker inside api_handle).  MHD is
 * built with suspend/resume, which implies an inter-thread channel
 * (MHD_USE_ITC): that is what lets MHD_resume_connection and
 * MHD_quiesce_daemon reach an I/O thread blocked in poll.
 *
 * ONE EXCHANGE (srv_req)
 * ======================
 * Created by the URI log callback (the first thing MHD does for a request:
 * it gives the raw request-target, so the query string reaches the handler
 * exactly as the client sent it, and starts the request timer).  Everything
 * the request owns - the state, the query copy, the body buffer, a stored
 * response - is freed in one place, req_free(), called only from the
 * completion callback (MHD calls it for every request that reached the URI
 * callback).  The job a worker runs is embedded in srv_req: a request is on
 * the workers' queue at most once, so the queue never holds more jobs than
 * there are connections.
 *
 *   access handler, 1st call (headers):  count in-flight; refuse with 401
 *                                        (token) or 413 (Content-Length):
 *                                        see refuse() for when the answer
 *                                        waits for the body to be dropped
 *   access handler, body chunks:         appended up to max_body_bytes; past
 *                                        it (or once refused) counted and
 *                                        dropped, and the connection closed
 *                                        past 16 times the limit
 *   access handler, final call:          the refusal, if any; else dispatch
 *                                        to a worker (below); the inline
 *                                        routes, and every request once the
 *                                        workers are closing, run api_handle
 *                                        on the I/O thread
 *   completion callback:                 api_wait_cancel, uncount, req_free
 *
 * STATE MACHINE (phase, under srv_req.mu)
 * =======================================
 *
 *   BODY --dispatch: MHD_suspend_connection, then submit--> QUEUED
 *   QUEUED --a worker takes the job--> RUNNING (woken := false)
 *   RUNNING, in a worker:
 *     API_DONE: store the response --> ANSWERED, then MHD_resume outside mu
 *     API_WAIT, woken meanwhile ----> call api_handle again (RUNNING)
 *     API_WAIT, draining -----------> api_wait_cancel, api_handle without a
 *                                     wait (never parks), store --> ANSWERED
 *     API_WAIT, else ---------------> SUSPENDED, on srv->parked (under
 *                                     srv->mu too); the connection stays
 *                                     suspended from the dispatch
 *   ANSWERED --access handler--> MHD_queue_response --> DONE
 *   SUSPENDED --wake() or api_server_drain()--> RESUMING under mu, then
 *                                     MHD_resume outside it (exactly one
 *                                     caller wins SUSPENDED -> RESUMING)
 *   RESUMING --access handler: leave srv->parked--> dispatch again (QUEUED)
 *
 *   Inline routes (I/O thread): BODY --> RUNNING --> DONE, never waiting.
 *   Once the workers are closing (after drain) the dispatch runs the job
 *   itself, on the I/O thread, through the same QUEUED..ANSWERED path.
 *
 *   wake() in RUNNING sets `woken` (the wake beat the API_WAIT, or ran
 *   inside api_handle); in any other phase but SUSPENDED it does nothing
 *   (QUEUED and RESUMING are about to call api_handle anyway).
 *
 * Guarantees:
 *   - A wake is never lost: it finds SUSPENDED and resumes, or RUNNING and
 *     the check before parking sees `woken`.
 *   - Each suspension has exactly one resume: the worker's (ANSWERED), a
 *     wake's or drain's (RESUMING); each of them is the only one to leave
 *     its phase, under mu.  The dispatch suspends before it submits, so no
 *     worker can resume a connection that is not suspended yet.
 *   - The srv_req outlives every use by a worker or a wake: a suspended
 *     connection cannot complete, and nobody touches rq after the resume
 *     that ends its suspension.  The server outlives them too: close joins
 *     the workers, and waits for every wake between its SUSPENDED ->
 *     RESUMING and the return of its MHD_resume_connection
 *     (srv->wakes_resuming), so MHD never stops with such a connection
 *     still suspended, nor is resumed after it stopped.
 *   - Client gone: MHD does not poll a suspended connection, so it notices
 *     only after the resume (ANSWERED: the stored response is freed unsent;
 *     RESUMING: nothing more runs); the completion callback calls
 *     api_wait_cancel, which returns once no wake callback can run any
 *     more, and frees the request.  Suspended connections are exempt from
 *     MHD's idle timeout, so a worker's request is never cut under it.
 *
 * LOCKS
 * =====
 *   srv->mu   parked list, draining, quiesced, inflight (+ idle_cv, also
 *             signalled when wakes_resuming, an atomic, drops to 0)
 *   rq->mu    phase, woken
 * Order: srv->mu before rq->mu.  Wake takes rq->mu, then (alone) srv->mu
 * to signal close; the workers' own lock (workers.c) is taken with none of
 * ours held.  MHD_suspend (only in dispatch, in the access handler, as MHD
 * requires), MHD_resume and api_* calls are made with none held.
 *
 * DRAIN AND CLOSE
 * ===============
 * api_server_drain: api_handler_drain (503s from now on), mark draining,
 * move every SUSPENDED request to RESUMING and resume it (each answers with
 * what it has), then MHD_quiesce_daemon: no new connections.  The listen
 * socket MHD hands back is shut down at once (pending and later connects
 * are refused instead of hanging in the backlog) and closed after
 * MHD_stop_daemon, as MHD requires.  Requests in a worker or on its queue
 * finish normally (a queued send now gets its 503); exchanges in flight,
 * also on kept-alive connections, carry on; api_server_wait_idle waits for
 * them.  api_server_close drains, waits for the wakes still resuming a
 * connection, then closes the workers: from then on requests run inline,
 * and the close waits until the jobs already queued or running are done
 * (each resumed its connection; none parks, as draining is set), so no
 * connection is suspended when MHD_stop_daemon runs (MHD aborts the
 * process when one is).
 */
#include "http_api/api.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>

#include "workers.h"

#define SRV_DEFAULT_ADDR      "127.0.0.1"
#define SRV_DEFAULT_BODY      (1u << 20)
#define SRV_DEFAULT_CONNS     4096u
#define SRV_CT_PROBLEM        "application/problem+json"
#define SRV_ROUTE_UNMATCHED   "unmatched"
#define SRV_BODY_MIN_CAP      4096u
#define SRV_BODY_MAX_PREALLOC (64u << 10)
/* A refused request's body (401, 413) is read and dropped before the answer
 * when it is at most this many times the body limit (see refuse()). */
#define SRV_DISCARD_FACTOR    16u
#define SRV_DEFAULT_WORKERS   64u
/* Request workers' stacks.  The deepest path is jansson's: dumping a body
 * at the parser's depth limit (2048 levels, a 4 KiB request) recurses
 * through about 620 KiB; our own frames (handler, txn, store) take under
 * 100 KiB.  256 KiB would let one small request crash the process.  Only
 * touched pages are resident.  Sanitizers' redzones need more. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SRV_WORKER_STACK      (2048u << 10)
#else
#define SRV_WORKER_STACK      (1024u << 10)
#endif

typedef enum rq_phase {
    RQ_HEADERS = 0,   /* URI seen, access handler not called yet */
    RQ_BODY,          /* headers accepted, body arriving */
    RQ_QUEUED,        /* suspended, on the workers' queue */
    RQ_RUNNING,       /* in api_handle (or about to be) */
    RQ_ANSWERED,      /* a worker stored the response and resumed */
    RQ_SUSPENDED,     /* parked: connection suspended */
    RQ_RESUMING,      /* resume requested, access handler not yet back */
    RQ_DONE           /* response queued */
} rq_phase;

typedef struct srv_req {
    struct api_server *srv;
    struct MHD_Connection *conn;     /* set at the first access call */
    pthread_mutex_t mu;              /* phase, woken */
    rq_phase phase;
    bool woken;
    /* the connection's I/O thread only */
    bool counted;                    /* in srv->inflight */
    bool handled;                    /* api_handle was (about to be) called */
    int refused;                     /* 401 or 413 once decided, else 0 */
    uint64_t discarded;              /* body bytes dropped since */
    int64_t t0_ns;                   /* store clock mono_ns at the URI */
    const char *method;              /* MHD's, valid for the request */
    char *body;
    size_t body_len, body_cap;
    api_request req;
    api_wait wait;
    /* whoever runs api_handle (phases QUEUED..ANSWERED: a worker) */
    api_job job;
    api_response resp;               /* ANSWERED: what to queue */
    /* srv->mu */
    bool listed;                     /* on srv->parked */
    struct srv_req *prev, *next;
    struct srv_req *drain_next;      /* drain's private list */
    bool has_query;
    char query[];                    /* raw query string, NUL-terminated */
} srv_req;

struct api_server {
    struct MHD_Daemon *d;
    api_handler *h;                  /* owned */
    api_workers *workers;            /* owned; run api_handle */
    const brk_clock *clock;          /* the store's */
    api_logger logger;               /* copy; log NULL: silent */
    char *token;                     /* NULL: no auth */
    size_t token_len;
    size_t max_body;
    atomic_uint wakes_resuming;      /* wake() calls between claiming a
                                        parked request and the return of
                                        their MHD_resume_connection */
    pthread_mutex_t mu;              /* everything below */
    pthread_cond_t idle_cv;          /* inflight or wakes_resuming reached 0
                                        (CLOCK_MONOTONIC) */
    uint64_t inflight;               /* exchanges between first access call
                                        and completion */
    srv_req *parked;                 /* suspended requests */
    bool draining;
    bool quiesced;
    MHD_socket listen_fd;            /* from MHD_quiesce_daemon */
};

/* ---- small helpers -------------------------------------------------------- */

static void set_err(char *buf, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *buf, size_t len, const char *fmt, ...)
{
    if (!buf || !len)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
}

static void srv_log(api_server *srv, api_log_level lv, const char *msg,
                    const api_log_field *f, size_t n)
{
    if (srv->logger.log)
        srv->logger.log(srv->logger.ctx, lv, msg, f, n);
}

/* MHD_OPTION_EXTERNAL_LOGGER: MHD's own complaints (accept failures, bad
 * requests) go to our logger as warnings. */
static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    api_server *srv = cls;
    if (!srv->logger.log)
        return;
    char buf[512];
    vsnprintf(buf, sizeof buf, fmt, ap);
    size_t n = strlen(buf);
    while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        buf[--n] = 0;
    api_log_field f = { "component", "libmicrohttpd" };
    srv_log(srv, API_LOG_WARN, buf, &f, 1);
}

static int64_t mono_ns(const api_server *srv)
{
    return srv->clock->mono_ns(srv->clock->ctx);
}

/* Equal in time that depends only on the configured token's length. */
static bool token_equal(const char *given, size_t glen, const char *want,
                        size_t wlen)
{
    volatile unsigned char d = (unsigned char)(glen != wlen);
    for (size_t i = 0; i < wlen; i++) {
        unsigned char g = i < glen ? (unsigned char)given[i] : 0;
        d |= (unsigned char)(g ^ (unsigned char)want[i]);
    }
    return d == 0;
}

/* ---- per-request state ---------------------------------------------------- */

static srv_req *req_new(api_server *srv, const char *uri)
{
    const char *q = uri ? strchr(uri, '?') : NULL;
    size_t ql = q ? strlen(q + 1) : 0;
    srv_req *rq = calloc(1, sizeof *rq + ql + 1);
    if (!rq)
        return NULL;
    pthread_mutex_init(&rq->mu, NULL);
    rq->srv = srv;
    rq->phase = RQ_HEADERS;
    rq->t0_ns = mono_ns(srv);
    if (q) {
        memcpy(rq->query, q + 1, ql + 1);
        rq->has_query = true;
    }
    return rq;
}

/* The one place a request's memory goes. */
static void req_free(srv_req *rq)
{
    api_response_free(&rq->resp);    /* answered, but the client went away */
    free(rq->body);
    pthread_mutex_destroy(&rq->mu);
    free(rq);
}

static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn)
{
    (void)conn;
    return req_new(cls, uri);
}

static const char *req_header(void *ctx, const char *name)
{
    srv_req *rq = ctx;
    return MHD_lookup_connection_value(rq->conn, MHD_HEADER_KIND, name);
}

static rq_phase get_phase(srv_req *rq)
{
    pthread_mutex_lock(&rq->mu);
    rq_phase p = rq->phase;
    pthread_mutex_unlock(&rq->mu);
    return p;
}

static void set_phase(srv_req *rq, rq_phase p)
{
    pthread_mutex_lock(&rq->mu);
    rq->phase = p;
    pthread_mutex_unlock(&rq->mu);
}

/* srv->mu held. */
static void unlist(api_server *srv, srv_req *rq)
{
    if (!rq->listed)
        return;
    if (rq->prev)
        rq->prev->next = rq->next;
    else
        srv->parked = rq->next;
    if (rq->next)
        rq->next->prev = rq->prev;
    rq->prev = rq->next = NULL;
    rq->listed = false;
}

/* ---- responses -------------------------------------------------------------- */

static enum MHD_Result send_resp(api_server *srv, srv_req *rq, api_response *r)
{
    struct MHD_Response *mr;
    if (r->body && r->body_len) {
        mr = MHD_create_response_from_buffer(r->body_len, r->body,
                                             MHD_RESPMEM_MUST_FREE);
        if (mr)
            r->body = NULL;          /* MHD frees it with free() */
    } else {
        mr = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    }
    enum MHD_Result ok = MHD_NO;
    if (mr) {
        if (r->content_type)
            MHD_add_response_header(mr, MHD_HTTP_HEADER_CONTENT_TYPE, r->content_type);
        if (r->allow)
            MHD_add_response_header(mr, MHD_HTTP_HEADER_ALLOW, r->allow);
        if (r->retry_after_s) {
            char ra[16];
            snprintf(ra, sizeof ra, "%u", r->retry_after_s);
            MHD_add_response_header(mr, MHD_HTTP_HEADER_RETRY_AFTER, ra);
        }
        if (r->status == 401)
            MHD_add_response_header(mr, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
        ok = MHD_queue_response(rq->conn, (unsigned)r->status, mr);
        MHD_destroy_response(mr);
    }
    set_phase(rq, RQ_DONE);
    double secs = (double)(mono_ns(srv) - rq->t0_ns) / 1e9;
    api_handler_observe(srv->h, rq->method,
                        r->route ? r->route : SRV_ROUTE_UNMATCHED,
                        r->status, secs < 0 ? 0 : secs);
    api_response_free(r);
    return ok;
}

/* A problem+json the transport answers itself (401, 413). */
static enum MHD_Result send_problem(api_server *srv, srv_req *rq, int status,
                                    const char *slug, const char *title,
                                    const char *detail)
{
    api_response r;
    memset(&r, 0, sizeof r);
    r.status = status;
    r.content_type = SRV_CT_PROBLEM;
    r.route = SRV_ROUTE_UNMATCHED;
    const char *fmt = "{\"type\":\"urn:outboxd:problem:%s\",\"title\":\"%s\","
                      "\"status\":%d,\"detail\":\"%s\"}";
    int n = snprintf(NULL, 0, fmt, slug, title, status, detail);
    r.body = n > 0 ? malloc((size_t)n + 1) : NULL;
    if (r.body) {
        snprintf(r.body, (size_t)n + 1, fmt, slug, title, status, detail);
        r.body_len = (size_t)n;
    }
    return send_resp(srv, rq, &r);
}

static enum MHD_Result send_refusal(api_server *srv, srv_req *rq)
{
    if (rq->refused == 401)
        return send_problem(srv, rq, 401, "unauthorized", "Unauthorized",
                            "this route needs Authorization: Bearer <token>");
    char detail[128];
    snprintf(detail, sizeof detail,
             "the request body is larger than %zu bytes", srv->max_body);
    return send_problem(srv, rq, 413, "payload-too-large", "Payload Too Large",
                        detail);
}

/* ---- first call: headers ------------------------------------------------------ */

static bool auth_exempt(const char *url)
{
    return strcmp(url, "/healthz") == 0 || strcmp(url, "/readyz") == 0;
}

static bool auth_ok(api_server *srv, struct MHD_Connection *conn)
{
    const char *a = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                MHD_HTTP_HEADER_AUTHORIZATION);
    if (!a || strncasecmp(a, "Bearer ", 7) != 0)
        return false;
    a += 7;
    while (*a == ' ')
        a++;
    size_t n = strlen(a);
    while (n && a[n - 1] == ' ')
        n--;
    return token_equal(a, n, srv->token, srv->token_len);
}

/* The body the headers announce: its Content-Length (MHD has checked it),
 * UINT64_MAX when chunked (unknown), 0 when none. */
static uint64_t declared_body(struct MHD_Connection *conn)
{
    const char *te = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                 MHD_HTTP_HEADER_TRANSFER_ENCODING);
    if (te && strcasestr(te, "chunked"))
        return UINT64_MAX;
    const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                 MHD_HTTP_HEADER_CONTENT_LENGTH);
    return cl ? strtoull(cl, NULL, 10) : 0;
}

static bool expects_continue(struct MHD_Connection *conn)
{
    const char *e = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                MHD_HTTP_HEADER_EXPECT);
    return e && strcasecmp(e, "100-continue") == 0;
}

static uint64_t discard_max(const api_server *srv)
{
    uint64_t m = srv->max_body;
    return m > UINT64_MAX / SRV_DISCARD_FACTOR ? UINT64_MAX
                                               : m * SRV_DISCARD_FACTOR;
}

/* Refuse the request (401, 413) before its body reaches the handler.
 * Answered while the client still sends, MHD closes the connection with
 * bytes unread and the client may get a reset instead of the answer; so
 * the body is read and dropped first (on_chunk) and the answer goes out
 * on the final call.  At once when there is no body, when the client waits
 * for 100-continue (it sends nothing before an answer), or when the body
 * announced is over the discard bound (the connection then closes). */
static enum MHD_Result refuse(api_server *srv, srv_req *rq, int status,
                              uint64_t body)
{
    rq->refused = status;
    if (body == 0 || expects_continue(rq->conn)
        || (body != UINT64_MAX && body > discard_max(srv)))
        return send_refusal(srv, rq);
    set_phase(rq, RQ_BODY);
    return MHD_YES;
}

static void request_init(srv_req *rq, const char *url, const char *method,
                         uint64_t body)
{
    if (body && body != UINT64_MAX) {
        /* Reserve what was announced, up to a point: a client may announce
         * a megabyte and send it slowly. */
        size_t hint = body > SRV_BODY_MAX_PREALLOC ? SRV_BODY_MAX_PREALLOC
                                                   : (size_t)body;
        rq->body = malloc(hint);
        rq->body_cap = rq->body ? hint : 0;
    }
    rq->req.method = method;
    rq->req.path = url;
    rq->req.query = rq->has_query ? rq->query : NULL;
    rq->req.header = req_header;
    rq->req.header_ctx = rq;
}

static enum MHD_Result on_headers(api_server *srv, srv_req *rq,
                                  struct MHD_Connection *conn, const char *url,
                                  const char *method)
{
    rq->conn = conn;
    rq->method = method;
    rq->counted = true;
    pthread_mutex_lock(&srv->mu);
    srv->inflight++;
    pthread_mutex_unlock(&srv->mu);
    uint64_t body = declared_body(conn);
    if (srv->token && !auth_exempt(url) && !auth_ok(srv, conn))
        return refuse(srv, rq, 401, body);
    if (body != UINT64_MAX && body > srv->max_body)
        return refuse(srv, rq, 413, body);
    request_init(rq, url, method, body);
    set_phase(rq, RQ_BODY);
    return MHD_YES;
}

/* Body bytes: kept up to max_body.  Past it (a chunked body), or once the
 * request is refused, they are counted and dropped; past the discard
 * bound the connection is closed (false). */
static bool on_chunk(api_server *srv, srv_req *rq, const char *data, size_t n)
{
    if (!rq->refused && n > srv->max_body - rq->body_len) {
        rq->refused = 413;
        rq->discarded = rq->body_len;
        free(rq->body);
        rq->body = NULL;
        rq->body_len = rq->body_cap = 0;
    }
    if (rq->refused) {
        rq->discarded += n;
        return rq->discarded <= discard_max(srv);
    }
    if (rq->body_len + n > rq->body_cap) {
        size_t cap = rq->body_cap ? rq->body_cap : SRV_BODY_MIN_CAP;
        while (cap < rq->body_len + n)
            cap *= 2;
        if (cap > srv->max_body)
            cap = srv->max_body;
        char *nb = realloc(rq->body, cap);
        if (!nb)
            return false;
        rq->body = nb;
        rq->body_cap = cap;
    }
    memcpy(rq->body + rq->body_len, data, n);
    rq->body_len += n;
    return true;
}

/* ---- api_handle, workers and parking ---------------------------------------------- */

static void on_wake(void *ctx)
{
    srv_req *rq = ctx;
    api_server *srv = rq->srv;
    struct MHD_Connection *resume = NULL;
    pthread_mutex_lock(&rq->mu);
    if (rq->phase == RQ_SUSPENDED) {
        rq->phase = RQ_RESUMING;
        resume = rq->conn;
        /* Counted before drain can see RESUMING (it takes rq->mu): close
         * must not stop MHD before this resume is through. */
        atomic_fetch_add(&srv->wakes_resuming, 1);
    } else if (rq->phase == RQ_RUNNING) {
        rq->woken = true;
    }
    pthread_mutex_unlock(&rq->mu);
    if (!resume)
        return;
    /* Still suspended until this call, so rq and conn are alive; rq must
     * not be touched after it (srv lives until close saw the count drop). */
    MHD_resume_connection(resume);
    if (atomic_fetch_sub(&srv->wakes_resuming, 1) == 1) {
        pthread_mutex_lock(&srv->mu);
        pthread_cond_broadcast(&srv->idle_cv);
        pthread_mutex_unlock(&srv->mu);
    }
}

typedef enum park_result { PARKED, WOKEN, DRAINING } park_result;

/* API_WAIT in a worker: park unless woken or draining.  The connection
 * stays suspended from the dispatch. */
static park_result park(api_server *srv, srv_req *rq)
{
    park_result res = PARKED;
    pthread_mutex_lock(&srv->mu);
    pthread_mutex_lock(&rq->mu);
    if (srv->draining) {
        res = DRAINING;
    } else if (rq->woken) {
        res = WOKEN;
    } else {
        rq->phase = RQ_SUSPENDED;
        rq->listed = true;
        rq->prev = NULL;
        rq->next = srv->parked;
        if (srv->parked)
            srv->parked->prev = rq;
        srv->parked = rq;
    }
    pthread_mutex_unlock(&rq->mu);
    pthread_mutex_unlock(&srv->mu);
    return res;
}

/* api_handle until it is done or parked: true with *resp filled when done,
 * false when parked (the wake or drain resumes the connection). */
static bool handle(api_server *srv, srv_req *rq, api_response *resp)
{
    for (;;) {
        pthread_mutex_lock(&rq->mu);
        rq->phase = RQ_RUNNING;
        rq->woken = false;
        pthread_mutex_unlock(&rq->mu);
        memset(resp, 0, sizeof *resp);
        if (api_handle(srv->h, &rq->req, resp, &rq->wait) == API_DONE)
            return true;
        api_response_free(resp);
        switch (park(srv, rq)) {
        case PARKED:
            return false;
        case WOKEN:
            continue;
        case DRAINING:
            /* Never park once draining (drain resumed everyone already):
             * forget the waiter and answer with what there is now. */
            api_wait_cancel(srv->h, &rq->wait);
            memset(resp, 0, sizeof *resp);
            (void)api_handle(srv->h, &rq->req, resp, NULL);
            return true;
        }
    }
}

/* A worker's job: handle, store the answer, give the connection back. */
static void job_run(api_job *job)
{
    srv_req *rq = (srv_req *)(void *)((char *)job - offsetof(srv_req, job));
    api_response resp;
    if (!handle(rq->srv, rq, &resp))
        return;                      /* parked: still suspended */
    struct MHD_Connection *conn = rq->conn;
    pthread_mutex_lock(&rq->mu);
    rq->resp = resp;
    rq->phase = RQ_ANSWERED;
    pthread_mutex_unlock(&rq->mu);
    /* The suspension from the dispatch ends here; rq must not be touched
     * after it. */
    MHD_resume_connection(conn);
}

static void prepare_handle(srv_req *rq)
{
    if (rq->handled)
        return;
    rq->handled = true;
    rq->req.body = rq->body_len ? rq->body : NULL;
    rq->req.body_len = rq->body_len;
    rq->wait.wake = on_wake;
    rq->wait.wake_ctx = rq;
    rq->job.run = job_run;
}

/* No api_wait: the handler never parks a request on the I/O thread. */
static enum MHD_Result run_inline(api_server *srv, srv_req *rq)
{
    api_response resp;
    memset(&resp, 0, sizeof resp);
    prepare_handle(rq);
    set_phase(rq, RQ_RUNNING);
    (void)api_handle(srv->h, &rq->req, &resp, NULL);
    return send_resp(srv, rq, &resp);
}

/* Hand the request to a worker, the connection suspended until it answers
 * (suspended first: then no worker can resume it before).  Once the workers
 * are closing, run the job here: it answers and resumes all the same, and
 * MHD calls the access handler again. */
static enum MHD_Result dispatch(api_server *srv, srv_req *rq)
{
    prepare_handle(rq);
    set_phase(rq, RQ_QUEUED);
    MHD_suspend_connection(rq->conn);
    if (!api_workers_submit(srv->workers, &rq->job))
        job_run(&rq->job);
    return MHD_YES;
}

/* Answered on the I/O thread: liveness, readiness and metrics must not
 * wait behind requests blocked in fdatasync. */
static bool runs_inline(const char *url)
{
    return strcmp(url, "/healthz") == 0 || strcmp(url, "/readyz") == 0 ||
           strcmp(url, "/metrics") == 0;
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *conn,
                                 const char *url, const char *method,
                                 const char *version, const char *upload,
                                 size_t *upload_size, void **con_cls)
{
    (void)version;
    api_server *srv = cls;
    srv_req *rq = *con_cls;
    if (!rq)                         /* the URI callback ran out of memory:
                                        no query string to handle it with */
        return MHD_NO;
    rq_phase ph = get_phase(rq);
    if (ph == RQ_HEADERS)
        return on_headers(srv, rq, conn, url, method);
    if (*upload_size) {
        bool ok = on_chunk(srv, rq, upload, *upload_size);
        *upload_size = 0;
        return ok ? MHD_YES : MHD_NO;
    }
    switch (ph) {
    case RQ_ANSWERED:
        return send_resp(srv, rq, &rq->resp);
    case RQ_RESUMING:
        pthread_mutex_lock(&srv->mu);
        unlist(srv, rq);
        pthread_mutex_unlock(&srv->mu);
        return dispatch(srv, rq);
    case RQ_BODY:
        if (rq->refused)
            return send_refusal(srv, rq);
        return runs_inline(url) ? run_inline(srv, rq) : dispatch(srv, rq);
    default:
        return MHD_NO;               /* not called in other phases */
    }
}

static void on_completed(void *cls, struct MHD_Connection *conn,
                         void **con_cls, enum MHD_RequestTerminationCode toe)
{
    (void)conn;
    (void)toe;
    api_server *srv = cls;
    srv_req *rq = *con_cls;
    if (!rq)
        return;
    *con_cls = NULL;
    /* After this no wake can run for rq (it waits for a running one). */
    if (rq->handled)
        api_wait_cancel(srv->h, &rq->wait);
    pthread_mutex_lock(&srv->mu);
    unlist(srv, rq);
    if (rq->counted && --srv->inflight == 0)
        pthread_cond_broadcast(&srv->idle_cv);
    pthread_mutex_unlock(&srv->mu);
    req_free(rq);
}

/* ---- open ----------------------------------------------------------------------- */

typedef struct srv_addr {
    union {
        struct sockaddr sa;
        struct sockaddr_in v4;
        struct sockaddr_in6 v6;
    } u;
    socklen_t len;
    bool v6;
} srv_addr;

static bool parse_addr(const char *s, uint16_t port, srv_addr *a)
{
    memset(a, 0, sizeof *a);
    if (inet_pton(AF_INET, s, &a->u.v4.sin_addr) == 1) {
        a->u.v4.sin_family = AF_INET;
        a->u.v4.sin_port = htons(port);
        a->len = sizeof a->u.v4;
        return true;
    }
    if (inet_pton(AF_INET6, s, &a->u.v6.sin6_addr) == 1) {
        a->u.v6.sin6_family = AF_INET6;
        a->u.v6.sin6_port = htons(port);
        a->len = sizeof a->u.v6;
        a->v6 = true;
        return true;
    }
    return false;
}

/* MHD does not report why it failed; when it was the bind, repeating it
 * gives the errno (the usual one: the port is taken). */
static void explain_bind(const srv_addr *a, const char *addr, uint16_t port,
                         char *errbuf, size_t errlen)
{
    int fd = socket(a->u.sa.sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int e = fd < 0 ? errno : 0;
    if (fd >= 0) {
        int one = 1;
        (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, &a->u.sa, a->len) != 0)
            e = errno;
        close(fd);
    }
    const char *l = a->v6 ? "[" : "", *r = a->v6 ? "]" : "";
    if (e)
        set_err(errbuf, errlen, "cannot listen on %s%s%s:%u: %s", l, addr, r,
                (unsigned)port, strerror(e));
    else
        set_err(errbuf, errlen, "cannot start the HTTP server on %s%s%s:%u "
                "(libmicrohttpd refused; see its log line)", l, addr, r,
                (unsigned)port);
}

static unsigned pool_size(const api_config *cfg)
{
    if (cfg->threads)
        return cfg->threads;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (unsigned)n : 1u;
}

static brk_status start_daemon(api_server *srv, const api_config *cfg,
                               const char *addr, const srv_addr *a,
                               char *errbuf, size_t errlen)
{
    /* poll(), not epoll: MHD_quiesce_daemon (drain) takes the listen socket
     * out of each I/O thread's epoll set while an awake I/O thread may do
     * the same, and libmicrohttpd aborts the process when it loses that
     * race.  With poll an I/O thread just leaves the socket out of its
     * next set.  Parked requests are suspended, so they are not polled. */
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_ALLOW_SUSPEND_RESUME
                     | MHD_USE_ERROR_LOG;
    if (MHD_is_feature_supported(MHD_FEATURE_POLL) == MHD_YES)
        flags |= MHD_USE_POLL;
    if (a->v6)
        flags |= MHD_USE_IPv6;
    unsigned conns = cfg->max_connections ? cfg->max_connections : SRV_DEFAULT_CONNS;
    srv->d = MHD_start_daemon(
        flags, cfg->port, NULL, NULL, on_access, srv,
        MHD_OPTION_EXTERNAL_LOGGER, mhd_log, srv,
        MHD_OPTION_SOCK_ADDR, &a->u.sa,
        MHD_OPTION_THREAD_POOL_SIZE, pool_size(cfg),
        MHD_OPTION_CONNECTION_LIMIT, conns,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)cfg->idle_timeout_s,
        MHD_OPTION_URI_LOG_CALLBACK, on_uri, srv,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
        MHD_OPTION_END);
    if (!srv->d) {
        explain_bind(a, addr, cfg->port, errbuf, errlen);
        return BRK_IO;
    }
    return BRK_OK;
}

static brk_status srv_init(api_server *srv, const api_config *cfg,
                           const api_broker *b)
{
    srv->clock = brk_store_clock(b->store);
    if (cfg->logger)
        srv->logger = *cfg->logger;
    srv->max_body = cfg->max_body_bytes ? cfg->max_body_bytes : SRV_DEFAULT_BODY;
    srv->listen_fd = MHD_INVALID_SOCKET;
    atomic_init(&srv->wakes_resuming, 0);
    if (cfg->token && cfg->token[0]) {
        srv->token = strdup(cfg->token);
        if (!srv->token)
            return BRK_NOMEM;
        srv->token_len = strlen(srv->token);
    }
    pthread_mutex_init(&srv->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&srv->idle_cv, &ca);
    pthread_condattr_destroy(&ca);
    return BRK_OK;
}

static void srv_free(api_server *srv)
{
    pthread_cond_destroy(&srv->idle_cv);
    pthread_mutex_destroy(&srv->mu);
    free(srv->token);
    free(srv);
}

brk_status api_server_open(api_server **out, const api_config *cfg,
                           const api_broker *b, char *errbuf, size_t errlen)
{
    if (errbuf && errlen)
        errbuf[0] = 0;
    if (!out)
        return BRK_INVAL;
    *out = NULL;
    if (!cfg || !b || !b->store) {
        set_err(errbuf, errlen, "api_server_open: no %s", !cfg ? "config" : "store");
        return BRK_INVAL;
    }
    const char *addr = cfg->bind_addr && cfg->bind_addr[0] ? cfg->bind_addr
                                                           : SRV_DEFAULT_ADDR;
    srv_addr a;
    if (!parse_addr(addr, cfg->port, &a)) {
        set_err(errbuf, errlen, "bind address \"%s\" is not an IPv4 or IPv6 "
                "literal", addr);
        return BRK_INVAL;
    }
    api_server *srv = calloc(1, sizeof *srv);
    if (!srv) {
        set_err(errbuf, errlen, "out of memory");
        return BRK_NOMEM;
    }
    brk_status st = srv_init(srv, cfg, b);
    if (st != BRK_OK) {
        free(srv);
        set_err(errbuf, errlen, "out of memory");
        return st;
    }
    st = api_handler_open(&srv->h, cfg, b, errbuf, errlen);
    if (st == BRK_OK)
        st = api_workers_open(&srv->workers, cfg->workers ? cfg->workers
                              : SRV_DEFAULT_WORKERS, SRV_WORKER_STACK,
                              errbuf, errlen);
    if (st == BRK_OK)
        st = start_daemon(srv, cfg, addr, &a, errbuf, errlen);
    if (st != BRK_OK) {
        api_workers_free(srv->workers);
        api_handler_close(srv->h);
        srv_free(srv);
        return st;
    }
    char port[8];
    snprintf(port, sizeof port, "%u", (unsigned)api_server_port(srv));
    api_log_field f[2] = { { "addr", addr }, { "port", port } };
    srv_log(srv, API_LOG_INFO, "http server listening", f, 2);
    *out = srv;
    return BRK_OK;
}

uint16_t api_server_port(api_server *srv)
{
    if (!srv || !srv->d)
        return 0;
    const union MHD_DaemonInfo *di =
        MHD_get_daemon_info(srv->d, MHD_DAEMON_INFO_BIND_PORT);
    return di ? di->port : 0;
}

api_handler *api_server_handler(api_server *srv)
{
    return srv ? srv->h : NULL;
}

/* ---- drain / idle / close --------------------------------------------------------- */

void api_server_drain(api_server *srv)
{
    if (!srv)
        return;
    api_handler_drain(srv->h);
    srv_req *to_resume = NULL;
    bool quiesce;
    pthread_mutex_lock(&srv->mu);
    srv->draining = true;
    for (srv_req *rq = srv->parked, *next; rq; rq = next) {
        next = rq->next;
        pthread_mutex_lock(&rq->mu);
        if (rq->phase == RQ_SUSPENDED) {
            rq->phase = RQ_RESUMING;
            rq->drain_next = to_resume;
            to_resume = rq;
        }
        pthread_mutex_unlock(&rq->mu);
        unlist(srv, rq);
    }
    quiesce = !srv->quiesced;
    srv->quiesced = true;
    pthread_mutex_unlock(&srv->mu);
    /* Each stays suspended (alive) until its own resume: read the link
     * first. */
    while (to_resume) {
        srv_req *next = to_resume->drain_next;
        MHD_resume_connection(to_resume->conn);
        to_resume = next;
    }
    if (quiesce) {
        MHD_socket fd = MHD_quiesce_daemon(srv->d);
        if (fd != MHD_INVALID_SOCKET)
            (void)shutdown(fd, SHUT_RDWR);   /* refuse queued connects */
        pthread_mutex_lock(&srv->mu);
        srv->listen_fd = fd;
        pthread_mutex_unlock(&srv->mu);
        srv_log(srv, API_LOG_INFO, "http server draining", NULL, 0);
    }
}

bool api_server_wait_idle(api_server *srv, uint32_t timeout_ms)
{
    if (!srv)
        return true;
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    dl.tv_sec += timeout_ms / 1000;
    dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&srv->mu);
    while (srv->inflight > 0) {
        if (pthread_cond_timedwait(&srv->idle_cv, &srv->mu, &dl) == ETIMEDOUT)
            break;
    }
    bool idle = srv->inflight == 0;
    pthread_mutex_unlock(&srv->mu);
    return idle;
}

/* After drain no request parks, so no wake claims one any more; wait for
 * the wakes that claimed theirs before (each resumes within microseconds
 * unless its thread was preempted). */
static void wait_wakes_resumed(api_server *srv)
{
    pthread_mutex_lock(&srv->mu);
    while (atomic_load(&srv->wakes_resuming) > 0)
        pthread_cond_wait(&srv->idle_cv, &srv->mu);
    pthread_mutex_unlock(&srv->mu);
}

void api_server_close(api_server *srv)
{
    if (!srv)
        return;
    /* MHD must not be stopped with suspended connections: drain resumes
     * the parked ones, nothing parks once draining, closing the workers
     * runs every job they hold (each resumes its connection), and from
     * then on requests run inline. */
    api_server_drain(srv);
    wait_wakes_resumed(srv);
    api_workers_close(srv->workers);
    MHD_stop_daemon(srv->d);
    api_workers_free(srv->workers);
    if (srv->listen_fd != MHD_INVALID_SOCKET)
        close(srv->listen_fd);
    api_handler_close(srv->h);
    srv_free(srv);
}
