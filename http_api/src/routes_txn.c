/*
 * routes_txn.c - /v1/transactions: prepare, commit, rollback, get, list.
 *
 *   POST /v1/transactions                  brk_txn_prepare      201
 *   POST /v1/transactions/{txid}/commit    brk_txn_commit       200
 *   POST /v1/transactions/{txid}/rollback  brk_txn_rollback     200
 *   GET  /v1/transactions/{txid}           brk_txn_get          200
 *   GET  /v1/transactions?state=&limit=    brk_txn_list         200
 *
 * A prepare's check policy is the request's "check" object merged over
 * cfg.default_check (every field optional).  With an Idempotency-Key the
 * txid comes from the key's ticket (the client's, or one the table
 * generated), so a retry after a lost response prepares the same
 * transaction again, which brk_txn_prepare answers as a replay.
 */
#include "api_priv.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"

static const char *const PREPARE_FIELDS[] = {
    API_MSG_FIELDS, "topic", "txid", "check", "delay_ms", "deliver_at", NULL
};
static const char *const CHECK_FIELDS[] = {
    "first_check_ms", "interval_ms", "max_checks", "on_exhausted",
    "expiry_topic", NULL
};
static const char *const NO_FIELDS[] = { NULL };

typedef struct prepare_args {
    char topic[BRK_TOPIC_MAX + 1];
    char txid[BRK_TXID_MAX + 1];        /* "" when none was given */
    brk_check_policy pol;
    char expiry[BRK_TOPIC_MAX + 1];     /* pol.expiry_topic when given */
    int64_t delay_ms;
    int64_t deliver_at_ms;
    api_msg msg;
} prepare_args;

static bool bad(api_call *c, brk_status st, const char *err)
{
    api_fail(c, st, "%s", err);
    return false;
}

static bool parse_on_exhausted(api_call *c, const json_t *chk, uint8_t *out,
                               bool *present)
{
    char err[256];
    const char *s = NULL;
    brk_status st = api_json_cstr(chk, "check.", "on_exhausted", 16, false, &s,
                                  present, err, sizeof err);
    if (st != BRK_OK)
        return bad(c, st, err);
    if (!*present)
        return true;
    if (strcmp(s, "rollback") == 0) {
        *out = BRK_EXHAUSTED_ROLLBACK;
    } else if (strcmp(s, "hold") == 0) {
        *out = BRK_EXHAUSTED_HOLD;
    } else {
        api_problem(c, API_PROB_BAD_REQUEST, "field 'check.on_exhausted' "
                    "must be \"rollback\" or \"hold\"");
        return false;
    }
    return true;
}

/* The "check" object over the daemon's default policy. */
static bool parse_check(api_call *c, prepare_args *a)
{
    a->pol = c->h->cfg.default_check;
    json_t *chk = json_object_get(c->body, "check");
    if (!chk)
        return true;
    if (!json_is_object(chk)) {
        api_problem(c, API_PROB_BAD_REQUEST, "field 'check' must be an "
                    "object");
        return false;
    }
    char err[256];
    brk_status st = api_json_check_fields(chk, CHECK_FIELDS, "check.", err,
                                          sizeof err);
    int64_t v;
    bool has;
    if (st != BRK_OK)
        return bad(c, st, err);
    if ((st = api_json_int(chk, "check.", "first_check_ms", 0, UINT32_MAX, &v,
                           &has, err, sizeof err)) != BRK_OK)
        return bad(c, st, err);
    if (has)
        a->pol.first_check_ms = (uint32_t)v;
    if ((st = api_json_int(chk, "check.", "interval_ms", 1, UINT32_MAX, &v,
                           &has, err, sizeof err)) != BRK_OK)
        return bad(c, st, err);
    if (has)
        a->pol.interval_ms = (uint32_t)v;
    if ((st = api_json_int(chk, "check.", "max_checks", 1, 65535, &v, &has,
                           err, sizeof err)) != BRK_OK)
        return bad(c, st, err);
    if (has)
        a->pol.max_checks = (uint16_t)v;
    bool has_action, has_expiry;
    if (!parse_on_exhausted(c, chk, &a->pol.on_exhausted, &has_action)
        || !api_body_name(c, chk, "check.", "expiry_topic", false,
                          api_topic_problem, a->expiry, sizeof a->expiry,
                          &has_expiry))
        return false;
    if (has_expiry)
        a->pol.expiry_topic = a->expiry;
    if (a->pol.on_exhausted == BRK_EXHAUSTED_HOLD) {
        if (has_expiry) {
            api_problem(c, API_PROB_BAD_REQUEST, "field 'check.expiry_topic' "
                        "is only allowed with on_exhausted \"rollback\"");
            return false;
        }
        a->pol.expiry_topic = NULL;     /* the default's, if any, goes too */
    }
    return true;
}

