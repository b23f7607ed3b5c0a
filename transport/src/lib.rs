//! QUIC transport between secinfer clients and servers.
//!
//! One QUIC connection (quinn, TLS 1.3 via rustls) is one client session.
//! The client opens a control stream and sends [`frame::ClientFrame::Hello`]
//! with the protocol version, the digest of its `client.onnx` and its API
//! token; the server checks the token first, then version and digest, and
//! answers `Welcome` or closes the connection with a reason. Afterwards the
//! client uses one stream for online round trips and another for the offline
//! (HE) phase, so preprocessing runs while predictions flow; the server runs
//! both against one `ServerSession` of `secinfer-protocol`, and HE jobs on
//! blocking threads without holding the session.
//!
//! Every message is a length-prefixed postcard frame ([`frame`]) with a
//! maximum size checked before the body is read. Any error in a session —
//! an oversized or malformed frame, a protocol violation such as a reused
//! preprocessing id — closes that connection with a reason the client
//! reports; other sessions are untouched.
//!
//! Identity ([`tls`]): the server's certificate is either generated once
//! (rcgen, self-signed, kept in a state directory) and pinned by clients by
//! its SHA-256 fingerprint, or issued by a CA whose certificate clients are
//! given. There is no "accept any certificate" mode. Access ([`auth`]):
//! clients present an API token; unauthenticated clients are refused before
//! any model work.
//!
//! Limits ([`server::Limits`]): sessions, frame size, preprocessed material
//! per session, concurrent HE jobs, handshake and idle timeouts, and a grace
//! period for shutdown, which finishes the requests in progress.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod auth;
pub mod client;
pub mod frame;
pub mod link;
pub mod loopback;
pub mod server;
pub mod tls;

pub use auth::TokenSet;
pub use client::{ClientConfig, ConnectionLost, QuicChannel, Trust};
pub use frame::{DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION};
pub use link::EmulatedLink;
pub use loopback::Loopback;
pub use server::{Limits, Server, ServerConfig, default_max_memory, session_window};
pub use tls::{Fingerprint, Identity};

/// ALPN protocol name both ends insist on.
pub const ALPN: &[u8] = b"secinfer/1";

/// Application error codes carried by a QUIC connection close.
pub mod close_code {
    /// the client finished normally
    pub const DONE: u32 = 0;
    /// the peer broke the protocol (bad frame, reused id, wrong order)
    pub const PROTOCOL: u32 = 1;
    /// refused at the handshake: token, version, model digest or capacity
    pub const REFUSED: u32 = 2;
    /// the server is shutting down
    pub const SHUTDOWN: u32 = 3;
    /// the server failed internally
    pub const INTERNAL: u32 = 4;
    /// the server is at its session limit: try again later (clients retry
    /// with jittered backoff, [`crate::ClientConfig::busy_wait`])
    pub const BUSY: u32 = 5;
    /// the server ended a session idle too long, or past its lifetime
    pub const EXPIRED: u32 = 6;
}
