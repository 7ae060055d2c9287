//! Host side of the agent protocol: gRPC (`accordion.agent.v1`) to the guest agent through the
//! VMM's hybrid-vsock Unix socket.
//!
//! Hybrid vsock (Firecracker's convention, which our VMM follows): the host connects to the VMM's
//! Unix socket, writes `CONNECT <port>\n`, and the VMM answers `OK <host port>\n` once the guest
//! accepted; from then on the socket carries the guest connection's bytes. A VMM that cannot reach
//! the port (the guest is still booting, nobody listens yet) closes the socket instead, so that
//! is retried; any other answer means we are not talking to a hybrid-vsock endpoint and is an error.
//!
//! Every call has its own deadline (a hung guest must never hang the shim), and failures are typed:
//! the caller can tell a guest that is not up yet from one that went away or refused a call.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use accordion_proto::agent::v1 as pb;
use accordion_proto::agent::v1::agent_client::AgentClient as RawClient;
use accordion_proto::agent::v1::containers_client::ContainersClient as RawContainersClient;
use accordion_proto::agent::v1::cpu_client::CpuClient as RawCpuClient;
use accordion_proto::agent::v1::memory_client::MemoryClient as RawMemoryClient;
use accordion_proto::agent::v1::network_client::NetworkClient as RawNetworkClient;
use accordion_proto::{AGENT_VSOCK_PORT, MAX_MESSAGE_BYTES};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status};

use crate::error_chain;

/// Longest handshake reply accepted ("OK 4294967295\n" is 14 bytes).
const MAX_HANDSHAKE_LINE: usize = 64;
/// Stdin is sent in chunks of this size (well under the agent's message limit).
const STDIN_CHUNK: usize = 32 * 1024;
/// Queued stdin messages before reading stdin waits for the agent.
const STDIN_QUEUE: usize = 16;
/// The most CPU numbers kept from one list the guest sends (Linux's largest NR_CPUS): no real
/// guest sends more, and a hostile one must not make error messages megabytes long.
const MAX_CPU_LIST: usize = 8192;
/// The most bytes kept of a reason the guest gives in a CPU event.
const MAX_GUEST_TEXT: usize = 1024;
/// The shortest deadline of Pause and Resume: the agent gives the kernel 10 s to freeze or thaw
/// and then answers DEADLINE_EXCEEDED itself, which the caller should get to see.
pub const FREEZE_RPC_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors of the agent client.
#[derive(Debug, thiserror::Error)]
pub enum AgentClientError {
    /// The VMM's Unix socket could not be connected to (last attempt).
    #[error("Cannot connect to {path}")]
    Connect {
        /// The hybrid-vsock socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket answered something other than `OK <port>` to `CONNECT`.
    #[error("Hybrid-vsock handshake failed: {detail}")]
    Handshake {
        /// What was received or went wrong.
        detail: String,
    },
    /// An operation did not finish before its deadline.
    #[error("{operation} timed out after {after:?}{}", last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Timeout {
        /// What was being done.
        operation: &'static str,
        /// The deadline that passed.
        after: Duration,
        /// The last retryable error before giving up, if any.
        last_error: Option<String>,
    },
    /// The agent answered the call with an error.
    #[error("Agent refused the call: {code:?}: {message}")]
    Rpc {
        /// gRPC status code.
        code: Code,
        /// The agent's message.
        message: String,
    },
    /// The connection to the agent is gone (the guest died, was stopped, or the VMM closed it).
    #[error("Agent is gone: {message}")]
    AgentGone {
        /// What was observed.
        message: String,
    },
    /// The agent broke the protocol (e.g. an exec stream without `started` or without an exit).
    #[error("Agent protocol violation: {0}")]
    Protocol(String),
    /// Reading the exec's stdin or writing its output locally failed.
    #[error("Exec stdio failed")]
    Stdio(#[source] io::Error),
}

impl AgentClientError {
    /// Whether retrying the connection might help (the guest may still be booting).
    fn is_retryable_connect(&self) -> bool {
        !matches!(self, AgentClientError::Handshake { .. })
    }
}

impl From<Status> for AgentClientError {
    fn from(status: Status) -> Self {
        // A status the agent sent arrives without a source. One tonic made from a local transport
        // failure (connection reset mid-stream: "h2 protocol error", code UNKNOWN) carries the
        // error as its source; a closed connection or failed reconnect is UNAVAILABLE.
        let transport_failed = std::error::Error::source(&status).is_some();
        match status.code() {
            Code::Unavailable => AgentClientError::AgentGone {
                message: status.message().to_owned(),
            },
            _ if transport_failed => AgentClientError::AgentGone {
                message: error_chain(&status),
            },
            code => AgentClientError::Rpc {
                code,
                message: status.message().to_owned(),
            },
        }
    }
}

type Result<T, E = AgentClientError> = std::result::Result<T, E>;

/// Timing of the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    /// Deadline of each unary call (and of an exec's start).
    pub rpc_timeout: Duration,
    /// First pause between connection attempts; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest pause between connection attempts.
    pub max_backoff: Duration,
    /// How long one handshake may wait for the VMM's answer.
    pub handshake_timeout: Duration,
    /// The guest's agent port.
    pub port: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            rpc_timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            port: AGENT_VSOCK_PORT,
        }
    }
}

/// Parses the VMM's answer to `CONNECT`: `OK <host port>` (without the newline).
pub fn parse_handshake_reply(line: &[u8]) -> Result<u32> {
    let text = std::str::from_utf8(line).map_err(|_| AgentClientError::Handshake {
        detail: format!("non-UTF-8 reply {line:?}"),
    })?;
    text.strip_prefix("OK ")
        .and_then(|port| port.parse().ok())
        .ok_or_else(|| AgentClientError::Handshake {
            detail: format!("unexpected reply {text:?}"),
        })
}

/// Connects to the hybrid-vsock socket at `path` and performs the handshake for `port`. The reply
/// is read byte by byte: the guest's first bytes (the HTTP/2 server preface) may follow it at once
/// and must stay in the socket for the gRPC layer.
pub async fn hybrid_connect(path: &Path, port: u32, timeout: Duration) -> Result<UnixStream> {
    let mut stream =
        UnixStream::connect(path)
            .await
            .map_err(|source| AgentClientError::Connect {
                path: path.to_owned(),
                source,
            })?;
    let handshake = async {
        // A front that answers at once and closes can make this write fail (EPIPE) while its
        // answer already sits in our receive buffer: the answer, if any, decides.
        let written = stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await;
        let mut line = Vec::with_capacity(16);
        loop {
            let byte = match stream.read_u8().await {
                Ok(byte) => byte,
                Err(read_err) => return Err(written.err().unwrap_or(read_err)),
            };
            if byte == b'\n' {
                return Ok::<_, io::Error>(Some(line));
            }
            line.push(byte);
            if line.len() > MAX_HANDSHAKE_LINE {
                return Ok(None);
            }
        }
    };
    let line = match tokio::time::timeout(timeout, handshake).await {
        Err(_) => {
            return Err(AgentClientError::Timeout {
                operation: "hybrid-vsock handshake",
                after: timeout,
                last_error: None,
            })
        }
        // EOF or reset before an answer: the VMM could not reach the guest port (yet).
        Ok(Err(source)) => {
            return Err(AgentClientError::Connect {
                path: path.to_owned(),
                source,
            })
        }
        Ok(Ok(None)) => {
            return Err(AgentClientError::Handshake {
                detail: format!("reply longer than {MAX_HANDSHAKE_LINE} bytes"),
            })
        }
        Ok(Ok(Some(line))) => line,
    };
    parse_handshake_reply(&line)?;
    Ok(stream)
}

