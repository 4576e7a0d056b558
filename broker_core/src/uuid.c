/*
 * uuid.c - UUIDv7 message ids (RFC 9562).
 *
 * Byte layout of one id (big-endian, so byte order == sort order):
 *
 *   byte  0..5   unix_ts_ms, 48 bits
 *   byte  6      0x7_ : version 7 in the high nibble, counter bits 11..8
 *   byte  7      counter bits 7..0                    (rand_a, 12 bits)
 *   byte  8      0b10______ : variant in the top two bits, rand_b 61..56
 *   byte  9..15  rand_b bits 55..0
 *
 * Monotonicity (RFC 9562 section 6.2, method 1, fixed-length dedicated
 * counter in rand_a).  The generator remembers the timestamp it last issued
 * (last_ms) and the counter beside it:
 *   - clock ahead of last_ms: take the clock, counter = 0;
 *   - clock equal to or behind last_ms (same millisecond, or the wall clock
 *     was stepped back): keep last_ms, counter + 1;
 *   - counter past 0xFFF: last_ms + 1, counter = 0.  The id runs at most a
 *     few ms ahead of the clock under extreme load and never repeats.
 * So ids from one generator are strictly increasing as 16-byte big-endian
 * strings, which is what keeps the per-segment id index and "newest wins"
 * lookups simple.
 *
 * Why the counter starts at 0 each millisecond rather than at a random
 * value: it gives the full 4096 ids per ms before the timestamp has to run
 * ahead, and makes the overflow point deterministic for tests.  Uniqueness
 * across generators (other processes, restarts within one ms) comes from
 * the 62 random bits of rand_b, not from the counter.
 *
 * rand_b comes from xoshiro256** (fast, 256-bit state, passes BigCrush).
 * It is seeded from getrandom() or, for reproducible tests, from the
 * caller's seed expanded with splitmix64 (the seeding its authors
 * recommend).  Ids are unique, not secret: nothing here is meant to be
 * unpredictable to an attacker.
 *
 * Clock values below 0 are treated as 0; timestamps are kept to 48 bits,
 * which lasts until the year 10889.
 */
#include "broker/uuid.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define UUID_TS_MASK     ((UINT64_C(1) << 48) - 1)
#define UUID_COUNTER_MAX 0xFFFu

/* Lock inventory: `lock` is the only lock; it is held for one clock read,
 * a few arithmetic steps and one PRNG step per id, and nothing else is
 * called while holding it. */
