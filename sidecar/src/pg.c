/*
 * pg.c - PostgreSQL connections (see pg.h).
 *
 * Connecting goes through PQconnectStartParams with expand_dbname: the
 * first pair ("dbname" = conninfo) may be a whole URL or key=value string,
 * and libpq lets the pairs after it override what it says.  So the
 * password from the file wins over one in the URL, and the settings
 * outboxd insists on win too: connect_timeout, keepalives (idle/interval/
 * count derived from connect_timeout), tcp_user_timeout, application_name,
 * and `options=-c statement_timeout=N`, which holds from the first query
 * on.  (An `options` value in the URL is therefore replaced.)
 *
 * Then PQconnectPoll is driven by hand: poll() on PQsocket (for reading or
 * writing, as PQconnectPoll last asked; the socket may change between
 * rounds when libpq moves to the next host or retries without SSL, so it
 * is read again each round) and on opts.stop_fd, against one deadline of
 * connect_timeout for the whole attempt.  libpq enforces connect_timeout
 * only in its blocking PQconnectdb loop (and there per host, so two hosts
 * took twice as long); without the loop here a hung server could hold a
 * closing relay for that long, uninterruptibly.  The stop descriptor is
 * polled, never read: it belongs to the caller, whose own loop must still
 * see it.  Name resolution (getaddrinfo, inside PQconnectStartParams and
 * when moving to the next host) still blocks: libpq offers no way around it.
 *
 * Messages.  libpq quotes a malformed URL whole in some of its messages
 * ("end of string reached when looking for matching "]" ... in URI:
 * "postgresql://u:pw@[::1/db""), password included.  Every message built
 * here therefore has the password of the conninfo (as typed in a URL, and
 * as libpq parsed it) replaced by "***" before it leaves this file.  A
 * conninfo libpq cannot parse is REFUSED: configuration, not an outage.
 *
 * Notices.  libpq's default notice processor prints the server's NOTICE and
 * WARNING lines on stderr, which is outboxd's JSON log (and a custom query
 * may RAISE text that quotes its input): connections drop them, from the
 * start-up on (the processor is set before the first PQconnectPoll).
 */
#define _GNU_SOURCE
#include "pg.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void sc_pg_opts_init(sc_pg_opts *o)
{
    memset(o, 0, sizeof *o);
    o->connect_timeout_ms = 5000;
    o->backoff_min_ms = 100;
    o->backoff_max_ms = 30000;
    o->stop_fd = -1;
}

/* First line of the password file into out; -1 when it cannot be read. */
static int read_password(const char *path, char *out, size_t cap)
{
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    out[0] = '\0';
    char *ok = fgets(out, (int)cap, f);
    fclose(f);
    if (!ok) return -1;
    out[strcspn(out, "\r\n")] = '\0';
    return 0;
}

void sc_pg_one_line(char *s)
{
    char *w = s;
    bool blank = false;
    for (const char *p = s; *p; p++) {
        bool sp = (*p == '\n' || *p == '\t' || *p == ' ' || *p == '\r');
        if (sp) {
            blank = (w != s);
            continue;
        }
        if (blank) *w++ = ' ';
        blank = false;
        *w++ = *p;
    }
    *w = '\0';
}

void sc_pg_describe(PGconn *c, char *out, size_t cap)
{
    const char *host = c ? PQhost(c) : NULL;
    const char *port = c ? PQport(c) : NULL;
    const char *db = c ? PQdb(c) : NULL;
    const char *user = c ? PQuser(c) : NULL;
    snprintf(out, cap, "%s:%s/%s as %s", host && *host ? host : "?",
             port && *port ? port : "?", db && *db ? db : "?",
             user && *user ? user : "?");
}

/* Replace every occurrence of `secret` in s[cap] by "***" (cut at cap;
 * when out of memory the whole message goes rather than the secret
 * staying). */
static void mask(char *s, size_t cap, const char *secret)
{
    size_t sl = secret ? strlen(secret) : 0;
    if (!sl || !cap || !strstr(s, secret)) return;
    char *out = malloc(cap);
    if (!out) {
        snprintf(s, cap, "(message withheld: out of memory)");
        return;
    }
    size_t o = 0;
    for (const char *p = s; *p && o + 1 < cap;) {
        if (strncmp(p, secret, sl) == 0) {
            for (int k = 0; k < 3 && o + 1 < cap; k++) out[o++] = '*';
            p += sl;
        } else {
            out[o++] = *p++;
        }
    }
    out[o] = '\0';
    memcpy(s, out, o + 1);
    free(out);
}

