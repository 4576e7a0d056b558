/*
 * fuzz_api.c - libFuzzer target: request -> JSON -> handler (api_handle),
 * with no sockets.  Built and run by scripts/fuzz.sh (clang, ASan+UBSan).
 *
 * Input format (lines end with "\n"; a "\r" before it is dropped):
 *
 *   METHOD SP TARGET                 TARGET = path, or path?query
 *   Name: value                      zero or more header lines (at most 16)
 *   <empty line>
 *   body bytes (anything, NULs included, up to the end of the input)
 *
 * A missing first line means "GET /"; no empty line means no body
 * (api_request.body NULL); an empty line followed by nothing is a body of
 * length 0.  The path is handed over as the transport would after decoding
 * (the fuzzer's bytes as they are), the body as a buffer of exactly its
 * length (not NUL-terminated: ASan catches a handler that reads past it).
 * The header line "X-Fuzz-Drain: 1" sends the request to a second handler
 * over the same broker, drained when it was opened (draining is one-way,
 * so the main handler never is).
 *
 * The broker (store, delay, txn, groups, handler) is opened lazily once, in
 * a mkdtemp directory with a small disk budget and small segments, without
 * background threads; every TICK_EVERY inputs the background duties run on
 * this thread, and every REOPEN_EVERY inputs everything is rebuilt in a new
 * directory, so a full store does not hide the write paths for long.  Test
 * code only: the static state is this file's, never the library's.
 *
 * Invariants checked on every answer (abort() when broken, which libFuzzer
 * reports as a crash): API_DONE (no long poll without an api_wait); status
 * in 100..599; content type and route set; body and body_len consistent;
 * a JSON content type carries valid JSON; every status >= 400 (but the
 * probe's 503 {"status": ...}) is an application/problem+json object with
 * type "urn:outboxd:problem:...", title, detail and status equal to the HTTP
 * status; 405 has an Allow value; 429 and 503 problems a Retry-After.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>

#include "broker/delay.h"
#include "broker/group.h"
#include "broker/store.h"
#include "broker/txn.h"
#include "http_api/api.h"
#include "tmpdir.h"

#define MAX_HEADERS   16
#define TICK_EVERY    64
#define REOPEN_EVERY  10000

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* ---- the broker under test ------------------------------------------------ */

typedef struct fuzz_broker {
    char dir[512];
    brk_store *store;
    brk_delay *delay;
    brk_txn *txn;
    brk_groups *groups;
    api_handler *h;
    api_handler *drained;       /* opened at the first X-Fuzz-Drain input */
    unsigned runs;              /* inputs since the last (re)open */
} fuzz_broker;

static fuzz_broker fb;
static bool at_exit_set;        /* broker_close registered with atexit */

static void die(const char *what, brk_status st, const char *err)
{
    fprintf(stderr, "fuzz_api: %s: %s: %s\n", what, brk_status_name(st), err);
    abort();
}

static void broker_close(void)
{
    if (fb.drained)
        api_handler_close(fb.drained);
    if (fb.h)
        api_handler_close(fb.h);
    if (fb.groups)
        brk_groups_close(fb.groups);
    if (fb.txn)
        brk_txn_close(fb.txn);
    if (fb.delay)
        brk_delay_close(fb.delay);
    if (fb.store)
        brk_store_close(fb.store);
    if (fb.dir[0])
        brk_tmpdir_remove(fb.dir);
    memset(&fb, 0, sizeof fb);
}

static brk_status handler_open(api_handler **h)
{
    char err[256] = "";
    api_config cfg;
    api_config_init(&cfg);
    cfg.idem_max_keys = 32;
    cfg.max_body_bytes = 16u << 10;
    api_broker b = { fb.store, fb.txn, fb.delay, fb.groups };
    brk_status st = api_handler_open(h, &cfg, &b, err, sizeof err);
    if (st != BRK_OK)
        fprintf(stderr, "fuzz_api: api_handler_open: %s\n", err);
    return st;
}

/* The drained handler, opened on first use. */
static api_handler *drained_handler(void)
{
    if (!fb.drained) {
        brk_status st = handler_open(&fb.drained);
        if (st != BRK_OK)
            die("api_handler_open (drained)", st, "");
        api_handler_drain(fb.drained);
    }
    return fb.drained;
}

