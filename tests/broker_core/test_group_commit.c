/*
 * test_group_commit.c - SYNC appends from many threads: fdatasyncs are
 * shared (group commit), an append acknowledged as durable is durable, and
 * a failed fdatasync fails every waiter it did not cover and makes the
 * store refuse writes from then on.
 *
 * Threads never call cmocka assertions (they are not thread-safe): workers
 * record what they saw and the test thread checks after joining.  Every
 * test here starts threads, so the file carries the "tsan" label.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "broker/record.h"
#include "broker/store.h"
#include "io_sim.h"
#include "tmpdir.h"

#define TOPIC     "gc"
#define NQUEUES   4

/* ---- helpers --------------------------------------------------------------- */

/* Tests on the real file system get a fresh directory under /tmp as their
 * state; teardown removes it whether the test passed or failed. */
static int tmpdir_setup(void **state)
{
    char *dir = malloc(256);
    if (!dir || brk_tmpdir_new("gc", dir, 256) != 0) {
        free(dir);
        return -1;
    }
    *state = dir;
    return 0;
}

static int tmpdir_teardown(void **state)
{
    brk_tmpdir_remove(*state);
    free(*state);
    return 0;
}

static brk_store *open_store(const char *dir, const brk_store_opts *o)
{
    brk_store *s = NULL;
    char err[256];
    brk_status st = brk_store_open(&s, dir, o, err, sizeof err);
    if (st != BRK_OK)
        fail_msg("open %s: %s: %s", dir, brk_status_name(st), err);
    return s;
}

/* Bytes one record takes in the log, computed by the codec itself. */
static uint64_t record_bytes(const char *key, size_t body_len)
{
    brk_record r;
    memset(&r, 0, sizeof r);
    r.type = BRK_REC_MSG;
    r.topic = (brk_bytes){ TOPIC, strlen(TOPIC) };
    r.key = (brk_bytes){ key, key ? strlen(key) : 0 };
    r.body = (brk_bytes){ "", body_len };
    return brk_record_size(&r);
}

static void fill_req(brk_append_req *req, const char *key, const char *body)
{
    memset(req, 0, sizeof *req);
    req->topic = TOPIC;
    req->queue = -1;
    req->key = (brk_bytes){ key, strlen(key) };
    req->body = (brk_bytes){ body, strlen(body) };
}

/* Body "w=TT n=NNNNN": writer thread and its sequence number. */
#define BODY_LEN 12
static void make_body(char *out, int thread, int seq)
{
    snprintf(out, BODY_LEN + 1, "w=%02d n=%05d", thread, seq);
}

static bool parse_body(const brk_bytes *b, int *thread, int *seq)
{
    char tmp[BODY_LEN + 1];
    if (b->len != BODY_LEN)
        return false;
    memcpy(tmp, b->ptr, BODY_LEN);
    tmp[BODY_LEN] = '\0';
    return sscanf(tmp, "w=%2d n=%5d", thread, seq) == 2;
}

/* ---- concurrent SYNC appenders on a real file system ------------------------ */

#define GC_THREADS 16
#define GC_PER     200

typedef struct gc_worker {
    pthread_t th;
    brk_store *s;
    pthread_barrier_t *go;
    int id;
    char key[8];
    int ok;                          /* appends that returned BRK_OK */
    brk_status first_bad;            /* first non-OK status, or BRK_OK */
    uint16_t queue;                  /* queue of every append (same key) */
    bool queue_changed;
    uint64_t last_qoff;              /* queue offsets must grow */
    bool qoff_not_increasing;
    uint64_t rec_bytes;
    int not_durable;                 /* returned before durable_offset
                                        covered the record */
} gc_worker;

static void *gc_main(void *arg)
{
    gc_worker *w = arg;
    pthread_barrier_wait(w->go);
    for (int i = 0; i < GC_PER; i++) {
        char body[BODY_LEN + 1];
        make_body(body, w->id, i);
        brk_append_req req;
        fill_req(&req, w->key, body);
        brk_append_res res;
        brk_status st = brk_store_append(w->s, &req, &res);
        if (st != BRK_OK) {
            if (w->first_bad == BRK_OK)
                w->first_bad = st;
            continue;
        }
        brk_store_stats stats;
        brk_store_get_stats(w->s, &stats);
        if (stats.durable_offset < res.log_offset + w->rec_bytes)
            w->not_durable++;
        if (w->ok > 0 && res.queue != w->queue)
            w->queue_changed = true;
        if (w->ok > 0 && res.queue_offset <= w->last_qoff)
            w->qoff_not_increasing = true;
        w->queue = res.queue;
        w->last_qoff = res.queue_offset;
        w->ok++;
    }
    return NULL;
}

