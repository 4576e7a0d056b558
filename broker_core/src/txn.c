/*
 * txn.c - transactional half messages and the check-back scheduler.
 *
 * STATE MACHINE (one transaction; "op" = an op record in __txn_op)
 * ================================================================
 *
 *                      prepare (HALF record)
 *                              |
 *                              v
 *          +------------>  PREPARED  <--------------------------+
 *          |             /  |  |   \                            |
 *  UNKNOWN |   check due/   |  |    \ checks exhausted,         | ERROR:
 *  (op     |   worker      |  |     \ action HOLD (op STUCK)   | backoff,
 *   CHECK, |   asks        |  |      v                          | no op,
 *   checks+1)  v           |  |    PREPARED+stuck --------------|-- not
 *          +-- CHECKING ---+  |      |  (no more checks)        |   counted
 *                |  |  |      |      |                          |
 *                |  |  +------|------|--------------------------+
 *     COMMIT     |  |         |      |
 *     answer     |  | ROLLBACK answer, or checks exhausted with
 *                |  | action ROLLBACK (op ROLLBACK, source
 *                |  | "exhausted"; expiry message if configured)
 *                v  v         |      |
 *   client  COMMITTED   ROLLED_BACK  <- client rollback (op ROLLBACK)
 *   commit ---^   (op COMMIT, then the message into its topic)
 *
 * Terminal states are final.  Every arrow into them goes through
 * resolve(): under the lock the transaction is marked RESOLVING with the
 * verdict; a second verdict waits for the first to finish, then sees the
 * terminal state (same verdict: a replay; the other: CONFLICT).  A check
 * result arriving for a transaction that is resolving or terminal is
 * dropped.  Forbidden arrows: COMMITTED -> anything, ROLLED_BACK ->
 * anything, stuck -> checks.
 *
 * RECORDS
 * =======
 * HALF record (topic "__txn_half", 1 queue, type BRK_REC_HALF): the
 * message's key, tag, body, flags, born time and message id, with the
 * user's headers plus these system properties (keys start with 0x1F):
 *   \x1ftxid    the txid (1..128 printable ASCII bytes)
 *   \x1ftopic   the target topic
 *   \x1fpolicy  11 bytes: u32 first_check_ms, u32 interval_ms,
 *               u16 max_checks, u8 on_exhausted
 *   \x1fexpiry  expiry topic (only when set)
 *   \x1fdelay   9 bytes: u8 kind (1 = delay_ms after commit, 2 = deliver_at
 *               wall ms), i64 value (only for delayed commits)
 *   \x1fprep    i64 prepare time (wall ms)
 *   \x1fcopy    18 bytes: u16 checks, i64 next_check_ms, u64 log offset of
 *               the half record this one replaces (compaction copies only)
 *
 * OP record (topic "__txn_op", 1 queue, type BRK_REC_OP), key = txid, body
 * 24 bytes, little-endian:
 *   0   u8   version (1)
 *   1   u8   kind: 1 COMMIT, 2 ROLLBACK, 3 CHECK (an UNKNOWN answer),
 *            4 STUCK (checks exhausted, action HOLD)
 *   2   u8   source: 1 client, 2 check-back, 3 checks exhausted
 *   3   u8   reserved (0)
 *   4   u16  checks counted so far (after this op)
 *   6   u16  reserved (0)
 *   8   i64  next check time (CHECK), else 0
 *   16  u64  log offset of the half record the op applies to
 * An op applies only to the half record it names, so an op written before
 * a compaction copy never touches the copy (the copy carries the count).
 *
 * state.txn (brk_store_state_write), little-endian:
 *   0   u32  version (1)
 *   4   u32  reserved
 *   8   u64  half_from: queue offset in __txn_half where restart reads from
 *   16  u64  op_from: queue offset in __txn_op where restart reads from
 *   24  u64  effect_from: log offset; every verdict op below it has had its
 *            effect (message or expiry message appended)
 *
 * WHY A RESTART NEVER LOSES OR REPEATS A VERDICT
 * ==============================================
 * A verdict is written decision first: the op, then its effect (the message
 * into its topic, or the expiry message).  The store makes a prefix of the
 * log durable, so a surviving effect implies a surviving op: a transaction
 * can never be committed in a topic and pending in our books.  If the op
 * survived but not the effect, restart finds it: it scans the log from
 * effect_from (only what was written since the last state save, or since
 * the oldest effect still in flight) for the message ids the verdicts there
 * should have produced, and appends the missing ones.  Nothing else ever
 * appends a committed message, so it lands once.  An acknowledged verdict
 * (the call returned OK) had its op stored per the flush mode, so it is
 * never lost, and the fence (terminal is final, also while rebuilding: ops
 * on a terminal transaction are ignored) means it is never reversed.
 *
 * Pending transactions, their check counts and next check times are
 * rebuilt by reading the half and op topics from state.txn's offsets,
 * merged in log order.  A retention cursor ("txn") keeps those segments.
 * Half records of transactions pending for longer than compact_after_ms are
 * copied to the log's end (with their count and next check time), so a
 * transaction held for weeks does not pin weeks of log.  A crash between
 * copy and anything else is harmless: the later half record of a txid
 * supersedes the earlier while the transaction is pending.
 *
 * MEMORY
 * ======
 * One 40-byte entry per pending or recently resolved transaction in an
 * open-addressing table keyed by a 64-bit hash of the txid (the txid itself
 * stays on disk, in the half record), plus a 16-byte timer per pending one.
 * Two txids with the same 64-bit hash are refused at prepare (CONFLICT,
 * said in the error string) rather than confused.
 */
#define _GNU_SOURCE
#include "broker/txn.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "broker/record.h"
#include "broker/uuid.h"
#include "le.h"
#include "timerheap.h"

#define OP_LEN        24
#define OP_VERSION    1
#define STATE_LEN     32
#define POLICY_LEN    11
#define COPY_LEN      18

enum { OP_COMMIT = 1, OP_ROLLBACK = 2, OP_CHECK = 3, OP_STUCK = 4 };
enum { SRC_CLIENT = 1, SRC_CHECK = 2, SRC_EXHAUSTED = 3 };

/* entry flags */
enum {
    F_STUCK     = 1u << 0,
    F_EXPIRED   = 1u << 1,
    F_CHECKING  = 1u << 2,    /* queued for or in a worker */
    F_RESOLVING = 1u << 3,    /* a verdict is being written */
    F_PREPARING = 1u << 4,    /* the half record is being written */
    F_EFFECT    = 1u << 5,    /* verdict stored, its effect still owed */
    F_MOVING    = 1u << 6,    /* a compaction copy is being written */
    F_EXHAUSTED = 1u << 7     /* rebuild: checks ran out, action not logged */
};

typedef struct txn_ent {
    uint64_t hash;            /* 0 = empty slot */
    uint64_t half_off;        /* log offset of the current half record */
    int64_t  when_ms;         /* pending: next check; resolved: when */
    uint32_t prep_s;          /* prepare time, s since the epoch (listing
                                 order, age); the exact ms is on disk */
    uint32_t half_age_s;      /* the current half record was written this
                                 many seconds after prep_s (copies) */
    uint16_t checks;
    uint16_t errors;          /* consecutive ERROR answers (saturates) */
    uint8_t  state;           /* brk_txn_state */
    uint8_t  flags;
    uint8_t  pad_[2];
} txn_ent;
/* The policy (interval, limit, action) is not kept here: every check reads
 * the half record anyway, and it is there. */

_Static_assert(sizeof(txn_ent) == 40, "txn_ent is sized for the memory bound");

typedef struct job {
    uint64_t hash;
} job;

struct brk_txn {
    brk_store *s;
    const brk_clock *clock;
    brk_txn_opts o;
    char expiry_default[BRK_TOPIC_MAX + 1];
    brk_uuidgen *ids;

    pthread_mutex_t mu;
    pthread_cond_t  cv;         /* entry flag changes (resolving, preparing) */
    txn_ent *tab;
    size_t cap, used;           /* used = live entries */
    size_t pending, stuck;
    brk_timerheap heap;

    uint64_t *resolved;         /* ring of hashes in resolution order */
    size_t rcap, rhead, rlen;

    uint64_t *inflight;         /* lower bounds of verdict ops whose effect
                                   is not yet appended */
    size_t ninflight, cinflight;

    /* worker pool */
    pthread_cond_t  wcv;        /* jobs available / stopping */
    pthread_cond_t  idle_cv;    /* a job finished */
    job *jobs;
    size_t jcap, jhead, jlen;
    unsigned active;
    bool stopping;
    pthread_t *workers;
    unsigned nworkers;

