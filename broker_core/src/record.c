/*
 * record.c - the commit-log record codec (pure: bytes in, views out).
 *
 * ON-DISK RECORD FORMAT, version 1
 * ================================
 * All integers little-endian (x86 and arm64 native order, so encoding is a
 * plain store on the hosts we run on).  Records are packed back to back in
 * a log segment with no padding; a record starts at any byte offset.
 *
 *   off  width  field         meaning
 *   ---  -----  ------------  ---------------------------------------------
 *     0  u32    len           whole record length, this field included
 *     4  u32    magic         BRK_REC_MAGIC 0x3158424F, bytes "OBX1"
 *     8  u32    crc           CRC-32C (crc32c.c) of bytes [48, len)
 *                               followed by bytes [12, 48), see below
 *    12  u8     version       BRK_REC_VERSION (1)
 *    13  u8     type          BRK_REC_MSG 1 / BRK_REC_HALF 2 / BRK_REC_OP 3
 *    14  u16    queue         queue id within the topic
 *    16  u64    log_offset    log offset at which this record starts
 *    24  u64    queue_offset  position within its queue
 *    32  i64    born_ms       producer timestamp, ms since the Unix epoch
 *    40  i64    store_ms      append timestamp, ms since the Unix epoch
 *    48  u8[16] msg_id        UUIDv7, stored as its 16 raw bytes
 *    64  u32    flags         BRK_RECF_* bits
 *    68  u16    topic_len     1..BRK_TOPIC_MAX
 *    70  u16    key_len       0..BRK_KEY_MAX
 *    72  u16    tag_len       0..BRK_TAG_MAX
 *    74  u16    reserved      must be 0
 *    76  u32    props_len     0..BRK_PROPS_MAX
 *    80  u32    body_len      0..BRK_BODY_MAX
 *    84  ...    topic bytes, key bytes, tag bytes, props block, body bytes,
 *               in that order, each exactly its *_len long
 *
 * A record is valid when ALL of these hold:
 *   - 84 <= len <= BRK_REC_MAX and len == 84 + topic_len + key_len
 *     + tag_len + props_len + body_len;
 *   - magic == BRK_REC_MAGIC, version == 1, type in {1, 2, 3},
 *     flags has no bit outside BRK_RECF_KNOWN, reserved == 0;
 *   - every variable field is within its limit (above) and the props block
 *     passes brk_props_validate (format below);
 *   - crc == CRC-32C of bytes [48, len) then bytes [12, 48);
 *   - log_offset equals the offset the reader found it at (when the reader
 *     says where that is).
 *
 * Why it looks like this:
 *   - len first, so a reader can size its read from 4 bytes and skip a
 *     record without parsing it; it counts itself so "next = here + len".
 *   - magic right after len catches a reader that is misaligned (reading
 *     from the middle of a record) or a zero-filled tail after 8 bytes.
 *   - The CRC covers every byte after itself (12 to len), so with magic
 *     checked by value and len by the sum rule no byte goes unchecked.  It
 *     runs over the part from msg_id on (48..len) first and the part the
 *     store fills in last (queue, log_offset, queue_offset, born/store
 *     times at 12..48) second: a producer thread checksums the big part
 *     outside the store's append lock, and the lock holder only extends it
 *     over 36 bytes (brk_record_encode_unsealed / brk_record_patch).
 *   - log_offset inside the record: after a truncate (torn tail, repair)
 *     the log reuses offsets, and a reused or preallocated file can still
 *     hold an older, perfectly CRC-valid record at that spot.  Comparing
 *     the stored offset with the offset it was read from rejects such stale
 *     bytes instead of resurrecting a message that was never acknowledged.
 *   - version and unknown-flag rejection: an older binary refuses a newer
 *     record instead of misreading it.  reserved must be 0 for the same
 *     reason: a future version can give it a meaning.
 *   - Fixed 84-byte header with lengths up front, payloads after: the
 *     consume queue and lookups need only the header, and the fields never
 *     need alignment (all access is memcpy-based).
 *
 * Decode outcomes (see record.h):
 *   - fewer than 4 bytes                         -> BRK_AGAIN
 *   - len outside [84, BRK_REC_MAX]              -> BRK_BADREC
 *   - 4..7 bytes (len plausible, magic unseen)   -> BRK_AGAIN
 *   - magic wrong                                -> BRK_BADREC
 *   - whole 84-byte header present but a header
 *     rule above fails (sum, version, type,
 *     flags, reserved, a field limit)            -> BRK_BADREC
 *   - otherwise fewer than len bytes             -> BRK_AGAIN
 *   - all len bytes present: the full rule list  -> BRK_OK or BRK_BADREC
 * Checking the header as soon as it is complete means AGAIN is returned
 * only for something that can still become a valid record, so a corrupt
 * header is reported as corruption, not as a torn tail to wait on.
 *
 * PROPERTIES BLOCK
 * ================
 *   u16 count, then count times { u16 key_len, key, u16 value_len, value },
 *   little-endian, key_len 1..255, value_len 0..65535, whole block at most
 *   BRK_PROPS_MAX bytes, no bytes after the last pair, keys pairwise
 *   distinct (byte comparison).  A block of length 0 means no properties
 *   and is what brk_props_encode writes for n == 0; a 2-byte block with
 *   count 0 is also accepted, since it says the same thing.
 *   Why u16 lengths: properties are small headers (trace ids, content
 *   types); the whole block is bounded by 64 KiB anyway.
 *
 * TAG HASH
 * ========
 * brk_tag_hash is 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime
 * 0x100000001b3) over the tag bytes.  The empty tag hashes to 0, and a
 * non-empty tag whose FNV-1a value happens to be 0 is mapped to 1, so 0
 * always means "no tag" in consume-queue entries.  The value is stored on
 * disk (consume queues), so this function must never change.  FNV-1a is
 * chosen for being tiny, dependency-free and good enough for short
 * strings; the hash only prefilters and the reader re-checks the real tag.
 */
