//! From uevents to actions and events: onlines hot-added CPUs and publishes every CPU change on
//! a broadcast channel that each Watch stream subscribes to.
//!
//! The agent never offlines a CPU by itself: offlining is the kernel's part of an unplug (the ACPI
//! eject path) or an explicit SetOnline.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::broadcast;

use super::netlink::{NetlinkError, Received, UeventSocket, MAX_MESSAGE};
use super::sysfs::{self, CpuSets, CpuSysfs, SysfsError};
use super::uevent::{self, CpuUevent};
use super::{monotonic_ns, CpuEvent, CpuEventKind};
use crate::server::error_chain;

/// Events buffered per watcher. A watcher further behind than this gets a fresh snapshot instead
/// (see service.rs); a full 128-vCPU plug is 256 events (ADDED + ONLINE each), so a watcher that
/// keeps reading does not lag even then.
pub const EVENT_BUFFER: usize = 1024;

/// Pause after a receive error other than an overrun, so a broken socket cannot spin.
const RECEIVE_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The CPU state the service reads and the event feed it subscribes to. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CpuHub {
    sysfs: CpuSysfs,
    events: broadcast::Sender<CpuEvent>,
    /// The last sets read successfully: an event still carries sets if a later read fails.
    last_sets: Arc<Mutex<CpuSets>>,
}

