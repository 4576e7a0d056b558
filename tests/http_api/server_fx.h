/*
 * server_fx.h - the fixture and the small HTTP clients shared by
 * test_server.c (the transport) and test_server_workers.c (request workers,
 * long polls, drain and close).  Header-only (static inline) for the same
 * reason as live_server.h: tests/support links broker_core alone.  The
 * includer includes cmocka.h first.
 *
 * The stack is built as the daemon builds it (store in a temporary
 * directory with its background thread, delay, txn, groups, then
 * api_server_open on 127.0.0.1 port 0), with a per-test api_config tweak
 * between setup and server_open.  setup_sync puts a SYNC store on the real
 * disk behind a gate (support/io_gate.h) that can hold every fdatasync.
 * Clients are libcurl (easy for one request, multi for many parked ones)
 * and, where curl would be too polite, a raw TCP socket.
 */
#ifndef OUTBOXD_TEST_SERVER_FX_H
#define OUTBOXD_TEST_SERVER_FX_H

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>

#include "broker/delay.h"
#include "broker/group.h"
#include "broker/store.h"
#include "broker/txn.h"
#include "http_api/api.h"
#include "io_gate.h"
#include "tmpdir.h"

/* ---- the stack ------------------------------------------------------------- */

typedef struct fx {
    char dir[256];
    brk_store *store;
    brk_delay *delay;
    brk_txn *txn;
    brk_groups *groups;
    bool sync;                  /* SYNC store behind `gate` */
    uint32_t commit_delay_us;   /* its group_commit_delay_us */
    brk_gate_io gate;
    api_config cfg;
    api_server *srv;
    uint16_t port;
    const char *token;          /* sent by req() when set */
    CURL *curl;                 /* keep-alive handle for req() */
    char err[256];
} fx;

static inline int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0) {
    }
}

static inline void stack_open(fx *f)
{
    assert_int_equal(brk_tmpdir_new("api-server", f->dir, sizeof f->dir), 0);
    brk_store_opts so;
    brk_store_opts_init(&so);
    so.segment_bytes = 1u << 20;
    if (f->sync) {
        so.flush_mode = BRK_FLUSH_SYNC;
        so.io = &f->gate.io;
        so.group_commit_delay_us = f->commit_delay_us;
    }
    brk_status st = brk_store_open(&f->store, f->dir, &so, f->err, sizeof f->err);
    if (st != BRK_OK)
        fail_msg("brk_store_open: %s", f->err);
    brk_delay_opts dopt;
    brk_delay_opts_init(&dopt);
    assert_int_equal(brk_delay_open(&f->delay, f->store, &dopt, f->err,
                                    sizeof f->err), BRK_OK);
    brk_txn_opts topt;
    brk_txn_opts_init(&topt);
    topt.delay = f->delay;
    topt.workers = 1;
    assert_int_equal(brk_txn_open(&f->txn, f->store, &topt, f->err,
                                  sizeof f->err), BRK_OK);
    brk_groups_opts gopt;
    brk_groups_opts_init(&gopt);
    assert_int_equal(brk_groups_open(&f->groups, f->store, &gopt, f->err,
                                     sizeof f->err), BRK_OK);
    api_config_init(&f->cfg);
    f->cfg.bind_addr = "127.0.0.1";
    f->cfg.port = 0;
    f->cfg.threads = 2;
}

static inline brk_status server_try_open(fx *f)
{
    api_broker b = { f->store, f->txn, f->delay, f->groups };
    return api_server_open(&f->srv, &f->cfg, &b, f->err, sizeof f->err);
}

/* Start the server with f->cfg as the test left it. */
static inline void server_open(fx *f)
{
    brk_status st = server_try_open(f);
    if (st != BRK_OK)
        fail_msg("api_server_open: %s: %s", brk_status_name(st), f->err);
    f->port = api_server_port(f->srv);
    assert_int_not_equal(f->port, 0);
    f->token = f->cfg.token;
}

static inline int setup_with(void **state, bool sync, uint32_t commit_delay_us)
{
    fx *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->sync = sync;
    f->commit_delay_us = commit_delay_us;
    brk_gate_io_init(&f->gate);
    stack_open(f);
    f->curl = curl_easy_init();
    assert_non_null(f->curl);
    *state = f;
    return 0;
}

static inline int setup(void **state)
{
    return setup_with(state, false, 0);
}

