/*
 * store.c - the commit log: open/close, segments, topics, the background
 * thread and stats.
 *
 * Commit-log segments, "<dir>/log/<base offset, 20 digits>": a segment is a
 * plain concatenation of records (format: top of record.c).  Log offsets are
 * byte positions in one endless log; segment k+1 starts exactly where
 * segment k ends, so a record is found by its offset alone and a record
 * never straddles two files.  A segment is sealed when the next record
 * would take it past segment_bytes.  Sealing costs no fdatasync on the
 * append path: the sealed segment waits in `unsynced` for the next group
 * commit, which syncs it (and the log directory) before anything after it
 * counts as durable, so durability is always a prefix of the log.
 *
 * Appends, write combining and group commit: store_append.c.  Reads:
 * store_read.c.  Cursors and retention: store_retention.c.
 *
 * Visibility: in SYNC mode readers see a record only once it is durable, so
 * a consumer never processes a message a crash could take back (its queue
 * offset would be reused by another message).  In ASYNC mode records are
 * visible once written (in the page cache).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "broker/crc32c.h"
#include "store_priv.h"

/* ---- small helpers ---------------------------------------------------------- */

void brk_store_opts_init(brk_store_opts *o)
{
    memset(o, 0, sizeof *o);
    o->flush_mode = BRK_FLUSH_ASYNC;
    o->flush_interval_ms = 500;
    o->checkpoint_interval_ms = 1000;
    o->segment_bytes = 256u << 20;
    o->cq_entries_per_file = 262144;
    o->retention_ms = 72LL * 3600 * 1000;
    o->retention_interval_ms = 10000;
    o->max_body_bytes = 4u << 20;
    o->auto_create_topics = true;
    o->default_queues = BRK_QUEUES_DEFAULT;
    o->verify_segments = 2;
}

static void vseterr(brk_store *s, const char *fmt, va_list ap)
{
    pthread_mutex_lock(&s->err_mu);
    vsnprintf(s->errstr, sizeof s->errstr, fmt, ap);
    pthread_mutex_unlock(&s->err_mu);
}

void brk__seterr(brk_store *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vseterr(s, fmt, ap);
    va_end(ap);
}

void brk__fail(brk_store *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vseterr(s, fmt, ap);
    va_end(ap);
    atomic_store(&s->failed, true);
    /* Wake group-commit waiters so they see the failure. */
    pthread_mutex_lock(&s->fmu);
    pthread_cond_broadcast(&s->fcond);
    for (size_t i = 0; i < s->ndwait; i++)
        pthread_cond_signal(&s->dwait[i]->cv);
    pthread_mutex_unlock(&s->fmu);
}

const char *brk_store_errstr(brk_store *s)
{
    return s->errstr;
}

brk_status brk__errno_status(int neg_errno)
{
    switch (-neg_errno) {
    case 0: return BRK_OK;
    case ENOENT: return BRK_NOTFOUND;
    case EEXIST: return BRK_EXISTS;
    case ENOMEM: return BRK_NOMEM;
    case ENOSPC: case EDQUOT: return BRK_NOSPC;
    case EINVAL: return BRK_INVAL;
    default: return BRK_IO;
    }
}

int64_t brk__now_ms(brk_store *s)
{
    return s->clock->now_ms(s->clock->ctx);
}

const brk_clock *brk_store_clock(brk_store *s)
{
    return s->clock;
}

bool brk_store_auto_create(brk_store *s)
{
    return s->opts.auto_create_topics;
}

brk_flush_mode brk_store_flush_mode(brk_store *s)
{
    return s->opts.flush_mode;
}

static int64_t mono_ms(brk_store *s)
{
    return s->clock->mono_ns(s->clock->ctx) / 1000000;
}

void brk__path(char *out, size_t cap, const char *a, const char *b)
{
    snprintf(out, cap, "%s/%s", a, b);
}

void brk__seg_path(brk_store *s, uint64_t base, const char *suffix,
                   char *out, size_t cap)
{
    snprintf(out, cap, "%s/%020" PRIu64 "%s", s->log_dir, base, suffix);
}

brk_status brk__pread_full(brk_store *s, brk_file *f, void *buf, size_t len,
                           uint64_t off)
{
    size_t got = 0;
    int rc = s->io->pread(s->io, f, buf, len, off, &got);
    if (rc != 0)
        return brk__errno_status(rc);
    return got == len ? BRK_OK : BRK_RANGE;
}

