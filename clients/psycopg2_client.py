"""A psycopg2 (libpq) client for the proxy's client tests (proxy/tests/clients.rs): connects
with the CONNINFO environment variable and prints one line per check: "connect ok" or
"connect error <SQLSTATE or message>", "prepared <value>" for a PREPARE/EXECUTE pair,
"cancel ok" when connection.cancel() (libpq's PQcancel: a CancelRequest with the session's
key) stopped a running pg_sleep and the session still works.

With MODE=writer it is an application's writer instead (e2e/tests/moves.rs): one session in
autocommit, an INSERT into client_writes every 20 ms for SECS seconds; an error is counted
and the session opened again (as a pool would). Prints "error <SQLSTATE or message>" for
each, then "writes <acknowledged> errors <count>".

With MODE=ha it is one of `loadtest ha`'s application writers: one session in autocommit, an
INSERT into lt_writes (id from ID_BASE on, client CLIENT_NO) every THINK_MS until killed;
an error closes the session, opened again at once (as a pool would). Prints a line as each
attempt ends: "connected <us>", "connect_error <kind> <us>", "ok <id> <us>",
"error <kind> <us>" (us: how long the attempt took, in microseconds)."""
import os
import sys
import threading
import time

import psycopg2


def writer():
    conn, errors, writes = None, 0, 0
    end = time.time() + float(os.environ.get("SECS", "10"))
    while time.time() < end:
        try:
            if conn is None:
                conn = psycopg2.connect(os.environ["CONNINFO"])
                conn.autocommit = True
            conn.cursor().execute(
                "INSERT INTO client_writes (client, n) VALUES (%s, %s)", ("psycopg2", writes)
            )
            writes += 1
        except psycopg2.Error as e:
            errors += 1
            print("error", e.pgcode or str(e).strip().replace("\n", " "))
            conn = None
        time.sleep(0.02)
    print("writes", writes, "errors", errors)


def kind(e):
    """The SQLSTATE, else what the socket did (as loadtest's own clients name it)."""
    if e.pgcode:
        return e.pgcode
    text = str(e).lower()
    if "timeout" in text or "timed out" in text:
        return "timeout"
    if "refused" in text:
        return "refused"
    return "closed"


def ha_writer():
    conn, n = None, 0
    base, client = int(os.environ["ID_BASE"]), int(os.environ["CLIENT_NO"])
    think = float(os.environ.get("THINK_MS", "10")) / 1000
    while True:
        if conn is None:
            t = time.monotonic()
            try:
                conn = psycopg2.connect(os.environ["CONNINFO"])
                conn.autocommit = True
                print("connected", int((time.monotonic() - t) * 1e6), flush=True)
            except psycopg2.Error as e:
                print("connect_error", kind(e), int((time.monotonic() - t) * 1e6), flush=True)
                conn = None
                time.sleep(0.01)
                continue
        n += 1
        t = time.monotonic()
        try:
            conn.cursor().execute(
                "INSERT INTO lt_writes (id, client) VALUES (%s, %s)", (base + n, client)
            )
            print("ok", base + n, int((time.monotonic() - t) * 1e6), flush=True)
        except psycopg2.Error as e:
            print("error", kind(e), int((time.monotonic() - t) * 1e6), flush=True)
            try:
                conn.close()
            except psycopg2.Error:
                pass
            conn = None
        time.sleep(think)


if os.environ.get("MODE") == "ha":
    ha_writer()

if os.environ.get("MODE") == "writer":
    writer()
    sys.exit(0)

try:
    conn = psycopg2.connect(os.environ["CONNINFO"])
except psycopg2.OperationalError as e:
    # libpq reports a FATAL at connect as a message: the tests look for its words.
    print("connect error", str(e).strip().replace("\n", " "))
    sys.exit(0)
conn.autocommit = True
print("connect ok")
cur = conn.cursor()
cur.execute("PREPARE plus_one(int) AS SELECT $1 + 1")
cur.execute("EXECUTE plus_one(41)")
print("prepared", cur.fetchone()[0])

outcome = {}


def sleep():
    try:
        conn.cursor().execute("SELECT pg_sleep(30)")
        outcome["r"] = "finished"
    except psycopg2.Error as e:
        outcome["r"] = e.pgcode


t = threading.Thread(target=sleep)
t.start()
deadline = time.time() + 20
while t.is_alive() and time.time() < deadline:
    time.sleep(0.2)
    conn.cancel()
t.join(5)
cur.execute("SELECT 1")
works = cur.fetchone()[0] == 1
print("cancel ok" if outcome.get("r") == "57014" and works else "cancel failed %s" % outcome)
