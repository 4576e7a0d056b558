/*
 * test_daemon_pg.c - the real outboxd binary (OUTBOXD_BIN) against a real
 * PostgreSQL (pg_harness: one throwaway server for the whole program, one
 * database per test), driven over HTTP (daemon_harness.h, daemon_pg_fx.h).
 *
 * What is pinned:
 *   - the payment-timeout flow end to end: the application's row in
 *     outbox.transactions decides the half message through the check-back
 *     (paid in time, paid and POSTed, never paid -> rollback and expiry
 *     message, crash after the DB commit, failed DB transaction);
 *   - a PostgreSQL outage longer than the whole check schedule rolls
 *     nothing back, and the commit made afterwards is applied;
 *   - start-up errors: one line on stderr, exit 78, no password printed;
 *     an unreachable server is a warning and the daemon works once it is
 *     up;
 *   - `outboxd db migrate` / `db status` through the binary;
 *   - no password anywhere, whatever its source and command; a failed
 *     start closes what it opened; SIGTERM in an outage exits in time.
 * Relay mode (restart, kill -9 mid-relay, the database families on
 * /metrics) is in test_daemon_relay.c.
 *
 * Timing: check policies use 300 ms steps so the file stays short; nothing
 * asserts on speed.  Each wait polls for a state with a generous deadline
 * and fails at once when a wrong terminal state shows up.  The outage test
 * does wait out the schedule on purpose (that is its point).
 */
#include "daemon_pg_fx.h"

#define PW_USER  "daemon_pw_user"
#define PW_RIGHT "right-s3cr3t-pw"
#define PW_WRONG "wrong-s3cr3t-pw"

/* What the daemon logs when the server does not answer at start. */
#define UNREACHABLE_WARNING "PostgreSQL unreachable at start: check-backs " \
                            "answer error (retried, never counted) until it answers"

/* ---- helpers ------------------------------------------------------------- */

/* The log line whose msg is `msg` (a new reference); the test fails when
 * the child has not written it. */
static json_t *expect_log(proc *p, const char *msg)
{
    json_t *j = proc_find_log(p, msg);
    if (!j)
        fail_msg("no \"%s\"; stderr:\n%s", msg, p->err);
    return j;
}

/* A start or command that must have exited 78 with a last line of
 * stderr starting with `prefix`; that line into line[cap]. */
static void expect_78(proc *p, const char *prefix, char *line, size_t cap)
{
    if (p->status != 78)
        fail_msg("exit %d; stderr:\n%s", p->status, p->err);
    last_line(p->err, line, cap);
    if (strncmp(line, prefix, strlen(prefix)) != 0)
        fail_msg("last line: %s", line);
}

/* Poll (at most 20 s) until the transaction was checked at least once;
 * with `prepared_throughout`, every poll must find it still prepared. */
static void wait_checked(uint16_t port, const char *txid,
                         bool prepared_throughout, txn_view *v)
{
    int64_t end = now_ms() + 20000;
    do {
        get_txn(port, txid, v);
        if (prepared_throughout)
            assert_string_equal(v->state, "prepared");
        sleep_ms(20);
    } while (v->checks < 1 && now_ms() < end);
}

/* Nothing reaches "orders" (as the group "shipping" sees it). */
static void expect_no_order(uint16_t port)
{
    ids got = { 0 };
    receive_all(port, "shipping", "orders", 0, &got, 0);
    assert_int_equal(got.n, 0);
    free(got.v);
}

/* ---- the payment-timeout flow --------------------------------------------------------- */

/* (a) The order is pending; the customer pays before the checks run out:
 * the next check-back commits, with no POST commit at all. */
static void paid_in_time_is_committed_by_the_check_back(void **state)
{
    fixture *f = *state;
    make_db(f, true);
    proc *p = start_pg(f, NULL);
    char msg_id[64];
    prepare(p->port, "order-a", NULL, msg_id);
    sql(f, "INSERT INTO outbox.transactions (txid) VALUES ('order-a')");
    txn_view v;
    wait_checked(p->port, "order-a", true, &v);
    assert_true(v.checks >= 1);      /* pending answers were counted */
    sql(f, "UPDATE outbox.transactions SET state = 'commit' WHERE txid = "
        "'order-a'");
    wait_state(p->port, "order-a", "committed", 20000, &v);
    expect_only_order(p->port, msg_id);
    stop_daemon(p);
}

