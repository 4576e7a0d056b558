/*
 * io_posix.c - the production brk_io backend: thin wrappers over POSIX calls.
 *
 * Why it is this thin: every policy (when to sync, what a failed sync means,
 * how to recover) lives in the store, where it can be tested against the
 * simulated disk.  This file only turns syscalls into the io.h contract:
 *   - 0 or -errno, never -1 plus a global errno, so callers cannot read a
 *     stale errno after an intervening call;
 *   - pwrite is all-or-nothing from the caller's point of view: short writes
 *     and EINTR are retried here, so the store never sees a partial success;
 *   - pread returns fewer bytes than asked only at end of file.
 *
 * Threads: the backend has no state at all (the vtable is a constant and a
 * brk_file only holds the descriptor), so any number of stores and threads
 * may share brk_io_posix().  pread/pwrite use explicit offsets and never
 * touch the shared file position, which is what makes concurrent calls on
 * one brk_file safe.
 *
 * Descriptors are opened with O_CLOEXEC so that a child started by the
 * sidecar (e.g. a hook) never inherits store files and keeps them alive.
 */
/* The build passes -D_GNU_SOURCE; without it, ask for POSIX.1-2008
 * explicitly (O_CLOEXEC, O_DIRECTORY, fdatasync) rather than rely on
 * compiler defaults.  Feature-test macros are the one place a leading
 * underscore is ours to define. */
#if !defined(_GNU_SOURCE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif

#include "broker/io.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>      /* rename */
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

/* Offsets travel as uint64_t through the vtable and as off_t to the kernel;
 * a 32-bit off_t would silently wrap at 2 GiB. */
_Static_assert(sizeof(off_t) >= 8, "brk_io_posix needs a 64-bit off_t");

/* Largest single read/write request.  POSIX leaves counts above SSIZE_MAX
 * implementation-defined and Linux caps one call near 2 GiB anyway; a fixed
 * cap keeps the loop arithmetic obviously in range. */
#define BRK_POSIX_CHUNK ((size_t)1 << 30)

struct brk_file {
    int fd;     /* owned; closed by brk_posix_close */
};

/* -errno for the last failed call, never 0: a caller that got -1 must not
 * turn it into success because some library path forgot to set errno. */
static int brk_posix_err(void)
{
    return errno > 0 ? -errno : -EIO;
}

/* True when [off, off + len) can be expressed as off_t values. */
static int brk_posix_range_ok(uint64_t off, size_t len)
{
    const uint64_t max = (uint64_t)INT64_MAX;
    return off <= max && (uint64_t)len <= max - off;
}

