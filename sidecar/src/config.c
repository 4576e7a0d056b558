/*
 * config.c - the option table, the value parsers, the four configuration
 * layers, the cross-option rules, `outboxd config` and `--help`.  The
 * PostgreSQL options' own checks and the handling of secrets are in
 * config_db.c (config_priv.h is what the two share).
 *
 * Load order (sc_config_load):
 *   1. every default is parsed by the same code as user input, so a bad
 *      default cannot hide;
 *   2. argv is scanned once: command, --help/--version (answered at once),
 *      --config, and the flags, which are checked for names and missing
 *      values (64) but applied only in step 5;
 *   3. the config file (--config, else OUTBOXD_CONFIG) is applied line by
 *      line;
 *   4. the environment: OUTBOXD_<NAME> for each option.  Empty variables
 *      count as unset (container specs often carry `NAME=` to mean "not
 *      set"), and unknown OUTBOXD_* names are ignored, because the
 *      environment is shared with other programs and tools of this project;
 *   5. the flags, left to right;
 *   6. cross-option rules (token vs token_file, non-loopback listen needs a
 *      token, idempotency window within retention, relay and check_query
 *      need a database) and the files named (token, database password).
 * DATABASE_URL, the variable most platforms set for an attached database,
 * fills database_url at the environment layer when OUTBOXD_DATABASE_URL is
 * not set; "configured" also counts libpq's own PGHOST, PGHOSTADDR,
 * PGDATABASE and PGSERVICE, read from envp like everything else.
 * Each value is checked as it is applied, so an error names the layer it
 * came from even when a higher layer would have replaced it.
 *
 * Secrets in messages: the token and database_url are never echoed, and
 * any other text a message would quote is replaced by a placeholder when
 * it looks like a credential (cfg_looks_secret).  sc_config_hide_secrets
 * then overwrites secret flag values in argv, so they do not stay visible
 * in /proc/PID/cmdline.  Both are in config_db.c.
 */
#include "config.h"
#include "config_priv.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>

static const char *const FLUSH_CHOICES[] = { "sync", "async", NULL };
static const char *const EXHAUSTED_CHOICES[] = { "rollback", "hold", NULL };
static const char *const LEVEL_CHOICES[] = { "debug", "info", "warn", "error", NULL };

#define F(field) offsetof(sc_config, field), sizeof(((sc_config *)0)->field)
#define MS_S   1000ULL
#define MS_M   (60 * MS_S)
#define MS_H   (60 * MS_M)
#define MS_D   (24 * MS_H)
#define KIB    1024ULL
#define MIB    (1024 * KIB)
#define GIB    (1024 * MIB)