    /* scheduler thread */
    pthread_t sched;
    bool sched_running;
    bool rearm;                 /* a timer push failed: sweep re-arms */
    pthread_cond_t scv;
    bool sched_stop;

    int64_t next_save_ms, next_sweep_ms;
    uint64_t saved[3];          /* last state written */
    bool rebuilt;               /* state loaded: saving it is allowed */
    uint32_t cursor;
    bool cursor_ok;

    brk_txn_stats st;
};

/* ---- small helpers -------------------------------------------------------- */

static int64_t now_ms(brk_txn *t)
{
    return t->clock->now_ms(t->clock->ctx);
}

/* a + b for times and durations, saturating: "forever" may be INT64_MAX. */
static int64_t sat_add(int64_t a, int64_t b)
{
    int64_t r;
    if (__builtin_add_overflow(a, b, &r))
        return b > 0 ? INT64_MAX : INT64_MIN;
    return r;
}

static uint64_t txid_hash(const char *txid, size_t len)
{
    uint64_t h = brk_tag_hash(txid, len);
    return h ? h : 1;
}

static size_t slot_of(uint64_t h, size_t cap)
{
    h ^= h >> 31;
    h *= 0x7fb5d329728ea185ULL;
    h ^= h >> 27;
    return (size_t)h & (cap - 1);
}

const char *brk_txn_state_name(brk_txn_state st)
{
    switch (st) {
    case BRK_TXN_PREPARED: return "prepared";
    case BRK_TXN_COMMITTED: return "committed";
    case BRK_TXN_ROLLED_BACK: return "rolled_back";
    }
    return "unknown";
}

void brk_check_policy_init(brk_check_policy *p)
{
    memset(p, 0, sizeof *p);
    p->first_check_ms = 6000;
    p->interval_ms = 60000;
    p->max_checks = 15;
    p->on_exhausted = BRK_EXHAUSTED_ROLLBACK;
}

void brk_txn_opts_init(brk_txn_opts *o)
{
    memset(o, 0, sizeof *o);
    brk_check_policy_init(&o->default_policy);
    o->workers = 4;
    o->max_queued_checks = 1024;
    o->error_backoff_min_ms = 1000;
    o->error_backoff_max_ms = 60000;
    o->resolved_keep_ms = 3600 * 1000LL;
    o->compact_after_ms = 3600 * 1000LL;
    o->state_interval_ms = 1000;
}

static bool txid_valid(const char *txid, size_t len)
{
    if (len == 0 || len > BRK_TXID_MAX)
        return false;
    for (size_t i = 0; i < len; i++)
        if (txid[i] < 0x21 || txid[i] > 0x7e)
            return false;
    return true;
}

static brk_status policy_check(const brk_check_policy *p)
{
    if (p->interval_ms == 0 || p->max_checks == 0)
        return BRK_INVAL;
    if (p->on_exhausted != BRK_EXHAUSTED_ROLLBACK
        && p->on_exhausted != BRK_EXHAUSTED_HOLD)
        return BRK_INVAL;
    if (p->expiry_topic && p->expiry_topic[0]) {
        if (p->on_exhausted != BRK_EXHAUSTED_ROLLBACK)
            return BRK_INVAL;
        if (!brk_topic_name_valid(p->expiry_topic, strlen(p->expiry_topic),
                                  false) || p->expiry_topic[0] == '.')
            return BRK_INVAL;
    }
    return BRK_OK;
}

/* ---- the table ------------------------------------------------------------ */

static txn_ent *tab_find(brk_txn *t, uint64_t h)
{
    if (t->cap == 0)
        return NULL;
    for (size_t i = slot_of(h, t->cap);; i = (i + 1) & (t->cap - 1)) {
        if (t->tab[i].hash == h)
            return &t->tab[i];
        if (t->tab[i].hash == 0)
            return NULL;
    }
}

static brk_status tab_grow(brk_txn *t)
{
    size_t ncap = t->cap ? t->cap * 2 : 1024;
    txn_ent *n = calloc(ncap, sizeof *n);
    if (!n)
        return BRK_NOMEM;
    for (size_t i = 0; i < t->cap; i++) {
        if (t->tab[i].hash == 0)
            continue;
        size_t j = slot_of(t->tab[i].hash, ncap);
        while (n[j].hash)
            j = (j + 1) & (ncap - 1);
        n[j] = t->tab[i];
    }
    free(t->tab);
    t->tab = n;
    t->cap = ncap;
    return BRK_OK;
}

/* Insert a zeroed entry for h (must be absent).  Entries move on growth and
 * deletion: never keep a txn_ent pointer across an unlock. */
static txn_ent *tab_insert(brk_txn *t, uint64_t h)
{
    /* Grow at 80% full: linear probing with backward-shift deletion stays
     * short there, and right after a doubling (40% full) an entry costs
     * 100 bytes, which with its timer keeps under the 128-byte budget. */
    if ((t->used + 1) * 5 > t->cap * 4 && tab_grow(t) != BRK_OK)
        return NULL;
    size_t i = slot_of(h, t->cap);
    while (t->tab[i].hash)
        i = (i + 1) & (t->cap - 1);
    memset(&t->tab[i], 0, sizeof t->tab[i]);
    t->tab[i].hash = h;
    t->used++;
    return &t->tab[i];
}

/* Linear-probing delete with backward shift (no tombstones). */
static void tab_remove(brk_txn *t, txn_ent *e)
{
    size_t mask = t->cap - 1, i = (size_t)(e - t->tab), j = i;
    t->tab[i].hash = 0;
    t->used--;
    for (;;) {
        j = (j + 1) & mask;
        if (t->tab[j].hash == 0)
            return;
        size_t home = slot_of(t->tab[j].hash, t->cap);
        /* Move j back to i unless its home lies cyclically in (i, j]. */
        bool stay = (i <= j) ? (home > i && home <= j) : (home > i || home <= j);
        if (stay)
            continue;
        t->tab[i] = t->tab[j];
        t->tab[j].hash = 0;
        i = j;
    }
}

static void schedule(brk_txn *t, txn_ent *e, int64_t when)
{
    e->when_ms = when;
    /* NOMEM here leaves the transaction without a timer until the next
     * sweep re-arms it (sweep_locked); it is never lost from the table. */
    if (brk_timerheap_push(&t->heap, when, e->hash) != BRK_OK)
        t->rearm = true;
    if (t->sched_running)
        pthread_cond_signal(&t->scv);
}

static void ring_push(brk_txn *t, uint64_t h)
{
    if (t->rlen == t->rcap) {
        size_t ncap = t->rcap ? t->rcap * 2 : 1024;
        uint64_t *n = malloc(ncap * sizeof *n);
        if (!n)
            return;           /* the entry then lives until the table is
                                 rebuilt; a leak of 40 bytes, not an error */
        for (size_t i = 0; i < t->rlen; i++)
            n[i] = t->resolved[(t->rhead + i) % t->rcap];
        free(t->resolved);
        t->resolved = n;
        t->rcap = ncap;
        t->rhead = 0;
    }
    t->resolved[(t->rhead + t->rlen) % t->rcap] = h;
    t->rlen++;
}

/* Mark e terminal (under mu). */
static void set_terminal(brk_txn *t, txn_ent *e, uint8_t state, bool expired,
                         int64_t when)
{
    if (e->state == BRK_TXN_PREPARED) {
        t->pending--;
        if (e->flags & F_STUCK)
            t->stuck--;
    }
    e->state = state;
    e->flags &= (uint8_t)~(F_STUCK | F_RESOLVING | F_EXHAUSTED);
    if (expired)
        e->flags |= F_EXPIRED;
    e->when_ms = when;
    ring_push(t, e->hash);
}

/* ---- effects in flight ------------------------------------------------------ */

static uint64_t log_end(brk_txn *t)
{
    brk_store_stats ss;
    brk_store_get_stats(t->s, &ss);
    return ss.log_end;
}

/* Register a verdict about to be written; returns its lower bound. */
static uint64_t inflight_add(brk_txn *t)
{
    uint64_t lb = log_end(t);
    if (t->ninflight == t->cinflight) {
        size_t n = t->cinflight ? t->cinflight * 2 : 16;
        uint64_t *v = realloc(t->inflight, n * sizeof *v);
        if (!v)
            return lb;        /* unregistered: a state save meanwhile may
                                 move effect_from past this verdict */
        t->inflight = v;
        t->cinflight = n;
    }
    t->inflight[t->ninflight++] = lb;
    return lb;
}

static void inflight_del(brk_txn *t, uint64_t lb)
{
    for (size_t i = 0; i < t->ninflight; i++)
        if (t->inflight[i] == lb) {
            t->inflight[i] = t->inflight[--t->ninflight];
            return;
        }
}

