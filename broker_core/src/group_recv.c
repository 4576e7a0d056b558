/*
 * group_recv.c - receiving and settling: qstates (flights and settled
 * spans), retry copies and dead letters, expiry, receive, ack, nack,
 * change_invisibility, dead-letter listing and replay, and lag.
 * The design is at the top of group.c.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "group_priv.h"
#include "le.h"

/* ---- qstate: flights and settled spans (g->mu held) ------------------------------- */

void grp_q_init(qstate *q, uint64_t at)
{
    memset(q, 0, sizeof *q);
    q->committed = q->next = at;
    q->head_due = INT64_MIN;
}

void grp_q_free(qstate *q)
{
    free(q->fl);
    free(q->sp);
}

/* Mark [lo, hi) settled.  Nothing in it may be in flight. */
static brk_status q_settle(qstate *q, uint64_t lo, uint64_t hi)
{
    if (hi <= lo)
        return BRK_OK;
    if (lo <= q->committed) {
        if (hi > q->committed)
            q->committed = hi;
    } else {
        /* Find the first span with hi >= lo (candidates to merge). */
        uint32_t a = 0, b = q->nsp;
        while (a < b) {
            uint32_t mid = a + (b - a) / 2;
            if (q->sp[mid].hi < lo)
                a = mid + 1;
            else
                b = mid;
        }
        uint32_t i = a, j = a;
        while (j < q->nsp && q->sp[j].lo <= hi)
            j++;
        if (i == j) {                     /* no overlap: insert at i */
            if (q->nsp == q->csp) {
                uint32_t nc = q->csp ? q->csp * 2 : 8;
                span *ns = realloc(q->sp, nc * sizeof *ns);
                if (!ns)
                    return BRK_NOMEM;
                q->sp = ns;
                q->csp = nc;
            }
            memmove(q->sp + i + 1, q->sp + i, (q->nsp - i) * sizeof *q->sp);
            q->sp[i] = (span){ lo, hi };
            q->nsp++;
        } else {                          /* merge spans i..j-1 with it */
            uint64_t nlo = q->sp[i].lo < lo ? q->sp[i].lo : lo;
            uint64_t nhi = q->sp[j - 1].hi > hi ? q->sp[j - 1].hi : hi;
            q->sp[i] = (span){ nlo, nhi };
            memmove(q->sp + i + 1, q->sp + j, (q->nsp - j) * sizeof *q->sp);
            q->nsp -= j - i - 1;
        }
    }
    uint32_t k = 0;
    while (k < q->nsp && q->sp[k].lo <= q->committed) {
        if (q->sp[k].hi > q->committed)
            q->committed = q->sp[k].hi;
        k++;
    }
    if (k) {
        memmove(q->sp, q->sp + k, (q->nsp - k) * sizeof *q->sp);
        q->nsp -= k;
    }
    return BRK_OK;
}

/* Move q->next past the settled spans it points into (after a restart,
 * offsets acked out of order lie above next) and return where the next
 * span above it starts (UINT64_MAX: none). */
static uint64_t q_skip_settled(qstate *q)
{
    uint32_t a = 0, b = q->nsp;
    while (a < b) {                 /* first span with hi > next */
        uint32_t mid = a + (b - a) / 2;
        if (q->sp[mid].hi <= q->next)
            a = mid + 1;
        else
            b = mid;
    }
    for (uint32_t i = a; i < q->nsp; i++) {
        if (q->sp[i].lo > q->next)
            return q->sp[i].lo;
        q->next = q->sp[i].hi;
    }
    return UINT64_MAX;
}

static int64_t flight_find(const qstate *q, uint64_t off)
{
    uint32_t a = 0, b = q->nfl;
    while (a < b) {
        uint32_t mid = a + (b - a) / 2;
        if (q->fl[mid].off < off)
            a = mid + 1;
        else if (q->fl[mid].off > off)
            b = mid;
        else
            return mid;
    }
    return -1;
}

static brk_status flight_reserve(qstate *q)
{
    if (q->nfl < q->cfl)
        return BRK_OK;
    uint32_t nc = q->cfl ? q->cfl * 2 : 8;
    flight *nf = realloc(q->fl, nc * sizeof *nf);
    if (!nf)
        return BRK_NOMEM;
    q->fl = nf;
    q->cfl = nc;
    return BRK_OK;
}

/* Add a flight (room reserved); offsets only grow, so it goes last. */
static void flight_push(qstate *q, const flight *f)
{
    uint32_t i = q->nfl;
    while (i > 0 && q->fl[i - 1].off > f->off) {
        q->fl[i] = q->fl[i - 1];
        i--;
    }
    q->fl[i] = *f;
    q->nfl++;
}

/* Remove flight i and settle its offset. */
static void settle_flight(member *m, qstate *q, uint32_t i)
{
    flight f = q->fl[i];
    if (f.state == FL_OUT) {
        m->inflight--;
        m->inflight_bytes -= f.bytes;
    }
    memmove(q->fl + i, q->fl + i + 1, (q->nfl - i - 1) * sizeof *q->fl);
    q->nfl--;
    (void)q_settle(q, f.off, f.off + 1);
}

/* ---- copies: retry and dead letter ------------------------------------------------ */

/* A new props block: the user pairs of `user` (system pairs dropped, and
 * with drop_dlq the "outboxd-dlq-*" pairs), then `extra`.  *out is
 * malloc'ed. */
static brk_status props_build(brk_bytes user, const brk_prop *extra,
                              size_t nextra, bool drop_dlq, uint8_t **out,
                              size_t *len)
{
    size_t n = 0, pos = 0, cap = 2 + user.len;
    brk_prop p;
    brk_status st;
    while ((st = brk_props_next(user, &pos, &p)) == BRK_OK)
        n++;
    if (st != BRK_EMPTY)
        return BRK_BADREC;
    for (size_t i = 0; i < nextra; i++)
        cap += 4 + extra[i].key.len + extra[i].value.len;
    brk_prop *v = malloc((n + nextra + 1) * sizeof *v);
    uint8_t *buf = malloc(cap);
    if (!v || !buf) {
        free(v);
        free(buf);
        return BRK_NOMEM;
    }
    size_t k = 0;
    pos = 0;
    while (brk_props_next(user, &pos, &p) == BRK_OK) {
        const char *key = p.key.ptr;
        if (p.key.len > 0 && key[0] == BRK_SYSPROP_CHAR)
            continue;
        if (drop_dlq && p.key.len >= sizeof DLQ_PREFIX - 1
            && memcmp(key, DLQ_PREFIX, sizeof DLQ_PREFIX - 1) == 0)
            continue;
        v[k++] = p;
    }
    for (size_t i = 0; i < nextra; i++)
        v[k++] = extra[i];
    st = brk_props_encode(v, k, buf, cap, len);
    free(v);
    if (st != BRK_OK) {
        free(buf);
        return st;
    }
    *out = buf;
    return BRK_OK;
}

/* Where a delivered record came from: its own topic/queue/offset, or for
 * a retry copy what its system props say. */
typedef struct orig {
    const char *topic;
    size_t tlen;
    uint16_t queue;
    uint64_t off;
    uint32_t count;             /* retry copies: deliveries before the copy */
    int64_t  notbefore;
    brk_bytes reason;
} orig;

static void orig_of(const brk_record *rec, bool retry, const char *topic,
                    uint16_t queue, uint64_t off, orig *o)
{
    memset(o, 0, sizeof *o);
    o->topic = topic;
    o->tlen = strlen(topic);
    o->queue = queue;
    o->off = off;
    if (!retry)
        return;
    brk_bytes v;
    if (brk_props_get(rec->props, SYS_OTOPIC, &v) == BRK_OK && v.len > 0
        && v.len <= BRK_TOPIC_MAX) {
        o->topic = v.ptr;
        o->tlen = v.len;
    }
    if (brk_props_get(rec->props, SYS_OQUEUE, &v) == BRK_OK && v.len == 2)
        o->queue = brk_ld16(v.ptr);
    if (brk_props_get(rec->props, SYS_OOFFSET, &v) == BRK_OK && v.len == 8)
        o->off = brk_ld64(v.ptr);
    if (brk_props_get(rec->props, SYS_COUNT, &v) == BRK_OK && v.len == 4)
        o->count = brk_ld32(v.ptr);
    if (brk_props_get(rec->props, SYS_NOTBEFORE, &v) == BRK_OK && v.len == 8)
        o->notbefore = (int64_t)brk_ld64(v.ptr);
    if (brk_props_get(rec->props, SYS_REASON, &v) == BRK_OK)
        o->reason = v;
}

