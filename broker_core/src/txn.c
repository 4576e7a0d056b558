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
#include "txn_priv.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "broker/record.h"
#include "broker/uuid.h"
#include "le.h"

/* ---- small helpers -------------------------------------------------------- */

int64_t txn_now_ms(brk_txn *t)
{
    return t->clock->now_ms(t->clock->ctx);
}

/* a + b for times and durations, saturating: "forever" may be INT64_MAX. */
int64_t txn_sat_add(int64_t a, int64_t b)
{
    int64_t r;
    if (__builtin_add_overflow(a, b, &r))
        return b > 0 ? INT64_MAX : INT64_MIN;
    return r;
}

uint64_t txn_txid_hash(const char *txid, size_t len)
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

txn_ent *txn_tab_find(brk_txn *t, uint64_t h)
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
txn_ent *txn_tab_insert(brk_txn *t, uint64_t h)
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
void txn_tab_remove(brk_txn *t, txn_ent *e)
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

void txn_schedule(brk_txn *t, txn_ent *e, int64_t when)
{
    e->when_ms = when;
    /* NOMEM here leaves the transaction without a timer until the next
     * sweep re-arms it (sweep_locked); it is never lost from the table. */
    if (brk_timerheap_push(&t->heap, when, e->hash) != BRK_OK)
        t->rearm = true;
    if (t->sched_running)
        pthread_cond_signal(&t->scv);
}

void txn_ring_push(brk_txn *t, uint64_t h)
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
void txn_set_terminal(brk_txn *t, txn_ent *e, uint8_t state, bool expired,
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
    txn_ring_push(t, e->hash);
}

/* ---- effects in flight ------------------------------------------------------ */

uint64_t txn_log_end(brk_txn *t)
{
    return brk_store_log_end(t->s);
}

