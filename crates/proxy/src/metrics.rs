//! Prometheus metrics, labelled by external service.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub service: String,
    /// `upstream` (app to external service) or `downstream` (back to the app).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub service: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allowed` (registered), `passthrough` (unregistered, allowed mode) or `denied`.
    pub decision: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayLabels {
    /// `pooled` (two plain sockets: a buffer from the thread's pool only while bytes move) or
    /// `held` (TLS or a unix socket at an end: buffers for the relay's life).
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub host: String,
    pub port: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsTransportLabels {
    /// `udp` or `tcp`.
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsAnswerLabels {
    /// `vip`, `nodata`, `forwarded`, `servfail`, `formerr`, `notimp`, `dropped` (not a query)
    /// or `overflow` (too many in flight).
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsFailureLabels {
    /// `timeout`, `io`, `mismatch` or `malformed`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsSourceLabels {
    /// `local` (answered from the zone, or an error reply) or `upstream` (forwarded).
    pub source: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<RequestLabels, Counter>,
    pub http_request_duration: Family<ServiceLabels, Histogram>,
    pub tcp_connections: Family<ServiceLabels, Counter>,
    pub active_connections: Family<ServiceLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub relays: Family<RelayLabels, Counter>,
    pub upstream_connections: Family<ServiceLabels, Counter>,
    pub upstream_connect_failures: Family<ReasonLabels, Counter>,
    pub upstream_tls_failures: Family<ReasonLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub forward_decisions: Family<DecisionLabels, Counter>,
    pub passthrough: Family<DestinationLabels, Counter>,
    /// Passthrough destinations already given their own counter.
    passthrough_seen: std::sync::Mutex<std::collections::HashSet<(String, u16)>>,
    /// 1 while the config stream to a control plane is open (`sluice proxy`).
    pub config_stream_connected: Gauge,
    /// The version of the config from the control plane now applied.
    pub config_version: Gauge,
    pub dns_queries: Family<DnsTransportLabels, Counter>,
    pub dns_answers: Family<DnsAnswerLabels, Counter>,
    pub dns_upstream_failures: Family<DnsFailureLabels, Counter>,
    pub dns_vip_records_removed: Counter,
    pub dns_query_duration: Family<DnsSourceLabels, Histogram>,
    /// Handed to the access log, which counts here the lines it had no room for.
    pub access_log_lines_dropped: Counter,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~30 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.5, 14,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let http_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests carried, by external service and response status",
            http_requests.clone(),
        );
        let http_request_duration = Family::<ServiceLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from request received to response completed",
            http_request_duration.clone(),
        );
        let tcp_connections = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "tcp_connections",
            "TCP connections accepted on tcp-protocol outbounds",
            tcp_connections.clone(),
        );
        let active_connections = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "active_connections",
            "App connections open on each outbound, HTTP and TCP",
            active_connections.clone(),
        );
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "bytes",
            "Payload bytes carried, by direction",
            bytes.clone(),
        );
        let relays = Family::<RelayLabels, Counter>::default();
        registry.register(
            "relays",
            "Byte relays ended (tcp outbounds, CONNECT tunnels, transparent TCP), by their buffers: pooled (two plain sockets, a buffer only while bytes move) or held (TLS or a unix socket at an end, buffers for the relay's life)",
            relays.clone(),
        );
        let upstream_connections = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "upstream_connections",
            "Connections opened to external endpoints (with their TLS handshake when originating TLS)",
            upstream_connections.clone(),
        );
        let upstream_connect_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "upstream_connect_failures",
            "Failed attempts to reach an endpoint, by reason",
            upstream_connect_failures.clone(),
        );
        let upstream_tls_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "upstream_tls_failures",
            "Failed TLS handshakes with external endpoints, by reason",
            upstream_tls_failures.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration loads, applied or rejected",
            config_reloads.clone(),
        );
        let forward_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "forward_proxy_decisions",
            "Forward-proxy requests and tunnels by policy decision and reason",
            forward_decisions.clone(),
        );
        let passthrough = Family::<DestinationLabels, Counter>::default();
        registry.register(
            "passthrough",
            "Unregistered destinations passed through in allowed mode, by host and port (what to register before restricting)",
            passthrough.clone(),
        );
        let config_stream_connected = Gauge::default();
        registry.register(
            "config_stream_connected",
            "1 while the config stream to a control plane is open",
            config_stream_connected.clone(),
        );
        let config_version = Gauge::default();
        registry.register(
            "config_version",
            "Version of the control plane's config now applied (0: none yet)",
            config_version.clone(),
        );
        let dns_queries = Family::<DnsTransportLabels, Counter>::default();
        registry.register(
            "dns_queries",
            "DNS queries received, by transport",
            dns_queries.clone(),
        );
        let dns_answers = Family::<DnsAnswerLabels, Counter>::default();
        registry.register(
            "dns_answers",
            "DNS queries by how they were answered (dropped and overflow: not answered at all)",
            dns_answers.clone(),
        );
        let dns_upstream_failures = Family::<DnsFailureLabels, Counter>::default();
        registry.register(
            "dns_upstream_failures",
            "Failed exchanges with upstream resolvers and bad packets from them, by reason",
            dns_upstream_failures.clone(),
        );
        let dns_vip_records_removed = Counter::default();
        registry.register(
            "dns_vip_records_removed",
            "Address records in upstream answers pointing into the VIP ranges, removed",
            dns_vip_records_removed.clone(),
        );
        let dns_query_duration = Family::<DnsSourceLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "dns_query_duration_seconds",
            "Time from DNS query received to answer ready, answered locally or by an upstream",
            dns_query_duration.clone(),
        );
        let access_log_lines_dropped = Counter::default();
        registry.register(
            "access_log_lines_dropped",
            "Access-log lines dropped because the writer fell 64k lines behind",
            access_log_lines_dropped.clone(),
        );
        Self {
            access_log_lines_dropped,
            dns_queries,
            dns_answers,
            dns_upstream_failures,
            dns_vip_records_removed,
            dns_query_duration,
            config_stream_connected,
            config_version,
            passthrough,
            passthrough_seen: Default::default(),
            forward_decisions,
            registry,
            http_requests,
            http_request_duration,
            tcp_connections,
            active_connections,
            bytes,
            relays,
            upstream_connections,
            upstream_connect_failures,
            upstream_tls_failures,
            config_reloads,
        }
    }
}

