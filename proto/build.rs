//! Generates the gRPC code of `accordion.agent.v1` and `accordion.control.v1`.
//!
//! The `.proto` files are parsed by protox, a pure-Rust protobuf compiler, instead of `protoc`:
//! the build then needs no system package (Debian's protobuf-compiler) on developer machines, CI or
//! the cross build, and every machine compiles the schema with the same, Cargo-pinned, compiler.

use std::error::Error;

const PROTOS: &[&str] = &[
    "accordion/agent/v1/agent.proto",
    "accordion/control/v1/control.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    let fds = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        // The crate has no transport: callers bring their own channel or server.
        .build_transport(false)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
