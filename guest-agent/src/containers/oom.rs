//! OOM kills in containers, for `Containers.WatchOom`: one inotify instance watches the
//! memory.events file of every container's cgroup (the kernel raises IN_MODIFY when a counter
//! grows); when a container's `oom_kill` count grows, its id is published on a broadcast channel
//! that each WatchOom stream subscribes to.
//!
//! Containers are registered when they are created (before their process can run, so no kill is
//! missed) and unregistered when they are deleted, whether or not anyone is watching.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, WatchDescriptor};
use tokio::sync::{broadcast, mpsc};

use super::cgroup::{MemoryEvents, MEMORY_EVENTS};
use super::events::Watcher;

/// OOM events buffered per watcher before a slow one starts losing them.
pub const EVENT_BUFFER: usize = 256;
/// Pause after an inotify read error, so a broken instance cannot spin.
const ERROR_PAUSE: Duration = Duration::from_millis(100);

enum Command {
    Watch { id: String, cgroup: PathBuf },
    Unwatch { id: String },
}

/// The OOM monitor's handle. Cheap to clone.
#[derive(Debug, Clone)]
pub struct OomMonitor {
    commands: mpsc::UnboundedSender<Command>,
    events: broadcast::Sender<String>,
}

impl OomMonitor {
    /// Starts the monitor on a task of its own. Must run inside a tokio runtime. Without inotify
    /// (the instance cannot be made) it logs that OOM events are unavailable; WatchOom streams
    /// then stay silent.
    pub fn start() -> Self {
        let (commands, receiver) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        match Watcher::new() {
            Ok(watcher) => {
                tokio::spawn(run(watcher, receiver, events.clone()));
            }
            Err(e) => crate::warn!("cannot watch for OOM kills, WatchOom will report none: {e}"),
        }
        Self { commands, events }
    }

    /// Watches the container `id` whose cgroup is `cgroup`.
    pub fn watch(&self, id: &str, cgroup: &Path) {
        let _ = self.commands.send(Command::Watch {
            id: id.to_owned(),
            cgroup: cgroup.to_owned(),
        });
    }

    /// Stops watching the container `id`.
    pub fn unwatch(&self, id: &str) {
        let _ = self.commands.send(Command::Unwatch { id: id.to_owned() });
    }

    /// A receiver of the id of every container with an OOM kill from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }
}

/// One watched memory.events file.
struct Watched {
    id: String,
    file: PathBuf,
    oom_kills: u64,
}

fn oom_kills(file: &Path) -> Option<u64> {
    std::fs::read_to_string(file)
        .ok()
        .map(|text| MemoryEvents::parse(&text).oom_kill)
}

async fn run(
    watcher: Watcher,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: broadcast::Sender<String>,
) {
    let mut watched: HashMap<WatchDescriptor, Watched> = HashMap::new();
    let mut by_id: HashMap<String, WatchDescriptor> = HashMap::new();
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                // Every handle is gone: the service is.
                None => return,
                Some(Command::Watch { id, cgroup }) => {
                    let file = cgroup.join(MEMORY_EVENTS);
                    match watcher.add(&file) {
                        Ok(wd) => {
                            let oom_kills = oom_kills(&file).unwrap_or(0);
                            if let Some(old) = by_id.insert(id.clone(), wd) {
                                watched.remove(&old);
                            }
                            watched.insert(wd, Watched { id, file, oom_kills });
                        }
                        Err(e) => crate::warn!(
                            "container {id}: OOM kills will not be reported: cannot watch {}: {e}",
                            file.display()
                        ),
                    }
                }
                Some(Command::Unwatch { id }) => {
                    if let Some(wd) = by_id.remove(&id) {
                        watched.remove(&wd);
                        watcher.remove(wd);
                    }
                }
            },
            read = watcher.next() => match read {
                Ok(batch) => {
                    for event in batch {
                        if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                            // The cgroup is gone (or the watch was removed above).
                            if let Some(w) = watched.remove(&event.wd) {
                                by_id.remove(&w.id);
                            }
                            continue;
                        }
                        let Some(w) = watched.get_mut(&event.wd) else {
                            continue;
                        };
                        let Some(now) = oom_kills(&w.file) else {
                            continue;
                        };
                        if now > w.oom_kills {
                            crate::info!(
                                "container {}: OOM kill (memory.events oom_kill {} → {now})",
                                w.id,
                                w.oom_kills
                            );
                            // No watcher is not an error: the kill is logged either way.
                            let _ = events.send(w.id.clone());
                        }
                        w.oom_kills = now;
                    }
                }
                Err(e) => {
                    crate::warn!("reading OOM notifications failed: {e}");
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_monitor_publishes_growth_of_oom_kill_only() {
        let dir = std::env::temp_dir().join(format!("accordion-oom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join(MEMORY_EVENTS);
        std::fs::write(&file, "oom 0\noom_kill 0\n").expect("write");
        let monitor = OomMonitor::start();
        let mut events = monitor.subscribe();
        monitor.watch("c1", &dir);
        // Let the monitor register the watch (commands are handled in order, on its task).
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A change that is not a kill, then a kill.
        std::fs::write(&file, "oom 1\noom_kill 0\n").expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::fs::write(&file, "oom 1\noom_kill 1\n").expect("write");
        let id = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("an event in time")
            .expect("event");
        monitor.unwatch("c1");
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::fs::write(&file, "oom 2\noom_kill 2\n").expect("write");
        let after = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(id, "c1");
        assert!(after.is_err(), "event after unwatch: {after:?}");
    }
}
