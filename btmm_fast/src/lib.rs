//! btmm data plane core: IPv6 in ESP (AES-256-GCM, RFC 4303/4106) in UDP (RFC 3948), moved
//! between a TUN device and a UDP socket by two threads. Plain Rust, testable with `cargo test`;
//! the Python bindings live only in `python.rs` behind the `python` feature.

pub mod endpoint;
pub mod engine;
pub mod error;
pub mod esp;
pub mod replay;
pub mod stun;
pub mod tun;
pub mod udp;

pub mod offload;
#[cfg(feature = "python")]
mod python;
