//! nova's console tokens, read where nova keeps them: the `console_auth_tokens` table of
//! each cell database. A row holds the token's SHA-256 (hex), the console kind, the
//! hypervisor's host and port, an optional `internal_access_path`, the instance and the
//! expiry (Unix seconds). A token is valid while its row exists and `expires` is still
//! ahead, as nova's `ConsoleAuthToken.validate` has it. relay only reads: nova creates
//! the rows and deletes them (instance deleted, migrated, rebuilt; expired ones swept).

pub mod conf;
pub mod url;

use super::{Found, TokenSource};
use crate::auth::store::{StoreError, StoreFuture, TokenRejection};
use crate::auth::token::{TokenHash, TokenRecord, check_instance};
use crate::config::Nova;
use futures_util::future::join_all;
use mysql_async::prelude::Queryable;
use std::collections::HashSet;
use std::time::Duration;

/// The columns relay reads; `tls_port` (SPICE) and `access_url_base` are nova's alone.
const SELECT_TOKEN: &str = "SELECT instance_uuid, console_type, host, port, internal_access_path, expires \
                            FROM console_auth_tokens WHERE token_hash = ? LIMIT 1";

/// Live consoles' tokens asked after in one query, at most.
const CHECK_BATCH: usize = 200;

type Row = (String, String, String, i64, Option<String>, i64);

/// One cell's database.
struct Cell {
    /// `host:port/database`: what logs and errors name (never the password).
    name: String,
    pool: mysql_async::Pool,
}

pub struct NovaSource {
    cells: Vec<Cell>,
    timeout: Duration,
    end_when_deleted: bool,
    enforce_session_timeout: bool,
}

impl NovaSource {
    pub fn new(cfg: &Nova) -> anyhow::Result<NovaSource> {
        let cells = cfg
            .database_urls
            .iter()
            .map(|u| {
                let db = url::parse(u, cfg.max_connections)?;
                Ok(Cell { name: db.name, pool: mysql_async::Pool::new(db.opts) })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let names: Vec<&str> = cells.iter().map(|c| c.name.as_str()).collect();
        tracing::info!(cells = ?names, end_when_token_deleted = cfg.end_when_token_deleted, enforce_session_timeout = cfg.enforce_session_timeout, "token source nova");
        Ok(NovaSource {
            cells,
            timeout: Duration::from_millis(cfg.timeout_ms),
            end_when_deleted: cfg.end_when_token_deleted,
            enforce_session_timeout: cfg.enforce_session_timeout,
        })
    }
}

impl Cell {
    /// Runs `query` on a pooled connection, within `timeout`.
    async fn run<T, F>(&self, timeout: Duration, query: impl FnOnce(mysql_async::Conn) -> F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = mysql_async::Result<T>>,
    {
        let work = async { query(self.pool.get_conn().await?).await };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("nova database {}: {e}", self.name))),
            Err(_) => Err(StoreError::Unavailable(format!("nova database {} did not answer within {} ms", self.name, timeout.as_millis()))),
        }
    }

    async fn find(&self, hex: &str, timeout: Duration) -> Result<Option<Row>, StoreError> {
        self.run(timeout, |mut conn| async move { conn.exec_first::<Row, _, _>(SELECT_TOKEN, (hex,)).await }).await
    }

    /// Which of `hexes` still have a row (and, with `valid_at`, one not yet expired).
    async fn present(&self, hexes: &[String], valid_at: Option<u64>, timeout: Duration) -> Result<HashSet<String>, StoreError> {
        let mut found = HashSet::new();
        for batch in hexes.chunks(CHECK_BATCH) {
            let marks = vec!["?"; batch.len()].join(",");
            let mut sql = format!("SELECT token_hash FROM console_auth_tokens WHERE token_hash IN ({marks})");
            let mut params: Vec<mysql_async::Value> = batch.iter().map(|h| h.as_str().into()).collect();
            if let Some(now) = valid_at {
                sql.push_str(" AND expires > ?");
                params.push(now.into());
            }
            let rows: Vec<String> = self.run(timeout, |mut conn| async move { conn.exec(sql, params).await }).await?;
            found.extend(rows.into_iter().map(|h| h.to_ascii_lowercase()));
        }
        Ok(found)
    }
}

/// nova's tokens are UUIDs (`uuidutils.generate_uuid()`); anything else is another
/// source's, and is not asked of the databases.
fn looks_like_nova(token: &str) -> bool {
    token.len() == 36
        && token.bytes().enumerate().all(|(i, b)| if matches!(i, 8 | 13 | 18 | 23) { b == b'-' } else { b.is_ascii_hexdigit() })
}