struct brk_uuidgen {
    pthread_mutex_t lock;       /* guards last_ms, counter, rng */
    const brk_clock *clock;     /* borrowed from the opener; immutable */
    uint64_t last_ms;           /* timestamp of the last id issued; lock */
    uint32_t counter;           /* rand_a of the last id, 0..0xFFF; lock */
    bool issued;                /* false until the first id; lock */
    uint64_t rng[4];            /* xoshiro256** state, never all zero; lock */
};

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += UINT64_C(0x9E3779B97F4A7C15));

    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static uint64_t rotl64(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t xoshiro_next(uint64_t s[4])
{
    uint64_t result = rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;

    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

/* Fill the state from the OS.  getrandom() of 32 bytes does not return short
 * once the pool is initialised, but EINTR is possible while it is not, so
 * loop.  BRK_IO if the kernel cannot give us entropy. */
static brk_status seed_from_os(uint64_t s[4])
{
    uint8_t buf[sizeof(uint64_t) * 4];
    size_t got = 0;

    while (got < sizeof buf) {
        ssize_t n = getrandom(buf + got, sizeof buf - got, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return BRK_IO;
        }
        got += (size_t)n;
    }
    memcpy(s, buf, sizeof buf);
    return BRK_OK;
}

brk_status brk_uuidgen_open(brk_uuidgen **out, const brk_clock *clock,
                            uint64_t seed)
{
    brk_uuidgen *g;
    brk_status st;

    if (out == NULL)
        return BRK_INVAL;
    *out = NULL;
    if (clock == NULL || clock->now_ms == NULL)
        return BRK_INVAL;

    g = calloc(1, sizeof *g);
    if (g == NULL)
        return BRK_NOMEM;
    g->clock = clock;

    if (seed == 0) {
        st = seed_from_os(g->rng);
        if (st != BRK_OK)
            goto fail_free;
    } else {
        uint64_t x = seed;
        for (int i = 0; i < 4; i++)
            g->rng[i] = splitmix64(&x);
    }
    /* xoshiro's one bad state; splitmix64 never yields it, getrandom only
     * with probability 2^-256, but a stuck-at-zero stream would be silent. */
    if ((g->rng[0] | g->rng[1] | g->rng[2] | g->rng[3]) == 0) {
        uint64_t x = 1;
        for (int i = 0; i < 4; i++)
            g->rng[i] = splitmix64(&x);
    }

    if (pthread_mutex_init(&g->lock, NULL) != 0) {
        st = BRK_NOMEM;
        goto fail_free;
    }
    *out = g;
    return BRK_OK;

fail_free:
    free(g);
    return st;
}

void brk_uuidgen_close(brk_uuidgen *g)
{
    if (g == NULL)
        return;
    pthread_mutex_destroy(&g->lock);
    free(g);
}

void brk_uuidgen_next(brk_uuidgen *g, uint8_t out[BRK_UUID_LEN])
{
    int64_t now = g->clock->now_ms(g->clock->ctx);
    uint64_t ms = now < 0 ? 0 : (uint64_t)now & UUID_TS_MASK;
    uint64_t ts, rb;
    uint32_t ctr;

    /* The clock is read outside the lock: a value that is stale by the time
     * we get the lock only makes us take the "not ahead" branch, which is
     * still monotonic. */
    pthread_mutex_lock(&g->lock);
    if (!g->issued || ms > g->last_ms) {
        g->last_ms = ms;
        g->counter = 0;
        g->issued = true;
    } else if (g->counter < UUID_COUNTER_MAX) {
        g->counter++;
    } else {
        g->last_ms = (g->last_ms + 1) & UUID_TS_MASK;
        g->counter = 0;
    }
    ts = g->last_ms;
    ctr = g->counter;
    rb = xoshiro_next(g->rng);
    pthread_mutex_unlock(&g->lock);

    out[0] = (uint8_t)(ts >> 40);
    out[1] = (uint8_t)(ts >> 32);
    out[2] = (uint8_t)(ts >> 24);
    out[3] = (uint8_t)(ts >> 16);
    out[4] = (uint8_t)(ts >> 8);
    out[5] = (uint8_t)ts;
    out[6] = (uint8_t)(0x70u | (ctr >> 8));
    out[7] = (uint8_t)(ctr & 0xFFu);
    /* xoshiro256**'s high bits are its best; keep the top 62. */
    out[8] = (uint8_t)(0x80u | ((rb >> 58) & 0x3Fu));
    for (int i = 9; i < 16; i++)
        out[i] = (uint8_t)(rb >> (8 * (15 - i) + 2));
}

static const char uuid_hex[] = "0123456789abcdef";

/* Byte index at which each dash of 8-4-4-4-12 follows. */
static bool uuid_dash_at(size_t i)
{
    return i == 8 || i == 13 || i == 18 || i == 23;
}

void brk_uuid_format(const uint8_t id[BRK_UUID_LEN],
                     char out[BRK_UUID_STR_LEN + 1])
{
    size_t o = 0;

    for (size_t i = 0; i < BRK_UUID_LEN; i++) {
        if (uuid_dash_at(o))
            out[o++] = '-';
        out[o++] = uuid_hex[id[i] >> 4];
        out[o++] = uuid_hex[id[i] & 0x0Fu];
    }
    out[o] = '\0';
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

brk_status brk_uuid_parse(const char *s, size_t len,
                          uint8_t out[BRK_UUID_LEN])
{
    uint8_t tmp[BRK_UUID_LEN];
    size_t o = 0;

    if (s == NULL || out == NULL || len != BRK_UUID_STR_LEN)
        return BRK_INVAL;
    /* Strict: exactly the canonical shape.  No braces, no "urn:uuid:",
     * no dash-less form, so one id has exactly two spellings (by case). */
    for (size_t i = 0; i < len; ) {
        if (uuid_dash_at(i)) {
            if (s[i] != '-')
                return BRK_INVAL;
            i++;
            continue;
        }
        int hi = hex_value(s[i]);
        int lo = hex_value(s[i + 1]);   /* i + 1 < len: dashes split pairs */
        if (hi < 0 || lo < 0)
            return BRK_INVAL;
        tmp[o++] = (uint8_t)(hi << 4 | lo);
        i += 2;
    }
    /* Only write out on success so a failed parse leaves it untouched. */
    memcpy(out, tmp, sizeof tmp);
    return BRK_OK;
}

int64_t brk_uuid_time_ms(const uint8_t id[BRK_UUID_LEN])
{
    uint64_t ms = 0;

    for (int i = 0; i < 6; i++)
        ms = ms << 8 | id[i];
    return (int64_t)ms;
}
