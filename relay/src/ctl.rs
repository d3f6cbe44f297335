//! `relay ctl`: turns command-line arguments into control requests and prints replies.

use crate::auth::Secret;
use crate::auth::{NewToken, Target};
use crate::cli::{CtlArgs, CtlCommand, InstanceCommand, PasswordCommand, TokenCommand};
use crate::config::default_control_path;
use crate::control::client::request;
use crate::control::proto::{Envelope, Request};
use serde_json::Value;

/// Runs one ctl command; returns the process exit code.
pub async fn run(args: CtlArgs) -> i32 {
    let path = args.control.clone().unwrap_or_else(default_control_path);
    let req = to_request(args.command);
    let human = human_printer(&req);
    match request(&path, &Envelope::new(req)).await {
        Ok(reply) => {
            if args.json {
                println!("{reply}");
            } else {
                human(&reply);
            }
            // A token that does not check out is a failure for scripts too.
            if reply.get("valid") == Some(&Value::Bool(false)) { 1 } else { 0 }
        }
        Err(e) => {
            eprintln!("relay ctl: {e}");
            2
        }
    }
}

fn to_request(command: CtlCommand) -> Request {
    match command {
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
                hypervisor_password,
                password,
            } => Request::TokenCreate(NewToken {
                instance,
                console,
                target: Target { host, port, internal_access_path },
                ttl,
                idle_timeout,
                single_use,
                hypervisor_schemes: None,
                hypervisor_password: hypervisor_password.map(Secret),
                password: password.map(Secret),
            }),
            TokenCommand::Check { token } => Request::TokenCheck { token },
            TokenCommand::Touch { token } => Request::TokenTouch { token },
            TokenCommand::Delete { token } => Request::TokenDelete { token },
            TokenCommand::List { instance, host } => Request::TokenList { instance, host },
        },
        CtlCommand::Sessions { instance } => Request::Sessions { instance },
        CtlCommand::Stats => Request::Stats,
        CtlCommand::Instance(InstanceCommand::Reset { id, revoke }) => Request::InstanceReset { instance: id, revoke },
        CtlCommand::Instance(InstanceCommand::Password(PasswordCommand::Set { id, password, disconnect })) => {
            Request::InstancePasswordSet { instance: id, password: Secret(password), disconnect }
        }
        CtlCommand::Instance(InstanceCommand::Password(PasswordCommand::Clear { id, disconnect })) => {
            Request::InstancePasswordClear { instance: id, disconnect }
        }
    }
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
}

fn n(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn human_printer(req: &Request) -> fn(&Value) {
    match req {
        Request::TokenCreate(_) => |v| {
            println!("{:<10} {}", "token", s(v, "token"));
            println!("{:<10} {}", "id", s(v, "id"));
            println!("{:<10} {} (unix time)", "expires", n(v, "expires"));
            if let Some(urls) = v.get("urls").and_then(Value::as_object) {
                for (door, url) in urls {
                    if let Some(url) = url.as_str() {
                        println!("{door:<10} {url}");
                    }
                }
            }
        },
        Request::TokenCheck { .. } => |v| match v.get("token") {
            Some(t) => println!(
                "valid: instance {} -> {}:{}, expires {} (unix time)",
                s(t, "instance"),
                s(t, "host"),
                n(t, "port"),
                n(t, "expires")
            ),
            None => println!("invalid: {}", s(v, "message")),
        },
        Request::TokenTouch { .. } => |_| println!("touched"),
        Request::TokenDelete { .. } => |_| println!("deleted"),
        Request::TokenList { .. } => |v| {
            println!("{:<13} {:<24} {:<28} {:>11} FLAGS", "ID", "INSTANCE", "TARGET", "EXPIRES");
            for t in v.get("tokens").and_then(Value::as_array).into_iter().flatten() {
                let target = format!("{}:{}", s(t, "host"), n(t, "port"));
                let flags = if t.get("single_use") == Some(&Value::Bool(true)) { "single-use" } else { "" };
                println!("{:<13} {:<24} {:<28} {:>11} {}", s(t, "id"), s(t, "instance"), target, n(t, "expires"), flags);
            }
        },
        Request::Sessions { .. } => |v| {
            println!(
                "{:>6} {:<24} {:<10} {:<22} {:<22} {:>12} {:>12}",
                "ID", "INSTANCE", "DOOR", "VIEWER", "HYPERVISOR", "TO-HV", "TO-VIEWER"
            );
            for x in v.get("sessions").and_then(Value::as_array).into_iter().flatten() {
                println!(
                    "{:>6} {:<24} {:<10} {:<22} {:<22} {:>12} {:>12}",
                    n(x, "id"),
                    s(x, "instance"),
                    s(x, "door"),
                    s(x, "viewer"),
                    s(x, "hypervisor"),
                    n(x, "bytes_to_hypervisor"),
                    n(x, "bytes_to_viewer")
                );
            }
        },
        Request::Stats => |v| {
            println!("sessions_active: {}", n(v, "sessions_active"));
            println!("tokens: {}", n(v, "tokens"));
            for (k, c) in v.get("counters").and_then(Value::as_object).into_iter().flatten() {
                println!("{k}: {c}");
            }
        },
        Request::InstancePasswordSet { .. } | Request::InstancePasswordClear { .. } => |v| {
            println!(
                "instance {}: console password {}; disconnected {} live console(s)",
                s(v, "instance"),
                s(v, "password"),
                n(v, "disconnected")
            );
        },
        Request::InstanceReset { .. } => |v| {
            println!(
                "instance {}: disconnected {} live console(s), revoked {} token(s)",
                s(v, "instance"),
                n(v, "disconnected"),
                n(v, "revoked")
            );
        },
    }
}
