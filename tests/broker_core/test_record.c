/*
 * test_record.c - the commit-log record codec, properties blocks, topic
 * names and tag hashes.
 *
 * Decoding is checked on exact-size heap copies (dup_exact) wherever a
 * length is being tested, so AddressSanitizer catches any read past the
 * bytes the decoder was told it has.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker/crc32c.h"
#include "broker/record.h"

/* ---- helpers ------------------------------------------------------------- */

static uint8_t *dup_exact(const void *p, size_t n)
{
    /* For n == 0 glibc (and ASan) still hand back a unique zero-size block,
     * so even a read at index 0 is reported. */
    uint8_t *q = malloc(n);
    if (n > 0) {
        assert_non_null(q);
        memcpy(q, p, n);
    }
    return q;
}

static void put_le16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16
         | (uint32_t)p[3] << 24;
}

/* The CRC as record.c documents it: bytes [48, len), then [12, 48). */
static uint32_t doc_crc(const uint8_t *rec, size_t len)
{
    return brk_crc32c(brk_crc32c(0, rec + 48, len - 48), rec + 12, 36);
}

/* Re-seal a record after editing it, so a test reaches the rule it means
 * to test instead of stopping at the CRC. */
static void reseal(uint8_t *rec)
{
    uint32_t len = get_le32(rec);
    put_le32(rec + 8, doc_crc(rec, len));
}

static brk_bytes bs(const char *s)
{
    brk_bytes b = { s, strlen(s) };
    return b;
}

static brk_bytes bn(const void *p, size_t n)
{
    brk_bytes b = { p, n };
    return b;
}

static const uint8_t test_id[BRK_UUID_LEN] = {
    0x01, 0x8f, 0x3a, 0x4b, 0x5c, 0x6d, 0x7e, 0x0f,
    0x80, 0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6, 0x07,
};

/* A props block with two pairs: "trace"="abc", "empty"="". */
static size_t make_props(uint8_t *buf, size_t cap)
{
    brk_prop pr[2] = {
        { bs("trace"), bs("abc") },
        { bs("empty"), bn(NULL, 0) },
    };
    size_t len = 0;
    assert_int_equal(brk_props_encode(pr, 2, buf, cap, &len), BRK_OK);
    return len;
}

static brk_record full_record(const uint8_t *props, size_t props_len)
{
    static const uint8_t body[] = { 0x00, 0xFF, '{', '}', 0x00, 0x7F };
    brk_record r;

    memset(&r, 0, sizeof r);
    r.type = BRK_REC_MSG;
    r.flags = BRK_RECF_BODY_JSON;
    r.queue = 513;
    r.log_offset = UINT64_C(0x0102030405060708);
    r.queue_offset = UINT64_C(0xF0E0D0C0B0A09080);
    r.born_ms = -12345;                 /* signed field survives */
    r.store_ms = INT64_C(1700000000123);
    memcpy(r.msg_id, test_id, sizeof test_id);
    r.topic = bs("orders.created");
    r.key = bs("customer-42");
    r.tag = bs("TagA");
    r.props = bn(props, props_len);
    r.body = bn(body, sizeof body);
    return r;
}

/* Encode `r` into a fresh exact-size heap buffer. */
static uint8_t *encode_new(const brk_record *r, size_t *len)
{
    size_t size = brk_record_size(r);
    assert_true(size >= BRK_REC_HEADER_LEN);
    uint8_t *buf = malloc(size);
    assert_non_null(buf);
    assert_int_equal(brk_record_encode(r, buf, size, len), BRK_OK);
    assert_int_equal(*len, size);
    return buf;
}

static void assert_bytes_equal(brk_bytes got, brk_bytes want)
{
    assert_int_equal(got.len, want.len);
    if (want.len > 0)
        assert_memory_equal(got.ptr, want.ptr, want.len);
}

static void assert_record_equal(const brk_record *got, const brk_record *want)
{
    assert_int_equal(got->type, want->type);
    assert_int_equal(got->flags, want->flags);
    assert_int_equal(got->queue, want->queue);
    assert_int_equal(got->log_offset, want->log_offset);
    assert_int_equal(got->queue_offset, want->queue_offset);
    assert_true(got->born_ms == want->born_ms);
    assert_true(got->store_ms == want->store_ms);
    assert_memory_equal(got->msg_id, want->msg_id, BRK_UUID_LEN);
    assert_bytes_equal(got->topic, want->topic);
    assert_bytes_equal(got->key, want->key);
    assert_bytes_equal(got->tag, want->tag);
    assert_bytes_equal(got->props, want->props);
    assert_bytes_equal(got->body, want->body);
}

/* Decode an exact-size copy of rec[0..avail). */
static brk_status decode_exact(const uint8_t *rec, size_t avail,
                               uint64_t expect)
{
    uint8_t *copy = dup_exact(rec, avail);
    brk_record r;
    size_t len = 0;
    brk_status st = brk_record_decode(copy, avail, expect, &r, &len);
    free(copy);
    return st;
}

/* ---- records: round trips ------------------------------------------------ */

static void record_round_trip_preserves_all_fields(void **state)
{
    uint8_t props[64];
    size_t plen = make_props(props, sizeof props);
    brk_record in = full_record(props, plen), out;
    uint8_t store[512];
    size_t len = 0, dlen = 0;

    (void)state;
    /* Encode at an odd address: every field access must be alignment-free. */
    uint8_t *buf = store + 3;
    assert_int_equal(brk_record_encode(&in, buf, sizeof store - 3, &len),
                     BRK_OK);
    assert_int_equal(len, brk_record_size(&in));
    assert_int_equal(len, BRK_REC_HEADER_LEN + 14 + 11 + 4 + plen + 6);

    assert_int_equal(brk_record_decode(buf, len, in.log_offset, &out, &dlen),
                     BRK_OK);
    assert_int_equal(dlen, len);
    assert_record_equal(&out, &in);
    /* Views point into the decoded buffer, not copies. */
    assert_ptr_equal(out.topic.ptr, buf + BRK_REC_HEADER_LEN);
    assert_ptr_equal((const uint8_t *)out.body.ptr + out.body.len, buf + len);
}

