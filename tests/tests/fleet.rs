//! A fleet of three appliances sharing one real Redis: a token issued on one opens
//! consoles through the others (CONNECT to a real QEMU, noVNC in Chromium), resets and
//! lock-outs reach every appliance, a single-use token opens one console however it is
//! raced, HAProxy spreads viewers over the fleet, and a Redis that dies and comes back is
//! survived as documented.

use relay::auth::Secret;
use relay::config::StoreBackend;
use relay::control::client::call;
use relay::control::proto::Request;
use relay::control::replies::{Cluster, InstanceReset, Stats, TokenCreated};
use relay::fleet::{Delivery, FleetSessions};
use relay::relay::lifecycle::Cause;
use relay_tests::browser::{assemble_web_root, open};
use relay_tests::env;
use relay_tests::fake_hypervisor::{FakeVnc, Script};
use relay_tests::hypervisor::{Qemu, VncAuth};
use relay_tests::relay_server::{TestRelay, new_token, scratch_dir};
use relay_tests::servers::{Haproxy, RedisServer, RelayProcess};
use relay_tests::viewer::{ViewerError, handshake};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RFB38: &[u8; 12] = b"RFB 003.008\n";

/// A secret key file (mode 0600) that every appliance of a test shares.
pub fn key_file(dir: &Path) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("secret.key");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path).unwrap();
    std::io::Write::write_all(&mut f, b"4f1c9a0e7b2d5c8f3a6e9b1d4c7f0a2e5b8d1c4f7a0e3b6d9c2f5a8e1b4d7c0a\n").unwrap();
    path
}

struct Fleet {
    redis: RedisServer,
    relays: Vec<TestRelay>,
    _dir: PathBuf,
}

/// Three appliances, a to c, on one Redis; `adjust` has a say in each configuration.
async fn fleet(adjust: impl Fn(&mut relay::config::Config) + Clone) -> Fleet {
    env::redis();
    let redis = RedisServer::start().await.unwrap();
    let dir = scratch_dir("fleet");
    let key = key_file(&dir);
    let mut relays = Vec::new();
    for name in ["a", "b", "c"] {
        let (url, key, adjust) = (redis.url(), key.clone(), adjust.clone());
        relays.push(
            TestRelay::start_with(move |c| {
                c.store.backend = StoreBackend::Redis;
                c.store.url = Some(url);
                c.store.secret_key_file = Some(key);
                c.store.appliance_name = Some(name.into());
                adjust(c);
            })
            .await,
        );
    }
    Fleet { redis, relays, _dir: dir }
}

/// Reads until the console ends (EOF or reset), within `limit`; how long it took.
async fn ended_within(s: &mut TcpStream, limit: Duration) -> Duration {
    ended_within_since(s, limit, Instant::now()).await
}

/// Reads until the console ends, at most `limit` after `started`; the time since then.
async fn ended_within_since(s: &mut TcpStream, limit: Duration, started: Instant) -> Duration {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the console was still live {limit:?} after the reset"),
        }
    }
}

/// An echo console that is live: a byte goes there and back.
async fn live(relay: &TestRelay, token: &str) -> TcpStream {
    let mut s = relay.connect_door(token).await.unwrap();
    handshake(&mut s, RFB38, None).await.unwrap();
    assert!(alive(&mut s).await, "a fresh console relays");
    s
}

async fn alive(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    s.write_all(b"x").await.is_ok() && matches!(tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b)).await, Ok(Ok(_)))
}

