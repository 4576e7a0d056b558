/*
 * daemon_harness.h - what test_daemon.c and test_daemon_pg.c drive the
 * outboxd binary with: child processes (fork/exec of OUTBOXD_BIN, stdout
 * and stderr drained by a thread), the JSON log they write, HTTP through
 * libcurl, and sets of message ids.
 *
 * tests/CMakeLists.txt builds each test file alone, so this header holds
 * definitions: static, and (for the warning below) not all of them used by
 * each file that includes it.
 *
 * The child inherits this process's environment minus every OUTBOXD_*
 * variable (so sanitizer options reach it) plus what a test adds.  Its
 * bound port comes from its "listening" log line; a test that takes stderr
 * away probes a free port instead (start_blind), and tries another if the
 * daemon exits 69.  A teardown calls reap_all(): it kills and reaps what a
 * failed assertion left behind (a reader thread must not outlive the
 * buffers it writes).
 */
#ifndef SIDECAR_TEST_DAEMON_HARNESS_H
#define SIDECAR_TEST_DAEMON_HARNESS_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/* Each including file uses most, not all, of the definitions below. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"

#define ARGS(...) ((const char *const[]){ __VA_ARGS__, NULL })

/* ---- time -------------------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000 };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* ---- child process ----------------------------------------------------------- */

typedef struct proc {
    pid_t pid;
    int out_fd, err_fd;
    pthread_t reader;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    char *out, *err;          /* captured stdout / stderr, NUL-terminated */
    size_t out_len, err_len;
    bool eof;
    int status;               /* exit code, 128+signal, -1 while running */
    uint16_t port;
} proc;

static void append(char **buf, size_t *len, const char *p, size_t n)
{
    *buf = realloc(*buf, *len + n + 1);
    memcpy(*buf + *len, p, n);
    *len += n;
    (*buf)[*len] = '\0';
}

static void *reader_main(void *arg)
{
    proc *p = arg;
    struct pollfd fds[2] = { { p->out_fd, POLLIN, 0 }, { p->err_fd, POLLIN, 0 } };
    int open_fds = (p->out_fd >= 0) + (p->err_fd >= 0);
    char buf[65536];
    while (open_fds > 0) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        for (int i = 0; i < 2; i++) {
            if (fds[i].fd < 0 || !fds[i].revents)
                continue;
            ssize_t n = read(fds[i].fd, buf, sizeof buf);
            if (n <= 0) {
                fds[i].fd = -1;
                open_fds--;
                continue;
            }
            pthread_mutex_lock(&p->lock);
            if (i == 0)
                append(&p->out, &p->out_len, buf, (size_t)n);
            else
                append(&p->err, &p->err_len, buf, (size_t)n);
            pthread_cond_broadcast(&p->cond);
            pthread_mutex_unlock(&p->lock);
        }
    }
    pthread_mutex_lock(&p->lock);
    p->eof = true;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

/* Every child started by the current test, so teardown can kill and reap
 * what a failed assertion left behind (its reader thread must not outlive
 * the buffers it writes). */
#define MAX_PROCS 8
static proc *live_procs[MAX_PROCS];

static void proc_free(proc *p);

static void reap_all(void)
{
    for (int i = 0; i < MAX_PROCS; i++)
        if (live_procs[i]) {
            proc_free(live_procs[i]);
            live_procs[i] = NULL;
        }
}

/* How the child's stdin and stderr are set up (stdout is always a pipe). */
typedef enum stdio_mode {
    STDIO_PIPES,            /* stderr captured in p->err */
    STDIO_CLOSED,           /* fds 0 and 2 closed, as `outboxd <&- 2>&-` */
    STDIO_DEAD_STDERR       /* stderr a pipe whose reader has gone */
} stdio_mode;

/* Start OUTBOXD_BIN with `args` (NULL-terminated) and extra environment
 * entries `env` (NULL-terminated, may be NULL).  The test's teardown frees
 * it. */
