//! Which node runs a statement, and what a statement leaves behind.
//!
//! The router is a set of pure functions of (statement, session state, cluster
//! snapshot), so the policy can be tested without sockets: [`classify`] says what
//! a statement needs (behind [`cache`]), [`policy`] picks the node, [`chooser`]
//! picks a session's standby. The session (`crate::session`) applies the
//! decisions to its connections.
//!
//! No I/O here: the catalog lookups the caches of [`catalog`] and
//! [`relations`] need are asked through [`catalog::CatalogQueries`], which
//! the session implements on a connection of its own (`tests/layering.rs`
//! checks that the router names no client library, socket or task).

pub mod cache;
pub(crate) mod catalog;
pub mod chooser;
pub mod classify;
pub(crate) mod database_cmd;
pub(crate) mod memo;
pub mod normalize;
pub mod normalize_fast;
pub mod policy;
pub(crate) mod relations;
pub(crate) mod session_cmd;
