//! The relay's bookkeeping, kept free of sockets so every sequence can be unit-tested.
//!
//! [`Relay::from_client`] turns a client's complete messages into what goes to the server
//! (renaming prepared statements, injecting a Parse a server lacks, answering what needs no
//! server), and queues one [`Expect`] per reply the client is owed. [`Relay::from_server`]
//! walks the server's replies against that queue: it forwards, drops the replies to what Weir
//! injected, inserts the replies Weir synthesised at the right place, and learns the
//! transaction status. A server connection may go back to the pool only when
//! [`Relay::is_idle`]: nothing owed, status idle, no COPY, no half-relayed message.
//!
//! Large messages (DataRow, CopyData, ...) are relayed as they arrive, without waiting for
//! the whole message; only ReadyForQuery, ErrorResponse and ParameterStatus are read whole.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BytesMut;
use weir_wire::backend::{self, ParameterStatus, TxStatus};
use weir_wire::frame::{FrameError, HEADER_LEN, Header};
use weir_wire::frontend::{self, Bind, Malformed, Named, Parse, Query, Target, tag};
use weir_wire::{ErrorResponse, Severity, SqlState};

use crate::params::ClientParams;
use crate::prepared::{ClientStatements, Statement, StatementId};
use crate::server::ServerState;

/// A reply the client is owed, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// ParseComplete for a Parse sent to the server; `forward` is false when Weir injected it.
    ParseComplete {
        forward: bool,
        stmt: Option<StatementId>,
    },
    /// BindComplete; `stmt` is the mapped statement bound, if any.
    BindComplete { stmt: Option<StatementId> },
    /// Ends with RowDescription or NoData (a ParameterDescription may come first); `stmt` is
    /// the mapped statement described, if any.
    Describe { stmt: Option<StatementId> },
    /// Ends with CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute,
    /// CloseComplete; `evicted` names a statement Weir closed itself (to keep the cache
    /// bounded, because its plan may be out of date, or before preparing it again).
    CloseComplete {
        forward: bool,
        evicted: Option<StatementId>,
    },
    /// ReadyForQuery for a Sync; `forward` is false for a Sync Weir sent itself.
    Sync { forward: bool },
    /// A simple Query (or FunctionCall): everything up to ReadyForQuery belongs to it.
    Query { forward: bool },
    /// A reply Weir makes itself, sent when it reaches the front.
    Synth(Synth),
    /// Where the client's CopyDone/CopyFail falls: PostgreSQL ignores every Sync sent between
    /// an Execute that starts COPY FROM STDIN and this point, so those Syncs owe nothing.
    CopyEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synth {
    ParseComplete,
    CloseComplete,
    CommandComplete(&'static str),
    ReadyForQuery,
}

/// The server broke the protocol as Weir understands it. The server connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum ServerProtocolError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Malformed(#[from] Malformed),
    #[error("server sent '{}' while Weir expected {expected}", char::from(*got))]
    Unexpected { got: u8, expected: String },
}

/// What a client sent that ends its connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientProtocolError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Malformed(#[from] Malformed),
    #[error("unexpected message type '{}' in this state", char::from(*.0))]
    NotAllowed(u8),
    #[error(
        "the prepared statements of this connection would take more than {0} bytes \
         (pool.max_client_prepared_bytes); close the ones no longer used, or raise the setting"
    )]
    TooManyStatements(usize),
}

/// How far [`Relay::from_client`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientStep {
    /// All complete messages handled; this many bytes consumed.
    Done(usize),
    /// Stopped before a message that needs a server connection; bytes consumed so far.
    NeedServer(usize),
    /// Terminate received after this many bytes.
    Terminate(usize),
}

#[derive(Debug, Default, Clone, Copy)]
struct Partial {
    remaining: usize,
    forward: bool,
}

/// The longest Parse of a client's unnamed statement Weir keeps to prepare it again on another
/// server connection (see `Relay::unnamed`): a client's most recent one stays in its memory.
const UNNAMED_KEEP: usize = 64 * 1024;

/// The longest ReadyForQuery/ErrorResponse/ParameterStatus Weir reads whole from a server.
const INSPECT_LIMIT: u32 = 1 << 20;

#[derive(Debug)]
pub struct Relay {
    queue: VecDeque<Expect>,
    status: TxStatus,
    copy_in: bool,
    copy_out: bool,
    server_partial: Partial,
    client_partial: usize,
    /// Whether the rest of a half-received CopyData goes to the server or is dropped.
    client_partial_forward: bool,
    /// Extended-protocol messages went to the server since the last Sync: until a Sync, the
    /// server may hold an implicit transaction (or be skipping after an error).
    unsynced: bool,
    /// The server is known to be in copy-in and the client has not ended it: its Syncs are
    /// ignored by the server, so none is owed.
    client_in_copy: bool,
    /// After Weir answered a batch with an error itself: drop messages until Sync.
    skip_until_sync: bool,
    /// A server error came before the client's Sync: the server ignores everything up to
    /// that Sync, so until it Weir drops the client's messages (they would get no reply)
    /// and then relays the Sync.
    server_skipping: bool,
    /// The Query at the front of the client's input was checked before a checkout: it is not
    /// scanned a second time once the server is attached.
    query_checked: bool,
    /// Transaction mode: the Parse of the client's unnamed statement, kept because the client
    /// may bind it in a later transaction, on another server connection (sqlx's unkept
    /// statements do). Empty when the client has none, or it is over [`UNNAMED_KEEP`].
    unnamed: Vec<u8>,
    /// The attached server's unnamed statement is the client's: parsed there since the
    /// checkout (see [`Self::attached`]).
    unnamed_here: bool,
    /// Map client statement names to shared server statements (transaction mode).
    pub mapping: bool,
    pub max_message_size: u32,
    /// `max_client_prepared_bytes`: the client's named statements, in bytes (0: no limit).
    pub max_statement_bytes: usize,
    /// The server sent a FATAL error, already relayed to the client.
    pub fatal_relayed: bool,
    /// Weir cancelled the running statement itself (query_timeout): the server's 57014 is
    /// replaced by one with this message.
    pub cancel_note: Option<String>,
    /// SQLSTATEs of the errors relayed since the session last looked (for metrics).
    pub errors: Vec<SqlState>,
}