static void record_round_trip_with_empty_key_tag_props_body(void **state)
{
    brk_record in, out;
    uint8_t buf[128];
    size_t len = 0, dlen = 0;

    (void)state;
    memset(&in, 0, sizeof in);
    in.type = BRK_REC_MSG;
    in.topic = bs("t");
    in.log_offset = 4096;
    assert_int_equal(brk_record_size(&in), BRK_REC_HEADER_LEN + 1);
    assert_int_equal(brk_record_encode(&in, buf, sizeof buf, &len), BRK_OK);
    assert_int_equal(len, BRK_REC_HEADER_LEN + 1);
    assert_int_equal(brk_record_decode(buf, len, 4096, &out, &dlen), BRK_OK);
    assert_int_equal(dlen, len);
    assert_record_equal(&out, &in);
    assert_int_equal(out.key.len, 0);
    assert_int_equal(out.tag.len, 0);
    assert_int_equal(out.props.len, 0);
    assert_int_equal(out.body.len, 0);
}

static void record_encodes_documented_byte_layout(void **state)
{
    uint8_t props[64];
    size_t plen = make_props(props, sizeof props);
    brk_record in = full_record(props, plen);
    uint8_t buf[512];
    size_t len = 0;

    (void)state;
    assert_int_equal(brk_record_encode(&in, buf, sizeof buf, &len), BRK_OK);
    /* The offsets written at the top of record.c, checked byte by byte. */
    assert_int_equal(get_le32(buf + 0), len);
    assert_memory_equal(buf + 4, "OBX1", 4);
    assert_int_equal(get_le32(buf + 8), doc_crc(buf, len));
    assert_int_equal(buf[12], 1);
    assert_int_equal(buf[13], BRK_REC_MSG);
    assert_int_equal(buf[14], 513 & 0xFF);
    assert_int_equal(buf[15], 513 >> 8);
    assert_int_equal(buf[16], 0x08);                /* log_offset LSB */
    assert_int_equal(buf[23], 0x01);                /* log_offset MSB */
    assert_int_equal(buf[24], 0x80);                /* queue_offset LSB */
    assert_int_equal(buf[31], 0xF0);
    assert_int_equal(buf[32], (uint8_t)(-12345 & 0xFF));
    assert_int_equal(buf[39], 0xFF);                /* negative: sign bytes */
    assert_memory_equal(buf + 48, test_id, 16);
    assert_int_equal(get_le32(buf + 64), BRK_RECF_BODY_JSON);
    assert_int_equal(buf[68], 14);                  /* topic_len */
    assert_int_equal(buf[70], 11);                  /* key_len */
    assert_int_equal(buf[72], 4);                   /* tag_len */
    assert_int_equal(buf[74] | buf[75], 0);         /* reserved */
    assert_int_equal(get_le32(buf + 76), plen);
    assert_int_equal(get_le32(buf + 80), 6);
    assert_memory_equal(buf + 84, "orders.created", 14);
    assert_memory_equal(buf + 98, "customer-42", 11);
    assert_memory_equal(buf + 109, "TagA", 4);
    assert_memory_equal(buf + 113, props, plen);
}

static void record_round_trip_at_every_field_limit(void **state)
{
    /* One record with every field at its maximum is exactly BRK_REC_MAX
     * long: the decoder's upper bound must admit it. */
    static char topic[BRK_TOPIC_MAX], key[BRK_KEY_MAX], tag[BRK_TAG_MAX];
    static uint8_t props[BRK_PROPS_MAX];
    brk_prop one;
    size_t plen = 0, len = 0, dlen = 0;
    brk_record in, out;

    (void)state;
    memset(topic, 'T', sizeof topic);
    memset(key, 'k', sizeof key);
    memset(tag, 'g', sizeof tag);
    uint8_t *body = malloc(BRK_BODY_MAX);
    assert_non_null(body);
    memset(body, 0x5A, BRK_BODY_MAX);
    /* One pair filling the block: 2 (count) + 2 + 1 + 2 + value. */
    one.key = bs("v");
    one.value = bn(body, BRK_PROPS_MAX - 7);
    assert_int_equal(brk_props_encode(&one, 1, props, sizeof props, &plen),
                     BRK_OK);
    assert_int_equal(plen, BRK_PROPS_MAX);

    memset(&in, 0, sizeof in);
    in.type = BRK_REC_OP;
    in.topic = bn(topic, sizeof topic);
    in.key = bn(key, sizeof key);
    in.tag = bn(tag, sizeof tag);
    in.props = bn(props, plen);
    in.body = bn(body, BRK_BODY_MAX);
    assert_int_equal(brk_record_size(&in), BRK_REC_MAX);

    uint8_t *buf = encode_new(&in, &len);
    assert_int_equal(len, BRK_REC_MAX);
    assert_int_equal(brk_record_decode(buf, len, 0, &out, &dlen), BRK_OK);
    assert_int_equal(dlen, BRK_REC_MAX);
    assert_record_equal(&out, &in);
    free(buf);
    free(body);
}

