#!/usr/bin/python3
"""order_service.py - a tiny order service that uses outboxd as documented.

The service owns a PostgreSQL database (its own tables `orders` and
`shipments`, plus the schema `outbox` that `outboxd db migrate` installs)
and talks to outboxd over HTTP.  It connects to PostgreSQL as an
application role (a member of `outbox_app`), never as outboxd's role.

How an order event reaches consumers exactly when the order exists:

  1. POST /v1/transactions      a *half message*: stored, invisible to
                                consumers, txid = the order id
  2. one database transaction   INSERT the order AND a row in
                                outbox.transactions (txid, state), COMMIT
  3. POST .../commit            the message becomes visible
     (or .../rollback when step 2 failed)

If the service dies between 2 and 3, nobody tells outboxd the verdict.
outboxd then *checks back*: it asks PostgreSQL (SELECT
outbox.check_transaction(txid)) on the message's schedule.  A row in
state 'commit' commits the message, 'rollback' drops it, 'pending' or no
row at all means "not decided yet: ask again later", and after the last
check the message is rolled back (optionally publishing an expiry event).
So step 3 is only an optimisation: the database row is the truth.

Consumers receive messages at least once; a redelivery (the consumer died
after its work but before its ack) must not ship an order twice.  consume()
therefore does its work inside a database transaction that first calls
outbox.inbox_claim(group, msg_id): true the first time, false for a
duplicate, and a rolled-back transaction releases the claim.

Relay mode is for code that only writes rows: INSERT INTO outbox.messages
in the application's transaction, and outboxd (run with relay on) publishes
each committed row once.

Used as a library (OrderService) or as a CLI (see `--help`); the demo
examples/order_demo.sh drives the CLI.  Standard library + psycopg2 only.
Run it with /usr/bin/python3: Debian's python3-psycopg2 is installed for
the system interpreter.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

import psycopg2


def say(msg):
    """Print one line of the walk-through (flushed: the demo interleaves
    our output with its own)."""
    print(f"  [order-service] {msg}", flush=True)


class OutboxdError(Exception):
    """outboxd answered with an unexpected HTTP status."""

    def __init__(self, method, path, status, body):
        super().__init__(f"{method} {path} -> HTTP {status}: {body}")
        self.status = status
        self.body = body


class Outboxd:
    """A minimal outboxd HTTP client (docs/http-api.md)."""

    def __init__(self, base_url, token=None, timeout=40.0):
        self.base = base_url.rstrip("/")
        self.token = token
        # Long polls wait up to 30 s on the server; allow for that.
        self.timeout = timeout

    def call(self, method, path, body=None, ok=(200, 201)):
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.base + path, data=data,
                                     headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:   # 4xx/5xx still carry a body
            status, text = e.code, e.read().decode()
        answer = json.loads(text) if text else None
        if status not in ok:
            raise OutboxdError(method, path, status, answer)
        return answer


class OrderService:
    """The order service: one database connection, one outboxd client."""

    def __init__(self, db_url, outboxd_url, token=None):
        self.db = psycopg2.connect(db_url)
        self.outboxd = Outboxd(outboxd_url, token)

    def close(self):
        self.db.close()

    # ----------------------------------------------------------- producing

    def place_order(self, order_id, amount, crash_before_commit=False,
                    fail_db=False):
        """Place an order and publish "order_placed" exactly when the order
        row commits.

        crash_before_commit: stop right after the database transaction (as a
        crash would): outboxd never hears the verdict, its check-back reads
        the row and commits (or, with fail_db, finds no row and eventually
        rolls back).  fail_db: the database transaction fails before COMMIT
        (nothing of it stays), so the service rolls the half message back.
        Returns "committed", "rolled_back" or "crashed"."""
        # 1. The half message.  txid = order id, so the check-back can find
        #    the order's row, and a retried call is idempotent.  No check
        #    policy given: the daemon's default schedule applies.
        half = self.outboxd.call("POST", "/v1/transactions", {
            "txid": order_id,
            "topic": "orders",
            "key": order_id,       # one queue per order: its events in order
            "body": {"order_id": order_id, "amount": amount,
                     "event": "order_placed"},
        })
        say(f"{order_id}: half message prepared (msg_id {half['msg_id']}, "
            f"invisible to consumers)")

        # 2. The order and its outbox row in ONE database transaction:
        #    either both exist or neither does.
        try:
            with self.db:                  # COMMIT on success, else ROLLBACK
                with self.db.cursor() as cur:
                    cur.execute("INSERT INTO orders (id, amount, status) "
                                "VALUES (%s, %s, 'placed')",
                                (order_id, amount))
                    cur.execute("INSERT INTO outbox.transactions (txid, state) "
                                "VALUES (%s, 'commit')", (order_id,))
                    if fail_db:
                        # Stands for anything that goes wrong before
                        # COMMIT: a constraint, a lost connection, a bug.
                        raise RuntimeError("simulated failure before COMMIT")
        except (psycopg2.Error, RuntimeError) as e:
            say(f"{order_id}: database transaction failed ({e}); "
                f"rolled back, no order row")
            if crash_before_commit:
                say(f"{order_id}: ...and the service crashes before telling "
                    f"outboxd (no rollback POST)")
                return "crashed"
            # 3'. Tell outboxd at once; without this the check-backs would
            #     find no row and roll back after the last check.
            self.outboxd.call("POST", f"/v1/transactions/{order_id}/rollback")
            say(f"{order_id}: POST rollback -> the message is dropped")
            return "rolled_back"
        say(f"{order_id}: database COMMIT (order row + outbox.transactions "
            f"state 'commit')")

        if crash_before_commit:
            say(f"{order_id}: the service crashes before POSTing commit; "
                f"outboxd's check-back will find the row")
            return "crashed"

        # 3. Release the message now instead of at the next check-back.
        self.outboxd.call("POST", f"/v1/transactions/{order_id}/commit")
        say(f"{order_id}: POST commit -> visible to consumers")
        return "committed"

    def place_order_awaiting_payment(self, order_id, amount,
                                     first_check_ms=60000,
                                     interval_ms=60000, max_checks=10):
        """Place an order that is not decided yet: it waits for payment.

        The outbox row says 'pending', so every check-back answers "not
        yet" and outboxd asks again on the message's own schedule.  pay()
        turns the row into 'commit' (the next check releases the message);
        if nobody pays, the last check rolls the message back and outboxd
        publishes a "transaction-expired" event to orders.expired.  The
        real-life policy is the default here: first check after 60 s, then
        every 60 s, 10 checks (a 10-minute payment window).  The row's
        `deadline` column is left NULL on purpose: a passed deadline is
        answered 'rollback' by the check itself, which would drop the
        message without the expiry event this flow wants."""
        half = self.outboxd.call("POST", "/v1/transactions", {
            "txid": order_id,
            "topic": "orders",
            "key": order_id,
            "body": {"order_id": order_id, "amount": amount,
                     "event": "order_placed"},
            "check": {"first_check_ms": first_check_ms,
                      "interval_ms": interval_ms,
                      "max_checks": max_checks,
                      "on_exhausted": "rollback",
                      "expiry_topic": "orders.expired"},
        })
        say(f"{order_id}: half message prepared (msg_id {half['msg_id']}); "
            f"check policy: first after {first_check_ms} ms, every "
            f"{interval_ms} ms, {max_checks} checks, then roll back and "
            f"publish to orders.expired")
        with self.db:
            with self.db.cursor() as cur:
                cur.execute("INSERT INTO orders (id, amount, status) "
                            "VALUES (%s, %s, 'awaiting_payment')",
                            (order_id, amount))
                cur.execute("INSERT INTO outbox.transactions (txid, state) "
                            "VALUES (%s, 'pending')", (order_id,))
        say(f"{order_id}: database COMMIT (order awaiting payment, outbox "
            f"state 'pending'); no commit POST: the check-backs decide")

    def pay(self, order_id):
        """The payment arrived: mark the order paid and its outbox row
        'commit' in one database transaction.  No HTTP call: the next
        check-back reads 'commit' and releases the message.  (A service in
        a hurry may also POST commit after the COMMIT.)"""
        with self.db:
            with self.db.cursor() as cur:
                cur.execute("UPDATE orders SET status = 'paid' "
                            "WHERE id = %s AND status = 'awaiting_payment'",
                            (order_id,))
                if cur.rowcount != 1:
                    raise RuntimeError(f"{order_id} is not awaiting payment")
                cur.execute("UPDATE outbox.transactions SET state = 'commit' "
                            "WHERE txid = %s AND state = 'pending'",
                            (order_id,))
                if cur.rowcount != 1:
                    raise RuntimeError(f"{order_id} has no pending outbox row")
        say(f"{order_id}: paid; database COMMIT (order 'paid', outbox state "
            f"'commit'); the next check-back releases the message")

    def write_relay_row(self, topic, key, body):
        """Relay mode: publish by writing a row only, in the application's
        own transaction (here a transaction of its own).  outboxd, run with
        relay on, stores the row as a message once it is committed and
        deletes it.  Returns the message id the row will be published
        with."""
        with self.db:
            with self.db.cursor() as cur:
                cur.execute("INSERT INTO outbox.messages (topic, key, body) "
                            "VALUES (%s, %s, %s::jsonb) RETURNING msg_id",
                            (topic, key, json.dumps(body)))
                msg_id = cur.fetchone()[0]
        say(f"relay row written to outbox.messages (topic {topic}, key {key}, "
            f"msg_id {msg_id}); no HTTP call")
        return msg_id

    # ----------------------------------------------------------- consuming

    def _apply(self, cur, group, msg):
        """The consumer's work for one message, inside its transaction."""
        body = msg.get("body")
        event = body.get("event") if isinstance(body, dict) else None
        if event == "order_placed":
            cur.execute("INSERT INTO shipments (order_id) VALUES (%s)",
                        (body["order_id"],))
            return f"shipment created for {body['order_id']}"
        if event == "transaction-expired":
            # outboxd's expiry event: the payment window closed.  Cancel the
            # order unless it was paid in the meantime (then the payment
            # lost the race with the last check: a real service refunds).
            cur.execute("UPDATE orders SET status = 'cancelled' "
                        "WHERE id = %s AND status = 'awaiting_payment'",
                        (body["txid"],))
            cur.execute("UPDATE outbox.transactions SET state = 'rollback' "
                        "WHERE txid = %s AND state = 'pending'",
                        (body["txid"],))
            return f"order {body['txid']} cancelled (payment window closed)"
        return f"nothing to do for event {event!r}"

    def consume(self, group, topic, n, wait_ms=5000, invisible_ms=None,
                crash_before_ack=False, timeout_s=20.0, nack_ms=None):
        """Receive up to n messages of `topic` as consumer group `group`,
        process each at most once, ack them.

        Each message is processed in one database transaction that starts
        with outbox.inbox_claim(group, msg_id): the first delivery does the
        work, a redelivery of a message already processed is skipped (the
        claim says false) and only acked.

        Two ways to end up with a duplicate, for the walk-through:
        crash_before_ack stops after the database work, before the ack, as
        a crash would: outboxd redelivers the messages once their
        invisibility (invisible_ms) has run out and the group's first retry
        delay (10 s) has passed.  nack_ms: the step after the database work
        fails (a courier's API is down, say), so the consumer gives the
        messages back with a nack asking for redelivery after nack_ms
        (rounded up to a delay level: 1 s, 5 s, ...).
        Returns {"processed", "duplicates", "acked", "nacked", "msg_ids",
        "deliveries"} (the delivery_count of each message received)."""
        done = {"processed": 0, "duplicates": 0, "acked": 0, "nacked": 0,
                "msg_ids": [], "deliveries": []}
        deadline = time.monotonic() + timeout_s
        while len(done["msg_ids"]) < n and time.monotonic() < deadline:
            req = {"topic": topic, "max": n - len(done["msg_ids"]),
                   "wait_ms": wait_ms}
            if invisible_ms is not None:
                req["invisible_ms"] = invisible_ms
            got = self.outboxd.call("POST", f"/v1/groups/{group}/receive",
                                    req)["messages"]
            receipts = []
            for msg in got:
                mid = msg["msg_id"]
                with self.db:
                    with self.db.cursor() as cur:
                        cur.execute("SELECT outbox.inbox_claim(%s, %s)",
                                    (group, mid))
                        first = cur.fetchone()[0]
                        if first:
                            what = self._apply(cur, group, msg)
                if first:
                    done["processed"] += 1
                    say(f"{group}: {mid} (delivery {msg['delivery_count']}) "
                        f"{json.dumps(msg.get('body'))}")
                    say(f"{group}:   processed: {what}")
                else:
                    done["duplicates"] += 1
                    say(f"{group}: {mid} (delivery {msg['delivery_count']}) "
                        f"is a duplicate: the inbox says it was processed; "
                        f"skipped")
                done["msg_ids"].append(mid)
                done["deliveries"].append(msg["delivery_count"])
                receipts.append(msg["receipt"])
            if crash_before_ack:
                if receipts:
                    say(f"{group}: crashes before acking {len(receipts)} "
                        f"message(s); outboxd will redeliver them")
                continue
            if nack_ms is not None:
                if receipts:
                    nack = self.outboxd.call(
                        "POST", f"/v1/groups/{group}/nack",
                        {"receipts": receipts, "delay_ms": nack_ms,
                         "reason": "courier API unavailable"})
                    done["nacked"] += nack["nacked"]
                    say(f"{group}: the next step failed after the database "
                        f"commit; nacked {nack['nacked']}, redelivery asked "
                        f"in {nack_ms} ms")
                continue
            if receipts:
                ack = self.outboxd.call("POST", f"/v1/groups/{group}/ack",
                                        {"receipts": receipts})
                done["acked"] += ack["acked"]
                say(f"{group}: acked {ack['acked']}")
        return done


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="A tiny order service using outboxd (see the module "
                    "docstring).")
    ap.add_argument("--db", default=os.environ.get("ORDERS_DATABASE_URL"),
                    help="PostgreSQL URL of the application role "
                         "(default $ORDERS_DATABASE_URL)")
    ap.add_argument("--outboxd", default=os.environ.get("OUTBOXD_URL"),
                    help="outboxd base URL, e.g. http://127.0.0.1:8080 "
                         "(default $OUTBOXD_URL)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("place", help="place an order (committed at once)")
    p.add_argument("order_id")
    p.add_argument("amount")
    p.add_argument("--crash-before-commit", action="store_true")
    p.add_argument("--fail-db", action="store_true")

    p = sub.add_parser("place-awaiting-payment",
                       help="place an order that waits for payment")
    p.add_argument("order_id")
    p.add_argument("amount")
    p.add_argument("--first-check-ms", type=int, default=60000)
    p.add_argument("--interval-ms", type=int, default=60000)
    p.add_argument("--max-checks", type=int, default=10)

    p = sub.add_parser("pay", help="record the payment of an order")
    p.add_argument("order_id")

    p = sub.add_parser("consume", help="receive, process once, ack")
    p.add_argument("group")
    p.add_argument("topic")
    p.add_argument("n", type=int)
    p.add_argument("--wait-ms", type=int, default=5000)
    p.add_argument("--invisible-ms", type=int)
    p.add_argument("--crash-before-ack", action="store_true")
    p.add_argument("--nack-ms", type=int,
                   help="nack instead of ack, asking for redelivery after "
                        "this many ms")
    p.add_argument("--timeout", type=float, default=20.0)

    p = sub.add_parser("relay-write", help="write an outbox.messages row")
    p.add_argument("topic")
    p.add_argument("key")
    p.add_argument("body", help="JSON")

    a = ap.parse_args(argv)
    if not a.db or not a.outboxd:
        ap.error("--db/ORDERS_DATABASE_URL and --outboxd/OUTBOXD_URL are "
                 "required")
    svc = OrderService(a.db, a.outboxd, os.environ.get("OUTBOXD_TOKEN"))
    try:
        if a.cmd == "place":
            out = svc.place_order(a.order_id, a.amount,
                                  crash_before_commit=a.crash_before_commit,
                                  fail_db=a.fail_db)
        elif a.cmd == "place-awaiting-payment":
            out = svc.place_order_awaiting_payment(
                a.order_id, a.amount, a.first_check_ms, a.interval_ms,
                a.max_checks)
        elif a.cmd == "pay":
            out = svc.pay(a.order_id)
        elif a.cmd == "consume":
            out = svc.consume(a.group, a.topic, a.n, a.wait_ms,
                              a.invisible_ms, a.crash_before_ack, a.timeout,
                              a.nack_ms)
        else:
            out = str(svc.write_relay_row(a.topic, a.key, json.loads(a.body)))
    except (OutboxdError, psycopg2.Error, RuntimeError) as e:
        print(f"order_service: {a.cmd} failed: {e}", file=sys.stderr)
        return 1
    finally:
        svc.close()
    # The last line is the result as JSON, for scripts (the demo checks it).
    print(json.dumps({"result": out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
