/*
 * store.c - the commit log: open/close, append with group commit, reads,
 * checkpoints, retention and the background thread.
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
 * Append, in three steps so that no lock is held across a system call:
 *   1. Outside any lock: encode the record and checksum its body.
 *   2. Under mu: pick the queue, assign the log offset and queue offset,
 *      finish the CRC over the 36 header bytes that depend on them, push the
 *      consume-queue and index entries to their memory tails, and put the
 *      record on the pending list.
 *   3. Write combining: an appender that finds nobody writing becomes the
 *      writer: it takes the whole list, drops mu,
 *      writes each segment's run with one pwrite, retakes mu and advances
 *      written_end.  In SYNC mode the writer then leads the group commit for
 *      its batch (an ASYNC store's req->sync appender waits on its own).
 *      Finally it wakes the appenders it served.  Others sleep on their own
 *      condition variable, so an appender sleeps once and a batch wakes
 *      only whom it concerns.
 * A write that fails with ENOSPC cuts the log back to the failed record
 * (rollback_to), and that append and everything assigned after it report
 * NOSPC; the store stays usable.  Any other write error is sticky.
 *
 * Group commit (after PostgreSQL's XLogFlush): a waiter whose record is not
 * yet durable either becomes the leader (nobody is flushing) or sleeps.  The
 * leader reads the current log end, fdatasyncs the newest segment once and
 * publishes the new durable offset; everything appended before it read the
 * log end is covered, so one fdatasync serves every follower.  Followers
 * recheck after waking: if the leader's flush did not reach them, one of
 * them leads the next round.
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

#define BATCH_BYTES_MAX (16u << 20)   /* one read returns at most this much */

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
static brk_status roll_segment(brk_store *s)
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
        st = roll_segment(s);
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

static bool topic_name_ok(const char *name, bool internal)
{
    size_t len = name ? strlen(name) : 0;
    /* '.' would make "." and ".." directory names under cq/. */
    return len > 0 && name[0] != '.' && brk_topic_name_valid(name, len, internal);
}

