/*
 * pgcheck.c - broker_core's checker answered by a PostgreSQL query (see
 * pgcheck.h for the contract: answers, pool, start-up rules).
 *
 * POOL
 * ====
 * pool_size slots, each a PGconn (or none) with the check query prepared
 * as "outboxd_check".  A slot is either free or held by exactly one check;
 * everything about a held slot (its connection, backoff, failure count) is
 * touched only by the check holding it, and handed over through the mutex
 * when the slot is released, so no PGconn is ever shared.
 *
 * A check takes the best free slot, waiting at most statement_timeout (or
 * connect_timeout when there is none) for one:
 *
 *   connected  >  disconnected and free to connect  >  in backoff
 *
 * so healthy connections are reused (the lowest first: the others connect
 * only under concurrency).  A slot in backoff is taken only when nothing
 * better is free and no busy slot holds a live connection (the server is
 * down as far as we know); the check then answers ERROR at once rather than
 * queueing behind a dead server.  While some busy slot's connection is
 * live, a check waits for it instead: one refused or lost connection must
 * not turn checks into ERRORs while the server answers on another.
 * Waiting is a loop on the condition variable with an absolute deadline
 * (spurious wake-ups just pick again); a release signals one waiter, or all
 * of them when the released slot went down (they may now take a slot in
 * backoff), and close() wakes all.
 *
 * Per slot:
 *
 *            connect ok (prepare ok)            query ok / query error /
 *   EMPTY ───────────────────────────► READY ◄─ statement_timeout
 *     ▲  │ connect failed                │
 *     │  ▼                               │ connection-class failure, or
 *   BACKOFF (failures+1, next attempt    │ no answer by the deadline
 *     │      after sc_pg_backoff_ms) ◄───┘ (PQfinish; backoff with
 *     │                                     failures = 0)
 *     └── time passes: the next check that takes the slot connects
 *
 * A connect of a slot that had failed before (a failed connect or a lost
 * connection) counts as a reconnect; a slot's first connect does not.
 *
 * Lost while idle.  A connection can die between checks (pg_terminate_
 * backend, idle_session_timeout, a pooler or firewall dropping idle
 * sessions, a server restart).  The check that finds out on a connection it
 * did not open itself reconnects and asks once more at once (a check only
 * reads, so asking twice is harmless); if that reconnect fails, or the
 * fresh connection fails too, it answers ERROR and the slot backs off.  Not
 * after a timeout: a server that does not answer gets no second wait.
 *
 * DEADLINES
 * =========
 * Every round trip (prepare, describe, the check) is sent with PQsend* and
 * awaited with sc_pg_wait_result for at most query_ms = statement_timeout +
 * connect_timeout.  statement_timeout alone cannot bound a check: it runs
 * in the server process, and a backend that is stopped or wedged (or a host
 * that froze while its kernel still ACKs) never cancels anything, while
 * the TCP connection looks healthy to keepalives and tcp_user_timeout.  At
 * the deadline the connection is dropped (the command is still in flight on
 * it) and the check answers ERROR, counted in stats.timeouts.  So a check
 * takes at most about connect_timeout (connect) + 2 x query_ms (prepare,
 * query), twice when it reconnects after a loss; close() waits for that.
 *
 * VALIDATION
 * ==========
 * The query is prepared with no parameter types (PostgreSQL infers $1's)
 * and described: one parameter, one column of a text type.  sc_pgcheck_open
 * does that on its first connection; when the server was unreachable then,
 * the first connection that works does it, and a query that does not fit
 * is logged at error level and makes every check answer ERROR without
 * asking (nothing is rolled back while the configuration is wrong).  It is
 * validated again once per backoff_max_ms (a pod may start before its
 * migration job has created the schema), and logged again each time it
 * still does not fit.  Once valid, each new connection only prepares.
 * Checks that come while the query is known not to fit answer ERROR
 * without taking a slot (also those that were waiting for one when it was
 * found), so a revalidation costs one connection per period, and it is
 * logged once per period even when concurrent checks found it at the same
 * time.
 *
 * A prepared statement that vanished (26000: a pooler's DISCARD ALL) or
 * whose result type changed under it (0A000: "cached plan must not change
 * result type" after an ALTER TABLE) is not retried forever: the slot is
 * dropped like a lost connection, and its next connect prepares afresh.
 *
 * LOGGING
 * =======
 * Outage-type trouble (connect failures, lost connections, query errors,
 * timeouts, garbage answers, pool exhaustion) is logged at warn, at most
 * one line per kind per 10 s by the instance's clock; the line says how
 * many were suppressed since the last one.  txids are order ids, possibly
 * personal data: they appear only at debug level; in the server's error
 * text and in a garbage answer quoted at warn every occurrence is replaced
 * by "<txid>" (on the whole text, before it is shortened or put on one
 * line, so no cut or folded piece of one survives).  The password is never
 * in any message (see pg.h).
 *
 * Locks: one mutex `mu` guards the slots' busy flags, the slots' fields of
 * free slots, the stats, the validation state and the log rate limiter; it
 * is never held across a libpq call or a log write.
 */
