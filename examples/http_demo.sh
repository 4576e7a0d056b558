#!/usr/bin/env bash
# http_demo.sh OUTBOXD_BINARY - the mission, over HTTP, with curl.
#
# Starts outboxd with its embedded defaults (SYNC flush, data in a fresh
# temporary folder, 127.0.0.1 on a free port), then walks through what an
# order service does with it, printing every request and response:
#
#   1. a half message, its commit, a consumer's receive + ack
#   2. a rollback: the consumer never sees the message
#   3. a delayed message: invisible until its time
#   4. a nack: the message comes back, delivery_count 2
#   5. a FIFO group: a queue's next message only after the previous is acked
#   6. an Idempotency-Key retry returns the first answer
#   7. SIGTERM: graceful shutdown, exit 0
#
# Each step checks the status and the fields it relies on; the script exits
# non-zero at the first surprise.  Only the outboxd it started is stopped
# (by PID).  The helpers (call, expect, step, start_outboxd, ...) are in
# examples/lib.sh, shared with order_demo.sh.
set -euo pipefail

DEMO=http_demo
BIN=${1:?usage: http_demo.sh path/to/outboxd}
# shellcheck source=examples/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
command -v curl >/dev/null || { echo "http_demo: curl is required (make deps)" >&2; exit 69; }
command -v jq >/dev/null || { echo "http_demo: jq is required (make deps)" >&2; exit 69; }

TMP=$(mktemp -d)
LOG="$TMP/outboxd.log"
cleanup() {
    kill_outboxd
    rm -rf "$TMP"
}
trap cleanup EXIT

start_outboxd --data-dir="$TMP/data" --listen=127.0.0.1:0

step "1. half message -> commit -> receive -> ack"
call POST /v1/transactions '{"topic":"orders","key":"order-1001","txid":"order-1001-created","headers":{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},"body":{"order":1001,"total":"42.50"}}'
expect 201 '.state == "prepared"' '.txid == "order-1001-created"'
MSG1=$(jq -r .msg_id <<<"$BODY")
echo "   (the order service now commits its own database transaction)"
call POST /v1/groups/billing/receive '{"topic":"orders","max":10}'
expect 200 '.messages | length == 0'
echo "   (a half message is invisible to consumers)"
call POST /v1/transactions/order-1001-created/commit
expect 200 '.state == "committed"'
call POST /v1/groups/billing/receive '{"topic":"orders","max":10,"wait_ms":2000}'
expect 200 '.messages | length == 1' ".messages[0].msg_id == \"$MSG1\"" '.messages[0].body.order == 1001' \
       '.messages[0].headers.traceparent | startswith("00-4bf9")'
RECEIPT=$(jq -r '.messages[0].receipt' <<<"$BODY")
call POST /v1/groups/billing/ack "{\"receipts\":[\"$RECEIPT\"]}"
expect 200 '.acked == 1'

step "2. rollback: the database transaction failed"
call POST /v1/transactions '{"topic":"orders","key":"order-1002","body":{"order":1002}}'
expect 201 '.state == "prepared"'
TX2=$(jq -r .txid <<<"$BODY")
call POST "/v1/transactions/$TX2/rollback"
expect 200 '.state == "rolled_back"'
call POST "/v1/transactions/$TX2/commit"
expect 409
echo "   (a late commit cannot undo the rollback)"
call POST /v1/groups/billing/receive '{"topic":"orders","max":10,"wait_ms":500}'
expect 200 '.messages | length == 0'

step "3. a delayed message (2 s)"
call POST /v1/topics/reminders/messages '{"key":"order-1001","delay_ms":2000,"body":{"remind":"payment"}}'
expect 201 '.deliver_at != null'
call POST /v1/groups/mailer/receive '{"topic":"reminders","max":10}'
expect 200 '.messages | length == 0'
echo "   (not yet; a long poll of up to 5 s wakes when it is due)"
call POST /v1/groups/mailer/receive '{"topic":"reminders","max":10,"wait_ms":5000}'
expect 200 '.messages | length == 1' '.messages[0].body.remind == "payment"'
RECEIPT=$(jq -r '.messages[0].receipt' <<<"$BODY")
call POST /v1/groups/mailer/ack "{\"receipts\":[\"$RECEIPT\"]}"
expect 200 '.acked == 1'

step "4. nack -> redelivery"
call POST /v1/topics/invoices/messages '{"key":"order-1001","body":{"invoice":77}}'
expect 201 '.msg_id != null'
call POST /v1/groups/printer/receive '{"topic":"invoices","max":1,"wait_ms":1000}'
expect 200 '.messages | length == 1' '.messages[0].delivery_count == 1'
RECEIPT=$(jq -r '.messages[0].receipt' <<<"$BODY")
call POST /v1/groups/printer/nack "{\"receipts\":[\"$RECEIPT\"],\"delay_ms\":1000,\"reason\":\"printer offline\"}"
expect 200 '.nacked == 1'
call POST /v1/groups/printer/receive '{"topic":"invoices","max":1,"wait_ms":5000}'
expect 200 '.messages | length == 1' '.messages[0].delivery_count == 2' '.messages[0].body.invoice == 77'
RECEIPT=$(jq -r '.messages[0].receipt' <<<"$BODY")
call POST /v1/groups/printer/ack "{\"receipts\":[\"$RECEIPT\"]}"
expect 200 '.acked == 1'

step "5. a FIFO group: one queue, strictly one after the other"
call PUT /v1/topics/ledger '{"queues":1}'
expect 201
call PUT /v1/groups/accounting '{"topic":"ledger","fifo":true}'
expect 201
for n in 1 2 3; do
    call POST /v1/topics/ledger/messages "{\"key\":\"account-9\",\"body\":{\"entry\":$n}}"
    expect 201
done
for n in 1 2 3; do
    call POST /v1/groups/accounting/receive '{"topic":"ledger","max":10,"wait_ms":1000}'
    expect 200 '.messages | length == 1' ".messages[0].body.entry == $n"
    RECEIPT=$(jq -r '.messages[0].receipt' <<<"$BODY")
    call POST /v1/groups/accounting/ack "{\"receipts\":[\"$RECEIPT\"]}"
    expect 200 '.acked == 1'
done

step "6. a retried send with an Idempotency-Key"
call POST /v1/topics/orders/messages '{"key":"order-1003","body":{"order":1003}}' -H 'Idempotency-Key: send-order-1003'
expect 201
FIRST=$BODY
call POST /v1/topics/orders/messages '{"key":"order-1003","body":{"order":1003}}' -H 'Idempotency-Key: send-order-1003'
expect 201 ".msg_id == $(jq .msg_id <<<"$FIRST")"
echo "   (the retry got the first answer; no second message)"
call POST /v1/topics/orders/messages '{"key":"order-1003","body":{"order":9999}}' -H 'Idempotency-Key: send-order-1003'
expect 422

step "7. what an operator sees"
call GET /v1/groups/billing
expect 200 '.group == "billing"'
call GET /readyz
expect 200 '.status == "ready"'
curl -sS "$BASE/metrics" | grep -E '^outboxd_(transactions_total|messages_published_total|store_fsync_seconds_count)' | head -n 8

step "8. SIGTERM: graceful shutdown"
stop_outboxd
echo
echo "http_demo: all steps passed"
