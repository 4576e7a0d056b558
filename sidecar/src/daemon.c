/*
 * daemon.c - wiring of the outboxd process, signals and shutdown.
 *
 * Thread model
 *   main thread     opens everything, then only waits for signals
 *                   (sigwait); runs the shutdown sequence.  It handles no
 *                   request.
 *   HTTP I/O        libmicrohttpd's thread pool, `threads` threads (0 = one
 *                   per online core), each with its own poll() loop; they
 *                   move bytes and answer /healthz, /readyz, /metrics, 401
 *                   and 413 themselves.
 *   HTTP workers    http_api's request workers (`workers`, default 64): each runs
 *                   one request; a SYNC append waits there for its
 *                   group-commit fdatasync.  A parked long poll holds no
 *                   thread.
 *   store           one background thread: ASYNC flushes, checkpoints,
 *                   retention.
 *   delay           one thread sleeping until the next due time.
 *   transactions    one scheduler thread plus `check_workers` check-back
 *                   threads; with a database they run the check query on
 *                   the pgcheck pool (`db_pool` connections, no threads of
 *                   its own); without one they stay idle.
 *   relay           with `relay = true`, one thread moving rows of
 *                   outbox.messages into the store (relay.h).
 *   groups          one thread: invisibility timeouts, long-poll deadlines,
 *                   progress persistence.
 * SIGTERM, SIGINT and SIGHUP are blocked before the first thread starts, so
 * every thread inherits the mask and only the main thread's sigwait sees
 * them; SIGPIPE is ignored (a client that hangs up must not kill us).
 *
 * Shutdown (SIGTERM or SIGINT)
 *   1. api_server_drain: /readyz 503 at once, new prepares/sends/topic and
 *      group PUTs 503, parked long polls answer now with what they have,
 *      new connections refused; commits, rollbacks, acks, nacks and reads
 *      keep working.  "draining" is logged after it, once in effect.
 *   2. api_server_wait_idle up to shutdown_grace, in short slices so that a
 *      second SIGTERM/SIGINT skips the rest of the grace.
 *   3. close in reverse build order: HTTP server (exchanges still running
 *      are cut), relay (finishes the batch in hand: it writes to the
 *      store, so it stops before the store does), groups (progress
 *      persisted), transactions (checks in flight finish), the check-back
 *      pool (after txn, whose workers call it), delays (state saved),
 *      store (flush + checkpoint).
 *      A failed close is logged and the sequence goes on; only the store's
 *      matters to the exit code, as only it can lose acknowledged data
 *      (pending transactions and timers stay in the log; unpersisted group
 *      progress means redelivery).
 *   4. exit 0 (70 when the store's final flush failed).
 *   During a PostgreSQL outage, step 3 waits for what is inside libpq:
 *   checks in flight finish the connect they are in (at most
 *   db_connect_timeout) before the transaction engine closes; the relay's
 *   connect and backoff sleep are interrupted by its close (pg stop_fd),
 *   so the exit may come up to about db_connect_timeout after the grace; a
 *   refused connect costs nothing (test_daemon_pg: server stopped, server
 *   hung).
 * Nothing acknowledged depends on step 3 in SYNC mode: a 2xx is only sent
 * after fdatasync, so SIGKILL at any moment loses nothing acknowledged.
 * The relay deletes a row only after the store fdatasync'ed it, and finds
 * rows stored before a crash by msg_id, so SIGKILL loses no row and stores
 * none twice.
 *
 * PostgreSQL at start-up (when configured)
 *   pgcheck open connects one connection and prepares the check query: a
 *   refused connection or a query that does not fit is exit 78; an
 *   unreachable server is a warning and the daemon starts (checks answer
 *   ERROR, which broker_core retries without counting).  Then one short
 *   probe connection names the server in the log and, when the built-in
 *   query or the relay needs the outbox schema, reads its version: none
 *   is 78 ("run `outboxd db migrate`"), newer than this binary knows is a
 *   warning (migrations only add).
 */
