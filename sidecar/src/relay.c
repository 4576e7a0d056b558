/*
 * relay.c - the outbox relay: rows of outbox.messages into the store (see
 * relay.h for the contract and sql/migrations/0001_outbox.sql for why
 * taking visible rows in id order loses nothing and keeps per-key order).
 * How a row becomes a message is in relay_row.c; markers are read and
 * written by relay_marker.c.
 *
 * The relay thread (or, with no_thread, each sc_relay_run_once call) moves
 * through these states; `conn` is its one PostgreSQL session:
 *
 *   DISCONNECTED --session_open: connect, check schema, prepare--> STANDBY
 *        ^   \-- fails: wait sc_pg_backoff_ms(failures, jitter), retry
 *        |
 *        +---- any PostgreSQL error, in any state (drop_session: PQfinish;
 *        |     the advisory lock and the LISTEN go with the session)
 *        |
 *   STANDBY --try_lead: pg_try_advisory_lock true, LISTEN--> LEADER
 *        \-- false: wait poll_interval, try again (never blocks the leader)
 *   LEADER --step_down: STEP_DOWN_AFTER store failures in a row: unlock,
 *        UNLISTEN--> STANDBY (tries again after the store backoff), so a
 *        replica whose store works is not kept standing by
 *
 *   LEADER: run_batch, then
 *     - full batch: the next at once;
 *     - some rows (busy): UNLISTEN and run the next GATHER_MS after this
 *       one started, so one transaction and one fdatasync take the rows of
 *       many commits, and the server does not notify us of every commit;
 *     - no rows, not listening: LISTEN, then one more batch (rows
 *       committed before the LISTEN took effect are in it);
 *     - no rows, listening (idle): wait on the session's socket and the
 *       wake fd for a notification, sc_relay_wake or poll_interval,
 *       whichever comes first.
 *     A store error that may pass (FULL, NOSPC, IO, FAILED) rolls the
 *     batch back and waits a backoff before the next.
 *
 * A batch: BEGIN; SELECT the oldest `batch` rows (binary results); append
 * one marker (below) to "__relay"; per row find out whether the store
 * has it already (only for candidates, below), else convert and append it
 * (defer_sync), or keep a row the store refuses for good in
 * "__relay_rejected"; brk_store_flush (the DELETE is the acknowledgement,
 * so the rows must be durable first, in ASYNC mode too); DELETE the rows;
 * while there are candidates, ask whether any is left; COMMIT.  Row
 * statistics change only once COMMIT has succeeded.  A batch that fails
 * after appending is flushed all the same: lookups see what readers see
 * (in SYNC mode, durable records), and a retry must find those rows.
 *
 * Duplicates, bounded.  A row is in the store without being deleted only
 * if a relay on this store appended it in a batch that did not commit (or
 * whose COMMIT outcome is unknown: the session died).  Such rows are the
 * only ones looked up, by msg_id and only among records from where they
 * could have been written on (brk_store_lookup_since), so a restart with
 * a backlog costs lookups for one batch, not backlog x store size.
 *
 *   Marker.  Before appending a batch's rows the relay appends one record
 *   to SC_RELAY_MARKER_TOPIC, "__relay" (1 queue, internal, defer_sync: it
 *   becomes durable with the rows' flush).  The log survives a crash as
 *   a prefix, so if any row of the batch is in the store, its marker is
 *   too.  The body is SC_RELAY_MARKER_LEN (48) bytes, little-endian:
 *
 *     0   u8[4]  "ORM1"     magic and version
 *     4   u32    flags      bit 0: the carried range below is set; other
 *                           bits 0 (a marker with others is ignored)
 *     8   i64    lo         smallest row id of the batch
 *     16  i64    hi         largest row id of the batch
 *     24  i64    cand_lo    carried candidates: ids cand_lo..cand_hi,
 *     32  i64    cand_hi      whose copies are at log offsets >=
 *     40  u64    cand_since   cand_since (0, 0, 0 when bit 0 is clear)
 *
 *   Candidates.  `cand` = {lo, hi, since} or none: rows with lo <= id <= hi
 *   may be stored, at log offsets >= since.  The first batch after open
 *   reads the LAST marker: cand = its batch range (since = the marker's
 *   own log offset) joined with the range it carried.  A batch that fails
 *   after its marker was appended joins its range to cand (since = the
 *   lower of the two).  A batch that commits while cand is set asks, in
 *   its transaction after the DELETE, `EXISTS (id BETWEEN lo AND hi)`;
 *   false clears cand (a row that commits with such an id later was never
 *   visible before, so no relay can have stored it).  Each marker carries
 *   the cand of its time, so a restart after several failed batches still
 *   knows them all.  Rows outside cand are appended without a lookup.
 *
 *   No marker: a new store, one written before markers existed, or one
 *   whose markers retention removed.  Retention removes only segments
 *   older than the retention time and never the newest, so the last
 *   marker is gone only if no batch ran on this store for that long; an
 *   unfinished batch then means the process crashed at least that long
 *   ago and no relay ran on this store since (a relay that had would have
 *   settled it, or carried it in its own markers).  cand is none: at worst
 *   a row is stored twice with the same msg_id, which at-least-once
 *   delivery allows (consumers de-duplicate by msg_id).
 *
 * Close: the thread finishes the batch in hand; one that is still blocked
 * in PostgreSQL after CLOSE_GRACE_MS (a lock held by an application, a
 * hung server) is cancelled (PQcancel), so it rolls back: its rows stay,
 * and its marker makes the next relay on this store look them up.
 *
 * Threads: `mu` guards `st` (the statistics) and `cancel_mu` the cancel
 * handle (used by sc_relay_close).  Everything else that changes is
 * touched by one thread: the relay thread, or with no_thread the caller of
 * sc_relay_run_once.  `stop` and `thread_done` are atomic; the wake fd is
 * an eventfd written by sc_relay_wake and sc_relay_close from any thread.
 * The stop fd is a second eventfd, written once by sc_relay_close and never
 * read: it is the connections' opts.stop_fd, so a connect to a server that
 * accepts and never answers ends at close instead of at connect_timeout
 * (the wake fd cannot serve: wait_until reads it empty).
 */
