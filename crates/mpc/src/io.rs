//! How a party's protocol code talks to the other party, without IO.
//!
//! A protocol is an `async fn` taking `&mut Party`. It sends with
//! [`Party::send`] (queued, never blocks) and waits for the peer with
//! [`Party::recv`], which suspends the function until a message has been
//! delivered. `async` is used only as Rust's way to write a resumable
//! function: there is no executor and no waker. A [`Machine`] holds the
//! suspended function and is driven like quinn-proto's connection:
//!
//! - [`Machine::poll_transmit`] runs the protocol as far as it can go and
//!   yields the messages it wants sent;
//! - [`Machine::handle`] delivers a message from the peer;
//! - [`Machine::poll_output`] yields the result once the protocol is done.
//!
//! The machine owns no socket, thread or clock. [`run_pair`] drives a client
//! and a server machine against each other in one thread (tests, in-process
//! runs); the transport drives one machine over the network.
//!
//! Every message names the program step it belongs to and its sequence
//! number within that step (counted per sender), and every receive states
//! how many bytes it expects: a message for another step, out of order or of
//! the wrong size is an error naming the step, never misread.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use rand::SeedableRng;
use rand::rngs::{ChaCha20Rng, SysRng};
use secinfer_ot::{CorrelationStore, Role};
use secinfer_ring::Ring;
use serde::{Deserialize, Serialize};

use crate::MpcError;

/// One message of a joint protocol. `Debug` shows the payload's size, not
/// its bytes (masked shares: nothing for a log).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// the program step it belongs to
    pub step: u32,
    /// its number among the sender's messages of that step, from 0
    pub seq: u32,
    /// the protocol's bytes (see [`crate::wire`]), (de)serialised as a
    /// byte string (one copy, not a visit per byte; the same encoding)
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Message {{ step: {}, seq: {}, payload: {} bytes }}",
            self.step,
            self.seq,
            self.payload.len()
        )
    }
}

#[derive(Debug, Default)]
struct Mailbox {
    outbox: VecDeque<Message>,
    inbox: VecDeque<Message>,
}

/// The shared mailbox between a [`Party`] (inside the protocol future) and
/// the [`Machine`] that drives it.
#[derive(Clone, Debug, Default)]
pub struct Io(Arc<Mutex<Mailbox>>);

impl Io {
    fn lock(&self) -> MutexGuard<'_, Mailbox> {
        // Nothing panics while holding the lock, so a poisoned lock still
        // holds a consistent mailbox.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Direct access to the mailbox, for the test driver that runs two
/// protocol futures borrowing from the test's stack.
#[cfg(test)]
impl Io {
    pub(crate) fn take_outgoing(&self) -> Option<Message> {
        self.lock().outbox.pop_front()
    }

    pub(crate) fn deliver(&self, m: Message) {
        self.lock().inbox.push_back(m);
    }

    pub(crate) fn incoming(&self) -> usize {
        self.lock().inbox.len()
    }
}

/// Future of [`Party::recv`]: ready once a message is in the inbox.
struct NextMessage<'a>(&'a Io);

impl Future for NextMessage<'_> {
    type Output = Message;
    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Message> {
        match self.0.lock().inbox.pop_front() {
            Some(m) => Poll::Ready(m),
            None => Poll::Pending,
        }
    }
}

/// Traffic a party has produced and received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartyStats {
    /// messages sent
    pub messages_sent: u64,
    /// payload bytes sent
    pub bytes_sent: u64,
    /// messages received (the times this party waited for the peer)
    pub messages_received: u64,
    /// payload bytes received
    pub bytes_received: u64,
}

/// One party's context for running joint protocols: its role, the ring,
/// its correlations (each usable once), its randomness and its mailbox.
pub struct Party {
    role: Role,
    ring: Ring,
    correlations: CorrelationStore,
    rng: ChaCha20Rng,
    io: Io,
    step: u32,
    sent: u32,
    received: u32,
    stats: PartyStats,
}

impl std::fmt::Debug for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Party({:?}, step {})", self.role, self.step)
    }
}

impl Party {
    /// A party with correlations `correlations` (which must be `role`'s),
    /// randomness from ChaCha20 seeded by the operating system.
    pub fn new(
        role: Role,
        ring: Ring,
        correlations: CorrelationStore,
        io: Io,
    ) -> Result<Party, MpcError> {
        if correlations.role() != role {
            return Err(MpcError::Setup(format!(
                "a {role:?} party was given the {:?}'s correlations",
                correlations.role()
            )));
        }
        let rng = ChaCha20Rng::try_from_rng(&mut SysRng)
            .map_err(|e| MpcError::Setup(format!("OS randomness unavailable: {e}")))?;
        Ok(Party {
            role,
            ring,
            correlations,
            rng,
            io,
            step: 0,
            sent: 0,
            received: 0,
            stats: PartyStats::default(),
        })
    }