static void record_decodes_back_to_back_records(void **state)
{
    brk_record a, b, out;
    uint8_t buf[256];
    size_t la = 0, lb = 0, dlen = 0;

    (void)state;
    memset(&a, 0, sizeof a);
    a.type = BRK_REC_MSG;
    a.topic = bs("alpha");
    a.body = bs("first");
    a.log_offset = 1000;
    assert_int_equal(brk_record_encode(&a, buf, sizeof buf, &la), BRK_OK);
    b = a;
    b.topic = bs("beta");
    b.body = bs("second body");
    b.log_offset = 1000 + la;
    assert_int_equal(brk_record_encode(&b, buf + la, sizeof buf - la, &lb),
                     BRK_OK);

    /* Extra bytes after a record are the next record's business. */
    assert_int_equal(brk_record_decode(buf, la + lb, 1000, &out, &dlen),
                     BRK_OK);
    assert_int_equal(dlen, la);
    assert_bytes_equal(out.body, bs("first"));
    assert_int_equal(brk_record_decode(buf + dlen, la + lb - dlen, 1000 + dlen,
                                       &out, &dlen), BRK_OK);
    assert_int_equal(dlen, lb);
    assert_bytes_equal(out.topic, bs("beta"));
    assert_bytes_equal(out.body, bs("second body"));
}

static void record_types_half_and_op_round_trip(void **state)
{
    brk_record in, out;
    uint8_t buf[128];
    size_t len = 0, dlen = 0;

    (void)state;
    memset(&in, 0, sizeof in);
    in.topic = bs("t");
    for (uint8_t t = BRK_REC_MSG; t <= BRK_REC_OP; t++) {
        in.type = t;
        assert_int_equal(brk_record_encode(&in, buf, sizeof buf, &len), BRK_OK);
        assert_int_equal(brk_record_decode(buf, len, UINT64_MAX, &out, &dlen),
                         BRK_OK);
        assert_int_equal(out.type, t);
    }
}

/* ---- records: encode errors ---------------------------------------------- */

static void record_size_is_zero_when_a_field_is_over_limit(void **state)
{
    brk_record r;
    static const char big = 'x';    /* never read: lengths alone decide */

    (void)state;
    memset(&r, 0, sizeof r);
    r.type = BRK_REC_MSG;
    r.topic = bs("t");
    assert_int_equal(brk_record_size(&r), BRK_REC_HEADER_LEN + 1);

    r.body = bn(&big, BRK_BODY_MAX);
    assert_int_equal(brk_record_size(&r), BRK_REC_HEADER_LEN + 1 + BRK_BODY_MAX);
    r.body = bn(&big, BRK_BODY_MAX + 1);
    assert_int_equal(brk_record_size(&r), 0);
    r.body = bn(NULL, 0);
    r.topic = bn(&big, BRK_TOPIC_MAX + 1);
    assert_int_equal(brk_record_size(&r), 0);
    assert_int_equal(brk_record_size(NULL), 0);
}

static void record_encode_rejects_each_over_limit_field(void **state)
{
    static uint8_t big[BRK_PROPS_MAX + 1];
    brk_record base, r;
    uint8_t buf[256];
    size_t len = 77;

    (void)state;
    memset(&base, 0, sizeof base);
    base.type = BRK_REC_MSG;
    base.topic = bs("t");

    r = base; r.topic = bn(big, BRK_TOPIC_MAX + 1);
    assert_int_equal(brk_record_encode(&r, buf, sizeof buf, &len), BRK_TOOBIG);
    r = base; r.key = bn(big, BRK_KEY_MAX + 1);
    assert_int_equal(brk_record_encode(&r, buf, sizeof buf, &len), BRK_TOOBIG);
    r = base; r.tag = bn(big, BRK_TAG_MAX + 1);
    assert_int_equal(brk_record_encode(&r, buf, sizeof buf, &len), BRK_TOOBIG);
    r = base; r.props = bn(big, BRK_PROPS_MAX + 1);
    assert_int_equal(brk_record_encode(&r, buf, sizeof buf, &len), BRK_TOOBIG);
    /* Never read: the length alone is over the limit. */
    r = base; r.body = bn(big, (size_t)BRK_BODY_MAX + 1);
    assert_int_equal(brk_record_encode(&r, buf, sizeof buf, &len), BRK_TOOBIG);

    /* TOOBIG wins over a small buffer: the caller learns the real problem. */
    r = base; r.key = bn(big, BRK_KEY_MAX + 1);
    assert_int_equal(brk_record_encode(&r, buf, 10, &len), BRK_TOOBIG);
    assert_int_equal(len, 77);      /* untouched on failure */
}

static void record_encode_rejects_bad_type_flags_and_empty_topic(void **state)
{
    static const uint8_t bad_types[] = { 0, 4, 0x80, 0xFF };
    static const uint32_t bad_flags[] = { 1u << 1, 1u << 31,
                                          BRK_RECF_BODY_JSON | 1u << 7 };
    brk_record base, r;
    uint8_t buf[256];
    size_t len = 0;

    (void)state;
    memset(&base, 0, sizeof base);
    base.type = BRK_REC_MSG;
    base.topic = bs("t");
    assert_int_equal(brk_record_encode(&base, buf, sizeof buf, &len), BRK_OK);

    for (size_t i = 0; i < sizeof bad_types; i++) {
        r = base;
        r.type = bad_types[i];
        assert_int_equal(brk_record_encode(&r, buf, sizeof buf, &len),
                         BRK_INVAL);
    }
    for (size_t i = 0; i < sizeof bad_flags / sizeof bad_flags[0]; i++) {
        r = base;
        r.flags = bad_flags[i];
        assert_int_equal(brk_record_encode(&r, buf, sizeof buf, &len),
                         BRK_INVAL);
    }
    r = base;
    r.topic = bn("", 0);
    assert_int_equal(brk_record_encode(&r, buf, sizeof buf, &len), BRK_INVAL);
    /* A length with no bytes behind it. */
    r = base;
    r.body = bn(NULL, 3);
    assert_int_equal(brk_record_encode(&r, buf, sizeof buf, &len), BRK_INVAL);
}

