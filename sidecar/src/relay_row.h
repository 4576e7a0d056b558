/*
 * relay_row.h - the outbox relay's row -> message mapping (private to
 * relay.c; relay_row.c's top comment gives the rules).
 *
 * A row is read from one binary SELECT result (SC_RELAY_SQL_SELECT, the
 * columns of sc_relay_col), converted (headers -> encoded properties, jsonb
 * text -> the compact JSON the HTTP API stores), then appended, or, when
 * the store or the conversion refuses it for good, kept in
 * SC_RELAY_REJECT_TOPIC.  No PostgreSQL calls and no relay state here:
 * buffers come from the caller.
 */
#ifndef SC_RELAY_ROW_H
#define SC_RELAY_ROW_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/store.h"
#include "log.h"

/* The relay's SELECT and its columns, read in binary (text columns come as
 * their bytes, uuid as 16 bytes, bigint as 8 bytes big-endian). */
#define SC_RELAY_SQL_SELECT                                                  \
    "SELECT id, msg_id, topic, key, tag, headers::text, body::text,"         \
    " body_bytes, floor(extract(epoch FROM created_at) * 1000)::bigint"      \
    " FROM outbox.messages ORDER BY id LIMIT $1"

enum sc_relay_col { SC_RELAY_C_ID, SC_RELAY_C_MSGID, SC_RELAY_C_TOPIC,
                    SC_RELAY_C_KEY, SC_RELAY_C_TAG, SC_RELAY_C_HEADERS,
                    SC_RELAY_C_BODY, SC_RELAY_C_BYTES, SC_RELAY_C_CREATED,
                    SC_RELAY_C_COUNT };

/* A row as read: views into the PGresult (valid until it is cleared). */
typedef struct sc_relay_row {
    int64_t id;
    const uint8_t *msg_id;      /* 16 bytes */
    const char *topic;          /* NUL-terminated */
    brk_bytes key, tag;
    const char *headers;        /* JSON text or NULL */
    size_t headers_len;
    const char *body;           /* JSON text (json) or bytes */
    size_t body_len;
    bool json;
    int64_t created_ms;
} sc_relay_row;

/* What a row becomes. */
typedef struct sc_relay_conv {
    size_t props_len;           /* encoded properties, in the caller's
                                   props buffer */
    char *text;                 /* compact JSON body (free()), or NULL */
    size_t text_len;
} sc_relay_conv;

/* An 8-byte big-endian integer (a binary bigint). */
int64_t sc_relay_ld_be64(const char *p);

/* Row i of a result of SC_RELAY_SQL_SELECT.  False when its shape is not
 * what the statement returns (a changed table). */
bool sc_relay_row_read(const PGresult *res, int i, sc_relay_row *w);

/* Convert w: properties into props (BRK_PROPS_MAX bytes), the compact JSON
 * body into c->text (free() it, also after a failure).  BRK_INVAL with a
 * one-line reason for what the HTTP API would refuse too, BRK_NOMEM. */
brk_status sc_relay_row_convert(const sc_relay_row *w, uint8_t *props,
                                sc_relay_conv *c, char *reason, size_t cap);

/* Append the converted row (defer_sync: the caller flushes the batch). */
brk_status sc_relay_row_append(brk_store *s, const sc_relay_row *w,
                               const sc_relay_conv *c, const uint8_t *props,
                               brk_append_res *res);

/* Refusals that a retry cannot change. */
bool sc_relay_refused_for_good(brk_status st);

/* Keep a refused row in SC_RELAY_REJECT_TOPIC (relay_row.c's top comment
 * says what the copy holds) and log it at error level; rprops is a scratch
 * buffer of BRK_PROPS_MAX bytes; c may be NULL.  BRK_OK (also when even the
 * bare copy is refused: logged), or the status of a failure that may pass. */
brk_status sc_relay_row_reject(brk_store *s, sc_log *log, uint8_t *rprops,
                               const sc_relay_row *w, const sc_relay_conv *c,
                               const char *reason);

#endif /* SC_RELAY_ROW_H */
