#!/usr/bin/env bash
# pgtmp.sh - a throwaway PostgreSQL server for tests, benchmarks and demos.
#
#   pgtmp.sh start DIR    create DIR/data on first use (initdb), start the
#                         server on 127.0.0.1 and a free port (the same port
#                         again on a restart), wait until it answers, and
#                         print the port on stdout
#   pgtmp.sh stop DIR     fast shutdown of the server started in DIR, by the
#                         PID in its postmaster.pid; waits until it is gone
#   pgtmp.sh kill DIR     SIGKILL the postmaster (a crash; its children exit
#                         when they notice), wait until it is gone
#   pgtmp.sh url DIR      print the superuser URL
#                         (postgresql://postgres@127.0.0.1:PORT/postgres)
#
# The server runs as the calling user, or as `nobody` when called as root
# (PostgreSQL refuses to run as root).  Authentication: trust on 127.0.0.1,
# except for members of the role `password_required`, who must give their
# SCRAM password (tests of a wrong password use such a role).
#
# Environment: PGTMP_FSYNC (off by default: tests do not crash the machine;
# benchmarks set on), PGTMP_MAX_CONNECTIONS (default 200).
#
# Only the server started in DIR is ever stopped, by its PID.
set -euo pipefail

PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
die() { echo "pgtmp: $*" >&2; exit 1; }
[[ -x "$PGBIN/postgres" ]] || die "PostgreSQL server binaries not found (run \`make deps\`)"

cmd=${1:-}
dir=${2:-}
[[ -n "$cmd" && -n "$dir" ]] || die "usage: pgtmp.sh start|stop|kill|url DIR"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
# The server's tools may run as nobody, who cannot enter a caller's private
# working directory (make bench runs from one).
cd /

as_owner() {
    if [[ "$(id -u)" -eq 0 ]]; then
        runuser -u nobody -g nogroup -- "$@"
    else
        "$@"
    fi
}

pm_pid() {
    [[ -f "$dir/data/postmaster.pid" ]] || return 1
    head -n 1 "$dir/data/postmaster.pid"
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_gone() {
    local pid=$1 i
    for ((i = 0; i < 600; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    die "server PID $pid did not stop within 60 s"
}

start() {
    if [[ "$(id -u)" -eq 0 ]]; then
        chown nobody:nogroup "$dir"
        chmod 0700 "$dir"
        runuser -u nobody -g nogroup -- test -x "$dir" ||
            die "$dir is not reachable for user nobody (a parent folder is private); use a folder under /tmp"
    fi
    if [[ ! -f "$dir/data/PG_VERSION" ]]; then
        as_owner "$PGBIN/initdb" -D "$dir/data" -U postgres -E UTF8 --locale=C.UTF-8 \
            --auth-local=trust --auth-host=trust -N >"$dir/initdb.log" 2>&1 ||
            die "initdb failed: $(tail -n 3 "$dir/initdb.log")"
        # Members of password_required must authenticate; everyone else is
        # trusted (loopback only).
        as_owner sh -c "cat > '$dir/data/pg_hba.conf'" <<'EOF'
local all all                              trust
host  all +password_required 127.0.0.1/32  scram-sha-256
host  all all                127.0.0.1/32  trust
EOF
    fi
    if pid=$(pm_pid) && kill -0 "$pid" 2>/dev/null; then
        die "a server is already running in $dir (PID $pid)"
    fi
    local port tries=0
    while :; do
        if [[ -f "$dir/port" ]]; then
            port=$(cat "$dir/port")
        else
            port=$((20000 + RANDOM % 30000))
            port_busy "$port" && continue
        fi
        mkdir -p "$dir/sock"
        [[ "$(id -u)" -ne 0 ]] || chown nobody:nogroup "$dir/sock"
        if as_owner "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-p $port -k $dir/sock -c listen_addresses=127.0.0.1 \
                -c fsync=${PGTMP_FSYNC:-off} -c max_connections=${PGTMP_MAX_CONNECTIONS:-200} \
                -c shared_buffers=64MB" start >"$dir/pg_ctl.log" 2>&1; then
            echo "$port" >"$dir/port"
            break
        fi
        tries=$((tries + 1))
        # A fixed port (a restart) that is taken: wait for it to free up.
        if ((tries >= 20)); then
            die "server did not start: $(tail -n 5 "$dir/server.log" 2>/dev/null)"
        fi
        [[ -f "$dir/port" ]] && sleep 0.5
    done
    # First start: the role whose members must give a password.
    as_owner "$PGBIN/psql" -h "$dir/sock" -p "$port" -U postgres -d postgres -qAtX \
        -c "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'password_required')
            THEN CREATE ROLE password_required NOLOGIN; END IF; END \$\$;" >/dev/null ||
        die "cannot connect to the new server"
    echo "$port"
}

case "$cmd" in
start) start ;;
stop | kill)
    pid=$(pm_pid) || exit 0
    kill -0 "$pid" 2>/dev/null || exit 0
    if [[ "$cmd" == stop ]]; then kill -INT "$pid"; else kill -KILL "$pid"; fi
    wait_gone "$pid"
    if [[ "$cmd" == kill ]]; then
        # The children notice the postmaster is gone and exit; the next start
        # recovers from the crash.  Leave the stale postmaster.pid to pg_ctl.
        sleep 0.2
    fi
    ;;
url)
    [[ -f "$dir/port" ]] || die "no server was started in $dir"
    echo "postgresql://postgres@127.0.0.1:$(cat "$dir/port")/postgres"
    ;;
*) die "unknown command '$cmd' (start, stop, kill, url)" ;;
esac
