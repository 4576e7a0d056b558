/*
 * timerheap.c - binary min-heap of (due_ms, ref), see timerheap.h.
 */
#include "timerheap.h"

#include <stdlib.h>

static bool before(const brk_timer *a, const brk_timer *b)
{
    return a->due_ms < b->due_ms || (a->due_ms == b->due_ms && a->ref < b->ref);
}

void brk_timerheap_init(brk_timerheap *h)
{
    h->v = NULL;
    h->n = h->cap = 0;
}

void brk_timerheap_free(brk_timerheap *h)
{
    free(h->v);
    brk_timerheap_init(h);
}

brk_status brk_timerheap_reserve(brk_timerheap *h, size_t n)
{
    if (n <= h->cap)
        return BRK_OK;
    brk_timer *v = realloc(h->v, n * sizeof *v);
    if (!v)
        return BRK_NOMEM;
    h->v = v;
    h->cap = n;
    return BRK_OK;
}

void brk_timerheap_shrink(brk_timerheap *h)
{
    if (h->cap < 1024 || h->n * 4 > h->cap)
        return;
    size_t want = h->n * 2 > 1024 ? h->n * 2 : 1024;
    brk_timer *v = realloc(h->v, want * sizeof *v);
    if (v) {
        h->v = v;
        h->cap = want;
    }
}

brk_status brk_timerheap_push(brk_timerheap *h, int64_t due_ms, uint64_t ref)
{
    if (h->n == h->cap) {
        /* Grow by half: the heap of a million pending timers should not
         * carry a million entries of slack. */
        size_t want = h->cap < 64 ? 64 : h->cap + h->cap / 2;
        if (brk_timerheap_reserve(h, want) != BRK_OK)
            return BRK_NOMEM;
    }
    brk_timer t = { due_ms, ref };
    size_t i = h->n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!before(&t, &h->v[parent]))
            break;
        h->v[i] = h->v[parent];
        i = parent;
    }
    h->v[i] = t;
    return BRK_OK;
}

bool brk_timerheap_peek(const brk_timerheap *h, brk_timer *out)
{
    if (h->n == 0)
        return false;
    *out = h->v[0];
    return true;
}

/* Sift v[i] down within v[0..n). */
static void sift_down(brk_timer *v, size_t n, size_t i)
{
    brk_timer x = v[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && before(&v[c + 1], &v[c]))
            c++;
        if (!before(&v[c], &x))
            break;
        v[i] = v[c];
        i = c;
    }
    v[i] = x;
}

void brk_timerheap_filter(brk_timerheap *h,
                          bool (*keep)(const brk_timer *t, void *ctx),
                          void *ctx)
{
    size_t n = 0;
    for (size_t i = 0; i < h->n; i++)
        if (keep(&h->v[i], ctx))
            h->v[n++] = h->v[i];
    h->n = n;
    /* Floyd's bottom-up heap construction. */
    for (size_t i = n / 2; i-- > 0;)
        sift_down(h->v, n, i);
}

bool brk_timerheap_pop(brk_timerheap *h, brk_timer *out)
{
    if (h->n == 0)
        return false;
    *out = h->v[0];
    brk_timer last = h->v[--h->n];
    size_t i = 0, n = h->n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && before(&h->v[c + 1], &h->v[c]))
            c++;
        if (!before(&h->v[c], &last))
            break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (n > 0)
        h->v[i] = last;
    return true;
}
