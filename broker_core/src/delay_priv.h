/*
 * delay_priv.h - what the delay scheduler's source files share (formats,
 * the firing protocol and the crash argument are at the top of delay.c).
 *
 *   delay.c          levels and options, the ring of pending offsets,
 *                    system properties and op bodies, the background
 *                    thread, the public API
 *   delay_fire.c     firing (op, then deliveries), compaction, state.delay
 *   delay_recover.c  rebuilding the timers from the log at open
 */
#ifndef BROKER_DELAY_PRIV_H
#define BROKER_DELAY_PRIV_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/delay.h"
#include "timerheap.h"

#define STATE_NAME     "delay"
#define STATE_MAGIC    0x31594C44u          /* "DLY1" */
#define STATE_VERSION  1u
#define STATE_LEN      40u

#define OP_VERSION     1u
#define OP_KIND_FIRE   1u
#define OP_HDR         8u
#define OP_MAX_N       65536u

#define SYS_TOPIC      "\x1ftopic"
#define SYS_DUE        "\x1f" "due"
#define SYS_MOVED      "\x1fmoved"

#define RING_DEAD      (UINT64_C(1) << 63)  /* fired or superseded */
#define RING_INFLIGHT  (UINT64_C(1) << 62)  /* taken by a fire, or in the
                                               retry list: no timer armed */
#define RING_OFF       (RING_INFLIGHT - 1)

#define NONE           UINT64_MAX

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 30000
#define SLEEP_MAX_MS   200                   /* background thread's longest
                                                nap (fake clocks move) */

/* A message whose fire did not complete: its op failed (first_op NONE) or
 * its delivery did.  Its ring slot is INFLIGHT; it has no timer. */
typedef struct retry_ent {
    uint64_t off;           /* the delayed record */
    uint64_t first_op;      /* oldest op that named it, NONE if none did */
    int64_t  due_ms;
    int64_t  next_ms;       /* next attempt */
    uint32_t attempts;
} retry_ent;

/* A send between taking its floor and arming its timer (on its stack). */
typedef struct send_slot {
    uint64_t floor;
    struct send_slot *prev, *next;
} send_slot;

/* One message of a fire batch. */
typedef struct fire_item {
    uint64_t off;
    uint64_t first_op;
    int64_t  due_ms;
    uint32_t attempts;
} fire_item;

struct brk_delay {
    brk_store *s;
    const brk_clock *clock;
    brk_delay_opts o;
    uint32_t cursor;                /* retention cursor "delay" */

    pthread_mutex_t save_mu;
    pthread_mutex_t fire_mu;
    pthread_mutex_t mu;
    pthread_cond_t cond;            /* CLOCK_MONOTONIC */

    /* --- mu ------------------------------------------------------------- */
    brk_timerheap heap;             /* (due, log offset) of armed timers */
    size_t stale;                   /* heap entries whose slot is gone */
    uint64_t *ring;                 /* pending log offsets, ascending, with
                                       RING_* flags; v[rhead, rhead+rlen) */
    size_t rhead, rlen, rcap;
    size_t rdead;                   /* DEAD slots inside the window */
    size_t live;                    /* pending = slots not DEAD */
    retry_ent *retry;
    size_t nretry, retry_cap;
    send_slot *sends;               /* sends in flight */
    size_t reserved;                /* heap/ring slots promised to sends and
                                       compaction copies in flight */
    uint64_t hi_water;              /* start of the newest completed append */
    int64_t wake_at;                /* background thread sleeps until this
                                       (INT64_MIN while it is awake) */
    int64_t hold_until;             /* firing paused after an op failure
                                       (written under fire_mu and mu) */
    uint32_t hold_fails;
    bool stop;
    uint64_t scheduled_total, fired_total, errors_total, compacted_total;

    /* --- fire_mu -------------------------------------------------------- */
    fire_item *batch;               /* fire_batch items */
    uint8_t *opbuf;                 /* op body for fire_batch items */
    int64_t compact_at;             /* next time the oldest pending may be
                                       old enough to copy */

    /* --- save_mu -------------------------------------------------------- */
    bool saved_valid;
    uint64_t saved_xd, saved_eff, saved_dq, saved_oq;
    int64_t next_save_ms;

    pthread_t thr;
    bool has_thr;
};

typedef struct dmeta {
    char topic[BRK_TOPIC_MAX + 1];
    int64_t due_ms;
    bool moved;
    uint64_t moved_from;
} dmeta;

int64_t dly_sat_add(int64_t a, int64_t b);
int64_t dly_now_ms(brk_delay *d);
void dly_set_err(char *errbuf, size_t errlen, const char *fmt, ...);
void dly_set_err(char *errbuf, size_t errlen, const char *fmt, ...);
int64_t dly_backoff_ms(uint32_t attempts);
size_t dly_ring_find(const brk_delay *d, uint64_t off);
void dly_ring_kill(brk_delay *d, size_t i);
void dly_ring_insert(brk_delay *d, uint64_t v);
uint64_t dly_ring_low(const brk_delay *d);
brk_status dly_reserve_slot(brk_delay *d);
void dly_arm(brk_delay *d, uint64_t off, int64_t due_ms);
void dly_heap_tidy(brk_delay *d);
void dly_note_append(brk_delay *d, uint64_t log_offset);
bool dly_parse_meta(const brk_record *r, dmeta *m);
brk_status dly_props_merge(brk_bytes base, const brk_prop *sys, size_t nsys,
                           uint8_t **out, size_t *len);
size_t dly_op_encode(uint8_t *buf, const fire_item *items, size_t n);
size_t dly_op_count(const brk_record *r);
uint64_t dly_op_at(const brk_record *r, size_t i);
brk_status dly_deliver(brk_delay *d, uint64_t off, bool defer,
                       brk_append_res *res);
brk_status dly_fire_due(brk_delay *d, int64_t now, unsigned *fired);
brk_status dly_compact(brk_delay *d, int64_t now);
brk_status dly_save_state(brk_delay *d, bool force, bool wait);
brk_status dly_rebuild(brk_delay *d, char *errbuf, size_t errlen);

#endif /* BROKER_DELAY_PRIV_H */
