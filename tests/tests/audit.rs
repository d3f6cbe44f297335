//! The audit trail as an operator reads it: relay as a process of its own, logging JSON,
//! one console opened and closed. Each audit event must carry its own fields (a console's
//! relay runs without a tracing span, so nothing may depend on one), and the token must
//! never appear in full. A log reader that stalls stalls no console.

use relay::control::client::call;
use relay::control::proto::Request;
use relay::control::replies::TokenCreated;
use relay_tests::fake_hypervisor::{FakeVnc, Script};
use relay_tests::relay_server::{connect_door_at, new_token, scratch_dir};
use relay_tests::servers::RelayProcess;
use relay_tests::viewer::handshake;
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The audit events logged so far, in order.
fn audit_events(log: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines = text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok());
    lines.filter(|v| v["target"] == "relay::audit").collect()
}

/// A configuration in `dir`: both doors on free ports, the memory store, a JSON log.
fn json_logging_config(dir: &std::path::Path) -> std::path::PathBuf {
    let config = dir.join("relay.toml");
    let text = format!(
        "[listen]\nwebsocket = \"127.0.0.1:0\"\nconnect = \"127.0.0.1:0\"\ncontrol = \"{}\"\n\n\
         [hypervisor]\nauth_schemes = [\"none\"]\n\n[store]\nbackend = \"memory\"\n\n[log]\nformat = \"json\"\n",
        dir.join("control.sock").display()
    );
    std::fs::write(&config, text).unwrap();
    config
}

#[tokio::test]
async fn a_console_start_and_end_are_audited_with_their_own_fields() {
    let dir = scratch_dir("audit");
    let (config, log) = (json_logging_config(&dir), dir.join("relay.log"));
    let relay = RelayProcess::start_logging_to(&config, &log).await.unwrap();
    let hv = FakeVnc::start(Script::echo()).await;
    let created: TokenCreated = call(&relay.control, Request::TokenCreate(new_token("vm-audit", hv.addr()))).await.unwrap();
    let mut s = connect_door_at(relay.connect, &created.token).await.unwrap();
    handshake(&mut s, b"RFB 003.008\n", None).await.unwrap();
    s.write_all(b"twelve bytes").await.unwrap();
    let mut back = [0u8; 12];
    s.read_exact(&mut back).await.unwrap();
    // The live console, as `relay ctl sessions` lists it, names its client too.
    let listed: serde_json::Value = call(&relay.control, Request::Sessions { instance: None }).await.unwrap();
    assert_eq!(listed["sessions"][0]["client"], "127.0.0.1", "{listed}");
    drop(s);

    let deadline = Instant::now() + Duration::from_secs(10);
    let end = loop {
        let events = audit_events(&log);
        if let Some(end) = events.iter().find(|e| e["event"] == "session_end") {
            break end.clone();
        }
        assert!(Instant::now() < deadline, "no session_end in {events:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let events = audit_events(&log);
    let start = events.iter().find(|e| e["event"] == "session_start").expect("a session_start");
    assert_eq!(start["session"], end["session"], "start and end name the same session");
    assert_eq!(start["hypervisor"], hv.addr().to_string());
    assert_eq!(end["instance"], "vm-audit");
    assert_eq!(end["token_id"], created.id, "the token by its id");
    assert_eq!(end["door"], "connect");
    assert_eq!(end["client"], "127.0.0.1");
    assert_eq!(end["hypervisor"], hv.addr().to_string());
    assert_eq!(end["viewer_auth"], "none");
    assert_eq!(end["cause"], "viewer_closed", "{end}");
    // The echo, plus what relay passed on after the security handshakes (ClientInit,
    // ServerInit).
    assert!(end["bytes_to_hypervisor"].as_u64() >= Some(12) && end["bytes_to_viewer"].as_u64() >= Some(12), "{end}");
    assert!(end["duration_ms"].is_u64() && end["relay"].is_string(), "{end}");
    let whole = std::fs::read_to_string(&log).unwrap();
    assert!(!whole.contains(&created.token), "the token appears in full in the log");
    drop(relay);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_log_reader_that_stalls_does_not_stall_the_consoles_and_loses_no_line_once_it_reads() {
    const CONSOLES: usize = 300;
    let dir = scratch_dir("audit-stalled");
    let config = json_logging_config(&dir);
    // Nobody reads the pipe for now: it holds 64 KiB, about 70 consoles' start and end.
    let (reader, writer) = std::io::pipe().unwrap();
    let relay = RelayProcess::start_with_stderr(&config, writer.into()).await.unwrap();
    let hv = FakeVnc::start(Script::echo()).await;
    let created: TokenCreated = call(&relay.control, Request::TokenCreate(new_token("vm-stalled-log", hv.addr()))).await.unwrap();
    let open_and_close = async {
        for _ in 0..CONSOLES {
            let mut s = connect_door_at(relay.connect, &created.token).await.unwrap();
            handshake(&mut s, b"RFB 003.008\n", None).await.unwrap();
            s.write_all(b"ping").await.unwrap();
            let mut back = [0u8; 4];
            s.read_exact(&mut back).await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), open_and_close).await.expect("consoles stalled behind the unread log");

    // The reader comes back: every console's end is there. (Read on a thread of its own:
    // the fake hypervisor runs on this test's runtime and must see the last console close.)
    let counting = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        let (mut ends, mut last) = (0, String::new());
        for line in std::io::BufReader::new(reader).lines().map_while(Result::ok) {
            let event: Value = serde_json::from_str(&line).unwrap_or_default();
            ends += usize::from(event["event"] == "session_end");
            last = line;
            if ends == CONSOLES {
                break;
            }
        }
        (ends, last)
    });
    let (ends, last) = tokio::time::timeout(Duration::from_secs(20), counting)
        .await
        .expect("every console's session_end within 20 s of the reader's return")
        .unwrap();
    assert_eq!(ends, CONSOLES, "the log ended after {last}");
    drop(relay);
    let _ = std::fs::remove_dir_all(dir);
}