static void record_encode_rejects_malformed_props_block(void **state)
{
    /* count says 1 pair but the block ends after the count. */
    static const uint8_t bad_props[] = { 0x01, 0x00 };
    brk_record r;
    uint8_t buf[256];
    size_t len = 0;

    (void)state;
    memset(&r, 0, sizeof r);
    r.type = BRK_REC_MSG;
    r.topic = bs("t");
    r.props = bn(bad_props, sizeof bad_props);
    /* The decoder would refuse this record, so the encoder must not make it. */
    assert_int_equal(brk_record_encode(&r, buf, sizeof buf, &len), BRK_INVAL);
}

static void record_encode_reports_short_buffer(void **state)
{
    uint8_t props[64];
    size_t plen = make_props(props, sizeof props);
    brk_record in = full_record(props, plen);
    size_t size = brk_record_size(&in), len = 0;
    uint8_t *buf = malloc(size);

    (void)state;
    assert_non_null(buf);
    assert_int_equal(brk_record_encode(&in, buf, size - 1, &len), BRK_RANGE);
    assert_int_equal(brk_record_encode(&in, NULL, 0, &len), BRK_RANGE);
    assert_int_equal(brk_record_encode(&in, buf, size, &len), BRK_OK);
    assert_int_equal(len, size);
    free(buf);
}

/* ---- records: decode errors ---------------------------------------------- */

static void record_peek_len_reads_only_the_prefix(void **state)
{
    uint8_t b[4] = { 0x55, 0x00, 0x00, 0x00 };

    (void)state;
    assert_int_equal(brk_record_peek_len(b, 3), 0);
    assert_int_equal(brk_record_peek_len(b, 0), 0);
    assert_int_equal(brk_record_peek_len(b, 4), 0x55);
    put_le32(b, 0xDEADBEEFu);   /* peek does not judge plausibility */
    assert_int_equal(brk_record_peek_len(b, 4), 0xDEADBEEFu);
}

static void decode_returns_again_for_every_strict_prefix(void **state)
{
    uint8_t props[64];
    size_t plen = make_props(props, sizeof props);
    brk_record in = full_record(props, plen);
    size_t len = 0;
    uint8_t *rec = encode_new(&in, &len);

    (void)state;
    for (size_t avail = 0; avail < len; avail++)
        assert_int_equal(decode_exact(rec, avail, in.log_offset), BRK_AGAIN);
    assert_int_equal(decode_exact(rec, len, in.log_offset), BRK_OK);
    free(rec);
}

