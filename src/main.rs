//! The `outrider` binary: parses the command line and maps errors to exit
//! codes. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use outrider::cli::{self, Cli, EXIT_BAD_INPUT, UsageError};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() {
                EXIT_BAD_INPUT
            } else {
                0
            };
            let _ = error.print();
            return ExitCode::from(code);
        }
    };
    match cli::run(cli) {
        Ok(code) => code,
        Err(error) => match error.downcast_ref::<UsageError>() {
            Some(usage) => {
                eprintln!("outrider: {usage}");
                ExitCode::from(usage.exit_code())
            }
            None => {
                eprintln!("outrider: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}