impl Relay {
    pub fn new(mapping: bool, max_message_size: u32) -> Relay {
        Relay {
            // Allocated at the first request, not at login: a client that never sends one
            // costs nothing here.
            queue: VecDeque::new(),
            status: TxStatus::Idle,
            copy_in: false,
            copy_out: false,
            server_partial: Partial::default(),
            client_partial: 0,
            client_partial_forward: false,
            unsynced: false,
            client_in_copy: false,
            skip_until_sync: false,
            server_skipping: false,
            query_checked: false,
            unnamed: Vec::new(),
            unnamed_here: false,
            mapping,
            max_message_size,
            max_statement_bytes: 0,
            fatal_relayed: false,
            cancel_note: None,
            errors: Vec::new(),
        }
    }

    /// Nothing owed, no transaction, no COPY, nothing half-relayed: the server connection
    /// can serve someone else.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
            && self.status == TxStatus::Idle
            && !self.unsynced
            && !self.copy_in
            && !self.copy_out
            && !self.client_in_copy
            && self.server_partial.remaining == 0
            && self.client_partial == 0
    }

    /// A COPY is under way or a message is half relayed in either direction.
    pub fn copying(&self) -> bool {
        self.copy_in
            || self.copy_out
            || self.client_in_copy
            || self.server_partial.remaining > 0
            || self.client_partial > 0
    }

    /// The client has been passed the start of a server message but not its end: anything
    /// else written to it now would be read as the rest of that message.
    pub fn mid_message_to_client(&self) -> bool {
        self.server_partial.remaining > 0 && self.server_partial.forward
    }

    /// The server waits for the client's input: COPY data, or the rest of a message the
    /// relay has begun to pass on.
    pub fn waits_on_client(&self) -> bool {
        self.copy_in || self.client_in_copy || self.client_partial > 0
    }

    /// Whether [`Relay::from_client`] can make progress on `buf`: a whole message, part of a
    /// streamed CopyData, or a length it will reject.
    pub fn client_ready(&self, buf: &[u8]) -> bool {
        if self.client_partial > 0 {
            return !buf.is_empty();
        }
        if buf.len() < HEADER_LEN {
            return false;
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        buf[0] == tag::COPY_DATA
            || len < 4
            || len > self.max_message_size
            || buf.len() > len as usize
    }

    /// Nothing owed by a server (a transaction may be open).
    pub fn nothing_owed(&self) -> bool {
        self.queue
            .iter()
            .all(|e| matches!(e, Expect::Synth(_) | Expect::CopyEnd))
            && !self.copy_in
            && !self.client_in_copy
            && !self.copy_out
            && self.server_partial.remaining == 0
            && self.client_partial == 0
    }

    pub fn status(&self) -> TxStatus {
        self.status
    }

    pub fn owed(&self) -> usize {
        self.queue.len()
    }

    /// Extended-protocol messages were sent without a Sync after them.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// Sends a Sync of Weir's own (its ReadyForQuery is dropped), to end an extended-protocol
    /// batch a departed client left open.
    pub fn inject_sync(&mut self, to_server: &mut BytesMut) {
        frontend::encode_empty(tag::SYNC, to_server);
        self.queue.push_back(Expect::Sync { forward: false });
        self.unsynced = false;
        self.server_skipping = false;
    }

    /// Queues a query Weir sends on its own behalf (parameter sync, rollback); its replies are
    /// dropped.
    pub fn inject_query(&mut self, sql: &str, to_server: &mut BytesMut) {
        Query {
            sql: sql.as_bytes(),
        }
        .encode(to_server);
        self.queue.push_back(Expect::Query { forward: false });
        // A simple Query drops the server's unnamed statement.
        self.unnamed_here = false;
    }

    /// A server connection was checked out for this client: its unnamed statement, if any,
    /// is another client's (or Weir's).
    pub fn attached(&mut self) {
        self.unnamed_here = false;
    }

    /// Weir answered the client's batch with an error itself (no server could be had). A
    /// simple Query or FunctionCall at the front of `input` is consumed and ended with
    /// ReadyForQuery; for the extended protocol, messages are dropped until Sync. Returns the
    /// bytes consumed.
    pub fn fail_batch(&mut self, input: &[u8], to_client: &mut BytesMut) -> usize {
        self.query_checked = false;
        match Header::parse(input, u32::MAX) {
            Ok(Some(h)) if h.tag == tag::QUERY || h.tag == tag::FUNCTION_CALL => {
                TxStatus::Idle.encode(to_client);
                h.total_len().min(input.len())
            }
            _ => {
                self.skip_until_sync = true;
                0
            }
        }
    }

    /// Handles the complete client messages at the front of `input`.
    pub fn from_client(
        &mut self,
        input: &[u8],
        statements: &mut ClientStatements,
        mut server: Option<&mut ServerState>,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
    ) -> Result<ClientStep, ClientProtocolError> {
        let mut pos = 0;
        // A CopyData being streamed: pass the rest through.
        if self.client_partial > 0 {
            let n = self.client_partial.min(input.len());
            if self.client_partial_forward && server.is_some() {
                to_server.extend_from_slice(&input[..n]);
            }
            self.client_partial -= n;
            pos = n;
            if self.client_partial > 0 {
                return Ok(ClientStep::Done(pos));
            }
        }
        let may_evict = self.queue.is_empty() && self.status == TxStatus::Idle;
        // Inside a transaction too, so that it does not fail on an outdated plan. (Closing a
        // statement leaves the portals made from it open: they keep their own plan.)
        if let Some(s) = server.as_deref_mut() {
            s.statements.check_plans();
        }
        let protect_from = server.as_ref().map_or(0, |s| s.statements.next_tick());
        while pos < input.len() {
            let rest = &input[pos..];
            // CopyData streams, so only its length is not held to the buffering limit.
            let Some(h) = Header::parse(rest, u32::MAX)? else {
                break;
            };
            if h.tag != tag::COPY_DATA && h.len > self.max_message_size {
                return Err(FrameError::TooLarge {
                    tag: h.tag,
                    len: h.len,
                    limit: self.max_message_size,
                }
                .into());
            }
            let total = h.total_len();
            if rest.len() < total {
                // Only CopyData is streamed (or dropped, with no server to take it or while
                // skipping to Sync); anything else waits until whole.
                if h.tag == tag::COPY_DATA {
                    self.client_partial_forward =
                        server.is_some() && !self.skip_until_sync && !self.server_skipping;
                    if self.client_partial_forward {
                        to_server.extend_from_slice(rest);
                    }
                    self.client_partial = total - rest.len();
                    pos = input.len();
                }
                break;
            }
            let msg = &rest[..total];
            let body = &rest[HEADER_LEN..total];
            if self.skip_until_sync || (self.server_skipping && h.tag != tag::SYNC) {
                match h.tag {
                    tag::SYNC => {
                        self.skip_until_sync = false;
                        self.queue.push_back(Expect::Synth(Synth::ReadyForQuery));
                    }
                    tag::TERMINATE => return Ok(ClientStep::Terminate(pos)),
                    _ => {}
                }
                pos += total;
                self.emit_synth(to_client);
                continue;
            }
            match h.tag {
                tag::QUERY => {
                    // Checked before a checkout, so a malformed Query is refused at once
                    // rather than after waiting for a server; once the server is attached
                    // the check is not repeated (the final NUL is still confirmed).
                    let checked = std::mem::take(&mut self.query_checked);
                    let sql = match body.split_last() {
                        Some((0, sql)) if checked => sql,
                        _ => Query::decode(body)?.sql,
                    };
                    if server.is_none() && !(self.mapping && starts_with_deallocate(sql)) {
                        self.query_checked = true;
                        return Ok(ClientStep::NeedServer(pos));
                    }
                    // A simple Query drops the unnamed statement, the client's and the server's.
                    if self.mapping {
                        self.unnamed.clear();
                        self.unnamed_here = false;
                    }
                    let kind = if self.mapping {
                        classify_sql(sql)
                    } else {
                        SqlKind::Other
                    };
                    match kind {
                        SqlKind::Deallocate(name) if statements.remove(&name) => {
                            self.queue
                                .push_back(Expect::Synth(Synth::CommandComplete("DEALLOCATE")));
                            self.queue.push_back(Expect::Synth(Synth::ReadyForQuery));
                        }
                        SqlKind::DeallocateAll => {
                            statements.clear();
                            self.queue
                                .push_back(Expect::Synth(Synth::CommandComplete("DEALLOCATE ALL")));
                            self.queue.push_back(Expect::Synth(Synth::ReadyForQuery));
                        }
                        _ => {
                            // DISCARD ALL and the like are tracked from the server's
                            // CommandComplete, so a rejected one changes nothing.
                            if server.is_none() {
                                self.query_checked = true;
                                return Ok(ClientStep::NeedServer(pos));
                            }
                            to_server.extend_from_slice(msg);
                            self.queue.push_back(Expect::Query { forward: true });
                        }
                    }
                }
                tag::PARSE => {
                    let p = Parse::decode(body)?;
                    if self.mapping && !p.name.is_empty() {
                        let st = match statements.get(p.name) {
                            Some(s) if s.id == StatementId::of(&p) => s.clone(),
                            _ => {
                                let s = Arc::new(Statement::new(&p));
                                if self.max_statement_bytes > 0
                                    && statements.bytes_with(p.name, &s) > self.max_statement_bytes
                                {
                                    return Err(ClientProtocolError::TooManyStatements(
                                        self.max_statement_bytes,
                                    ));
                                }
                                statements.insert(p.name, s.clone());
                                s
                            }
                        };
                        match server.as_deref_mut() {
                            Some(srv) => {
                                if srv.statements.touch(st.id) {
                                    self.queue.push_back(Expect::Synth(Synth::ParseComplete));
                                } else {
                                    self.prepare_on(
                                        srv,
                                        &st,
                                        protect_from,
                                        may_evict,
                                        to_server,
                                        true,
                                    );
                                }
                            }
                            // No transaction is open: answer now and prepare on first use.
                            // A client that prepares synchronously (pgbench) then never waits
                            // for a server while another of its connections holds one.
                            None => self.queue.push_back(Expect::Synth(Synth::ParseComplete)),
                        }
                    } else {
                        if server.is_none() {
                            return Ok(ClientStep::NeedServer(pos));
                        }
                        if self.mapping {
                            self.keep_unnamed(msg);
                        }
                        to_server.extend_from_slice(msg);
                        self.unsynced = true;
                        self.queue.push_back(Expect::ParseComplete {
                            forward: true,
                            stmt: None,
                        });
                    }
                }
                tag::BIND => {
                    let Some(srv) = server.as_deref_mut() else {
                        return Ok(ClientStep::NeedServer(pos));
                    };
                    let b = Bind::decode(body)?;
                    let stmt = match self.mapped(statements, b.statement) {
                        Some(st) => {
                            self.ensure_on(srv, st, protect_from, may_evict, to_server);
                            Bind {
                                portal: b.portal,
                                statement: st.server_name(),
                                rest: b.rest,
                            }
                            .encode(to_server);
                            Some(st.id)
                        }
                        None => {
                            if self.mapping && b.statement.is_empty() && !self.unnamed_here {
                                self.restore_unnamed(to_server);
                            }
                            to_server.extend_from_slice(msg);
                            None
                        }
                    };
                    self.unsynced = true;
                    self.queue.push_back(Expect::BindComplete { stmt });
                }
                tag::DESCRIBE => {
                    let Some(srv) = server.as_deref_mut() else {
                        return Ok(ClientStep::NeedServer(pos));
                    };
                    let d = Named::decode(body)?;
                    let stmt = match (d.target, self.mapped(statements, d.name)) {
                        (Target::Statement, Some(st)) => {
                            self.ensure_on(srv, st, protect_from, may_evict, to_server);
                            Named {
                                target: Target::Statement,
                                name: st.server_name(),
                            }
                            .encode(tag::DESCRIBE, to_server);
                            Some(st.id)
                        }
                        (Target::Statement, None)
                            if self.mapping && d.name.is_empty() && !self.unnamed_here =>
                        {
                            self.restore_unnamed(to_server);
                            to_server.extend_from_slice(msg);
                            None
                        }
                        _ => {
                            to_server.extend_from_slice(msg);
                            None
                        }
                    };
                    self.unsynced = true;
                    self.queue.push_back(Expect::Describe { stmt });
                }
                tag::CLOSE => {
                    let c = Named::decode(body)?;
                    if self.mapping && c.target == Target::Statement && !c.name.is_empty() {
                        // Server statements are shared; only the client's name goes away.
                        statements.remove(c.name);
                        self.queue.push_back(Expect::Synth(Synth::CloseComplete));
                    } else {
                        let Some(_) = server.as_deref_mut() else {
                            return Ok(ClientStep::NeedServer(pos));
                        };
                        if self.mapping && c.target == Target::Statement {
                            self.unnamed.clear();
                        }
                        to_server.extend_from_slice(msg);
                        self.unsynced = true;
                        self.queue.push_back(Expect::CloseComplete {
                            forward: true,
                            evicted: None,
                        });
                    }
                }
                tag::EXECUTE | tag::FUNCTION_CALL => {
                    let Some(_) = server.as_deref_mut() else {
                        return Ok(ClientStep::NeedServer(pos));
                    };
                    to_server.extend_from_slice(msg);
                    if h.tag == tag::EXECUTE {
                        self.unsynced = true;
                        self.queue.push_back(Expect::Execute);
                    } else {
                        self.queue.push_back(Expect::Query { forward: true });
                    }
                }
                tag::SYNC => match server.as_deref_mut() {
                    Some(_) => {
                        self.server_skipping = false;
                        to_server.extend_from_slice(msg);
                        // In copy-in the server ignores it: the batch stays open.
                        if !self.client_in_copy {
                            self.unsynced = false;
                            self.queue.push_back(Expect::Sync { forward: true });
                        }
                    }
                    // No server and nothing open: answer it here.
                    None => {
                        self.server_skipping = false;
                        self.queue.push_back(Expect::Synth(Synth::ReadyForQuery));
                    }
                },
                tag::FLUSH => {
                    if server.is_some() {
                        to_server.extend_from_slice(msg);
                    }
                }
                tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {
                    // Outside COPY the server ignores these, as PostgreSQL does; without a
                    // server there is nothing to ignore them.
                    if server.is_some() {
                        to_server.extend_from_slice(msg);
                    }
                    if h.tag != tag::COPY_DATA {
                        if self.client_in_copy {
                            self.client_in_copy = false;
                        } else if !self.queue.is_empty() {
                            // The server may not have started the COPY yet; mark the spot.
                            self.queue.push_back(Expect::CopyEnd);
                        }
                    }
                }
                tag::TERMINATE => return Ok(ClientStep::Terminate(pos)),
                other => return Err(ClientProtocolError::NotAllowed(other)),
            }
            pos += total;
            self.emit_synth(to_client);
        }
        Ok(ClientStep::Done(pos))
    }

    /// Keeps the client's Parse of its unnamed statement (see [`Self::unnamed`]), in a buffer
    /// reused from one to the next.
    fn keep_unnamed(&mut self, msg: &[u8]) {
        self.unnamed_here = true;
        self.unnamed.clear();
        if msg.len() > UNNAMED_KEEP || self.unnamed.capacity() > 4 * msg.len().max(1024) {
            // Over the limit, not kept: binding it in a later transaction gets PostgreSQL's
            // error for a missing unnamed statement (see restore_unnamed). A buffer left large
            // by a long one is let go, so an idle client holds about its latest.
            self.unnamed = Vec::new();
        }
        if msg.len() <= UNNAMED_KEEP {
            self.unnamed.extend_from_slice(msg);
        }
    }

    /// Before the client's Bind or Describe of its unnamed statement on a server connection
    /// that has not seen the client's Parse of it: prepares it there again. Without that the
    /// server would use its own unnamed statement, another client's, with this client's
    /// parameters. When the client has none, a Close of the server's makes the server refuse
    /// the Bind, as PostgreSQL would.
    #[cold]
    fn restore_unnamed(&mut self, to_server: &mut BytesMut) {
        self.unnamed_here = true;
        if self.unnamed.is_empty() {
            Named {
                target: Target::Statement,
                name: b"",
            }
            .encode(tag::CLOSE, to_server);
            self.queue.push_back(Expect::CloseComplete {
                forward: false,
                evicted: None,
            });
        } else {
            to_server.extend_from_slice(&self.unnamed);
            self.queue.push_back(Expect::ParseComplete {
                forward: false,
                stmt: None,
            });
        }
    }

    /// The client's statement `name` maps to, borrowed: a Bind costs no reference count.
    fn mapped<'s>(
        &self,
        statements: &'s ClientStatements,
        name: &[u8],
    ) -> Option<&'s Arc<Statement>> {
        if self.mapping && !name.is_empty() {
            statements.get(name)
        } else {
            None
        }
    }

    /// Makes sure the server has `st`, injecting its Parse if not.
    fn ensure_on(
        &mut self,
        srv: &mut ServerState,
        st: &Statement,
        protect_from: u64,
        may_evict: bool,
        to_server: &mut BytesMut,
    ) {
        if !srv.statements.touch(st.id) {
            self.prepare_on(srv, st, protect_from, may_evict, to_server, false);
        }
    }

    fn prepare_on(
        &mut self,
        srv: &mut ServerState,
        st: &Statement,
        protect_from: u64,
        may_evict: bool,
        to_server: &mut BytesMut,
        forward: bool,
    ) {
        let queue = &mut self.queue;
        let mut close = |v: StatementId| {
            Named {
                target: Target::Statement,
                name: &v.name(),
            }
            .encode(tag::CLOSE, to_server);
            queue.push_back(Expect::CloseComplete {
                forward: false,
                evicted: Some(v),
            });
        };
        // A Close of it still in flight may yet be skipped by an error in its batch: closed
        // again here (a Close of a missing statement is no error), so this Parse cannot find
        // the name taken.
        if srv.statements.close_again(st.id) {
            close(st.id);
        }
        // Outdated plans and skipped Closes: closed first, so that preparing one of them
        // again finds its name free.
        for v in srv.statements.take_outdated() {
            close(v);
        }
        // Usually none or one; more when a transaction left the set over its bound.
        srv.statements
            .insert(st.id, protect_from, may_evict, &mut close);
        to_server.extend_from_slice(&st.parse);
        self.unsynced = true;
        self.queue.push_back(Expect::ParseComplete {
            forward,
            stmt: Some(st.id),
        });
    }

    /// Sends every synthesised reply now at the front of the queue.
    ///
    /// Called after every message either way: the usual case, a server reply next, is
    /// decided here inline and the work is out of line.
    #[inline]
    pub fn emit_synth(&mut self, out: &mut BytesMut) {
        if matches!(self.queue.front(), Some(Expect::Synth(_) | Expect::CopyEnd)) {
            self.emit_synth_now(out);
        }
    }

    #[inline(never)]
    fn emit_synth_now(&mut self, out: &mut BytesMut) {
        while let Some(front) = self.queue.front() {
            let s = match front {
                Expect::Synth(s) => s,
                Expect::CopyEnd => {
                    self.queue.pop_front();
                    continue;
                }
                _ => break,
            };
            match s {
                Synth::ParseComplete => out.extend_from_slice(backend::PARSE_COMPLETE),
                Synth::CloseComplete => out.extend_from_slice(backend::CLOSE_COMPLETE),
                Synth::CommandComplete(t) => backend::encode_command_complete(out, t.as_bytes()),
                Synth::ReadyForQuery => self.status.encode(out),
            }
            self.queue.pop_front();
        }
    }

    /// Walks server bytes. Returns the bytes consumed and whether the client's copy is in
    /// `scratch` (true) or is exactly `input[..consumed]` (false: the fast path, no copy).
    pub fn from_server(
        &mut self,
        input: &[u8],
        srv: &mut ServerState,
        client: &mut ClientParams,
        statements: &mut ClientStatements,
        scratch: &mut BytesMut,
    ) -> Result<(usize, bool), ServerProtocolError> {
        let mut out = Out {
            input,
            scratch,
            copying: false,
        };
        let mut pos = 0;
        if self.server_partial.remaining > 0 {
            let n = self.server_partial.remaining.min(input.len());
            out.pass(0, n, self.server_partial.forward);
            self.server_partial.remaining -= n;
            pos = n;
        }
        // Synthesised replies due before the first message; after that, each message's
        // own settling below leaves the front settled for the next.
        if pos < input.len() {
            self.settle_front(&mut out, pos);
        }
        while pos < input.len() {
            let rest = &input[pos..];
            let Some(h) = Header::parse(rest, u32::MAX)? else {
                break;
            };
            let total = h.total_len();
            let whole = rest.len() >= total;
            let needs_body = matches!(
                h.tag,
                backend::tag::READY_FOR_QUERY
                    | backend::tag::ERROR_RESPONSE
                    | backend::tag::PARAMETER_STATUS
                    | backend::tag::COMMAND_COMPLETE
            );
            if needs_body && !whole {
                if h.len > INSPECT_LIMIT {
                    return Err(FrameError::TooLarge {
                        tag: h.tag,
                        len: h.len,
                        limit: INSPECT_LIMIT,
                    }
                    .into());
                }
                break;
            }
            let body = if whole {
                &rest[HEADER_LEN..total]
            } else {
                &[][..]
            };
            let forward =
                self.on_server_message(h.tag, body, srv, client, statements, &mut out, pos)?;
            if whole {
                out.pass(pos, pos + total, forward);
                pos += total;
                self.settle_front(&mut out, pos);
            } else {
                out.pass(pos, input.len(), forward);
                self.server_partial = Partial {
                    remaining: total - rest.len(),
                    forward,
                };
                pos = input.len();
            }
        }
        Ok((pos, out.copying))
    }

    /// Drops markers and sends synthesised replies that have reached the front. Runs after
    /// every server message: the usual case, nothing Weir makes itself next, is decided
    /// inline and the work is out of line.
    #[inline]
    fn settle_front(&mut self, out: &mut Out<'_>, pos: usize) {
        if matches!(self.queue.front(), Some(Expect::Synth(_) | Expect::CopyEnd)) {
            self.settle_front_now(out, pos);
        }
    }

    #[inline(never)]
    fn settle_front_now(&mut self, out: &mut Out<'_>, pos: usize) {
        let synth_ahead = self
            .queue
            .iter()
            .take_while(|e| matches!(e, Expect::Synth(_) | Expect::CopyEnd))
            .any(|e| matches!(e, Expect::Synth(_)));
        if synth_ahead {
            out.divert(pos);
        }
        self.emit_synth(out.scratch);
    }

    /// Decides whether one server message goes to the client, updating the bookkeeping.
    #[allow(clippy::too_many_arguments)]
    fn on_server_message(
        &mut self,
        t: u8,
        body: &[u8],
        srv: &mut ServerState,
        client: &mut ClientParams,
        statements: &mut ClientStatements,
        out: &mut Out<'_>,
        pos: usize,
    ) -> Result<bool, ServerProtocolError> {
        use backend::tag as b;
        let ours = matches!(self.queue.front(), Some(Expect::Query { forward: false }));
        let unexpected = |got: u8, front: Option<&Expect>| ServerProtocolError::Unexpected {
            got,
            expected: format!("{front:?}"),
        };
        Ok(match t {
            b::READY_FOR_QUERY => {
                self.status = TxStatus::decode(body)?;
                self.copy_in = false;
                self.copy_out = false;
                match self.queue.pop_front() {
                    Some(Expect::Sync { forward }) | Some(Expect::Query { forward }) => forward,
                    front => return Err(unexpected(t, front.as_ref())),
                }
            }
            b::ERROR_RESPONSE => {
                let err = ErrorResponse::decode(body).ok_or(Malformed {
                    what: "ErrorResponse",
                })?;
                let fatal = err.severity == Severity::Fatal;
                if fatal {
                    srv.broken = true;
                }
                self.copy_in = false;
                self.copy_out = false;
                self.client_in_copy = false;
                let forward = match self.queue.front() {
                    Some(Expect::Query { forward: true }) | None => true,
                    Some(Expect::Query { forward: false }) => {
                        // Weir's own parameter sync failed, so what Weir recorded as set on this
                        // connection is unknown now: retire the connection after this
                        // transaction, and tell the client its session lacks a value it asked for.
                        srv.broken = true;
                        out.divert(pos);
                        ErrorResponse::new(
                            Severity::Warning,
                            SqlState::WARNING,
                            format!("weir could not apply a session parameter: {}", err.message),
                        )
                        .encode(out.scratch);
                        false
                    }
                    Some(_) => {
                        let plan_outdated = err.code == SqlState::FEATURE_NOT_SUPPORTED
                            && is_outdated_plan(body, &err.message);
                        self.skip_to_sync(srv, err.code, plan_outdated);
                        true
                    }
                };
                if fatal && forward {
                    self.fatal_relayed = true;
                }
                if forward {
                    self.errors.push(err.code);
                }
                if forward
                    && err.code == SqlState::QUERY_CANCELED
                    && let Some(note) = self.cancel_note.take()
                {
                    out.divert(pos);
                    ErrorResponse::error(SqlState::QUERY_CANCELED, note)
                        .with_hint(
                            "raise query_timeout for this pool, or make the statement faster",
                        )
                        .encode(out.scratch);
                    return Ok(false);
                }
                forward
            }
            b::PARAMETER_STATUS => {
                let p = ParameterStatus::decode(body)?;
                let (name, value) = (
                    String::from_utf8_lossy(p.name),
                    String::from_utf8_lossy(p.value),
                );
                srv.params.on_report(&name, &value, ours);
                if !ours {
                    client.set(&name, &value);
                }
                !ours
            }
            b::PARSE_COMPLETE => match self.queue.pop_front() {
                Some(Expect::ParseComplete { forward, .. }) => forward,
                front => return Err(unexpected(t, front.as_ref())),
            },
            b::BIND_COMPLETE => match self.queue.pop_front() {
                Some(Expect::BindComplete { .. }) => true,
                front => return Err(unexpected(t, front.as_ref())),
            },
            b::CLOSE_COMPLETE => match self.queue.pop_front() {
                Some(Expect::CloseComplete {
                    forward, evicted, ..
                }) => {
                    if let Some(id) = evicted {
                        srv.statements.closed(id);
                    }
                    forward
                }
                front => return Err(unexpected(t, front.as_ref())),
            },
            b::ROW_DESCRIPTION | b::NO_DATA => {
                if matches!(self.queue.front(), Some(Expect::Describe { .. })) {
                    self.queue.pop_front();
                }
                !ours
            }
            b::COMMAND_COMPLETE | b::EMPTY_QUERY_RESPONSE | b::PORTAL_SUSPENDED => {
                if t == b::COMMAND_COMPLETE {
                    track_command(body, srv, statements);
                }
                if matches!(self.queue.front(), Some(Expect::Execute)) {
                    self.queue.pop_front();
                }
                self.copy_in = false;
                self.copy_out = false;
                !ours
            }
            b::COPY_IN_RESPONSE => {
                self.copy_in = true;
                self.ignore_syncs_during_copy();
                !ours
            }
            b::COPY_OUT_RESPONSE => {
                self.copy_out = true;
                !ours
            }
            b::COPY_BOTH_RESPONSE => {
                self.copy_in = true;
                self.copy_out = true;
                self.ignore_syncs_during_copy();
                !ours
            }
            _ => !ours,
        })
    }
}