#define _GNU_SOURCE
#include "relay.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "relay_marker.h"
#include "relay_row.h"

/* ---- SQL ------------------------------------------------------------------ */

#define STMT_SELECT "sc_relay_select"
#define STMT_DELETE "sc_relay_delete"
#define STMT_LOCK   "sc_relay_lock"
#define STMT_CAND   "sc_relay_cand"
#define STMT_UNLOCK "sc_relay_unlock"

static const char SQL_DELETE[] =
    "DELETE FROM outbox.messages WHERE id = ANY($1::bigint[])";

/* The class (1869707362, 'obxb') is SC_RELAY_LOCK_CLASS. */
static const char SQL_LOCK[] =
    "SELECT pg_try_advisory_lock(1869707362, 0)";
_Static_assert(SC_RELAY_LOCK_CLASS == 1869707362, "SQL_LOCK names the class");

static const char SQL_UNLOCK[] =
    "SELECT pg_advisory_unlock(1869707362, 0)";

/* Is any candidate row still there?  An index range probe. */
static const char SQL_CAND[] =
    "SELECT EXISTS (SELECT 1 FROM outbox.messages"
    " WHERE id BETWEEN $1::bigint AND $2::bigint)";

/* Catalog lookups rather than to_regclass or has_table_privilege on a name:
 * those raise errors for a missing schema or one we may not use, and this
 * has to tell those cases apart.  Scalar subqueries, because SQL does not
 * promise to short-circuit AND. */
static const char SQL_CHECK[] =
    "WITH s AS (SELECT oid FROM pg_catalog.pg_namespace"
    "           WHERE nspname = 'outbox'),"
    "     c AS (SELECT k.oid FROM pg_catalog.pg_class k JOIN s"
    "           ON k.relnamespace = s.oid WHERE k.relname = 'messages')"
    " SELECT EXISTS (SELECT FROM c),"
    "  coalesce((SELECT has_schema_privilege(oid, 'USAGE') FROM s), false),"
    "  coalesce((SELECT has_table_privilege(oid, 'SELECT') FROM c), false),"
    "  coalesce((SELECT has_table_privilege(oid, 'DELETE') FROM c), false),"
    "  current_user";

#define MIGRATE_HINT "run `outboxd db migrate`"

/* ---- the handle ----------------------------------------------------------- */

#define WARN_EVERY_MS 30000     /* repeat "still failing" warnings this often */

/* Under load a batch starts no sooner than GATHER_MS after the previous
 * one started, so the rows of many commits share one transaction and one
 * fdatasync (relay_bench: 3 rows per batch without it, ~80 with it, and
 * the writers lose less throughput to the relay).  An idle relay that is
 * woken runs at once: this adds latency only when rows keep coming. */
#define GATHER_MS 20

/* How long close lets the batch in hand finish before cancelling it, and
 * how often it repeats the cancel (one sent between two statements finds
 * nothing to cancel). */
#define CLOSE_GRACE_MS  2000
#define CLOSE_CANCEL_MS 250

/* A leader whose store refused this many batches in a row steps down
 * (see step_down). */
#define STEP_DOWN_AFTER 3


struct sc_relay {
    /* Set by open, read-only afterwards. */
    sc_pg_opts pg;              /* strings point at the copies below */
    char *conninfo;
    char *password_file;
    char *application_name;
    brk_store *store;           /* borrowed */
    const brk_clock *clock;     /* pg.clock, else the store's: for
                                   last_batch_ms */
    uint32_t batch;
    int64_t poll_ms;
    bool no_thread;
    sc_log *log;                /* may be NULL */
    int wake_fd;                /* eventfd: wake and close, any thread */
    int stop_fd;                /* eventfd: written by close, never read
                                   (pg.stop_fd) */

    /* Relay thread only (with no_thread: the run_once caller). */
    PGconn *conn;               /* NULL: DISCONNECTED */
    bool leader;                /* holds the advisory lock */
    bool listening;             /* LISTEN is in effect on the session */
    bool markers_ready;         /* MARKER_TOPIC exists, last marker read */
    sc_relay_cand cand;         /* see the top */
    bool b_marked;              /* the batch in hand appended its marker */
    int64_t b_lo, b_hi;         /* ... its id range */
    uint64_t b_marker;          /* ... the marker's log offset */
    uint32_t fail_commit;       /* opts.fail_before_commit_test left */
    unsigned pg_failures;       /* consecutive; backoff exponent */
    unsigned store_failures;    /* consecutive; backoff exponent */
    int64_t connect_at;         /* mono ms: next connection attempt */
    int64_t lead_at;            /* mono ms: next leadership attempt */
    int64_t batch_at;           /* mono ms: no batch before (gathering,
                                   or backoff after a store error) */
    int64_t pg_warned_at;       /* mono ms of the last connection warning */
    int64_t store_warned_at;    /* mono ms of the last store warning */
    bool was_down;              /* a connection attempt failed since the
                                   last success (log the recovery) */
    bool standby_logged;        /* "standing by" said for this session */
    uint64_t rng;               /* backoff jitter */
    char *ids;                  /* DELETE parameter "{1,2,...}" */
    size_t ids_cap;
    uint8_t *props;             /* BRK_PROPS_MAX bytes: a row's properties */
    uint8_t *rprops;            /* BRK_PROPS_MAX bytes: a rejected copy's */

    pthread_t thread;
    bool thread_started;
    atomic_bool stop;
    atomic_bool thread_done;    /* relay_main returned */

    pthread_mutex_t cancel_mu;  /* guards cancel; never held with mu */
    PGcancel *cancel;           /* conn's cancel handle, NULL without conn */

    pthread_mutex_t mu;         /* guards st */
    sc_relay_stats st;
};

