//! Console passwords: VNC authentication towards viewers, lock-out, and changing a
//! password while consoles are live.

use relay::auth::Secret;
use relay::control::proto::Request;
use relay_tests::fake_hypervisor::{FakeVnc, Script};
use relay_tests::relay_server::{TestRelay, new_token};
use relay_tests::viewer::{ViewerError, handshake};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RFB38: &[u8; 12] = b"RFB 003.008\n";
const RFB33: &[u8; 12] = b"RFB 003.003\n";

async fn set_password(relay: &TestRelay, instance: &str, password: &str, disconnect: bool) -> serde_json::Value {
    let req = Request::InstancePasswordSet { instance: instance.into(), password: Secret(password.into()), disconnect };
    relay.ctl(req).await.unwrap()
}

/// One attempt through the CONNECT door with `password`.
async fn attempt(relay: &TestRelay, token: &str, version: &[u8; 12], password: Option<&str>) -> Result<tokio::net::TcpStream, ViewerError> {
    let mut s = relay.connect_door(token).await.unwrap();
    handshake(&mut s, version, password).await.map(|_| s)
}

#[tokio::test]
async fn viewers_need_the_password_in_38_and_33() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start().await;
    let token = relay.token("vm-pw", hv.addr()).await;
    assert!(attempt(&relay, &token, RFB38, None).await.is_ok(), "no password yet");
    set_password(&relay, "vm-pw", "s3cret", false).await;

    assert!(matches!(attempt(&relay, &token, RFB38, None).await, Err(ViewerError::NeedsPassword)), "only VNC auth is offered");
    match attempt(&relay, &token, RFB38, Some("wrong")).await {
        Err(ViewerError::AuthFailed(why)) => assert_eq!(why, "wrong console password"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(attempt(&relay, &token, RFB33, Some("wrong")).await, Err(ViewerError::AuthFailed(_))));
    assert!(attempt(&relay, &token, RFB38, Some("s3cret")).await.is_ok());
    assert!(attempt(&relay, &token, RFB33, Some("s3cret")).await.is_ok());
    // The WebSocket door asks the same.
    let mut ws = relay.websocket(&format!("/?token={token}"), &[]).await.unwrap();
    assert!(handshake(&mut ws, RFB38, Some("s3cret")).await.is_ok());

    // Nothing lists the password.
    let listed = relay.ctl(Request::TokenList { instance: Some("vm-pw".into()), host: None }).await.unwrap();
    assert!(!listed.to_string().contains("s3cret"));
    let stats = relay.ctl(Request::Stats).await.unwrap();
    assert_eq!(stats["counters"]["viewer_auth_failures"], 2);

    relay.ctl(Request::InstancePasswordClear { instance: "vm-pw".into(), disconnect: false }).await.unwrap();
    assert!(attempt(&relay, &token, RFB38, None).await.is_ok(), "cleared");
}

#[tokio::test]
async fn repeated_failures_lock_out_the_instance_and_the_source_then_expire() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start_with(|c| {
        c.passwords.max_failures = 3;
        c.passwords.lockout_secs = 2;
    })
    .await;
    let token = relay.token("vm-lock", hv.addr()).await;
    let other = relay.token("vm-other", hv.addr()).await;
    set_password(&relay, "vm-lock", "right", false).await;
    set_password(&relay, "vm-other", "right2", false).await;
    for _ in 0..3 {
        assert!(matches!(attempt(&relay, &token, RFB38, Some("guess")).await, Err(ViewerError::AuthFailed(_))));
    }
    match attempt(&relay, &token, RFB38, Some("right")).await {
        Err(ViewerError::Refused(why)) => assert!(why.contains("too many wrong passwords for this console"), "{why}"),
        other => panic!("even the right password is refused while locked out: {other:?}"),
    }
    match attempt(&relay, &other, RFB38, Some("right2")).await {
        Err(ViewerError::Refused(why)) => assert!(why.contains("your address"), "{why}"),
        other => panic!("the same source is locked out of other consoles too: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(attempt(&relay, &token, RFB38, Some("right")).await.is_ok(), "the lock-out expires");
}

#[tokio::test]
async fn changing_the_password_with_and_without_disconnect() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start().await;
    let token = relay.token("vm-chg", hv.addr()).await;
    set_password(&relay, "vm-chg", "first", false).await;
    let mut live = attempt(&relay, &token, RFB38, Some("first")).await.unwrap();

    // Without --disconnect the live console goes on; new viewers need the new password.
    assert_eq!(set_password(&relay, "vm-chg", "second", false).await["disconnected"], 0);
    live.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    live.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    assert!(attempt(&relay, &token, RFB38, Some("first")).await.is_err());
    let mut newer = attempt(&relay, &token, RFB38, Some("second")).await.unwrap();

    // With --disconnect both live consoles end.
    assert_eq!(set_password(&relay, "vm-chg", "third", true).await["disconnected"], 2);
    for s in [&mut live, &mut newer] {
        let ended = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut Vec::new())).await;
        assert!(ended.is_ok(), "the live console was ended");
    }
}

