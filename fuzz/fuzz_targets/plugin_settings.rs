//! The dovepush_* settings in both syntaxes (`dovepush = ox:…` lines and separate keys):
//! `key=value` lines in, a config plus problems out, never a panic; every problem names
//! a key that was given.
#![no_main]

use std::collections::HashMap;

use dovepush_settings::{parse_ox_line, Config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let settings: HashMap<String, String> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .collect();
    let get = |name: &str| settings.get(name).cloned();
    let (config, problems) = Config::from_settings(&get, "/var/lib/dovecot");
    for problem in &problems {
        assert!(settings.contains_key(&problem.key), "{problem}");
    }
    // The URL that is logged carries no credentials (an '@' in its path is fine: found by
    // fuzzing, see settings' display_url_keeps_an_at_sign_in_the_path test).
    for e in &config.endpoints {
        let shown = url::Url::parse(&e.display_url).expect("the display URL parses");
        assert!(
            shown.username().is_empty() && shown.password().is_none(),
            "{}",
            e.display_url
        );
    }
    let _ = parse_ox_line("dovepush", text);
});
