//! `accordion run`: boot a sandbox, run one command in it through the guest agent, print its stdout
//! and stderr on ours, exit with its status, tear everything down.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use crate::agent_client::ExecSpec;
use crate::config::Config;
use crate::control::server::{self, Ended};
use crate::sandbox::{self, Sandbox, SandboxSpec};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Sandbox name (default: run-<pid>); its state lives in /run/accordion/<name>.
    #[arg(long)]
    pub name: Option<String>,
    /// Detach: return once the guest agent answers and leave the sandbox running (drive it with
    /// `accordion exec/status/stop`). Prints the sandbox name.
    #[arg(short = 'd', long, conflicts_with = "command")]
    pub detach: bool,
    /// Guest kernel (raw arm64 Image). Default: guest.kernel of the configuration.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs whose /init is the agent. Default: guest.initrd of the configuration.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// vCPUs plugged at boot. Default: vcpus.default of the configuration (1).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Possible vCPUs (all created at boot; the rest can be hotplugged). Default: vcpus.max (64).
    #[arg(long)]
    pub max_vcpus: Option<u32>,
    /// Guest memory, e.g. 512M or 1G. Default: memory.default_mib (512). Debian's stock kernel
    /// needs ~100 MiB more than our minimal one to reserve per-CPU areas for 128 possible vCPUs;
    /// 256M is too little for it there.
    #[arg(long, value_parser = parse_size_mib)]
    pub memory: Option<u64>,
    /// The most guest memory `accordion resize --memory` may grow it to (virtio-mem), e.g. 2G;
    /// above --memory by a multiple of 128M. Default: memory.max_mib of the configuration
    /// rounded down to that (0, the default: memory stays as booted).
    #[arg(long, value_parser = parse_size_mib)]
    pub max_memory: Option<u64>,
    /// Extra kernel command-line arguments (after guest.kernel_params of the configuration).
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Seconds the guest agent may take to come up. Default: timeouts.agent_ready_secs (120).
    #[arg(long)]
    pub agent_timeout: Option<u64>,
    /// Print how long each step took (on stderr).
    #[arg(long)]
    pub timings: bool,
    /// The command to run in the guest (not with -d).
    #[arg(last = true, required_unless_present = "detach")]
    pub command: Vec<String>,
}

pub use crate::config::parse_size_mib;

pub fn run(args: RunArgs) -> i32 {
    // Before anything starts: a broken configuration file is the user's first error to see.
    let config = match Config::load_default() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("accordion run: {}", super::error_chain(&e));
            return 125;
        }
    };
    if args.detach {
        return run_detached(args, &config);
    }
    super::block_on("run", run_foreground(args, config))
}

/// What to boot: the flags, else the configuration's defaults.
fn spec_of(args: &RunArgs, name: String, config: &Config) -> SandboxSpec {
    SandboxSpec {
        name,
        kernel: args
            .kernel
            .clone()
            .unwrap_or_else(|| config.guest.kernel.clone()),
        initrd: args
            .initrd
            .clone()
            .unwrap_or_else(|| config.guest.initrd.clone()),
        extra_cmdline: format!("{} {}", config.guest.kernel_params, args.cmdline),
        vcpus: args.vcpus.unwrap_or(config.vcpus.default),
        max_vcpus: args.max_vcpus.unwrap_or(config.vcpus.max),
        memory_mib: args.memory.unwrap_or(config.memory.default_mib),
        max_memory_mib: args.max_memory.or_else(|| {
            crate::resize::policy::max_memory_mib(
                args.memory.unwrap_or(config.memory.default_mib),
                config.memory.max_mib,
            )
        }),
        agent_timeout: Duration::from_secs(
            args.agent_timeout
                .unwrap_or(config.timeouts.agent_ready_secs),
        ),
        cgroups_path: None,
        cpu_limit_millis: None,
        host: config.host.clone(),
        console_max_bytes: config.console_max_bytes(),
    }
}

fn default_name(args: &RunArgs) -> String {
    args.name
        .clone()
        .unwrap_or_else(|| format!("run-{}", std::process::id()))
}

