//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};

pub use weir_testkit::*;

/// A fresh database name per test, so pg_stat_activity counts are per test.
pub fn unique_db(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Connects with tokio-postgres and drives the connection in the background.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The SQLSTATE of a tokio-postgres error, as text.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no code: {e}"))
}

/// A database and Weir in front of the shared server.
pub struct Setup {
    pub pg: &'static PgServer,
    pub db: String,
    pub weir: weir_proxy::ProxyHandle,
}

impl Setup {
    pub async fn new(prefix: &str, pool_size: u32, mode: PoolMode) -> Setup {
        Self::with_config(prefix, |pg, db| weir_config(pg, db, pool_size, mode)).await
    }

    pub async fn with_config(prefix: &str, f: impl FnOnce(&PgServer, &str) -> Config) -> Setup {
        let pg = PgServer::shared();
        let db = unique_db(prefix);
        let db2 = db.clone();
        tokio::task::spawn_blocking(move || PgServer::shared().create_database(&db2))
            .await
            .unwrap();
        let config = f(pg, &db);
        let weir = start_weir(config).await;
        Setup { pg, db, weir }
    }

    pub fn url(&self, login: Login) -> String {
        weir_url(&self.weir, login, &self.db)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url(SCRAM_USER))
            .await
            .expect("connect through weir")
    }
}