    /// Which party this is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether this is the client.
    pub fn is_client(&self) -> bool {
        self.role == Role::Client
    }

    /// The ring of the arithmetic shares.
    pub fn ring(&self) -> Ring {
        self.ring
    }

    /// The correlations still unused.
    pub fn correlations(&mut self) -> &mut CorrelationStore {
        &mut self.correlations
    }

    /// This party's CSPRNG.
    pub fn rng(&mut self) -> &mut ChaCha20Rng {
        &mut self.rng
    }

    /// Traffic so far.
    pub fn stats(&self) -> PartyStats {
        self.stats
    }

    /// The current step.
    pub fn step(&self) -> u32 {
        self.step
    }

    /// Starts step `step`: messages from now on carry it, numbered from 0.
    pub fn begin_step(&mut self, step: u32) {
        self.step = step;
        self.sent = 0;
        self.received = 0;
    }

    /// Queues `payload` for the peer.
    pub fn send(&mut self, payload: Vec<u8>) {
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += payload.len() as u64;
        let m = Message {
            step: self.step,
            seq: self.sent,
            payload,
        };
        self.sent += 1;
        self.io.lock().outbox.push_back(m);
    }

    /// Waits for the peer's next message of this step, which must carry
    /// exactly `expected_len` bytes.
    pub async fn recv(&mut self, expected_len: usize) -> Result<Vec<u8>, MpcError> {
        let m = NextMessage(&self.io).await;
        let (step, seq) = (self.step, self.received);
        let bad = |problem: String| MpcError::Message { step, seq, problem };
        if m.step != step || m.seq != seq {
            return Err(bad(format!(
                "expected message {seq} of step {step}, got message {} of step {}",
                m.seq, m.step
            )));
        }
        if m.payload.len() != expected_len {
            return Err(bad(format!(
                "expected {expected_len} bytes, got {}",
                m.payload.len()
            )));
        }
        self.received += 1;
        self.stats.messages_received += 1;
        self.stats.bytes_received += m.payload.len() as u64;
        Ok(m.payload)
    }

    /// Sends `payload` and waits for the peer's message of the same round
    /// (`expected_len` bytes): both parties send at once, then both read.
    pub async fn exchange(
        &mut self,
        payload: Vec<u8>,
        expected_len: usize,
    ) -> Result<Vec<u8>, MpcError> {
        self.send(payload);
        self.recv(expected_len).await
    }

    /// Gives back the unused correlations (e.g. to check a run used exactly
    /// what it took).
    pub fn into_correlations(self) -> CorrelationStore {
        self.correlations
    }
}

type Protocol<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A protocol in progress, driven from outside. See the module docs.
pub struct Machine<T> {
    io: Io,
    future: Option<Protocol<T>>,
    output: Option<T>,
}

impl<T> std::fmt::Debug for Machine<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Machine({})",
            if self.future.is_some() {
                "running"
            } else {
                "done"
            }
        )
    }
}

impl<T> Machine<T> {
    /// A machine running `protocol`, whose [`Party`] uses `io`.
    pub fn new(io: Io, protocol: impl Future<Output = T> + Send + 'static) -> Machine<T> {
        Machine {
            io,
            future: Some(Box::pin(protocol)),
            output: None,
        }
    }

    /// Runs the protocol until it waits for a message it does not have, or ends.
    fn advance(&mut self) {
        let Some(future) = self.future.as_mut() else {
            return;
        };
        let mut cx = Context::from_waker(Waker::noop());
        if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            self.output = Some(v);
            self.future = None;
        }
    }

    /// The next message to send, if the protocol has one.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        if let Some(m) = self.io.lock().outbox.pop_front() {
            return Some(m);
        }
        self.advance();
        self.io.lock().outbox.pop_front()
    }

    /// Delivers a message from the peer.
    pub fn handle(&mut self, message: Message) {
        self.io.lock().inbox.push_back(message);
    }

    /// The protocol's result, once it has ended (taken once).
    pub fn poll_output(&mut self) -> Option<T> {
        self.advance();
        self.output.take()
    }

    /// Whether the protocol has ended.
    pub fn is_done(&self) -> bool {
        self.future.is_none()
    }
}

