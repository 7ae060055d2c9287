//! Pod-to-pod networking (`cargo xtask bench net`), run in the node by `accordion-bench net`: two
//! accordion pods on the CNI bridge, then two runc pods on the same bridge, in one node run. Round
//! trip: `ping` (busybox) average over 20 echoes. Throughput: 4 MiB through `nc` (busybox) into a
//! server that discards it, timed inside the client (its /proc/uptime), so exec overheads are
//! out of the figure.

use std::time::Duration;

use crate::bench_cri::{cri, quantile, record, remove_pod, run_pod, write_pod, Pod};

const PORT: u16 = 7100;
/// 4 MiB per throughput sample (/proc/uptime ticks are 10 ms: runc's samples are coarse).
const BLOCKS: u32 = 64;
const BLOCK: u32 = 64 * 1024;

fn start(name: &str, runtime: &str, script: &str) -> Result<Pod, String> {
    let configs = write_pod(&format!("/tmp/bench-net/{name}"), name, script, 100_000)?;
    run_pod(runtime, &configs)
}

fn ip(pod: &Pod) -> Result<String, String> {
    let v: serde_json::Value =
        serde_json::from_str(&cri(&["inspectp", &pod.id])?).map_err(|e| e.to_string())?;
    v["status"]["network"]["ip"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| format!("pod {}: no IP", pod.id))
}

fn exec(pod: &Pod, script: &str) -> Result<String, String> {
    cri(&["exec", &pod.container, "--", "sh", "-c", script])
}

/// One sample of each: (average RTT in ms, MiB/s).
fn sample(client: &Pod, server_ip: &str) -> Result<(f64, f64), String> {
    let ping = exec(client, &format!("ping -q -c 20 -i 0.2 {server_ip}"))?;
    // "round-trip min/avg/max = 0.123/0.456/0.789 ms"
    let rtt = ping
        .lines()
        .find_map(|l| l.split(" = ").nth(1))
        .and_then(|v| v.split('/').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("no round-trip line in {ping:?}"))?;
    // The server reads exactly the payload, answers `done` and closes: the time is until every
    // byte arrived, and a refused or cut connection shows as a missing `done`.
    let timed = exec(
        client,
        &format!(
            "t0=$(cut -d' ' -f1 /proc/uptime); \
             r=$(dd if=/dev/zero bs={BLOCK} count={BLOCKS} 2>/dev/null | nc -w 30 {server_ip} {PORT}); \
             t1=$(cut -d' ' -f1 /proc/uptime); echo \"$t0 $t1 $r\""
        ),
    )?;
    let words: Vec<&str> = timed.split_whitespace().collect();
    if words.get(2) != Some(&"done") {
        return Err(format!(
            "the server did not receive the whole payload: {timed:?}"
        ));
    }
    let mut t = words.iter().filter_map(|v| v.parse::<f64>().ok());
    let (t0, t1) = (t.next(), t.next());
    let secs = match (t0, t1) {
        (Some(a), Some(b)) if b > a => b - a,
        _ => return Err(format!("no timing in {timed:?}")),
    };
    let mib = f64::from(BLOCKS) * f64::from(BLOCK) / (1024.0 * 1024.0);
    Ok((rtt, mib / secs))
}

/// `accordion-bench net --runs N --out FILE`.
pub fn net(runs: usize, out_path: &str) -> Result<(), String> {
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out_path)
        .map_err(|e| format!("{out_path}: {e}"))?;
    // One `/recv` per connection (nc -ll -e): it takes the payload, then says `done`.
    let server = format!(
        "printf '#!/bin/sh\\nhead -c {} > /dev/null\\necho done\\n' > /recv && chmod +x /recv && \
         exec nc -ll -p {PORT} -e /recv",
        u64::from(BLOCKS) * u64::from(BLOCK)
    );
    let mut results = Vec::new();
    for runtime in ["accordion", "runc"] {
        let s = start(&format!("{runtime}-server"), runtime, &server)?;
        let c = start(&format!("{runtime}-client"), runtime, "exec sleep 3600")?;
        let server_ip = ip(&s)?;
        // Warm-up (ARP, the server's listener coming up), until a sample succeeds.
        let mut warm = Err(String::new());
        for _ in 0..10 {
            warm = sample(&c, &server_ip);
            if warm.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        warm?;
        let (mut rtts, mut rates, mut failed) = (Vec::new(), Vec::new(), 0);
        for _ in 0..runs {
            match sample(&c, &server_ip) {
                Ok((rtt, rate)) => {
                    record(&mut out, &format!("net-rtt-{runtime}"), rtt)?;
                    record(&mut out, &format!("net-mibs-{runtime}"), rate)?;
                    rtts.push(rtt);
                    rates.push(rate);
                }
                Err(e) => {
                    crate::record_failure(&mut out, &format!("net-{runtime}"), &e)?;
                    failed += 1;
                }
            }
        }
        remove_pod(&c)?;
        remove_pod(&s)?;
        results.push((runtime, quantile(rtts, 0.5), quantile(rates, 0.5), failed));
    }
    println!("bench net: pod to pod on the CNI bridge (busybox ping and nc), medians over {runs}");
    for (runtime, rtt, rate, failed) in &results {
        println!(
            "  {runtime:<9} round trip {rtt:.3} ms, TCP {rate:.1} MiB/s, {failed} samples failed"
        );
    }
    if let [(_, acc_rtt, acc_rate, _), (_, runc_rtt, runc_rate, _)] = results[..] {
        println!(
            "  accordion / runc: round trip {:.2}x, throughput {:.2}x",
            acc_rtt / runc_rtt,
            acc_rate / runc_rate
        );
        println!(
            "{}\n{}",
            crate::goal_line(
                "net-throughput-vs-runc",
                acc_rate / runc_rate,
                crate::Target::AtLeast(0.8)
            ),
            crate::goal_line(
                "net-rtt-vs-runc",
                acc_rtt / runc_rtt,
                crate::Target::AtMost(3.0)
            )
        );
    }
    crate::bench_cri::failures(results.iter().map(|r| r.3).sum())
}
