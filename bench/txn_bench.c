/*
 * txn_bench.c - the transaction module (broker/txn.h) under load, on a real
 * directory (brk_io_posix, system clock, background threads on).
 *
 * Cases, each on a fresh store directory (SYNC flush, removed afterwards):
 *
 *   1. pairs: --threads threads (default 64) each loop { brk_txn_prepare
 *      (generated txid, 256-byte random body, one of 1000 keys, topic
 *      "bench") ; brk_txn_commit } for --seconds.  Prints pairs/s and the
 *      p50/p99/max latency of one pair (prepare + commit, CLOCK_MONOTONIC,
 *      log-linear histogram, <= 6.25 % bucket error), plus the store's
 *      fdatasyncs/s and records per fdatasync over the case.  No checker:
 *      every transaction gets its verdict from the client.
 *
 *   2. check-back storm: --count transactions (default 100 000) prepared by
 *      --threads threads with first_check_ms 0, so each is due at once.
 *      The checker answers COMMIT immediately, but is held at a gate until
 *      every prepare has returned; from the moment the gate opens, the
 *      scheduler thread and the worker pool (--workers, default 4) run the
 *      storm.  Prints checks/s until no transaction is pending (polled every
 *      20 ms with brk_txn_get_stats, which walks the module's whole table
 *      under its lock: polling every 1 ms halved the rate), and the time.
 *
 *   3. memory: in case 2, with every transaction prepared and none resolved
 *      yet, brk_txn_get_stats memory_bytes / pending (goal <= 128 bytes).
 *
 *   4. rebuild: --count transactions prepared (no checker), the module
 *      closed and opened again on the same store: the time brk_txn_open
 *      takes to rebuild them from the log.
 *
 * Usage: txn_bench [--dir PATH] [--seconds N] [--quick] [--threads N]
 *                  [--count N] [--workers N]
 *   --dir      where the store directories go (default: cwd); run it on the
 *              disk the store will use: on tmpfs fdatasync is free
 *   --seconds  duration of case 1 (default 3; --quick: 1)
 *   --count    transactions in cases 2 and 3 (default 100000; --quick: 20000)
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
#include <sys/statfs.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "broker/store.h"
#include "broker/txn.h"

#define BODY_LEN     256
#define NKEYS        1000
#define TOPIC        "bench"
#define MEM_GOAL     128.0

/* ---- time (the rest is in bench_util.h) ------------------------------------ */

static void sleep_ms(double ms)
{
    struct timespec nap = { (time_t)(ms / 1000),
                            (long)(fmod(ms, 1000.0) * 1e6) };
    while (nanosleep(&nap, &nap) != 0 && errno == EINTR)
        ;
}

/* ---- a store + txn on a fresh directory -------------------------------------- */

typedef struct bench_env {
    char dir[4096];
    brk_store *s;
    brk_txn *t;
} bench_env;

static int env_open(bench_env *e, const char *base, const char *tag,
                    const brk_txn_opts *to)
{
    memset(e, 0, sizeof *e);
    snprintf(e->dir, sizeof e->dir, "%s/txn_bench.%ld.%s", base, (long)getpid(),
             tag);
    bench_rm_rf(e->dir, "txn_bench");
    brk_store_opts o;
    brk_store_opts_init(&o);
    o.flush_mode = BRK_FLUSH_SYNC;
    char err[256];
    brk_status st = brk_store_open(&e->s, e->dir, &o, err, sizeof err);
    if (st != BRK_OK) {
        fprintf(stderr, "txn_bench: store open %s: %s (%s)\n", e->dir,
                brk_status_name(st), err);
        return -1;
    }
    st = brk_topic_create(e->s, TOPIC, 0);
    if (st == BRK_OK)
        st = brk_txn_open(&e->t, e->s, to, err, sizeof err);
    else
        snprintf(err, sizeof err, "topic create");
    if (st != BRK_OK) {
        fprintf(stderr, "txn_bench: txn open: %s (%s)\n", brk_status_name(st), err);
        brk_store_close(e->s);
        bench_rm_rf(e->dir, "txn_bench");
        return -1;
    }
    return 0;
}

