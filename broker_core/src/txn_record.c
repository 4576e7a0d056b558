/*
 * txn_record.c - the transaction module's records: half messages and op
 * records (formats at the top of txn.c), and the effects a verdict owes:
 * the committed message and the "transaction expired" event.
 */
#define _GNU_SOURCE
#include "txn_priv.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "broker/record.h"
#include "broker/uuid.h"
#include "le.h"

/* ---- records -------------------------------------------------------------- */


brk_status txn_parse_half(const brk_record *r, half_view *h)
{
    brk_bytes v;
    if (r->type != BRK_REC_HALF)
        return BRK_BADREC;
    if (brk_props_get(r->props, "\x1ftxid", &v) != BRK_OK || v.len == 0
        || v.len > BRK_TXID_MAX)
        return BRK_BADREC;
    memcpy(h->txid, v.ptr, v.len);
    h->txid[v.len] = 0;
    h->txid_len = v.len;
    if (brk_props_get(r->props, "\x1ftopic", &v) != BRK_OK || v.len == 0
        || v.len > BRK_TOPIC_MAX)
        return BRK_BADREC;
    memcpy(h->topic, v.ptr, v.len);
    h->topic[v.len] = 0;
    if (brk_props_get(r->props, "\x1fpolicy", &v) != BRK_OK
        || v.len != POLICY_LEN)
        return BRK_BADREC;
    const uint8_t *p = v.ptr;
    memset(&h->pol, 0, sizeof h->pol);
    h->pol.first_check_ms = brk_ld32(p);
    h->pol.interval_ms = brk_ld32(p + 4);
    h->pol.max_checks = brk_ld16(p + 8);
    h->pol.on_exhausted = p[10];
    h->expiry[0] = 0;
    if (brk_props_get(r->props, "\x1f" "expiry", &v) == BRK_OK
        && v.len <= BRK_TOPIC_MAX) {
        memcpy(h->expiry, v.ptr, v.len);
        h->expiry[v.len] = 0;
    }
    h->pol.expiry_topic = h->expiry[0] ? h->expiry : NULL;
    h->delay_kind = 0;
    h->delay_val = 0;
    if (brk_props_get(r->props, "\x1f" "delay", &v) == BRK_OK && v.len == 9) {
        h->delay_kind = ((const uint8_t *)v.ptr)[0];
        h->delay_val = (int64_t)brk_ld64((const uint8_t *)v.ptr + 1);
    }
    h->prepared_ms = r->store_ms;
    if (brk_props_get(r->props, "\x1fprep", &v) == BRK_OK && v.len == 8)
        h->prepared_ms = (int64_t)brk_ld64(v.ptr);
    h->is_copy = false;
    if (brk_props_get(r->props, "\x1f" "copy", &v) == BRK_OK
        && v.len == COPY_LEN) {
        h->is_copy = true;
        h->copy_checks = brk_ld16(v.ptr);
        h->copy_next = (int64_t)brk_ld64((const uint8_t *)v.ptr + 2);
        h->copy_from = brk_ld64((const uint8_t *)v.ptr + 10);
    }
    h->r = r;
    return BRK_OK;
}

/* Read and parse the half record at off.  The caller frees h->b. */
brk_status txn_read_half(brk_txn *t, uint64_t off, half_view *h)
{
    memset(h, 0, sizeof *h);
    brk_status st = brk_store_read_at(t->s, off, &h->b);
    if (st != BRK_OK)
        return st;
    if (h->b->count != 1) {
        brk_batch_free(h->b);
        h->b = NULL;
        return BRK_CORRUPT;
    }
    st = txn_parse_half(&h->b->recs[0], h);
    if (st != BRK_OK) {
        brk_batch_free(h->b);
        h->b = NULL;
    }
    return st;
}

/* `defer`: in SYNC mode do not wait for this op's fdatasync, because the
 * caller appends its effect next and waits for that one, which covers the
 * op too (the log is durable as a prefix): one fdatasync per commit. */
