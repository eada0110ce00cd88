//! The architecture as rules that fail the build when broken: no import
//! cycles between sibling modules at any level, the dependency rules of
//! `docs/architecture.md`, the `kube` crate only where it belongs, and no
//! production file over 600 lines.
//!
//! The import graph is read from the source: every `crate::`, `super::`
//! and `self::` path (braces in `use` expanded) resolved to the longest
//! module it names. Test code (`tests.rs`, `properties.rs`, an inline
//! `mod tests`, `test_util`) is left out, as are comments.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Longest production file allowed, in lines (test modules excluded).
const MAX_LINES: usize = 600;

struct Source {
    path: PathBuf,
    /// The production part: comments and the inline test module removed.
    code: String,
    lines: usize,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every production module of the library and its source.
fn modules() -> BTreeMap<Module, Source> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src_dir()).unwrap().with_extension("");
            let mut segments: Module = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if segments == ["main"] || segments[0] == "test_util" {
                continue;
            }
            if matches!(segments.last().map(String::as_str), Some("mod" | "lib")) {
                segments.pop();
            }
            if segments.iter().any(|s| s == "tests" || s == "properties") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let production = match text.find("#[cfg(test)]\nmod tests {") {
                Some(at) => &text[..at],
                None => &text[..],
            };
            found.insert(
                segments,
                Source {
                    lines: production.lines().count(),
                    code: strip_comments(production),
                    path,
                },
            );
        }
    }
    found
}

