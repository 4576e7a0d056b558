/*
 * test_io_sim_crash.c - pins the crash model of the simulated disk
 * (io_sim.c): what survives which crash mode.
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
/* Crash model                                                           */

static void unsynced_write_is_lost_on_drop_all_crash(void **state)
{
    brk_io *io = brk_sim_io(*state);

    brk_check_put(io, "f", 0, "durable", true);
    assert_int_equal(io->sync_dir(io, "/"), 0);
    brk_check_put(io, "f", 7, "+volatile", false);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    brk_check_content(io, "f", "durable");
}

static void synced_write_survives_crash(void **state)
{
    brk_io *io = brk_sim_io(*state);

    brk_check_put(io, "f", 0, "abc", true);
    assert_int_equal(io->sync_dir(io, "."), 0);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    brk_check_content(io, "f", "abc");
}

static void sync_of_one_file_leaves_another_volatile(void **state)
{
    brk_io *io = brk_sim_io(*state);

    brk_check_put(io, "a", 0, "A", true);
    brk_check_put(io, "b", 0, "B", false);
    assert_int_equal(io->sync_dir(io, ""), 0);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    brk_check_content(io, "a", "A");
    brk_check_content(io, "b", "");
}

static void unsynced_truncate_is_undone_by_drop_all_crash(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;

    brk_check_put(io, "f", 0, "abcdef", true);
    assert_int_equal(io->sync_dir(io, ""), 0);
    assert_int_equal(io->open(io, "f", BRK_IO_RDWR, &f), 0);
    assert_int_equal(io->truncate(io, f, 2), 0);
    assert_int_equal(io->close(io, f), 0);
    brk_check_content(io, "f", "ab");
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    brk_check_content(io, "f", "abcdef");

    /* ... and a synced truncate is durable. */
    assert_int_equal(io->open(io, "f", BRK_IO_RDWR, &f), 0);
    assert_int_equal(io->truncate(io, f, 3), 0);
    assert_int_equal(io->sync(io, f), 0);
    assert_int_equal(io->close(io, f), 0);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    brk_check_content(io, "f", "abc");
}

static void file_created_without_dir_sync_vanishes_after_crash(void **state)
{
    brk_io *io = brk_sim_io(*state);

    brk_check_put(io, "f", 0, "synced data", true);   /* the file itself is synced */
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    assert_int_equal(io->exists(io, "f"), 0);
}

static void rename_without_dir_sync_reverts_after_crash(void **state)
{
    brk_io *io = brk_sim_io(*state);

    brk_check_put(io, "tmp", 0, "state", true);
    assert_int_equal(io->sync_dir(io, ""), 0);
    assert_int_equal(io->rename(io, "tmp", "final"), 0);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    assert_int_equal(io->exists(io, "final"), 0);
    brk_check_content(io, "tmp", "state");
}

static void rename_with_dir_sync_survives_crash(void **state)
{
    brk_io *io = brk_sim_io(*state);

    brk_check_put(io, "final", 0, "v1", true);
    assert_int_equal(io->sync_dir(io, ""), 0);
    brk_check_put(io, "tmp", 0, "v2", true);
    assert_int_equal(io->rename(io, "tmp", "final"), 0);
    assert_int_equal(io->sync_dir(io, ""), 0);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    assert_int_equal(io->exists(io, "tmp"), 0);
    brk_check_content(io, "final", "v2");
}

static void unlink_without_dir_sync_is_undone_by_crash(void **state)
{
    brk_io *io = brk_sim_io(*state);

    brk_check_put(io, "f", 0, "x", true);
    assert_int_equal(io->sync_dir(io, ""), 0);
    assert_int_equal(io->unlink(io, "f"), 0);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    brk_check_content(io, "f", "x");
}

static void new_dir_keeps_only_what_its_own_sync_dir_made_durable(void **state)
{
    brk_io *io = brk_sim_io(*state);

    assert_int_equal(io->mkdir(io, "d"), 0);
    brk_check_put(io, "d/a", 0, "a", true);
    assert_int_equal(io->sync_dir(io, ""), 0);      /* "d" is durable ... */
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    assert_int_equal(io->exists(io, "d"), 1);
    assert_int_equal(io->exists(io, "d/a"), 0);     /* ... its entry is not */

    brk_check_put(io, "d/b", 0, "b", true);
    assert_int_equal(io->sync_dir(io, "d"), 0);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    brk_check_content(io, "d/b", "b");
}

