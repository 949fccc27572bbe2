//! `sentinel`: the command-line client. Parses arguments and hands over to
//! [`sentinel_hub::cli`].

use std::process::ExitCode;

use clap::Parser;
use sentinel_hub::cli::{Cli, CliError, run};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sentinel: cannot start the async runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let json = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = sentinel_hub::error_chain(&e);
            if json {
                // With --json, the error is JSON too, on stderr, with the same exit code.
                let status = match &e {
                    CliError::Hub { status, .. } => Some(*status),
                    _ => None,
                };
                let body = serde_json::json!({"error": {"message": message, "exit_code": e.exit_code(), "hub_status": status}});
                eprintln!("{body}");
            } else {
                eprintln!("sentinel: {message}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