bool brk__u64s_push(brk_u64s *l, uint64_t x)
{
    if (l->n == l->cap) {
        size_t nc = l->cap ? l->cap * 2 : 16;
        uint64_t *nv = realloc(l->v, nc * sizeof *nv);
        if (!nv) {
            l->nomem = true;
            return false;
        }
        l->v = nv;
        l->cap = nc;
    }
    l->v[l->n++] = x;
    return true;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

void brk__u64s_sort(brk_u64s *l)
{
    if (l->n > 1)   /* v is NULL when empty: qsort(NULL, ...) is UB */
        qsort(l->v, l->n, sizeof *l->v, cmp_u64);
}

uint64_t brk__numbered_name(const char *name, const char *suffix)
{
    if (strspn(name, "0123456789") != 20 || strcmp(name + 20, suffix) != 0)
        return UINT64_MAX;
    return strtoull(name, NULL, 10);
}

/* ---- segments ---------------------------------------------------------------- */

brk_seg *brk__seg_get(brk_store *s, uint64_t log_offset)
{
    brk_seg *found = NULL;
    pthread_rwlock_rdlock(&s->seg_lock);
    size_t lo = 0, hi = s->nsegs;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->segs[mid]->base <= log_offset)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo > 0) {
        /* Segments are contiguous, so the last one starting at or below the
         * offset holds it; callers only ask for offsets below the log end. */
        found = s->segs[lo - 1];
        atomic_fetch_add(&found->refs, 1);
    }
    pthread_rwlock_unlock(&s->seg_lock);
    return found;
}

void brk__seg_free(brk_store *s, brk_seg *seg)
{
    if (seg->log)
        s->io->close(s->io, seg->log);
    if (seg->idx)
        s->io->close(s->io, seg->idx);
    free(seg);
}

void brk__seg_put(brk_store *s, brk_seg *seg)
{
    if (seg && atomic_fetch_sub(&seg->refs, 1) == 1)
        brk__seg_free(s, seg);
}

/* Seal the current segment and start a new one at log_end.  mu held.
 * Sealing costs no fdatasync here: the sealed segment joins `unsynced`, and
 * the next group-commit leader syncs it (and the log directory, for the new
 * name) before it declares anything beyond it durable.  Durability stays a
 * prefix of the log, which is what recovery relies on. */
brk_status brk__roll_segment(brk_store *s)
{
    brk_seg *old = s->cur;
    if (old && s->nunsynced == s->unsynced_cap) {
        size_t nc = s->unsynced_cap ? s->unsynced_cap * 2 : 4;
        brk_seg **nu = realloc(s->unsynced, nc * sizeof *nu);
        if (!nu)
            return BRK_NOMEM;
        s->unsynced = nu;
        s->unsynced_cap = nc;
    }
    brk_seg *seg = calloc(1, sizeof *seg);
    if (!seg)
        return BRK_NOMEM;
    seg->base = s->log_end;
    atomic_init(&seg->refs, 1);
    char path[BRK_PATH_MAX];
    brk__seg_path(s, seg->base, "", path, sizeof path);
    int rc = s->io->open(s->io, path, BRK_IO_CREATE | BRK_IO_RDWR, &seg->log);
    if (rc == 0)
        rc = s->io->truncate(s->io, seg->log, 0);   /* a stale file of a cut tail */
    brk_seg **ns = NULL;
    if (rc == 0) {
        pthread_rwlock_wrlock(&s->seg_lock);
        ns = realloc(s->segs, (s->nsegs + 1) * sizeof *ns);
        if (ns) {
            s->segs = ns;
            s->segs[s->nsegs++] = seg;
        }
        pthread_rwlock_unlock(&s->seg_lock);
    }
    if (rc != 0 || !ns) {
        if (rc != 0)
            brk__fail(s, "creating segment %s: %s", path, strerror(-rc));
        brk__seg_free(s, seg);
        return rc ? BRK_FAILED : BRK_NOMEM;
    }
    if (old) {
        atomic_fetch_add(&old->refs, 1);
        s->unsynced[s->nunsynced++] = old;
    }
    s->roll_gen++;
    s->cur = seg;
    return BRK_OK;
}

/* ---- open / close ------------------------------------------------------------- */

static void *bg_main(void *arg);