static const sc_opt OPTS[] = {
    /* ---- daemon and HTTP ---- */
    { "data_dir", T_STR, F(data_dir), "/var/lib/outboxd", false, 0, 0, NULL,
      "directory of the store (created if missing)" },
    { "listen", T_LISTEN, F(listen), "127.0.0.1:8080", false, 0, 0, NULL,
      "address to serve HTTP on: host:port or [v6]:port; port 0 = any free "
      "port; a non-loopback host requires a token" },
    { "threads", T_UINT, F(threads), "0", false, 0, 1024, NULL,
      "HTTP worker threads; 0 = one per online core" },
    { "workers", T_UINT, F(workers), "64", false, 1, 4096, NULL,
      "request threads: broker calls (which wait for fdatasync) run on them, "
      "so up to this many writes share one fdatasync" },
    { "max_connections", T_UINT, F(max_connections), "4096", false, 1, 1000000,
      NULL, "simultaneous HTTP connections at most" },
    { "idle_timeout", T_DUR, F(idle_timeout_ms), "60s", false, MS_S, MS_D, NULL,
      "close a connection silent this long (parked long polls excepted)" },
    { "max_body", T_SIZE, F(max_body), "1MiB", false, KIB, GIB, NULL,
      "largest HTTP request body (413 beyond)" },
    { "token", T_TOKEN, F(token), "", true, 0, 0, NULL,
      "bearer token required on every route but /healthz and /readyz "
      "(16..1024 printable bytes); prefer OUTBOXD_TOKEN or token_file" },
    { "token_file", T_STR, F(token_file), "", false, 0, 0, NULL,
      "file holding the bearer token (trailing newline stripped); not with "
      "token" },
    /* ---- store ---- */
    { "flush", T_ENUM, F(flush), "sync", false, 0, 0, FLUSH_CHOICES,
      "sync: acknowledge after fdatasync (group commit); async: background "
      "flush every flush_interval (a power loss may lose acknowledged writes)" },
    { "flush_interval", T_DUR, F(flush_interval_ms), "500ms", false, 1, MS_H,
      NULL, "background fdatasync period in async mode" },
    { "group_commit_delay_us", T_UINT, F(group_commit_delay_us), "0", false, 0,
      1000000, NULL, "sync mode: microseconds a flush leader waits to gather "
      "followers" },
    { "segment_size", T_SIZE, F(segment_size), "256MiB", false, 4 * KIB,
      64 * GIB, NULL, "commit-log segment file size" },
    { "disk_budget", T_SIZE, F(disk_budget), "0", false, 0, 1ULL << 60, NULL,
      "bytes of log and indexes at most (507 beyond); 0 = unlimited" },
    { "retention", T_DUR, F(retention_ms), "72h", false, MS_M, 3650 * MS_D,
      NULL, "keep consumed segments at least this long" },
    { "max_message", T_SIZE, F(max_message), "4MiB", false, 1, 64 * MIB, NULL,
      "largest message body (at most 64MiB)" },
    { "auto_create_topics", T_BOOL, F(auto_create_topics), "true", false, 0, 0,
      NULL, "create a topic on its first message (else 404)" },
    { "default_queues", T_UINT, F(default_queues), "4", false, 1, 1024, NULL,
      "queues of an auto-created topic" },
    /* ---- transactions and delays ---- */
    { "check_first", T_DUR, F(check_first_ms), "6s", false, 0, 30 * MS_D, NULL,
      "default check policy: first check-back this long after prepare" },
    { "check_interval", T_DUR, F(check_interval_ms), "60s", false, 1,
      30 * MS_D, NULL, "default check policy: time between check-backs" },
    { "check_max", T_UINT, F(check_max), "15", false, 1, 65535, NULL,
      "default check policy: unknown answers before on_exhausted applies" },
    { "check_on_exhausted", T_ENUM, F(check_on_exhausted), "rollback", false,
      0, 0, EXHAUSTED_CHOICES,
      "default check policy: rollback, or hold the transaction as stuck" },
    { "check_workers", T_UINT, F(check_workers), "4", false, 1, 256, NULL,
      "threads asking the check-back source" },
    { "delay_max", T_DUR, F(delay_max_ms), "40d", false, MS_S, 3650 * MS_D,
      NULL, "longest delay a send or commit may ask for" },
    /* ---- PostgreSQL (check-backs, relay) ---- */
    { "database_url", T_URL, F(database_url), "", true, 0, 0, NULL,
      "PostgreSQL that answers check-backs: a postgresql:// URL or "
      "\"key=value\" conninfo (may hold a password: prefer the environment "
      "or database_password_file).  Also read from DATABASE_URL when "
      "OUTBOXD_DATABASE_URL is unset.  Empty: libpq's PG* variables when "
      "PGHOST, PGHOSTADDR, PGDATABASE or PGSERVICE is set, else no database" },
    { "database_password_file", T_STR, F(database_password_file), "", false,
      0, 0, NULL, "file whose first line is the database password; wins "
      "over one in the URL; read at each connect" },
    { "db_pool", T_UINT, F(db_pool), "2", false, 1, 64, NULL,
      "PostgreSQL connections answering check-backs" },
    { "db_statement_timeout", T_DUR, F(db_statement_timeout_ms), "5s", false,
      1, MS_H, NULL, "statement_timeout of outboxd's queries; a check-back "
      "cut by it is an error (retried, never counted as a check)" },
    { "db_connect_timeout", T_DUR, F(db_connect_timeout_ms), "5s", false,
      MS_S, 10 * MS_M, NULL, "PostgreSQL connect timeout; also about how "
      "soon a dead server is noticed (TCP keepalives)" },
    { "check_query", T_SQL, F(check_query), "", false, 0, 0, NULL,
      "check-back query: parameter $1 is the txid; one text column: commit, "
      "rollback, pending, or no row (= not known yet).  Empty: SELECT "
      "outbox.check_transaction($1).  Needs a database" },
    { "relay", T_BOOL, F(relay), "false", false, 0, 0, NULL,
      "relay rows of outbox.messages into the store (one leader among "
      "replicas; needs a database)" },
    { "relay_batch", T_UINT, F(relay_batch), "500", false, 1, 10000, NULL,
      "rows the relay stores per PostgreSQL transaction" },
    { "relay_poll_interval", T_DUR, F(relay_poll_interval_ms), "1s", false,
      10, MS_H, NULL, "relay: poll this often when no NOTIFY arrives; a "
      "standby replica tries for leadership this often" },
    /* ---- consumer groups ---- */
    { "invisible_default", T_DUR, F(invisible_default_ms), "30s", false, MS_S,
      12 * MS_H, NULL, "invisibility of a received message when the receive "
      "names none" },
    { "default_wait", T_DUR, F(default_wait_ms), "0", false, 0, 30 * MS_S, NULL,
      "long-poll wait of a receive that names none" },
    /* ---- HTTP idempotency ---- */
    { "idempotency_window", T_DUR, F(idempotency_window_ms), "24h", false, MS_S,
      3650 * MS_D, NULL, "how long an Idempotency-Key replays its first "
      "answer (at most retention)" },
    { "idempotency_max_keys", T_UINT, F(idempotency_max_keys), "100000", false,
      1, 100000000, NULL, "Idempotency-Keys remembered at most (oldest "
      "forgotten first)" },
    /* ---- process ---- */
    { "shutdown_grace", T_DUR, F(shutdown_grace_ms), "20s", false, 0, MS_H,
      NULL, "on SIGTERM/SIGINT, how long in-flight requests may finish" },
    { "log_level", T_ENUM, F(log_level), "info", false, 0, 0, LEVEL_CHOICES,
      "least severe level logged" },
};
#undef F

_Static_assert(sizeof OPTS / sizeof OPTS[0] == SC_OPT_COUNT,
               "SC_OPT_COUNT must match the option table");

static const char *const FROM_NAMES[] = { "default", "file", "env", "flag" };

/* ---- small helpers ---------------------------------------------------------- */

int cfg_fail(cfg_ctx *x, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (x->err && x->errlen)
        vsnprintf(x->err, x->errlen, fmt, ap);
    va_end(ap);
    return code;
}

static int opt_index(const sc_opt *o)
{
    return (int)(o - OPTS);
}

const sc_opt *cfg_find_opt(const char *name, size_t len, bool dashes)
{
    for (size_t i = 0; i < SC_OPT_COUNT; i++) {
        const char *n = OPTS[i].name;
        if (strlen(n) != len)
            continue;
        size_t k = 0;
        for (; k < len; k++) {
            char a = name[k];
            if (dashes && a == '-')
                a = '_';
            if (a != n[k])
                break;
        }
        if (k == len)
            return &OPTS[i];
    }
    return NULL;
}

