/*
 * txn_demo.c - an order service's walk-through of broker_core's
 * transactions (half messages, check-backs) and delayed delivery.
 *
 *   txn_demo <empty directory>            (`make demo` passes a fresh mktemp -d)
 *
 * Everything runs in this process, on a real store in <dir>/store, with the
 * system clock and the background threads of the transaction and delay
 * schedulers.  The check-back policies are short (a first check after
 * 200 ms, then every 200 ms) so the whole tour takes a few seconds.
 *
 * The check-back asks an "orders table": a small in-memory map, txid ->
 * pending / paid / cancelled / unreachable, guarded by a mutex.  It stands
 * in for the order service's PostgreSQL table; the real SQL checker comes
 * with issue 6.  The txid of each transaction is the order id.
 *
 * Scenes:
 *   1. happy path: prepare, invisible, commit, visible once; replay; CONFLICT;
 *   2. lost verdict: the app "crashes" after its database said paid; the
 *      check-back commits;
 *   3. rollback: nothing is published; a later commit is a CONFLICT;
 *   4. payment timeout: 5 checks answered "pending", then rollback and an
 *      expiry event in "payment-expired";
 *   5. paid in time: the third check sees "paid" and commits;
 *   6. database outage: ERROR answers are retried and never counted;
 *   7. delayed delivery: brk_delay_send, level 1 (1 s) and 300 ms;
 *   8. restart: close everything, reopen; the pending transaction keeps its
 *      check count and next check, old verdicts still replay, a delayed
 *      message still fires once.
 *
 * Every "[ok]" line is a check the program made; a failed check prints
 * "[FAILED]" and the program exits 1.  Exit 2 means the demo could not run
 * (bad arguments).  Waits poll for the expected state with a deadline of
 * WAIT_MS, so a slow machine only makes the demo slower, not wrong.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "demo_util.h"
#include "broker/clock.h"
#include "broker/delay.h"
#include "broker/record.h"
#include "broker/status.h"
#include "broker/store.h"
#include "broker/txn.h"
#include "broker/uuid.h"

#define PATH_CAP  2048      /* longest store path this demo handles */
#define WAIT_MS   20000     /* deadline of every wait; reached only on failure */
#define POLL_MS   10

/* The check-back policies of the demo (a real daemon uses seconds and
 * minutes; see brk_check_policy in broker/txn.h). */
#define FAST_FIRST_MS    200
#define FAST_INTERVAL_MS 200
#define FAST_MAX_CHECKS  5
#define OUTAGE_MS        1500
#define EXPIRY_TOPIC     "payment-expired"

/* ---- checks: demo_check() and the rest are in demo_util.h -------------------- */

/* Wall time as the store sees it (the same clock stamps every record). */
static int64_t wall_ms(void)
{
    const brk_clock *c = brk_clock_system();
    return c->now_ms(c->ctx);
}

/* ---- the orders table (stands in for PostgreSQL) ----------------------------- */

typedef enum row_status {
    ROW_PENDING = 1,        /* awaiting payment */
    ROW_PAID,
    ROW_CANCELLED,
    ROW_UNREACHABLE         /* the database does not answer for this row */
} row_status;

static const char *row_name(row_status st)
{
    switch (st) {
    case ROW_PENDING: return "pending";
    case ROW_PAID: return "paid";
    case ROW_CANCELLED: return "cancelled";
    case ROW_UNREACHABLE: return "unreachable";
    }
    return "?";
}

#define ROWS_MAX    16
#define ANSWERS_MAX 40

typedef struct order_row {
    char txid[32];                  /* = the order id */
    row_status status;
    uint32_t paid_at_attempt;       /* > 0: the payment lands just before
                                       the check with this attempt number */
    unsigned asked;                 /* check-backs answered for this row */
    char answers[ANSWERS_MAX + 1];  /* one letter per answer: C R U E */
    uint32_t attempts[ANSWERS_MAX]; /* req->attempt of each answer */
} order_row;

/* All fields guarded by mu.  Written by the demo's main thread (the "app")
 * and read by the txn worker threads (the checker). */
typedef struct orders_table {
    pthread_mutex_t mu;
    order_row rows[ROWS_MAX];
    size_t n;
    uint64_t answered[5];           /* by brk_check_result */
} orders_table;

static orders_table g_orders = { .mu = PTHREAD_MUTEX_INITIALIZER };

static order_row *table_find_locked(orders_table *tab, const char *txid)
{
    for (size_t i = 0; i < tab->n; i++)
        if (strcmp(tab->rows[i].txid, txid) == 0)
            return &tab->rows[i];
    return NULL;
}

/* INSERT ... ON CONFLICT UPDATE, as the order service would. */
static void table_set(const char *txid, row_status st, uint32_t paid_at_attempt)
{
    pthread_mutex_lock(&g_orders.mu);
    order_row *row = table_find_locked(&g_orders, txid);
    if (!row && g_orders.n < ROWS_MAX) {
        row = &g_orders.rows[g_orders.n++];
        memset(row, 0, sizeof *row);
        snprintf(row->txid, sizeof row->txid, "%s", txid);
    }
    if (row) {
        row->status = st;
        row->paid_at_attempt = paid_at_attempt;
    }
    pthread_mutex_unlock(&g_orders.mu);
    printf("  [orders table] %s: %s\n", txid, row_name(st));
}

static order_row table_get(const char *txid)
{
    order_row copy;
    memset(&copy, 0, sizeof copy);
    pthread_mutex_lock(&g_orders.mu);
    const order_row *row = table_find_locked(&g_orders, txid);
    if (row)
        copy = *row;
    pthread_mutex_unlock(&g_orders.mu);
    return copy;
}

static void table_answered(uint64_t out[5])
{
    pthread_mutex_lock(&g_orders.mu);
    memcpy(out, g_orders.answered, sizeof g_orders.answered);
    pthread_mutex_unlock(&g_orders.mu);
}

/* The checker: "SELECT status FROM orders WHERE id = $txid".  paid ->
 * COMMIT, cancelled -> ROLLBACK, pending (or no row yet: the app's
 * transaction is not visible) -> UNKNOWN, unreachable -> ERROR.  Runs on
 * the txn worker threads. */
