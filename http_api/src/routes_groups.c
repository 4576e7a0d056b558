/*
 * routes_groups.c - consumer groups.
 *
 *   PUT  /v1/groups/{group}                        brk_group_put       201/200
 *   GET  /v1/groups/{group}                        brk_group_lag       200
 *   POST /v1/groups/{group}/receive                brk_group_receive
 *                                                  (+ brk_group_wait)  200/429
 *   POST /v1/groups/{group}/ack                    brk_group_ack       200
 *   POST /v1/groups/{group}/nack                   brk_group_nack      200
 *   GET  /v1/groups/{group}/dead-letters           brk_group_dead_letters
 *   POST /v1/groups/{group}/dead-letters/replay    brk_group_replay_dead_letters
 *
 * LONG POLL (receive with wait_ms > 0 and an api_wait):
 *
 *   round 1: apply "filter" (once per handler and (group, topic), see
 *            api_filter_known), deadline = now + wait_ms, receive
 *   every round: cancel a waiter still registered (harmless when its
 *            callback ran), receive;
 *            messages                    -> 200
 *            none, in-flight bound       -> 429 (Retry-After 1)
 *            none, now < deadline, not draining
 *                                        -> brk_group_wait, API_WAIT
 *            none otherwise              -> 200 {"messages": []}
 *
 * PUT and the config: brk_group_put takes the whole config or none.  A PUT
 * that names none of fifo / broadcast / max_deliveries / max_inflight
 * leaves the group's config as it is (only the subscription and its filter
 * change); one that names some changes those and keeps the others as the
 * group has them (brk_group_get_config; defaults for a new group).
 */
#include "api_priv.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"

#define DLQ_PREFIX   "outboxd-dlq-"
#define REPLAY_MAX   100000
#define REPLAY_CHUNK 1000                /* the broker's per-call bound */

static const char *const GROUP_PUT_FIELDS[] = {
    "topic", "filter", "fifo", "broadcast", "max_deliveries", "max_inflight",
    NULL
};
static const char *const RECEIVE_FIELDS[] = {
    "topic", "max", "wait_ms", "invisible_ms", "filter", "member", NULL
};
static const char *const ACK_FIELDS[] = { "receipts", NULL };
static const char *const NACK_FIELDS[] = { "receipts", "delay_ms", "reason",
                                           NULL };
static const char *const REPLAY_FIELDS[] = { "max", NULL };

static bool bad(api_call *c, brk_status st, const char *err)
{
    api_fail(c, st, "%s", err);
    return false;
}

static api_outcome topic_missing(api_call *c, const char *topic)
{
    return api_problem(c, API_PROB_NOT_FOUND, "topic '%s' does not exist and "
                       "topics are not created automatically", topic);
}

static api_outcome group_missing(api_call *c)
{
    return api_problem(c, API_PROB_NOT_FOUND, "group '%s' not found",
                       c->param);
}

/* "filter": a tag expression, borrowed from the body. */
static bool parse_filter(api_call *c, const char **filter)
{
    char err[256];
    *filter = NULL;
    brk_status st = api_json_cstr(c->body, "", "filter", BRK_FILTER_MAX, true,
                                  filter, NULL, err, sizeof err);
    return st == BRK_OK || bad(c, st, err);
}

static api_outcome filter_bad(api_call *c)
{
    return api_problem(c, API_PROB_BAD_REQUEST, "field 'filter' must be a tag "
                       "expression: \"*\" or \"tag\" or \"a || b\"");
}

/* ---- PUT /v1/groups/{group} ------------------------------------------------------------ */

/* The config fields; *cfgp NULL when none was given. */
static bool parse_group_cfg(api_call *c, brk_group_config *cfg,
                            const brk_group_config **cfgp)
{
    char err[256];
    bool has[4];
    int64_t md = 0, mi = 0;
    if (brk_group_get_config(c->h->b.groups, c->param, cfg) != BRK_OK)
        brk_group_config_init(cfg);     /* a new group (or closing: put says) */
    *cfgp = NULL;
    brk_status st = api_json_bool(c->body, "", "fifo", &cfg->fifo, &has[0],
                                  err, sizeof err);
    if (st == BRK_OK)
        st = api_json_bool(c->body, "", "broadcast", &cfg->broadcast, &has[1],
                           err, sizeof err);
    if (st == BRK_OK)
        st = api_json_int(c->body, "", "max_deliveries", 1, 1000, &md,
                          &has[2], err, sizeof err);
    if (st == BRK_OK)
        st = api_json_int(c->body, "", "max_inflight", 1, 1000000, &mi,
                          &has[3], err, sizeof err);
    if (st != BRK_OK)
        return bad(c, st, err);
    if (has[2])
        cfg->max_deliveries = (uint16_t)md;
    if (has[3])
        cfg->max_inflight = (uint32_t)mi;
    if (has[0] || has[1] || has[2] || has[3])
        *cfgp = cfg;
    return true;
}

