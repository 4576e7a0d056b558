/*
 * pg_harness.c - throwaway PostgreSQL for tests (see pg_harness.h).
 */
#define _GNU_SOURCE
#include "pg_harness.h"

#include <errno.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tmpdir.h"

struct pgh {
    char src[1024];
    char dir[512];
    uint16_t port;
};

/* Run a shell command, capturing the first line of stdout.  Returns the
 * exit status, or -1. */
static int run_capture(const char *cmd, char *line, size_t cap)
{
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    if (line && cap) {
        line[0] = '\0';
        if (fgets(line, (int)cap, p)) line[strcspn(line, "\n")] = '\0';
    }
    char sink[256];
    while (fgets(sink, sizeof sink, p)) {}
    int st = pclose(p);
    return (st != -1 && WIFEXITED(st)) ? WEXITSTATUS(st) : -1;
}

static int script(pgh *h, const char *verb, char *line, size_t cap)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "'%s/scripts/pgtmp.sh' %s '%s'", h->src, verb,
             h->dir);
    return run_capture(cmd, line, cap);
}

void pgh_clear_libpq_env(void)
{
    static const char *const vars[] = { "PGHOST", "PGHOSTADDR", "PGPORT",
        "PGDATABASE", "PGUSER", "PGPASSWORD", "PGPASSFILE", "PGSERVICE",
        "PGSSLMODE", "PGOPTIONS", "PGCONNECT_TIMEOUT", "PGAPPNAME" };
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) unsetenv(vars[i]);
}

pgh *pgh_start(const char *source_dir)
{
    pgh *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    snprintf(h->src, sizeof h->src, "%s", source_dir);
    /* Under /tmp, not $TMPDIR: when the server runs as `nobody` every
     * parent folder must be searchable by it, and a caller's TMPDIR (make
     * bench makes a private one) may not be. */
    snprintf(h->dir, sizeof h->dir, "/tmp/pgh-XXXXXX");
    if (!mkdtemp(h->dir)) {
        fprintf(stderr, "pg_harness: mkdtemp: %s\n", strerror(errno));
        free(h);
        return NULL;
    }
    char line[64];
    if (script(h, "start", line, sizeof line) != 0 || atoi(line) <= 0) {
        fprintf(stderr, "pg_harness: could not start PostgreSQL in %s\n", h->dir);
        pgh_destroy(h);
        return NULL;
    }
    h->port = (uint16_t)atoi(line);
    return h;
}

void pgh_destroy(pgh *h)
{
    if (!h) return;
    (void)script(h, "stop", NULL, 0);
    (void)brk_tmpdir_remove(h->dir);
    free(h);
}

int pgh_stop(pgh *h) { return script(h, "stop", NULL, 0) == 0 ? 0 : -1; }
int pgh_kill(pgh *h) { return script(h, "kill", NULL, 0) == 0 ? 0 : -1; }

int pgh_restart(pgh *h)
{
    char line[64];
    if (script(h, "start", line, sizeof line) != 0) return -1;
    return atoi(line) == h->port ? 0 : -1;
}

uint16_t pgh_port(const pgh *h) { return h->port; }

void pgh_url(const pgh *h, const char *db, const char *user,
             const char *password, char *out, size_t cap)
{
    snprintf(out, cap, "postgresql://%s%s%s@127.0.0.1:%u/%s",
             user ? user : "postgres", password ? ":" : "",
             password ? password : "", (unsigned)h->port, db);
}

/* psql as the superuser; the SQL goes through a temporary file, so any
 * quoting in it is safe. */
static int psql_file(pgh *h, const char *db, const char *file, char *out,
                     size_t cap)
{
    char cmd[3072];
    snprintf(cmd, sizeof cmd,
             "psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p %u -U postgres"
             " -d '%s' -f '%s'", (unsigned)h->port, db, file);
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    size_t used = 0;
    if (out && cap) out[0] = '\0';
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) {
        if (out && cap && used + 1 < cap) {
            size_t take = n < cap - 1 - used ? n : cap - 1 - used;
            memcpy(out + used, buf, take);
            used += take;
            out[used] = '\0';
        }
    }
    int st = pclose(p);
    if (out && used && out[used - 1] == '\n') out[used - 1] = '\0';
    return (st != -1 && WIFEXITED(st)) ? WEXITSTATUS(st) : -1;
}

int pgh_sql(pgh *h, const char *db, const char *sql, char *out, size_t cap)
{
    char path[600];
    snprintf(path, sizeof path, "%s/q-XXXXXX", h->dir);
    int fd = mkstemp(path);
    if (fd < 0) return -1;
    size_t len = strlen(sql);
    ssize_t w = write(fd, sql, len);
    close(fd);
    int rc = (w == (ssize_t)len) ? psql_file(h, db,
                                             path, out, cap)
                                 : -1;
    unlink(path);
    return rc;
}

long long pgh_sql_int(pgh *h, const char *db, const char *sql)
{
    char out[256];
    if (pgh_sql(h, db, sql, out, sizeof out) != 0 || !out[0]) return -1;
    char *end;
    long long v = strtoll(out, &end, 10);
    return (end != out && (*end == '\0' || *end == '\n')) ? v : -1;
}

int pgh_create_db(pgh *h, const char *db, bool migrate)
{
    char sql[512];
    snprintf(sql, sizeof sql,
             "SET client_min_messages = warning;\nDROP DATABASE IF EXISTS \"%s\" WITH (FORCE);\nCREATE DATABASE \"%s\";\n",
             db, db);
    if (pgh_sql(h, "postgres", sql, NULL, 0) != 0) return -1;
    if (!migrate) return 0;
    char pattern[1100];
    snprintf(pattern, sizeof pattern, "%s/sql/migrations/[0-9]*.sql", h->src);
    glob_t g;
    if (glob(pattern, 0, NULL, &g) != 0) {
        fprintf(stderr, "pg_harness: no migrations in %s\n", pattern);
        return -1;
    }
    int rc = 0;
    for (size_t i = 0; i < g.gl_pathc && rc == 0; i++) {  /* glob sorts */
        if (psql_file(h, db, g.gl_pathv[i], NULL, 0) != 0) {
            fprintf(stderr, "pg_harness: %s failed\n", g.gl_pathv[i]);
            rc = -1;
        }
    }
    globfree(&g);
    return rc;
}