static inline int setup_sync(void **state)
{
    return setup_with(state, true, 0);
}

/* A group-commit leader waits 1 ms for followers before its fdatasync, so
 * the records per fdatasync count the appends in flight at once, whatever
 * the disk's speed (TMPDIR on tmpfs) or the sanitizers' slowness. */
static inline int setup_sync_gathering(void **state)
{
    return setup_with(state, true, 1000);
}

static inline int teardown(void **state)
{
    fx *f = *state;
    brk_gate_io_open(&f->gate);         /* a failed test may leave it shut */
    if (f->curl)
        curl_easy_cleanup(f->curl);
    api_server_close(f->srv);
    brk_groups_close(f->groups);
    brk_txn_close(f->txn);
    brk_delay_close(f->delay);
    brk_store_close(f->store);
    brk_gate_io_destroy(&f->gate);
    brk_tmpdir_remove(f->dir);
    free(f);
    return 0;
}

/* ---- a small HTTP client ----------------------------------------------------- */

typedef struct resp {
    long status;                /* 0: no answer */
    CURLcode rc;
    char *body;
    size_t len;
    char *hdrs;                 /* all response header lines */
    size_t hlen;
    json_t *json;
    int64_t ms;                 /* duration */
    struct curl_slist *sent;    /* request headers, freed with the resp */
    int64_t t0;
} resp;

static inline size_t grow_append(char **p, size_t *len, const char *data, size_t n)
{
    char *np = realloc(*p, *len + n + 1);
    if (!np)
        return 0;
    memcpy(np + *len, data, n);
    *len += n;
    np[*len] = 0;
    *p = np;
    return n;
}

static inline size_t on_body(char *d, size_t sz, size_t n, void *ud)
{
    resp *r = ud;
    return grow_append(&r->body, &r->len, d, sz * n);
}

static inline size_t on_hdr(char *d, size_t sz, size_t n, void *ud)
{
    resp *r = ud;
    return grow_append(&r->hdrs, &r->hlen, d, sz * n);
}

static inline void resp_free(resp *r)
{
    free(r->body);
    free(r->hdrs);
    if (r->json)
        json_decref(r->json);
    curl_slist_free_all(r->sent);
    memset(r, 0, sizeof *r);
}

/* Value of response header `name` ("" when absent), copied into out. */
static inline const char *resp_header(const resp *r, const char *name, char *out,
                               size_t cap)
{
    out[0] = 0;
    size_t nl = strlen(name);
    for (const char *l = r->hdrs; l && *l;) {
        const char *e = strchr(l, '\n');
        size_t ll = e ? (size_t)(e - l) : strlen(l);
        if (ll > nl && strncasecmp(l, name, nl) == 0 && l[nl] == ':') {
            const char *v = l + nl + 1;
            while (*v == ' ')
                v++;
            size_t vl = (size_t)(l + ll - v);
            while (vl && (v[vl - 1] == '\r' || v[vl - 1] == ' '))
                vl--;
            if (vl >= cap)
                vl = cap - 1;
            memcpy(out, v, vl);
            out[vl] = 0;
        }
        l = e ? e + 1 : l + ll;
    }
    return out;
}

/* Prepare `c` for one request; the caller performs it (easy or multi). */
static inline void req_setup(fx *f, CURL *c, const char *method, const char *path,
                      const char *body, const char *const *extra, resp *r)
{
    memset(r, 0, sizeof *r);
    char url[1024];
    snprintf(url, sizeof url, "http://127.0.0.1:%u%s", (unsigned)f->port, path);
    curl_easy_reset(c);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 60000L);
    curl_easy_setopt(c, CURLOPT_PATH_AS_IS, 1L);
    r->sent = curl_slist_append(r->sent, "Expect:");
    if (body)
        r->sent = curl_slist_append(r->sent, "Content-Type: application/json");
    if (f->token) {
        char h[256];
        snprintf(h, sizeof h, "Authorization: Bearer %s", f->token);
        r->sent = curl_slist_append(r->sent, h);
    }
    for (size_t i = 0; extra && extra[i]; i++)
        r->sent = curl_slist_append(r->sent, extra[i]);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, r->sent);
    if (body) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(body));
    }
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_hdr);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(c, CURLOPT_PRIVATE, r);
    r->t0 = now_ms();
}

