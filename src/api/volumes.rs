//! Volume routes of the control API, and their client calls.
//!
//! - `GET /v1/volumes`, `POST /v1/volumes` ([`CreateVolume`]) → [`VolumeInfo`]
//! - `GET|DELETE /v1/volumes/{name}`
//! - `POST /v1/volumes/{name}/resize` `{"size":N}`
//! - `POST /v1/volumes/{name}/flatten` `{"rate":N}` (bytes/s, 0 or absent: unlimited)
//! - `GET|POST /v1/volumes/{name}/snapshots` (`{"name":"SNAP"}`),
//!   `DELETE /v1/volumes/{name}/snapshots/{snap}`
//! - `POST /v1/volumes/{name}/revert` `{"snapshot":"SNAP"}`
//! - `POST /v1/images/{name}/delete?force=true` lives with the image routes.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use hyper::Method;
use serde::{Deserialize, Serialize};

use super::client::{encode_segment, Client, ClientError};
use super::server::Failure;
use crate::catalog::VolumeRecord;
use crate::daemon::volumes::{CreateVolume, VolumeInfo};
use crate::daemon::Daemon;
use crate::overlay::SnapshotInfo;

/// `POST /v1/volumes/{name}/resize`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    pub size: u64,
}

/// `POST /v1/volumes/{name}/flatten`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlattenRequest {
    #[serde(default)]
    pub rate: Option<u64>,
}

/// `POST /v1/volumes/{name}/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub name: String,
}

/// `POST /v1/volumes/{name}/revert`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevertRequest {
    pub snapshot: String,
}

type ApiResult<T> = Result<Json<T>, Failure>;
type D = State<Arc<Daemon>>;

/// The volume routes (merged into the main router).
pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/v1/volumes", get(list).post(create))
        .route("/v1/volumes/{name}", get(show).delete(remove))
        .route("/v1/volumes/{name}/resize", post(resize))
        .route("/v1/volumes/{name}/flatten", post(flatten))
        .route("/v1/volumes/{name}/revert", post(revert))
        .route(
            "/v1/volumes/{name}/snapshots",
            get(snapshots).post(snapshot),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snap}",
            delete(delete_snapshot),
        )
}

async fn list(State(d): D) -> ApiResult<Vec<VolumeInfo>> {
    Ok(Json(d.list_volumes().await?))
}

async fn create(
    State(d): D,
    body: Result<Json<CreateVolume>, JsonRejection>,
) -> ApiResult<VolumeInfo> {
    let Json(req) = body?;
    Ok(Json(d.create_volume(req).await?))
}

async fn show(State(d): D, name: Result<Path<String>, PathRejection>) -> ApiResult<VolumeInfo> {
    let Path(name) = name?;
    Ok(Json(d.get_volume(&name).await?))
}

async fn remove(State(d): D, name: Result<Path<String>, PathRejection>) -> ApiResult<VolumeRecord> {
    let Path(name) = name?;
    Ok(Json(d.delete_volume(&name).await?))
}

async fn resize(
    State(d): D,
    name: Result<Path<String>, PathRejection>,
    body: Result<Json<ResizeRequest>, JsonRejection>,
) -> ApiResult<VolumeInfo> {
    let (Path(name), Json(req)) = (name?, body?);
    Ok(Json(d.resize_volume(&name, req.size).await?))
}

async fn flatten(
    State(d): D,
    name: Result<Path<String>, PathRejection>,
    body: Result<Json<FlattenRequest>, JsonRejection>,
) -> ApiResult<VolumeInfo> {
    let (Path(name), Json(req)) = (name?, body?);
    Ok(Json(d.flatten_volume(&name, req.rate.unwrap_or(0)).await?))
}

async fn revert(
    State(d): D,
    name: Result<Path<String>, PathRejection>,
    body: Result<Json<RevertRequest>, JsonRejection>,
) -> ApiResult<VolumeInfo> {
    let (Path(name), Json(req)) = (name?, body?);
    Ok(Json(d.revert_volume(&name, &req.snapshot).await?))
}

async fn snapshots(
    State(d): D,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Vec<SnapshotInfo>> {
    let Path(name) = name?;
    Ok(Json(d.volume_snapshots(&name).await?))
}

async fn snapshot(
    State(d): D,
    name: Result<Path<String>, PathRejection>,
    body: Result<Json<SnapshotRequest>, JsonRejection>,
) -> ApiResult<VolumeInfo> {
    let (Path(name), Json(req)) = (name?, body?);
    Ok(Json(d.snapshot_volume(&name, &req.name).await?))
}

async fn delete_snapshot(
    State(d): D,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<VolumeInfo> {
    let Path((name, snap)) = path?;
    Ok(Json(d.delete_volume_snapshot(&name, &snap).await?))
}

fn vol_path(name: &str, rest: &str) -> String {
    format!("/v1/volumes/{}{rest}", encode_segment(name))
}

impl Client {
    pub async fn list_volumes(&self) -> Result<Vec<VolumeInfo>, ClientError> {
        self.call(Method::GET, "/v1/volumes", None::<&()>).await
    }

    pub async fn create_volume(&self, req: &CreateVolume) -> Result<VolumeInfo, ClientError> {
        self.call(Method::POST, "/v1/volumes", Some(req)).await
    }

    pub async fn get_volume(&self, name: &str) -> Result<VolumeInfo, ClientError> {
        self.call(Method::GET, &vol_path(name, ""), None::<&()>)
            .await
    }

    pub async fn delete_volume(&self, name: &str) -> Result<VolumeRecord, ClientError> {
        self.call(Method::DELETE, &vol_path(name, ""), None::<&()>)
            .await
    }

    pub async fn resize_volume(&self, name: &str, size: u64) -> Result<VolumeInfo, ClientError> {
        self.call(
            Method::POST,
            &vol_path(name, "/resize"),
            Some(&ResizeRequest { size }),
        )
        .await
    }

    pub async fn flatten_volume(
        &self,
        name: &str,
        rate: Option<u64>,
    ) -> Result<VolumeInfo, ClientError> {
        self.call(
            Method::POST,
            &vol_path(name, "/flatten"),
            Some(&FlattenRequest { rate }),
        )
        .await
    }

    pub async fn snapshot_volume(&self, name: &str, snap: &str) -> Result<VolumeInfo, ClientError> {
        self.call(
            Method::POST,
            &vol_path(name, "/snapshots"),
            Some(&SnapshotRequest { name: snap.into() }),
        )
        .await
    }

    pub async fn volume_snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>, ClientError> {
        self.call(Method::GET, &vol_path(name, "/snapshots"), None::<&()>)
            .await
    }

    pub async fn delete_volume_snapshot(
        &self,
        name: &str,
        snap: &str,
    ) -> Result<VolumeInfo, ClientError> {
        let rest = format!("/snapshots/{}", encode_segment(snap));
        self.call(Method::DELETE, &vol_path(name, &rest), None::<&()>)
            .await
    }

    pub async fn revert_volume(&self, name: &str, snap: &str) -> Result<VolumeInfo, ClientError> {
        self.call(
            Method::POST,
            &vol_path(name, "/revert"),
            Some(&RevertRequest {
                snapshot: snap.into(),
            }),
        )
        .await
    }

    /// `image delete --force`: move an image to the recycle bin even if volumes use it.
    pub async fn force_delete_image(
        &self,
        id_or_name: &str,
    ) -> Result<crate::catalog::ImageRecord, ClientError> {
        let path = format!(
            "/v1/images/{}/delete?force=true",
            encode_segment(id_or_name)
        );
        self.call(Method::POST, &path, None::<&()>).await
    }
}
