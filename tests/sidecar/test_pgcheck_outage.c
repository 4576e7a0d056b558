/*
 * test_pgcheck_outage.c - check-backs answered by PostgreSQL
 * (sidecar/src/pgcheck.h) when the server or a connection fails:
 * statement_timeout, the server unreachable at start (and a query found
 * not to fit, or a schema installed, once it answers), killed mid-run,
 * connections terminated while idle or mid-query (replaced within the
 * check), a SIGSTOPped backend (the check's own deadline; root only),
 * close() with checks in flight and waiting, pool selection with a slot
 * in backoff, revalidation under concurrent checks, concurrency, and the
 * whole chain at the transaction level: a broker_core store whose
 * check-backs are answered by this checker while PostgreSQL is down for
 * longer than the check schedule.  Answers, validation and credentials
 * are in test_pgcheck.c; the fixture is pgcheck_fx.h.
 *
 * One server for the program (group setup); every test makes its own
 * database.  Tests that stop or kill the server restart it before they
 * end.  Waits poll for a state with a generous deadline; no test asserts
 * on speed except "answers ERROR well before the 2 s query / the connect
 * timeout", whose margins are wide.
 */
#include "pgcheck_fx.h"

#include <pthread.h>
#include <stdatomic.h>

/* ---- helpers ------------------------------------------------------------- */

/* Open on `db` while the server is stopped (it is started again right
 * after): the checker must open all the same. */
static void open_while_down(fx *f, const char *db, const char *query)
{
    pgh_url(g_pg, db, NULL, NULL, f->url, sizeof f->url);
    assert_int_equal(pgh_stop(g_pg), 0);
    int rc = open_pc(f, f->url, query);
    assert_int_equal(pgh_restart(g_pg), 0);
    if (rc != 0) fail_msg("open with the server down: %d: %s", rc, f->err);
}

/* A check on its own thread, for tests that do something while it runs. */
typedef struct bg_ask {
    pthread_t th;
    sc_pgcheck *pc;
    const char *txid;
    brk_check_result res;
    int64_t took_ms, end_ms;
    atomic_bool done;
} bg_ask;

static void *bg_main(void *p)
{
    bg_ask *a = p;
    int64_t t0 = now_ms();
    a->res = ask(a->pc, a->txid);
    a->end_ms = now_ms();
    a->took_ms = a->end_ms - t0;
    atomic_store(&a->done, true);
    return NULL;
}

static void bg_start(bg_ask *a, sc_pgcheck *pc, const char *txid)
{
    memset(a, 0, sizeof *a);
    a->pc = pc;
    a->txid = txid;
    atomic_init(&a->done, false);
    assert_int_equal(pthread_create(&a->th, NULL, bg_main, a), 0);
}

/* Wait (at most 20 s) until a backend of application `app` is running a
 * query; its pid, or -1. */
static long long wait_active(const char *app)
{
    char q[256];
    snprintf(q, sizeof q, "SELECT pid FROM pg_stat_activity WHERE application_name"
             " = '%s' AND state = 'active' LIMIT 1", app);
    int64_t end = now_ms() + 20000;
    while (now_ms() < end) {
        long long pid = pgh_sql_int(g_pg, "postgres", q);
        if (pid > 0) return pid;
        sleep_ms(20);
    }
    return -1;
}

/* Terminate the sessions of `app` (in `state`, or any when NULL) and wait
 * until they are gone; how many there were. */
static long long terminate(const char *app, const char *state)
{
    char q[384];
    snprintf(q, sizeof q, "SELECT count(pg_terminate_backend(pid, 10000)) FROM"
             " pg_stat_activity WHERE application_name = '%s'%s%s%s", app,
             state ? " AND state = '" : "", state ? state : "", state ? "'" : "");
    return pgh_sql_int(g_pg, "postgres", q);
}

static long long sessions_of(const char *app)
{
    char q[256];
    snprintf(q, sizeof q, "SELECT count(*) FROM pg_stat_activity WHERE"
             " application_name = '%s'", app);
    return pgh_sql_int(g_pg, "postgres", q);
}

/* ---- statement_timeout --------------------------------------------------- */

