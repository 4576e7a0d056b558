/*
 * txn_priv.h - what the transaction module's source files share (see the
 * top of txn.c for the state machine, record formats and crash argument).
 *
 *   txn.c          helpers, the txid table, effects in flight, verdicts,
 *                  prepare, open/close, queries
 *   txn_record.c   half and op records: parse, read, append; the commit's
 *                  message and the expiry event
 *   txn_check.c    check-backs (worker pool, dispatch), state saving,
 *                  sweeping, compaction, tick and the scheduler thread
 *   txn_recover.c  rebuilding the table from the log at open
 *
 * Lock: one mutex, t->mu, over the table, the heap, the job queue and the
 * counters; never held across a store append or a checker call.  Entries
 * of the table move on growth and deletion: never keep a txn_ent pointer
 * across an unlock.
 */
#ifndef BROKER_TXN_PRIV_H
#define BROKER_TXN_PRIV_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/txn.h"
#include "timerheap.h"

#define OP_LEN        24
#define OP_VERSION    1
#define STATE_LEN     32
#define POLICY_LEN    11
#define COPY_LEN      18

enum { OP_COMMIT = 1, OP_ROLLBACK = 2, OP_CHECK = 3, OP_STUCK = 4 };
enum { SRC_CLIENT = 1, SRC_CHECK = 2, SRC_EXHAUSTED = 3 };

/* entry flags */
enum {
    F_STUCK     = 1u << 0,
    F_EXPIRED   = 1u << 1,
    F_CHECKING  = 1u << 2,    /* queued for or in a worker */
    F_RESOLVING = 1u << 3,    /* a verdict is being written */
    F_PREPARING = 1u << 4,    /* the half record is being written */
    F_EFFECT    = 1u << 5,    /* verdict stored, its effect still owed */
    F_MOVING    = 1u << 6,    /* a compaction copy is being written */
    F_EXHAUSTED = 1u << 7     /* rebuild: checks ran out, action not logged */
};

typedef struct txn_ent {
    uint64_t hash;            /* 0 = empty slot */
    uint64_t half_off;        /* log offset of the current half record */
    int64_t  when_ms;         /* pending: next check; resolved: when */
    uint32_t prep_s;          /* prepare time, s since the epoch (listing
                                 order, age); the exact ms is on disk */
    uint32_t half_age_s;      /* the current half record was written this
                                 many seconds after prep_s (copies) */
    uint16_t checks;
    uint16_t errors;          /* consecutive ERROR answers (saturates) */
    uint8_t  state;           /* brk_txn_state */
    uint8_t  flags;
    uint8_t  pad_[2];
} txn_ent;
/* The policy (interval, limit, action) is not kept here: every check reads
 * the half record anyway, and it is there. */

_Static_assert(sizeof(txn_ent) == 40, "txn_ent is sized for the memory bound");

typedef struct job {
    uint64_t hash;
} job;

struct brk_txn {
    brk_store *s;
    const brk_clock *clock;
    brk_txn_opts o;
    char expiry_default[BRK_TOPIC_MAX + 1];
    brk_uuidgen *ids;

    pthread_mutex_t mu;
    pthread_cond_t  cv;         /* entry flag changes (resolving, preparing) */
    txn_ent *tab;
    size_t cap, used;           /* used = live entries */
    size_t pending, stuck;
    brk_timerheap heap;

    uint64_t *resolved;         /* ring of hashes in resolution order */
    size_t rcap, rhead, rlen;

    uint64_t *inflight;         /* lower bounds of verdict ops whose effect
                                   is not yet appended */
    size_t ninflight, cinflight;
    uint64_t effect_hint;        /* (mu) raised whenever F_EFFECT is set;
                                    0 only when no entry has it, so the
                                    tick skips its table scan */

    /* worker pool */
    pthread_cond_t  wcv;        /* jobs available / stopping */
    pthread_cond_t  idle_cv;    /* a job finished */
    job *jobs;
    size_t jcap, jhead, jlen;
    unsigned active;
    bool stopping;
    pthread_t *workers;
    unsigned nworkers;

    /* scheduler thread */
    pthread_t sched;
    bool sched_running;
    bool rearm;                 /* a timer push failed: sweep re-arms */
    pthread_cond_t scv;
    bool sched_stop;

    int64_t next_save_ms, next_sweep_ms;
    uint64_t saved[3];          /* last state written */
    bool rebuilt;               /* state loaded: saving it is allowed */
    uint32_t cursor;
    bool cursor_ok;

    brk_txn_stats st;
};

typedef struct half_view {
    brk_batch *b;             /* owns the bytes */
    const brk_record *r;
    char txid[BRK_TXID_MAX + 1];
    size_t txid_len;
    char topic[BRK_TOPIC_MAX + 1];
    brk_check_policy pol;
    char expiry[BRK_TOPIC_MAX + 1];
    uint8_t delay_kind;
    int64_t delay_val;
    int64_t prepared_ms;
    bool is_copy;
    uint16_t copy_checks;
    int64_t copy_next;
    uint64_t copy_from;
} half_view;

int64_t txn_now_ms(brk_txn *t);
int64_t txn_sat_add(int64_t a, int64_t b);
uint64_t txn_txid_hash(const char *txid, size_t len);
txn_ent *txn_tab_find(brk_txn *t, uint64_t h);
txn_ent *txn_tab_insert(brk_txn *t, uint64_t h);
void txn_tab_remove(brk_txn *t, txn_ent *e);
void txn_schedule(brk_txn *t, txn_ent *e, int64_t when);
void txn_ring_push(brk_txn *t, uint64_t h);
void txn_set_terminal(brk_txn *t, txn_ent *e, uint8_t state, bool expired,
                      int64_t when);
uint64_t txn_log_end(brk_txn *t);
uint64_t txn_inflight_add(brk_txn *t);
void txn_inflight_del(brk_txn *t, uint64_t lb);
brk_status txn_resolve(brk_txn *t, uint64_t hash, const char *txid,
                       bool commit, uint8_t src, bool wait,
                       const half_view *pre, brk_txn_result *res);
brk_status txn_parse_half(const brk_record *r, half_view *h);
brk_status txn_read_half(brk_txn *t, uint64_t off, half_view *h);
brk_status txn_append_op(brk_txn *t, const char *txid, uint8_t kind,
                         uint8_t src, uint16_t checks, int64_t next,
                         uint64_t half_off, bool defer, uint64_t *op_off);
void txn_expiry_id(const uint8_t *msg_id, uint8_t *out);
brk_status txn_do_effect(brk_txn *t, uint64_t half_off, bool commit,
                         bool expired, uint16_t checks,
                         const half_view *pre, brk_txn_result *res);
void *txn_worker_main(void *arg);
brk_status txn_save_state(brk_txn *t, bool force);
void txn_sweep_locked(brk_txn *t, int64_t now);
void txn_retry_effects(brk_txn *t);
void *txn_sched_main(void *arg);
brk_status txn_rebuild(brk_txn *t, char *err, size_t errlen);

#endif /* BROKER_TXN_PRIV_H */