static brk_check_result orders_check(void *ctx, const brk_check_req *req)
{
    orders_table *tab = ctx;
    brk_check_result r = BRK_CHECK_UNKNOWN;
    pthread_mutex_lock(&tab->mu);
    order_row *row = table_find_locked(tab, req->txid);
    if (row) {
        if (row->status == ROW_PENDING && row->paid_at_attempt
            && req->attempt >= row->paid_at_attempt)
            row->status = ROW_PAID;
        switch (row->status) {
        case ROW_PAID: r = BRK_CHECK_COMMIT; break;
        case ROW_CANCELLED: r = BRK_CHECK_ROLLBACK; break;
        case ROW_PENDING: r = BRK_CHECK_UNKNOWN; break;
        case ROW_UNREACHABLE: r = BRK_CHECK_ERROR; break;
        }
        if (row->asked < ANSWERS_MAX) {
            row->answers[row->asked] = "?CRUE"[r];
            row->attempts[row->asked] = req->attempt;
        }
        row->asked++;
    }
    tab->answered[r]++;
    pthread_mutex_unlock(&tab->mu);
    return r;
}

static const brk_checker g_checker = { orders_check, &g_orders };

/* ---- the broker: store + delay scheduler + transactions --------------------- */

typedef struct broker {
    brk_store *s;
    brk_delay *d;
    brk_txn *t;
} broker;

static bool broker_open(broker *b, const char *dir)
{
    char err[256] = "";
    brk_store_opts so;
    brk_store_opts_init(&so);
    so.flush_mode = BRK_FLUSH_SYNC;
    so.auto_create_topics = false;
    memset(b, 0, sizeof *b);
    brk_status st = brk_store_open(&b->s, dir, &so, err, sizeof err);
    if (st != BRK_OK)
        return demo_check(false, "opening the store in %s: %s (%s)", dir,
                     brk_status_name(st), err);
    brk_delay_opts dopts;
    brk_delay_opts_init(&dopts);
    st = brk_delay_open(&b->d, b->s, &dopts, err, sizeof err);
    if (st != BRK_OK) {
        demo_check(false, "opening the delay scheduler: %s (%s)",
              brk_status_name(st), err);
        brk_store_close(b->s);
        b->s = NULL;
        return false;
    }
    brk_txn_opts topts;
    brk_txn_opts_init(&topts);          /* default policy: 6 s, 60 s, 15 */
    topts.checker = &g_checker;
    topts.delay = b->d;
    topts.workers = 2;
    topts.error_backoff_min_ms = 100;   /* ERROR answers retried after 100,
                                           200, 400, 400 ... ms */
    topts.error_backoff_max_ms = 400;
    st = brk_txn_open(&b->t, b->s, &topts, err, sizeof err);
    if (st != BRK_OK) {
        demo_check(false, "opening the transactions: %s (%s)",
              brk_status_name(st), err);
        brk_delay_close(b->d);
        brk_store_close(b->s);
        b->d = NULL;
        b->s = NULL;
        return false;
    }
    return true;
}

/* Close in reverse order of opening: txn uses delay, both use the store. */
static void broker_close(broker *b)
{
    if (b->t)
        demo_check_st(brk_txn_close(b->t), NULL, "transactions closed");
    if (b->d)
        demo_check_st(brk_delay_close(b->d), NULL, "delay scheduler closed");
    if (b->s)
        demo_check_st(brk_store_close(b->s), NULL, "store closed");
    memset(b, 0, sizeof *b);
}

/* ---- order events -------------------------------------------------------------- */

/* One "order-paid" event as the order service would publish it. */
typedef struct order_msg {
    char txid[32];                  /* order id, also the txid */
    char key[32];                   /* customer id */
    char body[192];
    char trace[64];
    uint8_t props[128];             /* encoded headers: traceparent */
    size_t props_len;
    uint8_t msg_id[BRK_UUID_LEN];   /* from prepare */
    int64_t prepared_ms;
} order_msg;

static const char k_tag[] = "order-paid";

static void order_init(order_msg *m, unsigned order, unsigned customer,
                       unsigned cents)
{
    memset(m, 0, sizeof *m);
    snprintf(m->txid, sizeof m->txid, "order-%u", order);
    snprintf(m->key, sizeof m->key, "customer-%u", customer);
    snprintf(m->body, sizeof m->body,
             "{\"order\":\"order-%u\",\"customer\":\"customer-%u\","
             "\"event\":\"order-paid\",\"amount_cents\":%u}",
             order, customer, cents);
    snprintf(m->trace, sizeof m->trace,
             "00-4bf92f3577b34da6a3ce929d0e%06u-00f067aa0ba902b7-01", order);
    brk_prop hdr = { { "traceparent", strlen("traceparent") },
                     { m->trace, strlen(m->trace) } };
    if (brk_props_encode(&hdr, 1, m->props, sizeof m->props, &m->props_len)
        != BRK_OK)
        m->props_len = 0;
}

static brk_status prepare_order(brk_txn *t, order_msg *m,
                                const brk_check_policy *pol,
                                brk_txn_result *res)
{
    brk_txn_prepare_req req;
    memset(&req, 0, sizeof req);
    req.topic = "orders";
    req.key = (brk_bytes){ m->key, strlen(m->key) };
    req.tag = (brk_bytes){ k_tag, strlen(k_tag) };
    req.props = (brk_bytes){ m->props, m->props_len };
    req.body = (brk_bytes){ m->body, strlen(m->body) };
    req.flags = BRK_RECF_BODY_JSON;
    req.txid = m->txid;
    req.policy = pol;
    m->prepared_ms = wall_ms();
    brk_status st = brk_txn_prepare(t, &req, res);
    if (st == BRK_OK)
        memcpy(m->msg_id, res->msg_id, BRK_UUID_LEN);
    return st;
}

/* Prepare and check the result; false if it failed. */
static bool prepare_checked(brk_txn *t, order_msg *m,
                            const brk_check_policy *pol, const char *policy_text)
{
    brk_txn_result res;
    brk_status st = prepare_order(t, m, pol, &res);
    char id[BRK_UUID_STR_LEN + 1] = "";
    if (st == BRK_OK)
        brk_uuid_format(res.msg_id, id);
    return demo_check(st == BRK_OK && res.state == BRK_TXN_PREPARED && !res.replay
                 && strcmp(res.txid, m->txid) == 0,
                 "prepared %s (topic \"orders\", key %s, %s): state %s, "
                 "message id %s [%s]", m->txid, m->key, policy_text,
                 st == BRK_OK ? brk_txn_state_name(res.state) : "-", id,
                 brk_status_name(st));
}

