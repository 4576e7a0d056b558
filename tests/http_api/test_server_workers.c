/*
 * test_server_workers.c - what the transport does with a request once its
 * body is complete: the request workers (sends sharing fdatasyncs,
 * liveness while every worker is blocked, the deepest body on a worker's
 * stack), long polls (woken, timed out, abandoned, racing their wake, a
 * thousand at once on two threads), and draining and closing with
 * requests in workers or parked, including two races that this program
 * holds open by interposing epoll_ctl and MHD_resume_connection.  The
 * fixture and the clients are in server_fx.h; the transport alone in
 * test_server.c.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dlfcn.h>
#include <sys/epoll.h>

#include <microhttpd.h>

#include "server_fx.h"

/* ---- interposed library calls -----------------------------------------------
 * Two races need a thread held at an exact point inside a library call.
 * This program defines those functions itself: the executable's definition
 * wins over the shared library's, for libmicrohttpd's own calls as for the
 * server's, and it forwards to the real one (dlsym RTLD_NEXT).  Unarmed,
 * each is a plain forward. */

typedef int (*epoll_ctl_fn)(int, int, int, struct epoll_event *);

/* EPOLL_CTL_DEL on `thread` first opens a connection to `port` (which
 * wakes MHD's I/O threads) and waits 200 ms. */
static struct {
    atomic_bool armed;
    pthread_t thread;
    uint16_t port;
} del_hold;

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    epoll_ctl_fn real;
    *(void **)&real = dlsym(RTLD_NEXT, "epoll_ctl");
    int wake = -1;
    if (op == EPOLL_CTL_DEL && atomic_load(&del_hold.armed)
        && pthread_equal(pthread_self(), del_hold.thread)) {
        wake = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = { .sin_family = AF_INET,
                                 .sin_port = htons(del_hold.port) };
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        (void)connect(wake, (struct sockaddr *)&a, sizeof a);
        sleep_ms(200);
    }
    int rc = real(epfd, op, fd, ev);
    if (wake >= 0)
        close(wake);
    return rc;
}

typedef void (*resume_fn)(struct MHD_Connection *);

/* Armed, the next MHD_resume_connection (whichever thread calls it) says
 * so in `held` and waits 500 ms before it resumes. */
static struct {
    atomic_bool armed;
    atomic_bool held;
} resume_hold;

void MHD_resume_connection(struct MHD_Connection *connection)
{
    resume_fn real;
    *(void **)&real = dlsym(RTLD_NEXT, "MHD_resume_connection");
    if (atomic_exchange(&resume_hold.armed, false)) {
        atomic_store(&resume_hold.held, true);
        sleep_ms(500);
    }
    real(connection);
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

/* The receive creates its group before it looks for messages: once the
 * group is there, the receive found none and parks (or is about to). */
static void wait_receive_ran(fx *f, const char *group)
{
    char path[128];
    snprintf(path, sizeof path, "/v1/groups/%s", group);
    CURL *c = curl_easy_init();
    int64_t end = now_ms() + 10000;
    long st = 0;
    while (st != 200 && now_ms() < end) {
        resp r;
        req_on(f, c, "GET", path, NULL, NULL, &r);
        st = r.status;
        resp_free(&r);
        if (st != 200)
            sleep_ms(5);
    }
    curl_easy_cleanup(c);
    assert_int_equal(st, 200);
}

static void long_poll_is_woken_by_a_send(void **state)
{
    fx *f = *state;
    server_open(f);
    create_topic(f, "t");
    poller p = { .f = f, .wait_ms = 15000 };
    resp r;
    req(f, "GET", "/v1/groups/g", NULL, NULL, &r);
    assert_int_equal(r.status, 404);                /* until the receive */
    resp_free(&r);
    assert_true(api_server_wait_idle(f->srv, 2000));
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, poll_once, &p), 0);
    wait_receive_ran(f, "g");
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
    /* 3 s: the 200 ms below must pass inside the wait even on a loaded
     * machine */
    poller p = { .f = f, .wait_ms = 3000 };
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
    receive_body(body, sizeof body, 30000, 1);      /* a lost wake: 30 s */
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
    if (worst > 10000)
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

/* Close does not wait for the polls it resumes to be answered (the daemon
 * does that with api_server_wait_idle between drain and close): each is
 * answered, or cut when MHD stops first, and at once either way. */
static void close_with_parked_polls_ends_each_at_once(void **state)
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
    assert_int_equal(mm.done, 5);
    for (size_t i = 0; i < mm.n; i++) {
        if (mm.r[i].rc != CURLE_OK)
            continue;                               /* cut */
        assert_int_equal(mm.r[i].status, 200);
        assert_int_equal(messages_in(&mm.r[i]), 0);
    }
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

