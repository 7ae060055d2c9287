//! The vsock back end's TX and RX paths on fuzzed rings in fuzzed guest memory, with real host
//! sockets on the other side: host processes connecting with `CONNECT <port>`, writing, reading
//! and hanging up, and a host listener for guest-initiated connections.
//!
//! Input: a little-endian u16 length and that many bytes of guest memory image (the descriptor
//! tables included), then actions, one byte each plus their operands (see `act`).
//! Checked on every input: no panic, no allocation above MAX_ALLOCATION (the crate's allocator),
//! never more than VSOCK_MAX_CONNECTIONS connections.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use accordion_vmm::devices::fuzzing::{VsockBackend, VsockHostSocket, VSOCK_MAX_CONNECTIONS};
use accordion_vmm::devices::irq::IrqLine;
use accordion_vmm::devices::virtio::VirtioInterrupt;
use accordion_vmm_fuzz::{guest_memory, guest_write, ignore_sigpipe, Input, Ring};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EpollEvent;
use vmm_sys_util::eventfd::EventFd;

const RX: Ring = Ring::nth(0);
const TX: Ring = Ring::nth(1);
const EVENT: Ring = Ring::nth(2);
/// The host port guest-initiated connections reach.
const HOST_PORT: u32 = 5000;
const MAX_ACTIONS: usize = 128;
const MAX_HOSTS: usize = 8;

struct Harness {
    backend: VsockBackend,
    memory: GuestMemoryMmap,
    kick: EventFd,
    _stop: EventFd,
    events: Vec<EpollEvent>,
    /// Host processes that connected to the device's socket.
    hosts: Vec<UnixStream>,
    /// The host side of guest-initiated connections.
    listener: UnixListener,
    served: Vec<UnixStream>,
}

fn socket_path() -> PathBuf {
    std::env::temp_dir().join(format!("accordion-fuzz-vsock-{}.sock", std::process::id()))
}

impl Harness {
    fn new(image: &[u8]) -> Self {
        let path = socket_path();
        let _ = std::fs::remove_file(&path);
        let device_listener = UnixListener::bind(&path).expect("bind the device socket");
        let host_path = format!("{}_{HOST_PORT}", path.display());
        let _ = std::fs::remove_file(&host_path);
        let listener = UnixListener::bind(&host_path).expect("bind the host port");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let memory = guest_memory(image);
        let queues = vec![RX.queue(), TX.queue(), EVENT.queue()];
        let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(16).expect("eventfd")));
        let (stop, kick) = (
            EventFd::new(0).expect("eventfd"),
            EventFd::new(0).expect("eventfd"),
        );
        let socket = VsockHostSocket {
            guest_cid: 3,
            uds_path: path,
            listener: device_listener,
        };
        let backend = VsockBackend::new(socket, memory.clone(), queues, interrupt, &stop, &kick)
            .expect("a vsock back end");
        Self {
            backend,
            memory,
            kick,
            _stop: stop,
            events: vec![EpollEvent::default(); 64],
            hosts: Vec::new(),
            listener,
            served: Vec::new(),
        }
    }

    fn act(&mut self, input: &mut Input<'_>) {
        match input.u8() % 10 {
            0 => self.backend.process_tx(),
            1 => self.backend.fill_rx(),
            // The driver makes a descriptor available (heads past the queue size included).
            2 => {
                let b = input.u8();
                let ring = if b & 1 == 0 { RX } else { TX };
                ring.offer(&self.memory, u16::from(b >> 1));
            }
            // The driver writes anything anywhere: headers, payloads, descriptors, ring indices.
            3 => {
                let addr = u64::from(input.u16());
                let len = usize::from(input.u8() % 64);
                guest_write(&self.memory, addr, input.bytes(len));
            }
            // A host process connects and asks for a guest port (or sends garbage).
            4 => {
                if self.hosts.len() >= MAX_HOSTS {
                    return;
                }
                if let Ok(mut host) = UnixStream::connect(socket_path()) {
                    let _ = host.set_nonblocking(true);
                    let b = input.u8();
                    let _ = if b < 0xf0 {
                        host.write_all(format!("CONNECT {}\n", 1024 + u32::from(b % 4)).as_bytes())
                    } else {
                        let len = usize::from(input.u8() % 40);
                        host.write_all(input.bytes(len))
                    };
                    self.hosts.push(host);
                }
            }
            5 => {
                let len = usize::from(input.u16() % 8192);
                let fill = input.u8();
                if let Some(host) = pick(&mut self.hosts, input.u8()) {
                    let _ = host.write(&vec![fill; len]);
                }
            }
            6 => {
                if let Some(host) = pick(&mut self.hosts, input.u8()) {
                    drain(host);
                }
            }
            7 => {
                let i = usize::from(input.u8());
                if !self.hosts.is_empty() {
                    self.hosts.remove(i % self.hosts.len());
                }
            }
            // The host side of guest-initiated connections: accept, talk, hang up.
            8 => {
                if let Ok((stream, _)) = self.listener.accept() {
                    let _ = stream.set_nonblocking(true);
                    self.served.push(stream);
                }
                let len = usize::from(input.u8());
                if let Some(peer) = pick(&mut self.served, input.u8()) {
                    drain(peer);
                    let _ = peer.write(&vec![0x5a; len]);
                }
            }
            _ => {
                if !self.served.is_empty() {
                    let i = usize::from(input.u8()) % self.served.len();
                    self.served.remove(i);
                }
            }
        }
        // The device thread's loop: socket events, then both queues.
        self.backend.poll(&self.kick, &mut self.events, 0);
        assert!(self.backend.connections() <= VSOCK_MAX_CONNECTIONS);
    }
}

impl Drop for Harness {
    /// No socket files left behind, whichever way the input ends.
    fn drop(&mut self) {
        let path = socket_path();
        let _ = std::fs::remove_file(format!("{}_{HOST_PORT}", path.display()));
        let _ = std::fs::remove_file(path);
    }
}

fn pick(streams: &mut [UnixStream], i: u8) -> Option<&mut UnixStream> {
    let n = streams.len();
    (n > 0).then(|| &mut streams[usize::from(i) % n])
}

fn drain(stream: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

fuzz_target!(
    init: ignore_sigpipe(),
    |data: &[u8]| {
        let mut input = Input::new(data);
        let image_len = usize::from(input.u16());
        let image = input.bytes(image_len);
        let mut harness = Harness::new(image);
        for _ in 0..MAX_ACTIONS {
            if input.is_empty() {
                break;
            }
            harness.act(&mut input);
        }
    }
);
