#![forbid(unsafe_code)]
//! The registry's storage: every resource by kind, mesh and name, with a version per resource for
//! optimistic concurrency and a store-wide revision per change, so that readers can follow every
//! change in order. SQLite is the embedded default; PostgreSQL serves several control-plane
//! replicas.

mod postgres;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use std::path::Path;

use tokio::sync::broadcast;

/// Where a resource is: kind, mesh and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub kind: String,
    pub mesh: String,
    pub name: String,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.mesh, self.name)
    }
}

/// A stored resource: the document as applied, its version and the revision that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub key: Key,
    pub body: String,
    /// Starts at 1 and grows by one with every change to this resource.
    pub version: i64,
    /// The store-wide revision of the last change.
    pub revision: i64,
    /// The revision that created it (0 for resources stored before this was recorded): of two
    /// resources claiming one generated name, the one created first keeps it.
    pub created: i64,
}

/// One virtual IP as stored: handed to `owner`, or held back after release until `held_until`
/// (seconds since the Unix epoch) so that cached DNS answers expire before it is reused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VipRow {
    pub ip: String,
    pub owner: Option<String>,
    pub held_until: Option<i64>,
}

/// Every stored VIP with the version of the set, for [`Store::save_vips`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vips {
    pub version: i64,
    pub rows: Vec<VipRow>,
}

/// What a put did, in the words `kubectl apply` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        }
    }
}

/// One change, in revision order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub revision: i64,
    pub key: Key,
    pub deleted: bool,
}

/// One part of a [`Store::write`]: create or replace `key` with `body`, or delete it (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: Key,
    pub body: Option<String>,
    /// Only if the stored version is this one (0: only if there is none).
    pub expected_version: Option<i64>,
}

/// What one [`Change`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    Put(Outcome, Placed),
    Deleted {
        revision: i64,
    },
    /// A delete of something that was not there.
    Absent,
}

/// Where a put left its resource: what [`Stored`] says but the body, which is the change's
/// (a write of 10,000 resources would otherwise hand back a copy of every body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub key: Key,
    pub version: i64,
    pub revision: i64,
    pub created: i64,
}

impl Placed {
    fn stored(self, body: String) -> Stored {
        Stored {
            key: self.key,
            body,
            version: self.version,
            revision: self.revision,
            created: self.created,
        }
    }
}