#define _GNU_SOURCE
#include "pgcheck.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define STMT_NAME    "outboxd_check"
#define LOG_EVERY_NS (10LL * 1000 * 1000 * 1000)

/* Text type OIDs (pg_type.h; fixed since forever). */
#define OID_NAME    19
#define OID_TEXT    25
#define OID_BPCHAR  1042
#define OID_VARCHAR 1043

/* Kinds of rate-limited log lines. */
enum { LK_CONNECT, LK_LOST, LK_RECONNECT, LK_QUERY, LK_TIMEOUT, LK_ANSWER,
       LK_POOL, LK_INVALID, LK_COUNT };

typedef struct pc_slot {
    /* Owned by the check holding the slot; under mu while free. */
    PGconn *conn;
    bool prepared;           /* "outboxd_check" exists on conn */
    bool had_failure;        /* next successful connect is a reconnect */
    unsigned failures;       /* consecutive failed connects */
    int64_t retry_at_ns;     /* clock mono: no connect before this */
    /* Under mu. */
    bool busy;
    bool up;                 /* counted in stats.connected */
} pc_slot;

/* Counters a check accumulates while holding a slot; added under mu when
 * it lets go. */
typedef struct pc_delta {
    uint64_t queries, timeouts, connect_failures, reconnects;
} pc_delta;

struct sc_pgcheck {
    sc_pg_opts pg;           /* strings below are our copies */
    char *conninfo, *password_file, *app_name, *query;
    bool default_query;
    const brk_clock *clock;
    sc_log *log;
    brk_checker checker;
    int64_t wait_ms;         /* longest wait for a free slot */
    int64_t query_ms;        /* longest wait for one round trip */
    _Atomic uint64_t rng;    /* splitmix64 state: jitter draws */

    pthread_mutex_t mu;
    pthread_cond_t slot_free;   /* signalled when a slot is released */
    pthread_cond_t idle;        /* broadcast when users drops to 0 */
    /* Under mu. */
    pc_slot slots[SC_PGCHECK_POOL_MAX];
    unsigned nslots;
    unsigned users;          /* checks inside check() */
    bool closing;
    int valid;               /* 0 not yet, 1 fits, -1 does not fit */
    int64_t revalidate_ns;   /* valid == -1: clock mono of the next try */
    char invalid_why[1024];  /* valid == -1: what is wrong */
    sc_pgcheck_stats st;
    int64_t log_last_ns[LK_COUNT];
    bool log_ever[LK_COUNT];
    uint64_t log_suppressed[LK_COUNT];
};

/* ---- small helpers -------------------------------------------------------- */

static int64_t mono_ns(const sc_pgcheck *c)
{
    return c->clock->mono_ns(c->clock->ctx);
}

/* A uniform draw in [0, 1), lock-free: each call claims its own point of
 * the Weyl sequence, then mixes it. */
static double jitter(sc_pgcheck *c)
{
    uint64_t z = atomic_fetch_add(&c->rng, 0x9E3779B97F4A7C15ull)
                 + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

/* in[0..n) into out[cap] with every occurrence of txid replaced by
 * "<txid>", cut to `keep` bytes of output (then "..." follows).  The whole
 * input is scanned, so a txid that straddles the cut is still caught. */
static void mask_txid(const char *in, size_t n, const char *txid, char *out,
                      size_t cap, size_t keep)
{
    size_t o = 0, tl = txid ? strlen(txid) : 0;
    if (keep + 4 > cap) keep = cap > 4 ? cap - 4 : 0;
    bool cut = false;
    for (size_t i = 0; i < n;) {
        if (o >= keep) {
            cut = true;
            break;
        }
        if (tl && n - i >= tl && memcmp(in + i, txid, tl) == 0) {
            static const char ph[] = "<txid>";
            for (size_t k = 0; k < sizeof ph - 1 && o < keep; k++) out[o++] = ph[k];
            i += tl;
        } else {
            out[o++] = in[i++];
        }
    }
    if (cut) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o] = '\0';
}

/* "SQLSTATE: message" of a failed result (or, with no result, libpq's
 * reason on the connection), on one line, the txid masked. */
