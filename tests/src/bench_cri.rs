//! Pod benchmarks through containerd's CRI plugin (`cargo xtask bench pod|resize`), run in the node
//! by `accordion-bench pod|resize`: each step is an `accordion-cri` call, as kubelet would make it.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::containerd::{process_pids, TEST_IMAGE};
use crate::{goal_line, record_failure, Target};

pub(crate) fn cri(args: &[&str]) -> Result<String, String> {
    let out = Command::new("accordion-cri")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("accordion-cri: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "accordion-cri {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(crate) fn write(path: &str, json: &serde_json::Value) -> Result<(), String> {
    std::fs::write(path, json.to_string()).map_err(|e| format!("{path}: {e}"))
}

/// A running pod of the benchmark.
pub struct Pod {
    pub id: String,
    pub container: String,
}

/// The CRI configs of pod `name` whose one container runs `sh -c script` with a CPU quota, written
/// in `dir` (where its logs go too): (pod config, container config).
pub(crate) fn write_pod(
    dir: &str,
    name: &str,
    script: &str,
    quota: i64,
) -> Result<(String, String), String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{dir}: {e}"))?;
    let pod_cfg = format!("{dir}/pod.json");
    let ctr_cfg = format!("{dir}/container.json");
    write(
        &pod_cfg,
        &serde_json::json!({
            "metadata": {"name": name, "namespace": "bench", "uid": format!("uid-{name}"), "attempt": 1},
            "log_directory": dir,
        }),
    )?;
    write(
        &ctr_cfg,
        &serde_json::json!({
            "metadata": {"name": "main"},
            "image": {"image": TEST_IMAGE},
            "command": ["sh", "-c", script],
            "log_path": "main.log",
            "linux": {"resources": {"cpu_quota": quota, "cpu_period": 100000}},
        }),
    )?;
    Ok((pod_cfg, ctr_cfg))
}

/// RunPodSandbox + CreateContainer + StartContainer of a pod written by [`write_pod`].
pub(crate) fn run_pod(runtime: &str, (pod_cfg, ctr_cfg): &(String, String)) -> Result<Pod, String> {
    let id = cri(&["runp", "--runtime", runtime, pod_cfg])?;
    let container = cri(&["create", &id, ctr_cfg, pod_cfg])?;
    cri(&["start", &container])?;
    Ok(Pod { id, container })
}

/// RunPodSandbox + CreateContainer + StartContainer until the container's first output (its log
/// file gets the line `first`): returns the pod and the time that took.
pub fn start_pod(name: &str, runtime: &str, quota: i64) -> Result<(Pod, Duration), String> {
    let dir = format!("/tmp/bench-pods/{name}");
    let log = format!("{dir}/main.log");
    let configs = write_pod(&dir, name, "echo first; exec sleep 3600", quota)?;
    let t0 = Instant::now();
    let pod = run_pod(runtime, &configs)?;
    let deadline = t0 + Duration::from_secs(300);
    loop {
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("first")) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("pod {name}: no output in {log} after 300 s"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok((pod, t0.elapsed()))
}

pub fn remove_pod(pod: &Pod) -> Result<(), String> {
    cri(&["stopp", &pod.id])?;
    cri(&["rmp", &pod.id])?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Host memory of the pod's processes: the shim's and its VMM's RSS outside guest RAM (memfd)
/// plus virtiofsd's. Each of the three must be running and readable: a process that is gone
/// would count as 0 KiB and flatter the figure.
fn host_rss_kb() -> Result<u64, String> {
    let mut total = 0;
    for (what, pids) in [
        ("shim", process_pids("containerd-shim-accordion-v2")),
        ("vmm", crate::vmm_pids()),
        ("virtiofsd", process_pids("virtiofsd")),
    ] {
        if pids.is_empty() {
            return Err(format!("host RSS: no {what} process is running"));
        }
        for pid in pids {
            match crate::smaps_kb(pid) {
                Some((kb, _)) if kb > 0 => total += kb,
                _ => return Err(format!("host RSS: {what} {pid} ended before its sample")),
            }
        }
    }
    Ok(total)
}

pub(crate) fn record(out: &mut impl Write, label: &str, value: f64) -> Result<(), String> {
    writeln!(out, "LAT {label} {value:.2}").map_err(|e| e.to_string())
}

/// `accordion-bench pod --runs N --concurrent M --out FILE`.
pub fn pod(runs: usize, concurrent: usize, out_path: &str) -> Result<(), String> {
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out_path)
        .map_err(|e| format!("{out_path}: {e}"))?;
    // Warm-up (page cache, image unpack), not measured.
    for runtime in ["accordion", "runc"] {
        let (p, _) = start_pod(&format!("warm-{runtime}"), runtime, 100_000)?;
        remove_pod(&p)?;
    }
    let mut single = Vec::new();
    let mut runc = Vec::new();
    let mut rss = Vec::new();
    // Failed samples per figure: recorded, counted, never dropped.
    let (mut acc_failed, mut runc_failed, mut rss_failed) = (0, 0, 0);
    for i in 0..runs {
        // Alternate, so drift in the node affects both alike.
        match start_pod(&format!("acc-{i}"), "accordion", 100_000) {
            Ok((p, t)) => {
                record(&mut out, "pod-start-accordion", ms(t))?;
                single.push(ms(t));
                match host_rss_kb() {
                    Ok(kb) => rss.push(kb as f64),
                    Err(e) => {
                        record_failure(&mut out, "host-rss", &e)?;
                        rss_failed += 1;
                    }
                }
                remove_pod(&p)?;
            }
            Err(e) => {
                record_failure(&mut out, "pod-start-accordion", &e)?;
                acc_failed += 1;
            }
        }
        pod_start_sample(
            &mut out,
            (&format!("runc-{i}"), "runc", "pod-start-runc"),
            &mut runc,
            &mut runc_failed,
        )?;
    }
    let (acc, rc) = (quantile(single.clone(), 0.5), quantile(runc.clone(), 0.5));
    println!("bench pod: RunPodSandbox + CreateContainer + StartContainer → first output (accordion-cri)");
    println!(
        "  accordion: median {acc:.0} ms over {}, {acc_failed} failed (p99 {:.0} ms)",
        single.len(),
        quantile(single, 0.99)
    );
    println!(
        "  runc:      median {rc:.0} ms over {}, {runc_failed} failed (p99 {:.0} ms)",
        runc.len(),
        quantile(runc, 0.99)
    );
    println!("  accordion / runc = {:.2}x", acc / rc);
    let rss = quantile(rss, 0.5);
    println!(
        "  host RSS per sandbox (shim + VMM + virtiofsd, guest RAM excluded): median {rss:.0} KiB, {rss_failed} failed"
    );
    let goals = [
        goal_line("pod-start-vs-runc", acc / rc, Target::AtMost(2.0)),
        goal_line(
            "host-rss-per-sandbox-mib",
            rss / 1024.0,
            Target::AtMost(20.0),
        ),
    ];
    let single_failed = acc_failed + runc_failed + rss_failed;
    if concurrent == 0 {
        println!("{}", goals.join("\n"));
        return failures(single_failed);
    }
    let threads: Vec<_> = (0..concurrent)
        .map(|i| std::thread::spawn(move || start_pod(&format!("conc-{i}"), "accordion", 100_000)))
        .collect();
    let mut conc = Vec::new();
    let mut pods = Vec::new();
    let mut failed = Vec::new();
    for t in threads {
        match t.join().map_err(|_| "a pod thread panicked".to_string())? {
            Ok((p, d)) => {
                record(&mut out, "pod-start-concurrent", ms(d))?;
                conc.push(ms(d));
                pods.push(p);
            }
            Err(e) => failed.push(e),
        }
    }
    let rss_all = host_rss_kb()?;
    for p in &pods {
        remove_pod(p)?;
    }
    let (p50, p99) = (quantile(conc.clone(), 0.5), quantile(conc, 0.99));
    println!(
        "  {concurrent} accordion pods at once: {} started; p50 {p50:.0} ms ({:.2}x single), p99 {p99:.0} ms ({:.2}x single); host RSS {:.0} KiB per pod",
        pods.len(),
        p50 / acc,
        p99 / acc,
        rss_all as f64 / pods.len().max(1) as f64
    );
    for e in &failed {
        println!("  failed: {e}");
    }
    println!("{}", goals.join("\n"));
    if !failed.is_empty() {
        return Err(format!(
            "{} of {concurrent} concurrent pods failed",
            failed.len()
        ));
    }
    failures(single_failed)
}

/// One timed start of pod `name` under `runtime` (then removed): recorded as `label` and kept in
/// `samples`, or recorded as failed and counted in `failed`.
fn pod_start_sample(
    out: &mut impl Write,
    (name, runtime, label): (&str, &str, &str),
    samples: &mut Vec<f64>,
    failed: &mut usize,
) -> Result<(), String> {
    match start_pod(name, runtime, 100_000) {
        Ok((p, t)) => {
            record(out, label, ms(t))?;
            samples.push(ms(t));
            remove_pod(&p)
        }
        Err(e) => {
            *failed += 1;
            record_failure(out, label, &e)
        }
    }
}

/// A benchmark with failed samples fails, after printing its figures.
pub(crate) fn failures(failed: usize) -> Result<(), String> {
    match failed {
        0 => Ok(()),
        n => Err(format!("{n} samples failed")),
    }
}

/// `accordion-bench resize --runs N --out FILE`: UpdateContainerResources 1→4 and 4→1 CPUs until
/// the call returns (the shim answers once the guest acknowledged), against a cold pod start.
pub fn resize(runs: usize, out_path: &str) -> Result<(), String> {
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out_path)
        .map_err(|e| format!("{out_path}: {e}"))?;
    let mut cold = Vec::new();
    let mut failed = 0;
    for i in 0..5 {
        pod_start_sample(
            &mut out,
            (&format!("cold-{i}"), "accordion", "cold-pod-start"),
            &mut cold,
            &mut failed,
        )?;
    }
    let (p, _) = start_pod("resize", "accordion", 100_000)?;
    let mut up = Vec::new();
    let mut down = Vec::new();
    // Untimed, after each sample: the guest must show the CPUs the update asked for.
    let check = |target: u32| -> Result<(), String> {
        let out = Command::new("accordion")
            .args(["status", &p.id])
            .output()
            .map_err(|e| format!("cannot run accordion status: {e}"))?;
        match crate::guest_online(&String::from_utf8_lossy(&out.stdout)) {
            Some(n) if n == target => Ok(()),
            n => Err(format!(
                "UpdateContainerResources to {target} CPUs returned, but the guest shows {n:?} online"
            )),
        }
    };
    let update = |quota: &str| -> Result<f64, String> {
        let t0 = Instant::now();
        cri(&[
            "update",
            "--cpu-quota",
            quota,
            "--cpu-period",
            "100000",
            &p.container,
        ])?;
        Ok(ms(t0.elapsed()))
    };
    for _ in 0..runs {
        for (quota, cpus, label, samples) in [
            ("400000", 4, "update-1to4", &mut up),
            ("100000", 1, "update-4to1", &mut down),
        ] {
            match update(quota).and_then(|t| check(cpus).map(|()| t)) {
                Ok(t) => {
                    record(&mut out, label, t)?;
                    samples.push(t);
                }
                Err(e) => {
                    record_failure(&mut out, label, &e)?;
                    failed += 1;
                }
            }
        }
    }
    remove_pod(&p)?;
    let c = quantile(cold.clone(), 0.5);
    println!("bench resize: UpdateContainerResources until it returns (guest acknowledged; each sample then checked with accordion status), accordion-cri");
    println!(
        "  cold pod start (RunPodSandbox → first output): median {c:.0} ms over {}",
        cold.len()
    );
    for (label, v) in [("1→4 CPUs", up), ("4→1 CPUs", down)] {
        let (m, p99) = (quantile(v.clone(), 0.5), quantile(v.clone(), 0.99));
        println!(
            "  {label}: median {m:.0} ms, p99 {p99:.0} ms over {} of {runs} = {:.1}% of a cold pod start",
            v.len(),
            100.0 * m / c
        );
    }
    println!("  failed samples: {failed}");
    failures(failed)
}