#include "broker/record.h"

#include <string.h>

#include "broker/crc32c.h"
#include "le.h"

/* Header field offsets (the table above, as code). */
enum {
    OFF_LEN = 0,
    OFF_MAGIC = 4,
    OFF_CRC = 8,
    OFF_VERSION = 12,
    OFF_TYPE = 13,
    OFF_QUEUE = 14,
    OFF_LOG_OFFSET = 16,
    OFF_QUEUE_OFFSET = 24,
    OFF_BORN_MS = 32,
    OFF_STORE_MS = 40,
    OFF_MSG_ID = 48,
    OFF_FLAGS = 64,
    OFF_TOPIC_LEN = 68,
    OFF_KEY_LEN = 70,
    OFF_TAG_LEN = 72,
    OFF_RESERVED = 74,
    OFF_PROPS_LEN = 76,
    OFF_BODY_LEN = 80,
    OFF_PAYLOAD = 84,
    CRC_START = 12,     /* first byte covered by the CRC */
    CRC_TAIL = 48       /* the CRC runs over [48, len) first, then [12, 48) */
};

#define PROP_KEY_MAX 255u

/* ---- tag hash ------------------------------------------------------------ */

static uint64_t fnv1a64(const uint8_t *p, size_t len)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325);

    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= UINT64_C(0x100000001b3);
    }
    return h;
}

uint64_t brk_tag_hash(const void *tag, size_t len)
{
    uint64_t h;

    if (len == 0)
        return 0;
    h = fnv1a64(tag, len);
    return h == 0 ? 1 : h;
}

/* ---- properties ---------------------------------------------------------- */

static bool bytes_eq(brk_bytes a, brk_bytes b)
{
    return a.len == b.len && (a.len == 0 || memcmp(a.ptr, b.ptr, a.len) == 0);
}

