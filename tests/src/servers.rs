//! Servers from Debian's packages that fleet tests need: Redis and HAProxy, each started
//! on a free port in a scratch directory and stopped by its PID (SIGKILL on drop).

use crate::hypervisor::free_port;
use crate::relay_server::scratch_dir;
use anyhow::{Context, bail};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const REDIS_SERVER: &str = "/usr/bin/redis-server";
pub const HAPROXY: &str = "/usr/sbin/haproxy";

/// A redis-server of our own. It keeps an append-only file with `appendfsync always`, as a
/// fleet's Redis should, so that a killed and restarted server still has every write it
/// acknowledged.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    /// Further arguments (TLS, ACL users, replication, Sentinel).
    extra: Vec<String>,
    /// Whether the port speaks TLS, so readiness is a TCP connect rather than a PING.
    tls: bool,
}

impl RedisServer {
    pub async fn start() -> anyhow::Result<RedisServer> {
        Self::start_with(Vec::new(), false).await
    }

    /// With `extra` arguments; `{port}` and `{dir}` in them are replaced. With `tls`, the
    /// port is `--tls-port` and the plain port is off.
    pub async fn start_with(extra: Vec<String>, tls: bool) -> anyhow::Result<RedisServer> {
        let mut last = String::new();
        for _ in 0..10 {
            let mut server = RedisServer { child: None, port: free_port()?, dir: scratch_dir("redis"), extra: extra.clone(), tls };
            match server.spawn().await {
                Ok(()) => return Ok(server),
                Err(e) => last = e.to_string(),
            }
        }
        bail!("redis-server did not start: {last}")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let port = self.port.to_string();
        let ports: [&str; 4] = if self.tls { ["--port", "0", "--tls-port", &port] } else { ["--port", &port, "--bind", "127.0.0.1"] };
        let dir = self.dir.display().to_string();
        let extra: Vec<String> = self.extra.iter().map(|a| a.replace("{port}", &port).replace("{dir}", &dir)).collect();
        let child = Command::new(REDIS_SERVER)
            .args(ports)
            .args(["--save", "", "--appendonly", "yes", "--appendfsync", "always"])
            .args(["--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.dir.join("redis.log"))?)
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                bail!("redis-server exited ({status}): {}", log.lines().rev().take(3).collect::<Vec<_>>().join(" | "));
            }
            if self.tls && TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return Ok(());
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)).await {
                let mut pong = [0u8; 7];
                if s.write_all(b"PING\r\n").await.is_ok()
                    && matches!(tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut pong)).await, Ok(Ok(_)))
                    && &pong == b"+PONG\r\n"
                {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("redis-server did not answer within 10 s")
    }

    /// SIGKILL: the server vanishes mid-run.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with the data it had.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// HAProxy in TCP mode, round robin over `backends`, on a free port.
pub struct Haproxy {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Haproxy {
    pub async fn round_robin(backends: &[SocketAddr]) -> anyhow::Result<Haproxy> {
        let servers: String = backends.iter().enumerate().map(|(i, b)| format!("    server relay{i} {b}\n")).collect();
        Self::start(&format!("backend relays\n    balance roundrobin\n{servers}")).await
    }

    /// HAProxy in TCP mode, its frontend on a free port sending to the backend `relays`
    /// that `backend` defines; a stats socket in its directory ([`Haproxy::server_status`]).
    pub async fn start(backend: &str) -> anyhow::Result<Haproxy> {
        Self::start_with("mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s", backend).await
    }

