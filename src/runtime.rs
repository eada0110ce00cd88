//! Process plumbing every subcommand shares: the async runtime, the log
//! subscriber and its settings, and the stop signals.
//!
//! A ground-floor module: it knows nothing of the proxy, the controller or
//! the command line, so `cli` and `demo` can both use it without depending
//! on each other.

use serde::{Deserialize, Serialize};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

/// Checks a log filter such as `info` or `warn,outrider=debug`: the one
/// rule the proxy, the controller and the injector's annotation share.
pub fn check_log_level(level: &str) -> Result<(), String> {
    if level.trim().is_empty() {
        return Err("must not be empty (info, debug, warn,outrider=debug, ...)".into());
    }
    level
        .parse::<tracing_subscriber::filter::Targets>()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A runtime on the current thread for one worker, else a multi-threaded
/// one with that many workers.
pub fn build_runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads)
            .enable_all()
            .build()
    }
}

/// Installs the global subscriber. `level` is `info` or a per-target list
/// such as `warn,outrider=debug` (validated with the config; a level that
/// does not parse falls back to `info`).
pub fn init_tracing(level: &str, format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter: tracing_subscriber::filter::Targets = level.parse().unwrap_or_else(|_| {
        tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
    });
    let registry = tracing_subscriber::registry().with(filter);
    // A second call (tests, the demo inside a process that has one) keeps
    // the first subscriber.
    let _ = match format {
        LogFormat::Plain => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("Received SIGTERM"),
                _ = int.recv() => tracing::info!("Received SIGINT"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_are_checked_as_the_subscriber_reads_them() {
        assert_eq!(check_log_level("info"), Ok(()));
        assert_eq!(check_log_level("warn,outrider=debug"), Ok(()));
        assert!(check_log_level("outrider=loud").is_err());
        assert!(check_log_level(" ").is_err());
    }
}
