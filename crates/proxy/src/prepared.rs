//! Prepared statements in transaction mode.
//!
//! A client's named statement maps to a server-side name derived from its text and parameter
//! types (`weir_` + 128 bits of SHA-256), so two clients preparing the same SQL share one server
//! statement and the same name with different SQL never collides. Each server connection keeps
//! a bounded record of which statements it has; a statement is prepared there lazily, the first
//! time a client on that connection needs it.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::{Bytes, BytesMut};
use weir_wire::frontend::Parse;

/// Identity of a server-side statement: a hash of its text and parameter types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatementId(pub u128);

pub const NAME_LEN: usize = 5 + 32;

impl StatementId {
    pub fn of(parse: &Parse<'_>) -> StatementId {
        // A cryptographic hash, so no client can craft SQL whose name collides with another
        // client's statement and have that client run its text.
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update((parse.query.len() as u64).to_be_bytes());
        h.update(parse.query);
        h.update(parse.param_types);
        let d = h.finalize();
        StatementId(u128::from_be_bytes(
            d[..16].try_into().expect("32-byte digest"),
        ))
    }

    /// The server-side name: `weir_` and 32 hex digits (fits NAMEDATALEN).
    pub fn name(&self) -> [u8; NAME_LEN] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; NAME_LEN];
        out[..5].copy_from_slice(b"weir_");
        // A byte at a time: shifting the u128 per digit costs several times more.
        for (i, b) in self.0.to_be_bytes().into_iter().enumerate() {
            out[5 + 2 * i] = HEX[usize::from(b >> 4)];
            out[6 + 2 * i] = HEX[usize::from(b & 0xf)];
        }
        out
    }
}

/// A statement a client prepared: its server identity and the Parse to send a server that
/// lacks it (already renamed).
#[derive(Debug)]
pub struct Statement {
    pub id: StatementId,
    pub parse: Bytes,
}

impl Statement {
    /// The server-side name (see [`StatementId::name`]), read from the Parse already built
    /// with it rather than hex-encoded again at every Bind.
    pub fn server_name(&self) -> &[u8] {
        &self.parse[weir_wire::frame::HEADER_LEN..weir_wire::frame::HEADER_LEN + NAME_LEN]
    }

    pub fn new(parse: &Parse<'_>) -> Statement {
        let id = StatementId::of(parse);
        let mut buf =
            BytesMut::with_capacity(parse.query.len() + parse.param_types.len() + NAME_LEN + 8);
        Parse {
            name: &id.name(),
            query: parse.query,
            param_types: parse.param_types,
        }
        .encode(&mut buf);
        Statement {
            id,
            parse: buf.freeze(),
        }
    }
}

/// One client's statement names, hashed with foldhash (seeded per map): looked up on every
/// Bind, where the default SipHash cost more than the rest of the lookup. The names are the
/// client's own, so at worst a client slows only its own map.
#[derive(Debug, Default)]
pub struct ClientStatements {
    map: HashMap<Box<[u8]>, Arc<Statement>, foldhash::fast::RandomState>,
    /// What the statements count against `max_client_prepared_bytes` (see [`cost`]).
    bytes: usize,
}

/// What one statement counts against `max_client_prepared_bytes`: its name and Parse, and
/// about what the map entry, the `Arc` and the buffer's header take beside them (so that
/// many tiny statements count for what they hold too).
fn cost(name: &[u8], s: &Statement) -> usize {
    const ENTRY: usize = 128;
    ENTRY + name.len() + s.parse.len()
}

impl ClientStatements {
    pub fn get(&self, name: &[u8]) -> Option<&Arc<Statement>> {
        self.map.get(name)
    }

    /// What the statements would take with `s` under `name` (replacing what it names now).
    pub fn bytes_with(&self, name: &[u8], s: &Statement) -> usize {
        let old = self.map.get(name).map_or(0, |o| cost(name, o));
        self.bytes - old + cost(name, s)
    }

    pub fn insert(&mut self, name: &[u8], s: Arc<Statement>) {
        self.bytes += cost(name, &s);
        if let Some(old) = self.map.insert(name.into(), s) {
            self.bytes -= cost(name, &old);
        }
    }

