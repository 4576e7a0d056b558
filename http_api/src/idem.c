/*
 * idem.c - the Idempotency-Key table (see idem.h for the contract).
 *
 * RECORDS
 * =======
 * Internal topic "__idem" (created with 1 queue at open, like txn.c and
 * delay.c create theirs), queue 0, type BRK_REC_OP, flags 0.  Record key =
 * the idempotency key (1..255 printable ASCII bytes).  Body, little-endian:
 *
 *   +--------+------+------------------------------------------------------+
 *   | offset | size | field                                                |
 *   +--------+------+------------------------------------------------------+
 *   |      0 |  u8  | version (1)                                          |
 *   |      1 |  u8  | phase: 1 INTENT (before the operation),              |
 *   |        |      |        2 DONE   (after it; carries the answer)       |
 *   |      2 |  u16 | scope_len (1..IDEM_SCOPE_MAX)                        |
 *   |      4 |  u16 | status: DONE the HTTP status, INTENT 0               |
 *   |      6 |  u8  | txid_len (0..BRK_TXID_MAX)                           |
 *   |      7 |  u8  | reserved (0)                                         |
 *   |      8 |  u64 | request hash (api_idem_hash)                         |
 *   |     16 | 16 B | msg_id the operation uses                            |
 *   |     32 |  i64 | deliver_at_ms (0: not delayed)                       |
 *   |     40 |  i64 | created_ms: wall time of the INTENT that started     |
 *   |        |      | this entry (a DONE repeats its INTENT's value)       |
 *   |     48 |  u32 | response_len (DONE; 0 for INTENT)                    |
 *   |     52 |  ... | scope bytes, txid bytes, response bytes              |
 *   +--------+------+------------------------------------------------------+
 *
 * A record is valid when version and phase are known, scope_len >= 1,
 * txid_len <= 128 and the body is exactly 52 + the three lengths; others
 * are skipped at rebuild (never fatal: an old or foreign record must not
 * stop the API from opening).  A DONE record is self-contained (it repeats
 * every INTENT field), so an entry whose INTENT was lost to retention but
 * whose DONE was not is still answerable.
 *
 * Why two records: the INTENT is the decision (the ids the operation will
 * use), written with defer_sync before the operation, so the operation's
 * own durable append covers it (the log is durable as a prefix).  If the
 * operation's record survives a crash, so does the INTENT, and the retry is
 * a REDO carrying the same msg_id/txid.  The DONE record is also deferred:
 * losing it only turns a REPLAY into a REDO after a crash.
 *
 * REBUILD
 * =======
 * At open the newest 4 x max_keys records of "__idem" are read (all of
 * them when there are fewer), in log order, so the cost of an open does not
 * grow with the log's retention.  The table keeps at most max_keys entries,
 * oldest forgotten first, and an entry leaves at most two records (INTENT,
 * DONE); an entry the full log would have kept is left out only when more
 * than 4 x max_keys records follow all of its own, which takes more than
 * 2 x max_keys DONE records of still older entries written after it (or
 * foreign records).  A DONE alone restores its entry.  (Seeking by time
 * instead would trust store_ms to be monotonic; it is wall time.)
 * Records whose store_ms, or whose created_ms, is older than now - window
 * are skipped.  A record of another generation (other msg_id, created_ms or
 * hash) replaces the entry for its (scope, key); a DONE of the same
 * generation completes its INTENT.  The max_keys bound applies as entries
 * are added (oldest forgotten first, counted in evicted_total).
 *
 * MEMORY AND LOCKING
 * ==================
 * One chained hash table keyed by a 64-bit FNV-1a of (scope, NUL, key),
 * buckets a power of two, grown at load 1.  Every entry is also on an age
 * list in insertion order (oldest first): expiry and the max_keys bound pop
 * from its front.  An entry is one allocation with scope and key inline.
 * A reserved (busy) entry is never expired nor evicted, so the ticket's
 * pointer to it stays valid until finish/abort.  One mutex guards the table,
 * the list, every entry's mutable fields (busy, done, status, response) and
 * the stats.  Appends happen outside it: the INTENT after the entry is
 * reserved (a concurrent request sees BUSY meanwhile), the DONE while it is
 * still reserved, so a key's records reach the log in their logical order.
 */
#include "idem.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker/record.h"

#define IDEM_VERSION      1
#define IDEM_INTENT       1
#define IDEM_DONE         2
#define IDEM_HDR          52
#define IDEM_SCOPE_MAX    255
#define IDEM_READ_BATCH   256
#define IDEM_MIN_BUCKETS  64
#define IDEM_REBUILD_FACTOR 4        /* records read at open per max_keys */

