/*
 * group_state.c - the consumer groups' state file: its codec, save and load,
 * and the retention cursors moved after each save (see PERSISTENCE,
 * RETENTION AND THE DUPLICATE BOUND at the top of group.c).
 *
 * STATE FILE "state.groups" (brk_store_state_write frames it and adds the
 * CRC), little-endian:
 *
 *   u32  magic 0x31505247 (bytes "GRP1")
 *   u32  version 1
 *   u32  ngroups
 *   per group:
 *     u8   name length, name
 *     u8   flags: 1 fifo, 2 broadcast, 4 persist_every_ack, 8 progress
 *     u16  max_deliveries
 *     u32  max_inflight
 *     u64  max_inflight_bytes
 *     u64  dlq replay offset (next dead letter to replay)
 *     u16  nsubs
 *     per subscription: u8 topic length, topic, u16 filter length, filter
 *                       (as given; "*" for all)
 *     u32  nmembers
 *     per member: u8 name length, name (length 0: the clustering member)
 *       per subscription:
 *         u16 nmain, nmain x QUEUE for the topic's queues 0..nmain-1
 *         u8  nretry (0 or 18), nretry x QUEUE for its retry queues
 *   QUEUE:
 *     u64  committed offset
 *     u32  nspans, nspans x { u64 lo, u64 hi }: offsets [lo, hi) above
 *          committed that were settled out of order (ascending, disjoint,
 *          lo > committed), so an ack past an older open message survives
 *          a restart too
 * A missing file is an empty registry; a bad CRC or framing refuses open
 * (BRK_CORRUPT): starting over would redeliver every retained message.
 * At open, next = committed and the receive steps over the saved spans.
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

/* ---- state file ------------------------------------------------------------------- */

typedef struct wbuf {
    uint8_t *p;
    size_t len, cap;
    bool fail;
} wbuf;

static void wb_put(wbuf *w, const void *v, size_t n)
{
    if (w->fail)
        return;
    if (w->len + n > w->cap) {
        size_t nc = w->cap ? w->cap : 4096;
        while (nc < w->len + n)
            nc *= 2;
        uint8_t *np = realloc(w->p, nc);
        if (!np) {
            w->fail = true;
            return;
        }
        w->p = np;
        w->cap = nc;
    }
    memcpy(w->p + w->len, v, n);
    w->len += n;
}

static void wb_u8(wbuf *w, uint8_t v)
{
    wb_put(w, &v, 1);
}

static void wb_u16(wbuf *w, uint16_t v)
{
    uint8_t b[2];
    brk_st16(b, v);
    wb_put(w, b, 2);
}

static void wb_u32(wbuf *w, uint32_t v)
{
    uint8_t b[4];
    brk_st32(b, v);
    wb_put(w, b, 4);
}

static void wb_u64(wbuf *w, uint64_t v)
{
    uint8_t b[8];
    brk_st64(b, v);
    wb_put(w, b, 8);
}

/* A queue's progress: committed, then the settled spans above it. */
static void wb_q(wbuf *w, const qstate *q)
{
    wb_u64(w, q->committed);
    wb_u32(w, q->nsp);
    for (uint32_t i = 0; i < q->nsp; i++) {
        wb_u64(w, q->sp[i].lo);
        wb_u64(w, q->sp[i].hi);
    }
}

typedef struct rdr {
    const uint8_t *p;
    size_t len, pos;
    bool bad;
} rdr;

static const uint8_t *rd_take(rdr *r, size_t n)
{
    if (r->bad || r->len - r->pos < n) {
        r->bad = true;
        return NULL;
    }
    const uint8_t *p = r->p + r->pos;
    r->pos += n;
    return p;
}

/* Readers return 0 past the end and mark the reader bad. */
static uint8_t rd_u8(rdr *r)
{
    const uint8_t *p = rd_take(r, 1);
    return p ? p[0] : 0;
}

static uint16_t rd_u16(rdr *r)
{
    const uint8_t *p = rd_take(r, 2);
    return p ? brk_ld16(p) : 0;
}

static uint32_t rd_u32(rdr *r)
{
    const uint8_t *p = rd_take(r, 4);
    return p ? brk_ld32(p) : 0;
}

static uint64_t rd_u64(rdr *r)
{
    const uint8_t *p = rd_take(r, 8);
    return p ? brk_ld64(p) : 0;
}

/* Read a length-prefixed string into out[cap] (NUL-terminated). */
static void rd_str(rdr *r, size_t n, char *out, size_t cap)
{
    const uint8_t *p = rd_take(r, n);
    if (!p || n >= cap) {
        r->bad = true;
        out[0] = 0;
        return;
    }
    memcpy(out, p, n);
    out[n] = 0;
}