static void result_why(PGconn *conn, const PGresult *r, const char *txid,
                       char *out, size_t cap)
{
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    const char *prim = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    const char *msg = prim;
    if (!msg && r && PQresultErrorMessage(r)[0]) msg = PQresultErrorMessage(r);
    if (!msg && conn && PQerrorMessage(conn)[0]) msg = PQerrorMessage(conn);
    if (!msg) msg = "no result (out of memory or connection lost)";
    char red[512];
    mask_txid(msg, strlen(msg), txid, red, sizeof red, 400);
    sc_pg_one_line(red);
    if (state)
        snprintf(out, cap, "%s: %s", state, red);
    else
        snprintf(out, cap, "%s", red);
}

static const char *type_name(Oid t)
{
    switch (t) {
    case 16: return "boolean";
    case 17: return "bytea";
    case 18: return "\"char\"";
    case 20: return "bigint";
    case 21: return "smallint";
    case 23: return "integer";
    case 114: return "json";
    case 700: return "real";
    case 701: return "double precision";
    case 1082: return "date";
    case 1114: return "timestamp";
    case 1184: return "timestamptz";
    case 1700: return "numeric";
    case 2278: return "void";
    case 2950: return "uuid";
    case 3802: return "jsonb";
    default: return NULL;
    }
}

static bool is_text_type(Oid t)
{
    return t == OID_TEXT || t == OID_VARCHAR || t == OID_BPCHAR || t == OID_NAME;
}

/* Write one warn/error line of `kind` unless one was written less than
 * 10 s ago; then only count it.  why may be NULL.  Not called with mu
 * held. */
static void log_limited(sc_pgcheck *c, int kind, api_log_level lvl,
                        const char *msg, const char *why)
{
    if (!c->log || !sc_log_enabled(c->log, lvl)) return;
    int64_t now = mono_ns(c);
    bool emit = false;
    uint64_t suppressed = 0;
    pthread_mutex_lock(&c->mu);
    if (!c->log_ever[kind] || now - c->log_last_ns[kind] >= LOG_EVERY_NS) {
        emit = true;
        suppressed = c->log_suppressed[kind];
        c->log_suppressed[kind] = 0;
        c->log_last_ns[kind] = now;
        c->log_ever[kind] = true;
    } else {
        c->log_suppressed[kind]++;
    }
    pthread_mutex_unlock(&c->mu);
    if (!emit) return;
    char n[24];
    snprintf(n, sizeof n, "%llu", (unsigned long long)suppressed);
    if (!why)
        sc_log_kv(c->log, lvl, msg, NULL);
    else if (suppressed)
        sc_log_kv(c->log, lvl, msg, "why", why, "suppressed", n, NULL);
    else
        sc_log_kv(c->log, lvl, msg, "why", why, NULL);
}

/* ---- prepare and validate ------------------------------------------------- */

typedef enum pv_result {
    PV_OK = 0,
    PV_CONN,                 /* the connection failed: retry later */
    PV_TIMEOUT,              /* no answer by the deadline: drop it */
    PV_INVALID,              /* the query does not fit (configuration) */
    PV_FAIL                  /* a known-good query did not prepare now */
} pv_result;

/* Wait for what `sent` (a PQsend* return) asked, by the query deadline. */
static PGresult *await(sc_pgcheck *c, PGconn *conn, int sent, bool *timed_out)
{
    *timed_out = false;
    if (!sent) return NULL;      /* libpq says why in PQerrorMessage */
    return sc_pg_wait_result(conn, c->query_ms, timed_out);
}

static void no_answer_why(sc_pgcheck *c, char *why, size_t cap)
{
    snprintf(why, cap, "no answer within %lld ms (statement_timeout + "
             "connect_timeout): the server or the network stopped responding",
             (long long)c->query_ms);
}

/* Prepare the query on conn and, when `validate`, describe it and check
 * its shape.  On failure why[] says what is wrong, in the words of the
 * start-up error. */
