//! Every dependency `Cargo.toml` declares is used: a crate named in
//! `[dependencies]` appears in `src/`, one in `[dev-dependencies]` in
//! `src/`, `tests/` or `benches/`. A dependency left behind after the code
//! that needed it is gone costs build time and audit surface for nothing.
//!
//! The check reads the manifest and the sources as text, like
//! cargo-machete: a crate counts as used when `name::`, `use name` or
//! `name!` appears (with `-` as `_`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The crate names of one manifest table, e.g. `[dependencies]`.
fn declared(manifest: &str, table: &str) -> Vec<String> {
    let header = format!("[{table}]");
    let Some(start) = manifest.find(&header) else {
        return Vec::new();
    };
    manifest[start + header.len()..]
        .lines()
        .take_while(|line| !line.starts_with('['))
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            line.split('=').next().map(|name| name.trim().to_string())
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn sources(dirs: &[&str]) -> String {
    let mut files = Vec::new();
    for dir in dirs {
        rust_files(&root().join(dir), &mut files);
    }
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether the code names crate `name` (as its Rust identifier).
fn uses(code: &str, name: &str) -> bool {
    let ident = name.replace('-', "_");
    // A crate whose library name differs from its package name.
    let ident = match ident.as_str() {
        "rustls_webpki" => "webpki".to_string(),
        _ => ident,
    };
    [
        format!("{ident}::"),
        format!("use {ident}"),
        format!("{ident}!"),
    ]
    .iter()
    .any(|needle| {
        code.match_indices(needle.as_str()).any(|(at, _)| {
            // Not the tail of a longer name (`my_http::` is not `http::`).
            !code.as_bytes()[..at]
                .last()
                .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b':')
        })
    })
}

fn unused(table: &str, dirs: &[&str]) -> Vec<String> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let code = sources(dirs);
    declared(&manifest, table)
        .into_iter()
        // The crate itself, as its own dev-dependency for `test-util`.
        .filter(|name| name != env!("CARGO_PKG_NAME"))
        .filter(|name| !uses(&code, name))
        .collect()
}

#[test]
fn every_dependency_is_used_by_the_library_or_the_binary() {
    // The code build.rs generates from proto/ counts as the library's.
    let mut generated = Vec::new();
    rust_files(Path::new(env!("OUT_DIR")), &mut generated);
    assert!(!generated.is_empty(), "no generated code in OUT_DIR");
    let generated: String = generated
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let unused: Vec<String> = unused("dependencies", &["src"])
        .into_iter()
        // Generated code names crates by absolute path (`::prost::`).
        .filter(|name| {
            let ident = name.replace('-', "_");
            !uses(&generated, name) && !generated.contains(&format!("::{ident}::"))
        })
        .collect();
    assert!(unused.is_empty(), "declared but unused: {unused:?}");
}

#[test]
fn every_dev_dependency_is_used_by_some_test_or_bench() {
    let unused = unused("dev-dependencies", &["src", "tests", "benches"]);
    assert!(unused.is_empty(), "declared but unused: {unused:?}");
}

#[test]
fn the_check_sees_a_use_and_not_a_lookalike() {
    assert!(uses("use httparse::Request;", "httparse"));
    assert!(uses(
        "let x = tower_service::Service::call;",
        "tower-service"
    ));
    assert!(!uses("let x = my_http::get();", "http"));
    assert!(!uses("crate::policy::source::kube::run", "kube"));
    let manifest = "[dependencies]\na = \"1\"\n# note\nb-c = { version = \"2\" }\n\n[dev-dependencies]\nd = \"3\"\n";
    assert_eq!(declared(manifest, "dependencies"), ["a", "b-c"]);
    assert_eq!(declared(manifest, "dev-dependencies"), ["d"]);
}
