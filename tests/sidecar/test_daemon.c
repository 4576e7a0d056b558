/*
 * test_daemon.c - the real outboxd binary (OUTBOXD_BIN), spawned with
 * fork/exec on 127.0.0.1 port 0 and a scratch data directory, driven over
 * HTTP with libcurl (the harness: daemon_harness.h).
 *
 * No test waits a fixed time for the daemon to reach a state: each waits
 * for a sign of it (a log line, a 100 Continue, a group created).
 *
 * What the load tests can and cannot assert.  A client cannot tell whether
 * a request that failed at the transport level was seen by the server: a
 * reset or empty reply on a connection the kernel had queued, or on a
 * keep-alive connection closed at the moment the request went out, may or
 * may not have been.  Not even "connection refused" proves it was not:
 * when a reused keep-alive connection dies under a request, libcurl sends
 * it again on a fresh connection, and only that second attempt is refused.
 * So:
 *   - before the signal, every request gets an HTTP answer;
 *   - every HTTP answer is 2xx, or 503 after SIGTERM (graceful case);
 *   - after the signal, transport errors are only "refused", "reset" or
 *     "empty reply" kinds;
 *   - after a restart the messages there are exactly the 2xx'ed ones (send
 *     201, commit 200), each once, plus at most the ones whose outcome the
 *     client could not know; every prepare answered 201 is known to the
 *     restarted daemon, and its message is there iff it is committed.
 * ASYNC flush is tested under SIGKILL with the same assertions: an ASYNC
 * append is acknowledged once it is in the page cache (broker/store.h),
 * which a killed process does not lose.  Only a power loss can take it,
 * which a test cannot produce here.
 */
#include "daemon_harness.h"

#include <ftw.h>
#include <stdatomic.h>
#include <sys/stat.h>

#include "tmpdir.h"

#define TOKEN "test-token-0123456789"

/* ---- fixture ----------------------------------------------------------------- */

typedef struct fixture {
    char dir[512];       /* scratch; the data dir is <dir>/data */
    char data[600];
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    if (!f || brk_tmpdir_new("sc_daemon", f->dir, sizeof f->dir) != 0)
        return -1;
    snprintf(f->data, sizeof f->data, "%s/data", f->dir);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    reap_all();
    brk_tmpdir_remove(f->dir);
    free(f);
    return 0;
}

/* ---- command line ------------------------------------------------------------- */

static void bad_config_exits_78_with_one_line(void **state)
{
    (void)state;
    proc *p;
    p = run_cmd(ARGS("--threads=x"), NULL);
    assert_int_equal(p->status, 78);
    assert_string_equal(p->err, "outboxd: config: flag --threads: threads: not a "
                        "number: \"x\"\n");
    assert_null(p->out);
    p = run_cmd(NULL, ARGS("OUTBOXD_LISTEN=0.0.0.0:1"));
    assert_int_equal(p->status, 78);
    assert_non_null(strstr(p->err, "outboxd: config: env OUTBOXD_LISTEN: listen: "));
    assert_non_null(strchr(p->err, '\n'));
    assert_int_equal(strchr(p->err, '\n')[1], '\0');
}

static void unknown_flag_and_command_exit_64(void **state)
{
    (void)state;
    proc *p;
    p = run_cmd(ARGS("--bogus=1"), NULL);
    assert_int_equal(p->status, 64);
    assert_string_equal(p->err, "outboxd: unknown option --bogus (see outboxd "
                        "--help)\n");
    p = run_cmd(ARGS("serve"), NULL);
    assert_int_equal(p->status, 64);
    assert_string_equal(p->err, "outboxd: unknown command \"serve\" (commands: "
                        "run, config, db)\n");
}

static void version_help_and_config_print_and_exit_0(void **state)
{
    (void)state;
    proc *p;
    p = run_cmd(ARGS("--version"), NULL);
    assert_int_equal(p->status, 0);
    assert_string_equal(p->out, "outboxd 0.1.0\n");

    p = run_cmd(ARGS("--help"), NULL);
    assert_int_equal(p->status, 0);
    assert_non_null(strstr(p->out, "usage: outboxd"));
    assert_non_null(strstr(p->out, "--shutdown-grace=DURATION  "
                                  "(OUTBOXD_SHUTDOWN_GRACE, default 20s)"));

    p = run_cmd(ARGS("config", "--threads=3"),
                             ARGS("OUTBOXD_TOKEN=" TOKEN));
    assert_int_equal(p->status, 0);
    assert_null(strstr(p->out, TOKEN));
    assert_non_null(strstr(p->out, "\ntoken = ********  # from env\n"));
    assert_non_null(strstr(p->out, "\nthreads = 3  # from flag\n"));
    assert_non_null(strstr(p->out, "listen = 127.0.0.1:8080  # from default\n"));
    assert_null(p->err);
}

/* ---- start failures ----------------------------------------------------------- */

