//! Every stored resource, parsed once and kept in memory, following the store's change feed: the
//! index writes are checked against and the registry the config stream compiles from.
//!
//! Each change publishes a new immutable [`View`]; readers take the latest without locks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use sluice_api::model::{Cidr, ResourceKey};
use sluice_api::registry::Origin;
use sluice_api::{parse_documents, Parsed, Registry};
use sluice_store::{Key, Store, StoreError, VipRow};
use tokio::sync::{watch, Mutex};

use crate::naming::{self, Addressed};
use crate::server::KINDS;
use crate::vip::Pool;
use crate::{compile, scope_indexed, ProxyConfig};

/// The registry at one store revision.
#[derive(Debug, Default)]
pub struct View {
    pub revision: i64,
    pub docs: BTreeMap<Key, Arc<Entry>>,
    pub registry: Arc<Registry>,
    /// The whole registry compiled; each proxy's config is scoped out of it.
    pub config: Arc<ProxyConfig>,
    /// Each mesh's services for proxies without a Dataplane, scoped once per view.
    mesh_scopes: std::sync::Mutex<std::collections::HashMap<String, Arc<ProxyConfig>>>,
    /// Where each service's VIPs are in `config`, made once per view for every proxy's scope.
    vip_index: std::sync::OnceLock<crate::VipIndex>,
    /// Problems the stored resources have together (none, unless a newer release reads an
    /// older store): a write is not blamed for them.
    pub errors: BTreeSet<String>,
    /// What the control plane writes in resources' `status`: generated names and VIPs.
    pub status: Arc<BTreeMap<Key, naming::Status>>,
}

impl View {
    /// The config of the proxy `proxy` (see [`crate::scope`]); proxies without a Dataplane in
    /// one mesh share one.
    pub fn config_for(&self, proxy: &ResourceKey) -> Arc<ProxyConfig> {
        let index = self
            .vip_index
            .get_or_init(|| crate::VipIndex::new(&self.config));
        if self.registry.dataplanes.contains(proxy) {
            return Arc::new(scope_indexed(
                &self.config,
                index,
                &self.registry.dataplanes,
                proxy,
            ));
        }
        let mut scopes = self.mesh_scopes.lock().unwrap_or_else(|e| e.into_inner());
        scopes
            .entry(proxy.mesh.clone())
            .or_insert_with(|| {
                Arc::new(scope_indexed(
                    &self.config,
                    index,
                    &self.registry.dataplanes,
                    proxy,
                ))
            })
            .clone()
    }
}

/// A stored resource as parsed once. The YAML tree it was read from is not kept: the store
/// has the text, and a tree costs several KiB per resource.
#[derive(Debug)]
pub struct Entry {
    pub parsed: Parsed,
    /// The store revision that created it: the older of two resources keeps a name.
    pub created: i64,
}

/// The VIPs as last stored, and the version they were stored at (`None`: to be read again).
struct Vips {
    pool: Pool,
    version: Option<i64>,
    /// Stored addresses the pool could not take back (outside a changed `--vip-range`): deleted
    /// with the next save, so their owners can be stored with new ones.
    stale: Vec<String>,
}

/// A write in progress: no sync publishes until it is committed or dropped.
pub struct Held<'a> {
    _sync: tokio::sync::MutexGuard<'a, ()>,
}

pub struct Catalog {
    /// Held while syncing, so that changes are read and published in order.
    sync: Mutex<()>,
    view: watch::Sender<Arc<View>>,
    vips: Mutex<Vips>,
}

impl Catalog {
    /// Reads everything stored, with VIPs from Kuma's default range.
    pub async fn load(store: &Store) -> Result<Catalog, StoreError> {
        let range = Cidr::parse(crate::vip::DEFAULT_RANGE).map_err(StoreError::Config)?;
        Self::load_with(store, range).await
    }

