//! Serving a sandbox: the control socket, plus the life of the process that owns the VM.
//!
//! [`serve`] binds `control.sock` (0600 in the 0700 state directory), answers Status/Exec/Stop,
//! and ends the sandbox when asked to (Stop, SIGTERM, SIGINT) or when the caller's own work is done
//! (the command of a foreground `accordion run`). The VM stopping by itself does not end it: the
//! sandbox is then reported dead until someone stops it, so the failure stays visible.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use accordion_proto::agent::v1 as pb;
use accordion_proto::control::v1 as cpb;
use accordion_proto::control::v1::control_server::{Control, ControlServer};
use accordion_proto::MAX_MESSAGE_BYTES;
use accordion_vmm::{ExitReason, VcpuState};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::ControlError;
use crate::agent_client::{format_cpulist, AgentClientError};
use crate::confinement::Confinement;
use crate::error_chain;
use crate::resize::ResizeError;
use crate::sandbox::Sandbox;

/// How long a stop waits for the guest to power off before forcing it (when not told otherwise).
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a resize may wait for the guest when the caller does not say.
pub const DEFAULT_RESIZE_TIMEOUT: Duration = Duration::from_secs(60);
/// Status asks the agent with this deadline: a hung guest must not hang `accordion ps`.
const STATUS_AGENT_TIMEOUT: Duration = Duration::from_secs(3);
/// After the sandbox stopped, how long open control connections may take to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why [`serve`] returned.
#[derive(Debug)]
pub enum Ended<T> {
    /// The caller's work finished (then the sandbox was stopped).
    WorkDone(T),
    /// A Stop call ended it.
    Stopped,
    /// SIGTERM or SIGINT ended it.
    Signalled,
}

struct StopCommand {
    grace: Duration,
    done: oneshot::Sender<ExitReason>,
}

struct ControlService {
    sandbox: Arc<Sandbox>,
    /// `None` when someone else owns the sandbox's life (the containerd shim's pods).
    stop: Option<mpsc::Sender<StopCommand>>,
}

/// Serves `sandbox`'s control socket while `work` runs; stops the sandbox (removing its state
/// directory) before returning. Returns why it ended and why the VM stopped. `listening` runs
/// once the socket accepts connections, so whoever it tells may use the socket at once.
pub async fn serve<W: Future>(
    sandbox: Arc<Sandbox>,
    work: W,
    listening: impl FnOnce(),
) -> Result<(Ended<W::Output>, ExitReason), ControlError> {
    let path = sandbox.dir().join(crate::sandbox::CONTROL_SOCKET);
    let serve_err = |source| ControlError::Serve {
        path: path.clone(),
        source,
    };
    let listener = UnixListener::bind(&path).map_err(serve_err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(serve_err)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(serve_err)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(serve_err)?;
    listening();

    let (stop_tx, mut stop_rx) = mpsc::channel(4);
    let service = ControlServer::new(ControlService {
        sandbox: Arc::clone(&sandbox),
        stop: Some(stop_tx),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (drain_tx, drain_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = drain_rx.await;
            }),
    );

    tokio::pin!(work);
    let (ended, grace, reply) = tokio::select! {
        out = &mut work => (Ended::WorkDone(out), DEFAULT_STOP_GRACE, None),
        Some(cmd) = stop_rx.recv() => (Ended::Stopped, cmd.grace, Some(cmd.done)),
        _ = sigterm.recv() => (Ended::Signalled, DEFAULT_STOP_GRACE, None),
        _ = sigint.recv() => (Ended::Signalled, DEFAULT_STOP_GRACE, None),
    };
    let reason = sandbox.stop(grace).await;
    if let Some(reply) = reply {
        let _ = reply.send(reason.clone());
    }
    // Stop calls that raced this one learn the same outcome.
    stop_rx.close();
    while let Ok(cmd) = stop_rx.try_recv() {
        let _ = cmd.done.send(reason.clone());
    }
    let _ = drain_tx.send(());
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, server).await;
    Ok((ended, reason))
}

