/*
 * test_store_topics.c - topics and queues of the storage engine: creation and
 * name/count validation, key -> queue mapping (stable across restarts and
 * growth, re-spread on an empty topic, moved only off removed queues on a
 * shrink), round robin for keyless messages, resize persistence, listing,
 * auto-create and message counts.
 *
 * Every test runs against a real store in a fresh mkdtemp directory under
 * /tmp (removed in teardown), with the POSIX I/O backend, no background
 * thread and a fake clock.  "Restart" means brk_store_close + brk_store_open
 * on the same directory.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "broker/crc32c.h"
#include "broker/store.h"
#include "fake_clock.h"
#include "tmpdir.h"

#define T0_MS 1700000000000LL     /* the fake wall clock's start */
#define NKEYS 1000

/* ---- fixture ------------------------------------------------------------- */

typedef struct fx {
    char root[256];               /* brk_tmpdir_new directory */
    char dir[300];                /* root/store */
    brk_fake_clock clock;
    brk_store_opts opts;          /* used by every (re)open */
    brk_store *s;
} fx;

static void open_store(fx *f)
{
    char err[256] = "";
    brk_status st = brk_store_open(&f->s, f->dir, &f->opts, err, sizeof err);
    if (st != BRK_OK)
        fail_msg("brk_store_open: %s: %s", brk_status_name(st), err);
}

/* Close and open again on the same directory, with f->opts. */
static void restart(fx *f)
{
    assert_int_equal(brk_store_close(f->s), BRK_OK);
    f->s = NULL;
    open_store(f);
}

