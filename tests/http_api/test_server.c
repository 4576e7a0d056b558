/*
 * test_server.c - the libmicrohttpd transport (api_server_* of api.h) over
 * real sockets: keep-alive, the body limit, bearer tokens, binding errors,
 * long polls (woken, timed out, abandoned, a thousand at once on two
 * threads), the idle timeout, draining and closing with parked requests,
 * the raw query string, request metrics, and the request workers (sends
 * sharing fdatasyncs, liveness while every worker is blocked, draining and
 * closing with requests in workers).
 *
 * Setup: the whole stack as the daemon builds it (store in a temporary
 * directory with its background thread, delay, txn, groups, then
 * api_server_open on 127.0.0.1 port 0), with a per-test api_config tweak.
 * The worker tests use a SYNC store on the real disk behind a gate
 * (support/io_gate.h) that can hold every fdatasync.
 * Clients are libcurl (easy for one request, multi for many parked ones)
 * and, where curl would be too polite, a raw TCP socket.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

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

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0) {
    }
}

static void stack_open(fx *f)
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

static brk_status server_try_open(fx *f)
{
    api_broker b = { f->store, f->txn, f->delay, f->groups };
    return api_server_open(&f->srv, &f->cfg, &b, f->err, sizeof f->err);
}

/* Start the server with f->cfg as the test left it. */
static void server_open(fx *f)
{
    brk_status st = server_try_open(f);
    if (st != BRK_OK)
        fail_msg("api_server_open: %s: %s", brk_status_name(st), f->err);
    f->port = api_server_port(f->srv);
    assert_int_not_equal(f->port, 0);
    f->token = f->cfg.token;
}

static int setup_with(void **state, bool sync, uint32_t commit_delay_us)
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

static int setup(void **state)
{
    return setup_with(state, false, 0);
}

static int setup_sync(void **state)
{
    return setup_with(state, true, 0);
}

/* A group-commit leader waits 1 ms for followers before its fdatasync, so
 * the records per fdatasync count the appends in flight at once, whatever
 * the disk's speed (TMPDIR on tmpfs) or the sanitizers' slowness. */
static int setup_sync_gathering(void **state)
{
    return setup_with(state, true, 1000);
}

static int teardown(void **state)
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

static size_t grow_append(char **p, size_t *len, const char *data, size_t n)
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

static size_t on_body(char *d, size_t sz, size_t n, void *ud)
{
    resp *r = ud;
    return grow_append(&r->body, &r->len, d, sz * n);
}

static size_t on_hdr(char *d, size_t sz, size_t n, void *ud)
{
    resp *r = ud;
    return grow_append(&r->hdrs, &r->hlen, d, sz * n);
}

static void resp_free(resp *r)
{
    free(r->body);
    free(r->hdrs);
    if (r->json)
        json_decref(r->json);
    curl_slist_free_all(r->sent);
    memset(r, 0, sizeof *r);
}

/* Value of response header `name` ("" when absent), copied into out. */
static const char *resp_header(const resp *r, const char *name, char *out,
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
static void req_setup(fx *f, CURL *c, const char *method, const char *path,
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

static void req_done(CURL *c, resp *r, CURLcode rc)
{
    r->rc = rc;
    r->ms = now_ms() - r->t0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r->status);
    if (r->len)
        r->json = json_loadb(r->body, r->len, JSON_DECODE_ANY, NULL);
}

static void req_on(fx *f, CURL *c, const char *method, const char *path,
                   const char *body, const char *const *extra, resp *r)
{
    req_setup(f, c, method, path, body, extra, r);
    req_done(c, r, curl_easy_perform(c));
}

static void req(fx *f, const char *method, const char *path, const char *body,
                const char *const *extra, resp *r)
{
    req_on(f, f->curl, method, path, body, extra, r);
}

static long connects_of(CURL *c)
{
    long n = -1;
    curl_easy_getinfo(c, CURLINFO_NUM_CONNECTS, &n);
    return n;
}

static size_t messages_in(const resp *r)
{
    return json_array_size(json_object_get(r->json, "messages"));
}

static const char *problem_type(const resp *r)
{
    const char *t = json_string_value(json_object_get(r->json, "type"));
    return t ? t : "";
}

static void create_topic(fx *f, const char *topic)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/topics/%s", topic);
    resp r;
    req(f, "PUT", path, "{\"queues\":1}", NULL, &r);
    if (r.status != 201 && r.status != 200)
        fail_msg("PUT %s: %ld %s", path, r.status, r.body ? r.body : "");
    resp_free(&r);
}

static void send_msg(fx *f, CURL *c, const char *topic, const char *body)
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

static void receive_body(char *out, size_t cap, unsigned wait_ms, unsigned max)
{
    snprintf(out, cap, "{\"topic\":\"t\",\"wait_ms\":%u,\"max\":%u}", wait_ms, max);
}

/* Wait until the server has an exchange in flight (the client's request
 * arrived), up to ms; false if none came. */
static bool wait_busy(api_server *srv, int ms)
{
    int64_t end = now_ms() + ms;
    while (api_server_wait_idle(srv, 0)) {
        if (now_ms() > end)
            return false;
        sleep_ms(5);
    }
    return true;
}

