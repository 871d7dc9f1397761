//! Running PostgreSQL's own tools (`pg_ctl`, `pg_rewind`, `pg_controldata`)
//! on a node's data directory, for rejoining it (`rejoin.rs`).
//!
//! They run as the data directory's owner: pgpilot normally runs as that
//! user, and then runs them directly. Only when pgpilot itself is root (the
//! server refuses to run as root) is the owner switched to, with `runuser
//! -u <owner> --` (or `su <owner> -s /bin/sh -c`), as the local-cluster
//! harness does. Any other user that is not the owner gets a clear error
//! up front instead of a half-done rejoin.
//!
//! The binaries come from `failover.pg_bindir`; empty finds them: the
//! `/usr/lib/postgresql/<PG_VERSION>/bin` matching the data directory's
//! major version, else `pg_config --bindir`, else `PATH`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::unistd::{Uid, User, geteuid};

/// Why a tool could not be run, or failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PgBinError {
    /// The data directory is not readable here.
    #[error("data directory {dir}: {source} (pgpilot must run on the node's host)")]
    DataDir {
        /// The directory.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// pgpilot is neither the owner nor root.
    #[error(
        "data directory {dir} belongs to uid {owner}, pgpilot runs as uid {me}: run pgpilot as the directory's owner"
    )]
    NotOwner {
        /// The directory.
        dir: String,
        /// Its owner.
        owner: u32,
        /// pgpilot's effective uid.
        me: u32,
    },
    /// No directory holds the tool.
    #[error("{tool} not found (looked in {looked}); set failover.pg_bindir")]
    NotFound {
        /// The tool.
        tool: &'static str,
        /// Where.
        looked: String,
    },
    /// Starting or waiting failed.
    #[error("{line}: {source}")]
    Io {
        /// The command line.
        line: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It ran past its limit (killed).
    #[error("{line}: did not finish within {limit:?}")]
    Timeout {
        /// The command line.
        line: String,
        /// The limit.
        limit: Duration,
    },
    /// It exited with another status than 0.
    #[error("{line}: {status}: {output}")]
    Failed {
        /// The command line.
        line: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The last lines it wrote.
        output: String,
    },
}

/// A node's data directory and the tools to work on it.
#[derive(Debug, Clone)]
pub(crate) struct DataDir {
    /// The directory.
    pub(crate) path: PathBuf,
    /// Where pg_ctl, pg_rewind and pg_controldata are.
    pub(crate) bindir: PathBuf,
    /// Its owner (name), when pgpilot is root and must switch to it.
    run_as: Option<String>,
    /// Its owner's `(uid, gid)`, to give it the files pgpilot writes.
    pub(crate) owner: (u32, u32),
}

