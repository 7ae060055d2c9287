//! The containerd task service (task v2 over ttrpc) of one pod: every container of the pod is a
//! container in the pod's VM, run by the guest agent. Calls arrive in containerd's order
//! (Create, Start, Wait, Kill, Delete, Shutdown); each answers from the agent's view.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use accordion_share::PodShare;
use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::event::Event;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext};
use containerd_shim::TtrpcResult;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::options;
use super::pod::{self, Pod, PodSize};
use super::spec::{self, Role, SandboxResources, GUEST_SHARE};
use super::stdio;
use crate::agent_client::{AgentClient, AgentClientError, ContainerCreate, ExecHooks, ExecSpec};
use crate::config::Config;
use crate::error_chain;
use crate::resize::memory::MemoryResizeError;
use crate::resize::policy::{self, CpuShape, PodCpu, PodMemory};
use crate::resize::ResizeError;

const MIB: u64 = 1 << 20;
/// The exit status of every process of a pod whose VM or virtiofsd died (as runc's shims report
/// a process they lost).
const DEAD_POD_STATUS: u32 = 255;
/// How long one blocking wait of the death watch for the VM's exit lasts.
const WATCH_SLICE: Duration = Duration::from_secs(1);
/// A process runs this long at most as far as our Wait call to the agent is concerned.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// After a container's main process exits, how long its output may take to drain before the
/// exit is published (containerd's clients read output until the exit arrives).
const IO_DRAIN: Duration = Duration::from_secs(5);