static void unusable_data_dir_exits_73(void **state)
{
    fixture *f = *state;
    char file[700], arg[800], line[1024];
    snprintf(file, sizeof file, "%s/plain-file", f->dir);
    FILE *fp = fopen(file, "w");
    fclose(fp);
    snprintf(arg, sizeof arg, "--data-dir=%s/sub", file);
    proc *p;
    p = run_cmd(ARGS(arg, "--listen=127.0.0.1:0"), NULL);
    assert_int_equal(p->status, 73);
    last_line(p->err, line, sizeof line);
    if (strncmp(line, "outboxd: data_dir: cannot create ", 33) != 0)
        fail_msg("last line: %s", line);
}

static void locked_data_dir_exits_75(void **state)
{
    fixture *f = *state;
    char arg[700], line[1024];
    proc *a, *b;
    a = start_daemon(f->data, NULL, NULL);
    snprintf(arg, sizeof arg, "--data-dir=%s", f->data);
    b = run_cmd(ARGS(arg, "--listen=127.0.0.1:0"), NULL);
    assert_int_equal(b->status, 75);
    last_line(b->err, line, sizeof line);
    if (strncmp(line, "outboxd: store: ", 16) != 0 || !strstr(line, "in use"))
        fail_msg("last line: %s", line);
    stop_daemon(a);
}

static void busy_port_exits_69(void **state)
{
    fixture *f = *state;
    uint16_t port;
    int s = listen_loopback(4, &port);
    char data[700], listen_arg[64], line[1024];
    snprintf(data, sizeof data, "--data-dir=%s", f->data);
    snprintf(listen_arg, sizeof listen_arg, "--listen=127.0.0.1:%u",
             (unsigned)port);
    proc *p;
    p = run_cmd(ARGS(data, listen_arg), NULL);
    assert_int_equal(p->status, 69);
    last_line(p->err, line, sizeof line);
    if (strncmp(line, "outboxd: http: ", 15) != 0)
        fail_msg("last line: %s", line);
    close(s);
}

/* ---- serving ------------------------------------------------------------------ */

static void token_is_required_on_a_non_loopback_address(void **state)
{
    fixture *f = *state;
    char data[700];
    snprintf(data, sizeof data, "--data-dir=%s", f->data);
    proc *p;
    p = spawn(ARGS(data, "--listen=0.0.0.0:0"), ARGS("OUTBOXD_TOKEN=" TOKEN));
    wait_listening(p);
    assert_int_equal(status_of(p->port, "GET", "/v1/topics", NULL, NULL), 401);
    assert_int_equal(status_of(p->port, "GET", "/v1/topics", NULL,
                               "wrong-token-0123456789"), 401);
    assert_int_equal(status_of(p->port, "GET", "/v1/topics", NULL, TOKEN), 200);
    assert_int_equal(status_of(p->port, "GET", "/healthz", NULL, NULL), 200);
    assert_int_equal(status_of(p->port, "GET", "/readyz", NULL, NULL), 200);
    stop_daemon(p);
}

static void lifecycle_is_logged_as_json_lines_and_sigterm_exits_0(void **state)
{
    fixture *f = *state;
    proc *p;
    p = start_daemon(f->data, NULL, NULL);
    kill(p->pid, SIGHUP);
    int64_t end = now_ms() + 20000;
    while (now_ms() < end) {
        pthread_mutex_lock(&p->lock);
        bool seen = p->err && strstr(p->err, "SIGHUP ignored") != NULL;
        pthread_mutex_unlock(&p->lock);
        if (seen)
            break;
        sleep_ms(10);
    }
    assert_int_equal(status_of(p->port, "GET", "/readyz", NULL, NULL), 200);
    stop_daemon(p);

    static const char *const order[] = {
        "starting", "store opened", "delays recovered", "transactions recovered",
        "no check-back source configured: prepared transactions wait for a "
        "verdict", "listening", "ready", "SIGHUP ignored", "signal received",
        "http server draining", "draining", "drain done", "closed", "closed",
        "closed", "closed",
        "closed", "exit", NULL
    };
    static const char *const closed_order[] = { "http", "groups", "txn",
                                                "delay", "store" };
    size_t k = 0, nclosed = 0;
    for (const char *s = p->err; *s;) {
        const char *nl = strchr(s, '\n');
        assert_non_null(nl);
        json_t *j = json_loadb(s, (size_t)(nl - s), 0, NULL);
        if (!j)
            fail_msg("not JSON: %.*s", (int)(nl - s), s);
        assert_non_null(json_object_get(j, "time"));
        assert_non_null(json_object_get(j, "level"));
        const char *msg = json_string_value(json_object_get(j, "msg"));
        assert_non_null(msg);
        if (order[k] && strcmp(msg, order[k]) == 0) {
            if (strcmp(msg, "closed") == 0)
                assert_string_equal(json_string_value(json_object_get(
                                        j, "component")),
                                    closed_order[nclosed++]);
            if (strcmp(msg, "exit") == 0)
                assert_string_equal(json_string_value(json_object_get(j, "code")),
                                    "0");
            if (strcmp(msg, "listening") == 0)
                assert_string_equal(json_string_value(json_object_get(j, "flush")),
                                    "sync");
            k++;
        }
        json_decref(j);
        s = nl + 1;
    }
    if (order[k])
        fail_msg("log line \"%s\" missing or out of order; stderr:\n%s", order[k],
                 p->err);
}

