//! The gRPC service `accordion.agent.v1.Cpu`: Watch and SetOnline.

use std::collections::HashSet;
use std::pin::Pin;

use accordion_proto::agent::v1 as pb;
use accordion_proto::agent::v1::cpu_server::{Cpu, CpuServer};
use accordion_proto::MAX_MESSAGE_BYTES;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::sysfs::{self, SysfsError};
use super::{CpuEvent, CpuHub};
use crate::server::error_chain;
use crate::sysinfo::MAX_CPUS;

/// Messages queued per Watch stream. A client that stops reading fills this, then falls behind
/// the broadcast, and gets a snapshot when it catches up (never a silent gap).
const WATCH_QUEUE: usize = 16;

/// The Cpu service.
#[derive(Debug, Clone)]
pub struct CpuService {
    hub: CpuHub,
}

impl CpuService {
    /// A service over `hub`.
    pub fn new(hub: CpuHub) -> Self {
        Self { hub }
    }

    /// The tonic service with the message size limits applied.
    pub fn into_server(self) -> CpuServer<Self> {
        CpuServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

fn snapshot_status(err: &SysfsError) -> Status {
    Status::internal(error_chain(err))
}

/// Forwards the hub's events to one Watch stream until the client goes away. After a lag the
/// watcher gets a fresh snapshot: it re-subscribes first, so nothing after the snapshot is missed
/// (an event may repeat a change the snapshot already shows, which is harmless: every event
/// carries the full sets).
async fn forward(
    hub: CpuHub,
    mut events: broadcast::Receiver<CpuEvent>,
    tx: mpsc::Sender<Result<pb::CpuEvent, Status>>,
) {
    loop {
        let next = tokio::select! {
            next = events.recv() => next,
            () = tx.closed() => return,
        };
        let event = match next {
            Ok(event) => Ok(event.into()),
            Err(RecvError::Lagged(missed)) => {
                crate::info!("a CPU watcher fell {missed} events behind; sending a snapshot");
                events = events.resubscribe();
                hub.snapshot()
                    .map(pb::CpuEvent::from)
                    .map_err(|e| snapshot_status(&e))
            }
            // The hub is gone (the agent is stopping): end the stream.
            Err(RecvError::Closed) => return,
        };
        let failed = event.is_err();
        if tx.send(event).await.is_err() || failed {
            return;
        }
    }
}

/// Checks a SetOnline request before anything is changed.
fn validate(request: &pb::SetOnlineRequest) -> Result<(), Status> {
    let limit = usize::try_from(MAX_CPUS).unwrap_or(usize::MAX);
    if request.online.len() > limit || request.offline.len() > limit {
        return Err(Status::invalid_argument(format!(
            "More than {MAX_CPUS} CPUs in one request"
        )));
    }
    if request.offline.contains(&0) {
        return Err(Status::invalid_argument(
            "CPU 0 cannot be taken offline (nothing was changed)",
        ));
    }
    let online: HashSet<u32> = request.online.iter().copied().collect();
    if let Some(cpu) = request.offline.iter().find(|cpu| online.contains(cpu)) {
        return Err(Status::invalid_argument(format!(
            "CPU {cpu} is asked both online and offline (nothing was changed)"
        )));
    }
    Ok(())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::CpuEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Cpu for CpuService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        _: Request<pb::WatchCpusRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        // Subscribe before reading the snapshot: a change in between is then sent after it.
        let events = self.hub.subscribe();
        let hub = self.hub.clone();
        let snapshot = tokio::task::spawn_blocking(move || hub.snapshot())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| snapshot_status(&e))?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        // The channel is new and has room: this cannot fail.
        let _ = tx.try_send(Ok(snapshot.into()));
        tokio::spawn(forward(self.hub.clone(), events, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn set_online(
        &self,
        request: Request<pb::SetOnlineRequest>,
    ) -> Result<Response<pb::SetOnlineResponse>, Status> {
        let request = request.into_inner();
        validate(&request)?;
        let wanted = request
            .online
            .iter()
            .map(|&cpu| (cpu, true))
            .chain(request.offline.iter().map(|&cpu| (cpu, false)));
        let mut results = Vec::new();
        for (cpu, online) in wanted {
            let error = match sysfs::set_online(self.hub.sysfs(), cpu, online).await {
                Ok(_) => String::new(),
                Err(e) => error_chain(&e),
            };
            if !error.is_empty() {
                crate::warn!("SetOnline cpu{cpu} → {online}: {error}");
            }
            results.push(pb::CpuOnlineResult { cpu, online, error });
        }
        Ok(Response::new(pb::SetOnlineResponse { results }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::sysfs::fixture::FakeSysfs;
    use super::*;
    use tokio_stream::StreamExt;

    fn request(online: &[u32], offline: &[u32]) -> Request<pb::SetOnlineRequest> {
        Request::new(pb::SetOnlineRequest {
            online: online.to_vec(),
            offline: offline.to_vec(),
        })
    }

    #[tokio::test]
    async fn test_set_online_refuses_offlining_cpu0_and_changes_nothing() {
        let fake = FakeSysfs::new("svc-cpu0", 4, &[0], &[0, 1]);
        let service = CpuService::new(CpuHub::new(&fake.root));
        let status = service
            .set_online(request(&[1], &[0]))
            .await
            .expect_err("cpu0 offline");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("CPU 0"), "{}", status.message());
        assert_eq!(fake.online_file(1), "0\n");
    }

    #[tokio::test]
    async fn test_set_online_refuses_cpu_in_both_lists() {
        let fake = FakeSysfs::new("svc-both", 4, &[0], &[0, 1]);
        let service = CpuService::new(CpuHub::new(&fake.root));
        let status = service
            .set_online(request(&[1], &[1]))
            .await
            .expect_err("both");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn test_set_online_reports_one_result_per_cpu() {
        let fake = FakeSysfs::new("svc-results", 4, &[0, 2], &[0, 1, 2]);
        let service = CpuService::new(CpuHub::new(&fake.root));
        let results = service
            .set_online(request(&[1, 3], &[2]))
            .await
            .expect("set online")
            .into_inner()
            .results;
        let summary: Vec<(u32, bool, bool)> = results
            .iter()
            .map(|r| (r.cpu, r.online, r.error.is_empty()))
            .collect();
        assert_eq!(
            summary,
            [(1, true, true), (3, true, false), (2, false, true)]
        );
        assert!(
            results[1].error.contains("not registered"),
            "{}",
            results[1].error
        );
        assert_eq!(
            (fake.online_file(1), fake.online_file(2)),
            ("1\n".into(), "0\n".into())
        );
    }

    #[tokio::test]
    async fn test_watch_starts_with_snapshot_then_forwards_events() {
        let fake = FakeSysfs::new("svc-watch", 4, &[0], &[0, 1]);
        let hub = CpuHub::new(&fake.root);
        let service = CpuService::new(hub.clone());
        let mut stream = service
            .watch(Request::new(pb::WatchCpusRequest {}))
            .await
            .expect("watch")
            .into_inner();
        let first = stream.next().await.expect("snapshot").expect("ok");
        hub.handle_message(b"online@/devices/system/cpu/cpu1\0SUBSYSTEM=cpu\0")
            .await;
        let second = stream.next().await.expect("event").expect("ok");
        assert_eq!(
            (first.kind(), first.cpu, first.online, first.possible),
            (pb::CpuEventKind::Snapshot, None, vec![0], vec![0, 1, 2, 3])
        );
        assert_eq!(
            (second.kind(), second.cpu),
            (pb::CpuEventKind::Online, Some(1))
        );
    }

    #[tokio::test]
    async fn test_lagging_watcher_gets_a_snapshot_not_a_gap() {
        let fake = FakeSysfs::new("svc-lag", 4, &[0], &[0, 1]);
        let hub = CpuHub::new(&fake.root);
        let service = CpuService::new(hub.clone());
        let mut stream = service
            .watch(Request::new(pb::WatchCpusRequest {}))
            .await
            .expect("watch")
            .into_inner();
        // Not reading: the stream's queue fills, then the broadcast overruns.
        let message = b"online@/devices/system/cpu/cpu1\0SUBSYSTEM=cpu\0";
        for _ in 0..(super::super::watcher::EVENT_BUFFER + WATCH_QUEUE + 64) {
            hub.handle_message(message).await;
        }
        tokio::task::yield_now().await;
        let mut kinds = Vec::new();
        while let Ok(Some(event)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), stream.next()).await
        {
            kinds.push(event.expect("ok").kind());
        }
        assert_eq!(kinds.first(), Some(&pb::CpuEventKind::Snapshot));
        assert!(
            kinds
                .iter()
                .skip(1)
                .any(|k| *k == pb::CpuEventKind::Snapshot),
            "no snapshot after the lag: {} events",
            kinds.len()
        );
    }
}
