/*
 * test_handler_metrics.c - the metrics hook of the request handler
 * (api_config.metrics_ext), driven in process (handler_fx.h): its families
 * come after http_api's own on every scrape and on no other route, a hook
 * without a final newline still leaves a valid page, and concurrent
 * scrapes (run under TSan too) each run the hook once and each get a
 * valid page (prom_page.h: every family once, with its HELP and TYPE).
 * The page itself is pinned in test_handler.c.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "handler_fx.h"
/* check_page, count_name: shared with test_daemon_pg.c */
#include "../sidecar/prom_page.h"

/* api_config.metrics_ext: its families come after http_api's own, on
 * every scrape, with the ctx it was given. */
typedef struct ext_ctx {
    atomic_int calls;
} ext_ctx;

static void ext_render(void *ctx, FILE *out)
{
    ext_ctx *e = ctx;
    int n = atomic_fetch_add(&e->calls, 1) + 1;
    fprintf(out, "# HELP outboxd_test_ext Written by the test's hook.\n"
                 "# TYPE outboxd_test_ext gauge\n"
                 "outboxd_test_ext{call=\"%d\"} 1\n", n);
}

/* Reopen the fixture's handler with `ext` as its metrics_ext (NULL: none).
 * A test that installs one reopens without it before `ext` goes out of
 * scope. */
static void reopen_with_ext(fx *f, api_metrics_ext *ext)
{
    char err[256];
    api_handler_close(f->h);
    f->cfg.metrics_ext = ext;
    api_broker b = { f->s, f->t, f->d, f->g };
    assert_int_equal(api_handler_open(&f->h, &f->cfg, &b, err, sizeof err),
                     BRK_OK);
}

static void metrics_ext_families_are_appended_to_the_page(void **state)
{
    fx *f = *state;
    ext_ctx e = { 0 };
    api_metrics_ext ext = { ext_render, &e };
    reopen_with_ext(f, &ext);
    res r;
    call(f, "GET", "/metrics", NULL, &r);
    expect_status(&r, 200);
    assert_true(has_line(r.body, "outboxd_test_ext{call=\"1\"} 1"));
    assert_true(has_line(r.body, "# TYPE outboxd_test_ext gauge"));
    /* after every family of http_api's own */
    assert_true(strstr(r.body, "outboxd_build_info") <
                strstr(r.body, "# HELP outboxd_test_ext "));
    res_free(&r);
    call(f, "GET", "/metrics", NULL, &r);
    assert_true(has_line(r.body, "outboxd_test_ext{call=\"2\"} 1"));
    assert_int_equal(atomic_load(&e.calls), 2);
    res_free(&r);
    /* other routes never call it */
    call(f, "GET", "/healthz", NULL, &r);
    expect_status(&r, 200);
    res_free(&r);
    assert_int_equal(atomic_load(&e.calls), 2);
    /* the handler is closed (teardown) before `ext` goes out of scope */
    reopen_with_ext(f, NULL);
    call(f, "GET", "/metrics", NULL, &r);
    assert_null(strstr(r.body, "outboxd_test_ext"));
    res_free(&r);
}

/* A hook that forgets the last newline cannot glue its last sample to
 * whatever comes next or leave the page unterminated. */
static void ext_no_newline(void *ctx, FILE *out)
{
    (void)ctx;
    fprintf(out, "# HELP outboxd_test_nonl A hook without a final newline.\n"
                 "# TYPE outboxd_test_nonl gauge\n"
                 "outboxd_test_nonl 7");
}

static void metrics_ext_without_a_final_newline_still_ends_the_page(
    void **state)
{
    fx *f = *state;
    api_metrics_ext ext = { ext_no_newline, NULL };
    reopen_with_ext(f, &ext);
    res r;
    call(f, "GET", "/metrics", NULL, &r);
    expect_status(&r, 200);
    char names[128][96];
    size_t n = check_page(r.body, names, 128);
    assert_int_equal(count_name(names, n, "outboxd_test_nonl"), 1);
    assert_true(has_line(r.body, "outboxd_test_nonl 7"));
    res_free(&r);
    reopen_with_ext(f, NULL);
}

/* Scrapes from several threads at once: the hook runs once per scrape,
 * concurrently (TSan watches), and every page is a valid one with each
 * family once, the core's and the hook's. */
typedef struct scraper {
    fx *f;
    int pages;
} scraper;

static void *scrape(void *arg)
{
    scraper *sc = arg;
    for (int i = 0; i < 25; i++) {
        res r;
        call(sc->f, "GET", "/metrics", NULL, &r);
        if (r.status == 200) {
            char names[128][96];
            size_t n = check_page(r.body, names, 128);
            if (count_name(names, n, "outboxd_test_ext") == 1 &&
                count_name(names, n, "outboxd_ready") == 1)
                sc->pages++;
        }
        res_free(&r);
    }
    return NULL;
}

static void concurrent_scrapes_run_the_ext_once_each_and_stay_valid(
    void **state)
{
    fx *f = *state;
    ext_ctx e = { 0 };
    api_metrics_ext ext = { ext_render, &e };
    reopen_with_ext(f, &ext);
    send_ok(f, "mt", "{'key':'a','body':1}");
    scraper sc[4] = { { f, 0 }, { f, 0 }, { f, 0 }, { f, 0 } };
    pthread_t th[4];
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&th[i], NULL, scrape, &sc[i]), 0);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < 4; i++)
        assert_int_equal(sc[i].pages, 25);
    assert_int_equal(atomic_load(&e.calls), 100);
    reopen_with_ext(f, NULL);
}

/* ---- main ------------------------------------------------------------------------------------ */

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(metrics_ext_families_are_appended_to_the_page),
        T(metrics_ext_without_a_final_newline_still_ends_the_page),
        T(concurrent_scrapes_run_the_ext_once_each_and_stay_valid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
