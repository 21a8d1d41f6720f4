// A pgjdbc client for the proxy's client tests (proxy/tests/clients.rs), run as a single
// source file (java -cp postgresql.jar Client.java URL USER PASSWORD). Prints one line per
// check: "connect ok" or "connect error <SQLSTATE>", "prepared <value>" for a server-side
// prepared statement (prepareThreshold=1), "cancel ok" when Statement.cancel() stopped a
// running pg_sleep (pgjdbc sends a CancelRequest with the session's key) and the session
// still works. With a fourth argument "writer SECS" it is an application's writer instead
// (e2e/tests/moves.rs): see writer.
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

    public static void main(String[] args) throws Exception {
        Properties p = new Properties();
        p.setProperty("user", args[1]);
        p.setProperty("password", args[2]);
        p.setProperty("prepareThreshold", "1");
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
