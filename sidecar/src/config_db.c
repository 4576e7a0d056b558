/*
 * config_db.c - the PostgreSQL options' checks (issue 6) and the secrets
 * options carry.  The option table, the layers and every other rule are
 * in config.c; config_priv.h is what the two share.
 *
 * database_url: parsed here with libpq (PQconninfoParse: no I/O, no
 * defaults), so a malformed one is exit 78 with libpq's reason minus its
 * quoted text (libpq quotes what it stumbled on, which may be the password
 * or the whole URL); one whose host, port, dbname, user or service holds a
 * URL is refused too.  check_query must use $1 (PostgreSQL prepares it at
 * start-up and says precisely what else does not fit).
 *
 * After every layer (cfg_validate_db): a database is "configured" when
 * database_url is set or envp has PGHOST, PGHOSTADDR, PGDATABASE or
 * PGSERVICE (libpq then reads its PG* variables); relay and a check_query
 * need one; database_password_file must be readable with a password on its
 * first line, which is left in the file (pg.c reads it at each connect).
 *
 * Secrets in messages: the token and database_url are never echoed.  Any
 * other text a message would quote (a stray argument, an unknown key, a
 * bad value) is replaced by a placeholder when it looks like a URL with
 * credentials or a conninfo password (cfg_looks_secret): a URL passed
 * where something else belongs must not be printed either.  Secrets in
 * memory and in argv: sc_config_wipe and sc_config_hide_secrets.
 */
#include "config.h"
#include "config_priv.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sysexits.h>

#include <libpq-fe.h>

/* ---- what a secret looks like -------------------------------------------- */

/* Whether `s` may carry a credential: a URL with a user part
 * ("scheme://user:pw@host") or a conninfo "password=".  Such text is
 * never quoted in a message, whichever option or argument it was given as. */
bool cfg_looks_secret(const char *s)
{
    const char *scheme = strstr(s, "://");
    return (scheme && strchr(scheme, '@')) || strcasestr(s, "password");
}

/* `s` (n bytes) in double quotes for a message, or a placeholder when
 * cfg_looks_secret. */
const char *cfg_quoted(const char *s, size_t n, char *buf, size_t cap)
{
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%.*s", (int)(n < sizeof tmp ? n : sizeof tmp - 1),
             s);
    if (cfg_looks_secret(tmp) || (n >= sizeof tmp && cfg_looks_secret(s)))
        snprintf(buf, cap, "<not shown: it looks like a database URL or "
                 "password>");
    else
        snprintf(buf, cap, "\"%s%s\"", tmp, n >= sizeof tmp ? "..." : "");
    volatile char *w = tmp;
    for (size_t i = 0; i < sizeof tmp; i++)
        w[i] = 0;
    return buf;
}

/* A name (n bytes) as it is, or the placeholder when cfg_looks_secret. */
const char *cfg_plain(const char *s, size_t n, char *buf, size_t cap)
{
    snprintf(buf, cap, "%.*s", (int)n, s);
    if (cfg_looks_secret(buf))
        snprintf(buf, cap, "<not shown: it looks like a database URL or "
                 "password>");
    return buf;
}

/* ---- database_url -------------------------------------------------------- */

/* libpq's parse error, one line, with every quoted part longer than one
 * character replaced by "..." (the one-character ones are syntax: "=",
 * "]"); the rest of the sentence says what is wrong. */
static void redact_quoted(const char *in, char *out, size_t cap)
{
    size_t n = 0;
    for (const char *p = in; *p && n + 8 < cap; p++) {
        if (*p == '"') {
            /* an unclosed quote runs to the end */
            const char *q = strchr(p + 1, '"');
            if (!q)
                q = p + strlen(p) - 1;
            if (q - p - 1 > 1) {
                n += (size_t)snprintf(out + n, cap - n, "\"...\"");
            } else {
                memcpy(out + n, p, (size_t)(q - p + 1));
                n += (size_t)(q - p + 1);
            }
            p = q;
            continue;
        }
        out[n++] = (*p == '\n' || *p == '\r' || *p == '\t') ? ' ' : *p;
    }
    while (n > 0 && out[n - 1] == ' ')
        n--;
    out[n] = '\0';
}

/* A database_url libpq can use: parsed (no I/O, no defaults), and none of
 * the names a message or the log shows (host, port, database, user,
 * service) holds a URL.  Only the top level of a conninfo is expanded, so
 * "dbname=postgresql://u:pw@h/db" would name a database after the URL and
 * have it printed back by the server and the log. */
