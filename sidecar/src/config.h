/*
 * config.h - outboxd's configuration: one table of options, four layers.
 *
 * Every option is a row of one static table (config.c): its name (the
 * config-file key; the flag is "--" + name with '_' -> '-'; the environment
 * variable is "OUTBOXD_" + the upper-cased name), its type, default, range,
 * whether it is a secret, and its help text.  Parsing, validation, `outboxd
 * config` and `outboxd --help` are all driven by that table, so they cannot
 * disagree.
 *
 * Layers, lowest first: built-in defaults < config file (`--config PATH` or
 * OUTBOXD_CONFIG; `key = value` lines) < environment < command-line flags.
 *
 * Types and their syntax
 *   string    taken verbatim (file values may be "double-quoted"); also
 *             database_url (a secret: masked, never echoed in errors) and
 *             check_query (must contain $1)
 *   bool      true/false, yes/no, on/off, 1/0
 *   uint      decimal digits
 *   size      digits with B, KiB, MiB, GiB, TiB (binary; also k/K, M, G, T);
 *             no unit = bytes
 *   duration  digits with ms, s, m, h or d; a bare 0 is allowed
 *   enum      one of a fixed list of words
 *
 * PostgreSQL (issue 6) is "configured" when database_url is set (also from
 * the unprefixed DATABASE_URL variable when OUTBOXD_DATABASE_URL is not),
 * or when the environment has PGHOST, PGHOSTADDR, PGDATABASE or PGSERVICE:
 * then libpq's PG* variables say where to connect.  sc_config_load reads
 * them from `envp` into db_configured; nothing else looks at the process
 * environment.
 *
 * Errors: every invalid value is one line
 *   "outboxd: config: <source>: <name>: <what is wrong>"
 * where <source> is "PATH:LINE", "env OUTBOXD_X", "flag --x" or "default",
 * and sc_config_load returns 78 (EX_CONFIG).  Command-line syntax errors
 * (unknown flag or command, a flag missing its value) return 64 (EX_USAGE).
 */
#ifndef SC_CONFIG_H
#define SC_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define SC_PATH_MAX      4096
#define SC_LISTEN_MAX    128
#define SC_TOKEN_MIN     16
#define SC_TOKEN_MAX     1024
#define SC_URL_MAX       4096    /* database_url, bytes */
#define SC_QUERY_MAX     4096    /* check_query, bytes */
#define SC_OPT_COUNT     39      /* rows in the option table */

typedef enum sc_command {
    SC_CMD_RUN = 0,              /* `outboxd` or `outboxd run` */
    SC_CMD_CONFIG,               /* `outboxd config` */
    SC_CMD_HELP,                 /* `--help` / `-h` */
    SC_CMD_VERSION,              /* `--version` */
    SC_CMD_DB_MIGRATE,           /* `outboxd db migrate` (migrate.h) */
    SC_CMD_DB_STATUS             /* `outboxd db status` */
} sc_command;

/* Where an option's value came from (the `# from` column of `config`). */
typedef enum sc_source {
    SC_FROM_DEFAULT = 0,
    SC_FROM_FILE,
    SC_FROM_ENV,
    SC_FROM_FLAG
} sc_source;

enum { SC_FLUSH_SYNC = 0, SC_FLUSH_ASYNC = 1 };            /* `flush` */
enum { SC_EXHAUSTED_ROLLBACK = 0, SC_EXHAUSTED_HOLD = 1 }; /* check_on_exhausted,
                                                    = brk_exhausted_action */
/* log_level: 0 debug, 1 info, 2 warn, 3 error (= api_log_level). */

/* The effective configuration.  Plain data, no heap: copy or zero freely.
 * Durations are in milliseconds, sizes in bytes. */
