//! The client-facing gRPC services: armada.v1 ([`v1`]) and etcd v3
//! ([`etcd`]), one module per service. Each turns protobuf requests into
//! core's requests, calls the node, and turns answers and errors back.
//!
//! Invariant: no request logic here beyond validation and conversion; what
//! a request does is decided by the node (and core).

pub mod etcd;
pub mod v1;