static void store_options_reach_the_store(void **state)
{
    fixture *f = *state;
    proc *p = start_daemon(f->data, ARGS("--default-queues=3"), NULL);
    assert_int_equal(status_of(p->port, "POST", "/v1/topics/wired/messages",
                               "{\"body\":1}", NULL), 201);
    resp r;
    http(NULL, p->port, "GET", "/v1/topics/wired", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    json_t *j = resp_json(&r);
    assert_int_equal(json_integer_value(json_object_get(j, "queues")), 3);
    json_decref(j);
    resp_free(&r);
    stop_daemon(p);

    p = start_daemon(f->data, ARGS("--auto-create-topics=false"), NULL);
    assert_int_equal(status_of(p->port, "POST", "/v1/topics/unknown/messages",
                               "{\"body\":1}", NULL), 404);
    assert_int_equal(status_of(p->port, "POST", "/v1/topics/wired/messages",
                               "{\"body\":2}", NULL), 201);
    stop_daemon(p);
}

typedef struct poll_arg {
    uint16_t port;
    resp r;
    int64_t done_ms;
} poll_arg;

/* The connection is opened (by a /healthz) before the receive goes out:
 * should a slow machine deliver the receive only after SIGTERM closed the
 * listener, it still arrives (and answers at once, drained). */
static void *long_poll(void *arg)
{
    poll_arg *a = arg;
    CURL *h = curl_easy_init();
    resp r;
    http(h, a->port, "GET", "/healthz", NULL, NULL, &r);
    resp_free(&r);
    http(h, a->port, "POST", "/v1/groups/g/receive",
         "{\"topic\":\"quiet\",\"wait_ms\":30000}", NULL, &a->r);
    a->done_ms = now_ms();
    curl_easy_cleanup(h);
    return NULL;
}

static void parked_long_poll_answers_early_on_sigterm(void **state)
{
    fixture *f = *state;
    proc *p;
    p = start_daemon(f->data, NULL, NULL);
    poll_arg a = { .port = p->port };
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, long_poll, &a), 0);
    /* The receive creates group g: from then on its exchange is in flight
     * and the drain waits for it (a fixed sleep could signal before the
     * request arrived, and an idle server would close the connection). */
    int64_t end = now_ms() + 30000;
    while (status_of(p->port, "GET", "/v1/groups/g", NULL, NULL) != 200) {
        if (now_ms() > end)
            fail_msg("the receive never reached the server");
        sleep_ms(10);
    }
    int64_t sent = now_ms();
    kill(p->pid, SIGTERM);
    pthread_join(t, NULL);
    assert_int_equal(a.r.rc, CURLE_OK);
    assert_int_equal(a.r.status, 200);
    json_t *j = resp_json(&a.r);
    assert_true(json_is_array(json_object_get(j, "messages")));
    assert_int_equal(json_array_size(json_object_get(j, "messages")), 0);
    json_decref(j);
    if (a.done_ms - sent > 15000)            /* vs the 30 s it asked for */
        fail_msg("the long poll answered %lld ms after SIGTERM",
                 (long long)(a.done_ms - sent));
    assert_int_equal(wait_exit(p, 20000), 0);
    resp_free(&a.r);
}

/* A raw connection that sends a request's headers and the first byte of a
 * 100-byte body, then stalls: an exchange the server has begun and cannot
 * finish, so the drain has to wait for it.  "Expect: 100-continue" makes
 * the server say when it has taken the headers (and counted the exchange
 * in flight), so no sleep has to guess. */
static int stalled_upload(uint16_t port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port),
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    assert_int_equal(connect(s, (struct sockaddr *)&sa, sizeof sa), 0);
    static const char req[] =
        "POST /v1/topics/stall/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n"
        "Expect: 100-continue\r\n\r\n";
    assert_int_equal(write(s, req, sizeof req - 1), (ssize_t)(sizeof req - 1));
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    char got[sizeof cont] = "";
    size_t n = 0;
    struct pollfd pf = { s, POLLIN, 0 };
    while (n < sizeof cont - 1 && poll(&pf, 1, 30000) == 1) {
        ssize_t r = read(s, got + n, sizeof cont - 1 - n);
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    if (strcmp(got, cont) != 0)
        fail_msg("no 100 Continue from the server: \"%s\"", got);
    assert_int_equal(write(s, "{", 1), 1);
    return s;
}

