/*
 * test_pg.c - PostgreSQL connections (sidecar/src/pg.h): the reconnect
 * backoff, how real connection failures are classified (UNREACHABLE: retry;
 * REFUSED: configuration), the one-line messages and that no password is
 * ever in them, the password file, the session settings every connection
 * gets (statement_timeout, application_name, TCP keepalives and user
 * timeout on the socket), the classification of failed results, and the
 * bounded wait for a result (sc_pg_wait_result), and the connect's own
 * bound and stop descriptor against a server that accepts and never
 * answers.
 *
 * One throwaway server for the program (tests/support/pg_harness); the
 * failure cases that need no server (a port nobody listens on, a name that
 * does not resolve, malformed URLs) use addresses on this machine only.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <fcntl.h>
#include <libpq-fe.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "pg.h"
#include "pg_fixture.h"
#include "tmpdir.h"

#define SECRET "S3cret-Pw-4711"

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A role that must give its password (see pg_harness.h). */
static void make_pw_role(const char *role, const char *password)
{
    char attrs[256];
    snprintf(attrs, sizeof attrs, "PASSWORD '%s' IN ROLE password_required",
             password);
    recreate_role(role, attrs);
}

static bool one_line(const char *s)
{
    return !strchr(s, '\n') && !strchr(s, '\r') && !strchr(s, '\t')
           && s[0] != ' ' && (s[0] == '\0' || s[strlen(s) - 1] != ' ');
}

/* Connect with conninfo and opts defaults; returns the connection (or NULL
 * with *fail and err set). */
static PGconn *conn_url(const char *url, sc_pg_fail *fail, char *err, size_t cap)
{
    sc_pg_opts o;
    sc_pg_opts_init(&o);
    o.conninfo = url;
    o.connect_timeout_ms = 3000;
    return sc_pg_connect(&o, fail, err, cap);
}

/* conn_url that must fail, with class `want`; the message into err. */
static void connect_fails(const char *url, sc_pg_fail want, char *err, size_t cap)
{
    sc_pg_fail fail = SC_PG_OK;
    assert_null(conn_url(url, &fail, err, cap));
    assert_int_equal(fail, want);
}

/* Options that reach database postgres as the superuser; url[cap] holds
 * the URL and must outlive o. */
static void postgres_opts(sc_pg_opts *o, char *url, size_t cap)
{
    pgh_url(g_pg, "postgres", NULL, NULL, url, cap);
    sc_pg_opts_init(o);
    o->conninfo = url;
}

/* sc_pg_connect that must succeed. */
static PGconn *must_connect(const sc_pg_opts *o)
{
    char err[1024];
    sc_pg_fail fail;
    PGconn *c = sc_pg_connect(o, &fail, err, sizeof err);
    if (!c) fail_msg("connect: %s", err);
    return c;
}

