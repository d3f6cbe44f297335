//! The token sources: console openings per second when the token is looked up in relay's
//! own store, checked as a signed token (`jwt`), or read from nova's database (`nova`,
//! a local MariaDB with nova's table), in the same run, in rounds over the three.

use crate::client::{Door, Target};
use crate::measure;
use crate::procs::{self, Proc, Relay};
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

/// The sources compared, in the order they are reported.
pub const SOURCES: [&str; 3] = ["store", "jwt", "nova"];

pub struct SourceRates {
    /// Per source: the openings per second of each round.
    pub rates: Vec<(&'static str, Vec<f64>)>,
    /// Per source: CPU milliseconds per opening of relay's process, and of mariadbd
    /// (for `nova`), over all rounds.
    pub cpu_ms: Vec<(&'static str, f64, f64)>,
}

/// A nova token (nova's are UUIDs).
const NOVA_TOKEN: &str = "0b5e0f3c-7d1a-4c2b-9e8f-6a5b4c3d2e1f";

pub async fn run(relay_bin: &Path, dir: &Path, hv: SocketAddr, handshakes: usize, inflight: usize, rounds: usize) -> Result<SourceRates> {
    let (db, url) = start_mariadb(dir, hv).await?;
    let secret = dir.join("jwt.key");
    std::fs::write(&secret, "bench-jwt-secret-0123456789abcdef\n")?;
    let mut relays: Vec<Relay> = Vec::new();
    for source in SOURCES {
        let sub = dir.join(format!("source-{source}"));
        std::fs::create_dir_all(&sub)?;
        let (tokens, section) = match source {
            "store" => ("sources = [\"store\"]", String::new()),
            "jwt" => ("sources = [\"jwt\"]", format!("[jwt]\nkeys = [{{ file = \"{}\", algorithm = \"HS256\" }}]\n", secret.display())),
            _ => ("sources = [\"nova\"]", format!("[nova]\ndatabase_urls = [\"{url}\"]\n")),
        };
        let config = format!("[store]\nbackend = \"memory\"\n\n{section}");
        relays.push(procs::start_relay_sourced(relay_bin, &sub, "copy", tokens, &config)?);
    }
    let mut targets = Vec::new();
    for (source, relay) in SOURCES.iter().zip(&relays) {
        let token = match *source {
            "store" => relay.token(hv).await?,
            "jwt" => sign(relay_bin, &secret, hv)?,
            _ => NOVA_TOKEN.to_string(),
        };
        targets.push((*source, Target { addr: relay.connect, door: Door::Connect { token } }, relay.proc.pid()));
    }
    let measured = measure::opening_rounds("source", &targets, db.pid(), handshakes, inflight, rounds).await?;
    Ok(SourceRates { rates: measured.rates, cpu_ms: measured.cpu_ms })
}

/// A token signed by `relay ctl token sign`, as a control plane would hand it out.
fn sign(relay_bin: &Path, secret: &Path, hv: SocketAddr) -> Result<String> {
    let out = Command::new(relay_bin)
        .args(["ctl", "token", "sign", "--algorithm", "HS256", "--instance", "bench", "--ttl", "86400", "--key"])
        .arg(secret)
        .args(["--host", &hv.ip().to_string(), "--port", &hv.port().to_string()])
        .output()
        .context("relay ctl token sign")?;
    if !out.status.success() {
        bail!("relay ctl token sign: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Debian's MariaDB on a free port, with nova's token table holding one valid row.
async fn start_mariadb(dir: &Path, hv: SocketAddr) -> Result<(Proc, String)> {
    if !Path::new("/usr/sbin/mariadbd").exists() {
        bail!("mariadb-server is not installed (apt install mariadb-server)");
    }
    let data = dir.join("mariadb");
    let status = Command::new("mariadb-install-db")
        .args(["--no-defaults", "--user=root", "--auth-root-authentication-method=socket", "--skip-test-db"])
        .arg(format!("--datadir={}", data.display()))
        .stdout(std::process::Stdio::null())
        .status()
        .context("mariadb-install-db")?;
    if !status.success() {
        bail!("mariadb-install-db failed: {status}");
    }
    let port = procs::free_port()?;
    let socket = dir.join("mariadb.sock");
    let mut cmd = Command::new("/usr/sbin/mariadbd");
    cmd.args(["--no-defaults", "--user=root", "--bind-address=127.0.0.1", "--skip-name-resolve"])
        .arg(format!("--port={port}"))
        .arg(format!("--datadir={}", data.display()))
        .arg(format!("--socket={}", socket.display()));
    let mut proc = Proc::spawn("mariadbd", &mut cmd, dir)?;
    procs::wait_listening(&mut proc, ([127, 0, 0, 1], port).into()).await?;
    let sql = format!(
        "CREATE DATABASE nova; CREATE TABLE nova.console_auth_tokens (id INTEGER NOT NULL AUTO_INCREMENT PRIMARY KEY, \
         token_hash VARCHAR(255) NOT NULL UNIQUE, console_type VARCHAR(255) NOT NULL, host VARCHAR(255) NOT NULL, \
         port INTEGER NOT NULL, internal_access_path VARCHAR(255), instance_uuid VARCHAR(36) NOT NULL, \
         expires INTEGER NOT NULL, access_url_base VARCHAR(255), tls_port INTEGER) CHARSET=utf8mb3; \
         INSERT INTO nova.console_auth_tokens (token_hash, console_type, host, port, instance_uuid, expires) \
         VALUES (SHA2('{NOVA_TOKEN}', 256), 'xvpvnc', '{}', {}, '{NOVA_TOKEN}', UNIX_TIMESTAMP() + 86400); \
         CREATE USER 'relay'@'127.0.0.1' IDENTIFIED BY 'bench'; GRANT SELECT ON nova.console_auth_tokens TO 'relay'@'127.0.0.1';",
        hv.ip(),
        hv.port()
    );
    let out = Command::new("mariadb")
        .args(["--no-defaults", "-uroot"])
        .arg(format!("--socket={}", socket.display()))
        .args(["-e", &sql])
        .output()
        .context("mariadb")?;
    if !out.status.success() {
        bail!("setting up nova's table: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok((proc, format!("mysql+pymysql://relay:bench@127.0.0.1:{port}/nova")))
}
