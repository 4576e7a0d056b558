/* io_check.c - see io_check.h. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "io_check.h"
#include "io_sim.h"

int brk_check_sim_setup(void **state)
{
    brk_sim *sim = NULL;

    if (brk_sim_open(&sim, 42) != BRK_OK)
        return -1;
    *state = sim;
    return 0;
}

int brk_check_sim_teardown(void **state)
{
    brk_sim_close(*state);
    return 0;
}

void brk_check_put(brk_io *io, const char *path, uint64_t off,
                   const char *text, bool sync)
{
    brk_file *f = NULL;

    assert_int_equal(io->open(io, path, BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->pwrite(io, f, text, strlen(text), off), 0);
    if (sync)
        assert_int_equal(io->sync(io, f), 0);
    assert_int_equal(io->close(io, f), 0);
}

long brk_check_slurp(brk_io *io, const char *path, char *buf, size_t cap)
{
    brk_file *f = NULL;
    size_t n = 0;
    int rc = io->open(io, path, BRK_IO_RDONLY, &f);

    if (rc != 0)
        return rc;
    assert_int_equal(io->pread(io, f, buf, cap - 1, 0, &n), 0);
    buf[n] = '\0';
    assert_int_equal(io->close(io, f), 0);
    return (long)n;
}

void brk_check_content(brk_io *io, const char *path, const char *want)
{
    char buf[4096];

    assert_int_equal(brk_check_slurp(io, path, buf, sizeof buf),
                     (long)strlen(want));
    assert_string_equal(buf, want);
}

int brk_check_collect(void *arg, const char *name)
{
    struct brk_check_names *ns = arg;

    if (ns->n < 32)
        snprintf(ns->v[ns->n++], sizeof ns->v[0], "%s", name);
    return ns->stop_after != 0 && ns->n >= ns->stop_after;
}