static const char *show(PGconn *c, const char *setting, char *out, size_t cap)
{
    char q[128];
    snprintf(q, sizeof q, "SHOW %s", setting);
    PGresult *r = PQexec(c, q);
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        fail_msg("%s: %s", q, PQresultErrorMessage(r));
    snprintf(out, cap, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    return out;
}

/* ---- backoff ------------------------------------------------------------------ */

static void backoff_stays_between_min_and_the_doubled_cap(void **state)
{
    (void)state;
    sc_pg_opts o;
    sc_pg_opts_init(&o);
    o.backoff_min_ms = 100;
    o.backoff_max_ms = 30000;
    static const double draws[] = { 0.0, 0.25, 0.5, 0.999999, 1.0, 7.0, -3.0 };
    for (unsigned n = 0; n < 100; n++) {
        int64_t cap = 100;
        for (unsigned i = 0; i < n && cap < 30000; i++) cap *= 2;
        if (cap > 30000) cap = 30000;
        for (size_t j = 0; j < sizeof draws / sizeof draws[0]; j++) {
            int64_t v = sc_pg_backoff_ms(&o, n, draws[j]);
            if (v < 100 || v > cap)
                fail_msg("failures %u, jitter %g: %lld not in [100, %lld]", n,
                         draws[j], (long long)v, (long long)cap);
        }
    }
    /* No failure yet: exactly the minimum, whatever the draw. */
    assert_int_equal(sc_pg_backoff_ms(&o, 0, 0.0), 100);
    assert_int_equal(sc_pg_backoff_ms(&o, 0, 0.999), 100);
}

static void backoff_grows_to_the_maximum_and_stays(void **state)
{
    (void)state;
    sc_pg_opts o;
    sc_pg_opts_init(&o);      /* 100 .. 30000 */
    int64_t prev = 0;
    for (unsigned n = 0; n < 12; n++) {
        int64_t v = sc_pg_backoff_ms(&o, n, 0.999999);
        assert_true(v >= prev);
        prev = v;
    }
    assert_true(sc_pg_backoff_ms(&o, 1, 0.999999) >= 199);
    assert_true(sc_pg_backoff_ms(&o, 3, 0.999999) >= 799);
    assert_true(sc_pg_backoff_ms(&o, 20, 0.999999) >= 29999);
    assert_true(sc_pg_backoff_ms(&o, 4000000000u, 0.999999) <= 30000);
    assert_int_equal(sc_pg_backoff_ms(&o, 20, 0.0), 100);
}

static void backoff_defaults_and_odd_settings_are_sane(void **state)
{
    (void)state;
    sc_pg_opts o;
    sc_pg_opts_init(&o);
    o.backoff_min_ms = 0;     /* unset: 100 */
    o.backoff_max_ms = 0;     /* below min: min */
    for (unsigned n = 0; n < 70; n++)
        assert_int_equal(sc_pg_backoff_ms(&o, n, 0.9), 100);

    /* A huge maximum must not overflow on the way up. */
    o.backoff_min_ms = 1000;
    o.backoff_max_ms = INT64_MAX;
    for (unsigned n = 0; n < 200; n++) {
        int64_t v = sc_pg_backoff_ms(&o, n, 0.999999);
        if (v < 1000) fail_msg("failures %u: %lld", n, (long long)v);
    }
    /* A draw that is not a number is taken as 0, not as garbage. */
    o.backoff_max_ms = 5000;
    assert_int_equal(sc_pg_backoff_ms(&o, 5, (double)NAN), 1000);
}

/* ---- failure classes --------------------------------------------------------- */

static void refused_port_is_unreachable(void **state)
{
    (void)state;
    char err[1024];
    connect_fails("postgresql://postgres:" SECRET "@127.0.0.1:1/nodb",
                  SC_PG_UNREACHABLE, err, sizeof err);
    if (strncmp(err, "cannot connect to PostgreSQL at 127.0.0.1:1/nodb as postgres: ",
                62) != 0 || !strstr(err, "Connection refused"))
        fail_msg("message: %s", err);
    assert_true(one_line(err));
    assert_null(strstr(err, SECRET));

    /* A plain database name is a conninfo too (the rest from PG*): not
     * malformed, so still a retry. */
    setenv("PGHOST", "127.0.0.1", 1);
    setenv("PGPORT", "1", 1);
    sc_pg_fail fail = SC_PG_OK;
    PGconn *c = conn_url("somedb", &fail, err, sizeof err);
    unsetenv("PGHOST");
    unsetenv("PGPORT");
    assert_null(c);
    assert_int_equal(fail, SC_PG_UNREACHABLE);
    assert_non_null(strstr(err, "127.0.0.1:1/somedb"));
}

static void unresolvable_host_is_unreachable(void **state)
{
    (void)state;
    char err[1024];
    /* DNS may not be ready yet in a starting pod: retry, not exit. */
    connect_fails("postgresql://postgres:" SECRET "@no-such-host.invalid:5999/db",
                  SC_PG_UNREACHABLE, err, sizeof err);
    assert_non_null(strstr(err, "no-such-host.invalid"));
    assert_true(one_line(err));
    assert_null(strstr(err, SECRET));
}

static void wrong_password_is_refused_and_never_echoed(void **state)
{
    (void)state;
    make_pw_role("pt_pw", "Right-" SECRET);
    char url[256], err[1024];
    pgh_url(g_pg, "postgres", "pt_pw", "Wrong-" SECRET, url, sizeof url);
    connect_fails(url, SC_PG_REFUSED, err, sizeof err);
    assert_non_null(strstr(err, "password authentication failed"));
    assert_non_null(strstr(err, "as pt_pw"));
    assert_null(strstr(err, SECRET));
    assert_true(one_line(err));

    pgh_url(g_pg, "postgres", "pt_pw", "Right-" SECRET, url, sizeof url);
    sc_pg_fail fail = SC_PG_REFUSED;
    PGconn *c = conn_url(url, &fail, err, sizeof err);
    if (!c) fail_msg("right password: %s", err);
    assert_int_equal(fail, SC_PG_OK);
    char where[256];
    sc_pg_describe(c, where, sizeof where);
    char want[64];
    snprintf(want, sizeof want, "127.0.0.1:%u/postgres as pt_pw", pgh_port(g_pg));
    assert_string_equal(where, want);
    PQfinish(c);
}

static void unknown_database_and_role_are_refused(void **state)
{
    (void)state;
    char url[256], err[1024];
    pgh_url(g_pg, "no_such_db", NULL, NULL, url, sizeof url);
    connect_fails(url, SC_PG_REFUSED, err, sizeof err);
    assert_non_null(strstr(err, "no_such_db"));
    assert_true(one_line(err));

    pgh_url(g_pg, "postgres", "no_such_role", NULL, url, sizeof url);
    connect_fails(url, SC_PG_REFUSED, err, sizeof err);
    assert_non_null(strstr(err, "no_such_role"));
}

/* Malformed connection strings are configuration errors (exit 78 at
 * start), and libpq echoes some of them whole: the password must not come
 * along. */
static void bad_urls_are_refused_without_the_password(void **state)
{
    (void)state;
    static const char *const urls[] = {
        "postgresql://u:" SECRET "@[::1/db",            /* unclosed IPv6 */
        "postgresql://u:" SECRET "%zz@127.0.0.1/db",    /* bad %-escape */
        "postgresql://u:" SECRET "@127.0.0.1:99999/db", /* port out of range */
        "postgresql://u:" SECRET "@127.0.0.1:port/db",  /* port not a number */
        "postgresql://u:" SECRET "@127.0.0.1/db?nosuchoption=1",
        "postgresql://u:" SECRET "@127.0.0.1/db?sslmode=bogus",
        "postgresql://u:" SECRET "@127.0.0.1:1/db?target_session_attrs=bogus",
        "host=127.0.0.1 password=" SECRET " port=x",
        "host=127.0.0.1 password='" SECRET,             /* unterminated quote */
        "host=127.0.0.1 password " SECRET,              /* missing = */
        "host=127.0.0.1 nosuchoption=1 password=" SECRET,
    };
    for (size_t i = 0; i < sizeof urls / sizeof urls[0]; i++) {
        sc_pg_fail fail = SC_PG_OK;
        char err[1024];
        PGconn *c = conn_url(urls[i], &fail, err, sizeof err);
        if (c) fail_msg("%s connected", urls[i]);
        if (fail != SC_PG_REFUSED || strstr(err, SECRET) || !one_line(err)
            || strncmp(err, "cannot connect to PostgreSQL", 28) != 0)
            fail_msg("%s: class %d, message \"%s\"", urls[i], fail, err);
    }
}

/* ---- password file ------------------------------------------------------------- */

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void password_file_first_line_wins_over_the_url(void **state)
{
    (void)state;
    make_pw_role("pt_pwf", "File-" SECRET);
    char dir[512], path[600], url[256], err[1024];
    assert_int_equal(brk_tmpdir_new("pt_pwf", dir, sizeof dir), 0);
    snprintf(path, sizeof path, "%s/pw", dir);
    /* CRLF and a second line: only the first line, without its end. */
    write_file(path, "File-" SECRET "\r\nsecond line\n");

    pgh_url(g_pg, "postgres", "pt_pwf", "Url-Wrong-" SECRET, url, sizeof url);
    sc_pg_opts o;
    sc_pg_opts_init(&o);
    o.conninfo = url;
    o.password_file = path;
    sc_pg_fail fail = SC_PG_UNREACHABLE;
    PGconn *c = sc_pg_connect(&o, &fail, err, sizeof err);
    if (!c) fail_msg("with the password file: %s", err);
    assert_int_equal(fail, SC_PG_OK);
    PQfinish(c);

    /* A wrong password in the file is refused, and neither is echoed. */
    write_file(path, "Wrong-File-" SECRET "\n");
    assert_null(sc_pg_connect(&o, &fail, err, sizeof err));
    assert_int_equal(fail, SC_PG_REFUSED);
    assert_null(strstr(err, SECRET));

    /* No such file: refused, the file named, nothing else. */
    snprintf(path, sizeof path, "%s/missing", dir);
    assert_null(sc_pg_connect(&o, &fail, err, sizeof err));
    assert_int_equal(fail, SC_PG_REFUSED);
    assert_non_null(strstr(err, "password file"));
    assert_non_null(strstr(err, path));
    assert_null(strstr(err, SECRET));

    /* An empty file is a configuration error too (not "no password"). */
    snprintf(path, sizeof path, "%s/empty", dir);
    write_file(path, "");
    assert_null(sc_pg_connect(&o, &fail, err, sizeof err));
    assert_int_equal(fail, SC_PG_REFUSED);
    assert_non_null(strstr(err, "password file"));
    brk_tmpdir_remove(dir);
}

/* ---- session settings ------------------------------------------------------------ */

static void session_settings_are_applied_and_win_over_the_url(void **state)
{
    (void)state;
    char url[256], full[512], v[128];
    sc_pg_opts o;
    postgres_opts(&o, url, sizeof url);
    /* The URL asks for other values; outboxd's win. */
    snprintf(full, sizeof full, "%s%sapplication_name=fromurl"
             "&options=-c%%20statement_timeout%%3D0", url,
             strchr(url, '?') ? "&" : "?");
    o.conninfo = full;
    o.application_name = "pg-test-app";
    o.statement_timeout_ms = 1500;
    PGconn *c = must_connect(&o);
    assert_string_equal(show(c, "statement_timeout", v, sizeof v), "1500ms");
    assert_string_equal(show(c, "application_name", v, sizeof v), "pg-test-app");
    assert_string_equal(PQparameterStatus(c, "application_name"), "pg-test-app");
    PQfinish(c);

    /* No timeout asked: none, whatever role or database say. */
    recreate_role("pt_slowrole", "");
    sql("postgres", "ALTER ROLE pt_slowrole SET statement_timeout = '7s'");
    pgh_url(g_pg, "postgres", "pt_slowrole", NULL, url, sizeof url);
    o.conninfo = url;
    o.application_name = NULL;
    o.statement_timeout_ms = 0;
    c = must_connect(&o);
    assert_string_equal(show(c, "statement_timeout", v, sizeof v), "0");
    assert_string_equal(show(c, "application_name", v, sizeof v), "outboxd");
    PQfinish(c);
}

static int sockopt(int fd, int level, int name)
{
    int v = -1;
    socklen_t len = sizeof v;
    if (getsockopt(fd, level, name, &v, &len) != 0) return -1;
    return v;
}

/* The kernel notices a dead peer within about connect_timeout: keepalives
 * on an idle connection, TCP_USER_TIMEOUT for unacknowledged data. */
static void tcp_keepalives_and_user_timeout_are_on_the_socket(void **state)
{
    (void)state;
    char url[256];
    sc_pg_opts o;
    postgres_opts(&o, url, sizeof url);
    o.connect_timeout_ms = 8000;
    PGconn *c = must_connect(&o);
    int fd = PQsocket(c);
    assert_true(fd >= 0);
    assert_int_equal(sockopt(fd, SOL_SOCKET, SO_KEEPALIVE), 1);
    int idle = sockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE);
    int intvl = sockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL);
    int cnt = sockopt(fd, IPPROTO_TCP, TCP_KEEPCNT);
    assert_int_equal(idle, 4);
    assert_int_equal(intvl, 2);
    assert_int_equal(cnt, 3);
    /* Idle plus all probes: about the connect timeout. */
    assert_true(idle + intvl * cnt <= 8 + 2);
    assert_int_equal(sockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT), 8000);
    PQfinish(c);
}

