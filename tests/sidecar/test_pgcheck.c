/*
 * test_pgcheck.c - check-backs answered by PostgreSQL (sidecar/src/pgcheck.h)
 * against a real server (tests/support/pg_harness): how answers map (the
 * default query and custom ones, case, blanks, char(n) padding, more than
 * one row, garbage), txids never above debug (masked when an answer
 * quotes one), start-up validation and its messages, a changed table
 * prepared afresh, passwords and the PG* environment.  Outages, timeouts,
 * terminated connections, close, concurrency and the transaction level
 * are in test_pgcheck_outage.c; the fixture is pgcheck_fx.h.
 *
 * One server for the program (group setup); every test makes its own
 * database.
 */
#include "pgcheck_fx.h"

/* ---- answers ------------------------------------------------------------- */

static void default_query_maps_each_state(void **state)
{
    fx *f = *state;
    new_db("pc_states", true);
    put_txn("pc_states", "t-commit", "commit");
    put_txn("pc_states", "t-rollback", "rollback");
    put_txn("pc_states", "t-pending", "pending");
    open_ok(f, "pc_states", NULL);
    assert_true(stats(f->pc).validated);

    assert_int_equal(ask(f->pc, "t-commit"), BRK_CHECK_COMMIT);
    assert_int_equal(ask(f->pc, "t-rollback"), BRK_CHECK_ROLLBACK);
    assert_int_equal(ask(f->pc, "t-pending"), BRK_CHECK_UNKNOWN);
    assert_int_equal(ask(f->pc, "t-no-row"), BRK_CHECK_UNKNOWN);

    sc_pgcheck_stats s = stats(f->pc);
    assert_int_equal(s.queries, 4);
    assert_int_equal(s.answers[BRK_CHECK_COMMIT], 1);
    assert_int_equal(s.answers[BRK_CHECK_ROLLBACK], 1);
    assert_int_equal(s.answers[BRK_CHECK_UNKNOWN], 2);
    assert_int_equal(s.answers[BRK_CHECK_ERROR], 0);
    assert_int_equal(s.pool_size, 2);
    assert_int_equal(s.connected, 1);
}

/* A custom query over a table of raw answers: every spelling the header
 * allows, NULL, blanks and case; anything else is ERROR. */
static void custom_answers_map_ignoring_case_and_blanks(void **state)
{
    fx *f = *state;
    new_db("pc_answers", false);
    sql("pc_answers", "CREATE TABLE answers (id text PRIMARY KEY, answer text)");
    static const struct { const char *id, *answer; brk_check_result want; } rows[] = {
        { "a", "commit", BRK_CHECK_COMMIT },
        { "b", "committed", BRK_CHECK_COMMIT },
        { "c", "rollback", BRK_CHECK_ROLLBACK },
        { "d", "rolled_back", BRK_CHECK_ROLLBACK },
        { "e", "pending", BRK_CHECK_UNKNOWN },
        { "f", NULL, BRK_CHECK_UNKNOWN },
        { "g", "  Commit ", BRK_CHECK_COMMIT },
        { "h", "COMMITTED", BRK_CHECK_COMMIT },
        { "i", "\tRollBack\r\n", BRK_CHECK_ROLLBACK },
        { "j", " PENDING", BRK_CHECK_UNKNOWN },
        { "k", "garbage", BRK_CHECK_ERROR },
        { "l", "", BRK_CHECK_ERROR },
        { "m", "commit!", BRK_CHECK_ERROR },
        { "n", "roll back", BRK_CHECK_ERROR },
        { "o", "1", BRK_CHECK_ERROR },
    };
    size_t n = sizeof rows / sizeof rows[0];
    for (size_t i = 0; i < n; i++) {
        const char *v[2] = { rows[i].id, rows[i].answer };
        exec_params("pc_answers", "INSERT INTO answers VALUES ($1, $2)", 2, v);
    }
    open_ok(f, "pc_answers", "SELECT answer FROM answers WHERE id = $1");
    for (size_t i = 0; i < n; i++)
        if (ask(f->pc, rows[i].id) != rows[i].want)
            fail_msg("answer %s for '%s' should map to %d", rows[i].id,
                     rows[i].answer ? rows[i].answer : "NULL", rows[i].want);
    assert_int_equal(ask(f->pc, "no-such-row"), BRK_CHECK_UNKNOWN);
    sc_pgcheck_stats s = stats(f->pc);
    assert_int_equal(s.answers[BRK_CHECK_ERROR], 5);
    assert_int_equal(s.queries, n + 1);
}

