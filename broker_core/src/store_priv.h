/*
 * store_priv.h - structures shared by the store's source files only.
 *
 * Lock inventory (take in this order, never the reverse):
 *   ckpt_mu   serialises checkpoints and retention (held across fsyncs).
 *   mu        the append lock: log end, current segment, topics, queues,
 *             consume-queue and index tails, cursors, counters, the
 *             pending-write list.  Never held across a pwrite of records
 *             (the writer drops it) nor a log fdatasync.  It is held across
 *             an fdatasync only to save the topic table (create, resize,
 *             auto-create): appenders stall for one fsync then.
 *   seg_lock  rwlock over the segment array (segs/nsegs).  Readers hold it
 *             only to find a segment and take a reference.
 *   fmu       flush state: durable offset, the "a leader is flushing" flag.
 *             Waiters sleep on fcond.
 * The sticky `failed` flag is atomic so any thread can test it lock-free.
 */
#ifndef BROKER_STORE_PRIV_H
#define BROKER_STORE_PRIV_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "broker/store.h"
#include "broker/uuid.h"

#define BRK_CQ_ENTRY_LEN   20   /* u64 log_offset, u32 size, u64 tag_hash */
#define BRK_IDX_ENTRY_LEN  24   /* u8[16] msg_id, u64 log_offset */
#define BRK_PATH_MAX       4096
#define BRK_ERRSTR_LEN     256

/* One commit-log segment and its id-index file. */
typedef struct brk_seg {
    uint64_t base;            /* log offset of the first byte; the file name */
    uint64_t size;            /* bytes of records in it (mu for the last) */
    brk_file *log;            /* the segment file */
    brk_file *idx;            /* <base>.idx, entries [0, idx_count) written */
    uint64_t idx_count;       /* index entries written to the file (mu) */
    bool idx_dirty;           /* idx written since its last fdatasync (mu) */
    uint64_t records;         /* records in the segment (mu) */
    int64_t  max_store_ms;    /* newest store time in it, for retention (mu) */
    atomic_int refs;          /* array's reference + borrowers */
} brk_seg;

/* A consume queue: dense entries [min, next). */
typedef struct brk_queue {
    uint64_t min;             /* first readable entry (retention moves it) */
    uint64_t next;            /* one past the last entry = max offset */
    uint64_t file_next;       /* entries below this are in files */
    brk_cq_entry *tail;       /* entries [file_next, next), in memory */
    size_t tail_cap;
    brk_file **files;         /* files[i] holds entries from
                                 (first_file + i) * epf, NULL if deleted */
    size_t nfiles;
    uint64_t first_file;      /* file number of files[0] */
} brk_queue;

typedef struct brk_topic {
    char name[BRK_TOPIC_MAX + 1];
    uint16_t nqueues;         /* queues that exist */
    uint16_t writable;        /* queues 0..writable-1 take writes */
    int64_t created_ms;
    uint64_t rr;              /* round-robin counter for keyless appends */
    uint16_t slots[BRK_KEY_SLOTS];  /* key slot -> queue */
    brk_queue *queues;        /* nqueues of them */
} brk_topic;

/* An index entry not yet written to its segment's .idx file. */
typedef struct brk_idx_pending {
    uint8_t id[BRK_UUID_LEN];
    uint64_t log_offset;
} brk_idx_pending;

/* A record whose log position is assigned but whose bytes are not yet
 * written: it lives on its appender's stack while it waits for a writer
 * (store.c, "Append"). */
typedef struct brk_pending {
    const uint8_t *buf;       /* the encoded, patched record */
    uint32_t len;
    uint64_t log_offset;
    brk_seg *seg;             /* the segment it goes to */
    bool sync;                /* the writer must make it durable too */
    bool wait_after;          /* set by a writer that did not lead the
                                 fdatasync: the appender waits for it */
    brk_status st;            /* set by the writer when done */
    bool done;
    pthread_cond_t cv;        /* its appender sleeps here (with mu) */
} brk_pending;

