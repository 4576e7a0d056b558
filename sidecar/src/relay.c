/*
 * relay.c - the outbox relay: rows of outbox.messages into the store (see
 * relay.h for the contract and sql/migrations/0001_outbox.sql for why
 * taking visible rows in id order loses nothing and keeps per-key order).
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
 * A batch: BEGIN; SELECT the oldest `batch` rows (binary results); per row
 * find out whether the store has it already, else convert and append it
 * (defer_sync), or keep a row the store refuses for good in
 * "__relay_rejected"; brk_store_flush (the DELETE is the acknowledgement,
 * so the rows must be durable first, in ASYNC mode too); DELETE the rows;
 * COMMIT.  Statistics change only once COMMIT has succeeded.
 *
 * Which rows are looked up.  brk_store_lookup scans every segment's id index
 * (store.h: "not for per-message hot paths"), so looking up every row would
 * make each row cost O(store size).  Only rows that can be in the store are
 * looked up.  A row is in the store without being deleted only if a relay on
 * this store appended it and its batch did not commit:
 *   - by this relay, in a batch that failed after appending (or whose
 *     COMMIT outcome is unknown): its rows all have ids <= the batch's
 *     largest id;
 *   - by an earlier relay on this store (before a crash, or closed after a
 *     failed batch): it appended only rows it had read, that is committed
 *     rows, and those not deleted since are all visible to our first
 *     session, so their ids are <= max(id) as read then.
 * `lookup_below` holds the largest such bound.  A row with a greater id was
 * not visible when the relay started and was never in a failed batch, so
 * it is appended without a lookup.  Lookups are thus limited to the backlog
 * found at start and to rows of failed batches (and late commits with ids
 * below those bounds).
 *
 * Mapping (relay.h): headers, a JSON object of strings, are checked with the
 * HTTP API's rules (names 1..255 printable ASCII bytes, string values of at
 * most 65535 bytes) and encoded as properties; body (jsonb) is parsed with
 * jansson and dumped compactly with the same flags and real precision rule
 * as the HTTP API, so the stored bytes equal what POST .../messages stores
 * for the same JSON value (jsonb orders object keys by length, then bytes,
 * and drops duplicates; what it gives is what is compacted).  jsonb prints
 * every number in plain decimal (1e20 as 100000000000000000000), see
 * widen_numbers for integers beyond 64 bits.  A body or headers the HTTP
 * API would refuse is refused here too.
 *
 * Rejected rows go to "__relay_rejected" with the row's msg_id, key, tag,
 * born time and body (the compact JSON when there is one, else the raw
 * text or bytes), and properties "reason", "topic" (the row's topic) and
 * "headers" (the row's headers as JSON text, so nothing is lost and no user
 * header can collide with ours).  When even that is refused (a body over
 * the store's limit), the body and headers are left out and "dropped" says
 * so.  Because the copy carries the row's msg_id, a retried batch finds it
 * like any stored row.
 *
 * Threads: `mu` guards `st` (the statistics) only.  Everything else that
 * changes is touched by one thread: the relay thread, or with no_thread
 * the caller of sc_relay_run_once.  `stop` is atomic; the wake fd is an
 * eventfd written by sc_relay_wake and sc_relay_close from any thread.
 */
#define _GNU_SOURCE
#include "relay.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "broker/uuid.h"

/* ---- SQL ------------------------------------------------------------------ */

#define STMT_SELECT "sc_relay_select"
#define STMT_DELETE "sc_relay_delete"
#define STMT_LOCK   "sc_relay_lock"
#define STMT_MAXID  "sc_relay_maxid"

/* Result columns of SQL_SELECT, read in binary. */
enum { C_ID, C_MSGID, C_TOPIC, C_KEY, C_TAG, C_HEADERS, C_BODY, C_BYTES,
       C_CREATED, C_COUNT };

