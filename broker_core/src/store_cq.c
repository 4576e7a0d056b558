/*
 * store_cq.c - consume queues and the message-id index.
 *
 * Consume queue files, "<dir>/cq/<topic>/<queue>/<first index, 20 digits>":
 * a queue is a dense array of fixed 20-byte entries, entry i describing the
 * record at queue offset i:
 *   0   u64  log offset of the record
 *   8   u32  record size in bytes
 *   12  u64  tag hash (brk_tag_hash; 0 = no tag)
 * little-endian.  The array is cut into files of cq_entries_per_file entries
 * (5 MiB at the default 262144); file k holds entries [k*epf, (k+1)*epf) and
 * is named by its first entry index.  Retention deletes whole files from the
 * front; every file but the last is full.
 *
 * Index files, "<dir>/log/<segment base>.idx": 24-byte entries, one per
 * record of that segment in log order:
 *   0   u8[16] message id
 *   16  u64    log offset of the record
 *
 * Neither is on the durability path: appends put entries in memory tails
 * (brk_queue.tail, brk_store.idx_tail) and the checkpoint writes and
 * fdatasyncs the entries that lie below the durable log offset, then records
 * that offset in the checkpoint file.  Recovery cuts both kinds of file back
 * to the checkpoint and rebuilds the rest from the log, so an entry never
 * points at a record that did not survive.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "le.h"
#include "store_priv.h"


static void cq_encode(uint8_t *p, const brk_cq_entry *e)
{
    brk_st64(p, e->log_offset);
    brk_st32(p + 8, e->size);
    brk_st64(p + 12, e->tag_hash);
}

static void cq_decode(const uint8_t *p, brk_cq_entry *e)
{
    e->log_offset = brk_ld64(p);
    e->size = brk_ld32(p + 8);
    e->tag_hash = brk_ld64(p + 12);
}

static void queue_dir(brk_store *s, const brk_topic *t, uint16_t qid,
                      char *out, size_t cap)
{
    snprintf(out, cap, "%s/%s/%u", s->cq_dir, t->name, (unsigned)qid);
}

static void queue_file(brk_store *s, const brk_topic *t, uint16_t qid,
                       uint64_t fileno, char *out, size_t cap)
{
    snprintf(out, cap, "%s/%s/%u/%020" PRIu64, s->cq_dir, t->name,
             (unsigned)qid, fileno * s->opts.cq_entries_per_file);
}

/* ---- open / close --------------------------------------------------------- */

static int collect_numbers(void *arg, const char *name)
{
    uint64_t n = brk__numbered_name(name, "");
    /* Other names (a stray .tmp, a foreign file) are not ours: ignored. */
    return n != UINT64_MAX && !brk__u64s_push(arg, n);
}

