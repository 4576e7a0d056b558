/*
 * relay_bench.c - does the outbox relay keep up with applications writing
 * rows?  Relay rows/s against the insert rate of 64 concurrent writers, and
 * the latency from a row's commit to its message being stored.
 *
 * Setup: a throwaway server (tests/support/pg_harness) with fsync on, the
 * outbox schema, and pgbench (the newest /usr/lib/postgresql/N/bin) with
 * 64 clients (-c 64 -j 2, -M prepared) running for --seconds (default 10)
 * a script that inserts one row into outbox.messages: topic "bench", key
 * "key-<1..1000>", a JSON body of about 200 bytes.
 *
 *   phase 1  pgbench alone: the insert rate (rows/s).  Then TRUNCATE.
 *   phase 2  the same pgbench run while a relay runs in this process
 *            (thread mode, default batch 500 and poll interval 1 s) into a
 *            SYNC store in the working directory.  "during": rows stored
 *            while pgbench ran / pgbench's wall time; "until drained":
 *            every row pgbench committed / the time from pgbench's start
 *            until the last one was stored.
 *
 * Rates are rows per second of wall time around the pgbench process (its
 * start includes opening 64 connections; pgbench's own tps figure, which
 * leaves that out, is printed alongside).  The ratio is relay (until
 * drained) / insert rate alone (goal >= 1.0); "keeps up" is relay during /
 * insert rate of the same phase.  Latency: per stored message, store_ms -
 * born_ms, read back from the store; born_ms is the row's created_at
 * (clock_timestamp() at INSERT, just before the commit), so it includes
 * the writer's own commit.  Goal p99 <= 1 s.
 *
 *   phase 3  a restart with a backlog: BACKLOG rows are inserted at once,
 *            a relay stores one batch of them and "dies" before its COMMIT
 *            (fail_before_commit_test), and a new relay on the same store
 *            (which holds phase 2's messages) drains them.  Only the rows
 *            of that unfinished batch are looked up by msg_id (stats
 *            lookups, expected: one batch), so the drain rate stays close
 *            to phase 2's instead of paying a store-wide lookup per row.
 *
 * Everything (PostgreSQL, 64 clients, the relay) shares this machine's
 * CPUs: on a small machine phase 2's inserts are slower than phase 1's,
 * which is why both ratios are printed.  The exit status is 0 even when a
 * goal is missed: it is a measurement, not a test.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "broker/store.h"
#include "pg_harness.h"
#include "relay.h"

#define DB      "bench"
#define CLIENTS 64
#define TOPIC   "bench"
#define BACKLOG 20000

static double g_seconds = 10.0;

/* The script pgbench runs: one row per transaction.  Variables go outside
 * quotes (with -M prepared they become parameters). */
static const char SCRIPT[] =
    "\\set k random(1, 1000)\n"
    "INSERT INTO outbox.messages (topic, key, body) VALUES ('" TOPIC "',"
    " 'key-' || :k::int, jsonb_build_object('order_id', :k::int,"
    " 'customer', 'customer-' || :k::int, 'currency', 'EUR',"
    " 'amount_cents', 12999, 'items', '[{\"sku\": \"SKU-000123\", \"qty\": 2},"
    " {\"sku\": \"SKU-000456\", \"qty\": 1}]'::jsonb,"
    " 'note', 'relay benchmark row with a body of about two hundred bytes'));\n";

static double now_s(void)
{
    return (double)bench_now_ns() / 1e9;
}

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0) {}
}

static int find_pgbench(char *out, size_t cap)
{
    glob_t g;
    if (glob("/usr/lib/postgresql/*/bin/pgbench", 0, NULL, &g) != 0) return -1;
    /* Newest major version: compare numerically. */
    int best = -1;
    long bestv = -1;
    for (size_t i = 0; i < g.gl_pathc; i++) {
        long v = strtol(g.gl_pathv[i] + strlen("/usr/lib/postgresql/"), NULL, 10);
        if (v > bestv) {
            bestv = v;
            best = (int)i;
        }
    }
    if (best >= 0) snprintf(out, cap, "%s", g.gl_pathv[best]);
    globfree(&g);
    return best >= 0 ? 0 : -1;
}