impl Relay {
    /// An error in an extended-protocol batch: the server skips to the next Sync, so the
    /// replies owed before it will not come. Keeps the statement records true.
    fn skip_to_sync(&mut self, srv: &mut ServerState, code: SqlState, plan_outdated: bool) {
        let mut first = true;
        // The Sync may not have come from the client yet: then the server skips the
        // client's messages until it does, and the connection is not free before it.
        self.server_skipping = true;
        while let Some(e) = self.queue.front() {
            match *e {
                Expect::Sync { .. } => {
                    self.server_skipping = false;
                    break;
                }
                // PostgreSQL skips a simple Query sent before the Sync as well: no reply
                // comes for it (a client's is popped below). If it was Weir's own, what it
                // set is unknown.
                Expect::Query { forward: false } => srv.broken = true,
                // An unnamed Parse failed or was skipped, so the server's unnamed statement is
                // not the client's: Weir's is sent again before the next Bind or Describe of
                // it; after the client's own, the client is taken to have none (a Close goes
                // first, and PostgreSQL answers 26000; never another client's statement).
                Expect::ParseComplete {
                    stmt: None,
                    forward,
                } if self.mapping => {
                    if forward {
                        self.unnamed.clear();
                    }
                    self.unnamed_here = false;
                }
                // Weir's Close of the server's unnamed statement, skipped.
                Expect::CloseComplete {
                    forward: false,
                    evicted: None,
                } => self.unnamed_here = false,
                // The Parse that failed, or one skipped after it: not prepared, unless the
                // failure says the statement already exists.
                Expect::ParseComplete { stmt: Some(id), .. }
                    if !(first && code == DUPLICATE_PREPARED_STATEMENT) =>
                {
                    self.forget_unless_prepared_later(srv, id)
                }
                // A Close Weir sent was skipped: the statement is still there, uncounted, to
                // be closed before the next Parse (unless another Close of it is in flight).
                Expect::CloseComplete {
                    evicted: Some(id), ..
                } => srv.statements.close_skipped(id),
                // The server lost a statement Weir thought it had: prepare it again next time.
                Expect::BindComplete { stmt: Some(id) } | Expect::Describe { stmt: Some(id) }
                    if first && code == SqlState::INVALID_SQL_STATEMENT_NAME =>
                {
                    self.forget_unless_prepared_later(srv, id)
                }
                // "cached plan must not change result type": a schema change outdated the
                // plan of a shared statement, so a client's new Parse of it would find the same
                // one. Close and prepare again this connection's statements, and those of the
                // database's other connections.
                Expect::BindComplete { stmt: Some(_) } | Expect::Describe { stmt: Some(_) }
                    if first && plan_outdated =>
                {
                    srv.statements.plans_outdated()
                }
                _ => {}
            }
            first = false;
            self.queue.pop_front();
        }
        if self.server_skipping {
            self.unsynced = true;
        }
    }

