/*
 * store_recover.c - what brk_store_open does before the store takes writes.
 *
 *   1. Load the topic table and the checkpoint C (state files).
 *   2. List the segments; each must end exactly where the next begins.
 *      Sealed segments are fdatasync'ed lazily, by the first group commit
 *      after the roll, so above C a short segment followed by another is a
 *      torn tail: the later segments were never durable and are removed.
 *      Below C a hole is damage: CORRUPT.
 *   3. Open every consume queue and index file and cut them back to C: what
 *      lies below C was fdatasync'ed before C was written; anything above may
 *      be a torn write.
 *   4. Scan records from min(C, start of the newest opts.verify_segments
 *      segments) to the end,
 *      checking each CRC.  Below C a bad record is corruption: refuse to open
 *      (or, with opts.repair, cut the log there).  At or above C it is the
 *      torn tail a crash leaves: the log is cut there, later segments
 *      included.  Records at or above C are re-dispatched into the consume
 *      queues and the index; since a record carries its queue offset, this
 *      is idempotent.
 *   5. fdatasync the newest segment (bytes a killed process left in the page
 *      cache become durable), then brk_store_open writes a new checkpoint.
 *
 * Invariant after recovery: every consume-queue and index entry points at a
 * complete record with a valid CRC, queue offsets are dense, and the durable
 * offset equals the log end.
 *
 * Bit rot above the checkpoint (at most checkpoint_interval_ms of appends)
 * cannot be told from a torn write and is cut like one; below it, it is
 * reported (and the newest segment is verified whole at every open).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "le.h"
#include "store_priv.h"

typedef struct seg_names {
    brk_u64s segs;            /* <base> segment files */
    brk_u64s idx;             /* <base>.idx index files */
} seg_names;

static int collect_segments(void *arg, const char *name)
{
    seg_names *l = arg;
    uint64_t n = brk__numbered_name(name, "");
    if (n != UINT64_MAX)
        return !brk__u64s_push(&l->segs, n);
    n = brk__numbered_name(name, ".idx");
    if (n != UINT64_MAX)
        return !brk__u64s_push(&l->idx, n);
    return 0;
}

