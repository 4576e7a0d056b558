/*
 * test_migrate.c - `outboxd db migrate` / `db status` against a real
 * PostgreSQL (tests/support/pg_harness), and the build step that compiles
 * sql/migrations into the binary (sidecar/embed_sql.cmake).
 *
 * One server for the whole program (group setup); every test makes its own
 * database, so they do not see each other's schema.  Roles are cluster-wide
 * and 0002_roles creates them only when missing, so databases share them.
 *
 * The concurrent-migrate test makes the race certain rather than likely:
 * the test itself holds the migration lock until both runs are seen waiting
 * for it in pg_locks, then lets them go.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <glob.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "migrate.h"
#include "pg.h"
#include "pg_fixture.h"
#include "tmpdir.h"

/* ---------------------------------------------------------------- helpers */

/* A fresh, empty database `db` and options that reach it as `user` (NULL:
 * the superuser) with `password` (NULL: none).  url must outlive o. */
static void db_opts(const char *db, const char *user, const char *password,
                    char *url, size_t cap, sc_pg_opts *o)
{
    pgh_url(g_pg, db, user, password, url, cap);
    sc_pg_opts_init(o);
    o->conninfo = url;
    o->connect_timeout_ms = 5000;
    o->statement_timeout_ms = 1000;   /* migrate must not be bound by it */
}

static void fresh_db(const char *db, char *url, size_t cap, sc_pg_opts *o)
{
    assert_int_equal(pgh_create_db(g_pg, db, false), 0);
    db_opts(db, NULL, NULL, url, cap, o);
}

typedef enum { MIGRATE, STATUS } command;

/* Run a command; its output into *out (caller frees). */
static int run(command cmd, const sc_pg_opts *o, char **out, char *err, size_t errlen)
{
    size_t len = 0;
    *out = NULL;
    FILE *f = open_memstream(out, &len);
    assert_non_null(f);
    int code = cmd == MIGRATE ? sc_db_migrate(o, f, err, errlen)
                              : sc_db_status(o, f, err, errlen);
    assert_int_equal(fclose(f), 0);
    return code;
}

/* Run a command whose output the test does not look at; its code. */
static int run_code(command cmd, const sc_pg_opts *o, char *err, size_t errlen)
{
    char *out;
    int code = run(cmd, o, &out, err, errlen);
    free(out);
    return code;
}

/* Run a command that must fail with `code` and print nothing. */
static void run_fails(command cmd, const sc_pg_opts *o, int code, char *err,
                      size_t errlen)
{
    char *out;
    assert_int_equal(run(cmd, o, &out, err, errlen), code);
    assert_string_equal(out, "");
    free(out);
}

/* A connection of the test's own (libpq, no sc_pg options). */
static PGconn *connect_ok(const char *url)
{
    PGconn *c = PQconnectdb(url);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    return c;
}

/* sc_db_schema_version on c, which must succeed. */
static int schema_version_on(PGconn *c)
{
    char err[1024];
    int v = -1;
    assert_int_equal(sc_db_schema_version(c, &v, err, sizeof err), 0);
    return v;
}

static long long sql_int(const char *db, const char *sql)
{
    return pgh_sql_int(g_pg, db, sql);
}

/* Read independently of migrate.c, through psql.  Two statements: a query
 * naming a missing table fails to parse whatever a CASE around it says. */
static long long db_version(const char *db)
{
    if (sql_int(db, "SELECT (to_regclass('outbox.schema_version') IS NULL)::int") == 1)
        return 0;
    return sql_int(db, "SELECT coalesce(max(version), 0) FROM outbox.schema_version");
}

static long long version_rows(const char *db)
{
    return sql_int(db, "SELECT count(*) FROM outbox.schema_version");
}

/* The migration lock's rows in pg_locks, in the current database (held:
 * AND granted; waited for: AND NOT granted). */
#define MIGRATION_LOCK_ROWS                                                   \
    "pg_locks WHERE locktype = 'advisory'"                                    \
    " AND database = (SELECT oid FROM pg_database"                            \
    "                  WHERE datname = current_database())"                   \
    " AND classid = 1869707363 AND objid = 0 AND objsubid = 2"

/* The migration lock held by some session in the current database. */
static long long lock_holders(const char *db)
{
    return sql_int(db, "SELECT count(*) FROM " MIGRATION_LOCK_ROWS " AND granted");
}

/* How many of the outbox schema's four tables exist. */
static long long outbox_tables(const char *db)
{
    return sql_int(db,
        "SELECT count(*) FROM (VALUES ('outbox.transactions'), ('outbox.messages'),"
        " ('outbox.inbox'), ('outbox.schema_version')) t(n)"
        " WHERE to_regclass(n) IS NOT NULL");
}

