//! `relay ctl`: turns command-line arguments into control requests and prints replies.

use crate::auth::Secret;
use crate::auth::{NewToken, Target};
use crate::cli::{CtlArgs, CtlCommand, InstanceCommand, PasswordCommand, TokenArg, TokenCommand};
use crate::config::default_control_path;
use crate::control::client::{ClientError, call};
use crate::control::handler::describe;
use crate::control::proto::Request;
use crate::control::replies::{
    AccessUrls, Cluster, Deleted, InstanceReset, PasswordChanged, SessionList, Stats, TokenChecked, TokenCreated, TokenList, Touched,
};
use crate::fleet::FleetSessions;
use crate::relay::backend::{BackendsView, Choice};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Runs one ctl command; returns the process exit code.
pub async fn run(args: CtlArgs) -> i32 {
    if let CtlCommand::Token(TokenCommand::Sign { .. }) = &args.command {
        return match sign(args.command) {
            Ok(token) => {
                println!("{token}");
                0
            }
            Err(e) => {
                eprintln!("relay ctl: {e:#}");
                2
            }
        };
    }
    let path = args.control.clone().unwrap_or_else(default_control_path);
    let req = match to_request(args.command) {
        Ok(req) => req,
        Err(e) => {
            eprintln!("relay ctl: {e}");
            return 2;
        }
    };
    let printed = match &req {
        Request::TokenCreate(_) => show(&path, req, args.json, print_created).await,
        Request::TokenCheck { .. } => show(&path, req, args.json, print_checked).await,
        Request::TokenTouch { .. } => show(&path, req, args.json, |_: Touched| println!("touched")).await,
        Request::TokenDelete { .. } => show(&path, req, args.json, |_: Deleted| println!("deleted")).await,
        Request::TokenList { .. } => show(&path, req, args.json, print_tokens).await,
        Request::Sessions { .. } => show(&path, req, args.json, |l: SessionList| print_sessions(None, l.sessions)).await,
        Request::ClusterSessions { .. } => show(&path, req, args.json, print_fleet_sessions).await,
        Request::Cluster => show(&path, req, args.json, print_cluster).await,
        Request::Stats => show(&path, req, args.json, print_stats).await,
        Request::InstancePasswordSet { .. } | Request::InstancePasswordClear { .. } => show(&path, req, args.json, print_password).await,
        Request::InstanceReset { .. } => show(&path, req, args.json, print_reset).await,
    };
    match printed {
        // A token that does not check out is a failure for scripts too.
        Ok(Shown::Invalid) => 1,
        Ok(Shown::Fine) => 0,
        Err(e) => {
            eprintln!("relay ctl: {e}");
            2
        }
    }
}

enum Shown {
    Fine,
    Invalid,
}

/// Sends `req`, reads its reply as `T` and prints it: as JSON, or for people.
async fn show<T: Serialize + DeserializeOwned + Validity>(
    path: &Path,
    req: Request,
    json: bool,
    human: impl FnOnce(T),
) -> Result<Shown, ClientError> {
    let reply: T = call(path, req).await?;
    let shown = if reply.valid() { Shown::Fine } else { Shown::Invalid };
    if json {
        println!("{}", serde_json::to_string(&reply).map_err(|e| ClientError::BadReply(e.to_string()))?);
    } else {
        human(reply);
    }
    Ok(shown)
}

/// Whether a reply is a success for the exit code: only `token check` can say no.
trait Validity {
    fn valid(&self) -> bool {
        true
    }
}

impl Validity for TokenChecked {
    fn valid(&self) -> bool {
        self.valid
    }
}
impl Validity for TokenCreated {}
impl Validity for Touched {}
impl Validity for Deleted {}
impl Validity for TokenList {}
impl Validity for SessionList {}
impl Validity for FleetSessions {}
impl Validity for Cluster {}
impl Validity for Stats {}
impl Validity for PasswordChanged {}
impl Validity for InstanceReset {}

/// The request a command asks for, with its secrets read from files or stdin where given so.
fn to_request(command: CtlCommand) -> std::io::Result<Request> {
    Ok(match command {
        CtlCommand::Token(t) => match t {
            TokenCommand::Create {
                instance,
                host,
                port,
                ttl,
                idle_timeout,
                internal_access_path,
                single_use,
                console,
                hypervisor_password_file,
                hypervisor_password,
                password_file,
                password,
            } => Request::TokenCreate(NewToken {
                instance,
                console,
                target: Target { host, port, internal_access_path },
                ttl,
                idle_timeout,
                single_use,
                hypervisor_schemes: None,
                hypervisor_password: secret(hypervisor_password, hypervisor_password_file)?.map(Secret),
                password: secret(password, password_file)?.map(Secret),
            }),
            TokenCommand::Check { token } => Request::TokenCheck { token: token_text(token)? },
            TokenCommand::Touch { token } => Request::TokenTouch { token: token_text(token)? },
            TokenCommand::Delete { token } => Request::TokenDelete { token: token_text(token)? },
            TokenCommand::List { instance, host } => Request::TokenList { instance, host },
            TokenCommand::Sign { .. } => return Err(std::io::Error::other("token sign runs locally")),
        },
        CtlCommand::Sessions { instance, cluster: false } => Request::Sessions { instance },
        CtlCommand::Sessions { instance, cluster: true } => Request::ClusterSessions { instance },
        CtlCommand::Cluster => Request::Cluster,
        CtlCommand::Stats => Request::Stats,
        CtlCommand::Instance(InstanceCommand::Reset { id, revoke }) => Request::InstanceReset { instance: id, revoke },
        CtlCommand::Instance(InstanceCommand::Password(PasswordCommand::Set { id, password_file, password, disconnect })) => {
            let password = secret(password, password_file)?.unwrap_or_default();
            Request::InstancePasswordSet { instance: id, password: Secret(password), disconnect }
        }
        CtlCommand::Instance(InstanceCommand::Password(PasswordCommand::Clear { id, disconnect })) => {
            Request::InstancePasswordClear { instance: id, disconnect }
        }
    })
}

