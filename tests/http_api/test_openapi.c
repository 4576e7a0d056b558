/*
 * test_openapi.c - docs/openapi.json against the server: the document
 * describes exactly the routes api_routes() serves, is internally sound
 * (every $ref resolves, every path parameter is declared, every operation
 * has a success and, but for the probes and /metrics, a problem answer),
 * and a live server answers one valid request per documented operation
 * with a status the document lists and a body its schema accepts.
 *
 * The schema check is a small JSON Schema subset, enough for the document
 * (OpenAPI 3.0): $ref, type, nullable, enum, required, properties,
 * additionalProperties, items, oneOf / anyOf / allOf / not, minimum /
 * maximum, min/maxLength, min/maxItems, pattern (when POSIX ERE can compile
 * it: the lookaheads of the name patterns cannot) and format date-time,
 * which for responses means RFC 3339 UTC with milliseconds, as the API
 * promises.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <regex.h>

#include "live_server.h"

#define DOC_PATH OUTBOXD_SOURCE_DIR "/docs/openapi.json"

static const char *const METHODS[] = { "get", "put", "post", "delete", "patch",
                                       "head", "options", "trace" };
#define NMETHODS (sizeof METHODS / sizeof METHODS[0])

/* The operations that take an Idempotency-Key header. */
static const char *const IDEM_OPS[][2] = {
    { "POST", "/v1/transactions" },
    { "POST", "/v1/topics/{topic}/messages" },
};

/* Routes that are neither authenticated problems nor JSON errors. */
static bool is_probe_or_metrics(const char *path)
{
    return strcmp(path, "/healthz") == 0 || strcmp(path, "/readyz") == 0
           || strcmp(path, "/metrics") == 0;
}

/* ---- error list ---------------------------------------------------------- */

typedef struct errs {
    char buf[16384];
    size_t len;
    unsigned n;
} errs;

static void err_add(errs *e, const char *fmt, ...)
{
    e->n++;
    if (e->len + 2 >= sizeof e->buf)
        return;
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(e->buf + e->len, sizeof e->buf - e->len - 1, fmt, ap);
    va_end(ap);
    if (k > 0)
        e->len += (size_t)k < sizeof e->buf - e->len - 1 ? (size_t)k
                                                         : sizeof e->buf - e->len - 1;
    e->buf[e->len++] = '\n';
    e->buf[e->len] = '\0';
}

static void err_check(const errs *e, const char *what)
{
    if (e->n)
        fail_msg("%s: %u problem(s):\n%s", what, e->n, e->buf);
}

/* ---- document access ----------------------------------------------------- */

static json_t *doc;

static int load_doc(void **state)
{
    (void)state;
    json_error_t je;
    doc = json_load_file(DOC_PATH, 0, &je);
    if (!doc) {
        fprintf(stderr, "%s:%d: %s\n", DOC_PATH, je.line, je.text);
        return -1;
    }
    return 0;
}

static int free_doc(void **state)
{
    (void)state;
    json_decref(doc);
    doc = NULL;
    return 0;
}

/* Resolve a local JSON pointer ("#/components/schemas/X"); NULL if none. */
static json_t *resolve_pointer(const char *ref)
{
    if (strncmp(ref, "#/", 2) != 0)
        return NULL;
    json_t *cur = doc;
    const char *p = ref + 2;
    while (cur && *p) {
        const char *slash = strchr(p, '/');
        size_t n = slash ? (size_t)(slash - p) : strlen(p);
        char tok[256];
        size_t k = 0;
        for (size_t i = 0; i < n && k + 1 < sizeof tok; i++) {
            if (p[i] == '~' && i + 1 < n && (p[i + 1] == '0' || p[i + 1] == '1')) {
                tok[k++] = p[i + 1] == '0' ? '~' : '/';
                i++;
            } else {
                tok[k++] = p[i];
            }
        }
        tok[k] = '\0';
        cur = json_is_array(cur) ? json_array_get(cur, strtoul(tok, NULL, 10))
                                 : json_object_get(cur, tok);
        p = slash ? slash + 1 : p + n;
    }
    return cur;
}