static void concurrent_sync_appenders_share_fdatasyncs(void **state)
{
    const char *dir = *state;
    brk_store_opts o;
    brk_store_opts_init(&o);
    o.flush_mode = BRK_FLUSH_SYNC;
    o.checkpoint_interval_ms = 50;   /* background checkpoints run alongside */
    brk_store *s = open_store(dir, &o);
    assert_int_equal(brk_topic_create(s, TOPIC, NQUEUES), BRK_OK);

    gc_worker w[GC_THREADS];
    memset(w, 0, sizeof w);
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, GC_THREADS);
    for (int i = 0; i < GC_THREADS; i++) {
        w[i].s = s;
        w[i].go = &go;
        w[i].id = i;
        snprintf(w[i].key, sizeof w[i].key, "key%02d", i);
        w[i].rec_bytes = record_bytes(w[i].key, BODY_LEN);
        assert_int_equal(pthread_create(&w[i].th, NULL, gc_main, &w[i]), 0);
    }
    for (int i = 0; i < GC_THREADS; i++)
        pthread_join(w[i].th, NULL);
    pthread_barrier_destroy(&go);

    const uint64_t total = (uint64_t)GC_THREADS * GC_PER;
    for (int i = 0; i < GC_THREADS; i++) {
        if (w[i].first_bad != BRK_OK)
            fail_msg("thread %d: an append returned %s (%s)", i,
                     brk_status_name(w[i].first_bad), brk_store_errstr(s));
        assert_int_equal(w[i].ok, GC_PER);
        if (w[i].not_durable)
            fail_msg("thread %d: %d SYNC appends returned before durable_offset "
                     "covered them", i, w[i].not_durable);
        assert_false(w[i].queue_changed);
        assert_false(w[i].qoff_not_increasing);
        uint16_t q;
        assert_int_equal(brk_topic_queue_for_key(s, TOPIC, w[i].key,
                                                 strlen(w[i].key), &q), BRK_OK);
        assert_int_equal(q, w[i].queue);
    }
    brk_store_stats st;
    brk_store_get_stats(s, &st);
    assert_int_equal(st.appends, total);
    /* Sixteen threads waiting at once: some fdatasyncs must have covered
     * more than one append. */
    if (!(st.fsyncs < total))
        fail_msg("no fdatasync was shared: %" PRIu64 " fsyncs for %" PRIu64
                 " appends", st.fsyncs, total);
    assert_true(st.fsyncs > 0);
    /* Every fdatasync lands in exactly one histogram bucket. */
    uint64_t in_buckets = 0;
    for (unsigned b = 0; b < BRK_FSYNC_BUCKETS; b++)
        in_buckets += st.fsync_hist[b];
    assert_int_equal(in_buckets, st.fsyncs);
    assert_int_equal(st.durable_offset, st.log_end);
    assert_false(st.failed);
    assert_int_equal(brk_store_close(s), BRK_OK);

    /* Reopen: everything is there, each queue is dense from 0, and each
     * writer's messages are in its queue in the order it appended them. */
    s = open_store(dir, &o);
    int next_seq[GC_THREADS];
    memset(next_seq, 0, sizeof next_seq);
    uint64_t seen = 0;
    for (uint16_t q = 0; q < NQUEUES; q++) {
        uint64_t min = 1, max = 0;
        assert_int_equal(brk_store_queue_range(s, TOPIC, q, &min, &max), BRK_OK);
        assert_int_equal(min, 0);
        uint64_t from = 0;
        for (;;) {
            brk_batch *b = NULL;
            assert_int_equal(brk_store_read(s, TOPIC, q, from, 256, &b), BRK_OK);
            if (b->count == 0) {
                brk_batch_free(b);
                break;
            }
            assert_int_equal(b->first_offset, from);
            for (size_t i = 0; i < b->count; i++) {
                const brk_record *r = &b->recs[i];
                assert_int_equal(r->queue, q);
                assert_int_equal(r->queue_offset, from + i);
                int t = -1, n = -1;
                assert_true(parse_body(&r->body, &t, &n));
                assert_in_range(t, 0, GC_THREADS - 1);
                assert_int_equal(w[t].queue, q);
                if (n != next_seq[t])
                    fail_msg("queue %u offset %" PRIu64 ": writer %d message %d "
                             "where %d was expected", q, from + i, t, n,
                             next_seq[t]);
                next_seq[t]++;
            }
            from += b->count;
            assert_int_equal(b->next_offset, from);
            brk_batch_free(b);
        }
        assert_int_equal(from, max);
        seen += from;
    }
    assert_int_equal(seen, total);
    for (int i = 0; i < GC_THREADS; i++)
        assert_int_equal(next_seq[i], GC_PER);
    assert_int_equal(brk_store_close(s), BRK_OK);
}

