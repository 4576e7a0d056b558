/*
 * test_io_posix.c - the POSIX backend against a real temporary directory.
 *
 * Every method is called for its success path and for the errors the store
 * relies on telling apart (-ENOENT, -EEXIST, -ENOTDIR, ...).  Each test gets
 * a fresh mkdtemp directory under /tmp, removed again in teardown.
 */
/* The build passes -D_GNU_SOURCE; standalone builds still need POSIX.1-2008
 * with XSI (mkdtemp, readlink, realpath). */
#if !defined(_GNU_SOURCE) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700
#endif

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "broker/io.h"
#include "tmpdir.h"

struct fixture {
    char dir[256];
    brk_io *io;
};

static int setup_dir(void **state)
{
    struct fixture *fx = calloc(1, sizeof *fx);

    if (fx == NULL)
        return -1;
    if (brk_tmpdir_new("io", fx->dir, sizeof fx->dir) != 0) {
        free(fx);
        return -1;
    }
    fx->io = brk_io_posix();
    *state = fx;
    return 0;
}

static int teardown_dir(void **state)
{
    struct fixture *fx = *state;

    brk_tmpdir_remove(fx->dir);
    free(fx);
    return 0;
}

/* Path inside the fixture directory (static buffer per slot, so two can be
 * used in one call). */
static const char *p(struct fixture *fx, int slot, const char *name)
{
    static char buf[4][PATH_MAX];

    snprintf(buf[slot], sizeof buf[slot], "%s/%s", fx->dir, name);
    return buf[slot];
}