#[tokio::test]
async fn passwords_rfb_cannot_carry_are_refused_with_a_reason() {
    let relay = TestRelay::start().await;
    for bad in ["123456789", "", "pässwd"] {
        let req = Request::InstancePasswordSet { instance: "vm".into(), password: Secret(bad.into()), disconnect: false };
        let err = relay.ctl(req).await.unwrap_err().to_string();
        assert!(err.contains("bad_request"), "{bad:?}: {err}");
    }
    let mut req = new_token("vm", "127.0.0.1:9".parse().unwrap());
    req.password = Some(Secret("waytoolong".into()));
    let err = relay.ctl(Request::TokenCreate(req)).await.unwrap_err().to_string();
    assert!(err.contains("at most 8"), "{err}");
    let err = relay.ctl(Request::InstancePasswordClear { instance: "vm".into(), disconnect: false }).await.unwrap_err().to_string();
    assert!(err.contains("not_found"), "{err}");
}

#[tokio::test]
async fn reset_ends_a_viewer_waiting_at_the_password_prompt() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start().await;
    let token = relay.token("vm-prompt", hv.addr()).await;
    set_password(&relay, "vm-prompt", "pw", false).await;
    let mut s = relay.connect_door(&token).await.unwrap();
    let mut greeting = [0u8; 12];
    s.read_exact(&mut greeting).await.unwrap();
    s.write_all(b"RFB 003.008\n\x02").await.unwrap();
    let mut offer_and_challenge = [0u8; 2 + 16];
    s.read_exact(&mut offer_and_challenge).await.unwrap();
    // A person is typing; meanwhile the operator resets the instance.
    let reset = relay.ctl(Request::InstanceReset { instance: "vm-prompt".into(), revoke: false }).await.unwrap();
    assert_eq!(reset["disconnected"], 1);
    let ended = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut Vec::new())).await;
    assert!(ended.is_ok(), "the prompt ended with the reset, not after the password");
}

#[tokio::test]
async fn behind_a_trusted_proxy_lock_out_follows_x_forwarded_for() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start_with(|c| {
        c.websocket.trust_forwarded_headers = true;
        c.passwords.max_failures = 2;
    })
    .await;
    let token = relay.token("vm-proxy", hv.addr()).await;
    let other = relay.token("vm-proxy2", hv.addr()).await;
    set_password(&relay, "vm-proxy", "pw", false).await;
    set_password(&relay, "vm-proxy2", "pw2", false).await;
    let from = |addr: &'static str, token: &str, password: &'static str| {
        let path = format!("/?token={token}");
        let relay = &relay;
        async move {
            let mut ws = relay.websocket(&path, &[("X-Forwarded-For", addr)]).await.unwrap();
            handshake(&mut ws, RFB38, Some(password)).await.map(|_| ())
        }
    };
    for _ in 0..2 {
        assert!(matches!(from("203.0.113.7", &token, "guess").await, Err(ViewerError::AuthFailed(_))));
    }
    // Every viewer arrives from the proxy's address; only the guesser is locked out.
    match from("203.0.113.7", &other, "pw2").await {
        Err(ViewerError::Refused(why)) => assert!(why.contains("your address"), "{why}"),
        other => panic!("the guessing client is locked out everywhere: {other:?}"),
    }
    assert!(from("198.51.100.9", &other, "pw2").await.is_ok(), "another client behind the same proxy is not");
}

#[tokio::test]
async fn untrusted_x_forwarded_for_is_ignored() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start_with(|c| c.passwords.max_failures = 2).await;
    let token = relay.token("vm-noproxy", hv.addr()).await;
    let other = relay.token("vm-noproxy2", hv.addr()).await;
    set_password(&relay, "vm-noproxy", "pw", false).await;
    set_password(&relay, "vm-noproxy2", "pw2", false).await;
    for spoofed in ["192.0.2.1", "192.0.2.2"] {
        let mut ws = relay.websocket(&format!("/?token={token}"), &[("X-Forwarded-For", spoofed)]).await.unwrap();
        assert!(matches!(handshake(&mut ws, RFB38, Some("guess")).await, Err(ViewerError::AuthFailed(_))));
    }
    // A guesser cannot dodge the per-source count by claiming a new address: on another
    // console (so only the source's lock-out applies) it is still refused.
    let mut ws = relay.websocket(&format!("/?token={other}"), &[("X-Forwarded-For", "192.0.2.3")]).await.unwrap();
    match handshake(&mut ws, RFB38, Some("pw2")).await {
        Err(ViewerError::Refused(why)) => assert!(why.contains("your address"), "{why}"),
        other => panic!("{other:?}"),
    }
}