static int setup(void **state)
{
    fx *f = calloc(1, sizeof *f);
    if (!f)
        return -1;
    if (brk_tmpdir_new("topics", f->root, sizeof f->root) != 0) {
        free(f);
        return -1;
    }
    snprintf(f->dir, sizeof f->dir, "%s/store", f->root);
    brk_fake_clock_init(&f->clock, T0_MS);
    brk_store_opts_init(&f->opts);
    f->opts.no_background = true;
    f->opts.clock = &f->clock.clock;
    f->opts.uuid_seed = 7;
    *state = f;
    char err[256] = "";
    if (brk_store_open(&f->s, f->dir, &f->opts, err, sizeof err) != BRK_OK) {
        fprintf(stderr, "setup: brk_store_open: %s\n", err);
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    if (!f)
        return 0;
    brk_store_close(f->s);
    int rc = brk_tmpdir_remove(f->root);
    free(f);
    return rc;
}

/* ---- helpers ------------------------------------------------------------- */

/* Append one message; key NULL = no key; queue -1 = by key / round robin.
 * The body is "<key>#<n>" or "q<queue>#<n>" so reads can be checked. */
static brk_status put(fx *f, const char *topic, const char *key, int32_t queue,
                      brk_append_res *res)
{
    static unsigned counter;
    char body[64];
    snprintf(body, sizeof body, "%s#%u", key ? key : "nokey", counter++);
    brk_append_req req = {
        .topic = topic,
        .queue = queue,
        .key = { key, key ? strlen(key) : 0 },
        .body = { body, strlen(body) },
    };
    brk_append_res local;
    return brk_store_append(f->s, &req, res ? res : &local);
}

static void key_name(int i, char *out, size_t cap)
{
    snprintf(out, cap, "key-%d", i);
}

static uint16_t key_queue(fx *f, const char *topic, const char *key)
{
    uint16_t q = UINT16_MAX;
    assert_int_equal(brk_topic_queue_for_key(f->s, topic, key, strlen(key), &q),
                     BRK_OK);
    return q;
}

/* queue for "key-0" .. "key-<NKEYS-1>" */
static void key_map(fx *f, const char *topic, uint16_t map[NKEYS])
{
    char key[32];
    for (int i = 0; i < NKEYS; i++) {
        key_name(i, key, sizeof key);
        map[i] = key_queue(f, topic, key);
    }
}

static uint32_t key_slot(const char *key)
{
    return brk_crc32c(0, key, strlen(key)) % BRK_KEY_SLOTS;
}

static brk_topic_info get_info(fx *f, const char *topic)
{
    brk_topic_info info;
    memset(&info, 0, sizeof info);
    assert_int_equal(brk_topic_get(f->s, topic, &info), BRK_OK);
    return info;
}

static uint64_t queue_max(fx *f, const char *topic, uint16_t q)
{
    uint64_t min = UINT64_MAX, max = UINT64_MAX;
    assert_int_equal(brk_store_queue_range(f->s, topic, q, &min, &max), BRK_OK);
    return max;
}

static bool bytes_eq(brk_bytes b, const char *s)
{
    return b.len == strlen(s) && memcmp(b.ptr, s, b.len) == 0;
}

/* ---- creation ------------------------------------------------------------ */

static void create_topic_with_default_and_explicit_queue_counts(void **state)
{
    fx *f = *state;
    assert_int_equal(brk_topic_create(f->s, "default-count", 0), BRK_OK);
    assert_int_equal(brk_topic_create(f->s, "explicit", 12), BRK_OK);
    assert_int_equal(brk_topic_create(f->s, "single", 1), BRK_OK);
    assert_int_equal(brk_topic_create(f->s, "widest", BRK_QUEUES_MAX), BRK_OK);

    brk_topic_info i = get_info(f, "default-count");
    assert_string_equal(i.name, "default-count");
    assert_int_equal(i.queues, BRK_QUEUES_DEFAULT);
    assert_int_equal(i.writable, BRK_QUEUES_DEFAULT);
    assert_int_equal(i.messages, 0);
    assert_int_equal(i.created_ms, T0_MS);

    i = get_info(f, "explicit");
    assert_int_equal(i.queues, 12);
    assert_int_equal(i.writable, 12);
    i = get_info(f, "single");
    assert_int_equal(i.queues, 1);
    assert_int_equal(i.writable, 1);
    i = get_info(f, "widest");
    assert_int_equal(i.queues, BRK_QUEUES_MAX);
    assert_int_equal(i.writable, BRK_QUEUES_MAX);

    /* The queues exist (empty) and no more than that. */
    uint64_t min = 1, max = 1;
    assert_int_equal(brk_store_queue_range(f->s, "explicit", 11, &min, &max),
                     BRK_OK);
    assert_int_equal(min, 0);
    assert_int_equal(max, 0);
    assert_int_equal(brk_store_queue_range(f->s, "explicit", 12, &min, &max),
                     BRK_RANGE);
    assert_int_equal(brk_store_queue_range(f->s, "widest", BRK_QUEUES_MAX - 1,
                                           &min, &max), BRK_OK);

    /* 0 means the store's configured default, not a fixed 4. */
    f->opts.default_queues = 6;
    restart(f);
    assert_int_equal(brk_topic_create(f->s, "six", 0), BRK_OK);
    assert_int_equal(get_info(f, "six").queues, 6);
    assert_int_equal(get_info(f, "explicit").queues, 12);
}

static void create_rejects_bad_names_and_counts(void **state)
{
    fx *f = *state;
    char long_name[BRK_TOPIC_MAX + 2];
    memset(long_name, 'x', BRK_TOPIC_MAX + 1);
    long_name[BRK_TOPIC_MAX + 1] = '\0';           /* 128 bytes */
    const char *bad[] = { "", ".", "..", ".hidden", "a/b", "/abs", long_name,
                          "has space", " lead", "trail ", "tab\tname",
                          "semi;colon", "star*", "caf\xc3\xa9" };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        bool created = true;
        assert_int_equal(brk_topic_create(f->s, bad[i], 4), BRK_INVAL);
        assert_true(brk_store_errstr(f->s)[0] != '\0');
        assert_int_equal(brk_topic_resize(f->s, bad[i], 4, &created),
                         BRK_INVAL);
        assert_false(created);
        /* Auto-create is on: a bad name must not slip in through append,
         * not even with allow_internal. */
        brk_append_req req = { .topic = bad[i], .queue = -1,
                               .body = { "x", 1 }, .allow_internal = true };
        brk_append_res res;
        assert_int_equal(brk_store_append(f->s, &req, &res), BRK_INVAL);
    }
    assert_int_equal(brk_topic_create(f->s, NULL, 4), BRK_INVAL);

    /* 127 bytes is the longest valid name. */
    long_name[BRK_TOPIC_MAX] = '\0';
    assert_int_equal(brk_topic_create(f->s, long_name, 1), BRK_OK);
    assert_int_equal(get_info(f, long_name).queues, 1);

    /* Internal topics: append needs allow_internal, even with auto-create. */
    brk_append_req req = { .topic = "__internal", .queue = -1,
                           .body = { "x", 1 } };
    brk_append_res res;
    brk_topic_info info;
    assert_int_equal(brk_store_append(f->s, &req, &res), BRK_INVAL);
    assert_int_equal(brk_topic_get(f->s, "__internal", &info), BRK_NOTFOUND);
    req.allow_internal = true;
    assert_int_equal(brk_store_append(f->s, &req, &res), BRK_OK);
    assert_int_equal(get_info(f, "__internal").messages, 1);

    /* Queue counts: 1..BRK_QUEUES_MAX (0 = default for create only). */
    assert_int_equal(brk_topic_create(f->s, "counts", BRK_QUEUES_MAX + 1),
                     BRK_INVAL);
    assert_int_equal(brk_topic_create(f->s, "counts", UINT16_MAX), BRK_INVAL);
    assert_int_equal(brk_topic_get(f->s, "counts", &info), BRK_NOTFOUND);
    bool created = true;
    assert_int_equal(brk_topic_resize(f->s, "counts", 0, &created), BRK_INVAL);
    assert_int_equal(brk_topic_resize(f->s, "counts", BRK_QUEUES_MAX + 1,
                                      &created), BRK_INVAL);
    assert_false(created);
    assert_int_equal(brk_topic_get(f->s, "counts", &info), BRK_NOTFOUND);

    /* Only the two valid topics exist, before and after a restart. */
    brk_topic_info *list = NULL;
    size_t n = 99;
    assert_int_equal(brk_topic_list(f->s, true, &list, &n), BRK_OK);
    assert_int_equal(n, 2);
    free(list);
    restart(f);
    assert_int_equal(brk_topic_list(f->s, true, &list, &n), BRK_OK);
    assert_int_equal(n, 2);
    free(list);
}

