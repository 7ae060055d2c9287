//! `accordion ps`: every sandbox under the run root, asked through its control socket.

use std::time::Duration;

use crate::control::client::ControlClient;
use crate::sandbox::{self, owner};

/// Per-sandbox limit, so one hung sandbox does not hang the listing.
const PER_SANDBOX: Duration = Duration::from_secs(5);

pub async fn run() -> i32 {
    let names = match sandbox::names() {
        Ok(names) => names,
        Err(e) => {
            eprintln!(
                "accordion ps: cannot read {}: {e}",
                sandbox::run_root().display()
            );
            return 1;
        }
    };
    println!(
        "{:<24} {:<13} {:>6} {:>9} {:>10} {:>8}",
        "NAME", "STATE", "VCPUS", "MEMORY", "UPTIME", "PID"
    );
    for name in names {
        match ControlClient::status_within(&name, PER_SANDBOX).await {
            Some(s) => println!(
                "{:<24} {:<13} {:>6} {:>8}M {:>9.1}s {:>8}",
                s.name,
                s.state,
                format!("{}/{}", s.guest_cpus_online_count, s.max_vcpus),
                s.memory_configured_bytes >> 20,
                s.uptime_ms as f64 / 1e3,
                s.pid
            ),
            _ => {
                let dir = sandbox::state_dir(&name);
                let state = match owner::owner(&dir) {
                    owner::Owner::Alive => "unreachable",
                    owner::Owner::Gone => "stale",
                    owner::Owner::Starting => "starting",
                };
                let pid = owner::recorded_pid(&dir).map_or("-".into(), |p| p.to_string());
                println!(
                    "{name:<24} {state:<13} {:>6} {:>9} {:>10} {pid:>8}",
                    "-", "-", "-"
                );
            }
        }
    }
    0
}
