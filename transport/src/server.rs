//! The QUIC server: accepts connections, authenticates each with its
//! handshake, and drives one `ServerSession` per connection.
//!
//! Each connection is a task; each stream the client opens is a task that
//! reads a frame, answers it, and reads the next. Online requests and the
//! cheap offline steps run on blocking threads under the session's lock; an
//! op's HE evaluation runs on a blocking thread *without* the lock (so the
//! session keeps answering online requests), limited server-wide by
//! [`Limits::concurrent_he_jobs`] (slots taken first come, first served),
//! and streams its reply parts back through a small bounded queue; a job
//! whose client reads slower than it computes gives its slot up while it
//! waits for the reader. When the client leaves, everything of its session
//! is dropped: a running HE job stops at its next reply part.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use secinfer_ot::OtMessage;
use secinfer_protocol::private::{PrivateMessage, PrivateRun};
use secinfer_protocol::{MaskedLinear, ProtocolError, ServerSession};

use crate::TokenSet;
use crate::close_code;
use crate::frame::{
    BOUND_PREFIX, ClientFrame, FrameError, MAX_HELLO_BYTES, PROTOCOL_VERSION, ServerFrame,
    read_body_bytes, read_body_rest, read_frame, read_length, write_frame,
};
use crate::tls::Identity;

/// Server-wide and per-session limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// sessions (connections) at once; further clients are refused with a reason
    pub max_sessions: usize,
    /// largest frame in either direction
    pub max_frame_bytes: usize,
    /// preprocessed inferences (ready plus in flight) per session
    pub max_pending_inferences: usize,
    /// bytes of OT correlations (stored plus a batch's buffers) per session;
    /// below the default (512 MiB) a default client, which keeps up to
    /// 256 MiB and sends requests whose buffers take up to ~222 MiB, may
    /// be refused (`serve` does not accept less)
    pub max_correlation_bytes: u64,
    /// the correlation backends clients may choose (all by default); a
    /// client naming another is refused at its first setup flight, by name
    pub accepted_ot_backends: Vec<secinfer_ot::Backend>,
    /// HE evaluations running at once across all sessions (each uses all cores)
    pub concurrent_he_jobs: usize,
    /// bytes all sessions' HE work (buffered input ciphertexts and running
    /// jobs, estimated from each job's layout) and stored material (keys,
    /// shares, correlations) may take together; work beyond it waits up to
    /// the frame timeout, then is refused
    pub max_memory_bytes: u64,
    /// bytes the frames being read and decoded (each charged
    /// `frame::client_frame_bound` once its kind is known, given back once
    /// decoded) and the sessions' QUIC buffers ([`session_window`] each
    /// way, charged at `Welcome`) may take together; a pool of its own, so
    /// that a session holding HE memory never waits behind HE work to read
    pub max_decoding_bytes: u64,
    /// time a client has to complete the TLS handshake and say hello
    pub handshake_timeout: Duration,
    /// connections not yet welcomed (TLS handshake or hello in progress)
    /// at once: beyond half of it new clients must first prove their
    /// address (QUIC Retry), beyond it they are refused at once
    pub max_handshakes: usize,
    /// a connection silent this long is closed (clients send keep-alives)
    pub idle_timeout: Duration,
    /// a session with no request in progress and none for this long is
    /// ended, keep-alives or not
    pub session_idle_timeout: Duration,
    /// any session is ended this long after it began
    pub max_session_lifetime: Duration,
    /// once a frame has begun, the rest must arrive within this
    pub frame_timeout: Duration,
    /// on shutdown, how long requests in progress may take to finish
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 64,
            max_frame_bytes: crate::DEFAULT_MAX_FRAME_BYTES,
            max_pending_inferences: secinfer_protocol::DEFAULT_MAX_PENDING,
            max_correlation_bytes: secinfer_protocol::DEFAULT_MAX_OT_BYTES,
            accepted_ot_backends: secinfer_ot::Backend::ALL.to_vec(),
            concurrent_he_jobs: 1,
            max_memory_bytes: default_max_memory() / 4 * 3,
            max_decoding_bytes: default_max_memory() / 4,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
            idle_timeout: Duration::from_secs(60),
            session_idle_timeout: Duration::from_secs(300),
            max_session_lifetime: Duration::from_secs(6 * 3600),
            frame_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Half the machine's memory (`MemTotal` in /proc/meminfo), or 4 GiB where
/// that cannot be read: the default [`Limits::max_memory_bytes`].
pub fn default_max_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4 << 30, |kib| kib * 1024 / 2)
}

/// Units of the server-wide memory budget's semaphore.
const MEMORY_UNIT: u64 = 1 << 10;

/// What a server needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// address to listen on (port 0: any free port)
    pub listen: SocketAddr,
    /// the TLS certificate and key
    pub identity: Identity,
    /// accepted API tokens
    pub tokens: TokenSet,
    /// limits
    pub limits: Limits,
    /// send through an emulated link (delay, loss, reordering): tests and
    /// `bench --rtt-ms` only
    pub emulated_link: Option<crate::EmulatedLink>,
}

/// A running server. Dropping it stops it abruptly; [`shutdown`](Self::shutdown)
/// stops it gracefully.
pub struct Server {
    endpoint: quinn::Endpoint,
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    stats: Arc<Stats>,
    /// the HE-work and decoding budgets and their sizes in units
    memory: (Arc<Semaphore>, usize),
    decoding: (Arc<Semaphore>, usize),
}

/// Counters a running server keeps.
#[derive(Debug, Default)]
struct Stats {
    /// sessions whose state exists (authenticated, not yet dropped)
    live: AtomicUsize,
    /// connections being served (including handshakes)
    connections: AtomicUsize,
    /// connections not yet welcomed
    handshakes: AtomicUsize,
    /// HE jobs that have taken a slot and not yet ended
    he_jobs: AtomicUsize,
}

