/*
 * pgcheck_bench.c - check-backs per second answered by PostgreSQL through
 * the sidecar's checker (sidecar/src/pgcheck.h), against the same prepared
 * query run over raw libpq connections.
 *
 * Setup: a throwaway server (tests/support/pg_harness, fsync on), the
 * outbox schema, 100 000 rows in outbox.transactions (a third each commit,
 * rollback, pending; every tenth with a deadline an hour away), ANALYZE.
 *
 * Cases, each for --seconds (default 3):
 *   checker, pool P = 1, 2, 4, 8: 8 threads call check() with random
 *     existing txids; every answer is verified against the row.
 *   raw, C = 1, 2, 4, 8 connections: C threads, each with its own PGconn
 *     and the query prepared once, run PQexecPrepared directly (no pool,
 *     no lock) and verify the answer the same way.
 * Two ratios: "same C" is checker(P) / raw(C = P), what the pool, its lock
 * and the answer mapping cost at the same number of connections; "vs raw8"
 * is checker(P) / raw(C = 8), the peer (one raw connection per
 * calling thread).  Latency is per call, so the checker's includes waiting
 * for a free connection (8 threads over P connections); raw threads never
 * wait.  On a small shared machine the raw rows with few threads also get
 * less CPU than 8 checker threads do (the scheduler is fair per thread),
 * so "same C" can exceed 1; the P = 8 row compares like with like.
 *
 * Everything runs on this machine, server included: the figures are a
 * relative measure (adapter vs raw), not PostgreSQL's capacity.
 */
#define _GNU_SOURCE
#include <libpq-fe.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "bench_util.h"
#include "pg_harness.h"
#include "pgcheck.h"

#define ROWS     100000
#define THREADS  8
#define DB       "bench"

static const unsigned POOLS[] = { 1, 2, 4, 8 };
#define NPOOLS (sizeof POOLS / sizeof POOLS[0])

static double g_seconds = 3.0;
static char g_url[256];

/* What row g answers (see the fill statement). */
static brk_check_result want_of(unsigned g)
{
    return g % 3 == 0 ? BRK_CHECK_COMMIT : g % 3 == 1 ? BRK_CHECK_ROLLBACK
                                                      : BRK_CHECK_UNKNOWN;
}

typedef struct worker {
    pthread_t th;
    sc_pgcheck *pc;          /* checker case; NULL for raw */
    PGconn *conn;            /* raw case */
    uint64_t rng;
    uint64_t done, wrong;
    uint64_t hist[BENCH_HIST_N];
} worker;

static atomic_bool g_go, g_stop;

static brk_check_result raw_check(PGconn *c, const char *txid)
{
    const char *vals[1] = { txid };
    PGresult *r = PQexecPrepared(c, "q", 1, vals, NULL, NULL, 0);
    brk_check_result res = BRK_CHECK_ERROR;
    if (PQresultStatus(r) == PGRES_TUPLES_OK) {
        if (PQntuples(r) == 0 || PQgetisnull(r, 0, 0)) {
            res = BRK_CHECK_UNKNOWN;
        } else {
            const char *v = PQgetvalue(r, 0, 0);
            res = strcmp(v, "commit") == 0 ? BRK_CHECK_COMMIT
                : strcmp(v, "rollback") == 0 ? BRK_CHECK_ROLLBACK
                : strcmp(v, "pending") == 0 ? BRK_CHECK_UNKNOWN : BRK_CHECK_ERROR;
        }
    }
    PQclear(r);
    return res;
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    const brk_checker *ck = w->pc ? sc_pgcheck_checker(w->pc) : NULL;
    char txid[32];
    brk_check_req req;
    memset(&req, 0, sizeof req);
    req.txid = txid;
    req.topic = "orders";
    req.attempt = 1;
    while (!atomic_load(&g_go)) usleep(100);
    while (!atomic_load_explicit(&g_stop, memory_order_relaxed)) {
        unsigned g = 1 + (unsigned)(bench_xorshift(&w->rng) % ROWS);
        snprintf(txid, sizeof txid, "bench-%u", g);
        uint64_t t0 = bench_now_ns();
        brk_check_result r = ck ? ck->check(ck->ctx, &req) : raw_check(w->conn, txid);
        uint64_t t1 = bench_now_ns();
        w->hist[bench_hist_index((t1 - t0) / 1000)]++;
        w->done++;
        if (r != want_of(g)) w->wrong++;
    }
    return NULL;
}

