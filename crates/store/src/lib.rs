#![forbid(unsafe_code)]
//! The registry's storage: every resource by kind, mesh and name, with a version per resource for
//! optimistic concurrency and a store-wide revision per change, so that readers can follow every
//! change in order. SQLite is the embedded default; PostgreSQL serves several control-plane
//! replicas.

mod postgres;

pub use postgres::PgStore;

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};
use tokio::sync::broadcast;

/// Where a resource is: kind, mesh and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub kind: String,
    pub mesh: String,
    pub name: String,
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
}

/// What a put did, in the words `kubectl apply` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

/// One change, in revision order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub revision: i64,
    pub key: Key,
    pub deleted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "{kind} {mesh}/{name} is at version {current}, not {expected}: read it again and retry"
    )]
    Conflict {
        kind: String,
        mesh: String,
        name: String,
        expected: i64,
        current: i64,
    },
    #[error("store: {0}")]
    Database(#[from] sqlx::Error),
    #[error("store {0:?}: give sqlite://PATH or postgres://USER@HOST:PORT/DATABASE")]
    Url(String),
}

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
        Err(StoreError::Url(url.to_string()))
    }

    pub async fn put(
        &self,
        key: &Key,
        body: &str,
        expected_version: Option<i64>,
    ) -> Result<(Outcome, Stored), StoreError> {
        match self {
            Store::Sqlite(s) => s.put(key, body, expected_version).await,
            Store::Postgres(s) => s.put(key, body, expected_version).await,
        }
    }

    /// Several writes as one: all of them, or none if any fails.
    pub async fn put_all(
        &self,
        items: &[(Key, String)],
    ) -> Result<Vec<(Outcome, Stored)>, StoreError> {
        match self {
            Store::Sqlite(s) => s.put_all(items).await,
            Store::Postgres(s) => s.put_all(items).await,
        }
    }

    pub async fn get(&self, key: &Key) -> Result<Option<Stored>, StoreError> {
        match self {
            Store::Sqlite(s) => s.get(key).await,
            Store::Postgres(s) => s.get(key).await,
        }
    }

    pub async fn list(&self, kind: &str, mesh: Option<&str>) -> Result<Vec<Stored>, StoreError> {
        match self {
            Store::Sqlite(s) => s.list(kind, mesh).await,
            Store::Postgres(s) => s.list(kind, mesh).await,
        }
    }

    pub async fn delete(&self, key: &Key) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(s) => s.delete(key).await,
            Store::Postgres(s) => s.delete(key).await,
        }
    }

    pub async fn events_since(&self, revision: i64) -> Result<Vec<Event>, StoreError> {
        match self {
            Store::Sqlite(s) => s.events_since(revision).await,
            Store::Postgres(s) => s.events_since(revision).await,
        }
    }

    pub async fn revision(&self) -> Result<i64, StoreError> {
        match self {
            Store::Sqlite(s) => s.revision().await,
            Store::Postgres(s) => s.revision().await,
        }
    }

    pub fn watch(&self) -> broadcast::Receiver<Event> {
        match self {
            Store::Sqlite(s) => s.watch(),
            Store::Postgres(s) => s.watch(),
        }
    }
}

/// What a write of `body` should do, given the stored `(body, version, revision)` if any: the
/// rules both backends share.
pub(crate) enum Plan {
    Keep(Stored),
    Write { outcome: Outcome, version: i64 },
}