static void dir_synced_without_parent_sync_is_lost_with_its_files(void **state)
{
    brk_io *io = brk_sim_io(*state);

    assert_int_equal(io->mkdir(io, "d"), 0);
    brk_check_put(io, "d/a", 0, "a", true);
    assert_int_equal(io->sync_dir(io, "d"), 0);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    assert_int_equal(io->exists(io, "d"), 0);
}

static void keep_random_crash_keeps_sector_subset(void **state)
{
    enum { SECTORS = 16, LEN = SECTORS * BRK_SIM_SECTOR };
    static unsigned char olds[LEN], news[LEN], got[LEN];
    int saw_mixed = 0;

    (void)state;
    memset(olds, 'o', sizeof olds);
    memset(news, 'n', sizeof news);
    for (uint64_t seed = 1; seed <= 8; seed++) {
        brk_sim *sim = NULL;
        brk_io *io;
        brk_file *f = NULL;
        size_t n = 0;
        int kept = 0;

        assert_int_equal(brk_sim_open(&sim, seed), BRK_OK);
        io = brk_sim_io(sim);
        assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);
        assert_int_equal(io->pwrite(io, f, olds, LEN, 0), 0);
        assert_int_equal(io->sync(io, f), 0);
        assert_int_equal(io->sync_dir(io, ""), 0);
        assert_int_equal(io->pwrite(io, f, news, LEN, 0), 0);
        assert_int_equal(io->close(io, f), 0);

        assert_int_equal(brk_sim_crash(sim, BRK_SIM_KEEP_RANDOM), BRK_OK);
        assert_int_equal(io->open(io, "f", BRK_IO_RDONLY, &f), 0);
        assert_int_equal(io->pread(io, f, got, LEN, 0, &n), 0);
        assert_int_equal(n, LEN);
        /* Every sector is entirely old or entirely new: no byte-level
         * mixing inside a sector for a sector-aligned write. */
        for (int s = 0; s < SECTORS; s++) {
            const unsigned char *p = got + s * BRK_SIM_SECTOR;
            if (memcmp(p, news, BRK_SIM_SECTOR) == 0)
                kept++;
            else
                assert_memory_equal(p, olds, BRK_SIM_SECTOR);
        }
        if (kept > 0 && kept < SECTORS)
            saw_mixed = 1;
        assert_int_equal(io->close(io, f), 0);
        brk_sim_close(sim);
    }
    assert_true(saw_mixed);
}

static void keep_random_crash_may_keep_unsynced_append_with_zero_gaps(void **state)
{
    /* An unsynced append of 3 sectors onto an empty durable file: after the
     * crash the file is as long as the last surviving sector, and sectors
     * that did not survive read as zeros. */
    static unsigned char data[3 * BRK_SIM_SECTOR], got[3 * BRK_SIM_SECTOR];
    int saw_longer = 0, saw_empty = 0;

    (void)state;
    memset(data, 'd', sizeof data);
    for (uint64_t seed = 1; seed <= 16; seed++) {
        brk_sim *sim = NULL;
        brk_io *io;
        brk_file *f = NULL;
        uint64_t size = 0;
        size_t n = 0;

        assert_int_equal(brk_sim_open(&sim, seed), BRK_OK);
        io = brk_sim_io(sim);
        assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);
        assert_int_equal(io->sync(io, f), 0);
        assert_int_equal(io->sync_dir(io, ""), 0);
        assert_int_equal(io->pwrite(io, f, data, sizeof data, 0), 0);
        assert_int_equal(io->close(io, f), 0);
        assert_int_equal(brk_sim_crash(sim, BRK_SIM_KEEP_RANDOM), BRK_OK);

        assert_int_equal(brk_sim_file_size(sim, "f", &size), BRK_OK);
        assert_true(size % BRK_SIM_SECTOR == 0 && size <= sizeof data);
        if (size == 0)
            saw_empty = 1;
        else
            saw_longer = 1;
        assert_int_equal(io->open(io, "f", BRK_IO_RDONLY, &f), 0);
        assert_int_equal(io->pread(io, f, got, sizeof got, 0, &n), 0);
        assert_int_equal(n, size);
        for (size_t i = 0; i < n; i++)
            assert_true(got[i] == 'd' || got[i] == 0);
        if (n > 0)      /* the last sector is there because it survived */
            assert_int_equal(got[n - 1], 'd');
        assert_int_equal(io->close(io, f), 0);
        brk_sim_close(sim);
    }
    assert_true(saw_longer);
    assert_true(saw_empty);
}

