#!/usr/bin/env bash
# order_demo.sh [OUTBOXD_BINARY] - the order-service walk-through: outboxd
# with PostgreSQL, driven by examples/order_service.py.
#
# Starts a throwaway PostgreSQL (scripts/pgtmp.sh, in a temporary folder
# under /tmp, as an unprivileged user, on 127.0.0.1), installs the outbox
# schema with `outboxd db migrate`, creates the service's login roles and
# tables, starts outboxd (check-backs answered by PostgreSQL, relay on),
# then walks through, printing each step and checking what it claims:
#
#   1. an order placed and committed
#   2. the service crashes after its DB commit, before POSTing commit:
#      the check-back finds the row and commits
#   3. the DB transaction fails: rolled back (and without the rollback POST,
#      the check-backs find no row and roll back after the last check)
#   4. payment pending -> paid in time -> committed by the next check-back
#   5. payment never made -> rolled back + expiry event on orders.expired,
#      which the service consumes to cancel the order
#   6. a consumer that receives a duplicate processes it once (inbox)
#   7. relay mode: a row written only in SQL is published and received
#   8. SIGTERM: outboxd exits 0
#
# Check-back intervals are short here (1 s) so the whole walk-through takes
# about 20 seconds; the real-life payment policy is 60 s / 60 s / 10
# checks.  The binary defaults to ${BUILD:-build}/sidecar/outboxd.  Exits
# non-zero at the first claim that does not hold; every wait polls with a
# deadline.  The temporary folder, outboxd and PostgreSQL (both by PID) are
# cleaned up on any exit, also Ctrl-C.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEMO=order_demo
# call, expect, step, ok, fail, until_ok, start_outboxd, stop_outboxd,
# kill_outboxd: examples/lib.sh, shared with http_demo.sh
# shellcheck source=examples/lib.sh
. "$ROOT/examples/lib.sh"
BIN=${1:-$ROOT/${BUILD:-build}/sidecar/outboxd}
PY=/usr/bin/python3     # Debian's python3-psycopg2 is installed for it
SVC="$ROOT/examples/order_service.py"
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}

need() { echo "order_demo: $*" >&2; exit 69; }
[[ -x "$BIN" ]] || need "no outboxd at $BIN (make build)"
command -v curl >/dev/null || need "curl is required (make deps)"
command -v jq >/dev/null || need "jq is required (make deps)"
[[ -x "$PGBIN/psql" ]] || need "PostgreSQL is required (make deps)"
"$PY" -c 'import psycopg2' 2>/dev/null || need "python3-psycopg2 is required (make deps)"

TMP=$(mktemp -d /tmp/order_demo.XXXXXX)
chmod 0755 "$TMP"       # PostgreSQL runs as `nobody` under root: it must reach $TMP/pg
LOG="$TMP/outboxd.log"
PG_STARTED=""
cleanup() {
    kill_outboxd
    [[ -z "$PG_STARTED" ]] || bash "$ROOT/scripts/pgtmp.sh" stop "$TMP/pg" || true
    rm -rf "$TMP"
}
trap cleanup EXIT

# sql QUERY: run as the superuser (the demo inspecting the database); one
# value per line.
sql() { "$PGBIN/psql" "$SUPER_DB" -qAtX -v ON_ERROR_STOP=1 -c "$1"; }

# svc ARGS...: run the order service CLI, print its lines, keep its result
# (the JSON on its last line) in RESULT.
RESULT=""
svc() {
    echo
    echo "$ order_service.py $*"
    "$PY" "$SVC" "$@" >"$TMP/svc.out" || { cat "$TMP/svc.out"; fail "order_service.py $1 exited non-zero"; }
    sed '$d' "$TMP/svc.out"
    RESULT=$(tail -n 1 "$TMP/svc.out" | jq -c .result)
}

# expect_result JQ-CONDITION...: check the last svc result.
expect_result() {
    for cond in "$@"; do
        jq -e "$cond" >/dev/null <<<"$RESULT" || fail "expected $cond in the result $RESULT"
        ok "$cond"
    done
}