    /// As [`Haproxy::start`], with `defaults` as the body of its `defaults` section.
    pub async fn start_with(defaults: &str, backend: &str) -> anyhow::Result<Haproxy> {
        let dir = scratch_dir("haproxy");
        let port = free_port()?;
        let config = format!(
            "global\n    maxconn 1000\n    stats socket {}/stats.sock level admin\n\
             defaults\n    {defaults}\n\
             frontend consoles\n    bind 127.0.0.1:{port}\n    default_backend relays\n{backend}",
            dir.display()
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let child = Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting haproxy")?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let started = Instant::now();
        while TcpStream::connect(addr).await.is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("haproxy did not listen within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Haproxy { child, addr, dir })
    }

    /// What HAProxy's health checks make of backend `relays`' server `name`: `UP`, `DOWN`, ...
    pub async fn server_status(&self, name: &str) -> anyhow::Result<String> {
        let mut s = tokio::net::UnixStream::connect(self.dir.join("stats.sock")).await?;
        s.write_all(b"show stat\n").await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        // CSV: pxname, svname, ..., status is the 18th column.
        let line = out.lines().find(|l| l.starts_with(&format!("relays,{name},"))).with_context(|| format!("no server {name}: {out}"))?;
        Ok(line.split(',').nth(17).unwrap_or_default().to_string())
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// relay's binary, built beside the tests by `cargo test --workspace` (relay's own
/// integration tests need it).
pub fn relay_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/relay
    let bin = exe.parent().and_then(|d| d.parent()).map(|d| d.join("relay")).expect("target dir");
    assert!(bin.exists(), "{} is missing: build it first (cargo build -p relay; cargo xtask test does)", bin.display());
    bin
}

/// relay as a process of its own, for what only a process can show (SIGKILL).
pub struct RelayProcess {
    child: Option<Child>,
    pub connect: SocketAddr,
    pub ws: SocketAddr,
    pub control: PathBuf,
    /// The metrics listener, when configured.
    pub metrics: Option<SocketAddr>,
}

impl RelayProcess {
    /// Runs `relay run --config <config>`; waits for its "relay listening" line.
    pub async fn start(config: &std::path::Path) -> anyhow::Result<RelayProcess> {
        Self::start_with_env(config, &[]).await
    }

    /// As [`RelayProcess::start`], with more environment variables.
    pub async fn start_with_env(config: &std::path::Path, env: &[(&str, &str)]) -> anyhow::Result<RelayProcess> {
        Self::spawn(config, env, Stdio::inherit(), &[]).await
    }

    /// As [`RelayProcess::start`], its logs (standard error) written to `log`.
    pub async fn start_logging_to(config: &std::path::Path, log: &std::path::Path) -> anyhow::Result<RelayProcess> {
        Self::start_with_stderr(config, std::fs::File::create(log)?.into()).await
    }

    /// As [`RelayProcess::start`], its logs (standard error) going to `stderr`.
    pub async fn start_with_stderr(config: &std::path::Path, stderr: Stdio) -> anyhow::Result<RelayProcess> {
        Self::spawn(config, &[], stderr, &[]).await
    }

    /// As [`RelayProcess::start_logging_to`], with the system calls `denied` failing with
    /// EPERM, as in a container ([`crate::seccomp`]).
    pub async fn start_denied(config: &std::path::Path, log: &std::path::Path, denied: &[libc::c_long]) -> anyhow::Result<RelayProcess> {
        Self::spawn(config, &[], std::fs::File::create(log)?.into(), denied).await
    }

    /// As [`RelayProcess::start_logging_to`], `binary` run as the user `uid` with only the
    /// capabilities `caps` (setpriv's names: `["bpf", "net_admin"]`), ambient as systemd
    /// gives them to the unit's `User=`.
    pub async fn start_as(
        binary: &std::path::Path,
        config: &std::path::Path,
        log: &std::path::Path,
        uid: u32,
        caps: &[&str],
    ) -> anyhow::Result<RelayProcess> {
        let caps: String = std::iter::once("-all".to_string()).chain(caps.iter().map(|c| format!("+{c}"))).collect::<Vec<_>>().join(",");
        let mut command = Command::new("setpriv");
        command.args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()]);
        command.args([format!("--inh-caps={caps}"), format!("--ambient-caps={caps}"), format!("--bounding-set={caps}")]).arg(binary);
        Self::launch(command, config, &[], std::fs::File::create(log)?.into(), &[]).await
    }

    /// As [`RelayProcess::start_logging_to`], with the open-file limit (soft, hard) relay
    /// starts under (set by util-linux's prlimit, which then runs relay in its place).
    pub async fn start_with_open_files(
        config: &std::path::Path,
        log: &std::path::Path,
        (soft, hard): (u64, u64),
    ) -> anyhow::Result<RelayProcess> {
        let mut command = Command::new("prlimit");
        command.arg(format!("--nofile={soft}:{hard}")).arg(relay_binary());
        Self::launch(command, config, &[], std::fs::File::create(log)?.into(), &[]).await
    }

    async fn spawn(config: &std::path::Path, env: &[(&str, &str)], stderr: Stdio, denied: &[libc::c_long]) -> anyhow::Result<RelayProcess> {
        Self::launch(Command::new(relay_binary()), config, env, stderr, denied).await
    }

    /// Runs `command` (relay's binary, or a program that runs it) with `run --config`.
    async fn launch(
        mut command: Command,
        config: &std::path::Path,
        env: &[(&str, &str)],
        stderr: Stdio,
        denied: &[libc::c_long],
    ) -> anyhow::Result<RelayProcess> {
        use std::io::BufRead as _;
        command.envs(env.iter().copied()).arg("run").arg("--config").arg(config).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
        if !denied.is_empty() {
            crate::seccomp::deny(&mut command, denied);
        }
        let mut child = command.spawn().context("starting relay")?;
        let stdout = child.stdout.take().expect("piped");
        let line = tokio::task::spawn_blocking(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            let first = lines.next();
            // Keep the pipe drained so relay never blocks on it.
            std::thread::spawn(move || for _ in lines {});
            first
        });
        let line = match tokio::time::timeout(Duration::from_secs(30), line).await {
            Ok(Ok(Some(Ok(line)))) => line,
            _ => {
                let _ = child.kill();
                bail!("relay did not report its listeners");
            }
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
                .with_context(|| format!("{name} in {line:?}"))
        };
        Ok(RelayProcess {
            child: Some(child),
            connect: field("connect")?.parse()?,
            ws: field("websocket")?.parse()?,
            control: field("control")?.into(),
            metrics: field("metrics").ok().map(|m| m.parse()).transpose()?,
        })
    }

