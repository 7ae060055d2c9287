//! The gRPC service `accordion.agent.v1.Network`: Configure and List.

use accordion_proto::agent::v1 as pb;
use accordion_proto::agent::v1::network_server::{Network, NetworkServer};
use accordion_proto::MAX_MESSAGE_BYTES;
use tonic::{Request, Response, Status};

use super::{check, netlink};
use crate::server::error_chain;

/// The Network service. Configure calls are serialized: two at once would race on the same links.
#[derive(Debug, Clone, Default)]
pub struct NetworkService {
    lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl NetworkService {
    /// The tonic service with the message size limits applied.
    pub fn into_server(self) -> NetworkServer<Self> {
        NetworkServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl Network for NetworkService {
    async fn configure(
        &self,
        request: Request<pb::ConfigureNetworkRequest>,
    ) -> Result<Response<pb::ConfigureNetworkResponse>, Status> {
        let specs = request
            .into_inner()
            .interfaces
            .iter()
            .map(check)
            .collect::<Result<Vec<_>, _>>()
            .map_err(Status::invalid_argument)?;
        let _guard = self.lock.lock().await;
        netlink::configure(&specs).await.map_err(|e| match e {
            netlink::NetlinkError::NoSuchMac(_) => Status::not_found(error_chain(&e)),
            _ => Status::internal(error_chain(&e)),
        })?;
        crate::info!("network: configured {} interface(s)", specs.len());
        Ok(Response::new(pb::ConfigureNetworkResponse {}))
    }

    async fn list(
        &self,
        _request: Request<pb::ListInterfacesRequest>,
    ) -> Result<Response<pb::ListInterfacesResponse>, Status> {
        let interfaces = netlink::list()
            .await
            .map_err(|e| Status::internal(error_chain(&e)))?;
        Ok(Response::new(pb::ListInterfacesResponse { interfaces }))
    }
}
