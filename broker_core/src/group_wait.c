/*
 * group_wait.c - long polling: dirty tracking and group timers, waiters,
 * the store listener, brk_group_wait / wait_cancel / receive_wait, the
 * tick and the background thread (see LONG POLLING at the top of group.c).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "group_priv.h"

/* ---- dirty tracking and timers ---------------------------------------------------- */

/* Progress changed: the next persist is due.  Wakes the background thread
 * if it sleeps past the persist time (only on the first change after a
 * save, so an ack costs an atomic increment). */
void grp_mark_dirty(brk_groups *G)
{
    uint64_t prev = atomic_fetch_add(&G->dirty_seq, 1);
    if (prev != atomic_load(&G->saved_seq))
        return;
    pthread_mutex_lock(&G->wmu);
    if (G->wake_at > atomic_load(&G->next_persist))
        pthread_cond_signal(&G->cond);
    pthread_mutex_unlock(&G->wmu);
}

static bool gheap_keep(const brk_timer *t, void *ctx)
{
    brk_groups *G = ctx;
    return t->ref < G->narmed && t->due_ms <= G->armed[t->ref];
}

/* Make sure the group's timer fires at `due` or earlier.  Only the entry
 * at armed[idx] matters: processing a group re-arms its next due time, so
 * later entries of the same group are redundant and dropped when they pile
 * up. */
void grp_arm(brk_groups *G, const group *g, int64_t due)
{
    if (due == INT64_MAX)
        return;
    pthread_mutex_lock(&G->wmu);
    if (g->idx < G->narmed && due < G->armed[g->idx]) {
        if (G->gheap.n > 2 * (size_t)G->narmed + 1024)
            brk_timerheap_filter(&G->gheap, gheap_keep, G);
        if (brk_timerheap_push(&G->gheap, due, g->idx) == BRK_OK) {
            G->armed[g->idx] = due;
            if (due < G->wake_at)
                pthread_cond_signal(&G->cond);
        }
    }
    pthread_mutex_unlock(&G->wmu);
}

/* ---- waiters ---------------------------------------------------------------------- */

static waiter **id_slot(brk_groups *G, uint64_t id)
{
    waiter **pp = &G->ib[id % WBUCKETS];
    while (*pp && (*pp)->id != id)
        pp = &(*pp)->inext;
    return pp;
}

static void topic_unlink(brk_groups *G, waiter *w)
{
    uint32_t b = grp_str_hash(w->topic) % WBUCKETS;
    if (w->tprev)
        w->tprev->tnext = w->tnext;
    else
        G->tb[b] = w->tnext;
    if (w->tnext)
        w->tnext->tprev = w->tprev;
    w->tprev = w->tnext = NULL;
}

/* WAITING -> RUNNING, onto *list.  wmu held. */
void grp_w_take(brk_groups *G, waiter *w, waiter **list)
{
    topic_unlink(G, w);
    w->state = W_RUNNING;
    w->fnext = *list;
    *list = w;
}

/* A thread that holds a group lock across store appends or flushes (retry
 * copies, dead letters) may run the store listener itself; the waiters that
 * listener takes are parked here and fired once the lock is dropped
 * (defer_end), so no callback ever runs under a group lock. */
static _Thread_local int tl_defer_depth;
static _Thread_local waiter *tl_deferred;

void grp_defer_begin(void)
{
    tl_defer_depth++;
}

void grp_defer_end(brk_groups *G)
{
    if (--tl_defer_depth > 0)
        return;
    waiter *list = tl_deferred;
    tl_deferred = NULL;
    grp_w_fire(G, list);
}

/* Run the callbacks of a firing list with no lock held, then free them. */
void grp_w_fire(brk_groups *G, waiter *list)
{
    if (!list)
        return;
    if (tl_defer_depth > 0) {
        waiter *last = list;
        while (last->fnext)
            last = last->fnext;
        last->fnext = tl_deferred;
        tl_deferred = list;
        return;
    }
    for (waiter *w = list; w; w = w->fnext)
        w->fn(w->ctx);
    pthread_mutex_lock(&G->wmu);
    while (list) {
        waiter *w = list;
        list = w->fnext;
        waiter **pp = id_slot(G, w->id);
        if (*pp)
            *pp = w->inext;
        G->nwaiters--;
        free(w);
    }
    pthread_cond_broadcast(&G->wdone);
    pthread_mutex_unlock(&G->wmu);
}

