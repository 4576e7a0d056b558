/*
 * test_config_db.c - outboxd's configuration of PostgreSQL (issue 6) and
 * its secrets: DATABASE_URL and the PG* variables ("configured"), the
 * database options' ranges and conflicts, check_query, the password file,
 * the `db` commands, database_url masked, wiped and refused when libpq
 * cannot parse it or it nests a URL, nothing that looks like a URL or
 * password echoed in any message, and secret flags hidden in argv.
 *
 * In-process through sc_config_load, like test_config.c (config_fx.h).
 */
#include "config_fx.h"

#define URL "postgresql://app:s3cr3t-pw@db.internal:5432/orders"

static void database_url_comes_from_DATABASE_URL_when_outboxd_one_is_unset(
    void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, NONE, ARGS("DATABASE_URL=" URL)), 0);
    assert_string_equal(f->cfg.database_url, URL);
    assert_string_equal(sc_config_from(&f->cfg, "database_url"), "env");
    assert_true(f->cfg.db_configured);
    /* empty counts as unset, like every OUTBOXD_ variable */
    assert_int_equal(load(f, NONE, ARGS("OUTBOXD_DATABASE_URL=",
                                        "DATABASE_URL=" URL)), 0);
    assert_string_equal(f->cfg.database_url, URL);
    assert_int_equal(load(f, NONE, ARGS("DATABASE_URL=")), 0);
    assert_false(f->cfg.db_configured);
}

static void outboxd_database_url_beats_DATABASE_URL_and_a_flag_beats_both(
    void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, NONE, ARGS("DATABASE_URL=postgresql://a/x",
                                        "OUTBOXD_DATABASE_URL=postgresql://b/y")),
                     0);
    assert_string_equal(f->cfg.database_url, "postgresql://b/y");
    assert_int_equal(load(f, ARGS("--database-url=host=c dbname=z"),
                          ARGS("DATABASE_URL=postgresql://a/x")), 0);
    assert_string_equal(f->cfg.database_url, "host=c dbname=z");
    assert_string_equal(sc_config_from(&f->cfg, "database_url"), "flag");
    /* the file is below the environment */
    const char *p = write_file(f, "db.conf", "database_url = postgresql://f/f\n");
    assert_int_equal(load(f, ARGS("--config", p),
                          ARGS("DATABASE_URL=postgresql://a/x")), 0);
    assert_string_equal(f->cfg.database_url, "postgresql://a/x");
}

static void pg_variables_make_a_database_configured(void **state)
{
    fixture *f = *state;
    static const char *const yes[] = { "PGHOST=/run/postgresql",
                                       "PGHOSTADDR=10.0.0.5", "PGDATABASE=orders",
                                       "PGSERVICE=outbox", NULL };
    for (size_t i = 0; yes[i]; i++) {
        assert_int_equal(load(f, NONE, ARGS(yes[i])), 0);
        if (!f->cfg.db_configured)
            fail_msg("%s does not configure a database", yes[i]);
        assert_string_equal(f->cfg.database_url, "");
    }
    /* a user, port or password alone says nothing about which server */
    assert_int_equal(load(f, NONE, ARGS("PGUSER=app", "PGPORT=5433",
                                        "PGPASSWORD=x", "PGHOST=")), 0);
    assert_false(f->cfg.db_configured);
    /* a password alone least of all: no relay, no check query with it */
    assert_int_equal(load(f, NONE, ARGS("PGPASSWORD=s3cr3t")), 0);
    assert_false(f->cfg.db_configured);
    expect_78(f, ARGS("--relay"), ARGS("PGPASSWORD=s3cr3t"), "outboxd: "
              "config: flag --relay: relay: relay mode needs a database", NULL);
    assert_null(strstr(f->err, "s3cr3t"));
}

