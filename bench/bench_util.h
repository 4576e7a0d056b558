/*
 * bench_util.h - helpers shared by the bench programs (store_bench,
 * txn_bench, group_bench, delay_bench): monotonic time, a cheap PRNG, the
 * log-linear latency histogram, recursive removal of a scratch directory and
 * the machine / file system header lines.  bench_util.c is linked into every
 * bench program (see bench/CMakeLists.txt).
 */
#ifndef BENCH_UTIL_H
#define BENCH_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/statfs.h>

/* CLOCK_MONOTONIC in nanoseconds. */
uint64_t bench_now_ns(void);

/* xorshift64 step: advances *st (must be non-zero) and returns it. */
uint64_t bench_xorshift(uint64_t *st);

/* Fills p[0..n) with bench_xorshift output, 8 bytes per step. */
void bench_fill_random(uint8_t *p, size_t n, uint64_t *st);

/* ---- log-linear latency histogram ----
 * Values below 16 get their own bucket; above, each power of two is split
 * into 16 buckets, so a bucket is at most 1/16 of its value wide.  A
 * histogram is an array of BENCH_HIST_N counters. */
#define BENCH_HIST_N 1024

/* Bucket of value v (always < BENCH_HIST_N). */
unsigned bench_hist_index(uint64_t v);

/* Midpoint of bucket i. */
double bench_hist_value(unsigned i);

/* Value at quantile q (0..1] of histogram h; 0 if it is empty. */
double bench_hist_quantile(const uint64_t *h, double q);

/* Removes path and everything below it (no symlinks followed).  A failed
 * removal is reported on stderr as "<prog>: removing <file>: <error>";
 * prog NULL removes silently.  Not thread-safe (nftw has no context). */
void bench_rm_rf(const char *path, const char *prog);

/* Name of file system type f_type.  extended also names zfs, nfs and f2fs
 * (otherwise "unknown", as group_bench has always printed). */
const char *bench_fs_name(long type, bool extended);

/* Prints the "machine:" and "filesystem:" header lines, labels padded to
 * label_width; base "." is shown as the current directory; show_block adds
 * ", block <f_bsize>"; fs_extended is passed to bench_fs_name.  Each line
 * ends in one newline. */
void bench_print_machine(const char *base, const struct statfs *sf,
                         int label_width, bool show_block, bool fs_extended);

#endif
