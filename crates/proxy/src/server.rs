//! A connection to a PostgreSQL server: opening it (TCP or Unix socket, login with
//! SCRAM-SHA-256, md5, cleartext or trust), and the state Weir tracks on it.

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend as pgfront;
use tokio::net::{TcpStream, UnixStream};
use weir_config::ServerLogin;
use weir_wire::backend::{self, Authentication, BackendKey, ParameterStatus, TxStatus};
use weir_wire::frontend::Startup;
use weir_wire::{ErrorResponse, frame};

use crate::params::ServerParams;
use crate::prepared::ServerStatements;
use crate::stream::{PeekState, Stream};

/// Where a server listens; kept to send CancelRequests there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    Tcp { host: String, port: u16 },
    Unix(std::path::PathBuf),
}

impl ServerAddr {
    pub fn of(login: &ServerLogin) -> ServerAddr {
        if login.host.starts_with('/') {
            ServerAddr::Unix(
                std::path::Path::new(&login.host).join(format!(".s.PGSQL.{}", login.port)),
            )
        } else {
            ServerAddr::Tcp {
                host: login.host.clone(),
                port: login.port,
            }
        }
    }

    pub async fn connect(&self) -> io::Result<Stream> {
        match self {
            ServerAddr::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            ServerAddr::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).await?)),
        }
    }
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            ServerAddr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Why opening a server connection failed. Says which side failed and whether trying again
/// might help.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot reach server {addr}: {source}")]
    Unreachable { addr: String, source: io::Error },
    #[error("server {addr} did not complete login within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("server {addr} refused the login: {error}")]
    Rejected { addr: String, error: ErrorResponse },
    #[error("server {addr}: {message}")]
    Protocol { addr: String, message: String },
    #[error("server {addr} closed the connection during login: {message}")]
    LostDuringLogin { addr: String, message: String },
    #[error("TLS with server {addr} failed: {message}")]
    Tls { addr: String, message: String },
    #[error("cannot log in to server {addr} as \"{user}\": {message}")]
    Credentials {
        addr: String,
        user: String,
        message: String,
    },
}

impl ServerError {
    /// True when nothing was started on the server, so retrying cannot run anything twice.
    /// A copy of this error (I/O causes are copied by kind and message), to answer from memory.
    pub fn repeat(&self) -> ServerError {
        match self {
            ServerError::Unreachable { addr, source } => ServerError::Unreachable {
                addr: addr.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            ServerError::Timeout { addr, timeout } => ServerError::Timeout {
                addr: addr.clone(),
                timeout: *timeout,
            },
            ServerError::Rejected { addr, error } => ServerError::Rejected {
                addr: addr.clone(),
                error: error.clone(),
            },
            ServerError::Protocol { addr, message } => ServerError::Protocol {
                addr: addr.clone(),
                message: message.clone(),
            },
            ServerError::LostDuringLogin { addr, message } => ServerError::LostDuringLogin {
                addr: addr.clone(),
                message: message.clone(),
            },
            ServerError::Tls { addr, message } => ServerError::Tls {
                addr: addr.clone(),
                message: message.clone(),
            },
            ServerError::Credentials {
                addr,
                user,
                message,
            } => ServerError::Credentials {
                addr: addr.clone(),
                user: user.clone(),
                message: message.clone(),
            },
        }
    }

    /// Nothing of a client's is ever sent during login, so any failure there is safe to retry;
    /// the question is only whether retrying can help. A server that is down, starting,
    /// shutting down, full, or that dropped the connection mid-login may accept the next
    /// attempt; a wrong password or an unknown database will not.
    pub fn is_transient(&self) -> bool {
        match self {
            ServerError::Unreachable { .. }
            | ServerError::Timeout { .. }
            | ServerError::LostDuringLogin { .. } => true,
            ServerError::Rejected { error, .. } => {
                matches!(
                    &error.code.0,
                    b"57P03" | b"53300" | b"57P01" | b"57P02" | b"57P04"
                ) || error.code.0.starts_with(b"08")
            }
            _ => false,
        }
    }
}

/// An open, logged-in server connection.
#[derive(Debug)]
pub struct ServerConn {
    pub stream: Stream,
    /// Bytes read but not yet relayed.
    pub rbuf: BytesMut,
    pub key: BackendKey,
    pub addr: std::sync::Arc<ServerAddr>,
    pub state: ServerState,
    pub id: u64,
    /// The worker whose runtime the socket is registered with ([`crate::workers`]).
    pub home: usize,
    /// Registered here a moment ago: the next write goes out without waiting for Tokio to
    /// record writability (see [`Stream::send_unready`]).
    pub just_moved: bool,
    /// When this connection retires: its opening plus the pool's lifetime less up to 25% at
    /// random, so connections opened together are not all replaced together. `None`: no
    /// limit.
    pub expires: Option<std::time::Instant>,
    /// Held for the connection's life when its database caps connections.
    pub db_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Its pool's generation when it opened (older ones are closed at release).
    pub generation: u64,
    /// Its entry in the pool's registry (SHOW SERVERS), removed when it closes.
    pub registration: Option<crate::metrics::Registered>,
}

/// What Weir tracks on a server connection, apart from its socket (so the relay can update
/// it while reading the socket's buffer).
#[derive(Debug)]
pub struct ServerState {
    pub params: ServerParams,
    pub statements: ServerStatements,
    /// Set when the connection must not be reused (FATAL seen, protocol confusion).
    pub broken: bool,
}

/// Read buffer size for server connections.
pub const READ_CHUNK: usize = 64 * 1024;

impl ServerConn {
    /// Opens and logs in, all within `timeout`.
    pub async fn connect(
        login: &ServerLogin,
        fetched: Option<&Fetched>,
        tls: &crate::tls::TlsSetup,
        timeout: Duration,
        statement_cache: usize,
        id: u64,
    ) -> Result<ServerConn, ServerError> {
        let addr = ServerAddr::of(login);
        match tokio::time::timeout(
            timeout,
            Self::connect_inner(login, fetched, tls, addr.clone(), statement_cache, id),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ServerError::Timeout {
                addr: addr.to_string(),
                timeout,
            }),
        }
    }

