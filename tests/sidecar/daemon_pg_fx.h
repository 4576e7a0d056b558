/*
 * daemon_pg_fx.h - the fixture and HTTP helpers of the tests that run the
 * real outboxd binary (daemon_harness.h) against a real PostgreSQL
 * (pg_harness: one throwaway server for the whole program, one database
 * per test): test_daemon_pg.c (check-backs, outages, start-up errors,
 * `db` commands, secrets, shutdown) and test_daemon_relay.c (relay mode).
 *
 * daemon_pg_begin/daemon_pg_end frame a program's main(): the server, and
 * a children's environment without stray database settings.  A test that
 * stops the server (stop_pg) and fails before restart_pg leaves it to
 * teardown to start it again for the next ones.
 *
 * Timing: check policies use 300 ms steps; nothing asserts on speed.
 * Each wait polls for a state with a generous deadline and fails at once
 * when a wrong terminal state shows up.
 *
 * tests/CMakeLists.txt builds each test file alone, so this header holds
 * definitions: static, and not all of them used by each file.
 */
#ifndef SIDECAR_TEST_DAEMON_PG_FX_H
#define SIDECAR_TEST_DAEMON_PG_FX_H

#include "daemon_harness.h"

#include "pg_harness.h"
#include "tmpdir.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"

static pgh *pg;                       /* one server for every test */
static bool pg_down;                  /* stopped by the running test */

#define POLICY "{\"first_check_ms\":300,\"interval_ms\":300,\"max_checks\":5," \
               "\"on_exhausted\":\"rollback\",\"expiry_topic\":\"orders.expired\"}"

/* ---- fixture ------------------------------------------------------------- */

typedef struct fixture {
    char dir[512];                    /* scratch; data dir is <dir>/data */
    char data[600];
    char data_arg[620];               /* "--data-dir=<data>" */
    char db[64];                      /* this test's database */
    char env_url[420];                /* "DATABASE_URL=postgresql://..." */
} fixture;

static int test_no;

/* "DATABASE_URL=<url>" for `db` as `user` (NULL: the superuser) with
 * `password` (NULL: none) into env[cap]. */
static void db_env(const char *db, const char *user, const char *password,
                   char *env, size_t cap)
{
    char url[400];
    pgh_url(pg, db, user, password, url, sizeof url);
    snprintf(env, cap, "DATABASE_URL=%s", url);
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    if (!f || brk_tmpdir_new("sc_daemon_pg", f->dir, sizeof f->dir) != 0)
        return -1;
    snprintf(f->data, sizeof f->data, "%s/data", f->dir);
    snprintf(f->data_arg, sizeof f->data_arg, "--data-dir=%s", f->data);
    snprintf(f->db, sizeof f->db, "dpg_%d", ++test_no);
    db_env(f->db, NULL, NULL, f->env_url, sizeof f->env_url);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    reap_all();
    /* a test that failed during its outage must not take the server away
     * from the next ones */
    if (pg_down && pgh_restart(pg) == 0)
        pg_down = false;
    brk_tmpdir_remove(f->dir);
    free(f);
    return 0;
}

/* This test's database, with the outbox schema when `migrate`. */
static void make_db(fixture *f, bool migrate)
{
    if (pgh_create_db(pg, f->db, migrate) != 0)
        fail_msg("cannot create database %s", f->db);
}

