//! The same store on PostgreSQL, for several control-plane replicas sharing one database. Writes
//! take a transaction-scoped advisory lock so revisions commit in the order they are numbered,
//! and announce themselves with NOTIFY so every replica's watchers see every change.

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use tokio::sync::broadcast;

use crate::{
    event, listed, sql, stale, stored, write_in, Change, Event, EventRow, Key, ListedRow,
    StoreError, Stored, StoredRow, VipDbRow, VipRow, Vips, Written, SCHEMA_VERSION,
};

/// The same migrations as SQLite's, in PostgreSQL's dialect, with the same version numbers.
const MIGRATIONS: &[(i64, &[&str])] = &[
    (
        1,
        &[
            "CREATE TABLE resources (
            kind TEXT NOT NULL, mesh TEXT NOT NULL, name TEXT NOT NULL,
            body TEXT NOT NULL, version BIGINT NOT NULL, revision BIGINT NOT NULL,
            PRIMARY KEY (kind, mesh, name))",
            "CREATE TABLE events (
            revision BIGSERIAL PRIMARY KEY,
            kind TEXT NOT NULL, mesh TEXT NOT NULL, name TEXT NOT NULL, deleted BOOLEAN NOT NULL)",
        ],
    ),
    (2, crate::MIGRATION_2),
];

const _: () = assert!(MIGRATIONS[MIGRATIONS.len() - 1].0 == SCHEMA_VERSION);

/// The NOTIFY channel changes are announced on.
const CHANNEL: &str = "sluice_changes";
/// The advisory lock that orders writers (any fixed number).
const WRITE_LOCK: i64 = 0x51_1ce;

pub struct PgStore {
    pool: PgPool,
    pub(crate) changes: broadcast::Sender<Event>,
}

impl PgStore {
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new().max_connections(8).connect(url).await?;
        // Replicas may start together: one migrates at a time.
        let mut tx = locked(&pool).await?;
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
        let store = Self { pool, changes };
        store.follow_notifications(url).await?;
        Ok(store)
    }

    /// Relays every replica's committed changes to this process's watchers, in revision order.
    async fn follow_notifications(&self, url: &str) -> Result<(), StoreError> {
        let mut listener = PgListener::connect(url).await?;
        listener.listen(CHANNEL).await?;
        let pool = self.pool.clone();
        let changes = self.changes.clone();
        let mut last = revision(&pool).await?;
        tokio::spawn(async move {
            loop {
                // A dropped connection is re-established by the listener; anything missed
                // meanwhile is read back from the events table.
                if listener.recv().await.is_err() {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                match events_since(&pool, last).await {
                    Ok(events) => {
                        for e in events {
                            last = e.revision;
                            let _ = changes.send(e);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "reading changes from PostgreSQL failed"),
                }
            }
        });
        Ok(())
    }

    pub async fn write(
        &self,
        changes: &[Change],
        expected_revision: Option<i64>,
    ) -> Result<Vec<Written>, StoreError> {
        let mut tx = locked(&self.pool).await?;
        stale(expected_revision, revision(&mut *tx).await?)?;
        let mut done = Vec::with_capacity(changes.len());
        for change in changes {
            done.push(write_in::<Postgres>(&mut tx, change).await?);
        }
        if let Some(last) = done.iter().filter_map(Written::revision).max() {
            // Delivered at commit: every replica reads the events it has not seen.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(last.to_string())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
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
        events_since(&self.pool, revision).await
    }

    pub async fn revision(&self) -> Result<i64, StoreError> {
        revision(&self.pool).await
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

    /// Under the write lock, so replicas saving at once are ordered.
    pub async fn save_vips(
        &self,
        expected_version: i64,
        changed: &[VipRow],
    ) -> Result<i64, StoreError> {
        let mut tx = locked(&self.pool).await?;
        let version = crate::save_vips_in::<Postgres>(&mut tx, expected_version, changed).await?;
        tx.commit().await?;
        Ok(version)
    }
}

/// A transaction holding the write lock until it ends.
async fn locked(pool: &PgPool) -> Result<Transaction<'static, Postgres>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(WRITE_LOCK)
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

async fn revision<'e>(db: impl sqlx::PgExecutor<'e>) -> Result<i64, StoreError> {
    let (revision,): (i64,) = sqlx::query_as(sql::REVISION).fetch_one(db).await?;
    Ok(revision)
}

async fn events_since(pool: &PgPool, revision: i64) -> Result<Vec<Event>, StoreError> {
    let rows: Vec<EventRow> = sqlx::query_as(sql::EVENTS_SINCE)
        .bind(revision)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(event).collect())
}
