/*
 * test_relay.c - the outbox relay (sidecar/src/relay.h) against a real
 * PostgreSQL (tests/support/pg_harness) and a real store in a scratch
 * directory: how a row becomes a message (every field, JSON bodies byte for
 * byte as the HTTP API stores them), waking by NOTIFY and by polling, the
 * commit-order proof with concurrent writers committing out of id order,
 * two replicas on one database, PostgreSQL stopped mid-run, rows the store
 * refuses for good or for now, close while a batch is blocked or a
 * connect hangs, and the start-up checks (schema, grants, unreachable server).  Rows stored
 * before a crash (markers, bounded lookups): test_relay_dedup.c.
 *
 * One server for the program (group setup); every test makes its own
 * database and store.  Rows are written with libpq and parameters; schema
 * changes and counts go through psql (pgh_sql).  Waits poll for a state
 * with a generous deadline; nothing asserts on speed.  Helpers:
 * relay_harness.h.
 */
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include "relay_harness.h"
/* The HTTP API's own codec: a relayed JSON body must be the bytes it
 * stores for the same JSON. */
#include "../../http_api/src/codec.h"

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

    sc_relay *r = open_manual_relay(f, s);
    run_once_takes(r, 2);
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
    run_once_takes(r, 0);
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

    sc_relay *r = open_manual_relay(f, s);
    run_once_takes(r, N);
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
    sc_relay *r = start_relay(f, open_store(f, 0), 60000);
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
    sc_relay *r = start_relay(f, open_store(f, 0), 100);
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
    sc_relay *r = start_relay(f, open_store(f, 0), 60000);
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

/* A failed UPDATE or INSERT of a writer: a deadlock is counted (the
 * transaction rolls back), anything else is a failure to report. */
static void writer_failed(writers *w, PGresult *r)
{
    if (!is_deadlock(r)) {
        snprintf(w->failure, sizeof w->failure, "%s", PQresultErrorMessage(r));
        atomic_fetch_add(&w->failures, 1);
    } else {
        atomic_fetch_add(&w->deadlocks, 1);
    }
    PQclear(r);
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
                writer_failed(w, r);
                ok = false;
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
                writer_failed(w, r);
                ok = false;
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
    sc_relay *ra = start_relay(f, sa, 100);
    WAIT_FOR(stats(ra).leader);
    sc_relay *rb = start_relay(f, sb, 100);
    WAIT_FOR(stats(rb).connected);
    sc_relay *rc = open_manual_relay(f, sc);

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

/* A leader whose store keeps refusing rows (here: over its disk budget)
 * must not hold the leadership forever while a healthy replica stands by:
 * it steps down, and the standby relays the rows. */
static void a_leader_that_cannot_store_lets_a_standby_take_over(void **state)
{
    fixture *f = *state;
    f->so.disk_budget_bytes = 1;
    brk_store *sa = open_store(f, 0);
    f->so.disk_budget_bytes = 0;
    brk_store *sb = open_store(f, 1);
    sc_relay *ra = start_relay(f, sa, 100);
    WAIT_FOR(stats(ra).leader);
    sc_relay *rb = start_relay(f, sb, 100);
    WAIT_FOR(stats(rb).connected);
    insert_many(f->db, 1, 3);
    WAIT_FOR(stats(rb).rows_stored == 3);
    assert_int_equal(rows_left(f->db), 0);
    assert_int_equal(stats(ra).rows_stored, 0);
    assert_non_null(strstr(stats(ra).last_error, "FULL"));
    sc_relay_close(ra);
    sc_relay_close(rb);
    msgs l = read_topic(sb, "orders");
    assert_int_equal(l.n, 3);
    msgs_free(&l);
}

/* ---- failures ------------------------------------------------------------------------------ */

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
    assert_stored_once(s, "orders", 2020);
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
    run_once_takes(r, 5);
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
    run_once_takes(r, 1);
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
    sc_relay *r = open_manual_relay(f, s);
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
    r = open_manual_relay(f, s);
    run_once_takes(r, 3);
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
    sc_relay *r = start_relay(f, s, 100);
    WAIT_FOR(stats(r).errors >= 3);
    assert_non_null(strstr(stats(r).last_error, "FULL"));
    /* A store error keeps the session (leadership steps down and comes
     * back: a_leader_that_cannot_store_lets_a_standby_take_over). */
    assert_true(stats(r).connected);
    assert_int_equal(rows_left(f->db), 1);
    assert_int_equal(stats(r).rows_stored, 0);
    sc_relay_close(r);
}

/* sc_relay_close on a thread of its own, for a test that must let go of
 * what the close may be waiting for whether or not it returned. */