api_outcome api_route_group_put(api_call *c)
{
    char topic[BRK_TOPIC_MAX + 1];
    const char *filter;
    brk_group_config cfg;
    const brk_group_config *cfgp;
    if (!api_param_group(c) || !api_fields_ok(c, GROUP_PUT_FIELDS)
        || !api_body_name(c, c->body, "", "topic", true, api_topic_problem,
                          topic, sizeof topic, NULL)
        || !parse_filter(c, &filter) || !parse_group_cfg(c, &cfg, &cfgp))
        return API_DONE;
    bool created = false;
    api_filter_begin(c->h, c->param, topic);
    brk_status st = brk_group_put(c->h->b.groups, c->param, topic, filter,
                                  cfgp, &created);
    api_filter_end(c->h, c->param, topic,
                   st != BRK_OK ? NULL : filter ? filter : "*");
    if (st == BRK_INVAL)
        return filter ? filter_bad(c) : api_problem(c, API_PROB_BAD_REQUEST,
                                                   "the group was refused as "
                                                   "invalid");
    if (st == BRK_NOTFOUND)
        return topic_missing(c, topic);
    if (st == BRK_CONFLICT)
        return api_problem(c, API_PROB_CONFLICT, "group '%s' has progress: "
                           "'fifo' and 'broadcast' cannot change (or its "
                           "retry topic name collides with another group's)",
                           c->param);
    if (st != BRK_OK)
        return api_fail(c, st, "%s", brk_strerror(st));
    json_t *o = api_obj();
    bool ok = o && api_json_put(o, "group", json_string(c->param))
              && api_json_put(o, "topic", json_string(topic))
              && api_json_put(o, "created", json_boolean(created));
    return api_reply(c, created ? 201 : 200, o, ok);
}

/* ---- receive -------------------------------------------------------------------------------- */

typedef struct recv_args {
    char topic[BRK_TOPIC_MAX + 1];
    char member[BRK_MEMBER_MAX + 1];
    bool has_member;
    const char *filter;             /* borrowed from the body; NULL: none */
    int64_t max, wait_ms, invisible_ms;
} recv_args;

static bool parse_receive(api_call *c, recv_args *a)
{
    char err[256];
    a->max = 16;
    a->wait_ms = c->h->cfg.default_wait_ms;
    a->invisible_ms = 30000;
    if (!api_param_group(c) || !api_fields_ok(c, RECEIVE_FIELDS)
        || !api_body_name(c, c->body, "", "topic", true, api_topic_problem,
                          a->topic, sizeof a->topic, NULL)
        || !api_body_name(c, c->body, "", "member", false, api_member_problem,
                          a->member, sizeof a->member, &a->has_member)
        || !parse_filter(c, &a->filter))
        return false;
    brk_status st = api_json_int(c->body, "", "max", 1, BRK_RECEIVE_MAX,
                                 &a->max, NULL, err, sizeof err);
    if (st == BRK_OK)
        st = api_json_int(c->body, "", "wait_ms", 0, BRK_WAIT_MAX_MS,
                          &a->wait_ms, NULL, err, sizeof err);
    if (st == BRK_OK)
        st = api_json_int(c->body, "", "invisible_ms", 1000, 43200000,
                          &a->invisible_ms, NULL, err, sizeof err);
    return st == BRK_OK || bad(c, st, err);
}