static void req_from(brk_append_req *q, const brk_record *rec)
{
    memset(q, 0, sizeof *q);
    q->key = rec->key;
    q->tag = rec->tag;
    q->body = rec->body;
    q->flags = rec->flags;
    q->type = BRK_REC_MSG;
    q->msg_id = rec->msg_id;
    q->born_ms = rec->born_ms;
}

/* Append a copy of rec to m's retry queue for `level`, due at notbefore. */
static brk_status retry_copy(brk_groups *G, group *g, member *m, uint32_t k,
                             const brk_record *rec, const orig *o,
                             uint32_t count, int level, int64_t notbefore,
                             brk_bytes reason, bool defer)
{
    brk_status st = grp_retry_topic_ensure(G, g, m, k);
    if (st != BRK_OK)
        return st;
    uint8_t oq[2], oo[8], cn[4], nb[8];
    brk_st16(oq, o->queue);
    brk_st64(oo, o->off);
    brk_st32(cn, count);
    brk_st64(nb, (uint64_t)notbefore);
    brk_prop sys[6] = {
        { { SYS_OTOPIC, sizeof SYS_OTOPIC - 1 }, { o->topic, o->tlen } },
        { { SYS_OQUEUE, sizeof SYS_OQUEUE - 1 }, { oq, 2 } },
        { { SYS_OOFFSET, sizeof SYS_OOFFSET - 1 }, { oo, 8 } },
        { { SYS_COUNT, sizeof SYS_COUNT - 1 }, { cn, 4 } },
        { { SYS_NOTBEFORE, sizeof SYS_NOTBEFORE - 1 }, { nb, 8 } },
        { { SYS_REASON, sizeof SYS_REASON - 1 }, reason },
    };
    size_t nsys = reason.len > 0 ? 6 : 5;
    uint8_t *props = NULL;
    size_t plen = 0;
    st = props_build(rec->props, sys, nsys, false, &props, &plen);
    if (st == BRK_TOOBIG && nsys == 6)      /* no room for the reason */
        st = props_build(rec->props, sys, 5, false, &props, &plen);
    if (st != BRK_OK)
        return st;
    brk_append_req q;
    req_from(&q, rec);
    q.topic = m->retry_topic;
    q.queue = (int32_t)(k * LEVELS + (uint32_t)(level - 1));
    q.props = (brk_bytes){ props, plen };
    q.allow_internal = true;
    q.defer_sync = defer;
    brk_append_res ar;
    st = brk_store_append(G->s, &q, &ar);
    free(props);
    if (st == BRK_OK)
        grp_arm(G, g, notbefore);
    return st;
}

/* Append rec to the group's dead-letter topic. */
static brk_status dead_letter(brk_groups *G, group *g, const member *m,
                              const brk_record *rec, const orig *o,
                              uint32_t count, brk_bytes reason, bool defer)
{
    brk_status st = brk_topic_create(G->s, g->dlq_topic, 1);
    if (st != BRK_OK && st != BRK_EXISTS)
        return st;
    char qs[8], os[24], cs[12];
    snprintf(qs, sizeof qs, "%u", (unsigned)o->queue);
    snprintf(os, sizeof os, "%" PRIu64, o->off);
    snprintf(cs, sizeof cs, "%u", count);
    if (reason.len > REASON_MAX)
        reason.len = REASON_MAX;
#define P_(k, v, l) { { k, sizeof k - 1 }, { v, l } }
    brk_prop h[7] = {
        P_(DLQ_PREFIX "topic", o->topic, o->tlen),
        P_(DLQ_PREFIX "queue", qs, strlen(qs)),
        P_(DLQ_PREFIX "offset", os, strlen(os)),
        P_(DLQ_PREFIX "deliveries", cs, strlen(cs)),
        P_(DLQ_PREFIX "group", g->name, strlen(g->name)),
    };
    size_t nh = 5;
    if (m->name[0]) {
        brk_prop p = P_(DLQ_PREFIX "member", m->name, strlen(m->name));
        h[nh++] = p;
    }
    if (reason.len > 0) {
        brk_prop p = P_(DLQ_PREFIX "reason", reason.ptr, reason.len);
        h[nh++] = p;
    }
#undef P_
    uint8_t *props = NULL;
    size_t plen = 0;
    st = props_build(rec->props, h, nh, true, &props, &plen);
    if (st == BRK_TOOBIG && reason.len > 0)
        st = props_build(rec->props, h, nh - 1, true, &props, &plen);
    if (st != BRK_OK)
        return st;
    brk_append_req q;
    req_from(&q, rec);
    q.topic = g->dlq_topic;
    q.queue = 0;
    q.props = (brk_bytes){ props, plen };
    q.allow_internal = true;
    q.defer_sync = defer;
    brk_append_res ar;
    st = brk_store_append(G->s, &q, &ar);
    free(props);
    return st;
}

/* A location of a flight that survives reallocations. */
typedef struct floc {
    uint32_t k;                 /* subscription */
    bool retry;                 /* a retry queue (else a main queue) */
    uint32_t i;                 /* index among the main or retry queues */
    uint64_t off;
} floc;

static qstate *loc_q(member *m, const floc *l, bool *retry, uint16_t *queue)
{
    if (l->k >= m->nss)
        return NULL;
    substate *ss = &m->ss[l->k];
    *retry = l->retry;
    if (!l->retry) {
        if (l->i >= ss->nmq)
            return NULL;
        *queue = (uint16_t)l->i;
        return &ss->mq[l->i];
    }
    if (l->i >= ss->nrq)
        return NULL;
    *queue = (uint16_t)(l->k * LEVELS + l->i);
    return &ss->rq[l->i];
}

/* A delivery failed (nack, expiry): dead-letter it at max_deliveries,
 * else (non-FIFO) copy it to the retry queue, or (FIFO) put it in WAIT.
 * The retry delay counts from the failure: now for a nack, the moment the
 * invisibility ran out for an expiry (however late the tick noticed it).
 * *settle says the caller must settle it once the copy is durable.  On a
 * failed append the flight stays OUT, due again after a backoff.  g->mu
 * held. */
static brk_status fail_one(brk_groups *G, group *g, member *m, const floc *l,
                           int64_t delay_ms, brk_bytes reason, bool defer,
                           bool expired, int64_t now, bool *settle)
{
    *settle = false;
    bool retry;
    uint16_t queue;
    qstate *q = loc_q(m, l, &retry, &queue);
    int64_t i = q ? flight_find(q, l->off) : -1;
    if (i < 0)
        return BRK_CONFLICT;
    flight *f = &q->fl[i];
    uint32_t count = f->count;
    int64_t base = expired && f->visible_at < now ? f->visible_at : now;
    bool dlq = count >= g->cfg.max_deliveries;
    int64_t delay = delay_ms > 0 ? brk_delay_level_ms(grp_level_for(delay_ms))
                                 : brk_group_retry_delay_ms(count);
    if (g->cfg.fifo && !dlq) {
        if (f->state == FL_OUT) {
            m->inflight--;
            m->inflight_bytes -= f->bytes;
        }
        f->state = FL_WAIT;
        f->visible_at = base + delay;
        grp_arm(G, g, f->visible_at);
        return BRK_OK;
    }
    brk_batch *b = NULL;
    brk_status st = brk_store_read_at(G->s, f->log_off, &b);
    if (st == BRK_NOTFOUND) {       /* removed by retention: nothing to keep */
        *settle = true;
        return BRK_OK;
    }
    if (st == BRK_OK && b->count != 1)
        st = BRK_CORRUPT;
    if (st == BRK_OK) {
        const brk_record *rec = &b->recs[0];
        orig o;
        orig_of(rec, retry, g->subs[l->k].topic, queue, l->off, &o);
        brk_bytes rs = reason.len ? reason : o.reason;
        if (dlq) {
            st = dead_letter(G, g, m, rec, &o, count, rs, defer);
        } else {
            int level = grp_level_for(delay);
            st = retry_copy(G, g, m, l->k, rec, &o, count, level,
                            base + brk_delay_level_ms(level), rs, defer);
        }
    }
    brk_batch_free(b);
    if (st == BRK_OK) {
        *settle = true;
    } else {
        q = loc_q(m, l, &retry, &queue);
        i = q ? flight_find(q, l->off) : -1;
        if (i >= 0) {
            q->fl[i].visible_at = now + FAIL_BACKOFF_MS;
            grp_note_vis(m, q->fl[i].visible_at);
            grp_arm(G, g, q->fl[i].visible_at);
        }
    }
    return st;
}

