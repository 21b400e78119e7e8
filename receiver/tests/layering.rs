//! The receiver's module layering, read from its sources: which module imports which
//! (`crate::…` and `super::…` paths outside `#[cfg(test)] mod tests`), with no cycle
//! between the top-level modules nor between the domain's own modules, and the domain
//! below everything that adapts it (no `http`, `cli` or `store` in it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`["domain", "outbox", "dispatcher"]`) → the module paths it refers to.
type Graph = BTreeMap<Vec<String>, BTreeSet<Vec<String>>>;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/domain/outbox/mod.rs` → `["domain", "outbox"]`; `src/lib.rs` → `[]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The code of a file without comments (docs name other modules freely) and without its
/// unit tests (`#[cfg(test)]` then `mod tests`, by convention at the end of the file).
fn code_of(text: &str) -> String {
    let mut end = text.len();
    let mut at = 0;
    while let Some(i) = text[at..].find("#[cfg(test)]") {
        let start = at + i;
        let rest = text[start + "#[cfg(test)]".len()..].trim_start();
        if rest.starts_with("mod tests") {
            end = start;
            break;
        }
        at = start + 1;
    }
    text[..end]
        .lines()
        .map(|line| line.split_once("//").map_or(line, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The module paths `code` (in module `module`) names through `crate::` or `super::`.
fn references(module: &[String], code: &str) -> BTreeSet<Vec<String>> {
    let bytes = code.as_bytes();
    let mut found = BTreeSet::new();
    for (i, _) in code
        .match_indices("crate::")
        .chain(code.match_indices("super::"))
    {
        if i > 0 && (is_ident(bytes[i - 1]) || bytes[i - 1] == b':') {
            continue; // `dovepush_receiver::crate…` or `x::super::` (handled from its start)
        }
        let mut base: Vec<String> = if code[i..].starts_with("crate::") {
            Vec::new()
        } else {
            module.to_vec()
        };
        // Walk `super::super::name::name…`.
        let mut rest = &code[i..];
        if rest.starts_with("crate::") {
            rest = &rest["crate::".len()..];
        }
        while let Some(after) = rest.strip_prefix("super::") {
            base.pop();
            rest = after;
        }
        // `super::` from `a/b.rs` means `a` (the file is module `a::b`), so the loop above
        // popped `b`: base is now the parent, as Rust resolves it.
        let segments: Vec<&str> = rest
            .split("::")
            .map(|s| {
                let end = s.bytes().position(|b| !is_ident(b)).unwrap_or(s.len());
                &s[..end]
            })
            .take_while(|s| !s.is_empty())
            .collect();
        for s in segments {
            if s.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                base.push(s.to_owned());
            } else {
                break; // a type, trait, const or macro: the path so far is the module
            }
        }
        found.insert(base);
    }
    found
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        if file.ends_with("main.rs") {
            continue; // the binary, above everything
        }
        let module = module_of(&src, &file);
        let text = std::fs::read_to_string(&file).unwrap();
        graph.insert(module.clone(), references(&module, &code_of(&text)));
    }
    // A path's last lowercase segment may be a function (`crate::telemetry::init_tracing`):
    // each reference counts as the longest module it starts with.
    let modules: BTreeSet<Vec<String>> = graph.keys().cloned().collect();
    for refs in graph.values_mut() {
        *refs = refs
            .iter()
            .map(|r| {
                let mut r = r.clone();
                while !r.is_empty() && !modules.contains(&r) {
                    r.pop();
                }
                r
            })
            .collect();
    }
    graph
}

/// Edges between the modules at `depth` below `prefix` (each reference cut to that
/// depth), without self-edges and without the crate root (`run`, the wiring).
fn edges_at(graph: &Graph, prefix: &[&str], depth: usize) -> BTreeMap<String, BTreeSet<String>> {
    let within =
        |m: &Vec<String>| m.len() > prefix.len() && m.iter().zip(prefix).all(|(a, b)| a == b);
    let node = |m: &Vec<String>| m[prefix.len()..][..depth.min(m.len() - prefix.len())].join("::");
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, refs) in graph.iter().filter(|(m, _)| within(m)) {
        let from = node(from);
        let targets = edges.entry(from.clone()).or_default();
        for to in refs.iter().filter(|m| within(m)) {
            let to = node(to);
            if to != from {
                targets.insert(to);
            }
        }
    }
    edges
}

/// A cycle in `edges`, if there is one.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut cycle = path[at..].to_vec();
            cycle.push(n.to_owned());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for next in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for n in edges.keys() {
        if let Some(c) = visit(n, edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_reader_sees_imports() {
    let module = vec![
        "domain".to_owned(),
        "outbox".to_owned(),
        "dispatcher".to_owned(),
    ];
    let refs = references(
        &module,
        "use super::schedule::{Claim, Schedule};\nuse crate::domain::store::Store;\nuse super::super::device::RegisteredDevice;\nfn f() { crate::telemetry::init_tracing() }",
    );
    let refs: Vec<String> = refs.iter().map(|m| m.join("::")).collect();
    assert_eq!(
        refs,
        vec![
            "domain::device",
            "domain::outbox::schedule",
            "domain::store",
            "telemetry::init_tracing"
        ]
    );
    assert_eq!(
        code_of("a // see crate::x\n#[cfg(test)]\nmod tests {\n crate::x::y }"),
        "a "
    );
    let mut cyclic = BTreeMap::new();
    cyclic.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    cyclic.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        find_cycle(&cyclic),
        Some(vec!["a".into(), "b".into(), "a".into()])
    );
}

#[test]
fn no_cycle_between_top_level_modules() {
    let edges = edges_at(&graph(), &[], 1);
    assert!(
        edges.contains_key("domain") && edges.contains_key("store"),
        "{edges:?}"
    );
    assert_eq!(find_cycle(&edges), None, "{edges:#?}");
}

#[test]
fn no_cycle_between_domain_modules() {
    let edges = edges_at(&graph(), &["domain"], 1);
    assert!(edges.contains_key("outbox"), "{edges:?}");
    assert_eq!(find_cycle(&edges), None, "{edges:#?}");
    let edges = edges_at(&graph(), &["domain", "outbox"], 1);
    assert_eq!(find_cycle(&edges), None, "{edges:#?}");
}

#[test]
fn no_cycle_between_the_submodules_of_any_module() {
    let graph = graph();
    let parents: BTreeSet<Vec<String>> = graph
        .keys()
        .filter(|m| !m.is_empty())
        .map(|m| m[..m.len() - 1].to_vec())
        .collect();
    assert!(parents.contains(&vec!["store".to_owned(), "sqlite".to_owned()]));
    for parent in parents {
        let prefix: Vec<&str> = parent.iter().map(String::as_str).collect();
        let edges = edges_at(&graph, &prefix, 1);
        assert_eq!(find_cycle(&edges), None, "under {parent:?}: {edges:#?}");
    }
}

#[test]
fn the_domain_knows_no_adapter_above_or_below_it() {
    let edges = edges_at(&graph(), &[], 1);
    let domain = &edges["domain"];
    for adapter in ["http", "cli", "store"] {
        assert!(
            !domain.contains(adapter),
            "domain imports {adapter}: {domain:?}"
        );
    }
    assert!(
        edges["store"].contains("domain"),
        "the store implements the domain's port"
    );
    assert!(!edges["transport"].contains("domain"), "{edges:?}");
    assert!(!edges["telemetry"].contains("transport"), "{edges:?}");
}
