/*
 * test_txn.c - the transaction module's contract (broker/txn.h): every
 * arrow of the state machine and every forbidden one, idempotency, what the
 * committed message looks like, the check-back schedule and its policies,
 * the checker's threading, restart, listing, stats, input validation,
 * delayed commits, memory per pending transaction, and a concurrent mix.
 *
 * Setup: a SYNC store on the simulated disk (tests/support/io_sim) with a
 * fake clock and no background thread; the transaction module is opened
 * with no_background too, so checks happen only when a test moves the clock
 * and calls tick() (brk_txn_tick, then brk_txn_quiesce to wait for the
 * workers).  The checker is a fake: a scripted answer per txid (by attempt,
 * or by call), a default answer otherwise; it logs every call (txid,
 * attempt, fake-clock time, thread) and can hold calls "in flight" until
 * the test releases them.
 *
 * State machine under test (txn.h):
 *
 *   prepare ──► PREPARED ──commit / check COMMIT──────────► COMMITTED
 *                 │  ▲ │
 *                 │  └─┘ check UNKNOWN (checks+1; ERROR: retried, not counted)
 *                 ├──rollback / check ROLLBACK / exhausted─► ROLLED_BACK
 *                 └──exhausted with HOLD──► PREPARED+stuck ──commit──► COMMITTED
 *                                                    └──rollback──► ROLLED_BACK
 *   COMMITTED and ROLLED_BACK are terminal: the opposite verdict is
 *   BRK_CONFLICT, the same one a replay.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "broker/delay.h"
#include "broker/store.h"
#include "broker/txn.h"
#include "fake_clock.h"
#include "io_sim.h"

#define DIR "/txn"
#define T0  1700000000000LL         /* fake wall clock at setup */

#define C_COMMIT   BRK_CHECK_COMMIT
#define C_ROLLBACK BRK_CHECK_ROLLBACK
#define C_UNKNOWN  BRK_CHECK_UNKNOWN
#define C_ERROR    BRK_CHECK_ERROR

/* ---- the fake checker ----------------------------------------------------- */

#define FC_SCRIPTS 64
#define FC_ANSWERS 32
#define FC_LOG     8192

typedef struct fc_script {
    char txid[BRK_TXID_MAX + 1];
    brk_check_result answers[FC_ANSWERS];
    size_t n;
    bool by_call;               /* index by this txid's call number, not by attempt */
    unsigned calls;
} fc_script;

typedef struct fc_call {
    char txid[BRK_TXID_MAX + 1];
    uint32_t attempt;
    int64_t now_ms;             /* fake clock when the check was asked */
    brk_check_result answer;
    bool on_test_thread;
} fc_call;

typedef struct fake_checker {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    brk_fake_clock *clk;
    pthread_t test_thread;
    brk_check_result dflt;      /* answer for a txid without a script */
    fc_script scripts[FC_SCRIPTS];
    size_t nscripts;
    bool random;                /* answer at random (concurrency test) */
    uint64_t rng;
    /* Holding checks in flight. */
    bool hold;                  /* calls that arrive wait until released */
    unsigned waiting;           /* calls waiting now */
    bool release_set;
    brk_check_result release_answer;  /* answer of the held calls */
    /* What was asked. */
    unsigned calls;
    unsigned on_test_thread;
    fc_call log[FC_LOG];
    char last_topic[BRK_TOPIC_MAX + 1];
    uint8_t last_key[BRK_KEY_MAX];
    size_t last_key_len;
    uint8_t last_headers[1024];
    size_t last_headers_len;
    uint8_t last_msg_id[BRK_UUID_LEN];
    int64_t last_prepared_ms;
} fake_checker;

static uint64_t rng_next(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int64_t clock_now(brk_fake_clock *clk)
{
    return clk->clock.now_ms(clk->clock.ctx);
}

static brk_check_result fc_answer_locked(fake_checker *c,
                                         const brk_check_req *req)
{
    if (c->random) {
        unsigned d = (unsigned)(rng_next(&c->rng) % 100);
        return d < 25 ? C_COMMIT : d < 50 ? C_ROLLBACK : d < 85 ? C_UNKNOWN
                                                              : C_ERROR;
    }
    for (size_t i = 0; i < c->nscripts; i++) {
        fc_script *s = &c->scripts[i];
        if (strcmp(s->txid, req->txid) != 0)
            continue;
        size_t idx = s->by_call ? s->calls : (req->attempt ? req->attempt - 1 : 0);
        s->calls++;
        return s->answers[idx < s->n ? idx : s->n - 1];
    }
    return c->dflt;
}

static brk_check_result fc_check(void *ctx, const brk_check_req *req)
{
    fake_checker *c = ctx;
    pthread_mutex_lock(&c->mu);
    brk_check_result ans = fc_answer_locked(c, req);
    unsigned idx = c->calls++;
    bool on_test = pthread_equal(pthread_self(), c->test_thread) != 0;
    c->on_test_thread += on_test;
    snprintf(c->last_topic, sizeof c->last_topic, "%s", req->topic);
    c->last_key_len = req->key.len <= sizeof c->last_key ? req->key.len : 0;
    if (c->last_key_len)
        memcpy(c->last_key, req->key.ptr, c->last_key_len);
    c->last_headers_len = req->headers.len <= sizeof c->last_headers
                          ? req->headers.len : 0;
    if (c->last_headers_len)
        memcpy(c->last_headers, req->headers.ptr, c->last_headers_len);
    memcpy(c->last_msg_id, req->msg_id, BRK_UUID_LEN);
    c->last_prepared_ms = req->prepared_ms;
    if (c->hold) {
        c->waiting++;
        pthread_cond_broadcast(&c->cond);
        while (c->hold)
            pthread_cond_wait(&c->cond, &c->mu);
        c->waiting--;
        if (c->release_set)
            ans = c->release_answer;
    }
    if (idx < FC_LOG) {
        fc_call *l = &c->log[idx];
        snprintf(l->txid, sizeof l->txid, "%s", req->txid);
        l->attempt = req->attempt;
        l->now_ms = clock_now(c->clk);
        l->answer = ans;
        l->on_test_thread = on_test;
    }
    pthread_mutex_unlock(&c->mu);
    return ans;
}

static void fc_init(fake_checker *c, brk_fake_clock *clk)
{
    memset(c, 0, sizeof *c);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cond, NULL);
    c->clk = clk;
    c->test_thread = pthread_self();
    c->dflt = C_UNKNOWN;
    c->rng = 12345;
}

static void fc_destroy(fake_checker *c)
{
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cond);
}

/* Script the answers for txid: answers[k] for attempt k+1 (by_call: for its
 * k-th call); the last answer repeats. */
static void fc_script_set(fake_checker *c, const char *txid, bool by_call,
                          const brk_check_result *answers, size_t n)
{
    pthread_mutex_lock(&c->mu);
    assert_true(c->nscripts < FC_SCRIPTS && n > 0 && n <= FC_ANSWERS);
    fc_script *s = &c->scripts[c->nscripts++];
    snprintf(s->txid, sizeof s->txid, "%s", txid);
    memcpy(s->answers, answers, n * sizeof *answers);
    s->n = n;
    s->by_call = by_call;
    pthread_mutex_unlock(&c->mu);
}

static void fc_set_default(fake_checker *c, brk_check_result r)
{
    pthread_mutex_lock(&c->mu);
    c->dflt = r;
    pthread_mutex_unlock(&c->mu);
}

static unsigned fc_calls(fake_checker *c)
{
    pthread_mutex_lock(&c->mu);
    unsigned n = c->calls;
    pthread_mutex_unlock(&c->mu);
    return n;
}

static fc_call fc_log(fake_checker *c, unsigned i)
{
    pthread_mutex_lock(&c->mu);
    assert_true(i < c->calls && i < FC_LOG);
    fc_call l = c->log[i];
    pthread_mutex_unlock(&c->mu);
    return l;
}

/* The last request and the thread count, copied under the lock. */
typedef struct fc_last {
    char topic[BRK_TOPIC_MAX + 1];
    uint8_t key[BRK_KEY_MAX];
    size_t key_len;
    uint8_t headers[1024];
    size_t headers_len;
    uint8_t msg_id[BRK_UUID_LEN];
    int64_t prepared_ms;
    unsigned on_test_thread;
} fc_last;

static void fc_last_req(fake_checker *c, fc_last *out)
{
    pthread_mutex_lock(&c->mu);
    memcpy(out->topic, c->last_topic, sizeof out->topic);
    memcpy(out->key, c->last_key, sizeof out->key);
    out->key_len = c->last_key_len;
    memcpy(out->headers, c->last_headers, sizeof out->headers);
    out->headers_len = c->last_headers_len;
    memcpy(out->msg_id, c->last_msg_id, BRK_UUID_LEN);
    out->prepared_ms = c->last_prepared_ms;
    out->on_test_thread = c->on_test_thread;
    pthread_mutex_unlock(&c->mu);
}

static void fc_hold(fake_checker *c)
{
    pthread_mutex_lock(&c->mu);
    c->hold = true;
    c->release_set = false;
    pthread_mutex_unlock(&c->mu);
}

/* Let held calls (and later ones) go, answering `ans`. */
static void fc_release(fake_checker *c, brk_check_result ans)
{
    pthread_mutex_lock(&c->mu);
    if (c->hold) {
        c->hold = false;
        c->release_set = true;
        c->release_answer = ans;
        pthread_cond_broadcast(&c->cond);
    }
    pthread_mutex_unlock(&c->mu);
}

static void deadline_in(struct timespec *ts, int ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* Wait (at most 10 s) until n calls are held in flight. */
static bool fc_wait_held(fake_checker *c, unsigned n)
{
    struct timespec dl;
    deadline_in(&dl, 10000);
    pthread_mutex_lock(&c->mu);
    int rc = 0;
    while (c->waiting < n && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&c->cond, &c->mu, &dl);
    bool ok = c->waiting >= n;
    pthread_mutex_unlock(&c->mu);
    return ok;
}

/* ---- a verdict on another thread, with a deadline ------------------------ */

typedef struct bg_verdict {
    pthread_t th;
    brk_txn *t;
    char txid[BRK_TXID_MAX + 1];
    bool commit;
    brk_status st;
    brk_txn_result res;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool done;
} bg_verdict;

static void *bg_main(void *arg)
{
    bg_verdict *b = arg;
    brk_txn_result res;
    brk_status st = b->commit ? brk_txn_commit(b->t, b->txid, &res)
                              : brk_txn_rollback(b->t, b->txid, &res);
    pthread_mutex_lock(&b->mu);
    b->st = st;
    b->res = res;
    b->done = true;
    pthread_cond_broadcast(&b->cond);
    pthread_mutex_unlock(&b->mu);
    return NULL;
}

static void bg_start(bg_verdict *b, brk_txn *t, const char *txid, bool commit)
{
    memset(b, 0, sizeof *b);
    b->t = t;
    snprintf(b->txid, sizeof b->txid, "%s", txid);
    b->commit = commit;
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->cond, NULL);
    assert_int_equal(pthread_create(&b->th, NULL, bg_main, b), 0);
}

/* True when the verdict returned within ms. */
static bool bg_wait(bg_verdict *b, int ms)
{
    struct timespec dl;
    deadline_in(&dl, ms);
    pthread_mutex_lock(&b->mu);
    int rc = 0;
    while (!b->done && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&b->cond, &b->mu, &dl);
    bool done = b->done;
    pthread_mutex_unlock(&b->mu);
    return done;
}

static void bg_join(bg_verdict *b)
{
    pthread_join(b->th, NULL);
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->cond);
}

/* ---- fixture ------------------------------------------------------------- */

typedef struct fx {
    brk_sim *sim;
    brk_fake_clock clk;
    brk_store_opts so;
    brk_store *s;
    brk_txn_opts to;
    brk_txn *t;
    bool with_delay;
    brk_delay_opts dopts;
    brk_delay *d;
    fake_checker fc;
    brk_checker checker;
    char err[256];
} fx;

static const char *const TOPICS[] = { "orders", "payments", "payment-expired",
                                      "expired", "other" };

static void open_all(fx *f)
{
    brk_status st = brk_store_open(&f->s, DIR, &f->so, f->err, sizeof f->err);
    if (st != BRK_OK)
        fail_msg("store open: %s: %s", brk_status_name(st), f->err);
    for (size_t i = 0; i < sizeof TOPICS / sizeof TOPICS[0]; i++) {
        st = brk_topic_create(f->s, TOPICS[i], 4);
        assert_true(st == BRK_OK || st == BRK_EXISTS);
    }
    f->to.delay = NULL;
    if (f->with_delay) {
        st = brk_delay_open(&f->d, f->s, &f->dopts, f->err, sizeof f->err);
        if (st != BRK_OK)
            fail_msg("delay open: %s: %s", brk_status_name(st), f->err);
        f->to.delay = f->d;
    }
    st = brk_txn_open(&f->t, f->s, &f->to, f->err, sizeof f->err);
    if (st != BRK_OK)
        fail_msg("txn open: %s: %s", brk_status_name(st), f->err);
}

static void close_all(fx *f)
{
    if (f->t)
        assert_int_equal(brk_txn_close(f->t), BRK_OK);
    f->t = NULL;
    if (f->d)
        assert_int_equal(brk_delay_close(f->d), BRK_OK);
    f->d = NULL;
    if (f->s)
        assert_int_equal(brk_store_close(f->s), BRK_OK);
    f->s = NULL;
}

/* Clean restart on the same disk and clock (also: apply changed options). */
static void restart(fx *f)
{
    close_all(f);
    open_all(f);
}

static int setup(void **state)
{
    fx *f = calloc(1, sizeof *f);
    assert_non_null(f);
    assert_int_equal(brk_sim_open(&f->sim, 42), BRK_OK);
    brk_fake_clock_init(&f->clk, T0);
    brk_store_opts_init(&f->so);
    f->so.io = brk_sim_io(f->sim);
    f->so.clock = &f->clk.clock;
    f->so.no_background = true;
    f->so.flush_mode = BRK_FLUSH_SYNC;
    f->so.uuid_seed = 7;
    f->so.auto_create_topics = false;     /* unknown topic: NOTFOUND */
    fc_init(&f->fc, &f->clk);
    f->checker.check = fc_check;
    f->checker.ctx = &f->fc;
    brk_txn_opts_init(&f->to);
    f->to.checker = &f->checker;
    f->to.workers = 2;
    f->to.no_background = true;
    brk_delay_opts_init(&f->dopts);
    f->dopts.no_background = true;
    open_all(f);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    fc_release(&f->fc, C_UNKNOWN);   /* never leave a worker blocked */
    if (f->t)
        brk_txn_close(f->t);
    if (f->d)
        brk_delay_close(f->d);
    if (f->s)
        brk_store_close(f->s);
    brk_sim_close(f->sim);
    fc_destroy(&f->fc);
    free(f);
    return 0;
}

