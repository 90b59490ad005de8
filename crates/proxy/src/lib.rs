#![forbid(unsafe_code)]
//! Sluice's data plane: listeners for the app, routing to external services, TLS origination,
//! pooled upstream connections, access log, metrics and the admin endpoint.

pub mod access_log;
pub mod admin;
pub mod forward;
pub mod guard;
pub mod http;
pub mod metrics;
pub mod policy;
pub mod runtime;
pub mod subscribe;
pub mod tcp;
pub mod tls;
pub mod upstream;

pub use runtime::{ApplyError, Proxy, Settings};