static pv_result prepare_query(sc_pgcheck *c, PGconn *conn, bool validate,
                               char *why, size_t cap)
{
    bool timed_out;
    PGresult *r = await(c, conn, PQsendPrepare(conn, STMT_NAME, c->query, 0, NULL),
                        &timed_out);
    if (timed_out) {
        no_answer_why(c, why, cap);
        return PV_TIMEOUT;
    }
    if (!r || PQresultStatus(r) != PGRES_COMMAND_OK) {
        pv_result pv;
        char detail[600];
        result_why(conn, r, NULL, detail, sizeof detail);
        const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
        if (sc_pg_result_fail(conn, r) != SC_PG_OK) {
            pv = PV_CONN;
            snprintf(why, cap, "%s", detail);
        } else if (!validate) {
            pv = PV_FAIL;
            snprintf(why, cap, "check_query: does not prepare: %s", detail);
        } else if (c->default_query && state
                   && (strcmp(state, "42883") == 0 || strcmp(state, "3F000") == 0
                       || strcmp(state, "42P01") == 0)) {
            pv = PV_INVALID;
            snprintf(why, cap, "database has no outbox schema; run `outboxd db "
                     "migrate` (%s)", detail);
        } else if (c->default_query && state && strcmp(state, "42501") == 0) {
            pv = PV_INVALID;
            snprintf(why, cap, "check_query: does not prepare: %s (grant the "
                     "role outbox_sidecar to outboxd's database user)", detail);
        } else {
            pv = PV_INVALID;
            snprintf(why, cap, "check_query: does not prepare: %s", detail);
        }
        PQclear(r);
        return pv;
    }
    PQclear(r);
    if (!validate) return PV_OK;

    PGresult *d = await(c, conn, PQsendDescribePrepared(conn, STMT_NAME), &timed_out);
    if (timed_out) {
        no_answer_why(c, why, cap);
        return PV_TIMEOUT;
    }
    if (!d || PQresultStatus(d) != PGRES_COMMAND_OK) {
        char detail[600];
        result_why(conn, d, NULL, detail, sizeof detail);
        pv_result pv = sc_pg_result_fail(conn, d) != SC_PG_OK ? PV_CONN : PV_INVALID;
        snprintf(why, cap, "%s%s", pv == PV_INVALID
                 ? "check_query: cannot be described: " : "", detail);
        PQclear(d);
        return pv;
    }
    pv_result pv = PV_OK;
    int np = PQnparams(d), nf = PQnfields(d);
    if (np != 1) {
        pv = PV_INVALID;
        snprintf(why, cap, "check_query: must take exactly one parameter, $1 = "
                 "the txid (it takes %d)", np);
    } else if (nf != 1) {
        pv = PV_INVALID;
        snprintf(why, cap, "check_query: must return one text column (it "
                 "returns %d columns)", nf);
    } else if (!is_text_type(PQftype(d, 0))) {
        pv = PV_INVALID;
        const char *tn = type_name(PQftype(d, 0));
        if (tn)
            snprintf(why, cap, "check_query: must return one text column (it "
                     "returns %s; cast it with ::text)", tn);
        else
            snprintf(why, cap, "check_query: must return one text column (it "
                     "returns type OID %u; cast it with ::text)",
                     (unsigned)PQftype(d, 0));
    } else if (!is_text_type(PQparamtype(d, 0)) && c->log) {
        /* Fits, but a txid that does not convert to $1's type will be a
         * query error (ERROR, retried forever): say so once. */
        const char *tn = type_name(PQparamtype(d, 0));
        char t[32];
        if (!tn) {
            snprintf(t, sizeof t, "OID %u", (unsigned)PQparamtype(d, 0));
            tn = t;
        }
        sc_log_kv(c->log, API_LOG_WARN, "check_query: $1 is not of a text type; "
                  "txids that do not convert to it answer ERROR",
                  "type", tn, NULL);
    }
    PQclear(d);
    return pv;
}

/* ---- slots ---------------------------------------------------------------- */

/* After a failed connect: count it and wait longer before the next one. */
static void slot_connect_failed(sc_pgcheck *c, pc_slot *s)
{
    s->had_failure = true;
    s->failures++;
    s->retry_at_ns = mono_ns(c)
                     + sc_pg_backoff_ms(&c->pg, s->failures, jitter(c)) * 1000000;
}

/* After a connection-class failure: drop it; the first reconnect waits the
 * minimum backoff (the server may be restarting). */
static void slot_break(sc_pgcheck *c, pc_slot *s)
{
    PQfinish(s->conn);
    s->conn = NULL;
    s->prepared = false;
    s->had_failure = true;
    s->failures = 0;
    s->retry_at_ns = mono_ns(c) + sc_pg_backoff_ms(&c->pg, 0, jitter(c)) * 1000000;
}

/* The query does not fit: every check answers ERROR until the next
 * validation, one backoff_max_ms from now. */
static void mark_invalid(sc_pgcheck *c, const char *why)
{
    int64_t now = mono_ns(c);
    pthread_mutex_lock(&c->mu);
    /* A concurrent check may have found the same a moment ago: one line
     * and one period for both. */
    bool news = !(c->valid == -1 && now < c->revalidate_ns);
    if (news) {
        c->valid = -1;
        c->revalidate_ns = now + sc_pg_backoff_ms(&c->pg, 64, 0.999) * 1000000;
        snprintf(c->invalid_why, sizeof c->invalid_why, "%s", why);
    }
    pthread_mutex_unlock(&c->mu);
    if (news && c->log)
        sc_log_kv(c->log, API_LOG_ERROR, "check-back query does not fit; every "
                  "check-back answers ERROR until it does", "why", why, NULL);
}

