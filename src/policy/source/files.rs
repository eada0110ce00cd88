//! Local mode: policies from a directory of YAML files, the same documents
//! `kubectl apply` takes, watched for changes.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory is
//! read (hidden entries are skipped, so a mounted ConfigMap works too). A
//! file that stops parsing keeps the objects it last parsed to: a typo
//! must not silently drop the DENY policies it held. A file that never
//! parsed contributes nothing and is reported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc};

use crate::policy::model::Object;
use crate::policy::objects::{ObjectSet, ParseError, parse_documents};
use crate::policy::publish::{Metrics, Update};
use crate::yaml::MAX_DOCUMENT_BYTES;

/// A file's text, or `None` when it is larger than any policy file may
/// be (read no further than that, whatever the file's size).
fn read_bounded(path: &Path) -> std::io::Result<Option<String>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(MAX_DOCUMENT_BYTES as u64 + 1)
        .read_to_string(&mut text)?;
    Ok((text.len() <= MAX_DOCUMENT_BYTES).then_some(text))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read policy directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct FileSource {
    dir: PathBuf,
    default_namespace: String,
    debounce: Duration,
    poll_interval: Duration,
    metrics: Metrics,
    /// The objects each file last parsed to.
    last_good: BTreeMap<PathBuf, Vec<Object>>,
    /// File contents as last read, to skip unchanged files.
    last_text: BTreeMap<PathBuf, String>,
    last_sent: Option<ObjectSet>,
}

impl FileSource {
    pub fn new(
        dir: PathBuf,
        default_namespace: String,
        debounce: Duration,
        poll_interval: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            dir,
            default_namespace,
            debounce,
            poll_interval,
            metrics,
            last_good: BTreeMap::new(),
            last_text: BTreeMap::new(),
            last_sent: None,
        }
    }

    /// A source with this one's settings and no state, to stand in while
    /// this one is away on a blocking thread.
    fn empty_twin(&self) -> Self {
        Self::new(
            self.dir.clone(),
            self.default_namespace.clone(),
            self.debounce,
            self.poll_interval,
            self.metrics.clone(),
        )
    }

    /// Reads the directory into a complete object set.
    pub fn load(&mut self) -> Result<ObjectSet, Error> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| Error::ReadDir {
            path: self.dir.clone(),
            source,
        })?;
        let mut present = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let wanted = !name.starts_with('.')
                && (name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json"));
            if wanted && entry.path().is_file() {
                present.push(entry.path());
            }
        }
        present.sort();
        // Files that disappeared take their objects with them.
        self.last_good.retain(|path, _| present.contains(path));
        self.last_text.retain(|path, _| present.contains(path));
        for path in present {
            self.read_file(&path);
        }
        let mut set = ObjectSet::new();
        for objects in self.last_good.values() {
            for object in objects {
                set.insert(
                    (object.kind, object.namespace.clone(), object.name.clone()),
                    object.clone(),
                );
            }
        }
        Ok(set)
    }

    fn read_file(&mut self, path: &Path) {
        let text = match read_bounded(path) {
            Ok(Some(text)) => text,
            Ok(None) => {
                // Too large to read at all: refused like an unparseable
                // file, once per change of size.
                self.refuse(
                    path,
                    "too_large",
                    &format!("larger than {MAX_DOCUMENT_BYTES} bytes"),
                );
                return;
            }
            Err(error) => {
                // Mid-swap or vanished: keep what it held.
                tracing::debug!(path = %path.display(), %error, "Cannot read policy file");
                return;
            }
        };
        if self.last_text.get(path) == Some(&text) {
            return;
        }
        match parse_documents(&text, &self.default_namespace) {
            Ok(objects) => {
                self.last_good.insert(path.to_path_buf(), objects);
            }
            Err(error) => {
                let reason = match &error {
                    ParseError::Yaml(yaml) if yaml.reason() == "too_large" => "too_large",
                    _ => "unparseable_file",
                };
                self.refuse(path, reason, &error.to_string());
            }
        }
        self.last_text.insert(path.to_path_buf(), text);
    }

    fn refuse(&mut self, path: &Path, reason: &'static str, error: &str) {
        self.metrics.source_error("files", reason);
        let kept = self.last_good.get(path).map_or(0, Vec::len);
        tracing::warn!(path = %path.display(), %error, kept, reason, "Policy file refused; keeping the objects it last held");
    }

    /// Sends the initial set, then every change, until `updates` closes.
    pub async fn run(mut self, updates: mpsc::Sender<Update>) {
        let changed = Arc::new(Notify::new());
        let _watcher = {
            let changed = changed.clone();
            let watcher =
                notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                    if event.is_ok_and(|e| !e.kind.is_access()) {
                        changed.notify_one();
                    }
                });
            match watcher {
                Ok(mut w) => match w.watch(&self.dir, RecursiveMode::NonRecursive) {
                    Ok(()) => Some(w),
                    Err(error) => {
                        tracing::warn!(dir = %self.dir.display(), %error, "Cannot watch the policy directory; polling");
                        None
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, "No file watcher; polling the policy directory");
                    None
                }
            }
        };
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !self.reload(&updates).await {
                return;
            }
            tokio::select! {
                _ = changed.notified() => {
                    loop {
                        tokio::select! {
                            _ = changed.notified() => continue,
                            _ = tokio::time::sleep(self.debounce) => break,
                        }
                    }
                }
                _ = poll.tick() => {}
                _ = updates.closed() => return,
            }
        }
    }

    /// Returns false once nobody listens any more. Reading and parsing
    /// run on a blocking thread: a large or hostile file costs that thread
    /// time, never the data plane's.
    async fn reload(&mut self, updates: &mpsc::Sender<Update>) -> bool {
        let mut source = std::mem::replace(self, self.empty_twin());
        let loaded = tokio::task::spawn_blocking(move || {
            let result = source.load();
            (source, result)
        })
        .await;
        let Ok((source, result)) = loaded else {
            return false;
        };
        *self = source;
        match result {
            Ok(set) if self.last_sent.as_ref() != Some(&set) => {
                self.last_sent = Some(set.clone());
                updates.send(Update::Objects(set)).await.is_ok()
            }
            Ok(_) => true,
            Err(error) => {
                self.metrics.source_error("files", "unreadable_directory");
                tracing::warn!(%error, "Keeping the last good policies");
                true
            }
        }
    }
}
