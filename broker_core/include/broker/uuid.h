/*
 * broker/uuid.h - UUIDv7 message ids (RFC 9562).
 *
 * Layout (big-endian, 16 bytes):
 *   48 bits unix_ts_ms | 4 bits version (0111) | 12 bits rand_a
 *   2 bits variant (10) | 62 bits rand_b
 * rand_a is used as a counter (RFC 9562 method 1, "fixed-length dedicated
 * counter"), so ids from one generator are strictly increasing even within
 * one millisecond and when the clock steps back a little: the generator
 * never goes below the last timestamp it issued.  rand_b comes from a
 * xoshiro256** stream seeded from getrandom(); ids are unique, not secret.
 */
#ifndef BROKER_UUID_H
#define BROKER_UUID_H

#include <stddef.h>
#include <stdint.h>

#include "broker/clock.h"
#include "broker/status.h"

#define BRK_UUID_LEN 16
#define BRK_UUID_STR_LEN 36     /* without the terminating NUL */

typedef struct brk_uuidgen brk_uuidgen;

/* Create a generator reading time from `clock` (borrowed; must outlive the
 * generator).  `seed` 0 seeds from the OS; any other value gives a
 * reproducible stream (tests).  Free with brk_uuidgen_close. */
brk_status brk_uuidgen_open(brk_uuidgen **out, const brk_clock *clock,
                            uint64_t seed);
void brk_uuidgen_close(brk_uuidgen *g);

/* Write the next id into out[16].  Thread-safe. */
void brk_uuidgen_next(brk_uuidgen *g, uint8_t out[BRK_UUID_LEN]);

/* Format as the canonical lower-case 8-4-4-4-12 form plus NUL (37 bytes). */
void brk_uuid_format(const uint8_t id[BRK_UUID_LEN],
                     char out[BRK_UUID_STR_LEN + 1]);

/* Parse the canonical form (either case).  BRK_INVAL on anything else,
 * including a wrong length or missing dashes. */
brk_status brk_uuid_parse(const char *s, size_t len,
                          uint8_t out[BRK_UUID_LEN]);

/* The 48-bit millisecond timestamp inside a v7 id. */
int64_t brk_uuid_time_ms(const uint8_t id[BRK_UUID_LEN]);

#endif /* BROKER_UUID_H */
