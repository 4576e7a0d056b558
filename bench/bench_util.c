/*
 * bench_util.c - helpers shared by the bench programs; see bench_util.h.
 */
#define _GNU_SOURCE
#include "bench_util.h"

#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

uint64_t bench_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t bench_xorshift(uint64_t *st)
{
    uint64_t x = *st;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *st = x;
}

void bench_fill_random(uint8_t *p, size_t n, uint64_t *st)
{
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v = bench_xorshift(st);
        memcpy(p + i, &v, n - i < 8 ? n - i : 8);
    }
}

/* ---- log-linear latency histogram ---- */

unsigned bench_hist_index(uint64_t v)
{
    if (v < 16)
        return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v);     /* >= 4 */
    unsigned sub = (unsigned)(v >> (e - 4)) & 15u;
    unsigned i = (e - 3) * 16 + sub;                     /* <= 975 */
    return i < BENCH_HIST_N ? i : BENCH_HIST_N - 1;
}

double bench_hist_value(unsigned i)
{
    if (i < 16)
        return i;
    unsigned e = i / 16 + 3, sub = i % 16;
    double lo = (double)((16u + sub) * (1ull << (e - 4)));
    return lo + (double)(1ull << (e - 4)) / 2.0;
}

double bench_hist_quantile(const uint64_t *h, double q)
{
    uint64_t total = 0;
    for (unsigned i = 0; i < BENCH_HIST_N; i++)
        total += h[i];
    if (total == 0)
        return 0;
    uint64_t want = (uint64_t)ceil(q * (double)total), seen = 0;
    if (want == 0)
        want = 1;
    for (unsigned i = 0; i < BENCH_HIST_N; i++) {
        seen += h[i];
        if (seen >= want)
            return bench_hist_value(i);
    }
    return bench_hist_value(BENCH_HIST_N - 1);
}

/* ---- files ---- */

static const char *rm_prog;     /* nftw callbacks take no context */

static int rm_entry(const char *path, const struct stat *sb, int flag,
                    struct FTW *ftw)
{
    (void)sb; (void)flag; (void)ftw;
    if (remove(path) != 0 && rm_prog)
        fprintf(stderr, "%s: removing %s: %s\n", rm_prog, path, strerror(errno));
    return 0;
}

void bench_rm_rf(const char *path, const char *prog)
{
    rm_prog = prog;
    nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    rm_prog = NULL;
}

const char *bench_fs_name(long type, bool extended)
{
    switch ((unsigned long)type) {
    case 0xEF53: return "ext2/3/4";
    case 0x58465342: return "xfs";
    case 0x9123683E: return "btrfs";
    case 0x01021994: return "tmpfs (fdatasync is a no-op!)";
    case 0x794C7630: return "overlayfs";
    case 0x2FC12FC1: return extended ? "zfs" : "unknown";
    case 0x6969: return extended ? "nfs" : "unknown";
    case 0xF2F52010: return extended ? "f2fs" : "unknown";
    default: return "unknown";
    }
}

void bench_print_machine(const char *base, const struct statfs *sf,
                         int label_width, bool show_block, bool fs_extended)
{
    struct utsname un;
    uname(&un);
    char cwd[4096];
    const char *shown = base;
    if (strcmp(base, ".") == 0 && getcwd(cwd, sizeof cwd))
        shown = cwd;
    printf("%-*s nproc %ld, %s %s %s\n", label_width - 1, "machine:",
           sysconf(_SC_NPROCESSORS_ONLN), un.sysname, un.release, un.machine);
    printf("%-*s %s  f_type 0x%lx (%s)", label_width - 1, "filesystem:", shown,
           (unsigned long)sf->f_type,
           bench_fs_name((long)sf->f_type, fs_extended));
    if (show_block)
        printf(", block %ld", (long)sf->f_bsize);
    printf("\n");
}