/// What a served model reveals, as the handshake names it.
pub(crate) fn reveal_of<L: MaskedLinear + ?Sized>(linear: &L) -> String {
    linear
        .program()
        .map_or("activations", |p| p.reveal.as_str())
        .to_string()
}

struct Shared<L: ?Sized> {
    linear: Arc<L>,
    digest: String,
    reveal: String,
    tokens: TokenSet,
    limits: Limits,
    sessions: Arc<Semaphore>,
    he_jobs: Arc<Semaphore>,
    /// the memory budgets of HE work and of decoding, in KiB
    memory: Arc<Semaphore>,
    decoding: Arc<Semaphore>,
    stats: Arc<Stats>,
    shutdown: watch::Receiver<bool>,
}

/// Why a session ended, and what the client is told.
#[derive(Debug)]
enum End {
    /// refused at the handshake
    Refused(String),
    /// refused at the handshake for lack of room: the client may retry
    Busy(String),
    /// idle too long or past its lifetime
    Expired(String),
    /// the client broke the protocol or sent a bad frame
    Protocol(String),
    /// the server is shutting down
    Shutdown,
    /// something failed on the server
    Internal(String),
    /// the connection is gone; nobody to tell
    Lost,
}

impl From<FrameError> for End {
    fn from(e: FrameError) -> End {
        match e {
            FrameError::Io(_) => End::Lost,
            other => End::Protocol(other.to_string()),
        }
    }
}

impl From<ProtocolError> for End {
    fn from(e: ProtocolError) -> End {
        End::Protocol(e.to_string())
    }
}

