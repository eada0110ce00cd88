//! YAML in and out, with limits: every YAML this binary reads (its config,
//! policy files, manifests, injection values) goes through here, so none
//! of it can cost more than a bounded amount of time and memory.
//!
//! The parser is serde-saphyr: maintained, panic-free, and budgeted (depth,
//! nodes, events, aliases). `serde_yaml` is deprecated and has no such
//! limits: a 200 KB file of nested brackets cost 19.5 s of CPU, a 6 MB one
//! 754 MB of memory. Here the same inputs are refused at once: deeper than
//! [`MAX_DEPTH`], more than [`MAX_NODES`] nodes, larger than
//! [`MAX_DOCUMENT_BYTES`].

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest YAML text read (a Kubernetes object is at most about
/// 1.5 MiB; a ConfigMap 1 MiB).
pub const MAX_DOCUMENT_BYTES: usize = 2 * 1024 * 1024;
/// The deepest nesting accepted (Kubernetes objects stay under 20).
pub const MAX_DEPTH: usize = 64;
/// The most nodes in one text (a 10,000-rule policy has about 200,000).
pub const MAX_NODES: usize = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{bytes} bytes of YAML, more than the {max} accepted")]
    TooLarge { bytes: usize, max: usize },
    #[error("{0}")]
    Parse(String),
    #[error("cannot write YAML: {0}")]
    Write(String),
}

impl Error {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Parse(_) => "malformed",
            Self::Write(_) => "unwritable",
        }
    }
}

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        // YAML 1.2's booleans only: `y`, `on` and `no` stay strings (a label
        // value `no` must not turn into `false` when a manifest is rewritten).
        strict_booleans: true,
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            max_nodes: MAX_NODES,
            max_events: 4 * MAX_NODES,
            max_reader_input_bytes: Some(MAX_DOCUMENT_BYTES),
        },
    }
}

fn check_size(text: &str) -> Result<(), Error> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(Error::TooLarge {
            bytes: text.len(),
            max: MAX_DOCUMENT_BYTES,
        });
    }
    Ok(())
}

/// One document into `T`.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    check_size(text)?;
    serde_saphyr::from_str_with_options(text, options()).map_err(|e| Error::Parse(e.to_string()))
}

/// One document as a JSON value (for typed parsing that names fields by
/// path afterwards); an empty document is `null`.
pub fn value(text: &str) -> Result<serde_json::Value, Error> {
    let mut documents = documents(text)?;
    match documents.len() {
        0 => Ok(serde_json::Value::Null),
        1 => Ok(documents.remove(0)),
        n => Err(Error::Parse(format!(
            "{n} YAML documents where one was expected"
        ))),
    }
}

/// Every non-empty document of a `---`-separated stream, as JSON values.
pub fn documents(text: &str) -> Result<Vec<serde_json::Value>, Error> {
    check_size(text)?;
    serde_saphyr::from_multiple_with_options(text, options())
        .map_err(|e| Error::Parse(e.to_string()))
}

/// `value` as YAML.
pub fn to_string<T: Serialize>(value: &T) -> Result<String, Error> {
    serde_saphyr::to_string(value).map_err(|e| Error::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_refused_at_once() {
        let depth = 100_000;
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(value(&nested).is_err());
        let shallow = format!("{}{}", "[".repeat(10), "]".repeat(10));
        assert!(value(&shallow).is_ok());
    }

    #[test]
    fn text_over_the_limit_is_refused_before_parsing() {
        let big = "a: b\n".repeat(MAX_DOCUMENT_BYTES / 5 + 1);
        assert!(matches!(documents(&big), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn documents_skip_empty_ones_and_values_round_trip() {
        let docs = documents("a: 1\n---\n# only a comment\n---\nb: [x, y]\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1]["b"][1], "y");
        let text = to_string(&docs[1]).unwrap();
        assert_eq!(value(&text).unwrap(), docs[1]);
        assert_eq!(value("").unwrap(), serde_json::Value::Null);
    }

    #[test]
    fn duplicate_keys_are_errors() {
        assert!(value("a: 1\na: 2\n").is_err());
    }
}
