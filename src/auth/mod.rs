//! Who may try to log in, and how fast: the `hba_file` rules that decide a
//! client's authentication method ([`hba`], parsed and held by the
//! configuration, which is why they live in `config::hba`), and the
//! per-address delay after repeated failed logins ([`throttle`]); and the
//! stored passwords of users not in `[[users]]`, looked up on the primary
//! ([`query`], `auth_query`).
//!
//! The rules and the throttle are policy without I/O of their own:
//! `session::handshake` asks the rules before it challenges a client, and the
//! session waits out the throttle's delay before it answers a failed login.
//! The lookup is the one part that talks to a node (as the monitor role). The
//! password exchanges themselves are in `protocol::auth`.

pub(crate) use crate::config::hba;
pub(crate) mod query;
pub(crate) mod throttle;
