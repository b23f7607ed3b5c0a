//! secinfer: private neural-network inference.
//!
//! A client gets predictions from a model a server hosts; the server learns
//! nothing about the client's input and the weights never leave the server.
//! This crate is the top of the stack: the bench driver, the data sets and the
//! input readers the `secinfer` command line uses. The layers below it:
//!
//! - `secinfer-ring`: fixed point in Z_2^k and the ring kernels;
//! - `secinfer-model`: what a SecureLinear op is (the converted-model contract);
//! - `secinfer-protocol`: the two-party sessions, sans IO;
//! - `secinfer-converter`: ONNX -> server.onnx + client.onnx;
//! - `secinfer-tract-ext`: the tract plugin running SecureLinear on both sides;
//! - `secinfer-transport`: QUIC between client and server (TLS, tokens, limits).
#![forbid(unsafe_code)]

pub mod bench;
pub mod data;
pub mod inputs;
pub mod net;
pub mod plot;
pub mod progress;
pub mod report;