static void expired_grace_cuts_the_exchange_and_exits_0(void **state)
{
    fixture *f = *state;
    proc *p;
    p = start_daemon(f->data, ARGS("--shutdown-grace=1s"), NULL);
    int s = stalled_upload(p->port);
    int64_t sent = now_ms();
    kill(p->pid, SIGTERM);
    assert_int_equal(wait_exit(p, 10000), 0);
    int64_t took = now_ms() - sent;
    if (took < 900 || took > 9000)
        fail_msg("exit %lld ms after SIGTERM with a 1 s grace", (long long)took);
    json_t *j = find_log(p->err, "shutdown grace expired: closing the exchanges "
                                "still in flight");
    if (!j)
        fail_msg("no grace warning; stderr:\n%s", p->err);
    assert_string_equal(json_string_value(json_object_get(j, "level")), "warn");
    json_decref(j);
    close(s);
}

/* Holds the daemon in its drain with a stalled upload, looks at it through
 * a keep-alive connection opened before the signal (new connections are
 * refused), then ends the grace with a second signal. */
static void draining_refuses_new_writes_keeps_commits_and_a_second_signal_ends_it(
    void **state)
{
    fixture *f = *state;
    proc *p = start_daemon(f->data, ARGS("--shutdown-grace=60s"), NULL);
    CURL *h = curl_easy_init();
    resp r;
    char txid[160], path[256];
    http(h, p->port, "POST", "/v1/transactions",
         "{\"topic\":\"drain\",\"body\":1}", NULL, &r);
    assert_int_equal(r.status, 201);
    json_t *j = resp_json(&r);
    snprintf(txid, sizeof txid, "%s", json_string_value(json_object_get(j, "txid")));
    json_decref(j);
    resp_free(&r);
    int s = stalled_upload(p->port);

    kill(p->pid, SIGTERM);
    assert_true(wait_log(p, "draining", 5000));
    http(h, p->port, "GET", "/readyz", NULL, NULL, &r);
    assert_int_equal(r.rc, CURLE_OK);
    assert_int_equal(r.status, 503);
    j = resp_json(&r);
    assert_string_equal(json_string_value(json_object_get(j, "status")),
                        "shutting_down");
    json_decref(j);
    resp_free(&r);
    http(h, p->port, "POST", "/v1/topics/drain/messages", "{\"body\":2}", NULL,
         &r);
    assert_int_equal(r.status, 503);
    resp_free(&r);
    snprintf(path, sizeof path, "/v1/transactions/%s/commit", txid);
    http(h, p->port, "POST", path, NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    resp_free(&r);
    http(NULL, p->port, "GET", "/healthz", NULL, NULL, &r);
    assert_int_equal(r.rc, CURLE_COULDNT_CONNECT);   /* listener closed */
    resp_free(&r);
    curl_easy_cleanup(h);

    assert_int_equal(wait_exit(p, 0), -1);   /* still waiting for the upload */
    int64_t sent = now_ms();
    kill(p->pid, SIGINT);
    assert_int_equal(wait_exit(p, 30000), 0);
    if (now_ms() - sent > 20000)             /* vs the 60 s grace */
        fail_msg("exit %lld ms after the second signal",
                 (long long)(now_ms() - sent));
    j = find_log(p->err, "second signal: skipping the rest of the shutdown grace");
    assert_non_null(j);
    json_decref(j);
    close(s);
}

/* ---- load ------------------------------------------------------------------------ */

#define WORKERS 8

typedef struct load_shared {
    uint16_t port;
    atomic_bool stop;
    atomic_uint acked;               /* 2xx sends and commits so far */
    atomic_llong signal_ms;          /* 0 until the signal was sent */
    bool graceful;                   /* SIGTERM (503 allowed) vs SIGKILL */
} load_shared;

typedef struct worker {
    load_shared *sh;
    int id;
    ids acked;                       /* msg_ids of 2xx sends and commits */
    ids prepared;                    /* txids prepared (201), verdict unknown */
    ids maybe;                       /* msg_ids of those: committed or not */
    unsigned maybe_sends;            /* sends that may or may not have been
                                        stored: any transport error, even
                                        "refused" (below) */
    unsigned ok, refused, other_err, status_503;
    bool backing_off;                /* got a 503: wait as Retry-After says */
    char problem[256];               /* first violation, "" if none */
} worker;

static void violation(worker *w, const char *fmt, ...)
{
    if (w->problem[0])
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->problem, sizeof w->problem, fmt, ap);
    va_end(ap);
}