/* (b) Paid, and the application also POSTs commit: committed at once. */
static void paid_and_posted_commit_is_committed_at_once(void **state)
{
    fixture *f = *state;
    make_db(f, true);
    proc *p = start_pg(f, NULL);
    char msg_id[64];
    prepare(p->port, "order-b", NULL, msg_id);
    sql(f, "BEGIN; INSERT INTO outbox.transactions (txid) VALUES ('order-b'); "
        "UPDATE outbox.transactions SET state = 'commit' WHERE txid = "
        "'order-b'; COMMIT;");
    json_t *j = http_json(p->port, "POST", "/v1/transactions/order-b/commit",
                          NULL, 200);
    assert_string_equal(json_string_value(json_object_get(j, "state")),
                        "committed");
    json_decref(j);
    expect_only_order(p->port, msg_id);
    stop_daemon(p);
}

/* (c) Never paid: after max_checks pending answers it is rolled back and
 * the expiry message goes to orders.expired; nothing reaches orders. */
static void never_paid_is_rolled_back_and_publishes_the_expiry(void **state)
{
    fixture *f = *state;
    make_db(f, true);
    proc *p = start_pg(f, NULL);
    char msg_id[64];
    prepare(p->port, "order-c", NULL, msg_id);
    sql(f, "INSERT INTO outbox.transactions (txid) VALUES ('order-c')");
    txn_view v;
    wait_state(p->port, "order-c", "rolled_back", 30000, &v);
    assert_int_equal(v.checks, 5);
    ids exp = { 0 };
    receive_all(p->port, "billing", "orders.expired", 1, &exp, 20000);
    assert_int_equal(exp.n, 1);
    expect_no_order(p->port);
    free(exp.v);
    stop_daemon(p);
}

/* (d) The application committed its row and "crashed" before POSTing
 * commit: the first check-back commits.  /metrics counts the answer. */
static void crash_after_the_db_commit_is_committed_by_the_check_back(
    void **state)
{
    fixture *f = *state;
    make_db(f, true);
    proc *p = start_pg(f, NULL);
    assert_int_equal(metric(p->port, "outboxd_db_up", NULL), 1);
    double before = metric(p->port, "outboxd_check_queries_total",
                           "answer=\"commit\"");
    assert_true(before >= 0);
    char msg_id[64];
    sql(f, "INSERT INTO outbox.transactions (txid, state) VALUES ('order-d', "
        "'commit')");
    prepare(p->port, "order-d", NULL, msg_id);
    txn_view v;
    wait_state(p->port, "order-d", "committed", 20000, &v);
    assert_int_equal(v.checks, 0);           /* decided by the first check */
    expect_only_order(p->port, msg_id);
    assert_true(metric(p->port, "outboxd_check_queries_total",
                       "answer=\"commit\"") >= before + 1);
    stop_daemon(p);
}

/* (e) The application's transaction failed: with no row ever written the
 * checks answer unknown until max_checks, then it is rolled back; with a
 * 'rollback' row it is rolled back at the first check. */
static void failed_db_transaction_is_rolled_back(void **state)
{
    fixture *f = *state;
    make_db(f, true);
    proc *p = start_pg(f, NULL);
    char id1[64], id2[64];
    sql(f, "INSERT INTO outbox.transactions (txid, state) VALUES ('order-e2', "
        "'rollback')");
    prepare(p->port, "order-e1", NULL, id1);
    prepare(p->port, "order-e2", NULL, id2);
    txn_view v;
    wait_state(p->port, "order-e2", "rolled_back", 20000, &v);
    assert_int_equal(v.checks, 0);
    wait_state(p->port, "order-e1", "rolled_back", 30000, &v);
    assert_int_equal(v.checks, 5);
    expect_no_order(p->port);
    assert_true(metric(p->port, "outboxd_check_queries_total",
                       "answer=\"unknown\"") >= 5);
    assert_true(metric(p->port, "outboxd_check_queries_total",
                       "answer=\"rollback\"") >= 1);
    stop_daemon(p);
}

/* ---- outages --------------------------------------------------------------------- */

/* PostgreSQL down for longer than first_check + interval * max_checks:
 * the checks answer error, which never counts, so the transaction is still
 * prepared when the server is back, and the commit made then is applied. */