static void create_existing_topic_returns_exists(void **state)
{
    fx *f = *state;
    assert_int_equal(brk_topic_create(f->s, "orders", 4), BRK_OK);
    assert_int_equal(put(f, "orders", "k", -1, NULL), BRK_OK);
    brk_fake_clock_advance(&f->clock, 5000);

    assert_int_equal(brk_topic_create(f->s, "orders", 4), BRK_EXISTS);
    assert_int_equal(brk_topic_create(f->s, "orders", 9), BRK_EXISTS);
    assert_int_equal(brk_topic_create(f->s, "orders", 0), BRK_EXISTS);
    brk_topic_info i = get_info(f, "orders");
    assert_int_equal(i.queues, 4);               /* nothing changed */
    assert_int_equal(i.writable, 4);
    assert_int_equal(i.messages, 1);
    assert_int_equal(i.created_ms, T0_MS);

    restart(f);
    assert_int_equal(brk_topic_create(f->s, "orders", 2), BRK_EXISTS);
    i = get_info(f, "orders");
    assert_int_equal(i.queues, 4);
    assert_int_equal(i.messages, 1);
    assert_int_equal(i.created_ms, T0_MS);
}

/* ---- key -> queue ---------------------------------------------------------- */

static void same_key_maps_to_same_queue_always(void **state)
{
    fx *f = *state;
    enum { KEYS = 64, ROUNDS = 5, Q = 8 };
    assert_int_equal(brk_topic_create(f->s, "t", Q), BRK_OK);
    uint16_t mapped[KEYS];
    uint64_t per_queue[Q] = {0};
    char key[32];
    for (int k = 0; k < KEYS; k++) {
        key_name(k, key, sizeof key);
        mapped[k] = key_queue(f, "t", key);
        /* The documented rule for a new topic: crc32c(key) mod slots mod queues. */
        assert_int_equal(mapped[k], key_slot(key) % Q);
    }
    for (int r = 0; r < ROUNDS; r++) {
        for (int k = 0; k < KEYS; k++) {
            key_name(k, key, sizeof key);
            brk_append_res res;
            assert_int_equal(put(f, "t", key, -1, &res), BRK_OK);
            assert_int_equal(res.queue, mapped[k]);
            assert_int_equal(res.queue_offset, per_queue[res.queue]++);
            assert_int_equal(key_queue(f, "t", key), mapped[k]);
        }
    }
    /* Read back: each key's messages are on its queue, in append order. */
    for (uint16_t q = 0; q < Q; q++) {
        brk_batch *b = NULL;
        assert_int_equal(brk_store_read(f->s, "t", q, 0, 4096, &b), BRK_OK);
        assert_int_equal(b->count, per_queue[q]);
        for (size_t i = 0; i < b->count; i++) {
            int k = -1;
            char kbuf[32];
            assert_true(b->recs[i].key.len < sizeof kbuf);
            memcpy(kbuf, b->recs[i].key.ptr, b->recs[i].key.len);
            kbuf[b->recs[i].key.len] = '\0';
            assert_int_equal(sscanf(kbuf, "key-%d", &k), 1);
            assert_int_equal(mapped[k], q);
            assert_int_equal(b->recs[i].queue_offset, i);
        }
        brk_batch_free(b);
    }
}

