//! The `accordion` operator CLI.

use clap::{Parser, Subcommand};

mod check;

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
}

/// Runs the CLI; returns the process exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.cmd {
        Command::Check => check::run(),
    }
}