static inline void req_done(CURL *c, resp *r, CURLcode rc)
{
    r->rc = rc;
    r->ms = now_ms() - r->t0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r->status);
    if (r->len)
        r->json = json_loadb(r->body, r->len, JSON_DECODE_ANY, NULL);
}

static inline void req_on(fx *f, CURL *c, const char *method, const char *path,
                   const char *body, const char *const *extra, resp *r)
{
    req_setup(f, c, method, path, body, extra, r);
    req_done(c, r, curl_easy_perform(c));
}

static inline void req(fx *f, const char *method, const char *path, const char *body,
                const char *const *extra, resp *r)
{
    req_on(f, f->curl, method, path, body, extra, r);
}

/* One exchange whose only interest is its status. */
static inline void expect_status(fx *f, const char *method, const char *path,
                                 const char *body, const char *const *extra,
                                 long status)
{
    resp r;
    req(f, method, path, body, extra, &r);
    assert_int_equal(r.status, status);
    resp_free(&r);
}

static inline long connects_of(CURL *c)
{
    long n = -1;
    curl_easy_getinfo(c, CURLINFO_NUM_CONNECTS, &n);
    return n;
}

static inline size_t messages_in(const resp *r)
{
    return json_array_size(json_object_get(r->json, "messages"));
}

static inline const char *problem_type(const resp *r)
{
    const char *t = json_string_value(json_object_get(r->json, "type"));
    return t ? t : "";
}

static inline void create_topic(fx *f, const char *topic)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/topics/%s", topic);
    resp r;
    req(f, "PUT", path, "{\"queues\":1}", NULL, &r);
    if (r.status != 201 && r.status != 200)
        fail_msg("PUT %s: %ld %s", path, r.status, r.body ? r.body : "");
    resp_free(&r);
}

static inline void send_msg(fx *f, CURL *c, const char *topic, const char *body)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/topics/%s/messages", topic);
    resp r;
    req_on(f, c, "POST", path, body, NULL, &r);
    if (r.status != 201)
        fail_msg("POST %s: %ld %s", path, r.status, r.body ? r.body : "");
    resp_free(&r);
}

#define RECV_PATH "/v1/groups/g/receive"

static inline void receive_body(char *out, size_t cap, unsigned wait_ms, unsigned max)
{
    snprintf(out, cap, "{\"topic\":\"t\",\"wait_ms\":%u,\"max\":%u}", wait_ms, max);
}

/* Wait until the server has an exchange in flight (the client's request
 * arrived), up to ms; false if none came. */
static inline bool wait_busy(api_server *srv, int ms)
{
    int64_t end = now_ms() + ms;
    while (api_server_wait_idle(srv, 0)) {
        if (now_ms() > end)
            return false;
        sleep_ms(5);
    }
    return true;
}