static void outage_longer_than_the_schedule_never_rolls_back(void **state)
{
    fixture *f = *state;
    make_db(f, true);
    proc *p = start_pg(f, NULL);
    char msg_id[64];
    sql(f, "INSERT INTO outbox.transactions (txid) VALUES ('order-out')");
    prepare(p->port, "order-out", NULL, msg_id);
    txn_view v;
    wait_checked(p->port, "order-out", false, &v);
    assert_string_equal(v.state, "prepared");
    assert_true(v.checks >= 1);
    long long checks_before = v.checks;

    stop_pg();
    int64_t down = now_ms();
    /* the whole schedule is 300 + 300 * 5 ms; wait it out twice over, and
     * until the outage was seen */
    int64_t end = down + 30000;
    do {
        get_txn(p->port, "order-out", &v);
        assert_string_equal(v.state, "prepared");
        sleep_ms(50);
    } while ((now_ms() - down < 3600 || v.check_errors < 1) && now_ms() < end);
    assert_true(v.check_errors >= 1);
    assert_int_equal(v.checks, checks_before);   /* errors never count */
    assert_int_equal(metric(p->port, "outboxd_db_up", NULL), 0);
    assert_int_equal(status_of(p->port, "GET", "/readyz", NULL, NULL), 200);

    restart_pg();
    sql(f, "UPDATE outbox.transactions SET state = 'commit' WHERE txid = "
        "'order-out'");
    wait_state(p->port, "order-out", "committed", 60000, &v);
    expect_only_order(p->port, msg_id);
    assert_true(metric(p->port, "outboxd_check_queries_total",
                       "answer=\"error\"") >= 1);
    stop_daemon(p);
}

/* Unreachable at start is not an error: the daemon serves, warns, and
 * answers check-backs once the server is up. */
static void unreachable_at_start_warns_and_works_once_up(void **state)
{
    fixture *f = *state;
    make_db(f, true);
    stop_pg();
    proc *p = start_pg(f, NULL);
    assert_int_equal(status_of(p->port, "GET", "/healthz", NULL, NULL), 200);
    json_t *w = expect_log(p, UNREACHABLE_WARNING);
    assert_string_equal(json_string_value(json_object_get(w, "level")), "warn");
    json_decref(w);
    char msg_id[64];
    prepare(p->port, "order-late", "{\"first_check_ms\":0,\"interval_ms\":300,"
            "\"max_checks\":50}", msg_id);
    restart_pg();
    sql(f, "INSERT INTO outbox.transactions (txid, state) VALUES "
        "('order-late', 'commit')");
    txn_view v;
    wait_state(p->port, "order-late", "committed", 60000, &v);
    stop_daemon(p);
}

/* ---- start-up errors ------------------------------------------------------------------ */

/* The role that must authenticate (pgtmp.sh: members of password_required),
 * with outboxd's least privilege. */
static void make_password_user(void)
{
    char q[512];
    snprintf(q, sizeof q, "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles "
             "WHERE rolname = '%s') THEN CREATE ROLE %s LOGIN PASSWORD '%s' "
             "IN ROLE password_required, outbox_sidecar; END IF; END $$;",
             PW_USER, PW_USER, PW_RIGHT);
    if (pgh_sql(pg, "postgres", q, NULL, 0) != 0)
        fail_msg("cannot create role %s", PW_USER);
}

static void wrong_password_is_78_and_never_printed(void **state)
{
    fixture *f = *state;
    make_db(f, true);
    make_password_user();
    char env[420], line[2048];
    db_env(f->db, PW_USER, PW_WRONG, env, sizeof env);
    proc *p = run_cmd(ARGS("run", f->data_arg, "--listen=127.0.0.1:0"),
                      ARGS(env));
    expect_78(p, "outboxd: postgres: ", line, sizeof line);
    assert_non_null(strstr(line, PW_USER));
    assert_null(strstr(p->err, PW_WRONG));
    assert_null(p->out ? strstr(p->out, PW_WRONG) : NULL);
}

/* The right password from database_password_file, as the least-privilege
 * role: the daemon answers check-backs and logs where it is connected,
 * never the password. */