/* ---- reading topics -------------------------------------------------------------- */

/* What a scan of a topic found. */
typedef struct found_msg {
    uint64_t total;                 /* records in the topic */
    unsigned count;                 /* records matching */
    /* the first match: */
    uint16_t queue;
    uint64_t offset;
    int64_t  store_ms;
    uint32_t flags;
    uint8_t  msg_id[BRK_UUID_LEN];
    char key[64], tag[64], body[512];
    uint8_t props[512];
    size_t props_len;
    bool props_fit;                 /* the headers fitted in props[] */
} found_msg;

static bool props_str(const found_msg *m, const char *key, char *out, size_t cap)
{
    brk_bytes v;
    out[0] = '\0';
    if (!m->props_fit
        || brk_props_get((brk_bytes){ m->props, m->props_len }, key, &v) != BRK_OK)
        return false;
    demo_to_cstr(v, out, cap);
    return true;
}

/* Read every queue of `topic`; match records by message id (id != NULL) or
 * by the outboxd-txid header (txid != NULL).  Errors are reported as a
 * failed check. */
static bool scan_topic(brk_store *s, const char *topic, const uint8_t *id,
                       const char *txid, found_msg *out)
{
    memset(out, 0, sizeof *out);
    brk_topic_info info;
    brk_status st = brk_topic_get(s, topic, &info);
    if (st != BRK_OK)
        return demo_check_st(st, s, "looking up a topic");
    for (uint16_t q = 0; q < info.queues; q++) {
        uint64_t from = 0;
        for (;;) {
            brk_batch *b = NULL;
            st = brk_store_read(s, topic, q, from, 64, &b);
            if (st != BRK_OK)
                return demo_check_st(st, s, "reading a queue");
            if (b->count == 0) {
                brk_batch_free(b);
                break;
            }
            for (size_t i = 0; i < b->count; i++) {
                const brk_record *r = &b->recs[i];
                out->total++;
                bool match;
                if (id) {
                    match = memcmp(r->msg_id, id, BRK_UUID_LEN) == 0;
                } else {
                    brk_bytes v;
                    match = brk_props_get(r->props, "outboxd-txid", &v) == BRK_OK
                            && v.len == strlen(txid)
                            && memcmp(v.ptr, txid, v.len) == 0;
                }
                if (!match || out->count++ > 0)
                    continue;
                out->queue = r->queue;
                out->offset = r->queue_offset;
                out->store_ms = r->store_ms;
                out->flags = r->flags;
                memcpy(out->msg_id, r->msg_id, BRK_UUID_LEN);
                demo_to_cstr(r->key, out->key, sizeof out->key);
                demo_to_cstr(r->tag, out->tag, sizeof out->tag);
                demo_to_cstr(r->body, out->body, sizeof out->body);
                out->props_fit = r->props.len <= sizeof out->props;
                if (out->props_fit) {
                    out->props_len = r->props.len;
                    if (r->props.len)
                        memcpy(out->props, r->props.ptr, r->props.len);
                }
            }
            from = b->next_offset;
            brk_batch_free(b);
        }
    }
    return true;
}

/* Poll until a matching record is in the topic (or the deadline passes). */
static bool wait_msg(brk_store *s, const char *topic, const uint8_t *id,
                     const char *txid, found_msg *out)
{
    int64_t end = demo_mono_ms() + WAIT_MS;
    for (;;) {
        if (!scan_topic(s, topic, id, txid, out))
            return false;
        if (out->count > 0)
            return true;
        if (demo_mono_ms() >= end)
            return false;
        demo_sleep_ms(POLL_MS);
    }
}

/* Is `f` exactly the committed form of `m`: same id, key, tag, JSON body
 * and headers (the half message's system properties stripped)? */
static bool is_order_msg(const found_msg *f, const order_msg *m)
{
    return memcmp(f->msg_id, m->msg_id, BRK_UUID_LEN) == 0
           && strcmp(f->key, m->key) == 0 && strcmp(f->tag, k_tag) == 0
           && strcmp(f->body, m->body) == 0 && f->flags == BRK_RECF_BODY_JSON
           && f->props_fit && f->props_len == m->props_len
           && memcmp(f->props, m->props, m->props_len) == 0;
}

/* Check that `m` is in "orders" exactly once, on its key's queue, as sent. */
static void check_published_once(brk_store *s, const order_msg *m)
{
    found_msg f;
    if (!wait_msg(s, "orders", m->msg_id, NULL, &f)) {
        demo_check(false, "%s's message appears in \"orders\" (not found within "
              "%d ms)", m->txid, WAIT_MS);
        return;
    }
    uint16_t q = UINT16_MAX;
    brk_status st = brk_topic_queue_for_key(s, "orders", m->key,
                                            strlen(m->key), &q);
    char trace[80];
    props_str(&f, "traceparent", trace, sizeof trace);
    demo_check(f.count == 1 && st == BRK_OK && q == f.queue && is_order_msg(&f, m),
          "%s's message is in \"orders\" once (%u found), on queue %u (the "
          "queue of key %s) at offset %" PRIu64 ", with the same message id, "
          "tag, JSON body and headers (traceparent %s, no internal ones)",
          m->txid, f.count, (unsigned)f.queue, m->key, f.offset, trace);
}

static void check_not_published(brk_store *s, const order_msg *m,
                                const char *why)
{
    found_msg f;
    if (scan_topic(s, "orders", m->msg_id, NULL, &f))
        demo_check(f.count == 0, "%s's message is not in \"orders\" (%s)",
              m->txid, why);
}

/* ---- waiting for transactions ------------------------------------------------- */

/* Poll brk_txn_get until the state is `want` (and, when want is
 * PREPARED, checks >= min_checks). */
static bool wait_txn(brk_txn *t, const char *txid, brk_txn_state want,
                     uint32_t min_checks, brk_txn_info *info)
{
    int64_t end = demo_mono_ms() + WAIT_MS;
    for (;;) {
        brk_status st = brk_txn_get(t, txid, info);
        if (st == BRK_OK && info->state == want
            && (want != BRK_TXN_PREPARED || info->checks >= min_checks))
            return true;
        if (st != BRK_OK && st != BRK_NOTFOUND)
            return false;
        if (demo_mono_ms() >= end)
            return false;
        demo_sleep_ms(POLL_MS);
    }
}