/* An appender waiting for the group commit to cover `target`. */
typedef struct brk_dwaiter {
    uint64_t target;
    pthread_cond_t cv;        /* signalled with fmu held */
} brk_dwaiter;

typedef struct brk_cursor {
    char *name;               /* NULL: free slot */
    uint64_t offset;          /* below this the owner needs nothing */
} brk_cursor;

struct brk_store {
    /* immutable after open */
    char *dir;
    char *log_dir;
    char *cq_dir;
    brk_store_opts opts;
    brk_io *io;
    const brk_clock *clock;
    brk_uuidgen *ids;
    brk_file *lock;           /* <dir>/LOCK, held while open (posix) */

    pthread_mutex_t ckpt_mu;

    /* guarded by mu */
    pthread_mutex_t mu;
    uint64_t log_end;         /* next offset to assign */
    uint64_t written_end;     /* every byte below is in the page cache */
    brk_pending **pend;       /* assigned, waiting for a writer, in log order */
    size_t npend, pend_cap;
    bool writing;             /* a writer is in pwrite with mu released */
    brk_seg **unsynced;       /* sealed segments not yet fdatasync'ed */
    size_t nunsynced, unsynced_cap;
    uint64_t roll_gen;        /* segments created; the log dir needs an */
    uint64_t dir_synced_gen;  /*   fsync while these two differ */
    uint64_t log_start;       /* first readable offset */
    brk_seg *cur;             /* the segment appends go to */
    brk_topic **topics;       /* sorted by name */
    size_t ntopics;
    brk_idx_pending *idx_tail;/* index entries not yet in .idx files */
    size_t idx_tail_len, idx_tail_cap;
    brk_cursor *cursors;
    size_t ncursors;
    uint64_t appends;         /* records appended since open */
    uint64_t disk_bytes;      /* log + index + cq bytes */
    uint64_t ckpt_offset;     /* last checkpoint written */
    uint8_t *wbuf;            /* the writer's staging buffer (only the
                                 thread with `writing` set touches it) */
    size_t wbuf_cap;

    /* guarded by seg_lock */
    pthread_rwlock_t seg_lock;
    brk_seg **segs;
    size_t nsegs;

    /* guarded by fmu */
    pthread_mutex_t fmu;
    pthread_cond_t fcond;
    atomic_uint_fast64_t durable; /* everything below is fdatasync'ed;
                                     written under fmu, read anywhere */
    uint64_t durable_appends; /* `appends` value covered by `durable` */
    bool flushing;            /* a leader is inside fdatasync */
    brk_dwaiter **dwait;      /* followers asleep, each on its own cv */
    size_t ndwait, dwait_cap;
    uint64_t fsyncs, fsync_records, fsync_ns;
    uint64_t fsync_hist[BRK_FSYNC_BUCKETS];    /* under fmu, see brk_store_stats */

    /* background thread */
    pthread_t bg;
    bool bg_running;
    pthread_mutex_t bg_mu;
    pthread_cond_t bg_cond;
    bool bg_stop;             /* bg_mu */
    int64_t last_flush_ms, last_ckpt_ms, last_retention_ms;  /* tick state */

    atomic_bool failed;       /* sticky error */
    _Atomic(const brk_store_listener *) listener;   /* may be NULL */
    atomic_int listener_users; /* calls that may hold the listener pointer */
    atomic_uint_fast64_t checkpoints;
    uint64_t recovered_records;
    uint64_t truncated_bytes;

    pthread_mutex_t err_mu;
    char errstr[BRK_ERRSTR_LEN];
};

/* A growable list of numbers: file names that are 20-digit offsets. */
typedef struct brk_u64s {
    uint64_t *v;
    size_t n, cap;
    bool nomem;               /* a push failed */
} brk_u64s;