/* Take the waiters of `topic` (and of group/member when not NULL).  wmu
 * held. */
static void take_topic(brk_groups *G, const char *topic, const char *grp,
                       const char *mem, waiter **list)
{
    waiter *w = G->tb[grp_str_hash(topic) % WBUCKETS];
    while (w) {
        waiter *nx = w->tnext;
        if (strcmp(w->topic, topic) == 0
            && (!grp || strcmp(w->group, grp) == 0)
            && (!mem || strcmp(w->member, mem) == 0))
            grp_w_take(G, w, list);
        w = nx;
    }
}

/* An append makes messages visible to every group of the topic, but one
 * receive takes a batch: so wake one waiter per (group, member), not all of
 * them (the thundering herd: 1 000 parked polls would all wake, receive and
 * park again for every message).  If the woken one takes a full batch,
 * receive wakes the next (grp_wake_one), so a burst still reaches every
 * waiter it needs.  Past SEEN_MAX distinct groups the rest are all taken:
 * early wakes are harmless, missed ones are not.  wmu held. */
#define SEEN_MAX 32
static void take_topic_one_each(brk_groups *G, const char *topic,
                                waiter **list)
{
    const waiter *seen[SEEN_MAX];
    size_t nseen = 0;
    waiter *w = G->tb[grp_str_hash(topic) % WBUCKETS];
    while (w) {
        waiter *nx = w->tnext;
        if (strcmp(w->topic, topic) == 0) {
            bool dup = false;
            for (size_t i = 0; i < nseen && !dup; i++)
                dup = strcmp(seen[i]->group, w->group) == 0
                      && strcmp(seen[i]->member, w->member) == 0;
            if (!dup) {
                if (nseen < SEEN_MAX)
                    seen[nseen++] = w;
                grp_w_take(G, w, list);
            }
        }
        w = nx;
    }
}

void grp_wake_one(brk_groups *G, const char *topic, const char *grp,
                  const char *mem)
{
    waiter *list = NULL;
    pthread_mutex_lock(&G->wmu);
    for (waiter *w = G->tb[grp_str_hash(topic) % WBUCKETS]; w; w = w->tnext) {
        if (strcmp(w->topic, topic) == 0 && strcmp(w->group, grp) == 0
            && (w->member[0] == '\0' || strcmp(w->member, mem ? mem : "") == 0)) {
            grp_w_take(G, w, &list);
            break;
        }
    }
    pthread_mutex_unlock(&G->wmu);
    grp_w_fire(G, list);
}

void grp_wake_topic(brk_groups *G, const char *topic, const char *grp,
                    const char *mem)
{
    waiter *list = NULL;
    pthread_mutex_lock(&G->wmu);
    take_topic(G, topic, grp, mem, &list);
    pthread_mutex_unlock(&G->wmu);
    grp_w_fire(G, list);
}

/* The store listener.  Runs on the appending/flushing thread, no store
 * lock held. */
void grp_on_appended(void *ctx, const char *topic, uint16_t queue,
                     uint64_t log_offset)
{
    (void)queue;
    brk_groups *G = ctx;
    if (topic[0] == '_' && topic[1] == '_')
        return;        /* retry/DLQ/internal: group timers cover retries */
    atomic_fetch_add(&G->listener_active, 1);
    waiter *list = NULL;
    pthread_mutex_lock(&G->wmu);
    if (!G->sync_mode || log_offset < G->durable_seen) {
        take_topic_one_each(G, topic, &list);
    } else {
        size_t i = 0;
        while (i < G->npend && strcmp(G->pend[i].topic, topic) != 0)
            i++;
        if (i < G->npend) {
            if (log_offset > G->pend[i].max_off)
                G->pend[i].max_off = log_offset;
        } else {
            if (G->npend == G->cpend) {
                size_t nc = G->cpend ? G->cpend * 2 : 8;
                pend *np = realloc(G->pend, nc * sizeof *np);
                if (np) {
                    G->pend = np;
                    G->cpend = nc;
                }
            }
            if (G->npend < G->cpend) {
                snprintf(G->pend[G->npend].topic, sizeof G->pend[0].topic,
                         "%s", topic);
                G->pend[G->npend].max_off = log_offset;
                G->npend++;
            } else {
                take_topic_one_each(G, topic, &list);  /* no memory: early */
            }
        }
    }
    pthread_mutex_unlock(&G->wmu);
    grp_w_fire(G, list);
    atomic_fetch_sub(&G->listener_active, 1);
}

