//! The same store on PostgreSQL, for several control-plane replicas sharing one database. Writes
//! take a transaction-scoped advisory lock so revisions commit in the order they are numbered,
//! and announce themselves with NOTIFY so every replica's watchers see every change.

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::Row;
use tokio::sync::broadcast;

use crate::{Event, Key, Outcome, StoreError, Stored};

/// The same migrations as SQLite's, in PostgreSQL's dialect, with the same version numbers.
const MIGRATIONS: &[(i64, &[&str])] = &[(
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
)];

/// The NOTIFY channel changes are announced on.
const CHANNEL: &str = "sluice_changes";
/// The advisory lock that orders writers (any fixed number).
const WRITE_LOCK: i64 = 0x51_1ce;

pub struct PgStore {
    pool: PgPool,
    changes: broadcast::Sender<Event>,
}

impl PgStore {
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new().max_connections(8).connect(url).await?;
        // Replicas may start together: one migrates at a time.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITE_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS sluice_schema (version BIGINT NOT NULL)")
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
            sqlx::query("INSERT INTO sluice_schema (version) VALUES ($1)")
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
        let mut last = latest_revision(&pool).await?;
        tokio::spawn(async move {
            loop {
                // A dropped connection is re-established by the listener; anything missed
                // meanwhile is read back from the events table.
                if listener.recv().await.is_err() {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                match events_after(&pool, last).await {
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

    pub async fn put(
        &self,
        key: &Key,
        body: &str,
        expected_version: Option<i64>,
    ) -> Result<(Outcome, Stored), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITE_LOCK)
            .execute(&mut *tx)
            .await?;
        let (outcome, stored) = put_in(&mut tx, key, body, expected_version).await?;
        if outcome != Outcome::Unchanged {
            tx.commit().await?;
        }
        Ok((outcome, stored))
    }

    /// Several writes as one: all of them, or none if any fails.
    pub async fn put_all(
        &self,
        items: &[(Key, String)],
    ) -> Result<Vec<(Outcome, Stored)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITE_LOCK)
            .execute(&mut *tx)
            .await?;
        let mut done = Vec::with_capacity(items.len());
        for (key, body) in items {
            done.push(put_in(&mut tx, key, body, None).await?);
        }
        tx.commit().await?;
        Ok(done)
    }

    pub async fn get(&self, key: &Key) -> Result<Option<Stored>, StoreError> {
        let row = sqlx::query(
            "SELECT body, version, revision FROM resources WHERE kind = $1 AND mesh = $2 AND name = $3",
        )
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

    pub async fn list(&self, kind: &str, mesh: Option<&str>) -> Result<Vec<Stored>, StoreError> {
        let rows = sqlx::query(
            "SELECT mesh, name, body, version, revision FROM resources
             WHERE kind = $1 AND ($2::TEXT IS NULL OR mesh = $2) ORDER BY mesh, name",
        )
        .bind(kind)
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

    pub async fn delete(&self, key: &Key) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITE_LOCK)
            .execute(&mut *tx)
            .await?;
        let gone = sqlx::query("DELETE FROM resources WHERE kind = $1 AND mesh = $2 AND name = $3")
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
        insert_event(&mut tx, key, true).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn events_since(&self, revision: i64) -> Result<Vec<Event>, StoreError> {
        events_after(&self.pool, revision).await
    }

    pub async fn revision(&self) -> Result<i64, StoreError> {
        latest_revision(&self.pool).await
    }

    /// Changes committed by any replica, as this one learns of them.
    pub fn watch(&self) -> broadcast::Receiver<Event> {
        self.changes.subscribe()
    }
}

async fn latest_revision(pool: &PgPool) -> Result<i64, StoreError> {
    let row = sqlx::query("SELECT COALESCE(MAX(revision), 0) FROM events")
        .fetch_one(pool)
        .await?;
    Ok(row.get(0))
}

async fn events_after(pool: &PgPool, revision: i64) -> Result<Vec<Event>, StoreError> {
    let rows = sqlx::query(
        "SELECT revision, kind, mesh, name, deleted FROM events WHERE revision > $1 ORDER BY revision",
    )
    .bind(revision)
    .fetch_all(pool)
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
            deleted: row.get(4),
        })
        .collect())
}

/// One write inside the caller's transaction: what `put` and `put_all` share.
async fn put_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    key: &Key,
    body: &str,
    expected_version: Option<i64>,
) -> Result<(Outcome, Stored), StoreError> {
    let current = sqlx::query(
        "SELECT body, version, revision FROM resources WHERE kind = $1 AND mesh = $2 AND name = $3",
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
        "INSERT INTO resources (kind, mesh, name, body, version, revision) VALUES ($1, $2, $3, $4, $5, $6)
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

/// Records the change and announces it; NOTIFY is delivered when the transaction commits.
async fn insert_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    key: &Key,
    deleted: bool,
) -> Result<i64, StoreError> {
    let row = sqlx::query(
        "INSERT INTO events (kind, mesh, name, deleted) VALUES ($1, $2, $3, $4) RETURNING revision",
    )
    .bind(&key.kind)
    .bind(&key.mesh)
    .bind(&key.name)
    .bind(deleted)
    .fetch_one(&mut **tx)
    .await?;
    let revision: i64 = row.get(0);
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(revision.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(revision)
}
