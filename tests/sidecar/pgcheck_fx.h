/*
 * pgcheck_fx.h - the fixture and helpers of the check-back tests
 * (test_pgcheck.c: answers, validation, credentials; test_pgcheck_outage.c:
 * outages, timeouts, terminated connections, close, concurrency and the
 * transaction level), over the one PostgreSQL server of pg_fixture.h.
 *
 * The fixture: a debug log into a temporary file (log_text reads it
 * back), checker options with short backoffs, the checker a test opened,
 * and the store of the transaction-level tests; teardown closes that
 * store first (its workers call the checker) and resumes a backend a test
 * left stopped.  Rows are written with libpq and parameters (so txids
 * full of quotes need no quoting here either), schema changes through
 * psql (pgh_sql).
 *
 * tests/CMakeLists.txt builds each test file alone, so this header holds
 * definitions: static, and not all of them used by each file.
 */
#ifndef SIDECAR_TEST_PGCHECK_FX_H
#define SIDECAR_TEST_PGCHECK_FX_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <libpq-fe.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "broker/store.h"
#include "broker/txn.h"
#include "log.h"
#include "pg_fixture.h"
#include "pgcheck.h"
#include "tmpdir.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"

/* A backend this program stopped with SIGSTOP; teardown resumes it. */
static pid_t g_stopped;

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

static void new_db(const char *db, bool migrate)
{
    if (pgh_create_db(g_pg, db, migrate) != 0)
        fail_msg("cannot create database %s", db);
}

/* One parameterised statement as the superuser. */
static void exec_params(const char *db, const char *text, int n,
                        const char *const *vals)
{
    char url[256];
    pgh_url(g_pg, db, NULL, NULL, url, sizeof url);
    PGconn *c = PQconnectdb(url);
    if (PQstatus(c) != CONNECTION_OK)
        fail_msg("connect %s: %s", url, PQerrorMessage(c));
    PGresult *r = PQexecParams(c, text, n, NULL, vals, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
        fail_msg("%s: %s", text, PQresultErrorMessage(r));
    PQclear(r);
    PQfinish(c);
}

/* A row of outbox.transactions. */
static void put_txn(const char *db, const char *txid, const char *state)
{
    const char *v[2] = { txid, state };
    exec_params(db, "INSERT INTO outbox.transactions (txid, state) VALUES ($1, $2) "
                "ON CONFLICT (txid) DO UPDATE SET state = EXCLUDED.state", 2, v);
}

typedef struct txfx {
    char dir[512];
    brk_store *s;
    brk_txn *t;
} txfx;

typedef struct fx {
    txfx x;                    /* the transaction-level tests' store */
    char url[256];
    sc_pgcheck_opts o;
    sc_pgcheck *pc;
    FILE *logf;
    sc_log *log;
    char err[1024];
    char text[65536];          /* log_text's buffer */
} fx;

static void tx_close(txfx *x)
{
    brk_status a = x->t ? brk_txn_close(x->t) : BRK_OK;
    brk_status b = x->s ? brk_store_close(x->s) : BRK_OK;
    if (x->dir[0]) brk_tmpdir_remove(x->dir);
    memset(x, 0, sizeof *x);
    assert_int_equal(a, BRK_OK);
    assert_int_equal(b, BRK_OK);
}

/* Everything logged so far. */
static const char *log_text(struct fx *f)
{
    ssize_t n = pread(fileno(f->logf), f->text, sizeof f->text - 1, 0);
    f->text[n > 0 ? n : 0] = '\0';
    return f->text;
}

static int setup(void **state)
{
    fx *f = calloc(1, sizeof *f);
    if (!f) return -1;
    f->logf = tmpfile();
    f->log = f->logf ? sc_log_open(API_LOG_DEBUG, f->logf) : NULL;
    if (!f->log) return -1;
    sc_pgcheck_opts_init(&f->o);
    f->o.pg.connect_timeout_ms = 4000;
    f->o.pg.statement_timeout_ms = 5000;
    f->o.pg.backoff_min_ms = 50;
    f->o.pg.backoff_max_ms = 200;
    f->o.log = f->log;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    if (g_stopped > 0) {       /* before anything may wait on it */
        kill(g_stopped, SIGCONT);
        g_stopped = 0;
    }
    tx_close(&f->x);           /* its workers call the checker: first */
    sc_pgcheck_close(f->pc);
    if (getenv("PC_SHOW_LOG"))   /* debugging: the checker's log lines */
        fputs(log_text(f), stderr);
    sc_log_close(f->log);
    fclose(f->logf);
    free(f);
    return 0;
}

/* Open with f->o and this URL / query; returns sc_pgcheck_open's code. */
static int open_pc(fx *f, const char *url, const char *query)
{
    sc_pgcheck_close(f->pc);
    f->pc = NULL;
    f->o.pg.conninfo = url;
    f->o.query = query;
    return sc_pgcheck_open(&f->pc, &f->o, f->err, sizeof f->err);
}

/* Open on `db` as `user` (NULL: the superuser); must succeed. */
static void open_ok_as(fx *f, const char *db, const char *user, const char *query)
{
    pgh_url(g_pg, db, user, NULL, f->url, sizeof f->url);
    int rc = open_pc(f, f->url, query);
    if (rc != 0)
        fail_msg("sc_pgcheck_open: %d: %s", rc, f->err);
}

static void open_ok(fx *f, const char *db, const char *query)
{
    open_ok_as(f, db, NULL, query);
}

static brk_check_result ask(sc_pgcheck *pc, const char *txid)
{
    brk_check_req r;
    memset(&r, 0, sizeof r);
    r.txid = txid;
    r.topic = "orders";
    r.attempt = 1;
    const brk_checker *ck = sc_pgcheck_checker(pc);
    return ck->check(ck->ctx, &r);
}

static sc_pgcheck_stats stats(sc_pgcheck *pc)
{
    sc_pgcheck_stats s;
    sc_pgcheck_get_stats(pc, &s);
    return s;
}

/* Ask until the answer is `want` (at most 30 s). */
static bool ask_until(sc_pgcheck *pc, const char *txid, brk_check_result want)
{
    int64_t end = now_ms() + 30000;
    while (now_ms() < end) {
        if (ask(pc, txid) == want) return true;
        sleep_ms(50);
    }
    return false;
}

/* Every line that mentions txid is a debug line. */
static void assert_txid_only_at_debug(fx *f, const char *txid)
{
    const char *t = log_text(f);
    for (const char *p = strstr(t, txid); p; p = strstr(p + 1, txid)) {
        const char *line = p;
        while (line > t && line[-1] != '\n') line--;
        const char *lvl = strstr(line, "\"level\":");
        if (!lvl || strncmp(lvl, "\"level\":\"debug\"", 15) != 0) {
            const char *end = strchr(line, '\n');
            fail_msg("txid above debug: %.*s", end ? (int)(end - line) : 300, line);
        }
    }
}

#pragma GCC diagnostic pop

#endif /* SIDECAR_TEST_PGCHECK_FX_H */