static void decode_rejects_every_single_bit_flip(void **state)
{
    uint8_t props[64];
    size_t plen = make_props(props, sizeof props);
    brk_record in = full_record(props, plen);
    size_t len = 0;
    uint8_t *rec = encode_new(&in, &len);
    uint8_t *copy = malloc(len);
    unsigned badrec = 0, again = 0;

    (void)state;
    assert_non_null(copy);
    for (size_t bit = 0; bit < len * 8; bit++) {
        memcpy(copy, rec, len);
        copy[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        brk_record out;
        size_t dlen = 0;
        brk_status st = brk_record_decode(copy, len, in.log_offset, &out,
                                          &dlen);
        assert_int_not_equal(st, BRK_OK);
        if (st == BRK_AGAIN) {
            /* Only a len field that now claims more bytes may wait. */
            assert_true(bit < 32);
            assert_true(get_le32(copy) > len);
            again++;
        } else {
            assert_int_equal(st, BRK_BADREC);
            badrec++;
        }
        /* Same with the expectation switched off: the CRC alone must hold. */
        st = brk_record_decode(copy, len, UINT64_MAX, &out, &dlen);
        assert_int_not_equal(st, BRK_OK);
    }
    assert_int_equal(badrec + again, len * 8);
    free(copy);
    free(rec);
}

static void decode_rejects_flipped_body_byte(void **state)
{
    uint8_t props[64];
    size_t plen = make_props(props, sizeof props);
    brk_record in = full_record(props, plen);
    size_t len = 0;
    uint8_t *rec = encode_new(&in, &len);

    (void)state;
    rec[len - 1] ^= 0xFF;
    assert_int_equal(decode_exact(rec, len, in.log_offset), BRK_BADREC);
    rec[len - 1] ^= 0xFF;
    assert_int_equal(decode_exact(rec, len, in.log_offset), BRK_OK);
    free(rec);
}

static void decode_rejects_stale_log_offset(void **state)
{
    uint8_t props[64];
    size_t plen = make_props(props, sizeof props);
    brk_record in = full_record(props, plen);
    size_t len = 0;
    uint8_t *rec = encode_new(&in, &len);

    (void)state;
    /* A valid, CRC-correct record read at another offset is stale bytes. */
    assert_int_equal(decode_exact(rec, len, in.log_offset + 1), BRK_BADREC);
    assert_int_equal(decode_exact(rec, len, 0), BRK_BADREC);
    assert_int_equal(decode_exact(rec, len, in.log_offset), BRK_OK);
    assert_int_equal(decode_exact(rec, len, UINT64_MAX), BRK_OK);
    free(rec);
}

static void unsealed_encode_plus_patch_equals_full_encode(void **state)
{
    uint8_t props[64];
    size_t plen = make_props(props, sizeof props);
    brk_record in = full_record(props, plen);
    uint8_t a[512], b[512];
    size_t la = 0, lb = 0;
    uint32_t tail = 0;

    (void)state;
    assert_int_equal(brk_record_encode(&in, a, sizeof a, &la), BRK_OK);
    brk_record blank = in;
    blank.queue = 0;
    blank.log_offset = 0;
    blank.queue_offset = 0;
    blank.store_ms = 0;
    assert_int_equal(brk_record_encode_unsealed(&blank, b, sizeof b, &lb, &tail),
                     BRK_OK);
    assert_int_equal(la, lb);
    assert_int_equal(decode_exact(b, lb, UINT64_MAX), BRK_BADREC);  /* unsealed */
    brk_record_patch(b, in.queue, in.log_offset, in.queue_offset, in.store_ms, tail);
    assert_memory_equal(a, b, la);
    assert_int_equal(decode_exact(b, lb, in.log_offset), BRK_OK);
}

static void decode_rejects_nonzero_reserved_even_with_valid_crc(void **state)
{
    uint8_t props[64];
    size_t plen = make_props(props, sizeof props);
    brk_record in = full_record(props, plen);
    size_t len = 0;
    uint8_t *rec = encode_new(&in, &len);

    (void)state;
    reseal(rec);    /* control: resealing an untouched record changes nothing */
    assert_int_equal(decode_exact(rec, len, in.log_offset), BRK_OK);
    put_le16(rec + 74, 1);
    reseal(rec);
    assert_int_equal(decode_exact(rec, len, in.log_offset), BRK_BADREC);
    put_le16(rec + 74, 0x8000);
    reseal(rec);
    assert_int_equal(decode_exact(rec, len, in.log_offset), BRK_BADREC);
    free(rec);
}

/* Each header rule is enforced on its own, not only through the CRC. */
static void decode_rejects_header_rule_violations_with_valid_crc(void **state)
{
    uint8_t props[64];
    size_t plen = make_props(props, sizeof props);
    brk_record in = full_record(props, plen);
    size_t len = 0;
    uint8_t *rec = encode_new(&in, &len);
    uint8_t *copy = malloc(len);

    (void)state;
    assert_non_null(copy);
#define EDIT_EXPECT_BADREC(edit)                                             \
    do {                                                                     \
        memcpy(copy, rec, len);                                              \
        edit;                                                                \
        reseal(copy);                                                        \
        assert_int_equal(decode_exact(copy, len, UINT64_MAX), BRK_BADREC);   \
    } while (0)

    EDIT_EXPECT_BADREC(copy[12] = 2);                       /* version */
    EDIT_EXPECT_BADREC(copy[12] = 0);
    EDIT_EXPECT_BADREC(copy[13] = 0);                       /* type */
    EDIT_EXPECT_BADREC(copy[13] = 4);
    EDIT_EXPECT_BADREC(put_le32(copy + 64, 1u << 1));       /* unknown flag */
    EDIT_EXPECT_BADREC(put_le32(copy + 64, 1u << 31));
    /* Empty topic with its bytes handed to the key: the sum still matches,
     * only the topic_len >= 1 rule catches it. */
    EDIT_EXPECT_BADREC((put_le16(copy + 68, 0), put_le16(copy + 70, 25)));
    /* Sum no longer matches len. */
    EDIT_EXPECT_BADREC(put_le32(copy + 80, 7));
    EDIT_EXPECT_BADREC(put_le16(copy + 72, 3));
    /* Props block with a duplicated key: rename "empty" to "trace", a
     * CRC-valid record that the props rule alone rejects. */
    EDIT_EXPECT_BADREC({
        uint8_t *pb = copy + BRK_REC_HEADER_LEN + 14 + 11 + 4;
        uint8_t *second = pb + 2 + 2 + 5 + 2 + 3 + 2;
        assert_memory_equal(second, "empty", 5);
        memcpy(second, "trace", 5);
    });
#undef EDIT_EXPECT_BADREC
    free(copy);
    free(rec);
}

/* The rules for short inputs, spelled out. */
static void decode_judges_len_and_magic_as_soon_as_they_arrive(void **state)
{
    uint8_t b[BRK_REC_HEADER_LEN];
    brk_record r;
    size_t len = 0;

    (void)state;
    memset(b, 0, sizeof b);
    assert_int_equal(brk_record_decode(b, 0, UINT64_MAX, &r, &len), BRK_AGAIN);
    assert_int_equal(brk_record_decode(b, 3, UINT64_MAX, &r, &len), BRK_AGAIN);

    /* 4..7 bytes: len alone decides. */
    put_le32(b, 83);
    for (size_t n = 4; n < 8; n++)
        assert_int_equal(decode_exact(b, n, UINT64_MAX), BRK_BADREC);
    put_le32(b, (uint32_t)BRK_REC_MAX + 1);
    for (size_t n = 4; n < 8; n++)
        assert_int_equal(decode_exact(b, n, UINT64_MAX), BRK_BADREC);
    put_le32(b, 0);     /* a zero-filled tail is not a torn record */
    assert_int_equal(decode_exact(b, 4, UINT64_MAX), BRK_BADREC);
    put_le32(b, 100);
    for (size_t n = 4; n < 8; n++)
        assert_int_equal(decode_exact(b, n, UINT64_MAX), BRK_AGAIN);
    put_le32(b, (uint32_t)BRK_REC_MAX);
    assert_int_equal(decode_exact(b, 7, UINT64_MAX), BRK_AGAIN);

    /* From 8 bytes on, a wrong magic is final. */
    put_le32(b, 100);
    put_le32(b + 4, BRK_REC_MAGIC ^ 1u);
    assert_int_equal(decode_exact(b, 8, UINT64_MAX), BRK_BADREC);
    put_le32(b + 4, BRK_REC_MAGIC);
    assert_int_equal(decode_exact(b, 8, UINT64_MAX), BRK_AGAIN);

    /* A complete header that cannot be valid (version 0, lengths 0) is
     * reported at once rather than waited on. */
    assert_int_equal(decode_exact(b, BRK_REC_HEADER_LEN, UINT64_MAX),
                     BRK_BADREC);
}

static void decode_rejects_record_longer_than_len_claims(void **state)
{
    brk_record in;
    uint8_t buf[128];
    size_t len = 0;

    (void)state;
    memset(&in, 0, sizeof in);
    in.type = BRK_REC_MSG;
    in.topic = bs("topic");
    in.body = bs("abcd");
    assert_int_equal(brk_record_encode(&in, buf, sizeof buf, &len), BRK_OK);
    /* Shrinking len (and resealing over the shorter range) breaks the sum
     * rule: the decoder must not trust len alone. */
    put_le32(buf, (uint32_t)len - 1);
    reseal(buf);
    assert_int_equal(decode_exact(buf, len, UINT64_MAX), BRK_BADREC);
}

/* ---- properties ---------------------------------------------------------- */

static void props_encode_iterate_and_get_round_trip(void **state)
{
    static const uint8_t bin[] = { 0, 1, 2, 0xFF };
    brk_prop in[3] = {
        { bs("content-type"), bs("application/json") },
        { bs("bin"), bn(bin, sizeof bin) },
        { bs("e"), bn(NULL, 0) },
    };
    uint8_t buf[128];
    size_t len = 0, pos = 0;
    brk_prop p;
    brk_bytes v;

    (void)state;
    assert_int_equal(brk_props_encode(in, 3, buf, sizeof buf, &len), BRK_OK);
    assert_int_equal(len, 2 + (4 + 12 + 16) + (4 + 3 + 4) + (4 + 1 + 0));
    assert_int_equal(buf[0], 3);    /* u16 count, little-endian */
    assert_int_equal(buf[1], 0);
    assert_int_equal(buf[2], 12);   /* first key_len */

    brk_bytes block = bn(buf, len);
    assert_int_equal(brk_props_validate(block), BRK_OK);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(brk_props_next(block, &pos, &p), BRK_OK);
        assert_bytes_equal(p.key, in[i].key);
        assert_bytes_equal(p.value, in[i].value);
    }
    assert_int_equal(brk_props_next(block, &pos, &p), BRK_EMPTY);
    assert_int_equal(brk_props_next(block, &pos, &p), BRK_EMPTY);

    assert_int_equal(brk_props_get(block, "bin", &v), BRK_OK);
    assert_bytes_equal(v, bn(bin, sizeof bin));
    assert_int_equal(brk_props_get(block, "e", &v), BRK_OK);
    assert_int_equal(v.len, 0);
    assert_int_equal(brk_props_get(block, "content-type", &v), BRK_OK);
    assert_bytes_equal(v, bs("application/json"));
    assert_int_equal(brk_props_get(block, "content", &v), BRK_NOTFOUND);
    assert_int_equal(brk_props_get(block, "bins", &v), BRK_NOTFOUND);
}

