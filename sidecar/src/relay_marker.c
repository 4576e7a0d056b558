/*
 * relay_marker.c - the outbox relay's batch markers (relay_marker.h): the
 * codec of the format drawn at the top of relay.c (48 bytes,
 * little-endian, magic "ORM1"), the candidate range, and reading the last
 * marker / appending one through the store.
 */
#define _GNU_SOURCE
#include "relay_marker.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "relay.h"

void sc_relay_cand_add(sc_relay_cand *c, int64_t lo, int64_t hi, uint64_t since)
{
    if (!c->set) {
        *c = (sc_relay_cand){ .set = true, .lo = lo, .hi = hi, .since = since };
        return;
    }
    if (lo < c->lo) c->lo = lo;
    if (hi > c->hi) c->hi = hi;
    if (since < c->since) c->since = since;
}

static void st_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t ld_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

void sc_relay_marker_encode(uint8_t *p, int64_t lo, int64_t hi,
                            const sc_relay_cand *c)
{
    memcpy(p, "ORM1", 4);
    p[4] = c->set ? 1 : 0;      /* flags, u32 */
    p[5] = p[6] = p[7] = 0;
    st_le64(p + 8, (uint64_t)lo);
    st_le64(p + 16, (uint64_t)hi);
    st_le64(p + 24, c->set ? (uint64_t)c->lo : 0);
    st_le64(p + 32, c->set ? (uint64_t)c->hi : 0);
    st_le64(p + 40, c->set ? c->since : 0);
}

bool sc_relay_marker_decode(const uint8_t *p, size_t len, int64_t *lo,
                            int64_t *hi, sc_relay_cand *carried)
{
    if (len != SC_RELAY_MARKER_LEN || memcmp(p, "ORM1", 4) != 0) return false;
    uint32_t flags = (uint32_t)p[4] | (uint32_t)p[5] << 8
                     | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
    if (flags & ~1u) return false;
    *lo = (int64_t)ld_le64(p + 8);
    *hi = (int64_t)ld_le64(p + 16);
    memset(carried, 0, sizeof *carried);
    if (flags & 1u)
        sc_relay_cand_add(carried, (int64_t)ld_le64(p + 24), (int64_t)ld_le64(p + 32),
                 ld_le64(p + 40));
    return *lo <= *hi && (!carried->set || carried->lo <= carried->hi);
}

brk_status sc_relay_markers_start(brk_store *s, sc_log *log, sc_relay_cand *c)
{
    brk_status st = brk_topic_create(s, SC_RELAY_MARKER_TOPIC, 1);
    if (st != BRK_OK && st != BRK_EXISTS) return st;
    uint64_t min = 0, max = 0;
    st = brk_store_queue_range(s, SC_RELAY_MARKER_TOPIC, 0, &min, &max);
    if (st != BRK_OK) return st;
    if (max > min) {
        brk_batch *b = NULL;
        st = brk_store_read(s, SC_RELAY_MARKER_TOPIC, 0, max - 1, 1, &b);
        if (st != BRK_OK) return st;
        int64_t lo, hi;
        sc_relay_cand carried;
        if (b->count == 1 && sc_relay_marker_decode(b->recs[0].body.ptr,
                                                    b->recs[0].body.len, &lo,
                                                    &hi, &carried)) {
            sc_relay_cand_add(c, lo, hi, b->recs[0].log_offset);
            if (carried.set)
                sc_relay_cand_add(c, carried.lo, carried.hi, carried.since);
        } else if (b->count == 1) {
            sc_log_kv(log, API_LOG_WARN, "relay ignores a record it does not "
                      "know in " SC_RELAY_MARKER_TOPIC "; rows stored before "
                      "a crash may be stored again", NULL);
        }
        /* count 0: retention took it meanwhile, as if there were none. */
        brk_batch_free(b);
    }
    if (c->set) {
        char range[64];
        snprintf(range, sizeof range, "%" PRId64 "..%" PRId64, c->lo, c->hi);
        sc_log_kv(log, API_LOG_INFO, "relay resumes after a batch that may "
                  "not have finished; rows in this id range are looked up in "
                  "the store before they are stored", "ids", range, NULL);
    }
    return BRK_OK;
}

brk_status sc_relay_marker_append(brk_store *s, int64_t lo, int64_t hi,
                                  const sc_relay_cand *c,
                                  uint64_t *log_offset)
{
    uint8_t body[SC_RELAY_MARKER_LEN];
    sc_relay_marker_encode(body, lo, hi, c);
    brk_append_req q;
    memset(&q, 0, sizeof q);
    q.topic = SC_RELAY_MARKER_TOPIC;
    q.queue = 0;
    q.body = (brk_bytes){ body, sizeof body };
    q.allow_internal = true;
    q.defer_sync = true;        /* durable with the batch's flush */
    brk_append_res res;
    brk_status st = brk_store_append(s, &q, &res);
    if (st == BRK_OK) *log_offset = res.log_offset;
    return st;
}
