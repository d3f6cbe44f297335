//! Where a console token may be in a request: `?token=` (also reached through noVNC's
//! `path` form, `vnc_lite.html?path=%3Ftoken%3DT` makes the WebSocket URL `/?token=T`),
//! or a `token` cookie; and the URLs relay hands out for a token, one shape per door,
//! kept here so that what is handed out is what is read back.

use crate::wire::http::RequestHead;
use percent_encoding::percent_decode_str;

/// Tokens are 43 characters; anything much longer is not a token and is not decoded.
const MAX_TOKEN_LEN: usize = 256;

pub fn from_request(head: &RequestHead) -> Option<String> {
    from_query(head.query().unwrap_or("")).or_else(|| from_cookies(head))
}

/// noVNC's page at `base` (`…/vnc_lite.html`), opening the WebSocket door's `/?token=T`.
pub fn novnc_url(base: &str, token: &str) -> String {
    format!("{base}?path=%3Ftoken%3D{token}")
}

/// The WebSocket door's path and query, for clients that build their own URL.
pub fn websocket_path(token: &str) -> String {
    format!("/?token={token}")
}

/// The CONNECT door's URL at `base` (`http://host:port/console`).
pub fn connect_url(base: &str, token: &str) -> String {
    format!("{base}?token={token}")
}

fn from_query(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name == "token").then(|| decode(value))?
    })
}

fn from_cookies(head: &RequestHead) -> Option<String> {
    head.headers.iter().filter(|(n, _)| n == "cookie").flat_map(|(_, v)| v.split(';')).find_map(|c| {
        let (name, value) = c.trim().split_once('=')?;
        (name == "token").then(|| decode(value))?
    })
}

fn decode(value: &str) -> Option<String> {
    if value.is_empty() || value.len() > MAX_TOKEN_LEN {
        return None;
    }
    let decoded = percent_decode_str(value).decode_utf8().ok()?;
    Some(decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::http::parse_request;

    fn head(raw: &str) -> RequestHead {
        parse_request(raw.as_bytes(), 8192).unwrap().unwrap().0
    }

    #[test]
    fn query_path_form_and_cookie() {
        assert_eq!(from_request(&head("GET /?token=a-b_c HTTP/1.1\r\n\r\n")).as_deref(), Some("a-b_c"));
        assert_eq!(from_request(&head("GET /websockify?x=1&token=t%2D1 HTTP/1.1\r\n\r\n")).as_deref(), Some("t-1"));
        assert_eq!(from_request(&head("GET /websockify HTTP/1.1\r\nCookie: a=b; token=ck; c=d\r\n\r\n")).as_deref(), Some("ck"));
        assert_eq!(
            from_request(&head("GET /?token=q HTTP/1.1\r\nCookie: token=ck\r\n\r\n")).as_deref(),
            Some("q"),
            "the URL wins over a stale cookie"
        );
        assert_eq!(from_request(&head("GET /?tokens=x&token= HTTP/1.1\r\n\r\n")), None);
        let long = format!("GET /?token={} HTTP/1.1\r\n\r\n", "a".repeat(300));
        assert_eq!(from_request(&head(&long)), None);
    }

    #[test]
    fn each_door_reads_back_the_url_handed_out_for_it() {
        let token = crate::auth::token::generate();
        // noVNC decodes its `path` parameter and opens the WebSocket at it.
        let novnc = novnc_url("http://h:6080/vnc_lite.html", &token);
        let path = novnc.split_once("?path=").unwrap().1;
        let ws_target = percent_decode_str(path).decode_utf8().unwrap();
        assert_eq!(format!("/{ws_target}"), websocket_path(&token));
        let ws = head(&format!("GET {} HTTP/1.1\r\n\r\n", websocket_path(&token)));
        assert_eq!(from_request(&ws).as_deref(), Some(token.as_str()));
        let connect = connect_url("http://h:6081/console", &token);
        let target = connect.strip_prefix("http://h:6081").unwrap();
        let head = head(&format!("CONNECT {target} HTTP/1.1\r\n\r\n"));
        assert_eq!(from_request(&head).as_deref(), Some(token.as_str()));
    }
}