#[tokio::test]
#[cfg_attr(
    any(relay_no_redis, relay_no_qemu, relay_no_browser),
    ignore = "redis-server, QEMU or Chromium is not installed: cargo xtask deps"
)]
async fn a_token_issued_on_one_appliance_opens_the_console_through_the_others() {
    env::qemu();
    env::browser();
    let qemu = Qemu::start(VncAuth::None).await.unwrap();
    let web = scratch_dir("fleet-web");
    let root = assemble_web_root(&web);
    let fleet = fleet(move |c| c.listen.web = Some(root.clone())).await;
    let [a, b, c] = [&fleet.relays[0], &fleet.relays[1], &fleet.relays[2]];
    let token = a.token("vm-fleet", qemu.addr()).await;

    // A native viewer through b.
    let mut native = b.connect_door(&token).await.expect("a's token opens b's CONNECT door");
    let init = handshake(&mut native, RFB38, None).await.unwrap();
    assert_eq!((init.width, init.height), (720, 400), "QEMU's console");

    // While it is live, a lists every appliance's consoles.
    let all: FleetSessions = call(&a.control, Request::ClusterSessions { instance: None }).await.unwrap();
    assert!(all.missing.is_empty(), "every appliance answered: {all:?}");
    let on = |name: &str| all.appliances.iter().find(|x| x.appliance == name).map(|x| x.sessions.len());
    assert_eq!((on("a"), on("b"), on("c")), (Some(0), Some(1), Some(0)), "{all:?}");
    let cluster: Cluster = call(&c.control, Request::Cluster).await.unwrap();
    assert_eq!(cluster.store, "redis");
    let mut names: Vec<&str> = cluster.appliances.iter().filter(|x| x.alive).map(|x| x.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"], "{cluster:?}");
    assert_eq!(cluster.appliances.iter().find(|x| x.name == "b").unwrap().version, env!("CARGO_PKG_VERSION"));

    // noVNC in Chromium through c.
    let url = format!("http://{}/console.html?path=%3Ftoken%3D{token}", c.ws);
    let seen = open(&url, "connected", &[], None).await;
    assert!(seen.ok, "{:?}\n{}", seen.report, seen.stderr);
    assert_eq!((seen.report["width"].as_u64(), seen.report["height"].as_u64()), (Some(720), Some(400)));
    assert_eq!(c.stats().await.counters.sessions_started, 1, "the browser's console ran on c");
    drop(native);
    let _ = std::fs::remove_dir_all(web);
}

#[tokio::test]
#[cfg_attr(relay_no_redis, ignore = "redis-server is not installed: cargo xtask deps")]
async fn a_reset_on_one_appliance_ends_the_consoles_on_all_of_them() {
    let hv = FakeVnc::start(Script::echo()).await;
    let fleet = fleet(|_| {}).await;
    let [a, b, c] = [&fleet.relays[0], &fleet.relays[1], &fleet.relays[2]];
    let token = c.token("vm-reset", hv.addr()).await;
    let other = c.token("vm-other", hv.addr()).await;
    let mut on_a = live(a, &token).await;
    let mut on_b = live(b, &token).await;
    let mut bystander = live(b, &other).await;
    let asked = Instant::now();
    let reset: InstanceReset = call(&c.control, Request::InstanceReset { instance: "vm-reset".into(), revoke: true }).await.unwrap();
    assert!(matches!(reset.fleet, Delivery::Told { .. }), "{reset:?}");
    assert_eq!((reset.disconnected, reset.revoked), (0, 1), "c had no console of its own; the token is gone");
    // Through pub/sub, well within the 2 s re-check: the fast path carried it.
    let limit = Duration::from_millis(500);
    let (ta, tb) = (ended_within_since(&mut on_a, limit, asked).await, ended_within_since(&mut on_b, limit, asked).await);
    eprintln!("reset asked on c ended the consoles on a after {ta:?}, on b after {tb:?}");
    assert!(alive(&mut bystander).await, "another instance's console is untouched");
    assert!(a.connect_door(&token).await.unwrap_err().contains("403"), "revoked everywhere");
    let ended = a.ended(1).await.ended;
    assert_eq!(ended.get(&Cause::Disconnected), Some(&1), "{ended:?}");
}

#[tokio::test]
#[cfg_attr(relay_no_redis, ignore = "redis-server is not installed: cargo xtask deps")]
async fn the_shared_store_keeps_the_tokens_of_hundreds_of_live_consoles_from_lapsing() {
    // More live consoles than one touch call carries (256), each on a token of its own.
    const CONSOLES: usize = 300;
    let hv = FakeVnc::start(Script::echo()).await;
    let fleet = fleet(|c| c.tokens.touch_interval_secs = 1).await;
    let [a, b] = [&fleet.relays[0], &fleet.relays[1]];
    let lapsing = |instance: String| {
        let mut req = new_token(&instance, hv.addr());
        req.idle_timeout = Some(3);
        req
    };
    let mut tokens = Vec::new();
    let mut consoles = Vec::new();
    for i in 0..CONSOLES {
        let token = a.token_with(lapsing(format!("vm-live-{i}"))).await;
        consoles.push(live(a, &token).await);
        tokens.push(token);
    }
    let unused = a.token_with(lapsing("vm-unused".into())).await;
    // Redis forgets its scripts (as after a restart): the touches must bring theirs back.
    let flushed = std::process::Command::new("redis-cli").args(["-u", &fleet.redis.url(), "SCRIPT", "FLUSH"]).output().unwrap();
    assert!(flushed.status.success() && flushed.stdout.starts_with(b"OK"), "{flushed:?}");
    tokio::time::sleep(Duration::from_millis(4500)).await;
    for (i, token) in tokens.iter().enumerate() {
        let check = b.ctl(Request::TokenCheck { token: token.clone() }).await.unwrap();
        assert_eq!(check["valid"], true, "console {i}'s token, touched by a, as b sees it: {check}");
    }
    let check = b.ctl(Request::TokenCheck { token: unused }).await.unwrap();
    assert_eq!(check["valid"], false, "an unused token lapses: {check}");
    assert!(alive(&mut consoles[CONSOLES - 1]).await, "the last console still relays");
}

#[tokio::test]
#[cfg_attr(relay_no_redis, ignore = "redis-server is not installed: cargo xtask deps")]
async fn a_single_use_token_raced_from_three_appliances_opens_one_console() {
    let hv = FakeVnc::start(Script::echo()).await;
    let fleet = fleet(|_| {}).await;
    for round in 0..10 {
        let mut req = new_token(&format!("vm-race-{round}"), hv.addr());
        req.single_use = true;
        let token = fleet.relays[round % 3].token_with(req).await;
        let attempts = fleet.relays.iter().flat_map(|r| [r, r]).map(|r| r.connect_door(&token));
        let results = futures_util::future::join_all(attempts).await;
        let opened = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(opened, 1, "round {round}: {:?}", results.iter().map(|r| r.as_ref().err()).collect::<Vec<_>>());
        for refused in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(refused.contains("already used"), "{refused}");
        }
    }
}

