/*
 * routes_ops.c - operations routes.
 *
 *   GET /healthz   200 {"status": "ok"} while the process serves (liveness)
 *   GET /readyz    200 {"status": "ready"}; 503 {"status": "shutting_down"}
 *                  once draining (Retry-After 5), 503 {"status":
 *                  "store_failed"} when the store refuses writes.  Not tied
 *                  to PostgreSQL or a downstream.
 *   GET /metrics   Prometheus text 0.0.4 (metrics.c), plus the families
 *                  of api_config.metrics_ext
 */
#include "api_priv.h"

#include <stdlib.h>

static bool store_failed(api_handler *h)
{
    brk_store_stats st;
    brk_store_get_stats(h->b.store, &st);
    return st.failed;
}

static api_outcome status_reply(api_call *c, int http, const char *status)
{
    json_t *o = api_obj();
    bool ok = o && json_object_set_new(o, "status", json_string(status)) == 0;
    return api_reply(c, http, o, ok);
}

api_outcome api_route_healthz(api_call *c)
{
    return status_reply(c, 200, "ok");
}

api_outcome api_route_readyz(api_call *c)
{
    if (api_handler_draining(c->h)) {
        status_reply(c, 503, "shutting_down");
        c->resp->retry_after_s = 5;
        return API_DONE;
    }
    if (store_failed(c->h))
        return status_reply(c, 503, "store_failed");
    return status_reply(c, 200, "ready");
}

api_outcome api_route_metrics(api_call *c)
{
    api_handler *h = c->h;
    api_metrics_src src = {
        .store = h->b.store,
        .txn = h->b.txn,
        .delay = h->b.delay,
        .groups = h->b.groups,
        .idem = h->idem,
        .ready = !api_handler_draining(h) && !store_failed(h),
        .now_ms = c->now_ms,
        .ext = h->cfg.metrics_ext,
    };
    size_t len = 0;
    char *text = api_metrics_render(h->metrics, &src, &len);
    if (!text)
        return api_problem(c, API_PROB_UNAVAILABLE, "out of memory while "
                           "rendering the metrics");
    c->resp->status = 200;
    c->resp->content_type = API_CT_METRICS;
    c->resp->body = text;
    c->resp->body_len = len;
    return API_DONE;
}
