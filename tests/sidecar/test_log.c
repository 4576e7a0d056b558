/*
 * test_log.c - the JSON-lines logger: every line is one valid JSON object
 * whatever bytes it is given, levels filter, concurrent lines stay whole.
 *
 * Lines go to a tmpfile() (a real file descriptor, so the write(2) path is
 * the one tested) and are parsed back with jansson.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include "log.h"

/* 2026-11-25T13:14:02.123Z */
#define FIXED_MS 1795612442123LL

static int64_t fixed_now(void *ctx)
{
    (void)ctx;
    return FIXED_MS;
}

static int64_t fixed_mono(void *ctx)
{
    (void)ctx;
    return 0;
}

static const brk_clock FIXED_CLOCK = { fixed_now, fixed_mono, NULL };

typedef struct fixture {
    FILE *out;
    sc_log *log;
} fixture;

static int setup_level(void **state, api_log_level level)
{
    fixture *f = calloc(1, sizeof *f);
    f->out = tmpfile();
    if (!f->out)
        return -1;
    f->log = sc_log_open(level, f->out);
    sc_log_set_clock(f->log, &FIXED_CLOCK);
    *state = f;
    return 0;
}

static int setup(void **state)
{
    return setup_level(state, API_LOG_DEBUG);
}

static int setup_warn(void **state)
{
    return setup_level(state, API_LOG_WARN);
}

static int teardown(void **state)
{
    fixture *f = *state;
    sc_log_close(f->log);
    fclose(f->out);
    free(f);
    return 0;
}

/* Every line written so far, each parsed; *n lines.  Fails the test when a
 * line is not a JSON object.  Free with free_lines. */
static json_t **read_lines(fixture *f, size_t *n, char ***raw)
{
    fflush(f->out);
    rewind(f->out);
    json_t **v = NULL;
    char **r = NULL;
    char *line = NULL;
    size_t cap = 0;
    *n = 0;
    ssize_t len;
    while ((len = getline(&line, &cap, f->out)) > 0) {
        assert_int_equal(line[len - 1], '\n');
        json_error_t e;
        json_t *j = json_loadb(line, (size_t)len - 1, 0, &e);
        if (!j || !json_is_object(j))
            fail_msg("line %zu is not a JSON object (%s): %s", *n, e.text, line);
        v = realloc(v, (*n + 1) * sizeof *v);
        r = realloc(r, (*n + 1) * sizeof *r);
        v[*n] = j;
        r[*n] = strdup(line);
        (*n)++;
    }
    free(line);
    if (raw)
        *raw = r;
    else {
        for (size_t i = 0; i < *n; i++)
            free(r[i]);
        free(r);
    }
    return v;
}

static void free_lines(json_t **v, char **raw, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        json_decref(v[i]);
        if (raw)
            free(raw[i]);
    }
    free(v);
    free(raw);
}

static const char *str_of(json_t *o, const char *key)
{
    json_t *s = json_object_get(o, key);
    if (!json_is_string(s))
        fail_msg("field %s is not a string", key);
    return json_string_value(s);
}

/* ---- format ------------------------------------------------------------------ */

static void line_has_time_level_msg_then_fields_in_order(void **state)
{
    fixture *f = *state;
    sc_log_kv(f->log, API_LOG_INFO, "listening", "listen", "127.0.0.1:8080",
              "port", "8080", NULL);
    size_t n;
    char **raw;
    json_t **v = read_lines(f, &n, &raw);
    assert_int_equal(n, 1);
    assert_string_equal(raw[0], "{\"time\":\"2026-11-25T13:14:02.123Z\","
                        "\"level\":\"info\",\"msg\":\"listening\",\"listen\":"
                        "\"127.0.0.1:8080\",\"port\":\"8080\"}\n");
    free_lines(v, raw, n);
}