static void sql(fixture *f, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void sql(fixture *f, const char *fmt, ...)
{
    char q[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q, sizeof q, fmt, ap);
    va_end(ap);
    if (pgh_sql(pg, f->db, q, NULL, 0) != 0)
        fail_msg("SQL failed: %s", q);
}

static void stop_pg(void)
{
    assert_int_equal(pgh_stop(pg), 0);
    pg_down = true;
}

static void restart_pg(void)
{
    assert_int_equal(pgh_restart(pg), 0);
    pg_down = false;
}

static proc *start_pg(fixture *f, const char *const *more)
{
    return start_daemon(f->data, more, ARGS(f->env_url));
}

/* Start of main(): the server for every test; 77 (skipped) when it cannot
 * start. */
static int daemon_pg_begin(const char *prog)
{
    /* The children inherit this environment: no stray database settings. */
    unsetenv("DATABASE_URL");
    pgh_clear_libpq_env();
    pg = pgh_start(OUTBOXD_SOURCE_DIR);
    if (!pg) {
        fprintf(stderr, "%s: cannot start PostgreSQL (see above); "
                "skipped\n", prog);
        return 77;
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    return 0;
}

static void daemon_pg_end(void)
{
    curl_global_cleanup();
    pgh_destroy(pg);
}

/* ---- HTTP helpers -------------------------------------------------------- */

/* POST /v1/transactions for `txid` in topic "orders" with POLICY (or
 * `policy`); returns the msg_id into msg_id[64]. */
static void prepare(uint16_t port, const char *txid, const char *policy,
                    char msg_id[64])
{
    char body[1024];
    snprintf(body, sizeof body, "{\"topic\":\"orders\",\"txid\":\"%s\","
             "\"key\":\"%s\",\"body\":{\"order\":\"%s\"},\"check\":%s}", txid,
             txid, txid, policy ? policy : POLICY);
    json_t *j = http_json(port, "POST", "/v1/transactions", body, 201);
    snprintf(msg_id, 64, "%s", json_string_value(json_object_get(j, "msg_id")));
    json_decref(j);
}

typedef struct txn_view {
    char state[32];
    long long checks, check_errors;
} txn_view;

static void get_txn(uint16_t port, const char *txid, txn_view *v)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/transactions/%s", txid);
    json_t *j = http_json(port, "GET", path, NULL, 200);
    snprintf(v->state, sizeof v->state, "%s",
             json_string_value(json_object_get(j, "state")));
    v->checks = json_integer_value(json_object_get(j, "checks"));
    v->check_errors = json_integer_value(json_object_get(j, "check_errors"));
    json_decref(j);
}

/* Poll until the transaction is in `want`; a different final state (or
 * the deadline) fails the test at once. */
static void wait_state(uint16_t port, const char *txid, const char *want,
                       int timeout_ms, txn_view *v)
{
    int64_t end = now_ms() + timeout_ms;
    for (;;) {
        get_txn(port, txid, v);
        if (strcmp(v->state, want) == 0)
            return;
        if (strcmp(v->state, "prepared") != 0)
            fail_msg("%s became %s, want %s (checks %lld)", txid, v->state,
                     want, v->checks);
        if (now_ms() > end)
            fail_msg("%s still prepared after %d ms (checks %lld, errors "
                     "%lld), want %s", txid, timeout_ms, v->checks,
                     v->check_errors, want);
        sleep_ms(25);
    }
}

/* Receive (and ack) from `topic` as `group` until `want` messages came,
 * then once more briefly, so that anything beyond `want` (a duplicate)
 * is caught too.  The msg_ids go into *out. */
static void receive_all(uint16_t port, const char *group, const char *topic,
                        size_t want, ids *out, int timeout_ms)
{
    char path[256], body[256];
    snprintf(path, sizeof path, "/v1/groups/%s/receive", group);
    int64_t end = now_ms() + timeout_ms;
    bool last = false;
    for (;;) {
        bool reached = out->n >= want;
        snprintf(body, sizeof body, "{\"topic\":\"%s\",\"max\":256,"
                 "\"wait_ms\":%d}", topic, reached ? 300 : 500);
        json_t *j = http_json(port, "POST", path, body, 200);
        json_t *msgs = json_object_get(j, "messages");
        json_t *receipts = json_array();
        for (size_t i = 0; i < json_array_size(msgs); i++) {
            json_t *m = json_array_get(msgs, i);
            ids_add(out, json_string_value(json_object_get(m, "msg_id")));
            json_array_append(receipts, json_object_get(m, "receipt"));
        }
        size_t got = json_array_size(msgs);
        if (got) {
            json_t *ack = json_pack("{s:O}", "receipts", receipts);
            char *ab = json_dumps(ack, JSON_COMPACT);
            char apath[256];
            snprintf(apath, sizeof apath, "/v1/groups/%s/ack", group);
            assert_int_equal(status_of(port, "POST", apath, ab, NULL), 200);
            free(ab);
            json_decref(ack);
        }
        json_decref(receipts);
        json_decref(j);
        if (last && got == 0)
            return;
        if (out->n >= want)
            last = true;            /* one more round for extras */
        else if (now_ms() > end)
            return;
    }
}

/* The value of the sample `name` whose labels hold `label` (NULL: any);
 * -1 when absent. */
static double sample(const char *text, const char *name, const char *label)
{
    size_t nl = strlen(name);
    for (const char *line = text; line && *line; line = strchr(line, '\n')) {
        if (*line == '\n')
            line++;
        if (strncmp(line, name, nl) != 0 || (line[nl] != '{' && line[nl] != ' '))
            continue;
        const char *eol = strchr(line, '\n');
        size_t len = eol ? (size_t)(eol - line) : strlen(line);
        char buf[512];
        snprintf(buf, sizeof buf, "%.*s",
                 (int)(len < sizeof buf ? len : sizeof buf - 1), line);
        if (label && !strstr(buf, label))
            continue;
        const char *sp = strrchr(buf, ' ');
        return sp ? strtod(sp + 1, NULL) : -1;
    }
    return -1;
}

static double metric(uint16_t port, const char *name, const char *label)
{
    resp r;
    http(NULL, port, "GET", "/metrics", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    double v = sample(r.body, name, label);
    resp_free(&r);
    return v;
}

/* The group "shipping" receives exactly one message of "orders": msg_id. */
static void expect_only_order(uint16_t port, const char *msg_id)
{
    ids got = { 0 };
    receive_all(port, "shipping", "orders", 1, &got, 20000);
    assert_int_equal(got.n, 1);
    assert_string_equal(got.v[0], msg_id);
    free(got.v);
}

#pragma GCC diagnostic pop

#endif /* SIDECAR_TEST_DAEMON_PG_FX_H */