typedef struct idem_ent {
    struct idem_ent *hnext;          /* bucket chain */
    struct idem_ent *older, *newer;  /* age list */
    uint64_t hk;                     /* hash of scope + key */
    uint64_t req_hash;
    int64_t  created_ms;
    int64_t  deliver_at_ms;
    uint8_t  msg_id[BRK_UUID_LEN];
    char     txid[BRK_TXID_MAX + 1];
    bool     busy;                   /* reserved by a ticket */
    bool     done;                   /* status/response hold the answer */
    int      status;
    char    *response;               /* malloc'ed, owned by the entry */
    size_t   response_len;
    uint16_t scope_len, key_len;
    char     sk[];                   /* scope bytes, key bytes, NUL */
} idem_ent;

struct api_idem {
    brk_store *s;                    /* borrowed */
    const brk_clock *clock;          /* the store's */
    brk_uuidgen *ids;
    int64_t window_ms;
    size_t max_keys;
    pthread_mutex_t mu;              /* everything below */
    idem_ent **buckets;
    size_t nbuckets;                 /* power of two */
    size_t count;
    idem_ent *oldest, *newest;       /* age list ends */
    api_idem_stats st;
};

/* A decoded record body (views into the record). */
typedef struct idem_rec {
    uint8_t phase;
    uint16_t status;
    uint64_t req_hash;
    uint8_t msg_id[BRK_UUID_LEN];
    int64_t deliver_at_ms, created_ms;
    const char *scope, *txid, *response;
    size_t scope_len, txid_len, response_len;
} idem_rec;

/* ---- little-endian and hashing ------------------------------------------ */

static void st16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void st32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void st64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint16_t ld16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t ld32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16)
           | ((uint32_t)p[3] << 24);
}

static uint64_t ld64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

#define FNV_OFFSET 14695981039346656037ull
#define FNV_PRIME  1099511628211ull

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= FNV_PRIME;
    }
    return h;
}

uint64_t api_idem_hash(const char *method, const char *path,
                       const void *body, size_t body_len)
{
    static const uint8_t nul = 0;
    uint64_t h = FNV_OFFSET;
    if (method)
        h = fnv(h, method, strlen(method));
    h = fnv(h, &nul, 1);
    if (path)
        h = fnv(h, path, strlen(path));
    h = fnv(h, &nul, 1);
    if (body && body_len)
        h = fnv(h, body, body_len);
    return h;
}

bool api_idem_key_valid(const char *key)
{
    if (!key || !key[0])
        return false;
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)key; *p; p++, n++)
        if (*p < 0x21 || *p > 0x7E || n >= API_IDEM_KEY_MAX)
            return false;
    return true;
}

static uint64_t sk_hash(const char *scope, size_t sl, const char *key,
                        size_t kl)
{
    static const uint8_t nul = 0;
    uint64_t h = fnv(FNV_OFFSET, scope, sl);
    h = fnv(h, &nul, 1);
    return fnv(h, key, kl);
}

static void set_err(char *buf, size_t len, const char *fmt, ...)
{
    if (!buf || !len)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
}

/* ---- table (caller holds t->mu) ------------------------------------------ */

static idem_ent *tab_find(api_idem *t, uint64_t hk, const char *scope,
                          size_t sl, const char *key, size_t kl)
{
    for (idem_ent *e = t->buckets[hk & (t->nbuckets - 1)]; e; e = e->hnext)
        if (e->hk == hk && e->scope_len == sl && e->key_len == kl
            && memcmp(e->sk, scope, sl) == 0 && memcmp(e->sk + sl, key, kl) == 0)
            return e;
    return NULL;
}

/* Double the bucket array; on allocation failure keep the old one (chains
 * get longer, nothing breaks). */
static void tab_grow(api_idem *t)
{
    size_t n = t->nbuckets * 2;
    idem_ent **nb = calloc(n, sizeof *nb);
    if (!nb)
        return;
    for (size_t i = 0; i < t->nbuckets; i++) {
        idem_ent *e = t->buckets[i];
        while (e) {
            idem_ent *next = e->hnext;
            e->hnext = nb[e->hk & (n - 1)];
            nb[e->hk & (n - 1)] = e;
            e = next;
        }
    }
    free(t->buckets);
    t->buckets = nb;
    t->nbuckets = n;
}

