/*
 * crash_util.c - helpers shared by the crash-exploration tests; see
 * crash_util.h.
 */
#include "crash_util.h"

#include <stdlib.h>

uint64_t crash_rng_next(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t crash_env_u64(const char *name, uint64_t def)
{
    const char *v = getenv(name);
    return v && *v ? strtoull(v, NULL, 10) : def;
}

bool crash_seed_async(uint64_t seed)
{
    uint64_t h = seed ^ 0x5A17A5C0FFEEull;
    return crash_rng_next(&h) % 3 == 0;
}
