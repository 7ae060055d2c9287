//! The VMM process: `containerd-shim-accordion-v2 __accordion-vmm <sandbox>` (or `accordion …`),
//! cloned by the shim with its channel on fd 3. It takes its inputs from the first message, puts
//! itself in its jail (jail.rs), starts the VM and then serves the shim's requests until the VM
//! stops or the shim goes away.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;

use accordion_vmm::config::InputFile;
use accordion_vmm::{FsConfig, NetConfig, Vm, VmConfig, VsockConfig};

use super::channel::{
    bounded, Channel, Envelope, Message, Reply, Request, SetVcpusRefusal, StartSpec,
    CHANGE_COALESCE,
};
use super::jail;
use crate::sandbox::capped_log::CappedLog;

/// The fd the shim leaves the channel on.
pub const CHANNEL_FD: i32 = 3;
/// argv[1] of a VMM process.
pub const VMM_ARG: &str = "__accordion-vmm";

/// Runs the VMM if this process was started as one (never returns then); otherwise returns.
pub fn main_if_vmm() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(std::ffi::OsStr::new(VMM_ARG)) {
        return;
    }
    // `accordion-vmm` in ps and top, not the shim's name. SAFETY: PR_SET_NAME reads a
    // NUL-terminated string of at most 16 bytes, which this is.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"accordion-vmm".as_ptr(), 0, 0, 0) };
    // SAFETY: the shim put the channel on fd 3 for this process alone (jail.rs's clone).
    let channel = Arc::new(unsafe { Channel::from_raw_fd(CHANNEL_FD) });
    let code = match run(&channel) {
        Ok(()) => 0,
        Err(e) => {
            let _ = channel.send(
                &Message::Reply {
                    id: e.0,
                    reply: Reply::Failed(bounded(e.1)),
                },
                &[],
            );
            1
        }
    };
    std::process::exit(code);
}

/// A failure answering request `.0`, said as `.1`.
struct Failure(u64, String);

fn failed(id: u64) -> impl Fn(&dyn std::error::Error) -> Failure {
    move |e| Failure(id, accordion_vmm::error_chain(e))
}

fn run(channel: &Arc<Channel>) -> Result<(), Failure> {
    let (Envelope { id, request }, fds) = match channel.receive::<Envelope>() {
        Ok(Some(first)) => first,
        Ok(None) => return Ok(()),
        Err(e) => return Err(failed(0)(&e)),
    };
    let Request::Start(spec) = request else {
        return Err(Failure(id, "the first request must be Start".into()));
    };
    log::set_max_level(log_filter(spec.log_level));
    let _ = log::set_boxed_logger(Box::new(ChannelLogger(Arc::clone(channel))));
    let mut inputs = Inputs::new(fds, &spec).map_err(|m| Failure(id, m))?;
    let jail_start = std::time::Instant::now();
    let (id, jailed) = match &spec.jail {
        Some(j) => {
            jail::enter(Path::new(&j.root)).map_err(|e| failed(id)(&e))?;
            reply(channel, id, Reply::UserNamespaceReady);
            let (next, _) = expect(channel)?;
            if !matches!(next.request, Request::IdsMapped) {
                return Err(Failure(next.id, "expected IdsMapped".into()));
            }
            jail::confine(j.nofile, j.nproc, j.fsize).map_err(|e| failed(next.id)(&e))?;
            (next.id, Some(jail_start.elapsed()))
        }
        None => (id, None),
    };
    let config = inputs.config(&spec).map_err(|m| Failure(id, m))?;
    // Every thread from here on (the VM's) runs under the process filter, below its own.
    accordion_vmm::seccomp::confine_process().map_err(|e| failed(id)(&e))?;
    let vm = Arc::new(Vm::start(config).map_err(|e| failed(id)(&e))?);
    // This thread and the exit reporter it starts: the channel, resizes, shutdown.
    accordion_vmm::seccomp::confine(accordion_vmm::seccomp::ThreadKind::Control)
        .map_err(|e| failed(id)(&e))?;
    reply(channel, id, Reply::Started(jailed));

    // The VM's end is the process's end: say why, then exit (the shim reaps the rest).
    let waiter = {
        let (vm, channel) = (Arc::clone(&vm), Arc::clone(channel));
        std::thread::Builder::new()
            .name("vmm-exit".into())
            .spawn(move || {
                let reason = vm.wait();
                let _ = channel.send(&Message::Exit(reason), &[]);
                std::process::exit(0);
            })
            .map_err(|e| failed(id)(&e))?
    };
    forward_changes(channel, &vm).map_err(|e| failed(id)(&e))?;
    serve(channel, &vm);
    // The shim is gone or asked to stop: stop the VM; the waiter reports and exits.
    vm.shutdown();
    let _ = waiter.join();
    Ok(())
}

/// Tells the shim whenever a vCPU's state or the VM's memory changes (`Message::Changed`),
/// coalescing what happens within [`CHANGE_COALESCE`], so a guest that flaps its CPUs costs the
/// shim at most one message per period. The threads live as long as the process.
fn forward_changes(channel: &Arc<Channel>, vm: &Arc<Vm>) -> std::io::Result<()> {
    let changed = |channel: &Channel| {
        let _ = channel.send(&Message::Changed, &[]);
    };
    let events = vm.subscribe_vcpu_events();
    let vcpus = Arc::clone(channel);
    std::thread::Builder::new()
        .name("vmm-vcpu-events".into())
        .spawn(move || {
            while events.recv().is_ok() {
                let until = std::time::Instant::now() + CHANGE_COALESCE;
                while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
                    if let Err(RecvTimeoutError::Disconnected) = events.recv_timeout(left) {
                        return;
                    }
                }
                changed(&vcpus);
            }
        })?;
    let memory = vm.memory();
    if memory.max > memory.boot {
        let (vm, channel) = (Arc::clone(vm), Arc::clone(channel));
        std::thread::Builder::new()
            .name("vmm-mem-events".into())
            .spawn(move || {
                let mut seen = memory;
                loop {
                    let now = vm.wait_memory_change(&seen, std::time::Duration::from_secs(3600));
                    if now == seen {
                        continue;
                    }
                    // The rest of a burst of plugs within the period goes with it.
                    let until = std::time::Instant::now() + CHANGE_COALESCE;
                    seen = now;
                    while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
                        seen = vm.wait_memory_change(&seen, left);
                    }
                    changed(&channel);
                }
            })?;
    }
    Ok(())
}

