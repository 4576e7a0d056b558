/*
 * group_priv.h - structures shared by the consumer-group source files only
 * (group.c, group_recv.c, group_state.c, group_wait.c); the design is at
 * the top of group.c.
 *
 * LOCKS (take in this order; store calls are made under save_mu, replay_mu
 * and g->mu, never under reg_mu or wmu)
 *   save_mu   one state save at a time; held across the state-file write
 *   replay_mu per group, one dead-letter replay at a time; g->mu is taken
 *             inside it only briefly (replay appends to user topics
 *             without g->mu, so their listener calls fire at once)
 *   g->mu     one group: its config, subscriptions, members, every qstate;
 *             held across record reads and the appends of retry copies and
 *             dead letters (callbacks the listener takes meanwhile are
 *             parked until it is dropped, see LONG POLLING in group.c)
 *   reg_mu    the group array and the set of retry-topic names; held briefly
 *   wmu       waiters, both heaps, the pending-visibility list, armed[],
 *             the background thread's sleep (cond) and wdone
 * The background thread is joined outside every lock.
 */
#ifndef BROKER_GROUP_PRIV_H
#define BROKER_GROUP_PRIV_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/delay.h"
#include "broker/group.h"
#include "timerheap.h"

#define STATE_NAME       "groups"
#define STATE_MAGIC      0x31505247u        /* "GRP1" */
#define STATE_VERSION    1u

#define LEVELS           BRK_DELAY_LEVELS    /* 18 */
#define SUBS_MAX         (BRK_QUEUES_MAX / LEVELS)
#define INVISIBLE_MAX_MS (12LL * 3600 * 1000)
#define REASON_MAX       1024
#define INFLIGHT_MAX     1000000u
#define INFLIGHT_BYTES_MAX (UINT64_C(1) << 40)
#define MAX_DELIVERIES_MAX 1000
#define ENTRY_CHUNK      64
#define WBUCKETS         256
#define SLEEP_MAX_MS     200                 /* non-system clocks */
#define FAIL_BACKOFF_MS  1000                /* a failed retry/DLQ append */
#define TIMEOUT_REASON   "invisibility timed out"

#define SYS_OTOPIC       "\x1fotopic"
#define SYS_OQUEUE       "\x1foqueue"
#define SYS_OOFFSET      "\x1fooffset"
#define SYS_COUNT        "\x1f" "count"
#define SYS_NOTBEFORE    "\x1fnotbefore"
#define SYS_REASON       "\x1freason"

#define DLQ_PREFIX       "outboxd-dlq-"

enum { FL_OUT = 1, FL_WAIT = 2 };
enum { W_WAITING = 1, W_RUNNING = 2 };

/* ---- types ----------------------------------------------------------------------- */

typedef struct filter {
    bool all;
    uint32_t n;
    uint64_t *hash;             /* n tag hashes */
    char **tag;                 /* n tags, pointing into buf */
    uint16_t *len;
    char *buf;                  /* normalized tags, NUL separated */
    char *text;                 /* as given ("*" for all), persisted */
} filter;

typedef struct flight {
    uint64_t off;               /* queue offset */
    uint64_t log_off;           /* where the record is */
    uint64_t gen;               /* receipt generation */
    int64_t  visible_at;        /* OUT: expiry; WAIT: FIFO redelivery time */
    uint32_t count;             /* deliveries so far, this one included */
    uint32_t bytes;             /* record size (flow control) */
    uint8_t  state;             /* FL_OUT, FL_WAIT */
} flight;

typedef struct span {
    uint64_t lo, hi;
} span;

typedef struct qstate {
    uint64_t committed;
    uint64_t next;
    flight *fl;                 /* sorted by off */
    uint32_t nfl, cfl;
    span *sp;                   /* sorted, disjoint, > committed */
    uint32_t nsp, csp;
    uint64_t head_off;          /* retry queues: head_due is for this offset */
    int64_t  head_due;          /* INT64_MIN: unknown */
} qstate;