impl Server {
    /// Binds and starts serving `linear` (whose converted files carry
    /// `digest`). Must be called inside a tokio runtime.
    pub fn start<L: MaskedLinear + 'static + ?Sized>(
        config: ServerConfig,
        linear: Arc<L>,
        digest: String,
    ) -> anyhow::Result<Server> {
        if config.limits.accepted_ot_backends.is_empty() {
            return Err(anyhow!(
                "no correlation backend accepted (Limits::accepted_ot_backends is empty): no client of a private-mode model could be served"
            ));
        }
        let windows =
            2 * u64::from(session_window(&config.limits)) * config.limits.max_sessions as u64;
        if windows > config.limits.max_decoding_bytes / 2 {
            return Err(anyhow!(
                "a decoding budget of {} KiB cannot hold {} sessions' connection buffers ({} KiB each, half the budget at most); raise the memory budget or lower the session limit",
                config.limits.max_decoding_bytes >> 10,
                config.limits.max_sessions,
                2 * MIN_SESSION_WINDOW >> 10
            ));
        }
        let crypto = crate::tls::server_crypto(&config.identity)?;
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
            .map_err(|e| anyhow!("TLS configuration unusable for QUIC: {e}"))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        server_config.transport_config(Arc::new(server_transport_config(&config.limits)?));
        let endpoint_config = config.identity.endpoint_config();
        let endpoint = match config.emulated_link {
            None => {
                let runtime =
                    quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime"))?;
                std::net::UdpSocket::bind(config.listen).and_then(|socket| {
                    quinn::Endpoint::new(endpoint_config, Some(server_config), socket, runtime)
                })
            }
            Some(link) => {
                crate::link::endpoint(config.listen, link, endpoint_config, Some(server_config))
                    .map_err(std::io::Error::other)
            }
        }
        .with_context(|| format!("listening on {}", config.listen))?;
        let (tx, rx) = watch::channel(false);
        let stats = Arc::new(Stats::default());
        let memory_units = usize::try_from(config.limits.max_memory_bytes / MEMORY_UNIT)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        let memory = Arc::new(Semaphore::new(memory_units));
        let decoding_units = usize::try_from(config.limits.max_decoding_bytes / MEMORY_UNIT)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        let decoding = Arc::new(Semaphore::new(decoding_units));
        let shared = Arc::new(Shared {
            reveal: reveal_of(&*linear),
            linear,
            digest,
            tokens: config.tokens,
            sessions: Arc::new(Semaphore::new(config.limits.max_sessions)),
            he_jobs: Arc::new(Semaphore::new(config.limits.concurrent_he_jobs.max(1))),
            memory: memory.clone(),
            decoding: decoding.clone(),
            limits: config.limits,
            stats: stats.clone(),
            shutdown: rx,
        });
        let task = tokio::spawn(accept_loop(endpoint.clone(), shared));
        Ok(Server {
            endpoint,
            shutdown: tx,
            task: Some(task),
            stats,
            memory: (memory, memory_units),
            decoding: (decoding, decoding_units),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Sessions whose state still exists on the server.
    pub fn live_sessions(&self) -> usize {
        self.stats.live.load(Ordering::SeqCst)
    }

    /// Connections being served (handshakes included).
    pub fn connections(&self) -> usize {
        self.stats.connections.load(Ordering::SeqCst)
    }

    /// HE jobs that have taken a slot and not yet ended (computing, or
    /// waiting for their reader or to take a slot again).
    pub fn he_jobs(&self) -> usize {
        self.stats.he_jobs.load(Ordering::SeqCst)
    }

    /// Bytes of the HE-work budget ([`Limits::max_memory_bytes`]) taken
    /// now: running and queued HE jobs, and what sessions store.
    pub fn memory_reserved(&self) -> u64 {
        let (pool, units) = &self.memory;
        units.saturating_sub(pool.available_permits()) as u64 * MEMORY_UNIT
    }

    /// Bytes of the decoding budget ([`Limits::max_decoding_bytes`]) taken
    /// now: frames being read and decoded, and sessions' connection
    /// buffers.
    pub fn decoding_reserved(&self) -> u64 {
        let (pool, units) = &self.decoding;
        units.saturating_sub(pool.available_permits()) as u64 * MEMORY_UNIT
    }

    /// Connections not yet welcomed (TLS handshake or hello in progress).
    pub fn handshakes(&self) -> usize {
        self.stats.handshakes.load(Ordering::SeqCst)
    }

    /// Stops accepting, lets every session finish the request it is
    /// answering (up to the grace period), tells clients the server is
    /// shutting down, and waits until the endpoint is idle.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.endpoint
            .close(VarInt::from_u32(close_code::SHUTDOWN), b"server shut down");
        self.endpoint.wait_idle().await;
    }

    /// Serves until Ctrl-C (SIGINT) or, on Unix, SIGTERM (what service
    /// managers and container runtimes send), then shuts down gracefully:
    /// requests in progress finish within the grace period.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
            let name = tokio::select! {
                r = tokio::signal::ctrl_c() => {
                    r.context("listening for Ctrl-C")?;
                    "Ctrl-C"
                }
                _ = term.recv() => "SIGTERM",
            };
            // a closed stderr must not stop the drain
            let _ = writeln!(
                std::io::stderr(),
                "{name}: shutting down, finishing requests in progress"
            );
        }
        #[cfg(not(unix))]
        {
            tokio::signal::ctrl_c()
                .await
                .context("listening for Ctrl-C")?;
            let _ = writeln!(
                std::io::stderr(),
                "Ctrl-C: shutting down, finishing requests in progress"
            );
        }
        self.shutdown().await;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// QUIC settings: windows large enough for ~12 MiB frames, keep-alives on the
/// client side, the idle timeout from the limits, few streams per session,
/// MTU discovery up to [`MAX_PROBED_MTU`]. The server starts each
/// connection narrower ([`server_transport_config`]).
/// Largest UDP payload MTU discovery may probe for. quinn stops at 1452 bytes
/// by default (what an Ethernet path carries); a path that carries more
/// (loopback, jumbo frames: 9000) is found by probing, and an unconfirmed
/// size is never used for data, so a 1500-byte path behaves as before. On
/// loopback 64 KB datagrams mean up to 45x fewer packets: the MNIST
/// MLP bench over QUIC went from 947 to 1,074 predictions/s end to end and
/// from 5,119 to 8,631 online at batch 100.
const MAX_PROBED_MTU: u16 = 65527;

pub(crate) fn transport_config(limits: &Limits) -> anyhow::Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(limits.idle_timeout)
            .map_err(|_| anyhow!("idle timeout {:?} is too long", limits.idle_timeout))?,
    ));
    t.stream_receive_window(VarInt::from_u32(32 << 20));
    t.receive_window(VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_PROBED_MTU);
    t.mtu_discovery_config(Some(mtu));
    t.max_concurrent_bidi_streams(VarInt::from_u32(SESSION_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // no unreliable datagrams: quinn would otherwise buffer up to 1.25 MB
    // of them per connection, outside flow control, before any hello
    t.datagram_receive_buffer_size(None);
    Ok(t)
}

/// Bytes a connection may send before it is welcomed: its hello and slack.
const UNWELCOMED_WINDOW: u32 = 4 * MAX_HELLO_BYTES as u32;
/// Streams a welcomed connection may have open.
const SESSION_STREAMS: u32 = 4;

/// Bytes QUIC may buffer for one welcomed session in each direction: its
/// connection's receive window, and the server's send window. Both are
/// charged to the decoding budget at `Welcome`, so a session's share is a
/// quarter of that budget over `max_sessions` (all sessions' windows
/// together take half of it), between 256 KiB and 64 MiB; a server whose
/// budget cannot give every session the 256 KiB floor refuses to start
/// ([`Server::start`]). With the defaults on a 24 GiB machine that is
/// 12 MiB each way: enough for 300 MB/s at 40 ms.
pub fn session_window(limits: &Limits) -> u32 {
    let share = limits.max_decoding_bytes / 4 / limits.max_sessions.max(1) as u64;
    share.clamp(MIN_SESSION_WINDOW, 64 << 20) as u32
}

/// The smallest [`session_window`].
const MIN_SESSION_WINDOW: u64 = 256 << 10;

/// The server's QUIC settings: a connection starts with one stream and a
/// window for its hello only, so that a client that has not authenticated
/// cannot make the server buffer more; both widen after Welcome.
fn server_transport_config(limits: &Limits) -> anyhow::Result<quinn::TransportConfig> {
    let mut t = transport_config(limits)?;
    t.receive_window(VarInt::from_u32(UNWELCOMED_WINDOW));
    t.send_window(u64::from(session_window(limits)));
    t.max_concurrent_bidi_streams(VarInt::from_u32(1));
    Ok(t)
}

async fn accept_loop<L: MaskedLinear + 'static + ?Sized>(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared<L>>,
) {
    let mut connections = JoinSet::new();
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                // Unwelcomed connections are bounded: past half the bound a
                // client must prove its address first (a Retry costs the
                // server no state), past the bound it is refused.
                let opening = shared.stats.handshakes.load(Ordering::SeqCst);
                let max = shared.limits.max_handshakes;
                if opening >= max {
                    incoming.refuse();
                } else if opening >= max / 2
                    && !incoming.remote_address_validated()
                    && incoming.may_retry()
                {
                    let _ = incoming.retry();
                } else {
                    let opening = Opening::new(shared.stats.clone());
                    connections.spawn(connection(incoming, opening, shared.clone()));
                }
            }
            Some(_) = connections.join_next() => {}
            () = stopping(&mut shutdown) => break,
        }
    }
    // Graceful part: sessions finish the request in hand, then close.
    let grace = shared.limits.shutdown_grace;
    let _ = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.shutdown().await;
}

/// A connection not yet welcomed, counted in [`Stats::handshakes`] until
/// it is welcomed or gone.
struct Opening(Option<Arc<Stats>>);

impl Opening {
    fn new(stats: Arc<Stats>) -> Opening {
        stats.handshakes.fetch_add(1, Ordering::SeqCst);
        Opening(Some(stats))
    }

