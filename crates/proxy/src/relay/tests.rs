use super::*;
use crate::params::{ParamSet, ServerParams};
use crate::prepared::ServerStatements;
use bytes::BufMut;
use weir_wire::put_message;

fn server(cache: usize) -> ServerState {
    ServerState {
        params: ServerParams::default(),
        statements: ServerStatements::new(cache),
        broken: false,
    }
}

fn client_params() -> ClientParams {
    ClientParams::from_set(ParamSet::default())
}

// ---- frontend message builders ----
fn q(sql: &str) -> BytesMut {
    let mut b = BytesMut::new();
    Query {
        sql: sql.as_bytes(),
    }
    .encode(&mut b);
    b
}
fn parse(name: &str, sql: &str) -> BytesMut {
    let mut b = BytesMut::new();
    Parse {
        name: name.as_bytes(),
        query: sql.as_bytes(),
        param_types: &[0, 0],
    }
    .encode(&mut b);
    b
}
fn bind(stmt: &str) -> BytesMut {
    let mut b = BytesMut::new();
    Bind {
        portal: b"",
        statement: stmt.as_bytes(),
        rest: &[0, 0, 0, 0, 0, 0],
    }
    .encode(&mut b);
    b
}
fn describe_stmt(name: &str) -> BytesMut {
    let mut b = BytesMut::new();
    Named {
        target: Target::Statement,
        name: name.as_bytes(),
    }
    .encode(tag::DESCRIBE, &mut b);
    b
}
fn close_stmt(name: &str) -> BytesMut {
    let mut b = BytesMut::new();
    Named {
        target: Target::Statement,
        name: name.as_bytes(),
    }
    .encode(tag::CLOSE, &mut b);
    b
}
fn execute() -> BytesMut {
    let mut b = BytesMut::new();
    put_message(&mut b, tag::EXECUTE, |b| {
        b.put_u8(0);
        b.put_i32(0);
    });
    b
}
fn simple(t: u8) -> BytesMut {
    let mut b = BytesMut::new();
    frontend::encode_empty(t, &mut b);
    b
}
fn cat(parts: &[BytesMut]) -> BytesMut {
    let mut b = BytesMut::new();
    for p in parts {
        b.extend_from_slice(p);
    }
    b
}

// ---- backend message builders ----
fn rfq(s: u8) -> BytesMut {
    let mut b = BytesMut::new();
    TxStatus::from_byte(s).unwrap().encode(&mut b);
    b
}
fn be(t: u8, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    put_message(&mut b, t, |b| b.extend_from_slice(body));
    b
}
fn cc(tagtext: &str) -> BytesMut {
    let mut b = BytesMut::new();
    backend::encode_command_complete(&mut b, tagtext.as_bytes());
    b
}
fn err(code: SqlState, sev: Severity) -> BytesMut {
    let mut b = BytesMut::new();
    ErrorResponse::new(sev, code, "boom").encode(&mut b);
    b
}
fn param_status(k: &str, v: &str) -> BytesMut {
    let mut b = BytesMut::new();
    ParameterStatus {
        name: k.as_bytes(),
        value: v.as_bytes(),
    }
    .encode(&mut b);
    b
}

/// Tags of the messages in a buffer, in order.
fn tags(buf: &[u8]) -> String {
    let mut out = String::new();
    let mut rest = buf;
    while let Some((h, _)) = weir_wire::frame::complete(rest, u32::MAX).unwrap() {
        out.push(h.tag as char);
        rest = &rest[h.total_len()..];
    }
    assert!(rest.is_empty(), "trailing partial message");
    out
}

/// Runs server bytes through the relay and returns what the client receives.
fn deliver(relay: &mut Relay, srv: &mut ServerState, input: &[u8]) -> BytesMut {
    let mut scratch = BytesMut::new();
    let (n, copied) = relay
        .from_server(
            input,
            srv,
            &mut client_params(),
            &mut ClientStatements::default(),
            &mut scratch,
        )
        .unwrap();
    assert_eq!(n, input.len(), "all complete input consumed");
    if copied {
        scratch
    } else {
        BytesMut::from(&input[..n])
    }
}

/// Bind, Execute and Sync of the client's statement `name`: running it again.
fn bind_run(name: &str) -> BytesMut {
    cat(&[bind(name), execute(), simple(b'S')])
}

/// The client prepares and runs `name` once on `srv`, which answers it: afterwards the
/// server has the statement and nothing is owed.
fn run_once(
    relay: &mut Relay,
    stmts: &mut ClientStatements,
    srv: &mut ServerState,
    name: &str,
    sql: &str,
) {
    send(
        relay,
        stmts,
        Some(srv),
        &cat(&[parse(name, sql), bind(name), execute(), simple(b'S')]),
    );
    let got = deliver(
        relay,
        srv,
        &cat(&[be(b'1', b""), be(b'2', b""), cc("SELECT 1"), rfq(b'I')]),
    );
    assert_eq!(tags(&got), "12CZ");
}

struct Sent {
    step: ClientStep,
    to_server: BytesMut,
    to_client: BytesMut,
}

fn send(
    relay: &mut Relay,
    stmts: &mut ClientStatements,
    srv: Option<&mut ServerState>,
    input: &[u8],
) -> Sent {
    let mut to_server = BytesMut::new();
    let mut to_client = BytesMut::new();
    let step = relay
        .from_client(input, stmts, srv, &mut to_server, &mut to_client)
        .unwrap();
    Sent {
        step,
        to_server,
        to_client,
    }
}

#[test]
fn simple_query_round_trip_uses_fast_path() {
    let mut r = Relay::new(true, 1 << 20);
    let mut s = server(8);
    let mut st = ClientStatements::default();
    let sent = send(&mut r, &mut st, Some(&mut s), &q("select 1"));
    assert_eq!(sent.step, ClientStep::Done(sent.to_server.len()));
    assert_eq!(tags(&sent.to_server), "Q");
    assert!(!r.is_idle());
    let reply = cat(&[
        be(b'T', b"\0\0"),
        be(b'D', b"\0\0"),
        cc("SELECT 1"),
        rfq(b'I'),
    ]);
    let mut scratch = BytesMut::new();
    let (n, copied) = r
        .from_server(
            &reply,
            &mut s,
            &mut client_params(),
            &mut ClientStatements::default(),
            &mut scratch,
        )
        .unwrap();
    assert_eq!(
        (n, copied),
        (reply.len(), false),
        "no copy when everything is forwarded"
    );
    assert!(r.is_idle());
}

