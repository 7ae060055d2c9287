//! containerd-shim-accordion-v2: the containerd shim v2 (task API over ttrpc) whose sandbox is one
//! microVM per pod, booted by the embedded VMM in this process.
//!
//! containerd runs the binary three ways: `start` (spawn the daemon, or find the pod's running
//! one, and print its ttrpc address), the daemon itself (serving [`service::Service`]), and
//! `delete` (clean up after a daemon that died). All containers of a CRI pod share one daemon,
//! chosen by the sandbox id in their annotations, like containerd's runc shim groups them.

mod oom;
// The fuzz targets (runtime/fuzz) decode runtime options directly; nothing else needs them.
#[cfg(feature = "fuzzing")]
pub mod options;
#[cfg(not(feature = "fuzzing"))]
mod options;
pub mod pod;
mod service;
pub mod spec;
mod stdio;

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::DeleteResponse;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::{Config, Error, Flags, StartOpts};

use self::spec::Role;

/// The runtime name containerd knows us by (runtime_type).
pub const RUNTIME_ID: &str = "io.containerd.accordion.v2";

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
    let config = Config {
        // We wait for our only child (virtiofsd) ourselves; a reaper would steal its status.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    runtime.block_on(containerd_shim::asynchronous::run::<AccordionShim>(
        RUNTIME_ID,
        Some(config),
    ));
}

/// The shim process.
struct AccordionShim {
    id: String,
    namespace: String,
    exit: Arc<ExitSignal>,
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

#[async_trait]
impl Shim for AccordionShim {
    type T = service::Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Self {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let grouping = pod_id_of(&opts.id);
        // For a pod member, the daemon of its sandbox answers on the same address: spawn finds
        // it listening and the new process exits at once.
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // containerd reconnects through this file after it restarts.
        std::fs::write("address", &address).map_err(|e| Error::IoError {
            context: "write the shim address file".into(),
            err: e,
        })?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let pod_id = pod_id_of(&self.id);
        if pod_id == self.id {
            if pod::cleanup_dead_pod(&pod_id) {
                log::info!("removed the state of pod {pod_id} (its shim is gone)");
            }
        } else {
            let share = accordion_share::PodShare::at(crate::sandbox::state_dir(&pod_id));
            if share.container_dir(&self.id).exists() {
                share.remove_container(&self.id);
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(DeleteResponse {
            // SIGKILL: whatever ran went down with the shim's VM.
            exit_status: 128 + 9,
            exited_at: containerd_shim::protos::protobuf::MessageField::some(
                containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp {
                    seconds: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
                    ..Default::default()
                },
            ),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::Service::new(&self.id, &self.namespace, publisher, Arc::clone(&self.exit))
    }
}