/* ---- small helpers ---------------------------------------------------------- */

/* Deadlines are real time whatever clock the options carry: they become
 * poll() timeouts, which a test clock does not move. */
static int64_t mono_ms(const sc_relay *r)
{
    (void)r;
    const brk_clock *c = brk_clock_system();
    return c->mono_ns(c->ctx) / 1000000;
}

static double jitter(sc_relay *r)
{
    /* splitmix64: only spreads reconnects of replicas apart. */
    uint64_t z = (r->rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return (double)(z >> 11) / 9007199254740992.0;
}

static void fmt(char *out, size_t cap, const char *f, ...)
    __attribute__((format(printf, 3, 4)));

/* snprintf for messages, where cutting a long one short is fine. */
static void fmt(char *out, size_t cap, const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    vsnprintf(out, cap, f, ap);
    va_end(ap);
}

static void set_error(sc_relay *r, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Record a failed attempt: last_error and the error count. */
static void set_error(sc_relay *r, const char *fmt, ...)
{
    char buf[sizeof r->st.last_error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    sc_pg_one_line(buf);
    pthread_mutex_lock(&r->mu);
    memcpy(r->st.last_error, buf, sizeof buf);
    r->st.errors++;
    pthread_mutex_unlock(&r->mu);
}

static void set_state(sc_relay *r, bool connected, bool leader)
{
    pthread_mutex_lock(&r->mu);
    r->st.connected = connected;
    r->st.leader = leader;
    pthread_mutex_unlock(&r->mu);
}

static void add_notifies(sc_relay *r, uint64_t n)
{
    if (!n) return;
    pthread_mutex_lock(&r->mu);
    r->st.notifies += n;
    pthread_mutex_unlock(&r->mu);
}

/* The message of a failed result (or of the connection), one line. */
static void pg_message(PGconn *c, const PGresult *res, char *out, size_t cap)
{
    const char *m = res ? PQresultErrorMessage(res) : NULL;
    if (!m || !*m) m = c ? PQerrorMessage(c) : "no connection";
    fmt(out, cap, "%s", m && *m ? m : "unknown error");
    sc_pg_one_line(out);
}

/* Every round trip is sent asynchronously and waited for at most
 * statement_timeout + connect_timeout (sc_pg_wait_result): a backend that
 * stops answering while its kernel still ACKs defeats keepalives, and
 * statement_timeout runs in the stuck process itself.  A round trip that
 * times out returns NULL with the connection still busy; every caller's
 * failure path drops the session, which is what such a connection needs. */
static PGresult *await_result(const sc_relay *r, PGconn *c, int sent)
{
    if (!sent) return NULL;      /* could not send: the connection is gone */
    int64_t st = r->pg.statement_timeout_ms;
    int64_t wait = st > 0 ? st + (r->pg.connect_timeout_ms > 0
                                  ? r->pg.connect_timeout_ms : 5000) : 0;
    bool late = false;
    return sc_pg_wait_result(c, wait, &late);
}

/* A statement with no parameters and nothing from outside in it (BEGIN,
 * COMMIT, LISTEN ...), through the extended protocol like the rest. */
static PGresult *exec_fixed(const sc_relay *r, PGconn *c, const char *sql)
{
    return await_result(r, c, PQsendQueryParams(c, sql, 0, NULL, NULL, NULL,
                                                NULL, 0));
}

static bool exec_ok(const sc_relay *r, PGconn *c, const char *sql, char *why,
                    size_t cap)
{
    PGresult *res = exec_fixed(r, c, sql);
    bool ok = res && PQresultStatus(res) == PGRES_COMMAND_OK;
    if (!ok) pg_message(c, res, why, cap);
    PQclear(res);
    return ok;
}

/* A prepared statement on the session, bounded like the rest. */
static PGresult *exec_prepared(const sc_relay *r, const char *name, int n,
                               const char *const *values, const int *lengths,
                               const int *formats, int result_format)
{
    return await_result(r, r->conn,
                        PQsendQueryPrepared(r->conn, name, n, values, lengths,
                                            formats, result_format));
}

static void add_lookup(sc_relay *r)
{
    pthread_mutex_lock(&r->mu);
    r->st.lookups++;
    pthread_mutex_unlock(&r->mu);
}

static void set_cancel(sc_relay *r, PGcancel *c)
{
    pthread_mutex_lock(&r->cancel_mu);
    if (r->cancel) PQfreeCancel(r->cancel);
    r->cancel = c;
    pthread_mutex_unlock(&r->cancel_mu);
}

/* ---- candidates ------------------------------------------------------------ */

/* The batch in hand did not commit, or may not have: if it appended
 * anything, its rows are candidates from now on.  Flushed first, so that
 * lookups (which see what readers see) find what it appended; a flush
 * that fails leaves the store failed, refusing appends until reopened,
 * and its marker tells the next relay. */
static void batch_failed(sc_relay *r)
{
    if (!r->b_marked) return;
    r->b_marked = false;
    (void)brk_store_flush(r->store);
    sc_relay_cand_add(&r->cand, r->b_lo, r->b_hi, r->b_marker);
}

/* ---- sessions -------------------------------------------------------------- */

/* Close the session (releasing leadership) after a PostgreSQL failure and
 * schedule the next attempt with backoff. */
static void drop_session(sc_relay *r, const char *why)
{
    batch_failed(r);
    bool stopping = atomic_load(&r->stop), had = r->conn != NULL;
    if (r->conn) {
        set_cancel(r, NULL);
        if (r->leader && !stopping)
            sc_log_kv(r->log, API_LOG_WARN, "relay lost its PostgreSQL "
                      "session; leadership released", "error", why, NULL);
        PQfinish(r->conn);
        r->conn = NULL;
    }
    r->leader = false;
    r->listening = false;
    r->standby_logged = false;
    set_state(r, false, false);
    set_error(r, "PostgreSQL: %s", why);
    int64_t now = mono_ms(r);
    r->connect_at = now + sc_pg_backoff_ms(&r->pg, r->pg_failures, jitter(r));
    if (r->pg_failures < 64) r->pg_failures++;
    if (stopping) {
        if (had)
            sc_log_kv(r->log, API_LOG_INFO, "relay stopped in the middle of "
                      "a batch; its rows stay in PostgreSQL", "error", why,
                      NULL);
        return;
    }
    /* The first failure and then every WARN_EVERY_MS while it lasts. */
    if (!r->was_down || now - r->pg_warned_at >= WARN_EVERY_MS) {
        sc_log_kv(r->log, API_LOG_WARN, r->was_down
                  ? "relay still cannot use PostgreSQL; retrying"
                  : "relay cannot use PostgreSQL; retrying with backoff",
                  "error", why, NULL);
        r->pg_warned_at = now;
    }
    r->was_down = true;
}

/* Check that outbox.messages is there and ours to read and delete.
 * 0 ok, 78 (err says what to do), -1 a PostgreSQL failure (err). */
static int check_schema(const sc_relay *r, PGconn *c, char *err,
                        size_t errlen)
{
    PGresult *res = exec_fixed(r, c, SQL_CHECK);
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        char why[256];
        pg_message(c, res, why, sizeof why);
        fmt(err, errlen, "checking the outbox schema: %s", why);
        PQclear(res);
        return -1;
    }
    bool table = PQgetvalue(res, 0, 0)[0] == 't';
    bool usage = PQgetvalue(res, 0, 1)[0] == 't';
    bool sel = PQgetvalue(res, 0, 2)[0] == 't';
    bool del = PQgetvalue(res, 0, 3)[0] == 't';
    char user[128];
    fmt(user, sizeof user, "%s", PQgetvalue(res, 0, 4));
    PQclear(res);
    char where[300];
    sc_pg_describe(c, where, sizeof where);
    if (!table) {
        fmt(err, errlen, "database has no outbox schema (no table "
                 "outbox.messages at %s); " MIGRATE_HINT, where);
        return 78;
    }
    if (!usage || !sel || !del) {
        char missing[96] = "";
        if (!usage) strcat(missing, "USAGE on schema outbox");
        if (!sel || !del) {
            if (missing[0]) strcat(missing, ", ");
            strcat(missing, !sel && !del ? "SELECT, DELETE" : !sel ? "SELECT"
                                                                   : "DELETE");
            strcat(missing, " on outbox.messages");
        }
        fmt(err, errlen, "role \"%s\" lacks %s (at %s); grant the role "
                 "outbox_sidecar to it (GRANT outbox_sidecar TO \"%s\")",
                 user, missing, where, user);
        return 78;
    }
    return 0;
}

/* Prepare one statement.  0, 78 (the schema does not fit), -1 failure. */
static int prepare(const sc_relay *r, PGconn *c, const char *name,
                   const char *sql, int nparams,
                   char *err, size_t errlen)
{
    PGresult *res = await_result(r, c, PQsendPrepare(c, name, sql, nparams,
                                                     NULL));
    int rc = 0;
    if (!res || PQresultStatus(res) != PGRES_COMMAND_OK) {
        char why[256];
        pg_message(c, res, why, sizeof why);
        /* The server answered: the statement itself does not fit this
         * database (a column missing or of another type). */
        bool schema = sc_pg_result_fail(c, res) == SC_PG_OK;
        fmt(err, errlen, "%s%s%s", schema
                 ? "outbox.messages does not have the columns outboxd expects: "
                 : "", why, schema ? "; " MIGRATE_HINT : "");
        rc = schema ? 78 : -1;
    }
    PQclear(res);
    return rc;
}

/* DISCONNECTED -> STANDBY.  0, 78 (schema or grants; err), or -1 (err;
 * *fail says whether the server refused us). */
static int session_open(sc_relay *r, sc_pg_fail *fail, char *err,
                        size_t errlen)
{
    *fail = SC_PG_OK;
    PGconn *c = sc_pg_connect(&r->pg, fail, err, errlen);
    if (!c) return -1;
    int rc = check_schema(r, c, err, errlen);
    if (rc == 0)
        rc = prepare(r, c, STMT_SELECT, SC_RELAY_SQL_SELECT, 1, err, errlen);
    if (rc == 0) rc = prepare(r, c, STMT_DELETE, SQL_DELETE, 1, err, errlen);
    if (rc == 0) rc = prepare(r, c, STMT_LOCK, SQL_LOCK, 0, err, errlen);
    if (rc == 0) rc = prepare(r, c, STMT_CAND, SQL_CAND, 2, err, errlen);
    if (rc == 0) rc = prepare(r, c, STMT_UNLOCK, SQL_UNLOCK, 0, err, errlen);
    if (rc != 0) {
        PQfinish(c);
        return rc;
    }
    r->conn = c;
    set_cancel(r, PQgetCancel(c));      /* NULL (no memory): not cancellable */
    r->leader = false;
    r->standby_logged = false;
    r->pg_failures = 0;
    set_state(r, true, false);
    if (r->was_down) {
        char where[300];
        sc_pg_describe(c, where, sizeof where);
        sc_log_kv(r->log, API_LOG_INFO, "relay reconnected to PostgreSQL",
                  "database", where, NULL);
        r->was_down = false;
    }
    return 0;
}

/* STANDBY -> LEADER.  1 leads now, 0 another replica leads, -1 failure
 * (session dropped). */
static int try_lead(sc_relay *r)
{
    PGresult *res = exec_prepared(r, STMT_LOCK, 0, NULL, NULL, NULL, 0);
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        char why[256];
        pg_message(r->conn, res, why, sizeof why);
        PQclear(res);
        drop_session(r, why);
        return -1;
    }
    bool got = PQgetvalue(res, 0, 0)[0] == 't';
    PQclear(res);
    if (!got) {
        if (!r->standby_logged)
            sc_log_kv(r->log, API_LOG_INFO, "relay standing by: another "
                      "outboxd replica relays this database", NULL);
        r->standby_logged = true;
        return 0;
    }
    /* LISTEN after the lock, so a standby is never notified; the batch
     * that follows picks up whatever committed before it. */
    char why[256];
    if (!exec_ok(r, r->conn, "LISTEN " SC_RELAY_CHANNEL, why, sizeof why)) {
        drop_session(r, why);
        return -1;
    }
    r->leader = true;
    r->listening = true;
    set_state(r, true, true);
    if (r->store_failures < STEP_DOWN_AFTER)   /* not after each step-down */
        sc_log_kv(r->log, API_LOG_INFO, "relay is the leader: relaying "
                  "outbox.messages", NULL);
    return 1;
}

/* LISTEN (on) or UNLISTEN (off).  False when the session failed (dropped). */
static bool set_listening(sc_relay *r, bool on)
{
    if (r->listening == on) return true;
    char why[256];
    if (!exec_ok(r, r->conn, on ? "LISTEN " SC_RELAY_CHANNEL
                             : "UNLISTEN " SC_RELAY_CHANNEL, why, sizeof why)) {
        drop_session(r, why);
        return false;
    }
    r->listening = on;
    return true;
}

/* Read what the session has received and count notifications.  False
 * when the connection broke (the session is dropped). */
static bool drain_notifies(sc_relay *r, uint64_t *got)
{
    *got = 0;
    if (!r->conn) return false;
    if (!PQconsumeInput(r->conn)) {
        char why[256];
        pg_message(r->conn, NULL, why, sizeof why);
        drop_session(r, why);
        return false;
    }
    PGnotify *n;
    while ((n = PQnotifies(r->conn)) != NULL) {
        PQfreemem(n);
        (*got)++;
    }
    add_notifies(r, *got);
    return true;
}

/* ---- a batch ------------------------------------------------------------------ */

static bool ids_append(sc_relay *r, size_t *len, int64_t id)
{
    if (*len + 24 > r->ids_cap) {
        size_t nc = r->ids_cap ? r->ids_cap * 2 : 4096;
        char *p = realloc(r->ids, nc);
        if (!p) return false;
        r->ids = p;
        r->ids_cap = nc;
    }
    *len += (size_t)snprintf(r->ids + *len, r->ids_cap - *len, "%s%" PRId64,
                             *len ? "," : "{", id);
    return true;
}

/* The result of a failed statement in a batch: the session goes. */
static int pg_failed(sc_relay *r, PGresult *res)
{
    char why[256];
    pg_message(r->conn, res, why, sizeof why);
    PQclear(res);
    drop_session(r, why);
    return -1;
}

/* LEADER -> STANDBY after STEP_DOWN_AFTER store failures in a row: the
 * lock goes, so that a replica whose store works can take over instead of
 * standing by for as long as this one's store refuses rows (full disk,
 * I/O errors).  This one tries to lead again after its store backoff, and
 * no sooner than two poll intervals, so a standby (which retries every
 * poll interval) gets its chance; alone, it simply leads again.  False
 * when the session failed (dropped). */
static bool step_down(sc_relay *r)
{
    PGresult *res = exec_prepared(r, STMT_UNLOCK, 0, NULL, NULL, NULL, 0);
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        pg_failed(r, res);
        return false;
    }
    PQclear(res);
    if (!set_listening(r, false)) return false;
    r->leader = false;
    int64_t again = mono_ms(r) + 2 * r->poll_ms;
    r->lead_at = r->batch_at > again ? r->batch_at : again;
    set_state(r, true, false);
    if (r->store_failures == STEP_DOWN_AFTER)
        sc_log_kv(r->log, API_LOG_WARN, "relay steps down: its store keeps "
                  "refusing rows; another outboxd replica may relay them "
                  "meanwhile", NULL);
    return true;
}

