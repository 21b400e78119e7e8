//! Forwards the Dovecot install facts published by `dovepush-ffi` (`DEP_DOVECOT_*`, see
//! `ffi/build.rs`) into the root package, whose end-to-end tests need them.

fn main() {
    for (dep, var) in [
        ("DEP_DOVECOT_MODULE_DIR", "DOVEPUSH_DOVECOT_MODULE_DIR"),
        ("DEP_DOVECOT_LIBEXEC_DIR", "DOVEPUSH_DOVECOT_LIBEXEC_DIR"),
        ("DEP_DOVECOT_ABI_VERSION", "DOVEPUSH_DOVECOT_ABI_VERSION"),
    ] {
        println!("cargo:rerun-if-env-changed={dep}");
        let value = std::env::var(dep).unwrap_or_else(|_| panic!("{dep} not set by dovepush-ffi"));
        println!("cargo:rustc-env={var}={value}");
    }
}