static api_outcome receive_failed(api_call *c, const recv_args *a,
                                  brk_status st)
{
    switch (st) {
    case BRK_INVAL:
        if (!a->has_member)
            return api_problem(c, API_PROB_BAD_REQUEST, "group '%s' is a "
                               "broadcast group: field 'member' is required",
                               c->param);
        return api_problem(c, API_PROB_BAD_REQUEST, "the receive was refused "
                           "as invalid");
    case BRK_NOTFOUND:
        return topic_missing(c, a->topic);
    case BRK_LIMIT:
        return api_problem(c, API_PROB_TOO_MANY, "group '%s' is at its "
                           "in-flight bound (max_inflight): ack or nack "
                           "messages first", c->param);
    case BRK_CONFLICT:
        return api_problem(c, API_PROB_CONFLICT, "group '%s' cannot consume "
                           "topic '%s': %s", c->param, a->topic,
                           brk_strerror(st));
    default:
        return api_fail(c, st, "receive failed: %s", brk_strerror(st));
    }
}

/* Set the subscription's filter unless this handler already did. */
static bool apply_filter(api_call *c, const recv_args *a)
{
    if (api_filter_known(c->h, c->param, a->topic, a->filter))
        return true;
    api_filter_begin(c->h, c->param, a->topic);
    brk_status st = brk_group_put(c->h->b.groups, c->param, a->topic,
                                  a->filter, NULL, NULL);
    api_filter_end(c->h, c->param, a->topic,
                   st == BRK_OK ? a->filter : NULL);
    if (st == BRK_OK)
        return true;
    if (st == BRK_INVAL)
        filter_bad(c);
    else
        receive_failed(c, a, st);
    return false;
}

static json_t *received_json(const brk_received *r)
{
    json_t *o = json_object();
    bool ok = o && api_json_put(o, "msg_id", api_json_uuid(r->rec.msg_id))
              && api_json_put(o, "receipt", json_string(r->receipt))
              && api_json_put(o, "topic", api_json_text(r->rec.topic.ptr,
                                                        r->rec.topic.len))
              && api_json_put(o, "queue", json_integer(r->queue))
              && api_json_put(o, "offset", json_integer((json_int_t)r->offset))
              && api_msg_to_json(o, &r->rec, NULL) == BRK_OK
              && api_json_put(o, "delivery_count",
                              json_integer(r->delivery_count))
              && api_json_put(o, "born_at", api_json_time(r->rec.born_ms,
                                                          false));
    if (!ok) {
        json_decref(o);
        return NULL;
    }
    return o;
}

static api_outcome reply_messages(api_call *c, const brk_receive_batch *b)
{
    json_t *arr = json_array();
    bool ok = arr != NULL;
    for (size_t i = 0; ok && b && i < b->count; i++)
        ok = json_array_append_new(arr, received_json(&b->msgs[i])) == 0;
    json_t *o = api_obj();
    ok = ok && o && api_json_put(o, "messages", json_incref(arr));
    json_decref(arr);
    return api_reply(c, 200, o, ok);
}

/* Nothing to deliver: park when allowed, else answer the empty list. */
static api_outcome park_or_empty(api_call *c, const recv_args *a,
                                 const brk_receive_req *rq)
{
    api_wait *w = c->w;
    if (w && w->wake && a->wait_ms > 0 && !api_handler_draining(c->h)
        && c->now_ms < w->deadline_ms) {
        brk_status st = brk_group_wait(c->h->b.groups, rq, w->deadline_ms,
                                       w->wake, w->wake_ctx, &w->waiter_id);
        if (st != BRK_OK)
            return receive_failed(c, a, st);
        w->registered = true;
        return API_WAIT;
    }
    return reply_messages(c, NULL);
}

void api_wait_cancel(api_handler *h, api_wait *w)
{
    if (!h || !w || !w->registered)
        return;
    /* False when the callback ran already; waits for one that is running,
     * so wake() is never called for w after this returns. */
    (void)brk_group_wait_cancel(h->b.groups, w->waiter_id);
    w->registered = false;
    w->waiter_id = 0;
}

api_outcome api_route_group_receive(api_call *c)
{
    api_wait *w = c->w;
    /* Normally the callback ran (that is why we are here); a round that
     * comes early (a test, a spurious resume) must not leave it behind. */
    api_wait_cancel(c->h, w);
    recv_args a;
    memset(&a, 0, sizeof a);
    if (!parse_receive(c, &a))
        return API_DONE;
    bool first = !w || w->deadline_ms == 0;
    if (first && a.filter && !apply_filter(c, &a))
        return API_DONE;
    if (first && w && a.wait_ms > 0)
        w->deadline_ms = c->now_ms + a.wait_ms;
    brk_receive_req rq = {
        .group = c->param,
        .topic = a.topic,
        .member = a.has_member ? a.member : NULL,
        .max = (uint32_t)a.max,
        .invisible_ms = (uint32_t)a.invisible_ms,
    };
    brk_receive_batch *b = NULL;
    brk_status st = brk_group_receive(c->h->b.groups, &rq, &b);
    api_outcome o;
    if (st == BRK_OK && b && b->count > 0)
        o = reply_messages(c, b);
    else if (st != BRK_OK)
        o = receive_failed(c, &a, st);
    else
        o = park_or_empty(c, &a, &rq);
    brk_receive_batch_free(b);
    return o;
}