/// Calls `attempt` until it succeeds, fails with a non-retryable error, or `deadline` passes,
/// pausing with exponential backoff in between.
async fn retry_until<T, F, Fut>(
    deadline: Duration,
    config: &ClientConfig,
    operation: &'static str,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let end = Instant::now() + deadline;
    let mut backoff = config.initial_backoff;
    let mut last_error = None;
    loop {
        let remaining = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) if !e.is_retryable_connect() => return Err(e),
            Ok(Err(e)) => last_error = Some(error_chain(&e)),
            // The deadline cut this attempt short; the previous failure is the informative one.
            Err(_) => {}
        }
        let remaining = end.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(AgentClientError::Timeout {
                operation,
                after: deadline,
                last_error,
            });
        }
        tokio::time::sleep(backoff.min(remaining)).await;
        backoff = (backoff * 2).min(config.max_backoff);
    }
}

/// How an exec ended (domain form of the wire `ExecExit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, when the process exited.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// Exited with 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The status a shell would report: the code, or 128 + the signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 255,
        }
    }
}

impl From<pb::ExecExit> for ExitStatus {
    fn from(exit: pb::ExecExit) -> Self {
        Self {
            code: exit.code,
            signal: exit.signal,
        }
    }
}

/// Guest facts (domain form of `GetGuestInfoResponse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    /// `uname -r` in the guest.
    pub kernel_release: String,
    /// Possible CPUs, as a cpulist, and their count.
    pub cpus_possible: (String, u32),
    /// Present CPUs.
    pub cpus_present: (String, u32),
    /// Online CPUs.
    pub cpus_online: (String, u32),
    /// Memory, bytes.
    pub memory_total_bytes: u64,
    /// Available memory, bytes.
    pub memory_available_bytes: u64,
    /// Guest uptime.
    pub uptime: Duration,
    /// The agent's version.
    pub agent_version: String,
    /// The virtio-fs tag the guest's kernel command line named (`accordion.share=`) for
    /// /run/accordion/containers; None when it named none.
    pub share_tag: Option<String>,
    /// Why that share is not mounted; None when it is, or when none was named. Bundles are then
    /// on the guest's tmpfs: refuse containers that need the share.
    pub share_error: Option<String>,
}

impl From<pb::GetGuestInfoResponse> for GuestInfo {
    fn from(r: pb::GetGuestInfoResponse) -> Self {
        Self {
            kernel_release: r.kernel_release,
            cpus_possible: (r.cpus_possible, r.cpus_possible_count),
            cpus_present: (r.cpus_present, r.cpus_present_count),
            cpus_online: (r.cpus_online, r.cpus_online_count),
            memory_total_bytes: r.memory_total_bytes,
            memory_available_bytes: r.memory_available_bytes,
            uptime: Duration::from_millis(r.uptime_ms),
            agent_version: r.agent_version,
            share_tag: (!r.share_tag.is_empty()).then_some(r.share_tag),
            share_error: (!r.share_error.is_empty()).then_some(r.share_error),
        }
    }
}

/// What to run with [`AgentClient::exec_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// Working directory ("/" when empty).
    pub cwd: String,
    /// Run on a pty (output arrives on stdout only).
    pub tty: bool,
    /// Deadline for the whole exec; none by default (a command may run as long as it likes, but
    /// starting it is still bounded by the RPC timeout). When it passes the exec is abandoned,
    /// which makes the agent kill it.
    pub timeout: Option<Duration>,
    /// With `tty`: the terminal size (rows, cols) to start with.
    pub tty_size: Option<(u32, u32)>,
}

/// A connection to one guest's agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    raw: RawClient<Channel>,
    config: ClientConfig,
    /// The Cpu service on the same connection.
    cpu: RawCpuClient<Channel>,
    /// The Memory service on the same connection.
    memory: RawMemoryClient<Channel>,
    /// The Containers service on the same connection.
    containers: RawContainersClient<Channel>,
    /// The Network service on the same connection.
    network: RawNetworkClient<Channel>,
}

impl AgentClient {
    /// Connects through the hybrid-vsock socket `uds`, retrying with backoff until `deadline`
    /// (the VMM may not have created the socket yet, the guest may still be booting).
    pub async fn connect(uds: impl AsRef<Path>, deadline: Duration) -> Result<Self> {
        Self::connect_with(uds, deadline, ClientConfig::default()).await
    }

    /// [`AgentClient::connect`] with explicit timing.
    pub async fn connect_with(
        uds: impl AsRef<Path>,
        deadline: Duration,
        config: ClientConfig,
    ) -> Result<Self> {
        let path = uds.as_ref().to_owned();
        let channel = retry_until(deadline, &config, "connecting to the agent", || {
            let path = path.clone();
            async move {
                let stream = hybrid_connect(&path, config.port, config.handshake_timeout).await?;
                // The first connection is the one just made; tonic calls the connector again to
                // reconnect (after the agent restarted), and that does a fresh handshake.
                let first = Arc::new(Mutex::new(Some(stream)));
                let connector = tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    let first = first.clone();
                    async move {
                        let ready = first.lock().unwrap_or_else(PoisonError::into_inner).take();
                        let stream = match ready {
                            Some(stream) => stream,
                            None => {
                                hybrid_connect(&path, config.port, config.handshake_timeout).await?
                            }
                        };
                        Ok::<_, AgentClientError>(TokioIo::new(stream))
                    }
                });
                // The URI is only a label: the connector decides where bytes go.
                Endpoint::from_static("http://agent.vsock")
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .connect_with_connector(connector)
                    .await
                    .map_err(|e| AgentClientError::AgentGone {
                        message: error_chain(&e),
                    })
            }
        })
        .await?;
        let cpu = RawCpuClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let memory = RawMemoryClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let containers = RawContainersClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let network = RawNetworkClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let raw = RawClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            raw,
            config,
            cpu,
            memory,
            containers,
            network,
        })
    }

    /// The generated client on this connection, without size limits on what it sends (for tools
    /// and fault tests). Calls through it have no deadline unless the caller sets one.
    pub fn raw(&self) -> RawClient<Channel> {
        self.raw.clone().max_encoding_message_size(usize::MAX)
    }

    /// This connection with another per-call deadline (e.g. a short one for status queries).
    pub fn with_rpc_timeout(&self, rpc_timeout: Duration) -> Self {
        let mut client = self.clone();
        client.config.rpc_timeout = rpc_timeout;
        client
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        // Tells the agent too (grpc-timeout), so it can stop working on an abandoned call.
        request.set_timeout(self.config.rpc_timeout);
        request
    }

    async fn unary<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.config.rpc_timeout, call).await {
            Err(_) => Err(AgentClientError::Timeout {
                operation,
                after: self.config.rpc_timeout,
                last_error: None,
            }),
            Ok(result) => Ok(result?.into_inner()),
        }
    }

    /// Asks the agent whether it serves; returns its version.
    pub async fn health(&self) -> Result<String> {
        let request = self.request(pb::HealthRequest {});
        Ok(self
            .unary("Health", self.raw.clone().health(request))
            .await?
            .agent_version)
    }

    /// Kernel, CPU and memory facts of the guest.
    pub async fn guest_info(&self) -> Result<GuestInfo> {
        let request = self.request(pb::GetGuestInfoRequest {});
        Ok(self
            .unary("GetGuestInfo", self.raw.clone().get_guest_info(request))
            .await?
            .into())
    }

    /// Sends `signal` to a running exec.
    pub async fn signal(&self, exec_id: &str, signal: i32) -> Result<()> {
        let request = self.request(pb::SignalRequest {
            exec_id: exec_id.to_owned(),
            signal,
        });
        self.unary("Signal", self.raw.clone().signal(request))
            .await
            .map(drop)
    }

    /// Asks the agent to power the guest off. It answers before doing so.
    pub async fn shutdown(&self) -> Result<()> {
        let request = self.request(pb::ShutdownRequest {});
        self.unary("Shutdown", self.raw.clone().shutdown(request))
            .await
            .map(drop)
    }

    /// Runs `argv` in the guest with `env`, feeding it `stdin` (or nothing), writing its output
    /// to `stdout` and `stderr`; returns how it ended.
    pub async fn exec<I, O, E>(
        &self,
        argv: &[&str],
        env: &[&str],
        stdin: Option<I>,
        stdout: O,
        stderr: E,
    ) -> Result<ExitStatus>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        let spec = ExecSpec {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            env: env.iter().map(|s| (*s).to_owned()).collect(),
            ..ExecSpec::default()
        };
        self.exec_with(spec, stdin, stdout, stderr).await
    }

    /// [`AgentClient::exec`] with every option.
    pub async fn exec_with<I, O, E>(
        &self,
        spec: ExecSpec,
        stdin: Option<I>,
        stdout: O,
        stderr: E,
    ) -> Result<ExitStatus>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        let mut raw = self.raw.clone();
        drive_exec(
            |requests| async move { raw.exec(requests).await },
            self.config.rpc_timeout,
            spec,
            stdin,
            stdout,
            stderr,
        )
        .await
    }
}

