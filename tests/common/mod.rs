//! Shared setup for the end-to-end tests: a private Dovecot with the dovepush plugin.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use dovepush_testkit::dovecot::{built_plugin, Dovecot, Options};

pub const WAIT: Duration = Duration::from_secs(20);

/// Dovecot with `notify dovepush` for lmtp and lda, pointed at `url`, plus `extra`
/// plugin settings.
pub fn dovecot_with_dovepush(url: &str, extra: &[(&str, &str)]) -> Dovecot {
    let mut settings = vec![("dovepush_url".to_string(), url.to_string())];
    settings.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    // The spool goes into the temp dir unless the test chose one (testkit does that).
    Dovecot::start(Options {
        delivery_plugins: "notify dovepush".into(),
        dovepush_module: Some(built_plugin()),
        plugin_settings: settings,
        ..Options::default()
    })
    .expect("starting a private Dovecot")
}

/// Add plugin settings to a running instance's config and restart it.
pub fn restart_with(mut dovecot: Dovecot, settings: &[(&str, &str)]) -> Dovecot {
    let config = std::fs::read_to_string(dovecot.config_path()).unwrap();
    let mut lines = String::new();
    for (k, v) in settings {
        lines.push_str(&format!("  {k} = {v}\n"));
    }
    let config = config.replacen("plugin {\n", &format!("plugin {{\n{lines}"), 1);
    std::fs::write(dovecot.config_path(), config).unwrap();
    dovecot.restart().expect("restarting Dovecot");
    dovecot
}

/// Add top-level config lines to a running instance and restart it.
pub fn restart_with_config(mut dovecot: Dovecot, lines: &str) -> Dovecot {
    let mut config = std::fs::read_to_string(dovecot.config_path()).unwrap();
    config.push_str(lines);
    std::fs::write(dovecot.config_path(), config).unwrap();
    dovecot.restart().expect("restarting Dovecot");
    dovecot
}

/// Polls `done` every 50 ms until it holds or `timeout` passes; its last answer.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}
