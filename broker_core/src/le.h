/*
 * le.h - little-endian loads and stores for every on-disk format of
 * broker_core (records, consume queues, index and state files).
 *
 * memcpy into a native integer is well-defined at any alignment (UBSan
 * clean) and compiles to a single load or store; big-endian hosts swap.
 */
#ifndef BROKER_LE_H
#define BROKER_LE_H

#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define BRK_LE16(x) __builtin_bswap16(x)
#define BRK_LE32(x) __builtin_bswap32(x)
#define BRK_LE64(x) __builtin_bswap64(x)
#else
#define BRK_LE16(x) (x)
#define BRK_LE32(x) (x)
#define BRK_LE64(x) (x)
#endif

static inline uint16_t brk_ld16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return BRK_LE16(v);
}

static inline uint32_t brk_ld32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return BRK_LE32(v);
}

static inline uint64_t brk_ld64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return BRK_LE64(v);
}

static inline void brk_st16(uint8_t *p, uint16_t v)
{
    v = BRK_LE16(v);
    memcpy(p, &v, sizeof v);
}

static inline void brk_st32(uint8_t *p, uint32_t v)
{
    v = BRK_LE32(v);
    memcpy(p, &v, sizeof v);
}

static inline void brk_st64(uint8_t *p, uint64_t v)
{
    v = BRK_LE64(v);
    memcpy(p, &v, sizeof v);
}

#endif /* BROKER_LE_H */
