//! The QUIC client: a [`QuicChannel`] is one authenticated session with a
//! server and implements the protocol crate's blocking `Channel`, so the
//! client model, the preprocessing pool and the bench use it unchanged.
//!
//! It owns a small tokio runtime (one worker thread, which keeps the
//! connection alive while the caller computes) and three streams: one for
//! online round trips (and private runs), one for the HE offline phase and
//! one for correlations, so that a pool makes both kinds of material at
//! once; each is used by one call at a time. Frame bytes are counted per
//! phase and direction.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use quinn::{Connection, RecvStream, SendStream, VarInt};

use secinfer_ot::OtMessage;
use secinfer_protocol::private::PrivateMessage;
use secinfer_protocol::{
    Channel, MaskRequest, MaskedInput, MaskedOutput, OfflineHello, ProductReply, Traffic,
};

use crate::close_code;
use crate::frame::{
    ClientFrame, FrameError, MAX_HELLO_BYTES, PROTOCOL_VERSION, ServerFrame, read_frame,
    write_frame,
};
use crate::tls::Fingerprint;

/// How the client decides the server is the right one.
#[derive(Debug, Clone)]
pub enum Trust {
    /// exactly the certificate with this SHA-256 (as `serve` prints it)
    Fingerprint(Fingerprint),
    /// any certificate for the server's name issued by a CA in this PEM file
    CaFile(PathBuf),
}

/// What a client needs to connect.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the server
    pub server: String,
    /// name checked in the certificate (CA trust); default: the host part
    pub server_name: Option<String>,
    /// how the server is trusted
    pub trust: Trust,
    /// API token
    pub token: String,
    /// digest of the client model (`ClientModel::digest`)
    pub model_digest: String,
    /// what the client model reveals (checked against the server's)
    pub reveal: String,
    /// largest frame in either direction (the server's limit should match)
    pub max_frame_bytes: usize,
    /// how long to wait for the connection and handshake
    pub connect_timeout: Duration,
    /// how long to keep retrying, with jittered exponential backoff, while
    /// the server says it is at its session limit
    pub busy_wait: Duration,
    /// bytes the server may send on one stream before the client has read
    /// them (the connection's window is twice this); smaller saves memory
    /// on small clients, larger helps on long round trips
    pub receive_window: u32,
    /// send through an emulated link (delay, loss, reordering): tests and
    /// `bench --rtt-ms` only
    pub emulated_link: Option<crate::EmulatedLink>,
    /// longest wait for the whole answer to one request (an online round
    /// trip, a chunk of the offline phase with all its reply parts, a
    /// message of a private batch): a server that stops making progress
    /// without closing the connection is given up on
    pub request_timeout: Duration,
}

impl ClientConfig {
    /// A configuration with default limits.
    pub fn new(
        server: &str,
        trust: Trust,
        token: &str,
        model_digest: &str,
        reveal: &str,
    ) -> ClientConfig {
        ClientConfig {
            server: server.to_string(),
            server_name: None,
            trust,
            token: token.to_string(),
            model_digest: model_digest.to_string(),
            reveal: reveal.to_string(),
            max_frame_bytes: crate::DEFAULT_MAX_FRAME_BYTES,
            connect_timeout: Duration::from_secs(20),
            busy_wait: Duration::from_secs(300),
            receive_window: 32 << 20,
            emulated_link: None,
            request_timeout: Duration::from_secs(15 * 60),
        }
    }
}

type Stream = (SendStream, RecvStream);

/// How often an idle client pings the server; servers' idle timeouts must be
/// longer (the `serve` command insists on at least 5 s).
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// An authenticated session with a secinfer server over QUIC.
pub struct QuicChannel {
    runtime: tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
    conn: Connection,
    online: Mutex<Option<Stream>>,
    offline: Mutex<Option<Stream>>,
    /// correlations have a stream of their own, so that they are made while
    /// an HE batch runs
    correlations: Mutex<Option<Stream>>,
    max_frame: usize,
    /// online up, online down, offline up, offline down, OT up, OT down
    bytes: [AtomicU64; 6],
    server_ops: u32,
    max_pending: u64,
    request_timeout: Duration,
}

impl std::fmt::Debug for QuicChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuicChannel({})", self.conn.remote_address())
    }
}

