//! `cargo xtask bench …`: measurements as medians over several runs (docs/BENCHMARKS.md).

use std::time::Duration;

use clap::Subcommand;

use crate::{node, prepare_node, NodeOpts, XResult};

#[derive(Subcommand)]
pub enum Bench {
    /// The emulated node itself: boot to the command, and whole-run wall time, over N runs.
    Node {
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

pub fn median(mut v: Vec<Duration>) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    Some(v[v.len() / 2])
}

pub fn run(b: Bench) -> XResult<i32> {
    match b {
        Bench::Node { runs } => {
            let opts = NodeOpts {
                smp: 2,
                memory: "3G".into(),
                timeout: 300,
                release: false,
                add: Vec::new(),
                containerd: false,
            };
            let (spec, k, bb) = prepare_node(&opts, Vec::new(), vec!["true".into()])?;
            let (mut boot, mut cmd, mut wall) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..runs {
                let o = node::run(&spec, &k, &bb)?;
                if o.exit_code != 0 {
                    return Err(format!("run {i}: `true` exited {}", o.exit_code).into());
                }
                boot.extend(o.boot_to_command);
                cmd.extend(o.command_time);
                wall.push(o.wall);
            }
            let m = |v: Vec<Duration>| {
                median(v).map_or("?".to_string(), |d| format!("{:.2}s", d.as_secs_f64()))
            };
            println!("bench node: {runs} runs, -smp 2 -m 3G, command `true`");
            println!("  guest uptime at command start (median): {}", m(boot));
            println!("  command `true` inside the node (median): {}", m(cmd));
            println!(
                "  qemu process wall time, start to exit (median): {}",
                m(wall)
            );
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_median_of_odd_and_even_and_empty() {
        let s = Duration::from_secs;
        assert_eq!(median(vec![s(3), s(1), s(2)]), Some(s(2)));
        assert_eq!(median(vec![s(4), s(1), s(2), s(3)]), Some(s(3)));
        assert_eq!(median(Vec::new()), None);
    }
}