/// Runs one exec over any transport that speaks `accordion.agent.v1` Exec messages: the agent
/// itself, or the control socket that forwards them. `open` starts the call with the request
/// stream; the start (and the `started` answer) must come within `rpc_timeout`.
pub async fn drive_exec<F, Fut, I, O, E>(
    open: F,
    rpc_timeout: Duration,
    spec: ExecSpec,
    stdin: Option<I>,
    stdout: O,
    stderr: E,
) -> Result<ExitStatus>
where
    F: FnOnce(ReceiverStream<pb::ExecRequest>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<tonic::Streaming<pb::ExecResponse>>, Status>>,
    I: AsyncRead + Unpin + Send + 'static,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    drive_exec_with(
        open,
        rpc_timeout,
        spec,
        stdin,
        ExecHooks::default(),
        stdout,
        stderr,
    )
    .await
}

/// Terminal size changes, (rows, cols), forwarded to a tty exec or attach while it runs.
pub type TtyResizes = mpsc::Receiver<(u32, u32)>;

/// What a caller of [`drive_exec_with`] needs beyond plain stdio (the shim's exec processes).
#[derive(Debug, Default)]
pub struct ExecHooks {
    /// Terminal resizes to forward (containerd's ResizePty).
    pub resizes: Option<TtyResizes>,
    /// Receives the process's guest pid once the agent started it.
    pub started: Option<tokio::sync::oneshot::Sender<u32>>,
}

/// [`drive_exec`] with [`ExecHooks`].
pub async fn drive_exec_with<F, Fut, I, O, E>(
    open: F,
    rpc_timeout: Duration,
    spec: ExecSpec,
    stdin: Option<I>,
    hooks: ExecHooks,
    mut stdout: O,
    mut stderr: E,
) -> Result<ExitStatus>
where
    F: FnOnce(ReceiverStream<pb::ExecRequest>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<tonic::Streaming<pb::ExecResponse>>, Status>>,
    I: AsyncRead + Unpin + Send + 'static,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    use pb::exec_request::Request as Req;
    use pb::exec_response::Response as Resp;

    let (tx, rx) = mpsc::channel(STDIN_QUEUE);
    let start = pb::ExecStart {
        argv: spec.argv,
        env: spec.env,
        cwd: spec.cwd,
        tty: spec.tty,
    };
    // The channel is new and has room for both: these cannot fail.
    let _ = tx.try_send(pb::ExecRequest {
        request: Some(Req::Start(start)),
    });
    if let Some((rows, cols)) = spec.tty_size {
        let _ = tx.try_send(pb::ExecRequest {
            request: Some(Req::Resize(pb::TtyResize { rows, cols })),
        });
    }
    let feeder = tokio::spawn(feed_stdin(stdin, hooks.resizes, tx));
    // Stops feeding stdin however this function returns.
    let _feeder = AbortOnDrop(feeder);

    let timed_out = |operation| AgentClientError::Timeout {
        operation,
        after: rpc_timeout,
        last_error: None,
    };
    let mut responses = tokio::time::timeout(rpc_timeout, open(ReceiverStream::new(rx)))
        .await
        .map_err(|_| timed_out("Exec start"))??
        .into_inner();
    match tokio::time::timeout(rpc_timeout, responses.message())
        .await
        .map_err(|_| timed_out("Exec start"))??
    {
        Some(pb::ExecResponse {
            response: Some(Resp::Started(started)),
        }) => {
            if let Some(tx) = hooks.started {
                let _ = tx.send(started.pid);
            }
        }
        other => {
            return Err(AgentClientError::Protocol(format!(
                "expected started, got {other:?}"
            )))
        }
    }

    let pump = async {
        loop {
            match responses.message().await? {
                Some(pb::ExecResponse {
                    response: Some(Resp::Stdout(data)),
                }) => stdout
                    .write_all(&data)
                    .await
                    .map_err(AgentClientError::Stdio)?,
                Some(pb::ExecResponse {
                    response: Some(Resp::Stderr(data)),
                }) => stderr
                    .write_all(&data)
                    .await
                    .map_err(AgentClientError::Stdio)?,
                Some(pb::ExecResponse {
                    response: Some(Resp::Exit(exit)),
                }) => {
                    stdout.flush().await.map_err(AgentClientError::Stdio)?;
                    stderr.flush().await.map_err(AgentClientError::Stdio)?;
                    return Ok(ExitStatus::from(exit));
                }
                Some(other) => {
                    return Err(AgentClientError::Protocol(format!("unexpected {other:?}")))
                }
                None => {
                    return Err(AgentClientError::AgentGone {
                        message: "exec stream ended without an exit status".into(),
                    })
                }
            }
        }
    };
    match spec.timeout {
        None => pump.await,
        Some(limit) => {
            tokio::time::timeout(limit, pump)
                .await
                .map_err(|_| AgentClientError::Timeout {
                    operation: "Exec",
                    after: limit,
                    last_error: None,
                })?
        }
    }
}

/// What a [`CpuEvent`] reports (domain form of the wire `CpuEventKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuEventKind {
    /// The current sets, no change implied: a watch's first event, and after the watcher lagged.
    Snapshot,
    /// The guest kernel registered a hot-added CPU; the agent is onlining it.
    Added,
    /// The guest kernel unregistered a CPU (hot-remove).
    Removed,
    /// A CPU came online.
    Online,
    /// A CPU went offline.
    Offline,
    /// The agent could not online a hot-added CPU (see [`CpuEvent::error`]).
    OnlineFailed,
    /// A kind this client does not know (a newer agent); the sets are still valid.
    Unknown(i32),
}

impl From<i32> for CpuEventKind {
    fn from(value: i32) -> Self {
        match pb::CpuEventKind::try_from(value) {
            Ok(pb::CpuEventKind::Snapshot) => Self::Snapshot,
            Ok(pb::CpuEventKind::Added) => Self::Added,
            Ok(pb::CpuEventKind::Removed) => Self::Removed,
            Ok(pb::CpuEventKind::Online) => Self::Online,
            Ok(pb::CpuEventKind::Offline) => Self::Offline,
            Ok(pb::CpuEventKind::OnlineFailed) => Self::OnlineFailed,
            Ok(pb::CpuEventKind::Unspecified) | Err(_) => Self::Unknown(value),
        }
    }
}

