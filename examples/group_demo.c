/*
 * group_demo.c - the consumer side of the order service: broker_core's
 * consumer groups (receive, ack, nack, retries, dead letters, FIFO groups,
 * lag, restart, long polling).
 *
 *   group_demo <empty directory>          (`make demo` passes a fresh mktemp -d)
 *
 * Everything runs in this process, on a real store in <dir>/store (SYNC
 * flush), with the system clock and the background threads of the store
 * and the groups.  Retries use the shortest delay level (1 s), so the whole
 * tour takes a few seconds.
 *
 * Scenes:
 *   1. "orders" (4 queues) gets keyed order events; the clustering group
 *      "billing" with 2 long-polling consumer threads receives and acks each
 *      event exactly once; the FIFO group "shipping" (2 threads too) sees
 *      each order's events in append order;
 *   2. a nack: the message comes back after the 1 s retry delay, with
 *      delivery_count 2; the old receipt is stale;
 *   3. a poison message (max_deliveries 2): nacked twice, it lands in the
 *      dead-letter list with its outboxd-dlq-* headers; a replay puts it back
 *      with the same msg_id and it is received again;
 *   4. lag: the backlog before consuming, 0 after the acks;
 *   5. restart: ack half, close groups and store, reopen: the acked ones are
 *      not redelivered, the others are;
 *   6. long polling: a consumer waiting up to 5 s gets a message appended
 *      200 ms later at once.
 *
 * Every "[ok]" line is a check the program made; a failed check prints
 * "[FAILED]" and the program exits 1.  Exit 2 means the demo could not run
 * (bad arguments).  Waits poll or long-poll with a deadline of WAIT_MS, so a
 * slow machine only makes the demo slower, not wrong.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "demo_util.h"
#include "broker/clock.h"
#include "broker/group.h"
#include "broker/record.h"
#include "broker/status.h"
#include "broker/store.h"
#include "broker/uuid.h"

#define PATH_CAP      2048    /* longest store path this demo handles */
#define WAIT_MS       20000   /* deadline of every wait; reached only on failure */
#define RETRY_MS      1000    /* the smallest delay level: a nack's 100 ms becomes this */
#define LATE_MS       5000    /* a retry later than this after its nack is a failure */

/* Scene 1: ORDERS orders with EVENTS events each. */
#define ORDERS        8
#define EVENTS        3
#define N1            (ORDERS * EVENTS)

static const char *const EVENT_NAMES[EVENTS] = { "created", "paid", "shipped" };

/* ---- checks: demo_check() and the rest are in demo_util.h -------------------- */

static bool check_st(brk_status st, const char *what)
{
    return demo_check_st(st, NULL, what);
}

/* ---- the broker ------------------------------------------------------------- */

typedef struct broker {
    brk_store *s;
    brk_groups *g;
} broker;

static bool broker_open(broker *b, const char *dir)
{
    char err[256] = "";
    brk_store_opts so;
    brk_store_opts_init(&so);
    so.flush_mode = BRK_FLUSH_SYNC;
    brk_status st = brk_store_open(&b->s, dir, &so, err, sizeof err);
    if (st != BRK_OK)
        return demo_check(false, "brk_store_open(%s): %s (%s)", dir,
                     brk_status_name(st), err);
    brk_groups_opts go;
    brk_groups_opts_init(&go);
    st = brk_groups_open(&b->g, b->s, &go, err, sizeof err);
    if (st != BRK_OK) {
        brk_store_close(b->s);
        b->s = NULL;
        return demo_check(false, "brk_groups_open: %s (%s)", brk_status_name(st), err);
    }
    return true;
}

/* Groups first (they hold the store), then the store; both persist. */
static bool broker_close(broker *b)
{
    brk_status s1 = b->g ? brk_groups_close(b->g) : BRK_OK;
    brk_status s2 = brk_store_close(b->s);
    b->g = NULL;
    b->s = NULL;
    if (s1 != BRK_OK || s2 != BRK_OK)
        return demo_check(false, "close: groups %s, store %s", brk_status_name(s1),
                     brk_status_name(s2));
    return true;
}

