//! The `start` action's two protocols: what containerd writes to the shim's stdin and what the
//! shim answers on stdout.
//!
//! - containerd 2.3 and later write a protobuf `BootstrapParams` (containerd.runtime.bootstrap.v1:
//!   identity, containerd's addresses, log level, runtime options as extensions) and read a
//!   protobuf `BootstrapResult` back. We answer task API version 3.
//! - containerd 1.7 to 2.2 pass the same facts as flags and environment (`TTRPC_ADDRESS`), with
//!   the runtime options (a protobuf `Any`), if any, on stdin, and read a bare address back, which
//!   they take as task API version 2. containerd 1.7 refuses any version above 2.
//!
//! The daemon serves both task API versions (server.rs), so each reply names a version it serves.
//! containerd-shim 0.12 implements the same detection, but privately and with version 3 in both
//! replies; this module keeps its rules (containerd's own pkg/shim compat rules) and our replies.

use std::io::Read;

use containerd_shim::bootstrap::{BootstrapParams, BootstrapResult, Extension};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::{Flags, StartOpts};

use super::options::{self, OptionsError};

/// containerd caps what it writes to a shim's stdin at 10 MiB; so do we.
const MAX_INPUT: u64 = 10 << 20;
/// The task API version the bootstrap reply announces: the daemon's native one.
pub const BOOTSTRAP_TASK_API: i32 = 3;
/// The only transport the daemon serves.
const PROTOCOL: &str = "ttrpc";
/// containerd's ttrpc address, in the environment of the legacy protocol (and of the daemon).
pub const TTRPC_ADDRESS: &str = "TTRPC_ADDRESS";
/// containerd's gRPC address, in the environment when the `-address` flag is missing.
const GRPC_ADDRESS: &str = "GRPC_ADDRESS";

/// How containerd started us, which decides the reply's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// containerd 2.3+: `BootstrapParams` in, `BootstrapResult` out.
    Bootstrap,
    /// containerd 1.7 to 2.2: flags and environment in, a bare address (task API 2) out.
    Legacy,
}