static void env_close(bench_env *e)
{
    brk_status st = brk_txn_close(e->t);
    if (st != BRK_OK)
        fprintf(stderr, "txn_bench: txn close: %s\n", brk_status_name(st));
    st = brk_store_close(e->s);
    if (st != BRK_OK)
        fprintf(stderr, "txn_bench: store close: %s\n", brk_status_name(st));
    bench_rm_rf(e->dir, "txn_bench");
}

/* ---- case 1: prepare + commit pairs ------------------------------------------ */

typedef struct pair_worker {
    pthread_t th;
    brk_txn *t;
    pthread_barrier_t *start;
    atomic_bool *stop;
    uint64_t rng;
    uint64_t pairs, errors;
    brk_status first_err;
    uint64_t hist[BENCH_HIST_N];
    uint8_t body[BODY_LEN];
} pair_worker;

static void *pair_main(void *arg)
{
    pair_worker *w = arg;
    bench_fill_random(w->body, sizeof w->body, &w->rng);
    brk_txn_prepare_req req;
    memset(&req, 0, sizeof req);
    req.topic = TOPIC;
    req.body.ptr = w->body;
    req.body.len = BODY_LEN;
    char key[8];
    brk_txn_result res, cres;
    pthread_barrier_wait(w->start);
    while (!atomic_load_explicit(w->stop, memory_order_relaxed)) {
        snprintf(key, sizeof key, "k%04u", (unsigned)(bench_xorshift(&w->rng) % NKEYS));
        req.key.ptr = key;
        req.key.len = 5;
        uint64_t t0 = bench_now_ns();
        brk_status st = brk_txn_prepare(w->t, &req, &res);
        if (st == BRK_OK)
            st = brk_txn_commit(w->t, res.txid, &cres);
        uint64_t t1 = bench_now_ns();
        if (st != BRK_OK) {
            if (w->errors++ == 0)
                w->first_err = st;
            if (st == BRK_FAILED)
                break;
            continue;
        }
        w->hist[bench_hist_index(t1 - t0)]++;
        w->pairs++;
    }
    return NULL;
}

