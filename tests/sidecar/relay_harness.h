/*
 * relay_harness.h - what the relay tests (test_relay.c, test_relay_dedup.c)
 * share: one PostgreSQL server per program (pg_fixture.h's group setup), a
 * database and a scratch directory for stores per test (setup/teardown),
 * relays opened with the tests' options, rows written
 * with libpq and parameters, stores read back message by message, and
 * waits that poll for a state with a generous deadline.
 *
 * tests/CMakeLists.txt builds each test file alone, so this header holds
 * definitions: static, and marked unused so that a file that needs only
 * some of them compiles without warnings.
 */
#ifndef SIDECAR_TEST_RELAY_HARNESS_H
#define SIDECAR_TEST_RELAY_HARNESS_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "broker/io.h"
#include "broker/store.h"
#include "broker/uuid.h"
#include "log.h"
#include "pg_fixture.h"
#include "relay.h"
#include "tmpdir.h"

#define RH_UNUSED __attribute__((unused))

#define WAIT_MS 30000           /* deadline of every wait for a state */

static int g_db_seq;

/* ---- helpers ----------------------------------------------------------------- */

RH_UNUSED static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

RH_UNUSED static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0) {}
}

#define WAIT_FOR(cond)                                                          \
    do {                                                                        \
        int64_t wait_end_ = now_ms() + WAIT_MS;                                 \
        while (!(cond) && now_ms() < wait_end_) sleep_ms(10);                   \
        if (!(cond)) fail_msg("timed out waiting for: %s", #cond);              \
    } while (0)

RH_UNUSED static long long rows_left(const char *db)
{
    return pgh_sql_int(g_pg, db, "SELECT count(*) FROM outbox.messages");
}

RH_UNUSED static PGconn *connect_as(const char *db, const char *user)
{
    char url[256];
    pgh_url(g_pg, db, user, NULL, url, sizeof url);
    PGconn *c = PQconnectdb(url);
    if (PQstatus(c) != CONNECTION_OK)
        fail_msg("connect %s: %s", url, PQerrorMessage(c));
    return c;
}

/* A row to insert; NULL fields are SQL NULL. */
typedef struct newrow {
    const char *topic, *key, *tag, *headers, *body;
    const void *bytes;
    size_t bytes_len;
} newrow;

/* What INSERT ... RETURNING gave back. */
typedef struct inserted {
    uint8_t msg_id[BRK_UUID_LEN];
    int64_t created_ms;
    char body_text[4096];       /* body::text as jsonb prints it */
} inserted;

RH_UNUSED static void insert_on(PGconn *c, const newrow *w, inserted *out)
{
    const char *v[6] = { w->topic, w->key, w->tag, w->headers, w->body,
                         (const char *)w->bytes };
    int len[6] = { 0, 0, 0, 0, 0, (int)w->bytes_len };
    int fmt[6] = { 0, 0, 0, 0, 0, 1 };
    PGresult *r = PQexecParams(c,
        "INSERT INTO outbox.messages (topic, key, tag, headers, body, body_bytes)"
        " VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6::bytea)"
        " RETURNING msg_id::text,"
        " floor(extract(epoch FROM created_at) * 1000)::bigint,"
        " coalesce(body::text, '')", 6, NULL, v, len, fmt, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        fail_msg("insert: %s", PQresultErrorMessage(r));
    if (out) {
        assert_int_equal(brk_uuid_parse(PQgetvalue(r, 0, 0), BRK_UUID_STR_LEN,
                                        out->msg_id), BRK_OK);
        out->created_ms = strtoll(PQgetvalue(r, 0, 1), NULL, 10);
        snprintf(out->body_text, sizeof out->body_text, "%s", PQgetvalue(r, 0, 2));
    }
    PQclear(r);
}

RH_UNUSED static void insert(const char *db, const newrow *w, inserted *out)
{
    PGconn *c = connect_as(db, NULL);
    insert_on(c, w, out);
    PQfinish(c);
}

/* n rows of topic "orders", keys k0..k9, bodies {"g": i}, one statement. */
RH_UNUSED static void insert_many(const char *db, int from, int n)
{
    char q[512];
    snprintf(q, sizeof q,
             "INSERT INTO outbox.messages (topic, key, body)"
             " SELECT 'orders', 'k' || (g %% 10), jsonb_build_object('g', g)"
             " FROM generate_series(%d, %d) g", from, from + n - 1);
    sql(db, q);
}

/* ---- fixture ------------------------------------------------------------------- */

typedef struct fixture {
    char db[64];
    char url[256];
    char dir[512];              /* scratch: stores in dir/a, dir/b, dir/c */
    brk_store_opts so;
    brk_store *s[3];
} fixture;

RH_UNUSED static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    if (!f || brk_tmpdir_new("sc_relay", f->dir, sizeof f->dir) != 0)
        return -1;
    snprintf(f->db, sizeof f->db, "relay_%d", ++g_db_seq);
    if (pgh_create_db(g_pg, f->db, true) != 0)
        return -1;
    pgh_url(g_pg, f->db, NULL, NULL, f->url, sizeof f->url);
    brk_store_opts_init(&f->so);
    *state = f;
    return 0;
}

RH_UNUSED static int teardown(void **state)
{
    fixture *f = *state;
    for (int i = 0; i < 3; i++) brk_store_close(f->s[i]);
    brk_tmpdir_remove(f->dir);
    free(f);
    return 0;
}

RH_UNUSED static brk_store *open_store(fixture *f, int i)
{
    char path[600], err[256];
    snprintf(path, sizeof path, "%s/%c", f->dir, 'a' + i);
    brk_status st = brk_store_open(&f->s[i], path, &f->so, err, sizeof err);
    if (st != BRK_OK) fail_msg("store open: %s: %s", brk_status_name(st), err);
    return f->s[i];
}

RH_UNUSED static void close_store(fixture *f, int i)
{
    assert_int_equal(brk_store_close(f->s[i]), BRK_OK);
    f->s[i] = NULL;
}

RH_UNUSED static void relay_opts(fixture *f, sc_relay_opts *o, brk_store *s, bool thread)
{
    sc_relay_opts_init(o);
    o->pg.conninfo = f->url;
    o->pg.backoff_min_ms = 20;
    o->pg.backoff_max_ms = 200;
    o->pg.connect_timeout_ms = 2000;
    o->store = s;
    o->no_thread = !thread;
}

RH_UNUSED static sc_relay *open_relay(const sc_relay_opts *o)
{
    sc_relay *r = NULL;
    char err[512];
    int rc = sc_relay_open(&r, o, err, sizeof err);
    if (rc != 0) fail_msg("relay open: %d: %s", rc, err);
    return r;
}

/* A relay without a thread (sc_relay_run_once drives it) on store s,
 * with relay_opts' options. */
RH_UNUSED static sc_relay *open_manual_relay(fixture *f, brk_store *s)
{
    sc_relay_opts o;
    relay_opts(f, &o, s, false);
    return open_relay(&o);
}

/* A relay with its thread on store s, polling every poll_ms. */
RH_UNUSED static sc_relay *start_relay(fixture *f, brk_store *s, int poll_ms)
{
    sc_relay_opts o;
    relay_opts(f, &o, s, true);
    o.poll_interval_ms = poll_ms;
    return open_relay(&o);
}

/* One sc_relay_run_once that must succeed with a batch of `want` rows. */
RH_UNUSED static void run_once_takes(sc_relay *r, size_t want)
{
    size_t n = 0;
    assert_int_equal(sc_relay_run_once(r, &n), 0);
    assert_int_equal(n, want);
}

RH_UNUSED static sc_relay_stats stats(sc_relay *r)
{
    sc_relay_stats s;
    sc_relay_get_stats(r, &s);
    return s;
}

/* One stored message, copied out of its batch. */
typedef struct smsg {
    uint8_t id[BRK_UUID_LEN];
    uint16_t queue;
    uint32_t flags;
    int64_t born_ms, store_ms;
    char key[BRK_KEY_MAX + 1];
    char tag[BRK_TAG_MAX + 1];
    uint8_t *body;
    size_t body_len;
    uint8_t *props;
    size_t props_len;
} smsg;

typedef struct msgs {
    smsg *m;
    size_t n;
} msgs;

RH_UNUSED static void msgs_free(msgs *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->m[i].body);
        free(l->m[i].props);
    }
    free(l->m);
    memset(l, 0, sizeof *l);
}

