/*
 * metrics.c - counters and the Prometheus text page (see metrics.h).
 *
 * PAGE (text format 0.0.4): each family is "# HELP", "# TYPE", then its
 * samples; label values escape '\', '"' and newline.  Families, in order:
 *
 *   outboxd_http_requests_total{route,method,code}      counter   (here)
 *   outboxd_http_request_duration_seconds{route}        histogram (here)
 *   outboxd_messages_published_total{kind}              counter   send/delayed
 *                                                       here, commit = txn
 *   outboxd_store_appends_total, _store_bytes, _store_segments,
 *   _store_fsync_seconds (histogram), _store_failed      brk_store_get_stats
 *   outboxd_transactions_total{outcome}, _checkbacks_total{result},
 *   _transactions_pending, _stuck, _oldest_pending_age_seconds
 *                                                       brk_txn_get_stats
 *   outboxd_delayed_pending, _delayed_fired_total        brk_delay_get_stats
 *   outboxd_group_lag{group,topic}, _group_inflight{group,topic},
 *   _group_oldest_unacked_age_seconds{group,topic}, _group_dead_letters{group}
 *                                                       brk_group_lag totals
 *                                                       rows (queue == -1),
 *                                                       broadcast members
 *                                                       summed per topic
 *   outboxd_idempotency_keys, _idempotency_replays_total api_idem_get_stats
 *   outboxd_ready, outboxd_build_info{version}
 *   then whatever api_config.metrics_ext writes (the sidecar's database
 *   families), rendered into a memory stream and appended as is
 *
 * The store's fsync histogram counts per bucket; Prometheus buckets are
 * cumulative, so they are summed here.
 */
#include "metrics.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef OUTBOXD_VERSION
#define OUTBOXD_VERSION "unknown"
#endif

/* Request duration buckets (seconds): Prometheus's defaults plus 30 s, the
 * longest long poll. */
static const double DUR_BOUNDS[] = { 0.001, 0.005, 0.01, 0.025, 0.05, 0.1,
                                     0.25, 0.5, 1, 2.5, 5, 10, 30 };
#define NDUR (sizeof DUR_BOUNDS / sizeof DUR_BOUNDS[0])

static const char *const METHODS[] = { "GET", "HEAD", "POST", "PUT",
                                       "DELETE", "PATCH", "OPTIONS", "OTHER" };
#define NMETHODS (sizeof METHODS / sizeof METHODS[0])

typedef struct req_count {
    uint16_t route;                 /* index into paths[] */
    uint8_t  method;                /* index into METHODS */
    uint16_t code;
    uint64_t n;
} req_count;

typedef struct dur_hist {
    uint64_t bucket[NDUR + 1];      /* not cumulative; last is +Inf */
    uint64_t count;
    double   sum;
} dur_hist;

struct api_metrics {
    const char **paths;             /* distinct route paths, then "unmatched" */
    size_t npaths;
    pthread_mutex_t mu;             /* guards reqs, nreqs, cap, hist */
    req_count *reqs;
    size_t nreqs, cap;
    dur_hist *hist;                 /* [npaths] */
    _Atomic uint64_t published[2];  /* api_pub_kind */
};

brk_status api_metrics_open(api_metrics **out, const api_route_info *routes,
                            size_t nroutes)
{
    *out = NULL;
    api_metrics *m = calloc(1, sizeof *m);
    if (!m)
        return BRK_NOMEM;
    m->paths = calloc(nroutes + 1, sizeof *m->paths);
    m->hist = calloc(nroutes + 1, sizeof *m->hist);
    if (!m->paths || !m->hist) {
        free(m->paths);
        free(m->hist);
        free(m);
        return BRK_NOMEM;
    }
    for (size_t i = 0; i < nroutes; i++) {
        bool seen = false;
        for (size_t k = 0; k < m->npaths && !seen; k++)
            seen = strcmp(m->paths[k], routes[i].path) == 0;
        if (!seen)
            m->paths[m->npaths++] = routes[i].path;
    }
    m->paths[m->npaths++] = "unmatched";
    pthread_mutex_init(&m->mu, NULL);
    *out = m;
    return BRK_OK;
}

void api_metrics_close(api_metrics *m)
{
    if (!m)
        return;
    pthread_mutex_destroy(&m->mu);
    free(m->reqs);
    free(m->hist);
    free(m->paths);
    free(m);
}