static proc *spawn_with(const char *const *args, const char *const *env,
                        stdio_mode mode)
{
    proc *p = calloc(1, sizeof *p);
    int slot = 0;
    while (slot < MAX_PROCS && live_procs[slot])
        slot++;
    assert_true(p && slot < MAX_PROCS);
    live_procs[slot] = p;
    char *argv[64], *envp[512];
    size_t a = 0, e = 0;
    argv[a++] = (char *)OUTBOXD_BIN;
    for (; args && *args && a < 63; args++)
        argv[a++] = (char *)*args;
    argv[a] = NULL;
    for (char **v = environ; *v && e < 480; v++)
        if (strncmp(*v, "OUTBOXD_", 8) != 0)
            envp[e++] = *v;
    for (; env && *env && e < 511; env++)
        envp[e++] = (char *)*env;
    envp[e] = NULL;

    p->status = -1;
    int o[2], r[2];
    assert_int_equal(pipe2(o, O_CLOEXEC), 0);
    assert_int_equal(pipe2(r, O_CLOEXEC), 0);
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    p->pid = fork();
    assert_true(p->pid >= 0);
    if (p->pid == 0) {
        dup2(o[1], 1);
        if (mode == STDIO_CLOSED) {
            close(0);
            close(2);
        } else {
            dup2(r[1], 2);
        }
        execve(OUTBOXD_BIN, argv, envp);
        _exit(127);
    }
    close(o[1]);
    close(r[1]);
    p->out_fd = o[0];
    p->err_fd = r[0];
    if (mode != STDIO_PIPES) {
        close(r[0]);
        p->err_fd = -1;
    }
    assert_int_equal(pthread_create(&p->reader, NULL, reader_main, p), 0);
    return p;
}

static proc *spawn(const char *const *args, const char *const *env)
{
    return spawn_with(args, env, STDIO_PIPES);
}

/* Wait for the child to exit: its exit code (128 + signal when killed), or
 * -1 when it still runs after timeout_ms. */
static int wait_exit(proc *p, int timeout_ms)
{
    if (p->status >= 0)
        return p->status;
    int64_t end = now_ms() + timeout_ms;
    for (;;) {
        int st;
        pid_t r = waitpid(p->pid, &st, WNOHANG);
        if (r == p->pid) {
            p->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            pthread_join(p->reader, NULL);
            close(p->out_fd);
            if (p->err_fd >= 0)
                close(p->err_fd);
            return p->status;
        }
        if (now_ms() >= end)
            return -1;
        sleep_ms(5);
    }
}

static void proc_free(proc *p)
{
    if (p->status < 0) {
        kill(p->pid, SIGKILL);
        wait_exit(p, 10000);
    }
    free(p->out);
    free(p->err);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->cond);
    free(p);
}

/* Run to completion (at most 20 s); returns the exit code. */
static proc *run_cmd(const char *const *args, const char *const *env)
{
    proc *p = spawn(args, env);
    assert_int_not_equal(wait_exit(p, 20000), -1);
    return p;
}

/* The JSON log line whose msg is `msg` (a new reference), or NULL. */
static json_t *find_log(const char *text, const char *msg)
{
    char needle[128];
    snprintf(needle, sizeof needle, "\"msg\":\"%s\"", msg);
    for (const char *s = text; s && *s;) {
        const char *nl = strchr(s, '\n');
        size_t n = nl ? (size_t)(nl - s) : strlen(s);
        if (memmem(s, n, needle, strlen(needle))) {
            json_t *j = json_loadb(s, n, 0, NULL);
            if (j)
                return j;
        }
        s = nl ? nl + 1 : NULL;
    }
    return NULL;
}

/* find_log on a child that may still be writing its stderr. */
static json_t *proc_find_log(proc *p, const char *msg)
{
    pthread_mutex_lock(&p->lock);
    json_t *j = p->err ? find_log(p->err, msg) : NULL;
    pthread_mutex_unlock(&p->lock);
    return j;
}