static void props_empty_block_means_no_properties(void **state)
{
    uint8_t buf[4] = { 0xEE, 0xEE, 0xEE, 0xEE };
    static const uint8_t zero_count[2] = { 0, 0 };
    size_t len = 99, pos = 0;
    brk_prop p;
    brk_bytes v;

    (void)state;
    assert_int_equal(brk_props_encode(NULL, 0, buf, sizeof buf, &len), BRK_OK);
    assert_int_equal(len, 0);
    assert_int_equal(brk_props_validate(bn(NULL, 0)), BRK_OK);
    assert_int_equal(brk_props_next(bn(NULL, 0), &pos, &p), BRK_EMPTY);
    assert_int_equal(brk_props_get(bn(NULL, 0), "a", &v), BRK_NOTFOUND);
    /* An explicit count of 0 says the same thing. */
    pos = 0;
    assert_int_equal(brk_props_validate(bn(zero_count, 2)), BRK_OK);
    assert_int_equal(brk_props_next(bn(zero_count, 2), &pos, &p), BRK_EMPTY);
}

static void props_encode_rejects_duplicate_keys(void **state)
{
    enum { MANY = 300 };
    static brk_prop many[MANY];
    static char names[MANY][8];
    static uint8_t buf[BRK_PROPS_MAX];
    brk_prop two[3] = {
        { bs("a"), bs("1") }, { bs("b"), bs("2") }, { bs("a"), bs("3") },
    };
    size_t len = 0;

    (void)state;
    assert_int_equal(brk_props_encode(two, 3, buf, sizeof buf, &len),
                     BRK_INVAL);
    /* Above the pairwise threshold the hashed check runs: it must accept
     * distinct keys and catch a single repeat. */
    for (int i = 0; i < MANY; i++) {
        int n = snprintf(names[i], sizeof names[i], "k%d", i);
        many[i].key = bn(names[i], (size_t)n);
        many[i].value = bn(NULL, 0);
    }
    assert_int_equal(brk_props_encode(many, MANY, buf, sizeof buf, &len),
                     BRK_OK);
    assert_int_equal(brk_props_validate(bn(buf, len)), BRK_OK);
    many[MANY - 1].key = many[123].key;
    assert_int_equal(brk_props_encode(many, MANY, buf, sizeof buf, &len),
                     BRK_INVAL);
    /* Same bytes, different lengths, are different keys. */
    brk_prop prefix[2] = { { bs("ab"), bs("") }, { bn("ab", 1), bs("") } };
    assert_int_equal(brk_props_encode(prefix, 2, buf, sizeof buf, &len),
                     BRK_OK);
}

static void props_encode_rejects_empty_and_overlong_keys(void **state)
{
    static char key[256];
    uint8_t buf[600];
    size_t len = 0;
    brk_prop p;

    (void)state;
    memset(key, 'k', sizeof key);
    p.value = bs("v");
    p.key = bn(key, 0);
    assert_int_equal(brk_props_encode(&p, 1, buf, sizeof buf, &len), BRK_INVAL);
    p.key = bn(key, 256);
    assert_int_equal(brk_props_encode(&p, 1, buf, sizeof buf, &len), BRK_INVAL);
    p.key = bn(key, 255);
    assert_int_equal(brk_props_encode(&p, 1, buf, sizeof buf, &len), BRK_OK);
    assert_int_equal(len, 2 + 2 + 255 + 2 + 1);
}

