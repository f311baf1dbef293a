//! Messages a server sends: encoders for those Weir synthesises, decoders for those it reads.

use bytes::{BufMut, BytesMut};

use crate::frontend::Malformed;
use crate::{put_cstr, put_message, split_cstr};

/// Backend message tags.
pub mod tag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const NO_DATA: u8 = b'n';
    pub const DATA_ROW: u8 = b'D';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
}

/// Whole messages with an empty body, ready to copy onto the wire.
pub const PARSE_COMPLETE: &[u8] = &[tag::PARSE_COMPLETE, 0, 0, 0, 4];
pub const BIND_COMPLETE: &[u8] = &[tag::BIND_COMPLETE, 0, 0, 0, 4];
pub const CLOSE_COMPLETE: &[u8] = &[tag::CLOSE_COMPLETE, 0, 0, 0, 4];
pub const NO_DATA: &[u8] = &[tag::NO_DATA, 0, 0, 0, 4];

/// The server's cancel key, as sent in BackendKeyData. Distinct from the key Weir gives
/// clients ([`crate::frontend::CancelKey`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: i32,
}

impl BackendKey {
    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        if body.len() != 8 {
            return Err(Malformed {
                what: "BackendKeyData",
            });
        }
        Ok(BackendKey {
            pid: i32::from_be_bytes(body[..4].try_into().unwrap()),
            secret: i32::from_be_bytes(body[4..].try_into().unwrap()),
        })
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        put_message(dst, tag::BACKEND_KEY_DATA, |b| {
            b.put_i32(self.pid);
            b.put_i32(self.secret);
        });
    }
}

/// Transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }

    pub fn decode(body: &[u8]) -> Result<Self, Malformed> {
        match body {
            [b] => TxStatus::from_byte(*b).ok_or(Malformed {
                what: "ReadyForQuery",
            }),
            _ => Err(Malformed {
                what: "ReadyForQuery",
            }),
        }
    }

    pub fn encode(self, dst: &mut BytesMut) {
        dst.extend_from_slice(&[tag::READY_FOR_QUERY, 0, 0, 0, 5, self.byte()]);
    }
}

/// ParameterStatus: a run-time parameter the server reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterStatus<'a> {
    pub name: &'a [u8],
    pub value: &'a [u8],
}

impl<'a> ParameterStatus<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, Malformed> {
        let m = Malformed {
            what: "ParameterStatus",
        };
        let (name, rest) = split_cstr(body).ok_or(m.clone())?;
        let (value, rest) = split_cstr(rest).ok_or(m.clone())?;
        if !rest.is_empty() {
            return Err(m);
        }
        Ok(ParameterStatus { name, value })
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        put_message(dst, tag::PARAMETER_STATUS, |b| {
            put_cstr(b, self.name);
            put_cstr(b, self.value);
        });
    }
}

/// Type OIDs of the columns Weir's own result sets use.
pub mod oid {
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const NUMERIC: u32 = 1700;
}

/// RowDescription for text-format columns of the given names and type OIDs.
pub fn encode_row_description(dst: &mut BytesMut, columns: &[(&str, u32)]) {
    put_message(dst, tag::ROW_DESCRIPTION, |b| {
        b.put_u16(columns.len() as u16);
        for (name, oid) in columns {
            put_cstr(b, name.as_bytes());
            b.put_u32(0); // table
            b.put_i16(0); // column
            b.put_u32(*oid);
            b.put_i16(match *oid {
                oid::INT4 => 4,
                _ => -1,
            });
            b.put_i32(-1); // type modifier
            b.put_i16(0); // text format
        }
    });
}