/* ---- req.sync in ASYNC mode ------------------------------------------------- */

#define SA_THREADS 8
#define SA_PER     60

typedef struct sa_worker {
    pthread_t th;
    brk_store *s;
    int id;
    char key[8];
    uint64_t rec_bytes;
    int sync_ok;                     /* sync appends that returned OK */
    int not_durable;                 /* ...but durable_offset was short */
    uint64_t bad_durable, bad_end;   /* first such case */
    brk_status first_bad;
} sa_worker;

static void *sa_main(void *arg)
{
    sa_worker *w = arg;
    for (int i = 0; i < SA_PER; i++) {
        char body[BODY_LEN + 1];
        make_body(body, w->id, i);
        brk_append_req req;
        fill_req(&req, w->key, body);
        req.sync = (i % 3 == 2);     /* mostly async, every third sync */
        brk_append_res res;
        brk_status st = brk_store_append(w->s, &req, &res);
        if (st != BRK_OK) {
            if (w->first_bad == BRK_OK)
                w->first_bad = st;
            continue;
        }
        if (!req.sync)
            continue;
        brk_store_stats stats;
        brk_store_get_stats(w->s, &stats);
        w->sync_ok++;
        if (stats.durable_offset < res.log_offset + w->rec_bytes
            && w->not_durable++ == 0) {
            w->bad_durable = stats.durable_offset;
            w->bad_end = res.log_offset + w->rec_bytes;
        }
    }
    return NULL;
}

static void sync_append_in_async_mode_is_durable_on_return(void **state)
{
    const char *dir = *state;
    brk_store_opts o;
    brk_store_opts_init(&o);
    o.flush_mode = BRK_FLUSH_ASYNC;
    o.flush_interval_ms = 3600 * 1000;   /* the background never flushes */
    o.checkpoint_interval_ms = 3600 * 1000;
    brk_store *s = open_store(dir, &o);
    assert_int_equal(brk_topic_create(s, TOPIC, NQUEUES), BRK_OK);

    /* Single-threaded first: an async append is not durable, the sync one
     * after it covers both. */
    char body[BODY_LEN + 1];
    make_body(body, 99, 0);
    brk_append_req req;
    fill_req(&req, "solo", body);
    brk_append_res res;
    assert_int_equal(brk_store_append(s, &req, &res), BRK_OK);
    brk_store_stats st;
    brk_store_get_stats(s, &st);
    assert_true(st.durable_offset < st.log_end);
    req.sync = true;
    assert_int_equal(brk_store_append(s, &req, &res), BRK_OK);
    brk_store_get_stats(s, &st);
    assert_int_equal(st.log_end, res.log_offset + record_bytes("solo", BODY_LEN));
    assert_true(st.durable_offset >= res.log_offset + record_bytes("solo", BODY_LEN));

    /* Then threads mixing async and sync appends. */
    sa_worker w[SA_THREADS];
    memset(w, 0, sizeof w);
    for (int i = 0; i < SA_THREADS; i++) {
        w[i].s = s;
        w[i].id = i;
        snprintf(w[i].key, sizeof w[i].key, "sa%02d", i);
        w[i].rec_bytes = record_bytes(w[i].key, BODY_LEN);
        assert_int_equal(pthread_create(&w[i].th, NULL, sa_main, &w[i]), 0);
    }
    for (int i = 0; i < SA_THREADS; i++)
        pthread_join(w[i].th, NULL);
    for (int i = 0; i < SA_THREADS; i++) {
        if (w[i].first_bad != BRK_OK)
            fail_msg("thread %d: an append returned %s", i,
                     brk_status_name(w[i].first_bad));
        assert_int_equal(w[i].sync_ok, SA_PER / 3);
        if (w[i].not_durable)
            fail_msg("thread %d: %d sync appends returned before they were "
                     "durable (durable_offset %" PRIu64 " < record end %" PRIu64 ")",
                     i, w[i].not_durable, w[i].bad_durable, w[i].bad_end);
    }
    assert_int_equal(brk_store_close(s), BRK_OK);
}

