/*
 * demo_util.h - the check-and-report machinery shared by the example
 * programs (storage_demo, txn_demo, group_demo): checked claims printed as
 * "[ok]" / "[FAILED]" lines with a running count, section headings, the
 * verdict line, and small time and byte-view helpers.  demo_util.c is linked
 * into every example program (see examples/CMakeLists.txt).
 */
#ifndef DEMO_UTIL_H
#define DEMO_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker/record.h"
#include "broker/status.h"
#include "broker/store.h"

/* Print one checked claim: "    [ok] ..." when `ok`, else
 * "    [FAILED] ...", and count it.  Returns ok. */
bool demo_check(bool ok, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* demo_check(st == BRK_OK, what); a failure adds the status name and the
 * store's error text (s non-NULL) or brk_strerror(st) (s NULL). */
bool demo_check_st(brk_status st, brk_store *s, const char *what);

/* Prints "\n== title ==". */
void demo_heading(const char *title);

/* Prints the "== Verdict ==" section: "PASS: all <n> checks held<pass_tail>"
 * when at least one check ran and none failed, else the FAIL line.
 * Returns the exit status (0 on PASS, 1 on FAIL). */
int demo_verdict(const char *pass_tail);

/* CLOCK_MONOTONIC in milliseconds. */
int64_t demo_mono_ms(void);

/* Sleeps ms milliseconds (resumes after signals). */
void demo_sleep_ms(int64_t ms);

/* True when b holds exactly the bytes of the C string s. */
bool demo_bytes_eq(brk_bytes b, const char *s);

/* Copy a byte view into a NUL-terminated string (truncating to cap - 1). */
void demo_to_cstr(brk_bytes b, char *out, size_t cap);

#endif