/* The password as written in a postgresql:// URL (still %-encoded): what
 * libpq echoes when it cannot parse the URL.  Same rule as libpq's parser:
 * the user info runs to the first '@' before any '/'. */
static void url_password(const char *ci, char *out, size_t cap)
{
    out[0] = '\0';
    const char *p = strstr(ci, "://");
    if (!p || !(strncmp(ci, "postgresql://", 13) == 0
                || strncmp(ci, "postgres://", 11) == 0))
        return;
    p += 3;
    const char *at = p;
    while (*at && *at != '@' && *at != '/') at++;
    if (*at != '@') return;
    const char *colon = memchr(p, ':', (size_t)(at - p));
    if (!colon) return;
    size_t n = (size_t)(at - colon - 1);
    if (n >= cap) n = cap - 1;
    memcpy(out, colon + 1, n);
    out[n] = '\0';
}

/* The password in a key=value conninfo libpq could not parse: the value
 * after "password", "=" (quoted or up to a blank). */
static void kv_password(const char *ci, char *out, size_t cap)
{
    out[0] = '\0';
    const char *p = strstr(ci, "password");
    if (!p) return;
    p += 8;
    while (*p == ' ' || *p == '\t') p++;
    if (*p == '=') p++;
    while (*p == ' ' || *p == '\t') p++;
    if (*p == '\'') p++;
    size_t n = 0;
    while (p[n] && p[n] != '\'' && p[n] != ' ' && p[n] != '\t' && n + 1 < cap) n++;
    memcpy(out, p, n);
    out[n] = '\0';
}

/* Take every form of the conninfo's password out of msg[cap].  Sets
 * *parse_failed when libpq cannot parse the conninfo at all. */
static void redact(const char *ci, char *msg, size_t cap, bool *parse_failed)
{
    char pw[512];
    *parse_failed = false;
    if (!ci || !ci[0]) return;
    /* libpq's own test (recognized_connection_string): anything else is
     * a plain database name, which cannot fail to parse. */
    bool is_url = strncmp(ci, "postgresql://", 13) == 0
                  || strncmp(ci, "postgres://", 11) == 0;
    bool is_conninfo = is_url || strchr(ci, '=');
    char *perr = NULL;
    PQconninfoOption *opts = is_conninfo ? PQconninfoParse(ci, &perr) : NULL;
    PQfreemem(perr);
    if (opts) {
        /* Parsed: libpq's messages quote values, never the whole string. */
        for (PQconninfoOption *o = opts; o->keyword; o++)
            if (strcmp(o->keyword, "password") == 0 && o->val)
                mask(msg, cap, o->val);
        PQconninfoFree(opts);
        return;
    }
    if (!is_conninfo) return;
    /* Unparsable: the message may quote it as written. */
    *parse_failed = true;
    if (is_url)
        url_password(ci, pw, sizeof pw);
    else
        kv_password(ci, pw, sizeof pw);
    mask(msg, cap, pw);
    explicit_bzero(pw, sizeof pw);
}

/* The server answered and refused us, as opposed to never answering.
 * libpq has no SQLSTATE for connection failures, so this reads its
 * message; the phrases are PostgreSQL's own (FATAL messages from the
 * server) and stable across versions. */