/* Duplicate keys.  Almost every block holds a handful of pairs, which are
 * compared pairwise.  Above DUP_LINEAR_MAX pairs an open-addressing set is
 * used instead, because the decoder validates every record it reads and a
 * hostile block of 13106 one-byte keys would cost ~86M comparisons
 * pairwise.  The set lives on the stack (nothing here allocates): a block
 * of BRK_PROPS_MAX bytes holds at most PAIRS_MAX pairs (each pair is at
 * least u16 + 1-byte key + u16), so DUP_SLOTS_MAX slots keep the load under
 * 0.8.  Slots hold a non-zero u16 "handle" naming a key; the hashed paths
 * are noinline so their 32 KiB frame exists only while they run. */
#define DUP_LINEAR_MAX 16u
#define PAIRS_MAX      ((BRK_PROPS_MAX - 2u) / 5u)     /* 13106 */
#define DUP_SLOTS_MAX  16384u

typedef brk_bytes (*key_of_fn)(const void *ctx, uint16_t handle);

typedef struct keyset {
    size_t mask;                    /* slot count - 1, a power of two - 1 */
    key_of_fn key_of;               /* handle -> key bytes */
    const void *ctx;                /* for key_of */
    uint16_t slots[DUP_SLOTS_MAX];  /* 0 = empty, else a handle */
} keyset;

static void keyset_init(keyset *ks, size_t n, key_of_fn key_of,
                        const void *ctx)
{
    size_t cap = 16;

    while (cap < n + n / 4 + 1)
        cap *= 2;
    ks->mask = cap - 1;
    ks->key_of = key_of;
    ks->ctx = ctx;
    memset(ks->slots, 0, cap * sizeof ks->slots[0]);
}

/* Add a key; false when an equal key is already present. */
static bool keyset_add(keyset *ks, uint16_t handle)
{
    brk_bytes k = ks->key_of(ks->ctx, handle);
    size_t s = (size_t)fnv1a64(k.ptr, k.len) & ks->mask;

    while (ks->slots[s] != 0) {
        if (bytes_eq(ks->key_of(ks->ctx, ks->slots[s]), k))
            return false;
        s = (s + 1) & ks->mask;
    }
    ks->slots[s] = handle;
    return true;
}

/* Handles for a caller's pair array: index + 1. */
static brk_bytes array_key_of(const void *ctx, uint16_t handle)
{
    return ((const brk_prop *)ctx)[handle - 1u].key;
}

/* n <= PAIRS_MAX. */
__attribute__((noinline))
static bool array_has_dup_hashed(const brk_prop *props, size_t n)
{
    keyset ks;

    keyset_init(&ks, n, array_key_of, props);
    for (size_t i = 0; i < n; i++)
        if (!keyset_add(&ks, (uint16_t)(i + 1)))
            return true;
    return false;
}

static bool array_has_dup(const brk_prop *props, size_t n)
{
    if (n > DUP_LINEAR_MAX)
        return array_has_dup_hashed(props, n);
    for (size_t i = 1; i < n; i++)
        for (size_t j = 0; j < i; j++)
            if (bytes_eq(props[i].key, props[j].key))
                return true;
    return false;
}

/* Handles for an encoded block: the offset of a key's u16 length field
 * (>= 2, so never 0, and < 65535). */
static brk_bytes block_key_of(const void *ctx, uint16_t handle)
{
    const uint8_t *p = ctx;
    brk_bytes k = { p + handle + 2, brk_ld16(p + handle) };
    return k;
}

/* The block is already known to be well formed with `count` pairs. */
__attribute__((noinline))
static bool block_has_dup_hashed(const uint8_t *p, size_t count)
{
    keyset ks;
    size_t at = 2;

    keyset_init(&ks, count, block_key_of, p);
    for (size_t i = 0; i < count; i++) {
        if (!keyset_add(&ks, (uint16_t)at))
            return true;
        at += 2 + brk_ld16(p + at);         /* key */
        at += 2 + brk_ld16(p + at);         /* value */
    }
    return false;
}