/* Follow $ref chains; NULL when one does not resolve. */
static json_t *deref(json_t *node)
{
    for (int hops = 0; node && hops < 16; hops++) {
        const char *ref = json_string_value(json_object_get(node, "$ref"));
        if (!ref)
            return node;
        node = resolve_pointer(ref);
    }
    return NULL;
}

typedef struct op_ref {
    char method[8];     /* upper case */
    const char *path;
    json_t *path_item;
    json_t *op;
} op_ref;

/* Every operation of the document, in document order. */
static size_t doc_ops(op_ref *out, size_t cap)
{
    size_t n = 0;
    const char *path;
    json_t *item;
    json_object_foreach(json_object_get(doc, "paths"), path, item) {
        for (size_t m = 0; m < NMETHODS; m++) {
            json_t *op = json_object_get(item, METHODS[m]);
            if (!op || n == cap)
                continue;
            for (size_t i = 0; METHODS[m][i]; i++)
                out[n].method[i] = (char)(METHODS[m][i] - 'a' + 'A');
            out[n].method[strlen(METHODS[m])] = '\0';
            out[n].path = path;
            out[n].path_item = item;
            out[n].op = op;
            n++;
        }
    }
    return n;
}

/* The parameter named `name` in `in` declared on the operation or its path. */
static json_t *find_param(const op_ref *o, const char *in, const char *name)
{
    json_t *lists[2] = { json_object_get(o->op, "parameters"),
                         json_object_get(o->path_item, "parameters") };
    for (int l = 0; l < 2; l++) {
        size_t i;
        json_t *p;
        json_array_foreach(lists[l], i, p) {
            json_t *d = deref(p);
            const char *pin = json_string_value(json_object_get(d, "in"));
            const char *pname = json_string_value(json_object_get(d, "name"));
            if (pin && pname && strcmp(pin, in) == 0
                && strcasecmp(pname, name) == 0)
                return d;
        }
    }
    return NULL;
}

/* ---- static checks ------------------------------------------------------- */

static void document_is_openapi_3_0_3(void **state)
{
    (void)state;
    assert_string_equal(json_string_value(json_object_get(doc, "openapi")), "3.0.3");
    assert_non_null(json_string_value(json_object_get(json_object_get(doc, "info"), "title")));
    assert_true(json_object_size(json_object_get(doc, "paths")) > 0);
    json_t *bearer = json_object_get(json_object_get(json_object_get(doc, "components"),
                                                     "securitySchemes"), "bearerAuth");
    assert_string_equal(json_string_value(json_object_get(bearer, "type")), "http");
    assert_string_equal(json_string_value(json_object_get(bearer, "scheme")), "bearer");
}

static void every_route_is_documented_and_every_operation_is_routed(void **state)
{
    (void)state;
    size_t nroutes = 0;
    const api_route_info *routes = api_routes(&nroutes);
    assert_non_null(routes);
    assert_true(nroutes > 0);
    op_ref ops[128];
    size_t nops = doc_ops(ops, 128);
    errs e = { .len = 0 };
    for (size_t r = 0; r < nroutes; r++) {
        bool found = false;
        for (size_t i = 0; i < nops && !found; i++)
            found = strcmp(ops[i].method, routes[r].method) == 0
                    && strcmp(ops[i].path, routes[r].path) == 0;
        if (!found)
            err_add(&e, "route %s %s is not in docs/openapi.json",
                    routes[r].method, routes[r].path);
        for (size_t k = 0; k < r; k++)
            if (strcmp(routes[k].method, routes[r].method) == 0
                && strcmp(routes[k].path, routes[r].path) == 0)
                err_add(&e, "route %s %s is in the table twice", routes[r].method,
                        routes[r].path);
    }
    for (size_t i = 0; i < nops; i++) {
        bool found = false;
        for (size_t r = 0; r < nroutes && !found; r++)
            found = strcmp(ops[i].method, routes[r].method) == 0
                    && strcmp(ops[i].path, routes[r].path) == 0;
        if (!found)
            err_add(&e, "documented operation %s %s is not in api_routes()",
                    ops[i].method, ops[i].path);
    }
    err_check(&e, "docs/openapi.json vs api_routes()");
}

static bool is_problem_response(json_t *resp)
{
    json_t *content = json_object_get(deref(resp), "content");
    return json_object_get(content, "application/problem+json") != NULL;
}

