#!/usr/bin/env bash
# pgtap.sh - install sql/migrations into a throwaway PostgreSQL and run the
# pgTAP tests of sql/tests/ against it.  Registered as the CTest "sql.pgtap"
# (label "pg"), so `make test` runs it; it also runs alone:
#
#     bash tests/sql/pgtap.sh
#
# What it does, in order:
#   1. starts its own server (scripts/pgtmp.sh, in a fresh folder under /tmp;
#      as root the server runs as `nobody`, psql connects over 127.0.0.1);
#   2. database outbox_test, owned by pgtap_dba, a LOGIN CREATEROLE role that
#      is not a superuser: the migrations are applied by it, in file order,
#      with `psql -v ON_ERROR_STOP=1 -f`, exactly as sql/README.md tells a
#      DBA, which proves they need no more than that;
#   3. as the superuser: the pgtap and dblink extensions, and the login roles
#      the tests use (pgtap_sidecar in outbox_sidecar, pgtap_app in
#      outbox_app, pgtap_nobody in neither);
#   4. every sql/tests/*.sql, in name order, with `psql -X -At -v
#      ON_ERROR_STOP=1`; a file passes when psql exits 0, it printed its plan
#      (1..N), exactly N `ok` lines and no `not ok`;
#   5. every migration file run a second time: psql must fail and the schema
#      (pg_dump of schema outbox, with grants and comments), schema_version
#      and the roles must be unchanged;
#   6. a second database in the same cluster, migrated by the superuser while
#      the roles already exist (they are cluster-wide): the migrations must
#      apply again, and every test file runs there too.
#
# One summary line per file and per check; the output of a failing file in
# full.  Exit 0 when everything passed, 1 otherwise.  The server is always
# stopped and the folder removed (trap), whatever happened.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
pgtmp="$root/scripts/pgtmp.sh"
# shellcheck disable=SC2012  # (the same lookup as scripts/pgtmp.sh)
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}

die() { echo "pgtap: $*" >&2; exit 1; }
[[ -x "$PGBIN/psql" && -x "$PGBIN/pg_dump" ]] ||
    die "PostgreSQL client binaries not found in '$PGBIN' (run \`make deps\`)"

# libpq reads these; a developer's settings must not redirect or change our
# connections (nor those dblink makes from inside the server, which inherits
# this environment).
unset PGHOST PGHOSTADDR PGPORT PGDATABASE PGUSER PGPASSWORD PGPASSFILE PGSERVICE \
      PGSERVICEFILE PGOPTIONS PGSSLMODE PGREQUIRESSL PGGSSENCMODE PGTARGETSESSIONATTRS \
      PGAPPNAME PGCLIENTENCODING PGTZ PGDATESTYLE
export PGCONNECT_TIMEOUT=10