typedef struct closer {
    pthread_t th;
    sc_relay *r;
    atomic_bool done;
} closer;

static void *close_main(void *p)
{
    closer *c = p;
    sc_relay_close(c->r);
    atomic_store(&c->done, true);
    return NULL;
}

/* Start closing r and wait (at most 20 s) for the close to return; true
 * when it did.  pthread_join(c->th) once the close can end. */
static bool close_returns_within_20s(closer *c, sc_relay *r)
{
    c->r = r;
    atomic_init(&c->done, false);
    assert_int_equal(pthread_create(&c->th, NULL, close_main, c), 0);
    int64_t end = now_ms() + 20000;
    while (!atomic_load(&c->done) && now_ms() < end) sleep_ms(10);
    return atomic_load(&c->done);
}

/* A batch blocked in PostgreSQL (its DELETE waits for a row lock an
 * application holds) must not hold up close for as long as the lock is
 * held: close cancels it after a grace period; the rows stay and a later
 * relay stores none twice. */
static void close_cancels_a_batch_blocked_in_postgresql(void **state)
{
    fixture *f = *state;
    brk_store *s = open_store(f, 0);
    inserted a;
    insert(f->db, &(newrow){ .topic = "orders", .key = "k", .body = "{\"n\": 1}" }, &a);
    PGconn *app = connect_as(f->db, NULL);
    PGresult *res = PQexec(app, "BEGIN");
    PQclear(res);
    res = PQexec(app, "SELECT id FROM outbox.messages FOR UPDATE");
    assert_int_equal(PQresultStatus(res), PGRES_TUPLES_OK);
    PQclear(res);

    sc_relay *r = start_relay(f, s, 100);
    WAIT_FOR(pgh_sql_int(g_pg, f->db, "SELECT count(*) FROM pg_stat_activity"
                         " WHERE wait_event_type = 'Lock'"
                         " AND query LIKE 'DELETE FROM outbox.messages%'") == 1);
    closer c;
    bool closed = close_returns_within_20s(&c, r);
    /* Let go of the lock either way, so that the thread can end. */
    res = PQexec(app, "ROLLBACK");
    PQclear(res);
    PQfinish(app);
    pthread_join(c.th, NULL);
    assert_true(closed);
    assert_int_equal(rows_left(f->db), 1);

    /* The row was appended and flushed before the DELETE: not again. */
    r = open_manual_relay(f, s);
    run_once_takes(r, 1);
    assert_int_equal(stats(r).rows_duplicate, 1);
    assert_int_equal(rows_left(f->db), 0);
    sc_relay_close(r);
    msgs l = read_topic(s, "orders");
    assert_int_equal(l.n, 1);
    assert_memory_equal(l.m[0].id, a.msg_id, BRK_UUID_LEN);
    msgs_free(&l);
}

/* A backend that stops answering while its kernel still ACKs (SIGSTOP):
 * neither keepalives nor statement_timeout help, so every round trip has
 * its own deadline (statement_timeout + connect_timeout).  The relay must
 * give up on the session and close() must return while the backend is
 * still stopped.  SIGSTOP of the server's backend needs root (it runs as
 * nobody). */
static void close_returns_while_the_backend_is_stopped(void **state)
{
    if (geteuid() != 0) {
        print_message("skipped: SIGSTOP of the server's backend needs root\n");
        skip();
    }
    fixture *f = *state;
    brk_store *s = open_store(f, 0);
    sc_relay_opts o;
    relay_opts(f, &o, s, true);
    o.poll_interval_ms = 100;
    o.pg.statement_timeout_ms = 500;
    o.pg.application_name = "relay-sigstop";
    sc_relay *r = open_relay(&o);
    inserted a;
    insert(f->db, &(newrow){ .topic = "orders", .key = "k", .body = "{\"n\": 1}" }, &a);
    WAIT_FOR(stats(r).rows_stored == 1);
    long long pid = pgh_sql_int(g_pg, "postgres", "SELECT pid FROM pg_stat_activity"
                                " WHERE application_name = 'relay-sigstop'");
    assert_true(pid > 0);
    assert_int_equal(kill((pid_t)pid, SIGSTOP), 0);
    /* The next poll sends BEGIN to the stopped backend; past its deadline
     * (0.5 + 2 s) the session is dropped. */
    int64_t end = now_ms() + 20000;
    while (stats(r).connected && now_ms() < end) sleep_ms(20);
    bool dropped = !stats(r).connected;

    closer c;
    bool closed = close_returns_within_20s(&c, r);
    kill((pid_t)pid, SIGCONT);      /* either way, so the thread can end */
    pthread_join(c.th, NULL);
    assert_true(dropped);
    assert_true(closed);
}

