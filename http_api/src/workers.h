/*
 * workers.h - a fixed pool of threads that run the server's requests
 * (server.c), so that a broker call blocking in fdatasync holds a pool
 * thread, not one of libmicrohttpd's I/O threads.
 *
 * Jobs are intrusive: the caller embeds an api_job in its own object and
 * submits it; the pool never allocates per job.  A job is on the queue at
 * most once at a time (the caller's state machine guarantees it), so the
 * queue is bounded by the number of objects that embed one (server.c: one
 * per connection).
 *
 * Threads: every function is thread-safe.  run() is called on a pool thread
 * with no pool lock held; it may submit jobs (its own included).
 */
#ifndef HTTP_API_WORKERS_H
#define HTTP_API_WORKERS_H

#include <stdbool.h>
#include <stddef.h>

#include "broker/status.h"

typedef struct api_job api_job;
struct api_job {
    void (*run)(api_job *job);       /* set by the owner */
    api_job *next_;                  /* pool private */
};

typedef struct api_workers api_workers;

/* Start `threads` threads (at least 1) with stacks of stack_bytes (0: the
 * system default).  BRK_NOMEM / BRK_IO (pthread_create failed, errbuf says
 * why); nothing to close then. */
brk_status api_workers_open(api_workers **out, unsigned threads,
                            size_t stack_bytes, char *errbuf, size_t errlen);

/* Hand `job` to an idle thread, or queue it (FIFO) when all are busy.
 * false once api_workers_close has begun: the job was not taken and the
 * caller runs it itself. */
bool api_workers_submit(api_workers *p, api_job *job);

/* Refuse new jobs (submit returns false from now on), run every job
 * already queued, wait for the threads to finish their current one and join
 * them.  Idempotent; NULL is a no-op.  Not from a pool thread. */
void api_workers_close(api_workers *p);

/* Close, then free.  Nobody may submit any more (server.c: after MHD has
 * stopped). */
void api_workers_free(api_workers *p);

#endif /* HTTP_API_WORKERS_H */