/* ---- store.c helpers ---- */
bool brk__u64s_push(brk_u64s *l, uint64_t x);   /* false: no memory */
void brk__u64s_sort(brk_u64s *l);
/* The number of a file named <20 decimal digits><suffix>, or UINT64_MAX
 * for any other name (a foreign file, a .tmp). */
uint64_t brk__numbered_name(const char *name, const char *suffix);
void brk__seterr(brk_store *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void brk__fail(brk_store *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
brk_status brk__errno_status(int neg_errno);
int64_t brk__now_ms(brk_store *s);
brk_seg *brk__seg_get(brk_store *s, uint64_t log_offset);
void brk__seg_put(brk_store *s, brk_seg *seg);
/* Histogram bucket of an fdatasync that took `ns` (store.c). */
unsigned brk__fsync_bucket(uint64_t ns);
void brk__seg_free(brk_store *s, brk_seg *seg);
void brk__path(char *out, size_t cap, const char *a, const char *b);
void brk__seg_path(brk_store *s, uint64_t base, const char *suffix,
                   char *out, size_t cap);
brk_status brk__pread_full(brk_store *s, brk_file *f, void *buf, size_t len,
                           uint64_t off);

brk_status brk__roll_segment(brk_store *s);                      /* mu held */
bool brk__topic_name_ok(const char *name, bool internal);
uint16_t brk__slot_queue(const brk_topic *t, const void *key, size_t len);

/* ---- store_read.c ---- */
uint64_t brk__visible_end(brk_store *s);                        /* mu held */
uint64_t brk__visible_next(brk_store *s, const brk_queue *q);  /* mu held */

/* ---- store_meta.c: state files ---- */
brk_status brk__write_state_file(brk_store *s, const char *name,
                                 const void *buf, size_t len);
brk_status brk__topics_save(brk_store *s);           /* mu held */
brk_status brk__topics_load(brk_store *s);
brk_status brk__ckpt_save(brk_store *s, uint64_t offset);
brk_status brk__ckpt_load(brk_store *s, uint64_t *offset, bool *found);
brk_topic *brk__topic_find(brk_store *s, const char *name);  /* mu held */
void brk__topics_free_all(brk_store *s);
brk_status brk__topic_new(brk_store *s, const char *name, uint16_t queues,
                          brk_topic **out);           /* mu held, saves */

/* ---- store_cq.c: consume queues and the id index ---- */
brk_status brk__cq_open_queue(brk_store *s, brk_topic *t, uint16_t q);
void brk__cq_close_queue(brk_store *s, brk_queue *q);
brk_status brk__cq_push(brk_store *s, brk_queue *q, const brk_cq_entry *e);
void brk__cq_pop(brk_queue *q);   /* drop the newest tail entry */
brk_status brk__cq_get(brk_store *s, brk_topic *t, uint16_t qid,
                       uint64_t index, brk_cq_entry *e);
brk_status brk__cq_writeout(brk_store *s, brk_topic *t, uint16_t qid,
                            uint64_t below, brk_file ***synced,
                            size_t *nsynced, size_t *capsynced);
brk_status brk__cq_trim(brk_store *s, brk_topic *t, uint16_t qid,
                        uint64_t ckpt);
brk_status brk__cq_drop_below(brk_store *s, brk_topic *t, uint16_t qid,
                              uint64_t log_start);
brk_status brk__idx_push(brk_store *s, const uint8_t id[BRK_UUID_LEN],
                         uint64_t log_offset);
brk_status brk__idx_writeout(brk_store *s, uint64_t below);  /* mu held */
brk_status brk__idx_trim(brk_store *s, brk_seg *seg, uint64_t ckpt);
bool brk__idx_search(brk_store *s, brk_seg *seg, const uint8_t *id,
                     uint64_t since, uint64_t *off);

/* ---- store_recover.c ---- */
brk_status brk__recover(brk_store *s, char *errbuf, size_t errlen);

#endif /* BROKER_STORE_PRIV_H */