/* The same promise checked against a power loss on the simulated disk: the
 * sync append and the async one before it survive, the async one after it
 * need not. */
static void sync_append_in_async_mode_survives_power_loss(void **state)
{
    (void)state;
    brk_sim *sim = NULL;
    assert_int_equal(brk_sim_open(&sim, 11), BRK_OK);
    brk_store_opts o;
    brk_store_opts_init(&o);
    o.io = brk_sim_io(sim);
    o.flush_mode = BRK_FLUSH_ASYNC;
    o.no_background = true;
    o.uuid_seed = 3;
    brk_store *s = open_store("/s", &o);
    assert_int_equal(brk_topic_create(s, TOPIC, 1), BRK_OK);

    const char *bodies[3] = { "before-sync1", "the-sync-one", "after-sync-1" };
    brk_append_res res[3];
    for (int i = 0; i < 3; i++) {
        brk_append_req req;
        fill_req(&req, "k", bodies[i]);
        req.sync = (i == 1);
        assert_int_equal(brk_store_append(s, &req, &res[i]), BRK_OK);
    }
    brk_sim_set_crash_after(sim, 0);        /* power goes now */
    brk_store_close(s);                     /* fails: the disk is gone */
    assert_int_equal(brk_sim_crash(sim, BRK_SIM_DROP_ALL), BRK_OK);

    s = open_store("/s", &o);
    brk_batch *b = NULL;
    assert_int_equal(brk_store_read(s, TOPIC, 0, 0, 10, &b), BRK_OK);
    assert_true(b->count >= 2);
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(b->recs[i].body.len, strlen(bodies[i]));
        assert_memory_equal(b->recs[i].body.ptr, bodies[i], strlen(bodies[i]));
        assert_memory_equal(b->recs[i].msg_id, res[i].msg_id, BRK_UUID_LEN);
    }
    brk_batch_free(b);
    assert_int_equal(brk_store_close(s), BRK_OK);
    brk_sim_close(sim);
}

/* ---- what one fdatasync covers ------------------------------------------------ */

/* A brk_io that forwards to another one, except that an armed gate holds the
 * next sync until the test releases it.  The store only ever sees `io`. */
typedef struct gate_io {
    brk_io io;                       /* first member: the vtable handed out */
    brk_io *inner;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool armed, in_sync, released;
    int skip;                        /* syncs let through before the held one */
    bool pw_armed, in_pwrite, pw_released;   /* the same for one pwrite */
} gate_io;

static brk_io *gate_inner(brk_io *io) { return ((gate_io *)io)->inner; }

static int gate_open(brk_io *io, const char *path, int flags, brk_file **out)
{ return gate_inner(io)->open(gate_inner(io), path, flags, out); }
static int gate_close(brk_io *io, brk_file *f)
{ return gate_inner(io)->close(gate_inner(io), f); }
static int gate_pread(brk_io *io, brk_file *f, void *buf, size_t len,
                      uint64_t off, size_t *nread)
{ return gate_inner(io)->pread(gate_inner(io), f, buf, len, off, nread); }
static int gate_pwrite(brk_io *io, brk_file *f, const void *buf, size_t len,
                       uint64_t off)
{
    gate_io *g = (gate_io *)io;
    pthread_mutex_lock(&g->mu);
    if (g->pw_armed) {
        g->pw_armed = false;
        g->in_pwrite = true;
        pthread_cond_broadcast(&g->cv);
        while (!g->pw_released)
            pthread_cond_wait(&g->cv, &g->mu);
    }
    pthread_mutex_unlock(&g->mu);
    return g->inner->pwrite(g->inner, f, buf, len, off);
}
static int gate_truncate(brk_io *io, brk_file *f, uint64_t size)
{ return gate_inner(io)->truncate(gate_inner(io), f, size); }
static int gate_size(brk_io *io, brk_file *f, uint64_t *size)
{ return gate_inner(io)->size(gate_inner(io), f, size); }
static int gate_mkdir(brk_io *io, const char *path)
{ return gate_inner(io)->mkdir(gate_inner(io), path); }
static int gate_unlink(brk_io *io, const char *path)
{ return gate_inner(io)->unlink(gate_inner(io), path); }
static int gate_rmdir(brk_io *io, const char *path)
{ return gate_inner(io)->rmdir(gate_inner(io), path); }
static int gate_rename(brk_io *io, const char *from, const char *to)
{ return gate_inner(io)->rename(gate_inner(io), from, to); }
static int gate_sync_dir(brk_io *io, const char *path)
{ return gate_inner(io)->sync_dir(gate_inner(io), path); }
static int gate_list(brk_io *io, const char *dir, brk_io_list_fn fn, void *arg)
{ return gate_inner(io)->list(gate_inner(io), dir, fn, arg); }
static int gate_exists(brk_io *io, const char *path)
{ return gate_inner(io)->exists(gate_inner(io), path); }
static int gate_lock(brk_io *io, const char *path, brk_file **out)
{ return gate_inner(io)->lock(gate_inner(io), path, out); }