    fn welcomed(&mut self) {
        if let Some(stats) = self.0.take() {
            stats.handshakes.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        self.welcomed();
    }
}

async fn connection<L: MaskedLinear + 'static + ?Sized>(
    incoming: quinn::Incoming,
    mut opening: Opening,
    shared: Arc<Shared<L>>,
) {
    // Counted until this task ends, however it ends (shutdown aborts it).
    let _counted = Counted::new(&shared.stats, |s| &s.connections);
    // The TLS handshake and the hello share one deadline.
    let deadline = tokio::time::Instant::now() + shared.limits.handshake_timeout;
    if let Ok(Ok(conn)) = tokio::time::timeout_at(deadline, incoming).await {
        let end = session(&conn, deadline, &mut opening, &shared).await;
        let (code, reason) = match end {
            Ok(()) => (close_code::DONE, "done".to_string()),
            Err(End::Refused(m)) => (close_code::REFUSED, m),
            Err(End::Busy(m)) => (close_code::BUSY, m),
            Err(End::Expired(m)) => (close_code::EXPIRED, m),
            Err(End::Protocol(m)) => (close_code::PROTOCOL, m),
            Err(End::Shutdown) => (close_code::SHUTDOWN, "the server is shutting down".into()),
            Err(End::Internal(m)) => (close_code::INTERNAL, m),
            Err(End::Lost) => (close_code::DONE, "connection lost".into()),
        };
        conn.close(VarInt::from_u32(code), truncate(&reason).as_bytes());
    }
}

/// A close reason must fit in one packet.
fn truncate(s: &str) -> String {
    const MAX: usize = 900;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// A session's state; dropping it frees it and updates the live count.
struct SessionState<L: MaskedLinear + ?Sized> {
    session: Mutex<ServerSession<L>>,
    stats: Arc<Stats>,
    /// when the session began
    started: std::time::Instant,
    /// milliseconds after `started` of the last frame read or written
    last_activity: std::sync::atomic::AtomicU64,
    /// requests read and not yet answered
    in_progress: AtomicUsize,
    /// the memory budget held per (batch, op) whose ciphertexts are
    /// arriving, for its whole job (moved to the job when it runs)
    reserved: Mutex<
        std::collections::HashMap<
            (secinfer_protocol::PreprocessingId, secinfer_protocol::OpId),
            tokio::sync::OwnedSemaphorePermit,
        >,
    >,
    /// the HE-work budget held for what the session stores between
    /// requests (`ServerSession::stored_bytes`), brought up to date after
    /// every request by [`settle`]
    stored: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    /// one settle at a time, so that a stale count never gives back what
    /// another stream's settle has just charged
    settling: tokio::sync::Mutex<()>,
    /// bytes of material moved out of the session into private runs still
    /// going (still charged, though the session no longer holds them)
    in_runs: std::sync::atomic::AtomicU64,
    /// signalled when the OT engine, checked out for a correlation batch,
    /// is back in the session (a private batch's start waits for it)
    ot_back: tokio::sync::Notify,
}

impl<L: MaskedLinear + ?Sized> Drop for SessionState<L> {
    fn drop(&mut self) {
        self.stats.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<L: MaskedLinear + ?Sized> SessionState<L> {
    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_activity.fetch_max(ms, Ordering::SeqCst);
    }

    /// Why the session should end now, if it should.
    fn expired(&self, limits: &Limits) -> Option<String> {
        let age = self.started.elapsed();
        if age >= limits.max_session_lifetime {
            return Some(format!(
                "the session reached its maximum lifetime of {:?}; reconnect to go on",
                limits.max_session_lifetime
            ));
        }
        let last = Duration::from_millis(self.last_activity.load(Ordering::SeqCst));
        let idle = age.saturating_sub(last);
        (self.in_progress.load(Ordering::SeqCst) == 0 && idle >= limits.session_idle_timeout).then(
            || {
                format!(
                    "no request for {:?} (the session idle timeout); reconnect to go on",
                    limits.session_idle_timeout
                )
            },
        )
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, ServerSession<L>>, End> {
        self.session
            .lock()
            .map_err(|_| End::Internal("session poisoned by an earlier panic".into()))
    }
}

async fn session<L: MaskedLinear + 'static + ?Sized>(
    conn: &Connection,
    deadline: tokio::time::Instant,
    opening: &mut Opening,
    shared: &Arc<Shared<L>>,
) -> Result<(), End> {
    let limits = &shared.limits;
    let hello = tokio::time::timeout_at(deadline, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|_| End::Lost)?;
        let hello = read_frame::<_, ClientFrame>(&mut recv, MAX_HELLO_BYTES).await?;
        Ok::<_, End>((send, hello))
    })
    .await
    .map_err(|_| {
        End::Refused(format!(
            "no hello within {:?} of connecting",
            limits.handshake_timeout
        ))
    })??;
    let (mut send, hello) = hello;
    let Some((
        ClientFrame::Hello {
            version,
            model_digest,
            reveal,
            token,
        },
        _,
    )) = hello
    else {
        return Err(End::Refused(
            "the first frame of a session must be a hello".into(),
        ));
    };
    // Authentication comes first: nothing about the model is revealed or
    // done for a client without a valid token.
    if !shared.tokens.accepts(&token) {
        return Err(End::Refused(
            "authentication failed: unknown API token".into(),
        ));
    }
    if version != PROTOCOL_VERSION {
        return Err(End::Refused(format!(
            "protocol version mismatch: client speaks {version}, server speaks {PROTOCOL_VERSION}"
        )));
    }
    if reveal != shared.reveal {
        return Err(End::Refused(format!(
            "reveal mode mismatch: the client's model is '{reveal}', the server serves a '{}' model",
            shared.reveal
        )));
    }
    if model_digest != shared.digest {
        return Err(End::Refused(format!(
            "model digest mismatch: the client's model is {model_digest}, the server serves {}; use the client.onnx made with this server.onnx",
            shared.digest
        )));
    }
    let _permit = shared.sessions.clone().try_acquire_owned().map_err(|_| {
        End::Busy(format!(
            "the server is at its limit of {} sessions; try again later",
            limits.max_sessions
        ))
    })?;
    // the connection's buffers, both ways, for the session's life
    let window = session_window(limits);
    let _buffers = shared
        .decoding
        .clone()
        .try_acquire_many_owned((2 * u64::from(window)).div_ceil(MEMORY_UNIT) as u32)
        .map_err(|_| {
            End::Busy(
                "the server's memory budget for frames and connection buffers is taken; try again later"
                    .into(),
            )
        })?;
    write_frame(
        &mut send,
        &ServerFrame::Welcome {
            version: PROTOCOL_VERSION,
            ops: shared.linear.layers().len() as u32,
            reveal: shared.reveal.clone(),
            max_pending: limits.max_pending_inferences as u64,
        },
        MAX_HELLO_BYTES,
    )
    .await?;
    let _ = send.finish();
    opening.welcomed();
    conn.set_receive_window(VarInt::from_u32(window));
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(SESSION_STREAMS));

    let mut session = ServerSession::new(shared.linear.clone());
    session.set_max_pending(limits.max_pending_inferences);
    session.set_max_ot_bytes(limits.max_correlation_bytes);
    session.set_ot_backends(&limits.accepted_ot_backends);
    shared.stats.live.fetch_add(1, Ordering::SeqCst);
    let state = Arc::new(SessionState {
        session: Mutex::new(session),
        stats: shared.stats.clone(),
        started: std::time::Instant::now(),
        last_activity: std::sync::atomic::AtomicU64::new(0),
        in_progress: AtomicUsize::new(0),
        reserved: Mutex::new(std::collections::HashMap::new()),
        stored: Mutex::new(None),
        settling: tokio::sync::Mutex::new(()),
        in_runs: std::sync::atomic::AtomicU64::new(0),
        ot_back: tokio::sync::Notify::new(),
    });
    let mut streams = JoinSet::new();
    let mut shutdown = shared.shutdown.clone();
    // how often idleness and lifetime are checked
    // how often idleness and lifetime are checked: one timer for the whole
    // session (a timer made per loop pass would restart with every stream
    // opened, and a client opening empty streams would never be checked)
    let mut tick = tokio::time::interval(
        limits
            .session_idle_timeout
            .min(limits.max_session_lifetime)
            .min(Duration::from_secs(5))
            / 4,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(why) = state.expired(limits) {
                    streams.abort_all();
                    return Err(End::Expired(why));
                }
            }
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    streams.spawn(stream(send, recv, state.clone(), shared.clone()));
                }
                Err(quinn::ConnectionError::ApplicationClosed(c))
                    if c.error_code == VarInt::from_u32(close_code::DONE) => return Ok(()),
                Err(_) => return Err(End::Lost),
            },
            Some(done) = streams.join_next() => match done {
                Ok(Ok(())) => {}
                Ok(Err(end)) => return Err(end),
                Err(e) => return Err(End::Internal(format!("stream task failed: {e}"))),
            },
            () = stopping(&mut shutdown) => {
                // Each stream finishes the request it is answering, then stops.
                while let Some(done) = streams.join_next().await {
                    if let Ok(Err(end)) = done {
                        return Err(end);
                    }
                }
                return Err(End::Shutdown);
            }
        }
    }
}