    pub fn remove(&mut self, name: &[u8]) -> bool {
        match self.map.remove(name) {
            Some(old) => {
                self.bytes -= cost(name, &old);
                true
            }
            None => false,
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Hashes a [`StatementId`] by its own bits: it is already a cryptographic hash.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by StatementId (it hashes as one u128); kept correct for any other input.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, n: u128) {
        self.0 ^= n as u64 ^ (n >> 64) as u64;
    }
}

/// The statements one server connection has, with a least-recently-used bound.
///
/// A schema change can leave a statement's cached plan out of date: PostgreSQL then refuses
/// to run it ("cached plan must not change result type", 0A000) until it is prepared again.
/// A client that prepares it again gets the same shared name, so Weir itself closes the
/// statement and prepares it afresh: [`Self::plans_outdated`] marks every statement of this
/// connection outdated and counts the event in a number the database's connections share,
/// and each of them, seeing the number change at its next batch ([`Self::check_plans`]),
/// marks its own. An outdated statement is closed before the next Parse Weir sends that
/// server ([`Self::take_outdated`]), so using it again prepares it again.
#[derive(Debug)]
pub struct ServerStatements {
    last_use: HashMap<StatementId, u64, BuildHasherDefault<IdHasher>>,
    tick: u64,
    capacity: usize,
    /// Statements the server still has that are not counted here: plans that may be out of
    /// date, and statements whose Close was skipped after an error. Closed before the next
    /// Parse Weir sends.
    outdated: Vec<StatementId>,
    /// Statements Weir sent a Close for whose CloseComplete has not come (one entry per
    /// Close).
    closing: Vec<StatementId>,
    /// How many times a connection to the database found plans out of date, and the count this
    /// connection last acted on.
    plan_changes: Arc<AtomicU64>,
    plan_changes_seen: u64,
}

impl ServerStatements {
    pub fn new(capacity: usize) -> Self {
        ServerStatements {
            last_use: HashMap::default(),
            tick: 0,
            capacity: capacity.max(1),
            outdated: Vec::new(),
            closing: Vec::new(),
            plan_changes: Arc::default(),
            plan_changes_seen: 0,
        }
    }

    /// Shares the count of plan changes with the database's other connections.
    pub fn share_plan_changes(&mut self, count: Arc<AtomicU64>) {
        self.plan_changes_seen = count.load(Relaxed);
        self.plan_changes = count;
    }

    /// At the start of a batch: if another connection of the database found plans out of
    /// date since this one last looked, this one's may be too.
    #[inline]
    pub fn check_plans(&mut self) {
        let now = self.plan_changes.load(Relaxed);
        if now != self.plan_changes_seen {
            self.plan_changes_seen = now;
            self.outdate_all();
        }
    }

    /// The server refused a statement's plan as out of date: this connection's statements,
    /// and those of the database's other connections, are prepared again before their next
    /// use.
    pub fn plans_outdated(&mut self) {
        self.plan_changes_seen = self.plan_changes.fetch_add(1, Relaxed).wrapping_add(1);
        self.outdate_all();
    }

    #[cold]
    fn outdate_all(&mut self) {
        self.outdated
            .extend(self.last_use.drain().map(|(id, _)| id));
    }

    /// The outdated statements the server still has, to close before the next Parse (so the
    /// Parse of one of them prepares it afresh rather than finding the name taken).
    /// Each is recorded as closing.
    pub fn take_outdated(&mut self) -> Vec<StatementId> {
        self.closing.extend_from_slice(&self.outdated);
        std::mem::take(&mut self.outdated)
    }

    /// The server closed `id`.
    pub fn closed(&mut self, id: StatementId) {
        if let Some(i) = self.closing.iter().position(|c| *c == id) {
            self.closing.swap_remove(i);
        }
    }

    /// Whether `id`, about to be prepared, must be closed first because a Close of it is in
    /// flight (an error may yet skip it); if so, records that Close too.
    pub fn close_again(&mut self, id: StatementId) -> bool {
        let again = !self.closing.is_empty() && self.closing.contains(&id);
        if again {
            self.closing.push(id);
        }
        again
    }

    /// A Close of `id` was skipped after an error: the server still has it. Unless another
    /// Close of it is in flight, it is closed before the next Parse.
    pub fn close_skipped(&mut self, id: StatementId) {
        self.closed(id);
        if !self.closing.contains(&id) {
            self.outdated.push(id);
        }
    }

    /// The tick the next use will get. A batch records it before it starts, so eviction can
    /// spare everything the batch itself uses.
    pub fn next_tick(&self) -> u64 {
        self.tick + 1
    }

