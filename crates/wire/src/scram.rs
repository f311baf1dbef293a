//! The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it: the
//! username in the exchange is ignored (the startup packet names the user) and channel binding
//! is refused until TLS lands, while a client that merely supports it ('y') is accepted.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use sha2::{Digest, Sha256};

pub const MECHANISM: &str = "SCRAM-SHA-256";

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
    state: State,
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
        ScramServer {
            verifier,
            state: State::Initial,
        }
    }

    /// Handles SASLInitialResponse; returns the server-first message.
    pub fn client_first(&mut self, mechanism: &[u8], message: &[u8]) -> Result<String, ScramError> {
        if mechanism != MECHANISM.as_bytes() {
            return Err(ScramError::UnsupportedMechanism);
        }
        let msg = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = msg
            .split_once(',')
            .ok_or(ScramError::Malformed("gs2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
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
        if B64.decode(cbind).ok().as_deref() != Some(gs2_header.as_bytes()) {
            return Err(ScramError::ChannelBinding);
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
        let server_signature = hmac(&self.verifier.server_key, &[auth_message.as_bytes()]);
        Ok(format!("v={}", B64.encode(server_signature)))
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
