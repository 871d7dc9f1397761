//! `pgpilot nodes | attach N | detach N | promote N | rejoin N`: admin commands sent to a
//! running pgpilot over its client port, as an admin user, with the simple
//! query protocol (tokio-postgres `simple_query`), printed as a table.
//!
//! The address comes from the configuration's `listen` (a wildcard address
//! means 127.0.0.1), the user from `admin_users` (the first one that is a
//! configured user), its password from `[[users]]` (or `PGPASSWORD`);
//! `--host`, `--port`, `--user`, `--dbname` override them. Like any client,
//! the admin session logs in to the primary, so during a failover its login
//! waits for the new primary (`failover.client_wait_timeout`).

use std::time::{Duration, Instant};

use tokio_postgres::SimpleQueryMessage;

use crate::config::{Config, ConfigError, NodeId};

/// Why a command sent to a running pgpilot failed; the CLI prints the text
/// after `pgpilot: `.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The configuration's `listen` is unusable.
    #[error(transparent)]
    Listen(#[from] ConfigError),
    /// No admin user is configured and none was given.
    #[error("no admin user: list one of [[users]] in admin_users, or pass --user")]
    NoAdminUser,
    /// pgpilot could not be reached, or refused the login.
    #[error("cannot connect to pgpilot at {host}:{port} as {user}: {}", pg_message(.source))]
    Connect {
        /// Host connected to.
        host: String,
        /// Port.
        port: u16,
        /// Admin user.
        user: String,
        /// What tokio-postgres reported.
        #[source]
        source: tokio_postgres::Error,
    },
    /// pgpilot answered the command with an error (e.g. 55000 with the
    /// refusal of `ATTACH NODE`).
    #[error("{sql}: {}", pg_message(.source))]
    Command {
        /// The command sent.
        sql: String,
        /// The error, with pgpilot's SQLSTATE.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The switchover `pgpilot promote` followed did not end `done`.
    #[error("the switchover ended {phase}: {detail}")]
    SwitchoverEnded {
        /// Its final phase (`failed`).
        phase: String,
        /// Why, as `SHOW PGPILOT_FAILOVER` says.
        detail: String,
    },
    /// The rejoin `pgpilot rejoin` followed failed or was refused.
    #[error("{held_out}")]
    RejoinEnded {
        /// The node's `held_out`, which says why.
        held_out: String,
    },
    /// `--wait` ran out before the switchover ended.
    #[error("still in progress after {limit:?}")]
    StillInProgress {
        /// The wait.
        limit: Duration,
    },
}

/// Where and as whom to connect.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// Host; default from `listen`.
    pub host: Option<String>,
    /// Port; default from `listen`.
    pub port: Option<u16>,
    /// Admin user; default: the first `admin_users` entry that is a user.
    pub user: Option<String>,
    /// Database; default: the user name.
    pub dbname: Option<String>,
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `SHOW POOL_NODES`.
    Nodes,
    /// `ATTACH NODE n`.
    Attach(NodeId),
    /// `DETACH NODE n`.
    Detach(NodeId),
    /// `PROMOTE NODE n`, then follow `SHOW PGPILOT_FAILOVER` until it ends
    /// (unless `wait` is `None`).
    Promote(NodeId, Option<Duration>),
    /// `REJOIN NODE n`, then follow the node's `held_out` in `SHOW
    /// PGPILOT_NODES` until the rejoin ends (unless `wait` is `None`).
    Rejoin(NodeId, Option<Duration>),
}

/// A result set: columns and rows.
type Table = (Vec<String>, Vec<Vec<String>>);

