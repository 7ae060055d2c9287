//! The gRPC service `accordion.agent.v1.Containers` over libcontainer.
//!
//! Processes: libcontainer clones an intermediate process, which clones the container's init with
//! CLONE_PARENT, so init is a child of the agent. Creation therefore runs inside
//! [`Reaper::start_with`]: the reaper cannot take init's exit as an orphan's before it is
//! registered, nor the intermediate's status libcontainer waits for. The same holds for Exec's
//! tenant processes. libcontainer's calls block (clone, pipes, waitpid), so they run on tokio's
//! blocking threads.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use accordion_proto::agent::v1 as pb;
use accordion_proto::agent::v1::containers_server::{Containers, ContainersServer};
use accordion_proto::MAX_MESSAGE_BYTES;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{self, Executor, ExecutorError, ExecutorValidationError};
use nix::fcntl::OFlag;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::cgroup::{self, CgroupError};
use super::console::ConsoleSocket;
use super::events;
use super::oom::OomMonitor;
use super::spec::{self, SpecError};
use super::{validate_bundle, validate_id, ValidateError};
use super::{BUNDLES_ROOT, CGROUP_MOUNT, CGROUP_PARENT, OWN_BUNDLES_ROOT, STATE_ROOT};
use crate::exec::{Event, Input, Running, CHUNK_BYTES};
use crate::pty::PtyMaster;
use crate::reaper::{ExitStatus, Reaper};
use crate::server::{error_chain, exit_to_wire};

/// Buffered messages per stream direction (as for Agent.Exec).
const QUEUE: usize = 16;
/// ASCII EOT: "close stdin" on a terminal in canonical mode.
const VEOF: u8 = 0x04;
/// How long a client has to send the first message of Attach or Exec.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Pause and Resume wait for the kernel to report the cgroup frozen or thawed.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a forced Delete waits for the container's processes to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of a container operation.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// A bad id or bundle path.
    #[error(transparent)]
    Validate(#[from] ValidateError),
    /// A bad spec.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A bad resources document, or a cgroup file operation failed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Some other part of the request is unusable.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such container.
    #[error("No container {0:?}")]
    NotFound(String),
    /// The id is taken.
    #[error("Container {0:?} already exists")]
    Exists(String),
    /// The container's state does not allow the call.
    #[error("{0}")]
    State(String),
    /// The kernel did not report a change in time.
    #[error("{0}")]
    Timeout(String),
    /// The terminal of a tty process could not be set up.
    #[error(transparent)]
    Console(#[from] super::console::ConsoleError),
    /// The terminal could not be registered.
    #[error(transparent)]
    Pty(#[from] crate::pty::PtyError),
    /// libcontainer failed.
    #[error("libcontainer: {what}")]
    Libcontainer {
        /// The verb.
        what: &'static str,
        /// Why.
        #[source]
        source: LibcontainerError,
    },
    /// A file operation of the agent failed.
    #[error("Cannot {what}")]
    Io {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl ContainerError {
    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| ContainerError::Io { what, source }
    }

    fn lc(what: &'static str) -> impl FnOnce(LibcontainerError) -> Self {
        move |source| match source {
            LibcontainerError::IncorrectStatus(status) => {
                ContainerError::State(format!("Cannot {what} a container that is {status}"))
            }
            source => ContainerError::Libcontainer { what, source },
        }
    }
}

/// The gRPC status for `err`: the host's mistakes are INVALID_ARGUMENT / NOT_FOUND /
/// FAILED_PRECONDITION, the guest's are INTERNAL.
pub fn to_status(err: &ContainerError) -> Status {
    let message = error_chain(err);
    match err {
        ContainerError::Validate(_) | ContainerError::Spec(SpecError::Parse(_)) => {
            Status::invalid_argument(message)
        }
        ContainerError::Spec(SpecError::Invalid(_)) | ContainerError::InvalidArgument(_) => {
            Status::invalid_argument(message)
        }
        ContainerError::Cgroup(CgroupError::Parse(_) | CgroupError::Invalid(_)) => {
            Status::invalid_argument(message)
        }
        ContainerError::Libcontainer {
            source:
                LibcontainerError::InvalidSpec(_)
                | LibcontainerError::MissingSpec(_)
                | LibcontainerError::InvalidID(_),
            ..
        } => Status::invalid_argument(message),
        ContainerError::NotFound(_) => Status::not_found(message),
        ContainerError::Exists(_) => Status::already_exists(message),
        ContainerError::State(_) => Status::failed_precondition(message),
        ContainerError::Timeout(_) => Status::deadline_exceeded(message),
        _ => Status::internal(message),
    }
}

/// The main process's stdio as the agent holds it until Attach takes it: the parent ends of its
/// pipes, or its terminal's master.
enum MainStdio {
    Pipes {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    Pty(PtyMaster),
}

fn unreachable_stdio() -> Result<MainStdio, ContainerError> {
    Err(ContainerError::State("No stdio for the container".into()))
}

/// A number not used before in this agent, for file names.
fn next_serial() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A console socket path short enough for sun_path (108 bytes) whatever the id (≤ 64).
fn console_path(paths: &Paths, id: &str) -> PathBuf {
    paths
        .state
        .join(format!("console-{}-{id}.sock", next_serial()))
}

/// Runs an exec's process with the container's seccomp filter. libcontainer 0.7's tenant builder
/// rebuilds the exec's `linux` section from the namespaces, cgroup path, personality and time
/// offsets only, so the filter of the container would be lost and an exec would escape it; this
/// executor loads it right before execve, then hands over to libcontainer's default executor.
///
/// By then libcontainer has dropped the process's capabilities, and the kernel loads a filter
/// only for a process with CAP_SYS_ADMIN or no_new_privileges. A container that has neither
/// (kubelet's default: allowPrivilegeEscalation unset) gets no_new_privileges for its execs, so
/// they still run under its filter: never without it. runc loads the filter before the
/// capability drop instead, which libcontainer offers no hook for.
#[derive(Clone)]
struct SeccompExecutor {
    seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
}

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorError> {
        if let Some(seccomp) = &self.seccomp {
            let load = || {
                libcontainer::seccomp::initialize_seccomp(seccomp).map_err(|e| {
                    ExecutorError::Other(format!("Cannot load the container's seccomp filter: {e}"))
                })
            };
            let notify = match load() {
                Ok(notify) => notify,
                // Without the privilege to load it: with no_new_privileges, which needs none.
                Err(_) if !nix::sys::prctl::get_no_new_privs().unwrap_or(true) => {
                    nix::sys::prctl::set_no_new_privs().map_err(|e| {
                        ExecutorError::Other(format!("Cannot set no_new_privileges: {e}"))
                    })?;
                    load()?
                }
                Err(e) => return Err(e),
            };
            if notify.is_some() {
                // The filter is in place but nobody would answer its notifications.
                return Err(ExecutorError::Other(
                    "SCMP_ACT_NOTIFY filters are not supported for execs".into(),
                ));
            }
        }
        workload::default::get_executor().exec(spec)
    }

    fn validate(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorValidationError> {
        workload::default::get_executor().validate(spec)
    }
}

/// Removes a file when dropped (best effort).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// What the agent keeps per container besides libcontainer's state directory.
struct Entry {
    bundle: PathBuf,
    pid: u32,
    exit: watch::Receiver<Option<ExitStatus>>,
    stdio: Mutex<Option<MainStdio>>,
    /// Held by whatever reads and then changes the freezer state (Pause, Resume, Kill of every
    /// process, Exec's start), so one cannot undo the other halfway.
    freezer: tokio::sync::Mutex<()>,
}

impl Entry {
    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }
}

/// Where things live; tests may point them elsewhere.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Bundles must be below this.
    pub bundles: PathBuf,
    /// The agent's own bundle of each container (its config.json), on the guest's tmpfs.
    pub own_bundles: PathBuf,
    /// libcontainer's state root.
    pub state: PathBuf,
    /// The cgroup v2 mount.
    pub cgroup: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            bundles: BUNDLES_ROOT.into(),
            own_bundles: OWN_BUNDLES_ROOT.into(),
            state: STATE_ROOT.into(),
            cgroup: CGROUP_MOUNT.into(),
        }
    }
}

