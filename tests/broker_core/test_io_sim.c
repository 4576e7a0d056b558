/*
 * test_io_sim.c - the simulated disk (io_sim.c) as a file system: ordinary
 * calls, fault injection and crash points, threads.  The crash model itself
 * is pinned by test_io_sim_crash.c.
 *
 * Store crash tests are only as good as this model, so every rule in the
 * comment at the top of io_sim.c has a test here: what survives which
 * crash mode, what the fault controls do, and that the sim still behaves
 * like a file system for ordinary calls.
 */
/* The build passes -D_GNU_SOURCE; standalone builds still need POSIX.1-2008
 * (pthread, snprintf under -std=c11). */
#if !defined(_GNU_SOURCE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "broker/io.h"
#include "broker/status.h"
#include "io_check.h"
#include "io_sim.h"

/* ------------------------------------------------------------------ */
/* Ordinary file-system behaviour                                        */

static void reads_see_volatile_bytes(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;
    char buf[16] = { 0 };
    size_t n = 0;
    uint64_t size = 0;

    assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->pwrite(io, f, "hello", 5, 0), 0);
    /* Not synced: reads still see it (page cache). */
    assert_int_equal(io->pread(io, f, buf, 5, 0, &n), 0);
    assert_int_equal(n, 5);
    assert_memory_equal(buf, "hello", 5);
    assert_int_equal(io->size(io, f, &size), 0);
    assert_int_equal(size, 5);
    assert_int_equal(io->close(io, f), 0);
    assert_int_equal(brk_sim_file_size(*state, "f", &size), BRK_OK);
    assert_int_equal(size, 5);
}

