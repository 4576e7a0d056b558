/*
 * store_read.c - reading the store: queue ranges, consume-queue entries,
 * message batches, reads by log offset and lookup by message id (from a
 * log offset on).
 *
 * Readers hold mu only to copy consume-queue entries; records are read
 * with pread after taking a reference on their segment, so retention can
 * unlink a segment under a reader without harm.  Every record is checked
 * (CRC, framing, stored log offset) before it is handed out.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store_priv.h"

#define BATCH_BYTES_MAX (16u << 20)   /* one read returns at most this much */

/* ---- reads ---------------------------------------------------------------------- */

/* Readers see records below this offset: written ones, and in SYNC mode
 * only durable ones.  mu held. */
uint64_t brk__visible_end(brk_store *s)
{
    return s->opts.flush_mode == BRK_FLUSH_SYNC ? atomic_load(&s->durable)
                                                : s->written_end;
}

/* The highest queue offset readers may see.  mu held. */
uint64_t brk__visible_next(brk_store *s, const brk_queue *q)
{
    uint64_t durable = brk__visible_end(s);
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
        *max = brk__visible_next(s, &t->queues[queue]);
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
        uint64_t vmax = brk__visible_next(s, q);
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
    uint64_t end = brk__visible_end(s);
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
    return brk_store_lookup_since(s, id, 0, out);
}

brk_status brk_store_lookup_since(brk_store *s, const uint8_t id[BRK_UUID_LEN],
                                  uint64_t since, brk_batch **out)
{
    *out = NULL;
    /* Segments are contiguous: segment i ends where segment i+1 begins, so
     * the ones that end at or before `since` are left out here already. */
    pthread_rwlock_rdlock(&s->seg_lock);
    size_t first = 0, n = s->nsegs;
    while (first + 1 < n && s->segs[first + 1]->base <= since)
        first++;
    size_t k = n - first;
    brk_seg **segs = malloc((k ? k : 1) * sizeof *segs);
    if (segs)
        for (size_t i = 0; i < k; i++) {
            segs[i] = s->segs[first + i];
            atomic_fetch_add(&segs[i]->refs, 1);
        }
    pthread_rwlock_unlock(&s->seg_lock);
    if (!segs)
        return BRK_NOMEM;
    brk_status st = BRK_NOTFOUND;
    for (size_t i = k; i-- > 0 && st == BRK_NOTFOUND;) {
        uint64_t off;
        if (brk__idx_search(s, segs[i], id, since, &off))
            st = brk_store_read_at(s, off, out);
    }
    for (size_t i = 0; i < k; i++)
        brk__seg_put(s, segs[i]);
    free(segs);
    return st;
}

brk_status brk_store_queue_seek(brk_store *s, const char *topic,
                                uint16_t queue, uint64_t from,
                                uint64_t log_offset, uint64_t *out)
{
    uint64_t min, max;
    brk_status st = brk_store_queue_range(s, topic, queue, &min, &max);
    if (st != BRK_OK)
        return st;
    uint64_t lo = from < min ? min : from > max ? max : from, hi = max;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2, first = mid;
        brk_cq_entry e;
        size_t n = 0;
        st = brk_store_read_entries(s, topic, queue, mid, &e, 1, &n, &first);
        if (st != BRK_OK)
            return st;
        if (n == 0 || first != mid) {
            /* Retention moved the queue start past mid meanwhile. */
            lo = n == 0 ? hi : first;
            continue;
        }
        if (e.log_offset < log_offset)
            lo = mid + 1;
        else
            hi = mid;
    }
    *out = lo;
    return BRK_OK;
}