/// The Containers service.
#[derive(Clone)]
pub struct ContainersService {
    reaper: Reaper,
    paths: Arc<Paths>,
    containers: Arc<Mutex<HashMap<String, Arc<Entry>>>>,
    /// Started on first use (a handler, so inside the runtime).
    oom: Arc<OnceLock<OomMonitor>>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ContainerError> {
    // CLOEXEC: only the container's init gets them, as its 0–2 (dup2 clears the flag there).
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| ContainerError::Io {
        what: "create a stdio pipe".into(),
        source: e.into(),
    })
}

fn status_to_wire(status: ContainerStatus) -> pb::ContainerStatus {
    match status {
        ContainerStatus::Creating | ContainerStatus::Created => pb::ContainerStatus::Created,
        ContainerStatus::Running => pb::ContainerStatus::Running,
        ContainerStatus::Stopped => pb::ContainerStatus::Stopped,
        ContainerStatus::Paused => pb::ContainerStatus::Paused,
    }
}

fn env_list(env: &[String]) -> Result<Vec<(String, String)>, ContainerError> {
    env.iter()
        .map(|entry| match entry.split_once('=') {
            Some((k, v)) if !k.is_empty() && !entry.contains('\0') => {
                Ok((k.to_owned(), v.to_owned()))
            }
            _ => Err(ContainerError::InvalidArgument(format!(
                "env entry {entry:?} is not KEY=VALUE"
            ))),
        })
        .collect()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ContainerError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("container task failed: {e}")))?
        .map_err(|e| to_status(&e))
}

/// A created container: its init's pid, its bundle, its stdio, and its exit to come.
type Created = (
    u32,
    PathBuf,
    MainStdio,
    tokio::sync::oneshot::Receiver<ExitStatus>,
);

impl ContainersService {
    /// A service whose container processes are registered with `reaper`.
    pub fn new(reaper: Reaper) -> Self {
        Self::with_paths(reaper, Paths::default())
    }

    /// Same, with other directories (tests).
    pub fn with_paths(reaper: Reaper, paths: Paths) -> Self {
        Self {
            reaper,
            paths: Arc::new(paths),
            containers: Arc::default(),
            oom: Arc::default(),
        }
    }

    fn oom(&self) -> &OomMonitor {
        self.oom.get_or_init(OomMonitor::start)
    }

    /// Whether the container's cgroup is asked to be frozen. A cgroup that cannot be read (gone
    /// with the container) is not.
    fn frozen(&self, id: &str) -> bool {
        cgroup::freeze_requested(&self.cgroup_dir(id)).unwrap_or(false)
    }

    /// Freezes or thaws the cgroup `dir` and waits for the kernel to report it done. A freeze
    /// that does not complete in time is undone.
    async fn set_frozen(id: &str, dir: &Path, frozen: bool) -> Result<(), ContainerError> {
        // A write to cgroup.freeze only flags the tasks; it does not wait for them.
        cgroup::set_frozen(dir, frozen)?;
        let file = dir.join(cgroup::EVENTS);
        let want = u64::from(frozen);
        let done = events::wait_keyed(&file, "frozen", want, FREEZE_TIMEOUT)
            .await
            .map_err(ContainerError::io(format!("read {}", file.display())))?;
        if done {
            return Ok(());
        }
        let verb = if frozen { "freeze" } else { "thaw" };
        if frozen {
            let _ = cgroup::set_frozen(dir, false);
        }
        Err(ContainerError::Timeout(format!(
            "Container {id:?} did not {verb} within {FREEZE_TIMEOUT:?}{}",
            if frozen { "; it was thawed again" } else { "" }
        )))
    }

