/*
 * main.c - outboxd's entry point: argument dispatch only.
 *
 * Configuration (config.h) decides the command; the daemon (daemon.h) runs
 * it.  Exit codes are listed in daemon.h, config.h and sidecar/README.md.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sysexits.h>
#include <unistd.h>

#include "config.h"
#include "daemon.h"
#include "log.h"

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
    if (rc != 0) {
        fprintf(stderr, "%s\n", err);
    } else {
        switch (cfg->command) {
        case SC_CMD_HELP:    sc_config_usage(stdout); break;
        case SC_CMD_VERSION: printf("outboxd %s\n", OUTBOXD_VERSION); break;
        case SC_CMD_CONFIG:  sc_config_print(cfg, stdout); break;
        case SC_CMD_RUN:     rc = run(cfg); break;
        }
    }
    sc_config_wipe(cfg);
    free(cfg);
    return rc;
}
