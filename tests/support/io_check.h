/*
 * io_check.h - cmocka helpers for tests that drive a brk_io directly
 * (test_io_sim*.c): write a file in one call, read one back, list names.
 */
#ifndef BROKER_TEST_IO_CHECK_H
#define BROKER_TEST_IO_CHECK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/io.h"

/* cmocka setup/teardown: *state is a fresh brk_sim seeded with 42. */
int brk_check_sim_setup(void **state);
int brk_check_sim_teardown(void **state);

/* Create (or open) `path`, write `text` at `off`, optionally sync, close;
 * every step must succeed. */
void brk_check_put(brk_io *io, const char *path, uint64_t off,
                   const char *text, bool sync);

/* Whole content of `path` into buf[cap] as a string; returns its length,
 * or the -errno of open. */
long brk_check_slurp(brk_io *io, const char *path, char *buf, size_t cap);

/* Assert that `path` holds exactly `want`. */
void brk_check_content(brk_io *io, const char *path, const char *want);

/* A brk_io list callback collecting up to 32 names. */
struct brk_check_names {
    char v[32][64];
    int n;
    int stop_after;     /* 0 = never stop */
};
int brk_check_collect(void *arg, const char *name);

#endif /* BROKER_TEST_IO_CHECK_H */