/* ---- helpers ------------------------------------------------------------- */

static brk_check_policy policy(uint32_t first, uint32_t interval,
                               uint16_t max, uint8_t action, const char *expiry)
{
    brk_check_policy p;
    memset(&p, 0, sizeof p);
    p.first_check_ms = first;
    p.interval_ms = interval;
    p.max_checks = max;
    p.on_exhausted = action;
    p.expiry_topic = expiry;
    return p;
}

static void req_init(brk_txn_prepare_req *r, const char *txid,
                     const char *topic, const char *key, const char *body,
                     const brk_check_policy *pol)
{
    memset(r, 0, sizeof *r);
    r->topic = topic;
    r->txid = txid;
    r->key = (brk_bytes){ key, key ? strlen(key) : 0 };
    r->body = (brk_bytes){ body, body ? strlen(body) : 0 };
    r->policy = pol;
}

static brk_status prepare_st(fx *f, const char *txid, const char *topic,
                             const char *key, const char *body,
                             const brk_check_policy *pol, brk_txn_result *res)
{
    brk_txn_prepare_req r;
    req_init(&r, txid, topic, key, body, pol);
    brk_txn_result tmp;
    return brk_txn_prepare(f->t, &r, res ? res : &tmp);
}

/* Prepare that must succeed, on "orders". */
static brk_txn_result prepare(fx *f, const char *txid, const char *key,
                              const brk_check_policy *pol)
{
    brk_txn_result res;
    memset(&res, 0, sizeof res);
    brk_status st = prepare_st(f, txid, "orders", key, "body", pol, &res);
    if (st != BRK_OK)
        fail_msg("prepare %s: %s", txid ? txid : "(generated)",
                 brk_status_name(st));
    assert_int_equal(res.state, BRK_TXN_PREPARED);
    assert_false(res.replay);
    return res;
}

static brk_txn_info get(fx *f, const char *txid)
{
    brk_txn_info i;
    memset(&i, 0, sizeof i);
    brk_status st = brk_txn_get(f->t, txid, &i);
    if (st != BRK_OK)
        fail_msg("get %s: %s", txid, brk_status_name(st));
    return i;
}

static brk_txn_state state_of(fx *f, const char *txid)
{
    return get(f, txid).state;
}

static brk_status commit(fx *f, const char *txid, brk_txn_result *res)
{
    brk_txn_result tmp;
    return brk_txn_commit(f->t, txid, res ? res : &tmp);
}

static brk_status rollback(fx *f, const char *txid, brk_txn_result *res)
{
    brk_txn_result tmp;
    return brk_txn_rollback(f->t, txid, res ? res : &tmp);
}

/* Dispatch what is due, wait for the workers (results applied). */
static void tick(fx *f)
{
    assert_int_equal(brk_txn_tick(f->t), BRK_OK);
    brk_txn_quiesce(f->t);
}

/* Move the fake clock to T0 + rel (forward only) and tick. */
static void tick_at(fx *f, int64_t rel)
{
    int64_t now = clock_now(&f->clk);
    assert_true(T0 + rel >= now);
    brk_fake_clock_advance(&f->clk, T0 + rel - now);
    tick(f);
}

static brk_txn_stats stats(fx *f)
{
    brk_txn_stats s;
    memset(&s, 0, sizeof s);
    brk_txn_get_stats(f->t, &s);
    return s;
}

/* Visit every record of every queue of a topic (none if it does not exist). */
typedef void (*rec_fn)(void *arg, const brk_record *r);

static size_t scan_topic(brk_store *s, const char *topic, rec_fn fn, void *arg)
{
    brk_topic_info ti;
    if (brk_topic_get(s, topic, &ti) != BRK_OK)
        return 0;
    size_t n = 0;
    for (uint16_t q = 0; q < ti.queues; q++) {
        uint64_t min, max;
        assert_int_equal(brk_store_queue_range(s, topic, q, &min, &max), BRK_OK);
        uint64_t next = min;
        while (next < max) {
            brk_batch *b = NULL;
            brk_status st = brk_store_read(s, topic, q, next, 256, &b);
            if (st != BRK_OK)
                fail_msg("read %s/%u@%llu: %s", topic, q,
                         (unsigned long long)next, brk_status_name(st));
            assert_true(b->count > 0);
            for (size_t i = 0; i < b->count; i++) {
                if (fn)
                    fn(arg, &b->recs[i]);
                n++;
            }
            next = b->next_offset;
            brk_batch_free(b);
        }
    }
    return n;
}

/* A copy of one record, for field checks. */
typedef struct rec_copy {
    const uint8_t *want_id;
    size_t matches;
    uint16_t queue;
    uint32_t flags;
    int64_t born_ms, store_ms;
    char key[BRK_KEY_MAX + 1], tag[BRK_TAG_MAX + 1];
    size_t key_len, tag_len;
    uint8_t props[2048];
    size_t props_len;
    char body[4096];
    size_t body_len;
} rec_copy;

static void copy_if_id(void *arg, const brk_record *r)
{
    rec_copy *c = arg;
    if (c->want_id && memcmp(r->msg_id, c->want_id, BRK_UUID_LEN) != 0)
        return;
    c->matches++;
    c->queue = r->queue;
    c->flags = r->flags;
    c->born_ms = r->born_ms;
    c->store_ms = r->store_ms;
    c->key_len = r->key.len;
    memcpy(c->key, r->key.ptr, r->key.len);
    c->key[r->key.len] = '\0';
    c->tag_len = r->tag.len;
    memcpy(c->tag, r->tag.ptr, r->tag.len);
    c->tag[r->tag.len] = '\0';
    c->props_len = r->props.len < sizeof c->props ? r->props.len : 0;
    memcpy(c->props, r->props.ptr, c->props_len);
    c->body_len = r->body.len < sizeof c->body ? r->body.len : 0;
    memcpy(c->body, r->body.ptr, c->body_len);
    c->body[c->body_len] = '\0';
}

/* How many times msg id `id` is in `topic`; *out (may be NULL) gets the last. */
static size_t count_id(fx *f, const char *topic, const uint8_t *id,
                       rec_copy *out)
{
    static rec_copy tmp;
    rec_copy *c = out ? out : &tmp;
    memset(c, 0, sizeof *c);
    c->want_id = id;
    scan_topic(f->s, topic, copy_if_id, c);
    return c->matches;
}

static size_t topic_messages(fx *f, const char *topic)
{
    return scan_topic(f->s, topic, NULL, NULL);
}

/* Expiry messages about txid in topic: a record whose body contains the txid
 * or that has a property whose value is the txid (src/txn.c puts it in an
 * "outboxd-txid" header and in a JSON body; the expiry tests check that
 * form exactly). */
typedef struct expiry_scan {
    const char *txid;
    size_t matches;
    rec_copy last;
} expiry_scan;

static bool bytes_contain(brk_bytes b, const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || b.len < n)
        return false;
    const char *p = b.ptr;
    for (size_t i = 0; i + n <= b.len; i++)
        if (memcmp(p + i, s, n) == 0)
            return true;
    return false;
}

static void expiry_visit(void *arg, const brk_record *r)
{
    expiry_scan *e = arg;
    bool hit = bytes_contain(r->body, e->txid);
    size_t pos = 0;
    brk_prop p;
    while (!hit && brk_props_next(r->props, &pos, &p) == BRK_OK)
        hit = p.value.len == strlen(e->txid)
              && memcmp(p.value.ptr, e->txid, p.value.len) == 0;
    if (!hit)
        return;
    e->matches++;
    e->last.want_id = NULL;
    copy_if_id(&e->last, r);
}

static size_t count_expiry(fx *f, const char *topic, const char *txid,
                           rec_copy *last)
{
    static expiry_scan e;
    memset(&e, 0, sizeof e);
    e.txid = txid;
    scan_topic(f->s, topic, expiry_visit, &e);
    if (last)
        *last = e.last;
    return e.matches;
}

static bool props_have_sys(const uint8_t *props, size_t len)
{
    brk_bytes b = { props, len };
    size_t pos = 0;
    brk_prop p;
    brk_status st;
    while ((st = brk_props_next(b, &pos, &p)) == BRK_OK)
        if (p.key.len && ((const uint8_t *)p.key.ptr)[0] == (uint8_t)BRK_SYSPROP_CHAR)
            return true;
    assert_int_equal(st, BRK_EMPTY);
    return false;
}

static void assert_prop(const uint8_t *props, size_t len, const char *key,
                        const char *value)
{
    brk_bytes v;
    assert_int_equal(brk_props_get((brk_bytes){ props, len }, key, &v), BRK_OK);
    assert_int_equal(v.len, strlen(value));
    assert_memory_equal(v.ptr, value, v.len);
}

/* ---- state machine: the allowed arrows ----------------------------------- */

static void prepare_leaves_the_transaction_prepared(void **state)
{
    fx *f = *state;
    brk_txn_result r = prepare(f, "tx-1", "k", NULL);
    assert_string_equal(r.txid, "tx-1");
    assert_false(r.delayed);
    brk_txn_info i = get(f, "tx-1");
    assert_int_equal(i.state, BRK_TXN_PREPARED);
    assert_string_equal(i.txid, "tx-1");
    assert_string_equal(i.topic, "orders");
    assert_int_equal(i.key_len, 1);
    assert_string_equal(i.key, "k");
    assert_memory_equal(i.msg_id, r.msg_id, BRK_UUID_LEN);
    assert_false(i.stuck);
    assert_false(i.expired);
    assert_int_equal(i.checks, 0);
    assert_int_equal(i.prepared_ms, T0);
    assert_int_equal(i.next_check_ms, T0 + 6000);
    assert_int_equal(stats(f).pending, 1);
}

static void prepared_to_committed_by_client_commit(void **state)
{
    fx *f = *state;
    brk_txn_result p = prepare(f, "tx-1", "k", NULL);
    brk_txn_result r;
    assert_int_equal(commit(f, "tx-1", &r), BRK_OK);
    assert_int_equal(r.state, BRK_TXN_COMMITTED);
    assert_false(r.replay);
    assert_false(r.delayed);
    assert_memory_equal(r.msg_id, p.msg_id, BRK_UUID_LEN);
    assert_int_equal(state_of(f, "tx-1"), BRK_TXN_COMMITTED);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 1);
    assert_int_equal(stats(f).pending, 0);
}

static void prepared_to_rolled_back_by_client_rollback(void **state)
{
    fx *f = *state;
    prepare(f, "tx-1", "k", NULL);
    brk_txn_result r;
    assert_int_equal(rollback(f, "tx-1", &r), BRK_OK);
    assert_int_equal(r.state, BRK_TXN_ROLLED_BACK);
    assert_false(r.replay);
    brk_txn_info i = get(f, "tx-1");
    assert_int_equal(i.state, BRK_TXN_ROLLED_BACK);
    assert_false(i.expired);
    assert_int_equal(topic_messages(f, "orders"), 0);
    assert_int_equal(stats(f).pending, 0);
}

static void prepared_to_committed_by_check_commit(void **state)
{
    fx *f = *state;
    fc_set_default(&f->fc, C_COMMIT);
    brk_txn_result p = prepare(f, "tx-1", "k", NULL);
    tick_at(f, 6000);
    assert_int_equal(fc_calls(&f->fc), 1);
    assert_int_equal(state_of(f, "tx-1"), BRK_TXN_COMMITTED);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 1);
    assert_int_equal(stats(f).checks_commit_total, 1);
    /* Resolved: no more checks. */
    tick_at(f, 600000);
    assert_int_equal(fc_calls(&f->fc), 1);
}

static void prepared_to_rolled_back_by_check_rollback(void **state)
{
    fx *f = *state;
    fc_set_default(&f->fc, C_ROLLBACK);
    prepare(f, "tx-1", "k", NULL);
    tick_at(f, 6000);
    assert_int_equal(fc_calls(&f->fc), 1);
    brk_txn_info i = get(f, "tx-1");
    assert_int_equal(i.state, BRK_TXN_ROLLED_BACK);
    assert_false(i.expired);
    assert_int_equal(topic_messages(f, "orders"), 0);
    assert_int_equal(stats(f).checks_rollback_total, 1);
    tick_at(f, 600000);
    assert_int_equal(fc_calls(&f->fc), 1);
}

static void check_unknown_keeps_prepared_and_counts_one_check(void **state)
{
    fx *f = *state;
    brk_check_policy pol = policy(1000, 2000, 5, BRK_EXHAUSTED_ROLLBACK, NULL);
    prepare(f, "tx-1", "k", &pol);
    tick_at(f, 1000);
    assert_int_equal(fc_calls(&f->fc), 1);
    brk_txn_info i = get(f, "tx-1");
    assert_int_equal(i.state, BRK_TXN_PREPARED);
    assert_int_equal(i.checks, 1);
    assert_int_equal(i.check_errors, 0);
    assert_false(i.checking);
    assert_int_equal(i.next_check_ms, T0 + 3000);
    assert_int_equal(stats(f).checks_unknown_total, 1);
    assert_int_equal(topic_messages(f, "orders"), 0);
}

static void exhausted_checks_with_rollback_expire_the_transaction(void **state)
{
    fx *f = *state;
    brk_check_policy pol = policy(1000, 1000, 2, BRK_EXHAUSTED_ROLLBACK, NULL);
    prepare(f, "tx-1", "k", &pol);
    tick_at(f, 1000);
    assert_int_equal(state_of(f, "tx-1"), BRK_TXN_PREPARED);
    tick_at(f, 2000);
    assert_int_equal(fc_calls(&f->fc), 2);
    brk_txn_info i = get(f, "tx-1");
    assert_int_equal(i.state, BRK_TXN_ROLLED_BACK);
    assert_true(i.expired);
    assert_int_equal(i.checks, 2);
    assert_int_equal(topic_messages(f, "orders"), 0);
    brk_txn_stats s = stats(f);
    assert_int_equal(s.expired_total, 1);
    assert_int_equal(s.rolled_back_total, 1);
    assert_int_equal(s.pending, 0);
    tick_at(f, 100000);
    assert_int_equal(fc_calls(&f->fc), 2);
}

