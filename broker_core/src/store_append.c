/*
 * store_append.c - appends: write combining, group commit, ENOSPC rollback,
 * flush and checkpoint.
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
 *      Appenders that asked for defer_sync are woken right after the write,
 *      before that fdatasync; and a writer that is itself deferred does not
 *      lead it: the batch's SYNC appenders then wait on their own.
 *      Finally it wakes the appenders it served.  Others sleep on their own
 *      condition variable, so an appender sleeps once and a batch wakes
 *      only whom it concerns.
 * A write that fails with ENOSPC cuts the log back to the failed record
 * (rollback_to), and that append and everything assigned after it report
 * NOSPC; the store stays usable.  Any other write error is sticky.
 *
 * Group commit (after PostgreSQL's XLogFlush): a caller whose record is not
 * yet durable either becomes the leader (nobody is flushing) or sleeps on
 * its own condition variable.  The leader reads the written end,
 * fdatasyncs the segments sealed since the last round, the log directory
 * when a segment was created, and the newest segment, then publishes the
 * new durable offset; everything written before it read the written end is
 * covered, so one fdatasync serves every follower.  It wakes the followers
 * it covered and one it did not, to lead the next round.
 *
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "store_priv.h"

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

/* The listener pointer is used between listener_get and listener_put;
 * brk_store_set_listener waits until no such use of the old one remains
 * (both sides are sequentially consistent: either a user's increment comes
 * first and the setter waits for it, or its load comes after the store and
 * sees the new pointer). */
static const brk_store_listener *listener_get(brk_store *s)
{
    atomic_fetch_add(&s->listener_users, 1);
    return atomic_load(&s->listener);
}

static void listener_put(brk_store *s)
{
    atomic_fetch_sub(&s->listener_users, 1);
}

static brk_status wait_durable(brk_store *s, uint64_t target)
{
    brk_dwaiter me;
    bool cv_ready = false;
    uint64_t published = 0;     /* the durable offset this call published */
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
            published = upto;
            s->fsyncs++;
            s->fsync_records += appends - s->durable_appends;
            s->fsync_ns += (uint64_t)(t1 - t0);
            s->fsync_hist[brk__fsync_bucket((uint64_t)(t1 - t0))]++;
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
    if (published) {
        const brk_store_listener *l = listener_get(s);
        if (l && l->durable)
            l->durable(l->ctx, published);
        listener_put(s);
    }
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
        *out = brk__slot_queue(t, req->key.ptr, req->key.len);
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
static void write_pending(brk_store *s, brk_pending *self)
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
    /* Who makes the batch durable: the writer, so a SYNC appender sleeps
     * once (not once for the write and again for the fdatasync) -- unless
     * the writer itself appended with defer_sync and must not wait.  Then
     * the SYNC appenders of the batch wait on their own (wait_after), and
     * share one fdatasync through wait_durable's leader/follower. */
    bool lead = true;
    if (need_sync && self && !self->sync)
        for (size_t k = 0; k < done && lead; k++)
            lead = batch[k] != self;
    if (need_sync) {
        /* Deferred appenders were promised only the write: release them
         * before the fdatasync.  Each returns at once and its brk_pending
         * (on its stack) is gone, so forget the pointer. */
        for (size_t k = 0; k < done; k++)
            if (!batch[k]->sync && batch[k] != self) {
                batch[k]->st = BRK_OK;
                batch[k]->done = true;
                pthread_cond_signal(&batch[k]->cv);
                batch[k] = NULL;
            }
    }
    if (need_sync && lead) {
        /* Appends arriving meanwhile gather for the next batch. */
        uint64_t end = s->written_end;
        pthread_mutex_unlock(&s->mu);
        fst = wait_durable(s, end);
        pthread_mutex_lock(&s->mu);
    }
    for (size_t k = 0; k < done; k++) {
        if (!batch[k])
            continue;
        batch[k]->st = batch[k]->sync && lead ? fst : BRK_OK;
        batch[k]->wait_after = batch[k]->sync && !lead;
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
        if (batch[k])
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
    if (!req || !res || !brk__topic_name_ok(req->topic, req->allow_internal)) {
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
    if (!req->allow_internal && brk_props_has_sys(req->props)) {
        brk__seterr(s, "property names starting with 0x1F are reserved");
        return BRK_INVAL;
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
        st = brk__roll_segment(s);
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
        p.sync = s->opts.flush_mode == BRK_FLUSH_SYNC && !req->defer_sync;
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
                write_pending(s, &p);
            else
                pthread_cond_wait(&p.cv, &s->mu);
        }
        st = p.st;
        pthread_cond_destroy(&p.cv);
    }
    pthread_mutex_unlock(&s->mu);
    free(buf);
    if (st == BRK_OK && ((!p.sync && req->sync) || p.wait_after))
        st = wait_durable(s, p.log_offset + p.len);
    if (st == BRK_OK) {
        const brk_store_listener *l = listener_get(s);
        if (l && l->appended)
            l->appended(l->ctx, req->topic, res->queue, res->log_offset);
        listener_put(s);
    }
    return st;   /* with p.sync, the writer made it durable before done */
}

void brk_store_set_listener(brk_store *s, const brk_store_listener *l)
{
    atomic_store(&s->listener, l);
    /* Callbacks of the previous listener may be running: wait them out, so
     * its owner may free it on return.  They are short (see store.h). */
    while (atomic_load(&s->listener_users) > 0)
        sched_yield();
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
