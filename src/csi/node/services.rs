//! The CSI Identity and Node services: thin, as `fuse.rs` is over the
//! filesystem core. Each RPC checks its one-at-a-time turn and calls the
//! driver; the driver's `CsiError` becomes the gRPC status.

use crate::csi::v1::identity_server::Identity as IdentityService;
use crate::csi::v1::node_server::Node as NodeService;
use crate::csi::v1::*;
use tonic::{Request, Response, Status};

use std::collections::HashMap;
use std::sync::Arc;

use super::super::error::CsiError;
use super::Driver;

/// The gRPC face of the driver.
#[derive(Clone)]
pub struct Services(pub Arc<Driver>);

#[tonic::async_trait]
impl IdentityService for Services {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.0.settings.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // Node only: no controller service, no topology.
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = self.0.link.lock().unwrap().current().is_some();
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}

fn unimplemented(what: &'static str) -> Status {
    CsiError::Unimplemented(what).into()
}

#[tonic::async_trait]
impl NodeService for Services {
    async fn node_stage_volume(
        &self,
        _: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(unimplemented("NodeStageVolume"))
    }

    async fn node_unstage_volume(
        &self,
        _: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(unimplemented("NodeUnstageVolume"))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let driver = self.0.clone();
        let request = request.into_inner();
        let _one_at_a_time = self.0.target_busy(&request.target_path).await;
        let (volume, target) = (request.volume_id.clone(), request.target_path.clone());
        let outcome = tokio::task::spawn_blocking(move || driver.publish(request))
            .await
            .map_err(|e| Status::internal(format!("publish: {e}")))?;
        if let Err(error) = &outcome {
            tracing::warn!(volume, target, reason = %error, "publish refused");
        }
        outcome
            .map(|()| Response::new(NodePublishVolumeResponse {}))
            .map_err(Status::from)
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let driver = self.0.clone();
        let request = request.into_inner();
        let _one_at_a_time = self.0.target_busy(&request.target_path).await;
        tokio::task::spawn_blocking(move || driver.unpublish(request))
            .await
            .map_err(|e| Status::internal(format!("unpublish: {e}")))??;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        _: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Err(unimplemented("NodeGetVolumeStats"))
    }

    async fn node_expand_volume(
        &self,
        _: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(unimplemented("NodeExpandVolume"))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        // None: publish and unpublish only (no staging, no stats).
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.0.settings.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}
