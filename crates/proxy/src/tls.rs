//! TLS on both sides with rustls, driven by Weir's own readiness-based I/O.
//!
//! The relay waits for readiness and then reads or writes without blocking (see
//! [`crate::stream`]), so TLS is a [`TlsStream`]: the TCP socket plus a rustls connection,
//! fed through Tokio's `try_read`/`try_write`. rustls may hold encrypted bytes the socket did
//! not take yet after a write returned; they are sent on the stream's next readiness poll,
//! read or write, and the session asks [`Stream::wants_flush`] before it waits.
//!
//! Handshakes are done here too (rather than with tokio-rustls) because a client that opens
//! with TLS directly (PostgreSQL 17's `sslnegotiation=direct`) has already sent its first
//! bytes when Weir sees them: they are fed to rustls before the socket.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::Digest;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use weir_config::{ClientTlsMode, Config, ServerTlsMode};

use crate::stream::Stream;

/// ALPN protocol name PostgreSQL 17 uses for TLS.
pub const ALPN: &[u8] = b"postgresql";

/// TLS settings ready to use: built from the config at start and on every reload (which
/// re-reads the certificate files).
#[derive(Debug, Default)]
pub struct TlsSetup {
    pub client_mode: Option<ClientTlsMode>,
    acceptor: Option<Arc<rustls::ServerConfig>>,
    /// `tls-server-end-point` channel-binding data of Weir's certificate (RFC 5929).
    end_point: Option<Arc<[u8]>>,
    pub server_mode: Option<ServerTlsMode>,
    connector: Option<Arc<rustls::ClientConfig>>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(key: &str, path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "{key}: cannot read certificates from {}: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!("{key}: no certificate in {}", path.display()));
    }
    Ok(certs)
}

fn load_key(key: &str, path: &std::path::Path) -> Result<PrivateKeyDer<'static>, String> {
    // The error names the file only: a key's bytes never reach a message.
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!(
            "{key}: cannot read a private key from {}: {e}",
            path.display()
        )
    })
}

