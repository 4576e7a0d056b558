/*
 * test_relay_dedup.c - the relay stores a row once even when a batch did
 * not finish (relay.c, "Duplicates, bounded"), and only such rows cost a
 * store lookup: markers in "__relay", the candidate range they carry, and
 * brk_store_lookup_since.  Against a real PostgreSQL and real stores (one
 * test crashes a simulated disk, tests/support/io_sim).  A batch that
 * "crashes" before its COMMIT is made with the test-only option
 * fail_before_commit_test: rows appended and flushed, DELETE sent, then
 * the session dropped instead of COMMIT, as when a process dies there.
 *
 * Helpers and fixtures: relay_harness.h.  No test here starts a thread.
 */
#include "relay_harness.h"

#include "io_sim.h"

/* Relay every row left; returns how many there were. */
static size_t drain(sc_relay *r)
{
    size_t total = 0, n = 0;
    do {
        assert_int_equal(sc_relay_run_once(r, &n), 0);
        total += n;
    } while (n > 0);
    return total;
}

static void row_stored_before_a_crash_is_not_stored_again(void **state)
{
    fixture *f = *state;
    brk_store *s = open_store(f, 0);
    inserted a, b;
    insert(f->db, &(newrow){ .topic = "orders", .key = "k", .body = "{\"a\": 1}" }, &a);
    /* A relay appends row a and dies before its COMMIT. */
    sc_relay_opts o;
    relay_opts(f, &o, s, false);
    o.fail_before_commit_test = 1;
    sc_relay *r = open_relay(&o);
    assert_int_equal(sc_relay_run_once(r, NULL), -1);
    assert_non_null(strstr(stats(r).last_error, "fail_before_commit_test"));
    sc_relay_close(r);
    close_store(f, 0);
    assert_int_equal(rows_left(f->db), 1);
    insert(f->db, &(newrow){ .topic = "orders", .key = "k", .body = "{\"a\": 2}" }, &b);

    s = open_store(f, 0);
    r = open_manual_relay(f, s);
    run_once_takes(r, 2);
    sc_relay_stats st = stats(r);
    assert_int_equal(st.rows_duplicate, 1);
    assert_int_equal(st.rows_stored, 1);
    assert_int_equal(st.lookups, 1);
    assert_int_equal(rows_left(f->db), 0);
    msgs l = read_topic(s, "orders");
    assert_int_equal(l.n, 2);
    assert_memory_equal(l.m[0].id, a.msg_id, BRK_UUID_LEN);
    assert_memory_equal(l.m[1].id, b.msg_id, BRK_UUID_LEN);
    msgs_free(&l);
    sc_relay_close(r);
}

/* A store holding other messages; a relay stores a batch of 100 and dies
 * before its COMMIT; 5 000 rows more pile up; a new relay on the store
 * looks up the 100 rows of the unfinished batch and no other. */
static void restart_with_a_backlog_looks_up_only_the_unfinished_batch(void **state)
{
    fixture *f = *state;
    brk_store *s = open_store(f, 0);
    for (int i = 0; i < 2000; i++) {
        brk_append_req q;
        memset(&q, 0, sizeof q);
        q.topic = "other";
        q.queue = -1;
        q.body = (brk_bytes){ "unrelated", 9 };
        brk_append_res res;
        assert_int_equal(brk_store_append(s, &q, &res), BRK_OK);
    }
    insert_many(f->db, 1, 100);
    sc_relay_opts o;
    relay_opts(f, &o, s, false);
    o.batch = 100;
    o.fail_before_commit_test = 1;
    sc_relay *r = open_relay(&o);
    size_t n = 0;
    assert_int_equal(sc_relay_run_once(r, &n), -1);
    sc_relay_close(r);
    close_store(f, 0);
    assert_int_equal(rows_left(f->db), 100);
    insert_many(f->db, 101, 5000);

    s = open_store(f, 0);
    r = open_manual_relay(f, s);        /* batch 500 */
    assert_int_equal(drain(r), 5100);
    sc_relay_stats st = stats(r);
    assert_int_equal(st.rows_duplicate, 100);
    assert_int_equal(st.rows_stored, 5000);
    assert_int_equal(st.lookups, 100);
    assert_int_equal(rows_left(f->db), 0);
    sc_relay_close(r);
    assert_stored_once(s, "orders", 5100);

    /* A relay whose last batch committed leaves nothing to look up. */
    insert_many(f->db, 5101, 10);
    r = open_manual_relay(f, s);
    assert_int_equal(drain(r), 10);
    assert_int_equal(stats(r).lookups, 0);
    assert_int_equal(stats(r).rows_stored, 10);
    sc_relay_close(r);
}