static void keep_random_crash_keeps_prefix_of_dir_ops(void **state)
{
    int seen[9] = { 0 };

    (void)state;
    for (uint64_t seed = 1; seed <= 64; seed++) {
        brk_sim *sim = NULL;
        brk_io *io;
        struct brk_check_names ns = { .n = 0 };
        char name[16];

        assert_int_equal(brk_sim_open(&sim, seed), BRK_OK);
        io = brk_sim_io(sim);
        for (int i = 0; i < 8; i++) {
            snprintf(name, sizeof name, "f%d", i);
            brk_check_put(io, name, 0, "x", true);
        }
        assert_int_equal(brk_sim_crash(sim, BRK_SIM_KEEP_RANDOM), BRK_OK);
        assert_int_equal(io->list(io, "", brk_check_collect, &ns), 0);
        /* Survivors are exactly f0 .. f(k-1) for some k. */
        for (int i = 0; i < ns.n; i++) {
            snprintf(name, sizeof name, "f%d", i);
            assert_string_equal(ns.v[i], name);
        }
        seen[ns.n] = 1;
        brk_sim_close(sim);
    }
    /* The prefix length really is random: several lengths were seen. */
    int distinct = 0;
    for (int i = 0; i <= 8; i++)
        distinct += seen[i];
    assert_true(distinct >= 3);
}

static void keep_random_crash_keeps_same_dir_rename_atomic(void **state)
{
    int saw_tmp = 0, saw_final = 0;

    (void)state;
    for (uint64_t seed = 1; seed <= 32; seed++) {
        brk_sim *sim = NULL;
        brk_io *io;
        int tmp, fin;

        assert_int_equal(brk_sim_open(&sim, seed), BRK_OK);
        io = brk_sim_io(sim);
        brk_check_put(io, "tmp", 0, "v", true);
        assert_int_equal(io->sync_dir(io, ""), 0);
        brk_check_put(io, "other", 0, "o", true);             /* an earlier pending op */
        assert_int_equal(io->rename(io, "tmp", "final"), 0);
        assert_int_equal(brk_sim_crash(sim, BRK_SIM_KEEP_RANDOM), BRK_OK);
        tmp = io->exists(io, "tmp");
        fin = io->exists(io, "final");
        /* One name or the other, never both and never neither. */
        assert_int_equal(tmp + fin, 1);
        saw_tmp |= tmp;
        saw_final |= fin;
        brk_check_content(io, fin ? "final" : "tmp", "v");
        brk_sim_close(sim);
    }
    assert_true(saw_tmp && saw_final);
}

static void torn_last_crash_tears_only_the_final_write(void **state)
{
    static char a[1000], b[1000], got[2000];
    int sizes_differ = 0;
    uint64_t first_size = 0;

    (void)state;
    memset(a, 'a', sizeof a);
    memset(b, 'b', sizeof b);
    for (uint64_t seed = 1; seed <= 8; seed++) {
        brk_sim *sim = NULL;
        brk_io *io;
        brk_file *f = NULL;
        uint64_t size = 0;
        size_t n = 0;

        assert_int_equal(brk_sim_open(&sim, seed), BRK_OK);
        io = brk_sim_io(sim);
        assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);
        assert_int_equal(io->sync_dir(io, ""), 0);
        assert_int_equal(io->pwrite(io, f, a, sizeof a, 0), 0);
        assert_int_equal(io->pwrite(io, f, b, sizeof b, sizeof a), 0);
        assert_int_equal(io->close(io, f), 0);
        assert_int_equal(brk_sim_crash(sim, BRK_SIM_TORN_LAST), BRK_OK);

        assert_int_equal(brk_sim_file_size(sim, "f", &size), BRK_OK);
        assert_true(size >= sizeof a && size < sizeof a + sizeof b);
        assert_int_equal(io->open(io, "f", BRK_IO_RDONLY, &f), 0);
        assert_int_equal(io->pread(io, f, got, sizeof got, 0, &n), 0);
        assert_memory_equal(got, a, sizeof a);
        assert_memory_equal(got + sizeof a, b, n - sizeof a);
        assert_int_equal(io->close(io, f), 0);
        if (seed == 1)
            first_size = size;
        else if (size != first_size)
            sizes_differ = 1;
        brk_sim_close(sim);
    }
    assert_true(sizes_differ);
}

