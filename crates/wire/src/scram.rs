//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it. The server side: the username
//! in the exchange is ignored (the startup packet names the user); over TLS,
//! SCRAM-SHA-256-PLUS with `tls-server-end-point` channel binding (RFC 5929) is offered, and
//! a client that says it supports binding but thinks the server does not ('y') is refused
//! there (a downgrade). The client side from keys instead of a password ([`ScramKeysClient`]),
//! for logging in to a server with what a client's own SCRAM login revealed.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use sha2::{Digest, Sha256};

pub const MECHANISM: &str = "SCRAM-SHA-256";
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only channel-binding type PostgreSQL (and Weir) supports.
pub const CHANNEL_BINDING_TYPE: &str = "tls-server-end-point";

/// A stored SCRAM secret: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("unsupported SASL mechanism")]
    UnsupportedMechanism,
    #[error("channel binding is not supported on this connection")]
    ChannelBinding,
    #[error("SCRAM channel binding check failed")]
    ChannelBindingMismatch,
    #[error(
        "the client supports channel binding and thinks the server does not, but it does (a possible downgrade)"
    )]
    Downgrade,
    #[error("SCRAM nonce mismatch")]
    Nonce,
    #[error("password authentication failed")]
    BadProof,
    #[error("not a SCRAM-SHA-256 verifier")]
    BadVerifier,
}

impl Verifier {
    /// Derives a verifier from a plain password with a fresh random salt.
    pub fn from_password(password: &str) -> Verifier {
        postgres_protocol::password::scram_sha_256(password.as_bytes())
            .parse()
            .expect("postgres-protocol produces valid verifiers")
    }

    pub fn is_verifier(s: &str) -> bool {
        s.starts_with("SCRAM-SHA-256$")
    }

    /// A verifier no password matches, stable per user name: unknown users get an exchange
    /// that looks like a real one (own salt, same iterations) and always fails, so a login
    /// attempt cannot tell whether a user exists. `secret` is random per process.
    pub fn mock(secret: &[u8; 32], user: &str) -> Verifier {
        let salt = hmac(secret, &[b"salt", user.as_bytes()]);
        Verifier {
            iterations: 4096,
            salt: salt[..16].to_vec(),
            stored_key: hmac(secret, &[b"stored", user.as_bytes()]),
            server_key: hmac(secret, &[b"server", user.as_bytes()]),
        }
    }
}

impl std::str::FromStr for Verifier {
    type Err = ScramError;

    fn from_str(s: &str) -> Result<Self, ScramError> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(ScramError::BadVerifier)?;
        let (params, keys) = rest.split_once('$').ok_or(ScramError::BadVerifier)?;
        let (iter, salt) = params.split_once(':').ok_or(ScramError::BadVerifier)?;
        let (stored, server) = keys.split_once(':').ok_or(ScramError::BadVerifier)?;
        let key = |k: &str| -> Result<[u8; 32], ScramError> {
            B64.decode(k)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or(ScramError::BadVerifier)
        };
        Ok(Verifier {
            iterations: iter.parse().map_err(|_| ScramError::BadVerifier)?,
            salt: B64.decode(salt).map_err(|_| ScramError::BadVerifier)?,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }
}

impl std::fmt::Display for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// Constant-time equality for secrets.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// One SCRAM exchange, server side. Feed it the client's two messages in order.
pub struct ScramServer {
    verifier: Verifier,
    /// `tls-server-end-point` data when the connection is TLS: PLUS is offered.
    channel_binding: Option<Vec<u8>>,
    state: State,
    /// The client's key, recovered from its proof once the proof checks out.
    client_key: Option<[u8; 32]>,
}

enum State {
    Initial,
    SentFirst {
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        nonce: String,
    },
    Done,
}

impl ScramServer {
    pub fn new(verifier: Verifier) -> Self {
        Self::with_channel_binding(verifier, None)
    }

    /// `channel_binding`: the `tls-server-end-point` data of the server's certificate when
    /// the connection is TLS.
    pub fn with_channel_binding(verifier: Verifier, channel_binding: Option<Vec<u8>>) -> Self {
        ScramServer {
            verifier,
            channel_binding,
            state: State::Initial,
            client_key: None,
        }
    }