/// A QUIC connection that has not said hello
/// ([`QuicChannel::connect_without_hello_for_tests`]).
#[doc(hidden)]
pub struct UnwelcomedForTests {
    runtime: tokio::runtime::Runtime,
    _endpoint: quinn::Endpoint,
    conn: Connection,
    streams: Mutex<Vec<Stream>>,
}

impl UnwelcomedForTests {
    /// How many of `n` streams the server lets this connection open within
    /// `patience` (each with one byte sent, so that the server sees it;
    /// they stay open).
    pub fn streams_opened(&self, n: usize, patience: Duration) -> usize {
        let mut opened = Vec::new();
        self.runtime.block_on(async {
            let _ = tokio::time::timeout(patience, async {
                while opened.len() < n {
                    let Ok((mut send, recv)) = self.conn.open_bi().await else {
                        return;
                    };
                    let _ = send.write_all(&[0]).await;
                    opened.push((send, recv));
                }
            })
            .await;
        });
        let count = opened.len();
        if let Ok(mut streams) = self.streams.lock() {
            streams.extend(opened);
        }
        count
    }

    /// Says hello with protocol `version` (and the rest as `config` has it)
    /// and returns the server's verdict: its answer, or why it closed.
    pub fn hello_with_version(
        &self,
        config: &ClientConfig,
        version: u32,
    ) -> anyhow::Result<String> {
        let conn = &self.conn;
        self.runtime.block_on(async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(explain)?;
            let hello = ClientFrame::Hello {
                version,
                model_digest: config.model_digest.clone(),
                reveal: config.reveal.clone(),
                token: config.token.clone(),
            };
            if let Err(e) = write_frame(&mut send, &hello, MAX_HELLO_BYTES).await {
                return Err(frame_err_wait(conn, e).await);
            }
            let _ = send.finish();
            match read_frame::<_, ServerFrame>(&mut recv, MAX_HELLO_BYTES).await {
                Ok(Some((frame, _))) => Ok(format!("{frame:?}")),
                Ok(None) => Err(closed_reason(conn).await),
                Err(e) => Err(frame_err_wait(conn, e).await),
            }
        })
    }

    /// Why the server closed the connection, if it does within `patience`.
    pub fn closed_within(&self, patience: Duration) -> Option<String> {
        self.runtime.block_on(async {
            tokio::time::timeout(patience, self.conn.closed())
                .await
                .ok()
                .map(|e| format!("{:#}", explain(e)))
        })
    }
}

/// The session is gone through no fault of the request: the server shut
/// down, restarted or stopped answering, or the session expired. A new
/// connection (and new offline material) may succeed; `predict` reconnects.
#[derive(Debug)]
pub struct ConnectionLost(pub String);

impl std::fmt::Display for ConnectionLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectionLost {}

/// The server refused the session for lack of room (its reason).
#[derive(Debug)]
struct Busy(String);

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the server refused the session: {}", self.0)
    }
}

impl std::error::Error for Busy {}

/// First wait before retrying a busy server; doubled per attempt up to
/// [`BUSY_BACKOFF_MAX`], each wait drawn uniformly from half to all of it
/// so that clients turned away together do not return together.
const BUSY_BACKOFF_START: Duration = Duration::from_millis(250);
const BUSY_BACKOFF_MAX: Duration = Duration::from_secs(8);

/// Turns a connection-level failure into what the user should read.
fn explain(e: quinn::ConnectionError) -> anyhow::Error {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason);
            let code = c.error_code.into_inner();
            match code as u32 {
                close_code::REFUSED => anyhow!("the server refused the session: {reason}"),
                close_code::SHUTDOWN => anyhow::Error::new(ConnectionLost(
                    "the server is shutting down".into(),
                )),
                close_code::EXPIRED => anyhow::Error::new(ConnectionLost(format!(
                    "the server ended the session: {reason}"
                ))),
                close_code::BUSY => anyhow::Error::new(Busy(reason.into_owned())),
                close_code::PROTOCOL => anyhow!("the server closed the session: {reason}"),
                _ => anyhow!("the server closed the session (code {code}): {reason}"),
            }
        }
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            anyhow::Error::new(Busy(
                "too many connections are opening at once; try again later".into(),
            ))
        }
        // what a client sees when the server ends a handshake it could not
        // finish within its deadline (an overloaded server): try again
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::APPLICATION_ERROR =>
        {
            anyhow::Error::new(Busy(
                "the server closed the connection during the handshake (overloaded?); try again later".into(),
            ))
        }
        quinn::ConnectionError::TimedOut => anyhow::Error::new(ConnectionLost(
            "the server stopped answering (idle timeout)".into(),
        )),
        quinn::ConnectionError::Reset => anyhow::Error::new(ConnectionLost(
            "the server no longer knows this connection (it restarted?)".into(),
        )),
        other => anyhow!("connection failed: {other}"),
    }
}