static void tab_insert(api_idem *t, idem_ent *e)
{
    if (t->count >= t->nbuckets)
        tab_grow(t);
    idem_ent **b = &t->buckets[e->hk & (t->nbuckets - 1)];
    e->hnext = *b;
    *b = e;
    e->newer = NULL;
    e->older = t->newest;
    if (t->newest)
        t->newest->newer = e;
    else
        t->oldest = e;
    t->newest = e;
    t->count++;
}

static void ent_free(idem_ent *e)
{
    if (e) {
        free(e->response);
        free(e);
    }
}

static void tab_remove(api_idem *t, idem_ent *e)
{
    idem_ent **pp = &t->buckets[e->hk & (t->nbuckets - 1)];
    while (*pp != e)
        pp = &(*pp)->hnext;
    *pp = e->hnext;
    if (e->older)
        e->older->newer = e->newer;
    else
        t->oldest = e->newer;
    if (e->newer)
        e->newer->older = e->older;
    else
        t->newest = e->older;
    t->count--;
    ent_free(e);
}

static int64_t cutoff_of(const api_idem *t, int64_t now)
{
    return now > INT64_MIN + t->window_ms ? now - t->window_ms : INT64_MIN;
}

/* Forget entries older than the window, oldest first; stops at the first
 * young one (the list is in creation order).  Busy ones stay. */
static void expire_old(api_idem *t, int64_t now)
{
    int64_t cut = cutoff_of(t, now);
    idem_ent *e = t->oldest;
    while (e && e->created_ms < cut) {
        idem_ent *next = e->newer;
        if (!e->busy)
            tab_remove(t, e);
        e = next;
    }
}

/* Keep room for one more entry under max_keys: evict the oldest idle
 * entries.  If every entry is reserved the bound is exceeded briefly
 * rather than forgetting an operation in flight. */
static void evict_for_one(api_idem *t)
{
    idem_ent *e = t->oldest;
    while (e && t->count >= t->max_keys) {
        idem_ent *next = e->newer;
        if (!e->busy) {
            tab_remove(t, e);
            t->st.evicted_total++;
        }
        e = next;
    }
}

static idem_ent *ent_new(const char *scope, size_t sl, const char *key,
                         size_t kl, uint64_t hk)
{
    idem_ent *e = calloc(1, sizeof *e + sl + kl + 1);
    if (!e)
        return NULL;
    memcpy(e->sk, scope, sl);
    memcpy(e->sk + sl, key, kl);
    e->scope_len = (uint16_t)sl;
    e->key_len = (uint16_t)kl;
    e->hk = hk;
    return e;
}

/* ---- records ------------------------------------------------------------- */

/* Append e's INTENT or DONE record (deferred sync).  e is reserved by the
 * caller, so its fields are stable without the lock. */
static brk_status append_rec(api_idem *t, const idem_ent *e, uint8_t phase,
                             int status, const char *resp, size_t rlen)
{
    size_t tl = strlen(e->txid);
    if (rlen > UINT32_MAX)
        return BRK_TOOBIG;
    size_t n = IDEM_HDR + e->scope_len + tl + rlen;
    uint8_t *b = malloc(n);
    if (!b)
        return BRK_NOMEM;
    memset(b, 0, IDEM_HDR);
    b[0] = IDEM_VERSION;
    b[1] = phase;
    st16(b + 2, e->scope_len);
    st16(b + 4, (uint16_t)status);
    b[6] = (uint8_t)tl;
    st64(b + 8, e->req_hash);
    memcpy(b + 16, e->msg_id, BRK_UUID_LEN);
    st64(b + 32, (uint64_t)e->deliver_at_ms);
    st64(b + 40, (uint64_t)e->created_ms);
    st32(b + 48, (uint32_t)rlen);
    memcpy(b + IDEM_HDR, e->sk, e->scope_len);
    memcpy(b + IDEM_HDR + e->scope_len, e->txid, tl);
    if (rlen)
        memcpy(b + IDEM_HDR + e->scope_len + tl, resp, rlen);

    brk_append_req rq;
    memset(&rq, 0, sizeof rq);
    rq.topic = API_IDEM_TOPIC;
    rq.queue = 0;
    rq.key.ptr = e->sk + e->scope_len;
    rq.key.len = e->key_len;
    rq.body.ptr = b;
    rq.body.len = n;
    rq.type = BRK_REC_OP;
    rq.allow_internal = true;
    rq.defer_sync = true;
    brk_append_res res;
    brk_status st = brk_store_append(t->s, &rq, &res);
    free(b);
    return st;
}

