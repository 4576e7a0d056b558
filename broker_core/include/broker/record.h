/*
 * broker/record.h - the commit-log record codec.
 *
 * Pure functions: bytes in, structs out, no I/O (hiredis's reader is the
 * model).  The byte layout is documented at the top of src/record.c; this
 * header gives the limits and the view type.
 *
 * A brk_record is a *view*: its pointers refer to the buffer it was decoded
 * from (or to the caller's data when encoding) and are valid only as long
 * as that buffer is.  Nothing here allocates.
 */
#ifndef BROKER_RECORD_H
#define BROKER_RECORD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/status.h"
#include "broker/uuid.h"

#define BRK_REC_MAGIC        0x3158424Fu   /* "OBX1" read as little-endian u32 */
#define BRK_REC_VERSION      1
#define BRK_REC_HEADER_LEN   84            /* fixed part, see record.c */
#define BRK_TOPIC_MAX        127           /* bytes */
#define BRK_KEY_MAX          1024
#define BRK_TAG_MAX          255
#define BRK_PROPS_MAX        65535         /* encoded properties block */
#define BRK_BODY_MAX         (64u << 20)   /* hard ceiling; stores set lower */
#define BRK_REC_MAX          (BRK_REC_HEADER_LEN + BRK_TOPIC_MAX + BRK_KEY_MAX \
                              + BRK_TAG_MAX + BRK_PROPS_MAX + BRK_BODY_MAX)

/* Record types. */
enum {
    BRK_REC_MSG  = 1,    /* a message in a topic queue (also a delayed one
                            waiting in the internal delay topic) */
    BRK_REC_HALF = 2,    /* a transactional half message (txn.c) */
    BRK_REC_OP   = 3     /* a scheduler op record: transaction verdicts and
                            checks, delay firings (txn.c, delay.c) */
};

/* Flag bits (brk_record.flags).  Unknown bits are rejected by the decoder so
 * an old binary never misreads a newer record. */
enum {
    BRK_RECF_BODY_JSON = 1u << 0,   /* body holds compact JSON text */
    BRK_RECF_KNOWN     = BRK_RECF_BODY_JSON
};

typedef struct brk_bytes {
    const void *ptr;
    size_t len;
} brk_bytes;

typedef struct brk_record {
    uint8_t  type;                  /* BRK_REC_* */
    uint32_t flags;                 /* BRK_RECF_* */
    uint16_t queue;                 /* queue id within the topic */
    uint64_t log_offset;            /* where the record starts in the log */
    uint64_t queue_offset;          /* position in its queue */
    int64_t  born_ms;               /* producer time (ms since epoch) */
    int64_t  store_ms;              /* time the store appended it */
    uint8_t  msg_id[BRK_UUID_LEN];  /* UUIDv7 */
    brk_bytes topic;                /* 1..BRK_TOPIC_MAX bytes */
    brk_bytes key;                  /* 0..BRK_KEY_MAX */
    brk_bytes tag;                  /* 0..BRK_TAG_MAX */
    brk_bytes props;                /* encoded property block, see below */
    brk_bytes body;                 /* 0..BRK_BODY_MAX */
} brk_record;

/* Size the encoded record will take, or 0 when a field is over its limit. */
size_t brk_record_size(const brk_record *r);

/* Encode `r` into buf[cap].  BRK_TOOBIG when a field exceeds its limit,
 * BRK_INVAL for an empty topic or unknown type/flags, BRK_RANGE when cap is
 * too small.  On success *len is the record length (== brk_record_size). */
brk_status brk_record_encode(const brk_record *r, void *buf, size_t cap,
                             size_t *len);

/* Read only the length prefix of the record at buf (needs 4 bytes).  Returns
 * 0 when fewer than 4 bytes are available. */
uint32_t brk_record_peek_len(const void *buf, size_t avail);

