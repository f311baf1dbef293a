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

fuzz_target!(|data: &[u8]| {
    // Startup phase.
    if let Ok(Some(len)) = frame::startup_packet_len(data) {
        let _ = StartupPacket::decode(&data[..len]);
    }

    // Each framed message through every decoder.
    let mut rest = data;
    while let Ok(Some((h, body))) = frame::complete(rest, 1 << 20) {
        let _ = Query::decode(body);
        let _ = Parse::decode(body);
        let _ = Bind::decode(body);
        let _ = Named::decode(body);
        let _ = frontend::decode_password(body);
        if let Ok((mech, msg)) = frontend::decode_sasl_initial(body) {
            let mut s = weir_wire::scram::ScramServer::new(weir_wire::scram::Verifier {
                iterations: 1,
                salt: vec![1, 2, 3],
                stored_key: [7; 32],
                server_key: [9; 32],
            });
            if s.client_first(mech, msg).is_ok() {
                let _ = s.client_final(body);
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