#include "daemon.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sysexits.h>
#include <unistd.h>

#include "broker/delay.h"
#include "broker/group.h"
#include "broker/store.h"
#include "broker/txn.h"
#include "http_api/api.h"
#include "migrate.h"
#include "pgcheck.h"
#include "relay.h"

#ifndef OUTBOXD_VERSION
#define OUTBOXD_VERSION "unknown"
#endif

#define DRAIN_SLICE_MS 20

struct sc_daemon {
    const sc_config *cfg;      /* borrowed */
    sc_log *log;               /* borrowed */
    brk_store *store;
    brk_delay *delay;
    brk_txn *txn;
    brk_groups *groups;
    sc_pgcheck *pgcheck;       /* NULL without a database */
    sc_relay *relay;           /* NULL unless relay = true */
    api_metrics_ext metrics;   /* the database families of /metrics */
    api_server *srv;
    unsigned threads;          /* HTTP workers actually asked for */
    char bound[SC_LISTEN_MAX]; /* "host:port" with the bound port */
};

/* ---- helpers ----------------------------------------------------------------- */

static int errf(char *err, size_t errlen, int code, const char *component,
                const char *reason)
{
    snprintf(err, errlen, "outboxd: %s: %s", component, reason);
    return code;
}

static const char *u64s(char buf[24], uint64_t v)
{
    snprintf(buf, 24, "%" PRIu64, v);
    return buf;
}

static int64_t mono_ms(const brk_clock *c)
{
    return c->mono_ns(c->ctx) / 1000000;
}

static const char *sig_name(int sig)
{
    switch (sig) {
    case SIGTERM: return "SIGTERM";
    case SIGINT:  return "SIGINT";
    case SIGHUP:  return "SIGHUP";
    }
    return "other";
}

/* mkdir -p, then check we may use it. */
static int ensure_dir(const char *dir, char *why, size_t wl)
{
    char path[SC_PATH_MAX];
    snprintf(path, sizeof path, "%s", dir);
    for (char *p = path + 1; ; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char c = *p;
        *p = '\0';
        /* 0700: the store holds message bodies; nobody else may read it. */
        if (mkdir(path, 0700) != 0 && errno != EEXIST) {
            snprintf(why, wl, "cannot create %s: %s", path, strerror(errno));
            return -1;
        }
        *p = c;
        if (c == '\0')
            break;
    }
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(why, wl, "%s is not a directory", dir);
        return -1;
    }
    if (access(dir, R_OK | W_OK | X_OK) != 0) {
        snprintf(why, wl, "cannot use %s: %s", dir, strerror(errno));
        return -1;
    }
    return 0;
}

static void store_opts_from(const sc_config *c, brk_store_opts *o)
{
    brk_store_opts_init(o);
    o->flush_mode = c->flush == SC_FLUSH_SYNC ? BRK_FLUSH_SYNC : BRK_FLUSH_ASYNC;
    o->flush_interval_ms = (uint32_t)c->flush_interval_ms;
    o->group_commit_delay_us = (uint32_t)c->group_commit_delay_us;
    o->segment_bytes = c->segment_size;
    o->disk_budget_bytes = c->disk_budget;
    o->retention_ms = c->retention_ms;
    o->max_body_bytes = (uint32_t)c->max_message;
    o->auto_create_topics = c->auto_create_topics;
    o->default_queues = (uint16_t)c->default_queues;
}

static void policy_from(const sc_config *c, brk_check_policy *p)
{
    brk_check_policy_init(p);
    p->first_check_ms = (uint32_t)c->check_first_ms;
    p->interval_ms = (uint32_t)c->check_interval_ms;
    p->max_checks = (uint16_t)c->check_max;
    p->on_exhausted = (uint8_t)c->check_on_exhausted;
}

static unsigned http_threads(const sc_config *c)
{
    if (c->threads)
        return (unsigned)c->threads;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (unsigned)n : 1;
}

