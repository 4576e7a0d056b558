/*
 * broker/store.h - the broker_core storage engine.
 *
 * One store = one directory:
 *   <dir>/log/<20-digit base offset>         commit-log segments
 *   <dir>/log/<20-digit base offset>.idx     message-id index of a segment
 *   <dir>/cq/<topic>/<queue>/<20-digit first index>   consume-queue files
 *   <dir>/topics                             topic table (state file)
 *   <dir>/checkpoint                         dispatch/flush checkpoint
 *   <dir>/LOCK                               (posix backend) one opener only
 * Formats are documented at the top of src/store.c (segments), src/record.c
 * (records), src/store_cq.c and src/store_meta.c.
 *
 * Guarantees
 *   - SYNC flush: brk_store_append returns BRK_OK only after the record is
 *     covered by a completed fdatasync.  Concurrent appenders share one
 *     fdatasync (group commit).
 *   - ASYNC flush: BRK_OK means the record is in the OS page cache (it
 *     survives kill -9 of the process, not a power loss); a background
 *     thread fdatasyncs every flush_interval_ms.  req->sync forces SYNC
 *     behaviour for one append.
 *   - A failed write or fdatasync whose effect on the file is unknown makes
 *     the store refuse every later write with BRK_FAILED (sticky, like
 *     PostgreSQL after fsyncgate).  Reads keep working.  Reopen to recover.
 *   - Per queue, offsets are dense (0, 1, 2, ...) and records are read back
 *     in append order.  Same key -> same queue (see brk_topic_queue_for_key).
 *   - Recovery on open truncates a torn tail past the last checkpoint and
 *     rebuilds consume queues and the id index; corruption before the
 *     checkpoint refuses to open (BRK_CORRUPT, detail in the error string)
 *     unless opts.repair is set, which truncates the log at the bad record.
 *
 * Threads: every function is thread-safe (brk_store_tick only for
 * no_background stores).  Readers take the append lock briefly: to copy
 * consume-queue entries, which may mean a few small preads of queue files.
 * The store owns one background thread (flush, checkpoint, retention).
 *
 * Caveats
 *   - One process per directory (enforced with a lock file on POSIX).
 *   - Lookup by message id reads the per-segment index files, newest first;
 *     it is meant for tools and rare paths, not per-message hot paths
 *     (brk_store_lookup_since bounds the work to the records from a given
 *     log offset on).
 */
#ifndef BROKER_STORE_H
#define BROKER_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/clock.h"
#include "broker/io.h"
#include "broker/record.h"
#include "broker/status.h"

typedef struct brk_store brk_store;

typedef enum brk_flush_mode {
    BRK_FLUSH_ASYNC = 0,
    BRK_FLUSH_SYNC  = 1
} brk_flush_mode;

#define BRK_QUEUES_DEFAULT   4
#define BRK_QUEUES_MAX       1024
#define BRK_KEY_SLOTS        1024    /* key hash space, see queue_for_key */

typedef struct brk_store_opts {
    brk_io *io;                     /* NULL: brk_io_posix() */
    const brk_clock *clock;         /* NULL: brk_clock_system() */
    brk_flush_mode flush_mode;      /* default ASYNC */
    uint32_t flush_interval_ms;     /* ASYNC background flush, default 500 */
    uint32_t checkpoint_interval_ms;/* CQ/index flush + checkpoint, default 1000 */
    uint32_t group_commit_delay_us; /* SYNC leader waits this long to gather
                                       followers before fdatasync; default 0 */
    uint64_t segment_bytes;         /* default 256 MiB, min 4096 */
    uint32_t cq_entries_per_file;   /* default 262144 (5 MiB of entries) */
    uint64_t disk_budget_bytes;     /* 0 = unlimited; counts log + indexes */
    int64_t  retention_ms;          /* segments older than this may go; default 72 h; <0 never */
    uint32_t retention_interval_ms; /* how often the background thread checks; default 10000 */
    uint32_t max_body_bytes;        /* default 4 MiB, at most BRK_BODY_MAX */
    bool     auto_create_topics;    /* append to an unknown topic creates it;
                                       default true */
    uint16_t default_queues;        /* for auto-created topics; default 4 */
    bool     repair;                /* truncate at mid-log corruption instead of failing */
    uint32_t verify_segments;       /* open checks every CRC of the newest N
                                       segments (default 2; 0 = all); older
                                       records are checked when read */
    bool     no_background;         /* tests: no thread; call brk_store_tick() */
    uint64_t uuid_seed;             /* 0: random; else reproducible ids (tests) */
} brk_store_opts;