static void database_options_parse_and_their_bounds_are_inclusive(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, ARGS("--db-pool=64", "--db-statement-timeout=1ms",
                                  "--db-connect-timeout=10m", "--relay",
                                  "--relay-batch=10000",
                                  "--relay-poll-interval=10ms",
                                  "--check-query=SELECT s FROM o WHERE id = $1"),
                          ARGS("PGDATABASE=orders")), 0);
    sc_config *c = &f->cfg;
    assert_int_equal(c->db_pool, 64);
    assert_int_equal(c->db_statement_timeout_ms, 1);
    assert_int_equal(c->db_connect_timeout_ms, 600000);
    assert_true(c->relay);
    assert_int_equal(c->relay_batch, 10000);
    assert_int_equal(c->relay_poll_interval_ms, 10);
    assert_string_equal(c->check_query, "SELECT s FROM o WHERE id = $1");
    assert_int_equal(load(f, ARGS("--db-pool=1", "--db-statement-timeout=1h",
                                  "--db-connect-timeout=1s", "--relay-batch=1",
                                  "--relay-poll-interval=1h"), NONE), 0);
    assert_int_equal(f->cfg.db_pool, 1);
    assert_int_equal(f->cfg.db_statement_timeout_ms, 3600000);
    assert_int_equal(f->cfg.db_connect_timeout_ms, 1000);
    assert_int_equal(f->cfg.relay_batch, 1);
    assert_int_equal(f->cfg.relay_poll_interval_ms, 3600000);
}

static void database_options_out_of_range_are_78(void **state)
{
    fixture *f = *state;
    static const struct { const char *arg, *msg; } bad[] = {
        { "--db-pool=0", "db_pool: out of range: must be between 1 and 64" },
        { "--db-pool=65", "db_pool: out of range: must be between 1 and 64" },
        { "--db-statement-timeout=0", "db_statement_timeout: out of range: "
          "must be between 1ms and 1h" },
        { "--db-statement-timeout=61m", "db_statement_timeout: out of range" },
        { "--db-connect-timeout=999ms", "db_connect_timeout: out of range: "
          "must be between 1s and 10m" },
        { "--db-connect-timeout=601s", "db_connect_timeout: out of range" },
        { "--relay-batch=0", "relay_batch: out of range: must be between 1 "
          "and 10000" },
        { "--relay-batch=10001", "relay_batch: out of range" },
        { "--relay-poll-interval=9ms", "relay_poll_interval: out of range: "
          "must be between 10ms and 1h" },
        { "--relay-poll-interval=2h", "relay_poll_interval: out of range" },
        { "--db-pool=two", "db_pool: not a number" },
        { "--db-statement-timeout=5", "db_statement_timeout: bad duration" },
        { "--relay=sometimes", "relay: bad boolean" },
        { NULL, NULL }
    };
    for (size_t i = 0; bad[i].arg; i++) {
        int rc = load(f, ARGS(bad[i].arg), ARGS("PGDATABASE=orders"));
        if (rc != EX_CONFIG)
            fail_msg("%s: exit %d, want 78", bad[i].arg, rc);
        assert_prefix(f->err, "outboxd: config: flag --");
        assert_contains(f->err, bad[i].msg);
    }
}

static void check_query_without_the_txid_parameter_is_78(void **state)
{
    fixture *f = *state;
    expect_78(f, ARGS("--check-query=SELECT 'commit'"),
              ARGS("PGDATABASE=orders"), "outboxd: config: flag "
              "--check-query: check_query: must use the txid as parameter $1",
              NULL);
    expect_78(f, NONE, ARGS("PGDATABASE=orders",
                            "OUTBOXD_CHECK_QUERY=SELECT state FROM t WHERE id = $2"),
              "outboxd: config: env OUTBOXD_CHECK_QUERY: check_query: must use",
              NULL);
}

static void relay_without_a_database_is_78(void **state)
{
    fixture *f = *state;
    expect_78(f, ARGS("--relay"), NONE, "outboxd: config: flag --relay: relay: "
              "relay mode needs a database", "DATABASE_URL");
    const char *p = write_file(f, "r.conf", "relay = on\n");
    char prefix[700];
    snprintf(prefix, sizeof prefix, "outboxd: config: %s:1: relay: relay mode "
             "needs a database", p);
    expect_78(f, ARGS("--config", p), NONE, prefix, NULL);
    assert_int_equal(load(f, ARGS("--relay"), ARGS("DATABASE_URL=" URL)), 0);
    assert_true(f->cfg.relay);
    /* relay = false needs nothing */
    assert_int_equal(load(f, ARGS("--relay=false"), NONE), 0);
}