static brk_status fail_open(brk_store *s, char *errbuf, size_t errlen,
                            brk_status st, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static brk_status fail_open(brk_store *s, char *errbuf, size_t errlen,
                            brk_status st, const char *fmt, ...)
{
    char msg[BRK_ERRSTR_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    brk__seterr(s, "%s", msg);
    if (errbuf && errlen)
        snprintf(errbuf, errlen, "%s", msg);
    return st;
}

/* Remove segment i and everything after it from the array and the disk
 * (repair only). */
static brk_status drop_segments_from(brk_store *s, size_t i)
{
    while (s->nsegs > i) {
        brk_seg *seg = s->segs[--s->nsegs];
        char path[BRK_PATH_MAX];
        brk__seg_path(s, seg->base, "", path, sizeof path);
        int rc = s->io->unlink(s->io, path);
        brk__seg_path(s, seg->base, ".idx", path, sizeof path);
        (void)s->io->unlink(s->io, path);
        brk__seg_put(s, seg);
        if (rc != 0 && rc != -ENOENT)
            return brk__errno_status(rc);
    }
    int rc = s->io->sync_dir(s->io, s->log_dir);
    return rc ? brk__errno_status(rc) : BRK_OK;
}

static brk_status cut_indexes(brk_store *s, uint64_t below)
{
    brk_status st = BRK_OK;
    for (size_t i = 0; i < s->ntopics && st == BRK_OK; i++)
        for (uint16_t q = 0; q < s->topics[i]->nqueues && st == BRK_OK; q++)
            st = brk__cq_trim(s, s->topics[i], q, below);
    for (size_t i = 0; i < s->nsegs && st == BRK_OK; i++) {
        if (s->segs[i]->idx)
            s->disk_bytes -= s->segs[i]->idx_count * BRK_IDX_ENTRY_LEN;
        st = brk__idx_trim(s, s->segs[i], below);
    }
    return st;
}

/* Newest store time of a sealed segment, from its last indexed record. */
static void seg_age_from_index(brk_store *s, brk_seg *seg)
{
    if (!seg->idx || seg->idx_count == 0)
        return;
    uint8_t e[BRK_IDX_ENTRY_LEN];
    if (brk__pread_full(s, seg->idx, e, sizeof e,
                        (seg->idx_count - 1) * BRK_IDX_ENTRY_LEN) != BRK_OK)
        return;
    uint64_t off = brk_ld64(e + BRK_UUID_LEN);
    uint8_t hdr[BRK_REC_HEADER_LEN];
    if (off < seg->base
        || brk__pread_full(s, seg->log, hdr, sizeof hdr, off - seg->base)
               != BRK_OK)
        return;
    seg->max_store_ms = (int64_t)brk_ld64(hdr + 40);   /* store_ms, record.c */
}

static brk_status dispatch(brk_store *s, const brk_record *r, uint64_t pos,
                           uint32_t len, char *errbuf, size_t errlen)
{
    char name[BRK_TOPIC_MAX + 1];
    memcpy(name, r->topic.ptr, r->topic.len);
    name[r->topic.len] = '\0';
    brk_topic *t = brk__topic_find(s, name);
    if (!t || r->queue >= t->nqueues)
        return fail_open(s, errbuf, errlen, BRK_CORRUPT,
                         "record at log offset %" PRIu64 " names topic %s "
                         "queue %u, which the topic table does not have",
                         pos, name, (unsigned)r->queue);
    brk_queue *q = &t->queues[r->queue];
    if (r->queue_offset != q->next)
        return fail_open(s, errbuf, errlen, BRK_CORRUPT,
                         "record at log offset %" PRIu64 " has queue offset "
                         "%" PRIu64 " in %s/%u, expected %" PRIu64,
                         pos, r->queue_offset, name, (unsigned)r->queue,
                         q->next);
    brk_cq_entry e = { pos, len, brk_tag_hash(r->tag.ptr, r->tag.len) };
    brk_status st = brk__cq_push(s, q, &e);
    if (st == BRK_OK)
        st = brk__idx_push(s, r->msg_id, pos);
    s->recovered_records++;
    return st;
}

typedef struct scan_buf {
    uint8_t *p;
    size_t cap;
    uint64_t off;     /* file offset of p[0] */
    size_t len;       /* valid bytes */
} scan_buf;

/* Make at least `want` bytes from file offset `at` available (fewer at EOF). */
static brk_status scan_fill(brk_store *s, brk_seg *seg, scan_buf *b,
                            uint64_t at, size_t want, uint64_t fsize)
{
    if (at >= b->off && at + want <= b->off + b->len)
        return BRK_OK;
    size_t need = want < (1u << 20) ? (1u << 20) : want;
    if (need > b->cap) {
        uint8_t *np = realloc(b->p, need);
        if (!np)
            return BRK_NOMEM;
        b->p = np;
        b->cap = need;
    }
    uint64_t n = fsize - at < b->cap ? fsize - at : b->cap;
    size_t got = 0;
    int rc = s->io->pread(s->io, seg->log, b->p, (size_t)n, at, &got);
    if (rc != 0)
        return brk__errno_status(rc);
    b->off = at;
    b->len = got;
    return BRK_OK;
}

brk_status brk__recover(brk_store *s, char *errbuf, size_t errlen)
{
    brk_status st = brk__topics_load(s);
    if (st != BRK_OK)
        return fail_open(s, errbuf, errlen, st, "%s", s->errstr);
    uint64_t ckpt = 0;
    bool have_ckpt = false;
    st = brk__ckpt_load(s, &ckpt, &have_ckpt);
    if (st != BRK_OK)
        return fail_open(s, errbuf, errlen, st, "%s", s->errstr);
    s->errstr[0] = '\0';

    seg_names l = {0};
    int rc = s->io->list(s->io, s->log_dir, collect_segments, &l);
    if (rc != 0 || l.segs.nomem || l.idx.nomem) {
        free(l.segs.v);
        free(l.idx.v);
        return fail_open(s, errbuf, errlen, rc ? brk__errno_status(rc) : BRK_NOMEM,
                         "listing %s: %s", s->log_dir,
                         rc ? strerror(-rc) : "out of memory");
    }
    brk__u64s_sort(&l.segs);

    /* Open segments and check they follow on. */
    st = BRK_OK;
    s->segs = calloc(l.segs.n ? l.segs.n : 1, sizeof *s->segs);
    if (!s->segs)
        st = BRK_NOMEM;
    for (size_t i = 0; i < l.segs.n && st == BRK_OK; i++) {
        brk_seg *seg = calloc(1, sizeof *seg);
        if (!seg) { st = BRK_NOMEM; break; }
        seg->base = l.segs.v[i];
        atomic_init(&seg->refs, 1);
        char path[BRK_PATH_MAX];
        brk__seg_path(s, seg->base, "", path, sizeof path);
        rc = s->io->open(s->io, path, BRK_IO_RDWR, &seg->log);
        if (rc == 0)
            rc = s->io->size(s->io, seg->log, &seg->size);
        if (rc != 0) {
            brk__seg_free(s, seg);
            st = fail_open(s, errbuf, errlen, brk__errno_status(rc),
                           "opening segment %s: %s", path, strerror(-rc));
            break;
        }
        s->segs[s->nsegs++] = seg;
        if (i > 0) {
            brk_seg *prev = s->segs[i - 1];
            uint64_t prev_end = prev->base + prev->size;
            if (prev_end != seg->base) {
                /* A sealed segment is synced lazily (by the next group
                 * commit), so above the checkpoint its tail may be lost
                 * while the next file exists: a torn tail like any other.
                 * Nothing after it was durable, so it all goes. */
                uint64_t low = prev_end < seg->base ? prev_end : seg->base;
                if (low < ckpt && !s->opts.repair) {
                    st = fail_open(s, errbuf, errlen, BRK_CORRUPT,
                                   "segment %020" PRIu64 " holds %" PRIu64
                                   " bytes but the next segment starts at %"
                                   PRIu64 ": the log has a hole below the "
                                   "checkpoint (open with repair to cut it "
                                   "there)", prev->base, prev->size,
                                   seg->base);
                    break;
                }
                s->nsegs--;
                brk__seg_put(s, seg);
                for (size_t j = i; j < l.segs.n; j++) {
                    brk__seg_path(s, l.segs.v[j], "", path, sizeof path);
                    (void)s->io->unlink(s->io, path);
                    brk__seg_path(s, l.segs.v[j], ".idx", path, sizeof path);
                    (void)s->io->unlink(s->io, path);
                }
                rc = s->io->sync_dir(s->io, s->log_dir);
                if (rc != 0)
                    st = fail_open(s, errbuf, errlen, brk__errno_status(rc),
                                   "syncing %s: %s", s->log_dir,
                                   strerror(-rc));
                break;
            }
        }
    }
    /* Index files whose segment is gone (retention stopped half-way). */
    for (size_t i = 0; i < l.idx.n && st == BRK_OK; i++) {
        bool known = false;
        for (size_t j = 0; j < s->nsegs && !known; j++)
            known = s->segs[j]->base == l.idx.v[i];
        if (!known) {
            char path[BRK_PATH_MAX];
            brk__seg_path(s, l.idx.v[i], ".idx", path, sizeof path);
            (void)s->io->unlink(s->io, path);
        }
    }
    free(l.segs.v);
    free(l.idx.v);
    if (st != BRK_OK)
        return st;

    uint64_t log_start = s->nsegs ? s->segs[0]->base : 0;
    uint64_t log_end = s->nsegs ? s->segs[s->nsegs - 1]->base
                                      + s->segs[s->nsegs - 1]->size
                                : 0;
    if (have_ckpt && ckpt > log_end) {
        if (!s->opts.repair)
            return fail_open(s, errbuf, errlen, BRK_CORRUPT,
                             "the checkpoint says the log was durable up to "
                             "offset %" PRIu64 " but it ends at %" PRIu64
                             ": synced data is missing", ckpt, log_end);
        ckpt = log_end;
    }
    if (ckpt < log_start)
        ckpt = log_start;
    s->log_start = log_start;

    /* Consume queues and indexes: open, then cut back to the checkpoint. */
    for (size_t i = 0; i < s->ntopics && st == BRK_OK; i++)
        for (uint16_t q = 0; q < s->topics[i]->nqueues && st == BRK_OK; q++)
            st = brk__cq_open_queue(s, s->topics[i], q);
    if (st == BRK_OK)
        st = cut_indexes(s, ckpt);
    for (size_t i = 0; i < s->ntopics && st == BRK_OK; i++)
        for (uint16_t q = 0; q < s->topics[i]->nqueues && st == BRK_OK; q++)
            st = brk__cq_drop_below(s, s->topics[i], q, log_start);
    if (st != BRK_OK)
        return fail_open(s, errbuf, errlen, st, "%s", s->errstr);
    for (size_t i = 0; i < s->nsegs; i++)
        seg_age_from_index(s, s->segs[i]);

    /* Scan and re-dispatch. */
    uint64_t from = ckpt;
    if (s->nsegs) {
        /* Verify the newest segments whole (by default the two a crash can
         * have touched); older records are verified as they are read. */
        size_t v = s->opts.verify_segments;
        size_t first = v == 0 || v >= s->nsegs ? 0 : s->nsegs - v;
        if (s->segs[first]->base < from)
            from = s->segs[first]->base;
    }
    scan_buf b = {0};
    size_t si = 0;
    while (si < s->nsegs && s->segs[si]->base + s->segs[si]->size <= from
           && si + 1 < s->nsegs)
        si++;
    uint64_t pos = from;
    for (; si < s->nsegs && st == BRK_OK; si++) {
        brk_seg *seg = s->segs[si];
        bool newest = si + 1 == s->nsegs;
        uint64_t fsize = seg->size;
        if (pos < seg->base)
            pos = seg->base;
        b.len = 0;
        while (pos < seg->base + fsize) {
            uint64_t at = pos - seg->base;
            st = scan_fill(s, seg, &b, at, BRK_REC_HEADER_LEN, fsize);
            if (st != BRK_OK)
                break;
            size_t avail = (size_t)(b.off + b.len - at);
            uint32_t want = brk_record_peek_len(b.p + (at - b.off), avail);
            if (want > avail && want <= BRK_REC_MAX
                && at + want <= fsize) {
                st = scan_fill(s, seg, &b, at, want, fsize);
                if (st != BRK_OK)
                    break;
                avail = (size_t)(b.off + b.len - at);
            }
            brk_record r;
            size_t len = 0;
            brk_status d = brk_record_decode(b.p + (at - b.off), avail, pos,
                                             &r, &len);
            if (d == BRK_OK) {
                if (r.store_ms > seg->max_store_ms)
                    seg->max_store_ms = r.store_ms;
                if (pos >= ckpt) {
                    st = dispatch(s, &r, pos, (uint32_t)len, errbuf, errlen);
                    seg->records++;
                }
                pos += len;
                continue;
            }
            /* A bad or incomplete record at pos.  At or above the
             * checkpoint it is the torn tail a crash leaves (in the newest
             * segment, or in a sealed one whose lazy fdatasync never ran):
             * nothing from here on was durable.  Below it, it is damage. */
            bool torn = pos >= ckpt;
            if (!torn && !s->opts.repair) {
                st = fail_open(s, errbuf, errlen, BRK_CORRUPT,
                               "corrupt record in segment %s/%020" PRIu64
                               " at log offset %" PRIu64 ", below the "
                               "checkpoint at %" PRIu64 "; open with repair "
                               "to cut the log there",
                               s->log_dir, seg->base, pos, ckpt);
                break;
            }
            if (!torn) {
                st = cut_indexes(s, pos);
                ckpt = pos;
            }
            if (st == BRK_OK && !newest) {
                for (size_t k = si + 1; k < s->nsegs; k++)
                    s->truncated_bytes += s->segs[k]->size;
                st = drop_segments_from(s, si + 1);
            }
            if (st != BRK_OK)
                break;
            rc = s->io->truncate(s->io, seg->log, pos - seg->base);
            if (rc == 0)
                rc = s->io->sync(s->io, seg->log);
            if (rc != 0) {
                st = fail_open(s, errbuf, errlen, brk__errno_status(rc),
                               "cutting the torn tail of segment %020" PRIu64
                               ": %s", seg->base, strerror(-rc));
                break;
            }
            s->truncated_bytes += seg->base + fsize - pos;
            seg->size = pos - seg->base;
            break;
        }
    }
    free(b.p);
    if (st != BRK_OK)
        return st;

    if (s->nsegs) {
        brk_seg *last = s->segs[s->nsegs - 1];
        s->cur = last;
        s->log_end = last->base + last->size;
        rc = s->io->sync(s->io, last->log);
        if (rc != 0)
            return fail_open(s, errbuf, errlen, brk__errno_status(rc),
                             "fdatasync of segment %020" PRIu64 ": %s",
                             last->base, strerror(-rc));
    } else {
        s->log_end = 0;
    }
    for (size_t i = 0; i < s->nsegs; i++)
        s->disk_bytes += s->segs[i]->size;
    s->written_end = s->log_end;
    atomic_store(&s->durable, s->log_end);
    s->ckpt_offset = have_ckpt ? ckpt : UINT64_MAX;
    return BRK_OK;
}