static void exhausted_checks_with_hold_leave_it_stuck(void **state)
{
    fx *f = *state;
    brk_check_policy pol = policy(1000, 1000, 2, BRK_EXHAUSTED_HOLD, NULL);
    prepare(f, "tx-1", "k", &pol);
    tick_at(f, 1000);
    tick_at(f, 2000);
    assert_int_equal(fc_calls(&f->fc), 2);
    brk_txn_info i = get(f, "tx-1");
    assert_int_equal(i.state, BRK_TXN_PREPARED);
    assert_true(i.stuck);
    assert_false(i.expired);
    assert_int_equal(i.checks, 2);
    assert_int_equal(i.next_check_ms, 0);
    brk_txn_stats s = stats(f);
    assert_int_equal(s.pending, 1);
    assert_int_equal(s.stuck, 1);
    brk_txn_info *list = NULL;
    size_t n = 99;
    assert_int_equal(brk_txn_list(f->t, BRK_TXN_LIST_STUCK, 10, &list, &n), BRK_OK);
    assert_int_equal(n, 1);
    assert_string_equal(list[0].txid, "tx-1");
    assert_true(list[0].stuck);
    free(list);
    /* Stuck means no more checks. */
    tick_at(f, 3600000);
    assert_int_equal(fc_calls(&f->fc), 2);
    assert_int_equal(topic_messages(f, "orders"), 0);
}

static void make_stuck(fx *f, const char *txid)
{
    brk_check_policy pol = policy(0, 1000, 1, BRK_EXHAUSTED_HOLD, NULL);
    prepare(f, txid, "k", &pol);
    tick(f);
    assert_true(get(f, txid).stuck);
}

static void stuck_to_committed_by_client_commit(void **state)
{
    fx *f = *state;
    make_stuck(f, "tx-1");
    brk_txn_result r;
    assert_int_equal(commit(f, "tx-1", &r), BRK_OK);
    assert_int_equal(r.state, BRK_TXN_COMMITTED);
    assert_false(r.replay);
    brk_txn_info i = get(f, "tx-1");
    assert_int_equal(i.state, BRK_TXN_COMMITTED);
    assert_int_equal(count_id(f, "orders", i.msg_id, NULL), 1);
    brk_txn_stats s = stats(f);
    assert_int_equal(s.stuck, 0);
    assert_int_equal(s.pending, 0);
}

static void stuck_to_rolled_back_by_client_rollback(void **state)
{
    fx *f = *state;
    make_stuck(f, "tx-1");
    brk_txn_result r;
    assert_int_equal(rollback(f, "tx-1", &r), BRK_OK);
    assert_int_equal(r.state, BRK_TXN_ROLLED_BACK);
    assert_int_equal(state_of(f, "tx-1"), BRK_TXN_ROLLED_BACK);
    assert_int_equal(topic_messages(f, "orders"), 0);
    brk_txn_stats s = stats(f);
    assert_int_equal(s.stuck, 0);
    assert_int_equal(s.pending, 0);
}

/* ---- state machine: forbidden arrows ------------------------------------- */

static void commit_after_rollback_is_conflict_and_publishes_nothing(void **state)
{
    fx *f = *state;
    prepare(f, "tx-1", "k", NULL);
    assert_int_equal(rollback(f, "tx-1", NULL), BRK_OK);
    brk_txn_result r;
    assert_int_equal(commit(f, "tx-1", &r), BRK_CONFLICT);
    assert_int_equal(r.state, BRK_TXN_ROLLED_BACK);
    assert_int_equal(state_of(f, "tx-1"), BRK_TXN_ROLLED_BACK);
    assert_int_equal(topic_messages(f, "orders"), 0);
    assert_int_equal(stats(f).committed_total, 0);
}

static void rollback_after_commit_is_conflict_and_keeps_the_message(void **state)
{
    fx *f = *state;
    brk_txn_result p = prepare(f, "tx-1", "k", NULL);
    assert_int_equal(commit(f, "tx-1", NULL), BRK_OK);
    brk_txn_result r;
    assert_int_equal(rollback(f, "tx-1", &r), BRK_CONFLICT);
    assert_int_equal(r.state, BRK_TXN_COMMITTED);
    assert_int_equal(state_of(f, "tx-1"), BRK_TXN_COMMITTED);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 1);
    assert_int_equal(topic_messages(f, "orders"), 1);
    assert_int_equal(stats(f).rolled_back_total, 0);
}

static void check_commit_after_client_rollback_does_nothing(void **state)
{
    fx *f = *state;
    fc_set_default(&f->fc, C_COMMIT);
    brk_check_policy pol = policy(0, 1000, 3, BRK_EXHAUSTED_ROLLBACK, NULL);
    prepare(f, "tx-1", "k", &pol);      /* due at once */
    assert_int_equal(rollback(f, "tx-1", NULL), BRK_OK);
    tick(f);
    tick_at(f, 10000);
    assert_int_equal(fc_calls(&f->fc), 0);
    assert_int_equal(state_of(f, "tx-1"), BRK_TXN_ROLLED_BACK);
    assert_int_equal(topic_messages(f, "orders"), 0);
}

static void check_rollback_after_client_commit_does_nothing(void **state)
{
    fx *f = *state;
    fc_set_default(&f->fc, C_ROLLBACK);
    brk_check_policy pol = policy(0, 1000, 3, BRK_EXHAUSTED_ROLLBACK, NULL);
    brk_txn_result p = prepare(f, "tx-1", "k", &pol);
    assert_int_equal(commit(f, "tx-1", NULL), BRK_OK);
    tick(f);
    tick_at(f, 10000);
    assert_int_equal(fc_calls(&f->fc), 0);
    assert_int_equal(state_of(f, "tx-1"), BRK_TXN_COMMITTED);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 1);
}

/* Hold a check of tx-1 in flight, give a client verdict from another
 * thread (it must not wait for the check), then let the check answer the
 * opposite.  The client's verdict, the first terminal one, stays. */
static void verdict_during_check(fx *f, bool client_commits)
{
    brk_check_policy pol = policy(0, 1000, 3, BRK_EXHAUSTED_ROLLBACK, NULL);
    brk_txn_result p = prepare(f, "tx-1", "k", &pol);
    fc_hold(&f->fc);
    assert_int_equal(brk_txn_tick(f->t), BRK_OK);
    if (!fc_wait_held(&f->fc, 1))
        fail_msg("the due check never reached the checker");
    brk_txn_info i = get(f, "tx-1");
    assert_true(i.checking);
    assert_int_equal(i.state, BRK_TXN_PREPARED);
    assert_int_equal(stats(f).checking, 1);

    bg_verdict b;
    bg_start(&b, f->t, "tx-1", client_commits);
    bool returned = bg_wait(&b, 5000);
    fc_release(&f->fc, client_commits ? C_ROLLBACK : C_COMMIT);
    bg_join(&b);
    if (!returned)
        fail_msg("brk_txn_%s waited for the check in flight",
                 client_commits ? "commit" : "rollback");
    brk_txn_quiesce(f->t);

    brk_txn_state want = client_commits ? BRK_TXN_COMMITTED : BRK_TXN_ROLLED_BACK;
    assert_int_equal(b.st, BRK_OK);
    assert_int_equal(b.res.state, want);
    i = get(f, "tx-1");
    assert_int_equal(i.state, want);
    assert_false(i.checking);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), client_commits ? 1 : 0);
    assert_int_equal(topic_messages(f, "orders"), client_commits ? 1 : 0);
    /* And it stays so. */
    tick_at(f, 100000);
    assert_int_equal(fc_calls(&f->fc), 1);
    assert_int_equal(state_of(f, "tx-1"), want);
    assert_int_equal(topic_messages(f, "orders"), client_commits ? 1 : 0);
    brk_txn_stats s = stats(f);
    assert_int_equal(s.committed_total + s.rolled_back_total, 1);
    assert_int_equal(s.checking, 0);
}

static void client_commit_wins_over_a_check_in_flight_answering_rollback(void **state)
{
    verdict_during_check(*state, true);
}

static void client_rollback_wins_over_a_check_in_flight_answering_commit(void **state)
{
    verdict_during_check(*state, false);
}

/* ---- idempotency --------------------------------------------------------- */

static void commit_twice_is_a_replay_and_publishes_once(void **state)
{
    fx *f = *state;
    brk_txn_result p = prepare(f, "tx-1", "k", NULL);
    brk_txn_result r1, r2;
    assert_int_equal(commit(f, "tx-1", &r1), BRK_OK);
    assert_false(r1.replay);
    assert_int_equal(commit(f, "tx-1", &r2), BRK_OK);
    assert_true(r2.replay);
    assert_int_equal(r2.state, BRK_TXN_COMMITTED);
    assert_memory_equal(r2.msg_id, p.msg_id, BRK_UUID_LEN);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 1);
    assert_int_equal(topic_messages(f, "orders"), 1);
    assert_int_equal(stats(f).committed_total, 1);
}

static void rollback_twice_is_a_replay(void **state)
{
    fx *f = *state;
    prepare(f, "tx-1", "k", NULL);
    brk_txn_result r1, r2;
    assert_int_equal(rollback(f, "tx-1", &r1), BRK_OK);
    assert_false(r1.replay);
    assert_int_equal(rollback(f, "tx-1", &r2), BRK_OK);
    assert_true(r2.replay);
    assert_int_equal(r2.state, BRK_TXN_ROLLED_BACK);
    assert_int_equal(topic_messages(f, "orders"), 0);
    assert_int_equal(stats(f).rolled_back_total, 1);
}

static void prepare_again_with_same_content_is_a_replay_with_same_msg_id(void **state)
{
    fx *f = *state;
    brk_txn_result p1 = prepare(f, "tx-1", "k", NULL);
    brk_txn_result p2;
    assert_int_equal(prepare_st(f, "tx-1", "orders", "k", "body", NULL, &p2), BRK_OK);
    assert_true(p2.replay);
    assert_int_equal(p2.state, BRK_TXN_PREPARED);
    assert_string_equal(p2.txid, "tx-1");
    assert_memory_equal(p2.msg_id, p1.msg_id, BRK_UUID_LEN);
    brk_txn_stats s = stats(f);
    assert_int_equal(s.pending, 1);
    assert_int_equal(s.prepared_total, 1);
}

static void prepare_replay_after_commit_reports_committed(void **state)
{
    fx *f = *state;
    brk_txn_result p1 = prepare(f, "tx-1", "k", NULL);
    assert_int_equal(commit(f, "tx-1", NULL), BRK_OK);
    brk_txn_result p2;
    assert_int_equal(prepare_st(f, "tx-1", "orders", "k", "body", NULL, &p2), BRK_OK);
    assert_true(p2.replay);
    assert_int_equal(p2.state, BRK_TXN_COMMITTED);
    assert_memory_equal(p2.msg_id, p1.msg_id, BRK_UUID_LEN);
    assert_int_equal(stats(f).pending, 0);
    assert_int_equal(count_id(f, "orders", p1.msg_id, NULL), 1);
}

static void prepare_same_txid_other_body_is_conflict(void **state)
{
    fx *f = *state;
    prepare(f, "tx-1", "k", NULL);
    assert_int_equal(prepare_st(f, "tx-1", "orders", "k", "other body", NULL, NULL),
                     BRK_CONFLICT);
    assert_int_equal(stats(f).pending, 1);
}

static void prepare_same_txid_other_topic_is_conflict(void **state)
{
    fx *f = *state;
    prepare(f, "tx-1", "k", NULL);
    assert_int_equal(prepare_st(f, "tx-1", "other", "k", "body", NULL, NULL),
                     BRK_CONFLICT);
    assert_int_equal(stats(f).pending, 1);
    assert_string_equal(get(f, "tx-1").topic, "orders");
}

static void prepare_same_txid_other_key_is_conflict(void **state)
{
    fx *f = *state;
    prepare(f, "tx-1", "k", NULL);
    assert_int_equal(prepare_st(f, "tx-1", "orders", "k2", "body", NULL, NULL),
                     BRK_CONFLICT);
    assert_int_equal(prepare_st(f, "tx-1", "orders", NULL, "body", NULL, NULL),
                     BRK_CONFLICT);
    assert_int_equal(stats(f).pending, 1);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp((const char *)a, (const char *)b);
}

static void prepare_without_txid_generates_unique_ones(void **state)
{
    fx *f = *state;
    enum { N = 1000 };
    static char ids[N][BRK_TXID_MAX + 1];
    for (int i = 0; i < N; i++) {
        brk_txn_result r = prepare(f, (i % 2) ? NULL : "", NULL, NULL);
        assert_true(strlen(r.txid) > 0);
        memcpy(ids[i], r.txid, sizeof ids[i]);
        /* The generated txid names the transaction. */
        if (i % 100 == 0)
            assert_int_equal(state_of(f, r.txid), BRK_TXN_PREPARED);
    }
    qsort(ids, N, sizeof ids[0], cmp_str);
    for (int i = 1; i < N; i++)
        if (strcmp(ids[i - 1], ids[i]) == 0)
            fail_msg("generated txid %s twice", ids[i]);
    assert_int_equal(stats(f).pending, N);
}

static void verdict_on_unknown_txid_is_notfound(void **state)
{
    fx *f = *state;
    assert_int_equal(commit(f, "never", NULL), BRK_NOTFOUND);
    assert_int_equal(rollback(f, "never", NULL), BRK_NOTFOUND);
    brk_txn_info i;
    assert_int_equal(brk_txn_get(f->t, "never", &i), BRK_NOTFOUND);
}

/* ---- the committed message ----------------------------------------------- */

