/*
 * http_bench.c - outboxd's HTTP API under load, next to the two references
 * issue 5 compares it with, measured in the same run (bench/README.md has
 * the details and figures).  Four servers ("peers"):
 *
 *   outboxd  api_server_open in this process over a SYNC store in a fresh
 *            directory, brk_delay, brk_txn (delay, no checker) and
 *            brk_groups opened as the daemon does; MHD threads = online
 *            cores (api_config.threads 0; --api-threads overrides), request
 *            workers api_config's default (--workers overrides).
 *   ceiling  a bare libmicrohttpd server with http_api's flags (thread pool
 *            of online-cores threads, poll(), suspend/resume): it buffers the
 *            body and answers a JSON of the same shape, storing nothing.
 *   nats     Debian's nats-server as a child (-js, file storage, 127.0.0.1,
 *            free port, fresh -sd; stream BENCH on bench.>): js_Publish of
 *            the same payload, each waiting for its PubAck.  One connection
 *            per publisher, as each HTTP client has its own (a shared one
 *            would coalesce all writes in one socket).  Skipped, exit 0,
 *            when not installed.  Its acks are not fsync'ed (2.9 syncs
 *            every 2 minutes); outboxd SYNC's are.
 *   outboxd-async  outboxd over an ASYNC store (flushed every 500 ms, the
 *            daemon's --flush async default), only at --async-conns
 *            (default 64): the like-for-like durability comparison with
 *            NATS, printed with its own ratios; SYNC stays the headline.
 *
 * Load: for 1, 16 and 64 connections, as many threads each own a keep-alive
 * HTTP/1.1 connection (plain socket, TCP_NODELAY; libcurl would hide the
 * server's costs) in a closed loop.  A point runs --warmup unmeasured, then
 * --seconds measured; an operation counts if it started in the window.
 * Latency: CLOCK_MONOTONIC, first byte written to last byte read, exact
 * per-thread arrays merged for p50/p99/max.  Points go by connection count,
 * all peers back to back, so ratios compare neighbours in time.
 *
 * Workloads, 1024-byte JSON bodies, keys k00..k63 round robin:
 *   send  POST /v1/topics/bench/messages {"key","body"} -> 201
 *   tx    POST /v1/transactions {"topic","key","body"} -> 201, then
 *         POST /v1/transactions/{txid}/commit (no body) -> 200: one op
 *   nats  the send body, published on bench.<key>
 * Every status is checked and every 512th body parsed (jansson); an error
 * fails the run (exit 1), a missed goal does not.
 *
 * Usage: http_bench [--dir PATH] [--seconds S] [--warmup S] [--quick]
 *          [--conns 1,16,64] [--async-conns 64|none]
 *          [--peers outboxd,ceiling,nats,outboxd-async] [--workloads send,tx]
 *          [--api-threads N] [--workers N]
 *   --dir: store and NATS directories (default cwd; not tmpfs).  --seconds:
 *   default $BENCH_SECONDS, else 3; --quick 1.  --warmup: default 0.5.
 *   $NATS_SERVER: path of nats-server (default: $PATH, then /usr/sbin).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <microhttpd.h>
#include <nats/nats.h>

#include "bench_util.h"
#include "broker/delay.h"
#include "broker/group.h"
#include "broker/store.h"
#include "broker/txn.h"
#include "http_api/api.h"

#define PROG         "http_bench"
#define BODY_LEN     1024
#define NKEYS        64
#define TOPIC        "bench"
#define NATS_STREAM  "BENCH"
#define RBUF_LEN     65536
#define CHECK_EVERY  512            /* parse every 512th response body */
#define IO_TIMEOUT_S 10             /* a silent server fails the run */
#define MAX_CONNS    1024
#define MAX_POINTS   64

#define GOAL_SEND_CEIL  0.7
#define GOAL_SEND_NATS  2.5
#define GOAL_TX_NATS    1.5
#define GOAL_P99_US     3000.0
#define GOAL_P99_CONNS  64

enum { SRV_OUTBOXD, SRV_CEILING, SRV_NATS, SRV_ASYNC, SRV_N };
enum { WL_SEND, WL_TX };
enum { PH_WARM, PH_MEASURE, PH_STOP };

static const char *const srv_names[SRV_N] = { "outboxd", "ceiling", "nats",
                                              "outboxd-async" };

/* ---- time ------------------------------------------------------------------ */

static void sleep_s(double s)
{
    struct timespec nap = { (time_t)s, (long)(fmod(s, 1.0) * 1e9) };
    while (nanosleep(&nap, &nap) != 0 && errno == EINTR)
        ;
}

static uint64_t cpu_self_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* utime + stime of a child from /proc/<pid>/stat; 0 if unreadable. */
static uint64_t cpu_child_ns(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", (long)pid);
    FILE *f = pid > 0 ? fopen(path, "r") : NULL;
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *p = strrchr(buf, ')');      /* the name may hold spaces */
    unsigned long long ut, st;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
                     &ut, &st) != 2)
        return 0;
    return (ut + st) * (1000000000ull / (unsigned long long)sysconf(_SC_CLK_TCK));
}

/* ---- latency samples and payloads ------------------------------------------------ */

typedef struct lat_vec {
    uint64_t *v;
    size_t n, cap;
} lat_vec;

static void lat_push(lat_vec *l, uint64_t ns)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 32768;
        uint64_t *v = realloc(l->v, cap * sizeof *v);
        if (!v)
            return;                      /* a lost sample, not a lost run */
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = ns;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Exact quantile of sorted v[0..n), in microseconds. */
static double quantile_us(const uint64_t *v, size_t n, double q)
{
    if (n == 0)
        return 0;
    size_t i = (size_t)ceil(q * (double)n);
    return (double)v[i ? i - 1 : 0] / 1e3;
}

/* A JSON object of exactly BODY_LEN bytes ("topic" first for a prepare),
 * "key":"k00", and "body" filled with letters and digits (nothing to
 * escape).  Returns the offset of the two key digits. */
static size_t make_body(char *out, bool with_topic, uint64_t seed)
{
    static const char alnum[] =
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    int n = snprintf(out, BODY_LEN + 1, "{%s\"key\":\"k00\",\"body\":\"",
                     with_topic ? "\"topic\":\"" TOPIC "\"," : "");
    uint64_t st = seed | 1;
    for (size_t i = (size_t)n; i < BODY_LEN - 2; i++)
        out[i] = alnum[bench_xorshift(&st) % (sizeof alnum - 1)];
    memcpy(out + BODY_LEN - 2, "\"}", 3);
    return (size_t)(strstr(out, "\"key\":\"k") - out) + 8;
}

static void put_key(char *p, uint64_t seq)
{
    unsigned k = (unsigned)(seq % NKEYS);
    p[0] = (char)('0' + k / 10);
    p[1] = (char)('0' + k % 10);
}

/* ---- one point's shared state and its worker threads -------------------------------- */

typedef struct load {
    int server, workload;
    uint16_t port;                       /* HTTP peers */
    const char *nats_url;
    pthread_barrier_t start;
    atomic_int phase;                    /* PH_* */
} load;

