/* fake_clock.c - see fake_clock.h. */
#include "fake_clock.h"

static int64_t fake_now_ms(void *ctx)
{
    return atomic_load(&((brk_fake_clock *)ctx)->wall_ms);
}

static int64_t fake_mono_ns(void *ctx)
{
    return atomic_load(&((brk_fake_clock *)ctx)->mono_ns);
}

void brk_fake_clock_init(brk_fake_clock *fc, int64_t wall_ms)
{
    fc->clock.now_ms = fake_now_ms;
    fc->clock.mono_ns = fake_mono_ns;
    fc->clock.ctx = fc;
    atomic_init(&fc->wall_ms, wall_ms);
    atomic_init(&fc->mono_ns, 1000000000LL);
}

void brk_fake_clock_advance(brk_fake_clock *fc, int64_t ms)
{
    atomic_fetch_add(&fc->wall_ms, ms);
    atomic_fetch_add(&fc->mono_ns, ms * 1000000LL);
}

void brk_fake_clock_set_wall(brk_fake_clock *fc, int64_t wall_ms)
{
    atomic_store(&fc->wall_ms, wall_ms);
}
