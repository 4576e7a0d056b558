/*
 * prom_page.h - a /metrics page checked as Prometheus' text format reads
 * it, for the tests that scrape one: test_handler_metrics.c (http_api's
 * page, in process) and test_daemon_relay.c (the daemon's, with the
 * database families).  One definition of a valid page for both.
 *
 * tests/CMakeLists.txt builds each test file alone, so this header holds
 * definitions: static.
 */
#ifndef SIDECAR_TEST_PROM_PAGE_H
#define SIDECAR_TEST_PROM_PAGE_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The page as Prometheus' text format 0.0.4 reads it: every family has one
 * "# HELP" and one "# TYPE", before its samples, and its samples follow
 * it without another family in between (a histogram's _bucket, _sum and
 * _count belong to it); every line ends with '\n'.  Fails naming the line.
 * The families' names are appended to names[] (cap entries). */
static size_t check_page(const char *page, char (*names)[96], size_t cap)
{
    size_t n = 0;
    char current[96] = "";
    assert_true(*page);
    if (page[strlen(page) - 1] != '\n')
        fail_msg("the page does not end with a newline:\n%s", page);
    for (const char *line = page; *line;) {
        const char *eol = strchr(line, '\n');
        size_t len = (size_t)(eol - line);
        char l[512];
        snprintf(l, sizeof l, "%.*s", (int)(len < sizeof l ? len : sizeof l - 1),
                 line);
        line = eol + 1;
        if (len == 0)
            fail_msg("an empty line in the page:\n%s", page);
        char name[96];
        if (strncmp(l, "# HELP ", 7) == 0 || strncmp(l, "# TYPE ", 7) == 0) {
            bool help = l[2] == 'H';
            snprintf(name, sizeof name, "%.*s", (int)strcspn(l + 7, " "), l + 7);
            size_t i = 0;
            while (i < n && strcmp(names[i], name) != 0)
                i++;
            if (help) {
                if (i < n)
                    fail_msg("family %s appears twice: %s", name, l);
                assert_true(n < cap);
                snprintf(names[n++], sizeof names[0], "%s", name);
                snprintf(current, sizeof current, "%s", name);
            } else if (i == n || strcmp(current, name) != 0) {
                fail_msg("# TYPE without its # HELP just before: %s", l);
            } else if (!strstr(l + 7 + strlen(name), " counter") &&
                       !strstr(l + 7 + strlen(name), " gauge") &&
                       !strstr(l + 7 + strlen(name), " histogram")) {
                fail_msg("unknown type: %s", l);
            }
            continue;
        }
        if (l[0] == '#')
            fail_msg("unexpected comment: %s", l);
        snprintf(name, sizeof name, "%.*s", (int)strcspn(l, "{ "), l);
        size_t cl = strlen(current);
        bool mine = strcmp(name, current) == 0 ||
                    (strncmp(name, current, cl) == 0 &&
                     (strcmp(name + cl, "_bucket") == 0 ||
                      strcmp(name + cl, "_sum") == 0 ||
                      strcmp(name + cl, "_count") == 0));
        if (!cl || !mine)
            fail_msg("sample outside its family (after %s): %s", current, l);
        const char *v = strrchr(l, ' ');
        char *end;
        if (!v || (strtod(v + 1, &end), *end != '\0'))
            fail_msg("sample without a value: %s", l);
    }
    return n;
}

/* How many of the n names in names[] are `name`. */
static size_t count_name(char (*names)[96], size_t n, const char *name)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += strcmp(names[i], name) == 0;
    return k;
}

#endif /* SIDECAR_TEST_PROM_PAGE_H */
