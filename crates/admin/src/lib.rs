//! Weir's HTTP admin listener, on its own address (loopback by default, `admin.listen`).
//!
//! Routes:
//! - `GET /health/live`: 200 while the process serves. No token.
//! - `GET /health/ready`: 200 when every pool's server answered its last probe (and every
//!   configured database without a pool yet accepts TCP connections); 503 with the reasons
//!   otherwise. No token. For load balancers and orchestrators.
//! - `GET /health/pool`: per-pool and total JSON (schema in [`health`] and docs/ADMIN.md).
//! - `GET /metrics`: Prometheus text exposition (prometheus-client), see [`metrics`].
//! - `GET /api/config`: the running config, every secret redacted.
//! - `GET /api/slow-queries`: the latest statements over `slow_query_threshold`, newest first.
//! - `POST /api/reload`: load the config again and apply it live (`?rollback=true`: go back
//!   to the config before the last reload). 200 with the changes made and the settings that
//!   need a restart; 422 with every problem if the new config is bad (nothing changes).
//! - `POST /api/pools/{database}/{user}/size`: body `{"size": N}`, resize one pool live
//!   until the next reload.
//! - `GET /`: the live dashboard (assets embedded, nothing loaded from elsewhere).
//!
//! With `admin.token` set, every route but liveness and readiness needs
//! `Authorization: Bearer <token>` (or `?token=<token>`, so a browser can open the dashboard);
//! without it the answer is 401 with `WWW-Authenticate`. The comparison is constant-time.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use weir_proxy::listener::Shared;

pub mod health;
pub mod metrics;

/// A running admin listener.
pub struct AdminHandle {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl AdminHandle {
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves the admin routes over `shared`.
pub async fn start(shared: Arc<Shared>, addr: SocketAddr) -> std::io::Result<AdminHandle> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {addr} (admin): {e}"))
    })?;
    let addr = listener.local_addr()?;
    let app = router(shared);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin listener failed");
        }
    });
    tracing::info!(%addr, "admin listener ready");
    Ok(AdminHandle { addr, task })
}

/// The routes, for tests and embedding.
pub fn router(shared: Arc<Shared>) -> Router {
    let guarded = Router::new()
        .route("/", get(dashboard))
        .route("/health/pool", get(health::pool))
        .route("/metrics", get(metrics::render))
        .route("/api/config", get(health::config))
        .route("/api/slow-queries", get(health::slow_queries))
        .route("/api/reload", post(health::reload))
        .route("/api/pools/{database}/{user}/size", post(health::resize))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ));
    Router::new()
        .route("/health/live", get(|| async { "ok\n" }))
        .route("/health/ready", get(health::ready))
        .merge(guarded)
        .with_state(shared)
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

/// Constant-time equality.
fn same(a: &[u8], b: &[u8]) -> bool {
    weir_wire::scram::ct_eq(a, b)
}

async fn require_token(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let config = shared.config.load();
    let Some(token) = &config.admin.token else {
        return next.run(req).await;
    };
    let want = token.expose().as_bytes();
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().as_bytes().to_vec());
    let query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(|t| t.as_bytes().to_vec())
    });
    if bearer.iter().chain(query.iter()).any(|t| same(t, want)) {
        return next.run(req).await;
    }
    let mut r = (
        StatusCode::UNAUTHORIZED,
        "a bearer token is required (admin.token)\n",
    )
        .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"weir\""),
    );
    r
}
