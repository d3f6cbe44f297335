//! nova's token database as a token source: rows written as nova writes them into a real
//! MariaDB (Debian's mariadb-server, nova's table and indexes) open real consoles on both
//! doors, and relay honours what nova does to them afterwards.

use relay::config::TokenSourceKind;
use relay::control::proto::Request;
use relay_tests::env;
use relay_tests::fake_hypervisor::{FakeVnc, Script};
use relay_tests::relay_server::TestRelay;
use relay_tests::servers::Mariadb;
use relay_tests::viewer::handshake;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RFB38: &[u8; 12] = b"RFB 003.008\n";

/// A token as nova makes them: a random UUID.
fn nova_token() -> String {
    use sha2::Digest;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = format!("{:?}{}{}", Instant::now(), std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let h: String = sha2::Sha256::digest(seed.as_bytes()).iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

fn now() -> i64 {
    relay::app::unix_now() as i64
}

async fn relay_on(db: &Mariadb, adjust: impl FnOnce(&mut relay::config::Config) + Send + 'static) -> TestRelay {
    let url = db.url();
    TestRelay::start_with(move |c| {
        c.tokens.sources = vec![TokenSourceKind::Store, TokenSourceKind::Nova];
        c.nova.database_urls = vec![url];
        c.tokens.touch_interval_secs = 1;
        adjust(c);
    })
    .await
}

/// The CONNECT door's answer to `token`: Ok once RFB is through, else the status line.
async fn connect(relay: &TestRelay, token: &str) -> Result<TcpStream, String> {
    let mut s = relay.connect_door(token).await?;
    handshake(&mut s, RFB38, None).await.map_err(|e| e.to_string())?;
    Ok(s)
}

/// Whether the console on `s` (an echoing hypervisor) still carries bytes.
async fn alive(s: &mut TcpStream) -> bool {
    let mut back = [0u8; 4];
    s.write_all(b"ping").await.is_ok() && matches!(tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut back)).await, Ok(Ok(_)))
}

/// Waits until the console on `s` ends (EOF or reset), at most `limit`.
async fn ends_within(s: &mut TcpStream, limit: Duration) -> bool {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    while started.elapsed() < limit {
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            _ => {}
        }
    }
    false
}

#[tokio::test]
#[cfg_attr(relay_no_mariadb, ignore = "mariadb-server is not installed: cargo xtask deps")]
async fn nova_rows_open_consoles_at_their_door_only_until_they_expire() {
    env::mariadb();
    let db = Mariadb::start_nova().await.unwrap();
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = relay_on(&db, |_| {}).await;
    let instance = "6f2b0a4e-1c3d-4e5f-8a9b-0c1d2e3f4a5b";
    let (xvp, novnc, spice, expired) = (nova_token(), nova_token(), nova_token(), nova_token());
    db.authorize(&xvp, "xvpvnc", hv.addr(), instance, now() + 600).unwrap();
    db.authorize(&novnc, "novnc", hv.addr(), instance, now() + 600).unwrap();
    db.authorize(&spice, "spice-html5", hv.addr(), instance, now() + 600).unwrap();
    db.authorize(&expired, "xvpvnc", hv.addr(), instance, now() - 1).unwrap();

    let mut console = connect(&relay, &xvp).await.expect("an xvpvnc row opens the CONNECT door");
    assert!(alive(&mut console).await);
    let listed = relay.ctl(Request::Sessions { instance: None }).await.unwrap();
    assert_eq!(listed["sessions"][0]["instance"], instance, "the console is the row's instance: {listed}");
    assert_eq!(listed["sessions"][0]["source"], "nova", "{listed}");

    let refused = |r: Result<TcpStream, String>| r.err().unwrap_or_else(|| "opened".into());
    assert!(refused(connect(&relay, &novnc).await).contains("403"), "a novnc row is for the WebSocket door");
    assert!(refused(connect(&relay, &spice).await).contains("403"), "a SPICE row is for no door of relay's");
    assert!(refused(connect(&relay, &expired).await).contains("403"), "an expired row is refused");
    assert!(refused(connect(&relay, &nova_token()).await).contains("403"), "an unknown token is refused");
    let ws = relay.websocket(&format!("/?token={novnc}"), &[]).await;
    let mut ws = ws.expect("a novnc row opens the WebSocket door");
    handshake(&mut ws, RFB38, None).await.expect("RFB through the WebSocket door");
    assert!(relay.websocket(&format!("/?token={xvp}"), &[]).await.is_err(), "an xvpvnc row is for the CONNECT door");

    // relay's own tokens keep working beside nova's.
    let own = relay.token("vm-own", hv.addr()).await;
    assert!(connect(&relay, &own).await.is_ok());
}