/* A keyed JSON event; res gets its msg_id, queue and offset. */
static bool append_event(brk_store *s, const char *topic, const char *key,
                         const char *body, brk_append_res *res)
{
    brk_append_req r;
    memset(&r, 0, sizeof r);
    r.topic = topic;
    r.queue = -1;
    r.key = (brk_bytes){ key, strlen(key) };
    r.body = (brk_bytes){ body, strlen(body) };
    r.flags = BRK_RECF_BODY_JSON;
    brk_status st = brk_store_append(s, &r, res);
    if (st != BRK_OK)
        return demo_check(false, "append %s to %s: %s (%s)", key, topic,
                     brk_status_name(st), brk_store_errstr(s));
    return true;
}

static bool put_group(brk_groups *g, const char *group, const char *topic,
                      const brk_group_config *cfg, const char *what)
{
    bool created = false;
    brk_status st = brk_group_put(g, group, topic, NULL, cfg, &created);
    return demo_check(st == BRK_OK && created, "%s: %s", what,
                 st == BRK_OK ? (created ? "created" : "already there")
                              : brk_status_name(st));
}

/* The totals row (queue -1) of `group` for `topic`; false when missing. */
static bool lag_totals(brk_groups *g, const char *group, const char *topic,
                       brk_group_lag_row *out)
{
    brk_group_lag_row *rows = NULL;
    size_t n = 0;
    bool found = false;
    if (brk_group_lag(g, group, &rows, &n) != BRK_OK)
        return false;
    for (size_t i = 0; i < n; i++)
        if (rows[i].queue == -1 && strcmp(rows[i].topic, topic) == 0) {
            *out = rows[i];
            found = true;
        }
    free(rows);
    return found;
}

/* Receive until `want` messages arrived (or WAIT_MS passed), long polling;
 * the messages' copies go to got[] (msg_id, count, receipt).  Returns how
 * many were received. */
typedef struct got_msg {
    uint8_t msg_id[BRK_UUID_LEN];
    uint32_t delivery_count;
    char receipt[BRK_RECEIPT_MAX + 1];
    char key[64];
    bool has_dlq_header;
} got_msg;

static size_t receive_n(brk_groups *g, const char *group, const char *topic,
                        size_t want, got_msg *got, size_t cap)
{
    size_t n = 0;
    int64_t end = demo_mono_ms() + WAIT_MS;
    brk_receive_req rq = { .group = group, .topic = topic, .max = 16 };
    while (n < want && demo_mono_ms() < end) {
        brk_receive_batch *b = NULL;
        brk_status st = brk_group_receive_wait(g, &rq, 500, &b);
        if (st != BRK_OK && st != BRK_LIMIT) {
            demo_check(false, "receive %s/%s: %s", group, topic, brk_status_name(st));
            brk_receive_batch_free(b);
            break;
        }
        for (size_t i = 0; b && i < b->count; i++, n++) {
            if (n >= cap)
                continue;
            const brk_received *m = &b->msgs[i];
            memcpy(got[n].msg_id, m->rec.msg_id, BRK_UUID_LEN);
            got[n].delivery_count = m->delivery_count;
            snprintf(got[n].receipt, sizeof got[n].receipt, "%s", m->receipt);
            demo_to_cstr(m->rec.key, got[n].key, sizeof got[n].key);
            brk_bytes v;
            got[n].has_dlq_header =
                brk_props_get(m->rec.props, "outboxd-dlq-topic", &v) == BRK_OK;
        }
        brk_receive_batch_free(b);
    }
    return n;
}

/* A receive that must come back empty: nothing is ready for the group. */
static bool receive_none(brk_groups *g, const char *group, const char *topic)
{
    brk_receive_req rq = { .group = group, .topic = topic, .max = 16 };
    brk_receive_batch *b = NULL;
    brk_status st = brk_group_receive(g, &rq, &b);
    bool none = st == BRK_OK && b && b->count == 0;
    brk_receive_batch_free(b);
    return none;
}

/* ---- scene 1: two groups, two consumer threads each --------------------------- */

typedef struct sent_event {
    uint8_t msg_id[BRK_UUID_LEN];
    int order;                      /* 0..ORDERS-1 */
    int seq;                        /* 0..EVENTS-1, append order within the order */
} sent_event;

/* What the consumers of one group saw, in arrival order (guarded by mu). */
typedef struct group_log {
    pthread_mutex_t mu;
    const char *group;
    uint8_t ids[N1 * 2][BRK_UUID_LEN]; /* msg_ids in arrival order */
    size_t n;
    unsigned per_thread[2];
    unsigned errors;                /* failed receives or acks */
    atomic_uint received;
} group_log;

