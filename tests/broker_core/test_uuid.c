/*
 * test_uuid.c - UUIDv7 generation, ordering, formatting and parsing.
 *
 * Most tests drive a fake clock by hand, so the monotonicity rules (same
 * millisecond, clock stepping back, counter overflow) are hit exactly.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "broker/clock.h"
#include "broker/uuid.h"

typedef struct fake_clock {
    int64_t ms;
} fake_clock;

static int64_t fake_now_ms(void *ctx)
{
    return ((fake_clock *)ctx)->ms;
}

static int64_t fake_mono_ns(void *ctx)
{
    return ((fake_clock *)ctx)->ms * 1000000;
}

static brk_clock make_clock(fake_clock *fc)
{
    brk_clock c = { fake_now_ms, fake_mono_ns, fc };
    return c;
}

static unsigned counter_of(const uint8_t id[BRK_UUID_LEN])
{
    return (unsigned)(id[6] & 0x0F) << 8 | id[7];
}

static void assert_id_less(const uint8_t a[BRK_UUID_LEN],
                           const uint8_t b[BRK_UUID_LEN])
{
    assert_true(memcmp(a, b, BRK_UUID_LEN) < 0);
}

static void uuid_has_version_7_and_rfc_variant(void **state)
{
    fake_clock fc = { 1700000000000 };
    brk_clock clk = make_clock(&fc);
    brk_uuidgen *g;
    uint8_t id[BRK_UUID_LEN];

    (void)state;
    assert_int_equal(brk_uuidgen_open(&g, &clk, 42), BRK_OK);
    for (int i = 0; i < 5000; i++) {
        fc.ms += i % 3;
        brk_uuidgen_next(g, id);
        assert_int_equal(id[6] >> 4, 7);       /* version 0111 */
        assert_int_equal(id[8] >> 6, 2);       /* variant 10 */
    }
    brk_uuidgen_close(g);
}

static void uuid_strictly_increasing_across_100k_ids(void **state)
{
    fake_clock fc = { 1700000000000 };
    brk_clock clk = make_clock(&fc);
    brk_uuidgen *g;
    uint8_t prev[BRK_UUID_LEN], cur[BRK_UUID_LEN];

    (void)state;
    assert_int_equal(brk_uuidgen_open(&g, &clk, 7), BRK_OK);
    brk_uuidgen_next(g, prev);
    for (int i = 1; i < 100000; i++) {
        /* A mix of many ids per ms, single ids per ms and jumps. */
        if (i % 97 == 0)
            fc.ms += 1;
        if (i % 10007 == 0)
            fc.ms += 5000;
        brk_uuidgen_next(g, cur);
        assert_id_less(prev, cur);
        memcpy(prev, cur, sizeof cur);
    }
    brk_uuidgen_close(g);
}

static void uuid_strictly_increasing_with_system_clock(void **state)
{
    brk_uuidgen *g;
    uint8_t prev[BRK_UUID_LEN], cur[BRK_UUID_LEN];

    (void)state;
    assert_int_equal(brk_uuidgen_open(&g, brk_clock_system(), 0), BRK_OK);
    brk_uuidgen_next(g, prev);
    for (int i = 1; i < 100000; i++) {
        brk_uuidgen_next(g, cur);
        assert_id_less(prev, cur);
        memcpy(prev, cur, sizeof cur);
    }
    brk_uuidgen_close(g);
}

static void uuid_monotonic_when_clock_steps_back(void **state)
{
    fake_clock fc = { 1700000000000 };
    brk_clock clk = make_clock(&fc);
    brk_uuidgen *g;
    uint8_t a[BRK_UUID_LEN], b[BRK_UUID_LEN], c[BRK_UUID_LEN];

    (void)state;
    assert_int_equal(brk_uuidgen_open(&g, &clk, 1), BRK_OK);
    brk_uuidgen_next(g, a);
    fc.ms -= 1000;                  /* NTP steps the clock back a second */
    brk_uuidgen_next(g, b);
    assert_id_less(a, b);
    /* The generator holds the last timestamp and counts instead. */
    assert_int_equal(brk_uuid_time_ms(b), 1700000000000);
    assert_int_equal(counter_of(b), counter_of(a) + 1);

    fc.ms = 1700000000000 + 5;      /* the clock overtakes again */
    brk_uuidgen_next(g, c);
    assert_id_less(b, c);
    assert_int_equal(brk_uuid_time_ms(c), 1700000000005);
    assert_int_equal(counter_of(c), 0);
    brk_uuidgen_close(g);
}