/* Settle the flight at l (after fail_one said so). */
static void settle_loc(brk_groups *G, group *g, member *m, const floc *l)
{
    bool retry;
    uint16_t queue;
    qstate *q = loc_q(m, l, &retry, &queue);
    int64_t i = q ? flight_find(q, l->off) : -1;
    if (i >= 0) {
        settle_flight(m, q, (uint32_t)i);
        grp_mark_dirty(G);
        (void)g;
    }
}

/* Handle m's deliveries whose invisibility ran out.  In SYNC mode the
 * copies of one round are appended with defer_sync and made durable by one
 * flush before any original is settled.  g->mu held. */
static brk_status expire_member(brk_groups *G, group *g, member *m,
                                int64_t now)
{
    if (now < m->min_vis)
        return BRK_OK;
    floc *ex = NULL;
    size_t n = 0, cap = 0;
    brk_status st = BRK_OK;
    int64_t rest = INT64_MAX;       /* earliest expiry that stays */
    for (uint32_t k = 0; k < m->nss; k++) {
        substate *ss = &m->ss[k];
        uint32_t nq = ss->nmq + ss->nrq;
        for (uint32_t qi = 0; qi < nq; qi++) {
            qstate *q = qi < ss->nmq ? &ss->mq[qi] : &ss->rq[qi - ss->nmq];
            for (uint32_t i = 0; i < q->nfl; i++) {
                if (q->fl[i].state != FL_OUT)
                    continue;
                if (q->fl[i].visible_at > now) {
                    if (q->fl[i].visible_at < rest)
                        rest = q->fl[i].visible_at;
                    continue;
                }
                if (n == cap) {
                    size_t nc = cap ? cap * 2 : 16;
                    floc *ne = realloc(ex, nc * sizeof *ne);
                    if (!ne) {
                        st = BRK_NOMEM;
                        goto scan_done;
                    }
                    ex = ne;
                    cap = nc;
                }
                bool r = qi >= ss->nmq;
                ex[n++] = (floc){ k, r, r ? qi - ss->nmq : qi, q->fl[i].off };
            }
        }
    }
scan_done:
    if (st == BRK_OK)
        m->min_vis = rest;      /* failures below lower it again */
    if (n == 0) {
        free(ex);
        return st;
    }
    bool defer = G->sync_mode && n > 1;
    bool *ok = calloc(n, sizeof *ok);
    if (!ok) {
        free(ex);
        return BRK_NOMEM;
    }
    size_t nok = 0;
    brk_bytes reason = { TIMEOUT_REASON, sizeof TIMEOUT_REASON - 1 };
    for (size_t i = 0; i < n; i++) {
        brk_status s1 = fail_one(G, g, m, &ex[i], 0, reason, defer, true, now,
                                 &ok[i]);
        if (s1 != BRK_OK && st == BRK_OK)
            st = s1;
        nok += ok[i];
    }
    if (defer && nok > 0) {
        brk_status s2 = brk_store_flush(G->s);
        if (s2 != BRK_OK) {      /* keep them all; they come back */
            if (st == BRK_OK)
                st = s2;
            for (size_t i = 0; i < n; i++)
                if (ok[i]) {
                    ok[i] = false;
                    bool r;
                    uint16_t qq;
                    qstate *q = loc_q(m, &ex[i], &r, &qq);
                    int64_t j = q ? flight_find(q, ex[i].off) : -1;
                    if (j >= 0) {
                        q->fl[j].visible_at = now + FAIL_BACKOFF_MS;
                        grp_note_vis(m, q->fl[j].visible_at);
                    }
                }
            grp_arm(G, g, now + FAIL_BACKOFF_MS);
        }
    }
    for (size_t i = 0; i < n; i++)
        if (ok[i])
            settle_loc(G, g, m, &ex[i]);
    free(ok);
    free(ex);
    return st;
}

/* ---- receive ---------------------------------------------------------------------- */

typedef struct rbuild {
    brk_receive_batch *b;
    void **chunks;              /* b->priv_: one malloc'ed copy per message */
    uint32_t max;
} rbuild;

void brk_receive_batch_free(brk_receive_batch *b)
{
    if (!b)
        return;
    void **chunks = b->priv_;
    if (chunks)
        for (size_t i = 0; i < b->count; i++)
            free(chunks[i]);
    free(chunks);
    free(b->msgs);
    free(b);
}

static brk_status rb_init(rbuild *rb, uint32_t max)
{
    rb->max = max;
    rb->b = calloc(1, sizeof *rb->b);
    if (!rb->b)
        return BRK_NOMEM;
    rb->b->msgs = calloc(max, sizeof *rb->b->msgs);
    rb->chunks = calloc(max, sizeof *rb->chunks);
    rb->b->priv_ = rb->chunks;
    if (!rb->b->msgs || !rb->chunks) {
        brk_receive_batch_free(rb->b);
        rb->b = NULL;
        return BRK_NOMEM;
    }
    return BRK_OK;
}

/* Copy rec into the batch as seen by the consumer: `o` gives the topic,
 * queue and offset it reports, props lose their system pairs. */
static brk_status rb_add(rbuild *rb, const brk_record *rec, const orig *o,
                         uint32_t count, const char *receipt)
{
    size_t need = o->tlen + rec->key.len + rec->tag.len + rec->props.len
                  + rec->body.len + 1;
    uint8_t *c = malloc(need);
    if (!c)
        return BRK_NOMEM;
    brk_received *r = &rb->b->msgs[rb->b->count];
    memset(r, 0, sizeof *r);
    snprintf(r->receipt, sizeof r->receipt, "%s", receipt);
    r->queue = o->queue;
    r->offset = o->off;
    r->delivery_count = count;
    r->rec = *rec;
    size_t p = 0;
    memcpy(c + p, o->topic, o->tlen);
    r->rec.topic = (brk_bytes){ c + p, o->tlen };
    p += o->tlen;
    memcpy(c + p, rec->key.ptr, rec->key.len);
    r->rec.key = (brk_bytes){ c + p, rec->key.len };
    p += rec->key.len;
    memcpy(c + p, rec->tag.ptr, rec->tag.len);
    r->rec.tag = (brk_bytes){ c + p, rec->tag.len };
    p += rec->tag.len;
    size_t plen = 0;
    if (rec->props.len > 0
        && brk_props_strip_sys(rec->props, c + p, rec->props.len, &plen)
               != BRK_OK)
        plen = 0;
    r->rec.props = (brk_bytes){ c + p, plen };
    p += plen;
    memcpy(c + p, rec->body.ptr, rec->body.len);
    r->rec.body = (brk_bytes){ c + p, rec->body.len };
    r->rec.queue = o->queue;
    r->rec.queue_offset = o->off;
    rb->chunks[rb->b->count] = c;
    rb->b->count++;
    return BRK_OK;
}

static void make_receipt(const brk_groups *G, uint32_t k, uint32_t midx,
                         bool retry, uint16_t queue, uint64_t off,
                         uint64_t gen, char out[BRK_RECEIPT_MAX + 1])
{
    snprintf(out, BRK_RECEIPT_MAX + 1, "%s.%u.%u.%c.%u.%" PRIu64 ".%" PRIu64,
             G->epoch, k, midx, retry ? 'r' : 'm', (unsigned)queue, off, gen);
}

