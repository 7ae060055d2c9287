//! Driving `accordion-cri` (the CRI v1 client of this repository) from node tests: one helper
//! for what every CRI test does, instead of a copy per test file.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::containerd::{leftovers, wait_for};
use crate::{assert_code, text};

/// Runs `accordion-cri args…`.
pub fn cri(args: &[&str]) -> Output {
    Command::new("accordion-cri")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run accordion-cri (is it on PATH?)")
}

/// Runs `accordion-cri args…` and returns its stdout, trimmed; panics when it fails.
pub fn cri_ok(args: &[&str]) -> String {
    let out = cri(args);
    assert_code(&out, 0);
    text(&out.stdout).trim().to_string()
}

/// Writes `json` to a file named after `name` for `accordion-cri`; returns its path.
pub fn write_json(name: &str, json: &serde_json::Value) -> String {
    let path = format!("/tmp/accordion-cri-{name}.json");
    std::fs::write(&path, serde_json::to_vec_pretty(json).expect("json")).expect("write");
    path
}

/// Waits up to a minute for Accordion to have left nothing behind (processes, state, mounts,
/// host cgroups); panics naming what is left.
pub fn assert_no_leftovers(after: &str) {
    let left = wait_for(Duration::from_secs(60), || {
        let l = leftovers();
        l.is_empty().then_some(()).ok_or(l)
    });
    if let Err(left) = left {
        panic!(
            "left behind after {after}: {left:?}\n{}",
            crate::containerd::diagnose_leftovers()
        );
    }
}
