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

#[test]
fn the_2_4_conf_d_files_mention_every_setting() {
    let files =
        read("conf.d/2.4/90-dovepush.conf") + &read("conf.d/2.4/dovepush-endpoints.conf.ext");
    for name in code_settings() {
        // "dovepush" is the named blocks there: dovepush <name> { … }
        let written = if name == "dovepush" {
            "dovepush ox {".to_string()
        } else {
            format!("{name} =")
        };
        assert!(
            files.contains(&written),
            "conf.d/2.4/ does not mention {written}"
        );
    }
}

/// The settings Dovecot 2.4 learns from the settings module (DEF() lines and the
/// filter array of ffi/shim/dovepush-settings.c) are the ones the code reads.
#[test]
fn the_2_4_settings_module_declares_exactly_the_settings_the_code_reads() {
    let c = read("ffi/shim/dovepush-settings.c");
    let mut declared: BTreeSet<String> = c
        .lines()
        .filter_map(|line| line.trim().strip_prefix("DEF("))
        .filter_map(|rest| rest.split(',').nth(1))
        .map(|name| name.trim().trim_end_matches(')').to_string())
        .collect();
    assert!(c.contains(".key = DOVEPUSH_SETTINGS_FILTER_NAME"));
    declared.insert("dovepush".into());
    // The filter array's name field, set by Dovecot from "dovepush <name> {".
    assert!(declared.remove("dovepush_name"));
    assert_eq!(declared, code_settings());
}