static void env_name(const sc_opt *o, char *buf, size_t cap)
{
    size_t n = (size_t)snprintf(buf, cap, "OUTBOXD_%s", o->name);
    for (size_t i = 8; i < n && i < cap; i++)
        buf[i] = (char)toupper((unsigned char)buf[i]);
}

static void flag_name(const sc_opt *o, char *buf, size_t cap)
{
    size_t n = (size_t)snprintf(buf, cap, "--%s", o->name);
    for (size_t i = 2; i < n && i < cap; i++)
        if (buf[i] == '_')
            buf[i] = '-';
}

const char *cfg_env_get(char **envp, const char *name)
{
    size_t n = strlen(name);
    for (char **e = envp; e && *e; e++)
        if (strncmp(*e, name, n) == 0 && (*e)[n] == '=')
            return *e + n + 1;
    return NULL;
}

/* ---- value parsers: return NULL, or what is wrong in `what` ------------- */

static const char *parse_digits(const char *s, uint64_t *out, const char **end,
                                char *what, size_t wl)
{
    if (*s == '-') {
        snprintf(what, wl, "must not be negative: \"%s\"", s);
        return what;
    }
    if (!isdigit((unsigned char)*s)) {
        snprintf(what, wl, "not a number: \"%s\"", s);
        return what;
    }
    uint64_t v = 0;
    for (; isdigit((unsigned char)*s); s++) {
        unsigned d = (unsigned)(*s - '0');
        if (v > (UINT64_MAX - d) / 10) {
            snprintf(what, wl, "number too large");
            return what;
        }
        v = v * 10 + d;
    }
    *out = v;
    *end = s;
    return NULL;
}

static const char *parse_uint(const char *s, uint64_t *out, char *what, size_t wl)
{
    const char *end;
    if (parse_digits(s, out, &end, what, wl))
        return what;
    if (*end) {
        snprintf(what, wl, "not a number: \"%s\"", s);
        return what;
    }
    return NULL;
}

typedef struct unit { const char *name; uint64_t mult; } unit;

static const unit SIZE_UNITS[] = {
    { "", 1 }, { "B", 1 }, { "k", KIB }, { "K", KIB }, { "KiB", KIB },
    { "M", MIB }, { "MiB", MIB }, { "G", GIB }, { "GiB", GIB },
    { "T", 1024 * GIB }, { "TiB", 1024 * GIB }, { NULL, 0 }
};

static const unit DUR_UNITS[] = {
    { "ms", 1 }, { "s", MS_S }, { "m", MS_M }, { "h", MS_H }, { "d", MS_D },
    { NULL, 0 }
};

static const char *parse_scaled(const char *s, const unit *units, uint64_t *out,
                                const char *kind, char *what, size_t wl)
{
    uint64_t v;
    const char *end;
    if (parse_digits(s, &v, &end, what, wl))
        return what;
    /* "2 KiB" reads well; a space before nothing would make "2 " valid for
     * sizes only, so it must be followed by a unit */
    bool spaced = *end == ' ';
    if (spaced)
        end++;
    if (!spaced && units == DUR_UNITS && *end == '\0' && v == 0) {
        *out = 0;
        return NULL;
    }
    for (const unit *u = units; u->name; u++) {
        if (strcmp(end, u->name) != 0 || (spaced && !u->name[0]))
            continue;
        if (v > UINT64_MAX / u->mult || v * u->mult > (uint64_t)INT64_MAX) {
            snprintf(what, wl, "%s too large: \"%s\"", kind, s);
            return what;
        }
        *out = v * u->mult;
        return NULL;
    }
    if (units == DUR_UNITS)
        snprintf(what, wl, "bad duration \"%s\" (a number with ms, s, m, h "
                 "or d)", s);
    else
        snprintf(what, wl, "bad size \"%s\" (a number with B, KiB, MiB, GiB "
                 "or TiB; k, M, G, T)", s);
    return what;
}

static const char *parse_bool(const char *s, bool *out, char *what, size_t wl)
{
    static const char *const yes[] = { "true", "yes", "on", "1", NULL };
    static const char *const no[] = { "false", "no", "off", "0", NULL };
    for (int i = 0; yes[i]; i++) {
        if (strcasecmp(s, yes[i]) == 0) { *out = true; return NULL; }
        if (strcasecmp(s, no[i]) == 0) { *out = false; return NULL; }
    }
    snprintf(what, wl, "bad boolean \"%s\" (true or false)", s);
    return what;
}

static const char *parse_enum(const char *s, const char *const *choices,
                              unsigned *out, char *what, size_t wl)
{
    for (unsigned i = 0; choices[i]; i++)
        if (strcasecmp(s, choices[i]) == 0) {
            *out = i;
            return NULL;
        }
    size_t n = (size_t)snprintf(what, wl, "bad value \"%s\" (one of:", s);
    for (unsigned i = 0; choices[i] && n < wl; i++)
        n += (size_t)snprintf(what + n, wl - n, "%s %s", i ? "," : "",
                              choices[i]);
    if (n < wl)
        snprintf(what + n, wl - n, ")");
    return what;
}

static bool is_loopback(const char *host, bool v6)
{
    unsigned char a[16];
    if (!v6)
        return inet_pton(AF_INET, host, a) == 1 && a[0] == 127;
    if (inet_pton(AF_INET6, host, a) != 1)
        return false;
    static const unsigned char one[16] = { [15] = 1 };
    static const unsigned char mapped[12] = { [10] = 0xff, [11] = 0xff };
    return memcmp(a, one, 16) == 0 ||
           (memcmp(a, mapped, 12) == 0 && a[12] == 127);
}

