//! QUIC transport between secinfer clients and servers: **not implemented
//! yet**. This crate is a placeholder in the workspace layout; the QUIC issue
//! (quinn + rustls: framing, TLS, pinning, auth, limits) fills it in. Until
//! then client and server sessions talk through the in-memory channel of
//! `secinfer-tract-ext`, and every report says `"transport": "memory"`.
#![forbid(unsafe_code)]