/// Drives two machines against each other until both end; returns their
/// results. Errors if both wait for a message neither will send (a
/// protocol bug, or a peer that stopped early).
pub fn run_pair<A, B>(mut client: Machine<A>, mut server: Machine<B>) -> Result<(A, B), MpcError> {
    let (mut a, mut b) = (None, None);
    loop {
        let mut moved = false;
        while let Some(m) = client.poll_transmit() {
            server.handle(m);
            moved = true;
        }
        while let Some(m) = server.poll_transmit() {
            client.handle(m);
            moved = true;
        }
        if a.is_none() {
            a = client.poll_output();
        }
        if b.is_none() {
            b = server.poll_output();
        }
        if let (Some(_), Some(_)) = (&a, &b) {
            break;
        }
        if !moved {
            return Err(MpcError::Setup(
                "both parties wait for a message that will not come".into(),
            ));
        }
    }
    match (a, b) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(MpcError::Setup("a party did not finish".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secinfer_ot::Demand;

    fn party(role: Role, io: &Io) -> Party {
        Party::new(
            role,
            Ring::new(37).unwrap(),
            CorrelationStore::new(role),
            io.clone(),
        )
        .unwrap()
    }

    async fn ping(mut p: Party, rounds: u32) -> Result<Vec<u8>, MpcError> {
        p.begin_step(7);
        let mut seen = Vec::new();
        for r in 0..rounds {
            let got = p.exchange(vec![r as u8; 3], 3).await?;
            seen.extend(got);
        }
        Ok(seen)
    }

    #[test]
    fn debug_shows_the_payload_size_only() {
        let m = Message {
            step: 3,
            seq: 1,
            payload: vec![0xab; 40],
        };
        assert_eq!(
            format!("{m:?}"),
            "Message { step: 3, seq: 1, payload: 40 bytes }"
        );
        let io = Io::default();
        io.deliver(m);
        let shown = format!("{io:?}");
        assert!(
            shown.contains("payload: 40 bytes") && !shown.contains("171"),
            "{shown}"
        );
    }

    #[test]
    fn two_machines_exchange_rounds_in_lockstep() {
        let (ic, is) = (Io::default(), Io::default());
        let c = Machine::new(ic.clone(), ping(party(Role::Client, &ic), 3));
        let s = Machine::new(is.clone(), ping(party(Role::Server, &is), 3));
        let (a, b) = run_pair(c, s).unwrap();
        assert_eq!(a.unwrap(), vec![0, 0, 0, 1, 1, 1, 2, 2, 2]);
        assert_eq!(b.unwrap(), vec![0, 0, 0, 1, 1, 1, 2, 2, 2]);
    }

    #[test]
    fn wrong_length_wrong_step_and_silence_are_errors() {
        // the peer sends 4 bytes where 3 are expected
        let (ic, is) = (Io::default(), Io::default());
        let c = Machine::new(ic.clone(), ping(party(Role::Client, &ic), 1));
        let mut p = party(Role::Server, &is);
        let s = Machine::new(is.clone(), async move {
            p.begin_step(7);
            p.exchange(vec![0; 4], 3).await
        });
        let (a, _) = run_pair(c, s).unwrap();
        let e = a.unwrap_err().to_string();
        assert!(
            e.contains("step 7") && e.contains("expected 3 bytes, got 4"),
            "{e}"
        );

        // the peer is at another step
        let (ic, is) = (Io::default(), Io::default());
        let c = Machine::new(ic.clone(), ping(party(Role::Client, &ic), 1));
        let mut p = party(Role::Server, &is);
        let s = Machine::new(is.clone(), async move {
            p.begin_step(8);
            p.exchange(vec![0; 3], 3).await
        });
        let (a, b) = run_pair(c, s).unwrap();
        assert!(a.unwrap_err().to_string().contains("of step 8"));
        assert!(b.unwrap_err().to_string().contains("of step 7"));

        // a peer that never answers: the driver reports the deadlock
        let (ic, is) = (Io::default(), Io::default());
        let c = Machine::new(ic.clone(), ping(party(Role::Client, &ic), 2));
        let mut p = party(Role::Server, &is);
        let s = Machine::new(is.clone(), async move {
            p.begin_step(7);
            p.recv(3).await
        });
        assert!(run_pair(c, s).is_err());
    }

    #[test]
    fn a_party_refuses_the_other_partys_correlations() {
        let io = Io::default();
        let e = Party::new(
            Role::Client,
            Ring::new(37).unwrap(),
            CorrelationStore::new(Role::Server),
            io,
        )
        .unwrap_err();
        assert!(e.to_string().contains("Server"), "{e}");
        let _ = Demand::default();
    }
}