static bool rec_decode(const brk_record *r, idem_rec *o)
{
    const uint8_t *b = r->body.ptr;
    if (r->type != BRK_REC_OP || r->body.len < IDEM_HDR || b[0] != IDEM_VERSION
        || (b[1] != IDEM_INTENT && b[1] != IDEM_DONE))
        return false;
    if (r->key.len == 0 || r->key.len > API_IDEM_KEY_MAX)
        return false;
    o->phase = b[1];
    o->scope_len = ld16(b + 2);
    o->status = ld16(b + 4);
    o->txid_len = b[6];
    o->req_hash = ld64(b + 8);
    memcpy(o->msg_id, b + 16, BRK_UUID_LEN);
    o->deliver_at_ms = (int64_t)ld64(b + 32);
    o->created_ms = (int64_t)ld64(b + 40);
    o->response_len = ld32(b + 48);
    if (o->scope_len == 0 || o->scope_len > IDEM_SCOPE_MAX
        || o->txid_len > BRK_TXID_MAX
        || r->body.len != IDEM_HDR + o->scope_len + o->txid_len + o->response_len)
        return false;
    o->scope = (const char *)b + IDEM_HDR;
    o->txid = o->scope + o->scope_len;
    o->response = o->txid + o->txid_len;
    return true;
}

static bool same_generation(const idem_ent *e, const idem_rec *o)
{
    return e->req_hash == o->req_hash && e->created_ms == o->created_ms
           && memcmp(e->msg_id, o->msg_id, BRK_UUID_LEN) == 0;
}

/* DONE record: copy the answer into e.  False when out of memory. */
static bool ent_complete(idem_ent *e, const idem_rec *o)
{
    char *copy = malloc(o->response_len + 1);
    if (!copy)
        return false;
    memcpy(copy, o->response, o->response_len);
    copy[o->response_len] = 0;
    free(e->response);
    e->response = copy;
    e->response_len = o->response_len;
    e->status = o->status;
    e->done = true;
    return true;
}

/* Rebuild step for one record (the caller holds no lock: open is single
 * threaded). */
static brk_status apply_rec(api_idem *t, const brk_record *r, int64_t cut)
{
    idem_rec o;
    if (r->store_ms < cut || !rec_decode(r, &o) || o.created_ms < cut)
        return BRK_OK;
    const char *key = r->key.ptr;
    uint64_t hk = sk_hash(o.scope, o.scope_len, key, r->key.len);
    idem_ent *e = tab_find(t, hk, o.scope, o.scope_len, key, r->key.len);
    if (e && same_generation(e, &o)) {
        if (o.phase == IDEM_DONE && !ent_complete(e, &o))
            return BRK_NOMEM;
        return BRK_OK;
    }
    if (e)
        tab_remove(t, e);
    e = ent_new(o.scope, o.scope_len, key, r->key.len, hk);
    if (!e)
        return BRK_NOMEM;
    e->req_hash = o.req_hash;
    e->created_ms = o.created_ms;
    e->deliver_at_ms = o.deliver_at_ms;
    memcpy(e->msg_id, o.msg_id, BRK_UUID_LEN);
    memcpy(e->txid, o.txid, o.txid_len);
    e->txid[o.txid_len] = 0;
    if (o.phase == IDEM_DONE && !ent_complete(e, &o)) {
        ent_free(e);
        return BRK_NOMEM;
    }
    evict_for_one(t);
    tab_insert(t, e);
    return BRK_OK;
}

static brk_status rebuild(api_idem *t, char *errbuf, size_t errlen)
{
    uint64_t lo, hi;
    brk_status st = brk_store_queue_range(t->s, API_IDEM_TOPIC, 0, &lo, &hi);
    if (st != BRK_OK) {
        set_err(errbuf, errlen, "reading %s: %s", API_IDEM_TOPIC, brk_strerror(st));
        return st;
    }
    uint64_t span = t->max_keys > UINT64_MAX / IDEM_REBUILD_FACTOR
                    ? UINT64_MAX : (uint64_t)t->max_keys * IDEM_REBUILD_FACTOR;
    if (hi - lo > span)
        lo = hi - span;
    int64_t cut = cutoff_of(t, t->clock->now_ms(t->clock->ctx));
    uint64_t off = lo;
    while (off < hi) {
        brk_batch *b = NULL;
        st = brk_store_read(t->s, API_IDEM_TOPIC, 0, off, IDEM_READ_BATCH, &b);
        if (st != BRK_OK) {
            set_err(errbuf, errlen, "reading %s at offset %llu: %s: %s",
                    API_IDEM_TOPIC, (unsigned long long)off, brk_strerror(st),
                    brk_store_errstr(t->s));
            return st;
        }
        size_t n = b->count;
        for (size_t i = 0; i < n && st == BRK_OK; i++)
            st = apply_rec(t, &b->recs[i], cut);
        off = b->next_offset;
        brk_batch_free(b);
        if (st != BRK_OK) {
            set_err(errbuf, errlen, "rebuilding the idempotency table: %s",
                    brk_strerror(st));
            return st;
        }
        if (n == 0)
            break;
    }
    return BRK_OK;
}