pub(crate) fn plan(
    key: &Key,
    body: &str,
    expected_version: Option<i64>,
    current: Option<(String, i64, i64)>,
) -> Result<Plan, StoreError> {
    let current_version = current.as_ref().map_or(0, |c| c.1);
    if let Some(expected) = expected_version.filter(|e| *e != current_version) {
        return Err(StoreError::Conflict {
            kind: key.kind.clone(),
            mesh: key.mesh.clone(),
            name: key.name.clone(),
            expected,
            current: current_version,
        });
    }
    Ok(match current {
        Some((stored, version, revision)) if stored == body => Plan::Keep(Stored {
            key: key.clone(),
            body: stored,
            version,
            revision,
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

/// Migrations by schema version, applied in order on open; a database records the last one it
/// has, so each runs exactly once. New ones are appended, never edited.
const MIGRATIONS: &[(i64, &[&str])] = &[(
    1,
    &[
        "CREATE TABLE resources (
            kind TEXT NOT NULL, mesh TEXT NOT NULL, name TEXT NOT NULL,
            body TEXT NOT NULL, version INTEGER NOT NULL, revision INTEGER NOT NULL,
            PRIMARY KEY (kind, mesh, name))",
        "CREATE TABLE events (
            revision INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL, mesh TEXT NOT NULL, name TEXT NOT NULL, deleted INTEGER NOT NULL)",
    ],
)];

/// The schema version a database has; 0 for a new one.
pub const SCHEMA_VERSION: i64 = 1;

pub struct SqliteStore {
    pool: SqlitePool,
    changes: broadcast::Sender<Event>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(5));
        // One writer at a time is what SQLite allows anyway; a single connection keeps
        // read-modify-write sequences simple and ordered.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        migrate(&pool).await?;
        let (changes, _) = broadcast::channel(1024);
        Ok(Self { pool, changes })
    }

    /// Creates or replaces a resource. With `expected_version`, the write happens only if the
    /// stored version is that one (0 meaning "must not exist yet").
    pub async fn put(
        &self,
        key: &Key,
        body: &str,
        expected_version: Option<i64>,
    ) -> Result<(Outcome, Stored), StoreError> {
        let mut tx = self.pool.begin().await?;
        let (outcome, stored) = put_in(&mut tx, key, body, expected_version).await?;
        if outcome != Outcome::Unchanged {
            tx.commit().await?;
            let _ = self.changes.send(Event {
                revision: stored.revision,
                key: key.clone(),
                deleted: false,
            });
        }
        Ok((outcome, stored))
    }

    /// Several writes as one: all of them, or none if any fails.
    pub async fn put_all(
        &self,
        items: &[(Key, String)],
    ) -> Result<Vec<(Outcome, Stored)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut done = Vec::with_capacity(items.len());
        for (key, body) in items {
            done.push(put_in(&mut tx, key, body, None).await?);
        }
        tx.commit().await?;
        for (outcome, stored) in &done {
            if *outcome != Outcome::Unchanged {
                let _ = self.changes.send(Event {
                    revision: stored.revision,
                    key: stored.key.clone(),
                    deleted: false,
                });
            }
        }
        Ok(done)
    }

    pub async fn get(&self, key: &Key) -> Result<Option<Stored>, StoreError> {
        let row = sqlx::query("SELECT body, version, revision FROM resources WHERE kind = ? AND mesh = ? AND name = ?")
            .bind(&key.kind)
            .bind(&key.mesh)
            .bind(&key.name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| Stored {
            key: key.clone(),
            body: row.get(0),
            version: row.get(1),
            revision: row.get(2),
        }))
    }

    /// Every resource of `kind` (in every mesh, or one), ordered by mesh and name.
    pub async fn list(&self, kind: &str, mesh: Option<&str>) -> Result<Vec<Stored>, StoreError> {
        let rows = sqlx::query(
            "SELECT mesh, name, body, version, revision FROM resources
             WHERE kind = ? AND (? IS NULL OR mesh = ?) ORDER BY mesh, name",
        )
        .bind(kind)
        .bind(mesh)
        .bind(mesh)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| Stored {
                key: Key {
                    kind: kind.to_string(),
                    mesh: row.get(0),
                    name: row.get(1),
                },
                body: row.get(2),
                version: row.get(3),
                revision: row.get(4),
            })
            .collect())
    }

    /// Removes a resource; `false` if there was none.
    pub async fn delete(&self, key: &Key) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let gone = sqlx::query("DELETE FROM resources WHERE kind = ? AND mesh = ? AND name = ?")
            .bind(&key.kind)
            .bind(&key.mesh)
            .bind(&key.name)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        if !gone {
            return Ok(false);
        }
        let revision = insert_event(&mut tx, key, true).await?;
        tx.commit().await?;
        let _ = self.changes.send(Event {
            revision,
            key: key.clone(),
            deleted: true,
        });
        Ok(true)
    }

    /// The changes after `revision`, in order: what a watcher missed.
    pub async fn events_since(&self, revision: i64) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(
            "SELECT revision, kind, mesh, name, deleted FROM events WHERE revision > ? ORDER BY revision",
        )
        .bind(revision)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| Event {
                revision: row.get(0),
                key: Key {
                    kind: row.get(1),
                    mesh: row.get(2),
                    name: row.get(3),
                },
                deleted: row.get::<i64, _>(4) != 0,
            })
            .collect())
    }

    /// The latest revision (0 for an empty store).
    pub async fn revision(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(revision), 0) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get(0))
    }

    /// Changes as they are committed by this process. A receiver that lags behind is told so
    /// and catches up with [`SqliteStore::events_since`].
    pub fn watch(&self) -> broadcast::Receiver<Event> {
        self.changes.subscribe()
    }
}

async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS sluice_schema (version INTEGER NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM sluice_schema")
        .fetch_one(&mut *tx)
        .await?;
    let current: i64 = row.get(0);
    for (version, statements) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        for statement in *statements {
            sqlx::query(*statement).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO sluice_schema (version) VALUES (?)")
            .bind(version)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// One write inside the caller's transaction: what `put` and `put_all` share.
async fn put_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    key: &Key,
    body: &str,
    expected_version: Option<i64>,
) -> Result<(Outcome, Stored), StoreError> {
    let current = sqlx::query(
        "SELECT body, version, revision FROM resources WHERE kind = ? AND mesh = ? AND name = ?",
    )
    .bind(&key.kind)
    .bind(&key.mesh)
    .bind(&key.name)
    .fetch_optional(&mut **tx)
    .await?
    .map(|row| (row.get(0), row.get(1), row.get(2)));
    let (outcome, version) = match crate::plan(key, body, expected_version, current)? {
        crate::Plan::Keep(stored) => return Ok((Outcome::Unchanged, stored)),
        crate::Plan::Write { outcome, version } => (outcome, version),
    };
    let revision = insert_event(tx, key, false).await?;
    sqlx::query(
        "INSERT INTO resources (kind, mesh, name, body, version, revision) VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (kind, mesh, name) DO UPDATE SET body = excluded.body, version = excluded.version, revision = excluded.revision",
    )
    .bind(&key.kind)
    .bind(&key.mesh)
    .bind(&key.name)
    .bind(body)
    .bind(version)
    .bind(revision)
    .execute(&mut **tx)
    .await?;
    Ok((
        outcome,
        Stored {
            key: key.clone(),
            body: body.to_string(),
            version,
            revision,
        },
    ))
}

async fn insert_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    key: &Key,
    deleted: bool,
) -> Result<i64, StoreError> {
    let row = sqlx::query(
        "INSERT INTO events (kind, mesh, name, deleted) VALUES (?, ?, ?, ?) RETURNING revision",
    )
    .bind(&key.kind)
    .bind(&key.mesh)
    .bind(&key.name)
    .bind(i64::from(deleted))
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_plans() {
        let key = Key {
            kind: "Secret".into(),
            mesh: "default".into(),
            name: "s".into(),
        };
        let stored = || Some(("a".to_string(), 3, 9));
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