    /// Records that the server lacks `id`, unless a Parse of it that Weir already sent later
    /// in the queue (in a batch pipelined after this one, or further on in this one) will
    /// decide: its own reply or skip settles the record.
    fn forget_unless_prepared_later(&self, srv: &mut ServerState, id: StatementId) {
        let later = self
            .queue
            .iter()
            .skip(1)
            .any(|e| matches!(e, Expect::ParseComplete { stmt: Some(x), .. } if *x == id));
        if !later {
            srv.statements.remove(id)
        }
    }

    /// The server entered copy-in: it will ignore the client's Syncs until the client's
    /// CopyDone/CopyFail, so those Syncs owe no ReadyForQuery.
    fn ignore_syncs_during_copy(&mut self) {
        let mut i = 1;
        let mut ignored = false;
        let mut ended = false;
        while i < self.queue.len() {
            match self.queue[i] {
                Expect::Sync { .. } => {
                    self.queue.remove(i);
                    ignored = true;
                }
                Expect::CopyEnd => {
                    self.queue.remove(i);
                    ended = true;
                    break;
                }
                _ => i += 1,
            }
        }
        // The client has not ended the COPY yet: its coming Syncs are ignored too.
        if !ended {
            self.client_in_copy = true;
        }
        // A Sync relayed before the COPY began is ignored: unless the client has sent one
        // since its CopyDone, the batch is still open (the connection is not free).
        if ignored
            && matches!(self.queue.front(), Some(Expect::Execute))
            && !self.queue.iter().any(|e| matches!(e, Expect::Sync { .. }))
        {
            self.unsynced = true;
        }
    }
}