/* ---- records -------------------------------------------------------------- */

typedef struct half_view {
    brk_batch *b;             /* owns the bytes */
    const brk_record *r;
    char txid[BRK_TXID_MAX + 1];
    size_t txid_len;
    char topic[BRK_TOPIC_MAX + 1];
    brk_check_policy pol;
    char expiry[BRK_TOPIC_MAX + 1];
    uint8_t delay_kind;
    int64_t delay_val;
    int64_t prepared_ms;
    bool is_copy;
    uint16_t copy_checks;
    int64_t copy_next;
    uint64_t copy_from;
} half_view;

static brk_status parse_half(const brk_record *r, half_view *h)
{
    brk_bytes v;
    if (r->type != BRK_REC_HALF)
        return BRK_BADREC;
    if (brk_props_get(r->props, "\x1ftxid", &v) != BRK_OK || v.len == 0
        || v.len > BRK_TXID_MAX)
        return BRK_BADREC;
    memcpy(h->txid, v.ptr, v.len);
    h->txid[v.len] = 0;
    h->txid_len = v.len;
    if (brk_props_get(r->props, "\x1ftopic", &v) != BRK_OK || v.len == 0
        || v.len > BRK_TOPIC_MAX)
        return BRK_BADREC;
    memcpy(h->topic, v.ptr, v.len);
    h->topic[v.len] = 0;
    if (brk_props_get(r->props, "\x1fpolicy", &v) != BRK_OK
        || v.len != POLICY_LEN)
        return BRK_BADREC;
    const uint8_t *p = v.ptr;
    memset(&h->pol, 0, sizeof h->pol);
    h->pol.first_check_ms = brk_ld32(p);
    h->pol.interval_ms = brk_ld32(p + 4);
    h->pol.max_checks = brk_ld16(p + 8);
    h->pol.on_exhausted = p[10];
    h->expiry[0] = 0;
    if (brk_props_get(r->props, "\x1f" "expiry", &v) == BRK_OK
        && v.len <= BRK_TOPIC_MAX) {
        memcpy(h->expiry, v.ptr, v.len);
        h->expiry[v.len] = 0;
    }
    h->pol.expiry_topic = h->expiry[0] ? h->expiry : NULL;
    h->delay_kind = 0;
    h->delay_val = 0;
    if (brk_props_get(r->props, "\x1f" "delay", &v) == BRK_OK && v.len == 9) {
        h->delay_kind = ((const uint8_t *)v.ptr)[0];
        h->delay_val = (int64_t)brk_ld64((const uint8_t *)v.ptr + 1);
    }
    h->prepared_ms = r->store_ms;
    if (brk_props_get(r->props, "\x1fprep", &v) == BRK_OK && v.len == 8)
        h->prepared_ms = (int64_t)brk_ld64(v.ptr);
    h->is_copy = false;
    if (brk_props_get(r->props, "\x1f" "copy", &v) == BRK_OK
        && v.len == COPY_LEN) {
        h->is_copy = true;
        h->copy_checks = brk_ld16(v.ptr);
        h->copy_next = (int64_t)brk_ld64((const uint8_t *)v.ptr + 2);
        h->copy_from = brk_ld64((const uint8_t *)v.ptr + 10);
    }
    h->r = r;
    return BRK_OK;
}

/* Read and parse the half record at off.  The caller frees h->b. */
static brk_status read_half(brk_txn *t, uint64_t off, half_view *h)
{
    memset(h, 0, sizeof *h);
    brk_status st = brk_store_read_at(t->s, off, &h->b);
    if (st != BRK_OK)
        return st;
    if (h->b->count != 1) {
        brk_batch_free(h->b);
        h->b = NULL;
        return BRK_CORRUPT;
    }
    st = parse_half(&h->b->recs[0], h);
    if (st != BRK_OK) {
        brk_batch_free(h->b);
        h->b = NULL;
    }
    return st;
}

/* `defer`: in SYNC mode do not wait for this op's fdatasync, because the
 * caller appends its effect next and waits for that one, which covers the
 * op too (the log is durable as a prefix): one fdatasync per commit. */
static brk_status append_op(brk_txn *t, const char *txid, uint8_t kind,
                            uint8_t src, uint16_t checks, int64_t next,
                            uint64_t half_off, bool defer, uint64_t *op_off)
{
    uint8_t body[OP_LEN] = { 0 };
    body[0] = OP_VERSION;
    body[1] = kind;
    body[2] = src;
    brk_st16(body + 4, checks);
    brk_st64(body + 8, (uint64_t)next);
    brk_st64(body + 16, half_off);
    brk_append_req rq;
    memset(&rq, 0, sizeof rq);
    rq.topic = BRK_TXN_OP_TOPIC;
    rq.queue = 0;
    rq.key.ptr = txid;
    rq.key.len = strlen(txid);
    rq.body.ptr = body;
    rq.body.len = sizeof body;
    rq.type = BRK_REC_OP;
    rq.allow_internal = true;
    rq.defer_sync = defer;
    brk_append_res res;
    brk_status st = brk_store_append(t->s, &rq, &res);
    if (st == BRK_OK && op_off)
        *op_off = res.log_offset;
    return st;
}

/* The expiry event's id: the message id with its last byte flipped, so a
 * re-publication after a crash carries the same id. */
static void expiry_id(const uint8_t *msg_id, uint8_t *out)
{
    memcpy(out, msg_id, BRK_UUID_LEN);
    out[BRK_UUID_LEN - 1] ^= 0x5A;
}

static size_t json_str(char *out, size_t cap, const char *s, size_t n)
{
    size_t o = 0;
    if (o < cap) out[o] = '"';
    o++;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        size_t k;
        if (c == '"' || c == '\\') {
            esc[0] = '\\'; esc[1] = (char)c; k = 2;
        } else if (c < 0x20 || c >= 0x7f) {
            k = (size_t)snprintf(esc, sizeof esc, "\\u%04x", c);
        } else {
            esc[0] = (char)c; k = 1;
        }
        for (size_t j = 0; j < k; j++, o++)
            if (o < cap) out[o] = esc[j];
    }
    if (o < cap) out[o] = '"';
    o++;
    return o;
}

/* Publish the "transaction expired" event for half h (see README): topic =
 * its expiry topic, key = the half's key, headers = the half's headers plus
 * outboxd-txid and outboxd-event, body = JSON {event, txid, topic, msg_id,
 * checks, prepared_at_ms}. */
static brk_status publish_expiry(brk_txn *t, const half_view *h,
                                 uint16_t checks)
{
    const brk_record *r = h->r;
    size_t plen = 0;
    uint8_t *props = malloc(r->props.len + 512);
    if (!props)
        return BRK_NOMEM;
    brk_status st = brk_props_strip_sys(r->props, props, r->props.len + 512,
                                        &plen);
    /* Rebuild the block with two more headers. */
    brk_prop pairs[2] = {
        { { "outboxd-txid", 12 }, { h->txid, h->txid_len } },
        { { "outboxd-event", 13 }, { "transaction-expired", 19 } },
    };
    size_t n = 0, pos = 0;
    brk_prop *all = NULL;
    if (st == BRK_OK) {
        brk_bytes blk = { props, plen };
        brk_prop pr;
        size_t cnt = 0;
        while (brk_props_next(blk, &pos, &pr) == BRK_OK)
            cnt++;
        all = malloc((cnt + 2) * sizeof *all);
        if (!all)
            st = BRK_NOMEM;
        pos = 0;
        while (st == BRK_OK && brk_props_next(blk, &pos, &pr) == BRK_OK) {
            if ((pr.key.len == 12 && memcmp(pr.key.ptr, "outboxd-txid", 12) == 0)
                || (pr.key.len == 13
                    && memcmp(pr.key.ptr, "outboxd-event", 13) == 0))
                continue;
            all[n++] = pr;
        }
        if (st == BRK_OK) {
            all[n++] = pairs[0];
            all[n++] = pairs[1];
        }
    }
    uint8_t *block = NULL;
    size_t blen = 0;
    if (st == BRK_OK) {
        block = malloc(BRK_PROPS_MAX);
        if (!block)
            st = BRK_NOMEM;
        else
            st = brk_props_encode(all, n, block, BRK_PROPS_MAX, &blen);
        if (st == BRK_TOOBIG || st == BRK_RANGE)   /* no room: headers go */
            st = brk_props_encode(pairs, 2, block, BRK_PROPS_MAX, &blen);
    }
    char body[1024];
    size_t b = 0;
    char idstr[BRK_UUID_STR_LEN + 1];
    brk_uuid_format(r->msg_id, idstr);
    b += (size_t)snprintf(body, sizeof body,
                          "{\"event\":\"transaction-expired\",\"txid\":");
    b += json_str(body + b, sizeof body - b, h->txid, h->txid_len);
    b += (size_t)snprintf(body + b, sizeof body - b, ",\"topic\":");
    b += json_str(body + b, sizeof body - b, h->topic, strlen(h->topic));
    b += (size_t)snprintf(body + b, sizeof body - b,
                          ",\"msg_id\":\"%s\",\"checks\":%u,"
                          "\"prepared_at_ms\":%lld}",
                          idstr, (unsigned)checks,
                          (long long)h->prepared_ms);
    if (st == BRK_OK) {
        uint8_t id[BRK_UUID_LEN];
        expiry_id(r->msg_id, id);
        brk_append_req rq;
        memset(&rq, 0, sizeof rq);
        rq.topic = h->expiry;
        rq.queue = -1;
        rq.key = r->key;
        rq.props.ptr = block;
        rq.props.len = blen;
        rq.body.ptr = body;
        rq.body.len = b;
        rq.flags = BRK_RECF_BODY_JSON;
        rq.msg_id = id;
        brk_append_res res;
        st = brk_store_append(t->s, &rq, &res);
    }
    free(block);
    free(all);
    free(props);
    return st;
}