static brk_status check_opts(const brk_store_opts *o, char *errbuf,
                             size_t errlen)
{
    const char *why = NULL;
    if (o->segment_bytes < 4096)
        why = "segment_bytes must be at least 4096";
    else if (o->cq_entries_per_file < 16)
        why = "cq_entries_per_file must be at least 16";
    else if (o->flush_interval_ms == 0 || o->checkpoint_interval_ms == 0
             || o->retention_interval_ms == 0)
        why = "intervals must be positive";
    else if (o->max_body_bytes == 0 || o->max_body_bytes > BRK_BODY_MAX)
        why = "max_body_bytes must be 1..64 MiB";
    else if (o->default_queues == 0 || o->default_queues > BRK_QUEUES_MAX)
        why = "default_queues must be 1..1024";
    else if (o->flush_mode != BRK_FLUSH_ASYNC && o->flush_mode != BRK_FLUSH_SYNC)
        why = "unknown flush mode";
    if (why && errbuf)
        snprintf(errbuf, errlen, "%s", why);
    return why ? BRK_INVAL : BRK_OK;
}

static void store_free(brk_store *s)
{
    brk__topics_free_all(s);
    for (size_t i = 0; i < s->nsegs; i++)
        brk__seg_put(s, s->segs[i]);
    free(s->segs);
    free(s->idx_tail);
    for (size_t i = 0; i < s->nunsynced; i++)
        brk__seg_put(s, s->unsynced[i]);
    free(s->unsynced);
    free(s->pend);
    free(s->wbuf);
    free(s->dwait);
    for (size_t i = 0; i < s->ncursors; i++)
        free(s->cursors[i].name);
    free(s->cursors);
    brk_uuidgen_close(s->ids);
    if (s->lock)
        s->io->close(s->io, s->lock);
    pthread_mutex_destroy(&s->ckpt_mu);
    pthread_mutex_destroy(&s->mu);
    pthread_rwlock_destroy(&s->seg_lock);
    pthread_mutex_destroy(&s->fmu);
    pthread_cond_destroy(&s->fcond);
    pthread_mutex_destroy(&s->bg_mu);
    pthread_cond_destroy(&s->bg_cond);
    pthread_mutex_destroy(&s->err_mu);
    free(s->dir);
    free(s->log_dir);
    free(s->cq_dir);
    free(s);
}

static char *join(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", a, b);
    return p;
}

