//! Generates the client of the Kubernetes CRI v1 API (`runtime.v1`: RuntimeService and
//! ImageService) from the vendored `proto/runtime/v1/api.proto`, for accordion-cri.
//!
//! Like proto/build.rs, the schema is parsed by protox (pure Rust), so no `protoc` is needed.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    let fds = protox::compile(["runtime/v1/api.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // accordion-cri is a client: no server code, and the channel is built by src/cri/client.rs
        // (a Unix socket connector), so no transport helpers either.
        .build_server(false)
        .build_transport(false)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