/// One CPU change in the guest, or a snapshot, with the guest's CPU sets right after it (domain
/// form of the wire `CpuEvent`). The sets are sorted CPU numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuEvent {
    /// What happened.
    pub kind: CpuEventKind,
    /// The CPU concerned; `None` for a snapshot.
    pub cpu: Option<u32>,
    /// Online CPUs.
    pub online: Vec<u32>,
    /// Present CPUs.
    pub present: Vec<u32>,
    /// Possible CPUs.
    pub possible: Vec<u32>,
    /// Enabled (plugged) CPUs; `None` when the guest kernel has no `enabled` file (before 6.11).
    pub enabled: Option<Vec<u32>>,
    /// Why onlining failed, for [`CpuEventKind::OnlineFailed`].
    pub error: Option<String>,
    /// The guest's CLOCK_MONOTONIC when the agent observed it.
    pub guest_monotonic: Duration,
}

impl From<pb::CpuEvent> for CpuEvent {
    fn from(e: pb::CpuEvent) -> Self {
        Self {
            kind: CpuEventKind::from(e.kind),
            cpu: e.cpu,
            online: cpu_list(e.online),
            present: cpu_list(e.present),
            possible: cpu_list(e.possible),
            enabled: e.has_enabled.then(|| cpu_list(e.enabled)),
            error: (!e.error.is_empty()).then(|| guest_text(e.error)),
            guest_monotonic: Duration::from_nanos(e.monotonic_ns),
        }
    }
}

/// A CPU list from the guest, cut to [`MAX_CPU_LIST`] numbers.
fn cpu_list(mut cpus: Vec<u32>) -> Vec<u32> {
    cpus.truncate(MAX_CPU_LIST);
    cpus
}

/// A text from the guest, cut to at most [`MAX_GUEST_TEXT`] bytes (on a character boundary).
fn guest_text(mut text: String) -> String {
    if text.len() > MAX_GUEST_TEXT {
        let mut end = MAX_GUEST_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// The outcome of [`AgentClient::set_cpus_online`] for one CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuOnlineResult {
    /// The CPU.
    pub cpu: u32,
    /// The state asked for.
    pub online: bool,
    /// `None` when the CPU is now in that state; otherwise the agent's reason.
    pub error: Option<String>,
}

impl From<pb::CpuOnlineResult> for CpuOnlineResult {
    fn from(r: pb::CpuOnlineResult) -> Self {
        Self {
            cpu: r.cpu,
            online: r.online,
            error: (!r.error.is_empty()).then(|| guest_text(r.error)),
        }
    }
}

/// An open CPU watch ([`AgentClient::watch_cpus`]). It has no deadline: it lasts until dropped or
/// until the agent goes away.
#[derive(Debug)]
pub struct CpuWatch {
    /// The snapshot received while opening, returned by the first `next`.
    first: Option<CpuEvent>,
    stream: tonic::Streaming<pb::CpuEvent>,
}

impl CpuWatch {
    /// The next event: first the snapshot, then one per change, a new snapshot after this watcher
    /// fell behind. `Ok(None)` when the agent ended the stream in an orderly way (it is shutting
    /// down); [`AgentClientError::AgentGone`] when the connection died.
    pub async fn next(&mut self) -> Result<Option<CpuEvent>> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        Ok(self.stream.message().await?.map(CpuEvent::from))
    }
}

/// The guest's memory figures (`Memory.Watch`), bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFigures {
    /// A snapshot (the first message, or after a lag) rather than a change.
    pub snapshot: bool,
    /// MemTotal.
    pub total: u64,
    /// MemAvailable.
    pub available: u64,
}

impl From<pb::MemoryEvent> for MemoryFigures {
    fn from(e: pb::MemoryEvent) -> Self {
        Self {
            snapshot: e.kind() == pb::MemoryEventKind::Snapshot,
            total: e.total_bytes,
            available: e.available_bytes,
        }
    }
}

/// An open memory watch ([`AgentClient::watch_memory`]), without a deadline.
#[derive(Debug)]
pub struct MemoryWatch {
    first: Option<MemoryFigures>,
    stream: tonic::Streaming<pb::MemoryEvent>,
}

impl MemoryWatch {
    /// The next figures: first the snapshot, then one per memory block change. `Ok(None)` when
    /// the agent ended the stream; [`AgentClientError::AgentGone`] when the connection died.
    pub async fn next(&mut self) -> Result<Option<MemoryFigures>> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        Ok(self.stream.message().await?.map(MemoryFigures::from))
    }
}

/// Formats CPU numbers as Linux writes a cpulist ("0-3,8"), for logs and comparisons with sysfs.
pub fn format_cpulist(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for cpu in sorted {
        match ranges.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(cpu) => *last = cpu,
            _ => ranges.push((cpu, cpu)),
        }
    }
    ranges
        .iter()
        .map(|&(first, last)| {
            if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl AgentClient {
    /// Opens a watch of the guest's CPUs (`Cpu.Watch`). Opening, up to the first event (the
    /// snapshot), has the RPC deadline; the watch itself has none.
    pub async fn watch_cpus(&self) -> Result<CpuWatch> {
        let mut cpu = self.cpu.clone();
        // No grpc-timeout on this request: it would end the stream on the agent's side.
        let open = async move {
            let mut stream = cpu
                .watch(Request::new(pb::WatchCpusRequest {}))
                .await?
                .into_inner();
            let first = stream.message().await?;
            Ok::<_, AgentClientError>((stream, first))
        };
        let (stream, first) = tokio::time::timeout(self.config.rpc_timeout, open)
            .await
            .map_err(|_| AgentClientError::Timeout {
                operation: "CPU Watch",
                after: self.config.rpc_timeout,
                last_error: None,
            })??;
        let first = match first.map(CpuEvent::from) {
            Some(event) if event.kind == CpuEventKind::Snapshot => event,
            Some(other) => {
                return Err(AgentClientError::Protocol(format!(
                    "CPU watch began with {:?}, not a snapshot",
                    other.kind
                )))
            }
            None => {
                return Err(AgentClientError::AgentGone {
                    message: "CPU watch ended before its snapshot".into(),
                })
            }
        };
        Ok(CpuWatch {
            first: Some(first),
            stream,
        })
    }

    /// Opens a watch of the guest's memory (`Memory.Watch`). Opening, up to the snapshot, has
    /// the RPC deadline; the watch itself has none.
    pub async fn watch_memory(&self) -> Result<MemoryWatch> {
        let mut memory = self.memory.clone();
        let open = async move {
            let mut stream = memory
                .watch(Request::new(pb::WatchMemoryRequest {}))
                .await?
                .into_inner();
            let first = stream.message().await?;
            Ok::<_, AgentClientError>((stream, first))
        };
        let (stream, first) = tokio::time::timeout(self.config.rpc_timeout, open)
            .await
            .map_err(|_| AgentClientError::Timeout {
                operation: "Memory Watch",
                after: self.config.rpc_timeout,
                last_error: None,
            })??;
        let first = match first.map(MemoryFigures::from) {
            Some(figures) if figures.snapshot => figures,
            Some(_) => {
                return Err(AgentClientError::Protocol(
                    "memory watch began with a change, not a snapshot".into(),
                ))
            }
            None => {
                return Err(AgentClientError::AgentGone {
                    message: "memory watch ended before its snapshot".into(),
                })
            }
        };
        Ok(MemoryWatch {
            first: Some(first),
            stream,
        })
    }

    /// Onlines the CPUs in `online` and offlines those in `offline` (`Cpu.SetOnline`); one result
    /// per CPU, `online` ones first. The agent refuses the whole call (an
    /// [`AgentClientError::Rpc`] with `InvalidArgument`, nothing changed) to offline CPU 0 or
    /// when a CPU is in both lists.
    pub async fn set_cpus_online(
        &self,
        online: &[u32],
        offline: &[u32],
    ) -> Result<Vec<CpuOnlineResult>> {
        let request = self.request(pb::SetOnlineRequest {
            online: online.to_vec(),
            offline: offline.to_vec(),
        });
        let response = self
            .unary("CPU SetOnline", self.cpu.clone().set_online(request))
            .await?;
        Ok(response.results.into_iter().map(Into::into).collect())
    }
}

/// A container's lifecycle state (domain form of the wire `ContainerStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerStatus {
    /// Created, its process not started yet.
    Created,
    /// Its main process runs.
    Running,
    /// Its main process has exited.
    Stopped,
    /// Frozen.
    Paused,
    /// A status this client does not know (a newer agent).
    Unknown(i32),
}

impl From<i32> for ContainerStatus {
    fn from(raw: i32) -> Self {
        match pb::ContainerStatus::try_from(raw) {
            Ok(pb::ContainerStatus::Created) => Self::Created,
            Ok(pb::ContainerStatus::Running) => Self::Running,
            Ok(pb::ContainerStatus::Stopped) => Self::Stopped,
            Ok(pb::ContainerStatus::Paused) => Self::Paused,
            _ => Self::Unknown(raw),
        }
    }
}

/// A container as the agent reports it (`Containers.State`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    /// Lifecycle state.
    pub status: ContainerStatus,
    /// Main process in the guest; 0 when there is none.
    pub pid: u32,
    /// Bundle directory in the guest.
    pub bundle: String,
    /// How the main process ended, once it has.
    pub exit: Option<ExitStatus>,
}