async fn stream<L: MaskedLinear + 'static + ?Sized>(
    mut send: SendStream,
    mut recv: RecvStream,
    state: Arc<SessionState<L>>,
    shared: Arc<Shared<L>>,
) -> Result<(), End> {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let frame = tokio::select! {
            f = read_counted(&mut recv, &shared) => f?,
            () = stopping(&mut shutdown) => return Ok(()),
        };
        let Some((frame, _)) = frame else {
            let _ = send.finish();
            return Ok(());
        };
        state.touch();
        state.in_progress.fetch_add(1, Ordering::SeqCst);
        let answered = answer(frame, &mut send, &mut recv, &state, &shared).await;
        let settled = settle(&state, &shared, None).await;
        state.in_progress.fetch_sub(1, Ordering::SeqCst);
        state.touch();
        answered?;
        settled?;
    }
}

/// Reads a client's frame and decodes it, with the most it may take
/// (`frame::client_frame_bound`: its body as it grows, then what decoding
/// may allocate) reserved from the decoding budget once the body's first
/// bytes (its kind) have arrived, and given back once it is decoded. One
/// reservation per frame, taken whole: charging the body as it arrives
/// instead was tried, and under the load test (64 sessions sending 9 MB
/// frames at once) partly received frames held the budget while waiting
/// for more of it, until a third of the clients failed. The whole frame,
/// its wait for the budget included, must arrive within one frame timeout
/// of its first byte, which bounds how long a client that declares a large
/// frame and stalls holds its reservation.
async fn read_counted<L: MaskedLinear + ?Sized>(
    recv: &mut RecvStream,
    shared: &Shared<L>,
) -> Result<Option<(ClientFrame, usize)>, End> {
    let timeout = shared.limits.frame_timeout;
    let Some(len) = read_length(recv, shared.limits.max_frame_bytes, Some(timeout)).await? else {
        return Ok(None);
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let stalled = |_| End::from(FrameError::Stalled(timeout));
    let prefix =
        tokio::time::timeout_at(deadline, read_body_bytes(recv, len.min(BOUND_PREFIX), None))
            .await
            .map_err(stalled)??;
    let bound = crate::frame::client_frame_bound(&prefix, len) as u64;
    let _memory = reserve_by(
        shared,
        Pool::Decoding,
        bound,
        &format!("a frame of {len} bytes"),
        deadline,
    )
    .await?;
    let body = tokio::time::timeout_at(deadline, read_body_rest(recv, prefix, len, None))
        .await
        .map_err(stalled)??;
    Ok(Some((crate::frame::decode(&body)?, len + 4)))
}

/// Writes a frame, giving the client the frame timeout to take it.
async fn write_within<L: MaskedLinear + ?Sized>(
    send: &mut SendStream,
    frame: &ServerFrame,
    shared: &Shared<L>,
) -> Result<(), End> {
    let patience = shared.limits.frame_timeout;
    tokio::time::timeout(
        patience,
        write_frame(send, frame, shared.limits.max_frame_bytes),
    )
    .await
    .map_err(|_| {
        End::Protocol(format!(
            "the client did not take an answer within {patience:?}"
        ))
    })??;
    Ok(())
}

/// Answers one request of a stream.
async fn answer<L: MaskedLinear + 'static + ?Sized>(
    frame: ClientFrame,
    send: &mut SendStream,
    recv: &mut RecvStream,
    state: &Arc<SessionState<L>>,
    shared: &Arc<Shared<L>>,
) -> Result<(), End> {
    {
        match frame {
            ClientFrame::Hello { .. } => {
                return Err(End::Protocol("a session says hello only once".into()));
            }
            ClientFrame::Online(req) => {
                let st = state.clone();
                let out = blocking(move || Ok(st.lock()?.handle(req)?)).await?;
                write_within(send, &ServerFrame::Online(out), shared).await?;
            }
            ClientFrame::OfflineHello(hello) => {
                let st = state.clone();
                blocking(move || Ok(st.lock()?.accept_hello(hello)?)).await?;
                write_within(send, &ServerFrame::OfflineReady, shared).await?;
            }
            ClientFrame::Offline(req) => {
                // The op's whole job (its input ciphertexts waiting in the
                // session, then its working memory) is priced by its layout
                // and reserved from the server's budget in one go when its
                // first message arrives, so that sessions never hold part of
                // what they need while waiting for the rest.
                let key = (req.first_id, req.op);
                let known = state
                    .reserved
                    .lock()
                    .map_err(|_| End::Internal("session poisoned".into()))?
                    .contains_key(&key);
                if !known {
                    let bytes = job_estimate(shared, &req)?;
                    let permit = reserve(shared, Pool::Jobs, bytes, "this op's HE job").await?;
                    state
                        .reserved
                        .lock()
                        .map_err(|_| End::Internal("session poisoned".into()))?
                        .insert(key, permit);
                }
                let st = state.clone();
                let job = blocking(move || Ok(st.lock()?.receive_offline(req)?)).await?;
                if let Some(job) = job {
                    let permit = state
                        .reserved
                        .lock()
                        .map_err(|_| End::Internal("session poisoned".into()))?
                        .remove(&key)
                        .ok_or_else(|| End::Internal("an HE job without its memory".into()))?;
                    run_job(job, send, state, shared, permit).await?;
                }
                write_within(send, &ServerFrame::OfflineDone, shared).await?;
            }
            ClientFrame::Ot(msg) => {
                // A batch's memory (what the session's store gains and the
                // expansion's buffers) is priced from its demand, a setup
                // flight's from the backend's whole setup, and reserved
                // before the work, like an HE job's; what the
                // session keeps is then settled against that reservation
                // and the rest given back. The engine is checked out of the
                // session for the work, so that the session's HE messages
                // are answered while it expands, and always checked back in.
                // Reserve first, then check out: a batch waiting for memory
                // must not hold the engine, which a private batch's start
                // (whose run may be what frees memory) needs.
                let st = state.clone();
                let (msg, bound) = blocking(move || {
                    let bound = st.lock()?.ot_growth_bound(&msg);
                    Ok((msg, bound))
                })
                .await?;
                let what = match msg {
                    OtMessage::Setup { .. } => "this correlation setup flight",
                    _ => "this correlation batch",
                };
                let memory = match bound {
                    0 => None,
                    bytes => Some(reserve(shared, Pool::Jobs, bytes, what).await?),
                };
                let st = state.clone();
                let engine = blocking(move || Ok(st.lock()?.check_out_ot()?)).await?;
                let (engine, reply) = blocking(move || {
                    let mut engine = engine;
                    let reply = engine.handle(msg);
                    Ok((engine, reply))
                })
                .await?;
                let outcome = reply
                    .map(|r| (r, memory))
                    .map_err(|e| End::from(ProtocolError::from(e)));
                let st = state.clone();
                blocking(move || {
                    st.lock()?.check_in_ot(engine);
                    Ok(())
                })
                .await?;
                state.ot_back.notify_waiters();
                let (reply, memory) = outcome?;
                settle(state, shared, memory).await?;
                write_within(send, &ServerFrame::Ot(reply), shared).await?;
            }
            ClientFrame::Private(begin @ PrivateMessage::Begin { .. }) => {
                // The client's pool may have a correlation batch in flight
                // (sent after this batch took its correlations): its start
                // needs the OT engine's store, so it waits for the engine
                // to come back, at most a frame timeout.
                let patience = shared.limits.frame_timeout;
                let deadline = tokio::time::Instant::now() + patience;
                let (run, moved) = loop {
                    let back = state.ot_back.notified();
                    tokio::pin!(back);
                    back.as_mut().enable();
                    let (st, begin) = (state.clone(), begin.clone());
                    let started = blocking(move || {
                        let mut session = st.lock()?;
                        if session.ot_checked_out() {
                            return Ok(None);
                        }
                        let before = session.stored_bytes();
                        let run = session.begin_private(begin)?;
                        Ok(Some((
                            run,
                            before.saturating_sub(session.stored_bytes()) as u64,
                        )))
                    })
                    .await?;
                    if let Some(started) = started {
                        break started;
                    }
                    tokio::time::timeout_at(deadline, back).await.map_err(|_| {
                        End::Busy(format!(
                            "a private batch waited {patience:?} for the session's correlation batch to finish; try again later"
                        ))
                    })?;
                };
                // the run's material stays charged until the run ends
                state.in_runs.fetch_add(moved, Ordering::SeqCst);
                let driven = drive_private(run, send, recv, shared).await;
                state.in_runs.fetch_sub(moved, Ordering::SeqCst);
                driven?;
            }
            ClientFrame::Private(PrivateMessage::Step(m)) => {
                return Err(End::Protocol(format!(
                    "a message of step {} arrived with no private batch in progress",
                    m.step
                )));
            }
        }
    }
    Ok(())
}

