//! Weir's hot path. Nothing here knows about HTTP, benchmarks or advice.
//!
//! Layout, in the order a client meets it:
//! - [`listener`]: binds TCP/Unix sockets, accepts, spawns a session per client; the handle
//!   used to stop it.
//! - [`startup`]: the untagged first packets (SSLRequest, CancelRequest, StartupMessage).
//! - [`auth`]: client authentication (SCRAM-SHA-256, md5, trust).
//! - [`auth_query`]: secrets of users not in the config, looked up on the server and cached.
//! - [`session`]: one client's life: waits for its messages, checks out a server connection,
//!   relays, and releases the connection at the transaction boundary.
//! - [`relay`]: the bookkeeping the session relies on (replies owed, statement renaming).
//! - [`prepared`]: client statement names and per-server statement caches.
//! - [`params`]: session parameters carried from client to server connection.
//! - [`pools`]: the pools keyed by (database, user), and how server connections are made.
//! - [`reload`]: hot reload, rollback and live resize.
//! - [`server`]: a logged-in server connection and its state.
//! - [`cancel`]: cancel keys handed to clients and forwarding of CancelRequests.
//! - [`stream`]: TCP, TLS or Unix socket behind one type.
//! - [`tls`]: rustls on both sides (certificates, modes, handshakes, channel binding).
//! - [`access`]: access rules and the failed-login slowdown.
//! - [`workers`]: the worker threads (one single-threaded runtime per core) clients are
//!   spread over.

pub mod access;
pub mod auth;
pub mod auth_query;
pub mod cancel;
pub mod console;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod params;
pub mod pools;
pub mod prepared;
pub mod relay;
pub mod reload;
pub mod reuse;
pub mod server;
pub mod session;
pub mod startup;
pub mod stream;
pub mod tls;
pub mod workers;

pub use listener::{Proxy, ProxyHandle};