/* A server that accepts and never answers (a hung host): the relay thread
 * is in sc_pg_connect, which would wait out the 20 s connect_timeout; close
 * interrupts it (the relay's stop eventfd is the connect's stop_fd). */
static void close_interrupts_a_connect_to_a_hanging_server(void **state)
{
    fixture *f = *state;
    /* Bound but not listening: refused, so open returns at once (not
     * fatal); listening afterwards, so the thread's next connect hangs. */
    int hole = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(hole >= 0);
    struct sockaddr_in a = { .sin_family = AF_INET,
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    assert_int_equal(bind(hole, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(hole, (struct sockaddr *)&a, &len), 0);
    char url[256];
    snprintf(url, sizeof url, "postgresql://postgres@127.0.0.1:%u/%s",
             (unsigned)ntohs(a.sin_port), f->db);
    sc_relay_opts o;
    relay_opts(f, &o, open_store(f, 0), true);
    o.pg.conninfo = url;
    o.pg.connect_timeout_ms = 20000;
    sc_relay *r = open_relay(&o);
    assert_false(stats(r).connected);
    assert_int_equal(listen(hole, 16), 0);
    /* The listening socket turns readable once the relay's connection is
     * in its backlog: the thread is then waiting for an answer. */
    struct pollfd p = { .fd = hole, .events = POLLIN };
    assert_int_equal(poll(&p, 1, 20000), 1);
    sleep_ms(100);
    int64_t t0 = now_ms();
    sc_relay_close(r);
    int64_t took = now_ms() - t0;
    print_message("close took %lld ms (connect_timeout 20000)\n", (long long)took);
    if (took >= 5000)
        fail_msg("close took %lld ms", (long long)took);
    close(hole);
}

/* ---- start-up -------------------------------------------------------------------------------- */

/* sc_relay_open must refuse o with 78 (a configuration error); the
 * message into err. */
static void open_is_78(const sc_relay_opts *o, char *err, size_t cap)
{
    sc_relay *r = NULL;
    assert_int_equal(sc_relay_open(&r, o, err, cap), 78);
    assert_null(r);
}

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
    char err[512];
    open_is_78(&o, err, sizeof err);
    assert_non_null(strstr(err, "no outbox schema"));
    assert_non_null(strstr(err, "outboxd db migrate"));
}

static void role_without_delete_is_78_naming_the_grant(void **state)
{
    fixture *f = *state;
    recreate_role("relay_nodelete", "");
    sql(f->db, "GRANT USAGE ON SCHEMA outbox TO relay_nodelete;"
               "GRANT SELECT ON outbox.messages TO relay_nodelete;");
    char url[256];
    pgh_url(g_pg, f->db, "relay_nodelete", NULL, url, sizeof url);
    sc_relay_opts o;
    relay_opts(f, &o, open_store(f, 0), false);
    o.pg.conninfo = url;
    char err[512];
    open_is_78(&o, err, sizeof err);
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
    recreate_role("relay_least", "IN ROLE outbox_sidecar");
    insert(f->db, &(newrow){ .topic = "orders", .body = "{\"n\": 1}" }, NULL);
    char url[256];
    pgh_url(g_pg, f->db, "relay_least", NULL, url, sizeof url);
    sc_relay_opts o;
    relay_opts(f, &o, open_store(f, 0), false);
    o.pg.conninfo = url;
    sc_relay *r = open_relay(&o);
    run_once_takes(r, 1);
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
    char err[256];
    open_is_78(&o, err, sizeof err);
    assert_non_null(strstr(err, "batch"));
}

/* ---- main --------------------------------------------------------------------------------------- */

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
        T(a_leader_that_cannot_store_lets_a_standby_take_over),
        T(postgres_stopped_mid_run_then_every_row_stored_once),
        T(rows_refused_for_good_are_kept_aside_and_the_rest_flows),
        T(full_store_keeps_rows_until_there_is_room),
        T(full_store_makes_the_thread_retry_and_keep_the_rows),
        T(close_cancels_a_batch_blocked_in_postgresql),
        T(close_returns_while_the_backend_is_stopped),
        T(close_interrupts_a_connect_to_a_hanging_server),
        T(missing_schema_is_78_with_the_migrate_hint),
        T(role_without_delete_is_78_naming_the_grant),
        T(sidecar_role_is_enough_to_relay),
        T(unreachable_server_at_start_is_not_fatal),
        T(bad_batch_size_is_78),
#undef T
    };
    return cmocka_run_group_tests(tests, pg_group_setup, pg_group_teardown);
}