    /// Whether the server has `id`; marks it used.
    pub fn touch(&mut self, id: StatementId) -> bool {
        self.tick += 1;
        match self.last_use.get_mut(&id) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records `id` as prepared. If that takes the set over its bound, removes least recently
    /// used statements until it is back at it, oldest first, records each as closing and
    /// hands it to `close` (whose caller sends the server a Close for it; see
    /// [`Self::closed`] and [`Self::close_skipped`] for its outcome).
    /// Spared: statements used at or after `protect_from` (by the current batch), and all of
    /// them when eviction is not allowed now (`may_evict`: a transaction is open, so a portal
    /// could still depend on one). Then the bound is exceeded until a later insert.
    pub fn insert(
        &mut self,
        id: StatementId,
        protect_from: u64,
        may_evict: bool,
        mut close: impl FnMut(StatementId),
    ) {
        self.tick += 1;
        self.last_use.insert(id, self.tick);
        if self.last_use.len() <= self.capacity || !may_evict {
            return;
        }
        let over = self.last_use.len() - self.capacity;
        if over == 1 {
            // The usual case: one scan for the least recently used.
            if let Some((&victim, &t)) = self.last_use.iter().min_by_key(|(_, t)| **t)
                && t < protect_from
            {
                self.last_use.remove(&victim);
                self.closing.push(victim);
                close(victim);
            }
            return;
        }
        // A transaction left the set far over its bound: one pass for all the oldest, not a
        // scan of the whole set for each of them.
        let mut old: Vec<(u64, StatementId)> = self
            .last_use
            .iter()
            .filter(|(_, t)| **t < protect_from)
            .map(|(id, t)| (*t, *id))
            .collect();
        if old.len() > over {
            old.select_nth_unstable_by_key(over, |e| e.0);
            old.truncate(over);
        }
        old.sort_unstable_by_key(|e| e.0);
        for (_, victim) in old {
            self.last_use.remove(&victim);
            self.closing.push(victim);
            close(victim);
        }
    }

    pub fn remove(&mut self, id: StatementId) {
        self.last_use.remove(&id);
    }

    /// The server dropped every statement (DISCARD ALL, DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.last_use.clear();
        self.outdated.clear();
    }

