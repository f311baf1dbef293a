//! `weir`: a PostgreSQL connection pooler.
//!
//! Subcommands:
//! - `weir run`: serve clients, from a config file or the quick-start flags.
//! - `weir check`: verify a config (and, with `--online`, the servers behind it) for CI.
//! - `weir reload`: ask a running Weir to reload its config (or roll back the last reload).
//! - `weir bench`: load scenarios with percentiles and SLO gates; `weir bench compare`.
//! - `weir advise`: a pool size from measured or given load.
//! - `weir demo`: a throwaway PostgreSQL with Weir in front and a load through it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use weir_config::{Config, PoolMode, QuickStart};

/// mimalloc rather than the system allocator: no per-allocation header and size-class pages
/// suit a process holding thousands of same-sized client tasks (Tokio aligns each to 128
/// bytes, which glibc serves by over-allocating and splitting), and its thread-local free
/// lists keep allocation off the shared arenas.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod advise;
mod bench;
mod check;
mod demo;
mod http;
mod reload;

#[derive(Parser)]
#[command(name = "weir", version, about = "A PostgreSQL connection pooler")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve PostgreSQL clients.
    Run(RunArgs),
    /// Verify a config: exit 0 when good, 1 on errors, 2 on warnings only.
    Check(check::CheckArgs),
    /// Make a running Weir load its config again and apply it live (like SIGHUP), or with
    /// --rollback restore the config before the last reload.
    Reload(reload::ReloadArgs),
    /// Load any PostgreSQL endpoint (Weir or not) and report percentiles, errors and SLO
    /// gates: exit 0 for GO, 1 for NO-GO. `weir bench compare A.json B.json` for a report.
    Bench(bench::BenchArgs),
    /// Recommend a pool size from the load (measured from Weir, a bench report, or given).
    Advise(advise::AdviseArgs),
    /// Start a throwaway PostgreSQL with Weir in front and run a realistic load through it.
    Demo(demo::DemoArgs),
}

/// Where a config comes from: file, profile, `--set` overrides (and the environment).
#[derive(Args, Clone, Debug, Default)]
pub struct SourceArgs {
    /// Config file (TOML). See weir.example.toml.
    #[arg(long, short, env = "WEIR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Profile: development, test, production, or one defined as [profiles.NAME] in the file.
    #[arg(long, env = "WEIR_PROFILE")]
    pub profile: Option<String>,
    /// Override one setting, above the file, profile and environment: --set pool.size=30.
    /// May be repeated.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl SourceArgs {
    pub fn source(&self) -> weir_config::Source {
        weir_config::Source {
            file: self.config.clone(),
            profile: self.profile.clone(),
            sets: self.sets.clone(),
        }
    }

    /// Whether anything but the environment says what to serve.
    fn given(&self) -> bool {
        self.config.is_some() || self.profile.is_some() || !self.sets.is_empty()
    }
}

