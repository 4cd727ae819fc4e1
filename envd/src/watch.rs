//! Directory watches (inotify, through `notify`): as a stream (WatchDir) or as a watcher the
//! caller polls (CreateWatcher, GetWatcherEvents, RemoveWatcher). Names are relative to the
//! watched directory; a rename is RENAME for the old name and CREATE for the new one, as envd
//! (fsnotify) reports them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::event::{ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::connect::{RpcError, RpcResult};
use crate::wire::{EventType, FilesystemEvent};

/// Events a polled watcher keeps between two reads; older ones are dropped past it.
const KEEP: usize = 10_000;

pub struct Watch {
    _watcher: notify::RecommendedWatcher,
    pub events: mpsc::UnboundedReceiver<FilesystemEvent>,
}

fn translate(root: &Path, ev: notify::Event) -> Vec<FilesystemEvent> {
    let kinds: Vec<EventType> = match ev.kind {
        EventKind::Create(_) => vec![EventType::Create],
        EventKind::Remove(_) => vec![EventType::Remove],
        EventKind::Modify(ModifyKind::Metadata(_)) => vec![EventType::Chmod],
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) => vec![EventType::Rename],
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => vec![EventType::Create],
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
            vec![EventType::Rename, EventType::Create]
        }
        EventKind::Modify(ModifyKind::Name(_)) => vec![EventType::Rename],
        EventKind::Modify(_) => vec![EventType::Write],
        _ => vec![],
    };
    let mut out = Vec::new();
    for (i, path) in ev.paths.iter().enumerate() {
        let Some(kind) = kinds.get(i).or(kinds.first()).copied() else {
            continue;
        };
        let name = path
            .strip_prefix(root)
            .unwrap_or(path)
            .display()
            .to_string();
        if name.is_empty() {
            continue; // the watched directory itself
        }
        out.push(FilesystemEvent {
            name,
            kind,
            entry: None,
        });
    }
    out
}

/// Starts watching `dir`; `not_found` if it is missing, `invalid_argument` if it is a file.
pub fn watch(dir: &Path, recursive: bool) -> RpcResult<Watch> {
    let md = std::fs::metadata(dir)
        .map_err(|_| RpcError::not_found(format!("path {} not found", dir.display())))?;
    if !md.is_dir() {
        return Err(RpcError::invalid(format!(
            "path {} is not a directory",
            dir.display()
        )));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let root = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let shown = root.clone();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            for e in translate(&shown, ev) {
                let _ = tx.send(e);
            }
        }
    })
    .map_err(|e| RpcError::internal(format!("watching {}: {e}", dir.display())))?;
    let mode = if recursive {
        RecursiveMode::Recursive
    } else {
        RecursiveMode::NonRecursive
    };
    w.watch(&root, mode)
        .map_err(|e| RpcError::internal(format!("watching {}: {e}", dir.display())))?;
    Ok(Watch {
        _watcher: w,
        events: rx,
    })
}

struct Polled {
    watch: Watch,
    path: PathBuf,
}

/// Watchers created by CreateWatcher, drained by GetWatcherEvents.
#[derive(Default)]
pub struct Watchers {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Polled>>>>,
}

impl Watchers {
    pub fn create(&self, dir: &Path, recursive: bool) -> RpcResult<String> {
        let w = watch(dir, recursive)?;
        let id = format!("w-{:016x}", rand::random::<u64>());
        self.map.lock().expect("watchers").insert(
            id.clone(),
            Arc::new(tokio::sync::Mutex::new(Polled {
                watch: w,
                path: dir.to_path_buf(),
            })),
        );
        Ok(id)
    }

    fn get(&self, id: &str) -> RpcResult<Arc<tokio::sync::Mutex<Polled>>> {
        self.map
            .lock()
            .expect("watchers")
            .get(id)
            .cloned()
            .ok_or_else(|| RpcError::not_found(format!("watcher {id} not found")))
    }

    /// The events since the last call.
    pub async fn drain(&self, id: &str) -> RpcResult<Vec<FilesystemEvent>> {
        let w = self.get(id)?;
        let mut w = w.lock().await;
        let mut out = Vec::new();
        while let Ok(e) = w.watch.events.try_recv() {
            if out.len() == KEEP {
                out.remove(0);
                tracing::warn!(watcher = id, path = %w.path.display(), "watcher events dropped");
            }
            out.push(e);
        }
        Ok(out)
    }

    pub fn remove(&self, id: &str) -> RpcResult<()> {
        self.map
            .lock()
            .expect("watchers")
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| RpcError::not_found(format!("watcher {id} not found")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn creates_writes_renames_and_removes_are_seen() {
        let t = tempfile::tempdir().unwrap();
        let ws = Watchers::default();
        let id = ws.create(t.path(), false).unwrap();
        std::fs::write(t.path().join("a"), b"x").unwrap();
        std::fs::rename(t.path().join("a"), t.path().join("b")).unwrap();
        std::fs::remove_file(t.path().join("b")).unwrap();
        let want = [
            ("a", EventType::Create),
            ("a", EventType::Rename),
            ("b", EventType::Create),
            ("b", EventType::Remove),
        ];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        while tokio::time::Instant::now() < deadline {
            seen.extend(
                ws.drain(&id)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|e| (e.name, e.kind)),
            );
            if want
                .iter()
                .all(|(n, k)| seen.iter().any(|(sn, sk)| sn == n && sk == k))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (n, k) in want {
            assert!(
                seen.iter().any(|(sn, sk)| sn == n && *sk == k),
                "{n} {k:?} in {seen:?}"
            );
        }
        ws.remove(&id).unwrap();
        assert!(ws.drain(&id).await.is_err());
        assert!(watch(&t.path().join("missing"), false).is_err());
    }
}
