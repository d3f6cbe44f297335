//! nova's database URLs, as its nova.conf writes them (`[database] connection`, in
//! SQLAlchemy's form): `mysql+pymysql://user:password@host:port/nova?charset=utf8`.
//! The driver after `+` is Python's and means nothing here; so do `charset` (nova's
//! token columns are ASCII) and devstack's `plugin`. TLS comes from `ssl_ca`, `ssl_cert`
//! and `ssl_key`, as PyMySQL takes them.

use anyhow::{Context as _, bail};
use mysql_async::{OptsBuilder, PoolConstraints, PoolOpts, SslOpts};
use percent_encoding::percent_decode_str;
use std::path::PathBuf;
use std::time::Duration;

pub struct DbUrl {
    pub opts: mysql_async::Opts,
    /// `host:port/database`, for logs: no user, no password.
    pub name: String,
}

fn decode(s: &str) -> anyhow::Result<String> {
    Ok(percent_decode_str(s).decode_utf8().context("not UTF-8 once percent-decoded")?.into_owned())
}

pub fn parse(url: &str, max_connections: usize) -> anyhow::Result<DbUrl> {
    let (scheme, rest) = url.split_once("://").context("a database URL is scheme://user:password@host/database")?;
    if scheme != "mysql" && !scheme.starts_with("mysql+") {
        bail!("nova's database must be MySQL or MariaDB (mysql:// or mysql+pymysql://), not {scheme}://");
    }
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, database) = rest.split_once('/').context("the URL names no database (…/nova)")?;
    let (userinfo, hostport) = authority.rsplit_once('@').unwrap_or(("", authority));
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let (host, port) = split_host_port(hostport)?;
    let database = decode(database)?;
    if database.is_empty() {
        bail!("the URL names no database (…/nova)");
    }

    let mut socket = None;
    let (mut ca, mut cert, mut key, mut check_hostname) = (None::<PathBuf>, None::<PathBuf>, None::<PathBuf>, true);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = decode(value)?;
        match name {
            "charset" | "plugin" => {}
            "unix_socket" => socket = Some(value),
            "ssl_ca" => ca = Some(value.into()),
            "ssl_cert" => cert = Some(value.into()),
            "ssl_key" => key = Some(value.into()),
            "ssl_check_hostname" => check_hostname = !matches!(value.to_ascii_lowercase().as_str(), "false" | "0" | "no"),
            other => tracing::warn!(parameter = other, "nova database URL: parameter ignored"),
        }
    }
    if cert.is_some() != key.is_some() {
        bail!("ssl_cert and ssl_key go together");
    }
    let ssl = (ca.is_some() || cert.is_some()).then(|| {
        let identity = cert.zip(key).map(|(c, k)| mysql_async::ClientIdentity::new(c.into(), k.into()));
        SslOpts::default()
            .with_root_certs(ca.into_iter().map(Into::into).collect())
            .with_client_identity(identity)
            .with_danger_skip_domain_validation(!check_hostname)
    });
    let constraints = PoolConstraints::new(0, max_connections).context("max_connections must be at least 1")?;
    let pool = PoolOpts::default().with_constraints(constraints).with_inactive_connection_ttl(Duration::from_secs(60));
    let name = format!("{host}:{port}/{database}");
    let opts = OptsBuilder::default()
        .ip_or_hostname(host)
        .tcp_port(port)
        .user(Some(decode(user)?).filter(|u| !u.is_empty()))
        .pass(Some(decode(password)?).filter(|p| !p.is_empty()))
        .db_name(Some(database))
        .socket(socket)
        .prefer_socket(false)
        .ssl_opts(ssl)
        .pool_opts(pool);
    Ok(DbUrl { opts: opts.into(), name })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; MySQL's port when none is given.
fn split_host_port(hostport: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = match hostport.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').context("an unclosed [ in the host")?;
            (host, after.strip_prefix(':'))
        }
        None => match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        },
    };
    let port = match port {
        Some(p) => p.parse().ok().filter(|&p| p != 0).with_context(|| format!("bad port {p:?}"))?,
        None => 3306,
    };
    Ok((if host.is_empty() { "localhost".into() } else { host.to_string() }, port))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn nova_conf_connection_strings() {
        let db = parse("mysql+pymysql://nova:s%40cret@controller/nova?charset=utf8&plugin=dbcounter", 4).unwrap();
        assert_eq!(db.name, "controller:3306/nova");
        assert_eq!((db.opts.user(), db.opts.pass(), db.opts.db_name()), (Some("nova"), Some("s@cret"), Some("nova")));
        let db = parse("mysql://relay@[fd00::7]:3307/nova_cell1", 4).unwrap();
        assert_eq!((db.opts.ip_or_hostname(), db.opts.tcp_port(), db.opts.pass()), ("fd00::7", 3307, None));
        let db = parse("mysql+pymysql://n:p@db/nova?ssl_ca=/etc/ssl/ca.pem", 4).unwrap();
        assert!(db.opts.ssl_opts().is_some(), "ssl_ca turns TLS on");
        for bad in [
            "postgresql://nova:p@db/nova",
            "sqlite:///nova.db",
            "mysql://nova:p@db",
            "mysql://nova:p@db:0/nova",
            "mysql://nova:p@db/nova?ssl_cert=/c.pem",
            "controller/nova",
        ] {
            assert!(parse(bad, 4).is_err(), "{bad}");
        }
    }
}