/* "127.0.0.1:8080", "[::1]:8080", "localhost:8080" (= 127.0.0.1). */
static const char *parse_listen(const char *s, char host[64], uint16_t *port,
                                bool *loopback, char *what, size_t wl)
{
    const char *colon;
    bool v6 = s[0] == '[';
    size_t hl;
    const char *h = s;
    if (v6) {
        const char *rb = strchr(s, ']');
        if (!rb || rb[1] != ':') {
            snprintf(what, wl, "bad address \"%s\" (use [v6]:port)", s);
            return what;
        }
        h = s + 1;
        hl = (size_t)(rb - h);
        colon = rb + 1;
    } else {
        colon = strrchr(s, ':');
        if (!colon) {
            snprintf(what, wl, "missing port in \"%s\" (use host:port)", s);
            return what;
        }
        if (memchr(s, ':', (size_t)(colon - s))) {
            snprintf(what, wl, "IPv6 addresses need brackets: \"%s\" (use "
                     "[v6]:port)", s);
            return what;
        }
        hl = (size_t)(colon - s);
    }
    if (hl == 0 || hl >= 64) {
        snprintf(what, wl, "bad host in \"%s\"", s);
        return what;
    }
    memcpy(host, h, hl);
    host[hl] = '\0';
    if (!v6 && strcmp(host, "localhost") == 0)
        strcpy(host, "127.0.0.1");
    unsigned char buf[16];
    if (inet_pton(v6 ? AF_INET6 : AF_INET, host, buf) != 1) {
        snprintf(what, wl, "bad host \"%s\" (an IPv4 or [IPv6] literal)", host);
        return what;
    }
    uint64_t p;
    if (colon[1] == '\0') {
        snprintf(what, wl, "missing port in \"%s\" (use host:port)", s);
        return what;
    }
    if (parse_uint(colon + 1, &p, what, wl))
        return what;
    if (p > 65535) {
        snprintf(what, wl, "port %" PRIu64 " out of range (0..65535)", p);
        return what;
    }
    *port = (uint16_t)p;
    *loopback = is_loopback(host, v6);
    return NULL;
}

static const char *check_token(const char *s, const char *label, char *what,
                               size_t wl)
{
    size_t n = strlen(s);
    if (n == 0)
        return NULL;
    if (n < SC_TOKEN_MIN) {
        snprintf(what, wl, "%s too short (%zu bytes; at least %d)", label, n,
                 SC_TOKEN_MIN);
        return what;
    }
    if (n > SC_TOKEN_MAX) {
        snprintf(what, wl, "%s too long (%zu bytes; at most %d)", label, n,
                 SC_TOKEN_MAX);
        return what;
    }
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e) {
            snprintf(what, wl, "%s has a byte outside printable ASCII "
                     "(0x21..0x7e) at %zu", label, i);
            return what;
        }
    return NULL;
}

/* ---- printing values -------------------------------------------------------- */

static void format_scaled(uint64_t v, const unit *units, size_t nunits,
                          char *buf, size_t cap)
{
    if (v == 0) {
        snprintf(buf, cap, "0");
        return;
    }
    for (size_t i = nunits; i-- > 0;) {
        if (units[i].name[0] && v % units[i].mult == 0) {
            snprintf(buf, cap, "%" PRIu64 "%s", v / units[i].mult,
                     units[i].name);
            return;
        }
    }
    snprintf(buf, cap, "%" PRIu64 "B", v);
}

static void format_size(uint64_t v, char *buf, size_t cap)
{
    static const unit u[] = { { "B", 1 }, { "KiB", KIB }, { "MiB", MIB },
                              { "GiB", GIB }, { "TiB", 1024 * GIB } };
    format_scaled(v, u, 5, buf, cap);
}

static void format_dur(uint64_t ms, char *buf, size_t cap)
{
    format_scaled(ms, DUR_UNITS, 5, buf, cap);
}

/* Whether the config-file syntax would change `s` unquoted: trim its
 * spaces, start a comment at a '#', or read it as a quoted value. */
static bool needs_quotes(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || s[0] == '"' || isspace((unsigned char)s[0]) ||
        isspace((unsigned char)s[n - 1]))
        return true;
    for (size_t i = 0; i < n; i++)
        if (s[i] == '#' && (i == 0 || isspace((unsigned char)s[i - 1])))
            return true;
    return false;
}

static void format_value(const sc_config *c, const sc_opt *o, char *buf,
                         size_t cap)
{
    const char *p = (const char *)c + o->off;
    switch (o->type) {
    case T_STR:
    case T_LISTEN:
    case T_TOKEN:
    case T_URL:
    case T_SQL:
        if (o->secret && p[0])
            snprintf(buf, cap, "********");
        else if (needs_quotes(p))
            snprintf(buf, cap, "\"%s\"", p);
        else
            snprintf(buf, cap, "%s", p);
        break;
    case T_BOOL:
        snprintf(buf, cap, "%s", *(const bool *)(const void *)p ? "true" : "false");
        break;
    case T_UINT:
        snprintf(buf, cap, "%" PRIu64, *(const uint64_t *)(const void *)p);
        break;
    case T_SIZE:
        format_size(*(const uint64_t *)(const void *)p, buf, cap);
        break;
    case T_DUR:
        format_dur((uint64_t)*(const int64_t *)(const void *)p, buf, cap);
        break;
    case T_ENUM:
        snprintf(buf, cap, "%s", o->choices[*(const unsigned *)(const void *)p]);
        break;
    }
}

