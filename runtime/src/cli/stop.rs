//! `accordion stop NAME`: graceful stop through the control socket, then make sure nothing is left:
//! the serving process gone and the state directory removed.

use std::time::{Duration, Instant};

use clap::Args;
use nix::sys::signal::Signal;

use crate::control::client::ControlClient;
use crate::control::ControlError;
use crate::sandbox::{self, owner};

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
    // Taken before the stop: once the lock is free, a pid could name any process.
    let serving = owner::owner_pidfd(&dir);
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
    if let Some(pidfd) = serving {
        wait_gone(&dir, &pidfd).await;
    }
    if dir.exists() && !sandbox::remove_if_stale(&dir) && dir.exists() {
        eprintln!(
            "accordion stop: cannot remove {}: its owner still runs, or something is mounted in it",
            dir.display()
        );
        return 1;
    }
    println!("{}", args.name);
    0
}

/// Waits for the sandbox's owner to exit; kills it (through its pidfd, never a bare pid) when it
/// does not.
async fn wait_gone(dir: &std::path::Path, pidfd: &crate::pidfd::PidFd) {
    let deadline = Instant::now() + EXIT_WAIT;
    while !pidfd.exited().unwrap_or(true) {
        if Instant::now() >= deadline {
            eprintln!(
                "accordion stop: the owner of {} did not exit; killing it",
                dir.display()
            );
            let _ = pidfd.send_signal(Signal::SIGKILL);
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
