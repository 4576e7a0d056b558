/*
 * txn_recover.c - rebuilding pending and recently resolved transactions
 * from __txn_half and __txn_op at open, and finishing verdicts whose effect
 * a crash cut off (see "why a restart never loses or repeats a verdict" at
 * the top of txn.c).
 */
#define _GNU_SOURCE
#include "txn_priv.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "broker/record.h"
#include "broker/uuid.h"
#include "le.h"

/* ---- rebuild at open -------------------------------------------------------- */

typedef struct owed {
    uint64_t hash;
    uint8_t id[BRK_UUID_LEN];     /* the message id the effect writes */
    bool found;
} owed;

static int owed_cmp(const void *a, const void *b)
{
    return memcmp(((const owed *)a)->id, ((const owed *)b)->id, BRK_UUID_LEN);
}

static brk_status rebuild_half(brk_txn *t, const brk_record *r)
{
    half_view h;
    memset(&h, 0, sizeof h);
    if (txn_parse_half(r, &h) != BRK_OK)
        return BRK_OK;                   /* not ours to judge: skip */
    uint64_t hash = txn_txid_hash(h.txid, h.txid_len);
    txn_ent *e = txn_tab_find(t, hash);
    if (e && e->state == BRK_TXN_PREPARED) {
        if (!h.is_copy || h.copy_from != e->half_off)
            return BRK_OK;               /* not the copy of this one */
        e->half_off = r->log_offset;
        e->checks = h.copy_checks;
        if (h.copy_next)
            e->when_ms = h.copy_next;
        int64_t age = r->store_ms / 1000 - (int64_t)e->prep_s;
        e->half_age_s = age < 0 ? 0 : (uint32_t)age;
        return BRK_OK;
    }
    if (e) {                             /* a resolved txid prepared anew */
        txn_tab_remove(t, e);
    } else if (h.is_copy) {
        /* A copy whose original we did not read (below half_from): the copy
         * is the record of a pending transaction all the same. */
    }
    e = txn_tab_insert(t, hash);
    if (!e)
        return BRK_NOMEM;
    e->state = BRK_TXN_PREPARED;
    e->half_off = r->log_offset;
    e->prep_s = (uint32_t)(h.prepared_ms / 1000);
    e->checks = h.is_copy ? h.copy_checks : 0;
    if (h.is_copy && r->store_ms > h.prepared_ms)
        e->half_age_s = (uint32_t)((r->store_ms - h.prepared_ms) / 1000);
    e->when_ms = h.is_copy && h.copy_next ? h.copy_next
                 : h.prepared_ms + h.pol.first_check_ms;
    if (h.is_copy && e->checks >= h.pol.max_checks
        && h.pol.on_exhausted == BRK_EXHAUSTED_HOLD)
        e->flags |= F_STUCK;
    t->pending++;
    if (e->flags & F_STUCK)
        t->stuck++;
    return BRK_OK;
}

static brk_status rebuild_op(brk_txn *t, const brk_record *r,
                             uint64_t effect_from, owed **ow, size_t *now_,
                             size_t *cow)
{
    if (r->type != BRK_REC_OP || r->body.len < OP_LEN || r->key.len == 0
        || r->key.len > BRK_TXID_MAX)
        return BRK_OK;
    const uint8_t *b = r->body.ptr;
    if (b[0] != OP_VERSION)
        return BRK_OK;
    uint64_t hash = txn_txid_hash(r->key.ptr, r->key.len);
    txn_ent *e = txn_tab_find(t, hash);
    if (!e || e->state != BRK_TXN_PREPARED || e->half_off != brk_ld64(b + 16))
        return BRK_OK;                   /* fenced, or not this incarnation */
    uint8_t kind = b[1], src = b[2];
    uint16_t checks = brk_ld16(b + 4);
    switch (kind) {
    case OP_CHECK:
        e->checks = checks;
        e->when_ms = (int64_t)brk_ld64(b + 8);
        if (e->when_ms == 0)             /* the last check: action follows */
            e->flags |= F_EXHAUSTED;
        break;
    case OP_STUCK:
        e->checks = checks;
        if (!(e->flags & F_STUCK)) {
            e->flags |= F_STUCK;
            t->stuck++;
        }
        e->when_ms = 0;
        break;
    case OP_COMMIT:
    case OP_ROLLBACK: {
        bool commit = kind == OP_COMMIT, expired = src == SRC_EXHAUSTED;
        e->checks = checks > e->checks ? checks : e->checks;
        txn_set_terminal(t, e, commit ? BRK_TXN_COMMITTED : BRK_TXN_ROLLED_BACK,
                     expired, r->store_ms);
        if (r->log_offset >= effect_from && (commit || expired)) {
            /* The effect may be missing: remember what to look for. */
            if (*now_ == *cow) {
                size_t n = *cow ? *cow * 2 : 64;
                owed *v = realloc(*ow, n * sizeof *v);
                if (!v)
                    return BRK_NOMEM;
                *ow = v;
                *cow = n;
            }
            owed *o = &(*ow)[(*now_)++];
            o->hash = hash;
            o->found = false;
            /* Filled from the half record below (commit: its id; expiry:
             * the derived id); mark the entry so we can find it. */
            e->flags |= F_EFFECT;
            t->effect_hint++;
            memset(o->id, 0, sizeof o->id);
        }
        break;
    }
    default:
        break;
    }
    return BRK_OK;
}