static void garbage_answer_is_error_and_logged_without_txid(void **state)
{
    fx *f = *state;
    new_db("pc_garbage", false);
    sql("pc_garbage", "CREATE TABLE answers (id text PRIMARY KEY, answer text);"
                      "INSERT INTO answers VALUES ('order-secret-77', 'maybe')");
    open_ok(f, "pc_garbage", "SELECT answer FROM answers WHERE id = $1");
    assert_int_equal(ask(f->pc, "order-secret-77"), BRK_CHECK_ERROR);
    const char *t = log_text(f);
    assert_non_null(strstr(t, "\"level\":\"warn\""));
    assert_non_null(strstr(t, "maybe"));
    assert_txid_only_at_debug(f, "order-secret-77");
}

static void more_than_one_row_is_error(void **state)
{
    fx *f = *state;
    new_db("pc_rows", false);
    sql("pc_rows", "CREATE TABLE answers (id text, answer text);"
                   "INSERT INTO answers VALUES ('x', 'commit'), ('x', 'rollback')");
    open_ok(f, "pc_rows", "SELECT answer FROM answers WHERE id = $1");
    assert_int_equal(ask(f->pc, "x"), BRK_CHECK_ERROR);
    assert_int_equal(ask(f->pc, "y"), BRK_CHECK_UNKNOWN);
}

static void pending_past_deadline_is_rollback(void **state)
{
    fx *f = *state;
    new_db("pc_deadline", true);
    sql("pc_deadline",
        "INSERT INTO outbox.transactions (txid, state, deadline) VALUES"
        " ('late', 'pending', now() - interval '1 second'),"
        " ('early', 'pending', now() + interval '1 hour'),"
        " ('paid-late', 'commit', now() - interval '1 second')");
    open_ok(f, "pc_deadline", NULL);
    assert_int_equal(ask(f->pc, "late"), BRK_CHECK_ROLLBACK);
    assert_int_equal(ask(f->pc, "early"), BRK_CHECK_UNKNOWN);
    /* A deadline only ends waiting; a decided row keeps its decision. */
    assert_int_equal(ask(f->pc, "paid-late"), BRK_CHECK_COMMIT);
}

static void txids_with_sql_metacharacters_are_harmless(void **state)
{
    fx *f = *state;
    new_db("pc_meta", true);
    char long_id[129];
    for (int i = 0; i < 128; i++) long_id[i] = (char)(0x21 + (i * 7) % 94);
    long_id[128] = '\0';
    /* Storable txids (printable, no blanks), each with a known state. */
    static const char *const stored[] = {
        "';DROP/**/TABLE/**/outbox.transactions;--",
        "a'b\"c\\\\d",
        "$1",
        "%s",
        "'||(SELECT'commit')||'",
        "\\x27;--",
        "\"outbox\".\"transactions\"",
    };
    size_t n = sizeof stored / sizeof stored[0];
    for (size_t i = 0; i < n; i++)
        put_txn("pc_meta", stored[i], i % 2 ? "rollback" : "commit");
    put_txn("pc_meta", long_id, "pending");
    open_ok(f, "pc_meta", NULL);

    for (size_t i = 0; i < n; i++)
        if (ask(f->pc, stored[i]) != (i % 2 ? BRK_CHECK_ROLLBACK : BRK_CHECK_COMMIT))
            fail_msg("txid %s answered wrongly", stored[i]);
    assert_int_equal(ask(f->pc, long_id), BRK_CHECK_UNKNOWN);
    /* Not storable (blanks): simply no row. */
    assert_int_equal(ask(f->pc, "'; DROP TABLE outbox.transactions; --"),
                     BRK_CHECK_UNKNOWN);
    assert_int_equal(ask(f->pc, "x' OR '1'='1"), BRK_CHECK_UNKNOWN);

    assert_int_equal(pgh_sql_int(g_pg, "pc_meta",
                                 "SELECT count(*) FROM outbox.transactions"),
                     (long long)n + 1);
    assert_int_equal(stats(f->pc).answers[BRK_CHECK_ERROR], 0);
}