/* The token is a secret: other users should not read the file.  (A mount
 * of a Kubernetes Secret is 0644 unless its defaultMode says otherwise.) */
static void warn_if_token_file_open(sc_daemon *d)
{
    struct stat st;
    const char *path = d->cfg->token_file;
    if (!path[0] || stat(path, &st) != 0 || !(st.st_mode & S_IROTH))
        return;
    char mode[8];
    snprintf(mode, sizeof mode, "%04o", (unsigned)(st.st_mode & 07777));
    sc_log_kv(d->log, API_LOG_WARN, "token_file is readable by other users",
              "token_file", path, "mode", mode, NULL);
}

/* ---- opening, one component at a time ------------------------------------------ */

static int open_store(sc_daemon *d, char *err, size_t errlen)
{
    char why[SC_PATH_MAX + 512] = "", a[24], b[24], s[24], e[24], ms[24];
    brk_store_opts o;
    store_opts_from(d->cfg, &o);
    if (ensure_dir(d->cfg->data_dir, why, sizeof why) != 0)
        return errf(err, errlen, EX_CANTCREAT, "data_dir", why);
    const brk_clock *clk = brk_clock_system();
    int64_t t0 = mono_ms(clk);
    brk_status st = brk_store_open(&d->store, d->cfg->data_dir, &o, why,
                                   sizeof why);
    if (st != BRK_OK)
        return errf(err, errlen, st == BRK_LOCKED ? EX_TEMPFAIL : EX_SOFTWARE,
                    "store", why[0] ? why : brk_strerror(st));
    int64_t took = mono_ms(clk) - t0;
    brk_store_stats ss;
    brk_store_get_stats(d->store, &ss);
    sc_log_kv(d->log, API_LOG_INFO, "store opened",
              "recovered_records", u64s(a, ss.recovered_records),
              "truncated_bytes", u64s(b, ss.truncated_bytes),
              "segments", u64s(s, ss.segments),
              "log_end", u64s(e, ss.log_end),
              "open_ms", u64s(ms, (uint64_t)(took > 0 ? took : 0)), NULL);
    return 0;
}

static int open_delay(sc_daemon *d, char *err, size_t errlen)
{
    char why[512] = "", n[24];
    brk_delay_opts o;
    brk_delay_opts_init(&o);
    o.max_delay_ms = d->cfg->delay_max_ms;
    brk_status st = brk_delay_open(&d->delay, d->store, &o, why, sizeof why);
    if (st != BRK_OK)
        return errf(err, errlen, EX_SOFTWARE, "delay",
                    why[0] ? why : brk_strerror(st));
    brk_delay_stats ds;
    brk_delay_get_stats(d->delay, &ds);
    sc_log_kv(d->log, API_LOG_INFO, "delays recovered",
              "pending", u64s(n, ds.pending), NULL);
    return 0;
}

static int open_txn(sc_daemon *d, char *err, size_t errlen)
{
    char why[512] = "", n[24];
    brk_txn_opts o;
    brk_txn_opts_init(&o);
    policy_from(d->cfg, &o.default_policy);
    o.checker = d->pgcheck ? sc_pgcheck_checker(d->pgcheck) : NULL;
    o.delay = d->delay;
    o.workers = (uint32_t)d->cfg->check_workers;
    brk_status st = brk_txn_open(&d->txn, d->store, &o, why, sizeof why);
    if (st != BRK_OK)
        return errf(err, errlen, EX_SOFTWARE, "txn",
                    why[0] ? why : brk_strerror(st));
    brk_txn_stats ts;
    brk_txn_get_stats(d->txn, &ts);
    sc_log_kv(d->log, API_LOG_INFO, "transactions recovered",
              "pending", u64s(n, ts.pending), NULL);
    if (!d->pgcheck)
        sc_log_kv(d->log, API_LOG_WARN, "no check-back source configured: "
                  "prepared transactions wait for a verdict", NULL);
    return 0;
}

/* ---- PostgreSQL ------------------------------------------------------------------ */

