//! `herald`: one binary, four roles (`broker`, `ws`, `http`, `standalone`).
//!
//! Standard output carries one `herald: <kind> listening on <addr>` line per
//! listener (so scripts can start herald on port 0); logs go to standard
//! error. SIGINT/SIGTERM start a graceful shutdown; a second one exits at once.

mod admin;
mod cli;
mod config;
mod roles;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, LogFormat, Role};

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("herald: error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.role)) {
        Ok(()) => ExitCode::SUCCESS,
        // Printed once, plainly: not also as a log line.
        Err(e) => {
            eprintln!("herald: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the command line, with the defaults of the config file if one is named.
fn parse_cli() -> Result<Cli, config::ConfigError> {
    let args: Vec<OsString> = std::env::args_os().collect();
    let mut command = Cli::command();
    let mut file = None;
    if let Some(path) = config::path_from(&args) {
        let (with_file, values) = config::apply_file(command, &path)?;
        command = with_file;
        file = Some(values);
    }
    let matches = match command.try_get_matches_from(args) {
        Ok(matches) => matches,
        // A bad value from the file is named by its file, table and key,
        // not as the flag it stands in for.
        Err(e) => match file.as_ref().and_then(|f| f.explain(&e)) {
            Some(explained) => return Err(explained),
            None => e.exit(),
        },
    };
    Ok(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

async fn run(role: Role) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    match role {
        Role::Broker(args) => roles::broker(args, shutdown).await,
        Role::Ws(args) => roles::ws(args, shutdown).await,
        Role::Http(args) => roles::http(args, shutdown).await,
        Role::Standalone(args) => roles::standalone(*args, shutdown).await,
    }
}

/// The log filter when `RUST_LOG` is unset: herald's own lines at info, and
/// the NATS client's only when they are errors (herald logs the connection's
/// life itself, once).
const DEFAULT_LOG_FILTER: &str = "info,async_nats=error";

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM; exits on the second.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::warn!("cannot install signal handlers; stop herald with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}
