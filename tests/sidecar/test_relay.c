/*
 * test_relay.c - the outbox relay (sidecar/src/relay.h) against a real
 * PostgreSQL (tests/support/pg_harness) and a real store in a scratch
 * directory: how a row becomes a message (every field, JSON bodies byte for
 * byte as the HTTP API stores them), waking by NOTIFY and by polling, the
 * commit-order proof with concurrent writers committing out of id order,
 * two replicas on one database, a row stored before a crash, PostgreSQL
 * stopped mid-run, rows the store refuses for good or for now, and the
 * start-up checks (schema, grants, unreachable server).
 *
 * One server for the program (group setup); every test makes its own
 * database and store.  Rows are written with libpq and parameters; schema
 * changes and counts go through psql (pgh_sql).  Waits poll for a state
 * with a generous deadline; nothing asserts on speed.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "broker/store.h"
#include "broker/uuid.h"
#include "log.h"
#include "pg_harness.h"
#include "relay.h"
#include "tmpdir.h"
/* The HTTP API's own codec: a relayed JSON body must be the bytes it
 * stores for the same JSON. */
#include "../../http_api/src/codec.h"

#define WAIT_MS 30000           /* deadline of every wait for a state */

static pgh *g_pg;
static int g_db_seq;

/* ---- helpers ----------------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0) {}
}

#define WAIT_FOR(cond)                                                          \
    do {                                                                        \
        int64_t wait_end_ = now_ms() + WAIT_MS;                                 \
        while (!(cond) && now_ms() < wait_end_) sleep_ms(10);                   \
        if (!(cond)) fail_msg("timed out waiting for: %s", #cond);              \
    } while (0)

static void sql(const char *db, const char *text)
{
    if (pgh_sql(g_pg, db, text, NULL, 0) != 0)
        fail_msg("SQL failed in %s: %s", db, text);
}

static long long rows_left(const char *db)
{
    return pgh_sql_int(g_pg, db, "SELECT count(*) FROM outbox.messages");
}

static PGconn *connect_as(const char *db, const char *user)
{
    char url[256];
    pgh_url(g_pg, db, user, NULL, url, sizeof url);
    PGconn *c = PQconnectdb(url);
    if (PQstatus(c) != CONNECTION_OK)
        fail_msg("connect %s: %s", url, PQerrorMessage(c));
    return c;
}

/* A row to insert; NULL fields are SQL NULL. */
typedef struct newrow {
    const char *topic, *key, *tag, *headers, *body;
    const void *bytes;
    size_t bytes_len;
} newrow;

/* What INSERT ... RETURNING gave back. */
typedef struct inserted {
    uint8_t msg_id[BRK_UUID_LEN];
    int64_t created_ms;
    char body_text[4096];       /* body::text as jsonb prints it */
} inserted;

static void insert_on(PGconn *c, const newrow *w, inserted *out)
{
    const char *v[6] = { w->topic, w->key, w->tag, w->headers, w->body,
                         (const char *)w->bytes };
    int len[6] = { 0, 0, 0, 0, 0, (int)w->bytes_len };
    int fmt[6] = { 0, 0, 0, 0, 0, 1 };
    PGresult *r = PQexecParams(c,
        "INSERT INTO outbox.messages (topic, key, tag, headers, body, body_bytes)"
        " VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6::bytea)"
        " RETURNING msg_id::text,"
        " floor(extract(epoch FROM created_at) * 1000)::bigint,"
        " coalesce(body::text, '')", 6, NULL, v, len, fmt, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        fail_msg("insert: %s", PQresultErrorMessage(r));
    if (out) {
        assert_int_equal(brk_uuid_parse(PQgetvalue(r, 0, 0), BRK_UUID_STR_LEN,
                                        out->msg_id), BRK_OK);
        out->created_ms = strtoll(PQgetvalue(r, 0, 1), NULL, 10);
        snprintf(out->body_text, sizeof out->body_text, "%s", PQgetvalue(r, 0, 2));
    }
    PQclear(r);
}

static void insert(const char *db, const newrow *w, inserted *out)
{
    PGconn *c = connect_as(db, NULL);
    insert_on(c, w, out);
    PQfinish(c);
}

/* n rows of topic "orders", keys k0..k9, bodies {"g": i}, one statement. */
static void insert_many(const char *db, int from, int n)
{
    char q[512];
    snprintf(q, sizeof q,
             "INSERT INTO outbox.messages (topic, key, body)"
             " SELECT 'orders', 'k' || (g %% 10), jsonb_build_object('g', g)"
             " FROM generate_series(%d, %d) g", from, from + n - 1);
    sql(db, q);
}

/* ---- fixture ------------------------------------------------------------------- */

typedef struct fixture {
    char db[64];
    char url[256];
    char dir[512];              /* scratch: stores in dir/a, dir/b, dir/c */
    brk_store_opts so;
    brk_store *s[3];
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    if (!f || brk_tmpdir_new("sc_relay", f->dir, sizeof f->dir) != 0)
        return -1;
    snprintf(f->db, sizeof f->db, "relay_%d", ++g_db_seq);
    if (pgh_create_db(g_pg, f->db, true) != 0)
        return -1;
    pgh_url(g_pg, f->db, NULL, NULL, f->url, sizeof f->url);
    brk_store_opts_init(&f->so);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    for (int i = 0; i < 3; i++) brk_store_close(f->s[i]);
    brk_tmpdir_remove(f->dir);
    free(f);
    return 0;
}

static brk_store *open_store(fixture *f, int i)
{
    char path[600], err[256];
    snprintf(path, sizeof path, "%s/%c", f->dir, 'a' + i);
    brk_status st = brk_store_open(&f->s[i], path, &f->so, err, sizeof err);
    if (st != BRK_OK) fail_msg("store open: %s: %s", brk_status_name(st), err);
    return f->s[i];
}

static void close_store(fixture *f, int i)
{
    assert_int_equal(brk_store_close(f->s[i]), BRK_OK);
    f->s[i] = NULL;
}

static void relay_opts(fixture *f, sc_relay_opts *o, brk_store *s, bool thread)
{
    sc_relay_opts_init(o);
    o->pg.conninfo = f->url;
    o->pg.backoff_min_ms = 20;
    o->pg.backoff_max_ms = 200;
    o->pg.connect_timeout_ms = 2000;
    o->store = s;
    o->no_thread = !thread;
}

static sc_relay *open_relay(const sc_relay_opts *o)
{
    sc_relay *r = NULL;
    char err[512];
    int rc = sc_relay_open(&r, o, err, sizeof err);
    if (rc != 0) fail_msg("relay open: %d: %s", rc, err);
    return r;
}

static sc_relay_stats stats(sc_relay *r)
{
    sc_relay_stats s;
    sc_relay_get_stats(r, &s);
    return s;
}

/* One stored message, copied out of its batch. */
typedef struct smsg {
    uint8_t id[BRK_UUID_LEN];
    uint16_t queue;
    uint32_t flags;
    int64_t born_ms, store_ms;
    char key[BRK_KEY_MAX + 1];
    char tag[BRK_TAG_MAX + 1];
    uint8_t *body;
    size_t body_len;
    uint8_t *props;
    size_t props_len;
} smsg;

typedef struct msgs {
    smsg *m;
    size_t n;
} msgs;

static void msgs_free(msgs *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->m[i].body);
        free(l->m[i].props);
    }
    free(l->m);
    memset(l, 0, sizeof *l);
}

