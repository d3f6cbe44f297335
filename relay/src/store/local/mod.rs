//! The `local` store: console tokens and console passwords in one file on this appliance,
//! so that they outlive a restart.
//!
//! The file is a journal of JSON lines, one change per line:
//!
//! ```text
//! {"t":"token","hash":HEX,"rec":{..}}      a token (HEX: its SHA-256)
//! {"t":"used","hash":HEX,"at":T}           redeemed at T (marks it used)
//! {"t":"touch","hash":HEX,"at":T}          in use at T
//! {"t":"del","hash":HEX}                   deleted
//! {"t":"del_instance","instance":ID}       every token of ID deleted
//! {"t":"pw","instance":ID,"sealed":..}     ID's console password set
//! {"t":"pw_clear","instance":ID}           ID's console password cleared
//! ```
//!
//! Passwords, console and hypervisor, are written sealed ([`crate::auth::seal`]), never in
//! clear. The maps in memory ([`MemoryStore`], [`MemoryPasswords`]) keep every semantic and
//! answer every read; the file is read only when the store opens, replayed into them, and
//! then rewritten as a snapshot of the live records ("compaction"). Compaction happens
//! again at a sweep once the journal holds more than twice the live records plus 1000 lines.
//!
//! Durability: each change is written with one `write(2)` to the O_APPEND file before its
//! call answers, so every acknowledged change survives SIGKILL (the kernel holds it).
//! Token creation and deletion and password changes are also fsynced before they answer,
//! so they survive power loss too. Redeems and touches are not (the hot path): a power
//! loss may undo the last seconds of them. Only one relay may use the file: it is locked
//! while the store is open.

use crate::auth::memory::MemoryStore;
use crate::auth::passwords::{MemoryPasswords, PasswordStore};
use crate::auth::seal::{Sealer, password_context};
use crate::auth::store::{Filter, StoreError, StoreFuture, TokenRejection, TokenStore};
use crate::auth::token::{Secret, StoredToken, TokenHash, TokenRecord};
use anyhow::{Context as _, anyhow, bail};
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tracing::{info, warn};

mod journal;
use journal::{Journal, Line};

/// A sweep compacts the journal once it holds more than twice the live records plus this.
const SLACK_LINES: usize = 1000;

pub struct LocalStore {
    tokens: MemoryStore,
    passwords: MemoryPasswords,
    sealer: Sealer,
    path: PathBuf,
    /// Held across each change to memory and its line, so that the journal's order is
    /// memory's order.
    journal: Mutex<Journal>,
}

fn ready<T: Send + 'static>(result: Result<T, StoreError>) -> StoreFuture<'static, T> {
    Box::pin(std::future::ready(result))
}

