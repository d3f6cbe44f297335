//! The command line: `relay run`, `relay check-config`, `relay ctl ...`.

use crate::config::{Backend, LogFormat};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "relay", version, about = "Console proxy for cloud VMs: noVNC/WebSocket and CONNECT doors to hypervisor VNC servers")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the appliance (embedded defaults unless --config is given).
    Run(RunArgs),
    /// Check a configuration file and print the effective configuration.
    CheckConfig { file: PathBuf },
    /// Talk to a running relay over its control socket.
    Ctl(CtlArgs),
    /// Print the man page (roff) or a shell's completions, for packaging.
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        what: Generated,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Generated {
    Man,
    Bash,
    Zsh,
    Fish,
}

/// Writes what `generate` asks for to `out`.
pub fn generate(what: Generated, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let shell = match what {
        Generated::Man => return clap_mangen::Man::new(cmd).render(out),
        Generated::Bash => clap_complete::Shell::Bash,
        Generated::Zsh => clap_complete::Shell::Zsh,
        Generated::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "relay", out);
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// WebSocket door and web client, e.g. 0.0.0.0:6080.
    #[arg(long)]
    pub ws_listen: Option<SocketAddr>,
    /// CONNECT door for native viewers, e.g. 0.0.0.0:6081.
    #[arg(long)]
    pub connect_listen: Option<SocketAddr>,
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// A noVNC checkout to serve (e.g. /usr/share/novnc).
    #[arg(long)]
    pub web: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Back-end for established consoles (config: relay.backend).
    #[arg(long, value_enum)]
    pub relay: Option<Backend>,
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The control socket (default: as `relay run` picks it).
    #[arg(long, global = true)]
    pub control: Option<PathBuf>,
    /// Print the reply as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Console tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Live consoles.
    Sessions {
        #[arg(long)]
        instance: Option<String>,
        /// Every appliance's consoles (redis store), not just this one's.
        #[arg(long)]
        cluster: bool,
    },
    /// The appliances sharing this one's store, from their heartbeats.
    Cluster,
    /// Counters.
    Stats,
    /// Per-instance operations.
    #[command(subcommand)]
    Instance(InstanceCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue a console token for an instance's VNC server.
    Create {
        #[arg(long)]
        instance: String,
        /// The hypervisor's VNC host.
        #[arg(long)]
        host: String,
        #[arg(long)]
        port: u16,
        /// Seconds until it expires (default from the configuration).
        #[arg(long)]
        ttl: Option<u64>,
        /// Seconds it may go unused before it lapses.
        #[arg(long)]
        idle_timeout: Option<u64>,
        /// Sent as `CONNECT <path> HTTP/1.1` to the hypervisor before RFB.
        #[arg(long)]
        internal_access_path: Option<String>,
        /// The token opens one console, once.
        #[arg(long)]
        single_use: bool,
        /// The console kind: `vnc` opens at either door, nova's `novnc` at the WebSocket door only, `xvpvnc` at the CONNECT door only.
        #[arg(long, default_value = "vnc")]
        console: String,
        /// The hypervisor's VNC password for this console, read from a file (`-`: stdin).
        #[arg(long, value_name = "FILE", conflicts_with = "hypervisor_password")]
        hypervisor_password_file: Option<PathBuf>,
        /// The same on the command line, where `ps` shows it to every user: prefer
        /// --hypervisor-password-file.
        #[arg(long, allow_hyphen_values = true)]
        hypervisor_password: Option<String>,
        /// Also set the instance's console password, which viewers must give, read from a
        /// file (`-`: stdin).
        #[arg(long, value_name = "FILE", conflicts_with = "password")]
        password_file: Option<PathBuf>,
        /// The same on the command line, where `ps` shows it to every user: prefer
        /// --password-file.
        #[arg(long, allow_hyphen_values = true)]
        password: Option<String>,
    },
    /// Is the token valid, and what does it open?
    Check {
        #[command(flatten)]
        token: TokenArg,
    },
    /// Mark the token as in use now.
    Touch {
        #[command(flatten)]
        token: TokenArg,
    },
    /// Delete the token.
    Delete {
        #[command(flatten)]
        token: TokenArg,
    },
    /// Sign a token for the `jwt` source, here, with a key file (no control socket).
    Sign {
        /// HS256: the secret; RS256, ES256, EdDSA: the private key (PEM).
        #[arg(long)]
        key: PathBuf,
        #[arg(long, value_enum, ignore_case = true)]
        algorithm: crate::config::JwtAlgorithm,
        #[arg(long)]
        kid: Option<String>,
        #[arg(long)]
        instance: String,
        #[arg(long)]
        host: String,
        #[arg(long)]
        port: u16,
        /// Seconds until it expires.
        #[arg(long, default_value_t = 600)]
        ttl: u64,
        #[arg(long)]
        internal_access_path: Option<String>,
        /// Give it a random `jti`: it opens one console.
        #[arg(long)]
        single_use: bool,
    },
    /// Tokens of an instance or of a hypervisor host.
    List {
        #[arg(long, conflicts_with = "host")]
        instance: Option<String>,
        #[arg(long)]
        host: Option<String>,
    },
}

/// A token to act on.
#[derive(Debug, clap::Args)]
pub struct TokenArg {
    /// The token; `-` or nothing reads it from stdin. On the command line, `ps` shows it
    /// to every user of the machine while the command runs.
    // A token may begin with `-` (one in 64 of relay's own does): it is the token, not an
    // option.
    #[arg(allow_hyphen_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// The console password viewers must give.
    #[command(subcommand)]
    Password(PasswordCommand),
    /// End every live console of the instance, on every door.
    Reset {
        id: String,
        /// Also delete the instance's tokens.
        #[arg(long)]
        revoke: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PasswordCommand {
    /// Set (or reset) the instance's console password: at most 8 printable ASCII characters.
    Set {
        id: String,
        /// The password, read from a file (`-`: stdin).
        #[arg(long, value_name = "FILE", required_unless_present = "password", conflicts_with = "password")]
        password_file: Option<PathBuf>,
        /// The password on the command line, where `ps` shows it to every user: prefer
        /// --password-file.
        #[arg(long, allow_hyphen_values = true)]
        password: Option<String>,
        /// End the instance's live consoles, so everyone must give the new password.
        #[arg(long)]
        disconnect: bool,
    },
    /// Remove the console password.
    Clear {
        id: String,
        #[arg(long)]
        disconnect: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_of(args: &[&str]) -> (Option<String>, bool) {
        let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let Command::Ctl(ctl) = cli.command else { panic!("not ctl") };
        let CtlCommand::Token(TokenCommand::Check { token }) = ctl.command else { panic!("not token check") };
        (token.token, ctl.json)
    }

    #[test]
    fn a_token_that_begins_with_a_hyphen_is_the_token() {
        let t = "-3AZec1mVB3wmgjJA9ffceGADMrwI72FYE0dUiU3KAY";
        assert_eq!(token_of(&["relay", "ctl", "token", "check", t, "--json"]), (Some(t.to_string()), true));
        assert_eq!(token_of(&["relay", "ctl", "token", "check", "--json", t]), (Some(t.to_string()), true));
        // Options still are options, and no token still means stdin.
        assert_eq!(token_of(&["relay", "ctl", "token", "check", "--json"]), (None, true));
        assert_eq!(token_of(&["relay", "ctl", "token", "check", "-"]), (Some("-".to_string()), false));
    }

    #[test]
    fn a_password_that_begins_with_a_hyphen_is_the_password() {
        let args = ["relay", "ctl", "instance", "password", "set", "i-1", "--password", "-x1", "--disconnect"];
        let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{e}"));
        let Command::Ctl(CtlArgs {
            command: CtlCommand::Instance(InstanceCommand::Password(PasswordCommand::Set { password, disconnect, .. })),
            ..
        }) = cli.command
        else {
            panic!("not password set")
        };
        assert_eq!((password.as_deref(), disconnect), (Some("-x1"), true));
        // The same for the passwords a token is created with.
        let args = ["relay", "ctl", "token", "create", "--instance", "i-1", "--host", "h", "--port", "5900"];
        let cli = Cli::try_parse_from(args.iter().chain(&["--password", "-x2", "--hypervisor-password", "-x3"]))
            .unwrap_or_else(|e| panic!("{e}"));
        let Command::Ctl(CtlArgs { command: CtlCommand::Token(TokenCommand::Create { password, hypervisor_password, .. }), .. }) =
            cli.command
        else {
            panic!("not token create")
        };
        assert_eq!((password.as_deref(), hypervisor_password.as_deref()), (Some("-x2"), Some("-x3")));
    }
}