/* "applied X\n" for every compiled-in migration from index `from` on,
 * then the final line. */
static void expected_applied(size_t from, char *out, size_t cap)
{
    size_t n;
    const sc_migration *all = sc_migrations(&n);
    out[0] = '\0';
    size_t used = 0;
    for (size_t i = from; i < n; i++)
        used += (size_t)snprintf(out + used, cap - used, "applied %s\n", all[i].name);
    snprintf(out + used, cap - used, "database schema is at version %d\n",
             sc_migrations_latest());
}

/* What `db status` prints for a database at `version` whose migrations
 * from index `from` on are pending. */
static void expected_status(int version, size_t from, char *out, size_t cap)
{
    size_t n;
    const sc_migration *all = sc_migrations(&n);
    size_t used = (size_t)snprintf(out, cap, "database schema version: %d\n"
                                   "outboxd knows: %d\n", version,
                                   sc_migrations_latest());
    for (size_t i = from; i < n; i++)
        used += (size_t)snprintf(out + used, cap - used, "pending: %s\n", all[i].name);
}

/* Replace the file at `path` with `text`. */
static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static char *read_whole(const char *path)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    char *buf = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&buf, &len);
    assert_non_null(m);
    char chunk[4096];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0)
        assert_int_equal(fwrite(chunk, 1, got, m), got);
    fclose(f);
    assert_int_equal(fclose(m), 0);
    return buf;
}

/* Apply the first compiled-in migration the way a DBA would: psql. */
static void psql_first_migration(const char *db)
{
    size_t n;
    const sc_migration *all = sc_migrations(&n);
    assert_true(n >= 1);
    assert_int_equal(pgh_sql(g_pg, db, all[0].sql, NULL, 0), 0);
}

/* ---------------------------------------------------------------- embedding */

static void compiled_in_migrations_match_the_files_on_disk(void **state)
{
    (void)state;
    glob_t g;
    assert_int_equal(glob(OUTBOXD_SOURCE_DIR "/sql/migrations/*.sql", 0, NULL, &g), 0);
    size_t n;
    const sc_migration *all = sc_migrations(&n);
    assert_int_equal(n, g.gl_pathc);
    assert_true(n >= 2);
    for (size_t i = 0; i < n; i++) {
        const char *base = strrchr(g.gl_pathv[i], '/') + 1;
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)(strlen(base) - 4), base);
        assert_string_equal(all[i].name, name);
        assert_int_equal(all[i].version, (int)i + 1);
        assert_int_equal(all[i].version, atoi(base));
        char *text = read_whole(g.gl_pathv[i]);
        assert_string_equal(all[i].sql, text);
        free(text);
    }
    assert_int_equal(sc_migrations_latest(), (int)n);
    globfree(&g);
}

