//! Running relay for a while: Prometheus metrics that agree with `relay ctl stats`, a
//! SIGHUP that changes the configuration under live consoles, and consoles that end with
//! their token.

use relay::auth::NewToken;
use relay::control::client::call;
use relay::control::proto::Request;
use relay::control::replies::{Stats, TokenCreated};
use relay::front::Door;
use relay_tests::fake_hypervisor::{FakeVnc, Script};
use relay_tests::relay_server::{TestRelay, new_token, scratch_dir};
use relay_tests::servers::RelayProcess;
use relay_tests::viewer::handshake;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RFB38: &[u8; 12] = b"RFB 003.008\n";

/// One HTTP/1.0 exchange: the response's head and body.
async fn get(addr: SocketAddr, path: &str, accept: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nAccept: {accept}\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await.expect("an answer, then close").unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a head");
    (head.to_string(), body.to_string())
}

/// A scrape, parsed by a Prometheus text-format parser: every sample line must parse.
fn parse(body: &str) -> prometheus_parse::Scrape {
    let samples = body.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).count();
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("the exposition parses");
    let parsed: usize = scrape
        .samples
        .iter()
        .map(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets) => buckets.len(),
            _ => 1,
        })
        .sum();
    assert_eq!(parsed, samples, "every sample line was understood:\n{body}");
    scrape
}