/* Stopping to accept must not race MHD's own I/O threads.  With epoll,
 * MHD_quiesce_daemon takes the listen socket out of each I/O thread's
 * epoll set while an awake I/O thread, seeing it quiesced, does the same;
 * the loser aborts the process ("Failed to remove listen FD from epoll
 * set").  Holding the drain's removal while a connection arrives makes
 * that interleaving certain. */
static void drain_never_races_the_io_threads_for_the_listen_socket(void **state)
{
    fx *f = *state;
    server_open(f);
    del_hold.port = f->port;
    del_hold.thread = pthread_self();
    atomic_store(&del_hold.armed, true);
    api_server_drain(f->srv);
    atomic_store(&del_hold.armed, false);
    assert_true(api_server_wait_idle(f->srv, 5000));
    resp r;
    CURL *c = curl_easy_init();
    req_on(f, c, "GET", "/healthz", NULL, NULL, &r);
    assert_int_equal(r.rc, CURLE_COULDNT_CONNECT);       /* drained */
    resp_free(&r);
    curl_easy_cleanup(c);
}

/* A wake (here the poll's deadline, on the groups' timer thread) has
 * claimed its parked request and is about to resume the connection when
 * the server closes: the close must wait for that resume, or MHD stops
 * with a suspended connection (it aborts) and the resume then runs on a
 * freed daemon. */
static void close_waits_for_a_wake_that_is_resuming_its_poll(void **state)
{
    fx *f = *state;
    server_open(f);
    create_topic(f, "t");
    atomic_store(&resume_hold.held, false);
    atomic_store(&resume_hold.armed, true);
    poller p = { .f = f, .wait_ms = 300 };
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, poll_once, &p), 0);
    int64_t end = now_ms() + 10000;
    while (!atomic_load(&resume_hold.held) && now_ms() < end)
        sleep_ms(1);
    assert_true(atomic_load(&resume_hold.held));
    api_server_close(f->srv);
    f->srv = NULL;
    pthread_join(th, NULL);
    /* answered before MHD stopped, or cut by the stop: never a hang */
    if (p.r.rc == CURLE_OK) {
        assert_int_equal(p.r.status, 200);
        assert_int_equal(messages_in(&p.r), 0);
    }
    resp_free(&p.r);
}

/* ---- request workers ------------------------------------------------------------- */

static uint64_t appends_of(fx *f)
{
    brk_store_stats st;
    brk_store_get_stats(f->store, &st);
    return st.appends;
}

/* Log bytes that one send of {"body":1} to "t" takes (the gate open). */
static uint64_t send_len(fx *f)
{
    uint64_t e0 = brk_store_log_end(f->store);
    send_msg(f, f->curl, "t", "{\"body\":1}");
    return brk_store_log_end(f->store) - e0;
}

/* Close the gate and send n messages, one per connection, until `busy`
 * workers hold one each inside the store: the first append written leads
 * the group commit and is held in fdatasync, the store queues the next
 * ones behind it (placed in the log, unwritten); the other requests wait
 * for a worker.  Returns the appends before. */
static uint64_t send_into_the_gate(fx *f, const int *fd, int n, int busy)
{
    uint64_t len = send_len(f);
    uint64_t a0 = appends_of(f), e0 = brk_store_log_end(f->store);
    brk_gate_io_close(&f->gate);
    for (int i = 0; i < n; i++)
        raw_request(fd[i], "POST", "/v1/topics/t/messages", "{\"body\":1}");
    assert_true(brk_gate_io_wait_held(&f->gate, 1, 10000));
    int64_t end = now_ms() + 10000;
    while (brk_store_log_end(f->store) < e0 + (uint64_t)busy * len) {
        if (now_ms() > end)
            fail_msg("%d workers did not reach the store", busy);
        sleep_ms(1);
    }
    sleep_ms(50);               /* a busy+1st append would show up now */
    assert_int_equal(brk_store_log_end(f->store), e0 + (uint64_t)busy * len);
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
    send_into_the_gate(f, fd, 2 * BUSY_WORKERS, BUSY_WORKERS);
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
    return send_into_the_gate(f, fd, 4, 2);
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
        T(long_poll_is_woken_by_a_send),
        T(long_poll_times_out_with_an_empty_list),
        T(parked_poll_outlives_the_idle_timeout),
        T(client_gone_while_parked_is_cleaned_up),
        T(client_gone_while_parked_then_woken_by_a_send),
        T(wait_idle_is_false_while_an_exchange_is_in_flight),
        T(a_wake_racing_the_park_is_never_lost),
        T(thousand_parked_long_polls_hold_no_thread),
        T(drain_answers_parked_polls_and_refuses_new_writes),
        T(close_with_parked_polls_ends_each_at_once),
        cmocka_unit_test(close_of_null_is_a_no_op),
        T(drain_never_races_the_io_threads_for_the_listen_socket),
        T(close_waits_for_a_wake_that_is_resuming_its_poll),
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
