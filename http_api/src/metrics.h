/*
 * metrics.h - the counters behind GET /metrics (http_api private).
 *
 * The HTTP layer's own counters (requests by route, method and code; the
 * request duration histogram; messages published by send) live here; the
 * rest of the page is gathered from broker_core and the idempotency table
 * at render time, so nothing is counted twice.  Names and labels are the
 * table in docs/http-api.md ("Metrics").
 *
 * Threads: all calls thread-safe.  Observations take one mutex briefly;
 * render calls broker_core with no lock of ours held.
 */
#ifndef HTTP_API_METRICS_H
#define HTTP_API_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "http_api/api.h"
#include "idem.h"

typedef struct api_metrics api_metrics;

/* `routes` (static storage) gives the route label values: each distinct
 * path, plus "unmatched" for everything else. */
brk_status api_metrics_open(api_metrics **out, const api_route_info *routes,
                            size_t nroutes);
void api_metrics_close(api_metrics *m);

/* One finished request.  An unknown route counts as "unmatched", a method
 * outside GET/HEAD/POST/PUT/DELETE/PATCH/OPTIONS as "OTHER" (label values
 * stay bounded whatever clients send). */
void api_metrics_observe(api_metrics *m, const char *method,
                         const char *route, int status, double seconds);

typedef enum api_pub_kind {
    API_PUB_SEND    = 0,            /* appended to its topic by a send */
    API_PUB_DELAYED = 1             /* accepted by the delay scheduler */
} api_pub_kind;

void api_metrics_published(api_metrics *m, api_pub_kind kind);

/* Where the rest of the page comes from. */
typedef struct api_metrics_src {
    brk_store  *store;
    brk_txn    *txn;
    brk_delay  *delay;
    brk_groups *groups;
    api_idem   *idem;               /* may be NULL */
    bool        ready;              /* outboxd_ready */
    int64_t     now_ms;             /* for the age gauges */
    const api_metrics_ext *ext;     /* appended last; may be NULL */
} api_metrics_src;

/* The whole page in Prometheus text format 0.0.4, malloc'ed and
 * NUL-terminated (*len without the NUL); NULL on NOMEM. */
char *api_metrics_render(api_metrics *m, const api_metrics_src *src,
                         size_t *len);

#endif /* HTTP_API_METRICS_H */