/// Drives the server's run of a private batch on one stream: the run
/// computes on a blocking thread until it waits for the client, its messages
/// go out, the client's next message comes in. The server is an active
/// party: it sends without being asked.
async fn drive_private<L: MaskedLinear + 'static + ?Sized>(
    mut run: PrivateRun,
    send: &mut SendStream,
    recv: &mut RecvStream,
    shared: &Arc<Shared<L>>,
) -> Result<(), End> {
    let max = shared.limits.max_frame_bytes;
    let patience = shared.limits.frame_timeout;
    loop {
        let (back, out, done) = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            while let Some(m) = run.poll_transmit() {
                out.push(m);
            }
            let done = run.poll_output();
            (run, out, done)
        })
        .await
        .map_err(|e| End::Internal(format!("private batch worker failed: {e}")))?;
        run = back;
        for m in out {
            let frame = ServerFrame::Private(PrivateMessage::Step(m));
            tokio::time::timeout(patience, write_frame(send, &frame, max))
                .await
                .map_err(|_| {
                    End::Protocol(format!(
                        "the client did not take a private-batch message within {patience:?}"
                    ))
                })??;
        }
        if let Some(done) = done {
            done?;
            return Ok(());
        }
        let frame = tokio::time::timeout(shared.limits.idle_timeout, read_counted(recv, shared))
            .await
            .map_err(|_| {
                End::Protocol(format!(
                    "the client sent nothing for {:?} inside a private batch",
                    shared.limits.idle_timeout
                ))
            })??;
        match frame {
            Some((ClientFrame::Private(PrivateMessage::Step(m)), _)) => run.handle(m),
            Some((other, _)) => {
                return Err(End::Protocol(format!(
                    "a private batch is in progress; the client sent {}",
                    frame_name(&other)
                )));
            }
            None => return Err(End::Lost),
        }
    }
}