static void every_operation_has_a_2xx_and_a_problem_response(void **state)
{
    (void)state;
    op_ref ops[128];
    size_t nops = doc_ops(ops, 128);
    errs e = { .len = 0 };
    for (size_t i = 0; i < nops; i++) {
        json_t *responses = json_object_get(ops[i].op, "responses");
        bool ok = false, problem = false;
        const char *code;
        json_t *r;
        json_object_foreach(responses, code, r) {
            if (code[0] == '2')
                ok = true;
            else if (code[0] == '4' || code[0] == '5')
                problem |= is_problem_response(r);
        }
        if (!ok)
            err_add(&e, "%s %s has no 2xx response", ops[i].method, ops[i].path);
        if (!problem && !is_probe_or_metrics(ops[i].path))
            err_add(&e, "%s %s has no application/problem+json response",
                    ops[i].method, ops[i].path);
        if (!json_string_value(json_object_get(ops[i].op, "operationId")))
            err_add(&e, "%s %s has no operationId", ops[i].method, ops[i].path);
    }
    err_check(&e, "responses");
}

static void walk_refs(json_t *node, const char *where, errs *e)
{
    if (json_is_object(node)) {
        const char *k;
        json_t *v;
        json_object_foreach(node, k, v) {
            if (strcmp(k, "$ref") == 0) {
                const char *ref = json_string_value(v);
                if (!ref || !resolve_pointer(ref))
                    err_add(e, "%s: $ref %s does not resolve", where,
                            ref ? ref : "(not a string)");
            } else {
                walk_refs(v, where, e);
            }
        }
    } else if (json_is_array(node)) {
        size_t i;
        json_t *v;
        json_array_foreach(node, i, v)
            walk_refs(v, where, e);
    }
}

static void every_ref_resolves(void **state)
{
    (void)state;
    errs e = { .len = 0 };
    const char *k;
    json_t *v;
    json_object_foreach(doc, k, v)
        walk_refs(v, k, &e);
    err_check(&e, "$ref");
}

static void every_path_parameter_is_declared(void **state)
{
    (void)state;
    op_ref ops[128];
    size_t nops = doc_ops(ops, 128);
    errs e = { .len = 0 };
    for (size_t i = 0; i < nops; i++) {
        for (const char *p = strchr(ops[i].path, '{'); p; p = strchr(p + 1, '{')) {
            const char *end = strchr(p, '}');
            char name[64] = "";
            if (end && (size_t)(end - p - 1) < sizeof name)
                memcpy(name, p + 1, (size_t)(end - p - 1));
            json_t *prm = find_param(&ops[i], "path", name);
            if (!prm || !json_is_true(json_object_get(prm, "required")))
                err_add(&e, "%s %s: path parameter {%s} is not declared "
                        "(required)", ops[i].method, ops[i].path, name);
        }
    }
    err_check(&e, "path parameters");
}

static bool is_idem_op(const op_ref *o)
{
    for (size_t k = 0; k < sizeof IDEM_OPS / sizeof IDEM_OPS[0]; k++)
        if (strcmp(o->method, IDEM_OPS[k][0]) == 0 && strcmp(o->path, IDEM_OPS[k][1]) == 0)
            return true;
    return false;
}

static void idempotency_key_operations_declare_the_header(void **state)
{
    (void)state;
    op_ref ops[128];
    size_t nops = doc_ops(ops, 128);
    errs e = { .len = 0 };
    unsigned seen = 0;
    for (size_t i = 0; i < nops; i++) {
        json_t *p = find_param(&ops[i], "header", "Idempotency-Key");
        if (is_idem_op(&ops[i])) {
            seen++;
            if (!p)
                err_add(&e, "%s %s does not declare the Idempotency-Key header",
                        ops[i].method, ops[i].path);
            else if (json_integer_value(json_object_get(deref(json_object_get(p, "schema")),
                                                        "maxLength")) != 255)
                err_add(&e, "%s %s: Idempotency-Key maxLength is not 255",
                        ops[i].method, ops[i].path);
        } else if (p) {
            err_add(&e, "%s %s declares Idempotency-Key but does not take one",
                    ops[i].method, ops[i].path);
        }
    }
    if (seen != 2)
        err_add(&e, "%u of the 2 Idempotency-Key operations are documented", seen);
    err_check(&e, "Idempotency-Key");
}