/* Fill `o` with the defaults above. */
void brk_store_opts_init(brk_store_opts *o);

/* Open (creating if needed) the store in `dir`, running recovery.  On
 * failure *out is NULL, nothing needs closing, and if errbuf is not NULL a
 * one-line reason (naming file and offset for corruption) is written there. */
brk_status brk_store_open(brk_store **out, const char *dir,
                          const brk_store_opts *opts, char *errbuf,
                          size_t errlen);

/* Flush everything, write a checkpoint, stop the background thread, free.
 * Returns the first error met while flushing (the store is freed anyway).
 * NULL is a no-op. */
brk_status brk_store_close(brk_store *s);

/* The last error recorded on the store, a one-line string ("" if none).
 * Valid until the next call on the store; do not free. */
const char *brk_store_errstr(brk_store *s);

/* ---- topics -------------------------------------------------------------- */

/* Create a topic with `queues` queues (1..BRK_QUEUES_MAX; 0 = default).
 * BRK_EXISTS if it exists (nothing changes), BRK_INVAL for a bad name (see
 * brk_topic_name_valid; the store also refuses a leading '.') or count.
 * Internal "__" names are accepted here: creating is an administrative call,
 * and the HTTP layer refuses them itself.  Durable (state file synced)
 * before returning. */
brk_status brk_topic_create(brk_store *s, const char *topic, uint16_t queues);

/* Change the number of writable queues.  Growing adds queues at once.
 * Shrinking stops new writes to queues >= n; their data stays readable (and
 * listed) until retention removes it.  Growing again re-opens them with
 * their offsets intact.  Returns BRK_OK; *created is set when the topic did
 * not exist (and was created with n queues). */
brk_status brk_topic_resize(brk_store *s, const char *topic, uint16_t n,
                            bool *created);

typedef struct brk_topic_info {
    char name[BRK_TOPIC_MAX + 1];
    uint16_t queues;          /* queues that exist (readable) */
    uint16_t writable;        /* queues taking new writes: 0..writable-1 */
    int64_t  created_ms;
    uint64_t messages;        /* sum over queues of (max - min) offsets */
} brk_topic_info;

brk_status brk_topic_get(brk_store *s, const char *topic, brk_topic_info *out);

/* List topics in name order.  *out is malloc'ed (free with free()). Internal
 * topics ("__...") are listed only when include_internal. */
brk_status brk_topic_list(brk_store *s, bool include_internal,
                          brk_topic_info **out, size_t *count);

/* The queue a key maps to.  Rule: slot = crc32c(key) mod BRK_KEY_SLOTS and a
 * per-topic slot table maps slots to queues.  A new topic maps slot s to
 * s mod queues.  Growing a topic that has never held a message re-spreads the
 * slots over all queues; growing a topic with data leaves every slot where it
 * is, so a key never changes queue (per-key order is kept) and the new
 * queues take keyless traffic only.  Shrinking moves only the slots of the
 * removed queues (to slot mod n); keys on those slots change queue once. */
brk_status brk_topic_queue_for_key(brk_store *s, const char *topic,
                                   const void *key, size_t key_len,
                                   uint16_t *queue);

/* ---- append -------------------------------------------------------------- */

