//! `accordion stop NAME`: graceful stop through the control socket, then make sure nothing is left:
//! the serving process gone and the state directory removed.

use std::time::{Duration, Instant};

use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::control::client::ControlClient;
use crate::control::ControlError;
use crate::sandbox;

#[derive(Args, Debug)]
pub struct StopArgs {
    /// The sandbox.
    pub name: String,
    /// Seconds the guest may take to power off before the VM is forced down.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

/// How long the serving process may take to exit after answering Stop.
const EXIT_WAIT: Duration = Duration::from_secs(10);

pub async fn run(args: StopArgs) -> i32 {
    let dir = sandbox::state_dir(&args.name);
    let recorded = sandbox::recorded_pid(&dir);
    match ControlClient::connect_to(&args.name).await {
        Err(ControlError::NoSandbox(_)) => {
            eprintln!(
                "accordion stop: {}",
                ControlError::NoSandbox(args.name.clone())
            );
            return 1;
        }
        Ok(client) => {
            if let Err(e) = client.stop(Duration::from_secs(args.timeout)).await {
                eprintln!("accordion stop: {} (forcing it)", super::error_chain(&e));
            }
        }
        Err(e) => eprintln!(
            "accordion stop: {}; removing what it left",
            super::error_chain(&e)
        ),
    }
    if let Some(pid) = recorded.filter(|&p| p != std::process::id()) {
        wait_gone(pid).await;
    }
    if dir.exists() && !accordion_share::remove_dir_unless_mounted(&dir) {
        eprintln!(
            "accordion stop: cannot remove {} (something is mounted in it, or see the log)",
            dir.display()
        );
        return 1;
    }
    println!("{}", args.name);
    0
}

/// Waits for the sandbox's process to exit; kills it when it does not.
async fn wait_gone(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    let deadline = Instant::now() + EXIT_WAIT;
    while sandbox::pid_is_ours(pid) {
        if Instant::now() >= deadline {
            eprintln!("accordion stop: process {pid} did not exit; killing it");
            let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