static void broker_open(void)
{
    char err[256] = "";
    if (brk_tmpdir_new("fuzz", fb.dir, sizeof fb.dir) != 0)
        abort();
    brk_store_opts so;
    brk_store_opts_init(&so);
    so.segment_bytes = 64u << 10;
    so.disk_budget_bytes = 4u << 20;
    so.no_background = true;
    so.uuid_seed = 1;
    brk_status st = brk_store_open(&fb.store, fb.dir, &so, err, sizeof err);
    if (st != BRK_OK)
        die("brk_store_open", st, err);
    brk_delay_opts dopt;
    brk_delay_opts_init(&dopt);
    dopt.no_background = true;
    if ((st = brk_delay_open(&fb.delay, fb.store, &dopt, err, sizeof err)) != BRK_OK)
        die("brk_delay_open", st, err);
    brk_txn_opts topt;
    brk_txn_opts_init(&topt);
    topt.delay = fb.delay;
    topt.workers = 1;
    topt.no_background = true;
    if ((st = brk_txn_open(&fb.txn, fb.store, &topt, err, sizeof err)) != BRK_OK)
        die("brk_txn_open", st, err);
    brk_groups_opts gopt;
    brk_groups_opts_init(&gopt);
    gopt.no_background = true;
    if ((st = brk_groups_open(&fb.groups, fb.store, &gopt, err, sizeof err)) != BRK_OK)
        die("brk_groups_open", st, err);
    if ((st = handler_open(&fb.h)) != BRK_OK)
        die("api_handler_open", st, "");
}

static void broker_tick(void)
{
    brk_store_tick(fb.store);
    brk_delay_tick(fb.delay, NULL);
    brk_txn_tick(fb.txn);
    brk_groups_tick(fb.groups);
}

/* ---- the input -------------------------------------------------------------- */

typedef struct fuzz_req {
    char *head;                 /* copy of everything before the body */
    char *method, *path, *query;
    const char *hname[MAX_HEADERS], *hvalue[MAX_HEADERS];
    size_t nheaders;
    char *body;                 /* exactly body_len bytes, or NULL */
    size_t body_len;
    bool drain;
} fuzz_req;

static const char *header_lookup(void *ctx, const char *name)
{
    const fuzz_req *r = ctx;
    for (size_t i = 0; i < r->nheaders; i++)
        if (strcasecmp(r->hname[i], name) == 0)
            return r->hvalue[i];
    return NULL;
}

/* Next line of s (NUL-terminated in place); NULL at the end. */
static char *next_line(char **s)
{
    if (!*s)
        return NULL;
    char *line = *s;
    char *nl = strchr(line, '\n');
    if (nl) {
        *nl = '\0';
        *s = nl + 1;
    } else {
        *s = NULL;
    }
    size_t n = strlen(line);
    if (n && line[n - 1] == '\r')
        line[n - 1] = '\0';
    return line;
}

static void parse_header(fuzz_req *r, char *line)
{
    char *colon = strchr(line, ':');
    if (!colon || r->nheaders == MAX_HEADERS)
        return;
    *colon = '\0';
    char *v = colon + 1;
    while (*v == ' ' || *v == '\t')
        v++;
    if (strcasecmp(line, "X-Fuzz-Drain") == 0) {
        r->drain = true;
        return;
    }
    r->hname[r->nheaders] = line;
    r->hvalue[r->nheaders] = v;
    r->nheaders++;
}

/* Split the input; false when out of memory. */
static bool parse_input(const uint8_t *data, size_t size, fuzz_req *r)
{
    memset(r, 0, sizeof *r);
    /* The head ends at the first "\n\n" (or "\n\r\n"); the body follows. */
    size_t head_len = size, body_at = size;
    bool has_body = false;
    for (size_t i = 0; i + 1 < size; i++) {
        if (data[i] != '\n')
            continue;
        size_t j = i + 1;
        if (j < size && data[j] == '\r')
            j++;
        if (j < size && data[j] == '\n') {
            head_len = i;
            body_at = j + 1;
            has_body = true;
            break;
        }
    }
    r->head = malloc(head_len + 1);
    if (!r->head)
        return false;
    memcpy(r->head, data, head_len);
    r->head[head_len] = '\0';       /* NULs inside end the strings early */
    if (has_body) {
        r->body_len = size - body_at;
        r->body = malloc(r->body_len ? r->body_len : 1);
        if (!r->body)
            return false;
        memcpy(r->body, data + body_at, r->body_len);
    }
    char *cur = r->head;
    char *first = next_line(&cur);
    char *sp = first ? strchr(first, ' ') : NULL;
    if (sp) {
        *sp = '\0';
        r->method = first;
        r->path = sp + 1;
    } else {
        r->method = first && *first ? first : "GET";
        r->path = "/";
    }
    char *q = strchr(r->path, '?');
    if (q) {
        *q = '\0';
        r->query = q + 1;
    }
    for (char *line; (line = next_line(&cur));)
        parse_header(r, line);
    return true;
}

