//! `accordion resize NAME --vcpus N`: change a running sandbox's vCPUs; returns once the guest
//! reports exactly N CPUs online.

use std::time::Duration;

use clap::Args;

use crate::control::client::ControlClient;

#[derive(Args, Debug)]
pub struct ResizeArgs {
    /// The sandbox.
    pub name: String,
    /// vCPUs wanted (1 to the sandbox's max vCPUs).
    #[arg(long)]
    pub vcpus: u32,
    /// Seconds to wait for the guest to acknowledge.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

pub async fn run(args: ResizeArgs) -> i32 {
    let result = match ControlClient::connect_to(&args.name).await {
        Ok(client) => {
            client
                .resize(args.vcpus, Duration::from_secs(args.timeout))
                .await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(r) if r.changed => {
            println!(
                "{}: {} online (CPUs {}) in {:.1} ms",
                args.name,
                vcpus(args.vcpus),
                r.guest_cpus_online,
                r.latency_us as f64 / 1e3
            );
            0
        }
        Ok(r) => {
            println!(
                "{}: already {} online (CPUs {})",
                args.name,
                vcpus(args.vcpus),
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

fn vcpus(n: u32) -> String {
    match n {
        1 => "1 vCPU".into(),
        n => format!("{n} vCPUs"),
    }
}
