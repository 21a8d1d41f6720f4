// A pgx client for the proxy's client tests (proxy/tests/clients.rs): connects with the
// libpq-style CONNINFO, then prints one line per check: "connect ok" or "connect error
// <SQLSTATE>", "prepared <value>" for a named prepared statement, "cancel ok" when a
// running pg_sleep was cancelled through a CancelRequest (pgx sends one when the context
// ends) and the session still works. With MODE=writer it is an application's writer instead
// (e2e/tests/moves.rs): see writer.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

func code(err error) string {
	var pg *pgconn.PgError
	if errors.As(err, &pg) {
		return pg.Code
	}
	return "none: " + err.Error()
}

// writer: one session, an INSERT into client_writes every 20 ms for SECS seconds (pgx
// prepares it once, as a named statement of its cache, and executes it after); an error is
// counted and the session opened again, as a pool would. Prints "error <SQLSTATE>" for each,
// then "writes <acknowledged> errors <count>".
func writer(ctx context.Context) {
	secs, _ := strconv.Atoi(os.Getenv("SECS"))
	end := time.Now().Add(time.Duration(secs) * time.Second)
	var conn *pgx.Conn
	writes, errs := 0, 0
	for time.Now().Before(end) {
		var err error
		if conn == nil {
			conn, err = pgx.Connect(ctx, os.Getenv("CONNINFO"))
		}
		if err == nil {
			_, err = conn.Exec(ctx, "insert into client_writes (client, n) values ($1, $2)", "pgx", writes)
		}
		if err != nil {
			errs++
			fmt.Println("error", code(err))
			if conn != nil {
				conn.Close(ctx)
			}
			conn = nil
		} else {
			writes++
		}
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Println("writes", writes, "errors", errs)
}

// kind: the SQLSTATE, else what the socket did (as loadtest's own clients name it).
func kind(err error) string {
	var pg *pgconn.PgError
	if errors.As(err, &pg) {
		return pg.Code
	}
	text := strings.ToLower(err.Error())
	switch {
	case strings.Contains(text, "timeout"), strings.Contains(text, "timed out"):
		return "timeout"
	case strings.Contains(text, "refused"):
		return "refused"
	}
	return "closed"
}

// haWriter: one of `loadtest ha`'s application writers. One session, an INSERT into
// lt_writes (id from ID_BASE on, client CLIENT_NO) every THINK_MS until killed, through
// pgx's statement cache (prepared once per session); an error closes the session, opened
// again at once (as a pool would). Prints a line as each attempt ends: "connected <us>",
// "connect_error <kind> <us>", "ok <id> <us>", "error <kind> <us>".
func haWriter(ctx context.Context) {
	base, _ := strconv.ParseInt(os.Getenv("ID_BASE"), 10, 64)
	client, _ := strconv.Atoi(os.Getenv("CLIENT_NO"))
	think, _ := strconv.Atoi(os.Getenv("THINK_MS"))
	var conn *pgx.Conn
	n := int64(0)
	for {
		if conn == nil {
			t := time.Now()
			c, err := pgx.Connect(ctx, os.Getenv("CONNINFO"))
			if err != nil {
				fmt.Println("connect_error", kind(err), time.Since(t).Microseconds())
				time.Sleep(10 * time.Millisecond)
				continue
			}
			fmt.Println("connected", time.Since(t).Microseconds())
			conn = c
		}
		n++
		t := time.Now()
		_, err := conn.Exec(ctx, "insert into lt_writes (id, client) values ($1, $2)", base+n, client)
		if err != nil {
			fmt.Println("error", kind(err), time.Since(t).Microseconds())
			conn.Close(ctx)
			conn = nil
		} else {
			fmt.Println("ok", base+n, time.Since(t).Microseconds())
		}
		time.Sleep(time.Duration(think) * time.Millisecond)
	}
}

func main() {
	ctx := context.Background()
	if os.Getenv("MODE") == "ha" {
		haWriter(ctx)
		return
	}
	if os.Getenv("MODE") == "writer" {
		writer(ctx)
		return
	}
	conn, err := pgx.Connect(ctx, os.Getenv("CONNINFO"))
	if err != nil {
		fmt.Println("connect error", code(err))
		return
	}
	defer conn.Close(ctx)
	fmt.Println("connect ok")

	if _, err := conn.Prepare(ctx, "plus_one", "select $1::int + 1"); err != nil {
		fmt.Println("prepared error", code(err))
		return
	}
	var v int
	if err := conn.QueryRow(ctx, "plus_one", 41).Scan(&v); err != nil {
		fmt.Println("prepared error", code(err))
		return
	}
	fmt.Println("prepared", v)

	// pgconn's CancelRequest: a CancelRequest with the session's key, on a new connection,
	// sent every 200 ms until the query ends (the first may come before it runs).
	done := make(chan error, 1)
	pg := conn.PgConn()
	start := time.Now()
	go func() {
		_, err := pg.Exec(ctx, "select pg_sleep(30)").ReadAll()
		done <- err
	}()

wait:
	for {
		select {
		case err = <-done:
			break wait
		case <-time.After(200 * time.Millisecond):
			_ = pg.CancelRequest(ctx)
		}
	}
	took := time.Since(start)
	var one int
	after := conn.QueryRow(ctx, "select 1").Scan(&one)
	if err != nil && code(err) == "57014" && took < 20*time.Second && after == nil && one == 1 {
		fmt.Println("cancel ok")
	} else {
		fmt.Println("cancel failed", err, took, after)
	}
}
