//! Integration tests against a real listener on loopback.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "a test or benchmark that fails should fail loudly"
)]

#[path = "../support/redis.rs"]
mod redis_support;

mod chaos;
mod conformance;
mod exchange;
mod feed;
mod helpers;
mod oidc;
mod ops;
mod replicas;
mod revocation;
mod rotation;
mod serving;
mod trips;