#[tokio::test]
#[cfg_attr(relay_no_mariadb, ignore = "mariadb-server is not installed: cargo xtask deps")]
async fn every_cell_database_is_asked() {
    env::mariadb();
    let db = Mariadb::start_nova().await.unwrap();
    db.add_cell("nova_cell2").unwrap();
    let hv = FakeVnc::start(Script::echo()).await;
    let cell2 = db.cell_url("nova_cell2");
    let relay = relay_on(&db, move |c| c.nova.database_urls.push(cell2)).await;
    let (in_cell1, in_cell2) = (nova_token(), nova_token());
    db.authorize(&in_cell1, "xvpvnc", hv.addr(), "7a8b9c0d-1e2f-4a3b-8c4d-6e7f8a9b0c1d", now() + 600).unwrap();
    db.authorize_in("nova_cell2", &in_cell2, "xvpvnc", hv.addr(), "8b9c0d1e-2f3a-4b4c-9d5e-7f8a9b0c1d2e", now() + 600).unwrap();
    assert!(connect(&relay, &in_cell1).await.is_ok(), "a token in the first cell");
    let mut b = connect(&relay, &in_cell2).await.expect("a token in the second cell");
    // A row deleted in its cell ends its console, though the other cell never had it.
    db.sql("DELETE FROM nova_cell2.console_auth_tokens").unwrap();
    assert!(ends_within(&mut b, Duration::from_secs(4)).await);
}

#[tokio::test]
#[cfg_attr(relay_no_mariadb, ignore = "mariadb-server is not installed: cargo xtask deps")]
async fn a_console_ends_when_nova_deletes_its_token_and_survives_the_database_going_away() {
    env::mariadb();
    let mut db = Mariadb::start_nova().await.unwrap();
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = relay_on(&db, |_| {}).await;
    let (kept, deleted) = ("0e6c4d8a-2f1b-4c3d-9e8f-7a6b5c4d3e2f", "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d");
    let (tok_kept, tok_deleted) = (nova_token(), nova_token());
    db.authorize(&tok_kept, "xvpvnc", hv.addr(), kept, now() + 600).unwrap();
    db.authorize(&tok_deleted, "xvpvnc", hv.addr(), deleted, now() + 600).unwrap();
    let mut a = connect(&relay, &tok_kept).await.unwrap();
    let mut b = connect(&relay, &tok_deleted).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(alive(&mut a).await && alive(&mut b).await, "consoles stay while their rows do (two touch intervals)");

    // nova deletes an instance's tokens when it is deleted or migrated.
    db.clean_instance(deleted).unwrap();
    assert!(ends_within(&mut b, Duration::from_secs(4)).await, "the console of a deleted row ends within the touch interval");
    assert!(alive(&mut a).await, "the other instance's console is untouched");
    assert!(connect(&relay, &tok_deleted).await.is_err(), "and the deleted token no longer opens");

    // The database going away ends nothing by itself: relay cannot tell what nova did.
    db.stop();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(alive(&mut a).await, "a live console outlasts the database");
    let refused = connect(&relay, &nova_token()).await.err().unwrap_or_default();
    assert!(refused.contains("503"), "a nova token meets 'unavailable', not 'unknown', while the database is down: {refused}");
    let own = relay.token("vm-own", hv.addr()).await;
    assert!(connect(&relay, &own).await.is_ok(), "relay's own tokens do not need nova's database");
}

#[tokio::test]
#[cfg_attr(relay_no_mariadb, ignore = "mariadb-server is not installed: cargo xtask deps")]
async fn enforce_session_timeout_ends_consoles_when_their_token_expires() {
    env::mariadb();
    let db = Mariadb::start_nova().await.unwrap();
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = relay_on(&db, |c| c.nova.enforce_session_timeout = true).await;
    let (short, long) = (nova_token(), nova_token());
    db.authorize(&short, "xvpvnc", hv.addr(), "2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e", now() + 3).unwrap();
    db.authorize(&long, "xvpvnc", hv.addr(), "3c4d5e6f-7a8b-4c9d-8e0f-2a3b4c5d6e7f", now() + 600).unwrap();
    let mut a = connect(&relay, &short).await.unwrap();
    let mut b = connect(&relay, &long).await.unwrap();
    assert!(ends_within(&mut a, Duration::from_secs(7)).await, "the console ends once its token expires");
    assert!(alive(&mut b).await, "one whose token is still valid goes on");
}