impl TlsSetup {
    /// Reads the certificate files the config names. An error names the key and the file.
    pub fn from_config(c: &Config) -> Result<TlsSetup, String> {
        let mut setup = TlsSetup::default();
        if c.tls.mode != ClientTlsMode::Disable {
            let (Some(cert), Some(key)) = (&c.tls.cert_file, &c.tls.key_file) else {
                return Err("tls.cert_file and tls.key_file are needed for TLS".into());
            };
            let chain = load_certs("tls.cert_file", cert)?;
            let key = load_key("tls.key_file", key)?;
            setup.end_point = Some(end_point_hash(&chain[0]).into());
            let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .map_err(|e| {
                    format!("tls.key_file: {e} (does the key belong to the certificate?)")
                })?;
            cfg.alpn_protocols = vec![ALPN.to_vec()];
            setup.acceptor = Some(Arc::new(cfg));
            setup.client_mode = Some(c.tls.mode);
        }
        let s = &c.server_tls;
        if s.mode != ServerTlsMode::Disable {
            let builder = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?;
            let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match s.mode {
                ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull => {
                    let path = s
                        .ca_file
                        .as_ref()
                        .ok_or("server_tls.ca_file is needed to verify servers")?;
                    let mut roots = rustls::RootCertStore::empty();
                    for cert in load_certs("server_tls.ca_file", path)? {
                        roots
                            .add(cert)
                            .map_err(|e| format!("server_tls.ca_file: {e}"))?;
                    }
                    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider(),
                    )
                    .build()
                    .map_err(|e| format!("server_tls.ca_file: {e}"))?;
                    Arc::new(Verify {
                        webpki: Some(webpki),
                        check_name: s.mode == ServerTlsMode::VerifyFull,
                        algorithms: provider().signature_verification_algorithms,
                    })
                }
                _ => Arc::new(Verify {
                    webpki: None,
                    check_name: false,
                    algorithms: provider().signature_verification_algorithms,
                }),
            };
            let builder = builder
                .dangerous()
                .with_custom_certificate_verifier(verifier);
            let cfg = match (&s.cert_file, &s.key_file) {
                (Some(cert), Some(key)) => builder
                    .with_client_auth_cert(
                        load_certs("server_tls.cert_file", cert)?,
                        load_key("server_tls.key_file", key)?,
                    )
                    .map_err(|e| format!("server_tls.key_file: {e}"))?,
                _ => builder.with_no_client_auth(),
            };
            setup.connector = Some(Arc::new(cfg));
            setup.server_mode = Some(s.mode);
        }
        Ok(setup)
    }

    /// TLS toward clients is on (an SSLRequest gets 'S').
    pub fn accepts(&self) -> bool {
        self.acceptor.is_some()
    }

    /// Clients must use TLS.
    pub fn required(&self) -> bool {
        self.client_mode == Some(ClientTlsMode::Require)
    }

    /// Completes a TLS handshake with a client. `prefix` holds bytes already read from the
    /// socket (the start of a direct TLS handshake); it is empty afterwards. A direct
    /// handshake must agree on ALPN `postgresql`, as PostgreSQL 17 requires, so a connection
    /// meant for another protocol cannot be passed off as PostgreSQL.
    pub async fn accept(
        &self,
        stream: Stream,
        prefix: &mut BytesMut,
        direct: bool,
    ) -> io::Result<Stream> {
        let (Some(cfg), Stream::Tcp(tcp)) = (&self.acceptor, stream) else {
            return Err(io::Error::other("TLS is not available on this connection"));
        };
        let mut conn = rustls::ServerConnection::new(cfg.clone()).map_err(io::Error::other)?;
        while !prefix.is_empty() {
            let n = conn.read_tls(&mut &prefix[..])?;
            prefix.advance(n);
            conn.process_new_packets().map_err(invalid)?;
        }
        let tls = TlsStream::new(tcp, conn.into(), self.end_point.clone());
        tls.handshake().await?;
        if direct && tls.lock().alpn_protocol() != Some(ALPN) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "direct TLS without ALPN \"postgresql\"",
            ));
        }
        Ok(Stream::Tls(Box::new(tls)))
    }

    /// Asks a server for TLS (SSLRequest) as the mode says, and completes the handshake.
    /// `Ok(plain)` when the mode allows a server that declines. An I/O failure (a server
    /// going down or starting up) is [`ConnectError::Lost`], worth retrying; a refusal or a
    /// certificate that does not verify is not.
    pub async fn connect(&self, stream: Stream, host: &str) -> Result<Stream, ConnectError> {
        let (Some(mode), Some(cfg)) = (self.server_mode, &self.connector) else {
            return Ok(stream);
        };
        let Stream::Tcp(mut tcp) = stream else {
            // PostgreSQL offers no TLS on Unix sockets, and needs none there.
            return Ok(stream);
        };
        // SSLRequest: length 8, code 1234.5679.
        let req = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        tokio::io::AsyncWriteExt::write_all(&mut tcp, &req)
            .await
            .map_err(ConnectError::lost)?;
        // Exactly one byte: anything after it would be unencrypted data injected before the
        // handshake (CVE-2021-23222).
        let mut answer = [0u8; 1];
        let n = tcp.read(&mut answer).await.map_err(ConnectError::lost)?;
        match (n, answer[0]) {
            (1, b'S') => {}
            (1, b'N') if mode == ServerTlsMode::Prefer => return Ok(Stream::Tcp(tcp)),
            (1, b'N') => {
                return Err(ConnectError::Refused(format!(
                    "the server does not accept TLS, and server_tls.mode is \"{mode}\""
                )));
            }
            (0, _) => {
                return Err(ConnectError::Lost(
                    "the server closed the connection at the TLS request".into(),
                ));
            }
            (_, b) => {
                return Err(ConnectError::Refused(format!(
                    "the server answered the TLS request with {:?}",
                    b as char
                )));
            }
        }
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            ConnectError::Refused(format!("`{host}` is not a valid TLS server name"))
        })?;
        let conn = rustls::ClientConnection::new(cfg.clone(), name)
            .map_err(|e| ConnectError::Refused(e.to_string()))?;
        let tls = TlsStream::new(tcp, conn.into(), None);
        tls.handshake().await.map_err(|e| match e.kind() {
            // rustls's own verdicts (certificates, alerts) come as InvalidData.
            io::ErrorKind::InvalidData => ConnectError::Refused(e.to_string()),
            _ => ConnectError::lost(e),
        })?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