typedef struct consumer {
    brk_groups *g;
    group_log *log;
    int id;
    pthread_t th;
} consumer;

static int find_sent(const sent_event *sent, const uint8_t *id)
{
    for (int i = 0; i < N1; i++)
        if (memcmp(sent[i].msg_id, id, BRK_UUID_LEN) == 0)
            return i;
    return -1;
}

/* A consumer thread: long-poll (250 ms at a time so it notices the end),
 * note each message in the group's log, then ack it. */
static void *consumer_main(void *arg)
{
    consumer *c = arg;
    group_log *L = c->log;
    int64_t end = demo_mono_ms() + WAIT_MS;
    brk_receive_req rq = { .group = L->group, .topic = "orders", .max = 4 };
    while (atomic_load(&L->received) < N1 && demo_mono_ms() < end) {
        brk_receive_batch *b = NULL;
        brk_status st = brk_group_receive_wait(c->g, &rq, 250, &b);
        if (st != BRK_OK && st != BRK_LIMIT) {
            pthread_mutex_lock(&L->mu);
            L->errors++;
            pthread_mutex_unlock(&L->mu);
            brk_receive_batch_free(b);
            demo_sleep_ms(10);
            continue;
        }
        for (size_t i = 0; b && i < b->count; i++) {
            const brk_received *m = &b->msgs[i];
            pthread_mutex_lock(&L->mu);
            if (L->n < sizeof L->ids / sizeof L->ids[0])
                memcpy(L->ids[L->n++], m->rec.msg_id, BRK_UUID_LEN);
            L->per_thread[c->id]++;
            pthread_mutex_unlock(&L->mu);
            atomic_fetch_add(&L->received, 1);
            if (brk_group_ack(c->g, L->group, m->receipt) != BRK_OK) {
                pthread_mutex_lock(&L->mu);
                L->errors++;
                pthread_mutex_unlock(&L->mu);
            }
        }
        brk_receive_batch_free(b);
    }
    return NULL;
}

static void scene_orders(broker *b)
{
    demo_heading("1. Two groups consume \"orders\": billing (clustering), shipping (FIFO)");
    printf("  %d orders x %d events (created, paid, shipped), keyed by order id,\n"
           "  are appended while 2 billing and 2 shipping threads long-poll\n"
           "  (brk_group_receive_wait) and ack (brk_group_ack).\n", ORDERS, EVENTS);
    brk_group_config cfg;
    brk_group_config_init(&cfg);
    put_group(b->g, "billing", "orders", &cfg, "group \"billing\" (clustering) on \"orders\"");
    cfg.fifo = true;
    put_group(b->g, "shipping", "orders", &cfg, "group \"shipping\" (fifo) on \"orders\"");

    static sent_event sent[N1];
    static group_log logs[2];
    static consumer cons[4];
    const char *names[2] = { "billing", "shipping" };
    for (int k = 0; k < 2; k++) {
        memset(&logs[k], 0, sizeof logs[k]);
        pthread_mutex_init(&logs[k].mu, NULL);
        logs[k].group = names[k];
        atomic_init(&logs[k].received, 0);
    }
    for (int i = 0; i < 4; i++) {
        cons[i] = (consumer){ .g = b->g, .log = &logs[i / 2], .id = i % 2 };
        if (pthread_create(&cons[i].th, NULL, consumer_main, &cons[i]) != 0) {
            demo_check(false, "pthread_create");
            exit(1);
        }
    }
    /* Append event by event, the orders interleaved, as a live service would. */
    bool appended = true;
    for (int e = 0; e < EVENTS; e++)
        for (int o = 0; o < ORDERS; o++) {
            char key[32], body[128];
            snprintf(key, sizeof key, "order-%d", 2001 + o);
            snprintf(body, sizeof body, "{\"order\":\"%s\",\"event\":\"%s\"}", key,
                     EVENT_NAMES[e]);
            brk_append_res res;
            sent_event *se = &sent[e * ORDERS + o];
            appended = append_event(b->s, "orders", key, body, &res) && appended;
            memcpy(se->msg_id, res.msg_id, BRK_UUID_LEN);
            se->order = o;
            se->seq = e;
        }
    demo_check(appended, "appended %d events to \"orders\"", N1);
    for (int i = 0; i < 4; i++)
        pthread_join(cons[i].th, NULL);

    /* The consumers note msg_ids (an event may be received before its
     * append returned); they are matched to sent[] after the joins. */
    static int idx[2][N1 * 2];
    for (int k = 0; k < 2; k++) {
        group_log *L = &logs[k];
        unsigned seen[N1] = { 0 };
        bool known = true;
        for (size_t i = 0; i < L->n; i++) {
            idx[k][i] = find_sent(sent, L->ids[i]);
            if (idx[k][i] < 0)
                known = false;
            else
                seen[idx[k][i]]++;
        }
        bool once = known && L->n == N1;
        for (int i = 0; i < N1; i++)
            once = once && seen[i] == 1;
        demo_check(once && L->errors == 0,
              "%s: all %d events received and acked exactly once (%zu deliveries, "
              "threads took %u + %u, %u errors)", L->group, N1, L->n,
              L->per_thread[0], L->per_thread[1], L->errors);
        demo_check(receive_none(b->g, L->group, "orders"),
              "%s: a further receive finds nothing (no redelivery)", L->group);
    }
    /* Per-key order in the FIFO group: arrival order of each order's events. */
    group_log *S = &logs[1];
    int next[ORDERS] = { 0 };
    bool ordered = true;
    for (size_t i = 0; i < S->n; i++) {
        if (idx[1][i] < 0) {
            ordered = false;
            continue;
        }
        const sent_event *se = &sent[idx[1][i]];
        if (se->seq != next[se->order])
            ordered = false;
        next[se->order] = se->seq + 1;
    }
    demo_check(ordered, "shipping (FIFO): every order's events arrived in append order "
          "(created, paid, shipped), across both threads");
    for (int k = 0; k < 2; k++)
        pthread_mutex_destroy(&logs[k].mu);
}