/* Whether one more message of `bytes` fits m's in-flight bounds (a lone
 * message always fits, however large). */
static bool room(const group *g, const member *m, uint32_t bytes)
{
    if (m->inflight >= g->cfg.max_inflight)
        return false;
    return m->inflight == 0
           || m->inflight_bytes + bytes <= g->cfg.max_inflight_bytes;
}

typedef struct rctx {
    int64_t now;
    uint32_t invisible;
    rbuild *rb;
    bool limited;               /* stopped by the in-flight bound */
    bool handed;                /* something was handed out */
} rctx;

/* Settle offset `off` == q->next without delivering it. */
static void skip_one(brk_groups *G, group *g, qstate *q, uint64_t off)
{
    (void)q_settle(q, off, off + 1);
    q->next = off + 1;
    g->progress = true;
    grp_mark_dirty(G);
}

/* Deliver from one queue of subscription k into rc->rb.  g->mu held. */
static brk_status take_from(brk_groups *G, group *g, member *m, uint32_t k,
                            uint32_t qi, rctx *rc)
{
    substate *ss = &m->ss[k];
    bool retry = qi >= ss->nmq;
    uint32_t ri = retry ? qi - ss->nmq : 0;
    qstate *q = retry ? &ss->rq[ri] : &ss->mq[qi];
    const char *topic = retry ? m->retry_topic : g->subs[k].topic;
    uint16_t queue = (uint16_t)(retry ? k * LEVELS + ri : qi);
    const filter *f = &g->subs[k].f;
    bool fifo = g->cfg.fifo;
    char receipt[BRK_RECEIPT_MAX + 1];
    brk_status st;

    if (fifo && q->nfl > 0) {       /* blocked, or its retry is due */
        flight *fl = &q->fl[0];
        if (fl->state != FL_WAIT || fl->visible_at > rc->now)
            return BRK_OK;
        if (!room(g, m, fl->bytes)) {
            rc->limited = true;
            return BRK_OK;
        }
        brk_batch *b = NULL;
        st = brk_store_read_at(G->s, fl->log_off, &b);
        if (st == BRK_NOTFOUND) {
            settle_flight(m, q, 0);
            grp_mark_dirty(G);
            return BRK_OK;
        }
        if (st == BRK_OK && b->count != 1)
            st = BRK_CORRUPT;
        if (st != BRK_OK) {
            brk_batch_free(b);
            return st;
        }
        uint64_t gen = ++g->gen;
        orig o;
        orig_of(&b->recs[0], false, g->subs[k].topic, queue, fl->off, &o);
        make_receipt(G, k, m->idx, false, queue, fl->off, gen, receipt);
        st = rb_add(rc->rb, &b->recs[0], &o, fl->count + 1, receipt);
        brk_batch_free(b);
        if (st != BRK_OK)
            return st;
        fl->count++;
        fl->gen = gen;
        fl->state = FL_OUT;
        fl->visible_at = rc->now + rc->invisible;
        grp_note_vis(m, fl->visible_at);
        m->inflight++;
        m->inflight_bytes += fl->bytes;
        rc->handed = true;
        return BRK_OK;
    }

    uint32_t want = fifo ? 1 : rc->rb->max - (uint32_t)rc->rb->b->count;
    brk_cq_entry ents[ENTRY_CHUNK];
    while (want > 0) {
        size_t n = 0;
        uint64_t first = q->next;
        size_t ask = f->all ? (want < ENTRY_CHUNK ? want : ENTRY_CHUNK)
                            : ENTRY_CHUNK;
        uint64_t span_lo = q_skip_settled(q);
        if (span_lo - q->next < ask)
            ask = (size_t)(span_lo - q->next);
        st = brk_store_read_entries(G->s, topic, queue, q->next, ents, ask, &n,
                                    &first);
        if (st == BRK_NOTFOUND)
            return BRK_OK;
        if (st == BRK_RANGE) {
            /* next is beyond the queue's end (it lost data): restart there. */
            uint64_t mn = 0, mx = 0;
            if (brk_store_queue_range(G->s, topic, queue, &mn, &mx) == BRK_OK
                && q->nfl == 0 && mx < q->next) {
                q->committed = q->next = mx;
                q->nsp = 0;
                grp_mark_dirty(G);
            }
            return BRK_OK;
        }
        if (st != BRK_OK)
            return st;
        if (first > q->next) {      /* retention removed what we had not read */
            (void)q_settle(q, q->next, first);
            q->next = first;
            grp_mark_dirty(G);
        }
        if (n == 0)
            return BRK_OK;
        for (size_t j = 0; j < n; j++) {
            uint64_t off = first + j;
            const brk_cq_entry *e = &ents[j];
            if (!grp_filter_hash_ok(f, e->tag_hash)) {
                skip_one(G, g, q, off);
                continue;
            }
            if (!room(g, m, e->size)) {
                rc->limited = true;
                return BRK_OK;
            }
            brk_batch *b = NULL;
            st = brk_store_read_at(G->s, e->log_offset, &b);
            if (st == BRK_NOTFOUND) {
                skip_one(G, g, q, off);
                continue;
            }
            if (st == BRK_OK && b->count != 1)
                st = BRK_CORRUPT;
            if (st != BRK_OK) {
                brk_batch_free(b);
                return st;
            }
            const brk_record *rec = &b->recs[0];
            if (!grp_filter_tag_ok(f, rec->tag)) {
                brk_batch_free(b);
                skip_one(G, g, q, off);
                continue;
            }
            orig o;
            orig_of(rec, retry, g->subs[k].topic, queue, off, &o);
            uint32_t count = 1;
            if (retry) {
                if (o.notbefore > rc->now) {     /* head not due yet */
                    q->head_off = off;
                    q->head_due = o.notbefore;
                    grp_arm(G, g, o.notbefore);
                    brk_batch_free(b);
                    return BRK_OK;
                }
                count = o.count + 1;
            }
            if ((st = flight_reserve(q)) != BRK_OK) {
                brk_batch_free(b);
                return st;
            }
            uint64_t gen = ++g->gen;
            make_receipt(G, k, m->idx, retry, queue, off, gen, receipt);
            st = rb_add(rc->rb, rec, &o, count, receipt);
            brk_batch_free(b);
            if (st != BRK_OK)
                return st;
            flight fl = { off, e->log_offset, gen, rc->now + rc->invisible,
                          count, e->size, FL_OUT };
            flight_push(q, &fl);
            grp_note_vis(m, fl.visible_at);
            m->inflight++;
            m->inflight_bytes += e->size;
            q->next = off + 1;
            g->progress = true;
            rc->handed = true;
            grp_mark_dirty(G);
            if (--want == 0)
                return BRK_OK;
        }
    }
    return BRK_OK;
}

/* The due time of retry queue ri's head: INT64_MAX when empty, <= now when
 * deliverable.  g->mu held. */
static int64_t retry_head(brk_groups *G, member *m, uint32_t k, uint32_t ri,
                          qstate *q)
{
    if (q->head_due != INT64_MIN && q->head_off == q->next)
        return q->head_due;
    uint16_t queue = (uint16_t)(k * LEVELS + ri);
    brk_cq_entry e;
    size_t n = 0;
    uint64_t first = q->next;
    if (brk_store_read_entries(G->s, m->retry_topic, queue, q->next, &e, 1, &n,
                               &first) != BRK_OK)
        return INT64_MAX;
    if (n == 0)
        return INT64_MAX;
    if (first != q->next)
        return INT64_MIN + 1;       /* a receive must fix next: "due" */
    brk_batch *b = NULL;
    if (brk_store_read_at(G->s, e.log_offset, &b) != BRK_OK || b->count != 1) {
        brk_batch_free(b);
        return INT64_MIN + 1;
    }
    brk_bytes v;
    int64_t due = INT64_MIN + 1;
    if (brk_props_get(b->recs[0].props, SYS_NOTBEFORE, &v) == BRK_OK
        && v.len == 8)
        due = (int64_t)brk_ld64(v.ptr);
    brk_batch_free(b);
    q->head_off = q->next;
    q->head_due = due;
    return due;
}