static void password_file_and_sidecar_role_work_and_nothing_leaks(
    void **state)
{
    fixture *f = *state;
    make_db(f, true);
    make_password_user();
    char pwfile[700], pwarg[800], env[420];
    snprintf(pwfile, sizeof pwfile, "%s/pw", f->dir);
    FILE *fp = fopen(pwfile, "w");
    assert_non_null(fp);
    fputs(PW_RIGHT "\n", fp);
    fclose(fp);
    snprintf(pwarg, sizeof pwarg, "--database-password-file=%s", pwfile);
    db_env(f->db, PW_USER, NULL, env, sizeof env);
    proc *p = start_daemon(f->data, ARGS(pwarg), ARGS(env));
    json_t *j = expect_log(p, "postgres connected");
    assert_non_null(strstr(json_string_value(json_object_get(j, "target")),
                           PW_USER));
    json_decref(j);
    char msg_id[64];
    sql(f, "INSERT INTO outbox.transactions (txid, state) VALUES ('order-pw', "
        "'commit')");
    prepare(p->port, "order-pw", "{\"first_check_ms\":0,\"interval_ms\":300,"
            "\"max_checks\":5}", msg_id);
    txn_view v;
    wait_state(p->port, "order-pw", "committed", 20000, &v);
    assert_int_equal(metric(p->port, "outboxd_db_connections", NULL) >= 1, 1);
    stop_daemon(p);
    assert_null(strstr(p->err, PW_RIGHT));
}

static void bad_custom_check_query_is_78(void **state)
{
    fixture *f = *state;
    make_db(f, true);
    char line[2048];
    /* no $1: refused by the configuration already */
    proc *p = run_cmd(ARGS("run", f->data_arg, "--listen=127.0.0.1:0",
                           "--check-query=SELECT 1"), ARGS(f->env_url));
    expect_78(p, "outboxd: config: flag --check-query: check_query: ", line,
              sizeof line);
    /* PostgreSQL's prepare: wrong column type, unknown table */
    static const char *const bad[] = {
        "--check-query=SELECT 1 WHERE $1 = 'x'",
        "--check-query=SELECT state FROM no_such_table WHERE id = $1",
        NULL
    };
    for (size_t i = 0; bad[i]; i++) {
        p = run_cmd(ARGS("run", f->data_arg, "--listen=127.0.0.1:0", bad[i]),
                    ARGS(f->env_url));
        if (p->status != 78)
            fail_msg("%s: exit %d; stderr:\n%s", bad[i], p->status, p->err);
        last_line(p->err, line, sizeof line);
        if (strncmp(line, "outboxd: postgres: ", 19) != 0)
            fail_msg("%s: last line: %s", bad[i], line);
    }
}

static void default_query_without_the_schema_is_78_naming_db_migrate(
    void **state)
{
    fixture *f = *state;
    make_db(f, false);
    char line[2048];
    proc *p = run_cmd(ARGS("run", f->data_arg, "--listen=127.0.0.1:0"),
                      ARGS(f->env_url));
    expect_78(p, "outboxd: postgres: ", line, sizeof line);
    if (!strstr(line, "outboxd db migrate"))
        fail_msg("last line: %s", line);
    /* exactly one error line: the log lines before it are JSON */
    assert_int_equal(line[0], 'o');
    size_t plain = 0;
    for (const char *s = p->err; s && *s; s = strchr(s, '\n') + 1) {
        plain += *s != '{';
        if (!strchr(s, '\n'))
            break;
    }
    assert_int_equal(plain, 1);
}

static void relay_without_a_database_is_78(void **state)
{
    fixture *f = *state;
    char line[2048];
    proc *p = run_cmd(ARGS("run", f->data_arg, "--relay"), NULL);
    expect_78(p, "outboxd: config: flag --relay: relay: relay mode needs a "
              "database", line, sizeof line);
}

/* ---- outboxd db ---------------------------------------------------------------------- */

