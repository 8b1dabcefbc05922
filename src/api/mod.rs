//! The control API: HTTP/1.1 with JSON bodies on a unix socket.
//!
//! - [`types`]: the wire types shared by server and client (requests, the error body, the
//!   NDJSON events of an image add) and the [`types::ErrorKind`] ↔ `kind` string mapping.
//! - [`server`]: the axum router over a [`crate::daemon::Daemon`] and the accept loop.
//! - [`client`]: the hyper client the CLI uses.
//!
//! Routes (all under `/v1`): `GET /health`, `GET /images[?all=true]`, `POST /images`
//! (NDJSON progress stream), `GET|PATCH /images/{id_or_name}`,
//! `POST /images/{id_or_name}/{disable|enable|delete|recover|expunge}`.
//! Errors are `{"error":{"kind":"not_found","message":"..."}}` with the status of
//! [`crate::error::ErrorKind::http_status`].

pub mod client;
pub mod server;
pub mod types;
pub mod volumes;