static int brk_posix_open(brk_io *io, const char *path, int flags,
                          brk_file **out)
{
    const int known = BRK_IO_RDWR | BRK_IO_CREATE | BRK_IO_EXCL;
    int oflags = O_CLOEXEC;
    struct brk_file *f;
    int fd;

    (void)io;
    if (path == NULL || out == NULL || (flags & ~known) != 0)
        return -EINVAL;
    *out = NULL;

    if (flags & BRK_IO_CREATE) {
        oflags |= O_CREAT | O_RDWR;
        /* O_EXCL without O_CREAT is undefined by POSIX, so EXCL is only
         * honoured together with CREATE, as io.h documents. */
        if (flags & BRK_IO_EXCL)
            oflags |= O_EXCL;
    } else if (flags & BRK_IO_RDWR) {
        oflags |= O_RDWR;
    } else {
        oflags |= O_RDONLY;
    }

    do {
        fd = open(path, oflags, 0644);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return brk_posix_err();

    /* A read-only open of a directory succeeds on Linux and only fails at
     * the first read.  Refuse it here so both backends agree (the simulated
     * disk returns -EISDIR) and the mistake shows where it is made.  Opens
     * with O_RDWR already fail with EISDIR in the kernel. */
    if ((oflags & O_ACCMODE) == O_RDONLY) {
        struct stat st;
        if (fstat(fd, &st) != 0) {
            int rc = brk_posix_err();
            close(fd);
            return rc;
        }
        if (S_ISDIR(st.st_mode)) {
            close(fd);
            return -EISDIR;
        }
    }

    f = malloc(sizeof *f);
    if (f == NULL) {
        close(fd);
        return -ENOMEM;
    }
    f->fd = fd;
    *out = f;
    return 0;
}

static int brk_posix_close(brk_io *io, brk_file *f)
{
    int rc = 0;

    (void)io;
    if (f == NULL)
        return 0;
    /* No retry on EINTR: Linux releases the descriptor before reporting it,
     * and a retry could close a descriptor another thread just received.
     * The handle is freed whatever close(2) says, as io.h promises. */
    if (close(f->fd) != 0)
        rc = brk_posix_err();
    free(f);
    return rc;
}

static int brk_posix_pread(brk_io *io, brk_file *f, void *buf, size_t len,
                           uint64_t off, size_t *nread)
{
    unsigned char *p = buf;
    size_t done = 0;

    (void)io;
    if (nread != NULL)
        *nread = 0;
    if (f == NULL || (buf == NULL && len > 0))
        return -EINVAL;
    if (!brk_posix_range_ok(off, len))
        return -EINVAL;

    /* Loop because one pread may return less than asked well before EOF
     * (signals, large requests); only a 0 return means end of file. */
    while (done < len) {
        size_t want = len - done;
        ssize_t n;

        if (want > BRK_POSIX_CHUNK)
            want = BRK_POSIX_CHUNK;
        n = pread(f->fd, p + done, want, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return brk_posix_err();
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    if (nread != NULL)
        *nread = done;
    return 0;
}

static int brk_posix_pwrite(brk_io *io, brk_file *f, const void *buf,
                            size_t len, uint64_t off)
{
    const unsigned char *p = buf;
    size_t done = 0;

    (void)io;
    if (f == NULL || (buf == NULL && len > 0))
        return -EINVAL;
    if (!brk_posix_range_ok(off, len))
        return -EFBIG;

    while (done < len) {
        size_t want = len - done;
        ssize_t n;

        if (want > BRK_POSIX_CHUNK)
            want = BRK_POSIX_CHUNK;
        n = pwrite(f->fd, p + done, want, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return brk_posix_err();
        }
        /* A zero-byte write for a non-empty request makes no progress and
         * would spin forever; the kernel does not do this for regular
         * files, so treat it as a device error rather than retry. */
        if (n == 0)
            return -EIO;
        done += (size_t)n;
    }
    return 0;
}

static int brk_posix_sync(brk_io *io, brk_file *f)
{
    int rc;

    (void)io;
    if (f == NULL)
        return -EINVAL;
    /* fdatasync, not fsync: the size change of an append is included (it is
     * needed to read the data back), while pure timestamp updates, which the
     * store never relies on, are skipped. */
    do {
        rc = fdatasync(f->fd);
    } while (rc != 0 && errno == EINTR);
    return rc == 0 ? 0 : brk_posix_err();
}

static int brk_posix_truncate(brk_io *io, brk_file *f, uint64_t size)
{
    int rc;

    (void)io;
    if (f == NULL)
        return -EINVAL;
    if (size > (uint64_t)INT64_MAX)
        return -EFBIG;
    do {
        rc = ftruncate(f->fd, (off_t)size);
    } while (rc != 0 && errno == EINTR);
    return rc == 0 ? 0 : brk_posix_err();
}

static int brk_posix_size(brk_io *io, brk_file *f, uint64_t *size)
{
    struct stat st;

    (void)io;
    if (f == NULL || size == NULL)
        return -EINVAL;
    if (fstat(f->fd, &st) != 0)
        return brk_posix_err();
    *size = (uint64_t)st.st_size;
    return 0;
}

static int brk_posix_mkdir(brk_io *io, const char *path)
{
    struct stat st;

    (void)io;
    if (path == NULL)
        return -EINVAL;
    if (mkdir(path, 0755) == 0)
        return 0;
    if (errno != EEXIST)
        return brk_posix_err();
    /* "Already exists" is success only if it is a directory: a regular file
     * in the way must not be mistaken for the store directory. */
    if (stat(path, &st) != 0)
        return brk_posix_err();
    return S_ISDIR(st.st_mode) ? 0 : -EEXIST;
}

static int brk_posix_unlink(brk_io *io, const char *path)
{
    (void)io;
    if (path == NULL)
        return -EINVAL;
    return unlink(path) == 0 ? 0 : brk_posix_err();
}

static int brk_posix_rmdir(brk_io *io, const char *path)
{
    (void)io;
    if (path == NULL)
        return -EINVAL;
    return rmdir(path) == 0 ? 0 : brk_posix_err();
}

static int brk_posix_rename(brk_io *io, const char *from, const char *to)
{
    (void)io;
    if (from == NULL || to == NULL)
        return -EINVAL;
    return rename(from, to) == 0 ? 0 : brk_posix_err();
}

static int brk_posix_sync_dir(brk_io *io, const char *path)
{
    int fd, rc;

    (void)io;
    if (path == NULL)
        return -EINVAL;
    /* O_DIRECTORY makes a mistaken file path fail with ENOTDIR instead of
     * syncing the wrong thing and reporting success. */
    do {
        fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return brk_posix_err();
    do {
        rc = fsync(fd);
    } while (rc != 0 && errno == EINTR);
    rc = rc == 0 ? 0 : brk_posix_err();
    close(fd);
    return rc;
}

static int brk_posix_list(brk_io *io, const char *dir, brk_io_list_fn fn,
                          void *arg)
{
    DIR *d;
    int rc = 0;

    (void)io;
    if (dir == NULL || fn == NULL)
        return -EINVAL;
    d = opendir(dir);
    if (d == NULL)
        return brk_posix_err();
    /* readdir (not readdir_r) is thread-safe in glibc as long as each
     * stream is used by one thread, which holds for this local DIR. */
    for (;;) {
        struct dirent *de;

        errno = 0;
        de = readdir(d);
        if (de == NULL) {
            /* NULL means either end of directory or an error; only errno
             * tells them apart, hence the reset before the call. */
            if (errno != 0)
                rc = brk_posix_err();
            break;
        }
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        /* A non-zero return from the callback is a request to stop, not a
         * failure, so the listing still reports success. */
        if (fn(arg, de->d_name) != 0)
            break;
    }
    closedir(d);
    return rc;
}

static int brk_posix_exists(brk_io *io, const char *path)
{
    struct stat st;

    (void)io;
    if (path == NULL)
        return -EINVAL;
    if (stat(path, &st) == 0)
        return 1;
    /* ENOTDIR: a leading component is a file, so the path cannot exist;
     * that is an answer ("no"), not an error. */
    if (errno == ENOENT || errno == ENOTDIR)
        return 0;
    return brk_posix_err();
}

/* flock() rather than fcntl() locks: flock locks belong to the open file
 * description, so a second open in the same process conflicts too, and
 * closing an unrelated descriptor of the same file does not drop the lock. */
static int brk_posix_lock(brk_io *io, const char *path, brk_file **out)
{
    int rc = brk_posix_open(io, path, BRK_IO_CREATE | BRK_IO_RDWR, out);
    if (rc != 0)
        return rc;
    int r;
    do {
        r = flock((*out)->fd, LOCK_EX | LOCK_NB);
    } while (r != 0 && errno == EINTR);
    if (r != 0) {
        rc = errno == EWOULDBLOCK ? -EAGAIN : brk_posix_err();
        brk_posix_close(io, *out);
        *out = NULL;
    }
    return rc;
}

static brk_io brk_posix_vtable = {
    .open     = brk_posix_open,
    .close    = brk_posix_close,
    .pread    = brk_posix_pread,
    .pwrite   = brk_posix_pwrite,
    .sync     = brk_posix_sync,
    .truncate = brk_posix_truncate,
    .size     = brk_posix_size,
    .mkdir    = brk_posix_mkdir,
    .unlink   = brk_posix_unlink,
    .rmdir    = brk_posix_rmdir,
    .rename   = brk_posix_rename,
    .sync_dir = brk_posix_sync_dir,
    .list     = brk_posix_list,
    .exists   = brk_posix_exists,
    .lock     = brk_posix_lock,
};

brk_io *brk_io_posix(void)
{
    return &brk_posix_vtable;
}