fn status(code: ttrpc::Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

fn not_found(what: impl Into<String>) -> ttrpc::Error {
    status(ttrpc::Code::NOT_FOUND, what)
}

/// An agent error as containerd should see it: the agent's own code when it answered, else
/// UNAVAILABLE (the guest is gone or did not answer in time).
fn agent_error(context: &str, e: &AgentClientError) -> ttrpc::Error {
    let code = match e {
        AgentClientError::Rpc { code, .. } => match code {
            tonic::Code::NotFound => ttrpc::Code::NOT_FOUND,
            tonic::Code::InvalidArgument => ttrpc::Code::INVALID_ARGUMENT,
            tonic::Code::FailedPrecondition => ttrpc::Code::FAILED_PRECONDITION,
            tonic::Code::AlreadyExists => ttrpc::Code::ALREADY_EXISTS,
            tonic::Code::DeadlineExceeded => ttrpc::Code::DEADLINE_EXCEEDED,
            tonic::Code::Unimplemented => ttrpc::Code::UNIMPLEMENTED,
            _ => ttrpc::Code::INTERNAL,
        },
        AgentClientError::Timeout { .. } => ttrpc::Code::DEADLINE_EXCEEDED,
        _ => ttrpc::Code::UNAVAILABLE,
    };
    status(code, format!("{context}: {}", error_chain(e)))
}

/// A failed Update as containerd must see it. containerd reads NOT_FOUND from Update as "the
/// task already exited" and UNIMPLEMENTED as "not supported", and reports both as success to the
/// kubelet, which would then believe the new resources applied. No failure leaves under those codes.
fn update_failure(e: ttrpc::Error) -> ttrpc::Error {
    match e {
        ttrpc::Error::RpcStatus(s)
            if s.code() == ttrpc::Code::NOT_FOUND || s.code() == ttrpc::Code::UNIMPLEMENTED =>
        {
            let code = if s.code() == ttrpc::Code::NOT_FOUND {
                ttrpc::Code::FAILED_PRECONDITION
            } else {
                ttrpc::Code::INTERNAL
            };
            status(code, s.message)
        }
        other => other,
    }
}

/// The pod's agent client for container calls: they mount, fork and exec in the guest.
fn container_agent(pod: &Pod, config: &Config) -> AgentClient {
    pod.sandbox
        .agent()
        .with_rpc_timeout(Duration::from_secs(config.timeouts.container_call_secs))
}

/// A failed resize as containerd should see it (it then keeps the old resources).
fn resize_error(id: &str, target: u32, e: &ResizeError) -> ttrpc::Error {
    let code = match e {
        ResizeError::InvalidTarget { .. } => ttrpc::Code::INVALID_ARGUMENT,
        ResizeError::Superseded => ttrpc::Code::ABORTED,
        ResizeError::NotRunning(_) => ttrpc::Code::FAILED_PRECONDITION,
        ResizeError::Timeout { .. } => ttrpc::Code::DEADLINE_EXCEEDED,
        ResizeError::Agent { .. } => ttrpc::Code::UNAVAILABLE,
        ResizeError::Vmm(_) | ResizeError::OnlineFailed { .. } => ttrpc::Code::INTERNAL,
    };
    status(
        code,
        format!(
            "{id}: resizing the pod to {target} vCPUs: {}",
            error_chain(e)
        ),
    )
}

/// A failed memory resize as containerd should see it (it then keeps the old resources).
fn memory_resize_error(id: &str, target: u64, e: &MemoryResizeError) -> ttrpc::Error {
    let code = match e {
        MemoryResizeError::InvalidTarget { .. } => ttrpc::Code::INVALID_ARGUMENT,
        MemoryResizeError::Fixed { .. }
        | MemoryResizeError::InUse { .. }
        | MemoryResizeError::NotRunning(_) => ttrpc::Code::FAILED_PRECONDITION,
        MemoryResizeError::Superseded => ttrpc::Code::ABORTED,
        MemoryResizeError::Timeout { .. } => ttrpc::Code::DEADLINE_EXCEEDED,
        MemoryResizeError::Agent { .. } => ttrpc::Code::UNAVAILABLE,
        MemoryResizeError::Vmm(_) | MemoryResizeError::HostCgroup(_) => ttrpc::Code::INTERNAL,
    };
    status(
        code,
        format!(
            "{id}: resizing the pod to {} MiB of memory: {}",
            target / MIB,
            error_chain(e)
        ),
    )
}

/// What a container counts for in its pod's size.
#[derive(Debug, Clone, Copy, Default)]
struct Demand {
    cpu: CpuShape,
    /// Its memory limit, bytes.
    memory: Option<u64>,
}

impl Demand {
    fn of(resources: &oci_spec::runtime::LinuxResources) -> Result<Self, policy::PolicyError> {
        Ok(Self {
            cpu: CpuShape::from_resources(resources)?,
            memory: policy::memory_limit(resources)?,
        })
    }
}

/// The pod's resources as the shim counts them (its size follows them), and what each
/// container's cgroup in the guest was last given.
#[derive(Debug, Clone, Default)]
struct PodResources {
    cpu: PodCpu,
    memory: PodMemory,
    /// LinuxResources JSON by container id: what a failed Update gives back.
    applied: HashMap<String, Vec<u8>>,
}

/// What a resize changed so far, so a failure can take it back.
#[derive(Debug, Default)]
struct Changed {
    /// The guest memory (bytes) before, and what it was resized to.
    memory: Option<(u64, u64)>,
    /// The vCPUs before.
    vcpus: Option<u32>,
    /// The container's resources before (its cgroup in the guest was updated).
    cgroup: Option<Vec<u8>>,
}

fn timestamp(at: SystemTime) -> Timestamp {
    let d = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a process ended.
#[derive(Debug, Clone, Copy)]
struct Exit {
    code: u32,
    at: SystemTime,
}

/// containerd's stdio of a process.
#[derive(Debug, Clone, Default)]
struct Stdio {
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
}

/// A container's main process or one of its execs.
struct Process {
    container_id: String,
    /// Empty for the main process.
    exec_id: String,
    stdio: Stdio,
    pid: AtomicU32,
    status: Mutex<api::Status>,
    exit: watch::Sender<Option<Exit>>,
    stdin: Mutex<Option<stdio::StdinCloser>>,
    resize: Mutex<Option<mpsc::Sender<(u32, u32)>>>,
    /// An exec's command, until it starts.
    pending: Mutex<Option<ExecSpec>>,
    /// Fires when the main process's output stream ended (the attach finished).
    io_done: Mutex<Option<oneshot::Receiver<()>>>,
    /// Tasks serving it (stdio, the wait for its exit): aborted when it is deleted.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Process {
    fn new(container_id: &str, exec_id: &str, stdio: Stdio) -> Self {
        Self {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stdio,
            pid: AtomicU32::new(0),
            status: Mutex::new(api::Status::CREATED),
            exit: watch::channel(None).0,
            stdin: Mutex::new(None),
            resize: Mutex::new(None),
            pending: Mutex::new(None),
            io_done: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
        }
    }

    fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    fn status(&self) -> api::Status {
        *lock(&self.status)
    }

    fn set_status(&self, status: api::Status) {
        *lock(&self.status) = status;
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Records the exit; `None` if it was already recorded (the first report wins: the agent's
    /// wait and the pod's death watch may both report one).
    fn set_exited(&self, code: u32) -> Option<Exit> {
        let exit = Exit {
            code,
            at: SystemTime::now(),
        };
        let first = self.exit.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(exit);
            true
        });
        if !first {
            return None;
        }
        self.set_status(api::Status::STOPPED);
        if let Some(mut stdin) = lock(&self.stdin).take() {
            stdin.close();
        }
        lock(&self.resize).take();
        Some(exit)
    }

    async fn wait(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return exit;
            }
            if rx.changed().await.is_err() {
                return Exit {
                    code: 255,
                    at: SystemTime::now(),
                };
            }
        }
    }

    fn state(&self, bundle: &str) -> api::StateResponse {
        let exit = self.exited();
        api::StateResponse {
            id: if self.exec_id.is_empty() {
                self.container_id.clone()
            } else {
                self.exec_id.clone()
            },
            exec_id: self.exec_id.clone(),
            bundle: bundle.to_string(),
            pid: self.pid(),
            status: self.status().into(),
            stdin: self.stdio.stdin.clone(),
            stdout: self.stdio.stdout.clone(),
            stderr: self.stdio.stderr.clone(),
            terminal: self.stdio.terminal,
            exit_status: exit.map_or(0, |e| e.code),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            ..Default::default()
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

/// A container of the pod.
struct Container {
    id: String,
    role: Role,
    bundle: String,
    /// The pod's share, which holds its directory (named by its id).
    share: PodShare,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(Arc::clone(&self.init));
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| not_found(format!("exec {exec_id} not found in container {}", self.id)))
    }
}

/// The shim's task service.
pub struct Service {
    /// The shim's id: the pod's sandbox id (CRI) or the container's (`ctr run`).
    id: String,
    namespace: String,
    publisher: Arc<RemotePublisher>,
    exit: Arc<ExitSignal>,
    /// The pod, once its first container was created; the lock serializes the boot.
    pod: tokio::sync::Mutex<Option<(Arc<Pod>, Arc<Config>)>>,
    /// Shared with the pod's death watch, which ends every process when the VM dies.
    containers: Arc<Mutex<HashMap<String, Arc<Container>>>>,
    /// Every container's CPU and memory resources (from Create and each Update) and the pod's
    /// own: what the vCPU and memory targets are computed from.
    resources: Mutex<PodResources>,
    /// Serializes resource changes (Update, and Create of a pod member).
    resizing: tokio::sync::Mutex<()>,
    /// Turns the agent's OOM notifications into TaskOOM events while the pod runs.
    oom_events: Mutex<Option<JoinHandle<()>>>,
    /// Waits for the pod's VM or virtiofsd to end while the pod runs.
    death_watch: Mutex<Option<JoinHandle<()>>>,
}

impl Service {
    /// Task Update: the container's new resources, and the pod's vCPUs resized to fit them
    /// (docs/resize.md). Its failures leave through [`update_failure`].
    async fn update_resources(&self, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        let json = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| status(ttrpc::Code::INVALID_ARGUMENT, "Update without resources"))?;
        let invalid = |e: String| status(ttrpc::Code::INVALID_ARGUMENT, format!("{}: {e}", req.id));
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_slice(&json)
            .map_err(|e| invalid(format!("malformed LinuxResources: {e}")))?;
        let demand = Demand::of(&resources).map_err(|e| invalid(e.to_string()))?;
        let (pod, config) = self.running_pod().await?;
        if container.id == self.id && self.is_sandbox_container(&container) {
            // The pause container: its cgroup only, the pod's size follows its containers.
            return pod
                .sandbox
                .agent()
                .update_container(&req.id, json)
                .await
                .map(|()| api::Empty::new())
                .map_err(|e| agent_error(&format!("updating {}", req.id), &e));
        }
        self.resize_for(&req.id, demand, &pod, &config, Some(&json))
            .await
            .map(|()| api::Empty::new())
    }

    pub fn new(
        id: &str,
        namespace: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            id: id.to_string(),
            namespace: namespace.to_string(),
            publisher: Arc::new(publisher),
            exit,
            pod: tokio::sync::Mutex::new(None),
            containers: Arc::default(),
            resources: Mutex::default(),
            resizing: tokio::sync::Mutex::new(()),
            oom_events: Mutex::new(None),
            death_watch: Mutex::new(None),
        }
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(format!("container {id} not found")))
    }

    async fn running_pod(&self) -> TtrpcResult<(Arc<Pod>, Arc<Config>)> {
        let pod = self.pod.lock().await.clone().ok_or_else(|| {
            status(
                ttrpc::Code::FAILED_PRECONDITION,
                "the pod's VM is not running",
            )
        })?;
        // A dead pod answers at once instead of waiting out the agent's deadlines.
        if let Some(why) = pod.0.dead() {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("the pod's VM is gone: {why}"),
            ));
        }
        Ok(pod)
    }

    /// The pod's agent, with the deadline of container calls.
    async fn agent(&self) -> TtrpcResult<AgentClient> {
        let (pod, config) = self.running_pod().await?;
        Ok(container_agent(&pod, &config))
    }

    async fn publish(&self, topic: &str, event: Box<dyn Event>) {
        let ctx = ttrpc::context::Context::default();
        if let Err(e) = self
            .publisher
            .publish(ctx, topic, &self.namespace, event)
            .await
        {
            log::warn!("cannot publish {topic}: {e}");
        }
    }

    /// The pod of a container being created: booted for the pod's first container (a CRI
    /// sandbox, or a `ctr run` container), the running one for the pod's other containers.
    async fn pod_for(
        &self,
        id: &str,
        role: &Role,
        spec: &oci_spec::runtime::Spec,
        options: Option<&Any>,
    ) -> TtrpcResult<(Arc<Pod>, Arc<Config>)> {
        let mut slot = self.pod.lock().await;
        match (role, slot.as_ref()) {
            (Role::PodMember { sandbox_id }, Some(pod)) if *sandbox_id == self.id => {
                return Ok(pod.clone())
            }
            (Role::PodMember { sandbox_id }, _) => {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {id}: its sandbox {sandbox_id} is not running in this shim"),
                ))
            }
            (_, Some(_)) => {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!(
                        "container {id}: this shim's pod {} already has its sandbox",
                        self.id
                    ),
                ))
            }
            (_, None) => {}
        }
        let config = options::runtime_config(options)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, error_chain(&e)))?;
        log::set_max_level(config.log_level.filter());
        let annotations = spec.annotations().as_ref();
        let mut resources = SandboxResources::from_annotations(annotations);
        if *role == Role::Sandbox && !resources.is_empty() {
            // Pod-level resources: they take precedence over the containers' sum.
            let shape = CpuShape::from_cfs(
                resources.cpu_quota,
                resources.cpu_period,
                resources.cpu_shares,
            )
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, error_chain(&e)))?;
            let mut counted = lock(&self.resources);
            counted.cpu.pod = Some(shape).filter(|s| s.limit_millis.is_some());
            counted.memory.pod = resources.memory_bytes;
        }
        if resources.is_empty() {
            resources = SandboxResources::from_spec(spec);
        }
        let max_memory = spec::max_memory_mib(annotations)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, error_chain(&e)))?;
        let size = PodSize::of(&resources, max_memory, &config)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, error_chain(&e)))?;
        log::info!(
            "pod {}: booting with {} vCPUs (of {}), {} MiB (up to {} MiB)",
            self.id,
            size.vcpus,
            config.vcpus.max,
            size.memory_mib,
            size.max_memory_mib.unwrap_or(size.memory_mib)
        );
        let net_mode = spec::network_mode(spec);
        if net_mode == spec::PodNetworkMode::Host {
            return Err(status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!(
                    "pod {}: it asks for the host's network (hostNetwork: true, or no network \
                     namespace in its spec); a microVM cannot share the host's network namespace: \
                     run this pod with another RuntimeClass",
                    self.id
                ),
            ));
        }
        let placement = pod::Placement {
            cgroups_path: spec
                .linux()
                .as_ref()
                .and_then(|l| l.cgroups_path().as_ref())
                .map(|p| p.to_string_lossy().into_owned()),
            cpu_limit_millis: lock(&self.resources).cpu.limit_millis(),
            oom_score_adj: spec
                .process()
                .as_ref()
                .and_then(|p| p.oom_score_adj())
                .map(i64::from),
        };
        let pod = Pod::boot(&self.id, size, &config, &net_mode, &placement)
            .await
            .map_err(|e| status(ttrpc::Code::INTERNAL, error_chain(&e)))?;
        // Containers live on the share: without it nothing can run.
        let share = pod
            .sandbox
            .agent()
            .guest_info()
            .await
            .map(|i| i.share_error);
        let problem = match share {
            Ok(None) => None,
            Ok(Some(why)) => Some(format!("the guest could not mount the pod's share: {why}")),
            Err(e) => Some(format!(
                "the guest agent did not answer: {}",
                error_chain(&e)
            )),
        };
        if let Some(problem) = problem {
            pod.stop(Duration::from_secs(config.timeouts.stop_grace_secs))
                .await;
            return Err(status(
                ttrpc::Code::INTERNAL,
                format!("pod {}: {problem}", self.id),
            ));
        }
        let entry = (Arc::new(pod), Arc::new(config));
        *slot = Some(entry.clone());
        *lock(&self.oom_events) = Some(self.forward_ooms(entry.0.sandbox.agent().clone()));
        *lock(&self.death_watch) = Some(self.watch_pod(Arc::clone(&entry.0)));
        Ok(entry)
    }

    async fn create_container(
        &self,
        req: &api::CreateTaskRequest,
    ) -> TtrpcResult<(Arc<Container>, u32)> {
        let id = &req.id;
        let bundle = Path::new(&req.bundle);
        let oci = spec::load(bundle)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, error_chain(&e)))?;
        let role = spec::role(oci.annotations().as_ref());
        let (pod, config) = self.pod_for(id, &role, &oci, req.options.as_ref()).await?;
        if matches!(role, Role::PodMember { .. }) {
            let score = oci.process().as_ref().and_then(|p| p.oom_score_adj());
            if let Some(score) = score {
                pod.raise_oom_score_adj(i64::from(score))
                    .map_err(|e| status(ttrpc::Code::INTERNAL, error_chain(&e)))?;
            }
        }
        if role != Role::Sandbox {
            let resources = oci
                .linux()
                .as_ref()
                .and_then(|l| l.resources().clone())
                .unwrap_or_default();
            let demand = Demand::of(&resources)
                .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, error_chain(&e)))?;
            // What a failed Update of this container gives back.
            let applied = serde_json::to_vec(&resources)
                .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
            lock(&self.resources).applied.insert(id.clone(), applied);
            // The pod grows (acknowledged) before the container exists, so it starts with its
            // CPUs and memory.
            self.resize_for(id, demand, &pod, &config, None).await?;
        }
        let root = oci
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_default();
        let bundle_rootfs = if root.is_absolute() {
            root
        } else {
            bundle.join(root)
        };
        let guest_dir = format!("{GUEST_SHARE}/{id}");
        let mut guest = spec::for_guest(oci, req.terminal, &guest_dir, |p| {
            std::fs::metadata(p).ok().map(|m| m.is_dir())
        })
        .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, error_chain(&e)))?;

        let share = pod.share().clone();
        if share.container_dir(id).exists() {
            share.remove_container(id);
        }
        let rootfs = req.rootfs.clone();
        let binds = guest.binds.clone();
        let (mount_share, mount_id) = (share.clone(), id.clone());
        tokio::task::spawn_blocking(move || {
            pod::mount_container(&mount_share, &mount_id, &rootfs, &bundle_rootfs, &binds)
        })
        .await
        .map_err(|e| status(ttrpc::Code::INTERNAL, e.to_string()))?
        .map_err(|e| {
            share.remove_container(id);
            status(ttrpc::Code::INVALID_ARGUMENT, error_chain(&e))
        })?;
        // The submounts the binds carried, as they are now on the host.
        let container_dir = share.container_dir(id);
        spec::add_submount_binds(&mut guest.spec, &guest_dir, &guest.binds, |b| {
            accordion_share::submounts(&container_dir.join(&b.target)).unwrap_or_else(|e| {
                log::warn!(
                    "{id}: cannot list the submounts of {}: {e}",
                    b.target.display()
                );
                Vec::new()
            })
        });
        let spec_json = match spec::to_json(&guest.spec) {
            Ok(json) => json,
            Err(e) => {
                share.remove_container(id);
                return Err(status(ttrpc::Code::INVALID_ARGUMENT, error_chain(&e)));
            }
        };

        let agent = container_agent(&pod, &config);
        let created = agent
            .create_container(ContainerCreate {
                id: id.clone(),
                bundle: guest_dir,
                spec_json,
                tty: req.terminal,
            })
            .await;
        let pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                share.remove_container(id);
                return Err(agent_error(
                    &format!("creating container {id} in the guest"),
                    &e,
                ));
            }
        };
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Arc::new(Process::new(id, "", stdio));
        init.pid.store(pid, Ordering::SeqCst);
        if let Err(e) = self.attach(&agent, &init, &config).await {
            let _ = agent.delete_container(id, true).await;
            share.remove_container(id);
            return Err(e);
        }
        let container = Arc::new(Container {
            id: id.clone(),
            role,
            bundle: req.bundle.clone(),
            share,
            init,
            execs: Mutex::new(HashMap::new()),
        });
        Ok((container, pid))
    }

    /// Connects the main process's stdio to containerd's before it starts, so no output is lost.
    async fn attach(
        &self,
        agent: &AgentClient,
        init: &Arc<Process>,
        _config: &Config,
    ) -> TtrpcResult<()> {
        let io_err = |what: &str, e: std::io::Error| {
            status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("container {}: {what}: {e}", init.container_id),
            )
        };
        let stdout = stdio::open_output(&init.stdio.stdout)
            .await
            .map_err(|e| io_err("stdout", e))?;
        let stderr = stdio::open_output(&init.stdio.stderr)
            .await
            .map_err(|e| io_err("stderr", e))?;
        let stdin = stdio::open_stdin(&init.stdio.stdin).map_err(|e| io_err("stdin", e))?;
        let (reader, closer) = match stdin {
            Some(s) => (Some(s.reader), Some(s.closer)),
            None => (None, None),
        };
        *lock(&init.stdin) = closer;
        let resizes = if init.stdio.terminal {
            let (tx, rx) = mpsc::channel(16);
            *lock(&init.resize) = Some(tx);
            Some(rx)
        } else {
            None
        };
        let agent = agent.clone();
        let id = init.container_id.clone();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            if let Err(e) = agent
                .attach_container_with(&id, reader, resizes, stdout, stderr)
                .await
            {
                log::warn!("container {id}: stdio: {}", error_chain(&e));
            }
            let _ = done_tx.send(());
        });
        lock(&init.tasks).push(task);
        *lock(&init.io_done) = Some(done_rx);
        Ok(())
    }

    async fn start_init(&self, container: &Arc<Container>) -> TtrpcResult<u32> {
        let init = Arc::clone(&container.init);
        if init.status() != api::Status::CREATED {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("container {} is not in the created state", container.id),
            ));
        }
        let agent = self.agent().await?;
        agent
            .start_container(&container.id)
            .await
            .map_err(|e| agent_error(&format!("starting container {}", container.id), &e))?;
        init.set_status(api::Status::RUNNING);
        let io_done = lock(&init.io_done).take();
        let publisher = Arc::clone(&self.publisher);
        let namespace = self.namespace.clone();
        let process = Arc::clone(&init);
        let waiter = tokio::spawn(async move {
            let code = match agent.wait_container(&process.container_id, FOREVER).await {
                Ok(status) => status.shell_code(),
                Err(e) => {
                    log::warn!(
                        "container {}: lost its main process: {}",
                        process.container_id,
                        error_chain(&e)
                    );
                    255
                }
            };
            if let Some(io) = io_done {
                let _ = tokio::time::timeout(IO_DRAIN, io).await;
            }
            if let Some(exit) = process.set_exited(u32::try_from(code).unwrap_or(255)) {
                publish_exit(&publisher, &namespace, &process, exit).await;
            }
        });
        lock(&init.tasks).push(waiter);
        Ok(init.pid())
    }

    async fn start_exec(&self, container: &Arc<Container>, exec_id: &str) -> TtrpcResult<u32> {
        let process = container.process(exec_id)?;
        let spec = lock(&process.pending).take().ok_or_else(|| {
            status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("exec {exec_id} was already started"),
            )
        })?;
        let agent = self.agent().await?;
        let io_err = |what: &str, e: std::io::Error| {
            status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("exec {exec_id}: {what}: {e}"),
            )
        };
        let stdout = stdio::open_output(&process.stdio.stdout)
            .await
            .map_err(|e| io_err("stdout", e))?;
        let stderr = stdio::open_output(&process.stdio.stderr)
            .await
            .map_err(|e| io_err("stderr", e))?;
        let stdin = stdio::open_stdin(&process.stdio.stdin).map_err(|e| io_err("stdin", e))?;
        let reader = match stdin {
            Some(s) => {
                *lock(&process.stdin) = Some(s.closer);
                Some(s.reader)
            }
            None => None,
        };
        let resizes = if process.stdio.terminal {
            let (tx, rx) = mpsc::channel(16);
            *lock(&process.resize) = Some(tx);
            Some(rx)
        } else {
            None
        };
        let (started_tx, started_rx) = oneshot::channel();
        let hooks = ExecHooks {
            resizes,
            started: Some(started_tx),
        };
        let cid = container.id.clone();
        let run = tokio::spawn(async move {
            agent
                .exec_in_container_with(&cid, spec, reader, hooks, stdout, stderr)
                .await
        });
        match started_rx.await {
            Ok(pid) => {
                process.pid.store(pid, Ordering::SeqCst);
                process.set_status(api::Status::RUNNING);
                let publisher = Arc::clone(&self.publisher);
                let namespace = self.namespace.clone();
                let p = Arc::clone(&process);
                let waiter = tokio::spawn(async move {
                    let code = match run.await {
                        Ok(Ok(status)) => status.shell_code(),
                        Ok(Err(e)) => {
                            log::warn!("exec {}: {}", p.exec_id, error_chain(&e));
                            255
                        }
                        Err(_) => 255,
                    };
                    if let Some(exit) = p.set_exited(u32::try_from(code).unwrap_or(255)) {
                        publish_exit(&publisher, &namespace, &p, exit).await;
                    }
                });
                lock(&process.tasks).push(waiter);
                Ok(pid)
            }
            Err(_) => {
                let why = match run.await {
                    Ok(Err(e)) => agent_error(&format!("exec {exec_id}"), &e),
                    _ => status(
                        ttrpc::Code::INTERNAL,
                        format!("exec {exec_id} did not start"),
                    ),
                };
                process.set_exited(255);
                Err(why)
            }
        }
    }

    /// Resizes the pod for container `id`'s new `demand` (docs/resize.md): its vCPUs and, when
    /// its VM can grow, its memory, then (for an Update, `resources_json`) the container's
    /// cgroup in the guest. Memory grows first and shrinks last, so a container's limit never
    /// exceeds the VM; a failure at any step takes back what the earlier ones changed, so the
    /// container's old limits stay in force in a VM of the old size.
    async fn resize_for(
        &self,
        id: &str,
        demand: Demand,
        pod: &Pod,
        config: &Config,
        resources_json: Option<&[u8]>,
    ) -> TtrpcResult<()> {
        let _serial = self.resizing.lock().await;
        let before = lock(&self.resources).clone();
        let mut next = before.clone();
        next.cpu.containers.insert(id.to_string(), demand.cpu);
        next.memory.containers.insert(id.to_string(), demand.memory);
        if let Some(json) = resources_json {
            // The pod-level resources in the sandbox annotations describe the pod as kubelet
            // created it; an in-place resize changed it since, and containerd 1.7 has no call
            // that tells the shim the new pod total. From now on the containers' sum counts.
            next.cpu.pod = None;
            next.memory.pod = None;
            next.applied.insert(id.to_string(), json.to_vec());
        }
        let invalid =
            |e: policy::PolicyError| status(ttrpc::Code::INVALID_ARGUMENT, format!("{id}: {e}"));
        let v = &config.vcpus;
        let target = next
            .cpu
            .target(v.sizing_policy, v.min, v.max)
            .map_err(invalid)?;
        let memory = self.memory_target(pod, &next.memory, demand, resources_json.is_some())?;
        let memory = memory.map(|to| {
            let from = pod
                .sandbox
                .vm_memory()
                .map_or(pod.sandbox.memory_mib() * MIB, |m| m.target());
            (from, to)
        });
        let mut changed = Changed::default();
        let result = self
            .apply(
                id,
                target,
                memory,
                pod,
                config,
                resources_json,
                &before,
                &mut changed,
            )
            .await;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                self.take_back(id, pod, config, changed).await;
                return Err(e);
            }
        };
        pod.sandbox.set_cpu_limit(next.cpu.limit_millis());
        *lock(&self.resources) = next;
        log::info!(
            "{id}: pod at {target} vCPUs (guest online {}){}{}",
            outcome.guest_online,
            if outcome.changed {
                format!(" in {:?}", outcome.latency)
            } else {
                String::new()
            },
            match memory {
                Some((_, to)) => format!(", {} MiB of memory", to / MIB),
                None => String::new(),
            }
        );
        Ok(())
    }

    /// The pod's memory target (bytes) for `next`, when its VM can grow; for a VM that cannot, a
    /// container's new limit (an Update's) must fit the VM as it is.
    fn memory_target(
        &self,
        pod: &Pod,
        next: &PodMemory,
        demand: Demand,
        update: bool,
    ) -> TtrpcResult<Option<u64>> {
        let (boot, max) = (pod.sandbox.memory_mib(), pod.sandbox.max_memory_mib());
        let invalid = |e: policy::PolicyError| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string());
        if max <= boot {
            if update {
                policy::check_memory_limit(demand.memory, boot).map_err(invalid)?;
            }
            return Ok(None);
        }
        let mib = next
            .target_mib(pod::GUEST_OVERHEAD_MIB, boot, max)
            .map_err(invalid)?;
        Ok(Some(mib * MIB))
    }

    /// The steps of a resize, in their order; `changed` records each one done.
    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &self,
        id: &str,
        vcpus: u32,
        memory: Option<(u64, u64)>,
        pod: &Pod,
        config: &Config,
        resources_json: Option<&[u8]>,
        before: &PodResources,
        changed: &mut Changed,
    ) -> TtrpcResult<crate::resize::ResizeOutcome> {
        let timeout = config.resize_timeout();
        let resize_memory = |to: u64| async move {
            pod.sandbox
                .resize_memory(to, timeout)
                .await
                .map_err(|e| memory_resize_error(id, to, &e))
        };
        let grow = memory.filter(|(from, to)| to > from);
        let shrink = memory.filter(|(from, to)| to < from);
        if let Some((_, to)) = grow {
            // Recorded first: a grow that fails part way is taken back too.
            changed.memory = grow;
            resize_memory(to).await?;
        }
        let v = &config.vcpus;
        let vcpus_before = before.cpu.target(v.sizing_policy, v.min, v.max);
        let outcome = pod
            .sandbox
            .resize(vcpus, timeout)
            .await
            .map_err(|e| resize_error(id, vcpus, &e))?;
        changed.vcpus = vcpus_before.ok().filter(|&b| b != vcpus);
        if let Some(json) = resources_json {
            if let Err(e) = pod
                .sandbox
                .agent()
                .update_container(id, json.to_vec())
                .await
            {
                return Err(agent_error(
                    &format!("{id}: the guest has {vcpus} vCPUs but its cgroup was not updated"),
                    &e,
                ));
            }
            changed.cgroup = Some(before.applied.get(id).cloned().unwrap_or_default());
        }
        if let Some((_, to)) = shrink {
            changed.memory = shrink;
            resize_memory(to).await?;
        }
        Ok(outcome)
    }

    /// Takes back what a failed resize changed, in the reverse order: the VM ends at its old
    /// size and the container with its old resources. Failures here are logged: the caller's
    /// error is what containerd sees.
    async fn take_back(&self, id: &str, pod: &Pod, config: &Config, changed: Changed) {
        let timeout = config.resize_timeout();
        let memory = |from: u64| async move {
            if let Err(e) = pod.sandbox.resize_memory(from, timeout).await {
                log::warn!(
                    "{id}: cannot return to {} MiB of memory: {}",
                    from / MIB,
                    error_chain(&e)
                );
            }
        };
        // A shrink is undone by a grow, which goes before the limits rise again.
        let shrunk = changed.memory.filter(|(from, to)| from > to);
        if let Some((from, _)) = shrunk {
            memory(from).await;
        }
        if let Some(json) = changed.cgroup.filter(|j| !j.is_empty()) {
            if let Err(e) = pod.sandbox.agent().update_container(id, json).await {
                log::warn!(
                    "{id}: cannot give the container its old resources back: {}",
                    error_chain(&e)
                );
            }
        }
        if let Some(previous) = changed.vcpus {
            if let Err(e) = pod.sandbox.resize(previous, timeout).await {
                log::warn!(
                    "{id}: cannot return to {previous} vCPUs: {}",
                    error_chain(&e)
                );
            }
        }
        if let Some((from, _)) = changed.memory.filter(|(from, to)| from < to) {
            memory(from).await;
        }
    }

    fn is_sandbox_container(&self, container: &Container) -> bool {
        container.role == Role::Sandbox
    }

    /// Publishes TaskOOM for the OOM kills the agent reports in this pod's containers.
    fn forward_ooms(&self, agent: AgentClient) -> JoinHandle<()> {
        let containers = Arc::clone(&self.containers);
        super::oom::forward(
            agent,
            Arc::clone(&self.publisher),
            self.namespace.clone(),
            move |id| lock(&containers).contains_key(id),
        )
    }

    /// The pod's death watch: when its VM stops (a guest panic, a vCPU failure) or virtiofsd
    /// exits while the pod runs, the pod is dead. Every process still running is reported exited
    /// (status 255) at once, instead of when the agent's connection finally times out; a dead
    /// virtiofsd also takes the VM down (its containers lost their root filesystems, and would
    /// otherwise hang on them). containerd then stops and removes the pod as usual.
    fn watch_pod(&self, pod: Arc<Pod>) -> JoinHandle<()> {
        let containers = Arc::clone(&self.containers);
        let publisher = Arc::clone(&self.publisher);
        let namespace = self.namespace.clone();
        let id = self.id.clone();
        let vm_exit = pod.sandbox.exit_watch();
        let virtiofsd_exit = pod.take_virtiofsd_exit();
        tokio::spawn(async move {
            let vm_stopped = async {
                let Some(watch) = vm_exit else {
                    return std::future::pending().await;
                };
                // A second at a time: a blocking wait that outlived the pod would hold the
                // shim's exit (tokio waits for blocking tasks when its runtime drops).
                loop {
                    let w = watch.clone();
                    match tokio::task::spawn_blocking(move || w.wait_timeout(WATCH_SLICE)).await {
                        Ok(Some(reason)) => {
                            break format!("its VM stopped ({})", describe_exit(&reason))
                        }
                        Ok(None) => {}
                        Err(_) => break "its VM stopped".to_string(),
                    }
                }
            };
            let virtiofsd_died = async {
                // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open and unchanged
                // until it is dropped.
                let registered = virtiofsd_exit.map(|fd| unsafe {
                    AsyncFd::register_with_interest(fd.into_owned(), Interest::READABLE)
                });
                match registered {
                    Some(Ok(fd)) => {
                        let _ = fd.readable().await;
                        "virtiofsd, which serves its containers' files, exited".to_string()
                    }
                    Some(Err(e)) => {
                        log::warn!("pod {id}: virtiofsd is not watched: {}", e.into_parts().1);
                        std::future::pending().await
                    }
                    None => std::future::pending().await,
                }
            };
            let (reason, vm_down) = tokio::select! {
                why = vm_stopped => (why, true),
                why = virtiofsd_died => (why, false),
            };
            log::error!(
                "pod {id}: {reason}; every process of the pod is reported exited with status {DEAD_POD_STATUS}"
            );
            pod.mark_dead(&reason);
            if !vm_down {
                pod.sandbox.kill().await;
            }
            let mut processes: Vec<Arc<Process>> = Vec::new();
            for c in lock(&containers).values() {
                processes.push(Arc::clone(&c.init));
                processes.extend(lock(&c.execs).values().cloned());
            }
            for process in processes {
                if let Some(exit) = process.set_exited(DEAD_POD_STATUS) {
                    publish_exit(&publisher, &namespace, &process, exit).await;
                }
            }
        })
    }

    /// Ends the pod: the VM, virtiofsd, the share. The shim then exits.
    async fn stop_pod(&self) {
        for task in [&self.oom_events, &self.death_watch] {
            if let Some(task) = lock(task).take() {
                task.abort();
            }
        }
        let pod = self.pod.lock().await.take();
        if let Some((pod, config)) = pod {
            pod.stop(Duration::from_secs(config.timeouts.stop_grace_secs))
                .await;
        }
    }
}

