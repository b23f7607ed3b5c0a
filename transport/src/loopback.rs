//! A server on 127.0.0.1 in the same process, for `bench`, `demo` and the
//! tests: a fresh self-signed certificate and a fresh token every time, the
//! server on its own runtime, and clients that pin that certificate. The
//! traffic goes through the real QUIC and TLS stack over the loopback
//! interface.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secinfer_protocol::MaskedLinear;

use crate::auth::generate_token;
use crate::{
    ClientConfig, Fingerprint, Identity, Limits, QuicChannel, Server, ServerConfig, TokenSet, Trust,
};

/// A running loopback server. Dropping it shuts the server down gracefully.
pub struct Loopback {
    runtime: tokio::runtime::Runtime,
    server: Option<Server>,
    addr: std::net::SocketAddr,
    fingerprint: Fingerprint,
    token: String,
    reveal: String,
    link: Option<crate::EmulatedLink>,
}

impl Loopback {
    /// Serves `linear` (converted files carrying `digest`) on an ephemeral port.
    pub fn start<L: MaskedLinear + 'static + ?Sized>(
        linear: Arc<L>,
        digest: &str,
        limits: Limits,
    ) -> anyhow::Result<Loopback> {
        Loopback::start_over(linear, digest, limits, None)
    }

    /// [`Loopback::start`] with both ends sending through an emulated link
    /// (`bench --rtt-ms`, the fault tests); its clients use it too.
    pub fn start_over<L: MaskedLinear + 'static + ?Sized>(
        linear: Arc<L>,
        digest: &str,
        limits: Limits,
        link: Option<crate::EmulatedLink>,
    ) -> anyhow::Result<Loopback> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("secinfer-quic-server")
            .enable_all()
            .build()
            .context("starting the server's network runtime")?;
        let reveal = crate::server::reveal_of(&*linear);
        let identity = Identity::self_signed(&["localhost", "127.0.0.1"])?;
        let fingerprint = identity.fingerprint();
        let token = generate_token()?;
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse()?,
            identity,
            tokens: TokenSet::new([token.as_str()])?,
            limits,
            emulated_link: link,
        };
        let server = {
            let _guard = runtime.enter();
            Server::start(config, linear, digest.to_string())?
        };
        let addr = server.local_addr()?;
        Ok(Loopback {
            runtime,
            server: Some(server),
            addr,
            fingerprint,
            token,
            reveal,
            link,
        })
    }

    /// The server's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// The server's certificate fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The token the server accepts.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The server.
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("server present until drop")
    }

    /// A client configuration that pins this server and carries its token.
    pub fn client_config(&self, model_digest: &str) -> ClientConfig {
        ClientConfig {
            emulated_link: self.link,
            ..ClientConfig::new(
                &self.addr.to_string(),
                Trust::Fingerprint(self.fingerprint),
                &self.token,
                model_digest,
                &self.reveal,
            )
        }
    }

    /// Connects a client for a model with `model_digest`.
    pub fn connect(&self, model_digest: &str) -> anyhow::Result<QuicChannel> {
        QuicChannel::connect(&self.client_config(model_digest))
    }

    /// Runs `f` on the server's runtime (tests use it to poll state).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await;
            });
        }
    }
}