static void db_migrate_and_status_through_the_binary(void **state)
{
    fixture *f = *state;
    make_db(f, false);
    proc *p = run_cmd(ARGS("db", "status"), ARGS(f->env_url));
    assert_int_equal(p->status, 0);
    assert_non_null(strstr(p->out, "pending: 0001_outbox"));

    p = run_cmd(ARGS("db", "migrate"), ARGS(f->env_url));
    if (p->status != 0)
        fail_msg("db migrate: exit %d; stderr:\n%s", p->status, p->err);
    assert_non_null(strstr(p->out, "applied 0001_outbox\n"));
    assert_non_null(strstr(p->out, "applied 0002_roles\n"));
    assert_int_equal(pgh_sql_int(pg, f->db, "SELECT max(version) FROM "
                                 "outbox.schema_version"), 2);

    p = run_cmd(ARGS("db", "migrate"), ARGS(f->env_url));
    assert_int_equal(p->status, 0);
    assert_non_null(strstr(p->out, "up to date"));
    assert_null(strstr(p->out, "applied"));

    p = run_cmd(ARGS("db", "status"), ARGS(f->env_url));
    assert_int_equal(p->status, 0);
    assert_non_null(strstr(p->out, "database schema version: 2\n"));
    assert_non_null(strstr(p->out, "pending: none\n"));

    /* a database newer than this outboxd */
    sql(f, "INSERT INTO outbox.schema_version (version, name) VALUES (99, "
        "'0099_future')");
    char line[2048];
    p = run_cmd(ARGS("db", "migrate"), ARGS(f->env_url));
    assert_int_equal(p->status, 65);
    last_line(p->err, line, sizeof line);
    if (strncmp(line, "outboxd: db migrate: ", 21) != 0 || !strstr(line, "99"))
        fail_msg("last line: %s", line);
    p = run_cmd(ARGS("db", "status"), ARGS(f->env_url));
    assert_int_equal(p->status, 65);
    /* ... which the daemon only warns about */
    proc *d = start_pg(f, NULL);
    json_decref(expect_log(d, "the database's outbox schema is newer than "
                              "this outboxd knows"));
    stop_daemon(d);

    /* no database at all */
    p = run_cmd(ARGS("db", "migrate"), NULL);
    assert_int_equal(p->status, 78);
    assert_string_equal(p->err, "outboxd: db migrate: no database configured "
                        "(set database_url or DATABASE_URL, or PGHOST, "
                        "PGDATABASE or PGSERVICE)\n");
}

/* ---- secrets ------------------------------------------------------------------------ */

#define LEAK "s3cr3t"                 /* in every password below */

/* Spawn and wait until the child exits (a command, a failed start) or
 * logs "ready"; *ready says which. */
static proc *spawn_until_exit_or_ready(const char *const *args,
                                       const char *const *env, bool *ready)
{
    proc *p = spawn(args, env);
    int64_t end = now_ms() + 30000;
    for (;;) {
        if (wait_exit(p, 0) >= 0) {
            *ready = false;
            return p;
        }
        pthread_mutex_lock(&p->lock);
        *ready = p->err && strstr(p->err, "\"msg\":\"ready\"");
        pthread_mutex_unlock(&p->lock);
        if (*ready)
            return p;
        if (now_ms() > end)
            fail_msg("neither exited nor ready after 30 s; stderr:\n%s", p->err);
        sleep_ms(10);
    }
}

/* What `ps` shows: /proc/PID/cmdline with its NULs as spaces. */
static void read_cmdline(pid_t pid, char *out, size_t cap)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/cmdline", (int)pid);
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    size_t n = fread(out, 1, cap - 1, fp);
    fclose(fp);
    for (size_t i = 0; i < n; i++)
        if (out[i] == '\0')
            out[i] = ' ';
    out[n] = '\0';
}

static void assert_no_leak(const char *where, const char *what,
                           const char *text)
{
    if (text && strstr(text, LEAK))
        fail_msg("the password is in %s of %s:\n%s", where, what, text);
}

/* A database URL holding a password, given by each of the four sources
 * (DATABASE_URL, OUTBOXD_DATABASE_URL, the config file, the flag) to each
 * command (config, db status, db migrate, run): the password is in no
 * output, no log line, not in /metrics and not in the process's command
 * line, whether the password is wrong, right, the URL malformed (libpq
 * quotes what it cannot parse), the key=value form, or the server
 * unreachable. */
