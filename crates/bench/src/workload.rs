//! What one request does, and the tables it needs.

use std::time::Duration;

use rand::RngExt;

/// What one request does.
#[derive(Debug, Clone)]
pub enum Workload {
    /// The seeds' web request: a primary-key lookup, `server_time` of server work, and half
    /// the time an update: 2 or 3 statements, each its own transaction (autocommit).
    WebRequest {
        server_time: Duration,
        accounts: i32,
    },
    /// One primary-key lookup (pgbench -S).
    SelectOnly { accounts: i32 },
    /// 2 or 3 queries (at random), each holding the server for `server_time` (`pg_sleep`).
    SleepQueries { server_time: Duration },
    /// pgbench's TPC-B-like transaction: three updates, a select and an insert in one
    /// transaction, over `weir_bench_*` tables at scale 1 (100,000 accounts).
    Tpcb,
    /// A custom script (see [`Script`]).
    Custom(Script),
}

/// A custom script: statements run in order, one round trip each, with `:name` replaced by
/// a variable drawn per request. Lines:
/// - `\set name random(LOW, HIGH)`: a uniform random integer, inclusive;
/// - `-- ...` and blank lines: ignored;
/// - anything else: SQL; a statement ends at a line ending with `;`.
#[derive(Debug, Clone, PartialEq)]
pub struct Script {
    pub vars: Vec<(String, i64, i64)>,
    pub statements: Vec<String>,
}

impl Script {
    pub fn parse(text: &str) -> Result<Script, String> {
        let mut vars = Vec::new();
        let mut statements = Vec::new();
        let mut current = String::new();
        for (n, line) in text.lines().enumerate() {
            let n = n + 1;
            let t = line.trim();
            if t.is_empty() || t.starts_with("--") {
                continue;
            }
            if let Some(rest) = t.strip_prefix("\\set ") {
                let (name, expr) = rest
                    .trim()
                    .split_once(char::is_whitespace)
                    .ok_or_else(|| format!("line {n}: write \\set NAME random(LOW, HIGH)"))?;
                let args = expr
                    .trim()
                    .strip_prefix("random(")
                    .and_then(|a| a.strip_suffix(')'))
                    .ok_or_else(|| format!("line {n}: only random(LOW, HIGH) is supported"))?;
                let (lo, hi) = args
                    .split_once(',')
                    .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
                    .ok_or_else(|| format!("line {n}: random() takes two integers"))?;
                if lo > hi {
                    return Err(format!("line {n}: random({lo}, {hi}) is empty"));
                }
                vars.push((name.to_string(), lo, hi));
                continue;
            }
            if t.starts_with('\\') {
                return Err(format!(
                    "line {n}: unknown meta-command `{t}` (only \\set is supported)"
                ));
            }
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(t);
            if t.ends_with(';') {
                statements.push(std::mem::take(&mut current));
            }
        }
        if !current.is_empty() {
            statements.push(current);
        }
        if statements.is_empty() {
            return Err("the script has no SQL statement".into());
        }
        for s in &statements {
            for word in s.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')) {
                if let Some(name) = word.strip_prefix(':')
                    && !name.is_empty()
                    && !name.starts_with(':')
                    && !vars.iter().any(|(v, _, _)| v == name)
                {
                    return Err(format!("`:{name}` is used but never \\set"));
                }
            }
        }
        Ok(Script { vars, statements })
    }

    fn render(&self, rng: &mut impl rand::Rng) -> Vec<String> {
        let values: Vec<(String, String)> = self
            .vars
            .iter()
            .map(|(name, lo, hi)| (format!(":{name}"), rng.random_range(*lo..=*hi).to_string()))
            .collect();
        self.statements
            .iter()
            .map(|s| {
                let mut s = s.clone();
                // Longest names first, so :id does not eat into :id2.
                let mut by_len: Vec<&(String, String)> = values.iter().collect();
                by_len.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
                for (k, v) in by_len {
                    s = s.replace(k.as_str(), v);
                }
                s
            })
            .collect()
    }
}

