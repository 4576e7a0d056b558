/*
 * broker/clock.h - the time seam.
 *
 * Core logic never reads the system clock directly: it asks a brk_clock
 * handed in at open.  Tests pass a clock they move by hand, so timing rules
 * (retention age, check-back schedules, delays) are tested without sleeping.
 *
 * now_ms is wall time (milliseconds since the Unix epoch): it is stored in
 * records and compared with user-given deadlines.  mono_ns is a monotonic
 * nanosecond counter for measuring intervals; it never goes backwards.
 */
#ifndef BROKER_CLOCK_H
#define BROKER_CLOCK_H

#include <stdint.h>

typedef struct brk_clock {
    int64_t (*now_ms)(void *ctx);   /* wall clock, ms since 1970-01-01 UTC */
    int64_t (*mono_ns)(void *ctx);  /* monotonic ns, arbitrary origin */
    void *ctx;                      /* passed back to both functions */
} brk_clock;

/* The process-wide real clock (CLOCK_REALTIME / CLOCK_MONOTONIC).  Static
 * storage; never freed. */
const brk_clock *brk_clock_system(void);

#endif /* BROKER_CLOCK_H */
