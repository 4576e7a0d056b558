/*
 * clock_sys.c - the real clock behind the brk_clock seam.
 *
 * now_ms reads CLOCK_REALTIME because record timestamps and retention ages
 * are wall-clock facts that must mean the same thing after a restart or on
 * another host.  mono_ns reads CLOCK_MONOTONIC because intervals (flush
 * timers, group-commit waits, fsync latency) must not jump when NTP or an
 * operator steps the wall clock.
 *
 * Stateless, so one static instance serves the whole process.
 */
/* The build passes -D_GNU_SOURCE; without it, -std=c11 hides clock_gettime,
 * so ask for POSIX.1-2008 explicitly.  Feature-test macros are the one
 * place a leading underscore is ours to define. */
#if !defined(_GNU_SOURCE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif

#include "broker/clock.h"

#include <time.h>

static int64_t sys_now_ms(void *ctx)
{
    struct timespec ts;

    (void)ctx;
    /* CLOCK_REALTIME cannot fail with a valid timespec pointer. */
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + (int64_t)(ts.tv_nsec / 1000000);
}

static int64_t sys_mono_ns(void *ctx)
{
    struct timespec ts;

    (void)ctx;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + (int64_t)ts.tv_nsec;
}

static const brk_clock sys_clock = {
    .now_ms = sys_now_ms,
    .mono_ns = sys_mono_ns,
    .ctx = NULL,
};

const brk_clock *brk_clock_system(void)
{
    return &sys_clock;
}