/* Whether a message of `bytes` fits m's in-flight bounds, as room() says;
 * a refusal is remembered in m->blocked so that the next settle wakes the
 * member's waiters. */
static bool fits(const group *g, member *m, uint32_t bytes)
{
    if (room(g, m, bytes))
        return true;
    m->blocked = true;
    return false;
}

/* Whether the entry at q->next of (topic, queue) fits m's bounds (true when
 * it cannot be read: a receive will find out).  g->mu held. */
static bool next_fits(brk_groups *G, const group *g, member *m,
                      const char *topic, uint16_t queue, qstate *q)
{
    if (m->inflight == 0)
        return fits(g, m, 0);
    (void)q_skip_settled(q);
    brk_cq_entry e;
    size_t n = 0;
    uint64_t first = q->next;
    if (brk_store_read_entries(G->s, topic, queue, q->next, &e, 1, &n,
                               &first) != BRK_OK || n == 0)
        return true;
    return fits(g, m, e.size);
}

/* Whether a receive by m for subscription k would find something now: a
 * message that is ready and fits the in-flight bounds (the same room()
 * test the receive applies, so that a waiter at the byte bound sleeps
 * until a settle frees room instead of waking at once, again and again).
 * g->mu held. */
bool grp_has_work(brk_groups *G, group *g, member *m, uint32_t k,
                  int64_t now)
{
    if (!fits(g, m, 0))
        return false;
    substate *ss;
    if (grp_ss_ensure(G, g, m, k, &ss) != BRK_OK)
        return false;
    for (uint32_t qi = 0; qi < ss->nmq; qi++) {
        qstate *q = &ss->mq[qi];
        if (g->cfg.fifo && q->nfl > 0) {
            if (q->fl[0].state == FL_WAIT && q->fl[0].visible_at <= now
                && fits(g, m, q->fl[0].bytes))
                return true;
            continue;
        }
        uint64_t mn = 0, mx = 0;
        if (brk_store_queue_range(G->s, g->subs[k].topic, (uint16_t)qi, &mn,
                                  &mx) == BRK_OK && q->next < mx
            && next_fits(G, g, m, g->subs[k].topic, (uint16_t)qi, q))
            return true;
    }
    for (uint32_t ri = 0; !g->cfg.fifo && ri < ss->nrq; ri++)
        if (retry_head(G, m, k, ri, &ss->rq[ri]) <= now
            && next_fits(G, g, m, m->retry_topic,
                         (uint16_t)(k * LEVELS + ri), &ss->rq[ri]))
            return true;
    return false;
}

/* The earliest time after `now` something of g comes due: an expiry, a
 * FIFO retry, a retry queue's head (what is due already was handled or
 * announced by the caller).  g->mu held. */
static int64_t next_event(brk_groups *G, group *g, int64_t now)
{
    int64_t next = INT64_MAX;
    for (uint32_t mi = 0; mi < g->nmembers; mi++) {
        member *m = g->members[mi];
        for (uint32_t k = 0; k < m->nss; k++) {
            substate *ss = &m->ss[k];
            uint32_t nq = ss->nmq + ss->nrq;
            for (uint32_t qi = 0; qi < nq; qi++) {
                qstate *q = qi < ss->nmq ? &ss->mq[qi] : &ss->rq[qi - ss->nmq];
                for (uint32_t i = 0; i < q->nfl; i++)
                    if (q->fl[i].visible_at > now && q->fl[i].visible_at < next)
                        next = q->fl[i].visible_at;
            }
            for (uint32_t ri = 0; !g->cfg.fifo && ri < ss->nrq; ri++) {
                int64_t d = retry_head(G, m, k, ri, &ss->rq[ri]);
                if (d > now && d < next)
                    next = d;
            }
        }
    }
    return next;
}

typedef struct wake_ent {
    char topic[BRK_TOPIC_MAX + 1];
    char member[BRK_MEMBER_MAX + 1];
} wake_ent;

typedef struct wake_list {
    wake_ent *v;
    size_t n, cap;
} wake_list;

/* Remember to wake the waiters of (topic, member); false when out of
 * memory. */
static bool wake_add(wake_list *wl, const char *topic, const char *mem)
{
    if (wl->n == wl->cap) {
        size_t nc = wl->cap ? wl->cap * 2 : 4;
        wake_ent *nv = realloc(wl->v, nc * sizeof *nv);
        if (!nv)
            return false;
        wl->v = nv;
        wl->cap = nc;
    }
    snprintf(wl->v[wl->n].topic, sizeof wl->v[0].topic, "%s", topic);
    snprintf(wl->v[wl->n].member, sizeof wl->v[0].member, "%s", mem);
    wl->n++;
    return true;
}

/* Wake what wl names (no lock held), and free it. */
static void wake_run(brk_groups *G, wake_list *wl, const char *group_name,
                     bool broadcast)
{
    for (size_t i = 0; i < wl->n; i++)
        grp_wake_topic(G, wl->v[i].topic, group_name,
                   broadcast ? wl->v[i].member : NULL);
    free(wl->v);
    wl->v = NULL;
    wl->n = wl->cap = 0;
}

/* A group timer fired: handle expiries, wake whoever has work, re-arm. */
brk_status grp_process_group(brk_groups *G, group *g, int64_t now)
{
    brk_status st = BRK_OK;
    wake_list wl = { 0 };
    grp_defer_begin();
    pthread_mutex_lock(&g->mu);
    for (uint32_t mi = 0; mi < g->nmembers; mi++) {
        brk_status s1 = expire_member(G, g, g->members[mi], now);
        if (s1 != BRK_OK && st == BRK_OK)
            st = s1;
    }
    for (uint32_t mi = 0; mi < g->nmembers; mi++) {
        member *m = g->members[mi];
        for (uint32_t k = 0; k < g->nsubs; k++) {
            if (grp_has_work(G, g, m, k, now)
                && !wake_add(&wl, g->subs[k].topic, m->name))
                break;
        }
    }
    grp_arm(G, g, next_event(G, g, now));
    bool bc = g->cfg.broadcast;
    pthread_mutex_unlock(&g->mu);
    grp_defer_end(G);
    wake_run(G, &wl, g->name, bc);
    return st;
}

/* ---- public API: receive and wait ------------------------------------------------- */

brk_status grp_req_check(const brk_receive_req *req)
{
    if (!req || !grp_group_name_ok(req->group) || !grp_topic_ok(req->topic))
        return BRK_INVAL;
    if (req->invisible_ms > INVISIBLE_MAX_MS)
        return BRK_INVAL;
    if (req->member && !grp_member_name_ok(req->member))
        return BRK_INVAL;
    return BRK_OK;
}

/* The group of a receive, created (clustering, defaults, subscribed to
 * topic) when unknown. */
static brk_status group_for(brk_groups *G, const char *name, const char *topic,
                            group **out)
{
    brk_topic_info ti;
    brk_status st = brk_topic_get(G->s, topic, &ti);
    if (st == BRK_NOTFOUND && !brk_store_auto_create(G->s))
        return BRK_NOTFOUND;
    if (st != BRK_OK && st != BRK_NOTFOUND)
        return st;
    pthread_mutex_lock(&G->reg_mu);
    group *g = grp_find_group_locked(G, name);
    st = BRK_OK;
    if (!g) {
        filter f;
        uint32_t k;
        if ((st = grp_group_new(name, NULL, &g)) == BRK_OK
            && (st = grp_filter_parse(NULL, &f)) == BRK_OK
            && (st = grp_sub_add(g, topic, &f, &k)) != BRK_OK)
            grp_filter_free(&f);
        if (st == BRK_OK)
            st = grp_group_publish_locked(G, g);
        if (st != BRK_OK) {
            grp_group_free(NULL, g);
            g = NULL;
        }
    }
    pthread_mutex_unlock(&G->reg_mu);
    if (st == BRK_OK && !g)
        st = BRK_NOMEM;
    if (st == BRK_OK)
        grp_mark_dirty(G);
    *out = g;
    return st;
}

/* The subscription of a receive, added (no filter) when the group does not
 * consume the topic yet.  g->mu held. */
