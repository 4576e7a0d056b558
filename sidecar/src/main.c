/*
 * main.c - outboxd's entry point: argument dispatch only.
 *
 * Configuration (config.h) decides the command; the daemon (daemon.h) runs
 * it, and `db migrate` / `db status` go to migrate.h with the connection
 * settings the daemon would use.  Exit codes are listed in daemon.h,
 * config.h, migrate.h and sidecar/README.md.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sysexits.h>
#include <unistd.h>

#include "config.h"
#include "daemon.h"
#include "log.h"
#include "migrate.h"

#ifndef OUTBOXD_VERSION
#define OUTBOXD_VERSION "unknown"
#endif

extern char **environ;

static int run(const sc_config *cfg)
{
    char err[8192];
    sc_log *log = sc_log_open((api_log_level)cfg->log_level, stderr);
    if (!log) {
        fputs("outboxd: out of memory\n", stderr);
        return EX_SOFTWARE;
    }
    int rc = sc_daemon_run(cfg, log, err, sizeof err);
    if (rc != 0 && err[0])
        fprintf(stderr, "%s\n", err);
    sc_log_close(log);
    return rc;
}

/* `outboxd db migrate|status`: progress on stdout, one error line on
 * stderr, migrate.h's exit code. */
static int db(const sc_config *cfg)
{
    const char *what = cfg->command == SC_CMD_DB_MIGRATE ? "migrate" : "status";
    if (!cfg->db_configured) {
        fprintf(stderr, "outboxd: db %s: no database configured (set "
                "database_url or DATABASE_URL, or PGHOST, PGDATABASE or "
                "PGSERVICE)\n", what);
        return EX_CONFIG;
    }
    char err[2048] = "";
    sc_pg_opts o;
    sc_daemon_pg_opts(cfg, NULL, &o);
    o.application_name = "outboxd db";
    int rc = cfg->command == SC_CMD_DB_MIGRATE
                 ? sc_db_migrate(&o, stdout, err, sizeof err)
                 : sc_db_status(&o, stdout, err, sizeof err);
    fflush(stdout);
    if (rc != 0)
        fprintf(stderr, "outboxd: db %s: %s\n", what,
                err[0] ? err : "failed");
    return rc;
}

int main(int argc, char **argv)
{
    char err[8192];
    if (sc_daemon_std_fds() != 0)
        return EX_SOFTWARE;
    sc_config *cfg = malloc(sizeof *cfg);
    if (!cfg) {
        fputs("outboxd: out of memory\n", stderr);
        return EX_SOFTWARE;
    }
    int rc = sc_config_load(cfg, argc, argv, environ, err, sizeof err);
    /* ps and /proc/PID/cmdline show argv to every user */
    sc_config_hide_secrets(argc, argv);
    if (rc != 0) {
        fprintf(stderr, "%s\n", err);
    } else {
        switch (cfg->command) {
        case SC_CMD_HELP:       sc_config_usage(stdout); break;
        case SC_CMD_VERSION:    printf("outboxd %s\n", OUTBOXD_VERSION); break;
        case SC_CMD_CONFIG:     sc_config_print(cfg, stdout); break;
        case SC_CMD_RUN:        rc = run(cfg); break;
        case SC_CMD_DB_MIGRATE:
        case SC_CMD_DB_STATUS:  rc = db(cfg); break;
        }
    }
    sc_config_wipe(cfg);
    free(cfg);
    return rc;
}
