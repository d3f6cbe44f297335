//! websockify's token files (`--token-plugin TokenFile --token-source PATH`): a file, or a
//! directory of files, of `token: host:port` lines; lines starting with `#` are comments.
//! Read only. A file that changes is read again (relay looks at most once a second), so
//! whatever writes the tokens today keeps doing so.

use super::{Found, TokenSource, outside_record, parse_target};
use crate::auth::store::StoreFuture;
use crate::auth::token::{Target, TokenHash};
use anyhow::{Context as _, bail};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// The most bytes read from the files, and tokens kept from them.
const MAX_BYTES: u64 = 16 << 20;
const MAX_TOKENS: usize = 100_000;
/// How often the files' modification times are looked at.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// What identifies the files' contents: each file's name, modification time and length.
type Stamp = Vec<(PathBuf, Option<SystemTime>, u64)>;

struct State {
    targets: HashMap<TokenHash, Target>,
    stamp: Stamp,
    looked: Instant,
}

pub struct TokenFile {
    path: PathBuf,
    /// Seconds a console's record says it lives (listings only: these tokens never expire).
    ttl: u64,
    state: Mutex<State>,
}

impl TokenFile {
    /// Reads the file (or directory) now: a path that cannot be read fails start-up.
    pub fn open(path: &Path, ttl: u64) -> anyhow::Result<TokenFile> {
        let stamp = stamp(path)?;
        let targets = load(&stamp)?;
        tracing::info!(path = %path.display(), tokens = targets.len(), "token source websockify-file");
        Ok(TokenFile { path: path.to_path_buf(), ttl, state: Mutex::new(State { targets, stamp, looked: Instant::now() }) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Whole-value assignments only: a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the files again if they changed; a read that fails keeps what was read before.
    fn refresh(&self, state: &mut State) {
        if state.looked.elapsed() < LOOK_EVERY {
            return;
        }
        state.looked = Instant::now();
        let loaded =
            stamp(&self.path).and_then(|stamp| if stamp == state.stamp { Ok(None) } else { load(&stamp).map(|t| Some((t, stamp))) });
        match loaded {
            Ok(Some((targets, stamp))) => {
                tracing::info!(path = %self.path.display(), tokens = targets.len(), "websockify token file changed: read again");
                state.targets = targets;
                state.stamp = stamp;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %format!("{e:#}"), "websockify token file unreadable; keeping the tokens read before")
            }
        }
    }
}

impl TokenSource for TokenFile {
    fn name(&self) -> &'static str {
        "websockify-file"
    }

    fn redeem<'a>(&'a self, _token: &'a str, hash: TokenHash, now: u64) -> StoreFuture<'a, Found> {
        let mut state = self.lock();
        self.refresh(&mut state);
        let found = state.targets.get(&hash).map(|target| Ok(outside_record("websockify", &hash, target.clone(), now, self.ttl)));
        Box::pin(std::future::ready(Ok(found)))
    }
}

/// The files behind `path`: itself, or the regular files in it (sorted, so that a later
/// file's line wins as in websockify).
fn stamp(path: &Path) -> anyhow::Result<Stamp> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    let files = if meta.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("{}", path.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    Ok(files
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            (f, modified, meta.map_or(0, |m| m.len()))
        })
        .collect())
}

fn load(stamp: &Stamp) -> anyhow::Result<HashMap<TokenHash, Target>> {
    let total: u64 = stamp.iter().map(|(_, _, len)| len).sum();
    if total > MAX_BYTES {
        bail!("token files hold {total} bytes; at most {MAX_BYTES} are read");
    }
    let mut targets = HashMap::new();
    for (file, _, _) in stamp {
        let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parsed = line.split_once(": ").and_then(|(token, target)| Some((token.trim(), parse_target(target)?)));
            match parsed {
                Some((token, target)) if !token.is_empty() => {
                    if targets.len() >= MAX_TOKENS {
                        bail!("more than {MAX_TOKENS} tokens");
                    }
                    targets.insert(TokenHash::of(token), target);
                }
                // Never the line itself in the log: it holds a token.
                _ => tracing::warn!(file = %file.display(), line = n + 1, "not a `token: host:port` line; skipped"),
            }
        }
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_websockify_lines_and_skips_the_rest() {
        let dir = std::env::temp_dir().join(format!("relay-wsfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a"), "# comment\nvm1: 10.0.0.1:5901\n\nbroken line\nvm2: [fd00::2]:5902\n").unwrap();
        std::fs::write(dir.join("b"), "vm3: hv3:5903\n").unwrap();
        let source = TokenFile::open(&dir, 600).unwrap();
        let state = source.lock();
        assert_eq!(state.targets.len(), 3);
        assert_eq!(state.targets[&TokenHash::of("vm2")].host, "fd00::2");
        drop(state);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