static int run_pairs(const char *base, int threads, double seconds)
{
    brk_txn_opts to;
    brk_txn_opts_init(&to);         /* no checker: client verdicts only */
    bench_env e;
    if (env_open(&e, base, "pairs", &to) != 0)
        return -1;
    pair_worker *w = calloc((size_t)threads, sizeof *w);
    if (!w) {
        env_close(&e);
        return -1;
    }
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, (unsigned)threads + 1);
    atomic_bool stop;
    atomic_init(&stop, false);
    for (int i = 0; i < threads; i++) {
        w[i].t = e.t;
        w[i].start = &start;
        w[i].stop = &stop;
        w[i].rng = (0x9E3779B97F4A7C15ull * (uint64_t)(i + 1)) ^ bench_now_ns();
        if (w[i].rng == 0)
            w[i].rng = 1;
        if (pthread_create(&w[i].th, NULL, pair_main, &w[i]) != 0) {
            fprintf(stderr, "txn_bench: pthread_create failed\n");
            exit(1);
        }
    }
    brk_store_stats a, b;
    brk_store_get_stats(e.s, &a);
    pthread_barrier_wait(&start);
    uint64_t t0 = bench_now_ns();
    sleep_ms(seconds * 1000);
    atomic_store(&stop, true);
    for (int i = 0; i < threads; i++)
        pthread_join(w[i].th, NULL);
    uint64_t t1 = bench_now_ns();
    brk_store_get_stats(e.s, &b);

    static uint64_t hist[BENCH_HIST_N];
    memset(hist, 0, sizeof hist);
    uint64_t pairs = 0, errors = 0;
    brk_status first_err = BRK_OK;
    for (int i = 0; i < threads; i++) {
        pairs += w[i].pairs;
        errors += w[i].errors;
        if (w[i].errors && first_err == BRK_OK)
            first_err = w[i].first_err;
        for (unsigned j = 0; j < BENCH_HIST_N; j++)
            hist[j] += w[i].hist[j];
    }
    if (errors)
        fprintf(stderr, "txn_bench: %" PRIu64 " pairs failed, first: %s (%s)\n",
                errors, brk_status_name(first_err), brk_store_errstr(e.s));
    double secs = (double)(t1 - t0) / 1e9;
    uint64_t fs = b.fsyncs - a.fsyncs, fr = b.fsync_records - a.fsync_records;
    brk_txn_stats ts;
    brk_txn_get_stats(e.t, &ts);
    printf("pairs  %3d threads  %9.0f pairs/s  p50 %8.1f us  p99 %8.1f us  "
           "max %8.0f us | %7.0f fsync/s  %5.1f rec/fsync  (%" PRIu64 " pairs "
           "in %.1f s, %" PRIu64 " records)\n",
           threads, (double)pairs / secs, bench_hist_quantile(hist, 0.50) / 1e3,
           bench_hist_quantile(hist, 0.99) / 1e3, bench_hist_quantile(hist, 1.0) / 1e3,
           (double)fs / secs, fs ? (double)fr / (double)fs : 0.0, pairs, secs,
           b.appends - a.appends);
    printf("       txn stats after: committed %" PRIu64 ", pending %" PRIu64
           ", memory %" PRIu64 " bytes (resolved txids are kept %.0f s)\n",
           ts.committed_total, ts.pending, ts.memory_bytes,
           (double)to.resolved_keep_ms / 1000);
    fflush(stdout);
    pthread_barrier_destroy(&start);
    free(w);
    env_close(&e);
    return pairs ? 0 : -1;
}

/* ---- cases 2 and 3: check-back storm and memory -------------------------------- */

typedef struct storm {
    atomic_bool go;
    atomic_uint_fast64_t calls;
} storm;

static brk_check_result storm_check(void *ctx, const brk_check_req *req)
{
    (void)req;
    storm *s = ctx;
    while (!atomic_load(&s->go))
        sleep_ms(1);
    atomic_fetch_add(&s->calls, 1);
    return BRK_CHECK_COMMIT;
}

typedef struct prep_worker {
    pthread_t th;
    brk_txn *t;
    uint64_t from, to;
    uint64_t errors;
    brk_status first_err;
} prep_worker;

static void *prep_main(void *arg)
{
    prep_worker *w = arg;
    uint8_t body[BODY_LEN];
    uint64_t rng = w->from * 2654435761u + 1;
    bench_fill_random(body, sizeof body, &rng);
    char txid[32], key[8];
    brk_txn_prepare_req req;
    memset(&req, 0, sizeof req);
    req.topic = TOPIC;
    req.body.ptr = body;
    req.body.len = BODY_LEN;
    brk_txn_result res;
    for (uint64_t i = w->from; i < w->to; i++) {
        snprintf(txid, sizeof txid, "outbox-%010" PRIu64, i);
        snprintf(key, sizeof key, "k%04u", (unsigned)(i % NKEYS));
        req.txid = txid;
        req.key.ptr = key;
        req.key.len = 5;
        brk_status st = brk_txn_prepare(w->t, &req, &res);
        if (st != BRK_OK && w->errors++ == 0)
            w->first_err = st;
    }
    return NULL;
}

