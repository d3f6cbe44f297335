//! What each top-level command does, kept out of `main.rs`.

use crate::cli::{CtlArgs, RunArgs};
use crate::config::Config;
use crate::{ctl, server, systemd, telemetry};
use std::io::Write as _;
use std::path::Path;

pub fn run(args: RunArgs) -> anyhow::Result<u8> {
    let mut config = load(&args)?;
    telemetry::init(&config.log);
    let asked = config.limits.max_connections;
    config.limits.max_connections = fit_open_files(asked, &config.relay);
    let fitted = config.limits.max_connections;
    // Taken before any thread starts, and before anything else opens a descriptor.
    let activated = systemd::activated()?;
    crate::logsink::start();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.relay.worker_threads > 0 {
        runtime.worker_threads(config.relay.worker_threads);
    }
    let runtime = runtime.enable_all().build()?;
    let served = runtime.block_on(async {
        let signal = server::shutdown_signal()?;
        let shutdown = async {
            signal.await;
            systemd::stopping();
        };
        systemd::spawn_watchdog();
        // SIGHUP reads the same file, with the same command-line overrides.
        let reload: Option<crate::reload::Loader> = args.config.is_some().then(|| {
            let args = args.clone();
            // Fitted as at start, so that an unchanged file reads as unchanged.
            let fit = move |mut c: Config| {
                if c.limits.max_connections == asked {
                    c.limits.max_connections = fitted;
                }
                c
            };
            Box::new(move || load(&args).map(fit)) as crate::reload::Loader
        });
        server::run(
            config,
            server::Start { reload, activated },
            |bound| {
                // One line on stdout for people and scripts; the log has the details.
                println!("relay listening: {bound}");
                let _ = std::io::stdout().flush();
                systemd::ready(&format!("listening: {bound}"));
            },
            shutdown,
        )
        .await
    });
    crate::logsink::flush();
    served?;
    Ok(0)
}

/// The configuration: the file (or the embedded defaults), then the command line.
fn load(args: &RunArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(a) = args.ws_listen {
        config.listen.websocket = a.into();
    }
    if let Some(a) = args.connect_listen {
        config.listen.connect = a.into();
    }
    if let Some(p) = &args.control {
        config.listen.control = Some(p.clone());
    }
    if let Some(w) = &args.web {
        config.listen.web = Some(w.clone());
    }
    if let Some(b) = args.relay {
        config.relay.backend = b;
    }
    if let Some(f) = args.log_format {
        config.log.format = f;
    }
    Ok(config)
}

/// Fits the open-file limit to `max_connections` on the configured back-ends, and says so
/// in the log; returns the connections relay can hold: fewer than asked when the limit is
/// short of their sockets, so that relay refuses connections (503) before it runs out of
/// descriptors.
fn fit_open_files(max_connections: usize, relay: &crate::config::Relay) -> usize {
    use crate::rlimit::{Fitted, Needs, fit};
    let needs = Needs::of(max_connections, relay, crate::relay::uring::descriptors());
    let short_of_extras = |soft: u64| {
        tracing::warn!(
            soft,
            max_connections,
            "the open-file limit holds max_connections' sockets, but not every pipe or duplicate descriptor the kernel back-ends may take: a console short of one waits for it; raise the hard limit (LimitNOFILE=, ulimit -Hn) to avoid that"
        );
    };
    match fit(&needs) {
        Ok(Fitted::Enough { all, soft }) => {
            if !all {
                short_of_extras(soft);
            }
            max_connections
        }
        Ok(Fitted::Raised { from, to, all }) => {
            tracing::info!(from, to, max_connections, "raised the open-file limit to fit max_connections");
            if !all {
                short_of_extras(to);
            }
            max_connections
        }
        Ok(Fitted::Short { soft, hard, needed }) => {
            let connections = needs.fits(soft);
            tracing::warn!(
                soft,
                hard,
                needed,
                max_connections,
                connections,
                "the open-file limit is below what max_connections needs: relay holds `connections` at most and refuses the rest (503); raise the hard limit (LimitNOFILE=, ulimit -Hn) or lower limits.max_connections"
            );
            connections
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not read or raise the open-file limit");
            max_connections
        }
    }
}

pub fn check_config(path: &Path) -> anyhow::Result<u8> {
    let config = Config::load(path)?;
    print!("{}", toml::to_string(&config)?);
    eprintln!("{}: OK", path.display());
    Ok(0)
}

pub fn ctl(args: CtlArgs) -> anyhow::Result<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(runtime.block_on(ctl::run(args)) as u8)
}
