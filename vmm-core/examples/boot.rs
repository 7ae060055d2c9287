//! Boots a guest and exits with its status: the `@@EXIT-CODE=<rc>` the guest init prints, or,
//! without one, a code for why the VM stopped (0 power-off, 120 reset/panic, 121 crash,
//! 122 vCPU, device or VMM process failure, 123 host shutdown, 124 timeout).
//!
//! boot --kernel IMAGE [--initrd CPIO] [--vcpus N] [--max-vcpus M] [--memory MIB]
//!      [--cmdline ARGS] [--timeout SECS] [--vsock CID:SOCKET_PATH]
//!
//! Console on stdout; a summary (exit reason, boot time, vCPU states) on stderr.
//! `ACCORDION_LOG=debug|info|warn` sets the log level (default warn).

use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use accordion_vmm::{ExitReason, VcpuState, Vm, VmConfig};

const MARKER: &str = "@@EXIT-CODE=";

/// Console sink: forwards to stdout and watches for the exit-code marker.
struct Console {
    line: Vec<u8>,
    code: Arc<Mutex<Option<u8>>>,
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().write_all(buf)?;
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line);
                if let Some(rc) = line
                    .trim_end()
                    .rsplit_once(MARKER)
                    .and_then(|(_, rc)| rc.trim().parse::<u8>().ok())
                {
                    *self.code.lock().unwrap_or_else(|e| e.into_inner()) = Some(rc);
                }
                self.line.clear();
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

struct StderrLog;

static LOGGER: StderrLog = StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("[{} {}] {}", r.level(), r.target(), r.args());
        }
    }
    fn flush(&self) {}
}

struct Args {
    config: VmConfig,
    timeout: Option<Duration>,
}

fn parse() -> Result<Args, String> {
    let mut config = VmConfig::new("");
    let mut timeout = None;
    let mut kernel = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        match flag.as_str() {
            "--kernel" => kernel = Some(value()?),
            "--initrd" => config.initrd = Some(value()?.into()),
            "--vcpus" => config.boot_vcpus = number(value()?)? as u32,
            "--max-vcpus" => config.max_vcpus = number(value()?)? as u32,
            "--memory" => config.memory_mib = number(value()?)?,
            "--cmdline" => config.cmdline = value()?,
            "--timeout" => timeout = Some(Duration::from_secs(number(value()?)?)),
            "--vsock" => {
                let v = value()?;
                let (cid, path) = v
                    .split_once(':')
                    .ok_or(format!("--vsock: expected CID:PATH, got {v}"))?;
                let cid = cid.parse().map_err(|_| format!("--vsock: bad CID {cid}"))?;
                config.vsock = Some(accordion_vmm::VsockConfig {
                    cid,
                    uds_path: path.into(),
                    listener: None,
                });
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    config.kernel = kernel.ok_or("--kernel is required")?.into();
    Ok(Args { config, timeout })
}

fn summary(states: &[VcpuState]) -> String {
    let count = |s| states.iter().filter(|&&x| x == s).count();
    format!(
        "{} online, {} plugged, {} unplugged of {} possible",
        count(VcpuState::Online),
        count(VcpuState::Plugged),
        count(VcpuState::Unplugged),
        states.len()
    )
}

fn main() -> ExitCode {
    let level = match std::env::var("ACCORDION_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        _ => log::LevelFilter::Warn,
    };
    let _ = log::set_logger(&LOGGER).map(|()| log::set_max_level(level));

    let mut args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\nusage: boot --kernel IMAGE [--initrd CPIO] [--vcpus N] [--max-vcpus M] [--memory MIB] [--cmdline ARGS] [--timeout SECS] [--vsock CID:PATH]");
            return ExitCode::from(2);
        }
    };
    let code = Arc::new(Mutex::new(None));
    args.config.console = Box::new(Console {
        line: Vec::new(),
        code: code.clone(),
    });

    let started = Instant::now();
    let vm = match Vm::start(args.config) {
        Ok(vm) => vm,
        Err(e) => {
            let mut msg = format!("boot: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            return ExitCode::from(1);
        }
    };
    let reason = match args.timeout {
        Some(t) => vm.wait_timeout(t),
        None => Some(vm.wait()),
    };
    let states = vm.vcpu_states();
    let boot_ms = vm
        .boot_time()
        .map_or("none".to_string(), |t| format!("{} ms", t.as_millis()));
    let _ = std::io::stdout().flush();
    eprintln!(
        "boot: exit {reason:?} after {} ms; boot timer {boot_ms}; vCPUs {}",
        started.elapsed().as_millis(),
        summary(&states)
    );
    let marker = *code.lock().unwrap_or_else(|e| e.into_inner());
    let status = match (marker, reason) {
        (Some(rc), _) => rc,
        (None, Some(ExitReason::PowerOff)) => 0,
        (None, Some(ExitReason::Reset)) => 120,
        (None, Some(ExitReason::Crash)) => 121,
        (
            None,
            Some(
                ExitReason::VcpuFailed { .. }
                | ExitReason::DevicesFailed { .. }
                | ExitReason::ProcessEnded { .. },
            ),
        ) => 122,
        (None, Some(ExitReason::Shutdown)) => 123,
        (None, None) => {
            vm.shutdown();
            124
        }
    };
    ExitCode::from(status)
}