#[test]
fn transaction_keeps_connection_until_idle() {
    let mut r = Relay::new(true, 1 << 20);
    let mut s = server(8);
    let mut st = ClientStatements::default();
    send(&mut r, &mut st, Some(&mut s), &q("begin"));
    deliver(&mut r, &mut s, &cat(&[cc("BEGIN"), rfq(b'T')]));
    assert!(
        !r.is_idle() && r.nothing_owed(),
        "in a transaction, nothing owed"
    );
    send(&mut r, &mut st, Some(&mut s), &q("commit"));
    deliver(&mut r, &mut s, &cat(&[cc("COMMIT"), rfq(b'I')]));
    assert!(r.is_idle());
}

#[test]
fn pipelined_syncs_all_owed() {
    let mut r = Relay::new(true, 1 << 20);
    let mut s = server(8);
    let mut st = ClientStatements::default();
    let batch = cat(&[
        parse("", "select 1"),
        bind(""),
        execute(),
        simple(b'S'),
        bind(""),
        execute(),
        simple(b'S'),
    ]);
    send(&mut r, &mut st, Some(&mut s), &batch);
    deliver(
        &mut r,
        &mut s,
        &cat(&[be(b'1', b""), be(b'2', b""), cc("SELECT 1"), rfq(b'I')]),
    );
    assert!(!r.is_idle(), "second Sync still owed");
    deliver(
        &mut r,
        &mut s,
        &cat(&[be(b'2', b""), cc("SELECT 1"), rfq(b'I')]),
    );
    assert!(r.is_idle());
}

#[test]
fn named_statement_is_renamed_and_prepared_lazily_per_server() {
    let mut r = Relay::new(true, 1 << 20);
    let (mut a, mut b) = (server(8), server(8));
    let mut st = ClientStatements::default();

    // First use, on server A: the client's Parse goes out renamed.
    let sent = send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[parse("s1", "select 1"), bind("s1"), execute(), simple(b'S')]),
    );
    assert_eq!(tags(&sent.to_server), "PBES");
    assert!(sent.to_server.windows(5).any(|w| w == b"weir_"));
    assert!(
        !sent.to_server.windows(3).any(|w| w == b"s1\0"),
        "client name never reaches the server"
    );
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[be(b'1', b""), be(b'2', b""), cc("SELECT 1"), rfq(b'I')]),
    );
    assert_eq!(tags(&got), "12CZ");

    // Next transaction lands on server B, which lacks it: Weir injects the Parse and hides its reply.
    let sent = send(
        &mut r,
        &mut st,
        Some(&mut b),
        &cat(&[bind("s1"), execute(), simple(b'S')]),
    );
    assert_eq!(tags(&sent.to_server), "PBES");
    let got = deliver(
        &mut r,
        &mut b,
        &cat(&[be(b'1', b""), be(b'2', b""), cc("SELECT 1"), rfq(b'I')]),
    );
    assert_eq!(tags(&got), "2CZ");
    assert!(r.is_idle());

    // Back on A, which has it: nothing injected.
    let sent = send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[bind("s1"), execute(), simple(b'S')]),
    );
    assert_eq!(tags(&sent.to_server), "BES");
}

#[test]
fn parse_of_statement_server_has_is_answered_in_place() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let (mut c1, mut c2) = (ClientStatements::default(), ClientStatements::default());
    send(
        &mut r,
        &mut c1,
        Some(&mut a),
        &cat(&[parse("x", "select 1"), simple(b'S')]),
    );
    deliver(&mut r, &mut a, &cat(&[be(b'1', b""), rfq(b'I')]));
    // Another client prepares the same text under another name on the same server.
    let sent = send(
        &mut r,
        &mut c2,
        Some(&mut a),
        &cat(&[
            parse("other", "select 1"),
            describe_stmt("other"),
            simple(b'S'),
        ]),
    );
    assert_eq!(tags(&sent.to_server), "DS", "Parse not sent again");
    assert_eq!(
        tags(&sent.to_client),
        "1",
        "ParseComplete synthesised at once: nothing owed before it"
    );
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[be(b't', b"\0\0"), be(b'n', b""), rfq(b'I')]),
    );
    assert_eq!(tags(&got), "tnZ");
    assert!(r.is_idle());
}

#[test]
fn synthesised_reply_waits_for_earlier_replies() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let mut st = ClientStatements::default();
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[parse("x", "select 1"), simple(b'S')]),
    );
    deliver(&mut r, &mut a, &cat(&[be(b'1', b""), rfq(b'I')]));
    // Bind (owed by the server), then a Parse the server has (synthesised), then Sync.
    let sent = send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[bind("x"), parse("x", "select 1"), simple(b'S')]),
    );
    assert_eq!(tags(&sent.to_client), "", "BindComplete must come first");
    let got = deliver(&mut r, &mut a, &cat(&[be(b'2', b""), rfq(b'I')]));
    assert_eq!(tags(&got), "21Z");
}

#[test]
fn same_name_different_sql_per_client() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let (mut c1, mut c2) = (ClientStatements::default(), ClientStatements::default());
    let s1 = send(
        &mut r,
        &mut c1,
        Some(&mut a),
        &cat(&[parse("s", "select 1"), simple(b'S')]),
    );
    deliver(&mut r, &mut a, &cat(&[be(b'1', b""), rfq(b'I')]));
    let s2 = send(
        &mut r,
        &mut c2,
        Some(&mut a),
        &cat(&[parse("s", "select 2"), simple(b'S')]),
    );
    deliver(&mut r, &mut a, &cat(&[be(b'1', b""), rfq(b'I')]));
    assert_ne!(c1.get(b"s").unwrap().id, c2.get(b"s").unwrap().id);
    assert_eq!(
        tags(&s2.to_server),
        "PS",
        "different text is prepared separately"
    );
    assert_ne!(s1.to_server, s2.to_server);
}

#[test]
fn close_and_deallocate_are_answered_without_a_server() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let mut st = ClientStatements::default();
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[
            parse("s1", "select 1"),
            parse("s2", "select 2"),
            simple(b'S'),
        ]),
    );
    deliver(
        &mut r,
        &mut a,
        &cat(&[be(b'1', b""), be(b'1', b""), rfq(b'I')]),
    );

    let sent = send(
        &mut r,
        &mut st,
        None,
        &cat(&[close_stmt("s1"), simple(b'S')]),
    );
    assert!(matches!(sent.step, ClientStep::Done(_)));
    assert_eq!(tags(&sent.to_client), "3Z");
    assert!(st.get(b"s1").is_none());
    assert_eq!(a.statements.len(), 2, "the shared server statement stays");

    let sent = send(&mut r, &mut st, None, &q("DEALLOCATE s2"));
    assert_eq!(tags(&sent.to_client), "CZ");
    assert!(st.is_empty());

    // Unknown name: the server's own error is what the client should see.
    let sent = send(&mut r, &mut st, None, &q("deallocate nope"));
    assert_eq!(sent.step, ClientStep::NeedServer(0));
}

