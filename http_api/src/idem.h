/*
 * idem.h - Idempotency-Key table (http_api private).
 *
 * A client that retries a POST /v1/transactions or POST /v1/topics/{t}/messages
 * with the same Idempotency-Key header within the window gets the first
 * result again, and never a second message id.  Same key, other request
 * (method + path + body differ) -> 422.  Same key while the first request is
 * still being handled -> 409.
 *
 * Durability (the decision-first pattern of txn.c): before the operation,
 * an INTENT record (scope, key, request hash, the msg_id / txid / deliver_at
 * the operation will use) is appended to the internal topic "__idem" with
 * defer_sync, so the operation's own durable append covers it.  After the
 * operation a DONE record (status + response body) follows, also deferred.
 * At open the table is rebuilt from the newest 4 x max_keys "__idem"
 * records that are younger than the window (why that bound is enough: top
 * of idem.c).  A key with an INTENT but no DONE (a crash in between) comes back
 * as API_IDEM_REDO: the handler repeats the operation with the recorded ids,
 * so the outcome carries the same msg_id/txid as the lost response.
 *
 * Record format: documented at the top of idem.c.
 * Threads: all calls thread-safe (one mutex; no I/O under it except the
 * appends, which the store serialises anyway).
 */
#ifndef HTTP_API_IDEM_H
#define HTTP_API_IDEM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/store.h"
#include "broker/txn.h"
#include "broker/uuid.h"

#define API_IDEM_TOPIC    "__idem"
#define API_IDEM_KEY_MAX  255        /* bytes of printable ASCII 0x21..0x7E */

typedef struct api_idem api_idem;

brk_status api_idem_open(api_idem **out, brk_store *s, int64_t window_ms,
                         size_t max_keys, char *errbuf, size_t errlen);
void api_idem_close(api_idem *t);

/* 64-bit FNV-1a over method, NUL, path, NUL, body: "the same request". */
uint64_t api_idem_hash(const char *method, const char *path,
                       const void *body, size_t body_len);

/* True when `key` is 1..API_IDEM_KEY_MAX bytes of 0x21..0x7E. */
bool api_idem_key_valid(const char *key);

typedef enum api_idem_verdict {
    API_IDEM_NEW      = 0,  /* do the operation with t->msg_id/txid/deliver_at,
                               then api_idem_finish (or api_idem_abort) */
    API_IDEM_REDO     = 1,  /* same as NEW, with the ids recorded before a
                               crash; the operation may have happened */
    API_IDEM_REPLAY   = 2,  /* t->status and t->response hold the answer */
    API_IDEM_MISMATCH = 3,  /* same key, another request: 422 */
    API_IDEM_BUSY     = 4,  /* same key in flight: 409 */
    API_IDEM_ERROR    = 5   /* the intent could not be stored: *err */
} api_idem_verdict;

/* What the handler will do, decided before the operation. */
typedef struct api_idem_intent {
    const char *txid;        /* prepare: the client's txid, or NULL/"" to
                                have one generated (UUIDv7 text) */
    int64_t deliver_at_ms;   /* delayed send: when; 0 otherwise */
} api_idem_intent;

typedef struct api_idem_ticket {
    uint8_t msg_id[BRK_UUID_LEN];    /* NEW/REDO: the id a send must use */
    char    txid[BRK_TXID_MAX + 1];  /* NEW/REDO: the txid a prepare must use */
    int64_t deliver_at_ms;           /* NEW/REDO: recorded deliver time */
    int     status;                  /* REPLAY: HTTP status */
    char   *response;                /* REPLAY: malloc'ed JSON body (caller
                                        frees with free()) */
    size_t  response_len;
    void   *priv_;                   /* the reserved entry */
} api_idem_ticket;

/* Look the key up in `scope` (e.g. "POST /v1/transactions"; keys of
 * different scopes never meet).  On NEW/REDO the key is reserved (BUSY for
 * others) until finish or abort. */
api_idem_verdict api_idem_begin(api_idem *t, const char *scope,
                                const char *key, uint64_t req_hash,
                                const api_idem_intent *in,
                                api_idem_ticket *tk, brk_status *err);

/* The operation succeeded with this response: remember it (DONE record,
 * deferred sync) and release the reservation. */
void api_idem_finish(api_idem *t, api_idem_ticket *tk, int status,
                     const char *response, size_t len);

/* The operation failed (nothing to remember): release the reservation, so
 * a retry is handled anew (as REDO of the recorded intent). */
void api_idem_abort(api_idem *t, api_idem_ticket *tk);

typedef struct api_idem_stats {
    uint64_t keys;           /* remembered now */
    uint64_t replays_total;
    uint64_t mismatches_total;
    uint64_t evicted_total;  /* forgotten early because of max_keys */
} api_idem_stats;

void api_idem_get_stats(api_idem *t, api_idem_stats *out);

#endif /* HTTP_API_IDEM_H */