/* Wait for the "listening" line and take the port from it. */
static void wait_listening(proc *p)
{
    int64_t end = now_ms() + 30000;
    pthread_mutex_lock(&p->lock);
    while (!p->eof && now_ms() < end &&
           !(p->err && strstr(p->err, "\"msg\":\"listening\""))) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 50 * 1000000;
        if (ts.tv_nsec >= 1000000000) { ts.tv_sec++; ts.tv_nsec -= 1000000000; }
        pthread_cond_timedwait(&p->cond, &p->lock, &ts);
    }
    json_t *j = p->err ? find_log(p->err, "listening") : NULL;
    pthread_mutex_unlock(&p->lock);
    if (!j)
        fail_msg("no \"listening\" line; stderr:\n%s", p->err ? p->err : "");
    p->port = (uint16_t)atoi(json_string_value(json_object_get(j, "port")));
    assert_true(p->port > 0);
    json_decref(j);
}

static proc *start_daemon(const char *dir, const char *const *more,
                          const char *const *env)
{
    char data[700];
    const char *args[40];
    size_t n = 0;
    snprintf(data, sizeof data, "--data-dir=%s", dir);
    args[n++] = "run";
    args[n++] = data;
    args[n++] = "--listen=127.0.0.1:0";
    args[n++] = "--threads=4";
    for (; more && *more && n < 38; more++)
        args[n++] = *more;
    args[n] = NULL;
    proc *p = spawn(args, env);
    wait_listening(p);
    return p;
}

static void stop_daemon(proc *p)
{
    kill(p->pid, SIGTERM);
    int rc = wait_exit(p, 30000);
    if (rc != 0)
        fail_msg("outboxd exited %d; stderr:\n%s", rc, p->err ? p->err : "");
}

/* Last line of a text (without its newline) into buf. */
static const char *last_line(const char *text, char *buf, size_t cap)
{
    size_t n = text ? strlen(text) : 0;
    while (n > 0 && text[n - 1] == '\n')
        n--;
    size_t s = n;
    while (s > 0 && text[s - 1] != '\n')
        s--;
    snprintf(buf, cap, "%.*s", (int)(n - s), text ? text + s : "");
    return buf;
}

/* ---- HTTP ------------------------------------------------------------------------ */

typedef struct resp {
    CURLcode rc;
    long status;
    char *body;
    size_t len;
} resp;

static size_t on_body(char *p, size_t sz, size_t n, void *ctx)
{
    resp *r = ctx;
    append(&r->body, &r->len, p, sz * n);
    return sz * n;
}

/* One request on `h` (reused by the caller for keep-alive; NULL: a fresh
 * handle).  r->body is malloc'ed (free with resp_free). */
static void http(CURL *h, uint16_t port, const char *method, const char *path,
                 const char *body, const char *token, resp *r)
{
    CURL *own = h ? NULL : curl_easy_init();
    CURL *c = h ? h : own;
    char url[512], auth[256];
    struct curl_slist *hdr = NULL;
    memset(r, 0, sizeof *r);
    snprintf(url, sizeof url, "http://127.0.0.1:%u%s", (unsigned)port, path);
    curl_easy_reset(c);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 40000L);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, r);
    if (body) {
        hdr = curl_slist_append(hdr, "Content-Type: application/json");
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    }
    if (token) {
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", token);
        hdr = curl_slist_append(hdr, auth);
    }
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdr);
    r->rc = curl_easy_perform(c);
    if (r->rc == CURLE_OK)
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r->status);
    curl_slist_free_all(hdr);
    if (own)
        curl_easy_cleanup(own);
}

static void resp_free(resp *r)
{
    free(r->body);
    r->body = NULL;
}

static json_t *resp_json(const resp *r)
{
    json_t *j = r->body ? json_loadb(r->body, r->len, 0, NULL) : NULL;
    if (!j)
        fail_msg("status %ld, body not JSON: %s", r->status, r->body ? r->body : "");
    return j;
}

static long status_of(uint16_t port, const char *method, const char *path,
                      const char *body, const char *token)
{
    resp r;
    http(NULL, port, method, path, body, token, &r);
    if (r.rc != CURLE_OK)
        fail_msg("%s %s: %s", method, path, curl_easy_strerror(r.rc));
    resp_free(&r);
    return r.status;
}