static int task_count(void)
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

static int raw_connect(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    return fd;
}

static void raw_send(int fd, const char *s, size_t n)
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
static size_t raw_read(int fd, char *buf, size_t cap, int timeout_ms, bool *closed)
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
static void raw_request(int fd, const char *method, const char *path,
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
static int raw_status(int fd, int timeout_ms)
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
static int raw_open(uint16_t port)
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

static void many_start(fx *f, many *mm, size_t n, const char *method,
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
static size_t many_run(many *mm, int ms)
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
static bool many_sent(many *mm, int ms)
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

static void many_free(many *mm)
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

static void keep_alive_reuses_the_connection(void **state)
{
    fx *f = *state;
    server_open(f);
    resp r;
    req(f, "GET", "/healthz", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(connects_of(f->curl), 1);
    resp_free(&r);
    req(f, "GET", "/readyz", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(connects_of(f->curl), 0);
    resp_free(&r);
    create_topic(f, "t");
    assert_int_equal(connects_of(f->curl), 0);
}

static void body_over_the_limit_is_413_before_it_is_read(void **state)
{
    fx *f = *state;
    f->cfg.max_body_bytes = 1024;
    server_open(f);
    /* Declares 100 MB, sends 100 bytes: the answer comes at once. */
    int fd = raw_connect(f->port);
    const char *head = "POST /v1/topics/t/messages HTTP/1.1\r\nHost: x\r\n"
                       "Content-Type: application/json\r\n"
                       "Content-Length: 104857600\r\n\r\n";
    raw_send(fd, head, strlen(head));
    char pad[100];
    memset(pad, ' ', sizeof pad);
    raw_send(fd, pad, sizeof pad);
    char buf[4096];
    bool closed;
    int64_t t0 = now_ms();
    raw_read(fd, buf, sizeof buf, 10000, &closed);
    assert_true(now_ms() - t0 < 5000);
    assert_true(strncmp(buf, "HTTP/1.1 413", 12) == 0);
    assert_non_null(strcasestr(buf, "Content-Type: application/problem+json"));
    assert_non_null(strstr(buf, "urn:outboxd:problem:payload-too-large"));
    assert_true(closed);              /* the rest is not read: connection ends */
    close(fd);
}

static void body_just_over_the_limit_is_413_and_at_the_limit_is_accepted(void **state)
{
    fx *f = *state;
    f->cfg.max_body_bytes = 1024;
    server_open(f);
    char body[1100];
    /* {"body":"xxx...x"} of exactly 1024 bytes */
    size_t fill = 1024 - strlen("{\"body\":\"\"}");
    strcpy(body, "{\"body\":\"");
    memset(body + 9, 'x', fill);
    strcpy(body + 9 + fill, "\"}");
    assert_int_equal(strlen(body), 1024);
    resp r;
    req(f, "POST", "/v1/topics/t/messages", body, NULL, &r);
    assert_int_equal(r.status, 201);
    resp_free(&r);
    body[1023] = ' ';
    strcpy(body + 1024, "}");                       /* 1025 bytes */
    req(f, "POST", "/v1/topics/t/messages", body, NULL, &r);
    assert_int_equal(r.status, 413);
    char ct[128];
    assert_string_equal(resp_header(&r, "Content-Type", ct, sizeof ct),
                        "application/problem+json");
    assert_string_equal(problem_type(&r), "urn:outboxd:problem:payload-too-large");
    assert_int_equal(json_integer_value(json_object_get(r.json, "status")), 413);
    resp_free(&r);
}

typedef struct chunk_src {
    size_t left;
} chunk_src;

static size_t read_chunks(char *buf, size_t sz, size_t n, void *ud)
{
    chunk_src *s = ud;
    size_t k = sz * n < s->left ? sz * n : s->left;
    if (k > 512)
        k = 512;
    memset(buf, ' ', k);
    s->left -= k;
    return k;
}

static void chunked_body_over_the_limit_is_413(void **state)
{
    fx *f = *state;
    f->cfg.max_body_bytes = 1024;
    server_open(f);
    resp r;
    req_setup(f, f->curl, "POST", "/v1/topics/t/messages", NULL, NULL, &r);
    r.sent = curl_slist_append(r.sent, "Transfer-Encoding: chunked");
    r.sent = curl_slist_append(r.sent, "Content-Type: application/json");
    curl_easy_setopt(f->curl, CURLOPT_HTTPHEADER, r.sent);
    chunk_src src = { .left = 64 * 1024 };
    curl_easy_setopt(f->curl, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(f->curl, CURLOPT_READFUNCTION, read_chunks);
    curl_easy_setopt(f->curl, CURLOPT_READDATA, &src);
    req_done(f->curl, &r, curl_easy_perform(f->curl));
    assert_int_equal(r.status, 413);
    assert_string_equal(problem_type(&r), "urn:outboxd:problem:payload-too-large");
    resp_free(&r);
}

static void expect_401(fx *f, const char *auth)
{
    const char *extra[2] = { auth, NULL };
    const char *saved = f->token;
    f->token = NULL;
    resp r;
    req(f, "GET", "/v1/topics", NULL, auth ? extra : NULL, &r);
    f->token = saved;
    if (r.status != 401)
        fail_msg("with \"%s\": %ld", auth ? auth : "(none)", r.status);
    char h[64];
    assert_string_equal(resp_header(&r, "WWW-Authenticate", h, sizeof h), "Bearer");
    assert_string_equal(resp_header(&r, "Content-Type", h, sizeof h),
                        "application/problem+json");
    assert_string_equal(problem_type(&r), "urn:outboxd:problem:unauthorized");
    assert_int_equal(json_integer_value(json_object_get(r.json, "status")), 401);
    resp_free(&r);
}

static void token_is_required_and_checked(void **state)
{
    fx *f = *state;
    f->cfg.token = "s3cret-t0ken";
    server_open(f);
    expect_401(f, NULL);
    expect_401(f, "Authorization: Bearer wrong");
    expect_401(f, "Authorization: Bearer s3cret-t0ke");
    expect_401(f, "Authorization: Bearer s3cret-t0ken2");
    expect_401(f, "Authorization: Bearer ");
    expect_401(f, "Authorization: Basic czNjcmV0LXQwa2Vu");
    expect_401(f, "Authorization: s3cret-t0ken");
    resp r;
    req(f, "GET", "/v1/topics", NULL, NULL, &r);       /* f->token is sent */
    assert_int_equal(r.status, 200);
    resp_free(&r);
    const char *lower[] = { "Authorization: bearer s3cret-t0ken", NULL };
    f->token = NULL;
    req(f, "GET", "/v1/topics", NULL, lower, &r);
    assert_int_equal(r.status, 200);
    resp_free(&r);
    /* liveness and readiness stay open */
    req(f, "GET", "/healthz", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    resp_free(&r);
    req(f, "GET", "/readyz", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    resp_free(&r);
    /* a write without the token never reaches the handler */
    req(f, "POST", "/v1/topics/t/messages", "{\"body\":1}", NULL, &r);
    assert_int_equal(r.status, 401);
    resp_free(&r);
    f->token = f->cfg.token;
    req(f, "GET", "/v1/topics/t", NULL, NULL, &r);
    assert_int_equal(r.status, 404);
    resp_free(&r);
}

static void bind_to_a_bad_address_is_inval(void **state)
{
    fx *f = *state;
    const char *bad[] = { "localhost", "127.0.0", "1.2.3.4.5", "::g", "0x7f000001" };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        f->cfg.bind_addr = bad[i];
        f->err[0] = 0;
        assert_int_equal(server_try_open(f), BRK_INVAL);
        assert_null(f->srv);
        assert_non_null(strstr(f->err, bad[i]));
    }
}

static void bind_conflict_is_io_naming_the_address(void **state)
{
    fx *f = *state;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(fd, 1), 0);
    socklen_t al = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &al);
    f->cfg.port = ntohs(a.sin_port);
    assert_int_equal(server_try_open(f), BRK_IO);
    assert_null(f->srv);
    char want[64];
    snprintf(want, sizeof want, "127.0.0.1:%u", (unsigned)f->cfg.port);
    if (!strstr(f->err, want) || !strstr(f->err, strerror(EADDRINUSE)))
        fail_msg("errbuf: %s", f->err);
    close(fd);
}

static void ipv6_loopback_works_when_the_host_has_it(void **state)
{
    fx *f = *state;
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 a = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT };
    bool have = fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
    if (fd >= 0)
        close(fd);
    if (!have)
        skip();
    f->cfg.bind_addr = "::1";
    server_open(f);
    char url[64];
    snprintf(url, sizeof url, "http://[::1]:%u/healthz", (unsigned)f->port);
    resp r;
    req_setup(f, f->curl, "GET", "/healthz", NULL, NULL, &r);
    curl_easy_setopt(f->curl, CURLOPT_URL, url);
    req_done(f->curl, &r, curl_easy_perform(f->curl));
    assert_int_equal(r.status, 200);
    resp_free(&r);
}

/* ---- long polls ----------------------------------------------------------------- */

typedef struct poller {
    fx *f;
    unsigned wait_ms;
    long timeout_ms;            /* client-side timeout; 0: none */
    resp r;
} poller;

static void *poll_once(void *arg)
{
    poller *p = arg;
    CURL *c = curl_easy_init();
    char body[128];
    receive_body(body, sizeof body, p->wait_ms, 16);
    req_setup(p->f, c, "POST", RECV_PATH, body, NULL, &p->r);
    if (p->timeout_ms)
        curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, p->timeout_ms);
    req_done(c, &p->r, curl_easy_perform(c));
    curl_easy_cleanup(c);
    return NULL;
}

static void long_poll_is_woken_by_a_send(void **state)
{
    fx *f = *state;
    server_open(f);
    create_topic(f, "t");
    poller p = { .f = f, .wait_ms = 15000 };
    assert_true(api_server_wait_idle(f->srv, 2000));
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, poll_once, &p), 0);
    assert_true(wait_busy(f->srv, 5000));
    sleep_ms(100);                                  /* let it park */
    send_msg(f, f->curl, "t", "{\"body\":{\"n\":1}}");
    pthread_join(th, NULL);
    assert_int_equal(p.r.status, 200);
    assert_int_equal(messages_in(&p.r), 1);
    json_t *m = json_array_get(json_object_get(p.r.json, "messages"), 0);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(m, "body"), "n")), 1);
    if (p.r.ms > 5000)
        fail_msg("woken poll took %lld ms", (long long)p.r.ms);
    resp_free(&p.r);
}

