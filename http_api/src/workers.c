/*
 * workers.c - the request thread pool of workers.h.
 *
 * One mutex guards a FIFO of intrusive jobs (head/tail), a LIFO stack of
 * idle threads and the closing flag.  A submit hands the job straight to
 * the most recently idled thread (its `job` slot, then a post of its own
 * semaphore, outside the mutex) or, when every thread is busy, appends it
 * to the FIFO, which a thread empties before it goes idle again.  A woken
 * thread never touches the shared mutex to pick its job up: with a shared
 * condition variable, every woken thread had to retake the mutex that
 * submitters and finishing threads contend for (perf showed 9 % of the
 * request threads' samples waiting there, 64 threads, 64 connections).
 * LIFO also keeps the hottest threads busy and lets the rest sleep.
 *
 * close sets `closing` and wakes every idle thread with no job; a thread
 * leaves when it finds the FIFO empty and `closing` set, so every job
 * queued before close runs.
 */
#include "workers.h"

#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct worker {
    struct api_workers *pool;
    pthread_t th;
    sem_t wake;                      /* posted once per hand-off */
    api_job *job;                    /* handed over; NULL: leave */
    struct worker *next_idle;        /* pool->mu */
} worker;

struct api_workers {
    pthread_mutex_t mu;              /* everything below */
    api_job *head, *tail;            /* jobs no thread was idle for */
    worker *idle;                    /* LIFO */
    bool closing;
    bool joined;                     /* a close took the join */
    unsigned nthreads;               /* started */
    worker w[];
};

/* The next job: from the FIFO, else wait idle for one; NULL: leave. */
static api_job *take(worker *me)
{
    api_workers *p = me->pool;
    pthread_mutex_lock(&p->mu);
    api_job *j = p->head;
    if (j) {
        p->head = j->next_;
        if (!p->head)
            p->tail = NULL;
        j->next_ = NULL;
    } else if (!p->closing) {
        me->next_idle = p->idle;
        p->idle = me;
    }
    bool go_idle = !j && !p->closing;
    pthread_mutex_unlock(&p->mu);
    if (!go_idle)
        return j;
    while (sem_wait(&me->wake) != 0)
        ;                            /* EINTR */
    j = me->job;                     /* the post ordered it after the store */
    me->job = NULL;
    return j;
}

static void *worker_main(void *arg)
{
    worker *me = arg;
    /* Told apart from MHD's "MHD-worker" threads in top, perf and gdb. */
    (void)pthread_setname_np(pthread_self(), "api-request");
    for (api_job *j; (j = take(me));)
        j->run(j);
    return NULL;
}

bool api_workers_submit(api_workers *p, api_job *job)
{
    job->next_ = NULL;
    worker *w = NULL;
    pthread_mutex_lock(&p->mu);
    bool ok = !p->closing;
    if (ok && p->idle) {
        w = p->idle;
        p->idle = w->next_idle;
        w->job = job;
    } else if (ok) {
        if (p->tail)
            p->tail->next_ = job;
        else
            p->head = job;
        p->tail = job;
    }
    pthread_mutex_unlock(&p->mu);
    if (w)
        sem_post(&w->wake);
    return ok;
}

/* Refuse jobs, wake the idle threads to leave, join the first n. */
static void stop(api_workers *p, unsigned n)
{
    pthread_mutex_lock(&p->mu);
    p->closing = true;
    worker *idle = p->idle;
    p->idle = NULL;
    pthread_mutex_unlock(&p->mu);
    for (worker *w = idle, *next; w; w = next) {
        next = w->next_idle;         /* read before the post lets it go */
        sem_post(&w->wake);
    }
    for (unsigned i = 0; i < n; i++)
        pthread_join(p->w[i].th, NULL);
}

static void destroy(api_workers *p, unsigned nsem)
{
    for (unsigned i = 0; i < nsem; i++)
        sem_destroy(&p->w[i].wake);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

static void set_err(char *buf, size_t len, unsigned i, unsigned n, int rc)
{
    if (buf && len)
        snprintf(buf, len, "cannot start request worker %u of %u: %s", i, n,
                 strerror(rc));
}

brk_status api_workers_open(api_workers **out, unsigned threads,
                            size_t stack_bytes, char *errbuf, size_t errlen)
{
    *out = NULL;
    if (threads == 0)
        threads = 1;
    api_workers *p = calloc(1, sizeof *p + threads * sizeof(worker));
    if (!p) {
        set_err(errbuf, errlen, 1, threads, ENOMEM);
        return BRK_NOMEM;
    }
    pthread_mutex_init(&p->mu, NULL);
    for (unsigned i = 0; i < threads; i++) {
        p->w[i].pool = p;
        sem_init(&p->w[i].wake, 0, 0);
    }
    pthread_attr_t at;
    pthread_attr_init(&at);
    if (stack_bytes)
        pthread_attr_setstacksize(&at, stack_bytes);
    int rc = 0;
    for (; p->nthreads < threads; p->nthreads++) {
        worker *w = &p->w[p->nthreads];
        if ((rc = pthread_create(&w->th, &at, worker_main, w)) != 0)
            break;
    }
    pthread_attr_destroy(&at);
    if (rc != 0) {
        set_err(errbuf, errlen, p->nthreads + 1, threads, rc);
        stop(p, p->nthreads);
        destroy(p, threads);
        return rc == ENOMEM || rc == EAGAIN ? BRK_NOMEM : BRK_IO;
    }
    *out = p;
    return BRK_OK;
}

void api_workers_close(api_workers *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    unsigned n = p->joined ? 0 : p->nthreads;
    p->joined = true;
    pthread_mutex_unlock(&p->mu);
    stop(p, n);
}

void api_workers_free(api_workers *p)
{
    if (!p)
        return;
    api_workers_close(p);
    destroy(p, p->nthreads);
}
