//! The guest's memory (`accordion.agent.v1.Memory`): what the kernel shows as usable RAM, sent
//! whenever it changes, which the host takes as the acknowledgement of a memory resize.
//!
//! What the kernel does (Linux 6.12, virtio-mem, Documentation/admin-guide/mm/memory-hotplug.rst):
//! the virtio-mem driver adds memory blocks as it plugs (`add@/devices/system/memory/memoryN`,
//! SUBSYSTEM=memory), and the kernel onlines them itself (`memhp_default_state=online_movable` on
//! the command line the VMM writes), sending `online@…`; an unplug offlines blocks (`offline@…`)
//! and removes the empty ones (`remove@…`). Nothing here writes to memory blocks: the agent only
//! reads /proc/meminfo after each such uevent and reports it.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use accordion_proto::agent::v1 as pb;
use accordion_proto::agent::v1::memory_server::{Memory, MemoryServer};
use accordion_proto::MAX_MESSAGE_BYTES;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::cpu::monotonic_ns;
use crate::cpu::netlink::{NetlinkError, Received, UeventSocket, MAX_MESSAGE};
use crate::cpu::uevent;
use crate::server::error_chain;

/// Events buffered per watcher; one further behind gets a snapshot instead.
pub const EVENT_BUFFER: usize = 256;
/// Messages queued per Watch stream.
const WATCH_QUEUE: usize = 16;
/// Pause after a receive error other than an overrun, so a broken socket cannot spin.
const RECEIVE_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// /proc/meminfo is a few KiB; more is not the file we know.
const MAX_MEMINFO: usize = 64 * 1024;

/// Errors reading the memory figures.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} has no {1} line")]
    Missing(PathBuf, &'static str),
}

/// The figures a MemoryEvent carries, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    /// MemTotal: the RAM the kernel manages (boot RAM less reservations, plus what is plugged).
    pub total: u64,
    /// MemAvailable.
    pub available: u64,
    /// MemFree.
    pub free: u64,
}

/// Reads a `Key:   N kB` line's value in bytes.
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let kb = rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
        kb.checked_mul(1024)
    })
}

/// Parses /proc/meminfo's text.
pub fn parse_meminfo(path: &Path, text: &str) -> Result<MemInfo, MemoryError> {
    let get = |key: &'static str| {
        field(text, key).ok_or_else(|| MemoryError::Missing(path.to_path_buf(), key))
    };
    Ok(MemInfo {
        total: get("MemTotal")?,
        available: get("MemAvailable")?,
        free: get("MemFree")?,
    })
}

/// Reads `path` (/proc/meminfo).
pub fn read_meminfo(path: &Path) -> Result<MemInfo, MemoryError> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_MEMINFO as u64).read_to_string(&mut text))
        .map_err(|e| MemoryError::Read(path.to_path_buf(), e))?;
    parse_meminfo(path, &text)
}

/// Whether a uevent is about a memory block.
fn is_memory_uevent(event: &uevent::Uevent) -> bool {
    event.var("SUBSYSTEM") == Some("memory")
        && event.devpath.starts_with("/devices/system/memory/memory")
}

fn to_wire(kind: pb::MemoryEventKind, info: MemInfo) -> pb::MemoryEvent {
    pb::MemoryEvent {
        kind: kind.into(),
        total_bytes: info.total,
        available_bytes: info.available,
        free_bytes: info.free,
        monotonic_ns: monotonic_ns(),
    }
}

/// The memory figures and their change feed. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MemoryHub {
    meminfo: PathBuf,
    events: broadcast::Sender<pb::MemoryEvent>,
}

impl MemoryHub {
    /// A hub reading `meminfo` (/proc/meminfo in the guest), not yet watching.
    pub fn new(meminfo: &Path) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Self {
            meminfo: meminfo.to_path_buf(),
            events,
        }
    }

    /// Starts watching memory block uevents on a task of its own. Without a uevent socket the
    /// hub still serves snapshots. Must run inside a tokio runtime.
    pub fn start(meminfo: &Path) -> Self {
        let hub = Self::new(meminfo);
        match UeventSocket::bind() {
            Ok(socket) => {
                crate::info!("watching memory uevents");
                tokio::spawn(hub.clone().run(socket));
            }
            Err(e) => crate::warn!(
                "live memory events unavailable, Memory Watch serves snapshots only: {}",
                error_chain(&e)
            ),
        }
        hub
    }

    /// The figures now.
    pub fn snapshot(&self) -> Result<pb::MemoryEvent, MemoryError> {
        read_meminfo(&self.meminfo).map(|info| to_wire(pb::MemoryEventKind::Snapshot, info))
    }

    fn subscribe(&self) -> broadcast::Receiver<pb::MemoryEvent> {
        self.events.subscribe()
    }

    /// Publishes the figures after a change (nothing if they cannot be read: the next change
    /// or a snapshot will carry them).
    fn publish_changed(&self) {
        match read_meminfo(&self.meminfo) {
            Ok(info) => {
                let _ = self
                    .events
                    .send(to_wire(pb::MemoryEventKind::Changed, info));
            }
            Err(e) => crate::warn!("cannot read the memory figures: {}", error_chain(&e)),
        }
    }

    /// Acts on one datagram from the uevent socket: a memory block's uevent publishes the
    /// figures; anything else is ignored.
    pub fn handle_message(&self, message: &[u8]) {
        if let Ok(event) = uevent::parse(message) {
            if is_memory_uevent(&event) {
                crate::debug!("memory uevent {} {}", event.action, event.devpath);
                self.publish_changed();
            }
        }
    }

    async fn run(self, socket: UeventSocket) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            match socket.recv(&mut buf).await {
                Ok(Received::Message(len)) => {
                    self.handle_message(buf.get(..len).unwrap_or_default());
                }
                Ok(Received::Truncated | Received::NotFromKernel(_)) => {}
                Err(NetlinkError::Overrun) => {
                    crate::warn!("uevents were lost; publishing the memory figures");
                    self.publish_changed();
                }
                Err(e) => {
                    crate::warn!("{}", error_chain(&e));
                    tokio::time::sleep(RECEIVE_ERROR_PAUSE).await;
                }
            }
        }
    }
}

