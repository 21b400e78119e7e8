//! The plugin's settings reference (README.md) and the shipped conf.d snippet cannot
//! drift from the code: every setting the code reads is documented in both, and every
//! setting the README documents is read by the code.

use std::collections::BTreeSet;

use dovepush_plugin::config::SETTING_NAMES;

fn code_settings() -> BTreeSet<String> {
    SETTING_NAMES
        .iter()
        .map(|s| s.to_string())
        .chain(["dovepush".to_string(), "dovepush_url".to_string()])
        .collect()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../").to_string() + path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Setting names in the first column of the README's settings table.
fn readme_settings() -> BTreeSet<String> {
    read("README.md")
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|name| name.starts_with("dovepush"))
        .map(str::to_string)
        .collect()
}

#[test]
fn readme_documents_exactly_the_settings_the_code_reads() {
    assert_eq!(readme_settings(), code_settings());
}

#[test]
fn the_conf_d_snippet_mentions_every_setting() {
    let snippet = read("conf.d/90-dovepush.conf");
    for name in code_settings() {
        assert!(
            snippet.contains(&format!("{name} =")),
            "conf.d/90-dovepush.conf does not mention {name}"
        );
    }
}