typedef struct worker {
    pthread_t th;
    load *ld;
    unsigned id;
    uint64_t seq;                        /* operations attempted */
    uint64_t ops, errors;                /* measured successes; all errors */
    char first_err[256];
    lat_vec op, req;                     /* per operation; tx: per request */
    /* HTTP */
    int fd;
    bool must_close;                     /* the server said Connection: close */
    char *rbuf;
    size_t rlen, rused;
    char *sreq;                          /* prebuilt send / prepare request */
    size_t sreq_len, key_off;
    char creq[512];                      /* commit request */
    char txid[160];
    /* NATS */
    natsConnection *nc;
    jsCtx *js;
    char payload[BODY_LEN + 1];
} worker;

static void note_error(worker *w, const char *fmt, ...)
{
    if (w->errors++ > 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->first_err, sizeof w->first_err, fmt, ap);
    va_end(ap);
}

/* ---- HTTP client ------------------------------------------------------------------------ */

static int tcp_connect(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    struct timeval tv = { IO_TIMEOUT_S, 0 };
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static void http_disconnect(worker *w)
{
    if (w->fd >= 0)
        close(w->fd);
    w->fd = -1;
    w->rlen = w->rused = 0;
    w->must_close = false;
}

static int http_reconnect(worker *w)
{
    http_disconnect(w);
    w->fd = tcp_connect(w->ld->port);
    if (w->fd >= 0)
        return 0;
    note_error(w, "connect 127.0.0.1:%u: %s", w->ld->port, strerror(errno));
    return -1;
}

typedef struct http_resp {
    int status;
    const char *body;                    /* in the worker's buffer, valid
                                            until its next read */
    size_t body_len;
} http_resp;

/* Is header line `line` (n bytes, no CRLF) "<name>: <*val>"? */
static bool header_is(const char *line, size_t n, const char *name,
                      const char **val, size_t *vlen)
{
    size_t k = strlen(name), i = k + 1;
    if (n <= k || line[k] != ':' || strncasecmp(line, name, k) != 0)
        return false;
    while (i < n && (line[i] == ' ' || line[i] == '\t'))
        i++;
    *val = line + i;
    *vlen = n - i;
    return true;
}

/* Parses the response head p[0..len), which ends in CRLF CRLF. */
static int parse_head(worker *w, const char *p, size_t len, http_resp *r,
                      size_t *clen)
{
    if (len < 16 || memcmp(p, "HTTP/1.", 7) != 0 || p[8] != ' ' ||
        p[9] < '1' || p[9] > '5') {
        note_error(w, "malformed status line: %.40s", p);
        return -1;
    }
    r->status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    bool have_len = false;
    const char *end = p + len, *line = (const char *)memchr(p, '\n', len) + 1;
    for (const char *eol; line < end; line = eol + 1) {
        eol = memchr(line, '\n', (size_t)(end - line));   /* head ends in \n */
        size_t n = (size_t)(eol - line);
        if (n > 0 && line[n - 1] == '\r')
            n--;
        const char *v;
        size_t vl;
        if (header_is(line, n, "content-length", &v, &vl)) {
            *clen = (size_t)strtoull(v, NULL, 10);
            have_len = true;
        } else if (header_is(line, n, "connection", &v, &vl)) {
            w->must_close = vl >= 5 && strncasecmp(v, "close", 5) == 0;
        }
    }
    if (!have_len)                       /* chunked: not spoken here */
        note_error(w, "HTTP %d without Content-Length", r->status);
    return have_len ? 0 : -1;
}

static int http_read(worker *w, http_resp *r)
{
    if (w->rused) {                      /* drop the previous response */
        memmove(w->rbuf, w->rbuf + w->rused, w->rlen - w->rused);
        w->rlen -= w->rused;
        w->rused = 0;
    }
    size_t need = 0;
    for (;;) {
        const char *e;
        if (need == 0 && (e = memmem(w->rbuf, w->rlen, "\r\n\r\n", 4))) {
            size_t head = (size_t)(e + 4 - w->rbuf), clen = 0;
            if (parse_head(w, w->rbuf, head, r, &clen) != 0)
                return -1;
            need = head + clen;
            r->body = w->rbuf + head;
            r->body_len = clen;
        }
        if (need && w->rlen >= need) {
            w->rused = need;
            return 0;
        }
        if (w->rlen == RBUF_LEN || need > RBUF_LEN) {
            note_error(w, "response larger than %d bytes", RBUF_LEN);
            return -1;
        }
        ssize_t k = recv(w->fd, w->rbuf + w->rlen, RBUF_LEN - w->rlen, 0);
        if (k > 0) {
            w->rlen += (size_t)k;
        } else if (k == 0 || errno != EINTR) {
            note_error(w, "recv: %s", k == 0 ? "server closed the connection"
                       : errno == EAGAIN ? "timed out" : strerror(errno));
            return -1;
        }
    }
}

/* One request and its response on the worker's connection.  0: a response
 * is in *r; 1: transport error (counted; the next call reconnects); -1:
 * cannot connect at all. */
static int http_exchange(worker *w, const char *req, size_t len, http_resp *r)
{
    if ((w->fd < 0 || w->must_close) && http_reconnect(w) != 0)
        return -1;
    for (size_t off = 0; off < len;) {
        ssize_t k = send(w->fd, req + off, len - off, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            note_error(w, "send: %s", strerror(errno));
            http_disconnect(w);
            return 1;
        }
        off += (size_t)k;
    }
    if (http_read(w, r) != 0) {
        http_disconnect(w);
        return 1;
    }
    return 0;
}

/* ---- response checks ----------------------------------------------------------------------- */

static bool json_str_is(json_t *o, const char *k, const char *want, size_t len)
{
    json_t *v = json_object_get(o, k);
    return json_is_string(v) && (want ? strcmp(json_string_value(v), want) == 0
                                      : json_string_length(v) == len);
}

/* The full check of a 2xx body, what: 0 send, 1 prepare, 2 commit. */
static void check_body(worker *w, int what, const http_resp *r)
{
    static const char *const names[] = { "send", "prepare", "commit" };
    json_t *o = json_loadb(r->body, r->body_len, 0, NULL);
    bool ok = json_is_object(o) && json_str_is(o, "msg_id", NULL, 36);
    if (ok && what == 0)
        ok = json_is_integer(json_object_get(o, "queue")) &&
             json_is_integer(json_object_get(o, "offset"));
    else if (ok)
        ok = json_str_is(o, "state", what == 1 ? "prepared" : "committed", 0) &&
             json_str_is(o, "txid", w->txid, 0);
    if (!ok)
        note_error(w, "%s: unexpected body: %.*s", names[what],
                   (int)(r->body_len > 160 ? 160 : r->body_len), r->body);
    json_decref(o);
}

static bool check_status(worker *w, const char *what, const http_resp *r,
                         int want)
{
    if (r->status == want)
        return true;
    note_error(w, "%s: HTTP %d (want %d): %.*s", what, r->status, want,
               (int)(r->body_len > 200 ? 200 : r->body_len), r->body);
    return false;
}

/* The txid of a prepare answer, scanned without a JSON parser (hot loop);
 * one with escapes is refused rather than decoded. */
static bool scan_txid(const char *b, size_t n, char *out, size_t outlen)
{
    const char *p = memmem(b, n, "\"txid\"", 6), *end = b + n, *q;
    if (!p)
        return false;
    for (p += 6; p < end && (*p == ' ' || *p == ':'); p++)
        ;
    if (p >= end || *p++ != '"')
        return false;
    for (q = p; q < end && *q != '"' && *q != '\\'; q++)
        ;
    if (q >= end || *q != '"' || q == p || (size_t)(q - p) >= outlen)
        return false;
    memcpy(out, p, (size_t)(q - p));
    out[q - p] = '\0';
    return true;
}

/* ---- operations: 0 done, 1 failed (counted), -1 give up ------------------------------------ */

static int op_send(worker *w, bool measure)
{
    put_key(w->sreq + w->key_off, w->seq);
    http_resp r;
    uint64_t t0 = bench_now_ns();
    int rc = http_exchange(w, w->sreq, w->sreq_len, &r);
    uint64_t t1 = bench_now_ns();
    if (rc != 0)
        return rc;
    if (!check_status(w, "send", &r, 201))
        return 1;
    if (w->seq % CHECK_EVERY == 0)
        check_body(w, 0, &r);
    if (measure) {
        lat_push(&w->op, t1 - t0);
        w->ops++;
    }
    return 0;
}

static int op_tx(worker *w, bool measure)
{
    put_key(w->sreq + w->key_off, w->seq);
    http_resp r;
    uint64_t t0 = bench_now_ns();
    int rc = http_exchange(w, w->sreq, w->sreq_len, &r);
    uint64_t t1 = bench_now_ns();
    if (rc != 0)
        return rc;
    if (!check_status(w, "prepare", &r, 201))
        return 1;
    if (!scan_txid(r.body, r.body_len, w->txid, sizeof w->txid)) {
        note_error(w, "prepare: no txid in %.*s",
                   (int)(r.body_len > 160 ? 160 : r.body_len), r.body);
        return 1;
    }
    bool check = w->seq % CHECK_EVERY == 0;
    if (check)
        check_body(w, 1, &r);
    int n = snprintf(w->creq, sizeof w->creq, "POST /v1/transactions/%s/commit "
                     "HTTP/1.1\r\nHost: 127.0.0.1:%u\r\nContent-Length: 0\r\n\r\n",
                     w->txid, w->ld->port);
    rc = http_exchange(w, w->creq, (size_t)n, &r);
    uint64_t t2 = bench_now_ns();
    if (rc != 0)
        return rc;
    if (!check_status(w, "commit", &r, 200))
        return 1;
    if (check)
        check_body(w, 2, &r);
    if (measure) {
        lat_push(&w->op, t2 - t0);
        lat_push(&w->req, t1 - t0);
        lat_push(&w->req, t2 - t1);
        w->ops++;
    }
    return 0;
}

static int op_nats(worker *w, bool measure)
{
    char subj[32];
    snprintf(subj, sizeof subj, TOPIC ".k%02u", (unsigned)(w->seq % NKEYS));
    put_key(w->payload + w->key_off, w->seq);
    jsPubAck *pa = NULL;
    jsErrCode jerr = 0;
    uint64_t t0 = bench_now_ns();
    natsStatus s = js_Publish(&pa, w->js, subj, w->payload, BODY_LEN, NULL, &jerr);
    uint64_t t1 = bench_now_ns();
    bool bad_ack = s == NATS_OK && w->seq % CHECK_EVERY == 0 &&
                   (!pa || !pa->Stream || strcmp(pa->Stream, NATS_STREAM) != 0 ||
                    pa->Sequence == 0);
    if (pa)
        jsPubAck_Destroy(pa);
    if (s != NATS_OK || bad_ack) {
        note_error(w, "js_Publish: %s (js error %d)", bad_ack ? "unexpected "
                   "PubAck" : natsStatus_GetText(s), (int)jerr);
        return s == NATS_CONNECTION_CLOSED ? -1 : 1;
    }
    if (measure) {
        lat_push(&w->op, t1 - t0);
        w->ops++;
    }
    return 0;
}

static int worker_open_nats(worker *w)
{
    natsOptions *o = NULL;
    natsStatus s = natsOptions_Create(&o);
    if (s == NATS_OK)
        s = natsOptions_SetURL(o, w->ld->nats_url);
    if (s == NATS_OK)
        s = natsOptions_SetTimeout(o, IO_TIMEOUT_S * 1000);
    if (s == NATS_OK)
        s = natsConnection_Connect(&w->nc, o);
    if (s == NATS_OK)
        s = natsConnection_JetStream(&w->js, w->nc, NULL);
    natsOptions_Destroy(o);
    if (s != NATS_OK)
        note_error(w, "nats connect %s: %s", w->ld->nats_url, natsStatus_GetText(s));
    return s == NATS_OK ? 0 : -1;
}

static int worker_open(worker *w)
{
    load *ld = w->ld;
    bool tx = ld->workload == WL_TX && ld->server != SRV_NATS;
    char body[BODY_LEN + 1];
    size_t koff = make_body(body, tx, 0x9E3779B97F4A7C15ull * (w->id + 1));
    if (ld->server == SRV_NATS) {
        memcpy(w->payload, body, sizeof body);
        w->key_off = koff;
        return worker_open_nats(w);
    }
    w->rbuf = malloc(RBUF_LEN);
    w->sreq = malloc(BODY_LEN + 256);
    if (!w->rbuf || !w->sreq) {
        note_error(w, "out of memory");
        return -1;
    }
    int n = snprintf(w->sreq, 256, "POST %s HTTP/1.1\r\nHost: 127.0.0.1:%u\r\n"
                     "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n",
                     tx ? "/v1/transactions" : "/v1/topics/" TOPIC "/messages",
                     ld->port, BODY_LEN);
    memcpy(w->sreq + n, body, BODY_LEN);
    w->sreq_len = (size_t)n + BODY_LEN;
    w->key_off = (size_t)n + koff;
    return http_reconnect(w);
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    load *ld = w->ld;
    int rc = worker_open(w);
    pthread_barrier_wait(&ld->start);
    int (*op)(worker *, bool) = ld->server == SRV_NATS ? op_nats
                              : ld->workload == WL_TX ? op_tx : op_send;
    while (rc == 0) {
        int ph = atomic_load_explicit(&ld->phase, memory_order_relaxed);
        if (ph == PH_STOP || op(w, ph == PH_MEASURE) < 0)
            break;
        w->seq++;
    }
    http_disconnect(w);
    if (w->js)
        jsCtx_Destroy(w->js);
    if (w->nc)
        natsConnection_Destroy(w->nc);
    free(w->rbuf);
    free(w->sreq);
    return NULL;
}

/* ---- running a point ------------------------------------------------------------------------ */

typedef struct point {
    int server, workload, conns;
    double secs, ops_s, cores;
    double p50, p99, max;                /* per operation, us */
    double req_p50, req_p99;             /* tx over HTTP: per request, us */
    uint64_t ops, errors;
    bool has_store;
    double fsync_s, rec_fsync, fsync_us;  /* fsync_us: mean fdatasync */
} point;

typedef struct bench_cfg {
    const char *base;
    double seconds, warmup;
    int conns[8], nconns;
    int async_conns[8], nasync;          /* where outboxd-async runs */
    bool peer[SRV_N];
    bool wl[2];                          /* WL_SEND, WL_TX selected */
    unsigned api_threads;                /* api_config.threads; 0 = cores */
    unsigned workers;                    /* api_config.workers; 0 = default */
} bench_cfg;

typedef struct target {
    uint16_t port;                       /* HTTP */
    const char *nats_url;                /* NATS */
    pid_t child;                         /* nats-server, for its CPU time */
    brk_store *store;                    /* outboxd, for fsync statistics */
} target;

/* p50/p99/max over every thread's samples (req: the per-request ones). */
static void merged_quantiles(worker *w, int n, bool req, double q[3])
{
    size_t total = 0, at = 0;
    for (int i = 0; i < n; i++)
        total += req ? w[i].req.n : w[i].op.n;
    uint64_t *v = malloc((total ? total : 1) * sizeof *v);
    for (int i = 0; v && i < n; i++) {
        lat_vec *l = req ? &w[i].req : &w[i].op;
        memcpy(v + at, l->v, l->n * sizeof *v);
        at += l->n;
    }
    if (v)
        qsort(v, at, sizeof *v, cmp_u64);
    q[0] = quantile_us(v, at, 0.50);
    q[1] = quantile_us(v, at, 0.99);
    q[2] = quantile_us(v, at, 1.0);
    free(v);
}

static void summarize(point *pt, worker *w, int n)
{
    double q[3];
    merged_quantiles(w, n, false, q);
    pt->p50 = q[0];
    pt->p99 = q[1];
    pt->max = q[2];
    if (pt->workload == WL_TX && pt->server != SRV_NATS) {
        merged_quantiles(w, n, true, q);
        pt->req_p50 = q[0];
        pt->req_p99 = q[1];
    }
    int shown = 0;
    for (int i = 0; i < n; i++) {
        pt->ops += w[i].ops;
        pt->errors += w[i].errors;
        if (w[i].errors && shown++ < 5)
            fprintf(stderr, "%s: %s %s %d conns, thread %d: %" PRIu64
                    " errors, first: %s\n", PROG, srv_names[pt->server],
                    pt->workload == WL_TX ? "tx" : "send", n, i, w[i].errors,
                    w[i].first_err);
    }
    pt->ops_s = pt->secs > 0 ? (double)pt->ops / pt->secs : 0;
}

/* CPU time (client and server) per operation, us: steadier than ops/s
 * on a machine shared with other work. */
static double cpu_us_per_op(const point *pt)
{
    return pt->ops_s > 0 ? pt->cores * 1e6 / pt->ops_s : 0;
}

static void print_point(const point *pt)
{
    printf("%-4s  %-13s %3d conns %9.0f ops/s  p50 %8.1f us  p99 %8.1f us  %4.2f "
           "cores  %6.1f cpu us/op%s\n", pt->workload == WL_TX ? "tx" : "send",
           srv_names[pt->server], pt->conns, pt->ops_s, pt->p50, pt->p99,
           pt->cores, cpu_us_per_op(pt), pt->errors ? "  ERRORS" : "");
    fflush(stdout);
}

/* Workers connect, wait at the barrier, run the warm-up, then the window. */
static void measure(const bench_cfg *cfg, const target *tg, load *ld, point *pt)
{
    brk_store_stats a, b;
    sleep_s(cfg->warmup);
    if (tg->store)
        brk_store_get_stats(tg->store, &a);
    uint64_t c0 = cpu_self_ns() + cpu_child_ns(tg->child), t0 = bench_now_ns();
    atomic_store(&ld->phase, PH_MEASURE);
    sleep_s(cfg->seconds);
    atomic_store(&ld->phase, PH_STOP);
    uint64_t t1 = bench_now_ns(), c1 = cpu_self_ns() + cpu_child_ns(tg->child);
    if (tg->store)
        brk_store_get_stats(tg->store, &b);
    pt->secs = (double)(t1 - t0) / 1e9;
    pt->cores = (double)(c1 - c0) / (double)(t1 - t0);
    if (tg->store) {
        uint64_t fs = b.fsyncs - a.fsyncs;
        pt->has_store = true;
        pt->fsync_s = (double)fs / pt->secs;
        pt->rec_fsync = fs ? (double)(b.fsync_records - a.fsync_records) / (double)fs : 0;
        pt->fsync_us = fs ? (double)(b.fsync_ns_total - a.fsync_ns_total) / 1e3 / (double)fs : 0;
    }
}

static int run_point(const bench_cfg *cfg, const target *tg, int server,
                     int workload, int conns, point *pt)
{
    *pt = (point){ .server = server, .workload = workload, .conns = conns };
    load ld = { .server = server, .workload = workload, .port = tg->port,
                .nats_url = tg->nats_url };
    atomic_init(&ld.phase, PH_WARM);
    worker *w = calloc((size_t)conns, sizeof *w);
    if (!w || pthread_barrier_init(&ld.start, NULL, (unsigned)conns + 1) != 0) {
        fprintf(stderr, "%s: out of memory\n", PROG);
        free(w);
        return -1;
    }
    for (int i = 0; i < conns; i++) {
        w[i].ld = &ld;
        w[i].id = (unsigned)i;
        w[i].fd = -1;
        if (pthread_create(&w[i].th, NULL, worker_main, &w[i]) != 0) {
            fprintf(stderr, "%s: pthread_create failed\n", PROG);
            exit(1);                     /* nats-server dies with us */
        }
    }
    pthread_barrier_wait(&ld.start);
    measure(cfg, tg, &ld, pt);
    for (int i = 0; i < conns; i++)
        pthread_join(w[i].th, NULL);
    summarize(pt, w, conns);
    for (int i = 0; i < conns; i++) {
        free(w[i].op.v);
        free(w[i].req.v);
    }
    free(w);
    pthread_barrier_destroy(&ld.start);
    print_point(pt);
    return pt->errors || pt->ops == 0 ? -1 : 0;
}

/* ---- the ceiling: bare libmicrohttpd ----------------------------------------------------------- */

typedef struct ceiling {
    struct MHD_Daemon *d;
    uint16_t port;
    unsigned threads;
    atomic_uint_fast64_t seq;
} ceiling;

typedef struct ceil_req {
    char *body;
    size_t len, cap;
} ceil_req;

static void ceil_done(void *cls, struct MHD_Connection *c, void **con_cls,
                      enum MHD_RequestTerminationCode toe)
{
    (void)cls; (void)c; (void)toe;
    ceil_req *r = *con_cls;
    if (r)
        free(r->body);
    free(r);
    *con_cls = NULL;
}

/* Appends a body chunk as http_api does (one growing buffer, 1 MiB cap). */
static bool ceil_append(ceil_req *r, const char *p, size_t n)
{
    if (r->len + n > (1u << 20))
        return false;
    if (r->len + n > r->cap) {
        size_t cap = r->cap ? r->cap : 4096;
        while (cap < r->len + n)
            cap *= 2;
        char *b = realloc(r->body, cap);
        if (!b)
            return false;
        r->body = b;
        r->cap = cap;
    }
    memcpy(r->body + r->len, p, n);
    r->len += n;
    return true;
}

/* An answer shaped like outboxd's to a send, prepare or commit (by path),
 * so the client handles the same bytes. */
static int ceil_answer(ceiling *cl, const char *url, char *out, size_t outlen,
                       int *len)
{
    uint64_t n = atomic_fetch_add(&cl->seq, 1);
    char id[40];
    snprintf(id, sizeof id, "01900000-0000-7000-8000-%012" PRIx64, n);
    size_t ul = strlen(url);
    if (strcmp(url, "/v1/transactions") == 0) {
        *len = snprintf(out, outlen, "{\"txid\":\"%s\",\"msg_id\":\"%s\","
                        "\"state\":\"prepared\"}", id, id);
        return MHD_HTTP_CREATED;
    }
    if (ul > 24 && ul < 200 && strncmp(url, "/v1/transactions/", 17) == 0 &&
        strcmp(url + ul - 7, "/commit") == 0) {
        *len = snprintf(out, outlen, "{\"txid\":\"%.*s\",\"msg_id\":\"%s\","
                        "\"state\":\"committed\"}", (int)(ul - 24), url + 17, id);
        return MHD_HTTP_OK;
    }
    *len = snprintf(out, outlen, "{\"msg_id\":\"%s\",\"queue\":0,\"offset\":%"
                    PRIu64 "}", id, n);
    return MHD_HTTP_CREATED;
}

static enum MHD_Result ceil_access(void *cls, struct MHD_Connection *c,
                                   const char *url, const char *method,
                                   const char *version, const char *upload,
                                   size_t *upload_size, void **con_cls)
{
    (void)method; (void)version;
    ceil_req *r = *con_cls;
    if (!r) {                            /* headers only so far */
        *con_cls = r = calloc(1, sizeof *r);
        return r ? MHD_YES : MHD_NO;
    }
    if (*upload_size) {
        if (!ceil_append(r, upload, *upload_size))
            return MHD_NO;
        *upload_size = 0;
        return MHD_YES;
    }
    char out[512];
    int len;
    int status = ceil_answer(cls, url, out, sizeof out, &len);
    struct MHD_Response *resp =
        MHD_create_response_from_buffer((size_t)len, out, MHD_RESPMEM_MUST_COPY);
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    enum MHD_Result ret = MHD_queue_response(c, (unsigned)status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static int ceiling_open(ceiling *cl)
{
    atomic_init(&cl->seq, 1);
    cl->threads = (unsigned)sysconf(_SC_NPROCESSORS_ONLN);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = 0,
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    /* http_api's server.c flags (poll(), as it uses since its review),
     * minus its URI logger (request timing).  epoll measured the same here:
     * 24-27 us of CPU per request either way. */
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_ALLOW_SUSPEND_RESUME |
                     MHD_USE_ERROR_LOG;
    if (MHD_is_feature_supported(MHD_FEATURE_POLL) == MHD_YES)
        flags |= MHD_USE_POLL;
    cl->d = MHD_start_daemon(flags, 0, NULL, NULL, ceil_access, cl,
                             MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&a,
                             MHD_OPTION_THREAD_POOL_SIZE, cl->threads,
                             MHD_OPTION_CONNECTION_LIMIT, 4096u,
                             MHD_OPTION_CONNECTION_TIMEOUT, 60u,
                             MHD_OPTION_NOTIFY_COMPLETED, ceil_done, cl,
                             MHD_OPTION_END);
    const union MHD_DaemonInfo *di =
        cl->d ? MHD_get_daemon_info(cl->d, MHD_DAEMON_INFO_BIND_PORT) : NULL;
    cl->port = di ? di->port : 0;
    if (cl->port == 0)
        fprintf(stderr, "%s: ceiling: MHD_start_daemon failed\n", PROG);
    return cl->port ? 0 : -1;
}

static void ceiling_close(ceiling *cl)
{
    if (cl->d)
        MHD_stop_daemon(cl->d);
    cl->d = NULL;
}

/* ---- outboxd in this process ---------------------------------------------------------------- */

typedef struct outboxd_env {
    char dir[4096];
    brk_store *s;
    brk_delay *d;
    brk_txn *t;
    brk_groups *g;
    api_server *srv;
    uint16_t port;
    unsigned workers;                    /* api_config.workers used */
} outboxd_env;

static void outboxd_close(outboxd_env *e)
{
    if (e->srv)
        api_server_close(e->srv);
    if (e->g)
        brk_groups_close(e->g);
    if (e->t)
        brk_txn_close(e->t);
    if (e->d)
        brk_delay_close(e->d);
    brk_status st = e->s ? brk_store_close(e->s) : BRK_OK;
    if (st != BRK_OK)
        fprintf(stderr, "%s: store close: %s\n", PROG, brk_status_name(st));
    if (e->dir[0])
        bench_rm_rf(e->dir, PROG);
    memset(e, 0, sizeof *e);
}

static brk_status outboxd_open_rest(outboxd_env *e, const bench_cfg *cfg,
                                    const char **what, char *err, size_t errlen)
{
    brk_status st;
    *what = "topic";
    if ((st = brk_topic_create(e->s, TOPIC, 0)) != BRK_OK)
        return st;
    *what = "delay";
    brk_delay_opts d;
    brk_delay_opts_init(&d);
    if ((st = brk_delay_open(&e->d, e->s, &d, err, errlen)) != BRK_OK)
        return st;
    *what = "txn";
    brk_txn_opts t;
    brk_txn_opts_init(&t);
    t.delay = e->d;                      /* no checker: client verdicts only */
    if ((st = brk_txn_open(&e->t, e->s, &t, err, errlen)) != BRK_OK)
        return st;
    *what = "groups";
    brk_groups_opts g;
    brk_groups_opts_init(&g);
    if ((st = brk_groups_open(&e->g, e->s, &g, err, errlen)) != BRK_OK)
        return st;
    *what = "api_server";
    api_config c;
    api_config_init(&c);
    c.port = 0;
    c.threads = cfg->api_threads;        /* 0: online cores, as the daemon */
    if (cfg->workers)
        c.workers = cfg->workers;
    e->workers = c.workers;
    api_broker b = { e->s, e->t, e->d, e->g };
    return api_server_open(&e->srv, &c, &b, err, errlen);
}

/* What the daemon opens, in its order: the store (SYNC, or ASYNC with the
 * daemon's default flush_interval of 500 ms), delay, txn, groups, then the
 * HTTP server on a free port. */
static int outboxd_open(outboxd_env *e, const bench_cfg *cfg, bool sync)
{
    snprintf(e->dir, sizeof e->dir, "%s/%s.%ld.%s", cfg->base, PROG,
             (long)getpid(), sync ? "store" : "async.store");
    bench_rm_rf(e->dir, PROG);
    char err[256] = "";
    const char *what = "store";
    brk_store_opts so;
    brk_store_opts_init(&so);
    so.flush_mode = sync ? BRK_FLUSH_SYNC : BRK_FLUSH_ASYNC;
    brk_status st = brk_store_open(&e->s, e->dir, &so, err, sizeof err);
    if (st == BRK_OK)
        st = outboxd_open_rest(e, cfg, &what, err, sizeof err);
    if (st != BRK_OK) {
        fprintf(stderr, "%s: outboxd: %s open: %s (%s)\n", PROG, what,
                brk_status_name(st), err);
        outboxd_close(e);
        return -1;
    }
    e->port = api_server_port(e->srv);
    return 0;
}

/* ---- NATS JetStream peer --------------------------------------------------------------------- */

typedef struct nats_peer {
    char bin[4096], dir[4096], log[4200];
    char url[64], version[96];
    pid_t pid;
} nats_peer;

static bool find_nats_server(char *out, size_t len)
{
    const char *env = getenv("NATS_SERVER"), *path = getenv("PATH");
    if (env && *env) {
        snprintf(out, len, "%s", env);
        return access(out, X_OK) == 0;
    }
    char dirs[8192], *save = NULL;
    snprintf(dirs, sizeof dirs, "%s:/usr/sbin:/usr/local/sbin:/sbin",
             path ? path : "/usr/bin:/bin");
    for (char *d = strtok_r(dirs, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
        snprintf(out, len, "%s/nats-server", d);
        if (access(out, X_OK) == 0)
            return true;
    }
    return false;
}

/* A port nobody listens on now (bind 0, read it, close): nats-server takes
 * it a moment later; a collision shows as a failed start. */
static uint16_t free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = 0,
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t al = sizeof a;
    uint16_t port = 0;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &al) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0)
        close(fd);
    return port;
}

static void nats_version(nats_peer *np)
{
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "'%s' --version 2>&1", np->bin);
    snprintf(np->version, sizeof np->version, "nats-server (version unknown)");
    FILE *p = popen(cmd, "r");
    if (p && fgets(np->version, sizeof np->version, p))
        np->version[strcspn(np->version, "\n")] = '\0';
    if (p)
        pclose(p);
}