#[test]
fn discard_all_clears_both_sides_when_the_server_confirms_it() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let mut st = ClientStatements::default();
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[parse("s1", "select 1"), simple(b'S')]),
    );
    deliver(&mut r, &mut a, &cat(&[be(b'1', b""), rfq(b'I')]));
    // Rejected (inside a transaction block): nothing is forgotten.
    let sent = send(&mut r, &mut st, Some(&mut a), &q("discard all;"));
    assert_eq!(tags(&sent.to_server), "Q");
    let mut scratch = BytesMut::new();
    let reply = cat(&[err(SqlState(*b"25001"), Severity::Error), rfq(b'T')]);
    r.from_server(&reply, &mut a, &mut client_params(), &mut st, &mut scratch)
        .unwrap();
    assert_eq!((st.len(), a.statements.len()), (1, 1));
    // Confirmed, however it was sent: both sides forget.
    send(&mut r, &mut st, Some(&mut a), &q("select 1; discard all"));
    let reply = cat(&[cc("SELECT 1"), cc("DISCARD ALL"), rfq(b'I')]);
    r.from_server(&reply, &mut a, &mut client_params(), &mut st, &mut scratch)
        .unwrap();
    assert!(st.is_empty() && a.statements.is_empty());
}

#[test]
fn error_mid_batch_skips_to_sync_and_forgets_failed_prepare() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let mut st = ClientStatements::default();
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[
            parse("bad", "selec 1"),
            bind("bad"),
            execute(),
            simple(b'S'),
        ]),
    );
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[err(SqlState(*b"42601"), Severity::Error), rfq(b'I')]),
    );
    assert_eq!(tags(&got), "EZ");
    assert!(r.is_idle());
    assert!(
        a.statements.is_empty(),
        "a Parse that failed is not recorded as prepared"
    );
}

/// psycopg's pipeline: the server's error can arrive before the client has sent the Sync
/// that ends the batch. The server ignores everything up to that Sync, so what the client
/// sends in between must owe nothing (here a Bind that makes Weir evict and prepare), or the
/// server's ReadyForQuery would meet a queue expecting replies that never come.
#[test]
fn messages_between_a_server_error_and_the_clients_sync_owe_nothing() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(1);
    let mut st = ClientStatements::default();
    let first = send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[parse("s1", "select 1/0"), bind("s1"), execute()]),
    );
    assert_eq!(tags(&first.to_server), "PBE");
    let got = deliver(&mut r, &mut a, &cat(&[be(b'1', b""), be(b'2', b"")]));
    assert_eq!(tags(&got), "12");
    let got = deliver(&mut r, &mut a, &err(SqlState(*b"22012"), Severity::Error));
    assert_eq!(tags(&got), "E");
    // The rest of the pipeline: a new statement (cache of one: s1's would be evicted), then
    // the Sync.
    let rest = send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[parse("s2", "select 2"), bind("s2"), execute(), simple(b'S')]),
    );
    assert_eq!(tags(&rest.to_server), "S", "the server would skip the rest");
    let got = deliver(&mut r, &mut a, &rfq(b'I'));
    assert_eq!(tags(&got), "Z");
    assert!(r.is_idle());
    // s2 was never prepared (PostgreSQL skipped its Parse too): using it is an error the
    // server gives, as it would directly.
    let after = send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[bind("s2"), simple(b'S')]),
    );
    assert_eq!(tags(&after.to_server), "BS");
}

/// After an error in an extended batch PostgreSQL skips everything up to the Sync, a simple
/// Query sent before that Sync included: its ReadyForQuery never comes, and the one that
/// does answers the Sync.
#[test]
fn a_query_inside_a_failed_extended_batch_is_skipped_as_postgres_does() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let mut st = ClientStatements::default();
    let sent = send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[
            parse("", "select 1/0"),
            bind(""),
            execute(),
            q("select 2"),
            simple(b'S'),
        ]),
    );
    assert_eq!(tags(&sent.to_server), "PBEQS");
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[
            be(b'1', b""),
            err(SqlState(*b"22012"), Severity::Error),
            rfq(b'I'),
        ]),
    );
    assert_eq!(tags(&got), "1EZ");
    assert!(r.is_idle(), "nothing more is owed");
    assert!(!a.broken);
}

/// A client pipelining across Syncs (tokio-postgres with concurrent queries does): Weir's
/// Close of an evicted statement in one batch is skipped by an error there, while the next
/// batch, already sent, prepares that statement again. That batch closes it again first, so
/// its Parse does not find the name taken (42P05) and the records stay true.
#[test]
fn a_close_skipped_in_one_batch_is_repeated_before_the_next_prepares_it() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(1);
    let mut st = ClientStatements::default();
    // "old" is on the server.
    run_once(&mut r, &mut st, &mut a, "old", "select 1");
    // Batch 1 fails first, then would evict "old" (cache of one) to prepare "new".
    let b1 = send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[
            parse("", "select 1/0"),
            bind(""),
            execute(),
            parse("new", "select 2"),
            bind("new"),
            execute(),
            simple(b'S'),
        ]),
    );
    assert_eq!(tags(&b1.to_server), "PBECPBES");
    // Batch 2, before any reply (so nothing is evicted: replies are owed): "old" again. Its
    // Close is in flight, so it is closed again before its Parse.
    let b2 = send(&mut r, &mut st, Some(&mut a), &bind_run("old"));
    assert_eq!(tags(&b2.to_server), "CPBES");
    // The server: batch 1 fails at its Bind and skips the rest; batch 2 runs.
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[
            be(b'1', b""),
            err(SqlState(*b"22012"), Severity::Error),
            rfq(b'I'),
            be(b'3', b""),
            be(b'1', b""),
            be(b'2', b""),
            cc("SELECT 1"),
            rfq(b'I'),
        ]),
    );
    assert_eq!(
        tags(&got),
        "1EZ2CZ",
        "Weir's own Closes and Parse are hidden"
    );
    assert!(r.is_idle());
    // "old" is recorded as there, and nothing is left to close.
    let again = send(&mut r, &mut st, Some(&mut a), &bind_run("old"));
    assert_eq!(tags(&again.to_server), "BES");
}

