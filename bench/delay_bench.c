/*
 * delay_bench.c - delayed delivery: how late timers fire at 10 000 due per
 * second, and how much scheduler memory a pending message costs.
 *
 * Lateness case (per flush mode, ASYNC then SYNC): a fresh store with
 * default options and a scheduler with its background thread, real clock.
 * Producer threads send --rate messages per second for --seconds seconds,
 * each due --lead ms after its send slot (default 1000), so due times come
 * at --rate per second while the sends go on.  Bodies are 100 bytes, no
 * key (round robin over the topic's 4 queues).  A reader thread polls the
 * target topic and, for every message, records
 *   fire lateness = the delivered record's store_ms - its due time (ms;
 *                   store_ms is the store clock's append time, so this is
 *                   when the message became visible),
 *   seen lateness = the reader's wall time when it read it - due time
 *                   (adds the reader's polling delay, <= 1 ms + read time).
 * Negative lateness would mean early delivery and is reported as such.
 * Cases: ASYNC and SYNC with --lead, so sends (10 000 durable appends per
 * second in SYNC mode) and firing overlap; and SYNC with the lead longer
 * than the send phase, so firing runs alone.  Comparing the two SYNC rows
 * tells the scheduler's own rate from the disk's fdatasync budget.
 * Goal (from the issue): p99 fire lateness <= 50 ms at 10 000 due/s.
 *
 * Memory case: a store without background threads (ASYNC), 1 000 000
 * (--pending) messages sent with due times spread over the next day.  It
 * prints brk_delay_stats.memory_bytes / pending at every 100 000 and at the
 * end (the arrays grow by half, so the figure moves between ~24 and ~36
 * bytes), the send rate, and the time to rebuild the timers at open
 * (close and reopen the scheduler over the same store).  Goal: <= 128 bytes
 * per pending message beyond its bytes on disk.
 *
 * Usage: delay_bench [--dir PATH] [--quick] [--rate N] [--seconds N]
 *                    [--lead MS] [--pending N] [--mode sync|async]
 *                    [--no-memory] [--no-lateness]
 *   --dir      where the store directories go (default: cwd); removed after
 *   --quick    2 s of sends and 200 000 pending messages
 *   --mode     run only that flush mode's lateness case
 * The exit status is 0 unless the bench itself could not run.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statfs.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "broker/delay.h"
#include "broker/store.h"

#define TOPIC     "bench"
#define BODY_LEN  100
#define PRODUCERS 4

/* ---- helpers -------------------------------------------------------------------- */

static int64_t wall_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void sleep_until_wall_us(int64_t t)
{
    for (;;) {
        int64_t now = wall_us();
        if (now >= t)
            return;
        int64_t d = t - now;
        struct timespec ts = { (time_t)(d / 1000000), (long)(d % 1000000) * 1000 };
        nanosleep(&ts, NULL);
    }
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int64_t quantile(const int64_t *sorted, size_t n, double q)
{
    if (n == 0)
        return 0;
    size_t i = (size_t)(q * (double)n);
    if (i >= n)
        i = n - 1;
    return sorted[i];
}

static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0, rss = 0;
    if (!f)
        return -1;
    if (fscanf(f, "%ld %ld", &pages, &rss) != 2)
        rss = -1;
    fclose(f);
    return rss < 0 ? -1 : rss * (sysconf(_SC_PAGESIZE) / 1024);
}

/* ---- lateness ------------------------------------------------------------------- */

typedef struct lat_run {
    brk_store *s;
    brk_delay *d;
    int64_t start_us;       /* wall time of send slot 0 */
    uint64_t total;         /* messages to send */
    double rate;
    int64_t lead_ms;
    atomic_uint_fast64_t sent, send_errors;
    atomic_bool stop_reader;
    /* reader */
    int64_t *fire_late, *seen_late;
    size_t nread;
    uint64_t send_ns_max;
} lat_run;

