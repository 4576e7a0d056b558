/*
 * broker/txn.h - transactional half messages and the check-back scheduler.
 *
 * The RocketMQ-style protocol, with the check-back answered by a pluggable
 * checker:
 *
 *   1. brk_txn_prepare stores a half message (durably, per the store's
 *      flush mode) in the internal topic "__txn_half"; consumers never see it.
 *   2. The application runs its own database transaction.
 *   3. brk_txn_commit appends the message to its topic (same message id, key
 *      -> same queue) or brk_txn_rollback drops it.  Both are idempotent; a
 *      commit after a rollback, or the reverse, is BRK_CONFLICT and changes
 *      nothing: once terminal, always terminal.
 *   4. A transaction left prepared is checked back: when its next check time
 *      comes, a worker thread asks the checker.  COMMIT / ROLLBACK resolve
 *      it; UNKNOWN counts a check and reschedules; ERROR (the checker could
 *      not reach its source) is retried with backoff and never counts, so an
 *      outage can never roll back a transaction the database committed.
 *      After max_checks UNKNOWN answers the policy's action applies.
 *
 * Verdicts and check outcomes are op records in "__txn_op"; the state
 * machine, the record formats and the crash argument are at the top of
 * src/txn.c.  Restart rebuilds every pending transaction, its check count
 * and next check time from the two topics.
 *
 * Threads: every function is thread-safe.  The checker is called only from
 * the worker pool (opts.workers threads), never from the caller's thread and
 * never while a broker_core lock is held.  Unless opts.no_background, one
 * scheduler thread dispatches due checks; brk_txn_tick does it on the
 * caller's thread (tests drive time with a fake clock, then
 * brk_txn_quiesce to wait for the workers).
 */
#ifndef BROKER_TXN_H
#define BROKER_TXN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/delay.h"
#include "broker/status.h"
#include "broker/store.h"

typedef struct brk_txn brk_txn;

#define BRK_TXN_HALF_TOPIC  "__txn_half"
#define BRK_TXN_OP_TOPIC    "__txn_op"
#define BRK_TXID_MAX        128     /* bytes, printable ASCII 0x21..0x7E */

typedef enum brk_txn_state {
    BRK_TXN_PREPARED    = 1,
    BRK_TXN_COMMITTED   = 2,
    BRK_TXN_ROLLED_BACK = 3
} brk_txn_state;

/* "prepared", "committed", "rolled_back" (the HTTP API's spelling). */
const char *brk_txn_state_name(brk_txn_state st);

typedef enum brk_check_result {
    BRK_CHECK_COMMIT   = 1,
    BRK_CHECK_ROLLBACK = 2,
    BRK_CHECK_UNKNOWN  = 3,   /* not decided yet: counts one check */
    BRK_CHECK_ERROR    = 4    /* could not ask: retried, never counted */
} brk_check_result;

/* What a check sees of the transaction.  Views valid during the call. */
typedef struct brk_check_req {
    const char *txid;         /* NUL-terminated */
    const char *topic;
    brk_bytes   key;
    brk_bytes   headers;      /* user properties block (brk_props_next) */
    const uint8_t *msg_id;    /* 16 bytes */
    uint32_t    attempt;      /* 1 for the first counted check; an ERROR
                                 retry asks again with the same attempt */
    int64_t     prepared_ms;
} brk_check_req;

/* The check-back seam.  check() may block (a database query); it runs on a
 * worker thread.  It must be thread-safe when opts.workers > 1. */
typedef struct brk_checker {
    brk_check_result (*check)(void *ctx, const brk_check_req *req);
    void *ctx;
} brk_checker;

typedef enum brk_exhausted_action {
    BRK_EXHAUSTED_ROLLBACK = 0,   /* roll back (and publish the expiry
                                     message when expiry_topic is set) */
    BRK_EXHAUSTED_HOLD     = 1    /* stay prepared, flagged stuck */
} brk_exhausted_action;

/* A check-back schedule.  Daemon default (RocketMQ's): 6 s, 60 s, 15,
 * rollback.  The payment-timeout case: 60 s, 60 s, 10, rollback with an
 * expiry topic. */
typedef struct brk_check_policy {
    uint32_t first_check_ms;      /* after prepare; 0 = check at once */
    uint32_t interval_ms;         /* between checks, >= 1 */
    uint16_t max_checks;          /* UNKNOWN answers before the action, >= 1 */
    uint8_t  on_exhausted;        /* brk_exhausted_action */
    const char *expiry_topic;     /* NULL/"" none; only with ROLLBACK */
} brk_check_policy;

/* Fill with the defaults above (6000, 60000, 15, ROLLBACK, no topic). */
void brk_check_policy_init(brk_check_policy *p);

typedef struct brk_txn_opts {
    brk_check_policy default_policy;
    const brk_checker *checker;   /* NULL: no check-backs; prepared
                                     transactions wait for a verdict */
    brk_delay *delay;             /* for delayed commits; NULL refuses them */
    uint32_t workers;             /* checker threads, default 4 */
    uint32_t max_queued_checks;   /* due checks waiting for a worker, default
                                     1024; more stay in the schedule */
    uint32_t error_backoff_min_ms;/* first retry after an ERROR, default 1000 */
    uint32_t error_backoff_max_ms;/* backoff doubles up to this, default 60000 */
    int64_t  resolved_keep_ms;    /* resolved txids kept for idempotent
                                     replays (and for conflicts), default
                                     1 h: ~60 bytes each, so 1 000 verdicts/s
                                     hold ~220 MiB over an hour */
    int64_t  compact_after_ms;    /* a pending half message older than this
                                     is copied to the log end so retention
                                     can free its segment, and a restart
                                     reads at most about this much of the
                                     half topic; default 1 h, <=0 never */
    uint32_t state_interval_ms;   /* how often state.txn is saved, default 1000 */
    bool     no_background;       /* tests: no scheduler thread (workers
                                     still run), call brk_txn_tick */
} brk_txn_opts;