/* Decode and fully validate one record at the start of buf[avail].
 *   BRK_OK      *r is filled (a view into buf), *len its length.
 *   BRK_AGAIN   buf holds a prefix of a plausible record: more bytes needed
 *               (at end of log this means a torn tail).
 *   BRK_BADREC  not a valid record: bad magic, version, lengths that do not
 *               add up, unknown type/flags, or a CRC mismatch.
 * `expect_offset` is compared with the stored log_offset unless it is
 * UINT64_MAX; a mismatch is BRK_BADREC (stale bytes from an older file). */
brk_status brk_record_decode(const void *buf, size_t avail,
                             uint64_t expect_offset, brk_record *r,
                             size_t *len);

/* Encode like brk_record_encode but leave the CRC unfinished: *tail_crc is
 * the first of its two passes (see record.c).  brk_record_patch finishes it
 * once the store knows the record's position.  Same errors as encode. */
brk_status brk_record_encode_unsealed(const brk_record *r, void *buf,
                                      size_t cap, size_t *len,
                                      uint32_t *tail_crc);

/* Fill in the fields only known under the store's append lock (queue,
 * log_offset, queue_offset, store_ms) of a record made by
 * brk_record_encode_unsealed, and finish its CRC from tail_crc.  Touches
 * 36 header bytes; cost does not depend on the record's size. */
void brk_record_patch(void *buf, uint16_t queue, uint64_t log_offset,
                      uint64_t queue_offset, int64_t store_ms,
                      uint32_t tail_crc);

/*
 * Properties (message headers) are a block of pairs:
 *   u16 count, then count x { u16 key_len, key, u16 value_len, value }
 * little-endian, keys 1..255 bytes, values 0..65535 bytes, the whole block
 * at most BRK_PROPS_MAX bytes, keys unique.  An empty block (len 0) means
 * no properties.
 */
typedef struct brk_prop {
    brk_bytes key;
    brk_bytes value;
} brk_prop;

/* Encode n pairs into buf[cap]; BRK_INVAL for an empty/over-long key or a
 * duplicate key, BRK_TOOBIG over BRK_PROPS_MAX, BRK_RANGE if cap is short. */
brk_status brk_props_encode(const brk_prop *props, size_t n, void *buf,
                            size_t cap, size_t *len);

/* Iterate an encoded block: start with *pos = 0; returns BRK_OK with the next
 * pair, BRK_EMPTY at the end, BRK_BADREC if the block is malformed. */
brk_status brk_props_next(brk_bytes block, size_t *pos, brk_prop *out);

/* Validate a whole block (the decoder calls this). */
brk_status brk_props_validate(brk_bytes block);

/* Find a key; BRK_NOTFOUND when absent. */
brk_status brk_props_get(brk_bytes block, const char *key, brk_bytes *value);

/*
 * System properties.  Records of the internal topics (half messages,
 * delayed messages, op records) carry their routing and scheduling data as
 * properties whose key starts with the byte 0x1F (ASCII unit separator),
 * e.g. "\x1ftopic".  No HTTP header name can hold that byte, so they never
 * collide with user headers; the store refuses them on a user write
 * (brk_append_req.allow_internal false), and the modules strip them when
 * they move a message into a user topic.
 */
#define BRK_SYSPROP_CHAR   '\x1f'

/* True when the block holds at least one system property. */
bool brk_props_has_sys(brk_bytes block);

/* Copy the user properties of `block` (all but the system ones) into
 * buf[cap]; *len is the new block's length (0 when none remain).
 * BRK_RANGE if cap is short (cap >= block.len always suffices). */
brk_status brk_props_strip_sys(brk_bytes block, void *buf, size_t cap,
                               size_t *len);

/* Topic names: 1..BRK_TOPIC_MAX bytes of [A-Za-z0-9._-], not "." or "..";
 * names starting with "__" are reserved for internal topics.  Returns true
 * when valid.  (The store is stricter: it also refuses a leading '.', since
 * topic names become directory names and hidden ones would surprise.) */
bool brk_topic_name_valid(const char *name, size_t len, bool allow_internal);

/* 64-bit hash of a tag for the consume queue (0 for an empty tag). */
uint64_t brk_tag_hash(const void *tag, size_t len);

#endif /* BROKER_RECORD_H */