static void check_query_without_a_database_is_78(void **state)
{
    fixture *f = *state;
    expect_78(f, NONE, ARGS("OUTBOXD_CHECK_QUERY=SELECT s FROM o WHERE id = $1"),
              "outboxd: config: env OUTBOXD_CHECK_QUERY: check_query: a check "
              "query needs a database", NULL);
    assert_int_equal(load(f, NONE, ARGS("OUTBOXD_CHECK_QUERY=SELECT s FROM o "
                                        "WHERE id = $1", "PGSERVICE=orders")), 0);
}

static void unreadable_or_empty_password_file_is_78(void **state)
{
    fixture *f = *state;
    expect_78(f, ARGS("--database-password-file=/nonexistent/pw"),
              ARGS("DATABASE_URL=" URL), "outboxd: config: flag "
              "--database-password-file: database_password_file: cannot read "
              "/nonexistent/pw: ", "No such file");
    expect_78(f, ARGS("--database-password-file", f->dir),
              ARGS("DATABASE_URL=" URL), "outboxd: config: flag "
              "--database-password-file: database_password_file: cannot read ",
              "Is a directory");
    char arg[700];
    const char *p = write_file(f, "pw-empty", "\n");
    snprintf(arg, sizeof arg, "--database-password-file=%s", p);
    expect_78(f, ARGS(arg), ARGS("DATABASE_URL=" URL), "outboxd: config: flag "
              "--database-password-file: database_password_file: ",
              "has no password on its first line");
    p = write_file(f, "pw-void", "");
    snprintf(arg, sizeof arg, "--database-password-file=%s", p);
    expect_78(f, ARGS(arg), ARGS("DATABASE_URL=" URL), "outboxd: config: flag "
              "--database-password-file: database_password_file: ",
              "has no password");
}

/* The file is checked, not copied: its content appears nowhere. */
static void password_file_is_checked_but_never_held_or_printed(void **state)
{
    fixture *f = *state;
    char arg[700];
    const char *p = write_file(f, "pw", "pw-s3cr3t-value\n");
    snprintf(arg, sizeof arg, "--database-password-file=%s", p);
    assert_int_equal(load(f, ARGS(arg), ARGS("PGHOST=127.0.0.1")), 0);
    assert_string_equal(f->cfg.database_password_file, p);
    assert_null(memmem(&f->cfg, sizeof f->cfg, "pw-s3cr3t", 9));
    assert_printed_without(&f->cfg, "\ndatabase_password_file = ", "pw-s3cr3t");
}

static void database_url_is_masked_in_output_and_errors_and_wiped(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, NONE, ARGS("DATABASE_URL=" URL)), 0);
    assert_printed_without(&f->cfg, "\ndatabase_url = ********  # from env\n",
                           "s3cr3t");
    sc_config_wipe(&f->cfg);
    assert_null(memmem(&f->cfg, sizeof f->cfg, "s3cr3t", 6));
    /* too long: the error names the option, not the value */
    size_t n = SC_URL_MAX + 40;
    char *big = malloc(n);
    assert_non_null(big);
    int k = snprintf(big, n, "DATABASE_URL=%s/", URL);
    memset(big + k, 'd', n - (size_t)k - 1);
    big[n - 1] = '\0';
    assert_int_equal(load(f, NONE, ARGS(big)), EX_CONFIG);
    assert_prefix(f->err, "outboxd: config: env DATABASE_URL: database_url: "
                  "too long");
    assert_null(strstr(f->err, "s3cr3t"));
    free(big);
    /* a failed load wipes what it had read */
    assert_int_equal(load(f, ARGS("--threads=x"), ARGS("DATABASE_URL=" URL)),
                     EX_CONFIG);
    assert_null(memmem(&f->cfg, sizeof f->cfg, "s3cr3t", 6));
}

