//! sqlx through Weir: run by crates/weir/tests/it/drivers.rs with a URL and a client count.
//!
//! sqlx prepares every query with arguments as a named statement (`sqlx_s_N`, the same
//! names on every connection) kept in a per-connection cache it bounds by closing the
//! oldest, and describes each statement before its first use. Exits non-zero, with the
//! reason, on the first wrong answer; also passes run straight against PostgreSQL.

use std::error::Error;

use futures_util::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, Row};

type Res<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

fn check(ok: bool, what: String) -> Res {
    if ok { Ok(()) } else { Err(what.into()) }
}

fn code(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
}

async fn client(opts: PgConnectOptions, i: i32) -> Res {
    // Every third client keeps only 4 statements, so sqlx closes its oldest as it goes.
    let opts = if i % 3 == 0 {
        opts.statement_cache_capacity(4)
    } else {
        opts
    };
    let mut c = opts.connect().await?;
    for k in 0..100i32 {
        let v: i32 = sqlx::query_scalar("select $1::int + 1")
            .bind(k)
            .fetch_one(&mut c)
            .await?;
        check(v == k + 1, format!("client {i}: {v} for {k} + 1"))?;
        // The same text on every client under the same sqlx name, and a text only this
        // client uses.
        let sql = format!("select $1::text || '-' || $2::text as s, $3::int * {i} as n");
        let r = sqlx::query(&sql)
            .bind(format!("c{i}"))
            .bind(k.to_string())
            .bind(3)
            .fetch_one(&mut c)
            .await?;
        let (s, n): (String, i32) = (r.get("s"), r.get("n"));
        check(
            s == format!("c{i}-{k}") && n == 3 * i,
            format!("client {i}: {s} {n}"),
        )?;
        // Not kept: sqlx parses the unnamed statement and binds it in the next transaction,
        // maybe on another server connection, which holds another client's.
        let sql = format!("select $1::text || '-{i}'");
        let u: String = sqlx::query_scalar(&sql)
            .bind("u")
            .persistent(false)
            .fetch_one(&mut c)
            .await?;
        check(
            u == format!("u-{i}"),
            format!("client {i}: unnamed statement gave {u}"),
        )?;
        if k % 20 != 0 {
            continue;
        }
        let key = i * 100_000 + k;
        let id = uuid::Uuid::new_v4();
        let doc = serde_json::json!({ "a": k });
        let mut tx = c.begin().await?;
        sqlx::query("insert into sqlx_t values ($1, $2, $3, $4, $5)")
            .bind(key)
            .bind(format!("n{key}"))
            .bind(&doc)
            .bind(id)
            .bind(vec![1, 2, k])
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("select * from sqlx_t where id = $1")
            .bind(key)
            .fetch_one(&mut *tx)
            .await?;
        let (u, j, arr): (uuid::Uuid, serde_json::Value, Vec<i32>) =
            (row.get("u"), row.get("j"), row.get("arr"));
        check(
            u == id && j == doc && arr == vec![1, 2, k],
            format!("client {i}: row {u} {j} {arr:?}"),
        )?;
        tx.commit().await?;
        let dup = sqlx::query("insert into sqlx_t (id) values ($1)")
            .bind(key)
            .execute(&mut c)
            .await;
        check(
            dup.as_ref().err().and_then(code).as_deref() == Some("23505"),
            format!("client {i}: duplicate gave {dup:?}"),
        )?;
        // An error inside a transaction: sqlx rolls back when the transaction is dropped.
        {
            let mut tx = c.begin().await?;
            sqlx::query("insert into sqlx_t (id) values ($1)")
                .bind(key + 50_000)
                .execute(&mut *tx)
                .await?;
            let e = sqlx::query_scalar::<_, i32>("select 1 / $1::int")
                .bind(0)
                .fetch_one(&mut *tx)
                .await;
            check(
                e.as_ref().err().and_then(code).as_deref() == Some("22012"),
                format!("client {i}: 1/0 gave {e:?}"),
            )?;
        }
        let n: i64 = sqlx::query_scalar("select count(*) from sqlx_t where id = $1")
            .bind(key + 50_000)
            .fetch_one(&mut c)
            .await?;
        check(n == 0, format!("client {i}: {n} rows after a rollback"))?;
        // Rows streamed as they come.
        let got: Vec<i32> = sqlx::query_scalar::<_, i32>("select generate_series(1, $1::int)")
            .bind(1000)
            .fetch(&mut c)
            .try_collect()
            .await?;
        check(
            got == (1..=1000).collect::<Vec<_>>(),
            format!("client {i}: {} streamed rows", got.len()),
        )?;
        // A multi-statement text without arguments goes as one simple Query.
        c.execute(
            format!(
                "insert into sqlx_t (id) values ({}); update sqlx_t set name = 'm' where id = {}",
                key + 70_000,
                key + 70_000
            )
            .as_str(),
        )
        .await?;
        let m: String = sqlx::query_scalar("select name from sqlx_t where id = $1")
            .bind(key + 70_000)
            .fetch_one(&mut c)
            .await?;
        check(m == "m", format!("client {i}: multi-statement gave {m}"))?;
    }
    c.close().await?;
    Ok(())
}