static void rd_q(rdr *r, qstate *q)
{
    grp_q_init(q, rd_u64(r));
    uint32_t n = rd_u32(r);
    if (r->bad || n > (r->len - r->pos) / 16) {
        r->bad = true;
        return;
    }
    q->sp = n ? malloc(n * sizeof *q->sp) : NULL;
    if (n && !q->sp) {
        r->bad = true;
        return;
    }
    q->csp = q->nsp = n;
    uint64_t prev = q->committed;
    for (uint32_t i = 0; i < n; i++) {
        q->sp[i].lo = rd_u64(r);
        q->sp[i].hi = rd_u64(r);
        if (q->sp[i].lo <= prev || q->sp[i].hi <= q->sp[i].lo)
            r->bad = true;
        prev = q->sp[i].hi;
    }
}

typedef struct cursor_pos {
    uint32_t id;
    uint64_t off;
} cursor_pos;

/* Lowest log offset still needed by (m, k): the entry at each committed
 * offset, `end` for a fully consumed queue.  g->mu held. */
static uint64_t ss_low(brk_groups *G, const group *g, const member *m,
                       uint32_t k, uint64_t end)
{
    const substate *ss = &m->ss[k];
    uint64_t low = end;
    for (uint32_t i = 0; i < ss->nmq + ss->nrq; i++) {
        bool r = i >= ss->nmq;
        const qstate *q = r ? &ss->rq[i - ss->nmq] : &ss->mq[i];
        const char *t = r ? m->retry_topic : g->subs[k].topic;
        uint16_t queue = (uint16_t)(r ? k * LEVELS + (i - ss->nmq) : i);
        brk_cq_entry e;
        size_t n = 0;
        uint64_t first;
        if (brk_store_read_entries(G->s, t, queue, q->committed, &e, 1, &n,
                                   &first) == BRK_OK && n == 1
            && e.log_offset < low)
            low = e.log_offset;
    }
    return low;
}

/* Serialize g (g->mu held) and collect its cursor positions. */
static void group_serialize(brk_groups *G, group *g, wbuf *w, uint64_t end,
                            cursor_pos **cp, size_t *ncp, size_t *ccp)
{
    size_t nl = strlen(g->name);
    wb_u8(w, (uint8_t)nl);
    wb_put(w, g->name, nl);
    wb_u8(w, (uint8_t)((g->cfg.fifo ? 1 : 0) | (g->cfg.broadcast ? 2 : 0)
                       | (g->cfg.persist_every_ack ? 4 : 0)
                       | (g->progress ? 8 : 0)));
    wb_u16(w, g->cfg.max_deliveries);
    wb_u32(w, g->cfg.max_inflight);
    wb_u64(w, g->cfg.max_inflight_bytes);
    wb_u64(w, g->dlq_replay);
    wb_u16(w, (uint16_t)g->nsubs);
    for (uint32_t k = 0; k < g->nsubs; k++) {
        size_t tl = strlen(g->subs[k].topic);
        size_t fl = strlen(g->subs[k].f.text);
        wb_u8(w, (uint8_t)tl);
        wb_put(w, g->subs[k].topic, tl);
        wb_u16(w, (uint16_t)fl);
        wb_put(w, g->subs[k].f.text, fl);
    }
    wb_u32(w, g->nmembers);
    for (uint32_t mi = 0; mi < g->nmembers; mi++) {
        member *m = g->members[mi];
        for (uint32_t k = 0; k < g->nsubs; k++) {
            substate *sp;       /* registers the cursor of a new one */
            (void)grp_ss_ensure(G, g, m, k, &sp);
        }
        size_t ml = strlen(m->name);
        wb_u8(w, (uint8_t)ml);
        wb_put(w, m->name, ml);
        for (uint32_t k = 0; k < g->nsubs; k++) {
            const substate *ss = k < m->nss ? &m->ss[k] : NULL;
            uint32_t nmq = ss ? ss->nmq : 0, nrq = ss ? ss->nrq : 0;
            wb_u16(w, (uint16_t)nmq);
            for (uint32_t i = 0; i < nmq; i++)
                wb_q(w, &ss->mq[i]);
            wb_u8(w, (uint8_t)nrq);
            for (uint32_t i = 0; i < nrq; i++)
                wb_q(w, &ss->rq[i]);
            if (ss && ss->has_cursor && cp) {
                if (*ncp == *ccp) {
                    size_t nc = *ccp ? *ccp * 2 : 16;
                    cursor_pos *n2 = realloc(*cp, nc * sizeof *n2);
                    if (!n2)
                        continue;
                    *cp = n2;
                    *ccp = nc;
                }
                (*cp)[(*ncp)++] = (cursor_pos){ ss->cursor,
                                                ss_low(G, g, m, k, end) };
            }
        }
    }
}