/* Append the committed message of half h to its topic (or to the delay
 * scheduler).  res may be NULL. */
static brk_status publish_commit(brk_txn *t, const half_view *h,
                                 brk_txn_result *res)
{
    const brk_record *r = h->r;
    size_t plen = 0;
    uint8_t *props = malloc(r->props.len ? r->props.len : 1);
    if (!props)
        return BRK_NOMEM;
    brk_status st = brk_props_strip_sys(r->props, props, r->props.len, &plen);
    if (st != BRK_OK) {
        free(props);
        return st;
    }
    brk_append_req rq;
    memset(&rq, 0, sizeof rq);
    rq.topic = h->topic;
    rq.queue = -1;
    rq.key = r->key;
    rq.tag = r->tag;
    rq.props.ptr = props;
    rq.props.len = plen;
    rq.body = r->body;
    rq.flags = r->flags;
    rq.msg_id = r->msg_id;
    rq.born_ms = r->born_ms;
    if (h->delay_kind && t->o.delay) {
        int64_t now = now_ms(t);
        int64_t at = h->delay_kind == 1 ? now + h->delay_val : h->delay_val;
        brk_delay_res dr;
        st = brk_delay_send(t->o.delay, &rq, at < now ? now : at, &dr);
        if (st == BRK_OK && res) {
            res->delayed = dr.delayed;
            res->deliver_at_ms = dr.deliver_at_ms;
        }
    } else {
        brk_append_res ar;
        st = brk_store_append(t->s, &rq, &ar);
    }
    free(props);
    return st;
}

/* The effect owed by a stored verdict: the message (commit) or the expiry
 * event (rollback because checks ran out, with an expiry topic). */
static brk_status do_effect(brk_txn *t, uint64_t half_off, bool commit,
                            bool expired, uint16_t checks,
                            const half_view *pre, brk_txn_result *res)
{
    if (!commit && !expired)
        return BRK_OK;
    half_view h;
    brk_status st = BRK_OK;
    if (pre)
        h = *pre;                /* a compaction copy has the same content */
    else
        st = read_half(t, half_off, &h);
    if (st != BRK_OK)
        return st;
    if (commit)
        st = publish_commit(t, &h, res);
    else if (h.expiry[0])
        st = publish_expiry(t, &h, checks);
    if (!pre)
        brk_batch_free(h.b);
    return st;
}

/* ---- verdicts ----------------------------------------------------------- */

static void fill_result(const txn_ent *e, brk_txn_result *res)
{
    if (res)
        res->state = (brk_txn_state)e->state;
}

/*
 * Move a prepared transaction to a terminal state (see the diagram).
 * `src` is SRC_CLIENT, SRC_CHECK or SRC_EXHAUSTED.  For a check-back the
 * caller passes wait=false: a verdict already being written wins and the
 * check result is dropped (BRK_AGAIN).
 */
static brk_status resolve(brk_txn *t, uint64_t hash, const char *txid,
                          bool commit, uint8_t src, bool wait,
                          const half_view *pre, brk_txn_result *res)
{
    uint8_t want = commit ? BRK_TXN_COMMITTED : BRK_TXN_ROLLED_BACK;
    pthread_mutex_lock(&t->mu);
    txn_ent *e;
    for (;;) {
        e = tab_find(t, hash);
        if (!e || (e->flags & F_PREPARING && !wait)) {
            pthread_mutex_unlock(&t->mu);
            return e ? BRK_AGAIN : BRK_NOTFOUND;
        }
        if (e->flags & (F_RESOLVING | F_PREPARING | F_MOVING)) {
            if (!wait) {
                pthread_mutex_unlock(&t->mu);
                return BRK_AGAIN;
            }
            pthread_cond_wait(&t->cv, &t->mu);
            continue;
        }
        break;
    }
    if (e->state != BRK_TXN_PREPARED) {
        fill_result(e, res);
        brk_status st = e->state == want ? BRK_OK : BRK_CONFLICT;
        bool owed = (e->flags & F_EFFECT) && e->state == want;
        uint64_t half_off = e->half_off;
        bool expired = e->flags & F_EXPIRED;
        uint16_t checks = e->checks;
        if (res)
            res->replay = true;
        if (owed) {
            /* A stored verdict whose effect failed earlier: try again. */
            e->flags |= F_RESOLVING;
            uint64_t lb = inflight_add(t);
            pthread_mutex_unlock(&t->mu);
            st = do_effect(t, half_off, commit, expired, checks, pre, res);
            pthread_mutex_lock(&t->mu);
            inflight_del(t, lb);
            e = tab_find(t, hash);
            e->flags &= (uint8_t)~F_RESOLVING;
            if (st == BRK_OK)
                e->flags &= (uint8_t)~F_EFFECT;
            pthread_cond_broadcast(&t->cv);
        }
        pthread_mutex_unlock(&t->mu);
        return st;
    }
    if (!wait && (e->flags & F_STUCK) && src == SRC_CHECK) {
        pthread_mutex_unlock(&t->mu);
        return BRK_AGAIN;
    }
    e->flags |= F_RESOLVING;
    uint64_t half_off = e->half_off;
    uint16_t checks = e->checks;
    uint64_t lb = inflight_add(t);
    pthread_mutex_unlock(&t->mu);
    /* The caller's copy of the half record is only good if it is this
     * transaction's: the txid may have been forgotten and prepared anew
     * since.  A compaction copy names its original in \x1fcopy. */
    if (pre && pre->r->log_offset != half_off
        && !(pre->is_copy && pre->copy_from == half_off))
        pre = NULL;

    char idbuf[BRK_TXID_MAX + 1];
    half_view h;
    memset(&h, 0, sizeof h);
    brk_status st = BRK_OK;
    if (!txid) {
        st = read_half(t, half_off, &h);
        if (st == BRK_OK) {
            memcpy(idbuf, h.txid, h.txid_len + 1);
            txid = idbuf;
            brk_batch_free(h.b);
        }
    }
    /* Only a commit is sure to append an effect after its op. */
    if (st == BRK_OK)
        st = append_op(t, txid, commit ? OP_COMMIT : OP_ROLLBACK, src, checks,
                       0, half_off, commit, NULL);
    bool stored = st == BRK_OK;
    if (stored)
        st = do_effect(t, half_off, commit, src == SRC_EXHAUSTED, checks, pre,
                       res);
    if (stored && st != BRK_OK && commit) {
        /* The effect failed: the op, written without waiting, must still
         * be made durable before the verdict counts as stored.  If that
         * fails too, its fate is unknown (the store is failed now), and
         * nobody may be told it is committed. */
        brk_status fs = brk_store_flush(t->s);
        if (fs != BRK_OK) {
            st = fs;
            stored = false;
        }
    }

    pthread_mutex_lock(&t->mu);
    inflight_del(t, lb);
    e = tab_find(t, hash);
    if (stored) {
        set_terminal(t, e, want, src == SRC_EXHAUSTED, now_ms(t));
        if (st != BRK_OK)
            e->flags |= F_EFFECT;        /* retried by tick and by replays */
        if (commit)
            t->st.committed_total++;
        else
            t->st.rolled_back_total++;
        if (src == SRC_EXHAUSTED)
            t->st.expired_total++;
    } else {
        e->flags &= (uint8_t)~F_RESOLVING;
        /* A verdict that could not be stored must not leave the transaction
         * unscheduled: its timer may have been dropped while we held it. */
        if (!(e->flags & F_STUCK))
            schedule(t, e, now_ms(t) + t->o.error_backoff_min_ms);
    }
    fill_result(e, res);
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
    return st;
}