impl QuicChannel {
    /// Connects, checks the server's certificate and performs the handshake;
    /// while the server is at its session limit, retries with jittered
    /// exponential backoff for up to [`ClientConfig::busy_wait`].
    pub fn connect(config: &ClientConfig) -> anyhow::Result<QuicChannel> {
        let start = std::time::Instant::now();
        let mut backoff = BUSY_BACKOFF_START;
        loop {
            match QuicChannel::connect_once(config) {
                Err(e) if e.downcast_ref::<Busy>().is_some() => {
                    let wait = backoff.mul_f64(0.5 + 0.5 * rand::random::<f64>());
                    if start.elapsed() + wait > config.busy_wait {
                        return Err(e.context(format!(
                            "still at its session limit after {:.0} s of retrying",
                            start.elapsed().as_secs_f64()
                        )));
                    }
                    std::thread::sleep(wait);
                    backoff = (backoff * 2).min(BUSY_BACKOFF_MAX);
                }
                other => return other,
            }
        }
    }

    /// A runtime and an endpoint set up for `config`, and the server's
    /// address and name.
    fn endpoint(
        config: &ClientConfig,
    ) -> anyhow::Result<(tokio::runtime::Runtime, quinn::Endpoint, SocketAddr, String)> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("secinfer-quic-client")
            .enable_all()
            .build()
            .context("starting the client's network runtime")?;
        let addr: SocketAddr = config
            .server
            .to_socket_addrs()
            .with_context(|| format!("resolving the server address '{}'", config.server))?
            .next()
            .ok_or_else(|| anyhow!("'{}' resolves to no address", config.server))?;
        let name = match &config.server_name {
            Some(n) => n.clone(),
            None => host_part(&config.server),
        };
        let crypto = crate::tls::client_crypto(&config.trust)?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
            .map_err(|e| anyhow!("TLS configuration unusable for QUIC: {e}"))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = crate::server::transport_config(&crate::Limits::default())?;
        transport.keep_alive_interval(Some(KEEP_ALIVE));
        transport.stream_receive_window(VarInt::from_u32(config.receive_window));
        transport.receive_window(VarInt::from_u64(2 * u64::from(config.receive_window))?);
        client_config.transport_config(Arc::new(transport));
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse()?
        } else {
            "0.0.0.0:0".parse()?
        };
        let mut endpoint = {
            let _guard = runtime.enter();
            match config.emulated_link {
                None => quinn::Endpoint::client(bind).context("opening a UDP socket")?,
                Some(link) => {
                    crate::link::endpoint(bind, link, quinn::EndpointConfig::default(), None)?
                }
            }
        };
        endpoint.set_default_client_config(client_config);
        Ok((runtime, endpoint, addr, name))
    }

    fn connect_once(config: &ClientConfig) -> anyhow::Result<QuicChannel> {
        let (runtime, endpoint, addr, name) = QuicChannel::endpoint(config)?;
        let (conn, ops, max_pending) = runtime.block_on(async {
            let connecting = endpoint
                .connect(addr, &name)
                .with_context(|| format!("connecting to {addr}"))?;
            let handshake = async {
                let conn = connecting.await.map_err(|e| match e {
                    quinn::ConnectionError::TransportError(t) => anyhow!(
                        "TLS handshake with {addr} failed: {t}"
                    ),
                    other => explain(other),
                })?;
                let (mut send, mut recv) = conn.open_bi().await.map_err(explain)?;
                let hello = ClientFrame::Hello {
                    version: PROTOCOL_VERSION,
                    model_digest: config.model_digest.clone(),
                    reveal: config.reveal.clone(),
                    token: config.token.clone(),
                };
                if let Err(e) = write_frame(&mut send, &hello, MAX_HELLO_BYTES).await {
                    return Err(frame_err_wait(&conn, e).await);
                }
                let _ = send.finish();
                match read_frame::<_, ServerFrame>(&mut recv, MAX_HELLO_BYTES).await {
                    Ok(Some((
                        ServerFrame::Welcome {
                            version,
                            ops,
                            reveal,
                            max_pending,
                        },
                        _,
                    ))) => {
                        if version != PROTOCOL_VERSION {
                            bail!(
                                "protocol version mismatch: server speaks {version}, client {PROTOCOL_VERSION}"
                            );
                        }
                        if reveal != config.reveal {
                            bail!(
                                "reveal mode mismatch: the server serves a '{reveal}' model, the client's model is '{}'",
                                config.reveal
                            );
                        }
                        Ok((conn, ops, max_pending))
                    }
                    Ok(Some((other, _))) => bail!("unexpected first answer {other:?}"),
                    Ok(None) => Err(closed_reason(&conn).await),
                    Err(e) => Err(frame_err_wait(&conn, e).await),
                }
            };
            let (conn, ops, max_pending) = tokio::time::timeout(config.connect_timeout, handshake)
                .await
                .map_err(|_| {
                    anyhow!(
                        "no answer from {addr} within {:?} (is the server running, and is UDP reachable?)",
                        config.connect_timeout
                    )
                })??;
            Ok::<_, anyhow::Error>((conn, ops, max_pending))
        })?;
        Ok(QuicChannel {
            runtime,
            endpoint,
            conn,
            online: Mutex::new(None),
            offline: Mutex::new(None),
            correlations: Mutex::new(None),
            max_frame: config.max_frame_bytes,
            bytes: Default::default(),
            server_ops: ops,
            max_pending,
            request_timeout: config.request_timeout,
        })
    }

    /// SecureLinear ops the server's model has.
    pub fn server_ops(&self) -> u32 {
        self.server_ops
    }

    /// Packets QUIC has declared lost on this connection so far (the link
    /// tests check that their losses happen).
    pub fn lost_packets(&self) -> u64 {
        self.conn.stats().path.lost_packets
    }

    /// Ends the session politely (the server frees it at once); dropping
    /// the channel does the same.
    pub fn close(self) {
        drop(self);
    }

    /// Drops the connection at once, without finishing anything in progress
    /// (calls blocked on it return an error).
    pub fn abort(&self) {
        self.conn
            .close(VarInt::from_u32(close_code::INTERNAL), b"client aborted");
    }

    /// Completes the TLS handshake and says nothing: a connection as a
    /// client that never authenticates holds it. Only for tests of how the
    /// server bounds such connections.
    #[doc(hidden)]
    pub fn connect_without_hello_for_tests(
        config: &ClientConfig,
    ) -> anyhow::Result<UnwelcomedForTests> {
        let (runtime, endpoint, addr, name) = QuicChannel::endpoint(config)?;
        let conn = runtime.block_on(async {
            let connecting = endpoint
                .connect(addr, &name)
                .with_context(|| format!("connecting to {addr}"))?;
            connecting.await.map_err(explain)
        })?;
        Ok(UnwelcomedForTests {
            runtime,
            _endpoint: endpoint,
            conn,
            streams: Mutex::new(Vec::new()),
        })
    }

    /// Sends `bytes` as they are on a new stream and returns the server's
    /// verdict: its first frame, or the reason it closed the session. Only
    /// for tests of how the server treats malformed traffic.
    #[doc(hidden)]
    pub fn send_raw_for_tests(&self, bytes: &[u8]) -> anyhow::Result<String> {
        self.send_raw_inner(bytes, true)
    }

    /// As [`QuicChannel::send_raw_for_tests`], leaving the stream open (a
    /// peer that stops in the middle of a frame).
    #[doc(hidden)]
    pub fn send_raw_unfinished_for_tests(&self, bytes: &[u8]) -> anyhow::Result<String> {
        self.send_raw_inner(bytes, false)
    }

    fn send_raw_inner(&self, bytes: &[u8], finish: bool) -> anyhow::Result<String> {
        let conn = &self.conn;
        self.runtime.block_on(async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(explain)?;
            if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut send, bytes).await {
                // a stream the server stopped: its close reason says why
                return Err(frame_err_wait(conn, e.into()).await);
            }
            if finish {
                let _ = send.finish();
            }
            match read_frame::<_, ServerFrame>(&mut recv, self.max_frame).await {
                Ok(Some((frame, _))) => Ok(format!("{frame:?}")),
                Ok(None) => Err(closed_reason(conn).await),
                Err(e) => Err(frame_err_wait(conn, e).await),
            }
        })
    }

    /// Runs one request's exchange on the channel's runtime, giving up after
    /// [`ClientConfig::request_timeout`].
    fn within_request_timeout<T>(
        &self,
        f: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let limit = self.request_timeout;
        self.runtime.block_on(async {
            tokio::time::timeout(limit, f).await.map_err(|_| {
                anyhow!("the server did not answer within {limit:?} (the client's request timeout)")
            })?
        })
    }

    /// Sends `msg` on the stream in `slot` (opening it first if needed) and
    /// reads answers with `on_answer` until it returns `true`.
    fn exchange(
        &self,
        slot: &Mutex<Option<Stream>>,
        msg: ClientFrame,
        counters: (usize, usize),
        on_answer: &mut dyn FnMut(ServerFrame) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let mut guard = slot
            .lock()
            .map_err(|_| anyhow!("stream poisoned by an earlier panic"))?;
        let max = self.max_frame;
        let conn = &self.conn;
        let result = self.within_request_timeout(async {
            if guard.is_none() {
                *guard = Some(conn.open_bi().await.map_err(explain)?);
            }
            let (send, recv) = guard.as_mut().ok_or_else(|| anyhow!("no stream"))?;
            let n = match write_frame(send, &msg, max).await {
                Ok(n) => n,
                // a stream the server stopped: its close reason says why
                Err(e) => return Err(frame_err_wait(conn, e).await),
            };
            self.bytes[counters.0].fetch_add(n as u64, Ordering::Relaxed);
            loop {
                match read_frame::<_, ServerFrame>(recv, max).await {
                    Ok(Some((frame, n))) => {
                        self.bytes[counters.1].fetch_add(n as u64, Ordering::Relaxed);
                        if on_answer(frame)? {
                            return Ok(());
                        }
                    }
                    Ok(None) => return Err(closed_reason(conn).await),
                    Err(e) => return Err(frame_err_wait(conn, e).await),
                }
            }
        });
        if result.is_err() {
            // Answers may still be on their way on this stream: never read
            // them as answers to a later message. Dropping the stream stops
            // it; the server then ends the session.
            *guard = None;
        }
        result
    }
}

