/*
 * config_priv.h - what config.c and config_db.c share (sidecar private;
 * the public API is config.h).
 *
 *   config.c     the option table, the value parsers, the four layers,
 *                the cross-option rules, `outboxd config`, `--help`
 *   config_db.c  the PostgreSQL options' checks (database_url through
 *                libpq, check_query, "a database is configured", the
 *                password file) and the secrets options carry (what looks
 *                like one, so no message quotes it; wiping; hiding secret
 *                flags in argv)
 */
#ifndef SC_CONFIG_PRIV_H
#define SC_CONFIG_PRIV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"

typedef enum sc_type {
    T_STR,       /* any text (data_dir must not be empty) */
    T_LISTEN,    /* host:port */
    T_TOKEN,     /* bearer token: "" or 16..1024 printable bytes */
    T_URL,       /* a PostgreSQL URL or conninfo; never echoed */
    T_SQL,       /* "" or a query using $1 */
    T_BOOL,
    T_UINT,
    T_SIZE,
    T_DUR,
    T_ENUM
} sc_type;

/* A row of the option table (OPTS in config.c). */
typedef struct sc_opt {
    const char *name;
    sc_type type;
    size_t off, size;            /* the field in sc_config */
    const char *def;             /* default, in input syntax */
    bool secret;
    uint64_t min, max;           /* UINT/SIZE: the value; DUR: ms */
    const char *const *choices;  /* ENUM, NULL-terminated */
    const char *help;
} sc_opt;

#define CFG_WHERE_MAX 300

/* State of one sc_config_load call. */
typedef struct cfg_ctx {
    sc_config *c;
    char **envp;                           /* for the PG* variables */
    char *err;
    size_t errlen;
    char where[SC_OPT_COUNT][CFG_WHERE_MAX];  /* source text of each value */
} cfg_ctx;

/* ---- config.c ------------------------------------------------------------ */

/* Writes the one-line message into x->err; returns `code`. */
int cfg_fail(cfg_ctx *x, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The option named by `name` (len bytes; with `dashes`, '-' stands for
 * '_', as in a flag), or NULL. */
const sc_opt *cfg_find_opt(const char *name, size_t len, bool dashes);

/* The index in the table of the option whose field is at offset `off`. */
int cfg_idx_of(size_t off);

/* The value of `name` in envp ("NAME=value"), or NULL. */
const char *cfg_env_get(char **envp, const char *name);

/* Whether `s` (may be NULL) reads as a boolean value. */
bool cfg_looks_bool(const char *s);

/* ---- config_db.c --------------------------------------------------------- */

/* Whether `s` may carry a credential: such text is never quoted. */
bool cfg_looks_secret(const char *s);

/* `s` (n bytes) in double quotes for a message, or a placeholder when it
 * looks secret; into buf[cap], returned. */
const char *cfg_quoted(const char *s, size_t n, char *buf, size_t cap);

/* `s` (n bytes) as it is, or the placeholder; into buf[cap], returned. */
const char *cfg_plain(const char *s, size_t n, char *buf, size_t cap);

/* Checks of one non-empty value of database_url / check_query: NULL, or
 * what is wrong in what[wl] (never quoting the value). */
const char *cfg_check_url(const char *v, char *what, size_t wl);
const char *cfg_check_query(const char *v, char *what, size_t wl);

/* After every layer: sets x->c->db_configured; 0, or 78 with x->err set
 * when an option needs a database and there is none, or the password file
 * cannot be used. */
int cfg_validate_db(cfg_ctx *x);

#endif /* SC_CONFIG_PRIV_H */