static int run_storm(const char *base, int threads, uint64_t count,
                     unsigned workers)
{
    static storm sm;
    atomic_init(&sm.go, false);
    atomic_init(&sm.calls, 0);
    brk_checker checker = { storm_check, &sm };
    brk_txn_opts to;
    brk_txn_opts_init(&to);
    to.checker = &checker;
    to.default_policy.first_check_ms = 0;
    if (workers)
        to.workers = workers;
    bench_env e;
    if (env_open(&e, base, "storm", &to) != 0)
        return -1;

    prep_worker *w = calloc((size_t)threads, sizeof *w);
    if (!w) {
        env_close(&e);
        return -1;
    }
    uint64_t t0 = bench_now_ns();
    for (int i = 0; i < threads; i++) {
        w[i].t = e.t;
        w[i].from = count * (uint64_t)i / (uint64_t)threads;
        w[i].to = count * (uint64_t)(i + 1) / (uint64_t)threads;
        if (pthread_create(&w[i].th, NULL, prep_main, &w[i]) != 0) {
            fprintf(stderr, "txn_bench: pthread_create failed\n");
            exit(1);
        }
    }
    uint64_t errors = 0;
    brk_status first_err = BRK_OK;
    for (int i = 0; i < threads; i++) {
        pthread_join(w[i].th, NULL);
        errors += w[i].errors;
        if (w[i].errors && first_err == BRK_OK)
            first_err = w[i].first_err;
    }
    uint64_t t1 = bench_now_ns();
    free(w);
    if (errors)
        fprintf(stderr, "txn_bench: %" PRIu64 " prepares failed, first: %s\n",
                errors, brk_status_name(first_err));

    /* Case 3: everything prepared, nothing resolved (the checker is held). */
    brk_txn_stats ts;
    brk_txn_get_stats(e.t, &ts);
    double per = ts.pending ? (double)ts.memory_bytes / (double)ts.pending : 0;
    printf("prepare %3d threads  %9.0f prepares/s  (%" PRIu64 " in %.2f s)\n",
           threads, (double)(count - errors) / ((double)(t1 - t0) / 1e9),
           count - errors, (double)(t1 - t0) / 1e9);
    printf("memory  %" PRIu64 " pending: %" PRIu64 " bytes = %.1f bytes per "
           "pending transaction  goal <= %.0f: %s\n",
           ts.pending, ts.memory_bytes, per, MEM_GOAL,
           per <= MEM_GOAL ? "met" : "MISSED");
    fflush(stdout);

    /* Case 2: open the gate and time the storm. */
    uint64_t pending0 = ts.pending, commits0 = ts.checks_commit_total;
    brk_store_stats sa;
    brk_store_get_stats(e.s, &sa);
    uint64_t g0 = bench_now_ns();
    atomic_store(&sm.go, true);
    uint64_t deadline = g0 + 600ull * 1000000000u;
    do {
        /* Not faster: brk_txn_get_stats walks the whole table under the
         * module's lock, and polling it every millisecond halves the rate. */
        sleep_ms(20);
        brk_txn_get_stats(e.t, &ts);
    } while (ts.pending > 0 && bench_now_ns() < deadline);
    uint64_t g1 = bench_now_ns();
    double secs = (double)(g1 - g0) / 1e9;
    uint64_t checks = ts.checks_commit_total - commits0;
    brk_store_stats sb;
    brk_store_get_stats(e.s, &sb);
    uint64_t fs = sb.fsyncs - sa.fsyncs, fr = sb.fsync_records - sa.fsync_records;
    printf("storm   %" PRIu64 " due at once, %u workers: %9.0f checks/s  "
           "(%" PRIu64 " checks, %" PRIu64 " committed, %" PRIu64 " still "
           "pending after %.2f s; %" PRIu64 " checker calls) | %.0f fsync/s  "
           "%.1f rec/fsync  %.1f records/check\n",
           pending0, to.workers, (double)checks / secs, checks,
           ts.committed_total, ts.pending, secs,
           (uint64_t)atomic_load(&sm.calls), (double)fs / secs,
           fs ? (double)fr / (double)fs : 0.0,
           checks ? (double)(sb.appends - sa.appends) / (double)checks : 0.0);
    fflush(stdout);
    env_close(&e);
    return ts.pending == 0 ? 0 : -1;
}

/* ---- case 4: rebuild at open ------------------------------------------------------ */