brk_status brk_store_open(brk_store **out, const char *dir,
                          const brk_store_opts *opts, char *errbuf,
                          size_t errlen)
{
    *out = NULL;
    if (errbuf && errlen)
        errbuf[0] = '\0';
    brk_store_opts o;
    if (opts)
        o = *opts;
    else
        brk_store_opts_init(&o);
    if (!dir || !*dir) {
        if (errbuf)
            snprintf(errbuf, errlen, "no store directory given");
        return BRK_INVAL;
    }
    brk_status st = check_opts(&o, errbuf, errlen);
    if (st != BRK_OK)
        return st;

    brk_store *s = calloc(1, sizeof *s);
    if (!s)
        return BRK_NOMEM;
    s->opts = o;
    s->io = o.io ? o.io : brk_io_posix();
    s->clock = o.clock ? o.clock : brk_clock_system();
    pthread_mutex_init(&s->ckpt_mu, NULL);
    pthread_mutex_init(&s->mu, NULL);
    pthread_rwlock_init(&s->seg_lock, NULL);
    pthread_mutex_init(&s->fmu, NULL);
    pthread_cond_init(&s->fcond, NULL);
    pthread_mutex_init(&s->bg_mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->bg_cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&s->err_mu, NULL);
    atomic_init(&s->failed, false);
    atomic_init(&s->listener, NULL);
    atomic_init(&s->listener_users, 0);
    atomic_init(&s->durable, 0);
    atomic_init(&s->checkpoints, 0);
    s->dir = strdup(dir);
    s->log_dir = join(dir, "log");
    s->cq_dir = join(dir, "cq");
    if (!s->dir || !s->log_dir || !s->cq_dir) {
        store_free(s);
        return BRK_NOMEM;
    }
    st = brk_uuidgen_open(&s->ids, s->clock, o.uuid_seed);
    if (st != BRK_OK) {
        store_free(s);
        return st;
    }

    /* The store directory's own name must be durable too, or a power loss
     * right after creating it could take the whole store away. */
    char parent[BRK_PATH_MAX];
    snprintf(parent, sizeof parent, "%s", dir);
    char *slash = strrchr(parent, '/');
    if (!slash)
        snprintf(parent, sizeof parent, ".");
    else if (slash == parent)
        parent[1] = '\0';
    else
        *slash = '\0';
    int rc = s->io->mkdir(s->io, s->dir);
    if (rc == 0) rc = s->io->sync_dir(s->io, parent);
    if (rc == 0 && s->io->lock) {
        char lpath[BRK_PATH_MAX];
        brk__path(lpath, sizeof lpath, s->dir, "LOCK");
        rc = s->io->lock(s->io, lpath, &s->lock);
        if (rc == -EAGAIN) {
            if (errbuf)
                snprintf(errbuf, errlen, "store directory %s is in use by "
                         "another process (%s is locked)", dir, lpath);
            store_free(s);
            return BRK_LOCKED;
        }
    }
    if (rc == 0) rc = s->io->mkdir(s->io, s->log_dir);
    if (rc == 0) rc = s->io->mkdir(s->io, s->cq_dir);
    if (rc == 0) rc = s->io->sync_dir(s->io, s->dir);
    if (rc != 0) {
        if (errbuf)
            snprintf(errbuf, errlen, "creating store directory %s: %s", dir,
                     strerror(-rc));
        store_free(s);
        return brk__errno_status(rc);
    }

    st = brk__recover(s, errbuf, errlen);
    if (st == BRK_OK && !s->cur)
        st = brk__roll_segment(s);
    if (st == BRK_OK) {
        /* Names created by this or an earlier process (a crash may have
         * left a segment's name unsynced) are made durable now: later
         * group commits only sync the directory after a roll. */
        rc = s->io->sync_dir(s->io, s->log_dir);
        if (rc != 0) {
            brk__seterr(s, "syncing %s: %s", s->log_dir, strerror(-rc));
            st = brk__errno_status(rc);
        }
        s->dir_synced_gen = s->roll_gen;
    }
    if (st == BRK_OK) {
        int64_t now = mono_ms(s);
        s->last_flush_ms = s->last_ckpt_ms = s->last_retention_ms = now;
        st = brk_store_checkpoint(s);
    }
    if (st != BRK_OK) {
        if (errbuf && !errbuf[0])
            snprintf(errbuf, errlen, "%s", s->errstr[0] ? s->errstr
                                                        : brk_strerror(st));
        store_free(s);
        return st;
    }
    s->errstr[0] = '\0';
    if (!o.no_background) {
        if (pthread_create(&s->bg, NULL, bg_main, s) != 0) {
            if (errbuf)
                snprintf(errbuf, errlen, "cannot start the flush thread");
            store_free(s);
            return BRK_NOMEM;
        }
        s->bg_running = true;
    }
    *out = s;
    return BRK_OK;
}

brk_status brk_store_close(brk_store *s)
{
    if (!s)
        return BRK_OK;
    if (s->bg_running) {
        pthread_mutex_lock(&s->bg_mu);
        s->bg_stop = true;
        pthread_cond_signal(&s->bg_cond);
        pthread_mutex_unlock(&s->bg_mu);
        pthread_join(s->bg, NULL);   /* outside every store lock */
        s->bg_running = false;
    }
    brk_status st = BRK_OK;
    if (!atomic_load(&s->failed))
        st = brk_store_checkpoint(s);
    else
        st = BRK_FAILED;
    store_free(s);
    return st;
}

/* ---- topics ------------------------------------------------------------------ */

bool brk__topic_name_ok(const char *name, bool internal)
{
    size_t len = name ? strlen(name) : 0;
    /* '.' would make "." and ".." directory names under cq/. */
    return len > 0 && name[0] != '.' && brk_topic_name_valid(name, len, internal);
}

brk_status brk_topic_create(brk_store *s, const char *topic, uint16_t queues)
{
    if (!brk__topic_name_ok(topic, true)) {
        brk__seterr(s, "invalid topic name");
        return BRK_INVAL;
    }
    if (queues == 0)
        queues = s->opts.default_queues;
    if (queues > BRK_QUEUES_MAX) {
        brk__seterr(s, "queue count %u is over the maximum of %d",
                    (unsigned)queues, BRK_QUEUES_MAX);
        return BRK_INVAL;
    }
    if (atomic_load(&s->failed))
        return BRK_FAILED;
    pthread_mutex_lock(&s->mu);
    brk_status st = BRK_EXISTS;
    brk_topic *t = NULL;
    if (!brk__topic_find(s, topic))
        st = brk__topic_new(s, topic, queues, &t);
    pthread_mutex_unlock(&s->mu);
    return st;
}