static void pread_short_at_eof(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;
    char buf[16];
    size_t n = 99;

    brk_check_put(io, "f", 0, "abcdef", false);
    assert_int_equal(io->open(io, "f", BRK_IO_RDONLY, &f), 0);
    assert_int_equal(io->pread(io, f, buf, sizeof buf, 2, &n), 0);
    assert_int_equal(n, 4);
    assert_memory_equal(buf, "cdef", 4);
    assert_int_equal(io->pread(io, f, buf, sizeof buf, 6, &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(io->pread(io, f, buf, sizeof buf, 1000, &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(io->close(io, f), 0);
}

static void write_past_eof_fills_gap_with_zeros(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;
    unsigned char buf[8];
    size_t n = 0;

    assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->pwrite(io, f, "xy", 2, 6), 0);
    assert_int_equal(io->pread(io, f, buf, sizeof buf, 0, &n), 0);
    assert_int_equal(n, 8);
    assert_memory_equal(buf, "\0\0\0\0\0\0xy", 8);
    assert_int_equal(io->close(io, f), 0);
}

static void truncate_shrinks_and_extends_with_zeros(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;
    unsigned char buf[8];
    size_t n = 0;
    uint64_t size = 0;

    assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->pwrite(io, f, "abcdef", 6, 0), 0);
    assert_int_equal(io->truncate(io, f, 2), 0);
    assert_int_equal(io->truncate(io, f, 5), 0);
    assert_int_equal(io->size(io, f, &size), 0);
    assert_int_equal(size, 5);
    assert_int_equal(io->pread(io, f, buf, sizeof buf, 0, &n), 0);
    assert_int_equal(n, 5);
    assert_memory_equal(buf, "ab\0\0\0", 5);
    assert_int_equal(io->close(io, f), 0);
}

static void open_missing_file_returns_enoent(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;

    assert_int_equal(io->open(io, "nope", BRK_IO_RDONLY, &f), -ENOENT);
    assert_null(f);
    assert_int_equal(io->open(io, "nope", BRK_IO_RDWR, &f), -ENOENT);
    /* Parents are not created implicitly. */
    assert_int_equal(io->open(io, "nodir/f", BRK_IO_CREATE, &f), -ENOENT);
    assert_int_equal(io->exists(io, "nodir"), 0);
}

static void create_excl_on_existing_file_returns_eexist(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;

    brk_check_put(io, "f", 0, "keep", false);
    assert_int_equal(io->open(io, "f", BRK_IO_CREATE | BRK_IO_EXCL, &f),
                     -EEXIST);
    /* Without EXCL, CREATE opens the existing file and keeps its bytes. */
    assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->close(io, f), 0);
    brk_check_content(io, "f", "keep");
}

static void open_rejects_directories_and_unknown_flags(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;

    assert_int_equal(io->mkdir(io, "d"), 0);
    assert_int_equal(io->open(io, "d", BRK_IO_RDONLY, &f), -EISDIR);
    assert_int_equal(io->open(io, "/", BRK_IO_RDONLY, &f), -EISDIR);
    assert_int_equal(io->open(io, "x", 1 << 8, &f), -EINVAL);
    brk_check_put(io, "file", 0, "x", false);
    assert_int_equal(io->open(io, "file/sub", BRK_IO_CREATE, &f), -ENOTDIR);
}

static void readonly_handle_refuses_writes(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;

    brk_check_put(io, "f", 0, "abc", true);
    assert_int_equal(io->open(io, "f", BRK_IO_RDONLY, &f), 0);
    assert_int_equal(io->pwrite(io, f, "z", 1, 0), -EBADF);
    assert_int_equal(io->truncate(io, f, 0), -EINVAL);
    assert_int_equal(io->sync(io, f), 0);   /* fdatasync works read-only */
    assert_int_equal(io->close(io, f), 0);
    brk_check_content(io, "f", "abc");
}

static void mkdir_is_idempotent_but_refuses_a_file(void **state)
{
    brk_io *io = brk_sim_io(*state);

    assert_int_equal(io->mkdir(io, "d"), 0);
    assert_int_equal(io->mkdir(io, "d"), 0);
    assert_int_equal(io->mkdir(io, "/"), 0);
    brk_check_put(io, "f", 0, "x", false);
    assert_int_equal(io->mkdir(io, "f"), -EEXIST);
    assert_int_equal(io->mkdir(io, "a/b"), -ENOENT);
    assert_int_equal(io->exists(io, "d"), 1);
}

static void unlink_and_rmdir_check_types(void **state)
{
    brk_io *io = brk_sim_io(*state);

    assert_int_equal(io->mkdir(io, "d"), 0);
    brk_check_put(io, "d/f", 0, "x", false);
    assert_int_equal(io->unlink(io, "missing"), -ENOENT);
    assert_int_equal(io->unlink(io, "d"), -EISDIR);
    assert_int_equal(io->rmdir(io, "d/f"), -ENOTDIR);
    assert_int_equal(io->rmdir(io, "d"), -ENOTEMPTY);
    assert_int_equal(io->rmdir(io, "/"), -EBUSY);
    assert_int_equal(io->unlink(io, "d/f"), 0);
    assert_int_equal(io->exists(io, "d/f"), 0);
    assert_int_equal(io->rmdir(io, "d"), 0);
    assert_int_equal(io->exists(io, "d"), 0);
    assert_int_equal(io->rmdir(io, "d"), -ENOENT);
}

static void rename_replaces_target_and_checks_types(void **state)
{
    brk_io *io = brk_sim_io(*state);

    brk_check_put(io, "a", 0, "new", false);
    brk_check_put(io, "b", 0, "old", false);
    assert_int_equal(io->rename(io, "a", "b"), 0);
    assert_int_equal(io->exists(io, "a"), 0);
    brk_check_content(io, "b", "new");

    assert_int_equal(io->rename(io, "missing", "x"), -ENOENT);
    assert_int_equal(io->rename(io, "b", "b"), 0);      /* same file: no-op */
    brk_check_content(io, "b", "new");

    assert_int_equal(io->mkdir(io, "d"), 0);
    assert_int_equal(io->mkdir(io, "d/sub"), 0);
    assert_int_equal(io->rename(io, "b", "d"), -EISDIR);
    assert_int_equal(io->rename(io, "d", "b"), -ENOTDIR);
    assert_int_equal(io->rename(io, "d", "d/sub/inner"), -EINVAL);
    assert_int_equal(io->rename(io, "b", "nodir/b"), -ENOENT);

    /* Directories move with their content. */
    brk_check_put(io, "d/sub/f", 0, "deep", false);
    assert_int_equal(io->rename(io, "d", "e"), 0);
    brk_check_content(io, "e/sub/f", "deep");
    assert_int_equal(io->exists(io, "d"), 0);
}

static void paths_are_normalised(void **state)
{
    brk_io *io = brk_sim_io(*state);

    assert_int_equal(io->mkdir(io, "/a/"), 0);
    brk_check_put(io, "a//b", 0, "x", false);
    assert_int_equal(io->exists(io, "/a/b"), 1);
    assert_int_equal(io->exists(io, "a/./b"), 1);
    assert_int_equal(io->exists(io, "a/../a/b"), 1);
    assert_int_equal(io->exists(io, "a/b/"), 1);
    assert_int_equal(io->exists(io, "a/b/c"), 0);   /* through a file */
    assert_int_equal(io->exists(io, ""), 1);        /* the root */
}

static void list_reports_created_files(void **state)
{
    brk_io *io = brk_sim_io(*state);
    struct brk_check_names ns = { .n = 0 };

    assert_int_equal(io->mkdir(io, "d"), 0);
    brk_check_put(io, "d/b", 0, "x", false);
    brk_check_put(io, "d/a", 0, "x", false);
    assert_int_equal(io->mkdir(io, "d/c"), 0);
    assert_int_equal(io->list(io, "d", brk_check_collect, &ns), 0);
    assert_int_equal(ns.n, 3);
    assert_string_equal(ns.v[0], "a");     /* sorted: deterministic */
    assert_string_equal(ns.v[1], "b");
    assert_string_equal(ns.v[2], "c");

    ns = (struct brk_check_names){ .stop_after = 1 };
    assert_int_equal(io->list(io, "d", brk_check_collect, &ns), 0);
    assert_int_equal(ns.n, 1);

    assert_int_equal(io->list(io, "missing", brk_check_collect, &ns), -ENOENT);
    assert_int_equal(io->list(io, "d/a", brk_check_collect, &ns), -ENOTDIR);
}

struct unlinker {
    brk_io *io;
    int n;
};

static int unlink_each(void *arg, const char *name)
{
    struct unlinker *u = arg;
    char path[64];

    snprintf(path, sizeof path, "d/%s", name);
    /* Re-entering the sim from the callback must not deadlock. */
    if (u->io->unlink(u->io, path) == 0)
        u->n++;
    return 0;
}

static void list_callback_may_call_back_into_the_sim(void **state)
{
    brk_io *io = brk_sim_io(*state);
    struct unlinker u = { .io = io, .n = 0 };
    struct brk_check_names ns = { .n = 0 };

    assert_int_equal(io->mkdir(io, "d"), 0);
    brk_check_put(io, "d/1", 0, "x", false);
    brk_check_put(io, "d/2", 0, "x", false);
    assert_int_equal(io->list(io, "d", unlink_each, &u), 0);
    assert_int_equal(u.n, 2);
    assert_int_equal(io->list(io, "d", brk_check_collect, &ns), 0);
    assert_int_equal(ns.n, 0);
}

static void handle_keeps_working_after_unlink(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;
    char buf[4];
    size_t n = 0;

    brk_check_put(io, "f", 0, "abc", false);
    assert_int_equal(io->open(io, "f", BRK_IO_RDWR, &f), 0);
    assert_int_equal(io->unlink(io, "f"), 0);
    assert_int_equal(io->pwrite(io, f, "Z", 1, 0), 0);
    assert_int_equal(io->pread(io, f, buf, 3, 0, &n), 0);
    assert_int_equal(n, 3);
    assert_memory_equal(buf, "Zbc", 3);
    assert_int_equal(io->close(io, f), 0);
    assert_int_equal(io->exists(io, "f"), 0);
}

/* ------------------------------------------------------------------ */
/* Fault injection                                                       */

static void crash_after_n_ops_fails_later_writes_without_effect(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;
    char buf[8];
    size_t n = 0;

    assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->sync_dir(io, ""), 0);
    brk_sim_set_crash_after(*state, 2);
    assert_int_equal(io->pwrite(io, f, "ab", 2, 0), 0);
    assert_int_equal(io->sync(io, f), 0);
    assert_false(brk_sim_is_dead(*state));
    assert_int_equal(io->pwrite(io, f, "cd", 2, 2), -EIO);  /* the crash point */
    assert_true(brk_sim_is_dead(*state));
    assert_int_equal(io->pwrite(io, f, "ef", 2, 4), -EIO);
    assert_int_equal(io->sync(io, f), -EIO);
    assert_int_equal(io->truncate(io, f, 0), -EIO);
    assert_int_equal(io->mkdir(io, "d"), -EIO);
    assert_int_equal(io->rename(io, "f", "g"), -EIO);
    assert_int_equal(io->unlink(io, "f"), -EIO);
    assert_int_equal(io->sync_dir(io, ""), -EIO);

    /* Nothing changed, and reads keep working while dead. */
    assert_int_equal(io->pread(io, f, buf, sizeof buf, 0, &n), 0);
    assert_int_equal(n, 2);
    assert_memory_equal(buf, "ab", 2);
    assert_int_equal(io->exists(io, "f"), 1);
    assert_int_equal(io->exists(io, "d"), 0);
    assert_int_equal(io->close(io, f), 0);
    assert_int_equal(io->open(io, "f", BRK_IO_RDONLY, &f), 0);
    assert_int_equal(io->close(io, f), 0);
    assert_int_equal(io->open(io, "g", BRK_IO_CREATE, &f), -EIO);

    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    assert_false(brk_sim_is_dead(*state));
    brk_check_content(io, "f", "ab");
    /* The crash point is disarmed: work continues normally. */
    brk_check_put(io, "f", 2, "cd", true);
    brk_check_content(io, "f", "abcd");
}