void sc_daemon_pg_opts(const sc_config *c, const brk_clock *clock,
                       sc_pg_opts *o)
{
    sc_pg_opts_init(o);
    o->conninfo = c->database_url;
    o->password_file = c->database_password_file;
    o->statement_timeout_ms = c->db_statement_timeout_ms;
    o->connect_timeout_ms = c->db_connect_timeout_ms;
    o->clock = clock;
}

/* The adapters' status code as the daemon's exit code: 78 stays 78 (the
 * operator has to change something), anything else is 70. */
static int pg_failed(char *err, size_t errlen, int rc, const char *why)
{
    return errf(err, errlen, rc == EX_CONFIG ? EX_CONFIG : EX_SOFTWARE,
                "postgres", why[0] ? why : "cannot start");
}

/* Whether what runs needs the outbox schema: the built-in check query
 * calls outbox.check_transaction, the relay reads outbox.messages. */
static bool needs_schema(const sc_config *c)
{
    return !c->check_query[0] || c->relay;
}

/* One short connection after the pool opened: say where we are connected
 * (never the password) and check the schema version.  Skipped when the
 * pool could not connect (another attempt would only wait out the connect
 * timeout again); an unreachable server is a warning only, the pool keeps
 * trying and validates its query on the first connection. */
static int probe_db(sc_daemon *d, char *err, size_t errlen)
{
    const sc_config *c = d->cfg;
    sc_pgcheck_stats ps;
    sc_pgcheck_get_stats(d->pgcheck, &ps);
    if (ps.connected == 0) {
        sc_log_kv(d->log, API_LOG_WARN, "PostgreSQL unreachable at start: "
                  "check-backs answer error (retried, never counted) until "
                  "it answers", NULL);
        return 0;
    }
    char why[1024] = "", target[300] = "", v[24], latest[24];
    sc_pg_opts o;
    sc_daemon_pg_opts(c, brk_store_clock(d->store), &o);
    o.application_name = "outboxd";
    sc_pg_fail fail = SC_PG_OK;
    PGconn *conn = sc_pg_connect(&o, &fail, why, sizeof why);
    if (!conn) {
        if (fail == SC_PG_REFUSED)
            return errf(err, errlen, EX_CONFIG, "postgres", why);
        sc_log_kv(d->log, API_LOG_WARN, "PostgreSQL unreachable at start: "
                  "check-backs answer error (retried, never counted) until "
                  "it answers", "error", why, NULL);
        return 0;
    }
    sc_pg_describe(conn, target, sizeof target);
    sc_log_kv(d->log, API_LOG_INFO, "postgres connected", "target", target,
              NULL);
    int rc = 0;
    int version = 0;
    if (needs_schema(c)) {
        if (sc_db_schema_version(conn, &version, why, sizeof why) != 0) {
            sc_log_kv(d->log, API_LOG_WARN, "cannot read the outbox schema "
                      "version", "error", why, NULL);
        } else if (version == 0) {
            rc = errf(err, errlen, EX_CONFIG, "postgres", "database has no "
                      "outbox schema; run `outboxd db migrate`");
        } else if (version > sc_migrations_latest()) {
            sc_log_kv(d->log, API_LOG_WARN, "the database's outbox schema is "
                      "newer than this outboxd knows", "version",
                      u64s(v, (uint64_t)version), "known",
                      u64s(latest, (uint64_t)sc_migrations_latest()), NULL);
        }
    }
    PQfinish(conn);
    return rc;
}

