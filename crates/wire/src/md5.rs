//! PostgreSQL's md5 password scheme: the stored secret is `"md5" + hex(md5(password + user))`,
//! and a client answers a 4-byte salt with `"md5" + hex(md5(hex_secret + salt))`.

use md5::{Digest, Md5};

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// The stored form of a password: `md5` followed by 32 hex digits.
pub fn stored_secret(user: &str, password: &[u8]) -> String {
    let mut h = Md5::new();
    h.update(password);
    h.update(user.as_bytes());
    format!("md5{}", hex(&h.finalize()))
}

/// Whether `s` has the shape of a stored md5 secret.
pub fn is_stored_secret(s: &str) -> bool {
    s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// What a client must send for `stored` (an md5 stored secret) and `salt`.
pub fn expected_response(stored: &str, salt: [u8; 4]) -> String {
    let mut h = Md5::new();
    h.update(&stored.as_bytes()[3..]);
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

/// Checks a client's md5 response in constant time.
pub fn verify(stored: &str, salt: [u8; 4], response: &[u8]) -> bool {
    crate::scram::ct_eq(expected_response(stored, salt).as_bytes(), response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_postgres_protocol_client() {
        let salt = [0x2a, 0x3d, 0x8f, 0xe0];
        let stored = stored_secret("md5_user", b"password");
        assert!(is_stored_secret(&stored));
        // The client-side helper the drivers use computes the same answer.
        let client = postgres_protocol::authentication::md5_hash(b"md5_user", b"password", salt);
        assert!(verify(&stored, salt, client.as_bytes()));
        let wrong = postgres_protocol::authentication::md5_hash(b"md5_user", b"nope", salt);
        assert!(!verify(&stored, salt, wrong.as_bytes()));
    }

    #[test]
    fn known_value() {
        // md5("password" + "postgres"), as PostgreSQL stores it.
        assert_eq!(
            stored_secret("postgres", b"password"),
            "md532e12f215ba27cb750c9e093ce4b5127"
        );
    }
}
