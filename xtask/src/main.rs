//! Project tasks: `cargo xtask run | deps | build-ebpf | test | check | ci | bench | deb | vmtest`.
//!
//! `ci` is `test` then `check`, the same two steps `.ci/run` takes.
//!
//! `deps` and `build-ebpf` install what they need on a Debian machine, idempotently: they
//! check before they install, so a second run takes a second.

mod deb;
mod vmtest;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian packages the integration tests use: a real hypervisor VNC server, a real
/// browser, Debian's noVNC checkout (served by relay as nova does), and the Redis and
/// HAProxy a fleet runs with (the tests start their own, on free ports); busybox for the
/// initramfs `vmtest` boots.
const APT_PACKAGES: &[&str] =
    &["qemu-system-x86", "chromium", "novnc", "redis-server", "haproxy", "mariadb-server", "systemd", "man-db", "busybox-static"];

/// What building relay needs beyond Rust and a C compiler: `make`, for jemalloc, its
/// allocator, which is built from source. Installed from Debian's packages when missing.
fn build_tools() -> Result<()> {
    if Command::new("make").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    apt_install(&["make"])
}

fn main() -> Result<()> {
    let task = std::env::args().nth(1).unwrap_or_default();
    let root = root();
    match task.as_str() {
        "deps" => deps(&root),
        "build-ebpf" => {
            ebpf_toolchain()?;
            // relay's build script compiles the program; `require` makes a failure loud.
            run(Command::new("cargo").args(["check", "--locked", "-p", "relay"]).env("RELAY_EBPF", "require").current_dir(&root))
        }
        "run" => {
            build_tools()?;
            if let Err(e) = ebpf_toolchain() {
                eprintln!("xtask: the eBPF toolchain could not be set up ({e:#}); relay runs without its kernel fast path");
            }
            // `cargo xtask run -- ARGS` and `cargo xtask run ARGS` alike.
            let args: Vec<String> = std::env::args().skip(2).skip_while(|a| a == "--").collect();
            run(Command::new("cargo").args(["run", "--release", "--locked", "-p", "relay", "--", "run"]).args(&args).current_dir(&root))
        }
        "test" => {
            deps(&root)?;
            ebpf_toolchain()?;
            test(&root)
        }
        "check" => check(&root),
        "ci" => {
            deps(&root)?;
            ebpf_toolchain()?;
            test(&root)?;
            check(&root)
        }
        "bench" => bench(&root),
        "deb" => deb::deb(&root, &std::env::args().skip(2).collect::<Vec<_>>()).map(drop),
        "vmtest" => {
            ebpf_toolchain()?;
            vmtest::vmtest(&root, &std::env::args().skip(2).collect::<Vec<_>>())
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <run|deps|build-ebpf|test|check|ci|bench|deb|vmtest>\n  run   set up the eBPF toolchain (best effort), then run relay with the embedded defaults\n        (arguments after `run` go to `relay run`)\n  deps  install test dependencies (Debian packages, npm packages)\n  build-ebpf  install the eBPF toolchain (LLVM 22, bpf-linker, nightly rust-src) and build the program\n  test  deps, build-ebpf's toolchain, then every test, then vmtest\n  check format and lint checks, and a short run of every fuzz target\n  ci    test, then check (what .ci/run does)\n  bench relay vs direct, socat, HAProxy, websockify (release build); writes docs/benchmarks.md\n        (`cargo xtask bench --help` lists relay-bench's options; `--no-install` skips apt)\n  deb   a Debian package (binary, systemd unit, config, man page, completions) in target/deb\n  vmtest  the back-end conformance subset inside Debian 12's 6.1 and 6.12 kernels under QEMU\n        (`--kernel PACKAGE`, repeatable; `--backends copy,uring,sockmap,auto`; `--only CHECK`,\n        `--repeat N`, `--log FILTER` to chase a rare failure; `--bench`)"
            );
            std::process::exit(2);
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn deps(root: &Path) -> Result<()> {
    build_tools()?;
    apt_install(APT_PACKAGES)?;
    let browser = root.join("tests/browser");
    let marker = browser.join("node_modules/.package-lock.json");
    let fresh = modified(&marker).is_some_and(|m| modified(&browser.join("package-lock.json")).is_some_and(|l| m >= l));
    if !fresh {
        run(Command::new("npm").args(["ci", "--no-audit", "--no-fund", "--loglevel=error"]).current_dir(&browser))?;
    }
    Ok(())
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn test(root: &Path) -> Result<()> {
    // Tests that need QEMU, Chromium, noVNC or the sockmap back-end fail instead of
    // skipping when these are set up: a missing tool must not pass silently here.
    run(Command::new("cargo")
        .args(["test", "--workspace", "--locked"])
        .env("RELAY_TEST_REQUIRE_ALL", "1")
        .env("RELAY_EBPF", "require")
        .current_dir(root))?;
    // Then the back-ends on the kernels relay's users run.
    vmtest::vmtest(root, &[])
}

/// Format, lints (the eBPF program's on its own target), and every fuzz target for a few
/// seconds: a parser that panics on its first inputs fails here.
fn check(root: &Path) -> Result<()> {
    run(Command::new("cargo").args(["fmt", "--all", "--check"]).current_dir(root))?;
    run(Command::new("cargo").args(["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"]).current_dir(root))?;
    fuzz_smoke(root)
}

/// Runs each fuzz target (relay/fuzz) for `FUZZ_SECONDS`, with cargo-fuzz on nightly.
fn fuzz_smoke(root: &Path) -> Result<()> {
    const FUZZ_SECONDS: &str = "10";
    let have = Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !have {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let relay = root.join("relay");
    let listed = Command::new("rustup").args(["run", "nightly", "cargo", "fuzz", "list"]).current_dir(&relay).output()?;
    let targets: Vec<String> = String::from_utf8_lossy(&listed.stdout).lines().map(str::to_string).collect();
    if targets.is_empty() {
        bail!("cargo fuzz list found no fuzz targets under relay/fuzz");
    }
    for target in &targets {
        let max_time = format!("-max_total_time={FUZZ_SECONDS}");
        run(Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "run", target, "--", &max_time])
            .env("CARGO_TARGET_DIR", root.join("target/fuzz"))
            // The parsers need no eBPF program.
            .env("RELAY_EBPF", "off")
            .current_dir(&relay))?;
    }
    eprintln!("xtask: {} fuzz targets ran {FUZZ_SECONDS} s each without a finding", targets.len());
    Ok(())
}

/// LLVM 22 for bpf-linker to link against (Debian's default LLVM is too old).
const LLVM_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev"];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What building relay-ebpf needs: LLVM 22, bpf-linker built against it, and nightly's
/// rust-src (the BPF target has no prebuilt core library).
fn ebpf_toolchain() -> Result<()> {
    apt_install(LLVM_PACKAGES)?;
    let linker = Command::new("bpf-linker").arg("--version").output();
    let have_linker = linker.is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !have_linker {
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--locked", "--version", BPF_LINKER_VERSION, "--no-default-features", "--features", "llvm-22"])
            // Without these, bpf-linker's build finds Debian's older llvm-config.
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))?;
    }
    let sysroot = Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]).output();
    let has_src = sysroot
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| Path::new(String::from_utf8_lossy(&o.stdout).trim()).join("lib/rustlib/src/rust/library/core").is_dir());
    if !has_src {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

/// Installs the Debian packages of `packages` that are missing (apt-get update first).
fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
    let apt = |args: &[&str]| {
        let mut c = Command::new(sudo.first().copied().unwrap_or("apt-get"));
        if !sudo.is_empty() {
            c.arg("apt-get");
        }
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(&mut apt(&["update", "-qq"]))?;
    run(apt(&["install", "-y", "-qq", "--no-install-recommends"]).args(&missing))
}

/// Debian packages of the proxies relay is compared with. The bench skips (visibly) any
/// that is missing, so installing them is best effort.
const BENCH_APT_PACKAGES: &[&str] = &["make", "socat", "haproxy", "websockify", "mariadb-server"];

fn bench(root: &Path) -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(2).collect();
    let no_install = args.iter().any(|a| a == "--no-install");
    args.retain(|a| a != "--no-install");
    let missing: Vec<&str> = BENCH_APT_PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if !no_install && !missing.is_empty() && is_root() {
        let apt = |extra: &[&str]| {
            let mut c = Command::new("apt-get");
            c.args(extra).env("DEBIAN_FRONTEND", "noninteractive");
            c
        };
        let installed_ok =
            run(&mut apt(&["update", "-qq"])).and_then(|()| run(apt(&["install", "-y", "-qq", "--no-install-recommends"]).args(&missing)));
        if let Err(e) = installed_ok {
            eprintln!("xtask: could not install {missing:?} ({e:#}); the bench skips what is missing");
        }
    }
    run(Command::new("cargo").args(["build", "--release", "--locked", "-p", "relay", "-p", "relay-bench"]).current_dir(root))?;
    if !args.iter().any(|a| a == "--doc" || a.starts_with("--doc=") || a == "--help" || a == "-h") {
        args.push("--doc".into());
        args.push(root.join("docs/benchmarks.md").to_string_lossy().into_owned());
    }
    run(Command::new("cargo").args(["run", "--release", "--locked", "--quiet", "-p", "relay-bench", "--"]).args(&args).current_dir(root))
}
