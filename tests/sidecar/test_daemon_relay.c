/*
 * test_daemon_relay.c - the real outboxd binary (OUTBOXD_BIN) in relay
 * mode against a real PostgreSQL (one throwaway server for the whole
 * program, one database per test; daemon_harness.h, daemon_pg_fx.h):
 *   - rows written while outboxd runs, and rows written (and a
 *     transaction committed) while it is stopped, are in the store exactly
 *     once after a SIGTERM restart (msg_id sets compared);
 *   - kill -9 in the middle of a large relay: every row once after the
 *     restart;
 *   - /metrics shows the database and relay families, each once with its
 *     TYPE (prom_page.h), the rows stored counted.
 * Nothing asserts on speed; every wait polls with a generous deadline.
 */
#include "daemon_pg_fx.h"

#include "prom_page.h"

/* Relay mode, polling often (NOTIFY wakes it anyway). */
static const char *const relay_args[] = { "--relay", "--relay-poll-interval=100ms",
                                          NULL };

/* ---- helpers ------------------------------------------------------------- */

/* msg_ids of `INSERT ... RETURNING msg_id` into *out. */
static void insert_rows(fixture *f, const char *topic, int from, int to,
                        ids *out)
{
    char q[512];
    size_t cap = (size_t)(to - from + 1) * 40 + 64;
    char *buf = malloc(cap);
    assert_non_null(buf);
    snprintf(q, sizeof q, "INSERT INTO outbox.messages (topic, key, body) "
             "SELECT '%s', 'k' || (i %% 7), jsonb_build_object('i', i) FROM "
             "generate_series(%d, %d) i RETURNING msg_id", topic, from, to);
    if (pgh_sql(pg, f->db, q, buf, cap) != 0)
        fail_msg("insert failed");
    for (char *s = buf, *nl; *s; s = nl ? nl + 1 : s + strlen(s)) {
        nl = strchr(s, '\n');
        if (nl)
            *nl = '\0';
        if (*s)
            ids_add(out, s);
    }
    free(buf);
}

/* Insert rows from..to of `topic` into *rows and receive them as `group`
 * into *got: all of them. */
static void relay_rows(fixture *f, uint16_t port, const char *group,
                       const char *topic, int from, int to, ids *rows, ids *got)
{
    insert_rows(f, topic, from, to, rows);
    receive_all(port, group, topic, (size_t)(to - from + 1), got, 30000);
    assert_int_equal(got->n, (size_t)(to - from + 1));
}

static void assert_same_ids(ids *got, ids *want)
{
    size_t dg = ids_distinct(got);
    ids_distinct(want);
    if (got->n != want->n || dg != got->n)
        fail_msg("received %zu messages (%zu distinct), inserted %zu rows",
                 got->n, dg, want->n);
    for (size_t i = 0; i < got->n; i++)
        if (strcmp(got->v[i], want->v[i]) != 0)
            fail_msg("received %s, inserted %s", got->v[i], want->v[i]);
}

/* ---- relay ------------------------------------------------------------------------- */

/* Rows written while outboxd runs are relayed; rows written (and a
 * transaction committed) while it is stopped are relayed and applied
 * after the restart; every row is in the store exactly once. */
static void relay_and_check_back_survive_a_restart(void **state)
{
    fixture *f = *state;
    make_db(f, true);
    proc *p = start_pg(f, relay_args);
    ids rows = { 0 }, got = { 0 };
    relay_rows(f, p->port, "g1", "relayed", 1, 20, &rows, &got);
    assert_true(metric(p->port, "outboxd_relay_leader", NULL) == 1);
    assert_true(metric(p->port, "outboxd_relay_rows_total",
                       "result=\"stored\"") >= 20);
    char msg_id[64];
    sql(f, "INSERT INTO outbox.transactions (txid) VALUES ('order-r')");
    prepare(p->port, "order-r", "{\"first_check_ms\":300,\"interval_ms\":300,"
            "\"max_checks\":1000}", msg_id);
    stop_daemon(p);

    insert_rows(f, "relayed", 21, 50, &rows);
    sql(f, "UPDATE outbox.transactions SET state = 'commit' WHERE txid = "
        "'order-r'");
    p = start_pg(f, relay_args);
    txn_view v;
    wait_state(p->port, "order-r", "committed", 30000, &v);
    /* a new group reads the topic from its start: the store's content */
    ids all = { 0 };
    receive_all(p->port, "g2", "relayed", 50, &all, 30000);
    assert_same_ids(&all, &rows);
    /* the table is empty: every row was taken */
    assert_int_equal(pgh_sql_int(pg, f->db, "SELECT count(*) FROM "
                                 "outbox.messages"), 0);
    expect_only_order(p->port, msg_id);
    free(rows.v);
    free(got.v);
    free(all.v);
    stop_daemon(p);
}