/// Opens `path` for appending and locks it, making sure the lock is on the file that is
/// at `path` (a relay compacting it at that moment renames a new file over it).
fn open_locked(path: &Path) -> anyhow::Result<File> {
    let name = path.display();
    for _ in 0..3 {
        let file =
            OpenOptions::new().read(true).append(true).create(true).mode(0o600).open(path).with_context(|| format!("store file {name}"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => bail!("store file {name}: another relay uses this store file"),
            Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("store file {name}: lock")),
        }
        let (locked, current) = (file.metadata()?, std::fs::metadata(path).with_context(|| format!("store file {name}"))?);
        if (locked.dev(), locked.ino()) == (current.dev(), current.ino()) {
            return Ok(file);
        }
    }
    bail!("store file {name}: it keeps being replaced; another relay uses this store file")
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

impl LocalStore {
    /// Opens (or creates) the store file, replays it and compacts it. Fails when another
    /// relay holds it, or when a sealed password does not open with `sealer`'s key.
    pub fn open(path: &Path, sealer: Sealer, max_tokens: usize, max_passwords: usize) -> anyhow::Result<LocalStore> {
        let dir = parent_dir(path);
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("store directory {}", dir.display()))?;
        }
        let file = open_locked(path)?;
        let mut bytes = Vec::new();
        (&file).read_to_end(&mut bytes).with_context(|| format!("store file {}", path.display()))?;
        let journal =
            Journal { file: Arc::new(file), lines: 0, torn: false, stale: false, tokens: HashMap::new(), passwords: HashSet::new() };
        let store = LocalStore {
            tokens: MemoryStore::new(max_tokens),
            passwords: MemoryPasswords::new(max_passwords),
            sealer,
            path: path.to_path_buf(),
            journal: Mutex::new(journal),
        };
        let now = crate::app::unix_now();
        {
            let mut journal = store.journal();
            store.replay(&mut journal, &bytes, now)?;
            // Also drops a torn last line, which the next append would otherwise join.
            store.compact(&mut journal, now).with_context(|| format!("store file {}: compaction", path.display()))?;
            info!(path = %path.display(), tokens = journal.tokens.len(), passwords = journal.passwords.len(), "store file loaded");
        }
        Ok(store)
    }

    fn journal(&self) -> MutexGuard<'_, Journal> {
        // A panic mid-change leaves at worst a line missing, as a failed write does.
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unavailable(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("store file {}: {what}: {e}", self.path.display()))
    }

    fn replay(&self, journal: &mut Journal, bytes: &[u8], now: u64) -> anyhow::Result<()> {
        for (n, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            if raw.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Line>(raw) {
                Ok(line) => self.apply(journal, line).with_context(|| format!("store file {}, line {}", self.path.display(), n + 1))?,
                Err(e) => {
                    warn!(path = %self.path.display(), line = n + 1, error = %e, "store file: skipped a line that does not parse (cut short by a crash?)")
                }
            }
        }
        // Only now, after every touch, is it known which tokens are dead.
        self.tokens.sweep_now(now)?;
        Ok(())
    }

    /// Replays one line through the memory stores, so that it means what it meant.
    fn apply(&self, journal: &mut Journal, line: Line) -> anyhow::Result<()> {
        match line {
            Line::Token { hash, rec } => {
                let id = rec.record.id.clone();
                // Refuse to start rather than lose a password that is there but will not open.
                let record = rec.open(&self.sealer).map_err(|e| anyhow!("token {id}: {e}"))?;
                let used = (record.single_use && record.used).then(|| record.clone());
                match self.tokens.insert_now(hash, record) {
                    Ok(()) => {
                        journal.tokens.insert(hash, used);
                    }
                    // Forgetting a token fails closed: its console just does not open.
                    Err(e) => warn!(path = %self.path.display(), token = %id, error = %e, "store file: token not loaded"),
                }
            }
            Line::Used { hash, at } => {
                if let Ok(Ok(record)) = self.tokens.redeem_now(hash, at)
                    && record.single_use
                {
                    journal.tokens.insert(hash, Some(record));
                }
            }
            Line::Touch { hash, at } => {
                if self.tokens.touch_now(hash, at)?
                    && let Some(Some(record)) = journal.tokens.get_mut(&hash)
                {
                    record.last_touched = record.last_touched.max(at);
                }
            }
            Line::Del { hash } => {
                self.tokens.delete_now(hash)?;
                journal.tokens.remove(&hash);
            }
            Line::DelInstance { instance } => {
                self.tokens.delete_instance_now(&instance)?;
                journal.tokens.retain(|_, used| used.as_ref().is_none_or(|r| r.instance != instance));
            }
            Line::Pw { instance, sealed } => {
                // Dropping a console password would open the console without one: refuse.
                let password =
                    self.sealer.open(&password_context(&instance), &sealed).map_err(|e| anyhow!("password of {instance}: {e}"))?;
                self.passwords
                    .set_now(&instance, password)
                    .map_err(|e| anyhow!("password of {instance}: {e}; raise the bound on console passwords"))?;
                journal.passwords.insert(instance);
            }
            Line::PwClear { instance } => {
                self.passwords.clear_now(&instance)?;
                journal.passwords.remove(&instance);
            }
        }
        Ok(())
    }

    /// Rewrites the file as one line per live token and password: to `<path>.tmp`, fsynced,
    /// renamed over `path`, directory fsynced. The new file is locked before it takes the
    /// name, so that the name always leads to a locked file.
    fn compact(&self, journal: &mut Journal, now: u64) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let mut lines = 0;
        let mut gone = Vec::new();
        for (hash, used) in &journal.tokens {
            let record = match (self.tokens.check_now(*hash, now), used) {
                (Ok(Ok(record)), _) => record,
                (Ok(Err(TokenRejection::AlreadyUsed)), Some(record)) => record.clone(),
                _ => {
                    gone.push(*hash);
                    continue;
                }
            };
            serde_json::to_writer(&mut buf, &Line::Token { hash: *hash, rec: Box::new(StoredToken::seal(&record, &self.sealer)) })?;
            buf.push(b'\n');
            lines += 1;
        }
        let mut cleared = Vec::new();
        for instance in &journal.passwords {
            let Ok(Some(password)) = self.passwords.get_now(instance) else {
                cleared.push(instance.clone());
                continue;
            };
            let sealed = self.sealer.seal(&password_context(instance), &password);
            serde_json::to_writer(&mut buf, &Line::Pw { instance: instance.clone(), sealed })?;
            buf.push(b'\n');
            lines += 1;
        }

        let tmp = PathBuf::from(format!("{}.tmp", self.path.display()));
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let written = (|| -> std::io::Result<File> {
            let file = OpenOptions::new().append(true).create_new(true).mode(0o600).open(&tmp)?;
            file.try_lock()?;
            (&file).write_all(&buf)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            Ok(file)
        })();
        let file = written.inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        // `path` is the new file now: append there even if the directory's fsync fails.
        (journal.file, journal.lines, journal.torn, journal.stale) = (Arc::new(file), lines, false, false);
        for hash in gone {
            journal.tokens.remove(&hash);
        }
        for instance in cleared {
            journal.passwords.remove(&instance);
        }
        File::open(parent_dir(&self.path))?.sync_all()
    }

    /// Waits until the journal's writes are on disk, off the async threads.
    async fn sync(&self, file: Arc<File>) -> Result<(), StoreError> {
        match tokio::task::spawn_blocking(move || file.sync_data()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.unavailable("fsync", e)),
            Err(e) => Err(self.unavailable("fsync", e)),
        }
    }

    fn insert_now(&self, hash: TokenHash, record: TokenRecord, line: Line) -> Result<Arc<File>, StoreError> {
        let mut journal = self.journal();
        self.tokens.insert_now(hash, record)?;
        if let Err(e) = journal.append(&line) {
            // Undone, so that no one is handed a token that a restart would forget.
            let _ = self.tokens.delete_now(hash);
            return Err(self.unavailable("write", e));
        }
        journal.tokens.insert(hash, None);
        Ok(journal.file.clone())
    }

    /// Takes `hash` once, on disk before it answers; the file to sync when taken.
    fn take_once_now(&self, hash: TokenHash, marker: TokenRecord, now: u64) -> Result<Option<Arc<File>>, StoreError> {
        let mut journal = self.journal();
        if !self.tokens.take_once_now(hash, marker.clone(), now)? {
            return Ok(None);
        }
        let line = Line::Token { hash, rec: Box::new(StoredToken::seal(&marker, &self.sealer)) };
        if let Err(e) = journal.append(&line) {
            let _ = self.tokens.delete_now(hash);
            return Err(self.unavailable("write", e));
        }
        journal.tokens.insert(hash, Some(marker));
        Ok(Some(journal.file.clone()))
    }

    fn redeem_now(&self, hash: TokenHash, now: u64) -> Result<Result<TokenRecord, TokenRejection>, StoreError> {
        let mut journal = self.journal();
        let before = match self.tokens.check_now(hash, now)? {
            Ok(record) => record,
            Err(why) => return Ok(Err(why)),
        };
        // A single-use token is taken on disk before it is handed out: were the line lost,
        // a restart would give the token back for a second console.
        if before.single_use
            && let Err(e) = journal.append(&Line::Used { hash, at: now })
        {
            return Err(self.unavailable("a single-use token's redeem", e));
        }
        let record = match self.tokens.redeem_now(hash, now)? {
            Ok(record) => record,
            Err(why) => return Ok(Err(why)),
        };
        if record.single_use {
            journal.tokens.insert(hash, Some(record.clone()));
            return Ok(Ok(record));
        }
        // Otherwise the used flag is news worth a line when it changes, then only the
        // touch, and not even that when the token was touched this second already (a
        // burst of openings). Such a line lost costs a touch, not a second console.
        let line = if !before.used {
            Line::Used { hash, at: now }
        } else if before.last_touched < now {
            Line::Touch { hash, at: now }
        } else {
            return Ok(Ok(record));
        };
        if let Err(e) = journal.append(&line) {
            warn!(path = %self.path.display(), error = %e, "store file: a redeem was not written; the next sweep rewrites the file");
        }
        Ok(Ok(record))
    }

    fn touch_now(&self, hash: TokenHash, now: u64) -> Result<bool, StoreError> {
        Ok(self.touch_many_now(&[hash], now)? == 1)
    }

    /// One write for all the live consoles' tokens; no line for a token touched this
    /// second already (a wave of consoles of one token ending at once). The lines are
    /// made before the journal's lock is taken: at 10,000 tokens, making them takes
    /// milliseconds that consoles opening meanwhile would wait for. A touch line that
    /// lands after a deletion's is harmless (replay touches no unknown token). Returns
    /// how many of `hashes` are known.
    fn touch_many_now(&self, hashes: &[TokenHash], now: u64) -> Result<usize, StoreError> {
        let (mut known, mut touched) = (0, Vec::new());
        for &hash in hashes {
            let Some(before) = self.tokens.touch_from(hash, now)? else { continue };
            known += 1;
            if before < now {
                touched.push(hash);
            }
        }
        let lines: Vec<Line> = touched.iter().map(|&hash| Line::Touch { hash, at: now }).collect();
        let written = journal::encode(&lines).and_then(|encoded| {
            let mut journal = self.journal();
            for hash in &touched {
                if let Some(Some(record)) = journal.tokens.get_mut(hash) {
                    record.last_touched = record.last_touched.max(now);
                }
            }
            journal.append_encoded(&encoded, lines.len())
        });
        if let Err(e) = written {
            warn!(path = %self.path.display(), error = %e, touched = lines.len(), "store file: touches were not written; the next sweep rewrites the file");
        }
        Ok(known)
    }

    /// Deletions are fsynced like creations: a revoked token must not come back.
    fn delete_now(&self, hash: TokenHash) -> Result<Option<Arc<File>>, StoreError> {
        let mut journal = self.journal();
        if !self.tokens.delete_now(hash)? {
            return Ok(None);
        }
        journal.tokens.remove(&hash);
        // Deleted all the same: the next sweep rewrites the file without it.
        journal.append(&Line::Del { hash }).map_err(|e| self.unavailable("write", e))?;
        Ok(Some(journal.file.clone()))
    }

    fn delete_instance_now(&self, instance: &str) -> Result<(usize, Option<Arc<File>>), StoreError> {
        let mut journal = self.journal();
        let deleted = self.tokens.delete_instance_now(instance)?;
        if deleted == 0 {
            return Ok((0, None));
        }
        journal.tokens.retain(|_, used| used.as_ref().is_none_or(|r| r.instance != instance));
        journal.append(&Line::DelInstance { instance: instance.to_string() }).map_err(|e| self.unavailable("write", e))?;
        Ok((deleted, Some(journal.file.clone())))
    }

    fn sweep_now(&self, now: u64) -> Result<usize, StoreError> {
        let swept = self.tokens.sweep_now(now)?;
        let mut journal = self.journal();
        let live = self.tokens.count_now()? + journal.passwords.len();
        if (journal.stale || journal.lines > live.saturating_mul(2).saturating_add(SLACK_LINES))
            && let Err(e) = self.compact(&mut journal, now)
        {
            warn!(path = %self.path.display(), error = %e, "store file: compaction failed; still appending to it");
        }
        Ok(swept)
    }

    fn set_now(&self, instance: &str, password: Secret, line: Line) -> Result<Arc<File>, StoreError> {
        let mut journal = self.journal();
        let before = self.passwords.get_now(instance)?;
        self.passwords.set_now(instance, password)?;
        if let Err(e) = journal.append(&line) {
            // Put back what the file still says.
            let _ = match before {
                Some(old) => self.passwords.set_now(instance, old),
                None => self.passwords.clear_now(instance).map(drop),
            };
            return Err(self.unavailable("write", e));
        }
        journal.passwords.insert(instance.to_string());
        Ok(journal.file.clone())
    }

    fn clear_now(&self, instance: &str) -> Result<Option<Arc<File>>, StoreError> {
        let mut journal = self.journal();
        let Some(before) = self.passwords.get_now(instance)? else { return Ok(None) };
        self.passwords.clear_now(instance)?;
        if let Err(e) = journal.append(&Line::PwClear { instance: instance.to_string() }) {
            // Put it back: a console keeps its password rather than lose it only until a restart.
            let _ = self.passwords.set_now(instance, before);
            return Err(self.unavailable("write", e));
        }
        journal.passwords.remove(instance);
        Ok(Some(journal.file.clone()))
    }
}

