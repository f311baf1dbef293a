//! A small HTTP/1.1 client for Weir's admin listener (hyper's client connection), used by
//! `weir reload`, `weir bench --admin` and `weir advise --admin`.

use std::net::SocketAddr;

use anyhow::Context;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

/// An admin address: `HOST:PORT` or `http://HOST:PORT[/]`.
pub fn admin_addr(s: &str) -> anyhow::Result<SocketAddr> {
    let bare = s.trim().trim_start_matches("http://").trim_end_matches('/');
    use std::net::ToSocketAddrs;
    bare.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| format!("`{s}` is not an admin address: write it like 127.0.0.1:9930"))
}

/// One request without a body: (status, body). 401 becomes an error naming the fix.
pub async fn request(
    method: hyper::Method,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(hyper::StatusCode, Bytes)> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach weir's admin listener at {addr}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string());
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let res = sender
        .send_request(req.body(Empty::<Bytes>::new())?)
        .await?;
    let status = res.status();
    if status == hyper::StatusCode::UNAUTHORIZED {
        anyhow::bail!("{addr} wants a token: give --token or set WEIR_ADMIN_TOKEN");
    }
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// GET a path and return its body as text; anything but 200 is an error.
pub async fn get_text(addr: SocketAddr, path: &str, token: Option<&str>) -> anyhow::Result<String> {
    let (status, body) = request(hyper::Method::GET, addr, path, token).await?;
    if status != hyper::StatusCode::OK {
        anyhow::bail!("GET {path} on {addr}: {status}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}