/* ---- open / close ------------------------------------------------------- */

brk_status api_idem_open(api_idem **out, brk_store *s, int64_t window_ms,
                         size_t max_keys, char *errbuf, size_t errlen)
{
    if (errbuf && errlen)
        errbuf[0] = 0;
    if (!out)
        return BRK_INVAL;
    *out = NULL;
    if (!s || window_ms <= 0 || max_keys == 0) {
        set_err(errbuf, errlen, "idempotency table: %s",
                !s ? "no store" : window_ms <= 0 ? "window must be > 0"
                                                 : "max_keys must be > 0");
        return BRK_INVAL;
    }
    brk_status st = brk_topic_create(s, API_IDEM_TOPIC, 1);
    if (st != BRK_OK && st != BRK_EXISTS) {
        set_err(errbuf, errlen, "creating topic %s: %s: %s", API_IDEM_TOPIC,
                brk_strerror(st), brk_store_errstr(s));
        return st;
    }
    api_idem *t = calloc(1, sizeof *t);
    if (!t || !(t->buckets = calloc(IDEM_MIN_BUCKETS, sizeof *t->buckets))) {
        free(t);
        set_err(errbuf, errlen, "out of memory");
        return BRK_NOMEM;
    }
    t->nbuckets = IDEM_MIN_BUCKETS;
    t->s = s;
    t->clock = brk_store_clock(s);
    t->window_ms = window_ms;
    t->max_keys = max_keys;
    pthread_mutex_init(&t->mu, NULL);
    st = brk_uuidgen_open(&t->ids, t->clock, 0);
    if (st != BRK_OK) {
        set_err(errbuf, errlen, "uuid generator: %s", brk_strerror(st));
        api_idem_close(t);
        return st;
    }
    st = rebuild(t, errbuf, errlen);
    if (st != BRK_OK) {
        api_idem_close(t);
        return st;
    }
    *out = t;
    return BRK_OK;
}

void api_idem_close(api_idem *t)
{
    if (!t)
        return;
    for (idem_ent *e = t->oldest; e;) {
        idem_ent *next = e->newer;
        ent_free(e);
        e = next;
    }
    free(t->buckets);
    if (t->ids)
        brk_uuidgen_close(t->ids);
    pthread_mutex_destroy(&t->mu);
    free(t);
}

/* ---- begin / finish / abort ---------------------------------------------- */

static void ticket_ids(api_idem_ticket *tk, idem_ent *e)
{
    memcpy(tk->msg_id, e->msg_id, BRK_UUID_LEN);
    memcpy(tk->txid, e->txid, sizeof tk->txid);
    tk->deliver_at_ms = e->deliver_at_ms;
    tk->priv_ = e;
}

/* Verdict for an existing (unexpired) entry; t->mu held. */
static api_idem_verdict begin_existing(api_idem *t, idem_ent *e,
                                       uint64_t req_hash, api_idem_ticket *tk,
                                       brk_status *err)
{
    if (e->req_hash != req_hash) {
        t->st.mismatches_total++;
        return API_IDEM_MISMATCH;
    }
    if (e->busy)
        return API_IDEM_BUSY;
    if (e->done) {
        tk->response = malloc(e->response_len + 1);
        if (!tk->response) {
            *err = BRK_NOMEM;
            return API_IDEM_ERROR;
        }
        memcpy(tk->response, e->response, e->response_len);
        tk->response[e->response_len] = 0;
        tk->response_len = e->response_len;
        tk->status = e->status;
        t->st.replays_total++;
        return API_IDEM_REPLAY;
    }
    e->busy = true;
    ticket_ids(tk, e);
    return API_IDEM_REDO;
}

