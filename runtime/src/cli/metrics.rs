//! `accordion metrics`: every sandbox on this host as Prometheus text (exposition format 0.0.4),
//! from the same Status `accordion status` shows, plus what only the host sees (the resident
//! memory of each sandbox's processes). With `--listen`, served at `/metrics` instead.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use accordion_proto::control::v1 as cpb;
use clap::Args;

use crate::control::client::ControlClient;
use crate::resize::stats::BUCKETS_SECONDS;
use crate::sandbox;

/// Per-sandbox limit, so one hung sandbox does not hang the scrape.
const PER_SANDBOX: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct MetricsArgs {
    /// Serve the metrics at http://ADDR/metrics (e.g. 0.0.0.0:9464) instead of printing them once.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Where the host's /proc is (the Helm chart's metrics container sees it at /host/proc).
    #[arg(long, value_name = "DIR", default_value = "/proc")]
    pub proc: PathBuf,
}

/// What one sandbox contributes: its Status (None when its socket did not answer) and the
/// resident memory of its host processes.
#[derive(Debug, Default)]
pub struct Sample {
    pub name: String,
    pub status: Option<cpb::StatusResponse>,
    /// (process, RSS split) for the shim, the VMM and the sandbox's virtiofsd processes.
    pub rss: Vec<(&'static str, Rss)>,
}

/// A process's resident memory as /proc/<pid>/status splits it, bytes. Guest RAM is shared memory
/// (a memfd) and shows as `shmem` in the VMM.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rss {
    pub anon: u64,
    pub file: u64,
    pub shmem: u64,
}

impl std::ops::AddAssign for Rss {
    fn add_assign(&mut self, o: Rss) {
        self.anon += o.anon;
        self.file += o.file;
        self.shmem += o.shmem;
    }
}

pub async fn run(args: MetricsArgs) -> i32 {
    match args.listen {
        None => match scrape(&args.proc).await {
            Ok(samples) => {
                print!("{}", render(&samples));
                0
            }
            Err(e) => {
                eprintln!("accordion metrics: {}", unreadable(&e));
                1
            }
        },
        Some(addr) => match serve(addr, Arc::from(args.proc.as_path())).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("accordion metrics: cannot serve on {addr}: {e}");
                1
            }
        },
    }
}

/// Every sandbox under the run root, asked in turn; host processes read under `proc`.
pub async fn scrape(proc: &Path) -> std::io::Result<Vec<Sample>> {
    let names = sandbox::names()?;
    let table = process_table(proc);
    let mut samples = Vec::with_capacity(names.len());
    for name in names {
        let status = ControlClient::status_within(&name, PER_SANDBOX).await;
        let mut rss = Vec::new();
        if let Some(s) = &status {
            rss.push(("shim", rss_of(proc, s.pid).unwrap_or_default()));
            if let Some(vmm) = s.confinement.as_ref().map(|c| c.pid).filter(|p| *p != 0) {
                rss.push(("vmm", rss_of(proc, vmm).unwrap_or_default()));
            }
            let mut virtiofsd = Rss::default();
            for pid in descendants_named(&table, s.pid, "virtiofsd") {
                virtiofsd += rss_of(proc, pid).unwrap_or_default();
            }
            rss.push(("virtiofsd", virtiofsd));
        }
        samples.push(Sample { name, status, rss });
    }
    Ok(samples)
}

/// The error of a run root that cannot be listed, naming it.
fn unreadable(e: &std::io::Error) -> String {
    format!("cannot read {}: {e}", sandbox::run_root().display())
}

/// pid → (comm, ppid) of every process, from `proc`/<pid>/stat.
fn process_table(proc: &Path) -> HashMap<u32, (String, u32)> {
    let mut table = HashMap::new();
    let Ok(entries) = std::fs::read_dir(proc) else {
        return table;
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(parsed) = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|stat| parse_stat(&stat))
        {
            table.insert(pid, parsed);
        }
    }
    table
}

/// (comm, ppid) from a /proc/<pid>/stat line; comm may hold spaces and parentheses.
fn parse_stat(stat: &str) -> Option<(String, u32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, ppid))
}