RH_UNUSED static void copy_rec(smsg *d, const brk_record *rec)
{
    memset(d, 0, sizeof *d);
    memcpy(d->id, rec->msg_id, BRK_UUID_LEN);
    d->queue = rec->queue;
    d->flags = rec->flags;
    d->born_ms = rec->born_ms;
    d->store_ms = rec->store_ms;
    memcpy(d->key, rec->key.ptr, rec->key.len);
    memcpy(d->tag, rec->tag.ptr, rec->tag.len);
    d->body = malloc(rec->body.len + 1);
    memcpy(d->body, rec->body.ptr, rec->body.len);
    d->body[rec->body.len] = 0;
    d->body_len = rec->body.len;
    d->props = malloc(rec->props.len + 1);
    memcpy(d->props, rec->props.ptr, rec->props.len);
    d->props_len = rec->props.len;
}

/* Every message of `topic`, queue by queue, each queue in its order. */
RH_UNUSED static msgs read_topic(brk_store *s, const char *topic)
{
    msgs l = { 0 };
    brk_topic_info ti;
    if (brk_topic_get(s, topic, &ti) != BRK_OK) return l;
    for (uint16_t q = 0; q < ti.queues; q++) {
        uint64_t from = 0;
        for (;;) {
            brk_batch *b = NULL;
            assert_int_equal(brk_store_read(s, topic, q, from, 256, &b), BRK_OK);
            if (b->count == 0) {
                brk_batch_free(b);
                break;
            }
            l.m = realloc(l.m, (l.n + b->count) * sizeof *l.m);
            for (size_t i = 0; i < b->count; i++) copy_rec(&l.m[l.n++], &b->recs[i]);
            from = b->next_offset;
            brk_batch_free(b);
        }
    }
    return l;
}