static void crash_after_zero_kills_the_next_mutation(void **state)
{
    brk_io *io = brk_sim_io(*state);

    brk_sim_set_crash_after(*state, 0);
    assert_false(brk_sim_is_dead(*state));
    assert_int_equal(io->exists(io, "x"), 0);       /* reads do not count */
    assert_false(brk_sim_is_dead(*state));
    assert_int_equal(io->mkdir(io, "d"), -EIO);
    assert_true(brk_sim_is_dead(*state));
}

static void ops_counts_every_mutating_call(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;
    struct brk_check_names ns = { .n = 0 };
    char buf[4];
    size_t n = 0;
    uint64_t size = 0;

    assert_int_equal(brk_sim_ops(*state), 0);
    assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);     /* 1 */
    assert_int_equal(io->pwrite(io, f, "x", 1, 0), 0);             /* 2 */
    assert_int_equal(io->sync(io, f), 0);                          /* 3 */
    assert_int_equal(io->truncate(io, f, 0), 0);                   /* 4 */
    assert_int_equal(io->pread(io, f, buf, 1, 0, &n), 0);
    assert_int_equal(io->size(io, f, &size), 0);
    assert_int_equal(io->close(io, f), 0);
    assert_int_equal(io->open(io, "f", BRK_IO_RDWR, &f), 0);
    assert_int_equal(io->close(io, f), 0);
    assert_int_equal(io->mkdir(io, "d"), 0);                       /* 5 */
    assert_int_equal(io->rename(io, "f", "g"), 0);                 /* 6 */
    assert_int_equal(io->unlink(io, "g"), 0);                      /* 7 */
    assert_int_equal(io->rmdir(io, "d"), 0);                       /* 8 */
    assert_int_equal(io->sync_dir(io, ""), 0);                     /* 9 */
    assert_int_equal(io->unlink(io, "missing"), -ENOENT);          /* 10 */
    assert_int_equal(io->list(io, "", brk_check_collect, &ns), 0);
    assert_int_equal(io->exists(io, "g"), 0);
    assert_int_equal(brk_sim_ops(*state), 10);
}