static void probes_are_public_and_everything_else_needs_the_bearer_token(void **state)
{
    (void)state;
    json_t *global = json_object_get(doc, "security");
    assert_int_equal(json_array_size(global), 1);
    assert_non_null(json_object_get(json_array_get(global, 0), "bearerAuth"));
    op_ref ops[128];
    size_t nops = doc_ops(ops, 128);
    errs e = { .len = 0 };
    for (size_t i = 0; i < nops; i++) {
        json_t *sec = json_object_get(ops[i].op, "security");
        bool probe = strcmp(ops[i].path, "/healthz") == 0
                     || strcmp(ops[i].path, "/readyz") == 0;
        if (probe && !(json_is_array(sec) && json_array_size(sec) == 0))
            err_add(&e, "%s %s must override security with []", ops[i].method, ops[i].path);
        if (!probe && sec)
            err_add(&e, "%s %s overrides the global bearerAuth", ops[i].method,
                    ops[i].path);
        if (!probe && !json_object_get(json_object_get(ops[i].op, "responses"), "401"))
            err_add(&e, "%s %s lists no 401", ops[i].method, ops[i].path);
    }
    err_check(&e, "security");
}

/* ---- schema check -------------------------------------------------------- */

static bool type_ok(const char *type, json_t *v)
{
    if (strcmp(type, "object") == 0)
        return json_is_object(v);
    if (strcmp(type, "array") == 0)
        return json_is_array(v);
    if (strcmp(type, "string") == 0)
        return json_is_string(v);
    if (strcmp(type, "integer") == 0)
        return json_is_integer(v);
    if (strcmp(type, "number") == 0)
        return json_is_number(v);
    if (strcmp(type, "boolean") == 0)
        return json_is_boolean(v);
    return false;
}

/* POSIX ERE match; true when the pattern is not ERE (lookaheads). */
static bool pattern_ok(const char *pattern, const char *s)
{
    regex_t re;
    if (regcomp(&re, pattern, REG_EXTENDED | REG_NOSUB) != 0)
        return true;
    bool ok = regexec(&re, s, 0, NULL, 0) == 0;
    regfree(&re);
    return ok;
}

static void validate(json_t *schema, json_t *v, const char *at, errs *e);

/* How many of the schemas in `list` accept v. */
static size_t count_matches(json_t *list, json_t *v, const char *at)
{
    size_t n = 0, i;
    json_t *sub;
    json_array_foreach(list, i, sub) {
        errs *tmp = calloc(1, sizeof *tmp);
        assert_non_null(tmp);
        validate(sub, v, at, tmp);
        n += tmp->n == 0;
        free(tmp);
    }
    return n;
}

static void validate_object(json_t *s, json_t *v, const char *at, errs *e)
{
    size_t i;
    json_t *req;
    json_array_foreach(json_object_get(s, "required"), i, req)
        if (!json_object_get(v, json_string_value(req)))
            err_add(e, "%s: required member \"%s\" is missing", at, json_string_value(req));
    json_t *props = json_object_get(s, "properties");
    json_t *addl = json_object_get(s, "additionalProperties");
    const char *k;
    json_t *mv;
    json_object_foreach(v, k, mv) {
        char sub[256];
        snprintf(sub, sizeof sub, "%s.%s", at, k);
        json_t *ps = json_object_get(props, k);
        if (ps)
            validate(ps, mv, sub, e);
        else if (json_is_false(addl))
            err_add(e, "%s: member not allowed", sub);
        else if (json_is_object(addl))
            validate(addl, mv, sub, e);
    }
}