    /// The tonic service with the message size limits applied.
    pub fn into_server(self) -> ContainersServer<Self> {
        ContainersServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn entry(&self, id: &str) -> Result<Arc<Entry>, ContainerError> {
        validate_id(id)?;
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_owned()))
    }

    fn cgroup_dir(&self, id: &str) -> PathBuf {
        self.paths.cgroup.join(CGROUP_PARENT).join(id)
    }

    fn load(paths: &Paths, id: &str) -> Result<Container, ContainerError> {
        Container::load(paths.state.join(id)).map_err(ContainerError::lc("load"))
    }

    /// Checks the bundle (really a directory under the root, no symlink on the way) and its
    /// rootfs, writes the prepared spec into a bundle of the agent's own, and has libcontainer
    /// create the container from it.
    fn create_blocking(
        reaper: &Reaper,
        paths: &Paths,
        request: pb::CreateContainerRequest,
    ) -> Result<Created, ContainerError> {
        let id = validate_id(&request.container_id)?.to_owned();
        let bundle = validate_bundle(&request.bundle, &paths.bundles)?;
        let real =
            fs::canonicalize(&bundle).map_err(|_| ValidateError::Bundle(request.bundle.clone()))?;
        if real != bundle || !real.is_dir() {
            return Err(ValidateError::Bundle(request.bundle.clone()).into());
        }
        let mut spec = spec::prepare(&request.spec_json, &id, request.tty)?;
        // The pod's network is the guest's: its net.* sysctls are set there, not by libcontainer.
        let sysctls = spec::take_network_sysctls(&mut spec)?;
        // prepare() checked root.path is relative without "..": a symlink is all that is left.
        let root_rel = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_default();
        let rootfs = fs::canonicalize(bundle.join(&root_rel)).map_err(|_| {
            SpecError::Invalid(format!(
                "root.path {root_rel:?} does not exist in the bundle"
            ))
        })?;
        if !rootfs.starts_with(&bundle) || !rootfs.is_dir() {
            return Err(SpecError::Invalid(format!(
                "root.path {root_rel:?} is not a directory inside the bundle"
            ))
            .into());
        }
        if paths.state.join(&id).exists() {
            return Err(ContainerError::Exists(id));
        }
        spec::set_network_sysctls(Path::new("/proc/sys"), &sysctls)?;
        // The host's bundle is read-only (the pod's share, so that the guest cannot rearrange
        // what the host mounts in it): the spec goes into a bundle of the agent's own on its
        // tmpfs, whose root.path is the rootfs checked above. Delete removes only that one.
        if let Some(mut root) = spec.root().clone() {
            root.set_path(rootfs);
            spec.set_root(Some(root));
        }
        let own = paths.own_bundles.join(&id);
        // A failed Create's leftover (there is no state for `id`, checked above).
        let _ = fs::remove_dir_all(&own);
        fs::create_dir_all(&own).map_err(ContainerError::io("create the agent's bundle"))?;
        let created = Self::create_in(reaper, paths, &id, own.clone(), &spec, request.tty);
        if created.is_err() {
            let _ = fs::remove_dir_all(&own);
        }
        created
    }

    /// Writes `spec` into the agent's bundle `bundle` and has libcontainer create the container.
    fn create_in(
        reaper: &Reaper,
        paths: &Paths,
        id: &str,
        bundle: PathBuf,
        spec: &oci_spec::runtime::Spec,
        tty: bool,
    ) -> Result<Created, ContainerError> {
        let id = id.to_owned();
        fs::write(bundle.join("config.json"), spec::to_json(spec)?)
            .map_err(ContainerError::io("write config.json"))?;
        fs::create_dir_all(&paths.state).map_err(ContainerError::io("create the state root"))?;

        let builder = ContainerBuilder::new(id.clone(), SyscallType::default())
            .with_root_path(&paths.state)
            .map_err(ContainerError::lc("create"))?
            .validate_id()
            .map_err(ContainerError::lc("create"))?;
        let (builder, stdio, console) = if tty {
            let console = ConsoleSocket::bind(&console_path(paths, &id))?;
            let builder = builder.with_console_socket(Some(console.path()));
            (builder, None, Some(console))
        } else {
            let (stdin_r, stdin_w) = pipe()?;
            let (stdout_r, stdout_w) = pipe()?;
            let (stderr_r, stderr_w) = pipe()?;
            let builder = builder
                .with_stdin(stdin_r)
                .with_stdout(stdout_w)
                .with_stderr(stderr_w);
            let stdio = MainStdio::Pipes {
                stdin: stdin_w,
                stdout: stdout_r,
                stderr: stderr_r,
            };
            (builder, Some(stdio), None)
        };
        let (pid, exit) = reaper.start_with(|| {
            let container = builder
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(ContainerError::lc("create"))?;
            let pid = container
                .pid()
                .ok_or_else(|| ContainerError::State("The container has no process".into()))?;
            Ok::<_, ContainerError>((pid.as_raw(), pid.as_raw()))
        })?;
        let stdio = match (stdio, console) {
            (Some(stdio), _) => stdio,
            (None, Some(console)) => {
                let master = console.receive_master()?;
                MainStdio::Pty(PtyMaster::from_owned(master)?)
            }
            (None, None) => unreachable_stdio()?,
        };
        Ok((pid.unsigned_abs(), bundle, stdio, exit))
    }
}