static void torn_last_crash_drops_unsynced_names(void **state)
{
    brk_io *io = brk_sim_io(*state);

    brk_check_put(io, "f", 0, "data", true);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_TORN_LAST), BRK_OK);
    assert_int_equal(io->exists(io, "f"), 0);
}

static uint64_t crash_size_for_seed(uint64_t seed)
{
    static char buf[5000];
    brk_sim *sim = NULL;
    brk_io *io;
    brk_file *f = NULL;
    uint64_t size = 0;

    memset(buf, 'q', sizeof buf);
    assert_int_equal(brk_sim_open(&sim, seed), BRK_OK);
    io = brk_sim_io(sim);
    assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->sync_dir(io, ""), 0);
    assert_int_equal(io->pwrite(io, f, buf, sizeof buf, 0), 0);
    assert_int_equal(io->close(io, f), 0);
    assert_int_equal(brk_sim_crash(sim, BRK_SIM_TORN_LAST), BRK_OK);
    assert_int_equal(brk_sim_file_size(sim, "f", &size), BRK_OK);
    brk_sim_close(sim);
    return size;
}

static void crash_outcome_is_deterministic_for_a_seed(void **state)
{
    (void)state;
    for (uint64_t seed = 1; seed <= 4; seed++)
        assert_int_equal(crash_size_for_seed(seed), crash_size_for_seed(seed));
}

static void crash_rejects_unknown_mode(void **state)
{
    assert_int_equal(brk_sim_crash(*state, 99), BRK_INVAL);
}

static void stale_handle_after_crash_returns_eio(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;
    char buf[4];
    size_t n = 0;
    uint64_t size = 0;

    brk_check_put(io, "f", 0, "abc", true);
    assert_int_equal(io->sync_dir(io, ""), 0);
    assert_int_equal(io->open(io, "f", BRK_IO_RDWR, &f), 0);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    assert_int_equal(io->pread(io, f, buf, 3, 0, &n), -EIO);
    assert_int_equal(io->pwrite(io, f, "x", 1, 0), -EIO);
    assert_int_equal(io->sync(io, f), -EIO);
    assert_int_equal(io->truncate(io, f, 0), -EIO);
    assert_int_equal(io->size(io, f, &size), -EIO);
    assert_int_equal(io->close(io, f), 0);
    brk_check_content(io, "f", "abc");
}

static void open_handle_to_vanished_file_is_freed_on_close(void **state)
{
    brk_io *io = brk_sim_io(*state);
    brk_file *f = NULL;

    /* The file never became durable, so the crash removes it while a
     * handle is still open; the handle must stay closable (ASan checks
     * the memory side). */
    assert_int_equal(io->open(io, "f", BRK_IO_CREATE, &f), 0);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_DROP_ALL), BRK_OK);
    assert_int_equal(io->exists(io, "f"), 0);
    assert_int_equal(io->close(io, f), 0);
}