typedef struct run {
    long long txns;             /* committed by pgbench */
    double tps;                 /* pgbench's figure (without connection time) */
    double t0, t1;              /* wall time around the pgbench process */
} run;

/* Run pgbench to the end. */
static int run_pgbench(const char *pgbench, const char *script, uint16_t port,
                       run *out)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "'%s' -n -M prepared -c %d -j 2 -T %d -f '%s' -h 127.0.0.1 -p %u"
             " -U postgres %s 2>&1", pgbench, CLIENTS, (int)g_seconds, script,
             (unsigned)port, DB);
    memset(out, 0, sizeof *out);
    out->t0 = now_s();
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    char line[512];
    while (fgets(line, sizeof line, p)) {
        long long n;
        double t;
        if (sscanf(line, "number of transactions actually processed: %lld", &n) == 1)
            out->txns = n;
        else if (sscanf(line, "tps = %lf (without initial connection time)", &t) == 1)
            out->tps = t;
        else if (strstr(line, "error") || strstr(line, "ERROR"))
            fprintf(stderr, "relay_bench: pgbench: %s", line);
    }
    int st = pclose(p);
    out->t1 = now_s();
    if (st == -1 || !WIFEXITED(st) || WEXITSTATUS(st) != 0 || out->txns <= 0) {
        fprintf(stderr, "relay_bench: pgbench failed (status %d)\n", st);
        return -1;
    }
    return 0;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* store_ms - born_ms of every message of TOPIC, sorted; *body_bytes sums
 * the bodies. */
static int64_t *latencies(brk_store *s, size_t *n, uint64_t *body_bytes)
{
    brk_topic_info ti;
    *n = 0;
    *body_bytes = 0;
    if (brk_topic_get(s, TOPIC, &ti) != BRK_OK) return NULL;
    size_t cap = 1 << 16;
    int64_t *v = malloc(cap * sizeof *v);
    for (uint16_t q = 0; q < ti.queues && v; q++) {
        uint64_t from = 0;
        for (;;) {
            brk_batch *b = NULL;
            if (brk_store_read(s, TOPIC, q, from, 4096, &b) != BRK_OK) break;
            if (b->count == 0) {
                brk_batch_free(b);
                break;
            }
            for (size_t i = 0; i < b->count; i++) {
                if (*n == cap) {
                    cap *= 2;
                    int64_t *nv = realloc(v, cap * sizeof *v);
                    if (!nv) {
                        brk_batch_free(b);
                        free(v);
                        return NULL;
                    }
                    v = nv;
                }
                v[(*n)++] = b->recs[i].store_ms - b->recs[i].born_ms;
                *body_bytes += b->recs[i].body.len;
            }
            from = b->next_offset;
            brk_batch_free(b);
        }
    }
    if (v) qsort(v, *n, sizeof *v, cmp_i64);
    return v;
}