static void the_password_shows_nowhere_whatever_its_source_and_command(
    void **state)
{
    fixture *f = *state;
    make_db(f, true);
    make_password_user();
    enum { WRONG, WRONG_KV, MALFORMED, UNREACHABLE, RIGHT, NURLS };
    char url[NURLS][512];
    pgh_url(pg, f->db, PW_USER, PW_WRONG, url[WRONG], sizeof url[0]);
    snprintf(url[WRONG_KV], sizeof url[0], "host=127.0.0.1 port=%u dbname=%s "
             "user=%s password=%s", (unsigned)pgh_port(pg), f->db, PW_USER,
             PW_WRONG);
    snprintf(url[MALFORMED], sizeof url[0], "postgresql://%s:%s@[::1/%s",
             PW_USER, PW_WRONG, f->db);
    snprintf(url[UNREACHABLE], sizeof url[0], "postgresql://%s:%s@127.0.0.1:"
             "%u/%s", PW_USER, PW_RIGHT, (unsigned)probe_port(), f->db);
    pgh_url(pg, f->db, PW_USER, PW_RIGHT, url[RIGHT], sizeof url[0]);
    /* exit codes: config, db status, db migrate; run: -1 = ready */
    static const int want[NURLS][4] = {
        [WRONG] = { 0, 78, 78, 78 },      [WRONG_KV] = { 0, 78, 78, 78 },
        [MALFORMED] = { 78, 78, 78, 78 }, [UNREACHABLE] = { 0, 69, 69, -1 },
        [RIGHT] = { 0, 0, 0, -1 },
    };
    char conf[700], conf_arg[720], data[700];
    snprintf(conf, sizeof conf, "%s/db.conf", f->dir);
    snprintf(conf_arg, sizeof conf_arg, "--config=%s", conf);
    /* f->data_arg would do, but without this copy GCC's Release build
     * misjudges url[u]'s size below (-Wformat-truncation) */
    snprintf(data, sizeof data, "--data-dir=%s", f->data);
    for (int u = 0; u < NURLS; u++) {
        assert_null(strchr(url[u], '"'));
        for (int src = 0; src < 4; src++) {
            char env[600] = "", flag[600] = "";
            const char *senv[2] = { env, NULL };
            if (src == 0)
                snprintf(env, sizeof env, "DATABASE_URL=%s", url[u]);
            else if (src == 1)
                snprintf(env, sizeof env, "OUTBOXD_DATABASE_URL=%s", url[u]);
            else if (src == 3)
                snprintf(flag, sizeof flag, "--database-url=%s", url[u]);
            if (src == 2) {
                FILE *fp = fopen(conf, "w");
                assert_non_null(fp);
                fprintf(fp, "database_url = \"%s\"\n", url[u]);
                fclose(fp);
            }
            const char *extra = src == 2 ? conf_arg : src == 3 ? flag
                                : "--log-level=info";
            const char *const *e = src < 2 ? senv : NULL;
            for (int cmd = 0; cmd < 4; cmd++) {
                char what[200];
                static const char *const names[] = { "config", "db status",
                                                     "db migrate", "run" };
                snprintf(what, sizeof what, "`%s` with URL %d from source %d",
                         names[cmd], u, src);
                proc *p;
                bool ready = false;
                if (cmd == 0)
                    p = run_cmd(ARGS("config", extra), e);
                else if (cmd == 1)
                    p = run_cmd(ARGS("db", "status", extra), e);
                else if (cmd == 2)
                    p = run_cmd(ARGS("db", "migrate", extra), e);
                else
                    p = spawn_until_exit_or_ready(
                        ARGS("run", data, "--listen=127.0.0.1:0", "--threads=2",
                             "--db-connect-timeout=1s", extra), e, &ready);
                if (ready) {
                    char line[8192];
                    read_cmdline(p->pid, line, sizeof line);
                    assert_no_leak("/proc/PID/cmdline", what, line);
                    wait_listening(p);
                    resp r;
                    http(NULL, p->port, "GET", "/metrics", NULL, NULL, &r);
                    assert_int_equal(r.status, 200);
                    assert_no_leak("/metrics", what, r.body);
                    resp_free(&r);
                    if (u == RIGHT) {
                        json_t *j = proc_find_log(p, "postgres connected");
                        if (!j)
                            fail_msg("%s: not connected:\n%s", what, p->err);
                        json_decref(j);
                    }
                    stop_daemon(p);
                }
                int got = ready ? -1 : p->status;
                if (got != want[u][cmd])
                    fail_msg("%s: exit %d, want %d; stderr:\n%s", what, got,
                             want[u][cmd], p->err ? p->err : "");
                assert_no_leak("stdout", what, p->out);
                assert_no_leak("stderr", what, p->err);
            }
            reap_all();
        }
    }
}

/* ---- failed starts and shutdown in an outage ------------------------------------------- */

/* The "closed" log lines of a start that failed, in order, must be
 * exactly `want` (NULL-terminated): what was opened, closed in reverse. */