void grp_on_durable(void *ctx, uint64_t end)
{
    brk_groups *G = ctx;
    atomic_fetch_add(&G->listener_active, 1);
    waiter *list = NULL;
    pthread_mutex_lock(&G->wmu);
    if (end > G->durable_seen)
        G->durable_seen = end;
    for (size_t i = 0; i < G->npend;) {
        if (G->pend[i].max_off < end) {
            take_topic_one_each(G, G->pend[i].topic, &list);
            G->pend[i] = G->pend[--G->npend];
        } else {
            i++;
        }
    }
    pthread_mutex_unlock(&G->wmu);
    grp_w_fire(G, list);
    atomic_fetch_sub(&G->listener_active, 1);
}

static brk_status wait_impl(brk_groups *G, const brk_receive_req *req,
                            int64_t deadline_ms, brk_group_wake_fn fn,
                            void *ctx, uint64_t *id)
{
    if (id)
        *id = 0;
    if (!G || !fn || grp_req_check(req) != BRK_OK)
        return BRK_INVAL;
    group *g;
    uint32_t k;
    member *m;
    brk_status st = grp_req_resolve(G, req, &g, &k, &m);
    if (st != BRK_OK)
        return st;
    bool bc = g->cfg.broadcast;
    pthread_mutex_unlock(&g->mu);
    waiter *w = calloc(1, sizeof *w);
    if (!w)
        return BRK_NOMEM;
    snprintf(w->topic, sizeof w->topic, "%s", req->topic);
    snprintf(w->group, sizeof w->group, "%s", req->group);
    if (bc && req->member)
        snprintf(w->member, sizeof w->member, "%s", req->member);
    w->fn = fn;
    w->ctx = ctx;
    w->state = W_WAITING;
    int64_t now = grp_now_ms(G);
    if (deadline_ms > now + BRK_WAIT_MAX_MS)
        deadline_ms = now + BRK_WAIT_MAX_MS;
    w->deadline = deadline_ms;

    /* Register first, then look: an append after the look finds us.  Not
     * once close began: it has swept (or is about to sweep) the waiters
     * and would never fire this one. */
    pthread_mutex_lock(&G->wmu);
    if (G->closing) {
        pthread_mutex_unlock(&G->wmu);
        free(w);
        return BRK_CLOSED;
    }
    if (brk_timerheap_push(&G->wheap, deadline_ms, G->next_wid + 1) != BRK_OK) {
        pthread_mutex_unlock(&G->wmu);
        free(w);
        return BRK_NOMEM;
    }
    w->id = ++G->next_wid;
    uint64_t wid = w->id;
    waiter **ip = &G->ib[wid % WBUCKETS];
    w->inext = *ip;
    *ip = w;
    uint32_t b = grp_str_hash(w->topic) % WBUCKETS;
    w->tnext = G->tb[b];
    if (w->tnext)
        w->tnext->tprev = w;
    G->tb[b] = w;
    G->nwaiters++;
    if (deadline_ms < G->wake_at)
        pthread_cond_signal(&G->cond);
    pthread_mutex_unlock(&G->wmu);
    if (id)
        *id = wid;

    bool ready = deadline_ms <= now;
    if (!ready) {
        pthread_mutex_lock(&g->mu);
        int64_t ki = grp_sub_find(g, req->topic);
        member *mm = NULL;
        if (ki >= 0 && grp_member_get(G, g, req->member, &mm, false) == BRK_OK)
            ready = grp_has_work(G, g, mm, (uint32_t)ki, now);
        pthread_mutex_unlock(&g->mu);
    }
    if (ready) {
        waiter *list = NULL;
        pthread_mutex_lock(&G->wmu);
        waiter *x = *id_slot(G, wid);
        if (x && x->state == W_WAITING)
            grp_w_take(G, x, &list);
        pthread_mutex_unlock(&G->wmu);
        grp_w_fire(G, list);
    }
    return BRK_OK;
}

