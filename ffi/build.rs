//! Finds the installed Dovecot (through `dovecot-config` from the dovecot-dev package),
//! reads its version and ABI version, declares the C shim to Rust with bindgen, compiles
//! the shim with `cc` for that version (2.3 or 2.4), and publishes the install facts to
//! direct dependents as `DEP_DOVECOT_*`.
//!
//! For Dovecot 2.4 it also builds the settings module, `libdovepush_settings.so`: the
//! typed settings (`shim/dovepush-settings.c`) plus their `dovepush_settings_set_infos`
//! (`shim/dovepush-settings-module.c`), linked by the C compiler alone, so that the
//! config process that loads it gets no Rust runtime and no reference to a mail-process
//! symbol (it `dlopen`s with `RTLD_NOW`). It is copied next to the other artifacts
//! (`target/<profile>/`), where the tests and `cargo deb` find it.

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
    /// `(major, minor)` from `config.h`.
    version: (u32, u32),
}

impl DovecotInstall {
    fn is_24(&self) -> bool {
        self.version >= (2, 4)
    }
}

fn main() {
    println!("cargo:rerun-if-env-changed={CONFIG_VAR}");
    println!("cargo:rerun-if-changed=../include/dovepush-shim.h");
    println!("cargo:rerun-if-changed=shim/dovepush-shim.c");
    println!("cargo:rerun-if-changed=shim/dovepush-settings.c");
    println!("cargo:rerun-if-changed=shim/dovepush-settings.h");
    println!("cargo:rerun-if-changed=shim/dovepush-settings-module.c");
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

    let state_dir = format!("\"{}\"", install.state_dir.display());
    let c_build = || {
        let mut build = cc::Build::new();
        build
            .include(&install.include_dir)
            .include(&include_shim)
            .include("shim")
            .define("HAVE_CONFIG_H", None)
            .define("DOVEPUSH_STATE_DIR", state_dir.as_str())
            // 2.4's headers use C11 (its own build uses gnu11).
            .flag_if_supported(if install.is_24() {
                "-std=gnu11"
            } else {
                "-std=gnu99"
            })
            // -Wall (no -w, which would also silence the error below), not -Wextra:
            // Dovecot's headers are not -Wextra clean.
            .warnings(true)
            .extra_warnings(false)
            // A function the shim calls without its header would be resolved only when
            // Dovecot loads the plugin, and fail there: make it a build error instead.
            .flag("-Werror=implicit-function-declaration");
        if install.is_24() {
            build.define("DOVEPUSH_DOVECOT24", None);
        }
        build
    };
    let mut shim = c_build();
    shim.file("shim/dovepush-shim.c");
    if install.is_24() {
        shim.file("shim/dovepush-settings.c");
    }
    shim.compile("dovepush_shim");
    let settings_module = if install.is_24() {
        Some(build_settings_module(c_build(), &out))
    } else {
        None
    };

    println!(
        "cargo:rustc-env=DOVECOT_ABI_VERSION={}",
        install.abi_version
    );
    println!(
        "cargo:rustc-env=DOVECOT_STATE_DIR={}",
        install.state_dir.display()
    );
    let version = format!("{}.{}", install.version.0, install.version.1);
    println!("cargo:rustc-env=DOVECOT_VERSION={version}");
    println!("cargo:rustc-check-cfg=cfg(dovecot24)");
    if install.is_24() {
        println!("cargo:rustc-cfg=dovecot24");
    }
    println!("cargo:version={version}");
    println!(
        "cargo:settings_module={}",
        settings_module
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    println!("cargo:abi_version={}", install.abi_version);
    println!("cargo:module_dir={}", install.module_dir.display());
    println!("cargo:libexec_dir={}", install.libexec_dir.display());
    println!("cargo:state_dir={}", install.state_dir.display());
    println!("cargo:include_dir={}", install.include_dir.display());
}

/// Link `libdovepush_settings.so` (Dovecot 2.4) in `out` and copy it to the profile
/// directory (`target/<profile>/`, three levels above `OUT_DIR`) by write and rename, so
/// that a process that has the old file mapped keeps it. Returns the copy's path (or
/// the one in `out` when the layout is not cargo's usual one).
fn build_settings_module(mut build: cc::Build, out: &Path) -> PathBuf {
    let objects = build
        .file("shim/dovepush-settings.c")
        .file("shim/dovepush-settings-module.c")
        .compile_intermediates();
    let module = out.join("libdovepush_settings.so");
    let status = build
        .get_compiler()
        .to_command()
        .arg("-shared")
        .arg("-o")
        .arg(&module)
        .args(&objects)
        .status()
        .expect("running the C compiler to link libdovepush_settings.so");
    assert!(status.success(), "linking libdovepush_settings.so failed");
    let profile_dir = out
        .parent()
        .filter(|pkg| {
            pkg.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("dovepush-ffi-"))
        })
        .and_then(Path::parent)
        .filter(|build| build.file_name().is_some_and(|n| n == "build"))
        .and_then(Path::parent);
    let Some(profile_dir) = profile_dir else {
        println!(
            "cargo:warning=libdovepush_settings.so stays in {} (unexpected target layout)",
            out.display()
        );
        return module;
    };
    let dest = profile_dir.join("libdovepush_settings.so");
    let tmp = profile_dir.join(".libdovepush_settings.so.new");
    fs::copy(&module, &tmp).expect("copying libdovepush_settings.so");
    fs::rename(&tmp, &dest).expect("renaming libdovepush_settings.so into place");
    dest
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
    let define = |name: &str| -> Option<u32> {
        header.lines().find_map(|line| {
            let rest = line.trim().strip_prefix("#define ")?.strip_prefix(name)?;
            rest.trim().parse().ok()
        })
    };
    // 2.3 and 2.4 both define these; the ABI string ("2.4.ABIv1") says it too.
    let version = match (
        define("DOVECOT_VERSION_MAJOR"),
        define("DOVECOT_VERSION_MINOR"),
    ) {
        (Some(major), Some(minor)) => (major, minor),
        _ => {
            let mut parts = abi_version.split('.').map(|p| p.parse::<u32>().ok());
            match (parts.next().flatten(), parts.next().flatten()) {
                (Some(major), Some(minor)) => (major, minor),
                _ => {
                    return Err(format!(
                        "{} says neither DOVECOT_VERSION_MAJOR/MINOR nor a version in \
                         DOVECOT_ABI_VERSION {abi_version:?}",
                        config_h.display()
                    ))
                }
            }
        }
    };
    println!("cargo:rerun-if-changed={}", config_path.display());
    println!("cargo:rerun-if-changed={}", config_h.display());
    Ok(DovecotInstall {
        include_dir,
        module_dir,
        libexec_dir,
        state_dir,
        abi_version,
        version,
    })
}