typedef struct substate {
    qstate *mq;                 /* the topic's queues */
    uint32_t nmq;
    qstate *rq;                 /* LEVELS retry queues, or none */
    uint32_t nrq;
    uint32_t cursor;
    bool has_cursor;
} substate;

typedef struct member {
    char name[BRK_MEMBER_MAX + 1];
    char retry_topic[BRK_TOPIC_MAX + 1];
    uint32_t idx;
    substate *ss;               /* one per subscription (grows lazily) */
    uint32_t nss;
    uint32_t inflight;          /* FL_OUT deliveries */
    uint64_t inflight_bytes;
    uint32_t retry_nq;          /* queues of the retry topic (0: none yet) */
    uint32_t rr;                /* rotating start for receive */
    int64_t min_vis;            /* <= every FL_OUT visible_at (expiry scans
                                   are skipped before it) */
    bool blocked;               /* a receive or has_work found a message that
                                   did not fit room() since the last settle
                                   that looked: the next settle wakes */
} member;

typedef struct subscr {
    char topic[BRK_TOPIC_MAX + 1];
    filter f;
} subscr;

typedef struct group {
    char name[BRK_GROUP_MAX + 1];
    char dlq_topic[BRK_TOPIC_MAX + 1];
    uint32_t idx;               /* in the registry, for timers */
    pthread_mutex_t mu;
    pthread_mutex_t replay_mu;
    /* --- mu --- */
    brk_group_config cfg;
    bool progress;              /* something was handed out or skipped */
    subscr *subs;
    uint32_t nsubs;
    member **members;
    uint32_t nmembers;
    uint64_t dlq_replay;
    uint64_t gen;
} group;

typedef struct waiter {
    uint64_t id;
    char topic[BRK_TOPIC_MAX + 1];
    char group[BRK_GROUP_MAX + 1];
    char member[BRK_MEMBER_MAX + 1];
    int64_t deadline;
    brk_group_wake_fn fn;
    void *ctx;
    uint8_t state;
    struct waiter *tprev, *tnext;   /* topic bucket (WAITING only) */
    struct waiter *inext;           /* id bucket */
    struct waiter *fnext;           /* a firing list */
} waiter;

typedef struct pend {
    char topic[BRK_TOPIC_MAX + 1];
    uint64_t max_off;               /* wake when durable passes this */
} pend;

struct brk_groups {
    brk_store *s;
    const brk_clock *clock;
    brk_groups_opts o;
    bool sync_mode;
    bool sys_clock;
    char epoch[17];
    brk_store_listener listener;
    atomic_int listener_active;

    pthread_mutex_t save_mu;
    _Atomic uint64_t saved_seq;
    _Atomic uint64_t dirty_seq;
    _Atomic int64_t next_persist;

    pthread_mutex_t reg_mu;
    group **groups;
    uint32_t ngroups, cgroups;
    char **rnames;
    size_t nrnames, crnames;

    pthread_mutex_t wmu;
    pthread_cond_t cond;            /* background sleep, CLOCK_MONOTONIC */
    pthread_cond_t wdone;           /* a firing finished */
    waiter *tb[WBUCKETS];
    waiter *ib[WBUCKETS];
    size_t nwaiters;
    uint64_t next_wid;
    brk_timerheap wheap;            /* (deadline, waiter id) */
    brk_timerheap gheap;            /* (due, group idx) */
    int64_t *armed;                 /* per group idx: earliest armed due */
    uint32_t narmed;
    pend *pend;
    size_t npend, cpend;
    uint64_t durable_seen;
    int64_t wake_at;
    bool stop;
    bool closing;                   /* close began: public calls refuse */
    uint32_t busy;                  /* public calls in progress */
    pthread_cond_t idle;            /* busy dropped to 0 while closing */

    pthread_t thr;
    bool has_thr;
};