/* Run `cmd` (a shell command line); its exit status, output into out. */
static int shell(const char *cmd, char *out, size_t cap)
{
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t used = 0;
    out[0] = '\0';
    char line[512];
    while (fgets(line, sizeof line, p)) {
        size_t l = strlen(line);
        if (used + l < cap) { memcpy(out + used, line, l + 1); used += l; }
    }
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* Run embed_sql.cmake on a folder holding `files` (name, text pairs, NULL
 * ended); its exit status, its output (stdout+stderr) into out. */
static int embed(const char *dir, const char *const *files, char *out, size_t cap)
{
    char sqldir[600], gen[600], cmd[2048];
    snprintf(sqldir, sizeof sqldir, "%s/sql", dir);
    snprintf(gen, sizeof gen, "%s/gen.c", dir);
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir '%s'", sqldir, sqldir);
    assert_int_equal(system(cmd), 0);
    for (size_t i = 0; files[i]; i += 2) {
        char path[800];
        snprintf(path, sizeof path, "%s/%s", sqldir, files[i]);
        FILE *f = fopen(path, "wb");
        assert_non_null(f);
        /* "\\0" in a text stands for a NUL byte. */
        for (const char *p = files[i + 1]; *p; p++) {
            if (p[0] == '\\' && p[1] == '0') { fputc(0, f); p++; }
            else fputc(*p, f);
        }
        fclose(f);
    }
    snprintf(cmd, sizeof cmd,
             "cmake -DSQL_DIR='%s' -DOUT='%s' -P '%s/sidecar/embed_sql.cmake' 2>&1",
             sqldir, gen, OUTBOXD_SOURCE_DIR);
    int rc = shell(cmd, out, cap);
    /* CMake wraps its messages; compare with single spaces. */
    char *w = out;
    for (const char *r = out; *r; r++) {
        if (*r == ' ' || *r == '\n') {
            if (w > out && w[-1] != ' ') *w++ = ' ';
        } else {
            *w++ = *r;
        }
    }
    *w = '\0';
    return rc;
}

/* A scratch folder per test, removed even when the test fails. */
static int dir_setup(void **state)
{
    char *dir = malloc(512);
    if (!dir || brk_tmpdir_new("mig", dir, 512) != 0) {
        free(dir);
        return -1;
    }
    *state = dir;
    return 0;
}

static int dir_teardown(void **state)
{
    brk_tmpdir_remove(*state);
    free(*state);
    return 0;
}

static void embed_script_rejects_misnamed_and_misnumbered_files(void **state)
{
    const char *dir = *state;
    char out[8192];
    static const struct { const char *files[7]; const char *says; } cases[] = {
        { { "01_short.sql", "SELECT 1;", NULL }, "must be named NNNN_name.sql" },
        { { "0001_Upper.sql", "SELECT 1;", NULL }, "must be named NNNN_name.sql" },
        { { "0001-dash.sql", "SELECT 1;", NULL }, "must be named NNNN_name.sql" },
        { { "0002_first.sql", "SELECT 1;", NULL }, "leaves a gap" },
        { { "0001_a.sql", "SELECT 1;", "0003_c.sql", "SELECT 3;", NULL }, "leaves a gap" },
        { { "0001_a.sql", "SELECT 1;", "0001_b.sql", "SELECT 1;", NULL }, "repeats" },
        { { "0000_zero.sql", "SELECT 0;", NULL }, "repeats or goes back" },
        { { "0001_nul.sql", "SELECT 1;\\0", NULL }, "contains a NUL byte" },
        { { NULL }, "no migrations" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int rc = embed(dir, cases[i].files, out, sizeof out);
        if (rc == 0 || !strstr(out, cases[i].says))
            fail_msg("case %zu: exit %d, expected \"%s\" in:\n%s", i, rc, cases[i].says, out);
    }

    /* Awkward but valid text is accepted; its bytes are checked end to end
     * by compiled_in_migrations_match_the_files_on_disk. */
    static const char *const good[] = {
        "0001_one.sql", "SELECT '*/ \"\\\\ ?\?= é';\n",
        "0002_two_2.sql", "SELECT 2;",
        NULL };
    assert_int_equal(embed(dir, good, out, sizeof out), 0);
    char gen[600];
    snprintf(gen, sizeof gen, "%s/gen.c", dir);
    char *text = read_whole(gen);
    assert_non_null(strstr(text, "{ 1, \"0001_one\", "));
    assert_non_null(strstr(text, "{ 2, \"0002_two_2\", "));
    assert_non_null(strstr(text, "sc_migrations_embedded_count = 2;"));
    free(text);
}

/* The build rule (sidecar_embed_migrations, as sidecar/CMakeLists.txt uses
 * it) in a scratch project, built with make: the generated file follows
 * the folder when a file is renamed or removed (no remaining input is
 * newer than the output then, so without the inputs list make would keep
 * the stale file), when one is edited, and after a clean. */
static void build_rule_regenerates_after_rename_remove_edit_and_clean(
    void **state)
{
    const char *dir = *state;
    char cmd[4096], out[16384], path[700], gen[700];
    snprintf(path, sizeof path, "%s/proj/CMakeLists.txt", dir);
    snprintf(cmd, sizeof cmd, "mkdir -p '%s/proj' '%s/sql'", dir, dir);
    assert_int_equal(system(cmd), 0);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "cmake_minimum_required(VERSION 3.25)\n"
               "project(embed_rule NONE)\n"
               "include(\"%s/sidecar/embed_sql.cmake\")\n"
               "sidecar_embed_migrations(\"%s/sql\" "
               "\"${CMAKE_CURRENT_BINARY_DIR}/gen.c\")\n"
               "add_custom_target(gen ALL DEPENDS "
               "\"${CMAKE_CURRENT_BINARY_DIR}/gen.c\")\n",
            OUTBOXD_SOURCE_DIR, dir);
    fclose(f);
    snprintf(gen, sizeof gen, "%s/build/gen.c", dir);
    /* two migrations, dated in the past, like files checked out earlier */
    snprintf(cmd, sizeof cmd, "cd '%s/sql' && echo 'SELECT 1;' > 0001_a.sql && "
             "echo 'SELECT 2;' > 0002_b.sql && touch -d '2020-01-01' *.sql && "
             "cmake -S '%s/proj' -B '%s/build' -G 'Unix Makefiles' 2>&1",
             dir, dir, dir);
    if (shell(cmd, out, sizeof out) != 0)
        fail_msg("configure failed:\n%s", out);
    char build[1024];
    snprintf(build, sizeof build, "cmake --build '%s/build' 2>&1", dir);
    if (shell(build, out, sizeof out) != 0)
        fail_msg("build failed:\n%s", out);
    char *text = read_whole(gen);
    assert_non_null(strstr(text, "{ 2, \"0002_b\", "));
    free(text);

    /* renamed (mv keeps its old time) */
    snprintf(cmd, sizeof cmd, "mv '%s/sql/0002_b.sql' '%s/sql/0002_c.sql' && %s",
             dir, dir, build);
    if (shell(cmd, out, sizeof out) != 0)
        fail_msg("build after rename failed:\n%s", out);
    text = read_whole(gen);
    if (!strstr(text, "{ 2, \"0002_c\", ") || strstr(text, "0002_b"))
        fail_msg("stale after a rename:\n%s", text);
    free(text);

    /* removed */
    snprintf(cmd, sizeof cmd, "rm '%s/sql/0002_c.sql' && %s", dir, build);
    if (shell(cmd, out, sizeof out) != 0)
        fail_msg("build after remove failed:\n%s", out);
    text = read_whole(gen);
    if (!strstr(text, "sc_migrations_embedded_count = 1;"))
        fail_msg("stale after a removal:\n%s", text);
    free(text);

    /* edited, and a new file */
    snprintf(cmd, sizeof cmd, "sleep 1 && echo 'SELECT 11;' > '%s/sql/0001_a.sql'"
             " && echo 'SELECT 2;' > '%s/sql/0002_d.sql' && %s", dir, dir, build);
    if (shell(cmd, out, sizeof out) != 0)
        fail_msg("build after edit failed:\n%s", out);
    text = read_whole(gen);
    if (!strstr(text, "0x31,0x31") || !strstr(text, "{ 2, \"0002_d\", "))
        fail_msg("stale after an edit and an addition:\n%s", text);
    free(text);

    /* clean removes it; the next build writes it again */
    snprintf(cmd, sizeof cmd, "cmake --build '%s/build' --target clean 2>&1", dir);
    assert_int_equal(shell(cmd, out, sizeof out), 0);
    assert_int_equal(access(gen, F_OK), -1);
    if (shell(build, out, sizeof out) != 0)
        fail_msg("build after clean failed:\n%s", out);
    assert_int_equal(access(gen, F_OK), 0);
}

/* ---------------------------------------------------------------- migrate */

static void fresh_database_gets_every_migration(void **state)
{
    (void)state;
    char url[512], err[1024], want[1024], *out;
    sc_pg_opts o;
    fresh_db("mig_fresh", url, sizeof url, &o);

    assert_int_equal(run(MIGRATE, &o, &out, err, sizeof err), 0);
    expected_applied(0, want, sizeof want);
    assert_string_equal(out, want);
    assert_string_equal(err, "");
    free(out);

    assert_int_equal(db_version("mig_fresh"), sc_migrations_latest());
    assert_int_equal(version_rows("mig_fresh"), sc_migrations_latest());
    assert_int_equal(outbox_tables("mig_fresh"), 4);
    assert_int_equal(sql_int("mig_fresh",
        "SELECT count(*) FROM pg_roles WHERE rolname IN ('outbox_sidecar', 'outbox_app')"), 2);
    /* The schema works, not just exists. */
    assert_int_equal(sql_int("mig_fresh",
        "INSERT INTO outbox.transactions (txid, state) VALUES ('o-1', 'commit');"
        "SELECT (outbox.check_transaction('o-1') = 'commit')::int"), 1);
    /* The lock is not left behind. */
    assert_int_equal(lock_holders("mig_fresh"), 0);

    /* sc_db_schema_version agrees, on a connection of our own. */
    PGconn *c = connect_ok(url);
    assert_int_equal(schema_version_on(c), sc_migrations_latest());
    PQfinish(c);
}

static void schema_version_is_zero_without_the_version_table(void **state)
{
    (void)state;
    char url[512];
    sc_pg_opts o;
    fresh_db("mig_zero", url, sizeof url, &o);
    PGconn *c = connect_ok(url);
    assert_int_equal(schema_version_on(c), 0);
    /* Schema outbox without its version table is still version 0. */
    assert_int_equal(pgh_sql(g_pg, "mig_zero", "CREATE SCHEMA outbox", NULL, 0), 0);
    assert_int_equal(schema_version_on(c), 0);
    PQfinish(c);
}

static void second_run_applies_nothing(void **state)
{
    (void)state;
    char url[512], err[1024], want[128], *out;
    sc_pg_opts o;
    fresh_db("mig_twice", url, sizeof url, &o);
    assert_int_equal(run_code(MIGRATE, &o, err, sizeof err), 0);
    char before[256], after[256];
    assert_int_equal(pgh_sql(g_pg, "mig_twice",
        "SELECT string_agg(version || '@' || applied_at, ',' ORDER BY version)"
        " FROM outbox.schema_version", before, sizeof before), 0);

    assert_int_equal(run(MIGRATE, &o, &out, err, sizeof err), 0);
    snprintf(want, sizeof want, "database schema is up to date (version %d)\n",
             sc_migrations_latest());
    assert_string_equal(out, want);
    assert_string_equal(err, "");
    free(out);
    assert_int_equal(pgh_sql(g_pg, "mig_twice",
        "SELECT string_agg(version || '@' || applied_at, ',' ORDER BY version)"
        " FROM outbox.schema_version", after, sizeof after), 0);
    assert_string_equal(before, after);
}

static void database_migrated_by_psql_gets_only_the_rest(void **state)
{
    (void)state;
    char url[512], err[1024], want[1024], *out;
    sc_pg_opts o;
    fresh_db("mig_psql", url, sizeof url, &o);
    psql_first_migration("mig_psql");
    assert_int_equal(db_version("mig_psql"), 1);

    assert_int_equal(run(MIGRATE, &o, &out, err, sizeof err), 0);
    expected_applied(1, want, sizeof want);
    assert_string_equal(out, want);
    free(out);
    assert_int_equal(db_version("mig_psql"), sc_migrations_latest());
    assert_int_equal(version_rows("mig_psql"), sc_migrations_latest());
}

typedef struct mig_run {
    const sc_pg_opts *o;
    int code;
    char *out;
    char err[1024];
} mig_run;

static void *migrate_thread(void *arg)
{
    mig_run *r = arg;
    size_t len = 0;
    FILE *f = open_memstream(&r->out, &len);
    if (!f) { r->code = -1; return NULL; }
    r->code = sc_db_migrate(r->o, f, r->err, sizeof r->err);
    fclose(f);
    return NULL;
}

static PGresult *exec_lock(PGconn *c, const char *fn)
{
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT %s($1::int4, 0)", fn);
    char key[16];
    snprintf(key, sizeof key, "%d", (int)SC_MIGRATE_LOCK_CLASS);
    const char *params[1] = { key };
    return PQexecParams(c, sql, 1, NULL, params, NULL, NULL, 0);
}

/* Poll pg_locks until `n` sessions wait for the migration lock in the
 * holder's database (generous deadline: a loaded machine); the count seen. */
static long long wait_for_waiters(PGconn *holder, long long n)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    long long waiting = 0;
    for (;;) {
        PGresult *res = PQexec(holder,
            "SELECT count(*) FROM " MIGRATION_LOCK_ROWS " AND NOT granted");
        assert_int_equal(PQresultStatus(res), PGRES_TUPLES_OK);
        waiting = atoll(PQgetvalue(res, 0, 0));
        PQclear(res);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (waiting == n || now.tv_sec - start.tv_sec > 60) return waiting;
        nanosleep(&(struct timespec){ .tv_nsec = 20 * 1000 * 1000 }, NULL);
    }
}