/// Within one failing batch: Weir evicts "old" (Close), then the client uses "old" again, so
/// Weir closes it again and prepares it; the error skips all of it. The server still has
/// "old" and Weir does not count it: the next use closes it once before preparing it.
#[test]
fn statements_whose_closes_were_all_skipped_are_closed_before_their_next_parse() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(1);
    let mut st = ClientStatements::default();
    run_once(&mut r, &mut st, &mut a, "old", "select 1");
    let sent = send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[
            parse("", "select 1/0"),
            bind(""),
            execute(),
            parse("new", "select 2"),
            bind("new"),
            execute(),
            bind("old"),
            execute(),
            simple(b'S'),
        ]),
    );
    assert_eq!(tags(&sent.to_server), "PBECPBECPBES");
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[
            be(b'1', b""),
            err(SqlState(*b"22012"), Severity::Error),
            rfq(b'I'),
        ]),
    );
    assert_eq!(tags(&got), "1EZ");
    let next = send(&mut r, &mut st, Some(&mut a), &bind_run("old"));
    assert_eq!(tags(&next.to_server), "CPBES", "one Close, then the Parse");
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[
            be(b'3', b""),
            be(b'1', b""),
            be(b'2', b""),
            cc("SELECT 1"),
            rfq(b'I'),
        ]),
    );
    assert_eq!(tags(&got), "2CZ");
    let again = send(&mut r, &mut st, Some(&mut a), &bind_run("old"));
    assert_eq!(tags(&again.to_server), "BES");
}

/// A Sync sent during a COPY started by a simple Query is ignored by the server, and the
/// Query's ReadyForQuery ends it all: the connection is free after it.
#[test]
fn a_sync_sent_during_a_simple_query_copy_leaves_nothing_open() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let mut st = ClientStatements::default();
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[q("copy t from stdin"), simple(b'S')]),
    );
    deliver(&mut r, &mut a, &be(b'G', &[0, 0, 0]));
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[be(b'd', b"1\n"), simple(b'c')]),
    );
    let got = deliver(&mut r, &mut a, &cat(&[cc("COPY 1"), rfq(b'I')]));
    assert_eq!(tags(&got), "CZ");
    assert!(r.is_idle());
}

/// A batch's Parse of a statement is skipped by an error, while the next batch, already
/// sent, prepares it again (here because another connection found plans outdated in
/// between): the skip must not make Weir forget what the later Parse creates.
#[test]
fn a_skipped_parse_does_not_forget_a_later_batchs_parse_of_the_same_statement() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let shared = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    a.statements.share_plan_changes(shared.clone());
    let mut st = ClientStatements::default();
    let b1 = send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[
            parse("", "select 1/0"),
            bind(""),
            execute(),
            parse("s", "select 2"),
            bind("s"),
            execute(),
            simple(b'S'),
        ]),
    );
    assert_eq!(tags(&b1.to_server), "PBEPBES");
    shared.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let b2 = send(&mut r, &mut st, Some(&mut a), &bind_run("s"));
    assert_eq!(
        tags(&b2.to_server),
        "CPBES",
        "outdated: closed and prepared afresh"
    );
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[
            be(b'1', b""),
            err(SqlState(*b"22012"), Severity::Error),
            rfq(b'I'),
            be(b'3', b""),
            be(b'1', b""),
            be(b'2', b""),
            cc("SELECT 1"),
            rfq(b'I'),
        ]),
    );
    assert_eq!(tags(&got), "1EZ2CZ");
    let again = send(&mut r, &mut st, Some(&mut a), &bind_run("s"));
    assert_eq!(
        tags(&again.to_server),
        "BES",
        "the server has it, and Weir knows"
    );
}

/// Only PostgreSQL's refusal of an outdated plan makes the database's connections prepare
/// their statements again, not every 0A000 (the planner raises that code too).
#[test]
fn only_the_outdated_plan_error_counts_as_one() {
    let body = |fields: &[(u8, &str)]| {
        let mut b = Vec::new();
        for (f, v) in fields {
            b.push(*f);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    };
    let outdated = "cached plan must not change result type";
    let routine = body(&[
        (b'S', "ERROR"),
        (b'C', "0A000"),
        (b'M', "plan en cache"),
        (b'R', "RevalidateCachedQuery"),
    ]);
    assert!(
        is_outdated_plan(&routine, "plan en cache"),
        "by routine, whatever the language"
    );
    let planner = body(&[
        (b'C', "0A000"),
        (
            b'M',
            "FULL JOIN is only supported with merge-joinable join conditions",
        ),
        (b'R', "select_mergejoin_clauses"),
    ]);
    assert!(!is_outdated_plan(
        &planner,
        "FULL JOIN is only supported with merge-joinable join conditions"
    ));
    let no_routine = body(&[(b'C', "0A000"), (b'M', outdated)]);
    assert!(
        is_outdated_plan(&no_routine, outdated),
        "by message where no routine is sent"
    );
    assert_eq!(weir_wire::error::field(&routine, b'C'), Some(&b"0A000"[..]));
    assert_eq!(weir_wire::error::field(&routine, b'D'), None);
}

#[test]
fn parameter_sync_replies_are_hidden() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let mut cp = client_params();
    let mut to_server = BytesMut::new();
    r.inject_query("SET timezone TO E'UTC';", &mut to_server);
    let mut st = ClientStatements::default();
    let mut to_client = BytesMut::new();
    r.from_client(
        &q("select 1"),
        &mut st,
        Some(&mut a),
        &mut to_server,
        &mut to_client,
    )
    .unwrap();
    assert_eq!(tags(&to_server), "QQ");
    let reply = cat(&[
        param_status("TimeZone", "UTC"),
        cc("SET"),
        rfq(b'I'),
        cc("SELECT 1"),
        rfq(b'I'),
    ]);
    let mut scratch = BytesMut::new();
    let (n, copied) = r
        .from_server(
            &reply,
            &mut a,
            &mut cp,
            &mut ClientStatements::default(),
            &mut scratch,
        )
        .unwrap();
    assert_eq!(n, reply.len());
    assert!(copied);
    assert_eq!(tags(&scratch), "CZ");
    assert_eq!(a.params.reported.get("timezone"), Some("UTC"));
    assert_eq!(
        cp.wanted().get("timezone"),
        None,
        "the client's view is not changed by Weir's own SET"
    );
}

#[test]
fn client_set_is_tracked() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let mut cp = client_params();
    let mut st = ClientStatements::default();
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &q("set timezone = 'Asia/Tokyo'"),
    );
    let mut scratch = BytesMut::new();
    let reply = cat(&[param_status("TimeZone", "Asia/Tokyo"), cc("SET"), rfq(b'I')]);
    r.from_server(
        &reply,
        &mut a,
        &mut cp,
        &mut ClientStatements::default(),
        &mut scratch,
    )
    .unwrap();
    assert_eq!(cp.wanted().get("TimeZone"), Some("Asia/Tokyo"));
}

