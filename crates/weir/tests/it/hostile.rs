//! Hostile input against the `weir` binary: each bad connection gets an error and is closed;
//! the process keeps serving everyone else and never panics.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::common::*;
use crate::protocol::{read_msg, startup_packet};

/// Reads until the server closes; returns the SQLSTATE of the first ErrorResponse, if any.
fn error_then_close(sock: &mut TcpStream) -> Option<String> {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut code = None;
    while let Some((t, body)) = read_msg(sock) {
        if t == b'E' && code.is_none() {
            let e = weir_wire::ErrorResponse::decode(&body).unwrap();
            code = Some(e.code.to_string());
        }
    }
    // End of stream: the connection was closed.
    let mut rest = [0u8; 1];
    assert!(matches!(sock.read(&mut rest), Ok(0) | Err(_)));
    code
}

/// Logs in as the trust user over a raw socket.
fn login(port: u16, db: &str) -> TcpStream {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.write_all(&startup_packet(
        0,
        &[("user", TRUST_USER.user), ("database", db)],
    ))
    .unwrap();
    loop {
        let (t, _) = read_msg(&mut sock).expect("login");
        if t == b'Z' {
            return sock;
        }
        assert_ne!(t, b'E', "login failed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_and_others_carry_on() {
    let (pg, db) = shared_pg_database("hostile").await;
    let mut weir = WeirProcess::quick_start(&pg.url(TRUST_USER, &db), 2);
    let port = weir.port;
    // A well-behaved client holds a connection through all of it.
    let good = connect(&weir.url(TRUST_USER, &db)).await.unwrap();

    let db2 = db.clone();
    tokio::task::spawn_blocking(move || {
        // Random bytes instead of a startup packet.
        let mut rng_bytes = vec![0u8; 4096];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut rng_bytes);
        rng_bytes[..4].copy_from_slice(&[0, 0, 0x10, 0]); // a length in range, then garbage
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&rng_bytes).unwrap();
        let code = error_then_close(&mut s);
        assert!(
            matches!(code.as_deref(), Some("08P01" | "0A000")),
            "random bytes: {code:?}"
        );

        // A startup length field of 2^31.
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&[0x80, 0, 0, 0, 0, 3, 0, 0]).unwrap();
        assert_eq!(
            error_then_close(&mut s).as_deref(),
            Some("08P01"),
            "length 2^31"
        );

        // A 100 KB startup packet.
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut big = (100_000u32).to_be_bytes().to_vec();
        big.extend_from_slice(&[0, 3, 0, 0]);
        big.resize(100_000, b'a');
        let _ = s.write_all(&big);
        assert_eq!(
            error_then_close(&mut s).as_deref(),
            Some("08P01"),
            "100 KB startup packet"
        );

        // After login: a message type not allowed in this state (a password message).
        let mut s = login(port, &db2);
        s.write_all(&[b'p', 0, 0, 0, 7, b'p', b'w', 0]).unwrap();
        assert_eq!(
            error_then_close(&mut s).as_deref(),
            Some("08P01"),
            "PasswordMessage after login"
        );

        // After login: an unknown message type.
        let mut s = login(port, &db2);
        s.write_all(&[b'!', 0, 0, 0, 4]).unwrap();
        assert_eq!(
            error_then_close(&mut s).as_deref(),
            Some("08P01"),
            "unknown type"
        );

        // After login: a Query claiming 2^31 - 1 bytes.
        let mut s = login(port, &db2);
        s.write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff, b's']).unwrap();
        assert_eq!(
            error_then_close(&mut s).as_deref(),
            Some("54000"),
            "huge length"
        );

        // After login: a length below four.
        let mut s = login(port, &db2);
        s.write_all(&[b'Q', 0, 0, 0, 2]).unwrap();
        assert_eq!(
            error_then_close(&mut s).as_deref(),
            Some("08P01"),
            "length 2"
        );

        // After login: a malformed Parse (no terminators).
        let mut s = login(port, &db2);
        s.write_all(&[b'P', 0, 0, 0, 7, b'a', b'b', b'c']).unwrap();
        assert_eq!(
            error_then_close(&mut s).as_deref(),
            Some("08P01"),
            "malformed Parse"
        );

        // A truncated message, then the client vanishes.
        let mut s = login(port, &db2);
        s.write_all(&[b'Q', 0, 0, 0, 100, b's', b'e', b'l'])
            .unwrap();
        drop(s);

        // Half a startup packet, then silence: does not block anyone else.
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&[0, 0, 0, 40, 0, 3]).unwrap();
        std::mem::forget(s);
    })
    .await
    .unwrap();

    // Everyone else carries on.
    assert_eq!(
        good.query_one("select 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
    let fresh = connect(&weir.url(TRUST_USER, &db)).await.unwrap();
    assert_eq!(
        fresh
            .query_one("select 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
    assert!(weir.is_running(), "weir exited:\n{}", weir.log());
    let log = weir.log();
    assert!(!log.contains("panicked"), "weir panicked:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_query_is_refused_without_waiting_for_a_server() {
    let (pg, db) = shared_pg_database("hostile").await;
    let weir = WeirProcess::quick_start(&pg.url(TRUST_USER, &db), 1);
    let port = weir.port;
    // The pool's only server connection is held by an open transaction.
    let holder = connect(&weir.url(TRUST_USER, &db)).await.unwrap();
    holder.batch_execute("begin").await.unwrap();

    let db2 = db.clone();
    let waited = tokio::task::spawn_blocking(move || {
        let mut s = login(port, &db2);
        let started = std::time::Instant::now();
        // A Query whose text has no terminating NUL: refused at once, not after
        // query_wait_timeout (30 s here; the read gives up after 10).
        s.write_all(&[
            b'Q', 0, 0, 0, 12, b's', b'e', b'l', b'e', b'c', b't', b' ', b'1',
        ])
        .unwrap();
        assert_eq!(
            error_then_close(&mut s).as_deref(),
            Some("08P01"),
            "malformed Query with every server connection busy"
        );
        started.elapsed()
    })
    .await
    .unwrap();
    assert!(waited < Duration::from_secs(5), "answered after {waited:?}");

    holder.batch_execute("commit").await.unwrap();
    let n: i32 = holder.query_one("select 3", &[]).await.unwrap().get(0);
    assert_eq!(n, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_after_authentication_follows_authentication_ok() {
    let (pg, db) = shared_pg_database("hostile").await;
    let weir = WeirProcess::quick_start(&pg.url(TRUST_USER, &db), 1);
    let port = weir.port;
    tokio::task::spawn_blocking(move || {
        // A read-only parameter in the startup packet is refused once the login has passed
        // authentication: as from PostgreSQL, AuthenticationOk comes first (libpq would take
        // a bare error for a refused attempt and, with sslmode=prefer, try again).
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&startup_packet(
            0,
            &[
                ("user", TRUST_USER.user),
                ("database", &db),
                ("server_version", "1"),
            ],
        ))
        .unwrap();
        let (t, body) = read_msg(&mut s).expect("a reply");
        assert_eq!(
            (t, &body[..]),
            (b'R', &[0u8, 0, 0, 0][..]),
            "AuthenticationOk first"
        );
        assert_eq!(error_then_close(&mut s).as_deref(), Some("22023"));
    })
    .await
    .unwrap();
}