/// Run `action` against the pgpilot configured in `cfg`; prints results and
/// returns what failed.
pub async fn run(cfg: &Config, target: &Target, action: Action) -> Result<(), CliError> {
    let client = connect(cfg, target).await?;
    match action {
        Action::Nodes => print_table(&query(&client, "SHOW POOL_NODES").await?),
        Action::Attach(n) => print_table(&query(&client, &format!("ATTACH NODE {n}")).await?),
        Action::Detach(n) => print_table(&query(&client, &format!("DETACH NODE {n}")).await?),
        Action::Rejoin(n, wait) => {
            print_table(&query(&client, &format!("REJOIN NODE {n}")).await?);
            let Some(limit) = wait else { return Ok(()) };
            follow_rejoin(&client, n, limit).await?;
        }
        Action::Promote(n, wait) => {
            let before = query(&client, "SHOW PGPILOT_FAILOVER").await?;
            let finished_before = column(&before, "finished");
            let answer = query(&client, &format!("PROMOTE NODE {n}")).await?;
            print_table(&answer);
            // Patroni mode: the answer is Patroni's outcome; nothing to follow.
            if column(&answer, "result").starts_with("Patroni switchover") {
                return Ok(());
            }
            let Some(limit) = wait else { return Ok(()) };
            let deadline = Instant::now() + limit;
            let mut shown = String::new();
            loop {
                let t = query(&client, "SHOW PGPILOT_FAILOVER").await?;
                let line = format!(
                    "{} {}: {}",
                    column(&t, "state"),
                    column(&t, "phase"),
                    column(&t, "detail")
                );
                if line != shown {
                    println!("{line}");
                    shown = line;
                }
                let idle = column(&t, "state") == "idle";
                if idle && column(&t, "finished") != finished_before {
                    print_table(&query(&client, "SHOW POOL_NODES").await?);
                    return match column(&t, "phase").as_str() {
                        "done" => Ok(()),
                        other => Err(CliError::SwitchoverEnded {
                            phase: other.to_string(),
                            detail: column(&t, "detail"),
                        }),
                    };
                }
                if Instant::now() >= deadline {
                    return Err(CliError::StillInProgress { limit });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Ok(())
}

/// Print node `n`'s `held_out` as it changes until the rejoin ends: done
/// once it is rejoined (or in service), an error once it failed or was
/// refused.
async fn follow_rejoin(
    client: &tokio_postgres::Client,
    n: NodeId,
    limit: Duration,
) -> Result<(), CliError> {
    let deadline = Instant::now() + limit;
    let mut shown = String::new();
    loop {
        let (cols, rows) = query(client, "SHOW PGPILOT_NODES").await?;
        let at = |name: &str| cols.iter().position(|c| c == name);
        let held = match (at("node_id"), at("held_out")) {
            (Some(id), Some(h)) => rows
                .iter()
                .find(|r| r[id] == n.to_string())
                .map(|r| r[h].clone())
                .unwrap_or_default(),
            _ => String::new(),
        };
        if held != shown {
            println!(
                "node {n}: {}",
                if held.is_empty() { "in service" } else { &held }
            );
            shown = held.clone();
        }
        if held.contains("rejoin failed") || held.contains("rejoin refused") {
            return Err(CliError::RejoinEnded { held_out: held });
        }
        if held.is_empty() || held.starts_with("rejoined") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CliError::StillInProgress { limit });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn connect(cfg: &Config, t: &Target) -> Result<tokio_postgres::Client, CliError> {
    let listen = cfg.listen_addr()?;
    let host = t.host.clone().unwrap_or_else(|| {
        if listen.ip().is_unspecified() {
            "127.0.0.1".into()
        } else {
            listen.ip().to_string()
        }
    });
    let port = t.port.unwrap_or(listen.port());
    let user = match &t.user {
        Some(u) => u.clone(),
        None => cfg
            .admin_users
            .iter()
            .find_map(|a| {
                if a == "*" {
                    cfg.users.first().map(|u| u.name.clone())
                } else {
                    cfg.user(a).map(|u| u.name.clone())
                }
            })
            .ok_or(CliError::NoAdminUser)?,
    };
    // Unset (or not UTF-8): the configured password, if any.
    let password = std::env::var("PGPASSWORD")
        .ok()
        .or_else(|| cfg.user(&user).and_then(|u| u.password.clone()));
    let mut pg = tokio_postgres::Config::new();
    pg.host(&host)
        .port(port)
        .user(&user)
        .dbname(t.dbname.as_deref().unwrap_or(&user))
        .application_name("pgpilot-cli")
        .connect_timeout(Duration::from_secs(10));
    if let Some(p) = &password {
        pg.password(p);
    }
    let failed = |source| CliError::Connect {
        host: host.clone(),
        port,
        user: user.clone(),
        source,
    };
    // A broken connection fails the next query, which reports it.
    let drive = |r: Result<(), tokio_postgres::Error>| {
        if let Err(e) = r {
            tracing::debug!(error = %e, "connection to pgpilot ended with an error");
        }
    };
    // With [tls] on, TLS when pgpilot offers it (under mode = "require" it
    // must); the certificate is not checked, as libpq's sslmode=require.
    let tls = cfg
        .tls_server
        .as_ref()
        .and_then(|_| crate::config::tls::unverified_client().ok());
    let client = match tls {
        Some(tls) => {
            pg.ssl_mode(tokio_postgres::config::SslMode::Prefer);
            let (client, conn) = pg
                .connect(crate::net::PgTls::new(tls))
                .await
                .map_err(failed)?;
            tokio::spawn(async move { drive(conn.await) });
            client
        }
        None => {
            let (client, conn) = pg.connect(tokio_postgres::NoTls).await.map_err(failed)?;
            tokio::spawn(async move { drive(conn.await) });
            client
        }
    };
    Ok(client)
}

fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

async fn query(client: &tokio_postgres::Client, sql: &str) -> Result<Table, CliError> {
    let msgs = client
        .simple_query(sql)
        .await
        .map_err(|source| CliError::Command {
            sql: sql.to_string(),
            source,
        })?;
    let mut cols = Vec::new();
    let mut rows = Vec::new();
    for m in &msgs {
        match m {
            SimpleQueryMessage::RowDescription(c) if cols.is_empty() => {
                cols = c.iter().map(|c| c.name().to_string()).collect();
            }
            SimpleQueryMessage::Row(r) => rows.push(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or_default().to_string())
                    .collect(),
            ),
            _ => {}
        }
    }
    Ok((cols, rows))
}

/// The first row's value in column `name` (empty if none).
fn column(t: &Table, name: &str) -> String {
    t.0.iter()
        .position(|c| c == name)
        .and_then(|i| t.1.first().and_then(|r| r.get(i)).cloned())
        .unwrap_or_default()
}

/// psql-like aligned output.
fn print_table((cols, rows): &Table) {
    let mut width: Vec<usize> = cols.iter().map(|c| c.chars().count()).collect();
    for r in rows {
        for (w, v) in width.iter_mut().zip(r) {
            *w = (*w).max(v.chars().count());
        }
    }
    let line = |vals: &[String]| {
        vals.iter()
            .zip(&width)
            .map(|(v, w)| format!(" {v:<w$} "))
            .collect::<Vec<_>>()
            .join("|")
            .trim_end()
            .to_string()
    };
    println!("{}", line(cols));
    println!(
        "{}",
        width
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("+")
    );
    for r in rows {
        println!("{}", line(r));
    }
    println!(
        "({} row{})",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
}
