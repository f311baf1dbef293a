//! Integration tests: Weir in front of a real PostgreSQL (started by weir-testkit), driven by
//! real clients (tokio-postgres, psql, pgbench; asyncpg, psycopg, pgjdbc and node-postgres in
//! `drivers`) and, for hostile input, raw sockets.
//!
//! One test binary, so one PostgreSQL serves every test; each test uses its own database so
//! pg_stat_activity counts do not mix.

mod common;

mod access;
mod admin;
mod alloc;
mod auth;
mod bench;
mod cancel;
mod config;
mod drivers;
mod hostile;
mod lifecycle;
mod memory;
mod pooling;
mod prepared;
mod protocol;
mod reload;
mod secrets;
mod session;
mod tls;
mod workers;

/// Counts what Weir's thread allocates in `alloc`'s test, and nothing elsewhere.
#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;