static void committed_message_keeps_id_queue_tag_headers_body_flags_born(void **state)
{
    fx *f = *state;
    brk_prop props[2] = {
        { { "traceparent", 11 }, { "00-abc-01", 9 } },
        { { "x-user", 6 }, { "alice", 5 } },
    };
    uint8_t pbuf[256];
    size_t plen = 0;
    assert_int_equal(brk_props_encode(props, 2, pbuf, sizeof pbuf, &plen), BRK_OK);
    brk_txn_prepare_req r;
    req_init(&r, "tx-1", "orders", "order-42", "{\"id\":42}", NULL);
    r.tag = (brk_bytes){ "created", 7 };
    r.props = (brk_bytes){ pbuf, plen };
    r.flags = BRK_RECF_BODY_JSON;
    r.born_ms = 1234567;
    brk_txn_result p;
    assert_int_equal(brk_txn_prepare(f->t, &r, &p), BRK_OK);
    brk_fake_clock_advance(&f->clk, 500);
    assert_int_equal(commit(f, "tx-1", NULL), BRK_OK);

    rec_copy c;
    assert_int_equal(count_id(f, "orders", p.msg_id, &c), 1);
    uint16_t q;
    assert_int_equal(brk_topic_queue_for_key(f->s, "orders", "order-42", 8, &q), BRK_OK);
    assert_int_equal(c.queue, q);
    assert_int_equal(c.key_len, 8);
    assert_string_equal(c.key, "order-42");
    assert_string_equal(c.tag, "created");
    assert_string_equal(c.body, "{\"id\":42}");
    assert_int_equal(c.flags, BRK_RECF_BODY_JSON);
    assert_int_equal(c.born_ms, 1234567);
    assert_false(props_have_sys(c.props, c.props_len));
    assert_prop(c.props, c.props_len, "traceparent", "00-abc-01");
    assert_prop(c.props, c.props_len, "x-user", "alice");
    /* Exactly the user's two properties. */
    size_t pos = 0, n = 0;
    brk_prop pr;
    while (brk_props_next((brk_bytes){ c.props, c.props_len }, &pos, &pr) == BRK_OK)
        n++;
    assert_int_equal(n, 2);
}

static void committed_message_without_born_ms_is_born_at_prepare(void **state)
{
    fx *f = *state;
    brk_txn_result p = prepare(f, "tx-1", NULL, NULL);
    brk_fake_clock_advance(&f->clk, 5000);
    assert_int_equal(commit(f, "tx-1", NULL), BRK_OK);
    rec_copy c;
    assert_int_equal(count_id(f, "orders", p.msg_id, &c), 1);
    assert_int_equal(c.born_ms, T0);
    assert_int_equal(c.key_len, 0);
    assert_int_equal(c.props_len, 0);
}

static void half_message_is_invisible_before_commit(void **state)
{
    fx *f = *state;
    brk_txn_result p = prepare(f, "tx-1", "order-42", NULL);
    for (uint16_t q = 0; q < 4; q++) {
        uint64_t min = 9, max = 9;
        assert_int_equal(brk_store_queue_range(f->s, "orders", q, &min, &max), BRK_OK);
        assert_int_equal(max, 0);
    }
    brk_topic_info ti;
    assert_int_equal(brk_topic_get(f->s, "orders", &ti), BRK_OK);
    assert_int_equal(ti.messages, 0);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 0);
    /* The half topic is internal: not listed to users. */
    brk_topic_info *list = NULL;
    size_t n = 0;
    assert_int_equal(brk_topic_list(f->s, false, &list, &n), BRK_OK);
    for (size_t i = 0; i < n; i++)
        assert_true(strncmp(list[i].name, "__", 2) != 0);
    free(list);
    /* Commit makes it visible. */
    assert_int_equal(commit(f, "tx-1", NULL), BRK_OK);
    assert_int_equal(brk_topic_get(f->s, "orders", &ti), BRK_OK);
    assert_int_equal(ti.messages, 1);
}

/* ---- the checker --------------------------------------------------------- */

static void checker_sees_txid_topic_key_headers_msg_id_and_attempt(void **state)
{
    fx *f = *state;
    brk_prop props[1] = { { { "traceparent", 11 }, { "00-1", 4 } } };
    uint8_t pbuf[64];
    size_t plen = 0;
    assert_int_equal(brk_props_encode(props, 1, pbuf, sizeof pbuf, &plen), BRK_OK);
    brk_check_policy pol = policy(0, 1000, 3, BRK_EXHAUSTED_ROLLBACK, NULL);
    brk_txn_prepare_req r;
    req_init(&r, "tx-1", "orders", "order-7", "b", &pol);
    r.props = (brk_bytes){ pbuf, plen };
    brk_txn_result p;
    assert_int_equal(brk_txn_prepare(f->t, &r, &p), BRK_OK);
    tick(f);
    assert_int_equal(fc_calls(&f->fc), 1);
    fc_call l = fc_log(&f->fc, 0);
    assert_string_equal(l.txid, "tx-1");
    assert_int_equal(l.attempt, 1);
    static fc_last last;
    fc_last_req(&f->fc, &last);
    assert_string_equal(last.topic, "orders");
    assert_int_equal(last.key_len, 7);
    assert_memory_equal(last.key, "order-7", 7);
    assert_memory_equal(last.msg_id, p.msg_id, BRK_UUID_LEN);
    assert_int_equal(last.prepared_ms, T0);
    assert_false(props_have_sys(last.headers, last.headers_len));
    assert_prop(last.headers, last.headers_len, "traceparent", "00-1");
    /* The second check is attempt 2. */
    tick_at(f, 1000);
    assert_int_equal(fc_calls(&f->fc), 2);
    assert_int_equal(fc_log(&f->fc, 1).attempt, 2);
}

static void checker_runs_on_a_worker_thread(void **state)
{
    fx *f = *state;
    brk_check_policy pol = policy(0, 1000, 5, BRK_EXHAUSTED_ROLLBACK, NULL);
    prepare(f, "tx-1", "k", &pol);
    prepare(f, "tx-2", "k", &pol);
    tick(f);
    tick_at(f, 1000);
    assert_int_equal(fc_calls(&f->fc), 4);
    static fc_last last;
    fc_last_req(&f->fc, &last);
    assert_int_equal(last.on_test_thread, 0);
    for (unsigned k = 0; k < 4; k++)
        assert_false(fc_log(&f->fc, k).on_test_thread);
}

static void checker_error_during_a_long_outage_never_rolls_back_and_backs_off(void **state)
{
    fx *f = *state;
    f->to.error_backoff_min_ms = 1000;
    f->to.error_backoff_max_ms = 32000;
    restart(f);
    fc_set_default(&f->fc, C_ERROR);
    brk_txn_result p = prepare(f, "tx-1", "k", NULL);   /* default: 6 s, 60 s, 15 */
    const int64_t step = 1000, hours = 3;
    unsigned ticks = 0;
    for (int64_t t = step; t <= hours * 3600000; t += step) {
        tick_at(f, t);
        ticks++;
    }
    unsigned calls = fc_calls(&f->fc);
    print_message("outage: %u ticks, %u checker calls\n", ticks, calls);
    /* Far more than 15 "checks" worth of time went by, and it is still
     * prepared: errors never count. */
    brk_txn_info i = get(f, "tx-1");
    assert_int_equal(i.state, BRK_TXN_PREPARED);
    assert_false(i.expired);
    assert_false(i.stuck);
    assert_int_equal(i.checks, 0);
    assert_true(i.next_check_ms > T0 + hours * 3600000);
    brk_txn_stats s = stats(f);
    assert_int_equal(s.checks_error_total, calls);
    assert_int_equal(s.checks_unknown_total, 0);
    assert_int_equal(s.rolled_back_total, 0);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 0);
    /* Retries back off: far fewer calls than ticks. */
    assert_true(calls >= 10);
    assert_true(calls * 20 < ticks);
    /* First ask at 6 s; every retry asks attempt 1 again; the gaps start
     * at the minimum, never shrink, and end at the maximum. */
    fc_call first = fc_log(&f->fc, 0);
    assert_int_equal(first.now_ms, T0 + 6000);
    int64_t prev_gap = 0, last_gap = 0;
    for (unsigned k = 1; k < calls; k++) {
        fc_call a = fc_log(&f->fc, k - 1), b = fc_log(&f->fc, k);
        assert_int_equal(b.attempt, 1);
        int64_t gap = b.now_ms - a.now_ms;
        if (k == 1)
            assert_true(gap >= 1000 && gap <= 1000 + step);
        else if (gap < prev_gap)
            fail_msg("backoff shrank: gap %lld after %lld (call %u)",
                     (long long)gap, (long long)prev_gap, k);
        assert_true(gap <= 32000 + step);
        prev_gap = gap;
        last_gap = gap;
    }
    assert_true(last_gap >= 32000);
    /* check_errors counts every ERROR since the last counted check. */
    assert_int_equal(i.check_errors, calls);
    /* The outage ends: the next check counts and commits. */
    fc_set_default(&f->fc, C_COMMIT);
    tick_at(f, hours * 3600000 + 40000);
    assert_int_equal(state_of(f, "tx-1"), BRK_TXN_COMMITTED);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 1);
}

static void error_retry_asks_the_same_attempt_and_unknown_resets_errors(void **state)
{
    fx *f = *state;
    static const brk_check_result ans[] = { C_ERROR, C_ERROR, C_UNKNOWN,
                                            C_ERROR, C_COMMIT };
    fc_script_set(&f->fc, "tx-1", true, ans, 5);
    brk_check_policy pol = policy(0, 60000, 5, BRK_EXHAUSTED_ROLLBACK, NULL);
    brk_txn_result p = prepare(f, "tx-1", "k", &pol);
    tick(f);
    assert_int_equal(get(f, "tx-1").check_errors, 1);
    int64_t t = 0;
    while (fc_calls(&f->fc) < 3 && t < 600000)
        tick_at(f, t += 500);
    assert_int_equal(fc_calls(&f->fc), 3);
    brk_txn_info i = get(f, "tx-1");
    assert_int_equal(i.checks, 1);
    assert_int_equal(i.check_errors, 0);
    assert_int_equal(i.state, BRK_TXN_PREPARED);
    while (fc_calls(&f->fc) < 5 && t < 1200000)
        tick_at(f, t += 500);
    assert_int_equal(fc_calls(&f->fc), 5);
    assert_int_equal(fc_log(&f->fc, 0).attempt, 1);
    assert_int_equal(fc_log(&f->fc, 1).attempt, 1);
    assert_int_equal(fc_log(&f->fc, 2).attempt, 1);
    assert_int_equal(fc_log(&f->fc, 3).attempt, 2);
    assert_int_equal(fc_log(&f->fc, 4).attempt, 2);
    assert_int_equal(state_of(f, "tx-1"), BRK_TXN_COMMITTED);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 1);
    brk_txn_stats s = stats(f);
    assert_int_equal(s.checks_error_total, 3);
    assert_int_equal(s.checks_unknown_total, 1);
    assert_int_equal(s.checks_commit_total, 1);
}

static void slow_checker_does_not_block_commit_of_another_txid(void **state)
{
    fx *f = *state;
    brk_check_policy now = policy(0, 1000, 3, BRK_EXHAUSTED_ROLLBACK, NULL);
    prepare(f, "slow", "k", &now);
    brk_txn_result pb = prepare(f, "fast", "k", NULL);
    fc_hold(&f->fc);
    assert_int_equal(brk_txn_tick(f->t), BRK_OK);
    if (!fc_wait_held(&f->fc, 1))
        fail_msg("the due check never reached the checker");
    /* Commit, rollback, prepare, get and stats of others while it hangs. */
    bg_verdict b;
    bg_start(&b, f->t, "fast", true);
    bool returned = bg_wait(&b, 5000);
    if (returned) {
        assert_int_equal(prepare_st(f, "third", "orders", NULL, "x", NULL, NULL), BRK_OK);
        assert_int_equal(rollback(f, "third", NULL), BRK_OK);
        assert_true(get(f, "slow").checking);
        assert_int_equal(stats(f).checking, 1);
    }
    fc_release(&f->fc, C_UNKNOWN);
    bg_join(&b);
    if (!returned)
        fail_msg("brk_txn_commit of another txid waited for a slow check");
    brk_txn_quiesce(f->t);
    assert_int_equal(b.st, BRK_OK);
    assert_int_equal(b.res.state, BRK_TXN_COMMITTED);
    assert_int_equal(count_id(f, "orders", pb.msg_id, NULL), 1);
    brk_txn_info i = get(f, "slow");
    assert_int_equal(i.state, BRK_TXN_PREPARED);
    assert_int_equal(i.checks, 1);
}

/* ---- policies ------------------------------------------------------------- */

static void policy_init_gives_the_rocketmq_defaults(void **state)
{
    (void)state;
    brk_check_policy p;
    memset(&p, 0xAB, sizeof p);
    brk_check_policy_init(&p);
    assert_int_equal(p.first_check_ms, 6000);
    assert_int_equal(p.interval_ms, 60000);
    assert_int_equal(p.max_checks, 15);
    assert_int_equal(p.on_exhausted, BRK_EXHAUSTED_ROLLBACK);
    assert_true(p.expiry_topic == NULL || p.expiry_topic[0] == '\0');
    brk_txn_opts o;
    brk_txn_opts_init(&o);
    assert_int_equal(o.default_policy.first_check_ms, 6000);
    assert_int_equal(o.workers, 4);
    assert_int_equal(o.max_queued_checks, 1024);
    assert_int_equal(o.error_backoff_min_ms, 1000);
    assert_int_equal(o.error_backoff_max_ms, 60000);
    assert_int_equal(o.resolved_keep_ms, 3600LL * 1000);   /* 1 h, see txn.h */
    assert_false(o.no_background);
}

static void default_policy_checks_at_6s_then_every_60s_and_rolls_back_after_15(void **state)
{
    fx *f = *state;
    brk_txn_result p = prepare(f, "tx-1", "k", NULL);
    for (unsigned k = 1; k <= 15; k++) {
        int64_t due = 6000 + (int64_t)(k - 1) * 60000;
        tick_at(f, due - 1);
        if (fc_calls(&f->fc) != k - 1)
            fail_msg("check %u happened before %lld ms", k, (long long)due);
        tick_at(f, due);
        if (fc_calls(&f->fc) != k)
            fail_msg("check %u did not happen at %lld ms", k, (long long)due);
        fc_call l = fc_log(&f->fc, k - 1);
        assert_int_equal(l.attempt, k);
        assert_int_equal(l.now_ms, T0 + due);
        brk_txn_info i = get(f, "tx-1");
        assert_int_equal(i.checks, k);
        if (k < 15) {
            assert_int_equal(i.state, BRK_TXN_PREPARED);
            assert_int_equal(i.next_check_ms, T0 + due + 60000);
        } else {
            assert_int_equal(i.state, BRK_TXN_ROLLED_BACK);
            assert_true(i.expired);
        }
    }
    tick_at(f, 3600000);
    assert_int_equal(fc_calls(&f->fc), 15);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 0);
}

