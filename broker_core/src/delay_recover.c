/*
 * delay_recover.c - rebuilding pending timers from __delay and __delay_op
 * at open, and deciding by a scan of the log which fired records were
 * really delivered (see "What rebuild concludes" at the top of delay.c).
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

/* ---- rebuild at open ------------------------------------------------------------ */

/* A delayed record seen while rebuilding. */
typedef struct cand {
    uint64_t off;       /* with RING_DEAD / RING_INFLIGHT */
    int64_t due_ms;
} cand;

typedef struct cands {
    cand *v;
    size_t n, cap, dead;
} cands;

/* A record named by an op at or after effect_from. */
typedef struct maybe {
    uint64_t off;
    uint64_t op;
    int64_t due_ms;
    bool known;         /* due_ms, id, topic read */
    bool found;         /* its delivery is in the log */
    uint8_t id[BRK_UUID_LEN];
    char topic[BRK_TOPIC_MAX + 1];
} maybe;

static size_t cand_find(const cands *c, uint64_t off)
{
    size_t lo = 0, hi = c->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        uint64_t v = c->v[mid].off & RING_OFF;
        if (v < off)
            lo = mid + 1;
        else if (v > off)
            hi = mid;
        else
            return mid;
    }
    return SIZE_MAX;
}

static void cand_kill(cands *c, size_t i)
{
    if (!(c->v[i].off & RING_DEAD)) {
        c->v[i].off = (c->v[i].off & RING_OFF) | RING_DEAD;
        c->dead++;
    }
}

static void cand_tidy(cands *c)
{
    if (c->dead < 4096 || c->dead * 2 < c->n)
        return;
    size_t n = 0;
    for (size_t i = 0; i < c->n; i++)
        if (!(c->v[i].off & RING_DEAD))
            c->v[n++] = c->v[i];
    c->n = n;
    c->dead = 0;
}

static brk_status cand_push(cands *c, uint64_t off, int64_t due)
{
    if (c->n == c->cap) {
        size_t want = c->cap ? c->cap + c->cap / 2 : 1024;
        cand *v = realloc(c->v, want * sizeof *v);
        if (!v)
            return BRK_NOMEM;
        c->v = v;
        c->cap = want;
    }
    /* Records come in log order; keep the array sorted anyway. */
    size_t i = c->n++;
    while (i > 0 && (c->v[i - 1].off & RING_OFF) > off) {
        c->v[i] = c->v[i - 1];
        i--;
    }
    c->v[i] = (cand){ off, due };
    return BRK_OK;
}

/* Reads one queue (0) of an internal topic in batches. */
typedef struct qreader {
    const char *topic;
    uint64_t next;
    brk_batch *b;
    size_t i;
    bool end;
} qreader;

static brk_status qr_peek(brk_delay *d, qreader *q, const brk_record **out)
{
    *out = NULL;
    while (!q->end && (!q->b || q->i == q->b->count)) {
        if (q->b) {
            q->next = q->b->next_offset;
            brk_batch_free(q->b);
            q->b = NULL;
        }
        brk_status st = brk_store_read(d->s, q->topic, 0, q->next, 4096, &q->b);
        if (st == BRK_RANGE || st == BRK_NOTFOUND) {
            q->end = true;
            break;
        }
        if (st != BRK_OK)
            return st;
        q->i = 0;
        if (q->b->count == 0)
            q->end = true;
    }
    if (!q->end)
        *out = &q->b->recs[q->i];
    return BRK_OK;
}

