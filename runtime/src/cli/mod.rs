//! The `accordion` operator CLI.

use clap::{Parser, Subcommand};

mod acpi_dump;
mod check;
mod run;

#[derive(Parser)]
#[command(
    name = "accordion",
    version,
    about = "Accordion: elastic ARM64 KVM microVMs for containers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Check that this host's KVM can run Accordion (PSCI 0.2, 128 vCPUs, GICv3, SMCCC filter).
    Check,
    /// Boot a sandbox, run a command in it, print its output and exit with its status.
    Run(run::RunArgs),
    /// Write the ACPI tables of a VM shape to a directory (for iasl/acpiexec); needs no KVM.
    AcpiDump(acpi_dump::AcpiDumpArgs),
}

/// Runs the CLI; returns the process exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.cmd {
        Command::Check => check::run(),
        Command::Run(args) => run::run(args),
        Command::AcpiDump(args) => acpi_dump::run(&args),
    }
}

/// An error and its sources on one line: "outer: inner: innermost".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}
