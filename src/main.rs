//! The `vibeoffload` binary: parses arguments, runs the command, prints what it returns, and
//! picks the exit status: 0 ok, 1 failure, 2 bad command line (clap's errors and
//! [`vibeoffload::UsageError`]), 3 slower than a bench baseline.

mod cli;

use clap::Parser;
use cli::args::{BenchCommand, Cli, Command};
use cli::commands::{self, Output};
use cli::progress::Verbosity;
use std::io::Write;
use std::process::ExitCode;
use vibeoffload::measure::Regression;
use vibeoffload::UsageError;

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(cli::args()) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    Verbosity::from_flags(cli.quiet, cli.verbose).set();
    if let Err(e) = vibeoffload::output::guard_process() {
        eprintln!("warning: {e:#}");
    }
    let result = match cli.command {
        Some(Command::Table(a)) => commands::table(a),
        Some(Command::Auto(a)) => commands::auto(a),
        Some(Command::Inspect(a)) => commands::inspect(a),
        Some(Command::Synth(a)) => commands::synth(a),
        Some(Command::Convert(a)) => commands::convert(a),
        Some(Command::Run(a)) => commands::run(a),
        Some(Command::Generate(a)) => commands::generate(a),
        Some(Command::Completions(a)) => commands::completions(a.shell),
        Some(Command::Man) => commands::man(),
        Some(Command::Bench(a)) => match &a.compare {
            Some(BenchCommand::Compare(c)) => commands::bench_compare(c),
            None => commands::bench(a),
        },
        None => commands::legacy(cli.legacy),
    };
    let failure = match result {
        Ok(Output { stdout, failure }) => match print(&stdout) {
            Ok(()) => failure,
            Err(e) => Some(e.into()),
        },
        Err(e) => Some(e),
    };
    match failure {
        None => ExitCode::SUCCESS,
        Some(e) => {
            eprintln!("error: {e:#}");
            if e.chain().any(|c| c.is::<UsageError>()) {
                ExitCode::from(2)
            } else if e.chain().any(|c| c.is::<Regression>()) {
                ExitCode::from(3)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Writes `text` to stdout; a closed pipe (`| head`) is not an error.
fn print(text: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
