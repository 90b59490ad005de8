//! One suite for both stores: a real SQLite file, and a real PostgreSQL server when the test
//! command started one (`SLUICE_TEST_POSTGRES_URL`; otherwise the PostgreSQL half says it is
//! skipped).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sluice_store::{Change, Key, Outcome, Store, StoreError, VipRow, Written};

/// A database file in a fresh directory, removed at the end.
struct Db(PathBuf);

impl Db {
    fn new(name: &str) -> Db {
        let dir = std::env::temp_dir().join(format!(
            "sluice-store-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Db(dir)
    }

    fn file(&self) -> PathBuf {
        self.0.join("sluice.db")
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh database on the test PostgreSQL server, or `None` when there is none.
async fn postgres_url(name: &str) -> Option<String> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let Ok(base) = std::env::var("SLUICE_TEST_POSTGRES_URL") else {
        eprintln!("skipped: no SLUICE_TEST_POSTGRES_URL (scripts/test starts a PostgreSQL server)");
        return None;
    };
    let db = format!(
        "t_{name}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let admin = sqlx::PgPool::connect(&base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let (prefix, _) = base.rsplit_once('/').unwrap();
    Some(format!("{prefix}/{db}"))
}

/// Runs `check` against SQLite and, when available, PostgreSQL.
macro_rules! on_both {
    ($name:literal, $check:ident) => {{
        let db = Db::new($name);
        let url = format!("sqlite://{}", db.file().display());
        $check(&url).await;
        if let Some(url) = postgres_url($name).await {
            $check(&url).await;
        }
    }};
}

fn key(kind: &str, mesh: &str, name: &str) -> Key {
    Key {
        kind: kind.into(),
        mesh: mesh.into(),
        name: name.into(),
    }
}

#[tokio::test]
async fn put_reports_created_configured_unchanged() {
    on_both!("put", put_check);
}

async fn put_check(url: &str) {
    let store = Store::open(url).await.unwrap();
    let k = key("MeshExternalService", "default", "httpbin");
    let (o, s) = store.put(&k, "a: 1\n", None).await.unwrap();
    assert_eq!((o, s.version, s.revision), (Outcome::Created, 1, 1));
    let (o, s) = store.put(&k, "a: 2\n", None).await.unwrap();
    assert_eq!((o, s.version, s.revision), (Outcome::Configured, 2, 2));
    let (o, s) = store.put(&k, "a: 2\n", None).await.unwrap();
    assert_eq!((o, s.version, s.revision), (Outcome::Unchanged, 2, 2));
    assert_eq!(
        store.revision().await.unwrap(),
        2,
        "an unchanged put is no change"
    );
    assert_eq!(store.get(&k).await.unwrap().unwrap().body, "a: 2\n");
}

#[tokio::test]
async fn stale_writes_are_refused() {
    on_both!("conflict", conflict_check);
}

async fn conflict_check(url: &str) {
    let store = Store::open(url).await.unwrap();
    let k = key("Secret", "default", "ca");
    store.put(&k, "x", Some(0)).await.unwrap();
    match store.put(&k, "y", Some(0)).await {
        Err(StoreError::Conflict {
            expected, current, ..
        }) => assert_eq!((expected, current), (0, 1)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let (o, s) = store.put(&k, "y", Some(1)).await.unwrap();
    assert_eq!((o, s.version), (Outcome::Configured, 2));
    assert_eq!(store.get(&k).await.unwrap().unwrap().body, "y");
}

#[tokio::test]
async fn list_delete_and_the_change_feed() {
    on_both!("feed", feed_check);
}

async fn feed_check(url: &str) {
    let store = Store::open(url).await.unwrap();
    let mut watch = store.watch();
    for (mesh, name) in [("default", "b"), ("payments", "a"), ("default", "a")] {
        store
            .put(&key("Dataplane", mesh, name), name, None)
            .await
            .unwrap();
    }
    store
        .put(&key("Secret", "default", "s"), "s", None)
        .await
        .unwrap();
    let all: Vec<_> = store
        .list("Dataplane", None)
        .await
        .unwrap()
        .into_iter()
        .map(|s| format!("{}/{}", s.key.mesh, s.key.name))
        .collect();
    assert_eq!(all, ["default/a", "default/b", "payments/a"]);
    assert_eq!(
        store
            .list("Dataplane", Some("payments"))
            .await
            .unwrap()
            .len(),
        1
    );

    assert!(store
        .delete(&key("Dataplane", "default", "b"))
        .await
        .unwrap());
    assert!(!store
        .delete(&key("Dataplane", "default", "b"))
        .await
        .unwrap());
    assert!(store
        .get(&key("Dataplane", "default", "b"))
        .await
        .unwrap()
        .is_none());

    let feed = store.events_since(3).await.unwrap();
    let seen: Vec<_> = feed
        .iter()
        .map(|e| (e.revision, e.key.name.as_str(), e.deleted))
        .collect();
    assert_eq!(seen, [(4, "s", false), (5, "b", true)]);
    for want in 1..=5 {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.recv())
            .await
            .expect("a change must reach watchers")
            .unwrap();
        assert_eq!(event.revision, want);
    }
}

#[tokio::test]
async fn data_and_revisions_survive_reopening() {
    on_both!("reopen", reopen_check);
}

async fn reopen_check(url: &str) {
    {
        let store = Store::open(url).await.unwrap();
        store
            .put(&key("Mesh", "default", "default"), "m", None)
            .await
            .unwrap();
        store
            .put(&key("Mesh", "default", "default"), "n", None)
            .await
            .unwrap();
    }
    let store = Store::open(url).await.unwrap();
    let s = store
        .get(&key("Mesh", "default", "default"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((s.body.as_str(), s.version), ("n", 2));
    let (_, s) = store
        .put(&key("Mesh", "default", "other"), "o", None)
        .await
        .unwrap();
    assert_eq!(s.revision, 3, "revisions continue after a restart");
}

/// Two replicas on one PostgreSQL database: a write on one reaches the other's watchers.
#[tokio::test]
async fn a_write_on_one_replica_reaches_the_other() {
    let Some(url) = postgres_url("replicas").await else {
        return;
    };
    let a = Store::open(&url).await.unwrap();
    let b = Store::open(&url).await.unwrap();
    let mut watch_b = b.watch();
    let (_, stored) = a
        .put(&key("MeshExternalService", "default", "api"), "x", None)
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), watch_b.recv())
        .await
        .expect("replica B must hear of replica A's write")
        .unwrap();
    assert_eq!(seen.revision, stored.revision);
    assert_eq!(seen.key.name, "api");
    assert_eq!(b.get(&seen.key).await.unwrap().unwrap().body, "x");
}

#[tokio::test]
async fn an_unknown_store_url_is_one_clear_error() {
    let err = Store::open("mysql://x").await.err().unwrap();
    assert!(
        err.to_string()
            .contains("give sqlite://PATH or postgres://"),
        "{err}"
    );
}

/// Each migration runs once: a store opened again finds its schema at the current version.
#[tokio::test]
async fn migrations_run_once() {
    on_both!("migrate", migrate_check);
}

async fn migrate_check(url: &str) {
    for _ in 0..2 {
        let store = Store::open(url).await.unwrap();
        store
            .put(&key("Mesh", "default", "default"), "m", None)
            .await
            .unwrap();
    }
    let versions: Vec<i64> = if let Some(path) = url.strip_prefix("sqlite://") {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite:{path}"))
            .await
            .unwrap();
        sqlx::query_scalar("SELECT version FROM sluice_schema")
            .fetch_all(&pool)
            .await
            .unwrap()
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::query_scalar("SELECT version FROM sluice_schema")
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    assert_eq!(
        versions,
        (1..=sluice_store::SCHEMA_VERSION).collect::<Vec<_>>()
    );
}

/// put_all reports each item like put, in order, repeats included.
#[tokio::test]
async fn put_all_reports_each_item() {
    on_both!("batch", batch_check);
}

async fn batch_check(url: &str) {
    let store = Store::open(url).await.unwrap();
    store
        .put(&key("Secret", "default", "a"), "a1", None)
        .await
        .unwrap();
    let items = vec![
        (key("Secret", "default", "a"), "a1".to_string()),
        (key("Secret", "default", "b"), "b1".to_string()),
        (key("Secret", "default", "a"), "a2".to_string()),
    ];
    let done = store.put_all(&items).await.unwrap();
    let outcomes: Vec<_> = done.iter().map(|(o, s)| (*o, s.version)).collect();
    assert_eq!(
        outcomes,
        [
            (Outcome::Unchanged, 1),
            (Outcome::Created, 1),
            (Outcome::Configured, 2)
        ]
    );
    assert_eq!(
        store
            .get(&key("Secret", "default", "a"))
            .await
            .unwrap()
            .unwrap()
            .body,
        "a2"
    );
    assert_eq!(store.revision().await.unwrap(), 3);
}

/// A write is one transaction: puts and deletes together, or (when any part is refused)
/// nothing, and nothing at all when the store has moved past the revision it was checked at.
#[tokio::test]
async fn a_write_is_all_or_nothing_and_checked_against_a_revision() {
    on_both!("write", write_check);
}

async fn write_check(url: &str) {
    let store = Store::open(url).await.unwrap();
    let (a, b, c) = (
        key("Secret", "default", "a"),
        key("Secret", "default", "b"),
        key("Secret", "default", "c"),
    );
    store.put(&a, "a1", None).await.unwrap();
    store.put(&b, "b1", None).await.unwrap();
    let change = |k: &Key, body: Option<&str>, expected_version| Change {
        key: k.clone(),
        body: body.map(str::to_string),
        expected_version,
    };

    // A conflict in the last part undoes the first.
    let refused = store
        .write(
            &[
                change(&c, Some("c1"), None),
                change(&a, Some("a2"), Some(7)),
            ],
            None,
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::Conflict { .. })),
        "{refused:?}"
    );
    assert!(store.get(&c).await.unwrap().is_none());
    assert_eq!(store.revision().await.unwrap(), 2);

    // Checked against an older revision: refused, nothing written.
    let stale = store.write(&[change(&c, Some("c1"), None)], Some(1)).await;
    assert!(
        matches!(
            stale,
            Err(StoreError::Stale {
                expected: 1,
                current: 2
            })
        ),
        "{stale:?}"
    );
    assert!(store.get(&c).await.unwrap().is_none());

    // Against the current one: a put, a delete and a delete of nothing, in one revision range.
    let mut changes = store.watch();
    let done = store
        .write(
            &[
                change(&c, Some("c1"), None),
                change(&b, None, None),
                change(&key("Secret", "default", "none"), None, None),
            ],
            Some(2),
        )
        .await
        .unwrap();
    // Revisions grow; a refused write may leave a gap (PostgreSQL's sequences do not roll back).
    let revisions: Vec<Option<i64>> = done.iter().map(Written::revision).collect();
    let (Some(put), Some(deleted), None) = (revisions[0], revisions[1], revisions[2]) else {
        panic!("{revisions:?}");
    };
    assert!(2 < put && put < deleted, "{revisions:?}");
    assert!(matches!(done[2], Written::Absent));
    assert!(store.get(&b).await.unwrap().is_none());
    assert_eq!(store.get(&c).await.unwrap().unwrap().body, "c1");
    let events = store.events_since(2).await.unwrap();
    let seen: Vec<(i64, &str, bool)> = events
        .iter()
        .map(|e| (e.revision, e.key.name.as_str(), e.deleted))
        .collect();
    assert_eq!(seen, [(put, "c", false), (deleted, "b", true)]);
    // Watchers hear of both, in order (after any earlier change still being relayed).
    let mut heard = Vec::new();
    while heard.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(10), changes.recv())
            .await
            .unwrap()
            .unwrap();
        if e.revision > 2 {
            heard.push(e.revision);
        }
    }
    assert_eq!(heard, [put, deleted]);
}

/// A resource keeps the revision that created it through updates; a new one after a delete
/// is created anew.
#[tokio::test]
async fn creation_revisions_survive_updates() {
    on_both!("created", created_check);
}

async fn created_check(url: &str) {
    let store = Store::open(url).await.unwrap();
    let a = key("MeshExternalService", "default", "a");
    let b = key("MeshExternalService", "default", "b");
    store.put(&a, "1", None).await.unwrap();
    store.put(&b, "1", None).await.unwrap();
    let (_, s) = store.put(&a, "2", None).await.unwrap();
    assert_eq!((s.revision, s.created), (3, 1));
    let listed = store.list("MeshExternalService", None).await.unwrap();
    let created: Vec<i64> = listed.iter().map(|s| s.created).collect();
    assert_eq!(created, [1, 2]);
    store.delete(&a).await.unwrap();
    let (_, s) = store.put(&a, "3", None).await.unwrap();
    assert_eq!((s.revision, s.created), (5, 5));
    assert_eq!(store.get(&a).await.unwrap().unwrap().created, 5);
}

/// VIPs are saved against the version they were read at: a save from a stale read is
/// refused and changes nothing.
#[tokio::test]
async fn vips_are_saved_against_their_version() {
    on_both!("vips", vips_check);
}

async fn vips_check(url: &str) {
    let store = Store::open(url).await.unwrap();
    let read = store.vips().await.unwrap();
    assert_eq!((read.version, read.rows.len()), (0, 0));
    let row = |ip: &str, owner: Option<&str>, held: Option<i64>| VipRow {
        ip: ip.into(),
        owner: owner.map(Into::into),
        held_until: held,
    };
    let v = store
        .save_vips(
            0,
            &[
                row("242.0.0.1", Some("a"), None),
                row("242.0.0.2", Some("b"), None),
            ],
        )
        .await
        .unwrap();
    assert_eq!(v, 1);
    match store
        .save_vips(0, &[row("242.0.0.3", Some("c"), None)])
        .await
    {
        Err(StoreError::StaleVips { expected, current }) => assert_eq!((expected, current), (0, 1)),
        other => panic!("expected a stale save, got {other:?}"),
    }
    // Released: held; the hold expired: gone.
    store
        .save_vips(
            1,
            &[
                row("242.0.0.1", None, Some(1000)),
                row("242.0.0.2", None, None),
            ],
        )
        .await
        .unwrap();
    let read = store.vips().await.unwrap();
    assert_eq!(read.version, 2);
    assert_eq!(read.rows, [row("242.0.0.1", None, Some(1000))]);
    drop(store);
    let reopened = Store::open(url).await.unwrap();
    assert_eq!(
        reopened.vips().await.unwrap(),
        read,
        "VIPs survive a restart"
    );
}