static bool topic_never_written(const brk_topic *t)
{
    for (uint16_t q = 0; q < t->nqueues; q++)
        if (t->queues[q].next != 0)
            return false;
    return true;
}

brk_status brk_topic_resize(brk_store *s, const char *topic, uint16_t n,
                            bool *created)
{
    if (created)
        *created = false;
    if (!brk__topic_name_ok(topic, true)) {
        brk__seterr(s, "invalid topic name");
        return BRK_INVAL;
    }
    if (n == 0 || n > BRK_QUEUES_MAX) {
        brk__seterr(s, "queue count must be 1..%d", BRK_QUEUES_MAX);
        return BRK_INVAL;
    }
    if (atomic_load(&s->failed))
        return BRK_FAILED;
    pthread_mutex_lock(&s->mu);
    brk_status st = BRK_OK;
    brk_topic *t = brk__topic_find(s, topic);
    if (!t) {
        st = brk__topic_new(s, topic, n, &t);
        if (st == BRK_OK && created)
            *created = true;
        pthread_mutex_unlock(&s->mu);
        return st;
    }
    uint16_t old_slots[BRK_KEY_SLOTS];
    memcpy(old_slots, t->slots, sizeof old_slots);
    uint16_t old_n = t->nqueues, old_w = t->writable;
    if (n > t->nqueues) {
        brk_queue *nq = realloc(t->queues, n * sizeof *nq);
        if (!nq) {
            pthread_mutex_unlock(&s->mu);
            return BRK_NOMEM;
        }
        memset(nq + t->nqueues, 0, (n - t->nqueues) * sizeof *nq);
        t->queues = nq;
        t->nqueues = n;
    }
    bool empty = topic_never_written(t);
    t->writable = n;
    for (unsigned k = 0; k < BRK_KEY_SLOTS; k++) {
        if (empty)
            t->slots[k] = (uint16_t)(k % n);
        else if (t->slots[k] >= n)
            t->slots[k] = (uint16_t)(k % n);
    }
    st = brk__topics_save(s);
    if (st != BRK_OK) {
        memcpy(t->slots, old_slots, sizeof old_slots);
        t->writable = old_w;
        t->nqueues = old_n;   /* extra array slots stay allocated, unused */
    }
    pthread_mutex_unlock(&s->mu);
    return st;
}

/* mu held. */
static void topic_info(brk_store *s, const brk_topic *t, brk_topic_info *out)
{
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "%s", t->name);
    out->queues = t->nqueues;
    out->writable = t->writable;
    out->created_ms = t->created_ms;
    for (uint16_t q = 0; q < t->nqueues; q++) {
        uint64_t max = brk__visible_next(s, &t->queues[q]);
        if (max > t->queues[q].min)
            out->messages += max - t->queues[q].min;
    }
}

brk_status brk_topic_get(brk_store *s, const char *topic, brk_topic_info *out)
{
    pthread_mutex_lock(&s->mu);
    brk_topic *t = topic ? brk__topic_find(s, topic) : NULL;
    if (t)
        topic_info(s, t, out);
    pthread_mutex_unlock(&s->mu);
    return t ? BRK_OK : BRK_NOTFOUND;
}

brk_status brk_topic_list(brk_store *s, bool include_internal,
                          brk_topic_info **out, size_t *count)
{
    *out = NULL;
    *count = 0;
    pthread_mutex_lock(&s->mu);
    brk_topic_info *v = malloc((s->ntopics ? s->ntopics : 1) * sizeof *v);
    if (!v) {
        pthread_mutex_unlock(&s->mu);
        return BRK_NOMEM;
    }
    size_t n = 0;
    for (size_t i = 0; i < s->ntopics; i++) {
        if (!include_internal && strncmp(s->topics[i]->name, "__", 2) == 0)
            continue;
        topic_info(s, s->topics[i], &v[n++]);
    }
    pthread_mutex_unlock(&s->mu);
    *out = v;
    *count = n;
    return BRK_OK;
}

uint16_t brk__slot_queue(const brk_topic *t, const void *key, size_t len)
{
    return t->slots[brk_crc32c(0, key, len) % BRK_KEY_SLOTS];
}

