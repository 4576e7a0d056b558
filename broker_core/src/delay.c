/*
 * delay.c - delayed delivery on top of a brk_store (see broker/delay.h).
 *
 * A delayed message lives in the log from the moment it is sent: it is a
 * record of the internal topic "__delay".  The scheduler keeps only a small
 * index in memory (a timer and a ring slot per pending message) and records
 * every firing in the log before it delivers, so that the index can be
 * rebuilt at open and a crash never makes it deliver a message twice.
 *
 * FORMATS
 * =======
 * All integers little-endian.
 *
 * Delayed record (topic "__delay", 1 queue, always written to queue 0,
 * type BRK_REC_MSG): the sent message as it will be delivered -- same
 * msg_id, key, tag, body, flags and born_ms -- with its props block being
 * the user's pairs followed by these system pairs (keys start with 0x1F):
 *
 *   key          value
 *   -----------  -------------------------------------------------------
 *   "\x1ftopic"  target topic name, 1..127 bytes, no NUL
 *   "\x1fdue"    i64, 8 bytes: due time, wall ms since the Unix epoch
 *   "\x1fmoved"  u64, 8 bytes, only on a compaction copy: the log offset
 *                of the delayed record this one replaces (see COMPACTION)
 *
 * User props that already hold a system pair are refused (BRK_INVAL), so a
 * record's system pairs are exactly these.  On delivery the system pairs
 * are dropped (brk_props_strip_sys) and the user's pairs kept in order.
 *
 * Fire op record (topic "__delay_op", 1 queue, queue 0, type BRK_REC_OP,
 * no key, tag or props), body:
 *
 *   off  width     field
 *   ---  --------  -------------------------------------------------------
 *     0  u8        version, 1
 *     1  u8        kind, 1 = FIRE
 *     2  u16       reserved, 0
 *     4  u32       n, 1..65536
 *     8  n x u64   log offsets of the delayed records this op fires
 *
 * A body whose length is not 8 + 8n, or with an unknown version or kind,
 * is skipped at rebuild (and counted in errors_total).
 *
 * State file "state.delay" (brk_store_state_write; the store frames it and
 * adds a CRC), 40 bytes:
 *
 *   off  width  field
 *   ---  -----  ----------------------------------------------------------
 *     0  u32    magic 0x31594C44, bytes "DLY1"
 *     4  u32    version, 1
 *     8  u64    dq: queue offset in __delay from which records may still
 *               be pending (every record below is fired or superseded)
 *    16  u64    xd: the log offset dq stands for (first __delay record at
 *               or after xd is at queue offset dq)
 *    24  u64    oq: queue offset in __delay_op of the first op at or after
 *               log offset xd; ops below fire only records below xd
 *    32  u64    effect_from: a log offset; every fire op below it had all
 *               of its deliveries completed and made durable
 *
 * A missing file is a fresh scheduler; an unreadable one (bad CRC) or an
 * unknown version is treated like a missing one: rebuild from offset 0,
 * which reads more but is exact.
 *
 * FIRING PROTOCOL
 * ===============
 * One fire at a time (fire_mu).  For a batch of up to fire_batch due timers:
 *   1. append one fire op naming the batch's delayed records (log offsets);
 *   2. for each, read the delayed record and append it to its target topic
 *      (queue by key, same id, key, tag, flags, born_ms, body, user props).
 * The store makes a prefix of the log durable (README, invariant 2), so if
 * a delivery survives a crash, the op before it survives too.  That is also
 * why, in SYNC mode, the op and all deliveries but the last are appended
 * with defer_sync: the last one's group commit makes the whole batch durable
 * at once (an explicit flush does if the last append fails).
 *
 * What rebuild concludes for a delayed record L, by what is in the log:
 *   - no op names L                       -> pending (re-armed).
 *   - an op O names L, O < effect_from    -> delivered (effect_from only
 *                                            passes O once every delivery of
 *                                            O succeeded and was flushed).
 *   - an op O names L, O >= effect_from   -> maybe: the log is scanned from
 *                                            the oldest such O to its end for
 *                                            a record in L's target topic
 *                                            with L's msg_id (a delivery is
 *                                            always after its op).  Found:
 *                                            delivered.  Not found: it goes
 *                                            to the retry list with
 *                                            first_op = O and is fired again
 *                                            at once (see Failures).
 * The scan covers only the state-save lag (state_interval_ms of log) in
 * the normal case, which is what effect_from is for.
 *
 * Failures.  If the op append fails, nothing was delivered: the batch goes
 * to the retry list (still pending, no op) and firing pauses with a
 * backoff.  If a delivery fails (store FULL, NOSPC, topic unknown with
 * auto-create off, ...), the message goes to the retry list with the op
 * that named it (first_op).  A retry is an ordinary fire of the retry
 * list's due entries: a new op, then the deliveries.  effect_from is kept
 * at or below the oldest first_op of the retry list, so whichever op a
 * restart sees, the scan covers every delivery that could exist.  Backoff
 * per entry: 100 ms doubling to 30 s; errors_total counts failed appends.
 * An append whose outcome is unknown (the record may or may not be on disk)
 * makes the store failed for good (store.h), so no later state save can
 * move effect_from past it; the restart then decides by the scan.
 *
 * Why the scheduler never delivers twice, in one line per path: a delivery
 * happens only after an op naming it is in the log; a record named by an op
 * is never armed again in this process except through the retry list, and
 * at rebuild only when the scan proves no delivery exists; compaction never
 * copies a record that an op has named (see below).
 *
 * COMPACTION
 * ==========
 * A pending record stored more than compact_after_ms ago is copied to the
 * end of __delay (same id, key, tag, body, flags, born_ms, props) with
 * "\x1fmoved" = its log offset, so that retention can free the old segment.
 * The copy supersedes the original: in memory the original is dropped and
 * the copy armed with the same due time; at rebuild a record carrying
 * "moved" = L marks L as superseded.  A crash before the copy is durable
 * leaves the original pending; after, the copy -- exactly one of the two.
 * Only records no op has named are copied (never one in the retry list),
 * so an original can never be both fired and superseded.  A copy keeps its
 * due time but, among equal due times, now ranks by its new log offset.
 *
 * STATE SAVE AND RETENTION
 * ========================
 * Every state_interval_ms (tick or background thread) and at close, when
 * it changed: under fire_mu (no fire in progress) and mu take
 *   xd          = min(lowest pending log offset, floors of sends in flight,
 *                     hi_water)
 *   effect_from = min(first_op over the retry list, hi_water)
 * where hi_water is the start of the newest append this scheduler completed
 * (every later append gets a higher offset) and a send's floor is hi_water
 * read before its append (so <= its record's offset).  Then, without
 * fire_mu: flush the log (so every delivery and copy counted as done is
 * durable before the state says so), find dq and oq by binary search over
 * the consume queues, write state.delay, and move the retention cursor
 * "delay" to min(xd, effect_from).  Cursors are in memory only: open the
 * scheduler right after the store, before its first retention run.
 *
 * MEMORY
 * ======
 * Per pending message: one 16-byte timer in a binary heap (due, log
 * offset) and one 8-byte slot in `ring`, the pending log offsets sorted in
 * log order, where a slot is marked DEAD (fired or superseded) and dropped
 * lazily: dead slots at the front go at once, the rest in one pass when
 * they outnumber the live ones.  The heap has no removal: a timer whose
 * slot is gone is skipped when it surfaces (binary search in the ring), and
 * when such stale timers are over half the heap one pass drops them.  Both
 * arrays grow by half, so a pending message costs 24 bytes plus growth
 * slack: 24..36 measured over a fill to a million (bench/README.md), up to
 * ~48 with dead ring slots or stale timers waiting for their pass.  The
 * retry list (40 bytes an entry) holds only messages whose fire failed.
 * Rebuild at open needs a transient 16 bytes per delayed record read.
 *
 * LOCKS (take in this order)
 *   save_mu  one state save at a time; held across flush, state write
 *   fire_mu  one fire or compaction at a time; held across store appends
 *   mu       heap, ring, retry list, sends in flight, counters; never held
 *            across a store call.  cond (with mu): the background thread's
 *            sleep, signalled when a send arms an earlier timer or at close
 */