/* A transaction holding id 1 commits after a batch of ids 2..6, 8..13
 * failed; another holding id 7 commits later still.  The next batch (11
 * rows: 1..6, 8..12) stores row 1 without a lookup and finds the others;
 * row 13 stays a candidate across a restart (the marker carries it) and
 * is found; then no candidate is left, so row 7, committed last, is
 * stored without a lookup. */
static void late_commits_are_stored_and_unfinished_rows_found_once(void **state)
{
    fixture *f = *state;
    brk_store *s = open_store(f, 0);
    PGconn *late1 = connect_as(f->db, NULL), *late7 = connect_as(f->db, NULL);
    PQclear(PQexec(late1, "BEGIN"));
    insert_on(late1, &(newrow){ .topic = "orders", .body = "{\"late\": 1}" }, NULL);
    insert_many(f->db, 2, 5);                           /* ids 2..6 */
    PQclear(PQexec(late7, "BEGIN"));
    insert_on(late7, &(newrow){ .topic = "orders", .body = "{\"late\": 7}" }, NULL);
    insert_many(f->db, 8, 6);                           /* ids 8..13 */
    assert_int_equal(pgh_sql_int(g_pg, f->db, "SELECT max(id) FROM outbox.messages"), 13);

    sc_relay_opts o;
    relay_opts(f, &o, s, false);
    o.batch = 11;
    o.fail_before_commit_test = 1;
    sc_relay *r = open_relay(&o);
    size_t n = 0;
    assert_int_equal(sc_relay_run_once(r, &n), -1);     /* 2..6, 8..13 */
    PQclear(PQexec(late1, "COMMIT"));
    run_once_takes(r, 11);                              /* 1..6, 8..12 */
    sc_relay_stats st = stats(r);
    assert_int_equal(st.lookups, 10);
    assert_int_equal(st.rows_duplicate, 10);
    assert_int_equal(st.rows_stored, 1);
    assert_int_equal(rows_left(f->db), 1);              /* 13 */
    sc_relay_close(r);

    o.fail_before_commit_test = 0;
    r = open_relay(&o);
    run_once_takes(r, 1);
    assert_int_equal(stats(r).lookups, 1);
    assert_int_equal(stats(r).rows_duplicate, 1);
    PQclear(PQexec(late7, "COMMIT"));
    run_once_takes(r, 1);
    assert_int_equal(stats(r).lookups, 1);
    assert_int_equal(stats(r).rows_stored, 1);
    assert_int_equal(rows_left(f->db), 0);
    sc_relay_close(r);
    PQfinish(late1);
    PQfinish(late7);
    assert_stored_once(s, "orders", 13);
}

/* The POSIX disk, except that once armed, `pass` more pwrites go through
 * and the next fails with ENOSPC (without writing), once. */
typedef struct nospc_io {
    brk_io io;
    atomic_int pass;            /* -1: disarmed */
} nospc_io;

static int nospc_pwrite(brk_io *io, brk_file *f, const void *buf, size_t len,
                        uint64_t off)
{
    nospc_io *n = (nospc_io *)io;
    if (atomic_load(&n->pass) >= 0 && atomic_fetch_sub(&n->pass, 1) == 0)
        return -ENOSPC;
    brk_io *posix = brk_io_posix();
    return posix->pwrite(posix, f, buf, len, off);
}

/* In SYNC mode rows are appended with defer_sync and become visible with
 * the batch's flush.  A batch cut short by a store error after appending
 * some rows must not leave them unflushed: the retry looks them up, and an
 * unflushed record is not found, so it would be stored a second time. */