static size_t route_index(const api_metrics *m, const char *route)
{
    for (size_t i = 0; route && i + 1 < m->npaths; i++)
        if (strcmp(m->paths[i], route) == 0)
            return i;
    return m->npaths - 1;
}

static uint8_t method_index(const char *method)
{
    for (size_t i = 0; method && i + 1 < NMETHODS; i++)
        if (strcmp(METHODS[i], method) == 0)
            return (uint8_t)i;
    return (uint8_t)(NMETHODS - 1);
}

/* The counter row for (route, method, code), made if new.  mu held. */
static req_count *req_row(api_metrics *m, uint16_t r, uint8_t meth,
                          uint16_t code)
{
    for (size_t i = 0; i < m->nreqs; i++)
        if (m->reqs[i].route == r && m->reqs[i].method == meth
            && m->reqs[i].code == code)
            return &m->reqs[i];
    if (m->nreqs == m->cap) {
        size_t nc = m->cap ? m->cap * 2 : 32;
        req_count *v = realloc(m->reqs, nc * sizeof *v);
        if (!v)
            return NULL;
        m->reqs = v;
        m->cap = nc;
    }
    req_count *row = &m->reqs[m->nreqs++];
    *row = (req_count){ r, meth, code, 0 };
    return row;
}

void api_metrics_observe(api_metrics *m, const char *method,
                         const char *route, int status, double seconds)
{
    if (!m)
        return;
    uint16_t r = (uint16_t)route_index(m, route);
    uint8_t meth = method_index(method);
    uint16_t code = status >= 100 && status <= 999 ? (uint16_t)status : 0;
    if (!(seconds >= 0))            /* also NaN */
        seconds = 0;
    size_t b = 0;
    while (b < NDUR && seconds > DUR_BOUNDS[b])
        b++;
    pthread_mutex_lock(&m->mu);
    req_count *row = req_row(m, r, meth, code);
    if (row)
        row->n++;
    m->hist[r].bucket[b]++;
    m->hist[r].count++;
    m->hist[r].sum += seconds;
    pthread_mutex_unlock(&m->mu);
}

void api_metrics_published(api_metrics *m, api_pub_kind kind)
{
    if (m && (unsigned)kind < 2)
        atomic_fetch_add(&m->published[kind], 1);
}

/* ---- text building -------------------------------------------------------------- */

typedef struct sbuf {
    char *p;
    size_t len, cap;
    bool oom;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void sb_printf(sbuf *b, const char *fmt, ...)
{
    if (b->oom)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = true;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        size_t nc = b->cap * 2 + (size_t)n;
        char *np = realloc(b->p, nc);
        if (!np) {
            b->oom = true;
            return;
        }
        b->p = np;
        b->cap = nc;
    }
}

/* A label value with '\', '"' and newline escaped. */
static void sb_label(sbuf *b, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\')
            sb_printf(b, "\\\\");
        else if (*v == '"')
            sb_printf(b, "\\\"");
        else if (*v == '\n')
            sb_printf(b, "\\n");
        else
            sb_printf(b, "%c", *v);
    }
}

