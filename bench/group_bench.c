/*
 * group_bench.c - consumer groups (broker/group.h) end to end, in process,
 * on a real directory (brk_io_posix, system clock, background threads on).
 *
 * Cases, each on a fresh store directory (removed afterwards), for SYNC and
 * ASYNC flush (flush_interval_ms 500):
 *
 *   1. peak: 16 producer threads append 128-byte bodies (keyless, round
 *      robin over the 16 queues of topic "bench") as fast as they can for
 *      --seconds; 16 consumer threads loop { brk_group_receive_wait (max 32,
 *      wait 200 ms: long polling) ; brk_group_ack each } in one clustering
 *      group.  Each body starts with the producer's CLOCK_MONOTONIC stamp
 *      (ns) taken just before brk_store_append; a consumer takes the
 *      produce-to-receive latency when the batch is in its hands.  Prints
 *      produced/s and acked/s over the window (acked/s is the end-to-end
 *      rate: a message counts when its ack returned OK) and the latency
 *      p50/p99/max (log-linear histogram, <= 6.25 % bucket error).  At peak
 *      the producers may outrun the consumers, and the latency then includes
 *      the backlog: it is shown, not judged.
 *
 *   2. half: the same with the producers paced (by absolute schedule) to
 *      half the end-to-end rate of case 1 in total.  Goal: p99 <= 5 ms.
 *
 *   3. idle waiters (ASYNC store): 1000 waiters registered with
 *      brk_group_wait on an empty group (deadline 25 s away), then the
 *      process's CPU time (getrusage RUSAGE_SELF, user + system) over
 *      5 s of doing nothing.  Goal: about 0 (we print ms of CPU and the
 *      share of one core).
 *
 * Usage: group_bench [--dir PATH] [--seconds N] [--quick] [--mode sync|async]
 *   --dir      where the store directories go (default: cwd); run it on the
 *              disk the store will use: on tmpfs fdatasync is free
 *   --seconds  window of cases 1 and 2 (default 5; --quick: 2)
 * A missed goal is reported, not an error: the exit status is 0 unless a
 * case could not run.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/statfs.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "broker/group.h"
#include "broker/store.h"

#define PRODUCERS   16
#define CONSUMERS   16
#define QUEUES      16
#define BODY_LEN    128
#define RECV_MAX    32
#define WAIT_MS     200
#define TOPIC       "bench"
#define GROUP       "bench"
#define WAITERS     1000
#define IDLE_SECS   5
#define P99_GOAL_MS 5.0

/* ---- time (the rest is in bench_util.h) ---------------------------------- */