/* A session of the test's own that holds the migration lock. */
static PGconn *hold_migration_lock(const char *url)
{
    PGconn *holder = connect_ok(url);
    PGresult *res = exec_lock(holder, "pg_advisory_lock");
    assert_int_equal(PQresultStatus(res), PGRES_TUPLES_OK);
    PQclear(res);
    return holder;
}

static int count_lines(const char *s, const char *prefix)
{
    int n = 0;
    for (const char *p = s; p && *p; ) {
        if (strncmp(p, prefix, strlen(prefix)) == 0) n++;
        const char *nl = strchr(p, '\n');
        p = nl ? nl + 1 : NULL;
    }
    return n;
}

static void concurrent_migrates_apply_each_file_once(void **state)
{
    (void)state;
    char url[512];
    sc_pg_opts o;
    fresh_db("mig_race", url, sizeof url, &o);

    /* Hold the lock so both runs queue up behind it. */
    PGconn *holder = hold_migration_lock(url);

    mig_run runs[2] = { { .o = &o, .code = -1 }, { .o = &o, .code = -1 } };
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&th[i], NULL, migrate_thread, &runs[i]), 0);

    assert_int_equal(wait_for_waiters(holder, 2), 2);
    /* Nothing ran while they waited. */
    assert_int_equal(db_version("mig_race"), 0);

    PGresult *res = exec_lock(holder, "pg_advisory_unlock");
    assert_int_equal(PQresultStatus(res), PGRES_TUPLES_OK);
    PQclear(res);
    PQfinish(holder);
    for (int i = 0; i < 2; i++) assert_int_equal(pthread_join(th[i], NULL), 0);

    char up_to_date[128];
    snprintf(up_to_date, sizeof up_to_date, "database schema is up to date (version %d)\n",
             sc_migrations_latest());
    int applied = 0, idle = 0;
    for (int i = 0; i < 2; i++) {
        if (runs[i].code != 0) fail_msg("run %d: %d %s", i, runs[i].code, runs[i].err);
        applied += count_lines(runs[i].out, "applied ");
        if (strcmp(runs[i].out, up_to_date) == 0) idle++;
        free(runs[i].out);
    }
    assert_int_equal(applied, sc_migrations_latest());
    assert_int_equal(idle, 1);    /* the second found nothing to do */
    assert_int_equal(version_rows("mig_race"), sc_migrations_latest());
    assert_int_equal(lock_holders("mig_race"), 0);
}