static int gate_sync(brk_io *io, brk_file *f)
{
    gate_io *g = (gate_io *)io;
    pthread_mutex_lock(&g->mu);
    if (g->armed && g->skip > 0) {
        g->skip--;
    } else if (g->armed) {
        g->armed = false;
        g->in_sync = true;
        pthread_cond_broadcast(&g->cv);
        while (!g->released)
            pthread_cond_wait(&g->cv, &g->mu);
    }
    pthread_mutex_unlock(&g->mu);
    return g->inner->sync(g->inner, f);
}

static void gate_init(gate_io *g, brk_io *inner)
{
    memset(g, 0, sizeof *g);
    g->io = (brk_io){
        .open = gate_open, .close = gate_close, .pread = gate_pread,
        .pwrite = gate_pwrite, .sync = gate_sync, .truncate = gate_truncate,
        .size = gate_size, .mkdir = gate_mkdir, .unlink = gate_unlink,
        .rmdir = gate_rmdir, .rename = gate_rename, .sync_dir = gate_sync_dir,
        .list = gate_list, .exists = gate_exists,
        .lock = inner->lock ? gate_lock : NULL,
    };
    g->inner = inner;
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
}

typedef struct sync_appender {
    brk_store *s;
    brk_append_res res;
    brk_status st;
} sync_appender;

static void *sync_append_main(void *arg)
{
    sync_appender *a = arg;
    brk_append_req req;
    fill_req(&req, "k", "synced-rec-1");
    req.sync = true;
    a->st = brk_store_append(a->s, &req, &a->res);
    return NULL;
}

/* A record appended while a leader is inside fdatasync is not counted as
 * durable by that fdatasync: the leader covers what was appended before it
 * started, no more. */
static void fdatasync_covers_only_records_appended_before_it(void **state)
{
    (void)state;
    brk_sim *sim = NULL;
    assert_int_equal(brk_sim_open(&sim, 21), BRK_OK);
    gate_io gate;
    gate_init(&gate, brk_sim_io(sim));
    brk_store_opts o;
    brk_store_opts_init(&o);
    o.io = &gate.io;
    o.flush_mode = BRK_FLUSH_ASYNC;
    o.no_background = true;
    brk_store *s = open_store("/s", &o);
    assert_int_equal(brk_topic_create(s, TOPIC, 1), BRK_OK);

    brk_append_req req;
    fill_req(&req, "k", "async-rec--0");
    brk_append_res before;
    assert_int_equal(brk_store_append(s, &req, &before), BRK_OK);

    /* A sync append leads a flush and is held inside fdatasync. */
    pthread_mutex_lock(&gate.mu);
    gate.armed = true;
    pthread_mutex_unlock(&gate.mu);
    sync_appender a = { .s = s };
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, sync_append_main, &a), 0);
    pthread_mutex_lock(&gate.mu);
    while (!gate.in_sync)
        pthread_cond_wait(&gate.cv, &gate.mu);
    pthread_mutex_unlock(&gate.mu);

    /* Meanwhile an async append goes in. */
    fill_req(&req, "k", "async-rec--2");
    brk_append_res during;
    assert_int_equal(brk_store_append(s, &req, &during), BRK_OK);
    brk_store_stats st;
    brk_store_get_stats(s, &st);
    assert_true(st.durable_offset <= before.log_offset);

    pthread_mutex_lock(&gate.mu);
    gate.released = true;
    pthread_cond_broadcast(&gate.cv);
    pthread_mutex_unlock(&gate.mu);
    pthread_join(th, NULL);
    assert_int_equal(a.st, BRK_OK);

    /* The flush covered the first two records, not the third. */
    uint64_t rec = record_bytes("k", BODY_LEN);
    assert_int_equal(a.res.log_offset, before.log_offset + rec);
    assert_int_equal(during.log_offset, a.res.log_offset + rec);
    brk_store_get_stats(s, &st);
    assert_int_equal(st.durable_offset, during.log_offset);
    assert_int_equal(st.log_end, during.log_offset + rec);
    assert_int_equal(st.fsync_records, 2);
    assert_int_equal(brk_store_flush(s), BRK_OK);
    brk_store_get_stats(s, &st);
    assert_int_equal(st.durable_offset, st.log_end);

    assert_int_equal(brk_store_close(s), BRK_OK);
    brk_sim_close(sim);
    pthread_mutex_destroy(&gate.mu);
    pthread_cond_destroy(&gate.cv);
}