static void statement_timeout_answers_error_and_keeps_the_connection(void **state)
{
    fx *f = *state;
    new_db("pc_slow", false);
    f->o.pool_size = 1;
    f->o.pg.statement_timeout_ms = 100;
    open_ok(f, "pc_slow",
            "SELECT CASE WHEN $1 = 'slow' THEN (SELECT 'commit'::text FROM pg_sleep(2))"
            " ELSE 'rollback' END");
    int64_t t0 = now_ms();
    assert_int_equal(ask(f->pc, "slow"), BRK_CHECK_ERROR);
    int64_t took = now_ms() - t0;
    if (took >= 1500)
        fail_msg("a 2 s query with statement_timeout 100 ms took %lld ms",
                 (long long)took);
    sc_pgcheck_stats s = stats(f->pc);
    assert_int_equal(s.timeouts, 1);
    assert_int_equal(s.connected, 1);

    /* Same (only) connection, still good. */
    assert_int_equal(ask(f->pc, "fast"), BRK_CHECK_ROLLBACK);
    s = stats(f->pc);
    assert_int_equal(s.reconnects, 0);
    assert_int_equal(s.connect_failures, 0);
    assert_int_equal(s.queries, 2);
    assert_non_null(strstr(log_text(f), "statement_timeout"));
}

/* ---- outages ------------------------------------------------------------- */

static void unreachable_at_start_answers_error_then_recovers(void **state)
{
    fx *f = *state;
    new_db("pc_down", true);
    put_txn("pc_down", "d-1", "commit");
    pgh_url(g_pg, "pc_down", NULL, NULL, f->url, sizeof f->url);
    assert_int_equal(pgh_stop(g_pg), 0);

    int rc = open_pc(f, f->url, NULL);
    if (rc != 0) {
        pgh_restart(g_pg);
        fail_msg("open with the server down: %d: %s", rc, f->err);
    }
    sc_pgcheck_stats s = stats(f->pc);
    assert_false(s.validated);
    assert_int_equal(s.connected, 0);
    assert_true(s.connect_failures >= 1);
    assert_non_null(strstr(log_text(f),
                           "database unreachable; check-backs will be retried: "));

    for (int i = 0; i < 10; i++) {
        int64_t t0 = now_ms();
        brk_check_result r = ask(f->pc, "d-1");
        int64_t took = now_ms() - t0;
        if (r != BRK_CHECK_ERROR || took >= f->o.pg.connect_timeout_ms / 2) {
            pgh_restart(g_pg);
            fail_msg("check %d with the server down: answer %d after %lld ms", i,
                     r, (long long)took);
        }
    }
    assert_int_equal(stats(f->pc).queries, 0);

    assert_int_equal(pgh_restart(g_pg), 0);
    assert_true(ask_until(f->pc, "d-1", BRK_CHECK_COMMIT));
    s = stats(f->pc);
    assert_true(s.validated);
    assert_true(s.reconnects >= 1);
    assert_true(s.connected >= 1);
    assert_true(s.answers[BRK_CHECK_ERROR] >= 10);
}

/* Validation waits for the first connection; a query that does not fit is
 * then an error in the log, and every check answers ERROR without asking. */
static void invalid_query_found_after_start_makes_every_check_error(void **state)
{
    fx *f = *state;
    new_db("pc_lateinvalid", false);
    sql("pc_lateinvalid", "CREATE TABLE orders (id text PRIMARY KEY, status text)");
    open_while_down(f, "pc_lateinvalid", "SELECT status, id FROM orders WHERE id = $1");

    int64_t end = now_ms() + 30000;
    while (!strstr(log_text(f), "\"level\":\"error\"") && now_ms() < end) {
        assert_int_equal(ask(f->pc, "o-1"), BRK_CHECK_ERROR);
        sleep_ms(50);
    }
    const char *t = log_text(f);
    assert_non_null(strstr(t, "\"level\":\"error\""));
    assert_non_null(strstr(t, "returns 2 columns"));
    for (int i = 0; i < 5; i++)
        assert_int_equal(ask(f->pc, "o-1"), BRK_CHECK_ERROR);
    sc_pgcheck_stats s = stats(f->pc);
    assert_false(s.validated);
    assert_int_equal(s.queries, 0);
}

