//! accordion-agent: PID 1 of the guest. See the library crate for the parts.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use accordion_agent::args::{Listen, Options, USAGE};
use accordion_agent::containers::ContainersService;
use accordion_agent::cpu::{CpuHub, CpuService};
use accordion_agent::memory::{MemoryHub, MemoryService};
use accordion_agent::server::{self, error_chain, AgentService, ServeError};
use accordion_agent::{error, info, init, modules, reaper::Reaper, warn};
use tokio::sync::Notify;

/// Where sysfs is mounted (by `init::mount_all` as PID 1).
const SYSFS: &str = "/sys";
/// The kernel's memory figures (the Memory service).
const MEMINFO: &str = "/proc/meminfo";
/// Attempts to bind the vsock port before giving up (the transport may still be initialising).
const BIND_ATTEMPTS: u32 = 5;
/// How long other processes get to exit on power-off before SIGKILL.
const POWER_OFF_GRACE: Duration = Duration::from_secs(2);
/// After Shutdown, how long the answer and other in-flight calls get to drain.
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(500);

fn main() -> ExitCode {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            // Not println!: a closed stdout must not panic the agent.
            let _ = writeln!(std::io::stdout(), "{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "accordion-agent: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let as_init = options.wants_init(std::process::id());
    let share = if as_init {
        // PID 1 must never die: a panic is a bug (release builds abort on it), so power off
        // cleanly — the host sees a VM that stopped — instead of a kernel panic ("Attempted to
        // kill init").
        std::panic::set_hook(Box::new(|panic| {
            error!("{panic}");
            init::power_off("agent panicked", POWER_OFF_GRACE);
        }));
        // First, while nothing is mounted and no thread runs: containers need pivot_root.
        let root_moved = init::move_root_to_tmpfs();
        let mount_errors = init::mount_all();
        // Needs /dev; before any logging. If even the console cannot be opened there is nowhere
        // to report it, and serving matters more.
        let _ = init::attach_console();
        match root_moved {
            Ok(true) => info!("root moved to a tmpfs"),
            Ok(false) => {}
            Err(e) => warn!("{}", error_chain(&e)),
        }
        for e in mount_errors {
            warn!("{}", error_chain(&e));
        }
        // Kernel boot ends here, as far as the host's boot timings go.
        if let Err(e) = accordion_agent::boot_timer::signal() {
            warn!("{}", error_chain(&e));
        }
        // virtio-mmio and vsock must be up before the agent can bind its port.
        let (loaded, module_errors) = modules::load_all();
        if !loaded.is_empty() {
            info!("loaded {} kernel modules", loaded.len());
        }
        for e in module_errors {
            warn!("{}", error_chain(&e));
        }
        // After the modules (a distribution kernel's virtio transport may be one); logs either way.
        init::mount_share(Path::new("/proc/cmdline"))
    } else {
        init::ShareStatus::default()
    };
    info!(
        "accordion-agent {} starting (pid {}, init {as_init})",
        accordion_agent::AGENT_VERSION,
        std::process::id()
    );

    let result = tokio::runtime::Builder::new_multi_thread()
        // The guest may have one vCPU; two workers are plenty for the agent's I/O.
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
        .and_then(|rt| {
            rt.block_on(run(&options, share))
                .map_err(|e| error_chain(&e))
        });
    match (&result, as_init) {
        (Ok(()), true) => init::power_off("shutdown requested", POWER_OFF_GRACE),
        (Err(e), true) => {
            error!("cannot serve: {e}");
            init::power_off("the agent cannot serve", POWER_OFF_GRACE)
        }
        (Ok(()), false) => ExitCode::SUCCESS,
        (Err(e), false) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: &Options, share: init::ShareStatus) -> Result<(), ServeError> {
    let reaper = Reaper::global()?;
    let shutdown = Arc::new(Notify::new());
    let containers = ContainersService::new(reaper.clone());
    let service = AgentService::new(reaper, shutdown.clone()).with_share(share);
    // CPU hotplug is watched from the moment the agent serves, in the guest and on a host alike.
    let cpu = CpuService::new(CpuHub::start(Path::new(SYSFS)));
    // So is memory (virtio-mem): its figures are a memory resize's acknowledgement.
    let memory = MemoryService::new(MemoryHub::start(Path::new(MEMINFO)));
    // The server stops accepting on `stop`; in-flight calls (the Shutdown answer itself) get
    // SHUTDOWN_DRAIN to finish before the process moves on regardless.
    let stop = Arc::new(Notify::new());
    let stop_server = stop.clone();
    tokio::spawn(async move {
        shutdown.notified().await;
        stop_server.notify_one();
    });
    let served = match &options.listen {
        Listen::Unix(path) => {
            let incoming = server::listen_unix(path)?;
            info!("serving on unix:{}", path.display());
            tokio::spawn(server::serve(
                service,
                cpu,
                memory,
                containers,
                incoming,
                stop.clone(),
            ))
        }
        Listen::Vsock(port) => {
            let incoming = bind_vsock(*port).await?;
            info!("serving on vsock port {port}");
            tokio::spawn(server::serve(
                service,
                cpu,
                memory,
                containers,
                incoming,
                stop.clone(),
            ))
        }
    };
    tokio::pin!(served);
    tokio::select! {
        result = &mut served => return result.unwrap_or(Ok(())),
        () = stop.notified() => {}
    }
    // Wake the server's own shutdown future too (notify_one wakes one waiter per permit).
    stop.notify_one();
    let _ = tokio::time::timeout(SHUTDOWN_DRAIN, &mut served).await;
    Ok(())
}

async fn bind_vsock(
    port: u32,
) -> Result<
    tokio_stream::wrappers::ReceiverStream<std::io::Result<tokio_vsock::VsockStream>>,
    ServeError,
> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match server::listen_vsock(port) {
            Ok(incoming) => return Ok(incoming),
            Err(e) if attempt < BIND_ATTEMPTS => {
                warn!("{} (attempt {attempt}/{BIND_ATTEMPTS})", error_chain(&e));
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