/* ---- scene 2: nack and retry ------------------------------------------------- */

static void scene_nack(broker *b)
{
    demo_heading("2. A nack: the message comes back after the retry delay");
    brk_append_res res;
    if (!append_event(b->s, "refunds", "order-2101",
                      "{\"order\":\"order-2101\",\"refund\":\"12.50\"}", &res))
        return;
    printf("  A refund event for order-2101; the consumer of group \"refunds\"\n"
           "  fails (payment provider down) and nacks with delay_ms 100, which\n"
           "  rounds up to the smallest delay level, 1 s.\n");
    got_msg first;
    size_t n = receive_n(b->g, "refunds", "refunds", 1, &first, 1);
    demo_check(n == 1 && memcmp(first.msg_id, res.msg_id, BRK_UUID_LEN) == 0
          && first.delivery_count == 1,
          "received it: delivery_count %" PRIu32, n ? first.delivery_count : 0);
    int64_t t0 = demo_mono_ms();
    check_st(brk_group_nack(b->g, "refunds", first.receipt, 100,
                            "payment provider unavailable"),
             "brk_group_nack(delay_ms 100)");
    /* Long-poll until it is back; note when. */
    brk_receive_req rq = { .group = "refunds", .topic = "refunds", .max = 4 };
    got_msg again;
    size_t got = 0;
    int64_t back_after = -1;
    while (got == 0 && demo_mono_ms() - t0 < WAIT_MS) {
        brk_receive_batch *bt = NULL;
        brk_status st = brk_group_receive_wait(b->g, &rq, 5000, &bt);
        if (st == BRK_OK && bt && bt->count > 0) {
            back_after = demo_mono_ms() - t0;
            const brk_received *m = &bt->msgs[0];
            memcpy(again.msg_id, m->rec.msg_id, BRK_UUID_LEN);
            again.delivery_count = m->delivery_count;
            snprintf(again.receipt, sizeof again.receipt, "%s", m->receipt);
            demo_to_cstr(m->rec.key, again.key, sizeof again.key);
            got = bt->count;
        } else if (st != BRK_OK) {
            demo_check(false, "receive_wait: %s", brk_status_name(st));
            brk_receive_batch_free(bt);
            break;
        }
        brk_receive_batch_free(bt);
    }
    demo_check(got == 1 && memcmp(again.msg_id, res.msg_id, BRK_UUID_LEN) == 0
          && strcmp(again.key, "order-2101") == 0 && again.delivery_count == 2,
          "it came back: same msg_id and key, delivery_count %" PRIu32,
          got ? again.delivery_count : 0);
    demo_check(back_after >= RETRY_MS - 50 && back_after <= LATE_MS,
          "not before the 1 s delay level, and soon after it: back %" PRId64
          " ms after the nack", back_after);
    brk_status st = brk_group_ack(b->g, "refunds", first.receipt);
    demo_check(st == BRK_CONFLICT, "the first delivery's receipt is stale now: ack gives %s",
          brk_status_name(st));
    if (got)
        check_st(brk_group_ack(b->g, "refunds", again.receipt),
                 "acked the second delivery");
    demo_check(receive_none(b->g, "refunds", "refunds"), "nothing more to receive");
}