impl Drop for QuicChannel {
    fn drop(&mut self) {
        if self.conn.close_reason().is_none() {
            self.conn
                .close(VarInt::from_u32(close_code::DONE), b"client done");
        }
        // Let the runtime send the close before it stops, so the server frees
        // the session now rather than at its idle timeout.
        if tokio::runtime::Handle::try_current().is_err() {
            let endpoint = self.endpoint.clone();
            self.runtime.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
            });
        }
    }
}

fn host_part(server: &str) -> String {
    let host = match server.rsplit_once(':') {
        Some((h, _)) => h,
        None => server,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// A frame error, with the server's close reason if that is the cause.
fn frame_err(conn: &Connection, e: FrameError) -> anyhow::Error {
    match (conn.close_reason(), e) {
        (Some(reason), _) => explain(reason),
        (None, e @ (FrameError::Io(_) | FrameError::Truncated)) => {
            anyhow::Error::new(ConnectionLost(e.to_string()))
        }
        (None, e) => anyhow!("{e}"),
    }
}

/// As [`frame_err`], waiting briefly for the close reason to arrive.
async fn frame_err_wait(conn: &Connection, e: FrameError) -> anyhow::Error {
    if matches!(e, FrameError::Io(_) | FrameError::Truncated) {
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    }
    frame_err(conn, e)
}

/// The stream ended: the server must have closed the session.
async fn closed_reason(conn: &Connection) -> anyhow::Error {
    match tokio::time::timeout(Duration::from_secs(2), conn.closed()).await {
        Ok(reason) => explain(reason),
        Err(_) => anyhow!("the server ended the stream without an answer"),
    }
}

fn unexpected(what: &str, got: &ServerFrame) -> anyhow::Error {
    let name = match got {
        ServerFrame::Welcome { .. } => "Welcome",
        ServerFrame::Online(_) => "Online",
        ServerFrame::OfflineReady => "OfflineReady",
        ServerFrame::OfflineReply(_) => "OfflineReply",
        ServerFrame::OfflineDone => "OfflineDone",
        ServerFrame::Ot(_) => "Ot",
        ServerFrame::Private(_) => "Private",
    };
    anyhow!("protocol error: expected {what}, the server sent {name}")
}

impl Channel for QuicChannel {
    fn max_pending(&self) -> Option<usize> {
        Some(usize::try_from(self.max_pending).unwrap_or(usize::MAX))
    }

    fn round_trip(&self, request: MaskedInput) -> anyhow::Result<MaskedOutput> {
        let mut out = None;
        self.exchange(
            &self.online,
            ClientFrame::Online(request),
            (0, 1),
            &mut |frame| match frame {
                ServerFrame::Online(o) => {
                    out = Some(o);
                    Ok(true)
                }
                other => Err(unexpected("an online answer", &other)),
            },
        )?;
        out.ok_or_else(|| anyhow!("no online answer"))
    }

    fn hello(&self, hello: OfflineHello) -> anyhow::Result<()> {
        self.exchange(
            &self.offline,
            ClientFrame::OfflineHello(hello),
            (2, 3),
            &mut |frame| match frame {
                ServerFrame::OfflineReady => Ok(true),
                other => Err(unexpected("the key's acknowledgement", &other)),
            },
        )
    }

    fn offline(
        &self,
        request: MaskRequest,
        on_reply: &mut dyn FnMut(ProductReply) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.exchange(
            &self.offline,
            ClientFrame::Offline(request),
            (2, 3),
            &mut |frame| match frame {
                ServerFrame::OfflineReply(r) => on_reply(r).map(|()| false),
                ServerFrame::OfflineDone => Ok(true),
                other => Err(unexpected("an offline reply", &other)),
            },
        )
    }

    fn ot(&self, message: OtMessage) -> anyhow::Result<Option<OtMessage>> {
        let mut out = None;
        self.exchange(
            &self.correlations,
            ClientFrame::Ot(message),
            (4, 5),
            &mut |frame| match frame {
                ServerFrame::Ot(reply) => {
                    out = Some(reply);
                    Ok(true)
                }
                other => Err(unexpected("a correlations answer", &other)),
            },
        )?;
        out.ok_or_else(|| anyhow!("no correlations answer"))
    }

    fn send_private(&self, message: PrivateMessage) -> anyhow::Result<()> {
        let mut guard = self
            .online
            .lock()
            .map_err(|_| anyhow!("stream poisoned by an earlier panic"))?;
        let (max, conn) = (self.max_frame, &self.conn);
        let result = self.runtime.block_on(async {
            if guard.is_none() {
                *guard = Some(conn.open_bi().await.map_err(explain)?);
            }
            let (send, _) = guard.as_mut().ok_or_else(|| anyhow!("no stream"))?;
            let n = match write_frame(send, &ClientFrame::Private(message), max).await {
                Ok(n) => n,
                Err(e) => return Err(frame_err_wait(conn, e).await),
            };
            self.bytes[0].fetch_add(n as u64, Ordering::Relaxed);
            Ok(())
        });
        if result.is_err() {
            *guard = None;
        }
        result
    }

    fn recv_private(&self) -> anyhow::Result<PrivateMessage> {
        let mut guard = self
            .online
            .lock()
            .map_err(|_| anyhow!("stream poisoned by an earlier panic"))?;
        let (max, conn) = (self.max_frame, &self.conn);
        let result = self.within_request_timeout(async {
            let (_, recv) = guard
                .as_mut()
                .ok_or_else(|| anyhow!("no private batch is in progress"))?;
            match read_frame::<_, ServerFrame>(recv, max).await {
                Ok(Some((ServerFrame::Private(m), n))) => {
                    self.bytes[1].fetch_add(n as u64, Ordering::Relaxed);
                    Ok(m)
                }
                Ok(Some((other, _))) => Err(unexpected("a private-batch message", &other)),
                Ok(None) => Err(closed_reason(conn).await),
                Err(e) => Err(frame_err_wait(conn, e).await),
            }
        });
        if result.is_err() {
            *guard = None;
        }
        result
    }

    fn max_message_bytes(&self) -> usize {
        self.max_frame
    }

    fn traffic(&self) -> Traffic {
        let b = |i: usize| self.bytes[i].load(Ordering::Relaxed);
        Traffic {
            online_up: b(0),
            online_down: b(1),
            offline_up: b(2),
            offline_down: b(3),
            ot_up: b(4),
            ot_down: b(5),
        }
    }
}
