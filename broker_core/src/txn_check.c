/*
 * txn_check.c - check-backs (a bounded pool of worker threads asks the
 * checker; never on a caller's thread, never with a lock held), saving
 * state.txn and the retention cursor, forgetting resolved txids,
 * compaction, brk_txn_tick and the scheduler thread.
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

/* ---- check-backs -------------------------------------------------------- */

static uint32_t backoff_ms(brk_txn *t, unsigned errors)
{
    uint64_t b = t->o.error_backoff_min_ms;
    for (unsigned i = 1; i < errors && b < t->o.error_backoff_max_ms; i++)
        b *= 2;
    if (b > t->o.error_backoff_max_ms)
        b = t->o.error_backoff_max_ms;
    return (uint32_t)b;
}

/* One check-back, on a worker thread. */
static void run_check(brk_txn *t, uint64_t hash)
{
    pthread_mutex_lock(&t->mu);
    txn_ent *e = txn_tab_find(t, hash);
    if (!e || e->state != BRK_TXN_PREPARED || (e->flags & F_RESOLVING)) {
        if (e)
            e->flags &= (uint8_t)~F_CHECKING;
        pthread_mutex_unlock(&t->mu);
        return;
    }
    uint64_t half_off = e->half_off;
    uint16_t attempt = (uint16_t)(e->checks + 1);
    pthread_mutex_unlock(&t->mu);

    half_view h;
    brk_status st = txn_read_half(t, half_off, &h);
    brk_check_result r = BRK_CHECK_ERROR;
    uint8_t *user = NULL;
    if (st == BRK_OK) {
        size_t ulen = 0;
        user = malloc(h.r->props.len ? h.r->props.len : 1);
        if (user)
            (void)brk_props_strip_sys(h.r->props, user, h.r->props.len, &ulen);
        brk_check_req q;
        memset(&q, 0, sizeof q);
        q.txid = h.txid;
        q.topic = h.topic;
        q.key = h.r->key;
        q.headers.ptr = user;
        q.headers.len = user ? ulen : 0;
        q.msg_id = h.r->msg_id;
        q.attempt = attempt;
        q.prepared_ms = h.prepared_ms;
        r = t->o.checker->check(t->o.checker->ctx, &q);
    }

    pthread_mutex_lock(&t->mu);
    switch (r) {
    case BRK_CHECK_COMMIT: t->st.checks_commit_total++; break;
    case BRK_CHECK_ROLLBACK: t->st.checks_rollback_total++; break;
    case BRK_CHECK_UNKNOWN: t->st.checks_unknown_total++; break;
    default: t->st.checks_error_total++; r = BRK_CHECK_ERROR; break;
    }
    pthread_mutex_unlock(&t->mu);

    if (r == BRK_CHECK_COMMIT || r == BRK_CHECK_ROLLBACK) {
        brk_status rs = txn_resolve(t, hash, st == BRK_OK ? h.txid : NULL,
                                r == BRK_CHECK_COMMIT, SRC_CHECK, false,
                                st == BRK_OK ? &h : NULL, NULL);
        pthread_mutex_lock(&t->mu);
        e = txn_tab_find(t, hash);
        if (e) {
            e->flags &= (uint8_t)~F_CHECKING;
            /* Dropped because a verdict was being written: if that verdict
             * failed, check again soon. */
            if (rs == BRK_AGAIN && e->state == BRK_TXN_PREPARED
                && !(e->flags & (F_RESOLVING | F_STUCK)))
                txn_schedule(t, e, txn_now_ms(t) + t->o.error_backoff_min_ms);
        }
        pthread_mutex_unlock(&t->mu);
    } else if (r == BRK_CHECK_ERROR) {
        pthread_mutex_lock(&t->mu);
        e = txn_tab_find(t, hash);
        if (e) {
            e->flags &= (uint8_t)~F_CHECKING;
            if (e->state == BRK_TXN_PREPARED && !(e->flags & F_RESOLVING)) {
                if (e->errors < UINT16_MAX)
                    e->errors++;
                txn_schedule(t, e, txn_now_ms(t) + backoff_ms(t, e->errors));
            }
        }
        pthread_mutex_unlock(&t->mu);
    } else {
        /* UNKNOWN: count it, durably, then reschedule or apply the
         * policy's action. */
        pthread_mutex_lock(&t->mu);
        e = txn_tab_find(t, hash);
        bool live = e && e->state == BRK_TXN_PREPARED
                    && !(e->flags & F_RESOLVING) && e->half_off == half_off;
        uint16_t checks = live ? (uint16_t)(e->checks + 1) : 0;
        bool exhausted = live && checks >= h.pol.max_checks;
        bool hold = exhausted && h.pol.on_exhausted == BRK_EXHAUSTED_HOLD;
        int64_t next = live ? txn_now_ms(t) + h.pol.interval_ms : 0;
        if (live)
            e->flags |= F_MOVING;          /* no compaction copy meanwhile */
        pthread_mutex_unlock(&t->mu);
        brk_status ws = BRK_OK;
        if (live)
            ws = txn_append_op(t, h.txid, hold ? OP_STUCK : OP_CHECK, SRC_CHECK,
                           checks, exhausted ? 0 : next, half_off, false, NULL);
        pthread_mutex_lock(&t->mu);
        e = txn_tab_find(t, hash);
        if (e) {
            if (live)
                e->flags &= (uint8_t)~F_MOVING;
            e->flags &= (uint8_t)~F_CHECKING;
            pthread_cond_broadcast(&t->cv);
        }
        if (e && !live && e->state == BRK_TXN_PREPARED
            && !(e->flags & (F_RESOLVING | F_STUCK | F_CHECKING)))
            txn_schedule(t, e, txn_now_ms(t) + t->o.error_backoff_min_ms);
        if (e && live && e->state == BRK_TXN_PREPARED) {
            if (ws != BRK_OK) {
                txn_schedule(t, e, txn_now_ms(t) + backoff_ms(t, 1));
            } else {
                e->checks = checks;
                e->errors = 0;
                if (hold) {
                    e->flags |= F_STUCK;
                    e->when_ms = 0;
                    t->stuck++;
                } else if (!exhausted) {
                    txn_schedule(t, e, next);
                }
            }
        }
        pthread_mutex_unlock(&t->mu);
        if (live && ws == BRK_OK && exhausted && !hold)
            (void)txn_resolve(t, hash, h.txid, false, SRC_EXHAUSTED, true, &h,
                          NULL);
    }
    if (st == BRK_OK)
        brk_batch_free(h.b);
    free(user);
}