impl From<pb::ContainerStateResponse> for ContainerState {
    fn from(r: pb::ContainerStateResponse) -> Self {
        Self {
            status: r.status.into(),
            pid: r.pid,
            bundle: r.bundle,
            exit: r.exit.map(Into::into),
        }
    }
}

/// A container's cgroup v2 counters (`Containers.Stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerStats {
    /// cpu.stat usage_usec.
    pub cpu_usage_usec: u64,
    /// cpu.stat user_usec.
    pub cpu_user_usec: u64,
    /// cpu.stat system_usec.
    pub cpu_system_usec: u64,
    /// cpu.stat nr_periods.
    pub cpu_nr_periods: u64,
    /// cpu.stat nr_throttled.
    pub cpu_nr_throttled: u64,
    /// cpu.stat throttled_usec.
    pub cpu_throttled_usec: u64,
    /// memory.current, bytes.
    pub memory_current_bytes: u64,
    /// memory.max, bytes; None when unlimited.
    pub memory_max_bytes: Option<u64>,
    /// pids.current.
    pub pids_current: u64,
    /// pids.max; None when unlimited.
    pub pids_max: Option<u64>,
    /// cpu.max as the guest kernel shows it ("max 100000", "50000 100000").
    pub cpu_max: String,
    /// cpu.weight.
    pub cpu_weight: u64,
    /// cpu.stat nr_bursts (0 before Linux 5.14).
    pub cpu_nr_bursts: u64,
    /// cpu.stat burst_usec (0 before Linux 5.14).
    pub cpu_burst_usec: u64,
    /// memory.stat.
    pub memory_stat: MemoryStat,
    /// memory.events.
    pub memory_events: MemoryEvents,
    /// memory.swap.current, bytes; None when the guest kernel does not account swap.
    pub memory_swap_current_bytes: Option<u64>,
    /// memory.swap.max, bytes; None when unlimited or not accounted.
    pub memory_swap_max_bytes: Option<u64>,
    /// memory.peak, bytes; None when the guest kernel has no such file (before 5.19).
    pub memory_peak_bytes: Option<u64>,
}

/// A struct of u64 counters with the same field names as its wire message, and the conversion.
macro_rules! counters {
    ($(#[$meta:meta])* $name:ident <= $wire:path { $($field:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        #[allow(missing_docs)]
        pub struct $name {
            $(pub $field: u64,)*
        }

        impl From<$wire> for $name {
            fn from(w: $wire) -> Self {
                Self { $($field: w.$field,)* }
            }
        }
    };
}

counters! {
    /// A container's memory.stat, as containerd's cgroup v2 `MemoryStat` names its fields: sizes
    /// in bytes, `pg*` and `thp_*` event counts. All zero from an agent that does not send it.
    MemoryStat <= pb::MemoryStat {
        anon, file, kernel_stack, slab, sock, shmem, file_mapped, file_dirty, file_writeback,
        anon_thp, inactive_anon, active_anon, inactive_file, active_file, unevictable,
        slab_reclaimable, slab_unreclaimable, pgfault, pgmajfault, workingset_refault,
        workingset_activate, workingset_nodereclaim, pgrefill, pgscan, pgsteal, pgactivate,
        pgdeactivate, pglazyfree, pglazyfreed, thp_fault_alloc, thp_collapse_alloc,
    }
}

counters! {
    /// A container's memory.events: how often it hit memory.low/high/max, ran out of memory, and
    /// had a process (or its whole group) OOM-killed.
    MemoryEvents <= pb::MemoryEvents { low, high, max, oom, oom_kill, oom_group_kill }
}

impl From<pb::ContainerStatsResponse> for ContainerStats {
    fn from(r: pb::ContainerStatsResponse) -> Self {
        Self {
            cpu_usage_usec: r.cpu_usage_usec,
            cpu_user_usec: r.cpu_user_usec,
            cpu_system_usec: r.cpu_system_usec,
            cpu_nr_periods: r.cpu_nr_periods,
            cpu_nr_throttled: r.cpu_nr_throttled,
            cpu_throttled_usec: r.cpu_throttled_usec,
            memory_current_bytes: r.memory_current_bytes,
            memory_max_bytes: r.memory_max_bytes,
            pids_current: r.pids_current,
            pids_max: r.pids_max,
            cpu_max: r.cpu_max,
            cpu_weight: r.cpu_weight,
            cpu_nr_bursts: r.cpu_nr_bursts,
            cpu_burst_usec: r.cpu_burst_usec,
            memory_stat: r.memory_stat.map(Into::into).unwrap_or_default(),
            memory_events: r.memory_events.map(Into::into).unwrap_or_default(),
            memory_swap_current_bytes: r.memory_swap_current_bytes,
            memory_swap_max_bytes: r.memory_swap_max_bytes,
            memory_peak_bytes: r.memory_peak_bytes,
        }
    }
}

/// An open OOM watch ([`AgentClient::watch_oom`]). It has no deadline: it lasts until dropped or
/// until the agent goes away.
#[derive(Debug)]
pub struct OomWatch {
    stream: tonic::Streaming<pb::OomEvent>,
}

impl OomWatch {
    /// The id of the next container in which the guest kernel OOM-killed a process (several
    /// kills the agent saw at once are one event). `Ok(None)` when the agent ended the stream in
    /// an orderly way (it is shutting down); [`AgentClientError::AgentGone`] when the connection
    /// died.
    pub async fn next(&mut self) -> Result<Option<String>> {
        Ok(self.stream.message().await?.map(|e| e.container_id))
    }
}

/// What to create with [`AgentClient::create_container`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerCreate {
    /// Container id: 1–64 characters of `[A-Za-z0-9_.+-]`.
    pub id: String,
    /// Bundle directory in the guest, under `/run/accordion/containers`, holding the rootfs.
    pub bundle: String,
    /// The OCI runtime spec (config.json) as JSON; `root.path` relative to the bundle.
    pub spec_json: Vec<u8>,
    /// Give the main process a pseudo-terminal instead of pipes.
    pub tty: bool,
}