/// What nova hands a user, `…/vnc_lite.html?path=%3Ftoken%3D<token>`, opened in Chromium
/// with Debian's noVNC served by relay, reaches a real QEMU through a nova row.
#[tokio::test]
#[cfg_attr(
    any(relay_no_mariadb, relay_no_qemu, relay_no_browser, relay_no_debian_novnc),
    ignore = "mariadb-server, QEMU, Chromium or Debian's novnc is not installed: cargo xtask deps"
)]
async fn novnc_in_chromium_opens_the_url_nova_hands_out() {
    use relay_tests::hypervisor::{Qemu, VncAuth};
    env::mariadb();
    env::qemu();
    env::browser();
    env::debian_novnc();
    let db = Mariadb::start_nova().await.unwrap();
    let qemu = Qemu::start(VncAuth::None).await.unwrap();
    let relay = relay_on(&db, |c| {
        c.listen.web = Some("/usr/share/novnc".into());
        c.limits.handshake_timeout_secs = 15;
    })
    .await;
    let instance = "4d5e6f7a-8b9c-4d0e-8f1a-3b4c5d6e7f8a";
    let (token, xvp) = (nova_token(), nova_token());
    db.authorize(&token, "novnc", qemu.addr(), instance, now() + 600).unwrap();
    db.authorize(&xvp, "xvpvnc", qemu.addr(), instance, now() + 600).unwrap();
    // nova's ConsoleAuthToken.access_url for a novnc console.
    let url = format!("http://{}/vnc_lite.html?path=%3Ftoken%3D{token}", relay.ws);
    let seen = relay_tests::browser::open(&url, "connected", &[], None).await;
    assert!(seen.ok, "{:?}\n{}", seen.report, seen.stderr);
    // A native viewer through the CONNECT door reaches the same QEMU.
    let mut s = relay.connect_door(&xvp).await.unwrap();
    let init = handshake(&mut s, RFB38, None).await.unwrap();
    assert_eq!((init.width, init.height), (720, 400), "QEMU's firmware screen");
}

/// The migration as an operator does it: relay's file names nova's sources and points at
/// the nova.conf nova-novncproxy used; the database, the allowed origins and the session
/// timeout come from there.
#[tokio::test]
#[cfg_attr(relay_no_mariadb, ignore = "mariadb-server is not installed: cargo xtask deps")]
async fn the_relay_binary_takes_the_database_and_origins_from_nova_conf() {
    use relay_tests::servers::RelayProcess;
    env::mariadb();
    let db = Mariadb::start_nova().await.unwrap();
    let hv = FakeVnc::start(Script::echo()).await;
    let dir = relay_tests::relay_server::scratch_dir("nova-conf");
    let nova_conf = dir.join("nova.conf");
    std::fs::write(
        &nova_conf,
        format!(
            "[DEFAULT]\ndebug = False\n\n[database]\nconnection = {}\n\n[console]\nallowed_origins = dash.example.com\n\n\
             [consoleauth]\nenforce_session_timeout = True\n",
            db.url()
        ),
    )
    .unwrap();
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\nwebsocket = \"127.0.0.1:0\"\nconnect = \"127.0.0.1:0\"\ncontrol = \"{}\"\n\n\
             [tokens]\nsources = [\"store\", \"nova\"]\ntouch_interval_secs = 1\n\n\
             [nova]\nconfig_file = \"{}\"\n\n[store]\nbackend = \"memory\"\n\n[log]\nfilter = \"warn\"\n",
            dir.join("control.sock").display(),
            nova_conf.display()
        ),
    )
    .unwrap();
    let relay = RelayProcess::start(&config).await.unwrap();
    let (token, short) = (nova_token(), nova_token());
    db.authorize(&token, "novnc", hv.addr(), "5e6f7a8b-9c0d-4e1f-8a2b-4c5d6e7f8a9b", now() + 600).unwrap();
    db.authorize(&short, "novnc", hv.addr(), "6f7a8b9c-0d1e-4f2a-9b3c-5d6e7f8a9b0c", now() + 2).unwrap();
    let upgrade = |origin: &'static str, token: String| {
        let ws = relay.ws;
        async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut req = format!("ws://{ws}/?token={token}").into_client_request().unwrap();
            req.headers_mut().insert("Origin", origin.parse().unwrap());
            req.headers_mut().insert("Sec-WebSocket-Protocol", "binary".parse().unwrap());
            tokio_tungstenite::connect_async(req).await.map(|(ws, _)| relay_tests::ws_viewer::WsByteStream::new(ws))
        }
    };
    assert!(upgrade("http://evil.example.net", token.clone()).await.is_err(), "an origin nova.conf does not allow");
    let mut ws = upgrade("http://dash.example.com", token.clone()).await.expect("nova.conf's allowed origin, nova.conf's database");
    handshake(&mut ws, RFB38, None).await.unwrap();
    let mut expiring = upgrade("http://dash.example.com", short).await.unwrap();
    handshake(&mut expiring, RFB38, None).await.unwrap();
    // nova.conf's enforce_session_timeout: the console ends when its token expires.
    let ended = tokio::time::timeout(Duration::from_secs(8), async {
        let mut buf = [0u8; 16];
        loop {
            match expiring.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the console outlived its token under enforce_session_timeout");
    let _ = std::fs::remove_dir_all(dir);
}