static size_t groups_snapshot(brk_groups *G, group ***out)
{
    pthread_mutex_lock(&G->reg_mu);
    size_t n = G->ngroups;
    *out = n ? malloc(n * sizeof **out) : NULL;
    if (*out)
        memcpy(*out, G->groups, n * sizeof **out);
    else
        n = 0;
    pthread_mutex_unlock(&G->reg_mu);
    return n;
}

/* Write state.groups when something changed (or `force`), then move the
 * retention cursors.  With !write only the cursors move (open). */
brk_status grp_save_state_ex(brk_groups *G, bool force, bool write)
{
    pthread_mutex_lock(&G->save_mu);
    uint64_t seq = atomic_load(&G->dirty_seq);
    if (!force && seq == atomic_load(&G->saved_seq)) {
        pthread_mutex_unlock(&G->save_mu);
        return BRK_OK;
    }
    brk_store_stats ss;
    brk_store_get_stats(G->s, &ss);
    uint64_t end = ss.durable_offset;
    group **gs = NULL;
    size_t ng = groups_snapshot(G, &gs);
    wbuf w = { 0 };
    wb_u32(&w, STATE_MAGIC);
    wb_u32(&w, STATE_VERSION);
    wb_u32(&w, (uint32_t)ng);
    cursor_pos *cp = NULL;
    size_t ncp = 0, ccp = 0;
    for (size_t i = 0; i < ng; i++) {
        pthread_mutex_lock(&gs[i]->mu);
        group_serialize(G, gs[i], &w, end, &cp, &ncp, &ccp);
        pthread_mutex_unlock(&gs[i]->mu);
    }
    free(gs);
    brk_status st = BRK_OK;
    /* An original is settled only after its retry copy or dead letter was
     * appended, but in ASYNC mode that append is not synced: make it
     * durable before the file that says the original is done (a no-op when
     * nothing is unsynced).  After the serialization, so it covers every
     * copy whose settle the file records. */
    if (write)
        st = w.fail ? BRK_NOMEM : brk_store_flush(G->s);
    if (write && st == BRK_OK)
        st = brk_store_state_write(G->s, STATE_NAME, w.p, w.len);
    free(w.p);
    if (st == BRK_OK) {
        if (write)
            atomic_store(&G->saved_seq, seq);
        for (size_t i = 0; i < ncp; i++)
            (void)brk_store_cursor_set(G->s, cp[i].id, cp[i].off);
    }
    free(cp);
    atomic_store(&G->next_persist, grp_now_ms(G) + G->o.persist_interval_ms);
    pthread_mutex_unlock(&G->save_mu);
    return st;
}

brk_status grp_save_state(brk_groups *G, bool force)
{
    return grp_save_state_ex(G, force, true);
}

/* Make sure every change counted up to `target` (a dirty_seq value read
 * after the change) is on disk.  Callers that queue behind a save in
 * progress usually find it covered theirs: one write serves them all, as a
 * group commit does. */
brk_status grp_save_covering(brk_groups *G, uint64_t target)
{
    pthread_mutex_lock(&G->save_mu);
    bool done = atomic_load(&G->saved_seq) >= target;
    pthread_mutex_unlock(&G->save_mu);
    return done ? BRK_OK : grp_save_state(G, false);
}

