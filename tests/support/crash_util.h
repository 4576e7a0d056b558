/*
 * crash_util.h - small helpers shared by the seeded crash-exploration tests
 * (test_crash, test_txn_crash, test_group_crash, test_delay): a splitmix64
 * generator, reading a size or seed from the environment, and the store mode
 * a workload seed picks.
 */
#ifndef BROKER_TEST_CRASH_UTIL_H
#define BROKER_TEST_CRASH_UTIL_H

#include <stdbool.h>
#include <stdint.h>

/* splitmix64: advances *x and returns the next value.  Any start is fine. */
uint64_t crash_rng_next(uint64_t *x);

/* Environment variable `name` as a decimal number; def when unset or empty. */
uint64_t crash_env_u64(const char *name, uint64_t def);

/* The store mode of a workload, from its seed alone (replays stay exact):
 * true (ASYNC) for about one seed in three. */
bool crash_seed_async(uint64_t seed);

#endif