/* A store error that may pass: roll back, back off.  Returns -2 (or -1 if
 * the rollback itself failed and the session is gone). */
static int store_failed(sc_relay *r, brk_status st, const char *what)
{
    const char *detail = brk_store_errstr(r->store);
    char why[256];
    fmt(why, sizeof why, "store: %s %s: %s%s%s", what,
             brk_status_name(st), brk_strerror(st), detail && *detail ? ": " : "",
             detail ? detail : "");
    batch_failed(r);
    int64_t now = mono_ms(r);
    r->batch_at = now + sc_pg_backoff_ms(&r->pg, r->store_failures, jitter(r));
    if (r->store_failures < 64) r->store_failures++;
    if (r->store_failures == 1 || now - r->store_warned_at >= WARN_EVERY_MS) {
        sc_log_kv(r->log, API_LOG_WARN, "relay cannot store rows; they stay "
                  "in PostgreSQL and are retried", "error", why, NULL);
        r->store_warned_at = now;
    }
    char pgwhy[256];
    if (!exec_ok(r, r->conn, "ROLLBACK", pgwhy, sizeof pgwhy)) {
        drop_session(r, pgwhy);         /* the rows stay all the same */
        return -1;
    }
    set_error(r, "%s", why);
    if (r->store_failures >= STEP_DOWN_AFTER && !step_down(r)) return -1;
    return -2;
}