static void validate_scalar(json_t *s, json_t *v, const char *at, errs *e)
{
    json_t *mn = json_object_get(s, "minimum"), *mx = json_object_get(s, "maximum");
    if (json_is_number(v) && mn && json_number_value(v) < json_number_value(mn))
        err_add(e, "%s: %g is below the minimum %g", at, json_number_value(v),
                json_number_value(mn));
    if (json_is_number(v) && mx && json_number_value(v) > json_number_value(mx))
        err_add(e, "%s: %g is above the maximum %g", at, json_number_value(v),
                json_number_value(mx));
    if (!json_is_string(v))
        return;
    const char *str = json_string_value(v);
    size_t len = json_string_length(v);
    json_t *minl = json_object_get(s, "minLength"), *maxl = json_object_get(s, "maxLength");
    if (minl && len < (size_t)json_integer_value(minl))
        err_add(e, "%s: \"%s\" is shorter than %lld", at, str, json_integer_value(minl));
    if (maxl && len > (size_t)json_integer_value(maxl))
        err_add(e, "%s: string longer than %lld", at, json_integer_value(maxl));
    const char *pat = json_string_value(json_object_get(s, "pattern"));
    if (pat && !pattern_ok(pat, str))
        err_add(e, "%s: \"%s\" does not match %s", at, str, pat);
    const char *fmt = json_string_value(json_object_get(s, "format"));
    if (fmt && strcmp(fmt, "date-time") == 0
        && !pattern_ok("^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
                       "\\.[0-9]{3}Z$", str))
        err_add(e, "%s: \"%s\" is not RFC 3339 UTC with milliseconds", at, str);
}

static void validate(json_t *schema, json_t *v, const char *at, errs *e)
{
    json_t *s = deref(schema);
    if (!s) {
        err_add(e, "%s: unresolvable schema", at);
        return;
    }
    const char *type = json_string_value(json_object_get(s, "type"));
    if (json_is_null(v) && json_is_true(json_object_get(s, "nullable")))
        return;
    if (type && !type_ok(type, v)) {
        err_add(e, "%s: not of type %s", at, type);
        return;
    }
    json_t *en = json_object_get(s, "enum");
    if (en) {
        bool in = false;
        size_t i;
        json_t *x;
        json_array_foreach(en, i, x)
            in |= json_equal(x, v);
        if (!in)
            err_add(e, "%s: value not in the enum", at);
    }
    json_t *list;
    size_t i;
    json_t *sub;
    json_array_foreach(json_object_get(s, "allOf"), i, sub)
        validate(sub, v, at, e);
    if ((list = json_object_get(s, "oneOf")) && count_matches(list, v, at) != 1)
        err_add(e, "%s: matches %zu of the oneOf alternatives (1 expected)", at,
                count_matches(list, v, at));
    if ((list = json_object_get(s, "anyOf")) && count_matches(list, v, at) == 0)
        err_add(e, "%s: matches none of the anyOf alternatives", at);
    json_t *not = json_object_get(s, "not");
    if (not) {
        json_t *one = json_pack("[O]", not);
        if (count_matches(one, v, at) == 1)
            err_add(e, "%s: matches the \"not\" schema", at);
        json_decref(one);
    }
    if (json_is_object(v)) {
        validate_object(s, v, at, e);
    } else if (json_is_array(v)) {
        json_t *mi = json_object_get(s, "minItems"), *ma = json_object_get(s, "maxItems");
        if (mi && json_array_size(v) < (size_t)json_integer_value(mi))
            err_add(e, "%s: fewer than %lld items", at, json_integer_value(mi));
        if (ma && json_array_size(v) > (size_t)json_integer_value(ma))
            err_add(e, "%s: more than %lld items", at, json_integer_value(ma));
        json_t *items = json_object_get(s, "items");
        json_array_foreach(v, i, sub) {
            char where[256];
            snprintf(where, sizeof where, "%s[%zu]", at, i);
            if (items)
                validate(items, sub, where, e);
        }
    } else {
        validate_scalar(s, v, at, e);
    }
}