brk_status brk_topic_create(brk_store *s, const char *topic, uint16_t queues)
{
    if (!topic_name_ok(topic, true)) {
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
    if (!topic_name_ok(topic, true)) {
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

static uint64_t visible_next(brk_store *s, const brk_queue *q);

/* mu held. */
static void topic_info(brk_store *s, const brk_topic *t, brk_topic_info *out)
{
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "%s", t->name);
    out->queues = t->nqueues;
    out->writable = t->writable;
    out->created_ms = t->created_ms;
    for (uint16_t q = 0; q < t->nqueues; q++) {
        uint64_t max = visible_next(s, &t->queues[q]);
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

static uint16_t slot_queue(const brk_topic *t, const void *key, size_t len)
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
        *queue = slot_queue(t, key, key_len);
    pthread_mutex_unlock(&s->mu);
    return t ? BRK_OK : BRK_NOTFOUND;
}

/* ---- append and flush --------------------------------------------------------- */

/* Wait until everything below `target` is durable, leading a group flush
 * when nobody else is.  See the top of the file. */
/* fmu held.  Take `w` off the follower list if it is on it. */
static void dwait_remove(brk_store *s, brk_dwaiter *w)
{
    for (size_t i = 0; i < s->ndwait; i++)
        if (s->dwait[i] == w) {
            s->dwait[i] = s->dwait[--s->ndwait];
            return;
        }
}

/* fmu held, after a flush round: wake the followers it covered, and one
 * that it did not, to lead the next round.  Waking only these (not every
 * follower, as a broadcast would) is what keeps 64 appenders from spending
 * their CPU on futile wake-ups. */
static void dwait_wake(brk_store *s)
{
    uint64_t durable = atomic_load(&s->durable);
    bool failed = atomic_load(&s->failed);
    brk_dwaiter *next = NULL;
    size_t keep = 0;
    for (size_t i = 0; i < s->ndwait; i++) {
        brk_dwaiter *w = s->dwait[i];
        if (failed || w->target <= durable) {
            pthread_cond_signal(&w->cv);
        } else {
            if (!next || w->target < next->target)
                next = w;
            s->dwait[keep++] = w;
        }
    }
    s->ndwait = keep;
    if (next)
        pthread_cond_signal(&next->cv);
}

static brk_status wait_durable(brk_store *s, uint64_t target)
{
    brk_dwaiter me;
    bool cv_ready = false;
    me.target = target;
    pthread_mutex_lock(&s->fmu);
    while (atomic_load(&s->durable) < target) {
        if (atomic_load(&s->failed))
            break;
        if (s->flushing) {
            if (!cv_ready) {
                pthread_cond_init(&me.cv, NULL);
                cv_ready = true;
            }
            if (s->ndwait == s->dwait_cap) {
                size_t nc = s->dwait_cap ? s->dwait_cap * 2 : 64;
                brk_dwaiter **nw = realloc(s->dwait, nc * sizeof *nw);
                if (!nw) {
                    /* No room on the list: wait the simple way. */
                    pthread_cond_wait(&s->fcond, &s->fmu);
                    continue;
                }
                s->dwait = nw;
                s->dwait_cap = nc;
            }
            s->dwait[s->ndwait++] = &me;
            pthread_cond_wait(&me.cv, &s->fmu);
            dwait_remove(s, &me);
            continue;
        }
        s->flushing = true;
        pthread_mutex_unlock(&s->fmu);

        if (s->opts.group_commit_delay_us)
            usleep(s->opts.group_commit_delay_us);
        /* Snapshot what to make durable: everything written so far, which
         * may span sealed segments not yet synced. */
        pthread_mutex_lock(&s->mu);
        uint64_t upto = s->written_end, appends = s->appends;
        uint64_t gen = s->roll_gen;
        bool dir = s->roll_gen != s->dir_synced_gen;
        size_t nseal = s->nunsynced;
        brk_seg *stack[8];
        brk_seg **seal = nseal <= 8 ? stack : malloc(nseal * sizeof *seal);
        if (!seal)
            nseal = 0;   /* retried by the next round */
        for (size_t i = 0; i < nseal; i++) {
            seal[i] = s->unsynced[i];
            atomic_fetch_add(&seal[i]->refs, 1);
        }
        brk_seg *seg = s->cur;
        if (seg)
            atomic_fetch_add(&seg->refs, 1);
        pthread_mutex_unlock(&s->mu);

        int64_t t0 = s->clock->mono_ns(s->clock->ctx);
        int rc = 0;
        uint64_t bad = 0;
        for (size_t i = 0; i < nseal && rc == 0; i++)
            if ((rc = s->io->sync(s->io, seal[i]->log)) != 0)
                bad = seal[i]->base;
        if (rc == 0 && dir)
            rc = s->io->sync_dir(s->io, s->log_dir);
        if (rc == 0 && seg && (rc = s->io->sync(s->io, seg->log)) != 0)
            bad = seg->base;
        int64_t t1 = s->clock->mono_ns(s->clock->ctx);
        if (rc != 0)
            brk__fail(s, "fdatasync of log segment %020" PRIu64 " failed: %s; "
                      "the store refuses writes until reopened",
                      bad, strerror(-rc));
        pthread_mutex_lock(&s->mu);
        if (rc == 0) {
            /* The synced seals are the first nseal entries: rolls append. */
            if (nseal > 0) {
                for (size_t i = 0; i < nseal; i++)
                    brk__seg_put(s, s->unsynced[i]);
                memmove(s->unsynced, s->unsynced + nseal,
                        (s->nunsynced - nseal) * sizeof *s->unsynced);
                s->nunsynced -= nseal;
            }
            if (dir)
                s->dir_synced_gen = gen;
        }
        pthread_mutex_unlock(&s->mu);
        for (size_t i = 0; i < nseal; i++)
            brk__seg_put(s, seal[i]);
        if (seal != stack)
            free(seal);
        brk__seg_put(s, seg);

        pthread_mutex_lock(&s->fmu);
        s->flushing = false;
        if (rc == 0 && upto > atomic_load(&s->durable)) {
            s->fsyncs++;
            s->fsync_records += appends - s->durable_appends;
            s->fsync_ns += (uint64_t)(t1 - t0);
            s->durable_appends = appends;
            atomic_store(&s->durable, upto);
        }
        pthread_cond_broadcast(&s->fcond);   /* waiters without list room */
        dwait_wake(s);
    }
    bool ok = atomic_load(&s->durable) >= target;
    pthread_mutex_unlock(&s->fmu);
    if (cv_ready)
        pthread_cond_destroy(&me.cv);
    return ok ? BRK_OK : BRK_FAILED;
}

static brk_status pick_queue(brk_store *s, brk_topic *t,
                             const brk_append_req *req, uint16_t *out)
{
    if (req->queue >= 0) {
        if (req->queue >= t->nqueues) {
            brk__seterr(s, "topic %s has no queue %d", t->name, req->queue);
            return BRK_RANGE;
        }
        if (req->queue >= t->writable) {
            brk__seterr(s, "queue %d of topic %s was removed by a shrink",
                        req->queue, t->name);
            return BRK_READONLY;
        }
        *out = (uint16_t)req->queue;
    } else if (req->key.len > 0) {
        *out = slot_queue(t, req->key.ptr, req->key.len);
    } else {
        *out = (uint16_t)(t->rr++ % t->writable);
    }
    return BRK_OK;
}

/* Cut the log back to `at` after a write failed with ENOSPC: every record
 * at or beyond it (the failed one and all assigned after it) is removed
 * from the queues, the index tail and the segments, as if never appended.
 * Returns false when the files could not be cut (the caller goes sticky).
 * mu held; no writer is active. */
static bool rollback_to(brk_store *s, uint64_t at)
{
    for (size_t i = 0; i < s->ntopics; i++)
        for (uint16_t qi = 0; qi < s->topics[i]->nqueues; qi++) {
            brk_queue *q = &s->topics[i]->queues[qi];
            /* Unwritten entries are never written out (the checkpoint only
             * takes entries below the durable offset), so all are in the
             * memory tail, at its end. */
            while (q->next > q->file_next
                   && q->tail[q->next - q->file_next - 1].log_offset >= at)
                brk__cq_pop(q);
        }
    while (s->idx_tail_len > 0
           && s->idx_tail[s->idx_tail_len - 1].log_offset >= at)
        s->idx_tail_len--;
    s->disk_bytes -= s->log_end - at;
    s->log_end = at;

    /* Segments created for the removed records go; the one holding `at`
     * becomes current again, cut to length. */
    bool ok = true;
    pthread_rwlock_wrlock(&s->seg_lock);
    while (s->nsegs > 1 && s->segs[s->nsegs - 1]->base > at) {
        brk_seg *seg = s->segs[--s->nsegs];
        char path[BRK_PATH_MAX];
        brk__seg_path(s, seg->base, "", path, sizeof path);
        if (s->io->unlink(s->io, path) != 0)
            ok = false;
        brk__seg_put(s, seg);
    }
    brk_seg *cur = s->segs[s->nsegs - 1];
    pthread_rwlock_unlock(&s->seg_lock);
    /* Removed segments are not sealed any more, nor is the current one. */
    size_t keep = 0;
    for (size_t i = 0; i < s->nunsynced; i++) {
        brk_seg *u = s->unsynced[i];
        if (u == cur || u->base > at)
            brk__seg_put(s, u);
        else
            s->unsynced[keep++] = u;
    }
    s->nunsynced = keep;
    s->cur = cur;
    cur->size = at - cur->base;
    if (s->io->truncate(s->io, cur->log, cur->size) != 0)
        ok = false;
    return ok;
}

/* Write every pending record, in log order, with mu dropped meanwhile.
 * Records are staged into one buffer per run of a segment so a batch costs
 * one pwrite, however many appenders it serves.  mu held on entry and exit;
 * called only when no writer is active. */
static void write_pending(brk_store *s)
{
    s->writing = true;
    size_t n = s->npend;
    brk_pending **batch = malloc(n * sizeof *batch);
    if (!batch) {
        /* Write this one alone rather than fail: no memory, no batching. */
        n = 1;
    }
    brk_pending *one[1];
    if (!batch)
        batch = one;
    memcpy(batch, s->pend, n * sizeof *batch);
    memmove(s->pend, s->pend + n, (s->npend - n) * sizeof *s->pend);
    s->npend -= n;
    pthread_mutex_unlock(&s->mu);

    size_t i = 0, done = 0;
    int rc = 0;
    while (i < n && rc == 0) {
        /* A run of records of one segment, at most ~1 MiB unless a single
         * record is larger. */
        size_t j = i, bytes = 0;
        while (j < n && batch[j]->seg == batch[i]->seg
               && (j == i || bytes + batch[j]->len <= (1u << 20)))
            bytes += batch[j++]->len;
        const void *src = batch[i]->buf;
        if (j - i > 1) {
            if (bytes > s->wbuf_cap) {
                uint8_t *nb = realloc(s->wbuf, bytes);
                if (nb) {
                    s->wbuf = nb;
                    s->wbuf_cap = bytes;
                } else {
                    j = i + 1;          /* no staging memory: one at a time */
                    bytes = batch[i]->len;
                }
            }
            if (j - i > 1) {
                size_t at = 0;
                for (size_t k = i; k < j; k++) {
                    memcpy(s->wbuf + at, batch[k]->buf, batch[k]->len);
                    at += batch[k]->len;
                }
                src = s->wbuf;
            }
        }
        brk_seg *seg = batch[i]->seg;
        rc = s->io->pwrite(s->io, seg->log, src, bytes,
                           batch[i]->log_offset - seg->base);
        if (rc == 0) {
            done = j;
            i = j;
        }
    }

    pthread_mutex_lock(&s->mu);
    brk_status fst = BRK_OK;
    bool need_sync = false;
    if (done > 0) {
        s->written_end = batch[done - 1]->log_offset + batch[done - 1]->len;
        s->appends += done;
        for (size_t k = 0; k < done && !need_sync; k++)
            need_sync = batch[k]->sync;
    }
    if (need_sync) {
        /* The writer also leads the group commit for its batch, so a SYNC
         * appender sleeps once (not once for the write and again for the
         * fdatasync).  Appends arriving meanwhile gather for the next batch. */
        uint64_t end = s->written_end;
        pthread_mutex_unlock(&s->mu);
        fst = wait_durable(s, end);
        pthread_mutex_lock(&s->mu);
    }
    for (size_t k = 0; k < done; k++) {
        batch[k]->st = batch[k]->sync ? fst : BRK_OK;
        batch[k]->done = true;
    }
    if (rc != 0) {
        /* Everything from the failed record on fails: the rest of this
         * batch and whatever was assigned meanwhile. */
        uint64_t at = batch[done]->log_offset;
        brk_status st;
        if ((rc == -ENOSPC || rc == -EDQUOT) && rollback_to(s, at)) {
            brk__seterr(s, "no space left on device writing the log at "
                        "offset %" PRIu64, at);
            st = BRK_NOSPC;
        } else {
            brk__fail(s, "writing the log at offset %" PRIu64 " failed: %s; "
                      "the store refuses writes until reopened", at,
                      strerror(-rc));
            st = brk__errno_status(rc);
            if (st == BRK_NOSPC)
                st = BRK_FAILED;   /* and the cut failed too */
        }
        for (size_t k = done; k < n; k++) {
            batch[k]->st = st;
            batch[k]->done = true;
        }
        for (size_t k = 0; k < s->npend; k++) {
            s->pend[k]->st = st;
            s->pend[k]->done = true;
            pthread_cond_signal(&s->pend[k]->cv);
        }
        s->npend = 0;
    }
    for (size_t k = 0; k < n; k++)
        pthread_cond_signal(&batch[k]->cv);
    s->writing = false;
    if (s->npend > 0)
        pthread_cond_signal(&s->pend[0]->cv);   /* the next writer */
    if (batch != one)
        free(batch);
}

brk_status brk_store_append(brk_store *s, const brk_append_req *req,
                            brk_append_res *res)
{
    if (!req || !res || !topic_name_ok(req->topic, req->allow_internal)) {
        brk__seterr(s, "invalid topic name");
        return BRK_INVAL;
    }
    if (req->queue < -1) {
        brk__seterr(s, "invalid queue %d", req->queue);
        return BRK_INVAL;
    }
    if (req->body.len > s->opts.max_body_bytes) {
        brk__seterr(s, "body of %zu bytes is over the limit of %u",
                    req->body.len, s->opts.max_body_bytes);
        return BRK_TOOBIG;
    }
    if (atomic_load(&s->failed))
        return BRK_FAILED;

    brk_record r;
    memset(&r, 0, sizeof r);
    r.type = req->type ? req->type : BRK_REC_MSG;
    r.flags = req->flags;
    r.born_ms = req->born_ms ? req->born_ms : brk__now_ms(s);
    if (req->msg_id)
        memcpy(r.msg_id, req->msg_id, BRK_UUID_LEN);
    else
        brk_uuidgen_next(s->ids, r.msg_id);
    r.topic.ptr = req->topic;
    r.topic.len = strlen(req->topic);
    r.key = req->key;
    r.tag = req->tag;
    r.props = req->props;
    r.body = req->body;
    size_t len = brk_record_size(&r);
    if (len == 0) {
        brk__seterr(s, "a field is over its limit (key %d, tag %d, "
                    "headers %d bytes)", BRK_KEY_MAX, BRK_TAG_MAX,
                    BRK_PROPS_MAX);
        return BRK_TOOBIG;
    }
    uint8_t *buf = malloc(len);
    if (!buf)
        return BRK_NOMEM;
    size_t got = 0;
    uint32_t tail_crc = 0;
    brk_status st = brk_record_encode_unsealed(&r, buf, len, &got, &tail_crc);
    if (st != BRK_OK) {
        free(buf);
        brk__seterr(s, "record rejected: %s", brk_strerror(st));
        return st;
    }
    uint64_t tag_hash = brk_tag_hash(req->tag.ptr, req->tag.len);

    brk_pending p;
    memset(&p, 0, sizeof p);
    pthread_mutex_lock(&s->mu);
    brk_topic *t = brk__topic_find(s, req->topic);
    uint16_t qid = 0;
    /* Every check that can refuse the append comes before auto-creating the
     * topic, so a refused append leaves no topic behind. */
    if (atomic_load(&s->failed)) {
        st = BRK_FAILED;
    } else if (!t && !s->opts.auto_create_topics) {
        brk__seterr(s, "unknown topic %s", req->topic);
        st = BRK_NOTFOUND;
    } else if (!t && req->queue >= (int32_t)s->opts.default_queues) {
        brk__seterr(s, "topic %s would be created with %u queues; there is "
                    "no queue %d", req->topic,
                    (unsigned)s->opts.default_queues, req->queue);
        st = BRK_RANGE;
    } else if (s->opts.disk_budget_bytes
               && s->disk_bytes + len + BRK_CQ_ENTRY_LEN + BRK_IDX_ENTRY_LEN
                      > s->opts.disk_budget_bytes) {
        brk__seterr(s, "store full: %" PRIu64 " of %" PRIu64 " budget bytes "
                    "used", s->disk_bytes, s->opts.disk_budget_bytes);
        st = BRK_FULL;
    } else if (!t) {
        st = brk__topic_new(s, req->topic, s->opts.default_queues, &t);
    }
    if (st == BRK_OK)
        st = pick_queue(s, t, req, &qid);
    if (st == BRK_OK && s->cur->size > 0
        && s->cur->size + len > s->opts.segment_bytes)
        st = roll_segment(s);
    brk_queue *q = st == BRK_OK ? &t->queues[qid] : NULL;
    if (st == BRK_OK) {
        /* Assign the record its place: from here on it is part of the log
         * (invisible to readers until written, see visible_end). */
        brk_cq_entry e = { s->log_end, (uint32_t)len, tag_hash };
        st = brk__cq_push(s, q, &e);
        if (st == BRK_OK && (st = brk__idx_push(s, r.msg_id, s->log_end))
                                != BRK_OK)
            brk__cq_pop(q);
        if (st == BRK_OK && s->npend == s->pend_cap) {
            size_t nc = s->pend_cap ? s->pend_cap * 2 : 64;
            brk_pending **np = realloc(s->pend, nc * sizeof *np);
            if (np) {
                s->pend = np;
                s->pend_cap = nc;
            } else {
                brk__cq_pop(q);
                s->idx_tail_len--;
                st = BRK_NOMEM;
            }
        }
    }
    if (st == BRK_OK) {
        int64_t now = brk__now_ms(s);
        brk_record_patch(buf, qid, s->log_end, q->next - 1, now, tail_crc);
        p.buf = buf;
        p.len = (uint32_t)len;
        p.log_offset = s->log_end;
        p.seg = s->cur;
        /* In SYNC mode the writer makes the batch durable; an ASYNC store's
         * occasional req->sync waits on its own below, so that the other
         * appenders' writes never queue behind its fdatasync. */
        p.sync = s->opts.flush_mode == BRK_FLUSH_SYNC;
        pthread_cond_init(&p.cv, NULL);
        s->pend[s->npend++] = &p;
        res->queue = qid;
        res->queue_offset = q->next - 1;
        res->log_offset = s->log_end;
        res->store_ms = now;
        memcpy(res->msg_id, r.msg_id, BRK_UUID_LEN);
        s->cur->size += len;
        s->cur->records++;
        if (now > s->cur->max_store_ms)
            s->cur->max_store_ms = now;
        s->log_end += len;
        s->disk_bytes += len;

        /* Wait until a writer has written it; become the writer whenever
         * nobody is writing.  Any appender may take the role, not only the
         * head of the list: a thread already on the CPU writing the batch
         * beats waiting for a woken one to be scheduled (on few cores that
         * wait is most of an append's cost). */
        while (!p.done) {
            if (!s->writing)
                write_pending(s);
            else
                pthread_cond_wait(&p.cv, &s->mu);
        }
        st = p.st;
        pthread_cond_destroy(&p.cv);
    }
    pthread_mutex_unlock(&s->mu);
    free(buf);
    if (st == BRK_OK && !p.sync && req->sync)
        st = wait_durable(s, p.log_offset + p.len);
    return st;   /* with p.sync, the writer made it durable before done */
}

brk_status brk_store_flush(brk_store *s)
{
    if (atomic_load(&s->failed))
        return BRK_FAILED;
    pthread_mutex_lock(&s->mu);
    uint64_t target = s->written_end;
    pthread_mutex_unlock(&s->mu);
    return wait_durable(s, target);
}

brk_status brk_store_checkpoint(brk_store *s)
{
    pthread_mutex_lock(&s->ckpt_mu);
    brk_status st = brk_store_flush(s);
    uint64_t below = atomic_load(&s->durable);
    brk_file **files = NULL;
    size_t nfiles = 0, capfiles = 0;
    if (st == BRK_OK && below != s->ckpt_offset) {
        pthread_mutex_lock(&s->mu);
        for (size_t i = 0; i < s->ntopics && st == BRK_OK; i++)
            for (uint16_t q = 0; q < s->topics[i]->nqueues && st == BRK_OK; q++)
                st = brk__cq_writeout(s, s->topics[i], q, below, &files,
                                      &nfiles, &capfiles);
        if (st == BRK_OK)
            st = brk__idx_writeout(s, below);
        /* Collect index files to sync; segments stay alive: retention also
         * runs under ckpt_mu. */
        pthread_rwlock_rdlock(&s->seg_lock);
        for (size_t i = 0; i < s->nsegs && st == BRK_OK; i++) {
            brk_seg *seg = s->segs[i];
            if (!seg->idx_dirty)
                continue;
            seg->idx_dirty = false;
            if (nfiles == capfiles) {
                size_t nc = capfiles ? capfiles * 2 : 16;
                brk_file **nf = realloc(files, nc * sizeof *nf);
                if (!nf) { st = BRK_NOMEM; break; }
                files = nf;
                capfiles = nc;
            }
            files[nfiles++] = seg->idx;
        }
        pthread_rwlock_unlock(&s->seg_lock);
        pthread_mutex_unlock(&s->mu);
        for (size_t i = 0; i < nfiles && st == BRK_OK; i++) {
            int rc = s->io->sync(s->io, files[i]);
            if (rc != 0) {
                brk__fail(s, "fdatasync of an index file failed: %s",
                          strerror(-rc));
                st = BRK_FAILED;
            }
        }
        if (st == BRK_OK)
            st = brk__ckpt_save(s, below);
        if (st == BRK_OK) {
            s->ckpt_offset = below;
            atomic_fetch_add(&s->checkpoints, 1);
        }
    }
    free(files);
    pthread_mutex_unlock(&s->ckpt_mu);
    return st;
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

/* ---- reads ---------------------------------------------------------------------- */

/* Readers see records below this offset: written ones, and in SYNC mode
 * only durable ones.  mu held. */
static uint64_t visible_end(brk_store *s)
{
    return s->opts.flush_mode == BRK_FLUSH_SYNC ? atomic_load(&s->durable)
                                                : s->written_end;
}

/* The highest queue offset readers may see.  mu held. */
static uint64_t visible_next(brk_store *s, const brk_queue *q)
{
    uint64_t durable = visible_end(s);
    /* Entries in files are all durable; binary search the memory tail. */
    size_t lo = 0, hi = (size_t)(q->next - q->file_next);
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const brk_cq_entry *e = &q->tail[mid];
        if (e->log_offset + e->size <= durable)
            lo = mid + 1;
        else
            hi = mid;
    }
    return q->file_next + lo;
}

static brk_status find_queue(brk_store *s, const char *topic, uint16_t queue,
                             brk_topic **t)
{
    *t = topic ? brk__topic_find(s, topic) : NULL;
    if (!*t)
        return BRK_NOTFOUND;
    if (queue >= (*t)->nqueues)
        return BRK_RANGE;
    return BRK_OK;
}

brk_status brk_store_queue_range(brk_store *s, const char *topic,
                                 uint16_t queue, uint64_t *min, uint64_t *max)
{
    pthread_mutex_lock(&s->mu);
    brk_topic *t;
    brk_status st = find_queue(s, topic, queue, &t);
    if (st == BRK_OK) {
        *min = t->queues[queue].min;
        *max = visible_next(s, &t->queues[queue]);
        if (*min > *max)
            *min = *max;
    }
    pthread_mutex_unlock(&s->mu);
    return st;
}

brk_status brk_store_read_entries(brk_store *s, const char *topic,
                                  uint16_t queue, uint64_t from,
                                  brk_cq_entry *out, size_t max, size_t *n,
                                  uint64_t *first)
{
    *n = 0;
    pthread_mutex_lock(&s->mu);
    brk_topic *t;
    brk_status st = find_queue(s, topic, queue, &t);
    if (st == BRK_OK) {
        brk_queue *q = &t->queues[queue];
        uint64_t vmax = visible_next(s, q);
        if (from > q->next) {
            st = BRK_RANGE;
        } else {
            if (from < q->min)
                from = q->min;
            if (first)
                *first = from;
            for (uint64_t i = from; i < vmax && *n < max && st == BRK_OK; i++)
                if ((st = brk__cq_get(s, t, queue, i, &out[*n])) == BRK_OK)
                    (*n)++;
        }
    }
    pthread_mutex_unlock(&s->mu);
    return st;
}

void brk_batch_free(brk_batch *b)
{
    if (!b)
        return;
    free(b->priv_);
    free(b->recs);
    free(b);
}

/* Read and verify the record at log_offset of `size` bytes into dst. */
static brk_status read_record(brk_store *s, uint64_t log_offset, uint32_t size,
                              uint8_t *dst, brk_record *rec)
{
    brk_seg *seg = brk__seg_get(s, log_offset);
    if (!seg)
        return BRK_NOTFOUND;     /* removed by retention meanwhile */
    brk_status st = brk__pread_full(s, seg->log, dst, size,
                                    log_offset - seg->base);
    uint64_t base = seg->base;
    brk__seg_put(s, seg);
    if (st != BRK_OK) {
        brk__seterr(s, "reading %u bytes at log offset %" PRIu64 ": %s", size,
                    log_offset, brk_strerror(st));
        return st == BRK_RANGE ? BRK_CORRUPT : st;
    }
    size_t len = 0;
    st = brk_record_decode(dst, size, log_offset, rec, &len);
    if (st != BRK_OK || len != size) {
        brk__seterr(s, "corrupt record in segment %020" PRIu64 " at log offset "
                    "%" PRIu64 " (checksum or framing)", base, log_offset);
        return BRK_CORRUPT;
    }
    return BRK_OK;
}

static brk_status batch_new(size_t n, size_t bytes, brk_batch **out)
{
    brk_batch *b = calloc(1, sizeof *b);
    if (!b)
        return BRK_NOMEM;
    b->recs = calloc(n ? n : 1, sizeof *b->recs);
    b->priv_ = malloc(bytes ? bytes : 1);
    if (!b->recs || !b->priv_) {
        brk_batch_free(b);
        return BRK_NOMEM;
    }
    *out = b;
    return BRK_OK;
}

brk_status brk_store_read(brk_store *s, const char *topic, uint16_t queue,
                          uint64_t from, size_t max, brk_batch **out)
{
    *out = NULL;
    if (max == 0)
        max = 1;
    if (max > 4096)
        max = 4096;
    brk_cq_entry *ents = malloc(max * sizeof *ents);
    if (!ents)
        return BRK_NOMEM;
    size_t n = 0;
    uint64_t first = from;
    brk_status st = brk_store_read_entries(s, topic, queue, from, ents, max,
                                           &n, &first);
    if (st != BRK_OK) {
        free(ents);
        return st;
    }
    size_t bytes = 0, take = 0;
    while (take < n && (take == 0 || bytes + ents[take].size <= BATCH_BYTES_MAX))
        bytes += ents[take++].size;
    brk_batch *b = NULL;
    st = batch_new(take, bytes, &b);
    if (st != BRK_OK) {
        free(ents);
        return st;
    }
    b->first_offset = first;
    b->next_offset = first;
    uint8_t *p = b->priv_;
    for (size_t i = 0; i < take; i++) {
        st = read_record(s, ents[i].log_offset, ents[i].size, p,
                         &b->recs[b->count]);
        if (st == BRK_NOTFOUND) {
            /* Retention took it between the index read and now: skip. */
            b->next_offset = first + i + 1;
            if (b->count == 0)
                b->first_offset = b->next_offset;
            st = BRK_OK;
            continue;
        }
        if (st != BRK_OK)
            break;
        p += ents[i].size;
        b->count++;
        b->next_offset = first + i + 1;
    }
    free(ents);
    if (st != BRK_OK) {
        brk_batch_free(b);
        return st;
    }
    *out = b;
    return BRK_OK;
}

brk_status brk_store_read_at(brk_store *s, uint64_t log_offset,
                             brk_batch **out)
{
    *out = NULL;
    pthread_mutex_lock(&s->mu);
    uint64_t end = visible_end(s);
    uint64_t start = s->log_start;
    pthread_mutex_unlock(&s->mu);
    if (log_offset < start || log_offset + BRK_REC_HEADER_LEN > end)
        return BRK_NOTFOUND;
    brk_seg *seg = brk__seg_get(s, log_offset);
    if (!seg)
        return BRK_NOTFOUND;
    uint8_t hdr[4];
    brk_status st = brk__pread_full(s, seg->log, hdr, 4, log_offset - seg->base);
    brk__seg_put(s, seg);
    if (st != BRK_OK)
        return st == BRK_RANGE ? BRK_NOTFOUND : st;
    uint32_t size = brk_record_peek_len(hdr, 4);
    if (size < BRK_REC_HEADER_LEN || size > BRK_REC_MAX
        || log_offset + size > end)
        return BRK_CORRUPT;
    brk_batch *b = NULL;
    st = batch_new(1, size, &b);
    if (st != BRK_OK)
        return st;
    st = read_record(s, log_offset, size, b->priv_, &b->recs[0]);
    if (st != BRK_OK) {
        brk_batch_free(b);
        return st;
    }
    b->count = 1;
    b->first_offset = b->recs[0].queue_offset;
    b->next_offset = b->first_offset + 1;
    *out = b;
    return BRK_OK;
}

brk_status brk_store_lookup(brk_store *s, const uint8_t id[BRK_UUID_LEN],
                            brk_batch **out)
{
    *out = NULL;
    pthread_rwlock_rdlock(&s->seg_lock);
    size_t n = s->nsegs;
    brk_seg **segs = malloc((n ? n : 1) * sizeof *segs);
    if (segs)
        for (size_t i = 0; i < n; i++) {
            segs[i] = s->segs[i];
            atomic_fetch_add(&segs[i]->refs, 1);
        }
    pthread_rwlock_unlock(&s->seg_lock);
    if (!segs)
        return BRK_NOMEM;
    brk_status st = BRK_NOTFOUND;
    for (size_t i = n; i-- > 0 && st == BRK_NOTFOUND;) {
        uint64_t off;
        if (brk__idx_search(s, segs[i], id, &off))
            st = brk_store_read_at(s, off, out);
    }
    for (size_t i = 0; i < n; i++)
        brk__seg_put(s, segs[i]);
    free(segs);
    return st;
}

/* ---- cursors and retention --------------------------------------------------------- */

brk_status brk_store_cursor_register(brk_store *s, const char *name,
                                     uint32_t *id)
{
    if (!name || !*name)
        return BRK_INVAL;
    pthread_mutex_lock(&s->mu);
    brk_status st = BRK_OK;
    size_t free_slot = SIZE_MAX;
    for (size_t i = 0; i < s->ncursors; i++) {
        if (!s->cursors[i].name) {
            if (free_slot == SIZE_MAX)
                free_slot = i;
        } else if (strcmp(s->cursors[i].name, name) == 0) {
            *id = (uint32_t)i;
            pthread_mutex_unlock(&s->mu);
            return BRK_OK;
        }
    }
    char *copy = strdup(name);
    if (!copy)
        st = BRK_NOMEM;
    if (st == BRK_OK && free_slot == SIZE_MAX) {
        brk_cursor *nc = realloc(s->cursors, (s->ncursors + 1) * sizeof *nc);
        if (!nc) {
            st = BRK_NOMEM;
        } else {
            s->cursors = nc;
            free_slot = s->ncursors++;
        }
    }
    if (st == BRK_OK) {
        s->cursors[free_slot].name = copy;
        s->cursors[free_slot].offset = s->log_start;
        *id = (uint32_t)free_slot;
    } else {
        free(copy);
    }
    pthread_mutex_unlock(&s->mu);
    return st;
}

brk_status brk_store_cursor_set(brk_store *s, uint32_t id, uint64_t log_offset)
{
    pthread_mutex_lock(&s->mu);
    brk_status st = BRK_NOTFOUND;
    if (id < s->ncursors && s->cursors[id].name) {
        s->cursors[id].offset = log_offset;
        st = BRK_OK;
    }
    pthread_mutex_unlock(&s->mu);
    return st;
}

brk_status brk_store_cursor_unregister(brk_store *s, uint32_t id)
{
    pthread_mutex_lock(&s->mu);
    brk_status st = BRK_NOTFOUND;
    if (id < s->ncursors && s->cursors[id].name) {
        free(s->cursors[id].name);
        s->cursors[id].name = NULL;
        st = BRK_OK;
    }
    pthread_mutex_unlock(&s->mu);
    return st;
}

brk_status brk_store_retention_run(brk_store *s, unsigned *deleted)
{
    unsigned count = 0;
    brk_status st = BRK_OK;
    if (deleted)
        *deleted = 0;
    if (s->opts.retention_ms < 0)
        return BRK_OK;
    pthread_mutex_lock(&s->ckpt_mu);
    int64_t now = brk__now_ms(s);
    for (;;) {
        pthread_rwlock_rdlock(&s->seg_lock);
        brk_seg *seg = s->nsegs >= 2 ? s->segs[0] : NULL;
        pthread_rwlock_unlock(&s->seg_lock);
        if (!seg)
            break;
        pthread_mutex_lock(&s->mu);
        uint64_t need = UINT64_MAX;
        for (size_t i = 0; i < s->ncursors; i++)
            if (s->cursors[i].name && s->cursors[i].offset < need)
                need = s->cursors[i].offset;
        uint64_t end = seg->base + seg->size;
        bool old = seg->max_store_ms <= now - s->opts.retention_ms;
        pthread_mutex_unlock(&s->mu);
        /* Only durable segments go: a sealed one awaiting its fdatasync is
         * still in the leader's hands. */
        if (!old || end > need || end > atomic_load(&s->durable))
            break;

        pthread_rwlock_wrlock(&s->seg_lock);
        memmove(s->segs, s->segs + 1, (s->nsegs - 1) * sizeof *s->segs);
        s->nsegs--;
        uint64_t new_start = s->segs[0]->base;
        pthread_rwlock_unlock(&s->seg_lock);

        pthread_mutex_lock(&s->mu);
        s->log_start = new_start;
        uint64_t bytes = seg->size + seg->idx_count * BRK_IDX_ENTRY_LEN;
        s->disk_bytes -= bytes < s->disk_bytes ? bytes : s->disk_bytes;
        for (size_t i = 0; i < s->ntopics && st == BRK_OK; i++)
            for (uint16_t q = 0; q < s->topics[i]->nqueues && st == BRK_OK; q++)
                st = brk__cq_drop_below(s, s->topics[i], q, new_start);
        pthread_mutex_unlock(&s->mu);

        char path[BRK_PATH_MAX];
        brk__seg_path(s, seg->base, "", path, sizeof path);
        int rc = s->io->unlink(s->io, path);
        brk__seg_path(s, seg->base, ".idx", path, sizeof path);
        int rc2 = s->io->unlink(s->io, path);
        if (rc == 0 && (rc2 == 0 || rc2 == -ENOENT))
            rc = s->io->sync_dir(s->io, s->log_dir);
        brk__seg_put(s, seg);
        if (rc != 0 && rc != -ENOENT) {
            brk__seterr(s, "deleting segment: %s", strerror(-rc));
            st = brk__errno_status(rc);
        }
        if (st != BRK_OK)
            break;
        count++;
    }
    pthread_mutex_unlock(&s->ckpt_mu);
    if (deleted)
        *deleted = count;
    return st;
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
    pthread_mutex_unlock(&s->fmu);
    out->checkpoints = atomic_load(&s->checkpoints);
    out->recovered_records = s->recovered_records;
    out->truncated_bytes = s->truncated_bytes;
    out->failed = atomic_load(&s->failed);
}
