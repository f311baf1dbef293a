//! TLS on both sides, against a PostgreSQL of its own with TLS on: psql (libpq) checks Weir's
//! certificate with `sslmode=verify-full` and requires SCRAM channel binding, Weir checks the
//! server's with `verify-full`, and PostgreSQL's own `pg_stat_ssl` says the server side is
//! encrypted. Wrong certificates and names fail with a clear error on each side.

use std::path::Path;
use std::process::Command;

use crate::common::*;

/// psql as `scram_user` with a libpq connection string; (success, stdout, stderr).
fn psql(pg: &PgServer, conninfo: &str, sql: &str) -> (bool, String, String) {
    let out = Command::new(pg.bindir.join("psql"))
        .args([
            "-X",
            "-Atq",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
            "-c",
            sql,
        ])
        .env("PGPASSWORD", SCRAM_USER.password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

fn config(text: &str) -> weir_config::Config {
    weir_config::from_toml_str(text, None)
        .unwrap_or_else(|p| panic!("test config invalid: {p}\n{text}"))
        .0
}

fn weir_toml(pg: &PgServer, host: &str, client_tls: &str, server_tls: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"off\"\n\
         {client_tls}\n{server_tls}\n\
         [databases.app]\nhost = \"{host}\"\nport = {port}\ndbname = \"postgres\"\n\
         [users.{u}]\npassword = \"{p}\"\n",
        port = pg.port,
        u = SCRAM_USER.user,
        p = SCRAM_USER.password,
    )
}

/// A PostgreSQL of its own with TLS on, its certificate (for "localhost" only) signed by a
/// test CA; with the directory for the test's PEM files.
fn tls_server() -> (PgServer, std::path::PathBuf, TestCa) {
    let pg = PgServer::start();
    let dir = pg.dir.join("tls");
    let pg_ca = TestCa::new(&dir, "pg-ca");
    let (pg_cert, pg_key) = pg_ca.issue("pg", &["localhost"]);
    pg.enable_tls(&pg_cert, &pg_key);
    (pg, dir, pg_ca)
}

const IS_SSL: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_verifies_weir_and_weir_verifies_the_server() {
    let (pg, dir, pg_ca) = tls_server();
    let weir_ca = TestCa::new(&dir, "weir-ca");
    let (cert, key) = weir_ca.issue("weir", &["localhost"]);

    let client_tls = format!(
        "[tls]\nmode = \"require\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        cert.display(),
        key.display()
    );
    let server_tls = format!(
        "[server_tls]\nmode = \"verify-full\"\nca_file = \"{}\"",
        pg_ca.cert.display()
    );
    let toml = weir_toml(&pg, "localhost", &client_tls, &server_tls);
    // Two workers: sessions move between them with their TLS state (see the pgbench run).
    let workers = weir_proxy::workers::Workers::start(2).expect("start a worker thread");
    let weir = weir_proxy::Proxy::start_on(config(&toml), workers.clone())
        .await
        .expect("start weir");
    let port = weir.local_addr().port();
    let conninfo = |host: &str, extra: &str| {
        format!(
            "host={host} port={port} dbname=app user={} {extra}",
            SCRAM_USER.user
        )
    };
    let verify = |ca: &Path| {
        format!(
            "sslmode=verify-full sslrootcert={} channel_binding=require",
            ca.display()
        )
    };

    // 1. Both sides verified, channel binding required by the client: works, and PostgreSQL
    // itself reports the connection from Weir as TLS.
    let (ok, out, err) = psql(&pg, &conninfo("localhost", &verify(&weir_ca.cert)), IS_SSL);
    assert!(ok, "psql verify-full through weir failed: {err}");
    assert_eq!(out, "t", "the server side is encrypted");

    // Volume over TLS on both sides: 8 MB of rows to psql, and pgbench with 8 clients in
    // the extended protocol each reading 200 kB per transaction (partial writes, records
    // split across reads). The 8 clients start on worker 0 and half of them move to worker 1
    // after a few transactions, with their TLS sessions; the TLS server connections move
    // between the workers at checkouts.
    let (ok, out, err) = psql(
        &pg,
        &conninfo("localhost", &verify(&weir_ca.cert)),
        "SELECT repeat('x', 1000000) FROM generate_series(1, 8)",
    );
    assert!(ok, "{err}");
    assert_eq!(out.len(), 8 * 1_000_000 + 7, "every byte arrived");
    let script = pg.dir.join("tls-bench.sql");
    std::fs::write(
        &script,
        "SELECT repeat('x', 20000) FROM generate_series(1, 10);\n",
    )
    .unwrap();
    let mut pgbench = Command::new(pg.bindir.join("pgbench"));
    pgbench
        .args(["-n", "-f", script.to_str().unwrap(), "-h", "localhost"])
        .args(["-p", &port.to_string(), "-U", SCRAM_USER.user])
        .args(["-c", "8", "-j", "2", "-t", "200", "-M", "extended", "app"])
        .env("PGPASSWORD", SCRAM_USER.password)
        .env("PGSSLMODE", "require");
    let pgbench = tokio::task::spawn_blocking(move || pgbench.output().unwrap());
    let mut most_on_worker_1 = 0;
    while !pgbench.is_finished() {
        most_on_worker_1 = most_on_worker_1.max(weir.shared().clients.on_worker(1));
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let out = pgbench.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("actually processed: 1600/1600"),
        "pgbench over TLS:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        most_on_worker_1 >= 3,
        "pgbench's clients moved to worker 1: at most {most_on_worker_1} there at a time"
    );

    // 2. The client's checks fail clearly: wrong host name, then a CA that did not sign Weir.
    let (ok, _, err) = psql(
        &pg,
        &conninfo("127.0.0.1", &verify(&weir_ca.cert)),
        "SELECT 1",
    );
    assert!(!ok);
    assert!(
        err.contains("does not match host name \"127.0.0.1\""),
        "psql: {err}"
    );
    let (ok, _, err) = psql(
        &pg,
        &conninfo("localhost", &verify(&pg_ca.cert)),
        "SELECT 1",
    );
    assert!(!ok);
    assert!(err.contains("certificate verify failed"), "psql: {err}");

    // 3. tls.mode = require: a plain connection is refused with 28000, naming the setting.
    let (ok, _, err) = psql(&pg, &conninfo("localhost", "sslmode=disable"), "SELECT 1");
    assert!(!ok);
    assert!(err.contains("weir requires TLS"), "psql: {err}");

    // 4. PostgreSQL 17's direct TLS (no SSLRequest, ALPN "postgresql"): the handshake
    // completes and Weir answers the startup packet with a SASL request inside TLS.
    let ca = weir_ca.cert.clone();
    let first = tokio::task::spawn_blocking(move || direct_tls_first_reply(port, &ca, true))
        .await
        .unwrap();
    assert_eq!(first, Some(b'R'), "AuthenticationSASL over direct TLS");
    // Without ALPN a direct connection is refused, as PostgreSQL 17 does (a connection made
    // for another protocol must not pass for PostgreSQL).
    let ca = weir_ca.cert.clone();
    let first = tokio::task::spawn_blocking(move || direct_tls_first_reply(port, &ca, false))
        .await
        .unwrap();
    assert_eq!(first, None, "direct TLS without ALPN is closed");

    // Garbage where the TLS handshake should be: that client is closed, the next is served.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        raw.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .unwrap();
        let mut answer = [0u8; 1];
        raw.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"S");
        raw.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5, 0xff, 0xff])
            .await
            .unwrap();
        let mut rest = Vec::new();
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            raw.read_to_end(&mut rest),
        )
        .await
        .expect("weir closes a broken handshake");
        assert!(r.is_err() || rest.len() < 64, "at most an alert: {rest:?}");
        let (ok, _, err) = psql(
            &pg,
            &conninfo("localhost", &verify(&weir_ca.cert)),
            "SELECT 1",
        );
        assert!(ok, "served after a broken handshake: {err}");
    }

    // 5. A reload reads the certificate files again: a certificate from a new CA replaces
    // the old one for new connections.
    let new_ca = TestCa::new(&dir, "weir-ca-2");
    let (c2, k2) = new_ca.issue("weir-2", &["localhost"]);
    std::fs::copy(&c2, &cert).unwrap();
    std::fs::copy(&k2, &key).unwrap();
    weir.shared()
        .apply(config(&toml))
        .expect("reload with renewed certificate");
    let (ok, _, err) = psql(
        &pg,
        &conninfo("localhost", &verify(&weir_ca.cert)),
        "SELECT 1",
    );
    assert!(!ok, "the old CA no longer verifies Weir");
    assert!(err.contains("certificate verify failed"), "psql: {err}");
    let (ok, out, err) = psql(&pg, &conninfo("localhost", &verify(&new_ca.cert)), IS_SSL);
    assert!(ok && out == "t", "psql with the new CA: {err}");
    weir.stop();
    workers.stop();
}