void *txn_worker_main(void *arg)
{
    brk_txn *t = arg;
    pthread_mutex_lock(&t->mu);
    for (;;) {
        while (t->jlen == 0 && !t->stopping)
            pthread_cond_wait(&t->wcv, &t->mu);
        if (t->jlen == 0 && t->stopping)
            break;
        uint64_t hash = t->jobs[t->jhead].hash;
        t->jhead = (t->jhead + 1) % t->jcap;
        t->jlen--;
        t->active++;
        pthread_mutex_unlock(&t->mu);
        run_check(t, hash);
        pthread_mutex_lock(&t->mu);
        t->active--;
        pthread_cond_broadcast(&t->idle_cv);
        /* Room in the queue again: the scheduler may hold due checks it
         * could not hand over (a signal nobody waits for costs nothing). */
        if (t->sched_running && t->jlen <= t->jcap / 2)
            pthread_cond_signal(&t->scv);
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

void brk_txn_quiesce(brk_txn *t)
{
    pthread_mutex_lock(&t->mu);
    while (t->jlen > 0 || t->active > 0)
        pthread_cond_wait(&t->idle_cv, &t->mu);
    pthread_mutex_unlock(&t->mu);
}

/* Hand due checks to the workers (under mu). */
static void dispatch_locked(brk_txn *t, int64_t now)
{
    brk_timer tm;
    if (!t->o.checker) {
        /* No checks ever: drop due timers so neither the heap grows nor
         * the scheduler spins on them. */
        while (brk_timerheap_peek(&t->heap, &tm) && tm.due_ms <= now)
            brk_timerheap_pop(&t->heap, &tm);
        return;
    }
    while (t->jlen < t->jcap && brk_timerheap_peek(&t->heap, &tm)
           && tm.due_ms <= now) {
        brk_timerheap_pop(&t->heap, &tm);
        txn_ent *e = txn_tab_find(t, tm.ref);
        if (!e || e->state != BRK_TXN_PREPARED || e->when_ms != tm.due_ms
            || (e->flags & (F_CHECKING | F_RESOLVING | F_STUCK | F_PREPARING
                            | F_MOVING)))
            continue;                    /* a stale timer (or, for one being
                                            copied, resolved or prepared,
                                            re-armed by whoever holds it) */
        e->flags |= F_CHECKING;
        t->jobs[(t->jhead + t->jlen) % t->jcap].hash = tm.ref;
        t->jlen++;
        pthread_cond_signal(&t->wcv);
    }
}

/* ---- state, retention, sweeping, compaction ------------------------------ */

/* Save state.txn and move the retention cursor (not under mu). */
brk_status txn_save_state(brk_txn *t, bool force)
{
    if (!t->rebuilt)
        return BRK_OK;          /* never overwrite state we did not load */
    /* One snapshot under mu: a preparing entry's half_off is a lower bound
     * of where its record goes, and a verdict not registered in `inflight`
     * yet will register a bound >= the log end read here (inflight_add
     * reads it under mu too). */
    pthread_mutex_lock(&t->mu);
    uint64_t min_half = UINT64_MAX;
    for (size_t i = 0; i < t->cap; i++)
        if (t->tab[i].hash && t->tab[i].half_off < min_half)
            min_half = t->tab[i].half_off;
    uint64_t effect_from = UINT64_MAX;
    for (size_t i = 0; i < t->ninflight; i++)
        if (t->inflight[i] < effect_from)
            effect_from = t->inflight[i];
    uint64_t end = txn_log_end(t);
    pthread_mutex_unlock(&t->mu);
    if (effect_from == UINT64_MAX)
        effect_from = end;
    /* Owed effects (a verdict stored, its message not yet) sit at or after
     * their op; the tick retries them, and until then the scan from the
     * previous effect_from must keep covering them. */
    pthread_mutex_lock(&t->mu);
    bool owed = false;
    for (size_t i = 0; i < t->cap && !owed; i++)
        owed = t->tab[i].hash && (t->tab[i].flags & F_EFFECT);
    pthread_mutex_unlock(&t->mu);
    if (owed && t->saved[2] < effect_from)
        effect_from = t->saved[2];
    if (min_half == UINT64_MAX)
        min_half = end;
    uint64_t half_q = 0, op_q = 0;
    brk_status st = brk_store_queue_seek(t->s, BRK_TXN_HALF_TOPIC, 0, 0,
                                         min_half, &half_q);
    if (st == BRK_OK)
        st = brk_store_queue_seek(t->s, BRK_TXN_OP_TOPIC, 0, 0, min_half,
                                  &op_q);
    if (st != BRK_OK)
        return st;
    if (!force && half_q == t->saved[0] && op_q == t->saved[1]
        && effect_from == t->saved[2])
        return BRK_OK;
    /* Every effect completed below effect_from must be durable before the
     * state says so (in ASYNC mode an op can be durable while the message
     * after it is not yet). */
    st = brk_store_flush(t->s);
    if (st != BRK_OK)
        return st;
    uint8_t buf[STATE_LEN] = { 0 };
    brk_st32(buf, 1);
    brk_st64(buf + 8, half_q);
    brk_st64(buf + 16, op_q);
    brk_st64(buf + 24, effect_from);
    st = brk_store_state_write(t->s, "txn", buf, sizeof buf);
    if (st != BRK_OK)
        return st;
    t->saved[0] = half_q;
    t->saved[1] = op_q;
    t->saved[2] = effect_from;
    if (t->cursor_ok)
        st = brk_store_cursor_set(t->s, t->cursor,
                                  min_half < effect_from ? min_half
                                                         : effect_from);
    return st;
}

/* Forget resolved transactions past resolved_keep_ms; re-arm pending ones
 * that lost their timer (a failed heap push). */
void txn_sweep_locked(brk_txn *t, int64_t now)
{
    /* The ring is in resolution order: stop at the first one still kept.
     * One whose effect is still owed (or being written) goes to the back
     * instead, so it cannot hold back the eviction of everything after it. */
    for (size_t seen = 0, n = t->rlen; seen < n && t->rlen > 0; seen++) {
        uint64_t h = t->resolved[t->rhead];
        txn_ent *e = txn_tab_find(t, h);
        if (e && e->state != BRK_TXN_PREPARED
            && !(e->flags & (F_EFFECT | F_RESOLVING))
            && txn_sat_add(e->when_ms, t->o.resolved_keep_ms) > now)
            break;
        t->rhead = (t->rhead + 1) % t->rcap;
        t->rlen--;
        if (e && e->state != BRK_TXN_PREPARED) {
            if (e->flags & (F_EFFECT | F_RESOLVING))
                txn_ring_push(t, h);
            else
                txn_tab_remove(t, e);
        }
    }
    if (t->rearm) {
        t->rearm = false;
        for (size_t i = 0; i < t->cap; i++) {
            txn_ent *e = &t->tab[i];
            if (e->hash && e->state == BRK_TXN_PREPARED
                && !(e->flags & (F_STUCK | F_CHECKING | F_PREPARING)))
                if (brk_timerheap_push(&t->heap, e->when_ms, e->hash) != BRK_OK)
                    t->rearm = true;
        }
    }
    brk_timerheap_shrink(&t->heap);
}

/* Copy the half record of a transaction pending too long to the log end. */
static void compact_one(brk_txn *t, uint64_t hash)
{
    pthread_mutex_lock(&t->mu);
    txn_ent *e = txn_tab_find(t, hash);
    if (!e || e->state != BRK_TXN_PREPARED
        || (e->flags & (F_RESOLVING | F_CHECKING | F_MOVING | F_PREPARING))) {
        pthread_mutex_unlock(&t->mu);
        return;
    }
    e->flags |= F_MOVING;
    uint64_t off = e->half_off;
    uint16_t checks = e->checks;
    int64_t next = e->when_ms;
    pthread_mutex_unlock(&t->mu);

    half_view h;
    brk_status st = txn_read_half(t, off, &h);
    uint8_t *block = NULL;
    brk_append_res ar;
    if (st == BRK_OK) {
        block = malloc(BRK_PROPS_MAX);
        size_t n = 0, pos = 0, blen = 0;
        brk_prop pr, *all = malloc((size_t)64 * 1024 / 4 * sizeof *all);
        st = block && all ? BRK_OK : BRK_NOMEM;
        uint8_t cp[COPY_LEN];
        brk_st16(cp, checks);
        brk_st64(cp + 2, (uint64_t)next);
        brk_st64(cp + 10, off);
        while (st == BRK_OK && brk_props_next(h.r->props, &pos, &pr) == BRK_OK)
            if (!(pr.key.len == 5 && memcmp(pr.key.ptr, "\x1f" "copy", 5) == 0))
                all[n++] = pr;
        if (st == BRK_OK) {
            all[n++] = (brk_prop){ { "\x1f" "copy", 5 }, { cp, COPY_LEN } };
            st = brk_props_encode(all, n, block, BRK_PROPS_MAX, &blen);
        }
        free(all);
        if (st == BRK_OK) {
            brk_append_req rq;
            memset(&rq, 0, sizeof rq);
            rq.topic = BRK_TXN_HALF_TOPIC;
            rq.queue = 0;
            rq.key = h.r->key;
            rq.tag = h.r->tag;
            rq.props.ptr = block;
            rq.props.len = blen;
            rq.body = h.r->body;
            rq.flags = h.r->flags;
            rq.type = BRK_REC_HALF;
            rq.msg_id = h.r->msg_id;
            rq.born_ms = h.r->born_ms;
            rq.allow_internal = true;
            st = brk_store_append(t->s, &rq, &ar);
        }
        brk_batch_free(h.b);
    }
    free(block);
    pthread_mutex_lock(&t->mu);
    e = txn_tab_find(t, hash);
    e->flags &= (uint8_t)~F_MOVING;
    /* A timer that came due during the copy was dropped: re-arm (a spare
     * timer is harmless, dispatch skips stale ones). */
    if (e->state == BRK_TXN_PREPARED && !(e->flags & F_STUCK))
        txn_schedule(t, e, e->when_ms);
    if (st == BRK_OK) {
        e->half_off = ar.log_offset;
        int64_t age = ar.store_ms / 1000 - (int64_t)e->prep_s;
        e->half_age_s = age < 0 ? 0 : age > UINT32_MAX ? UINT32_MAX
                                                       : (uint32_t)age;
        t->st.compacted_total++;
    }
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
}

static void compact(brk_txn *t, int64_t now)
{
    if (t->o.compact_after_ms <= 0)
        return;
    /* A half record is old enough to move when it was written (prepare,
     * or the last copy) more than compact_after_ms ago. */
    pthread_mutex_lock(&t->mu);
    size_t cap = 0, n = 0;
    uint64_t *old = NULL;
    for (size_t i = 0; i < t->cap; i++) {
        txn_ent *e = &t->tab[i];
        if (!e->hash || e->state != BRK_TXN_PREPARED)
            continue;
        if (txn_sat_add(((int64_t)e->prep_s + e->half_age_s) * 1000,
                    t->o.compact_after_ms) > now)
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            uint64_t *v = realloc(old, cap * sizeof *v);
            if (!v)
                break;
            old = v;
        }
        old[n++] = e->hash;
    }
    pthread_mutex_unlock(&t->mu);
    for (size_t i = 0; i < n; i++)
        compact_one(t, old[i]);
    free(old);
}

/* Retry effects owed by stored verdicts. */
void txn_retry_effects(brk_txn *t)
{
    pthread_mutex_lock(&t->mu);
    if (t->effect_hint == 0) {          /* nothing owed: no table scan */
        pthread_mutex_unlock(&t->mu);
        return;
    }
    size_t n = 0, owed = 0;
    uint64_t hv[64];
    for (size_t i = 0; i < t->cap && n < 64; i++) {
        if (!t->tab[i].hash || !(t->tab[i].flags & F_EFFECT))
            continue;
        owed++;                         /* resolving ones too: may fail */
        if (!(t->tab[i].flags & F_RESOLVING))
            hv[n++] = t->tab[i].hash;
    }
    if (owed == 0)
        t->effect_hint = 0;
    pthread_mutex_unlock(&t->mu);
    for (size_t i = 0; i < n; i++) {
        pthread_mutex_lock(&t->mu);
        txn_ent *e = txn_tab_find(t, hv[i]);
        if (!e || !(e->flags & F_EFFECT) || (e->flags & F_RESOLVING)) {
            pthread_mutex_unlock(&t->mu);
            continue;
        }
        e->flags |= F_RESOLVING;
        uint64_t off = e->half_off;
        bool commit = e->state == BRK_TXN_COMMITTED;
        bool expired = e->flags & F_EXPIRED;
        uint16_t checks = e->checks;
        uint64_t lb = txn_inflight_add(t);
        pthread_mutex_unlock(&t->mu);
        brk_status st = txn_do_effect(t, off, commit, expired, checks, NULL, NULL);
        pthread_mutex_lock(&t->mu);
        txn_inflight_del(t, lb);
        e = txn_tab_find(t, hv[i]);
        e->flags &= (uint8_t)~F_RESOLVING;
        if (st == BRK_OK)
            e->flags &= (uint8_t)~F_EFFECT;
        pthread_cond_broadcast(&t->cv);
        pthread_mutex_unlock(&t->mu);
    }
}

brk_status brk_txn_tick(brk_txn *t)
{
    int64_t now = txn_now_ms(t);
    pthread_mutex_lock(&t->mu);
    dispatch_locked(t, now);
    bool sweep = now >= t->next_sweep_ms;
    if (sweep) {
        txn_sweep_locked(t, now);
        t->next_sweep_ms = now + 1000;
    }
    bool save = now >= t->next_save_ms;
    if (save)
        t->next_save_ms = now + t->o.state_interval_ms;
    pthread_mutex_unlock(&t->mu);
    txn_retry_effects(t);
    if (sweep)
        compact(t, now);
    return save ? txn_save_state(t, false) : BRK_OK;
}

void *txn_sched_main(void *arg)
{
    brk_txn *t = arg;
    pthread_mutex_lock(&t->mu);
    while (!t->sched_stop) {
        pthread_mutex_unlock(&t->mu);
        (void)brk_txn_tick(t);
        pthread_mutex_lock(&t->mu);
        if (t->sched_stop)
            break;
        int64_t now = txn_now_ms(t), wait = t->jlen >= t->jcap ? 5 : 1000;
        brk_timer tm;
        if (brk_timerheap_peek(&t->heap, &tm) && t->jlen < t->jcap) {
            int64_t d = tm.due_ms - now;
            wait = d < 0 ? 0 : d < wait ? d : wait;
        }
        if (t->next_save_ms - now < wait)
            wait = t->next_save_ms - now < 0 ? 0 : t->next_save_ms - now;
        if (wait > 0 || t->jlen >= t->jcap) {
            if (wait <= 0)
                wait = 5;                   /* queue full: let workers drain */
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);   /* sleeping only */
            ts.tv_sec += wait / 1000;
            ts.tv_nsec += (long)(wait % 1000) * 1000000L;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&t->scv, &t->mu, &ts);
        }
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}