static const char *range_error(const sc_opt *o, uint64_t v, char *what,
                               size_t wl)
{
    if (v >= o->min && v <= o->max)
        return NULL;
    char lo[32], hi[32];
    if (o->type == T_SIZE) {
        format_size(o->min, lo, sizeof lo);
        format_size(o->max, hi, sizeof hi);
    } else if (o->type == T_DUR) {
        format_dur(o->min, lo, sizeof lo);
        format_dur(o->max, hi, sizeof hi);
    } else {
        snprintf(lo, sizeof lo, "%" PRIu64, o->min);
        snprintf(hi, sizeof hi, "%" PRIu64, o->max);
    }
    snprintf(what, wl, "out of range: must be between %s and %s", lo, hi);
    return what;
}

/* ---- applying one value -------------------------------------------------- */

static const char *parse_into(sc_config *c, const sc_opt *o, const char *v,
                              char *what, size_t wl)
{
    void *p = (char *)c + o->off;
    uint64_t u;
    switch (o->type) {
    case T_STR:
    case T_LISTEN:
    case T_TOKEN:
    case T_URL:
    case T_SQL:
        if (strlen(v) >= o->size) {
            snprintf(what, wl, "too long (at most %zu bytes)", o->size - 1);
            return what;
        }
        if (o->type == T_STR && o->off == offsetof(sc_config, data_dir) && !*v) {
            snprintf(what, wl, "must not be empty");
            return what;
        }
        if (o->type == T_LISTEN) {
            char host[64];
            uint16_t port;
            bool lo;
            if (parse_listen(v, host, &port, &lo, what, wl))
                return what;
        }
        if (o->type == T_TOKEN && check_token(v, "token", what, wl))
            return what;
        if (o->type == T_URL && *v && cfg_check_url(v, what, wl))
            return what;
        if (o->type == T_SQL && *v && cfg_check_query(v, what, wl))
            return what;
        memcpy(p, v, strlen(v) + 1);
        return NULL;
    case T_BOOL:
        return parse_bool(v, (bool *)p, what, wl);
    case T_ENUM:
        return parse_enum(v, o->choices, (unsigned *)p, what, wl);
    case T_UINT:
    case T_SIZE:
    case T_DUR:
        if (o->type == T_UINT ? parse_uint(v, &u, what, wl) != NULL
            : parse_scaled(v, o->type == T_SIZE ? SIZE_UNITS : DUR_UNITS, &u,
                           o->type == T_SIZE ? "size" : "duration", what, wl)
                  != NULL)
            return what;
        if (range_error(o, u, what, wl))
            return what;
        if (o->type == T_DUR)
            *(int64_t *)p = (int64_t)u;
        else
            *(uint64_t *)p = u;
        return NULL;
    }
    return NULL;
}

static int apply(cfg_ctx *x, const sc_opt *o, const char *value,
                 sc_source from, const char *where)
{
    char what[512];
    if (parse_into(x->c, o, value, what, sizeof what)) {
        /* the T_URL and T_TOKEN messages never quote the value; the
         * others do, unless it may hold a password */
        if (o->type != T_URL && o->type != T_TOKEN && cfg_looks_secret(value))
            snprintf(what, sizeof what, "invalid value <not shown: it looks "
                     "like a database URL or password>");
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: %s: %s", where,
                        o->name, what);
    }
    int i = opt_index(o);
    x->c->from[i] = (unsigned char)from;
    snprintf(x->where[i], CFG_WHERE_MAX, "%s", where);
    return 0;
}

/* ---- layers ------------------------------------------------------------------ */

static void trim(char **s, char **end)
{
    while (*s < *end && isspace((unsigned char)**s))
        (*s)++;
    while (*end > *s && isspace((unsigned char)(*end)[-1]))
        (*end)--;
}

/* One "key = value" line (already known not blank/comment). */
static int file_line(cfg_ctx *x, const char *path, unsigned lineno, char *line)
{
    char where[CFG_WHERE_MAX];
    snprintf(where, sizeof where, "%s:%u", path, lineno);
    char *eq = strchr(line, '=');
    if (!eq)
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: expected \"key = "
                        "value\"", where);
    char *k = line, *kend = eq;
    trim(&k, &kend);
    char *v = eq + 1, *vend;
    while (isspace((unsigned char)*v))
        v++;
    /* "quoted" values keep '#' and spaces; after the closing quote, or in
     * an unquoted value, a '#' after whitespace starts a comment */
    char *rest = v;
    char shown[300];
    if (*v == '"') {
        char *q = strchr(v + 1, '"');
        if (!q)
            return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: %s: "
                            "missing closing quote", where,
                            cfg_plain(k, (size_t)(kend - k), shown,
                                      sizeof shown));
        rest = q + 1;
    }
    vend = rest + strlen(rest);
    for (char *h = rest; *h; h++)
        if (*h == '#' && (h == rest ? rest != v : isspace((unsigned char)h[-1]))) {
            vend = h;
            break;
        }
    trim(&v, &vend);
    if (*v == '"') {
        if (vend != rest)
            return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: %s: text "
                            "after the closing quote", where,
                            cfg_plain(k, (size_t)(kend - k), shown,
                                      sizeof shown));
        v++;
        vend--;
    }
    *kend = '\0';
    *vend = '\0';
    const sc_opt *o = cfg_find_opt(k, strlen(k), false);
    if (!o)
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: %s: unknown option",
                        where, cfg_plain(k, strlen(k), shown, sizeof shown));
    return apply(x, o, v, SC_FROM_FILE, where);
}

#define LINE_MAX_BYTES 65536

enum { LINE_OK, LINE_EOF, LINE_LONG, LINE_NUL, LINE_ERR };

/* One line (without its '\n') into buf, at most LINE_MAX_BYTES.  Bounded,
 * so a file without newlines (a binary, /dev/zero) is refused instead of
 * read into memory; a NUL would silently cut a value short. */