static bool wait_log(proc *p, const char *msg, int timeout_ms)
{
    char needle[160];
    snprintf(needle, sizeof needle, "\"msg\":\"%s\"", msg);
    int64_t end = now_ms() + timeout_ms;
    for (;;) {
        pthread_mutex_lock(&p->lock);
        bool seen = p->err && strstr(p->err, needle);
        pthread_mutex_unlock(&p->lock);
        if (seen)
            return true;
        if (now_ms() >= end)
            return false;
        sleep_ms(10);
    }
}

/* A TCP socket bound to 127.0.0.1 at a port the kernel chose (*port). */
static int bind_loopback(uint16_t *port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET,
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t sl = sizeof sa;
    assert_int_equal(bind(s, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(getsockname(s, (struct sockaddr *)&sa, &sl), 0);
    *port = ntohs(sa.sin_port);
    return s;
}

/* A port that was free a moment ago (bound, then closed: nobody listens
 * there).  For a daemon whose log the test cannot read: should another
 * process take the port first, the daemon exits 69 and start_blind tries
 * another. */
static uint16_t probe_port(void)
{
    uint16_t port;
    close(bind_loopback(&port));
    return port;
}

/* A socket listening on 127.0.0.1 (*port) that never accepts: the port is
 * taken, and up to `backlog` connections complete and are never answered. */
static int listen_loopback(int backlog, uint16_t *port)
{
    int s = bind_loopback(port);
    assert_int_equal(listen(s, backlog), 0);
    return s;
}

/* A GET or POST (body may be NULL) that must answer `want`; its body as
 * JSON (a new reference). */
static json_t *http_json(uint16_t port, const char *method, const char *path,
                         const char *body, long want)
{
    resp r;
    http(NULL, port, method, path, body, NULL, &r);
    if (r.status != want)
        fail_msg("%s %s: %ld %s", method, path, r.status, r.body ? r.body : "");
    json_t *j = resp_json(&r);
    resp_free(&r);
    return j;
}

/* Start a daemon without a readable stderr; ready once /healthz answers. */
static proc *start_blind(const char *dir, stdio_mode mode)
{
    char data[700], listen_arg[64];
    snprintf(data, sizeof data, "--data-dir=%s", dir);
    for (int attempt = 0; attempt < 5; attempt++) {
        uint16_t port = probe_port();
        snprintf(listen_arg, sizeof listen_arg, "--listen=127.0.0.1:%u",
                 (unsigned)port);
        proc *p = spawn_with(ARGS("run", data, listen_arg, "--threads=2"),
                             NULL, mode);
        int64_t end = now_ms() + 30000;
        while (wait_exit(p, 0) == -1 && now_ms() < end) {
            resp r;
            http(NULL, port, "GET", "/healthz", NULL, NULL, &r);
            bool up = r.rc == CURLE_OK && r.status == 200;
            resp_free(&r);
            if (up) {
                p->port = port;
                return p;
            }
            sleep_ms(20);
        }
        if (p->status != 69)
            fail_msg("outboxd did not answer on port %u (exit %d)",
                     (unsigned)port, p->status);
    }
    fail_msg("no free port in 5 attempts");
    return NULL;
}

/* ---- sets of ids ------------------------------------------------------------------ */

typedef struct ids {
    char (*v)[160];
    size_t n, cap;
} ids;

static void ids_add(ids *s, const char *id)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 256;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
    }
    snprintf(s->v[s->n++], sizeof s->v[0], "%s", id);
}

static int ids_cmp(const void *a, const void *b)
{
    return strcmp(a, b);
}

/* How many distinct ids the set holds.  Sorts it. */
static size_t ids_distinct(ids *s)
{
    qsort(s->v, s->n, sizeof s->v[0], ids_cmp);
    size_t d = 0;
    for (size_t i = 0; i < s->n; i++)
        if (i == 0 || strcmp(s->v[i], s->v[i - 1]) != 0)
            d++;
    return d;
}

#pragma GCC diagnostic pop

#endif /* SIDECAR_TEST_DAEMON_HARNESS_H */