static brk_status sub_for(brk_groups *G, group *g, const char *topic,
                          uint32_t *k)
{
    int64_t i = grp_sub_find(g, topic);
    if (i >= 0) {
        *k = (uint32_t)i;
        return BRK_OK;
    }
    filter f;
    brk_status st = grp_filter_parse(NULL, &f);
    if (st == BRK_OK && (st = grp_sub_add(g, topic, &f, k)) != BRK_OK)
        grp_filter_free(&f);
    if (st == BRK_OK)
        grp_mark_dirty(G);
    return st;
}

/* Group, subscription and member of a request; g->mu is held on success. */
brk_status grp_req_resolve(brk_groups *G, const brk_receive_req *req,
                           group **gp, uint32_t *k, member **m)
{
    group *g;
    brk_status st = group_for(G, req->group, req->topic, &g);
    if (st != BRK_OK)
        return st;
    pthread_mutex_lock(&g->mu);
    if (g->cfg.broadcast && !req->member)
        st = BRK_INVAL;
    if (st == BRK_OK)
        st = sub_for(G, g, req->topic, k);
    if (st == BRK_OK)
        st = grp_member_get(G, g, req->member, m, true);
    substate *ss;
    if (st == BRK_OK)
        st = grp_ss_ensure(G, g, *m, *k, &ss);
    if (st != BRK_OK) {
        pthread_mutex_unlock(&g->mu);
        return st;
    }
    *gp = g;
    return BRK_OK;
}

/* Arm the member's retry heads of subscription k that are not due yet.
 * g->mu held. */
static void arm_heads(brk_groups *G, group *g, member *m, uint32_t k,
                      int64_t now)
{
    substate *ss = &m->ss[k];
    for (uint32_t ri = 0; !g->cfg.fifo && ri < ss->nrq; ri++) {
        int64_t d = retry_head(G, m, k, ri, &ss->rq[ri]);
        if (d > now && d != INT64_MAX)
            grp_arm(G, g, d);
    }
}

brk_status grp_receive_impl(brk_groups *G, const brk_receive_req *req,
                            brk_receive_batch **out)
{
    if (!out)
        return BRK_INVAL;
    *out = NULL;
    if (!G || grp_req_check(req) != BRK_OK || req->max < 1
        || req->max > BRK_RECEIVE_MAX)
        return BRK_INVAL;
    group *g;
    uint32_t k;
    member *m;
    brk_status st = grp_req_resolve(G, req, &g, &k, &m);
    if (st != BRK_OK)
        return st;
    int64_t now = grp_now_ms(G);
    grp_defer_begin();
    (void)expire_member(G, g, m, now);   /* failures stay in flight */
    rbuild rb;
    if ((st = rb_init(&rb, req->max)) != BRK_OK) {
        pthread_mutex_unlock(&g->mu);
        grp_defer_end(G);
        return st;
    }
    rctx rc = { now, req->invisible_ms ? req->invisible_ms
                                       : G->o.default_invisible_ms,
                &rb, false, false };
    substate *ss = &m->ss[k];
    uint32_t nq = ss->nmq + (g->cfg.fifo ? 0 : ss->nrq);
    if (!room(g, m, 0)) {
        rc.limited = true;
    } else if (nq > 0) {
        uint32_t start = m->rr++ % nq;
        for (uint32_t i = 0; i < nq; i++) {
            st = take_from(G, g, m, k, (start + i) % nq, &rc);
            if (st != BRK_OK || rc.limited || rb.b->count >= req->max)
                break;
        }
    }
    if (rc.limited)
        m->blocked = true;
    if (rc.handed)
        grp_arm(G, g, now + rc.invisible);
    arm_heads(G, g, m, k, now);
    pthread_mutex_unlock(&g->mu);
    grp_defer_end(G);
    if (rb.b->count == 0) {
        brk_receive_batch_free(rb.b);
        if (st != BRK_OK)
            return st;
        if (rc.limited)
            return BRK_LIMIT;
        rb.b = NULL;
        if ((st = rb_init(&rb, 1)) != BRK_OK)
            return st;
    }
    *out = rb.b;
    return BRK_OK;
}

brk_status brk_group_receive(brk_groups *G, const brk_receive_req *req,
                             brk_receive_batch **out)
{
    if (!G)
        return grp_receive_impl(G, req, out);
    if (!grp_call_enter(G, false)) {
        if (out)
            *out = NULL;
        return BRK_CLOSED;
    }
    brk_status st = grp_receive_chained(G, req, out);
    grp_call_leave(G);
    return st;
}

brk_status grp_receive_chained(brk_groups *G, const brk_receive_req *req,
                               brk_receive_batch **out)
{
    brk_status st = grp_receive_impl(G, req, out);
    /* A full batch: there may be more, and the append that made them
     * visible woke only one waiter of this group. */
    if (st == BRK_OK && *out && (*out)->count > 0 && (*out)->count == req->max)
        grp_wake_one(G, req->topic, req->group, req->member);
    return st;
}

/* ---- public API: settling --------------------------------------------------------- */

typedef struct rcpt {
    char epoch[17];
    uint32_t k, midx;
    bool retry;
    uint16_t queue;
    uint64_t off, gen;
} rcpt;

/* Parse a decimal field ending at '.' or NUL; false when malformed. */
static bool parse_dec(const char **pp, uint64_t max, uint64_t *out)
{
    const char *p = *pp;
    uint64_t v = 0;
    size_t n = 0;
    while (*p >= '0' && *p <= '9') {
        uint64_t d = (uint64_t)(*p - '0');
        if (v > (max - d) / 10)
            return false;
        v = v * 10 + d;
        p++;
        n++;
    }
    if (n == 0 || n > 20)
        return false;
    *out = v;
    *pp = p;
    return true;
}

static bool parse_receipt(const char *s, rcpt *r)
{
    if (!s || strnlen(s, BRK_RECEIPT_MAX + 1) > BRK_RECEIPT_MAX)
        return false;
    for (int i = 0; i < 16; i++) {
        char c = s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return false;
        r->epoch[i] = c;
    }
    r->epoch[16] = 0;
    const char *p = s + 16;
    uint64_t v;
    if (*p++ != '.' || !parse_dec(&p, UINT32_MAX, &v))
        return false;
    r->k = (uint32_t)v;
    if (*p++ != '.' || !parse_dec(&p, UINT32_MAX, &v))
        return false;
    r->midx = (uint32_t)v;
    if (*p++ != '.' || (*p != 'm' && *p != 'r'))
        return false;
    r->retry = *p++ == 'r';
    if (*p++ != '.' || !parse_dec(&p, UINT16_MAX, &v))
        return false;
    r->queue = (uint16_t)v;
    if (*p++ != '.' || !parse_dec(&p, UINT64_MAX, &r->off))
        return false;
    if (*p++ != '.' || !parse_dec(&p, UINT64_MAX, &r->gen))
        return false;
    return *p == 0;
}

/* Find the delivery a receipt names; BRK_CONFLICT when it is not in flight
 * under that receipt any more.  g->mu held. */
static brk_status locate(group *g, const rcpt *r, member **mp, floc *l,
                         qstate **qp, uint32_t *ip)
{
    if (r->midx >= g->nmembers || r->k >= g->nsubs)
        return BRK_CONFLICT;
    member *m = g->members[r->midx];
    if (r->k >= m->nss)
        return BRK_CONFLICT;
    substate *ss = &m->ss[r->k];
    l->k = r->k;
    l->retry = r->retry;
    l->off = r->off;
    if (r->retry) {
        if (r->queue < r->k * LEVELS || r->queue - r->k * LEVELS >= ss->nrq)
            return BRK_CONFLICT;
        l->i = r->queue - r->k * LEVELS;
    } else {
        if (r->queue >= ss->nmq)
            return BRK_CONFLICT;
        l->i = r->queue;
    }
    bool retry;
    uint16_t queue;
    qstate *q = loc_q(m, l, &retry, &queue);
    int64_t i = q ? flight_find(q, r->off) : -1;
    if (i < 0 || q->fl[i].gen != r->gen || q->fl[i].state != FL_OUT)
        return BRK_CONFLICT;
    *mp = m;
    *qp = q;
    *ip = (uint32_t)i;
    return BRK_OK;
}