static int read_line(FILE *f, char *buf, int *err)
{
    size_t n = 0;
    int ch;
    while ((ch = getc(f)) != EOF && ch != '\n') {
        if (ch == '\0')
            return LINE_NUL;
        if (n == LINE_MAX_BYTES)
            return LINE_LONG;
        buf[n++] = (char)ch;
    }
    buf[n] = '\0';
    if (ch == EOF && ferror(f)) {
        *err = errno;
        return LINE_ERR;
    }
    return ch == EOF && n == 0 ? LINE_EOF : LINE_OK;
}

static int load_file(cfg_ctx *x, const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: cannot open: %s",
                        path, strerror(errno));
    char *line = malloc(LINE_MAX_BYTES + 1);
    if (!line) {
        fclose(f);
        return cfg_fail(x, EX_SOFTWARE, "outboxd: out of memory");
    }
    unsigned lineno = 0;
    int rc = 0, r, err = 0;
    while (rc == 0 && (r = read_line(f, line, &err)) != LINE_EOF) {
        lineno++;
        if (r == LINE_ERR)
            rc = cfg_fail(x, EX_CONFIG, "outboxd: config: %s: cannot read: %s",
                          path, strerror(err));
        else if (r == LINE_LONG)
            rc = cfg_fail(x, EX_CONFIG, "outboxd: config: %s:%u: line longer "
                          "than %d bytes", path, lineno, LINE_MAX_BYTES);
        else if (r == LINE_NUL)
            rc = cfg_fail(x, EX_CONFIG, "outboxd: config: %s:%u: NUL byte in "
                          "the line", path, lineno);
        if (rc)
            break;
        char *s = line, *end = line + strlen(line);
        trim(&s, &end);
        *end = '\0';
        if (*s == '\0' || *s == '#')
            continue;
        rc = file_line(x, path, lineno, s);
    }
    free(line);
    fclose(f);
    return rc;
}

static int load_env(cfg_ctx *x, char **envp)
{
    for (size_t i = 0; i < SC_OPT_COUNT; i++) {
        char name[64], where[80];
        env_name(&OPTS[i], name, sizeof name);
        const char *v = cfg_env_get(envp, name);
        /* The unprefixed name platforms set for an attached database; the
         * OUTBOXD_ one wins when both are there. */
        if ((!v || !*v) && OPTS[i].off == offsetof(sc_config, database_url)) {
            snprintf(name, sizeof name, "DATABASE_URL");
            v = cfg_env_get(envp, name);
        }
        if (!v || !*v)
            continue;
        snprintf(where, sizeof where, "env %s", name);
        int rc = apply(x, &OPTS[i], v, SC_FROM_ENV, where);
        if (rc)
            return rc;
    }
    return 0;
}

/* A flag seen in argv, applied after the file and the environment. */
typedef struct flag_val {
    const sc_opt *opt;
    const char *value;
} flag_val;

bool cfg_looks_bool(const char *s)
{
    bool b;
    char what[64];
    return s && parse_bool(s, &b, what, sizeof what) == NULL;
}

/* argv[*i] is "--name[=value]": resolve it.  Returns 0, 64, or -1 for a
 * flag that ends the scan (help/version). */
static int scan_flag(cfg_ctx *x, int argc, char **argv, int *i,
                     flag_val *fv, const char **config_path)
{
    const char *a = argv[*i] + 2;
    const char *eq = strchr(a, '=');
    size_t n = eq ? (size_t)(eq - a) : strlen(a);
    if (!eq && strcmp(a, "help") == 0) {
        x->c->command = SC_CMD_HELP;
        return -1;
    }
    if (!eq && strcmp(a, "version") == 0) {
        x->c->command = SC_CMD_VERSION;
        return -1;
    }
    const sc_opt *o = cfg_find_opt(a, n, true);
    bool is_config = n == 6 && strncmp(a, "config", 6) == 0;
    if (!o && !is_config) {
        char shown[300];
        cfg_plain(a, n, shown, sizeof shown);
        return cfg_fail(x, EX_USAGE, "outboxd: unknown option %s%s (see "
                        "outboxd --help)",
                        strncmp(shown, "<not shown", 10) ? "--" : "", shown);
    }
    const char *v = eq ? eq + 1 : NULL;
    const char *next = *i + 1 < argc ? argv[*i + 1] : NULL;
    if (!v && o && o->type == T_BOOL) {
        if (cfg_looks_bool(next)) {
            v = next;
            (*i)++;
        } else {
            v = "true";
        }
    } else if (!v) {
        if (!next || strncmp(next, "--", 2) == 0)
            return cfg_fail(x, EX_USAGE, "outboxd: option --%.*s needs a value "
                            "(--%.*s=VALUE)", (int)n, a, (int)n, a);
        v = next;
        (*i)++;
    }
    if (is_config)
        *config_path = v;
    else
        fv->opt = o, fv->value = v;
    return 0;
}

/* Positional words: one command; `db` takes one subcommand after it.
 * *have: 0 none yet, 1 a command, 2 `db` waiting for its subcommand. */
static int scan_command(cfg_ctx *x, const char *a, int *have)
{
    char shown[300];
    if (*have == 2) {
        *have = 1;
        if (strcmp(a, "migrate") == 0)
            x->c->command = SC_CMD_DB_MIGRATE;
        else if (strcmp(a, "status") == 0)
            x->c->command = SC_CMD_DB_STATUS;
        else
            return cfg_fail(x, EX_USAGE, "outboxd: unknown db command %s "
                            "(db commands: migrate, status)",
                            cfg_quoted(a, strlen(a), shown, sizeof shown));
        return 0;
    }
    if (*have)
        return cfg_fail(x, EX_USAGE, "outboxd: unexpected argument %s (see "
                        "outboxd --help)",
                        cfg_quoted(a, strlen(a), shown, sizeof shown));
    *have = 1;
    if (strcmp(a, "run") == 0)
        x->c->command = SC_CMD_RUN;
    else if (strcmp(a, "config") == 0)
        x->c->command = SC_CMD_CONFIG;
    else if (strcmp(a, "db") == 0)
        *have = 2;
    else
        return cfg_fail(x, EX_USAGE, "outboxd: unknown command %s (commands: "
                        "run, config, db)",
                        cfg_quoted(a, strlen(a), shown, sizeof shown));
    return 0;
}