static inline int task_count(void)
{
    DIR *d = opendir("/proc/self/task");
    assert_non_null(d);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

/* ---- raw sockets ---------------------------------------------------------------- */

static inline int raw_connect(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    return fd;
}

static inline void raw_send(int fd, const char *s, size_t n)
{
    while (n) {
        ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
        assert_true(w > 0);
        s += w;
        n -= (size_t)w;
    }
}

/* Read until the peer closes or timeout_ms passes; returns bytes read, and
 * *closed tells whether the peer closed. */
static inline size_t raw_read(int fd, char *buf, size_t cap, int timeout_ms, bool *closed)
{
    size_t n = 0;
    int64_t end = now_ms() + timeout_ms;
    *closed = false;
    while (n + 1 < cap) {
        int left = (int)(end - now_ms());
        if (left <= 0)
            break;
        struct pollfd p = { .fd = fd, .events = POLLIN };
        if (poll(&p, 1, left) <= 0)
            break;
        ssize_t r = recv(fd, buf + n, cap - 1 - n, 0);
        if (r <= 0) {
            *closed = true;
            break;
        }
        n += (size_t)r;
    }
    buf[n] = 0;
    return n;
}

/* One request with a Content-Length body (NULL: none) on a kept-alive
 * connection. */
static inline void raw_request(int fd, const char *method, const char *path,
                        const char *body)
{
    char head[512];
    int n = snprintf(head, sizeof head, "%s %s HTTP/1.1\r\nHost: x\r\n"
                     "Content-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n", method, path,
                     body ? strlen(body) : 0);
    raw_send(fd, head, (size_t)n);
    if (body)
        raw_send(fd, body, strlen(body));
}

/* Read one whole response (headers, Content-Length body): its status, 0
 * when none came within timeout_ms, -1 when the server closed first. */
static inline int raw_status(int fd, int timeout_ms)
{
    char buf[8192];
    size_t n = 0;
    int64_t end = now_ms() + timeout_ms;
    for (;;) {
        buf[n] = 0;
        char *eoh = strstr(buf, "\r\n\r\n");
        const char *cl = eoh ? strcasestr(buf, "\r\nContent-Length:") : NULL;
        if (eoh && cl && n >= (size_t)(eoh + 4 - buf) + strtoul(cl + 17, NULL, 10)) {
            int status = 0;
            return sscanf(buf, "HTTP/1.1 %d", &status) == 1 ? status : -1;
        }
        int left = (int)(end - now_ms());
        struct pollfd p = { .fd = fd, .events = POLLIN };
        if (left <= 0 || n + 1 >= sizeof buf || poll(&p, 1, left) <= 0)
            return 0;
        ssize_t r = recv(fd, buf + n, sizeof buf - 1 - n, 0);
        if (r <= 0)
            return -1;
        n += (size_t)r;
    }
}

/* A kept-alive connection the server has surely accepted (it answered). */
static inline int raw_open(uint16_t port)
{
    int fd = raw_connect(port);
    raw_request(fd, "GET", "/healthz", NULL);
    assert_int_equal(raw_status(fd, 10000), 200);
    return fd;
}

/* ---- multi: many requests in flight on one thread ------------------------------ */

typedef struct many {
    CURLM *m;
    CURL **h;
    resp *r;
    size_t n, done;
} many;

static inline void many_start(fx *f, many *mm, size_t n, const char *method,
                       const char *path, const char *body)
{
    mm->m = curl_multi_init();
    mm->h = calloc(n, sizeof *mm->h);
    mm->r = calloc(n, sizeof *mm->r);
    assert_non_null(mm->h);
    assert_non_null(mm->r);
    mm->n = n;
    mm->done = 0;
    for (size_t i = 0; i < n; i++) {
        mm->h[i] = curl_easy_init();
        req_setup(f, mm->h[i], method, path, body, NULL, &mm->r[i]);
        curl_easy_setopt(mm->h[i], CURLOPT_FORBID_REUSE, 1L);
        curl_multi_add_handle(mm->m, mm->h[i]);
    }
}

/* Drive transfers for up to ms; returns how many are done in all. */
static inline size_t many_run(many *mm, int ms)
{
    int64_t end = now_ms() + ms;
    do {
        int running;
        curl_multi_perform(mm->m, &running);
        CURLMsg *msg;
        int q;
        while ((msg = curl_multi_info_read(mm->m, &q))) {
            if (msg->msg != CURLMSG_DONE)
                continue;
            resp *r;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&r);
            req_done(msg->easy_handle, r, msg->data.result);
            mm->done++;
        }
        if (mm->done == mm->n)
            break;
        int left = (int)(end - now_ms());
        if (left > 0)
            curl_multi_poll(mm->m, NULL, 0, left < 50 ? left : 50, NULL);
    } while (now_ms() < end);
    return mm->done;
}

/* Drive until every request has been sent whole (or ms pass). */
static inline bool many_sent(many *mm, int ms)
{
    int64_t end = now_ms() + ms;
    while (now_ms() < end) {
        many_run(mm, 20);
        size_t sent = 0;
        for (size_t i = 0; i < mm->n; i++) {
            long rs = 0;
            curl_easy_getinfo(mm->h[i], CURLINFO_REQUEST_SIZE, &rs);
            if (rs > 0)
                sent++;
        }
        if (sent == mm->n)
            return true;
    }
    return false;
}

static inline void many_free(many *mm)
{
    for (size_t i = 0; i < mm->n; i++) {
        curl_multi_remove_handle(mm->m, mm->h[i]);
        curl_easy_cleanup(mm->h[i]);
        resp_free(&mm->r[i]);
    }
    curl_multi_cleanup(mm->m);
    free(mm->h);
    free(mm->r);
    memset(mm, 0, sizeof *mm);
}

/* ---- keep-alive, body limit, auth, binding -------------------------------------- */
#endif /* OUTBOXD_TEST_SERVER_FX_H */
