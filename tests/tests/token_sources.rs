//! Token authorities besides relay's own store: websockify's token files and its Redis
//! tokens open consoles through relay unchanged, and relay's own tokens keep working
//! beside them.

use relay::config::TokenSourceKind;
use relay_tests::env;
use relay_tests::fake_hypervisor::{FakeVnc, Script};
use relay_tests::relay_server::{TestRelay, scratch_dir};
use relay_tests::servers::RedisServer;
use relay_tests::viewer::handshake;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RFB38: &[u8; 12] = b"RFB 003.008\n";

async fn opens(relay: &TestRelay, token: &str) -> bool {
    match relay.connect_door(token).await {
        Ok(mut s) => handshake(&mut s, RFB38, None).await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test]
async fn websockify_token_files_open_consoles_and_are_read_again_when_changed() {
    let hv = FakeVnc::start(Script::echo()).await;
    let dir = scratch_dir("wsfile");
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let hv_addr = hv.addr();
    std::fs::write(tokens.join("vms"), format!("# websockify's format\nws-tok-1: {hv_addr}\n")).unwrap();
    let dir_for_relay = tokens.clone();
    let relay = TestRelay::start_with(move |c| {
        c.tokens.sources = vec![TokenSourceKind::Store, TokenSourceKind::WebsockifyFile];
        c.websockify.token_file = Some(dir_for_relay);
    })
    .await;
    assert!(opens(&relay, "ws-tok-1").await, "a websockify token opens its console");
    // Named after its token in the listings, so that it can be found and reset.
    let mut live = relay.connect_door("ws-tok-1").await.unwrap();
    handshake(&mut live, RFB38, None).await.unwrap();
    let listed = relay.ctl(relay::control::proto::Request::Sessions { instance: None }).await.unwrap();
    let instance = listed["sessions"][0]["instance"].as_str().unwrap().to_string();
    assert!(instance.starts_with("websockify-"), "{listed}");
    let reset = relay.ctl(relay::control::proto::Request::InstanceReset { instance, revoke: false }).await.unwrap();
    assert!(reset["disconnected"].as_u64().unwrap() >= 1, "{reset}");
    drop(live);
    assert!(!opens(&relay, "ws-tok-2").await, "an unknown one does not");
    let own = relay.token("vm-own", hv.addr()).await;
    assert!(opens(&relay, &own).await, "relay's own tokens still work beside");

    // Whatever writes websockify's files keeps doing so: a new file, and a token removed.
    std::fs::write(tokens.join("vms"), "# emptied\n").unwrap();
    std::fs::write(tokens.join("more"), format!("ws-tok-2: {hv_addr}\n")).unwrap();
    let started = Instant::now();
    while !opens(&relay, "ws-tok-2").await {
        assert!(started.elapsed() < Duration::from_secs(5), "the changed files were not read again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!opens(&relay, "ws-tok-1").await, "a token taken out of the file no longer opens");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
#[cfg_attr(relay_no_redis, ignore = "redis-server is not installed: cargo xtask deps")]
async fn websockify_redis_tokens_in_both_value_forms_and_a_namespace() {
    env::redis();
    let redis = RedisServer::start().await.unwrap();
    let hv = FakeVnc::start(Script::echo()).await;
    let (host, port) = (hv.addr().ip().to_string(), hv.addr().port());
    // As websockify's users write them: JSON, or host:port, under the namespace.
    let mut s = TcpStream::connect(("127.0.0.1", redis.port)).await.unwrap();
    let json = format!(r#"{{"host": "{host}", "port": "{port}"}}"#);
    for (key, value) in [("consoles:tok-json", json.as_str()), ("consoles:tok-plain", &format!("{host}:{port}")), ("tok-outside", "x:1")] {
        let cmd = format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n", key.len(), value.len());
        s.write_all(cmd.as_bytes()).await.unwrap();
        let mut ok = [0u8; 5];
        s.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"+OK\r\n");
    }
    let url = redis.url();
    let relay = TestRelay::start_with(move |c| {
        c.tokens.sources = vec![TokenSourceKind::Store, TokenSourceKind::WebsockifyRedis];
        c.websockify.redis_url = Some(url);
        c.websockify.redis_namespace = "consoles".into();
    })
    .await;
    assert!(opens(&relay, "tok-json").await, "JSON value");
    assert!(opens(&relay, "tok-plain").await, "host:port value");
    assert!(!opens(&relay, "tok-outside").await, "only keys under the namespace");
    assert!(!opens(&relay, "tok-missing").await);
}

mod signed {
    use super::*;
    use base64::Engine as _;
    use relay::auth::sources::jwt::{Claims, sign};
    use relay::config::{JwtAlgorithm, JwtKey};
    use std::path::Path;

    fn key(file: &Path, algorithm: JwtAlgorithm, kid: &str) -> JwtKey {
        JwtKey { file: file.to_path_buf(), algorithm, kid: Some(kid.into()) }
    }

    fn claims(hv: std::net::SocketAddr, exp: Option<u64>, jti: Option<&str>) -> Claims {
        Claims {
            host: hv.ip().to_string(),
            port: hv.port().into(),
            exp,
            nbf: None,
            iat: None,
            instance: Some("vm-signed".into()),
            internal_access_path: None,
            console: None,
            jti: jti.map(String::from),
        }
    }

    #[tokio::test]
    async fn signed_tokens_open_consoles_and_forgeries_do_not() {
        let hv = FakeVnc::start(Script::echo()).await;
        let dir = scratch_dir("jwt");
        let secret = dir.join("hs.key");
        std::fs::write(&secret, "a-long-shared-secret-for-hs256-tokens\n").unwrap();
        let pair = rcgen::KeyPair::generate().unwrap();
        let (private, public) = (dir.join("es.key"), dir.join("es.pub"));
        std::fs::write(&private, pair.serialize_pem()).unwrap();
        std::fs::write(&public, pair.public_key_pem()).unwrap();
        let keys = vec![key(&secret, JwtAlgorithm::HS256, "k1"), key(&public, JwtAlgorithm::ES256, "k2")];
        let relay = TestRelay::start_with(move |c| {
            c.tokens.sources = vec![TokenSourceKind::Store, TokenSourceKind::Jwt];
            c.jwt.keys = keys;
        })
        .await;
        let now = relay::app::unix_now();
        let hs = |c: &Claims| sign(&key(&secret, JwtAlgorithm::HS256, "k1"), c).unwrap();

        assert!(opens(&relay, &hs(&claims(hv.addr(), Some(now + 60), None))).await, "HS256");
        let es = sign(&key(&private, JwtAlgorithm::ES256, "k2"), &claims(hv.addr(), Some(now + 60), None)).unwrap();
        assert!(opens(&relay, &es).await, "ES256, a second key (rotation)");
        let own = relay.token("vm-own", hv.addr()).await;
        assert!(opens(&relay, &own).await, "relay's own tokens beside");

        // Forgeries and the stale.
        let other = dir.join("other.key");
        std::fs::write(&other, "not-the-secret-relay-was-given").unwrap();
        let forged = sign(&key(&other, JwtAlgorithm::HS256, "k1"), &claims(hv.addr(), Some(now + 60), None)).unwrap();
        assert!(relay.connect_door(&forged).await.unwrap_err().contains("403"), "a bad signature");
        let wrong_kid = sign(&key(&secret, JwtAlgorithm::HS256, "k9"), &claims(hv.addr(), Some(now + 60), None)).unwrap();
        assert!(relay.connect_door(&wrong_kid).await.unwrap_err().contains("403"), "a kid no key has");
        let expired = hs(&claims(hv.addr(), Some(now - 3600), None));
        let refused = relay.connect_door(&expired).await.unwrap_err();
        assert!(refused.contains("403") && refused.contains("expired"), "{refused}");
        assert!(relay.connect_door(&hs(&claims(hv.addr(), None, None))).await.is_err(), "no exp, while exp is required");
        let b64 = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let body = serde_json::to_value(claims(hv.addr(), Some(now + 60), None)).unwrap();
        let none = format!("{}.{}.", b64(&serde_json::json!({"alg": "none", "typ": "JWT"})), b64(&body));
        assert!(relay.connect_door(&none).await.is_err(), "alg: none");

        // A jti opens one console.
        let once = hs(&claims(hv.addr(), Some(now + 60), Some("one-time-1")));
        assert!(opens(&relay, &once).await);
        let again = relay.connect_door(&once).await.unwrap_err();
        assert!(again.contains("already used"), "{again}");

        // A reset with revocation refuses the instance's tokens issued before it (and those
        // that do not say when they were issued), not those issued after.
        let issued = |iat: Option<u64>| hs(&Claims { iat, ..claims(hv.addr(), Some(now + 60), None) });
        let (before, undated, after) = (issued(Some(now - 1)), issued(None), issued(Some(now + 2)));
        assert!(opens(&relay, &before).await && opens(&relay, &undated).await);
        let reset = relay.ctl(relay::control::proto::Request::InstanceReset { instance: "vm-signed".into(), revoke: true }).await.unwrap();
        assert!(reset["revoke_error"].is_null(), "{reset}");
        for revoked in [&before, &undated] {
            let refused = relay.connect_door(revoked).await.unwrap_err();
            assert!(refused.contains("403") && refused.contains("revoked"), "{refused}");
        }
        assert!(opens(&relay, &after).await, "a token issued after the reset");
        let listed = relay.ctl(relay::control::proto::Request::TokenList { instance: None, host: None }).await.unwrap();
        assert!(!listed.to_string().contains("revoked"), "the store's note is no token: {listed}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// With `end_consoles_at_expiry`, a signed token's console ends at its `exp`; one
    /// without `exp` has no expiry to end at, whatever relay's own token lifetime is.
    #[tokio::test]
    async fn consoles_end_at_a_signed_tokens_exp_and_only_then() {
        let hv = FakeVnc::start(Script::echo()).await;
        let dir = scratch_dir("jwt-expiry");
        let secret = dir.join("hs.key");
        std::fs::write(&secret, "a-long-shared-secret-for-hs256-tokens\n").unwrap();
        let keys = vec![key(&secret, JwtAlgorithm::HS256, "k1")];
        let relay = TestRelay::start_with(move |c| {
            c.tokens.sources = vec![TokenSourceKind::Jwt];
            c.tokens.end_consoles_at_expiry = true;
            // What relay keeps an outside token for: not an expiry.
            c.tokens.ttl_secs = 1;
            c.jwt.keys = keys;
            c.jwt.require_exp = false;
        })
        .await;
        let hs = |c: &Claims| sign(&key(&secret, JwtAlgorithm::HS256, "k1"), c).unwrap();
        let now = relay::app::unix_now();
        let mut with_exp = relay.connect_door(&hs(&claims(hv.addr(), Some(now + 2), None))).await.unwrap();
        handshake(&mut with_exp, b"RFB 003.008\n", None).await.unwrap();
        let mut without = relay.connect_door(&hs(&claims(hv.addr(), None, None))).await.unwrap();
        handshake(&mut without, b"RFB 003.008\n", None).await.unwrap();
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(6), with_exp.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "the console ended at its token's exp");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        without.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(std::time::Duration::from_secs(5), without.read_exact(&mut back)).await.expect("still open").unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