static void removed_dir_is_freed_with_its_durable_and_pending_entries(void **state)
{
    brk_io *io = brk_sim_io(*state);

    /* "d" dies holding a durable entry (f) and a pending add/remove pair
     * (g); freeing it must release both (ASan watches for leaks and
     * use-after-free), and a crash must not bring anything back. */
    assert_int_equal(io->mkdir(io, "d"), 0);
    brk_check_put(io, "d/f", 0, "f", true);
    assert_int_equal(io->sync_dir(io, "d"), 0);
    assert_int_equal(io->sync_dir(io, ""), 0);
    brk_check_put(io, "d/g", 0, "g", false);
    assert_int_equal(io->unlink(io, "d/g"), 0);
    assert_int_equal(io->unlink(io, "d/f"), 0);
    assert_int_equal(io->rmdir(io, "d"), 0);
    assert_int_equal(io->sync_dir(io, ""), 0);
    assert_int_equal(brk_sim_crash(*state, BRK_SIM_KEEP_RANDOM), BRK_OK);
    assert_int_equal(io->exists(io, "d"), 0);
}

/* Two directories swap parents through cross-directory renames, which the
 * crash model splits into independent halves.  Whatever the crash keeps,
 * the namespace must remain a tree (no directory reachable twice). */
static int count_tree(brk_io *io, const char *path, int depth)
{
    struct brk_check_names ns = { .n = 0 };
    int total = 0;

    assert_true(depth < 16);
    if (io->list(io, path, brk_check_collect, &ns) != 0)
        return 0;       /* a file */
    for (int i = 0; i < ns.n; i++) {
        char child[512];
        int w = snprintf(child, sizeof child, "%s/%s", path, ns.v[i]);
        assert_true(w > 0 && (size_t)w < sizeof child);
        total += 1 + count_tree(io, child, depth + 1);
    }
    return total;
}

static void crash_after_cross_dir_renames_leaves_a_tree(void **state)
{
    (void)state;
    for (uint64_t seed = 1; seed <= 64; seed++) {
        brk_sim *sim = NULL;
        brk_io *io;

        assert_int_equal(brk_sim_open(&sim, seed), BRK_OK);
        io = brk_sim_io(sim);
        assert_int_equal(io->mkdir(io, "a"), 0);
        assert_int_equal(io->mkdir(io, "b"), 0);
        brk_check_put(io, "a/f", 0, "x", true);
        assert_int_equal(io->sync_dir(io, "a"), 0);
        assert_int_equal(io->sync_dir(io, ""), 0);
        assert_int_equal(io->rename(io, "b", "a/b"), 0);
        assert_int_equal(io->rename(io, "a/b", "b"), 0);
        assert_int_equal(io->rename(io, "a", "b/a"), 0);
        assert_int_equal(io->rename(io, "b/a/f", "g"), 0);
        assert_int_equal(brk_sim_crash(sim, BRK_SIM_KEEP_RANDOM), BRK_OK);
        assert_true(count_tree(io, "", 0) <= 4);
        /* Still usable afterwards. */
        brk_check_put(io, "after", 0, "y", true);
        brk_sim_close(sim);
    }
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, brk_check_sim_setup, \
                                               brk_check_sim_teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(unsynced_write_is_lost_on_drop_all_crash),
        T(synced_write_survives_crash),
        T(sync_of_one_file_leaves_another_volatile),
        T(unsynced_truncate_is_undone_by_drop_all_crash),
        T(file_created_without_dir_sync_vanishes_after_crash),
        T(rename_without_dir_sync_reverts_after_crash),
        T(rename_with_dir_sync_survives_crash),
        T(unlink_without_dir_sync_is_undone_by_crash),
        T(new_dir_keeps_only_what_its_own_sync_dir_made_durable),
        T(dir_synced_without_parent_sync_is_lost_with_its_files),
        T(keep_random_crash_keeps_sector_subset),
        T(keep_random_crash_may_keep_unsynced_append_with_zero_gaps),
        T(keep_random_crash_keeps_prefix_of_dir_ops),
        T(keep_random_crash_keeps_same_dir_rename_atomic),
        T(torn_last_crash_tears_only_the_final_write),
        T(torn_last_crash_drops_unsynced_names),
        T(crash_outcome_is_deterministic_for_a_seed),
        T(crash_rejects_unknown_mode),
        T(stale_handle_after_crash_returns_eio),
        T(open_handle_to_vanished_file_is_freed_on_close),
        T(removed_dir_is_freed_with_its_durable_and_pending_entries),
        T(crash_after_cross_dir_renames_leaves_a_tree),
    };

    return cmocka_run_group_tests_name("io_sim_crash", tests, NULL, NULL);
}