/* Atomic replace of a state file: write tmp, sync, rename, sync_dir.  A
 * crash at ANY point must leave "state" holding the old or the new value,
 * never a mix and never missing.  Doubles as the reference example of a
 * crash-point sweep. */
static void replace_workload(brk_io *io)
{
    brk_file *f = NULL;

    if (io->open(io, "state.tmp", BRK_IO_CREATE, &f) != 0)
        return;
    if (io->truncate(io, f, 0) == 0 &&
        io->pwrite(io, f, "new-value", 9, 0) == 0 &&
        io->sync(io, f) == 0) {
        io->close(io, f);
        if (io->rename(io, "state.tmp", "state") == 0)
            io->sync_dir(io, "");
        return;
    }
    io->close(io, f);
}

static brk_sim *replace_fixture(uint64_t seed)
{
    brk_sim *sim = NULL;
    brk_io *io;

    assert_int_equal(brk_sim_open(&sim, seed), BRK_OK);
    io = brk_sim_io(sim);
    brk_check_put(io, "state", 0, "old-value", true);
    assert_int_equal(io->sync_dir(io, ""), 0);
    return sim;
}

static void crash_point_sweep_of_atomic_replace_never_loses_state(void **state)
{
    static const int modes[] = { BRK_SIM_DROP_ALL, BRK_SIM_KEEP_RANDOM,
                                 BRK_SIM_TORN_LAST };
    brk_sim *sim;
    uint64_t base, total;
    int saw_old = 0, saw_new = 0;

    (void)state;
    sim = replace_fixture(1);
    base = brk_sim_ops(sim);
    replace_workload(brk_sim_io(sim));
    total = brk_sim_ops(sim) - base;
    brk_sim_close(sim);
    assert_int_equal(total, 6);     /* open, truncate, pwrite, sync, rename, sync_dir */

    for (size_t m = 0; m < sizeof modes / sizeof modes[0]; m++) {
        for (uint64_t k = 0; k <= total; k++) {
            char buf[64];
            long len;

            sim = replace_fixture(100 + k);
            brk_sim_set_crash_after(sim, k);
            replace_workload(brk_sim_io(sim));
            assert_int_equal(brk_sim_is_dead(sim), k < total);
            assert_int_equal(brk_sim_crash(sim, modes[m]), BRK_OK);
            len = brk_check_slurp(brk_sim_io(sim), "state", buf, sizeof buf);
            assert_int_equal(len, 9);
            if (strcmp(buf, "old-value") == 0)
                saw_old = 1;
            else if (strcmp(buf, "new-value") == 0)
                saw_new = 1;
            else
                fail_msg("mode %d, crash after %d ops: state = \"%s\"",
                         modes[m], (int)k, buf);
            brk_sim_close(sim);
        }
    }
    assert_true(saw_old && saw_new);
}

