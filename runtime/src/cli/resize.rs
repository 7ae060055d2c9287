//! `accordion resize NAME --vcpus N` / `--memory SIZE`: change a running sandbox's vCPUs or
//! memory; returns once the guest reports exactly N CPUs online, or the memory plugged.

use std::time::Duration;

use clap::Args;

use crate::control::client::ControlClient;

#[derive(Args, Debug)]
pub struct ResizeArgs {
    /// The sandbox.
    pub name: String,
    /// vCPUs wanted (1 to the sandbox's max vCPUs).
    #[arg(long, required_unless_present = "memory", conflicts_with = "memory")]
    pub vcpus: Option<u32>,
    /// Guest memory wanted, e.g. 1G (the sandbox's boot memory to its --max-memory).
    #[arg(long, value_parser = super::run::parse_size_mib)]
    pub memory: Option<u64>,
    /// Seconds to wait for the guest to acknowledge.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

pub async fn run(args: ResizeArgs) -> i32 {
    if let Some(mib) = args.memory {
        return run_memory(&args, mib).await;
    }
    // clap requires --vcpus without --memory.
    let Some(vcpus) = args.vcpus else {
        return 2;
    };
    let result = match ControlClient::connect_to(&args.name).await {
        Ok(client) => {
            client
                .resize(vcpus, Duration::from_secs(args.timeout))
                .await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(r) if r.changed => {
            println!(
                "{}: {} online (CPUs {}) in {:.1} ms",
                args.name,
                vcpu_count(vcpus),
                r.guest_cpus_online,
                r.latency_us as f64 / 1e3
            );
            0
        }
        Ok(r) => {
            println!(
                "{}: already {} online (CPUs {})",
                args.name,
                vcpu_count(vcpus),
                r.guest_cpus_online
            );
            0
        }
        Err(e) => {
            eprintln!("accordion resize: {}", super::error_chain(&e));
            1
        }
    }
}

async fn run_memory(args: &ResizeArgs, mib: u64) -> i32 {
    let result = match ControlClient::connect_to(&args.name).await {
        Ok(client) => {
            client
                .resize_memory(mib << 20, Duration::from_secs(args.timeout))
                .await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(r) => {
            let (memory, total) = (r.memory_bytes >> 20, r.guest_total_bytes >> 20);
            if r.changed {
                println!(
                    "{}: {memory} MiB of memory ({total} MiB in the guest) in {:.1} ms",
                    args.name,
                    r.latency_us as f64 / 1e3
                );
            } else {
                println!(
                    "{}: already {memory} MiB of memory ({total} MiB in the guest)",
                    args.name
                );
            }
            0
        }
        Err(e) => {
            eprintln!("accordion resize: {}", super::error_chain(&e));
            1
        }
    }
}

fn vcpu_count(n: u32) -> String {
    match n {
        1 => "1 vCPU".into(),
        n => format!("{n} vCPUs"),
    }
}