static void custom_policy_sets_check_times_count_and_action(void **state)
{
    fx *f = *state;
    brk_check_policy pol = policy(2000, 500, 3, BRK_EXHAUSTED_HOLD, NULL);
    prepare(f, "tx-1", "k", &pol);
    brk_txn_info i = get(f, "tx-1");
    assert_int_equal(i.next_check_ms, T0 + 2000);
    assert_int_equal(i.policy.first_check_ms, 2000);
    assert_int_equal(i.policy.interval_ms, 500);
    assert_int_equal(i.policy.max_checks, 3);
    assert_int_equal(i.policy.on_exhausted, BRK_EXHAUSTED_HOLD);
    tick_at(f, 1999);
    assert_int_equal(fc_calls(&f->fc), 0);
    tick_at(f, 2000);
    tick_at(f, 2499);
    assert_int_equal(fc_calls(&f->fc), 1);
    tick_at(f, 2500);
    tick_at(f, 3000);
    assert_int_equal(fc_calls(&f->fc), 3);
    assert_int_equal(fc_log(&f->fc, 2).now_ms, T0 + 3000);
    i = get(f, "tx-1");
    assert_int_equal(i.state, BRK_TXN_PREPARED);
    assert_true(i.stuck);
    tick_at(f, 100000);
    assert_int_equal(fc_calls(&f->fc), 3);
}

static void default_policy_from_opts_applies_when_prepare_gives_none(void **state)
{
    fx *f = *state;
    f->to.default_policy = policy(100, 100, 2, BRK_EXHAUSTED_ROLLBACK, "expired");
    restart(f);
    prepare(f, "tx-1", "k", NULL);
    brk_txn_info i = get(f, "tx-1");
    assert_int_equal(i.next_check_ms, T0 + 100);
    assert_string_equal(i.expiry_topic, "expired");
    tick_at(f, 100);
    tick_at(f, 200);
    assert_int_equal(fc_calls(&f->fc), 2);
    i = get(f, "tx-1");
    assert_int_equal(i.state, BRK_TXN_ROLLED_BACK);
    assert_true(i.expired);
    assert_int_equal(count_expiry(f, "expired", "tx-1", NULL), 1);
}

static void assert_policy_refused(fx *f, brk_check_policy pol)
{
    brk_txn_result r;
    assert_int_equal(prepare_st(f, "tx-bad", "orders", "k", "b", &pol, &r), BRK_INVAL);
    brk_txn_info i;
    assert_int_equal(brk_txn_get(f->t, "tx-bad", &i), BRK_NOTFOUND);
    assert_int_equal(stats(f).pending, 0);
}

static void policy_with_zero_interval_is_invalid(void **state)
{
    assert_policy_refused(*state, policy(0, 0, 3, BRK_EXHAUSTED_ROLLBACK, NULL));
}

static void policy_with_zero_max_checks_is_invalid(void **state)
{
    assert_policy_refused(*state, policy(0, 1000, 0, BRK_EXHAUSTED_ROLLBACK, NULL));
}

static void policy_hold_with_expiry_topic_is_invalid(void **state)
{
    assert_policy_refused(*state, policy(0, 1000, 3, BRK_EXHAUSTED_HOLD, "expired"));
}

static void policy_with_bad_expiry_topic_name_is_invalid(void **state)
{
    fx *f = *state;
    assert_policy_refused(f, policy(0, 1000, 3, BRK_EXHAUSTED_ROLLBACK, "bad topic"));
    assert_policy_refused(f, policy(0, 1000, 3, BRK_EXHAUSTED_ROLLBACK, "__internal"));
}

static void policy_with_unknown_action_is_invalid(void **state)
{
    assert_policy_refused(*state, policy(0, 1000, 3, 7, NULL));
}

static void invalid_default_policy_is_refused_at_open(void **state)
{
    fx *f = *state;
    assert_int_equal(brk_txn_close(f->t), BRK_OK);
    f->t = NULL;
    brk_txn_opts o = f->to;
    o.default_policy = policy(6000, 0, 15, BRK_EXHAUSTED_ROLLBACK, NULL);
    brk_txn *t = (brk_txn *)&o;
    f->err[0] = '\0';
    assert_int_equal(brk_txn_open(&t, f->s, &o, f->err, sizeof f->err), BRK_INVAL);
    assert_null(t);
    assert_true(strlen(f->err) > 0);
    o.default_policy = policy(6000, 60000, 0, BRK_EXHAUSTED_ROLLBACK, NULL);
    t = (brk_txn *)&o;
    assert_int_equal(brk_txn_open(&t, f->s, &o, NULL, 0), BRK_INVAL);
    assert_null(t);
}

static void exhaustion_with_expiry_topic_publishes_one_expiry_message(void **state)
{
    fx *f = *state;
    brk_prop props[1] = { { { "x-order", 7 }, { "42", 2 } } };
    uint8_t pbuf[64];
    size_t plen = 0;
    assert_int_equal(brk_props_encode(props, 1, pbuf, sizeof pbuf, &plen), BRK_OK);
    brk_check_policy pol = policy(0, 1000, 2, BRK_EXHAUSTED_ROLLBACK, "expired");
    brk_txn_prepare_req r;
    req_init(&r, "tx-exp", "orders", "order-42", "the body", &pol);
    r.props = (brk_bytes){ pbuf, plen };
    brk_txn_result p;
    assert_int_equal(brk_txn_prepare(f->t, &r, &p), BRK_OK);
    tick(f);
    assert_int_equal(topic_messages(f, "expired"), 0);
    tick_at(f, 1000);
    assert_int_equal(state_of(f, "tx-exp"), BRK_TXN_ROLLED_BACK);
    assert_int_equal(topic_messages(f, "expired"), 1);
    rec_copy c;
    assert_int_equal(count_expiry(f, "expired", "tx-exp", &c), 1);
    /* The event, as src/txn.c documents it: key and user headers of the
     * half message, plus outboxd-txid and outboxd-event headers, and a JSON
     * body naming the transaction. */
    assert_false(props_have_sys(c.props, c.props_len));
    assert_prop(c.props, c.props_len, "outboxd-txid", "tx-exp");
    assert_prop(c.props, c.props_len, "outboxd-event", "transaction-expired");
    assert_prop(c.props, c.props_len, "x-order", "42");
    assert_string_equal(c.key, "order-42");
    assert_int_equal(c.flags, BRK_RECF_BODY_JSON);
    assert_non_null(strstr(c.body, "\"event\":\"transaction-expired\""));
    assert_non_null(strstr(c.body, "\"txid\":\"tx-exp\""));
    assert_non_null(strstr(c.body, "\"topic\":\"orders\""));
    assert_non_null(strstr(c.body, "\"checks\":2"));
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 0);
    /* It is published once, also across later ticks and a restart. */
    tick_at(f, 100000);
    restart(f);
    tick_at(f, 200000);
    assert_int_equal(topic_messages(f, "expired"), 1);
    assert_int_equal(state_of(f, "tx-exp"), BRK_TXN_ROLLED_BACK);
}

static void client_rollback_publishes_no_expiry_message(void **state)
{
    fx *f = *state;
    brk_check_policy pol = policy(0, 1000, 2, BRK_EXHAUSTED_ROLLBACK, "expired");
    prepare(f, "tx-1", "k", &pol);
    tick(f);
    assert_int_equal(rollback(f, "tx-1", NULL), BRK_OK);
    tick_at(f, 100000);
    assert_int_equal(topic_messages(f, "expired"), 0);
    /* A check ROLLBACK is not an expiry either. */
    fc_set_default(&f->fc, C_ROLLBACK);
    prepare(f, "tx-2", "k", &pol);
    tick(f);
    assert_int_equal(state_of(f, "tx-2"), BRK_TXN_ROLLED_BACK);
    assert_false(get(f, "tx-2").expired);
    assert_int_equal(topic_messages(f, "expired"), 0);
}

/* ---- the payment-timeout scenario ----------------------------------------- */
/* "Charge the customer; if the payment is not confirmed within ten minutes,
 * cancel the order and tell someone": checks at 60 s, then every 60 s, 10
 * in all, then roll back and publish to "payment-expired". */

static brk_check_policy payment_policy(void)
{
    return policy(60000, 60000, 10, BRK_EXHAUSTED_ROLLBACK, "payment-expired");
}

static void payment_paid_at_check_4(fx *f, bool restart_midway)
{
    static const brk_check_result ans[] = { C_UNKNOWN, C_UNKNOWN, C_UNKNOWN, C_COMMIT };
    fc_script_set(&f->fc, "pay-1", false, ans, 4);
    brk_check_policy pol = payment_policy();
    brk_txn_result p;
    assert_int_equal(prepare_st(f, "pay-1", "payments", "cust-9", "charge 10 EUR",
                                &pol, &p), BRK_OK);
    for (int64_t k = 1; k <= 3; k++) {
        tick_at(f, k * 60000);
        assert_int_equal(fc_calls(&f->fc), k);
        assert_int_equal(state_of(f, "pay-1"), BRK_TXN_PREPARED);
    }
    if (restart_midway) {
        restart(f);
        brk_txn_info i = get(f, "pay-1");
        assert_int_equal(i.checks, 3);
        assert_int_equal(i.next_check_ms, T0 + 240000);
    }
    tick_at(f, 239999);
    assert_int_equal(fc_calls(&f->fc), 3);
    tick_at(f, 240000);
    assert_int_equal(fc_calls(&f->fc), 4);
    assert_int_equal(fc_log(&f->fc, 3).attempt, 4);
    assert_int_equal(state_of(f, "pay-1"), BRK_TXN_COMMITTED);
    assert_int_equal(count_id(f, "payments", p.msg_id, NULL), 1);
    tick_at(f, 3600000);
    assert_int_equal(fc_calls(&f->fc), 4);
    assert_int_equal(topic_messages(f, "payment-expired"), 0);
}

static void payment_never_paid(fx *f, bool restart_midway)
{
    fc_set_default(&f->fc, C_UNKNOWN);
    brk_check_policy pol = payment_policy();
    brk_txn_result p;
    assert_int_equal(prepare_st(f, "pay-2", "payments", "cust-9", "charge 10 EUR",
                                &pol, &p), BRK_OK);
    for (int64_t k = 1; k <= 9; k++) {
        tick_at(f, k * 60000);
        assert_int_equal(fc_calls(&f->fc), k);
        if (restart_midway && k == 5) {
            restart(f);
            brk_txn_info i = get(f, "pay-2");
            assert_int_equal(i.state, BRK_TXN_PREPARED);
            assert_int_equal(i.checks, 5);
            assert_int_equal(i.next_check_ms, T0 + 360000);
            assert_int_equal(i.prepared_ms, T0);
            assert_string_equal(i.expiry_topic, "payment-expired");
        }
    }
    /* One ms before the deadline: still waiting for the payment. */
    tick_at(f, 599999);
    assert_int_equal(fc_calls(&f->fc), 9);
    assert_int_equal(state_of(f, "pay-2"), BRK_TXN_PREPARED);
    assert_int_equal(topic_messages(f, "payment-expired"), 0);
    /* 60 s + 9 x 60 s: the tenth UNKNOWN expires it. */
    tick_at(f, 600000);
    assert_int_equal(fc_calls(&f->fc), 10);
    brk_txn_info i = get(f, "pay-2");
    assert_int_equal(i.state, BRK_TXN_ROLLED_BACK);
    assert_true(i.expired);
    assert_int_equal(i.checks, 10);
    rec_copy c;
    assert_int_equal(count_expiry(f, "payment-expired", "pay-2", &c), 1);
    assert_int_equal(topic_messages(f, "payment-expired"), 1);
    assert_int_equal(c.store_ms, T0 + 600000);
    assert_prop(c.props, c.props_len, "outboxd-txid", "pay-2");
    assert_string_equal(c.key, "cust-9");
    assert_int_equal(count_id(f, "payments", p.msg_id, NULL), 0);
    assert_int_equal(topic_messages(f, "payments"), 0);
    tick_at(f, 3600000);
    assert_int_equal(fc_calls(&f->fc), 10);
    assert_int_equal(topic_messages(f, "payment-expired"), 1);
}

static void payment_paid_at_fourth_check_is_committed_without_expiry(void **state)
{
    payment_paid_at_check_4(*state, false);
}

static void payment_paid_at_fourth_check_across_a_restart(void **state)
{
    payment_paid_at_check_4(*state, true);
}

static void payment_never_paid_expires_at_ten_minutes_with_one_expiry_message(void **state)
{
    payment_never_paid(*state, false);
}

static void payment_never_paid_expires_on_time_across_a_restart(void **state)
{
    payment_never_paid(*state, true);
}

/* ---- restart -------------------------------------------------------------- */