typedef struct sc_config {
    sc_command command;
    char config_file[SC_PATH_MAX];   /* "" when none was given */

    /* ---- options, in table order ---- */
    char     data_dir[SC_PATH_MAX];
    char     listen[SC_LISTEN_MAX];
    uint64_t threads;                /* 0 = online cores */
    uint64_t workers;                /* request threads (api_config.workers) */
    uint64_t max_connections;
    int64_t  idle_timeout_ms;
    uint64_t max_body;
    char     token[SC_TOKEN_MAX + 1];      /* secret */
    char     token_file[SC_PATH_MAX];
    unsigned flush;                  /* SC_FLUSH_* */
    int64_t  flush_interval_ms;
    uint64_t group_commit_delay_us;
    uint64_t segment_size;
    uint64_t disk_budget;            /* 0 = unlimited */
    int64_t  retention_ms;
    uint64_t max_message;
    bool     auto_create_topics;
    uint64_t default_queues;
    int64_t  check_first_ms;
    int64_t  check_interval_ms;
    uint64_t check_max;
    unsigned check_on_exhausted;     /* SC_EXHAUSTED_* */
    uint64_t check_workers;
    int64_t  delay_max_ms;
    char     database_url[SC_URL_MAX];     /* secret: may hold a password */
    char     database_password_file[SC_PATH_MAX];
    uint64_t db_pool;                /* check-back connections */
    int64_t  db_statement_timeout_ms;
    int64_t  db_connect_timeout_ms;
    char     check_query[SC_QUERY_MAX];    /* "" = the built-in query */
    bool     relay;                  /* relay outbox.messages into the store */
    uint64_t relay_batch;
    int64_t  relay_poll_interval_ms;
    int64_t  invisible_default_ms;
    int64_t  default_wait_ms;
    int64_t  idempotency_window_ms;
    uint64_t idempotency_max_keys;
    int64_t  shutdown_grace_ms;
    unsigned log_level;              /* api_log_level */

    /* ---- derived by validation ---- */
    char     bind_host[64];          /* IP literal from `listen`, no brackets */
    uint16_t port;                   /* from `listen`; 0 = any free port */
    bool     loopback;               /* bind_host is 127.0.0.0/8 or ::1 */
    char     auth_token[SC_TOKEN_MAX + 1]; /* token or token_file's content;
                                        "" = no authentication */
    bool     db_configured;          /* database_url set, or PGHOST,
                                        PGHOSTADDR, PGDATABASE or PGSERVICE
                                        in the environment */
    unsigned char from[SC_OPT_COUNT];/* sc_source of each option */
} sc_config;

/* Parse argv (argv[0] is the program name), the environment `envp` (a
 * NULL-terminated "NAME=value" array; never `environ` itself, so tests pass
 * their own) and the config file they name, into *out.
 * Returns 0 (out->command says what to do), 78 (EX_CONFIG: an invalid value
 * or combination), 64 (EX_USAGE: bad command line) or 70 (out of memory);
 * on error `err` holds
 * the one-line message (no newline).  --help and --version return at once,
 * before any value is checked.  Reads the token file, when one is set, and
 * checks that database_password_file can be read (its content is left to
 * the connection, so a rotated password is picked up on reconnect). */
int sc_config_load(sc_config *out, int argc, char **argv, char **envp,
                   char *err, size_t errlen);

/* `outboxd config`: one "name = value  # from <source>" line per option in
 * table order, secrets as ********. */
void sc_config_print(const sc_config *c, FILE *f);

/* `outboxd --help`: usage, commands, and every option with its flag,
 * environment variable, default and help. */
void sc_config_usage(FILE *f);

/* Where option `name` came from: "default", "file", "env", "flag"; NULL for
 * an unknown name. */
const char *sc_config_from(const sc_config *c, const char *name);

/* Overwrite the secrets held in *c (the token, the database URL) before
 * freeing or exiting. */
void sc_config_wipe(sc_config *c);

/* Overwrite, in place, the values of secret flags in argv (--token,
 * --database-url: "--token=VALUE" or "--token VALUE", read the way
 * sc_config_load reads them) with '*' of the same length, so that
 * /proc/PID/cmdline (ps, top: readable by every user) no longer shows
 * them.  Call after sc_config_load, which copied them.  There is a moment
 * between exec and this call when they are visible: prefer the environment
 * or a file for secrets. */
void sc_config_hide_secrets(int argc, char **argv);

#endif /* SC_CONFIG_H */