    async fn connect_inner(
        login: &ServerLogin,
        fetched: Option<&Fetched>,
        tls: &crate::tls::TlsSetup,
        addr: ServerAddr,
        statement_cache: usize,
        id: u64,
    ) -> Result<ServerConn, ServerError> {
        let a = addr.to_string();
        let stream = addr
            .connect()
            .await
            .map_err(|source| ServerError::Unreachable {
                addr: a.clone(),
                source,
            })?;
        let mut stream = tls
            .connect(stream, &login.host)
            .await
            .map_err(|e| match e {
                crate::tls::ConnectError::Lost(message) => ServerError::LostDuringLogin {
                    addr: a.clone(),
                    message,
                },
                crate::tls::ConnectError::Refused(message) => ServerError::Tls {
                    addr: a.clone(),
                    message,
                },
            })?;
        let io_err = |e: io::Error| ServerError::LostDuringLogin {
            addr: a.clone(),
            message: e.to_string(),
        };
        let mut out = BytesMut::with_capacity(256);
        Startup {
            minor: 0,
            params: vec![
                ("user".into(), login.user.clone()),
                ("database".into(), login.dbname.clone()),
            ],
        }
        .encode(&mut out);
        stream.write_all(&out).await.map_err(io_err)?;

        let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
        let mut scram: Option<ScramSha256> = None;
        let mut keys_client: Option<weir_wire::scram::ScramKeysClient> = None;
        let mut params = ServerParams::default();
        let mut key = None;
        let protocol = |m: &str| ServerError::Protocol {
            addr: a.clone(),
            message: m.to_string(),
        };
        let password =
            || -> Result<&str, ServerError> {
                login.password.as_ref().map(|p| p.expose()).ok_or_else(|| {
                    ServerError::Credentials {
                        addr: a.clone(),
                        user: login.user.clone(),
                        message: "the server asks for a password and none is configured".into(),
                    }
                })
            };
        loop {
            let (tag, body) = loop {
                if let Some((h, body)) =
                    frame::complete(&rbuf, 1 << 20).map_err(|e| protocol(&e.to_string()))?
                {
                    let len = h.total_len();
                    let body = body.to_vec();
                    rbuf.advance(len);
                    break (h.tag, body);
                }
                if stream.read_buf(&mut rbuf).await.map_err(io_err)? == 0 {
                    return Err(ServerError::LostDuringLogin {
                        addr: a.clone(),
                        message: "end of stream".into(),
                    });
                }
            };
            out.clear();
            match tag {
                backend::tag::AUTHENTICATION => {
                    match Authentication::decode(&body).map_err(|e| protocol(&e.to_string()))? {
                        Authentication::Ok => {}
                        Authentication::CleartextPassword => {
                            let pw = password()?;
                            if pw.starts_with("md5") || pw.starts_with("SCRAM-SHA-256$") {
                                return Err(credentials(
                                    &a,
                                    login,
                                    "the server wants a plain password, only a hash is configured",
                                ));
                            }
                            pgfront::password_message(pw.as_bytes(), &mut out)
                                .map_err(|e| protocol(&e.to_string()))?;
                        }
                        Authentication::Md5Password { salt } => {
                            let pw = match (&login.password, fetched) {
                                (None, Some(Fetched::Md5(hash))) => hash.as_str(),
                                _ => password()?,
                            };
                            let stored = if weir_wire::md5::is_stored_secret(pw) {
                                pw.to_string()
                            } else if pw.starts_with("SCRAM-SHA-256$") {
                                return Err(credentials(
                                    &a,
                                    login,
                                    "the server wants md5, only a SCRAM verifier is configured",
                                ));
                            } else {
                                weir_wire::md5::stored_secret(&login.user, pw.as_bytes())
                            };
                            let resp = weir_wire::md5::expected_response(&stored, salt);
                            pgfront::password_message(resp.as_bytes(), &mut out)
                                .map_err(|e| protocol(&e.to_string()))?;
                        }
                        Authentication::Sasl { mechanisms } => {
                            if !mechanisms.contains(&&b"SCRAM-SHA-256"[..]) {
                                return Err(protocol("no supported SASL mechanism offered"));
                            }
                            if let (
                                None,
                                Some(Fetched::Scram {
                                    client_key,
                                    verifier,
                                }),
                            ) = (&login.password, fetched)
                            {
                                let c = weir_wire::scram::ScramKeysClient::new(
                                    *client_key,
                                    verifier.clone(),
                                );
                                pgfront::sasl_initial_response(
                                    "SCRAM-SHA-256",
                                    &c.client_first(),
                                    &mut out,
                                )
                                .map_err(|e| protocol(&e.to_string()))?;
                                keys_client = Some(c);
                                stream.write_all(&out).await.map_err(io_err)?;
                                continue;
                            }
                            let pw = password()?;
                            if pw.starts_with("SCRAM-SHA-256$")
                                || weir_wire::md5::is_stored_secret(pw)
                            {
                                return Err(credentials(
                                    &a,
                                    login,
                                    "the server wants SCRAM, which needs the plain password",
                                ));
                            }
                            let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                            pgfront::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                                .map_err(|e| protocol(&e.to_string()))?;
                            scram = Some(s);
                        }
                        Authentication::SaslContinue(data) if keys_client.is_some() => {
                            let c = keys_client.as_mut().expect("checked");
                            let fin = c.server_first(data).map_err(|e| {
                                credentials(
                                    &a,
                                    login,
                                    &format!("SCRAM with the fetched verifier: {e}"),
                                )
                            })?;
                            pgfront::sasl_response(&fin, &mut out)
                                .map_err(|e| protocol(&e.to_string()))?;
                        }
                        Authentication::SaslFinal(data) if keys_client.is_some() => {
                            let c = keys_client.as_ref().expect("checked");
                            c.server_final(data).map_err(|e| {
                                protocol(&format!("server SCRAM signature invalid: {e}"))
                            })?;
                        }
                        Authentication::SaslContinue(data) => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| protocol("unexpected SASL continue"))?;
                            s.update(data)
                                .map_err(|e| protocol(&format!("SCRAM: {e}")))?;
                            pgfront::sasl_response(s.message(), &mut out)
                                .map_err(|e| protocol(&e.to_string()))?;
                        }
                        Authentication::SaslFinal(data) => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| protocol("unexpected SASL final"))?;
                            s.finish(data).map_err(|e| {
                                protocol(&format!("server SCRAM signature invalid: {e}"))
                            })?;
                        }
                        Authentication::Other(code) => {
                            return Err(protocol(&format!(
                                "unsupported authentication request {code}"
                            )));
                        }
                    }
                    if !out.is_empty() {
                        stream.write_all(&out).await.map_err(io_err)?;
                    }
                }
                backend::tag::PARAMETER_STATUS => {
                    let p = ParameterStatus::decode(&body).map_err(|e| protocol(&e.to_string()))?;
                    params.reported.set(
                        &String::from_utf8_lossy(p.name),
                        &String::from_utf8_lossy(p.value),
                    );
                }
                backend::tag::BACKEND_KEY_DATA => {
                    key = Some(BackendKey::decode(&body).map_err(|e| protocol(&e.to_string()))?);
                }
                backend::tag::READY_FOR_QUERY => {
                    TxStatus::decode(&body).map_err(|e| protocol(&e.to_string()))?;
                    let key = key.ok_or_else(|| protocol("no BackendKeyData"))?;
                    return Ok(ServerConn {
                        stream,
                        rbuf,
                        key,
                        addr: std::sync::Arc::new(addr),
                        state: ServerState {
                            params,
                            statements: ServerStatements::new(statement_cache),
                            broken: false,
                        },
                        id,
                        home: crate::workers::current(),
                        just_moved: false,
                        expires: None,
                        db_permit: None,
                        generation: 0,
                        registration: None,
                    });
                }
                backend::tag::ERROR_RESPONSE => {
                    let error = ErrorResponse::decode(&body)
                        .ok_or_else(|| protocol("malformed ErrorResponse"))?;
                    return Err(ServerError::Rejected {
                        addr: a.clone(),
                        error,
                    });
                }
                backend::tag::NOTICE_RESPONSE | backend::tag::NEGOTIATE_PROTOCOL_VERSION => {}
                other => {
                    return Err(protocol(&format!(
                        "unexpected message '{}' during login",
                        other as char
                    )));
                }
            }
        }
    }

    /// A non-blocking look at an idle connection: closed by the server, or sent something
    /// unprompted (a FATAL before a shutdown, say)? Either way it must not be used.
    pub fn is_alive(&mut self) -> bool {
        if self.state.broken || !self.rbuf.is_empty() {
            return false;
        }
        match self.stream.peek_state() {
            PeekState::Quiet => true,
            // Often stale readiness; otherwise bytes the server sent unprompted (a FATAL whose
            // FIN is still on its way). A read tells which, and clears stale readiness.
            PeekState::Readable => {
                self.rbuf.reserve(256);
                matches!(self.stream.try_read_buf(&mut self.rbuf), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

impl ServerConn {
    /// Runs `sql` as a simple query on a connection no client is using and reads to
    /// ReadyForQuery. Any error fails it, so the caller closes the connection rather than
    /// trust it.
    pub async fn run(&mut self, sql: &str) -> io::Result<TxStatus> {
        let mut out = BytesMut::new();
        weir_wire::frontend::Query {
            sql: sql.as_bytes(),
        }
        .encode(&mut out);
        self.exchange(&out, sql, None).await
    }

    /// Runs `sql` with text parameters in the extended protocol and returns its rows, each
    /// column as text or NULL. For Weir's own queries (auth_query), not clients'.
    pub async fn query(
        &mut self,
        sql: &str,
        params: &[&str],
    ) -> io::Result<Vec<Vec<Option<String>>>> {
        let mut out = BytesMut::new();
        let bad = |e: io::Error| io::Error::other(format!("cannot encode `{sql}`: {e}"));
        pgfront::parse("", sql, std::iter::empty(), &mut out).map_err(bad)?;
        pgfront::bind(
            "",
            "",
            std::iter::empty::<i16>(),
            params.iter(),
            |p, buf| {
                buf.extend_from_slice(p.as_bytes());
                Ok(postgres_protocol::IsNull::No)
            },
            std::iter::empty::<i16>(),
            &mut out,
        )
        .map_err(|e| match e {
            pgfront::BindError::Conversion(e) => io::Error::other(e.to_string()),
            pgfront::BindError::Serialization(e) => bad(e),
        })?;
        pgfront::execute("", 0, &mut out).map_err(bad)?;
        pgfront::sync(&mut out);
        let mut rows = Vec::new();
        self.exchange(&out, sql, Some(&mut rows)).await?;
        Ok(rows)
    }

    /// Sends `out` and reads to ReadyForQuery, collecting DataRows into `rows` if given.
    async fn exchange(
        &mut self,
        out: &[u8],
        sql: &str,
        mut rows: Option<&mut Vec<Vec<Option<String>>>>,
    ) -> io::Result<TxStatus> {
        self.stream.write_all(out).await?;
        let mut failed = None;
        loop {
            while let Some((h, body)) =
                frame::complete(&self.rbuf, u32::MAX).map_err(io::Error::other)?
            {
                let len = h.total_len();
                match h.tag {
                    backend::tag::READY_FOR_QUERY => {
                        let st = TxStatus::decode(body).map_err(io::Error::other)?;
                        self.rbuf.advance(len);
                        return match failed {
                            Some(e) => Err(io::Error::other(format!("`{sql}` failed: {e}"))),
                            None => Ok(st),
                        };
                    }
                    backend::tag::PARAMETER_STATUS => {
                        if let Ok(p) = ParameterStatus::decode(body) {
                            let (k, v) = (
                                String::from_utf8_lossy(p.name),
                                String::from_utf8_lossy(p.value),
                            );
                            self.state.params.on_report(&k, &v, true);
                        }
                    }
                    backend::tag::ERROR_RESPONSE => {
                        let e = ErrorResponse::decode(body);
                        if e.as_ref()
                            .is_none_or(|e| e.severity == weir_wire::Severity::Fatal)
                        {
                            self.state.broken = true;
                        }
                        failed = Some(
                            e.map_or_else(|| "malformed error".to_string(), |e| e.to_string()),
                        );
                    }
                    backend::tag::DATA_ROW if rows.is_some() => {
                        let row = decode_data_row(body).ok_or_else(|| {
                            io::Error::new(io::ErrorKind::InvalidData, "malformed DataRow")
                        })?;
                        if let Some(r) = rows.as_mut() {
                            r.push(row);
                        }
                    }
                    _ => {}
                }
                self.rbuf.advance(len);
            }
            self.rbuf.reserve(READ_CHUNK);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Registers the connection with the calling worker's runtime if it is registered with
    /// another's (see [`Stream::rehome`]). True if it moved.
    pub fn rehome(&mut self) -> io::Result<bool> {
        let here = crate::workers::current();
        if self.home == here {
            return Ok(false);
        }
        self.stream.rehome()?;
        self.home = here;
        self.just_moved = true;
        Ok(true)
    }

    /// Whether this connection has outlived its lifetime at `now` (a comparison, no clock
    /// arithmetic: it runs at every checkout and release).
    pub fn expired(&self, now: std::time::Instant) -> bool {
        self.expires.is_some_and(|at| now >= at)
    }
}

/// A DataRow's columns as text (NULL as `None`).
fn decode_data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let n = u16::from_be_bytes(body.get(..2)?.try_into().ok()?) as usize;
    let mut rest = &body[2..];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = &rest[4..];
        if len < 0 {
            out.push(None);
        } else {
            let v = rest.get(..len as usize)?;
            out.push(Some(String::from_utf8_lossy(v).into_owned()));
            rest = &rest[len as usize..];
        }
    }
    Some(out)
}

/// A server login's secret fetched by auth_query rather than configured.
#[derive(Clone)]
pub enum Fetched {
    /// An md5 hash: logs in to a server that asks for md5.
    Md5(String),
    /// A SCRAM verifier with the ClientKey a client's own login revealed: logs in to a
    /// server that holds the same verifier.
    Scram {
        client_key: [u8; 32],
        verifier: weir_wire::scram::Verifier,
    },
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fetched::Md5(_) => "Fetched::Md5(<redacted>)",
            Fetched::Scram { .. } => "Fetched::Scram(<redacted>)",
        })
    }
}

fn credentials(addr: &str, login: &ServerLogin, message: &str) -> ServerError {
    ServerError::Credentials {
        addr: addr.to_string(),
        user: login.user.clone(),
        message: message.to_string(),
    }
}

impl Drop for ServerConn {
    fn drop(&mut self) {
        // Say goodbye so the server logs a clean disconnect; best effort, never blocks.
        let _ = self.stream.try_write(&[b'X', 0, 0, 0, 4]);
    }
}

/// Sends a CancelRequest for `key` to the server at `addr`.
pub async fn send_cancel(addr: &ServerAddr, key: BackendKey, timeout: Duration) -> io::Result<()> {
    let fut = async {
        let mut s = addr.connect().await?;
        let mut buf = BytesMut::with_capacity(16);
        weir_wire::frontend::encode_cancel_request(&mut buf, key.pid, key.secret);
        s.write_all(&buf).await?;
        // The server closes the connection once it has read the request.
        let mut sink = BytesMut::with_capacity(16);
        let _ = s.read_buf(&mut sink).await;
        Ok(())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}
