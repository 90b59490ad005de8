//! Names pinned to local addresses, for tests only: with the `test-overrides` feature (which
//! only the test suite turns on), `SLUICE_TEST_CONNECT_TO=NAME:PORT=IP:PORT,...` sends
//! connections for NAME:PORT to IP:PORT instead of resolving NAME, so tests can stand in local
//! origins for public hosts. Without the feature nothing is pinned and every name is resolved
//! and checked.

use std::net::SocketAddr;

/// Where `host:port` is pinned, if anywhere.
#[cfg(not(feature = "test-overrides"))]
pub fn pinned(_host: &str, _port: u16) -> Option<SocketAddr> {
    None
}

/// Says, once at start, that names are pinned: only a test build can.
#[cfg(not(feature = "test-overrides"))]
pub fn announce() {}

#[cfg(feature = "test-overrides")]
pub fn announce() {
    if let Ok(pins) = std::env::var("SLUICE_TEST_CONNECT_TO") {
        if !pins.is_empty() {
            tracing::warn!(%pins, "this is a test build: SLUICE_TEST_CONNECT_TO sends these names to fixed addresses, unchecked; never run it in production");
        }
    }
}

#[cfg(feature = "test-overrides")]
pub fn pinned(host: &str, port: u16) -> Option<SocketAddr> {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    static PINS: OnceLock<HashMap<(String, u16), SocketAddr>> = OnceLock::new();
    PINS.get_or_init(|| {
        let text = std::env::var("SLUICE_TEST_CONNECT_TO").unwrap_or_default();
        text.split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|pin| {
                let (from, to) = pin.split_once('=')?;
                let (name, port) = from.rsplit_once(':')?;
                Some((
                    (name.to_ascii_lowercase(), port.parse().ok()?),
                    to.parse().ok()?,
                ))
            })
            .collect()
    })
    .get(&(host.to_string(), port))
    .copied()
}