/* Check one exchange's outcome; true when it got an HTTP answer `want`. */
static bool judge(worker *w, const resp *r, long want, const char *what)
{
    bool after = atomic_load(&w->sh->signal_ms) != 0;
    if (r->rc != CURLE_OK) {
        if (!after)
            violation(w, "%s before the signal: %s", what,
                      curl_easy_strerror(r->rc));
        else if (r->rc == CURLE_COULDNT_CONNECT)
            w->refused++;
        else if (r->rc == CURLE_GOT_NOTHING || r->rc == CURLE_RECV_ERROR ||
                 r->rc == CURLE_SEND_ERROR)
            w->other_err++;
        else
            violation(w, "%s: unexpected transport error %s", what,
                      curl_easy_strerror(r->rc));
        return false;
    }
    if (r->status == want) {
        w->ok++;
        return true;
    }
    if (r->status == 503 && after && w->sh->graceful) {
        w->status_503++;
        w->backing_off = true;
        return false;
    }
    violation(w, "%s: status %ld (signal sent: %d): %s", what, r->status, after,
              r->body ? r->body : "");
    return false;
}

static const char *field(json_t *j, const char *k)
{
    const char *s = json_string_value(json_object_get(j, k));
    return s ? s : "";
}

/* A worker thread must not fail the test itself (cmocka's failure jumps
 * are for the main thread): a body that is not JSON is a violation, and the
 * caller goes on with an empty object. */
static json_t *worker_json(worker *w, const resp *r, const char *what)
{
    json_t *j = r->body ? json_loadb(r->body, r->len, 0, NULL) : NULL;
    if (!j) {
        violation(w, "%s: body not JSON: %s", what, r->body ? r->body : "");
        j = json_object();
    }
    return j;
}

static void do_send(worker *w, CURL *h, unsigned i)
{
    char body[128];
    resp r;
    snprintf(body, sizeof body, "{\"key\":\"k%d\",\"body\":{\"w\":%d,\"i\":%u}}",
             w->id, w->id, i);
    http(h, w->sh->port, "POST", "/v1/topics/load/messages", body, NULL, &r);
    unsigned unknown_before = w->other_err + w->refused;
    bool ok = judge(w, &r, 201, "send");
    w->maybe_sends += w->other_err + w->refused - unknown_before;
    if (ok) {
        json_t *j = worker_json(w, &r, "send");
        ids_add(&w->acked, field(j, "msg_id"));
        atomic_fetch_add(&w->sh->acked, 1);
        json_decref(j);
    }
    resp_free(&r);
}

static void do_txn(worker *w, CURL *h, unsigned i)
{
    char body[128], path[256], txid[160], msg_id[40];
    resp r;
    snprintf(body, sizeof body, "{\"topic\":\"load\",\"body\":{\"t\":%d,\"i\":%u}}",
             w->id, i);
    http(h, w->sh->port, "POST", "/v1/transactions", body, NULL, &r);
    if (!judge(w, &r, 201, "prepare")) {
        resp_free(&r);
        return;
    }
    json_t *j = worker_json(w, &r, "prepare");
    snprintf(txid, sizeof txid, "%s", field(j, "txid"));
    snprintf(msg_id, sizeof msg_id, "%s", field(j, "msg_id"));
    json_decref(j);
    resp_free(&r);
    snprintf(path, sizeof path, "/v1/transactions/%s/commit", txid);
    http(h, w->sh->port, "POST", path, NULL, NULL, &r);
    if (judge(w, &r, 200, "commit")) {
        ids_add(&w->acked, msg_id);
        atomic_fetch_add(&w->sh->acked, 1);
    } else {
        ids_add(&w->prepared, txid);
        ids_add(&w->maybe, msg_id);
    }
    resp_free(&r);
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    CURL *h = curl_easy_init();
    for (unsigned i = 0; !atomic_load(&w->sh->stop); i++) {
        /* A 503 carries Retry-After: 5, and a well-behaved client waits;
         * one that kept hammering its keep-alive connection would keep
         * the drain from ever seeing an idle moment until the grace ran
         * out (the exchanges it sends are new ones, not "in flight"). */
        if (w->backing_off) {
            sleep_ms(10);
            continue;
        }
        if ((i + (unsigned)w->id) % 2)
            do_send(w, h, i);
        else
            do_txn(w, h, i);
        if (atomic_load(&w->sh->signal_ms) && w->refused > 0)
            sleep_ms(5);       /* the listener is gone: don't spin */
    }
    curl_easy_cleanup(h);
    return NULL;
}

/* Every message of topic "load", received through a fresh group and
 * acked, sorted. */
static ids receive_all(uint16_t port)
{
    ids got = { 0 };
    for (;;) {
        resp r;
        http(NULL, port, "POST", "/v1/groups/verify/receive",
             "{\"topic\":\"load\",\"max\":256,\"wait_ms\":0}", NULL, &r);
        assert_int_equal(r.rc, CURLE_OK);
        if (r.status != 200)
            fail_msg("receive: %ld %s", r.status, r.body);
        json_t *j = resp_json(&r);
        json_t *msgs = json_object_get(j, "messages");
        size_t n = json_array_size(msgs);
        json_t *receipts = json_array();
        for (size_t i = 0; i < n; i++) {
            json_t *m = json_array_get(msgs, i);
            ids_add(&got, field(m, "msg_id"));
            json_array_append(receipts, json_object_get(m, "receipt"));
        }
        resp_free(&r);
        if (n > 0) {
            json_t *ack = json_pack("{s:O}", "receipts", receipts);
            char *body = json_dumps(ack, JSON_COMPACT);
            assert_int_equal(status_of(port, "POST", "/v1/groups/verify/ack",
                                       body, NULL), 200);
            free(body);
            json_decref(ack);
        }
        json_decref(receipts);
        json_decref(j);
        if (n == 0)
            break;
    }
    qsort(got.v, got.n, sizeof *got.v, ids_cmp);
    return got;
}

