# shellcheck shell=bash
# examples/lib.sh - what the daemon walk-throughs (http_demo.sh,
# order_demo.sh) share: printing and checking HTTP exchanges with curl and
# jq, polling with a deadline, and starting and stopping the outboxd they
# run.  Sourced by them, not run on its own.
#
# The demo sets, before it calls any of these:
#   DEMO  its name, for messages            TMP  its temporary folder
#   BIN   the outboxd binary                LOG  where outboxd's stderr goes
# start_outboxd sets PID and BASE (http://127.0.0.1:PORT); call sets
# STATUS and BODY.

PID="" BASE="" STATUS="" BODY=""

step() { echo; echo "=== $*"; }
ok() { echo "   ok: $*"; }

# fail MESSAGE: say what did not hold, with the end of outboxd's log, and
# exit 1.
fail() {
    echo "$DEMO: FAILED: $*" >&2
    [[ -f "${LOG:-}" ]] && { echo "--- outboxd log (last 20 lines)" >&2; tail -n 20 "$LOG" >&2; }
    exit 1
}

# until_ok SECONDS COMMAND...: run COMMAND (quietly) until it succeeds; 1
# when SECONDS pass first.
until_ok() {
    local secs=$1
    shift
    local end=$((${EPOCHREALTIME//[!0-9]/} + secs * 1000000))   # microseconds
    until "$@" >/dev/null 2>&1; do
        ((${EPOCHREALTIME//[!0-9]/} < end)) || return 1
        sleep 0.1
    done
}

# call METHOD PATH [JSON] [extra curl args...]: print the exchange, set
# STATUS and BODY.
call() {
    local method=$1 path=$2 data=${3:-}
    shift $(( $# >= 3 ? 3 : $# ))
    local args=(-sS -X "$method" -o "$TMP/body" -w '%{http_code}' "$@")
    echo
    if [[ -n "$data" ]]; then
        echo "> $method $path $data"
        STATUS=$(curl "${args[@]}" -H 'Content-Type: application/json' --data-binary "$data" "$BASE$path")
    else
        echo "> $method $path"
        STATUS=$(curl "${args[@]}" "$BASE$path")
    fi
    BODY=$(cat "$TMP/body")
    if jq -e . >/dev/null 2>&1 <<<"$BODY"; then
        echo "< $STATUS $(jq -c . <<<"$BODY")"
    else
        echo "< $STATUS (${#BODY} bytes of text)"
    fi
}

# expect STATUS [JQ-CONDITION...]: the last call answered STATUS, and each
# condition holds for its body.
expect() {
    local want=$1
    shift
    [[ "$STATUS" == "$want" ]] || fail "expected HTTP $want, got $STATUS"
    for cond in "$@"; do
        jq -e "$cond" >/dev/null <<<"$BODY" || fail "expected $cond in $BODY"
        ok "$cond"
    done
}

# start_outboxd ARGS...: run "$BIN" ARGS... in the background (stderr into
# $LOG) and wait until it listens: its "listening" log line carries the
# bound address.
outboxd_listening_or_gone() { grep -q '"listening"' "$LOG" || ! kill -0 "$PID"; }
start_outboxd() {
    "$BIN" "$@" 2>"$LOG" &
    PID=$!
    until_ok 20 outboxd_listening_or_gone || fail "outboxd did not start listening within 20 s"
    kill -0 "$PID" 2>/dev/null || { PID=""; fail "outboxd exited at start-up"; }
    local addr
    addr=$(grep '"listening"' "$LOG" | grep -oE '127\.0\.0\.1:[0-9]+' | head -n1)
    BASE="http://$addr"
}

# stop_outboxd: SIGTERM; it must exit 0 within 30 s.
outboxd_gone() { ! kill -0 "$PID"; }
stop_outboxd() {
    kill -TERM "$PID"
    until_ok 30 outboxd_gone || fail "outboxd still runs 30 s after SIGTERM"
    local rc=0
    wait "$PID" || rc=$?
    PID=""
    [[ $rc -eq 0 ]] || fail "outboxd exited $rc"
    echo "outboxd exited 0; last log lines:"
    tail -n 3 "$LOG"
}

# kill_outboxd: for the demo's EXIT trap: the outboxd it started, if it
# still runs, gets SIGTERM, then SIGKILL after 30 s (a cleanup never
# hangs), and is reaped.
kill_outboxd() {
    if [[ -n "$PID" ]] && kill -0 "$PID" 2>/dev/null; then
        kill -TERM "$PID" 2>/dev/null || true
        for _ in $(seq 1 300); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
}