static void long_poll_times_out_with_an_empty_list(void **state)
{
    fx *f = *state;
    server_open(f);
    create_topic(f, "t");
    char body[128];
    receive_body(body, sizeof body, 1000, 16);
    resp r;
    req(f, "POST", RECV_PATH, body, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(messages_in(&r), 0);
    assert_true(json_is_array(json_object_get(r.json, "messages")));
    if (r.ms < 900 || r.ms > 4000)
        fail_msg("a 1000 ms poll took %lld ms", (long long)r.ms);
    resp_free(&r);
}

static void parked_poll_outlives_the_idle_timeout(void **state)
{
    fx *f = *state;
    f->cfg.idle_timeout_s = 1;
    server_open(f);
    create_topic(f, "t");
    char body[128];
    receive_body(body, sizeof body, 2500, 16);
    resp r;
    req(f, "POST", RECV_PATH, body, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(messages_in(&r), 0);
    assert_true(r.ms >= 2400);
    resp_free(&r);
}

static void client_gone_while_parked_is_cleaned_up(void **state)
{
    fx *f = *state;
    server_open(f);
    create_topic(f, "t");
    poller p = { .f = f, .wait_ms = 2000, .timeout_ms = 600 };
    poll_once(&p);
    assert_int_equal(p.r.rc, CURLE_OPERATION_TIMEDOUT);
    resp_free(&p.r);
    /* the server notices at the poll's deadline, then forgets it */
    assert_true(api_server_wait_idle(f->srv, 10000));
    /* nothing was handed to the vanished client: a send now reaches the
     * next receive, and the server answers as before */
    send_msg(f, f->curl, "t", "{\"body\":2}");
    char body[128];
    receive_body(body, sizeof body, 0, 16);
    resp r;
    req(f, "POST", RECV_PATH, body, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(messages_in(&r), 1);
    resp_free(&r);
}

static void client_gone_while_parked_then_woken_by_a_send(void **state)
{
    fx *f = *state;
    server_open(f);
    create_topic(f, "t");
    poller p = { .f = f, .wait_ms = 20000, .timeout_ms = 1000 };
    poll_once(&p);
    assert_int_equal(p.r.rc, CURLE_OPERATION_TIMEDOUT);
    resp_free(&p.r);
    assert_true(wait_busy(f->srv, 0));                 /* still parked */
    send_msg(f, f->curl, "t", "{\"body\":3}");          /* wakes it */
    assert_true(api_server_wait_idle(f->srv, 10000));
}

static void wait_idle_is_false_while_an_exchange_is_in_flight(void **state)
{
    fx *f = *state;
    server_open(f);
    create_topic(f, "t");
    /* the PUT's exchange ends (completion callback) just after its answer */
    assert_true(api_server_wait_idle(f->srv, 2000));
    poller p = { .f = f, .wait_ms = 1500 };
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, poll_once, &p), 0);
    assert_true(wait_busy(f->srv, 5000));
    int64_t t0 = now_ms();
    assert_false(api_server_wait_idle(f->srv, 200));
    assert_true(now_ms() - t0 >= 190);
    assert_true(api_server_wait_idle(f->srv, 10000));
    pthread_join(th, NULL);
    assert_int_equal(p.r.status, 200);
    resp_free(&p.r);
}

/* The wake can come before api_handle returns API_WAIT, or between that
 * and the suspend: a send racing each receive must always end the wait at
 * once (a lost wake would hold the receive until its deadline). */
typedef struct racer {
    fx *f;
    pthread_barrier_t go;
    int rounds;
} racer;

static void *race_sender(void *arg)
{
    racer *rc = arg;
    CURL *c = curl_easy_init();
    unsigned seed = 1;
    for (int i = 0; i < rc->rounds; i++) {
        pthread_barrier_wait(&rc->go);
        long us = (long)(rand_r(&seed) % 1500);
        struct timespec ts = { 0, us * 1000 };
        nanosleep(&ts, NULL);
        send_msg(rc->f, c, "t", "{\"body\":0}");
    }
    curl_easy_cleanup(c);
    return NULL;
}

static void a_wake_racing_the_park_is_never_lost(void **state)
{
    fx *f = *state;
    server_open(f);
    create_topic(f, "t");
    racer rc = { .f = f, .rounds = 300 };
    pthread_barrier_init(&rc.go, NULL, 2);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, race_sender, &rc), 0);
    char body[128];
    receive_body(body, sizeof body, 10000, 1);
    int64_t worst = 0;
    for (int i = 0; i < rc.rounds; i++) {
        pthread_barrier_wait(&rc.go);
        resp r;
        req(f, "POST", RECV_PATH, body, NULL, &r);
        assert_int_equal(r.status, 200);
        assert_int_equal(messages_in(&r), 1);
        if (r.ms > worst)
            worst = r.ms;
        resp_free(&r);
    }
    pthread_join(th, NULL);
    pthread_barrier_destroy(&rc.go);
    if (worst > 3000)
        fail_msg("a receive racing a send took %lld ms", (long long)worst);
}