    /// Reads everything stored; VIPs come from `range`.
    pub async fn load_with(store: &Store, range: Cidr) -> Result<Catalog, StoreError> {
        // The revision first: a change racing with the listing is read again by the next sync.
        let revision = store.revision().await?;
        let mut docs = BTreeMap::new();
        for kind in KINDS {
            for stored in store.list(kind, None).await? {
                if let Some(doc) = parse(&stored.key, &stored.body, stored.created) {
                    docs.insert(stored.key, doc);
                }
            }
        }
        let pool = Pool::new(range).map_err(|e| StoreError::Config(e.to_string()))?;
        let catalog = Catalog {
            sync: Mutex::new(()),
            view: watch::Sender::new(Arc::new(View::default())),
            vips: Mutex::new(Vips {
                pool,
                version: None,
                stale: Vec::new(),
            }),
        };
        catalog.publish(store, revision, docs, None).await;
        Ok(catalog)
    }

    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.view.subscribe()
    }

    /// Brings the view up to the store's latest revision; returns it.
    pub async fn sync(&self, store: &Store) -> Result<Arc<View>, StoreError> {
        let _guard = self.sync.lock().await;
        self.sync_locked(store).await
    }

    /// Holds off every other sync and commit until the write about to be made is committed:
    /// otherwise the store's notice of the write can start a full sync first, which reads and
    /// resolves the whole registry again while the writer still holds what it checked (at
    /// 10,000 services, about 50 MiB more at once).
    pub async fn hold(&self) -> Held<'_> {
        Held {
            _sync: self.sync.lock().await,
        }
    }

    /// [`Catalog::sync`], for the holder of [`Catalog::hold`].
    pub async fn sync_held(&self, _held: Held<'_>, store: &Store) -> Result<Arc<View>, StoreError> {
        self.sync_locked(store).await
    }

    /// Publishes a write just made on top of `before` (each change's key, body and the revision
    /// it was written at), with the registry its check resolved, so that the whole registry is
    /// not resolved a second time. Falls back to a full sync when anything else changed the store.
    pub async fn commit(
        &self,
        _held: Held<'_>,
        store: &Store,
        before: &View,
        written: Vec<(Key, Option<String>, i64)>,
        registry: Registry,
    ) -> Result<Arc<View>, StoreError> {
        let current = self.view();
        let last = written.last().map(|(.., revision)| *revision);
        if let Some(last) = last.filter(|_| current.revision == before.revision) {
            // Read and let go: at 10,000 services the events are megabytes.
            let only_this_write = store
                .events_since(current.revision)
                .await?
                .iter()
                .map(|e| e.revision)
                .eq(written.iter().map(|(.., revision)| *revision));
            if only_this_write {
                let mut docs = current.docs.clone();
                // Each body goes once parsed: at 10,000 services they are 2.4 MiB.
                for (key, body, revision) in written {
                    let created = docs.get(&key).map_or(revision, |e| e.created);
                    change(&mut docs, &key, body.as_deref(), created);
                }
                let mut config = compile(&registry);
                let status = self.address(store, &registry, &docs, &mut config).await;
                return Ok(self.install(View {
                    revision: last,
                    config: Arc::new(config),
                    registry: Arc::new(registry),
                    docs,
                    mesh_scopes: Default::default(),
                    vip_index: Default::default(),
                    errors: BTreeSet::new(),
                    status,
                }));
            }
        }
        self.sync_locked(store).await
    }

    async fn sync_locked(&self, store: &Store) -> Result<Arc<View>, StoreError> {
        let current = self.view();
        let events = store.events_since(current.revision).await?;
        let Some(last) = events.last().map(|e| e.revision) else {
            return Ok(current);
        };
        let mut docs = current.docs.clone();
        let mut changed: Vec<&Key> = events.iter().map(|e| &e.key).collect();
        changed.sort();
        changed.dedup();
        for key in changed {
            // As it is now, which may be newer than `last`: the next sync reads it again.
            let stored = store.get(key).await?;
            change(
                &mut docs,
                key,
                stored.as_ref().map(|s| s.body.as_str()),
                stored.as_ref().map_or(0, |s| s.created),
            );
        }
        Ok(self.publish(store, last, docs, Some(&current)).await)
    }

    /// Names and VIPs for `registry`, stored before any proxy is told of them; sets them in
    /// `config` and returns each resource's status.
    async fn address(
        &self,
        store: &Store,
        registry: &Registry,
        docs: &BTreeMap<Key, Arc<Entry>>,
        config: &mut ProxyConfig,
    ) -> Arc<BTreeMap<Key, naming::Status>> {
        // Most writes change what services do, not what they are called: with the same names
        // asked for by the same resources, created in the same order, the names, VIPs and
        // status stay as they are, and the write does not pay for working them out again.
        let current = self.view();
        let same_documents = || {
            docs.len() == current.docs.len()
                && docs
                    .iter()
                    .zip(current.docs.iter())
                    .all(|((k, e), (ck, ce))| k == ck && e.created == ce.created)
        };
        let settled = {
            // VIPs not yet stored (the store failed, or another control plane kept winning)
            // are worked out and saved again.
            let vips = self.vips.lock().await;
            vips.stale.is_empty() && vips.version.is_some()
        };
        if settled && current.registry.naming == registry.naming && same_documents() {
            config.virtual_ips = current.config.virtual_ips.clone();
            config.vip_ranges = current.config.vip_ranges.clone();
            return current.status.clone();
        }
        let created = |o: &Origin| {
            docs.get(&Key {
                kind: o.kind.to_string(),
                mesh: o.key.mesh.clone(),
                name: o.key.name.clone(),
            })
            .map_or(i64::MAX, |e| e.created)
        };
        let mut vips = self.vips.lock().await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut addressed = Addressed::default();
        // Another control plane may have given out addresses since they were read: read them
        // again and redo, a few times.
        for _ in 0..5 {
            if vips.version.is_none() {
                if let Err(e) = reload(store, &mut vips).await {
                    tracing::error!(error = %e, "cannot read the stored VIPs");
                }
            }
            let mut pool = vips.pool.clone();
            // The owners are worked out again for another try rather than kept while the VIPs
            // are stored: at 10,000 services they are 10 MiB.
            addressed = naming::address(naming::owners(&registry.naming, &created), &mut pool, now);
            let mut changed = changes(&vips.pool, &pool);
            changed.extend(vips.stale.iter().map(|ip| VipRow {
                ip: ip.clone(),
                owner: None,
                held_until: None,
            }));
            // Unreadable store: served from memory; the next change tries again.
            let Some(version) = vips.version else { break };
            if changed.is_empty() {
                vips.pool = pool;
                break;
            }
            match store.save_vips(version, &changed).await {
                Ok(version) => {
                    *vips = Vips {
                        pool,
                        version: Some(version),
                        stale: Vec::new(),
                    };
                    break;
                }
                Err(StoreError::StaleVips { .. }) => vips.version = None,
                Err(e) => {
                    tracing::error!(error = %e, "cannot store VIPs; they may change at restart");
                    vips.version = None;
                    break;
                }
            }
        }
        for e in &addressed.errors {
            tracing::error!("{e}");
        }
        config.virtual_ips = Arc::new(std::mem::take(&mut addressed.virtual_ips));
        config.vip_ranges = vec![vips.pool.range()];
        Arc::new(
            addressed
                .status
                .into_iter()
                .map(|(o, v)| {
                    (
                        Key {
                            kind: o.kind.to_string(),
                            mesh: o.key.mesh,
                            name: o.key.name,
                        },
                        v,
                    )
                })
                .collect(),
        )
    }

    async fn publish(
        &self,
        store: &Store,
        revision: i64,
        docs: BTreeMap<Key, Arc<Entry>>,
        previous: Option<&View>,
    ) -> Arc<View> {
        let loaded = sluice_api::resolve(docs.values().map(|e| &e.parsed));
        let errors = loaded.errors().map(ToString::to_string).collect();
        let registry = match loaded.registry {
            Some(r) => Arc::new(r),
            None => {
                // Only possible if stored resources stopped being valid together (a newer
                // release reading an older store): keep enforcing the last good registry.
                for d in loaded.errors() {
                    tracing::error!("stored resource: {d}");
                }
                previous.map(|p| p.registry.clone()).unwrap_or_default()
            }
        };
        let (config, status) = match previous {
            Some(p) if Arc::ptr_eq(&p.registry, &registry) => (p.config.clone(), p.status.clone()),
            _ => {
                let mut config = compile(&registry);
                let status = self.address(store, &registry, &docs, &mut config).await;
                (Arc::new(config), status)
            }
        };
        self.install(View {
            revision,
            docs,
            registry,
            config,
            mesh_scopes: Default::default(),
            vip_index: Default::default(),
            errors,
            status,
        })
    }

    /// Makes `view` the current one.
    fn install(&self, view: View) -> Arc<View> {
        let view = Arc::new(view);
        retire(self.view.send_replace(view.clone()));
        view
    }

    /// Follows the store until the process ends: every notified change (from this process or,
    /// on PostgreSQL, from any replica) is read and published; a slow timer catches anything a
    /// lost notification would miss.
    pub async fn follow(self: Arc<Self>, store: Arc<Store>) {
        let mut changes = store.watch();
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // One sync reads every change announced so far.
                _ = changes.recv() => while changes.try_recv().is_ok() {},
                _ = tick.tick() => {}
            }
            if let Err(e) = self.sync(&store).await {
                tracing::warn!(error = %e, "cannot read changes from the store; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Lets go of a replaced view off the async threads: freeing a large registry takes
/// milliseconds that the next change should not wait for.
fn retire(old: Arc<View>) {
    if Arc::strong_count(&old) == 1 {
        tokio::task::spawn_blocking(move || drop(old));
    }
}

/// The pool as stored, read again.
async fn reload(store: &Store, vips: &mut Vips) -> Result<(), StoreError> {
    let stored = store.vips().await?;
    let mut pool = Pool::new(vips.pool.range()).map_err(|e| StoreError::Config(e.to_string()))?;
    let mut stale = Vec::new();
    for row in stored.rows {
        let Ok(ip) = row.ip.parse() else {
            stale.push(row.ip);
            continue;
        };
        match (&row.owner, row.held_until) {
            (Some(owner), _) => {
                if !pool.restore(owner, ip) {
                    tracing::warn!(%ip, %owner, range = %pool.range(), "stored VIP is outside the range; its owner gets a new one");
                    stale.push(row.ip);
                }
            }
            (None, Some(until)) => pool.restore_hold(ip, u64::try_from(until).unwrap_or(0)),
            (None, None) => {}
        }
    }
    *vips = Vips {
        pool,
        version: Some(stored.version),
        stale,
    };
    Ok(())
}

/// The rows to save to go from `before` to `after`.
fn changes(before: &Pool, after: &Pool) -> Vec<VipRow> {
    let (old, new) = (before.state(), after.state());
    let mut rows = Vec::new();
    for ip in old.keys().chain(new.keys()).collect::<BTreeSet<_>>() {
        let (o, n) = (old.get(ip), new.get(ip));
        if o == n {
            continue;
        }
        let (owner, held) = n.copied().unwrap_or((None, None));
        rows.push(VipRow {
            ip: ip.to_string(),
            owner: owner.map(str::to_string),
            held_until: held.and_then(|h| i64::try_from(h).ok()),
        });
    }
    rows
}

/// `docs` with `key` as `body` says (absent when `None`, or when it is not one document).
fn change(docs: &mut BTreeMap<Key, Arc<Entry>>, key: &Key, body: Option<&str>, created: i64) {
    match body.and_then(|b| parse(key, b, created)) {
        Some(entry) => docs.insert(key.clone(), entry),
        None => docs.remove(key),
    };
}

fn parse(key: &Key, body: &str, created: i64) -> Option<Arc<Entry>> {
    let source = format!("{}/{}/{}", key.kind, key.mesh, key.name);
    match parse_documents(&source, body) {
        Ok(mut docs) if docs.len() == 1 => docs.pop().map(|doc| {
            Arc::new(Entry {
                parsed: sluice_api::parse(&doc),
                created,
            })
        }),
        Ok(_) | Err(_) => {
            tracing::error!(resource = %source, "stored resource is not one YAML document; ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store in a fresh directory, which the caller removes.
    async fn temp_store(name: &str) -> (std::path::PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!(
            "sluice-catalog-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.join("db").display()))
            .await
            .unwrap();
        (dir, store)
    }

    /// A VIP outlives a restart; after the range changes, its owner is stored with an address
    /// of the new range and the old row is gone.
    #[tokio::test]
    async fn vips_survive_restarts_and_follow_a_new_range() {
        let (dir, store) = temp_store("vips").await;
        let key = Key {
            kind: "MeshExternalService".into(),
            mesh: "default".into(),
            name: "api".into(),
        };
        let body = "type: MeshExternalService\nname: api\nspec:\n  match: {port: 80}\n  endpoints: [{address: api.example, port: 80}]\n";
        store.put(&key, body, None).await.unwrap();
        let vip = |view: &View| {
            view.status[&key].to_json()["vip"]["ip"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let first = Catalog::load(&store).await.unwrap();
        assert_eq!(vip(&first.view()), "242.0.0.1");
        assert_eq!(
            first.view().config.virtual_ips[0].names,
            ["api.extsvc.mesh.local"]
        );
        drop(first);
        assert_eq!(
            vip(&Catalog::load(&store).await.unwrap().view()),
            "242.0.0.1"
        );
        let range = Cidr::parse("10.250.0.0/24").unwrap();
        let moved = Catalog::load_with(&store, range).await.unwrap();
        assert_eq!(vip(&moved.view()), "10.250.0.1");
        let rows: Vec<(String, Option<String>)> = store
            .vips()
            .await
            .unwrap()
            .rows
            .into_iter()
            .map(|r| (r.ip, r.owner))
            .collect();
        assert_eq!(
            rows,
            [(
                "10.250.0.1".to_string(),
                Some("MeshExternalService/default/api".to_string())
            )]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A write that changes no name keeps the names, VIPs and status as they were (the same
    /// status, not worked out again); one that adds a service gives it its own.
    #[tokio::test]
    async fn names_are_worked_out_again_only_when_they_can_change() {
        let (dir, store) = temp_store("naming").await;
        let key = |name: &str| Key {
            kind: "MeshExternalService".into(),
            mesh: "default".into(),
            name: name.into(),
        };
        let body = |name: &str, host: &str| {
            format!("type: MeshExternalService\nname: {name}\nspec:\n  match: {{port: 80}}\n  endpoints: [{{address: {host}, port: 80}}]\n")
        };
        store
            .put(&key("api"), &body("api", "a.example"), None)
            .await
            .unwrap();
        let catalog = Catalog::load(&store).await.unwrap();
        let first = catalog.view();
        let vip = |view: &View, name: &str| {
            view.status[&key(name)].to_json()["vip"]["ip"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(vip(&first, "api"), "242.0.0.1");

        store
            .put(&key("api"), &body("api", "b.example"), None)
            .await
            .unwrap();
        let moved = catalog.sync(&store).await.unwrap();
        assert_eq!(moved.config.services.len(), 1);
        assert!(Arc::ptr_eq(&first.status, &moved.status));
        assert_eq!(moved.config.virtual_ips, first.config.virtual_ips);

        store
            .put(&key("web"), &body("web", "w.example"), None)
            .await
            .unwrap();
        let added = catalog.sync(&store).await.unwrap();
        assert_eq!(vip(&added, "api"), "242.0.0.1");
        assert_eq!(vip(&added, "web"), "242.0.0.2");
        let names: Vec<&str> = added
            .config
            .virtual_ips
            .iter()
            .flat_map(|v| v.names.iter().map(String::as_str))
            .collect();
        assert_eq!(names, ["api.extsvc.mesh.local", "web.extsvc.mesh.local"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Writes landing while the catalog syncs are all read, however they interleave.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn syncing_during_writes_misses_none() {
        let (dir, store) = temp_store("sync").await;
        let store = Arc::new(store);
        let catalog = Arc::new(Catalog::load(&store).await.unwrap());
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..300 {
                    let key = Key {
                        kind: "Secret".into(),
                        mesh: "default".into(),
                        name: format!("s{i}"),
                    };
                    let body = format!("type: Secret\nname: s{i}\ndata: YQ==\n");
                    store.put(&key, &body, None).await.unwrap();
                }
            })
        };
        while !writer.is_finished() {
            catalog.sync(&store).await.unwrap();
        }
        writer.await.unwrap();
        let view = catalog.sync(&store).await.unwrap();
        assert_eq!(view.docs.len(), 300);
        assert_eq!(view.revision, store.revision().await.unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