static void restart_keeps_pending_checks_and_next_check_time(void **state)
{
    fx *f = *state;
    brk_check_policy pa = policy(1000, 10000, 10, BRK_EXHAUSTED_ROLLBACK, NULL);
    brk_check_policy pb = policy(60000, 10000, 10, BRK_EXHAUSTED_ROLLBACK, NULL);
    brk_txn_result a = prepare(f, "tx-a", "ka", &pa);
    brk_fake_clock_advance(&f->clk, 10);
    prepare(f, "tx-b", "kb", &pb);
    tick_at(f, 1000);
    tick_at(f, 11000);
    assert_int_equal(get(f, "tx-a").checks, 2);
    tick_at(f, 15000);
    restart(f);

    brk_txn_stats s = stats(f);
    assert_int_equal(s.pending, 2);
    assert_int_equal(s.oldest_pending_ms, T0);
    brk_txn_info i = get(f, "tx-a");
    assert_int_equal(i.state, BRK_TXN_PREPARED);
    assert_int_equal(i.checks, 2);
    assert_int_equal(i.next_check_ms, T0 + 21000);
    assert_int_equal(i.prepared_ms, T0);
    assert_memory_equal(i.msg_id, a.msg_id, BRK_UUID_LEN);
    assert_int_equal(i.policy.interval_ms, 10000);
    assert_int_equal(i.key_len, 2);
    i = get(f, "tx-b");
    assert_int_equal(i.checks, 0);
    assert_int_equal(i.next_check_ms, T0 + 10 + 60000);
    assert_int_equal(i.prepared_ms, T0 + 10);
    /* The schedule goes on where it was. */
    unsigned before = fc_calls(&f->fc);
    tick_at(f, 20999);
    assert_int_equal(fc_calls(&f->fc), before);
    tick_at(f, 21000);
    assert_int_equal(fc_calls(&f->fc), before + 1);
    assert_int_equal(fc_log(&f->fc, before).attempt, 3);
    /* And a commit after the restart publishes the original message. */
    assert_int_equal(commit(f, "tx-a", NULL), BRK_OK);
    assert_int_equal(count_id(f, "orders", a.msg_id, NULL), 1);
}

static void restart_keeps_resolved_transactions_resolved(void **state)
{
    fx *f = *state;
    static const brk_check_result commit_now[] = { C_COMMIT };
    fc_script_set(&f->fc, "tx-c", false, commit_now, 1);
    brk_check_policy now = policy(0, 1000, 1, BRK_EXHAUSTED_ROLLBACK, NULL);
    brk_txn_result a = prepare(f, "tx-a", "k", NULL);
    prepare(f, "tx-b", "k", NULL);
    brk_txn_result c = prepare(f, "tx-c", "k", &now);
    prepare(f, "tx-d", "k", &now);      /* UNKNOWN once: expires */
    assert_int_equal(commit(f, "tx-a", NULL), BRK_OK);
    assert_int_equal(rollback(f, "tx-b", NULL), BRK_OK);
    tick(f);
    assert_int_equal(state_of(f, "tx-c"), BRK_TXN_COMMITTED);
    assert_int_equal(state_of(f, "tx-d"), BRK_TXN_ROLLED_BACK);
    restart(f);

    assert_int_equal(stats(f).pending, 0);
    assert_int_equal(state_of(f, "tx-a"), BRK_TXN_COMMITTED);
    assert_int_equal(state_of(f, "tx-b"), BRK_TXN_ROLLED_BACK);
    assert_int_equal(state_of(f, "tx-c"), BRK_TXN_COMMITTED);
    brk_txn_info d = get(f, "tx-d");
    assert_int_equal(d.state, BRK_TXN_ROLLED_BACK);
    assert_true(d.expired);
    brk_txn_result r;
    assert_int_equal(commit(f, "tx-b", &r), BRK_CONFLICT);
    assert_int_equal(r.state, BRK_TXN_ROLLED_BACK);
    assert_int_equal(commit(f, "tx-d", &r), BRK_CONFLICT);
    assert_int_equal(rollback(f, "tx-a", &r), BRK_CONFLICT);
    assert_int_equal(r.state, BRK_TXN_COMMITTED);
    assert_int_equal(rollback(f, "tx-c", &r), BRK_CONFLICT);
    assert_int_equal(commit(f, "tx-a", &r), BRK_OK);
    assert_true(r.replay);
    assert_int_equal(rollback(f, "tx-b", &r), BRK_OK);
    assert_true(r.replay);
    /* Each committed message once; nothing else. */
    assert_int_equal(count_id(f, "orders", a.msg_id, NULL), 1);
    assert_int_equal(count_id(f, "orders", c.msg_id, NULL), 1);
    assert_int_equal(topic_messages(f, "orders"), 2);
    unsigned calls = fc_calls(&f->fc);
    tick_at(f, 3600000);
    assert_int_equal(fc_calls(&f->fc), calls);
}

static void restart_keeps_stuck_transactions_stuck(void **state)
{
    fx *f = *state;
    make_stuck(f, "tx-1");
    restart(f);
    brk_txn_info i = get(f, "tx-1");
    assert_int_equal(i.state, BRK_TXN_PREPARED);
    assert_true(i.stuck);
    assert_int_equal(i.checks, 1);
    assert_int_equal(i.next_check_ms, 0);
    brk_txn_stats s = stats(f);
    assert_int_equal(s.pending, 1);
    assert_int_equal(s.stuck, 1);
    brk_txn_info *list = NULL;
    size_t n = 0;
    assert_int_equal(brk_txn_list(f->t, BRK_TXN_LIST_STUCK, 10, &list, &n), BRK_OK);
    assert_int_equal(n, 1);
    free(list);
    unsigned calls = fc_calls(&f->fc);
    tick_at(f, 3600000);
    assert_int_equal(fc_calls(&f->fc), calls);
    assert_int_equal(commit(f, "tx-1", NULL), BRK_OK);
    assert_int_equal(count_id(f, "orders", i.msg_id, NULL), 1);
}

static void restart_twice_in_a_row_loses_nothing(void **state)
{
    fx *f = *state;
    brk_check_policy pol = policy(1000, 1000, 5, BRK_EXHAUSTED_ROLLBACK, NULL);
    prepare(f, "tx-1", "k", &pol);
    tick_at(f, 1000);
    restart(f);
    restart(f);
    brk_txn_info i = get(f, "tx-1");
    assert_int_equal(i.checks, 1);
    assert_int_equal(i.next_check_ms, T0 + 2000);
    assert_int_equal(stats(f).pending, 1);
}

/* ---- listing and stats ---------------------------------------------------- */

static void list_returns_pending_oldest_first_with_limit(void **state)
{
    fx *f = *state;
    char id[16];
    /* Prepared newest-name-first so that name order is not prepare order. */
    for (int k = 4; k >= 0; k--) {
        snprintf(id, sizeof id, "tx-%d", k);
        prepare(f, id, "k", NULL);
        brk_fake_clock_advance(&f->clk, 10);
    }
    assert_int_equal(commit(f, "tx-3", NULL), BRK_OK);
    brk_txn_info *list = NULL;
    size_t n = 0;
    assert_int_equal(brk_txn_list(f->t, BRK_TXN_LIST_PREPARED, 3, &list, &n), BRK_OK);
    assert_int_equal(n, 3);
    assert_string_equal(list[0].txid, "tx-4");
    assert_string_equal(list[1].txid, "tx-2");
    assert_string_equal(list[2].txid, "tx-1");
    assert_int_equal(list[0].prepared_ms, T0);
    assert_int_equal(list[1].prepared_ms, T0 + 20);
    assert_int_equal(list[2].prepared_ms, T0 + 30);
    assert_int_equal(list[0].state, BRK_TXN_PREPARED);
    free(list);
    list = NULL;
    assert_int_equal(brk_txn_list(f->t, BRK_TXN_LIST_PREPARED, 100, &list, &n), BRK_OK);
    assert_int_equal(n, 4);
    assert_string_equal(list[3].txid, "tx-0");
    free(list);
    list = NULL;
    assert_int_equal(brk_txn_list(f->t, BRK_TXN_LIST_STUCK, 100, &list, &n), BRK_OK);
    assert_int_equal(n, 0);
    free(list);
}

static void list_stuck_returns_only_stuck_ones(void **state)
{
    fx *f = *state;
    prepare(f, "plain-1", "k", NULL);
    brk_fake_clock_advance(&f->clk, 10);
    make_stuck(f, "stuck-1");
    brk_fake_clock_advance(&f->clk, 10);
    prepare(f, "plain-2", "k", NULL);
    brk_fake_clock_advance(&f->clk, 10);
    make_stuck(f, "stuck-2");
    brk_txn_info *list = NULL;
    size_t n = 0;
    assert_int_equal(brk_txn_list(f->t, BRK_TXN_LIST_STUCK, 100, &list, &n), BRK_OK);
    assert_int_equal(n, 2);
    assert_string_equal(list[0].txid, "stuck-1");
    assert_string_equal(list[1].txid, "stuck-2");
    assert_true(list[0].stuck && list[1].stuck);
    free(list);
    list = NULL;
    assert_int_equal(brk_txn_list(f->t, BRK_TXN_LIST_PREPARED, 100, &list, &n), BRK_OK);
    assert_int_equal(n, 4);
    free(list);
    brk_txn_stats s = stats(f);
    assert_int_equal(s.pending, 4);
    assert_int_equal(s.stuck, 2);
}

static void stats_count_verdicts_checks_and_pending(void **state)
{
    fx *f = *state;
    static const brk_check_result c_commit[] = { C_COMMIT };
    static const brk_check_result c_rollback[] = { C_ROLLBACK };
    static const brk_check_result c_err_unknown[] = { C_ERROR, C_UNKNOWN };
    fc_script_set(&f->fc, "by-check-commit", false, c_commit, 1);
    fc_script_set(&f->fc, "by-check-rollback", false, c_rollback, 1);
    fc_script_set(&f->fc, "expires", true, c_err_unknown, 2);
    brk_check_policy now = policy(0, 1000, 1, BRK_EXHAUSTED_ROLLBACK, NULL);
    brk_txn_stats s = stats(f);
    assert_int_equal(s.pending, 0);
    assert_int_equal(s.oldest_pending_ms, 0);

    prepare(f, "waits", "k", NULL);               /* stays pending */
    brk_fake_clock_advance(&f->clk, 5);
    prepare(f, "client-commit", "k", NULL);
    prepare(f, "client-rollback", "k", NULL);
    prepare(f, "by-check-commit", "k", &now);
    prepare(f, "by-check-rollback", "k", &now);
    prepare(f, "expires", "k", &now);
    s = stats(f);
    assert_int_equal(s.pending, 6);
    assert_int_equal(s.prepared_total, 6);
    assert_int_equal(s.oldest_pending_ms, T0);
    assert_true(s.memory_bytes > 0);

    assert_int_equal(commit(f, "client-commit", NULL), BRK_OK);
    assert_int_equal(rollback(f, "client-rollback", NULL), BRK_OK);
    tick(f);                                      /* COMMIT, ROLLBACK, ERROR */
    tick_at(f, 600000);                           /* UNKNOWN: expires */
    s = stats(f);
    assert_int_equal(s.pending, 1);
    assert_int_equal(s.stuck, 0);
    assert_int_equal(s.checking, 0);
    assert_int_equal(s.oldest_pending_ms, T0);
    assert_int_equal(s.prepared_total, 6);
    assert_int_equal(s.committed_total, 2);
    assert_int_equal(s.rolled_back_total, 3);
    assert_int_equal(s.expired_total, 1);
    assert_int_equal(s.checks_commit_total, 1);
    assert_int_equal(s.checks_rollback_total, 1);
    /* "waits" (due at 6 s) was checked once at 600 s too. */
    assert_int_equal(fc_calls(&f->fc), 5);
    assert_int_equal(s.checks_unknown_total, 2);
    assert_int_equal(s.checks_error_total, 1);
    /* Replays and conflicts count nothing. */
    assert_int_equal(commit(f, "client-commit", NULL), BRK_OK);
    assert_int_equal(commit(f, "client-rollback", NULL), BRK_CONFLICT);
    brk_txn_stats s2 = stats(f);
    assert_int_equal(s2.committed_total, 2);
    assert_int_equal(s2.rolled_back_total, 3);
    /* Resolving the last one empties the pending set. */
    assert_int_equal(rollback(f, "waits", NULL), BRK_OK);
    s2 = stats(f);
    assert_int_equal(s2.pending, 0);
    assert_int_equal(s2.oldest_pending_ms, 0);
}

/* ---- input validation ----------------------------------------------------- */

static void txid_longer_than_128_bytes_is_invalid(void **state)
{
    fx *f = *state;
    char id[BRK_TXID_MAX + 2];
    memset(id, 'a', sizeof id - 1);
    id[sizeof id - 1] = '\0';                     /* 129 bytes */
    assert_int_equal(prepare_st(f, id, "orders", "k", "b", NULL, NULL), BRK_INVAL);
    id[BRK_TXID_MAX] = '\0';                      /* 128 bytes: fine */
    brk_txn_result r;
    assert_int_equal(prepare_st(f, id, "orders", "k", "b", NULL, &r), BRK_OK);
    assert_string_equal(r.txid, id);
    assert_int_equal(state_of(f, id), BRK_TXN_PREPARED);
}