static const char *answers_of(const order_row *row, char *out, size_t cap)
{
    size_t o = 0;
    out[0] = '\0';
    for (unsigned i = 0; i < row->asked && i < ANSWERS_MAX && o + 24 < cap; i++) {
        const char *w = row->answers[i] == 'C' ? "COMMIT"
                        : row->answers[i] == 'R' ? "ROLLBACK"
                        : row->answers[i] == 'U' ? "UNKNOWN" : "ERROR";
        o += (size_t)snprintf(out + o, cap - o, "%s#%" PRIu32 " %s",
                              i ? ", " : "", row->attempts[i], w);
    }
    return out;
}

/* ---- the scenes ------------------------------------------------------------------- */

static void scene_happy_path(broker *b, order_msg *m)
{
    demo_heading("1. Happy path: prepare, commit");
    printf("  The order service takes order-1001's payment.  Before it writes to\n"
           "  its own database it prepares the \"order-paid\" event: a half message,\n"
           "  stored durably but invisible to consumers.  (Default check-back\n"
           "  policy: a first check after 6 s, so none happens in this scene.)\n");
    order_init(m, 1001, 7, 4200);
    if (!prepare_checked(b->t, m, NULL, "default policy"))
        return;
    brk_txn_info info;
    demo_check(brk_txn_get(b->t, m->txid, &info) == BRK_OK
          && info.state == BRK_TXN_PREPARED && info.checks == 0
          && strcmp(info.topic, "orders") == 0 && strcmp(info.key, m->key) == 0
          && memcmp(info.msg_id, m->msg_id, BRK_UUID_LEN) == 0,
          "brk_txn_get: %s is prepared for topic \"orders\", key %s, 0 checks",
          m->txid, m->key);
    brk_topic_info ti;
    demo_check(brk_topic_get(b->s, "orders", &ti) == BRK_OK && ti.messages == 0,
          "\"orders\" holds no message: the half message is invisible");
    check_not_published(b->s, m, "prepared only");

    printf("  Its database transaction commits, then it commits the event.\n");
    table_set(m->txid, ROW_PAID, 0);
    brk_txn_result res;
    brk_status st = brk_txn_commit(b->t, m->txid, &res);
    demo_check(st == BRK_OK && res.state == BRK_TXN_COMMITTED && !res.replay,
          "brk_txn_commit(%s): %s, state %s, not a replay", m->txid,
          brk_status_name(st), brk_txn_state_name(res.state));
    check_published_once(b->s, m);

    printf("  The service retries its commit (say, after a timeout), then\n"
           "  something tries to roll the order back.\n");
    st = brk_txn_commit(b->t, m->txid, &res);
    demo_check(st == BRK_OK && res.replay && res.state == BRK_TXN_COMMITTED,
          "a second commit is a replay: %s, replay %s, state %s",
          brk_status_name(st), res.replay ? "true" : "false",
          brk_txn_state_name(res.state));
    st = brk_txn_rollback(b->t, m->txid, &res);
    demo_check(st == BRK_CONFLICT && res.state == BRK_TXN_COMMITTED,
          "rollback after commit: %s (state stays %s): terminal is final",
          brk_status_name(st), brk_txn_state_name(res.state));
    check_published_once(b->s, m);
}

static void scene_lost_verdict(broker *b, order_msg *m,
                               const brk_check_policy *fast)
{
    demo_heading("2. Lost verdict: the check-back commits");
    printf("  order-1002: prepared with a short policy (first check after %d ms,\n"
           "  then every %d ms, %d checks).  The service's database says paid,\n"
           "  but the service \"crashes\" before it calls commit.\n",
           FAST_FIRST_MS, FAST_INTERVAL_MS, FAST_MAX_CHECKS);
    order_init(m, 1002, 8, 1999);
    if (!prepare_checked(b->t, m, fast, "short policy"))
        return;
    table_set(m->txid, ROW_PAID, 0);
    brk_txn_info info;
    bool ok = wait_txn(b->t, m->txid, BRK_TXN_COMMITTED, 0, &info);
    order_row row = table_get(m->txid);
    char ans[256];
    demo_check(ok && info.checks == 0,
          "the check-back asked the orders table (%u time(s): %s), saw paid "
          "and committed it: state %s", row.asked,
          answers_of(&row, ans, sizeof ans),
          ok ? brk_txn_state_name(info.state) : "not committed in time");
    check_published_once(b->s, m);
    found_msg f;
    if (scan_topic(b->s, "orders", m->msg_id, NULL, &f) && f.count)
        demo_check(f.store_ms >= m->prepared_ms + FAST_FIRST_MS,
              "it was published %" PRId64 " ms after prepare, not before the "
              "first check was due (%d ms)", f.store_ms - m->prepared_ms,
              FAST_FIRST_MS);
    brk_txn_result res;
    brk_status st = brk_txn_commit(b->t, m->txid, &res);
    demo_check(st == BRK_OK && res.replay,
          "when the service comes back and retries its commit, it gets a "
          "replay (%s, replay %s)", brk_status_name(st),
          res.replay ? "true" : "false");
}

static void scene_rollback(broker *b, order_msg *m)
{
    demo_heading("3. Rollback");
    printf("  order-1003: the customer cancels before paying.  The service\n"
           "  marks the order cancelled and rolls the event back.\n");
    order_init(m, 1003, 9, 550);
    if (!prepare_checked(b->t, m, NULL, "default policy"))
        return;
    table_set(m->txid, ROW_CANCELLED, 0);
    brk_txn_result res;
    brk_status st = brk_txn_rollback(b->t, m->txid, &res);
    demo_check(st == BRK_OK && res.state == BRK_TXN_ROLLED_BACK && !res.replay,
          "brk_txn_rollback(%s): %s, state %s", m->txid, brk_status_name(st),
          brk_txn_state_name(res.state));
    check_not_published(b->s, m, "rolled back");
    st = brk_txn_commit(b->t, m->txid, &res);
    demo_check(st == BRK_CONFLICT && res.state == BRK_TXN_ROLLED_BACK,
          "commit after rollback: %s (state stays %s)", brk_status_name(st),
          brk_txn_state_name(res.state));
    st = brk_txn_rollback(b->t, m->txid, &res);
    demo_check(st == BRK_OK && res.replay, "a second rollback is a replay (%s)",
          brk_status_name(st));
    check_not_published(b->s, m, "still");
}