static void quotes_and_backslashes_are_escaped(void **state)
{
    fixture *f = *state;
    const char *tricky = "say \"hi\" \\ \\\" done";
    sc_log_kv(f->log, API_LOG_WARN, tricky, "k\"ey", tricky, NULL);
    size_t n;
    char **raw;
    json_t **v = read_lines(f, &n, &raw);
    assert_int_equal(n, 1);
    assert_string_equal(str_of(v[0], "msg"), tricky);
    assert_string_equal(str_of(v[0], "k\"ey"), tricky);
    assert_non_null(strstr(raw[0], "say \\\"hi\\\" \\\\ \\\\\\\" done"));
    free_lines(v, raw, n);
}

static void control_characters_are_escaped_as_u00XX(void **state)
{
    fixture *f = *state;
    const char *ctl = "a\nb\rc\td\x01" "e\x1f" "f\x7f" "g";
    sc_log_kv(f->log, API_LOG_ERROR, ctl, "txid", ctl, NULL);
    size_t n;
    char **raw;
    json_t **v = read_lines(f, &n, &raw);
    assert_int_equal(n, 1);
    assert_string_equal(str_of(v[0], "msg"), ctl);
    assert_string_equal(str_of(v[0], "txid"), ctl);
    assert_non_null(strstr(raw[0], "a\\u000ab\\u000dc\\u0009d\\u0001e\\u001ff"
                                   "\\u007fg"));
    for (const char *p = raw[0]; p[1]; p++)
        assert_true((unsigned char)*p >= 0x20 && *p != 0x7f);
    free_lines(v, raw, n);
}

