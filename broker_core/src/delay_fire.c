/*
 * delay_fire.c - firing a batch (the op record first, then the deliveries;
 * see FIRING PROTOCOL at the top of delay.c), compaction copies, and
 * saving state.delay with the retention cursor.
 */
#define _GNU_SOURCE
#include "delay_priv.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "le.h"

/* ---- delivery ------------------------------------------------------------------ */

/* Append the delayed record at `off` to its target topic.  `defer`: do
 * not wait for the fdatasync in SYNC mode (brk_append_req.defer_sync). */
brk_status dly_deliver(brk_delay *d, uint64_t off, bool defer,
                          brk_append_res *res)
{
    brk_batch *b = NULL;
    brk_status st = brk_store_read_at(d->s, off, &b);
    if (st != BRK_OK)
        return st;
    const brk_record *r = &b->recs[0];
    dmeta m;
    if (!dly_parse_meta(r, &m)) {
        brk_batch_free(b);
        return BRK_CORRUPT;
    }
    uint8_t stack[256];
    uint8_t *props = r->props.len <= sizeof stack ? stack : malloc(r->props.len);
    size_t plen = 0;
    if (!props) {
        brk_batch_free(b);
        return BRK_NOMEM;
    }
    st = brk_props_strip_sys(r->props, props, r->props.len, &plen);
    if (st == BRK_OK) {
        brk_append_req q;
        memset(&q, 0, sizeof q);
        q.topic = m.topic;
        q.queue = -1;
        q.key = r->key;
        q.tag = r->tag;
        q.props = (brk_bytes){ props, plen };
        q.body = r->body;
        q.flags = r->flags;
        q.type = BRK_REC_MSG;
        q.msg_id = r->msg_id;
        q.born_ms = r->born_ms;
        q.defer_sync = defer;
        st = brk_store_append(d->s, &q, res);
    }
    if (props != stack)
        free(props);
    brk_batch_free(b);
    return st;
}

/* Put an item back as pending-without-timer (mu held; room reserved). */
static void to_retry(brk_delay *d, const fire_item *it, int64_t now)
{
    retry_ent *e = &d->retry[d->nretry++];
    e->off = it->off;
    e->first_op = it->first_op;
    e->due_ms = it->due_ms;
    e->attempts = it->attempts + 1;
    e->next_ms = now + dly_backoff_ms(e->attempts);
}

/* Fire items[0..n): one op, then the deliveries.  fire_mu held; the items'
 * slots are INFLIGHT and the retry list has room for all of them.
 *
 * In SYNC mode the op and every delivery but the last are appended with
 * defer_sync, and the last one's fdatasync covers the whole batch (one
 * group commit per batch instead of one per message).  Safe because the log
 * is durable as a prefix: a delivery that survives a crash has its op
 * before it.  If the last append fails, an explicit flush takes its place,
 * so deliveries never wait for the next batch to become visible. */
static brk_status fire_items(brk_delay *d, fire_item *items, size_t n,
                             int64_t now, unsigned *fired)
{
    size_t blen = dly_op_encode(d->opbuf, items, n);
    brk_append_req q;
    memset(&q, 0, sizeof q);
    q.topic = BRK_DELAY_OP_TOPIC;
    q.queue = 0;
    q.type = BRK_REC_OP;
    q.body = (brk_bytes){ d->opbuf, blen };
    q.allow_internal = true;
    q.defer_sync = true;
    brk_append_res res;
    brk_status st = brk_store_append(d->s, &q, &res);
    if (st != BRK_OK) {
        pthread_mutex_lock(&d->mu);
        d->errors_total++;
        for (size_t i = 0; i < n; i++)
            to_retry(d, &items[i], now);
        d->hold_fails++;
        d->hold_until = now + dly_backoff_ms(d->hold_fails);
        pthread_mutex_unlock(&d->mu);
        return st;
    }
    uint64_t op = res.log_offset;
    pthread_mutex_lock(&d->mu);
    d->hold_fails = 0;
    dly_note_append(d, op);
    pthread_mutex_unlock(&d->mu);

    brk_status first = BRK_OK;
    bool unsynced = true;       /* the op, so far */
    for (size_t i = 0; i < n; i++) {
        fire_item *it = &items[i];
        bool defer = i + 1 < n;
        if (it->first_op == NONE || op < it->first_op)
            it->first_op = op;
        st = dly_deliver(d, it->off, defer, &res);
        if (st == BRK_OK)
            unsynced = defer;
        pthread_mutex_lock(&d->mu);
        if (st == BRK_OK) {
            dly_note_append(d, res.log_offset);
            size_t k = dly_ring_find(d, it->off);
            if (k != SIZE_MAX)
                dly_ring_kill(d, k);
            d->fired_total++;
            if (fired)
                (*fired)++;
        } else {
            d->errors_total++;
            to_retry(d, it, now);
            if (first == BRK_OK)
                first = st;
        }
        pthread_mutex_unlock(&d->mu);
    }
    if (unsynced && (st = brk_store_flush(d->s)) != BRK_OK && first == BRK_OK)
        first = st;
    return first;
}

