//! The gRPC service `accordion.agent.v1.Agent` and the listeners it is served on.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use accordion_proto::agent::v1 as pb;
use accordion_proto::agent::v1::agent_server::{Agent, AgentServer};
use accordion_proto::MAX_MESSAGE_BYTES;
use nix::sys::signal::Signal;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};

use crate::containers::ContainersService;
use crate::cpu::CpuService;
use crate::exec::{self, Event, ExecError, ExecSpec, Input};
use crate::init::ShareStatus;
use crate::memory::MemoryService;
use crate::reaper::{ExitStatus, Reaper, ReaperError};
use crate::sysinfo;

/// Execs running at once; beyond this Exec answers RESOURCE_EXHAUSTED instead of exhausting fds.
pub const MAX_CONCURRENT_EXECS: usize = 256;

/// Buffered messages per exec direction: with `exec::CHUNK_BYTES` chunks, at most 512 KiB per
/// direction are queued before backpressure reaches the process or the client.
const QUEUE: usize = 16;

/// How long a client has to send `start` after opening an Exec stream.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listening socket could not be set up.
    #[error("Cannot listen on {what}")]
    Listen {
        /// The address.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The reaper could not be started.
    #[error(transparent)]
    Reaper(#[from] ReaperError),
    /// The gRPC server failed.
    #[error("gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
}

/// The Agent service.
#[derive(Clone)]
pub struct AgentService {
    reaper: Reaper,
    /// exec id → pid, while the exec runs (for Signal).
    execs: Arc<Mutex<HashMap<String, u32>>>,
    next_exec: Arc<AtomicU64>,
    exec_slots: Arc<Semaphore>,
    shutdown: Arc<Notify>,
    /// What became of the host's share at boot.
    share: Arc<ShareStatus>,
}

impl AgentService {
    /// A service whose Shutdown notifies `shutdown`.
    pub fn new(reaper: Reaper, shutdown: Arc<Notify>) -> Self {
        Self {
            reaper,
            execs: Arc::default(),
            next_exec: Arc::new(AtomicU64::new(1)),
            exec_slots: Arc::new(Semaphore::new(MAX_CONCURRENT_EXECS)),
            shutdown,
            share: Arc::default(),
        }
    }

    /// Reports `share` (the boot's share mount) in GetGuestInfo.
    pub fn with_share(mut self, share: ShareStatus) -> Self {
        self.share = Arc::new(share);
        self
    }

    /// The tonic service with the message size limits applied.
    pub fn into_server(self) -> AgentServer<Self> {
        AgentServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// The wire form of an exit status (shared with the Containers service).
pub(crate) fn exit_to_wire(status: ExitStatus) -> pb::ExecExit {
    match status {
        ExitStatus::Exited(code) => pb::ExecExit {
            code: Some(code),
            signal: None,
        },
        ExitStatus::Signaled(sig) => pb::ExecExit {
            code: None,
            signal: Some(sig),
        },
    }
}

fn event_to_wire(event: Event) -> Result<pb::ExecResponse, Status> {
    use pb::exec_response::Response as R;
    let response = match event {
        Event::Stdout(data) => R::Stdout(data),
        Event::Stderr(data) => R::Stderr(data),
        Event::Exit(status) => R::Exit(exit_to_wire(status)),
    };
    Ok(pb::ExecResponse {
        response: Some(response),
    })
}

fn exec_status(err: &ExecError) -> Status {
    let message = error_chain(err);
    match err {
        ExecError::InvalidArgument(_) => Status::invalid_argument(message),
        ExecError::NotFound(_) => Status::not_found(message),
        ExecError::Spawn(ReaperError::Spawn { source, .. }) => match source.kind() {
            io::ErrorKind::NotFound => Status::not_found(message),
            io::ErrorKind::PermissionDenied => Status::permission_denied(message),
            _ => Status::failed_precondition(message),
        },
        _ => Status::internal(message),
    }
}

/// "Outer: inner: innermost", since the error types keep their sources separate.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Forwards the client's Exec requests after `start` to the exec as [`Input`].
async fn forward_input(mut stream: Streaming<pb::ExecRequest>, input: mpsc::Sender<Input>) {
    use pb::exec_request::Request as R;
    loop {
        let item = match stream.message().await {
            Ok(Some(pb::ExecRequest {
                request: Some(R::Stdin(data)),
            })) => Input::Stdin(data),
            Ok(Some(pb::ExecRequest {
                request: Some(R::CloseStdin(_)),
            })) => Input::CloseStdin,
            Ok(Some(pb::ExecRequest {
                request: Some(R::Resize(size)),
            })) => Input::Resize {
                rows: u16::try_from(size.rows).unwrap_or(u16::MAX),
                cols: u16::try_from(size.cols).unwrap_or(u16::MAX),
            },
            // A second start or an empty message: nothing to do, keep the exec going.
            Ok(Some(_)) => continue,
            // The client finished sending: that is the end of stdin.
            Ok(None) => {
                let _ = input.send(Input::CloseStdin).await;
                return;
            }
            Err(status) => {
                crate::warn!("exec input failed, killing the exec: {}", status.message());
                let _ = input.send(Input::Abort).await;
                return;
            }
        };
        if input.send(item).await.is_err() {
            return;
        }
    }
}

type ExecStream = Pin<Box<dyn Stream<Item = Result<pb::ExecResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            agent_version: crate::AGENT_VERSION.to_owned(),
        }))
    }

    async fn get_guest_info(
        &self,
        _: Request<pb::GetGuestInfoRequest>,
    ) -> Result<Response<pb::GetGuestInfoResponse>, Status> {
        let info = tokio::task::spawn_blocking(|| sysinfo::read_guest_info(Path::new("/")))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(error_chain(&e)))?;
        let mut response = pb::GetGuestInfoResponse::from(info);
        response.share_tag = self.share.tag.clone().unwrap_or_default();
        response.share_error = self.share.error.clone().unwrap_or_default();
        Ok(Response::new(response))
    }

    type ExecStream = ExecStream;

    async fn exec(
        &self,
        request: Request<Streaming<pb::ExecRequest>>,
    ) -> Result<Response<ExecStream>, Status> {
        let slot = self.exec_slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!("More than {MAX_CONCURRENT_EXECS} execs running"))
        })?;
        let mut stream = request.into_inner();
        let first = tokio::time::timeout(START_TIMEOUT, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded("No start message"))??;
        let start = match first {
            Some(pb::ExecRequest {
                request: Some(pb::exec_request::Request::Start(start)),
            }) => start,
            _ => {
                return Err(Status::invalid_argument(
                    "The first Exec message must be start",
                ))
            }
        };
        let spec = ExecSpec::try_from(start).map_err(|e| exec_status(&e))?;
        let running = exec::start(&self.reaper, &spec).map_err(|e| exec_status(&e))?;
        let pid = running.pid;
        let exec_id = format!("exec-{}", self.next_exec.fetch_add(1, Ordering::Relaxed));
        crate::info!("{exec_id}: started pid {pid}: {:?}", spec.argv);

        let (events_tx, events_rx) = mpsc::channel(QUEUE);
        let started = pb::ExecResponse {
            response: Some(pb::exec_response::Response::Started(pb::ExecStarted {
                exec_id: exec_id.clone(),
                pid,
            })),
        };
        // Capacity is QUEUE ≥ 1 and the channel is new: this cannot fail or wait.
        let _ = events_tx.try_send(Ok(started));
        let (input_tx, input_rx) = mpsc::channel(QUEUE);
        tokio::spawn(forward_input(stream, input_tx));

        self.execs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(exec_id.clone(), pid);
        let execs = self.execs.clone();
        tokio::spawn(async move {
            let status = running.run(input_rx, events_tx, event_to_wire).await;
            execs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&exec_id);
            crate::info!("{exec_id}: ended: {status:?}");
            drop(slot);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(events_rx))))
    }

    async fn signal(
        &self,
        request: Request<pb::SignalRequest>,
    ) -> Result<Response<pb::SignalResponse>, Status> {
        let request = request.into_inner();
        let signal = Signal::try_from(request.signal)
            .map_err(|_| Status::invalid_argument(format!("{} is not a signal", request.signal)))?;
        let pid = self
            .execs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&request.exec_id)
            .copied();
        let pid = pid.ok_or_else(|| {
            Status::not_found(format!("No running exec {:?}", truncate(&request.exec_id)))
        })?;
        match self.reaper.kill(pid, signal, false) {
            Ok(()) => Ok(Response::new(pb::SignalResponse {})),
            Err(ReaperError::NotRunning(_)) => Err(Status::not_found(format!(
                "Exec {} has exited",
                request.exec_id
            ))),
            Err(e) => Err(Status::internal(error_chain(&e))),
        }
    }

    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        crate::info!("shutdown requested");
        // notify_one stores a permit: the main task sees it even if it is not waiting yet.
        self.shutdown.notify_one();
        Ok(Response::new(pb::ShutdownResponse {}))
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Accepts connections on a task of its own and hands them to tonic. Accept errors (EMFILE, a
/// vsock transport reset) are logged and retried after a pause: a listener must never end the
/// server, and must not spin either.
fn incoming<L, IO, F>(mut accept: L) -> ReceiverStream<io::Result<IO>>
where
    L: FnMut() -> F + Send + 'static,
    F: std::future::Future<Output = io::Result<IO>> + Send,
    IO: Send + 'static,
{
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            match accept().await {
                Ok(io) => {
                    if tx.send(Ok(io)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    crate::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Serves `service`, `cpu`, `memory`, `containers` and the Network service on the connections of
/// `incoming` until `shutdown` is notified. Each
/// connection is its own HTTP/2 session: a peer sending garbage or oversized messages loses its
/// connection or its call, never the server.
pub async fn serve<IO>(
    service: AgentService,
    cpu: CpuService,
    memory: MemoryService,
    containers: ContainersService,
    incoming: ReceiverStream<io::Result<IO>>,
    shutdown: Arc<Notify>,
) -> Result<(), ServeError>
where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
{
    tonic::transport::Server::builder()
        // Notice a host that vanished without closing (VM snapshot, crashed shim).
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(service.into_server())
        .add_service(cpu.into_server())
        .add_service(memory.into_server())
        .add_service(containers.into_server())
        .add_service(crate::network::NetworkService::default().into_server())
        .serve_with_incoming_shutdown(incoming, async move { shutdown.notified().await })
        .await?;
    Ok(())
}

/// Listens on a Unix socket (host tests and debugging), replacing a stale socket file.
pub fn listen_unix(
    path: &Path,
) -> Result<ReceiverStream<io::Result<tokio::net::UnixStream>>, ServeError> {
    let listen_err = |source| ServeError::Listen {
        what: path.display().to_string(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(listen_err)?;
    let listener = Arc::new(listener);
    Ok(incoming(move || {
        let listener = listener.clone();
        async move { listener.accept().await.map(|(stream, _)| stream) }
    }))
}

/// The only vsock peer the agent serves: the host. The VMM's hybrid-vsock device presents every
/// host connection with this source CID; a process in the guest reaching the port over the
/// loopback transport (CID 1, or the guest's own CID) is not the host, and would otherwise get
/// everything the agent can do (exec as root outside every container).
pub const HOST_CID: u32 = tokio_vsock::VMADDR_CID_HOST;

/// Whether the agent serves a vsock peer with CID `cid`.
fn serves_peer(cid: u32) -> bool {
    cid == HOST_CID
}

/// Counts refused peers. A process in the guest may retry in a loop, and every warning is a line
/// on the console: warn on the 1st, 2nd, 4th, 8th… refusal only.
#[derive(Debug, Default)]
struct Refusals(AtomicU64);

impl Refusals {
    /// Counts one refusal; the total when it is one to log.
    fn count(&self) -> Option<u64> {
        let total = self.0.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        total.is_power_of_two().then_some(total)
    }
}

/// Accepts connections from `accept` (a stream and its peer's CID) until one from the host
/// arrives; any other peer's connection is closed at once.
async fn accept_host<IO, A, F>(accept: &mut A, refusals: &Refusals) -> io::Result<IO>
where
    A: FnMut() -> F,
    F: std::future::Future<Output = io::Result<(IO, u32)>>,
{
    loop {
        let (stream, cid) = accept().await?;
        if serves_peer(cid) {
            return Ok(stream);
        }
        drop(stream);
        if let Some(total) = refusals.count() {
            crate::warn!(
                "refused a vsock connection from CID {cid}: the agent serves only the host \
                 (CID {HOST_CID}); {total} refused so far"
            );
        }
    }
}

/// Listens on vsock `port`; serves only connections from the host (see [`HOST_CID`]).
pub fn listen_vsock(
    port: u32,
) -> Result<ReceiverStream<io::Result<tokio_vsock::VsockStream>>, ServeError> {
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
    let listener = tokio_vsock::VsockListener::bind(addr).map_err(|source| ServeError::Listen {
        what: format!("vsock port {port}"),
        source,
    })?;
    let listener = Arc::new(listener);
    let refusals = Arc::new(Refusals::default());
    Ok(incoming(move || {
        let listener = listener.clone();
        let refusals = refusals.clone();
        async move {
            let mut accept = || async {
                let (stream, peer) = listener.accept().await?;
                Ok((stream, peer.cid()))
            };
            accept_host(&mut accept, &refusals).await
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_exit_to_wire_keeps_code_and_signal_apart() {
        assert_eq!(
            exit_to_wire(ExitStatus::Exited(0)),
            pb::ExecExit {
                code: Some(0),
                signal: None
            }
        );
        assert_eq!(
            exit_to_wire(ExitStatus::Signaled(9)),
            pb::ExecExit {
                code: None,
                signal: Some(9)
            }
        );
    }

    #[test]
    fn test_exec_status_maps_missing_program_to_not_found() {
        let err = ExecError::Spawn(ReaperError::Spawn {
            program: "x".into(),
            source: io::ErrorKind::NotFound.into(),
        });
        assert_eq!(exec_status(&err).code(), tonic::Code::NotFound);
    }

    #[test]
    fn test_serves_peer_only_the_host_cid() {
        assert!(serves_peer(2));
        // Hypervisor, loopback (a guest process over vsock_loopback), the guest's own CID (also
        // loopback), another VM's CID, VMADDR_CID_ANY.
        for cid in [0, 1, 3, 4, u32::MAX] {
            assert!(!serves_peer(cid), "CID {cid} served");
        }
    }

    #[test]
    fn test_refusals_are_logged_at_powers_of_two_only() {
        let refusals = Refusals::default();
        let logged: Vec<u64> = (0..1000).filter_map(|_| refusals.count()).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]);
    }

    #[tokio::test]
    async fn test_accept_host_closes_other_peers_at_once_and_returns_the_host() {
        let mut peers = Vec::new();
        let mut script = Vec::new();
        for cid in [1u32, 3, 2] {
            let (ours, theirs) = tokio::net::UnixStream::pair().expect("pair");
            script.push((ours, cid));
            peers.push((theirs, cid));
        }
        let mut script = script.into_iter();
        let mut accept = || {
            let next = script.next();
            async move { next.ok_or_else(|| io::Error::other("no more connections")) }
        };
        let refusals = Refusals::default();
        let served = accept_host(&mut accept, &refusals).await.expect("host");
        assert_eq!(refusals.0.load(Ordering::Relaxed), 2);
        for (mut peer, cid) in peers {
            use tokio::io::AsyncReadExt;
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_millis(200), peer.read(&mut byte)).await;
            if cid == 2 {
                assert!(read.is_err(), "the host's connection is open: {read:?}");
            } else {
                assert_eq!(read.expect("closed at once").expect("EOF"), 0, "CID {cid}");
            }
        }
        drop(served);
    }

    #[test]
    fn test_truncate_limits_echoed_ids() {
        assert_eq!(truncate(&"x".repeat(1000)).len(), 64);
        assert_eq!(truncate("short"), "short");
    }
}