impl TokenStore for LocalStore {
    fn insert(&self, hash: TokenHash, record: TokenRecord) -> StoreFuture<'_, ()> {
        let line = Line::Token { hash, rec: Box::new(StoredToken::seal(&record, &self.sealer)) };
        let written = self.insert_now(hash, record, line);
        Box::pin(async move { self.sync(written?).await })
    }

    fn take_once(&self, hash: TokenHash, expires: u64) -> StoreFuture<'_, bool> {
        let now = crate::app::unix_now();
        let written = self.take_once_now(hash, TokenRecord::taken(&hash, now, expires), now);
        Box::pin(async move {
            match written? {
                Some(file) => self.sync(file).await.map(|()| true),
                None => Ok(false),
            }
        })
    }

    fn redeem(&self, hash: TokenHash, now: u64) -> StoreFuture<'_, Result<TokenRecord, TokenRejection>> {
        ready(self.redeem_now(hash, now))
    }

    fn check(&self, hash: TokenHash, now: u64) -> StoreFuture<'_, Result<TokenRecord, TokenRejection>> {
        self.tokens.check(hash, now)
    }

    fn touch(&self, hash: TokenHash, now: u64) -> StoreFuture<'_, bool> {
        ready(self.touch_now(hash, now))
    }

    fn touch_many<'a>(&'a self, hashes: &'a [TokenHash], now: u64) -> StoreFuture<'a, usize> {
        ready(self.touch_many_now(hashes, now))
    }

    fn delete(&self, hash: TokenHash) -> StoreFuture<'_, bool> {
        let written = self.delete_now(hash);
        Box::pin(async move {
            match written? {
                Some(file) => self.sync(file).await.map(|()| true),
                None => Ok(false),
            }
        })
    }

    fn delete_instance(&self, instance: &str) -> StoreFuture<'_, usize> {
        let written = self.delete_instance_now(instance);
        Box::pin(async move {
            match written? {
                (deleted, Some(file)) => self.sync(file).await.map(|()| deleted),
                (deleted, None) => Ok(deleted),
            }
        })
    }

    fn list(&self, filter: Filter, now: u64) -> StoreFuture<'_, Vec<TokenRecord>> {
        self.tokens.list(filter, now)
    }

    fn sweep(&self, now: u64) -> StoreFuture<'_, usize> {
        ready(self.sweep_now(now))
    }

    fn count(&self) -> StoreFuture<'_, usize> {
        self.tokens.count()
    }
}

impl PasswordStore for LocalStore {
    fn set(&self, instance: &str, password: Secret) -> StoreFuture<'_, ()> {
        let line = Line::Pw { instance: instance.to_string(), sealed: self.sealer.seal(&password_context(instance), &password) };
        let written = self.set_now(instance, password, line);
        Box::pin(async move { self.sync(written?).await })
    }

    fn clear(&self, instance: &str) -> StoreFuture<'_, bool> {
        let written = self.clear_now(instance);
        Box::pin(async move {
            match written? {
                Some(file) => self.sync(file).await.map(|()| true),
                None => Ok(false),
            }
        })
    }

    fn get(&self, instance: &str) -> StoreFuture<'_, Option<Secret>> {
        self.passwords.get(instance)
    }
}

#[cfg(test)]
mod tests;