brk_status brk__cq_open_queue(brk_store *s, brk_topic *t, uint16_t qid)
{
    brk_queue *q = &t->queues[qid];
    memset(q, 0, sizeof *q);
    char dir[BRK_PATH_MAX];
    queue_dir(s, t, qid, dir, sizeof dir);
    int ex = s->io->exists(s->io, dir);
    if (ex == 0)
        return BRK_OK;          /* never written out: empty queue */
    if (ex < 0) {
        brk__seterr(s, "checking %s: %s", dir, strerror(-ex));
        return brk__errno_status(ex);
    }
    brk_u64s l = {0};
    int rc = s->io->list(s->io, dir, collect_numbers, &l);
    if (rc != 0 || l.nomem) {
        free(l.v);
        brk__seterr(s, "listing %s: %s", dir, rc ? strerror(-rc) : "no memory");
        return rc ? brk__errno_status(rc) : BRK_NOMEM;
    }
    if (l.n == 0) {
        free(l.v);
        return BRK_OK;
    }
    brk__u64s_sort(&l);
    uint64_t epf = s->opts.cq_entries_per_file;
    brk_status st = BRK_OK;
    size_t keep = l.n;            /* files [keep, n) lie past the end */
    for (size_t i = 0; i < l.n && st == BRK_OK; i++) {
        if (l.v[i] % epf != 0) {
            brk__seterr(s, "consume queue %s: file %020" PRIu64 " does not "
                        "fit cq_entries_per_file %" PRIu64 " (the option "
                        "changed?)", dir, l.v[i], epf);
            st = BRK_CORRUPT;
        } else if (i > 0 && l.v[i] != l.v[i - 1] + epf && keep == l.n) {
            /* A missing file: a crash above the checkpoint removed it (or
             * never let its creation reach the disk) but not the later
             * ones.  Everything from the gap on is past the end, as for a
             * short file below; below the checkpoint, re-dispatch finds
             * the hole. */
            keep = i;
        }
    }
    if (st == BRK_OK) {
        q->files = calloc(l.n, sizeof *q->files);
        if (!q->files)
            st = BRK_NOMEM;
    }
    for (size_t i = 0; i < keep && st == BRK_OK; i++) {
        char path[BRK_PATH_MAX];
        queue_file(s, t, qid, l.v[i] / epf, path, sizeof path);
        rc = s->io->open(s->io, path, BRK_IO_RDWR, &q->files[i]);
        uint64_t size = 0;
        if (rc == 0)
            rc = s->io->size(s->io, q->files[i], &size);
        if (rc != 0) {
            brk__seterr(s, "opening %s: %s", path, strerror(-rc));
            st = brk__errno_status(rc);
            break;
        }
        q->nfiles = i + 1;
        uint64_t n = size / BRK_CQ_ENTRY_LEN;
        if (n > epf)
            n = epf;
        s->disk_bytes += size;
        q->next = l.v[i] + n;
        if (i + 1 < keep && n != epf) {
            /* A short file followed by another: the later writes reached
             * the disk, this one's did not (a crash above the checkpoint).
             * Everything after the short file is past the end: drop it.
             * Were it below the checkpoint, re-dispatch finds the gap. */
            keep = i + 1;
            break;
        }
    }
    /* Remove what lies past the end, newest first, so that a crash in the
     * middle leaves the files that remain contiguous. */
    for (size_t j = l.n; st == BRK_OK && j-- > keep;) {
        char path[BRK_PATH_MAX];
        queue_file(s, t, qid, l.v[j] / epf, path, sizeof path);
        rc = s->io->unlink(s->io, path);
        if (rc != 0 && rc != -ENOENT) {
            brk__seterr(s, "removing %s: %s", path, strerror(-rc));
            st = brk__errno_status(rc);
        }
    }
    if (st == BRK_OK) {
        q->first_file = l.v[0] / epf;
        q->min = l.v[0];
        q->file_next = q->next;
    } else {
        brk__cq_close_queue(s, q);
    }
    free(l.v);
    return st;
}

void brk__cq_close_queue(brk_store *s, brk_queue *q)
{
    for (size_t i = 0; i < q->nfiles; i++)
        if (q->files[i])
            s->io->close(s->io, q->files[i]);
    free(q->files);
    free(q->tail);
    memset(q, 0, sizeof *q);
}

/* ---- entries ---------------------------------------------------------------- */

brk_status brk__cq_push(brk_store *s, brk_queue *q, const brk_cq_entry *e)
{
    (void)s;
    size_t used = (size_t)(q->next - q->file_next);
    if (used == q->tail_cap) {
        size_t nc = q->tail_cap ? q->tail_cap * 2 : 64;
        brk_cq_entry *nt = realloc(q->tail, nc * sizeof *nt);
        if (!nt)
            return BRK_NOMEM;
        q->tail = nt;
        q->tail_cap = nc;
    }
    q->tail[used] = *e;
    q->next++;
    return BRK_OK;
}

void brk__cq_pop(brk_queue *q)
{
    q->next--;   /* the tail slot is simply reused */
}