#define _GNU_SOURCE
#include "delay_priv.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "le.h"

/* ---- levels and options ------------------------------------------------------ */

int64_t brk_delay_level_ms(int level)
{
    static const int64_t ms[BRK_DELAY_LEVELS] = {
        1000, 5000, 10000, 30000,                        /* 1 s .. 30 s */
        60000, 120000, 180000, 240000, 300000, 360000,   /* 1 .. 6 min */
        420000, 480000, 540000, 600000,                  /* 7 .. 10 min */
        1200000, 1800000, 3600000, 7200000               /* 20, 30 min, 1, 2 h */
    };
    if (level < 1 || level > BRK_DELAY_LEVELS)
        return -1;
    return ms[level - 1];
}

void brk_delay_opts_init(brk_delay_opts *o)
{
    memset(o, 0, sizeof *o);
    o->max_delay_ms = BRK_DELAY_MAX_DEFAULT_MS;
    o->fire_batch = 256;
    o->compact_after_ms = 24LL * 3600 * 1000;
    o->state_interval_ms = 1000;
}

/* a + b, saturating: "never" may be spelt INT64_MAX. */
int64_t dly_sat_add(int64_t a, int64_t b)
{
    int64_t r;
    if (__builtin_add_overflow(a, b, &r))
        return b > 0 ? INT64_MAX : INT64_MIN;
    return r;
}