/// The Memory service.
#[derive(Debug, Clone)]
pub struct MemoryService {
    hub: MemoryHub,
}

impl MemoryService {
    /// A service over `hub`.
    pub fn new(hub: MemoryHub) -> Self {
        Self { hub }
    }

    /// The tonic service with the message size limits applied.
    pub fn into_server(self) -> MemoryServer<Self> {
        MemoryServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// Forwards the hub's events to one Watch stream until the client goes away; a watcher that
/// fell behind gets a snapshot (every event carries the full figures, so nothing is lost).
async fn forward(
    hub: MemoryHub,
    mut events: broadcast::Receiver<pb::MemoryEvent>,
    tx: mpsc::Sender<Result<pb::MemoryEvent, Status>>,
) {
    loop {
        let next = tokio::select! {
            next = events.recv() => next,
            () = tx.closed() => return,
        };
        let event = match next {
            Ok(event) => Ok(event),
            Err(RecvError::Lagged(_)) => {
                events = events.resubscribe();
                hub.snapshot()
                    .map_err(|e| Status::internal(error_chain(&e)))
            }
            Err(RecvError::Closed) => return,
        };
        let failed = event.is_err();
        if tx.send(event).await.is_err() || failed {
            return;
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::MemoryEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Memory for MemoryService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        _: Request<pb::WatchMemoryRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        // Subscribe before reading the snapshot: a change in between is then sent after it.
        let events = self.hub.subscribe();
        let snapshot = self
            .hub
            .snapshot()
            .map_err(|e| Status::internal(error_chain(&e)))?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        // The channel is new and has room: this cannot fail.
        let _ = tx.try_send(Ok(snapshot));
        tokio::spawn(forward(self.hub.clone(), events, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    const MEMINFO: &str = "MemTotal:         204800 kB\nMemFree:          100000 kB\n\
                           MemAvailable:     150000 kB\nBuffers:               0 kB\n";

    fn fixture(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "accordion-agent-meminfo-{}-{name}",
            std::process::id()
        ));
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn test_meminfo_is_read_in_bytes() {
        let path = fixture("parse", MEMINFO);
        assert_eq!(
            read_meminfo(&path).expect("meminfo"),
            MemInfo {
                total: 204800 * 1024,
                available: 150000 * 1024,
                free: 100000 * 1024
            }
        );
    }

    #[test]
    fn test_meminfo_without_memtotal_or_with_garbage_is_an_error() {
        for text in [
            "MemFree: 1 kB\nMemAvailable: 1 kB\n",
            "MemTotal: lots kB\n",
            "",
        ] {
            let path = fixture("bad", text);
            assert!(
                matches!(read_meminfo(&path), Err(MemoryError::Missing(..))),
                "{text:?}"
            );
        }
        assert!(read_meminfo(Path::new("/nonexistent/meminfo")).is_err());
        assert_eq!(field("MemTotal: 18446744073709551615 kB", "MemTotal"), None);
    }

    #[tokio::test]
    async fn test_watch_starts_with_a_snapshot_and_follows_memory_block_uevents_only() {
        let path = fixture("watch", MEMINFO);
        let hub = MemoryHub::new(&path);
        let service = MemoryService::new(hub.clone());
        let mut stream = service
            .watch(Request::new(pb::WatchMemoryRequest {}))
            .await
            .expect("watch")
            .into_inner();
        let first = stream.next().await.expect("snapshot").expect("ok");
        assert_eq!(
            (first.kind(), first.total_bytes),
            (pb::MemoryEventKind::Snapshot, 204800 * 1024)
        );
        // A CPU uevent is not ours; a memory block coming online is.
        hub.handle_message(b"online@/devices/system/cpu/cpu1\0SUBSYSTEM=cpu\0");
        std::fs::write(&path, MEMINFO.replace("204800", "335872")).expect("write");
        hub.handle_message(b"online@/devices/system/memory/memory40\0SUBSYSTEM=memory\0");
        let second = stream.next().await.expect("event").expect("ok");
        assert_eq!(
            (second.kind(), second.total_bytes),
            (pb::MemoryEventKind::Changed, 335872 * 1024)
        );
    }
}
