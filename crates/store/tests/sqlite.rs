//! The store against a real SQLite database file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use sluice_store::{Key, Outcome, SqliteStore, StoreError};

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

fn key(kind: &str, mesh: &str, name: &str) -> Key {
    Key {
        kind: kind.into(),
        mesh: mesh.into(),
        name: name.into(),
    }
}

#[tokio::test]
async fn put_reports_created_configured_unchanged() {
    let db = Db::new("put");
    let store = SqliteStore::open(&db.file()).await.unwrap();
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
    let db = Db::new("conflict");
    let store = SqliteStore::open(&db.file()).await.unwrap();
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
    let db = Db::new("feed");
    let store = SqliteStore::open(&db.file()).await.unwrap();
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
        assert_eq!(watch.recv().await.unwrap().revision, want);
    }
}

#[tokio::test]
async fn data_and_revisions_survive_reopening() {
    let db = Db::new("reopen");
    {
        let store = SqliteStore::open(&db.file()).await.unwrap();
        store
            .put(&key("Mesh", "default", "default"), "m", None)
            .await
            .unwrap();
        store
            .put(&key("Mesh", "default", "default"), "n", None)
            .await
            .unwrap();
    }
    let store = SqliteStore::open(&db.file()).await.unwrap();
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