int64_t dly_now_ms(brk_delay *d)
{
    return d->clock->now_ms(d->clock->ctx);
}

void dly_set_err(char *errbuf, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

void dly_set_err(char *errbuf, size_t errlen, const char *fmt, ...)
{
    if (!errbuf || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
}

int64_t dly_backoff_ms(uint32_t attempts)
{
    int64_t b = BACKOFF_MIN_MS;
    for (uint32_t i = 1; i < attempts && b < BACKOFF_MAX_MS; i++)
        b *= 2;
    return b < BACKOFF_MAX_MS ? b : BACKOFF_MAX_MS;
}

/* ---- the ring: pending log offsets in log order (mu held) -------------------- */

/* Index of the slot holding `off`, or SIZE_MAX. */
size_t dly_ring_find(const brk_delay *d, uint64_t off)
{
    size_t lo = d->rhead, hi = d->rhead + d->rlen;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        uint64_t v = d->ring[mid] & RING_OFF;
        if (v < off)
            lo = mid + 1;
        else if (v > off)
            hi = mid;
        else
            return mid;
    }
    return SIZE_MAX;
}

/* Whether a timer for `off` is armed: its slot exists, not dead or taken. */
static bool ring_armed(const brk_delay *d, uint64_t off)
{
    size_t i = dly_ring_find(d, off);
    return i != SIZE_MAX && !(d->ring[i] & (RING_DEAD | RING_INFLIGHT));
}

/* Drop dead slots: those at the front at once, the others when they
 * outnumber the live ones (one pass, order kept). */
static void ring_tidy(brk_delay *d)
{
    while (d->rlen > 0 && (d->ring[d->rhead] & RING_DEAD)) {
        d->rhead++;
        d->rlen--;
        d->rdead--;
    }
    if (d->rlen == 0)
        d->rhead = 0;
    if (d->rdead >= 64 && d->rdead * 2 > d->rlen) {
        size_t n = 0;
        for (size_t i = d->rhead; i < d->rhead + d->rlen; i++)
            if (!(d->ring[i] & RING_DEAD))
                d->ring[n++] = d->ring[i];
        d->rhead = 0;
        d->rlen = n;
        d->rdead = 0;
        /* Give back slack after a burst drained (keep room for promises). */
        size_t want = (n + d->reserved) * 2 + 1024;
        if (d->rcap > 2 * want) {
            uint64_t *r = realloc(d->ring, want * sizeof *r);
            if (r) {
                d->ring = r;
                d->rcap = want;
            }
        }
    }
}

void dly_ring_kill(brk_delay *d, size_t i)
{
    if (d->ring[i] & RING_DEAD)
        return;
    d->ring[i] = (d->ring[i] & RING_OFF) | RING_DEAD;
    d->rdead++;
    d->live--;
    ring_tidy(d);
}

/* Insert in order (appends nearly always land at the end).  Needs a free
 * slot, which make_room promised: never allocates. */
void dly_ring_insert(brk_delay *d, uint64_t v)
{
    if (d->rhead + d->rlen == d->rcap) {
        memmove(d->ring, d->ring + d->rhead, d->rlen * sizeof *d->ring);
        d->rhead = 0;
    }
    size_t i = d->rhead + d->rlen;
    uint64_t off = v & RING_OFF;
    while (i > d->rhead && (d->ring[i - 1] & RING_OFF) > off) {
        d->ring[i] = d->ring[i - 1];
        i--;
    }
    d->ring[i] = v;
    d->rlen++;
    if (v & RING_DEAD)
        d->rdead++;
    else
        d->live++;
}

/* Lowest pending log offset, NONE when nothing is pending. */
uint64_t dly_ring_low(const brk_delay *d)
{
    for (size_t i = d->rhead; i < d->rhead + d->rlen; i++)
        if (!(d->ring[i] & RING_DEAD))
            return d->ring[i] & RING_OFF;
    return NONE;
}

/* Make sure `reserved` more timers and ring slots fit without allocating. */
static brk_status make_room(brk_delay *d)
{
    size_t need = d->heap.n + d->reserved;
    if (need > d->heap.cap) {
        size_t want = d->heap.cap + d->heap.cap / 2;
        if (want < need)
            want = need;
        if (want < 64)
            want = 64;
        if (brk_timerheap_reserve(&d->heap, want) != BRK_OK)
            return BRK_NOMEM;
    }
    need = d->rlen + d->reserved;
    if (need > d->rcap) {
        size_t want = d->rcap + d->rcap / 2;
        if (want < need)
            want = need;
        if (want < 64)
            want = 64;
        uint64_t *r = realloc(d->ring, want * sizeof *r);
        if (!r)
            return BRK_NOMEM;
        d->ring = r;
        d->rcap = want;
    }
    return BRK_OK;
}

/* Promise one heap/ring slot to a caller about to append (mu held). */
brk_status dly_reserve_slot(brk_delay *d)
{
    d->reserved++;
    brk_status st = make_room(d);
    if (st != BRK_OK)
        d->reserved--;
    return st;
}

/* Arm a timer in a promised slot (mu held). */
void dly_arm(brk_delay *d, uint64_t off, int64_t due_ms)
{
    dly_ring_insert(d, off);
    (void)brk_timerheap_push(&d->heap, due_ms, off);   /* room promised */
    d->reserved--;
}

static bool keep_armed(const brk_timer *t, void *ctx)
{
    return ring_armed(ctx, t->ref);
}

/* Drop stale timers in one pass when they are over half the heap. */
void dly_heap_tidy(brk_delay *d)
{
    if (d->stale >= 1024 && d->stale * 2 > d->heap.n) {
        brk_timerheap_filter(&d->heap, keep_armed, d);
        d->stale = 0;
        if (d->reserved == 0)
            brk_timerheap_shrink(&d->heap);
    }
}

/* Pop timers that are no longer armed off the top (mu held). */
static bool heap_top(brk_delay *d, brk_timer *t)
{
    while (brk_timerheap_peek(&d->heap, t)) {
        if (ring_armed(d, t->ref))
            return true;
        brk_timerheap_pop(&d->heap, t);
        if (d->stale > 0)
            d->stale--;
    }
    return false;
}

void dly_note_append(brk_delay *d, uint64_t log_offset)
{
    if (log_offset > d->hi_water)
        d->hi_water = log_offset;
}

/* ---- records: system properties and op bodies -------------------------------- */


/* Read the system pairs of a delayed record; false when it is not a
 * record of __delay or they are not all there or malformed. */
bool dly_parse_meta(const brk_record *r, dmeta *m)
{
    brk_bytes v;
    memset(m, 0, sizeof *m);
    if (r->type != BRK_REC_MSG || r->topic.len != sizeof BRK_DELAY_TOPIC - 1
        || memcmp(r->topic.ptr, BRK_DELAY_TOPIC, r->topic.len) != 0)
        return false;
    if (brk_props_get(r->props, SYS_TOPIC, &v) != BRK_OK || v.len == 0
        || v.len > BRK_TOPIC_MAX)
        return false;
    memcpy(m->topic, v.ptr, v.len);
    m->topic[v.len] = '\0';
    if (brk_props_get(r->props, SYS_DUE, &v) != BRK_OK || v.len != 8)
        return false;
    m->due_ms = (int64_t)brk_ld64(v.ptr);
    if (brk_props_get(r->props, SYS_MOVED, &v) == BRK_OK) {
        if (v.len != 8)
            return false;
        m->moved = true;
        m->moved_from = brk_ld64(v.ptr);
    }
    return true;
}

/* A new props block: the pairs of `base` whose keys are not among sys[],
 * then sys[].  *out is malloc'ed (NULL with *len 0 for an empty block). */
brk_status dly_props_merge(brk_bytes base, const brk_prop *sys, size_t nsys,
                              uint8_t **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    size_t npairs = nsys, pos = 0, cap = 2;
    brk_prop pr;
    brk_status st;
    while ((st = brk_props_next(base, &pos, &pr)) == BRK_OK)
        npairs++;
    if (st != BRK_EMPTY)
        return BRK_INVAL;
    brk_prop *all = malloc((npairs ? npairs : 1) * sizeof *all);
    if (!all)
        return BRK_NOMEM;
    size_t n = 0;
    pos = 0;
    while (brk_props_next(base, &pos, &pr) == BRK_OK) {
        bool replaced = false;
        for (size_t i = 0; i < nsys && !replaced; i++)
            replaced = pr.key.len == sys[i].key.len
                       && memcmp(pr.key.ptr, sys[i].key.ptr, pr.key.len) == 0;
        if (!replaced) {
            all[n++] = pr;
            cap += 4 + pr.key.len + pr.value.len;
        }
    }
    for (size_t i = 0; i < nsys; i++) {
        all[n++] = sys[i];
        cap += 4 + sys[i].key.len + sys[i].value.len;
    }
    if (cap > BRK_PROPS_MAX) {
        free(all);
        return BRK_TOOBIG;
    }
    uint8_t *buf = malloc(cap);
    if (!buf) {
        free(all);
        return BRK_NOMEM;
    }
    st = brk_props_encode(all, n, buf, cap, len);
    free(all);
    if (st != BRK_OK) {
        free(buf);
        return st;
    }
    *out = buf;
    return BRK_OK;
}

size_t dly_op_encode(uint8_t *buf, const fire_item *items, size_t n)
{
    buf[0] = OP_VERSION;
    buf[1] = OP_KIND_FIRE;
    brk_st16(buf + 2, 0);
    brk_st32(buf + 4, (uint32_t)n);
    for (size_t i = 0; i < n; i++)
        brk_st64(buf + OP_HDR + 8 * i, items[i].off);
    return OP_HDR + 8 * n;
}

/* Number of offsets in a fire op body, 0 when it is not one. */
size_t dly_op_count(const brk_record *r)
{
    const uint8_t *p = r->body.ptr;
    if (r->type != BRK_REC_OP || r->body.len < OP_HDR || p[0] != OP_VERSION
        || p[1] != OP_KIND_FIRE)
        return 0;
    uint32_t n = brk_ld32(p + 4);
    if (n == 0 || n > OP_MAX_N || r->body.len != OP_HDR + 8 * (size_t)n)
        return 0;
    return n;
}

uint64_t dly_op_at(const brk_record *r, size_t i)
{
    return brk_ld64((const uint8_t *)r->body.ptr + OP_HDR + 8 * i);
}

/* ---- background thread ----------------------------------------------------------- */

static void *bg_main(void *arg)
{
    brk_delay *d = arg;
    pthread_mutex_lock(&d->mu);
    while (!d->stop) {
        pthread_mutex_unlock(&d->mu);
        (void)brk_delay_tick(d, NULL);   /* failures: stats and retries */
        pthread_mutex_lock(&d->mu);
        if (d->stop)
            break;
        int64_t now = dly_now_ms(d);
        int64_t next = now + SLEEP_MAX_MS;
        brk_timer t;
        if (heap_top(d, &t) && t.due_ms < next)
            next = t.due_ms;
        for (size_t i = 0; i < d->nretry; i++)
            if (d->retry[i].next_ms < next)
                next = d->retry[i].next_ms;
        if (next < d->hold_until)
            next = d->hold_until;
        if (next <= now)
            continue;
        /* The due decision is the injected clock's; this real-time wait only
         * paces the thread (and is cut short by an earlier send). */
        d->wake_at = next;
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        int64_t ns = (int64_t)ts.tv_nsec + (next - now) * 1000000LL;
        ts.tv_sec += (time_t)(ns / 1000000000LL);
        ts.tv_nsec = (long)(ns % 1000000000LL);
        pthread_cond_timedwait(&d->cond, &d->mu, &ts);
        d->wake_at = INT64_MIN;
    }
    pthread_mutex_unlock(&d->mu);
    return NULL;
}

/* ---- public API ------------------------------------------------------------------ */

static void delay_free(brk_delay *d)
{
    brk_timerheap_free(&d->heap);
    free(d->ring);
    free(d->retry);
    free(d->batch);
    free(d->opbuf);
    pthread_cond_destroy(&d->cond);
    pthread_mutex_destroy(&d->mu);
    pthread_mutex_destroy(&d->fire_mu);
    pthread_mutex_destroy(&d->save_mu);
    free(d);
}

brk_status brk_delay_open(brk_delay **out, brk_store *s,
                          const brk_delay_opts *opts, char *errbuf,
                          size_t errlen)
{
    if (!out)
        return BRK_INVAL;
    *out = NULL;
    if (!s) {
        dly_set_err(errbuf, errlen, "no store");
        return BRK_INVAL;
    }
    brk_delay_opts o;
    if (opts)
        o = *opts;
    else
        brk_delay_opts_init(&o);
    if (o.max_delay_ms <= 0)
        o.max_delay_ms = BRK_DELAY_MAX_DEFAULT_MS;
    if (o.fire_batch == 0)
        o.fire_batch = 256;
    if (o.fire_batch > OP_MAX_N)
        o.fire_batch = OP_MAX_N;
    if (o.state_interval_ms == 0)
        o.state_interval_ms = 1000;

    const char *topics[2] = { BRK_DELAY_TOPIC, BRK_DELAY_OP_TOPIC };
    for (int i = 0; i < 2; i++) {
        brk_status st = brk_topic_create(s, topics[i], 1);
        if (st != BRK_OK && st != BRK_EXISTS) {
            dly_set_err(errbuf, errlen, "creating topic %s: %s: %s", topics[i],
                    brk_strerror(st), brk_store_errstr(s));
            return st;
        }
    }

    brk_delay *d = calloc(1, sizeof *d);
    if (!d) {
        dly_set_err(errbuf, errlen, "out of memory");
        return BRK_NOMEM;
    }
    d->s = s;
    d->clock = brk_store_clock(s);
    d->o = o;
    d->wake_at = INT64_MIN;
    brk_timerheap_init(&d->heap);
    pthread_mutex_init(&d->save_mu, NULL);
    pthread_mutex_init(&d->fire_mu, NULL);
    pthread_mutex_init(&d->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&d->cond, &ca);
    pthread_condattr_destroy(&ca);

    brk_status st = BRK_OK;
    d->batch = malloc(o.fire_batch * sizeof *d->batch);
    d->opbuf = malloc(OP_HDR + 8 * (size_t)o.fire_batch);
    if (!d->batch || !d->opbuf) {
        dly_set_err(errbuf, errlen, "out of memory");
        st = BRK_NOMEM;
        goto fail;
    }
    /* Every later append lands above the durable end. */
    if ((st = brk_store_flush(s)) != BRK_OK) {
        dly_set_err(errbuf, errlen, "flushing the store: %s", brk_strerror(st));
        goto fail;
    }
    brk_store_stats ss;
    brk_store_get_stats(s, &ss);
    d->hi_water = ss.durable_offset;
    if ((st = brk_store_cursor_register(s, "delay", &d->cursor)) != BRK_OK) {
        dly_set_err(errbuf, errlen, "registering the retention cursor: %s",
                brk_strerror(st));
        goto fail;
    }
    if ((st = dly_rebuild(d, errbuf, errlen)) != BRK_OK)
        goto fail_cursor;
    if (d->saved_valid)
        (void)brk_store_cursor_set(s, d->cursor, d->saved_xd < d->saved_eff
                                                     ? d->saved_xd
                                                     : d->saved_eff);
    d->next_save_ms = dly_now_ms(d) + o.state_interval_ms;
    if (!o.no_background) {
        int rc = pthread_create(&d->thr, NULL, bg_main, d);
        if (rc != 0) {
            dly_set_err(errbuf, errlen, "starting the delay thread: %s",
                    strerror(rc));
            st = BRK_NOMEM;
            goto fail_cursor;
        }
        d->has_thr = true;
    }
    *out = d;
    return BRK_OK;

fail_cursor:
    brk_store_cursor_unregister(s, d->cursor);
fail:
    delay_free(d);
    return st;
}

brk_status brk_delay_close(brk_delay *d)
{
    if (!d)
        return BRK_OK;
    pthread_mutex_lock(&d->mu);
    d->stop = true;
    pthread_cond_signal(&d->cond);
    pthread_mutex_unlock(&d->mu);
    if (d->has_thr)
        pthread_join(d->thr, NULL);
    brk_status st = dly_save_state(d, true, true);
    brk_store_cursor_unregister(d->s, d->cursor);
    delay_free(d);
    return st;
}

brk_status brk_delay_send(brk_delay *d, const brk_append_req *req,
                          int64_t deliver_at_ms, brk_delay_res *res)
{
    if (!d || !req || !res)
        return BRK_INVAL;
    memset(res, 0, sizeof *res);
    size_t tlen = req->topic ? strlen(req->topic) : 0;
    if (tlen == 0 || req->topic[0] == '.'
        || !brk_topic_name_valid(req->topic, tlen, false))
        return BRK_INVAL;
    if (req->queue != -1 || (req->type != 0 && req->type != BRK_REC_MSG)
        || (req->flags & ~(uint32_t)BRK_RECF_KNOWN))
        return BRK_INVAL;
    if (brk_props_validate(req->props) != BRK_OK
        || brk_props_has_sys(req->props))
        return BRK_INVAL;
    brk_topic_info ti;
    brk_status st = brk_topic_get(d->s, req->topic, &ti);
    if (st == BRK_NOTFOUND && !brk_store_auto_create(d->s))
        return BRK_NOTFOUND;
    if (st != BRK_OK && st != BRK_NOTFOUND)
        return st;

    int64_t now = dly_now_ms(d);
    brk_append_res ar;
    if (deliver_at_ms <= now) {
        brk_append_req q = *req;
        q.allow_internal = false;
        q.type = BRK_REC_MSG;
        if ((st = brk_store_append(d->s, &q, &ar)) != BRK_OK)
            return st;
        memcpy(res->msg_id, ar.msg_id, BRK_UUID_LEN);
        res->deliver_at_ms = ar.store_ms;
        res->delayed = false;
        res->queue = ar.queue;
        res->queue_offset = ar.queue_offset;
        return BRK_OK;
    }
    int64_t ahead;
    if (__builtin_sub_overflow(deliver_at_ms, now, &ahead)
        || ahead > d->o.max_delay_ms)
        return BRK_RANGE;

    uint8_t due[8];
    brk_st64(due, (uint64_t)deliver_at_ms);
    brk_prop sys[2] = {
        { { SYS_TOPIC, sizeof SYS_TOPIC - 1 }, { req->topic, tlen } },
        { { SYS_DUE, sizeof SYS_DUE - 1 }, { due, 8 } },
    };
    uint8_t *props = NULL;
    size_t plen = 0;
    if ((st = dly_props_merge(req->props, sys, 2, &props, &plen)) != BRK_OK)
        return st;
    /* Leave room for the pair a compaction copy adds, or that copy could
     * never be written and would hold every later compaction back. */
    if (plen + 4 + (sizeof SYS_MOVED - 1) + 8 > BRK_PROPS_MAX
        || (plen >= 2 && brk_ld16(props) == UINT16_MAX)) {
        free(props);
        return BRK_TOOBIG;
    }

    send_slot me = { 0, NULL, NULL };
    pthread_mutex_lock(&d->mu);
    st = dly_reserve_slot(d);
    if (st == BRK_OK) {
        me.floor = d->hi_water;
        me.next = d->sends;
        if (d->sends)
            d->sends->prev = &me;
        d->sends = &me;
    }
    pthread_mutex_unlock(&d->mu);
    if (st != BRK_OK) {
        free(props);
        return st;
    }

    brk_append_req q;
    memset(&q, 0, sizeof q);
    q.topic = BRK_DELAY_TOPIC;
    q.queue = 0;
    q.key = req->key;
    q.tag = req->tag;
    q.props = (brk_bytes){ props, plen };
    q.body = req->body;
    q.flags = req->flags;
    q.type = BRK_REC_MSG;
    q.msg_id = req->msg_id;
    q.born_ms = req->born_ms;
    q.sync = req->sync;
    q.allow_internal = true;
    st = brk_store_append(d->s, &q, &ar);
    free(props);

    pthread_mutex_lock(&d->mu);
    if (me.prev)
        me.prev->next = me.next;
    else
        d->sends = me.next;
    if (me.next)
        me.next->prev = me.prev;
    if (st == BRK_OK) {
        dly_note_append(d, ar.log_offset);
        dly_arm(d, ar.log_offset, deliver_at_ms);
        d->scheduled_total++;
        if (deliver_at_ms < d->wake_at)   /* the thread sleeps past it */
            pthread_cond_signal(&d->cond);
    } else {
        d->reserved--;
    }
    pthread_mutex_unlock(&d->mu);
    if (st != BRK_OK)
        return st;
    memcpy(res->msg_id, ar.msg_id, BRK_UUID_LEN);
    res->deliver_at_ms = deliver_at_ms;
    res->delayed = true;
    res->queue = 0;
    res->queue_offset = 0;
    return BRK_OK;
}

brk_status brk_delay_tick(brk_delay *d, unsigned *fired)
{
    if (fired)
        *fired = 0;
    if (!d)
        return BRK_INVAL;
    int64_t now = dly_now_ms(d);
    pthread_mutex_lock(&d->fire_mu);
    brk_status st = dly_fire_due(d, now, fired);
    brk_status st2 = dly_compact(d, now);
    pthread_mutex_unlock(&d->fire_mu);
    brk_status st3 = dly_save_state(d, false, false);
    if (st == BRK_OK)
        st = st2;
    if (st == BRK_OK)
        st = st3;
    return st;
}

int64_t brk_delay_max_ms(brk_delay *d)
{
    return d->o.max_delay_ms;
}

bool brk_delay_next_due(brk_delay *d, int64_t *due_ms)
{
    pthread_mutex_lock(&d->mu);
    brk_timer t;
    bool any = heap_top(d, &t);
    int64_t next = any ? t.due_ms : INT64_MAX;
    for (size_t i = 0; i < d->nretry; i++)
        if (d->retry[i].next_ms < next) {
            next = d->retry[i].next_ms;
            any = true;
        }
    pthread_mutex_unlock(&d->mu);
    if (any && due_ms)
        *due_ms = next;
    return any;
}

void brk_delay_get_stats(brk_delay *d, brk_delay_stats *out)
{
    memset(out, 0, sizeof *out);
    int64_t next = 0;
    bool any = brk_delay_next_due(d, &next);
    pthread_mutex_lock(&d->mu);
    out->pending = d->live;
    out->scheduled_total = d->scheduled_total;
    out->fired_total = d->fired_total;
    out->errors_total = d->errors_total;
    out->compacted_total = d->compacted_total;
    out->next_due_ms = any ? next : 0;
    out->memory_bytes = sizeof *d + d->heap.cap * sizeof(brk_timer)
                        + d->rcap * sizeof *d->ring
                        + d->retry_cap * sizeof *d->retry
                        + d->o.fire_batch * (sizeof *d->batch + 8);
    pthread_mutex_unlock(&d->mu);
}