/* ---- deferred appends -------------------------------------------------------- */

typedef struct one_appender {
    brk_store *s;
    const char *body;
    bool defer;
    brk_append_res res;
    brk_status st;
    atomic_bool finished;
} one_appender;

static void *one_append_main(void *arg)
{
    one_appender *a = arg;
    brk_append_req req;
    fill_req(&req, "k", a->body);
    req.defer_sync = a->defer;
    a->st = brk_store_append(a->s, &req, &a->res);
    atomic_store(&a->finished, true);
    return NULL;
}

static uint64_t log_end_of(brk_store *s)
{
    brk_store_stats st;
    brk_store_get_stats(s, &st);
    return st.log_end;
}

/* A defer_sync append that shares a batch with a SYNC one returns once the
 * batch is written, while the SYNC one still waits for its fdatasync. */
static void deferred_append_returns_before_its_batchs_fdatasync(void **state)
{
    (void)state;
    brk_sim *sim = NULL;
    assert_int_equal(brk_sim_open(&sim, 23), BRK_OK);
    gate_io gate;
    gate_init(&gate, brk_sim_io(sim));
    brk_store_opts o;
    brk_store_opts_init(&o);
    o.io = &gate.io;
    o.flush_mode = BRK_FLUSH_SYNC;
    o.no_background = true;
    brk_store *s = open_store("/s", &o);
    assert_int_equal(brk_topic_create(s, TOPIC, 1), BRK_OK);
    uint64_t rec = record_bytes("k", BODY_LEN);

    /* W becomes the writer and is held inside its pwrite ... */
    pthread_mutex_lock(&gate.mu);
    gate.pw_armed = true;
    pthread_mutex_unlock(&gate.mu);
    one_appender w = { .s = s, .body = "first-sync-1" };
    one_appender d = { .s = s, .body = "deferred-r-2", .defer = true };
    one_appender y = { .s = s, .body = "second-sync3" };
    pthread_t tw, td, ty;
    assert_int_equal(pthread_create(&tw, NULL, one_append_main, &w), 0);
    pthread_mutex_lock(&gate.mu);
    while (!gate.in_pwrite)
        pthread_cond_wait(&gate.cv, &gate.mu);
    pthread_mutex_unlock(&gate.mu);
    /* ... while D (deferred) and Y (sync) queue up behind it. */
    assert_int_equal(pthread_create(&td, NULL, one_append_main, &d), 0);
    assert_int_equal(pthread_create(&ty, NULL, one_append_main, &y), 0);
    while (log_end_of(s) < 3 * rec)
        usleep(1000);
    /* W's own fdatasync passes; the next one (D and Y's batch) is held. */
    pthread_mutex_lock(&gate.mu);
    gate.skip = 1;
    gate.armed = true;
    gate.pw_released = true;
    pthread_cond_broadcast(&gate.cv);
    while (!gate.in_sync)
        pthread_cond_wait(&gate.cv, &gate.mu);
    pthread_mutex_unlock(&gate.mu);
    pthread_join(tw, NULL);
    assert_int_equal(w.st, BRK_OK);

    /* D returns although that fdatasync has not finished; Y does not. */
    for (int i = 0; i < 10000 && !atomic_load(&d.finished); i++)
        usleep(1000);
    assert_true(atomic_load(&d.finished));
    assert_int_equal(d.st, BRK_OK);
    assert_false(atomic_load(&y.finished));
    brk_store_stats st;
    brk_store_get_stats(s, &st);
    assert_true(st.durable_offset <= d.res.log_offset);

    pthread_mutex_lock(&gate.mu);
    gate.released = true;
    pthread_cond_broadcast(&gate.cv);
    pthread_mutex_unlock(&gate.mu);
    pthread_join(td, NULL);
    pthread_join(ty, NULL);
    assert_int_equal(y.st, BRK_OK);
    brk_store_get_stats(s, &st);
    assert_true(st.durable_offset >= y.res.log_offset + rec);
    assert_true(st.durable_offset >= d.res.log_offset + rec);

    assert_int_equal(brk_store_close(s), BRK_OK);
    brk_sim_close(sim);
    pthread_mutex_destroy(&gate.mu);
    pthread_cond_destroy(&gate.cv);
}

