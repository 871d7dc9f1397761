//! Process plumbing for [`LocalCluster`](super::LocalCluster): how server
//! binaries are launched (directly, or as the `postgres` OS user via `runuser` or
//! `su` when we are root), running a command with captured output and a time
//! limit, polling, ownership of created files, and killing a postmaster found
//! through its pid file.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, User, geteuid};

use super::{ClusterError, CommandFailed, CommandOutcome, SUPERUSER};

/// How server binaries are launched.
#[derive(Debug, Clone)]
pub(super) enum RunAs {
    /// Directly (we are not root).
    Current,
    /// `runuser -u postgres -- <cmd>` (we are root).
    Runuser(PathBuf),
    /// `su postgres -s /bin/sh -c '<cmd>'` (we are root and runuser is missing).
    Su,
}

impl RunAs {
    /// How this process launches server binaries, and the `(uid, gid)` of the
    /// `postgres` OS user to own what we create when we are root (`None` otherwise).
    pub(super) fn detect() -> Result<(RunAs, Option<(u32, u32)>), ClusterError> {
        if !geteuid().is_root() {
            return Ok((RunAs::Current, None));
        }
        let owner = postgres_account().ok_or(ClusterError::NoServerUser)?;
        let runuser = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .map(|dir| Path::new(dir).join("runuser"))
            .into_iter()
            .find(|p| p.is_file());
        Ok((runuser.map_or(RunAs::Su, RunAs::Runuser), Some(owner)))
    }

    /// Builds the command `exe args...` (as the `postgres` OS user when root), in
    /// `cwd`, without PG* environment variables that could redirect it. Returns it
    /// with its label: the command line as given, for logs and errors.
    pub(super) fn command(&self, exe: &str, args: &[&str], cwd: &Path) -> (Command, String) {
        let mut argv = vec![exe];
        argv.extend(args);
        let label = argv.join(" ");
        let mut cmd = match self {
            RunAs::Current => Command::new(exe),
            RunAs::Runuser(runuser) => Command::new(runuser),
            RunAs::Su => Command::new("su"),
        };
        match self {
            RunAs::Current => cmd.args(args),
            RunAs::Runuser(_) => cmd.args(["-u", SUPERUSER, "--"]).args(argv),
            RunAs::Su => {
                let line: Vec<String> = argv.into_iter().map(sh_quote).collect();
                cmd.args([SUPERUSER, "-s", "/bin/sh", "-c", &line.join(" ")])
            }
        };
        cmd.current_dir(cwd);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        (cmd, label)
    }

    /// The shell command line a person types to run `exe args...` the way
    /// [`RunAs::command`] does (as the `postgres` OS user when root), so what
    /// the demo prints works as pasted, whatever the PostgreSQL version or
    /// installation. Arguments are quoted only when the shell would split them.
    pub(super) fn shell_line(&self, exe: &str, args: &[&str]) -> String {
        let argv: Vec<String> = std::iter::once(exe)
            .chain(args.iter().copied())
            .map(shell_word)
            .collect();
        let argv = argv.join(" ");
        match self {
            RunAs::Current => argv,
            RunAs::Runuser(runuser) => {
                format!(
                    "{} -u {SUPERUSER} -- {argv}",
                    shell_word(&runuser.to_string_lossy())
                )
            }
            RunAs::Su => format!("su {SUPERUSER} -s /bin/sh -c {}", sh_quote(&argv)),
        }
    }
}

/// `arg` as one shell word: unchanged when it holds only characters no shell
/// treats specially, else single-quoted.
fn shell_word(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-=:,+@%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        sh_quote(arg)
    }
}

/// `(uid, gid)` of the `postgres` OS user.
fn postgres_account() -> Option<(u32, u32)> {
    let user = User::from_name("postgres").ok()??;
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

/// Gives `path` to `owner` (the `postgres` OS user when we are root); does
/// nothing when `owner` is `None`.
pub(super) fn chown_to(path: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    owner.map_or(Ok(()), |(uid, gid)| chown(path, Some(uid), Some(gid)))
}

/// SIGKILLs the postmaster named in `<data_dir>/postmaster.pid` if it is still
/// alive, and waits (5 s) for it to exit. Does nothing without a pid file.
pub(super) fn kill_postmaster(data_dir: &Path) {
    let pid = match fs::read_to_string(data_dir.join("postmaster.pid")) {
        Ok(s) => s.lines().next().and_then(|l| l.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(dir = %data_dir.display(), error = %e, "cannot read postmaster.pid; not killing");
            None
        }
    };
    if let Some(pid) = pid.filter(|&pid| pid > 0 && postmaster_alive(pid, data_dir)) {
        // A pid just checked to be a postmaster of our data dir.
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let gone = || Ok(!postmaster_alive(pid, data_dir));
        if let Err(e) = wait_until(Duration::from_secs(5), "the postmaster to exit", gone) {
            tracing::warn!(pid, error = %e, "postmaster still alive after SIGKILL");
        }
    }
}

/// True while `pid` is a live process whose working directory is `data_dir` (a
/// postmaster chdirs there), so we never signal an unrelated, reused pid.
fn postmaster_alive(pid: i32, data_dir: &Path) -> bool {
    let cwd = fs::read_link(format!("/proc/{pid}/cwd"));
    matches!((cwd, fs::canonicalize(data_dir)), (Ok(cwd), Ok(data)) if cwd == data)
}

/// Calls `check` every 100 ms until it returns `Ok(true)` or `timeout` passes.
/// Errors from `check` count as "not yet"; the last one is reported on timeout.
pub(super) fn wait_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool, ClusterError>,
) -> Result<(), ClusterError> {
    let deadline = Instant::now() + timeout;
    let mut last_error = String::new();
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = format!("; last error: {e}"),
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::Timeout(format!(
                "waited {timeout:?} for {what}{last_error}"
            )));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `cmd` in its own process group with stdin closed, capturing stdout