/* Read the pair at *pos of the block p[len]; on success *pos moves past it.
 * Iteration and validation both use this, so they agree on what is
 * malformed. */
static brk_status props_read_pair(const uint8_t *p, size_t len, size_t *pos,
                                  brk_prop *out)
{
    size_t at = *pos;
    size_t klen, vlen;

    if (len - at < 2)
        return BRK_BADREC;
    klen = brk_ld16(p + at);
    at += 2;
    if (klen == 0 || klen > PROP_KEY_MAX || len - at < klen)
        return BRK_BADREC;
    out->key.ptr = p + at;
    out->key.len = klen;
    at += klen;
    if (len - at < 2)
        return BRK_BADREC;
    vlen = brk_ld16(p + at);
    at += 2;
    if (len - at < vlen)
        return BRK_BADREC;
    out->value.ptr = p + at;
    out->value.len = vlen;
    at += vlen;
    *pos = at;
    return BRK_OK;
}

/* Checks run as the header lists them: bad keys (INVAL) while sizing, the
 * size limit (TOOBIG), duplicates (INVAL), then room (RANGE).  buf is left
 * untouched unless everything but the copy has succeeded. */
brk_status brk_props_encode(const brk_prop *props, size_t n, void *buf,
                            size_t cap, size_t *len)
{
    uint8_t *p = buf;
    size_t need, at;

    if (len == NULL || (n > 0 && props == NULL))
        return BRK_INVAL;
    if (n == 0) {
        *len = 0;       /* the canonical "no properties" block */
        return BRK_OK;
    }

    need = 2;
    for (size_t i = 0; i < n; i++) {
        const brk_prop *pp = &props[i];
        if (pp->key.len == 0 || pp->key.len > PROP_KEY_MAX
            || pp->key.ptr == NULL
            || (pp->value.len > 0 && pp->value.ptr == NULL))
            return BRK_INVAL;
        /* Checked per pair so `need` cannot wrap; a value over 65535 could
         * not be framed either, but the limit it hits first is the block's. */
        if (pp->value.len > BRK_PROPS_MAX)
            return BRK_TOOBIG;
        need += 4 + pp->key.len + pp->value.len;
        if (need > BRK_PROPS_MAX)
            return BRK_TOOBIG;
    }
    /* need <= BRK_PROPS_MAX implies n <= PAIRS_MAX, as the set requires. */
    if (array_has_dup(props, n))
        return BRK_INVAL;
    if (buf == NULL || cap < need)
        return BRK_RANGE;

    brk_st16(p, (uint16_t)n);
    at = 2;
    for (size_t i = 0; i < n; i++) {
        brk_st16(p + at, (uint16_t)props[i].key.len);
        at += 2;
        memcpy(p + at, props[i].key.ptr, props[i].key.len);
        at += props[i].key.len;
        brk_st16(p + at, (uint16_t)props[i].value.len);
        at += 2;
        if (props[i].value.len > 0)
            memcpy(p + at, props[i].value.ptr, props[i].value.len);
        at += props[i].value.len;
    }
    *len = at;
    return BRK_OK;
}

/* The iteration cursor *pos is opaque to callers (they only start it at
 * 0): it packs the number of pairs already returned in bits 16 and up and
 * the byte offset of the next pair in bits 0..15 (offsets are < 65536
 * because the block is at most BRK_PROPS_MAX bytes; 0 stands for "just
 * after the count").  Carrying the pair count lets next() stop after
 * exactly `count` pairs and notice trailing bytes or a short block by
 * itself, so iterating a block never yields something validate would
 * call malformed - except duplicate keys, which only validate detects. */
#define CURSOR_OFF_BITS 16u
#define CURSOR_OFF_MASK ((size_t)0xFFFFu)

