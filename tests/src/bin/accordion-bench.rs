//! accordion-bench: boot-time measurements inside the node, for `cargo xtask bench boot`.
//!
//! `accordion-bench run --label L --marker STR --runs N --out FILE -- cmd…` starts `cmd` N times,
//! timing process start → the first stdout line containing STR (the guest init's console marker),
//! sampling the process's RSS at that moment, and reading the VMM's own boot-timer line (`boot
//! timer N ms` on stderr) when it prints one. `accordion-bench report FILE` prints medians and the
//! ratios the benchmark is about. `accordion-bench latency --label L --runs N --out FILE -- cmd…`
//! times N whole runs of a short command (e.g. `accordion exec NAME -- true`), for medians and p99.
//! `accordion-bench vcpus --name S --vcpus N --label L --out FILE` resizes sandbox S and records
//! the acknowledged latency `accordion resize` reports, once the guest is seen at the target.
//! `accordion-bench memory --name S --mib M --label L --out FILE` does the same for a memory
//! resize (`accordion status` must show exactly M - boot MiB plugged and asked), and
//! `accordion-bench rss --name S --label L --out FILE` records the resident memory of S's VMM
//! process (guest RAM included).
//!
//! A sample that fails is written as `FAIL label reason` and never dropped: `report` prints each
//! label's failures beside its median and exits non-zero when any sample failed.

use std::collections::BTreeMap;

use accordion_tests::{goal_line, guest_online, record_failure as fail, smaps_kb, Target};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone)]
struct Sample {
    marker_ms: f64,
    boot_timer_ms: Option<f64>,
    /// Resident memory of the VMM process that is not guest RAM.
    vmm_kb: u64,
    /// Resident guest RAM (the memfd mapping; 0 for a VMM whose RAM is anonymous).
    guest_kb: u64,
    total_kb: u64,
    /// From `accordion run --timings`: the VM's creation and, of it, the VMM's jail.
    vm_started_ms: Option<f64>,
    jail_ms: Option<f64>,
}

