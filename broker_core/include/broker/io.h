/*
 * broker/io.h - the file I/O seam.
 *
 * Every byte broker_core reads or writes goes through a brk_io: a small
 * vtable in the spirit of SQLite's VFS.  The POSIX backend (brk_io_posix)
 * is what runs in production; tests substitute a simulated disk that keeps
 * durable and volatile bytes apart and can crash at any operation.
 *
 * Conventions shared by all methods:
 *   - They return 0 on success or a negative errno value (-ENOENT, -EIO,
 *     -ENOSPC, ...).  Never a partial success: pwrite writes all bytes or
 *     fails (a backend retries short writes itself); pread may return fewer
 *     bytes than asked only at end of file (*nread says how many).
 *   - Paths are absolute or relative to the process working directory and
 *     are passed through unchanged.
 *   - sync is fdatasync(): once it returns 0, every byte written to that
 *     file before the call survives a crash.  Creating, renaming or unlinking
 *     a file is durable only after sync_dir() on its parent directory.
 *   - A brk_file is owned by the caller from open until close; close is
 *     required even after a failed sync.  Methods may be called from several
 *     threads at once on different files, and pread/pwrite/sync concurrently
 *     on the same file.
 */
#ifndef BROKER_IO_H
#define BROKER_IO_H

#include <stddef.h>
#include <stdint.h>

typedef struct brk_io brk_io;
typedef struct brk_file brk_file;   /* opaque; io_posix.c defines it, other
                                       backends cast their own handle type */

enum {
    BRK_IO_RDONLY = 0,
    BRK_IO_RDWR   = 1 << 0,
    BRK_IO_CREATE = 1 << 1,   /* create if missing (implies RDWR) */
    BRK_IO_EXCL   = 1 << 2    /* with CREATE: fail with -EEXIST if present */
};

/* Called once per directory entry (not "." or ".."); return non-zero to stop
 * (list then returns 0). */
typedef int (*brk_io_list_fn)(void *arg, const char *name);

struct brk_io {
    int (*open)(brk_io *io, const char *path, int flags, brk_file **out);
    int (*close)(brk_io *io, brk_file *f);
    int (*pread)(brk_io *io, brk_file *f, void *buf, size_t len,
                 uint64_t off, size_t *nread);
    int (*pwrite)(brk_io *io, brk_file *f, const void *buf, size_t len,
                  uint64_t off);
    int (*sync)(brk_io *io, brk_file *f);                 /* fdatasync */
    int (*truncate)(brk_io *io, brk_file *f, uint64_t size);
    int (*size)(brk_io *io, brk_file *f, uint64_t *size);
    int (*mkdir)(brk_io *io, const char *path);  /* 0 if it exists as a dir */
    int (*unlink)(brk_io *io, const char *path);
    int (*rmdir)(brk_io *io, const char *path);
    int (*rename)(brk_io *io, const char *from, const char *to);
    int (*sync_dir)(brk_io *io, const char *path);
    int (*list)(brk_io *io, const char *dir, brk_io_list_fn fn, void *arg);
    int (*exists)(brk_io *io, const char *path);          /* 1, 0 or -errno */
    /* Optional (NULL = no locking): create `path` if needed and take an
     * exclusive lock on it that lasts until the returned file is closed.
     * -EAGAIN when another holder has it (another process, or another open
     * file in this one). */
    int (*lock)(brk_io *io, const char *path, brk_file **out);
};

/* The POSIX backend.  Static storage; stateless, so one instance serves every
 * store in the process. */
brk_io *brk_io_posix(void);

#endif /* BROKER_IO_H */