static void validator_rejects_what_it_should(void **state)
{
    (void)state;
    /* The checker must be able to fail: a problem without detail, a
     * Transaction with a wrong-typed member and a non-UTC time. */
    json_t *problem = resolve_pointer("#/components/schemas/Problem");
    json_t *txn = resolve_pointer("#/components/schemas/Transaction");
    assert_non_null(problem);
    assert_non_null(txn);
    errs *e = calloc(1, sizeof *e);
    assert_non_null(e);
    json_t *v = json_pack("{s:s, s:s, s:i}", "type", "urn:outboxd:problem:not-found",
                          "title", "Not Found", "status", 404);
    validate(problem, v, "problem", e);
    assert_int_equal(e->n, 1);
    json_decref(v);
    memset(e, 0, sizeof *e);
    v = json_loads("{\"txid\":\"a\",\"msg_id\":\"0190d3a1-7b2c-7def-8123-456789abcdef\","
                   "\"topic\":\"t\",\"key\":null,\"state\":\"prepared\",\"checks\":\"0\","
                   "\"next_check_at\":null,\"prepared_at\":\"2026-11-25T13:14:02+01:00\","
                   "\"stuck\":false,\"expired\":false,\"check_errors\":0,\"check\":"
                   "{\"first_check_ms\":1,\"interval_ms\":1,\"max_checks\":1,"
                   "\"on_exhausted\":\"hold\"}}", 0, NULL);
    assert_non_null(v);
    validate(txn, v, "txn", e);
    assert_int_equal(e->n, 2);
    json_decref(v);
    free(e);
}

/* ---- live check ---------------------------------------------------------- */

/* One valid request for each documented operation, over the fixtures that
 * live_setup_data creates (topic "orders", group "billing", prepared
 * transactions "tx-c" and "tx-r", a message waiting in "orders"). */
typedef struct live_case {
    const char *method;
    const char *tmpl;
    const char *path;
    const char *body;           /* JSON text; NULL: no body */
    const char *extra;          /* one more header, or NULL */
} live_case;

static const live_case CASES[] = {
    { "GET", "/v1/transactions", "/v1/transactions?state=prepared&limit=10", NULL, NULL },
    { "POST", "/v1/transactions", "/v1/transactions",
      "{\"topic\":\"orders\",\"key\":\"o-1\",\"body\":{\"n\":1}}", "Idempotency-Key: k-prep" },
    { "GET", "/v1/transactions/{txid}", "/v1/transactions/tx-c", NULL, NULL },
    { "POST", "/v1/transactions/{txid}/commit", "/v1/transactions/tx-c/commit", NULL, NULL },
    { "POST", "/v1/transactions/{txid}/rollback", "/v1/transactions/tx-r/rollback", NULL, NULL },
    { "GET", "/v1/topics", "/v1/topics", NULL, NULL },
    { "GET", "/v1/topics/{topic}", "/v1/topics/orders", NULL, NULL },
    { "PUT", "/v1/topics/{topic}", "/v1/topics/fresh", "{\"queues\":2}", NULL },
    { "POST", "/v1/topics/{topic}/messages", "/v1/topics/orders/messages",
      "{\"key\":\"o-2\",\"tag\":\"paid\",\"headers\":{\"a\":\"b\"},\"body\":[1,2]}",
      "Idempotency-Key: k-send" },
    { "GET", "/v1/groups/{group}", "/v1/groups/billing", NULL, NULL },
    { "PUT", "/v1/groups/{group}", "/v1/groups/shipping", "{\"topic\":\"orders\"}", NULL },
    { "POST", "/v1/groups/{group}/receive", "/v1/groups/billing/receive",
      "{\"topic\":\"orders\",\"max\":4}", NULL },
    { "POST", "/v1/groups/{group}/ack", "/v1/groups/billing/ack",
      "{\"receipts\":[\"not-a-receipt\"]}", NULL },
    { "POST", "/v1/groups/{group}/nack", "/v1/groups/billing/nack",
      "{\"receipts\":[\"not-a-receipt\"]}", NULL },
    { "GET", "/v1/groups/{group}/dead-letters", "/v1/groups/billing/dead-letters?from=0&limit=10",
      NULL, NULL },
    { "POST", "/v1/groups/{group}/dead-letters/replay",
      "/v1/groups/billing/dead-letters/replay", NULL, NULL },
    { "GET", "/healthz", "/healthz", NULL, NULL },
    { "GET", "/readyz", "/readyz", NULL, NULL },
    { "GET", "/metrics", "/metrics", NULL, NULL },
};
#define NCASES (sizeof CASES / sizeof CASES[0])

static void setup_call(live_env *env, const char *method, const char *path,
                       const char *body, long want)
{
    live_resp r;
    live_call(env, method, path, body, &r);
    if (r.status != want)
        fail_msg("setup %s %s: %ld (want %ld): %s", method, path, r.status, want, r.body);
    live_resp_free(&r);
}

