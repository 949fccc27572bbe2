//! `sentinel-agent`: the device side. Parses arguments and hands over to
//! [`sentinel_agent`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sentinel_agent::AgentConfig;
use sentinel_agent::config::DEFAULT_CONFIG;

/// Sentinel's device agent.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Exit codes: 0 ok, 1 verification failed, 64 bad configuration, 70 runtime failure."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate the configuration and exit.
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

fn env_map() -> BTreeMap<String, String> {
    std::env::vars().filter(|(k, _)| k.starts_with("SENTINEL_AGENT_")).collect()
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::CheckConfig { config } => match AgentConfig::load(&config, &env_map()) {
            Ok(c) => {
                println!(
                    "{}: ok (device {}, hub {}, {} pinned keys)",
                    config.display(),
                    c.device_id,
                    c.grpc_url,
                    c.trusted.key_ids().count()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sentinel-agent: {}: {e}", config.display());
                ExitCode::from(64)
            }
        },
        Command::Run { config } => {
            let cfg = match AgentConfig::load(&config, &env_map()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("sentinel-agent: {}: {e}", config.display());
                    return ExitCode::from(64);
                }
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("sentinel-agent: cannot start the runtime: {e}");
                    return ExitCode::from(70);
                }
            };
            rt.block_on(async {
                let handle = match sentinel_agent::start(cfg).await {
                    Ok(h) => h,
                    Err(e) => {
                        eprintln!("sentinel-agent: {}", sentinel_agent::sync::error_chain(&e));
                        return ExitCode::from(70);
                    }
                };
                match handle.inference_addr {
                    Some(addr) => {
                        println!("sentinel-agent {} running; inference API on http://{addr}", env!("CARGO_PKG_VERSION"))
                    }
                    None => println!("sentinel-agent {} running", env!("CARGO_PKG_VERSION")),
                }
                // systemd (Type=notify): ready once slots are restored and the API is bound.
                if let Err(e) = sentinel_agent::notify::ready() {
                    tracing::warn!(error = %e, "sd_notify READY failed");
                }
                let watchdog = sentinel_agent::notify::watchdog_interval().map(|every| {
                    tokio::spawn(async move {
                        let mut tick = tokio::time::interval(every / 2);
                        loop {
                            tick.tick().await;
                            let _ = sentinel_agent::notify::watchdog_ping();
                        }
                    })
                });
                shutdown_signal().await;
                let _ = sentinel_agent::notify::stopping();
                if let Some(w) = watchdog {
                    w.abort();
                }
                handle.shutdown().await;
                ExitCode::SUCCESS
            })
        }
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}