/* Connect the held slot s (past its backoff, or the one retry after a
 * loss); slot_prepare follows.  False (and the slot in backoff) when the
 * connect failed. */
static bool slot_connect(sc_pgcheck *c, pc_slot *s, pc_delta *d)
{
    char why[600];
    sc_pg_fail fail;
    PGconn *conn = sc_pg_connect(&c->pg, &fail, why, sizeof why);
    if (!conn) {
        d->connect_failures++;
        slot_connect_failed(c, s);
        log_limited(c, LK_CONNECT, API_LOG_WARN,
                    "database unreachable; check-backs answer ERROR and are "
                    "retried", why);
        return false;
    }
    if (s->had_failure) {
        d->reconnects++;
        log_limited(c, LK_RECONNECT, API_LOG_INFO, "reconnected to the database",
                    NULL);
    }
    s->conn = conn;
    s->had_failure = false;
    s->failures = 0;
    s->retry_at_ns = 0;
    s->prepared = false;
    return true;
}

/* What a step on a held slot came to. */
typedef enum step {
    STEP_OK = 0,
    STEP_NO,                 /* cannot answer now (ERROR), nothing to retry */
    STEP_LOST                /* the connection died (not a timeout): the
                                slot is broken, a fresh one may answer */
} step;

/* Log a lost connection and break the slot. */
static step lost(sc_pgcheck *c, pc_slot *s, const char *why)
{
    slot_break(c, s);
    log_limited(c, LK_LOST, API_LOG_WARN, "lost the database connection; "
                "reconnecting (check-backs answer ERROR while it is down)", why);
    return STEP_LOST;
}

/* Drop the slot's connection after a round trip got no answer by the
 * deadline (it is still in flight on that connection). */
static void no_answer(sc_pgcheck *c, pc_slot *s, pc_delta *d, const char *why)
{
    d->timeouts++;
    slot_break(c, s);
    log_limited(c, LK_TIMEOUT, API_LOG_WARN, "the database gave no answer in "
                "time; dropped the connection, answering ERROR (retried)", why);
}

/* Prepare on the held, connected slot s. */
static step slot_prepare(sc_pgcheck *c, pc_slot *s, pc_delta *d)
{
    pthread_mutex_lock(&c->mu);
    bool validate = c->valid != 1;
    /* Found not to fit by a concurrent check just now: not again. */
    bool known_bad = c->valid == -1 && mono_ns(c) < c->revalidate_ns;
    pthread_mutex_unlock(&c->mu);
    if (known_bad) return STEP_NO;
    char why[700];
    pv_result pv = prepare_query(c, s->conn, validate, why, sizeof why);
    switch (pv) {
    case PV_OK: {
        s->prepared = true;
        bool was_invalid = false;
        if (validate) {
            pthread_mutex_lock(&c->mu);
            was_invalid = c->valid == -1;
            c->valid = 1;
            pthread_mutex_unlock(&c->mu);
        }
        if (was_invalid && c->log)
            sc_log_kv(c->log, API_LOG_INFO, "check-back query fits now", NULL);
        return STEP_OK;
    }
    case PV_CONN:
        return lost(c, s, why);
    case PV_TIMEOUT:
        no_answer(c, s, d, why);
        return STEP_NO;
    case PV_INVALID:
        mark_invalid(c, why);
        PQfinish(s->conn);
        s->conn = NULL;
        return STEP_NO;
    case PV_FAIL:
    default:
        log_limited(c, LK_QUERY, API_LOG_WARN, "check-back query failed; "
                    "answering ERROR (retried)", why);
        return STEP_NO;
    }
}

/* ---- the check ------------------------------------------------------------ */

/* The free slot to use, best first (see the top of the file); NULL when
 * all are held.  Under mu. */
static pc_slot *pick(sc_pgcheck *c, int64_t now)
{
    pc_slot *best = NULL;
    int best_score = 0;
    bool live_busy = false;
    for (unsigned i = 0; i < c->nslots; i++) {
        pc_slot *s = &c->slots[i];
        if (s->busy) {
            live_busy |= s->up;
            continue;
        }
        int score = s->conn ? 3 : now >= s->retry_at_ns ? 2 : 1;
        if (score > best_score) {
            best = s;
            best_score = score;
            if (score == 3) break;
        }
    }
    /* In backoff: only when no connection is known to work. */
    if (best_score == 1 && live_busy) return NULL;
    return best;
}