/* ---- results -------------------------------------------------------------------- */

static PGconn *connect_as(const char *app)
{
    char url[256];
    sc_pg_opts o;
    postgres_opts(&o, url, sizeof url);
    o.application_name = app;
    o.statement_timeout_ms = 200;
    return must_connect(&o);
}

/* pg_terminate_backend's 57P01 ("terminating connection due to
 * administrator command") is the connection's trouble, not the query's. */
static void terminated_backend_is_unreachable_not_a_query_error(void **state)
{
    (void)state;
    PGconn *c = connect_as("pg-term-test");
    PGresult *r = PQexec(c, "SELECT 1");
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    PQclear(r);

    /* Syntax error and statement_timeout: the query's own, connection fine. */
    r = PQexec(c, "SELEC 1");
    assert_int_equal(sc_pg_result_fail(c, r), SC_PG_OK);
    assert_false(sc_pg_is_timeout(r));
    PQclear(r);
    r = PQexec(c, "SELECT pg_sleep(2)");
    assert_int_equal(sc_pg_result_fail(c, r), SC_PG_OK);
    assert_true(sc_pg_is_timeout(r));
    PQclear(r);

    /* Terminated while running a query. */
    assert_int_equal(PQsendQuery(c, "SELECT pg_sleep(0.15), pg_sleep(30)"), 1);
    long long n = pgh_sql_int(g_pg, "postgres",
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = 'pg-term-test'");
    assert_int_equal(n, 1);
    bool timed_out = true;
    r = sc_pg_wait_result(c, 10000, &timed_out);
    assert_false(timed_out);
    assert_non_null(r);
    assert_int_equal(sc_pg_result_fail(c, r), SC_PG_UNREACHABLE);
    const char *st = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    /* The server's own reason is kept when it got through. */
    if (st) assert_string_equal(st, "57P01");
    PQclear(r);
    PQfinish(c);

    /* Terminated while idle: the next query finds out. */
    c = connect_as("pg-term-test2");
    n = pgh_sql_int(g_pg, "postgres",
        "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
        " WHERE application_name = 'pg-term-test2'");
    assert_int_equal(n, 1);
    r = PQexec(c, "SELECT 1");
    assert_int_equal(sc_pg_result_fail(c, r), SC_PG_UNREACHABLE);
    PQclear(r);
    PQfinish(c);
}

static void wait_result_gives_up_at_the_deadline(void **state)
{
    (void)state;
    PGconn *c = connect_as("pg-wait-test");
    /* A query the server lets run (statement_timeout off for it). */
    PGresult *r = PQexec(c, "SET statement_timeout = 0");
    PQclear(r);
    assert_int_equal(PQsendQuery(c, "SELECT pg_sleep(3)"), 1);
    bool timed_out = false;
    int64_t t0 = now_ms();
    r = sc_pg_wait_result(c, 200, &timed_out);
    int64_t took = now_ms() - t0;
    assert_null(r);
    assert_true(timed_out);
    if (took < 150 || took > 2500) fail_msg("gave up after %lld ms", (long long)took);
    PQfinish(c);

    /* In time: the result, and the connection ready for the next. */
    c = connect_as("pg-wait-test");
    assert_int_equal(PQsendQuery(c, "SELECT 'x'::text"), 1);
    r = sc_pg_wait_result(c, 5000, &timed_out);
    assert_false(timed_out);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    assert_string_equal(PQgetvalue(r, 0, 0), "x");
    PQclear(r);
    assert_int_equal(PQsendQuery(c, "SELEC"), 1);
    r = sc_pg_wait_result(c, 5000, &timed_out);
    assert_int_equal(PQresultStatus(r), PGRES_FATAL_ERROR);
    assert_string_equal(PQresultErrorField(r, PG_DIAG_SQLSTATE), "42601");
    PQclear(r);
    r = PQexec(c, "SELECT 1");
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    PQclear(r);
    PQfinish(c);
}

/* libpq prints server notices on stderr by default: a daemon whose log is
 * JSON lines must not get raw lines (which may quote query input) there. */
static void notices_are_not_printed_on_stderr(void **state)
{
    (void)state;
    PGconn *c = connect_as("pg-notice-test");
    FILE *cap = tmpfile();
    assert_non_null(cap);
    fflush(stderr);
    int saved = dup(2);
    assert_true(saved >= 0);
    dup2(fileno(cap), 2);
    PGresult *r = PQexec(c, "DO $$ BEGIN RAISE NOTICE 'notice-for-order-4711'; "
                            "RAISE WARNING 'warning-for-order-4711'; END $$");
    ExecStatusType st = PQresultStatus(r);
    PQclear(r);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    char text[4096];
    ssize_t n = pread(fileno(cap), text, sizeof text - 1, 0);
    text[n > 0 ? n : 0] = '\0';
    fclose(cap);
    PQfinish(c);
    assert_int_equal(st, PGRES_COMMAND_OK);
    if (strstr(text, "order-4711")) fail_msg("on stderr: %s", text);
}

/* ---- messages -------------------------------------------------------------------- */

static void one_line_folds_blanks_and_trims(void **state)
{
    (void)state;
    char a[] = "  connection to server failed: refused\n\tIs the server running?\r\n";
    sc_pg_one_line(a);
    assert_string_equal(a, "connection to server failed: refused Is the server running?");
    char b[] = "";
    sc_pg_one_line(b);
    assert_string_equal(b, "");
    char c[] = " \n\t \r ";
    sc_pg_one_line(c);
    assert_string_equal(c, "");
    char d[] = "x";
    sc_pg_one_line(d);
    assert_string_equal(d, "x");
}

static void describe_names_no_password(void **state)
{
    (void)state;
    char url[256], err[1024], where[256];
    make_pw_role("pt_desc", SECRET);
    pgh_url(g_pg, "postgres", "pt_desc", SECRET, url, sizeof url);
    sc_pg_fail fail;
    PGconn *c = conn_url(url, &fail, err, sizeof err);
    if (!c) fail_msg("connect: %s", err);
    sc_pg_describe(c, where, sizeof where);
    assert_null(strstr(where, SECRET));
    assert_non_null(strstr(where, "as pt_desc"));
    PQfinish(c);
    sc_pg_describe(NULL, where, sizeof where);
    assert_string_equal(where, "?:?/? as ?");
}

/* ---- connecting to a server that never answers ---------------------------- */

/* A socket on 127.0.0.1 that listens and never accepts: the kernel
 * completes up to 16 handshakes, so libpq connects, sends its start-up
 * packet and waits for an answer that never comes (a hung server or host).
 * The URL for it into url[cap]; returns the socket. */
static int hanging_server(char *url, size_t cap)
{
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(s >= 0);
    struct sockaddr_in a = { .sin_family = AF_INET,
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    assert_int_equal(bind(s, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(s, (struct sockaddr *)&a, &len), 0);
    assert_int_equal(listen(s, 16), 0);
    snprintf(url, cap, "postgresql://nobody@127.0.0.1:%u/db",
             (unsigned)ntohs(a.sin_port));
    return s;
}

static void hanging_server_is_unreachable_at_the_connect_timeout(void **state)
{
    (void)state;
    char url[128], err[1024];
    int hole = hanging_server(url, sizeof url);
    sc_pg_opts o;
    sc_pg_opts_init(&o);
    o.conninfo = url;
    o.connect_timeout_ms = 2000;
    sc_pg_fail fail = SC_PG_OK;
    int64_t t0 = now_ms();
    PGconn *c = sc_pg_connect(&o, &fail, err, sizeof err);
    int64_t took = now_ms() - t0;
    assert_null(c);
    assert_int_equal(fail, SC_PG_UNREACHABLE);
    assert_non_null(strstr(err, "timeout expired"));
    assert_true(one_line(err));
    print_message("gave up after %lld ms (connect_timeout 2000)\n", (long long)took);
    /* The deadline is libpq's to ignore in non-blocking mode: ours. */
    if (took <= 1000 || took >= 10000)
        fail_msg("gave up after %lld ms (connect_timeout 2000)", (long long)took);
    close(hole);
}

typedef struct {
    int fd;
    int after_ms;
} later_write;

static void *write_later(void *arg)
{
    later_write *w = arg;
    struct timespec ts = { w->after_ms / 1000, (long)(w->after_ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0) {}
    uint64_t one = 1;
    assert_int_equal(write(w->fd, &one, sizeof one), (ssize_t)sizeof one);
    return NULL;
}

static bool readable(int fd)
{
    struct pollfd p = { .fd = fd, .events = POLLIN };
    return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

static void stop_fd_interrupts_a_hanging_connect_and_stays_readable(void **state)
{
    (void)state;
    char url[128], err[1024];
    int hole = hanging_server(url, sizeof url);
    int stop = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    assert_true(stop >= 0);
    sc_pg_opts o;
    sc_pg_opts_init(&o);
    assert_int_equal(o.stop_fd, -1);
    o.conninfo = url;
    o.connect_timeout_ms = 8000;
    o.stop_fd = stop;
    later_write w = { stop, 200 };
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, write_later, &w), 0);
    sc_pg_fail fail = SC_PG_OK;
    int64_t t0 = now_ms();
    PGconn *c = sc_pg_connect(&o, &fail, err, sizeof err);
    int64_t took = now_ms() - t0;
    assert_int_equal(pthread_join(t, NULL), 0);
    print_message("interrupted after %lld ms (stop written after 200)\n",
                  (long long)took);
    assert_null(c);
    assert_int_equal(fail, SC_PG_UNREACHABLE);
    assert_non_null(strstr(err, "connect interrupted"));
    if (took >= 1500)
        fail_msg("interrupted only after %lld ms (stop after 200, deadline "
                 "8000)", (long long)took);
    /* Polled, not read: the owner's loop still sees it. */
    assert_true(readable(stop));

    /* Already readable: the next connect gives up at once too. */
    t0 = now_ms();
    assert_null(sc_pg_connect(&o, &fail, err, sizeof err));
    took = now_ms() - t0;
    assert_int_equal(fail, SC_PG_UNREACHABLE);
    assert_non_null(strstr(err, "connect interrupted"));
    assert_true(took < 1500);
    uint64_t v = 0;
    assert_int_equal(read(stop, &v, sizeof v), (ssize_t)sizeof v);
    assert_int_equal(v, 1);
    close(stop);
    close(hole);
}

static void quiet_stop_fd_leaves_a_normal_connect_working(void **state)
{
    (void)state;
    char url[256];
    int stop = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    assert_true(stop >= 0);
    sc_pg_opts o;
    postgres_opts(&o, url, sizeof url);
    o.stop_fd = stop;
    PGconn *c = must_connect(&o);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    PGresult *r = PQexec(c, "SELECT 1");
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    PQclear(r);
    PQfinish(c);
    assert_false(readable(stop));
    close(stop);
}

/* ---- main ------------------------------------------------------------------------ */

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(backoff_stays_between_min_and_the_doubled_cap),
        cmocka_unit_test(backoff_grows_to_the_maximum_and_stays),
        cmocka_unit_test(backoff_defaults_and_odd_settings_are_sane),
        cmocka_unit_test(refused_port_is_unreachable),
        cmocka_unit_test(unresolvable_host_is_unreachable),
        cmocka_unit_test(wrong_password_is_refused_and_never_echoed),
        cmocka_unit_test(unknown_database_and_role_are_refused),
        cmocka_unit_test(bad_urls_are_refused_without_the_password),
        cmocka_unit_test(password_file_first_line_wins_over_the_url),
        cmocka_unit_test(session_settings_are_applied_and_win_over_the_url),
        cmocka_unit_test(tcp_keepalives_and_user_timeout_are_on_the_socket),
        cmocka_unit_test(terminated_backend_is_unreachable_not_a_query_error),
        cmocka_unit_test(wait_result_gives_up_at_the_deadline),
        cmocka_unit_test(notices_are_not_printed_on_stderr),
        cmocka_unit_test(one_line_folds_blanks_and_trims),
        cmocka_unit_test(describe_names_no_password),
        cmocka_unit_test(hanging_server_is_unreachable_at_the_connect_timeout),
        cmocka_unit_test(stop_fd_interrupts_a_hanging_connect_and_stays_readable),
        cmocka_unit_test(quiet_stop_fd_leaves_a_normal_connect_working),
    };
    return cmocka_run_group_tests(tests, pg_group_setup, pg_group_teardown);
}