/* Checks that come together when the query turns out not to fit (found
 * at the first connection after an unreachable start) find it once: one
 * error line per revalidation period, no query sent, no connection per
 * check. */
#define IV_THREADS 6
#define IV_CHECKS  15

typedef struct iv_arg {
    sc_pgcheck *pc;
    unsigned not_error;
} iv_arg;

static void *iv_main(void *p)
{
    iv_arg *a = p;
    for (unsigned k = 0; k < IV_CHECKS; k++)
        if (ask(a->pc, "o-1") != BRK_CHECK_ERROR) a->not_error++;
    return NULL;
}

static void concurrent_checks_find_an_invalid_query_once_per_period(void **state)
{
    fx *f = *state;
    new_db("pc_ivconc", false);
    sql("pc_ivconc", "CREATE TABLE orders (id text PRIMARY KEY, status text)");
    f->o.pool_size = 4;
    f->o.pg.backoff_min_ms = 20;
    f->o.pg.backoff_max_ms = 60000;          /* one period for the whole test */
    f->o.pg.application_name = "pc-ivconc";
    open_while_down(f, "pc_ivconc", "SELECT status, id FROM orders WHERE id = $1");
    /* Past the first connect's backoff. */
    sleep_ms(200);

    pthread_t th[IV_THREADS];
    iv_arg args[IV_THREADS];
    for (unsigned t = 0; t < IV_THREADS; t++) {
        args[t] = (iv_arg){ f->pc, 0 };
        assert_int_equal(pthread_create(&th[t], NULL, iv_main, &args[t]), 0);
    }
    unsigned not_error = 0;
    for (unsigned t = 0; t < IV_THREADS; t++) {
        pthread_join(th[t], NULL);
        not_error += args[t].not_error;
    }
    assert_int_equal(not_error, 0);
    const char *t = log_text(f);
    unsigned lines = 0;
    for (const char *p = strstr(t, "until it does"); p; p = strstr(p + 1, "until it does"))
        lines++;
    assert_int_equal(lines, 1);
    sc_pgcheck_stats s = stats(f->pc);
    assert_int_equal(s.queries, 0);
    assert_false(s.validated);
    assert_int_equal(s.answers[BRK_CHECK_ERROR], IV_THREADS * IV_CHECKS);
    assert_true(sessions_of("pc-ivconc") <= 4);
}

/* A pod may start before its migration job: the default query's schema is
 * missing at the first connection; once migrated, checks are answered. */
static void schema_installed_after_start_is_picked_up(void **state)
{
    fx *f = *state;
    new_db("pc_late", false);
    open_while_down(f, "pc_late", NULL);

    int64_t end = now_ms() + 30000;
    while (!strstr(log_text(f), "outboxd db migrate") && now_ms() < end) {
        assert_int_equal(ask(f->pc, "late-1"), BRK_CHECK_ERROR);
        sleep_ms(50);
    }
    assert_non_null(strstr(log_text(f), "\"level\":\"error\""));
    assert_false(stats(f->pc).validated);

    new_db("pc_late", true);             /* drops it (and our sessions) first */
    put_txn("pc_late", "late-1", "commit");
    assert_true(ask_until(f->pc, "late-1", BRK_CHECK_COMMIT));
    assert_true(stats(f->pc).validated);
    assert_non_null(strstr(log_text(f), "check-back query fits now"));
}

static void server_killed_mid_run_answers_error_then_recovers(void **state)
{
    fx *f = *state;
    new_db("pc_kill", true);
    put_txn("pc_kill", "k-1", "rollback");
    open_ok(f, "pc_kill", NULL);
    assert_int_equal(ask(f->pc, "k-1"), BRK_CHECK_ROLLBACK);

    assert_int_equal(pgh_kill(g_pg), 0);
    bool saw_error = ask_until(f->pc, "k-1", BRK_CHECK_ERROR);
    /* Down: every answer is ERROR, none a wrong verdict. */
    for (int i = 0; i < 5 && saw_error; i++)
        if (ask(f->pc, "k-1") != BRK_CHECK_ERROR) saw_error = false;
    assert_int_equal(pgh_restart(g_pg), 0);
    assert_true(saw_error);

    assert_true(ask_until(f->pc, "k-1", BRK_CHECK_ROLLBACK));
    sc_pgcheck_stats s = stats(f->pc);
    assert_true(s.reconnects >= 1);
    assert_true(s.answers[BRK_CHECK_ERROR] >= 6);
    assert_non_null(strstr(log_text(f), "lost the database connection"));
}