static void keys_spread_over_all_queues(void **state)
{
    fx *f = *state;
    enum { Q = 8 };
    assert_int_equal(brk_topic_create(f->s, "t", Q), BRK_OK);
    uint64_t count[Q] = {0};
    char key[32];
    for (int k = 0; k < NKEYS; k++) {
        key_name(k, key, sizeof key);
        brk_append_res res;
        assert_int_equal(put(f, "t", key, -1, &res), BRK_OK);
        assert_true(res.queue < Q);
        count[res.queue]++;
    }
    for (uint16_t q = 0; q < Q; q++) {
        assert_true(count[q] > 0);
        assert_int_equal(queue_max(f, "t", q), count[q]);
    }
}

static void key_queue_stable_across_restart(void **state)
{
    fx *f = *state;
    enum { Q = 8, WRITTEN = 50 };
    assert_int_equal(brk_topic_create(f->s, "t", Q), BRK_OK);
    assert_int_equal(brk_topic_create(f->s, "never-written", 5), BRK_OK);
    static uint16_t before[NKEYS], after[NKEYS], idle_before[NKEYS],
        idle_after[NKEYS];
    key_map(f, "t", before);
    key_map(f, "never-written", idle_before);
    char key[32];
    for (int k = 0; k < WRITTEN; k++) {
        key_name(k, key, sizeof key);
        assert_int_equal(put(f, "t", key, -1, NULL), BRK_OK);
    }
    uint64_t len_before[Q];
    for (uint16_t q = 0; q < Q; q++)
        len_before[q] = queue_max(f, "t", q);

    restart(f);
    key_map(f, "t", after);
    key_map(f, "never-written", idle_after);
    assert_memory_equal(before, after, sizeof before);
    assert_memory_equal(idle_before, idle_after, sizeof idle_before);
    /* New appends land on the same queues, continuing their offsets. */
    for (int k = 0; k < WRITTEN; k++) {
        key_name(k, key, sizeof key);
        brk_append_res res;
        assert_int_equal(put(f, "t", key, -1, &res), BRK_OK);
        assert_int_equal(res.queue, before[k]);
        assert_int_equal(res.queue_offset, len_before[res.queue]++);
    }
}

static void key_queue_stable_when_topic_with_data_grows(void **state)
{
    fx *f = *state;
    enum { OLD = 4, NEW = 16, WRITTEN = 100 };
    assert_int_equal(brk_topic_create(f->s, "t", OLD), BRK_OK);
    static uint16_t before[NKEYS], after[NKEYS];
    char key[32];
    for (int k = 0; k < WRITTEN; k++) {
        key_name(k, key, sizeof key);
        assert_int_equal(put(f, "t", key, -1, NULL), BRK_OK);
    }
    key_map(f, "t", before);

    bool created = true;
    assert_int_equal(brk_topic_resize(f->s, "t", NEW, &created), BRK_OK);
    assert_false(created);
    brk_topic_info i = get_info(f, "t");
    assert_int_equal(i.queues, NEW);
    assert_int_equal(i.writable, NEW);
    assert_int_equal(i.messages, WRITTEN);

    /* Every key, written or not, stays where it was. */
    key_map(f, "t", after);
    assert_memory_equal(before, after, sizeof before);
    for (int k = 0; k < WRITTEN; k++) {
        key_name(k, key, sizeof key);
        brk_append_res res;
        assert_int_equal(put(f, "t", key, -1, &res), BRK_OK);
        assert_int_equal(res.queue, before[k]);
    }
    for (uint16_t q = OLD; q < NEW; q++)
        assert_int_equal(queue_max(f, "t", q), 0);   /* no keyed traffic */

    /* Keyless round robin covers all 16, new queues included. */
    for (int n = 0; n < 2 * NEW; n++)
        assert_int_equal(put(f, "t", NULL, -1, NULL), BRK_OK);
    for (uint16_t q = OLD; q < NEW; q++) {
        assert_int_equal(queue_max(f, "t", q), 2);
        brk_batch *b = NULL;
        assert_int_equal(brk_store_read(f->s, "t", q, 0, 10, &b), BRK_OK);
        assert_int_equal(b->count, 2);
        assert_int_equal(b->recs[0].key.len, 0);
        assert_int_equal(b->recs[1].key.len, 0);
        brk_batch_free(b);
    }
}

