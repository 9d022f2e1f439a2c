//! Integration tests against a real listener on loopback.

#![allow(
    clippy::restriction,
    clippy::pedantic,
    reason = "tests and benchmarks fail loudly"
)]

#[path = "../support/redis.rs"]
mod redis_support;
#[path = "../support/spiffe.rs"]
mod spiffe_support;

mod approvals;
mod audit;
mod chaos;
mod conformance;
mod delegation;
mod dpop;
mod exchange;
mod feed;
mod helpers;
mod mtls;
mod oidc;
mod ops;
mod redis_ops;
mod replicas;
mod reshard;
mod revocation;
mod rotation;
mod serving;
mod spire;
mod status;
mod trips;
mod verify;

// The example resource server, started by the verifier tests (its `main` is unused here).
#[allow(dead_code)]
#[path = "../../examples/resource_server.rs"]
mod resource_server;
