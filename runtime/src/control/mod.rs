//! The per-sandbox operator API (`accordion.control.v1`) on `/run/accordion/<name>/control.sock`:
//! served by the process that owns the sandbox's VM, used by the `accordion` CLI.

pub mod client;
pub mod server;

use std::path::PathBuf;
use std::time::Duration;

use crate::agent_client::AgentClientError;

/// Errors of the control API, on either side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No sandbox of that name exists.
    #[error("No sandbox named {0:?} (see `accordion ps`)")]
    NoSandbox(String),
    /// The socket exists but nobody answers on it.
    #[error("Cannot reach the control socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The serving process did not answer in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What was being done.
        operation: &'static str,
        /// The deadline that passed.
        after: Duration,
    },
    /// The call failed on the serving side.
    #[error("{operation} failed: {code:?}: {message}")]
    Rpc {
        /// What was being done.
        operation: &'static str,
        /// gRPC status code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// The control socket could not be served.
    #[error("Cannot serve the control socket {path}")]
    Serve {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An exec through the control socket failed.
    #[error("Exec failed")]
    Exec(#[source] AgentClientError),
}