static void growing_an_empty_topic_respreads_keys(void **state)
{
    fx *f = *state;
    enum { NEW = 16 };
    assert_int_equal(brk_topic_create(f->s, "t", 4), BRK_OK);
    bool created = true;
    assert_int_equal(brk_topic_resize(f->s, "t", NEW, &created), BRK_OK);
    assert_false(created);
    static uint16_t map[NKEYS];
    key_map(f, "t", map);
    unsigned used[NEW] = {0};
    for (int k = 0; k < NKEYS; k++) {
        assert_true(map[k] < NEW);
        used[map[k]]++;
    }
    for (uint16_t q = 0; q < NEW; q++)
        assert_true(used[q] > 0);
    /* And appends follow the new spread. */
    char key[32];
    for (int k = 0; k < 50; k++) {
        key_name(k, key, sizeof key);
        brk_append_res res;
        assert_int_equal(put(f, "t", key, -1, &res), BRK_OK);
        assert_int_equal(res.queue, map[k]);
    }
    /* A topic created by resize is spread over its n queues too. */
    assert_int_equal(brk_topic_resize(f->s, "fresh", NEW, &created), BRK_OK);
    assert_true(created);
    key_map(f, "fresh", map);
    memset(used, 0, sizeof used);
    for (int k = 0; k < NKEYS; k++)
        used[map[k]]++;
    for (uint16_t q = 0; q < NEW; q++)
        assert_true(used[q] > 0);
}

/* ---- shrink and regrow ------------------------------------------------------ */

static void shrink_stops_writes_to_removed_queues(void **state)
{
    fx *f = *state;
    enum { OLD = 8, NEW = 3 };
    assert_int_equal(brk_topic_create(f->s, "t", OLD), BRK_OK);
    for (int32_t q = 0; q < OLD; q++)
        for (int m = 0; m < 2; m++)
            assert_int_equal(put(f, "t", NULL, q, NULL), BRK_OK);
    static uint16_t before[NKEYS], after[NKEYS];
    key_map(f, "t", before);

    assert_int_equal(brk_topic_resize(f->s, "t", NEW, NULL), BRK_OK);
    brk_topic_info i = get_info(f, "t");
    assert_int_equal(i.queues, OLD);       /* removed queues still exist */
    assert_int_equal(i.writable, NEW);
    assert_int_equal(i.messages, 2 * OLD);

    /* Explicit queue: removed -> READONLY, never existed -> RANGE. */
    brk_append_res res;
    for (int32_t q = NEW; q < OLD; q++) {
        assert_int_equal(put(f, "t", NULL, q, &res), BRK_READONLY);
        assert_true(brk_store_errstr(f->s)[0] != '\0');
    }
    assert_int_equal(put(f, "t", NULL, OLD, &res), BRK_RANGE);
    assert_int_equal(put(f, "t", NULL, 1000, &res), BRK_RANGE);
    assert_int_equal(put(f, "t", NULL, NEW - 1, &res), BRK_OK);
    assert_int_equal(res.queue, NEW - 1);
    assert_int_equal(res.queue_offset, 2);
    for (uint16_t q = NEW; q < OLD; q++)
        assert_int_equal(queue_max(f, "t", q), 2);   /* refused = not written */

    /* Data in removed queues stays readable. */
    for (uint16_t q = NEW; q < OLD; q++) {
        brk_batch *b = NULL;
        assert_int_equal(brk_store_read(f->s, "t", q, 0, 10, &b), BRK_OK);
        assert_int_equal(b->count, 2);
        for (size_t m = 0; m < 2; m++) {
            assert_int_equal(b->recs[m].queue, q);
            assert_int_equal(b->recs[m].queue_offset, m);
            assert_true(b->recs[m].body.len > 0);
        }
        brk_batch_free(b);
    }

    /* Keys: only those on removed queues move, to slot mod n. */
    key_map(f, "t", after);
    char key[32];
    int moved = 0;
    for (int k = 0; k < NKEYS; k++) {
        key_name(k, key, sizeof key);
        assert_true(after[k] < NEW);
        if (before[k] < NEW) {
            assert_int_equal(after[k], before[k]);
        } else {
            assert_int_equal(after[k], key_slot(key) % NEW);
            moved++;
        }
    }
    assert_true(moved > 0);
    for (int k = 0; k < 100; k++) {
        key_name(k, key, sizeof key);
        assert_int_equal(put(f, "t", key, -1, &res), BRK_OK);
        assert_int_equal(res.queue, after[k]);
    }
    /* Keyless traffic stays on the writable queues. */
    for (int n = 0; n < 30; n++) {
        assert_int_equal(put(f, "t", NULL, -1, &res), BRK_OK);
        assert_true(res.queue < NEW);
    }
    for (uint16_t q = NEW; q < OLD; q++)
        assert_int_equal(queue_max(f, "t", q), 2);
}