brk_status brk__cq_get(brk_store *s, brk_topic *t, uint16_t qid,
                       uint64_t index, brk_cq_entry *e)
{
    brk_queue *q = &t->queues[qid];
    if (index < q->min || index >= q->next)
        return BRK_RANGE;
    if (index >= q->file_next) {
        *e = q->tail[index - q->file_next];
        return BRK_OK;
    }
    uint64_t epf = s->opts.cq_entries_per_file;
    uint64_t fileno = index / epf;
    if (fileno < q->first_file || fileno - q->first_file >= q->nfiles
        || !q->files[fileno - q->first_file])
        return BRK_RANGE;
    uint8_t buf[BRK_CQ_ENTRY_LEN];
    brk_status st = brk__pread_full(s, q->files[fileno - q->first_file], buf,
                                    sizeof buf,
                                    (index % epf) * BRK_CQ_ENTRY_LEN);
    if (st != BRK_OK)
        return st;
    cq_decode(buf, e);
    return BRK_OK;
}

/* Make sure the file for `fileno` exists and is open; creates the queue's
 * directories on first use.  New names are made durable at once (sync_dir):
 * it happens once per file, and the checkpoint may rely on them. */
static brk_status cq_file_for(brk_store *s, brk_topic *t, uint16_t qid,
                              uint64_t fileno, brk_file **out)
{
    brk_queue *q = &t->queues[qid];
    if (q->nfiles > 0 && fileno >= q->first_file
        && fileno - q->first_file < q->nfiles
        && q->files[fileno - q->first_file]) {
        *out = q->files[fileno - q->first_file];
        return BRK_OK;
    }
    if (q->nfiles > 0 && fileno != q->first_file + q->nfiles) {
        brk__fail(s, "consume queue %s/%u: file %" PRIu64 " is not next",
                  t->name, (unsigned)qid, fileno);
        return BRK_FAILED;
    }
    char tdir[BRK_PATH_MAX], qdir[BRK_PATH_MAX], path[BRK_PATH_MAX];
    brk__path(tdir, sizeof tdir, s->cq_dir, t->name);
    queue_dir(s, t, qid, qdir, sizeof qdir);
    int rc = 0;
    if (q->nfiles == 0) {
        rc = s->io->mkdir(s->io, tdir);
        if (rc == 0) rc = s->io->sync_dir(s->io, s->cq_dir);
        if (rc == 0) rc = s->io->mkdir(s->io, qdir);
        if (rc == 0) rc = s->io->sync_dir(s->io, tdir);
    }
    brk_file *f = NULL;
    queue_file(s, t, qid, fileno, path, sizeof path);
    if (rc == 0) rc = s->io->open(s->io, path, BRK_IO_CREATE | BRK_IO_RDWR, &f);
    if (rc == 0) rc = s->io->sync_dir(s->io, qdir);
    if (rc != 0) {
        if (f)
            s->io->close(s->io, f);
        brk__fail(s, "creating %s: %s", path, strerror(-rc));
        return brk__errno_status(rc);
    }
    brk_file **nf = realloc(q->files, (q->nfiles + 1) * sizeof *nf);
    if (!nf) {
        s->io->close(s->io, f);
        return BRK_NOMEM;
    }
    q->files = nf;
    if (q->nfiles == 0)
        q->first_file = fileno;
    q->files[q->nfiles++] = f;
    *out = f;
    return BRK_OK;
}

static brk_status add_synced(brk_file ***list, size_t *n, size_t *cap,
                             brk_file *f)
{
    for (size_t i = 0; i < *n; i++)
        if ((*list)[i] == f)
            return BRK_OK;
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 16;
        brk_file **nl = realloc(*list, nc * sizeof *nl);
        if (!nl)
            return BRK_NOMEM;
        *list = nl;
        *cap = nc;
    }
    (*list)[(*n)++] = f;
    return BRK_OK;
}

