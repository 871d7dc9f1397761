//! The `pgpilot` command line: run the proxy, check a config, run a demo, or
//! send admin commands to a running pgpilot (`nodes`, `attach`, `detach`,
//! `promote`, `rejoin`).

#![forbid(unsafe_code)]

use std::time::Duration;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use pgpilot::admin::cli::{Action, Target};
use pgpilot::config::{Config, NodeId};
use pgpilot::server::Proxy;

/// mimalloc rather than glibc's malloc: with many clients connecting and
/// leaving, glibc keeps what they freed in its arenas (the process stays at
/// its peak), where mimalloc returns it to the system; an idle client also
/// costs less, and select-only throughput measured the same
/// (docs/benchmarks.md, "Many clients").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A PostgreSQL-aware proxy and connection pooler for a primary with hot standbys.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (same as `run --config`).
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration file and exit.
    Check,
    /// Start a throwaway local primary + standbys with pgpilot in front, until Ctrl-C.
    Demo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9999")]
        listen: String,
        /// Address for `/metrics` and `/healthz` ("" = off), as `metrics.listen`.
        #[arg(long, default_value = "127.0.0.1:9930")]
        metrics_listen: String,
        /// Number of streaming standbys.
        #[arg(long, default_value_t = 2)]
        standbys: usize,
        /// Runtime worker threads (0 = one per core), as `worker_threads` in a config.
        #[arg(long, default_value_t = 0)]
        workers: usize,
    },
    /// Show the nodes of a running pgpilot (SHOW POOL_NODES).
    Nodes {
        #[command(flatten)]
        to: Connect,
    },
    /// Lift node N's hold (detached, fenced old primary, cannot follow): ATTACH NODE N.
    Attach {
        /// Node id.
        node: usize,
        #[command(flatten)]
        to: Connect,
    },
    /// Take standby N out of service until it is attached: DETACH NODE N.
    Detach {
        /// Node id.
        node: usize,
        #[command(flatten)]
        to: Connect,
    },
    /// Switch the primary over to standby N (PROMOTE NODE N) and follow it to the end.
    Promote {
        /// Node id.
        node: usize,
        /// Return once the switchover has started.
        #[arg(long)]
        no_wait: bool,
        /// Give up following the switchover after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[command(flatten)]
        to: Connect,
    },
    /// Rejoin fenced old primary N as a standby (REJOIN NODE N, by
    /// failover.rejoin) and follow it to the end.
    Rejoin {
        /// Node id.
        node: usize,
        /// Return once the rejoin has started.
        #[arg(long)]
        no_wait: bool,
        /// Give up following the rejoin after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[command(flatten)]
        to: Connect,
    },
}

/// How the admin subcommands reach the running pgpilot (defaults from --config).
#[derive(Args)]
struct Connect {
    /// pgpilot's host (default: from `listen`; a wildcard means 127.0.0.1).
    #[arg(long)]
    host: Option<String>,
    /// pgpilot's client port (default: from `listen`).
    #[arg(long)]
    port: Option<u16>,
    /// Admin user (default: the first of `admin_users` that is a configured user).
    #[arg(long)]
    user: Option<String>,
    /// Database (default: the user name).
    #[arg(long)]
    dbname: Option<String>,
}

impl Connect {
    fn target(self) -> Target {
        Target {
            host: self.host,
            port: self.port,
            user: self.user,
            dbname: self.dbname,
        }
    }
}

/// Load and validate the `--config` file, printing what is wrong (naming the
/// key) and giving the exit code on failure. `hint` completes the message for a
/// missing `--config`.
fn load_config(path: Option<PathBuf>, hint: &str) -> Result<(PathBuf, Config), ExitCode> {
    let Some(path) = path else {
        eprintln!("pgpilot: --config FILE is required{hint}");
        return Err(ExitCode::from(2));
    };
    match Config::load(&path) {
        Ok(c) => Ok((path, c)),
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            Err(ExitCode::FAILURE)
        }
    }
}

/// Run an admin subcommand against the pgpilot configured in `path`.
fn admin(path: Option<PathBuf>, to: Connect, action: Action) -> ExitCode {
    let (_, config) = match load_config(path, " (it says where pgpilot listens)") {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let result = runtime(1)
        .map_err(Failure::from)
        .and_then(|rt| Ok(rt.block_on(pgpilot::admin::cli::run(&config, &to.target(), action))?));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgpilot: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PGPILOT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Nodes { to } => admin(cli.config, to, Action::Nodes),
        Command::Attach { node, to } => admin(cli.config, to, Action::Attach(NodeId::new(node))),
        Command::Detach { node, to } => admin(cli.config, to, Action::Detach(NodeId::new(node))),
        Command::Promote {
            node,
            no_wait,
            timeout,
            to,
        } => admin(
            cli.config,
            to,
            Action::Promote(NodeId::new(node), follow(no_wait, timeout)),
        ),
        Command::Rejoin {
            node,
            no_wait,
            timeout,
            to,
        } => admin(
            cli.config,
            to,
            Action::Rejoin(NodeId::new(node), follow(no_wait, timeout)),
        ),
        Command::Demo {
            listen,
            metrics_listen,
            standbys,
            workers,
        } => {
            let demo = pgpilot::demo::run(&listen, &metrics_listen, standbys);
            match runtime(workers)
                .map_err(Failure::from)
                .and_then(|rt| Ok(rt.block_on(demo)?))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pgpilot demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check => match load_config(cli.config, "") {
            Ok((path, c)) => {
                let hba = match &c.hba {
                    Some(rules) => format!(", {} hba rules", rules.len()),
                    None => String::new(),
                };
                println!(
                    "{}: OK ({} backends, {} users{hba}, listen {})",
                    path.display(),
                    c.backends.len(),
                    c.users.len(),
                    c.listen
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run => {
            let (path, config) = match load_config(cli.config, " (or try `pgpilot demo`)") {
                Ok(loaded) => loaded,
                Err(code) => return code,
            };
            let rt = match runtime(config.worker_threads) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("pgpilot: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(async {
                match Proxy::bind(config).await {
                    Ok(p) => {
                        p.with_reload_from(path).run(stop_signal()).await;
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("pgpilot: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

/// The tokio runtime: `workers` threads, or one per core when 0. One worker is a
/// current-thread runtime: no work-stealing, no cross-thread wake-ups and no
/// scheduler statistics, which measurably lowers CPU per query.
fn runtime(workers: usize) -> Result<tokio::runtime::Runtime, RuntimeError> {
    let mut b = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if workers > 1 {
        b.worker_threads(workers);
    }
    b.enable_all().build().map_err(RuntimeError)
}

/// What a command that needs a runtime reports: its own error or the
/// runtime's, printed as it is.
type Failure = Box<dyn std::error::Error>;

/// The tokio runtime could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the runtime: {0}")]
struct RuntimeError(#[source] std::io::Error);

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            if let Err(e) = tokio::signal::ctrl_c().await {
                // As before, no signal handler means stop now, not never.
                tracing::error!(error = %e, "cannot listen for Ctrl-C either; stopping");
            }
        }
    }
}

/// How long `promote` / `rejoin` follow the command to its end: not at all
/// with `--no-wait`, else up to `timeout` seconds.
fn follow(no_wait: bool, timeout: u64) -> Option<Duration> {
    (!no_wait).then(|| Duration::from_secs(timeout))
}
