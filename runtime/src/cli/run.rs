//! `accordion run`: boot a sandbox, run one command in it through the guest agent, print its stdout
//! and stderr on ours, exit with its status, tear everything down.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use crate::sandbox::{self, Sandbox, SandboxSpec};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Sandbox name (default: run-<pid>); its state lives in /run/accordion/<name>.
    #[arg(long)]
    pub name: Option<String>,
    /// Guest kernel (raw arm64 Image). Default: <share>/guest/Image.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs whose /init is the agent. Default: <share>/guest/agent-initrd.cpio.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// vCPUs plugged at boot.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Possible vCPUs (all created at boot; the rest can be hotplugged).
    #[arg(long, default_value_t = 64)]
    pub max_vcpus: u32,
    /// Guest memory, e.g. 512M or 1G. Debian's stock kernel needs ~100 MiB more than our minimal
    /// one to reserve per-CPU areas for 128 possible vCPUs; 256M is too little for it there.
    #[arg(long, default_value = "512M", value_parser = parse_size_mib)]
    pub memory: u64,
    /// Extra kernel command-line arguments.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Seconds the guest agent may take to come up.
    #[arg(long, default_value_t = 120)]
    pub agent_timeout: u64,
    /// Print how long each step took (on stderr).
    #[arg(long)]
    pub timings: bool,
    /// The command to run in the guest.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Parses a memory size: a number of MiB, or with a K/M/G suffix (binary units).
pub fn parse_size_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult_kib) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64),
        Some('M' | 'm') => (&s[..s.len() - 1], 1024),
        Some('G' | 'g') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1024),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 512M or 2G"))?;
    let kib = n
        .checked_mul(mult_kib)
        .ok_or_else(|| format!("size {s:?} is too large"))?;
    if kib % 1024 != 0 || kib == 0 {
        return Err(format!("size {s:?} must be a positive whole number of MiB"));
    }
    Ok(kib / 1024)
}

pub fn run(args: RunArgs) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("accordion run: cannot start the async runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(run_async(args))
}

async fn run_async(args: RunArgs) -> i32 {
    let share = sandbox::share_dir().join("guest");
    let spec = SandboxSpec {
        name: args
            .name
            .clone()
            .unwrap_or_else(|| format!("run-{}", std::process::id())),
        kernel: args.kernel.clone().unwrap_or_else(|| share.join("Image")),
        initrd: args
            .initrd
            .clone()
            .unwrap_or_else(|| share.join("agent-initrd.cpio")),
        extra_cmdline: args.cmdline.clone(),
        vcpus: args.vcpus,
        max_vcpus: args.max_vcpus,
        memory_mib: args.memory,
        agent_timeout: Duration::from_secs(args.agent_timeout),
    };
    let sandbox = match Sandbox::boot(&spec).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("accordion run: {}", super::error_chain(&e));
            return 125;
        }
    };
    let t_exec = Instant::now();
    let argv: Vec<&str> = args.command.iter().map(String::as_str).collect();
    let env = ["PATH=/bin:/sbin:/usr/bin:/usr/sbin", "HOME=/root"];
    let result = sandbox
        .agent()
        .exec(
            &argv,
            &env,
            Some(tokio::io::stdin()),
            tokio::io::stdout(),
            tokio::io::stderr(),
        )
        .await;
    let exec_time = t_exec.elapsed();
    let boot = sandbox.timings();
    let t_stop = Instant::now();
    let code = match result {
        Ok(status) => status.shell_code(),
        Err(e) => {
            eprintln!("accordion run: {}", super::error_chain(&e));
            125
        }
    };
    let reason = sandbox.stop(Duration::from_secs(10)).await;
    if args.timings {
        eprintln!(
            "accordion run: VM started {:.1} ms, agent ready {:.1} ms, command {:.1} ms, stop {:.1} ms ({reason:?})",
            ms(boot.vm_started),
            ms(boot.agent_ready),
            ms(exec_time),
            ms(t_stop.elapsed())
        );
    }
    code
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_size_mib_units() {
        assert_eq!(parse_size_mib("256M"), Ok(256));
        assert_eq!(parse_size_mib("2G"), Ok(2048));
        assert_eq!(parse_size_mib("512"), Ok(512));
        assert_eq!(parse_size_mib("2048K"), Ok(2));
    }

    #[test]
    fn test_parse_size_mib_rejects_garbage_zero_and_fractions() {
        assert!(parse_size_mib("lots").is_err());
        assert!(parse_size_mib("0M").is_err());
        assert!(parse_size_mib("100K").is_err());
        assert!(parse_size_mib("99999999999999999G").is_err());
    }
}