/* Pass over argv.  *nflags flags are stored in fv (capacity argc).
 * Returns 0, 64, or -1 when --help/--version ended the scan. */
static int scan_args(cfg_ctx *x, int argc, char **argv, flag_val *fv,
                     size_t *nflags, const char **config_path)
{
    int have_cmd = 0;
    *nflags = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int rc;
        if (strncmp(a, "--", 2) == 0 && a[2]) {
            flag_val f = { NULL, NULL };
            rc = scan_flag(x, argc, argv, &i, &f, config_path);
            if (rc == 0 && f.opt)
                fv[(*nflags)++] = f;
        } else if (strcmp(a, "-h") == 0) {
            x->c->command = SC_CMD_HELP;
            rc = -1;
        } else if (a[0] == '-') {
            char shown[300];
            rc = cfg_fail(x, EX_USAGE, "outboxd: unknown option %s (see "
                          "outboxd --help)",
                          cfg_plain(a, strlen(a), shown, sizeof shown));
        } else {
            rc = scan_command(x, a, &have_cmd);
        }
        if (rc)
            return rc;
    }
    if (have_cmd == 2)
        return cfg_fail(x, EX_USAGE, "outboxd: db needs a command: migrate or "
                        "status (see outboxd --help)");
    return 0;
}

/* ---- cross-option rules ---------------------------------------------------- */

int cfg_idx_of(size_t off)
{
    for (int i = 0; i < SC_OPT_COUNT; i++)
        if (OPTS[i].off == off)
            return i;
    return 0;
}

/* Of two options, the one set at the higher layer (the second on a tie). */
static int blame(const cfg_ctx *x, int a, int b)
{
    return x->c->from[a] > x->c->from[b] ? a : b;
}

static int read_token_file(cfg_ctx *x)
{
    sc_config *c = x->c;
    int i = cfg_idx_of(offsetof(sc_config, token_file));
    const char *where = x->where[i];
    FILE *f = fopen(c->token_file, "r");
    if (!f)
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: token_file: cannot "
                        "read %s: %s", where, c->token_file, strerror(errno));
    /* room for the longest token plus the "\r\n" an editor may add */
    char buf[SC_TOKEN_MAX + 3];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    bool more = fgetc(f) != EOF, err = ferror(f);
    fclose(f);
    buf[n] = '\0';
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        buf[--n] = '\0';
    bool fits = !more && n <= SC_TOKEN_MAX && n == strlen(buf);
    if (fits)
        memcpy(c->auth_token, buf, n + 1);
    volatile char *wipe = buf;
    for (size_t k = 0; k < sizeof buf; k++)
        wipe[k] = 0;
    char what[256];
    if (err)
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: token_file: cannot "
                        "read %s", where, c->token_file);
    if (!fits)
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: token_file: %s "
                        "does not hold a token of at most %d printable bytes",
                        where, c->token_file, SC_TOKEN_MAX);
    if (n == 0)
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: token_file: %s is "
                        "empty", where, c->token_file);
    if (check_token(c->auth_token, "the token in the file is", what, sizeof what))
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: token_file: %s",
                        where, what);
    return 0;
}

static int validate(cfg_ctx *x)
{
    sc_config *c = x->c;
    int tok = cfg_idx_of(offsetof(sc_config, token));
    int tf = cfg_idx_of(offsetof(sc_config, token_file));
    int li = cfg_idx_of(offsetof(sc_config, listen));
    int iw = cfg_idx_of(offsetof(sc_config, idempotency_window_ms));
    int rt = cfg_idx_of(offsetof(sc_config, retention_ms));
    char what[256];

    parse_listen(c->listen, c->bind_host, &c->port, &c->loopback, what,
                 sizeof what);
    if (c->token[0] && c->token_file[0]) {
        int b = blame(x, tok, tf);
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: %s: token and "
                        "token_file are both set (token from %s, token_file "
                        "from %s); set one", x->where[b], OPTS[b].name,
                        FROM_NAMES[c->from[tok]], FROM_NAMES[c->from[tf]]);
    }
    if (c->token_file[0]) {
        int rc = read_token_file(x);
        if (rc)
            return rc;
    } else {
        snprintf(c->auth_token, sizeof c->auth_token, "%s", c->token);
    }
    if (!c->loopback && !c->auth_token[0])
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: listen: %s is not "
                        "a loopback address, so a bearer token is required "
                        "(set OUTBOXD_TOKEN or token_file)", x->where[li],
                        c->listen);
    if (c->idempotency_window_ms > c->retention_ms) {
        char w[32], r[32];
        int b = blame(x, iw, rt);
        format_dur((uint64_t)c->idempotency_window_ms, w, sizeof w);
        format_dur((uint64_t)c->retention_ms, r, sizeof r);
        return cfg_fail(x, EX_CONFIG, "outboxd: config: %s: %s: "
                        "idempotency_window (%s) exceeds retention (%s): the "
                        "keys would outlive the log they are kept in",
                        x->where[b], OPTS[b].name, w, r);
    }
    return cfg_validate_db(x);
}

