#![forbid(unsafe_code)]
//! Sluice's data plane: listeners for the app, routing to external services, TLS origination,
//! pooled upstream connections, access log, metrics and the admin endpoint.

pub mod access_log;
pub mod admin;
mod forward;
mod guard;
pub mod http;
pub mod metrics;
mod pins;
pub mod policy;
pub mod runtime;
pub mod subscribe;
mod tcp;
mod tls;
pub mod upstream;

pub use runtime::{ApplyError, Proxy, Settings};
