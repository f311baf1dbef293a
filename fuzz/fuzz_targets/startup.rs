//! The startup phase, as `weir_proxy::startup::read_hello` drives it: untagged packets
//! (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage, unknown versions) framed by
//! `startup_packet_len` and decoded by `StartupPacket::decode`, one after another, with the
//! replies Weir would send. A decoded StartupMessage or CancelRequest must survive an
//! encode/decode round trip. Any panic is a bug.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use weir_proxy::startup::StartupError;
use weir_wire::frontend::{self, StartupPacket};
use weir_wire::{backend, frame};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        let len = match frame::startup_packet_len(rest) {
            Ok(Some(len)) => len,
            Ok(None) => break,
            Err(e) => return reply(StartupError::from(e)),
        };
        let (packet, after) = rest.split_at(len);
        rest = after;
        match StartupPacket::decode(packet) {
            Err(e) => return reply(StartupError::from(e)),
            Ok(StartupPacket::SslRequest | StartupPacket::GssEncRequest) => continue,
            Ok(StartupPacket::Unsupported { version }) => {
                return reply(StartupError::Version(version));
            }
            Ok(StartupPacket::Cancel(key)) => {
                let mut out = BytesMut::new();
                frontend::encode_cancel_request(&mut out, key.pid, key.secret);
                assert_eq!(StartupPacket::decode(&out), Ok(StartupPacket::Cancel(key)));
                return;
            }
            Ok(StartupPacket::Startup(s)) => {
                let mut out = BytesMut::new();
                s.encode(&mut out);
                assert_eq!(
                    frame::startup_packet_len(&out).ok().flatten(),
                    Some(out.len())
                );
                assert_eq!(
                    StartupPacket::decode(&out),
                    Ok(StartupPacket::Startup(s.clone()))
                );
                let pq: Vec<&str> = s
                    .params
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .filter(|k| k.starts_with("_pq_."))
                    .collect();
                let mut out = BytesMut::new();
                backend::encode_negotiate_protocol_version(&mut out, 0, &pq);
                let _ = (s.get("user"), s.get("database"));
                return;
            }
        }
    }
});

/// The error the proxy would send back, encoded.
fn reply(e: StartupError) {
    if let Some(resp) = e.to_response() {
        let mut out = BytesMut::new();
        resp.encode(&mut out);
        let (_, body) = frame::complete(&out, u32::MAX).unwrap().unwrap();
        assert!(weir_wire::ErrorResponse::decode(body).is_some());
    }
}