/* Inside the batch's transaction, after its DELETE: is any candidate row
 * still in the table?  -1 on failure (session dropped). */
static int cand_left(sc_relay *r)
{
    char lo[24], hi[24];
    snprintf(lo, sizeof lo, "%" PRId64, r->cand.lo);
    snprintf(hi, sizeof hi, "%" PRId64, r->cand.hi);
    const char *pv[2] = { lo, hi };
    PGresult *res = exec_prepared(r, STMT_CAND, 2, pv, NULL, NULL, 0);
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1)
        return pg_failed(r, res);
    int left = PQgetvalue(res, 0, 0)[0] == 't';
    PQclear(res);
    return left;
}

/* One row of the batch: look it up when it is a candidate, else convert
 * and append it, or keep it aside when refused for good.  BRK_OK (*what
 * says which: 's'tored, 'd'uplicate, 'r'ejected), or the status of a
 * failure that may pass (*what names the step). */
static brk_status handle_row(sc_relay *r, const sc_relay_row *w, char *what,
                             brk_append_res *ar)
{
    brk_status st;
    if (r->cand.set && w->id >= r->cand.lo && w->id <= r->cand.hi) {
        brk_batch *b = NULL;
        add_lookup(r);
        st = brk_store_lookup_since(r->store, w->msg_id, r->cand.since, &b);
        brk_batch_free(b);
        if (st == BRK_OK) {
            *what = 'd';
            return BRK_OK;
        }
        if (st != BRK_NOTFOUND) {
            *what = 'l';
            return st;
        }
    }
    sc_relay_conv c;
    char reason[300] = "";
    *what = 'a';
    st = sc_relay_row_convert(w, r->props, &c, reason, sizeof reason);
    if (st == BRK_OK) {
        st = sc_relay_row_append(r->store, w, &c, r->props, ar);
        if (st == BRK_OK) {
            *what = 's';
        } else if (sc_relay_refused_for_good(st)) {
            const char *detail = brk_store_errstr(r->store);
            fmt(reason, sizeof reason, "refused by the store: %s%s%s",
                st == BRK_NOTFOUND ? "unknown topic (topic auto-creation is "
                "off)" : brk_strerror(st), detail && *detail ? ": " : "",
                detail ? detail : "");
        }
    }
    if (st != BRK_OK && sc_relay_refused_for_good(st)) {
        st = sc_relay_row_reject(r->store, r->log, r->rprops, w, &c, reason);
        if (st == BRK_OK) *what = 'r';
    }
    free(c.text);
    return st;
}

