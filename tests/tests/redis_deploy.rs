//! The Redis deployments a fleet runs on besides a plain local server: TLS (`rediss://`,
//! the server's certificate verified against a CA file) with an ACL user whose password
//! comes from a file, and Sentinel, through whose failover relay follows the new master.

use relay::config::StoreBackend;
use relay_tests::env;
use relay_tests::fake_hypervisor::{FakeVnc, Script};
use relay_tests::hypervisor::free_port;
use relay_tests::pki::{Ca, Role};
use relay_tests::relay_server::{TestRelay, scratch_dir};
use relay_tests::servers::{REDIS_SERVER, RedisServer};
use relay_tests::viewer::handshake;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RFB38: &[u8; 12] = b"RFB 003.008\n";

fn private_file(path: &Path, contents: &str) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).unwrap();
    std::io::Write::write_all(&mut f, contents.as_bytes()).unwrap();
    path.to_path_buf()
}

#[tokio::test]
#[cfg_attr(relay_no_redis, ignore = "redis-server is not installed: cargo xtask deps")]
async fn rediss_with_a_verified_certificate_and_an_acl_user() {
    env::redis();
    let dir = scratch_dir("rediss");
    let ca = Ca::new("redis CA");
    let server = ca.issue_files(&dir, "redis", Role::Server, &["localhost"], false);
    let ca_file = ca.write_cert(&dir.join("ca.pem"));
    let mut args: Vec<String> = ["--tls-cert-file", "--tls-key-file", "--tls-ca-cert-file"]
        .iter()
        .zip([&server.cert, &server.key, &ca_file])
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .collect();
    // An ACL user for relay's keys and channels only; the default user is off. (Each word
    // its own argument: redis-server would take a quoted one for the user's name.)
    let words = "--tls-auth-clients no --user relay on >acl-pass-1 ~relay:* &relay:* +@all -@dangerous --user default off";
    args.extend(words.split(' ').map(String::from));
    let redis = RedisServer::start_with(args, true).await.unwrap();
    let key = private_file(&dir.join("secret.key"), "fleet-key-0123456789abcdef0123456789abcdef\n");
    let password = private_file(&dir.join("redis.password"), "acl-pass-1\n");
    let url = format!("rediss://localhost:{}/0", redis.port);
    let store = move |c: &mut relay::config::Config, password: PathBuf| {
        c.store.backend = StoreBackend::Redis;
        c.store.url = Some(url.clone());
        c.store.ca_file = Some(ca_file.clone());
        c.store.username = Some("relay".into());
        c.store.password_file = Some(password);
        c.store.secret_key_file = Some(key.clone());
    };
    let hv = FakeVnc::start(Script::echo()).await;
    let (s1, p1) = (store.clone(), password.clone());
    let relay = TestRelay::start_with(move |c| s1(c, p1)).await;
    let token = relay.token("vm-tls", hv.addr()).await;
    let mut s = relay.connect_door(&token).await.expect("a console through the TLS store");
    handshake(&mut s, RFB38, None).await.unwrap();

    // A wrong ACL password: no token can be issued, and the error says why.
    let wrong = private_file(&dir.join("wrong.password"), "nope\n");
    let refused = TestRelay::start_with(move |c| store(c, wrong)).await;
    let err = refused.ctl(relay::control::proto::Request::Stats).await.unwrap_err().to_string();
    assert!(err.contains("redis") || err.contains("store"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A Sentinel watching `master`, with quorum 1 and a half-second down-after.
struct Sentinel {
    child: Child,
    port: u16,
}

impl Sentinel {
    async fn start(dir: &Path, master_port: u16) -> Sentinel {
        let port = free_port().unwrap();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                 sentinel monitor relay 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds relay 500\nsentinel failover-timeout relay 5000\n",
                dir.display()
            ),
        )
        .unwrap();
        let child = Command::new(REDIS_SERVER)
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "sentinel did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Sentinel { child, port }
    }
}

impl Sentinel {
    /// Waits until the sentinel has found the replica (it asks the master every 10 s), so
    /// that it has one to promote.
    async fn knows_a_replica(&self) {
        let started = Instant::now();
        loop {
            let out = Command::new("redis-cli").args(["-p", &self.port.to_string(), "SENTINEL", "REPLICAS", "relay"]).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("master-link-status") && text.lines().any(|l| l == "ok") && !text.contains("disconnected") {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "the sentinel found no replica: {text}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
#[cfg_attr(relay_no_redis, ignore = "redis-server is not installed: cargo xtask deps")]
async fn sentinel_failover_is_followed_and_keeps_replicated_tokens() {
    env::redis();
    let dir = scratch_dir("sentinel");
    let mut master = RedisServer::start().await.unwrap();
    let replica = RedisServer::start_with(vec!["--replicaof".into(), "127.0.0.1".into(), master.port.to_string()], false).await.unwrap();
    let sentinel = Sentinel::start(&dir, master.port).await;
    sentinel.knows_a_replica().await;
    let key = private_file(&dir.join("secret.key"), "fleet-key-0123456789abcdef0123456789abcdef\n");
    let sentinels = vec![format!("127.0.0.1:{}", sentinel.port)];
    let relay = TestRelay::start_with(move |c| {
        c.store.backend = StoreBackend::Redis;
        c.store.sentinels = sentinels;
        c.store.master_name = Some("relay".into());
        c.store.secret_key_file = Some(key);
        c.store.timeout_ms = 300;
        // Acknowledged only once the replica has it: the failover cannot lose it.
        c.store.wait_replicas = 1;
    })
    .await;
    let hv = FakeVnc::start(Script::echo()).await;
    let token = relay.token("vm-failover", hv.addr()).await;
    master.kill();
    let started = Instant::now();
    let mut opened = None;
    while started.elapsed() < Duration::from_secs(20) {
        if let Ok(mut s) = relay.connect_door(&token).await
            && handshake(&mut s, RFB38, None).await.is_ok()
        {
            opened = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = opened.expect("the token opens a console once Sentinel has promoted the replica");
    eprintln!("consoles opened again {took:?} after the master was killed");
    // And relay writes to the new master; with no replica left, a write it cannot
    // replicate is refused rather than acknowledged.
    let refused = relay.ctl(relay::control::proto::Request::TokenCreate(relay_tests::relay_server::new_token("vm-after", hv.addr()))).await;
    // ("only 0 of 1 replicas confirmed", or a timeout on a loaded machine: never an "ok")
    assert!(refused.is_err(), "a write no replica confirmed was acknowledged: {refused:?}");
    drop(replica);
    let _ = std::fs::remove_dir_all(dir);
}