/* ---- ack / nack ---------------------------------------------------------------------------- */

/* Whether the group exists (a receipt check alone cannot say: a malformed
 * receipt is refused before the group is looked up). */
static brk_status group_known(api_call *c)
{
    brk_batch *b = NULL;
    brk_status st = brk_group_dead_letters(c->h->b.groups, c->param, 0, 0, &b);
    brk_batch_free(b);
    return st;
}

static bool parse_receipts(api_call *c, json_t **arr)
{
    *arr = json_object_get(c->body, "receipts");
    if (!*arr || !json_is_array(*arr) || json_array_size(*arr) < 1
        || json_array_size(*arr) > BRK_RECEIVE_MAX) {
        api_problem(c, API_PROB_BAD_REQUEST, "field 'receipts' must be an "
                    "array of 1..%d strings", BRK_RECEIVE_MAX);
        return false;
    }
    for (size_t i = 0; i < json_array_size(*arr); i++)
        if (!json_is_string(json_array_get(*arr, i))) {
            api_problem(c, API_PROB_BAD_REQUEST, "field 'receipts[%zu]' must "
                        "be a string", i);
            return false;
        }
    return true;
}

typedef struct settle_args {
    bool nack;
    uint32_t delay_ms;
    const char *reason;             /* borrowed; NULL: none */
} settle_args;

static bool add_failed(json_t *failed, json_t *receipt, const char *why)
{
    json_t *f = json_object();
    bool ok = f && api_json_put(f, "receipt", json_incref(receipt))
              && api_json_put(f, "reason", json_string(why));
    if (!ok) {
        json_decref(f);
        return false;
    }
    return json_array_append_new(failed, f) == 0;
}

static api_outcome settle(api_call *c, const settle_args *s, json_t *rs)
{
    brk_status st = group_known(c);
    if (st == BRK_NOTFOUND)
        return group_missing(c);
    if (st != BRK_OK)
        return api_fail(c, st, "%s", brk_strerror(st));
    json_t *failed = json_array();
    bool ok = failed != NULL;
    size_t done = 0;
    for (size_t i = 0; ok && i < json_array_size(rs); i++) {
        json_t *r = json_array_get(rs, i);
        const char *txt = json_string_value(r);
        bool sane = json_string_length(r) == strlen(txt)
                    && json_string_length(r) <= BRK_RECEIPT_MAX;
        st = !sane ? BRK_INVAL
             : s->nack ? brk_group_nack(c->h->b.groups, c->param, txt,
                                        s->delay_ms, s->reason)
                       : brk_group_ack(c->h->b.groups, c->param, txt);
        if (st == BRK_OK)
            done++;
        else if (st == BRK_INVAL)
            ok = add_failed(failed, r, "malformed");
        else if (st == BRK_CONFLICT)
            ok = add_failed(failed, r, "stale");
        else
            break;
    }
    if (ok && st != BRK_OK && st != BRK_INVAL && st != BRK_CONFLICT) {
        json_decref(failed);
        if (st == BRK_NOTFOUND)
            return group_missing(c);
        return api_fail(c, st, "%s failed after %zu receipts: %s",
                        s->nack ? "nack" : "ack", done, brk_strerror(st));
    }
    json_t *o = api_obj();
    ok = ok && o && api_json_put(o, s->nack ? "nacked" : "acked",
                                 json_integer((json_int_t)done))
         && api_json_put(o, "failed", json_incref(failed));
    json_decref(failed);
    return api_reply(c, 200, o, ok);
}

api_outcome api_route_group_ack(api_call *c)
{
    json_t *rs;
    if (!api_param_group(c) || !api_fields_ok(c, ACK_FIELDS)
        || !parse_receipts(c, &rs))
        return API_DONE;
    settle_args s = { false, 0, NULL };
    return settle(c, &s, rs);
}