#[test]
fn large_rows_stream_in_pieces() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let mut st = ClientStatements::default();
    send(&mut r, &mut st, Some(&mut a), &q("select big"));
    let row = be(b'D', &vec![7u8; 100_000]);
    let whole = cat(&[row, cc("SELECT 1"), rfq(b'I')]);
    // Feed it as a socket would: 4 KB at a time into a buffer; what is consumed leaves it.
    let mut rbuf = BytesMut::new();
    let mut received = BytesMut::new();
    for chunk in whole.chunks(4096) {
        rbuf.extend_from_slice(chunk);
        let mut scratch = BytesMut::new();
        let (n, copied) = r
            .from_server(
                &rbuf,
                &mut a,
                &mut client_params(),
                &mut ClientStatements::default(),
                &mut scratch,
            )
            .unwrap();
        received.extend_from_slice(if copied { &scratch[..] } else { &rbuf[..n] });
        let _ = rbuf.split_to(n);
        assert!(
            rbuf.len() < 4096,
            "the row is relayed as it arrives, not buffered whole"
        );
    }
    assert!(rbuf.is_empty());
    assert_eq!(received, whole);
    assert!(r.is_idle());
}

#[test]
fn fatal_marks_server_broken() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let got = deliver(
        &mut r,
        &mut a,
        &err(SqlState::ADMIN_SHUTDOWN, Severity::Fatal),
    );
    assert_eq!(tags(&got), "E");
    assert!(a.broken && r.fatal_relayed);
}

#[test]
fn messages_needing_a_server_stop_the_batch() {
    let mut r = Relay::new(true, 1 << 20);
    let mut st = ClientStatements::default();
    let sent = send(
        &mut r,
        &mut st,
        None,
        &cat(&[simple(b'S'), parse("", "select 1")]),
    );
    assert_eq!(sent.step, ClientStep::NeedServer(5));
    assert_eq!(
        tags(&sent.to_client),
        "Z",
        "a lone Sync is answered without a server"
    );
    let sent = send(&mut r, &mut st, None, &simple(b'X'));
    assert_eq!(sent.step, ClientStep::Terminate(0));
}

#[test]
fn hostile_client_messages_are_errors() {
    let mut r = Relay::new(true, 1 << 20);
    let mut st = ClientStatements::default();
    let mut a = server(8);
    let (mut ts, mut tc) = (BytesMut::new(), BytesMut::new());
    let e = r
        .from_client(&be(b'p', b"pw\0"), &mut st, Some(&mut a), &mut ts, &mut tc)
        .unwrap_err();
    assert!(matches!(e, ClientProtocolError::NotAllowed(b'p')));
    let e = r
        .from_client(
            &[b'Q', 0x7f, 0xff, 0xff, 0xff],
            &mut st,
            Some(&mut a),
            &mut ts,
            &mut tc,
        )
        .unwrap_err();
    assert!(matches!(
        e,
        ClientProtocolError::Frame(FrameError::TooLarge { .. })
    ));
    let e = r
        .from_client(&[b'Q', 0, 0, 0, 2], &mut st, Some(&mut a), &mut ts, &mut tc)
        .unwrap_err();
    assert!(matches!(
        e,
        ClientProtocolError::Frame(FrameError::LengthTooShort { .. })
    ));
    assert_malformed(&mut r, &be(b'P', b"no-terminator"), Some(&mut a));
}

/// `msg` is refused as malformed, with or without a server attached.
fn assert_malformed(r: &mut Relay, msg: &[u8], server: Option<&mut ServerState>) {
    let (mut ts, mut tc) = (BytesMut::new(), BytesMut::new());
    let e = r
        .from_client(
            msg,
            &mut ClientStatements::default(),
            server,
            &mut ts,
            &mut tc,
        )
        .unwrap_err();
    assert!(matches!(e, ClientProtocolError::Malformed(_)), "{msg:?}");
}

#[test]
fn failed_batch_skips_to_sync() {
    let mut r = Relay::new(true, 1 << 20);
    let mut st = ClientStatements::default();
    let mut to_client = BytesMut::new();
    assert_eq!(r.fail_batch(&parse("", "x"), &mut to_client), 0);
    let sent = send(
        &mut r,
        &mut st,
        None,
        &cat(&[parse("", "x"), bind(""), execute(), simple(b'S')]),
    );
    assert!(matches!(sent.step, ClientStep::Done(_)));
    assert_eq!(tags(&sent.to_client), "Z");
}

#[test]
fn statement_cache_bound_closes_old_statements() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(1);
    let mut st = ClientStatements::default();
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[parse("s1", "select 1"), simple(b'S')]),
    );
    deliver(&mut r, &mut a, &cat(&[be(b'1', b""), rfq(b'I')]));
    let sent = send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[parse("s2", "select 2"), simple(b'S')]),
    );
    assert_eq!(
        tags(&sent.to_server),
        "CPS",
        "old statement closed before the new one is prepared"
    );
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[be(b'3', b""), be(b'1', b""), rfq(b'I')]),
    );
    assert_eq!(tags(&got), "1Z", "Weir's CloseComplete is hidden");
    assert_eq!(a.statements.len(), 1);
    // s1 is used again: prepared again on demand.
    let sent = send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[bind("s1"), execute(), simple(b'S')]),
    );
    assert_eq!(tags(&sent.to_server), "CPBES");
}

#[test]
fn session_mode_passes_names_through() {
    let mut r = Relay::new(false, 1 << 20);
    let mut a = server(8);
    let mut st = ClientStatements::default();
    let batch = cat(&[
        parse("s1", "select 1"),
        bind("s1"),
        close_stmt("s1"),
        simple(b'S'),
    ]);
    let sent = send(&mut r, &mut st, Some(&mut a), &batch);
    assert_eq!(sent.to_server, batch);
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[be(b'1', b""), be(b'2', b""), be(b'3', b""), rfq(b'I')]),
    );
    assert_eq!(tags(&got), "123Z");
}

