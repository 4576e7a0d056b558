/*
 * routes_send.c - sending messages and the topic routes.
 *
 *   POST /v1/topics/{topic}/messages   brk_store_append (plain) or
 *                                      brk_delay_send (delayed)      201
 *   PUT  /v1/topics/{topic}            brk_topic_resize              201/200
 *   GET  /v1/topics                    brk_topic_list                200
 *   GET  /v1/topics/{topic}            brk_topic_get + queue ranges  200
 *
 * A send is delayed when it asks for delay_ms > 0, a delay_level, or a
 * deliver_at later than the store clock's now; deliver_at in the past or
 * delay_ms 0 is a plain send.  The 201 goes out only after the broker call
 * returned OK, i.e. as durable as the store's flush mode makes it.  With an
 * Idempotency-Key the message id (and, delayed, the deliver time) come from
 * the key's ticket, so a retry after a lost response reuses them.
 */
#include "api_priv.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"

static const char *const SEND_FIELDS[] = {
    API_MSG_FIELDS, "delay_ms", "delay_level", "deliver_at", NULL
};
static const char *const TOPIC_PUT_FIELDS[] = { "queues", NULL };

/* When the message is due: 0 for a plain send. */
static bool parse_send_delay(api_call *c, int64_t *deliver_at)
{
    char err[256];
    int64_t delay = 0, level = 0, at = 0;
    bool has_delay, has_level, has_at;
    const char *s = NULL;
    size_t n = 0;
    brk_status st = api_json_int(c->body, "", "delay_ms", 0, INT64_MAX,
                                 &delay, &has_delay, err, sizeof err);
    if (st == BRK_OK)
        st = api_json_int(c->body, "", "delay_level", 1, BRK_DELAY_LEVELS,
                          &level, &has_level, err, sizeof err);
    if (st == BRK_OK)
        st = api_json_str(c->body, "", "deliver_at", 64, false, &s, &n,
                          &has_at, err, sizeof err);
    if (st != BRK_OK) {
        api_fail(c, st, "%s", err);
        return false;
    }
    if (has_delay + has_level + has_at > 1) {
        api_problem(c, API_PROB_BAD_REQUEST, "at most one of the fields "
                    "'delay_ms', 'delay_level' and 'deliver_at' may be given");
        return false;
    }
    if (has_at && api_time_parse(s, n, &at) != BRK_OK) {
        api_problem(c, API_PROB_BAD_REQUEST, "field 'deliver_at' must be an "
                    "RFC 3339 time, e.g. 2026-11-25T13:14:02.123Z");
        return false;
    }
    int64_t max = brk_delay_max_ms(c->h->b.delay);
    const char *field = has_delay ? "delay_ms" : has_level ? "delay_level"
                                                           : "deliver_at";
    if (has_level)
        delay = brk_delay_level_ms((int)level);
    if (has_at)
        delay = at > c->now_ms ? at - c->now_ms : 0;
    if (delay > max) {
        api_problem(c, API_PROB_BAD_REQUEST, "field '%s' is beyond the maximum "
                    "delay of %lld ms", field, (long long)max);
        return false;
    }
    *deliver_at = delay > 0 ? (has_at ? at : c->now_ms + delay) : 0;
    return true;
}

static api_outcome send_failed(api_call *c, brk_status st)
{
    switch (st) {
    case BRK_NOTFOUND:
        return api_problem(c, API_PROB_NOT_FOUND, "topic '%s' does not exist "
                           "and topics are not created automatically",
                           c->param);
    case BRK_RANGE:
        return api_problem(c, API_PROB_BAD_REQUEST, "the delay is beyond the "
                           "maximum delay");
    case BRK_TOOBIG:
        return api_problem(c, API_PROB_TOO_LARGE, "the message is larger than "
                           "the store accepts");
    case BRK_INVAL:
        return api_problem(c, API_PROB_BAD_REQUEST, "the message was refused "
                           "as invalid");
    default:
        return api_fail(c, st, "send to topic '%s' failed: %s", c->param,
                        brk_strerror(st));
    }
}

/* The 201s of a send are written directly (no json_t): the same bytes,
 * a fraction of the CPU, on the busiest route. */
static void reply_placed(api_call *c, const uint8_t *id, uint16_t queue,
                         uint64_t offset)
{
    api_jbuf b;
    api_jbuf_init(&b, 96);
    api_jbuf_key(&b, "msg_id");
    api_jbuf_uuid(&b, id);
    api_jbuf_key(&b, "queue");
    api_jbuf_int(&b, queue);
    api_jbuf_key(&b, "offset");
    api_jbuf_int(&b, (int64_t)offset);
    api_jbuf_end(&b);
    api_reply_jbuf(c, 201, &b);
}

static void do_send(api_call *c, const api_msg *m, int64_t deliver_at,
                    const uint8_t *msg_id)
{
    brk_append_req rq;
    memset(&rq, 0, sizeof rq);
    rq.topic = c->param;
    rq.queue = -1;
    rq.key = (brk_bytes){ m->key, m->key_len };
    rq.tag = (brk_bytes){ m->tag, m->tag_len };
    rq.props = (brk_bytes){ m->props, m->props_len };
    rq.body = (brk_bytes){ m->body, m->body_len };
    rq.flags = m->flags;
    rq.msg_id = msg_id;
    if (deliver_at == 0) {
        brk_append_res res;
        brk_status st = brk_store_append(c->h->b.store, &rq, &res);
        if (st != BRK_OK) {
            send_failed(c, st);
            return;
        }
        api_metrics_published(c->h->metrics, API_PUB_SEND);
        reply_placed(c, res.msg_id, res.queue, res.queue_offset);
        return;
    }
    brk_delay_res dr;
    brk_status st = brk_delay_send(c->h->b.delay, &rq, deliver_at, &dr);
    if (st != BRK_OK) {
        send_failed(c, st);
        return;
    }
    if (!dr.delayed) {              /* due already: it went straight in */
        api_metrics_published(c->h->metrics, API_PUB_SEND);
        reply_placed(c, dr.msg_id, dr.queue, dr.queue_offset);
        return;
    }
    api_metrics_published(c->h->metrics, API_PUB_DELAYED);
    api_jbuf b;
    api_jbuf_init(&b, 96);
    api_jbuf_key(&b, "msg_id");
    api_jbuf_uuid(&b, dr.msg_id);
    api_jbuf_key(&b, "deliver_at");
    api_jbuf_time(&b, dr.deliver_at_ms);
    api_jbuf_end(&b);
    api_reply_jbuf(c, 201, &b);
}

