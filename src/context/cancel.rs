//! CancelRequest routing.
//!
//! Each client gets pgpilot's own [`CancelKey`] in BackendKeyData. The registry maps
//! that key to the server connection currently serving the client, so a cancel
//! arriving on a fresh connection is forwarded to the right server process. A
//! wrong secret is ignored silently, as PostgreSQL does.
//!
//! Each client's target lives in a slot of its own, shared by the registry and
//! the session ([`CancelSlot`]): under transaction pooling the session points it
//! at a new server connection at every transaction, and that must not take the
//! registry-wide lock (every runtime thread's sessions would contend on it).
//!
//! With coordination through etcd, bits 22–29 of the pid are the instance's
//! cancel tag (claimed in etcd, unique among live instances), so an
//! instance that receives a cancel for another instance's client forwards
//! it there ([`tagged_pid`], `ProxyContext::cancel`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::conn::send_cancel;
use crate::protocol::CancelKey;

/// The pid handed to a client by the instance with cancel tag `tag`
/// (non-zero): the tag in bits 22–29, `n` in the 22 bits below.
pub(crate) fn tagged_pid(tag: u8, n: i32) -> i32 {
    (i32::from(tag) << 22) | (n & 0x3f_ffff)
}

/// The cancel tag a pid carries (0: none).
pub(crate) fn pid_tag(pid: i32) -> u8 {
    ((pid >> 22) & 0xff) as u8
}

/// The server process a cancel should reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CancelTarget {
    /// Server address.
    pub(crate) addr: SocketAddr,
    /// The server connection's BackendKeyData key.
    pub(crate) key: CancelKey,
}

#[derive(Debug)]
struct Entry {
    /// The secret pgpilot issued to the client.
    secret: i32,
    /// The server connection currently serving the client, if any.
    target: CancelSlot,
}

/// Where one client's cancels go, set by its session (cheap to clone: shared).
#[derive(Debug, Clone, Default)]
pub(crate) struct CancelSlot(Arc<Mutex<Option<CancelTarget>>>);

impl CancelSlot {
    /// Point the client's cancels at `target` (`None`: nowhere, between
    /// transactions under transaction pooling).
    pub(crate) fn set(&self, target: Option<CancelTarget>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }

    fn get(&self) -> Option<CancelTarget> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Client key → current server connection.
#[derive(Debug, Default)]
pub(crate) struct CancelRegistry {
    entries: Mutex<HashMap<i32, Entry, foldhash::fast::RandomState>>,
}

impl CancelRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Entry, foldhash::fast::RandomState>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a new client key and return the slot its session sets; `None`
    /// if the pid is already in use.
    pub(crate) fn register(&self, key: CancelKey) -> Option<CancelSlot> {
        let mut m = self.lock();
        if m.contains_key(&key.pid) {
            return None;
        }
        let target = CancelSlot::default();
        m.insert(
            key.pid,
            Entry {
                secret: key.secret,
                target: target.clone(),
            },
        );
        Some(target)
    }

    /// Forget a client key (session ended).
    pub(crate) fn unregister(&self, key: CancelKey) {
        self.lock().remove(&key.pid);
    }

    /// Handle a CancelRequest from a client: forward it if the key matches.
    pub(crate) async fn cancel(&self, key: CancelKey, limit: Duration) {
        let target = self
            .lock()
            .get(&key.pid)
            .filter(|e| e.secret == key.secret)
            .and_then(|e| e.target.get());
        match target {
            Some(t) => send_cancel(t.addr, t.key, limit).await,
            None => tracing::debug!(pid = key.pid, "cancel request with an unknown key ignored"),
        }
    }
}

#[cfg(test)]
mod tag_tests {
    use super::{pid_tag, tagged_pid};

    #[test]
    fn the_tag_survives_the_round_trip_and_pids_stay_positive() {
        for tag in [1u8, 7, 128, 255] {
            for n in [0, 1, 0x3f_ffff, i32::MAX] {
                let pid = tagged_pid(tag, n);
                assert!(pid > 0, "{tag} {n}");
                assert_eq!(pid_tag(pid), tag);
            }
        }
    }
}