#[test]
fn copy_in_streams_large_copy_data() {
    let mut r = Relay::new(true, 1 << 16);
    let mut a = server(8);
    let mut st = ClientStatements::default();
    send(&mut r, &mut st, Some(&mut a), &q("copy t from stdin"));
    deliver(&mut r, &mut a, &be(b'G', &[0, 0, 0]));
    assert!(!r.nothing_owed());
    // A CopyData larger than max_message_size still passes: it is streamed, not buffered.
    let data = be(b'd', &vec![1u8; 200_000]);
    let mut forwarded = 0;
    for chunk in data.chunks(30_000) {
        let sent = send(&mut r, &mut st, Some(&mut a), chunk);
        assert_eq!(sent.step, ClientStep::Done(chunk.len()));
        forwarded += sent.to_server.len();
    }
    assert_eq!(forwarded, data.len());
    send(&mut r, &mut st, Some(&mut a), &simple(b'c'));
    deliver(&mut r, &mut a, &cat(&[cc("COPY 1"), rfq(b'I')]));
    assert!(r.is_idle());
}

#[test]
fn classify() {
    assert_eq!(
        classify_sql(b"DEALLOCATE PREPARE foo"),
        SqlKind::Deallocate(b"foo".to_vec())
    );
    assert_eq!(
        classify_sql(b" deallocate \"Foo\" ; "),
        SqlKind::Deallocate(b"Foo".to_vec())
    );
    assert_eq!(classify_sql(b"DEALLOCATE ALL"), SqlKind::DeallocateAll);
    assert_eq!(
        classify_sql(b"discard all"),
        SqlKind::Other,
        "DISCARD ALL goes to the server"
    );
    assert_eq!(classify_sql(b"discard plans"), SqlKind::Other);
    assert_eq!(classify_sql(b"select 1"), SqlKind::Other);
}

#[test]
fn named_parse_without_a_server_is_answered_and_prepared_on_first_use() {
    let mut r = Relay::new(true, 1 << 20);
    let mut st = ClientStatements::default();
    let sent = send(
        &mut r,
        &mut st,
        None,
        &cat(&[parse("p0", "select 1"), simple(b'S')]),
    );
    assert!(matches!(sent.step, ClientStep::Done(_)));
    assert_eq!(tags(&sent.to_client), "1Z");
    assert!(sent.to_server.is_empty());
    let mut a = server(8);
    let sent = send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[bind("p0"), execute(), simple(b'S')]),
    );
    assert_eq!(tags(&sent.to_server), "PBES");
    deliver(
        &mut r,
        &mut a,
        &cat(&[be(b'1', b""), be(b'2', b""), cc("SELECT 1"), rfq(b'I')]),
    );
    // A bad statement surfaces on first use, and stays bad.
    send(
        &mut r,
        &mut st,
        None,
        &cat(&[parse("bad", "selec"), simple(b'S')]),
    );
    let sent = send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[bind("bad"), execute(), simple(b'S')]),
    );
    assert_eq!(tags(&sent.to_server), "PBES");
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[err(SqlState(*b"42601"), Severity::Error), rfq(b'I')]),
    );
    assert_eq!(tags(&got), "EZ");
    assert!(r.is_idle());
    assert!(
        !a.statements.touch(st.get(b"bad").unwrap().id),
        "the failed statement is not recorded"
    );
}

#[test]
fn syncs_sent_during_extended_copy_in_owe_nothing() {
    // tokio-postgres: Bind, Execute, Sync; then CopyData..., CopyDone, Sync.
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let mut st = ClientStatements::default();
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[bind("s0"), execute(), simple(b'S')]),
    );
    deliver(&mut r, &mut a, &cat(&[be(b'2', b""), be(b'G', &[0, 0, 0])]));
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[be(b'd', b"1\n"), simple(b'c'), simple(b'S')]),
    );
    let got = deliver(&mut r, &mut a, &cat(&[cc("COPY 1"), rfq(b'I')]));
    assert_eq!(tags(&got), "CZ");
    assert!(r.is_idle(), "one ReadyForQuery for two Syncs");

    // The whole exchange pipelined before the server answers anything.
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[
            bind("s0"),
            execute(),
            simple(b'S'),
            be(b'd', b"1\n"),
            simple(b'c'),
            simple(b'S'),
        ]),
    );
    deliver(
        &mut r,
        &mut a,
        &cat(&[be(b'2', b""), be(b'G', &[0, 0, 0]), cc("COPY 1"), rfq(b'I')]),
    );
    assert!(r.is_idle());

    // An error mid-copy: the server skips to the client's last Sync.
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[bind("s0"), execute(), simple(b'S')]),
    );
    deliver(&mut r, &mut a, &cat(&[be(b'2', b""), be(b'G', &[0, 0, 0])]));
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[be(b'd', b"bad\n"), simple(b'c'), simple(b'S')]),
    );
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[err(SqlState(*b"22P02"), Severity::Error), rfq(b'I')]),
    );
    assert_eq!(tags(&got), "EZ");
    assert!(r.is_idle());
}

#[test]
fn extended_batch_without_sync_keeps_the_connection() {
    // P B E with a large result: the server flushes everything but ReadyForQuery before the
    // client's Sync arrives. The implicit transaction is still open.
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let mut st = ClientStatements::default();
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[parse("", "insert"), bind(""), execute()]),
    );
    deliver(
        &mut r,
        &mut a,
        &cat(&[
            be(b'1', b""),
            be(b'2', b""),
            be(b'D', &[0; 9000]),
            cc("INSERT 0 1"),
        ]),
    );
    assert!(r.nothing_owed() && r.unsynced());
    assert!(!r.is_idle(), "no release before the Sync");
    send(&mut r, &mut st, Some(&mut a), &simple(b'S'));
    deliver(&mut r, &mut a, &rfq(b'I'));
    assert!(r.is_idle());
    // A departing client's open batch is ended with Weir's own Sync, whose reply is hidden.
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[parse("", "select 1"), bind(""), simple(b'H')]),
    );
    let mut to_server = BytesMut::new();
    r.inject_sync(&mut to_server);
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[be(b'1', b""), be(b'2', b""), rfq(b'I')]),
    );
    assert_eq!(tags(&got), "12");
    assert!(r.is_idle());
}

#[test]
fn copy_that_never_starts_leaves_no_marker_behind() {
    // B E S d c S pipelined, and the Execute fails: the server answers both Syncs.
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let mut st = ClientStatements::default();
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[
            bind("s0"),
            execute(),
            simple(b'S'),
            be(b'd', b"1\n"),
            simple(b'c'),
            simple(b'S'),
        ]),
    );
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[
            be(b'2', b""),
            err(SqlState(*b"42P01"), Severity::Error),
            rfq(b'I'),
            rfq(b'I'),
        ]),
    );
    assert_eq!(tags(&got), "2EZZ");
    assert!(r.is_idle());
    // Simple protocol: a COPY that fails, with data pipelined behind it.
    send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[q("copy nope from stdin"), be(b'd', b"1\n"), simple(b'c')]),
    );
    deliver(
        &mut r,
        &mut a,
        &cat(&[err(SqlState(*b"42P01"), Severity::Error), rfq(b'I')]),
    );
    assert!(r.is_idle());
}