brk_status brk_props_next(brk_bytes block, size_t *pos, brk_prop *out)
{
    const uint8_t *p = block.ptr;
    size_t count, done, at;
    brk_prop pr;
    brk_status st;

    if (pos == NULL || out == NULL)
        return BRK_INVAL;
    if (block.len == 0)
        return BRK_EMPTY;
    if (p == NULL || block.len < 2 || block.len > BRK_PROPS_MAX)
        return BRK_BADREC;
    count = brk_ld16(p);
    done = *pos >> CURSOR_OFF_BITS;
    at = *pos & CURSOR_OFF_MASK;
    if (at == 0)
        at = 2;
    if (at > block.len || done > count)
        return BRK_BADREC;  /* not a cursor this function produced */
    if (done == count)
        return at == block.len ? BRK_EMPTY : BRK_BADREC;
    st = props_read_pair(p, block.len, &at, &pr);
    if (st != BRK_OK)
        return st;
    *pos = (done + 1) << CURSOR_OFF_BITS | at;
    *out = pr;
    return BRK_OK;
}

brk_status brk_props_validate(brk_bytes block)
{
    const uint8_t *p = block.ptr;
    uint16_t key_off[DUP_LINEAR_MAX];
    size_t count, at = 2;

    if (block.len == 0)
        return BRK_OK;
    if (p == NULL || block.len < 2 || block.len > BRK_PROPS_MAX)
        return BRK_BADREC;
    count = brk_ld16(p);
    if (count > PAIRS_MAX)
        return BRK_BADREC;  /* cannot fit; also bounds the set below */
    for (size_t i = 0; i < count; i++) {
        brk_prop pr;
        if (i < DUP_LINEAR_MAX)
            key_off[i] = (uint16_t)at;
        if (props_read_pair(p, block.len, &at, &pr) != BRK_OK)
            return BRK_BADREC;
    }
    if (at != block.len)
        return BRK_BADREC;  /* bytes after the last pair */

    if (count > DUP_LINEAR_MAX)
        return block_has_dup_hashed(p, count) ? BRK_BADREC : BRK_OK;
    for (size_t i = 1; i < count; i++)
        for (size_t j = 0; j < i; j++)
            if (bytes_eq(block_key_of(p, key_off[i]),
                         block_key_of(p, key_off[j])))
                return BRK_BADREC;
    return BRK_OK;
}

brk_status brk_props_get(brk_bytes block, const char *key, brk_bytes *value)
{
    size_t pos = 0, klen;
    brk_prop pr;
    brk_status st;

    if (key == NULL || value == NULL)
        return BRK_INVAL;
    klen = strlen(key);
    while ((st = brk_props_next(block, &pos, &pr)) == BRK_OK) {
        if (pr.key.len == klen && memcmp(pr.key.ptr, key, klen) == 0) {
            *value = pr.value;
            return BRK_OK;
        }
    }
    return st == BRK_EMPTY ? BRK_NOTFOUND : st;
}

bool brk_props_has_sys(brk_bytes block)
{
    size_t pos = 0;
    brk_prop pr;
    while (brk_props_next(block, &pos, &pr) == BRK_OK)
        if (pr.key.len > 0 && ((const char *)pr.key.ptr)[0] == BRK_SYSPROP_CHAR)
            return true;
    return false;
}