/// Why TLS toward a server failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The connection broke: the server may be restarting.
    Lost(String),
    /// TLS was refused or did not verify: trying again will not help.
    Refused(String),
}

impl ConnectError {
    fn lost(e: io::Error) -> ConnectError {
        ConnectError::Lost(e.to_string())
    }
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The hash of a certificate for `tls-server-end-point`: the certificate's own signature
/// hash, with MD5 and SHA-1 (and anything not recognised) replaced by SHA-256 (RFC 5929 4.1).
pub fn end_point_hash(cert: &[u8]) -> Vec<u8> {
    const SHA384: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c],
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],
    ];
    const SHA512: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d],
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],
    ];
    let oid = signature_oid(cert).unwrap_or_default();
    if SHA384.contains(&oid) {
        sha2::Sha384::digest(cert).to_vec()
    } else if SHA512.contains(&oid) {
        sha2::Sha512::digest(cert).to_vec()
    } else {
        sha2::Sha256::digest(cert).to_vec()
    }
}

/// The signatureAlgorithm OID of a DER certificate:
/// `SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm SEQUENCE { OID, .. }, .. }`.
fn signature_oid(cert: &[u8]) -> Option<&[u8]> {
    fn item(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = b.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (first as usize, rest)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    let (_, body, _) = item(cert)?;
    let (_, _tbs, rest) = item(body)?;
    let (_, alg, _) = item(rest)?;
    let (tag, oid, _) = item(alg)?;
    (tag == 0x06).then_some(oid)
}

/// Checks a server's certificate as the mode says: against the CA (with or without the host
/// name), or not at all (`prefer`, `require`), while always checking the handshake signature.
#[derive(Debug)]
struct Verify {
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    check_name: bool,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for Verify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The socket as `Read`/`Write` for rustls: non-blocking, WouldBlock clears Tokio's readiness.
struct Sock<'a>(&'a TcpStream);

impl Read for Sock<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Sock<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TCP socket with TLS. The rustls state sits behind a mutex only because the stream is
/// used through `&self` like the plain sockets; one task owns the stream, so it is never
/// contended.
pub struct TlsStream {
    pub(crate) tcp: TcpStream,
    conn: Mutex<rustls::Connection>,
    end_point: Option<Arc<[u8]>>,
    /// Set once rustls reported a fatal error: every later read fails at once, so a
    /// readiness poll that reports it cannot become a busy loop.
    failed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").field("tcp", &self.tcp).finish()
    }
}