brk_status txn_append_op(brk_txn *t, const char *txid, uint8_t kind,
                            uint8_t src, uint16_t checks, int64_t next,
                            uint64_t half_off, bool defer, uint64_t *op_off)
{
    uint8_t body[OP_LEN] = { 0 };
    body[0] = OP_VERSION;
    body[1] = kind;
    body[2] = src;
    brk_st16(body + 4, checks);
    brk_st64(body + 8, (uint64_t)next);
    brk_st64(body + 16, half_off);
    brk_append_req rq;
    memset(&rq, 0, sizeof rq);
    rq.topic = BRK_TXN_OP_TOPIC;
    rq.queue = 0;
    rq.key.ptr = txid;
    rq.key.len = strlen(txid);
    rq.body.ptr = body;
    rq.body.len = sizeof body;
    rq.type = BRK_REC_OP;
    rq.allow_internal = true;
    rq.defer_sync = defer;
    brk_append_res res;
    brk_status st = brk_store_append(t->s, &rq, &res);
    if (st == BRK_OK && op_off)
        *op_off = res.log_offset;
    return st;
}

/* The expiry event's id: the message id with its last byte flipped, so a
 * re-publication after a crash carries the same id. */
void txn_expiry_id(const uint8_t *msg_id, uint8_t *out)
{
    memcpy(out, msg_id, BRK_UUID_LEN);
    out[BRK_UUID_LEN - 1] ^= 0x5A;
}

static size_t json_str(char *out, size_t cap, const char *s, size_t n)
{
    size_t o = 0;
    if (o < cap) out[o] = '"';
    o++;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        size_t k;
        if (c == '"' || c == '\\') {
            esc[0] = '\\'; esc[1] = (char)c; k = 2;
        } else if (c < 0x20 || c >= 0x7f) {
            k = (size_t)snprintf(esc, sizeof esc, "\\u%04x", c);
        } else {
            esc[0] = (char)c; k = 1;
        }
        for (size_t j = 0; j < k; j++, o++)
            if (o < cap) out[o] = esc[j];
    }
    if (o < cap) out[o] = '"';
    o++;
    return o;
}

/* Publish the "transaction expired" event for half h (see README): topic =
 * its expiry topic, key = the half's key, headers = the half's headers plus
 * outboxd-txid and outboxd-event, body = JSON {event, txid, topic, msg_id,
 * checks, prepared_at_ms}. */
static brk_status publish_expiry(brk_txn *t, const half_view *h,
                                 uint16_t checks)
{
    const brk_record *r = h->r;
    size_t plen = 0;
    uint8_t *props = malloc(r->props.len + 512);
    if (!props)
        return BRK_NOMEM;
    brk_status st = brk_props_strip_sys(r->props, props, r->props.len + 512,
                                        &plen);
    /* Rebuild the block with two more headers. */
    brk_prop pairs[2] = {
        { { "outboxd-txid", 12 }, { h->txid, h->txid_len } },
        { { "outboxd-event", 13 }, { "transaction-expired", 19 } },
    };
    size_t n = 0, pos = 0;
    brk_prop *all = NULL;
    if (st == BRK_OK) {
        brk_bytes blk = { props, plen };
        brk_prop pr;
        size_t cnt = 0;
        while (brk_props_next(blk, &pos, &pr) == BRK_OK)
            cnt++;
        all = malloc((cnt + 2) * sizeof *all);
        if (!all)
            st = BRK_NOMEM;
        pos = 0;
        while (st == BRK_OK && brk_props_next(blk, &pos, &pr) == BRK_OK) {
            if ((pr.key.len == 12 && memcmp(pr.key.ptr, "outboxd-txid", 12) == 0)
                || (pr.key.len == 13
                    && memcmp(pr.key.ptr, "outboxd-event", 13) == 0))
                continue;
            all[n++] = pr;
        }
        if (st == BRK_OK) {
            all[n++] = pairs[0];
            all[n++] = pairs[1];
        }
    }
    uint8_t *block = NULL;
    size_t blen = 0;
    if (st == BRK_OK) {
        block = malloc(BRK_PROPS_MAX);
        if (!block)
            st = BRK_NOMEM;
        else
            st = brk_props_encode(all, n, block, BRK_PROPS_MAX, &blen);
        if (st == BRK_TOOBIG || st == BRK_RANGE)   /* no room: headers go */
            st = brk_props_encode(pairs, 2, block, BRK_PROPS_MAX, &blen);
    }
    char body[1024];
    size_t b = 0;
    char idstr[BRK_UUID_STR_LEN + 1];
    brk_uuid_format(r->msg_id, idstr);
    b += (size_t)snprintf(body, sizeof body,
                          "{\"event\":\"transaction-expired\",\"txid\":");
    b += json_str(body + b, sizeof body - b, h->txid, h->txid_len);
    b += (size_t)snprintf(body + b, sizeof body - b, ",\"topic\":");
    b += json_str(body + b, sizeof body - b, h->topic, strlen(h->topic));
    b += (size_t)snprintf(body + b, sizeof body - b,
                          ",\"msg_id\":\"%s\",\"checks\":%u,"
                          "\"prepared_at_ms\":%lld}",
                          idstr, (unsigned)checks,
                          (long long)h->prepared_ms);
    if (st == BRK_OK) {
        uint8_t id[BRK_UUID_LEN];
        txn_expiry_id(r->msg_id, id);
        brk_append_req rq;
        memset(&rq, 0, sizeof rq);
        rq.topic = h->expiry;
        rq.queue = -1;
        rq.key = r->key;
        rq.props.ptr = block;
        rq.props.len = blen;
        rq.body.ptr = body;
        rq.body.len = b;
        rq.flags = BRK_RECF_BODY_JSON;
        rq.msg_id = id;
        brk_append_res res;
        st = brk_store_append(t->s, &rq, &res);
    }
    free(block);
    free(all);
    free(props);
    return st;
}