/* ---- scene 3: poison message -------------------------------------------------- */

static bool header_is(brk_bytes props, const char *key, const char *want,
                      char *shown, size_t cap)
{
    brk_bytes v;
    if (brk_props_get(props, key, &v) != BRK_OK) {
        snprintf(shown, cap, "(missing)");
        return false;
    }
    demo_to_cstr(v, shown, cap);
    return want == NULL || demo_bytes_eq(v, want);
}

static void scene_poison(broker *b)
{
    demo_heading("3. A poison message goes to the dead-letter list, and is replayed");
    brk_group_config cfg;
    brk_group_config_init(&cfg);
    cfg.max_deliveries = 2;
    put_group(b->g, "invoicing", "invoices", &cfg,
              "group \"invoicing\" on \"invoices\", max_deliveries 2");
    brk_append_res res;
    if (!append_event(b->s, "invoices", "order-2201",
                      "{\"order\":\"order-2201\",\"vat\":\"XX-INVALID\"}", &res))
        return;
    printf("  order-2201's invoice event has a VAT number the consumer cannot\n"
           "  parse; every delivery is nacked (delay_ms 1: the 1 s level).\n");
    for (uint32_t d = 1; d <= 2; d++) {
        got_msg m;
        size_t n = receive_n(b->g, "invoicing", "invoices", 1, &m, 1);
        demo_check(n == 1 && memcmp(m.msg_id, res.msg_id, BRK_UUID_LEN) == 0
              && m.delivery_count == d,
              "delivery %" PRIu32 ": received with delivery_count %" PRIu32, d,
              n ? m.delivery_count : 0);
        if (n != 1)
            return;
        check_st(brk_group_nack(b->g, "invoicing", m.receipt, 1, "invalid VAT number"),
                 "nacked (\"invalid VAT number\")");
    }
    /* The second nack dead-letters it at once (max_deliveries reached). */
    brk_batch *dl = NULL;
    brk_status st = brk_group_dead_letters(b->g, "invoicing", 0, 10, &dl);
    demo_check(st == BRK_OK && dl && dl->count == 1
          && memcmp(dl->recs[0].msg_id, res.msg_id, BRK_UUID_LEN) == 0,
          "brk_group_dead_letters: 1 dead letter, the same msg_id (%s)",
          brk_status_name(st));
    if (st == BRK_OK && dl && dl->count == 1) {
        const brk_record *r = &dl->recs[0];
        char topic[64], queue[16], offset[32], deliveries[16], reason[64], group[64];
        char wantq[16], wanto[32];
        snprintf(wantq, sizeof wantq, "%u", (unsigned)res.queue);
        snprintf(wanto, sizeof wanto, "%" PRIu64, res.queue_offset);
        bool h = header_is(r->props, "outboxd-dlq-topic", "invoices", topic, sizeof topic);
        h = header_is(r->props, "outboxd-dlq-queue", wantq, queue, sizeof queue) && h;
        h = header_is(r->props, "outboxd-dlq-offset", wanto, offset, sizeof offset) && h;
        h = header_is(r->props, "outboxd-dlq-deliveries", "2", deliveries,
                      sizeof deliveries) && h;
        h = header_is(r->props, "outboxd-dlq-reason", "invalid VAT number", reason,
                      sizeof reason) && h;
        h = header_is(r->props, "outboxd-dlq-group", "invoicing", group, sizeof group) && h;
        demo_check(h, "headers: outboxd-dlq-topic=%s -queue=%s -offset=%s "
              "-deliveries=%s -reason=\"%s\" -group=%s", topic, queue, offset,
              deliveries, reason, group);
        demo_check(demo_bytes_eq(r->key, "order-2201")
              && demo_bytes_eq(r->body, "{\"order\":\"order-2201\",\"vat\":\"XX-INVALID\"}"),
              "key and body unchanged");
    }
    brk_batch_free(dl);
    demo_check(receive_none(b->g, "invoicing", "invoices"),
          "it is not delivered any more");
    brk_group_lag_row row;
    demo_check(lag_totals(b->g, "invoicing", "invoices", &row) && row.dead_letters == 1
          && row.lag == 0,
          "lag of invoicing: 0, dead_letters 1");

    printf("  The parser is fixed; the dead letter is replayed.\n");
    size_t replayed = 0;
    st = brk_group_replay_dead_letters(b->g, "invoicing", 10, &replayed);
    demo_check(st == BRK_OK && replayed == 1, "brk_group_replay_dead_letters: %zu replayed (%s)",
          replayed, brk_status_name(st));
    got_msg m;
    size_t n = receive_n(b->g, "invoicing", "invoices", 1, &m, 1);
    demo_check(n == 1 && memcmp(m.msg_id, res.msg_id, BRK_UUID_LEN) == 0
          && m.delivery_count == 1 && !m.has_dlq_header
          && strcmp(m.key, "order-2201") == 0,
          "received again from \"invoices\": same msg_id and key, delivery_count "
          "%" PRIu32 ", no outboxd-dlq-* headers", n ? m.delivery_count : 0);
    if (n == 1)
        check_st(brk_group_ack(b->g, "invoicing", m.receipt), "acked");
    size_t again = 0;
    st = brk_group_replay_dead_letters(b->g, "invoicing", 10, &again);
    demo_check(st == BRK_OK && again == 0, "a second replay finds nothing new to replay");
}