    /// SIGTERM: relay's own shutdown.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal named `name` (`HUP`, `TERM`, ...).
    pub fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status();
        }
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub const MARIADBD: &str = "/usr/sbin/mariadbd";
const MARIADB_INSTALL_DB: &str = "/usr/bin/mariadb-install-db";
const MARIADB: &str = "/usr/bin/mariadb";

/// nova's `console_auth_tokens` as its migrations leave it on MySQL (the initial schema
/// of nova/db/main/migrations, then `tls_port`).
pub const NOVA_CONSOLE_AUTH_TOKENS: &str = "CREATE TABLE console_auth_tokens (
    created_at DATETIME NULL,
    updated_at DATETIME NULL,
    id INTEGER NOT NULL AUTO_INCREMENT,
    token_hash VARCHAR(255) NOT NULL,
    console_type VARCHAR(255) NOT NULL,
    host VARCHAR(255) NOT NULL,
    port INTEGER NOT NULL,
    internal_access_path VARCHAR(255) NULL,
    instance_uuid VARCHAR(36) NOT NULL,
    expires INTEGER NOT NULL,
    access_url_base VARCHAR(255) NULL,
    tls_port INTEGER NULL,
    PRIMARY KEY (id),
    CONSTRAINT uniq_console_auth_tokens0token_hash UNIQUE (token_hash),
    INDEX console_auth_tokens_instance_uuid_idx (instance_uuid),
    INDEX console_auth_tokens_host_expires_idx (host, expires),
    INDEX console_auth_tokens_token_hash_idx (token_hash),
    INDEX console_auth_tokens_token_hash_instance_uuid_idx (token_hash, instance_uuid)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb3";

/// A MariaDB server of our own (Debian's mariadb-server) holding a `nova` database with
/// nova's token table; relay reads it as `relay`, allowed SELECT on that table only.
pub struct Mariadb {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Mariadb {
    pub async fn start_nova() -> anyhow::Result<Mariadb> {
        let dir = scratch_dir("mariadb");
        let data = dir.join("data");
        // A server of its own for temporary tables: servers sharing /tmp remove each
        // other's at start-up, and a concurrent install then fails (1 in 6 did here).
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        let log = std::fs::File::create(dir.join("install.log"))?;
        let install = Command::new(MARIADB_INSTALL_DB)
            .args(["--no-defaults", "--user=root", "--auth-root-authentication-method=socket", "--skip-test-db"])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .context("running mariadb-install-db")?;
        if !install.success() {
            bail!("mariadb-install-db failed ({install}): see {}", dir.join("install.log").display());
        }
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let child = Command::new(MARIADBD)
                .args(["--no-defaults", "--user=root", "--bind-address=127.0.0.1", "--skip-name-resolve", "--innodb-buffer-pool-size=16M"])
                .arg(format!("--port={port}"))
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--tmpdir={}", tmp.display()))
                .arg(format!("--socket={}", dir.join("sock").display()))
                .arg(format!("--pid-file={}", dir.join("pid").display()))
                .arg(format!("--log-error={}", dir.join("error.log").display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting mariadbd")?;
            let mut db = Mariadb { child, port, dir: dir.clone() };
            match db.ready().await {
                Ok(()) => {
                    db.sql(&format!(
                        "CREATE DATABASE nova; USE nova; {NOVA_CONSOLE_AUTH_TOKENS}; \
                         CREATE USER 'relay'@'127.0.0.1' IDENTIFIED BY 'relay-secret'; \
                         GRANT SELECT ON nova.console_auth_tokens TO 'relay'@'127.0.0.1';"
                    ))?;
                    return Ok(db);
                }
                Err(e) => last = e.to_string(),
            }
            // Dropping `db` kills the server that did not come up; its data stays for the
            // next try (an emptied `dir` is not removed).
            db.dir = PathBuf::new();
        }
        bail!("mariadbd did not start: {last}")
    }

    async fn ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                bail!("mariadbd exited ({status}): {}", log.lines().rev().take(3).collect::<Vec<_>>().join(" | "));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() && self.sql("SELECT 1").is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("mariadbd did not answer within 30 s")
    }