typedef struct producer {
    pthread_t th;
    lat_run *r;
    unsigned idx;
    uint64_t send_ns_max;
} producer;

static void *producer_main(void *arg)
{
    producer *p = arg;
    lat_run *r = p->r;
    uint8_t body[BODY_LEN];
    memset(body, 'b', sizeof body);
    brk_append_req q;
    memset(&q, 0, sizeof q);
    q.topic = TOPIC;
    q.queue = -1;
    q.body = (brk_bytes){ body, sizeof body };
    brk_delay_res res;
    for (uint64_t i = p->idx; i < r->total; i += PRODUCERS) {
        int64_t slot_us = r->start_us + (int64_t)((double)i * 1e6 / r->rate);
        sleep_until_wall_us(slot_us);
        /* Due: lead ms after the slot, in whole ms as the API takes it. */
        int64_t due = (slot_us + 999) / 1000 + r->lead_ms;
        memcpy(body, &due, sizeof due);
        uint64_t t0 = bench_now_ns();
        brk_status st = brk_delay_send(r->d, &q, due, &res);
        uint64_t t1 = bench_now_ns();
        if (t1 - t0 > p->send_ns_max)
            p->send_ns_max = t1 - t0;
        if (st != BRK_OK)
            atomic_fetch_add(&r->send_errors, 1);
        else
            atomic_fetch_add(&r->sent, 1);
    }
    return NULL;
}

static void *reader_main(void *arg)
{
    lat_run *r = arg;
    brk_topic_info ti;
    while (brk_topic_get(r->s, TOPIC, &ti) != BRK_OK) {
        if (atomic_load(&r->stop_reader))
            return NULL;
        usleep(1000);
    }
    uint64_t next[BRK_QUEUES_MAX] = { 0 };
    while (r->nread < r->total && !atomic_load(&r->stop_reader)) {
        bool any = false;
        brk_topic_get(r->s, TOPIC, &ti);
        for (uint16_t qi = 0; qi < ti.queues; qi++) {
            brk_batch *b = NULL;
            if (brk_store_read(r->s, TOPIC, qi, next[qi], 1024, &b) != BRK_OK)
                continue;
            int64_t seen = wall_us();
            for (size_t i = 0; i < b->count && r->nread < r->total; i++) {
                int64_t due;
                memcpy(&due, b->recs[i].body.ptr, sizeof due);
                r->fire_late[r->nread] = b->recs[i].store_ms - due;
                r->seen_late[r->nread] = seen - due * 1000;   /* us */
                r->nread++;
            }
            any |= b->count > 0;
            next[qi] = b->next_offset;
            brk_batch_free(b);
        }
        if (!any)
            usleep(500);
    }
    return NULL;
}