/* One batch on a leading session.  0 (committed; *handled rows, *full when
 * the batch was full), -1 PostgreSQL failure (session dropped), -2 store
 * failure (rolled back; r->batch_at set). */
static int run_batch(sc_relay *r, size_t *handled, bool *full)
{
    *handled = 0;
    *full = false;
    char why[256];
    if (!exec_ok(r, r->conn, "BEGIN", why, sizeof why)) {
        drop_session(r, why);
        return -1;
    }
    if (!r->markers_ready) {
        /* The first batch after open: cand from the last marker. */
        brk_status st = sc_relay_markers_start(r->store, r->log, &r->cand);
        if (st != BRK_OK) return store_failed(r, st, "reading the relay marker");
        r->markers_ready = true;
    }
    char lim[16];
    snprintf(lim, sizeof lim, "%u", (unsigned)r->batch);
    const char *pv[1] = { lim };
    PGresult *res = exec_prepared(r, STMT_SELECT, 1, pv, NULL, NULL, 1);
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK
        || PQnfields(res) != SC_RELAY_C_COUNT)
        return pg_failed(r, res);
    int n = PQntuples(res);
    sc_relay_row first, last;
    if (n > 0 && (!sc_relay_row_read(res, 0, &first)
                  || !sc_relay_row_read(res, n - 1, &last))) {
        PQclear(res);
        exec_ok(r, r->conn, "ROLLBACK", why, sizeof why);
        drop_session(r, "outbox.messages returned a row of an unexpected "
                     "shape; " MIGRATE_HINT);
        return -1;
    }
    if (n > 0) {
        brk_status st = sc_relay_marker_append(r->store, first.id, last.id,
                                               &r->cand, &r->b_marker);
        if (st != BRK_OK) {
            PQclear(res);
            return store_failed(r, st, "append marker");
        }
        /* Until COMMIT succeeds these rows may end up in the store
         * without being deleted (see batch_failed). */
        r->b_marked = true;
        r->b_lo = first.id;
        r->b_hi = last.id;
    }

    uint64_t stored = 0, dup = 0, rej = 0;
    int64_t newest_created = INT64_MIN, lag = 0;
    size_t ids_len = 0;
    for (int i = 0; i < n; i++) {
        sc_relay_row w;
        if (!sc_relay_row_read(res, i, &w)) {
            PQclear(res);
            exec_ok(r, r->conn, "ROLLBACK", why, sizeof why);
            drop_session(r, "outbox.messages returned a row of an unexpected "
                         "shape; " MIGRATE_HINT);
            return -1;
        }
        if (!ids_append(r, &ids_len, w.id)) {
            PQclear(res);
            return store_failed(r, BRK_NOMEM, "batch");
        }
        char what;
        brk_append_res ar;
        brk_status st = handle_row(r, &w, &what, &ar);
        if (st != BRK_OK) {
            PQclear(res);
            return store_failed(r, st, what == 'l' ? "lookup" : "append");
        }
        if (what == 'd') dup++;
        if (what == 'r') rej++;
        if (what == 's') {
            stored++;
            if (w.created_ms > newest_created) {
                newest_created = w.created_ms;
                lag = ar.store_ms - w.created_ms;
            }
        }
    }
    PQclear(res);
    *full = (uint32_t)n >= r->batch;

    if (n > 0) {
        /* Deleting the rows acknowledges them: durable first, whatever the
         * flush mode. */
        brk_status st = brk_store_flush(r->store);
        if (st != BRK_OK) return store_failed(r, st, "flush");
        r->ids[ids_len++] = '}';
        r->ids[ids_len] = '\0';
        const char *dv[1] = { r->ids };
        res = exec_prepared(r, STMT_DELETE, 1, dv, NULL, NULL, 0);
        if (!res || PQresultStatus(res) != PGRES_COMMAND_OK)
            return pg_failed(r, res);
        PQclear(res);
    }
    int left = r->cand.set ? cand_left(r) : 0;
    if (left < 0) return -1;
    if (r->fail_commit > 0 && n > 0) {
        r->fail_commit--;
        exec_ok(r, r->conn, "ROLLBACK", why, sizeof why);
        drop_session(r, "fail_before_commit_test: this batch fails before "
                     "its COMMIT");
        return -1;
    }
    if (!exec_ok(r, r->conn, "COMMIT", why, sizeof why)) {
        /* The outcome may be either: the rows become candidates. */
        drop_session(r, why);
        return -1;
    }
    r->b_marked = false;
    if (r->cand.set && !left) r->cand.set = false;
    r->store_failures = 0;
    r->batch_at = 0;
    int64_t now_ms = r->clock->now_ms(r->clock->ctx);
    pthread_mutex_lock(&r->mu);
    r->st.rows_stored += stored;
    r->st.rows_duplicate += dup;
    r->st.rows_rejected += rej;
    r->st.batches++;
    r->st.last_batch_ms = now_ms;
    if (stored) r->st.lag_ms = lag;
    r->st.last_error[0] = '\0';
    pthread_mutex_unlock(&r->mu);
    *handled = (size_t)n;
    return 0;
}