/// Converts an `Agent.Exec` request into the `Containers.Exec` one for container `id`.
fn to_container_exec(id: &str, request: pb::ExecRequest) -> pb::ContainerExecRequest {
    use pb::container_exec_request::Request as C;
    use pb::exec_request::Request as E;
    let request = request.request.map(|r| match r {
        E::Start(start) => C::Start(pb::ContainerExecStart {
            container_id: id.to_owned(),
            argv: start.argv,
            env: start.env,
            cwd: start.cwd,
            tty: start.tty,
        }),
        E::Stdin(data) => C::Stdin(data),
        E::CloseStdin(close) => C::CloseStdin(close),
        E::Resize(size) => C::Resize(size),
    });
    pb::ContainerExecRequest { request }
}

impl AgentClient {
    /// Creates a container (`Containers.Create`); returns its init pid in the guest. Its
    /// process waits for [`AgentClient::start_container`].
    pub async fn create_container(&self, create: ContainerCreate) -> Result<u32> {
        let request = self.request(pb::CreateContainerRequest {
            container_id: create.id,
            bundle: create.bundle,
            spec_json: create.spec_json,
            tty: create.tty,
        });
        Ok(self
            .unary("Containers.Create", self.containers.clone().create(request))
            .await?
            .pid)
    }

    /// Runs a created container's process.
    pub async fn start_container(&self, id: &str) -> Result<()> {
        let request = self.request(pb::StartContainerRequest {
            container_id: id.to_owned(),
        });
        self.unary("Containers.Start", self.containers.clone().start(request))
            .await
            .map(drop)
    }

    /// Waits up to `deadline` for the container's main process to exit; returns how it ended.
    pub async fn wait_container(&self, id: &str, deadline: Duration) -> Result<ExitStatus> {
        self.with_rpc_timeout(deadline)
            .wait_container_inner(id)
            .await
    }

    async fn wait_container_inner(&self, id: &str) -> Result<ExitStatus> {
        let request = self.request(pb::WaitContainerRequest {
            container_id: id.to_owned(),
        });
        let response = self
            .unary("Containers.Wait", self.containers.clone().wait(request))
            .await?;
        response
            .exit
            .map(Into::into)
            .ok_or_else(|| AgentClientError::Protocol("Wait answered without an exit".into()))
    }

    /// Sends `signal` to exec `pid` (its guest pid) of container `id`.
    pub async fn kill_container_exec(&self, id: &str, pid: u32, signal: i32) -> Result<()> {
        let request = self.request(pb::KillContainerRequest {
            container_id: id.to_owned(),
            signal,
            all: false,
            exec_pid: pid,
        });
        self.unary("Containers.Kill", self.containers.clone().kill(request))
            .await?;
        Ok(())
    }

    /// Sends `signal` to the container's main process (with `all`, to all its processes).
    pub async fn kill_container(&self, id: &str, signal: i32, all: bool) -> Result<()> {
        let request = self.request(pb::KillContainerRequest {
            container_id: id.to_owned(),
            signal,
            all,
            exec_pid: 0,
        });
        self.unary("Containers.Kill", self.containers.clone().kill(request))
            .await
            .map(drop)
    }

    /// Removes the container, its cgroup and its bundle. Refused (`FailedPrecondition`) while it
    /// runs unless `force`.
    pub async fn delete_container(&self, id: &str, force: bool) -> Result<()> {
        let request = self.request(pb::DeleteContainerRequest {
            container_id: id.to_owned(),
            force,
        });
        self.unary("Containers.Delete", self.containers.clone().delete(request))
            .await
            .map(drop)
    }

    /// The container's state.
    pub async fn container_state(&self, id: &str) -> Result<ContainerState> {
        let request = self.request(pb::ContainerStateRequest {
            container_id: id.to_owned(),
        });
        Ok(self
            .unary("Containers.State", self.containers.clone().state(request))
            .await?
            .into())
    }

    /// Configures the guest's interfaces like the pod's (`Network.Configure`).
    pub async fn configure_network(&self, interfaces: Vec<pb::Interface>) -> Result<()> {
        let request = self.request(pb::ConfigureNetworkRequest { interfaces });
        self.unary("Network.Configure", self.network.clone().configure(request))
            .await
            .map(drop)
    }

    /// The guest's interfaces as its kernel reports them (`Network.List`).
    pub async fn list_interfaces(&self) -> Result<Vec<pb::Interface>> {
        let request = self.request(pb::ListInterfacesRequest {});
        Ok(self
            .unary("Network.List", self.network.clone().list(request))
            .await?
            .interfaces)
    }

    /// Applies OCI LinuxResources (JSON) to the container's cgroup.
    pub async fn update_container(&self, id: &str, resources_json: Vec<u8>) -> Result<()> {
        let request = self.request(pb::UpdateContainerRequest {
            container_id: id.to_owned(),
            resources_json,
        });
        self.unary("Containers.Update", self.containers.clone().update(request))
            .await
            .map(drop)
    }

    /// Freezes every process of running container `id` (`Containers.Pause`); returns once the
    /// guest kernel reports them frozen, and [`AgentClient::container_state`] then says
    /// [`ContainerStatus::Paused`]. Pausing a paused container is a no-op; a created or stopped
    /// one is refused (`FailedPrecondition`). The deadline is at least [`FREEZE_RPC_TIMEOUT`], so
    /// the agent's own `DeadlineExceeded` (not frozen within 10 s, thawed again) comes through.
    pub async fn pause_container(&self, id: &str) -> Result<()> {
        let client = self.with_rpc_timeout(self.config.rpc_timeout.max(FREEZE_RPC_TIMEOUT));
        let request = client.request(pb::PauseContainerRequest {
            container_id: id.to_owned(),
        });
        client
            .unary("Containers.Pause", client.containers.clone().pause(request))
            .await
            .map(drop)
    }

    /// Thaws paused container `id` (`Containers.Resume`); returns once the guest kernel reports it
    /// thawed. Resuming a running container is a no-op; a stopped one is refused
    /// (`FailedPrecondition`). Deadline as for [`AgentClient::pause_container`].
    pub async fn resume_container(&self, id: &str) -> Result<()> {
        let client = self.with_rpc_timeout(self.config.rpc_timeout.max(FREEZE_RPC_TIMEOUT));
        let request = client.request(pb::ResumeContainerRequest {
            container_id: id.to_owned(),
        });
        client
            .unary(
                "Containers.Resume",
                client.containers.clone().resume(request),
            )
            .await
            .map(drop)
    }

    /// The pids (in the guest) of every process of container `id`, its sub-cgroups included,
    /// ascending (`Containers.Pids`).
    pub async fn container_pids(&self, id: &str) -> Result<Vec<u32>> {
        let request = self.request(pb::ContainerPidsRequest {
            container_id: id.to_owned(),
        });
        Ok(self
            .unary("Containers.Pids", self.containers.clone().pids(request))
            .await?
            .pids)
    }

    /// Opens a watch of OOM kills in every container of the guest, present and future
    /// (`Containers.WatchOom`). Opening has the RPC deadline; the watch itself has none. Once this
    /// returns, the agent is subscribed: every later kill is reported.
    pub async fn watch_oom(&self) -> Result<OomWatch> {
        let mut containers = self.containers.clone();
        // No grpc-timeout on this request: it would end the stream on the agent's side.
        let open = containers.watch_oom(Request::new(pb::WatchOomRequest {}));
        let stream = tokio::time::timeout(self.config.rpc_timeout, open)
            .await
            .map_err(|_| AgentClientError::Timeout {
                operation: "Containers.WatchOom",
                after: self.config.rpc_timeout,
                last_error: None,
            })??
            .into_inner();
        Ok(OomWatch { stream })
    }

    /// The container's cgroup counters.
    pub async fn container_stats(&self, id: &str) -> Result<ContainerStats> {
        let request = self.request(pb::ContainerStatsRequest {
            container_id: id.to_owned(),
        });
        Ok(self
            .unary("Containers.Stats", self.containers.clone().stats(request))
            .await?
            .into())
    }

