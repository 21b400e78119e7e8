//! The configuration reference in receiver/README.md cannot drift from the code: every
//! `(section, key)` of the config file's serde types (src/config/file.rs) is documented
//! in the README's table, and every key the table documents is read by the code.
//! (`[[apps]]` and its sub-tables are documented with the transports.)

use std::collections::BTreeSet;

fn read(path: &str) -> String {
    let full = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
}

/// `("server", "listen")`, … : the keys of the file's sections, as the serde types
/// declare them (a secret's `_file` variant, such as `password_file` next to `password`,
/// is not a key of its own).
fn keys_in_code() -> BTreeSet<(String, String)> {
    let keys = dovepush_receiver::config::file::section_keys();
    keys.iter()
        .filter(|(section, key)| {
            !key.strip_suffix("_file")
                .is_some_and(|base| keys.contains(&(section, base)))
        })
        .map(|(section, key)| (section.to_string(), key.to_string()))
        .collect()
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
        "the config types declare too little: {code:?}"
    );
    let undocumented: Vec<_> = code.difference(&readme).collect();
    let stale: Vec<_> = readme.difference(&code).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "read but not documented: {undocumented:?}; documented but not read: {stale:?}"
    );
}