static void scene_payment_timeout(broker *b, order_msg *m,
                                  const brk_check_policy *pay)
{
    demo_heading("4. Payment timeout: checks run out, rollback, expiry event");
    printf("  order-1004 waits for a payment that never comes.  Policy: first\n"
           "  check after %d ms, every %d ms, %d checks, then roll back and\n"
           "  publish an expiry event to \"%s\".  The orders table says\n"
           "  pending at every check.\n", FAST_FIRST_MS, FAST_INTERVAL_MS,
           FAST_MAX_CHECKS, EXPIRY_TOPIC);
    order_init(m, 1004, 10, 12900);
    table_set(m->txid, ROW_PENDING, 0);
    if (!prepare_checked(b->t, m, pay, "payment-timeout policy"))
        return;
    brk_txn_info info;
    bool ok = wait_txn(b->t, m->txid, BRK_TXN_ROLLED_BACK, 0, &info);
    order_row row = table_get(m->txid);
    char ans[512];
    demo_check(ok && info.expired && info.checks == FAST_MAX_CHECKS
          && row.asked == FAST_MAX_CHECKS
          && strcmp(row.answers, "UUUUU") == 0,
          "after %u checks (%s) it was rolled back: state %s, expired %s, "
          "checks %" PRIu32, row.asked, answers_of(&row, ans, sizeof ans),
          ok ? brk_txn_state_name(info.state) : "not rolled back in time",
          info.expired ? "true" : "false", info.checks);
    bool attempts_ok = row.asked == FAST_MAX_CHECKS;
    for (unsigned i = 0; attempts_ok && i < row.asked; i++)
        attempts_ok = row.attempts[i] == i + 1;
    demo_check(attempts_ok, "the checker saw attempts 1, 2, 3, 4, 5");
    check_not_published(b->s, m, "rolled back");

    found_msg f;
    if (!wait_msg(b->s, EXPIRY_TOPIC, NULL, m->txid, &f)) {
        demo_check(false, "an expiry event for %s appears in \"%s\"", m->txid,
              EXPIRY_TOPIC);
        return;
    }
    char hdr_txid[BRK_TXID_MAX + 1], hdr_event[64], trace[80], idstr[64];
    props_str(&f, "outboxd-txid", hdr_txid, sizeof hdr_txid);
    props_str(&f, "outboxd-event", hdr_event, sizeof hdr_event);
    props_str(&f, "traceparent", trace, sizeof trace);
    brk_uuid_format(m->msg_id, idstr);
    char want_txid[64], want_id[96], want_checks[32];
    snprintf(want_txid, sizeof want_txid, "\"txid\":\"%s\"", m->txid);
    snprintf(want_id, sizeof want_id, "\"msg_id\":\"%s\"", idstr);
    snprintf(want_checks, sizeof want_checks, "\"checks\":%d", FAST_MAX_CHECKS);
    printf("  The expiry event: key %s, headers outboxd-txid=%s,\n"
           "  outboxd-event=%s, body %s\n", f.key, hdr_txid, hdr_event, f.body);
    demo_check(f.count == 1 && strcmp(hdr_txid, m->txid) == 0
          && strcmp(hdr_event, "transaction-expired") == 0
          && strcmp(trace, m->trace) == 0 && strcmp(f.key, m->key) == 0
          && f.flags == BRK_RECF_BODY_JSON
          && memcmp(f.msg_id, m->msg_id, BRK_UUID_LEN) != 0,
          "one expiry event in \"%s\": header outboxd-txid = %s, "
          "outboxd-event = transaction-expired, the order's key and "
          "traceparent kept, its own message id", EXPIRY_TOPIC, m->txid);
    demo_check(strstr(f.body, want_txid) && strstr(f.body, want_id)
          && strstr(f.body, want_checks)
          && strstr(f.body, "\"event\":\"transaction-expired\""),
          "its JSON body names the txid, the order's message id and the %d "
          "checks", FAST_MAX_CHECKS);
    int64_t min_ms = FAST_FIRST_MS + (FAST_MAX_CHECKS - 1) * FAST_INTERVAL_MS;
    demo_check(f.store_ms >= m->prepared_ms + min_ms,
          "it was published %" PRId64 " ms after prepare: not before the "
          "fifth check was due (%" PRId64 " ms)", f.store_ms - m->prepared_ms,
          min_ms);
    printf("  The payment arrives late and the service tries to commit.\n");
    brk_txn_result res;
    brk_status st = brk_txn_commit(b->t, m->txid, &res);
    demo_check(st == BRK_CONFLICT && res.state == BRK_TXN_ROLLED_BACK,
          "commit after the timeout: %s; the order stays rolled back "
          "(the service must refund)", brk_status_name(st));
}

static void scene_paid_in_time(broker *b, order_msg *m,
                               const brk_check_policy *pay)
{
    demo_heading("5. Paid in time: the third check commits");
    printf("  order-1005, same payment-timeout policy.  The payment lands just\n"
           "  before the third check, which sees paid.\n");
    order_init(m, 1005, 11, 3100);
    table_set(m->txid, ROW_PENDING, 3);
    if (!prepare_checked(b->t, m, pay, "payment-timeout policy"))
        return;
    brk_txn_info info;
    bool ok = wait_txn(b->t, m->txid, BRK_TXN_COMMITTED, 0, &info);
    order_row row = table_get(m->txid);
    char ans[512];
    demo_check(ok && info.checks == 2 && !info.expired && row.asked == 3
          && strcmp(row.answers, "UUC") == 0,
          "checks answered %s: state %s, 2 checks counted",
          answers_of(&row, ans, sizeof ans),
          ok ? brk_txn_state_name(info.state) : "not committed in time");
    check_published_once(b->s, m);
    found_msg f;
    int64_t min_ms = FAST_FIRST_MS + 2 * FAST_INTERVAL_MS;
    if (scan_topic(b->s, "orders", m->msg_id, NULL, &f) && f.count)
        demo_check(f.store_ms >= m->prepared_ms + min_ms,
              "published %" PRId64 " ms after prepare (the third check was due "
              "at %" PRId64 " ms)", f.store_ms - m->prepared_ms, min_ms);
    /* Wait until the fifth check would have been due, with a margin. */
    int64_t until = m->prepared_ms + FAST_FIRST_MS
                    + FAST_MAX_CHECKS * FAST_INTERVAL_MS + 200;
    while (wall_ms() < until)
        demo_sleep_ms(POLL_MS);
    if (scan_topic(b->s, EXPIRY_TOPIC, NULL, m->txid, &f))
        demo_check(f.count == 0 && f.total == 1,
              "no expiry event for %s (\"%s\" still holds only order-1004's), "
              "and the orders table was asked no more (%u checks)", m->txid,
              EXPIRY_TOPIC, table_get(m->txid).asked);
}