/* kill -9 while a 2 000-row insert is being relayed (small batches, so
 * the kill lands between and inside them): after the restart every row is
 * in the store exactly once; rows stored before the kill whose DELETE
 * never committed are found by msg_id, not stored again. */
static void kill_9_during_relaying_stores_every_row_once(void **state)
{
    fixture *f = *state;
    make_db(f, true);
    static const char *const more[] = { "--relay", "--relay-batch=20",
                                        "--relay-poll-interval=100ms", NULL };
    proc *p = start_pg(f, more);
    ids rows = { 0 };
    insert_rows(f, "bulk", 1, 2000, &rows);
    assert_int_equal(rows.n, 2000);
    int64_t end = now_ms() + 30000;
    double stored = 0;
    while ((stored = metric(p->port, "outboxd_relay_rows_total",
                            "result=\"stored\"")) < 100 && now_ms() < end)
        sleep_ms(2);
    kill(p->pid, SIGKILL);
    assert_int_equal(wait_exit(p, 20000), 128 + SIGKILL);
    long long left = pgh_sql_int(pg, f->db, "SELECT count(*) FROM "
                                 "outbox.messages");
    print_message("killed after %.0f rows stored; %lld rows left in the "
                  "table\n", stored, left);

    p = start_pg(f, more);
    end = now_ms() + 60000;
    while (pgh_sql_int(pg, f->db, "SELECT count(*) FROM outbox.messages") != 0
           && now_ms() < end)
        sleep_ms(50);
    ids got = { 0 };
    receive_all(p->port, "g", "bulk", 2000, &got, 60000);
    assert_same_ids(&got, &rows);
    free(rows.v);
    free(got.v);
    stop_daemon(p);
}

/* ---- /metrics ------------------------------------------------------------------------ */

/* The daemon's database families on a real page (pool and relay up):
 * each exactly once with its TYPE, none clashing with http_api's own. */
static void metrics_database_families_appear_once_each_with_a_type(void **state)
{
    fixture *f = *state;
    make_db(f, true);
    proc *p = start_pg(f, relay_args);
    ids rows = { 0 }, got = { 0 };
    relay_rows(f, p->port, "g", "m", 1, 5, &rows, &got);
    resp r;
    http(NULL, p->port, "GET", "/metrics", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    char names[256][96];
    size_t n = check_page(r.body, names, 256);
    static const char *const mine[] = {
        "outboxd_db_up", "outboxd_db_connections", "outboxd_check_queries_total",
        "outboxd_check_timeouts_total", "outboxd_db_reconnects_total",
        "outboxd_relay_leader", "outboxd_relay_rows_total",
        "outboxd_relay_batches_total", "outboxd_relay_errors_total",
        "outboxd_relay_lookups_total",
        "outboxd_relay_lag_seconds", NULL
    };
    for (size_t i = 0; mine[i]; i++) {
        size_t k = count_name(names, n, mine[i]);
        if (k != 1)
            fail_msg("%s appears %zu times:\n%s", mine[i], k, r.body);
        char type[128];
        snprintf(type, sizeof type, "# TYPE %s ", mine[i]);
        assert_non_null(strstr(r.body, type));
    }
    assert_true(sample(r.body, "outboxd_relay_rows_total", "result=\"stored\"")
                >= 5);
    resp_free(&r);
    free(rows.v);
    free(got.v);
    stop_daemon(p);
}

/* ---- main ---------------------------------------------------------------- */

int main(void)
{
    int rc = daemon_pg_begin("test_daemon_relay");
    if (rc)
        return rc;
#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(relay_and_check_back_survive_a_restart),
        T(kill_9_during_relaying_stores_every_row_once),
        T(metrics_database_families_appear_once_each_with_a_type),
    };
#undef T
    rc = cmocka_run_group_tests(tests, NULL, NULL);
    daemon_pg_end();
    return rc;
}
