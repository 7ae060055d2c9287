//! The CLI side of the control socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use accordion_proto::control::v1 as cpb;
use accordion_proto::control::v1::control_client::ControlClient as RawClient;
use accordion_proto::MAX_MESSAGE_BYTES;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Request;

use super::ControlError;
use crate::agent_client::{drive_exec, ExecSpec, ExitStatus};
use crate::sandbox;

/// Deadline of a Status call and of an exec's start.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Extra time a Stop call may take beyond its grace period (forcing the VM down, cleanup).
const STOP_SLACK: Duration = Duration::from_secs(15);

/// A connection to one sandbox's control socket.
#[derive(Debug, Clone)]
pub struct ControlClient {
    raw: RawClient<Channel>,
}

impl ControlClient {
    /// Connects to the control socket of sandbox `name`.
    pub async fn connect_to(name: &str) -> Result<Self, ControlError> {
        let dir = sandbox::state_dir(name);
        if sandbox::validate_name(name).is_err() || !dir.is_dir() {
            return Err(ControlError::NoSandbox(name.to_owned()));
        }
        Self::connect(&sandbox::control_socket(name)).await
    }

    /// Connects to the control socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, ControlError> {
        let target: PathBuf = path.to_owned();
        let connect_err = |source| ControlError::Connect {
            path: path.to_owned(),
            source,
        };
        // One eager connection: a missing or dead socket is reported now, not at the first call.
        let first = tokio::time::timeout(CALL_TIMEOUT, UnixStream::connect(&target))
            .await
            .map_err(|_| ControlError::Timeout {
                operation: "connecting to the control socket",
                after: CALL_TIMEOUT,
            })?
            .map_err(connect_err)?;
        let first = std::sync::Mutex::new(Some(first));
        let connector = tower::service_fn(move |_: Uri| {
            let ready = first
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            let target = target.clone();
            async move {
                let stream = match ready {
                    Some(stream) => stream,
                    None => UnixStream::connect(&target).await?,
                };
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        // The URI is only a label: the connector decides where bytes go.
        let channel = Endpoint::from_static("http://control.sock")
            .connect_with_connector(connector)
            .await
            .map_err(|e| connect_err(std::io::Error::other(crate::error_chain(&e))))?;
        let raw = RawClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { raw })
    }

    /// The sandbox's status.
    /// Status of sandbox `name` if it answers within `limit` (listings give a sandbox that
    /// does not answer a row of its own instead of waiting for it).
    pub async fn status_within(name: &str, limit: Duration) -> Option<cpb::StatusResponse> {
        tokio::time::timeout(limit, async {
            Self::connect_to(name).await?.status().await
        })
        .await
        .ok()?
        .ok()
    }

    pub async fn status(&self) -> Result<cpb::StatusResponse, ControlError> {
        let mut request = Request::new(cpb::StatusRequest {});
        request.set_timeout(CALL_TIMEOUT);
        call("Status", CALL_TIMEOUT, self.raw.clone().status(request)).await
    }

    /// Stops the sandbox: graceful for `grace`, then forced. Returns why the VM stopped.
    pub async fn stop(&self, grace: Duration) -> Result<String, ControlError> {
        let limit = grace + STOP_SLACK;
        let request = Request::new(cpb::StopRequest {
            timeout_ms: grace.as_millis().max(1) as u64,
        });
        let response = call("Stop", limit, self.raw.clone().stop(request)).await?;
        Ok(response.exit_reason)
    }

    /// Resizes the sandbox to `vcpus`, waiting up to `timeout` for the guest's acknowledgement.
    pub async fn resize(
        &self,
        vcpus: u32,
        timeout: Duration,
    ) -> Result<cpb::ResizeResponse, ControlError> {
        let request = Request::new(cpb::ResizeRequest {
            vcpus,
            timeout_ms: timeout.as_millis().max(1) as u64,
        });
        call(
            "Resize",
            timeout + CALL_TIMEOUT,
            self.raw.clone().resize(request),
        )
        .await
    }

    /// Sets the guest's memory to `bytes`; answers once the guest acknowledged it.
    pub async fn resize_memory(
        &self,
        bytes: u64,
        timeout: Duration,
    ) -> Result<cpb::ResizeMemoryResponse, ControlError> {
        let request = Request::new(cpb::ResizeMemoryRequest {
            bytes,
            timeout_ms: timeout.as_millis().max(1) as u64,
        });
        call(
            "ResizeMemory",
            timeout + CALL_TIMEOUT,
            self.raw.clone().resize_memory(request),
        )
        .await
    }

    /// Runs a command in the guest through the sandbox's agent.
    pub async fn exec<I, O, E>(
        &self,
        spec: ExecSpec,
        stdin: Option<I>,
        stdout: O,
        stderr: E,
    ) -> Result<ExitStatus, ControlError>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        let mut raw = self.raw.clone();
        drive_exec(
            |requests| async move { raw.exec(requests).await },
            CALL_TIMEOUT,
            spec,
            stdin,
            stdout,
            stderr,
        )
        .await
        .map_err(ControlError::Exec)
    }
}

async fn call<T>(
    operation: &'static str,
    limit: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ControlError> {
    match tokio::time::timeout(limit, call).await {
        Err(_) => Err(ControlError::Timeout {
            operation,
            after: limit,
        }),
        Ok(Err(status)) => Err(ControlError::Rpc {
            operation,
            code: status.code(),
            message: status.message().to_owned(),
        }),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}