static const char SQL_SELECT[] =
    "SELECT id, msg_id, topic, key, tag, headers::text, body::text,"
    " body_bytes, floor(extract(epoch FROM created_at) * 1000)::bigint"
    " FROM outbox.messages ORDER BY id LIMIT $1";

static const char SQL_DELETE[] =
    "DELETE FROM outbox.messages WHERE id = ANY($1::bigint[])";

/* The class (1869707362, 'obxb') is SC_RELAY_LOCK_CLASS. */
static const char SQL_LOCK[] =
    "SELECT pg_try_advisory_lock(1869707362, 0)";
_Static_assert(SC_RELAY_LOCK_CLASS == 1869707362, "SQL_LOCK names the class");

static const char SQL_MAXID[] =
    "SELECT coalesce(max(id), 0) FROM outbox.messages";

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

    /* Relay thread only (with no_thread: the run_once caller). */
    PGconn *conn;               /* NULL: DISCONNECTED */
    bool leader;                /* holds the advisory lock */
    bool listening;             /* LISTEN is in effect on the session */
    bool have_floor;            /* lookup_below includes max(id) at start */
    int64_t lookup_below;       /* rows with id <= this may be stored */
    int64_t inflight_max;       /* largest id of the batch in hand, 0 none */
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

static int64_t ld_be64(const char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | (uint8_t)p[i];
    return (int64_t)v;
}

/* A statement with no parameters and nothing from outside in it (BEGIN,
 * COMMIT, LISTEN ...), through the extended protocol like the rest. */
static PGresult *exec_fixed(PGconn *c, const char *sql)
{
    return PQexecParams(c, sql, 0, NULL, NULL, NULL, NULL, 0);
}

static bool exec_ok(PGconn *c, const char *sql, char *why, size_t cap)
{
    PGresult *res = exec_fixed(c, sql);
    bool ok = res && PQresultStatus(res) == PGRES_COMMAND_OK;
    if (!ok) pg_message(c, res, why, cap);
    PQclear(res);
    return ok;
}

/* ---- sessions -------------------------------------------------------------- */

/* A batch failed after its rows were read: some may be stored and not
 * deleted, and all have ids <= inflight_max (see the top). */
static void suspect_inflight(sc_relay *r)
{
    if (r->inflight_max > r->lookup_below) r->lookup_below = r->inflight_max;
    r->inflight_max = 0;
}

/* Close the session (releasing leadership) after a PostgreSQL failure and
 * schedule the next attempt with backoff. */
