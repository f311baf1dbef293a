//! The pools, one per (database, user), and how their server connections are made.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use weir_config::{Config, PoolSettings, ServerLogin};
use weir_pool::{Manager, Meta, Pool};

use crate::params::ParamSet;
use crate::server::{ServerConn, ServerError};

/// Opens server connections for one pool and remembers what the server reported on the
/// first one: the defaults clients are told at login.
#[derive(Debug)]
pub struct ServerManager {
    pub login: ServerLogin,
    pub settings: PoolSettings,
    next_id: Arc<AtomicU64>,
    defaults: Mutex<Option<Arc<ParamSet>>>,
}

impl Manager for ServerManager {
    type Object = ServerConn;
    type Error = ServerError;

    async fn create(&self) -> Result<ServerConn, ServerError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = ServerConn::connect(
            &self.login,
            self.settings.connect_timeout,
            self.settings.prepared_statements_cache as usize,
            id,
        )
        .await?;
        tracing::debug!(server = %conn.addr, id, pid = conn.key.pid, "server connection opened");
        let mut d = self.defaults.lock().unwrap();
        if d.is_none() {
            *d = Some(Arc::new(conn.state.params.reported.clone()));
        }
        Ok(conn)
    }

    fn is_usable(&self, conn: &mut ServerConn, _meta: &Meta) -> bool {
        let alive = conn.is_alive();
        if !alive {
            tracing::info!(server = %conn.addr, id = conn.id, "idle server connection was closed by the server; replacing it");
        }
        alive
    }
}

/// One pool: the (database, user) it serves, its settings, and its connections.
#[derive(Debug)]
pub struct ServerPool {
    pub database: String,
    pub user: String,
    pub pool: Pool<ServerManager>,
}

impl ServerPool {
    pub fn settings(&self) -> &PoolSettings {
        &self.pool.manager().settings
    }

    pub fn name(&self) -> String {
        format!("{}/{}", self.database, self.user)
    }

    /// The parameters the server reports at login. Opens a connection if none was ever
    /// opened, which also proves the server can be reached.
    pub async fn defaults(&self) -> Result<Arc<ParamSet>, weir_pool::GetError<ServerError>> {
        if let Some(d) = self.pool.manager().defaults.lock().unwrap().clone() {
            return Ok(d);
        }
        let conn = self.pool.get(self.settings().query_wait_timeout).await?;
        conn.release();
        Ok(self
            .pool
            .manager()
            .defaults
            .lock()
            .unwrap()
            .clone()
            .expect("set by the first connection"))
    }
}

/// Every pool, created on first use.
#[derive(Debug, Default)]
pub struct Pools {
    map: Mutex<HashMap<(String, String), Arc<ServerPool>>>,
    next_id: Arc<AtomicU64>,
}

impl Pools {
    /// The pool for `database` and `user`, or `None` if the database is not configured.
    pub fn get(&self, config: &Config, database: &str, user: &str) -> Option<Arc<ServerPool>> {
        let mut map = self.map.lock().unwrap();
        if let Some(p) = map.get(&(database.to_string(), user.to_string())) {
            return Some(p.clone());
        }
        let login = config.server_login(database, user)?;
        let settings = config.pool_settings(database, user);
        let size = settings.size as usize;
        let manager = ServerManager {
            login,
            settings,
            next_id: self.next_id.clone(),
            defaults: Mutex::new(None),
        };
        let pool = Arc::new(ServerPool {
            database: database.into(),
            user: user.into(),
            pool: Pool::new(manager, size),
        });
        map.insert((database.to_string(), user.to_string()), pool.clone());
        Some(pool)
    }

    pub fn all(&self) -> Vec<Arc<ServerPool>> {
        self.map.lock().unwrap().values().cloned().collect()
    }

    /// Closes every pool: waiters fail, idle connections close.
    pub fn close_all(&self) {
        for p in self.all() {
            p.pool.close();
        }
    }
}
