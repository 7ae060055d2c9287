//! The shim daemon: serves the task API on the socket `start` chose, under both names containerd
//! uses for it, until the pod's last container is gone.
//!
//! containerd 1.7 (and 2.x when a shim answers the legacy protocol) call
//! `containerd.task.v2.Task`; containerd 2.x with a version 3 shim calls `containerd.task.v3.Task`,
//! a renamed copy with the same messages. containerd-shim 0.12's own server registers only v3, so
//! the daemon loop lives here: the same [`Service`] answers under both names.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::shim_async::{create_task, Task};
use containerd_shim::protos::ttrpc::asynchronous::transport::Listener;
use containerd_shim::protos::ttrpc::asynchronous::{Client, Server, Service as TtrpcService};
use containerd_shim::Flags;

use super::bootstrap::TTRPC_ADDRESS;
use super::service::Service;

/// The service name containerd 2.x calls for a version 3 shim (the generated one).
pub const TASK_V3: &str = "containerd.task.v3.Task";
/// The service name containerd 1.7, and 2.x for a version 2 shim, call.
pub const TASK_V2: &str = "containerd.task.v2.Task";
/// How long a pod member's daemon waits for its pod's daemon to answer on the shared socket.
const LIVE_SOCKET_WAIT: Duration = Duration::from_secs(1);

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("no socket to serve (containerd passes -socket)")]
    NoSocket,
    #[error("{TTRPC_ADDRESS} is not set (containerd sets it for its shims)")]
    NoTtrpcAddress,
    #[error("cannot open containerd's log pipe")]
    Logger(#[source] containerd_shim::Error),
    #[error("cannot connect to containerd's event service at {0}")]
    Publisher(String, #[source] containerd_shim::Error),
    #[error("cannot listen on {0}")]
    Listen(String, #[source] std::io::Error),
    #[error("cannot serve ttrpc")]
    Ttrpc(#[source] containerd_shim::protos::ttrpc::Error),
    #[error("cannot write the address file")]
    AddressFile(#[source] std::io::Error),
    #[error("cannot detach from the start process's stdout")]
    Detach(#[source] nix::Error),
}

/// The task services under both names; every call reaches the same `task`.
pub fn task_services(task: Arc<dyn Task + Send + Sync>) -> HashMap<String, TtrpcService> {
    let mut services = create_task(task.clone());
    let v2 = create_task(task)
        .into_iter()
        .filter_map(|(name, service)| (name == TASK_V3).then_some((TASK_V2.to_string(), service)));
    services.extend(v2);
    services
}

/// Runs the daemon for `flags` (containerd's `-socket`, `-id`, `-namespace`, `-debug`).
pub async fn serve(flags: &Flags) -> Result<(), ServerError> {
    if flags.socket.is_empty() {
        return Err(ServerError::NoSocket);
    }
    containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id)
        .map_err(ServerError::Logger)?;
    let ttrpc_address = std::env::var(TTRPC_ADDRESS).map_err(|_| ServerError::NoTtrpcAddress)?;
    let Some(listener) = listen(&flags.socket).await? else {
        // A pod member: the pod's daemon answers on this socket already.
        detach()?;
        return Ok(());
    };
    let publisher = RemotePublisher::new(&ttrpc_address)
        .await
        .map_err(|e| ServerError::Publisher(ttrpc_address.clone(), e))?;
    let exit = Arc::new(ExitSignal::default());
    let service = Service::new(&flags.id, &flags.namespace, publisher, Arc::clone(&exit));
    let listener =
        Listener::try_from(listener).map_err(|e| ServerError::Listen(flags.socket.clone(), e))?;
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(task_services(Arc::new(service)));
    server.start().await.map_err(ServerError::Ttrpc)?;
    // The start process copies our stdout to containerd until it closes: now.
    detach()?;
    log::info!("shim serving {TASK_V2} and {TASK_V3} on {}", flags.socket);
    tokio::spawn(log_signals());
    exit.wait().await;
    log::info!("shim exiting");
    if let Err(e) = server.shutdown().await {
        log::warn!("ttrpc server shutdown: {e}");
    }
    remove_socket(&flags.socket);
    Ok(())
}

/// Binds `address` (unix://path). `None` when a live daemon already serves it (every member of a
/// pod maps to the pod's socket); a dead one's socket is replaced.
async fn listen(address: &str) -> Result<Option<UnixListener>, ServerError> {
    let path = socket_path(address);
    let bind = || {
        if let Some(parent) = Path::new(path).parent() {
            std::fs::create_dir_all(parent)?;
        }
        UnixListener::bind(path)
    };
    match bind() {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if tokio::time::timeout(LIVE_SOCKET_WAIT, Client::connect(address))
                .await
                .is_ok_and(|c| c.is_ok())
            {
                std::fs::write("address", address).map_err(ServerError::AddressFile)?;
                return Ok(None);
            }
            remove_socket(address);
            bind()
                .map(Some)
                .map_err(|e| ServerError::Listen(address.to_string(), e))
        }
        Err(e) => Err(ServerError::Listen(address.to_string(), e)),
    }
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// Removes the socket at `address` if it is one (never another kind of file).
fn remove_socket(address: &str) {
    let path = socket_path(address);
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        if let Err(e) = std::fs::remove_file(path) {
            log::warn!("cannot remove the shim socket {path}: {e}");
        }
    }
}

/// Points stdout at stderr (containerd's shim log), closing the pipe the start process reads.
fn detach() -> Result<(), ServerError> {
    nix::unistd::dup2_stdout(std::io::stderr()).map_err(ServerError::Detach)
}

/// containerd signals a shim only to kill it; SIGTERM and SIGINT are logged and the daemon ends
/// through Shutdown, like containerd's own shims. SIGPIPE (containerd gone) must not kill it.
async fn log_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    let kinds = [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::pipe(),
    ];
    let mut streams = Vec::new();
    for kind in kinds {
        match signal(kind) {
            Ok(stream) => streams.push((kind, stream)),
            Err(e) => log::warn!("cannot watch signal {}: {e}", kind.as_raw_value()),
        }
    }
    let waits = streams.into_iter().map(|(kind, mut stream)| async move {
        while stream.recv().await.is_some() {
            log::debug!("received signal {}", kind.as_raw_value());
        }
    });
    futures_util::future::join_all(waits).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoTask;
    impl Task for NoTask {}

    #[test]
    fn test_the_task_api_answers_under_both_names_with_the_same_methods() {
        let services = task_services(Arc::new(NoTask));
        let mut names: Vec<_> = services.keys().cloned().collect();
        names.sort();
        assert_eq!(names, [TASK_V2, TASK_V3]);
        let methods = |name: &str| {
            let mut m: Vec<_> = services[name].methods.keys().cloned().collect();
            m.sort();
            m
        };
        assert_eq!(methods(TASK_V2), methods(TASK_V3));
        for method in ["Create", "Update", "Stats", "Shutdown", "Connect"] {
            assert!(methods(TASK_V2).iter().any(|m| m == method), "{method}");
        }
    }

    #[test]
    fn test_socket_paths_drop_the_unix_scheme_only() {
        assert_eq!(
            socket_path("unix:///run/containerd/s/ab"),
            "/run/containerd/s/ab"
        );
        assert_eq!(socket_path("/run/x"), "/run/x");
    }
}