/// DataRow of text values (`None` is NULL).
pub fn encode_data_row<S: AsRef<str>>(dst: &mut BytesMut, values: &[Option<S>]) {
    put_message(dst, tag::DATA_ROW, |b| {
        b.put_u16(values.len() as u16);
        for v in values {
            match v {
                Some(v) => {
                    b.put_i32(v.as_ref().len() as i32);
                    b.extend_from_slice(v.as_ref().as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

/// CommandComplete with its command tag.
pub fn encode_command_complete(dst: &mut BytesMut, command: &[u8]) {
    put_message(dst, tag::COMMAND_COMPLETE, |b| put_cstr(b, command));
}

/// NegotiateProtocolVersion: the newest minor version Weir speaks and the protocol options
/// (`_pq_.*`) it did not recognise.
pub fn encode_negotiate_protocol_version(dst: &mut BytesMut, minor: u32, unrecognized: &[&str]) {
    put_message(dst, tag::NEGOTIATE_PROTOCOL_VERSION, |b| {
        b.put_u32(minor);
        b.put_u32(unrecognized.len() as u32);
        for o in unrecognized {
            put_cstr(b, o.as_bytes());
        }
    });
}

/// The Authentication* family ('R').
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication<'a> {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<&'a [u8]>,
    },
    SaslContinue(&'a [u8]),
    SaslFinal(&'a [u8]),
    /// Kerberos, GSS, SSPI and anything newer: Weir cannot answer them.
    Other(i32),
}

impl<'a> Authentication<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, Malformed> {
        let m = Malformed {
            what: "Authentication",
        };
        if body.len() < 4 {
            return Err(m);
        }
        let code = i32::from_be_bytes(body[..4].try_into().unwrap());
        let rest = &body[4..];
        Ok(match code {
            0 => Authentication::Ok,
            3 => Authentication::CleartextPassword,
            5 => Authentication::Md5Password {
                salt: rest.try_into().map_err(|_| m)?,
            },
            10 => {
                let mut mechanisms = Vec::new();
                let mut rest = rest;
                loop {
                    let (mech, after) = split_cstr(rest).ok_or(m.clone())?;
                    if mech.is_empty() {
                        break;
                    }
                    mechanisms.push(mech);
                    rest = after;
                }
                Authentication::Sasl { mechanisms }
            }
            11 => Authentication::SaslContinue(rest),
            12 => Authentication::SaslFinal(rest),
            other => Authentication::Other(other),
        })
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        put_message(dst, tag::AUTHENTICATION, |b| match self {
            Authentication::Ok => b.put_i32(0),
            Authentication::CleartextPassword => b.put_i32(3),
            Authentication::Md5Password { salt } => {
                b.put_i32(5);
                b.extend_from_slice(salt);
            }
            Authentication::Sasl { mechanisms } => {
                b.put_i32(10);
                for m in mechanisms {
                    put_cstr(b, m);
                }
                b.put_u8(0);
            }
            Authentication::SaslContinue(d) => {
                b.put_i32(11);
                b.extend_from_slice(d);
            }
            Authentication::SaslFinal(d) => {
                b.put_i32(12);
                b.extend_from_slice(d);
            }
            Authentication::Other(code) => b.put_i32(*code),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;

    fn body_of(buf: &BytesMut, want_tag: u8) -> &[u8] {
        let (h, body) = frame::complete(buf, 1 << 20).unwrap().unwrap();
        assert_eq!(h.tag, want_tag);
        assert_eq!(h.total_len(), buf.len());
        body
    }

    #[test]
    fn authentication_round_trips() {
        let cases = [
            Authentication::Ok,
            Authentication::CleartextPassword,
            Authentication::Md5Password { salt: [1, 2, 3, 4] },
            Authentication::Sasl {
                mechanisms: vec![b"SCRAM-SHA-256"],
            },
            Authentication::SaslContinue(b"r=abc"),
            Authentication::SaslFinal(b"v=xyz"),
        ];
        for case in cases {
            let mut buf = BytesMut::new();
            case.encode(&mut buf);
            assert_eq!(Authentication::decode(body_of(&buf, b'R')).unwrap(), case);
        }
    }

    #[test]
    fn ready_for_query_round_trip() {
        for s in [TxStatus::Idle, TxStatus::InTransaction, TxStatus::Failed] {
            let mut buf = BytesMut::new();
            s.encode(&mut buf);
            assert_eq!(TxStatus::decode(body_of(&buf, b'Z')).unwrap(), s);
        }
        assert!(TxStatus::decode(b"X").is_err());
    }

    #[test]
    fn parameter_status_round_trip() {
        let p = ParameterStatus {
            name: b"TimeZone",
            value: b"UTC",
        };
        let mut buf = BytesMut::new();
        p.encode(&mut buf);
        assert_eq!(ParameterStatus::decode(body_of(&buf, b'S')).unwrap(), p);
    }

    #[test]
    fn backend_key_round_trip() {
        let k = BackendKey {
            pid: 1234,
            secret: -99,
        };
        let mut buf = BytesMut::new();
        k.encode(&mut buf);
        assert_eq!(BackendKey::decode(body_of(&buf, b'K')).unwrap(), k);
    }

    #[test]
    fn static_messages_are_framed() {
        for m in [PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE, NO_DATA] {
            let (h, body) = frame::complete(m, 16).unwrap().unwrap();
            assert_eq!(h.total_len(), m.len());
            assert!(body.is_empty());
        }
    }

    #[test]
    fn row_description_and_data_row_layout() {
        let mut buf = BytesMut::new();
        encode_row_description(&mut buf, &[("a", oid::TEXT), ("n", oid::INT4)]);
        let body = body_of(&buf, b'T');
        assert_eq!(&body[..2], &[0, 2]);
        assert_eq!(&body[2..4], b"a\0");
        assert_eq!(&body[4 + 6..4 + 10], &25u32.to_be_bytes());
        let mut buf = BytesMut::new();
        encode_data_row(&mut buf, &[Some("x"), None]);
        assert_eq!(
            body_of(&buf, b'D'),
            &[0, 2, 0, 0, 0, 1, b'x', 0xff, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn negotiate_protocol_version_layout() {
        let mut buf = BytesMut::new();
        encode_negotiate_protocol_version(&mut buf, 0, &["_pq_.x"]);
        let body = body_of(&buf, b'v');
        assert_eq!(&body[..8], &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&body[8..], b"_pq_.x\0");
    }
}