fn strip_comments(code: &str) -> String {
    code.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .map(|line| match line.find("// ") {
            // A trailing comment, unless the `//` sits inside a string.
            Some(at) if line[..at].matches('"').count() % 2 == 0 => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths after each `crate`, `super` or `self` in `code`, with `use`
/// braces expanded: `super::{a, b::c}` gives `[super, a]`, `[super, b, c]`.
fn paths(code: &str) -> Vec<Vec<String>> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    for head in ["crate", "super", "self"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(head) {
            let start = from + at;
            from = start + head.len();
            let boundary_before = start == 0 || !is_ident(bytes[start - 1]);
            if !boundary_before || !code[from..].starts_with("::") {
                continue;
            }
            let (tails, _) = parse_tail(&code[from..]);
            for tail in tails {
                let mut path = vec![head.to_string()];
                path.extend(tail);
                out.push(path);
            }
        }
    }
    out
}

/// Whether `code` names the external crate `krate` (`krate::` not part of
/// a longer path such as `source::krate::` or `krate_client::`).
fn uses_crate(code: &str, krate: &str) -> bool {
    let needle = format!("{krate}::");
    code.match_indices(&needle).any(|(at, _)| {
        let before = &code.as_bytes()[..at];
        !before.last().is_some_and(|b| is_ident(*b) || *b == b':')
    })
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Parses `::a::b`, `::{x, y::z}` and so on; returns the expanded
/// segment lists and how much was consumed.
fn parse_tail(text: &str) -> (Vec<Vec<String>>, usize) {
    let mut segments = Vec::new();
    let mut at = 0;
    while text[at..].starts_with("::") {
        at += 2;
        let rest = &text[at..];
        let trimmed = rest.trim_start();
        at += rest.len() - trimmed.len();
        if trimmed.starts_with('{') {
            let (group, used) = parse_group(&text[at + 1..]);
            let expanded = group
                .into_iter()
                .map(|tail| segments.iter().cloned().chain(tail).collect())
                .collect();
            return (expanded, at + 1 + used);
        }
        let len = trimmed.bytes().take_while(|b| is_ident(*b)).count();
        if len == 0 {
            break;
        }
        segments.push(trimmed[..len].to_string());
        at += len;
    }
    (vec![segments], at)
}

/// Parses the inside of `{ ... }` up to its closing brace.
fn parse_group(text: &str) -> (Vec<Vec<String>>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let rest = &text[at..];
        let trimmed = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
        at += rest.len() - trimmed.len();
        if trimmed.starts_with('}') || trimmed.is_empty() {
            return (out, at + 1);
        }
        if let Some(inner) = trimmed.strip_prefix('{') {
            let (group, used) = parse_group(inner);
            out.extend(group);
            at += 1 + used;
            continue;
        }
        let len = trimmed.bytes().take_while(|b| is_ident(*b)).count();
        let first = trimmed[..len].to_string();
        let (tails, used) = parse_tail(&trimmed[len..]);
        for tail in tails {
            out.push(std::iter::once(first.clone()).chain(tail).collect());
        }
        at += len + used;
        // Skip `as name`, `*` and anything else up to the next item.
        let rest = &text[at..];
        let skip = rest.find([',', '}']).unwrap_or(rest.len());
        at += skip;
        if text[at..].starts_with('}') {
            return (out, at + 1);
        }
    }
}

/// Module-to-module edges: what each production module uses of another.
fn edges(modules: &BTreeMap<Module, Source>) -> BTreeSet<(Module, Module)> {
    let mut edges = BTreeSet::new();
    for (module, source) in modules {
        for path in paths(&source.code) {
            let mut resolved: Module = match path[0].as_str() {
                "crate" => Vec::new(),
                "self" => module.clone(),
                _ => module[..module.len().saturating_sub(1)].to_vec(),
            };
            let mut rest = &path[1..];
            while rest.first().is_some_and(|s| s == "super") {
                resolved.pop();
                rest = &rest[1..];
            }
            resolved.extend(rest.iter().cloned());
            let target = (0..=resolved.len())
                .rev()
                .map(|n| resolved[..n].to_vec())
                .find(|prefix| modules.contains_key(prefix));
            if let Some(target) = target
                && &target != module
            {
                edges.insert((module.clone(), target));
            }
        }
    }
    edges
}

/// Each edge lifted to the two siblings it runs between (under their
/// closest common parent); edges into a module's own ancestors or
/// descendants are structure, not dependencies.
fn sibling_edges(edges: &BTreeSet<(Module, Module)>) -> BTreeSet<(Module, Module)> {
    edges
        .iter()
        .filter_map(|(a, b)| {
            let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
            (common < a.len() && common < b.len())
                .then(|| (a[..=common].to_vec(), b[..=common].to_vec()))
        })
        .collect()
}

fn name(module: &Module) -> String {
    if module.is_empty() {
        "crate".into()
    } else {
        module.join("::")
    }
}

#[test]
fn the_import_graph_reads_its_own_source() {
    // The checks below are only as good as the graph: it must see the
    // dependencies this crate is known to have.
    let modules = modules();
    let edges = sibling_edges(&edges(&modules));
    for (from, to) in [
        ("proxy", "policy"),
        ("tls", "identity"),
        ("cli", "demo"),
        ("app", "proxy"),
    ] {
        assert!(
            edges.contains(&(vec![from.into()], vec![to.into()])),
            "{from} -> {to} not found"
        );
    }
    assert!(uses_crate("use kube::Api;", "kube"));
    assert!(!uses_crate("crate::policy::source::kube::run", "kube"));
    assert!(!uses_crate("crate::kube_client::client", "kube"));
    let expanded = paths("use super::{a::B, c::{d, e::F}, G as H};");
    assert!(expanded.contains(&vec!["super".into(), "a".into(), "B".into()]));
    assert!(expanded.contains(&vec!["super".into(), "c".into(), "e".into(), "F".into()]));
    assert!(expanded.contains(&vec!["super".into(), "G".into()]));
}

#[test]
fn no_two_sibling_modules_import_each_other_even_through_others() {
    let graph = sibling_edges(&edges(&modules()));
    let mut next: BTreeMap<&Module, Vec<&Module>> = BTreeMap::new();
    for (a, b) in &graph {
        next.entry(a).or_default().push(b);
    }
    // Depth-first search for a back edge, reporting the cycle it closes.
    fn visit<'a>(
        node: &'a Module,
        next: &BTreeMap<&'a Module, Vec<&'a Module>>,
        state: &mut BTreeMap<&'a Module, bool>,
        stack: &mut Vec<&'a Module>,
        cycles: &mut Vec<String>,
    ) {
        state.insert(node, false);
        stack.push(node);
        for &to in next.get(node).into_iter().flatten() {
            match state.get(to) {
                Some(false) => {
                    let from = stack.iter().position(|m| *m == to).unwrap_or(0);
                    let cycle: Vec<String> = stack[from..].iter().map(|m| name(m)).collect();
                    cycles.push(format!("{} -> {}", cycle.join(" -> "), name(to)));
                }
                Some(true) => {}
                None => visit(to, next, state, stack, cycles),
            }
        }
        stack.pop();
        state.insert(node, true);
    }
    let (mut state, mut stack, mut cycles) = (BTreeMap::new(), Vec::new(), Vec::new());
    for node in next.keys() {
        if !state.contains_key(node) {
            visit(node, &next, &mut state, &mut stack, &mut cycles);
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn lower_layers_never_reach_up() {
    // (module, what it may use of ours); see docs/architecture.md.
    let allowed: &[(&str, &[&str])] = &[
        ("units", &[]),
        ("crypto", &[]),
        ("lifecycle", &[]),
        ("runtime", &[]),
        ("listener", &[]),
        ("yaml", &[]),
        ("identity", &["crypto"]),
        ("tls", &["crypto", "identity"]),
        ("kube_client", &[]),
        ("discovery_api", &[]),
        ("policy", &["identity", "kube_client", "units", "yaml"]),
        ("init", &["units"]),
        ("ca", &["crypto", "identity", "units", "yaml"]),
        ("admin", &["listener"]),
        (
            "proxy",
            &[
                "crypto",
                "discovery_api",
                "identity",
                "lifecycle",
                "listener",
                "policy",
                "tls",
            ],
        ),
    ];
    let graph = sibling_edges(&edges(&modules()));
    let mut broken = Vec::new();
    for (from, to) in graph.iter().filter(|(a, _)| a.len() == 1) {
        if let Some((_, may)) = allowed.iter().find(|(m, _)| *m == from[0])
            && !may.contains(&to[0].as_str())
        {
            broken.push(format!("{} uses {}", name(from), name(to)));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn only_the_control_plane_and_the_policy_watch_use_the_kube_client() {
    let allowed = [
        "kube_client",
        "controller",
        "policy::crd",
        "policy::source::kube",
    ];
    let mut broken = Vec::new();
    for (module, source) in modules() {
        let named = name(&module);
        let may = allowed
            .iter()
            .any(|a| named == *a || named.starts_with(&format!("{a}::")));
        if uses_crate(&source.code, "kube") && !may {
            broken.push(format!("{named} ({})", source.path.display()));
        }
    }
    assert!(broken.is_empty(), "kube used by: {}", broken.join(", "));
}

#[test]
fn no_production_file_is_over_600_lines() {
    let long: Vec<String> = modules()
        .values()
        .filter(|s| s.lines > MAX_LINES)
        .map(|s| format!("{} ({} lines)", s.path.display(), s.lines))
        .collect();
    assert!(long.is_empty(), "split these: {}", long.join(", "));
}

#[test]
fn unsafe_code_lives_only_in_the_reactor_registration_and_allocator_modules() {
    // The crate denies `unsafe_code`; two modules may allow it (see their
    // docs).
    let allowed = vec![
        src_dir().join("listener/registered.rs"),
        src_dir().join("memory/allocator.rs"),
    ];
    let mut holders: Vec<PathBuf> = modules()
        .into_values()
        .filter(|source| {
            source.code.contains("unsafe {")
                || source.code.contains("unsafe fn")
                || source.code.contains("unsafe impl")
                || source.code.contains("allow(unsafe_code)")
        })
        .map(|source| source.path)
        .collect();
    holders.sort();
    assert_eq!(holders, allowed);
}