static bool refused_by_server(const char *msg)
{
    /* A name that does not resolve is not among them: in a starting pod
     * DNS may simply not be ready yet. */
    static const char *const said_no[] = {
        "password authentication failed",
        "authentication failed",
        "no password supplied",
        "does not exist",            /* role or database */
        "no pg_hba.conf entry",
        "permission denied",
        "not permitted to log in",
        "SSL required",
        "server does not support SSL",
        "invalid connection option",
        "invalid URI",
        "missing \"=\"",
        "invalid integer value",
        "invalid port number",
        "invalid sslmode",
    };
    for (size_t i = 0; i < sizeof said_no / sizeof said_no[0]; i++)
        if (strstr(msg, said_no[i])) return true;
    /* libpq checking the options before it contacts any server: "invalid
     * target_session_attrs value: ...", "invalid port number: ...". */
    return strncmp(msg, "invalid ", 8) == 0 || strncmp(msg, "could not match ", 16) == 0;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Server notices go nowhere (see the top of the file). */
static void quiet(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

/* Drive a started connection until libpq is done with it (NULL: look at
 * PQstatus), the deadline passes ("timeout expired", libpq's own words) or
 * stop_fd becomes readable ("connect interrupted"). */
static const char *drive(PGconn *c, int64_t timeout_ms, int stop_fd)
{
    if (PQstatus(c) == CONNECTION_BAD) return NULL;   /* bad options */
    int64_t deadline = mono_ms() + timeout_ms;
    /* libpq's rule: act as if PQconnectPoll had asked for writing. */
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    for (;;) {
        if (st == PGRES_POLLING_OK || st == PGRES_POLLING_FAILED) return NULL;
        int fd = PQsocket(c);
        if (fd < 0) {
            /* No socket while still polling: let libpq say why. */
            st = PQconnectPoll(c);
            if (st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED
                && PQsocket(c) < 0)
                return "connection lost while connecting";
            continue;
        }
        int64_t left = deadline - mono_ms();
        if (left <= 0) return "timeout expired";
        struct pollfd p[2] = {
            { .fd = fd, .events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT },
            { .fd = stop_fd, .events = POLLIN },
        };
        nfds_t n = stop_fd >= 0 ? 2 : 1;
        int rc = poll(p, n, left > INT32_MAX ? INT32_MAX : (int)left);
        if (rc < 0) {
            if (errno == EINTR) continue;
            return "cannot wait for the server (poll failed)";
        }
        /* Stop first: a server that happens to answer at the same moment
         * does not keep a closing caller waiting for the next round. */
        if (n == 2 && p[1].revents) return "connect interrupted";
        if (rc == 0) continue;            /* the deadline, next round */
        st = PQconnectPoll(c);
    }
}

PGconn *sc_pg_connect(const sc_pg_opts *o, sc_pg_fail *fail, char *err,
                      size_t errlen)
{
    sc_pg_fail dummy;
    if (!fail) fail = &dummy;
    *fail = SC_PG_OK;

    int64_t cto = o->connect_timeout_ms > 0 ? o->connect_timeout_ms : 5000;
    long cto_s = (long)((cto + 999) / 1000);
    if (cto_s < 2) cto_s = 2;    /* libpq treats 1 as 2 anyway */
    /* Notice a dead peer within about the connect timeout: idle, then
     * three probes. */
    long ka_idle = cto_s / 2 > 0 ? cto_s / 2 : 1;
    long ka_intvl = cto_s / 4 > 0 ? cto_s / 4 : 1;

    char s_cto[24], s_idle[24], s_intvl[24], s_user_to[24], s_options[64];
    snprintf(s_cto, sizeof s_cto, "%ld", cto_s);
    snprintf(s_idle, sizeof s_idle, "%ld", ka_idle);
    snprintf(s_intvl, sizeof s_intvl, "%ld", ka_intvl);
    snprintf(s_user_to, sizeof s_user_to, "%ld", cto_s * 1000);
    snprintf(s_options, sizeof s_options, "-c statement_timeout=%lld",
             (long long)(o->statement_timeout_ms > 0 ? o->statement_timeout_ms : 0));

    char password[1024];
    bool have_pw = false;
    if (o->password_file && o->password_file[0]) {
        if (read_password(o->password_file, password, sizeof password) != 0) {
            *fail = SC_PG_REFUSED;
            snprintf(err, errlen, "cannot read database password file %s",
                     o->password_file);
            return NULL;
        }
        have_pw = true;
    }

    const char *keys[16], *vals[16];
    int n = 0;
    keys[n] = "dbname";            vals[n++] = o->conninfo ? o->conninfo : "";
    keys[n] = "connect_timeout";   vals[n++] = s_cto;
    keys[n] = "keepalives";        vals[n++] = "1";
    keys[n] = "keepalives_idle";   vals[n++] = s_idle;
    keys[n] = "keepalives_interval"; vals[n++] = s_intvl;
    keys[n] = "keepalives_count";  vals[n++] = "3";
    keys[n] = "tcp_user_timeout";  vals[n++] = s_user_to;
    keys[n] = "application_name";
    vals[n++] = o->application_name ? o->application_name : "outboxd";
    keys[n] = "options";           vals[n++] = s_options;
    if (have_pw) { keys[n] = "password"; vals[n++] = password; }
    keys[n] = NULL; vals[n] = NULL;

    /* An empty dbname pair would be taken as "no database": leave the
     * conninfo slot out entirely so libpq falls back to PG*. */
    int first = (o->conninfo && o->conninfo[0]) ? 0 : 1;
    PGconn *c = PQconnectStartParams(keys + first, vals + first, first == 0);
    /* explicit_bzero: a plain memset of a buffer never read again may be
     * optimised away.  libpq has its own copy by now. */
    if (have_pw) explicit_bzero(password, sizeof password);
    if (!c) {
        *fail = SC_PG_UNREACHABLE;
        snprintf(err, errlen, "cannot connect to PostgreSQL: out of memory");
        return NULL;
    }
    PQsetNoticeProcessor(c, quiet, NULL);
    const char *gave_up = drive(c, cto, o->stop_fd);
    if (!gave_up && PQstatus(c) == CONNECTION_OK) return c;

    char where[300], why[1024];
    sc_pg_describe(c, where, sizeof where);
    snprintf(why, sizeof why, "%s", gave_up ? gave_up : PQerrorMessage(c));
    sc_pg_one_line(why);
    bool unparsable;
    redact(o->conninfo, why, sizeof why, &unparsable);
    if (gave_up)
        *fail = SC_PG_UNREACHABLE;     /* timeout or interrupted */
    else
        *fail = unparsable || refused_by_server(why) ? SC_PG_REFUSED
                                                     : SC_PG_UNREACHABLE;
    snprintf(err, errlen, "cannot connect to PostgreSQL at %s: %s", where, why);
    PQfinish(c);
    return NULL;
}

static bool failed(const PGresult *r)
{
    ExecStatusType st = PQresultStatus(r);
    return st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE
           || st == PGRES_NONFATAL_ERROR;
}

PGresult *sc_pg_wait_result(PGconn *c, int64_t timeout_ms, bool *timed_out)
{
    bool dummy;
    if (!timed_out) timed_out = &dummy;
    *timed_out = false;
    int64_t deadline = timeout_ms > 0 ? mono_ms() + timeout_ms : 0;
    PGresult *keep = NULL;
    for (;;) {
        /* Read until libpq has a whole result; PQgetResult would block. */
        while (PQisBusy(c)) {
            int fd = PQsocket(c);
            if (fd < 0) break;          /* gone: PQgetResult says so */
            int wait = -1;
            if (deadline) {
                int64_t left = deadline - mono_ms();
                if (left <= 0) {
                    *timed_out = true;
                    PQclear(keep);
                    return NULL;
                }
                wait = left > INT32_MAX ? INT32_MAX : (int)left;
            }
            struct pollfd p = { .fd = fd, .events = POLLIN };
            int n = poll(&p, 1, wait);
            if (n < 0 && errno != EINTR) {
                /* Cannot wait (ENOMEM...): give up as at the deadline
                 * rather than block in PQgetResult. */
                *timed_out = true;
                PQclear(keep);
                return NULL;
            }
            if (n > 0 && !PQconsumeInput(c)) break;   /* lost: as above */
        }
        PGresult *r = PQgetResult(c);
        if (!r) break;
        /* The first failure is the one that says why (a server's FATAL
         * comes before libpq's own "server closed the connection"). */
        if (!keep) {
            keep = r;
        } else if (failed(keep)) {
            PQclear(r);
        } else {
            PQclear(keep);
            keep = r;
        }
    }
    return keep;
}

sc_pg_fail sc_pg_result_fail(PGconn *c, const PGresult *res)
{
    if (!c || PQstatus(c) != CONNECTION_OK) return SC_PG_UNREACHABLE;
    if (!res) return SC_PG_UNREACHABLE;
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    if (!state) {
        /* libpq-generated failure (no server SQLSTATE): the connection. */
        ExecStatusType st = PQresultStatus(res);
        return (st == PGRES_FATAL_ERROR) ? SC_PG_UNREACHABLE : SC_PG_OK;
    }
    /* Class 08 connection exception, 57P01-57P03 admin shutdown / crash /
     * cannot connect now, 53 insufficient resources: the server's trouble,
     * not the query's. */
    if (strncmp(state, "08", 2) == 0 || strncmp(state, "57P", 3) == 0
        || strncmp(state, "53", 2) == 0)
        return SC_PG_UNREACHABLE;
    return SC_PG_OK;
}

bool sc_pg_is_timeout(const PGresult *res)
{
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    return state && strcmp(state, "57014") == 0;
}

int64_t sc_pg_backoff_ms(const sc_pg_opts *o, unsigned failures, double jitter)
{
    int64_t lo = o->backoff_min_ms > 0 ? o->backoff_min_ms : 100;
    int64_t hi = o->backoff_max_ms > lo ? o->backoff_max_ms : lo;
    int64_t cap = lo;
    /* Doubling stops at hi, and never past INT64_MAX for a huge hi. */
    for (unsigned i = 0; i < failures && cap < hi; i++)
        cap = cap > hi / 2 ? hi : cap * 2;
    if (cap > hi) cap = hi;
    if (!(jitter >= 0)) jitter = 0;          /* also NaN */
    if (jitter >= 1) jitter = 0.999999;
    /* Full jitter over [lo, cap]: many replicas restarting together spread
     * their reconnects instead of arriving as one wave. */
    return lo + (int64_t)((double)(cap - lo) * jitter);
}