/* ---- invariants ---------------------------------------------------------------- */

static void broken(const fuzz_req *in, const api_response *r, const char *why)
{
    fprintf(stderr, "fuzz_api: invariant broken: %s\n  request: %s %s%s%s\n"
            "  response: %d %s route=%s body(%zu)=%.*s\n", why, in->method, in->path,
            in->query ? "?" : "", in->query ? in->query : "", r->status,
            r->content_type ? r->content_type : "(null)", r->route ? r->route : "(null)",
            r->body_len, (int)(r->body_len > 2000 ? 2000 : r->body_len),
            r->body ? r->body : "");
    abort();
}

static void check_problem(const fuzz_req *in, const api_response *r)
{
    if (strcmp(r->content_type, "application/problem+json") != 0)
        broken(in, r, "an error without application/problem+json");
    json_t *p = json_loadb(r->body, r->body_len, JSON_ALLOW_NUL, NULL);
    if (!json_is_object(p))
        broken(in, r, "a problem body that is not a JSON object");
    const char *type = json_string_value(json_object_get(p, "type"));
    json_t *status = json_object_get(p, "status");
    bool good = type && strncmp(type, "urn:outboxd:problem:", 20) == 0 && type[20]
                && json_is_string(json_object_get(p, "title"))
                && json_is_string(json_object_get(p, "detail"))
                && json_is_integer(status) && json_integer_value(status) == r->status;
    json_decref(p);
    if (!good)
        broken(in, r, "a problem without type/title/detail or with another status");
    if (r->status == 405 && (!r->allow || !*r->allow))
        broken(in, r, "405 without Allow");
    if ((r->status == 429 || r->status == 503) && r->retry_after_s == 0)
        broken(in, r, "429/503 without Retry-After");
}

static void check_response(const fuzz_req *in, api_outcome out, const api_response *r)
{
    if (out != API_DONE)
        broken(in, r, "API_WAIT without an api_wait");
    if (r->status < 100 || r->status > 599)
        broken(in, r, "status outside 100..599");
    if (!r->content_type || !r->route)
        broken(in, r, "content type or route not set");
    if (!r->body && r->body_len)
        broken(in, r, "body_len without a body");
    bool probe = strcmp(r->route, "/readyz") == 0 && r->status == 503;
    if (r->status >= 400 && !probe) {
        check_problem(in, r);
    } else if (strncmp(r->content_type, "application/json", 16) == 0) {
        json_t *v = json_loadb(r->body, r->body_len, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
        if (!v)
            broken(in, r, "application/json body that is not JSON");
        json_decref(v);
    }
}

/* ---- entry point ---------------------------------------------------------------- */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (fb.runs >= REOPEN_EVERY)
        broker_close();
    if (!fb.store) {
        broker_open();
        if (!at_exit_set)
            atexit(broker_close);
        at_exit_set = true;
    }
    fb.runs++;
    fuzz_req in;
    if (!parse_input(data, size, &in)) {
        free(in.head);
        free(in.body);
        return 0;
    }
    api_handler *h = in.drain ? drained_handler() : fb.h;
    api_request req = {
        .method = in.method,
        .path = in.path,
        .query = in.query,
        .header = header_lookup,
        .header_ctx = &in,
        .body = in.body,
        .body_len = in.body_len,
    };
    api_response resp;
    memset(&resp, 0, sizeof resp);
    api_outcome out = api_handle(h, &req, &resp, NULL);
    check_response(&in, out, &resp);
    api_handler_observe(h, in.method, resp.route, resp.status, 0.0005);
    api_response_free(&resp);
    free(in.head);
    free(in.body);
    if (fb.runs % TICK_EVERY == 0)
        broker_tick();
    return 0;
}