/// (returned) and stderr. After `timeout` the group gets SIGTERM, then SIGKILL.
pub(super) fn run_command(
    mut cmd: Command,
    label: &str,
    timeout: Duration,
) -> Result<String, ClusterError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| {
        ClusterError::Command(Box::new(CommandFailed {
            cmd: label.to_string(),
            stderr: e.to_string(),
            outcome: CommandOutcome::NotStarted(e),
            stdout: String::new(),
            server_log: None,
        }))
    })?;
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let (tx, rx) = mpsc::channel();
    let pipes: [Box<dyn Read + Send>; 2] = [
        Box::new(child.stdout.take().expect("stdout is piped")),
        Box::new(child.stderr.take().expect("stderr is piped")),
    ];
    for (index, mut pipe) in pipes.into_iter().enumerate() {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Err(e) = pipe.read_to_end(&mut bytes) {
                // What was read is still reported; the exit status decides.
                tracing::debug!(index, error = %e, "reading a child's output failed");
            }
            // The receiver is gone only when the child timed out (its output
            // is no longer wanted).
            if tx.send((index, bytes)).is_err() {
                tracing::debug!(index, "child output dropped: the command timed out");
            }
        });
    }
    drop(tx); // so the receive loop below ends once both readers are done
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            // Only the process group created for this child.
            let group = Pid::from_raw(child.id() as i32);
            for signal in [Signal::SIGTERM, Signal::SIGKILL] {
                let _ = killpg(group, signal);
                // Up to 500 ms for the child to go; the group gets SIGKILL
                // anyway, for what it may have started.
                let grace = Instant::now() + Duration::from_millis(500);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < grace {
                    thread::sleep(Duration::from_millis(10));
                }
            }
            if let Err(e) = child.wait() {
                tracing::debug!(error = %e, "reaping a killed child failed");
            }
            return Err(ClusterError::Timeout(format!(
                "`{label}` did not finish within {timeout:?}"
            )));
        }
        thread::sleep(Duration::from_millis(10));
    };
    // A grandchild might hold a pipe open; do not wait for it forever.
    let mut output = [Vec::new(), Vec::new()];
    while let Ok((index, bytes)) = rx.recv_timeout(Duration::from_secs(5)) {
        output[index] = bytes;
    }
    let [stdout, stderr] = output.map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    if status.success() {
        return Ok(stdout);
    }
    Err(ClusterError::Command(Box::new(CommandFailed {
        cmd: label.to_string(),
        outcome: CommandOutcome::Exited(status),
        stderr,
        stdout,
        server_log: None,
    })))
}

/// POSIX shell single-quoting, for the `su -c` fallback.
fn sh_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The printed command pastes into a shell as is: plain words stay
    /// plain, anything else is quoted, and under root it runs as `postgres`.
    #[test]
    fn shell_line_is_pasteable() {
        let args = ["stop", "-m", "immediate", "-D", "/tmp/my dir/node0/data"];
        assert_eq!(
            RunAs::Current.shell_line("/usr/lib/postgresql/15/bin/pg_ctl", &args),
            "/usr/lib/postgresql/15/bin/pg_ctl stop -m immediate -D '/tmp/my dir/node0/data'"
        );
        let runuser = RunAs::Runuser(PathBuf::from("/usr/sbin/runuser"));
        assert_eq!(
            runuser.shell_line("/opt/pg/bin/pg_ctl", &args[..3]),
            "/usr/sbin/runuser -u postgres -- /opt/pg/bin/pg_ctl stop -m immediate"
        );
        assert_eq!(
            RunAs::Su.shell_line("/opt/pg/bin/pg_ctl", &args[..3]),
            "su postgres -s /bin/sh -c '/opt/pg/bin/pg_ctl stop -m immediate'"
        );
    }
}