/* Register a verdict about to be written; returns its lower bound. */
uint64_t txn_inflight_add(brk_txn *t)
{
    uint64_t lb = txn_log_end(t);
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

void txn_inflight_del(brk_txn *t, uint64_t lb)
{
    for (size_t i = 0; i < t->ninflight; i++)
        if (t->inflight[i] == lb) {
            t->inflight[i] = t->inflight[--t->ninflight];
            return;
        }
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
brk_status txn_resolve(brk_txn *t, uint64_t hash, const char *txid,
                          bool commit, uint8_t src, bool wait,
                          const half_view *pre, brk_txn_result *res)
{
    uint8_t want = commit ? BRK_TXN_COMMITTED : BRK_TXN_ROLLED_BACK;
    pthread_mutex_lock(&t->mu);
    txn_ent *e;
    for (;;) {
        e = txn_tab_find(t, hash);
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
            uint64_t lb = txn_inflight_add(t);
            pthread_mutex_unlock(&t->mu);
            st = txn_do_effect(t, half_off, commit, expired, checks, pre, res);
            pthread_mutex_lock(&t->mu);
            txn_inflight_del(t, lb);
            e = txn_tab_find(t, hash);
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
    uint64_t lb = txn_inflight_add(t);
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
        st = txn_read_half(t, half_off, &h);
        if (st == BRK_OK) {
            memcpy(idbuf, h.txid, h.txid_len + 1);
            txid = idbuf;
            brk_batch_free(h.b);
        }
    }
    /* Only a commit is sure to append an effect after its op. */
    if (st == BRK_OK)
        st = txn_append_op(t, txid, commit ? OP_COMMIT : OP_ROLLBACK, src, checks,
                       0, half_off, commit, NULL);
    bool stored = st == BRK_OK;
    if (stored)
        st = txn_do_effect(t, half_off, commit, src == SRC_EXHAUSTED, checks, pre,
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
    txn_inflight_del(t, lb);
    e = txn_tab_find(t, hash);
    if (stored) {
        txn_set_terminal(t, e, want, src == SRC_EXHAUSTED, txn_now_ms(t));
        if (st != BRK_OK) {
            e->flags |= F_EFFECT;        /* retried by tick and by replays */
            t->effect_hint++;
        }
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
            txn_schedule(t, e, txn_now_ms(t) + t->o.error_backoff_min_ms);
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
    *hash = txn_txid_hash(txid, strlen(txid));
    return BRK_OK;
}

/* The entry for hash must belong to txid: compare with its half record. */
static brk_status verify_owner(brk_txn *t, uint64_t hash, const char *txid,
                               half_view *out, brk_txn_result *res)
{
    pthread_mutex_lock(&t->mu);
    txn_ent *e = txn_tab_find(t, hash);
    uint64_t off = e ? e->half_off : 0;
    pthread_mutex_unlock(&t->mu);
    if (!e)
        return BRK_NOTFOUND;
    half_view h;
    brk_status st = txn_read_half(t, off, &h);
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
    while ((e = txn_tab_find(t, hash)) && (e->flags & F_PREPARING))
        pthread_cond_wait(&t->cv, &t->mu);
    pthread_mutex_unlock(&t->mu);
    if (!e)
        return BRK_NOTFOUND;
    half_view h;
    st = verify_owner(t, hash, txid, &h, res);
    if (st != BRK_OK)
        return st;
    st = txn_resolve(t, hash, txid, commit, SRC_CLIENT, true, &h, res);
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
        || (req->deliver_at_ms > 0 && req->deliver_at_ms - txn_now_ms(t) > max))
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
    txn_ent *e = txn_tab_find(t, hash);
    uint64_t off = e ? e->half_off : 0;
    uint8_t state = e ? e->state : 0;
    pthread_mutex_unlock(&t->mu);
    if (!e)
        return BRK_AGAIN;            /* evicted meanwhile: prepare anew */
    half_view h;
    brk_status st = txn_read_half(t, off, &h);
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
    uint64_t hash = txn_txid_hash(txid, txid_len);

    pthread_mutex_lock(&t->mu);
    txn_ent *e;
    for (;;) {
        while ((e = txn_tab_find(t, hash)) && (e->flags & F_PREPARING))
            pthread_cond_wait(&t->cv, &t->mu);
        if (!e)
            break;
        pthread_mutex_unlock(&t->mu);
        st = prepare_replay(t, hash, req, &pol, txid, res);
        if (st != BRK_AGAIN)
            return st;
        pthread_mutex_lock(&t->mu);
    }
    e = txn_tab_insert(t, hash);
    if (!e) {
        pthread_mutex_unlock(&t->mu);
        return BRK_NOMEM;
    }
    e->state = BRK_TXN_PREPARED;
    e->flags = F_PREPARING;
    e->half_off = txn_log_end(t);    /* a lower bound until the append returns */
    t->pending++;
    int64_t now = txn_now_ms(t);
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
    e = txn_tab_find(t, hash);
    if (st == BRK_OK) {
        e->flags = 0;
        e->half_off = ar.log_offset;
        e->prep_s = (uint32_t)(now / 1000);
        txn_schedule(t, e, now + pol.first_check_ms);
        t->st.prepared_total++;
        memcpy(res->txid, txid, txid_len + 1);
        memcpy(res->msg_id, msg_id, BRK_UUID_LEN);
        res->state = BRK_TXN_PREPARED;
    } else {
        txn_tab_remove(t, e);
        t->pending--;
    }
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
    return st;
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
        st = txn_rebuild(t, errbuf, errlen);
    if (st == BRK_OK)
        t->rebuilt = true;
    if (st == BRK_OK) {
        t->workers = calloc(o.workers, sizeof *t->workers);
        if (!t->workers)
            st = BRK_NOMEM;
        for (unsigned i = 0; st == BRK_OK && i < o.workers; i++) {
            if (pthread_create(&t->workers[i], NULL, txn_worker_main, t) != 0) {
                snprintf(errbuf, errlen, "starting checker threads failed");
                st = BRK_NOMEM;
                break;
            }
            t->nworkers++;
        }
    }
    if (st == BRK_OK && !o.no_background) {
        t->sched_running = true;
        if (pthread_create(&t->sched, NULL, txn_sched_main, t) != 0) {
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
        st = txn_save_state(t, false);
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
    brk_status st = txn_read_half(t, snap->half_off, &h);
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
    txn_ent *e = txn_tab_find(t, hash);
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
