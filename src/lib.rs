//! The `dovepush` root package exists to own the end-to-end tests in `tests/` (a real
//! Dovecot with the plugin loaded) and the `build.rs` that forwards Dovecot install facts
//! to them. The product lives in `ffi/`, `dovecot-plugin/` and `receiver/`.

/// Where the installed Dovecot keeps its modules and helper binaries, as found at build
/// time by `dovepush-ffi` from `dovecot-config`.
pub mod install {
    pub const MODULE_DIR: &str = env!("DOVEPUSH_DOVECOT_MODULE_DIR");
    pub const LIBEXEC_DIR: &str = env!("DOVEPUSH_DOVECOT_LIBEXEC_DIR");
    pub const ABI_VERSION: &str = env!("DOVEPUSH_DOVECOT_ABI_VERSION");
}
