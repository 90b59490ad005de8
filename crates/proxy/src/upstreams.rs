//! Each external service's upstream (connector, TLS client, pool, metrics), built the first
//! time traffic needs it. A proxy that carries a whole mesh holds thousands of services and
//! calls a few: built up front, a proxy holding 10,000 services took 170 MiB (110 MiB now), and
//! its metrics listed every one of them.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use hickory_resolver::TokioResolver;
use prometheus_client::metrics::gauge::Gauge;
use sluice_api::model::ExternalService;

use crate::http::{HttpTimeouts, HttpUpstream};
use crate::metrics::Metrics;
use crate::tcp::TcpUpstream;
use crate::upstream::{Connector, Timeouts};

pub enum Upstream {
    Tcp(Arc<TcpUpstream>),
    Http(Arc<HttpUpstream>),
}

impl Upstream {
    pub fn connector(&self) -> &Arc<Connector> {
        match self {
            Upstream::Tcp(t) => &t.connector,
            Upstream::Http(h) => &h.connector,
        }
    }
}

/// What building an upstream takes, shared by every service.
pub struct Factory {
    pub resolver: Arc<TokioResolver>,
    pub timeouts: Timeouts,
    pub http: HttpTimeouts,
    pub metrics: Arc<Metrics>,
    /// Where the connectors built only to check a service count: nothing anyone reads, so
    /// that /metrics lists services that were used.
    pub checks: Arc<Metrics>,
    pub tls_file_dir: Option<PathBuf>,
}

impl Factory {
    fn build(&self, label: &str, service: &Arc<ExternalService>) -> Result<Upstream, String> {
        let connector = Connector::new(
            service.clone(),
            label.to_string(),
            alpn(service),
            self.resolver.clone(),
            self.timeouts,
            self.metrics.clone(),
            self.tls_file_dir.as_deref(),
        )
        .map_err(|e| e.to_string())?;
        let connector = Arc::new(connector);
        Ok(if service.protocol.is_http() {
            Upstream::Http(Arc::new(HttpUpstream::new(
                connector,
                self.http,
                self.metrics.clone(),
            )))
        } else {
            Upstream::Tcp(Arc::new(TcpUpstream::new(connector, &self.metrics)))
        })
    }
}

/// What TLS offers by ALPN for the service's protocol.
pub(crate) fn alpn(service: &ExternalService) -> &'static [&'static [u8]] {
    match service.protocol {
        p if p.requires_h2() => &[b"h2"],
        p if p.is_http() => &[b"h2", b"http/1.1"],
        _ => &[],
    }
}

/// One service's upstream, built on first use and kept while the service stays the same.
pub struct Lazy {
    pub service: Arc<ExternalService>,
    /// Shared by the tables that find this service by label.
    pub label: Arc<str>,
    factory: Arc<Factory>,
    built: OnceLock<Arc<Upstream>>,
    /// `sluice_active_connections` of the service, found once rather than per connection.
    open: OnceLock<Gauge>,
}

impl Lazy {
    /// Checks now everything building can refuse (TLS material and files, server names), so a
    /// bad service is an error when the config is applied, not at its first request.
    pub fn new(
        label: String,
        service: Arc<ExternalService>,
        factory: Arc<Factory>,
    ) -> Result<Self, String> {
        Connector::new(
            service.clone(),
            label.clone(),
            alpn(&service),
            factory.resolver.clone(),
            factory.timeouts,
            factory.checks.clone(),
            factory.tls_file_dir.as_deref(),
        )
        .map_err(|e| e.to_string())?;
        Ok(Self {
            service,
            label: Arc::from(label),
            factory,
            built: OnceLock::new(),
            open: OnceLock::new(),
        })
    }

    /// The upstream, built now if nothing needed it before. A failure (a file removed since
    /// the config was applied) is not kept: the next call tries again.
    pub fn try_get(&self) -> Result<Arc<Upstream>, String> {
        if let Some(u) = self.built.get() {
            return Ok(u.clone());
        }
        let built = self.factory.build(&self.label, &self.service)?;
        Ok(self.built.get_or_init(|| Arc::new(built)).clone())
    }

    pub fn get(&self) -> Option<Arc<Upstream>> {
        self.try_get()
            .map_err(|e| {
                tracing::error!(service = %self.label, error = %e, "external service cannot be set up");
            })
            .ok()
    }

    /// The gauge of the service's open connections.
    pub fn open(&self) -> Gauge {
        self.open
            .get_or_init(|| {
                self.factory
                    .metrics
                    .active_connections
                    .get_or_create(&Metrics::service(&self.label))
                    .clone()
            })
            .clone()
    }

    pub fn http(&self) -> Option<Arc<HttpUpstream>> {
        match &*self.get()? {
            Upstream::Http(h) => Some(h.clone()),
            Upstream::Tcp(_) => None,
        }
    }

    pub fn connector(&self) -> Option<Arc<Connector>> {
        Some(self.get()?.connector().clone())
    }
}