/// The number after the first `key` in `text` (`key` ends where the number starts).
fn number_after(text: &str, key: &str) -> Option<f64> {
    text.split(key)
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn one_run(marker: &str, cmd: &[String], timeout: Duration) -> Result<Sample, String> {
    let start = Instant::now();
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", cmd[0]))?;
    let pid = child.id();
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut sample = Sample::default();
    let (mut found, mut rss_gone) = (false, false);
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if !found && line.contains(marker) {
            sample.marker_ms = start.elapsed().as_secs_f64() * 1e3;
            // The process printed the marker and its stdout is still open, so it is alive unless
            // it exited right after; then there is no sample, rather than one of 0 KiB.
            match smaps_kb(pid) {
                Some((vmm, guest)) if vmm > 0 => {
                    sample.vmm_kb = vmm;
                    sample.guest_kb = guest;
                    sample.total_kb = vmm + guest;
                }
                _ => rss_gone = true,
            }
            found = true;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            break;
        }
    }
    let _ = child.wait();
    let err = err_reader.join().unwrap_or_default();
    sample.boot_timer_ms = number_after(&err, "boot timer ");
    sample.vm_started_ms = number_after(&err, "accordion run: VM started ");
    sample.jail_ms = number_after(&err, " ms (jail ");
    if rss_gone {
        Err(format!("process {pid} ended before its RSS was sampled"))
    } else if found {
        Ok(sample)
    } else {
        Err(format!(
            "marker {marker:?} never appeared; stderr: {}",
            err.trim()
        ))
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// A subcommand's `--key value` options, up to `--`, and the command after it.
struct Options {
    values: BTreeMap<String, String>,
    command: Vec<String>,
}

impl Options {
    /// Parses `args`, accepting only the options in `known`.
    fn parse(args: &[String], known: &[&str]) -> Result<Options, String> {
        let mut values = BTreeMap::new();
        let mut i = 0;
        while i < args.len() && args[i] != "--" {
            if !known.contains(&args[i].as_str()) {
                return Err(format!("unknown option {}", args[i]));
            }
            let value = args
                .get(i + 1)
                .ok_or(format!("{} needs a value", args[i]))?;
            values.insert(args[i].clone(), value.clone());
            i += 2;
        }
        let command = args
            .get(i + 1..)
            .map(<[String]>::to_vec)
            .unwrap_or_default();
        Ok(Options { values, command })
    }

    fn text(&self, key: &str, default: &str) -> String {
        self.values
            .get(key)
            .map_or(default, String::as_str)
            .to_string()
    }

    fn number<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, String> {
        self.values
            .get(key)
            .map_or(Ok(default), |v| v.parse().map_err(|_| format!("bad {key}")))
    }

    /// `--out`, opened for appending samples.
    fn out(&self) -> Result<std::fs::File, String> {
        let out = self.text("--out", "/root/bench.txt");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out)
            .map_err(|e| format!("{out}: {e}"))
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let o = Options::parse(args, &["--label", "--marker", "--runs", "--out"])?;
    let (label, marker) = (o.text("--label", ""), o.text("--marker", "@@EXIT-CODE"));
    let runs: usize = o.number("--runs", 5)?;
    let cmd = &o.command;
    if cmd.is_empty() || label.is_empty() {
        return Err(
            "usage: accordion-bench run --label L [--marker S] [--runs N] [--out F] -- cmd…".into(),
        );
    }
    let mut file = o.out()?;
    let mut failed = 0;
    for n in 0..runs {
        // One failed run (e.g. past the timeout on a loaded machine) is reported, not fatal: the
        // other configurations' medians still matter.
        let s = match one_run(&marker, cmd, Duration::from_secs(1200)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{label} run {}: FAILED: {e}", n + 1);
                fail(&mut file, &label, &e)?;
                failed += 1;
                continue;
            }
        };
        let line = format!(
            "{label} {:.1} {} {} {} {}",
            s.marker_ms,
            s.boot_timer_ms
                .map_or("-".to_string(), |b| format!("{b:.1}")),
            s.vmm_kb,
            s.guest_kb,
            s.total_kb
        );
        println!(
            "{label} run {}: marker {:.0} ms, boot timer {:?} ms",
            n + 1,
            s.marker_ms,
            s.boot_timer_ms
        );
        writeln!(file, "{line}").map_err(|e| e.to_string())?;
        for (what, ms) in [("vm-started", s.vm_started_ms), ("jail-setup", s.jail_ms)] {
            if let Some(ms) = ms {
                writeln!(file, "LAT {label}-{what} {ms:.1}").map_err(|e| e.to_string())?;
            }
        }
    }
    if failed == runs {
        return Err(format!("{label}: every run failed"));
    }
    Ok(())
}

/// The value at quantile `q` (0..=1) of `v`, nearest rank.
fn quantile(mut v: Vec<f64>, q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// `latency`: N timed runs of a command that must succeed; one `LAT label ms` line per run.
fn latency(args: &[String]) -> Result<(), String> {
    let o = Options::parse(args, &["--label", "--runs", "--out"])?;
    let label = o.text("--label", "");
    let runs: usize = o.number("--runs", 50)?;
    let cmd = &o.command;
    if cmd.is_empty() || label.is_empty() {
        return Err("usage: accordion-bench latency --label L [--runs N] [--out F] -- cmd…".into());
    }
    let mut file = o.out()?;
    let mut failed = 0;
    for n in 0..runs {
        let start = Instant::now();
        let status = Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("cannot start {}: {e}", cmd[0]))?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if status.success() {
            writeln!(file, "LAT {label} {ms:.2}").map_err(|e| e.to_string())?;
        } else {
            eprintln!("{label} run {}: FAILED: {status}", n + 1);
            fail(&mut file, &label, &status.to_string())?;
            failed += 1;
        }
    }
    if failed > 0 {
        return Err(format!("{label}: {failed} of {runs} runs failed"));
    }
    Ok(())
}

/// The latency `accordion resize` reports ("…) in 212.4 ms").
fn resize_latency(stdout: &str) -> Option<f64> {
    stdout
        .lines()
        .find_map(|l| l.rsplit_once(" in ")?.1.strip_suffix(" ms")?.parse().ok())
}

/// `accordion resize NAME FLAG VALUE`; the acknowledged latency it reports, in ms.
fn timed_resize(name: &str, flag: &str, value: &str) -> Result<f64, String> {
    let out = Command::new("accordion")
        .args(["resize", name, flag, value])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run accordion resize: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "accordion resize {name} {flag} {value}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    resize_latency(&stdout).ok_or(format!("no latency in {:?}", stdout.trim()))
}

/// One timed resize: `accordion resize`'s acknowledged latency, then (untimed) `accordion
/// status` must show the guest at the target. Anything else is a failed sample.
fn vcpus_sample(name: &str, target: u32) -> Result<f64, String> {
    let ms = timed_resize(name, "--vcpus", &target.to_string())?;
    let status = Command::new("accordion")
        .args(["status", name])
        .output()
        .map_err(|e| format!("cannot run accordion status: {e}"))?;
    match guest_online(&String::from_utf8_lossy(&status.stdout)) {
        Some(n) if n == target => Ok(ms),
        Some(n) => Err(format!(
            "acknowledged {target} vCPUs, but the guest shows {n} online"
        )),
        None => Err(format!("accordion status {name} shows no guest CPU count")),
    }
}

/// Writes a sample as `KIND label value`, or a failed one as `FAIL label reason` (then the command
/// fails too).
fn record_sample(
    file: &mut std::fs::File,
    kind: &str,
    label: &str,
    sample: Result<String, String>,
) -> Result<(), String> {
    match sample {
        Ok(value) => writeln!(file, "{kind} {label} {value}").map_err(|e| e.to_string()),
        Err(e) => {
            fail(file, label, &e)?;
            Err(format!("{label}: {e}"))
        }
    }
}

/// A `key: value` line of `accordion status NAME`.
fn status_value(name: &str, key: &str) -> Result<String, String> {
    let out = Command::new("accordion")
        .args(["status", name])
        .output()
        .map_err(|e| format!("cannot run accordion status: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("{key}: ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(str::to_string)
        .ok_or(format!("accordion status {name} shows no {key:?}"))
}

/// The MiB numbers of `memory: B MiB configured, …` and `memory plugged: P MiB plugged of R MiB
/// asked, …`: (boot, plugged, asked).
fn memory_figures(memory: &str, plugged: &str) -> Option<(u64, u64, u64)> {
    let boot = memory.split_whitespace().next()?.parse().ok()?;
    let mut words = plugged.split_whitespace();
    let p = words.next()?.parse().ok()?;
    let r = words.nth(3)?.parse().ok()?;
    Some((boot, p, r))
}

/// One timed memory resize: `accordion resize --memory`'s acknowledged latency, then (untimed)
/// `accordion status` must show the VMM at exactly that size.
fn memory_sample(name: &str, mib: u64) -> Result<f64, String> {
    let ms = timed_resize(name, "--memory", &format!("{mib}M"))?;
    let (memory, plugged) = (
        status_value(name, "memory")?,
        status_value(name, "memory plugged")?,
    );
    match memory_figures(&memory, &plugged) {
        Some((boot, p, r)) if boot + p == mib && p == r => Ok(ms),
        Some(_) => Err(format!(
            "acknowledged {mib} MiB, but status shows {memory:?}, {plugged:?}"
        )),
        None => Err(format!("cannot read {memory:?}, {plugged:?}")),
    }
}

/// `memory --name S --mib M --label L --out FILE`.
fn memory(args: &[String]) -> Result<(), String> {
    let o = Options::parse(args, &["--name", "--mib", "--label", "--out"])?;
    let (name, label) = (o.text("--name", ""), o.text("--label", ""));
    let mib: u64 = o.number("--mib", 0)?;
    if name.is_empty() || label.is_empty() || mib == 0 {
        return Err("usage: accordion-bench memory --name S --mib M --label L [--out F]".into());
    }
    let sample = memory_sample(&name, mib).map(|ms| format!("{ms:.2}"));
    record_sample(&mut o.out()?, "LAT", &label, sample)
}

/// `rss --name S --label L --out FILE`: the VMM process's resident memory, guest RAM included,
/// as `RSS label KiB`.
fn rss(args: &[String]) -> Result<(), String> {
    let o = Options::parse(args, &["--name", "--label", "--out"])?;
    let (name, label) = (o.text("--name", ""), o.text("--label", ""));
    if name.is_empty() || label.is_empty() {
        return Err("usage: accordion-bench rss --name S --label L [--out F]".into());
    }
    let mut file = o.out()?;
    let sample = status_value(&name, "vmm process")
        .and_then(|pid| {
            pid.parse::<u32>()
                .map_err(|e| format!("vmm process {pid:?}: {e}"))
        })
        .and_then(|pid| smaps_kb(pid).ok_or(format!("the VMM process {pid} is gone")));
    match sample {
        Ok((other, guest)) => {
            writeln!(file, "RSS {label} {}", other + guest).map_err(|e| e.to_string())
        }
        Err(e) => {
            fail(&mut file, &label, &e)?;
            Err(format!("{label}: {e}"))
        }
    }
}

/// `vcpus --name S --vcpus N --label L --out FILE`.
fn vcpus(args: &[String]) -> Result<(), String> {
    let o = Options::parse(args, &["--name", "--vcpus", "--label", "--out"])?;
    let (name, label) = (o.text("--name", ""), o.text("--label", ""));
    let target: u32 = o.number("--vcpus", 0)?;
    if name.is_empty() || label.is_empty() || target == 0 {
        return Err("usage: accordion-bench vcpus --name S --vcpus N --label L [--out F]".into());
    }
    let sample = vcpus_sample(&name, target).map(|ms| format!("{ms:.2}"));
    record_sample(&mut o.out()?, "LAT", &label, sample)
}

fn report(path: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut by: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    let mut lat: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut failed: BTreeMap<String, usize> = BTreeMap::new();
    let mut rss: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for l in text.lines() {
        let f: Vec<String> = l.split_whitespace().map(str::to_string).collect();
        if f.len() >= 2 && f[0] == "FAIL" {
            *failed.entry(f[1].clone()).or_default() += 1;
        } else if f.len() == 6 {
            by.entry(f[0].clone()).or_default().push(f);
        } else if f.len() == 3 && f[0] == "LAT" {
            if let Ok(ms) = f[2].parse() {
                lat.entry(f[1].clone()).or_default().push(ms);
            }
        } else if f.len() == 3 && f[0] == "RSS" {
            if let Ok(kb) = f[2].parse() {
                rss.entry(f[1].clone()).or_default().push(kb);
            }
        }
    }
    let col = |label: &str, i: usize| -> Option<f64> {
        median(
            by.get(label)?
                .iter()
                .filter_map(|f| f[i].parse().ok())
                .collect(),
        )
    };
    let failures = |label: &str| failed.get(label).copied().unwrap_or(0);
    println!(
        "{:<14} {:>5} {:>6} {:>16} {:>16} {:>14}",
        "config", "runs", "failed", "to marker (ms)", "boot timer (ms)", "RSS outside memfd (KiB)"
    );
    for (label, rows) in &by {
        let rss = col(label, 3).unwrap_or(0.0);
        println!(
            "{label:<14} {:>5} {:>6} {:>16.0} {:>16} {:>14.0}",
            rows.len(),
            failures(label),
            col(label, 1).unwrap_or(f64::NAN),
            col(label, 2).map_or("-".to_string(), |v| format!("{v:.0}")),
            rss
        );
    }
    let ratio = |name: &str, a: &str, b: &str, i: usize| {
        if let (Some(x), Some(y)) = (col(a, i), col(b, i)) {
            println!("{name}: {a} / {b} = {:.2}x", x / y);
        }
    };
    ratio(
        "(a) qemu vs accordion, to marker",
        "qemu-1of1",
        "acc-1of1",
        1,
    );
    ratio(
        "(b) 1-of-128 vs 1-of-1, to marker",
        "acc-1of128",
        "acc-1of1",
        1,
    );
    ratio(
        "(b) 1-of-128 vs 1-of-1, boot timer",
        "acc-1of128",
        "acc-1of1",
        2,
    );
    ratio(
        "(c) 128-of-128 vs 1-of-128, to marker",
        "acc-128of128",
        "acc-1of128",
        1,
    );
    ratio(
        "(c) 128-of-128 vs 1-of-128, boot timer",
        "acc-128of128",
        "acc-1of128",
        2,
    );
    ratio(
        "(e) qemu boot-to-init vs accordion start-to-agent-exec",
        "qemu-1of1",
        "acc-agent",
        1,
    );
    let cold = col("cold-boot", 1);
    for (label, v) in &lat {
        let med = quantile(v.clone(), 0.5).unwrap_or(f64::NAN);
        let share = cold.map_or(String::new(), |c| {
            format!(", {:.1}% of a cold boot ({c:.0} ms)", 100.0 * med / c)
        });
        println!(
            "(f) {label}: {} runs, {} failed, median {med:.1} ms, p99 {:.1} ms{share}",
            v.len(),
            failures(label),
            quantile(v.clone(), 0.99).unwrap_or(f64::NAN)
        );
    }
    let rss_median = |label: &str| rss.get(label).and_then(|v| quantile(v.clone(), 0.5));
    for (label, v) in &rss {
        println!(
            "(g) {label}: VMM RSS, guest RAM included: {} samples, {} failed, median {:.0} KiB",
            v.len(),
            failures(label),
            rss_median(label).unwrap_or(f64::NAN)
        );
    }
    if let (Some(after), Some(before)) = (
        rss_median("rss-after-shrink"),
        rss_median("rss-before-grow"),
    ) {
        println!(
            "(g) VMM RSS after a shrink / before the grow: {:.2}",
            after / before
        );
    }
    if let (Some(vmm), Some(guest)) = (col("acc-1of128", 3), col("acc-1of128", 4)) {
        println!(
            "(d) accordion VMM RSS after boot, 1-of-128, guest RAM excluded: {vmm:.0} KiB (guest RAM resident: {guest:.0} KiB)"
        );
    }
    // The goals of issue-level targets this file has figures for (docs/BENCHMARKS.md).
    let lat_median = |label: &str| lat.get(label).and_then(|v| quantile(v.clone(), 0.5));
    let mut goals = Vec::new();
    if let (Some(q), Some(a)) = (col("qemu-1of1", 1), col("acc-1of1", 1)) {
        goals.push(goal_line("boot-vs-qemu", q / a, Target::AtLeast(2.0)));
    }
    if let (Some(many), Some(one)) = (col("acc-1of128", 1), col("acc-1of1", 1)) {
        goals.push(goal_line(
            "boot-1of128-vs-1of1",
            many / one,
            Target::AtMost(1.1),
        ));
    }
    if let (Some(r), Some(c)) = (lat_median("resize-1to4"), cold) {
        goals.push(goal_line(
            "resize-1to4-vs-cold-boot",
            r / c,
            Target::AtMost(0.08),
        ));
    }
    if let (Some(j), Some(a)) = (lat_median("agent-up-jail-setup"), col("agent-up", 1)) {
        goals.push(goal_line(
            "jail-setup-vs-agent-up",
            j / a,
            Target::AtMost(0.05),
        ));
    }
    println!(
        "RSS outside memfd: the started process at the marker. For `boot` that is the VMM without \
         its guest RAM (a memfd); QEMU's guest RAM is anonymous memory and is included; for \
         `accordion run` it is the CLI client, not the VMM."
    );
    for g in &goals {
        println!("{g}");
    }
    let total: usize = failed.values().sum();
    if total > 0 {
        let list: Vec<String> = failed.iter().map(|(l, n)| format!("{l} {n}")).collect();
        // A label whose every sample failed has no median line above: say so here.
        return Err(format!("{total} samples failed ({})", list.join(", ")));
    }
    Ok(())
}

/// `pod --runs N --concurrent M --out FILE` / `resize --runs N --out FILE`.
fn cri_bench(args: &[String], pod: bool) -> Result<(), String> {
    let o = Options::parse(args, &["--runs", "--concurrent", "--out"])?;
    let (runs, concurrent) = (o.number("--runs", 5)?, o.number("--concurrent", 10)?);
    let out = o.text("--out", "/root/bench.txt");
    if pod {
        accordion_tests::bench_cri::pod(runs, concurrent, &out)
    } else {
        accordion_tests::bench_cri::resize(runs, &out)
    }
}

/// `net --runs N --out FILE`.
fn net_bench(args: &[String]) -> Result<(), String> {
    let o = Options::parse(args, &["--runs", "--out"])?;
    accordion_tests::bench_net::net(o.number("--runs", 5)?, &o.text("--out", "/root/bench.txt"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("latency") => latency(&args[1..]),
        Some("vcpus") => vcpus(&args[1..]),
        Some("memory") => memory(&args[1..]),
        Some("rss") => rss(&args[1..]),
        Some("pod") => cri_bench(&args[1..], true),
        Some("resize") => cri_bench(&args[1..], false),
        Some("net") => net_bench(&args[1..]),
        Some("report") => args
            .get(1)
            .ok_or("usage: accordion-bench report FILE".to_string())
            .and_then(|p| report(p)),
        _ => Err(
            "usage: accordion-bench run … | latency … | vcpus … | memory … | rss … | pod … | resize … | net … | report FILE"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("accordion-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        fail, guest_online, memory_figures, number_after, report, resize_latency, Options,
    };

    #[test]
    fn test_options_stop_at_the_command_and_refuse_what_they_do_not_know() {
        let args = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
        let o = Options::parse(
            &args("--label acc --runs 3 -- accordion run --runs 9 -- true"),
            &["--label", "--runs"],
        )
        .unwrap();
        assert_eq!(o.text("--label", ""), "acc");
        assert_eq!(o.number::<usize>("--runs", 5), Ok(3));
        assert_eq!(o.number::<usize>("--out", 5), Ok(5));
        assert_eq!(o.command, args("accordion run --runs 9 -- true"));
        let e = |a: &str| Options::parse(&args(a), &["--runs"]).err();
        assert_eq!(e("--marker x"), Some("unknown option --marker".into()));
        assert_eq!(e("--runs"), Some("--runs needs a value".into()));
        let bad = Options::parse(&args("--runs many"), &["--runs"]).unwrap();
        assert_eq!(bad.number::<usize>("--runs", 5), Err("bad --runs".into()));
    }

    #[test]
    fn test_a_resize_sample_needs_a_latency_and_the_guest_count_comes_from_status() {
        assert_eq!(
            resize_latency("hp: 4 vCPUs online (CPUs 0-3) in 212.4 ms\n"),
            Some(212.4)
        );
        assert_eq!(
            resize_latency("hp: already 4 vCPUs online (CPUs 0-3)\n"),
            None
        );
        let status = "state: running\npid: 412\n\
                      vcpus: 3 online in the guest, 4 plugged, 4 running, 8 possible\n\
                      guest cpus online: 0-2\n";
        assert_eq!(guest_online(status), Some(3));
        assert_eq!(guest_online("state: dead\n"), None);
    }

    #[test]
    fn test_memory_figures_come_from_what_accordion_status_prints() {
        let memory = "256 MiB configured, 1220 MiB in the guest, 1100 MiB available";
        let plugged = "768 MiB plugged of 768 MiB asked, up to 2048 MiB";
        assert_eq!(memory_figures(memory, plugged), Some((256, 768, 768)));
        assert_eq!(memory_figures(memory, "768 MiB plugged"), None);
        assert_eq!(memory_figures("lots", plugged), None);
    }

    #[test]
    fn test_failed_samples_are_counted_and_fail_the_report() {
        let path = std::env::temp_dir().join(format!("bench-report-{}", std::process::id()));
        let mut text = Vec::new();
        // A reason of six words must not pass for a boot sample's six fields.
        fail(&mut text, "acc-1of1", "marker never appeared\nstderr: boom").unwrap();
        fail(&mut text, "resize-1to4", "the guest shows 3 online").unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.starts_with("FAIL acc-1of1 marker never appeared stderr: boom\n"));
        let good = "acc-1of1 812.0 640.5 3100 20480 23580\nLAT resize-1to4 210.30\n";
        std::fs::write(&path, format!("{good}{text}")).unwrap();
        let e = report(path.to_str().unwrap()).unwrap_err();
        assert_eq!(e, "2 samples failed (acc-1of1 1, resize-1to4 1)");
        std::fs::write(&path, good).unwrap();
        assert_eq!(report(path.to_str().unwrap()), Ok(()));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn test_timings_are_read_from_what_accordion_run_prints() {
        let jailed = "accordion run: VM started 412.3 ms (jail 17.9 ms), agent ready 2803.1 ms, \
                      command 40.2 ms, stop 310.0 ms (Shutdown)\n";
        assert_eq!(
            number_after(jailed, "accordion run: VM started "),
            Some(412.3)
        );
        assert_eq!(number_after(jailed, " ms (jail "), Some(17.9));
        let unjailed = "accordion run: VM started 398.0 ms, agent ready 2650.0 ms, command 1.0 ms";
        assert_eq!(
            number_after(unjailed, "accordion run: VM started "),
            Some(398.0)
        );
        assert_eq!(number_after(unjailed, " ms (jail "), None);
        assert_eq!(number_after("boot timer n/a", "boot timer "), None);
    }
}