typedef struct brk_append_req {
    const char *topic;              /* NUL-terminated */
    int32_t  queue;                 /* -1: by key, or round robin when no key */
    brk_bytes key, tag, props, body;/* props: an encoded block (brk_props_encode) */
    uint32_t flags;                 /* BRK_RECF_* */
    uint8_t  type;                  /* 0 = BRK_REC_MSG */
    const uint8_t *msg_id;          /* NULL: a new UUIDv7 */
    int64_t  born_ms;               /* 0: now */
    bool     sync;                  /* fdatasync before returning, even in ASYNC */
    bool     allow_internal;        /* may write to "__" topics */
    bool     defer_sync;            /* SYNC mode: return once the record is
                                       written, without waiting for its
                                       fdatasync; it becomes durable (and,
                                       in SYNC mode, visible) with the next
                                       flush or waiting append, which covers
                                       everything written before it.  For
                                       modules that append a batch and make
                                       it durable once (delay.c).  No effect
                                       in ASYNC mode; req->sync wins. */
} brk_append_req;

typedef struct brk_append_res {
    uint8_t  msg_id[BRK_UUID_LEN];
    uint16_t queue;
    uint64_t queue_offset;
    uint64_t log_offset;
    int64_t  store_ms;
} brk_append_res;

/* Append one message.  Errors: NOTFOUND (unknown topic, auto-create off),
 * INVAL (bad field), TOOBIG (over a limit), READONLY (explicit queue
 * removed by a shrink), RANGE (explicit queue does not exist), FULL (disk
 * budget), NOSPC/IO (the write failed; NOSPC leaves the store usable),
 * FAILED (sticky error).  On any error the record is not visible to readers,
 * with one exception a caller must allow for: a record whose fdatasync
 * failed may or may not be there after a restart.  It was never
 * acknowledged, so an at-least-once caller retries it, and consumers
 * de-duplicate by message id.  A refused append never creates its topic; an
 * append that fails in the write itself may leave the auto-created topic
 * behind, empty. */
brk_status brk_store_append(brk_store *s, const brk_append_req *req,
                            brk_append_res *res);

/* fdatasync everything appended so far (the log; indexes are flushed by the
 * checkpoint).  BRK_FAILED if the store is failed. */
brk_status brk_store_flush(brk_store *s);

/* Flush indexes and write a checkpoint now (the background thread does this
 * every checkpoint_interval_ms). */
brk_status brk_store_checkpoint(brk_store *s);

/* Run one round of the background duties (flush when due, checkpoint when
 * due, retention when due) on the caller's thread.  For no_background stores
 * and tests. */
brk_status brk_store_tick(brk_store *s);

/* ---- read ---------------------------------------------------------------- */

/* One consume-queue entry. */
typedef struct brk_cq_entry {
    uint64_t log_offset;
    uint32_t size;
    uint64_t tag_hash;
} brk_cq_entry;

/* Offsets of a queue: min is the first readable offset (older entries were
 * removed by retention), max is one past the last (the next to be written).
 * BRK_NOTFOUND for an unknown topic, BRK_RANGE for a queue id it lacks. */
brk_status brk_store_queue_range(brk_store *s, const char *topic,
                                 uint16_t queue, uint64_t *min, uint64_t *max);

/* Read up to `max` consume-queue entries from `from`.  *n is how many were
 * filled; 0 with BRK_OK when from == max offset.  BRK_RANGE when `from` is
 * beyond the max offset; when it is below the min offset reading starts at
 * the min offset and *first says where. */
brk_status brk_store_read_entries(brk_store *s, const char *topic,
                                  uint16_t queue, uint64_t from,
                                  brk_cq_entry *out, size_t max, size_t *n,
                                  uint64_t *first);

/* The first queue offset at or above `from` whose record starts at or after
 * log offset `log_offset`; the queue's max offset when none does.  Queues
 * are in log order, so this is a binary search.  `from` is a hint the
 * caller knows to be at or below the answer (0 when it knows nothing).
 * Modules use it to turn "everything from this log offset on" into a place
 * to start reading a queue. */
