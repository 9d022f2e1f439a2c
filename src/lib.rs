//! Writ: a short-lived, task-scoped credential broker.
//!
//! A workload presents its identity (SPIFFE JWT-SVID or OIDC ID token), asks for a token for
//! one task (RFC 8693), and gets a narrowly scoped JWT whose every scope policy allowed.
//!
//! Features: `server` (default) is the broker; `verify` alone is the resource-server verifier
//! ([`verify`], SPEC §9) with the token code it shares with the broker, without the broker's
//! server dependencies.

#[cfg(feature = "server")]
pub mod app;
#[cfg(feature = "server")]
pub mod approvals;
#[cfg(feature = "server")]
pub mod audit;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod binding;
#[cfg(feature = "server")]
pub mod broker;
#[cfg(feature = "server")]
pub mod cache;
#[cfg(feature = "server")]
pub mod cli;
#[cfg(feature = "server")]
pub mod client;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod dev;
#[cfg(feature = "server")]
pub mod domain;
#[cfg(feature = "server")]
pub mod error;
#[cfg(feature = "server")]
pub mod exchange;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "server")]
pub mod health;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod identity;
#[cfg(feature = "server")]
pub mod introspect;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod policy;
#[cfg(feature = "server")]
pub mod reset;
#[cfg(feature = "server")]
pub mod revocation;
#[cfg(feature = "server")]
pub mod revoke;
#[cfg(feature = "server")]
pub mod status;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod task;
#[cfg(feature = "server")]
pub mod tls;
#[cfg(feature = "verify")]
pub mod token;
#[cfg(feature = "server")]
pub mod trips;
#[cfg(feature = "verify")]
pub mod verify;
#[cfg(feature = "server")]
pub mod webhook;
