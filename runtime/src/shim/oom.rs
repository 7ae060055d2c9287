//! The guest's OOM notifications, turned into containerd `TaskOOM` events.
//!
//! The guest sends them at will, so they are checked and thinned before they reach containerd.
//! An id that is not one of this shim's containers is dropped: containerd takes a TaskOOM from any
//! shim for any container of the namespace, so forwarding it would let a guest mark another pod's
//! container as OOM-killed. A container gets at most one event per [`INTERVAL`]. That loses
//! nothing kubelet needs: containerd's CRI plugin turns TaskOOM into a flag on the container (the
//! reason "OOMKilled" its exit is reported with), which one event sets as well as a thousand do;
//! kubelet never sees the events themselves.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use accordion_vmm::log_limited;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc;
use tokio::task::JoinHandle;

use crate::agent_client::AgentClient;
use crate::error_chain;

/// The shortest time between two TaskOOM events of one container.
pub(super) const INTERVAL: Duration = Duration::from_secs(1);

/// What becomes of one notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Publish,
    /// The container had an event less than [`INTERVAL`] ago.
    Coalesced,
    /// Not a container of this shim.
    Unknown,
}

/// Per-container time of the last published event.
#[derive(Debug, Default)]
pub(super) struct OomFilter {
    last: HashMap<String, Instant>,
}

impl OomFilter {
    /// Decides on a notification for `id` arriving at `now`; `known` tells this shim's containers.
    pub(super) fn check(
        &mut self,
        id: &str,
        known: &dyn Fn(&str) -> bool,
        now: Instant,
    ) -> Verdict {
        if !known(id) {
            return Verdict::Unknown;
        }
        // Only live containers are remembered, so the map is never larger than the pod.
        self.last.retain(|c, _| known(c));
        match self.last.get(id) {
            Some(&at) if now.saturating_duration_since(at) < INTERVAL => Verdict::Coalesced,
            _ => {
                self.last.insert(id.to_owned(), now);
                Verdict::Publish
            }
        }
    }
}

/// At most 64 characters of a guest-chosen id, for a log line.
fn shown(id: &str) -> &str {
    match id.char_indices().nth(64) {
        Some((i, _)) => &id[..i],
        None => id,
    }
}

/// Publishes TaskOOM for the OOM kills the agent reports, while the watch lasts.
pub(super) fn forward<K>(
    agent: AgentClient,
    publisher: Arc<RemotePublisher>,
    namespace: String,
    known: K,
) -> JoinHandle<()>
where
    K: Fn(&str) -> bool + Send + 'static,
{
    tokio::spawn(async move {
        let mut watch = match agent.watch_oom().await {
            Ok(watch) => watch,
            Err(e) => {
                log::warn!("no OOM events from the guest: {}", error_chain(&e));
                return;
            }
        };
        let mut filter = OomFilter::default();
        loop {
            let container_id = match watch.next().await {
                Ok(Some(id)) => id,
                // The agent is shutting down.
                Ok(None) => return,
                Err(e) => {
                    // Once per pod: the watch is not reopened.
                    log::warn!("the guest's OOM events ended: {}", error_chain(&e));
                    return;
                }
            };
            match filter.check(&container_id, &known, Instant::now()) {
                Verdict::Coalesced => continue,
                Verdict::Unknown => {
                    log_limited!(
                        log::Level::Warn,
                        "the guest reported an OOM kill in {:?}, not a container of this pod: ignored",
                        shown(&container_id)
                    );
                    continue;
                }
                Verdict::Publish => {}
            }
            log_limited!(
                log::Level::Info,
                "container {container_id}: the guest kernel OOM-killed a process"
            );
            let event = ev::TaskOOM {
                container_id,
                ..Default::default()
            };
            let ctx = ttrpc::context::Context::default();
            if let Err(e) = publisher
                .publish(
                    ctx,
                    topics::TASK_OOM_EVENT_TOPIC,
                    &namespace,
                    Box::new(event),
                )
                .await
            {
                log_limited!(log::Level::Warn, "cannot publish an OOM event: {e}");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(id: &str) -> bool {
        id == "app" || id == "sidecar"
    }

    #[test]
    fn test_oom_flood_of_one_container_publishes_one_event_per_interval() {
        let mut filter = OomFilter::default();
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..10_000u32)
            .map(|i| filter.check("app", &pod, t0 + Duration::from_micros(u64::from(i) * 10)))
            .collect();
        let published = verdicts.iter().filter(|v| **v == Verdict::Publish).count();
        assert_eq!(published, 1, "10 000 notifications within 0.1 s");
        assert_eq!(filter.check("app", &pod, t0 + INTERVAL), Verdict::Publish);
    }

    #[test]
    fn test_oom_containers_are_coalesced_separately() {
        let mut filter = OomFilter::default();
        let t0 = Instant::now();
        assert_eq!(filter.check("app", &pod, t0), Verdict::Publish);
        assert_eq!(filter.check("sidecar", &pod, t0), Verdict::Publish);
        assert_eq!(filter.check("app", &pod, t0), Verdict::Coalesced);
    }

    #[test]
    fn test_oom_of_a_container_not_in_the_pod_is_never_published() {
        let mut filter = OomFilter::default();
        let t0 = Instant::now();
        for id in ["other-pods-container", "", &"x".repeat(1 << 20)] {
            assert_eq!(filter.check(id, &pod, t0), Verdict::Unknown);
        }
        assert!(filter.last.is_empty());
    }

    #[test]
    fn test_oom_filter_forgets_removed_containers() {
        let mut filter = OomFilter::default();
        let t0 = Instant::now();
        assert_eq!(filter.check("app", &pod, t0), Verdict::Publish);
        assert_eq!(
            filter.check("sidecar", &|id| id == "sidecar", t0),
            Verdict::Publish
        );
        assert_eq!(filter.last.len(), 1);
    }

    #[test]
    fn test_shown_truncates_long_ids() {
        assert_eq!(shown(&"é".repeat(100)).chars().count(), 64);
        assert_eq!(shown("app"), "app");
    }
}
