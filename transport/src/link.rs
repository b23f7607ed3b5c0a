//! An emulated network link, for tests and `bench --rtt-ms`: a UDP socket
//! that delays every datagram it sends by a fixed one-way time, drops a
//! fraction of them and sends some late (out of order). This kernel has no
//! netem, so the conditions are made here, between quinn and the real
//! socket. Both ends of a loopback pair use it, so a one-way delay of
//! `d` makes a round-trip time of `2d`.
//!
//! Nothing here weakens the protocol: QUIC sees a worse network, and its
//! loss recovery, congestion control and flow control are what get tested.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand::{RngExt, SeedableRng};
use tokio::sync::mpsc;

/// Conditions of an emulated link (per direction, applied by each sender).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmulatedLink {
    /// delay of every datagram
    pub one_way_delay: Duration,
    /// fraction of datagrams dropped, 0..1
    pub loss: f64,
    /// fraction of datagrams sent late (after later ones), 0..1
    pub reorder: f64,
    /// how much later a reordered datagram goes
    pub reorder_delay: Duration,
}

impl EmulatedLink {
    /// A link with round-trip time `rtt` and nothing else.
    pub fn with_rtt(rtt: Duration) -> EmulatedLink {
        EmulatedLink {
            one_way_delay: rtt / 2,
            loss: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
        }
    }

    /// Checks the fractions.
    pub fn check(&self) -> anyhow::Result<()> {
        for (name, f) in [("loss", self.loss), ("reorder", self.reorder)] {
            if !(0.0..1.0).contains(&f) {
                anyhow::bail!("emulated link: {name} must be in [0, 1), not {f}");
            }
        }
        Ok(())
    }
}

/// A datagram on its way: when it goes, and what it is.
struct Delayed {
    due: tokio::time::Instant,
    destination: SocketAddr,
    contents: Vec<u8>,
}

/// A UDP socket seen through an [`EmulatedLink`].
pub(crate) struct LinkSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    link: EmulatedLink,
    rng: Mutex<rand::rngs::StdRng>,
    line: mpsc::UnboundedSender<Delayed>,
}

impl fmt::Debug for LinkSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LinkSocket({:?})", self.link)
    }
}

/// Binds a UDP socket on `addr` whose datagrams go out through `link`.
/// Must be called inside a tokio runtime (the delay line is a task on it).
pub(crate) fn bind(addr: SocketAddr, link: EmulatedLink) -> anyhow::Result<Arc<LinkSocket>> {
    link.check()?;
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow::anyhow!("no async runtime"))?;
    let socket = std::net::UdpSocket::bind(addr)?;
    let inner = runtime.wrap_udp_socket(socket)?;
    let (line, mut queue) = mpsc::unbounded_channel::<Delayed>();
    let sender = inner.clone();
    // The delay line: datagrams leave in the order they were queued, each
    // at its due time (reordered ones are queued separately, later).
    tokio::spawn(async move {
        let mut poller = sender.clone().create_io_poller();
        while let Some(d) = queue.recv().await {
            tokio::time::sleep_until(d.due).await;
            send_now(&sender, &mut poller, &d).await;
        }
    });
    Ok(Arc::new(LinkSocket {
        inner,
        link,
        rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(rand::random())),
        line,
    }))
}

/// Sends a delayed datagram, waiting while the socket is full (as quinn
/// itself does); a datagram the socket refuses otherwise is lost, as on a
/// real link.
async fn send_now(
    socket: &Arc<dyn AsyncUdpSocket>,
    poller: &mut Pin<Box<dyn UdpPoller>>,
    d: &Delayed,
) {
    let transmit = Transmit {
        destination: d.destination,
        ecn: None,
        contents: &d.contents,
        segment_size: None,
        src_ip: None,
    };
    loop {
        match socket.try_send(&transmit) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            _ => return,
        }
    }
}

impl AsyncUdpSocket for LinkSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        // sends never block: they join the delay line
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let (drop, late) = {
            let mut rng = self.rng.lock().map_err(|_| io::Error::other("poisoned"))?;
            (
                rng.random_bool(self.link.loss),
                rng.random_bool(self.link.reorder),
            )
        };
        if drop {
            return Ok(());
        }
        let d = Delayed {
            due: tokio::time::Instant::now() + self.link.one_way_delay,
            destination: transmit.destination,
            contents: transmit.contents.to_vec(),
        };
        if late {
            let sender = self.inner.clone();
            let extra = self.link.reorder_delay;
            tokio::spawn(async move {
                let mut poller = sender.clone().create_io_poller();
                tokio::time::sleep_until(d.due + extra).await;
                send_now(&sender, &mut poller, &d).await;
            });
            return Ok(());
        }
        self.line
            .send(d)
            .map_err(|_| io::Error::other("the link's delay line has stopped"))
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A quinn endpoint on a [`LinkSocket`].
pub(crate) fn endpoint(
    addr: SocketAddr,
    link: EmulatedLink,
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
) -> anyhow::Result<quinn::Endpoint> {
    let socket = bind(addr, link)?;
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow::anyhow!("no async runtime"))?;
    Ok(quinn::Endpoint::new_with_abstract_socket(
        config, server, socket, runtime,
    )?)
}
