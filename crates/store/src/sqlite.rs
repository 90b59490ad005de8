//! The store on SQLite, the embedded default: one file, one connection (one writer is what
//! SQLite allows anyway), changes announced to this process's watchers after they commit.

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Sqlite, SqlitePool};
use tokio::sync::broadcast;

use crate::{
    event, listed, sql, stale, stored, write_in, Change, Event, EventRow, Key, ListedRow,
    StoreError, Stored, StoredRow, VipDbRow, VipRow, Vips, Written, SCHEMA_VERSION,
};

/// Migrations by schema version, applied in order on open; a database records the last one it
/// has, so each runs exactly once. New ones are appended, never edited.
const MIGRATIONS: &[(i64, &[&str])] = &[
    (
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
    ),
    (2, crate::MIGRATION_2),
];

const _: () = assert!(MIGRATIONS[MIGRATIONS.len() - 1].0 == SCHEMA_VERSION);

pub struct SqliteStore {
    pool: SqlitePool,
    pub(crate) changes: broadcast::Sender<Event>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(5))
            // The catalog keeps every resource parsed in memory and the file stays in the
            // kernel's page cache, so SQLite's own cache would hold a third copy: its default
            // of 2 MB fills once a large registry is loaded.
            .pragma("cache_size", "-256");
        // A single connection keeps read-modify-write sequences simple and ordered.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        let mut tx = pool.begin().await?;
        sqlx::query(sql::SCHEMA_TABLE).execute(&mut *tx).await?;
        let (current,): (i64,) = sqlx::query_as(sql::SCHEMA_VERSION)
            .fetch_one(&mut *tx)
            .await?;
        for (version, statements) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            for statement in *statements {
                sqlx::query(*statement).execute(&mut *tx).await?;
            }
            sqlx::query(sql::RECORD_VERSION)
                .bind(version)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let (changes, _) = broadcast::channel(1024);
        Ok(Self { pool, changes })
    }

    pub async fn write(
        &self,
        changes: &[Change],
        expected_revision: Option<i64>,
    ) -> Result<Vec<Written>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (current,): (i64,) = sqlx::query_as(sql::REVISION).fetch_one(&mut *tx).await?;
        stale(expected_revision, current)?;
        let mut done = Vec::with_capacity(changes.len());
        let mut events = Vec::new();
        for change in changes {
            let written = write_in::<Sqlite>(&mut tx, change).await?;
            if let Some(revision) = written.revision() {
                events.push(Event {
                    revision,
                    key: change.key.clone(),
                    deleted: change.body.is_none(),
                });
            }
            done.push(written);
        }
        if events.is_empty() {
            return Ok(done);
        }
        tx.commit().await?;
        for e in events {
            let _ = self.changes.send(e);
        }
        Ok(done)
    }

    pub async fn get(&self, key: &Key) -> Result<Option<Stored>, StoreError> {
        let row: Option<StoredRow> = sqlx::query_as(sql::GET)
            .bind(&key.kind)
            .bind(&key.mesh)
            .bind(&key.name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| stored(key, row)))
    }

    pub async fn list(&self, kind: &str, mesh: Option<&str>) -> Result<Vec<Stored>, StoreError> {
        let rows: Vec<ListedRow> = sqlx::query_as(sql::LIST)
            .bind(kind)
            .bind(mesh)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|row| listed(kind, row)).collect())
    }

    pub async fn events_since(&self, revision: i64) -> Result<Vec<Event>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(sql::EVENTS_SINCE)
            .bind(revision)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(event).collect())
    }

    pub async fn vips(&self) -> Result<Vips, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (version,): (i64,) = sqlx::query_as(sql::VIP_VERSION).fetch_one(&mut *tx).await?;
        let rows: Vec<VipDbRow> = sqlx::query_as(sql::VIPS).fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(Vips {
            version,
            rows: rows.into_iter().map(crate::vip_row).collect(),
        })
    }

    pub async fn save_vips(
        &self,
        expected_version: i64,
        changed: &[VipRow],
    ) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let version = crate::save_vips_in::<Sqlite>(&mut tx, expected_version, changed).await?;
        tx.commit().await?;
        Ok(version)
    }

    pub async fn revision(&self) -> Result<i64, StoreError> {
        let (revision,): (i64,) = sqlx::query_as(sql::REVISION).fetch_one(&self.pool).await?;
        Ok(revision)
    }
}
