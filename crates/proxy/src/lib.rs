#![forbid(unsafe_code)]
//! Sluice's data plane: listeners for the app, routing to external services, TLS origination,
//! pooled upstream connections, access log, metrics, the admin endpoint and the DNS server of
//! transparent mode.

pub mod access_log;
pub mod admin;
mod coalesce;
pub mod dns;
mod forward;
mod guard;
mod h2_upstream;
mod hello;
pub mod http;
pub mod metrics;
mod peek;
mod pins;
pub mod policy;
mod pool;
pub mod runtime;
mod socket_relay;
pub mod subscribe;
mod tcp;
mod tls;
pub mod transparent;
pub mod upstream;
mod upstreams;

pub use runtime::{ApplyError, Proxy, Settings};
