/*
 * broker/crc32c.h - CRC-32C (Castagnoli, reflected polynomial 0x82F63B78).
 *
 * Used for every record and state file checksum.  Hardware CRC32 instructions
 * (SSE4.2) are used when the CPU has them, chosen once at first call; a
 * slicing-by-8 table version is the fallback and is always available for
 * tests so both paths are checked against the same vectors.
 */
#ifndef BROKER_CRC32C_H
#define BROKER_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Extend `crc` (0 to start) over `len` bytes.  crc32c(0, "123456789", 9) is
 * 0xE3069283.  Chaining holds: crc32c(crc32c(0,a,n),b,m) == crc32c(0,a||b,n+m). */
uint32_t brk_crc32c(uint32_t crc, const void *data, size_t len);

/* The portable table implementation (same results as brk_crc32c). */
uint32_t brk_crc32c_sw(uint32_t crc, const void *data, size_t len);

/* 1 when brk_crc32c uses the hardware instruction on this CPU. */
int brk_crc32c_hw_available(void);

#endif /* BROKER_CRC32C_H */
