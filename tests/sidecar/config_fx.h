/*
 * config_fx.h - the fixture and helpers of the configuration tests
 * (test_config.c: layers, types, conflicts, output; test_config_db.c: the
 * PostgreSQL options and secrets).  Everything runs in-process through
 * sc_config_load with argv and envp built by the test (never the real
 * environment); config files go to a scratch directory.
 *
 * tests/CMakeLists.txt builds each test file alone, so this header holds
 * definitions: static, and not all of them used by each file.
 */
#ifndef SIDECAR_TEST_CONFIG_FX_H
#define SIDECAR_TEST_CONFIG_FX_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>

#include "config.h"
#include "tmpdir.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"

typedef struct fixture {
    char dir[512];
    sc_config cfg;
    char err[1024];
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    if (!f || brk_tmpdir_new("sc_config", f->dir, sizeof f->dir) != 0)
        return -1;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    brk_tmpdir_remove(f->dir);
    free(f);
    return 0;
}

/* Write `text` to <dir>/<name>; returns the path (static buffer per call
 * site is enough: tests use one file at a time). */
static const char *write_file(fixture *f, const char *name, const char *text)
{
    static char path[600];
    snprintf(path, sizeof path, "%s/%s", f->dir, name);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs(text, fp);
    fclose(fp);
    return path;
}

/* argv: NULL-terminated list after the program name; env likewise. */
static int load(fixture *f, const char *const *args, const char *const *env)
{
    char *argv[32];
    char *envp[32];
    int argc = 0;
    argv[argc++] = (char *)"outboxd";
    for (; args && *args; args++)
        argv[argc++] = (char *)*args;
    argv[argc] = NULL;
    size_t n = 0;
    for (; env && *env; env++)
        envp[n++] = (char *)*env;
    envp[n] = NULL;
    return sc_config_load(&f->cfg, argc, argv, envp, f->err, sizeof f->err);
}

#define ARGS(...) ((const char *const[]){ __VA_ARGS__, NULL })
#define NONE NULL

static void assert_prefix(const char *s, const char *prefix)
{
    if (strncmp(s, prefix, strlen(prefix)) != 0)
        fail_msg("\"%s\" does not start with \"%s\"", s, prefix);
}

static void assert_contains(const char *s, const char *part)
{
    if (!strstr(s, part))
        fail_msg("\"%s\" does not contain \"%s\"", s, part);
}

/* One invalid value: exit 78 and a one-line message with this prefix. */
static void expect_78(fixture *f, const char *const *args,
                      const char *const *env, const char *prefix,
                      const char *part)
{
    assert_int_equal(load(f, args, env), EX_CONFIG);
    assert_prefix(f->err, prefix);
    if (part)
        assert_contains(f->err, part);
    assert_null(strchr(f->err, '\n'));
}

static char *print_config(const sc_config *c)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&buf, &len);
    assert_non_null(m);
    sc_config_print(c, m);
    fclose(m);
    return buf;
}

/* The printed configuration holds `line` and nowhere `secret`. */
static void assert_printed_without(const sc_config *c, const char *line,
                                   const char *secret)
{
    char *out = print_config(c);
    bool has_secret = strstr(out, secret) != NULL;
    bool has_line = strstr(out, line) != NULL;
    free(out);
    assert_false(has_secret);
    assert_true(has_line);
}

/* What --help prints (sc_config_usage); the caller frees it. */
static char *usage_text(void)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&buf, &len);
    assert_non_null(m);
    sc_config_usage(m);
    fclose(m);
    return buf;
}

#pragma GCC diagnostic pop

#endif /* SIDECAR_TEST_CONFIG_FX_H */