brk_status brk_props_strip_sys(brk_bytes block, void *buf, size_t cap,
                               size_t *len)
{
    size_t pos = 0, out = 2, kept = 0;
    uint8_t *p = buf;
    brk_prop pr;
    brk_status st;

    *len = 0;
    while ((st = brk_props_next(block, &pos, &pr)) == BRK_OK) {
        if (((const char *)pr.key.ptr)[0] == BRK_SYSPROP_CHAR)
            continue;
        size_t need = 4 + pr.key.len + pr.value.len;
        if (out + need > cap)
            return BRK_RANGE;
        brk_st16(p + out, (uint16_t)pr.key.len);
        memcpy(p + out + 2, pr.key.ptr, pr.key.len);
        out += 2 + pr.key.len;
        brk_st16(p + out, (uint16_t)pr.value.len);
        if (pr.value.len)
            memcpy(p + out + 2, pr.value.ptr, pr.value.len);
        out += 2 + pr.value.len;
        kept++;
    }
    if (st != BRK_EMPTY)
        return st;
    if (kept == 0)
        return BRK_OK;               /* an empty block is spelt len 0 */
    if (cap < 2)
        return BRK_RANGE;
    brk_st16(p, (uint16_t)kept);
    *len = out;
    return BRK_OK;
}

/* ---- topic names --------------------------------------------------------- */