static void enospc_at_capacity_writes_nothing(void **state)
{
    static char big[600];
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL, *g = NULL;
    uint64_t size = 0;

    memset(big, 'x', sizeof big);
    brk_sim_set_capacity(*state, 1000);
    assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->open(io, "g", BRK_IO_CREATE, &g), 0);
    assert_int_equal(io->pwrite(io, f, big, 600, 0), 0);
    assert_int_equal(io->pwrite(io, g, big, 500, 0), -ENOSPC);
    assert_int_equal(io->size(io, g, &size), 0);
    assert_int_equal(size, 0);
    /* Overwriting allocated bytes needs no space. */
    assert_int_equal(io->pwrite(io, f, big, 600, 0), 0);
    assert_int_equal(io->pwrite(io, g, big, 400, 0), 0);   /* exactly full */
    assert_int_equal(io->pwrite(io, g, "y", 1, 400), -ENOSPC);

    /* Deleting a closed file frees its space. */
    assert_int_equal(io->close(io, f), 0);
    assert_int_equal(io->unlink(io, "f"), 0);
    assert_int_equal(io->pwrite(io, g, big, 600, 400), 0);
    assert_int_equal(io->close(io, g), 0);

    brk_sim_set_capacity(*state, BRK_SIM_UNLIMITED);
    brk_check_put(io, "h", 0, "no limit now", false);
}

static void enospc_counts_unlinked_files_still_open(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL, *g = NULL;

    /* Like a real disk: an unlinked file holds its space until the last
     * handle is closed. */
    brk_sim_set_capacity(*state, 10);
    assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->pwrite(io, f, "0123456789", 10, 0), 0);
    assert_int_equal(io->unlink(io, "f"), 0);
    assert_int_equal(io->open(io, "g", BRK_IO_CREATE, &g), 0);
    assert_int_equal(io->pwrite(io, g, "x", 1, 0), -ENOSPC);
    assert_int_equal(io->close(io, f), 0);
    assert_int_equal(io->pwrite(io, g, "x", 1, 0), 0);
    assert_int_equal(io->close(io, g), 0);
}