impl CpuHub {
    /// A hub over the sysfs mounted at `sysfs_root` (`/sys` in the guest), not yet watching.
    pub fn new(sysfs_root: &Path) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Self {
            sysfs: CpuSysfs::new(sysfs_root),
            events,
            last_sets: Arc::default(),
        }
    }

    /// Starts watching the kernel's uevents on a task of its own, first onlining any registered
    /// CPU that is offline (a plug that raced the agent's start). Without a uevent socket (a host
    /// without privileges, no netlink) this logs that live events are unavailable and the hub
    /// still serves snapshots. Must run inside a tokio runtime.
    pub fn start(sysfs_root: &Path) -> Self {
        let hub = Self::new(sysfs_root);
        match UeventSocket::bind() {
            Ok(socket) => {
                crate::info!("watching CPU uevents");
                tokio::spawn(hub.clone().run(socket));
            }
            Err(e) => crate::warn!(
                "live CPU events unavailable, CPU Watch serves snapshots only: {}",
                error_chain(&e)
            ),
        }
        hub
    }

    /// The CPU files.
    pub fn sysfs(&self) -> &CpuSysfs {
        &self.sysfs
    }

    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<CpuEvent> {
        self.events.subscribe()
    }

    /// The current sets as a SNAPSHOT event.
    pub fn snapshot(&self) -> Result<CpuEvent, SysfsError> {
        let sets = self.sysfs.read_sets()?;
        *self
            .last_sets
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = sets.clone();
        Ok(CpuEvent {
            kind: CpuEventKind::Snapshot,
            cpu: None,
            sets,
            error: None,
            monotonic_ns: monotonic_ns(),
        })
    }

    /// Publishes `kind` for `cpu` with the sets read now (or the last good ones if that fails).
    fn publish(&self, kind: CpuEventKind, cpu: Option<u32>, error: Option<String>) {
        let monotonic_ns = monotonic_ns();
        let sets = match self.sysfs.read_sets() {
            Ok(sets) => {
                *self
                    .last_sets
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = sets.clone();
                sets
            }
            Err(e) => {
                crate::warn!(
                    "cannot read the CPU sets, reporting the last known: {}",
                    error_chain(&e)
                );
                self.last_sets
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
            }
        };
        let event = CpuEvent {
            kind,
            cpu,
            sets,
            error,
            monotonic_ns,
        };
        crate::debug!("cpu event {event:?}");
        // No watcher is not an error: the event is simply not wanted now.
        let _ = self.events.send(event);
    }

    /// Publishes a snapshot to every watcher (after events may have been lost).
    fn publish_snapshot(&self) {
        self.publish(CpuEventKind::Snapshot, None, None);
    }

    /// Onlines hot-added `cpu`; a failure becomes an ONLINE_FAILED event. Success is reported by
    /// the kernel's own `online` uevent.
    async fn online_added(&self, cpu: u32) {
        match sysfs::set_online(&self.sysfs, cpu, true).await {
            Ok(true) => crate::info!("cpu{cpu}: onlined"),
            Ok(false) => crate::debug!("cpu{cpu}: already online"),
            Err(e) => {
                let text = error_chain(&e);
                crate::warn!("cpu{cpu}: cannot online: {text}");
                self.publish(CpuEventKind::OnlineFailed, Some(cpu), Some(text));
            }
        }
    }

    /// Onlines every registered CPU that is offline: at start, and after lost uevents.
    pub(crate) async fn online_registered_offline(&self) {
        let files = self.sysfs.clone();
        let offline = match tokio::task::spawn_blocking(move || files.registered_offline()).await {
            Ok(Ok(offline)) => offline,
            Ok(Err(e)) => {
                crate::warn!("cannot scan for offline CPUs: {}", error_chain(&e));
                return;
            }
            Err(e) => {
                crate::warn!("cannot scan for offline CPUs: {e}");
                return;
            }
        };
        for cpu in offline {
            crate::info!("cpu{cpu}: registered but offline, onlining");
            self.online_added(cpu).await;
        }
    }

    /// Acts on one datagram from the uevent socket. Anything that is not a CPU uevent is ignored.
    pub(crate) async fn handle_message(&self, message: &[u8]) {
        let event = match uevent::parse(message) {
            Ok(event) => event,
            Err(e) => {
                crate::debug!("ignoring a uevent message ({} bytes): {e}", message.len());
                return;
            }
        };
        match uevent::cpu_uevent(&event) {
            None => {}
            Some(CpuUevent::Add(cpu)) => {
                self.publish(CpuEventKind::Added, Some(cpu), None);
                self.online_added(cpu).await;
            }
            Some(CpuUevent::Remove(cpu)) => self.publish(CpuEventKind::Removed, Some(cpu), None),
            Some(CpuUevent::Online(cpu)) => self.publish(CpuEventKind::Online, Some(cpu), None),
            Some(CpuUevent::Offline(cpu)) => self.publish(CpuEventKind::Offline, Some(cpu), None),
        }
    }

    /// The watch loop. Uevents are handled one at a time, in the kernel's order; onlining a CPU
    /// blocks this loop (not the runtime) while the kernel brings it up, and the socket's buffer
    /// holds what arrives meanwhile.
    async fn run(self, socket: UeventSocket) {
        // The socket is bound before the scan: a CPU added after the scan is in the socket, one
        // added before is found by the scan (both, at worst: onlining an online CPU is a no-op).
        self.online_registered_offline().await;
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            match socket.recv(&mut buf).await {
                Ok(Received::Message(len)) => {
                    let message = buf.get(..len).unwrap_or_default();
                    self.handle_message(message).await;
                }
                Ok(Received::Truncated) => crate::debug!("ignoring a truncated uevent message"),
                Ok(Received::NotFromKernel(port)) => {
                    crate::debug!("ignoring a uevent message from port {port}, not the kernel")
                }
                Err(NetlinkError::Overrun) => {
                    crate::warn!("uevents were lost; rescanning the CPUs");
                    self.online_registered_offline().await;
                    self.publish_snapshot();
                }
                Err(e) => {
                    crate::warn!("{}", error_chain(&e));
                    tokio::time::sleep(RECEIVE_ERROR_PAUSE).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::sysfs::fixture::FakeSysfs;
    use super::*;
    use tokio::sync::broadcast::error::TryRecvError;

    fn add_message(cpu: u32) -> Vec<u8> {
        format!(
            "add@/devices/system/cpu/cpu{cpu}\0ACTION=add\0DEVPATH=/devices/system/cpu/cpu{cpu}\0SUBSYSTEM=cpu\0MODALIAS=cpu:type:aarch64:feature:,0000\0SEQNUM=9\0"
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn test_add_uevent_onlines_cpu_and_publishes_added() {
        let fake = FakeSysfs::new("add", 4, &[0], &[0, 1]);
        let hub = CpuHub::new(&fake.root);
        let mut events = hub.subscribe();
        hub.handle_message(&add_message(1)).await;
        let added = events.try_recv().expect("added");
        assert_eq!(fake.online_file(1), "1\n");
        assert_eq!(
            (added.kind, added.cpu, added.sets.online, added.error),
            (CpuEventKind::Added, Some(1), vec![0], None)
        );
        assert!(matches!(events.try_recv(), Err(TryRecvError::Empty)));
    }

    #[tokio::test]
    async fn test_add_uevent_for_unwritable_cpu_publishes_online_failed_with_error() {
        let fake = FakeSysfs::new("addfail", 4, &[0], &[0]);
        std::fs::create_dir_all(fake.cpu_dir(2).join("online")).expect("mkdir");
        let hub = CpuHub::new(&fake.root);
        let mut events = hub.subscribe();
        hub.handle_message(&add_message(2)).await;
        let kinds = (
            events.try_recv().expect("added"),
            events.try_recv().expect("failed"),
        );
        assert_eq!(
            (kinds.0.kind, kinds.1.kind, kinds.1.cpu),
            (CpuEventKind::Added, CpuEventKind::OnlineFailed, Some(2))
        );
        assert!(
            kinds
                .1
                .error
                .as_deref()
                .is_some_and(|e| e.contains("cpu2/online")),
            "{:?}",
            kinds.1.error
        );
    }

    #[tokio::test]
    async fn test_online_offline_remove_uevents_publish_with_current_sets() {
        let fake = FakeSysfs::new("states", 4, &[0, 3], &[0, 3]);
        fake.set_mask("enabled", &[0, 3]);
        let hub = CpuHub::new(&fake.root);
        let mut events = hub.subscribe();
        for action in ["online", "offline", "remove"] {
            let message = format!("{action}@/devices/system/cpu/cpu3\0ACTION={action}\0DEVPATH=/devices/system/cpu/cpu3\0SUBSYSTEM=cpu\0SEQNUM=1\0");
            hub.handle_message(message.as_bytes()).await;
        }
        let got: Vec<_> = (0..3)
            .map(|_| events.try_recv().expect("event"))
            .map(|e| (e.kind, e.cpu, e.sets.online, e.sets.enabled))
            .collect();
        let sets = (vec![0, 3], Some(vec![0, 3]));
        assert_eq!(
            got,
            [
                (
                    CpuEventKind::Online,
                    Some(3),
                    sets.0.clone(),
                    sets.1.clone()
                ),
                (
                    CpuEventKind::Offline,
                    Some(3),
                    sets.0.clone(),
                    sets.1.clone()
                ),
                (CpuEventKind::Removed, Some(3), sets.0, sets.1),
            ]
        );
        // The agent never offlines anything by itself.
        assert_eq!(fake.online_file(3), "1\n");
    }

    #[tokio::test]
    async fn test_garbage_and_foreign_uevents_publish_nothing() {
        let fake = FakeSysfs::new("noise", 4, &[0], &[0, 1]);
        let hub = CpuHub::new(&fake.root);
        let mut events = hub.subscribe();
        let noise: [&[u8]; 4] = [
            b"\xff\xfe garbage",
            b"libudev\0binary",
            b"add@/devices/virtual/net/lo\0ACTION=add\0SUBSYSTEM=net\0",
            b"bind@/devices/system/cpu/cpu1\0ACTION=bind\0SUBSYSTEM=cpu\0DRIVER=processor\0",
        ];
        for message in noise {
            hub.handle_message(message).await;
        }
        assert!(matches!(events.try_recv(), Err(TryRecvError::Empty)));
        assert_eq!(fake.online_file(1), "0\n");
    }

    #[tokio::test]
    async fn test_startup_scan_onlines_registered_offline_cpus_only() {
        let fake = FakeSysfs::new("scan", 8, &[0, 1], &[0, 1, 2, 3]);
        let hub = CpuHub::new(&fake.root);
        hub.online_registered_offline().await;
        let states: Vec<String> = [1, 2, 3].iter().map(|&cpu| fake.online_file(cpu)).collect();
        assert_eq!(states, ["1\n", "1\n", "1\n"]);
        assert!(!fake.cpu_dir(4).exists(), "an unregistered CPU was touched");
    }

    #[tokio::test]
    async fn test_event_keeps_last_sets_when_sysfs_read_fails() {
        let fake = FakeSysfs::new("lastsets", 4, &[0, 1], &[0, 1]);
        let hub = CpuHub::new(&fake.root);
        hub.snapshot().expect("snapshot");
        std::fs::write(fake.root.join("devices/system/cpu/online"), "garbage\n").expect("write");
        let mut events = hub.subscribe();
        hub.handle_message(b"online@/devices/system/cpu/cpu1\0SUBSYSTEM=cpu\0")
            .await;
        assert_eq!(events.try_recv().expect("event").sets.online, vec![0, 1]);
    }
}
