/*
 * store_meta.c - the store's small state files: the topic table and the
 * checkpoint.
 *
 * Both are rewritten whole, never in place:
 *   write <name>.tmp -> fdatasync it -> rename over <name> -> fsync the dir.
 * A crash at any step leaves either the old or the new file under <name>
 * (a stray .tmp is ignored and removed at the next open).  Each file ends
 * with a CRC32C of everything before it, so a torn or bit-rotted state file
 * is reported instead of being half-read.
 *
 * Topic table, "<dir>/topics" (all integers little-endian):
 *   0   u32  magic 0x5442584F ("OXBT")
 *   4   u32  version (1)
 *   8   u32  topic count N
 *   12  N x topic:
 *         u16  name length L (1..127)
 *         L    name bytes
 *         u16  queues       (queues that exist, 1..1024)
 *         u16  writable     (queues taking writes, 1..queues)
 *         i64  created_ms
 *         u16[1024] slot table (key slot -> queue, each < queues)
 *   end u32  CRC32C of bytes [0, end)
 *
 * Checkpoint, "<dir>/checkpoint":
 *   0   u32  magic 0x4B434F4F ("OOCK")
 *   4   u32  version (1)
 *   8   u64  log offset: every record below it is fdatasync'ed in the log and
 *            has its consume-queue and index entries fdatasync'ed too
 *   16  i64  wall time the checkpoint was written (ms)
 *   24  u32  CRC32C of bytes [0, 24)
 * Recovery trusts entries below the checkpoint and re-dispatches the log
 * from it; bad records below it are corruption, above it a torn tail.
 *
 * Module state, "<dir>/state.<name>" (brk_store_state_write):
 *   0   u32  magic 0x5453584F ("OXST")
 *   4   u32  version (1)
 *   8   u32  payload length P
 *   12  P    payload (owned by the module that wrote it)
 *   end u32  CRC32C of bytes [0, 12 + P)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker/crc32c.h"
#include "le.h"
#include "store_priv.h"

#define TOPICS_MAGIC  0x5442584Fu
#define CKPT_MAGIC    0x4B434F4Fu
#define STATE_MAGIC   0x5453584Fu
#define META_VERSION  1u
#define CKPT_LEN      28


brk_status brk__write_state_file(brk_store *s, const char *name,
                                 const void *buf, size_t len)
{
    char path[BRK_PATH_MAX], tmp[BRK_PATH_MAX + 8];
    brk__path(path, sizeof path, s->dir, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);

    brk_file *f = NULL;
    int rc = s->io->open(s->io, tmp, BRK_IO_CREATE | BRK_IO_RDWR, &f);
    if (rc == 0) rc = s->io->truncate(s->io, f, 0);
    if (rc == 0) rc = s->io->pwrite(s->io, f, buf, len, 0);
    if (rc == 0) rc = s->io->sync(s->io, f);
    if (f) {
        int crc = s->io->close(s->io, f);
        if (rc == 0) rc = crc;
    }
    if (rc == 0) rc = s->io->rename(s->io, tmp, path);
    if (rc == 0) rc = s->io->sync_dir(s->io, s->dir);
    if (rc != 0) {
        /* The rename may or may not have happened: the state on disk is
         * unknown, which is exactly what the sticky error is for. */
        brk__fail(s, "writing state file %s: %s", path, strerror(-rc));
        return brk__errno_status(rc);
    }
    return BRK_OK;
}

/* Read a whole state file; BRK_NOTFOUND when it does not exist. */
static brk_status read_state_file(brk_store *s, const char *name,
                                  uint8_t **out, size_t *len)
{
    char path[BRK_PATH_MAX];
    brk__path(path, sizeof path, s->dir, name);
    brk_file *f = NULL;
    int rc = s->io->open(s->io, path, BRK_IO_RDONLY, &f);
    if (rc == -ENOENT)
        return BRK_NOTFOUND;
    if (rc != 0) {
        brk__seterr(s, "opening %s: %s", path, strerror(-rc));
        return brk__errno_status(rc);
    }
    uint64_t size = 0;
    rc = s->io->size(s->io, f, &size);
    uint8_t *buf = NULL;
    if (rc == 0 && size > (64u << 20))
        rc = -EFBIG;
    if (rc == 0 && (buf = malloc(size ? size : 1)) == NULL)
        rc = -ENOMEM;
    size_t got = 0;
    if (rc == 0) rc = s->io->pread(s->io, f, buf, size, 0, &got);
    s->io->close(s->io, f);
    if (rc == 0 && got != size)
        rc = -EIO;
    if (rc != 0) {
        free(buf);
        brk__seterr(s, "reading %s: %s", path, strerror(-rc));
        return brk__errno_status(rc);
    }
    *out = buf;
    *len = size;
    return BRK_OK;
}

/* ---- topics --------------------------------------------------------------- */

static int topic_cmp(const void *a, const void *b)
{
    const brk_topic *x = *(brk_topic *const *)a, *y = *(brk_topic *const *)b;
    return strcmp(x->name, y->name);
}