    /// Attaches to the main process's stdio (`Containers.Attach`): feeds `stdin` (or nothing),
    /// writes its output to `stdout`/`stderr` until both close. Opening has the RPC deadline;
    /// the copy itself has none. Call it before [`AgentClient::start_container`] to see all the
    /// output.
    pub async fn attach_container<I, O, E>(
        &self,
        id: &str,
        stdin: Option<I>,
        stdout: O,
        stderr: E,
    ) -> Result<()>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        self.attach_container_with(id, stdin, None, stdout, stderr)
            .await
    }

    /// [`AgentClient::attach_container`] that also forwards terminal resizes to a tty container.
    pub async fn attach_container_with<I, O, E>(
        &self,
        id: &str,
        stdin: Option<I>,
        resizes: Option<TtyResizes>,
        mut stdout: O,
        mut stderr: E,
    ) -> Result<()>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        use pb::attach_request::Request as Req;
        use pb::attach_response::Response as Resp;
        let (tx, rx) = mpsc::channel(STDIN_QUEUE);
        let _ = tx.try_send(pb::AttachRequest {
            request: Some(Req::ContainerId(id.to_owned())),
        });
        let (exec_tx, mut exec_rx) = mpsc::channel(STDIN_QUEUE);
        // The stdin feeder speaks Exec messages; translate them to Attach ones.
        let feeder = tokio::spawn(feed_stdin(stdin, resizes, exec_tx));
        let _feeder = AbortOnDrop(feeder);
        let translate = tokio::spawn(async move {
            use pb::exec_request::Request as E;
            while let Some(msg) = exec_rx.recv().await {
                let request = match msg.request {
                    Some(E::Stdin(data)) => Req::Stdin(data),
                    Some(E::CloseStdin(c)) => Req::CloseStdin(c),
                    Some(E::Resize(size)) => Req::Resize(size),
                    _ => continue,
                };
                if tx
                    .send(pb::AttachRequest {
                        request: Some(request),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            // Keep the request stream open until the call ends.
            tx.closed().await;
        });
        let _translate = AbortOnDrop(translate);
        let mut containers = self.containers.clone();
        let mut responses = tokio::time::timeout(
            self.config.rpc_timeout,
            containers.attach(ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| AgentClientError::Timeout {
            operation: "Containers.Attach",
            after: self.config.rpc_timeout,
            last_error: None,
        })??
        .into_inner();
        while let Some(msg) = responses.message().await? {
            match msg.response {
                Some(Resp::Stdout(data)) => stdout
                    .write_all(&data)
                    .await
                    .map_err(AgentClientError::Stdio)?,
                Some(Resp::Stderr(data)) => stderr
                    .write_all(&data)
                    .await
                    .map_err(AgentClientError::Stdio)?,
                None => {}
            }
        }
        stdout.flush().await.map_err(AgentClientError::Stdio)?;
        stderr.flush().await.map_err(AgentClientError::Stdio)?;
        Ok(())
    }

    /// Runs another process in running container `id` (`Containers.Exec`), like
    /// [`AgentClient::exec_with`]: `spec.cwd` empty means the container's.
    pub async fn exec_in_container<I, O, E>(
        &self,
        id: &str,
        spec: ExecSpec,
        stdin: Option<I>,
        stdout: O,
        stderr: E,
    ) -> Result<ExitStatus>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        self.exec_in_container_with(id, spec, stdin, ExecHooks::default(), stdout, stderr)
            .await
    }

    /// [`AgentClient::exec_in_container`] with [`ExecHooks`].
    pub async fn exec_in_container_with<I, O, E>(
        &self,
        id: &str,
        spec: ExecSpec,
        stdin: Option<I>,
        hooks: ExecHooks,
        stdout: O,
        stderr: E,
    ) -> Result<ExitStatus>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        use tokio_stream::StreamExt;
        let mut containers = self.containers.clone();
        let id = id.to_owned();
        drive_exec_with(
            |requests| async move {
                containers
                    .exec(requests.map(move |r| to_container_exec(&id, r)))
                    .await
            },
            self.config.rpc_timeout,
            spec,
            stdin,
            hooks,
            stdout,
            stderr,
        )
        .await
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends `stdin` in chunks, then `close_stdin`, and terminal resizes whenever they come.
async fn feed_stdin<I: AsyncRead + Unpin>(
    stdin: Option<I>,
    mut resizes: Option<TtyResizes>,
    tx: mpsc::Sender<pb::ExecRequest>,
) {
    use pb::exec_request::Request as Req;
    let resize = |(rows, cols)| pb::ExecRequest {
        request: Some(Req::Resize(pb::TtyResize { rows, cols })),
    };
    if let Some(mut stdin) = stdin {
        let mut buf = vec![0u8; STDIN_CHUNK];
        loop {
            tokio::select! {
                read = stdin.read(&mut buf) => match read {
                    Ok(0) => break,
                    Ok(n) => {
                        let data = pb::ExecRequest {
                            request: Some(Req::Stdin(buf[..n].to_vec())),
                        };
                        if tx.send(data).await.is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // A broken local stdin ends the input; the command still gets its EOF.
                    Err(_) => break,
                },
                Some(size) = next_resize(&mut resizes) => {
                    if tx.send(resize(size)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    let _ = tx
        .send(pb::ExecRequest {
            request: Some(Req::CloseStdin(pb::CloseStdin {})),
        })
        .await;
    // The request stream stays open until the call ends: resizes still flow after stdin's EOF.
    loop {
        tokio::select! {
            () = tx.closed() => return,
            Some(size) = next_resize(&mut resizes) => {
                if tx.send(resize(size)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The next terminal size; pends forever without a resize source (or once it is closed).
async fn next_resize(resizes: &mut Option<TtyResizes>) -> Option<(u32, u32)> {
    match resizes {
        Some(rx) => match rx.recv().await {
            Some(size) => Some(size),
            None => {
                *resizes = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A private directory for one test's socket, removed with everything in it when dropped.
    struct TempSocket(PathBuf);

    impl TempSocket {
        fn path(&self) -> PathBuf {
            self.0.join("vsock.sock")
        }
    }

    impl Drop for TempSocket {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_socket(name: &str) -> TempSocket {
        let dir =
            std::env::temp_dir().join(format!("accordion-client-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        TempSocket(dir)
    }

    fn fast() -> ClientConfig {
        ClientConfig {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            handshake_timeout: Duration::from_millis(500),
            ..ClientConfig::default()
        }
    }

    /// A hybrid-vsock front that answers every CONNECT with `reply` and then closes.
    fn answer_with(path: &Path, reply: &'static [u8]) {
        let listener = UnixListener::bind(path).expect("bind");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 64];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(reply).await;
            }
        });
    }

    #[test]
    fn test_parse_handshake_reply_ok_port() {
        assert_eq!(
            parse_handshake_reply(b"OK 1073741824").expect("ok"),
            1_073_741_824
        );
    }

    #[test]
    fn test_parse_handshake_reply_garbage_is_handshake_error() {
        for reply in [&b"NOPE"[..], b"OK", b"OK x", b"ok 5", b"\xff\xfe"] {
            assert!(
                matches!(
                    parse_handshake_reply(reply),
                    Err(AgentClientError::Handshake { .. })
                ),
                "{reply:?}"
            );
        }
    }

    #[test]
    fn test_exit_status_shell_code() {
        assert_eq!(
            ExitStatus {
                code: Some(5),
                signal: None
            }
            .shell_code(),
            5
        );
        assert_eq!(
            ExitStatus {
                code: None,
                signal: Some(9)
            }
            .shell_code(),
            137
        );
        assert!(!ExitStatus {
            code: None,
            signal: Some(9)
        }
        .success());
    }

    #[test]
    fn test_status_unavailable_is_agent_gone() {
        assert!(matches!(
            AgentClientError::from(Status::unavailable("x")),
            AgentClientError::AgentGone { .. }
        ));
        assert!(matches!(
            AgentClientError::from(Status::not_found("x")),
            AgentClientError::Rpc {
                code: Code::NotFound,
                ..
            }
        ));
        let reset = Status::from_error(Box::new(io::Error::from(io::ErrorKind::ConnectionReset)));
        assert!(matches!(
            AgentClientError::from(reset),
            AgentClientError::AgentGone { .. }
        ));
    }

    #[test]
    fn test_format_cpulist_like_sysfs() {
        assert_eq!(format_cpulist(&[8, 0, 1, 2, 3, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_cpulist(&[0]), "0");
        assert_eq!(format_cpulist(&[]), "");
        assert_eq!(
            format_cpulist(&[u32::MAX, u32::MAX - 1]),
            "4294967294-4294967295"
        );
    }

    #[test]
    fn test_cpu_event_from_a_hostile_guest_is_bounded() {
        let wire = pb::CpuEvent {
            kind: pb::CpuEventKind::OnlineFailed as i32,
            cpu: Some(1),
            online: vec![7; 1 << 20],
            present: (0..1 << 20).collect(),
            possible: vec![u32::MAX; 1 << 20],
            has_enabled: true,
            enabled: vec![0; 1 << 20],
            error: "é".repeat(1 << 20),
            monotonic_ns: u64::MAX,
        };
        let event = CpuEvent::from(wire);
        assert_eq!(event.online.len(), MAX_CPU_LIST);
        assert_eq!(event.present.len(), MAX_CPU_LIST);
        assert_eq!(event.possible.len(), MAX_CPU_LIST);
        assert_eq!(event.enabled.map(|e| e.len()), Some(MAX_CPU_LIST));
        let error = event.error.expect("error kept");
        assert!(error.len() <= MAX_GUEST_TEXT + "…".len(), "{}", error.len());
        assert!(error.ends_with('…'));
        assert_eq!(guest_text("short".into()), "short");
    }

    #[test]
    fn test_cpu_event_from_wire_keeps_absent_enabled_and_unknown_kinds() {
        let wire = pb::CpuEvent {
            kind: 99,
            cpu: Some(3),
            online: vec![0, 3],
            has_enabled: false,
            monotonic_ns: 1_500_000_000,
            ..pb::CpuEvent::default()
        };
        let event = CpuEvent::from(wire);
        assert_eq!(
            (
                event.kind,
                event.enabled,
                event.error,
                event.guest_monotonic
            ),
            (
                CpuEventKind::Unknown(99),
                None,
                None,
                Duration::from_millis(1500)
            )
        );
        let failed = CpuEvent::from(pb::CpuEvent {
            kind: pb::CpuEventKind::OnlineFailed.into(),
            has_enabled: true,
            error: "EIO".into(),
            ..pb::CpuEvent::default()
        });
        assert_eq!(
            (failed.kind, failed.enabled, failed.error.as_deref()),
            (CpuEventKind::OnlineFailed, Some(vec![]), Some("EIO"))
        );
    }

    #[tokio::test]
    async fn test_connect_garbage_handshake_fails_fast_with_handshake_error() {
        let socket = temp_socket("garbage");
        let path = socket.path();
        answer_with(&path, b"HELLO THERE\n");
        let started = Instant::now();
        let err = AgentClient::connect_with(&path, Duration::from_secs(5), fast())
            .await
            .expect_err("garbage");
        assert!(matches!(err, AgentClientError::Handshake { .. }), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "not retried until the deadline"
        );
    }

    #[tokio::test]
    async fn test_connect_nobody_serving_times_out_at_deadline() {
        let socket = temp_socket("absent");
        let path = socket.path();
        let deadline = Duration::from_millis(400);
        let started = Instant::now();
        let err = AgentClient::connect_with(&path, deadline, fast())
            .await
            .expect_err("nobody");
        let elapsed = started.elapsed();
        match err {
            AgentClientError::Timeout {
                after,
                last_error: Some(last),
                ..
            } => {
                assert_eq!(after, deadline);
                assert!(last.contains("Cannot connect"), "{last}");
            }
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert!(
            elapsed >= deadline && elapsed < deadline + Duration::from_secs(1),
            "{elapsed:?}"
        );
    }

    #[tokio::test]
    async fn test_connect_front_closing_without_answer_is_retried_until_deadline() {
        // What a VMM does while the guest does not listen on the port yet.
        let socket = temp_socket("closing");
        let path = socket.path();
        answer_with(&path, b"");
        let err = AgentClient::connect_with(&path, Duration::from_millis(300), fast())
            .await
            .expect_err("closed");
        assert!(
            matches!(
                err,
                AgentClientError::Timeout {
                    last_error: Some(_),
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn test_hybrid_connect_leaves_bytes_after_reply_in_socket() {
        let socket = temp_socket("preface");
        let path = socket.path();
        answer_with(&path, b"OK 77\nPRI * HTTP/2.0");
        let mut stream = hybrid_connect(&path, 1024, Duration::from_secs(2))
            .await
            .expect("handshake");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.expect("read");
        assert_eq!(rest, b"PRI * HTTP/2.0");
    }

    #[test]
    fn test_to_container_exec_names_the_container() {
        let start = pb::ExecRequest {
            request: Some(pb::exec_request::Request::Start(pb::ExecStart {
                argv: vec!["hostname".into()],
                env: vec!["A=1".into()],
                cwd: String::new(),
                tty: false,
            })),
        };
        let converted = to_container_exec("c1", start);
        assert_eq!(
            converted.request,
            Some(pb::container_exec_request::Request::Start(
                pb::ContainerExecStart {
                    container_id: "c1".into(),
                    argv: vec!["hostname".into()],
                    env: vec!["A=1".into()],
                    cwd: String::new(),
                    tty: false,
                }
            ))
        );
    }

    #[test]
    fn test_container_stats_from_wire_memory_fields() {
        let stats = ContainerStats::from(pb::ContainerStatsResponse {
            memory_stat: Some(pb::MemoryStat {
                anon: 4096,
                pgmajfault: 3,
                ..pb::MemoryStat::default()
            }),
            memory_events: Some(pb::MemoryEvents {
                oom_kill: 2,
                ..pb::MemoryEvents::default()
            }),
            memory_swap_current_bytes: Some(0),
            ..pb::ContainerStatsResponse::default()
        });
        assert_eq!(
            (
                stats.memory_stat.anon,
                stats.memory_stat.pgmajfault,
                stats.memory_events.oom_kill,
                stats.memory_swap_current_bytes,
                stats.memory_peak_bytes
            ),
            (4096, 3, 2, Some(0), None)
        );
        // An older agent sends no memory.stat: zeros, not an error.
        let old = ContainerStats::from(pb::ContainerStatsResponse::default());
        assert_eq!(
            (old.memory_stat, old.memory_events),
            (MemoryStat::default(), MemoryEvents::default())
        );
    }

    #[test]
    fn test_guest_info_share_fields_empty_are_none() {
        let info = GuestInfo::from(pb::GetGuestInfoResponse {
            share_tag: "pod".into(),
            ..pb::GetGuestInfoResponse::default()
        });
        assert_eq!(
            (info.share_tag.as_deref(), info.share_error),
            (Some("pod"), None)
        );
    }

    #[test]
    fn test_container_status_from_wire_keeps_unknown() {
        assert_eq!(
            ContainerStatus::from(pb::ContainerStatus::Running as i32),
            ContainerStatus::Running
        );
        assert_eq!(ContainerStatus::from(42), ContainerStatus::Unknown(42));
    }
}