static void drop_session(sc_relay *r, const char *why)
{
    suspect_inflight(r);
    if (r->conn) {
        if (r->leader)
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
static int check_schema(PGconn *c, char *err, size_t errlen)
{
    PGresult *res = exec_fixed(c, SQL_CHECK);
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
static int prepare(PGconn *c, const char *name, const char *sql, int nparams,
                   char *err, size_t errlen)
{
    PGresult *res = PQprepare(c, name, sql, nparams, NULL);
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
    int rc = check_schema(c, err, errlen);
    if (rc == 0) rc = prepare(c, STMT_SELECT, SQL_SELECT, 1, err, errlen);
    if (rc == 0) rc = prepare(c, STMT_DELETE, SQL_DELETE, 1, err, errlen);
    if (rc == 0) rc = prepare(c, STMT_LOCK, SQL_LOCK, 0, err, errlen);
    if (rc == 0) rc = prepare(c, STMT_MAXID, SQL_MAXID, 0, err, errlen);
    if (rc == 0 && !r->have_floor) {
        /* Rows an earlier relay on this store may have stored without
         * deleting are visible now: look those up (see the top). */
        PGresult *res = PQexecPrepared(c, STMT_MAXID, 0, NULL, NULL, NULL, 0);
        if (res && PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1) {
            long long m = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
            if (m > r->lookup_below) r->lookup_below = m;
            r->have_floor = true;
        } else {
            char why[256];
            pg_message(c, res, why, sizeof why);
            fmt(err, errlen, "reading the newest outbox row: %s", why);
            rc = -1;
        }
        PQclear(res);
    }
    if (rc != 0) {
        PQfinish(c);
        return rc;
    }
    r->conn = c;
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
    PGresult *res = PQexecPrepared(r->conn, STMT_LOCK, 0, NULL, NULL, NULL, 0);
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
    if (!exec_ok(r->conn, "LISTEN " SC_RELAY_CHANNEL, why, sizeof why)) {
        drop_session(r, why);
        return -1;
    }
    r->leader = true;
    r->listening = true;
    set_state(r, true, true);
    sc_log_kv(r->log, API_LOG_INFO, "relay is the leader: relaying "
              "outbox.messages", NULL);
    return 1;
}

/* LISTEN (on) or UNLISTEN (off).  False when the session failed (dropped). */
static bool set_listening(sc_relay *r, bool on)
{
    if (r->listening == on) return true;
    char why[256];
    if (!exec_ok(r->conn, on ? "LISTEN " SC_RELAY_CHANNEL
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

/* ---- rows into messages ------------------------------------------------------- */

typedef struct row {
    int64_t id;
    const uint8_t *msg_id;      /* 16 bytes */
    const char *topic;          /* NUL-terminated */
    brk_bytes key, tag;
    const char *headers;        /* JSON text or NULL */
    size_t headers_len;
    const char *body;           /* JSON text (json) or bytes */
    size_t body_len;
    bool json;
    int64_t created_ms;
} row;

/* What a row becomes. */
typedef struct conv {
    size_t props_len;           /* in r->props */
    char *text;                 /* compact JSON body (free()), or NULL */
    size_t text_len;
} conv;

/* Read row i of a binary SELECT result.  False when its shape is not what
 * SQL_SELECT returns (a changed table). */
static bool read_row(const PGresult *res, int i, row *w)
{
    memset(w, 0, sizeof *w);
    if (PQgetlength(res, i, C_ID) != 8 || PQgetlength(res, i, C_MSGID) != 16
        || PQgetlength(res, i, C_CREATED) != 8 || PQgetisnull(res, i, C_TOPIC))
        return false;
    w->id = ld_be64(PQgetvalue(res, i, C_ID));
    w->msg_id = (const uint8_t *)PQgetvalue(res, i, C_MSGID);
    w->topic = PQgetvalue(res, i, C_TOPIC);
    if (!PQgetisnull(res, i, C_KEY))
        w->key = (brk_bytes){ PQgetvalue(res, i, C_KEY),
                              (size_t)PQgetlength(res, i, C_KEY) };
    if (!PQgetisnull(res, i, C_TAG))
        w->tag = (brk_bytes){ PQgetvalue(res, i, C_TAG),
                              (size_t)PQgetlength(res, i, C_TAG) };
    if (!PQgetisnull(res, i, C_HEADERS)) {
        w->headers = PQgetvalue(res, i, C_HEADERS);
        w->headers_len = (size_t)PQgetlength(res, i, C_HEADERS);
    }
    if (!PQgetisnull(res, i, C_BODY)) {
        w->json = true;
        w->body = PQgetvalue(res, i, C_BODY);
        w->body_len = (size_t)PQgetlength(res, i, C_BODY);
    } else if (!PQgetisnull(res, i, C_BYTES)) {
        w->body = PQgetvalue(res, i, C_BYTES);
        w->body_len = (size_t)PQgetlength(res, i, C_BYTES);
    } else {
        return false;           /* the table's CHECK forbids it */
    }
    w->created_ms = ld_be64(PQgetvalue(res, i, C_CREATED));
    return true;
}

/* jansson's parse flags of the HTTP API for request text. */
#define LOAD_FLAGS (JSON_DECODE_ANY | JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL)

static brk_status rejected(char *reason, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static brk_status rejected(char *reason, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, cap, fmt, ap);
    va_end(ap);
    return BRK_INVAL;
}

/* Same header-name rule as the HTTP API. */
static bool header_name_ok(const char *k, size_t n)
{
    if (n < 1 || n > 255) return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)k[i] < 0x21 || (unsigned char)k[i] > 0x7e)
            return false;
    return true;
}

/* Headers (JSON object text) -> r->props.  BRK_INVAL with a reason for
 * what the HTTP API would refuse too; BRK_NOMEM. */
static brk_status convert_headers(sc_relay *r, const row *w, size_t *len,
                                  char *reason, size_t cap)
{
    *len = 0;
    if (!w->headers) return BRK_OK;
    json_error_t je;
    json_t *h = json_loadb(w->headers, w->headers_len, LOAD_FLAGS, &je);
    if (!h)
        return json_error_code(&je) == json_error_out_of_memory
                   ? BRK_NOMEM
                   : rejected(reason, cap, "headers are not JSON: %s", je.text);
    brk_status st = BRK_OK;
    brk_prop *pp = NULL;
    size_t n = json_is_object(h) ? json_object_size(h) : 0;
    if (!json_is_object(h))
        st = rejected(reason, cap, "headers are not a JSON object");
    else if (n > BRK_PROPS_MAX / 5)
        st = rejected(reason, cap, "headers are larger than %u bytes encoded",
                      (unsigned)BRK_PROPS_MAX);
    else if (n > 0 && !(pp = calloc(n, sizeof *pp)))
        st = BRK_NOMEM;
    size_t i = 0;
    for (void *it = st == BRK_OK && n ? json_object_iter(h) : NULL;
         it && st == BRK_OK; it = json_object_iter_next(h, it), i++) {
        const char *k = json_object_iter_key(it);
        size_t kl = json_object_iter_key_len(it);
        json_t *v = json_object_iter_value(it);
        if (!header_name_ok(k, kl))
            st = rejected(reason, cap, "header name '%.64s' is not 1..255 "
                          "printable ASCII bytes", k);
        else if (!json_is_string(v))
            st = rejected(reason, cap, "header '%.64s' is not a string", k);
        else if (json_string_length(v) > 65535)
            st = rejected(reason, cap, "header '%.64s' is longer than 65535 "
                          "bytes", k);
        else {
            pp[i].key = (brk_bytes){ k, kl };
            pp[i].value = (brk_bytes){ json_string_value(v),
                                       json_string_length(v) };
        }
    }
    if (st == BRK_OK && n > 0) {
        st = brk_props_encode(pp, n, r->props, BRK_PROPS_MAX, len);
        if (st == BRK_TOOBIG || st == BRK_RANGE)
            st = rejected(reason, cap, "headers are larger than %u bytes "
                          "encoded", (unsigned)BRK_PROPS_MAX);
        else if (st != BRK_OK)
            st = rejected(reason, cap, "headers are not a valid set of "
                          "headers");
    }
    free(pp);
    json_decref(h);
    return st;
}

static bool has_real(const json_t *v)
{
    if (json_is_real(v)) return true;
    if (json_is_array(v)) {
        for (size_t i = 0; i < json_array_size(v); i++)
            if (has_real(json_array_get(v, i))) return true;
    } else if (json_is_object(v)) {
        const char *k;
        json_t *x;
        json_object_foreach((json_t *)v, k, x)
            if (has_real(x)) return true;
    }
    return false;
}

/* The HTTP API's compact text of v: JSON_COMPACT | JSON_ENCODE_ANY, reals
 * with the fewest digits (15, 16, else 17) that read back equal. */
static char *dump_compact(const json_t *v)
{
    if (has_real(v)) {
        for (int p = 15; p <= 16; p++) {
            char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY
                                        | JSON_REAL_PRECISION(p));
            if (!s) return NULL;
            json_t *back = json_loads(s, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
            bool same = back && json_equal(back, (json_t *)v);
            json_decref(back);
            if (same) return s;
            free(s);
        }
    }
    return json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_REAL_PRECISION(17));
}

/* Whether the integer token t[n] (an optional '-', then digits) is the
 * number the HTTP API would make of it: the double nearest to it, written
 * with the fewest digits that read back (as api_json_dump does), must
 * denote the very same number.  *rep gets that text. */
static bool int_is_exact_double(const char *t, size_t n, char *rep, size_t cap)
{
    char tok[340];
    if (n >= sizeof tok) return false;      /* beyond DBL_MAX anyway */
    memcpy(tok, t, n);
    tok[n] = '\0';
    double d = strtod(tok, NULL);
    if (!isfinite(d)) return false;
    int p;
    for (p = 15; p <= 17; p++) {
        snprintf(rep, cap, "%.*e", p - 1, d);
        if (strtod(rep, NULL) == d) break;
    }
    /* rep is [-]D.DDDDe[+-]XX: its digits M and exponent E denote
     * M * 10^(E - (len(M) - 1)); the token must be M followed by zeros. */
    const char *digits = tok[0] == '-' ? tok + 1 : tok;
    if ((tok[0] == '-') != (rep[0] == '-')) return false;
    const char *m = rep[0] == '-' ? rep + 1 : rep;
    char mant[24];
    size_t ml = 0;
    for (; *m && *m != 'e' && ml < sizeof mant - 1; m++)
        if (*m != '.') mant[ml++] = *m;
    mant[ml] = '\0';
    while (ml > 1 && mant[ml - 1] == '0') mant[--ml] = '\0';
    if (*m != 'e') return false;
    long e = strtol(m + 1, NULL, 10);
    size_t dl = strlen(digits);
    if (e < 0 || (size_t)e + 1 != dl || dl < ml || memcmp(digits, mant, ml) != 0)
        return false;
    for (size_t i = ml; i < dl; i++)
        if (digits[i] != '0') return false;
    return true;
}

/* jsonb writes every number in plain decimal, so a body written as 1e20
 * comes back as 100000000000000000000, an integer jansson (and with it the
 * HTTP API) cannot hold.  Rewrite such integers as the double the HTTP API
 * makes of 1e20 when that is the same number; refuse any other (it would
 * change).  Text inside strings is copied as it is.  *out is malloc'ed. */
static brk_status widen_numbers(const char *in, size_t len, char **out,
                                size_t *olen, char *reason, size_t cap)
{
    /* A rewritten token has at least 19 digits and becomes at most 24
     * characters: the text at most doubles. */
    char *b = malloc(2 * len + 64);
    if (!b) return BRK_NOMEM;
    size_t i = 0, o = 0;
    while (i < len) {
        char c = in[i];
        if (c == '"') {
            b[o++] = in[i++];
            while (i < len && in[i] != '"') {
                if (in[i] == '\\' && i + 1 < len) b[o++] = in[i++];
                b[o++] = in[i++];
            }
            if (i < len) b[o++] = in[i++];
            continue;
        }
        if (c != '-' && (c < '0' || c > '9')) {
            b[o++] = in[i++];
            continue;
        }
        size_t s = i;
        bool integral = true;
        while (i < len && in[i] && strchr("-+0123456789.eE", in[i])) {
            if (in[i] == '.' || in[i] == 'e' || in[i] == 'E') integral = false;
            i++;
        }
        char tok[32];
        bool fits = false;
        if (integral && i - s < sizeof tok) {
            memcpy(tok, in + s, i - s);
            tok[i - s] = '\0';
            errno = 0;
            (void)strtoll(tok, NULL, 10);
            fits = errno != ERANGE;
        }
        char rep[40];
        if (!integral || fits) {
            memcpy(b + o, in + s, i - s);
            o += i - s;
        } else if (int_is_exact_double(in + s, i - s, rep, sizeof rep)) {
            memcpy(b + o, rep, strlen(rep));
            o += strlen(rep);
        } else {
            free(b);
            return rejected(reason, cap, "body holds the number %.*s%s, "
                            "which is neither a 64-bit integer nor a double",
                            (int)(i - s > 40 ? 40 : i - s), in + s,
                            i - s > 40 ? "..." : "");
        }
    }
    *out = b;
    *olen = o;
    return BRK_OK;
}

/* A row's message fields.  BRK_INVAL (reason) for what cannot be stored,
 * BRK_NOMEM. */
static brk_status convert(sc_relay *r, const row *w, conv *c, char *reason,
                          size_t cap)
{
    memset(c, 0, sizeof *c);
    /* The body first: a row rejected for its headers keeps the compact
     * body in its rejected copy. */
    if (w->json) {
        json_error_t je;
        json_t *v = json_loadb(w->body, w->body_len, LOAD_FLAGS, &je);
        if (!v && json_error_code(&je) == json_error_numeric_overflow) {
            char *text = NULL;
            size_t tlen = 0;
            brk_status st = widen_numbers(w->body, w->body_len, &text, &tlen,
                                          reason, cap);
            if (st != BRK_OK) return st;
            v = json_loadb(text, tlen, LOAD_FLAGS, &je);
            free(text);
        }
        if (!v)
            return json_error_code(&je) == json_error_out_of_memory
                       ? BRK_NOMEM
                       : rejected(reason, cap, "body is JSON the broker "
                                  "cannot hold: %s", je.text);
        c->text = dump_compact(v);
        json_decref(v);
        if (!c->text) return BRK_NOMEM;
        c->text_len = strlen(c->text);  /* NULs in strings are \u0000 */
    }
    return convert_headers(r, w, &c->props_len, reason, cap);
}

/* Refusals that a retry cannot change. */
static bool refused_for_good(brk_status st)
{
    return st == BRK_INVAL || st == BRK_TOOBIG || st == BRK_NOTFOUND
        || st == BRK_READONLY || st == BRK_RANGE;
}

static brk_status append_row(sc_relay *r, const row *w, const conv *c,
                             brk_append_res *res)
{
    brk_append_req q;
    memset(&q, 0, sizeof q);
    q.topic = w->topic;
    q.queue = -1;
    q.key = w->key;
    q.tag = w->tag;
    q.props = (brk_bytes){ r->props, c->props_len };
    if (c->text) {
        q.body = (brk_bytes){ c->text, c->text_len };
        q.flags = BRK_RECF_BODY_JSON;
    } else {
        q.body = (brk_bytes){ w->body, w->body_len };
    }
    q.msg_id = w->msg_id;
    q.born_ms = w->created_ms ? w->created_ms : 1;
    q.defer_sync = true;        /* one brk_store_flush per batch */
    return brk_store_append(r->store, &q, res);
}

/* Keep a refused row in SC_RELAY_REJECT_TOPIC (see the top).  BRK_OK, or
 * the status of a failure that may pass. */
static brk_status reject_row(sc_relay *r, const row *w, const conv *c,
                             const char *reason)
{
    char id[BRK_UUID_STR_LEN + 1];
    brk_uuid_format(w->msg_id, id);
    sc_log_kv(r->log, API_LOG_ERROR, "relay rejected an outbox row; kept in "
              SC_RELAY_REJECT_TOPIC, "msg_id", id, "topic", w->topic,
              "reason", reason, NULL);
    brk_append_req q;
    memset(&q, 0, sizeof q);
    q.topic = SC_RELAY_REJECT_TOPIC;
    q.queue = -1;
    q.key = w->key;
    q.tag = w->tag;
    q.msg_id = w->msg_id;
    q.born_ms = w->created_ms ? w->created_ms : 1;
    q.allow_internal = true;
    q.defer_sync = true;
    brk_append_res res;
    brk_status st = BRK_INVAL;
    for (int full = 1; full >= 0; full--) {
        brk_prop pp[3];
        size_t n = 0;
        pp[n].key = (brk_bytes){ "reason", 6 };
        pp[n++].value = (brk_bytes){ reason, strlen(reason) };
        pp[n].key = (brk_bytes){ "topic", 5 };
        pp[n++].value = (brk_bytes){ w->topic, strlen(w->topic) };
        if (full && w->headers) {
            pp[n].key = (brk_bytes){ "headers", 7 };
            pp[n++].value = (brk_bytes){ w->headers, w->headers_len };
        } else if (!full) {
            pp[n].key = (brk_bytes){ "dropped", 7 };
            pp[n++].value = (brk_bytes){ "body, headers", 13 };
        }
        size_t len = 0;
        st = brk_props_encode(pp, n, r->rprops, BRK_PROPS_MAX, &len);
        if (st != BRK_OK) continue;     /* headers too long: drop them */
        q.props = (brk_bytes){ r->rprops, len };
        q.flags = 0;
        if (!full)
            q.body = (brk_bytes){ "", 0 };
        else if (c && c->text) {
            q.body = (brk_bytes){ c->text, c->text_len };
            q.flags = BRK_RECF_BODY_JSON;
        } else {
            q.body = (brk_bytes){ w->body, w->body_len };
        }
        st = brk_store_append(r->store, &q, &res);
        if (st == BRK_NOTFOUND) {
            /* Auto-creation is off: the topic is ours to create. */
            brk_status cs = brk_topic_create(r->store, SC_RELAY_REJECT_TOPIC, 1);
            if (cs != BRK_OK && cs != BRK_EXISTS) return cs;
            st = brk_store_append(r->store, &q, &res);
        }
        if (st == BRK_OK || !refused_for_good(st)) return st;
    }
    /* Even the bare record is refused: nothing more can be kept. */
    sc_log_kv(r->log, API_LOG_ERROR, "relay could not keep a rejected row",
              "msg_id", id, "status", brk_status_name(st), NULL);
    return BRK_OK;
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

/* A store error that may pass: roll back, back off.  Returns -2 (or -1 if
 * the rollback itself failed and the session is gone). */
static int store_failed(sc_relay *r, brk_status st, const char *what)
{
    const char *detail = brk_store_errstr(r->store);
    char why[256];
    fmt(why, sizeof why, "store: %s %s: %s%s%s", what,
             brk_status_name(st), brk_strerror(st), detail && *detail ? ": " : "",
             detail ? detail : "");
    suspect_inflight(r);
    int64_t now = mono_ms(r);
    r->batch_at = now + sc_pg_backoff_ms(&r->pg, r->store_failures, jitter(r));
    if (r->store_failures < 64) r->store_failures++;
    if (r->store_failures == 1 || now - r->store_warned_at >= WARN_EVERY_MS) {
        sc_log_kv(r->log, API_LOG_WARN, "relay cannot store rows; they stay "
                  "in PostgreSQL and are retried", "error", why, NULL);
        r->store_warned_at = now;
    }
    char pgwhy[256];
    if (!exec_ok(r->conn, "ROLLBACK", pgwhy, sizeof pgwhy)) {
        drop_session(r, pgwhy);         /* the rows stay all the same */
        return -1;
    }
    set_error(r, "%s", why);
    return -2;
}

/* One batch on a leading session.  0 (committed; *handled rows, *full when
 * the batch was full), -1 PostgreSQL failure (session dropped), -2 store
 * failure (rolled back; r->batch_at set). */
static int run_batch(sc_relay *r, size_t *handled, bool *full)
{
    *handled = 0;
    *full = false;
    char why[256];
    if (!exec_ok(r->conn, "BEGIN", why, sizeof why)) {
        drop_session(r, why);
        return -1;
    }
    char lim[16];
    snprintf(lim, sizeof lim, "%u", (unsigned)r->batch);
    const char *pv[1] = { lim };
    PGresult *res = PQexecPrepared(r->conn, STMT_SELECT, 1, pv, NULL, NULL, 1);
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQnfields(res) != C_COUNT) {
        pg_message(r->conn, res, why, sizeof why);
        PQclear(res);
        drop_session(r, why);
        return -1;
    }
    int n = PQntuples(res);
    /* Until COMMIT succeeds any of these rows may end up in the store
     * without being deleted (see suspect_inflight). */
    if (n > 0)
        r->inflight_max = PQgetlength(res, n - 1, C_ID) == 8
                              ? ld_be64(PQgetvalue(res, n - 1, C_ID))
                              : INT64_MAX;

    uint64_t stored = 0, dup = 0, rej = 0;
    int64_t newest_created = INT64_MIN, lag = 0;
    size_t ids_len = 0;
    for (int i = 0; i < n; i++) {
        row w;
        if (!read_row(res, i, &w)) {
            PQclear(res);
            exec_ok(r->conn, "ROLLBACK", why, sizeof why);
            drop_session(r, "outbox.messages returned a row of an unexpected "
                         "shape; " MIGRATE_HINT);
            return -1;
        }
        if (!ids_append(r, &ids_len, w.id)) {
            PQclear(res);
            return store_failed(r, BRK_NOMEM, "batch");
        }
        brk_status st;
        /* The ids <= the start-up bound are ordered before any later row, so
         * this test is true for a prefix of the batch only. */
        bool maybe_stored = w.id <= r->lookup_below;
        if (maybe_stored) {
            brk_batch *b = NULL;
            st = brk_store_lookup(r->store, w.msg_id, &b);
            brk_batch_free(b);
            if (st == BRK_OK) {
                dup++;
                continue;
            }
            if (st != BRK_NOTFOUND) {
                PQclear(res);
                return store_failed(r, st, "lookup");
            }
        }
        conv c;
        char reason[300] = "";
        brk_append_res ar;
        st = convert(r, &w, &c, reason, sizeof reason);
        if (st == BRK_OK) {
            st = append_row(r, &w, &c, &ar);
            if (st == BRK_OK) {
                stored++;
                if (w.created_ms > newest_created) {
                    newest_created = w.created_ms;
                    lag = ar.store_ms - w.created_ms;
                }
            } else if (refused_for_good(st)) {
                const char *detail = brk_store_errstr(r->store);
                fmt(reason, sizeof reason, "refused by the store: %s%s%s",
                         st == BRK_NOTFOUND ? "unknown topic (topic "
                         "auto-creation is off)" : brk_strerror(st),
                         detail && *detail ? ": " : "", detail ? detail : "");
            }
        }
        if (st != BRK_OK && refused_for_good(st)) {
            st = reject_row(r, &w, &c, reason);
            if (st == BRK_OK) rej++;
        }
        free(c.text);
        if (st != BRK_OK) {
            PQclear(res);
            return store_failed(r, st, "append");
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
        res = PQexecPrepared(r->conn, STMT_DELETE, 1, dv, NULL, NULL, 0);
        if (!res || PQresultStatus(res) != PGRES_COMMAND_OK) {
            pg_message(r->conn, res, why, sizeof why);
            PQclear(res);
            drop_session(r, why);
            return -1;
        }
        PQclear(res);
    }
    if (!exec_ok(r->conn, "COMMIT", why, sizeof why)) {
        /* The outcome may be either: the rows stay covered by lookup_below. */
        drop_session(r, why);
        return -1;
    }
    r->inflight_max = 0;
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
    if (r->conn) PQfinish(r->conn);
    if (r->wake_fd >= 0) close(r->wake_fd);
    pthread_mutex_destroy(&r->mu);
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
    pthread_mutex_init(&r->mu, NULL);
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
    r->log = o->log;
    r->rng = (uint64_t)r->clock->mono_ns(r->clock->ctx) ^ (uint64_t)(uintptr_t)r
             ^ ((uint64_t)getpid() << 32);
    atomic_init(&r->stop, false);
    r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->wake_fd < 0) {
        fmt(err, errlen, "relay: eventfd: %s", strerror(errno));
        relay_free(r);
        return 70;
    }

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

void sc_relay_close(sc_relay *r)
{
    if (!r) return;
    atomic_store(&r->stop, true);
    sc_relay_wake(r);
    if (r->thread_started) pthread_join(r->thread, NULL);
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