brk_topic *brk__topic_find(brk_store *s, const char *name)
{
    size_t lo = 0, hi = s->ntopics;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(s->topics[mid]->name, name);
        if (c == 0)
            return s->topics[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* Allocate a topic in memory only (no files, no save). */
static brk_topic *topic_alloc(const char *name, uint16_t queues,
                              uint16_t writable, int64_t created_ms)
{
    brk_topic *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->queues = calloc(queues, sizeof *t->queues);
    if (!t->queues) {
        free(t);
        return NULL;
    }
    snprintf(t->name, sizeof t->name, "%s", name);
    t->nqueues = queues;
    t->writable = writable;
    t->created_ms = created_ms;
    for (unsigned i = 0; i < BRK_KEY_SLOTS; i++)
        t->slots[i] = (uint16_t)(i % writable);
    return t;
}

static brk_status topic_insert(brk_store *s, brk_topic *t)
{
    brk_topic **nt = realloc(s->topics, (s->ntopics + 1) * sizeof *nt);
    if (!nt)
        return BRK_NOMEM;
    s->topics = nt;
    s->topics[s->ntopics++] = t;
    qsort(s->topics, s->ntopics, sizeof *s->topics, topic_cmp);
    return BRK_OK;
}

static void topic_free(brk_store *s, brk_topic *t)
{
    for (uint16_t q = 0; q < t->nqueues; q++)
        brk__cq_close_queue(s, &t->queues[q]);
    free(t->queues);
    free(t);
}

brk_status brk__topic_new(brk_store *s, const char *name, uint16_t queues,
                          brk_topic **out)
{
    brk_topic *t = topic_alloc(name, queues, queues, brk__now_ms(s));
    if (!t)
        return BRK_NOMEM;
    brk_status st = topic_insert(s, t);
    if (st != BRK_OK) {
        topic_free(s, t);
        return st;
    }
    st = brk__topics_save(s);
    if (st != BRK_OK) {
        /* Not durable: forget it so nothing can be appended to it. */
        for (size_t i = 0; i < s->ntopics; i++) {
            if (s->topics[i] == t) {
                memmove(&s->topics[i], &s->topics[i + 1],
                        (s->ntopics - i - 1) * sizeof *s->topics);
                s->ntopics--;
                break;
            }
        }
        topic_free(s, t);
        return st;
    }
    *out = t;
    return BRK_OK;
}

brk_status brk__topics_save(brk_store *s)
{
    size_t len = 12 + 4;
    for (size_t i = 0; i < s->ntopics; i++)
        len += 2 + strlen(s->topics[i]->name) + 2 + 2 + 8 + 2 * BRK_KEY_SLOTS;
    uint8_t *buf = malloc(len);
    if (!buf)
        return BRK_NOMEM;
    uint8_t *p = buf;
    brk_st32(p, TOPICS_MAGIC);
    brk_st32(p + 4, META_VERSION);
    brk_st32(p + 8, (uint32_t)s->ntopics);
    p += 12;
    for (size_t i = 0; i < s->ntopics; i++) {
        const brk_topic *t = s->topics[i];
        size_t nl = strlen(t->name);
        brk_st16(p, (uint16_t)nl);
        memcpy(p + 2, t->name, nl);
        p += 2 + nl;
        brk_st16(p, t->nqueues);
        brk_st16(p + 2, t->writable);
        brk_st64(p + 4, (uint64_t)t->created_ms);
        p += 12;
        for (unsigned k = 0; k < BRK_KEY_SLOTS; k++, p += 2)
            brk_st16(p, t->slots[k]);
    }
    brk_st32(p, brk_crc32c(0, buf, (size_t)(p - buf)));
    brk_status st = brk__write_state_file(s, "topics", buf, len);
    free(buf);
    return st;
}

brk_status brk__topics_load(brk_store *s)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    brk_status st = read_state_file(s, "topics", &buf, &len);
    if (st == BRK_NOTFOUND)
        return BRK_OK;
    if (st != BRK_OK)
        return st;

    const char *why = NULL;
    if (len < 16 || brk_ld32(buf) != TOPICS_MAGIC)
        why = "bad magic or too short";
    else if (brk_ld32(buf + 4) != META_VERSION)
        why = "unknown version";
    else if (brk_crc32c(0, buf, len - 4) != brk_ld32(buf + len - 4))
        why = "checksum mismatch";
    uint32_t n = why ? 0 : brk_ld32(buf + 8);
    const uint8_t *p = buf + 12, *end = buf + len - 4;
    for (uint32_t i = 0; i < n && !why; i++) {
        if (end - p < 2) { why = "truncated entry"; break; }
        uint16_t nl = brk_ld16(p);
        if (nl == 0 || nl > BRK_TOPIC_MAX
            || end - p < 2 + nl + 12 + 2 * BRK_KEY_SLOTS) {
            why = "bad topic entry";
            break;
        }
        char name[BRK_TOPIC_MAX + 1];
        memcpy(name, p + 2, nl);
        name[nl] = '\0';
        p += 2 + nl;
        uint16_t nq = brk_ld16(p), wr = brk_ld16(p + 2);
        int64_t created = (int64_t)brk_ld64(p + 4);
        p += 12;
        if (!brk_topic_name_valid(name, nl, true) || nq == 0
            || nq > BRK_QUEUES_MAX || wr == 0 || wr > nq) {
            why = "bad topic fields";
            break;
        }
        brk_topic *t = topic_alloc(name, nq, wr, created);
        if (!t) { free(buf); return BRK_NOMEM; }
        for (unsigned k = 0; k < BRK_KEY_SLOTS; k++, p += 2) {
            t->slots[k] = brk_ld16(p);
            if (t->slots[k] >= wr)
                why = "slot table points at a missing queue";
        }
        if (why || brk__topic_find(s, name) || topic_insert(s, t) != BRK_OK) {
            why = why ? why : "duplicate topic or no memory";
            topic_free(s, t);
            break;
        }
    }
    if (!why && p != end)
        why = "trailing bytes";
    free(buf);
    if (why) {
        brk__seterr(s, "topic table %s/topics is unreadable: %s", s->dir, why);
        return BRK_CORRUPT;
    }
    return BRK_OK;
}

/* ---- checkpoint ----------------------------------------------------------- */

brk_status brk__ckpt_save(brk_store *s, uint64_t offset)
{
    uint8_t buf[CKPT_LEN];
    brk_st32(buf, CKPT_MAGIC);
    brk_st32(buf + 4, META_VERSION);
    brk_st64(buf + 8, offset);
    brk_st64(buf + 16, (uint64_t)brk__now_ms(s));
    brk_st32(buf + 24, brk_crc32c(0, buf, 24));
    return brk__write_state_file(s, "checkpoint", buf, sizeof buf);
}

brk_status brk__ckpt_load(brk_store *s, uint64_t *offset, bool *found)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    *found = false;
    *offset = 0;
    brk_status st = read_state_file(s, "checkpoint", &buf, &len);
    if (st == BRK_NOTFOUND)
        return BRK_OK;
    if (st != BRK_OK)
        return st;
    bool ok = len == CKPT_LEN && brk_ld32(buf) == CKPT_MAGIC
              && brk_ld32(buf + 4) == META_VERSION
              && brk_crc32c(0, buf, 24) == brk_ld32(buf + 24);
    if (ok) {
        *offset = brk_ld64(buf + 8);
        *found = true;
    }
    free(buf);
    /* An unreadable checkpoint (it is written atomically, so this means
     * outside damage) is not fatal: recovery then trusts nothing and
     * rebuilds every index from the log, which is slower but exact. */
    if (!ok)
        brk__seterr(s, "checkpoint %s/checkpoint is unreadable; "
                    "rebuilding indexes from the whole log", s->dir);
    return BRK_OK;
}