/// Answers requests until the shim closes the channel or asks for a shutdown.
fn serve(channel: &Channel, vm: &Vm) {
    loop {
        let Envelope { id, request } = match channel.receive::<Envelope>() {
            Ok(Some((envelope, _))) => envelope,
            Ok(None) => return,
            Err(e) => {
                log::error!("vmm channel: {}", accordion_vmm::error_chain(&e));
                return;
            }
        };
        let answer = match request {
            Request::SetVcpus(target) => {
                Reply::SetVcpus(vm.set_vcpus(target).map_err(|e| match e {
                    accordion_vmm::CpuHotplugError::InvalidTarget { target, max } => {
                        SetVcpusRefusal::InvalidTarget { target, max }
                    }
                    other => SetVcpusRefusal::Failed(bounded(accordion_vmm::error_chain(&other))),
                }))
            }
            Request::VcpuStates => Reply::VcpuStates(vm.vcpu_states()),
            Request::SetMemory(bytes) => {
                Reply::SetMemory(vm.set_memory(bytes).map(|_| vm.memory()))
            }
            Request::Memory => Reply::Memory(vm.memory()),
            Request::BootTime => Reply::BootTime(vm.boot_time()),
            Request::Shutdown => return,
            Request::Start(_) | Request::IdsMapped => Reply::Failed("already started".into()),
        };
        reply(channel, id, answer);
    }
}

fn reply(channel: &Channel, id: u64, reply: Reply) {
    if let Err(e) = channel.send(&Message::Reply { id, reply }, &[]) {
        log::warn!("vmm channel: {}", accordion_vmm::error_chain(&e));
    }
}

fn expect(channel: &Channel) -> Result<(Envelope, Vec<OwnedFd>), Failure> {
    match channel.receive::<Envelope>() {
        Ok(Some(next)) => Ok(next),
        Ok(None) => Err(Failure(0, "the shim went away".into())),
        Err(e) => Err(failed(0)(&e)),
    }
}

/// The descriptors of `Start`, in the order the shim sends them (mod.rs's `StartFds::raw`).
struct Inputs {
    fds: std::vec::IntoIter<OwnedFd>,
}

impl Inputs {
    fn new(fds: Vec<OwnedFd>, spec: &StartSpec) -> Result<Self, String> {
        let want = 5 + usize::from(spec.initrd) + spec.fs_tags.len() + spec.net.len();
        if fds.len() != want {
            return Err(format!("expected {want} descriptors, got {}", fds.len()));
        }
        Ok(Self {
            fds: fds.into_iter(),
        })
    }

    fn next(&mut self) -> Result<OwnedFd, String> {
        self.fds
            .next()
            .ok_or_else(|| "a descriptor is missing".into())
    }

    fn config(&mut self, spec: &StartSpec) -> Result<VmConfig, String> {
        let kvm = File::from(self.next()?);
        let kernel = InputFile::Open {
            file: File::from(self.next()?),
            name: spec.kernel_name.clone(),
        };
        let mut config = VmConfig::new(kernel);
        config.kvm = Some(kvm);
        if spec.initrd {
            config.initrd = Some(InputFile::Open {
                file: File::from(self.next()?),
                name: spec.initrd_name.clone(),
            });
        }
        let (current, older) = (File::from(self.next()?), File::from(self.next()?));
        let console = CappedLog::from_files(current, older, spec.console_max_bytes)
            .map_err(|e| format!("console log: {e}"))?;
        config.console = Box::new(console);
        config.vsock = Some(VsockConfig {
            cid: spec.vsock_cid,
            uds_path: spec.vsock_path.clone().into(),
            listener: Some(UnixListener::from(self.next()?)),
        });
        for tag in &spec.fs_tags {
            config.fs.push(FsConfig {
                tag: tag.clone(),
                socket_path: format!("virtiofsd ({tag})").into(),
                stream: Some(UnixStream::from(self.next()?)),
            });
        }
        for &(mac, mtu) in &spec.net {
            config.net.push(NetConfig {
                tap: self.next()?,
                mac,
                mtu,
            });
        }
        config.cmdline = spec.cmdline.clone();
        config.memory_mib = spec.memory_mib;
        config.max_memory_mib = spec.max_memory_mib;
        config.boot_vcpus = spec.boot_vcpus;
        config.max_vcpus = spec.max_vcpus;
        Ok(config)
    }
}

fn log_filter(level: usize) -> log::LevelFilter {
    log::LevelFilter::iter()
        .nth(level)
        .unwrap_or(log::LevelFilter::Info)
}

/// Sends log lines to the shim, which logs them as its own (the VMM has no log file).
struct ChannelLogger(Arc<Channel>);

impl log::Log for ChannelLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let line = bounded(record.args().to_string());
            // write(2), not sendmsg: device threads log under their seccomp allow-lists.
            let _ = self.0.write(&Message::Log(record.level() as usize, line));
        }
    }

    fn flush(&self) {}
}