static void rows_appended_before_a_store_error_are_not_stored_twice(void **state)
{
    fixture *f = *state;
    static nospc_io nio;
    nio.io = *brk_io_posix();
    nio.io.pwrite = nospc_pwrite;
    atomic_init(&nio.pass, -1);
    f->so.io = &nio.io;
    f->so.flush_mode = BRK_FLUSH_SYNC;
    f->so.checkpoint_interval_ms = 3600000;    /* no index writes meanwhile */
    brk_store *s = open_store(f, 0);
    sc_relay *r = open_manual_relay(f, s);
    /* Warm up: topics and the segment exist. */
    insert(f->db, &(newrow){ .topic = "orders", .key = "k", .body = "{\"n\": 0}" }, NULL);
    assert_int_equal(sc_relay_run_once(r, NULL), 0);

    insert_many(f->db, 1, 4);
    atomic_store(&nio.pass, 2);         /* two appends, then ENOSPC */
    size_t n = 0;
    assert_int_equal(sc_relay_run_once(r, &n), -1);
    assert_non_null(strstr(stats(r).last_error, "NOSPC"));
    assert_int_equal(rows_left(f->db), 4);
    run_once_takes(r, 4);
    assert_int_equal(rows_left(f->db), 0);
    sc_relay_close(r);
    assert_stored_once(s, "orders", 5);
}

/* The disk crashes at every point of a batch (each write, the flush), in
 * each of io_sim's crash modes: after recovery the log is a prefix, so a
 * row of the batch that survived has its marker before it, and a new
 * relay stores every row exactly once. */
static void crash_at_any_point_of_a_batch_stores_every_row_once(void **state)
{
    fixture *f = *state;
    static const int modes[] = { BRK_SIM_DROP_ALL, BRK_SIM_KEEP_RANDOM,
                                 BRK_SIM_TORN_LAST };
    enum { ROWS = 5 };
    int next_g = 1;
    for (size_t m = 0; m < sizeof modes / sizeof modes[0]; m++)
        for (uint64_t k = 0;; k++) {
            brk_sim *sim = NULL;
            assert_int_equal(brk_sim_open(&sim, 1000 * m + k), BRK_OK);
            brk_store_opts so;
            brk_store_opts_init(&so);
            so.io = brk_sim_io(sim);
            so.flush_mode = BRK_FLUSH_SYNC;
            so.no_background = true;
            brk_store *s = NULL;
            char err[256];
            assert_int_equal(brk_store_open(&s, "/s", &so, err, sizeof err), BRK_OK);
            sc_relay *r = open_manual_relay(f, s);
            insert_many(f->db, next_g++, 1);    /* warm up: topics, segment */
            assert_int_equal(drain(r), 1);
            insert_many(f->db, next_g, ROWS);
            next_g += ROWS;
            uint64_t ops = brk_sim_ops(sim);
            brk_sim_set_crash_after(sim, k);
            size_t n = 0;
            int rc = sc_relay_run_once(r, &n);
            bool crashed = brk_sim_is_dead(sim);
            assert_true(rc == (crashed ? -1 : 0));
            uint64_t batch_ops = brk_sim_ops(sim) - ops;
            sc_relay_close(r);
            brk_store_close(s);
            assert_int_equal(brk_sim_crash(sim, modes[m]), BRK_OK);
            assert_int_equal(brk_store_open(&s, "/s", &so, err, sizeof err), BRK_OK);
            r = open_manual_relay(f, s);
            drain(r);
            assert_true(stats(r).lookups <= ROWS);
            sc_relay_close(r);
            assert_int_equal(rows_left(f->db), 0);
            assert_stored_once(s, "orders", 1 + ROWS);
            brk_store_close(s);
            brk_sim_close(sim);
            if (!crashed) {
                /* The batch ran to its end: every point was tried. */
                assert_true(batch_ops >= ROWS + 2 && k >= batch_ops);
                break;
            }
        }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
        T(row_stored_before_a_crash_is_not_stored_again),
        T(restart_with_a_backlog_looks_up_only_the_unfinished_batch),
        T(late_commits_are_stored_and_unfinished_rows_found_once),
        T(rows_appended_before_a_store_error_are_not_stored_twice),
        T(crash_at_any_point_of_a_batch_stores_every_row_once),
#undef T
    };
    return cmocka_run_group_tests(tests, pg_group_setup, pg_group_teardown);
}