static void regrow_after_shrink_reopens_queues_with_offsets_intact(void **state)
{
    fx *f = *state;
    assert_int_equal(brk_topic_create(f->s, "t", 4), BRK_OK);
    for (int32_t q = 0; q < 4; q++)
        for (int m = 0; m < 3; m++)
            assert_int_equal(put(f, "t", NULL, q, NULL), BRK_OK);
    /* A key that lives on queue 3. */
    char key[32];
    int k = 0;
    do
        key_name(k++, key, sizeof key);
    while (key_queue(f, "t", key) != 3);
    brk_append_res res;
    assert_int_equal(put(f, "t", key, -1, &res), BRK_OK);
    assert_int_equal(res.queue, 3);
    assert_int_equal(res.queue_offset, 3);

    assert_int_equal(brk_topic_resize(f->s, "t", 2, NULL), BRK_OK);
    restart(f);                      /* the shrunk state is what reopens */
    assert_int_equal(put(f, "t", NULL, 3, &res), BRK_READONLY);
    uint16_t moved_to = key_queue(f, "t", key);
    assert_int_equal(moved_to, key_slot(key) % 2);

    bool created = true;
    assert_int_equal(brk_topic_resize(f->s, "t", 4, &created), BRK_OK);
    assert_false(created);
    brk_topic_info i = get_info(f, "t");
    assert_int_equal(i.queues, 4);
    assert_int_equal(i.writable, 4);
    assert_int_equal(i.messages, 13);

    /* Offsets continue where they stopped. */
    assert_int_equal(put(f, "t", NULL, 3, &res), BRK_OK);
    assert_int_equal(res.queue_offset, 4);
    assert_int_equal(put(f, "t", NULL, 2, &res), BRK_OK);
    assert_int_equal(res.queue_offset, 3);
    /* The moved key changed queue once; regrowing does not move it back. */
    assert_int_equal(key_queue(f, "t", key), moved_to);
    assert_int_equal(put(f, "t", key, -1, &res), BRK_OK);
    assert_int_equal(res.queue, moved_to);

    /* Old records of queue 3 are intact, followed by the new one. */
    brk_batch *b = NULL;
    assert_int_equal(brk_store_read(f->s, "t", 3, 0, 10, &b), BRK_OK);
    assert_int_equal(b->count, 5);
    for (size_t m = 0; m < 5; m++) {
        assert_int_equal(b->recs[m].queue_offset, m);
        assert_int_equal(b->recs[m].queue, 3);
    }
    assert_true(bytes_eq(b->recs[3].key, key));
    assert_int_equal(b->recs[4].key.len, 0);
    brk_batch_free(b);
}

/* ---- round robin -------------------------------------------------------------- */

static void round_robin_without_key_cycles_writable_queues(void **state)
{
    fx *f = *state;
    assert_int_equal(brk_topic_create(f->s, "t", 4), BRK_OK);
    brk_append_res res;
    uint16_t first = 0;
    for (int n = 0; n < 12; n++) {
        assert_int_equal(put(f, "t", NULL, -1, &res), BRK_OK);
        if (n == 0)
            first = res.queue;
        assert_int_equal(res.queue, (first + n) % 4);
    }
    /* An empty key (non-NULL pointer, length 0) counts as no key. */
    brk_append_req req = { .topic = "t", .queue = -1, .key = { "", 0 },
                           .body = { "b", 1 } };
    assert_int_equal(brk_store_append(f->s, &req, &res), BRK_OK);
    assert_int_equal(res.queue, (first + 12) % 4);
    for (uint16_t q = 0; q < 4; q++)
        assert_true(queue_max(f, "t", q) >= 3);

    /* After a shrink the cycle covers only the writable queues. */
    assert_int_equal(brk_topic_resize(f->s, "t", 3, NULL), BRK_OK);
    unsigned hits[4] = {0};
    uint16_t prev = UINT16_MAX;
    for (int n = 0; n < 9; n++) {
        assert_int_equal(put(f, "t", NULL, -1, &res), BRK_OK);
        assert_true(res.queue < 3);
        assert_int_not_equal(res.queue, prev);
        prev = res.queue;
        hits[res.queue]++;
    }
    assert_int_equal(hits[0], 3);
    assert_int_equal(hits[1], 3);
    assert_int_equal(hits[2], 3);
}

/* ---- persistence, listing, auto-create, counts -------------------------------- */