impl DataDir {
    /// `dir` checked for use: readable here, owned by pgpilot's user (or
    /// pgpilot is root), with the tools found (`bindir`: configured, or
    /// empty to find them).
    pub(crate) fn open(dir: &str, bindir: &str) -> Result<DataDir, PgBinError> {
        let path = PathBuf::from(dir);
        let meta = std::fs::metadata(&path).map_err(|source| PgBinError::DataDir {
            dir: dir.to_string(),
            source,
        })?;
        let me = geteuid();
        let run_as = if me.is_root() && meta.uid() != 0 {
            let user = User::from_uid(Uid::from_raw(meta.uid()))
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| meta.uid().to_string());
            Some(user)
        } else if me.as_raw() != meta.uid() {
            return Err(PgBinError::NotOwner {
                dir: dir.to_string(),
                owner: meta.uid(),
                me: me.as_raw(),
            });
        } else {
            None
        };
        let version = std::fs::read_to_string(path.join("PG_VERSION")).map_err(|source| {
            PgBinError::DataDir {
                dir: dir.to_string(),
                source,
            }
        })?;
        let bindir = find_bindir(bindir, version.trim())?;
        Ok(DataDir {
            path,
            bindir,
            run_as,
            owner: (meta.uid(), meta.gid()),
        })
    }

    /// The data directory as a string argument.
    pub(crate) fn arg(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// Run `tool args…` as the directory's owner within `limit`, with
    /// `envs` set; its output (stdout and stderr) on success.
    pub(crate) async fn run(
        &self,
        tool: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        limit: Duration,
    ) -> Result<String, PgBinError> {
        let exe = self.bindir.join(tool).to_string_lossy().into_owned();
        let line = std::iter::once(exe.as_str())
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        let mut cmd = match &self.run_as {
            None => {
                let mut c = tokio::process::Command::new(&exe);
                c.args(args);
                c
            }
            Some(user) if Path::new("/usr/sbin/runuser").is_file() => {
                let mut c = tokio::process::Command::new("/usr/sbin/runuser");
                c.args(["-u", user, "--", &exe]).args(args);
                c
            }
            Some(user) => {
                let quoted: Vec<String> = std::iter::once(exe.as_str())
                    .chain(args.iter().copied())
                    .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
                    .collect();
                let mut c = tokio::process::Command::new("su");
                c.args([user.as_str(), "-s", "/bin/sh", "-c", &quoted.join(" ")]);
                c
            }
        };
        // The server tools must work on this directory only: PG* variables
        // of pgpilot's environment (PGDATA, PGHOST …) would redirect them.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(envs.iter().copied())
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        tracing::info!(%line, "running");
        let child = cmd.spawn().map_err(|source| PgBinError::Io {
            line: line.clone(),
            source,
        })?;
        let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
            Ok(r) => r.map_err(|source| PgBinError::Io {
                line: line.clone(),
                source,
            })?,
            Err(_) => return Err(PgBinError::Timeout { line, limit }),
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for l in text.lines() {
            tracing::info!(tool, "{l}");
        }
        if out.status.success() {
            Ok(text)
        } else {
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            let output = tail.into_iter().rev().collect::<Vec<_>>().join(" / ");
            Err(PgBinError::Failed {
                line,
                status: out.status,
                output,
            })
        }
    }

    /// Write `text` to `name` in the directory, owned by its owner.
    pub(crate) fn write(&self, name: &str, text: &str) -> std::io::Result<()> {
        let p = self.path.join(name);
        std::fs::write(&p, text)?;
        if geteuid().is_root() {
            std::os::unix::fs::chown(&p, Some(self.owner.0), Some(self.owner.1))?;
        }
        Ok(())
    }

    /// The `port` set in the directory's postgresql.conf or
    /// postgresql.auto.conf (the last one wins; include files are not
    /// followed), if any.
    pub(crate) fn configured_port(&self) -> Option<u16> {
        let mut port = None;
        for name in ["postgresql.conf", "postgresql.auto.conf"] {
            let text = std::fs::read_to_string(self.path.join(name)).unwrap_or_default();
            for line in text.lines() {
                let line = line.split('#').next().unwrap_or_default();
                if let Some((k, v)) = line.split_once('=')
                    && k.trim() == "port"
                {
                    port = v.trim().trim_matches('\'').parse().ok().or(port);
                }
            }
        }
        port
    }

    /// Whether a server runs on the directory (`pg_ctl status`: 0 running,
    /// 3 not running).
    pub(crate) async fn running(&self) -> Result<bool, PgBinError> {
        match self
            .run("pg_ctl", &["status", "-D", &self.arg()], &[], STATUS_LIMIT)
            .await
        {
            Ok(_) => Ok(true),
            Err(PgBinError::Failed { status, .. }) if status.code() == Some(3) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `pg_controldata` as `field: value` pairs.
    pub(crate) async fn controldata(&self) -> Result<Vec<(String, String)>, PgBinError> {
        let out = self
            .run("pg_controldata", &["-D", &self.arg()], &[], STATUS_LIMIT)
            .await?;
        Ok(parse_controldata(&out))
    }
}

/// Limit for the quick tools (status, controldata).
const STATUS_LIMIT: Duration = Duration::from_secs(30);

/// `pg_controldata`'s output as `field: value` pairs.
pub(crate) fn parse_controldata(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// The directory holding pg_ctl, pg_rewind and pg_controldata for major
/// version `version` (see the module docs).
fn find_bindir(configured: &str, version: &str) -> Result<PathBuf, PgBinError> {
    let has = |d: &Path| {
        ["pg_ctl", "pg_rewind", "pg_controldata"]
            .iter()
            .all(|t| d.join(t).is_file())
    };
    let mut looked = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if !configured.is_empty() {
        candidates.push(PathBuf::from(configured));
    } else {
        candidates.push(PathBuf::from(format!("/usr/lib/postgresql/{version}/bin")));
        if let Ok(out) = std::process::Command::new("pg_config")
            .arg("--bindir")
            .stderr(Stdio::null())
            .output()
            && out.status.success()
        {
            candidates.push(PathBuf::from(
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            ));
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        candidates.extend(std::env::split_paths(&path));
    }
    for c in candidates {
        if has(&c) {
            return Ok(c);
        }
        looked.push(c.display().to_string());
    }
    Err(PgBinError::NotFound {
        tool: "pg_ctl, pg_rewind or pg_controldata",
        looked: looked.join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_port_is_the_last_one_set() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir {
            path: tmp.path().to_path_buf(),
            bindir: PathBuf::new(),
            run_as: None,
            owner: (0, 0),
        };
        assert_eq!(dir.configured_port(), None);
        std::fs::write(
            tmp.path().join("postgresql.conf"),
            "#port = 1\nport = 5433 # mine\n",
        )
        .unwrap();
        assert_eq!(dir.configured_port(), Some(5433));
        std::fs::write(tmp.path().join("postgresql.auto.conf"), "port = '6000'\n").unwrap();
        assert_eq!(dir.configured_port(), Some(6000));
    }

    #[test]
    fn controldata_fields_are_split_at_the_first_colon() {
        let out = "Database cluster state:               in production\n\
                   Latest checkpoint location:           0/3000060\n\
                   wal_log_hints setting:                on\n";
        let f = parse_controldata(out);
        assert_eq!(
            f,
            [
                ("Database cluster state".into(), "in production".into()),
                ("Latest checkpoint location".into(), "0/3000060".into()),
                ("wal_log_hints setting".into(), "on".into()),
            ]
        );
    }
}