static void txid_with_non_printable_bytes_is_invalid(void **state)
{
    fx *f = *state;
    static const char *const bad[] = { "tx 1", "tx\t1", "tx\x01", "tx\x7f",
                                       "caf\xc3\xa9", "\x1ftx" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (prepare_st(f, bad[i], "orders", "k", "b", NULL, NULL) != BRK_INVAL)
            fail_msg("txid #%zu was accepted", i);
    assert_int_equal(stats(f).pending, 0);
    /* Every printable ASCII byte but space is allowed. */
    assert_int_equal(prepare_st(f, "!~{}:/@#-_.", "orders", "k", "b", NULL, NULL),
                     BRK_OK);
}

static void empty_topic_is_invalid(void **state)
{
    fx *f = *state;
    assert_int_equal(prepare_st(f, "tx-1", "", "k", "b", NULL, NULL), BRK_INVAL);
    assert_int_equal(prepare_st(f, "tx-1", NULL, "k", "b", NULL, NULL), BRK_INVAL);
}

static void internal_topic_is_invalid(void **state)
{
    fx *f = *state;
    assert_int_equal(brk_topic_create(f->s, "__x", 1), BRK_OK);
    assert_int_equal(prepare_st(f, "tx-1", "__x", "k", "b", NULL, NULL), BRK_INVAL);
    assert_int_equal(prepare_st(f, "tx-2", BRK_TXN_HALF_TOPIC, "k", "b", NULL, NULL),
                     BRK_INVAL);
    assert_int_equal(prepare_st(f, "tx-3", "bad topic", "k", "b", NULL, NULL),
                     BRK_INVAL);
    assert_int_equal(stats(f).pending, 0);
}

static void unknown_topic_is_notfound(void **state)
{
    fx *f = *state;
    assert_int_equal(prepare_st(f, "tx-1", "nosuch", "k", "b", NULL, NULL),
                     BRK_NOTFOUND);
    assert_int_equal(stats(f).pending, 0);
}

static void system_properties_are_invalid(void **state)
{
    fx *f = *state;
    brk_prop props[2] = {
        { { "x-user", 6 }, { "alice", 5 } },
        { { "\x1ftopic", 6 }, { "other", 5 } },
    };
    uint8_t pbuf[128];
    size_t plen = 0;
    assert_int_equal(brk_props_encode(props, 2, pbuf, sizeof pbuf, &plen), BRK_OK);
    brk_txn_prepare_req r;
    req_init(&r, "tx-1", "orders", "k", "b", NULL);
    r.props = (brk_bytes){ pbuf, plen };
    brk_txn_result res;
    assert_int_equal(brk_txn_prepare(f->t, &r, &res), BRK_INVAL);
    /* A malformed block is refused too. */
    r.props = (brk_bytes){ "\x05\x00garbage", 9 };
    assert_int_equal(brk_txn_prepare(f->t, &r, &res), BRK_INVAL);
    assert_int_equal(stats(f).pending, 0);
}

static void delay_and_deliver_at_together_are_invalid(void **state)
{
    fx *f = *state;
    f->with_delay = true;
    restart(f);
    brk_txn_prepare_req r;
    req_init(&r, "tx-1", "orders", "k", "b", NULL);
    r.delay_ms = 1000;
    r.deliver_at_ms = T0 + 5000;
    brk_txn_result res;
    assert_int_equal(brk_txn_prepare(f->t, &r, &res), BRK_INVAL);
    assert_int_equal(stats(f).pending, 0);
}

static void unknown_flags_are_invalid(void **state)
{
    fx *f = *state;
    brk_txn_prepare_req r;
    req_init(&r, "tx-1", "orders", "k", "b", NULL);
    r.flags = 1u << 7;
    brk_txn_result res;
    assert_int_equal(brk_txn_prepare(f->t, &r, &res), BRK_INVAL);
}

/* ---- delayed commits ------------------------------------------------------ */

static void delayed_commit_waits_in_the_delay_scheduler_until_due(void **state)
{
    fx *f = *state;
    f->with_delay = true;
    restart(f);
    brk_txn_prepare_req r;
    req_init(&r, "tx-1", "orders", "k", "later", NULL);
    r.delay_ms = 30000;
    brk_txn_result p;
    assert_int_equal(brk_txn_prepare(f->t, &r, &p), BRK_OK);
    brk_fake_clock_advance(&f->clk, 1000);
    brk_txn_result c;
    assert_int_equal(commit(f, "tx-1", &c), BRK_OK);
    assert_int_equal(c.state, BRK_TXN_COMMITTED);
    assert_true(c.delayed);
    assert_int_equal(c.deliver_at_ms, T0 + 1000 + 30000);
    assert_int_equal(state_of(f, "tx-1"), BRK_TXN_COMMITTED);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 0);
    unsigned fired = 99;
    brk_fake_clock_advance(&f->clk, 29999);
    assert_int_equal(brk_delay_tick(f->d, &fired), BRK_OK);
    assert_int_equal(fired, 0);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 0);
    brk_fake_clock_advance(&f->clk, 1);
    assert_int_equal(brk_delay_tick(f->d, &fired), BRK_OK);
    assert_int_equal(fired, 1);
    rec_copy m;
    assert_int_equal(count_id(f, "orders", p.msg_id, &m), 1);
    assert_string_equal(m.body, "later");
    assert_false(props_have_sys(m.props, m.props_len));
    /* A commit replay does not schedule it again. */
    assert_int_equal(commit(f, "tx-1", &c), BRK_OK);
    assert_true(c.replay);
    brk_fake_clock_advance(&f->clk, 100000);
    assert_int_equal(brk_delay_tick(f->d, &fired), BRK_OK);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 1);
}

static void deliver_at_already_passed_at_commit_publishes_at_once(void **state)
{
    fx *f = *state;
    f->with_delay = true;
    restart(f);
    brk_txn_prepare_req r;
    req_init(&r, "tx-1", "orders", "k", "soon", NULL);
    r.deliver_at_ms = T0 + 5000;
    brk_txn_result p;
    assert_int_equal(brk_txn_prepare(f->t, &r, &p), BRK_OK);
    brk_fake_clock_advance(&f->clk, 10000);
    brk_txn_result c;
    assert_int_equal(commit(f, "tx-1", &c), BRK_OK);
    assert_false(c.delayed);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 1);
}

static void deliver_at_in_the_future_waits_until_then(void **state)
{
    fx *f = *state;
    f->with_delay = true;
    restart(f);
    brk_txn_prepare_req r;
    req_init(&r, "tx-1", "orders", "k", "at", NULL);
    r.deliver_at_ms = T0 + 50000;
    brk_txn_result p;
    assert_int_equal(brk_txn_prepare(f->t, &r, &p), BRK_OK);
    brk_fake_clock_advance(&f->clk, 1000);
    brk_txn_result c;
    assert_int_equal(commit(f, "tx-1", &c), BRK_OK);
    assert_true(c.delayed);
    assert_int_equal(c.deliver_at_ms, T0 + 50000);
    brk_fake_clock_advance(&f->clk, 48999);
    assert_int_equal(brk_delay_tick(f->d, NULL), BRK_OK);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 0);
    brk_fake_clock_advance(&f->clk, 1);
    assert_int_equal(brk_delay_tick(f->d, NULL), BRK_OK);
    assert_int_equal(count_id(f, "orders", p.msg_id, NULL), 1);
}

static void delayed_prepare_without_a_delay_scheduler_is_refused(void **state)
{
    fx *f = *state;
    brk_txn_prepare_req r;
    req_init(&r, "tx-1", "orders", "k", "b", NULL);
    r.delay_ms = 1000;
    brk_txn_result res;
    assert_int_equal(brk_txn_prepare(f->t, &r, &res), BRK_INVAL);
    assert_int_equal(stats(f).pending, 0);
}

static void delay_beyond_the_schedulers_maximum_is_refused_at_prepare(void **state)
{
    fx *f = *state;
    f->with_delay = true;
    f->dopts.max_delay_ms = 3600000;
    restart(f);
    brk_txn_prepare_req r;
    req_init(&r, "tx-1", "orders", "k", "b", NULL);
    r.delay_ms = 3600001;
    brk_txn_result res;
    assert_int_equal(brk_txn_prepare(f->t, &r, &res), BRK_RANGE);
    req_init(&r, "tx-2", "orders", "k", "b", NULL);
    r.deliver_at_ms = T0 + 2 * 3600000;
    assert_int_equal(brk_txn_prepare(f->t, &r, &res), BRK_RANGE);
    assert_int_equal(stats(f).pending, 0);
    /* At the limit it is accepted, and the commit is delayed by it. */
    req_init(&r, "tx-3", "orders", "k", "b", NULL);
    r.delay_ms = 3600000;
    assert_int_equal(brk_txn_prepare(f->t, &r, &res), BRK_OK);
    assert_int_equal(commit(f, "tx-3", &res), BRK_OK);
    assert_true(res.delayed);
    assert_int_equal(res.deliver_at_ms, T0 + 3600000);
}

/* ---- memory --------------------------------------------------------------- */

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define MEM_PENDING 10000
#else
#define MEM_PENDING 100000
#endif

static void memory_per_pending_transaction_is_at_most_128_bytes(void **state)
{
    fx *f = *state;
    /* ASYNC: this measures memory, not 100 000 simulated fdatasyncs. */
    f->so.flush_mode = BRK_FLUSH_ASYNC;
    restart(f);
    brk_txn_stats s0 = stats(f);
    char id[32];
    brk_txn_prepare_req r;
    brk_txn_result res;
    for (int i = 0; i < MEM_PENDING; i++) {
        snprintf(id, sizeof id, "outbox-%08d", i);
        req_init(&r, id, "orders", id + 7, "{\"order\":1}", NULL);
        brk_status st = brk_txn_prepare(f->t, &r, &res);
        if (st != BRK_OK)
            fail_msg("prepare %d: %s", i, brk_status_name(st));
    }
    brk_txn_stats s = stats(f);
    assert_int_equal(s.pending, MEM_PENDING);
    double per = (double)(s.memory_bytes - s0.memory_bytes) / (double)s.pending;
    double per_total = (double)s.memory_bytes / (double)s.pending;
    print_message("memory: %d pending, %llu bytes, %.1f bytes per pending "
                  "transaction\n", MEM_PENDING,
                  (unsigned long long)s.memory_bytes, per_total);
    assert_true(per > 0);
    if (per_total > 128.0)
        fail_msg("%.1f bytes per pending transaction (limit 128)", per_total);
}

/* ---- concurrency ---------------------------------------------------------- */

#define CC_THREADS 4
#define CC_PER     150

typedef struct cc_txn {
    char txid[32];
    uint8_t msg_id[BRK_UUID_LEN];
    bool prepared;
    int verdict;                /* 0 none, 1 commit, 2 rollback */
    brk_status vst;
    brk_txn_state vstate;
} cc_txn;

typedef struct cc_ctx {
    fx *f;
    cc_txn txns[CC_THREADS][CC_PER];
    atomic_int clients_done;
    atomic_bool stop_ticker;
    brk_status tick_err;
} cc_ctx;

typedef struct cc_arg {
    cc_ctx *cc;
    int id;
} cc_arg;

static void *cc_client(void *arg)
{
    cc_arg *a = arg;
    cc_ctx *cc = a->cc;
    uint64_t rng = 777 + (uint64_t)a->id;
    brk_check_policy pol = policy(20, 20, 3, BRK_EXHAUSTED_ROLLBACK, NULL);
    for (int i = 0; i < CC_PER; i++) {
        cc_txn *x = &cc->txns[a->id][i];
        snprintf(x->txid, sizeof x->txid, "c%d-%d", a->id, i);
        brk_txn_prepare_req r;
        char key[8];
        snprintf(key, sizeof key, "k%d", (int)(rng_next(&rng) % 8));
        req_init(&r, x->txid, "orders", key, x->txid, &pol);
        brk_txn_result res;
        memset(&res, 0, sizeof res);
        if (brk_txn_prepare(cc->f->t, &r, &res) != BRK_OK)
            continue;
        x->prepared = true;
        memcpy(x->msg_id, res.msg_id, BRK_UUID_LEN);
        /* Resolve an earlier one of ours, maybe racing its check. */
        int j = (int)(rng_next(&rng) % (uint64_t)(i + 1));
        cc_txn *y = &cc->txns[a->id][j];
        unsigned d = (unsigned)(rng_next(&rng) % 10);
        if (y->prepared && y->verdict == 0 && d < 7) {
            y->verdict = d < 4 ? 1 : 2;
            y->vst = y->verdict == 1 ? brk_txn_commit(cc->f->t, y->txid, &res)
                                     : brk_txn_rollback(cc->f->t, y->txid, &res);
            y->vstate = res.state;
        }
    }
    atomic_fetch_add(&cc->clients_done, 1);
    return NULL;
}

static void *cc_ticker(void *arg)
{
    cc_ctx *cc = arg;
    while (!atomic_load(&cc->stop_ticker)) {
        brk_fake_clock_advance(&cc->f->clk, 7);
        brk_status st = brk_txn_tick(cc->f->t);
        if (st != BRK_OK && cc->tick_err == BRK_OK)
            cc->tick_err = st;
        if (atomic_load(&cc->clients_done) == CC_THREADS)
            break;
    }
    return NULL;
}

typedef struct id_list {
    uint8_t (*ids)[BRK_UUID_LEN];
    size_t n, cap;
} id_list;

static void collect_id(void *arg, const brk_record *r)
{
    id_list *l = arg;
    if (l->n < l->cap)
        memcpy(l->ids[l->n], r->msg_id, BRK_UUID_LEN);
    l->n++;
}

static void concurrent_prepares_verdicts_and_checks_end_consistent(void **state)
{
    fx *f = *state;
    f->to.workers = 4;
    f->to.error_backoff_min_ms = 10;
    f->to.error_backoff_max_ms = 40;
    restart(f);
    pthread_mutex_lock(&f->fc.mu);
    f->fc.random = true;
    pthread_mutex_unlock(&f->fc.mu);
    static cc_ctx cc;
    memset(&cc, 0, sizeof cc);
    cc.f = f;
    atomic_init(&cc.clients_done, 0);
    atomic_init(&cc.stop_ticker, false);
    pthread_t clients[CC_THREADS], ticker;
    cc_arg args[CC_THREADS];
    assert_int_equal(pthread_create(&ticker, NULL, cc_ticker, &cc), 0);
    for (int i = 0; i < CC_THREADS; i++) {
        args[i] = (cc_arg){ &cc, i };
        assert_int_equal(pthread_create(&clients[i], NULL, cc_client, &args[i]), 0);
    }
    for (int i = 0; i < CC_THREADS; i++)
        pthread_join(clients[i], NULL);
    atomic_store(&cc.stop_ticker, true);
    pthread_join(ticker, NULL);
    assert_int_equal(cc.tick_err, BRK_OK);
    /* Let the checks run the rest out: 3 UNKNOWN at most, then rollback. */
    for (int k = 0; k < 20000 && stats(f).pending > 0; k++)
        tick_at(f, clock_now(&f->clk) - T0 + 10);
    brk_txn_stats s = stats(f);
    assert_int_equal(s.pending, 0);
    assert_int_equal(s.checking, 0);

    static uint8_t ids[CC_THREADS * CC_PER * 2][BRK_UUID_LEN];
    id_list l = { ids, 0, sizeof ids / sizeof ids[0] };
    scan_topic(f->s, "orders", collect_id, &l);
    assert_true(l.n <= l.cap);
    size_t committed = 0, rolled = 0, prepared = 0;
    for (int t = 0; t < CC_THREADS; t++) {
        for (int i = 0; i < CC_PER; i++) {
            cc_txn *x = &cc.txns[t][i];
            if (!x->prepared)
                continue;
            prepared++;
            brk_txn_info info = get(f, x->txid);
            size_t n = 0;
            for (size_t k = 0; k < l.n; k++)
                n += memcmp(ids[k], x->msg_id, BRK_UUID_LEN) == 0;
            if (info.state == BRK_TXN_COMMITTED) {
                committed++;
                if (n != 1)
                    fail_msg("%s committed, message %zu times", x->txid, n);
            } else if (info.state == BRK_TXN_ROLLED_BACK) {
                rolled++;
                if (n != 0)
                    fail_msg("%s rolled back, message %zu times", x->txid, n);
            } else {
                fail_msg("%s still %s", x->txid, brk_txn_state_name(info.state));
            }
            /* What the client was told agrees with the end state. */
            if (x->verdict) {
                brk_txn_state asked = x->verdict == 1 ? BRK_TXN_COMMITTED
                                                      : BRK_TXN_ROLLED_BACK;
                if (x->vst == BRK_OK) {
                    if (info.state != asked || x->vstate != asked)
                        fail_msg("%s: verdict OK but state %s", x->txid,
                                 brk_txn_state_name(info.state));
                } else if (x->vst == BRK_CONFLICT) {
                    if (info.state == asked || x->vstate != info.state)
                        fail_msg("%s: CONFLICT but state %s (told %s)", x->txid,
                                 brk_txn_state_name(info.state),
                                 brk_txn_state_name(x->vstate));
                } else {
                    fail_msg("%s: verdict %s", x->txid, brk_status_name(x->vst));
                }
            }
        }
    }
    assert_int_equal(prepared, CC_THREADS * CC_PER);
    assert_int_equal(l.n, committed);
    assert_int_equal(s.committed_total, committed);
    assert_int_equal(s.rolled_back_total, rolled);
    print_message("concurrent: %zu committed, %zu rolled back, %u checks\n",
                  committed, rolled, fc_calls(&f->fc));
}