static void resize_persists_across_restart(void **state)
{
    fx *f = *state;
    assert_int_equal(brk_topic_create(f->s, "grow", 4), BRK_OK);
    char key[32];
    for (int k = 0; k < 20; k++) {
        key_name(k, key, sizeof key);
        assert_int_equal(put(f, "grow", key, -1, NULL), BRK_OK);
    }
    assert_int_equal(brk_topic_resize(f->s, "grow", 16, NULL), BRK_OK);
    assert_int_equal(brk_topic_create(f->s, "shrink", 8), BRK_OK);
    for (int32_t q = 0; q < 8; q++)
        assert_int_equal(put(f, "shrink", NULL, q, NULL), BRK_OK);
    assert_int_equal(brk_topic_resize(f->s, "shrink", 3, NULL), BRK_OK);
    bool created = false;
    assert_int_equal(brk_topic_resize(f->s, "made", 5, &created), BRK_OK);
    assert_true(created);

    static uint16_t grow_b[NKEYS], shrink_b[NKEYS], made_b[NKEYS];
    static uint16_t grow_a[NKEYS], shrink_a[NKEYS], made_a[NKEYS];
    key_map(f, "grow", grow_b);
    key_map(f, "shrink", shrink_b);
    key_map(f, "made", made_b);

    restart(f);
    brk_topic_info i = get_info(f, "grow");
    assert_int_equal(i.queues, 16);
    assert_int_equal(i.writable, 16);
    assert_int_equal(i.messages, 20);
    i = get_info(f, "shrink");
    assert_int_equal(i.queues, 8);
    assert_int_equal(i.writable, 3);
    assert_int_equal(i.messages, 8);
    i = get_info(f, "made");
    assert_int_equal(i.queues, 5);
    assert_int_equal(i.writable, 5);

    /* The slot tables came back exactly. */
    key_map(f, "grow", grow_a);
    key_map(f, "shrink", shrink_a);
    key_map(f, "made", made_a);
    assert_memory_equal(grow_b, grow_a, sizeof grow_a);
    assert_memory_equal(shrink_b, shrink_a, sizeof shrink_a);
    assert_memory_equal(made_b, made_a, sizeof made_a);

    /* Writability came back too. */
    brk_append_res res;
    assert_int_equal(put(f, "shrink", NULL, 5, &res), BRK_READONLY);
    assert_int_equal(put(f, "shrink", NULL, 8, &res), BRK_RANGE);
    assert_int_equal(put(f, "shrink", NULL, 2, &res), BRK_OK);
    assert_int_equal(res.queue_offset, 1);
    assert_int_equal(queue_max(f, "shrink", 7), 1);
    assert_int_equal(put(f, "grow", NULL, 15, &res), BRK_OK);
    assert_int_equal(res.queue_offset, 0);
    assert_int_equal(put(f, "made", NULL, 4, &res), BRK_OK);
}

static void topic_list_is_sorted_and_hides_internal(void **state)
{
    fx *f = *state;
    brk_topic_info *list = NULL;
    size_t n = 99;
    assert_int_equal(brk_topic_list(f->s, true, &list, &n), BRK_OK);
    assert_int_equal(n, 0);
    free(list);

    const char *names[] = { "zeta", "alpha", "Mid", "__sys", "beta-2",
                            "_single", "alpha.v2" };
    for (size_t k = 0; k < sizeof names / sizeof *names; k++)
        assert_int_equal(brk_topic_create(f->s, names[k], (uint16_t)(k + 1)),
                         BRK_OK);
    brk_append_req req = { .topic = "__auto", .queue = -1,
                           .body = { "x", 1 }, .allow_internal = true };
    brk_append_res res;
    assert_int_equal(brk_store_append(f->s, &req, &res), BRK_OK);

    const char *visible[] = { "Mid", "_single", "alpha", "alpha.v2", "beta-2",
                              "zeta" };
    const uint16_t vq[] = { 3, 6, 2, 7, 5, 1 };
    const char *all[] = { "Mid", "__auto", "__sys", "_single", "alpha",
                          "alpha.v2", "beta-2", "zeta" };
    for (int round = 0; round < 2; round++) {
        assert_int_equal(brk_topic_list(f->s, false, &list, &n), BRK_OK);
        assert_int_equal(n, 6);
        for (size_t k = 0; k < n; k++) {
            assert_string_equal(list[k].name, visible[k]);
            assert_int_equal(list[k].queues, vq[k]);
        }
        free(list);
        assert_int_equal(brk_topic_list(f->s, true, &list, &n), BRK_OK);
        assert_int_equal(n, 8);
        for (size_t k = 0; k < n; k++)
            assert_string_equal(list[k].name, all[k]);
        assert_int_equal(list[1].messages, 1);      /* __auto */
        free(list);
        restart(f);
    }
}