static int run_rebuild(const char *base, int threads, uint64_t count)
{
    brk_txn_opts to;
    brk_txn_opts_init(&to);          /* no checker: nothing resolves */
    bench_env e;
    if (env_open(&e, base, "rebuild", &to) != 0)
        return -1;
    prep_worker *w = calloc((size_t)threads, sizeof *w);
    if (!w) {
        env_close(&e);
        return -1;
    }
    for (int i = 0; i < threads; i++) {
        w[i].t = e.t;
        w[i].from = count * (uint64_t)i / (uint64_t)threads;
        w[i].to = count * (uint64_t)(i + 1) / (uint64_t)threads;
        if (pthread_create(&w[i].th, NULL, prep_main, &w[i]) != 0) {
            fprintf(stderr, "txn_bench: pthread_create failed\n");
            exit(1);
        }
    }
    for (int i = 0; i < threads; i++)
        pthread_join(w[i].th, NULL);
    free(w);
    brk_txn_close(e.t);
    e.t = NULL;
    char err[256];
    uint64_t t0 = bench_now_ns();
    brk_status st = brk_txn_open(&e.t, e.s, &to, err, sizeof err);
    uint64_t t1 = bench_now_ns();
    if (st != BRK_OK) {
        fprintf(stderr, "txn_bench: reopen: %s (%s)\n", brk_status_name(st), err);
        brk_store_close(e.s);
        bench_rm_rf(e.dir, "txn_bench");
        return -1;
    }
    brk_txn_stats ts;
    brk_txn_get_stats(e.t, &ts);
    double secs = (double)(t1 - t0) / 1e9;
    printf("rebuild %" PRIu64 " pending transactions at open: %.2f s "
           "(%.0f per second)\n", ts.pending, secs,
           secs > 0 ? (double)ts.pending / secs : 0.0);
    fflush(stdout);
    env_close(&e);
    return ts.pending == count ? 0 : -1;
}

/* ---- main ----------------------------------------------------------------------- */

static void usage(void)
{
    fprintf(stderr, "usage: txn_bench [--dir PATH] [--seconds N] [--quick] "
            "[--threads N] [--count N] [--workers N]\n");
}

int main(int argc, char **argv)
{
    const char *base = ".";
    double seconds = 3;
    bool quick = false, seconds_given = false, count_given = false;
    int threads = 64;
    uint64_t count = 100000;
    unsigned workers = 0;
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
        } else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            threads = atoi(argv[++i]);
            if (threads <= 0 || threads > 4096) {
                usage();
                return 2;
            }
        } else if (strcmp(argv[i], "--count") == 0 && i + 1 < argc) {
            count = strtoull(argv[++i], NULL, 10);
            if (count == 0) {
                usage();
                return 2;
            }
            count_given = true;
        } else if (strcmp(argv[i], "--workers") == 0 && i + 1 < argc) {
            workers = (unsigned)atoi(argv[++i]);
        } else if (strcmp(argv[i], "--quick") == 0) {
            quick = true;
        } else {
            usage();
            return 2;
        }
    }
    if (quick && !seconds_given)
        seconds = 1;
    if (quick && !count_given)
        count = 20000;

    struct statfs sf;
    if (statfs(base, &sf) != 0) {
        fprintf(stderr, "txn_bench: statfs %s: %s\n", base, strerror(errno));
        return 1;
    }
    printf("txn_bench: SYNC store, %d-byte bodies, %d keys, topic \"%s\"\n",
           BODY_LEN, NKEYS, TOPIC);
    bench_print_machine(base, &sf, 12, true, true);
    printf("\n");
    fflush(stdout);

    int failures = 0;
    if (run_pairs(base, threads, seconds) != 0) {
        printf("pairs: case failed, see stderr\n");
        failures++;
    }
    if (run_storm(base, threads, count, workers) != 0) {
        printf("storm: case failed, see stderr\n");
        failures++;
    }
    if (run_rebuild(base, threads, count) != 0) {
        printf("rebuild: case failed, see stderr\n");
        failures++;
    }
    return failures ? 1 : 0;
}
