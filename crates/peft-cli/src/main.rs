//! The `peft` binary: parses the command line and runs [`peft_cli::run`].

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // SAFETY: first thing in main: no other thread exists yet.
    let _ = unsafe { peft_models::runtime::tune_process() };
    let cli = peft_cli::Cli::parse();
    match peft_cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `peft inspect … | head` closes stdout early: that is not a failure.
        Err(e) if peft_cli::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", peft_cli::error_report(&e));
            ExitCode::from(1)
        }
    }
}
