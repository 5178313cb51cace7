//! The `spillway` binary: parses the command line and hands over to the library's
//! [`spillway::cli`], which loads the configuration, starts logging and runs the command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    spillway::cli::main(spillway::cli::Cli::parse())
}