static void connection_lost_while_waiting_for_the_lock_is_unavailable(void **state)
{
    (void)state;
    char url[512];
    sc_pg_opts o;
    fresh_db("mig_lost", url, sizeof url, &o);
    PGconn *holder = hold_migration_lock(url);

    mig_run r = { .o = &o, .code = -1 };
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, migrate_thread, &r), 0);
    assert_int_equal(wait_for_waiters(holder, 1), 1);
    /* The server ends the waiting session (as at a shutdown or failover). */
    PGresult *res = PQexec(holder,
        "SELECT pg_terminate_backend(pid) FROM " MIGRATION_LOCK_ROWS " AND NOT granted");
    assert_int_equal(PQresultStatus(res), PGRES_TUPLES_OK);
    PQclear(res);
    assert_int_equal(pthread_join(th, NULL), 0);
    PQfinish(holder);

    assert_int_equal(r.code, EX_UNAVAILABLE);
    assert_non_null(strstr(r.err, "cannot take the migration lock"));
    assert_string_equal(r.out, "");
    free(r.out);
    assert_int_equal(db_version("mig_lost"), 0);
}

static void newer_database_is_refused_and_left_alone(void **state)
{
    (void)state;
    char url[512], err[1024], want[256], *out;
    sc_pg_opts o;
    fresh_db("mig_newer", url, sizeof url, &o);
    assert_int_equal(run_code(MIGRATE, &o, err, sizeof err), 0);
    assert_int_equal(pgh_sql(g_pg, "mig_newer",
        "INSERT INTO outbox.schema_version (version, name) VALUES (99, '0099_future')",
        NULL, 0), 0);
    char before[512], after[512];
    const char *snapshot =
        "SELECT (SELECT string_agg(version || '@' || applied_at, ',' ORDER BY version)"
        "        FROM outbox.schema_version)"
        " || '/' || (SELECT count(*) FROM pg_class c JOIN pg_namespace n"
        "            ON n.oid = c.relnamespace WHERE n.nspname = 'outbox')";
    assert_int_equal(pgh_sql(g_pg, "mig_newer", snapshot, before, sizeof before), 0);

    snprintf(want, sizeof want,
             "database schema version 99 is newer than this outboxd knows (%d); upgrade outboxd",
             sc_migrations_latest());
    run_fails(MIGRATE, &o, EX_DATAERR, err, sizeof err);
    assert_string_equal(err, want);
    assert_int_equal(pgh_sql(g_pg, "mig_newer", snapshot, after, sizeof after), 0);
    assert_string_equal(before, after);
    assert_int_equal(lock_holders("mig_newer"), 0);

    /* status says the same, after showing both versions. */
    assert_int_equal(run(STATUS, &o, &out, err, sizeof err), EX_DATAERR);
    assert_string_equal(err, want);
    char lines[128];
    snprintf(lines, sizeof lines, "database schema version: 99\noutboxd knows: %d\n",
             sc_migrations_latest());
    assert_string_equal(out, lines);
    free(out);
}