/* The check-back pool, before txn (whose workers call it). */
static int open_pgcheck(sc_daemon *d, char *err, size_t errlen)
{
    const sc_config *c = d->cfg;
    if (!c->db_configured)
        return 0;
    char why[1024] = "", pool[24];
    sc_pgcheck_opts o;
    sc_pgcheck_opts_init(&o);
    sc_daemon_pg_opts(c, brk_store_clock(d->store), &o.pg);
    o.pg.application_name = "outboxd check";
    o.pool_size = (unsigned)c->db_pool;
    o.query = c->check_query[0] ? c->check_query : NULL;
    o.log = d->log;
    int rc = sc_pgcheck_open(&d->pgcheck, &o, why, sizeof why);
    if (rc != 0) {
        d->pgcheck = NULL;
        return pg_failed(err, errlen, rc, why);
    }
    sc_log_kv(d->log, API_LOG_INFO, "check-backs answered by PostgreSQL",
              "pool", u64s(pool, c->db_pool),
              "check_query", c->check_query[0] ? "custom" : "default",
              "relay", c->relay ? "on" : "off", NULL);
    return probe_db(d, err, errlen);
}

/* The relay, once the store it writes to is open. */
static int open_relay(sc_daemon *d, char *err, size_t errlen)
{
    const sc_config *c = d->cfg;
    if (!c->relay)
        return 0;
    char why[1024] = "", batch[24], poll[24];
    sc_relay_opts o;
    sc_relay_opts_init(&o);
    sc_daemon_pg_opts(c, brk_store_clock(d->store), &o.pg);
    o.pg.application_name = "outboxd relay";
    o.store = d->store;
    o.batch = (uint32_t)c->relay_batch;
    o.poll_interval_ms = c->relay_poll_interval_ms;
    o.log = d->log;
    int rc = sc_relay_open(&d->relay, &o, why, sizeof why);
    if (rc != 0) {
        d->relay = NULL;
        return pg_failed(err, errlen, rc, why);
    }
    sc_log_kv(d->log, API_LOG_INFO, "relay started",
              "batch", u64s(batch, c->relay_batch),
              "poll_interval_ms", u64s(poll, (uint64_t)c->relay_poll_interval_ms),
              NULL);
    return 0;
}

/* /metrics, the database side (api_metrics_ext): counters of the pool and
 * the relay.  Runs on HTTP threads; both get_stats calls are thread-safe,
 * and both handles outlive the HTTP server (closed after it). */