static void copy_rec(smsg *d, const brk_record *rec)
{
    memset(d, 0, sizeof *d);
    memcpy(d->id, rec->msg_id, BRK_UUID_LEN);
    d->queue = rec->queue;
    d->flags = rec->flags;
    d->born_ms = rec->born_ms;
    d->store_ms = rec->store_ms;
    memcpy(d->key, rec->key.ptr, rec->key.len);
    memcpy(d->tag, rec->tag.ptr, rec->tag.len);
    d->body = malloc(rec->body.len + 1);
    memcpy(d->body, rec->body.ptr, rec->body.len);
    d->body[rec->body.len] = 0;
    d->body_len = rec->body.len;
    d->props = malloc(rec->props.len + 1);
    memcpy(d->props, rec->props.ptr, rec->props.len);
    d->props_len = rec->props.len;
}

/* Every message of `topic`, queue by queue, each queue in its order. */
static msgs read_topic(brk_store *s, const char *topic)
{
    msgs l = { 0 };
    brk_topic_info ti;
    if (brk_topic_get(s, topic, &ti) != BRK_OK) return l;
    for (uint16_t q = 0; q < ti.queues; q++) {
        uint64_t from = 0;
        for (;;) {
            brk_batch *b = NULL;
            assert_int_equal(brk_store_read(s, topic, q, from, 256, &b), BRK_OK);
            if (b->count == 0) {
                brk_batch_free(b);
                break;
            }
            l.m = realloc(l.m, (l.n + b->count) * sizeof *l.m);
            for (size_t i = 0; i < b->count; i++) copy_rec(&l.m[l.n++], &b->recs[i]);
            from = b->next_offset;
            brk_batch_free(b);
        }
    }
    return l;
}

static const smsg *find_msg(const msgs *l, const uint8_t id[BRK_UUID_LEN])
{
    for (size_t i = 0; i < l->n; i++)
        if (memcmp(l->m[i].id, id, BRK_UUID_LEN) == 0) return &l->m[i];
    return NULL;
}

static int cmp_id(const void *a, const void *b)
{
    return memcmp(a, b, BRK_UUID_LEN);
}

/* The ids of l, sorted; fails if one appears twice. */
static uint8_t (*sorted_unique_ids(const msgs *l))[BRK_UUID_LEN]
{
    uint8_t (*ids)[BRK_UUID_LEN] = malloc((l->n + 1) * BRK_UUID_LEN);
    for (size_t i = 0; i < l->n; i++) memcpy(ids[i], l->m[i].id, BRK_UUID_LEN);
    qsort(ids, l->n, BRK_UUID_LEN, cmp_id);
    for (size_t i = 1; i < l->n; i++)
        if (memcmp(ids[i - 1], ids[i], BRK_UUID_LEN) == 0)
            fail_msg("message id stored twice");
    return ids;
}

static bool prop_is(const smsg *m, const char *key, const char *want)
{
    brk_bytes v;
    if (brk_props_get((brk_bytes){ m->props, m->props_len }, key, &v) != BRK_OK)
        return false;
    return v.len == strlen(want) && memcmp(v.ptr, want, v.len) == 0;
}

static bool prop_has(const smsg *m, const char *key, const char *part)
{
    brk_bytes v;
    if (brk_props_get((brk_bytes){ m->props, m->props_len }, key, &v) != BRK_OK)
        return false;
    char buf[1024];
    size_t n = v.len < sizeof buf - 1 ? v.len : sizeof buf - 1;
    memcpy(buf, v.ptr, n);
    buf[n] = 0;
    return strstr(buf, part) != NULL;
}

/* ---- mapping ---------------------------------------------------------------------- */