static void props_encode_enforces_block_limit(void **state)
{
    static uint8_t value[BRK_PROPS_MAX + 1];
    static uint8_t buf[BRK_PROPS_MAX + 16];
    brk_prop p = { bs("v"), bn(value, BRK_PROPS_MAX - 7) };
    size_t len = 0;

    (void)state;
    assert_int_equal(brk_props_encode(&p, 1, buf, sizeof buf, &len), BRK_OK);
    assert_int_equal(len, BRK_PROPS_MAX);
    p.value.len++;
    assert_int_equal(brk_props_encode(&p, 1, buf, sizeof buf, &len),
                     BRK_TOOBIG);
    /* A value too big for its u16 length field is over the block too. */
    p.value.len = BRK_PROPS_MAX + 1;
    assert_int_equal(brk_props_encode(&p, 1, buf, sizeof buf, &len),
                     BRK_TOOBIG);
}

static void props_encode_reports_short_buffer(void **state)
{
    brk_prop p = { bs("key"), bs("value") };
    uint8_t buf[14];
    size_t len = 0;

    (void)state;
    assert_int_equal(brk_props_encode(&p, 1, buf, 13, &len), BRK_RANGE);
    assert_int_equal(brk_props_encode(&p, 1, buf, 14, &len), BRK_OK);
    assert_int_equal(len, 14);
}

static void props_validate_rejects_duplicate_keys(void **state)
{
    /* count 2: "k"="1", "k"="2" */
    static const uint8_t dup[] = {
        2, 0, 1, 0, 'k', 1, 0, '1', 1, 0, 'k', 1, 0, '2',
    };
    static uint8_t big[BRK_PROPS_MAX];
    size_t pos = 0;
    brk_prop p;

    (void)state;
    assert_int_equal(brk_props_validate(bn(dup, sizeof dup)), BRK_BADREC);
    /* Iteration walks it (only validate checks uniqueness), get finds the
     * first. */
    assert_int_equal(brk_props_next(bn(dup, sizeof dup), &pos, &p), BRK_OK);
    assert_int_equal(brk_props_next(bn(dup, sizeof dup), &pos, &p), BRK_OK);
    assert_int_equal(brk_props_next(bn(dup, sizeof dup), &pos, &p), BRK_EMPTY);

    /* The largest possible count: 13106 pairs of 1-byte keys, which can only
     * hold 256 distinct keys, so it must be caught (by the hashed check). */
    size_t n = (BRK_PROPS_MAX - 2) / 5, at = 2;
    put_le16(big, (uint16_t)n);
    for (size_t i = 0; i < n; i++) {
        put_le16(big + at, 1);
        big[at + 2] = (uint8_t)i;
        put_le16(big + at + 3, 0);
        at += 5;
    }
    assert_int_equal(brk_props_validate(bn(big, at)), BRK_BADREC);
    /* 256 distinct one-byte keys pass. */
    put_le16(big, 256);
    assert_int_equal(brk_props_validate(bn(big, 2 + 256 * 5)), BRK_OK);
    put_le16(big, 257);
    assert_int_equal(brk_props_validate(bn(big, 2 + 257 * 5)), BRK_BADREC);
}

static void props_validate_rejects_every_truncation(void **state)
{
    uint8_t buf[64];
    size_t len = make_props(buf, sizeof buf);

    (void)state;
    assert_int_equal(brk_props_validate(bn(buf, len)), BRK_OK);
    for (size_t n = 1; n < len; n++) {
        uint8_t *copy = dup_exact(buf, n);
        size_t pos = 0;
        brk_prop p;
        brk_status st;
        brk_bytes v;

        assert_int_equal(brk_props_validate(bn(copy, n)), BRK_BADREC);
        /* Iterating a truncated block ends in BADREC, never a clean end. */
        while ((st = brk_props_next(bn(copy, n), &pos, &p)) == BRK_OK)
            ;
        assert_int_equal(st, BRK_BADREC);
        assert_int_equal(brk_props_get(bn(copy, n), "missing", &v), BRK_BADREC);
        free(copy);
    }
}

static void props_validate_rejects_malformed_framing(void **state)
{
    /* trailing byte after the only pair */
    static const uint8_t trailing[] = { 1, 0, 1, 0, 'a', 0, 0, 'x' };
    /* count says 2, one pair present */
    static const uint8_t short_count[] = { 2, 0, 1, 0, 'a', 0, 0 };
    /* zero-length key */
    static const uint8_t empty_key[] = { 1, 0, 0, 0, 0, 0 };
    /* key_len 256 */
    static uint8_t long_key[2 + 2 + 256 + 2];
    /* one lone byte */
    static const uint8_t one_byte[] = { 0 };
    size_t pos;
    brk_prop p;

    (void)state;
    assert_int_equal(brk_props_validate(bn(trailing, sizeof trailing)),
                     BRK_BADREC);
    pos = 0;
    assert_int_equal(brk_props_next(bn(trailing, sizeof trailing), &pos, &p),
                     BRK_OK);
    assert_int_equal(brk_props_next(bn(trailing, sizeof trailing), &pos, &p),
                     BRK_BADREC);

    assert_int_equal(brk_props_validate(bn(short_count, sizeof short_count)),
                     BRK_BADREC);
    assert_int_equal(brk_props_validate(bn(empty_key, sizeof empty_key)),
                     BRK_BADREC);
    put_le16(long_key, 1);
    put_le16(long_key + 2, 256);
    memset(long_key + 4, 'k', 256);
    assert_int_equal(brk_props_validate(bn(long_key, sizeof long_key)),
                     BRK_BADREC);
    assert_int_equal(brk_props_validate(bn(one_byte, 1)), BRK_BADREC);
}