static void invalid_utf8_is_replaced_and_valid_utf8_kept(void **state)
{
    fixture *f = *state;
    sc_log_kv(f->log, API_LOG_INFO, "bytes",
              "lone", "a\xff" "b",
              "overlong", "\xc0\xaf",
              "surrogate", "\xed\xa0\x80",
              "truncated", "x\xe2\x82",
              "too_high", "\xf4\x90\x80\x80",
              "valid", "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80",
              NULL);
    size_t n;
    json_t **v = read_lines(f, &n, NULL);
    assert_int_equal(n, 1);
    assert_string_equal(str_of(v[0], "lone"), "a\xef\xbf\xbd" "b");
    assert_string_equal(str_of(v[0], "overlong"), "\xef\xbf\xbd\xef\xbf\xbd");
    assert_string_equal(str_of(v[0], "surrogate"),
                        "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
    assert_string_equal(str_of(v[0], "truncated"), "x\xef\xbf\xbd\xef\xbf\xbd");
    assert_string_equal(str_of(v[0], "too_high"),
                        "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
    assert_string_equal(str_of(v[0], "valid"),
                        "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80");
    free_lines(v, NULL, n);
}

static void null_field_value_is_json_null(void **state)
{
    fixture *f = *state;
    api_log_field fields[] = { { "topic", NULL }, { "group", "g" } };
    sc_log_write(f->log, API_LOG_INFO, "x", fields, 2);
    size_t n;
    json_t **v = read_lines(f, &n, NULL);
    assert_int_equal(n, 1);
    assert_true(json_is_null(json_object_get(v[0], "topic")));
    assert_string_equal(str_of(v[0], "group"), "g");
    free_lines(v, NULL, n);
}

static void long_line_is_written_whole(void **state)
{
    fixture *f = *state;
    size_t len = 100000;
    char *big = malloc(len + 1);
    for (size_t i = 0; i < len; i++)
        big[i] = (char)('a' + i % 26);
    big[len] = '\0';
    sc_log_kv(f->log, API_LOG_INFO, "big", "body", big, NULL);
    size_t n;
    json_t **v = read_lines(f, &n, NULL);
    assert_int_equal(n, 1);
    assert_string_equal(str_of(v[0], "body"), big);
    free_lines(v, NULL, n);
    free(big);
}

/* A pipe whose O_NONBLOCK flag someone else set (it is shared with the
 * process that created it): a line longer than the pipe buffer meets
 * EAGAIN midway and must still come out whole once the reader drains. */
typedef struct slow_reader {
    int fd;
    char *buf;
    size_t len;
} slow_reader;

static void *slow_reader_main(void *arg)
{
    slow_reader *r = arg;
    struct timespec pause = { 0, 200 * 1000000 };
    nanosleep(&pause, NULL);              /* let the writer fill the pipe */
    char chunk[4096];
    ssize_t n;
    while ((n = read(r->fd, chunk, sizeof chunk)) != 0) {
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        r->buf = realloc(r->buf, r->len + (size_t)n + 1);
        memcpy(r->buf + r->len, chunk, (size_t)n);
        r->len += (size_t)n;
        r->buf[r->len] = '\0';
    }
    return NULL;
}

static void nonblocking_pipe_still_gets_whole_lines(void **state)
{
    (void)state;
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    assert_int_equal(fcntl(fds[1], F_SETFL, O_NONBLOCK), 0);
    FILE *w = fdopen(fds[1], "w");
    assert_non_null(w);
    sc_log *l = sc_log_open(API_LOG_INFO, w);
    slow_reader r = { fds[0], NULL, 0 };
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, slow_reader_main, &r), 0);
    size_t len = 300000;                  /* several pipe buffers */
    char *big = malloc(len + 1);
    memset(big, 'q', len);
    big[len] = '\0';
    sc_log_kv(l, API_LOG_INFO, "first", "body", big, NULL);
    sc_log_kv(l, API_LOG_INFO, "second", NULL);
    sc_log_close(l);
    fclose(w);                            /* EOF for the reader */
    pthread_join(t, NULL);
    close(fds[0]);
    assert_non_null(r.buf);
    char *nl = strchr(r.buf, '\n');
    assert_non_null(nl);
    json_error_t e;
    json_t *j = json_loadb(r.buf, (size_t)(nl - r.buf), 0, &e);
    if (!j)
        fail_msg("first line not JSON (%s), %zu bytes read in all", e.text,
                 r.len);
    assert_string_equal(str_of(j, "body"), big);
    json_decref(j);
    j = json_loads(nl + 1, JSON_DISABLE_EOF_CHECK, &e);
    assert_non_null(j);
    assert_string_equal(str_of(j, "msg"), "second");
    json_decref(j);
    free(big);
    free(r.buf);
}

/* The daemon ignores SIGPIPE; a reader that went away then costs the
 * line, not the process, and the logger does not block. */
static void dead_pipe_reader_drops_lines_and_does_not_block(void **state)
{
    (void)state;
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    close(fds[0]);
    FILE *w = fdopen(fds[1], "w");
    assert_non_null(w);
    void (*old)(int) = signal(SIGPIPE, SIG_IGN);
    sc_log *l = sc_log_open(API_LOG_INFO, w);
    for (int i = 0; i < 100; i++)
        sc_log_kv(l, API_LOG_INFO, "into the void", NULL);
    sc_log_close(l);
    signal(SIGPIPE, old);
    fclose(w);
}

/* ---- levels -------------------------------------------------------------------- */

static void lines_below_the_level_are_dropped(void **state)
{
    fixture *f = *state;
    sc_log_kv(f->log, API_LOG_DEBUG, "d", NULL);
    sc_log_kv(f->log, API_LOG_INFO, "i", NULL);
    sc_log_kv(f->log, API_LOG_WARN, "w", NULL);
    sc_log_kv(f->log, API_LOG_ERROR, "e", NULL);
    assert_false(sc_log_enabled(f->log, API_LOG_INFO));
    assert_true(sc_log_enabled(f->log, API_LOG_WARN));
    size_t n;
    json_t **v = read_lines(f, &n, NULL);
    assert_int_equal(n, 2);
    assert_string_equal(str_of(v[0], "level"), "warn");
    assert_string_equal(str_of(v[0], "msg"), "w");
    assert_string_equal(str_of(v[1], "level"), "error");
    assert_string_equal(str_of(v[1], "msg"), "e");
    free_lines(v, NULL, n);
}