impl TlsStream {
    fn new(tcp: TcpStream, conn: rustls::Connection, end_point: Option<Arc<[u8]>>) -> Self {
        TlsStream {
            tcp,
            conn: Mutex::new(conn),
            end_point,
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn is_failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Processes what was read; a fatal error is remembered and its alert sent.
    fn process(&self, c: &mut rustls::Connection) -> io::Result<rustls::IoState> {
        c.process_new_packets().map_err(|e| {
            self.failed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = self.flush(c);
            invalid(e)
        })
    }

    fn lock(&self) -> MutexGuard<'_, rustls::Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends what rustls holds; WouldBlock when the socket takes no more.
    fn flush(&self, c: &mut rustls::Connection) -> io::Result<()> {
        while c.wants_write() {
            if c.write_tls(&mut Sock(&self.tcp))? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    /// Channel-binding data of the certificate Weir presented, on the client side.
    pub fn end_point(&self) -> Option<&[u8]> {
        self.end_point.as_deref()
    }

    pub fn wants_flush(&self) -> bool {
        self.lock().wants_write()
    }

    async fn handshake(&self) -> io::Result<()> {
        enum Wait {
            Read,
            Write,
        }
        loop {
            let wait = {
                let mut c = self.lock();
                match self.flush(&mut c) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Wait::Write,
                    Err(e) => return Err(e),
                    Ok(()) if !c.is_handshaking() => return Ok(()),
                    Ok(()) => match c.read_tls(&mut Sock(&self.tcp)) {
                        Ok(0) => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the peer closed the connection during the TLS handshake",
                            ));
                        }
                        Ok(_) => {
                            // An error sends the alert that says why.
                            self.process(&mut c)?;
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Wait::Read,
                        Err(e) => return Err(e),
                    },
                }
            };
            match wait {
                Wait::Read => self.tcp.readable().await?,
                Wait::Write => self.tcp.writable().await?,
            }
        }
    }

    /// Flushes what is pending, registering for write readiness if the socket is full.
    fn poll_flush(&self, c: &mut rustls::Connection, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.flush(c) {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match self.tcp.poll_write_ready(cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_failed() {
            return Poll::Ready(Ok(()));
        }
        let mut c = self.lock();
        if let Poll::Ready(Err(e)) = self.poll_flush(&mut c, cx) {
            return Poll::Ready(Err(e));
        }
        match self.process(&mut c) {
            Ok(st) if st.plaintext_bytes_to_read() == 0 && !st.peer_has_closed() => {}
            // Plaintext waiting, the end, or an error: the read tells which.
            _ => return Poll::Ready(Ok(())),
        }
        drop(c);
        self.tcp.poll_read_ready(cx)
    }

    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut c = self.lock();
        self.poll_flush(&mut c, cx)
    }

    /// Decrypted bytes into the spare capacity of `buf`; `Ok(0)` at the end of the stream;
    /// WouldBlock when a whole record has not arrived yet.
    pub fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        if self.is_failed() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the TLS connection failed",
            ));
        }
        let mut c = self.lock();
        let start = buf.len();
        if buf.capacity() == start {
            return Err(io::Error::other("read into a full buffer"));
        }
        // Zeroed before rustls writes into it: bounded, so a 64 kB server buffer is not
        // cleared whole for every record.
        let room = (buf.capacity() - start).min(32 * 1024);
        let mut eof = false;
        loop {
            buf.resize(start + room, 0);
            let r = c.reader().read(&mut buf[start..]);
            match r {
                Ok(n) => {
                    buf.truncate(start + n);
                    return Ok(n);
                }
                Err(e) => {
                    buf.truncate(start);
                    match e.kind() {
                        io::ErrorKind::WouldBlock if eof => return Ok(0),
                        io::ErrorKind::WouldBlock => {}
                        io::ErrorKind::UnexpectedEof => return Ok(0),
                        _ => return Err(e),
                    }
                }
            }
            if c.read_tls(&mut Sock(&self.tcp))? == 0 {
                eof = true;
            }
            self.process(&mut c)?;
            // A key update or ticket may want an answer.
            let _ = self.flush(&mut c);
        }
    }

    /// Encrypts up to all of `data`; WouldBlock while earlier output is still unsent.
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        let mut c = self.lock();
        self.flush(&mut c)?;
        let n = c.writer().write(data)?;
        if n == 0 && !data.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.flush(&mut c) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }

    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        loop {
            if !data.is_empty() {
                match self.try_write(data) {
                    Ok(n) => data = &data[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if data.is_empty() && !self.wants_flush() {
                return Ok(());
            }
            std::future::poll_fn(|cx| self.poll_write_ready(cx)).await?;
        }
    }

    /// Plaintext already decrypted and waiting.
    pub fn has_buffered(&self) -> bool {
        if self.is_failed() {
            return true;
        }
        let mut c = self.lock();
        self.process(&mut c).map_or(true, |st| {
            st.plaintext_bytes_to_read() > 0 || st.peer_has_closed()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(end_point_hash(cert.der()).len(), 48, "ecdsa-with-SHA384");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            end_point_hash(cert.der()),
            sha2::Sha256::digest(cert.der()).to_vec()
        );
        assert_eq!(signature_oid(b"\x30\x03\x02\x01"), None, "truncated DER");
    }
}