/* Common front of ack/nack/change_invisibility: on BRK_OK g->mu is held. */
static brk_status settle_begin(brk_groups *G, const char *group_name,
                               const char *receipt, group **gp, rcpt *r)
{
    if (!G || !group_name || !receipt)
        return BRK_INVAL;
    if (!grp_group_name_ok(group_name) || !parse_receipt(receipt, r))
        return BRK_INVAL;
    group *g = grp_find_group(G, group_name);
    if (!g)
        return BRK_NOTFOUND;
    if (strcmp(r->epoch, G->epoch) != 0)
        return BRK_CONFLICT;
    pthread_mutex_lock(&g->mu);
    *gp = g;
    return BRK_OK;
}

/* Whether m's waiters may be held back by the in-flight bounds: the same
 * room() test a receive applies (for the smallest message), or a receive
 * or has_work that found the next message too big. */
static bool at_bound(const group *g, const member *m)
{
    return m->blocked || !room(g, m, 1);
}

/* After a settle of a delivery of m's subscription k (g->mu held): the
 * waiters to wake.  A member that was at its bound may now have room for
 * every one of its subscriptions, not only k; a FIFO settle unblocks k's
 * queue. */
static void wake_after(brk_groups *G, group *g, member *m, uint32_t k,
                       bool was_bound, wake_list *wl)
{
    int64_t now = grp_now_ms(G);
    if (was_bound) {
        m->blocked = false;         /* has_work sets it again if still so */
        for (uint32_t j = 0; j < g->nsubs; j++)
            if (grp_has_work(G, g, m, j, now)
                && !wake_add(wl, g->subs[j].topic, m->name))
                return;
    } else if (g->cfg.fifo && grp_has_work(G, g, m, k, now)) {
        (void)wake_add(wl, g->subs[k].topic, m->name);
    }
}

static brk_status ack_impl(brk_groups *G, const char *group_name,
                           const char *receipt)
{
    group *g;
    rcpt r;
    brk_status st = settle_begin(G, group_name, receipt, &g, &r);
    if (st != BRK_OK)
        return st;
    member *m;
    floc l;
    qstate *q;
    uint32_t i;
    st = locate(g, &r, &m, &l, &q, &i);
    bool pae = false, bc = g->cfg.broadcast;
    uint64_t target = 0;
    wake_list wl = { 0 };
    if (st == BRK_OK) {
        bool was = at_bound(g, m);
        settle_flight(m, q, i);
        grp_mark_dirty(G);
        target = atomic_load(&G->dirty_seq);
        wake_after(G, g, m, l.k, was, &wl);
        pae = g->cfg.persist_every_ack;
    }
    pthread_mutex_unlock(&g->mu);
    if (st == BRK_OK && pae)
        st = grp_save_covering(G, target);
    wake_run(G, &wl, g->name, bc);
    return st;
}

brk_status brk_group_ack(brk_groups *G, const char *group_name,
                         const char *receipt)
{
    if (!G)
        return ack_impl(G, group_name, receipt);
    if (!grp_call_enter(G, false))
        return BRK_CLOSED;
    brk_status st = ack_impl(G, group_name, receipt);
    grp_call_leave(G);
    return st;
}

static brk_status nack_impl(brk_groups *G, const char *group_name,
                            const char *receipt, uint32_t delay_ms,
                            const char *reason)
{
    if (reason && strnlen(reason, REASON_MAX + 1) > REASON_MAX)
        return BRK_INVAL;
    group *g;
    rcpt r;
    grp_defer_begin();
    brk_status st = settle_begin(G, group_name, receipt, &g, &r);
    if (st != BRK_OK) {
        grp_defer_end(G);
        return st;
    }
    member *m;
    floc l;
    qstate *q;
    uint32_t i;
    st = locate(g, &r, &m, &l, &q, &i);
    bool pae = false, bc = g->cfg.broadcast;
    uint64_t target = 0;
    wake_list wl = { 0 };
    if (st == BRK_OK) {
        bool was = at_bound(g, m), settle = false;
        brk_bytes rs = { reason ? reason : "", reason ? strlen(reason) : 0 };
        st = fail_one(G, g, m, &l, delay_ms, rs, false, false, grp_now_ms(G),
                      &settle);
        if (st == BRK_OK && settle)
            settle_loc(G, g, m, &l);
        if (st == BRK_OK) {
            grp_mark_dirty(G);
            target = atomic_load(&G->dirty_seq);
            wake_after(G, g, m, l.k, was, &wl);
            pae = g->cfg.persist_every_ack;
        }
    }
    pthread_mutex_unlock(&g->mu);
    grp_defer_end(G);
    if (st == BRK_OK && pae)
        st = grp_save_covering(G, target);
    wake_run(G, &wl, g->name, bc);
    return st;
}

brk_status brk_group_nack(brk_groups *G, const char *group_name,
                          const char *receipt, uint32_t delay_ms,
                          const char *reason)
{
    if (!G)
        return nack_impl(G, group_name, receipt, delay_ms, reason);
    if (!grp_call_enter(G, false))
        return BRK_CLOSED;
    brk_status st = nack_impl(G, group_name, receipt, delay_ms, reason);
    grp_call_leave(G);
    return st;
}

static brk_status change_invisibility_impl(brk_groups *G,
                                           const char *group_name,
                                           const char *receipt,
                                           uint32_t invisible_ms)
{
    if (invisible_ms > INVISIBLE_MAX_MS)
        return BRK_INVAL;
    group *g;
    rcpt r;
    brk_status st = settle_begin(G, group_name, receipt, &g, &r);
    if (st != BRK_OK)
        return st;
    member *m;
    floc l;
    qstate *q;
    uint32_t i;
    st = locate(g, &r, &m, &l, &q, &i);
    if (st == BRK_OK) {
        q->fl[i].visible_at = grp_now_ms(G) + invisible_ms;
        grp_note_vis(m, q->fl[i].visible_at);
        grp_arm(G, g, q->fl[i].visible_at);
    }
    pthread_mutex_unlock(&g->mu);
    return st;
}

brk_status brk_group_change_invisibility(brk_groups *G, const char *group_name,
                                         const char *receipt,
                                         uint32_t invisible_ms)
{
    if (!G)
        return change_invisibility_impl(G, group_name, receipt, invisible_ms);
    if (!grp_call_enter(G, false))
        return BRK_CLOSED;
    brk_status st = change_invisibility_impl(G, group_name, receipt, invisible_ms);
    grp_call_leave(G);
    return st;
}

/* ---- public API: dead letters ----------------------------------------------------- */

static brk_status empty_batch(uint64_t from, brk_batch **out)
{
    brk_batch *b = calloc(1, sizeof *b);
    if (!b)
        return BRK_NOMEM;
    b->first_offset = b->next_offset = from;
    *out = b;
    return BRK_OK;
}

static brk_status dead_letters_impl(brk_groups *G, const char *group_name,
                                    uint64_t from, size_t max,
                                    brk_batch **out)
{
    if (!out)
        return BRK_INVAL;
    *out = NULL;
    if (!G || !grp_group_name_ok(group_name))
        return BRK_INVAL;
    group *g = grp_find_group(G, group_name);
    if (!g)
        return BRK_NOTFOUND;
    if (max == 0)
        return empty_batch(from, out);
    if (max > 1000)
        max = 1000;
    brk_status st = brk_store_read(G->s, g->dlq_topic, 0, from, max, out);
    if (st == BRK_NOTFOUND || st == BRK_RANGE)
        return empty_batch(from, out);
    return st;
}

brk_status brk_group_dead_letters(brk_groups *G, const char *group_name,
                                  uint64_t from, size_t max, brk_batch **out)
{
    if (!G)
        return dead_letters_impl(G, group_name, from, max, out);
    if (!grp_call_enter(G, false)) {
        if (out)
            *out = NULL;
        return BRK_CLOSED;
    }
    brk_status st = dead_letters_impl(G, group_name, from, max, out);
    grp_call_leave(G);
    return st;
}

