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
    after_help = "Exit codes: 0 ok, 1 verification failed or request refused, 64 bad configuration, \
                  66 input file unreadable, 69 agent not running, 70 runtime failure."
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
    /// Show the running agent's state: hub link, slots, workers, last rollback, disk use.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the models on this device.
    Models {
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Roll MODEL back to its warm standby now (or abort its canary), and tell the hub.
    Rollback {
        model: String,
        #[command(flatten)]
        target: Target,
    },
    /// Verify a model file against its signed manifest, offline (exit 0 ok, 1 failed).
    /// Print a shell completion script: `sentinel-agent completions bash > /etc/bash_completion.d/sentinel-agent`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    Verify {
        file: PathBuf,
        /// The signed manifest: the hub's JSON (`GET .../versions/{v}/manifest`) or protobuf bytes.
        #[arg(long)]
        manifest: PathBuf,
        /// Trust these base64 hub keys instead of the config's pinned keys.
        #[arg(long = "key", value_name = "BASE64")]
        keys: Vec<String>,
        #[arg(long, default_value = DEFAULT_CONFIG, conflicts_with = "keys")]
        config: PathBuf,
    },
}

/// Which running agent to talk to.
#[derive(Debug, clap::Args)]
struct Target {
    /// The agent's configuration; its `runtime_dir` holds the control socket.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// The control socket itself (instead of finding it through --config).
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> Result<PathBuf, ExitCode> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        AgentConfig::load(&self.config, &env_map()).map(|c| c.control_socket()).map_err(|e| {
            eprintln!("sentinel-agent: {}: {e}", self.config.display());
            ExitCode::from(64)
        })
    }
}

/// Prints a command's outcome: the text on stdout, or the error chain on stderr with its exit code.
fn finish(result: Result<String, sentinel_agent::cli::ClientError>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sentinel-agent: {}", sentinel_agent::error_chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

fn json_text(v: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(v).map(|s| s + "\n").unwrap_or_default()
}

fn verify(file: &std::path::Path, manifest: &std::path::Path, keys: &[String], config: &std::path::Path) -> ExitCode {
    let trusted = if keys.is_empty() {
        match AgentConfig::load(config, &env_map()) {
            Ok(c) => c.trusted,
            Err(e) => {
                eprintln!("sentinel-agent: {}: {e}", config.display());
                return ExitCode::from(64);
            }
        }
    } else {
        let mut t = sentinel_proto::TrustedKeys::new();
        for (i, k) in keys.iter().enumerate() {
            if let Err(e) = t.add_base64(k) {
                eprintln!("sentinel-agent: --key #{}: {e}", i + 1);
                return ExitCode::from(64);
            }
        }
        t
    };
    match sentinel_agent::verify::verify_file(file, manifest, &trusted) {
        Ok(m) => {
            println!(
                "{}: ok: {} {}, {} bytes, sha256 {}, signed by key {}",
                file.display(),
                m.name,
                m.version,
                m.size,
                m.sha256,
                m.key_id
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let chain = sentinel_agent::error_chain(&e);
            if e.is_unreadable() {
                eprintln!("sentinel-agent: {chain}");
                return ExitCode::from(66);
            }
            eprintln!("{}: verification FAILED: {chain}", file.display());
            ExitCode::from(1)
        }
    }
}

/// The environment the configuration reads: `SENTINEL_AGENT_*` overrides
/// and systemd's `RUNTIME_DIRECTORY`.
fn env_map() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("SENTINEL_AGENT_")
                || k == "RUNTIME_DIRECTORY"
                || k == sentinel_worker_protocol::launch::ORT_DYLIB_ENV
        })
        .collect()
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
    let now = sentinel_agent::now_ms;
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "sentinel-agent",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Status { target, json } => match target.socket() {
            Ok(socket) => finish(
                sentinel_agent::cli::fetch_status(&socket)
                    .map(|s| if json { json_text(&s) } else { sentinel_agent::cli::render_status(&s, now()) }),
            ),
            Err(code) => code,
        },
        Command::Models { target, json } => match target.socket() {
            Ok(socket) => finish(
                sentinel_agent::cli::fetch_models(&socket)
                    .map(|m| if json { json_text(&m) } else { sentinel_agent::cli::render_models(&m) }),
            ),
            Err(code) => code,
        },
        Command::Rollback { model, target } => match target.socket() {
            Ok(socket) => finish(sentinel_agent::cli::rollback(&socket, &model).map(|m| m + "\n")),
            Err(code) => code,
        },
        Command::Verify { file, manifest, keys, config } => verify(&file, &manifest, &keys, &config),
        Command::CheckConfig { config } => match AgentConfig::load(&config, &env_map()) {
            Ok(c) => {
                let publishers = if c.publishers.is_empty() {
                    "no pinned publishers: the hub's signature suffices".to_owned()
                } else {
                    let names: Vec<&str> = c.publishers.iter().map(|p| p.name.as_str()).collect();
                    format!("models must be signed by a pinned publisher: {}", names.join(", "))
                };
                println!(
                    "{}: ok (device {}, hub {}, {} pinned hub keys; {publishers})",
                    config.display(),
                    c.device_id,
                    c.grpc_url(),
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
            // Before the config, which fits the connection cap to this limit.
            sentinel_net::raise_fd_limit();
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
                        eprintln!("sentinel-agent: {}", sentinel_agent::error_chain(&e));
                        return ExitCode::from(70);
                    }
                };
                let api = handle.inference_addr.map(|a| format!("; inference API on http://{a}")).unwrap_or_default();
                let metrics =
                    handle.metrics_addr.map(|a| format!("; metrics on http://{a}/metrics")).unwrap_or_default();
                println!(
                    "sentinel-agent {} running{api}{metrics}; control socket {}",
                    env!("CARGO_PKG_VERSION"),
                    handle.control_socket.display()
                );
                // systemd (Type=notify): ready once slots are restored and the API is bound.
                if let Err(e) = sentinel_agent::notify::ready() {
                    tracing::warn!(error = %e, "sd_notify READY failed");
                }
                // STATUS= for `systemctl status`, whenever the line changes.
                let status = tokio::spawn({
                    let mut view = handle.subscribe();
                    async move {
                        let mut last = String::new();
                        loop {
                            let line = view.borrow_and_update().status_line();
                            if line != last {
                                let _ = sentinel_agent::notify::status(&line);
                                last = line;
                            }
                            if view.changed().await.is_err() {
                                break;
                            }
                        }
                    }
                });
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
                status.abort();
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