static int64_t pct(const int64_t *v, size_t n, double q)
{
    if (!n) return 0;
    size_t i = (size_t)(q * (double)(n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc)
            g_seconds = atof(argv[++i]);
        else if (strcmp(argv[i], "--quick") == 0)
            g_seconds = 3;
        else {
            fprintf(stderr, "usage: relay_bench [--seconds N | --quick]\n");
            return 2;
        }
    }
    if (g_seconds < 1) g_seconds = 1;
    setvbuf(stdout, NULL, _IOLBF, 0);

    char pgbench[512];
    if (find_pgbench(pgbench, sizeof pgbench) != 0) {
        fprintf(stderr, "relay_bench: pgbench not found under /usr/lib/postgresql\n");
        return 1;
    }
    char base[] = "relay_bench.XXXXXX";
    if (!mkdtemp(base)) {
        fprintf(stderr, "relay_bench: mkdtemp: %s\n", strerror(errno));
        return 1;
    }
    struct statfs sf;
    if (statfs(base, &sf) != 0) memset(&sf, 0, sizeof sf);

    setenv("PGTMP_FSYNC", "on", 1);
    pgh *pg = pgh_start(OUTBOXD_SOURCE_DIR);
    if (!pg) {
        bench_rm_rf(base, NULL);
        return 1;
    }
    int rc = 1;
    brk_store *s = NULL;
    sc_relay *r = NULL;
    int64_t *lat = NULL;
    char script[600], store_dir[600], url[256];
    snprintf(script, sizeof script, "%s/insert.sql", base);
    snprintf(store_dir, sizeof store_dir, "%s/store", base);
    FILE *f = fopen(script, "w");
    if (!f || fputs(SCRIPT, f) < 0 || fclose(f) != 0) {
        fprintf(stderr, "relay_bench: cannot write %s\n", script);
        goto out;
    }
    if (pgh_create_db(pg, DB, true) != 0) goto out;
    pgh_url(pg, DB, NULL, NULL, url, sizeof url);

    printf("relay_bench: outbox relay vs %d pgbench writers, %.0f s per phase\n",
           CLIENTS, g_seconds);
    bench_print_machine(".", &sf, 13, false, true);
    printf("%-13s %s (fsync on), -c %d -j 2 -M prepared\n", "pgbench:", pgbench,
           CLIENTS);

    /* ---- phase 1: inserts alone ---- */
    run p1;
    if (run_pgbench(pgbench, script, pgh_port(pg), &p1) != 0) goto out;
    double ins1 = (double)p1.txns / (p1.t1 - p1.t0);
    if (pgh_sql(pg, DB, "TRUNCATE outbox.messages", NULL, 0) != 0) goto out;

    /* ---- phase 2: the same with the relay ---- */
    brk_store_opts so;
    brk_store_opts_init(&so);
    so.flush_mode = BRK_FLUSH_SYNC;
    char err[512];
    brk_status st = brk_store_open(&s, store_dir, &so, err, sizeof err);
    if (st != BRK_OK) {
        fprintf(stderr, "relay_bench: store: %s: %s\n", brk_status_name(st), err);
        goto out;
    }
    sc_relay_opts ro;
    sc_relay_opts_init(&ro);
    ro.pg.conninfo = url;
    ro.store = s;
    if (sc_relay_open(&r, &ro, err, sizeof err) != 0) {
        fprintf(stderr, "relay_bench: relay: %s\n", err);
        goto out;
    }
    sc_relay_stats rs;
    for (int i = 0; i < 1000; i++) {
        sc_relay_get_stats(r, &rs);
        if (rs.leader) break;
        sleep_ms(10);
    }
    run p2;
    if (run_pgbench(pgbench, script, pgh_port(pg), &p2) != 0) goto out;
    sc_relay_get_stats(r, &rs);
    uint64_t stored_t1 = rs.rows_stored;
    double t2 = 0;
    double give_up = now_s() + 60;
    while (now_s() < give_up) {
        sc_relay_get_stats(r, &rs);
        if (rs.rows_stored + rs.rows_duplicate + rs.rows_rejected
            >= (uint64_t)p2.txns) {
            t2 = now_s();
            break;
        }
        sleep_ms(5);
    }
    if (!t2) {
        fprintf(stderr, "relay_bench: the relay did not drain within 60 s "
                "(%llu of %lld rows; last error: %s)\n",
                (unsigned long long)rs.rows_stored, p2.txns, rs.last_error);
        goto out;
    }
    sc_relay_close(r);
    r = NULL;
    brk_store_stats ss;
    brk_store_get_stats(s, &ss);

    /* ---- phase 3: restart after an unfinished batch, with a backlog ---- */
    char q3[256];
    snprintf(q3, sizeof q3, "INSERT INTO outbox.messages (topic, key, body)"
             " SELECT '" TOPIC "3', 'key-' || (g %% 1000),"
             " jsonb_build_object('g', g) FROM generate_series(1, %d) g",
             BACKLOG);
    if (pgh_sql(pg, DB, q3, NULL, 0) != 0) goto out;
    sc_relay_opts ro3 = ro;
    ro3.no_thread = true;
    ro3.fail_before_commit_test = 1;
    if (sc_relay_open(&r, &ro3, err, sizeof err) != 0
        || sc_relay_run_once(r, NULL) != -1) {
        fprintf(stderr, "relay_bench: phase 3: the failing batch did not "
                "fail\n");
        goto out;
    }
    sc_relay_close(r);
    r = NULL;
    double t30 = now_s();
    if (sc_relay_open(&r, &ro, err, sizeof err) != 0) {
        fprintf(stderr, "relay_bench: relay: %s\n", err);
        goto out;
    }
    sc_relay_stats rs3;
    double t31 = 0;
    give_up = now_s() + 120;
    while (now_s() < give_up) {
        sc_relay_get_stats(r, &rs3);
        if (rs3.rows_stored + rs3.rows_duplicate >= BACKLOG) {
            t31 = now_s();
            break;
        }
        sleep_ms(5);
    }
    sc_relay_close(r);
    r = NULL;
    if (!t31) {
        fprintf(stderr, "relay_bench: phase 3 did not drain within 120 s "
                "(%llu rows)\n", (unsigned long long)rs3.rows_stored);
        goto out;
    }

    double ins2 = (double)p2.txns / (p2.t1 - p2.t0);
    double during = (double)stored_t1 / (p2.t1 - p2.t0);
    double drained = (double)p2.txns / (t2 - p2.t0);
    size_t n = 0;
    uint64_t body_bytes = 0;
    lat = latencies(s, &n, &body_bytes);
    if (!lat || n != (size_t)p2.txns) {
        fprintf(stderr, "relay_bench: the store holds %zu messages, pgbench "
                "committed %lld\n", n, p2.txns);
        goto out;
    }
    int64_t p50 = pct(lat, n, 0.50), p99 = pct(lat, n, 0.99), mx = lat[n - 1];

    printf("\n%-34s %10s %10s %12s\n", "", "rows", "rows/s", "pgbench tps");
    printf("%-34s %10lld %10.0f %12.0f\n", "phase 1: inserts alone", p1.txns,
           ins1, p1.tps);
    printf("%-34s %10lld %10.0f %12.0f\n", "phase 2: inserts with the relay",
           p2.txns, ins2, p2.tps);
    printf("%-34s %10llu %10.0f\n", "phase 2: relay, during the run",
           (unsigned long long)stored_t1, during);
    printf("%-34s %10lld %10.0f   (drained %.2f s after pgbench ended)\n",
           "phase 2: relay, until drained", p2.txns, drained, t2 - p2.t1);
    printf("\nrelay batches %llu (%.0f rows each), notifies %llu, store "
           "fdatasyncs %llu, body %.0f bytes on average\n",
           (unsigned long long)rs.batches,
           rs.batches ? (double)p2.txns / (double)rs.batches : 0.0,
           (unsigned long long)rs.notifies, (unsigned long long)ss.fsyncs,
           (double)body_bytes / (double)n);
    printf("commit -> stored latency (ms): p50 %lld, p99 %lld, max %lld\n",
           (long long)p50, (long long)p99, (long long)mx);
    printf("msg_id lookups in phase 2: %llu (only rows of unfinished "
           "batches are looked up)\n", (unsigned long long)rs.lookups);
    printf("\nphase 3: restart after an unfinished batch of %u rows, %d-row "
           "backlog, store holding phase 2's %zu messages:\n  drained in "
           "%.2f s (%.0f rows/s), lookups %llu, duplicates found %llu\n",
           (unsigned)(ro.batch ? ro.batch : 500), BACKLOG, n, t31 - t30,
           (double)BACKLOG / (t31 - t30), (unsigned long long)rs3.lookups,
           (unsigned long long)rs3.rows_duplicate);
    double ratio = drained / ins1, keeps = during / ins2;
    printf("\nratio relay (until drained) / inserts alone: %.2f  goal >= 1.0  %s\n",
           ratio, ratio >= 1.0 ? "met" : "MISSED");
    printf("keeps up: relay during / inserts of phase 2: %.2f\n", keeps);
    printf("p99 commit -> stored: %lld ms  goal <= 1000 ms  %s\n", (long long)p99,
           p99 <= 1000 ? "met" : "MISSED");
    rc = 0;
out:
    free(lat);
    sc_relay_close(r);
    brk_store_close(s);
    pgh_destroy(pg);
    bench_rm_rf(base, "relay_bench");
    return rc;
}