/* ---- topic names --------------------------------------------------------- */

static void topic_name_validation_cases(void **state)
{
    static char longest[BRK_TOPIC_MAX + 1];

    (void)state;
#define VALID(s, internal) brk_topic_name_valid(s, sizeof(s) - 1, internal)
    assert_true(VALID("orders", false));
    assert_true(VALID("Orders.Created_v2-eu", false));
    assert_true(VALID("a", false));
    assert_true(VALID("_single_underscore", false));
    assert_true(VALID("...", false));
    assert_true(VALID("a..b", false));

    assert_false(brk_topic_name_valid("", 0, true));
    assert_false(brk_topic_name_valid(NULL, 0, true));
    assert_false(VALID("has space", false));
    assert_false(VALID("slash/inside", false));
    assert_false(VALID("back\\slash", false));
    assert_false(VALID("colon:x", false));
    assert_false(VALID("caf\xc3\xa9", false));      /* UTF-8 is not ASCII */
    assert_false(VALID("nul\0inside", false));
    /* Path components that would escape the cq directory. */
    assert_false(VALID(".", true));
    assert_false(VALID("..", true));

    /* "__" prefix is reserved for internal topics. */
    assert_false(VALID("__offsets", false));
    assert_true(VALID("__offsets", true));
    assert_false(VALID("__", false));
    assert_true(VALID("__", true));
#undef VALID

    memset(longest, 'x', sizeof longest);
    assert_true(brk_topic_name_valid(longest, BRK_TOPIC_MAX, false));
    assert_false(brk_topic_name_valid(longest, BRK_TOPIC_MAX + 1, false));
    /* The length argument rules, not a NUL: a prefix is judged alone. */
    assert_true(brk_topic_name_valid("ok/not", 2, false));
}

/* ---- tag hash ------------------------------------------------------------ */

static void tag_hash_is_stable_fnv1a64(void **state)
{
    (void)state;
    /* Pinned values: FNV-1a 64 published vectors ("a", "foobar") and two
     * tags computed once with an independent script.  These hashes are
     * stored in consume queues; if this test fails, the on-disk format
     * changed. */
    assert_int_equal(brk_tag_hash("a", 1), UINT64_C(0xaf63dc4c8601ec8c));
    assert_int_equal(brk_tag_hash("foobar", 6), UINT64_C(0x85944171f73967e8));
    assert_int_equal(brk_tag_hash("TagA", 4), UINT64_C(0x03aa2efb08dfe196));
    assert_int_equal(brk_tag_hash("order.created", 13),
                     UINT64_C(0xbd8cce211d90559d));
    /* Only the bytes in range count. */
    assert_int_equal(brk_tag_hash("TagAB", 4), brk_tag_hash("TagA", 4));
    assert_int_not_equal(brk_tag_hash("TagB", 4), brk_tag_hash("TagA", 4));
}

static void tag_hash_of_empty_tag_is_zero(void **state)
{
    (void)state;
    assert_int_equal(brk_tag_hash("", 0), 0);
    assert_int_equal(brk_tag_hash(NULL, 0), 0);
    assert_int_not_equal(brk_tag_hash("\0", 1), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(record_round_trip_preserves_all_fields),
        cmocka_unit_test(record_round_trip_with_empty_key_tag_props_body),
        cmocka_unit_test(record_encodes_documented_byte_layout),
        cmocka_unit_test(record_round_trip_at_every_field_limit),
        cmocka_unit_test(record_decodes_back_to_back_records),
        cmocka_unit_test(record_types_half_and_op_round_trip),
        cmocka_unit_test(record_size_is_zero_when_a_field_is_over_limit),
        cmocka_unit_test(record_encode_rejects_each_over_limit_field),
        cmocka_unit_test(record_encode_rejects_bad_type_flags_and_empty_topic),
        cmocka_unit_test(record_encode_rejects_malformed_props_block),
        cmocka_unit_test(record_encode_reports_short_buffer),
        cmocka_unit_test(record_peek_len_reads_only_the_prefix),
        cmocka_unit_test(decode_returns_again_for_every_strict_prefix),
        cmocka_unit_test(decode_rejects_every_single_bit_flip),
        cmocka_unit_test(decode_rejects_flipped_body_byte),
        cmocka_unit_test(decode_rejects_stale_log_offset),
        cmocka_unit_test(unsealed_encode_plus_patch_equals_full_encode),
        cmocka_unit_test(decode_rejects_nonzero_reserved_even_with_valid_crc),
        cmocka_unit_test(decode_rejects_header_rule_violations_with_valid_crc),
        cmocka_unit_test(decode_judges_len_and_magic_as_soon_as_they_arrive),
        cmocka_unit_test(decode_rejects_record_longer_than_len_claims),
        cmocka_unit_test(props_encode_iterate_and_get_round_trip),
        cmocka_unit_test(props_empty_block_means_no_properties),
        cmocka_unit_test(props_encode_rejects_duplicate_keys),
        cmocka_unit_test(props_encode_rejects_empty_and_overlong_keys),
        cmocka_unit_test(props_encode_enforces_block_limit),
        cmocka_unit_test(props_encode_reports_short_buffer),
        cmocka_unit_test(props_validate_rejects_duplicate_keys),
        cmocka_unit_test(props_validate_rejects_every_truncation),
        cmocka_unit_test(props_validate_rejects_malformed_framing),
        cmocka_unit_test(topic_name_validation_cases),
        cmocka_unit_test(tag_hash_is_stable_fnv1a64),
        cmocka_unit_test(tag_hash_of_empty_tag_is_zero),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