static void uuid_counter_overflow_bumps_timestamp_by_one_ms(void **state)
{
    const int64_t t = 1700000000000;
    fake_clock fc = { t };
    brk_clock clk = make_clock(&fc);
    brk_uuidgen *g;
    uint8_t prev[BRK_UUID_LEN], id[BRK_UUID_LEN];

    (void)state;
    assert_int_equal(brk_uuidgen_open(&g, &clk, 3), BRK_OK);
    /* 4096 ids fit in one millisecond: counter 0..0xFFF. */
    for (unsigned i = 0; i < 4096; i++) {
        brk_uuidgen_next(g, id);
        assert_int_equal(brk_uuid_time_ms(id), t);
        assert_int_equal(counter_of(id), i);
        if (i > 0)
            assert_id_less(prev, id);
        memcpy(prev, id, sizeof id);
    }
    /* The 4097th runs one ms ahead of the clock with a fresh counter. */
    brk_uuidgen_next(g, id);
    assert_int_equal(brk_uuid_time_ms(id), t + 1);
    assert_int_equal(counter_of(id), 0);
    assert_id_less(prev, id);
    memcpy(prev, id, sizeof id);

    /* When the clock reaches that ms, it is not "ahead": keep counting. */
    fc.ms = t + 1;
    brk_uuidgen_next(g, id);
    assert_int_equal(brk_uuid_time_ms(id), t + 1);
    assert_int_equal(counter_of(id), 1);
    assert_id_less(prev, id);

    fc.ms = t + 2;
    brk_uuidgen_next(g, id);
    assert_int_equal(brk_uuid_time_ms(id), t + 2);
    assert_int_equal(counter_of(id), 0);
    brk_uuidgen_close(g);
}

static void uuid_time_ms_returns_generation_time(void **state)
{
    fake_clock fc = { 1712345678901 };
    brk_clock clk = make_clock(&fc);
    brk_uuidgen *g;
    uint8_t id[BRK_UUID_LEN];
    uint8_t max_ts[BRK_UUID_LEN] = { 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F };

    (void)state;
    assert_int_equal(brk_uuidgen_open(&g, &clk, 9), BRK_OK);
    brk_uuidgen_next(g, id);
    assert_int_equal(brk_uuid_time_ms(id), 1712345678901);
    /* Big-endian: the first byte is the most significant. */
    assert_int_equal(id[0], (1712345678901 >> 40) & 0xFF);
    assert_int_equal(id[5], 1712345678901 & 0xFF);
    brk_uuidgen_close(g);

    assert_int_equal(brk_uuid_time_ms(max_ts), (INT64_C(1) << 48) - 1);
}

static void uuid_negative_clock_is_treated_as_epoch(void **state)
{
    fake_clock fc = { -5000 };
    brk_clock clk = make_clock(&fc);
    brk_uuidgen *g;
    uint8_t a[BRK_UUID_LEN], b[BRK_UUID_LEN];

    (void)state;
    assert_int_equal(brk_uuidgen_open(&g, &clk, 9), BRK_OK);
    brk_uuidgen_next(g, a);
    assert_int_equal(brk_uuid_time_ms(a), 0);
    brk_uuidgen_next(g, b);
    assert_id_less(a, b);
    brk_uuidgen_close(g);
}

static void uuid_with_system_clock_carries_current_time(void **state)
{
    const brk_clock *sys = brk_clock_system();
    brk_uuidgen *g;
    uint8_t id[BRK_UUID_LEN];

    (void)state;
    assert_non_null(sys);
    assert_ptr_equal(sys, brk_clock_system());      /* one static instance */
    int64_t before = sys->now_ms(sys->ctx);
    int64_t m0 = sys->mono_ns(sys->ctx);
    assert_true(before > INT64_C(1577836800000));   /* after 2020-01-01 */

    assert_int_equal(brk_uuidgen_open(&g, sys, 0), BRK_OK);
    brk_uuidgen_next(g, id);
    int64_t after = sys->now_ms(sys->ctx);
    assert_in_range(brk_uuid_time_ms(id), before, after);
    assert_true(sys->mono_ns(sys->ctx) >= m0);
    brk_uuidgen_close(g);
}

