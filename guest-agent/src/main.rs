//! accordion-agent: PID 1 of the guest. The gRPC agent lands with the agent issue; today the binary
//! only identifies itself so the build, packaging and node harness carry it end to end.

fn main() {
    println!(
        "accordion-agent {} (serves {} on vsock port {} once implemented)",
        env!("CARGO_PKG_VERSION"),
        accordion_proto::AGENT_PACKAGE,
        accordion_proto::AGENT_VSOCK_PORT
    );
}
