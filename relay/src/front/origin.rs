//! Origin check on WebSocket upgrades (cross-site WebSocket hijacking, CVE-2015-0259).
//!
//! No Origin header: allowed, since native clients send none and a browser always does.
//! Otherwise the Origin's host must be the Host the request came to, or be listed in
//! `allowed_origins`, and its scheme must match the connection's (http~ws, https~wss).

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: Option<u16>,
}

impl Origin {
    pub fn parse(text: &str) -> Option<Origin> {
        let (scheme, rest) = text.split_once("://")?;
        if rest.contains(['/', '?', '#', '@']) || rest.is_empty() {
            return None;
        }
        let (host, port) = split_host_port(rest)?;
        Some(Origin { scheme: scheme.to_ascii_lowercase(), host, port })
    }

    fn port_or_default(&self) -> Option<u16> {
        self.port.or(match self.scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        })
    }
}

/// Splits `host[:port]` or `[v6]:port`; the host comes back lower-cased.
fn split_host_port(text: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        (h, after.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse().ok()?),
        None => None,
    };
    (!host.is_empty()).then(|| (host.to_ascii_lowercase(), port))
}

/// Checks one upgrade request. `scheme` is what the browser used to reach relay ("http"
/// or "https"). Entries of `allowed` are either a full origin (`https://a.example:8443`,
/// compared whole) or a bare host name (compared by host, scheme still checked).
pub fn check(origin: Option<&str>, host_header: Option<&str>, scheme: &str, allowed: &[String]) -> Result<(), String> {
    let Some(origin_text) = origin else { return Ok(()) };
    let origin = Origin::parse(origin_text).ok_or_else(|| format!("Origin {origin_text:?} is not a valid origin"))?;
    for entry in allowed {
        match Origin::parse(entry) {
            Some(full)
                if full.scheme == origin.scheme && full.host == origin.host && full.port_or_default() == origin.port_or_default() =>
            {
                return Ok(());
            }
            None if entry.eq_ignore_ascii_case(&origin.host) && origin.scheme == scheme => return Ok(()),
            _ => {}
        }
    }
    let expected_host = host_header.and_then(split_host_port).map(|(h, _)| h);
    if expected_host.as_deref() != Some(origin.host.as_str()) {
        return Err(format!("Origin {origin_text:?} does not match Host {:?} nor the allowed origins", host_header.unwrap_or("")));
    }
    if origin.scheme != scheme {
        return Err(format!("Origin {origin_text:?} uses {}, but this connection is {scheme}", origin.scheme));
    }
    Ok(())
}

/// Whether the request's `Host` is one relay answers to: any when `allowed` is empty; else
/// an entry with the same name (and port, when the entry names one).
pub fn check_host(host_header: Option<&str>, allowed: &[String]) -> Result<(), String> {
    if allowed.is_empty() {
        return Ok(());
    }
    let host = host_header.and_then(split_host_port);
    let served = host.as_ref().is_some_and(|(name, port)| {
        allowed
            .iter()
            .filter_map(|entry| split_host_port(entry))
            .any(|(e_name, e_port)| &e_name == name && (e_port.is_none() || e_port == *port))
    });
    if served { Ok(()) } else { Err(format!("Host {:?} is not served here (websocket.allowed_hosts)", host_header.unwrap_or(""))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_host_passes_and_other_sites_do_not() {
        assert_eq!(check(None, Some("relay:6080"), "http", &[]), Ok(()));
        assert_eq!(check(Some("http://relay:6080"), Some("relay:6080"), "http", &[]), Ok(()));
        assert_eq!(check(Some("http://RELAY"), Some("relay:6080"), "http", &[]), Ok(()));
        assert!(check(Some("http://evil.example"), Some("relay:6080"), "http", &[]).is_err());
        assert!(check(Some("https://relay:6080"), Some("relay:6080"), "http", &[]).is_err(), "scheme must match");
        assert!(check(Some("null"), Some("relay"), "http", &[]).is_err());
        assert!(check(Some("http://relay@evil"), Some("relay"), "http", &[]).is_err());
        assert_eq!(check(Some("http://[::1]:6080"), Some("[::1]:6080"), "http", &[]), Ok(()));
    }

    #[test]
    fn allow_list_entries() {
        let allowed = vec!["https://dash.example".to_string(), "panel.example".to_string()];
        assert_eq!(check(Some("https://dash.example:443"), Some("relay"), "http", &allowed), Ok(()));
        assert!(check(Some("https://dash.example:8443"), Some("relay"), "http", &allowed).is_err());
        assert_eq!(check(Some("http://panel.example"), Some("relay"), "http", &allowed), Ok(()));
        assert!(check(Some("https://panel.example"), Some("relay"), "http", &allowed).is_err());
    }

    #[test]
    fn checks_do_not_remember_earlier_requests() {
        // A peer appended each request's Host to a shared allow-list; here nothing is shared.
        let allowed: Vec<String> = Vec::new();
        assert_eq!(check(Some("http://a"), Some("a"), "http", &allowed), Ok(()));
        assert!(check(Some("http://a"), Some("b"), "http", &allowed).is_err());
    }

    #[test]
    fn hosts_outside_the_allow_list_are_refused() {
        let allowed = vec!["console.example.com".to_string(), "10.0.0.5:6080".to_string()];
        assert_eq!(check_host(Some("anything"), &[]), Ok(()), "no list: as before");
        assert_eq!(check_host(Some("Console.Example.com:443"), &allowed), Ok(()));
        assert_eq!(check_host(Some("10.0.0.5:6080"), &allowed), Ok(()));
        assert!(check_host(Some("10.0.0.5:7000"), &allowed).is_err(), "the entry names a port");
        assert!(check_host(Some("evil.example"), &allowed).is_err(), "a rebound name");
        assert!(check_host(None, &allowed).is_err());
    }
}