/* pg_terminate_backend on an idle check connection (an idle timeout, a
 * pooler, a DBA): 57P01 is a lost connection, not the query's error; the
 * check reconnects and is answered. */
static void terminated_idle_connection_is_replaced_within_the_check(void **state)
{
    fx *f = *state;
    new_db("pc_term", true);
    put_txn("pc_term", "tm-1", "commit");
    f->o.pool_size = 1;
    f->o.pg.application_name = "pc-term-idle";
    open_ok(f, "pc_term", NULL);
    assert_int_equal(ask(f->pc, "tm-1"), BRK_CHECK_COMMIT);
    assert_int_equal(terminate("pc-term-idle", NULL), 1);
    assert_int_equal(sessions_of("pc-term-idle"), 0);

    assert_int_equal(ask(f->pc, "tm-1"), BRK_CHECK_COMMIT);
    assert_int_equal(ask(f->pc, "tm-1"), BRK_CHECK_COMMIT);
    sc_pgcheck_stats s = stats(f->pc);
    assert_int_equal(s.reconnects, 1);
    assert_int_equal(s.answers[BRK_CHECK_ERROR], 0);
    assert_int_equal(s.connected, 1);
    assert_int_equal(sessions_of("pc-term-idle"), 1);
    assert_non_null(strstr(log_text(f), "lost the database connection"));
}

/* Terminated while the query runs: the same, the query is asked again on
 * a fresh connection (a check only reads). */
static void connection_terminated_mid_query_is_retried_on_a_fresh_one(void **state)
{
    fx *f = *state;
    new_db("pc_termq", false);
    f->o.pool_size = 1;
    f->o.pg.application_name = "pc-term-busy";
    open_ok(f, "pc_termq",
            "SELECT CASE WHEN $1 = 'slow' THEN (SELECT 'commit'::text FROM pg_sleep(1))"
            " ELSE 'rollback' END");
    bg_ask a;
    bg_start(&a, f->pc, "slow");
    long long pid = wait_active("pc-term-busy");
    long long n = pid > 0 ? terminate("pc-term-busy", "active") : -1;
    pthread_join(a.th, NULL);
    assert_true(pid > 0);
    assert_int_equal(n, 1);
    assert_int_equal(a.res, BRK_CHECK_COMMIT);
    assert_int_equal(ask(f->pc, "fast"), BRK_CHECK_ROLLBACK);
    sc_pgcheck_stats s = stats(f->pc);
    assert_int_equal(s.reconnects, 1);
    assert_int_equal(s.answers[BRK_CHECK_ERROR], 0);
    assert_int_equal(s.connected, 1);
}

/* The network does not always say the server is gone: a backend that is
 * stopped (or a host that froze) leaves a TCP connection whose kernel
 * still acknowledges, so keepalives and tcp_user_timeout never fire, and
 * statement_timeout runs in the stopped process.  The check must still end,
 * with ERROR, by its own deadline (statement_timeout + connect_timeout),
 * and the slot must reconnect afterwards.  SIGSTOP of the backend needs
 * root (it runs as nobody). */