/* The example: an application answers from its own orders table;
 * the database has no outbox schema at all. */
static void custom_query_over_application_table_needs_no_outbox_schema(void **state)
{
    fx *f = *state;
    new_db("pc_orders", false);
    sql("pc_orders",
        "CREATE TABLE orders (id text PRIMARY KEY, status text);"
        "INSERT INTO orders VALUES ('o-1', 'paid'), ('o-2', 'cancelled'),"
        " ('o-3', 'new')");
    assert_int_equal(pgh_sql_int(g_pg, "pc_orders",
                                 "SELECT count(*) FROM pg_namespace WHERE nspname = 'outbox'"),
                     0);
    open_ok(f, "pc_orders",
            "SELECT CASE status WHEN 'paid' THEN 'commit' WHEN 'cancelled' "
            "THEN 'rollback' ELSE 'pending' END FROM orders WHERE id = $1");
    assert_true(stats(f->pc).validated);
    assert_int_equal(ask(f->pc, "o-1"), BRK_CHECK_COMMIT);
    assert_int_equal(ask(f->pc, "o-2"), BRK_CHECK_ROLLBACK);
    assert_int_equal(ask(f->pc, "o-3"), BRK_CHECK_UNKNOWN);
    assert_int_equal(ask(f->pc, "o-4"), BRK_CHECK_UNKNOWN);
    sql("pc_orders", "UPDATE orders SET status = 'paid' WHERE id = 'o-3'");
    assert_int_equal(ask(f->pc, "o-3"), BRK_CHECK_COMMIT);
}

/* A custom query may answer with the txid itself (or text containing
 * it): the warning quotes the answer, masked. */
static void answer_quoting_the_txid_is_masked_in_warnings(void **state)
{
    fx *f = *state;
    new_db("pc_echo", false);
    open_ok(f, "pc_echo", "SELECT 'no: ' || $1::text");
    assert_int_equal(ask(f->pc, "order-secret-88"), BRK_CHECK_ERROR);
    const char *t = log_text(f);
    assert_non_null(strstr(t, "no: <txid>"));
    assert_txid_only_at_debug(f, "order-secret-88");
}

/* char(n) pads with blanks: 'COMMIT ' in a char(10) column arrives as
 * "COMMIT    " and still means commit. */
static void char_n_answers_with_padding_map(void **state)
{
    fx *f = *state;
    new_db("pc_bpchar", false);
    sql("pc_bpchar", "CREATE TABLE answers (id text PRIMARY KEY, answer char(10));"
                     "INSERT INTO answers VALUES ('a', 'COMMIT '), ('b', ' rollback'),"
                     " ('c', 'Pending'), ('d', NULL), ('e', '')");
    open_ok(f, "pc_bpchar", "SELECT answer FROM answers WHERE id = $1");
    assert_true(stats(f->pc).validated);
    assert_int_equal(ask(f->pc, "a"), BRK_CHECK_COMMIT);
    assert_int_equal(ask(f->pc, "b"), BRK_CHECK_ROLLBACK);
    assert_int_equal(ask(f->pc, "c"), BRK_CHECK_UNKNOWN);
    assert_int_equal(ask(f->pc, "d"), BRK_CHECK_UNKNOWN);
    /* '' in char(10) is ten blanks: not an answer. */
    assert_int_equal(ask(f->pc, "e"), BRK_CHECK_ERROR);
}

/* ---- start-up validation ------------------------------------------------- */

