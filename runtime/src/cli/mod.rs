//! The `accordion` operator CLI.

use std::future::Future;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod acpi_dump;
mod check;
mod exec;
mod install;
mod metrics;
mod ps;
mod resize;
mod run;
mod status;
mod stop;

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
    /// Boot a sandbox and run a command in it (exit with its status), or start one detached (-d).
    Run(run::RunArgs),
    /// Run a command in a running sandbox; exits with its status.
    Exec(exec::ExecArgs),
    /// List sandboxes.
    Ps,
    /// Every sandbox on this host as Prometheus metrics (printed, or served with --listen).
    Metrics(metrics::MetricsArgs),
    /// Change a running sandbox's vCPUs (ACPI hotplug); returns once the guest has them online.
    Resize(resize::ResizeArgs),
    /// Show a sandbox: state, vCPUs, memory, uptime, agent, boot timings.
    Status(status::StatusArgs),
    /// Stop a sandbox (graceful, forced after a timeout) and remove everything it left.
    Stop(stop::StopArgs),
    /// Install Accordion on this node: binaries and guest assets in /opt/accordion, its config,
    /// the runtime in containerd's config, containerd restarted, the node labelled.
    Install(crate::install::InstallArgs),
    /// Undo `accordion install`: every file it added removed, containerd's config restored.
    Uninstall(crate::install::UninstallArgs),
    /// Write the ACPI tables of a VM shape to a directory (for iasl/acpiexec); needs no KVM.
    AcpiDump(acpi_dump::AcpiDumpArgs),
}

/// Runs the CLI; returns the process exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.cmd {
        Command::Check => check::run(),
        Command::Run(args) => run::run(args),
        Command::Exec(args) => block_on("exec", exec::run(args)),
        Command::Ps => block_on("ps", ps::run()),
        Command::Metrics(args) => block_on("metrics", metrics::run(args)),
        Command::Resize(args) => block_on("resize", resize::run(args)),
        Command::Status(args) => block_on("status", status::run(args)),
        Command::Stop(args) => block_on("stop", stop::run(args)),
        Command::AcpiDump(args) => acpi_dump::run(&args),
        Command::Install(args) => install::run(args),
        Command::Uninstall(args) => install::uninstall(args),
    }
}

pub use crate::error_chain;

/// Runs `main` on a fresh tokio runtime and returns its exit code. The runtime is left behind
/// without waiting: a read of our stdin blocked in a worker thread would otherwise keep the
/// process alive after the command ended.
fn block_on(command: &str, main: impl Future<Output = i32>) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("accordion {command}: cannot start the async runtime: {e}");
            return 125;
        }
    };
    let code = runtime.block_on(main);
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

/// The environment commands run with in the guest unless told otherwise.
fn default_env() -> Vec<String> {
    vec![
        "PATH=/bin:/sbin:/usr/bin:/usr/sbin".into(),
        "HOME=/root".into(),
    ]
}

/// Milliseconds, for humans.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
