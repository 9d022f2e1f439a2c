//! Integration tests against a real listener on loopback.

#[path = "../support/redis.rs"]
mod redis_support;

mod audit;
mod exchange;
mod helpers;
mod oidc;
mod ops;
mod replicas;
mod revocation;
mod rotation;
mod trips;