static void assert_closed(proc *p, const char *const *want)
{
    size_t k = 0;
    for (const char *s = p->err; s && *s;) {
        const char *nl = strchr(s, '\n');
        size_t n = nl ? (size_t)(nl - s) : strlen(s);
        json_t *j = *s == '{' ? json_loadb(s, n, 0, NULL) : NULL;
        const char *msg = j ? json_string_value(json_object_get(j, "msg")) : NULL;
        if (msg && strcmp(msg, "closed") == 0) {
            const char *c = json_string_value(json_object_get(j, "component"));
            if (!want[k] || strcmp(c, want[k]) != 0)
                fail_msg("closed %s, expected %s; stderr:\n%s", c,
                         want[k] ? want[k] : "nothing more", p->err);
            k++;
        }
        if (msg && strcmp(msg, "close failed") == 0)
            fail_msg("a close failed; stderr:\n%s", p->err);
        json_decref(j);
        s = nl ? nl + 1 : NULL;
    }
    if (want[k])
        fail_msg("%s never closed; stderr:\n%s", want[k], p->err);
}

/* A start that fails after the check-back pool opened closes everything
 * opened so far, in reverse order, and exits 78 with one line (under
 * ASan a leak would change the exit code): the relay refused (the role
 * may not delete from outbox.messages) after pool, txn and groups opened;
 * the schema probe failing right after the pool opened. */
static void a_failed_start_after_the_pool_opened_closes_what_was_opened(
    void **state)
{
    fixture *f = *state;
    make_db(f, true);
    if (pgh_sql(pg, "postgres", "DO $$ BEGIN IF NOT EXISTS (SELECT FROM "
                "pg_roles WHERE rolname = 'daemon_app_only') THEN CREATE ROLE "
                "daemon_app_only LOGIN IN ROLE outbox_app; END IF; END $$;",
                NULL, 0) != 0)
        fail_msg("cannot create role daemon_app_only");
    char env[420], line[2048];
    db_env(f->db, "daemon_app_only", NULL, env, sizeof env);
    proc *p = run_cmd(ARGS("run", f->data_arg, "--listen=127.0.0.1:0",
                           "--relay"), ARGS(env));
    expect_78(p, "outboxd: postgres: ", line, sizeof line);
    json_t *j = proc_find_log(p, "check-backs answered by PostgreSQL");
    assert_non_null(j);                  /* the pool had opened */
    json_decref(j);
    assert_closed(p, ARGS("groups", "txn", "pgcheck", "delay", "store"));

    /* no outbox schema, a custom check query (the pool opens) and the
     * relay (which needs the schema): the probe after the pool fails */
    char bare[80];
    snprintf(bare, sizeof bare, "%s_bare", f->db);
    if (pgh_create_db(pg, bare, false) != 0 ||
        pgh_sql(pg, bare, "CREATE TABLE orders (id text PRIMARY KEY, state "
                "text)", NULL, 0) != 0)
        fail_msg("cannot create database %s", bare);
    db_env(bare, NULL, NULL, env, sizeof env);
    p = run_cmd(ARGS("run", f->data_arg, "--listen=127.0.0.1:0", "--relay",
                     "--check-query=SELECT state FROM orders WHERE id = $1"),
                ARGS(env));
    expect_78(p, "outboxd: postgres: database has no outbox schema", line,
              sizeof line);
    assert_closed(p, ARGS("pgcheck", "delay", "store"));
}

/* Prepare n transactions "out-<i>" whose rows say pending, checked every
 * 300 ms from the start, and wait until the checks run. */
static void pending_checks(fixture *f, uint16_t port, int n)
{
    for (int i = 0; i < n; i++) {
        char txid[32], msg_id[64];
        snprintf(txid, sizeof txid, "out-%d", i);
        if (!pg_down)
            sql(f, "INSERT INTO outbox.transactions (txid) VALUES ('%s')", txid);
        prepare(port, txid, "{\"first_check_ms\":0,\"interval_ms\":300,"
                "\"max_checks\":10000}", msg_id);
    }
}

/* Wait until one of them saw a check error (the outage noticed). */
static void wait_check_error(uint16_t port)
{
    txn_view v;
    int64_t end = now_ms() + 30000;
    do {
        get_txn(port, "out-0", &v);
        assert_string_equal(v.state, "prepared");
        sleep_ms(50);
    } while (v.check_errors < 1 && now_ms() < end);
    assert_true(v.check_errors >= 1);
}

/* SIGTERM, then the exit code, within grace + 10 s (generous: the checks
 * in flight may wait out a connect timeout, the relay its connect). */