static void db_commands_parse_and_need_a_subcommand(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, ARGS("db", "migrate"), ARGS("DATABASE_URL=" URL)),
                     0);
    assert_int_equal(f->cfg.command, SC_CMD_DB_MIGRATE);
    assert_int_equal(load(f, ARGS("--db-connect-timeout=2s", "db", "status"),
                          NONE), 0);
    assert_int_equal(f->cfg.command, SC_CMD_DB_STATUS);
    assert_int_equal(f->cfg.db_connect_timeout_ms, 2000);
    assert_false(f->cfg.db_configured);     /* main.c says so, 78 */
    assert_int_equal(load(f, ARGS("db"), NONE), EX_USAGE);
    assert_string_equal(f->err, "outboxd: db needs a command: migrate or "
                        "status (see outboxd --help)");
    assert_int_equal(load(f, ARGS("db", "drop"), NONE), EX_USAGE);
    assert_string_equal(f->err, "outboxd: unknown db command \"drop\" (db "
                        "commands: migrate, status)");
    assert_int_equal(load(f, ARGS("db", "migrate", "now"), NONE), EX_USAGE);
    assert_prefix(f->err, "outboxd: unexpected argument \"now\"");
    assert_int_equal(load(f, ARGS("migrate"), NONE), EX_USAGE);
    assert_int_equal(load(f, ARGS("run", "db"), NONE), EX_USAGE);
}

static void usage_describes_db_commands_and_DATABASE_URL(void **state)
{
    (void)state;
    char *buf = usage_text();
    assert_non_null(strstr(buf, "  db migrate  "));
    assert_non_null(strstr(buf, "  db status   "));
    assert_non_null(strstr(buf, "--database-url=URL  (OUTBOXD_DATABASE_URL, "
                                "default none)"));
    assert_non_null(strstr(buf, "Also read from DATABASE_URL"));
    assert_non_null(strstr(buf, "--check-query=SQL  (OUTBOXD_CHECK_QUERY, "
                                "default none)"));
    assert_non_null(strstr(buf, "--db-pool=N  (OUTBOXD_DB_POOL, default 2)"));
    assert_non_null(strstr(buf, "--relay=BOOL  (OUTBOXD_RELAY, default false)"));
    free(buf);
}


/* A URL or conninfo libpq cannot parse is refused here, at whichever layer
 * it comes from, and the message never repeats it: libpq's own parse
 * errors quote the text they stumbled on, which may be the password (the
 * whole URL for an unclosed "[" of an IPv6 host).  Exit 78 instead of the
 * daemon starting with a warning, since no retry can ever connect. */
static void malformed_database_url_is_78_and_never_echoed(void **state)
{
    fixture *f = *state;
    static const char *const bad[] = {
        "postgresql://u:s3cret@[::1/db",              /* libpq quotes it all */
        "postgresql://u:s3cr%zzet@db.internal/orders",/* quotes the token */
        "postgresql://u:s3cret@db/orders?s3cret",     /* quotes the param */
        "postgresql://u:s3cret@db/orders?bogus=1",
        "host=db.internal port=5432 s3cret",          /* missing "=" after it */
        "host=db.internal password='s3cret",          /* unterminated quote */
        "host=db.internal password=s3cret bogus=1",
        NULL
    };
    char path[700], arg[256], env[256], where[800];
    snprintf(path, sizeof path, "%s/url.conf", f->dir);
    for (size_t i = 0; bad[i]; i++) {
        for (int src = 0; src < 4; src++) {
            int rc;
            if (src == 0) {
                snprintf(env, sizeof env, "DATABASE_URL=%s", bad[i]);
                rc = load(f, NONE, ARGS(env));
                snprintf(where, sizeof where, "env DATABASE_URL");
            } else if (src == 1) {
                snprintf(env, sizeof env, "OUTBOXD_DATABASE_URL=%s", bad[i]);
                rc = load(f, ARGS("db", "status"), ARGS(env));
                snprintf(where, sizeof where, "env OUTBOXD_DATABASE_URL");
            } else if (src == 2) {
                char text[300];
                snprintf(text, sizeof text, "database_url = \"%s\"\n", bad[i]);
                write_file(f, "url.conf", text);
                rc = load(f, ARGS("--config", path), NONE);
                snprintf(where, sizeof where, "%s:1", path);
            } else {
                snprintf(arg, sizeof arg, "--database-url=%s", bad[i]);
                rc = load(f, ARGS("db", "migrate", arg), NONE);
                snprintf(where, sizeof where, "flag --database-url");
            }
            if (rc != EX_CONFIG)
                fail_msg("%s from source %d: exit %d, want 78", bad[i], src, rc);
            char prefix[1000];
            snprintf(prefix, sizeof prefix, "outboxd: config: %s: database_url: "
                     "not a PostgreSQL URL or key=value conninfo", where);
            assert_prefix(f->err, prefix);
            if (strstr(f->err, "s3cr"))
                fail_msg("the password is in the message: %s", f->err);
            assert_null(strchr(f->err, '\n'));
            assert_null(memmem(&f->cfg, sizeof f->cfg, "s3cr", 4));
        }
    }
    /* what libpq says is kept, without its quoted text */
    expect_78(f, NONE, ARGS("DATABASE_URL=host=h password=s3cret bogus=1"),
              "outboxd: config: env DATABASE_URL: database_url: not a "
              "PostgreSQL URL or key=value conninfo (invalid connection "
              "option \"...\")", NULL);
    /* the valid forms still load */
    static const char *const good[] = {
        "postgresql://u:s3cret@[::1]:5432/db?sslmode=disable",
        "postgres://db.internal/orders",
        "host=/run/postgresql dbname=orders password='s3 cret'",
        "dbname=orders", NULL
    };
    for (size_t i = 0; good[i]; i++) {
        snprintf(env, sizeof env, "DATABASE_URL=%s", good[i]);
        if (load(f, NONE, ARGS(env)) != 0)
            fail_msg("%s: %s", good[i], f->err);
        assert_string_equal(f->cfg.database_url, good[i]);
    }
}