/// Processes called `comm` that descend from `ancestor`.
fn descendants_named(table: &HashMap<u32, (String, u32)>, ancestor: u32, comm: &str) -> Vec<u32> {
    let mut found: Vec<u32> = table
        .iter()
        .filter(|(_, (c, _))| c == comm)
        .filter(|(pid, _)| {
            let mut at = **pid;
            // A process table has no cycles, but a racy read could; bound the walk.
            for _ in 0..64 {
                match table.get(&at) {
                    Some((_, ppid)) if *ppid == ancestor => return true,
                    Some((_, ppid)) if *ppid > 1 => at = *ppid,
                    _ => return false,
                }
            }
            false
        })
        .map(|(pid, _)| *pid)
        .collect();
    found.sort_unstable();
    found
}

fn rss_of(proc: &Path, pid: u32) -> Option<Rss> {
    let status = std::fs::read_to_string(proc.join(pid.to_string()).join("status")).ok()?;
    Some(parse_rss(&status))
}

/// RssAnon, RssFile and RssShmem of a /proc/<pid>/status, bytes.
fn parse_rss(status: &str) -> Rss {
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    Rss {
        anon: kib("RssAnon:"),
        file: kib("RssFile:"),
        shmem: kib("RssShmem:"),
    }
}

/// A label value, escaped as the exposition format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes one metric family: its HELP and TYPE once, then one line per sample.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn line(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
            .collect();
        let _ = writeln!(self.out, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// The Status of a sandbox that answered.
fn up(s: &Sample) -> Option<&cpb::StatusResponse> {
    s.status.as_ref()
}

fn seconds_from_ms(ms: u64) -> f64 {
    ms as f64 / 1e3
}

fn seconds_from_us(us: u64) -> f64 {
    us as f64 / 1e6
}

/// The exposition text for `samples`. Families are written whole, one after another, as the
/// format requires; a sandbox that did not answer has only `accordion_sandbox_up 0`.
pub fn render(samples: &[Sample]) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };

    f.header(
        "accordion_sandbox_up",
        "gauge",
        "Whether the sandbox's control socket answered (1) or not (0).",
    );
    for s in samples {
        f.line(
            "accordion_sandbox_up",
            &[("sandbox", &s.name)],
            u8::from(s.status.is_some()),
        );
    }

    f.header(
        "accordion_sandbox_running",
        "gauge",
        "Whether the sandbox's VM runs (1) or has stopped (0).",
    );
    for s in samples {
        if let Some(st) = up(s) {
            f.line(
                "accordion_sandbox_running",
                &[("sandbox", &s.name)],
                u8::from(st.state == "running"),
            );
        }
    }

    f.header(
        "accordion_vcpus",
        "gauge",
        "vCPUs of the sandbox's VM: possible (the most it can have), plugged (in the VMM), \
         online (in the guest).",
    );
    for s in samples {
        if let Some(st) = up(s) {
            for (state, n) in [
                ("possible", st.max_vcpus),
                ("plugged", st.vcpus_plugged),
                ("online", st.guest_cpus_online_count),
            ] {
                f.line(
                    "accordion_vcpus",
                    &[("sandbox", &s.name), ("state", state)],
                    n,
                );
            }
        }
    }

    f.header(
        "accordion_memory_bytes",
        "gauge",
        "Guest memory: configured (at boot), max (a resize's limit), plugged (above the \
         configured size), guest_total and guest_available (the guest's MemTotal and \
         MemAvailable).",
    );
    for s in samples {
        if let Some(st) = up(s) {
            for (state, n) in [
                ("configured", st.memory_configured_bytes),
                ("max", st.memory_max_bytes),
                ("plugged", st.memory_plugged_bytes),
                ("guest_total", st.memory_total_bytes),
                ("guest_available", st.memory_available_bytes),
            ] {
                f.line(
                    "accordion_memory_bytes",
                    &[("sandbox", &s.name), ("state", state)],
                    n,
                );
            }
        }
    }

    f.header(
        "accordion_boot_phase_seconds",
        "gauge",
        "When each boot phase ended, seconds after the sandbox's start: vm_created, \
         kernel_started (the guest's init ran), agent_ready.",
    );
    for s in samples {
        if let Some(boot) = up(s).and_then(|st| st.boot.as_ref()) {
            for (phase, ms) in [
                ("vm_created", boot.vm_created_ms),
                ("kernel_started", boot.kernel_started_ms),
                ("agent_ready", boot.agent_ready_ms),
            ] {
                if ms > 0 {
                    f.line(
                        "accordion_boot_phase_seconds",
                        &[("sandbox", &s.name), ("phase", phase)],
                        seconds_from_ms(ms),
                    );
                }
            }
        }
    }

    f.header(
        "accordion_guest_uptime_seconds",
        "gauge",
        "The guest's uptime, as its agent reports it.",
    );
    for s in samples {
        if let Some(st) = up(s).filter(|st| st.uptime_ms > 0) {
            f.line(
                "accordion_guest_uptime_seconds",
                &[("sandbox", &s.name)],
                seconds_from_ms(st.uptime_ms),
            );
        }
    }

    f.header(
        "accordion_agent_rtt_seconds",
        "gauge",
        "How long the scrape's question to the guest agent took (absent when it failed).",
    );
    for s in samples {
        if let Some(st) = up(s).filter(|st| st.agent_rtt_us > 0) {
            f.line(
                "accordion_agent_rtt_seconds",
                &[("sandbox", &s.name)],
                seconds_from_us(st.agent_rtt_us),
            );
        }
    }

    let name = "accordion_resize_duration_seconds";
    f.header(
        name,
        "histogram",
        "Resizes since the sandbox started, request to the guest's acknowledgement (or the \
         error), by kind (vcpus, memory), direction (grow, shrink, none) and outcome (ok, error).",
    );
    for s in samples {
        let Some(st) = up(s) else { continue };
        for h in &st.resize_histograms {
            let base = [
                ("sandbox", s.name.as_str()),
                ("kind", h.kind.as_str()),
                ("direction", h.direction.as_str()),
                ("outcome", h.outcome.as_str()),
            ];
            for (bound, count) in BUCKETS_SECONDS.iter().zip(&h.bucket_counts) {
                let le = bound.to_string();
                let mut labels = base.to_vec();
                labels.push(("le", &le));
                f.line(&format!("{name}_bucket"), &labels, count);
            }
            let mut labels = base.to_vec();
            labels.push(("le", "+Inf"));
            f.line(&format!("{name}_bucket"), &labels, h.count);
            f.line(&format!("{name}_sum"), &base, seconds_from_us(h.sum_us));
            f.line(&format!("{name}_count"), &base, h.count);
        }
    }

    f.header(
        "accordion_process_resident_memory_bytes",
        "gauge",
        "Resident memory of the sandbox's host processes (shim, vmm, virtiofsd), split as the \
         kernel counts it: anon, file, shmem (the VMM's guest RAM is shmem).",
    );
    for s in samples {
        for (process, rss) in &s.rss {
            for (kind, n) in [("anon", rss.anon), ("file", rss.file), ("shmem", rss.shmem)] {
                f.line(
                    "accordion_process_resident_memory_bytes",
                    &[("sandbox", &s.name), ("process", process), ("kind", kind)],
                    n,
                );
            }
        }
    }
    out
}

/// Serves `GET /metrics` on `addr` until killed; every request scrapes afresh.
async fn serve(addr: SocketAddr, proc: Arc<Path>) -> std::io::Result<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::service::service_fn;
    use hyper::{Request, Response, StatusCode};

    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("accordion metrics: serving http://{addr}/metrics");
    loop {
        let (stream, _) = listener.accept().await?;
        let proc = Arc::clone(&proc);
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let proc = Arc::clone(&proc);
                async move {
                    if req.uri().path() != "/metrics" {
                        return Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"not found: try /metrics\n")));
                    }
                    match scrape(&proc).await {
                        Ok(samples) => Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(render(&samples)))),
                        Err(e) => Response::builder()
                            .status(StatusCode::INTERNAL_SERVER_ERROR)
                            .body(Full::new(Bytes::from(format!("{}\n", unreadable(&e))))),
                    }
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                log::debug!("metrics connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests;