static void sigterm_exits_0_within(proc *p, int grace_ms)
{
    int64_t t0 = now_ms();
    kill(p->pid, SIGTERM);
    int rc = wait_exit(p, grace_ms + 10000);
    int64_t took = now_ms() - t0;
    if (rc == -1)
        fail_msg("still running %lld ms after SIGTERM; stderr:\n%s",
                 (long long)took, p->err);
    if (rc != 0)
        fail_msg("exit %d; stderr:\n%s", rc, p->err);
    print_message("exit 0 %lld ms after SIGTERM (grace %d ms)\n",
                  (long long)took, grace_ms);
}

/* PostgreSQL stopped while checks run and the relay leads: SIGTERM still
 * ends the process, exit 0, within the grace and a few seconds (checks
 * answer ERROR at once, the relay's backoff wait is woken by close). */
static void sigterm_during_a_postgresql_outage_exits_0_in_time(void **state)
{
    fixture *f = *state;
    make_db(f, true);
    static const char *const more[] = { "--relay", "--relay-poll-interval=100ms",
                                        "--shutdown-grace=2s", NULL };
    proc *p = start_pg(f, more);
    pending_checks(f, p->port, 6);
    txn_view v;
    wait_checked(p->port, "out-0", false, &v);
    assert_true(v.checks >= 1);
    stop_pg();
    wait_check_error(p->port);
    /* let the relay notice and back off a few times */
    int64_t end = now_ms() + 20000;
    while (metric(p->port, "outboxd_relay_errors_total", NULL) < 1 &&
           metric(p->port, "outboxd_relay_leader", NULL) != 0 && now_ms() < end)
        sleep_ms(50);
    sleep_ms(1500);
    sigterm_exits_0_within(p, 2000);
    restart_pg();
}

/* A server that accepts TCP connections and never answers (a hung host,
 * a black-holed network): every connect waits out db_connect_timeout.
 * SIGTERM then still exits 0 in time, with checks and the relay blocked in
 * their connects. */
static void sigterm_while_postgresql_hangs_exits_0_in_time(void **state)
{
    fixture *f = *state;
    uint16_t port;
    int hole = listen_loopback(64, &port);          /* never accepted */
    char env[200];
    snprintf(env, sizeof env, "DATABASE_URL=postgresql://nobody@127.0.0.1:%u/"
             "db", (unsigned)port);
    static const char *const more[] = { "--relay", "--relay-poll-interval=100ms",
                                        "--db-connect-timeout=2s",
                                        "--shutdown-grace=1s", NULL };
    pg_down = true;                  /* pending_checks: no rows to write */
    proc *p = start_daemon(f->data, more, ARGS(env));
    pg_down = false;
    json_decref(expect_log(p, UNREACHABLE_WARNING));
    pg_down = true;
    pending_checks(f, p->port, 6);
    pg_down = false;
    wait_check_error(p->port);
    sleep_ms(500);
    sigterm_exits_0_within(p, 1000);
    close(hole);
}

/* ---- main ---------------------------------------------------------------- */

int main(void)
{
    int rc = daemon_pg_begin("test_daemon_pg");
    if (rc)
        return rc;
#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(paid_in_time_is_committed_by_the_check_back),
        T(paid_and_posted_commit_is_committed_at_once),
        T(never_paid_is_rolled_back_and_publishes_the_expiry),
        T(crash_after_the_db_commit_is_committed_by_the_check_back),
        T(failed_db_transaction_is_rolled_back),
        T(outage_longer_than_the_schedule_never_rolls_back),
        T(unreachable_at_start_warns_and_works_once_up),
        T(wrong_password_is_78_and_never_printed),
        T(password_file_and_sidecar_role_work_and_nothing_leaks),
        T(bad_custom_check_query_is_78),
        T(default_query_without_the_schema_is_78_naming_db_migrate),
        T(relay_without_a_database_is_78),
        T(db_migrate_and_status_through_the_binary),
        T(the_password_shows_nowhere_whatever_its_source_and_command),
        T(a_failed_start_after_the_pool_opened_closes_what_was_opened),
        T(sigterm_during_a_postgresql_outage_exits_0_in_time),
        T(sigterm_while_postgresql_hangs_exits_0_in_time),
    };
#undef T
    rc = cmocka_run_group_tests(tests, NULL, NULL);
    daemon_pg_end();
    return rc;
}