brk_status brk_store_queue_seek(brk_store *s, const char *topic,
                                uint16_t queue, uint64_t from,
                                uint64_t log_offset, uint64_t *out);

/* A batch of decoded messages.  Owned by the caller: free with
 * brk_batch_free.  recs[i] views point into the batch's own buffer. */
typedef struct brk_batch {
    size_t count;
    brk_record *recs;
    uint64_t first_offset;  /* queue offset of recs[0] (reading may skip
                               ahead past retention) */
    uint64_t next_offset;   /* where the next read should start */
    void *priv_;            /* buffer; do not touch */
} brk_batch;

/* Read up to max messages of one queue from `from` (see read_entries for
 * range rules).  Each record is checked (CRC) before it is returned:
 * BRK_CORRUPT if one fails.  An empty batch (count 0) with BRK_OK at the end
 * of the queue. */
brk_status brk_store_read(brk_store *s, const char *topic, uint16_t queue,
                          uint64_t from, size_t max, brk_batch **out);

void brk_batch_free(brk_batch *b);

/* Read the single record at a log offset (from a cq entry).  The record is
 * copied into a new batch of one. */
brk_status brk_store_read_at(brk_store *s, uint64_t log_offset,
                             brk_batch **out);

/* Find a message by id.  BRK_NOTFOUND when it is not (or no longer) in the
 * log.  When the same id was appended more than once, the newest wins.
 * Same as brk_store_lookup_since(s, id, 0, out). */
brk_status brk_store_lookup(brk_store *s, const uint8_t id[BRK_UUID_LEN],
                            brk_batch **out);

/* brk_store_lookup restricted to records at log offsets >= since: a caller
 * that knows where the records it may be looking for start (the relay: from
 * a marker it appended before them) pays for the index entries from there
 * on, not for the whole store.  Segments that end at or before `since` are
 * not read at all; in the segment holding `since` a binary search of its
 * index file (entries are in log order) finds where to start; the pending
 * in-memory index tail is filtered the same way.  A copy of the id below
 * `since` is never returned, even when it is the only one (BRK_NOTFOUND).
 * Records become visible to it as to every reader (in SYNC mode once
 * durable).  *out as for brk_store_lookup (NULL unless BRK_OK). */
brk_status brk_store_lookup_since(brk_store *s, const uint8_t id[BRK_UUID_LEN],
                                  uint64_t since, brk_batch **out);

/* ---- retention ----------------------------------------------------------- */

/* A named reader cursor: segments are deleted only when every cursor has
 * passed them.  The cursor starts at the current log start (holding
 * everything).  Registering an existing name returns its id.  Cursors are
 * in memory: their owners re-register after a restart (they persist their
 * own progress). */
brk_status brk_store_cursor_register(brk_store *s, const char *name,
                                     uint32_t *id);
/* Everything below log_offset is no longer needed by this cursor. */
brk_status brk_store_cursor_set(brk_store *s, uint32_t id, uint64_t log_offset);
brk_status brk_store_cursor_unregister(brk_store *s, uint32_t id);

/* Delete the segments (and their index and consume-queue files) that are
 * older than the retention time and below every cursor.  The newest segment
 * is never deleted.  *deleted (may be NULL) counts segments removed. */
brk_status brk_store_retention_run(brk_store *s, unsigned *deleted);

/* ---- state files for modules built on the store --------------------------- */

/* Small named state files for the modules layered on the store (transaction
 * and delay schedulers, consumer groups): "<dir>/state.<name>", written
 * whole (tmp -> fdatasync -> rename -> fsync dir) and closed by a CRC32C, so
 * a reader sees either the previous or the new contents.  `name` is 1..64
 * bytes of [a-z0-9_-].  BRK_INVAL for a bad name, BRK_TOOBIG over 16 MiB.
 * A failed write makes the store failed (sticky), as for its own state. */
