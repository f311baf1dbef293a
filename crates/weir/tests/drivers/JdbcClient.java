// pgjdbc through Weir: run by crates/weir/tests/it/drivers.rs as
// `java -cp postgresql.jar JdbcClient.java URL CLIENTS`, URL as postgres://user:password@host:port/db.
//
// prepareThreshold=1 makes every statement a named server-side one (S_1, S_2, ... per
// connection), and clients prepare in different orders, so one name means different SQL on
// different clients. Batches, a refused duplicate, a portal fetched 100 rows at a time, COPY
// out and a query timeout (a CancelRequest). Exits non-zero, with the reason, on a wrong answer.
import java.net.URI;
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;
import org.postgresql.PGConnection;

public class JdbcClient {
    static String url;
    static Properties props = new Properties();

    public static void main(String[] args) throws Exception {
        URI u = new URI(args[0]);
        int n = Integer.parseInt(args[1]);
        url = "jdbc:postgresql://" + u.getHost() + ":" + u.getPort() + u.getPath();
        String[] userInfo = u.getUserInfo().split(":", 2);
        props.setProperty("user", userInfo[0]);
        props.setProperty("password", userInfo[1]);
        props.setProperty("prepareThreshold", "1");
        String version;
        try (Connection c = DriverManager.getConnection(url, props); Statement s = c.createStatement()) {
            s.execute("create table jdbc_t (id int primary key, name text)");
            version = c.getMetaData().getDriverVersion();
        }
        ExecutorService pool = Executors.newFixedThreadPool(n + 1);
        List<Future<?>> done = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            final int id = i;
            done.add(pool.submit(() -> { client(id); return null; }));
        }
        done.add(pool.submit(() -> { timeout(); return null; }));
        for (Future<?> f : done) f.get();
        pool.shutdown();
        System.out.println("pgjdbc " + version + ": " + n + " clients ok");
    }

    static void check(boolean ok, String what) {
        if (!ok) throw new AssertionError(what);
    }

    static void client(int i) throws Exception {
        try (Connection c = DriverManager.getConnection(url, props)) {
            String[] texts = {"select ?::int + 1", "select ?::int + 2"};
            if (i % 2 == 1) Collections.reverse(Arrays.asList(texts));
            PreparedStatement first = c.prepareStatement(texts[0]);
            PreparedStatement second = c.prepareStatement(texts[1]);
            int firstAdds = i % 2 == 1 ? 2 : 1;
            for (int k = 0; k < 100; k++) {
                first.setInt(1, k);
                try (ResultSet r = first.executeQuery()) { r.next(); check(r.getInt(1) == k + firstAdds, "first"); }
                second.setInt(1, k);
                try (ResultSet r = second.executeQuery()) { r.next(); check(r.getInt(1) == k + 3 - firstAdds, "second"); }
                if (k % 20 != 0) continue;
                int key = i * 100000 + k;
                c.setAutoCommit(false);
                try (PreparedStatement ins = c.prepareStatement("insert into jdbc_t values (?, ?)")) {
                    for (int j = 0; j < 10; j++) { ins.setInt(1, key + j); ins.setString(2, "b" + j); ins.addBatch(); }
                    check(ins.executeBatch().length == 10, "batch");
                }
                c.commit();
                try (PreparedStatement ins = c.prepareStatement("insert into jdbc_t values (?, ?)")) {
                    ins.setInt(1, key); ins.setString(2, "dup");
                    ins.executeUpdate();
                    throw new AssertionError("a duplicate key was accepted");
                } catch (SQLException e) {
                    check("23505".equals(e.getSQLState()), "sqlstate " + e.getSQLState());
                    c.rollback();
                }
                try (PreparedStatement q = c.prepareStatement("select generate_series(1, 1000)")) {
                    q.setFetchSize(100);
                    int rows = 0;
                    try (ResultSet r = q.executeQuery()) { while (r.next()) rows++; }
                    check(rows == 1000, "fetched " + rows);
                }
                c.commit();
                c.setAutoCommit(true);
                try (PreparedStatement q = c.prepareStatement("select count(*) from jdbc_t where id between ? and ?")) {
                    q.setInt(1, key); q.setInt(2, key + 9);
                    try (ResultSet r = q.executeQuery()) { r.next(); check(r.getInt(1) == 10, "count"); }
                }
                java.io.StringWriter out = new java.io.StringWriter();
                long copied = c.unwrap(PGConnection.class).getCopyAPI()
                    .copyOut("copy (select g from generate_series(1, 300) g) to stdout", out);
                check(copied == 300 && out.toString().startsWith("1\n2\n"), "copy out " + copied);
            }
        }
    }

    static void timeout() throws Exception {
        try (Connection c = DriverManager.getConnection(url, props); Statement s = c.createStatement()) {
            // The driver's query timeout sends one CancelRequest; a second thread sends more
            // in case that one came while the query still waited for a server connection.
            s.setQueryTimeout(1);
            Thread canceller = new Thread(() -> {
                try {
                    while (true) { Thread.sleep(1500); s.cancel(); }
                } catch (InterruptedException | SQLException e) { }
            });
            canceller.start();
            long t = System.nanoTime();
            try {
                s.execute("select pg_sleep(10)");
                throw new AssertionError("not cancelled");
            } catch (SQLException e) {
                check("57014".equals(e.getSQLState()), "sqlstate " + e.getSQLState());
            } finally {
                canceller.interrupt();
                canceller.join();
            }
            check(System.nanoTime() - t < 5_000_000_000L, "cancel took too long");
            s.setQueryTimeout(0);
            try (ResultSet r = s.executeQuery("select 7")) { r.next(); check(r.getInt(1) == 7, "after"); }
        }
    }
}