/* ---- scene 4: lag ------------------------------------------------------------- */

static void scene_lag(broker *b)
{
    demo_heading("4. Lag: the backlog before consuming, 0 after");
    brk_group_config cfg;
    brk_group_config_init(&cfg);
    put_group(b->g, "inventory", "stock", &cfg, "group \"inventory\" on \"stock\" (4 queues)");
    enum { NLAG = 12 };
    bool ok = true;
    for (int i = 0; i < NLAG; i++) {
        char key[32], body[96];
        brk_append_res res;
        snprintf(key, sizeof key, "order-%d", 2301 + i);
        snprintf(body, sizeof body, "{\"order\":\"%s\",\"reserve\":1}", key);
        ok = append_event(b->s, "stock", key, body, &res) && ok;
    }
    demo_check(ok, "appended %d stock reservations", NLAG);
    brk_group_lag_row *rows = NULL;
    size_t nrows = 0;
    brk_status st = brk_group_lag(b->g, "inventory", &rows, &nrows);
    uint64_t sum = 0, max_sum = 0;
    bool totals = false;
    brk_group_lag_row tot;
    memset(&tot, 0, sizeof tot);
    for (size_t i = 0; st == BRK_OK && i < nrows; i++) {
        if (strcmp(rows[i].topic, "stock") != 0)
            continue;
        if (rows[i].queue < 0) {
            tot = rows[i];
            totals = true;
        } else {
            printf("    queue %" PRId32 ": max %" PRIu64 ", committed %" PRIu64
                   ", lag %" PRIu64 "\n", rows[i].queue, rows[i].max_offset,
                   rows[i].committed_offset, rows[i].lag);
            sum += rows[i].lag;
            max_sum += rows[i].max_offset;
        }
    }
    free(rows);
    demo_check(st == BRK_OK && totals && tot.lag == NLAG && sum == NLAG && max_sum == NLAG
          && tot.inflight == 0 && tot.oldest_unacked_ms > 0,
          "before consuming: lag %" PRIu64 " (the queue rows add up to it), "
          "0 in flight, oldest unacked has a store time", tot.lag);
    got_msg got[NLAG];
    size_t n = receive_n(b->g, "inventory", "stock", NLAG, got, NLAG);
    demo_check(n == NLAG, "received all %zu", n);
    /* (Fill `tot` first: demo_check()'s arguments are evaluated in no
     * particular order.) */
    bool have = lag_totals(b->g, "inventory", "stock", &tot);
    demo_check(have && tot.lag == NLAG && tot.inflight == NLAG,
          "received but not acked: lag still %" PRIu64 ", %" PRIu64 " in flight",
          tot.lag, tot.inflight);
    bool acked = true;
    for (size_t i = 0; i < n && i < NLAG; i++)
        acked = brk_group_ack(b->g, "inventory", got[i].receipt) == BRK_OK && acked;
    demo_check(acked, "acked all");
    have = lag_totals(b->g, "inventory", "stock", &tot);
    demo_check(have && tot.lag == 0 && tot.inflight == 0 && tot.oldest_unacked_ms == 0
          && tot.committed_offset == tot.max_offset,
          "after the acks: lag %" PRIu64 ", 0 in flight, committed = max", tot.lag);
    demo_check(lag_totals(b->g, "billing", "orders", &tot) && tot.lag == 0
          && lag_totals(b->g, "shipping", "orders", &tot) && tot.lag == 0,
          "billing and shipping (scene 1) have lag 0 too");
}