api_outcome api_route_group_nack(api_call *c)
{
    char err[256];
    json_t *rs;
    int64_t delay = 0;
    settle_args s = { true, 0, NULL };
    if (!api_param_group(c) || !api_fields_ok(c, NACK_FIELDS)
        || !parse_receipts(c, &rs))
        return API_DONE;
    /* Any u32: the broker rounds it up to a delay level, at most 2 h. */
    brk_status st = api_json_int(c->body, "", "delay_ms", 0, UINT32_MAX,
                                 &delay, NULL, err, sizeof err);
    if (st == BRK_OK)
        st = api_json_cstr(c->body, "", "reason", 1024, false, &s.reason,
                           NULL, err, sizeof err);
    if (st != BRK_OK)
        return api_fail(c, st, "%s", err);
    s.delay_ms = (uint32_t)delay;
    return settle(c, &s, rs);
}

/* ---- GET /v1/groups/{group} ------------------------------------------------------------------ */

static json_t *queue_row_json(const brk_group_lag_row *r)
{
    json_t *o = json_object();
    bool ok = o && api_json_put(o, "queue", json_integer(r->queue))
              && api_json_put(o, "max_offset", json_integer((json_int_t)r->max_offset))
              && api_json_put(o, "committed_offset",
                              json_integer((json_int_t)r->committed_offset))
              && api_json_put(o, "lag", json_integer((json_int_t)r->lag))
              && api_json_put(o, "inflight", json_integer((json_int_t)r->inflight));
    if (!ok) {
        json_decref(o);
        return NULL;
    }
    return o;
}

/* A subscription object from its totals row and its queue rows (taken). */
static json_t *sub_json(const brk_group_lag_row *t, json_t *queues)
{
    json_t *o = json_object();
    bool ok = o && api_json_put(o, "topic", json_string(t->topic))
              && api_json_put(o, "member", t->member[0]
                                               ? json_string(t->member)
                                               : json_null())
              && api_json_put(o, "lag", json_integer((json_int_t)t->lag))
              && api_json_put(o, "inflight", json_integer((json_int_t)t->inflight))
              && api_json_put(o, "dead_letters",
                              json_integer((json_int_t)t->dead_letters))
              && api_json_put(o, "oldest_unacked_at",
                              api_json_time(t->oldest_unacked_ms, true));
    if (ok)
        ok = api_json_put(o, "queues", queues);     /* taken either way */
    else
        json_decref(queues);
    if (!ok) {
        json_decref(o);
        return NULL;
    }
    return o;
}

static bool subs_json(const brk_group_lag_row *rows, size_t n, json_t *subs)
{
    json_t *queues = json_array();
    bool ok = queues != NULL;
    for (size_t i = 0; ok && i < n; i++) {
        if (rows[i].queue >= 0) {
            ok = json_array_append_new(queues, queue_row_json(&rows[i])) == 0;
            continue;
        }
        ok = json_array_append_new(subs, sub_json(&rows[i], queues)) == 0;
        queues = ok ? json_array() : NULL;
        ok = ok && queues != NULL;
    }
    json_decref(queues);
    return ok;
}

api_outcome api_route_group_get(api_call *c)
{
    if (!api_param_group(c))
        return API_DONE;
    brk_group_lag_row *rows = NULL;
    size_t n = 0;
    brk_status st = brk_group_lag(c->h->b.groups, c->param, &rows, &n);
    if (st == BRK_NOTFOUND)
        return group_missing(c);
    if (st != BRK_OK)
        return api_fail(c, st, "%s", brk_strerror(st));
    json_t *subs = json_array();
    bool ok = subs && subs_json(rows, n, subs);
    free(rows);
    json_t *o = api_obj();
    ok = ok && o && api_json_put(o, "group", json_string(c->param))
         && api_json_put(o, "subscriptions", json_incref(subs));
    json_decref(subs);
    return api_reply(c, 200, o, ok);
}

/* ---- dead letters ---------------------------------------------------------------------------- */