shopt -s nullglob
migrations=("$root"/sql/migrations/[0-9]*.sql)
tests=("$root"/sql/tests/*.sql)
((${#migrations[@]})) || die "no migrations in $root/sql/migrations"
((${#tests[@]})) || die "no tests in $root/sql/tests"

dir=$(mktemp -d /tmp/outboxd-pgtap.XXXXXX)
cleanup() {
    local rc=$?
    trap '' INT TERM      # a second signal must not cut the clean-up short
    "$pgtmp" stop "$dir" >/dev/null 2>&1 || "$pgtmp" kill "$dir" >/dev/null 2>&1 || true
    rm -rf "$dir"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port=$("$pgtmp" start "$dir") || die "could not start PostgreSQL (see the message above)"
# A runaway statement (a lock wait that should have timed out) fails the run
# instead of hanging until CTest's timeout.  Set after the server started, so
# the server's own environment (and dblink's connections) stay clean.
export PGOPTIONS="-c statement_timeout=120s"

# psql USER DB ARGS...: quiet, unaligned, stop at the first error.
psql_as() {
    local user=$1 db=$2
    shift 2
    "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U "$user" -d "$db" "$@"
}

failures=0
assertions=0
say() { printf '%-4s %s\n' "$1" "$2"; }
fail() {
    say "FAIL" "$1"
    failures=$((failures + 1))
    if [[ -n "${2:-}" ]]; then
        printf '%s\n' "$2" | sed 's/^/    | /'
    fi
}

names=()
for f in "${migrations[@]}"; do
    n=$(basename "$f" .sql)
    names+=("$n")
done
migration_list=$(IFS=,; echo "${names[*]}")

# migrate USER DB: every file in order; 0, or 1 after printing the failure.
migrate() {
    local user=$1 db=$2 f out
    for f in "${migrations[@]}"; do
        if ! out=$(psql_as "$user" "$db" -f "$f" 2>&1); then
            fail "$db: $(basename "$f") does not apply as $user" "$out"
            return 1
        fi
    done
    say "ok" "$db: ${#migrations[@]} migrations applied as $user (${migration_list})"
}

# prepare DB: extensions and the login roles the tests use.
prepare() {
    local db=$1 out
    if ! out=$(psql_as postgres "$db" 2>&1 <<'EOF'
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pgtap') THEN
        RAISE EXCEPTION 'the pgtap extension is not installed (Debian package postgresql-15-pgtap; run `make deps`)';
    END IF;
END
$$;
CREATE EXTENSION pgtap;
CREATE EXTENSION dblink;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgtap_sidecar') THEN
        CREATE ROLE pgtap_sidecar LOGIN IN ROLE outbox_sidecar;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgtap_app') THEN
        CREATE ROLE pgtap_app LOGIN IN ROLE outbox_app;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgtap_nobody') THEN
        CREATE ROLE pgtap_nobody LOGIN;
    END IF;
END
$$;
EOF
    ); then
        fail "$db: cannot prepare the test database" "$out"
        return 1
    fi
}

# run_tests DB: every sql/tests file; one line each.
run_tests() {
    local db=$1 t name out rc plan oks notoks
    for t in "${tests[@]}"; do
        name=$(basename "$t")
        if out=$(psql_as postgres "$db" -v migrations="$migration_list" -f "$t" 2>&1); then
            rc=0
        else
            rc=$?
        fi
        plan=$(sed -n 's/^1\.\.\([0-9][0-9]*\)$/\1/p' <<<"$out" | head -n 1)
        oks=$(grep -c '^ok ' <<<"$out" || true)
        notoks=$(grep -c '^not ok' <<<"$out" || true)
        if ((rc != 0)); then
            fail "$db: $name: psql exited $rc after $oks ok (plan ${plan:-none})" "$out"
        elif [[ -z "$plan" ]]; then
            fail "$db: $name: no plan printed" "$out"
        elif ((notoks > 0)); then
            fail "$db: $name: $notoks of $plan not ok" "$out"
        elif ((oks != plan)); then
            fail "$db: $name: planned $plan, $oks ok" "$out"
        else
            say "ok" "$db: $name: $oks/$plan"
            assertions=$((assertions + oks))
        fi
    done
}

# fingerprint DB: everything a migration could have changed.
fingerprint() {
    local db=$1
    # (Recent pg_dump wraps its output in \restrict KEY ... \unrestrict KEY
    # with a random key: not part of the schema.)
    "$PGBIN/pg_dump" -h 127.0.0.1 -p "$port" -U postgres -d "$db" --schema-only -n outbox |
        grep -Ev '^\\(un)?restrict '
    psql_as postgres "$db" -c "SELECT version, name, applied_at FROM outbox.schema_version ORDER BY version" \
        -c "SELECT rolname, rolcanlogin, shobj_description(oid, 'pg_authid')
              FROM pg_roles WHERE rolname IN ('outbox_sidecar', 'outbox_app') ORDER BY 1"
}

# rerun_refused USER DB: each file a second time fails and changes nothing.
rerun_refused() {
    local user=$1 db=$2 f out before after rc
    before=$(fingerprint "$db") || { fail "$db: cannot read the schema"; return 1; }
    for f in "${migrations[@]}"; do
        if out=$(psql_as "$user" "$db" -f "$f" 2>&1); then
            fail "$db: $(basename "$f") ran a second time without an error" "$out"
            continue
        else
            rc=$?
        fi
        after=$(fingerprint "$db") || { fail "$db: cannot read the schema"; return 1; }
        if [[ "$after" != "$before" ]]; then
            fail "$db: a failed second run of $(basename "$f") changed the database" \
                "$(diff <(printf '%s\n' "$before") <(printf '%s\n' "$after") || true)"
        else
            say "ok" "$db: second run of $(basename "$f") refused (psql exit $rc: $(grep -m 1 -o 'ERROR: .*' <<<"$out")), nothing changed"
        fi
    done
}

# ---------------------------------------------------------------- run
echo "pgtap: PostgreSQL on 127.0.0.1:$port ($dir)"

if psql_as postgres postgres -c "CREATE ROLE pgtap_dba LOGIN CREATEROLE" \
        -c "CREATE DATABASE outbox_test OWNER pgtap_dba" >/dev/null; then
    if migrate pgtap_dba outbox_test && prepare outbox_test; then
        run_tests outbox_test
        rerun_refused pgtap_dba outbox_test
    fi
else
    fail "cannot create the test database"
fi

if psql_as postgres postgres -c "CREATE DATABASE outbox_test2" >/dev/null; then
    if migrate postgres outbox_test2 && prepare outbox_test2; then
        run_tests outbox_test2
    fi
else
    fail "cannot create the second test database"
fi

if ((failures)); then
    echo "pgtap: FAILED: $failures failure(s); $assertions assertions passed in the files that passed"
    exit 1
fi
echo "pgtap: all passed: $assertions assertions in $((${#tests[@]} * 2)) file runs, migrations refuse a second run"
