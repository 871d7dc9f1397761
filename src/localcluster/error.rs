//! What can go wrong building or driving a local cluster, and the detail
//! (command, exit status, output, server log) an operator needs to see why.

use std::io;
use std::path::PathBuf;

/// Errors from building or driving a [`LocalCluster`](super::LocalCluster).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No usable PostgreSQL server binaries; the text says what is missing where.
    #[error(
        "PostgreSQL server binaries not found: {0}. Install the PostgreSQL server \
         (Debian/Ubuntu: apt-get install -y postgresql; Fedora/RHEL: dnf install \
         postgresql-server; macOS: brew install postgresql) or set PGPILOT_PG_BINDIR \
         to the directory holding initdb and postgres"
    )]
    BinariesNotFound(String),
    /// Running as root without a `postgres` OS user to run the servers as.
    #[error(
        "running as root, but there is no `postgres` OS user to run the PostgreSQL servers \
         as (they refuse to run as root): create one (useradd --system --create-home \
         postgres) or run as an ordinary user"
    )]
    NoServerUser,
    /// An external command failed.
    #[error(transparent)]
    Command(Box<CommandFailed>),
    /// Filesystem or process I/O failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// Something did not happen in time; the message says what (and shows logs).
    #[error("timed out: {0}")]
    Timeout(String),
}

/// An external command that failed, and what it said.
#[derive(Debug, thiserror::Error)]
#[error("command `{cmd}` failed ({outcome}):\n{stderr}{stdout}{}", LogTail::suffix(.server_log))]
pub struct CommandFailed {
    /// The command line that was run.
    pub cmd: String,
    /// Why it failed: it could not start, or it exited unsuccessfully.
    pub outcome: CommandOutcome,
    /// Its standard error.
    pub stderr: String,
    /// Its standard output.
    pub stdout: String,
    /// The tail of the node's server log, when the command was about a node.
    pub server_log: Option<LogTail>,
}

/// How a failed external command ended.
#[derive(Debug)]
pub enum CommandOutcome {
    /// It could not be started.
    NotStarted(io::Error),
    /// It ran and exited unsuccessfully (or was killed by a signal).
    Exited(std::process::ExitStatus),
}

impl std::fmt::Display for CommandOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandOutcome::NotStarted(_) => f.write_str("could not be started"),
            CommandOutcome::Exited(status) => status.fmt(f),
        }
    }
}

/// The last lines of a node's server log, attached to an error about it.
#[derive(Debug)]
pub struct LogTail {
    /// The log file.
    pub path: PathBuf,
    /// Its last lines.
    pub lines: String,
}

impl LogTail {
    /// The text an error message ends with: the tail under a header, if any.
    pub(super) fn suffix(tail: &Option<LogTail>) -> String {
        tail.as_ref().map_or_else(String::new, |t| {
            format!("\n--- last lines of {} ---\n{}", t.path.display(), t.lines)
        })
    }
}
