//! The configuration reference in receiver/README.md cannot drift from the code: every
//! `(section, key)` the config reader takes out of a table in src/config.rs is documented
//! in the README's table, and every key the table documents is read by the code.
//! (`[[apps]]` and its sub-tables are documented with the transports.)

use std::collections::BTreeSet;

fn read(path: &str) -> String {
    let full = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
}

/// `("server", "listen")`, … from the reader calls `r.string(&mut t, "server", "listen")`,
/// `r.seconds(&mut t, "outbox", …)`, … in src/config.rs.
fn keys_in_code() -> BTreeSet<(String, String)> {
    let source = read("src/config.rs");
    let mut keys = BTreeSet::new();
    let mut rest = source.as_str();
    while let Some(at) = rest.find("&mut t,") {
        rest = &rest[at + "&mut t,".len()..];
        let mut quoted = rest.split('"').skip(1).step_by(2);
        let between_ok = |s: &str| s.trim_start().starts_with('"');
        if !between_ok(rest) {
            continue;
        }
        if let (Some(section), Some(key)) = (quoted.next(), quoted.next()) {
            keys.insert((section.to_string(), key.to_string()));
        }
    }
    keys
}

/// `(section, key)` pairs of the README's table rows such as
/// ``| `[notify] password` / `password_file` |`` (a secret's `_file` variant is not a key
/// of its own).
fn keys_in_readme() -> BTreeSet<(String, String)> {
    let mut keys = BTreeSet::new();
    for line in read("README.md").lines() {
        let Some(row) = line.strip_prefix("| `[") else {
            continue;
        };
        if row.starts_with('[') || row.starts_with("apps") {
            continue;
        }
        let first_cell = row.split(" | ").next().unwrap_or_default();
        let Some((section, names)) = first_cell.split_once("] ") else {
            continue;
        };
        let names: Vec<&str> = names
            .split('`')
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .collect();
        for name in &names {
            // `password_file` next to `password` is the secret's file variant.
            let file_variant = name
                .strip_suffix("_file")
                .is_some_and(|base| names.contains(&base));
            if !file_variant {
                keys.insert((section.to_string(), name.to_string()));
            }
        }
    }
    keys
}

#[test]
fn readme_documents_exactly_the_keys_the_reader_takes() {
    let code = keys_in_code();
    let readme = keys_in_readme();
    assert!(
        code.len() > 10,
        "the scan of src/config.rs found too little: {code:?}"
    );
    let undocumented: Vec<_> = code.difference(&readme).collect();
    let stale: Vec<_> = readme.difference(&code).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "read but not documented: {undocumented:?}; documented but not read: {stale:?}"
    );
}