/* ---- a failed fdatasync -------------------------------------------------------- */

#define FF_THREADS 8
#define FF_MAX     50000            /* safety bound on appends per thread */
#define FF_AFTER   3                /* appends tried after the first FAILED */

typedef struct ff_ack {
    uint64_t end;                    /* log_offset + record bytes */
    uint8_t id[BRK_UUID_LEN];
} ff_ack;

typedef struct ff_worker {
    pthread_t th;
    brk_store *s;
    atomic_int *acked_total;
    int id;
    char key[8];
    uint64_t rec_bytes;
    ff_ack *acks;                    /* appends that returned OK */
    int nacks;
    int failed;                      /* appends that returned BRK_FAILED */
    brk_status odd;                  /* a status other than OK / FAILED */
    int ok_after_failed;             /* OK after this thread saw FAILED */
} ff_worker;

static void *ff_main(void *arg)
{
    ff_worker *w = arg;
    int after = -1;                  /* appends left once FAILED was seen */
    for (int i = 0; i < FF_MAX && after != 0; i++) {
        char body[BODY_LEN + 1];
        make_body(body, w->id, i);
        brk_append_req req;
        fill_req(&req, w->key, body);
        brk_append_res res;
        brk_status st = brk_store_append(w->s, &req, &res);
        if (after > 0)
            after--;
        if (st == BRK_OK) {
            if (after >= 0)
                w->ok_after_failed++;
            w->acks[w->nacks].end = res.log_offset + w->rec_bytes;
            memcpy(w->acks[w->nacks].id, res.msg_id, BRK_UUID_LEN);
            w->nacks++;
            atomic_fetch_add(w->acked_total, 1);
        } else if (st == BRK_FAILED) {
            w->failed++;
            if (after < 0)
                after = FF_AFTER;
        } else {
            if (w->odd == BRK_OK)
                w->odd = st;
            break;
        }
    }
    return NULL;
}

static bool acked_id_present(const ff_ack *a, brk_store *s, uint16_t q)
{
    bool found = false;
    uint64_t from = 0;
    for (;;) {
        brk_batch *b = NULL;
        if (brk_store_read(s, TOPIC, q, from, 512, &b) != BRK_OK)
            return false;
        size_t n = b->count;
        for (size_t i = 0; i < n && !found; i++)
            found = memcmp(b->recs[i].msg_id, a->id, BRK_UUID_LEN) == 0;
        from = b->next_offset;
        brk_batch_free(b);
        if (found || n == 0)
            return found;
    }
}