/* Inside a conninfo only the top level is expanded: a URL given as its
 * dbname or host is taken as a literal name, which libpq and the server
 * then print back ("database \"postgresql://u:s3cret@...\" does not
 * exist") and which the log would show as the target. */
static void a_url_nested_in_a_conninfo_is_78_and_never_echoed(void **state)
{
    fixture *f = *state;
    static const char *const bad[] = {
        "dbname=postgresql://u:s3cret@db.internal/orders",
        "host=postgresql://u:s3cret@db.internal dbname=orders",
        "postgresql://db.internal/orders?user=postgres://u:s3cret@x",
        NULL
    };
    char env[256];
    for (size_t i = 0; bad[i]; i++) {
        snprintf(env, sizeof env, "DATABASE_URL=%s", bad[i]);
        if (load(f, NONE, ARGS(env)) != EX_CONFIG)
            fail_msg("%s: loaded", bad[i]);
        assert_prefix(f->err, "outboxd: config: env DATABASE_URL: database_url: ");
        assert_contains(f->err, "holds a URL");
        assert_null(strstr(f->err, "s3cr"));
    }
}

/* A URL put where another value or a command belongs (a forgotten flag
 * name, a shifted argument, a bare URL line in the file) is refused
 * without being repeated. */
static void values_that_look_like_a_url_or_password_are_never_echoed(
    void **state)
{
    fixture *f = *state;
    const char *u = "postgresql://u:s3cret@db.internal/orders";
    char arg[256];
    assert_int_equal(load(f, ARGS(u), NONE), EX_USAGE);
    assert_prefix(f->err, "outboxd: unknown command ");
    assert_null(strstr(f->err, "s3cr"));
    assert_int_equal(load(f, ARGS("run", u), NONE), EX_USAGE);
    assert_prefix(f->err, "outboxd: unexpected argument ");
    assert_null(strstr(f->err, "s3cr"));
    assert_int_equal(load(f, ARGS("db", u), NONE), EX_USAGE);
    assert_prefix(f->err, "outboxd: unknown db command ");
    assert_null(strstr(f->err, "s3cr"));
    /* a bool flag does not take it, so it is a stray argument */
    assert_int_equal(load(f, ARGS("--relay", "host=db password=s3cret"), NONE),
                     EX_USAGE);
    assert_null(strstr(f->err, "s3cr"));
    snprintf(arg, sizeof arg, "--database-url:%s", u);
    assert_int_equal(load(f, ARGS(arg), NONE), EX_USAGE);
    assert_prefix(f->err, "outboxd: unknown option ");
    assert_null(strstr(f->err, "s3cr"));
    snprintf(arg, sizeof arg, "-%s", u);
    assert_int_equal(load(f, ARGS(arg), NONE), EX_USAGE);
    assert_null(strstr(f->err, "s3cr"));
    /* a misspelt flag is still named: only its value looks secret */
    snprintf(arg, sizeof arg, "--databse-url=%s", u);
    assert_int_equal(load(f, ARGS(arg), NONE), EX_USAGE);
    assert_string_equal(f->err, "outboxd: unknown option --databse-url (see "
                        "outboxd --help)");
    /* a value of another option */
    snprintf(arg, sizeof arg, "--listen=%s:1", u);
    expect_78(f, ARGS(arg), NONE, "outboxd: config: flag --listen: listen: ",
              NULL);
    assert_null(strstr(f->err, "s3cr"));
    expect_78(f, NONE, ARGS("OUTBOXD_DB_POOL=host=db password=s3cret"),
              "outboxd: config: env OUTBOXD_DB_POOL: db_pool: ", NULL);
    assert_null(strstr(f->err, "s3cr"));
    /* a bare URL line in the file: its "key" is the URL up to its '=' */
    const char *p = write_file(f, "bare.conf", "postgresql://u:s3cret@db/o?"
                               "sslmode=require\n");
    assert_int_equal(load(f, ARGS("--config", p), NONE), EX_CONFIG);
    assert_contains(f->err, "bare.conf:1: ");
    assert_null(strstr(f->err, "s3cr"));
    /* ordinary mistakes are still quoted, to help */
    assert_int_equal(load(f, ARGS("serve"), NONE), EX_USAGE);
    assert_contains(f->err, "\"serve\"");
    expect_78(f, ARGS("--db-pool=two"), NONE, "outboxd: config: flag "
              "--db-pool: db_pool: not a number: \"two\"", NULL);
}

