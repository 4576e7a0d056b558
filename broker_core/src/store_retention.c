/*
 * store_retention.c - reader cursors and segment retention.
 *
 * A segment is deleted only when it is older than retention_ms (by its
 * newest record's store time), every registered cursor has passed its end,
 * it is durable, and it is not the newest segment.  Deletion takes it out
 * of the segment array first (new readers cannot find it), then drops the
 * consume-queue entries below the new log start, then unlinks its files;
 * a crash in between leaves entries pointing below the log start, which
 * recovery drops the same way.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "store_priv.h"

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