RH_UNUSED static const smsg *find_msg(const msgs *l, const uint8_t id[BRK_UUID_LEN])
{
    for (size_t i = 0; i < l->n; i++)
        if (memcmp(l->m[i].id, id, BRK_UUID_LEN) == 0) return &l->m[i];
    return NULL;
}

RH_UNUSED static int cmp_id(const void *a, const void *b)
{
    return memcmp(a, b, BRK_UUID_LEN);
}

/* The ids of l, sorted; fails if one appears twice. */
RH_UNUSED static uint8_t (*sorted_unique_ids(const msgs *l))[BRK_UUID_LEN]
{
    uint8_t (*ids)[BRK_UUID_LEN] = malloc((l->n + 1) * BRK_UUID_LEN);
    for (size_t i = 0; i < l->n; i++) memcpy(ids[i], l->m[i].id, BRK_UUID_LEN);
    qsort(ids, l->n, BRK_UUID_LEN, cmp_id);
    for (size_t i = 1; i < l->n; i++)
        if (memcmp(ids[i - 1], ids[i], BRK_UUID_LEN) == 0)
            fail_msg("message id stored twice");
    return ids;
}

/* The store holds `want` messages of `topic`, none of them twice. */
RH_UNUSED static void assert_stored_once(brk_store *s, const char *topic, size_t want)
{
    msgs l = read_topic(s, topic);
    assert_int_equal(l.n, want);
    free(sorted_unique_ids(&l));
    msgs_free(&l);
}

RH_UNUSED static bool prop_is(const smsg *m, const char *key, const char *want)
{
    brk_bytes v;
    if (brk_props_get((brk_bytes){ m->props, m->props_len }, key, &v) != BRK_OK)
        return false;
    return v.len == strlen(want) && memcmp(v.ptr, want, v.len) == 0;
}

RH_UNUSED static bool prop_has(const smsg *m, const char *key, const char *part)
{
    brk_bytes v;
    if (brk_props_get((brk_bytes){ m->props, m->props_len }, key, &v) != BRK_OK)
        return false;
    char buf[1024];
    size_t n = v.len < sizeof buf - 1 ? v.len : sizeof buf - 1;
    memcpy(buf, v.ptr, n);
    buf[n] = 0;
    return strstr(buf, part) != NULL;
}

#endif /* SIDECAR_TEST_RELAY_HARNESS_H */