/// Serves `sandbox`'s control socket (Status, Exec, Resize; Stop is refused) until the returned
/// task is aborted: the shim's pods, whose life containerd owns.
pub fn serve_pod(sandbox: Arc<Sandbox>) -> Result<tokio::task::JoinHandle<()>, ControlError> {
    let path = sandbox.dir().join(crate::sandbox::CONTROL_SOCKET);
    let serve_err = |source| ControlError::Serve {
        path: path.clone(),
        source,
    };
    let listener = UnixListener::bind(&path).map_err(serve_err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(serve_err)?;
    let service = ControlServer::new(ControlService {
        sandbox,
        stop: None,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok(tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await;
    }))
}

/// A finished resize as `accordion status` gets it, its target given as the wire shows it.
fn wire_record<T, O>(
    r: &crate::resize::Record<T, O>,
    target: u32,
    changed: impl Fn(&O) -> bool,
) -> cpb::ResizeRecord {
    cpb::ResizeRecord {
        target,
        ok: r.result.is_ok(),
        result: match &r.result {
            Ok(o) if changed(o) => "changed".into(),
            Ok(_) => "no-op".into(),
            Err(e) => e.clone(),
        },
        latency_us: r.latency.as_micros() as u64,
        finished_unix_ms: r
            .finished
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// What `accordion status` shows, asked from the VMM and the agent.
pub async fn status_of(sandbox: &Sandbox) -> cpb::StatusResponse {
    let states = sandbox.vcpu_states();
    let count = |f: fn(&VcpuState) -> bool| states.iter().filter(|s| f(s)).count() as u32;
    let timings = sandbox.timings();
    let plugged: Vec<u32> = states
        .iter()
        .zip(0u32..)
        .filter(|(s, _)| **s != VcpuState::Unplugged)
        .map(|(_, i)| i)
        .collect();
    let recent_resizes = sandbox
        .recent_resizes()
        .iter()
        .map(|r| wire_record(r, r.target, |o| o.changed))
        .collect();
    // Memory targets in MiB.
    let recent_memory_resizes = sandbox
        .memory_resizes()
        .iter()
        .map(|r| {
            wire_record(r, u32::try_from(r.target >> 20).unwrap_or(u32::MAX), |o| {
                o.changed
            })
        })
        .collect();
    let resize_histograms = sandbox
        .resize_stats()
        .into_iter()
        .map(|((kind, direction, outcome), h)| cpb::ResizeHistogram {
            kind: kind.as_str().into(),
            direction: direction.as_str().into(),
            outcome: outcome.as_str().into(),
            count: h.count,
            sum_us: u64::try_from(h.sum.as_micros()).unwrap_or(u64::MAX),
            bucket_counts: h.buckets.to_vec(),
        })
        .collect();
    let vm_memory = sandbox.vm_memory();
    let mut status = cpb::StatusResponse {
        resize_histograms,
        recent_memory_resizes,
        memory_max_bytes: sandbox.max_memory_mib() << 20,
        memory_plugged_bytes: vm_memory.map_or(0, |m| m.plugged),
        memory_requested_bytes: vm_memory.map_or(0, |m| m.requested),
        vcpus_plugged_list: format_cpulist(&plugged),
        // The VM runs in the sandbox's VMM process.
        confinement: sandbox.vmm_pid().map(confinement_of),
        recent_resizes,
        name: sandbox.name().to_owned(),
        state: "running".into(),
        vcpus_plugged: count(|s| *s != VcpuState::Unplugged),
        vcpus_online: count(|s| *s == VcpuState::Online),
        max_vcpus: sandbox.max_vcpus(),
        pid: std::process::id(),
        memory_configured_bytes: sandbox.memory_mib() << 20,
        boot: Some(cpb::BootTimings {
            vm_created_ms: timings.vm_started.as_millis() as u64,
            kernel_started_ms: sandbox
                .guest_init_time()
                .map_or(0, |d| (timings.vm_started + d).as_millis() as u64),
            agent_ready_ms: timings.agent_ready.as_millis() as u64,
            jail_setup_us: timings.jail_setup.map_or(0, |d| d.as_micros() as u64),
        }),
        ..Default::default()
    };
    if let Some(reason) = sandbox.exit_reason() {
        status.state = "dead".into();
        status.vcpus_online = 0;
        status.exit_reason = format!("{reason:?}");
        return status;
    }
    let agent = sandbox.agent().with_rpc_timeout(STATUS_AGENT_TIMEOUT);
    let asked = std::time::Instant::now();
    match agent.guest_info().await {
        Ok(info) => {
            status.agent_rtt_us = u64::try_from(asked.elapsed().as_micros()).unwrap_or(u64::MAX);
            status.memory_total_bytes = info.memory_total_bytes;
            status.memory_available_bytes = info.memory_available_bytes;
            status.uptime_ms = info.uptime.as_millis() as u64;
            status.agent_version = info.agent_version;
            status.kernel_release = info.kernel_release;
            status.guest_cpus_online = info.cpus_online.0;
            status.guest_cpus_online_count = info.cpus_online.1;
        }
        Err(e) => {
            // The VM may have died while we asked.
            if let Some(reason) = sandbox.exit_reason() {
                status.exit_reason = format!("{reason:?}");
            }
            status.state = match e {
                AgentClientError::Timeout { .. } => "unresponsive",
                _ => "dead",
            }
            .into();
            status.agent_error = error_chain(&e);
        }
    }
    status
}

/// The confinement of process `pid`, or why it could not be read.
pub fn confinement_of(pid: u32) -> cpb::Confinement {
    match Confinement::of(pid) {
        Ok(c) => cpb::Confinement {
            uid: c.uid.0,
            euid: c.uid.1,
            gid: c.gid.0,
            egid: c.gid.1,
            cap_eff: c.cap_eff,
            no_new_privs: c.no_new_privs,
            seccomp_threads: c.seccomp_threads,
            threads: c.threads,
            host_namespaces: c.host_namespaces,
            own_namespaces: c.own_namespaces,
            unknown_namespaces: c.unknown_namespaces,
            cgroup: c.cgroup,
            error: String::new(),
            pid,
        },
        Err(e) => cpb::Confinement {
            error: format!("reading /proc/{pid}: {e}"),
            pid,
            ..Default::default()
        },
    }
}

type ExecStream = Pin<Box<dyn Stream<Item = Result<pb::ExecResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn status(
        &self,
        _request: Request<cpb::StatusRequest>,
    ) -> Result<Response<cpb::StatusResponse>, Status> {
        Ok(Response::new(status_of(&self.sandbox).await))
    }

    type ExecStream = ExecStream;

    /// Forwards the exec to the agent as is; the caller's deadline bounds its start.
    async fn exec(
        &self,
        request: Request<Streaming<pb::ExecRequest>>,
    ) -> Result<Response<ExecStream>, Status> {
        if let Some(reason) = self.sandbox.exit_reason() {
            return Err(Status::failed_precondition(format!(
                "sandbox {} is dead ({reason:?})",
                self.sandbox.name()
            )));
        }
        // A broken request stream from the CLI ends the exec's input, as a closed pipe would.
        let requests = request.into_inner().map_while(Result::ok);
        let responses = self
            .sandbox
            .agent()
            .raw()
            .exec(requests)
            .await?
            .into_inner();
        Ok(Response::new(Box::pin(responses)))
    }

    async fn resize(
        &self,
        request: Request<cpb::ResizeRequest>,
    ) -> Result<Response<cpb::ResizeResponse>, Status> {
        let request = request.into_inner();
        let timeout = match request.timeout_ms {
            0 => DEFAULT_RESIZE_TIMEOUT,
            ms => Duration::from_millis(ms),
        };
        match self.sandbox.resize(request.vcpus, timeout).await {
            Ok(outcome) => Ok(Response::new(cpb::ResizeResponse {
                guest_cpus_online: outcome.guest_online,
                changed: outcome.changed,
                latency_us: outcome.latency.as_micros() as u64,
            })),
            Err(e) => {
                let message = error_chain(&e);
                Err(match e {
                    ResizeError::InvalidTarget { .. } => Status::invalid_argument(message),
                    ResizeError::Timeout { .. } => Status::deadline_exceeded(message),
                    ResizeError::Superseded => Status::aborted(message),
                    ResizeError::Agent { .. } => Status::unavailable(message),
                    ResizeError::NotRunning(_) | ResizeError::OnlineFailed { .. } => {
                        Status::failed_precondition(message)
                    }
                    ResizeError::Vmm(_) => Status::internal(message),
                })
            }
        }
    }

    async fn resize_memory(
        &self,
        request: Request<cpb::ResizeMemoryRequest>,
    ) -> Result<Response<cpb::ResizeMemoryResponse>, Status> {
        use crate::resize::memory::MemoryResizeError as E;
        let request = request.into_inner();
        let timeout = match request.timeout_ms {
            0 => DEFAULT_RESIZE_TIMEOUT,
            ms => Duration::from_millis(ms),
        };
        match self.sandbox.resize_memory(request.bytes, timeout).await {
            Ok(outcome) => Ok(Response::new(cpb::ResizeMemoryResponse {
                guest_total_bytes: outcome.guest_total,
                memory_bytes: outcome.memory.current(),
                changed: outcome.changed,
                latency_us: outcome.latency.as_micros() as u64,
            })),
            Err(e) => {
                let message = error_chain(&e);
                Err(match e {
                    E::InvalidTarget { .. } => Status::invalid_argument(message),
                    E::Timeout { .. } => Status::deadline_exceeded(message),
                    E::Superseded => Status::aborted(message),
                    E::Agent { .. } => Status::unavailable(message),
                    E::Fixed { .. } | E::InUse { .. } | E::NotRunning(_) => {
                        Status::failed_precondition(message)
                    }
                    E::Vmm(_) | E::HostCgroup(_) => Status::internal(message),
                })
            }
        }
    }

    async fn stop(
        &self,
        request: Request<cpb::StopRequest>,
    ) -> Result<Response<cpb::StopResponse>, Status> {
        let grace = match request.into_inner().timeout_ms {
            0 => DEFAULT_STOP_GRACE,
            ms => Duration::from_millis(ms),
        };
        let Some(stop) = &self.stop else {
            return Err(Status::failed_precondition(format!(
                "sandbox {} is a pod of containerd: stop it through containerd \
                 (kubectl delete pod, or ctr task kill / crictl stopp)",
                self.sandbox.name()
            )));
        };
        let (done, outcome) = oneshot::channel();
        let reason = match stop.send(StopCommand { grace, done }).await {
            Ok(()) => outcome.await.ok(),
            // Already stopping or stopped.
            Err(_) => None,
        }
        .or_else(|| self.sandbox.exit_reason())
        .ok_or_else(|| Status::unavailable("the sandbox is stopping"))?;
        Ok(Response::new(cpb::StopResponse {
            exit_reason: format!("{reason:?}"),
        }))
    }
}