static void scene_outage(broker *b, order_msg *m, const brk_check_policy *pay)
{
    demo_heading("6. Database outage: errors are not counted");
    printf("  order-1006, same payment-timeout policy (%d checks, about %d ms).\n"
           "  The service committed paid in its database and crashed; then the\n"
           "  database becomes unreachable for %d ms, longer than those checks\n"
           "  take.  The checker answers ERROR: retried with backoff, never\n"
           "  counted, so an outage cannot roll back a paid order.\n",
           FAST_MAX_CHECKS,
           FAST_FIRST_MS + (FAST_MAX_CHECKS - 1) * FAST_INTERVAL_MS, OUTAGE_MS);
    order_init(m, 1006, 12, 8800);
    table_set(m->txid, ROW_UNREACHABLE, 0);
    if (!prepare_checked(b->t, m, pay, "payment-timeout policy"))
        return;
    int64_t start = demo_mono_ms(), end = start + WAIT_MS;
    brk_txn_info info;
    bool stayed = true, seen = false;
    uint32_t max_checks_seen = 0;
    for (;;) {
        brk_status st = brk_txn_get(b->t, m->txid, &info);
        if (st != BRK_OK || info.state != BRK_TXN_PREPARED || info.checks > 0) {
            stayed = false;
            if (st == BRK_OK && info.checks > max_checks_seen)
                max_checks_seen = info.checks;
            break;
        }
        seen = info.check_errors > 0;
        int64_t now = demo_mono_ms();
        if ((seen && now >= start + OUTAGE_MS) || now >= end)
            break;
        demo_sleep_ms(POLL_MS);
    }
    order_row row = table_get(m->txid);
    demo_check(stayed && seen && row.asked > 0
          && strspn(row.answers, "E") == strlen(row.answers),
          "during %" PRId64 " ms of outage the table was asked %u times, every "
          "answer ERROR; %s stayed prepared with checks %" PRIu32
          " and check_errors %" PRIu32, demo_mono_ms() - start, row.asked, m->txid,
          stayed ? info.checks : max_checks_seen, info.check_errors);
    check_not_published(b->s, m, "nothing decided yet");
    found_msg f;
    if (scan_topic(b->s, EXPIRY_TOPIC, NULL, m->txid, &f))
        demo_check(f.count == 0, "no expiry event: nothing was rolled back");

    printf("  The database is back; orders.%s says paid.\n", m->txid);
    int64_t back_ms = wall_ms();
    table_set(m->txid, ROW_PAID, 0);
    bool ok = wait_txn(b->t, m->txid, BRK_TXN_COMMITTED, 0, &info);
    row = table_get(m->txid);
    unsigned last = row.asked < ANSWERS_MAX ? row.asked : ANSWERS_MAX;
    last = last ? last - 1 : 0;
    demo_check(ok && info.checks == 0 && !info.expired && row.asked <= ANSWERS_MAX
          && row.answers[last] == 'C',
          "the next check (attempt %" PRIu32 ") saw paid and committed it: "
          "state %s, checks still %" PRIu32, row.attempts[last],
          ok ? brk_txn_state_name(info.state) : "not committed in time",
          info.checks);
    check_published_once(b->s, m);
    if (scan_topic(b->s, "orders", m->msg_id, NULL, &f) && f.count)
        demo_check(f.store_ms >= back_ms, "it was published %" PRId64 " ms after "
              "the database came back, not during the outage",
              f.store_ms - back_ms);
}

/* One delayed notification for scene 7 and 8. */
typedef struct delayed_msg {
    const char *what;
    char body[128];
    uint8_t props[96];
    size_t props_len;
    brk_delay_res res;
    int64_t sent_ms;
} delayed_msg;

static bool send_delayed(brk_delay *d, delayed_msg *dm, const char *what,
                         const char *body, int64_t delay_ms)
{
    memset(dm, 0, sizeof *dm);
    dm->what = what;
    snprintf(dm->body, sizeof dm->body, "%s", body);
    brk_prop hdr = { { "notification", 12 }, { what, strlen(what) } };
    brk_props_encode(&hdr, 1, dm->props, sizeof dm->props, &dm->props_len);
    brk_append_req req;
    memset(&req, 0, sizeof req);
    req.topic = "notifications";
    req.queue = -1;
    req.key = (brk_bytes){ "customer-7", 10 };
    req.tag = (brk_bytes){ what, strlen(what) };
    req.props = (brk_bytes){ dm->props, dm->props_len };
    req.body = (brk_bytes){ dm->body, strlen(dm->body) };
    req.flags = BRK_RECF_BODY_JSON;
    dm->sent_ms = wall_ms();
    brk_status st = brk_delay_send(d, &req, dm->sent_ms + delay_ms, &dm->res);
    return demo_check(st == BRK_OK && dm->res.delayed
                 && dm->res.deliver_at_ms == dm->sent_ms + delay_ms,
                 "brk_delay_send(\"%s\", due in %" PRId64 " ms): %s, delayed",
                 what, delay_ms, brk_status_name(st));
}

/* Right after sending: not visible yet, unless it was already due. */
static void check_invisible(brk_store *s, const delayed_msg *dm)
{
    int64_t now = wall_ms();
    found_msg f;
    if (!scan_topic(s, "notifications", dm->res.msg_id, NULL, &f))
        return;
    if (now < dm->res.deliver_at_ms)
        demo_check(f.count == 0, "\"%s\" is not in \"notifications\" yet (%" PRId64
              " ms before it is due)", dm->what, dm->res.deliver_at_ms - now);
    else
        printf("  (\"%s\" was already due when looked at: this machine is "
               "slow; not checked)\n", dm->what);
}

