//! `cargo xtask vmtest`: the back-end conformance subset (`vmcheck`) inside the kernels
//! relay's users run, booted under QEMU (TCG: this machine's KVM cannot run them) from an
//! initramfs. Kernel packages come from Debian with `apt-get download` and are cached
//! under `target/vmtest/`, with what is built from them.
//!
//! Options: `--kernel PACKAGE` (repeatable; default: the images `linux-image-amd64` and
//! `linux-image-6.12-amd64` depend on, Debian 12's 6.1 and 6.12) and `--backends
//! copy,uring,sockmap,auto` (default: all four; auto's checks: choosing between the
//! kernel back-ends, and typing consoles to the ring with `quiet_backend = "uring"`;
//! `none` runs no check), and `--bench`: also
//! measure a TLS console's cost with TLS in rustls, in the kernel relayed by copy, and
//! spliced by the ring. For chasing a rare failure: `--only CHECK` (one check by name),
//! `--repeat N` (each check N times) and `--log FILTER` (relay's log filter, default `warn`).

use super::{apt_install, run};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The meta-packages whose current image is tested by default.
const DEFAULT_KERNELS: &[&str] = &["linux-image-amd64", "linux-image-6.12-amd64"];
/// How long one kernel may take to boot and run every check under emulation.
const BOOT_TIMEOUT: Duration = Duration::from_secs(1500);

/// Options that take a value; `--bench` takes none.
const VALUE_FLAGS: &[&str] = &["--kernel", "--backends", "--only", "--repeat", "--log"];

const USAGE: &str = "usage: cargo xtask vmtest [--kernel PACKAGE]... [--backends copy,uring,sockmap,auto|none] \
[--only CHECK] [--repeat N] [--log FILTER] [--bench]";

/// What a vmtest run was asked for, read once from its arguments.
#[derive(Default)]
struct Options {
    kernels: Vec<String>,
    backends: Option<String>,
    only: Option<String>,
    repeat: Option<String>,
    log: Option<String>,
    bench: bool,
}

/// Reads the arguments; None for --help. A mistyped option must not start a run of many
/// minutes that ignores it.
fn parse(args: &[String]) -> Result<Option<Options>> {
    let mut options = Options::default();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--help" | "-h" => return Ok(None),
            "--bench" => options.bench = true,
            flag if VALUE_FLAGS.contains(&flag) => {
                let Some(v) = rest.next() else { bail!("{flag} needs a value\n{USAGE}") };
                match flag {
                    "--kernel" => options.kernels.push(v.clone()),
                    "--repeat" if v.parse::<usize>().map_or(true, |n| n == 0) => bail!("--repeat takes a positive number, not {v:?}"),
                    "--backends" if v != "none" && v.split(',').any(|b| !["copy", "uring", "sockmap", "auto"].contains(&b)) => {
                        bail!("--backends takes copy, uring, sockmap and auto, comma-separated, or none; not {v:?}")
                    }
                    "--backends" => options.backends = Some(v.clone()),
                    // The kernel command line splits on spaces; the guest's /init reads each back.
                    _ if v.contains(char::is_whitespace) => bail!("{flag} takes one word"),
                    "--only" => options.only = Some(v.clone()),
                    "--repeat" => options.repeat = Some(v.clone()),
                    _ => options.log = Some(v.clone()),
                }
            }
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    Ok(Some(options))
}