/* Take up to fire_batch due items (retry list first, then timers), marking
 * them INFLIGHT.  mu held.  Returns how many; 0 also when the retry list
 * cannot be grown to hold a failed batch. */
static size_t take_due(brk_delay *d, int64_t now)
{
    size_t cap = d->o.fire_batch, n = 0;
    if (d->nretry + cap > d->retry_cap) {
        size_t want = d->retry_cap + d->retry_cap / 2;
        if (want < d->nretry + cap)
            want = d->nretry + cap;
        retry_ent *r = realloc(d->retry, want * sizeof *r);
        if (!r)
            return 0;
        d->retry = r;
        d->retry_cap = want;
    }
    for (size_t i = 0; i < d->nretry && n < cap;) {
        retry_ent *e = &d->retry[i];
        if (e->next_ms > now) {
            i++;
            continue;
        }
        d->batch[n++] = (fire_item){ e->off, e->first_op, e->due_ms,
                                     e->attempts };
        d->retry[i] = d->retry[--d->nretry];
    }
    if (now < d->hold_until)
        return n;   /* ops are failing: only retries, which then fail fast */
    brk_timer t;
    while (n < cap && brk_timerheap_peek(&d->heap, &t) && t.due_ms <= now) {
        brk_timerheap_pop(&d->heap, &t);
        size_t k = dly_ring_find(d, t.ref);
        if (k == SIZE_MAX || (d->ring[k] & (RING_DEAD | RING_INFLIGHT))) {
            if (d->stale > 0)
                d->stale--;
            continue;
        }
        d->ring[k] |= RING_INFLIGHT;
        d->batch[n++] = (fire_item){ t.ref, NONE, t.due_ms, 0 };
    }
    return n;
}

/* Fire everything due by `now`.  fire_mu held. */
brk_status dly_fire_due(brk_delay *d, int64_t now, unsigned *fired)
{
    brk_status first = BRK_OK;
    for (;;) {
        pthread_mutex_lock(&d->mu);
        size_t n = take_due(d, now);
        dly_heap_tidy(d);
        pthread_mutex_unlock(&d->mu);
        if (n == 0)
            break;
        brk_status st = fire_items(d, d->batch, n, now, fired);
        if (st != BRK_OK && first == BRK_OK)
            first = st;
        if (st != BRK_OK && now < d->hold_until)
            break;   /* the op failed: wait out the backoff */
    }
    return first;
}

/* ---- compaction ---------------------------------------------------------------- */

/* Copy pending records stored more than compact_after_ms ago to the end of
 * __delay.  fire_mu held. */
