//! The workload's labels from a downward-API file (`key="value"` lines,
//! values quoted the way kubelet writes them), re-read when it changes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc};

use crate::policy::publish::Update;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: &'static str,
}

/// Parses the downward-API labels format.
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, ParseError> {
    let mut labels = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fail = |reason| ParseError {
            line: n + 1,
            reason,
        };
        let (key, quoted) = line
            .split_once('=')
            .ok_or_else(|| fail("expected key=\"value\""))?;
        labels.insert(
            key.to_string(),
            unquote(quoted).ok_or_else(|| fail("value is not a quoted string"))?,
        );
    }
    Ok(labels)
}

/// Undoes Go's `%q` quoting as far as label values need it.
fn unquote(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            '"' => out.push('"'),
            '\\' => out.push('\\'),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'x' => {
                let hex: String = chars.by_ref().take(2).collect();
                out.push(char::from(u8::from_str_radix(&hex, 16).ok()?));
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Sends the labels now and whenever the file changes.
pub async fn watch(path: PathBuf, poll_interval: Duration, updates: mpsc::Sender<Update>) {
    let changed = Arc::new(Notify::new());
    let dir = path
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let _watcher = {
        let changed = changed.clone();
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                changed.notify_one();
            }
        })
        .ok()
        .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).ok().map(|()| w))
    };
    let mut last = None;
    let mut poll = tokio::time::interval(poll_interval);
    loop {
        match std::fs::read_to_string(&path).map(|t| parse(&t)) {
            Ok(Ok(labels)) if last.as_ref() != Some(&labels) => {
                last = Some(labels.clone());
                if updates.send(Update::Labels(labels)).await.is_err() {
                    return;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(path = %path.display(), %error, "Cannot parse the labels file; keeping the last labels")
            }
            Err(error) => {
                tracing::debug!(path = %path.display(), %error, "Cannot read the labels file")
            }
        }
        tokio::select! {
            _ = changed.notified() => tokio::time::sleep(Duration::from_millis(50)).await,
            _ = poll.tick() => {}
            _ = updates.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_kubelet_writes() {
        let text = "app=\"payments\"\npod-template-hash=\"7d9f\"\nnote=\"say \\\"hi\\\"\\x21\"\n";
        let labels = parse(text).unwrap();
        assert_eq!(labels["app"], "payments");
        assert_eq!(labels["pod-template-hash"], "7d9f");
        assert_eq!(labels["note"], "say \"hi\"!");
    }

    #[test]
    fn rejects_lines_that_are_not_key_quoted_value() {
        assert_eq!(parse("app=payments\n").unwrap_err().line, 1);
        assert_eq!(parse("a=\"1\"\nbroken\n").unwrap_err().line, 2);
        assert!(parse("a=\"bad \\q escape\"").is_err());
    }
}