static bool check_delivered(brk_store *s, const delayed_msg *dm)
{
    found_msg f;
    if (!wait_msg(s, "notifications", dm->res.msg_id, NULL, &f))
        return demo_check(false, "\"%s\" appears in \"notifications\" (not within "
                     "%d ms)", dm->what, WAIT_MS);
    return demo_check(f.count == 1 && f.store_ms >= dm->res.deliver_at_ms
                 && strcmp(f.body, dm->body) == 0 && strcmp(f.tag, dm->what) == 0
                 && f.props_fit && f.props_len == dm->props_len
                 && memcmp(f.props, dm->props, dm->props_len) == 0,
                 "\"%s\" appeared once in \"notifications\", %" PRId64 " ms "
                 "after it was sent (due at %" PRId64 " ms), same message id, "
                 "body and headers", dm->what, f.store_ms - dm->sent_ms,
                 dm->res.deliver_at_ms - dm->sent_ms);
}

static void scene_delay(broker *b, delayed_msg dm[2])
{
    demo_heading("7. Delayed delivery");
    printf("  The service schedules two notifications for customer-7: a review\n"
           "  request at delay level 1 and a shipping notice in 300 ms.  Both\n"
           "  are stored at once (in \"__delay\") and moved to \"notifications\"\n"
           "  when due, keeping their message ids.\n");
    int64_t level1 = brk_delay_level_ms(1);
    demo_check(level1 == 1000, "delay level 1 is %" PRId64 " ms", level1);
    if (!send_delayed(b->d, &dm[0], "review-request",
                      "{\"customer\":\"customer-7\",\"ask\":\"review\"}", level1)
        || !send_delayed(b->d, &dm[1], "shipping-notice",
                         "{\"order\":\"order-1001\",\"status\":\"shipped\"}", 300))
        return;
    check_invisible(b->s, &dm[0]);
    check_invisible(b->s, &dm[1]);
    check_delivered(b->s, &dm[1]);
    check_delivered(b->s, &dm[0]);
}

static void print_stats(const char *when, const brk_txn_stats *st)
{
    printf("  txn stats %s:\n"
           "    prepared_total %" PRIu64 ", committed_total %" PRIu64
           ", rolled_back_total %" PRIu64 ", expired_total %" PRIu64 "\n"
           "    checks: commit %" PRIu64 ", rollback %" PRIu64
           ", unknown %" PRIu64 ", error %" PRIu64 "\n"
           "    pending %" PRIu64 ", stuck %" PRIu64 ", compacted_total %" PRIu64
           ", memory_bytes %" PRIu64 "\n",
           when, st->prepared_total, st->committed_total, st->rolled_back_total,
           st->expired_total, st->checks_commit_total, st->checks_rollback_total,
           st->checks_unknown_total, st->checks_error_total, st->pending,
           st->stuck, st->compacted_total, st->memory_bytes);
}

