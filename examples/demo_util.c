/*
 * demo_util.c - check-and-report helpers shared by the examples; see
 * demo_util.h.
 */
#define _GNU_SOURCE
#include "demo_util.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static unsigned g_checks, g_failed;

bool demo_check(bool ok, const char *fmt, ...)
{
    va_list ap;
    g_checks++;
    if (!ok)
        g_failed++;
    printf("    %s ", ok ? "[ok]" : "[FAILED]");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    return ok;
}

bool demo_check_st(brk_status st, brk_store *s, const char *what)
{
    if (st == BRK_OK)
        return demo_check(true, "%s", what);
    return demo_check(false, "%s: %s (%s)", what, brk_status_name(st),
                      s ? brk_store_errstr(s) : brk_strerror(st));
}

void demo_heading(const char *title)
{
    printf("\n== %s ==\n", title);
}

int demo_verdict(const char *pass_tail)
{
    printf("\n== Verdict ==\n");
    if (g_failed == 0 && g_checks > 0)
        printf("PASS: all %u checks held%s\n", g_checks, pass_tail);
    else
        printf("FAIL: %u of %u checks failed (see [FAILED] above).\n", g_failed,
               g_checks);
    return g_failed == 0 && g_checks > 0 ? 0 : 1;
}

int64_t demo_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void demo_sleep_ms(int64_t ms)
{
    struct timespec ts = { (time_t)(ms / 1000), (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0) {
    }
}

bool demo_bytes_eq(brk_bytes b, const char *s)
{
    size_t n = strlen(s);
    return b.len == n && (n == 0 || memcmp(b.ptr, s, n) == 0);
}

void demo_to_cstr(brk_bytes b, char *out, size_t cap)
{
    size_t n = b.len < cap - 1 ? b.len : cap - 1;
    if (n)
        memcpy(out, b.ptr, n);
    out[n] = '\0';
}