/* A fresh reserved entry with new ids; NULL (and *err) on failure. */
static idem_ent *make_new(api_idem *t, const char *scope, size_t sl,
                          const char *key, size_t kl, uint64_t hk,
                          uint64_t req_hash, const api_idem_intent *in,
                          int64_t now, brk_status *err)
{
    size_t txl = in && in->txid ? strlen(in->txid) : 0;
    if (txl > BRK_TXID_MAX) {
        *err = BRK_INVAL;
        return NULL;
    }
    idem_ent *e = ent_new(scope, sl, key, kl, hk);
    if (!e) {
        *err = BRK_NOMEM;
        return NULL;
    }
    e->req_hash = req_hash;
    e->created_ms = now;
    e->deliver_at_ms = in ? in->deliver_at_ms : 0;
    e->busy = true;
    brk_uuidgen_next(t->ids, e->msg_id);
    if (txl)
        memcpy(e->txid, in->txid, txl + 1);
    else
        brk_uuid_format(e->msg_id, e->txid);
    return e;
}

api_idem_verdict api_idem_begin(api_idem *t, const char *scope,
                                const char *key, uint64_t req_hash,
                                const api_idem_intent *in,
                                api_idem_ticket *tk, brk_status *err)
{
    brk_status dummy;
    if (!err)
        err = &dummy;
    *err = BRK_OK;
    if (tk)
        memset(tk, 0, sizeof *tk);
    size_t sl = scope ? strlen(scope) : 0;
    if (!t || !tk || sl == 0 || sl > IDEM_SCOPE_MAX || !api_idem_key_valid(key)) {
        *err = BRK_INVAL;
        return API_IDEM_ERROR;
    }
    size_t kl = strlen(key);
    uint64_t hk = sk_hash(scope, sl, key, kl);

    pthread_mutex_lock(&t->mu);
    int64_t now = t->clock->now_ms(t->clock->ctx);
    expire_old(t, now);
    idem_ent *e = tab_find(t, hk, scope, sl, key, kl);
    if (e && e->created_ms < cutoff_of(t, now) && !e->busy) {
        tab_remove(t, e);       /* expired but younger than the list head */
        e = NULL;
    }
    if (e) {
        api_idem_verdict v = begin_existing(t, e, req_hash, tk, err);
        pthread_mutex_unlock(&t->mu);
        return v;
    }
    e = make_new(t, scope, sl, key, kl, hk, req_hash, in, now, err);
    if (e) {
        evict_for_one(t);
        tab_insert(t, e);
    }
    pthread_mutex_unlock(&t->mu);
    if (!e)
        return API_IDEM_ERROR;

    brk_status st = append_rec(t, e, IDEM_INTENT, 0, NULL, 0);
    if (st != BRK_OK) {
        pthread_mutex_lock(&t->mu);
        tab_remove(t, e);
        pthread_mutex_unlock(&t->mu);
        *err = st;
        return API_IDEM_ERROR;
    }
    ticket_ids(tk, e);
    return API_IDEM_NEW;
}

void api_idem_finish(api_idem *t, api_idem_ticket *tk, int status,
                     const char *response, size_t len)
{
    if (!t || !tk || !tk->priv_)
        return;
    idem_ent *e = tk->priv_;
    tk->priv_ = NULL;
    if (!response)
        len = 0;
    /* Still reserved: the DONE lands in the log before anyone can start a
     * new generation of this key.  A failed append is not an error for the
     * caller (the operation succeeded); the answer stays in memory, and a
     * restart would turn it into a REDO of the recorded intent. */
    (void)append_rec(t, e, IDEM_DONE, status, response, len);
    char *copy = malloc(len + 1);
    if (copy) {
        if (len)
            memcpy(copy, response, len);
        copy[len] = 0;
    }
    pthread_mutex_lock(&t->mu);
    if (copy) {
        free(e->response);
        e->response = copy;
        e->response_len = len;
        e->status = status;
        e->done = true;
    }
    e->busy = false;
    pthread_mutex_unlock(&t->mu);
}

void api_idem_abort(api_idem *t, api_idem_ticket *tk)
{
    if (!t || !tk || !tk->priv_)
        return;
    idem_ent *e = tk->priv_;
    tk->priv_ = NULL;
    pthread_mutex_lock(&t->mu);
    e->busy = false;
    pthread_mutex_unlock(&t->mu);
}

void api_idem_get_stats(api_idem *t, api_idem_stats *out)
{
    memset(out, 0, sizeof *out);
    if (!t)
        return;
    pthread_mutex_lock(&t->mu);
    *out = t->st;
    out->keys = t->count;
    pthread_mutex_unlock(&t->mu);
}