/// `token sign`: a JWT for the `jwt` source, signed here.
fn sign(command: CtlCommand) -> anyhow::Result<String> {
    let CtlCommand::Token(TokenCommand::Sign { key, algorithm, kid, instance, host, port, ttl, internal_access_path, single_use }) =
        command
    else {
        anyhow::bail!("not a sign command");
    };
    crate::auth::token::check_instance(&instance).map_err(anyhow::Error::msg)?;
    let now = crate::app::unix_now();
    let claims = crate::auth::sources::jwt::Claims {
        host,
        port: port.into(),
        exp: Some(now + ttl),
        nbf: Some(now),
        iat: Some(now),
        instance: Some(instance),
        internal_access_path,
        console: None,
        jti: single_use.then(crate::auth::token::generate),
    };
    crate::auth::sources::jwt::sign(&crate::config::JwtKey { file: key, algorithm, kid }, &claims)
}

/// A secret given inline, or read from `file`.
fn secret(inline: Option<String>, file: Option<PathBuf>) -> std::io::Result<Option<String>> {
    match (inline, file) {
        (Some(s), _) => Ok(Some(s)),
        (None, Some(file)) => read_secret(&file).map(Some),
        (None, None) => Ok(None),
    }
}

/// A token from the command line, or from stdin when it says `-` or nothing.
fn token_text(arg: TokenArg) -> std::io::Result<String> {
    match arg.token {
        Some(token) if token != "-" => Ok(token),
        _ => read_secret(Path::new("-")),
    }
}

/// The first line of `file` (`-`: stdin), without its line break: what `echo`, a secrets
/// file or a pipe from a vault gives.
fn read_secret(file: &Path) -> std::io::Result<String> {
    let text = if file == Path::new("-") {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line
    } else {
        std::fs::read_to_string(file).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", file.display())))?
    };
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no secret in {}", file.display())));
    }
    Ok(line.to_string())
}

fn print_created(t: TokenCreated) {
    println!("{:<10} {}", "token", t.token);
    println!("{:<10} {}", "id", t.id);
    println!("{:<10} {} (unix time)", "expires", t.expires);
    let AccessUrls { novnc, websocket, connect } = t.urls;
    for (door, url) in [("novnc", novnc), ("websocket", websocket), ("connect", connect)] {
        if let Some(url) = url {
            println!("{door:<10} {url}");
        }
    }
}

fn print_checked(c: TokenChecked) {
    match (c.token, c.message) {
        (Some(t), _) => {
            println!("valid: instance {} -> {}:{}, expires {} (unix time)", t.instance, t.target.host, t.target.port, t.expires)
        }
        (None, message) => println!("invalid: {}", message.unwrap_or_default()),
    }
}

fn print_tokens(list: TokenList) {
    println!("{:<13} {:<24} {:<28} {:>11} FLAGS", "ID", "INSTANCE", "TARGET", "EXPIRES");
    for t in list.tokens {
        let target = format!("{}:{}", t.target.host, t.target.port);
        let flags = if t.single_use { "single-use" } else { "" };
        println!("{:<13} {:<24} {:<28} {:>11} {}", t.id, t.instance, target, t.expires, flags);
    }
}

fn print_sessions(appliance: Option<&str>, sessions: Vec<crate::session::SessionView>) {
    let at = appliance.map_or(String::new(), |_| format!("{:<16} ", "APPLIANCE"));
    println!("{at}{:>6} {:<24} {:<10} {:<22} {:<22} {:>12} {:>12}", "ID", "INSTANCE", "DOOR", "VIEWER", "HYPERVISOR", "TO-HV", "TO-VIEWER");
    for x in sessions {
        let i = &x.info;
        let at = appliance.map_or(String::new(), |a| format!("{a:<16} "));
        println!(
            "{at}{:>6} {:<24} {:<10} {:<22} {:<22} {:>12} {:>12}",
            i.id,
            i.instance,
            i.door.to_string(),
            i.viewer.to_string(),
            i.hypervisor,
            x.bytes_to_hypervisor,
            x.bytes_to_viewer
        );
    }
}