/* ---- the thread -------------------------------------------------------------- */

/* Wait until `deadline` (mono ms), a wake, or (watch_socket) input on the
 * session.  True when woken early by a notification or sc_relay_wake. */
static bool wait_until(sc_relay *r, int64_t deadline, bool watch_socket)
{
    int64_t left = deadline - mono_ms(r);
    if (left <= 0) return false;
    struct pollfd p[2] = { { .fd = r->wake_fd, .events = POLLIN } };
    nfds_t n = 1;
    if (watch_socket && r->conn && PQsocket(r->conn) >= 0) {
        p[1].fd = PQsocket(r->conn);
        p[1].events = POLLIN;
        n = 2;
    }
    int rc = poll(p, n, left > 600000 ? 600000 : (int)left);
    if (rc <= 0) return false;
    bool early = false;
    if (p[0].revents) {
        uint64_t v;
        if (read(r->wake_fd, &v, sizeof v) < 0 && errno != EAGAIN) {
            /* nothing to do: the next poll sees it again */
        }
        early = true;
    }
    if (n == 2 && p[1].revents) {
        uint64_t got;
        /* A broken session drops here; the caller's loop reconnects. */
        if (!drain_notifies(r, &got) || got > 0) early = true;
    }
    return early;
}

static void *relay_main(void *arg)
{
    sc_relay *r = arg;
    char err[512];
    while (!atomic_load(&r->stop)) {
        int64_t now = mono_ms(r);
        if (!r->conn) {
            if (now < r->connect_at) {
                wait_until(r, r->connect_at, false);
                continue;
            }
            sc_pg_fail fail;
            int rc = session_open(r, &fail, err, sizeof err);
            if (rc != 0) {
                if (rc == 78)
                    sc_log_kv(r->log, API_LOG_ERROR, "relay cannot use the "
                              "outbox schema", "error", err, NULL);
                drop_session(r, err);
                continue;
            }
            r->lead_at = 0;
        }
        if (!r->leader) {
            if (now < r->lead_at) {
                wait_until(r, r->lead_at, false);
                continue;
            }
            int rc = try_lead(r);
            if (rc == 0) r->lead_at = mono_ms(r) + r->poll_ms;
            if (rc != 1) continue;
        }
        if (now < r->batch_at) {
            /* Gathering: notifications change nothing until batch_at, so
             * leave them in the socket (one wake-up, not one per commit).
             * A store backoff drains them meanwhile. */
            wait_until(r, r->batch_at, r->store_failures > 0);
            continue;
        }
        size_t rows;
        bool full;
        int64_t started = mono_ms(r);
        int rc = run_batch(r, &rows, &full);
        if (rc != 0 || full) continue;
        if (rows > 0) {
            /* Busy: poll every GATHER_MS until a batch comes back empty,
             * unsubscribed, so that the server does not signal and send a
             * notification for every commit meanwhile (about 6 % of the
             * writers' throughput in relay_bench on 2 CPUs). */
            if (!set_listening(r, false)) continue;
            r->batch_at = started + GATHER_MS;
            continue;
        }
        if (!r->listening) {
            /* Idle again: listen, then look once more for rows committed
             * before LISTEN took effect. */
            if (!set_listening(r, true)) continue;
            continue;
        }
        r->batch_at = started + GATHER_MS;
        /* Notifications delivered while the batch ran may be for rows it
         * did not see: run another rather than wait. */
        uint64_t got = 0;
        if (!drain_notifies(r, &got) || got > 0) continue;
        wait_until(r, mono_ms(r) + r->poll_ms, true);
    }
    atomic_store(&r->thread_done, true);
    return NULL;
}

/* ---- public --------------------------------------------------------------------- */

void sc_relay_opts_init(sc_relay_opts *o)
{
    memset(o, 0, sizeof *o);
    sc_pg_opts_init(&o->pg);
    o->batch = 500;
    o->poll_interval_ms = 1000;
}

static void relay_free(sc_relay *r)
{
    if (!r) return;
    set_cancel(r, NULL);
    if (r->conn) PQfinish(r->conn);
    if (r->wake_fd >= 0) close(r->wake_fd);
    if (r->stop_fd >= 0) close(r->stop_fd);
    pthread_mutex_destroy(&r->mu);
    pthread_mutex_destroy(&r->cancel_mu);
    free(r->conninfo);
    free(r->password_file);
    free(r->application_name);
    free(r->ids);
    free(r->props);
    free(r->rprops);
    free(r);
}

static bool dup_opt(const char *in, char **copy, const char **slot)
{
    *copy = NULL;
    *slot = NULL;
    if (!in) return true;
    *copy = strdup(in);
    *slot = *copy;
    return *copy != NULL;
}