    /// The mechanisms to offer, best first.
    pub fn mechanisms(&self) -> Vec<&'static [u8]> {
        match self.channel_binding {
            Some(_) => vec![MECHANISM_PLUS.as_bytes(), MECHANISM.as_bytes()],
            None => vec![MECHANISM.as_bytes()],
        }
    }

    /// The client's ClientKey, after a successful exchange: with the verifier's ServerKey it
    /// logs in to a server holding the same verifier (see [`ScramKeysClient`]).
    pub fn client_key(&self) -> Option<[u8; 32]> {
        self.client_key
    }

    /// Handles SASLInitialResponse; returns the server-first message.
    pub fn client_first(&mut self, mechanism: &[u8], message: &[u8]) -> Result<String, ScramError> {
        let plus = if mechanism == MECHANISM.as_bytes() {
            false
        } else if mechanism == MECHANISM_PLUS.as_bytes() && self.channel_binding.is_some() {
            true
        } else {
            return Err(ScramError::UnsupportedMechanism);
        };
        let msg = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = msg
            .split_once(',')
            .ok_or(ScramError::Malformed("gs2 header"))?;
        match (flag, plus) {
            ("n", false) => {}
            // The client could bind but believes the server cannot: if it can, someone
            // removed PLUS from the offer.
            ("y", false) if self.channel_binding.is_some() => return Err(ScramError::Downgrade),
            ("y", false) => {}
            (f, true) if f.strip_prefix("p=") == Some(CHANNEL_BINDING_TYPE) => {}
            (f, _) if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            ("n" | "y", true) => {
                return Err(ScramError::Malformed(
                    "SCRAM-SHA-256-PLUS needs channel binding",
                ));
            }
            _ => return Err(ScramError::Malformed("channel binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("gs2 header"))?;
        // As PostgreSQL: the startup packet names the user; an authorization identity is refused.
        if !authzid.is_empty() {
            return Err(ScramError::Malformed(
                "authorization identity is not supported",
            ));
        }
        let gs2_header = format!("{flag},{authzid},");
        let mut attrs = bare.split(',');
        let mut user_or_ext = attrs.next().ok_or(ScramError::Malformed("username"))?;
        if user_or_ext.starts_with("m=") {
            return Err(ScramError::Malformed("mandatory extension not supported"));
        }
        if !user_or_ext.starts_with("n=") {
            return Err(ScramError::Malformed("username"));
        }
        user_or_ext = attrs.next().ok_or(ScramError::Malformed("nonce"))?;
        let client_nonce = user_or_ext
            .strip_prefix("r=")
            .ok_or(ScramError::Malformed("nonce"))?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::Malformed("nonce"));
        }
        let mut raw = [0u8; 18];
        rand::rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        self.state = State::SentFirst {
            gs2_header,
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok(server_first)
    }

    /// Handles SASLResponse; checks the proof and returns the server-final message.
    pub fn client_final(&mut self, message: &[u8]) -> Result<String, ScramError> {
        let State::SentFirst {
            gs2_header,
            client_first_bare,
            server_first,
            nonce,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::Malformed("unexpected message"));
        };
        let msg = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("proof"))?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("channel binding"))?;
        let mut expected = gs2_header.clone().into_bytes();
        if gs2_header.starts_with("p=") {
            expected.extend_from_slice(self.channel_binding.as_deref().unwrap_or_default());
        }
        if !B64.decode(cbind).is_ok_and(|c| ct_eq(&c, &expected)) {
            return Err(ScramError::ChannelBindingMismatch);
        }
        let got_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("nonce"))?;
        if got_nonce != nonce {
            return Err(ScramError::Nonce);
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("proof"))?;
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&self.verifier.stored_key, &[auth_message.as_bytes()]);
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !ct_eq(&stored, &self.verifier.stored_key) {
            return Err(ScramError::BadProof);
        }
        self.client_key = Some(client_key);
        let server_signature = hmac(&self.verifier.server_key, &[auth_message.as_bytes()]);
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// The client side of SCRAM-SHA-256 from keys rather than a password: a ClientKey (recovered
/// from a client's own login with [`ScramServer::client_key`]) and the verifier the server
/// holds for that user (for its salt, iterations and ServerKey). Only a server with that same
/// verifier accepts it, which is the point: the client's password is never known to Weir.
pub struct ScramKeysClient {
    client_key: [u8; 32],
    verifier: Verifier,
    nonce: String,
    auth_message: Option<String>,
}