/* All workers' `which` ids in one sorted set. */
static ids merged(worker *w, size_t off)
{
    ids all = { 0 };
    for (int k = 0; k < WORKERS; k++) {
        const ids *s = (const ids *)(const void *)((const char *)&w[k] + off);
        for (size_t i = 0; i < s->n; i++)
            ids_add(&all, s->v[i]);
    }
    if (all.n)
        qsort(all.v, all.n, sizeof *all.v, ids_cmp);
    return all;
}

static bool in_set(const ids *s, const char *id)
{
    return s->n && bsearch(id, s->v, s->n, sizeof *s->v, ids_cmp);
}

/* The messages there after a restart are exactly the acknowledged ones,
 * plus at most those whose outcome the client could not know: a commit
 * that got no answer (its msg_id is known) and a send that got a reset or
 * an empty reply (only their number is).  Each message is there once. */
static void check_exact_set(const ids *got, worker *w)
{
    ids acked = merged(w, offsetof(worker, acked));
    ids maybe = merged(w, offsetof(worker, maybe));
    unsigned maybe_sends = 0, extra = 0;
    for (int k = 0; k < WORKERS; k++)
        maybe_sends += w[k].maybe_sends;
    for (size_t i = 0; i < acked.n; i++)
        if (!in_set(got, acked.v[i]))
            fail_msg("acknowledged msg_id %s is missing after restart (%zu "
                     "messages there)", acked.v[i], got->n);
    for (size_t i = 0; i < got->n; i++) {
        if (i > 0 && strcmp(got->v[i], got->v[i - 1]) == 0)
            fail_msg("msg_id %s is there twice", got->v[i]);
        if (!in_set(&acked, got->v[i]) && !in_set(&maybe, got->v[i]))
            extra++;
    }
    if (extra > maybe_sends)
        fail_msg("%u messages nobody acknowledged, but only %u sends had an "
                 "unknown outcome", extra, maybe_sends);
    assert_true(acked.n > 0);
    free(acked.v);
    free(maybe.v);
}

/* The restarted daemon must hold every acknowledged write. */
static void verify_after_restart(fixture *f, worker *w, const char *flush)
{
    proc *p;
    char flag[32];
    snprintf(flag, sizeof flag, "--flush=%s", flush);
    p = start_daemon(f->data, ARGS(flag), NULL);
    ids got = receive_all(p->port);
    check_exact_set(&got, w);
    size_t acked = 0, prepared = 0;
    for (int k = 0; k < WORKERS; k++) {
        acked += w[k].acked.n;
        for (size_t i = 0; i < w[k].prepared.n; i++, prepared++) {
            char path[256];
            resp r;
            snprintf(path, sizeof path, "/v1/transactions/%s", w[k].prepared.v[i]);
            http(NULL, p->port, "GET", path, NULL, NULL, &r);
            assert_int_equal(r.rc, CURLE_OK);
            if (r.status != 200)
                fail_msg("prepared txid %s: %ld %s", w[k].prepared.v[i],
                         r.status, r.body);
            json_t *j = resp_json(&r);
            const char *st = field(j, "state");
            if (strcmp(st, "prepared") != 0 && strcmp(st, "committed") != 0)
                fail_msg("prepared txid %s is %s after restart",
                         w[k].prepared.v[i], st);
            bool there = in_set(&got, w[k].maybe.v[i]);
            if (there != (strcmp(st, "committed") == 0))
                fail_msg("txid %s is %s but its message is %s",
                         w[k].prepared.v[i], st, there ? "there" : "not");
            json_decref(j);
            resp_free(&r);
        }
    }
    print_message("%s: %zu acknowledged and %zu prepared checked against %zu "
                  "messages after restart\n", flush, acked, prepared, got.n);
    assert_true(acked > 0);
    free(got.v);
    stop_daemon(p);
}

/* Block until the workers have `n` acknowledged writes (at most 30 s), so
 * that the signal lands in the middle of real work however slow the
 * machine is. */
static void wait_acked(load_shared *sh, unsigned n)
{
    int64_t end = now_ms() + 30000;
    while (atomic_load(&sh->acked) < n && now_ms() < end)
        sleep_ms(5);
}

static void run_workers(load_shared *sh, worker *w, pthread_t *t)
{
    for (int k = 0; k < WORKERS; k++) {
        memset(&w[k], 0, sizeof w[k]);
        w[k].sh = sh;
        w[k].id = k;
        assert_int_equal(pthread_create(&t[k], NULL, worker_main, &w[k]), 0);
    }
}