/// The value of the sample `name` whose labels include `labels`, summed over the rest.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name} is not a number: {other:?}"),
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_stats_while_consoles_run() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start_with(|c| c.metrics.listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let metrics = relay.metrics.expect("the metrics listener");
    // Two consoles through CONNECT and one over WebSocket stay open; one more ends.
    let mut live = Vec::new();
    for i in 0..3 {
        let mut s = relay.connect_door(&relay.token(&format!("vm-{i}"), hv.addr()).await).await.unwrap();
        handshake(&mut s, RFB38, None).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        s.read_exact(&mut [0u8; 5]).await.unwrap();
        live.push(s);
    }
    let mut ws = relay.websocket(&format!("/?token={}", relay.token("vm-ws", hv.addr()).await), &[]).await.unwrap();
    handshake(&mut ws, RFB38, None).await.unwrap();
    drop(live.pop());
    relay.ended(1).await;
    assert!(relay.connect_door("not-a-token").await.unwrap_err().contains("403"));

    let (head, body) = get(metrics, "/metrics", "text/plain").await;
    let stats: Stats = relay.stats().await;
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/plain; version=0.0.4"), "{head}");
    let scrape = parse(&body);
    let l = &stats.labelled;
    for door in [Door::Connect, Door::WebSocket] {
        let name = door.to_string();
        assert_eq!(value(&scrape, "relay_consoles_started_total", &[("door", &name)]), l.started[&door] as f64, "{door}");
        let live = stats.live_by_door.get(&door).copied().unwrap_or(0);
        assert_eq!(value(&scrape, "relay_consoles_live", &[("door", &name)]), live as f64, "{door}");
    }
    assert_eq!((l.started[&Door::Connect], l.started[&Door::WebSocket]), (3, 1));
    assert_eq!(stats.sessions_active, 3);
    let c = &stats.counters;
    assert_eq!(value(&scrape, "relay_consoles_ended_total", &[]), c.sessions_ended as f64);
    assert_eq!(value(&scrape, "relay_consoles_ended_total", &[("door", "connect"), ("cause", "viewer_closed")]), 1.0);
    assert_eq!(value(&scrape, "relay_console_bytes_total", &[("direction", "to_hypervisor")]), c.bytes_to_hypervisor as f64);
    assert_eq!(value(&scrape, "relay_console_bytes_total", &[("direction", "to_viewer")]), c.bytes_to_viewer as f64);
    assert!(c.bytes_to_viewer > 5, "the ended console's bytes are counted");
    assert_eq!(value(&scrape, "relay_live_bytes_to_viewer", &[]), stats.live_bytes_to_viewer as f64);
    assert_eq!(value(&scrape, "relay_token_rejections_total", &[("reason", "unknown")]), 1.0);
    assert_eq!(value(&scrape, "relay_refused_total", &[("reason", "forbidden")]), 1.0);
    assert_eq!(value(&scrape, "relay_refused_total", &[]), c.connections_refused as f64);
    assert_eq!(value(&scrape, "relay_connections_accepted_total", &[]), c.connections_accepted as f64);
    assert_eq!(value(&scrape, "relay_tokens", &[]), stats.tokens as f64);
    assert_eq!(value(&scrape, "relay_handshake_duration_seconds_count", &[]), 4.0, "one per console started");
    assert_eq!(value(&scrape, "relay_console_duration_seconds_count", &[]), 1.0, "one per console ended");
    assert_eq!(value(&scrape, "relay_token_lookup_duration_seconds_count", &[]), 5.0, "one per console asked for");

    // OpenMetrics for a Prometheus that asks for it.
    let (head, body) = get(metrics, "/metrics", "application/openmetrics-text;version=1.0.0,text/plain;q=0.5").await;
    assert!(head.contains("application/openmetrics-text; version=1.0.0"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    // The health probes are served here too; anything else is not.
    assert!(get(metrics, "/healthz", "*/*").await.1 == "alive\n");
    assert!(get(metrics, "/readyz", "*/*").await.1 == "ready\n");
    assert!(get(metrics, "/vnc.html", "*/*").await.0.starts_with("HTTP/1.1 404"));
}

fn write_config(path: &Path, dir: &Path, extra: &str) {
    let text = format!(
        "[listen]\nwebsocket = \"127.0.0.1:0\"\nconnect = \"127.0.0.1:0\"\ncontrol = \"{}\"\n\n\
         [store]\nbackend = \"memory\"\n\n{extra}\n",
        dir.join("control.sock").display()
    );
    std::fs::write(path, text).unwrap();
}

async fn door(relay: &RelayProcess, token: &str) -> Result<TcpStream, String> {
    relay_tests::relay_server::connect_door_at(relay.connect, token).await
}

/// Waits up to 5 s for `door` to give `want` (true: a console opens; false: refused).
async fn second_console(relay: &RelayProcess, token: &str, want: bool) -> bool {
    let started = Instant::now();
    loop {
        let opened = door(relay, token).await.map(drop).is_ok();
        if opened == want || started.elapsed() > Duration::from_secs(5) {
            // Let an opened console's end reach relay's bookkeeping.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return opened;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn still_works(s: &mut TcpStream) {
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await.expect("an echo").unwrap();
    assert_eq!(&back, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_limit_under_a_live_console_and_keeps_the_old_file_when_the_new_one_is_broken() {
    let hv = FakeVnc::start(Script::echo()).await;
    let dir = scratch_dir("reload");
    let path = dir.join("relay.toml");
    let limit = |n: u32| format!("[limits]\nmax_sessions_per_instance = {n}\n");
    write_config(&path, &dir, &limit(2));
    let mut relay = RelayProcess::start(&path).await.unwrap();
    let created: TokenCreated = call(&relay.control, Request::TokenCreate(new_token("vm-reload", hv.addr()))).await.unwrap();
    let mut first = door(&relay, &created.token).await.unwrap();
    handshake(&mut first, RFB38, None).await.unwrap();
    assert!(second_console(&relay, &created.token, true).await, "two consoles per instance at first");

    write_config(&path, &dir, &limit(1));
    relay.signal("HUP");
    assert!(!second_console(&relay, &created.token, false).await, "the lowered limit applies after SIGHUP");
    still_works(&mut first).await;

    // A file that does not validate: the raised limit in it must not apply.
    write_config(&path, &dir, &format!("{}\n[hypervisor]\nauth_schemes = []\n", limit(3)));
    relay.signal("HUP");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!second_console(&relay, &created.token, false).await, "a broken file changes nothing");
    assert!(relay.running(), "relay runs on with the old configuration");
    still_works(&mut first).await;

    write_config(&path, &dir, &limit(3));
    relay.signal("HUP");
    assert!(second_console(&relay, &created.token, true).await, "a good file applies again");
    still_works(&mut first).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_end_consoles_at_expiry_a_console_ends_with_its_token() {
    let hv = FakeVnc::start(Script::echo()).await;
    let ending = TestRelay::start_with(|c| c.tokens.end_consoles_at_expiry = true).await;
    let lasting = TestRelay::start().await;
    let short = |relay_name: &str| NewToken { ttl: Some(2), ..new_token(relay_name, hv.addr()) };
    let mut consoles = HashMap::new();
    for (name, relay) in [("ending", &ending), ("lasting", &lasting)] {
        let token = relay.token_with(short(name)).await;
        let mut s = relay.connect_door(&token).await.unwrap();
        handshake(&mut s, RFB38, None).await.unwrap();
        consoles.insert(name, s);
    }
    let started = Instant::now();
    let mut ended = consoles.remove("ending").unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(6), ended.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the console ended when its token expired");
    assert!(started.elapsed() >= Duration::from_millis(500), "not before");
    let stats = ending.ended(1).await;
    assert_eq!(stats.ended[&relay::relay::lifecycle::Cause::Disconnected], 1, "{stats:?}");
    // Without the setting a token only has to be valid when the console opens.
    tokio::time::sleep(Duration::from_secs(1)).await;
    still_works(consoles.get_mut("lasting").unwrap()).await;
}

/// `[relay] worker_threads` sets the threads relay runs its tasks on; 0 is one per core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_sets_the_threads_that_run_consoles() {
    let dir = scratch_dir("workers");
    let workers = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim() == "tokio-rt-worker")
            .count()
    };
    let cores = std::thread::available_parallelism().unwrap().get();
    for (setting, expected) in [(1, 1), (0, cores)] {
        let path = dir.join(format!("relay-{setting}.toml"));
        write_config(&path, &dir, &format!("[relay]\nworker_threads = {setting}\n"));
        let relay = RelayProcess::start(&path).await.unwrap();
        // Every worker has started once relay listens (tokio starts them with the runtime).
        assert_eq!(workers(relay.pid().unwrap()), expected, "worker_threads = {setting}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