#[tokio::test]
#[cfg_attr(relay_no_redis, ignore = "redis-server is not installed: cargo xtask deps")]
async fn wrong_passwords_spread_over_the_fleet_lock_out_after_max_failures_in_total() {
    let hv = FakeVnc::start(Script::echo()).await;
    let fleet = fleet(|c| c.passwords.max_failures = 3).await;
    let token = fleet.relays[0].token("vm-guess", hv.addr()).await;
    let set = Request::InstancePasswordSet { instance: "vm-guess".into(), password: Secret("right".into()), disconnect: false };
    fleet.relays[1].ctl(set).await.unwrap();
    // A password set on b is asked for on a and c: they share it.
    for relay in &fleet.relays {
        let mut s = relay.connect_door(&token).await.unwrap();
        assert!(matches!(handshake(&mut s, RFB38, Some("guess")).await, Err(ViewerError::AuthFailed(_))));
    }
    for relay in &fleet.relays {
        let mut s = relay.connect_door(&token).await.unwrap();
        match handshake(&mut s, RFB38, Some("right")).await {
            Err(ViewerError::Refused(why)) => assert!(why.contains("too many wrong passwords"), "{why}"),
            other => panic!("three guesses over three appliances lock the console everywhere: {other:?}"),
        }
    }
}