static void render_db_metrics(void *ctx, FILE *out)
{
    sc_daemon *d = ctx;
    if (d->pgcheck) {
        sc_pgcheck_stats st;
        sc_pgcheck_get_stats(d->pgcheck, &st);
        fprintf(out,
                "# HELP outboxd_db_up 1 when at least one check-back "
                "connection to PostgreSQL is healthy.\n"
                "# TYPE outboxd_db_up gauge\n"
                "outboxd_db_up %d\n"
                "# HELP outboxd_db_connections Healthy check-back connections "
                "to PostgreSQL.\n"
                "# TYPE outboxd_db_connections gauge\n"
                "outboxd_db_connections %u\n"
                "# HELP outboxd_check_queries_total Check-back queries by "
                "answer (error: not answered; retried, never counted).\n"
                "# TYPE outboxd_check_queries_total counter\n"
                "outboxd_check_queries_total{answer=\"commit\"} %llu\n"
                "outboxd_check_queries_total{answer=\"rollback\"} %llu\n"
                "outboxd_check_queries_total{answer=\"unknown\"} %llu\n"
                "outboxd_check_queries_total{answer=\"error\"} %llu\n"
                "# HELP outboxd_check_timeouts_total Check-back queries cut "
                "by db_statement_timeout.\n"
                "# TYPE outboxd_check_timeouts_total counter\n"
                "outboxd_check_timeouts_total %llu\n"
                "# HELP outboxd_db_reconnects_total Successful check-back "
                "reconnects after the first connect.\n"
                "# TYPE outboxd_db_reconnects_total counter\n"
                "outboxd_db_reconnects_total %llu\n",
                st.connected > 0 ? 1 : 0, st.connected,
                (unsigned long long)st.answers[BRK_CHECK_COMMIT],
                (unsigned long long)st.answers[BRK_CHECK_ROLLBACK],
                (unsigned long long)st.answers[BRK_CHECK_UNKNOWN],
                (unsigned long long)st.answers[BRK_CHECK_ERROR],
                (unsigned long long)st.timeouts,
                (unsigned long long)st.reconnects);
    }
    if (d->relay) {
        sc_relay_stats st;
        sc_relay_get_stats(d->relay, &st);
        fprintf(out,
                "# HELP outboxd_relay_leader 1 when this outboxd holds the "
                "relay leadership (the advisory lock).\n"
                "# TYPE outboxd_relay_leader gauge\n"
                "outboxd_relay_leader %d\n"
                "# HELP outboxd_relay_rows_total Rows of outbox.messages "
                "handled: stored, duplicate (already stored before a crash), "
                "rejected (kept in __relay_rejected).\n"
                "# TYPE outboxd_relay_rows_total counter\n"
                "outboxd_relay_rows_total{result=\"stored\"} %llu\n"
                "outboxd_relay_rows_total{result=\"duplicate\"} %llu\n"
                "outboxd_relay_rows_total{result=\"rejected\"} %llu\n"
                "# HELP outboxd_relay_batches_total Relay batches committed.\n"
                "# TYPE outboxd_relay_batches_total counter\n"
                "outboxd_relay_batches_total %llu\n"
                "# HELP outboxd_relay_errors_total Relay batches that failed "
                "(rows stay in the table and are retried).\n"
                "# TYPE outboxd_relay_errors_total counter\n"
                "outboxd_relay_errors_total %llu\n"
                "# HELP outboxd_relay_lookups_total Rows looked up in the "
                "store because an unfinished batch may have stored them.\n"
                "# TYPE outboxd_relay_lookups_total counter\n"
                "outboxd_relay_lookups_total %llu\n"
                "# HELP outboxd_relay_lag_seconds Age of the newest row of the "
                "last batch when it was stored.\n"
                "# TYPE outboxd_relay_lag_seconds gauge\n"
                "outboxd_relay_lag_seconds %.3f\n",
                st.leader ? 1 : 0,
                (unsigned long long)st.rows_stored,
                (unsigned long long)st.rows_duplicate,
                (unsigned long long)st.rows_rejected,
                (unsigned long long)st.batches,
                (unsigned long long)st.errors,
                (unsigned long long)st.lookups,
                st.lag_ms > 0 ? (double)st.lag_ms / 1000 : 0.0);
    }
}

static int open_groups(sc_daemon *d, char *err, size_t errlen)
{
    char why[512] = "";
    brk_groups_opts o;
    brk_groups_opts_init(&o);
    o.default_invisible_ms = (uint32_t)d->cfg->invisible_default_ms;
    brk_status st = brk_groups_open(&d->groups, d->store, &o, why, sizeof why);
    if (st != BRK_OK)
        return errf(err, errlen, EX_SOFTWARE, "groups",
                    why[0] ? why : brk_strerror(st));
    return 0;
}

static int open_http(sc_daemon *d, char *err, size_t errlen)
{
    const sc_config *c = d->cfg;
    char why[512] = "", port[8], th[24];
    api_config a;
    api_config_init(&a);
    a.bind_addr = c->bind_host;
    a.port = c->port;
    a.threads = d->threads;
    a.workers = (unsigned)c->workers;
    a.max_connections = (unsigned)c->max_connections;
    a.idle_timeout_s = (unsigned)((c->idle_timeout_ms + 999) / 1000);
    a.token = c->auth_token[0] ? c->auth_token : NULL;
    a.max_body_bytes = (size_t)c->max_body;
    a.idem_window_ms = c->idempotency_window_ms;
    a.idem_max_keys = (size_t)c->idempotency_max_keys;
    a.default_wait_ms = (uint32_t)c->default_wait_ms;
    policy_from(c, &a.default_check);
    a.logger = sc_log_api(d->log);
    if (d->pgcheck || d->relay) {
        d->metrics.render = render_db_metrics;
        d->metrics.ctx = d;
        a.metrics_ext = &d->metrics;
    }
    api_broker b = { d->store, d->txn, d->delay, d->groups };
    brk_status st = api_server_open(&d->srv, &a, &b, why, sizeof why);
    if (st != BRK_OK)
        return errf(err, errlen, st == BRK_IO ? EX_UNAVAILABLE : EX_SOFTWARE,
                    "http", why[0] ? why : brk_strerror(st));
    uint16_t p = api_server_port(d->srv);
    snprintf(port, sizeof port, "%u", (unsigned)p);
    bool v6 = strchr(c->bind_host, ':') != NULL;
    snprintf(d->bound, sizeof d->bound, v6 ? "[%s]:%u" : "%s:%u",
             c->bind_host, (unsigned)p);
    sc_log_kv(d->log, API_LOG_INFO, "listening",
              "listen", d->bound, "port", port,
              "version", OUTBOXD_VERSION, "data_dir", c->data_dir,
              "flush", c->flush == SC_FLUSH_SYNC ? "sync" : "async",
              "threads", u64s(th, d->threads),
              "auth", a.token ? "bearer" : "none", NULL);
    return 0;
}

