//! Writ: a short-lived, task-scoped credential broker.
//!
//! A workload presents its identity (SPIFFE JWT-SVID or OIDC ID token), asks for a token for
//! one task (RFC 8693), and gets a narrowly scoped JWT whose every scope policy allowed.

pub mod app;
pub mod approvals;
pub mod audit;
pub mod auth;
pub mod binding;
pub mod broker;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod dev;
pub mod domain;
pub mod error;
pub mod exchange;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod http;
pub mod identity;
pub mod introspect;
pub mod metrics;
pub mod policy;
pub mod reset;
pub mod revocation;
pub mod revoke;
pub mod status;
pub mod store;
pub mod task;
pub mod tls;
pub mod token;
pub mod trips;
pub mod webhook;
