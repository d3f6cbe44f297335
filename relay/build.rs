//! Builds the eBPF program (../relay-ebpf) for relay to embed, when this machine has the
//! toolchain for it (nightly's rust-src and bpf-linker; `cargo xtask build-ebpf` installs
//! them). Without it relay still builds: it embeds an empty object and says at start-up
//! that the sockmap back-end is unavailable and why.
//!
//! `RELAY_EBPF=off` skips the eBPF build; `RELAY_EBPF=require` makes a missing toolchain
//! or a failed build an error (CI uses it, so a broken program cannot pass as "absent").

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    let out = out_dir.join("relay-ebpf.o");
    for watched in ["relay-ebpf/src", "relay-ebpf/build.rs", "relay-ebpf/Cargo.toml", "Cargo.lock", "relay-common/src"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=RELAY_EBPF");
    // Where `cargo xtask build-ebpf` installs bpf-linker: a relay built before it came
    // (say, the release build) must not stay without its program. While the file is
    // missing, Cargo runs this script at every build, which costs a failed spawn.
    let cargo_home =
        std::env::var_os("CARGO_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    if let Some(home) = cargo_home {
        println!("cargo:rerun-if-changed={}", home.join("bin").join("bpf-linker").display());
    }
    // The CLI test that runs relay as an unprivileged user needs root and setpriv to drop
    // to one; elsewhere it is compiled as ignored, with that reason (see tests/build.rs).
    println!("cargo::rustc-check-cfg=cfg(relay_no_setpriv)");
    println!("cargo:rerun-if-env-changed=RELAY_TEST_REQUIRE_ALL");
    let root_user = std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if !(root_user && Path::new("/usr/bin/setpriv").exists()) && std::env::var_os("RELAY_TEST_REQUIRE_ALL").is_none() {
        println!("cargo::rustc-cfg=relay_no_setpriv");
    }
    let mode = std::env::var("RELAY_EBPF").unwrap_or_default();

    let built = match mode.as_str() {
        "off" => Err("built with RELAY_EBPF=off".to_string()),
        _ => build(&root, &out_dir.join("ebpf")),
    };
    let missing = match built {
        Ok(object) => {
            std::fs::copy(&object, &out).unwrap();
            String::new()
        }
        Err(why) => {
            if mode == "require" {
                panic!("RELAY_EBPF=require, but the eBPF program did not build: {why}");
            }
            for line in why.lines() {
                println!("cargo:warning={line}");
            }
            println!("cargo:warning=relay built without its eBPF program; `cargo xtask build-ebpf` sets it up");
            std::fs::write(&out, b"").unwrap();
            why.lines().next().unwrap_or_default().to_string()
        }
    };
    println!("cargo:rustc-env=RELAY_EBPF_OBJECT={}", out.display());
    println!("cargo:rustc-env=RELAY_EBPF_MISSING={missing}");
}

/// Builds the workspace's relay-ebpf package for the BPF target, with its own target
/// directory under this build's OUT_DIR (the outer cargo holds the workspace's).
fn build(root: &Path, target_dir: &Path) -> Result<PathBuf, String> {
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|o| o.status.success()) {
        return Err("bpf-linker is not installed".into());
    }
    let sysroot = Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]).output();
    let has_src = sysroot
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| Path::new(String::from_utf8_lossy(&o.stdout).trim()).join("lib/rustlib/src/rust/library/core").is_dir());
    if !has_src {
        return Err("nightly Rust with rust-src is not installed".into());
    }
    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", "nightly", "cargo", "build", "--release", "--locked", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--package", "relay-ebpf"])
        .current_dir(root)
        .arg("--target-dir")
        .arg(target_dir);
    // The outer cargo's settings are for the host build (clippy's wrapper among them);
    // the nested build chooses its own.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTUP_TOOLCHAIN"
            || key == "RUSTDOCFLAGS"
        {
            cargo.env_remove(&*key);
        }
    }
    // BTF function info for every function the program links (bpf_loop's callback needs
    // it), so full debug info for core and aya-ebpf too, not only relay-ebpf.
    cargo.env("CARGO_PROFILE_RELEASE_DEBUG", "2");
    let output = cargo.output().map_err(|e| format!("running cargo for the eBPF program: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!("the eBPF build failed:\n{}", tail.join("\n")));
    }
    Ok(target_dir.join("bpfel-unknown-none/release/relay-ebpf"))
}