static void family(sbuf *b, const char *name, const char *type,
                   const char *help)
{
    sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void gauge1(sbuf *b, const char *name, const char *type,
                   const char *help, double v)
{
    family(b, name, type, help);
    sb_printf(b, "%s %.17g\n", name, v);
}

/* ---- the HTTP layer's own families ------------------------------------------------- */

static void render_requests(api_metrics *m, sbuf *b)
{
    pthread_mutex_lock(&m->mu);
    family(b, "outboxd_http_requests_total", "counter",
           "HTTP requests by route template, method and status code.");
    for (size_t i = 0; i < m->nreqs; i++) {
        const req_count *r = &m->reqs[i];
        sb_printf(b, "outboxd_http_requests_total{route=\"");
        sb_label(b, m->paths[r->route]);
        sb_printf(b, "\",method=\"%s\",code=\"%u\"} %llu\n",
                  METHODS[r->method], (unsigned)r->code,
                  (unsigned long long)r->n);
    }
    family(b, "outboxd_http_request_duration_seconds", "histogram",
           "Time from the first byte read to the response queued.");
    for (size_t i = 0; i < m->npaths; i++) {
        const dur_hist *h = &m->hist[i];
        if (h->count == 0)
            continue;
        uint64_t cum = 0;
        for (size_t k = 0; k <= NDUR; k++) {
            cum += h->bucket[k];
            sb_printf(b, "outboxd_http_request_duration_seconds_bucket{route=\"");
            sb_label(b, m->paths[i]);
            if (k < NDUR)
                sb_printf(b, "\",le=\"%g\"} %llu\n", DUR_BOUNDS[k],
                          (unsigned long long)cum);
            else
                sb_printf(b, "\",le=\"+Inf\"} %llu\n", (unsigned long long)cum);
        }
        sb_printf(b, "outboxd_http_request_duration_seconds_sum{route=\"");
        sb_label(b, m->paths[i]);
        sb_printf(b, "\"} %.9g\n", h->sum);
        sb_printf(b, "outboxd_http_request_duration_seconds_count{route=\"");
        sb_label(b, m->paths[i]);
        sb_printf(b, "\"} %llu\n", (unsigned long long)h->count);
    }
    pthread_mutex_unlock(&m->mu);
}

/* ---- broker_core families ------------------------------------------------------------ */

static void render_store(sbuf *b, brk_store *s, uint64_t commits,
                         const api_metrics *m)
{
    family(b, "outboxd_messages_published_total", "counter",
           "Messages made visible or scheduled: send, delayed (scheduled), "
           "commit (transactions committed).");
    sb_printf(b, "outboxd_messages_published_total{kind=\"send\"} %llu\n",
              (unsigned long long)atomic_load(&m->published[API_PUB_SEND]));
    sb_printf(b, "outboxd_messages_published_total{kind=\"delayed\"} %llu\n",
              (unsigned long long)atomic_load(&m->published[API_PUB_DELAYED]));
    sb_printf(b, "outboxd_messages_published_total{kind=\"commit\"} %llu\n",
              (unsigned long long)commits);

    brk_store_stats st;
    brk_store_get_stats(s, &st);
    gauge1(b, "outboxd_store_appends_total", "counter",
           "Records appended to the commit log since start.",
           (double)st.appends);
    gauge1(b, "outboxd_store_bytes", "gauge",
           "Bytes on disk: log, indexes and consume queues.",
           (double)st.disk_bytes);
    gauge1(b, "outboxd_store_segments", "gauge", "Commit-log segments.",
           (double)st.segments);
    family(b, "outboxd_store_fsync_seconds", "histogram",
           "Duration of commit-log fdatasyncs.");
    uint64_t cum = 0;
    for (unsigned i = 0; i < BRK_FSYNC_BUCKETS; i++) {
        cum += st.fsync_hist[i];
        uint64_t us = brk_fsync_bucket_us(i);
        if (us == UINT64_MAX)
            sb_printf(b, "outboxd_store_fsync_seconds_bucket{le=\"+Inf\"} "
                      "%llu\n", (unsigned long long)cum);
        else
            sb_printf(b, "outboxd_store_fsync_seconds_bucket{le=\"%g\"} "
                      "%llu\n", (double)us / 1e6, (unsigned long long)cum);
    }
    sb_printf(b, "outboxd_store_fsync_seconds_sum %.9g\n",
              (double)st.fsync_ns_total / 1e9);
    sb_printf(b, "outboxd_store_fsync_seconds_count %llu\n",
              (unsigned long long)cum);
    gauge1(b, "outboxd_store_failed", "gauge",
           "1 when the store refuses writes after an I/O failure.",
           st.failed ? 1 : 0);
}

static double age_s(int64_t now_ms, int64_t then_ms)
{
    return then_ms > 0 && now_ms > then_ms ? (double)(now_ms - then_ms) / 1000
                                           : 0;
}

static void render_txn(sbuf *b, const brk_txn_stats *t, int64_t now)
{
    family(b, "outboxd_transactions_total", "counter",
           "Transactions by outcome since start.");
    sb_printf(b, "outboxd_transactions_total{outcome=\"prepared\"} %llu\n"
              "outboxd_transactions_total{outcome=\"committed\"} %llu\n"
              "outboxd_transactions_total{outcome=\"rolled_back\"} %llu\n"
              "outboxd_transactions_total{outcome=\"expired\"} %llu\n",
              (unsigned long long)t->prepared_total,
              (unsigned long long)t->committed_total,
              (unsigned long long)t->rolled_back_total,
              (unsigned long long)t->expired_total);
    family(b, "outboxd_checkbacks_total", "counter",
           "Check-back answers by result since start.");
    sb_printf(b, "outboxd_checkbacks_total{result=\"commit\"} %llu\n"
              "outboxd_checkbacks_total{result=\"rollback\"} %llu\n"
              "outboxd_checkbacks_total{result=\"unknown\"} %llu\n"
              "outboxd_checkbacks_total{result=\"error\"} %llu\n",
              (unsigned long long)t->checks_commit_total,
              (unsigned long long)t->checks_rollback_total,
              (unsigned long long)t->checks_unknown_total,
              (unsigned long long)t->checks_error_total);
    gauge1(b, "outboxd_transactions_pending", "gauge",
           "Prepared transactions waiting for a verdict (stuck included).",
           (double)t->pending);
    gauge1(b, "outboxd_transactions_stuck", "gauge",
           "Prepared transactions whose checks ran out (hold policy).",
           (double)t->stuck);
    gauge1(b, "outboxd_transactions_oldest_pending_age_seconds", "gauge",
           "Age of the oldest prepared transaction; 0 when none.",
           age_s(now, t->oldest_pending_ms));
}

static void render_delay(sbuf *b, brk_delay *d)
{
    brk_delay_stats st;
    brk_delay_get_stats(d, &st);
    gauge1(b, "outboxd_delayed_pending", "gauge",
           "Delayed messages waiting for their time.", (double)st.pending);
    gauge1(b, "outboxd_delayed_fired_total", "counter",
           "Delayed messages delivered into their topic since start.",
           (double)st.fired_total);
}

/* ---- consumer groups ---------------------------------------------------------------- */

typedef struct grp_row {
    size_t group;                   /* index into names */
    char topic[BRK_TOPIC_MAX + 1];
    uint64_t lag, inflight;
    int64_t oldest_ms;              /* 0: none */
} grp_row;

typedef struct grp_gather {
    brk_group_name *names;
    size_t nnames;
    uint64_t *dead;                 /* [nnames] */
    grp_row *rows;
    size_t nrows, cap;
} grp_gather;

/* Fold a totals row into the (group, topic) row. */
static bool gather_row(grp_gather *g, size_t gi, const brk_group_lag_row *r)
{
    grp_row *x = NULL;
    for (size_t i = 0; i < g->nrows && !x; i++)
        if (g->rows[i].group == gi && strcmp(g->rows[i].topic, r->topic) == 0)
            x = &g->rows[i];
    if (!x) {
        if (g->nrows == g->cap) {
            size_t nc = g->cap ? g->cap * 2 : 16;
            grp_row *v = realloc(g->rows, nc * sizeof *v);
            if (!v)
                return false;
            g->rows = v;
            g->cap = nc;
        }
        x = &g->rows[g->nrows++];
        memset(x, 0, sizeof *x);
        x->group = gi;
        snprintf(x->topic, sizeof x->topic, "%s", r->topic);
    }
    x->lag += r->lag;
    x->inflight += r->inflight;
    if (r->oldest_unacked_ms
        && (!x->oldest_ms || r->oldest_unacked_ms < x->oldest_ms))
        x->oldest_ms = r->oldest_unacked_ms;
    return true;
}

static bool gather_groups(brk_groups *G, grp_gather *g)
{
    memset(g, 0, sizeof *g);
    if (brk_groups_list(G, &g->names, &g->nnames) != BRK_OK)
        return true;                /* closing: no group rows */
    g->dead = calloc(g->nnames ? g->nnames : 1, sizeof *g->dead);
    if (!g->dead)
        return false;
    for (size_t gi = 0; gi < g->nnames; gi++) {
        brk_group_lag_row *rows = NULL;
        size_t n = 0;
        if (brk_group_lag(G, g->names[gi], &rows, &n) != BRK_OK)
            continue;
        for (size_t i = 0; i < n; i++) {
            if (rows[i].queue != -1)
                continue;
            g->dead[gi] = rows[i].dead_letters;   /* group-wide */
            if (!gather_row(g, gi, &rows[i])) {
                free(rows);
                return false;
            }
        }
        free(rows);
    }
    return true;
}

static void gather_free(grp_gather *g)
{
    free(g->names);
    free(g->dead);
    free(g->rows);
}

static void group_sample(sbuf *b, const char *name, const grp_gather *g,
                         const grp_row *r)
{
    sb_printf(b, "%s{group=\"", name);
    sb_label(b, g->names[r->group]);
    sb_printf(b, "\",topic=\"");
    sb_label(b, r->topic);
    sb_printf(b, "\"} ");
}

static void render_groups(sbuf *b, const grp_gather *g, int64_t now)
{
    family(b, "outboxd_group_lag", "gauge",
           "Messages not yet acked by the group, per topic.");
    for (size_t i = 0; i < g->nrows; i++) {
        group_sample(b, "outboxd_group_lag", g, &g->rows[i]);
        sb_printf(b, "%llu\n", (unsigned long long)g->rows[i].lag);
    }
    family(b, "outboxd_group_inflight", "gauge",
           "Messages received and not yet settled, per topic.");
    for (size_t i = 0; i < g->nrows; i++) {
        group_sample(b, "outboxd_group_inflight", g, &g->rows[i]);
        sb_printf(b, "%llu\n", (unsigned long long)g->rows[i].inflight);
    }
    family(b, "outboxd_group_oldest_unacked_age_seconds", "gauge",
           "Age of the oldest message not yet acked; 0 when none.");
    for (size_t i = 0; i < g->nrows; i++) {
        group_sample(b, "outboxd_group_oldest_unacked_age_seconds", g,
                     &g->rows[i]);
        sb_printf(b, "%.3f\n", age_s(now, g->rows[i].oldest_ms));
    }
    family(b, "outboxd_group_dead_letters", "gauge",
           "Messages in the group's dead-letter topic.");
    for (size_t i = 0; i < g->nnames; i++) {
        sb_printf(b, "outboxd_group_dead_letters{group=\"");
        sb_label(b, g->names[i]);
        sb_printf(b, "\"} %llu\n", (unsigned long long)g->dead[i]);
    }
}

/* The caller's families: its FILE is a memory stream, copied in after.
 * Each scrape has its own stream, so concurrent scrapes share nothing here
 * (the hook itself must be thread-safe, api.h). */
static void render_ext(sbuf *b, const api_metrics_ext *ext)
{
    if (!ext || !ext->render || b->oom)
        return;
    char *text = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&text, &n);
    if (!f) {
        b->oom = true;
        return;
    }
    ext->render(ext->ctx, f);
    if (fclose(f) != 0)
        b->oom = true;
    else if (n)
        /* every line of the page ends with '\n', also the page's last */
        sb_printf(b, "%.*s%s", (int)n, text, text[n - 1] == '\n' ? "" : "\n");
    free(text);
}