/* ---- scene 5: restart --------------------------------------------------------- */

enum { NRS = 6 };

static bool scene_restart(broker *b, const char *dir)
{
    demo_heading("5. Restart: acked messages stay acked, unacked ones come back");
    brk_append_res res[NRS];
    bool ok = true;
    for (int i = 0; i < NRS; i++) {
        char key[32], body[96];
        snprintf(key, sizeof key, "order-%d", 2401 + i);
        snprintf(body, sizeof body, "{\"order\":\"%s\",\"courier\":\"booked\"}", key);
        ok = append_event(b->s, "deliveries", key, body, &res[i]) && ok;
    }
    demo_check(ok, "appended %d delivery bookings", NRS);
    got_msg got[NRS];
    size_t n = receive_n(b->g, "courier", "deliveries", NRS, got, NRS);
    demo_check(n == NRS, "group \"courier\" received all %zu", n);
    if (n != NRS)
        return true;
    /* Ack every other message (acks out of queue order are kept too). */
    bool acked_ok = true;
    for (int i = 0; i < NRS; i += 2)
        acked_ok = brk_group_ack(b->g, "courier", got[i].receipt) == BRK_OK && acked_ok;
    demo_check(acked_ok, "acked 3 of them (%s, %s, %s); 3 stay in flight", got[0].key,
          got[2].key, got[4].key);
    printf("  Closing groups and store (a clean close persists progress), reopening.\n");
    if (!broker_close(b) || !broker_open(b, dir))
        return false;
    demo_check(true, "store and groups reopened");
    got_msg again[NRS];
    size_t m = receive_n(b->g, "courier", "deliveries", 3, again, NRS);
    /* Anything beyond the 3 would show up at once: one more non-blocking look. */
    bool extra = !receive_none(b->g, "courier", "deliveries");
    bool right = m == 3 && !extra;
    for (size_t i = 0; i < m && i < NRS; i++) {
        bool unacked = false;
        for (int k = 1; k < NRS; k += 2)
            unacked = unacked || memcmp(again[i].msg_id, got[k].msg_id, BRK_UUID_LEN) == 0;
        right = right && unacked && again[i].delivery_count == 1;
    }
    demo_check(right, "redelivered: exactly the 3 unacked (%s, %s, %s), none of the acked",
          got[1].key, got[3].key, got[5].key);
    brk_status st = brk_group_ack(b->g, "courier", got[1].receipt);
    demo_check(st == BRK_CONFLICT, "a receipt from before the restart is stale: %s",
          brk_status_name(st));
    bool acked = true;
    for (size_t i = 0; i < m && i < NRS; i++)
        acked = brk_group_ack(b->g, "courier", again[i].receipt) == BRK_OK && acked;
    brk_group_lag_row tot;
    demo_check(acked && lag_totals(b->g, "courier", "deliveries", &tot) && tot.lag == 0,
          "acked the redeliveries: courier's lag is 0");
    demo_check(receive_none(b->g, "billing", "orders")
          && receive_none(b->g, "shipping", "orders")
          && receive_none(b->g, "inventory", "stock"),
          "billing, shipping and inventory get nothing again after the restart");
    return true;
}

/* ---- scene 6: long polling ---------------------------------------------------- */

typedef struct poller {
    brk_groups *g;
    brk_status st;
    size_t count;
    uint8_t msg_id[BRK_UUID_LEN];
    int64_t started, returned;      /* mono ms */
    char receipt[BRK_RECEIPT_MAX + 1];
} poller;

