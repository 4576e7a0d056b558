/*
 * fake_clock.h - a brk_clock that moves only when a test says so.
 *
 * Wall and monotonic time advance together through brk_fake_clock_advance;
 * brk_fake_clock_set_wall moves only the wall clock (to test steps back).
 * Reads and writes are atomic, so a store's background thread may read it
 * while the test advances it.
 */
#ifndef BROKER_TEST_FAKE_CLOCK_H
#define BROKER_TEST_FAKE_CLOCK_H

#include <stdatomic.h>
#include <stdint.h>

#include "broker/clock.h"

typedef struct brk_fake_clock {
    brk_clock clock;            /* hand &fc->clock to the code under test */
    _Atomic int64_t wall_ms;
    _Atomic int64_t mono_ns;
} brk_fake_clock;

/* Start at wall time `wall_ms` and monotonic time 1 s. */
void brk_fake_clock_init(brk_fake_clock *fc, int64_t wall_ms);
void brk_fake_clock_advance(brk_fake_clock *fc, int64_t ms);
void brk_fake_clock_set_wall(brk_fake_clock *fc, int64_t wall_ms);

#endif /* BROKER_TEST_FAKE_CLOCK_H */
