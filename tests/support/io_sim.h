/*
 * io_sim.h - a simulated disk behind the brk_io vtable, for crash tests.
 *
 * The sim keeps, for every file and directory, what a reader sees now (the
 * volatile view, i.e. the page cache) apart from what would survive a power
 * loss (the durable view).  Only brk_io sync / sync_dir move bytes and names
 * from the first to the second.  brk_sim_crash() then builds a post-crash
 * disk from the durable view plus, depending on the mode, some of what was
 * not yet synced.  The exact model is described at the top of io_sim.c.
 *
 * Typical crash-point sweep:
 *
 *     run the workload once on a fresh sim; n = brk_sim_ops(sim);
 *     for k in 0 .. n-1:
 *         fresh sim; brk_sim_set_crash_after(sim, k);
 *         run the workload (it starts failing with -EIO after k operations);
 *         close the store; brk_sim_crash(sim, mode);
 *         reopen the store and check its invariants.
 *
 * Paths: one namespace per sim.  A leading "/" is ignored ("/a" and "a" are
 * the same file), repeated "/" and "." components are dropped, ".." goes up
 * one level.  "", "/" and "." name the root directory, which always exists.
 * Parent directories must exist, as on a real disk (-ENOENT otherwise).
 *
 * Threads: every function here and every brk_io method of the sim may be
 * called from any thread; one mutex serialises them all.  brk_io list
 * callbacks run without that mutex, so they may call back into the sim.
 */
#ifndef BROKER_TEST_IO_SIM_H
#define BROKER_TEST_IO_SIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/io.h"
#include "broker/status.h"

typedef struct brk_sim brk_sim;

/* Unsynced file data reaches the disk in units of this many bytes. */
#define BRK_SIM_SECTOR 512u

/* Largest file the sim will hold; pwrite/truncate beyond it fail with
 * -EFBIG instead of trying to allocate the hole. */
#define BRK_SIM_MAX_FILE ((uint64_t)1 << 30)

/* Capacity value meaning "no limit" (the default). */
#define BRK_SIM_UNLIMITED UINT64_MAX

/* Crash modes for brk_sim_crash(). */
enum {
    /* Only what was synced survives: file data as of its last sync, each
     * directory as of its last sync_dir. */
    BRK_SIM_DROP_ALL = 0,
    /* Unsynced data survives in part: each 512-byte sector piece of each
     * pending write, and each pending truncate, is independently kept or
     * dropped (in order), and each directory keeps a random prefix of its
     * unsynced name changes. */
    BRK_SIM_KEEP_RANDOM = 1,
    /* Every pending write and truncate lands except the last write of each
     * file, which keeps only a random strict prefix of its bytes (possibly
     * none).  Unsynced name changes are all lost. */
    BRK_SIM_TORN_LAST = 2
};

/* Operation kinds for brk_sim_fail_next().  The kinds marked (m) are the
 * mutating operations counted by brk_sim_ops() and brk_sim_set_crash_after(). */
typedef enum brk_sim_op {
    BRK_SIM_OP_OPEN = 0,     /* open without BRK_IO_CREATE */
    BRK_SIM_OP_OPEN_CREATE,  /* (m) open with BRK_IO_CREATE */
    BRK_SIM_OP_PREAD,
    BRK_SIM_OP_PWRITE,       /* (m) */
    BRK_SIM_OP_SYNC,         /* (m) */
    BRK_SIM_OP_TRUNCATE,     /* (m) */
    BRK_SIM_OP_MKDIR,        /* (m) */
    BRK_SIM_OP_UNLINK,       /* (m) */
    BRK_SIM_OP_RMDIR,        /* (m) */
    BRK_SIM_OP_RENAME,       /* (m) */
    BRK_SIM_OP_SYNC_DIR,     /* (m) */
    BRK_SIM_OP_LIST,
    BRK_SIM_OP_COUNT_
} brk_sim_op;

/*
 * Create an empty simulated disk (just the root directory).  `seed` drives
 * every random choice the sim makes, so a failing test replays exactly with
 * the same seed and the same sequence of calls.
 * Returns BRK_OK and sets *out, BRK_INVAL if out is NULL, BRK_NOMEM.
 * On failure *out is NULL and there is nothing to close.
 */