/// Whether an 0A000 error is PostgreSQL's refusal of a cached plan whose result changed
/// ("cached plan must not change result type", raised in `RevalidateCachedQuery`): by the
/// routine field, which does not depend on `lc_messages`, or by the English message where a
/// server leaves that field out. Other 0A000 errors (a planner's "FULL JOIN is only
/// supported with ...") must not make every connection prepare its statements again.
fn is_outdated_plan(body: &[u8], message: &str) -> bool {
    match weir_wire::error::field(body, b'R') {
        Some(routine) => routine == b"RevalidateCachedQuery",
        None => message == "cached plan must not change result type",
    }
}

/// Output of [`Relay::from_server`]: either the untouched prefix of the input (fast path) or,
/// once anything is dropped or inserted, a copy in `scratch`.
struct Out<'a> {
    input: &'a [u8],
    scratch: &'a mut BytesMut,
    copying: bool,
}

impl Out<'_> {
    /// Switches to copying: everything before `pos` was forwarded as is.
    #[inline(never)]
    fn divert(&mut self, pos: usize) {
        if !self.copying {
            self.scratch.extend_from_slice(&self.input[..pos]);
            self.copying = true;
        }
    }

    /// Once per server message: inline, since the usual case (forwarded, no copy) does
    /// nothing.
    #[inline]
    fn pass(&mut self, from: usize, to: usize, forward: bool) {
        if !forward {
            self.divert(from);
        } else if self.copying {
            self.scratch.extend_from_slice(&self.input[from..to]);
        }
    }
}

