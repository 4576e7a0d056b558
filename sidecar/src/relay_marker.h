/*
 * relay_marker.h - the outbox relay's batch markers and candidate range
 * (private to relay.c; relay.c's top comment, "Duplicates, bounded", gives
 * the design and the marker's byte layout).
 *
 * A marker is one small record in SC_RELAY_MARKER_TOPIC, appended before a
 * batch's rows: the batch's id range and the candidate range carried from
 * earlier unfinished batches.  The codec does no I/O; start and append
 * talk to the store only.
 */
#ifndef SC_RELAY_MARKER_H
#define SC_RELAY_MARKER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/store.h"
#include "log.h"

#define SC_RELAY_MARKER_LEN 48

/* Rows that may be in the store without having been deleted: ids lo..hi
 * (inclusive), whose copies are at log offsets >= since. */
typedef struct sc_relay_cand {
    bool set;                   /* false: none (the other fields mean nothing) */
    int64_t lo, hi;
    uint64_t since;
} sc_relay_cand;

/* c = c joined with lo..hi (since: the lower of the two). */
void sc_relay_cand_add(sc_relay_cand *c, int64_t lo, int64_t hi,
                       uint64_t since);

/* The marker of a batch of ids lo..hi carrying c, SC_RELAY_MARKER_LEN
 * bytes into p. */
void sc_relay_marker_encode(uint8_t *p, int64_t lo, int64_t hi,
                            const sc_relay_cand *c);

/* False for anything but a marker of this format and version. */
bool sc_relay_marker_decode(const uint8_t *p, size_t len, int64_t *lo,
                            int64_t *hi, sc_relay_cand *carried);

/* Create SC_RELAY_MARKER_TOPIC (one queue) if needed, read its last
 * marker and join into *c its batch range (since = its own log offset)
 * and the range it carried; log at info when that leaves candidates, at
 * warning for a record that is not a marker.  BRK_OK also when there is
 * no marker; else the store's error. */
brk_status sc_relay_markers_start(brk_store *s, sc_log *log, sc_relay_cand *c);

/* Append the marker of a batch of ids lo..hi carrying c (defer_sync: it
 * becomes durable with the batch's flush); *log_offset is where. */
brk_status sc_relay_marker_append(brk_store *s, int64_t lo, int64_t hi,
                                  const sc_relay_cand *c,
                                  uint64_t *log_offset);

#endif /* SC_RELAY_MARKER_H */