brk_status brk__cq_writeout(brk_store *s, brk_topic *t, uint16_t qid,
                            uint64_t below, brk_file ***synced,
                            size_t *nsynced, size_t *capsynced)
{
    brk_queue *q = &t->queues[qid];
    size_t pending = (size_t)(q->next - q->file_next), n = 0;
    while (n < pending && q->tail[n].log_offset < below)
        n++;
    if (n == 0)
        return BRK_OK;
    uint64_t epf = s->opts.cq_entries_per_file;
    uint8_t buf[BRK_CQ_ENTRY_LEN * 256];
    size_t done = 0;
    while (done < n) {
        uint64_t index = q->file_next + done;
        uint64_t fileno = index / epf;
        size_t room = (size_t)(epf - index % epf);
        size_t chunk = n - done;
        if (chunk > room) chunk = room;
        if (chunk > 256) chunk = 256;
        for (size_t i = 0; i < chunk; i++)
            cq_encode(buf + i * BRK_CQ_ENTRY_LEN, &q->tail[done + i]);
        brk_file *f = NULL;
        brk_status st = cq_file_for(s, t, qid, fileno, &f);
        if (st != BRK_OK)
            return st;
        int rc = s->io->pwrite(s->io, f, buf, chunk * BRK_CQ_ENTRY_LEN,
                               (index % epf) * BRK_CQ_ENTRY_LEN);
        if (rc != 0) {
            brk__fail(s, "writing consume queue %s/%u: %s", t->name,
                      (unsigned)qid, strerror(-rc));
            return brk__errno_status(rc);
        }
        st = add_synced(synced, nsynced, capsynced, f);
        if (st != BRK_OK)
            return st;
        s->disk_bytes += chunk * BRK_CQ_ENTRY_LEN;
        done += chunk;
    }
    memmove(q->tail, q->tail + n, (pending - n) * sizeof *q->tail);
    q->file_next += n;
    return BRK_OK;
}

/* Cut the queue back to `next` entries: truncate the file holding the new
 * end and drop any file after it. */
static brk_status cq_cut(brk_store *s, brk_topic *t, uint16_t qid,
                         uint64_t next)
{
    brk_queue *q = &t->queues[qid];
    uint64_t epf = s->opts.cq_entries_per_file;
    while (q->nfiles > 0) {
        uint64_t last = q->first_file + q->nfiles - 1;
        uint64_t first_index = last * epf;
        brk_file *f = q->files[q->nfiles - 1];
        if (first_index >= next && q->nfiles > 1) {
            char path[BRK_PATH_MAX];
            queue_file(s, t, qid, last, path, sizeof path);
            s->io->close(s->io, f);
            q->files[--q->nfiles] = NULL;
            int rc = s->io->unlink(s->io, path);
            if (rc != 0 && rc != -ENOENT) {
                brk__seterr(s, "removing %s: %s", path, strerror(-rc));
                return brk__errno_status(rc);
            }
            continue;
        }
        uint64_t keep = next > first_index ? next - first_index : 0;
        int rc = s->io->truncate(s->io, f, keep * BRK_CQ_ENTRY_LEN);
        if (rc == 0)
            rc = s->io->sync(s->io, f);
        if (rc != 0) {
            brk__seterr(s, "truncating consume queue %s/%u: %s", t->name,
                        (unsigned)qid, strerror(-rc));
            return brk__errno_status(rc);
        }
        break;
    }
    q->next = q->file_next = next;
    if (q->min > next)
        q->min = next;
    return BRK_OK;
}

brk_status brk__cq_trim(brk_store *s, brk_topic *t, uint16_t qid,
                        uint64_t ckpt)
{
    brk_queue *q = &t->queues[qid];
    uint64_t next = q->next;
    while (next > q->min) {
        brk_cq_entry e;
        brk_status st = brk__cq_get(s, t, qid, next - 1, &e);
        if (st != BRK_OK)
            return st;
        if (e.size != 0 && e.log_offset < ckpt)
            break;
        next--;
    }
    if (next == q->next && q->nfiles > 0) {
        /* Nothing to drop, but a torn partial entry may sit past the end. */
        return cq_cut(s, t, qid, next);
    }
    return q->nfiles ? cq_cut(s, t, qid, next) : BRK_OK;
}

