//! Finds the installed Dovecot (through `dovecot-config` from the dovecot-dev package),
//! reads its ABI version, declares the C shim to Rust with bindgen, compiles the shim
//! with `cc`, and publishes the install facts to direct dependents as `DEP_DOVECOT_*`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

const CONFIG_VAR: &str = "DOVECOT_CONFIG";
const DEFAULT_CONFIG: &str = "/usr/lib/dovecot/dovecot-config";

struct DovecotInstall {
    include_dir: PathBuf,
    module_dir: PathBuf,
    libexec_dir: PathBuf,
    state_dir: PathBuf,
    abi_version: String,
}

fn main() {
    println!("cargo:rerun-if-env-changed={CONFIG_VAR}");
    println!("cargo:rerun-if-changed=../include/dovepush-shim.h");
    println!("cargo:rerun-if-changed=shim/dovepush-shim.c");
    let install = find_dovecot().unwrap_or_else(|problem| {
        panic!(
            "\n\ndovepush needs the Dovecot development files: {problem}.\n\
             Install them with `apt-get install dovecot-dev` (Debian/Ubuntu), or point \
             {CONFIG_VAR} at the `dovecot-config` file of your Dovecot build.\n\n"
        )
    });
    let include_shim = Path::new(env!("CARGO_MANIFEST_DIR")).join("../include");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));

    bindgen::Builder::default()
        .header(include_shim.join("dovepush-shim.h").display().to_string())
        .allowlist_function("dovepush_shim_.*")
        .allowlist_type("dovepush_.*")
        .allowlist_var("DOVEPUSH_.*")
        .opaque_type("mail_user|mailbox|module")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .layout_tests(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .expect("bindgen could not read include/dovepush-shim.h")
        .write_to_file(out.join("bindings.rs"))
        .expect("writing bindings.rs");

    cc::Build::new()
        .file("shim/dovepush-shim.c")
        .include(&install.include_dir)
        .include(&include_shim)
        .define("HAVE_CONFIG_H", None)
        .flag_if_supported("-std=gnu99")
        // -Wall (no -w, which would also silence the error below), not -Wextra: Dovecot's
        // headers are not -Wextra clean.
        .warnings(true)
        .extra_warnings(false)
        // A function the shim calls without its header would be resolved only when
        // Dovecot loads the plugin, and fail there: make it a build error instead.
        .flag("-Werror=implicit-function-declaration")
        .compile("dovepush_shim");

    println!(
        "cargo:rustc-env=DOVECOT_ABI_VERSION={}",
        install.abi_version
    );
    println!(
        "cargo:rustc-env=DOVECOT_STATE_DIR={}",
        install.state_dir.display()
    );
    println!("cargo:abi_version={}", install.abi_version);
    println!("cargo:module_dir={}", install.module_dir.display());
    println!("cargo:libexec_dir={}", install.libexec_dir.display());
    println!("cargo:state_dir={}", install.state_dir.display());
    println!("cargo:include_dir={}", install.include_dir.display());
}

fn find_dovecot() -> Result<DovecotInstall, String> {
    let config_path = env::var_os(CONFIG_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let text = fs::read_to_string(&config_path)
        .map_err(|e| format!("cannot read {} ({e})", config_path.display()))?;
    let value = |key: &str| -> Option<String> {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(key)?.strip_prefix('=')?;
            Some(
                rest.trim()
                    .trim_matches(|c| c == '"' || c == '\'')
                    .to_string(),
            )
        })
    };
    let include_dir = value("dovecot_pkgincludedir")
        .or_else(|| value("LIBDOVECOT_INCLUDE").map(|v| v.trim_start_matches("-I").to_string()))
        .map(PathBuf::from)
        .ok_or_else(|| format!("{} names no include directory", config_path.display()))?;
    let module_dir = PathBuf::from(
        value("dovecot_moduledir").unwrap_or_else(|| "/usr/lib/dovecot/modules".into()),
    );
    let libexec_dir =
        PathBuf::from(value("dovecot_pkglibexecdir").unwrap_or_else(|| "/usr/lib/dovecot".into()));
    let state_dir =
        PathBuf::from(value("dovecot_statedir").unwrap_or_else(|| "/var/lib/dovecot".into()));
    let config_h = include_dir.join("config.h");
    let header = fs::read_to_string(&config_h)
        .map_err(|e| format!("cannot read {} ({e})", config_h.display()))?;
    let abi_version = header
        .lines()
        .find_map(|line| {
            let rest = line.trim().strip_prefix("#define DOVECOT_ABI_VERSION")?;
            Some(rest.trim().trim_matches('"').to_string())
        })
        .ok_or_else(|| format!("{} defines no DOVECOT_ABI_VERSION", config_h.display()))?;
    println!("cargo:rerun-if-changed={}", config_path.display());
    println!("cargo:rerun-if-changed={}", config_h.display());
    Ok(DovecotInstall {
        include_dir,
        module_dir,
        libexec_dir,
        state_dir,
        abi_version,
    })
}