/* The process title: /proc/PID/cmdline shows argv to every user, so the
 * values of secret flags are overwritten once loaded, in place, with the
 * same length; everything else stays. */
static void hide_secrets_overwrites_secret_flag_values_in_argv(void **state)
{
    fixture *f = *state;
    char a1[] = "run";
    char a2[] = "--database-url=postgresql://u:s3cret@db/orders";
    char a3[] = "--token";
    char a4[] = "tok-s3cret-0123456789";
    char a5[] = "--database-url";
    char a6[] = "host=db password=s3cret";
    char a7[] = "--data-dir=/tmp/x";
    char a8[] = "--relay";
    char a9[] = "--token=tok-s3cret-9876543210";
    char *argv[] = { (char *)"outboxd", a1, a2, a3, a4, a5, a6, a7, a8, a9,
                     NULL };
    int argc = 10;
    assert_int_equal(sc_config_load(&f->cfg, argc, argv, NULL, f->err,
                                    sizeof f->err), 0);
    sc_config_hide_secrets(argc, argv);
    for (int i = 0; i < argc; i++)
        if (strstr(argv[i], "s3cret"))
            fail_msg("argv[%d] still holds the secret: %s", i, argv[i]);
    assert_string_equal(a1, "run");
    assert_prefix(a2, "--database-url=");
    assert_int_equal(strlen(a2), strlen("--database-url=postgresql://u:s3cret@db/orders"));
    assert_string_equal(a3, "--token");
    assert_string_equal(a5, "--database-url");
    assert_string_equal(a7, "--data-dir=/tmp/x");
    assert_string_equal(a8, "--relay");
    assert_prefix(a9, "--token=");
    /* the loaded values are untouched: the last flag wins */
    assert_string_equal(f->cfg.database_url, "host=db password=s3cret");
    assert_string_equal(f->cfg.token, "tok-s3cret-9876543210");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)
        T(database_url_comes_from_DATABASE_URL_when_outboxd_one_is_unset),
        T(outboxd_database_url_beats_DATABASE_URL_and_a_flag_beats_both),
        T(pg_variables_make_a_database_configured),
        T(database_options_parse_and_their_bounds_are_inclusive),
        T(database_options_out_of_range_are_78),
        T(check_query_without_the_txid_parameter_is_78),
        T(relay_without_a_database_is_78),
        T(check_query_without_a_database_is_78),
        T(unreadable_or_empty_password_file_is_78),
        T(password_file_is_checked_but_never_held_or_printed),
        T(database_url_is_masked_in_output_and_errors_and_wiped),
        T(db_commands_parse_and_need_a_subcommand),
        T(usage_describes_db_commands_and_DATABASE_URL),
        T(malformed_database_url_is_78_and_never_echoed),
        T(a_url_nested_in_a_conninfo_is_78_and_never_echoed),
        T(values_that_look_like_a_url_or_password_are_never_echoed),
        T(hide_secrets_overwrites_secret_flag_values_in_argv),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