/* Read a single-queue internal topic from qoff; records come back one batch
 * at a time.  Returns the batch (NULL at the end). */
static brk_status read_more(brk_txn *t, const char *topic, uint64_t *qoff,
                            brk_batch **b)
{
    brk_status st = brk_store_read(t->s, topic, 0, *qoff, 256, b);
    if (st == BRK_RANGE) {               /* state ahead of a truncated log */
        uint64_t lo, hi;
        if (brk_store_queue_range(t->s, topic, 0, &lo, &hi) == BRK_OK) {
            *qoff = hi;
            st = brk_store_read(t->s, topic, 0, *qoff, 256, b);
        }
    }
    if (st != BRK_OK)
        return st;
    if ((*b)->count == 0) {
        brk_batch_free(*b);
        *b = NULL;
        return BRK_OK;
    }
    *qoff = (*b)->next_offset;
    return BRK_OK;
}

brk_status txn_rebuild(brk_txn *t, char *err, size_t errlen)
{
    uint64_t half_q = 0, op_q = 0, effect_from = 0;
    void *sb = NULL;
    size_t sl = 0;
    brk_status st = brk_store_state_read(t->s, "txn", &sb, &sl);
    if (st == BRK_OK && sl == STATE_LEN && brk_ld32(sb) == 1) {
        half_q = brk_ld64((uint8_t *)sb + 8);
        op_q = brk_ld64((uint8_t *)sb + 16);
        effect_from = brk_ld64((uint8_t *)sb + 24);
    } else if (st == BRK_OK || st == BRK_CORRUPT) {
        /* Unreadable: read everything that is still in the log. */
        half_q = op_q = effect_from = 0;
    } else if (st != BRK_NOTFOUND) {
        snprintf(err, errlen, "reading state.txn: %s", brk_strerror(st));
        free(sb);
        return st;
    }
    free(sb);
    t->saved[0] = half_q;
    t->saved[1] = op_q;
    t->saved[2] = effect_from;

    /* Merge the two topics in log order. */
    brk_batch *hb = NULL, *ob = NULL;
    size_t hi = 0, oi = 0, nowed = 0, cowed = 0;
    owed *ow = NULL;
    bool hdone = false, odone = false;
    st = BRK_OK;
    for (;;) {
        if (!hb && !hdone) {
            st = read_more(t, BRK_TXN_HALF_TOPIC, &half_q, &hb);
            hi = 0;
            hdone = st == BRK_OK && !hb;
        }
        if (st == BRK_OK && !ob && !odone) {
            st = read_more(t, BRK_TXN_OP_TOPIC, &op_q, &ob);
            oi = 0;
            odone = st == BRK_OK && !ob;
        }
        if (st != BRK_OK || (!hb && !ob))
            break;
        const brk_record *hr = hb ? &hb->recs[hi] : NULL;
        const brk_record *orr = ob ? &ob->recs[oi] : NULL;
        if (hr && (!orr || hr->log_offset < orr->log_offset)) {
            st = rebuild_half(t, hr);
            if (++hi == hb->count) {
                brk_batch_free(hb);
                hb = NULL;
            }
        } else {
            st = rebuild_op(t, orr, effect_from, &ow, &nowed, &cowed);
            if (++oi == ob->count) {
                brk_batch_free(ob);
                ob = NULL;
            }
        }
        if (st != BRK_OK)
            break;
    }
    brk_batch_free(hb);
    brk_batch_free(ob);
    if (st != BRK_OK) {
        snprintf(err, errlen, "rebuilding transactions: %s (%s)",
                 brk_strerror(st), brk_store_errstr(t->s));
        free(ow);
        return st;
    }

    /* Verdicts at or after effect_from: find their effects in the log. */
    if (nowed > 0) {
        for (size_t i = 0; i < nowed; i++) {
            txn_ent *e = txn_tab_find(t, ow[i].hash);
            half_view h;
            if (!e || txn_read_half(t, e->half_off, &h) != BRK_OK) {
                ow[i].found = true;      /* nothing we could redo */
                continue;
            }
            if (e->state == BRK_TXN_COMMITTED)
                memcpy(ow[i].id, h.r->msg_id, BRK_UUID_LEN);
            else if (h.expiry[0])
                txn_expiry_id(h.r->msg_id, ow[i].id);
            else
                ow[i].found = true;      /* rollback: nothing owed */
            brk_batch_free(h.b);
        }
        qsort(ow, nowed, sizeof *ow, owed_cmp);
        brk_store_stats ss;
        brk_store_get_stats(t->s, &ss);
        uint64_t off = effect_from < ss.log_start ? ss.log_start : effect_from;
        while (off < ss.log_end) {
            brk_batch *b = NULL;
            if (brk_store_read_at(t->s, off, &b) != BRK_OK || b->count != 1) {
                brk_batch_free(b);
                break;
            }
            const brk_record *r = &b->recs[0];
            bool ours = r->topic.len == strlen(BRK_TXN_HALF_TOPIC)
                        && memcmp(r->topic.ptr, BRK_TXN_HALF_TOPIC,
                                  r->topic.len) == 0;
            if (!ours) {
                owed key;
                memcpy(key.id, r->msg_id, BRK_UUID_LEN);
                owed *o = bsearch(&key, ow, nowed, sizeof *ow, owed_cmp);
                if (o)
                    o->found = true;
            }
            uint32_t len = brk_record_size(r) ? (uint32_t)brk_record_size(r) : 0;
            brk_batch_free(b);
            if (len == 0)
                break;
            off += len;
        }
        for (size_t i = 0; i < nowed; i++) {
            txn_ent *e = txn_tab_find(t, ow[i].hash);
            if (e && ow[i].found)
                e->flags &= (uint8_t)~F_EFFECT;
        }
    }
    free(ow);

    /* Timers for pending ones; counters. */
    int64_t now = txn_now_ms(t);
    for (size_t i = 0; i < t->cap; i++) {
        txn_ent *e = &t->tab[i];
        if (!e->hash)
            continue;
        if (e->state == BRK_TXN_PREPARED && !(e->flags & F_STUCK)) {
            if (brk_timerheap_push(&t->heap, e->when_ms, e->hash) != BRK_OK) {
                snprintf(err, errlen, "rebuilding transactions: out of memory");
                return BRK_NOMEM;
            }
        }
    }
    txn_sweep_locked(t, now);
    /* Checks counted to the limit whose rollback did not make it to the log
     * before a crash: apply the action now. */
    size_t nex = 0;
    uint64_t *ex = NULL;
    for (size_t i = 0; i < t->cap; i++) {
        txn_ent *e = &t->tab[i];
        if (e->hash && e->state == BRK_TXN_PREPARED && !(e->flags & F_STUCK)
            && (e->flags & F_EXHAUSTED)) {
            uint64_t *v = realloc(ex, (nex + 1) * sizeof *v);
            if (!v)
                break;               /* the next check handles the rest */
            ex = v;
            ex[nex++] = e->hash;
        }
    }
    for (size_t i = 0; i < nex; i++)
        (void)txn_resolve(t, ex[i], NULL, false, SRC_EXHAUSTED, true, NULL, NULL);
    free(ex);
    /* Owed effects are retried by the first tick; do it now so an open
     * leaves nothing owed when the store is writable. */
    txn_retry_effects(t);
    return BRK_OK;
}