#define POLLS 1000

static void raise_nofile(size_t need)
{
    struct rlimit rl;
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &rl), 0);
    if (rl.rlim_cur < need) {
        rl.rlim_cur = rl.rlim_max < need ? rl.rlim_max : need;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur < need) {
        print_message("RLIMIT_NOFILE %llu < %zu\n", (unsigned long long)rl.rlim_cur, need);
        skip();
    }
}

static void thousand_parked_long_polls_hold_no_thread(void **state)
{
    fx *f = *state;
    raise_nofile(2 * POLLS + 256);
    f->cfg.threads = 2;
    server_open(f);
    create_topic(f, "t");
    int tasks0 = task_count();
    char body[128];
    receive_body(body, sizeof body, 20000, 1);
    many mm;
    many_start(f, &mm, POLLS, "POST", RECV_PATH, body);
    assert_true(many_sent(&mm, 30000));
    many_run(&mm, 500);
    assert_int_equal(mm.done, 0);                   /* all parked */
    int tasks1 = task_count();
    if (tasks1 - tasks0 > 4)
        fail_msg("threads grew from %d to %d with %d parked polls", tasks0,
                 tasks1, POLLS);
    /* the server still answers at once */
    resp r;
    req(f, "GET", "/healthz", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    if (r.ms > 2000)
        fail_msg("/healthz took %lld ms with %d parked polls", (long long)r.ms, POLLS);
    resp_free(&r);
    /* one message per poll (max 1): every poll completes before its deadline */
    int64_t t0 = now_ms();
    for (int i = 0; i < POLLS; i++) {
        send_msg(f, f->curl, "t", "{\"body\":0}");
        if (i % 50 == 0)
            many_run(&mm, 0);
    }
    many_run(&mm, 60000);
    assert_int_equal(mm.done, POLLS);
    size_t got = 0;
    for (size_t i = 0; i < POLLS; i++) {
        if (mm.r[i].status != 200)
            fail_msg("poll %zu: status %ld rc %d", i, mm.r[i].status, mm.r[i].rc);
        got += messages_in(&mm.r[i]);
    }
    assert_int_equal(got, POLLS);
    if (now_ms() - t0 > 19000)
        fail_msg("polls took %lld ms to drain 1000 messages", (long long)(now_ms() - t0));
    many_free(&mm);
    assert_true(api_server_wait_idle(f->srv, 10000));
}

static void idle_connection_is_closed_after_the_idle_timeout(void **state)
{
    fx *f = *state;
    f->cfg.idle_timeout_s = 1;
    server_open(f);
    int fd = raw_connect(f->port);
    char buf[256];
    bool closed;
    int64_t t0 = now_ms();
    raw_read(fd, buf, sizeof buf, 8000, &closed);
    int64_t ms = now_ms() - t0;
    close(fd);
    assert_true(closed);
    if (ms < 700 || ms > 5000)
        fail_msg("idle connection closed after %lld ms", (long long)ms);
    /* a kept-alive connection goes the same way */
    resp r;
    req(f, "GET", "/healthz", NULL, NULL, &r);
    assert_int_equal(connects_of(f->curl), 1);
    resp_free(&r);
    sleep_ms(2500);
    req(f, "GET", "/healthz", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(connects_of(f->curl), 1);      /* a new connection */
    resp_free(&r);
}

/* ---- drain and close ------------------------------------------------------------ */

static void drain_answers_parked_polls_and_refuses_new_writes(void **state)
{
    fx *f = *state;
    server_open(f);
    create_topic(f, "t");                 /* f->curl now holds a connection */
    char body[128];
    receive_body(body, sizeof body, 20000, 16);
    many mm;
    many_start(f, &mm, 50, "POST", RECV_PATH, body);
    assert_true(many_sent(&mm, 10000));
    many_run(&mm, 300);
    assert_int_equal(mm.done, 0);
    int64_t t0 = now_ms();
    api_server_drain(f->srv);
    many_run(&mm, 10000);
    assert_int_equal(mm.done, 50);
    if (now_ms() - t0 > 3000)
        fail_msg("drained polls took %lld ms", (long long)(now_ms() - t0));
    for (size_t i = 0; i < mm.n; i++) {
        assert_int_equal(mm.r[i].status, 200);
        assert_int_equal(messages_in(&mm.r[i]), 0);
    }
    many_free(&mm);
    /* over the connection accepted before the drain */
    resp r;
    req(f, "POST", "/v1/topics/t/messages", "{\"body\":1}", NULL, &r);
    assert_int_equal(connects_of(f->curl), 0);
    assert_int_equal(r.status, 503);
    char h[32];
    assert_string_not_equal(resp_header(&r, "Retry-After", h, sizeof h), "");
    assert_string_equal(problem_type(&r), "urn:outboxd:problem:shutting-down");
    resp_free(&r);
    req(f, "GET", "/readyz", NULL, NULL, &r);
    assert_int_equal(r.status, 503);
    resp_free(&r);
    /* a parked-again receive answers at once */
    req(f, "POST", RECV_PATH, body, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_true(r.ms < 3000);
    resp_free(&r);
    /* no new connections */
    CURL *c = curl_easy_init();
    req_on(f, c, "GET", "/healthz", NULL, NULL, &r);
    assert_int_equal(r.rc, CURLE_COULDNT_CONNECT);
    resp_free(&r);
    curl_easy_cleanup(c);
    api_server_drain(f->srv);                       /* idempotent */
    assert_true(api_server_wait_idle(f->srv, 5000));
}

static void close_with_parked_polls_answers_them(void **state)
{
    fx *f = *state;
    server_open(f);
    create_topic(f, "t");
    char body[128];
    receive_body(body, sizeof body, 20000, 16);
    many mm;
    many_start(f, &mm, 5, "POST", RECV_PATH, body);
    assert_true(many_sent(&mm, 10000));
    many_run(&mm, 300);
    assert_int_equal(mm.done, 0);
    int64_t t0 = now_ms();
    api_server_close(f->srv);
    f->srv = NULL;
    assert_true(now_ms() - t0 < 5000);
    many_run(&mm, 5000);
    assert_int_equal(mm.done, 5);                   /* answered or cut */
    many_free(&mm);
}

static void close_of_null_is_a_no_op(void **state)
{
    (void)state;
    api_server_close(NULL);
    api_server_drain(NULL);
    assert_true(api_server_wait_idle(NULL, 0));
    assert_int_equal(api_server_port(NULL), 0);
}

/* ---- requests reach the handler as sent ------------------------------------------- */

static void raw_query_string_reaches_the_handler(void **state)
{
    fx *f = *state;
    server_open(f);
    resp r;
    req(f, "GET", "/v1/transactions?state=stuck&limit=5", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    resp_free(&r);
    req(f, "GET", "/v1/transactions?state=st%75ck", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    resp_free(&r);
    req(f, "GET", "/v1/transactions?limit=0", NULL, NULL, &r);
    assert_int_equal(r.status, 400);
    resp_free(&r);
    req(f, "GET", "/v1/transactions?state=bogus", NULL, NULL, &r);
    assert_int_equal(r.status, 400);
    resp_free(&r);
}

static void oversized_headers_are_refused_by_the_server_without_leaking(void **state)
{
    fx *f = *state;
    server_open(f);
    int fd = raw_connect(f->port);
    /* MHD answers 431 and closes once its buffer is full, possibly while
     * we still send (then the answer may be lost to the reset): what must
     * hold is that the server shrugs it off and frees the request. */
    char big[40000];
    int n = snprintf(big, sizeof big, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ");
    memset(big + n, 'a', sizeof big - (size_t)n - 4);
    memcpy(big + sizeof big - 4, "\r\n\r\n", 4);
    (void)send(fd, big, sizeof big, MSG_NOSIGNAL);
    char buf[1024];
    bool closed;
    size_t got = raw_read(fd, buf, sizeof buf, 5000, &closed);
    close(fd);
    assert_true(got == 0 || strncmp(buf, "HTTP/1.1 4", 10) == 0);
    assert_true(api_server_wait_idle(f->srv, 5000));
    resp r;
    req(f, "GET", "/healthz", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    resp_free(&r);
}

static void requests_are_counted_by_route_and_status(void **state)
{
    fx *f = *state;
    f->cfg.token = "tok";
    server_open(f);
    resp r;
    req(f, "GET", "/healthz", NULL, NULL, &r);
    resp_free(&r);
    f->token = NULL;
    req(f, "GET", "/v1/topics", NULL, NULL, &r);           /* 401 */
    assert_int_equal(r.status, 401);
    resp_free(&r);
    f->token = "tok";
    req(f, "GET", "/metrics", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    const char *want[] = {
        "outboxd_http_requests_total{route=\"/healthz\",method=\"GET\",code=\"200\"} 1",
        "outboxd_http_requests_total{route=\"unmatched\",method=\"GET\",code=\"401\"} 1",
        "outboxd_http_request_duration_seconds_count{route=\"/healthz\"} 1",
    };
    for (size_t i = 0; i < sizeof want / sizeof *want; i++)
        if (!strstr(r.body, want[i]))
            fail_msg("metrics lack %s:\n%s", want[i], r.body);
    resp_free(&r);
}

/* ---- request workers ------------------------------------------------------------- */

static uint64_t appends_of(fx *f)
{
    brk_store_stats st;
    brk_store_get_stats(f->store, &st);
    return st.appends;
}

/* Close the gate and send n messages, one per connection.  The first append
 * written leads the group commit and is held in fdatasync; the store queues
 * the next ones behind it (unwritten).  Returns the appends before. */
static uint64_t send_into_the_gate(fx *f, const int *fd, int n)
{
    uint64_t a0 = appends_of(f);
    brk_gate_io_close(&f->gate);
    for (int i = 0; i < n; i++)
        raw_request(fd[i], "POST", "/v1/topics/t/messages", "{\"body\":1}");
    assert_true(brk_gate_io_wait_held(&f->gate, 1, 10000));
    sleep_ms(200);                       /* the other workers reach the store */
    assert_int_equal(appends_of(f), a0 + 1);
    return a0;
}

#define SENDERS    32
#define SENDS_EACH 25

typedef struct sender {
    fx *f;
    int created;
} sender;

static void *send_loop(void *arg)
{
    sender *s = arg;
    CURL *c = curl_easy_init();
    for (int i = 0; i < SENDS_EACH; i++) {
        resp r;
        req_on(s->f, c, "POST", "/v1/topics/t/messages", "{\"body\":1}", NULL, &r);
        s->created += r.status == 201;
        resp_free(&r);
    }
    curl_easy_cleanup(c);
    return NULL;
}

/* With api_handle on MHD's two I/O threads at most two appends are ever in
 * flight, so no fdatasync covers more than two records, however long the
 * leader gathers.  In the workers the appends of 32 keep-alive senders
 * share their fdatasyncs. */
static void concurrent_sends_share_fdatasyncs(void **state)
{
    fx *f = *state;
    f->cfg.threads = 2;
    server_open(f);
    create_topic(f, "t");
    brk_store_stats a, b;
    brk_store_get_stats(f->store, &a);
    sender s[SENDERS];
    pthread_t th[SENDERS];
    for (int i = 0; i < SENDERS; i++) {
        s[i] = (sender){ .f = f };
        assert_int_equal(pthread_create(&th[i], NULL, send_loop, &s[i]), 0);
    }
    for (int i = 0; i < SENDERS; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(s[i].created, SENDS_EACH);
    }
    brk_store_get_stats(f->store, &b);
    uint64_t syncs = b.fsyncs - a.fsyncs, recs = b.fsync_records - a.fsync_records;
    assert_true(recs >= SENDERS * SENDS_EACH);
    double per = (double)recs / (double)(syncs ? syncs : 1);
    print_message("%llu records, %llu fdatasyncs: %.1f per fdatasync\n",
                  (unsigned long long)recs, (unsigned long long)syncs, per);
    if (per <= 2.0)
        fail_msg("%.2f records per fdatasync: the sends did not share them", per);
}

#define BUSY_WORKERS 4

/* Every worker blocked in a SYNC append's fdatasync and as many sends
 * queued behind them: liveness, readiness and metrics still answer at once
 * (on MHD's thread), while a request that needs a worker waits for one. */
static void liveness_answers_while_every_worker_is_blocked(void **state)
{
    fx *f = *state;
    f->cfg.workers = BUSY_WORKERS;
    server_open(f);
    create_topic(f, "t");
    int fd[2 * BUSY_WORKERS], probe = raw_open(f->port);
    for (int i = 0; i < 2 * BUSY_WORKERS; i++)
        fd[i] = raw_open(f->port);
    send_into_the_gate(f, fd, 2 * BUSY_WORKERS);
    const char *paths[] = { "/healthz", "/readyz", "/metrics" };
    for (size_t i = 0; i < sizeof paths / sizeof *paths; i++) {
        resp r;
        req(f, "GET", paths[i], NULL, NULL, &r);
        assert_int_equal(r.status, 200);
        if (r.ms > 2000)
            fail_msg("%s took %lld ms", paths[i], (long long)r.ms);
        resp_free(&r);
    }
    raw_request(probe, "GET", "/v1/topics", NULL);
    assert_int_equal(raw_status(probe, 300), 0);           /* no worker free */
    brk_gate_io_open(&f->gate);
    for (int i = 0; i < 2 * BUSY_WORKERS; i++) {
        assert_int_equal(raw_status(fd[i], 10000), 201);
        close(fd[i]);
    }
    assert_int_equal(raw_status(probe, 10000), 200);
    close(probe);
}

/* Two sends blocked in the two workers, two queued behind them: the gate
 * holds them all until the test opens it. */
static uint64_t block_four_sends(fx *f, int fd[4])
{
    f->cfg.workers = 2;
    server_open(f);
    create_topic(f, "t");
    for (int i = 0; i < 4; i++)
        fd[i] = raw_open(f->port);
    return send_into_the_gate(f, fd, 4);
}

/* Drain does not wait for requests in workers; they finish (201), and the
 * queued ones, handled after it, are refused (503). */
static void drain_lets_requests_in_workers_finish(void **state)
{
    fx *f = *state;
    int fd[4];
    block_four_sends(f, fd);
    int probe = raw_open(f->port);
    int64_t t0 = now_ms();
    api_server_drain(f->srv);
    assert_true(now_ms() - t0 < 2000);
    raw_request(probe, "GET", "/readyz", NULL);
    assert_int_equal(raw_status(probe, 2000), 503);
    assert_false(api_server_wait_idle(f->srv, 100));
    brk_gate_io_open(&f->gate);
    int created = 0, refused = 0;
    for (int i = 0; i < 4; i++) {
        int st = raw_status(fd[i], 10000);
        created += st == 201;
        refused += st == 503;
        close(fd[i]);
    }
    assert_int_equal(created, 2);
    assert_int_equal(refused, 2);
    assert_true(api_server_wait_idle(f->srv, 5000));
    close(probe);
}

typedef struct closer {
    api_server *srv;
    atomic_bool done;
} closer;

static void *close_server(void *arg)
{
    closer *c = arg;
    api_server_close(c->srv);
    atomic_store(&c->done, true);
    return NULL;
}

/* Close waits for the requests its workers hold and runs the queued ones
 * (refused: it drained first); meanwhile a request on a kept-alive
 * connection runs on MHD's thread; every client gets its answer or a
 * close. */
static void close_waits_for_requests_in_workers(void **state)
{
    fx *f = *state;
    int fd[4];
    uint64_t a0 = block_four_sends(f, fd);
    int probe = raw_open(f->port);
    closer c = { .srv = f->srv };
    atomic_init(&c.done, false);
    f->srv = NULL;
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, close_server, &c), 0);
    sleep_ms(300);
    assert_false(atomic_load(&c.done));
    raw_request(probe, "GET", "/v1/topics", NULL);
    assert_int_equal(raw_status(probe, 5000), 200);
    close(probe);
    assert_false(atomic_load(&c.done));
    brk_gate_io_open(&f->gate);
    pthread_join(th, NULL);
    brk_store_stats st;
    brk_store_get_stats(f->store, &st);
    assert_int_equal(st.appends, a0 + 2);
    assert_true(st.durable_offset >= st.log_end);   /* the two were synced */
    for (int i = 0; i < 4; i++) {
        int s = raw_status(fd[i], 5000);
        if (s != 201 && s != 503 && s != -1)
            fail_msg("client %d: %d", i, s);
        close(fd[i]);
    }
}

static void send_nested(fx *f, size_t arrays, long want)
{
    char *body = malloc(2 * arrays + 32);
    assert_non_null(body);
    size_t n = (size_t)sprintf(body, "{\"body\":");
    memset(body + n, '[', arrays);
    memset(body + n + arrays, ']', arrays);
    strcpy(body + n + 2 * arrays, "}");
    resp r;
    req(f, "POST", "/v1/topics/t/messages", body, NULL, &r);
    if (r.status != want)
        fail_msg("%zu levels: %ld, want %ld", arrays + 1, r.status, want);
    resp_free(&r);
    free(body);
}

/* api_handle runs on a worker's stack: the deepest body jansson parses
 * (2048 levels; jansson recurses to dump it) is stored and received. */
static void deepest_json_body_fits_a_worker_stack(void **state)
{
    fx *f = *state;
    server_open(f);
    create_topic(f, "t");
    send_nested(f, 2048, 400);           /* 2049 levels: past the limit */
    send_nested(f, 2047, 201);
    char body[128];
    receive_body(body, sizeof body, 0, 16);
    resp r;
    req(f, "POST", RECV_PATH, body, NULL, &r);
    assert_int_equal(r.status, 200);
    /* deeper than jansson parses here, with the envelope: look at the text */
    char *deep = malloc(2048);
    assert_non_null(deep);
    memset(deep, '[', 2047);
    deep[2047] = 0;
    if (!r.body || !strstr(r.body, deep))
        fail_msg("the message is not in the answer: %.200s", r.body ? r.body : "");
    free(deep);
    resp_free(&r);
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_ALL);
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
#define TS(fn) cmocka_unit_test_setup_teardown(fn, setup_sync, teardown)
    const struct CMUnitTest tests[] = {
        T(keep_alive_reuses_the_connection),
        T(body_over_the_limit_is_413_before_it_is_read),
        T(body_just_over_the_limit_is_413_and_at_the_limit_is_accepted),
        T(chunked_body_over_the_limit_is_413),
        T(token_is_required_and_checked),
        T(bind_to_a_bad_address_is_inval),
        T(bind_conflict_is_io_naming_the_address),
        T(ipv6_loopback_works_when_the_host_has_it),
        T(long_poll_is_woken_by_a_send),
        T(long_poll_times_out_with_an_empty_list),
        T(parked_poll_outlives_the_idle_timeout),
        T(client_gone_while_parked_is_cleaned_up),
        T(client_gone_while_parked_then_woken_by_a_send),
        T(wait_idle_is_false_while_an_exchange_is_in_flight),
        T(a_wake_racing_the_park_is_never_lost),
        T(thousand_parked_long_polls_hold_no_thread),
        T(idle_connection_is_closed_after_the_idle_timeout),
        T(drain_answers_parked_polls_and_refuses_new_writes),
        T(close_with_parked_polls_answers_them),
        cmocka_unit_test(close_of_null_is_a_no_op),
        T(raw_query_string_reaches_the_handler),
        T(oversized_headers_are_refused_by_the_server_without_leaking),
        T(requests_are_counted_by_route_and_status),
        cmocka_unit_test_setup_teardown(concurrent_sends_share_fdatasyncs,
                                        setup_sync_gathering, teardown),
        TS(liveness_answers_while_every_worker_is_blocked),
        TS(drain_lets_requests_in_workers_finish),
        TS(close_waits_for_requests_in_workers),
        T(deepest_json_body_fits_a_worker_stack),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