static brk_status lookup_txid(const char *txid, uint64_t *hash)
{
    if (!txid || !txid_valid(txid, strlen(txid)))
        return BRK_INVAL;
    *hash = txid_hash(txid, strlen(txid));
    return BRK_OK;
}

/* The entry for hash must belong to txid: compare with its half record. */
static brk_status verify_owner(brk_txn *t, uint64_t hash, const char *txid,
                               half_view *out, brk_txn_result *res)
{
    pthread_mutex_lock(&t->mu);
    txn_ent *e = tab_find(t, hash);
    uint64_t off = e ? e->half_off : 0;
    pthread_mutex_unlock(&t->mu);
    if (!e)
        return BRK_NOTFOUND;
    half_view h;
    brk_status st = read_half(t, off, &h);
    if (st != BRK_OK)
        return st == BRK_NOTFOUND ? BRK_NOTFOUND : st;
    bool same = strcmp(h.txid, txid) == 0;
    if (res) {
        memcpy(res->txid, h.txid, h.txid_len + 1);
        memcpy(res->msg_id, h.r->msg_id, BRK_UUID_LEN);
    }
    if (!same) {
        brk_batch_free(h.b);
        return BRK_NOTFOUND;
    }
    *out = h;
    return BRK_OK;
}

static brk_status verdict(brk_txn *t, const char *txid, bool commit,
                          brk_txn_result *res)
{
    uint64_t hash;
    if (res)
        memset(res, 0, sizeof *res);
    brk_status st = lookup_txid(txid, &hash);
    if (st != BRK_OK)
        return st;
    /* Wait out a prepare of the same txid that is still being written. */
    pthread_mutex_lock(&t->mu);
    txn_ent *e;
    while ((e = tab_find(t, hash)) && (e->flags & F_PREPARING))
        pthread_cond_wait(&t->cv, &t->mu);
    pthread_mutex_unlock(&t->mu);
    if (!e)
        return BRK_NOTFOUND;
    half_view h;
    st = verify_owner(t, hash, txid, &h, res);
    if (st != BRK_OK)
        return st;
    st = resolve(t, hash, txid, commit, SRC_CLIENT, true, &h, res);
    brk_batch_free(h.b);
    return st;
}

brk_status brk_txn_commit(brk_txn *t, const char *txid, brk_txn_result *res)
{
    return verdict(t, txid, true, res);
}

brk_status brk_txn_rollback(brk_txn *t, const char *txid, brk_txn_result *res)
{
    return verdict(t, txid, false, res);
}

/* ---- prepare ----------------------------------------------------------- */

static void policy_pack(const brk_check_policy *p, uint8_t *out)
{
    brk_st32(out, p->first_check_ms);
    brk_st32(out + 4, p->interval_ms);
    brk_st16(out + 8, p->max_checks);
    out[10] = p->on_exhausted;
}

/* Does half h hold exactly what req asks for? */
static bool same_content(const half_view *h, const brk_txn_prepare_req *req,
                         const brk_check_policy *pol)
{
    const brk_record *r = h->r;
    uint8_t *user = malloc(r->props.len ? r->props.len : 1);
    size_t ulen = 0;
    bool ok = user && brk_props_strip_sys(r->props, user, r->props.len,
                                          &ulen) == BRK_OK;
    ok = ok && strcmp(h->topic, req->topic) == 0
         && r->key.len == req->key.len
         && (!r->key.len || memcmp(r->key.ptr, req->key.ptr, r->key.len) == 0)
         && r->tag.len == req->tag.len
         && (!r->tag.len || memcmp(r->tag.ptr, req->tag.ptr, r->tag.len) == 0)
         && ulen == req->props.len
         && (!ulen || memcmp(user, req->props.ptr, ulen) == 0)
         && r->body.len == req->body.len
         && (!r->body.len
             || memcmp(r->body.ptr, req->body.ptr, r->body.len) == 0)
         && r->flags == req->flags
         && h->pol.first_check_ms == pol->first_check_ms
         && h->pol.interval_ms == pol->interval_ms
         && h->pol.max_checks == pol->max_checks
         && h->pol.on_exhausted == pol->on_exhausted
         && strcmp(h->expiry, pol->expiry_topic ? pol->expiry_topic : "") == 0;
    uint8_t kind = req->delay_ms > 0 ? 1 : req->deliver_at_ms > 0 ? 2 : 0;
    int64_t val = kind == 1 ? req->delay_ms : req->deliver_at_ms;
    ok = ok && h->delay_kind == kind && (kind == 0 || h->delay_val == val);
    free(user);
    return ok;
}

static brk_status prepare_validate(brk_txn *t, const brk_txn_prepare_req *req,
                                   const brk_check_policy *pol)
{
    if (!req->topic || !brk_topic_name_valid(req->topic, strlen(req->topic),
                                             false) || req->topic[0] == '.')
        return BRK_INVAL;
    if (req->txid && req->txid[0] && !txid_valid(req->txid, strlen(req->txid)))
        return BRK_INVAL;
    if (policy_check(pol) != BRK_OK)
        return BRK_INVAL;
    if (brk_props_has_sys(req->props)
        || brk_props_validate(req->props) != BRK_OK)
        return BRK_INVAL;
    if (req->delay_ms < 0 || req->deliver_at_ms < 0
        || (req->delay_ms > 0 && req->deliver_at_ms > 0))
        return BRK_INVAL;
    if ((req->delay_ms > 0 || req->deliver_at_ms > 0) && !t->o.delay)
        return BRK_INVAL;
    /* The delay is measured from the commit, which comes later; a delay the
     * scheduler would refuse then must be refused now. */
    int64_t max = t->o.delay ? brk_delay_max_ms(t->o.delay) : 0;
    if (req->delay_ms > max
        || (req->deliver_at_ms > 0 && req->deliver_at_ms - now_ms(t) > max))
        return BRK_RANGE;
    if (req->flags & ~(uint32_t)BRK_RECF_KNOWN)
        return BRK_INVAL;
    brk_topic_info ti;
    if (!brk_store_auto_create(t->s)) {
        if (brk_topic_get(t->s, req->topic, &ti) != BRK_OK)
            return BRK_NOTFOUND;
        if (pol->expiry_topic && pol->expiry_topic[0]
            && brk_topic_get(t->s, pol->expiry_topic, &ti) != BRK_OK)
            return BRK_NOTFOUND;
    }
    return BRK_OK;
}

/* Answer a prepare of a txid we already hold. */
static brk_status prepare_replay(brk_txn *t, uint64_t hash,
                                 const brk_txn_prepare_req *req,
                                 const brk_check_policy *pol,
                                 const char *txid, brk_txn_result *res)
{
    pthread_mutex_lock(&t->mu);
    txn_ent *e = tab_find(t, hash);
    uint64_t off = e ? e->half_off : 0;
    uint8_t state = e ? e->state : 0;
    pthread_mutex_unlock(&t->mu);
    if (!e)
        return BRK_AGAIN;            /* evicted meanwhile: prepare anew */
    half_view h;
    brk_status st = read_half(t, off, &h);
    if (st != BRK_OK)
        return st;
    if (strcmp(h.txid, txid) != 0) {
        brk_batch_free(h.b);
        return BRK_CONFLICT;         /* 64-bit hash collision */
    }
    bool same = same_content(&h, req, pol);
    memcpy(res->txid, h.txid, h.txid_len + 1);
    memcpy(res->msg_id, h.r->msg_id, BRK_UUID_LEN);
    res->state = (brk_txn_state)state;
    res->replay = true;
    brk_batch_free(h.b);
    return same ? BRK_OK : BRK_CONFLICT;
}