typedef struct result {
    double per_s, p50_us, p99_us;
    uint64_t wrong;
} result;

/* Run `n` workers (set up by the caller) for g_seconds. */
static result run(worker *ws, unsigned n)
{
    atomic_store(&g_go, false);
    atomic_store(&g_stop, false);
    for (unsigned i = 0; i < n; i++) {
        ws[i].rng = 0x9E3779B97F4A7C15ull * (i + 1);
        if (pthread_create(&ws[i].th, NULL, worker_main, &ws[i]) != 0) {
            perror("pthread_create");
            exit(1);
        }
    }
    uint64_t t0 = bench_now_ns();
    atomic_store(&g_go, true);
    usleep((useconds_t)(g_seconds * 1e6));
    atomic_store(&g_stop, true);
    static uint64_t h[BENCH_HIST_N];
    memset(h, 0, sizeof h);
    uint64_t done = 0, wrong = 0;
    for (unsigned i = 0; i < n; i++) {
        pthread_join(ws[i].th, NULL);
        done += ws[i].done;
        wrong += ws[i].wrong;
        for (unsigned b = 0; b < BENCH_HIST_N; b++) h[b] += ws[i].hist[b];
    }
    double secs = (double)(bench_now_ns() - t0) / 1e9;
    result r = { (double)done / secs, bench_hist_quantile(h, 0.50),
                 bench_hist_quantile(h, 0.99), wrong };
    return r;
}

static result run_checker(unsigned pool)
{
    sc_pgcheck_opts o;
    sc_pgcheck_opts_init(&o);
    o.pg.conninfo = g_url;
    o.pg.statement_timeout_ms = 5000;
    o.pool_size = pool;
    sc_pgcheck *pc = NULL;
    char err[512];
    int rc = sc_pgcheck_open(&pc, &o, err, sizeof err);
    if (rc != 0) {
        fprintf(stderr, "pgcheck_bench: sc_pgcheck_open: %d: %s\n", rc, err);
        exit(1);
    }
    static worker ws[THREADS];
    memset(ws, 0, sizeof ws);
    for (unsigned i = 0; i < THREADS; i++) ws[i].pc = pc;
    result r = run(ws, THREADS);
    sc_pgcheck_stats st;
    sc_pgcheck_get_stats(pc, &st);
    r.wrong += st.answers[BRK_CHECK_ERROR];
    sc_pgcheck_close(pc);
    return r;
}