const DUPLICATE_PREPARED_STATEMENT: SqlState = SqlState(*b"42P05");

/// Keeps statement and parameter records true to commands that drop them, however they
/// were sent (simple or extended protocol, alone or in a multi-statement query).
fn track_command(body: &[u8], srv: &mut ServerState, statements: &mut ClientStatements) {
    let tag = body.strip_suffix(&[0]).unwrap_or(body);
    match tag {
        b"DISCARD ALL" => {
            srv.statements.clear();
            srv.params.forget_sets();
            statements.clear();
        }
        b"DEALLOCATE ALL" => {
            srv.statements.clear();
            statements.clear();
        }
        _ => {}
    }
}

/// Simple-protocol commands Weir answers itself in transaction mode.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SqlKind {
    Deallocate(Vec<u8>),
    DeallocateAll,
    Other,
}

/// Whether the text starts with the word DEALLOCATE (in any case, after any whitespace):
/// a look at the first word, no decoding.
fn starts_with_deallocate(sql: &[u8]) -> bool {
    // Most text starts with its first word: one look settles it.
    match sql.first() {
        Some(b'd' | b'D') => {}
        Some(b) if b.is_ascii_whitespace() => {}
        _ => return false,
    }
    let start = sql
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(sql.len());
    sql[start..]
        .get(..10)
        .is_some_and(|w| w.eq_ignore_ascii_case(b"deallocate"))
}