brk_status brk_txn_prepare(brk_txn *t, const brk_txn_prepare_req *req,
                           brk_txn_result *res)
{
    if (!req || !res)
        return BRK_INVAL;
    memset(res, 0, sizeof *res);
    brk_check_policy pol = req->policy ? *req->policy : t->o.default_policy;
    if (pol.expiry_topic && !pol.expiry_topic[0])
        pol.expiry_topic = NULL;
    brk_status st = prepare_validate(t, req, &pol);
    if (st != BRK_OK)
        return st;

    uint8_t msg_id[BRK_UUID_LEN];
    char txid[BRK_TXID_MAX + 1];
    pthread_mutex_lock(&t->mu);
    brk_uuidgen_next(t->ids, msg_id);
    pthread_mutex_unlock(&t->mu);
    if (req->txid && req->txid[0]) {
        snprintf(txid, sizeof txid, "%s", req->txid);
    } else {
        brk_uuid_format(msg_id, txid);
    }
    size_t txid_len = strlen(txid);
    uint64_t hash = txid_hash(txid, txid_len);

    pthread_mutex_lock(&t->mu);
    txn_ent *e;
    for (;;) {
        while ((e = tab_find(t, hash)) && (e->flags & F_PREPARING))
            pthread_cond_wait(&t->cv, &t->mu);
        if (!e)
            break;
        pthread_mutex_unlock(&t->mu);
        st = prepare_replay(t, hash, req, &pol, txid, res);
        if (st != BRK_AGAIN)
            return st;
        pthread_mutex_lock(&t->mu);
    }
    e = tab_insert(t, hash);
    if (!e) {
        pthread_mutex_unlock(&t->mu);
        return BRK_NOMEM;
    }
    e->state = BRK_TXN_PREPARED;
    e->flags = F_PREPARING;
    e->half_off = log_end(t);    /* a lower bound until the append returns */
    t->pending++;
    int64_t now = now_ms(t);
    pthread_mutex_unlock(&t->mu);

    /* The half record: user headers plus our system properties. */
    uint8_t polbuf[POLICY_LEN], delaybuf[9], prepbuf[8];
    policy_pack(&pol, polbuf);
    brk_st64(prepbuf, (uint64_t)now);
    brk_prop sys[6];
    size_t ns = 0;
    sys[ns++] = (brk_prop){ { "\x1ftxid", 5 }, { txid, txid_len } };
    sys[ns++] = (brk_prop){ { "\x1ftopic", 6 }, { req->topic, strlen(req->topic) } };
    sys[ns++] = (brk_prop){ { "\x1fpolicy", 7 }, { polbuf, POLICY_LEN } };
    sys[ns++] = (brk_prop){ { "\x1fprep", 5 }, { prepbuf, 8 } };
    if (pol.expiry_topic)
        sys[ns++] = (brk_prop){ { "\x1f" "expiry", 7 },
                                { pol.expiry_topic, strlen(pol.expiry_topic) } };
    if (req->delay_ms > 0 || req->deliver_at_ms > 0) {
        delaybuf[0] = req->delay_ms > 0 ? 1 : 2;
        brk_st64(delaybuf + 1, (uint64_t)(req->delay_ms > 0 ? req->delay_ms
                                                          : req->deliver_at_ms));
        sys[ns++] = (brk_prop){ { "\x1f" "delay", 6 }, { delaybuf, 9 } };
    }
    size_t nuser = 0, pos = 0;
    brk_prop pr;
    while (brk_props_next(req->props, &pos, &pr) == BRK_OK)
        nuser++;
    brk_prop *all = malloc((nuser + ns) * sizeof *all);
    uint8_t *block = malloc(BRK_PROPS_MAX);
    size_t blen = 0;
    st = all && block ? BRK_OK : BRK_NOMEM;
    if (st == BRK_OK) {
        size_t n = 0;
        pos = 0;
        while (brk_props_next(req->props, &pos, &pr) == BRK_OK)
            all[n++] = pr;
        memcpy(all + n, sys, ns * sizeof *sys);
        st = brk_props_encode(all, n + ns, block, BRK_PROPS_MAX, &blen);
        if (st == BRK_RANGE)
            st = BRK_TOOBIG;
    }
    brk_append_res ar;
    if (st == BRK_OK) {
        brk_append_req rq;
        memset(&rq, 0, sizeof rq);
        rq.topic = BRK_TXN_HALF_TOPIC;
        rq.queue = 0;
        rq.key = req->key;
        rq.tag = req->tag;
        rq.props.ptr = block;
        rq.props.len = blen;
        rq.body = req->body;
        rq.flags = req->flags;
        rq.type = BRK_REC_HALF;
        rq.msg_id = msg_id;
        rq.born_ms = req->born_ms;
        rq.allow_internal = true;
        st = brk_store_append(t->s, &rq, &ar);
    }
    free(all);
    free(block);

    pthread_mutex_lock(&t->mu);
    e = tab_find(t, hash);
    if (st == BRK_OK) {
        e->flags = 0;
        e->half_off = ar.log_offset;
        e->prep_s = (uint32_t)(now / 1000);
        schedule(t, e, now + pol.first_check_ms);
        t->st.prepared_total++;
        memcpy(res->txid, txid, txid_len + 1);
        memcpy(res->msg_id, msg_id, BRK_UUID_LEN);
        res->state = BRK_TXN_PREPARED;
    } else {
        tab_remove(t, e);
        t->pending--;
    }
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
    return st;
}

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
    txn_ent *e = tab_find(t, hash);
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
    brk_status st = read_half(t, half_off, &h);
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
        brk_status rs = resolve(t, hash, st == BRK_OK ? h.txid : NULL,
                                r == BRK_CHECK_COMMIT, SRC_CHECK, false,
                                st == BRK_OK ? &h : NULL, NULL);
        pthread_mutex_lock(&t->mu);
        e = tab_find(t, hash);
        if (e) {
            e->flags &= (uint8_t)~F_CHECKING;
            /* Dropped because a verdict was being written: if that verdict
             * failed, check again soon. */
            if (rs == BRK_AGAIN && e->state == BRK_TXN_PREPARED
                && !(e->flags & (F_RESOLVING | F_STUCK)))
                schedule(t, e, now_ms(t) + t->o.error_backoff_min_ms);
        }
        pthread_mutex_unlock(&t->mu);
    } else if (r == BRK_CHECK_ERROR) {
        pthread_mutex_lock(&t->mu);
        e = tab_find(t, hash);
        if (e) {
            e->flags &= (uint8_t)~F_CHECKING;
            if (e->state == BRK_TXN_PREPARED && !(e->flags & F_RESOLVING)) {
                if (e->errors < UINT16_MAX)
                    e->errors++;
                schedule(t, e, now_ms(t) + backoff_ms(t, e->errors));
            }
        }
        pthread_mutex_unlock(&t->mu);
    } else {
        /* UNKNOWN: count it, durably, then reschedule or apply the
         * policy's action. */
        pthread_mutex_lock(&t->mu);
        e = tab_find(t, hash);
        bool live = e && e->state == BRK_TXN_PREPARED
                    && !(e->flags & F_RESOLVING) && e->half_off == half_off;
        uint16_t checks = live ? (uint16_t)(e->checks + 1) : 0;
        bool exhausted = live && checks >= h.pol.max_checks;
        bool hold = exhausted && h.pol.on_exhausted == BRK_EXHAUSTED_HOLD;
        int64_t next = live ? now_ms(t) + h.pol.interval_ms : 0;
        if (live)
            e->flags |= F_MOVING;          /* no compaction copy meanwhile */
        pthread_mutex_unlock(&t->mu);
        brk_status ws = BRK_OK;
        if (live)
            ws = append_op(t, h.txid, hold ? OP_STUCK : OP_CHECK, SRC_CHECK,
                           checks, exhausted ? 0 : next, half_off, false, NULL);
        pthread_mutex_lock(&t->mu);
        e = tab_find(t, hash);
        if (e) {
            if (live)
                e->flags &= (uint8_t)~F_MOVING;
            e->flags &= (uint8_t)~F_CHECKING;
            pthread_cond_broadcast(&t->cv);
        }
        if (e && !live && e->state == BRK_TXN_PREPARED
            && !(e->flags & (F_RESOLVING | F_STUCK | F_CHECKING)))
            schedule(t, e, now_ms(t) + t->o.error_backoff_min_ms);
        if (e && live && e->state == BRK_TXN_PREPARED) {
            if (ws != BRK_OK) {
                schedule(t, e, now_ms(t) + backoff_ms(t, 1));
            } else {
                e->checks = checks;
                e->errors = 0;
                if (hold) {
                    e->flags |= F_STUCK;
                    e->when_ms = 0;
                    t->stuck++;
                } else if (!exhausted) {
                    schedule(t, e, next);
                }
            }
        }
        pthread_mutex_unlock(&t->mu);
        if (live && ws == BRK_OK && exhausted && !hold)
            (void)resolve(t, hash, h.txid, false, SRC_EXHAUSTED, true, &h,
                          NULL);
    }
    if (st == BRK_OK)
        brk_batch_free(h.b);
    free(user);
}

