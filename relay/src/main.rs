use clap::Parser;
use relay::cli::{Cli, Command};

/// jemalloc, not glibc's malloc: an idle console's allocations include tokio's
/// 128-byte-aligned ones (a task, two socket registrations), and glibc's aligned
/// allocation leaves scraps around each. Measured at 9,800 idle consoles: 1.8 KiB a
/// console against glibc's 2.2 KiB, with handshakes/s and the farm's latency unchanged
/// (docs/architecture.md, "Limits": what an idle console holds).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => relay::run::run(args),
        Command::CheckConfig { file } => relay::run::check_config(&file),
        Command::Ctl(args) => relay::run::ctl(args),
        Command::Generate { what } => relay::cli::generate(what, &mut std::io::stdout().lock()).map(|()| 0).map_err(Into::into),
    };
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("relay: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
