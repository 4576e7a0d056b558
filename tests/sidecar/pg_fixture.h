/*
 * pg_fixture.h - the cmocka group fixture of a sidecar test program that
 * runs against a real PostgreSQL (tests/support/pg_harness.h): one
 * throwaway server, g_pg, for the whole program, started by pg_group_setup
 * with libpq's environment cleared (only what a test sets may steer a
 * connection) and stopped by pg_group_teardown.  Every test makes its own
 * database with pgh_create_db.
 *
 * tests/CMakeLists.txt builds each test file alone, so this header holds
 * definitions: static, and marked unused so that a file that needs only
 * some of them compiles without warnings.
 */
#ifndef SIDECAR_TEST_PG_FIXTURE_H
#define SIDECAR_TEST_PG_FIXTURE_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>

#include "pg_harness.h"

static pgh *g_pg;

__attribute__((unused)) static int pg_group_setup(void **state)
{
    (void)state;
    pgh_clear_libpq_env();
    g_pg = pgh_start(OUTBOXD_SOURCE_DIR);
    return g_pg ? 0 : -1;
}

__attribute__((unused)) static int pg_group_teardown(void **state)
{
    (void)state;
    pgh_destroy(g_pg);
    g_pg = NULL;
    return 0;
}

/* Run `text` in `db` as the superuser (psql); the test fails if it does. */
__attribute__((unused)) static void sql(const char *db, const char *text)
{
    if (pgh_sql(g_pg, db, text, NULL, 0) != 0)
        fail_msg("SQL failed in %s: %s", db, text);
}

/* Drop role `role` if it exists and create it again with LOGIN and
 * `attrs` (e.g. "PASSWORD 'x' IN ROLE password_required"), without the
 * notice a missing role gives.  Roles are cluster-wide: a test that makes
 * one must not depend on what an earlier run left. */
__attribute__((unused)) static void recreate_role(const char *role,
                                                  const char *attrs)
{
    char q[512];
    snprintf(q, sizeof q, "SET client_min_messages = warning;"
             " DROP ROLE IF EXISTS %s; CREATE ROLE %s LOGIN %s", role, role,
             attrs);
    sql("postgres", q);
}

#endif /* SIDECAR_TEST_PG_FIXTURE_H */
