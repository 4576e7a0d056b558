/*
 * test_timerheap.c - the private timer heap (src/timerheap.h): order by due
 * time, FIFO by ref among equal due times, growth and shrink.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdlib.h>

#include "timerheap.h"

static void empty_heap_has_nothing_to_peek_or_pop(void **state)
{
    (void)state;
    brk_timerheap h;
    brk_timer t;
    brk_timerheap_init(&h);
    assert_false(brk_timerheap_peek(&h, &t));
    assert_false(brk_timerheap_pop(&h, &t));
    brk_timerheap_free(&h);
}

static void pops_in_due_order_for_random_input(void **state)
{
    (void)state;
    brk_timerheap h;
    brk_timerheap_init(&h);
    srand(1234);
    enum { N = 20000 };
    for (uint64_t i = 0; i < N; i++)
        assert_int_equal(brk_timerheap_push(&h, rand() % 5000, i), BRK_OK);
    brk_timer prev = { -1, 0 }, t;
    size_t n = 0;
    while (brk_timerheap_pop(&h, &t)) {
        assert_true(t.due_ms > prev.due_ms
                    || (t.due_ms == prev.due_ms && t.ref > prev.ref));
        prev = t;
        n++;
    }
    assert_int_equal(n, N);
    brk_timerheap_free(&h);
}

static void equal_due_times_come_out_in_ref_order(void **state)
{
    (void)state;
    brk_timerheap h;
    brk_timerheap_init(&h);
    /* Pushed in scrambled order, all due at once. */
    uint64_t refs[] = { 50, 3, 99, 1, 42, 7, 8, 100, 2 };
    for (size_t i = 0; i < sizeof refs / sizeof refs[0]; i++)
        brk_timerheap_push(&h, 1000, refs[i]);
    uint64_t want[] = { 1, 2, 3, 7, 8, 42, 50, 99, 100 };
    brk_timer t;
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        assert_true(brk_timerheap_pop(&h, &t));
        assert_int_equal(t.due_ms, 1000);
        assert_int_equal(t.ref, want[i]);
    }
    brk_timerheap_free(&h);
}

static void peek_shows_the_earliest_without_removing_it(void **state)
{
    (void)state;
    brk_timerheap h;
    brk_timerheap_init(&h);
    brk_timerheap_push(&h, 30, 1);
    brk_timerheap_push(&h, 10, 2);
    brk_timerheap_push(&h, 20, 3);
    brk_timer t;
    assert_true(brk_timerheap_peek(&h, &t));
    assert_int_equal(t.due_ms, 10);
    assert_int_equal(h.n, 3);
    brk_timerheap_free(&h);
}

static void shrink_after_a_drained_burst_keeps_remaining_timers(void **state)
{
    (void)state;
    brk_timerheap h;
    brk_timerheap_init(&h);
    for (uint64_t i = 0; i < 100000; i++)
        brk_timerheap_push(&h, (int64_t)i, i);
    brk_timer t;
    for (int i = 0; i < 99990; i++)
        brk_timerheap_pop(&h, &t);
    size_t before = h.cap;
    brk_timerheap_shrink(&h);
    assert_true(h.cap < before);
    assert_true(h.cap >= h.n);
    for (uint64_t i = 99990; i < 100000; i++) {
        assert_true(brk_timerheap_pop(&h, &t));
        assert_int_equal(t.ref, i);
    }
    brk_timerheap_free(&h);
}

static bool keep_even(const brk_timer *t, void *ctx)
{
    (void)ctx;
    return t->ref % 2 == 0;
}

static void filter_drops_cancelled_timers_and_keeps_order(void **state)
{
    (void)state;
    brk_timerheap h;
    brk_timerheap_init(&h);
    for (uint64_t i = 0; i < 1000; i++)
        brk_timerheap_push(&h, (int64_t)((i * 7919) % 1000), i);
    brk_timerheap_filter(&h, keep_even, NULL);
    assert_int_equal(h.n, 500);
    brk_timer t, prev = { -1, 0 };
    while (brk_timerheap_pop(&h, &t)) {
        assert_int_equal(t.ref % 2, 0);
        assert_true(t.due_ms >= prev.due_ms);
        prev = t;
    }
    brk_timerheap_free(&h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(empty_heap_has_nothing_to_peek_or_pop),
        cmocka_unit_test(pops_in_due_order_for_random_input),
        cmocka_unit_test(equal_due_times_come_out_in_ref_order),
        cmocka_unit_test(peek_shows_the_earliest_without_removing_it),
        cmocka_unit_test(shrink_after_a_drained_burst_keeps_remaining_timers),
        cmocka_unit_test(filter_drops_cancelled_timers_and_keeps_order),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