/* ---- module state files --------------------------------------------------- */

static bool state_name_ok(const char *name)
{
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'
              || c == '-'))
            return false;
    }
    return true;
}

brk_status brk_store_state_write(brk_store *s, const char *name,
                                 const void *buf, size_t len)
{
    if (!state_name_ok(name) || (len && !buf))
        return BRK_INVAL;
    if (len > BRK_STATE_MAX)
        return BRK_TOOBIG;
    if (atomic_load(&s->failed))
        return BRK_FAILED;
    uint8_t *img = malloc(len + 16);
    if (!img)
        return BRK_NOMEM;
    brk_st32(img, STATE_MAGIC);
    brk_st32(img + 4, META_VERSION);
    brk_st32(img + 8, (uint32_t)len);
    if (len)
        memcpy(img + 12, buf, len);
    brk_st32(img + 12 + len, brk_crc32c(0, img, 12 + len));
    char file[80];
    snprintf(file, sizeof file, "state.%s", name);
    brk_status st = brk__write_state_file(s, file, img, len + 16);
    free(img);
    return st;
}

brk_status brk_store_state_read(brk_store *s, const char *name, void **out,
                                size_t *len)
{
    *out = NULL;
    *len = 0;
    if (!state_name_ok(name))
        return BRK_INVAL;
    char file[80];
    snprintf(file, sizeof file, "state.%s", name);
    uint8_t *buf = NULL;
    size_t n = 0;
    brk_status st = read_state_file(s, file, &buf, &n);
    if (st != BRK_OK)
        return st;
    uint32_t plen = n >= 16 ? brk_ld32(buf + 8) : 0;
    bool ok = n >= 16 && brk_ld32(buf) == STATE_MAGIC
              && brk_ld32(buf + 4) == META_VERSION && (size_t)plen + 16 == n
              && brk_crc32c(0, buf, 12 + plen) == brk_ld32(buf + 12 + plen);
    if (!ok) {
        free(buf);
        brk__seterr(s, "state file %s/%s is damaged (bad framing or CRC)",
                    s->dir, file);
        return BRK_CORRUPT;
    }
    memmove(buf, buf + 12, plen);
    *out = buf;
    *len = plen;
    return BRK_OK;
}

void brk__topics_free_all(brk_store *s)
{
    for (size_t i = 0; i < s->ntopics; i++)
        topic_free(s, s->topics[i]);
    free(s->topics);
    s->topics = NULL;
    s->ntopics = 0;
}