static void stopped_backend_answers_error_by_the_deadline(void **state)
{
    if (geteuid() != 0) {
        print_message("skipped: SIGSTOP of the server's backend needs root\n");
        skip();
    }
    fx *f = *state;
    new_db("pc_sigstop", true);
    put_txn("pc_sigstop", "st-1", "commit");
    f->o.pool_size = 1;
    f->o.pg.connect_timeout_ms = 2000;
    f->o.pg.statement_timeout_ms = 1000;
    f->o.pg.application_name = "pc-sigstop";
    open_ok(f, "pc_sigstop", NULL);
    assert_int_equal(ask(f->pc, "st-1"), BRK_CHECK_COMMIT);
    long long pid = pgh_sql_int(g_pg, "postgres", "SELECT pid FROM pg_stat_activity"
                                " WHERE application_name = 'pc-sigstop'");
    assert_true(pid > 0);
    assert_int_equal(kill((pid_t)pid, SIGSTOP), 0);
    g_stopped = (pid_t)pid;

    bg_ask a;
    bg_start(&a, f->pc, "st-1");
    int64_t end = now_ms() + 30000;
    while (!atomic_load(&a.done) && now_ms() < end) sleep_ms(20);
    bool done = atomic_load(&a.done);
    kill(g_stopped, SIGCONT);          /* unblocks the check if it hangs */
    g_stopped = 0;
    pthread_join(a.th, NULL);
    if (!done)
        fail_msg("a check on a stopped backend was still waiting after 30 s");
    assert_int_equal(a.res, BRK_CHECK_ERROR);
    /* Its deadline is 3 s; the margin is for a loaded machine. */
    if (a.took_ms > 15000) fail_msg("took %lld ms", (long long)a.took_ms);
    assert_non_null(strstr(log_text(f), "no answer"));

    assert_true(ask_until(f->pc, "st-1", BRK_CHECK_COMMIT));
    sc_pgcheck_stats s = stats(f->pc);
    assert_int_equal(s.timeouts, 1);
    assert_int_equal(s.reconnects, 1);
    assert_int_equal(s.connected, 1);
}

/* close() while checks are in flight: one holds the only connection (a
 * 1.5 s query), another waits for it.  The waiter answers ERROR; the one
 * in flight keeps its connection and its answer; close returns after both
 * left (ASan/TSan: nothing touched after the free). */
static void close_wakes_waiters_and_waits_for_checks_in_flight(void **state)
{
    fx *f = *state;
    new_db("pc_close", false);
    f->o.pool_size = 1;
    f->o.pg.statement_timeout_ms = 20000;      /* the waiter's longest wait */
    f->o.pg.application_name = "pc-close";
    open_ok(f, "pc_close",
            "SELECT CASE WHEN $1 = 'slow' THEN (SELECT 'commit'::text FROM pg_sleep(1.5))"
            " ELSE 'rollback' END");
    bg_ask slow, waiter;
    bg_start(&slow, f->pc, "slow");
    assert_true(wait_active("pc-close") > 0);
    bg_start(&waiter, f->pc, "fast");
    sleep_ms(100);                              /* let it start waiting */
    assert_false(atomic_load(&waiter.done));

    sc_pgcheck_close(f->pc);
    f->pc = NULL;
    pthread_join(slow.th, NULL);
    pthread_join(waiter.th, NULL);
    assert_int_equal(slow.res, BRK_CHECK_COMMIT);
    assert_int_equal(waiter.res, BRK_CHECK_ERROR);
    assert_true(waiter.end_ms <= slow.end_ms);
    assert_int_equal(sessions_of("pc-close"), 0);
}

/* A slot in backoff answers ERROR at once; that is right when the server
 * is gone, not while another slot's healthy connection is merely busy:
 * then the check waits for it. */
static void busy_healthy_connection_is_awaited_rather_than_one_in_backoff(void **state)
{
    fx *f = *state;
    new_db("pc_bo", false);
    recreate_role("pc_bo", "");
    f->o.pool_size = 2;
    f->o.pg.backoff_min_ms = 20000;            /* the refused slot stays out */
    f->o.pg.backoff_max_ms = 40000;
    f->o.pg.application_name = "pc-bo";
    open_ok_as(f, "pc_bo", "pc_bo",
               "SELECT CASE WHEN $1 = 'slow' THEN (SELECT 'commit'::text FROM pg_sleep(3))"
               " ELSE 'rollback' END");
    sql("postgres", "ALTER ROLE pc_bo NOLOGIN");   /* slot 1 cannot connect */

    bg_ask slow;
    bg_start(&slow, f->pc, "slow");              /* holds slot 0 for 3 s */
    long long pid = wait_active("pc-bo");
    brk_check_result refused = ask(f->pc, "fast");   /* slot 1: refused */
    sql("postgres", "ALTER ROLE pc_bo LOGIN");
    brk_check_result awaited = ask(f->pc, "fast");
    pthread_join(slow.th, NULL);
    assert_true(pid > 0);
    assert_int_equal(refused, BRK_CHECK_ERROR);
    assert_int_equal(slow.res, BRK_CHECK_COMMIT);
    assert_int_equal(awaited, BRK_CHECK_ROLLBACK);
}

