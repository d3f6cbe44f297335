//! The command-line contract, through the real `relay` binary: `run` prints where it
//! listens, `ctl` manages tokens and instances over the control socket, `check-config`
//! validates files, and SIGTERM stops cleanly.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const RELAY: &str = env!("CARGO_BIN_EXE_relay");

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Running {
    child: Child,
    ws: String,
    connect: String,
    control: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> Running {
    start_logging(dir, None)
}

/// Starts relay; with `log`, its stderr (the log, at debug level) goes to that file.
fn start_logging(dir: &Path, log: Option<&Path>) -> Running {
    let control = dir.join("control.sock");
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
        None => Stdio::null(),
    };
    let mut child = Command::new(RELAY)
        .args(["run", "--ws-listen", "127.0.0.1:0", "--connect-listen", "127.0.0.1:0", "--control"])
        .arg(&control)
        .env("RELAY_STATE_DIR", dir)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // "relay listening: websocket=A connect=B control=C"
    let field =
        |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name)).unwrap_or_else(|| panic!("{name} in {line:?}")).to_string();
    Running { ws: field("websocket="), connect: field("connect="), control, child }
}

fn ctl(r: &Running, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(RELAY).arg("ctl").arg("--control").arg(&r.control).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn ctl_json(r: &Running, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = ctl(r, &all);
    assert_eq!(code, 0, "relay ctl {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn run_prints_its_addresses_and_ctl_manages_tokens() {
    let dir = scratch("tokens");
    let r = start(&dir);
    assert!(r.ws.starts_with("127.0.0.1:") && r.connect.starts_with("127.0.0.1:"));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&r.control).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "control socket is private");

    let created = ctl_json(&r, &["token", "create", "--instance", "vm-a", "--host", "hv1.example", "--port", "5901", "--ttl", "60"]);
    let token = created["token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 43);
    let novnc = created["urls"]["novnc"].as_str().unwrap();
    assert_eq!(novnc, format!("http://{}/vnc_lite.html?path=%3Ftoken%3D{token}", r.ws));
    assert_eq!(created["urls"]["connect"].as_str().unwrap(), format!("http://{}/console?token={token}", r.connect));

    let checked = ctl_json(&r, &["token", "check", &token]);
    assert_eq!(checked["valid"], true);
    assert_eq!(checked["token"]["host"], "hv1.example");
    assert!(!checked.to_string().contains(&token), "the token is not echoed back");
    ctl_json(&r, &["token", "create", "--instance", "vm-b", "--host", "hv1.example", "--port", "5902"]);
    assert_eq!(ctl_json(&r, &["token", "list", "--instance", "vm-a"])["tokens"].as_array().unwrap().len(), 1);
    assert_eq!(ctl_json(&r, &["token", "list", "--host", "hv1.example"])["tokens"].as_array().unwrap().len(), 2);
    ctl_json(&r, &["token", "touch", &token]);
    ctl_json(&r, &["token", "delete", &token]);
    let (code, out, _) = ctl(&r, &["token", "check", &token]);
    assert_eq!(code, 1, "an invalid token fails the command");
    assert!(out.contains("invalid: unknown console token"), "{out}");
    let (code, _, err) = ctl(&r, &["token", "delete", &token]);
    assert_eq!(code, 2);
    assert!(err.contains("not_found"), "{err}");

    let reset = ctl_json(&r, &["instance", "reset", "vm-b", "--revoke"]);
    assert_eq!(reset["disconnected"], 0);
    assert_eq!(reset["revoked"], 1);
    assert_eq!(ctl_json(&r, &["sessions"])["sessions"].as_array().unwrap().len(), 0);
    assert_eq!(ctl_json(&r, &["stats"])["tokens"], 0);

    let (code, _, err) =
        ctl(&r, &["token", "create", "--instance", "vm", "--host", "h", "--port", "5900", "--hypervisor-password", "waytoolongpw"]);
    assert_eq!(code, 2);
    assert!(err.contains("at most 8"), "{err}");

    // An instance name with a line break would plant a forged line in the log.
    let forged = "vm\n2026-01-01T00:00:00Z INFO relay::audit: event=\"session_start\"";
    let (code, _, err) = ctl(&r, &["token", "create", "--instance", forged, "--host", "h", "--port", "5900"]);
    assert_eq!(code, 2);
    assert!(err.contains("instance may hold letters, digits"), "{err}");
    let (code, _, _) = ctl(&r, &["instance", "reset", "a b"]);
    assert_eq!(code, 2, "every operation that names an instance checks it");
}

#[test]
fn a_bad_request_gets_a_typed_error_not_a_dropped_connection() {
    let dir = scratch("proto");
    let r = start(&dir);
    let mut s = std::os::unix::net::UnixStream::connect(&r.control).unwrap();
    s.write_all(b"{\"v\":1,\"op\":\"no_such_op\"}\n{\"v\":9,\"op\":\"stats\"}\nnot json\n\xff\xfe{\"op\":\"stats\"}\n{\"op\":\"stats\"}\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let replies: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(replies.len(), 5, "{text}");
    assert_eq!(replies[0]["error"]["kind"], "bad_request");
    assert_eq!(replies[1]["error"]["kind"], "unsupported_version");
    assert_eq!(replies[2]["error"]["kind"], "bad_request");
    assert_eq!(replies[3]["error"]["kind"], "bad_request", "a line that is not UTF-8 is answered too");
    assert_eq!(replies[4]["ok"], true);
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_socket() {
    let dir = scratch("term");
    let mut r = start(&dir);
    // A connection mid-request must not hold the shutdown beyond the grace period.
    let mut idle = TcpStream::connect(&r.ws).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let pid = r.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = r.child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "relay did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "relay ended with {status:?}");
    assert!(!r.control.exists());
}

#[test]
fn check_config_accepts_the_sample_and_explains_mistakes() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../relay.example.toml");
    let out = Command::new(RELAY).arg("check-config").arg(&sample).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = scratch("config");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_sesions = 4\n").unwrap();
    let out = Command::new(RELAY).arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `max_sesions`"), "{err}");
}

#[test]
fn a_second_relay_does_not_steal_the_control_socket() {
    let dir = scratch("steal");
    let r = start(&dir);
    let out = Command::new(RELAY)
        .args(["run", "--ws-listen", "127.0.0.1:0", "--connect-listen", "127.0.0.1:0", "--control"])
        .arg(&r.control)
        .env("RELAY_STATE_DIR", &dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by a running relay"));
    assert_eq!(ctl_json(&r, &["stats"])["sessions_active"], 0, "the first relay still answers");
}

#[test]
fn tokens_never_reach_the_log() {
    let dir = scratch("log");
    let log = dir.join("relay.log");
    let r = start_logging(&dir, Some(&log));
    let created = ctl_json(&r, &["token", "create", "--instance", "vm-log", "--host", "127.0.0.1", "--port", "9"]);
    let token = created["token"].as_str().unwrap().to_string();
    let use_it = |request: String, addr: &str| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        reply
    };
    // Through both doors (the hypervisor is down), and an unknown token.
    assert!(use_it(format!("CONNECT /console?token={token} HTTP/1.1\r\n\r\n"), &r.connect).starts_with("HTTP/1.1 502"));
    let upgrade = format!(
        "GET /?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let mut ws = TcpStream::connect(&r.ws).unwrap();
    ws.write_all(upgrade.as_bytes()).unwrap();
    let mut head = [0u8; 12];
    ws.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    drop(ws);
    let unknown = "x".repeat(43);
    assert!(use_it(format!("CONNECT /console?token={unknown} HTTP/1.1\r\n\r\n"), &r.connect).starts_with("HTTP/1.1 403"));
    ctl_json(&r, &["token", "delete", &token]);
    std::thread::sleep(Duration::from_millis(300));
    drop(r);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("token_created") && text.contains("token_rejected") && text.contains("hypervisor_failed"), "{text}");
    for secret in [&token, &unknown] {
        assert!(!text.contains(&secret[..16]), "a token (or a 16-character piece of one) is in the log");
    }
}

/// `relay run` as an unprivileged user: the kernel refuses the eBPF program, so relay
/// serves consoles in userspace and says why in one log line; asking for sockmap
/// explicitly is then a start-up error.
#[test]
#[cfg_attr(relay_no_setpriv, ignore = "needs root and setpriv to drop to an unprivileged user")]
fn without_permission_for_ebpf_relay_runs_in_userspace_and_says_why() {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    assert!(root && Path::new("/usr/bin/setpriv").exists(), "needs root and setpriv to drop to an unprivileged user");
    let dir = scratch("noperm");
    let log = dir.join("relay.log");
    let control = nobodys_dir(&dir).join("control.sock");
    let unprivileged = |extra: &[&str]| as_nobody(&control, extra);
    let mut child = unprivileged(&[]).stdout(Stdio::piped()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("relay listening:"), "it serves anyway: {line:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    let said: Vec<&str> = text.lines().filter(|l| l.contains("relay back-ends")).collect();
    assert_eq!(said.len(), 1, "one line about the back-ends: {text}");
    // `auto` tries sockmap for quiet consoles (and for busy ones without io_uring), and
    // says why it could not load it; quiet consoles then stay on copy.
    assert!(said[0].contains("sockmap unavailable") && said[0].contains("CAP_BPF"), "{}", said[0]);
    assert!(said[0].contains("raw_quiet=\"copy\""), "{}", said[0]);
    assert!(said[0].contains("raw=\"uring\"") || said[0].contains("raw=\"copy\""), "{}", said[0]);

    let out = unprivileged(&["--relay", "sockmap"]).output().unwrap();
    assert!(!out.status.success(), "an explicit sockmap it cannot load is an error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("relay.backend = sockmap") && err.contains("CAP_BPF"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A directory for uid 65534 (nobody) inside `parent`, private to it.
fn nobodys_dir(parent: &Path) -> PathBuf {
    let dir = parent.join("nobody");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    dir
}

/// `relay run` as uid 65534 (nobody), with its control socket at `control`.
fn as_nobody(control: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", RELAY, "run"])
        .args(["--ws-listen", "127.0.0.1:0", "--connect-listen", "127.0.0.1:0", "--control"])
        .arg(control)
        .args(extra)
        // Its store beside its socket, where it may write.
        .env("RELAY_STATE_DIR", control.parent().expect("socket directory"));
    cmd
}

/// Another user's socket where relay's should be: `relay ctl` sends nothing to it (a
/// token create would hand over a hypervisor password). Where only root could have given
/// that user the directory (a service's runtime directory), root's ctl trusts it.
#[test]
#[cfg_attr(relay_no_setpriv, ignore = "needs root and setpriv to run a server as another user")]
fn ctl_sends_nothing_to_a_socket_served_by_another_user() {
    let dir = scratch("impostor");
    // World-writable, as /tmp is: anyone could have made the directory inside.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    let control = nobodys_dir(&dir).join("control.sock");
    let mut child = as_nobody(&control, &[]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let ctl = |args: &[&str]| Command::new(RELAY).arg("ctl").arg("--control").arg(&control).args(args).output().unwrap();
    let out = ctl(&["token", "create", "--instance", "vm", "--host", "h", "--port", "5900", "--hypervisor-password", "s3cret"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("served by uid 65534") && err.contains("nothing was sent"), "{err}");
    // The same server where only root could have placed its directory: a service's.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = ctl(&["stats"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Secrets need not be on the command line, where `ps` shows them: passwords come from a
/// file or stdin, tokens from stdin; the old flags still work and their help says why not.
#[test]
fn secrets_come_from_files_or_stdin() {
    let dir = scratch("secrets");
    let r = start(&dir);
    let ctl_in = |args: &[&str], input: &str| {
        let mut child = Command::new(RELAY)
            .arg("ctl")
            .arg("--control")
            .arg(&r.control)
            .args(args)
            .arg("--json")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "relay ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let created =
        ctl_in(&["token", "create", "--instance", "vm-s", "--host", "h", "--port", "5900", "--hypervisor-password-file", "-"], "hvpw\n");
    let token = created["token"].as_str().unwrap().to_string();
    assert_eq!(ctl_in(&["token", "check", "-"], &format!("{token}\n"))["valid"], true);
    assert_eq!(ctl_in(&["token", "touch"], &format!("{token}\n"))["touched"], true, "no argument reads stdin too");
    let file = dir.join("pw");
    std::fs::write(&file, "s3cret\n").unwrap();
    let set = ctl_in(&["instance", "password", "set", "vm-s", "--password-file", file.to_str().unwrap()], "");
    assert_eq!(set["password"], "set");
    let (code, _, err) = ctl(&r, &["instance", "password", "set", "vm-s", "--password-file", "/nonexistent/pw"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/pw"), "{err}");
    let help = Command::new(RELAY).args(["ctl", "token", "create", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("`ps` shows it to every user"));
}

/// With few descriptors (a hard limit of 300: 22 connections fit), connections past what
/// fits are answered 503 at once instead of left hanging, and the control socket answers.
#[test]
fn past_what_the_descriptors_hold_connections_are_refused_and_ctl_answers() {
    let dir = scratch("fdlimit");
    let control = dir.join("control.sock");
    let mut child = Command::new("prlimit")
        .arg("--nofile=300:300")
        .args([RELAY, "run", "--ws-listen", "127.0.0.1:0", "--connect-listen", "127.0.0.1:0", "--control"])
        .arg(&control)
        .env("RELAY_STATE_DIR", &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let ws = line.split_whitespace().find_map(|w| w.strip_prefix("websocket=")).unwrap().to_string();
    let held: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(&ws).unwrap()).collect();
    let mut refused = 0;
    for mut s in held.iter().skip(22) {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        refused += usize::from(reply.starts_with("HTTP/1.1 503 ") && reply.contains("connection limit"));
    }
    assert_eq!(refused, 18, "every connection past the 22 that fit is answered 503");
    let out = Command::new(RELAY).args(["ctl", "--json", "--control"]).arg(&control).arg("stats").output().unwrap();
    assert!(out.status.success(), "ctl answers: {}", String::from_utf8_lossy(&out.stderr));
    drop(held);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