#[test]
fn statement_records_heal_from_server_errors() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let mut st = ClientStatements::default();
    send(
        &mut r,
        &mut st,
        None,
        &cat(&[parse("s", "select 1"), simple(b'S')]),
    );
    // The server already has it (Weir's record was lost): "already exists" keeps the record.
    send(&mut r, &mut st, Some(&mut a), &bind_run("s"));
    deliver(
        &mut r,
        &mut a,
        &cat(&[err(SqlState(*b"42P05"), Severity::Error), rfq(b'I')]),
    );
    let id = st.get(b"s").unwrap().id;
    assert!(a.statements.touch(id), "42P05 means the server has it");
    // The server lost it (someone ran DEALLOCATE on it): "does not exist" drops the record.
    let sent = send(&mut r, &mut st, Some(&mut a), &bind_run("s"));
    assert_eq!(tags(&sent.to_server), "BES");
    deliver(
        &mut r,
        &mut a,
        &cat(&[
            err(SqlState::INVALID_SQL_STATEMENT_NAME, Severity::Error),
            rfq(b'I'),
        ]),
    );
    let sent = send(&mut r, &mut st, Some(&mut a), &bind_run("s"));
    assert_eq!(tags(&sent.to_server), "PBES", "prepared again");
}

#[test]
fn failed_function_call_batch_is_consumed() {
    let mut r = Relay::new(true, 1 << 20);
    let mut to_client = BytesMut::new();
    let call = be(b'F', &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r.fail_batch(&call, &mut to_client), call.len());
    assert_eq!(tags(&to_client), "Z");
}

#[test]
fn partial_copy_data_is_dropped_while_skipping() {
    let mut r = Relay::new(true, 1 << 20);
    let mut st = ClientStatements::default();
    let mut to_client = BytesMut::new();
    r.fail_batch(&parse("", "x"), &mut to_client);
    let data = be(b'd', &[1; 1000]);
    let sent = send(&mut r, &mut st, None, &data[..100]);
    assert_eq!(sent.step, ClientStep::Done(100), "progress, not a spin");
    let sent = send(
        &mut r,
        &mut st,
        None,
        &cat(&[BytesMut::from(&data[100..]), simple(b'S')]),
    );
    assert!(matches!(sent.step, ClientStep::Done(_)));
    assert_eq!(tags(&sent.to_client), "Z");
}

#[test]
fn failed_parameter_sync_retires_the_connection() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let mut to_server = BytesMut::new();
    r.inject_query("SET statement_timeout TO E'bogus';", &mut to_server);
    let mut scratch = BytesMut::new();
    let reply = cat(&[err(SqlState(*b"22023"), Severity::Error), rfq(b'I')]);
    let (_, copied) = r
        .from_server(
            &reply,
            &mut a,
            &mut client_params(),
            &mut ClientStatements::default(),
            &mut scratch,
        )
        .unwrap();
    assert!(copied);
    assert_eq!(
        tags(&scratch),
        "N",
        "the client gets a warning, not the error"
    );
    assert!(a.broken);
    // A FATAL during Weir's own query is not "relayed": the session must say the server is gone.
    let mut r = Relay::new(true, 1 << 20);
    let mut b = server(8);
    r.inject_query("SET x TO E'y';", &mut to_server);
    scratch.clear();
    r.from_server(
        &err(SqlState::ADMIN_SHUTDOWN, Severity::Fatal),
        &mut b,
        &mut client_params(),
        &mut ClientStatements::default(),
        &mut scratch,
    )
    .unwrap();
    assert!(!r.fatal_relayed && b.broken);
}

#[test]
fn a_cancel_weir_sent_is_reported_as_its_timeout() {
    let mut r = Relay::new(true, 1 << 20);
    let mut a = server(8);
    let mut st = ClientStatements::default();
    send(&mut r, &mut st, Some(&mut a), &q("select pg_sleep(10)"));
    r.cancel_note = Some("canceling statement due to query_timeout (2s)".into());
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[err(SqlState::QUERY_CANCELED, Severity::Error), rfq(b'I')]),
    );
    assert_eq!(tags(&got), "EZ");
    let (_, body) = weir_wire::frame::complete(&got, 1 << 20).unwrap().unwrap();
    let e = ErrorResponse::decode(body).unwrap();
    assert_eq!(
        (e.code, e.message.as_str()),
        (
            SqlState::QUERY_CANCELED,
            "canceling statement due to query_timeout (2s)"
        )
    );
    assert!(r.cancel_note.is_none() && r.is_idle());
}

#[test]
fn a_malformed_query_is_refused_before_a_checkout() {
    let mut r = Relay::new(true, 1 << 20);
    let mut st = ClientStatements::default();
    let (mut ts, mut tc) = (BytesMut::new(), BytesMut::new());
    // No terminating NUL, and a NUL inside the text: both refused with no server attached.
    for body in [&b"select 1"[..], &b"select 1\0; drop table t\0"[..]] {
        assert_malformed(&mut r, &be(b'Q', body), None);
    }

    // A good one asks for a server, then goes to it whole once one is attached.
    let msg = q("select 1");
    let step = r
        .from_client(&msg, &mut st, None, &mut ts, &mut tc)
        .unwrap();
    assert_eq!(step, ClientStep::NeedServer(0));
    let mut a = server(8);
    let step = r
        .from_client(&msg, &mut st, Some(&mut a), &mut ts, &mut tc)
        .unwrap();
    assert_eq!(step, ClientStep::Done(msg.len()));
    assert_eq!(&ts[..], &msg[..]);

    // A batch answered without a server (the checkout failed) leaves nothing checked
    // behind: the next message is checked afresh.
    assert_eq!(
        r.from_client(&msg, &mut st, None, &mut ts, &mut tc)
            .unwrap(),
        ClientStep::NeedServer(0)
    );
    r.fail_batch(&msg, &mut tc);
    assert_malformed(&mut r, &be(b'Q', b"select 2\0x\0"), Some(&mut a));
}

