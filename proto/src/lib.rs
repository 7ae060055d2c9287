//! Accordion's wire protocols: `accordion.agent.v1` (host ↔ guest agent over vsock) and
//! `accordion.control.v1` (operator control socket). The gRPC services arrive with the agent issue;
//! until then this crate only fixes the names both sides will share.

/// The vsock port the guest agent serves gRPC on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Protobuf package of the host ↔ guest agent API.
pub const AGENT_PACKAGE: &str = "accordion.agent.v1";

/// Protobuf package of the per-sandbox operator API.
pub const CONTROL_PACKAGE: &str = "accordion.control.v1";