/* ---- concurrency --------------------------------------------------------- */

#define CC_THREADS 8
#define CC_TXIDS   64
#define CC_CHECKS  150

typedef struct cc_arg {
    sc_pgcheck *pc;
    unsigned seed;
    unsigned wrong;
} cc_arg;

static brk_check_result cc_want(unsigned i)
{
    return i % 4 == 0 ? BRK_CHECK_COMMIT : i % 4 == 1 ? BRK_CHECK_ROLLBACK
                                                      : BRK_CHECK_UNKNOWN;
}

static void *cc_main(void *p)
{
    cc_arg *a = p;
    for (unsigned k = 0; k < CC_CHECKS; k++) {
        unsigned i = (a->seed * 31 + k * 17) % CC_TXIDS;
        char txid[32];
        snprintf(txid, sizeof txid, "cc-%u", i);
        if (ask(a->pc, txid) != cc_want(i)) a->wrong++;
    }
    return NULL;
}

static void concurrent_checks_share_a_pool_of_two(void **state)
{
    fx *f = *state;
    new_db("pc_conc", true);
    char text[8192];
    size_t o = (size_t)snprintf(text, sizeof text,
                                "INSERT INTO outbox.transactions (txid, state) VALUES ");
    bool first = true;
    for (unsigned i = 0; i < CC_TXIDS; i++) {
        /* i % 4 == 3: no row at all. */
        if (i % 4 == 3) continue;
        o += (size_t)snprintf(text + o, sizeof text - o, "%s('cc-%u', '%s')",
                              first ? "" : ",", i,
                              i % 4 == 0 ? "commit" : i % 4 == 1 ? "rollback" : "pending");
        first = false;
    }
    sql("pc_conc", text);
    f->o.pool_size = 2;
    open_ok(f, "pc_conc", NULL);

    pthread_t th[CC_THREADS];
    cc_arg args[CC_THREADS];
    for (unsigned t = 0; t < CC_THREADS; t++) {
        args[t] = (cc_arg){ f->pc, t + 1, 0 };
        assert_int_equal(pthread_create(&th[t], NULL, cc_main, &args[t]), 0);
    }
    unsigned wrong = 0;
    for (unsigned t = 0; t < CC_THREADS; t++) {
        pthread_join(th[t], NULL);
        wrong += args[t].wrong;
    }
    assert_int_equal(wrong, 0);
    sc_pgcheck_stats s = stats(f->pc);
    assert_int_equal(s.queries, CC_THREADS * CC_CHECKS);
    assert_int_equal(s.answers[BRK_CHECK_ERROR], 0);
    assert_int_equal(s.answers[BRK_CHECK_COMMIT] + s.answers[BRK_CHECK_ROLLBACK]
                     + s.answers[BRK_CHECK_UNKNOWN], CC_THREADS * CC_CHECKS);
    assert_true(s.connected >= 1 && s.connected <= 2);
    assert_int_equal(pgh_sql_int(g_pg, "postgres",
                                 "SELECT count(*) FROM pg_stat_activity"
                                 " WHERE datname = 'pc_conc'"
                                 " AND application_name = 'outboxd'"),
                     s.connected);
}

/* ---- the transaction level ----------------------------------------------- */

static void tx_open(txfx *x, sc_pgcheck *pc)
{
    char err[256];
    assert_int_equal(brk_tmpdir_new("pc_txn", x->dir, sizeof x->dir), 0);
    brk_store_opts so;
    brk_store_opts_init(&so);                 /* real files, system clock */
    brk_status st = brk_store_open(&x->s, x->dir, &so, err, sizeof err);
    if (st != BRK_OK) fail_msg("store open: %s: %s", brk_status_name(st), err);
    assert_int_equal(brk_topic_create(x->s, "orders", 2), BRK_OK);
    assert_int_equal(brk_topic_create(x->s, "order-expired", 1), BRK_OK);
    brk_txn_opts to;
    brk_txn_opts_init(&to);
    to.checker = sc_pgcheck_checker(pc);
    to.default_policy.first_check_ms = 100;
    to.default_policy.interval_ms = 100;
    to.default_policy.max_checks = 3;
    to.default_policy.on_exhausted = BRK_EXHAUSTED_ROLLBACK;
    to.error_backoff_min_ms = 50;
    to.error_backoff_max_ms = 200;
    st = brk_txn_open(&x->t, x->s, &to, err, sizeof err);   /* scheduler on */
    if (st != BRK_OK) fail_msg("txn open: %s: %s", brk_status_name(st), err);
}