brk_status dly_compact(brk_delay *d, int64_t now)
{
    if (d->o.compact_after_ms <= 0 || now < d->compact_at)
        return BRK_OK;
    for (uint32_t copies = 0; copies < d->o.fire_batch; copies++) {
        uint64_t off = NONE;
        pthread_mutex_lock(&d->mu);
        for (size_t i = d->rhead; i < d->rhead + d->rlen; i++)
            if (!(d->ring[i] & (RING_DEAD | RING_INFLIGHT))) {
                off = d->ring[i] & RING_OFF;
                break;
            }
        brk_status st = off != NONE ? dly_reserve_slot(d) : BRK_OK;
        pthread_mutex_unlock(&d->mu);
        if (off == NONE) {
            d->compact_at = dly_sat_add(now, d->o.compact_after_ms);
            return BRK_OK;
        }
        if (st != BRK_OK)
            return st;
        brk_batch *b = NULL;
        const brk_record *r = NULL;
        dmeta m;
        uint8_t *props = NULL;
        size_t plen = 0;
        bool young = false;
        st = brk_store_read_at(d->s, off, &b);
        if (st == BRK_OK) {
            r = &b->recs[0];
            if (!dly_parse_meta(r, &m))
                st = BRK_CORRUPT;
            else if (dly_sat_add(r->store_ms, d->o.compact_after_ms) > now)
                young = true;
        }
        if (st == BRK_OK && !young) {
            uint8_t v[8];
            brk_st64(v, off);
            brk_prop moved = { { SYS_MOVED, sizeof SYS_MOVED - 1 }, { v, 8 } };
            st = dly_props_merge(r->props, &moved, 1, &props, &plen);
        }
        brk_append_res res;
        if (st == BRK_OK && !young) {
            brk_append_req q;
            memset(&q, 0, sizeof q);
            q.topic = BRK_DELAY_TOPIC;
            q.queue = 0;
            q.key = r->key;
            q.tag = r->tag;
            q.props = (brk_bytes){ props, plen };
            q.body = r->body;
            q.flags = r->flags;
            q.type = BRK_REC_MSG;
            q.msg_id = r->msg_id;
            q.born_ms = r->born_ms;
            q.allow_internal = true;
            st = brk_store_append(d->s, &q, &res);
        }
        pthread_mutex_lock(&d->mu);
        if (st == BRK_OK && !young) {
            dly_note_append(d, res.log_offset);
            size_t k = dly_ring_find(d, off);
            if (k != SIZE_MAX)
                dly_ring_kill(d, k);
            dly_arm(d, res.log_offset, m.due_ms);
            d->stale++;          /* the original's timer */
            d->compacted_total++;
        } else {
            d->reserved--;
            if (st != BRK_OK)
                d->errors_total++;
        }
        pthread_mutex_unlock(&d->mu);
        if (young)
            d->compact_at = dly_sat_add(r->store_ms, d->o.compact_after_ms);
        free(props);
        brk_batch_free(b);
        if (young)
            return BRK_OK;
        if (st != BRK_OK) {
            d->compact_at = now + BACKOFF_MAX_MS;
            return st;
        }
    }
    return BRK_OK;
}

/* ---- state --------------------------------------------------------------------- */

/* Save state.delay if it changed (see STATE SAVE at the top).  `wait`:
 * block for a save in progress (close) instead of skipping. */
brk_status dly_save_state(brk_delay *d, bool force, bool wait)
{
    if (wait)
        pthread_mutex_lock(&d->save_mu);
    else if (pthread_mutex_trylock(&d->save_mu) != 0)
        return BRK_OK;
    int64_t now = dly_now_ms(d);
    if (!force && now < d->next_save_ms) {
        pthread_mutex_unlock(&d->save_mu);
        return BRK_OK;
    }
    d->next_save_ms = now + d->o.state_interval_ms;

    pthread_mutex_lock(&d->fire_mu);
    pthread_mutex_lock(&d->mu);
    uint64_t xd = dly_ring_low(d);
    if (d->hi_water < xd)
        xd = d->hi_water;
    for (send_slot *p = d->sends; p; p = p->next)
        if (p->floor < xd)
            xd = p->floor;
    uint64_t eff = d->hi_water;
    for (size_t i = 0; i < d->nretry; i++)
        if (d->retry[i].first_op < eff)
            eff = d->retry[i].first_op;
    pthread_mutex_unlock(&d->mu);
    pthread_mutex_unlock(&d->fire_mu);

    brk_status st = BRK_OK;
    if (d->saved_valid && xd == d->saved_xd && eff == d->saved_eff)
        goto out;
    /* Everything counted as done below xd and effect_from is in the log;
     * make it durable before the state file says so. */
    if ((st = brk_store_flush(d->s)) != BRK_OK)
        goto out;
    uint64_t dq, oq;
    bool down = !d->saved_valid || xd < d->saved_xd;
    st = brk_store_queue_seek(d->s, BRK_DELAY_TOPIC, 0,
                              down ? 0 : d->saved_dq, xd, &dq);
    if (st == BRK_OK)
        st = brk_store_queue_seek(d->s, BRK_DELAY_OP_TOPIC, 0,
                                  down ? 0 : d->saved_oq, xd, &oq);
    if (st != BRK_OK)
        goto out;
    uint8_t buf[STATE_LEN];
    brk_st32(buf, STATE_MAGIC);
    brk_st32(buf + 4, STATE_VERSION);
    brk_st64(buf + 8, dq);
    brk_st64(buf + 16, xd);
    brk_st64(buf + 24, oq);
    brk_st64(buf + 32, eff);
    if ((st = brk_store_state_write(d->s, STATE_NAME, buf, sizeof buf))
        != BRK_OK)
        goto out;
    d->saved_valid = true;
    d->saved_xd = xd;
    d->saved_eff = eff;
    d->saved_dq = dq;
    d->saved_oq = oq;
    st = brk_store_cursor_set(d->s, d->cursor, xd < eff ? xd : eff);
out:
    pthread_mutex_unlock(&d->save_mu);
    return st;
}
