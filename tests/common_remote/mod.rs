//! Helpers of the store tests: the shared conformance suite, a moto S3 server, and an HTTP
//! server with `Range` support.
#![allow(dead_code)]

pub mod conformance;
pub mod moto;
pub mod range_server;
pub mod web;