static void failing_first_migration_changes_nothing(void **state)
{
    (void)state;
    char url[512], err[1024];
    sc_pg_opts o;
    fresh_db("mig_fail1", url, sizeof url, &o);
    /* Someone made schema outbox by hand: 0001's CREATE SCHEMA fails. */
    assert_int_equal(pgh_sql(g_pg, "mig_fail1",
        "CREATE SCHEMA outbox; CREATE TABLE outbox.keep_me (x int);"
        " INSERT INTO outbox.keep_me VALUES (7)", NULL, 0), 0);

    run_fails(MIGRATE, &o, EX_DATAERR, err, sizeof err);
    if (strncmp(err, "migration 0001_outbox failed", 28) != 0
        || !strstr(err, "schema \"outbox\" already exists") || strchr(err, '\n'))
        fail_msg("unexpected message: %s", err);

    /* Atomic: nothing of the file is left, the hand-made table is intact,
     * and no transaction or lock is left open. */
    assert_int_equal(outbox_tables("mig_fail1"), 0);
    assert_int_equal(sql_int("mig_fail1", "SELECT x FROM outbox.keep_me"), 7);
    assert_int_equal(lock_holders("mig_fail1"), 0);
    assert_int_equal(sql_int("mig_fail1",
        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'mig_fail1'"
        " AND state LIKE 'idle in transaction%'"), 0);
}

