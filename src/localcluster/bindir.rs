//! Finding the PostgreSQL server binaries a [`LocalCluster`](super::LocalCluster)
//! runs, and saying exactly what is missing when they are not there.
//!
//! A newcomer's first `pgpilot demo` often runs on a machine with no
//! PostgreSQL server installed, or with only the client package (psql and
//! pg_basebackup, but no initdb or postgres). The error names the binaries
//! each searched directory lacks, where it looked, and how to install them.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::process::run_command;
use super::{ClusterError, POLL_TIMEOUT};

/// Binaries a bindir must hold to be usable.
pub(super) const REQUIRED_BINARIES: [&str; 5] =
    ["initdb", "pg_ctl", "pg_basebackup", "postgres", "psql"];

/// Finds the PostgreSQL server binaries: `$PGPILOT_PG_BINDIR` if set, else
/// `pg_config --bindir`, else the highest version of `/usr/lib/postgresql/*/bin`,
/// else a directory on `PATH`. A directory counts only if it holds initdb,
/// pg_ctl, pg_basebackup, postgres and psql.
pub(crate) fn find_bindir() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = std::env::var_os("PGPILOT_PG_BINDIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        let missing = missing_binaries(&dir);
        if missing.is_empty() {
            return Ok(dir);
        }
        return Err(ClusterError::BinariesNotFound(format!(
            "PGPILOT_PG_BINDIR={} lacks {}",
            dir.display(),
            missing.join(", ")
        )));
    }
    let mut pg_config = Command::new("pg_config");
    pg_config.arg("--bindir");
    let from_pg_config = run_command(pg_config, "pg_config --bindir", POLL_TIMEOUT)
        .map(|out| PathBuf::from(out.trim()))
        .into_iter();
    let mut versioned: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versioned.sort_by(|a, b| b.cmp(a)); // highest version first
    let path = std::env::var_os("PATH").unwrap_or_default();
    let candidates = from_pg_config
        .chain(versioned.into_iter().map(|(_, dir)| dir))
        .chain(std::env::split_paths(&path));
    let mut partial = Vec::new();
    for dir in candidates {
        let missing = missing_binaries(&dir);
        if missing.is_empty() {
            return Ok(dir);
        }
        if missing.len() < REQUIRED_BINARIES.len() {
            partial.push((dir, missing));
        }
    }
    Err(ClusterError::BinariesNotFound(not_found_detail(&partial)))
}

/// What the search saw: where it looked, and which of the directories holding
/// some of the binaries (typically a client-only install) lacks what.
fn not_found_detail(partial: &[(PathBuf, Vec<&str>)]) -> String {
    let mut detail = format!(
        "no directory holds all of {} (searched PGPILOT_PG_BINDIR, pg_config --bindir, \
         /usr/lib/postgresql/*/bin and PATH)",
        REQUIRED_BINARIES.join(", ")
    );
    for (dir, missing) in partial {
        detail.push_str(&format!("; {} lacks {}", dir.display(), missing.join(", ")));
    }
    detail
}

/// The binaries of [`REQUIRED_BINARIES`] that `dir` does not hold as
/// executable files, in that order.
pub(super) fn missing_binaries(dir: &Path) -> Vec<&'static str> {
    REQUIRED_BINARIES
        .into_iter()
        .filter(|bin| {
            let meta = fs::metadata(dir.join(bin));
            !meta.is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client-only install (psql and pg_basebackup, no server) is reported
    /// by name, with the server binaries it lacks.
    #[test]
    fn missing_binaries_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for (bin, mode) in [("psql", 0o755), ("pg_basebackup", 0o755), ("initdb", 0o644)] {
            let path = dir.path().join(bin);
            fs::write(&path, "#!/bin/sh\n").unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        }
        // initdb is there but not executable, so it counts as missing.
        let missing = missing_binaries(dir.path());
        assert_eq!(missing, vec!["initdb", "pg_ctl", "postgres"]);
        let detail = not_found_detail(&[(dir.path().to_path_buf(), missing)]);
        assert!(
            detail.ends_with(&format!(
                "; {} lacks initdb, pg_ctl, postgres",
                dir.path().display()
            )),
            "{detail}"
        );
        let e = ClusterError::BinariesNotFound(detail).to_string();
        assert!(e.contains("apt-get install"), "{e}");
        assert!(e.contains("PGPILOT_PG_BINDIR"), "{e}");
    }
}