static void uuid_format_parse_round_trip(void **state)
{
    const uint8_t known[BRK_UUID_LEN] = {
        0x01, 0x8f, 0x3a, 0x4b, 0x5c, 0x6d, 0x7e, 0x0f,
        0x80, 0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6, 0x07,
    };
    fake_clock fc = { 1700000000000 };
    brk_clock clk = make_clock(&fc);
    brk_uuidgen *g;
    char s[BRK_UUID_STR_LEN + 1];
    uint8_t id[BRK_UUID_LEN], back[BRK_UUID_LEN];

    (void)state;
    brk_uuid_format(known, s);
    assert_string_equal(s, "018f3a4b-5c6d-7e0f-80a1-b2c3d4e5f607");
    assert_int_equal(brk_uuid_parse(s, strlen(s), back), BRK_OK);
    assert_memory_equal(back, known, BRK_UUID_LEN);

    /* Upper case is accepted and means the same id. */
    assert_int_equal(brk_uuid_parse("018F3A4B-5C6D-7E0F-80A1-B2C3D4E5F607",
                                    BRK_UUID_STR_LEN, back), BRK_OK);
    assert_memory_equal(back, known, BRK_UUID_LEN);

    assert_int_equal(brk_uuidgen_open(&g, &clk, 11), BRK_OK);
    for (int i = 0; i < 1000; i++) {
        brk_uuidgen_next(g, id);
        brk_uuid_format(id, s);
        assert_int_equal(strlen(s), BRK_UUID_STR_LEN);
        for (size_t k = 0; k < BRK_UUID_STR_LEN; k++)
            assert_true(s[k] == '-' || (s[k] >= '0' && s[k] <= '9')
                        || (s[k] >= 'a' && s[k] <= 'f'));
        assert_int_equal(brk_uuid_parse(s, BRK_UUID_STR_LEN, back), BRK_OK);
        assert_memory_equal(back, id, BRK_UUID_LEN);
    }
    brk_uuidgen_close(g);
}

static void uuid_parse_rejects_malformed_inputs(void **state)
{
    static const char *const bad[] = {
        "",
        "018f3a4b-5c6d-7e0f-80a1-b2c3d4e5f60",      /* 35: short */
        "018f3a4b-5c6d-7e0f-80a1-b2c3d4e5f6077",    /* 37: long */
        "018f3a4b5c6d7e0f80a1b2c3d4e5f607",         /* no dashes */
        "018f3a4b5c6d-7e0f-80a1-b2c3d4e5f607-",     /* dashes moved */
        "018f3a4b-5c6d-7e0f-80a1_b2c3d4e5f607",     /* wrong separator */
        "018f3a4b-5c6d-7e0f-80a1-b2c3d4e5f60g",     /* bad hex */
        "018f3a4b-5c6d-7e0f-80a1-b2c3d4e5f6 7",     /* space */
        "018f3a4b-5c6d-7e0f-80a1-b2c3d4e5f6-7",     /* extra dash */
        "-18f3a4b-5c6d-7e0f-80a1-b2c3d4e5f607",     /* dash at start */
        "{18f3a4b-5c6d-7e0f-80a1-b2c3d4e5f60}",     /* braces */
        "018f3a4b-5c6d-7e0f-80a1-b2c3d4e5f6+7",     /* sign */
    };
    uint8_t out[BRK_UUID_LEN];
    uint8_t sentinel[BRK_UUID_LEN];

    (void)state;
    memset(sentinel, 0xA5, sizeof sentinel);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memcpy(out, sentinel, sizeof out);
        assert_int_equal(brk_uuid_parse(bad[i], strlen(bad[i]), out),
                         BRK_INVAL);
        /* A failed parse leaves the output alone. */
        assert_memory_equal(out, sentinel, sizeof out);
    }
    /* The length argument is authoritative: a valid string cut short, or
     * with the NUL counted, is rejected. */
    const char *good = "018f3a4b-5c6d-7e0f-80a1-b2c3d4e5f607";
    assert_int_equal(brk_uuid_parse(good, 35, out), BRK_INVAL);
    assert_int_equal(brk_uuid_parse(good, 37, out), BRK_INVAL);
    /* An embedded NUL is not hex. */
    char nul[BRK_UUID_STR_LEN + 1];
    memcpy(nul, good, sizeof nul);
    nul[3] = '\0';
    assert_int_equal(brk_uuid_parse(nul, BRK_UUID_STR_LEN, out), BRK_INVAL);
    assert_int_equal(brk_uuid_parse(NULL, BRK_UUID_STR_LEN, out), BRK_INVAL);
}

static void gen_sequence(uint64_t seed, uint8_t (*ids)[BRK_UUID_LEN], int n)
{
    fake_clock fc = { 1700000000000 };
    brk_clock clk = make_clock(&fc);
    brk_uuidgen *g;

    assert_int_equal(brk_uuidgen_open(&g, &clk, seed), BRK_OK);
    for (int i = 0; i < n; i++) {
        fc.ms += i % 2;
        brk_uuidgen_next(g, ids[i]);
    }
    brk_uuidgen_close(g);
}

static void uuid_fixed_seed_reproduces_sequence(void **state)
{
    enum { N = 1000 };
    static uint8_t a[N][BRK_UUID_LEN], b[N][BRK_UUID_LEN], c[N][BRK_UUID_LEN];

    (void)state;
    gen_sequence(12345, a, N);
    gen_sequence(12345, b, N);
    gen_sequence(12346, c, N);
    assert_memory_equal(a, b, sizeof a);
    /* Another seed gives the same timestamps and counters (same clock) but
     * different rand_b. */
    for (int i = 0; i < N; i++) {
        assert_memory_equal(a[i], c[i], 8);
        assert_memory_not_equal(a[i] + 8, c[i] + 8, 8);
    }
}