brk_status brk__cq_drop_below(brk_store *s, brk_topic *t, uint16_t qid,
                              uint64_t log_start)
{
    brk_queue *q = &t->queues[qid];
    /* Offsets grow with the index, so binary search the first kept entry. */
    uint64_t lo = q->min, hi = q->next;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        brk_cq_entry e;
        brk_status st = brk__cq_get(s, t, qid, mid, &e);
        if (st != BRK_OK)
            return st;
        if (e.log_offset < log_start)
            lo = mid + 1;
        else
            hi = mid;
    }
    q->min = lo;
    uint64_t epf = s->opts.cq_entries_per_file;
    /* Delete whole files that lie below min and are fully written out. */
    while (q->nfiles > 1 && (q->first_file + 1) * epf <= q->min
           && (q->first_file + 1) * epf <= q->file_next) {
        char path[BRK_PATH_MAX];
        queue_file(s, t, qid, q->first_file, path, sizeof path);
        s->io->close(s->io, q->files[0]);
        memmove(q->files, q->files + 1, (q->nfiles - 1) * sizeof *q->files);
        q->nfiles--;
        q->first_file++;
        int rc = s->io->unlink(s->io, path);
        if (rc != 0 && rc != -ENOENT) {
            brk__seterr(s, "removing %s: %s", path, strerror(-rc));
            return brk__errno_status(rc);
        }
        uint64_t bytes = epf * BRK_CQ_ENTRY_LEN;
        s->disk_bytes -= bytes < s->disk_bytes ? bytes : s->disk_bytes;
    }
    return BRK_OK;
}

/* ---- id index ----------------------------------------------------------------- */

brk_status brk__idx_push(brk_store *s, const uint8_t id[BRK_UUID_LEN],
                         uint64_t log_offset)
{
    if (s->idx_tail_len == s->idx_tail_cap) {
        size_t nc = s->idx_tail_cap ? s->idx_tail_cap * 2 : 256;
        brk_idx_pending *nt = realloc(s->idx_tail, nc * sizeof *nt);
        if (!nt)
            return BRK_NOMEM;
        s->idx_tail = nt;
        s->idx_tail_cap = nc;
    }
    memcpy(s->idx_tail[s->idx_tail_len].id, id, BRK_UUID_LEN);
    s->idx_tail[s->idx_tail_len].log_offset = log_offset;
    s->idx_tail_len++;
    return BRK_OK;
}

static brk_status idx_file_for(brk_store *s, brk_seg *seg)
{
    if (seg->idx)
        return BRK_OK;
    char path[BRK_PATH_MAX];
    brk__seg_path(s, seg->base, ".idx", path, sizeof path);
    int rc = s->io->open(s->io, path, BRK_IO_CREATE | BRK_IO_RDWR, &seg->idx);
    if (rc == 0)
        rc = s->io->sync_dir(s->io, s->log_dir);
    if (rc != 0) {
        brk__fail(s, "creating %s: %s", path, strerror(-rc));
        return brk__errno_status(rc);
    }
    return BRK_OK;
}

/* Write pending index entries below `below` to their segments' files.  The
 * caller (checkpoint) fdatasyncs every segment's idx afterwards. */
