// A pgjdbc client for the proxy's client tests (proxy/tests/clients.rs), run as a single
// source file (java -cp postgresql.jar Client.java URL USER PASSWORD). Prints one line per
// check: "connect ok" or "connect error <SQLSTATE>", "prepared <value>" for a server-side
// prepared statement (prepareThreshold=1), "cancel ok" when Statement.cancel() stopped a
// running pg_sleep (pgjdbc sends a CancelRequest with the session's key) and the session
// still works. With a fourth argument "writer SECS" it is an application's writer instead
// (e2e/tests/moves.rs): see writer. With "ha" it is one of `loadtest ha`'s writers: see
// haWriter.
import java.sql.*;
import java.util.Properties;
import java.util.concurrent.*;

public class Client {
    // One session, an INSERT into client_writes every 20 ms for SECS seconds through a
    // server-side prepared statement; an error is counted and the session opened again, as a
    // pool would. Prints "error <SQLSTATE>" for each, then "writes <acknowledged> errors <n>".
    static void writer(String url, Properties p, int secs) throws Exception {
        long end = System.nanoTime() + secs * 1_000_000_000L;
        Connection c = null;
        PreparedStatement ps = null;
        int writes = 0, errors = 0;
        while (System.nanoTime() < end) {
            try {
                if (c == null) {
                    c = DriverManager.getConnection(url, p);
                    ps = c.prepareStatement("insert into client_writes (client, n) values (?, ?)");
                }
                ps.setString(1, "pgjdbc");
                ps.setInt(2, writes);
                ps.executeUpdate();
                writes++;
            } catch (SQLException e) {
                errors++;
                System.out.println("error " + e.getSQLState());
                try {
                    if (c != null) c.close();
                } catch (SQLException ignored) {
                    // already gone
                }
                c = null;
            }
            Thread.sleep(20);
        }
        System.out.println("writes " + writes + " errors " + errors);
    }

    // The SQLSTATE, else what the socket did (as loadtest's own clients name it).
    static String kind(SQLException e) {
        String state = e.getSQLState();
        // pgjdbc's own connection-level states (08001, 08006) say nothing of the cause.
        if (state != null && !state.startsWith("08")) return state;
        String text = String.valueOf(e.getMessage()).toLowerCase();
        if (text.contains("timeout") || text.contains("timed out")) return "timeout";
        if (text.contains("refused")) return "refused";
        return "closed";
    }

    // One of `loadtest ha`'s application writers: one session, an INSERT into lt_writes (id
    // from ID_BASE on, client CLIENT_NO) every THINK_MS until killed, through a server-side
    // prepared statement; an error closes the session, opened again at once (as a pool
    // would). Prints a line as each attempt ends: "connected <us>", "connect_error <kind>
    // <us>", "ok <id> <us>", "error <kind> <us>".
    static void haWriter(String url, Properties p) throws Exception {
        long base = Long.parseLong(System.getenv("ID_BASE"));
        int client = Integer.parseInt(System.getenv("CLIENT_NO"));
        long think = Long.parseLong(System.getenv().getOrDefault("THINK_MS", "10"));
        Connection c = null;
        PreparedStatement ps = null;
        long n = 0;
        while (true) {
            long t = System.nanoTime();
            if (c == null) {
                try {
                    c = DriverManager.getConnection(url, p);
                    ps = c.prepareStatement("insert into lt_writes (id, client) values (?, ?)");
                    System.out.println("connected " + (System.nanoTime() - t) / 1000);
                } catch (SQLException e) {
                    System.out.println("connect_error " + kind(e) + " " + (System.nanoTime() - t) / 1000);
                    System.out.flush();
                    c = null;
                    Thread.sleep(10);
                    continue;
                }
                t = System.nanoTime();
            }
            n++;
            try {
                ps.setLong(1, base + n);
                ps.setInt(2, client);
                ps.executeUpdate();
                System.out.println("ok " + (base + n) + " " + (System.nanoTime() - t) / 1000);
            } catch (SQLException e) {
                System.out.println("error " + kind(e) + " " + (System.nanoTime() - t) / 1000);
                try {
                    c.close();
                } catch (SQLException ignored) {
                    // already gone
                }
                c = null;
            }
            System.out.flush();
            Thread.sleep(think);
        }
    }

    public static void main(String[] args) throws Exception {
        Properties p = new Properties();
        p.setProperty("user", args[1]);
        p.setProperty("password", args[2]);
        p.setProperty("prepareThreshold", "1");
        if (args.length > 3 && args[3].equals("ha")) {
            haWriter(args[0], p);
            return;
        }
        if (args.length > 4 && args[3].equals("writer")) {
            writer(args[0], p, Integer.parseInt(args[4]));
            return;
        }
        Connection c;
        try {
            c = DriverManager.getConnection(args[0], p);
        } catch (SQLException e) {
            System.out.println("connect error " + e.getSQLState());
            return;
        }
        System.out.println("connect ok");
        try (PreparedStatement ps = c.prepareStatement("select ?::int + 1")) {
            for (int i = 0; i < 2; i++) {
                ps.setInt(1, 41);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    if (i == 1) System.out.println("prepared " + rs.getInt(1));
                }
            }
        }
        Statement st = c.createStatement();
        ExecutorService ex = Executors.newSingleThreadExecutor();
        Future<String> sleep = ex.submit(() -> {
            try {
                st.execute("select pg_sleep(30)");
                return "finished";
            } catch (SQLException e) {
                return e.getSQLState();
            }
        });
        long start = System.nanoTime();
        String outcome = null;
        while (outcome == null && System.nanoTime() - start < 20_000_000_000L) {
            Thread.sleep(200);
            st.cancel();
            try {
                outcome = sleep.get(200, TimeUnit.MILLISECONDS);
            } catch (TimeoutException e) {
                // not yet
            }
        }
        boolean works;
        try (ResultSet rs = c.createStatement().executeQuery("select 1")) {
            works = rs.next() && rs.getInt(1) == 1;
        }
        System.out.println("57014".equals(outcome) && works ? "cancel ok" : "cancel failed " + outcome);
        ex.shutdownNow();
        c.close();
    }
}
