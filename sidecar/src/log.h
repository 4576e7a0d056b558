/*
 * log.h - outboxd's JSON-lines logger.
 *
 * Each line is one JSON object:
 *   {"time":"2026-11-25T13:14:02.123Z","level":"info","msg":"...","k":"v",...}
 * time is UTC with milliseconds; every field value is a string.  Strings are
 * escaped for JSON: '"' and '\' with a backslash, every control character
 * (and DEL) as \u00XX, and bytes that are not valid UTF-8 are replaced by
 * U+FFFD, so each line is valid JSON whatever the input.
 *
 * A line is handed to the kernel in one write(2) while a mutex is held, so
 * concurrent lines never interleave (also when the write is short and has to
 * be continued, or the descriptor is non-blocking and full: then the logger
 * waits for room, up to 2 s without progress, before it drops the rest of
 * the line).  Write errors are ignored; SIGPIPE is the caller's to ignore.
 * The logger implements the http_api logging seam (api_logger), so the HTTP
 * layer logs through it.
 *
 * Threads: every function but sc_log_close is thread-safe.
 */
#ifndef SC_LOG_H
#define SC_LOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "broker/clock.h"
#include "http_api/api.h"

typedef struct sc_log sc_log;

/* A logger writing lines of `level` and above to `out`'s file descriptor
 * (or, for a FILE without one, through stdio).  `out` is borrowed and stays
 * open.  NULL when out of memory. */
sc_log *sc_log_open(api_log_level level, FILE *out);

/* Free the logger (no line may be in progress).  NULL is a no-op. */
void sc_log_close(sc_log *l);

/* The clock for the "time" field (default brk_clock_system()); tests pass a
 * fixed one.  Call before any thread logs. */
void sc_log_set_clock(sc_log *l, const brk_clock *clock);

/* Whether a line of `level` would be written. */
bool sc_log_enabled(const sc_log *l, api_log_level level);

/* Write one line.  `fields` may be NULL when nfields is 0; a NULL value is
 * written as JSON null. */
void sc_log_write(sc_log *l, api_log_level level, const char *msg,
                  const api_log_field *fields, size_t nfields);

/* Write one line whose fields are the variadic key, value (const char *)
 * pairs, ended by a NULL key: sc_log_kv(l, API_LOG_INFO, "ready", "port",
 * "8080", NULL).  At most 16 pairs. */
void sc_log_kv(sc_log *l, api_log_level level, const char *msg, ...);

/* The api_logger view of `l`, valid while `l` is open. */
const api_logger *sc_log_api(sc_log *l);

/* "debug", "info", "warn", "error". */
const char *sc_log_level_name(api_log_level level);

#endif /* SC_LOG_H */