static void fsync_failure_fails_every_waiter_and_sticks(void **state)
{
    (void)state;
    brk_sim *sim = NULL;
    assert_int_equal(brk_sim_open(&sim, 5), BRK_OK);
    brk_store_opts o;
    brk_store_opts_init(&o);
    o.io = brk_sim_io(sim);
    o.flush_mode = BRK_FLUSH_SYNC;
    o.no_background = true;          /* only group commit syncs the log */
    brk_store *s = open_store("/s", &o);
    assert_int_equal(brk_topic_create(s, TOPIC, NQUEUES), BRK_OK);

    atomic_int acked;
    atomic_init(&acked, 0);
    ff_worker w[FF_THREADS];
    memset(w, 0, sizeof w);
    for (int i = 0; i < FF_THREADS; i++) {
        w[i].s = s;
        w[i].acked_total = &acked;
        w[i].id = i;
        snprintf(w[i].key, sizeof w[i].key, "ff%02d", i);
        w[i].rec_bytes = record_bytes(w[i].key, BODY_LEN);
        w[i].acks = calloc(FF_MAX, sizeof *w[i].acks);
        assert_non_null(w[i].acks);
        assert_int_equal(pthread_create(&w[i].th, NULL, ff_main, &w[i]), 0);
    }
    /* Let group commit run for a while, then fail the next fdatasync.
     * (Inject and join before asserting, so no thread outlives the test.) */
    for (int i = 0; i < 20000 && atomic_load(&acked) < 200; i++)
        usleep(1000);
    int acked_before = atomic_load(&acked);
    assert_int_equal(brk_sim_fail_next(sim, BRK_SIM_OP_SYNC, EIO, 1), BRK_OK);
    for (int i = 0; i < FF_THREADS; i++)
        pthread_join(w[i].th, NULL);
    assert_true(acked_before >= 200);

    brk_store_stats st;
    brk_store_get_stats(s, &st);
    int total_failed = 0;
    for (int i = 0; i < FF_THREADS; i++) {
        if (w[i].odd != BRK_OK)
            fail_msg("thread %d: append returned %s, expected OK or FAILED (%s)",
                     i, brk_status_name(w[i].odd), brk_store_errstr(s));
        /* Each thread stops only after seeing FAILED and trying again. */
        assert_true(w[i].failed >= 1);
        assert_int_equal(w[i].ok_after_failed, 0);
        total_failed += w[i].failed;
        /* Every acknowledged append was covered by a successful sync. */
        for (int k = 0; k < w[i].nacks; k++)
            if (w[i].acks[k].end > st.durable_offset)
                fail_msg("thread %d: append %d acknowledged but ends at %" PRIu64
                         ", past the durable offset %" PRIu64, i, k,
                         w[i].acks[k].end, st.durable_offset);
    }
    assert_true(total_failed >= FF_THREADS);
    assert_true(st.failed);
    assert_true(st.durable_offset < st.log_end);   /* the failed sync's records */

    /* Sticky: every later write is refused, with the reason on the handle. */
    char body[BODY_LEN + 1];
    make_body(body, 0, 0);
    brk_append_req req;
    fill_req(&req, "later", body);
    brk_append_res res;
    assert_int_equal(brk_store_append(s, &req, &res), BRK_FAILED);
    req.sync = true;
    assert_int_equal(brk_store_append(s, &req, &res), BRK_FAILED);
    assert_int_equal(brk_store_flush(s), BRK_FAILED);
    if (!strstr(brk_store_errstr(s), "fdatasync"))
        fail_msg("errstr does not mention fdatasync: \"%s\"", brk_store_errstr(s));
    /* The failed sync was not retried behind the caller's back. */
    assert_int_equal(brk_sim_fail_next(sim, BRK_SIM_OP_SYNC, EIO, 0), BRK_OK);
    assert_int_equal(brk_store_append(s, &req, &res), BRK_FAILED);

    /* Power loss, reopen: every acknowledged append is still there. */
    brk_sim_set_crash_after(sim, 0);
    brk_store_close(s);
    assert_int_equal(brk_sim_crash(sim, BRK_SIM_DROP_ALL), BRK_OK);
    s = open_store("/s", &o);
    for (int i = 0; i < FF_THREADS; i++) {
        uint16_t q;
        assert_int_equal(brk_topic_queue_for_key(s, TOPIC, w[i].key,
                                                 strlen(w[i].key), &q), BRK_OK);
        uint64_t min, max;
        assert_int_equal(brk_store_queue_range(s, TOPIC, q, &min, &max), BRK_OK);
        /* Acks are in queue order per thread; the last one is enough to
         * find (it can only be durable if the ones before it are), but
         * check the first and the last. */
        if (w[i].nacks > 0) {
            assert_true(acked_id_present(&w[i].acks[0], s, q));
            assert_true(acked_id_present(&w[i].acks[w[i].nacks - 1], s, q));
        }
        free(w[i].acks);
    }
    assert_int_equal(brk_store_close(s), BRK_OK);
    brk_sim_close(sim);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(concurrent_sync_appenders_share_fdatasyncs,
                                        tmpdir_setup, tmpdir_teardown),
        cmocka_unit_test_setup_teardown(sync_append_in_async_mode_is_durable_on_return,
                                        tmpdir_setup, tmpdir_teardown),
        cmocka_unit_test(sync_append_in_async_mode_survives_power_loss),
        cmocka_unit_test(fdatasync_covers_only_records_appended_before_it),
        cmocka_unit_test(deferred_append_returns_before_its_batchs_fdatasync),
        cmocka_unit_test(fsync_failure_fails_every_waiter_and_sticks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