/// Errors of the `start` action.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot read the bootstrap parameters from stdin")]
    Read(#[source] std::io::Error),
    #[error(
        "the bootstrap parameters are for {params_namespace}/{params_id}, the command line for \
         {flags_namespace}/{flags_id}"
    )]
    Mismatch {
        params_namespace: String,
        params_id: String,
        flags_namespace: String,
        flags_id: String,
    },
    #[error("the bootstrap parameters carry no containerd ttrpc address")]
    NoTtrpcAddress,
    #[error("{TTRPC_ADDRESS} is not set (containerd sets it for its shims)")]
    NoTtrpcEnv,
    #[error("the runtime options are not usable")]
    Options(#[source] OptionsError),
    #[error("cannot encode the bootstrap result")]
    Encode(#[source] containerd_shim::protos::protobuf::Error),
}

/// What containerd's environment says, for the legacy protocol (read once, passed in for tests).
#[derive(Debug, Default, Clone)]
pub struct LegacyEnv {
    pub ttrpc_address: Option<String>,
    pub grpc_address: Option<String>,
}

impl LegacyEnv {
    pub fn from_env() -> Self {
        Self {
            ttrpc_address: std::env::var(TTRPC_ADDRESS).ok(),
            grpc_address: std::env::var(GRPC_ADDRESS).ok(),
        }
    }
}

/// Reads stdin (nothing when it is a terminal, as when run by hand), at most [`MAX_INPUT`].
pub fn read_stdin() -> Result<Vec<u8>, BootstrapError> {
    use std::io::IsTerminal;
    let stdin = std::io::stdin();
    let mut input = Vec::new();
    if !stdin.is_terminal() {
        stdin
            .lock()
            .take(MAX_INPUT)
            .read_to_end(&mut input)
            .map_err(BootstrapError::Read)?;
    }
    Ok(input)
}

/// Turns what containerd passed to `start` into the spawn options and the protocol to answer in.
/// The runtime options, when present, must name a configuration that loads: a bad one fails here,
/// before a daemon exists, with the reason in containerd's error.
pub fn parse_start(
    input: &[u8],
    flags: &Flags,
    env: &LegacyEnv,
) -> Result<(StartOpts, Protocol), BootstrapError> {
    let (params, protocol) = match bootstrap_params(input, flags)? {
        Some(params) => (params, Protocol::Bootstrap),
        None => (legacy_params(input, flags, env)?, Protocol::Legacy),
    };
    if params.containerd_ttrpc_address.is_empty() {
        return Err(BootstrapError::NoTtrpcAddress);
    }
    let mut opts = StartOpts::from(params);
    // -debug comes as a flag in both protocols; the bootstrap's log level sets it too (spawn
    // passes it on to the daemon).
    opts.debug |= flags.debug;
    options::runtime_config(runtime_options(&opts.extensions)).map_err(BootstrapError::Options)?;
    Ok((opts, protocol))
}

/// Our runtime options among containerd's extensions. Other extensions (facts meant for other
/// consumers, such as the sandbox's or CRI's) are not ours to judge; a runtime options type that is
/// not ours is refused by Create, which receives the same options.
fn runtime_options(extensions: &[Any]) -> Option<&Any> {
    extensions
        .iter()
        .find(|any| options::is_runtime_options(any))
}

/// `input` as `BootstrapParams`, or `None` when containerd used the legacy protocol. A runtime
/// options `Any` also decodes as `BootstrapParams` (its type URL lands in `instance_id`, its value
/// in `namespace`, nothing else set); a real message for another instance is an error.
fn bootstrap_params(
    input: &[u8],
    flags: &Flags,
) -> Result<Option<BootstrapParams>, BootstrapError> {
    if input.is_empty() {
        return Ok(None);
    }
    let Ok(params) = BootstrapParams::parse_from_bytes(input) else {
        return Ok(None);
    };
    if params.instance_id == flags.id && params.namespace == flags.namespace {
        return Ok(Some(params));
    }
    let identity_only = BootstrapParams {
        instance_id: params.instance_id.clone(),
        namespace: params.namespace.clone(),
        ..Default::default()
    };
    if params == identity_only {
        return Ok(None);
    }
    Err(BootstrapError::Mismatch {
        params_namespace: params.namespace,
        params_id: params.instance_id,
        flags_namespace: flags.namespace.clone(),
        flags_id: flags.id.clone(),
    })
}

/// The legacy protocol's facts as `BootstrapParams`, so both protocols continue the same way.
fn legacy_params(
    input: &[u8],
    flags: &Flags,
    env: &LegacyEnv,
) -> Result<BootstrapParams, BootstrapError> {
    let ttrpc_address = env
        .ttrpc_address
        .clone()
        .filter(|a| !a.is_empty())
        .ok_or(BootstrapError::NoTtrpcEnv)?;
    let mut params = BootstrapParams {
        instance_id: flags.id.clone(),
        namespace: flags.namespace.clone(),
        containerd_ttrpc_address: ttrpc_address,
        containerd_grpc_address: flags.address.clone(),
        containerd_binary: flags.publish_binary.clone(),
        ..Default::default()
    };
    if params.containerd_grpc_address.is_empty() {
        params.containerd_grpc_address = env.grpc_address.clone().unwrap_or_default();
    }
    if let Ok(any) = Any::parse_from_bytes(input) {
        if !any.type_url.is_empty() {
            params.extensions.push(Extension {
                value: Some(any).into(),
                ..Default::default()
            });
        }
    }
    Ok(params)
}

/// The reply to `start` for `address`, in the form `protocol` expects.
pub fn reply(address: &str, protocol: Protocol) -> Result<Vec<u8>, BootstrapError> {
    match protocol {
        // A bare address: task API 2 to every containerd that does not speak the bootstrap
        // protocol, including 1.7, which refuses the JSON form with a version above 2.
        Protocol::Legacy => Ok(address.as_bytes().to_vec()),
        Protocol::Bootstrap => BootstrapResult {
            version: BOOTSTRAP_TASK_API,
            address: address.to_string(),
            protocol: PROTOCOL.to_string(),
            ..Default::default()
        }
        .write_to_bytes()
        .map_err(BootstrapError::Encode),
    }
}

#[cfg(test)]
mod tests;
