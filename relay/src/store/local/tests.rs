//! The local store across restarts, torn lines, a second relay, and compaction.

use super::*;
use crate::app::unix_now;
use crate::auth::token::{NewToken, Target, generate};

fn sealer() -> Sealer {
    Sealer::from_material(&[7u8; 32]).unwrap()
}

/// A scratch directory of this test and process.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-local-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn new_token(instance: &str, single_use: bool, hypervisor_password: Option<&str>) -> NewToken {
    NewToken {
        instance: instance.into(),
        console: "novnc".into(),
        target: Target { host: "hv1".into(), port: 5900, internal_access_path: None },
        ttl: None,
        idle_timeout: None,
        single_use,
        hypervisor_schemes: None,
        hypervisor_password: hypervisor_password.map(|p| Secret(p.into())),
        password: None,
    }
}

async fn add(store: &LocalStore, req: NewToken, now: u64) -> TokenHash {
    let hash = TokenHash::of(&generate());
    store.insert(hash, TokenRecord::new(&hash, req, now, 600, 120)).await.unwrap();
    hash
}

fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn tokens_and_passwords_survive_a_restart() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = scratch("restart");
    let path = dir.join("state").join("store.jsonl");
    let now = unix_now();
    let store = LocalStore::open(&path, sealer(), 10, 10).unwrap();
    let plain = add(&store, new_token("vm1", false, Some("hvpw1")), now).await;
    let once = add(&store, new_token("vm1", true, None), now).await;
    let deleted = add(&store, new_token("vm2", false, None), now).await;
    let expired = add(&store, new_token("vm2", false, None), now - 1000).await;
    assert!(store.redeem(once, now).await.unwrap().is_ok());
    assert!(store.redeem(plain, now + 1).await.unwrap().is_ok());
    assert!(store.touch(plain, now + 5).await.unwrap());
    assert!(store.delete(deleted).await.unwrap());
    store.set("vm1", Secret("pw1".into())).await.unwrap();
    store.set("vm2", Secret("pw2".into())).await.unwrap();
    assert!(store.clear("vm2").await.unwrap());
    drop(store);

    let store = LocalStore::open(&path, sealer(), 10, 10).unwrap();
    let record = store.check(plain, now + 6).await.unwrap().unwrap();
    assert_eq!(record.hypervisor_password, Some(Secret("hvpw1".into())));
    assert_eq!((record.last_touched, record.used), (now + 5, true));
    assert_eq!(store.redeem(once, now + 6).await.unwrap().unwrap_err(), TokenRejection::AlreadyUsed);
    assert_eq!(store.check(deleted, now + 6).await.unwrap().unwrap_err(), TokenRejection::Unknown);
    assert_eq!(store.check(expired, now + 6).await.unwrap().unwrap_err(), TokenRejection::Unknown, "dead: dropped");
    assert_eq!(store.count().await.unwrap(), 2);
    assert_eq!(store.get("vm1").await.unwrap(), Some(Secret("pw1".into())));
    assert_eq!(store.get("vm2").await.unwrap(), None);
    assert_eq!(store.delete_instance("vm1").await.unwrap(), 2);
    drop(store);

    let store = LocalStore::open(&path, sealer(), 10, 10).unwrap();
    assert_eq!(store.count().await.unwrap(), 0, "changes after a reopen are kept too");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_file_holds_no_clear_password() {
    let dir = scratch("clear");
    let path = dir.join("store.jsonl");
    let now = unix_now();
    let store = LocalStore::open(&path, sealer(), 10, 10).unwrap();
    let hash = add(&store, new_token("vm1", false, Some("Hv7#mW3r")), now).await;
    store.set("vm1", Secret("Zq9!xK2p".into())).await.unwrap();
    let check = |when: &str| {
        let bytes = std::fs::read(&path).unwrap();
        assert!(holds(&bytes, &format!("{:02x}", hash.0[0])), "{when}: the file is written");
        assert!(!holds(&bytes, "Hv7#mW3r") && !holds(&bytes, "Zq9!xK2p"), "{when}: a clear password in the file");
    };
    check("journal");
    drop(store);
    let store = LocalStore::open(&path, sealer(), 10, 10).unwrap();
    check("snapshot");
    assert_eq!(store.get("vm1").await.unwrap(), Some(Secret("Zq9!xK2p".into())));
    drop(store);
    assert!(LocalStore::open(&path, Sealer::from_material(&[8u8; 32]).unwrap(), 10, 10).is_err(), "another key");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_torn_last_line_is_skipped() {
    let dir = scratch("torn");
    let path = dir.join("store.jsonl");
    let now = unix_now();
    let store = LocalStore::open(&path, sealer(), 10, 10).unwrap();
    let a = add(&store, new_token("vm1", false, None), now).await;
    let b = add(&store, new_token("vm2", true, None), now).await;
    store.set("vm1", Secret("pw1".into())).await.unwrap();
    drop(store);
    let mut file = OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(b"{\"t\":\"token\",\"hash\":\"ab").unwrap();
    drop(file);

    let store = LocalStore::open(&path, sealer(), 10, 10).unwrap();
    assert!(store.check(a, now).await.unwrap().is_ok());
    assert!(store.check(b, now).await.unwrap().is_ok());
    assert_eq!(store.get("vm1").await.unwrap(), Some(Secret("pw1".into())));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.lines().all(|l| serde_json::from_str::<Line>(l).is_ok()), "compaction dropped the fragment");
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn one_relay_at_a_time() {
    let dir = scratch("lock");
    let path = dir.join("store.jsonl");
    let first = LocalStore::open(&path, sealer(), 10, 10).unwrap();
    let second = LocalStore::open(&path, sealer(), 10, 10).err().expect("a second open fails");
    assert!(second.to_string().contains("another relay uses this store file"), "{second:#}");
    drop(first);
    assert!(LocalStore::open(&path, sealer(), 10, 10).is_ok(), "free again once closed");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn compaction_keeps_live_records_and_shrinks_the_file() {
    let dir = scratch("compact");
    let path = dir.join("store.jsonl");
    let now = unix_now();
    let store = LocalStore::open(&path, sealer(), 10, 10).unwrap();
    let kept = add(&store, new_token("vm1", false, Some("hvpw1")), now).await;
    let once = add(&store, new_token("vm1", true, None), now).await;
    assert!(store.redeem(once, now).await.unwrap().is_ok());
    store.set("vm1", Secret("pw1".into())).await.unwrap();
    let mut touched = vec![kept];
    for _ in 0..8 {
        touched.push(add(&store, new_token("vm2", false, None), now).await);
    }
    // A line per token and second: 1,071 of them.
    for at in now + 1..=now + 119 {
        assert_eq!(store.touch_many(&touched, at).await.unwrap(), 9);
    }
    for gone in &touched[1..] {
        assert!(store.delete(*gone).await.unwrap());
    }
    let before = std::fs::metadata(&path).unwrap().len();
    assert_eq!(store.sweep(now + 119).await.unwrap(), 0);
    let after = std::fs::metadata(&path).unwrap().len();
    assert!(after < before / 10, "{before} bytes, then {after}");
    assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3, "two tokens and a password");
    assert!(LocalStore::open(&path, sealer(), 10, 10).is_err(), "the new file is locked too");
    store.set("vm2", Secret("pw2".into())).await.unwrap();
    drop(store);

    let store = LocalStore::open(&path, sealer(), 10, 10).unwrap();
    let record = store.check(kept, now + 119).await.unwrap().unwrap();
    assert_eq!((record.last_touched, record.hypervisor_password), (now + 119, Some(Secret("hvpw1".into()))));
    assert_eq!(store.redeem(once, now + 119).await.unwrap().unwrap_err(), TokenRejection::AlreadyUsed);
    assert_eq!(store.get("vm1").await.unwrap(), Some(Secret("pw1".into())));
    assert_eq!(store.get("vm2").await.unwrap(), Some(Secret("pw2".into())), "appended after the compaction");
    assert_eq!(store.count().await.unwrap(), 2);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_live_consoles_tokens_are_touched_together_and_the_touches_survive_a_restart() {
    let dir = scratch("touch-many");
    let path = dir.join("store.jsonl");
    let now = unix_now();
    let store = LocalStore::open(&path, sealer(), 3000, 10).unwrap();
    let mut live = Vec::new();
    for i in 0..2000 {
        live.push(add(&store, new_token(&format!("vm{i}"), false, None), now).await);
    }
    let idle = add(&store, new_token("vm-idle", false, None), now).await;
    live.push(TokenHash::of("not a token of this store"));
    let lines = |path: &PathBuf| std::fs::read_to_string(path).unwrap().lines().count();
    let before = lines(&path);
    assert_eq!(store.touch_many(&live, now + 30).await.unwrap(), 2000, "the unknown one is not counted");
    assert_eq!(lines(&path), before + 2000, "a line per known token");
    assert_eq!(store.touch_many(&live, now + 30).await.unwrap(), 2000);
    assert!(store.touch(live[0], now + 30).await.unwrap());
    assert_eq!(lines(&path), before + 2000, "no line for a token touched this second already");
    drop(store);

    let store = LocalStore::open(&path, sealer(), 3000, 10).unwrap();
    for hash in &live[..2000] {
        assert_eq!(store.check(*hash, now + 31).await.unwrap().unwrap().last_touched, now + 30);
    }
    assert_eq!(store.check(idle, now + 31).await.unwrap().unwrap().last_touched, now, "not live: not touched");
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}