static int lateness_case(const char *base, brk_flush_mode mode, double rate,
                         double seconds, int64_t lead_ms)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/delay_bench.%ld.%s", base, (long)getpid(),
             mode == BRK_FLUSH_SYNC ? "sync" : "async");
    bench_rm_rf(dir, "delay_bench");
    brk_store_opts so;
    brk_store_opts_init(&so);
    so.flush_mode = mode;
    char err[256];
    lat_run r;
    memset(&r, 0, sizeof r);
    brk_status st = brk_store_open(&r.s, dir, &so, err, sizeof err);
    if (st != BRK_OK) {
        fprintf(stderr, "delay_bench: store open: %s\n", err);
        return 1;
    }
    if ((st = brk_topic_create(r.s, TOPIC, 4)) != BRK_OK) {
        fprintf(stderr, "delay_bench: topic: %s\n", brk_strerror(st));
        return 1;
    }
    brk_delay_opts dopt;
    brk_delay_opts_init(&dopt);
    if ((st = brk_delay_open(&r.d, r.s, &dopt, err, sizeof err)) != BRK_OK) {
        fprintf(stderr, "delay_bench: delay open: %s\n", err);
        return 1;
    }
    r.rate = rate;
    r.lead_ms = lead_ms;
    r.total = (uint64_t)(rate * seconds);
    r.fire_late = malloc(r.total * sizeof *r.fire_late);
    r.seen_late = malloc(r.total * sizeof *r.seen_late);
    if (!r.fire_late || !r.seen_late) {
        fprintf(stderr, "delay_bench: out of memory\n");
        return 1;
    }
    r.start_us = wall_us() + 100000;

    pthread_t reader;
    producer prod[PRODUCERS];
    pthread_create(&reader, NULL, reader_main, &r);
    for (unsigned i = 0; i < PRODUCERS; i++) {
        prod[i] = (producer){ .r = &r, .idx = i };
        pthread_create(&prod[i].th, NULL, producer_main, &prod[i]);
    }
    uint64_t send_ns_max = 0;
    for (unsigned i = 0; i < PRODUCERS; i++) {
        pthread_join(prod[i].th, NULL);
        if (prod[i].send_ns_max > send_ns_max)
            send_ns_max = prod[i].send_ns_max;
    }
    int64_t sends_done_us = wall_us();
    /* Wait for the last due time plus a grace period. */
    int64_t deadline = r.start_us + (int64_t)(seconds * 1e6) + lead_ms * 1000
                       + 30000000;
    while (wall_us() < deadline) {
        brk_delay_stats ds;
        brk_delay_get_stats(r.d, &ds);
        if (ds.pending == 0 && ds.fired_total >= atomic_load(&r.sent))
            break;
        usleep(10000);
    }
    usleep(20000);
    atomic_store(&r.stop_reader, true);
    pthread_join(reader, NULL);

    brk_delay_stats ds;
    brk_delay_get_stats(r.d, &ds);
    brk_store_stats ss;
    brk_store_get_stats(r.s, &ss);
    uint64_t sent = atomic_load(&r.sent);
    double send_secs = (double)(sends_done_us - r.start_us) / 1e6;

    qsort(r.fire_late, r.nread, sizeof *r.fire_late, cmp_i64);
    qsort(r.seen_late, r.nread, sizeof *r.seen_late, cmp_i64);
    size_t early = 0;
    for (size_t i = 0; i < r.nread && r.fire_late[i] < 0; i++)
        early++;
    int64_t p99 = quantile(r.fire_late, r.nread, 0.99);
    printf("%-5s  %5" PRId64 "  %7" PRIu64 "  %8.0f  %8zu  %6" PRId64 "  %6"
           PRId64 "  %7" PRId64 "  %6.1f  %6.1f  %7.1f  %6zu  %6" PRIu64
           "  %7.1f  %s\n",
           mode == BRK_FLUSH_SYNC ? "SYNC" : "ASYNC", lead_ms, sent,
           (double)sent / send_secs, r.nread,
           quantile(r.fire_late, r.nread, 0.50), p99,
           r.nread ? r.fire_late[r.nread - 1] : 0,
           (double)quantile(r.seen_late, r.nread, 0.50) / 1000.0,
           (double)quantile(r.seen_late, r.nread, 0.99) / 1000.0,
           r.nread ? (double)r.seen_late[r.nread - 1] / 1000.0 : 0.0,
           early, ds.errors_total, (double)send_ns_max / 1e6,
           r.nread == sent && sent == r.total && p99 <= 50 ? "met" : "MISSED");
    printf("              store: %.0f fdatasyncs/s, %.0f us each on average, %.1f "
           "records per fdatasync\n",
           (double)ss.fsyncs / ((double)(wall_us() - r.start_us) / 1e6),
           ss.fsyncs ? (double)ss.fsync_ns_total / (double)ss.fsyncs / 1e3 : 0.0,
           ss.fsyncs ? (double)ss.fsync_records / (double)ss.fsyncs : 0.0);
    if (atomic_load(&r.send_errors))
        printf("              %" PRIu64 " sends failed\n",
               (uint64_t)atomic_load(&r.send_errors));
    free(r.fire_late);
    free(r.seen_late);
    brk_delay_close(r.d);
    brk_store_close(r.s);
    bench_rm_rf(dir, "delay_bench");
    return 0;
}