static void join_workers(worker *w, pthread_t *t)
{
    unsigned ok = 0, refused = 0, other = 0, s503 = 0;
    for (int k = 0; k < WORKERS; k++)
        pthread_join(t[k], NULL);
    for (int k = 0; k < WORKERS; k++) {
        if (w[k].problem[0])
            fail_msg("worker %d: %s", k, w[k].problem);
        ok += w[k].ok;
        refused += w[k].refused;
        other += w[k].other_err;
        s503 += w[k].status_503;
    }
    print_message("exchanges: %u answered as wanted, %u answered 503, %u "
                  "refused, %u reset or empty\n", ok, s503, refused, other);
}

static void free_workers(worker *w)
{
    for (int k = 0; k < WORKERS; k++) {
        free(w[k].acked.v);
        free(w[k].prepared.v);
        free(w[k].maybe.v);
    }
}

static void sigterm_under_load_finishes_accepted_requests_and_loses_nothing(
    void **state)
{
    fixture *f = *state;
    proc *p;
    load_shared sh = { .graceful = true };
    worker w[WORKERS];
    pthread_t t[WORKERS];
    p = start_daemon(f->data, ARGS("--shutdown-grace=10s"), NULL);
    sh.port = p->port;
    run_workers(&sh, w, t);
    wait_acked(&sh, 200);
    sleep_ms(200);
    atomic_store(&sh.signal_ms, now_ms());
    kill(p->pid, SIGTERM);
    int rc = wait_exit(p, 15000);
    int64_t took = now_ms() - atomic_load(&sh.signal_ms);
    atomic_store(&sh.stop, true);
    join_workers(w, t);
    if (rc != 0)
        fail_msg("exit %d; stderr tail:\n%s", rc,
                 p->err + (p->err_len > 4000 ? p->err_len - 4000 : 0));
    if (took > 10000)
        fail_msg("exit took %lld ms, beyond the 10 s grace", (long long)took);
    assert_null(find_log(p->err, "shutdown grace expired: closing the exchanges "
                                "still in flight"));
    json_t *j = find_log(p->err, "drain done");
    assert_non_null(j);
    json_decref(j);
    verify_after_restart(f, w, "sync");
    free_workers(w);
}

static uint64_t seed_of(void)
{
    const char *s = getenv("OUTBOXD_TEST_SEED");
    uint64_t v = s && *s ? strtoull(s, NULL, 10) : (uint64_t)time(NULL) ^ (uint64_t)getpid();
    print_message("seed %llu (OUTBOXD_TEST_SEED to repeat)\n", (unsigned long long)v);
    return v;
}

static void kill9_under_load(fixture *f, const char *flush)
{
    proc *p;
    load_shared sh = { .graceful = false };
    worker w[WORKERS];
    pthread_t t[WORKERS];
    char flag[32];
    snprintf(flag, sizeof flag, "--flush=%s", flush);
    p = start_daemon(f->data, ARGS(flag), NULL);
    sh.port = p->port;
    run_workers(&sh, w, t);
    wait_acked(&sh, 100);
    sleep_ms((int)(seed_of() % 700));
    atomic_store(&sh.signal_ms, now_ms());
    kill(p->pid, SIGKILL);
    int rc = wait_exit(p, 10000);
    atomic_store(&sh.stop, true);
    join_workers(w, t);
    assert_int_equal(rc, 128 + SIGKILL);
    verify_after_restart(f, w, flush);
    free_workers(w);
}

static void kill9_under_load_loses_nothing_acknowledged_sync(void **state)
{
    kill9_under_load(*state, "sync");
}

static void kill9_under_load_loses_nothing_acknowledged_async(void **state)
{
    kill9_under_load(*state, "async");
}

/* ---- stdio the daemon cannot rely on --------------------------------------------- */

static void send_some(proc *p, int n, ids *acked)
{
    for (int i = 0; i < n; i++) {
        resp r;
        http(NULL, p->port, "POST", "/v1/topics/load/messages",
             "{\"body\":\"x\"}", NULL, &r);
        assert_int_equal(r.rc, CURLE_OK);
        assert_int_equal(r.status, 201);
        json_t *j = resp_json(&r);
        ids_add(acked, field(j, "msg_id"));
        json_decref(j);
        resp_free(&r);
        if (i == n / 2)
            kill(p->pid, SIGHUP);        /* one more log line mid-run */
    }
}

static char log_text_in[700];

static int find_log_text(const char *path, const struct stat *st, int type,
                         struct FTW *ftw)
{
    (void)ftw;
    if (type != FTW_F || st->st_size == 0)
        return 0;
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return 0;
    char *buf = malloc((size_t)st->st_size);
    size_t n = fread(buf, 1, (size_t)st->st_size, fp);
    fclose(fp);
    bool found = memmem(buf, n, "\"msg\":\"", 7) != NULL;
    free(buf);
    if (found)
        snprintf(log_text_in, sizeof log_text_in, "%s", path);
    return found;
}

