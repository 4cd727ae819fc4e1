//! sandgate-shared: the pieces both binaries agree on.
//!
//! Owns the pod contract (label and annotation keys, phases) and sandbox-address parsing.
//! It must stay pure: no Kubernetes client, no gRPC server, no async runtime.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod address;
pub mod contract;
pub mod duration;
pub mod meta;
#[cfg(feature = "server")]
pub mod server;

pub use address::{AddressConfig, AddressError, AddressForm, SandboxAddress};
pub use contract::{Contract, Phase};

/// The control API (`proto/sandgate/control/v1/control.proto`): messages, client and service trait.
pub mod control {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sandgate.control.v1");
}
