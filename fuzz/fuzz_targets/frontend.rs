//! Everything a client can send, before and after login: the startup packet, every typed
//! frontend message decoder, SCRAM client messages, and the relay's handling of a byte
//! stream with and without a server attached. Any panic is a bug.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use weir_proxy::params::ServerParams;
use weir_proxy::prepared::{ClientStatements, ServerStatements};
use weir_proxy::relay::Relay;
use weir_proxy::server::ServerState;
use weir_wire::frame;
use weir_wire::frontend::{self, Bind, Named, Parse, Query, StartupPacket};
use weir_wire::scram::{ScramServer, Verifier};

fuzz_target!(|data: &[u8]| {
    // Startup phase.
    if let Ok(Some(len)) = frame::startup_packet_len(data) {
        let _ = StartupPacket::decode(&data[..len]);
    }

    // Each framed message through every decoder. A message that decodes must encode back
    // to the same bytes (the proxy re-encodes the Parse, Bind, Describe and Close it
    // rewrites). A SASLInitialResponse starts a SCRAM exchange the next message continues.
    let mut rest = data;
    let mut scram: Option<ScramServer> = None;
    while let Ok(Some((h, body))) = frame::complete(rest, 1 << 20) {
        let msg = &rest[..h.total_len()];
        let mut out = BytesMut::new();
        if let Ok(q) = Query::decode(body) {
            q.encode(&mut out);
            assert_eq!(&out[1..], &msg[1..]);
        }
        if let Ok(p) = Parse::decode(body) {
            out.clear();
            p.encode(&mut out);
            assert_eq!(&out[1..], &msg[1..]);
        }
        if let Ok(b) = Bind::decode(body) {
            out.clear();
            b.encode(&mut out);
            assert_eq!(&out[1..], &msg[1..]);
        }
        if let Ok(n) = Named::decode(body) {
            out.clear();
            n.encode(h.tag, &mut out);
            assert_eq!(&out[..], msg);
        }
        let _ = frontend::decode_password(body);
        if let Some(mut s) = scram.take() {
            let _ = s.client_final(body);
        }
        if let Ok((mech, first)) = frontend::decode_sasl_initial(body) {
            // Over TLS (channel binding data, SCRAM-SHA-256-PLUS offered) unless the tag is 'p'.
            let tls = (h.tag != frontend::tag::PASSWORD).then(|| b"end-point".to_vec());
            let verifier = Verifier {
                iterations: 1,
                salt: vec![1, 2, 3],
                stored_key: [7; 32],
                server_key: [9; 32],
            };
            let mut s = ScramServer::with_channel_binding(verifier, tls);
            if s.client_first(mech, first).is_ok() {
                scram = Some(s);
            }
        }
        let _ = weir_wire::ErrorResponse::decode(body);
        rest = &rest[h.total_len()..];
    }

    // The relay, as a session drives it: no server, then a server.
    for attached in [false, true] {
        let mut relay = Relay::new(true, 1 << 16);
        let mut statements = ClientStatements::default();
        let mut server = ServerState {
            params: ServerParams::default(),
            statements: ServerStatements::new(4),
            broken: false,
        };
        let (mut to_server, mut to_client) = (BytesMut::new(), BytesMut::new());
        let srv = if attached { Some(&mut server) } else { None };
        let _ = relay.from_client(data, &mut statements, srv, &mut to_server, &mut to_client);
    }
});
