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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_chain(&e);
            ExitCode::from(e.exit_code())
        }
    }
}

fn print_chain(err: &CliError) {
    let mut msg = format!("sentinel: {err}");
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    eprintln!("{msg}");
}