char *api_metrics_render(api_metrics *m, const api_metrics_src *src,
                         size_t *len)
{
    sbuf b = { malloc(16384), 0, 16384, false };
    if (!b.p)
        return NULL;
    b.p[0] = 0;
    brk_txn_stats ts;
    brk_txn_get_stats(src->txn, &ts);
    grp_gather gg;
    bool gok = gather_groups(src->groups, &gg);

    render_requests(m, &b);
    render_store(&b, src->store, ts.committed_total, m);
    render_txn(&b, &ts, src->now_ms);
    render_delay(&b, src->delay);
    if (gok)
        render_groups(&b, &gg, src->now_ms);
    gather_free(&gg);
    api_idem_stats is;
    memset(&is, 0, sizeof is);
    if (src->idem)
        api_idem_get_stats(src->idem, &is);
    gauge1(&b, "outboxd_idempotency_keys", "gauge",
           "Idempotency keys remembered now.", (double)is.keys);
    gauge1(&b, "outboxd_idempotency_replays_total", "counter",
           "Requests answered from the idempotency table.",
           (double)is.replays_total);
    gauge1(&b, "outboxd_ready", "gauge",
           "1 when /readyz answers 200.", src->ready ? 1 : 0);
    family(&b, "outboxd_build_info", "gauge", "Build information.");
    sb_printf(&b, "outboxd_build_info{version=\"");
    sb_label(&b, OUTBOXD_VERSION);
    sb_printf(&b, "\"} 1\n");
    render_ext(&b, src->ext);
    if (b.oom || !gok) {
        free(b.p);
        return NULL;
    }
    if (len)
        *len = b.len;
    return b.p;
}