int sc_relay_open(sc_relay **out, const sc_relay_opts *o, char *err,
                  size_t errlen)
{
    *out = NULL;
    if (!o->store) {
        fmt(err, errlen, "relay: no store");
        return 78;
    }
    if (o->batch > SC_RELAY_BATCH_MAX) {
        fmt(err, errlen, "relay batch must be 1..%u (got %u)",
                 (unsigned)SC_RELAY_BATCH_MAX, (unsigned)o->batch);
        return 78;
    }
    sc_relay *r = calloc(1, sizeof *r);
    if (!r) {
        fmt(err, errlen, "relay: out of memory");
        return 70;
    }
    r->wake_fd = -1;
    r->stop_fd = -1;
    pthread_mutex_init(&r->mu, NULL);
    pthread_mutex_init(&r->cancel_mu, NULL);
    r->pg = o->pg;
    r->props = malloc(BRK_PROPS_MAX);
    r->rprops = malloc(BRK_PROPS_MAX);
    if (!r->props || !r->rprops
        || !dup_opt(o->pg.conninfo, &r->conninfo, &r->pg.conninfo)
        || !dup_opt(o->pg.password_file, &r->password_file, &r->pg.password_file)
        || !dup_opt(o->pg.application_name, &r->application_name,
                    &r->pg.application_name)) {
        relay_free(r);
        fmt(err, errlen, "relay: out of memory");
        return 70;
    }
    r->store = o->store;
    r->clock = o->pg.clock ? o->pg.clock : brk_store_clock(o->store);
    r->batch = o->batch ? o->batch : 500;
    r->poll_ms = o->poll_interval_ms > 0 ? o->poll_interval_ms : 1000;
    r->no_thread = o->no_thread;
    r->fail_commit = o->fail_before_commit_test;
    r->log = o->log;
    r->rng = (uint64_t)r->clock->mono_ns(r->clock->ctx) ^ (uint64_t)(uintptr_t)r
             ^ ((uint64_t)getpid() << 32);
    atomic_init(&r->stop, false);
    atomic_init(&r->thread_done, false);
    r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    r->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->wake_fd < 0 || r->stop_fd < 0) {
        fmt(err, errlen, "relay: eventfd: %s", strerror(errno));
        relay_free(r);
        return 70;
    }
    /* Replaces any stop_fd of the caller's: close is what stops a relay. */
    r->pg.stop_fd = r->stop_fd;

    /* The schema check: fatal when the server answers and says no. */
    sc_pg_fail fail;
    char why[512];
    int rc = session_open(r, &fail, why, sizeof why);
    if (rc == 78 || (rc != 0 && fail == SC_PG_REFUSED)) {
        fmt(err, errlen, "%s", why);
        relay_free(r);
        return 78;
    }
    if (rc != 0) {
        sc_log_kv(r->log, API_LOG_WARN, "relay cannot reach PostgreSQL yet; "
                  "it keeps trying", "error", why, NULL);
        set_error(r, "PostgreSQL: %s", why);
        r->was_down = true;
        r->pg_warned_at = mono_ms(r);
        r->connect_at = mono_ms(r) + sc_pg_backoff_ms(&r->pg, 0, jitter(r));
        r->pg_failures = 1;
    }
    if (!r->no_thread) {
        if (pthread_create(&r->thread, NULL, relay_main, r) != 0) {
            fmt(err, errlen, "relay: cannot start its thread");
            relay_free(r);
            return 70;
        }
        r->thread_started = true;
    }
    *out = r;
    return 0;
}

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

void sc_relay_close(sc_relay *r)
{
    if (!r) return;
    atomic_store(&r->stop, true);
    sc_relay_wake(r);
    /* Ends a connect in progress (see the top); never read, so it stays
     * readable for every later one too. */
    uint64_t one = 1;
    if (write(r->stop_fd, &one, sizeof one) < 0) {
        /* cannot fail short of a full counter, which is readable too */
    }
    if (r->thread_started) {
        /* Let the batch in hand finish; cancel one that is blocked in
         * PostgreSQL (see the top). */
        int64_t cancel_at = mono_ms(r) + CLOSE_GRACE_MS;
        bool said = false;
        while (!atomic_load(&r->thread_done)) {
            if (mono_ms(r) >= cancel_at) {
                pthread_mutex_lock(&r->cancel_mu);
                char cerr[256];
                if (r->cancel) PQcancel(r->cancel, cerr, sizeof cerr);
                pthread_mutex_unlock(&r->cancel_mu);
                if (!said)
                    sc_log_kv(r->log, API_LOG_WARN, "relay still busy after "
                              "the close grace period; cancelling its batch "
                              "(the rows stay in PostgreSQL)", NULL);
                said = true;
                cancel_at = mono_ms(r) + CLOSE_CANCEL_MS;
            }
            sleep_ms(5);
        }
        pthread_join(r->thread, NULL);
    }
    if (r->conn && r->leader)
        sc_log_kv(r->log, API_LOG_INFO, "relay stopped; leadership released",
                  NULL);
    relay_free(r);      /* PQfinish ends the session and its advisory lock */
}

int sc_relay_run_once(sc_relay *r, size_t *rows)
{
    size_t dummy;
    if (!rows) rows = &dummy;
    *rows = 0;
    if (!r->no_thread) {
        set_error(r, "sc_relay_run_once needs opts.no_thread");
        return -1;
    }
    if (!r->conn) {
        char err[512];
        sc_pg_fail fail;
        int rc = session_open(r, &fail, err, sizeof err);
        if (rc != 0) {
            drop_session(r, err);
            return -1;
        }
    }
    if (!r->leader) {
        int rc = try_lead(r);
        if (rc < 0) return -1;
        if (rc == 0) return 1;
    }
    uint64_t got;
    if (!drain_notifies(r, &got)) return -1;
    bool full;
    return run_batch(r, rows, &full) == 0 ? 0 : -1;
}

void sc_relay_wake(sc_relay *r)
{
    if (!r || r->wake_fd < 0) return;
    uint64_t one = 1;
    /* EAGAIN (counter full) still leaves it readable: the wake is there. */
    if (write(r->wake_fd, &one, sizeof one) < 0 && errno != EAGAIN) {
        /* nothing else to try */
    }
}

void sc_relay_get_stats(sc_relay *r, sc_relay_stats *out)
{
    pthread_mutex_lock(&r->mu);
    *out = r->st;
    pthread_mutex_unlock(&r->mu);
}
