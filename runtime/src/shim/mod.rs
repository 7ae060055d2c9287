//! containerd-shim-accordion-v2: the containerd shim v2 (task API over ttrpc) whose sandbox is one
//! microVM per pod, booted by the embedded VMM in this process.
//!
//! containerd runs the binary three ways: `start` (spawn the daemon, or find the pod's running
//! one, and print its ttrpc address), the daemon itself (serving [`service::Service`]), and
//! `delete` (clean up after a daemon that died). All containers of a CRI pod share one daemon,
//! chosen by the sandbox id in their annotations, like containerd's runc shim groups them.

pub mod bootstrap;
mod oom;
// The fuzz targets (runtime/fuzz) decode runtime options directly; nothing else needs them.
#[cfg(feature = "fuzzing")]
pub mod options;
#[cfg(not(feature = "fuzzing"))]
mod options;
pub mod pod;
pub mod server;
mod service;
pub mod spec;
mod stdio;

use containerd_shim::api::DeleteResponse;
use containerd_shim::asynchronous::spawn;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::Flags;
use tokio::io::AsyncWriteExt;

use self::bootstrap::{BootstrapError, LegacyEnv};
use self::server::ServerError;
use self::spec::Role;

/// The runtime name containerd knows us by (runtime_type).
pub const RUNTIME_ID: &str = "io.containerd.accordion.v2";

/// Errors of the shim's actions, as containerd sees them (its error carries our stderr).
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("bad command line")]
    Flags(#[source] containerd_shim::Error),
    #[error("cannot start the shim")]
    Start(#[from] BootstrapError),
    #[error("cannot spawn the shim daemon")]
    Spawn(#[source] containerd_shim::Error),
    #[error("cannot write {0}")]
    Write(&'static str, #[source] std::io::Error),
    #[error("cannot encode the {0} reply")]
    Encode(
        &'static str,
        #[source] containerd_shim::protos::protobuf::Error,
    ),
    #[error("the shim daemon failed")]
    Serve(#[from] ServerError),
}

/// Runs the shim, as containerd invokes it.
pub fn main() {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("containerd-shim-accordion-v2: cannot start tokio: {e}");
            std::process::exit(1);
        }
    };
    // No reaper and no subreaper: the daemon waits for its only child (virtiofsd) itself.
    if let Err(e) = runtime.block_on(run()) {
        eprintln!("containerd-shim-accordion-v2: {}", crate::error_chain(&e));
        std::process::exit(1);
    }
}

async fn run() -> Result<(), ShimError> {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let flags = containerd_shim::parse(&args).map_err(ShimError::Flags)?;
    if flags.info {
        return info().await;
    }
    match flags.action.as_str() {
        "start" => start(&flags).await,
        "delete" => delete(&flags).await,
        _ => Ok(server::serve(&flags).await?),
    }
}

/// `-info`: who we are. No features: containerd then validates no spec against them.
async fn info() -> Result<(), ShimError> {
    use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};
    let info = RuntimeInfo {
        name: RUNTIME_ID.to_string(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let bytes = info
        .write_to_bytes()
        .map_err(|e| ShimError::Encode("info", e))?;
    write_stdout("the runtime info", &bytes).await
}

/// `start`: spawns the pod's daemon (or finds it running) and tells containerd its address.
async fn start(flags: &Flags) -> Result<(), ShimError> {
    let input = bootstrap::read_stdin()?;
    let (opts, protocol) = bootstrap::parse_start(&input, flags, &LegacyEnv::from_env())?;
    let grouping = pod_id_of(&opts.id);
    // For a pod member, the daemon of its sandbox answers on the same address: spawn finds it
    // listening and the new process exits at once.
    let address = spawn(opts, &grouping, Vec::new())
        .await
        .map_err(ShimError::Spawn)?;
    // containerd reconnects through this file after it restarts.
    std::fs::write("address", &address).map_err(|e| ShimError::Write("the address file", e))?;
    write_stdout("the start reply", &bootstrap::reply(&address, protocol)?).await
}

/// `delete`: cleans up after a daemon that died.
async fn delete(flags: &Flags) -> Result<(), ShimError> {
    let pod_id = pod_id_of(&flags.id);
    if pod_id == flags.id {
        if pod::cleanup_dead_pod(&pod_id) {
            log::info!("removed the state of pod {pod_id} (its shim is gone)");
        }
    } else {
        let share = accordion_share::PodShare::at(crate::sandbox::state_dir(&pod_id));
        if share.container_dir(&flags.id).exists() {
            share.remove_container(&flags.id);
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let response = DeleteResponse {
        // SIGKILL: whatever ran went down with the shim's VM.
        exit_status: 128 + 9,
        exited_at: MessageField::some(Timestamp {
            seconds: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let bytes = response
        .write_to_bytes()
        .map_err(|e| ShimError::Encode("delete", e))?;
    write_stdout("the delete reply", &bytes).await
}

async fn write_stdout(what: &'static str, bytes: &[u8]) -> Result<(), ShimError> {
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(bytes)
        .await
        .map_err(|e| ShimError::Write(what, e))?;
    // containerd has been seen to read an empty reply when stdout was not flushed.
    stdout.flush().await.map_err(|e| ShimError::Write(what, e))
}

/// The pod a container belongs to, from its bundle's config.json (the working directory
/// containerd starts `start` and `delete` in): its sandbox id, or its own id.
fn pod_id_of(container_id: &str) -> String {
    let spec = spec::load(std::path::Path::new(".")).ok();
    match spec::role(spec.as_ref().and_then(|s| s.annotations().as_ref())) {
        Role::PodMember { sandbox_id } => sandbox_id,
        Role::Sandbox | Role::Standalone => container_id.to_string(),
    }
}