async fn copy_both_ways(opts: PgConnectOptions) -> Res {
    let mut c = opts.connect().await?;
    let mut copy = c.copy_in_raw("copy sqlx_copy from stdin").await?;
    let data: String = (0..10_000).map(|j| format!("{j}\tr{j}\n")).collect();
    copy.send(data.as_bytes()).await?;
    let rows = copy.finish().await?;
    check(rows == 10_000, format!("copy in: {rows} rows"))?;
    let out: Vec<_> = c
        .copy_out_raw("copy (select a from sqlx_copy order by a) to stdout")
        .await?
        .try_collect()
        .await?;
    let text: Vec<u8> = out.concat();
    check(
        text == (0..10_000)
            .map(|j| format!("{j}\n"))
            .collect::<String>()
            .into_bytes(),
        format!("copy out: {} bytes", text.len()),
    )?;
    // A bad row fails the COPY; the connection carries on.
    let mut copy = c.copy_in_raw("copy sqlx_copy from stdin").await?;
    copy.send(&b"1\tok\nnot a number\tx\n"[..]).await?;
    let e = copy.finish().await;
    check(
        e.as_ref().err().and_then(code).as_deref() == Some("22P02"),
        format!("bad copy gave {e:?}"),
    )?;
    let n: i64 = sqlx::query_scalar("select count(*) from sqlx_copy")
        .fetch_one(&mut c)
        .await?;
    check(n == 10_000, format!("{n} rows after a failed copy"))?;
    let big = vec![7u8; 4 << 20];
    let len: i32 = sqlx::query_scalar("select length($1::bytea)")
        .bind(&big)
        .fetch_one(&mut c)
        .await?;
    check(len == 4 << 20, format!("bytea length {len}"))?;
    let s: String = sqlx::query_scalar("select repeat('z', 8000000)")
        .fetch_one(&mut c)
        .await?;
    check(s.len() == 8_000_000, format!("long text {}", s.len()))?;
    c.close().await?;
    Ok(())
}

/// sqlx's own pool: more jobs than connections, each in a transaction.
async fn pooled(url: &str) -> Res {
    let pool = PgPoolOptions::new().max_connections(6).connect(url).await?;
    let jobs = (0..300).map(|i| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut tx = pool.begin().await?;
            let v: i32 = sqlx::query_scalar("select $1::int * 2")
                .bind(i)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(v)
        })
    });
    for (i, j) in jobs.collect::<Vec<_>>().into_iter().enumerate() {
        let v = j.await??;
        check(v == 2 * i as i32, format!("pool job {i}: {v}"))?;
    }
    pool.close().await;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res {
    let mut args = std::env::args().skip(1);
    let (url, n) = match (args.next(), args.next().and_then(|n| n.parse::<i32>().ok())) {
        (Some(u), Some(n)) => (u, n),
        _ => return Err("usage: weir-sqlx-client URL CLIENTS".into()),
    };
    let opts: PgConnectOptions = url.parse()?;
    let mut c = PgConnection::connect_with(&opts).await?;
    c.execute("create table sqlx_t (id int primary key, name text, j jsonb, u uuid, arr int[]); create table sqlx_copy (a int, b text)").await?;
    c.close().await?;
    let mut tasks: Vec<tokio::task::JoinHandle<Res>> = (0..n)
        .map(|i| tokio::spawn(client(opts.clone(), i)))
        .collect();
    tasks.push(tokio::spawn(copy_both_ways(opts.clone())));
    let u = url.clone();
    tasks.push(tokio::spawn(async move { pooled(&u).await }));
    for t in tasks {
        t.await??;
    }
    println!("sqlx 0.8: {n} clients ok");
    Ok(())
}