static void *poller_main(void *arg)
{
    poller *p = arg;
    brk_receive_req rq = { .group = "pager", .topic = "alerts", .max = 4 };
    brk_receive_batch *b = NULL;
    p->started = demo_mono_ms();
    p->st = brk_group_receive_wait(p->g, &rq, 5000, &b);
    p->returned = demo_mono_ms();
    p->count = b ? b->count : 0;
    if (p->count) {
        memcpy(p->msg_id, b->msgs[0].rec.msg_id, BRK_UUID_LEN);
        snprintf(p->receipt, sizeof p->receipt, "%s", b->msgs[0].receipt);
    }
    brk_receive_batch_free(b);
    return NULL;
}

static void scene_long_poll(broker *b)
{
    demo_heading("6. Long polling: a waiting consumer gets a new message at once");
    brk_group_config cfg;
    brk_group_config_init(&cfg);
    put_group(b->g, "pager", "alerts", &cfg, "group \"pager\" on \"alerts\"");
    /* An empty wait first: it returns empty when its time is up. */
    brk_receive_req rq = { .group = "pager", .topic = "alerts", .max = 4 };
    brk_receive_batch *bt = NULL;
    int64_t t = demo_mono_ms();
    brk_status st = brk_group_receive_wait(b->g, &rq, 300, &bt);
    int64_t took = demo_mono_ms() - t;
    demo_check(st == BRK_OK && bt && bt->count == 0 && took >= 290 && took < 2000,
          "nothing to receive: a 300 ms wait returns empty after %" PRId64 " ms", took);
    brk_receive_batch_free(bt);

    printf("  A consumer waits up to 5 s; 200 ms later an alert is appended.\n");
    poller p = { .g = b->g };
    pthread_t th;
    if (pthread_create(&th, NULL, poller_main, &p) != 0) {
        demo_check(false, "pthread_create");
        return;
    }
    demo_sleep_ms(200);
    brk_append_res res;
    int64_t t_append = demo_mono_ms();
    bool ok = append_event(b->s, "alerts", "order-2501",
                           "{\"order\":\"order-2501\",\"alert\":\"stuck at customs\"}",
                           &res);
    int64_t t_appended = demo_mono_ms();
    pthread_join(th, NULL);
    demo_check(ok && p.st == BRK_OK && p.count == 1
          && memcmp(p.msg_id, res.msg_id, BRK_UUID_LEN) == 0,
          "the waiting consumer received the alert (%s, %zu message)",
          brk_status_name(p.st), p.count);
    demo_check(p.returned >= t_append,
          "it was still waiting when the append began (returned %" PRId64
          " ms after it started waiting)", p.returned - p.started);
    int64_t latency = p.returned - t_appended;
    demo_check(p.returned - t_append < 500,
          "woken %" PRId64 " ms after the append returned (append took %" PRId64
          " ms): well under a second, not at the 5 s deadline",
          latency < 0 ? 0 : latency, t_appended - t_append);
    if (p.count)
        check_st(brk_group_ack(b->g, "pager", p.receipt), "acked");
}

/* ---- main ---------------------------------------------------------------------- */

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

    printf("outboxd consumer groups demo (broker_core)\n\n"
           "The consumer side of the order service.  Store: %s (SYNC flush),\n"
           "system clock, store and group threads running.\n", dir);

    demo_heading("0. Open");
    if (!broker_open(&b, dir))
        goto done;
    demo_check(true, "store and consumer groups are open");
    check_st(brk_topic_create(b.s, "orders", 4), "created topic \"orders\" (4 queues)");
    check_st(brk_topic_create(b.s, "refunds", 1), "created topic \"refunds\" (1 queue)");
    check_st(brk_topic_create(b.s, "invoices", 1), "created topic \"invoices\" (1 queue)");
    check_st(brk_topic_create(b.s, "stock", 4), "created topic \"stock\" (4 queues)");
    check_st(brk_topic_create(b.s, "deliveries", 2),
             "created topic \"deliveries\" (2 queues)");
    check_st(brk_topic_create(b.s, "alerts", 1), "created topic \"alerts\" (1 queue)");

    scene_orders(&b);
    scene_nack(&b);
    scene_poison(&b);
    scene_lag(&b);
    if (!scene_restart(&b, dir))
        goto done;
    scene_long_poll(&b);

done:
    if (b.s)
        broker_close(&b);
    char tail[64];
    snprintf(tail, sizeof tail, " (%.1f s).",
             (double)(demo_mono_ms() - t0) / 1000.0);
    return demo_verdict(tail);
}
