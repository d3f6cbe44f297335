use clap::Parser;
use relay::cli::{Cli, Command};

/// jemalloc: why, in `relay::heap`.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: relay::heap::Allocator = relay::heap::Allocator;

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