static void nats_show_log(const nats_peer *np)
{
    FILE *f = fopen(np->log, "r");
    char line[512];
    fprintf(stderr, "%s: --- %s ---\n", PROG, np->log);
    while (f && fgets(line, sizeof line, f))
        fputs(line, stderr);
    if (f)
        fclose(f);
}

/* SIGTERM, then SIGKILL after 5 s; removes its directory and log. */
static void nats_stop(nats_peer *np)
{
    int status;
    if (np->pid > 0) {
        kill(np->pid, SIGTERM);
        uint64_t deadline = bench_now_ns() + 5000000000ull;
        while (waitpid(np->pid, &status, WNOHANG) == 0) {
            if (bench_now_ns() > deadline) {
                kill(np->pid, SIGKILL);
                waitpid(np->pid, &status, 0);
                break;
            }
            sleep_s(0.02);
        }
    }
    np->pid = 0;
    if (np->log[0])
        unlink(np->log);
    if (np->dir[0])
        bench_rm_rf(np->dir, PROG);
    np->log[0] = np->dir[0] = '\0';
}

static int nats_spawn(nats_peer *np, uint16_t port)
{
    char portstr[8];
    snprintf(portstr, sizeof portstr, "%u", port);
    char *const args[] = { np->bin, "-js", "-a", "127.0.0.1", "-p", portstr,
                           "-sd", np->dir, NULL };
    pid_t parent = getpid(), pid = fork();
    if (pid < 0) {
        fprintf(stderr, "%s: fork: %s\n", PROG, strerror(errno));
        return -1;
    }
    if (pid == 0) {                      /* async-signal-safe calls only */
        prctl(PR_SET_PDEATHSIG, SIGTERM);    /* no orphan if we die */
        if (getppid() != parent)
            _exit(127);
        int fd = open(np->log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execv(np->bin, args);
        _exit(127);
    }
    np->pid = pid;
    return 0;
}

/* Connects, retrying until the server answers (10 s) or exits. */
static int nats_wait_ready(nats_peer *np, natsConnection **nc)
{
    uint64_t deadline = bench_now_ns() + 10000000000ull;
    natsStatus s;
    do {
        int status;
        if (waitpid(np->pid, &status, WNOHANG) == np->pid) {
            np->pid = 0;
            fprintf(stderr, "%s: nats-server exited at start\n", PROG);
            return -1;
        }
        natsOptions *o = NULL;
        s = natsOptions_Create(&o);
        if (s == NATS_OK)
            s = natsOptions_SetURL(o, np->url);
        if (s == NATS_OK)
            s = natsOptions_SetTimeout(o, 500);
        if (s == NATS_OK)
            s = natsConnection_Connect(nc, o);
        natsOptions_Destroy(o);
        if (s == NATS_OK)
            return 0;
        sleep_s(0.05);
    } while (bench_now_ns() < deadline);
    fprintf(stderr, "%s: nats-server at %s did not answer in 10 s: %s\n", PROG,
            np->url, natsStatus_GetText(s));
    return -1;
}

/* Stream BENCH on bench.>, file storage; retried while JetStream starts. */
static int nats_add_stream(natsConnection *nc)
{
    jsCtx *js = NULL;
    jsErrCode jerr = 0;
    const char *subjects[] = { TOPIC ".>" };
    natsStatus s = natsConnection_JetStream(&js, nc, NULL);
    uint64_t deadline = bench_now_ns() + 10000000000ull;
    while (s == NATS_OK) {
        jsStreamConfig sc;
        jsStreamConfig_Init(&sc);
        sc.Name = NATS_STREAM;
        sc.Subjects = subjects;
        sc.SubjectsLen = 1;
        sc.Storage = js_FileStorage;
        s = js_AddStream(NULL, js, &sc, NULL, &jerr);
        if (s == NATS_OK || bench_now_ns() > deadline)
            break;
        s = NATS_OK;
        sleep_s(0.1);
    }
    if (s != NATS_OK)
        fprintf(stderr, "%s: js_AddStream: %s (js error %d)\n", PROG,
                natsStatus_GetText(s), (int)jerr);
    if (js)
        jsCtx_Destroy(js);
    return s == NATS_OK ? 0 : -1;
}

static int nats_start(nats_peer *np, const char *base)
{
    uint16_t port = free_port();
    long me = (long)getpid();
    snprintf(np->dir, sizeof np->dir, "%s/%s.%ld.nats", base, PROG, me);
    snprintf(np->log, sizeof np->log, "%s/%s.%ld.nats.log", base, PROG, me);
    snprintf(np->url, sizeof np->url, "nats://127.0.0.1:%u", port);
    bench_rm_rf(np->dir, PROG);
    nats_version(np);
    natsConnection *nc = NULL;
    int rc = port && nats_spawn(np, port) == 0 ? nats_wait_ready(np, &nc) : -1;
    if (rc == 0)
        rc = nats_add_stream(nc);
    if (nc)
        natsConnection_Destroy(nc);
    if (rc != 0) {
        nats_show_log(np);
        nats_stop(np);
    }
    return rc;
}

/* ---- report ------------------------------------------------------------------------------------ */

typedef struct results {
    point p[MAX_POINTS];
    int n;
} results;

static const point *find_point(const results *rs, int server, int workload,
                               int conns)
{
    for (int i = 0; i < rs->n; i++)
        if (rs->p[i].server == server && rs->p[i].workload == workload &&
            rs->p[i].conns == conns)
            return &rs->p[i];
    return NULL;
}

static void print_table(const results *rs, const bench_cfg *cfg, int workload)
{
    bool tx = workload == WL_TX;
    printf(tx ? "\ntx: POST /v1/transactions (201) + POST /v1/transactions/"
                "{txid}/commit (200); an op is the pair\n"
              : "\nsend: POST /v1/topics/" TOPIC "/messages (201); nats: "
                "js_Publish with a synchronous PubAck\n");
    printf("| server        | conns |   ops/s | p50 us | p99 us |  max us | cores |"
           " cpu us/op |%s fsync/s | rec/fsync | fsync us |\n",
           tx ? " req p50 us | req p99 us |" : "");
    printf("|---|---:|---:|---:|---:|---:|---:|---:|%s---:|---:|---:|\n",
           tx ? "---:|---:|" : "");
    for (int c = 0; c < cfg->nconns; c++)
        for (int s = 0; s < SRV_N; s++) {
            const point *p = find_point(rs, s, workload, cfg->conns[c]);
            if (!p)
                continue;
            printf("| %-13s | %5d | %7.0f | %6.0f | %6.0f | %7.0f | %5.2f | %9.1f |",
                   srv_names[s], p->conns, p->ops_s, p->p50, p->p99, p->max,
                   p->cores, cpu_us_per_op(p));
            if (tx)
                printf(" %10.0f | %10.0f |", p->req_p50, p->req_p99);
            if (p->has_store)
                printf(" %7.0f | %9.1f | %8.0f |\n", p->fsync_s, p->rec_fsync,
                       p->fsync_us);
            else
                printf("       - |         - |        - |\n");
        }
}

/* One ratio row; goal 0 = informative only. */
static void print_ratio(const char *name, const point *a, const point *b,
                        double goal, int conns)
{
    char g[16] = "-";
    if (goal > 0)
        snprintf(g, sizeof g, ">= %.2f", goal);
    if (!a || !b || b->ops_s <= 0) {
        printf("| %-20s | %5d |    n/a | %-7s | not measured |\n", name, conns, g);
        return;
    }
    double r = a->ops_s / b->ops_s;
    printf("| %-20s | %5d | %6.2f | %-7s | %s |\n", name, conns, r, g,
           goal <= 0 ? "" : r >= goal ? "met" : "MISSED");
}

static void print_p99(const char *name, const point *p, bool req)
{
    if (!p)
        return;
    double v = req ? p->req_p99 : p->p99;
    printf("p99 per request at %d conns, %-14s %8.0f us  goal <= %.0f us: %s\n",
           p->conns, name, v, GOAL_P99_US, v <= GOAL_P99_US ? "met" : "MISSED");
}

static void print_ratios(const results *rs, const bench_cfg *cfg)
{
    printf("\nratios of ops/s (tx: pairs/s)\n"
           "| ratio                | conns |  value | goal    | result |\n"
           "|---|---:|---:|---|---|\n");
    for (int c = 0; c < cfg->nconns; c++) {
        int n = cfg->conns[c];
        const point *send = find_point(rs, SRV_OUTBOXD, WL_SEND, n);
        const point *tx = find_point(rs, SRV_OUTBOXD, WL_TX, n);
        const point *nats = find_point(rs, SRV_NATS, WL_SEND, n);
        print_ratio("send / HTTP ceiling", send,
                    find_point(rs, SRV_CEILING, WL_SEND, n), GOAL_SEND_CEIL, n);
        print_ratio("send / NATS publish", send, nats, GOAL_SEND_NATS, n);
        print_ratio("tx / NATS publish", tx, nats, GOAL_TX_NATS, n);
        print_ratio("tx / HTTP ceiling tx", tx,
                    find_point(rs, SRV_CEILING, WL_TX, n), 0, n);
    }
    print_p99("send:", find_point(rs, SRV_OUTBOXD, WL_SEND, GOAL_P99_CONNS), false);
    print_p99("tx requests:", find_point(rs, SRV_OUTBOXD, WL_TX, GOAL_P99_CONNS), true);
    fflush(stdout);
}

/* outboxd-async against the same neighbours.  nats-server 2.9 acks without
 * fsync, so this is the like-for-like durability comparison; the issue's
 * goals are for SYNC and are shown here for reference only. */
static void print_async_ratios(const results *rs, const bench_cfg *cfg)
{
    bool any = false;
    for (int c = 0; c < cfg->nconns; c++)
        any = any || find_point(rs, SRV_ASYNC, WL_SEND, cfg->conns[c]) ||
              find_point(rs, SRV_ASYNC, WL_TX, cfg->conns[c]);
    if (!any)
        return;
    printf("\nASYNC ratios (outboxd-async: store flushed every 500 ms, no "
           "fsync per request, like nats-server 2.9's acks; the goals are the "
           "SYNC ones, shown for reference)\n"
           "| ratio                | conns |  value | goal    | result |\n"
           "|---|---:|---:|---|---|\n");
    for (int c = 0; c < cfg->nconns; c++) {
        int n = cfg->conns[c];
        const point *send = find_point(rs, SRV_ASYNC, WL_SEND, n);
        const point *tx = find_point(rs, SRV_ASYNC, WL_TX, n);
        if (!send && !tx)
            continue;
        const point *nats = find_point(rs, SRV_NATS, WL_SEND, n);
        print_ratio("async send / ceiling", send,
                    find_point(rs, SRV_CEILING, WL_SEND, n), GOAL_SEND_CEIL, n);
        print_ratio("async send / NATS", send, nats, GOAL_SEND_NATS, n);
        print_ratio("async tx / NATS", tx, nats, GOAL_TX_NATS, n);
    }
    print_p99("async send:", find_point(rs, SRV_ASYNC, WL_SEND, GOAL_P99_CONNS), false);
    print_p99("async tx req:", find_point(rs, SRV_ASYNC, WL_TX, GOAL_P99_CONNS), true);
    fflush(stdout);
}

/* ---- options -------------------------------------------------------------------------------------- */

static bool parse_seconds(const char *s, double *out, double min)
{
    char *end;
    double v = strtod(s, &end);
    if (*end || !(v >= min) || v > 3600)
        return false;
    *out = v;
    return true;
}

/* "1,16,64" into v[8] / *n ("none": empty when may_be_empty). */
static bool parse_counts(char *s, int *v, int *n, bool may_be_empty)
{
    char *save = NULL;
    *n = 0;
    if (may_be_empty && strcmp(s, "none") == 0)
        return true;
    for (char *t = strtok_r(s, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        int x = atoi(t);
        if (x <= 0 || x > MAX_CONNS || *n == 8)
            return false;
        v[(*n)++] = x;
    }
    return *n > 0;
}

/* "a,b" with every word in names[0..count) into sel[]. */
static bool parse_names(char *s, const char *const *names, int count, bool *sel)
{
    char *save = NULL;
    memset(sel, 0, (size_t)count * sizeof *sel);
    for (char *t = strtok_r(s, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        int i = 0;
        while (i < count && strcmp(t, names[i]) != 0)
            i++;
        if (i == count)
            return false;
        sel[i] = true;
    }
    return true;
}

static int parse_args(int argc, char **argv, bench_cfg *cfg)
{
    static const char *const wl_names[] = { "send", "tx" };
    *cfg = (bench_cfg){ .base = ".", .seconds = 3, .warmup = 0.5, .nconns = 3,
                        .conns = { 1, 16, 64 }, .nasync = 1,
                        .async_conns = { 64 }, .peer = { true, true, true, true },
                        .wl = { true, true } };
    const char *env = getenv("BENCH_SECONDS");
    bool ok = !env || !*env || parse_seconds(env, &cfg->seconds, 0.1);
    for (int i = 1; ok && i < argc; i++) {
        const char *a = argv[i];
        bool more = i + 1 < argc;
        if (strcmp(a, "--dir") == 0 && more)
            cfg->base = argv[++i];
        else if (strcmp(a, "--seconds") == 0 && more)
            ok = parse_seconds(argv[++i], &cfg->seconds, 0.1);
        else if (strcmp(a, "--warmup") == 0 && more)
            ok = parse_seconds(argv[++i], &cfg->warmup, 0);
        else if (strcmp(a, "--quick") == 0)
            cfg->seconds = 1;
        else if (strcmp(a, "--conns") == 0 && more)
            ok = parse_counts(argv[++i], cfg->conns, &cfg->nconns, false);
        else if (strcmp(a, "--async-conns") == 0 && more)
            ok = parse_counts(argv[++i], cfg->async_conns, &cfg->nasync, true);
        else if (strcmp(a, "--peers") == 0 && more)
            ok = parse_names(argv[++i], srv_names, SRV_N, cfg->peer);
        else if (strcmp(a, "--workloads") == 0 && more)
            ok = parse_names(argv[++i], wl_names, 2, cfg->wl);
        else if (strcmp(a, "--api-threads") == 0 && more)
            ok = (cfg->api_threads = (unsigned)atoi(argv[++i])) > 0;
        else if (strcmp(a, "--workers") == 0 && more)
            ok = (cfg->workers = (unsigned)atoi(argv[++i])) > 0;
        else
            ok = false;
    }
    if (!ok)
        fprintf(stderr, "usage: %s [--dir PATH] [--seconds S] [--warmup S] "
                "[--quick] [--conns 1,16,64] [--async-conns 64|none] "
                "[--peers outboxd,ceiling,nats,outboxd-async] "
                "[--workloads send,tx] [--api-threads N] [--workers N]  (env "
                "BENCH_SECONDS, NATS_SERVER)\n", PROG);
    return ok ? 0 : -1;
}

/* ---- peers and main ---------------------------------------------------------------------------------- */

typedef struct peers {
    outboxd_env ob, oa;                  /* SYNC, ASYNC */
    ceiling cl;
    nats_peer np;
    bool up[SRV_N];
} peers;

static int start_nats(peers *ps, bench_cfg *cfg)
{
    if (!find_nats_server(ps->np.bin, sizeof ps->np.bin)) {
        printf("nats:        nats-server not found (install Debian's nats-server "
               "or set NATS_SERVER): the NATS JetStream peer is SKIPPED\n");
        cfg->peer[SRV_NATS] = false;
        return 0;
    }
    if (nats_start(&ps->np, cfg->base) != 0)
        return -1;
    ps->up[SRV_NATS] = true;
    printf("nats:        %s at %s, -js, file storage, stream %s on %s.>; "
           "js_Publish waits for each PubAck; one connection per publisher; "
           "its acks are not fsync'ed (2.9 syncs every 2 min)\n",
           ps->np.version, ps->np.url, NATS_STREAM, TOPIC);
    return 0;
}

/* Starts the selected peers: NATS first, while this process has no threads
 * (it forks).  A missing nats-server is a skip, anything else a failure. */
static int peers_start(peers *ps, bench_cfg *cfg)
{
    if (cfg->peer[SRV_NATS] && start_nats(ps, cfg) != 0)
        return -1;
    if (cfg->peer[SRV_CEILING]) {
        if (ceiling_open(&ps->cl) != 0)
            return -1;
        ps->up[SRV_CEILING] = true;
        printf("ceiling:     libmicrohttpd %s on 127.0.0.1:%u, thread pool of %u, "
               "epoll, suspend/resume; buffers the body, answers, stores nothing\n",
               MHD_get_version(), ps->cl.port, ps->cl.threads);
    }
    if (cfg->peer[SRV_OUTBOXD]) {
        if (outboxd_open(&ps->ob, cfg, true) != 0)
            return -1;
        ps->up[SRV_OUTBOXD] = true;
        printf("outboxd:     api_server on 127.0.0.1:%u, %ld MHD threads (%s), "
               "%u request workers (%s), SYNC store in %s\n", ps->ob.port,
               cfg->api_threads ? (long)cfg->api_threads
                                : sysconf(_SC_NPROCESSORS_ONLN),
               cfg->api_threads ? "--api-threads" : "online cores",
               ps->ob.workers, cfg->workers ? "--workers" : "default",
               ps->ob.dir);
    }
    if (cfg->peer[SRV_ASYNC] && cfg->nasync > 0) {
        if (outboxd_open(&ps->oa, cfg, false) != 0)
            return -1;
        ps->up[SRV_ASYNC] = true;
        printf("outboxd-async: the same over an ASYNC store (flushed every "
               "500 ms, like the daemon's --flush async), on 127.0.0.1:%u, "
               "in %s; runs at --async-conns only\n", ps->oa.port, ps->oa.dir);
    }
    fflush(stdout);
    return 0;
}

static void peers_stop(peers *ps)
{
    outboxd_close(&ps->ob);
    outboxd_close(&ps->oa);
    ceiling_close(&ps->cl);
    nats_stop(&ps->np);
}

static bool in_list(const int *v, int n, int x)
{
    for (int i = 0; i < n; i++)
        if (v[i] == x)
            return true;
    return false;
}

/* By connection count; within one, every peer and workload back to back
 * (outboxd-async only at --async-conns). */
static int run_all(const bench_cfg *cfg, const peers *ps, results *rs)
{
    static const int order[][2] = {
        { SRV_CEILING, WL_SEND }, { SRV_OUTBOXD, WL_SEND }, { SRV_ASYNC, WL_SEND },
        { SRV_NATS, WL_SEND }, { SRV_CEILING, WL_TX }, { SRV_OUTBOXD, WL_TX },
        { SRV_ASYNC, WL_TX },
    };
    int failures = 0;
    for (int c = 0; c < cfg->nconns; c++)
        for (size_t k = 0; k < sizeof order / sizeof order[0]; k++) {
            int s = order[k][0], n = cfg->conns[c];
            if (!ps->up[s] || rs->n == MAX_POINTS || !cfg->wl[order[k][1]] ||
                (s == SRV_ASYNC && !in_list(cfg->async_conns, cfg->nasync, n)))
                continue;
            target t = { 0 };
            if (s == SRV_OUTBOXD)
                t = (target){ .port = ps->ob.port, .store = ps->ob.s };
            else if (s == SRV_ASYNC)
                t = (target){ .port = ps->oa.port, .store = ps->oa.s };
            else if (s == SRV_CEILING)
                t.port = ps->cl.port;
            else
                t = (target){ .nats_url = ps->np.url, .child = ps->np.pid };
            if (run_point(cfg, &t, s, order[k][1], n, &rs->p[rs->n++]) != 0)
                failures++;
        }
    return failures;
}

int main(int argc, char **argv)
{
    bench_cfg cfg;
    if (parse_args(argc, argv, &cfg) != 0)
        return 2;
    struct statfs sf;
    if (statfs(cfg.base, &sf) != 0) {
        fprintf(stderr, "%s: statfs %s: %s\n", PROG, cfg.base, strerror(errno));
        return 1;
    }
    printf("%s: HTTP/1.1 keep-alive closed loop, %d-byte JSON bodies, %.1f s "
           "per point after %.1f s warm-up\n", PROG, BODY_LEN, cfg.seconds,
           cfg.warmup);
    bench_print_machine(cfg.base, &sf, 13, false, true);
    fflush(stdout);

    static peers ps;
    static results rs;
    int failures = peers_start(&ps, &cfg) != 0;
    if (!failures) {
        printf("\n");
        failures = run_all(&cfg, &ps, &rs);
        print_table(&rs, &cfg, WL_SEND);
        print_table(&rs, &cfg, WL_TX);
        print_ratios(&rs, &cfg);
        print_async_ratios(&rs, &cfg);
    }
    peers_stop(&ps);
    nats_Close();
    if (failures)
        printf("%s: FAILED: errors, or a peer could not run (see stderr)\n", PROG);
    return failures ? 1 : 0;
}