/* ---- memory --------------------------------------------------------------------- */

static int memory_case(const char *base, uint64_t count)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/delay_bench.%ld.mem", base, (long)getpid());
    bench_rm_rf(dir, "delay_bench");
    brk_store_opts so;
    brk_store_opts_init(&so);
    so.no_background = true;
    so.flush_mode = BRK_FLUSH_ASYNC;
    brk_store *s = NULL;
    brk_delay *d = NULL;
    char err[256];
    if (brk_store_open(&s, dir, &so, err, sizeof err) != BRK_OK) {
        fprintf(stderr, "delay_bench: store open: %s\n", err);
        return 1;
    }
    brk_delay_opts dopt;
    brk_delay_opts_init(&dopt);
    dopt.no_background = true;
    if (brk_delay_open(&d, s, &dopt, err, sizeof err) != BRK_OK) {
        fprintf(stderr, "delay_bench: delay open: %s\n", err);
        return 1;
    }
    const brk_clock *c = brk_store_clock(s);
    int64_t now = c->now_ms(c->ctx);
    uint8_t body[BODY_LEN];
    memset(body, 'm', sizeof body);
    brk_append_req q;
    memset(&q, 0, sizeof q);
    q.topic = TOPIC;
    q.queue = -1;
    q.body = (brk_bytes){ body, sizeof body };
    brk_delay_res res;
    uint64_t x = 88172645463325252ull;
    double lo = 1e9, hi = 0;
    uint64_t t0 = bench_now_ns();
    printf("  pending  sched bytes  bytes/pending\n");
    for (uint64_t i = 1; i <= count; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        int64_t due = now + 3600000 + (int64_t)(x % 86400000);
        if (brk_delay_send(d, &q, due, &res) != BRK_OK) {
            fprintf(stderr, "delay_bench: send %" PRIu64 " failed\n", i);
            return 1;
        }
        if (i % (count / 10 ? count / 10 : 1) == 0) {
            brk_delay_stats ds;
            brk_delay_get_stats(d, &ds);
            double per = (double)ds.memory_bytes / (double)ds.pending;
            if (per < lo) lo = per;
            if (per > hi) hi = per;
            printf("  %7" PRIu64 "  %11" PRIu64 "  %13.1f\n", ds.pending,
                   ds.memory_bytes, per);
        }
    }
    double send_s = (double)(bench_now_ns() - t0) / 1e9;
    brk_store_stats ss;
    brk_store_get_stats(s, &ss);
    brk_delay_stats ds;
    brk_delay_get_stats(d, &ds);
    printf("memory: %" PRIu64 " pending, %.1f bytes each (%.1f..%.1f over the "
           "fill), %.0f sends/s, log %.1f bytes per delayed record on disk\n",
           ds.pending, (double)ds.memory_bytes / (double)ds.pending, lo, hi,
           (double)count / send_s, (double)ss.log_end / (double)count);

    brk_delay_close(d);
    brk_store_checkpoint(s);
    long rss0 = rss_kib();
    t0 = bench_now_ns();
    if (brk_delay_open(&d, s, &dopt, err, sizeof err) != BRK_OK) {
        fprintf(stderr, "delay_bench: delay reopen: %s\n", err);
        return 1;
    }
    double rebuild_s = (double)(bench_now_ns() - t0) / 1e9;
    long rss1 = rss_kib();
    brk_delay_get_stats(d, &ds);
    printf("rebuild at open: %" PRIu64 " timers in %.2f s (%.0f/s), %.1f bytes "
           "each after it; process RSS grew %.1f bytes per pending\n",
           ds.pending, rebuild_s, (double)ds.pending / rebuild_s,
           (double)ds.memory_bytes / (double)ds.pending,
           rss0 >= 0 && rss1 >= 0 ? (double)(rss1 - rss0) * 1024.0
                                        / (double)ds.pending : -1.0);
    printf("goal <= 128 bytes per pending: %s\n",
           hi <= 128 && (double)ds.memory_bytes / (double)ds.pending <= 128
               ? "met" : "MISSED");
    brk_delay_close(d);
    brk_store_close(s);
    bench_rm_rf(dir, "delay_bench");
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: delay_bench [--dir PATH] [--quick] [--rate N] "
                    "[--seconds N] [--lead MS] [--pending N] [--mode sync|async] "
                    "[--no-memory] [--no-lateness]\n");
}