    pub fn len(&self) -> usize {
        self.last_use.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_use.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<'a>(q: &'a [u8], types: &'a [u8]) -> Parse<'a> {
        Parse {
            name: b"s",
            query: q,
            param_types: types,
        }
    }

    #[test]
    fn client_statements_count_their_bytes_through_every_change() {
        let mut c = ClientStatements::default();
        let a = Arc::new(Statement::new(&parse(b"select 1", b"")));
        let b = Arc::new(Statement::new(&parse(b"select 'a longer text'", b"")));
        let (ca, cb) = (cost(b"a", &a), cost(b"a", &b));
        assert!(cb > ca);
        assert_eq!(c.bytes_with(b"a", &a), ca);
        c.insert(b"a", a.clone());
        c.insert(b"x", a.clone());
        assert_eq!(c.bytes, 2 * ca);
        // Replacing a name counts the new statement instead of the old one.
        assert_eq!(c.bytes_with(b"a", &b), ca + cb);
        c.insert(b"a", b.clone());
        assert_eq!(c.bytes, ca + cb);
        assert!(c.remove(b"x"));
        assert!(!c.remove(b"x"));
        assert_eq!(c.bytes, cb);
        c.clear();
        assert_eq!((c.bytes, c.len()), (0, 0));
    }

    #[test]
    fn same_text_same_id_different_types_different_id() {
        let none = [0u8, 0];
        let int = [0u8, 1, 0, 0, 0, 23];
        assert_eq!(
            StatementId::of(&parse(b"select 1", &none)),
            StatementId::of(&parse(b"select 1", &none))
        );
        assert_ne!(
            StatementId::of(&parse(b"select $1", &none)),
            StatementId::of(&parse(b"select $1", &int))
        );
        assert_ne!(
            StatementId::of(&parse(b"select 1", &none)),
            StatementId::of(&parse(b"select 2", &none))
        );
    }

    #[test]
    fn renamed_parse_keeps_text_and_types() {
        let types = [0u8, 1, 0, 0, 0, 23];
        let p = parse(b"select $1", &types);
        let s = Statement::new(&p);
        let (_, body) = weir_wire::frame::complete(&s.parse, 1 << 20)
            .unwrap()
            .unwrap();
        let back = Parse::decode(body).unwrap();
        assert_eq!(
            s.server_name(),
            &s.id.name()[..],
            "read from the built Parse"
        );
        assert_eq!(back.name, &s.id.name()[..]);
        assert!(back.name.starts_with(b"weir_"));
        assert_eq!(
            (back.query, back.param_types),
            (&b"select $1"[..], &types[..])
        );
    }

    #[test]
    fn server_names_are_the_ids_hex_digits() {
        let id = StatementId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(&id.name()[..], b"weir_0123456789abcdeffedcba9876543210");
    }

    /// What `insert` closes.
    fn insert(c: &mut ServerStatements, id: StatementId, from: u64, may: bool) -> Vec<StatementId> {
        let mut closed = Vec::new();
        c.insert(id, from, may, |v| closed.push(v));
        closed
    }

    /// [`insert`] in a batch of its own.
    fn insert_next(c: &mut ServerStatements, id: StatementId, may: bool) -> Vec<StatementId> {
        let from = c.next_tick();
        insert(c, id, from, may)
    }

    #[test]
    fn lru_evicts_oldest_but_spares_current_batch() {
        let mut c = ServerStatements::new(2);
        let (a, b, x) = (StatementId(1), StatementId(2), StatementId(3));
        assert_eq!(insert_next(&mut c, a, true), []);
        assert_eq!(insert_next(&mut c, b, true), []);
        assert!(c.touch(a));
        // A new batch: b is least recently used and not part of it.
        let batch = c.next_tick();
        assert_eq!(insert(&mut c, x, batch, true), [b]);
        assert!(!c.touch(b));
        // Same batch uses everything: nothing evicted, bound exceeded for now.
        let batch = c.next_tick();
        c.touch(a);
        c.touch(x);
        assert_eq!(insert(&mut c, b, batch, true), []);
        assert_eq!(c.len(), 3);
        // Inside a transaction nothing is evicted either.
        assert_eq!(insert_next(&mut c, StatementId(9), false), []);
        assert_eq!(c.len(), 4);
        // The next insert that may evict brings the set back to its bound, oldest first.
        let batch = c.next_tick();
        assert_eq!(insert(&mut c, StatementId(10), batch, true), [a, x, b]);
        assert_eq!(c.len(), 2);
        assert!(c.touch(StatementId(9)) && c.touch(StatementId(10)));
    }

    #[test]
    fn a_trim_spares_the_batch_and_takes_the_oldest_of_the_rest() {
        let mut c = ServerStatements::new(3);
        // Eight statements prepared inside a transaction: ids 1..=8, oldest first.
        for i in 1..=8 {
            assert_eq!(insert_next(&mut c, StatementId(i), false), []);
        }
        // A batch uses 2, 5 and 7, then prepares 9: six over, but only five are not the
        // batch's own: those go, oldest first, and the set stays one over until later.
        let batch = c.next_tick();
        for i in [7, 2, 5] {
            c.touch(StatementId(i));
        }
        let closed = insert(&mut c, StatementId(9), batch, true);
        let ids = |v: &[u128]| v.iter().map(|&i| StatementId(i)).collect::<Vec<_>>();
        assert_eq!(closed, ids(&[1, 3, 4, 6, 8]));
        assert_eq!(c.len(), 4);
        for i in [2, 5, 7, 9] {
            assert!(c.touch(StatementId(i)), "{i} kept");
        }
    }

    #[test]
    fn outdated_plans_reach_every_connection_sharing_the_count() {
        let shared = Arc::new(AtomicU64::new(0));
        let (mut a, mut b) = (ServerStatements::new(8), ServerStatements::new(8));
        a.share_plan_changes(shared.clone());
        b.share_plan_changes(shared.clone());
        for c in [&mut a, &mut b] {
            insert_next(c, StatementId(1), true);
            insert_next(c, StatementId(2), true);
            c.check_plans();
            assert!(c.take_outdated().is_empty(), "nothing outdated yet");
        }
        a.plans_outdated();
        assert!(
            !a.touch(StatementId(1)),
            "prepared again before its next use"
        );
        let mut closing = a.take_outdated();
        closing.sort_by_key(|id| id.0);
        assert_eq!(closing, [StatementId(1), StatementId(2)]);
        a.check_plans();
        assert!(a.take_outdated().is_empty(), "a change is acted on once");
        // b learns of it at its next batch.
        assert!(b.touch(StatementId(2)));
        b.check_plans();
        assert!(!b.touch(StatementId(2)));
        assert_eq!(b.take_outdated().len(), 2);
        // A Close skipped after an error is still owed; DISCARD ALL settles it.
        b.close_skipped(StatementId(2));
        b.clear();
        assert!(b.take_outdated().is_empty());
    }
}
