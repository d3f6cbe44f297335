//! The proxies under test as child processes, and what /proc says about them.
#![allow(unsafe_code)] // process groups, signals and sysconf through libc; each block says why.

use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// A child process in its own process group (socat and websockify fork one process
/// per connection): the whole group is ended when this is dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null()).stderr(file).process_group(0);
        // SAFETY: prctl is async-signal-safe; the closure touches nothing else.
        unsafe {
            cmd.pre_exec(|| {
                // If the bench dies without cleaning up, the child goes with it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc { name: name.to_string(), child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the end of the child's log if it has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
            bail!("{} exited ({status}); its log:\n{}", self.name, tail.join("\n"));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let group = -(self.child.id() as i32);
        // SAFETY: plain kill(2) on our own child's process group.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; whatever is left of the group goes now.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// relay, started from its binary, with the address of each door.
pub struct Relay {
    pub proc: Proc,
    pub ws: SocketAddr,
    pub connect: SocketAddr,
    pub control: PathBuf,
}

/// Starts relay with its established sessions on `backend` (copy, sockmap, ...).
/// relay's default hand-over time, for the `auto` path; the others hand over at once, so
/// each back-end is measured from a console's first byte.
pub const AUTO_KERNEL_AFTER: std::time::Duration = std::time::Duration::from_millis(1000);

pub fn start_relay(binary: &Path, dir: &Path, backend: &str) -> Result<Relay> {
    start_relay_with(binary, dir, backend, "[store]\nbackend = \"memory\"\n")
}

/// As [`start_relay`], with `store` as the config's `[store]` section.
pub fn start_relay_with(binary: &Path, dir: &Path, backend: &str, store: &str) -> Result<Relay> {
    start_relay_sourced(binary, dir, backend, "", store)
}

/// As [`start_relay_with`], with `tokens` added to the `[tokens]` section (its sources).
pub fn start_relay_sourced(binary: &Path, dir: &Path, backend: &str, tokens: &str, store: &str) -> Result<Relay> {
    launch_relay(binary, dir, backend, "", tokens, store)
}

/// As [`start_relay`], with `relay_extra` (lines of settings) added to the `[relay]` section.
pub fn start_relay_tuned(binary: &Path, dir: &Path, backend: &str, relay_extra: &str) -> Result<Relay> {
    launch_relay(binary, dir, backend, relay_extra, "", "[store]\nbackend = \"memory\"\n")
}

fn launch_relay(binary: &Path, dir: &Path, backend: &str, relay_extra: &str, tokens: &str, store: &str) -> Result<Relay> {
    let control = dir.join("control.sock");
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            r#"# Written by relay-bench: loopback only, limits high enough for 10,000 idle sessions.
[listen]
websocket = "127.0.0.1:0"
connect = "127.0.0.1:0"
control = "{}"

[tokens]
ttl_secs = 86400
idle_timeout_secs = 0
{tokens}

[hypervisor]
auth_schemes = ["none"]

[limits]
max_connections = 50000
# Every client of the bench is one address.
max_connections_per_source = 0
max_sessions = 30000
max_sessions_per_instance = 30000
handshake_timeout_secs = 30
shutdown_grace_secs = 1

[relay]
backend = "{backend}"
kernel_after_ms = {kernel_after_ms}
{relay_extra}

{store}
"#,
            control.display(),
            kernel_after_ms = if backend == "auto" { AUTO_KERNEL_AFTER.as_millis() } else { 0 },
        ),
    )?;
    let mut cmd = Command::new(binary);
    cmd.arg("run").arg("--config").arg(&config).stdout(Stdio::piped());
    let mut proc = Proc::spawn("relay", &mut cmd, dir)?;
    let stdout = proc.child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {} // keep the pipe open and drained
    });
    let line = match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(line) => line,
        Err(_) => {
            proc.check_alive()?;
            bail!("relay printed no 'relay listening' line within 10 s");
        }
    };
    // relay listening: websocket=A connect=B control=C
    let field = |key: &str| -> Result<SocketAddr> {
        let value =
            line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).with_context(|| format!("no {key}= in {line:?}"))?;
        value.parse().with_context(|| format!("{key}={value}"))
    };
    Ok(Relay { ws: field("websocket")?, connect: field("connect")?, control, proc })
}

impl Relay {
    /// One control request; returns the reply's `result`.
    pub async fn control(&self, request: serde_json::Value) -> Result<serde_json::Value> {
        let mut stream = tokio::net::UnixStream::connect(&self.control).await.context("control socket")?;
        let mut line = request.to_string();
        line.push('\n');
        stream.write_all(line.as_bytes()).await?;
        let mut reader = tokio::io::BufReader::new(stream);
        let mut reply = String::new();
        reader.read_line(&mut reply).await?;
        let reply: serde_json::Value = serde_json::from_str(&reply).with_context(|| format!("control reply {reply:?}"))?;
        if reply["ok"] != serde_json::Value::Bool(true) {
            bail!("control request {request} failed: {reply}");
        }
        Ok(reply["result"].clone())
    }

    pub async fn token(&self, hv: SocketAddr) -> Result<String> {
        self.token_for("bench", hv).await
    }