async fn run_foreground(args: RunArgs, config: Config) -> i32 {
    let spec = spec_of(&args, default_name(&args), &config);
    let sandbox = match Sandbox::boot(&spec).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("accordion run: {}", super::error_chain(&e));
            return 125;
        }
    };
    let boot = sandbox.timings();
    let t_exec = Instant::now();
    let exec = {
        let sandbox = Arc::clone(&sandbox);
        let spec = ExecSpec {
            argv: args.command.clone(),
            env: super::default_env(),
            ..ExecSpec::default()
        };
        async move {
            let result = sandbox
                .agent()
                .exec_with(
                    spec,
                    Some(tokio::io::stdin()),
                    tokio::io::stdout(),
                    tokio::io::stderr(),
                )
                .await;
            (result, t_exec.elapsed())
        }
    };
    // The control socket serves while the command runs (`accordion ps/status/exec/stop` see it).
    let t_stop;
    let (code, exec_time, reason) = match server::serve(Arc::clone(&sandbox), exec, || {}).await {
        Ok((Ended::WorkDone((result, exec_time)), reason)) => {
            t_stop = Instant::now();
            let code = match result {
                Ok(status) => status.shell_code(),
                Err(e) => {
                    eprintln!("accordion run: {}", super::error_chain(&e));
                    125
                }
            };
            (code, exec_time, reason)
        }
        Ok((ended, reason)) => {
            t_stop = Instant::now();
            eprintln!(
                "accordion run: sandbox {} was stopped ({ended:?}, {reason:?})",
                spec.name
            );
            (137, t_exec.elapsed(), reason)
        }
        Err(e) => {
            t_stop = Instant::now();
            eprintln!("accordion run: {}", super::error_chain(&e));
            let reason = sandbox.stop(server::DEFAULT_STOP_GRACE).await;
            (125, t_exec.elapsed(), reason)
        }
    };
    if args.timings {
        let jail = boot
            .jail_setup
            .map_or_else(String::new, |d| format!(" (jail {:.1} ms)", super::ms(d)));
        eprintln!(
            "accordion run: VM started {:.1} ms{jail}, agent ready {:.1} ms, command {:.1} ms, stop {:.1} ms ({reason:?})",
            super::ms(boot.vm_started),
            super::ms(boot.agent_ready),
            super::ms(exec_time),
            super::ms(t_stop.elapsed())
        );
    }
    code
}

/// `run -d`: fork a process that owns the sandbox (new session, stdio detached) and return once
/// it reports the agent ready, or its error. Forking (rather than re-executing ourselves) keeps the
/// parsed arguments as they are; it happens before any thread exists.
fn run_detached(args: RunArgs, config: &Config) -> i32 {
    use nix::unistd::{fork, ForkResult};

    let name = default_name(&args);
    if let Err(e) = sandbox::validate_name(&name) {
        eprintln!("accordion run: {e}");
        return 125;
    }
    let (read_end, write_end) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("accordion run: cannot create a pipe: {e}");
            return 125;
        }
    };
    // SAFETY: the process has one thread (no runtime exists yet), so the child may run anything.
    match unsafe { fork() } {
        Err(e) => {
            eprintln!("accordion run: cannot fork: {e}");
            125
        }
        Ok(ForkResult::Parent { .. }) => {
            drop(write_end);
            let mut report = String::new();
            let _ = std::fs::File::from(read_end).read_to_string(&mut report);
            match report.strip_prefix("ready\n") {
                Some(_) => {
                    println!("{name}");
                    0
                }
                None if report.trim().is_empty() => {
                    eprintln!("accordion run: the sandbox process died before it was ready");
                    125
                }
                None => {
                    eprint!("accordion run: {report}");
                    125
                }
            }
        }
        Ok(ForkResult::Child) => {
            drop(read_end);
            let code = daemon(spec_of(&args, name, config), write_end);
            std::process::exit(code)
        }
    }
}

/// The detached sandbox process: boots, tells the parent, serves until stopped.
fn daemon(spec: SandboxSpec, ready: OwnedFd) -> i32 {
    // Our own session: the caller's terminal and process group signals no longer reach us.
    let _ = nix::unistd::setsid();
    detach_stdio(None);
    let mut ready = std::fs::File::from(ready);
    super::block_on("run", async move {
        let sandbox = match Sandbox::boot(&spec).await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                let _ = writeln!(ready, "{}", super::error_chain(&e));
                return 125;
            }
        };
        // Our stderr (logs, a panic) goes to the state directory from now on.
        detach_stdio(Some(&sandbox.dir().join("host.log")));
        // "ready" once the control socket listens: the caller's next command may use it.
        let mut ready = Some(ready);
        let listening = || {
            if let Some(mut ready) = ready.take() {
                let _ = ready.write_all(b"ready\n");
            }
        };
        match server::serve(sandbox, std::future::pending::<()>(), listening).await {
            Ok(_) => 0,
            Err(e) => {
                let message = super::error_chain(&e);
                // Not listening yet: the caller is still waiting for our word.
                if let Some(mut ready) = ready.take() {
                    let _ = writeln!(ready, "{message}");
                }
                eprintln!("accordion run: {message}");
                1
            }
        }
    })
}

/// Points stdin and stdout at /dev/null and stderr at `log` (or /dev/null), so a detached process
/// holds none of its caller's pipes (a caller reading our output to EOF would wait forever).
fn detach_stdio(log: Option<&std::path::Path>) {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    let err = match log {
        Some(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path),
        None => std::fs::OpenOptions::new().write(true).open("/dev/null"),
    };
    if let Ok(null) = null {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
    }
    if let Ok(err) = err {
        let _ = nix::unistd::dup2_stderr(&err);
    }
}
