//! The protocol relayed end to end: simple and extended queries, COPY, notices, errors,
//! startup negotiation, Unix sockets.

use std::io::{Read, Write};
use std::net::TcpStream;

use tokio_postgres::SimpleQueryMessage;

use crate::common::*;

fn simple_values(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_extended_and_errors() {
    let s = Setup::new("proto", 2, PoolMode::Transaction).await;
    let c = s.client().await;
    let rows = c
        .simple_query("select 1 as a; select 'x' as b")
        .await
        .unwrap();
    assert_eq!(
        simple_values(&rows),
        vec!["1", "x"],
        "multi-statement simple query returns both results"
    );
    let row = c.query_one("select $1::int + 1", &[&41i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    // A server error reaches the client with its SQLSTATE, and the session carries on.
    let e = c.simple_query("select 1/0").await.unwrap_err();
    assert_eq!(code(&e), "22012");
    let e = c
        .query("select nonexistent_column from pg_class", &[])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42703");
    assert_eq!(
        c.query_one("select 2", &[]).await.unwrap().get::<_, i32>(0),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_multi_statement_and_notices() {
    let s = Setup::new("psqlms", 2, PoolMode::Transaction).await;
    let out = tokio::task::spawn_blocking({
        let mut cmd = s.psql(SCRAM_USER);
        move || {
            cmd.args([
                "-At",
                "-c",
                "select 1; select 2; do $$ begin raise notice 'hello %', 7; end $$; select 3",
            ])
            .output()
            .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1\n2\nDO\n3");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOTICE:  hello 7"),
        "notice relayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_a_million_rows_in_and_out_unchanged() {
    let s = Setup::new("copy", 2, PoolMode::Transaction).await;
    let dir = std::env::temp_dir().join(format!("weir-copy-{}", s.db));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.tsv");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
        for i in 0..1_000_000u32 {
            writeln!(
                f,
                "{i}\tpayload {} with tab-free text {}",
                i.wrapping_mul(2654435761),
                i % 977
            )
            .unwrap();
        }
    }
    let output = dir.join("out.tsv");
    let script = format!(
        "create table t (id int primary key, payload text);\n\
         \\copy t from '{}'\n\
         \\copy (select * from t order by id) to '{}'\n",
        input.display(),
        output.display()
    );
    let script_file = dir.join("script.sql");
    std::fs::write(&script_file, script).unwrap();
    let out = tokio::task::spawn_blocking({
        let mut cmd = s.psql(SCRAM_USER);
        move || {
            cmd.args([
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-f",
                script_file.to_str().unwrap(),
            ])
            .output()
            .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (
        std::fs::read(&input).unwrap(),
        std::fs::read(&output).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    assert!(a == b, "COPY out differs from COPY in");
    assert_eq!(s.sql("select count(*) from t"), "1000000");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_through_extended_driver() {
    use futures_util::{SinkExt, StreamExt};
    let s = Setup::new("copyext", 1, PoolMode::Transaction).await;
    let c = s.client().await;
    c.batch_execute("create table c (a int, b text)")
        .await
        .unwrap();
    let sink = c.copy_in("copy c from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    for i in 0..1000 {
        sink.send(bytes::Bytes::from(format!("{i}\trow {i}\n")))
            .await
            .unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 1000);
    let stream = c
        .copy_out("copy (select a from c order by a) to stdout")
        .await
        .unwrap();
    let chunks: Vec<_> = stream.collect().await;
    let text: String = chunks
        .into_iter()
        .map(|c| String::from_utf8(c.unwrap().to_vec()).unwrap())
        .collect();
    assert_eq!(text.lines().count(), 1000);
    // A failed COPY leaves the connection usable.
    let e = c
        .simple_query("copy c from stdin with (format csv, header bogus)")
        .await
        .unwrap_err();
    assert!(e.code().is_some());
    assert_eq!(
        c.query_one("select count(*) from c", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        1000
    );
}

/// Reads one backend message from a raw socket.
pub fn read_msg(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 5];
    s.read_exact(&mut h).ok()?;
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).ok()?;
    Some((h[0], body))
}

/// A StartupMessage for protocol 3.`minor` with the given parameters.
pub fn startup_packet(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&3u16.to_be_bytes());
    body.extend_from_slice(&minor.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_request_declined_and_newer_minor_negotiated() {
    let s = Setup::new("nego", 1, PoolMode::Transaction).await;
    let addr = s.weir.local_addr();
    let db = s.db.clone();
    tokio::task::spawn_blocking(move || {
        let mut sock = TcpStream::connect(addr).unwrap();
        sock.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .unwrap();
        let mut answer = [0u8; 1];
        sock.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"N", "SSLRequest is declined until TLS lands");
        sock.write_all(&startup_packet(
            2,
            &[
                ("user", TRUST_USER.user),
                ("database", &db),
                ("_pq_.future", "1"),
            ],
        ))
        .unwrap();
        let (t, body) = read_msg(&mut sock).unwrap();
        assert_eq!(
            t, b'v',
            "NegotiateProtocolVersion, not a dropped connection"
        );
        assert_eq!(
            &body[..8],
            &[0, 0, 0, 0, 0, 0, 0, 1],
            "minor 0, one option unrecognised"
        );
        assert_eq!(&body[8..], b"_pq_.future\0");
        let mut seen = Vec::new();
        loop {
            let (t, _) = read_msg(&mut sock).expect("login continues");
            seen.push(t);
            if t == b'Z' {
                break;
            }
        }
        assert_eq!(seen.first(), Some(&b'R'));
        assert!(seen.contains(&b'K') && seen.contains(&b'S'));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_listener() {
    let dir = std::env::temp_dir().join(format!("weir-sock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d2 = dir.clone();
    let s = Setup::with_config("unixsock", move |pg, db| {
        let mut c = weir_config(pg, db, 1, PoolMode::Transaction);
        c.proxy.unix_socket_dir = Some(d2);
        c
    })
    .await;
    let port = s.weir.local_addr().port();
    let url = format!(
        "host={} port={port} user={} password={} dbname={}",
        dir.display(),
        SCRAM_USER.user,
        SCRAM_USER.password,
        s.db
    );
    let c = connect(&url).await.expect("connect over the Unix socket");
    assert_eq!(
        c.query_one("select 5", &[]).await.unwrap().get::<_, i32>(0),
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_listen_leaves_no_listener_behind() {
    let (pg, db) = shared_pg_database("failedlisten").await;
    let port = free_port();
    let mut config = weir_config(pg, &db, 1, PoolMode::Transaction);
    config.proxy.listen = vec![format!("127.0.0.1:{port}").parse().unwrap()];
    // The TCP address binds; the Unix socket's directory does not exist.
    config.proxy.unix_socket_dir = Some(std::env::temp_dir().join("weir-no-such-dir/sub"));
    let err = match weir_proxy::Proxy::start(config).await {
        Ok(_) => panic!("a Unix socket in a missing directory cannot be listened on"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("cannot listen on"), "{err}");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the TCP listener bound before the failure is closed, not left accepting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_and_many_rows_stream() {
    let s = Setup::new("bigrows", 1, PoolMode::Transaction).await;
    let c = s.client().await;
    let row = c
        .query_one("select repeat('y', 5000000)", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0).len(), 5_000_000);
    let rows = c
        .query("select g from generate_series(1, 200000) g", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 200_000);
    let big = "z".repeat(3_000_000);
    let back = c
        .query_one("select length($1::text)", &[&big])
        .await
        .unwrap();
    assert_eq!(
        back.get::<_, i32>(0),
        3_000_000,
        "a large Bind parameter arrives whole"
    );
    // The same inside a transaction, where the server connection is already attached, on a
    // fresh connection (whose buffers have not grown yet).
    let c = s.client().await;
    c.batch_execute("begin").await.unwrap();
    let back = c
        .query_one("select length($1::text)", &[&big])
        .await
        .unwrap();
    assert_eq!(
        back.get::<_, i32>(0),
        3_000_000,
        "a large Bind while a server is attached"
    );
    let rows = c
        .simple_query(&format!("select length('{big}')"))
        .await
        .unwrap();
    assert_eq!(
        simple_values(&rows),
        vec!["3000000"],
        "a large Query while a server is attached"
    );
    c.batch_execute("commit").await.unwrap();
}

/// A pipelining client (psycopg's pipeline mode) can read the server's error before it sends
/// the Sync that ends its batch, and send more of the batch in between. PostgreSQL skips all
/// of it until that Sync; Weir must expect no replies for it, or the server's ReadyForQuery
/// looks like a broken protocol and the client is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_after_an_error_and_before_the_sync_are_skipped_as_postgres_does() {
    let s = Setup::new("skipsync", 1, PoolMode::Transaction).await;
    let addr = s.weir.local_addr();
    let db = s.db.clone();
    tokio::task::spawn_blocking(move || {
        let msg = |t: u8, body: &[u8]| {
            let mut m = vec![t];
            m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
            m.extend_from_slice(body);
            m
        };
        let parse = |name: &str, sql: &str| {
            msg(
                b'P',
                &[name.as_bytes(), &[0], sql.as_bytes(), &[0, 0, 0]].concat(),
            )
        };
        let bind = |name: &str| {
            msg(
                b'B',
                &[&[0], name.as_bytes(), &[0, 0, 0, 0, 0, 0, 0]].concat(),
            )
        };
        let execute = msg(b'E', &[0, 0, 0, 0, 0]);
        let read_until = |sock: &mut TcpStream, end: u8| {
            let mut seen = Vec::new();
            loop {
                let (t, _) = read_msg(sock).expect("the connection stays open");
                seen.push(t);
                if t == end {
                    return seen;
                }
            }
        };
        let mut sock = TcpStream::connect(addr).unwrap();
        sock.write_all(&startup_packet(
            0,
            &[("user", TRUST_USER.user), ("database", &db)],
        ))
        .unwrap();
        read_until(&mut sock, b'Z');
        // The first part of a batch, flushed: its error comes back before any Sync.
        let first = [
            parse("s1", "select 1/0"),
            bind("s1"),
            execute.clone(),
            msg(b'H', &[]),
        ];
        sock.write_all(&first.concat()).unwrap();
        // (Planning folds 1/0, so the Bind is what fails.)
        assert_eq!(read_until(&mut sock, b'E'), b"1E");
        // The rest of it, then the Sync: only the ReadyForQuery answers.
        let rest = [
            parse("s2", "select 2"),
            bind("s2"),
            execute.clone(),
            msg(b'S', &[]),
        ];
        sock.write_all(&rest.concat()).unwrap();
        assert_eq!(read_until(&mut sock, b'Z'), b"Z");
        // The client carries on.
        sock.write_all(&msg(b'Q', b"select 3\0")).unwrap();
        assert_eq!(read_until(&mut sock, b'Z'), b"TDCZ");
    })
    .await
    .unwrap();
}

/// sqlx's unkept statements: Parse and Describe of the unnamed statement in one transaction,
/// Bind and Execute in the next. In transaction mode the next may run where another client's
/// unnamed statement sits (here, with a pool of one, always): the client's own must run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamed_statement_bound_in_a_later_transaction_runs_the_clients_own_text() {
    let s = Setup::new("unnamedlater", 1, PoolMode::Transaction).await;
    let addr = s.weir.local_addr();
    let db = s.db.clone();
    tokio::task::spawn_blocking(move || {
        let msg = |t: u8, body: &[u8]| {
            let mut m = vec![t];
            m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
            m.extend_from_slice(body);
            m
        };
        let parse = |sql: &str| msg(b'P', &[&[0], sql.as_bytes(), &[0, 0, 0]].concat());
        // The unnamed statement, one text parameter.
        let bind = |value: &str| {
            let len = (value.len() as u32).to_be_bytes();
            msg(
                b'B',
                &[&[0, 0, 0, 0, 0, 1], &len[..], value.as_bytes(), &[0, 0]].concat(),
            )
        };
        let describe = msg(b'D', b"S\0");
        let tail = [msg(b'E', &[0, 0, 0, 0, 0]), msg(b'S', &[])].concat();
        // The tags up to ReadyForQuery, the first DataRow's value and the error's SQLSTATE.
        let exchange = |sock: &mut TcpStream, out: &[u8]| {
            sock.write_all(out).unwrap();
            let (mut tags, mut value, mut code) = (Vec::new(), None, None);
            loop {
                let (t, body) = read_msg(sock).expect("the connection stays open");
                tags.push(t);
                match t {
                    b'D' if value.is_none() => {
                        value = Some(String::from_utf8(body[6..].to_vec()).unwrap());
                    }
                    b'E' => {
                        // Fields: a type byte and a NUL-ended string each.
                        code = body
                            .split(|b| *b == 0)
                            .find_map(|f| f.strip_prefix(b"C"))
                            .map(|c| String::from_utf8(c.to_vec()).unwrap());
                    }
                    b'Z' => return (String::from_utf8(tags).unwrap(), value, code),
                    _ => {}
                }
            }
        };
        let login = || {
            let mut sock = TcpStream::connect(addr).unwrap();
            sock.write_all(&startup_packet(
                0,
                &[("user", TRUST_USER.user), ("database", &db)],
            ))
            .unwrap();
            while read_msg(&mut sock).expect("login").0 != b'Z' {}
            sock
        };
        let (mut a, mut b) = (login(), login());
        let prepare = [parse("select $1::int + 1"), describe, msg(b'S', &[])].concat();
        assert_eq!(exchange(&mut a, &prepare).0, "1tTZ");
        // Another client's unnamed statement takes the server's place between the two.
        let other = [parse("select $1::int * 100"), bind("5"), tail.clone()].concat();
        assert_eq!(
            exchange(&mut b, &other),
            ("12DCZ".into(), Some("500".into()), None)
        );
        let run = [bind("5"), tail.clone()].concat();
        assert_eq!(
            exchange(&mut a, &run),
            ("2DCZ".into(), Some("6".into()), None)
        );
        assert_eq!(
            exchange(&mut a, &run),
            ("2DCZ".into(), Some("6".into()), None)
        );
        // A simple Query drops the unnamed statement: then PostgreSQL's own error.
        assert_eq!(exchange(&mut a, &msg(b'Q', b"select 1\0")).0, "TDCZ");
        assert_eq!(exchange(&mut b, &other).1, Some("500".into()));
        let refused = exchange(&mut a, &run);
        assert_eq!(
            (refused.0.as_str(), refused.2.as_deref()),
            ("EZ", Some("26000"))
        );
        // The other client's own, kept too, is prepared again for it.
        let again = exchange(&mut b, &[bind("7"), tail.clone()].concat());
        assert_eq!(again, ("2DCZ".into(), Some("700".into()), None));
    })
    .await
    .unwrap();
}

/// A COPY FROM STDIN started with the extended protocol that fails on a bad row: the server
/// then skips the client's messages until a Sync after the COPY (the one sent after Execute
/// was ignored), so the connection is not free until that Sync, and another client that gets
/// it next is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_extended_copy_in_holds_its_connection_until_the_clients_sync() {
    use futures_util::SinkExt;
    let s = Setup::new("copyextfail", 1, PoolMode::Transaction).await;
    s.sql("create table n (a int); grant all on n to public");
    let c = s.client().await;
    let other = s.client().await;
    let sink = c.copy_in("copy n from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut failed = None;
    for row in ["1\n", "not a number\n", "3\n"] {
        if let Err(e) = sink.send(bytes::Bytes::from(row)).await {
            failed = Some(e);
            break;
        }
        // Let the server's error come back before the client ends the COPY.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let e = match failed {
        Some(e) => e,
        None => sink.finish().await.unwrap_err(),
    };
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_TEXT_REPRESENTATION),
        "{e}"
    );
    let within = |f| tokio::time::timeout(std::time::Duration::from_secs(10), f);
    let n: i64 = within(other.query_one("select count(*) from n", &[]))
        .await
        .expect("another client is served")
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let one: i32 = within(c.query_one("select 1", &[]))
        .await
        .expect("the client carries on")
        .unwrap()
        .get(0);
    assert_eq!(one, 1);
}