/// The process environment, for the config's environment layer.
pub fn env_vars() -> Vec<(String, String)> {
    std::env::vars().collect()
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Quick start without a file: the one server to serve, as postgres://USER:PASS@HOST:PORT/DB.
    /// Clients log in with that user and password.
    #[arg(long, conflicts_with_all = ["config", "profile", "sets"])]
    server: Option<String>,
    /// Quick start: address to listen on.
    #[arg(long, default_value = "127.0.0.1:6432", requires = "server")]
    listen: SocketAddr,
    /// Quick start: server connections in the pool.
    #[arg(long, default_value_t = 20, requires = "server")]
    pool_size: u32,
    /// Quick start: session or transaction.
    #[arg(long, default_value = "transaction", value_parser = parse_mode, requires = "server")]
    pool_mode: PoolMode,
    /// Worker threads (default: the config's proxy.workers, 0 = one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Quick start: address of the HTTP admin listener (health, metrics, dashboard).
    #[arg(long, requires = "server")]
    admin_listen: Option<SocketAddr>,
    /// Bearer token for the admin routes (also WEIR_ADMIN_TOKEN).
    #[arg(long, env = "WEIR_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

fn parse_mode(s: &str) -> Result<PoolMode, String> {
    match s {
        "session" => Ok(PoolMode::Session),
        "transaction" => Ok(PoolMode::Transaction),
        other => Err(format!(
            "`{other}` is not a pool mode: use session or transaction"
        )),
    }
}

/// A pooler holds a socket per client: take the hard limit on open files, not the soft one
/// (often 1,024).
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Transparent huge pages off for this process. mimalloc would ask for them on the regions
/// it reserves (`madvise(MADV_HUGEPAGE)`; built with its `no_thp` feature it does not), and
/// where the system's THP setting is `always` the kernel gives them unasked. A 2 MiB page
/// stays resident whole while a few clients use part of it: with 10,000 idle clients Weir's
/// resident memory grew in 2 MiB steps, 1,887 bytes per client against 1,599 without huge
/// pages. A pooler's heap is small enough for ordinary pages, and it is spared the kernel's
/// compaction stalls (Redis turns THP off for itself for the same reasons). Pages faulted in
/// before this call stay as they are; a kernel without the call (before 3.15) ignores it.
fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

fn main() -> ExitCode {
    no_transparent_huge_pages();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Usage errors exit 64 (EX_USAGE), not clap's 2, which `weir check` uses for
            // "warnings only".
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    raise_open_files_limit();
    // The demo prints its own report; keep Weir's log to warnings there.
    init_logging(if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    });
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Check(args) => return check::main(args),
        Command::Reload(args) => return reload::main(args),
        Command::Bench(args) => return bench::main(args),
        Command::Advise(args) => return advise::main(args),
        Command::Demo(args) => multi_thread_runtime().and_then(|rt| rt.block_on(demo::demo(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn load_config(args: &RunArgs) -> anyhow::Result<Config> {
    match &args.server {
        None if args.source.given() => match args.source.source().load(&env_vars()) {
            Ok((config, warnings)) => {
                for w in warnings.warnings() {
                    tracing::warn!("{w}");
                }
                Ok(config)
            }
            Err(problems) => bail!("the config has problems:\n{problems}"),
        },
        Some(url) => QuickStart {
            listen: args.listen,
            server_url: url.clone(),
            pool_size: args.pool_size,
            pool_mode: args.pool_mode,
            admin_listen: args.admin_listen,
            admin_token: args.admin_token.clone(),
        }
        .build()
        .map_err(|p| anyhow::anyhow!("{p}")),
        None => bail!(
            "give --config FILE (or WEIR_CONFIG), or --server postgres://USER:PASS@HOST:PORT/DB for a quick start"
        ),
    }
}

/// For `weir demo` (its load generator beside Weir in one process) and `weir bench` (a load
/// generator): Tokio's multi-threaded scheduler shares the cores between their tasks.
fn multi_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("weir-demo")
        .build()
        .context("start the runtime")
}

/// How many worker threads `weir run` uses: `--workers`, else `proxy.workers`, where 0 means
/// one per core.
fn worker_count(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut config = load_config(&args)?;
    if let Some(t) = &args.admin_token {
        config.admin.token = Some(weir_config::Secret::new(t.clone()));
    }
    // What a reload loads again: the same file, profile and overrides (and the environment
    // as it is then). A quick start has nothing to reload.
    let source = args.server.is_none().then(|| {
        let mut source = args.source.source();
        if let Some(t) = &args.admin_token {
            source.sets.push(format!("admin.token={t}"));
        }
        source
    });
    let workers = worker_count(args.workers.unwrap_or(config.proxy.workers));
    // This thread is worker 0, with a single-threaded runtime like every other worker's
    // (see weir_proxy::workers); it also runs the Unix socket's accept loop, the admin API
    // and the maintenance tasks.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the runtime")?;
    rt.block_on(async move {
        let admin_addr = config.admin.listen;
        let workers = weir_proxy::workers::Workers::start(workers)
            .context("start the worker threads")?;
        tracing::info!(workers = workers.len(), "worker threads started");
        let proxy = weir_proxy::Proxy::start_on(config, workers.clone()).await?;
        if let Some(s) = source {
            proxy.shared().set_source(s);
        }
        for a in &proxy.addrs {
            // Printed on stdout so scripts and tests can learn a port-0 address.
            println!("listening on {a}");
        }
        let admin = match admin_addr {
            Some(addr) => {
                let a = weir_admin::start(proxy.shared().clone(), addr).await?;
                println!("admin on http://{}", a.addr);
                Some(a)
            }
            None => None,
        };
        let shared = proxy.shared().clone();
        let Signals {
            mut hangup,
            mut stop,
        } = Signals::new()?;
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    let s = shared.clone();
                    match tokio::task::spawn_blocking(move || s.reload()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::error!("SIGHUP reload rejected: {e}"),
                        Err(e) => tracing::error!("SIGHUP reload failed: {e}"),
                    }
                }
                _ = stop.recv() => break,
                _ = shared.shutdown.notified() => break,
            }
        }
        let timeout = shared.config.load().proxy.shutdown_timeout;
        tracing::info!(
            clients = shared.clients.total(),
            "shutting down: new connections are refused; sessions end at their next transaction boundary (shutdown_timeout {})",
            humantime::format_duration(timeout)
        );
        proxy.begin_drain().await;
        tokio::select! {
            _ = proxy.drained() => tracing::info!("every client has left"),
            _ = tokio::time::sleep(timeout) => tracing::warn!(
                clients = shared.clients.total(),
                "shutdown_timeout passed: closing the connections still open"
            ),
            _ = stop.recv() => tracing::warn!("second signal: stopping at once"),
        }
        // Idle server connections close with a Terminate; dropping the runtime ends the
        // sessions still running and closes their connections.
        proxy.stop();
        drop(admin);
        workers.stop();
        Ok(())
    })
}

/// The signals `weir run` acts on: SIGHUP reloads, SIGTERM and SIGINT stop (gracefully the
/// first time, at once the second).
struct Signals {
    hangup: tokio::signal::unix::Signal,
    stop: StopSignals,
}

struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            hangup: signal(SignalKind::hangup()).context("install the SIGHUP handler")?,
            stop: StopSignals {
                term: signal(SignalKind::terminate()).context("install the SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("install the SIGINT handler")?,
            },
        })
    }
}

impl StopSignals {
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