brk_status brk__idx_writeout(brk_store *s, uint64_t below)
{
    size_t n = 0;
    while (n < s->idx_tail_len && s->idx_tail[n].log_offset < below)
        n++;
    uint8_t buf[BRK_IDX_ENTRY_LEN * 256];
    size_t done = 0;
    while (done < n) {
        brk_seg *seg = brk__seg_get(s, s->idx_tail[done].log_offset);
        if (!seg) {
            /* Its segment is gone (retention): nothing to index. */
            done++;
            continue;
        }
        uint64_t seg_end = seg->base + seg->size;
        size_t chunk = 0;
        while (done + chunk < n && chunk < 256
               && s->idx_tail[done + chunk].log_offset < seg_end) {
            uint8_t *p = buf + chunk * BRK_IDX_ENTRY_LEN;
            memcpy(p, s->idx_tail[done + chunk].id, BRK_UUID_LEN);
            brk_st64(p + BRK_UUID_LEN, s->idx_tail[done + chunk].log_offset);
            chunk++;
        }
        brk_status st = idx_file_for(s, seg);
        int rc = 0;
        if (st == BRK_OK) {
            rc = s->io->pwrite(s->io, seg->idx, buf, chunk * BRK_IDX_ENTRY_LEN,
                               seg->idx_count * BRK_IDX_ENTRY_LEN);
            if (rc == 0) {
                seg->idx_count += chunk;
                seg->idx_dirty = true;
                s->disk_bytes += chunk * BRK_IDX_ENTRY_LEN;
            } else {
                brk__fail(s, "writing index of segment %020" PRIu64 ": %s",
                          seg->base, strerror(-rc));
                st = brk__errno_status(rc);
            }
        }
        brk__seg_put(s, seg);
        if (st != BRK_OK)
            return st;
        done += chunk;
    }
    if (n > 0) {   /* idx_tail may be NULL: memmove(NULL, ...) is UB */
        memmove(s->idx_tail, s->idx_tail + n,
                (s->idx_tail_len - n) * sizeof *s->idx_tail);
        s->idx_tail_len -= n;
    }
    return BRK_OK;
}

/* Whether index entry p of seg describes a record that is there: below
 * the checkpoint, in the segment, and the log holds a record with that id
 * at that offset.  A hole or a torn entry a crash left fails.  (Ids are
 * not checked for a UUID version: callers may give any id, and the relay
 * stores PostgreSQL's version-4 ids.)  Reading the record costs one or two
 * preads, and trimming reads only the entries at the end of the file. */
static bool idx_entry_valid(brk_store *s, const uint8_t *p, uint64_t ckpt,
                            brk_seg *seg)
{
    uint64_t off = brk_ld64(p + BRK_UUID_LEN);
    if (off >= ckpt || off < seg->base || !seg->log)
        return false;
    uint8_t hdr[4];
    if (brk__pread_full(s, seg->log, hdr, sizeof hdr, off - seg->base) != BRK_OK)
        return false;
    uint32_t size = brk_record_peek_len(hdr, sizeof hdr);
    if (size < BRK_REC_HEADER_LEN || size > BRK_REC_MAX || off + size > ckpt)
        return false;
    uint8_t *buf = malloc(size);
    if (!buf)
        return false;
    brk_record rec;
    size_t len = 0;
    bool ok = brk__pread_full(s, seg->log, buf, size, off - seg->base) == BRK_OK
              && brk_record_decode(buf, size, off, &rec, &len) == BRK_OK
              && len == size
              && memcmp(rec.msg_id, p, BRK_UUID_LEN) == 0;
    free(buf);
    return ok;
}