/* delay_ms or deliver_at (not both), within the scheduler's maximum. */
static bool parse_txn_delay(api_call *c, prepare_args *a)
{
    char err[256];
    bool has_delay, has_at;
    const char *at = NULL;
    size_t at_len = 0;
    brk_status st = api_json_int(c->body, "", "delay_ms", 0, INT64_MAX,
                                 &a->delay_ms, &has_delay, err, sizeof err);
    if (st == BRK_OK)
        st = api_json_str(c->body, "", "deliver_at", 64, false, &at, &at_len,
                          &has_at, err, sizeof err);
    if (st != BRK_OK)
        return bad(c, st, err);
    if (has_delay && has_at) {
        api_problem(c, API_PROB_BAD_REQUEST, "fields 'delay_ms' and "
                    "'deliver_at' are mutually exclusive");
        return false;
    }
    int64_t max = brk_delay_max_ms(c->h->b.delay);
    if (has_delay && a->delay_ms > max) {
        api_problem(c, API_PROB_BAD_REQUEST, "field 'delay_ms' is beyond the "
                    "maximum delay of %lld ms", (long long)max);
        return false;
    }
    if (has_at) {
        if (api_time_parse(at, at_len, &a->deliver_at_ms) != BRK_OK) {
            api_problem(c, API_PROB_BAD_REQUEST, "field 'deliver_at' must be "
                        "an RFC 3339 time, e.g. 2026-11-25T13:14:02.123Z");
            return false;
        }
        if (a->deliver_at_ms - c->now_ms > max) {
            api_problem(c, API_PROB_BAD_REQUEST, "field 'deliver_at' is "
                        "further out than the maximum delay of %lld ms",
                        (long long)max);
            return false;
        }
        if (a->deliver_at_ms < 0)
            a->deliver_at_ms = 0;
    }
    return true;
}

static bool parse_prepare(api_call *c, prepare_args *a)
{
    char err[256];
    if (!api_fields_ok(c, PREPARE_FIELDS)
        || !api_body_name(c, c->body, "", "topic", true, api_topic_problem,
                          a->topic, sizeof a->topic, NULL)
        || !api_body_name(c, c->body, "", "txid", false, api_txid_problem,
                          a->txid, sizeof a->txid, NULL)
        || !parse_check(c, a) || !parse_txn_delay(c, a))
        return false;
    brk_status st = api_msg_parse(c->body, &a->msg, err, sizeof err);
    if (st != BRK_OK)
        return bad(c, st, err);
    return true;
}

/* "txid", "msg_id" (with_id) and "state" of a prepare or verdict.  These
 * answers, half of every transaction's requests, are written without a
 * json_t tree: jansson's compact bytes, a fraction of the CPU. */
static void jbuf_txn(api_jbuf *b, const brk_txn_result *res, bool with_id)
{
    api_jbuf_key(b, "txid");
    api_jbuf_str(b, res->txid, strlen(res->txid));
    if (with_id) {
        api_jbuf_key(b, "msg_id");
        api_jbuf_uuid(b, res->msg_id);
    }
    const char *state = brk_txn_state_name(res->state);
    api_jbuf_key(b, "state");
    api_jbuf_str(b, state, strlen(state));
}

