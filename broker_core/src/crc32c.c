/*
 * crc32c.c - CRC-32C (Castagnoli), hardware and table implementations.
 *
 * Algorithm: reflected CRC, polynomial 0x82F63B78 (0x1EDC6F41 bit-reversed),
 * initial value 0xFFFFFFFF, final XOR 0xFFFFFFFF.  This is the iSCSI /
 * ext4 / SSE4.2 CRC32 variant, so the hardware instruction and the table
 * agree bit for bit.  The check value of "123456789" is 0xE3069283.
 *
 * Chaining: the pre/post inversion happens inside each call, and the value a
 * caller passes in is the finished CRC of the bytes so far (0 for nothing).
 * Un-inverting on entry and re-inverting on exit makes
 *   brk_crc32c(brk_crc32c(0, a, n), b, m) == brk_crc32c(0, a||b, n+m)
 * which lets the log checksum a record header and body from separate
 * buffers without copying them together.
 *
 * Why two paths: every record is checksummed on append and on every read,
 * so speed matters; the SSE4.2 CRC32 instruction is several times faster
 * than any table.  The slicing-by-8 table version (8 KiB of tables, 8 bytes
 * per step) is the fallback for other CPUs and is exported so tests can
 * check the two against each other.
 *
 * The hardware function carries __attribute__((target("sse4.2"))) so that
 * this file builds without -msse4.2 and the binary still runs on CPUs
 * without the instruction: it is only called after __builtin_cpu_supports
 * said yes.  The choice is made once, together with building the tables,
 * under pthread_once.
 */
#include "broker/crc32c.h"

#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

#define CRC32C_POLY 0x82F63B78u

/* crc_table[0] is the classic byte-at-a-time table; crc_table[k][b] is the
 * CRC contribution of byte b followed by k zero bytes, which is what lets
 * slicing-by-8 fold eight bytes with eight independent lookups.  Written
 * once inside crc_once, read-only afterwards. */
static uint32_t crc_table[8][256];
static bool crc_use_hw;                 /* set once inside crc_once */
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t len)
{
    uint64_t c = (uint32_t)~crc;

    /* Bring p to an 8-byte boundary first so the 8-byte steps never
     * straddle a cache line; the instruction accepts unaligned data, this
     * is only about speed. */
    while (len > 0 && ((uintptr_t)p & 7u) != 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        len--;
    }
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, sizeof v);    /* x86 is little-endian: byte order kept */
        c = _mm_crc32_u64(c, v);
        p += 8;
        len -= 8;
    }
    while (len > 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        len--;
    }
    return ~(uint32_t)c;
}
#endif

static void crc_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1u) ? (c >> 1) ^ CRC32C_POLY : c >> 1;
        crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = crc_table[0][n];
        for (int k = 1; k < 8; k++) {
            c = (c >> 8) ^ crc_table[0][c & 0xFFu];
            crc_table[k][n] = c;
        }
    }
#if defined(__x86_64__)
    __builtin_cpu_init();   /* needed if we run before libgcc's constructor */
    crc_use_hw = __builtin_cpu_supports("sse4.2") != 0;
#else
    crc_use_hw = false;
#endif
}

static uint32_t crc32c_table(uint32_t crc, const uint8_t *p, size_t len)
{
    uint32_t c = ~crc;

    while (len >= 8) {
        /* Assemble the first four bytes as a little-endian word byte by
         * byte, so the result does not depend on the host byte order. */
        uint32_t lo = (uint32_t)p[0] | (uint32_t)p[1] << 8
                    | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        c ^= lo;
        c = crc_table[7][c & 0xFFu] ^ crc_table[6][(c >> 8) & 0xFFu]
          ^ crc_table[5][(c >> 16) & 0xFFu] ^ crc_table[4][c >> 24]
          ^ crc_table[3][p[4]] ^ crc_table[2][p[5]]
          ^ crc_table[1][p[6]] ^ crc_table[0][p[7]];
        p += 8;
        len -= 8;
    }
    while (len > 0) {
        c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xFFu];
        len--;
    }
    return ~c;
}

uint32_t brk_crc32c_sw(uint32_t crc, const void *data, size_t len)
{
    pthread_once(&crc_once, crc_init);
    if (len == 0)
        return crc;     /* data may be NULL for an empty range */
    return crc32c_table(crc, data, len);
}

uint32_t brk_crc32c(uint32_t crc, const void *data, size_t len)
{
    pthread_once(&crc_once, crc_init);
    if (len == 0)
        return crc;
#if defined(__x86_64__)
    if (crc_use_hw)
        return crc32c_hw(crc, data, len);
#endif
    return crc32c_table(crc, data, len);
}

int brk_crc32c_hw_available(void)
{
    pthread_once(&crc_once, crc_init);
    return crc_use_hw ? 1 : 0;
}