brk_status brk__idx_trim(brk_store *s, brk_seg *seg, uint64_t ckpt)
{
    char path[BRK_PATH_MAX];
    brk__seg_path(s, seg->base, ".idx", path, sizeof path);
    if (!seg->idx) {
        int rc = s->io->open(s->io, path, BRK_IO_RDWR, &seg->idx);
        if (rc == -ENOENT) {
            seg->idx = NULL;
            seg->idx_count = 0;
            return BRK_OK;
        }
        if (rc != 0) {
            brk__seterr(s, "opening %s: %s", path, strerror(-rc));
            return brk__errno_status(rc);
        }
    }
    uint64_t size = 0;
    int rc = s->io->size(s->io, seg->idx, &size);
    if (rc != 0) {
        brk__seterr(s, "sizing %s: %s", path, strerror(-rc));
        return brk__errno_status(rc);
    }
    uint64_t n = size / BRK_IDX_ENTRY_LEN;
    uint8_t e[BRK_IDX_ENTRY_LEN];
    while (n > 0) {
        brk_status st = brk__pread_full(s, seg->idx, e, sizeof e,
                                        (n - 1) * BRK_IDX_ENTRY_LEN);
        if (st != BRK_OK)
            return st;
        if (idx_entry_valid(s, e, ckpt, seg))
            break;
        n--;
    }
    if (n * BRK_IDX_ENTRY_LEN != size) {
        rc = s->io->truncate(s->io, seg->idx, n * BRK_IDX_ENTRY_LEN);
        if (rc == 0)
            rc = s->io->sync(s->io, seg->idx);
        if (rc != 0) {
            brk__seterr(s, "truncating %s: %s", path, strerror(-rc));
            return brk__errno_status(rc);
        }
    }
    seg->idx_count = n;
    seg->records = n;
    s->disk_bytes += n * BRK_IDX_ENTRY_LEN;
    return BRK_OK;
}

/* The first of the index file's `count` entries whose log offset is >=
 * since.  Entries are in log order (one per record, appended as the log
 * grows), so a binary search of single-entry reads finds it.  A read error
 * gives 0: the caller then scans the whole file, which is only slower. */
static uint64_t idx_first_at(brk_store *s, brk_file *f, uint64_t count,
                             uint64_t since)
{
    uint64_t lo = 0, hi = count;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        uint8_t e[BRK_IDX_ENTRY_LEN];
        if (brk__pread_full(s, f, e, sizeof e, mid * BRK_IDX_ENTRY_LEN)
            != BRK_OK)
            return 0;
        if (brk_ld64(e + BRK_UUID_LEN) < since)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Scan one segment's index (the memory tail, then the file) for `id`,
 * considering only entries at log offsets >= since; the newest match wins.
 * Returns true and *off when found. */
bool brk__idx_search(brk_store *s, brk_seg *seg, const uint8_t *id,
                     uint64_t since, uint64_t *off)
{
    bool found = false;
    pthread_mutex_lock(&s->mu);
    uint64_t seg_end = seg->base + seg->size;
    uint64_t from = since > seg->base ? since : seg->base;
    for (size_t i = s->idx_tail_len; i-- > 0;) {
        const brk_idx_pending *p = &s->idx_tail[i];
        if (p->log_offset >= from && p->log_offset < seg_end
            && memcmp(p->id, id, BRK_UUID_LEN) == 0) {
            *off = p->log_offset;
            found = true;
            break;
        }
    }
    uint64_t count = seg->idx_count;
    brk_file *f = seg->idx;
    pthread_mutex_unlock(&s->mu);
    if (found || !f || count == 0)
        return found;
    /* Entries [0, count) in the file never change, so read them unlocked. */
    uint64_t first = since > seg->base ? idx_first_at(s, f, count, since) : 0;
    enum { CHUNK = 4096 };
    uint8_t *buf = malloc(CHUNK * BRK_IDX_ENTRY_LEN);
    if (!buf)
        return false;
    for (uint64_t at = first; at < count; at += CHUNK) {
        uint64_t k = count - at < CHUNK ? count - at : CHUNK;
        if (brk__pread_full(s, f, buf, k * BRK_IDX_ENTRY_LEN,
                            at * BRK_IDX_ENTRY_LEN) != BRK_OK)
            break;
        for (uint64_t i = 0; i < k; i++) {
            const uint8_t *p = buf + i * BRK_IDX_ENTRY_LEN;
            uint64_t o = brk_ld64(p + BRK_UUID_LEN);
            if (o >= since && memcmp(p, id, BRK_UUID_LEN) == 0) {
                *off = o;
                found = true;   /* keep going: a later entry is newer */
            }
        }
    }
    free(buf);
    return found;
}