static brk_txn_result tx_prepare(txfx *x, const char *txid, const char *body,
                                 const char *expiry_topic)
{
    brk_check_policy pol;
    brk_check_policy_init(&pol);
    pol.first_check_ms = 100;
    pol.interval_ms = 100;
    pol.max_checks = 3;
    pol.on_exhausted = BRK_EXHAUSTED_ROLLBACK;
    pol.expiry_topic = expiry_topic;
    brk_txn_prepare_req r;
    memset(&r, 0, sizeof r);
    r.topic = "orders";
    r.txid = txid;
    r.key = (brk_bytes){ txid, strlen(txid) };
    r.body = (brk_bytes){ body, strlen(body) };
    r.policy = &pol;
    brk_txn_result res;
    brk_status st = brk_txn_prepare(x->t, &r, &res);
    if (st != BRK_OK) fail_msg("prepare %s: %s", txid, brk_status_name(st));
    assert_int_equal(res.state, BRK_TXN_PREPARED);
    return res;
}

static brk_txn_info tx_get(txfx *x, const char *txid)
{
    brk_txn_info i;
    assert_int_equal(brk_txn_get(x->t, txid, &i), BRK_OK);
    return i;
}

/* Wait (at most 30 s) until the transaction is resolved. */
static brk_txn_info tx_wait_resolved(txfx *x, const char *txid)
{
    int64_t end = now_ms() + 30000;
    brk_txn_info i = tx_get(x, txid);
    while (i.state == BRK_TXN_PREPARED && now_ms() < end) {
        sleep_ms(20);
        i = tx_get(x, txid);
    }
    return i;
}

/* Messages of a topic whose body contains `needle`; the last one's id. */
static size_t tx_find(txfx *x, const char *topic, const char *needle,
                      uint8_t id_out[BRK_UUID_LEN])
{
    brk_topic_info ti;
    assert_int_equal(brk_topic_get(x->s, topic, &ti), BRK_OK);
    size_t found = 0;
    for (uint16_t q = 0; q < ti.queues; q++) {
        uint64_t min, max;
        assert_int_equal(brk_store_queue_range(x->s, topic, q, &min, &max), BRK_OK);
        for (uint64_t next = min; next < max;) {
            brk_batch *b = NULL;
            assert_int_equal(brk_store_read(x->s, topic, q, next, 64, &b), BRK_OK);
            for (size_t i = 0; i < b->count; i++) {
                const brk_record *r = &b->recs[i];
                if (memmem(r->body.ptr, r->body.len, needle, strlen(needle))) {
                    found++;
                    if (id_out) memcpy(id_out, r->msg_id, BRK_UUID_LEN);
                }
            }
            next = b->next_offset;
            brk_batch_free(b);
        }
    }
    return found;
}

/* The rule, end to end: PostgreSQL is down for longer than the
 * whole check schedule (100 ms + 3 x 100 ms); nothing is rolled back and
 * no check is counted; when it is back and the row says commit, the
 * transaction commits and its message is readable.
 *
 * The checker logs in as a role that is NOLOGIN from just before the stop
 * until the row is updated after the restart: from the checker's side
 * that is one outage (every check answers ERROR), and it keeps the test
 * from racing psql's UPDATE against three quick "pending" answers. */