static void put(struct fixture *fx, const char *name, const char *text)
{
    brk_io *io = fx->io;
    brk_file *f = NULL;

    assert_int_equal(io->open(io, p(fx, 3, name), BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->pwrite(io, f, text, strlen(text), 0), 0);
    assert_int_equal(io->close(io, f), 0);
}

static void assert_content(struct fixture *fx, const char *name,
                           const char *want)
{
    brk_io *io = fx->io;
    brk_file *f = NULL;
    char buf[256];
    size_t n = 0;

    assert_int_equal(io->open(io, p(fx, 3, name), BRK_IO_RDONLY, &f), 0);
    assert_int_equal(io->pread(io, f, buf, sizeof buf - 1, 0, &n), 0);
    buf[n] = '\0';
    assert_string_equal(buf, want);
    assert_int_equal(io->close(io, f), 0);
}

/* ------------------------------------------------------------------ */

static void backend_is_one_shared_instance(void **state)
{
    (void)state;
    assert_ptr_equal(brk_io_posix(), brk_io_posix());
}

static void open_missing_file_returns_enoent(void **state)
{
    struct fixture *fx = *state;
    brk_file *f = NULL;

    assert_int_equal(fx->io->open(fx->io, p(fx, 0, "nope"), BRK_IO_RDONLY, &f),
                     -ENOENT);
    assert_null(f);
    assert_int_equal(fx->io->open(fx->io, p(fx, 0, "nope"), BRK_IO_RDWR, &f),
                     -ENOENT);
    assert_int_equal(fx->io->open(fx->io, p(fx, 0, "nodir/f"), BRK_IO_CREATE,
                                  &f), -ENOENT);
}

static void create_excl_on_existing_file_returns_eexist(void **state)
{
    struct fixture *fx = *state;
    brk_io *io = fx->io;
    brk_file *f = NULL;

    assert_int_equal(io->open(io, p(fx, 0, "f"), BRK_IO_CREATE | BRK_IO_EXCL,
                              &f), 0);
    assert_int_equal(io->close(io, f), 0);
    assert_int_equal(io->open(io, p(fx, 0, "f"), BRK_IO_CREATE | BRK_IO_EXCL,
                              &f), -EEXIST);
}

static void create_opens_existing_file_without_truncating(void **state)
{
    struct fixture *fx = *state;
    brk_file *f = NULL;

    put(fx, "f", "keep");
    assert_int_equal(fx->io->open(fx->io, p(fx, 0, "f"), BRK_IO_CREATE, &f), 0);
    assert_int_equal(fx->io->close(fx->io, f), 0);
    assert_content(fx, "f", "keep");
}

static void created_file_has_mode_0644_under_umask(void **state)
{
    struct fixture *fx = *state;
    struct stat st;
    mode_t mask = umask(022);

    umask(mask);
    put(fx, "f", "x");
    assert_int_equal(stat(p(fx, 0, "f"), &st), 0);
    assert_int_equal(st.st_mode & 0777, 0644 & ~mask);
}

static void open_rejects_directories_and_unknown_flags(void **state)
{
    struct fixture *fx = *state;
    brk_io *io = fx->io;
    brk_file *f = NULL;

    assert_int_equal(io->open(io, fx->dir, BRK_IO_RDONLY, &f), -EISDIR);
    assert_int_equal(io->open(io, fx->dir, BRK_IO_RDWR, &f), -EISDIR);
    assert_int_equal(io->open(io, p(fx, 0, "f"), 1 << 8, &f), -EINVAL);
    assert_int_equal(io->exists(io, p(fx, 0, "f")), 0);
}

/* The descriptor behind a brk_file must not leak into child processes. */
static void descriptor_is_close_on_exec(void **state)
{
    struct fixture *fx = *state;
    brk_io *io = fx->io;
    brk_file *f = NULL;
    char want[PATH_MAX], link[64], got[PATH_MAX];
    int found = 0;

    assert_int_equal(io->open(io, p(fx, 0, "f"), BRK_IO_CREATE, &f), 0);
    assert_non_null(realpath(p(fx, 0, "f"), want));
    for (int fd = 0; fd < 1024; fd++) {
        ssize_t n;
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        n = readlink(link, got, sizeof got - 1);
        if (n < 0)
            continue;
        got[n] = '\0';
        if (strcmp(got, want) == 0) {
            int fl = fcntl(fd, F_GETFD);
            assert_true(fl >= 0 && (fl & FD_CLOEXEC));
            found = 1;
        }
    }
    assert_true(found);
    assert_int_equal(io->close(io, f), 0);
}

static void pwrite_then_pread_round_trips(void **state)
{
    struct fixture *fx = *state;
    brk_io *io = fx->io;
    brk_file *f = NULL;
    char buf[16];
    size_t n = 0;
    uint64_t size = 0;

    assert_int_equal(io->open(io, p(fx, 0, "f"), BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->pwrite(io, f, "hello", 5, 0), 0);
    assert_int_equal(io->pwrite(io, f, "world", 5, 10), 0);   /* leaves a hole */
    assert_int_equal(io->pread(io, f, buf, 15, 0, &n), 0);
    assert_int_equal(n, 15);
    assert_memory_equal(buf, "hello\0\0\0\0\0world", 15);
    assert_int_equal(io->size(io, f, &size), 0);
    assert_int_equal(size, 15);
    assert_int_equal(io->pwrite(io, f, "", 0, 0), 0);          /* empty is fine */
    assert_int_equal(io->close(io, f), 0);
}

static void large_pwrite_is_complete(void **state)
{
    enum { LEN = 4 << 20 };
    struct fixture *fx = *state;
    brk_io *io = fx->io;
    brk_file *f = NULL;
    unsigned char *a = malloc(LEN), *b = malloc(LEN);
    size_t n = 0;

    assert_non_null(a);
    assert_non_null(b);
    for (size_t i = 0; i < LEN; i++)
        a[i] = (unsigned char)(i * 31u + 7u);
    assert_int_equal(io->open(io, p(fx, 0, "big"), BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->pwrite(io, f, a, LEN, 3), 0);
    assert_int_equal(io->sync(io, f), 0);
    assert_int_equal(io->pread(io, f, b, LEN, 3, &n), 0);
    assert_int_equal(n, LEN);
    assert_memory_equal(a, b, LEN);
    assert_int_equal(io->close(io, f), 0);
    free(a);
    free(b);
}

static void pread_short_at_eof(void **state)
{
    struct fixture *fx = *state;
    brk_io *io = fx->io;
    brk_file *f = NULL;
    char buf[16];
    size_t n = 99;

    put(fx, "f", "abcdef");
    assert_int_equal(io->open(io, p(fx, 0, "f"), BRK_IO_RDONLY, &f), 0);
    assert_int_equal(io->pread(io, f, buf, sizeof buf, 2, &n), 0);
    assert_int_equal(n, 4);
    assert_memory_equal(buf, "cdef", 4);
    assert_int_equal(io->pread(io, f, buf, sizeof buf, 6, &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(io->pread(io, f, buf, sizeof buf, 1 << 20, &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(io->close(io, f), 0);
}

static void readonly_handle_refuses_writes(void **state)
{
    struct fixture *fx = *state;
    brk_io *io = fx->io;
    brk_file *f = NULL;

    put(fx, "f", "abc");
    assert_int_equal(io->open(io, p(fx, 0, "f"), BRK_IO_RDONLY, &f), 0);
    assert_int_equal(io->pwrite(io, f, "z", 1, 0), -EBADF);
    assert_int_equal(io->truncate(io, f, 0), -EINVAL);
    assert_int_equal(io->close(io, f), 0);
    assert_content(fx, "f", "abc");
}

static void offsets_beyond_off_t_are_refused(void **state)
{
    struct fixture *fx = *state;
    brk_io *io = fx->io;
    brk_file *f = NULL;
    char c;
    size_t n = 0;

    assert_int_equal(io->open(io, p(fx, 0, "f"), BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->pwrite(io, f, "x", 1, UINT64_MAX), -EFBIG);
    assert_int_equal(io->pread(io, f, &c, 1, UINT64_MAX, &n), -EINVAL);
    assert_int_equal(io->truncate(io, f, UINT64_MAX), -EFBIG);
    assert_int_equal(io->close(io, f), 0);
}

static void sync_and_truncate_change_size(void **state)
{
    struct fixture *fx = *state;
    brk_io *io = fx->io;
    brk_file *f = NULL;
    uint64_t size = 0;
    char buf[8];
    size_t n = 0;

    assert_int_equal(io->open(io, p(fx, 0, "f"), BRK_IO_CREATE, &f), 0);
    assert_int_equal(io->pwrite(io, f, "abcdef", 6, 0), 0);
    assert_int_equal(io->sync(io, f), 0);
    assert_int_equal(io->truncate(io, f, 2), 0);
    assert_int_equal(io->size(io, f, &size), 0);
    assert_int_equal(size, 2);
    assert_int_equal(io->truncate(io, f, 4), 0);
    assert_int_equal(io->pread(io, f, buf, sizeof buf, 0, &n), 0);
    assert_int_equal(n, 4);
    assert_memory_equal(buf, "ab\0\0", 4);
    assert_int_equal(io->sync(io, f), 0);
    assert_int_equal(io->close(io, f), 0);
}

static void mkdir_is_idempotent_but_refuses_a_file(void **state)
{
    struct fixture *fx = *state;
    brk_io *io = fx->io;

    assert_int_equal(io->mkdir(io, p(fx, 0, "d")), 0);
    assert_int_equal(io->mkdir(io, p(fx, 0, "d")), 0);
    assert_int_equal(io->exists(io, p(fx, 0, "d")), 1);
    put(fx, "f", "x");
    assert_int_equal(io->mkdir(io, p(fx, 0, "f")), -EEXIST);
    assert_int_equal(io->mkdir(io, p(fx, 0, "a/b")), -ENOENT);
}

static void unlink_and_rmdir_report_errors(void **state)
{
    struct fixture *fx = *state;
    brk_io *io = fx->io;

    assert_int_equal(io->mkdir(io, p(fx, 0, "d")), 0);
    put(fx, "d/f", "x");
    assert_int_equal(io->unlink(io, p(fx, 0, "missing")), -ENOENT);
    assert_int_equal(io->rmdir(io, p(fx, 0, "missing")), -ENOENT);
    assert_int_equal(io->rmdir(io, p(fx, 0, "d")), -ENOTEMPTY);
    assert_int_equal(io->rmdir(io, p(fx, 0, "d/f")), -ENOTDIR);
    assert_int_equal(io->unlink(io, p(fx, 0, "d/f")), 0);
    assert_int_equal(io->exists(io, p(fx, 0, "d/f")), 0);
    assert_int_equal(io->rmdir(io, p(fx, 0, "d")), 0);
    assert_int_equal(io->exists(io, p(fx, 0, "d")), 0);
}

static void rename_replaces_target(void **state)
{
    struct fixture *fx = *state;
    brk_io *io = fx->io;

    put(fx, "tmp", "new");
    put(fx, "final", "old");
    assert_int_equal(io->rename(io, p(fx, 0, "tmp"), p(fx, 1, "final")), 0);
    assert_int_equal(io->exists(io, p(fx, 0, "tmp")), 0);
    assert_content(fx, "final", "new");
    assert_int_equal(io->rename(io, p(fx, 0, "missing"), p(fx, 1, "x")),
                     -ENOENT);
    assert_int_equal(io->rename(io, p(fx, 0, "final"), p(fx, 1, "no/x")),
                     -ENOENT);
}

static void sync_dir_syncs_dirs_and_refuses_files(void **state)
{
    struct fixture *fx = *state;
    brk_io *io = fx->io;

    put(fx, "f", "x");
    assert_int_equal(io->sync_dir(io, fx->dir), 0);
    assert_int_equal(io->sync_dir(io, p(fx, 0, "f")), -ENOTDIR);
    assert_int_equal(io->sync_dir(io, p(fx, 0, "missing")), -ENOENT);
}

struct names {
    char v[8][64];
    int n;
    int stop_after;
};

static int collect(void *arg, const char *name)
{
    struct names *ns = arg;

    if (ns->n < 8)
        snprintf(ns->v[ns->n++], sizeof ns->v[0], "%s", name);
    return ns->stop_after != 0 && ns->n >= ns->stop_after;
}

static int has(const struct names *ns, const char *name)
{
    for (int i = 0; i < ns->n; i++)
        if (strcmp(ns->v[i], name) == 0)
            return 1;
    return 0;
}

static void list_reports_created_files(void **state)
{
    struct fixture *fx = *state;
    brk_io *io = fx->io;
    struct names ns = { .n = 0 };

    put(fx, "a", "x");
    put(fx, "b", "x");
    assert_int_equal(io->mkdir(io, p(fx, 0, "c")), 0);
    assert_int_equal(io->list(io, fx->dir, collect, &ns), 0);
    assert_int_equal(ns.n, 3);              /* no "." or ".." */
    assert_true(has(&ns, "a") && has(&ns, "b") && has(&ns, "c"));

    ns = (struct names){ .stop_after = 2 };
    assert_int_equal(io->list(io, fx->dir, collect, &ns), 0);
    assert_int_equal(ns.n, 2);

    assert_int_equal(io->list(io, p(fx, 0, "missing"), collect, &ns), -ENOENT);
    assert_int_equal(io->list(io, p(fx, 0, "a"), collect, &ns), -ENOTDIR);
}

static void exists_answers_yes_no_or_error(void **state)
{
    struct fixture *fx = *state;
    brk_io *io = fx->io;

    put(fx, "f", "x");
    assert_int_equal(io->exists(io, p(fx, 0, "f")), 1);
    assert_int_equal(io->exists(io, fx->dir), 1);
    assert_int_equal(io->exists(io, p(fx, 0, "missing")), 0);
    assert_int_equal(io->exists(io, p(fx, 0, "f/under-a-file")), 0);
}

static void null_arguments_return_einval(void **state)
{
    struct fixture *fx = *state;
    brk_io *io = fx->io;
    brk_file *f = NULL;

    assert_int_equal(io->open(io, NULL, BRK_IO_RDONLY, &f), -EINVAL);
    assert_int_equal(io->mkdir(io, NULL), -EINVAL);
    assert_int_equal(io->exists(io, NULL), -EINVAL);
    assert_int_equal(io->list(io, fx->dir, NULL, NULL), -EINVAL);
    assert_int_equal(io->close(io, NULL), 0);
}

enum { THREADS = 4, PER_THREAD = 64, CHUNK = 512 };

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
        if (w->io->pwrite(w->io, w->f, chunk, CHUNK, off) != 0)
            w->failures++;
    }
    if (w->io->sync(w->io, w->f) != 0)
        w->failures++;
    return NULL;
}

static void concurrent_pwrites_on_one_handle_all_land(void **state)
{
    static char got[THREADS * PER_THREAD * CHUNK];
    struct fixture *fx = *state;
    brk_io *io = fx->io;
    brk_file *f = NULL;
    pthread_t tid[THREADS];
    struct writer w[THREADS];
    size_t n = 0;

    assert_int_equal(io->open(io, p(fx, 0, "f"), BRK_IO_CREATE, &f), 0);
    for (int i = 0; i < THREADS; i++) {
        w[i] = (struct writer){ .io = io, .f = f, .id = i };
        assert_int_equal(pthread_create(&tid[i], NULL, writer_main, &w[i]), 0);
    }
    for (int i = 0; i < THREADS; i++) {
        assert_int_equal(pthread_join(tid[i], NULL), 0);
        assert_int_equal(w[i].failures, 0);
    }
    assert_int_equal(io->pread(io, f, got, sizeof got, 0, &n), 0);
    assert_int_equal(n, sizeof got);
    for (size_t c = 0; c < sizeof got / CHUNK; c++)
        assert_int_equal(got[c * CHUNK + CHUNK - 1], 'A' + (int)(c % THREADS));
    assert_int_equal(io->close(io, f), 0);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup_dir, teardown_dir)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(backend_is_one_shared_instance),
        T(open_missing_file_returns_enoent),
        T(create_excl_on_existing_file_returns_eexist),
        T(create_opens_existing_file_without_truncating),
        T(created_file_has_mode_0644_under_umask),
        T(open_rejects_directories_and_unknown_flags),
        T(descriptor_is_close_on_exec),
        T(pwrite_then_pread_round_trips),
        T(large_pwrite_is_complete),
        T(pread_short_at_eof),
        T(readonly_handle_refuses_writes),
        T(offsets_beyond_off_t_are_refused),
        T(sync_and_truncate_change_size),
        T(mkdir_is_idempotent_but_refuses_a_file),
        T(unlink_and_rmdir_report_errors),
        T(rename_replaces_target),
        T(sync_dir_syncs_dirs_and_refuses_files),
        T(list_reports_created_files),
        T(exists_answers_yes_no_or_error),
        T(null_arguments_return_einval),
        T(concurrent_pwrites_on_one_handle_all_land),
    };

    return cmocka_run_group_tests_name("io_posix", tests, NULL, NULL);
}