#define BRK_STATE_MAX (16u << 20)
brk_status brk_store_state_write(brk_store *s, const char *name,
                                 const void *buf, size_t len);

/* Read it back into a malloc'ed buffer (*out, free with free()).
 * BRK_NOTFOUND when it was never written, BRK_CORRUPT when its CRC or
 * framing is wrong (the reason is in brk_store_errstr). */
brk_status brk_store_state_read(brk_store *s, const char *name,
                                void **out, size_t *len);

/* The clock the store was opened with (never NULL), so layered modules
 * read the same time as the records they write. */
const brk_clock *brk_store_clock(brk_store *s);

/* Whether appends to an unknown topic create it (opts.auto_create_topics),
 * so layered modules can refuse early what a later append would refuse. */
bool brk_store_auto_create(brk_store *s);

/* The flush mode the store was opened with, so layered modules know when an
 * appended record becomes visible to readers (see brk_store_listener). */
brk_flush_mode brk_store_flush_mode(brk_store *s);

/* ---- notification -------------------------------------------------------- */

/* What the store tells a module layered on it (consumer groups wake their
 * long-polling waiters with it).  Both run on the appending or flushing
 * thread, with no store lock held; they must be quick and must not append.
 *   appended  an append returned OK: the record is at log_offset of
 *             topic/queue.  In ASYNC mode it is visible to readers now; in
 *             SYNC mode from the moment `durable` passes it.
 *   durable   everything below `end` is fdatasync'ed (and, in SYNC mode,
 *             visible to readers). */
typedef struct brk_store_listener {
    void (*appended)(void *ctx, const char *topic, uint16_t queue,
                     uint64_t log_offset);
    void (*durable)(void *ctx, uint64_t end);
    void *ctx;
} brk_store_listener;

/* Install (or with NULL remove) the one listener.  The struct must stay
 * valid while installed.  Returns once no callback of the previous listener
 * is running or can start, so its owner may then free it.  Do not call it
 * from inside a callback. */
void brk_store_set_listener(brk_store *s, const brk_store_listener *l);

/* ---- stats --------------------------------------------------------------- */

/* Duration histogram of log fdatasyncs (for /metrics). */
#define BRK_FSYNC_BUCKETS 13

/* Upper bound of bucket i in microseconds (100 us .. 1 s); UINT64_MAX for
 * the last bucket and beyond. */
uint64_t brk_fsync_bucket_us(unsigned i);

typedef struct brk_store_stats {
    uint64_t log_start;         /* first readable log offset */
    uint64_t log_end;           /* next append offset */
    uint64_t durable_offset;    /* everything below is fdatasync'ed */
    uint64_t disk_bytes;        /* log + index + cq bytes on disk */
    uint64_t segments;
    uint64_t appends;           /* since open */
    uint64_t fsyncs;            /* log fdatasyncs since open */
    uint64_t fsync_records;     /* records covered by those fdatasyncs */
    uint64_t fsync_ns_total;    /* time spent in log fdatasync */
    uint64_t fsync_hist[BRK_FSYNC_BUCKETS]; /* fdatasyncs by duration: bucket
                                   i counts those <= brk_fsync_bucket_us(i)
                                   and above bucket i-1's bound (not
                                   cumulative); the last is +Inf */
    uint64_t checkpoints;
    uint64_t recovered_records; /* re-dispatched at open */
    uint64_t truncated_bytes;   /* torn tail dropped at open */
    bool     failed;            /* sticky error state */
} brk_store_stats;

void brk_store_get_stats(brk_store *s, brk_store_stats *out);

/* The next append offset (stats.log_end) alone: one short lock, for
 * modules that need a lower bound for their next record on a hot path. */
uint64_t brk_store_log_end(brk_store *s);

#endif /* BROKER_STORE_H */
