//! xdns node agent: sources → zone → kernel maps and userspace server.
//!
//! Modules follow the data flow: [`source`] (Kubernetes API, zone file) feeds the [`zone`]
//! model, which feeds the [`kernel`] maps of the XDP program and the userspace [`server`]
//! (which also forwards what is not the cluster's); [`metrics`] reports on all of it.

pub mod accept;
pub mod app;
pub mod capabilities;
pub mod config;
pub mod dns;
pub mod kernel;
pub mod metrics;
pub mod server;
pub mod source;
pub mod zone;