static void *worker_main(void *arg)
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
        txn_ent *e = tab_find(t, tm.ref);
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
static brk_status save_state(brk_txn *t, bool force)
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
    uint64_t end = log_end(t);
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
static void sweep_locked(brk_txn *t, int64_t now)
{
    /* The ring is in resolution order: stop at the first one still kept.
     * One whose effect is still owed (or being written) goes to the back
     * instead, so it cannot hold back the eviction of everything after it. */
    for (size_t seen = 0, n = t->rlen; seen < n && t->rlen > 0; seen++) {
        uint64_t h = t->resolved[t->rhead];
        txn_ent *e = tab_find(t, h);
        if (e && e->state != BRK_TXN_PREPARED
            && !(e->flags & (F_EFFECT | F_RESOLVING))
            && sat_add(e->when_ms, t->o.resolved_keep_ms) > now)
            break;
        t->rhead = (t->rhead + 1) % t->rcap;
        t->rlen--;
        if (e && e->state != BRK_TXN_PREPARED) {
            if (e->flags & (F_EFFECT | F_RESOLVING))
                ring_push(t, h);
            else
                tab_remove(t, e);
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
    txn_ent *e = tab_find(t, hash);
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
    brk_status st = read_half(t, off, &h);
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
    e = tab_find(t, hash);
    e->flags &= (uint8_t)~F_MOVING;
    /* A timer that came due during the copy was dropped: re-arm (a spare
     * timer is harmless, dispatch skips stale ones). */
    if (e->state == BRK_TXN_PREPARED && !(e->flags & F_STUCK))
        schedule(t, e, e->when_ms);
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
    uint64_t *todo = NULL;
    for (size_t i = 0; i < t->cap; i++) {
        txn_ent *e = &t->tab[i];
        if (!e->hash || e->state != BRK_TXN_PREPARED)
            continue;
        if (sat_add(((int64_t)e->prep_s + e->half_age_s) * 1000,
                    t->o.compact_after_ms) > now)
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            uint64_t *v = realloc(todo, cap * sizeof *v);
            if (!v)
                break;
            todo = v;
        }
        todo[n++] = e->hash;
    }
    pthread_mutex_unlock(&t->mu);
    for (size_t i = 0; i < n; i++)
        compact_one(t, todo[i]);
    free(todo);
}

/* Retry effects owed by stored verdicts. */
static void retry_effects(brk_txn *t)
{
    pthread_mutex_lock(&t->mu);
    size_t n = 0;
    uint64_t hv[64];
    for (size_t i = 0; i < t->cap && n < 64; i++)
        if (t->tab[i].hash && (t->tab[i].flags & F_EFFECT)
            && !(t->tab[i].flags & F_RESOLVING))
            hv[n++] = t->tab[i].hash;
    pthread_mutex_unlock(&t->mu);
    for (size_t i = 0; i < n; i++) {
        pthread_mutex_lock(&t->mu);
        txn_ent *e = tab_find(t, hv[i]);
        if (!e || !(e->flags & F_EFFECT) || (e->flags & F_RESOLVING)) {
            pthread_mutex_unlock(&t->mu);
            continue;
        }
        e->flags |= F_RESOLVING;
        uint64_t off = e->half_off;
        bool commit = e->state == BRK_TXN_COMMITTED;
        bool expired = e->flags & F_EXPIRED;
        uint16_t checks = e->checks;
        uint64_t lb = inflight_add(t);
        pthread_mutex_unlock(&t->mu);
        brk_status st = do_effect(t, off, commit, expired, checks, NULL, NULL);
        pthread_mutex_lock(&t->mu);
        inflight_del(t, lb);
        e = tab_find(t, hv[i]);
        e->flags &= (uint8_t)~F_RESOLVING;
        if (st == BRK_OK)
            e->flags &= (uint8_t)~F_EFFECT;
        pthread_cond_broadcast(&t->cv);
        pthread_mutex_unlock(&t->mu);
    }
}

brk_status brk_txn_tick(brk_txn *t)
{
    int64_t now = now_ms(t);
    pthread_mutex_lock(&t->mu);
    dispatch_locked(t, now);
    bool sweep = now >= t->next_sweep_ms;
    if (sweep) {
        sweep_locked(t, now);
        t->next_sweep_ms = now + 1000;
    }
    bool save = now >= t->next_save_ms;
    if (save)
        t->next_save_ms = now + t->o.state_interval_ms;
    pthread_mutex_unlock(&t->mu);
    retry_effects(t);
    if (sweep)
        compact(t, now);
    return save ? save_state(t, false) : BRK_OK;
}

static void *sched_main(void *arg)
{
    brk_txn *t = arg;
    pthread_mutex_lock(&t->mu);
    while (!t->sched_stop) {
        pthread_mutex_unlock(&t->mu);
        (void)brk_txn_tick(t);
        pthread_mutex_lock(&t->mu);
        if (t->sched_stop)
            break;
        int64_t now = now_ms(t), wait = t->jlen >= t->jcap ? 5 : 1000;
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
    if (parse_half(r, &h) != BRK_OK)
        return BRK_OK;                   /* not ours to judge: skip */
    uint64_t hash = txid_hash(h.txid, h.txid_len);
    txn_ent *e = tab_find(t, hash);
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
        tab_remove(t, e);
    } else if (h.is_copy) {
        /* A copy whose original we did not read (below half_from): the copy
         * is the record of a pending transaction all the same. */
    }
    e = tab_insert(t, hash);
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
    uint64_t hash = txid_hash(r->key.ptr, r->key.len);
    txn_ent *e = tab_find(t, hash);
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
        set_terminal(t, e, commit ? BRK_TXN_COMMITTED : BRK_TXN_ROLLED_BACK,
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

static brk_status rebuild(brk_txn *t, char *err, size_t errlen)
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
            txn_ent *e = tab_find(t, ow[i].hash);
            half_view h;
            if (!e || read_half(t, e->half_off, &h) != BRK_OK) {
                ow[i].found = true;      /* nothing we could redo */
                continue;
            }
            if (e->state == BRK_TXN_COMMITTED)
                memcpy(ow[i].id, h.r->msg_id, BRK_UUID_LEN);
            else if (h.expiry[0])
                expiry_id(h.r->msg_id, ow[i].id);
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
            txn_ent *e = tab_find(t, ow[i].hash);
            if (e && ow[i].found)
                e->flags &= (uint8_t)~F_EFFECT;
        }
    }
    free(ow);

    /* Timers for pending ones; counters. */
    int64_t now = now_ms(t);
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
    sweep_locked(t, now);
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
        (void)resolve(t, ex[i], NULL, false, SRC_EXHAUSTED, true, NULL, NULL);
    free(ex);
    /* Owed effects are retried by the first tick; do it now so an open
     * leaves nothing owed when the store is writable. */
    retry_effects(t);
    return BRK_OK;
}

/* ---- open / close ------------------------------------------------------- */

static brk_status ensure_topic(brk_store *s, const char *name)
{
    brk_status st = brk_topic_create(s, name, 1);
    return st == BRK_EXISTS ? BRK_OK : st;
}

