//! Client authentication: SCRAM-SHA-256, md5 or trust, against the secrets in the config.

use std::collections::HashMap;

use bytes::BytesMut;
use weir_config::{AuthType, Config};
use weir_wire::backend::Authentication;
use weir_wire::frontend::{self, tag};
use weir_wire::scram::{ScramServer, Verifier};
use weir_wire::{ErrorResponse, SqlState, md5};

use crate::startup::{StartupError, read_message};
use crate::stream::Stream;

/// What Weir holds for one user, in every form a login method needs.
#[derive(Debug, Clone, Default)]
pub struct UserSecret {
    pub md5: Option<String>,
    pub scram: Option<Verifier>,
}

impl UserSecret {
    /// From a config password: plain, `md5...` or a SCRAM verifier.
    pub fn from_config(user: &str, password: &str) -> UserSecret {
        if Verifier::is_verifier(password) {
            UserSecret {
                md5: None,
                scram: password.parse().ok(),
            }
        } else if md5::is_stored_secret(password) {
            UserSecret {
                md5: Some(password.to_string()),
                scram: None,
            }
        } else {
            UserSecret {
                md5: Some(md5::stored_secret(user, password.as_bytes())),
                scram: Some(Verifier::from_password(password)),
            }
        }
    }
}

/// Every user's secrets, derived once per config (SCRAM key derivation is deliberately slow).
#[derive(Debug)]
pub struct UserDirectory {
    users: HashMap<String, UserSecret>,
    /// Key for per-user mock verifiers, so a login attempt cannot tell whether a user exists.
    mock_secret: [u8; 32],
}

impl UserDirectory {
    pub fn new(config: &Config) -> UserDirectory {
        let mut users = HashMap::new();
        for (name, u) in &config.users {
            if let Some(pw) = &u.password {
                users.insert(name.clone(), UserSecret::from_config(name, pw.expose()));
            }
        }
        for db in config.databases.values() {
            if let (Some(user), Some(pw)) = (&db.user, &db.password) {
                users
                    .entry(user.clone())
                    .or_insert_with(|| UserSecret::from_config(user, pw.expose()));
            }
        }
        let mut mock_secret = [0u8; 32];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut mock_secret);
        UserDirectory { users, mock_secret }
    }

    pub fn get(&self, user: &str) -> Option<&UserSecret> {
        self.users.get(user)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    #[error("{0}")]
    Protocol(String),
}

impl AuthError {
    pub fn to_response(&self) -> Option<ErrorResponse> {
        match self {
            AuthError::Startup(e) => e.to_response(),
            AuthError::Failed(_) => Some(ErrorResponse::fatal(
                SqlState::INVALID_PASSWORD,
                self.to_string(),
            )),
            AuthError::Protocol(m) => Some(ErrorResponse::fatal(
                SqlState::PROTOCOL_VIOLATION,
                m.clone(),
            )),
        }
    }
}

/// Runs the login exchange. On success the caller sends AuthenticationOk, in the same write
/// as the rest of its welcome (one packet, as PostgreSQL does, not two). `found` is a secret
/// from auth_query, used instead of the directory's. Returns the client's SCRAM ClientKey
/// when the exchange was SCRAM.
pub async fn authenticate(
    stream: &mut Stream,
    buf: &mut BytesMut,
    method: AuthType,
    user: &str,
    directory: &UserDirectory,
    found: Option<&UserSecret>,
) -> Result<Option<[u8; 32]>, AuthError> {
    let secret = found.or_else(|| directory.get(user));
    let mut client_key = None;
    let mut out = BytesMut::with_capacity(128);
    let ok = match method {
        AuthType::Trust => true,
        // md5 needs an md5 secret; with only a SCRAM verifier, do SCRAM (as PostgreSQL does).
        AuthType::Md5 if secret.is_none_or(|s| s.md5.is_some()) => {
            md5_exchange(stream, buf, user, secret, &mut out).await?
        }
        AuthType::Md5 | AuthType::ScramSha256 => {
            let verifier = secret
                .and_then(|s| s.scram.clone())
                .unwrap_or_else(|| Verifier::mock(&directory.mock_secret, user));
            let known = secret.is_some_and(|s| s.scram.is_some());
            client_key = scram_exchange(stream, buf, verifier, &mut out).await?;
            client_key.is_some() && known
        }
    };
    if !ok {
        return Err(AuthError::Failed(user.to_string()));
    }
    Ok(client_key)
}

const AUTH_MESSAGE_LIMIT: u32 = 16 * 1024;

async fn expect_password(stream: &mut Stream, buf: &mut BytesMut) -> Result<BytesMut, AuthError> {
    let (t, body) = read_message(stream, buf, AUTH_MESSAGE_LIMIT).await?;
    if t != tag::PASSWORD {
        return Err(AuthError::Protocol(format!(
            "expected password response, got message type '{}'",
            t as char
        )));
    }
    Ok(body)
}

async fn md5_exchange(
    stream: &mut Stream,
    buf: &mut BytesMut,
    user: &str,
    secret: Option<&UserSecret>,
    out: &mut BytesMut,
) -> Result<bool, AuthError> {
    let mut salt = [0u8; 4];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut salt);
    Authentication::Md5Password { salt }.encode(out);
    stream.write_all(out).await.map_err(StartupError::from)?;
    let body = expect_password(stream, buf).await?;
    let response =
        frontend::decode_password(&body).map_err(|e| AuthError::Protocol(e.to_string()))?;
    let _ = user;
    Ok(secret
        .and_then(|s| s.md5.as_deref())
        .is_some_and(|stored| md5::verify(stored, salt, response)))
}

async fn scram_exchange(
    stream: &mut Stream,
    buf: &mut BytesMut,
    verifier: Verifier,
    out: &mut BytesMut,
) -> Result<Option<[u8; 32]>, AuthError> {
    let mut server =
        ScramServer::with_channel_binding(verifier, stream.channel_binding().map(<[u8]>::to_vec));
    Authentication::Sasl {
        mechanisms: server.mechanisms(),
    }
    .encode(out);
    stream.write_all(out).await.map_err(StartupError::from)?;

    let body = expect_password(stream, buf).await?;
    let (mech, data) =
        frontend::decode_sasl_initial(&body).map_err(|e| AuthError::Protocol(e.to_string()))?;
    let first = server
        .client_first(mech, data)
        .map_err(|e| AuthError::Protocol(e.to_string()))?;
    out.clear();
    Authentication::SaslContinue(first.as_bytes()).encode(out);
    stream.write_all(out).await.map_err(StartupError::from)?;

    let body = expect_password(stream, buf).await?;
    match server.client_final(&body) {
        Ok(fin) => {
            out.clear();
            Authentication::SaslFinal(fin.as_bytes()).encode(out);
            stream.write_all(out).await.map_err(StartupError::from)?;
            Ok(server.client_key())
        }
        Err(weir_wire::scram::ScramError::BadProof) => Ok(None),
        Err(e) => Err(AuthError::Protocol(e.to_string())),
    }
}
