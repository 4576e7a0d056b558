/*
 * pg.c - PostgreSQL connections (see pg.h).
 *
 * Connecting goes through PQconnectdbParams with expand_dbname: the first
 * pair ("dbname" = conninfo) may be a whole URL or key=value string, and
 * libpq lets the pairs after it override what it says.  So the password
 * from the file wins over one in the URL, and the settings outboxd insists
 * on win too: connect_timeout, keepalives (idle/interval/count derived from
 * connect_timeout), tcp_user_timeout, application_name, and
 * `options=-c statement_timeout=N`, which holds from the first query on.
 * (An `options` value in the URL is therefore replaced.)
 */
#define _GNU_SOURCE
#include "pg.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void sc_pg_opts_init(sc_pg_opts *o)
{
    memset(o, 0, sizeof *o);
    o->connect_timeout_ms = 5000;
    o->backoff_min_ms = 100;
    o->backoff_max_ms = 30000;
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
        "invalid sslmode",
    };
    for (size_t i = 0; i < sizeof said_no / sizeof said_no[0]; i++)
        if (strstr(msg, said_no[i])) return true;
    return false;
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
    PGconn *c = PQconnectdbParams(keys + first, vals + first, first == 0);
    /* explicit_bzero: a plain memset of a buffer never read again may be
     * optimised away. */
    if (have_pw) explicit_bzero(password, sizeof password);
    if (!c) {
        *fail = SC_PG_UNREACHABLE;
        snprintf(err, errlen, "cannot connect to PostgreSQL: out of memory");
        return NULL;
    }
    if (PQstatus(c) != CONNECTION_OK) {
        char where[300], why[512];
        sc_pg_describe(c, where, sizeof where);
        snprintf(why, sizeof why, "%s", PQerrorMessage(c));
        sc_pg_one_line(why);
        *fail = refused_by_server(why) ? SC_PG_REFUSED : SC_PG_UNREACHABLE;
        snprintf(err, errlen, "cannot connect to PostgreSQL at %s: %s", where, why);
        PQfinish(c);
        return NULL;
    }
    return c;
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
    for (unsigned i = 0; i < failures && cap < hi; i++) cap *= 2;
    if (cap > hi) cap = hi;
    if (jitter < 0) jitter = 0;
    if (jitter >= 1) jitter = 0.999999;
    /* Full jitter over [lo, cap]: many replicas restarting together spread
     * their reconnects instead of arriving as one wave. */
    return lo + (int64_t)((double)(cap - lo) * jitter);
}