brk_status brk_txn_open(brk_txn **out, brk_store *s, const brk_txn_opts *opts,
                        char *errbuf, size_t errlen)
{
    char dummy[8];
    if (!errbuf) {
        errbuf = dummy;
        errlen = sizeof dummy;
    }
    errbuf[0] = 0;
    *out = NULL;
    brk_txn_opts o;
    if (opts)
        o = *opts;
    else
        brk_txn_opts_init(&o);
    if (o.workers == 0)
        o.workers = 1;
    if (o.max_queued_checks == 0)
        o.max_queued_checks = 1024;
    if (o.error_backoff_min_ms == 0)
        o.error_backoff_min_ms = 1;
    if (o.error_backoff_max_ms < o.error_backoff_min_ms)
        o.error_backoff_max_ms = o.error_backoff_min_ms;
    if (o.state_interval_ms == 0)
        o.state_interval_ms = 1000;
    if (policy_check(&o.default_policy) != BRK_OK) {
        snprintf(errbuf, errlen, "invalid default check policy");
        return BRK_INVAL;
    }
    if (o.checker && !o.checker->check) {
        snprintf(errbuf, errlen, "checker has no check function");
        return BRK_INVAL;
    }
    brk_txn *t = calloc(1, sizeof *t);
    if (!t)
        return BRK_NOMEM;
    t->s = s;
    t->clock = brk_store_clock(s);
    t->o = o;
    if (o.default_policy.expiry_topic) {
        snprintf(t->expiry_default, sizeof t->expiry_default, "%s",
                 o.default_policy.expiry_topic);
        t->o.default_policy.expiry_topic = t->expiry_default;
    }
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, NULL);
    pthread_cond_init(&t->wcv, NULL);
    pthread_cond_init(&t->idle_cv, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&t->scv, &ca);
    pthread_condattr_destroy(&ca);
    brk_timerheap_init(&t->heap);
    t->jcap = o.max_queued_checks;
    t->jobs = malloc(t->jcap * sizeof *t->jobs);
    brk_status st = t->jobs ? BRK_OK : BRK_NOMEM;
    if (st == BRK_OK)
        st = brk_uuidgen_open(&t->ids, t->clock, 0);
    if (st == BRK_OK)
        st = ensure_topic(s, BRK_TXN_HALF_TOPIC);
    if (st == BRK_OK)
        st = ensure_topic(s, BRK_TXN_OP_TOPIC);
    if (st != BRK_OK)
        snprintf(errbuf, errlen, "creating internal topics: %s",
                 brk_strerror(st));
    if (st == BRK_OK) {
        st = brk_store_cursor_register(s, "txn", &t->cursor);
        t->cursor_ok = st == BRK_OK;
        if (st != BRK_OK)
            snprintf(errbuf, errlen, "registering retention cursor: %s",
                     brk_strerror(st));
    }
    if (st == BRK_OK)
        st = rebuild(t, errbuf, errlen);
    if (st == BRK_OK)
        t->rebuilt = true;
    if (st == BRK_OK) {
        t->workers = calloc(o.workers, sizeof *t->workers);
        if (!t->workers)
            st = BRK_NOMEM;
        for (unsigned i = 0; st == BRK_OK && i < o.workers; i++) {
            if (pthread_create(&t->workers[i], NULL, worker_main, t) != 0) {
                snprintf(errbuf, errlen, "starting checker threads failed");
                st = BRK_NOMEM;
                break;
            }
            t->nworkers++;
        }
    }
    if (st == BRK_OK && !o.no_background) {
        t->sched_running = true;
        if (pthread_create(&t->sched, NULL, sched_main, t) != 0) {
            t->sched_running = false;
            snprintf(errbuf, errlen, "starting the scheduler thread failed");
            st = BRK_NOMEM;
        }
    }
    if (st != BRK_OK) {
        brk_txn_close(t);
        return st;
    }
    *out = t;
    return BRK_OK;
}

brk_status brk_txn_close(brk_txn *t)
{
    if (!t)
        return BRK_OK;
    if (t->sched_running) {
        pthread_mutex_lock(&t->mu);
        t->sched_stop = true;
        pthread_cond_signal(&t->scv);
        pthread_mutex_unlock(&t->mu);
        pthread_join(t->sched, NULL);
    }
    pthread_mutex_lock(&t->mu);
    t->jlen = 0;                 /* queued checks are simply not asked */
    for (size_t i = 0; i < t->cap; i++)
        t->tab[i].flags &= (uint8_t)~F_CHECKING;
    t->stopping = true;
    pthread_cond_broadcast(&t->wcv);
    pthread_mutex_unlock(&t->mu);
    for (unsigned i = 0; i < t->nworkers; i++)
        pthread_join(t->workers[i], NULL);
    brk_status st = BRK_OK;
    if (t->jobs && t->ids)
        st = save_state(t, false);
    if (t->cursor_ok)
        (void)brk_store_cursor_unregister(t->s, t->cursor);
    free(t->workers);
    free(t->jobs);
    free(t->tab);
    free(t->resolved);
    free(t->inflight);
    brk_timerheap_free(&t->heap);
    brk_uuidgen_close(t->ids);
    pthread_cond_destroy(&t->scv);
    pthread_cond_destroy(&t->idle_cv);
    pthread_cond_destroy(&t->wcv);
    pthread_cond_destroy(&t->cv);
    pthread_mutex_destroy(&t->mu);
    free(t);
    return st;
}

/* ---- queries -------------------------------------------------------------- */

static brk_status fill_info(brk_txn *t, const txn_ent *snap, brk_txn_info *out)
{
    memset(out, 0, sizeof *out);
    half_view h;
    brk_status st = read_half(t, snap->half_off, &h);
    if (st != BRK_OK)
        return st;
    memcpy(out->txid, h.txid, h.txid_len + 1);
    memcpy(out->msg_id, h.r->msg_id, BRK_UUID_LEN);
    snprintf(out->topic, sizeof out->topic, "%s", h.topic);
    out->key_len = h.r->key.len;
    if (h.r->key.len)
        memcpy(out->key, h.r->key.ptr, h.r->key.len);
    out->key[h.r->key.len] = 0;
    out->policy = h.pol;
    snprintf(out->expiry_topic, sizeof out->expiry_topic, "%s", h.expiry);
    out->policy.expiry_topic = out->expiry_topic[0] ? out->expiry_topic : NULL;
    int64_t h_prepared = h.prepared_ms;
    brk_batch_free(h.b);
    out->state = (brk_txn_state)snap->state;
    out->stuck = snap->flags & F_STUCK;
    out->expired = snap->flags & F_EXPIRED;
    out->checking = snap->flags & F_CHECKING;
    out->checks = snap->checks;
    out->check_errors = snap->errors;
    out->prepared_ms = h_prepared;
    out->next_check_ms = snap->state == BRK_TXN_PREPARED
                         && !(snap->flags & F_STUCK) ? snap->when_ms : 0;
    return BRK_OK;
}

brk_status brk_txn_get(brk_txn *t, const char *txid, brk_txn_info *out)
{
    uint64_t hash;
    brk_status st = lookup_txid(txid, &hash);
    if (st != BRK_OK)
        return st;
    pthread_mutex_lock(&t->mu);
    txn_ent *e = tab_find(t, hash);
    txn_ent snap;
    if (e)
        snap = *e;
    pthread_mutex_unlock(&t->mu);
    if (!e || (snap.flags & F_PREPARING))
        return BRK_NOTFOUND;
    st = fill_info(t, &snap, out);
    if (st == BRK_OK && strcmp(out->txid, txid) != 0)
        return BRK_NOTFOUND;
    return st;
}

static int snap_cmp(const void *a, const void *b)
{
    const txn_ent *x = a, *y = b;
    if (x->prep_s != y->prep_s)
        return x->prep_s < y->prep_s ? -1 : 1;
    return x->half_off < y->half_off ? -1 : x->half_off > y->half_off;
}

brk_status brk_txn_list(brk_txn *t, brk_txn_filter filter, size_t limit,
                        brk_txn_info **out, size_t *count)
{
    *out = NULL;
    *count = 0;
    if (filter != BRK_TXN_LIST_PREPARED && filter != BRK_TXN_LIST_STUCK)
        return BRK_INVAL;
    pthread_mutex_lock(&t->mu);
    size_t n = 0;
    txn_ent *v = malloc((t->pending ? t->pending : 1) * sizeof *v);
    if (!v) {
        pthread_mutex_unlock(&t->mu);
        return BRK_NOMEM;
    }
    for (size_t i = 0; i < t->cap && n < t->pending; i++) {
        const txn_ent *e = &t->tab[i];
        if (!e->hash || e->state != BRK_TXN_PREPARED
            || (e->flags & F_PREPARING))
            continue;
        if (filter == BRK_TXN_LIST_STUCK && !(e->flags & F_STUCK))
            continue;
        v[n++] = *e;
    }
    pthread_mutex_unlock(&t->mu);
    qsort(v, n, sizeof *v, snap_cmp);
    if (n > limit)
        n = limit;
    brk_txn_info *info = malloc((n ? n : 1) * sizeof *info);
    if (!info) {
        free(v);
        return BRK_NOMEM;
    }
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (fill_info(t, &v[i], &info[k]) == BRK_OK)
            k++;                          /* resolved and gone meanwhile */
    free(v);
    *out = info;
    *count = k;
    return BRK_OK;
}

void brk_txn_get_stats(brk_txn *t, brk_txn_stats *out)
{
    pthread_mutex_lock(&t->mu);
    *out = t->st;
    out->pending = t->pending;
    out->stuck = t->stuck;
    out->checking = t->active + t->jlen;
    int64_t oldest = 0;
    for (size_t i = 0; i < t->cap; i++) {
        const txn_ent *e = &t->tab[i];
        if (e->hash && e->state == BRK_TXN_PREPARED
            && (oldest == 0 || (int64_t)e->prep_s * 1000 < oldest))
            oldest = (int64_t)e->prep_s * 1000;
    }
    out->oldest_pending_ms = oldest;
    out->memory_bytes = t->cap * sizeof(txn_ent) + t->heap.cap * sizeof(brk_timer)
                        + t->rcap * sizeof(uint64_t) + t->jcap * sizeof(job)
                        + t->cinflight * sizeof(uint64_t);
    pthread_mutex_unlock(&t->mu);
}