#[tokio::test]
#[cfg_attr(any(relay_no_redis, relay_no_haproxy), ignore = "redis-server or haproxy is not installed: cargo xtask deps")]
async fn haproxy_spreads_viewers_over_three_relay_processes_and_any_serves_any_token() {
    env::haproxy();
    env::redis();
    let hv = FakeVnc::start(Script::echo()).await;
    let redis = RedisServer::start().await.unwrap();
    let dir = scratch_dir("fleet-lb");
    let key = key_file(&dir);
    let mut relays = Vec::new();
    for name in ["a", "b", "c"] {
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let config = sub.join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "[listen]\nwebsocket = \"127.0.0.1:0\"\nconnect = \"127.0.0.1:0\"\ncontrol = \"{}\"\n\n\
                 [store]\nbackend = \"redis\"\nurl = \"{}\"\nsecret_key_file = \"{}\"\nappliance_name = \"{name}\"\n\n\
                 [log]\nfilter = \"warn\"\n",
                sub.join("control.sock").display(),
                redis.url(),
                key.display()
            ),
        )
        .unwrap();
        relays.push(RelayProcess::start(&config).await.unwrap());
    }
    let doors: Vec<_> = relays.iter().map(|r| r.connect).collect();
    let lb = Haproxy::round_robin(&doors).await.unwrap();
    let created: TokenCreated = call(&relays[0].control, Request::TokenCreate(new_token("vm-lb", hv.addr()))).await.unwrap();
    let mut consoles = Vec::new();
    for _ in 0..6 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        s.write_all(format!("CONNECT /console?token={} HTTP/1.1\r\nHost: relay\r\n\r\n", created.token).as_bytes()).await.unwrap();
        let head = relay_tests::relay_server::read_head(&mut s).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        handshake(&mut s, RFB38, None).await.unwrap();
        assert!(alive(&mut s).await);
        consoles.push(s);
    }
    for relay in &relays {
        let stats: Stats = call(&relay.control, Request::Stats).await.unwrap();
        assert_eq!(stats.sessions_active, 2, "round robin: two consoles on each appliance");
    }
    // One reset, asked of the last process, ends all six.
    let reset: InstanceReset = call(&relays[2].control, Request::InstanceReset { instance: "vm-lb".into(), revoke: false }).await.unwrap();
    assert!(matches!(reset.fleet, Delivery::Told { .. }), "{reset:?}");
    for s in &mut consoles {
        ended_within(s, Duration::from_secs(1)).await;
    }
    drop(relays);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
#[cfg_attr(relay_no_redis, ignore = "redis-server is not installed: cargo xtask deps")]
async fn a_redis_outage_refuses_new_consoles_keeps_live_ones_and_delivers_resets_when_back() {
    let hv = FakeVnc::start(Script::echo()).await;
    let mut fleet = fleet(|c| c.store.timeout_ms = 300).await;
    let token = fleet.relays[0].token("vm-outage", hv.addr()).await;
    let mut on_a = live(&fleet.relays[0], &token).await;
    let mut on_b = live(&fleet.relays[1], &token).await;

    fleet.redis.kill();
    assert!(alive(&mut on_a).await && alive(&mut on_b).await, "live consoles keep running without the store");
    let refused = fleet.relays[2].connect_door(&token).await.unwrap_err();
    assert!(refused.starts_with("HTTP/1.1 503") && refused.contains("console store unavailable"), "{refused}");
    let reset: InstanceReset =
        call(&fleet.relays[0].control, Request::InstanceReset { instance: "vm-outage".into(), revoke: false }).await.unwrap();
    assert_eq!(reset.disconnected, 1, "a's own console ends at once");
    assert!(matches!(reset.fleet, Delivery::Pending { .. }), "the reply says the fleet was not told: {reset:?}");
    ended_within(&mut on_a, Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive(&mut on_b).await, "b cannot know yet");

    fleet.redis.restart().await.unwrap();
    // a delivers its kept reset on its next tick (every 2 s) once Redis answers.
    let took = ended_within(&mut on_b, Duration::from_secs(8)).await;
    eprintln!("the reset kept during the outage reached b {took:?} after Redis came back");
    // Redis kept the token through its restart (append-only file), and consoles open again.
    let mut again = fleet.relays[2].connect_door(&token).await.expect("new consoles once Redis is back");
    handshake(&mut again, RFB38, None).await.unwrap();
}