static void failing_later_migration_keeps_the_earlier_ones(void **state)
{
    (void)state;
    char url[512], err[1024];
    sc_pg_opts o;
    fresh_db("mig_fail2", url, sizeof url, &o);
    psql_first_migration("mig_fail2");
    /* The roles exist (cluster-wide), so the grants are what 0002 would
     * add; drop a function it grants on, so it fails near its end. */
    assert_int_equal(pgh_sql(g_pg, "mig_fail2",
        "DO $$ BEGIN"
        " IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_sidecar')"
        " THEN CREATE ROLE outbox_sidecar NOLOGIN; END IF;"
        " IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_app')"
        " THEN CREATE ROLE outbox_app NOLOGIN; END IF; END $$;"
        "DROP FUNCTION outbox.inbox_cleanup(interval)", NULL, 0), 0);

    run_fails(MIGRATE, &o, EX_DATAERR, err, sizeof err);
    if (strncmp(err, "migration 0002_roles failed", 27) != 0
        || !strstr(err, "outbox.inbox_cleanup(interval) does not exist"))
        fail_msg("unexpected message: %s", err);

    assert_int_equal(db_version("mig_fail2"), 1);
    /* 0002's earlier grant was rolled back with the rest of it. */
    assert_int_equal(sql_int("mig_fail2",
        "SELECT has_schema_privilege('outbox_sidecar', 'outbox', 'USAGE')::int"), 0);
    assert_int_equal(lock_holders("mig_fail2"), 0);
}

static void migration_that_does_not_record_itself_is_an_error(void **state)
{
    (void)state;
    char url[512], err[1024], want[512];
    sc_pg_opts o;
    fresh_db("mig_norec", url, sizeof url, &o);
    psql_first_migration("mig_norec");
    /* Swallow every new version row. */
    assert_int_equal(pgh_sql(g_pg, "mig_norec",
        "CREATE FUNCTION public.swallow() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN RETURN NULL; END $$;"
        "CREATE TRIGGER swallow BEFORE INSERT ON outbox.schema_version"
        " FOR EACH ROW EXECUTE FUNCTION public.swallow()", NULL, 0), 0);

    run_fails(MIGRATE, &o, EX_DATAERR, err, sizeof err);
    size_t n;
    const sc_migration *all = sc_migrations(&n);
    snprintf(want, sizeof want,
             "migration %s ran but the database schema version is 1, not 2: "
             "the file did not record itself in outbox.schema_version", all[1].name);
    assert_string_equal(err, want);
    assert_int_equal(db_version("mig_norec"), 1);
}

static void migrate_ignores_the_configured_statement_timeout(void **state)
{
    (void)state;
    char url[512], err[1024];
    sc_pg_opts o;
    fresh_db("mig_slow", url, sizeof url, &o);
    o.statement_timeout_ms = 1;   /* far shorter than any migration */
    assert_int_equal(run_code(MIGRATE, &o, err, sizeof err), 0);
    assert_int_equal(db_version("mig_slow"), sc_migrations_latest());
}

/* ---------------------------------------------------------------- status */