/* ---- public ------------------------------------------------------------------ */

int sc_config_load(sc_config *out, int argc, char **argv, char **envp,
                   char *err, size_t errlen)
{
    cfg_ctx *x = calloc(1, sizeof *x);
    if (!x) {
        snprintf(err, errlen, "outboxd: out of memory");
        return EX_SOFTWARE;
    }
    flag_val *fv = calloc((size_t)(argc > 0 ? argc : 1), sizeof *fv);
    if (!fv) {
        free(x);
        snprintf(err, errlen, "outboxd: out of memory");
        return EX_SOFTWARE;
    }
    memset(out, 0, sizeof *out);
    x->c = out;
    x->envp = envp;
    x->err = err;
    x->errlen = errlen;
    if (err && errlen)
        err[0] = '\0';

    int rc = 0;
    for (size_t i = 0; i < SC_OPT_COUNT && rc == 0; i++)
        rc = apply(x, &OPTS[i], OPTS[i].def, SC_FROM_DEFAULT, "default");

    size_t nflags = 0;
    const char *config_path = NULL;
    if (rc == 0)
        rc = scan_args(x, argc, argv, fv, &nflags, &config_path);
    if (rc == 0 && !config_path) {
        config_path = cfg_env_get(envp, "OUTBOXD_CONFIG");
        if (config_path && !*config_path)
            config_path = NULL;
    }
    if (rc == 0 && config_path) {
        snprintf(out->config_file, sizeof out->config_file, "%s", config_path);
        rc = load_file(x, config_path);
    }
    if (rc == 0)
        rc = load_env(x, envp);
    for (size_t i = 0; i < nflags && rc == 0; i++) {
        char where[80];
        flag_name(fv[i].opt, where + 5, sizeof where - 5);
        memcpy(where, "flag ", 5);
        rc = apply(x, fv[i].opt, fv[i].value, SC_FROM_FLAG, where);
    }
    if (rc == 0)
        rc = validate(x);
    if (rc == -1)
        rc = 0;                  /* --help / --version */
    if (rc)
        sc_config_wipe(out);
    free(fv);
    free(x);
    return rc;
}

void sc_config_print(const sc_config *c, FILE *f)
{
    for (size_t i = 0; i < SC_OPT_COUNT; i++) {
        char v[SC_PATH_MAX + 8];
        format_value(c, &OPTS[i], v, sizeof v);
        fprintf(f, "%s = %s  # from %s\n", OPTS[i].name, v,
                FROM_NAMES[c->from[i] < 4 ? c->from[i] : 0]);
    }
}

static const char *metavar(const sc_opt *o, char *buf, size_t cap)
{
    switch (o->type) {
    case T_LISTEN: return "HOST:PORT";
    case T_TOKEN:  return "TOKEN";
    case T_URL:    return "URL";
    case T_SQL:    return "SQL";
    case T_BOOL:   return "BOOL";
    case T_UINT:   return "N";
    case T_SIZE:   return "SIZE";
    case T_DUR:    return "DURATION";
    case T_STR:    return "PATH";
    case T_ENUM:
        buf[0] = '\0';
        for (size_t i = 0, n = 0; o->choices[i] && n < cap; i++)
            n += (size_t)snprintf(buf + n, cap - n, "%s%s", i ? "|" : "",
                                  o->choices[i]);
        return buf;
    }
    return "VALUE";
}

void sc_config_usage(FILE *f)
{
    fputs("usage: outboxd [run | config | db migrate | db status] "
          "[--option=value | --option value ...]\n"
          "       outboxd --help | --version\n"
          "\n"
          "commands:\n"
          "  run         start the daemon (the default)\n"
          "  config      print the effective configuration (secrets masked), "
          "then exit\n"
          "  db migrate  install or upgrade the outbox schema in the database "
          "(database_url,\n"
          "              DATABASE_URL or PG*): applies the pending migrations, "
          "prints each\n"
          "  db status   print the database's schema version and the pending "
          "migrations\n"
          "\n"
          "Each option is set, lowest precedence first, by its default, the "
          "config file\n"
          "(--config PATH or OUTBOXD_CONFIG: \"key = value\" lines, # "
          "comments), its\n"
          "environment variable, and its flag.  Sizes take B, KiB, MiB, GiB "
          "(k, M, G);\n"
          "durations ms, s, m, h, d.\n"
          "\n"
          "options:\n"
          "  --config=PATH  (OUTBOXD_CONFIG)\n"
          "      configuration file to read\n", f);
    for (size_t i = 0; i < SC_OPT_COUNT; i++) {
        const sc_opt *o = &OPTS[i];
        char flag[64], env[64], mv[64];
        flag_name(o, flag, sizeof flag);
        env_name(o, env, sizeof env);
        fprintf(f, "  %s=%s  (%s, default %s)\n      %s\n", flag,
                metavar(o, mv, sizeof mv), env, o->def[0] ? o->def : "none",
                o->help);
    }
    fputs("\nexit codes: 0 ok, 64 usage, 69 port unavailable, 70 internal, "
          "73 cannot create\nthe data directory, 75 data directory locked by "
          "another process, 78 configuration\n(also: PostgreSQL refused the "
          "connection, the check query does not fit, the\nschema is missing).  "
          "db migrate/status: 65 the database is newer than this\noutboxd or a "
          "migration failed, 69 PostgreSQL unreachable, 78 refused or no "
          "database.\n", f);
}

const char *sc_config_from(const sc_config *c, const char *name)
{
    const sc_opt *o = cfg_find_opt(name, strlen(name), false);
    if (!o)
        return NULL;
    unsigned v = c->from[opt_index(o)];
    return FROM_NAMES[v < 4 ? v : 0];
}
