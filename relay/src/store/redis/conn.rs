//! One multiplexed connection to the Redis master, made again after a failure.
//!
//! Every command has a deadline (`store.timeout_ms`): past it the store counts as
//! unavailable for that call. After a failed connect, calls fail at once until a backoff
//! (doubling from 100 ms to 5 s) has passed, so that consoles arriving during an outage
//! are refused promptly instead of each waiting out a connect timeout. With Sentinel, each
//! connect asks the sentinels for the current master, which is how a failover is followed.

use crate::auth::StoreError;
use crate::config::Store;
use anyhow::Context as _;
use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Client, IntoConnectionInfo, RedisError};
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

enum Source {
    Direct(Box<Client>),
    Sentinel(Box<SentinelClient>),
}

struct State {
    conn: Option<MultiplexedConnection>,
    /// No connect is tried before this.
    retry_at: Instant,
    backoff: Duration,
}

pub struct Redis {
    source: Mutex<Source>,
    /// Taken briefly by every call (a std lock: never held across an `.await`).
    state: std::sync::Mutex<State>,
    /// Held while connecting, so that one caller connects and the others wait for it.
    connecting: Mutex<()>,
    timeout: Duration,
    /// Replicas a write must reach before it is acknowledged.
    wait_replicas: u32,
    /// A description of the server for logs, without credentials.
    pub name: String,
}

impl Redis {
    pub fn new(cfg: &Store) -> anyhow::Result<Redis> {
        let password = match &cfg.password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("store.password_file {}", path.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            None => None,
        };
        let certs = match &cfg.ca_file {
            Some(path) => Some(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(path).with_context(|| format!("store.ca_file {}", path.display()))?),
            }),
            None => None,
        };
        let settings = |mut info: redis::RedisConnectionInfo| {
            if let Some(user) = &cfg.username {
                info = info.set_username(user);
            }
            if let Some(pw) = &password {
                info = info.set_password(pw);
            }
            info
        };
        let (source, name) = match (&cfg.master_name, &cfg.url) {
            (Some(master), url) => {
                // Database, user and password for the master come from `url` when set.
                let base = match url {
                    Some(u) => u.as_str().into_connection_info().context("store.url")?.redis_settings().clone(),
                    None => redis::RedisConnectionInfo::default(),
                };
                let mut node = SentinelNodeConnectionInfo::default().set_redis_connection_info(settings(base));
                if url.as_deref().is_some_and(|u| u.starts_with("rediss://")) {
                    node = node.set_tls_mode(redis::TlsMode::Secure);
                }
                let sentinels: Vec<String> = cfg.sentinels.iter().map(|s| format!("redis://{s}")).collect();
                let client =
                    SentinelClient::build(sentinels, master.as_str(), Some(node), SentinelServerType::Master).context("store.sentinels")?;
                (Source::Sentinel(Box::new(client)), format!("sentinel master {master} via {}", cfg.sentinels.join(",")))
            }
            (None, Some(url)) => {
                let info = url.as_str().into_connection_info().context("store.url")?;
                let name = format!("{}", info.addr());
                let info = info.clone().set_redis_settings(settings(info.redis_settings().clone()));
                let client = match certs {
                    Some(certs) => Client::build_with_tls(info, certs).context("store.ca_file")?,
                    None => Client::open(info).context("store.url")?,
                };
                (Source::Direct(Box::new(client)), name)
            }
            (None, None) => anyhow::bail!("store: no redis url"),
        };
        let state = State { conn: None, retry_at: Instant::now(), backoff: BACKOFF_MIN };
        let timeout = Duration::from_millis(cfg.timeout_ms);
        Ok(Redis {
            source: Mutex::new(source),
            state: std::sync::Mutex::new(state),
            connecting: Mutex::new(()),
            timeout,
            wait_replicas: cfg.wait_replicas,
            name,
        })
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain assignments only: a poisoned lock still guards a consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh client for the current master (pub/sub needs a connection of its own).
    pub async fn client(&self) -> Result<Client, StoreError> {
        match &mut *self.source.lock().await {
            Source::Direct(c) => Ok((**c).clone()),
            Source::Sentinel(s) => {
                tokio::time::timeout(self.timeout, s.async_get_client()).await.map_err(|_| timed_out())?.map_err(unavailable)
            }
        }
    }

    /// The shared connection, connecting first if there is none.
    async fn connection(&self) -> Result<MultiplexedConnection, StoreError> {
        if let Some(conn) = self.lock_state().conn.clone() {
            return Ok(conn);
        }
        let _connecting = self.connecting.lock().await;
        {
            let state = self.lock_state();
            if let Some(conn) = &state.conn {
                return Ok(conn.clone());
            }
            if Instant::now() < state.retry_at {
                return Err(StoreError::Unavailable(format!("redis {} is unreachable; retrying shortly", self.name)));
            }
        }
        let connect = async {
            let client = self.client().await?;
            let config =
                redis::AsyncConnectionConfig::new().set_response_timeout(Some(self.timeout)).set_connection_timeout(Some(self.timeout));
            client.get_multiplexed_async_connection_with_config(&config).await.map_err(unavailable)
        };
        let connected = tokio::time::timeout(self.timeout * 2, connect).await.unwrap_or_else(|_| Err(timed_out()));
        let mut state = self.lock_state();
        match connected {
            Ok(conn) => {
                state.conn = Some(conn.clone());
                state.backoff = BACKOFF_MIN;
                tracing::info!(server = %self.name, "connected to the redis store");
                Ok(conn)
            }
            Err(e) => {
                state.retry_at = Instant::now() + state.backoff;
                state.backoff = (state.backoff * 2).min(BACKOFF_MAX);
                Err(e)
            }
        }
    }

    /// Forgets a connection that failed, so that the next call connects again.
    async fn failed(&self, e: &RedisError) {
        let broken = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_timeout()
            || e.is_unrecoverable_error()
            || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly);
        if broken && self.lock_state().conn.take().is_some() {
            tracing::warn!(server = %self.name, error = %e, "lost the redis store; reconnecting");
        }
    }

    /// Runs `cmd` (a command, pipeline or script invocation) within the deadline.
    pub async fn run<T, F, Fut>(&self, cmd: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let conn = self.connection().await?;
        match tokio::time::timeout(self.timeout, cmd(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.failed(&e).await;
                Err(unavailable(e))
            }
            Err(_) => {
                // A command that hangs means a server that is gone or stuck: start afresh.
                self.lock_state().conn = None;
                Err(timed_out())
            }
        }
    }
}