impl ContainersService {
    /// Starts a tenant process in container `start.container_id`, described as a process.json
    /// derived from the container's spec (so it runs as the container's user, with its
    /// capabilities), on pipes or a terminal.
    fn exec_blocking(
        reaper: &Reaper,
        paths: &Paths,
        bundle: &std::path::Path,
        start: pb::ContainerExecStart,
        env: &[(String, String)],
    ) -> Result<Running, ContainerError> {
        let id = start.container_id.clone();
        let config = fs::read(bundle.join("config.json"))
            .map_err(ContainerError::io("read the container's config.json"))?;
        let base: oci_spec::runtime::Spec =
            serde_json::from_slice(&config).map_err(SpecError::Parse)?;
        let cwd = (!start.cwd.is_empty()).then(|| PathBuf::from(&start.cwd));
        let process = spec::exec_process(&base, start.argv, env, cwd, start.tty)?;
        // In the container's state directory: it goes away with the container whatever happens.
        let process_json = paths
            .state
            .join(&id)
            .join(format!("exec-{}.json", next_serial()));
        fs::write(
            &process_json,
            serde_json::to_vec(&process).map_err(SpecError::Serialise)?,
        )
        .map_err(ContainerError::io("write the exec's process.json"))?;
        let _cleanup = RemoveOnDrop(process_json.clone());
        let executor = SeccompExecutor {
            seccomp: base.linux().as_ref().and_then(|l| l.seccomp().clone()),
        };
        let builder = ContainerBuilder::new(id.clone(), SyscallType::default())
            .with_root_path(&paths.state)
            .map_err(ContainerError::lc("exec in"))?
            .with_executor(executor);
        if start.tty {
            let console = ConsoleSocket::bind(&console_path(paths, &id))?;
            let builder = builder.with_console_socket(Some(console.path()));
            let (pid, exit) = reaper.start_with(|| {
                let pid = builder
                    .as_tenant()
                    .with_process(Some(&process_json))
                    .with_detach(true)
                    .build()
                    .map_err(ContainerError::lc("exec in"))?;
                Ok::<_, ContainerError>((pid.as_raw(), pid.as_raw()))
            })?;
            let master = PtyMaster::from_owned(console.receive_master()?)?;
            Ok(Running::from_pty(pid.unsigned_abs(), reaper, exit, master))
        } else {
            let (stdin_r, stdin_w) = pipe()?;
            let (stdout_r, stdout_w) = pipe()?;
            let (stderr_r, stderr_w) = pipe()?;
            let (pid, exit) = reaper.start_with(|| {
                let pid = builder
                    .with_stdin(stdin_r)
                    .with_stdout(stdout_w)
                    .with_stderr(stderr_w)
                    .as_tenant()
                    .with_process(Some(&process_json))
                    .with_detach(true)
                    .build()
                    .map_err(ContainerError::lc("exec in"))?;
                Ok::<_, ContainerError>((pid.as_raw(), pid.as_raw()))
            })?;
            Running::from_pipes(
                pid.unsigned_abs(),
                reaper,
                exit,
                stdin_w,
                stdout_r,
                stderr_r,
            )
            .map_err(|e| ContainerError::State(error_chain(&e)))
        }
    }
}

type AttachStream = Pin<Box<dyn Stream<Item = Result<pb::AttachResponse, Status>> + Send>>;
type ExecStream = Pin<Box<dyn Stream<Item = Result<pb::ExecResponse, Status>> + Send>>;

/// Copies `fd` to the client until EOF (every writer gone).
async fn pump_out(
    fd: OwnedFd,
    events: mpsc::Sender<Result<pb::AttachResponse, Status>>,
    wrap: fn(Vec<u8>) -> pb::attach_response::Response,
) {
    let Ok(mut rx) = pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                let msg = pb::AttachResponse {
                    response: Some(wrap(buf[..n].to_vec())),
                };
                if events.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                crate::warn!("reading container output failed: {e}");
                return;
            }
        }
    }
}

/// Feeds the client's Attach stdin to the main process.
async fn pump_in(mut stream: Streaming<pb::AttachRequest>, fd: OwnedFd) {
    use pb::attach_request::Request as R;
    let Ok(mut tx) = pipe::Sender::from_owned_fd(fd) else {
        return;
    };
    while let Ok(Some(msg)) = stream.message().await {
        match msg.request {
            // The process closed its stdin or exited: nothing more can be delivered.
            Some(R::Stdin(data)) if tx.write_all(&data).await.is_err() => return,
            // Dropping the sender closes the pipe: EOF for the process.
            Some(R::CloseStdin(_)) => return,
            _ => {}
        }
    }
}

/// Copies the terminal's output to the client until every process has closed it.
async fn pty_out(master: Arc<PtyMaster>, events: mpsc::Sender<Result<pb::AttachResponse, Status>>) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        match master.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                let msg = pb::AttachResponse {
                    response: Some(pb::attach_response::Response::Stdout(buf[..n].to_vec())),
                };
                if events.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                crate::warn!("reading the container's terminal failed: {e}");
                return;
            }
        }
    }
}

/// Feeds the client's Attach input to the terminal: bytes, resizes, and ^D for close.
async fn pty_in(mut stream: Streaming<pb::AttachRequest>, master: Arc<PtyMaster>) {
    use pb::attach_request::Request as R;
    while let Ok(Some(msg)) = stream.message().await {
        let result = match msg.request {
            Some(R::Stdin(data)) => master.write_all(&data).await,
            Some(R::CloseStdin(_)) => master.write_all(&[VEOF]).await,
            Some(R::Resize(size)) => master.resize(
                u16::try_from(size.rows).unwrap_or(u16::MAX),
                u16::try_from(size.cols).unwrap_or(u16::MAX),
            ),
            _ => Ok(()),
        };
        if result.is_err() {
            return;
        }
    }
}

