/*
 * test_crc32c.c - CRC-32C against published vectors, an independent
 * bit-at-a-time reference, and itself (hardware vs table, chaining).
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <string.h>

#include "broker/crc32c.h"

/* Deterministic test data: xorshift64*, fixed seed, so failures replay. */
static uint64_t rng_state = UINT64_C(0x243F6A8885A308D3);

static uint64_t rng_next(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * UINT64_C(0x2545F4914F6CDD1D);
}

static void fill_random(uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(rng_next() >> 56);
}

/* The definition, one bit at a time: no tables, no hardware, so it checks
 * both implementations rather than sharing their bugs. */
static uint32_t crc32c_bitwise(uint32_t crc, const uint8_t *p, size_t n)
{
    crc = ~crc;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++)
            crc = (crc & 1u) ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
    }
    return ~crc;
}

typedef uint32_t (*crc_fn)(uint32_t, const void *, size_t);

static void check_vectors(crc_fn f)
{
    uint8_t buf[32];

    assert_int_equal(f(0, "123456789", 9), 0xE3069283u);

    /* RFC 3720 (iSCSI) appendix B.4. */
    memset(buf, 0x00, sizeof buf);
    assert_int_equal(f(0, buf, sizeof buf), 0x8A9136AAu);
    memset(buf, 0xFF, sizeof buf);
    assert_int_equal(f(0, buf, sizeof buf), 0x62A8AB43u);
    for (int i = 0; i < 32; i++)
        buf[i] = (uint8_t)i;
    assert_int_equal(f(0, buf, sizeof buf), 0x46DD794Eu);
    for (int i = 0; i < 32; i++)
        buf[i] = (uint8_t)(31 - i);
    assert_int_equal(f(0, buf, sizeof buf), 0x113FDB5Cu);
}

static void crc32c_matches_standard_check_value(void **state)
{
    (void)state;
    assert_int_equal(brk_crc32c(0, "123456789", 9), 0xE3069283u);
    assert_int_equal(brk_crc32c_sw(0, "123456789", 9), 0xE3069283u);
}

static void crc32c_matches_rfc3720_vectors(void **state)
{
    (void)state;
    check_vectors(brk_crc32c);
}

static void crc32c_sw_matches_rfc3720_vectors(void **state)
{
    (void)state;
    check_vectors(brk_crc32c_sw);
}

static void crc32c_of_nothing_returns_input_crc(void **state)
{
    (void)state;
    assert_int_equal(brk_crc32c(0, NULL, 0), 0);
    assert_int_equal(brk_crc32c_sw(0, NULL, 0), 0);
    assert_int_equal(brk_crc32c(0xE3069283u, "", 0), 0xE3069283u);
    assert_int_equal(brk_crc32c_sw(0xE3069283u, "", 0), 0xE3069283u);
}

static void crc32c_hw_availability_matches_cpu(void **state)
{
    (void)state;
#if defined(__x86_64__)
    __builtin_cpu_init();
    assert_int_equal(brk_crc32c_hw_available(),
                     __builtin_cpu_supports("sse4.2") ? 1 : 0);
#else
    assert_int_equal(brk_crc32c_hw_available(), 0);
#endif
}

/* Random lengths cover the 8-byte main loop and every tail length; random
 * offsets cover the hardware path's alignment prologue; a random starting
 * crc covers chaining from an arbitrary point. */
static void crc32c_hw_and_sw_agree_on_random_data(void **state)
{
    enum { MAXLEN = 4096, ROUNDS = 3000 };
    static uint8_t buf[MAXLEN + 16];

    (void)state;
    if (!brk_crc32c_hw_available()) {
        print_message("skipped: CPU has no SSE4.2, only the table path runs\n");
        skip();
    }
    fill_random(buf, sizeof buf);
    for (int i = 0; i < ROUNDS; i++) {
        size_t off = (size_t)(rng_next() % 16);
        size_t len = (size_t)(rng_next() % (MAXLEN + 1));
        uint32_t seed = (i % 2) ? (uint32_t)rng_next() : 0;
        assert_int_equal(brk_crc32c(seed, buf + off, len),
                         brk_crc32c_sw(seed, buf + off, len));
    }
    /* Every short length at every alignment, where the prologue and the
     * tails interact. */
    for (size_t off = 0; off < 16; off++)
        for (size_t len = 0; len <= 64; len++)
            assert_int_equal(brk_crc32c(0, buf + off, len),
                             brk_crc32c_sw(0, buf + off, len));
}

static void crc32c_both_paths_match_bitwise_reference(void **state)
{
    enum { MAXLEN = 1024, ROUNDS = 500 };
    static uint8_t buf[MAXLEN + 16];

    (void)state;
    fill_random(buf, sizeof buf);
    for (int i = 0; i < ROUNDS; i++) {
        size_t off = (size_t)(rng_next() % 16);
        size_t len = (size_t)(rng_next() % (MAXLEN + 1));
        uint32_t seed = (uint32_t)rng_next();
        uint32_t want = crc32c_bitwise(seed, buf + off, len);
        assert_int_equal(brk_crc32c_sw(seed, buf + off, len), want);
        assert_int_equal(brk_crc32c(seed, buf + off, len), want);
    }
}

static void crc32c_chains_across_every_split_point(void **state)
{
    uint8_t buf[300];

    (void)state;
    fill_random(buf, sizeof buf);
    uint32_t whole = brk_crc32c(0, buf, sizeof buf);
    uint32_t whole_sw = brk_crc32c_sw(0, buf, sizeof buf);
    assert_int_equal(whole, whole_sw);

    for (size_t cut = 0; cut <= sizeof buf; cut++) {
        uint32_t a = brk_crc32c(0, buf, cut);
        assert_int_equal(brk_crc32c(a, buf + cut, sizeof buf - cut), whole);
        uint32_t b = brk_crc32c_sw(0, buf, cut);
        assert_int_equal(brk_crc32c_sw(b, buf + cut, sizeof buf - cut),
                         whole);
        /* The two implementations chain into each other too: the value
         * passed between calls is the same finished CRC. */
        assert_int_equal(brk_crc32c_sw(a, buf + cut, sizeof buf - cut),
                         whole);
    }
}

static void crc32c_chains_byte_by_byte(void **state)
{
    const char *s = "123456789";
    uint32_t c = 0, c_sw = 0;

    (void)state;
    for (size_t i = 0; i < 9; i++) {
        c = brk_crc32c(c, s + i, 1);
        c_sw = brk_crc32c_sw(c_sw, s + i, 1);
    }
    assert_int_equal(c, 0xE3069283u);
    assert_int_equal(c_sw, 0xE3069283u);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(crc32c_matches_standard_check_value),
        cmocka_unit_test(crc32c_matches_rfc3720_vectors),
        cmocka_unit_test(crc32c_sw_matches_rfc3720_vectors),
        cmocka_unit_test(crc32c_of_nothing_returns_input_crc),
        cmocka_unit_test(crc32c_hw_availability_matches_cpu),
        cmocka_unit_test(crc32c_hw_and_sw_agree_on_random_data),
        cmocka_unit_test(crc32c_both_paths_match_bitwise_reference),
        cmocka_unit_test(crc32c_chains_across_every_split_point),
        cmocka_unit_test(crc32c_chains_byte_by_byte),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
