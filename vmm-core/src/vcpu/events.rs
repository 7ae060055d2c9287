//! The stream of vCPU state changes: any number of subscribers, each a plain
//! `std::sync::mpsc::Receiver` (no async runtime needed); a dropped receiver is forgotten at the
//! next event.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;

use super::VcpuState;

/// vCPU `index` entered `state` (serializable: it crosses the jailed VMM's process boundary as
/// JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VcpuEvent {
    /// vCPU index.
    pub index: u32,
    /// Its new state.
    pub state: VcpuState,
}

/// The subscribers.
#[derive(Debug, Default)]
pub struct EventHub {
    subscribers: Mutex<Vec<Sender<VcpuEvent>>>,
}

impl EventHub {
    /// A new subscriber; it sees every event from now on, in order per vCPU.
    pub fn subscribe(&self) -> Receiver<VcpuEvent> {
        let (tx, rx) = channel();
        self.lock().push(tx);
        rx
    }

    /// Sends `event` to every live subscriber and drops the ones whose receiver is gone.
    pub fn emit(&self, event: VcpuEvent) {
        self.lock().retain(|tx| tx.send(event).is_ok());
    }

    /// Number of subscribers still registered.
    pub fn subscribers(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Sender<VcpuEvent>>> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(index: u32) -> VcpuEvent {
        VcpuEvent {
            index,
            state: VcpuState::Plugged,
        }
    }

    #[test]
    fn test_every_subscriber_gets_every_event_in_order() {
        let hub = EventHub::default();
        let (a, b) = (hub.subscribe(), hub.subscribe());
        hub.emit(event(1));
        hub.emit(event(2));
        assert_eq!(a.try_iter().collect::<Vec<_>>(), [event(1), event(2)]);
        assert_eq!(b.try_iter().collect::<Vec<_>>(), [event(1), event(2)]);
    }

    #[test]
    fn test_dropped_receiver_is_removed_at_the_next_event() {
        let hub = EventHub::default();
        let kept = hub.subscribe();
        drop(hub.subscribe());
        hub.emit(event(3));
        assert_eq!(hub.subscribers(), 1);
        assert_eq!(kept.recv().unwrap(), event(3));
    }
}