fn exec_event_to_wire(event: Event) -> Result<pb::ExecResponse, Status> {
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

async fn forward_exec_input(
    mut stream: Streaming<pb::ContainerExecRequest>,
    input: mpsc::Sender<Input>,
) {
    use pb::container_exec_request::Request as R;
    loop {
        let item = match stream.message().await {
            Ok(Some(pb::ContainerExecRequest {
                request: Some(R::Stdin(data)),
            })) => Input::Stdin(data),
            Ok(Some(pb::ContainerExecRequest {
                request: Some(R::CloseStdin(_)),
            })) => Input::CloseStdin,
            Ok(Some(pb::ContainerExecRequest {
                request: Some(R::Resize(size)),
            })) => Input::Resize {
                rows: u16::try_from(size.rows).unwrap_or(u16::MAX),
                cols: u16::try_from(size.cols).unwrap_or(u16::MAX),
            },
            Ok(Some(_)) => continue,
            Ok(None) => {
                let _ = input.send(Input::CloseStdin).await;
                return;
            }
            Err(_) => {
                let _ = input.send(Input::Abort).await;
                return;
            }
        };
        if input.send(item).await.is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl Containers for ContainersService {
    async fn create(
        &self,
        request: Request<pb::CreateContainerRequest>,
    ) -> Result<Response<pb::CreateContainerResponse>, Status> {
        let request = request.into_inner();
        let id = request.container_id.clone();
        validate_id(&id).map_err(|e| to_status(&e.into()))?;
        if self
            .containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&id)
        {
            return Err(to_status(&ContainerError::Exists(id)));
        }
        let reaper = self.reaper.clone();
        let paths = self.paths.clone();
        let (pid, bundle, stdio, exit) =
            blocking(move || Self::create_blocking(&reaper, &paths, request)).await?;
        let (exit_tx, exit_rx) = watch::channel(None);
        let log_id = id.clone();
        let cgroup_dir = self.cgroup_dir(&id);
        tokio::spawn(async move {
            if let Ok(status) = exit.await {
                crate::info!("container {log_id}: exited: {status:?}");
                // The container ends with its init, as in a PID namespace of its own: what it
                // left running (an orphaned `nc` still holding the container's stdout) is
                // killed, or the output would never end and the exit never reach the host.
                let dir = cgroup_dir.clone();
                if let Ok(Err(e)) =
                    tokio::task::spawn_blocking(move || cgroup::kill_all(&dir)).await
                {
                    crate::warn!("container {log_id}: cannot kill what its init left: {e}");
                }
                let _ = exit_tx.send(Some(status));
            }
        });
        crate::info!("container {id}: created, pid {pid}");
        let entry = Entry {
            bundle,
            pid,
            exit: exit_rx,
            stdio: Mutex::new(Some(stdio)),
            freezer: tokio::sync::Mutex::new(()),
        };
        // Before Start: the process cannot run, let alone be OOM-killed, unwatched.
        self.oom().watch(&id, &self.cgroup_dir(&id));
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::new(entry));
        Ok(Response::new(pb::CreateContainerResponse { pid }))
    }

    async fn start(
        &self,
        request: Request<pb::StartContainerRequest>,
    ) -> Result<Response<pb::StartContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        self.entry(&id).map_err(|e| to_status(&e))?;
        let paths = self.paths.clone();
        blocking(move || {
            Self::load(&paths, &id)?
                .start()
                .map_err(ContainerError::lc("start"))
        })
        .await?;
        Ok(Response::new(pb::StartContainerResponse {}))
    }

    type AttachStream = AttachStream;

    async fn attach(
        &self,
        request: Request<Streaming<pb::AttachRequest>>,
    ) -> Result<Response<AttachStream>, Status> {
        let mut stream = request.into_inner();
        let first = tokio::time::timeout(START_TIMEOUT, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded("No container id"))??;
        let id = match first.and_then(|m| m.request) {
            Some(pb::attach_request::Request::ContainerId(id)) => id,
            _ => {
                return Err(Status::invalid_argument(
                    "The first Attach message must name the container",
                ))
            }
        };
        let entry = self.entry(&id).map_err(|e| to_status(&e))?;
        let stdio = entry
            .stdio
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| {
                to_status(&ContainerError::State(format!(
                    "Container {id:?} is already attached"
                )))
            })?;
        let (tx, rx) = mpsc::channel(QUEUE);
        match stdio {
            MainStdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                tokio::spawn(pump_in(stream, stdin));
                tokio::spawn(pump_out(stdout, tx.clone(), |d| {
                    pb::attach_response::Response::Stdout(d)
                }));
                tokio::spawn(pump_out(stderr, tx, |d| {
                    pb::attach_response::Response::Stderr(d)
                }));
            }
            MainStdio::Pty(master) => {
                let master = Arc::new(master);
                tokio::spawn(pty_in(stream, master.clone()));
                tokio::spawn(pty_out(master, tx));
            }
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn wait(
        &self,
        request: Request<pb::WaitContainerRequest>,
    ) -> Result<Response<pb::WaitContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        let entry = self.entry(&id).map_err(|e| to_status(&e))?;
        let mut exit = entry.exit.clone();
        let status = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Status::internal("The container's exit status was lost"))?
            .ok_or_else(|| Status::internal("The container's exit status was lost"))?;
        Ok(Response::new(pb::WaitContainerResponse {
            exit: Some(exit_to_wire(status)),
        }))
    }

    async fn kill(
        &self,
        request: Request<pb::KillContainerRequest>,
    ) -> Result<Response<pb::KillContainerResponse>, Status> {
        let request = request.into_inner();
        let signal = nix::sys::signal::Signal::try_from(request.signal)
            .map_err(|_| Status::invalid_argument(format!("{} is not a signal", request.signal)))?;
        let id = request.container_id;
        let entry = self.entry(&id).map_err(|e| to_status(&e))?;
        if request.exec_pid != 0 {
            let pid = request.exec_pid;
            let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            if !in_container_cgroup(&cgroup, &id) {
                return Err(Status::not_found(format!(
                    "No running exec with pid {pid} in container {id:?}"
                )));
            }
            return match self.reaper.kill(pid, signal, false) {
                Ok(()) => Ok(Response::new(pb::KillContainerResponse {})),
                Err(e) => Err(Status::not_found(error_chain(&e))),
            };
        }
        // libcontainer signals every process inside a freeze and thaws afterwards: a paused
        // container would wake up. Frozen, it cannot fork, so signalling its processes one by one
        // is just as safe.
        let _freezer = if request.all {
            Some(entry.freezer.lock().await)
        } else {
            None
        };
        if request.all && !entry.exited() && self.frozen(&id) {
            let dir = self.cgroup_dir(&id);
            blocking(move || Ok(cgroup::signal_all(&dir, signal)?)).await?;
            return Ok(Response::new(pb::KillContainerResponse {}));
        }
        let paths = self.paths.clone();
        blocking(move || {
            Self::load(&paths, &id)?
                .kill(signal, request.all)
                .map_err(ContainerError::lc("signal"))
        })
        .await?;
        Ok(Response::new(pb::KillContainerResponse {}))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteContainerRequest>,
    ) -> Result<Response<pb::DeleteContainerResponse>, Status> {
        let request = request.into_inner();
        let id = request.container_id;
        let entry = self.entry(&id).map_err(|e| to_status(&e))?;
        let exited = entry.exit.borrow().is_some();
        if !exited && !request.force {
            // Our own record is authoritative: libcontainer's looks at /proc/<pid>, which a
            // reused pid could fool.
            let paths = self.paths.clone();
            let load_id = id.clone();
            let status = blocking(move || {
                let mut c = Self::load(&paths, &load_id)?;
                c.refresh_status().map_err(ContainerError::lc("inspect"))?;
                Ok(c.status())
            })
            .await?;
            if status == ContainerStatus::Running || status == ContainerStatus::Paused {
                let status = if self.frozen(&id) {
                    ContainerStatus::Paused
                } else {
                    status
                };
                return Err(to_status(&ContainerError::State(format!(
                    "Container {id:?} is {status}; stop it first or force"
                ))));
            }
        }
        let cgroup = self.cgroup_dir(&id);
        if !exited && request.force && cgroup.exists() {
            // Kill everything first, frozen or not (cgroup.kill reaches frozen tasks), and let the
            // processes die: libcontainer then finds a stopped container and an empty cgroup to
            // remove, instead of racing the kill with a few short rmdir retries.
            let dir = cgroup.clone();
            blocking(move || Ok(cgroup::kill_all(&dir)?)).await?;
            let mut exit = entry.exit.clone();
            let _ = tokio::time::timeout(KILL_TIMEOUT, exit.wait_for(Option::is_some)).await;
            let events = cgroup.join(cgroup::EVENTS);
            if !matches!(
                events::wait_keyed(&events, "populated", 0, KILL_TIMEOUT).await,
                Ok(true)
            ) {
                crate::warn!("container {id}: processes left after SIGKILL; deleting anyway");
            }
        }
        let paths = self.paths.clone();
        let bundle = entry.bundle.clone();
        let force = request.force;
        let del_id = id.clone();
        blocking(move || {
            // Already gone from libcontainer's state (load fails): clean up what may be left.
            if let Ok(mut c) = Self::load(&paths, &del_id) {
                c.delete(force).map_err(ContainerError::lc("delete"))?;
            }
            if cgroup.exists() {
                fs::remove_dir(&cgroup).map_err(ContainerError::io(format!(
                    "remove the cgroup {}",
                    cgroup.display()
                )))?;
            }
            match fs::remove_dir_all(&bundle) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(ContainerError::io(format!("remove {}", bundle.display()))(
                    e,
                )),
            }
        })
        .await?;
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        self.oom().unwatch(&id);
        crate::info!("container {id}: deleted");
        Ok(Response::new(pb::DeleteContainerResponse {}))
    }

    async fn state(
        &self,
        request: Request<pb::ContainerStateRequest>,
    ) -> Result<Response<pb::ContainerStateResponse>, Status> {
        let id = request.into_inner().container_id;
        let entry = self.entry(&id).map_err(|e| to_status(&e))?;
        let exit = *entry.exit.borrow();
        let paths = self.paths.clone();
        let load_id = id.clone();
        let status = blocking(move || {
            let mut c = Self::load(&paths, &load_id)?;
            c.refresh_status().map_err(ContainerError::lc("inspect"))?;
            Ok(c.status())
        })
        .await?;
        // An exit we saw wins over /proc (the pid may be reused). The freezer is the agent's,
        // not libcontainer's: paused is what the cgroup says.
        let status = if exit.is_some() {
            pb::ContainerStatus::Stopped
        } else if status == ContainerStatus::Running && self.frozen(&id) {
            pb::ContainerStatus::Paused
        } else {
            status_to_wire(status)
        };
        Ok(Response::new(pb::ContainerStateResponse {
            container_id: id,
            status: status.into(),
            pid: if exit.is_some() { 0 } else { entry.pid },
            bundle: entry.bundle.display().to_string(),
            exit: exit.map(exit_to_wire),
        }))
    }

    type ExecStream = ExecStream;

    async fn exec(
        &self,
        request: Request<Streaming<pb::ContainerExecRequest>>,
    ) -> Result<Response<ExecStream>, Status> {
        let mut stream = request.into_inner();
        let first = tokio::time::timeout(START_TIMEOUT, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded("No start message"))??;
        let start = match first.and_then(|m| m.request) {
            Some(pb::container_exec_request::Request::Start(start)) => start,
            _ => {
                return Err(Status::invalid_argument(
                    "The first Exec message must be start",
                ))
            }
        };
        let id = start.container_id.clone();
        let entry = self.entry(&id).map_err(|e| to_status(&e))?;
        if entry.exited() {
            return Err(to_status(&ContainerError::State(format!(
                "Container {id:?} has exited"
            ))));
        }
        // The new process would join a frozen cgroup and freeze before it could report that it
        // started. Held until it has: a Pause waits for that.
        let _freezer = entry.freezer.lock().await;
        if self.frozen(&id) {
            return Err(to_status(&ContainerError::State(format!(
                "Container {id:?} is paused"
            ))));
        }
        if start.argv.first().is_none_or(String::is_empty)
            || start
                .argv
                .iter()
                .chain([&start.cwd])
                .any(|s| s.contains('\0'))
        {
            return Err(Status::invalid_argument("argv is empty or has a NUL byte"));
        }
        let env = env_list(&start.env).map_err(|e| to_status(&e))?;
        let reaper = self.reaper.clone();
        let paths = self.paths.clone();
        let bundle = entry.bundle.clone();
        let running =
            blocking(move || Self::exec_blocking(&reaper, &paths, &bundle, start, &env)).await?;
        let pid = running.pid;
        crate::info!("container {id}: exec pid {pid}");
        let (events_tx, events_rx) = mpsc::channel(QUEUE);
        let started = pb::ExecResponse {
            response: Some(pb::exec_response::Response::Started(pb::ExecStarted {
                exec_id: format!("{id}/{pid}"),
                pid,
            })),
        };
        let _ = events_tx.try_send(Ok(started));
        let (input_tx, input_rx) = mpsc::channel(QUEUE);
        tokio::spawn(forward_exec_input(stream, input_tx));
        tokio::spawn(async move {
            running.run(input_rx, events_tx, exec_event_to_wire).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(events_rx))))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateContainerRequest>,
    ) -> Result<Response<pb::UpdateContainerResponse>, Status> {
        let request = request.into_inner();
        let id = request.container_id;
        self.entry(&id).map_err(|e| to_status(&e))?;
        let dir = self.cgroup_dir(&id);
        blocking(move || {
            let resources = cgroup::parse_resources(&request.resources_json)?;
            let writes = cgroup::resource_writes(&resources)?;
            cgroup::apply(&dir, &writes)?;
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::UpdateContainerResponse {}))
    }

    async fn stats(
        &self,
        request: Request<pb::ContainerStatsRequest>,
    ) -> Result<Response<pb::ContainerStatsResponse>, Status> {
        let id = request.into_inner().container_id;
        self.entry(&id).map_err(|e| to_status(&e))?;
        let dir = self.cgroup_dir(&id);
        let s = blocking(move || Ok(cgroup::read_stats(&dir)?)).await?;
        Ok(Response::new(pb::ContainerStatsResponse {
            cpu_usage_usec: s.cpu_usage_usec,
            cpu_user_usec: s.cpu_user_usec,
            cpu_system_usec: s.cpu_system_usec,
            cpu_nr_periods: s.cpu_nr_periods,
            cpu_nr_throttled: s.cpu_nr_throttled,
            cpu_throttled_usec: s.cpu_throttled_usec,
            memory_current_bytes: s.memory_current,
            memory_max_bytes: s.memory_max,
            pids_current: s.pids_current,
            pids_max: s.pids_max,
            cpu_max: s.cpu_max,
            cpu_weight: s.cpu_weight,
            memory_stat: Some(s.memory_stat.into()),
            memory_events: Some(s.memory_events.into()),
            memory_swap_current_bytes: s.memory_swap_current,
            memory_swap_max_bytes: s.memory_swap_max,
            memory_peak_bytes: s.memory_peak,
            cpu_nr_bursts: s.cpu_nr_bursts,
            cpu_burst_usec: s.cpu_burst_usec,
        }))
    }

    async fn pause(
        &self,
        request: Request<pb::PauseContainerRequest>,
    ) -> Result<Response<pb::PauseContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        let entry = self.entry(&id).map_err(|e| to_status(&e))?;
        let _freezer = entry.freezer.lock().await;
        if entry.exited() {
            return Err(to_status(&ContainerError::State(format!(
                "Cannot pause container {id:?}: it has stopped"
            ))));
        }
        let paths = self.paths.clone();
        let load_id = id.clone();
        let status = blocking(move || {
            let mut c = Self::load(&paths, &load_id)?;
            c.refresh_status().map_err(ContainerError::lc("inspect"))?;
            Ok(c.status())
        })
        .await?;
        if status != ContainerStatus::Running {
            return Err(to_status(&ContainerError::State(format!(
                "Cannot pause container {id:?}: it is {status}"
            ))));
        }
        Self::set_frozen(&id, &self.cgroup_dir(&id), true)
            .await
            .map_err(|e| to_status(&e))?;
        crate::info!("container {id}: paused");
        Ok(Response::new(pb::PauseContainerResponse {}))
    }

    async fn resume(
        &self,
        request: Request<pb::ResumeContainerRequest>,
    ) -> Result<Response<pb::ResumeContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        let entry = self.entry(&id).map_err(|e| to_status(&e))?;
        let _freezer = entry.freezer.lock().await;
        if entry.exited() {
            return Err(to_status(&ContainerError::State(format!(
                "Cannot resume container {id:?}: it has stopped"
            ))));
        }
        Self::set_frozen(&id, &self.cgroup_dir(&id), false)
            .await
            .map_err(|e| to_status(&e))?;
        crate::info!("container {id}: resumed");
        Ok(Response::new(pb::ResumeContainerResponse {}))
    }

    async fn pids(
        &self,
        request: Request<pb::ContainerPidsRequest>,
    ) -> Result<Response<pb::ContainerPidsResponse>, Status> {
        let id = request.into_inner().container_id;
        self.entry(&id).map_err(|e| to_status(&e))?;
        let dir = self.cgroup_dir(&id);
        let pids = blocking(move || Ok(cgroup::all_pids(&dir)?)).await?;
        Ok(Response::new(pb::ContainerPidsResponse { pids }))
    }

    type WatchOomStream = WatchOomStream;

    async fn watch_oom(
        &self,
        _: Request<pb::WatchOomRequest>,
    ) -> Result<Response<WatchOomStream>, Status> {
        // Subscribed before the response (and its headers) goes out: a kill after the caller's
        // call returned is reported.
        let events = self.oom().subscribe();
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(forward_oom(events, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type WatchOomStream = Pin<Box<dyn Stream<Item = Result<pb::OomEvent, Status>> + Send>>;

/// Forwards OOM kills to one WatchOom stream until the client goes away.
async fn forward_oom(
    mut events: tokio::sync::broadcast::Receiver<String>,
    tx: mpsc::Sender<Result<pb::OomEvent, Status>>,
) {
    loop {
        let next = tokio::select! {
            next = events.recv() => next,
            () = tx.closed() => return,
        };
        match next {
            Ok(container_id) => {
                if tx.send(Ok(pb::OomEvent { container_id })).await.is_err() {
                    return;
                }
            }
            Err(RecvError::Lagged(missed)) => {
                crate::warn!("an OOM watcher fell behind: {missed} OOM events not delivered");
            }
            // The monitor is gone (the agent is stopping): end the stream.
            Err(RecvError::Closed) => return,
        }
    }
}

/// Whether a /proc/<pid>/cgroup text puts the process in container `id`'s cgroup (or below).
fn in_container_cgroup(proc_cgroup: &str, id: &str) -> bool {
    let own = format!("/{}/{id}", super::CGROUP_PARENT);
    proc_cgroup.lines().any(|l| {
        l.strip_prefix("0::")
            .is_some_and(|path| path == own || path.starts_with(&format!("{own}/")))
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn test_exec_pid_must_be_in_the_containers_cgroup() {
        assert!(in_container_cgroup("0::/accordion/c1\n", "c1"));
        assert!(in_container_cgroup("0::/accordion/c1/sub\n", "c1"));
        assert!(!in_container_cgroup("0::/accordion/c10\n", "c1"));
        assert!(!in_container_cgroup("0::/\n", "c1"));
        assert!(!in_container_cgroup("", "c1"));
    }
    use super::*;

    #[test]
    fn test_to_status_maps_host_mistakes() {
        let cases: Vec<(ContainerError, tonic::Code)> = vec![
            (
                ValidateError::Id("a/b".into()).into(),
                tonic::Code::InvalidArgument,
            ),
            (
                SpecError::Invalid("x".into()).into(),
                tonic::Code::InvalidArgument,
            ),
            (
                CgroupError::Invalid("x".into()).into(),
                tonic::Code::InvalidArgument,
            ),
            (ContainerError::NotFound("c".into()), tonic::Code::NotFound),
            (
                ContainerError::Exists("c".into()),
                tonic::Code::AlreadyExists,
            ),
            (
                ContainerError::lc("start")(LibcontainerError::IncorrectStatus(
                    ContainerStatus::Stopped,
                )),
                tonic::Code::FailedPrecondition,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(to_status(&err).code(), code, "{err:?}");
        }
    }

    #[test]
    fn test_env_list_requires_key_value() {
        assert_eq!(
            env_list(&["A=1".into(), "B=".into()]).expect("env").len(),
            2
        );
        assert!(env_list(&["NOEQ".into()]).is_err());
        assert!(env_list(&["=x".into()]).is_err());
    }

    #[test]
    fn test_create_rejects_traversal_before_touching_files() {
        let reaper = Reaper::global().expect("reaper");
        let paths = Paths {
            bundles: std::env::temp_dir().join("accordion-bundles-test"),
            own_bundles: std::env::temp_dir().join("accordion-own-bundles-test"),
            state: std::env::temp_dir().join("accordion-state-test"),
            cgroup: std::env::temp_dir(),
        };
        let request = pb::CreateContainerRequest {
            container_id: "c1".into(),
            bundle: format!("{}/../../etc", paths.bundles.display()),
            spec_json: b"{}".to_vec(),
            tty: false,
        };
        let err = ContainersService::create_blocking(&reaper, &paths, request)
            .err()
            .expect("refused");
        assert!(matches!(err, ContainerError::Validate(_)), "{err:?}");
        assert!(!paths.state.exists());
    }

    #[test]
    fn test_create_rejects_malformed_spec() {
        let reaper = Reaper::global().expect("reaper");
        let base = std::env::temp_dir().join(format!("accordion-bundles-{}", std::process::id()));
        let bundle = base.join("c1");
        fs::create_dir_all(bundle.join("rootfs")).expect("bundle");
        let paths = Paths {
            bundles: fs::canonicalize(&base).expect("canonical"),
            own_bundles: base.join("own"),
            state: base.join("state"),
            cgroup: std::env::temp_dir(),
        };
        let request = pb::CreateContainerRequest {
            container_id: "c1".into(),
            bundle: paths.bundles.join("c1").display().to_string(),
            spec_json: b"{\"process\": ".to_vec(),
            tty: false,
        };
        let err = ContainersService::create_blocking(&reaper, &paths, request)
            .err()
            .expect("refused");
        fs::remove_dir_all(&base).expect("cleanup");
        assert_eq!(
            to_status(&err).code(),
            tonic::Code::InvalidArgument,
            "{err:?}"
        );
    }
}