static void row_maps_every_field_and_is_deleted(void **state)
{
    fixture *f = *state;
    brk_store *s = open_store(f, 0);
    inserted a, b;
    static const char tp[] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    char headers[256];
    snprintf(headers, sizeof headers,
             "{\"traceparent\": \"%s\", \"x-tenant\": \"acme\"}", tp);
    insert(f->db, &(newrow){ .topic = "orders", .key = "order-42",
                             .tag = "created", .headers = headers,
                             .body = "{\"id\": 42, \"items\": [1, 2.5, \"x\"],"
                                     " \"note\": \"a/b \\\"q\\\"\"}" }, &a);
    static const uint8_t bytes[] = { 0x00, 0xff, 0x00, 0x41, 0x00 };
    insert(f->db, &(newrow){ .topic = "blobs", .bytes = bytes,
                             .bytes_len = sizeof bytes }, &b);

    sc_relay_opts o;
    relay_opts(f, &o, s, false);
    sc_relay *r = open_relay(&o);
    size_t n = 0;
    assert_int_equal(sc_relay_run_once(r, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(rows_left(f->db), 0);
    sc_relay_stats st = stats(r);
    assert_int_equal(st.rows_stored, 2);
    assert_int_equal(st.rows_duplicate, 0);
    assert_int_equal(st.rows_rejected, 0);
    assert_true(st.connected);
    assert_true(st.leader);
    assert_string_equal(st.last_error, "");

    msgs orders = read_topic(s, "orders");
    assert_int_equal(orders.n, 1);
    const smsg *m = find_msg(&orders, a.msg_id);
    assert_non_null(m);
    uint16_t q;
    assert_int_equal(brk_topic_queue_for_key(s, "orders", "order-42", 8, &q), BRK_OK);
    assert_int_equal(m->queue, q);
    assert_string_equal(m->key, "order-42");
    assert_string_equal(m->tag, "created");
    assert_true(prop_is(m, "traceparent", tp));
    assert_true(prop_is(m, "x-tenant", "acme"));
    /* jsonb orders keys by length, then bytes; stored compactly. */
    assert_string_equal((char *)m->body,
                        "{\"id\":42,\"note\":\"a/b \\\"q\\\"\",\"items\":[1,2.5,\"x\"]}");
    assert_int_equal(m->flags, BRK_RECF_BODY_JSON);
    assert_int_equal(m->born_ms, a.created_ms);

    msgs blobs = read_topic(s, "blobs");
    assert_int_equal(blobs.n, 1);
    m = find_msg(&blobs, b.msg_id);
    assert_non_null(m);
    assert_int_equal(m->body_len, sizeof bytes);
    assert_memory_equal(m->body, bytes, sizeof bytes);
    assert_int_equal(m->flags, 0);
    assert_string_equal(m->key, "");
    assert_int_equal(m->props_len, 0);
    assert_int_equal(m->born_ms, b.created_ms);

    /* The store found it by the row's uuid too. */
    brk_batch *bt = NULL;
    assert_int_equal(brk_store_lookup(s, a.msg_id, &bt), BRK_OK);
    brk_batch_free(bt);

    /* Nothing left: the next batch is empty. */
    assert_int_equal(sc_relay_run_once(r, &n), 0);
    assert_int_equal(n, 0);
    msgs_free(&orders);
    msgs_free(&blobs);
    sc_relay_close(r);
}

static void json_body_is_the_http_api_bytes(void **state)
{
    fixture *f = *state;
    brk_store *s = open_store(f, 0);
    /* body, and what to POST for the comparison: NULL = the jsonb text the
     * row gave back (jsonb reorders keys; the HTTP API keeps the order it
     * is given).  Numbers jsonb prints as long integers (1e20 becomes
     * 100000000000000000000, which the HTTP API cannot read) compare with
     * the literal the application wrote. */
    static const struct { const char *body, *http; } cases[] = {
        { "{\"b\": 1, \"a\": {\"z\": [true, false, null]}, \"s\": \"\\u00e9\\u4e2d \\n\\t\\u0001 /\\\\\"}", NULL },
        { "0.1", NULL },
        { "[-0.0, 3.14159, 1.5e-7, 100, 0.30000000000000004, 1.10]", NULL },
        { "\"plain text\"", NULL },
        { "null", NULL },
        { "-9223372036854775808", NULL },
        { "{\"deep\": [[[[{\"x\": 1.0, \"y\": 1.10}]]]], \"\": \"\"}", NULL },
        { "{\"emoji\": \"\\ud83d\\ude00\", \"ctl\": \"\\u001f\\u007f\"}", NULL },
        { "[1e20, -2.5e300, 9223372036854775807, 12345678e30]",
          "[1e20, -2.5e300, 9223372036854775807, 12345678e30]" },
    };
    enum { N = sizeof cases / sizeof cases[0] };
    inserted in[N];
    for (int i = 0; i < N; i++)
        insert(f->db, &(newrow){ .topic = "json", .body = cases[i].body }, &in[i]);

    sc_relay_opts o;
    relay_opts(f, &o, s, false);
    sc_relay *r = open_relay(&o);
    size_t n = 0;
    assert_int_equal(sc_relay_run_once(r, &n), 0);
    assert_int_equal(n, N);
    sc_relay_stats st = stats(r);
    if (st.rows_rejected) {
        msgs rej = read_topic(s, SC_RELAY_REJECT_TOPIC);
        brk_bytes why = { "", 0 };
        brk_props_get((brk_bytes){ rej.m[0].props, rej.m[0].props_len }, "reason", &why);
        fail_msg("rejected: %.*s", (int)why.len, (const char *)why.ptr);
    }
    assert_int_equal(st.rows_stored, N);
    msgs l = read_topic(s, "json");
    assert_int_equal(l.n, N);
    for (int i = 0; i < N; i++) {
        /* What POST /v1/topics/json/messages stores for the same value. */
        char req[8192];
        snprintf(req, sizeof req, "{\"body\": %s}",
                 cases[i].http ? cases[i].http : in[i].body_text);
        json_t *obj = NULL;
        char err[256];
        assert_int_equal(api_json_parse_object(req, strlen(req), &obj, err,
                                               sizeof err), BRK_OK);
        api_msg am;
        assert_int_equal(api_msg_parse(obj, &am, err, sizeof err), BRK_OK);
        const smsg *m = find_msg(&l, in[i].msg_id);
        assert_non_null(m);
        assert_int_equal(m->flags, am.flags);
        if (m->body_len != am.body_len || memcmp(m->body, am.body, am.body_len))
            fail_msg("body %d: relay stored %.*s, HTTP stores %.*s", i,
                     (int)m->body_len, (char *)m->body, (int)am.body_len,
                     (char *)am.body);
        api_msg_free(&am);
        json_decref(obj);
    }
    msgs_free(&l);
    sc_relay_close(r);
}

/* ---- waking ------------------------------------------------------------------------- */

static void notify_wakes_a_relay_waiting_a_minute(void **state)
{
    fixture *f = *state;
    brk_store *s = open_store(f, 0);
    sc_relay_opts o;
    relay_opts(f, &o, s, true);
    o.poll_interval_ms = 60000;
    sc_relay *r = open_relay(&o);
    WAIT_FOR(stats(r).leader && stats(r).batches >= 1);
    sleep_ms(100);              /* well into its 60 s wait */
    int64_t t0 = now_ms();
    insert(f->db, &(newrow){ .topic = "orders", .body = "{\"n\": 1}" }, NULL);
    WAIT_FOR(stats(r).rows_stored == 1);
    /* Far sooner than the poll interval: the notification did it. */
    assert_true(now_ms() - t0 < 30000);
    assert_true(stats(r).notifies >= 1);
    assert_int_equal(rows_left(f->db), 0);
    sc_relay_close(r);
}

static void polling_relays_rows_when_no_notification_comes(void **state)
{
    fixture *f = *state;
    sql(f->db, "ALTER TABLE outbox.messages DISABLE TRIGGER messages_wake");
    brk_store *s = open_store(f, 0);
    sc_relay_opts o;
    relay_opts(f, &o, s, true);
    o.poll_interval_ms = 100;
    sc_relay *r = open_relay(&o);
    WAIT_FOR(stats(r).leader);
    insert(f->db, &(newrow){ .topic = "orders", .body = "{\"n\": 1}" }, NULL);
    insert(f->db, &(newrow){ .topic = "orders", .body = "{\"n\": 2}" }, NULL);
    WAIT_FOR(stats(r).rows_stored == 2);
    assert_int_equal(stats(r).notifies, 0);
    assert_int_equal(rows_left(f->db), 0);
    sc_relay_close(r);
}

static void wake_runs_a_batch_at_once(void **state)
{
    fixture *f = *state;
    sql(f->db, "ALTER TABLE outbox.messages DISABLE TRIGGER messages_wake");
    brk_store *s = open_store(f, 0);
    sc_relay_opts o;
    relay_opts(f, &o, s, true);
    o.poll_interval_ms = 60000;
    sc_relay *r = open_relay(&o);
    WAIT_FOR(stats(r).leader && stats(r).batches >= 1);
    insert(f->db, &(newrow){ .topic = "orders", .body = "{\"n\": 1}" }, NULL);
    sc_relay_wake(r);
    WAIT_FOR(stats(r).rows_stored == 1);
    sc_relay_close(r);
}

/* ---- commit order ---------------------------------------------------------------------- */

#define WRITERS   16
#define TXNS      40
#define KEYS      8

typedef struct writers {
    const char *db;
    pthread_mutex_t mu;
    uint8_t (*committed)[BRK_UUID_LEN];
    size_t ncommitted;
    atomic_int rolled_back, deadlocks, failures;
    char failure[256];
} writers;

typedef struct writer_arg {
    writers *w;
    unsigned seed;
} writer_arg;

static bool is_deadlock(const PGresult *r)
{
    const char *st = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    return st && strcmp(st, "40P01") == 0;
}

static void *writer_main(void *p)
{
    writer_arg *a = p;
    writers *w = a->w;
    unsigned seed = a->seed;
    PGconn *c = connect_as(w->db, NULL);
    for (int t = 0; t < TXNS; t++) {
        /* One or two keys, in a random order: lock order may deadlock,
         * which PostgreSQL breaks by aborting one (counted as rolled back). */
        int k1 = rand_r(&seed) % KEYS, k2 = rand_r(&seed) % KEYS;
        int nk = (rand_r(&seed) % 3 == 0 && k2 != k1) ? 2 : 1;
        int keys[2] = { k1, k2 };
        uint8_t ids[2][BRK_UUID_LEN];
        bool ok = true;
        PGresult *r = PQexec(c, "BEGIN");
        PQclear(r);
        for (int i = 0; i < nk && ok; i++) {
            char key[16];
            snprintf(key, sizeof key, "key-%d", keys[i]);
            const char *v1[1] = { key };
            r = PQexecParams(c, "UPDATE counters SET n = n + 1 WHERE key = $1"
                             " RETURNING n", 1, NULL, v1, NULL, NULL, 0);
            if (PQresultStatus(r) != PGRES_TUPLES_OK) {
                if (!is_deadlock(r)) {
                    snprintf(w->failure, sizeof w->failure, "%s",
                             PQresultErrorMessage(r));
                    atomic_fetch_add(&w->failures, 1);
                } else {
                    atomic_fetch_add(&w->deadlocks, 1);
                }
                ok = false;
                PQclear(r);
                break;
            }
            char nbuf[32];
            snprintf(nbuf, sizeof nbuf, "%s", PQgetvalue(r, 0, 0));
            PQclear(r);
            const char *v2[2] = { key, nbuf };
            r = PQexecParams(c, "INSERT INTO outbox.messages (topic, key, body)"
                             " VALUES ('orders', $1, jsonb_build_object('key', $1::text,"
                             " 'n', $2::bigint)) RETURNING msg_id::text",
                             2, NULL, v2, NULL, NULL, 0);
            if (PQresultStatus(r) != PGRES_TUPLES_OK) {
                if (!is_deadlock(r)) {
                    snprintf(w->failure, sizeof w->failure, "%s",
                             PQresultErrorMessage(r));
                    atomic_fetch_add(&w->failures, 1);
                } else {
                    atomic_fetch_add(&w->deadlocks, 1);
                }
                ok = false;
                PQclear(r);
                break;
            }
            brk_uuid_parse(PQgetvalue(r, 0, 0), BRK_UUID_STR_LEN, ids[i]);
            PQclear(r);
        }
        /* Commit late and at random, so commits overtake each other. */
        sleep_ms(rand_r(&seed) % 4);
        bool roll = !ok || rand_r(&seed) % 5 == 0;
        r = PQexec(c, roll ? "ROLLBACK" : "COMMIT");
        bool committed = !roll && PQresultStatus(r) == PGRES_COMMAND_OK;
        PQclear(r);
        if (!committed) {
            atomic_fetch_add(&w->rolled_back, 1);
            continue;
        }
        pthread_mutex_lock(&w->mu);
        for (int i = 0; i < nk; i++)
            memcpy(w->committed[w->ncommitted++], ids[i], BRK_UUID_LEN);
        pthread_mutex_unlock(&w->mu);
    }
    PQfinish(c);
    return NULL;
}

static void concurrent_out_of_order_commits_keep_every_row_once_in_key_order(void **state)
{
    fixture *f = *state;
    sql(f->db, "CREATE TABLE counters (key text PRIMARY KEY, n bigint NOT NULL);"
               "INSERT INTO counters SELECT 'key-' || g, 0 FROM generate_series(0, 7) g");
    brk_store *s = open_store(f, 0);
    sc_relay_opts o;
    relay_opts(f, &o, s, true);
    o.batch = 8;                /* many batches, interleaved with commits */
    o.poll_interval_ms = 50;
    sc_relay *r = open_relay(&o);

    writers w = { .db = f->db };
    pthread_mutex_init(&w.mu, NULL);
    w.committed = malloc((size_t)WRITERS * TXNS * 2 * BRK_UUID_LEN);
    pthread_t th[WRITERS];
    writer_arg args[WRITERS];
    for (int i = 0; i < WRITERS; i++) {
        args[i] = (writer_arg){ &w, 1234u + (unsigned)i * 7919u };
        assert_int_equal(pthread_create(&th[i], NULL, writer_main, &args[i]), 0);
    }
    for (int i = 0; i < WRITERS; i++) pthread_join(th[i], NULL);
    if (atomic_load(&w.failures)) fail_msg("writer failed: %s", w.failure);
    assert_true(atomic_load(&w.rolled_back) > 0);
    assert_true(w.ncommitted > 100);

    WAIT_FOR(rows_left(f->db) == 0 && stats(r).rows_stored >= w.ncommitted);
    sc_relay_stats st = stats(r);
    assert_int_equal(st.rows_duplicate, 0);
    assert_int_equal(st.rows_rejected, 0);
    assert_true(st.batches > 10);
    sc_relay_close(r);

    /* Exactly the committed rows, each once. */
    msgs l = read_topic(s, "orders");
    assert_int_equal(l.n, w.ncommitted);
    uint8_t (*ids)[BRK_UUID_LEN] = sorted_unique_ids(&l);
    qsort(w.committed, w.ncommitted, BRK_UUID_LEN, cmp_id);
    assert_memory_equal(ids, w.committed, w.ncommitted * BRK_UUID_LEN);
    free(ids);

    /* Per key, one queue, and n increasing in queue order (the order a
     * consumer reads). */
    long long last_n[KEYS];
    int qof[KEYS];
    for (int k = 0; k < KEYS; k++) {
        last_n[k] = 0;
        char key[16];
        snprintf(key, sizeof key, "key-%d", k);
        uint16_t q;
        assert_int_equal(brk_topic_queue_for_key(s, "orders", key, strlen(key), &q),
                         BRK_OK);
        qof[k] = q;
    }
    size_t counted = 0;
    for (size_t i = 0; i < l.n; i++) {
        json_error_t je;
        json_t *b = json_loadb((char *)l.m[i].body, l.m[i].body_len, 0, &je);
        assert_non_null(b);
        int k = -1;
        sscanf(json_string_value(json_object_get(b, "key")), "key-%d", &k);
        assert_true(k >= 0 && k < KEYS);
        assert_string_equal(l.m[i].key, json_string_value(json_object_get(b, "key")));
        long long n = json_integer_value(json_object_get(b, "n"));
        assert_int_equal(l.m[i].queue, qof[k]);
        if (n <= last_n[k])
            fail_msg("key-%d: n %lld stored after %lld", k, n, last_n[k]);
        last_n[k] = n;
        counted++;
        json_decref(b);
    }
    assert_int_equal(counted, w.ncommitted);
    /* The last n of each key is its counter: no committed row missing. */
    for (int k = 0; k < KEYS; k++) {
        char q[96];
        snprintf(q, sizeof q, "SELECT n FROM counters WHERE key = 'key-%d'", k);
        assert_int_equal(pgh_sql_int(g_pg, f->db, q), last_n[k]);
    }
    msgs_free(&l);
    free(w.committed);
    pthread_mutex_destroy(&w.mu);
}

/* ---- replicas ------------------------------------------------------------------------------ */

static void replicas_relay_each_row_into_one_store_and_take_over(void **state)
{
    fixture *f = *state;
    brk_store *sa = open_store(f, 0), *sb = open_store(f, 1), *sc = open_store(f, 2);
    sc_relay_opts o;
    relay_opts(f, &o, sa, true);
    o.poll_interval_ms = 100;
    sc_relay *ra = open_relay(&o);
    WAIT_FOR(stats(ra).leader);
    o.store = sb;
    sc_relay *rb = open_relay(&o);
    WAIT_FOR(stats(rb).connected);
    sc_relay_opts oc;
    relay_opts(f, &oc, sc, false);
    sc_relay *rc = open_relay(&oc);

    /* A standby never waits for the leader: it says so and returns. */
    assert_int_equal(sc_relay_run_once(rc, NULL), 1);
    assert_false(stats(rc).leader);

    insert_many(f->db, 1, 30);
    for (int i = 31; i <= 40; i++) {
        char body[32];
        snprintf(body, sizeof body, "{\"g\": %d}", i);
        insert(f->db, &(newrow){ .topic = "orders", .key = "solo", .body = body }, NULL);
    }
    WAIT_FOR(stats(ra).rows_stored == 40);
    assert_int_equal(rows_left(f->db), 0);
    sleep_ms(300);              /* a few standby retries */
    assert_int_equal(stats(rb).rows_stored, 0);
    assert_false(stats(rb).leader);
    assert_int_equal(sc_relay_run_once(rc, NULL), 1);

    /* The leader goes: the session's lock with it. */
    sc_relay_close(ra);
    WAIT_FOR(stats(rb).leader);
    insert_many(f->db, 41, 30);
    WAIT_FOR(stats(rb).rows_stored == 30);
    assert_int_equal(rows_left(f->db), 0);
    assert_int_equal(sc_relay_run_once(rc, NULL), 1);
    sc_relay_close(rb);
    sc_relay_close(rc);

    msgs la = read_topic(sa, "orders"), lb = read_topic(sb, "orders");
    assert_int_equal(la.n, 40);
    assert_int_equal(lb.n, 30);
    uint8_t (*ia)[BRK_UUID_LEN] = sorted_unique_ids(&la);
    uint8_t (*ib)[BRK_UUID_LEN] = sorted_unique_ids(&lb);
    for (size_t i = 0; i < lb.n; i++)
        assert_null(find_msg(&la, ib[i]));
    for (size_t i = 0; i < lb.n; i++) {
        json_t *b = json_loadb((char *)lb.m[i].body, lb.m[i].body_len, 0, NULL);
        assert_true(json_integer_value(json_object_get(b, "g")) > 40);
        json_decref(b);
    }
    assert_int_equal(brk_topic_get(sc, "orders", &(brk_topic_info){ 0 }), BRK_NOTFOUND);
    free(ia);
    free(ib);
    msgs_free(&la);
    msgs_free(&lb);
}

/* ---- failures ------------------------------------------------------------------------------ */

static void row_stored_before_a_crash_is_not_stored_again(void **state)
{
    fixture *f = *state;
    brk_store *s = open_store(f, 0);
    inserted a, b;
    insert(f->db, &(newrow){ .topic = "orders", .key = "k", .body = "{\"a\": 1}" }, &a);
    insert(f->db, &(newrow){ .topic = "orders", .key = "k", .body = "{\"a\": 2}" }, &b);
    /* As if a relay appended row a and died before its DELETE committed. */
    brk_append_req q = { .topic = "orders", .queue = -1,
                         .key = { "k", 1 }, .body = { "{\"a\":1}", 7 },
                         .flags = BRK_RECF_BODY_JSON, .msg_id = a.msg_id,
                         .born_ms = a.created_ms };
    brk_append_res res;
    assert_int_equal(brk_store_append(s, &q, &res), BRK_OK);

    sc_relay_opts o;
    relay_opts(f, &o, s, false);
    sc_relay *r = open_relay(&o);
    size_t n = 0;
    assert_int_equal(sc_relay_run_once(r, &n), 0);
    assert_int_equal(n, 2);
    sc_relay_stats st = stats(r);
    assert_int_equal(st.rows_duplicate, 1);
    assert_int_equal(st.rows_stored, 1);
    assert_int_equal(rows_left(f->db), 0);
    msgs l = read_topic(s, "orders");
    assert_int_equal(l.n, 2);
    assert_memory_equal(l.m[0].id, a.msg_id, BRK_UUID_LEN);
    assert_memory_equal(l.m[1].id, b.msg_id, BRK_UUID_LEN);
    msgs_free(&l);
    sc_relay_close(r);
}

static void postgres_stopped_mid_run_then_every_row_stored_once(void **state)
{
    fixture *f = *state;
    f->so.flush_mode = BRK_FLUSH_SYNC;
    brk_store *s = open_store(f, 0);
    insert_many(f->db, 1, 2000);
    sc_relay_opts o;
    relay_opts(f, &o, s, true);
    o.batch = 5;
    o.poll_interval_ms = 100;
    sc_relay *r = open_relay(&o);
    WAIT_FOR(stats(r).rows_stored >= 50);
    assert_int_equal(pgh_stop(g_pg), 0);
    WAIT_FOR(!stats(r).connected);
    assert_true(stats(r).last_error[0] != '\0');
    assert_true(stats(r).errors >= 1);
    sleep_ms(300);              /* a few failed reconnects */
    assert_int_equal(pgh_restart(g_pg), 0);
    WAIT_FOR(stats(r).connected);
    insert_many(f->db, 2001, 20);
    WAIT_FOR(rows_left(f->db) == 0);
    sc_relay_close(r);          /* finishes the batch in hand */

    msgs l = read_topic(s, "orders");
    assert_int_equal(l.n, 2020);
    free(sorted_unique_ids(&l));
    msgs_free(&l);
}

static void rows_refused_for_good_are_kept_aside_and_the_rest_flows(void **state)
{
    fixture *f = *state;
    f->so.auto_create_topics = false;
    f->so.max_body_bytes = 1024;
    brk_store *s = open_store(f, 0);
    assert_int_equal(brk_topic_create(s, "orders", 2), BRK_OK);

    inserted in[5];
    insert(f->db, &(newrow){ .topic = "nowhere", .key = "k1",
                             .headers = "{\"h\": \"v\"}", .body = "{\"x\": 1}" }, &in[0]);
    static uint8_t big[2000];
    memset(big, 'z', sizeof big);
    insert(f->db, &(newrow){ .topic = "orders", .bytes = big, .bytes_len = sizeof big },
           &in[1]);
    insert(f->db, &(newrow){ .topic = "orders", .tag = "t",
                             .headers = "{\"n\": 5}", .body = "[1, 2]" }, &in[2]);
    /* Neither an int64 nor a double: it would change.  (1e400 likewise.) */
    insert(f->db, &(newrow){ .topic = "orders", .body = "[12345678901234567890123, 1e400]" },
           &in[3]);
    insert(f->db, &(newrow){ .topic = "orders", .key = "good", .body = "{\"ok\": true}" },
           &in[4]);

    FILE *logf = tmpfile();
    sc_log *log = sc_log_open(API_LOG_INFO, logf);
    sc_relay_opts o;
    relay_opts(f, &o, s, false);
    o.log = log;
    sc_relay *r = open_relay(&o);
    size_t n = 0;
    assert_int_equal(sc_relay_run_once(r, &n), 0);
    assert_int_equal(n, 5);
    sc_relay_stats st = stats(r);
    assert_int_equal(st.rows_rejected, 4);
    assert_int_equal(st.rows_stored, 1);
    assert_int_equal(rows_left(f->db), 0);

    msgs ok = read_topic(s, "orders");
    assert_int_equal(ok.n, 1);
    assert_memory_equal(ok.m[0].id, in[4].msg_id, BRK_UUID_LEN);

    msgs rej = read_topic(s, SC_RELAY_REJECT_TOPIC);
    assert_int_equal(rej.n, 4);
    const smsg *m = find_msg(&rej, in[0].msg_id);
    assert_non_null(m);
    assert_true(prop_is(m, "topic", "nowhere"));
    assert_true(prop_has(m, "reason", "unknown topic"));
    assert_true(prop_is(m, "headers", "{\"h\": \"v\"}"));
    assert_string_equal(m->key, "k1");
    assert_string_equal((char *)m->body, "{\"x\":1}");
    assert_int_equal(m->flags, BRK_RECF_BODY_JSON);
    assert_int_equal(m->born_ms, in[0].created_ms);

    m = find_msg(&rej, in[1].msg_id);
    assert_non_null(m);
    assert_true(prop_has(m, "reason", "too large"));
    assert_true(prop_is(m, "topic", "orders"));
    assert_true(prop_has(m, "dropped", "body"));
    assert_int_equal(m->body_len, 0);

    m = find_msg(&rej, in[2].msg_id);
    assert_non_null(m);
    assert_true(prop_has(m, "reason", "header 'n' is not a string"));
    assert_true(prop_is(m, "headers", "{\"n\": 5}"));
    assert_string_equal(m->tag, "t");
    assert_string_equal((char *)m->body, "[1,2]");

    m = find_msg(&rej, in[3].msg_id);
    assert_non_null(m);
    assert_true(prop_has(m, "reason", "12345678901234567890123, which is neither"));
    /* The row's text as it was, since it has no compact form. */
    assert_string_equal((char *)m->body, in[3].body_text);
    assert_int_equal(m->flags, 0);

    /* Each rejection is logged at error level. */
    fflush(logf);
    rewind(logf);
    char line[2048];
    int errors = 0;
    while (fgets(line, sizeof line, logf))
        if (strstr(line, "\"level\":\"error\"") && strstr(line, "rejected"))
            errors++;
    assert_int_equal(errors, 4);

    /* The next rows still flow. */
    insert(f->db, &(newrow){ .topic = "orders", .key = "good", .body = "{\"ok\": 2}" }, NULL);
    assert_int_equal(sc_relay_run_once(r, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(stats(r).rows_stored, 2);
    msgs_free(&ok);
    msgs_free(&rej);
    sc_relay_close(r);
    sc_log_close(log);
    fclose(logf);
}

static void full_store_keeps_rows_until_there_is_room(void **state)
{
    fixture *f = *state;
    f->so.disk_budget_bytes = 1;
    brk_store *s = open_store(f, 0);
    inserted in[3];
    for (int i = 0; i < 3; i++)
        insert(f->db, &(newrow){ .topic = "orders", .body = "{\"big\": \"0123456789\"}" },
               &in[i]);
    sc_relay_opts o;
    relay_opts(f, &o, s, false);
    sc_relay *r = open_relay(&o);
    size_t n = 0;
    assert_int_equal(sc_relay_run_once(r, &n), -1);
    assert_int_equal(sc_relay_run_once(r, &n), -1);
    sc_relay_stats st = stats(r);
    assert_non_null(strstr(st.last_error, "FULL"));
    assert_non_null(strstr(st.last_error, "budget"));
    assert_int_equal(st.rows_stored, 0);
    assert_int_equal(st.errors, 2);
    assert_int_equal(rows_left(f->db), 3);
    sc_relay_close(r);

    /* Room again (a bigger budget after a restart). */
    close_store(f, 0);
    f->so.disk_budget_bytes = 0;
    s = open_store(f, 0);
    o.store = s;
    r = open_relay(&o);
    assert_int_equal(sc_relay_run_once(r, &n), 0);
    assert_int_equal(n, 3);
    assert_int_equal(stats(r).rows_stored, 3);
    assert_string_equal(stats(r).last_error, "");
    assert_int_equal(rows_left(f->db), 0);
    msgs l = read_topic(s, "orders");
    assert_int_equal(l.n, 3);
    msgs_free(&l);
    sc_relay_close(r);
}

static void full_store_makes_the_thread_retry_and_keep_the_rows(void **state)
{
    fixture *f = *state;
    f->so.disk_budget_bytes = 1;
    brk_store *s = open_store(f, 0);
    insert(f->db, &(newrow){ .topic = "orders", .body = "{\"n\": 1}" }, NULL);
    sc_relay_opts o;
    relay_opts(f, &o, s, true);
    o.poll_interval_ms = 100;
    sc_relay *r = open_relay(&o);
    WAIT_FOR(stats(r).errors >= 3);
    assert_non_null(strstr(stats(r).last_error, "FULL"));
    assert_true(stats(r).leader);       /* a store error keeps the session */
    assert_int_equal(rows_left(f->db), 1);
    assert_int_equal(stats(r).rows_stored, 0);
    sc_relay_close(r);
}

/* ---- start-up -------------------------------------------------------------------------------- */

static void missing_schema_is_78_with_the_migrate_hint(void **state)
{
    fixture *f = *state;
    char db[80];
    snprintf(db, sizeof db, "%s_bare", f->db);
    assert_int_equal(pgh_create_db(g_pg, db, false), 0);
    char url[256];
    pgh_url(g_pg, db, NULL, NULL, url, sizeof url);
    sc_relay_opts o;
    relay_opts(f, &o, open_store(f, 0), false);
    o.pg.conninfo = url;
    sc_relay *r = NULL;
    char err[512];
    assert_int_equal(sc_relay_open(&r, &o, err, sizeof err), 78);
    assert_null(r);
    assert_non_null(strstr(err, "no outbox schema"));
    assert_non_null(strstr(err, "outboxd db migrate"));
}

static void role_without_delete_is_78_naming_the_grant(void **state)
{
    fixture *f = *state;
    sql(f->db, "DROP ROLE IF EXISTS relay_nodelete;"
               "CREATE ROLE relay_nodelete LOGIN;"
               "GRANT USAGE ON SCHEMA outbox TO relay_nodelete;"
               "GRANT SELECT ON outbox.messages TO relay_nodelete;");
    char url[256];
    pgh_url(g_pg, f->db, "relay_nodelete", NULL, url, sizeof url);
    sc_relay_opts o;
    relay_opts(f, &o, open_store(f, 0), false);
    o.pg.conninfo = url;
    sc_relay *r = NULL;
    char err[512];
    assert_int_equal(sc_relay_open(&r, &o, err, sizeof err), 78);
    assert_null(r);
    assert_non_null(strstr(err, "relay_nodelete"));
    assert_non_null(strstr(err, "DELETE on outbox.messages"));
    assert_null(strstr(err, "SELECT"));
    assert_non_null(strstr(err, "outbox_sidecar"));
    sql(f->db, "REVOKE ALL ON outbox.messages FROM relay_nodelete;"
               "REVOKE ALL ON SCHEMA outbox FROM relay_nodelete;"
               "DROP ROLE relay_nodelete;");
}

static void sidecar_role_is_enough_to_relay(void **state)
{
    fixture *f = *state;
    sql(f->db, "DROP ROLE IF EXISTS relay_least;"
               "CREATE ROLE relay_least LOGIN IN ROLE outbox_sidecar;");
    insert(f->db, &(newrow){ .topic = "orders", .body = "{\"n\": 1}" }, NULL);
    char url[256];
    pgh_url(g_pg, f->db, "relay_least", NULL, url, sizeof url);
    sc_relay_opts o;
    relay_opts(f, &o, open_store(f, 0), false);
    o.pg.conninfo = url;
    sc_relay *r = open_relay(&o);
    size_t n = 0;
    assert_int_equal(sc_relay_run_once(r, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(rows_left(f->db), 0);
    sc_relay_close(r);
    sql(f->db, "DROP ROLE relay_least;");
}

static void unreachable_server_at_start_is_not_fatal(void **state)
{
    fixture *f = *state;
    sc_relay_opts o;
    relay_opts(f, &o, open_store(f, 0), false);
    char url[256];
    /* Port 1 on loopback: refused at once. */
    snprintf(url, sizeof url, "postgresql://postgres@127.0.0.1:1/%s", f->db);
    o.pg.conninfo = url;
    sc_relay *r = open_relay(&o);
    assert_int_equal(sc_relay_run_once(r, NULL), -1);
    sc_relay_stats st = stats(r);
    assert_false(st.connected);
    assert_non_null(strstr(st.last_error, "cannot connect"));
    sc_relay_close(r);

    /* And a thread started that way keeps trying without trouble. */
    o.no_thread = false;
    r = open_relay(&o);
    WAIT_FOR(stats(r).errors >= 3);
    assert_false(stats(r).connected);
    sc_relay_close(r);
}

static void bad_batch_size_is_78(void **state)
{
    fixture *f = *state;
    sc_relay_opts o;
    relay_opts(f, &o, open_store(f, 0), false);
    o.batch = SC_RELAY_BATCH_MAX + 1;
    sc_relay *r = NULL;
    char err[256];
    assert_int_equal(sc_relay_open(&r, &o, err, sizeof err), 78);
    assert_null(r);
    assert_non_null(strstr(err, "batch"));
}

/* ---- main --------------------------------------------------------------------------------------- */

static int group_setup(void **state)
{
    (void)state;
    static const char *const vars[] = { "PGHOST", "PGHOSTADDR", "PGPORT",
        "PGDATABASE", "PGUSER", "PGPASSWORD", "PGPASSFILE", "PGSERVICE",
        "PGSSLMODE", "PGOPTIONS", "PGCONNECT_TIMEOUT" };
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) unsetenv(vars[i]);
    g_pg = pgh_start(OUTBOXD_SOURCE_DIR);
    return g_pg ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    pgh_destroy(g_pg);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
        T(row_maps_every_field_and_is_deleted),
        T(json_body_is_the_http_api_bytes),
        T(notify_wakes_a_relay_waiting_a_minute),
        T(polling_relays_rows_when_no_notification_comes),
        T(wake_runs_a_batch_at_once),
        T(concurrent_out_of_order_commits_keep_every_row_once_in_key_order),
        T(replicas_relay_each_row_into_one_store_and_take_over),
        T(row_stored_before_a_crash_is_not_stored_again),
        T(postgres_stopped_mid_run_then_every_row_stored_once),
        T(rows_refused_for_good_are_kept_aside_and_the_rest_flows),
        T(full_store_keeps_rows_until_there_is_room),
        T(full_store_makes_the_thread_retry_and_keep_the_rows),
        T(missing_schema_is_78_with_the_migrate_hint),
        T(role_without_delete_is_78_naming_the_grant),
        T(sidecar_role_is_enough_to_relay),
        T(unreachable_server_at_start_is_not_fatal),
        T(bad_batch_size_is_78),
#undef T
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