pub(crate) struct Statements {
    lookup: Option<tokio_postgres::Statement>,
    work: Option<tokio_postgres::Statement>,
    update: Option<tokio_postgres::Statement>,
}

const TPCB_ACCOUNTS: i32 = 100_000;

impl Workload {
    /// Parses a workload name from the command line or a scenario file.
    pub fn named(
        name: &str,
        server_time: Duration,
        script: Option<Script>,
    ) -> Result<Workload, String> {
        Ok(match name {
            "select-only" => Workload::SelectOnly { accounts: 10_000 },
            "web" => Workload::WebRequest {
                server_time,
                accounts: 10_000,
            },
            "sleep" => Workload::SleepQueries { server_time },
            "tpcb" => Workload::Tpcb,
            "custom" => Workload::Custom(script.ok_or("the custom workload needs --script FILE")?),
            other => {
                return Err(format!(
                    "unknown workload `{other}`: use select-only, web, sleep, tpcb or custom (with --script)"
                ));
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Workload::WebRequest { .. } => "web",
            Workload::SelectOnly { .. } => "select-only",
            Workload::SleepQueries { .. } => "sleep",
            Workload::Tpcb => "tpcb",
            Workload::Custom(_) => "custom",
        }
    }

    /// Creates the table the select-only and web workloads read (`demo_accounts`).
    pub async fn prepare_schema(
        client: &tokio_postgres::Client,
        accounts: i32,
    ) -> Result<(), tokio_postgres::Error> {
        client
            .batch_execute(&format!(
                "drop table if exists demo_accounts;
                 create table demo_accounts (id int primary key, balance bigint not null default 0);
                 insert into demo_accounts select g, 0 from generate_series(1, {accounts}) g;
                 analyze demo_accounts;"
            ))
            .await
    }

    /// Creates what the workload needs unless it is there already.
    pub async fn ensure_schema(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<(), tokio_postgres::Error> {
        let exists = |t: &'static str| async move {
            client
                .query_one("select to_regclass($1) is not null", &[&t])
                .await
                .map(|r| r.get::<_, bool>(0))
        };
        match self {
            Workload::SelectOnly { accounts } | Workload::WebRequest { accounts, .. } => {
                if !exists("demo_accounts").await? {
                    Self::prepare_schema(client, *accounts).await?;
                }
            }
            Workload::Tpcb => {
                if !exists("weir_bench_accounts").await? {
                    client
                        .batch_execute(&format!(
                            "create table weir_bench_branches (bid int primary key, bbalance int not null default 0);
                             create table weir_bench_tellers (tid int primary key, bid int not null, tbalance int not null default 0);
                             create table weir_bench_accounts (aid int primary key, bid int not null, abalance int not null default 0);
                             create table weir_bench_history (tid int, bid int, aid int, delta int, mtime timestamp default now());
                             insert into weir_bench_branches values (1, 0);
                             insert into weir_bench_tellers select g, 1, 0 from generate_series(1, 10) g;
                             insert into weir_bench_accounts select g, 1, 0 from generate_series(1, {TPCB_ACCOUNTS}) g;
                             analyze weir_bench_branches, weir_bench_tellers, weir_bench_accounts;"
                        ))
                        .await?;
                }
            }
            Workload::SleepQueries { .. } | Workload::Custom(_) => {}
        }
        Ok(())
    }

    /// Prepares the workload's statements on a client connection, as an application's
    /// driver would once per connection.
    pub(crate) async fn prepare(
        &self,
        c: &tokio_postgres::Client,
    ) -> Result<Statements, tokio_postgres::Error> {
        let mut st = Statements {
            lookup: None,
            work: None,
            update: None,
        };
        match self {
            Workload::SelectOnly { .. } => {
                st.lookup = Some(
                    c.prepare("select balance from demo_accounts where id = $1")
                        .await?,
                );
            }
            Workload::WebRequest { .. } => {
                st.lookup = Some(
                    c.prepare("select balance from demo_accounts where id = $1")
                        .await?,
                );
                st.work = Some(c.prepare("select pg_sleep($1)").await?);
                st.update = Some(
                    c.prepare("update demo_accounts set balance = balance + 1 where id = $1")
                        .await?,
                );
            }
            Workload::SleepQueries { .. } => {
                st.work = Some(c.prepare("select pg_sleep($1)").await?);
            }
            Workload::Tpcb | Workload::Custom(_) => {}
        }
        Ok(st)
    }

    pub(crate) async fn request(
        &self,
        c: &tokio_postgres::Client,
        st: &Statements,
        rng: &mut impl rand::Rng,
    ) -> Result<(), tokio_postgres::Error> {
        match self {
            Workload::SelectOnly { accounts } => {
                let id = rng.random_range(1..=*accounts);
                c.query_one(st.lookup.as_ref().expect("prepared"), &[&id])
                    .await?;
            }
            Workload::SleepQueries { server_time } => {
                for _ in 0..rng.random_range(2..=3) {
                    c.execute(
                        st.work.as_ref().expect("prepared"),
                        &[&server_time.as_secs_f64()],
                    )
                    .await?;
                }
            }
            Workload::WebRequest {
                server_time,
                accounts,
            } => {
                let id = rng.random_range(1..=*accounts);
                c.query_one(st.lookup.as_ref().expect("prepared"), &[&id])
                    .await?;
                c.execute(
                    st.work.as_ref().expect("prepared"),
                    &[&server_time.as_secs_f64()],
                )
                .await?;
                if rng.random_bool(0.5) {
                    c.execute(st.update.as_ref().expect("prepared"), &[&id])
                        .await?;
                }
            }
            Workload::Tpcb => {
                let aid = rng.random_range(1..=TPCB_ACCOUNTS);
                let tid = rng.random_range(1..=10);
                let delta = rng.random_range(-5000..=5000);
                let r = c
                    .batch_execute(&format!(
                        "begin;
                         update weir_bench_accounts set abalance = abalance + {delta} where aid = {aid};
                         select abalance from weir_bench_accounts where aid = {aid};
                         update weir_bench_tellers set tbalance = tbalance + {delta} where tid = {tid};
                         update weir_bench_branches set bbalance = bbalance + {delta} where bid = 1;
                         insert into weir_bench_history (tid, bid, aid, delta) values ({tid}, 1, {aid}, {delta});
                         end;"
                    ))
                    .await;
                if r.is_err() {
                    // Leave no aborted transaction behind for the next request.
                    let _ = c.batch_execute("rollback").await;
                }
                r?;
            }
            Workload::Custom(script) => {
                for s in script.render(rng) {
                    c.simple_query(&s).await?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_parse_and_render() {
        let s = Script::parse(
            "-- a comment\n\\set id random(1, 10)\n\\set id2 random(5, 5)\n\
             select * from t\n  where id = :id;\nupdate t set x = :id2 where id = :id;\n",
        )
        .unwrap();
        assert_eq!(s.vars.len(), 2);
        assert_eq!(s.statements.len(), 2);
        let mut rng = rand::rng();
        let r = s.render(&mut rng);
        assert!(r[1].starts_with("update t set x = 5 where id = "), "{r:?}");
        assert!(!r[0].contains(':'), "{r:?}");
    }

    #[test]
    fn bad_scripts_say_what_is_wrong() {
        for (text, want) in [
            ("\\set id rand(1,2)\nselect 1;", "only random(LOW, HIGH)"),
            ("\\set id random(3, 1)\nselect 1;", "is empty"),
            ("\\sleep 1\nselect 1;", "unknown meta-command"),
            ("select :nope;", "`:nope` is used but never \\set"),
            ("-- nothing\n", "no SQL statement"),
        ] {
            let e = Script::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
