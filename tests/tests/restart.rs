//! An appliance killed with SIGKILL and started again keeps its tokens and console
//! passwords: with the `local` store (a file), and with `redis`. relay runs as a process
//! of its own here, since only a process can be killed.

use relay::auth::{Secret, TokenRejection};
use relay::control::client::call;
use relay::control::proto::Request;
use relay::control::replies::{PasswordChanged, TokenChecked, TokenCreated};
use relay_tests::env;
use relay_tests::fake_hypervisor::{FakeVnc, Script, Security};
use relay_tests::relay_server::{new_token, scratch_dir, with_hypervisor_password};
use relay_tests::servers::{RedisServer, RelayProcess};
use relay_tests::viewer::{ViewerError, handshake};
use std::path::Path;
use tokio::net::TcpStream;

const RFB38: &[u8; 12] = b"RFB 003.008\n";

fn write_config(dir: &Path, store: &str) -> std::path::PathBuf {
    let path = dir.join("relay.toml");
    let text = format!(
        "[listen]\nwebsocket = \"127.0.0.1:0\"\nconnect = \"127.0.0.1:0\"\ncontrol = \"{}\"\n\n\
         [hypervisor]\nauth_schemes = [\"none\", \"vnc\"]\n\n{store}\n[log]\nfilter = \"warn\"\n",
        dir.join("control.sock").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

async fn door(relay: &RelayProcess, token: &str) -> Result<TcpStream, String> {
    relay_tests::relay_server::connect_door_at(relay.connect, token).await
}

/// Issues what must survive, kills relay, starts it again and checks that it did.
async fn survives_sigkill(config: &Path) {
    // The hypervisor wants its own password: the token's, which must survive too.
    let hv = FakeVnc::start(Script { security: Security::Password("hvpass".into()), ..Script::echo() }).await;
    let mut relay = RelayProcess::start(config).await.unwrap();
    let created: TokenCreated =
        call(&relay.control, Request::TokenCreate(with_hypervisor_password(new_token("vm-keep", hv.addr()), "hvpass"))).await.unwrap();
    let mut once = with_hypervisor_password(new_token("vm-once", hv.addr()), "hvpass");
    once.single_use = true;
    let once: TokenCreated = call(&relay.control, Request::TokenCreate(once)).await.unwrap();
    let set = Request::InstancePasswordSet { instance: "vm-keep".into(), password: Secret("s3cret".into()), disconnect: false };
    let _: PasswordChanged = call(&relay.control, set).await.unwrap();
    let mut used = door(&relay, &once.token).await.unwrap();
    handshake(&mut used, RFB38, None).await.unwrap();
    drop(used);

    relay.kill();
    let relay = RelayProcess::start(config).await.unwrap();

    let mut s = door(&relay, &created.token).await.expect("the token survived");
    assert!(matches!(handshake(&mut s, RFB38, Some("wrong")).await, Err(ViewerError::AuthFailed(_))), "so did the console password");
    let mut s = door(&relay, &created.token).await.unwrap();
    let init = handshake(&mut s, RFB38, Some("s3cret")).await.expect("the right password, and the hypervisor's from the token");
    assert_eq!(init.name, "fake");
    let checked: TokenChecked = call(&relay.control, Request::TokenCheck { token: once.token.clone() }).await.unwrap();
    assert_eq!(checked.reason, Some(TokenRejection::AlreadyUsed), "a used single-use token stays used");
}

#[tokio::test]
async fn the_local_store_keeps_tokens_and_passwords_across_sigkill() {
    let dir = scratch_dir("restart-local");
    let db = dir.join("state/relay.db");
    let config = write_config(&dir, &format!("[store]\nbackend = \"local\"\npath = \"{}\"\n", db.display()));
    survives_sigkill(&config).await;
    // Sealed at rest: neither password is in the file, nor the key beside it readable by others.
    let bytes = std::fs::read(&db).unwrap();
    for clear in [&b"s3cret"[..], b"hvpass"] {
        assert!(!bytes.windows(clear.len()).any(|w| w == clear), "a password in the clear in the store file");
    }
    use std::os::unix::fs::PermissionsExt;
    let key = std::fs::metadata(dir.join("state/relay.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key, 0o600);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
#[cfg_attr(relay_no_redis, ignore = "redis-server is not installed: cargo xtask deps")]
async fn the_redis_store_keeps_tokens_and_passwords_across_sigkill() {
    env::redis();
    let redis = RedisServer::start().await.unwrap();
    let dir = scratch_dir("restart-redis");
    let key = dir.join("secret.key");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&key).unwrap();
        std::io::Write::write_all(&mut f, b"0123456789abcdef0123456789abcdef0123456789abcdef\n").unwrap();
    }
    let store = format!("[store]\nbackend = \"redis\"\nurl = \"{}\"\nsecret_key_file = \"{}\"\n", redis.url(), key.display());
    let config = write_config(&dir, &store);
    survives_sigkill(&config).await;
    let _ = std::fs::remove_dir_all(dir);
}