impl Written {
    /// The revision this change made, if it changed anything.
    pub fn revision(&self) -> Option<i64> {
        match self {
            Written::Put(Outcome::Unchanged, _) | Written::Absent => None,
            Written::Put(_, stored) => Some(stored.revision),
            Written::Deleted { revision } => Some(*revision),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{key} is at version {current}, not {expected}: read it again and retry")]
    Conflict {
        key: Key,
        expected: i64,
        current: i64,
    },
    /// The store moved on from the revision a write was checked against.
    #[error("the store is at revision {current}, not {expected}: check the write again")]
    Stale { expected: i64, current: i64 },
    /// Another control plane changed the VIPs since they were read.
    #[error("the VIPs are at version {current}, not {expected}: read them again")]
    StaleVips { expected: i64, current: i64 },
    #[error("store: {0}")]
    Database(#[from] sqlx::Error),
    #[error("store {0:?}: give sqlite://PATH or postgres://USER@HOST:PORT/DATABASE")]
    Url(String),
    /// A setting the store's user was given cannot work (a VIP range too small, say).
    #[error("{0}")]
    Config(String),
}

/// The schema version a database has after its migrations.
pub const SCHEMA_VERSION: i64 = 2;

/// A store of either kind, chosen by URL.
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl Store {
    /// `sqlite://PATH` (created if missing) or `postgres://...` / `postgresql://...`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            return Ok(Store::Sqlite(SqliteStore::open(Path::new(path)).await?));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Store::Postgres(PgStore::open(url).await?));
        }
        Err(StoreError::Url(redact_url(url)))
    }

    /// Several changes as one transaction: all of them, or none if any fails. With
    /// `expected_revision`, only if no other write came after that revision, so that what was
    /// checked against it is still what it is written over.
    pub async fn write(
        &self,
        changes: &[Change],
        expected_revision: Option<i64>,
    ) -> Result<Vec<Written>, StoreError> {
        match self {
            Store::Sqlite(s) => s.write(changes, expected_revision).await,
            Store::Postgres(s) => s.write(changes, expected_revision).await,
        }
    }

    /// Creates or replaces one resource (see [`Change::expected_version`]).
    pub async fn put(
        &self,
        key: &Key,
        body: &str,
        expected_version: Option<i64>,
    ) -> Result<(Outcome, Stored), StoreError> {
        let change = Change {
            key: key.clone(),
            body: Some(body.to_string()),
            expected_version,
        };
        match self.write(&[change], None).await?.pop() {
            Some(Written::Put(outcome, placed)) => Ok((outcome, placed.stored(body.to_string()))),
            _ => unreachable!("a put writes a put"),
        }
    }

    /// Several puts as one write.
    pub async fn put_all(
        &self,
        items: &[(Key, String)],
    ) -> Result<Vec<(Outcome, Stored)>, StoreError> {
        let changes: Vec<Change> = items
            .iter()
            .map(|(key, body)| Change {
                key: key.clone(),
                body: Some(body.clone()),
                expected_version: None,
            })
            .collect();
        Ok(self
            .write(&changes, None)
            .await?
            .into_iter()
            .zip(items)
            .filter_map(|(w, (_, body))| match w {
                Written::Put(outcome, placed) => Some((outcome, placed.stored(body.clone()))),
                _ => None,
            })
            .collect())
    }

    /// Removes a resource; `false` if there was none.
    pub async fn delete(&self, key: &Key) -> Result<bool, StoreError> {
        let change = Change {
            key: key.clone(),
            body: None,
            expected_version: None,
        };
        let written = self.write(&[change], None).await?;
        Ok(matches!(written.as_slice(), [Written::Deleted { .. }]))
    }

    pub async fn get(&self, key: &Key) -> Result<Option<Stored>, StoreError> {
        match self {
            Store::Sqlite(s) => s.get(key).await,
            Store::Postgres(s) => s.get(key).await,
        }
    }

    /// Every resource of `kind` (in every mesh, or one), ordered by mesh and name.
    pub async fn list(&self, kind: &str, mesh: Option<&str>) -> Result<Vec<Stored>, StoreError> {
        match self {
            Store::Sqlite(s) => s.list(kind, mesh).await,
            Store::Postgres(s) => s.list(kind, mesh).await,
        }
    }

    /// The changes after `revision`, in order: what a watcher missed.
    pub async fn events_since(&self, revision: i64) -> Result<Vec<Event>, StoreError> {
        match self {
            Store::Sqlite(s) => s.events_since(revision).await,
            Store::Postgres(s) => s.events_since(revision).await,
        }
    }

    /// Every VIP handed out or held back.
    pub async fn vips(&self) -> Result<Vips, StoreError> {
        match self {
            Store::Sqlite(s) => s.vips().await,
            Store::Postgres(s) => s.vips().await,
        }
    }

    /// Replaces the rows of `changed` IPs (a row without owner and hold is deleted), only if
    /// the set is still at `expected_version`: two control planes allocating at once cannot
    /// hand one address to two services. Returns the new version.
    pub async fn save_vips(
        &self,
        expected_version: i64,
        changed: &[VipRow],
    ) -> Result<i64, StoreError> {
        match self {
            Store::Sqlite(s) => s.save_vips(expected_version, changed).await,
            Store::Postgres(s) => s.save_vips(expected_version, changed).await,
        }
    }

    /// The latest revision (0 for an empty store).
    pub async fn revision(&self) -> Result<i64, StoreError> {
        match self {
            Store::Sqlite(s) => s.revision().await,
            Store::Postgres(s) => s.revision().await,
        }
    }

    /// Changes as they are committed: by this process (SQLite) or by any replica
    /// (PostgreSQL). A receiver that lags behind is told so and catches up with
    /// [`Store::events_since`].
    pub fn watch(&self) -> broadcast::Receiver<Event> {
        match self {
            Store::Sqlite(s) => s.changes.subscribe(),
            Store::Postgres(s) => s.changes.subscribe(),
        }
    }
}

/// A store URL with any password left out, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// The statements both backends run, in the `$N` parameters both accept.
mod sql {
    pub const GET: &str =
        "SELECT body, version, revision, created FROM resources WHERE kind = $1 AND mesh = $2 AND name = $3";
    pub const LIST: &str = "SELECT mesh, name, body, version, revision, created FROM resources
        WHERE kind = $1 AND (CAST($2 AS TEXT) IS NULL OR mesh = $2) ORDER BY mesh, name";
    pub const UPSERT: &str =
        "INSERT INTO resources (kind, mesh, name, body, version, revision, created)
        VALUES ($1, $2, $3, $4, $5, $6, $6)
        ON CONFLICT (kind, mesh, name) DO UPDATE
        SET body = excluded.body, version = excluded.version, revision = excluded.revision";
    pub const DELETE: &str = "DELETE FROM resources WHERE kind = $1 AND mesh = $2 AND name = $3";
    pub const INSERT_EVENT: &str =
        "INSERT INTO events (kind, mesh, name, deleted) VALUES ($1, $2, $3, $4) RETURNING revision";
    pub const EVENTS_SINCE: &str =
        "SELECT revision, kind, mesh, name, deleted FROM events WHERE revision > $1 ORDER BY revision";
    pub const REVISION: &str = "SELECT COALESCE(MAX(revision), 0) FROM events";
    pub const SCHEMA_TABLE: &str =
        "CREATE TABLE IF NOT EXISTS sluice_schema (version BIGINT NOT NULL)";
    pub const SCHEMA_VERSION: &str = "SELECT COALESCE(MAX(version), 0) FROM sluice_schema";
    pub const RECORD_VERSION: &str = "INSERT INTO sluice_schema (version) VALUES ($1)";
    pub const VIPS: &str = "SELECT ip, owner, held_until FROM vips ORDER BY ip";
    pub const VIP_VERSION: &str = "SELECT version FROM vip_state";
    pub const BUMP_VIP_VERSION: &str = "UPDATE vip_state SET version = version + 1";
    pub const DELETE_VIP: &str = "DELETE FROM vips WHERE ip = $1";
    pub const INSERT_VIP: &str = "INSERT INTO vips (ip, owner, held_until) VALUES ($1, $2, $3)";
}

/// Migration 2 on either backend: when each resource was created, and the VIP table.
pub(crate) const MIGRATION_2: &[&str] = &[
    "ALTER TABLE resources ADD COLUMN created BIGINT NOT NULL DEFAULT 0",
    "UPDATE resources SET created = revision",
    "CREATE TABLE vips (ip TEXT PRIMARY KEY, owner TEXT UNIQUE, held_until BIGINT)",
    "CREATE TABLE vip_state (version BIGINT NOT NULL)",
    "INSERT INTO vip_state (version) VALUES (0)",
];

/// [`Store::save_vips`] inside a transaction the caller holds, on either backend.
pub(crate) async fn save_vips_in<DB>(
    conn: &mut DB::Connection,
    expected_version: i64,
    changed: &[VipRow],
) -> Result<i64, StoreError>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'r> (i64,): sqlx::FromRow<'r, DB::Row>,
{
    let (current,): (i64,) = sqlx::query_as(sql::VIP_VERSION)
        .fetch_one(&mut *conn)
        .await?;
    if current != expected_version {
        return Err(StoreError::StaleVips {
            expected: expected_version,
            current,
        });
    }
    // Deletes first: an owner may move from one row to another in the same save.
    for row in changed {
        sqlx::query(sql::DELETE_VIP)
            .bind(row.ip.as_str())
            .execute(&mut *conn)
            .await?;
    }
    for row in changed
        .iter()
        .filter(|r| r.owner.is_some() || r.held_until.is_some())
    {
        sqlx::query(sql::INSERT_VIP)
            .bind(row.ip.as_str())
            .bind(row.owner.as_deref())
            .bind(row.held_until)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query(sql::BUMP_VIP_VERSION)
        .execute(&mut *conn)
        .await?;
    Ok(current + 1)
}

pub(crate) type VipDbRow = (String, Option<String>, Option<i64>);

pub(crate) fn vip_row((ip, owner, held_until): VipDbRow) -> VipRow {
    VipRow {
        ip,
        owner,
        held_until,
    }
}

/// Rows as both backends return them.
type StoredRow = (String, i64, i64, i64);
type ListedRow = (String, String, String, i64, i64, i64);
type EventRow = (i64, String, String, String, bool);

fn stored(key: &Key, (body, version, revision, created): StoredRow) -> Stored {
    Stored {
        key: key.clone(),
        body,
        version,
        revision,
        created,
    }
}

fn listed(kind: &str, (mesh, name, body, version, revision, created): ListedRow) -> Stored {
    Stored {
        key: Key {
            kind: kind.to_string(),
            mesh,
            name,
        },
        body,
        version,
        revision,
        created,
    }
}

fn event((revision, kind, mesh, name, deleted): EventRow) -> Event {
    Event {
        revision,
        key: Key { kind, mesh, name },
        deleted,
    }
}

/// One change inside a write's transaction, on either backend: read what is there, decide with
/// [`plan`], record the event and write (or delete) the resource.
async fn write_in<DB>(conn: &mut DB::Connection, change: &Change) -> Result<Written, StoreError>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> bool: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'r> StoredRow: sqlx::FromRow<'r, DB::Row>,
    for<'r> (i64,): sqlx::FromRow<'r, DB::Row>,
{
    let key = &change.key;
    let (kind, mesh, name) = (key.kind.as_str(), key.mesh.as_str(), key.name.as_str());
    let current: Option<StoredRow> = sqlx::query_as(sql::GET)
        .bind(kind)
        .bind(mesh)
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
    let deleted = change.body.is_none();
    let (outcome, version) = match &change.body {
        None if current.is_none() => return Ok(Written::Absent),
        None => {
            sqlx::query(sql::DELETE)
                .bind(kind)
                .bind(mesh)
                .bind(name)
                .execute(&mut *conn)
                .await?;
            (None, 0)
        }
        Some(body) => match plan(key, body, change.expected_version, current.clone())? {
            Plan::Keep(placed) => return Ok(Written::Put(Outcome::Unchanged, placed)),
            Plan::Write { outcome, version } => (Some(outcome), version),
        },
    };
    let (revision,): (i64,) = sqlx::query_as(sql::INSERT_EVENT)
        .bind(kind)
        .bind(mesh)
        .bind(name)
        .bind(deleted)
        .fetch_one(&mut *conn)
        .await?;
    let (Some(outcome), Some(body)) = (outcome, &change.body) else {
        return Ok(Written::Deleted { revision });
    };
    let created = current.map_or(revision, |c| c.3);
    sqlx::query(sql::UPSERT)
        .bind(kind)
        .bind(mesh)
        .bind(name)
        .bind(body.as_str())
        .bind(version)
        .bind(revision)
        .execute(&mut *conn)
        .await?;
    Ok(Written::Put(
        outcome,
        Placed {
            key: key.clone(),
            version,
            revision,
            created,
        },
    ))
}

/// The refusal of a write checked against `expected`, the store being at `current`.
fn stale(expected: Option<i64>, current: i64) -> Result<(), StoreError> {
    match expected {
        Some(expected) if expected != current => Err(StoreError::Stale { expected, current }),
        _ => Ok(()),
    }
}

/// What a write of `body` should do, given the stored `(body, version, revision)` if any: the
/// rules both backends share.
pub(crate) enum Plan {
    Keep(Placed),
    Write { outcome: Outcome, version: i64 },
}

pub(crate) fn plan(
    key: &Key,
    body: &str,
    expected_version: Option<i64>,
    current: Option<StoredRow>,
) -> Result<Plan, StoreError> {
    let current_version = current.as_ref().map_or(0, |c| c.1);
    if let Some(expected) = expected_version.filter(|e| *e != current_version) {
        return Err(StoreError::Conflict {
            key: key.clone(),
            expected,
            current: current_version,
        });
    }
    Ok(match current {
        Some((stored, version, revision, created)) if stored == body => Plan::Keep(Placed {
            key: key.clone(),
            version,
            revision,
            created,
        }),
        Some(_) => Plan::Write {
            outcome: Outcome::Configured,
            version: current_version + 1,
        },
        None => Plan::Write {
            outcome: Outcome::Created,
            version: 1,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("sqlite://./x.db"), "sqlite://./x.db");
        let err = StoreError::Url(redact_url("postgress://u:pw@h/db"));
        assert!(!err.to_string().contains("pw"), "{err}");
    }

    #[test]
    fn write_plans() {
        let key = Key {
            kind: "Secret".into(),
            mesh: "default".into(),
            name: "s".into(),
        };
        let stored = || Some(("a".to_string(), 3, 9, 2));
        let show = |r: Result<Plan, StoreError>| match r {
            Ok(Plan::Keep(s)) => format!("keep v{} r{}", s.version, s.revision),
            Ok(Plan::Write { outcome, version }) => format!("{outcome:?} v{version}"),
            Err(StoreError::Conflict { current, .. }) => format!("conflict at v{current}"),
            Err(e) => e.to_string(),
        };
        let cases = [
            (None, None, "b", "Created v1"),
            (None, Some(0), "b", "Created v1"),
            (None, Some(1), "b", "conflict at v0"),
            (stored(), None, "a", "keep v3 r9"),
            (stored(), None, "b", "Configured v4"),
            (stored(), Some(3), "b", "Configured v4"),
            (stored(), Some(2), "b", "conflict at v3"),
            (stored(), Some(2), "a", "conflict at v3"),
        ];
        for (current, expected, body, want) in cases {
            assert_eq!(
                show(plan(&key, body, expected, current.clone())),
                want,
                "{current:?} {expected:?} {body}"
            );
        }
    }
}
