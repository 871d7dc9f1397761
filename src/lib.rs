//! pgpilot: a PostgreSQL-aware proxy and connection pooler for a primary with
//! streaming-replication hot standbys.
//!
//! Data path, top to bottom: [`server`] accepts clients → [`session`] runs one
//! task per client → [`router`] decides the node → [`backend`] pools server
//! connections → [`cluster`] owns node state (health, replication lag,
//! weights). [`auth`] decides who may try to log in, and how fast
//! (`hba_file` rules, login throttling). [`admin`] answers `SHOW POOL_*`
//! from that state and [`metrics`] exports it to Prometheus; [`context`] holds
//! the state every task shares, and [`error`] turns each layer's failures into
//! SQLSTATEs. [`protocol`] (wire format), [`config`] and [`net`] are leaves:
//! they import nothing else of the crate. [`localcluster`] builds real
//! PostgreSQL clusters for `pgpilot demo` and the tests. Dependencies point
//! down this list; `tests/layering.rs` checks the layers stated in
//! `docs/architecture.md`.
//!
//! No `unsafe` here: system calls go through safe wrappers (`nix`, `socket2`).

#![forbid(unsafe_code)]
#![warn(unreachable_pub)]
// The module docs are for whoever works on pgpilot and link internals freely;
// read them with `cargo doc --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

pub mod admin;
pub(crate) mod auth;
pub(crate) mod backend;
pub mod cluster;
pub mod config;
pub mod consistency;
pub mod context;
pub mod demo;
pub(crate) mod error;
pub mod fuzzing;
pub mod localcluster;
pub(crate) mod metrics;
pub mod net;
pub mod protocol;
pub mod router;
pub mod server;
pub(crate) mod session;