# expect_sql QUERY WANT: the superuser's view of the database.
expect_sql() {
    local got
    got=$(sql "$1")
    [[ "$got" == "$2" ]] || fail "$1: expected '$2', got '$got'"
    ok "$1 -> $2"
}

# expect_sql_soon QUERY WANT SECONDS: the same, for a state that follows
# shortly (polled).
sql_is() { [[ "$(sql "$1")" == "$2" ]]; }
expect_sql_soon() {
    until_ok "$3" sql_is "$1" "$2" || fail "$1: expected '$2' within $3 s, got '$(sql "$1")'"
    ok "$1 -> $2"
}

# wait_txn TXID JQ-CONDITION SECONDS: poll GET /v1/transactions/TXID
# quietly until the condition holds, then show the final answer.
txn_is() { curl -sS "$BASE/v1/transactions/$1" | jq -e "$2"; }
wait_txn() {
    local txid=$1 cond=$2 secs=$3
    echo
    echo "   (waiting up to ${secs} s for $cond)"
    until_ok "$secs" txn_is "$txid" "$cond" || true   # expect says what it got
    call GET "/v1/transactions/$txid"
    expect 200 "$cond"
}

# metric NAME{LABELS}: the value of one series of /metrics (0 if absent).
metric() {
    curl -sS "$BASE/metrics" | awk -v m="$1" '$1 == m { v = $2 } END { print v + 0 }'
}

# ------------------------------------------------------------------- set-up
step "0. a throwaway PostgreSQL, the outbox schema, the service's roles and tables, outboxd"
PG_STARTED=1            # set first: a start that fails halfway is stopped too
PORT=$(bash "$ROOT/scripts/pgtmp.sh" start "$TMP/pg")
SUPER="postgresql://postgres@127.0.0.1:$PORT/postgres"
SUPER_DB="postgresql://postgres@127.0.0.1:$PORT/shop"
echo "PostgreSQL on 127.0.0.1:$PORT (data in $TMP/pg, trust authentication on loopback)"
"$PGBIN/psql" "$SUPER" -qAtX -v ON_ERROR_STOP=1 -c "CREATE DATABASE shop" >/dev/null
echo "database shop created"

echo
echo "$ outboxd db migrate --database-url=$SUPER_DB"
"$BIN" db migrate --database-url="$SUPER_DB" >"$TMP/migrate.out" 2>&1 || { cat "$TMP/migrate.out"; fail "outboxd db migrate"; }
cat "$TMP/migrate.out"
grep -q '^applied' "$TMP/migrate.out" || fail "db migrate printed no 'applied ...' line"
echo
echo "$ outboxd db status --database-url=$SUPER_DB"
"$BIN" db status --database-url="$SUPER_DB" 2>&1 || fail "outboxd db status"
expect_sql "SELECT max(version) = count(*) FROM outbox.schema_version" "t"

