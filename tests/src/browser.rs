//! Real noVNC in headless Chromium, through `tests/browser/novnc.mjs`.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// A web root as an operator would deploy one: noVNC 1.7's `core/` and `vendor/` from
/// npm plus our `console.html`, copied (not linked) into `dir`.
pub fn assemble_web_root(dir: &Path) -> PathBuf {
    let novnc = browser_dir().join("node_modules/@novnc/novnc");
    for part in ["core", "vendor"] {
        copy_tree(&novnc.join(part), &dir.join(part));
    }
    std::fs::copy(browser_dir().join("console.html"), dir.join("console.html")).unwrap();
    dir.to_path_buf()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// What the driver saw. `ok` is whether the expectation was met.
#[derive(Debug)]
pub struct Outcome {
    pub ok: bool,
    pub report: Value,
    pub stderr: String,
}

/// Opens `url` and waits for `expect` (`connected`, `credentials`, `securityfailure`,
/// `disconnected`). `extra` are further driver arguments (`--type-password`, ...).
pub async fn open(url: &str, expect: &str, extra: &[&str], screenshot: Option<&Path>) -> Outcome {
    let mut cmd = tokio::process::Command::new("node");
    cmd.current_dir(browser_dir())
        .arg("novnc.mjs")
        .args(["--url", url, "--expect", expect, "--timeout-ms", "30000"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(png) = screenshot {
        cmd.arg("--screenshot").arg(png);
    }
    let out = cmd.output().await.expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = stdout.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
    Outcome { ok: out.status.success() && report["ok"] == true, report, stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}