/// The unnamed statement parsed in one transaction and bound in the next, on another server
/// connection (sqlx's unkept statements): Weir sends the client's Parse there first, and its
/// ParseComplete does not reach the client.
#[test]
fn an_unnamed_statement_is_parsed_again_on_the_next_server() {
    let mut r = Relay::new(true, 1 << 20);
    let (mut a, mut b) = (server(8), server(8));
    let mut st = ClientStatements::default();
    r.attached();
    let prepare = cat(&[parse("", "select 1"), describe_stmt(""), simple(b'S')]);
    assert_eq!(
        tags(&send(&mut r, &mut st, Some(&mut a), &prepare).to_server),
        "PDS"
    );
    let got = deliver(
        &mut r,
        &mut a,
        &cat(&[be(b'1', b""), be(b'n', b""), rfq(b'I')]),
    );
    assert_eq!(tags(&got), "1nZ");
    // Bound on the same connection in a pipelined batch: nothing added.
    assert_eq!(
        tags(&send(&mut r, &mut st, Some(&mut a), &bind_run("")).to_server),
        "BES"
    );
    deliver(
        &mut r,
        &mut a,
        &cat(&[be(b'2', b""), cc("SELECT 1"), rfq(b'I')]),
    );
    // The next transaction, on another connection.
    r.attached();
    let sent = send(&mut r, &mut st, Some(&mut b), &bind_run(""));
    assert_eq!(tags(&sent.to_server), "PBES");
    let kept = parse("", "select 1");
    assert_eq!(&sent.to_server[..kept.len()], &kept[..]);
    let got = deliver(
        &mut r,
        &mut b,
        &cat(&[be(b'1', b""), be(b'2', b""), cc("SELECT 1"), rfq(b'I')]),
    );
    assert_eq!(tags(&got), "2CZ");
    // Once there, not again; a Describe of it on a third connection brings it too.
    assert_eq!(
        tags(&send(&mut r, &mut st, Some(&mut b), &bind_run("")).to_server),
        "BES"
    );
    deliver(
        &mut r,
        &mut b,
        &cat(&[be(b'2', b""), cc("SELECT 1"), rfq(b'I')]),
    );
    r.attached();
    let sent = send(
        &mut r,
        &mut st,
        Some(&mut a),
        &cat(&[describe_stmt(""), simple(b'S')]),
    );
    assert_eq!(tags(&sent.to_server), "PDS");
}

/// Without an unnamed statement of its own (never parsed, dropped by a simple Query, closed,
/// or too long to keep), a client's Bind of one must not run the server's, another client's:
/// Weir closes that first, so PostgreSQL refuses the Bind as it would directly.
#[test]
fn without_its_own_unnamed_statement_a_client_cannot_bind_the_servers() {
    let mut st = ClientStatements::default();
    let mut s = server(8);
    let closes_first = |r: &mut Relay, st: &mut ClientStatements, s: &mut ServerState| {
        r.attached();
        let sent = send(r, st, Some(s), &bind_run(""));
        assert_eq!(tags(&sent.to_server), "CBES");
        assert_eq!(&sent.to_server[..7], &close_stmt("")[..]);
        let got = deliver(
            r,
            s,
            &cat(&[
                be(b'3', b""),
                err(SqlState::INVALID_SQL_STATEMENT_NAME, Severity::Error),
                rfq(b'I'),
            ]),
        );
        assert_eq!(tags(&got), "EZ");
    };
    let mut r = Relay::new(true, 1 << 20);
    closes_first(&mut r, &mut st, &mut s);
    // Parsed, then dropped by a simple Query.
    send(
        &mut r,
        &mut st,
        Some(&mut s),
        &cat(&[parse("", "select 1"), simple(b'S')]),
    );
    deliver(&mut r, &mut s, &cat(&[be(b'1', b""), rfq(b'I')]));
    send(&mut r, &mut st, Some(&mut s), &q("select 2"));
    deliver(&mut r, &mut s, &cat(&[cc("SELECT 1"), rfq(b'I')]));
    closes_first(&mut r, &mut st, &mut s);
    // Parsed, then closed.
    send(
        &mut r,
        &mut st,
        Some(&mut s),
        &cat(&[parse("", "select 1"), close_stmt(""), simple(b'S')]),
    );
    deliver(
        &mut r,
        &mut s,
        &cat(&[be(b'1', b""), be(b'3', b""), rfq(b'I')]),
    );
    closes_first(&mut r, &mut st, &mut s);
    // Too long to keep.
    let long = format!("select '{}'", "x".repeat(UNNAMED_KEEP));
    send(
        &mut r,
        &mut st,
        Some(&mut s),
        &cat(&[parse("", &long), simple(b'S')]),
    );
    deliver(&mut r, &mut s, &cat(&[be(b'1', b""), rfq(b'I')]));
    assert!(r.unnamed.capacity() == 0, "nothing kept");
    closes_first(&mut r, &mut st, &mut s);
    // In session mode the server is the client's own: nothing is added.
    let mut r = Relay::new(false, 1 << 20);
    r.attached();
    assert_eq!(
        tags(&send(&mut r, &mut st, Some(&mut s), &bind_run("")).to_server),
        "BES"
    );
}

/// An error earlier in the batch makes the server skip what Weir sent for the unnamed
/// statement: the next batch sends it again rather than bind the server's.
#[test]
fn a_skipped_unnamed_parse_is_sent_again() {
    let mut r = Relay::new(true, 1 << 20);
    let mut s = server(8);
    let mut st = ClientStatements::default();
    r.attached();
    send(
        &mut r,
        &mut st,
        Some(&mut s),
        &cat(&[parse("", "select 1"), simple(b'S')]),
    );
    deliver(&mut r, &mut s, &cat(&[be(b'1', b""), rfq(b'I')]));
    r.attached();
    let failing = cat(&[bind("s1"), execute(), bind(""), execute(), simple(b'S')]);
    assert_eq!(
        tags(&send(&mut r, &mut st, Some(&mut s), &failing).to_server),
        "BEPBES"
    );
    let got = deliver(
        &mut r,
        &mut s,
        &cat(&[
            err(SqlState::INVALID_SQL_STATEMENT_NAME, Severity::Error),
            rfq(b'I'),
        ]),
    );
    assert_eq!(tags(&got), "EZ");
    assert_eq!(
        tags(&send(&mut r, &mut st, Some(&mut s), &bind_run("")).to_server),
        "PBES"
    );
    deliver(
        &mut r,
        &mut s,
        &cat(&[be(b'1', b""), be(b'2', b""), cc("SELECT 1"), rfq(b'I')]),
    );
    // The client's own Parse failing leaves it none: a Close goes first next time.
    send(
        &mut r,
        &mut st,
        Some(&mut s),
        &cat(&[parse("", "selec 1"), simple(b'S')]),
    );
    deliver(
        &mut r,
        &mut s,
        &cat(&[err(SqlState(*b"42601"), Severity::Error), rfq(b'I')]),
    );
    r.attached();
    assert_eq!(
        tags(&send(&mut r, &mut st, Some(&mut s), &bind_run("")).to_server),
        "CBES"
    );
}
