//! accordion-cri's library: a Kubernetes CRI v1 client (the `runtime.v1` RuntimeService and
//! ImageService, generated from the vendored `proto/runtime/v1/api.proto`), crictl's pod and
//! container JSON files, and the JSON that `inspect` prints. Debian packages no crictl; the
//! end-to-end tests drive containerd's CRI through the `accordion-cri` binary instead.

// This is a tool, not a test helper: the crate's test-helper allowances do not apply here.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod client;
pub mod config;
pub mod view;

/// The generated CRI v1 types and clients (`runtime.v1`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("runtime.v1");
}

pub use client::{Cri, CriError, DEFAULT_ENDPOINT};