/// Opens TLS at once (no SSLRequest), with or without ALPN "postgresql", sends a
/// StartupMessage and returns the type byte of Weir's first reply (`None`: closed).
fn direct_tls_first_reply(port: u16, ca: &Path, alpn: bool) -> Option<u8> {
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    if alpn {
        cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(cfg), "localhost".try_into().unwrap())
            .unwrap();
    let sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut startup = Vec::new();
    let body = format!("user\0{}\0database\0app\0\0", SCRAM_USER.user);
    startup.extend_from_slice(&((8 + body.len()) as u32).to_be_bytes());
    startup.extend_from_slice(&196608u32.to_be_bytes());
    startup.extend_from_slice(body.as_bytes());
    tls.write_all(&startup).ok()?;
    let mut tag = [0u8; 1];
    tls.read_exact(&mut tag).ok()?;
    Some(tag[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_refuses_a_server_certificate_it_cannot_verify() {
    let (pg, dir, pg_ca) = tls_server();
    let other_ca = TestCa::new(&dir, "other-ca");
    let plain = format!(
        "host=127.0.0.1 dbname=app user={} sslmode=disable",
        SCRAM_USER.user
    );
    let server_tls = |mode: &str, ca: &Path| {
        format!(
            "[server_tls]\nmode = \"{mode}\"\nca_file = \"{}\"",
            ca.display()
        )
    };
    let run = async |host: &str, server: String| {
        let weir = start_weir(config(&weir_toml(&pg, host, "", &server))).await;
        let conninfo = format!("{plain} port={}", weir.local_addr().port());
        tokio::task::block_in_place(|| psql(&pg, &conninfo, IS_SSL))
    };

    // A CA that did not sign the server's certificate.
    let (ok, _, err) = run("localhost", server_tls("verify-full", &other_ca.cert)).await;
    assert!(!ok);
    assert!(
        err.contains("TLS with server localhost") && err.contains("UnknownIssuer"),
        "client sees: {err}"
    );
    // The right CA, but Weir connects by a name the certificate does not carry.
    let (ok, _, err) = run("127.0.0.1", server_tls("verify-full", &pg_ca.cert)).await;
    assert!(!ok);
    assert!(
        err.contains("certificate not valid for name \"127.0.0.1\""),
        "client sees: {err}"
    );
    // verify-ca checks the chain but not the name: works, and is encrypted.
    let (ok, out, err) = run("127.0.0.1", server_tls("verify-ca", &pg_ca.cert)).await;
    assert!(ok && out == "t", "verify-ca: {err}");
    // prefer encrypts when the server offers TLS; the default (disable) does not ask.
    let (ok, out, err) = run("127.0.0.1", "[server_tls]\nmode = \"prefer\"".into()).await;
    assert!(ok && out == "t", "prefer: {err}");
    let (ok, out, err) = run("127.0.0.1", String::new()).await;
    assert!(ok && out == "f", "disable: {err}");
    // require against a server without TLS (the shared one): refused, saying why.
    let shared = PgServer::shared();
    let weir = start_weir(config(&weir_toml(
        shared,
        "127.0.0.1",
        "",
        "[server_tls]\nmode = \"require\"",
    )))
    .await;
    let url = weir_url(&weir, SCRAM_USER, "app");
    let r = async { connect(&url).await?.simple_query("SELECT 1").await };
    let e = r.await.expect_err("no TLS on the server");
    assert!(
        format!("{e:?}").contains("does not accept TLS"),
        "client sees: {e:?}"
    );
}