impl Metrics {
    pub fn count_relay(&self, pooled: bool) {
        let mode = if pooled { "pooled" } else { "held" };
        self.relays.get_or_create(&RelayLabels { mode }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn service(service: &str) -> ServiceLabels {
        ServiceLabels {
            service: service.to_string(),
        }
    }

    /// Counts a decision about app-chosen traffic (forward proxy and transparent listener).
    pub fn count_decision(&self, decision: &'static str, reason: &'static str) {
        self.forward_decisions
            .get_or_create(&DecisionLabels { decision, reason })
            .inc();
    }

    /// Counts a passthrough by destination, so `allowed` mode shows what to register; past
    /// [`MAX_PASSTHROUGH_DESTINATIONS`] new ones count as `other`, so clients cannot grow the
    /// metrics without bound.
    pub fn count_passthrough(&self, host: String, port: u16) {
        let Ok(mut seen) = self.passthrough_seen.lock() else {
            return;
        };
        let labels = passthrough_labels(&mut seen, host, port);
        drop(seen);
        self.passthrough.get_or_create(&labels).inc();
    }
}

/// Distinct passthrough destinations counted by name.
pub const MAX_PASSTHROUGH_DESTINATIONS: usize = 1000;

/// The labels for a passthrough destination: its own, or `other` once the cap is reached.
fn passthrough_labels(
    seen: &mut std::collections::HashSet<(String, u16)>,
    host: String,
    port: u16,
) -> DestinationLabels {
    let key = (host, port);
    if seen.contains(&key) || seen.len() < MAX_PASSTHROUGH_DESTINATIONS {
        seen.insert(key.clone());
        DestinationLabels {
            host: key.0,
            port: key.1,
        }
    } else {
        DestinationLabels {
            host: "other".into(),
            port: 0,
        }
    }
}

#[cfg(test)]
mod passthrough_tests {
    use super::*;

    #[test]
    fn passthrough_destinations_are_capped() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..MAX_PASSTHROUGH_DESTINATIONS {
            let l = passthrough_labels(&mut seen, format!("h{i}.example"), 443);
            assert_eq!(l.host, format!("h{i}.example"));
        }
        let over = passthrough_labels(&mut seen, "new.example".into(), 443);
        assert_eq!((over.host.as_str(), over.port), ("other", 0));
        let again = passthrough_labels(&mut seen, "h1.example".into(), 443);
        assert_eq!((again.host.as_str(), again.port), ("h1.example", 443));
    }
}