static void txn_outage_longer_than_schedule_then_commit(void **state)
{
    fx *f = *state;
    new_db("pc_txn", true);
    recreate_role("pc_chk", "IN ROLE outbox_sidecar");
    put_txn("pc_txn", "order-1001", "pending");
    f->o.pg.connect_timeout_ms = 2000;
    open_ok_as(f, "pc_txn", "pc_chk", NULL);
    assert_int_equal(ask(f->pc, "order-1001"), BRK_CHECK_UNKNOWN);

    txfx *x = &f->x;
    tx_open(x, f->pc);

    sql("postgres", "ALTER ROLE pc_chk NOLOGIN");
    assert_int_equal(pgh_stop(g_pg), 0);
    brk_txn_result pr = tx_prepare(x, "order-1001", "{\"order\":1001}", NULL);
    sleep_ms(2000);                     /* > 100 + 3 * 100 ms */

    brk_txn_info i = tx_get(x, "order-1001");
    brk_txn_stats ts;
    brk_txn_get_stats(x->t, &ts);
    bool still_prepared = i.state == BRK_TXN_PREPARED && i.checks == 0;
    uint64_t errors = ts.checks_error_total;

    assert_int_equal(pgh_restart(g_pg), 0);
    sql("pc_txn", "UPDATE outbox.transactions SET state = 'commit' WHERE txid = 'order-1001'");
    sql("postgres", "ALTER ROLE pc_chk LOGIN");
    if (!still_prepared || errors < 2) {
        fail_msg("during the outage: state %d, checks %u, ERROR answers %llu",
                 i.state, i.checks, (unsigned long long)errors);
    }

    i = tx_wait_resolved(x, "order-1001");
    assert_int_equal(i.state, BRK_TXN_COMMITTED);
    assert_false(i.expired);
    assert_true(i.checks <= 3);
    brk_txn_get_stats(x->t, &ts);
    assert_int_equal(ts.rolled_back_total, 0);
    assert_int_equal(ts.checks_commit_total, 1);

    uint8_t id[BRK_UUID_LEN];
    assert_int_equal(tx_find(x, "orders", "{\"order\":1001}", id), 1);
    assert_memory_equal(id, pr.msg_id, BRK_UUID_LEN);
    sc_pgcheck_stats s = stats(f->pc);
    assert_true(s.reconnects >= 1);
    assert_true(s.answers[BRK_CHECK_COMMIT] >= 1);
}

/* The converse: a row that stays pending is rolled back after exactly
 * max_checks counted answers, and the expiry event is published. */
static void txn_pending_forever_rolls_back_with_expiry_event(void **state)
{
    fx *f = *state;
    new_db("pc_txn_exp", true);
    put_txn("pc_txn_exp", "order-2002", "pending");
    open_ok(f, "pc_txn_exp", NULL);

    txfx *x = &f->x;
    tx_open(x, f->pc);
    tx_prepare(x, "order-2002", "{\"order\":2002}", "order-expired");
    brk_txn_info i = tx_wait_resolved(x, "order-2002");
    assert_int_equal(i.state, BRK_TXN_ROLLED_BACK);
    assert_true(i.expired);
    assert_int_equal(i.checks, 3);

    assert_int_equal(tx_find(x, "orders", "{\"order\":2002}", NULL), 0);
    assert_int_equal(tx_find(x, "order-expired", "order-2002", NULL), 1);
    sc_pgcheck_stats s = stats(f->pc);
    assert_int_equal(s.answers[BRK_CHECK_UNKNOWN], 3);
    assert_int_equal(s.answers[BRK_CHECK_ERROR], 0);
}

/* ---- main ---------------------------------------------------------------- */

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
        T(statement_timeout_answers_error_and_keeps_the_connection),
        T(unreachable_at_start_answers_error_then_recovers),
        T(invalid_query_found_after_start_makes_every_check_error),
        T(concurrent_checks_find_an_invalid_query_once_per_period),
        T(schema_installed_after_start_is_picked_up),
        T(server_killed_mid_run_answers_error_then_recovers),
        T(terminated_idle_connection_is_replaced_within_the_check),
        T(connection_terminated_mid_query_is_retried_on_a_fresh_one),
        T(stopped_backend_answers_error_by_the_deadline),
        T(close_wakes_waiters_and_waits_for_checks_in_flight),
        T(busy_healthy_connection_is_awaited_rather_than_one_in_backoff),
        T(concurrent_checks_share_a_pool_of_two),
        T(txn_outage_longer_than_schedule_then_commit),
        T(txn_pending_forever_rolls_back_with_expiry_event),
#undef T
    };
    return cmocka_run_group_tests(tests, pg_group_setup, pg_group_teardown);
}
