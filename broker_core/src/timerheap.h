/*
 * timerheap.h - a binary min-heap of timers, private to broker_core.
 *
 * An entry is 16 bytes: a due time and a 64-bit reference the owner
 * interprets (the delay scheduler stores the log offset of the delayed
 * record, the transaction scheduler a slot and generation).  Entries with
 * equal due times come out in ascending `ref` order, so timers set with
 * increasing refs (log offsets grow) fire first-in, first-out.
 *
 * There is no removal: owners cancel lazily, by ignoring a popped entry
 * that no longer matches their state.  That keeps an entry at 16 bytes and
 * every operation O(log n) without a back-index.  Not thread-safe; the
 * owner's lock protects it.
 */
#ifndef BROKER_TIMERHEAP_H
#define BROKER_TIMERHEAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/status.h"

typedef struct brk_timer {
    int64_t  due_ms;
    uint64_t ref;
} brk_timer;

typedef struct brk_timerheap {
    brk_timer *v;
    size_t n, cap;
} brk_timerheap;

void brk_timerheap_init(brk_timerheap *h);
void brk_timerheap_free(brk_timerheap *h);
/* BRK_NOMEM when it cannot grow (the heap is unchanged). */
brk_status brk_timerheap_push(brk_timerheap *h, int64_t due_ms, uint64_t ref);
/* The earliest timer, or false when empty. */
bool brk_timerheap_peek(const brk_timerheap *h, brk_timer *out);
/* Remove and return the earliest timer; false when empty. */
bool brk_timerheap_pop(brk_timerheap *h, brk_timer *out);
/* Make room for `n` entries in total (used when rebuilding at open). */
brk_status brk_timerheap_reserve(brk_timerheap *h, size_t n);
/* Drop slack capacity (after a burst drains), keeping at least n * 2. */
void brk_timerheap_shrink(brk_timerheap *h);
/* Keep only the timers for which keep(t, ctx) returns true and restore heap
 * order, in O(n).  For owners that cancel lazily: when cancelled entries
 * pile up, one pass drops them all instead of waiting for them to surface. */
void brk_timerheap_filter(brk_timerheap *h,
                          bool (*keep)(const brk_timer *t, void *ctx),
                          void *ctx);

#endif /* BROKER_TIMERHEAP_H */
