//! pgpool's hooks: `failover.command` (pgpool's `failover_command`) and
//! `failover.follow_primary_command`, run through `sh -c` with pgpool's
//! placeholders expanded, so existing scripts (`failover.sh %d %P %H %R` …)
//! work unchanged.
//!
//! | placeholder | value |
//! | --- | --- |
//! | `%d` / `%h` / `%p` / `%D` | id, host, port, data directory of the failed node (follow: of the standby to re-point) |
//! | `%m` / `%H` / `%r` / `%R` | id, host, port, data directory of the new primary ("new main node") |
//! | `%M` | old main node id (pgpilot's main node is the primary) |
//! | `%P` / `%N` / `%S` | id, host, port of the old primary |
//! | `%%` | a literal `%` |
//!
//! An unknown node is `-1` for ids and empty for the rest, as in pgpool.
//! Values are inserted as they are (pgpool does the same): they come from
//! pgpilot's own configuration. A hook runs with a time limit; on timeout
//! its whole process group is killed. Its output is logged line by line, its
//! exit status decides success.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::config::{Config, NodeId};

/// Why a hook did not succeed; each text starts with the hook's name.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HookError {
    /// `sh` could not be started.
    #[error("{name}: cannot run sh: {source}")]
    Spawn {
        /// The hook.
        name: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for it or reading its output failed.
    #[error("{name}: {source}")]
    Wait {
        /// The hook.
        name: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It ran past its limit; its process group was killed.
    #[error("{name} did not finish within {limit:?}; killed")]
    Timeout {
        /// The hook.
        name: &'static str,
        /// The limit.
        limit: Duration,
    },
    /// It exited with another status than 0.
    #[error("{name} failed ({status}): {last_stderr}")]
    Failed {
        /// The hook.
        name: &'static str,
        /// Its exit status.
        status: ExitStatus,
        /// The last line it wrote to stderr (empty if none).
        last_stderr: String,
    },
}

/// The nodes a hook is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HookNodes {
    /// `%d %h %p %D`: the failed node, or the standby a follow hook re-points.
    pub(crate) failed: Option<NodeId>,
    /// `%m %H %r %R`: the new primary (the candidate, for failover_command).
    pub(crate) new_primary: Option<NodeId>,
    /// `%M %P %N %S`: the old primary.
    pub(crate) old_primary: Option<NodeId>,
}

/// `template` with pgpool's placeholders replaced for `nodes`.
pub(crate) fn expand(template: &str, cfg: &Config, nodes: HookNodes) -> String {
    let id = |n: Option<NodeId>| n.map_or("-1".to_string(), |n| n.to_string());
    let field = |n: Option<NodeId>, f: fn(&crate::config::Backend) -> String| {
        n.and_then(|n| cfg.backends.get(n.index()))
            .map(f)
            .unwrap_or_default()
    };
    let host = |b: &crate::config::Backend| b.host.clone();
    let port = |b: &crate::config::Backend| b.port.to_string();
    let dir = |b: &crate::config::Backend| b.data_directory.clone();
    let mut out = String::with_capacity(template.len() + 64);
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&id(nodes.failed)),
            Some('h') => out.push_str(&field(nodes.failed, host)),
            Some('p') => out.push_str(&field(nodes.failed, port)),
            Some('D') => out.push_str(&field(nodes.failed, dir)),
            Some('m') => out.push_str(&id(nodes.new_primary)),
            Some('H') => out.push_str(&field(nodes.new_primary, host)),
            Some('r') => out.push_str(&field(nodes.new_primary, port)),
            Some('R') => out.push_str(&field(nodes.new_primary, dir)),
            Some('M') | Some('P') => out.push_str(&id(nodes.old_primary)),
            Some('N') => out.push_str(&field(nodes.old_primary, host)),
            Some('S') => out.push_str(&field(nodes.old_primary, port)),
            Some('%') => out.push('%'),
            // Rejected at load; kept verbatim if it ever gets here.
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Run `command` through `sh -c` within `limit`; `name` labels the logs.
/// `Ok` with a summary on exit status 0, `Err` with the reason otherwise.
pub(crate) async fn run(
    name: &'static str,
    command: &str,
    limit: Duration,
) -> Result<String, HookError> {
    tracing::info!(hook = name, %command, "running hook");
    let started = std::time::Instant::now();
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let child = cmd
        .spawn()
        .map_err(|source| HookError::Spawn { name, source })?;
    let pid = child.id();
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(source)) => return Err(HookError::Wait { name, source }),
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                // The process group we created for the hook.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            tracing::error!(hook = name, ?limit, "hook timed out; killed");
            return Err(HookError::Timeout { name, limit });
        }
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        tracing::info!(hook = name, "stdout: {line}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines() {
        tracing::warn!(hook = name, "stderr: {line}");
    }
    let took = started.elapsed();
    if out.status.success() {
        tracing::info!(hook = name, ?took, "hook exited with status 0");
        Ok(format!("{name} exited with status 0 after {took:?}"))
    } else {
        tracing::error!(hook = name, status = %out.status, ?took, "hook failed");
        let last = stderr.lines().last().unwrap_or_default();
        Err(HookError::Failed {
            name,
            status: out.status,
            last_stderr: last.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::from_toml(
            r#"
            [[backends]]
            host = "db0"
            port = 5432
            data_directory = "/pg/0"
            [[backends]]
            host = "db1"
            port = 5433
            data_directory = "/pg/1"
            [[backends]]
            host = "db2"
            port = 5434
            data_directory = "/pg/2"
            "#,
        )
        .unwrap()
    }

    #[test]
    fn expands_every_pgpool_placeholder() {
        let nodes = HookNodes {
            failed: Some(NodeId::new(0)),
            new_primary: Some(NodeId::new(2)),
            old_primary: Some(NodeId::new(0)),
        };
        let got = expand(
            "f %d %h %p %D %m %H %M %P %r %R %N %S %% %%d",
            &cfg(),
            nodes,
        );
        assert_eq!(got, "f 0 db0 5432 /pg/0 2 db2 0 0 5434 /pg/2 db0 5432 % %d");
        let none = HookNodes {
            failed: Some(NodeId::new(1)),
            new_primary: None,
            old_primary: Some(NodeId::new(0)),
        };
        assert_eq!(expand("%m|%H|%R|%d", &cfg(), none), "-1|||1");
        // The seed article's failover_command.
        assert_eq!(
            expand("/etc/pgpool2/failover.sh %d %P %H %R", &cfg(), nodes),
            "/etc/pgpool2/failover.sh 0 0 db2 /pg/2"
        );
    }

    #[tokio::test]
    async fn runs_through_sh_with_status_and_timeout() {
        let ok = run(
            "t",
            "echo hi; echo warn >&2; exit 0",
            Duration::from_secs(5),
        )
        .await;
        assert!(ok.is_ok(), "{ok:?}");
        let e = run("t", "echo oops >&2; exit 3", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, HookError::Failed { status, last_stderr, .. } if status.code() == Some(3) && last_stderr == "oops"),
            "{e}"
        );
        assert_eq!(e.to_string(), "t failed (exit status: 3): oops");
        let t0 = std::time::Instant::now();
        let e = run("t", "sleep 30", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, HookError::Timeout { name: "t", .. }), "{e}");
        assert!(e.to_string().contains("did not finish"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