const char *cfg_check_url(const char *v, char *what, size_t wl)
{
    static const char *const shown_keys[] = { "host", "hostaddr", "port",
                                              "dbname", "user", "service",
                                              NULL };
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(v, &perr);
    if (!opts) {
        char reason[300] = "";
        if (perr)
            redact_quoted(perr, reason, sizeof reason);
        PQfreemem(perr);
        snprintf(what, wl, "not a PostgreSQL URL or key=value conninfo%s%s%s",
                 reason[0] ? " (" : "", reason, reason[0] ? ")" : "");
        return what;
    }
    const char *bad = NULL;
    for (PQconninfoOption *o = opts; o->keyword && !bad; o++)
        for (size_t k = 0; shown_keys[k] && !bad; k++)
            if (o->val && strcmp(o->keyword, shown_keys[k]) == 0 &&
                strstr(o->val, "://"))
                bad = shown_keys[k];
    if (bad)
        snprintf(what, wl, "its %s holds a URL (not shown): give the URL "
                 "itself as database_url", bad);
    PQconninfoFree(opts);
    return bad ? what : NULL;
}

/* ---- check_query --------------------------------------------------------- */

/* A quick check only: PostgreSQL prepares the query at start-up and says
 * precisely what does not fit. */
const char *cfg_check_query(const char *v, char *what, size_t wl)
{
    if (strstr(v, "$1"))
        return NULL;
    snprintf(what, wl, "must use the txid as parameter $1 (e.g. "
             "SELECT state FROM orders WHERE id = $1)");
    return what;
}

/* ---- after every layer --------------------------------------------------- */

/* Read access and a non-empty first line; the password itself is left in
 * the file (pg.c reads it at each connect, so a rotated one is used on the
 * next reconnect) and never printed. */
static int check_password_file(cfg_ctx *x)
{
    const sc_config *c = x->c;
    int i = cfg_idx_of(offsetof(sc_config, database_password_file));
    const char *path = c->database_password_file;
    FILE *f = fopen(path, "r");
    if (!f)
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: "
                        "database_password_file: cannot read %s: %s",
                        x->where[i], path, strerror(errno));
    char buf[1024];
    bool got = fgets(buf, sizeof buf, f) != NULL;
    int e = ferror(f) ? errno : 0;
    fclose(f);
    bool empty = !got || strcspn(buf, "\r\n") == 0;
    volatile char *wipe = buf;
    for (size_t k = 0; k < sizeof buf; k++)
        wipe[k] = 0;
    if (e)
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: "
                        "database_password_file: cannot read %s: %s",
                        x->where[i], path, strerror(e));
    if (empty)
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: "
                        "database_password_file: %s has no password on its "
                        "first line", x->where[i], path);
    return 0;
}

static bool env_set(char **envp, const char *name)
{
    const char *v = cfg_env_get(envp, name);
    return v && *v;
}

/* Is there a database, and do the options that need one have it. */
int cfg_validate_db(cfg_ctx *x)
{
    sc_config *c = x->c;
    c->db_configured = c->database_url[0] || env_set(x->envp, "PGHOST") ||
                       env_set(x->envp, "PGHOSTADDR") ||
                       env_set(x->envp, "PGDATABASE") ||
                       env_set(x->envp, "PGSERVICE");
    int re = cfg_idx_of(offsetof(sc_config, relay));
    int cq = cfg_idx_of(offsetof(sc_config, check_query));
    if (c->relay && !c->db_configured)
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: relay: relay "
                        "mode needs a database (set database_url or "
                        "DATABASE_URL, or PGHOST/PGDATABASE/PGSERVICE)",
                        x->where[re]);
    if (c->check_query[0] && !c->db_configured)
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: check_query: a "
                        "check query needs a database (set database_url or "
                        "DATABASE_URL, or PGHOST/PGDATABASE/PGSERVICE)",
                        x->where[cq]);
    if (c->database_password_file[0])
        return check_password_file(x);
    return 0;
}

/* ---- public (config.h) --------------------------------------------------- */

void sc_config_wipe(sc_config *c)
{
    volatile char *t = c->token, *a = c->auth_token, *u = c->database_url;
    for (size_t i = 0; i < sizeof c->token; i++)
        t[i] = 0;
    for (size_t i = 0; i < sizeof c->auth_token; i++)
        a[i] = 0;
    for (size_t i = 0; i < sizeof c->database_url; i++)
        u[i] = 0;
}

void sc_config_hide_secrets(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        char *a = argv[i];
        if (strncmp(a, "--", 2) != 0 || !a[2])
            continue;
        char *eq = strchr(a + 2, '=');
        size_t n = eq ? (size_t)(eq - a - 2) : strlen(a + 2);
        const sc_opt *o = cfg_find_opt(a + 2, n, true);
        if (!o)
            continue;
        /* where the value is, as scan_flag (config.c) finds it */
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        char *v = NULL;
        if (eq)
            v = eq + 1;
        else if (o->type == T_BOOL && cfg_looks_bool(next))
            i++;                 /* "--relay true": not a command */
        else if (o->type != T_BOOL && next && strncmp(next, "--", 2) != 0)
            v = argv[++i];       /* "--token VALUE" */
        if (o->secret && v)
            for (; *v; v++)
                *(volatile char *)v = '*';
    }
}