/// How a VM stopped, for a person.
fn describe_exit(reason: &accordion_vmm::ExitReason) -> String {
    use accordion_vmm::ExitReason as R;
    match reason {
        R::PowerOff => "the guest powered off".into(),
        R::Reset => "the guest reset; its kernel panics with panic=-1 this way".into(),
        R::Crash => "the guest kernel reported a crash".into(),
        R::Shutdown => "the host stopped it".into(),
        R::VcpuFailed { vcpu, error } => format!("vCPU {vcpu} failed: {error}"),
        R::DevicesFailed { error } => format!("its device manager failed: {error}"),
        R::ProcessEnded { status } => format!("its VMM process {status}"),
    }
}

async fn publish_exit(publisher: &RemotePublisher, namespace: &str, p: &Process, exit: Exit) {
    let event = ev::TaskExit {
        container_id: p.container_id.clone(),
        id: if p.exec_id.is_empty() {
            p.container_id.clone()
        } else {
            p.exec_id.clone()
        },
        pid: p.pid(),
        exit_status: exit.code,
        exited_at: MessageField::some(timestamp(exit.at)),
        ..Default::default()
    };
    let ctx = ttrpc::context::Context::default();
    if let Err(e) = publisher
        .publish(
            ctx,
            topics::TASK_EXIT_EVENT_TOPIC,
            namespace,
            Box::new(event),
        )
        .await
    {
        log::warn!("cannot publish the exit of {}: {e}", p.container_id);
    }
}