/* Load state.groups into an empty registry (open). */
brk_status grp_load_state(brk_groups *G, char *errbuf, size_t errlen)
{
    void *buf = NULL;
    size_t len = 0;
    brk_status st = brk_store_state_read(G->s, STATE_NAME, &buf, &len);
    if (st == BRK_NOTFOUND)
        return BRK_OK;
    if (st != BRK_OK) {
        grp_set_err(errbuf, errlen, "reading state.groups: %s: %s",
                brk_strerror(st), brk_store_errstr(G->s));
        return st;
    }
    rdr r = { buf, len, 0, false };
    group *g = NULL;
    if (rd_u32(&r) != STATE_MAGIC || rd_u32(&r) != STATE_VERSION) {
        grp_set_err(errbuf, errlen, "state.groups: bad magic or version");
        free(buf);
        return BRK_CORRUPT;
    }
    uint32_t ng = rd_u32(&r);
    st = BRK_OK;
    for (uint32_t gi = 0; gi < ng && !r.bad && st == BRK_OK; gi++) {
        char name[BRK_GROUP_MAX + 1];
        rd_str(&r, rd_u8(&r), name, sizeof name);
        brk_group_config cfg;
        brk_group_config_init(&cfg);
        uint8_t fl = rd_u8(&r);
        cfg.fifo = fl & 1;
        cfg.broadcast = fl & 2;
        cfg.persist_every_ack = fl & 4;
        cfg.max_deliveries = rd_u16(&r);
        cfg.max_inflight = rd_u32(&r);
        cfg.max_inflight_bytes = rd_u64(&r);
        uint64_t replay = rd_u64(&r);
        if (r.bad || !grp_group_name_ok(name) || !grp_config_ok(&cfg)) {
            r.bad = true;
            break;
        }
        brk_group_config c2 = cfg;
        c2.broadcast = true;            /* members come from the file */
        if ((st = grp_group_new(name, &c2, &g)) != BRK_OK)
            break;
        g->cfg = cfg;
        g->progress = fl & 8;
        g->dlq_replay = replay;
        uint16_t nsubs = rd_u16(&r);
        for (uint32_t k = 0; k < nsubs && !r.bad && st == BRK_OK; k++) {
            char topic[BRK_TOPIC_MAX + 1], ftext[BRK_FILTER_MAX + 1];
            rd_str(&r, rd_u8(&r), topic, sizeof topic);
            rd_str(&r, rd_u16(&r), ftext, sizeof ftext);
            filter f;
            if (r.bad || grp_filter_parse(ftext, &f) != BRK_OK) {
                r.bad = true;
                break;
            }
            uint32_t kk;
            if ((st = grp_sub_add(g, topic, &f, &kk)) != BRK_OK)
                grp_filter_free(&f);
        }
        uint32_t nm = rd_u32(&r);
        for (uint32_t mi = 0; mi < nm && !r.bad && st == BRK_OK; mi++) {
            char mname[BRK_MEMBER_MAX + 1];
            rd_str(&r, rd_u8(&r), mname, sizeof mname);
            member *m = grp_member_new(g, mname, g->nmembers);
            if (!m || (st = grp_members_push(g, m)) != BRK_OK) {
                free(m);
                st = BRK_NOMEM;
                break;
            }
            m->ss = calloc(g->nsubs ? g->nsubs : 1, sizeof *m->ss);
            if (!m->ss) {
                st = BRK_NOMEM;
                break;
            }
            m->nss = g->nsubs;
            for (uint32_t k = 0; k < g->nsubs && !r.bad; k++) {
                substate *ss = &m->ss[k];
                uint32_t nmq = rd_u16(&r);
                ss->mq = nmq ? calloc(nmq, sizeof *ss->mq) : NULL;
                if (nmq && !ss->mq) {
                    st = BRK_NOMEM;
                    break;
                }
                ss->nmq = nmq;
                for (uint32_t i = 0; i < nmq; i++)
                    rd_q(&r, &ss->mq[i]);
                uint32_t nrq = rd_u8(&r);
                if (nrq != 0 && nrq != LEVELS) {
                    r.bad = true;
                    break;
                }
                ss->rq = nrq ? calloc(nrq, sizeof *ss->rq) : NULL;
                if (nrq && !ss->rq) {
                    st = BRK_NOMEM;
                    break;
                }
                ss->nrq = nrq;
                for (uint32_t i = 0; i < nrq; i++)
                    rd_q(&r, &ss->rq[i]);
                if (nrq)
                    m->retry_nq = (k + 1) * LEVELS;
            }
        }
        if (r.bad || st != BRK_OK)
            break;
        if ((!cfg.broadcast && (g->nmembers != 1 || g->members[0]->name[0]))
            || (cfg.broadcast && g->nmembers > 0 && !g->members[0]->name[0])) {
            r.bad = true;
            break;
        }
        pthread_mutex_lock(&G->reg_mu);
        st = grp_group_publish_locked(G, g);
        pthread_mutex_unlock(&G->reg_mu);
        if (st != BRK_OK)
            break;
        g = NULL;
    }
    grp_group_free(G, g);
    free(buf);
    if (r.bad) {
        grp_set_err(errbuf, errlen, "state.groups: malformed at byte %zu", r.pos);
        return BRK_CORRUPT;
    }
    if (st != BRK_OK)
        grp_set_err(errbuf, errlen, "state.groups: loading: %s", brk_strerror(st));
    return st;
}