static void deadline_after(struct timespec *ts, int64_t ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += (time_t)(ms / 1000);
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* commit / committed / rollback / rolled_back / pending, ignoring case and
 * surrounding ASCII blanks; ERROR for anything else. */
static brk_check_result map_answer(const char *v, size_t n)
{
    static const char blanks[] = " \t\n\r\f\v";
    while (n && strchr(blanks, v[0])) { v++; n--; }
    while (n && strchr(blanks, v[n - 1])) n--;
    static const struct { const char *word; brk_check_result res; } words[] = {
        { "commit", BRK_CHECK_COMMIT },     { "committed", BRK_CHECK_COMMIT },
        { "rollback", BRK_CHECK_ROLLBACK }, { "rolled_back", BRK_CHECK_ROLLBACK },
        { "pending", BRK_CHECK_UNKNOWN },
    };
    for (size_t i = 0; i < sizeof words / sizeof words[0]; i++)
        if (strlen(words[i].word) == n && strncasecmp(v, words[i].word, n) == 0)
            return words[i].res;
    return BRK_CHECK_ERROR;
}

/* Ask the database on the held, ready slot s; *st says whether the
 * connection died under it. */
static brk_check_result run_query(sc_pgcheck *c, pc_slot *s, const char *txid,
                                  pc_delta *d, step *st)
{
    *st = STEP_OK;
    const char *vals[1] = { txid };
    bool timed_out;
    PGresult *r = await(c, s->conn, PQsendQueryPrepared(s->conn, STMT_NAME, 1,
                                                        vals, NULL, NULL, 0),
                        &timed_out);
    d->queries++;
    brk_check_result res = BRK_CHECK_ERROR;
    char why[700];
    if (timed_out) {
        no_answer_why(c, why, sizeof why);
        no_answer(c, s, d, why);
        *st = STEP_NO;
    } else if (r && PQresultStatus(r) == PGRES_TUPLES_OK) {
        int rows = PQntuples(r);
        if (rows == 0) {
            res = BRK_CHECK_UNKNOWN;
        } else if (rows > 1 || PQnfields(r) != 1) {
            snprintf(why, sizeof why, "the query returned %d rows of %d columns; "
                     "at most one row of one column is allowed", rows, PQnfields(r));
            log_limited(c, LK_ANSWER, API_LOG_WARN, "check-back query answered "
                        "nonsense; answering ERROR", why);
        } else if (PQgetisnull(r, 0, 0)) {
            res = BRK_CHECK_UNKNOWN;
        } else {
            const char *v = PQgetvalue(r, 0, 0);
            size_t n = (size_t)PQgetlength(r, 0, 0);
            res = map_answer(v, n);
            if (res == BRK_CHECK_ERROR) {
                /* The answer may quote the txid (a query answering with
                 * the order's own fields). */
                char shown[128];
                mask_txid(v, n, txid, shown, sizeof shown, 64);
                snprintf(why, sizeof why, "answer '%s' is none of commit, "
                         "committed, rollback, rolled_back, pending", shown);
                log_limited(c, LK_ANSWER, API_LOG_WARN, "check-back query answered "
                            "nonsense; answering ERROR", why);
            }
        }
    } else {
        result_why(s->conn, r, txid, why, sizeof why);
        if (sc_pg_result_fail(s->conn, r) != SC_PG_OK) {
            *st = lost(c, s, why);
        } else if (sc_pg_is_timeout(r)) {
            d->timeouts++;
            log_limited(c, LK_TIMEOUT, API_LOG_WARN, "check-back query hit "
                        "statement_timeout; answering ERROR (retried)", why);
        } else {
            const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
            /* The statement vanished or its plan no longer fits (see the
             * top of the file): start this slot afresh. */
            if (state && (strcmp(state, "26000") == 0 || strcmp(state, "0A000") == 0))
                slot_break(c, s);
            log_limited(c, LK_QUERY, API_LOG_WARN, "check-back query failed; "
                        "answering ERROR (retried)", why);
        }
    }
    PQclear(r);
    return res;
}

static const char *answer_name(brk_check_result r)
{
    switch (r) {
    case BRK_CHECK_COMMIT: return "commit";
    case BRK_CHECK_ROLLBACK: return "rollback";
    case BRK_CHECK_UNKNOWN: return "unknown";
    default: return "error";
    }
}

/* Whether the query is known not to fit and not yet due to be validated
 * again.  Under mu. */
static bool known_invalid(sc_pgcheck *c)
{
    return c->valid < 0 && mono_ns(c) < c->revalidate_ns;
}

/* Take a slot for a check (marked busy), or NULL: *invalid when the query
 * is known not to fit, *pool_timeout when none came free in time, neither
 * when closing.  Under mu. */
static pc_slot *acquire(sc_pgcheck *c, bool *invalid, bool *pool_timeout)
{
    *invalid = *pool_timeout = false;
    struct timespec dl;
    deadline_after(&dl, c->wait_ms);
    bool last_try = false;
    for (;;) {
        if (c->closing) return NULL;
        /* Also after a wait: the query may have been found not to fit
         * meanwhile. */
        if (known_invalid(c)) {
            *invalid = true;
            return NULL;
        }
        pc_slot *s = pick(c, mono_ns(c));
        if (s) {
            s->busy = true;
            return s;
        }
        if (last_try) {
            *pool_timeout = true;
            return NULL;
        }
        /* Spurious wake-ups and lost races just go round again. */
        if (pthread_cond_timedwait(&c->slot_free, &c->mu, &dl) == ETIMEDOUT)
            last_try = true;
    }
}

/* Connect (when the slot has no connection), prepare, ask; after a loss
 * on a connection this check did not open, once more on a fresh one (see
 * "Lost while idle"). */
static brk_check_result ask_on(sc_pgcheck *c, pc_slot *s, const char *txid,
                               pc_delta *d)
{
    bool fresh = false;      /* this check opened the slot's connection */
    bool retry = false;      /* the one retry after a loss */
    for (;;) {
        if (!s->conn) {
            /* In backoff: answer at once, the server was just found dead.
             * The retry after a loss connects at once. */
            if (!retry && mono_ns(c) < s->retry_at_ns) return BRK_CHECK_ERROR;
            if (!slot_connect(c, s, d)) return BRK_CHECK_ERROR;
            fresh = true;
        }
        step st = STEP_OK;
        if (!s->prepared) st = slot_prepare(c, s, d);
        brk_check_result res = BRK_CHECK_ERROR;
        if (st == STEP_OK) res = run_query(c, s, txid, d, &st);
        if (st != STEP_LOST || fresh) return res;
        retry = true;
    }
}

static brk_check_result pc_check(void *ctx, const brk_check_req *req)
{
    sc_pgcheck *c = ctx;
    pc_delta d = { 0 };
    brk_check_result res = BRK_CHECK_ERROR;
    bool invalid, pool_timeout;

    pthread_mutex_lock(&c->mu);
    c->users++;
    pc_slot *s = acquire(c, &invalid, &pool_timeout);
    pthread_mutex_unlock(&c->mu);

    if (s) {
        res = ask_on(c, s, req->txid, &d);
    } else if (invalid) {
        char why[1100];
        pthread_mutex_lock(&c->mu);
        snprintf(why, sizeof why, "%s", c->invalid_why);
        pthread_mutex_unlock(&c->mu);
        log_limited(c, LK_INVALID, API_LOG_ERROR, "check-back query does not "
                    "fit; answering ERROR", why);
    } else if (pool_timeout) {
        char why[96];
        snprintf(why, sizeof why, "all %u connections busy for %lld ms",
                 c->nslots, (long long)c->wait_ms);
        log_limited(c, LK_POOL, API_LOG_WARN, "no free check-back connection; "
                    "answering ERROR (retried)", why);
    }

    if (c->log && sc_log_enabled(c->log, API_LOG_DEBUG))
        sc_log_kv(c->log, API_LOG_DEBUG, "check-back", "txid", req->txid,
                  "answer", answer_name(res), NULL);

    pthread_mutex_lock(&c->mu);
    if (s) {
        bool up = s->conn != NULL;
        bool went_down = s->up && !up;
        if (up != s->up) {
            if (up) c->st.connected++;
            else c->st.connected--;
            s->up = up;
        }
        s->busy = false;
        /* Went down: every waiter may now take a slot in backoff (pick). */
        if (went_down) pthread_cond_broadcast(&c->slot_free);
        else pthread_cond_signal(&c->slot_free);
    }
    c->st.queries += d.queries;
    c->st.timeouts += d.timeouts;
    c->st.connect_failures += d.connect_failures;
    c->st.reconnects += d.reconnects;
    c->st.answers[res]++;
    if (--c->users == 0 && c->closing) pthread_cond_broadcast(&c->idle);
    pthread_mutex_unlock(&c->mu);
    return res;
}

/* ---- lifecycle ------------------------------------------------------------ */

void sc_pgcheck_opts_init(sc_pgcheck_opts *o)
{
    memset(o, 0, sizeof *o);
    sc_pg_opts_init(&o->pg);
    o->pool_size = 2;
}

static char *dup_or_null(const char *s, bool *nomem)
{
    if (!s) return NULL;
    char *d = strdup(s);
    if (!d) *nomem = true;
    return d;
}

static void free_all(sc_pgcheck *c)
{
    for (unsigned i = 0; i < c->nslots; i++)
        if (c->slots[i].conn) PQfinish(c->slots[i].conn);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->slot_free);
    pthread_cond_destroy(&c->idle);
    free(c->conninfo);
    free(c->password_file);
    free(c->app_name);
    free(c->query);
    free(c);
}