static void injected_eio_on_sync(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;

    assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->sync_dir(io, ""), 0);
    assert_int_equal(io->pwrite(io, f, "abc", 3, 0), 0);
    assert_int_equal(brk_sim_fail_next(*state, BRK_SIM_OP_SYNC, EIO, 1),
                     BRK_OK);
    assert_int_equal(io->sync(io, f), -EIO);
    assert_int_equal(io->close(io, f), 0);
    /* The failed sync made nothing durable. */
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    brk_check_content(io, "f", "");

    /* One failure was asked for; the next sync works. */
    brk_check_put(io, "f", 0, "xyz", true);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    brk_check_content(io, "f", "xyz");
}

static void injected_failures_count_down_and_can_be_cancelled(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;
    uint64_t size = 0;

    assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);
    assert_int_equal(brk_sim_fail_next(*state, BRK_SIM_OP_PWRITE, -ENOSPC, 2),
                     BRK_OK);
    assert_int_equal(io->pwrite(io, f, "a", 1, 0), -ENOSPC);
    assert_int_equal(io->pwrite(io, f, "a", 1, 0), -ENOSPC);
    assert_int_equal(io->size(io, f, &size), 0);
    assert_int_equal(size, 0);
    assert_int_equal(io->pwrite(io, f, "a", 1, 0), 0);

    assert_int_equal(brk_sim_fail_next(*state, BRK_SIM_OP_PREAD, EIO, 5),
                     BRK_OK);
    assert_int_equal(brk_sim_fail_next(*state, BRK_SIM_OP_PREAD, EIO, 0),
                     BRK_OK);
    {
        char c;
        size_t n = 0;
        assert_int_equal(io->pread(io, f, &c, 1, 0, &n), 0);
        assert_int_equal(n, 1);
    }
    assert_int_equal(io->close(io, f), 0);
}

static void injected_failures_cover_namespace_ops(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;
    struct brk_check_names ns = { .n = 0 };

    brk_check_put(io, "a", 0, "x", false);
    assert_int_equal(brk_sim_fail_next(*state, BRK_SIM_OP_RENAME, EIO, 1), BRK_OK);
    assert_int_equal(io->rename(io, "a", "b"), -EIO);
    assert_int_equal(io->exists(io, "a"), 1);
    assert_int_equal(io->exists(io, "b"), 0);

    assert_int_equal(brk_sim_fail_next(*state, BRK_SIM_OP_OPEN_CREATE, ENOSPC, 1), BRK_OK);
    assert_int_equal(io->open(io, "c", BRK_IO_CREATE, &f), -ENOSPC);
    assert_int_equal(io->exists(io, "c"), 0);

    assert_int_equal(brk_sim_fail_next(*state, BRK_SIM_OP_SYNC_DIR, EIO, 1), BRK_OK);
    assert_int_equal(io->sync_dir(io, ""), -EIO);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    assert_int_equal(io->exists(io, "a"), 0);

    assert_int_equal(brk_sim_fail_next(*state, BRK_SIM_OP_LIST, EIO, 1), BRK_OK);
    assert_int_equal(io->list(io, "", brk_check_collect, &ns), -EIO);
    assert_int_equal(io->list(io, "", brk_check_collect, &ns), 0);
}

static void fail_next_rejects_bad_arguments(void **state)
{
    assert_int_equal(brk_sim_fail_next(*state, BRK_SIM_OP_COUNT_, EIO, 1),
                     BRK_INVAL);
    assert_int_equal(brk_sim_fail_next(*state, BRK_SIM_OP_SYNC, 0, 1),
                     BRK_INVAL);
}

static void write_raw_plants_bytes_that_survive_crash(void **state)
{
    brk_io *io = brk_sim_io(*state);

    brk_check_put(io, "f", 0, "record", true);
    assert_int_equal(io->sync_dir(io, ""), 0);
    assert_int_equal(brk_sim_write_raw(*state, "f", 2, "XX", 2), BRK_OK);
    brk_check_content(io, "f", "reXXrd");
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    brk_check_content(io, "f", "reXXrd");

    assert_int_equal(brk_sim_write_raw(*state, "missing", 0, "X", 1),
                     BRK_NOTFOUND);
    assert_int_equal(io->mkdir(io, "d"), 0);
    assert_int_equal(brk_sim_write_raw(*state, "d", 0, "X", 1), BRK_INVAL);
}