    /// relay's `[nova] database_urls` entry, in nova.conf's form.
    pub fn url(&self) -> String {
        self.cell_url("nova")
    }

    /// The entry for another cell's database on this server.
    pub fn cell_url(&self, database: &str) -> String {
        format!("mysql+pymysql://relay:relay-secret@127.0.0.1:{}/{database}?charset=utf8", self.port)
    }

    /// A second cell: its own database with nova's table, readable by relay.
    pub fn add_cell(&self, database: &str) -> anyhow::Result<()> {
        self.sql(&format!(
            "CREATE DATABASE {database}; USE {database}; {NOVA_CONSOLE_AUTH_TOKENS}; \
             GRANT SELECT ON {database}.console_auth_tokens TO 'relay'@'127.0.0.1';"
        ))
        .map(drop)
    }

    /// Runs `sql` as root over the server's socket (as nova's services write rows).
    pub fn sql(&self, sql: &str) -> anyhow::Result<String> {
        let out = Command::new(MARIADB)
            .args(["--no-defaults", "--batch", "--skip-column-names", "-uroot"])
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .arg("-e")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .context("running mariadb")?;
        if !out.status.success() {
            bail!("mariadb: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes a token's row as nova's `ConsoleAuthToken.authorize` does: the token's
    /// SHA-256 in hex, `expires` = now + ttl.
    pub fn authorize(&self, token: &str, console_type: &str, target: SocketAddr, instance: &str, expires: i64) -> anyhow::Result<()> {
        self.authorize_in("nova", token, console_type, target, instance, expires)
    }

    /// As [`Mariadb::authorize`], in the cell database `database`.
    pub fn authorize_in(
        &self,
        database: &str,
        token: &str,
        console_type: &str,
        target: SocketAddr,
        instance: &str,
        expires: i64,
    ) -> anyhow::Result<()> {
        use sha2::Digest;
        let hash: String = sha2::Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        self.sql(&format!(
            "INSERT INTO {database}.console_auth_tokens (created_at, token_hash, console_type, host, port, instance_uuid, expires, access_url_base) \
             VALUES (UTC_TIMESTAMP(), '{hash}', '{console_type}', '{}', {}, '{instance}', {expires}, 'http://127.0.0.1:6080/vnc_lite.html')",
            target.ip(),
            target.port()
        ))?;
        Ok(())
    }

    /// SIGKILL: the database vanishes.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Deletes the instance's rows, as nova does when it is deleted or migrated.
    pub fn clean_instance(&self, instance: &str) -> anyhow::Result<()> {
        self.sql(&format!("DELETE FROM nova.console_auth_tokens WHERE instance_uuid = '{instance}'")).map(drop)
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