static brk_status replay_impl(brk_groups *G, const char *group_name,
                              size_t max, size_t *replayed)
{
    if (replayed)
        *replayed = 0;
    if (!G || !grp_group_name_ok(group_name))
        return BRK_INVAL;
    group *g = grp_find_group(G, group_name);
    if (!g)
        return BRK_NOTFOUND;
    if (max == 0)
        return BRK_OK;
    if (max > 1000)
        max = 1000;
    pthread_mutex_lock(&g->replay_mu);
    pthread_mutex_lock(&g->mu);
    uint64_t from = g->dlq_replay;
    pthread_mutex_unlock(&g->mu);
    brk_batch *b = NULL;
    brk_status st = brk_store_read(G->s, g->dlq_topic, 0, from, max, &b);
    if (st == BRK_NOTFOUND || st == BRK_RANGE) {
        pthread_mutex_unlock(&g->replay_mu);
        return BRK_OK;
    }
    size_t done = 0;
    for (size_t i = 0; st == BRK_OK && i < b->count; i++) {
        const brk_record *rec = &b->recs[i];
        brk_bytes v;
        char topic[BRK_TOPIC_MAX + 1];
        bool ok = brk_props_get(rec->props, DLQ_PREFIX "topic", &v) == BRK_OK
                  && v.len > 0 && v.len <= BRK_TOPIC_MAX;
        if (ok) {
            memcpy(topic, v.ptr, v.len);
            topic[v.len] = 0;
            ok = grp_topic_ok(topic);
        }
        if (ok) {
            uint8_t *props = NULL;
            size_t plen = 0;
            st = props_build(rec->props, NULL, 0, true, &props, &plen);
            if (st != BRK_OK)
                break;
            brk_append_req q;
            req_from(&q, rec);
            q.topic = topic;
            q.queue = -1;
            q.props = (brk_bytes){ props, plen };
            brk_append_res ar;
            st = brk_store_append(G->s, &q, &ar);
            free(props);
            if (st != BRK_OK)
                break;
            done++;
        }
        /* A dead letter without a valid origin is passed over. */
        pthread_mutex_lock(&g->mu);
        g->dlq_replay = rec->queue_offset + 1;
        pthread_mutex_unlock(&g->mu);
        grp_mark_dirty(G);
    }
    brk_batch_free(b);
    pthread_mutex_unlock(&g->replay_mu);
    brk_status s2 = grp_save_state(G, false);
    if (st == BRK_OK)
        st = s2;
    if (replayed)
        *replayed = done;
    return st;
}

brk_status brk_group_replay_dead_letters(brk_groups *G, const char *group_name,
                                         size_t max, size_t *replayed)
{
    if (!G)
        return replay_impl(G, group_name, max, replayed);
    if (!grp_call_enter(G, false)) {
        if (replayed)
            *replayed = 0;
        return BRK_CLOSED;
    }
    brk_status st = replay_impl(G, group_name, max, replayed);
    grp_call_leave(G);
    return st;
}

/* ---- public API: lag -------------------------------------------------------------- */

static int64_t store_ms_at(brk_groups *G, const char *topic, uint16_t queue,
                           uint64_t off)
{
    brk_cq_entry e;
    size_t n = 0;
    uint64_t first;
    if (brk_store_read_entries(G->s, topic, queue, off, &e, 1, &n, &first)
            != BRK_OK || n == 0)
        return 0;
    brk_batch *b = NULL;
    int64_t ms = 0;
    if (brk_store_read_at(G->s, e.log_offset, &b) == BRK_OK && b->count == 1)
        ms = b->recs[0].store_ms;
    brk_batch_free(b);
    return ms;
}

static brk_status lag_impl(brk_groups *G, const char *group_name,
                           brk_group_lag_row **rows, size_t *count)
{
    if (!rows || !count)
        return BRK_INVAL;
    *rows = NULL;
    *count = 0;
    if (!G || !grp_group_name_ok(group_name))
        return BRK_INVAL;
    group *g = grp_find_group(G, group_name);
    if (!g)
        return BRK_NOTFOUND;
    uint64_t dl = 0, mn = 0, mx = 0;
    if (brk_store_queue_range(G->s, g->dlq_topic, 0, &mn, &mx) == BRK_OK)
        dl = mx - mn;
    brk_group_lag_row *v = NULL;
    size_t n = 0, cap = 0;
    brk_status st = BRK_OK;
    pthread_mutex_lock(&g->mu);
    for (uint32_t mi = 0; mi < g->nmembers && st == BRK_OK; mi++) {
        member *m = g->members[mi];
        for (uint32_t k = 0; k < g->nsubs && st == BRK_OK; k++) {
            substate *ss;
            if ((st = grp_ss_ensure(G, g, m, k, &ss)) != BRK_OK)
                break;
            size_t need = n + ss->nmq + 1;
            if (need > cap) {
                size_t nc = cap ? cap * 2 : 16;
                while (nc < need)
                    nc *= 2;
                brk_group_lag_row *nv = realloc(v, nc * sizeof *nv);
                if (!nv) {
                    st = BRK_NOMEM;
                    break;
                }
                v = nv;
                cap = nc;
            }
            brk_group_lag_row tot;
            memset(&tot, 0, sizeof tot);
            snprintf(tot.topic, sizeof tot.topic, "%s", g->subs[k].topic);
            snprintf(tot.member, sizeof tot.member, "%s", m->name);
            tot.queue = -1;
            tot.dead_letters = dl;
            for (uint32_t i = 0; i < ss->nmq; i++) {
                qstate *q = &ss->mq[i];
                brk_group_lag_row *r = &v[n++];
                memset(r, 0, sizeof *r);
                snprintf(r->topic, sizeof r->topic, "%s", g->subs[k].topic);
                snprintf(r->member, sizeof r->member, "%s", m->name);
                r->queue = (int32_t)i;
                uint64_t qmn = 0, qmx = 0;
                (void)brk_store_queue_range(G->s, g->subs[k].topic,
                                            (uint16_t)i, &qmn, &qmx);
                uint64_t c = q->committed > qmx ? qmx : q->committed;
                r->max_offset = qmx;
                r->committed_offset = c;
                r->lag = qmx - c;
                r->inflight = q->nfl;
                if (c < qmx)
                    r->oldest_unacked_ms = store_ms_at(G, g->subs[k].topic,
                                                       (uint16_t)i, c);
                tot.max_offset += r->max_offset;
                tot.committed_offset += r->committed_offset;
                tot.lag += r->lag;
                tot.inflight += r->inflight;
                if (r->oldest_unacked_ms
                    && (!tot.oldest_unacked_ms
                        || r->oldest_unacked_ms < tot.oldest_unacked_ms))
                    tot.oldest_unacked_ms = r->oldest_unacked_ms;
            }
            /* Messages waiting in the retry queues are not acked either:
             * the totals row counts them as lag (committed = max - lag). */
            for (uint32_t i = 0; i < ss->nrq; i++) {
                qstate *q = &ss->rq[i];
                uint64_t rmn = 0, rmx = 0;
                tot.inflight += q->nfl;
                if (brk_store_queue_range(G->s, m->retry_topic,
                                          (uint16_t)(k * LEVELS + i), &rmn,
                                          &rmx) == BRK_OK
                    && rmx > q->committed) {
                    uint64_t back = rmx - q->committed;
                    tot.lag += back;
                    tot.committed_offset = tot.committed_offset > back
                                               ? tot.committed_offset - back
                                               : 0;
                }
            }
            v[n++] = tot;
        }
    }
    pthread_mutex_unlock(&g->mu);
    if (st != BRK_OK) {
        free(v);
        return st;
    }
    *rows = v;
    *count = n;
    return BRK_OK;
}

brk_status brk_group_lag(brk_groups *G, const char *group_name,
                         brk_group_lag_row **rows, size_t *count)
{
    if (!G)
        return lag_impl(G, group_name, rows, count);
    if (!grp_call_enter(G, false))
        return BRK_CLOSED;
    brk_status st = lag_impl(G, group_name, rows, count);
    grp_call_leave(G);
    return st;
}