brk_status brk_sim_open(brk_sim **out, uint64_t seed);

/*
 * Free the sim and everything on it.  Every brk_file opened on it must be
 * closed first (a handle outlives nothing of the sim).  NULL is a no-op.
 */
void brk_sim_close(brk_sim *sim);

/*
 * The brk_io vtable of this sim.  Borrowed: valid until brk_sim_close;
 * hand it to the code under test in place of brk_io_posix().
 */
brk_io *brk_sim_io(brk_sim *sim);

/*
 * Simulate a power loss and restart: compute the post-crash disk according
 * to `mode` (BRK_SIM_DROP_ALL, BRK_SIM_KEEP_RANDOM, BRK_SIM_TORN_LAST) and
 * make it the current state, with nothing pending (volatile == durable).
 * Also leaves the DEAD state and disarms brk_sim_set_crash_after; injected
 * failures (brk_sim_fail_next) and the capacity stay as they are.
 * Handles opened before the crash stay valid objects, but every method on
 * them except close returns -EIO; close them and open again.
 * Returns BRK_OK, BRK_INVAL for an unknown mode, BRK_NOMEM (sim unchanged).
 */
brk_status brk_sim_crash(brk_sim *sim, int mode);

/*
 * Arm a crash point: the next `n` mutating operations (see brk_sim_op)
 * behave normally; the one after them fails with -EIO without effect and
 * puts the sim in the DEAD state, in which every mutating operation fails
 * with -EIO without effect.  Reads (pread, size, list, exists, open without
 * CREATE) keep working.  Only brk_sim_crash leaves DEAD.
 * n = 0 kills the very next mutating operation; UINT64_MAX disarms.
 */
void brk_sim_set_crash_after(brk_sim *sim, uint64_t n);

/* Mutating operations attempted so far (every call counts, also those that
 * failed, were injected failures or happened while DEAD).  Never reset. */
uint64_t brk_sim_ops(brk_sim *sim);

/* True between the crash point set by brk_sim_set_crash_after and the next
 * brk_sim_crash. */
bool brk_sim_is_dead(brk_sim *sim);

/*
 * Make the next `count` operations of kind `op` fail with -errno_value
 * without any effect (data, names and durability all unchanged).  Replaces
 * any earlier setting for that kind; count = 0 cancels it.  errno_value may
 * be given as EIO or -EIO.  The DEAD state, checked first, takes priority.
 * Returns BRK_OK, or BRK_INVAL for an unknown kind or errno_value 0.
 */
brk_status brk_sim_fail_next(brk_sim *sim, brk_sim_op op, int errno_value,
                             uint64_t count);

/*
 * Limit the disk: the sum of the (volatile) sizes of all files that still
 * have a name or an open handle may not exceed `bytes`.  A pwrite that
 * would push the sum past it fails with -ENOSPC and writes nothing.
 * Truncate is not limited (holes are free on a real disk too).  Lowering
 * the limit below current usage only affects later writes.
 * BRK_SIM_UNLIMITED (the default) removes the limit.
 */
void brk_sim_set_capacity(brk_sim *sim, uint64_t bytes);

/*
 * Volatile size of the file at `path` (what brk_io size would report).
 * Returns BRK_OK, BRK_NOTFOUND if there is no such file, BRK_INVAL for a
 * directory or NULL argument.  Not an operation: ignores DEAD and faults.
 */
brk_status brk_sim_file_size(brk_sim *sim, const char *path, uint64_t *size);

/*
 * Plant bytes directly into both the volatile and the durable view of an
 * existing file (extending it with zeros if needed), e.g. to corrupt a
 * record.  Not an operation: not counted, ignores DEAD, faults and
 * capacity.  Unsynced writes to the same bytes would still be replayed on
 * top at a crash, so call it on a quiescent, synced file.
 * Returns BRK_OK, BRK_NOTFOUND, BRK_INVAL (directory, NULL, or past
 * BRK_SIM_MAX_FILE), BRK_NOMEM.
 */
brk_status brk_sim_write_raw(brk_sim *sim, const char *path, uint64_t off,
                             const void *buf, size_t len);

#endif /* BROKER_TEST_IO_SIM_H */