impl ScramKeysClient {
    pub fn new(client_key: [u8; 32], verifier: Verifier) -> Self {
        let mut raw = [0u8; 18];
        rand::rng().fill_bytes(&mut raw);
        ScramKeysClient {
            client_key,
            verifier,
            nonce: B64.encode(raw),
            auth_message: None,
        }
    }

    fn first_bare(&self) -> String {
        format!("n=,r={}", self.nonce)
    }

    /// The SASLInitialResponse data (mechanism SCRAM-SHA-256, no channel binding).
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.first_bare()).into_bytes()
    }

    /// Takes server-first, returns client-final.
    pub fn server_first(&mut self, message: &[u8]) -> Result<Vec<u8>, ScramError> {
        let msg = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut attrs = msg.split(',');
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .filter(|n| n.starts_with(&self.nonce) && n.len() > self.nonce.len())
            .ok_or(ScramError::Nonce)?;
        let salt = attrs
            .next()
            .and_then(|a| a.strip_prefix("s="))
            .and_then(|s| B64.decode(s).ok())
            .ok_or(ScramError::Malformed("salt"))?;
        let iterations: u32 = attrs
            .next()
            .and_then(|a| a.strip_prefix("i="))
            .and_then(|i| i.parse().ok())
            .ok_or(ScramError::Malformed("iterations"))?;
        if salt != self.verifier.salt || iterations != self.verifier.iterations {
            // The server holds another verifier for the user (the password changed).
            return Err(ScramError::BadVerifier);
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{msg},{without_proof}", self.first_bare());
        let stored: [u8; 32] = Sha256::digest(self.client_key).into();
        let signature = hmac(&stored, &[auth_message.as_bytes()]);
        let mut proof = [0u8; 32];
        for i in 0..32 {
            proof[i] = self.client_key[i] ^ signature[i];
        }
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the server's signature in server-final.
    pub fn server_final(&self, message: &[u8]) -> Result<(), ScramError> {
        let auth = self
            .auth_message
            .as_ref()
            .ok_or(ScramError::Malformed("unexpected message"))?;
        let sig = std::str::from_utf8(message)
            .ok()
            .and_then(|m| m.strip_prefix("v="))
            .and_then(|v| B64.decode(v).ok())
            .ok_or(ScramError::Malformed("server signature"))?;
        let expected = hmac(&self.verifier.server_key, &[auth.as_bytes()]);
        if ct_eq(&sig, &expected) {
            Ok(())
        } else {
            Err(ScramError::BadProof)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(stored_password: &str, client_password: &str) -> Result<(), ScramError> {
        let mut server = ScramServer::new(Verifier::from_password(stored_password));
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let first = server.client_first(MECHANISM.as_bytes(), client.message())?;
        client.update(first.as_bytes()).unwrap();
        let fin = server.client_final(client.message())?;
        client
            .finish(fin.as_bytes())
            .expect("client accepts the server signature");
        Ok(())
    }

    #[test]
    fn full_exchange_with_real_client() {
        exchange("s3cret", "s3cret").unwrap();
    }

    #[test]
    fn wrong_password_is_bad_proof() {
        assert_eq!(exchange("s3cret", "guess"), Err(ScramError::BadProof));
    }

    #[test]
    fn verifier_round_trip() {
        let v = Verifier::from_password("pw");
        assert_eq!(v.to_string().parse::<Verifier>().unwrap(), v);
        assert!(format!("{v:?}").contains("redacted"));
        assert!("md5abc".parse::<Verifier>().is_err());
    }

    /// A client's login to Weir yields a key that logs in to a server holding the same
    /// verifier, and only that verifier.
    #[test]
    fn client_key_from_a_login_logs_in_elsewhere() {
        let verifier = Verifier::from_password("s3cret");
        let mut weir = ScramServer::new(verifier.clone());
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unsupported());
        let first = weir
            .client_first(MECHANISM.as_bytes(), client.message())
            .unwrap();
        client.update(first.as_bytes()).unwrap();
        weir.client_final(client.message()).unwrap();
        let key = weir.client_key().expect("known after a good proof");

        let mut server = ScramServer::new(verifier.clone());
        let mut weir_as_client = ScramKeysClient::new(key, verifier.clone());
        let first = server
            .client_first(MECHANISM.as_bytes(), &weir_as_client.client_first())
            .unwrap();
        let fin = weir_as_client.server_first(first.as_bytes()).unwrap();
        let ok = server.client_final(&fin).unwrap();
        weir_as_client.server_final(ok.as_bytes()).unwrap();

        // A server with another verifier (the password changed) is refused before a proof.
        let mut other = ScramServer::new(Verifier::from_password("s3cret"));
        let mut c = ScramKeysClient::new(key, verifier);
        let first = other
            .client_first(MECHANISM.as_bytes(), &c.client_first())
            .unwrap();
        assert_eq!(
            c.server_first(first.as_bytes()),
            Err(ScramError::BadVerifier)
        );
    }

    #[test]
    fn channel_binding_over_tls() {
        let cb = vec![0xab; 32];
        let exchange = |client_cb: ChannelBinding, mech: &str| {
            let mut server =
                ScramServer::with_channel_binding(Verifier::from_password("pw"), Some(cb.clone()));
            let mut client = ScramSha256::new(b"pw", client_cb);
            let first = server.client_first(mech.as_bytes(), client.message())?;
            client.update(first.as_bytes()).unwrap();
            server.client_final(client.message()).map(|_| ())
        };
        assert_eq!(
            exchange(
                ChannelBinding::tls_server_end_point(cb.clone()),
                MECHANISM_PLUS
            ),
            Ok(())
        );
        // The client bound to another certificate (a man in the middle's).
        assert_eq!(
            exchange(
                ChannelBinding::tls_server_end_point(vec![1; 32]),
                MECHANISM_PLUS
            ),
            Err(ScramError::ChannelBindingMismatch)
        );
        assert_eq!(exchange(ChannelBinding::unsupported(), MECHANISM), Ok(()));
        assert_eq!(
            exchange(ChannelBinding::unrequested(), MECHANISM),
            Err(ScramError::Downgrade)
        );
        // PLUS is not offered without TLS.
        let mut plain = ScramServer::new(Verifier::from_password("pw"));
        assert_eq!(plain.mechanisms(), vec![MECHANISM.as_bytes()]);
        assert_eq!(
            plain.client_first(
                MECHANISM_PLUS.as_bytes(),
                b"p=tls-server-end-point,,n=,r=abc"
            ),
            Err(ScramError::UnsupportedMechanism)
        );
    }

    #[test]
    fn refuses_channel_binding_without_tls() {
        let mut server = ScramServer::new(Verifier::from_password("pw"));
        let r = server.client_first(MECHANISM.as_bytes(), b"p=tls-server-end-point,,n=,r=abc");
        assert_eq!(r, Err(ScramError::ChannelBinding));
    }

    #[test]
    fn mock_verifier_is_per_user_and_never_matches() {
        let secret = [5u8; 32];
        let (a, b) = (
            Verifier::mock(&secret, "alice"),
            Verifier::mock(&secret, "bob"),
        );
        assert_ne!(a.salt, b.salt);
        assert_eq!(a, Verifier::mock(&secret, "alice"), "stable per user");
        let mut server = ScramServer::new(a);
        let mut client = ScramSha256::new(b"anything", ChannelBinding::unsupported());
        let first = server
            .client_first(MECHANISM.as_bytes(), client.message())
            .unwrap();
        client.update(first.as_bytes()).unwrap();
        assert_eq!(
            server.client_final(client.message()),
            Err(ScramError::BadProof)
        );
    }

    #[test]
    fn rejects_garbage() {
        let mut server = ScramServer::new(Verifier::from_password("pw"));
        assert!(
            server
                .client_first(MECHANISM.as_bytes(), b"\xff\xfe")
                .is_err()
        );
        assert!(server.client_first(b"PLAIN", b"n,,n=,r=abc").is_err());
        assert!(
            server
                .client_first(MECHANISM.as_bytes(), b"n,a=admin,n=,r=abc")
                .is_err(),
            "authzid"
        );
        let mut server = ScramServer::new(Verifier::from_password("pw"));
        assert!(server.client_final(b"c=biws,r=x,p=AAAA").is_err());
    }
}