/* ---- public ------------------------------------------------------------------ */

int sc_daemon_std_fds(void)
{
    for (int fd = 0; fd <= 2; fd++) {
        if (fcntl(fd, F_GETFD) >= 0 || errno != EBADF)
            continue;
        /* open returns the lowest free descriptor: this one */
        int n = open("/dev/null", O_RDWR);
        if (n < 0)
            return -1;
        if (n != fd) {
            close(n);
            return -1;
        }
    }
    return 0;
}

void sc_daemon_block_signals(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, set, NULL);
    signal(SIGPIPE, SIG_IGN);
}

int sc_daemon_open(sc_daemon **out, const sc_config *cfg, sc_log *log,
                   char *err, size_t errlen)
{
    *out = NULL;
    sc_daemon *d = calloc(1, sizeof *d);
    if (!d)
        return errf(err, errlen, EX_SOFTWARE, "daemon", "out of memory");
    d->cfg = cfg;
    d->log = log;
    d->threads = http_threads(cfg);
    char th[24];
    sc_log_kv(log, API_LOG_INFO, "starting", "version", OUTBOXD_VERSION,
              "listen", cfg->listen, "data_dir", cfg->data_dir,
              "flush", cfg->flush == SC_FLUSH_SYNC ? "sync" : "async",
              "threads", u64s(th, d->threads), NULL);
    warn_if_token_file_open(d);
    int rc = open_store(d, err, errlen);
    if (rc == 0) rc = open_delay(d, err, errlen);
    if (rc == 0) rc = open_pgcheck(d, err, errlen);
    if (rc == 0) rc = open_txn(d, err, errlen);
    if (rc == 0) rc = open_groups(d, err, errlen);
    if (rc == 0) rc = open_relay(d, err, errlen);
    if (rc == 0) rc = open_http(d, err, errlen);
    if (rc != 0) {
        sc_daemon_close(d);
        return rc;
    }
    *out = d;
    return 0;
}

uint16_t sc_daemon_port(const sc_daemon *d)
{
    return api_server_port(d->srv);
}

static bool stop_signal_pending(sc_daemon *d, const sigset_t *stop)
{
    if (!stop)
        return false;
    struct timespec zero = { 0, 0 };
    int sig;
    while ((sig = sigtimedwait(stop, NULL, &zero)) > 0) {
        if (sig == SIGHUP) {
            sc_log_kv(d->log, API_LOG_INFO, "SIGHUP ignored", NULL);
            continue;
        }
        sc_log_kv(d->log, API_LOG_WARN, "second signal: skipping the rest of "
                  "the shutdown grace", "signal", sig_name(sig), NULL);
        return true;
    }
    return false;
}