brk_status brk_topic_queue_for_key(brk_store *s, const char *topic,
                                   const void *key, size_t key_len,
                                   uint16_t *queue)
{
    pthread_mutex_lock(&s->mu);
    brk_topic *t = topic ? brk__topic_find(s, topic) : NULL;
    if (t)
        *queue = brk__slot_queue(t, key, key_len);
    pthread_mutex_unlock(&s->mu);
    return t ? BRK_OK : BRK_NOTFOUND;
}

/* ---- background duties ---------------------------------------------------------- */

brk_status brk_store_tick(brk_store *s)
{
    brk_status st = BRK_OK, r;
    int64_t now = mono_ms(s);
    if (s->opts.flush_mode == BRK_FLUSH_ASYNC
        && now - s->last_flush_ms >= (int64_t)s->opts.flush_interval_ms) {
        s->last_flush_ms = now;
        if ((r = brk_store_flush(s)) != BRK_OK) st = r;
    }
    if (now - s->last_ckpt_ms >= (int64_t)s->opts.checkpoint_interval_ms) {
        s->last_ckpt_ms = now;
        if ((r = brk_store_checkpoint(s)) != BRK_OK && st == BRK_OK) st = r;
    }
    if (now - s->last_retention_ms >= (int64_t)s->opts.retention_interval_ms) {
        s->last_retention_ms = now;
        if ((r = brk_store_retention_run(s, NULL)) != BRK_OK && st == BRK_OK)
            st = r;
    }
    return st;
}

static void *bg_main(void *arg)
{
    brk_store *s = arg;
    uint32_t step = s->opts.flush_interval_ms;
    if (s->opts.flush_mode == BRK_FLUSH_SYNC || s->opts.checkpoint_interval_ms < step)
        step = s->opts.checkpoint_interval_ms;
    if (step > 100)
        step = 100;   /* wake often enough that each duty runs close to time */
    pthread_mutex_lock(&s->bg_mu);
    while (!s->bg_stop) {
        pthread_mutex_unlock(&s->bg_mu);
        if (!atomic_load(&s->failed))
            (void)brk_store_tick(s);   /* errors are sticky and on errstr */
        pthread_mutex_lock(&s->bg_mu);
        if (s->bg_stop)
            break;
        /* The only real-time wait in the store: it paces the thread and
         * never decides an outcome, so it need not go through brk_clock. */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += (long)step * 1000000L;
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        pthread_cond_timedwait(&s->bg_cond, &s->bg_mu, &ts);
    }
    pthread_mutex_unlock(&s->bg_mu);
    return NULL;
}

/* ---- stats --------------------------------------------------------------------------- */

void brk_store_get_stats(brk_store *s, brk_store_stats *out)
{
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&s->mu);
    out->log_start = s->log_start;
    out->log_end = s->log_end;
    out->disk_bytes = s->disk_bytes;
    out->appends = s->appends;
    pthread_mutex_unlock(&s->mu);
    pthread_rwlock_rdlock(&s->seg_lock);
    out->segments = s->nsegs;
    pthread_rwlock_unlock(&s->seg_lock);
    pthread_mutex_lock(&s->fmu);
    out->durable_offset = atomic_load(&s->durable);
    out->fsyncs = s->fsyncs;
    out->fsync_records = s->fsync_records;
    out->fsync_ns_total = s->fsync_ns;
    memcpy(out->fsync_hist, s->fsync_hist, sizeof out->fsync_hist);
    pthread_mutex_unlock(&s->fmu);
    out->checkpoints = atomic_load(&s->checkpoints);
    out->recovered_records = s->recovered_records;
    out->truncated_bytes = s->truncated_bytes;
    out->failed = atomic_load(&s->failed);
}

uint64_t brk_store_log_end(brk_store *s)
{
    pthread_mutex_lock(&s->mu);
    uint64_t end = s->log_end;
    pthread_mutex_unlock(&s->mu);
    return end;
}

/* Bucket bounds of the fdatasync histogram: a 1-2.5-5 ladder from 100 us to
 * 1 s, the range between a fast NVMe flush and a stalled disk. */
static const uint64_t fsync_bounds_us[BRK_FSYNC_BUCKETS - 1] = {
    100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000,
    1000000
};

uint64_t brk_fsync_bucket_us(unsigned i)
{
    return i < BRK_FSYNC_BUCKETS - 1 ? fsync_bounds_us[i] : UINT64_MAX;
}

unsigned brk__fsync_bucket(uint64_t ns)
{
    unsigned i = 0;
    while (i < BRK_FSYNC_BUCKETS - 1 && ns > fsync_bounds_us[i] * 1000)
        i++;
    return i;
}
