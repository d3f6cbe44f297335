//! The journal file's lines, and the open journal they are appended to.

use crate::auth::token::{StoredToken, TokenHash, TokenRecord};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write as _;
use std::sync::Arc;

/// One journal line.
#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(super) enum Line {
    Token {
        #[serde(with = "hex")]
        hash: TokenHash,
        rec: Box<StoredToken>,
    },
    Used {
        #[serde(with = "hex")]
        hash: TokenHash,
        at: u64,
    },
    Touch {
        #[serde(with = "hex")]
        hash: TokenHash,
        at: u64,
    },
    Del {
        #[serde(with = "hex")]
        hash: TokenHash,
    },
    DelInstance {
        instance: String,
    },
    Pw {
        instance: String,
        sealed: String,
    },
    PwClear {
        instance: String,
    },
}

/// The open journal, and the keys compaction needs: the memory stores cannot enumerate.
pub(super) struct Journal {
    /// Opened O_APPEND and locked.
    pub(super) file: Arc<File>,
    pub(super) lines: usize,
    /// A write failed part-way: the next line starts with a newline, so that it does not
    /// join the fragment (which replay then skips).
    pub(super) torn: bool,
    /// The file misses a change since a write failed: the next sweep rewrites it from memory.
    pub(super) stale: bool,
    /// Every stored token's hash (and some gone ones: compaction prunes them). A used
    /// single-use token carries its record, as the memory store answers only
    /// "already used" for it.
    pub(super) tokens: HashMap<TokenHash, Option<TokenRecord>>,
    /// Instances with a console password.
    pub(super) passwords: HashSet<String>,
}

impl Journal {
    /// Appends one line with a single write, so that a crash leaves at most a torn last line.
    pub(super) fn append(&mut self, line: &Line) -> std::io::Result<()> {
        self.append_all(std::slice::from_ref(line))
    }

    /// Appends `lines` with a single write (a crash tears at most the last of them).
    pub(super) fn append_all(&mut self, lines: &[Line]) -> std::io::Result<()> {
        self.append_encoded(&encode(lines)?, lines.len())
    }

    /// Appends `count` lines made by [`encode`] (perhaps before this journal's lock was
    /// taken), with a single write.
    pub(super) fn append_encoded(&mut self, encoded: &[u8], count: usize) -> std::io::Result<()> {
        if count == 0 {
            return Ok(());
        }
        // After a torn write, a newline first, so the fragment stays a line of its own.
        let mended;
        let buf = if self.torn {
            mended = [b"\n", encoded].concat();
            &mended[..]
        } else {
            encoded
        };
        match (&*self.file).write_all(buf) {
            Ok(()) => {
                self.lines += count;
                self.torn = false;
                Ok(())
            }
            Err(e) => {
                self.torn = true;
                self.stale = true;
                Err(e)
            }
        }
    }
}

/// `lines` as the journal's text, one JSON object and a newline each.
pub(super) fn encode(lines: &[Line]) -> std::io::Result<Vec<u8>> {
    // A touch line, the commonest in a batch, is about 100 bytes.
    let mut buf = Vec::with_capacity(lines.len() * 128);
    for line in lines {
        serde_json::to_writer(&mut buf, line)?;
        buf.push(b'\n');
    }
    Ok(buf)
}

/// A token hash as 64 hex digits.
mod hex {
    use crate::auth::token::TokenHash;
    use serde::de::Error as _;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(hash: &TokenHash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hash.hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TokenHash, D::Error> {
        let text = String::deserialize(d)?;
        let digit = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
        let mut hash = [0u8; 32];
        if text.len() != 64 {
            return Err(D::Error::custom("a token hash is 64 hex digits"));
        }
        for (byte, pair) in hash.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
            *byte = match (digit(pair[0]), digit(pair[1])) {
                (Some(hi), Some(lo)) => (hi << 4) | lo,
                _ => return Err(D::Error::custom("a token hash is 64 hex digits")),
            };
        }
        Ok(TokenHash(hash))
    }
}