static void bad_custom_queries_fail_with_78_and_a_clear_message(void **state)
{
    fx *f = *state;
    new_db("pc_bad", false);
    sql("pc_bad", "CREATE TABLE orders (id text PRIMARY KEY, status text)");
    char url[256];
    pgh_url(g_pg, "pc_bad", NULL, NULL, url, sizeof url);
    static const struct { const char *query, *says, *says2; } cases[] = {
        { "SELECT 'commit'::text", "one parameter", "(it takes 0)" },
        { "SELECT status FROM orders WHERE id = $1 AND status <> $2",
          "one parameter", "(it takes 2)" },
        { "SELECT status, id FROM orders WHERE id = $1",
          "one text column", "(it returns 2 columns)" },
        { "SELECT length(status) FROM orders WHERE id = $1",
          "one text column", "integer" },
        { "SELEC status FROM orders WHERE id = $1", "does not prepare",
          "syntax error" },
        { "SELECT status FROM nope WHERE id = $1", "does not prepare",
          "relation \"nope\" does not exist" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int rc = open_pc(f, url, cases[i].query);
        if (rc != 78 || !strstr(f->err, "check_query")
            || !strstr(f->err, cases[i].says) || !strstr(f->err, cases[i].says2))
            fail_msg("query \"%s\": rc %d, message \"%s\"", cases[i].query, rc,
                     f->err);
        assert_null(f->pc);
        if (getenv("PC_SHOW_LOG")) fprintf(stderr, "%s\n", f->err);
    }
}

static void default_query_without_schema_says_run_migrate(void **state)
{
    fx *f = *state;
    new_db("pc_noschema", false);
    char url[256];
    pgh_url(g_pg, "pc_noschema", NULL, NULL, url, sizeof url);
    assert_int_equal(open_pc(f, url, NULL), 78);
    assert_non_null(strstr(f->err, "run `outboxd db migrate`"));
    assert_null(f->pc);

    /* The schema without the function (a half-installed one) says the same. */
    sql("pc_noschema", "CREATE SCHEMA outbox");
    assert_int_equal(open_pc(f, url, ""), 78);
    assert_non_null(strstr(f->err, "run `outboxd db migrate`"));
}

static void pool_size_out_of_range_is_78(void **state)
{
    fx *f = *state;
    f->o.pool_size = SC_PGCHECK_POOL_MAX + 1;
    assert_int_equal(open_pc(f, "postgresql://127.0.0.1:1/none", NULL), 78);
    assert_non_null(strstr(f->err, "pool"));
}

/* ALTER TABLE under a prepared statement ("cached plan must not change
 * result type"): the slot prepares afresh instead of failing forever. */
static void altered_table_is_prepared_afresh(void **state)
{
    fx *f = *state;
    new_db("pc_alter", false);
    sql("pc_alter", "CREATE TABLE orders (id text PRIMARY KEY, status varchar(20));"
                    "INSERT INTO orders VALUES ('a-1', 'commit')");
    f->o.pool_size = 1;
    open_ok(f, "pc_alter", "SELECT status FROM orders WHERE id = $1");
    assert_int_equal(ask(f->pc, "a-1"), BRK_CHECK_COMMIT);
    sql("pc_alter", "ALTER TABLE orders ALTER COLUMN status TYPE text;"
                    "UPDATE orders SET status = 'rollback'");
    brk_check_result first = ask(f->pc, "a-1");
    assert_true(first == BRK_CHECK_ERROR || first == BRK_CHECK_ROLLBACK);
    assert_true(ask_until(f->pc, "a-1", BRK_CHECK_ROLLBACK));
    assert_int_equal(ask(f->pc, "a-1"), BRK_CHECK_ROLLBACK);
    /* One fresh start of the (only) slot, not an error per check forever. */
    assert_int_equal(stats(f->pc).reconnects, first == BRK_CHECK_ERROR ? 1 : 0);
}

/* ---- credentials and connection parameters ------------------------------- */

static void wrong_password_is_78_without_the_password(void **state)
{
    fx *f = *state;
    new_db("pc_pw", true);
    recreate_role("pc_pw", "PASSWORD 'Right-Pw-4711'"
                           " IN ROLE password_required, outbox_sidecar");
    char url[256];
    pgh_url(g_pg, "pc_pw", "pc_pw", "Wrong-Pw-0815", url, sizeof url);
    assert_int_equal(open_pc(f, url, NULL), 78);
    assert_null(f->pc);
    assert_non_null(strstr(f->err, "password authentication failed"));
    assert_null(strstr(f->err, "Wrong-Pw-0815"));
    assert_null(strstr(f->err, "Right-Pw-4711"));
    assert_null(strstr(log_text(f), "Wrong-Pw-0815"));

    /* The right one works (and the least-privilege role may answer). */
    pgh_url(g_pg, "pc_pw", "pc_pw", "Right-Pw-4711", url, sizeof url);
    put_txn("pc_pw", "pw-1", "commit");
    assert_int_equal(open_pc(f, url, NULL), 0);
    assert_int_equal(ask(f->pc, "pw-1"), BRK_CHECK_COMMIT);
    assert_null(strstr(log_text(f), "Right-Pw-4711"));
}

static void password_file_supplies_the_password(void **state)
{
    fx *f = *state;
    new_db("pc_pwfile", true);
    recreate_role("pc_pwfile", "PASSWORD 'File-Pw-9'"
                               " IN ROLE password_required, outbox_sidecar");
    put_txn("pc_pwfile", "pf-1", "rollback");
    char dir[512], path[600];
    assert_int_equal(brk_tmpdir_new("pc_pwfile", dir, sizeof dir), 0);
    snprintf(path, sizeof path, "%s/password", dir);
    FILE *pf = fopen(path, "w");
    assert_non_null(pf);
    fputs("File-Pw-9\n", pf);
    fclose(pf);

    char url[256];
    pgh_url(g_pg, "pc_pwfile", "pc_pwfile", NULL, url, sizeof url);
    /* Without the file: no password, refused. */
    assert_int_equal(open_pc(f, url, NULL), 78);

    f->o.pg.password_file = path;
    int rc = open_pc(f, url, NULL);
    if (rc != 0) fail_msg("open with password file: %d: %s", rc, f->err);
    assert_int_equal(ask(f->pc, "pf-1"), BRK_CHECK_ROLLBACK);

    /* A file that is not there. */
    sc_pgcheck_close(f->pc);
    f->pc = NULL;
    snprintf(path, sizeof path, "%s/missing", dir);
    assert_int_equal(open_pc(f, url, NULL), 78);
    assert_non_null(strstr(f->err, "password file"));
    assert_null(f->pc);
    assert_null(strstr(log_text(f), "File-Pw-9"));
    f->o.pg.password_file = NULL;
    brk_tmpdir_remove(dir);
}

static void pg_environment_is_used_when_conninfo_is_empty(void **state)
{
    fx *f = *state;
    new_db("pc_env", true);
    put_txn("pc_env", "env-1", "commit");
    char port[16];
    snprintf(port, sizeof port, "%u", (unsigned)pgh_port(g_pg));
    setenv("PGHOST", "127.0.0.1", 1);
    setenv("PGPORT", port, 1);
    setenv("PGDATABASE", "pc_env", 1);
    setenv("PGUSER", "postgres", 1);
    int rc = open_pc(f, "", NULL);
    brk_check_result got = rc == 0 ? ask(f->pc, "env-1") : BRK_CHECK_ERROR;
    unsetenv("PGHOST");
    unsetenv("PGPORT");
    unsetenv("PGDATABASE");
    unsetenv("PGUSER");
    if (rc != 0) fail_msg("open with PG* environment: %d: %s", rc, f->err);
    assert_int_equal(got, BRK_CHECK_COMMIT);
}

/* ---- main ---------------------------------------------------------------- */

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
        T(default_query_maps_each_state),
        T(custom_answers_map_ignoring_case_and_blanks),
        T(garbage_answer_is_error_and_logged_without_txid),
        T(more_than_one_row_is_error),
        T(pending_past_deadline_is_rollback),
        T(txids_with_sql_metacharacters_are_harmless),
        T(custom_query_over_application_table_needs_no_outbox_schema),
        T(answer_quoting_the_txid_is_masked_in_warnings),
        T(char_n_answers_with_padding_map),
        T(bad_custom_queries_fail_with_78_and_a_clear_message),
        T(default_query_without_schema_says_run_migrate),
        T(pool_size_out_of_range_is_78),
        T(altered_table_is_prepared_afresh),
        T(wrong_password_is_78_without_the_password),
        T(password_file_supplies_the_password),
        T(pg_environment_is_used_when_conninfo_is_empty),
#undef T
    };
    return cmocka_run_group_tests(tests, pg_group_setup, pg_group_teardown);
}