brk_status brk_group_wait(brk_groups *G, const brk_receive_req *req,
                          int64_t deadline_ms, brk_group_wake_fn fn,
                          void *ctx, uint64_t *id)
{
    if (!G)
        return wait_impl(G, req, deadline_ms, fn, ctx, id);
    if (!grp_call_enter(G, false)) {
        if (id)
            *id = 0;
        return BRK_CLOSED;
    }
    brk_status st = wait_impl(G, req, deadline_ms, fn, ctx, id);
    grp_call_leave(G);
    return st;
}

static bool wait_cancel_impl(brk_groups *G, uint64_t id)
{
    if (!G || id == 0)
        return false;
    pthread_mutex_lock(&G->wmu);
    for (;;) {
        waiter **pp = id_slot(G, id);
        waiter *w = *pp;
        if (!w) {
            pthread_mutex_unlock(&G->wmu);
            return false;
        }
        if (w->state == W_WAITING) {
            topic_unlink(G, w);
            *pp = w->inext;
            G->nwaiters--;
            pthread_mutex_unlock(&G->wmu);
            free(w);
            return true;
        }
        pthread_cond_wait(&G->wdone, &G->wmu);   /* its callback runs */
    }
}

bool brk_group_wait_cancel(brk_groups *G, uint64_t id)
{
    if (!G || id == 0)
        return false;
    (void)grp_call_enter(G, true);
    bool done = wait_cancel_impl(G, id);
    grp_call_leave(G);
    return done;
}

typedef struct rw_sync {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool fired;
} rw_sync;