/* Started with stdin and stderr closed, the store's first files would get
 * descriptors 0 and 2, and the logger would write its lines into them. */
static void closed_stdio_never_puts_log_lines_into_the_store(void **state)
{
    fixture *f = *state;
    ids acked = { 0 };
    proc *p = start_blind(f->data, STDIO_CLOSED);
    send_some(p, 20, &acked);
    stop_daemon(p);
    log_text_in[0] = '\0';
    if (nftw(f->data, find_log_text, 16, FTW_PHYS) != 0)
        fail_msg("log lines in %s", log_text_in);

    p = start_daemon(f->data, NULL, NULL);
    json_t *j = proc_find_log(p, "store opened");
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "truncated_bytes")),
                        "0");
    json_decref(j);
    ids got = receive_all(p->port);
    qsort(acked.v, acked.n, sizeof *acked.v, ids_cmp);
    assert_int_equal(got.n, acked.n);
    for (size_t i = 0; i < got.n; i++)
        assert_string_equal(got.v[i], acked.v[i]);
    stop_daemon(p);
    free(got.v);
    free(acked.v);
}

/* SIGPIPE is ignored: a log reader that went away costs log lines only. */
static void dead_stderr_reader_neither_kills_nor_blocks_the_daemon(void **state)
{
    fixture *f = *state;
    ids acked = { 0 };
    proc *p = start_blind(f->data, STDIO_DEAD_STDERR);
    send_some(p, 20, &acked);
    assert_int_equal(status_of(p->port, "GET", "/readyz", NULL, NULL), 200);
    stop_daemon(p);
    free(acked.v);
}

/* ---- secrets ------------------------------------------------------------------ */

static proc *start_with_token_file(fixture *f, const char *path, mode_t mode)
{
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs(TOKEN "\n", fp);
    fclose(fp);
    assert_int_equal(chmod(path, mode), 0);
    char arg[700];
    snprintf(arg, sizeof arg, "--token-file=%s", path);
    return start_daemon(f->data, ARGS(arg, "--log-level=debug"), NULL);
}

static void token_never_reaches_the_log_and_an_open_token_file_is_warned_about(
    void **state)
{
    fixture *f = *state;
    char path[700];
    snprintf(path, sizeof path, "%s/token", f->dir);
    proc *p = start_with_token_file(f, path, 0644);
    assert_int_equal(status_of(p->port, "GET", "/v1/topics", NULL, NULL), 401);
    assert_int_equal(status_of(p->port, "GET", "/v1/topics", NULL,
                               "wrong-token-0123456789"), 401);
    assert_int_equal(status_of(p->port, "GET", "/v1/topics", NULL, TOKEN), 200);
    assert_int_equal(status_of(p->port, "POST", "/v1/topics/t/messages",
                               "{\"body\":1}", TOKEN), 201);
    stop_daemon(p);
    assert_null(strstr(p->err, TOKEN));
    assert_null(strstr(p->err, "wrong-token"));
    json_t *j = find_log(p->err, "token_file is readable by other users");
    if (!j)
        fail_msg("no warning about the token file's mode; stderr:\n%s", p->err);
    assert_string_equal(json_string_value(json_object_get(j, "level")), "warn");
    assert_string_equal(json_string_value(json_object_get(j, "token_file")), path);
    assert_string_equal(json_string_value(json_object_get(j, "mode")), "0644");
    json_decref(j);

    p = start_with_token_file(f, path, 0600);
    stop_daemon(p);
    assert_null(find_log(p->err, "token_file is readable by other users"));
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const struct CMUnitTest tests[] = {
#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)
        T(bad_config_exits_78_with_one_line),
        T(unknown_flag_and_command_exit_64),
        T(version_help_and_config_print_and_exit_0),
        T(unusable_data_dir_exits_73),
        T(locked_data_dir_exits_75),
        T(busy_port_exits_69),
        T(token_is_required_on_a_non_loopback_address),
        T(lifecycle_is_logged_as_json_lines_and_sigterm_exits_0),
        T(store_options_reach_the_store),
        T(parked_long_poll_answers_early_on_sigterm),
        T(expired_grace_cuts_the_exchange_and_exits_0),
        T(draining_refuses_new_writes_keeps_commits_and_a_second_signal_ends_it),
        T(sigterm_under_load_finishes_accepted_requests_and_loses_nothing),
        T(kill9_under_load_loses_nothing_acknowledged_sync),
        T(kill9_under_load_loses_nothing_acknowledged_async),
        T(closed_stdio_never_puts_log_lines_into_the_store),
        T(dead_stderr_reader_neither_kills_nor_blocks_the_daemon),
        T(token_never_reaches_the_log_and_an_open_token_file_is_warned_about),
#undef T
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