fn frame_name(f: &ClientFrame) -> &'static str {
    match f {
        ClientFrame::Hello { .. } => "Hello",
        ClientFrame::Online(_) => "an online request",
        ClientFrame::OfflineHello(_) => "an HE key",
        ClientFrame::Offline(_) => "an HE request",
        ClientFrame::Ot(_) => "a correlations message",
        ClientFrame::Private(PrivateMessage::Begin { .. }) => "a second Begin",
        ClientFrame::Private(PrivateMessage::Step(_)) => "a step",
    }
}

/// The memory estimate of the job a mask request's op will run
/// (`Packing::server_bytes` of the layout both parties choose); a request
/// the layout cannot be chosen for is left for the session to refuse.
fn job_estimate<L: MaskedLinear + ?Sized>(
    shared: &Shared<L>,
    req: &secinfer_protocol::MaskRequest,
) -> Result<u64, End> {
    let layers = shared.linear.layers();
    let params = secinfer_protocol::params_for(layers)?;
    let Some(spec) = layers.get(req.op as usize) else {
        return Ok(0);
    };
    Ok(
        secinfer_protocol::offline::packing_for(&params, spec, req.count as usize)
            .map_or(0, |p| p.server_bytes(&params) as u64),
    )
}

/// The server's two memory budgets.
#[derive(Clone, Copy)]
enum Pool {
    /// HE input ciphertexts waiting in sessions and running HE jobs
    Jobs,
    /// frames being decoded
    Decoding,
}

/// Takes `bytes` of one of the server's memory budgets, waiting up to the
/// frame timeout for work to release it; refuses work that could never
/// fit, or that waited in vain, naming the budget.
async fn reserve<L: ?Sized>(
    shared: &Shared<L>,
    pool: Pool,
    bytes: u64,
    what: &str,
) -> Result<tokio::sync::OwnedSemaphorePermit, End> {
    let deadline = tokio::time::Instant::now() + shared.limits.frame_timeout;
    reserve_by(shared, pool, bytes, what, deadline).await
}

/// [`reserve`], waiting until `deadline` at most.
async fn reserve_by<L: ?Sized>(
    shared: &Shared<L>,
    pool: Pool,
    bytes: u64,
    what: &str,
    deadline: tokio::time::Instant,
) -> Result<tokio::sync::OwnedSemaphorePermit, End> {
    let (semaphore, max, name) = match pool {
        Pool::Jobs => (
            &shared.memory,
            shared.limits.max_memory_bytes,
            "memory budget for HE work and stored material",
        ),
        Pool::Decoding => (
            &shared.decoding,
            shared.limits.max_decoding_bytes,
            "memory budget for frames and connection buffers",
        ),
    };
    let units = bytes.div_ceil(MEMORY_UNIT);
    let mib = |b: u64| format!("{:.1}", b as f64 / (1u64 << 20) as f64);
    if units.saturating_mul(MEMORY_UNIT) > max {
        return Err(End::Protocol(format!(
            "{what} would need ~{} MiB, more than the server's whole {name} of {} MiB (serve --max-memory-mib)",
            mib(bytes),
            mib(max)
        )));
    }
    let units = u32::try_from(units).map_err(|_| End::Internal("budget overflow".into()))?;
    let patience = shared.limits.frame_timeout;
    match tokio::time::timeout_at(deadline, semaphore.clone().acquire_many_owned(units)).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(_)) => Err(End::Shutdown),
        Err(_) => Err(End::Busy(format!(
            "the server's {name} ({} MiB) stayed taken by work in progress for {patience:?}; {what} needs ~{} MiB more; try again later",
            mib(max),
            mib(bytes)
        ))),
    }
}