static void rw_wake(void *ctx)
{
    rw_sync *s = ctx;
    pthread_mutex_lock(&s->mu);
    s->fired = true;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

static int64_t mono_ms_real(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static struct timespec mono_ts(int64_t ms)
{
    struct timespec ts = { (time_t)(ms / 1000), (long)(ms % 1000) * 1000000L };
    return ts;
}

static brk_status receive_wait_impl(brk_groups *G, const brk_receive_req *req,
                                    uint32_t wait_ms, brk_receive_batch **out)
{
    if (!out)
        return BRK_INVAL;
    *out = NULL;
    if (!G || wait_ms > BRK_WAIT_MAX_MS)
        return BRK_INVAL;
    int64_t deadline = grp_now_ms(G) + wait_ms;
    /* The store clock decides the deadline; the real one bounds the sleep
     * too, so a test clock that stands still cannot hang a caller. */
    int64_t real_end = mono_ms_real() + wait_ms;
    for (;;) {
        brk_status st = grp_receive_chained(G, req, out);
        if (st == BRK_OK && (*out)->count > 0)
            return BRK_OK;
        if (st != BRK_OK && st != BRK_LIMIT)
            return st;
        if (grp_now_ms(G) >= deadline || mono_ms_real() >= real_end)
            return st;
        brk_receive_batch_free(*out);
        *out = NULL;
        rw_sync sy;
        pthread_mutex_init(&sy.mu, NULL);
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&sy.cv, &ca);
        pthread_condattr_destroy(&ca);
        sy.fired = false;
        uint64_t wid = 0;
        st = wait_impl(G, req, deadline, rw_wake, &sy, &wid);
        if (st == BRK_OK) {
            struct timespec ts = mono_ts(real_end);
            pthread_mutex_lock(&sy.mu);
            while (!sy.fired)
                if (pthread_cond_timedwait(&sy.cv, &sy.mu, &ts) == ETIMEDOUT)
                    break;
            pthread_mutex_unlock(&sy.mu);
            (void)wait_cancel_impl(G, wid);   /* waits for a running one */
        }
        pthread_cond_destroy(&sy.cv);
        pthread_mutex_destroy(&sy.mu);
        if (st != BRK_OK)
            return st;
        if (grp_is_closing(G))              /* close woke us: do not retry */
            return BRK_CLOSED;
    }
}

brk_status brk_group_receive_wait(brk_groups *G, const brk_receive_req *req,
                                  uint32_t wait_ms, brk_receive_batch **out)
{
    if (!G)
        return receive_wait_impl(G, req, wait_ms, out);
    if (!grp_call_enter(G, false)) {
        if (out)
            *out = NULL;
        return BRK_CLOSED;
    }
    brk_status st = receive_wait_impl(G, req, wait_ms, out);
    grp_call_leave(G);
    return st;
}

/* ---- tick, background thread, open and close -------------------------------------- */

static group *group_at(brk_groups *G, uint64_t idx)
{
    pthread_mutex_lock(&G->reg_mu);
    group *g = idx < G->ngroups ? G->groups[idx] : NULL;
    pthread_mutex_unlock(&G->reg_mu);
    return g;
}

static brk_status tick_once(brk_groups *G)
{
    int64_t now = grp_now_ms(G);
    brk_status st = BRK_OK;

    /* Group timers that are due. */
    uint64_t *due = NULL;
    size_t nd = 0, cd = 0;
    pthread_mutex_lock(&G->wmu);
    brk_timer t;
    while (brk_timerheap_peek(&G->gheap, &t) && t.due_ms <= now) {
        brk_timerheap_pop(&G->gheap, &t);
        if (t.ref >= G->narmed)
            continue;
        if (G->armed[t.ref] == t.due_ms || G->armed[t.ref] <= now)
            G->armed[t.ref] = INT64_MAX;
        bool seen = false;
        for (size_t i = 0; i < nd; i++)
            seen |= due[i] == t.ref;
        if (seen)
            continue;
        if (nd == cd) {
            size_t nc = cd ? cd * 2 : 8;
            uint64_t *n2 = realloc(due, nc * sizeof *n2);
            if (!n2) {
                /* Keep it for the next round. */
                (void)brk_timerheap_push(&G->gheap, t.due_ms, t.ref);
                G->armed[t.ref] = t.due_ms;
                break;
            }
            due = n2;
            cd = nc;
        }
        due[nd++] = t.ref;
    }
    pthread_mutex_unlock(&G->wmu);
    for (size_t i = 0; i < nd; i++) {
        group *g = group_at(G, due[i]);
        if (!g)
            continue;
        brk_status s1 = grp_process_group(G, g, now);
        if (s1 != BRK_OK && st == BRK_OK)
            st = s1;
    }
    free(due);

    /* Waiter deadlines. */
    waiter *list = NULL;
    pthread_mutex_lock(&G->wmu);
    while (brk_timerheap_peek(&G->wheap, &t) && t.due_ms <= now) {
        brk_timerheap_pop(&G->wheap, &t);
        waiter *w = *id_slot(G, t.ref);
        if (w && w->state == W_WAITING)
            grp_w_take(G, w, &list);
    }
    pthread_mutex_unlock(&G->wmu);
    grp_w_fire(G, list);

    /* Persistence. */
    if (atomic_load(&G->dirty_seq) != atomic_load(&G->saved_seq)
        && now >= atomic_load(&G->next_persist)) {
        brk_status s2 = grp_save_state(G, false);
        if (s2 != BRK_OK && st == BRK_OK)
            st = s2;
    }
    return st;
}

brk_status brk_groups_tick(brk_groups *G)
{
    if (!G)
        return BRK_INVAL;
    if (!grp_call_enter(G, false))
        return BRK_CLOSED;
    brk_status st = tick_once(G);
    grp_call_leave(G);
    return st;
}

void *grp_bg_main(void *arg)
{
    brk_groups *G = arg;
    pthread_mutex_lock(&G->wmu);
    while (!G->stop) {
        pthread_mutex_unlock(&G->wmu);
        (void)tick_once(G);               /* failures come back as retries */
        pthread_mutex_lock(&G->wmu);
        if (G->stop)
            break;
        int64_t now = grp_now_ms(G);
        int64_t next = INT64_MAX;
        brk_timer t;
        if (brk_timerheap_peek(&G->gheap, &t) && t.due_ms < next)
            next = t.due_ms;
        if (brk_timerheap_peek(&G->wheap, &t) && t.due_ms < next)
            next = t.due_ms;
        if (atomic_load(&G->dirty_seq) != atomic_load(&G->saved_seq)) {
            int64_t p = atomic_load(&G->next_persist);
            if (p < next)
                next = p;
        }
        if (next <= now)
            continue;
        if (!G->sys_clock && next - now > SLEEP_MAX_MS)
            next = now + SLEEP_MAX_MS;   /* a test clock moves silently */
        G->wake_at = next;
        if (next == INT64_MAX) {
            pthread_cond_wait(&G->cond, &G->wmu);
        } else {
            /* The due decision is the store clock's; this monotonic wait
             * only paces the thread. */
            struct timespec ts = mono_ts(mono_ms_real() + (next - now));
            pthread_cond_timedwait(&G->cond, &G->wmu, &ts);
        }
        G->wake_at = INT64_MIN;
    }
    pthread_mutex_unlock(&G->wmu);
    return NULL;
}