/// The record for a row, or why it does not open a console at `now`.
fn record(hash: &TokenHash, row: Row, now: u64) -> Result<TokenRecord, TokenRejection> {
    let (instance, console, host, port, path, expires) = row;
    // nova's test: valid while `expires > now`.
    let expires = u64::try_from(expires).unwrap_or(0);
    if expires <= now {
        return Err(TokenRejection::Expired);
    }
    let target = super::parse_target(&format!("{host}:{port}")).map(|mut t| {
        t.internal_access_path = path.filter(|p| !p.is_empty());
        t
    });
    let usable_path = target
        .as_ref()
        .is_some_and(|t| t.internal_access_path.as_ref().is_none_or(|p| p.len() <= 2048 && !p.bytes().any(|b| b.is_ascii_control())));
    let (Some(target), true, Ok(())) = (target, usable_path, check_instance(&instance)) else {
        tracing::warn!(token_id = %hash.id(), "nova's token row has no usable host, port, path or instance; refused");
        return Err(TokenRejection::Unknown);
    };
    let mut record = super::outside_record("nova", hash, target, now, 0);
    record.instance = instance;
    record.console = console;
    record.expires = expires;
    record.no_expiry = false;
    Ok(record)
}

impl TokenSource for NovaSource {
    fn name(&self) -> &'static str {
        "nova"
    }

    fn redeem<'a>(&'a self, token: &'a str, hash: TokenHash, now: u64) -> StoreFuture<'a, Found> {
        Box::pin(async move {
            if !looks_like_nova(token) {
                return Ok(None);
            }
            let hex = hash.hex();
            // Every cell at once: a token is in one of them. A cell that cannot answer
            // matters only when no other cell has the token.
            let answers = join_all(self.cells.iter().map(|c| c.find(&hex, self.timeout))).await;
            let mut failure = None;
            for answer in answers {
                match answer {
                    Ok(Some(row)) => return Ok(Some(record(&hash, row, now))),
                    Ok(None) => {}
                    Err(e) => failure = Some(e),
                }
            }
            match failure {
                Some(e) => Err(e),
                None => Ok(None),
            }
        })
    }

    fn keep<'a>(&'a self, live: &'a [TokenHash], now: u64) -> StoreFuture<'a, Vec<TokenHash>> {
        Box::pin(async move {
            if !(self.end_when_deleted || self.enforce_session_timeout) || live.is_empty() {
                return Ok(Vec::new());
            }
            let hexes: Vec<String> = live.iter().map(TokenHash::hex).collect();
            let valid_at = self.enforce_session_timeout.then_some(now);
            let answers = join_all(self.cells.iter().map(|c| c.present(&hexes, valid_at, self.timeout))).await;
            let mut present = HashSet::new();
            for answer in answers {
                // A cell that cannot answer might hold any of them: none ends on a guess.
                present.extend(answer?);
            }
            Ok(live.iter().zip(&hexes).filter(|(_, hex)| !present.contains(*hex)).map(|(hash, _)| *hash).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(expires: i64) -> Row {
        ("8c3a7b51-0d0e-4a55-9d7b-5b1f0e2f6a10".into(), "novnc".into(), "10.0.0.5".into(), 5900, None, expires)
    }

    #[test]
    fn only_uuids_are_asked_of_the_database() {
        assert!(looks_like_nova("8c3a7b51-0d0e-4a55-9d7b-5b1f0e2f6a10"));
        assert!(!looks_like_nova("8c3a7b51x0d0e-4a55-9d7b-5b1f0e2f6a10"));
        assert!(!looks_like_nova("Yk3x0Zg1rV8d2Jm5Qp7Ws9Ht4Nb6Lc0Fe2Ga8Iu1Ok3"));
        assert!(!looks_like_nova("8c3a7b51-0d0e-4a55-9d7b-5b1f0e2f6a1g"));
    }

    #[test]
    fn rows_become_records_as_nova_validates_them() {
        let hash = TokenHash::of("t");
        let r = record(&hash, row(1000), 999).unwrap();
        assert_eq!(
            (r.instance.as_str(), r.console.as_str(), r.target.port, r.expires),
            ("8c3a7b51-0d0e-4a55-9d7b-5b1f0e2f6a10", "novnc", 5900, 1000)
        );
        assert_eq!(record(&hash, row(1000), 1000).unwrap_err(), TokenRejection::Expired, "expires > now, as nova checks");
        let mut bad = row(1000);
        bad.3 = 70000;
        assert_eq!(record(&hash, bad, 1).unwrap_err(), TokenRejection::Unknown);
        let mut path = row(1000);
        path.4 = Some("?token=abc".into());
        assert_eq!(record(&hash, path, 1).unwrap().target.internal_access_path.as_deref(), Some("?token=abc"));
        let mut empty = row(1000);
        empty.4 = Some(String::new());
        assert_eq!(record(&hash, empty, 1).unwrap().target.internal_access_path, None);
    }
}