api_outcome api_route_send(api_call *c)
{
    char err[256];
    int64_t deliver_at = 0;
    if (!api_param_topic(c) || !api_fields_ok(c, SEND_FIELDS)
        || !parse_send_delay(c, &deliver_at))
        return API_DONE;
    api_msg m;
    brk_status st = api_msg_parse(c->body, &m, err, sizeof err);
    if (st != BRK_OK)
        return api_fail(c, st, "%s", err);
    api_idem_intent in = { NULL, deliver_at };
    api_idem_use u;
    if (api_idem_start(c, &in, &u)) {
        /* A redo keeps the deliver time recorded with the intent. */
        if (u.active && deliver_at > 0 && u.tk.deliver_at_ms > 0)
            deliver_at = u.tk.deliver_at_ms;
        do_send(c, &m, deliver_at, u.active ? u.tk.msg_id : NULL);
        api_idem_end(c, &u);
    }
    api_msg_free(&m);
    return API_DONE;
}

/* ---- topics -------------------------------------------------------------------------- */

static json_t *queue_range_json(api_call *c, const char *topic, uint16_t q)
{
    uint64_t mn = 0, mx = 0;
    (void)brk_store_queue_range(c->h->b.store, topic, q, &mn, &mx);
    json_t *r = json_object();
    bool ok = r && api_json_put(r, "queue", json_integer(q))
              && api_json_put(r, "min_offset", json_integer((json_int_t)mn))
              && api_json_put(r, "max_offset", json_integer((json_int_t)mx));
    if (!ok) {
        json_decref(r);
        return NULL;
    }
    return r;
}

static json_t *topic_json(api_call *c, const brk_topic_info *t, bool ranges)
{
    json_t *o = json_object();
    bool ok = o && api_json_put(o, "name", json_string(t->name))
              && api_json_put(o, "queues", json_integer(t->queues))
              && api_json_put(o, "writable", json_integer(t->writable))
              && api_json_put(o, "messages", json_integer((json_int_t)t->messages))
              && api_json_put(o, "created_at", api_json_time(t->created_ms,
                                                             false));
    json_t *arr = ranges && ok ? json_array() : NULL;
    /* append_new takes the row, and drops it when it fails */
    for (uint16_t q = 0; arr && ok && q < t->queues; q++)
        ok = json_array_append_new(arr, queue_range_json(c, t->name, q)) == 0;
    if (ranges)
        ok = ok && api_json_put(o, "queue_offsets", json_incref(arr));
    json_decref(arr);
    if (!ok) {
        json_decref(o);
        return NULL;
    }
    return o;
}

static api_outcome reply_topic(api_call *c, int status)
{
    brk_topic_info t;
    brk_status st = brk_topic_get(c->h->b.store, c->param, &t);
    if (st == BRK_NOTFOUND)
        return api_problem(c, API_PROB_NOT_FOUND, "topic '%s' not found",
                           c->param);
    if (st != BRK_OK)
        return api_fail(c, st, "%s", brk_strerror(st));
    json_t *o = topic_json(c, &t, true);
    return api_reply(c, status, o, o != NULL);
}

api_outcome api_route_topic_get(api_call *c)
{
    if (!api_param_topic(c))
        return API_DONE;
    return reply_topic(c, 200);
}

api_outcome api_route_topic_put(api_call *c)
{
    char err[256];
    int64_t queues = 0;
    bool has = false;
    if (!api_param_topic(c) || !api_fields_ok(c, TOPIC_PUT_FIELDS))
        return API_DONE;
    brk_status st = api_json_int(c->body, "", "queues", 1, BRK_QUEUES_MAX,
                                 &queues, &has, err, sizeof err);
    if (st != BRK_OK)
        return api_fail(c, st, "%s", err);
    if (!has)
        return api_problem(c, API_PROB_BAD_REQUEST, "field 'queues' is "
                           "required");
    bool created = false;
    st = brk_topic_resize(c->h->b.store, c->param, (uint16_t)queues, &created);
    if (st != BRK_OK)
        return api_fail(c, st, "resizing topic '%s' failed: %s", c->param,
                        brk_strerror(st));
    return reply_topic(c, created ? 201 : 200);
}

api_outcome api_route_topic_list(api_call *c)
{
    brk_topic_info *v = NULL;
    size_t n = 0;
    brk_status st = brk_topic_list(c->h->b.store, false, &v, &n);
    if (st != BRK_OK)
        return api_fail(c, st, "%s", brk_strerror(st));
    json_t *arr = json_array();
    bool ok = arr != NULL;
    for (size_t i = 0; ok && i < n; i++)
        ok = json_array_append_new(arr, topic_json(c, &v[i], false)) == 0;
    free(v);
    json_t *o = api_obj();
    ok = ok && o && api_json_put(o, "topics", json_incref(arr));
    json_decref(arr);
    return api_reply(c, 200, o, ok);
}