static void uuid_os_seeded_generators_differ(void **state)
{
    fake_clock fc = { 1700000000000 };
    brk_clock clk = make_clock(&fc);
    brk_uuidgen *g1, *g2;
    uint8_t a[BRK_UUID_LEN], b[BRK_UUID_LEN];

    (void)state;
    assert_int_equal(brk_uuidgen_open(&g1, &clk, 0), BRK_OK);
    assert_int_equal(brk_uuidgen_open(&g2, &clk, 0), BRK_OK);
    brk_uuidgen_next(g1, a);
    brk_uuidgen_next(g2, b);
    /* Same ms and counter, so only rand_b can tell two processes' ids
     * apart; 62 random bits collide with probability 2^-62. */
    assert_memory_equal(a, b, 8);
    assert_memory_not_equal(a + 8, b + 8, 8);
    brk_uuidgen_close(g1);
    brk_uuidgen_close(g2);
}

static void uuid_open_rejects_missing_clock(void **state)
{
    brk_uuidgen *g = (brk_uuidgen *)&g;     /* non-NULL garbage */
    brk_clock no_fn = { NULL, NULL, NULL };

    (void)state;
    assert_int_equal(brk_uuidgen_open(&g, NULL, 1), BRK_INVAL);
    assert_null(g);
    assert_int_equal(brk_uuidgen_open(&g, &no_fn, 1), BRK_INVAL);
    assert_null(g);
    assert_int_equal(brk_uuidgen_open(NULL, brk_clock_system(), 1), BRK_INVAL);
    brk_uuidgen_close(NULL);    /* no-op */
}

enum { THREADS = 4, PER_THREAD = 10000 };

typedef struct worker {
    brk_uuidgen *g;
    uint8_t ids[PER_THREAD][BRK_UUID_LEN];
} worker;

static void *worker_main(void *arg)
{
    worker *w = arg;
    for (int i = 0; i < PER_THREAD; i++)
        brk_uuidgen_next(w->g, w->ids[i]);
    return NULL;
}

static int id_cmp(const void *a, const void *b)
{
    return memcmp(a, b, BRK_UUID_LEN);
}

static void uuid_concurrent_ids_unique_and_per_thread_increasing(void **state)
{
    static worker workers[THREADS];
    static uint8_t all[THREADS * PER_THREAD][BRK_UUID_LEN];
    pthread_t th[THREADS];
    brk_uuidgen *g;

    (void)state;
    assert_int_equal(brk_uuidgen_open(&g, brk_clock_system(), 0), BRK_OK);
    for (int t = 0; t < THREADS; t++) {
        workers[t].g = g;
        assert_int_equal(pthread_create(&th[t], NULL, worker_main,
                                        &workers[t]), 0);
    }
    for (int t = 0; t < THREADS; t++)
        assert_int_equal(pthread_join(th[t], NULL), 0);
    brk_uuidgen_close(g);

    for (int t = 0; t < THREADS; t++) {
        for (int i = 1; i < PER_THREAD; i++)
            assert_id_less(workers[t].ids[i - 1], workers[t].ids[i]);
        memcpy(all[t * PER_THREAD], workers[t].ids, sizeof workers[t].ids);
    }
    qsort(all, THREADS * PER_THREAD, BRK_UUID_LEN, id_cmp);
    for (int i = 1; i < THREADS * PER_THREAD; i++)
        assert_id_less(all[i - 1], all[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(uuid_has_version_7_and_rfc_variant),
        cmocka_unit_test(uuid_strictly_increasing_across_100k_ids),
        cmocka_unit_test(uuid_strictly_increasing_with_system_clock),
        cmocka_unit_test(uuid_monotonic_when_clock_steps_back),
        cmocka_unit_test(uuid_counter_overflow_bumps_timestamp_by_one_ms),
        cmocka_unit_test(uuid_time_ms_returns_generation_time),
        cmocka_unit_test(uuid_negative_clock_is_treated_as_epoch),
        cmocka_unit_test(uuid_with_system_clock_carries_current_time),
        cmocka_unit_test(uuid_format_parse_round_trip),
        cmocka_unit_test(uuid_parse_rejects_malformed_inputs),
        cmocka_unit_test(uuid_fixed_seed_reproduces_sequence),
        cmocka_unit_test(uuid_os_seeded_generators_differ),
        cmocka_unit_test(uuid_open_rejects_missing_clock),
        cmocka_unit_test(uuid_concurrent_ids_unique_and_per_thread_increasing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