fn print_fleet_sessions(f: FleetSessions) {
    for a in f.appliances {
        print_sessions(Some(&a.appliance), a.sessions);
    }
    if !f.missing.is_empty() {
        println!("did not answer: {}", f.missing.join(", "));
    }
}

fn print_cluster(c: Cluster) {
    println!("store: {}; this appliance: {}", c.store, c.this);
    println!("{:<20} {:<8} {:>8} {:>10} {:<6} ADDRESS", "NAME", "VERSION", "CONSOLES", "LAST-SEEN", "ALIVE");
    let now = crate::app::unix_now();
    for a in c.appliances {
        let alive = if a.alive { "yes" } else { "NO" };
        let seen = format!("{}s ago", now.saturating_sub(a.last_seen));
        println!("{:<20} {:<8} {:>8} {:>10} {:<6} {}", a.name, a.version, a.live_consoles, seen, alive, a.address);
    }
}

fn print_stats(s: Stats) {
    let r = &s.relay;
    println!("sessions_active: {}", s.sessions_active);
    println!("live bytes: {} to hypervisors, {} to viewers", s.live_bytes_to_hypervisor, s.live_bytes_to_viewer);
    println!("tokens: {}", s.tokens);
    println!(
        "relay: raw consoles on {} (quiet ones on {}), framed on {}, kernel-TLS on {}",
        r.raw.name(),
        r.raw_quiet.name(),
        r.framed.name(),
        r.kernel_tls.name()
    );
    println!(
        "relay: kernel_after_ms {}, hand_overs {}, kernel_tls_legs {}, descriptor_waits {}",
        r.kernel_after_ms, r.hand_overs, r.kernel_tls_legs, r.descriptor_waits
    );
    println!("{}", sockmap_line(r));
    // The counters as the JSON reply names them.
    if let Ok(Value::Object(counters)) = serde_json::to_value(&s.counters) {
        for (name, n) in counters {
            println!("{name}: {n}");
        }
    }
    let ended: Vec<String> = s.ended.iter().filter(|(_, n)| **n > 0).map(|(cause, n)| format!("{} {n}", cause.name())).collect();
    println!("ended: {}", if ended.is_empty() { "none".to_string() } else { ended.join(", ") });
}

/// sockmap's counters, or that its program is not loaded.
fn sockmap_line(r: &BackendsView) -> String {
    // A relay from before `sockmap_loaded` leaves it out (false): there, sockmap stays
    // loaded exactly when a kind of console runs on it.
    if r.sockmap_loaded || r.raw == Choice::Sockmap || r.raw_quiet == Choice::Sockmap {
        format!(
            "relay: sockmap flows {}, sockets {}, resumes {}, wake-ups {}",
            r.sockmap_flows, r.sockmap_sockets, r.sockmap_resumes, r.sockmap_wakeups
        )
    } else {
        "relay: sockmap not loaded".into()
    }
}

fn print_password(p: PasswordChanged) {
    println!("instance {}: console password {}; disconnected {} live console(s)", p.instance, p.password, p.disconnected);
    if let Some(fleet) = &p.fleet {
        println!("fleet: {}", describe(fleet));
    }
}

fn print_reset(r: InstanceReset) {
    println!("instance {}: disconnected {} live console(s) here, revoked {} token(s)", r.instance, r.disconnected, r.revoked);
    if let Some(e) = &r.revoke_error {
        println!("tokens NOT revoked: {e}; run the reset with --revoke again once the store is back");
    }
    println!("fleet: {}", describe(&r.fleet));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `stats` reply's back-ends, as a relay with these choices (and `extra`) sends it.
    fn view(raw: &str, raw_quiet: &str, extra: Value) -> BackendsView {
        let mut v = serde_json::json!({
            "raw": raw, "raw_quiet": raw_quiet, "framed": "copy", "kernel_tls": "copy",
            "kernel_after_ms": 1000, "hand_overs": 3, "sockmap_flows": 2, "sockmap_sockets": 2,
            "kernel_tls_legs": 0,
        });
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn sockmap_counters_show_only_where_its_program_is_loaded() {
        let counters = "relay: sockmap flows 2, sockets 2, resumes 0, wake-ups 0";
        let loaded = serde_json::json!({"sockmap_loaded": true});
        assert_eq!(sockmap_line(&view("uring", "sockmap", loaded.clone())), counters);
        // The field decides, whatever the back-ends' names say.
        assert_eq!(sockmap_line(&view("uring", "uring", loaded)), counters);
        let unloaded = serde_json::json!({"sockmap_loaded": false});
        assert_eq!(sockmap_line(&view("uring", "uring", unloaded)), "relay: sockmap not loaded");
    }

    #[test]
    fn a_relay_from_before_sockmap_loaded_still_shows_its_counters() {
        let old = view("uring", "sockmap", serde_json::json!({}));
        assert!(!old.sockmap_loaded);
        assert_eq!(sockmap_line(&old), "relay: sockmap flows 2, sockets 2, resumes 0, wake-ups 0");
        assert_eq!(sockmap_line(&view("copy", "copy", serde_json::json!({}))), "relay: sockmap not loaded");
    }
}