/* ---- main ------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s <empty directory>\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (strlen(argv[1]) > PATH_CAP - 16) {
        fprintf(stderr, "%s: directory name too long\n", argv[0]);
        return 2;
    }
    char dir[PATH_CAP];
    snprintf(dir, sizeof dir, "%s/store", argv[1]);
    int64_t t0 = demo_mono_ms();
    broker b = { 0 };
    order_msg o1001, o1002, o1003, o1004, o1005, o1006, o1007;
    delayed_msg dm[2], reminder;
    brk_txn_stats st1, st2;
    brk_delay_stats ds1, ds2;
    uint64_t answered1[5];
    brk_status st;

    brk_check_policy fast = {
        .first_check_ms = FAST_FIRST_MS, .interval_ms = FAST_INTERVAL_MS,
        .max_checks = FAST_MAX_CHECKS, .on_exhausted = BRK_EXHAUSTED_ROLLBACK,
    };
    brk_check_policy pay = fast;
    pay.expiry_topic = EXPIRY_TOPIC;

    printf("outboxd transactions and delays demo (broker_core)\n\n"
           "The application is an order service.  Its check-back answers come\n"
           "from an in-memory \"orders table\" (txid -> pending / paid / cancelled /\n"
           "unreachable) standing in for its PostgreSQL database; the real SQL\n"
           "checker comes with issue 6.  Store: %s (SYNC flush),\n"
           "system clock, scheduler threads running.\n", dir);

    demo_heading("0. Open");
    if (!broker_open(&b, dir))
        goto done;
    demo_check(true, "store, delay scheduler and transactions are open");
    demo_check_st(brk_topic_create(b.s, "orders", 4), b.s,
             "created topic \"orders\" (4 queues)");
    demo_check_st(brk_topic_create(b.s, EXPIRY_TOPIC, 1), b.s,
             "created topic \"" EXPIRY_TOPIC "\" (1 queue)");
    demo_check_st(brk_topic_create(b.s, "notifications", 2), b.s,
             "created topic \"notifications\" (2 queues)");

    scene_happy_path(&b, &o1001);
    scene_lost_verdict(&b, &o1002, &fast);
    scene_rollback(&b, &o1003);
    scene_payment_timeout(&b, &o1004, &pay);
    scene_paid_in_time(&b, &o1005, &pay);
    scene_outage(&b, &o1006, &pay);
    scene_delay(&b, dm);

    demo_heading("8. Restart");
    brk_check_policy slow = {
        .first_check_ms = FAST_FIRST_MS, .interval_ms = 60000,
        .max_checks = 10, .on_exhausted = BRK_EXHAUSTED_ROLLBACK,
    };
    printf("  order-1007 is prepared (first check after %d ms, then every 60 s);\n"
           "  its payment is pending.  After its first check the whole broker is\n"
           "  closed and reopened, with a delayed reminder still waiting.\n",
           FAST_FIRST_MS);
    order_init(&o1007, 1007, 13, 2500);
    table_set(o1007.txid, ROW_PENDING, 0);
    brk_txn_info before, after;
    memset(&before, 0, sizeof before);
    if (!prepare_checked(b.t, &o1007, &slow, "first check 200 ms, then 60 s"))
        goto done;
    /* (Fill `before` first: demo_check()'s arguments are evaluated in no
     * particular order.) */
    bool first_done = wait_txn(b.t, o1007.txid, BRK_TXN_PREPARED, 1, &before);
    int64_t next_in = before.next_check_ms - wall_ms();
    demo_check(first_done && before.checks == 1 && next_in > 0,
          "after its first check (UNKNOWN): prepared, checks %" PRIu32
          ", next check in %" PRId64 " ms", before.checks, next_in);
    send_delayed(b.d, &reminder, "payment-reminder",
                 "{\"order\":\"order-1007\",\"remind\":\"pay\"}", 1000);
    brk_txn_get_stats(b.t, &st1);
    brk_delay_get_stats(b.d, &ds1);
    table_answered(answered1);
    printf("  Closing transactions, delay scheduler and store.\n");
    broker_close(&b);
    printf("  Reopening: the transactions and timers are rebuilt from the log.\n");
    if (!broker_open(&b, dir))
        goto done;
    memset(&after, 0, sizeof after);
    st = brk_txn_get(b.t, o1007.txid, &after);
    demo_check(st == BRK_OK && after.state == BRK_TXN_PREPARED && after.checks == before.checks
          && after.next_check_ms == before.next_check_ms
          && after.prepared_ms == before.prepared_ms
          && memcmp(after.msg_id, o1007.msg_id, BRK_UUID_LEN) == 0
          && after.policy.interval_ms == 60000 && after.policy.max_checks == 10,
          "brk_txn_get after restart: %s is %s with checks %" PRIu32
          ", the same next check time, prepare time, message id and policy",
          o1007.txid, st == BRK_OK ? brk_txn_state_name(after.state)
                                   : brk_status_name(st), after.checks);
    {
        int64_t now = wall_ms();
        brk_delay_stats dnow;
        brk_delay_get_stats(b.d, &dnow);
        if (now < reminder.res.deliver_at_ms)
            demo_check(dnow.pending == 1
                  && dnow.next_due_ms == reminder.res.deliver_at_ms,
                  "the delay scheduler rebuilt the reminder's timer: 1 pending, "
                  "due at the same time");
        else
            printf("  (the reminder was already due at reopen: this machine is "
                   "slow; timer rebuild not checked)\n");
    }
    brk_txn_result res;
    st = brk_txn_commit(b.t, o1001.txid, &res);
    demo_check(st == BRK_OK && res.replay && res.state == BRK_TXN_COMMITTED,
          "verdicts given before the restart still hold: commit(order-1001) "
          "is a replay (%s)", brk_status_name(st));
    st = brk_txn_commit(b.t, o1004.txid, &res);
    demo_check(st == BRK_CONFLICT && res.state == BRK_TXN_ROLLED_BACK,
          "commit(order-1004), expired before the restart: %s",
          brk_status_name(st));
    printf("  The payment for order-1007 arrives; the service commits.\n");
    table_set(o1007.txid, ROW_PAID, 0);
    st = brk_txn_commit(b.t, o1007.txid, &res);
    demo_check(st == BRK_OK && !res.replay && res.state == BRK_TXN_COMMITTED,
          "brk_txn_commit(%s) after restart: %s, state %s", o1007.txid,
          brk_status_name(st), brk_txn_state_name(res.state));
    check_published_once(b.s, &o1007);
    check_delivered(b.s, &reminder);

    demo_heading("Summary");
    {
        brk_topic_info ti;
        demo_check(brk_topic_get(b.s, "orders", &ti) == BRK_OK && ti.messages == 5,
              "\"orders\" holds 5 events: order-1001, 1002, 1005, 1006, 1007 "
              "(not 1003, rolled back, nor 1004, expired)");
        const order_msg *all[] = { &o1001, &o1002, &o1005, &o1006, &o1007 };
        bool once = true;
        for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
            found_msg f;
            once = once && scan_topic(b.s, "orders", all[i]->msg_id, NULL, &f)
                   && f.count == 1;
        }
        demo_check(once, "each of them exactly once");
        demo_check(brk_topic_get(b.s, EXPIRY_TOPIC, &ti) == BRK_OK && ti.messages == 1,
              "\"" EXPIRY_TOPIC "\" holds 1 event (order-1004's)");
        const delayed_msg *dall[] = { &dm[0], &dm[1], &reminder };
        once = true;
        for (size_t i = 0; i < 3; i++) {
            found_msg f;
            once = once && scan_topic(b.s, "notifications", dall[i]->res.msg_id,
                                      NULL, &f) && f.count == 1;
        }
        demo_check(brk_topic_get(b.s, "notifications", &ti) == BRK_OK
              && ti.messages == 3 && once,
              "\"notifications\" holds the 3 delayed messages, each once");
    }
    print_stats("before the restart", &st1);
    demo_check(st1.prepared_total == 7 && st1.committed_total == 4
          && st1.rolled_back_total == 2 && st1.expired_total == 1
          && st1.pending == 1 && st1.stuck == 0,
          "before the restart: 7 prepared, 4 committed (1001 by the client, "
          "1002, 1005, 1006 by check-backs), 2 rolled back (1003, 1004), "
          "1 expired, 1 pending (1007)");
    demo_check(st1.checks_commit_total == answered1[BRK_CHECK_COMMIT]
          && st1.checks_rollback_total == answered1[BRK_CHECK_ROLLBACK]
          && st1.checks_unknown_total == answered1[BRK_CHECK_UNKNOWN]
          && st1.checks_error_total == answered1[BRK_CHECK_ERROR]
          && st1.checks_commit_total == 3 && st1.checks_unknown_total == 8,
          "the check counters match the orders table's own tally of its "
          "answers: %" PRIu64 " commit, %" PRIu64 " rollback, %" PRIu64
          " unknown (5 + 2 + 1), %" PRIu64 " error",
          answered1[BRK_CHECK_COMMIT], answered1[BRK_CHECK_ROLLBACK],
          answered1[BRK_CHECK_UNKNOWN], answered1[BRK_CHECK_ERROR]);
    printf("  delay stats before the restart: scheduled_total %" PRIu64
           ", fired_total %" PRIu64 ", pending %" PRIu64 "\n",
           ds1.scheduled_total, ds1.fired_total, ds1.pending);
    brk_txn_get_stats(b.t, &st2);
    brk_delay_get_stats(b.d, &ds2);
    print_stats("after the restart (counters start again at open)", &st2);
    demo_check(st2.prepared_total == 0 && st2.committed_total == 1
          && st2.rolled_back_total == 0 && st2.pending == 0,
          "after the restart: 1 committed (order-1007), nothing pending");
    printf("  delay stats after the restart: scheduled_total %" PRIu64
           ", fired_total %" PRIu64 ", pending %" PRIu64 "\n",
           ds2.scheduled_total, ds2.fired_total, ds2.pending);

done:
    if (b.s)
        broker_close(&b);
    char tail[64];
    snprintf(tail, sizeof tail, " (%.1f s).",
             (double)(demo_mono_ms() - t0) / 1000.0);
    return demo_verdict(tail);
}