static void sleep_until_ns(uint64_t t)
{
    struct timespec ts = { (time_t)(t / 1000000000u), (long)(t % 1000000000u) };
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static void sleep_s(double s)
{
    sleep_until_ns(bench_now_ns() + (uint64_t)(s * 1e9));
}

/* ---- a store + groups instance ---------------------------------------------------- */

typedef struct env {
    char dir[4096];
    brk_store *s;
    brk_groups *g;
} env;

static int env_open(env *e, const char *base, const char *tag,
                    brk_flush_mode mode)
{
    memset(e, 0, sizeof *e);
    snprintf(e->dir, sizeof e->dir, "%s/group_bench.%ld.%s", base,
             (long)getpid(), tag);
    bench_rm_rf(e->dir, NULL);
    brk_store_opts o;
    brk_store_opts_init(&o);
    o.flush_mode = mode;
    char err[256];
    brk_status st = brk_store_open(&e->s, e->dir, &o, err, sizeof err);
    if (st != BRK_OK) {
        fprintf(stderr, "group_bench: open %s: %s (%s)\n", e->dir,
                brk_status_name(st), err);
        return -1;
    }
    st = brk_topic_create(e->s, TOPIC, QUEUES);
    if (st == BRK_OK) {
        brk_groups_opts go;
        brk_groups_opts_init(&go);
        st = brk_groups_open(&e->g, e->s, &go, err, sizeof err);
        if (st != BRK_OK)
            fprintf(stderr, "group_bench: groups open: %s (%s)\n",
                    brk_status_name(st), err);
    }
    if (st == BRK_OK) {
        brk_group_config c;
        brk_group_config_init(&c);
        bool created;
        st = brk_group_put(e->g, GROUP, TOPIC, NULL, &c, &created);
    }
    if (st != BRK_OK) {
        fprintf(stderr, "group_bench: setup: %s\n", brk_status_name(st));
        if (e->g)
            brk_groups_close(e->g);
        brk_store_close(e->s);
        bench_rm_rf(e->dir, NULL);
        return -1;
    }
    return 0;
}

static void env_close(env *e)
{
    brk_status st = brk_groups_close(e->g);
    if (st != BRK_OK)
        fprintf(stderr, "group_bench: groups close: %s\n", brk_status_name(st));
    st = brk_store_close(e->s);
    if (st != BRK_OK)
        fprintf(stderr, "group_bench: store close: %s\n", brk_status_name(st));
    bench_rm_rf(e->dir, NULL);
}

/* ---- produce -> receive -> ack ------------------------------------------------------ */

typedef struct shared {
    env *e;
    double rate_per_producer;   /* 0: as fast as possible */
    atomic_bool stop_producers;
    atomic_bool stop_consumers;
    atomic_bool measuring;      /* inside the window */
} shared;

typedef struct producer {
    pthread_t th;
    shared *sh;
    uint64_t produced;          /* in the window */
    uint64_t errors;
    brk_status first_err;
} producer;

typedef struct consumer {
    pthread_t th;
    shared *sh;
    uint64_t acked;             /* in the window */
    uint64_t received_total;
    uint64_t errors;
    brk_status first_err;
    uint64_t hist[BENCH_HIST_N];      /* latency ns, messages received in the window */
} consumer;

static void *producer_main(void *arg)
{
    producer *p = arg;
    shared *sh = p->sh;
    uint8_t body[BODY_LEN];
    memset(body, 'x', sizeof body);
    brk_append_req req;
    memset(&req, 0, sizeof req);
    req.topic = TOPIC;
    req.queue = -1;
    req.body = (brk_bytes){ body, sizeof body };
    brk_append_res res;
    uint64_t interval = sh->rate_per_producer > 0
                        ? (uint64_t)(1e9 / sh->rate_per_producer) : 0;
    uint64_t next = bench_now_ns();
    while (!atomic_load_explicit(&sh->stop_producers, memory_order_relaxed)) {
        if (interval) {
            next += interval;
            uint64_t t = bench_now_ns();
            if (next > t)
                sleep_until_ns(next);
        }
        uint64_t stamp = bench_now_ns();
        memcpy(body, &stamp, sizeof stamp);
        brk_status st = brk_store_append(sh->e->s, &req, &res);
        if (st != BRK_OK) {
            if (p->errors++ == 0)
                p->first_err = st;
            if (st == BRK_FAILED)
                break;
            continue;
        }
        if (atomic_load_explicit(&sh->measuring, memory_order_relaxed))
            p->produced++;
    }
    return NULL;
}

static void *consumer_main(void *arg)
{
    consumer *c = arg;
    shared *sh = c->sh;
    brk_receive_req req;
    memset(&req, 0, sizeof req);
    req.group = GROUP;
    req.topic = TOPIC;
    req.max = RECV_MAX;
    req.invisible_ms = 30000;
    while (!atomic_load_explicit(&sh->stop_consumers, memory_order_relaxed)) {
        brk_receive_batch *b = NULL;
        brk_status st = brk_group_receive_wait(sh->e->g, &req, WAIT_MS, &b);
        uint64_t t = bench_now_ns();
        if (st != BRK_OK && st != BRK_LIMIT) {
            if (c->errors++ == 0)
                c->first_err = st;
            if (b)
                brk_receive_batch_free(b);
            continue;
        }
        bool in = atomic_load_explicit(&sh->measuring, memory_order_relaxed);
        size_t n = b ? b->count : 0;
        for (size_t i = 0; i < n; i++) {
            const brk_received *m = &b->msgs[i];
            uint64_t stamp = 0;
            if (m->rec.body.len >= sizeof stamp)
                memcpy(&stamp, m->rec.body.ptr, sizeof stamp);
            if (in && stamp && t >= stamp)
                c->hist[bench_hist_index(t - stamp)]++;
        }
        for (size_t i = 0; i < n; i++) {
            st = brk_group_ack(sh->e->g, GROUP, b->msgs[i].receipt);
            if (st == BRK_OK) {
                if (in)
                    c->acked++;
            } else if (c->errors++ == 0) {
                c->first_err = st;
            }
        }
        c->received_total += n;
        if (b)
            brk_receive_batch_free(b);
    }
    return NULL;
}

typedef struct flow_result {
    double secs;
    double produced_s, acked_s;
    double p50_ms, p99_ms, max_ms;
    uint64_t errors;
} flow_result;

static int run_flow(const char *base, brk_flush_mode mode, double rate_total,
                    double seconds, flow_result *out)
{
    memset(out, 0, sizeof *out);
    env e;
    char tag[64];
    snprintf(tag, sizeof tag, "%s.%s", mode == BRK_FLUSH_SYNC ? "sync" : "async",
             rate_total > 0 ? "paced" : "peak");
    if (env_open(&e, base, tag, mode) != 0)
        return -1;
    shared sh;
    memset(&sh, 0, sizeof sh);
    sh.e = &e;
    sh.rate_per_producer = rate_total > 0 ? rate_total / PRODUCERS : 0;
    atomic_init(&sh.stop_producers, false);
    atomic_init(&sh.stop_consumers, false);
    atomic_init(&sh.measuring, false);
    producer *p = calloc(PRODUCERS, sizeof *p);
    consumer *c = calloc(CONSUMERS, sizeof *c);
    if (!p || !c) {
        free(p);
        free(c);
        env_close(&e);
        return -1;
    }
    for (int i = 0; i < CONSUMERS; i++) {
        c[i].sh = &sh;
        if (pthread_create(&c[i].th, NULL, consumer_main, &c[i]) != 0)
            exit(1);
    }
    for (int i = 0; i < PRODUCERS; i++) {
        p[i].sh = &sh;
        if (pthread_create(&p[i].th, NULL, producer_main, &p[i]) != 0)
            exit(1);
    }
    sleep_s(0.5);                       /* warm up */
    atomic_store(&sh.measuring, true);
    uint64_t t0 = bench_now_ns();
    sleep_s(seconds);
    atomic_store(&sh.measuring, false);
    uint64_t t1 = bench_now_ns();
    atomic_store(&sh.stop_producers, true);
    for (int i = 0; i < PRODUCERS; i++)
        pthread_join(p[i].th, NULL);
    /* Let the consumers drain a little, then stop them. */
    sleep_s(0.5);
    atomic_store(&sh.stop_consumers, true);
    for (int i = 0; i < CONSUMERS; i++)
        pthread_join(c[i].th, NULL);

    static uint64_t hist[BENCH_HIST_N];
    memset(hist, 0, sizeof hist);
    uint64_t produced = 0, acked = 0;
    brk_status first = BRK_OK;
    for (int i = 0; i < PRODUCERS; i++) {
        produced += p[i].produced;
        out->errors += p[i].errors;
        if (p[i].errors && first == BRK_OK)
            first = p[i].first_err;
    }
    for (int i = 0; i < CONSUMERS; i++) {
        acked += c[i].acked;
        out->errors += c[i].errors;
        if (c[i].errors && first == BRK_OK)
            first = c[i].first_err;
        for (unsigned j = 0; j < BENCH_HIST_N; j++)
            hist[j] += c[i].hist[j];
    }
    if (out->errors)
        fprintf(stderr, "group_bench: %" PRIu64 " errors, first: %s\n",
                out->errors, brk_status_name(first));
    out->secs = (double)(t1 - t0) / 1e9;
    out->produced_s = (double)produced / out->secs;
    out->acked_s = (double)acked / out->secs;
    out->p50_ms = bench_hist_quantile(hist, 0.50) / 1e6;
    out->p99_ms = bench_hist_quantile(hist, 0.99) / 1e6;
    out->max_ms = bench_hist_quantile(hist, 1.0) / 1e6;
    free(p);
    free(c);
    env_close(&e);
    return acked ? 0 : -1;
}

/* ---- idle waiters ------------------------------------------------------------------- */

static atomic_uint g_woken;

static void idle_cb(void *ctx)
{
    (void)ctx;
    atomic_fetch_add(&g_woken, 1);
}

static double cpu_ms(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec * 1e3 + (double)ru.ru_utime.tv_usec / 1e3
           + (double)ru.ru_stime.tv_sec * 1e3 + (double)ru.ru_stime.tv_usec / 1e3;
}

static int run_idle(const char *base, double *cpu, unsigned *woken)
{
    env e;
    if (env_open(&e, base, "idle", BRK_FLUSH_ASYNC) != 0)
        return -1;
    brk_receive_req req;
    memset(&req, 0, sizeof req);
    req.group = GROUP;
    req.topic = TOPIC;
    req.max = RECV_MAX;
    const brk_clock *clk = brk_store_clock(e.s);
    int64_t deadline = clk->now_ms(clk->ctx) + 25000;
    uint64_t *ids = calloc(WAITERS, sizeof *ids);
    if (!ids) {
        env_close(&e);
        return -1;
    }
    atomic_store(&g_woken, 0);
    for (int i = 0; i < WAITERS; i++) {
        brk_status st = brk_group_wait(e.g, &req, deadline, idle_cb, NULL, &ids[i]);
        if (st != BRK_OK) {
            fprintf(stderr, "group_bench: wait: %s\n", brk_status_name(st));
            free(ids);
            env_close(&e);
            return -1;
        }
    }
    sleep_s(0.5);
    double c0 = cpu_ms();
    sleep_s(IDLE_SECS);
    *cpu = cpu_ms() - c0;
    *woken = atomic_load(&g_woken);
    for (int i = 0; i < WAITERS; i++)
        (void)brk_group_wait_cancel(e.g, ids[i]);
    free(ids);
    env_close(&e);
    return 0;
}

/* ---- main --------------------------------------------------------------------------- */

static void usage(void)
{
    fprintf(stderr, "usage: group_bench [--dir PATH] [--seconds N] [--quick] "
            "[--mode sync|async]\n");
}

int main(int argc, char **argv)
{
    const char *base = ".";
    double seconds = 5;
    bool quick = false, seconds_given = false;
    int only_mode = -1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc) {
            base = argv[++i];
        } else if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) {
            char *end;
            seconds = strtod(argv[++i], &end);
            if (*end || !(seconds > 0) || seconds > 3600) {
                usage();
                return 2;
            }
            seconds_given = true;
        } else if (strcmp(argv[i], "--mode") == 0 && i + 1 < argc) {
            i++;
            if (strcmp(argv[i], "sync") == 0)
                only_mode = BRK_FLUSH_SYNC;
            else if (strcmp(argv[i], "async") == 0)
                only_mode = BRK_FLUSH_ASYNC;
            else {
                usage();
                return 2;
            }
        } else if (strcmp(argv[i], "--quick") == 0) {
            quick = true;
        } else {
            usage();
            return 2;
        }
    }
    if (quick && !seconds_given)
        seconds = 2;

    struct statfs sf;
    if (statfs(base, &sf) != 0) {
        fprintf(stderr, "group_bench: statfs %s: %s\n", base, strerror(errno));
        return 1;
    }
    printf("group_bench: %d producers, %d consumers (receive_wait max %d, "
           "wait %d ms), %d-byte bodies, topic \"%s\" (%d queues), one "
           "clustering group, %.1f s per window\n", PRODUCERS, CONSUMERS,
           RECV_MAX, WAIT_MS, BODY_LEN, TOPIC, QUEUES, seconds);
    bench_print_machine(base, &sf, 13, false, false);
    printf("\n");
    printf("%-5s %-11s %10s %10s %9s %9s %9s %s\n", "mode", "load",
           "produced/s", "acked/s", "p50 ms", "p99 ms", "max ms", "goal");
    fflush(stdout);

    static const brk_flush_mode modes[] = { BRK_FLUSH_SYNC, BRK_FLUSH_ASYNC };
    int failures = 0;
    for (size_t m = 0; m < 2; m++) {
        brk_flush_mode mode = modes[m];
        const char *mn = mode == BRK_FLUSH_SYNC ? "SYNC" : "ASYNC";
        if (only_mode >= 0 && (int)mode != only_mode)
            continue;
        flow_result peak, half;
        if (run_flow(base, mode, 0, seconds, &peak) != 0) {
            printf("%-5s peak: case failed (see stderr)\n", mn);
            failures++;
            continue;
        }
        printf("%-5s %-11s %10.0f %10.0f %9.2f %9.2f %9.1f %s\n", mn, "peak",
               peak.produced_s, peak.acked_s, peak.p50_ms, peak.p99_ms,
               peak.max_ms, "(backlog included)");
        fflush(stdout);
        double target = peak.acked_s / 2;
        if (run_flow(base, mode, target, seconds, &half) != 0) {
            printf("%-5s half: case failed (see stderr)\n", mn);
            failures++;
            continue;
        }
        char load[32];
        snprintf(load, sizeof load, "half %.0f/s", target);
        printf("%-5s %-11s %10.0f %10.0f %9.2f %9.2f %9.1f %s\n", mn, load,
               half.produced_s, half.acked_s, half.p50_ms, half.p99_ms,
               half.max_ms,
               half.p99_ms <= P99_GOAL_MS ? "met (p99 <= 5 ms)"
                                          : "MISSED (p99 > 5 ms)");
        fflush(stdout);
    }

    double cpu = 0;
    unsigned woken = 0;
    if (run_idle(base, &cpu, &woken) != 0) {
        printf("\nidle waiters: case failed (see stderr)\n");
        failures++;
    } else {
        printf("\nidle: %d waiters registered with brk_group_wait, %d s: "
               "%.1f ms CPU (%.2f %% of one core), %u callbacks ran early%s\n",
               WAITERS, IDLE_SECS, cpu, cpu / (IDLE_SECS * 10.0), woken,
               cpu / (IDLE_SECS * 10.0) < 1.0 ? "  goal (~0) met" : "  goal (~0) MISSED");
    }
    printf("\nlatency: producer's CLOCK_MONOTONIC stamp before brk_store_append "
           "to the consumer holding the batch; acked/s counts acks that "
           "returned OK in the window.\n");
    return failures ? 1 : 0;
}