static void auto_create_off_gives_notfound(void **state)
{
    fx *f = *state;
    f->opts.auto_create_topics = false;
    restart(f);
    brk_append_res res;
    brk_topic_info info;
    assert_int_equal(put(f, "nope", NULL, -1, &res), BRK_NOTFOUND);
    assert_int_equal(put(f, "nope", "k", -1, &res), BRK_NOTFOUND);
    assert_int_equal(put(f, "nope", NULL, 0, &res), BRK_NOTFOUND);
    assert_true(brk_store_errstr(f->s)[0] != '\0');
    assert_int_equal(brk_topic_get(f->s, "nope", &info), BRK_NOTFOUND);
    uint16_t q;
    assert_int_equal(brk_topic_queue_for_key(f->s, "nope", "k", 1, &q),
                     BRK_NOTFOUND);
    uint64_t min, max;
    assert_int_equal(brk_store_queue_range(f->s, "nope", 0, &min, &max),
                     BRK_NOTFOUND);
    brk_batch *b = NULL;
    assert_int_equal(brk_store_read(f->s, "nope", 0, 0, 10, &b), BRK_NOTFOUND);
    assert_null(b);
    brk_topic_info *list = NULL;
    size_t n = 99;
    assert_int_equal(brk_topic_list(f->s, true, &list, &n), BRK_OK);
    assert_int_equal(n, 0);
    free(list);

    /* Created explicitly, it takes writes. */
    assert_int_equal(brk_topic_create(f->s, "nope", 2), BRK_OK);
    assert_int_equal(put(f, "nope", NULL, -1, &res), BRK_OK);
    assert_int_equal(get_info(f, "nope").messages, 1);
}

static void auto_create_on_uses_default_queues(void **state)
{
    fx *f = *state;
    f->opts.default_queues = 6;
    restart(f);
    brk_append_res res;
    assert_int_equal(put(f, "fresh", "k", -1, &res), BRK_OK);
    assert_true(res.queue < 6);
    assert_int_equal(res.queue_offset, 0);
    brk_topic_info i = get_info(f, "fresh");
    assert_int_equal(i.queues, 6);
    assert_int_equal(i.writable, 6);
    assert_int_equal(i.messages, 1);
    restart(f);                       /* auto-created topics are durable */
    i = get_info(f, "fresh");
    assert_int_equal(i.queues, 6);
    assert_int_equal(i.messages, 1);
}

static void topic_get_counts_messages(void **state)
{
    fx *f = *state;
    assert_int_equal(brk_topic_create(f->s, "a", 4), BRK_OK);
    assert_int_equal(brk_topic_create(f->s, "b", 2), BRK_OK);
    assert_int_equal(get_info(f, "a").messages, 0);
    char key[32];
    for (int n = 0; n < 10; n++)
        assert_int_equal(put(f, "a", NULL, -1, NULL), BRK_OK);
    for (int n = 0; n < 7; n++) {
        key_name(n, key, sizeof key);
        assert_int_equal(put(f, "a", key, -1, NULL), BRK_OK);
    }
    for (int n = 0; n < 3; n++)
        assert_int_equal(put(f, "b", NULL, 1, NULL), BRK_OK);

    assert_int_equal(get_info(f, "a").messages, 17);
    assert_int_equal(get_info(f, "b").messages, 3);
    uint64_t sum = 0;
    for (uint16_t q = 0; q < 4; q++)
        sum += queue_max(f, "a", q);
    assert_int_equal(sum, 17);

    brk_topic_info *list = NULL;
    size_t n = 0;
    assert_int_equal(brk_topic_list(f->s, false, &list, &n), BRK_OK);
    assert_int_equal(n, 2);
    assert_int_equal(list[0].messages, 17);
    assert_int_equal(list[1].messages, 3);
    free(list);

    restart(f);
    assert_int_equal(get_info(f, "a").messages, 17);
    assert_int_equal(get_info(f, "b").messages, 3);
    assert_int_equal(put(f, "a", NULL, -1, NULL), BRK_OK);
    assert_int_equal(get_info(f, "a").messages, 18);
    brk_topic_info info;
    assert_int_equal(brk_topic_get(f->s, "missing", &info), BRK_NOTFOUND);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
        T(create_topic_with_default_and_explicit_queue_counts),
        T(create_rejects_bad_names_and_counts),
        T(create_existing_topic_returns_exists),
        T(same_key_maps_to_same_queue_always),
        T(keys_spread_over_all_queues),
        T(key_queue_stable_across_restart),
        T(key_queue_stable_when_topic_with_data_grows),
        T(growing_an_empty_topic_respreads_keys),
        T(shrink_stops_writes_to_removed_queues),
        T(regrow_after_shrink_reopens_queues_with_offsets_intact),
        T(round_robin_without_key_cycles_writable_queues),
        T(resize_persists_across_restart),
        T(topic_list_is_sorted_and_hides_internal),
        T(auto_create_off_gives_notfound),
        T(auto_create_on_uses_default_queues),
        T(topic_get_counts_messages),
#undef T
    };
    return cmocka_run_group_tests_name("broker_core.store_topics", tests, NULL,
                                       NULL);
}