    /// A token for a console of `instance`.
    pub async fn token_for(&self, instance: &str, hv: SocketAddr) -> Result<String> {
        let result = self
            .control(
                serde_json::json!({"v": 1, "op": "token_create", "instance": instance, "host": hv.ip().to_string(), "port": hv.port()}),
            )
            .await?;
        result["token"].as_str().map(str::to_string).context("token_create gave no token")
    }

    pub async fn sessions_active(&self) -> Result<u64> {
        let stats = self.control(serde_json::json!({"v": 1, "op": "stats"})).await?;
        stats["sessions_active"].as_u64().context("stats without sessions_active")
    }
}

/// A free loopback port (there is a short race between releasing and reusing it).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_listening(proc: &mut Proc, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        proc.check_alive()?;
        if Instant::now() > deadline {
            bail!("{} does not listen on {addr} after 10 s", proc.name);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fake hypervisor in a process of its own: this binary with `--serve-hypervisor`.
pub fn start_hypervisor(dir: &Path, chunk: u64) -> Result<(Proc, SocketAddr)> {
    let port = free_port()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--serve-hypervisor").arg(port.to_string()).arg("--chunk").arg(chunk.to_string()).stdout(Stdio::null());
    Ok((Proc::spawn("hypervisor", &mut cmd, dir)?, SocketAddr::from(([127, 0, 0, 1], port))))
}

pub fn start_socat(hv: SocketAddr, dir: &Path) -> Result<(Proc, SocketAddr)> {
    let port = free_port()?;
    let mut cmd = Command::new("socat");
    cmd.arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=1024")).arg(format!("TCP:{hv}"));
    cmd.stdout(Stdio::null());
    Ok((Proc::spawn("socat", &mut cmd, dir)?, SocketAddr::from(([127, 0, 0, 1], port))))
}

pub fn start_haproxy(hv: SocketAddr, dir: &Path, nofile: u64) -> Result<(Proc, SocketAddr)> {
    // HAProxy wants two descriptors per connection and refuses to start when maxconn
    // needs more than the limit allows.
    let maxconn = (nofile.saturating_sub(100) / 2).min(30_000);
    let port = free_port()?;
    let config = dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "# Written by relay-bench: plain TCP forwarding, HAProxy's defaults otherwise.\n\
             global\n  maxconn {maxconn}\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\
             frontend vnc\n  bind 127.0.0.1:{port}\n  default_backend hypervisor\n\
             backend hypervisor\n  server hv {hv}\n"
        ),
    )?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&config).stdout(Stdio::null());
    Ok((Proc::spawn("haproxy", &mut cmd, dir)?, SocketAddr::from(([127, 0, 0, 1], port))))
}

pub fn start_websockify(hv: SocketAddr, dir: &Path) -> Result<(Proc, SocketAddr)> {
    let port = free_port()?;
    let mut cmd = Command::new("websockify");
    cmd.arg(format!("127.0.0.1:{port}")).arg(hv.to_string()).stdout(Stdio::null());
    Ok((Proc::spawn("websockify", &mut cmd, dir)?, SocketAddr::from(([127, 0, 0, 1], port))))
}

/// CPU seconds (user + system) of a process and all its descendants, including
/// children that have already exited and been reaped.
pub fn tree_cpu_secs(root: u32) -> f64 {
    let mut stats: Vec<(u32, u32, u64)> = Vec::new(); // pid, ppid, ticks
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some((ppid, ticks)) = proc_stat(pid) {
                stats.push((pid, ppid, ticks));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(stats.iter().filter(|s| s.1 == parent).map(|s| s.0));
        i += 1;
    }
    let ticks: u64 = stats.iter().filter(|s| tree.contains(&s.0)).map(|s| s.2).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// (ppid, utime + stime + cutime + cstime) from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    let num = |field: usize| f.get(field - 3).and_then(|v| v.parse::<u64>().ok());
    Some((num(4)? as u32, num(14)? + num(15)? + num(16)? + num(17)?))
}

/// CPU seconds all cores have spent busy since boot: every online core's time since boot
/// less the time the kernel counted idle. A tickless kernel measures idle time exactly,
/// while /proc/stat's busy fields are sampled at the tick and miss short bursts of work
/// between idle periods: a light farm (500 consoles, 2,500 messages/s) read 0.02 cores
/// busy from them while its two processes alone used 0.2.
pub fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    let f: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait ...: idle and iowait are the time no task ran.
    let idle: u64 = [3, 4].iter().filter_map(|&i| f.get(i)).sum();
    let cores = stat.lines().filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)).count();
    let since_boot: f64 = uptime.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    cores as f64 * since_boot - idle as f64 / tick
}

/// Resident memory of one process, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    let kib: u64 = line.split_whitespace().nth(1).context("VmRSS value")?.parse()?;
    Ok(kib * 1024)
}

/// Raises this process's descriptor limit (children inherit it). Returns the new limit.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let raised = libc::rlimit { rlim_cur: want, rlim_max: want.max(lim.rlim_max) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return want;
        }
        // Not allowed to raise the hard limit: go as far as it allows.
        let capped = libc::rlimit { rlim_cur: want.min(lim.rlim_max), rlim_max: lim.rlim_max };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &capped) == 0 {
            return capped.rlim_cur;
        }
        lim.rlim_cur
    }
}

/// First line of a command's output (stdout or stderr), for version strings.
pub fn first_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    String::from_utf8_lossy(&text).lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_string)
}