static api_outcome prepare_failed(api_call *c, const prepare_args *a,
                                  const char *txid, brk_status st)
{
    switch (st) {
    case BRK_CONFLICT:
        return api_problem(c, API_PROB_CONFLICT, "transaction '%s' was "
                           "prepared before with other content", txid);
    case BRK_RANGE:
        return api_problem(c, API_PROB_BAD_REQUEST, "field '%s' is beyond "
                           "the maximum delay",
                           a->delay_ms > 0 ? "delay_ms" : "deliver_at");
    case BRK_NOTFOUND:
        return api_problem(c, API_PROB_NOT_FOUND, "topic '%s'%s%s does not "
                           "exist and topics are not created automatically",
                           a->topic, a->pol.expiry_topic ? " or expiry topic "
                           : "", a->pol.expiry_topic ? a->pol.expiry_topic
                           : "");
    case BRK_INVAL:
        return api_problem(c, API_PROB_BAD_REQUEST, "the transaction was "
                           "refused as invalid (topic, txid, check policy or "
                           "headers)");
    case BRK_TOOBIG:
        return api_problem(c, API_PROB_TOO_LARGE, "the message is larger "
                           "than the store accepts");
    default:
        return api_fail(c, st, "prepare failed: %s", brk_strerror(st));
    }
}

api_outcome api_route_txn_prepare(api_call *c)
{
    prepare_args a;
    memset(&a, 0, sizeof a);
    if (!parse_prepare(c, &a))
        return API_DONE;
    api_idem_intent in = { a.txid[0] ? a.txid : NULL, 0 };
    api_idem_use u;
    if (!api_idem_start(c, &in, &u)) {
        api_msg_free(&a.msg);
        return API_DONE;
    }
    const char *txid = u.active ? u.tk.txid : a.txid;
    brk_txn_prepare_req pr = {
        .topic = a.topic,
        .key = { a.msg.key, a.msg.key_len },
        .tag = { a.msg.tag, a.msg.tag_len },
        .props = { a.msg.props, a.msg.props_len },
        .body = { a.msg.body, a.msg.body_len },
        .flags = a.msg.flags,
        .txid = txid[0] ? txid : NULL,
        .policy = &a.pol,
        .delay_ms = a.delay_ms,
        .deliver_at_ms = a.deliver_at_ms,
    };
    brk_txn_result res;
    brk_status st = brk_txn_prepare(c->h->b.txn, &pr, &res);
    if (st == BRK_OK) {
        api_jbuf b;
        api_jbuf_init(&b, 160);
        jbuf_txn(&b, &res, true);
        api_jbuf_end(&b);
        api_reply_jbuf(c, 201, &b);
    } else {
        prepare_failed(c, &a, txid[0] ? txid : "(generated)", st);
    }
    api_idem_end(c, &u);
    api_msg_free(&a.msg);
    return API_DONE;
}

/* ---- verdicts ------------------------------------------------------------------------ */

static api_outcome verdict(api_call *c, bool commit)
{
    if (!api_param_txid(c) || !api_fields_ok(c, NO_FIELDS))
        return API_DONE;
    brk_txn_result res;
    memset(&res, 0, sizeof res);
    brk_status st = commit ? brk_txn_commit(c->h->b.txn, c->param, &res)
                           : brk_txn_rollback(c->h->b.txn, c->param, &res);
    if (st == BRK_NOTFOUND)
        return api_problem(c, API_PROB_NOT_FOUND, "transaction '%s' not found",
                           c->param);
    if (st == BRK_CONFLICT)
        return api_problem(c, API_PROB_CONFLICT, "transaction '%s' is %s",
                           c->param, res.state ? brk_txn_state_name(res.state)
                           : "resolved the other way");
    if (st != BRK_OK)
        return api_fail(c, st, "%s of transaction '%s' failed: %s",
                        commit ? "commit" : "rollback", c->param,
                        brk_strerror(st));
    api_jbuf b;
    api_jbuf_init(&b, 160);
    jbuf_txn(&b, &res, commit);
    if (commit && res.delayed) {
        api_jbuf_key(&b, "deliver_at");
        api_jbuf_time(&b, res.deliver_at_ms);
    }
    api_jbuf_end(&b);
    return api_reply_jbuf(c, 200, &b);
}

