/*
 * io_gate.c - brk_io_posix() with a gate in front of sync (see io_gate.h).
 */
#include "io_gate.h"

#include <errno.h>
#include <stddef.h>
#include <time.h>

static brk_gate_io *gate_of(brk_io *io)
{
    return (brk_gate_io *)(void *)((char *)io - offsetof(brk_gate_io, io));
}

static int gated_sync(brk_io *io, brk_file *f)
{
    brk_gate_io *g = gate_of(io);
    pthread_mutex_lock(&g->mu);
    g->waiting++;
    pthread_cond_broadcast(&g->cv);
    while (g->closed)
        pthread_cond_wait(&g->cv, &g->mu);
    g->waiting--;
    pthread_mutex_unlock(&g->mu);
    brk_io *p = brk_io_posix();
    return p->sync(p, f);
}

/* Every other method: the POSIX backend's, called with its own brk_io (it
 * is stateless and ignores the pointer, but pass the right one anyway). */
#define FWD(name, proto, args)                                               \
    static int fwd_##name proto                                              \
    {                                                                        \
        (void)io;                                                            \
        brk_io *p = brk_io_posix();                                          \
        return p->name args;                                                 \
    }

FWD(open, (brk_io *io, const char *path, int flags, brk_file **out),
    (p, path, flags, out))
FWD(close, (brk_io *io, brk_file *f), (p, f))
FWD(pread, (brk_io *io, brk_file *f, void *buf, size_t len, uint64_t off,
            size_t *nread), (p, f, buf, len, off, nread))
FWD(pwrite, (brk_io *io, brk_file *f, const void *buf, size_t len,
             uint64_t off), (p, f, buf, len, off))
FWD(truncate, (brk_io *io, brk_file *f, uint64_t size), (p, f, size))
FWD(size, (brk_io *io, brk_file *f, uint64_t *size), (p, f, size))
FWD(mkdir, (brk_io *io, const char *path), (p, path))
FWD(unlink, (brk_io *io, const char *path), (p, path))
FWD(rmdir, (brk_io *io, const char *path), (p, path))
FWD(rename, (brk_io *io, const char *from, const char *to), (p, from, to))
FWD(sync_dir, (brk_io *io, const char *path), (p, path))
FWD(list, (brk_io *io, const char *dir, brk_io_list_fn fn, void *arg),
    (p, dir, fn, arg))
FWD(exists, (brk_io *io, const char *path), (p, path))
FWD(lock, (brk_io *io, const char *path, brk_file **out), (p, path, out))

void brk_gate_io_init(brk_gate_io *g)
{
    g->io = (brk_io){
        .open = fwd_open, .close = fwd_close, .pread = fwd_pread,
        .pwrite = fwd_pwrite, .sync = gated_sync, .truncate = fwd_truncate,
        .size = fwd_size, .mkdir = fwd_mkdir, .unlink = fwd_unlink,
        .rmdir = fwd_rmdir, .rename = fwd_rename, .sync_dir = fwd_sync_dir,
        .list = fwd_list, .exists = fwd_exists, .lock = fwd_lock,
    };
    pthread_mutex_init(&g->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g->cv, &ca);
    pthread_condattr_destroy(&ca);
    g->closed = false;
    g->waiting = 0;
}

void brk_gate_io_destroy(brk_gate_io *g)
{
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
}

void brk_gate_io_close(brk_gate_io *g)
{
    pthread_mutex_lock(&g->mu);
    g->closed = true;
    pthread_mutex_unlock(&g->mu);
}

void brk_gate_io_open(brk_gate_io *g)
{
    pthread_mutex_lock(&g->mu);
    g->closed = false;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

bool brk_gate_io_wait_held(brk_gate_io *g, unsigned n, int timeout_ms)
{
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    dl.tv_sec += timeout_ms / 1000;
    dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&g->mu);
    while (g->waiting < n)
        if (pthread_cond_timedwait(&g->cv, &g->mu, &dl) == ETIMEDOUT)
            break;
    bool ok = g->waiting >= n;
    pthread_mutex_unlock(&g->mu);
    return ok;
}
