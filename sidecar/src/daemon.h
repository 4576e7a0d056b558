/*
 * daemon.h - the outboxd process: wiring, signals, shutdown.
 *
 * sc_daemon owns every handle.  Build order: store -> delay -> [pgcheck] ->
 * txn -> groups -> [relay] -> api_server; teardown in reverse (api -> relay
 * -> groups -> txn -> pgcheck -> delay -> store).  The bracketed PostgreSQL
 * adapters exist when a database is configured (config.h) and, for the
 * relay, `relay` is on.  The thread model and the shutdown sequence are
 * described at the top of daemon.c and in sidecar/README.md.
 *
 * Exit codes (from <sysexits.h>) returned by these functions:
 *    0  clean shutdown (also when the shutdown grace ran out)
 *   69  EX_UNAVAILABLE  the listen address cannot be bound
 *   70  EX_SOFTWARE     any other failure to start (a component's open
 *                       failed, e.g. a corrupt store), or the store failed
 *                       to flush at close
 *   73  EX_CANTCREAT    the data directory cannot be created or used
 *   75  EX_TEMPFAIL     the data directory is locked by another process
 *   78  EX_CONFIG       PostgreSQL: the connection was refused (password,
 *                       role, database), the check query does not fit, or
 *                       the outbox schema is missing ("outboxd: postgres:
 *                       <reason>").  An unreachable server is not an error:
 *                       the daemon starts and warns.
 * (64 and 78 also come from configuration, config.h.)
 */
#ifndef SC_DAEMON_H
#define SC_DAEMON_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/clock.h"
#include "config.h"
#include "log.h"
#include "pg.h"

typedef struct sc_daemon sc_daemon;

/* Make sure descriptors 0, 1 and 2 are open, on /dev/null where they were
 * closed: otherwise the first files the store opens would get them, and
 * the logger (fd 2) would write its lines into the commit log.  Call first
 * in main, before any file is opened.  0, or -1 when /dev/null cannot be
 * opened (exit 70; nowhere to say so). */
int sc_daemon_std_fds(void);

/* Block SIGTERM, SIGINT and SIGHUP in the calling thread (and so in every
 * thread started after it) and ignore SIGPIPE; *set receives the three
 * signals for sigwait.  Call before any thread starts. */
void sc_daemon_block_signals(sigset_t *set);

/* The PostgreSQL connection settings of `cfg` (database_url, password
 * file, timeouts) into *o, with `clock` (NULL: the system clock) for the
 * reconnect backoff.  The strings are borrowed from cfg.  Used for the
 * check-back pool, the relay and `outboxd db`. */
void sc_daemon_pg_opts(const sc_config *cfg, const brk_clock *clock,
                       sc_pg_opts *o);

/* Open every component in build order and start serving.  `cfg` and `log`
 * are borrowed and must outlive the daemon.  Returns 0, or an exit code
 * (69, 70, 73, 75, 78) with *out NULL, everything opened so far closed again,
 * and `err` holding "outboxd: <component>: <reason>". */
int sc_daemon_open(sc_daemon **out, const sc_config *cfg, sc_log *log,
                   char *err, size_t errlen);

/* The HTTP port bound (the chosen one when listen asked for port 0). */
uint16_t sc_daemon_port(const sc_daemon *d);

/* Shutdown, steps 1-2: HTTP readiness false at once, new prepares and sends
 * refused (503), parked long polls answered; then wait up to
 * cfg->shutdown_grace for in-flight exchanges, returning early when one of
 * `stop` (may be NULL) arrives again.  True when everything finished in
 * time, false when the grace expired or was skipped. */
bool sc_daemon_drain(sc_daemon *d, const sigset_t *stop);

/* Shutdown, step 3: close the HTTP server (cutting what is left), the
 * relay, groups, transactions, the check-back pool, delays, and last the
 * store (which flushes), logging each, and free.  Returns 0, or 70 when the store's final flush failed.  NULL:
 * returns 0. */
int sc_daemon_close(sc_daemon *d);

/* The whole life of `outboxd run`: block signals, open, wait for SIGTERM or
 * SIGINT (SIGHUP is logged and ignored), drain, close.  Returns the exit
 * code; on a start failure `err` holds the one-line message. */
int sc_daemon_run(const sc_config *cfg, sc_log *log, char *err, size_t errlen);

#endif /* SC_DAEMON_H */