/* ---- shared internal functions ----------------------------------------------------- */

/* group.c */
bool grp_call_enter(brk_groups *G, bool always);
void grp_call_leave(brk_groups *G);
bool grp_is_closing(brk_groups *G);
int64_t grp_now_ms(brk_groups *G);
void grp_set_err(char *errbuf, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
bool grp_group_name_ok(const char *s);
bool grp_member_name_ok(const char *s);
bool grp_topic_ok(const char *t);
uint32_t grp_str_hash(const char *s);
int grp_level_for(int64_t ms);
bool grp_config_ok(const brk_group_config *c);
void grp_filter_free(filter *f);
brk_status grp_filter_parse(const char *text, filter *out);
bool grp_filter_hash_ok(const filter *f, uint64_t h);
bool grp_filter_tag_ok(const filter *f, brk_bytes tag);
void grp_group_free(brk_groups *G, group *g);
group *grp_find_group_locked(brk_groups *G, const char *name);
group *grp_find_group(brk_groups *G, const char *name);
member *grp_member_new(const group *g, const char *name, uint32_t idx);
void grp_note_vis(member *m, int64_t v);
brk_status grp_members_push(group *g, member *m);
brk_status grp_sub_add(group *g, const char *topic, filter *f, uint32_t *k);
int64_t grp_sub_find(const group *g, const char *topic);
brk_status grp_group_new(const char *name, const brk_group_config *cfg,
                         group **out);
brk_status grp_group_publish_locked(brk_groups *G, group *g);
brk_status grp_member_get(brk_groups *G, group *g, const char *name,
                          member **out, bool create);
brk_status grp_ss_ensure(brk_groups *G, group *g, member *m, uint32_t k,
                         substate **out);
brk_status grp_retry_topic_ensure(brk_groups *G, group *g, member *m,
                                  uint32_t k);

/* group_recv.c */
void grp_q_init(qstate *q, uint64_t at);
void grp_q_free(qstate *q);
bool grp_has_work(brk_groups *G, group *g, member *m, uint32_t k,
                  int64_t now);
brk_status grp_process_group(brk_groups *G, group *g, int64_t now);
brk_status grp_req_check(const brk_receive_req *req);
brk_status grp_req_resolve(brk_groups *G, const brk_receive_req *req,
                           group **gp, uint32_t *k, member **m);
brk_status grp_receive_impl(brk_groups *G, const brk_receive_req *req,
                            brk_receive_batch **out);

/* group_state.c */
brk_status grp_save_state_ex(brk_groups *G, bool force, bool write);
brk_status grp_save_state(brk_groups *G, bool force);
brk_status grp_save_covering(brk_groups *G, uint64_t target);
brk_status grp_load_state(brk_groups *G, char *errbuf, size_t errlen);

/* group_wait.c */
void grp_mark_dirty(brk_groups *G);
void grp_arm(brk_groups *G, const group *g, int64_t due);
void grp_w_take(brk_groups *G, waiter *w, waiter **list);
void grp_defer_begin(void);
void grp_w_fire(brk_groups *G, waiter *list);
void grp_defer_end(brk_groups *G);
/* grp_receive_impl, then grp_wake_one when the batch was full. */
brk_status grp_receive_chained(brk_groups *G, const brk_receive_req *req,
                               brk_receive_batch **out);
/* Wake one waiter of (topic, group, member): a receive took a full batch,
 * so more may be ready (see take_topic_one_each in group_wait.c). */
void grp_wake_one(brk_groups *G, const char *topic, const char *grp,
                  const char *mem);
void grp_wake_topic(brk_groups *G, const char *topic, const char *grp,
                    const char *mem);
void grp_on_appended(void *ctx, const char *topic, uint16_t queue,
                     uint64_t log_offset);
void grp_on_durable(void *ctx, uint64_t end);
void *grp_bg_main(void *arg);

#endif