static void live_setup_data(live_env *env)
{
    setup_call(env, "PUT", "/v1/topics/orders", "{\"queues\":2}", 201);
    setup_call(env, "PUT", "/v1/groups/billing", "{\"topic\":\"orders\"}", 201);
    setup_call(env, "POST", "/v1/transactions",
               "{\"topic\":\"orders\",\"txid\":\"tx-c\",\"body\":{\"c\":1}}", 201);
    setup_call(env, "POST", "/v1/transactions",
               "{\"topic\":\"orders\",\"txid\":\"tx-r\",\"body\":{\"r\":1}}", 201);
    setup_call(env, "POST", "/v1/topics/orders/messages", "{\"body\":\"waiting\"}", 201);
}

static const live_case *find_case(const op_ref *o)
{
    for (size_t i = 0; i < NCASES; i++)
        if (strcmp(CASES[i].method, o->method) == 0 && strcmp(CASES[i].tmpl, o->path) == 0)
            return &CASES[i];
    return NULL;
}

/* Check one answer against the operation's documented responses. */
static void check_answer(const op_ref *o, const live_resp *r, errs *e)
{
    char what[160], code[8];
    snprintf(what, sizeof what, "%.16s %.140s", o->method, o->path);
    snprintf(code, sizeof code, "%ld", r->status);
    json_t *resp = deref(json_object_get(json_object_get(o->op, "responses"), code));
    if (!resp) {
        err_add(e, "%s: status %ld is not documented (body %.300s)", what, r->status, r->body);
        return;
    }
    if (r->status < 200 || r->status > 299)
        err_add(e, "%s: a valid request got %ld (body %.300s)", what, r->status, r->body);
    json_t *content = json_object_get(resp, "content");
    if (!content)
        return;
    char media[128];
    snprintf(media, sizeof media, "%s", r->content_type);
    media[strcspn(media, "; ")] = '\0';
    json_t *mt = json_object_get(content, media);
    if (!mt) {
        err_add(e, "%s: Content-Type \"%s\" is not documented for %ld", what,
                r->content_type, r->status);
        return;
    }
    if (strcmp(media, "application/json") != 0
        && strcmp(media, "application/problem+json") != 0)
        return;
    if (!r->json) {
        err_add(e, "%s: %ld body is not JSON: %.300s", what, r->status, r->body);
        return;
    }
    validate(json_object_get(mt, "schema"), r->json, what, e);
}

static void every_documented_operation_answers_as_documented(void **state)
{
    (void)state;
    live_env env;
    live_open(&env, NULL);
    live_setup_data(&env);
    op_ref ops[128];
    size_t nops = doc_ops(ops, 128);
    errs *e = calloc(1, sizeof *e);
    assert_non_null(e);
    for (size_t i = 0; i < nops; i++) {
        const live_case *c = find_case(&ops[i]);
        if (!c) {
            err_add(e, "%s %s: no live request for it in test_openapi.c", ops[i].method,
                    ops[i].path);
            continue;
        }
        const char *extra[] = { c->extra, NULL };
        live_resp r;
        live_request(&env, c->method, c->path, c->body ? "application/json" : NULL,
                     c->body, c->body ? strlen(c->body) : 0, extra, &r);
        check_answer(&ops[i], &r, e);
        live_resp_free(&r);
    }
    live_close(&env);
    errs copy = *e;
    free(e);
    err_check(&copy, "live answers");
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(document_is_openapi_3_0_3),
        cmocka_unit_test(every_route_is_documented_and_every_operation_is_routed),
        cmocka_unit_test(every_operation_has_a_2xx_and_a_problem_response),
        cmocka_unit_test(every_ref_resolves),
        cmocka_unit_test(every_path_parameter_is_declared),
        cmocka_unit_test(idempotency_key_operations_declare_the_header),
        cmocka_unit_test(probes_are_public_and_everything_else_needs_the_bearer_token),
        cmocka_unit_test(validator_rejects_what_it_should),
        cmocka_unit_test(every_documented_operation_answers_as_documented),
    };
    int rc = cmocka_run_group_tests(tests, load_doc, free_doc);
    curl_global_cleanup();
    return rc;
}