api_outcome api_route_txn_commit(api_call *c)
{
    return verdict(c, true);
}

api_outcome api_route_txn_rollback(api_call *c)
{
    return verdict(c, false);
}

/* ---- reads ----------------------------------------------------------------------------- */

static json_t *policy_json(const brk_check_policy *p)
{
    json_t *o = json_object();
    bool ok = o && api_json_put(o, "first_check_ms",
                                json_integer(p->first_check_ms))
              && api_json_put(o, "interval_ms", json_integer(p->interval_ms))
              && api_json_put(o, "max_checks", json_integer(p->max_checks))
              && api_json_put(o, "on_exhausted", json_string(
                     p->on_exhausted == BRK_EXHAUSTED_HOLD ? "hold"
                                                           : "rollback"))
              && api_json_put(o, "expiry_topic",
                              p->expiry_topic && p->expiry_topic[0]
                                  ? json_string(p->expiry_topic)
                                  : json_null());
    if (!ok) {
        json_decref(o);
        return NULL;
    }
    return o;
}

static json_t *info_json(const brk_txn_info *t)
{
    json_t *o = json_object();
    bool ok = o && api_json_put(o, "txid", json_string(t->txid))
              && api_json_put(o, "msg_id", api_json_uuid(t->msg_id))
              && api_json_put(o, "topic", json_string(t->topic))
              && api_json_put(o, "key", api_json_text(t->key, t->key_len))
              && api_json_put(o, "state", json_string(
                                              brk_txn_state_name(t->state)))
              && api_json_put(o, "checks", json_integer(t->checks))
              && api_json_put(o, "next_check_at",
                              api_json_time(t->next_check_ms, true))
              && api_json_put(o, "prepared_at",
                              api_json_time(t->prepared_ms, false))
              && api_json_put(o, "stuck", json_boolean(t->stuck))
              && api_json_put(o, "expired", json_boolean(t->expired))
              && api_json_put(o, "check_errors", json_integer(t->check_errors))
              && api_json_put(o, "check", policy_json(&t->policy));
    if (!ok) {
        json_decref(o);
        return NULL;
    }
    return o;
}

api_outcome api_route_txn_get(api_call *c)
{
    if (!api_param_txid(c))
        return API_DONE;
    brk_txn_info info;
    brk_status st = brk_txn_get(c->h->b.txn, c->param, &info);
    if (st == BRK_NOTFOUND)
        return api_problem(c, API_PROB_NOT_FOUND, "transaction '%s' not found",
                           c->param);
    if (st != BRK_OK)
        return api_fail(c, st, "%s", brk_strerror(st));
    json_t *o = info_json(&info);
    return api_reply(c, 200, o, o != NULL);
}

api_outcome api_route_txn_list(api_call *c)
{
    api_qparam q[2] = { { .name = "state" }, { .name = "limit" } };
    int64_t limit;
    if (!api_query(c, q, 2) || !api_query_int(c, &q[1], 1, 10000, 100, &limit))
        return API_DONE;
    brk_txn_filter f = BRK_TXN_LIST_PREPARED;
    if (q[0].present && strcmp(q[0].value, "stuck") == 0)
        f = BRK_TXN_LIST_STUCK;
    else if (q[0].present && strcmp(q[0].value, "prepared") != 0)
        return api_problem(c, API_PROB_BAD_REQUEST, "query parameter 'state' "
                           "must be prepared or stuck");
    brk_txn_info *v = NULL;
    size_t n = 0;
    brk_status st = brk_txn_list(c->h->b.txn, f, (size_t)limit, &v, &n);
    if (st != BRK_OK)
        return api_fail(c, st, "%s", brk_strerror(st));
    json_t *arr = json_array();
    bool ok = arr != NULL;
    for (size_t i = 0; ok && i < n; i++)
        ok = json_array_append_new(arr, info_json(&v[i])) == 0;
    free(v);
    json_t *o = api_obj();
    ok = ok && o && api_json_put(o, "transactions", json_incref(arr));
    json_decref(arr);
    return api_reply(c, 200, o, ok);
}