/// Recognises `DEALLOCATE [PREPARE] name|ALL` as a whole query.
fn classify_sql(sql: &[u8]) -> SqlKind {
    // Most queries are not DEALLOCATE: decide that from the first word without UTF-8 work.
    if !starts_with_deallocate(sql) {
        return SqlKind::Other;
    }
    let text = match std::str::from_utf8(sql) {
        Ok(t) => t.trim().trim_end_matches(';').trim(),
        Err(_) => return SqlKind::Other,
    };
    let mut words = text.split_ascii_whitespace();
    let first = words.next().unwrap_or("");
    if !first.eq_ignore_ascii_case("deallocate") {
        return SqlKind::Other;
    }
    let mut name = words.next();
    if name.is_some_and(|w| w.eq_ignore_ascii_case("prepare")) {
        name = words.next();
    }
    match (name, words.next()) {
        (Some(n), None) if n.eq_ignore_ascii_case("all") => SqlKind::DeallocateAll,
        (Some(n), None) => {
            let n = if n.len() >= 2 && n.starts_with('"') && n.ends_with('"') {
                n[1..n.len() - 1].replace("\"\"", "\"")
            } else {
                n.to_ascii_lowercase()
            };
            SqlKind::Deallocate(n.into_bytes())
        }
        _ => SqlKind::Other,
    }
}

/// Encodes an empty-bodied frontend message (for tests and injected Syncs).
pub fn encode_sync(to_server: &mut BytesMut) {
    frontend::encode_empty(tag::SYNC, to_server);
}

#[cfg(test)]
mod tests;