impl Redis {
    /// Runs a write that must reach `wait_replicas` replicas before it is acknowledged
    /// (Redis `WAIT`). WAIT blocks the connection it is sent on, so the write and its
    /// WAIT go over a connection of their own, never the one consoles share.
    pub async fn run_replicated<T, F, Fut>(&self, cmd: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let want = self.wait_replicas;
        if want == 0 {
            return self.run(cmd).await;
        }
        // WAIT's own timeout, a little inside the deadline.
        let wait_ms = (self.timeout.as_millis() as u64 * 3 / 4).max(1);
        let write = async {
            let client = self.client().await?;
            let config =
                redis::AsyncConnectionConfig::new().set_response_timeout(Some(self.timeout)).set_connection_timeout(Some(self.timeout));
            let conn = client.get_multiplexed_async_connection_with_config(&config).await.map_err(unavailable)?;
            let value = cmd(conn.clone()).await.map_err(unavailable)?;
            let mut conn = conn;
            let got: u32 = redis::cmd("WAIT").arg(want).arg(wait_ms).query_async(&mut conn).await.map_err(unavailable)?;
            if got < want {
                return Err(StoreError::Unavailable(format!("only {got} of {want} replicas confirmed the write in time")));
            }
            Ok(value)
        };
        tokio::time::timeout(self.timeout * 2, write).await.unwrap_or_else(|_| Err(timed_out()))
    }
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

fn timed_out() -> StoreError {
    StoreError::Unavailable("redis did not answer in time".into())
}