/// An exec's process spec (the OCI `process` JSON containerd sends in an Any).
fn exec_spec(spec: Option<&Any>, terminal: bool) -> TtrpcResult<ExecSpec> {
    let any =
        spec.ok_or_else(|| status(ttrpc::Code::INVALID_ARGUMENT, "exec without a process spec"))?;
    let process: oci_spec::runtime::Process = serde_json::from_slice(&any.value).map_err(|e| {
        status(
            ttrpc::Code::INVALID_ARGUMENT,
            format!("malformed exec process spec: {e}"),
        )
    })?;
    let argv = process.args().clone().unwrap_or_default();
    if argv.is_empty() {
        return Err(status(ttrpc::Code::INVALID_ARGUMENT, "exec without args"));
    }
    let tty_size = process.console_size().as_ref().map(|b| {
        (
            u32::try_from(b.height()).unwrap_or(0),
            u32::try_from(b.width()).unwrap_or(0),
        )
    });
    Ok(ExecSpec {
        argv,
        env: process.env().clone().unwrap_or_default(),
        cwd: process.cwd().display().to_string(),
        tty: terminal,
        timeout: None,
        tty_size,
    })
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        log::info!("create {} (bundle {})", req.id, req.bundle);
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(status(
                ttrpc::Code::UNIMPLEMENTED,
                "accordion cannot restore checkpoints (the container runs in a microVM)",
            ));
        }
        if lock(&self.containers).contains_key(&req.id) {
            return Err(status(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        let (container, pid) = match self.create_container(&req).await {
            Ok(created) => created,
            Err(e) => {
                log::error!("create {}: {e}", req.id);
                return Err(e);
            }
        };
        lock(&self.containers).insert(req.id.clone(), container);
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(ev::TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(ev::TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let container = self.container(&req.id)?;
        let pid = if req.exec_id.is_empty() {
            let pid = self.start_init(&container).await?;
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(ev::TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
            pid
        } else {
            let pid = self.start_exec(&container, &req.exec_id).await?;
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(ev::TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
            pid
        };
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let container = self.container(&req.id)?;
        if !req.exec_id.is_empty() {
            let process = container.process(&req.exec_id)?;
            if process.status() == api::Status::RUNNING {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("exec {} is still running", req.exec_id),
                ));
            }
            lock(&container.execs).remove(&req.exec_id);
            let exit = process.exited();
            return Ok(api::DeleteResponse {
                pid: process.pid(),
                exit_status: exit.map_or(0, |e| e.code),
                exited_at: exit.map(|e| timestamp(e.at)).into(),
                ..Default::default()
            });
        }
        let init = &container.init;
        if matches!(init.status(), api::Status::RUNNING | api::Status::PAUSED) {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("container {} is still running", req.id),
            ));
        }
        if let Ok(agent) = self.agent().await {
            // Force: a container that never started still has its init waiting in the guest.
            if let Err(e) = agent.delete_container(&req.id, true).await {
                if !matches!(
                    &e,
                    AgentClientError::Rpc {
                        code: tonic::Code::NotFound,
                        ..
                    }
                ) {
                    log::warn!("delete {} in the guest: {}", req.id, error_chain(&e));
                }
            }
        }
        let (share, id) = (container.share.clone(), container.id.clone());
        let _ = tokio::task::spawn_blocking(move || share.remove_container(&id)).await;
        lock(&self.containers).remove(&req.id);
        // The pod keeps its size until the next change: a restarting container gets it back.
        {
            let mut counted = lock(&self.resources);
            counted.cpu.containers.remove(&req.id);
            counted.memory.containers.remove(&req.id);
            counted.applied.remove(&req.id);
        }
        let exit = init.exited().unwrap_or(Exit {
            code: 255,
            at: SystemTime::now(),
        });
        init.set_exited(exit.code);
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(ev::TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid: init.pid(),
                exit_status: exit.code,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::DeleteResponse {
            pid: init.pid(),
            exit_status: exit.code,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        Ok(process.state(&container.bundle))
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let container = self.container(&req.id)?;
        let agent = self.agent().await?;
        let pids = agent
            .container_pids(&req.id)
            .await
            .map_err(|e| agent_error(&format!("pids of {}", req.id), &e))?;
        let processes = pids
            .into_iter()
            .map(|pid| containerd_shim::protos::types::task::ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        let _ = container;
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        let agent = self.agent().await?;
        agent
            .pause_container(&req.id)
            .await
            .map_err(|e| agent_error(&format!("pausing {}", req.id), &e))?;
        container.init.set_status(api::Status::PAUSED);
        self.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(ev::TaskPaused {
                container_id: req.id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        let agent = self.agent().await?;
        agent
            .resume_container(&req.id)
            .await
            .map_err(|e| agent_error(&format!("resuming {}", req.id), &e))?;
        if container.init.status() == api::Status::PAUSED {
            container.init.set_status(api::Status::RUNNING);
        }
        self.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(ev::TaskResumed {
                container_id: req.id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(status(
            ttrpc::Code::UNIMPLEMENTED,
            format!(
                "checkpoint of {} is not supported: accordion runs containers in a microVM",
                req.id
            ),
        ))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        if process.exited().is_some() {
            return Err(not_found(format!("process {} already finished", req.id)));
        }
        let signal = i32::try_from(req.signal)
            .map_err(|_| status(ttrpc::Code::INVALID_ARGUMENT, "signal out of range"))?;
        let agent = self.agent().await?;
        let result = if req.exec_id.is_empty() {
            agent.kill_container(&req.id, signal, req.all).await
        } else {
            agent
                .kill_container_exec(&req.id, process.pid(), signal)
                .await
        };
        result.map_err(|e| agent_error(&format!("signal {signal} to {}", req.id), &e))?;
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        if container.init.status() != api::Status::RUNNING {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.id),
            ));
        }
        let spec = exec_spec(req.spec.as_ref(), req.terminal)?;
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        {
            let mut execs = lock(&container.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(status(
                    ttrpc::Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            let process = Process::new(&req.id, &req.exec_id, stdio);
            *lock(&process.pending) = Some(spec);
            execs.insert(req.exec_id.clone(), Arc::new(process));
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(ev::TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        let tx = lock(&process.resize).clone();
        match tx {
            Some(tx) => {
                let _ = tx.try_send((req.height, req.width));
                Ok(api::Empty::new())
            }
            None if !process.stdio.terminal => Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("{} has no terminal", req.id),
            )),
            None => Ok(api::Empty::new()),
        }
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        if req.stdin {
            if let Some(stdin) = lock(&process.stdin).as_mut() {
                stdin.close();
            }
        }
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        self.update_resources(req).await.map_err(update_failure)
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        let exit = process.wait().await;
        Ok(api::WaitResponse {
            exit_status: exit.code,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let _ = self.container(&req.id)?;
        let agent = self.agent().await?;
        let s = agent
            .container_stats(&req.id)
            .await
            .map_err(|e| agent_error(&format!("stats of {}", req.id), &e))?;
        let m = &s.memory_stat;
        let metrics = v2::Metrics {
            pids: MessageField::some(v2::PidsStat {
                current: s.pids_current,
                limit: s.pids_max.unwrap_or(0),
                ..Default::default()
            }),
            cpu: MessageField::some(v2::CPUStat {
                usage_usec: s.cpu_usage_usec,
                user_usec: s.cpu_user_usec,
                system_usec: s.cpu_system_usec,
                nr_periods: s.cpu_nr_periods,
                nr_throttled: s.cpu_nr_throttled,
                throttled_usec: s.cpu_throttled_usec,
                nr_bursts: s.cpu_nr_bursts,
                burst_usec: s.cpu_burst_usec,
                ..Default::default()
            }),
            memory: MessageField::some(v2::MemoryStat {
                anon: m.anon,
                file: m.file,
                kernel_stack: m.kernel_stack,
                slab: m.slab,
                sock: m.sock,
                shmem: m.shmem,
                file_mapped: m.file_mapped,
                file_dirty: m.file_dirty,
                file_writeback: m.file_writeback,
                anon_thp: m.anon_thp,
                inactive_anon: m.inactive_anon,
                active_anon: m.active_anon,
                inactive_file: m.inactive_file,
                active_file: m.active_file,
                unevictable: m.unevictable,
                slab_reclaimable: m.slab_reclaimable,
                slab_unreclaimable: m.slab_unreclaimable,
                pgfault: m.pgfault,
                pgmajfault: m.pgmajfault,
                workingset_refault: m.workingset_refault,
                workingset_activate: m.workingset_activate,
                workingset_nodereclaim: m.workingset_nodereclaim,
                pgrefill: m.pgrefill,
                pgscan: m.pgscan,
                pgsteal: m.pgsteal,
                pgactivate: m.pgactivate,
                pgdeactivate: m.pgdeactivate,
                pglazyfree: m.pglazyfree,
                pglazyfreed: m.pglazyfreed,
                thp_fault_alloc: m.thp_fault_alloc,
                thp_collapse_alloc: m.thp_collapse_alloc,
                usage: s.memory_current_bytes,
                usage_limit: s.memory_max_bytes.unwrap_or(u64::MAX),
                swap_usage: s.memory_swap_current_bytes.unwrap_or(0),
                swap_limit: s.memory_swap_max_bytes.unwrap_or(u64::MAX),
                max_usage: s.memory_peak_bytes.unwrap_or(0),
                ..Default::default()
            }),
            memory_events: MessageField::some(v2::MemoryEvents {
                low: s.memory_events.low,
                high: s.memory_events.high,
                max: s.memory_events.max,
                oom: s.memory_events.oom,
                oom_kill: s.memory_events.oom_kill,
                oom_group_kill: s.memory_events.oom_group_kill,
                ..Default::default()
            }),
            ..Default::default()
        };
        // The type URL is the bare message name, as Go's typeurl writes it: ctr and the CRI
        // plugin resolve that (a type.googleapis.com/ prefix decodes to a type they reject).
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| status(ttrpc::Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = lock(&self.containers)
            .get(&req.id)
            .map_or(0, |c| c.init.pid());
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        // One shim serves the whole pod: it ends with the pod's last container.
        if !lock(&self.containers).is_empty() {
            return Ok(api::Empty::new());
        }
        log::info!("pod {}: shutting down", self.id);
        self.stop_pod().await;
        self.exit.signal();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_and_message(e: &ttrpc::Error) -> (ttrpc::Code, String) {
        match e {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message.clone()),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn test_no_update_failure_leaves_as_a_code_containerd_takes_for_success() {
        // The agent refusing the pause container's cgroup update (NotFound), and one that cannot.
        for (agent_code, expected) in [
            (tonic::Code::NotFound, ttrpc::Code::FAILED_PRECONDITION),
            (tonic::Code::Unimplemented, ttrpc::Code::INTERNAL),
            (tonic::Code::InvalidArgument, ttrpc::Code::INVALID_ARGUMENT),
        ] {
            let agent = AgentClientError::Rpc {
                code: agent_code,
                message: "no cgroup for c1".into(),
            };
            let e = update_failure(agent_error("updating c1", &agent));
            let (code, message) = code_and_message(&e);
            assert_eq!(code, expected, "{agent_code:?}");
            assert!(message.starts_with("updating c1: "), "{message}");
            assert!(message.contains("no cgroup for c1"), "{message}");
        }
        // Our own "no such container" keeps its message under a failing code.
        let (code, message) = code_and_message(&update_failure(not_found("container c9")));
        assert_eq!(
            (code, message.as_str()),
            (ttrpc::Code::FAILED_PRECONDITION, "container c9")
        );
        let (code, _) = code_and_message(&update_failure(status(
            ttrpc::Code::UNAVAILABLE,
            "the pod's VM is gone",
        )));
        assert_eq!(code, ttrpc::Code::UNAVAILABLE);
    }
}