/// Brings the session's reservation for its stored material
/// ([`SessionState::stored`]) to what the session holds now: a surplus is
/// given back; growth is taken from `donor` (a finished job's reservation,
/// which covered what the job made, or a correlation batch's, reserved
/// before its work) first, then from the HE-work budget, waiting like any
/// other work. Growth comes from a request just answered, so it is at most
/// what that request's decoding, job or batch was charged.
async fn settle<L: MaskedLinear + 'static + ?Sized>(
    state: &Arc<SessionState<L>>,
    shared: &Shared<L>,
    mut donor: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<(), End> {
    let _one_at_a_time = state.settling.lock().await;
    let st = state.clone();
    let bytes = blocking(move || Ok(st.lock()?.stored_bytes() as u64)).await?
        + state.in_runs.load(Ordering::SeqCst);
    let want = usize::try_from(bytes.div_ceil(MEMORY_UNIT))
        .map_err(|_| End::Internal("budget overflow".into()))?;
    if bytes > shared.limits.max_memory_bytes {
        return Err(End::Protocol(format!(
            "this session's stored material would need ~{:.1} MiB in all, more than the server's whole memory budget for HE work and stored material of {:.1} MiB (serve --max-memory-mib)",
            bytes as f64 / f64::from(1 << 20),
            shared.limits.max_memory_bytes as f64 / f64::from(1 << 20)
        )));
    }
    let poisoned = || End::Internal("session poisoned".into());
    let need = {
        let mut held = state.stored.lock().map_err(|_| poisoned())?;
        let have = held.as_ref().map_or(0, |p| p.num_permits());
        if want <= have {
            if let Some(p) = held.as_mut() {
                drop(p.split(have - want));
            }
            return Ok(());
        }
        let mut need = want - have;
        if let Some(d) = donor.as_mut() {
            let take = need.min(d.num_permits());
            if let Some(part) = d.split(take) {
                need -= take;
                match held.as_mut() {
                    Some(p) => p.merge(part),
                    None => *held = Some(part),
                }
            }
        }
        need
    };
    drop(donor);
    if need == 0 {
        return Ok(());
    }
    let more = reserve(
        shared,
        Pool::Jobs,
        need as u64 * MEMORY_UNIT,
        "this session's stored material",
    )
    .await?;
    let mut held = state.stored.lock().map_err(|_| poisoned())?;
    match held.as_mut() {
        Some(p) => p.merge(more),
        None => *held = Some(more),
    }
    Ok(())
}

/// Runs an HE job off the async threads and forwards its reply parts.
/// `memory` is the job's share of the memory budget, held until it ends.
async fn run_job<L: MaskedLinear + 'static + ?Sized>(
    job: secinfer_protocol::OfflineJob,
    send: &mut SendStream,
    state: &Arc<SessionState<L>>,
    shared: &Arc<Shared<L>>,
    memory: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), End> {
    // The permit lives in the job itself, so a job whose client has left
    // still counts against the limit until it has stopped.
    let permit = shared
        .he_jobs
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| End::Shutdown)?;
    let first = job.batch();
    let (tx, mut rx) = mpsc::channel(2);
    let linear = shared.linear.clone();
    let slots = shared.he_jobs.clone();
    let runtime = tokio::runtime::Handle::current();
    // The job holds the session alive (its memory is the session's) until it ends.
    let keep = state.clone();
    let counted = Counted::new(&shared.stats, |s| &s.he_jobs);
    let handle = tokio::task::spawn_blocking(move || {
        let _counted = counted;
        let _keep = keep;
        let mut permit = Some(permit);
        let gone = || ProtocolError::Model("the client is gone".into());
        let product = job.run(&*linear, &mut |reply| match tx.try_send(reply) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(gone()),
            Err(mpsc::error::TrySendError::Full(reply)) => {
                // The client reads slower than the job computes: the job
                // slot goes to other sessions' work while this one waits
                // for its reader, and is queued for again (behind them)
                // once the part is taken. The job's memory stays reserved.
                drop(permit.take());
                tx.blocking_send(reply).map_err(|_| gone())?;
                let again = runtime.block_on(slots.clone().acquire_owned());
                permit = Some(
                    again
                        .map_err(|_| ProtocolError::Model("the server is shutting down".into()))?,
                );
                Ok(())
            }
        });
        (product, memory)
    });
    let mut sent = Ok(());
    // A client that stops reading stalls its own job only (the job lets
    // its slot go while it waits), and must still take each reply part
    // within the frame timeout.
    let patience = shared.limits.frame_timeout;
    while let Some(reply) = rx.recv().await {
        let frame = ServerFrame::OfflineReply(reply);
        let write = write_frame(send, &frame, shared.limits.max_frame_bytes);
        match tokio::time::timeout(patience, write).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                sent = Err(End::from(e));
                break;
            }
            Err(_) => {
                sent = Err(End::Protocol(format!(
                    "the client did not take an offline reply within {patience:?}"
                )));
                break;
            }
        }
    }
    drop(rx);
    let product = handle
        .await
        .map_err(|e| End::Internal(format!("HE job failed: {e}")));
    let (product, memory) = match product {
        Ok((p, m)) => (Ok(p), Some(m)),
        Err(e) => (Err(e), None),
    };
    let st = state.clone();
    match (sent, product) {
        (Ok(()), Ok(Ok(product))) => {
            blocking(move || Ok(st.lock()?.complete_offline(product)?)).await?;
            // the shares `s` the job made stay with the session: they are
            // charged from the job's own reservation first
            settle(state, shared, memory).await
        }
        (sent, product) => {
            let _ = blocking(move || {
                st.lock()?.abort_offline(first);
                Ok(())
            })
            .await;
            sent?;
            match product? {
                Err(e) => Err(e.into()),
                Ok(_) => Err(End::Internal("HE job result lost".into())),
            }
        }
    }
}

/// One unit of a server counter, held until dropped (however the task
/// holding it ends).
struct Counted {
    stats: Arc<Stats>,
    counter: fn(&Stats) -> &AtomicUsize,
}

impl Counted {
    fn new(stats: &Arc<Stats>, counter: fn(&Stats) -> &AtomicUsize) -> Counted {
        counter(stats).fetch_add(1, Ordering::SeqCst);
        Counted {
            stats: stats.clone(),
            counter,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        (self.counter)(&self.stats).fetch_sub(1, Ordering::SeqCst);
    }
}

/// Resolves once shutdown is requested (or the server is gone).
async fn stopping(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, End> + Send + 'static,
) -> Result<T, End> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| End::Internal(format!("worker failed: {e}")))?
}