int main(int argc, char **argv)
{
    const char *base = ".";
    double rate = 10000, seconds = 5;
    int64_t lead = 1000;
    uint64_t pending = 1000000;
    int only_mode = -1;
    bool memory = true, lateness = true, quick = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc) {
            base = argv[++i];
        } else if (strcmp(argv[i], "--rate") == 0 && i + 1 < argc) {
            rate = atof(argv[++i]);
        } else if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) {
            seconds = atof(argv[++i]);
        } else if (strcmp(argv[i], "--lead") == 0 && i + 1 < argc) {
            lead = atoll(argv[++i]);
        } else if (strcmp(argv[i], "--pending") == 0 && i + 1 < argc) {
            pending = strtoull(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--mode") == 0 && i + 1 < argc) {
            i++;
            only_mode = strcmp(argv[i], "sync") == 0    ? BRK_FLUSH_SYNC
                        : strcmp(argv[i], "async") == 0 ? BRK_FLUSH_ASYNC
                                                        : -2;
            if (only_mode == -2) {
                usage();
                return 2;
            }
        } else if (strcmp(argv[i], "--quick") == 0) {
            quick = true;
        } else if (strcmp(argv[i], "--no-memory") == 0) {
            memory = false;
        } else if (strcmp(argv[i], "--no-lateness") == 0) {
            lateness = false;
        } else {
            usage();
            return 2;
        }
    }
    if (quick) {
        seconds = 2;
        pending = 200000;
    }
    if (!(rate > 0) || !(seconds > 0) || lead < 0 || pending == 0) {
        usage();
        return 2;
    }
    struct statfs sf;
    if (statfs(base, &sf) != 0) {
        fprintf(stderr, "delay_bench: statfs %s: %s\n", base, strerror(errno));
        return 1;
    }
    printf("delay_bench: nproc %ld, file system type 0x%lx%s\n",
           sysconf(_SC_NPROCESSORS_ONLN), (unsigned long)sf.f_type,
           (unsigned long)sf.f_type == 0x01021994 ? " (tmpfs: SYNC means nothing)"
                                                 : "");
    if (lateness) {
        printf("lateness: %.0f due/s for %.1f s (%.0f messages), %d producer "
               "threads, %d-byte bodies, background thread, real clock\n",
               rate, seconds, rate * seconds, PRODUCERS, BODY_LEN);
        printf("mode    lead     sent   sends/s      read  fire50  fire99  firemax"
               "  seen50  seen99  seenmax   early  errors  sendmax  goal\n"
               "        (ms)                                 (ms)    (ms)     (ms)"
               "    (ms)    (ms)     (ms)                   (ms)\n");
        /* Third case: SYNC with the sends over before the first due time,
         * to tell the scheduler's firing rate from the disk's fdatasync
         * budget that the durable sends themselves use up. */
        const struct { brk_flush_mode mode; int64_t lead; } cases[] = {
            { BRK_FLUSH_ASYNC, lead },
            { BRK_FLUSH_SYNC, lead },
            { BRK_FLUSH_SYNC, lead + (int64_t)(seconds * 1000) + 500 },
        };
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
            if (only_mode >= 0 && (int)cases[c].mode != only_mode)
                continue;
            if (lateness_case(base, cases[c].mode, rate, seconds,
                              cases[c].lead) != 0)
                return 1;
        }
    }
    if (memory && memory_case(base, pending) != 0)
        return 1;
    return 0;
}