bool brk_topic_name_valid(const char *name, size_t len, bool allow_internal)
{
    if (name == NULL || len == 0 || len > BRK_TOPIC_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        char c = name[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
               || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
        if (!ok)
            return false;
    }
    /* Topic names become directory names (cq/<topic>/), and the character
     * set allows dots: "." and ".." would name the cq directory itself or
     * its parent. */
    if ((len == 1 && name[0] == '.')
        || (len == 2 && name[0] == '.' && name[1] == '.'))
        return false;
    if (!allow_internal && len >= 2 && name[0] == '_' && name[1] == '_')
        return false;
    return true;
}

/* ---- records ------------------------------------------------------------- */

static bool fields_within_limits(const brk_record *r)
{
    return r->topic.len <= BRK_TOPIC_MAX && r->key.len <= BRK_KEY_MAX
        && r->tag.len <= BRK_TAG_MAX && r->props.len <= BRK_PROPS_MAX
        && r->body.len <= BRK_BODY_MAX;
}

static bool type_known(unsigned t)
{
    return t == BRK_REC_MSG || t == BRK_REC_HALF || t == BRK_REC_OP;
}

size_t brk_record_size(const brk_record *r)
{
    if (r == NULL || !fields_within_limits(r))
        return 0;
    return BRK_REC_HEADER_LEN + r->topic.len + r->key.len + r->tag.len
         + r->props.len + r->body.len;
}

static bool bytes_ok(brk_bytes b)
{
    return b.len == 0 || b.ptr != NULL;
}

static uint8_t *put_bytes(uint8_t *p, brk_bytes b)
{
    if (b.len > 0)
        memcpy(p, b.ptr, b.len);
    return p + b.len;
}

/* Checks run in the order the header lists the errors: limits (TOOBIG),
 * then content (INVAL), then room (RANGE).  The props block is validated
 * here too, since the decoder would reject a record carrying a bad one;
 * a malformed block is the caller's argument error, BRK_INVAL.  The
 * variable fields must not overlap buf. */
static brk_status encode_fields(const brk_record *r, void *buf, size_t cap,
                                size_t *len)
{
    uint8_t *p = buf;
    uint8_t *q;
    size_t size;

    if (r == NULL || len == NULL)
        return BRK_INVAL;
    size = brk_record_size(r);
    if (size == 0)
        return BRK_TOOBIG;
    if (r->topic.len == 0 || !type_known(r->type)
        || (r->flags & ~(uint32_t)BRK_RECF_KNOWN) != 0
        || !bytes_ok(r->topic) || !bytes_ok(r->key) || !bytes_ok(r->tag)
        || !bytes_ok(r->props) || !bytes_ok(r->body))
        return BRK_INVAL;
    if (brk_props_validate(r->props) != BRK_OK)
        return BRK_INVAL;
    if (buf == NULL || cap < size)
        return BRK_RANGE;

    brk_st32(p + OFF_LEN, (uint32_t)size);
    brk_st32(p + OFF_MAGIC, BRK_REC_MAGIC);
    brk_st32(p + OFF_CRC, 0);   /* sealed by encode or brk_record_patch */
    p[OFF_VERSION] = BRK_REC_VERSION;
    p[OFF_TYPE] = r->type;
    brk_st16(p + OFF_QUEUE, r->queue);
    brk_st64(p + OFF_LOG_OFFSET, r->log_offset);
    brk_st64(p + OFF_QUEUE_OFFSET, r->queue_offset);
    brk_st64(p + OFF_BORN_MS, (uint64_t)r->born_ms);
    brk_st64(p + OFF_STORE_MS, (uint64_t)r->store_ms);
    memcpy(p + OFF_MSG_ID, r->msg_id, BRK_UUID_LEN);
    brk_st32(p + OFF_FLAGS, r->flags);
    brk_st16(p + OFF_TOPIC_LEN, (uint16_t)r->topic.len);
    brk_st16(p + OFF_KEY_LEN, (uint16_t)r->key.len);
    brk_st16(p + OFF_TAG_LEN, (uint16_t)r->tag.len);
    brk_st16(p + OFF_RESERVED, 0);
    brk_st32(p + OFF_PROPS_LEN, (uint32_t)r->props.len);
    brk_st32(p + OFF_BODY_LEN, (uint32_t)r->body.len);

    q = p + OFF_PAYLOAD;
    q = put_bytes(q, r->topic);
    q = put_bytes(q, r->key);
    q = put_bytes(q, r->tag);
    q = put_bytes(q, r->props);
    put_bytes(q, r->body);

    *len = size;
    return BRK_OK;
}

/* The first CRC pass: bytes [CRC_TAIL, len). */
static uint32_t crc_tail(const uint8_t *p, size_t len)
{
    return brk_crc32c(0, p + CRC_TAIL, len - CRC_TAIL);
}

/* The second pass over the store-filled header bytes [12, 48). */
static uint32_t crc_seal(const uint8_t *p, uint32_t tail)
{
    return brk_crc32c(tail, p + CRC_START, CRC_TAIL - CRC_START);
}

brk_status brk_record_encode(const brk_record *r, void *buf, size_t cap,
                                size_t *len)
{
    brk_status st = encode_fields(r, buf, cap, len);
    if (st == BRK_OK)
        brk_st32((uint8_t *)buf + OFF_CRC,
                 crc_seal(buf, crc_tail(buf, *len)));
    return st;
}

brk_status brk_record_encode_unsealed(const brk_record *r, void *buf,
                                      size_t cap, size_t *len,
                                      uint32_t *tail_crc)
{
    brk_status st = encode_fields(r, buf, cap, len);
    if (st == BRK_OK)
        *tail_crc = crc_tail(buf, *len);
    return st;
}

uint32_t brk_record_peek_len(const void *buf, size_t avail)
{
    if (buf == NULL || avail < 4)
        return 0;
    return brk_ld32((const uint8_t *)buf + OFF_LEN);
}

/* The fixed-header rules that need no payload bytes: true when the 84-byte
 * header at p describes a record of exactly `len` bytes that a version-1
 * reader accepts. */
static bool header_consistent(const uint8_t *p, uint32_t len)
{
    uint64_t topic_len = brk_ld16(p + OFF_TOPIC_LEN);
    uint64_t key_len = brk_ld16(p + OFF_KEY_LEN);
    uint64_t tag_len = brk_ld16(p + OFF_TAG_LEN);
    uint64_t props_len = brk_ld32(p + OFF_PROPS_LEN);
    uint64_t body_len = brk_ld32(p + OFF_BODY_LEN);

    if (p[OFF_VERSION] != BRK_REC_VERSION || !type_known(p[OFF_TYPE]))
        return false;
    if ((brk_ld32(p + OFF_FLAGS) & ~(uint32_t)BRK_RECF_KNOWN) != 0)
        return false;
    if (brk_ld16(p + OFF_RESERVED) != 0)
        return false;
    if (topic_len == 0 || topic_len > BRK_TOPIC_MAX || key_len > BRK_KEY_MAX
        || tag_len > BRK_TAG_MAX || props_len > BRK_PROPS_MAX
        || body_len > BRK_BODY_MAX)
        return false;
    /* Each term is bounded above, so the 64-bit sum cannot wrap. */
    return (uint64_t)len == BRK_REC_HEADER_LEN + topic_len + key_len
                            + tag_len + props_len + body_len;
}

static brk_bytes take_bytes(const uint8_t **q, size_t n)
{
    brk_bytes b = { *q, n };
    *q += n;
    return b;
}

brk_status brk_record_decode(const void *buf, size_t avail,
                             uint64_t expect_offset, brk_record *r,
                                size_t *len)
{
    const uint8_t *p = buf;
    const uint8_t *q;
    uint32_t rlen;
    brk_record out;

    if (r == NULL || len == NULL || (buf == NULL && avail > 0))
        return BRK_INVAL;
    if (avail < 4)
        return BRK_AGAIN;
    rlen = brk_ld32(p + OFF_LEN);
    if (rlen < BRK_REC_HEADER_LEN || rlen > BRK_REC_MAX)
        return BRK_BADREC;
    if (avail < 8)
        return BRK_AGAIN;
    if (brk_ld32(p + OFF_MAGIC) != BRK_REC_MAGIC)
        return BRK_BADREC;
    if (avail >= BRK_REC_HEADER_LEN && !header_consistent(p, rlen))
        return BRK_BADREC;
    if (avail < rlen)
        return BRK_AGAIN;

    if (brk_ld32(p + OFF_CRC) != crc_seal(p, crc_tail(p, rlen)))
        return BRK_BADREC;

    out.type = p[OFF_TYPE];
    out.flags = brk_ld32(p + OFF_FLAGS);
    out.queue = brk_ld16(p + OFF_QUEUE);
    out.log_offset = brk_ld64(p + OFF_LOG_OFFSET);
    out.queue_offset = brk_ld64(p + OFF_QUEUE_OFFSET);
    out.born_ms = (int64_t)brk_ld64(p + OFF_BORN_MS);
    out.store_ms = (int64_t)brk_ld64(p + OFF_STORE_MS);
    memcpy(out.msg_id, p + OFF_MSG_ID, BRK_UUID_LEN);
    q = p + OFF_PAYLOAD;
    out.topic = take_bytes(&q, brk_ld16(p + OFF_TOPIC_LEN));
    out.key = take_bytes(&q, brk_ld16(p + OFF_KEY_LEN));
    out.tag = take_bytes(&q, brk_ld16(p + OFF_TAG_LEN));
    out.props = take_bytes(&q, brk_ld32(p + OFF_PROPS_LEN));
    out.body = take_bytes(&q, brk_ld32(p + OFF_BODY_LEN));

    /* After the CRC: a CRC-valid record with a bad block was written by a
     * buggy encoder, not damaged on disk, but it is still unreadable. */
    if (brk_props_validate(out.props) != BRK_OK)
        return BRK_BADREC;
    if (expect_offset != UINT64_MAX && out.log_offset != expect_offset)
        return BRK_BADREC;

    *r = out;
    *len = rlen;
    return BRK_OK;
}

void brk_record_patch(void *buf, uint16_t queue, uint64_t log_offset,
                      uint64_t queue_offset, int64_t store_ms,
                      uint32_t tail_crc)
{
    uint8_t *p = buf;
    brk_st16(p + OFF_QUEUE, queue);
    brk_st64(p + OFF_LOG_OFFSET, log_offset);
    brk_st64(p + OFF_QUEUE_OFFSET, queue_offset);
    brk_st64(p + OFF_STORE_MS, (uint64_t)store_ms);
    brk_st32(p + OFF_CRC, crc_seal(p, tail_crc));
}