bool sc_daemon_drain(sc_daemon *d, const sigset_t *stop)
{
    char g[24], ms[24];
    int64_t grace = d->cfg->shutdown_grace_ms;
    api_server_drain(d->srv);
    /* logged once in effect: whoever reads it may count on 503s */
    sc_log_kv(d->log, API_LOG_INFO, "draining", "grace_ms",
              u64s(g, (uint64_t)grace), NULL);
    const brk_clock *clk = brk_store_clock(d->store);
    int64_t start = mono_ms(clk);
    bool idle = false, skipped = false;
    for (;;) {
        int64_t left = grace - (mono_ms(clk) - start);
        if (left <= 0)
            break;
        if (api_server_wait_idle(d->srv, (uint32_t)(left < DRAIN_SLICE_MS
                                                    ? left : DRAIN_SLICE_MS))) {
            idle = true;
            break;
        }
        if (stop_signal_pending(d, stop)) {
            skipped = true;
            break;
        }
    }
    if (!idle && grace <= 0)
        idle = api_server_wait_idle(d->srv, 0);
    u64s(ms, (uint64_t)(mono_ms(clk) - start));
    if (idle)
        sc_log_kv(d->log, API_LOG_INFO, "drain done", "elapsed_ms", ms, NULL);
    else
        sc_log_kv(d->log, API_LOG_WARN, skipped ? "drain skipped: closing the "
                  "exchanges still in flight" : "shutdown grace expired: "
                  "closing the exchanges still in flight", "elapsed_ms", ms,
                  NULL);
    return idle;
}

static void closed(sc_daemon *d, const char *component, brk_status st)
{
    if (st == BRK_OK)
        sc_log_kv(d->log, API_LOG_INFO, "closed", "component", component, NULL);
    else
        sc_log_kv(d->log, API_LOG_ERROR, "close failed", "component", component,
                  "status", brk_status_name(st), "error", brk_strerror(st),
                  NULL);
}

int sc_daemon_close(sc_daemon *d)
{
    if (!d)
        return 0;
    int rc = 0;
    if (d->srv) {
        api_server_close(d->srv);
        closed(d, "http", BRK_OK);
    }
    if (d->relay) {
        sc_relay_close(d->relay);
        closed(d, "relay", BRK_OK);
    }
    if (d->groups)
        closed(d, "groups", brk_groups_close(d->groups));
    if (d->txn)
        closed(d, "txn", brk_txn_close(d->txn));
    if (d->pgcheck) {
        sc_pgcheck_close(d->pgcheck);
        closed(d, "pgcheck", BRK_OK);
    }
    if (d->delay)
        closed(d, "delay", brk_delay_close(d->delay));
    if (d->store) {
        brk_status st = brk_store_close(d->store);
        closed(d, "store", st);
        if (st != BRK_OK)
            rc = EX_SOFTWARE;
    }
    free(d);
    return rc;
}

/* Sleep in sigwait until SIGTERM or SIGINT; SIGHUP is logged and ignored. */
static int wait_for_stop(sc_log *log, const sigset_t *set)
{
    for (;;) {
        int sig = 0;
        if (sigwait(set, &sig) != 0)
            continue;
        if (sig == SIGHUP) {
            sc_log_kv(log, API_LOG_INFO, "SIGHUP ignored", NULL);
            continue;
        }
        return sig;
    }
}

int sc_daemon_run(const sc_config *cfg, sc_log *log, char *err, size_t errlen)
{
    sigset_t set;
    sc_daemon *d;
    sc_daemon_block_signals(&set);
    if (err && errlen)
        err[0] = '\0';
    int rc = sc_daemon_open(&d, cfg, log, err, errlen);
    if (rc != 0)
        return rc;
    sc_log_kv(log, API_LOG_INFO, "ready", "listen", d->bound, NULL);
    int sig = wait_for_stop(log, &set);
    sc_log_kv(log, API_LOG_INFO, "signal received", "signal", sig_name(sig),
              NULL);
    sc_daemon_drain(d, &set);
    rc = sc_daemon_close(d);
    char code[24];
    sc_log_kv(log, API_LOG_INFO, "exit", "code", u64s(code, (uint64_t)rc), NULL);
    return rc;
}