static void api_logger_writes_through_the_logger(void **state)
{
    fixture *f = *state;
    const api_logger *a = sc_log_api(f->log);
    api_log_field fields[] = { { "route", "/v1/transactions" } };
    a->log(a->ctx, API_LOG_INFO, "dropped below warn", fields, 1);
    a->log(a->ctx, API_LOG_ERROR, "store failed", fields, 1);
    size_t n;
    json_t **v = read_lines(f, &n, NULL);
    assert_int_equal(n, 1);
    assert_string_equal(str_of(v[0], "msg"), "store failed");
    assert_string_equal(str_of(v[0], "route"), "/v1/transactions");
    free_lines(v, NULL, n);
}

/* ---- concurrency ------------------------------------------------------------- */

#define WRITERS 8
#define LINES_EACH 300

typedef struct writer_arg {
    sc_log *log;
    int id;
} writer_arg;

static void *writer(void *p)
{
    writer_arg *w = p;
    char val[6000], id[16], seq[16];
    /* longer than PIPE_BUF, so a short write would show */
    memset(val, 'a' + w->id, sizeof val - 1);
    val[sizeof val - 1] = '\0';
    snprintf(id, sizeof id, "%d", w->id);
    for (int i = 0; i < LINES_EACH; i++) {
        snprintf(seq, sizeof seq, "%d", i);
        sc_log_kv(w->log, API_LOG_INFO, "line", "writer", id, "seq", seq,
                  "fill", val, NULL);
    }
    return NULL;
}

static void concurrent_lines_never_interleave(void **state)
{
    fixture *f = *state;
    pthread_t t[WRITERS];
    writer_arg a[WRITERS];
    for (int i = 0; i < WRITERS; i++) {
        a[i].log = f->log;
        a[i].id = i;
        assert_int_equal(pthread_create(&t[i], NULL, writer, &a[i]), 0);
    }
    for (int i = 0; i < WRITERS; i++)
        pthread_join(t[i], NULL);
    size_t n;
    json_t **v = read_lines(f, &n, NULL);
    assert_int_equal(n, WRITERS * LINES_EACH);
    int next[WRITERS] = { 0 };
    for (size_t i = 0; i < n; i++) {
        int w = atoi(str_of(v[i], "writer"));
        assert_in_range(w, 0, WRITERS - 1);
        assert_int_equal(atoi(str_of(v[i], "seq")), next[w]++);
        const char *fill = str_of(v[i], "fill");
        assert_int_equal(strlen(fill), 5999);
        assert_int_equal(fill[0], 'a' + w);
        assert_int_equal(fill[5998], 'a' + w);
    }
    free_lines(v, NULL, n);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(line_has_time_level_msg_then_fields_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(quotes_and_backslashes_are_escaped, setup, teardown),
        cmocka_unit_test_setup_teardown(control_characters_are_escaped_as_u00XX, setup, teardown),
        cmocka_unit_test_setup_teardown(invalid_utf8_is_replaced_and_valid_utf8_kept, setup, teardown),
        cmocka_unit_test_setup_teardown(null_field_value_is_json_null, setup, teardown),
        cmocka_unit_test_setup_teardown(long_line_is_written_whole, setup, teardown),
        cmocka_unit_test(nonblocking_pipe_still_gets_whole_lines),
        cmocka_unit_test(dead_pipe_reader_drops_lines_and_does_not_block),
        cmocka_unit_test_setup_teardown(lines_below_the_level_are_dropped, setup_warn, teardown),
        cmocka_unit_test_setup_teardown(api_logger_writes_through_the_logger, setup_warn, teardown),
        cmocka_unit_test_setup_teardown(concurrent_lines_never_interleave, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