pub fn vmtest(root: &Path, args: &[String]) -> Result<()> {
    let Some(asked) = parse(args)? else {
        println!("{USAGE}");
        return Ok(());
    };
    let backends = asked.backends.unwrap_or_else(|| "copy,uring,sockmap,auto".into());
    let mut options = vec![format!("vmcheck.backends={backends}")];
    for (param, v) in [("only", &asked.only), ("repeat", &asked.repeat), ("log", &asked.log)] {
        options.extend(v.as_ref().map(|v| format!("vmcheck.{param}={v}")));
    }
    if asked.bench {
        options.push("vmcheck.bench=bench".into());
    }
    let kernels = match asked.kernels {
        k if k.is_empty() => match DEFAULT_KERNELS.iter().map(|m| image_of(m)).collect::<Result<Vec<_>>>() {
            Ok(images) => images,
            // A machine whose package lists are missing or old: read them, then ask again.
            Err(_) => {
                run(Command::new("apt-get").args(["update", "-qq"]))?;
                DEFAULT_KERNELS.iter().map(|m| image_of(m)).collect::<Result<Vec<_>>>()?
            }
        },
        k => k,
    };
    apt_install(&["qemu-system-x86", "busybox-static", "xz-utils", "zstd"])?;
    let cache = root.join("target/vmtest");
    std::fs::create_dir_all(cache.join("debs"))?;
    let vmcheck = build_vmcheck(root, &cache)?;
    let mut boots = Vec::new();
    for package in &kernels {
        let tree = unpack(&cache, package)?;
        let vmlinuz = only_file(&tree.join("boot"), "vmlinuz-")?;
        let initrd = initramfs(&cache, package, &tree, &vmcheck)?;
        let log = cache.join(format!("{package}.log"));
        eprintln!("xtask: booting {package} under QEMU (TCG); its console goes to {}", log.display());
        boots.push((package.clone(), log.clone(), boot(&vmlinuz, &initrd, &log, &options.join(" "))?));
    }
    let mut failed = Vec::new();
    for (package, log, mut qemu) in boots {
        let started = Instant::now();
        let finished = loop {
            if let Some(status) = qemu.try_wait()? {
                break Some(status);
            }
            if started.elapsed() > BOOT_TIMEOUT {
                let _ = qemu.kill();
                let _ = qemu.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let console = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
        let lines: Vec<&str> = console.lines().filter_map(|l| l.trim_end_matches('\r').split_once("vmcheck: ").map(|(_, r)| r)).collect();
        for line in &lines {
            println!("{package}: {line}");
        }
        let passed = lines.contains(&"done, 0 failed") && !lines.iter().any(|l| l.contains(": FAIL"));
        if finished.is_none() {
            println!("{package}: did not finish within {BOOT_TIMEOUT:?} (see {})", log.display());
        }
        if !passed || finished.is_none() {
            failed.push(package);
        }
    }
    if !failed.is_empty() {
        bail!("vmtest failed on {}", failed.join(", "));
    }
    Ok(())
}

/// The kernel image package a meta-package depends on now, e.g. `linux-image-6.1.0-57-amd64`.
fn image_of(meta: &str) -> Result<String> {
    let out = Command::new("apt-cache").args(["depends", "--no-recommends", "--no-suggests", meta]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && !p.contains('<'))
        .map(str::to_string)
        .with_context(|| format!("apt-cache knows no kernel image for {meta} (apt-get update?): {text}"))
}

/// The package unpacked under the cache (downloaded first, once).
fn unpack(cache: &Path, package: &str) -> Result<PathBuf> {
    let tree = cache.join("kernels").join(package);
    if tree.join("boot").is_dir() {
        return Ok(tree);
    }
    let debs = cache.join("debs");
    let deb = match find_deb(&debs, package) {
        Some(deb) => deb,
        None => {
            run(Command::new("apt-get").args(["download", "-q", package]).current_dir(&debs))?;
            find_deb(&debs, package).with_context(|| format!("apt-get download left no {package} package"))?
        }
    };
    let partial = cache.join("kernels").join(format!("{package}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    std::fs::rename(&partial, &tree)?;
    Ok(tree)
}

fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb")))
}

fn only_file(dir: &Path, prefix: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
        .with_context(|| format!("no {prefix}* in {}", dir.display()))
}

/// `vmcheck` built (with relay's eBPF program in it) and stripped.
fn build_vmcheck(root: &Path, cache: &Path) -> Result<PathBuf> {
    run(Command::new("cargo")
        .args(["build", "--locked", "-p", "relay-tests", "--bin", "vmcheck"])
        .env("RELAY_EBPF", "require")
        .current_dir(root))?;
    let stripped = cache.join("vmcheck");
    run(Command::new("objcopy").arg("--strip-debug").arg(root.join("target/debug/vmcheck")).arg(&stripped))?;
    Ok(stripped)
}

/// The initramfs: busybox, an `/init` that runs `vmcheck` and powers off, `vmcheck` with
/// the shared libraries it loads, and the kernel's TLS and crypto modules (kTLS).
fn initramfs(cache: &Path, package: &str, tree: &Path, vmcheck: &Path) -> Result<PathBuf> {
    let stage = cache.join(format!("stage-{package}"));
    let _ = std::fs::remove_dir_all(&stage);
    for dir in ["bin", "proc", "sys", "dev", "tmp", "root"] {
        std::fs::create_dir_all(stage.join(dir))?;
    }
    std::fs::copy("/bin/busybox", stage.join("bin/busybox")).context("busybox (busybox-static)")?;
    std::fs::copy(vmcheck, stage.join("vmcheck"))?;
    for lib in shared_libraries(vmcheck)? {
        let to = stage.join(lib.strip_prefix("/").unwrap_or(&lib));
        std::fs::create_dir_all(to.parent().expect("a library's directory"))?;
        std::fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
    }
    tls_modules(tree, &stage)?;
    write_executable(&stage.join("init"), INIT)?;
    let out = cache.join(format!("{package}.initrd.gz"));
    let cpio = format!(
        "cd '{}' && find . | LC_ALL=C sort | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -6 > '{}'",
        stage.display(),
        out.display()
    );
    run(Command::new("sh").args(["-c", &cpio]))?;
    std::fs::remove_dir_all(&stage)?;
    Ok(out)
}

/// The module directories kTLS draws on (`tls.ko`; AES-GCM and ChaCha20-Poly1305, which
/// the kernel builds from templates in crypto/ and drivers in arch/x86/crypto and
/// lib/crypto), decompressed, for busybox's depmod and modprobe in the guest.
fn tls_modules(tree: &Path, stage: &Path) -> Result<()> {
    let modules = tree.join("lib/modules");
    let version = only_file(&modules, "")?;
    let name = version.file_name().context("a module directory name")?;
    for dir in ["kernel/net/tls", "kernel/crypto", "kernel/arch/x86/crypto", "kernel/lib/crypto"] {
        let from = version.join(dir);
        if !from.is_dir() {
            continue;
        }
        let to = stage.join("lib/modules").join(name).join(dir);
        std::fs::create_dir_all(&to)?;
        for module in walk(&from)? {
            let relative = module.strip_prefix(&from)?;
            let file = relative.to_string_lossy();
            let (plain, tool) = match file.rsplit_once('.') {
                Some((stem, "xz")) => (stem.to_string(), Some("xz")),
                Some((stem, "zst")) => (stem.to_string(), Some("zstd")),
                _ => (file.to_string(), None),
            };
            let out = to.join(plain);
            std::fs::create_dir_all(out.parent().context("a module's directory")?)?;
            match tool {
                Some(tool) => {
                    let unpacked = Command::new(tool).arg("-dc").arg(&module).output()?;
                    if !unpacked.status.success() {
                        bail!("{tool} -dc {} failed", module.display());
                    }
                    std::fs::write(&out, unpacked.stdout)?;
                }
                None => {
                    std::fs::copy(&module, &out)?;
                }
            }
        }
    }
    Ok(())
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() { files.extend(walk(&path)?) } else { files.push(path) }
    }
    Ok(files)
}

/// What `ldd` says `binary` loads (the dynamic loader included).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')).map(PathBuf::from))
        .collect())
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// PID 1 in the guest. The back-ends to check come on the kernel command line.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
ip link set lo up
ulimit -n 65536
# kTLS: the TLS module and the crypto it asks for; the kernel's own module loader is
# pointed at busybox's modprobe for anything else it asks for.
depmod
echo /bin/modprobe > /proc/sys/kernel/modprobe
for m in tls gcm ctr ghash-generic ghash-clmulni-intel aesni-intel chacha20poly1305 chacha-x86_64 chacha-generic poly1305-x86_64 poly1305-generic; do
  modprobe $m 2>/dev/null
done
param() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^vmcheck.$1=//p"; }
log=$(param log)
echo "vmcheck: kernel $(uname -r), $(nproc) CPUs, uptime $(cut -d' ' -f1 /proc/uptime) s"
HOME=/root RUST_LOG=${log:-warn} RUST_BACKTRACE=0 VMCHECK_BACKENDS=$(param backends) VMCHECK_ONLY=$(param only) \
  VMCHECK_REPEAT=$(param repeat) VMCHECK_BENCH=$(param bench) /vmcheck
poweroff -f
"#;

/// Starts QEMU on `vmlinuz` and `initrd`, its serial console into `log`.
fn boot(vmlinuz: &Path, initrd: &Path, log: &Path, options: &str) -> Result<std::process::Child> {
    let console = std::fs::File::create(log)?;
    Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1536", "-nographic", "-no-reboot", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {options}"))
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .spawn()
        .context("starting qemu-system-x86_64")
}

#[cfg(test)]
mod tests {
    use super::parse;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options_are_read_once_and_mistakes_refused_before_a_run() {
        let asked = parse(&args("--kernel a --only x --kernel b --only y --backends uring --bench")).unwrap().unwrap();
        assert_eq!(asked.kernels, ["a", "b"], "kernels add up");
        assert_eq!(asked.only.as_deref(), Some("y"), "the last --only counts");
        assert_eq!((asked.repeat, asked.log), (None, None));
        assert_eq!(asked.backends.as_deref(), Some("uring"));
        assert!(asked.bench);
        assert!(parse(&args("--help")).unwrap().is_none());
        for wrong in ["--repeat 0", "--repeat", "--backends tcp", "--frobnicate", "--only"] {
            assert!(parse(&args(wrong)).is_err(), "{wrong:?} is refused");
        }
    }
}
