//! A CRI v1 connection over a Unix socket (containerd's), with a deadline on every call.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

use super::pb::image_service_client::ImageServiceClient;
use super::pb::runtime_service_client::RuntimeServiceClient;

/// containerd's CRI socket, and crictl's default.
pub const DEFAULT_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";

/// Largest message accepted: a verbose ContainerStatus carries the whole OCI spec as JSON.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Why a CRI call did not succeed.
#[derive(Debug)]
pub enum CriError {
    /// The endpoint is not a Unix socket address.
    Endpoint(String),
    /// The socket could not be connected.
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The runtime answered with an error status.
    Rpc { rpc: &'static str, status: Status },
    /// The runtime did not answer within the deadline.
    Timeout { rpc: &'static str, after: Duration },
}

impl fmt::Display for CriError {
    // `rpc error: code = … desc = …` is grpc-go's wording, which crictl prints too.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CriError::Endpoint(e) => write!(
                f,
                "unsupported endpoint {e:?}: expected unix:///path or /path"
            ),
            CriError::Connect { path, source } => {
                write!(f, "cannot connect to {}: {source}", path.display())
            }
            CriError::Rpc { rpc, status } => write!(
                f,
                "{rpc}: rpc error: code = {:?} desc = {}",
                status.code(),
                status.message()
            ),
            CriError::Timeout { rpc, after } => write!(
                f,
                "{rpc}: rpc error: code = DeadlineExceeded desc = no answer within {}s",
                after.as_secs()
            ),
        }
    }
}

impl std::error::Error for CriError {}

/// The socket path of an endpoint: `unix:///path` or a plain absolute path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, CriError> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if path.starts_with('/') {
        Ok(PathBuf::from(path))
    } else {
        Err(CriError::Endpoint(endpoint.to_owned()))
    }
}

/// Clients of both CRI services over one connection.
#[derive(Debug, Clone)]
pub struct Cri {
    pub runtime: RuntimeServiceClient<Channel>,
    pub image: ImageServiceClient<Channel>,
    /// Deadline of each call, beyond the time the call itself asks the runtime to wait.
    pub timeout: Duration,
}

impl Cri {
    /// Connects to the runtime at `endpoint`; `timeout` bounds the connection and every call.
    pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Self, CriError> {
        let path = socket_path(endpoint)?;
        let connect_err = |source| CriError::Connect {
            path: path.clone(),
            source,
        };
        // Connect once now, so a missing socket is reported as such and not as a failed call.
        let first = tokio::time::timeout(timeout, UnixStream::connect(&path))
            .await
            .map_err(|_| {
                connect_err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {}s", timeout.as_secs()),
                ))
            })?
            .map_err(connect_err)?;
        let first = std::sync::Mutex::new(Some(first));
        let target = path.clone();
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
        let channel = Endpoint::from_static("http://cri.sock")
            .connect_with_connector(connector)
            .await
            .map_err(|e| connect_err(std::io::Error::other(e)))?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            image: ImageServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
            timeout,
        })
    }

    /// A request whose gRPC deadline is the call timeout plus `extra` (the time the call itself
    /// may legitimately take, such as a stop's grace period).
    pub fn request<T>(&self, message: T, extra: Duration) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout.saturating_add(extra));
        request
    }

    /// Awaits a call under the same deadline as [`Cri::request`], naming `rpc` in errors.
    pub async fn call<T>(
        &self,
        rpc: &'static str,
        extra: Duration,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, CriError> {
        let after = self.timeout.saturating_add(extra);
        match tokio::time::timeout(after, call).await {
            Err(_) => Err(CriError::Timeout { rpc, after }),
            Ok(Err(status)) => Err(CriError::Rpc { rpc, status }),
            Ok(Ok(response)) => Ok(response.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn test_socket_path_accepts_unix_urls_and_absolute_paths() {
        assert_eq!(
            socket_path(DEFAULT_ENDPOINT).unwrap(),
            Path::new("/run/containerd/containerd.sock")
        );
        assert_eq!(
            socket_path("/run/x.sock").unwrap(),
            Path::new("/run/x.sock")
        );
    }

    #[test]
    fn test_socket_path_refuses_tcp_and_relative_endpoints() {
        assert!(socket_path("tcp://127.0.0.1:1234").is_err());
        assert!(socket_path("unix://relative.sock").is_err());
    }

    #[test]
    fn test_rpc_error_reads_like_grpc_go() {
        let err = CriError::Rpc {
            rpc: "ContainerStatus",
            status: Status::not_found("container \"x\" not found"),
        };

        assert_eq!(
            err.to_string(),
            "ContainerStatus: rpc error: code = NotFound desc = container \"x\" not found"
        );
    }
}
