//! Golden files: expected outputs committed under `tests/golden/`.
//! `UPDATE_GOLDEN=1 cargo test` rewrites them; review the diff before
//! committing, since that diff is the behaviour change.

use std::path::PathBuf;

/// The path of a golden file, relative to `tests/golden/`.
pub fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Fails unless `actual` equals the golden file `name`, showing the
/// first line that differs.
pub fn assert_golden(name: &str, actual: &str) {
    let path = golden_path(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("golden dir")).expect("mkdir golden");
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "golden file {} unreadable ({e}); run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    if expected == actual {
        return;
    }
    let (line, want, got) = expected
        .lines()
        .map(Some)
        .chain(std::iter::repeat(None))
        .zip(actual.lines().map(Some).chain(std::iter::repeat(None)))
        .enumerate()
        .find(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| (i + 1, a.unwrap_or("<end>"), b.unwrap_or("<end>")))
        .unwrap_or((0, "<trailing newline>", "<trailing newline>"));
    panic!(
        "{} differs at line {line}:\n  expected: {want}\n  actual:   {got}\n--- actual output ---\n{actual}\n(UPDATE_GOLDEN=1 rewrites it)",
        path.display()
    );
}