static result run_raw(unsigned conns)
{
    static worker ws[THREADS];
    memset(ws, 0, sizeof ws);
    for (unsigned i = 0; i < conns; i++) {
        ws[i].conn = PQconnectdb(g_url);
        if (PQstatus(ws[i].conn) != CONNECTION_OK) {
            fprintf(stderr, "pgcheck_bench: connect: %s", PQerrorMessage(ws[i].conn));
            exit(1);
        }
        PGresult *p = PQprepare(ws[i].conn, "q", SC_PGCHECK_DEFAULT_QUERY, 0, NULL);
        if (PQresultStatus(p) != PGRES_COMMAND_OK) {
            fprintf(stderr, "pgcheck_bench: prepare: %s", PQresultErrorMessage(p));
            exit(1);
        }
        PQclear(p);
    }
    result r = run(ws, conns);
    for (unsigned i = 0; i < conns; i++) PQfinish(ws[i].conn);
    return r;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) {
            g_seconds = atof(argv[++i]);
        } else if (strcmp(argv[i], "--quick") == 0) {
            g_seconds = 1.0;
        } else {
            fprintf(stderr, "usage: pgcheck_bench [--seconds S | --quick]\n");
            return 2;
        }
    }
    if (g_seconds <= 0) g_seconds = 3.0;

    setenv("PGTMP_FSYNC", "on", 1);
    uint64_t t_start = bench_now_ns();
    pgh *h = pgh_start(OUTBOXD_SOURCE_DIR);
    if (!h) {
        fprintf(stderr, "pgcheck_bench: cannot start PostgreSQL\n");
        return 1;
    }
    int rc = 1;
    if (pgh_create_db(h, DB, true) != 0) {
        fprintf(stderr, "pgcheck_bench: cannot create the database\n");
        goto out;
    }
    char fill[1024];
    snprintf(fill, sizeof fill,
             "INSERT INTO outbox.transactions (txid, state, deadline)"
             " SELECT 'bench-' || g,"
             "        CASE g %% 3 WHEN 0 THEN 'commit' WHEN 1 THEN 'rollback'"
             "                    ELSE 'pending' END,"
             "        CASE WHEN g %% 10 = 0 THEN now() + interval '1 hour' END"
             "   FROM generate_series(1, %d) g;"
             "ANALYZE outbox.transactions;", ROWS);
    if (pgh_sql(h, DB, fill, NULL, 0) != 0) {
        fprintf(stderr, "pgcheck_bench: cannot fill the table\n");
        goto out;
    }
    pgh_url(h, DB, NULL, NULL, g_url, sizeof g_url);

    char ver[64] = "?";
    (void)pgh_sql(h, DB, "SHOW server_version", ver, sizeof ver);
    struct utsname un;
    uname(&un);
    printf("pgcheck_bench: check-backs answered by PostgreSQL (%s, fsync on, same machine)\n",
           ver);
    printf("machine: %ld CPUs, %s %s; %d rows; %d calling threads; %.1f s per case\n",
           sysconf(_SC_NPROCESSORS_ONLN), un.sysname, un.release, ROWS, THREADS,
           g_seconds);
    printf("query: %s\n\n", SC_PGCHECK_DEFAULT_QUERY);

    result chk[NPOOLS], raw[NPOOLS];
    for (size_t i = 0; i < NPOOLS; i++) {
        chk[i] = run_checker(POOLS[i]);
        raw[i] = run_raw(POOLS[i]);
    }

    printf("%-6s %8s %10s %9s %9s | %9s %10s %9s %9s | %6s %7s\n", "conns", "threads",
           "checker/s", "p50 us", "p99 us", "raw thr", "raw/s", "p50 us",
           "p99 us", "same C", "vs raw8");
    uint64_t wrong = 0;
    for (size_t i = 0; i < NPOOLS; i++) {
        const result *r8 = &raw[NPOOLS - 1];
        printf("%-6u %8d %10.0f %9.0f %9.0f | %9u %10.0f %9.0f %9.0f | %5.2fx %6.2fx\n",
               POOLS[i], THREADS, chk[i].per_s, chk[i].p50_us, chk[i].p99_us,
               POOLS[i], raw[i].per_s, raw[i].p50_us, raw[i].p99_us,
               raw[i].per_s > 0 ? chk[i].per_s / raw[i].per_s : 0.0,
               r8->per_s > 0 ? chk[i].per_s / r8->per_s : 0.0);
        wrong += chk[i].wrong + raw[i].wrong;
    }
    printf("\nwrong or ERROR answers: %llu; total run %.1f s\n",
           (unsigned long long)wrong, (double)(bench_now_ns() - t_start) / 1e9);
    rc = wrong ? 1 : 0;
out:
    pgh_destroy(h);
    return rc;
}