static bool prop_u64(brk_bytes props, const char *name, uint64_t *out)
{
    brk_bytes v;
    if (brk_props_get(props, name, &v) != BRK_OK || v.len == 0 || v.len > 19)
        return false;
    uint64_t x = 0;
    for (size_t i = 0; i < v.len; i++) {
        char ch = ((const char *)v.ptr)[i];
        if (ch < '0' || ch > '9')
            return false;
        x = x * 10 + (uint64_t)(ch - '0');
    }
    *out = x;
    return true;
}

static json_t *prop_text(brk_bytes props, const char *name)
{
    brk_bytes v;
    if (brk_props_get(props, name, &v) != BRK_OK)
        return json_null();
    return api_json_text(v.ptr, v.len);
}

static json_t *dead_letter_json(const brk_record *r)
{
    uint64_t queue = 0, offset = 0, count = 0;
    (void)prop_u64(r->props, DLQ_PREFIX "queue", &queue);
    (void)prop_u64(r->props, DLQ_PREFIX "offset", &offset);
    (void)prop_u64(r->props, DLQ_PREFIX "deliveries", &count);
    json_t *o = json_object();
    bool ok = o && api_json_put(o, "index", json_integer((json_int_t)r->queue_offset))
              && api_json_put(o, "msg_id", api_json_uuid(r->msg_id))
              && api_json_put(o, "topic", prop_text(r->props, DLQ_PREFIX "topic"))
              && api_json_put(o, "queue", json_integer((json_int_t)queue))
              && api_json_put(o, "offset", json_integer((json_int_t)offset))
              && api_json_put(o, "delivery_count", json_integer((json_int_t)count))
              && api_json_put(o, "reason", prop_text(r->props, DLQ_PREFIX "reason"))
              && api_msg_to_json(o, r, DLQ_PREFIX) == BRK_OK
              && api_json_put(o, "born_at", api_json_time(r->born_ms, false));
    if (!ok) {
        json_decref(o);
        return NULL;
    }
    return o;
}

api_outcome api_route_group_dlq_list(api_call *c)
{
    api_qparam q[2] = { { .name = "from" }, { .name = "limit" } };
    int64_t from, limit;
    if (!api_param_group(c) || !api_query(c, q, 2)
        || !api_query_int(c, &q[0], 0, INT64_MAX, 0, &from)
        || !api_query_int(c, &q[1], 1, 1000, 100, &limit))
        return API_DONE;
    brk_batch *b = NULL;
    brk_status st = brk_group_dead_letters(c->h->b.groups, c->param,
                                           (uint64_t)from, (size_t)limit, &b);
    if (st == BRK_NOTFOUND)
        return group_missing(c);
    if (st != BRK_OK)
        return api_fail(c, st, "%s", brk_strerror(st));
    json_t *arr = json_array();
    bool ok = arr != NULL;
    for (size_t i = 0; ok && i < b->count; i++)
        ok = json_array_append_new(arr, dead_letter_json(&b->recs[i])) == 0;
    uint64_t next = b->count ? b->next_offset : (uint64_t)from;
    brk_batch_free(b);
    json_t *o = api_obj();
    ok = ok && o && api_json_put(o, "dead_letters", json_incref(arr))
         && api_json_put(o, "next", json_integer((json_int_t)next));
    json_decref(arr);
    return api_reply(c, 200, o, ok);
}

api_outcome api_route_group_dlq_replay(api_call *c)
{
    char err[256];
    int64_t max = 1000;
    if (!api_param_group(c) || !api_fields_ok(c, REPLAY_FIELDS))
        return API_DONE;
    brk_status st = api_json_int(c->body, "", "max", 1, REPLAY_MAX, &max, NULL,
                                 err, sizeof err);
    if (st != BRK_OK)
        return api_fail(c, st, "%s", err);
    size_t total = 0, got = 0;
    do {
        size_t want = (size_t)max - total;
        if (want > REPLAY_CHUNK)
            want = REPLAY_CHUNK;
        st = brk_group_replay_dead_letters(c->h->b.groups, c->param, want,
                                           &got);
        total += got;
        if (st != BRK_OK || got < want)
            break;
    } while (total < (size_t)max);
    if (st == BRK_NOTFOUND && total == 0)
        return group_missing(c);
    if (st != BRK_OK)
        return api_fail(c, st, "replay stopped after %zu dead letters: %s",
                        total, brk_strerror(st));
    json_t *o = api_obj();
    bool ok = o && api_json_put(o, "replayed", json_integer((json_int_t)total));
    return api_reply(c, 200, o, ok);
}