static void file_size_helper_reports_missing_and_dirs(void **state)
{
    brk_io *io = brk_sim_io(*state);
    uint64_t size = 0;

    assert_int_equal(brk_sim_file_size(*state, "nope", &size), BRK_NOTFOUND);
    assert_int_equal(io->mkdir(io, "d"), 0);
    assert_int_equal(brk_sim_file_size(*state, "d", &size), BRK_INVAL);
}

/* ------------------------------------------------------------------ */
/* Threads                                                               */

enum { THREADS = 4, PER_THREAD = 64, CHUNK = 100 };

struct writer {
    brk_io *io;
    brk_file *f;
    int id;
    int failures;
};

static void *writer_main(void *arg)
{
    struct writer *w = arg;
    char chunk[CHUNK];

    memset(chunk, 'A' + w->id, sizeof chunk);
    for (int i = 0; i < PER_THREAD; i++) {
        uint64_t off = ((uint64_t)i * THREADS + (uint64_t)w->id) * CHUNK;
        if (w->io->pwrite(w->io, w->f, chunk, CHUNK, off) != 0 ||
            w->io->sync(w->io, w->f) != 0)
            w->failures++;
    }
    return NULL;
}

static void concurrent_writers_on_one_file_all_land(void **state)
{
    static char got[THREADS * PER_THREAD * CHUNK];
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;
    pthread_t tid[THREADS];
    struct writer w[THREADS];
    size_t n = 0;

    assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->sync_dir(io, ""), 0);
    for (int i = 0; i < THREADS; i++) {
        w[i] = (struct writer){ .io = io, .f = f, .id = i };
        assert_int_equal(pthread_create(&tid[i], NULL, writer_main, &w[i]), 0);
    }
    for (int i = 0; i < THREADS; i++) {
        assert_int_equal(pthread_join(tid[i], NULL), 0);
        assert_int_equal(w[i].failures, 0);
    }
    assert_int_equal(io->close(io, f), 0);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    assert_int_equal(io->open(io, "f", BRK_IO_RDONLY, &f), 0);
    assert_int_equal(io->pread(io, f, got, sizeof got, 0, &n), 0);
    assert_int_equal(n, sizeof got);
    for (size_t c = 0; c < sizeof got / CHUNK; c++)
        assert_int_equal(got[c * CHUNK], 'A' + (int)(c % THREADS));
    assert_int_equal(io->close(io, f), 0);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, brk_check_sim_setup, \
                                               brk_check_sim_teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(reads_see_volatile_bytes),
        T(pread_short_at_eof),
        T(write_past_eof_fills_gap_with_zeros),
        T(truncate_shrinks_and_extends_with_zeros),
        T(open_missing_file_returns_enoent),
        T(create_excl_on_existing_file_returns_eexist),
        T(open_rejects_directories_and_unknown_flags),
        T(readonly_handle_refuses_writes),
        T(mkdir_is_idempotent_but_refuses_a_file),
        T(unlink_and_rmdir_check_types),
        T(rename_replaces_target_and_checks_types),
        T(paths_are_normalised),
        T(list_reports_created_files),
        T(list_callback_may_call_back_into_the_sim),
        T(handle_keeps_working_after_unlink),
        T(crash_after_n_ops_fails_later_writes_without_effect),
        T(crash_after_zero_kills_the_next_mutation),
        T(ops_counts_every_mutating_call),
        T(crash_point_sweep_of_atomic_replace_never_loses_state),
        T(enospc_at_capacity_writes_nothing),
        T(enospc_counts_unlinked_files_still_open),
        T(injected_eio_on_sync),
        T(injected_failures_count_down_and_can_be_cancelled),
        T(injected_failures_cover_namespace_ops),
        T(fail_next_rejects_bad_arguments),
        T(write_raw_plants_bytes_that_survive_crash),
        T(file_size_helper_reports_missing_and_dirs),
        T(concurrent_writers_on_one_file_all_land),
    };

    return cmocka_run_group_tests_name("io_sim", tests, NULL, NULL);
}