static int maybe_by_off(const void *a, const void *b)
{
    const maybe *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

static int maybe_by_id(const void *a, const void *b)
{
    const maybe *x = a, *y = b;
    return memcmp(x->id, y->id, BRK_UUID_LEN);
}

/* Scan the log from `from` for deliveries of the maybes (sorted by id). */
static brk_status scan_deliveries(brk_delay *d, uint64_t from, maybe *m,
                                  size_t nm)
{
    brk_store_stats ss;
    brk_store_get_stats(d->s, &ss);
    if (from < ss.log_start)
        from = ss.log_start;
    uint64_t off = from;
    for (;;) {
        brk_batch *b = NULL;
        brk_status st = brk_store_read_at(d->s, off, &b);
        if (st == BRK_NOTFOUND)
            return BRK_OK;          /* the visible end of the log */
        if (st != BRK_OK)
            return st;
        const brk_record *r = &b->recs[0];
        size_t len = brk_record_size(r);
        bool internal = r->topic.len >= 2
                        && memcmp(r->topic.ptr, "__", 2) == 0;
        if (!internal && r->type == BRK_REC_MSG) {
            maybe key;
            memcpy(key.id, r->msg_id, BRK_UUID_LEN);
            maybe *hit = bsearch(&key, m, nm, sizeof *m, maybe_by_id);
            /* Equal ids sit next to each other: check them all. */
            if (hit) {
                while (hit > m && memcmp(hit[-1].id, key.id, BRK_UUID_LEN) == 0)
                    hit--;
                for (; hit < m + nm
                       && memcmp(hit->id, key.id, BRK_UUID_LEN) == 0; hit++)
                    if (strlen(hit->topic) == r->topic.len
                        && memcmp(hit->topic, r->topic.ptr, r->topic.len) == 0)
                        hit->found = true;
            }
        }
        brk_batch_free(b);
        if (len == 0)
            return BRK_CORRUPT;
        off += len;
    }
}

brk_status dly_rebuild(brk_delay *d, char *errbuf, size_t errlen)
{
    uint64_t dq = 0, oq = 0, eff = 0, xd = 0;
    void *sbuf = NULL;
    size_t slen = 0;
    brk_status st = brk_store_state_read(d->s, STATE_NAME, &sbuf, &slen);
    if (st == BRK_OK && slen == STATE_LEN && brk_ld32(sbuf) == STATE_MAGIC
        && brk_ld32((uint8_t *)sbuf + 4) == STATE_VERSION) {
        const uint8_t *p = sbuf;
        dq = brk_ld64(p + 8);
        xd = brk_ld64(p + 16);
        oq = brk_ld64(p + 24);
        eff = brk_ld64(p + 32);
        d->saved_valid = true;
        d->saved_dq = dq;
        d->saved_xd = xd;
        d->saved_oq = oq;
        d->saved_eff = eff;
    } else if (st != BRK_OK && st != BRK_NOTFOUND && st != BRK_CORRUPT) {
        dly_set_err(errbuf, errlen, "reading state.delay: %s", brk_strerror(st));
        return st;
    }
    /* Anything else (missing, damaged, unknown version): from 0. */
    free(sbuf);

    cands c = { 0 };
    maybe *m = NULL;
    size_t nm = 0, mcap = 0;
    qreader rd = { BRK_DELAY_TOPIC, dq, NULL, 0, false };
    qreader ro = { BRK_DELAY_OP_TOPIC, oq, NULL, 0, false };
    st = BRK_OK;
    /* Walk both queues in log order: an op always follows the records it
     * names and a copy the record it replaces, so one pass resolves all. */
    while (st == BRK_OK) {
        const brk_record *r1, *r2;
        if ((st = qr_peek(d, &rd, &r1)) != BRK_OK
            || (st = qr_peek(d, &ro, &r2)) != BRK_OK)
            break;
        if (!r1 && !r2)
            break;
        if (r1 && (!r2 || r1->log_offset < r2->log_offset)) {
            dmeta mt;
            rd.i++;
            if (!dly_parse_meta(r1, &mt)) {
                d->errors_total++;
                continue;
            }
            if ((st = cand_push(&c, r1->log_offset, mt.due_ms)) != BRK_OK)
                break;
            if (mt.moved) {
                size_t k = cand_find(&c, mt.moved_from);
                if (k != SIZE_MAX)
                    cand_kill(&c, k);
            }
        } else {
            size_t n = dly_op_count(r2);
            ro.i++;
            if (n == 0) {
                d->errors_total++;
                continue;
            }
            for (size_t i = 0; i < n && st == BRK_OK; i++) {
                uint64_t off = dly_op_at(r2, i);
                size_t k = cand_find(&c, off);
                if (r2->log_offset < eff) {
                    if (k != SIZE_MAX)
                        cand_kill(&c, k);
                    continue;
                }
                if (k != SIZE_MAX && !(c.v[k].off & RING_DEAD))
                    c.v[k].off |= RING_INFLIGHT;
                if (nm == mcap) {
                    size_t want = mcap ? mcap * 2 : 64;
                    maybe *nmv = realloc(m, want * sizeof *nmv);
                    if (!nmv) {
                        st = BRK_NOMEM;
                        break;
                    }
                    m = nmv;
                    mcap = want;
                }
                memset(&m[nm], 0, sizeof m[nm]);
                m[nm].off = off;
                m[nm].op = r2->log_offset;
                nm++;
            }
        }
        cand_tidy(&c);
    }
    brk_batch_free(rd.b);
    brk_batch_free(ro.b);
    if (st != BRK_OK) {
        dly_set_err(errbuf, errlen, "rebuilding delay timers: %s: %s",
                brk_strerror(st), brk_store_errstr(d->s));
        goto out;
    }

    /* Records named by ops at or after effect_from: delivered or not? */
    if (nm > 0) {
        qsort(m, nm, sizeof *m, maybe_by_off);
        size_t k = 0;
        for (size_t i = 0; i < nm; i++)     /* one per record, oldest op */
            if (k == 0 || m[k - 1].off != m[i].off)
                m[k++] = m[i];
        nm = k;
        uint64_t from = NONE;
        for (size_t i = 0; i < nm; i++) {
            brk_batch *b = NULL;
            dmeta mt;
            if (m[i].op < from)
                from = m[i].op;
            if (brk_store_read_at(d->s, m[i].off, &b) == BRK_OK
                && dly_parse_meta(&b->recs[0], &mt)) {
                m[i].known = true;
                m[i].due_ms = mt.due_ms;
                memcpy(m[i].id, b->recs[0].msg_id, BRK_UUID_LEN);
                memcpy(m[i].topic, mt.topic, sizeof mt.topic);
            }
            brk_batch_free(b);
        }
        qsort(m, nm, sizeof *m, maybe_by_id);
        if ((st = scan_deliveries(d, from, m, nm)) != BRK_OK) {
            dly_set_err(errbuf, errlen, "scanning for delayed deliveries: %s: %s",
                    brk_strerror(st), brk_store_errstr(d->s));
            goto out;
        }
    }

    /* Build the ring and the heap from what is pending. */
    size_t live = 0, extra = 0;
    for (size_t i = 0; i < c.n; i++)
        live += !(c.v[i].off & RING_DEAD);
    for (size_t i = 0; i < nm; i++)
        extra += !m[i].found;
    size_t want = live + extra + 1024;
    d->ring = malloc(want * sizeof *d->ring);
    d->retry_cap = extra + d->o.fire_batch;
    d->retry = malloc(d->retry_cap * sizeof *d->retry);
    if (!d->ring || !d->retry
        || brk_timerheap_reserve(&d->heap, live + 1024) != BRK_OK) {
        st = BRK_NOMEM;
        dly_set_err(errbuf, errlen, "out of memory for %zu delay timers", live);
        goto out;
    }
    d->rcap = want;
    for (size_t i = 0; i < c.n; i++) {
        uint64_t v = c.v[i].off;
        if (v & RING_DEAD)
            continue;
        d->ring[d->rlen++] = v;
        d->live++;
        if (!(v & RING_INFLIGHT))
            (void)brk_timerheap_push(&d->heap, c.v[i].due_ms, v);
    }
    int64_t now = dly_now_ms(d);
    for (size_t i = 0; i < nm; i++) {
        size_t k = cand_find(&c, m[i].off);
        bool in_ring = k != SIZE_MAX && !(c.v[k].off & RING_DEAD);
        if (m[i].found) {
            if (in_ring) {
                size_t j = dly_ring_find(d, m[i].off);
                if (j != SIZE_MAX)
                    dly_ring_kill(d, j);
            }
            continue;
        }
        /* A record we could not read any more (retention took its segment,
         * which the cursor allows only once it was delivered or superseded)
         * can never be delivered again: it is done, not a retry. */
        if (!in_ring && !m[i].known)
            continue;
        /* Named by an op, not delivered: deliver it again (same op). */
        if (!in_ring)
            dly_ring_insert(d, m[i].off | RING_INFLIGHT);
        d->retry[d->nretry++] = (retry_ent){
            m[i].off, m[i].op, in_ring ? c.v[k].due_ms : m[i].due_ms, now, 0 };
    }
    st = BRK_OK;
out:
    free(c.v);
    free(m);
    return st;
}
