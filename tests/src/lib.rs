//! sandgate-tests: the harness for process-level tests, `make run` and `make bench`.
//!
//! Holds the Kubernetes API double, the sandbox echo server, and helpers that start real Envoy and
//! real sandgate binaries on ephemeral ports.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod apidouble;
pub mod cluster;
pub mod e2b;
pub mod echo;
pub mod envoy;
pub mod kubelet;
pub mod procs;
pub mod stack;
pub mod target;