int sc_pgcheck_open(sc_pgcheck **out, const sc_pgcheck_opts *o, char *err,
                    size_t errlen)
{
    *out = NULL;
    if (err && errlen) err[0] = '\0';
    unsigned pool = o->pool_size ? o->pool_size : 2;
    if (pool > SC_PGCHECK_POOL_MAX) {
        snprintf(err, errlen, "check-back pool size must be 1..%d (got %u)",
                 SC_PGCHECK_POOL_MAX, o->pool_size);
        return 78;
    }
    sc_pgcheck *c = calloc(1, sizeof *c);
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return 70;
    }
    bool nomem = false;
    c->pg = o->pg;
    c->conninfo = dup_or_null(o->pg.conninfo, &nomem);
    c->password_file = dup_or_null(o->pg.password_file, &nomem);
    c->app_name = dup_or_null(o->pg.application_name, &nomem);
    c->default_query = !o->query || !o->query[0]
                       || strcmp(o->query, SC_PGCHECK_DEFAULT_QUERY) == 0;
    c->query = dup_or_null(c->default_query ? SC_PGCHECK_DEFAULT_QUERY : o->query,
                           &nomem);
    c->pg.conninfo = c->conninfo;
    c->pg.password_file = c->password_file;
    c->pg.application_name = c->app_name;
    c->clock = o->pg.clock ? o->pg.clock : brk_clock_system();
    c->pg.clock = c->clock;
    c->log = o->log;
    c->nslots = pool;
    int64_t cto = o->pg.connect_timeout_ms > 0 ? o->pg.connect_timeout_ms : 5000;
    int64_t sto = o->pg.statement_timeout_ms > 0 ? o->pg.statement_timeout_ms : 0;
    c->wait_ms = sto > 0 ? sto : cto;
    c->query_ms = sto + cto;
    c->checker.check = pc_check;
    c->checker.ctx = c;
    c->st.pool_size = pool;
    /* Seeded per instance, so replicas restarting together draw apart. */
    atomic_init(&c->rng, (uint64_t)mono_ns(c) ^ ((uint64_t)(uintptr_t)c << 16)
                         ^ ((uint64_t)getpid() << 40));
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->slot_free, &ca);
    pthread_cond_init(&c->idle, NULL);
    pthread_condattr_destroy(&ca);
    if (nomem) {
        snprintf(err, errlen, "out of memory");
        free_all(c);
        return 70;
    }

    /* One connection now: a refused one or a query that does not fit is a
     * configuration error; an unreachable server is not (it may start
     * after us). */
    pc_slot *s = &c->slots[0];
    char why[700];
    sc_pg_fail fail;
    s->conn = sc_pg_connect(&c->pg, &fail, why, sizeof why);
    pv_result pv = PV_CONN;
    if (!s->conn && fail == SC_PG_REFUSED) {
        snprintf(err, errlen, "%s", why);
        free_all(c);
        return 78;
    }
    if (s->conn) {
        pv = prepare_query(c, s->conn, true, why, sizeof why);
        if (pv == PV_INVALID || pv == PV_FAIL) {
            snprintf(err, errlen, "%s", why);
            free_all(c);
            return 78;
        }
    }
    if (pv == PV_OK) {
        s->prepared = true;
        s->up = true;
        c->valid = 1;
        c->st.connected = 1;
    } else {
        if (s->conn) {
            PQfinish(s->conn);
            s->conn = NULL;
        }
        c->st.connect_failures = 1;
        slot_connect_failed(c, s);
        /* This line stands for the first of the outage's connect warnings. */
        c->log_ever[LK_CONNECT] = true;
        c->log_last_ns[LK_CONNECT] = mono_ns(c);
        if (c->log) {
            char msg[800];
            snprintf(msg, sizeof msg, "database unreachable; check-backs will be "
                     "retried: %s", why);
            sc_log_write(c->log, API_LOG_WARN, msg, NULL, 0);
        }
    }
    *out = c;
    return 0;
}

void sc_pgcheck_close(sc_pgcheck *c)
{
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    c->closing = true;
    pthread_cond_broadcast(&c->slot_free);
    while (c->users > 0)
        pthread_cond_wait(&c->idle, &c->mu);
    pthread_mutex_unlock(&c->mu);
    free_all(c);
}

const brk_checker *sc_pgcheck_checker(sc_pgcheck *c)
{
    return &c->checker;
}

void sc_pgcheck_get_stats(sc_pgcheck *c, sc_pgcheck_stats *out)
{
    pthread_mutex_lock(&c->mu);
    *out = c->st;
    out->validated = c->valid == 1;
    pthread_mutex_unlock(&c->mu);
}