/* Append the committed message of half h to its topic (or to the delay
 * scheduler).  res may be NULL. */
static brk_status publish_commit(brk_txn *t, const half_view *h,
                                 brk_txn_result *res)
{
    const brk_record *r = h->r;
    size_t plen = 0;
    uint8_t *props = malloc(r->props.len ? r->props.len : 1);
    if (!props)
        return BRK_NOMEM;
    brk_status st = brk_props_strip_sys(r->props, props, r->props.len, &plen);
    if (st != BRK_OK) {
        free(props);
        return st;
    }
    brk_append_req rq;
    memset(&rq, 0, sizeof rq);
    rq.topic = h->topic;
    rq.queue = -1;
    rq.key = r->key;
    rq.tag = r->tag;
    rq.props.ptr = props;
    rq.props.len = plen;
    rq.body = r->body;
    rq.flags = r->flags;
    rq.msg_id = r->msg_id;
    rq.born_ms = r->born_ms;
    if (h->delay_kind && t->o.delay) {
        int64_t now = txn_now_ms(t);
        int64_t at = h->delay_kind == 1 ? now + h->delay_val : h->delay_val;
        brk_delay_res dr;
        st = brk_delay_send(t->o.delay, &rq, at < now ? now : at, &dr);
        if (st == BRK_OK && res) {
            res->delayed = dr.delayed;
            res->deliver_at_ms = dr.deliver_at_ms;
        }
    } else {
        brk_append_res ar;
        st = brk_store_append(t->s, &rq, &ar);
    }
    free(props);
    return st;
}

/* The effect owed by a stored verdict: the message (commit) or the expiry
 * event (rollback because checks ran out, with an expiry topic). */
brk_status txn_do_effect(brk_txn *t, uint64_t half_off, bool commit,
                            bool expired, uint16_t checks,
                            const half_view *pre, brk_txn_result *res)
{
    if (!commit && !expired)
        return BRK_OK;
    half_view h;
    brk_status st = BRK_OK;
    if (pre)
        h = *pre;                /* a compaction copy has the same content */
    else
        st = txn_read_half(t, half_off, &h);
    if (st != BRK_OK)
        return st;
    if (commit)
        st = publish_commit(t, &h, res);
    else if (h.expiry[0])
        st = publish_expiry(t, &h, checks);
    if (!pre)
        brk_batch_free(h.b);
    return st;
}