void brk_txn_opts_init(brk_txn_opts *o);

/* Open over an open store (and delay scheduler, if given) that outlive it.
 * Creates the internal topics and rebuilds pending transactions from the
 * log.  On failure *out is NULL and errbuf (if given) says why. */
brk_status brk_txn_open(brk_txn **out, brk_store *s, const brk_txn_opts *opts,
                        char *errbuf, size_t errlen);

/* Stop the scheduler, wait for checks in flight (their results are
 * applied), save state, free.  Pending transactions stay in the log. */
brk_status brk_txn_close(brk_txn *t);

typedef struct brk_txn_prepare_req {
    const char *topic;            /* target topic (not internal) */
    brk_bytes key, tag, props, body;
    uint32_t flags;               /* BRK_RECF_* */
    const char *txid;             /* NULL or "": generate one (a UUIDv7) */
    const brk_check_policy *policy; /* NULL: opts.default_policy */
    int64_t delay_ms;             /* > 0: deliver this long after commit */
    int64_t deliver_at_ms;        /* > 0: deliver at this wall time (at
                                     commit if that is later); not with delay_ms */
    int64_t born_ms;              /* 0: now */
} brk_txn_prepare_req;

typedef struct brk_txn_result {
    char txid[BRK_TXID_MAX + 1];
    uint8_t msg_id[BRK_UUID_LEN];
    brk_txn_state state;
    bool replay;                  /* the call changed nothing: it repeated an
                                     earlier prepare or verdict */
    bool delayed;                 /* commit: the message waits in the delay
                                     scheduler until deliver_at_ms */
    int64_t deliver_at_ms;
} brk_txn_result;

/* Store a half message.  A txid prepared before with identical content
 * (topic, key, tag, headers, body, flags, policy, delay) is a replay: BRK_OK,
 * replay set, the first result (and its current state).  The same txid with
 * other content is BRK_CONFLICT.  Errors: INVAL (bad txid, topic, policy,
 * system properties), RANGE (delay too far), NOTFOUND (unknown topic and no
 * auto-creation), and the store's append errors. */
brk_status brk_txn_prepare(brk_txn *t, const brk_txn_prepare_req *req,
                           brk_txn_result *res);

/* Verdicts.  NOTFOUND for a txid never prepared (or resolved longer ago
 * than resolved_keep_ms); CONFLICT for the opposite verdict of a resolved
 * transaction (res->state tells which); OK otherwise, replay set when it
 * was already so.  When a check-back resolves the transaction at the same
 * moment, the first terminal writer wins and the other sees its result. */
brk_status brk_txn_commit(brk_txn *t, const char *txid, brk_txn_result *res);
brk_status brk_txn_rollback(brk_txn *t, const char *txid, brk_txn_result *res);

typedef struct brk_txn_info {
    char txid[BRK_TXID_MAX + 1];
    uint8_t msg_id[BRK_UUID_LEN];
    char topic[BRK_TOPIC_MAX + 1];
    char key[BRK_KEY_MAX + 1];    /* NUL-terminated copy; key_len is exact */
    size_t key_len;
    brk_txn_state state;
    bool stuck;                   /* checks exhausted with the HOLD action */
    bool expired;                 /* rolled back because checks ran out */
    bool checking;                /* a check is in flight now */
    uint32_t checks;              /* UNKNOWN answers counted */
    uint32_t check_errors;        /* ERROR answers since the last count */
    int64_t prepared_ms;
    int64_t next_check_ms;        /* 0 when none is scheduled */
    brk_check_policy policy;      /* expiry_topic points into the info */
    char expiry_topic[BRK_TOPIC_MAX + 1];
} brk_txn_info;

/* One transaction.  NOTFOUND as for commit. */
brk_status brk_txn_get(brk_txn *t, const char *txid, brk_txn_info *out);

typedef enum brk_txn_filter {
    BRK_TXN_LIST_PREPARED = 1,    /* every pending one, stuck included */
    BRK_TXN_LIST_STUCK    = 2     /* only the stuck ones */
} brk_txn_filter;

/* Pending transactions, oldest prepare first, at most `limit`.  *out is
 * malloc'ed (free with free()). */
brk_status brk_txn_list(brk_txn *t, brk_txn_filter filter, size_t limit,
                        brk_txn_info **out, size_t *count);

typedef struct brk_txn_stats {
    uint64_t pending;             /* prepared now (stuck included) */
    uint64_t stuck;               /* of which stuck */
    uint64_t checking;            /* checks in flight now */
    int64_t  oldest_pending_ms;   /* prepare time of the oldest, 0 if none */
    uint64_t prepared_total;      /* since open */
    uint64_t committed_total;     /* by client or check */
    uint64_t rolled_back_total;   /* by client, check or exhaustion */
    uint64_t expired_total;       /* of the rolled back: checks ran out */
    uint64_t checks_commit_total;
    uint64_t checks_rollback_total;
    uint64_t checks_unknown_total;
    uint64_t checks_error_total;
    uint64_t compacted_total;     /* half messages copied forward */
    uint64_t memory_bytes;        /* held for pending and kept-resolved txids */
} brk_txn_stats;

void brk_txn_get_stats(brk_txn *t, brk_txn_stats *out);

/* Dispatch the checks due by the clock's now to the workers, save state
 * when due, compact: the scheduler thread's work, on the caller's thread. */
brk_status brk_txn_tick(brk_txn *t);

/* Wait until no check is queued or in flight (tests; shutdown). */
void brk_txn_quiesce(brk_txn *t);

#endif /* BROKER_TXN_H */