static void status_lists_what_is_pending(void **state)
{
    (void)state;
    char url[512], err[1024], want[1024], *out;
    sc_pg_opts o;
    int latest = sc_migrations_latest();
    fresh_db("mig_status", url, sizeof url, &o);

    /* fresh */
    assert_int_equal(run(STATUS, &o, &out, err, sizeof err), 0);
    expected_status(0, 0, want, sizeof want);
    assert_string_equal(out, want);
    free(out);
    /* status changes nothing */
    assert_int_equal(db_version("mig_status"), 0);
    assert_int_equal(sql_int("mig_status",
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'outbox'"), 0);

    /* partial */
    psql_first_migration("mig_status");
    assert_int_equal(run(STATUS, &o, &out, err, sizeof err), 0);
    expected_status(1, 1, want, sizeof want);
    assert_string_equal(out, want);
    free(out);

    /* current */
    assert_int_equal(run_code(MIGRATE, &o, err, sizeof err), 0);
    assert_int_equal(run(STATUS, &o, &out, err, sizeof err), 0);
    snprintf(want, sizeof want,
             "database schema version: %d\noutboxd knows: %d\npending: none\n", latest, latest);
    assert_string_equal(out, want);
    free(out);
}

/* ---------------------------------------------------------------- connecting */

static void no_database_configured_is_a_config_error(void **state)
{
    (void)state;
    char err[1024];
    assert_int_equal(run_code(MIGRATE, NULL, err, sizeof err), EX_CONFIG);
    assert_non_null(strstr(err, "no database is configured"));
    assert_int_equal(run_code(STATUS, NULL, err, sizeof err), EX_CONFIG);
}

static void wrong_password_is_a_config_error_that_hides_the_password(void **state)
{
    const char *dir = *state;
    char url[512], err[1024];
    sc_pg_opts o;
    assert_int_equal(pgh_create_db(g_pg, "mig_auth", false), 0);
    recreate_role("mig_pw", "PASSWORD 'Right-Pw-4711' IN ROLE password_required");

    /* In the URL */
    db_opts("mig_auth", "mig_pw", "Wr0ng-S3cret-8086", url, sizeof url, &o);
    run_fails(MIGRATE, &o, EX_CONFIG, err, sizeof err);
    assert_non_null(strstr(err, "password authentication failed"));
    assert_null(strstr(err, "Wr0ng-S3cret-8086"));
    assert_int_equal(run_code(STATUS, &o, err, sizeof err), EX_CONFIG);
    assert_null(strstr(err, "Wr0ng-S3cret-8086"));

    /* In a password file: wrong, then right. */
    char pwfile[600];
    snprintf(pwfile, sizeof pwfile, "%s/pw", dir);
    write_text(pwfile, "Wr0ng-S3cret-8086\n");
    db_opts("mig_auth", "mig_pw", NULL, url, sizeof url, &o);
    o.password_file = pwfile;
    assert_int_equal(run_code(MIGRATE, &o, err, sizeof err), EX_CONFIG);
    assert_null(strstr(err, "Wr0ng-S3cret-8086"));

    write_text(pwfile, "Right-Pw-4711\n");
    assert_int_equal(run_code(STATUS, &o, err, sizeof err), 0);
}

static void stopped_server_is_unavailable(void **state)
{
    (void)state;
    char url[512], err[1024];
    sc_pg_opts o;
    fresh_db("mig_down", url, sizeof url, &o);
    assert_int_equal(pgh_stop(g_pg), 0);

    int migrate_code = run_code(MIGRATE, &o, err, sizeof err);
    char migrate_err[1024];
    snprintf(migrate_err, sizeof migrate_err, "%s", err);
    int status_code = run_code(STATUS, &o, err, sizeof err);
    /* Bring it back before asserting, so a failure here does not take
     * the tests after it down too. */
    assert_int_equal(pgh_restart(g_pg), 0);

    assert_int_equal(migrate_code, EX_UNAVAILABLE);
    assert_int_equal(status_code, EX_UNAVAILABLE);
    assert_non_null(strstr(migrate_err, "cannot connect to PostgreSQL at 127.0.0.1:"));

    /* And once it is back, migrate works. */
    assert_int_equal(run_code(MIGRATE, &o, err, sizeof err), 0);
    assert_int_equal(db_version("mig_down"), sc_migrations_latest());
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(compiled_in_migrations_match_the_files_on_disk),
        cmocka_unit_test_setup_teardown(embed_script_rejects_misnamed_and_misnumbered_files,
                                        dir_setup, dir_teardown),
        cmocka_unit_test(fresh_database_gets_every_migration),
        cmocka_unit_test_setup_teardown(
            build_rule_regenerates_after_rename_remove_edit_and_clean,
            dir_setup, dir_teardown),
        cmocka_unit_test(schema_version_is_zero_without_the_version_table),
        cmocka_unit_test(second_run_applies_nothing),
        cmocka_unit_test(database_migrated_by_psql_gets_only_the_rest),
        cmocka_unit_test(concurrent_migrates_apply_each_file_once),
        cmocka_unit_test(connection_lost_while_waiting_for_the_lock_is_unavailable),
        cmocka_unit_test(newer_database_is_refused_and_left_alone),
        cmocka_unit_test(failing_first_migration_changes_nothing),
        cmocka_unit_test(failing_later_migration_keeps_the_earlier_ones),
        cmocka_unit_test(migration_that_does_not_record_itself_is_an_error),
        cmocka_unit_test(migrate_ignores_the_configured_statement_timeout),
        cmocka_unit_test(status_lists_what_is_pending),
        cmocka_unit_test(no_database_configured_is_a_config_error),
        cmocka_unit_test_setup_teardown(wrong_password_is_a_config_error_that_hides_the_password,
                                        dir_setup, dir_teardown),
        cmocka_unit_test(stopped_server_is_unavailable),
    };
    return cmocka_run_group_tests(tests, pg_group_setup, pg_group_teardown);
}