/* ---- the background scheduler --------------------------------------------- */

static double elapsed_s(const struct timespec *a)
{
    struct timespec b;
    clock_gettime(CLOCK_MONOTONIC, &b);
    return (double)(b.tv_sec - a->tv_sec) + (double)(b.tv_nsec - a->tv_nsec) / 1e9;
}

/* Without tick(): the scheduler thread dispatches due checks by itself, and
 * keeps doing so when more are due than the queue holds: a full queue must
 * not make it sleep until the next state save (it would then dispatch at
 * most max_queued_checks per state_interval_ms).  Real time, generous
 * bounds: 40 checks through a 4-slot queue must take well under 3 s. */
static void background_scheduler_keeps_dispatching_when_the_queue_fills(void **state)
{
    fx *f = *state;
    f->to.no_background = false;
    f->to.max_queued_checks = 4;
    f->to.workers = 2;
    restart(f);
    fc_set_default(&f->fc, C_COMMIT);
    brk_check_policy now = policy(0, 1000, 3, BRK_EXHAUSTED_ROLLBACK, NULL);
    char id[16];
    /* Hold the first checks so the queue is surely full, then let go. */
    fc_hold(&f->fc);
    for (int i = 0; i < 40; i++) {
        snprintf(id, sizeof id, "bg-%d", i);
        prepare(f, id, NULL, &now);
    }
    if (!fc_wait_held(&f->fc, 2))
        fail_msg("the scheduler thread dispatched nothing");
    struct timespec settle = { 0, 50 * 1000000L };
    nanosleep(&settle, NULL);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    fc_release(&f->fc, C_COMMIT);
    while (stats(f).pending > 0 && elapsed_s(&t0) < 20) {
        struct timespec nap = { 0, 5 * 1000000L };
        nanosleep(&nap, NULL);
    }
    double took = elapsed_s(&t0);
    brk_txn_stats s = stats(f);
    print_message("background: %llu of 40 resolved in %.2f s\n",
                  (unsigned long long)s.committed_total, took);
    assert_int_equal(s.pending, 0);
    assert_int_equal(s.committed_total, 40);
    if (took > 3.0)
        fail_msg("40 due checks through a 4-slot queue took %.2f s after "
                 "the checker was released", took);
    assert_int_equal(fc_calls(&f->fc), 40);
}

/* ---- misc ----------------------------------------------------------------- */

static void state_names_use_the_http_spelling(void **state)
{
    (void)state;
    assert_string_equal(brk_txn_state_name(BRK_TXN_PREPARED), "prepared");
    assert_string_equal(brk_txn_state_name(BRK_TXN_COMMITTED), "committed");
    assert_string_equal(brk_txn_state_name(BRK_TXN_ROLLED_BACK), "rolled_back");
}

/* ---- compaction and forgetting -------------------------------------------- */

static void fill_log(fx *f, int n)
{
    char body[200];
    memset(body, 'f', sizeof body);
    for (int i = 0; i < n; i++) {
        brk_append_req r;
        memset(&r, 0, sizeof r);
        r.topic = "other";
        r.queue = -1;
        r.body = (brk_bytes){ body, sizeof body };
        brk_append_res res;
        assert_int_equal(brk_store_append(f->s, &r, &res), BRK_OK);
    }
}

static void held_transaction_is_copied_forward_so_retention_frees_its_segment(void **state)
{
    fx *f = *state;
    f->so.segment_bytes = 4096;
    f->so.retention_ms = 60000;
    f->to.compact_after_ms = 3600000;
    restart(f);
    fc_set_default(&f->fc, C_UNKNOWN);
    brk_check_policy hold = policy(10000, 10000, 2, BRK_EXHAUSTED_HOLD, NULL);
    brk_txn_result held = prepare(f, "held", "k-held", &hold);
    tick_at(f, 10000);
    tick_at(f, 20000);
    assert_true(get(f, "held").stuck);
    fill_log(f, 100);                       /* several 4 KiB segments */
    brk_store_stats before;
    brk_store_get_stats(f->s, &before);
    assert_true(before.segments > 3);

    /* An hour later its half record is old: the tick copies it. */
    tick_at(f, 3600000 + 30000);
    assert_true(stats(f).compacted_total >= 1);
    fill_log(f, 20);                        /* roll past the copy's segment */
    tick_at(f, 3600000 + 32000);            /* state saved, cursor moved */
    unsigned deleted = 0;
    assert_int_equal(brk_store_retention_run(f->s, &deleted), BRK_OK);
    assert_true(deleted >= 1);
    brk_store_stats after;
    brk_store_get_stats(f->s, &after);
    assert_true(after.log_start > 0);       /* the prepare's segment is gone */

    brk_txn_info i = get(f, "held");
    assert_int_equal(i.state, BRK_TXN_PREPARED);
    assert_true(i.stuck);
    assert_int_equal(i.checks, 2);
    assert_int_equal(i.prepared_ms, T0);
    assert_memory_equal(i.msg_id, held.msg_id, BRK_UUID_LEN);

    /* And after a restart it is rebuilt from the copy alone. */
    restart(f);
    i = get(f, "held");
    assert_int_equal(i.state, BRK_TXN_PREPARED);
    assert_true(i.stuck);
    assert_int_equal(i.checks, 2);
    assert_int_equal(i.prepared_ms, T0);
    assert_int_equal(commit(f, "held", NULL), BRK_OK);
    assert_int_equal(count_id(f, "orders", held.msg_id, NULL), 1);
}

static void compaction_copy_keeps_check_count_and_next_check_across_restart(void **state)
{
    fx *f = *state;
    f->to.compact_after_ms = 100000;
    restart(f);
    fc_set_default(&f->fc, C_UNKNOWN);
    brk_check_policy slow = policy(50000, 300000, 10, BRK_EXHAUSTED_ROLLBACK,
                                   NULL);
    prepare(f, "slow", "k", &slow);
    tick_at(f, 50000);                      /* check 1, next at 350 s */
    assert_int_equal(get(f, "slow").checks, 1);
    tick_at(f, 200000);                     /* old enough: copied */
    assert_int_equal(stats(f).compacted_total, 1);
    tick_at(f, 201000);                     /* not copied again */
    assert_int_equal(stats(f).compacted_total, 1);
    restart(f);
    brk_txn_info i = get(f, "slow");
    assert_int_equal(i.checks, 1);
    assert_int_equal(i.next_check_ms, T0 + 350000);
    tick_at(f, 349000);
    assert_int_equal(get(f, "slow").checks, 1);
    tick_at(f, 350000);
    assert_int_equal(get(f, "slow").checks, 2);
}

static void resolved_transactions_are_forgotten_after_resolved_keep_ms(void **state)
{
    fx *f = *state;
    f->to.resolved_keep_ms = 60000;
    restart(f);
    prepare(f, "old", "k", NULL);
    assert_int_equal(commit(f, "old", NULL), BRK_OK);
    tick_at(f, 30000);
    brk_txn_result res;
    assert_int_equal(commit(f, "old", &res), BRK_OK);      /* still a replay */
    assert_true(res.replay);
    tick_at(f, 120000);
    assert_int_equal(commit(f, "old", NULL), BRK_NOTFOUND);
    assert_int_equal(rollback(f, "old", NULL), BRK_NOTFOUND);
    /* Forgotten across a restart as well (rebuild drops it too). */
    restart(f);
    assert_int_equal(commit(f, "old", NULL), BRK_NOTFOUND);
}

static void internal_topics_exist_after_open(void **state)
{
    fx *f = *state;
    brk_topic_info ti;
    assert_int_equal(brk_topic_get(f->s, BRK_TXN_HALF_TOPIC, &ti), BRK_OK);
    assert_int_equal(brk_topic_get(f->s, BRK_TXN_OP_TOPIC, &ti), BRK_OK);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        /* allowed arrows */
        T(prepare_leaves_the_transaction_prepared),
        T(prepared_to_committed_by_client_commit),
        T(prepared_to_rolled_back_by_client_rollback),
        T(prepared_to_committed_by_check_commit),
        T(prepared_to_rolled_back_by_check_rollback),
        T(check_unknown_keeps_prepared_and_counts_one_check),
        T(exhausted_checks_with_rollback_expire_the_transaction),
        T(exhausted_checks_with_hold_leave_it_stuck),
        T(stuck_to_committed_by_client_commit),
        T(stuck_to_rolled_back_by_client_rollback),
        /* forbidden arrows */
        T(commit_after_rollback_is_conflict_and_publishes_nothing),
        T(rollback_after_commit_is_conflict_and_keeps_the_message),
        T(check_commit_after_client_rollback_does_nothing),
        T(check_rollback_after_client_commit_does_nothing),
        T(client_commit_wins_over_a_check_in_flight_answering_rollback),
        T(client_rollback_wins_over_a_check_in_flight_answering_commit),
        /* idempotency */
        T(commit_twice_is_a_replay_and_publishes_once),
        T(rollback_twice_is_a_replay),
        T(prepare_again_with_same_content_is_a_replay_with_same_msg_id),
        T(prepare_replay_after_commit_reports_committed),
        T(prepare_same_txid_other_body_is_conflict),
        T(prepare_same_txid_other_topic_is_conflict),
        T(prepare_same_txid_other_key_is_conflict),
        T(prepare_without_txid_generates_unique_ones),
        T(verdict_on_unknown_txid_is_notfound),
        /* the committed message */
        T(committed_message_keeps_id_queue_tag_headers_body_flags_born),
        T(committed_message_without_born_ms_is_born_at_prepare),
        T(half_message_is_invisible_before_commit),
        /* the checker */
        T(checker_sees_txid_topic_key_headers_msg_id_and_attempt),
        T(checker_runs_on_a_worker_thread),
        T(checker_error_during_a_long_outage_never_rolls_back_and_backs_off),
        T(error_retry_asks_the_same_attempt_and_unknown_resets_errors),
        T(slow_checker_does_not_block_commit_of_another_txid),
        /* policies */
        cmocka_unit_test(policy_init_gives_the_rocketmq_defaults),
        T(default_policy_checks_at_6s_then_every_60s_and_rolls_back_after_15),
        T(custom_policy_sets_check_times_count_and_action),
        T(default_policy_from_opts_applies_when_prepare_gives_none),
        T(policy_with_zero_interval_is_invalid),
        T(policy_with_zero_max_checks_is_invalid),
        T(policy_hold_with_expiry_topic_is_invalid),
        T(policy_with_bad_expiry_topic_name_is_invalid),
        T(policy_with_unknown_action_is_invalid),
        T(invalid_default_policy_is_refused_at_open),
        T(exhaustion_with_expiry_topic_publishes_one_expiry_message),
        T(client_rollback_publishes_no_expiry_message),
        /* payment timeout */
        T(payment_paid_at_fourth_check_is_committed_without_expiry),
        T(payment_paid_at_fourth_check_across_a_restart),
        T(payment_never_paid_expires_at_ten_minutes_with_one_expiry_message),
        T(payment_never_paid_expires_on_time_across_a_restart),
        /* restart */
        T(restart_keeps_pending_checks_and_next_check_time),
        T(restart_keeps_resolved_transactions_resolved),
        T(restart_keeps_stuck_transactions_stuck),
        T(restart_twice_in_a_row_loses_nothing),
        /* listing and stats */
        T(list_returns_pending_oldest_first_with_limit),
        T(list_stuck_returns_only_stuck_ones),
        T(stats_count_verdicts_checks_and_pending),
        /* input validation */
        T(txid_longer_than_128_bytes_is_invalid),
        T(txid_with_non_printable_bytes_is_invalid),
        T(empty_topic_is_invalid),
        T(internal_topic_is_invalid),
        T(unknown_topic_is_notfound),
        T(system_properties_are_invalid),
        T(delay_and_deliver_at_together_are_invalid),
        T(unknown_flags_are_invalid),
        /* delayed commits */
        T(delayed_commit_waits_in_the_delay_scheduler_until_due),
        T(deliver_at_already_passed_at_commit_publishes_at_once),
        T(deliver_at_in_the_future_waits_until_then),
        T(delayed_prepare_without_a_delay_scheduler_is_refused),
        T(delay_beyond_the_schedulers_maximum_is_refused_at_prepare),
        /* memory */
        T(memory_per_pending_transaction_is_at_most_128_bytes),
        /* concurrency */
        T(concurrent_prepares_verdicts_and_checks_end_consistent),
        /* background scheduler */
        T(background_scheduler_keeps_dispatching_when_the_queue_fills),
        /* misc */
        cmocka_unit_test(state_names_use_the_http_spelling),
        T(internal_topics_exist_after_open),
        T(held_transaction_is_copied_forward_so_retention_frees_its_segment),
        T(compaction_copy_keeps_check_count_and_next_check_across_restart),
        T(resolved_transactions_are_forgotten_after_resolved_keep_ms),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