echo
echo "The service's login roles (members of the groups the migration created) and its own tables:"
tee "$TMP/setup.sql" <<'EOF'
CREATE ROLE orders_app     LOGIN IN ROLE outbox_app;      -- the order service
CREATE ROLE orders_outboxd LOGIN IN ROLE outbox_sidecar;  -- outboxd
CREATE TABLE orders (
    id         text          PRIMARY KEY,
    amount     numeric(12,2) NOT NULL CHECK (amount > 0),
    status     text          NOT NULL,   -- placed, awaiting_payment, paid, cancelled
    created_at timestamptz   NOT NULL DEFAULT now()
);
CREATE TABLE shipments (                  -- no UNIQUE(order_id): the inbox de-duplicates
    id         bigserial   PRIMARY KEY,
    order_id   text        NOT NULL REFERENCES orders (id),
    created_at timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT, UPDATE ON orders TO outbox_app;
GRANT SELECT, INSERT ON shipments TO outbox_app;
GRANT USAGE ON SEQUENCE shipments_id_seq TO outbox_app;
-- Only needed for a custom check query over orders (check_query); the
-- default query reads outbox.transactions.
GRANT SELECT ON orders TO outbox_sidecar;
EOF
"$PGBIN/psql" "$SUPER_DB" -qAtX -v ON_ERROR_STOP=1 -f "$TMP/setup.sql" >/dev/null

export ORDERS_DATABASE_URL="postgresql://orders_app@127.0.0.1:$PORT/shop"
OUTBOXD_DB="postgresql://orders_outboxd@127.0.0.1:$PORT/shop"

echo
echo "$ outboxd --data-dir=$TMP/outboxd --listen=127.0.0.1:0 --database-url=$OUTBOXD_DB"
echo "          --relay=true --relay-poll-interval=200ms --check-first=1s --check-interval=1s --check-max=3"
echo "  (default check policy shortened for the demo: first check after 1 s, every 1 s, 3 checks)"
start_outboxd --data-dir="$TMP/outboxd" --listen=127.0.0.1:0 --database-url="$OUTBOXD_DB" \
    --relay=true --relay-poll-interval=200ms \
    --check-first=1s --check-interval=1s --check-max=3
export OUTBOXD_URL="$BASE"
ready() { [[ "$(curl -s -o /dev/null -w '%{http_code}' "$BASE/readyz")" == 200 ]]; }
until_ok 10 ready || true       # the call below shows what it answers
call GET /readyz
expect 200 '.status == "ready"'

echo
echo "The consumers' subscriptions, created before anything is published:"
call PUT /v1/groups/shipping '{"topic":"orders"}'
expect 201
call PUT /v1/groups/billing '{"topic":"orders.expired"}'
expect 201
call PUT /v1/groups/notifier '{"topic":"orders.shipped"}'
expect 201

# ------------------------------------------------------------------- 1
step "1. an order placed and committed: half message, DB commit, POST commit"
svc place order-1001 42.50
expect_result '. == "committed"'
call GET /v1/transactions/order-1001
expect 200 '.state == "committed"' '.topic == "orders"' '.key == "order-1001"'
expect_sql "SELECT status FROM orders WHERE id = 'order-1001'" "placed"

# ------------------------------------------------------------------- 2
step "2. the service crashes after its DB commit, before POSTing commit"
before=$(metric 'outboxd_checkbacks_total{result="commit"}')
svc place order-1002 19.99 --crash-before-commit
expect_result '. == "crashed"'
echo "   (nobody will POST commit: outboxd checks back, SELECT outbox.check_transaction('order-1002'))"
wait_txn order-1002 '.state == "committed"' 15
after=$(metric 'outboxd_checkbacks_total{result="commit"}')
((after > before)) || fail "no check-back answered commit (outboxd_checkbacks_total{result=\"commit\"} $before -> $after)"
ok "outboxd_checkbacks_total{result=\"commit\"} $before -> $after: the check-back committed it"

# ------------------------------------------------------------------- 3
step "3. the DB transaction fails: the service rolls the message back"
svc place order-1003 7.00 --fail-db
expect_result '. == "rolled_back"'
call GET /v1/transactions/order-1003
expect 200 '.state == "rolled_back"'
expect_sql "SELECT count(*) FROM orders WHERE id = 'order-1003'" "0"

echo
echo "   ...and if the service also crashes before POSTing rollback:"
svc place order-1004 8.00 --fail-db --crash-before-commit
expect_result '. == "crashed"'
expect_sql "SELECT count(*) FROM outbox.transactions WHERE txid = 'order-1004'" "0"
echo "   (no row in outbox.transactions: every check-back answers 'not known yet';"
echo "    after the last of 3 checks outboxd rolls back)"
wait_txn order-1004 '.state == "rolled_back"' 20
expect 200 '.checks == 3'

# ------------------------------------------------------------------- 4
step "4. payment pending -> paid in time -> committed by the next check-back"
echo "   (demo policy: first check after 1 s, every 1 s, 5 checks; real life: 60 s, 60 s, 10)"
svc place-awaiting-payment order-1005 99.00 --first-check-ms 1000 --interval-ms 1000 --max-checks 5
call GET /v1/transactions/order-1005
expect 200 '.state == "prepared"' '.check.max_checks == 5' '.check.expiry_topic == "orders.expired"'
wait_txn order-1005 '.checks >= 1' 10
expect 200 '.state == "prepared"'
echo "   (checked: the row says 'pending', so the message waits; the customer pays now)"
svc pay order-1005
wait_txn order-1005 '.state == "committed"' 10
expect 200 '.checks < 5'
expect_sql "SELECT status FROM orders WHERE id = 'order-1005'" "paid"

# ------------------------------------------------------------------- 5
step "5. payment never made -> rolled back after the last check + expiry event"
svc place-awaiting-payment order-1006 15.00 --first-check-ms 1000 --interval-ms 1000 --max-checks 5
wait_txn order-1006 '.state == "rolled_back"' 20
expect 200 '.checks == 5' '.expired == true'
echo
echo "   (the service's billing consumer receives the expiry event and cancels the order)"
svc consume billing orders.expired 1
expect_result '.processed == 1' '.acked == 1'
expect_sql "SELECT status FROM orders WHERE id = 'order-1006'" "cancelled"

# ------------------------------------------------------------------- 6
step "6. a consumer receives a duplicate and processes it once"
echo "   (committed orders so far: order-1001, order-1002, order-1005; the shipping"
echo "    consumer ships them in its database, then its next step fails - the courier's"
echo "    API is down, say - so it gives the messages back: a nack asking for"
echo "    redelivery in 1 s.  A consumer that crashes before acking gets them back"
echo "    the same way, after their invisibility and the group's first retry delay.)"
svc consume shipping orders 3 --nack-ms 1000
expect_result '.processed == 3' '.duplicates == 0' '.acked == 0' '.nacked == 3' \
              '.deliveries == [1, 1, 1]'
FIRST=$RESULT
expect_sql "SELECT count(*) FROM shipments" "3"
echo
echo "   (1 s later the same messages come again: delivery 2)"
svc consume shipping orders 3 --wait-ms 5000 --timeout 20
expect_result '.processed == 0' '.duplicates == 3' '.acked == 3' '.deliveries == [2, 2, 2]'
jq -e --argjson a "$FIRST" '(.msg_ids | sort) == ($a.msg_ids | sort)' >/dev/null <<<"$RESULT" ||
    fail "the redelivered messages are not the ones processed first"
ok "the same 3 msg_ids, delivered twice"
expect_sql "SELECT count(*) || ' rows, ' || count(DISTINCT order_id) || ' orders' FROM shipments" "3 rows, 3 orders"
call POST /v1/groups/shipping/receive '{"topic":"orders","max":10,"wait_ms":1500}'
expect 200 '.messages | length == 0'

# ------------------------------------------------------------------- 7
step "7. relay mode: a row written only in SQL is published"
svc relay-write orders.shipped order-1001 '{"order_id":"order-1001","event":"order_shipped"}'
ROW_ID=$(jq -r . <<<"$RESULT")
call POST /v1/groups/notifier/receive '{"topic":"orders.shipped","max":10,"wait_ms":5000}'
expect 200 '.messages | length == 1' ".messages[0].msg_id == \"$ROW_ID\"" \
       '.messages[0].key == "order-1001"' '.messages[0].body.event == "order_shipped"'
RECEIPT=$(jq -r '.messages[0].receipt' <<<"$BODY")
call POST /v1/groups/notifier/ack "{\"receipts\":[\"$RECEIPT\"]}"
expect 200 '.acked == 1'
expect_sql_soon "SELECT count(*) FROM outbox.messages" "0" 10
echo "   (the relay stored the row in outboxd and deleted it from outbox.messages)"

# ------------------------------------------------------------------- 8
step "8. SIGTERM: graceful shutdown"
stop_outboxd
bash "$ROOT/scripts/pgtmp.sh" stop "$TMP/pg"
PG_STARTED=""
echo "PostgreSQL stopped"
echo
echo "order_demo: all steps passed"
