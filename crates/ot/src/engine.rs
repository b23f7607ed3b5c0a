//! The per-session OT engine: one [`OtEngine`] per party runs the offline
//! phase for correlations, sans IO. The client leads and the server
//! follows; the message flow is
//!
//! ```text
//! client                                         server
//! start_setup()  ── Setup { flight: 0 } ──────▶  handle()
//! handle()       ◀── Setup { flight: 1 } ──────
//!                ── Setup { flight: 2 } ──────▶  handle() → None
//! request(d)     ── Extend { batch: 0, d } ───▶  handle(): checks d against
//!                                                the budget, then works;
//!                                                its store grows
//! handle()       ◀── ExtendRound { 0, round 1 }
//! (its store grows)
//! request(d')    ── Extend { batch: 1, d' } ──▶  …
//! ```
//!
//! The setup flights carry the [`CorrelationSource`]'s setup, the first
//! byte of flight 0 naming the backend ([`Backend`]). With IKNP the client
//! is set up once it has flight 1, so flight 2 needs no answer and the
//! first `Extend` follows it at once; silent OT adds a flight 3 from the
//! server (its IKNP bootstrap batch and its iteration of the small LPN set)
//! and a flight 4 from the client (its own iteration), which the server
//! does not answer (docs/silent-ot.md).
//! Batches are numbered from 0 and run one at a time; a multi-round source
//! continues a batch with further `ExtendRound`s (rounds alternate, the
//! client's even, the server's odd). When the source finishes a batch, the
//! engine refines its COTs ([`crate::refine`]) and appends the
//! [`CorrelationBatch`](crate::CorrelationBatch) to its
//! [`CorrelationStore`]; both stores receive the same batches in the same
//! order, and runs take from them with [`OtEngine::take_at`], which refuses
//! a reused or skipped position. Every message is checked: its phase, its
//! batch and round numbers, its demand (at most [`MAX_BATCH_OTS`] random
//! OTs per direction, and within the budget, checked before any work) and,
//! in the source, its length and encoding. The budget bounds this party's
//! memory for correlations: what its store holds (as
//! [`CorrelationStore::bytes`] counts it), what the batch adds as this
//! party stores it ([`Demand::stored_bytes_for`]; the two parties store
//! different amounts when word OTs are lopsided) and the batch's buffers
//! while it runs ([`CorrelationSource::batch_buffer_bytes`]). The COT
//! numbering that tweaks the hash only moves forward and is refused, never
//! wrapped, at its limit ([`OtError::CounterOverflow`]). A
//! refusal found in the message's header leaves the engine as it was; an
//! error inside the source's payload ends the engine (the session is over).

use serde::{Deserialize, Serialize};

use crate::correlation::{CorrelationStore, Demand, Position};
use crate::refine::{CotIndex, Tccr, advance_index, cot_counts, refine};
use crate::source::{Backend, Chosen, CorrelationSource, CotCounts};
use crate::{OtError, Role};

/// Most random OTs one batch makes per direction (2^21: a 32 MiB IKNP
/// matrix each way, as the client's requests are cut). Larger demands are
/// split into several batches. The server's work and reply for a batch
/// grow with the OTs the client asks it to *receive*, whatever the
/// client's own message, so this cap and the budget (which counts the
/// batch's buffers too) are what bound them.
pub const MAX_BATCH_OTS: u64 = 1 << 21;

/// A message of the offline phase for correlations. Payloads are
/// (de)serialised as byte strings, one copy instead of a visit per byte;
/// the encoding on the wire is the same as a sequence of `u8`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtMessage {
    /// A flight of the source's setup: even flights from the client, odd
    /// ones from the server, from 0.
    Setup {
        /// number of the flight
        flight: u32,
        /// the source's bytes
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// The client asks for batch `batch` of `demand` (round 0).
    Extend {
        /// number of the batch, from 0, one more each time
        batch: u64,
        /// what the batch makes
        demand: Demand,
        /// the source's first bytes of the batch (IKNP: the client's matrix)
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// A later round of batch `batch`: odd rounds from the server, even
    /// ones from the client.
    ExtendRound {
        /// number of the batch
        batch: u64,
        /// number of the round, from 1
        round: u32,
        /// the source's bytes (IKNP: the server's matrix in round 1)
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
}

impl std::fmt::Debug for OtMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OtMessage::Setup { flight, payload } => write!(
                f,
                "Setup {{ flight: {flight}, payload: {} bytes }}",
                payload.len()
            ),
            OtMessage::Extend {
                batch,
                demand,
                payload,
            } => write!(
                f,
                "Extend {{ batch: {batch}, demand: {demand:?}, payload: {} bytes }}",
                payload.len()
            ),
            OtMessage::ExtendRound {
                batch,
                round,
                payload,
            } => write!(
                f,
                "ExtendRound {{ batch: {batch}, round: {round}, payload: {} bytes }}",
                payload.len()
            ),
        }
    }
}

impl OtMessage {
    /// Bytes of the source's payload (the bulk of the message on the wire).
    pub fn payload_len(&self) -> usize {
        match self {
            OtMessage::Setup { payload, .. }
            | OtMessage::Extend { payload, .. }
            | OtMessage::ExtendRound { payload, .. } => payload.len(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Fresh,
    /// waiting for setup flight `next_flight` from the peer
    SettingUp {
        next_flight: u32,
    },
    Ready,
    /// batch `batch` runs; waiting for round `next_round` from the peer
    Extending {
        batch: u64,
        demand: Demand,
        next_round: u32,
    },
    Failed(String),
}

/// One party's engine for the offline phase of a session. See the module
/// docs for the message flow.
pub struct OtEngine {
    role: Role,
    source: Box<dyn CorrelationSource>,
    tccr: Tccr,
    store: CorrelationStore,
    budget: u64,
    phase: Phase,
    next_batch: u64,
    next_cot: CotIndex,
}

impl std::fmt::Debug for OtEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtEngine")
            .field("role", &self.role)
            .field("phase", &self.phase)
            .field("next_batch", &self.next_batch)
            .field("budget", &self.budget)
            // the store's contents are secret: only how much it holds
            .field("available", &self.store.available())
            .finish_non_exhaustive()
    }
}

fn refuse(what: String) -> OtError {
    OtError::Message(what)
}

impl OtEngine {
    /// An engine for `role` seeded from the operating system: a client's
    /// runs the default [`Backend`] (silent OT), a server's runs whichever
    /// backend the client names in its first setup message. Its store and a
    /// running batch's buffers may take at most `budget` bytes (see the
    /// module docs).
    pub fn new(role: Role, budget: u64) -> Result<OtEngine, OtError> {
        match role {
            Role::Client => OtEngine::client(Backend::default(), budget),
            Role::Server => Ok(OtEngine::server(&Backend::ALL, budget)),
        }
    }

    /// A server's engine that runs whichever of `accepted` the client
    /// names in its first setup message, and refuses any other by name.
    pub fn server(accepted: &[Backend], budget: u64) -> OtEngine {
        OtEngine::with_source(Box::new(Chosen::server(accepted)), budget)
    }

    /// A client's engine running `backend` (IKNP for comparison).
    pub fn client(backend: Backend, budget: u64) -> Result<OtEngine, OtError> {
        Ok(OtEngine::with_source(
            Box::new(Chosen::client(backend)?),
            budget,
        ))
    }

    /// An engine over any correlation source (its role is the engine's).
    pub fn with_source(source: Box<dyn CorrelationSource>, budget: u64) -> OtEngine {
        let role = source.role();
        OtEngine {
            role,
            source,
            tccr: Tccr::new(),
            store: CorrelationStore::new(role),
            budget,
            phase: Phase::Fresh,
            next_batch: 0,
            next_cot: CotIndex::default(),
        }
    }

    /// Whose engine this is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether the setup is done on this side and no batch is running.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// Batches appended to the store so far.
    pub fn batches(&self) -> u64 {
        self.next_batch
    }

    /// The most bytes the store and a running batch may take (see the
    /// module docs).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Changes the budget (for batches requested or handled from now on).
    pub fn set_budget(&mut self, bytes: u64) {
        self.budget = bytes;
    }

    /// The correlations made so far and not yet taken.
    pub fn store(&self) -> &CorrelationStore {
        &self.store
    }

    /// Bytes the correlation source keeps between batches
    /// ([`CorrelationSource::retained_bytes`]).
    pub fn retained_bytes(&self) -> u64 {
        self.source.retained_bytes()
    }

    /// The store, to take correlations from.
    pub fn store_mut(&mut self) -> &mut CorrelationStore {
        &mut self.store
    }

    /// Correlations taken so far, in this party's view.
    pub fn position(&self) -> Position {
        self.store.position()
    }

    /// A run's material: exactly `demand`, taken only if the peer reports
    /// the same position as this store (`peer_position` in the peer's own
    /// view). A position behind this store's would reuse correlations
    /// ([`OtError::Reused`]), one ahead skips some ([`OtError::Skipped`]);
    /// nothing is taken then.
    pub fn take_at(
        &mut self,
        peer_position: Position,
        demand: &Demand,
    ) -> Result<CorrelationStore, OtError> {
        self.store.take_at(peer_position.as_seen_by_peer(), demand)
    }

    /// The most this party's memory for correlations may grow while it
    /// handles `message` from the peer, for a server to reserve before the
    /// work: for a batch that passes the budget check, what the batch adds
    /// to the store as this party keeps it and the batch's buffers while it
    /// runs (the budget's own terms). Buffers the source keeps between
    /// batches and reuses ([`retained_bytes`](Self::retained_bytes)) are
    /// not subtracted: not every source's estimate covers them, so the
    /// bound may count them twice, and the surplus goes back as soon as the
    /// session settles. For a setup flight, everything the source may hold
    /// during its whole setup ([`CorrelationSource::setup_buffer_bytes`]: the
    /// bootstrap, about 10 MB with silent OT; a server's first flight, whose
    /// backend it has not read yet, at the most any accepted backend may
    /// hold, even if the flight then names one it refuses). Zero for any
    /// other message the engine will refuse before any work.
    pub fn growth_bound(&self, message: &OtMessage) -> u64 {
        if let OtMessage::Setup { flight, .. } = message {
            return match self.expected_setup_flight() {
                Some(expected) if expected == *flight => self.source.setup_buffer_bytes(),
                _ => 0,
            };
        }
        let demand = match (message, &self.phase) {
            (OtMessage::Extend { batch, demand, .. }, Phase::Ready)
                if *batch == self.next_batch && self.check_demand(*batch, demand).is_ok() =>
            {
                demand
            }
            (
                OtMessage::ExtendRound { batch, round, .. },
                Phase::Extending {
                    batch: running,
                    demand,
                    next_round,
                },
            ) if batch == running && round == next_round => demand,
            _ => return 0,
        };
        let transient = match cot_counts(self.role, demand) {
            Ok(counts) => self.source.batch_buffer_bytes(counts),
            Err(_) => return 0,
        };
        demand.stored_bytes_for(self.role).saturating_add(transient)
    }

    /// Starts the setup (client only): the first message.
    pub fn start_setup(&mut self) -> Result<OtMessage, OtError> {
        self.check_alive()?;
        if self.role != Role::Client {
            return Err(refuse(
                "the server does not start the setup; the client does".into(),
            ));
        }
        if self.phase != Phase::Fresh {
            return Err(refuse("setup started twice".into()));
        }
        let payload = self.guard(|e| e.source.start_setup())?;
        let Some(payload) = payload else {
            return Err(self.fail("the correlation source has no first setup message".into()));
        };
        self.phase = Phase::SettingUp { next_flight: 1 };
        Ok(OtMessage::Setup { flight: 0, payload })
    }

    /// Asks for one batch of `demand` (client only): the message to send.
    /// The client's own store must stay within its budget too.
    pub fn request(&mut self, demand: Demand) -> Result<OtMessage, OtError> {
        self.check_alive()?;
        if self.role != Role::Client {
            return Err(refuse(
                "the server does not request batches; the client does".into(),
            ));
        }
        let batch = self.next_batch;
        match self.phase {
            Phase::Ready => {}
            Phase::Extending { batch: running, .. } => {
                return Err(refuse(format!(
                    "a new batch requested while batch {running} is unfinished"
                )));
            }
            _ => {
                return Err(refuse(format!(
                    "batch {batch} requested before the setup is complete"
                )));
            }
        }
        self.check_demand(batch, &demand)?;
        let counts = cot_counts(self.role, &demand)?;
        let payload = self.guard(|e| e.source.start_batch(counts))?;
        let Some(payload) = payload else {
            return Err(self.fail("the correlation source has no first batch message".into()));
        };
        self.phase = Phase::Extending {
            batch,
            demand,
            next_round: 1,
        };
        Ok(OtMessage::Extend {
            batch,
            demand,
            payload,
        })
    }

    /// Handles a message from the peer; returns the answer to send, if any.
    pub fn handle(&mut self, message: OtMessage) -> Result<Option<OtMessage>, OtError> {
        self.check_alive()?;
        match message {
            OtMessage::Setup { flight, payload } => self.handle_setup(flight, &payload),
            OtMessage::Extend {
                batch,
                demand,
                payload,
            } => self.handle_extend(batch, demand, &payload),
            OtMessage::ExtendRound {
                batch,
                round,
                payload,
            } => self.handle_round(batch, round, &payload),
        }
    }

    /// The setup flight this engine handles next, if it is in its setup
    /// (a fresh server waits for flight 0; a fresh client sends it).
    fn expected_setup_flight(&self) -> Option<u32> {
        match self.phase {
            Phase::Fresh if self.role == Role::Server => Some(0),
            Phase::SettingUp { next_flight } => Some(next_flight),
            _ => None,
        }
    }

    fn handle_setup(&mut self, flight: u32, payload: &[u8]) -> Result<Option<OtMessage>, OtError> {
        let Some(expected) = self.expected_setup_flight() else {
            return Err(refuse(if self.phase == Phase::Fresh {
                format!("setup flight {flight} before the client started the setup")
            } else {
                format!("setup flight {flight} after the setup is complete (setup twice)")
            }));
        };
        if flight != expected {
            return Err(refuse(format!(
                "setup flight {flight} out of order: expected flight {expected}"
            )));
        }
        if flight == 0 {
            self.guard(|e| e.source.start_setup())?;
        }
        let reply = self.guard(|e| e.source.handle(payload))?;
        self.phase = if self.source.is_ready() {
            Phase::Ready
        } else if reply.is_some() {
            Phase::SettingUp {
                next_flight: flight + 2,
            }
        } else {
            return Err(self.fail(format!(
                "the correlation source neither answered setup flight {flight} nor finished"
            )));
        };
        Ok(reply.map(|payload| OtMessage::Setup {
            flight: flight + 1,
            payload,
        }))
    }

    fn handle_extend(
        &mut self,
        batch: u64,
        demand: Demand,
        payload: &[u8],
    ) -> Result<Option<OtMessage>, OtError> {
        if self.role != Role::Server {
            return Err(refuse(format!(
                "the client received an Extend request (batch {batch}); only the server answers them"
            )));
        }
        match self.phase {
            Phase::Ready => {}
            Phase::Extending { batch: running, .. } => {
                return Err(refuse(format!(
                    "Extend batch {batch} while batch {running} is unfinished"
                )));
            }
            _ => {
                return Err(refuse(format!(
                    "Extend batch {batch} before the setup is complete"
                )));
            }
        }
        let next = self.next_batch;
        if batch < next {
            return Err(refuse(format!(
                "Extend batch {batch} repeated: batches 0..{next} are done"
            )));
        }
        if batch > next {
            return Err(refuse(format!(
                "Extend batch {batch} out of order: expected batch {next}"
            )));
        }
        self.check_demand(batch, &demand)?;
        let counts = cot_counts(self.role, &demand)?;
        if let Some(unexpected) = self.guard(|e| e.source.start_batch(counts))? {
            return Err(self.fail(format!(
                "the correlation source wants to send {} bytes before the client's first",
                unexpected.len()
            )));
        }
        self.phase = Phase::Extending {
            batch,
            demand,
            next_round: 2,
        };
        let reply = self.guard(|e| e.source.handle(payload))?;
        self.finish_batch()?;
        Ok(reply.map(|payload| OtMessage::ExtendRound {
            batch,
            round: 1,
            payload,
        }))
    }

    fn handle_round(
        &mut self,
        batch: u64,
        round: u32,
        payload: &[u8],
    ) -> Result<Option<OtMessage>, OtError> {
        let Phase::Extending {
            batch: running,
            demand,
            next_round,
        } = self.phase
        else {
            return Err(refuse(format!(
                "ExtendRound {round} of batch {batch}, but no batch is running"
            )));
        };
        if batch != running || round != next_round {
            return Err(refuse(format!(
                "ExtendRound {round} of batch {batch} out of order: expected round {next_round} of batch {running}"
            )));
        }
        self.phase = Phase::Extending {
            batch,
            demand,
            next_round: round + 2,
        };
        let reply = self.guard(|e| e.source.handle(payload))?;
        self.finish_batch()?;
        Ok(reply.map(|payload| OtMessage::ExtendRound {
            batch,
            round: round + 1,
            payload,
        }))
    }

    /// Refuses a demand that is too large for one batch, that would take
    /// this party over its budget or the COT numbering past its limit;
    /// changes nothing.
    fn check_demand(&self, batch: u64, demand: &Demand) -> Result<(), OtError> {
        let sum = |a: u64, b: u64, c: u64| a.checked_add(b).and_then(|s| s.checked_add(c));
        let per_direction = [
            sum(
                demand.triples,
                demand.bit_ots_client_sends,
                demand.word_ots_client_sends,
            ),
            sum(
                demand.triples,
                demand.bit_ots_server_sends,
                demand.word_ots_server_sends,
            ),
        ];
        if per_direction
            .iter()
            .any(|n| n.is_none_or(|n| n > MAX_BATCH_OTS))
        {
            return Err(refuse(format!(
                "batch {batch} demands {demand:?}: more than {MAX_BATCH_OTS} random OTs in one direction; split it into several batches"
            )));
        }
        self.check_budget(batch, demand)?;
        self.next_index(&cot_counts(self.role, demand)?)?;
        Ok(())
    }

    /// Refuses a batch that would take this party's memory for correlations
    /// over the budget: its store as it is, plus the batch as this party
    /// stores it, plus the batch's buffers while it runs. Checked
    /// arithmetic: a sum past `u64::MAX` is over any budget.
    fn check_budget(&self, batch: u64, demand: &Demand) -> Result<(), OtError> {
        let stored = u64::try_from(self.store.bytes()).unwrap_or(u64::MAX);
        let requested = demand.stored_bytes_for(self.role);
        let transient = match cot_counts(self.role, demand) {
            Ok(counts) => self.source.batch_buffer_bytes(counts),
            Err(_) => u64::MAX,
        };
        let total = stored
            .checked_add(requested)
            .and_then(|t| t.checked_add(transient));
        if total.is_none_or(|t| t > self.budget) {
            return Err(OtError::OverBudget {
                batch,
                requested,
                stored,
                transient,
                budget: self.budget,
            });
        }
        Ok(())
    }

    /// Where the COT numbering continues after a batch of `counts`.
    fn next_index(&self, counts: &CotCounts) -> Result<CotIndex, OtError> {
        Ok(CotIndex {
            sent: advance_index(
                self.next_cot.sent,
                counts.sent,
                "the index of COTs this party sends",
            )?,
            received: advance_index(
                self.next_cot.received,
                counts.received,
                "the index of COTs this party receives",
            )?,
        })
    }

    /// If the source has finished the running batch: refine, append, and
    /// get ready for the next.
    fn finish_batch(&mut self) -> Result<(), OtError> {
        let Phase::Extending { demand, .. } = self.phase else {
            return Ok(());
        };
        let Some(cots) = self.source.poll_batch() else {
            return Ok(());
        };
        let first = self.next_cot;
        let batch = self.guard(|e| refine(&e.tccr, e.role, &demand, &cots, first))?;
        self.source.recycle(cots);
        let counts = cot_counts(self.role, &demand)?;
        let next = self.guard(|e| e.next_index(&counts))?;
        self.next_cot = next;
        self.store.append(batch);
        self.next_batch += 1;
        self.phase = Phase::Ready;
        Ok(())
    }

    /// Moves the COT numbering (tests of its limit; both parties must
    /// agree on it).
    #[cfg(test)]
    fn set_next_cot(&mut self, next: CotIndex) {
        self.next_cot = next;
    }

    fn check_alive(&self) -> Result<(), OtError> {
        match &self.phase {
            Phase::Failed(why) => Err(refuse(format!(
                "the OT engine failed earlier ({why}); start a new session"
            ))),
            _ => Ok(()),
        }
    }

    /// Marks the engine failed and returns the error.
    fn fail(&mut self, why: String) -> OtError {
        self.phase = Phase::Failed(why.clone());
        OtError::Message(why)
    }

    /// Runs a step of the source; an error ends the engine.
    fn guard<T>(
        &mut self,
        step: impl FnOnce(&mut Self) -> Result<T, OtError>,
    ) -> Result<T, OtError> {
        step(self).inspect_err(|e| self.phase = Phase::Failed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::ChaCha20Rng;

    use super::*;
    use crate::correlation::{BitOtReceiver, BitOtSender, WordOtReceiver, WordOtSender};
    use crate::iknp::IknpSource;

    const BUDGET: u64 = 1 << 30;

    fn engines(seed: u64, budget: u64) -> (OtEngine, OtEngine) {
        let source = |role, seed| {
            Box::new(IknpSource::with_rng(role, ChaCha20Rng::seed_from_u64(seed)))
                as Box<dyn CorrelationSource>
        };
        (
            OtEngine::with_source(source(Role::Client, seed), BUDGET),
            OtEngine::with_source(source(Role::Server, seed + 1), budget),
        )
    }

    fn set_up(client: &mut OtEngine, server: &mut OtEngine) {
        let f0 = client.start_setup().unwrap();
        let f1 = server.handle(f0).unwrap().unwrap();
        let f2 = client.handle(f1).unwrap().unwrap();
        assert!(client.is_ready());
        assert_eq!(server.handle(f2).unwrap(), None);
        assert!(server.is_ready());
    }

    fn run_batch(client: &mut OtEngine, server: &mut OtEngine, demand: Demand) {
        let request = client.request(demand).unwrap();
        let answer = server.handle(request).unwrap().unwrap();
        assert_eq!(client.handle(answer).unwrap(), None);
        assert!(client.is_ready() && server.is_ready());
    }

    fn set_up_pair(seed: u64, budget: u64) -> (OtEngine, OtEngine) {
        let (mut c, mut s) = engines(seed, budget);
        set_up(&mut c, &mut s);
        (c, s)
    }

    fn demand(k: u64) -> Demand {
        Demand {
            triples: 100 * k + 3,
            bit_ots_client_sends: 70 * k,
            bit_ots_server_sends: 65 + k,
            word_ots_client_sends: 9 * k,
            word_ots_server_sends: 11 + 40 * k,
        }
    }

    fn check_bit_ots(snd: &BitOtSender, rcv: &BitOtReceiver) {
        assert_eq!(snd.m0.len(), rcv.choice.len());
        for j in 0..snd.m0.len() {
            let m = if rcv.choice.get(j) {
                snd.m1.get(j)
            } else {
                snd.m0.get(j)
            };
            assert_eq!(rcv.m.get(j), m, "bit OT {j}");
        }
    }

    fn check_word_ots(snd: &WordOtSender, rcv: &WordOtReceiver) {
        assert_eq!(snd.m0.len(), rcv.choice.len());
        for j in 0..snd.m0.len() {
            let m = if rcv.choice.get(j) {
                snd.m1[j]
            } else {
                snd.m0[j]
            };
            assert_eq!(rcv.m[j], m, "word OT {j}");
        }
    }

    /// Takes `d` from both stores, in two unequal pieces per kind (so that
    /// pieces straddle batches), and checks every relation.
    fn take_and_check(c: &mut CorrelationStore, s: &mut CorrelationStore, d: &Demand) {
        let pieces = |n: u64| [(n / 3) as usize, (n - n / 3) as usize];
        for n in pieces(d.triples) {
            let (tc, ts) = (c.triples(n).unwrap(), s.triples(n).unwrap());
            let b = tc.b.xor(&ts.b);
            assert_eq!(tc.c.xor(&ts.c), tc.a.xor(&ts.a).and(&b));
            assert_eq!(tc.c2.xor(&ts.c2), tc.a2.xor(&ts.a2).and(&b));
        }
        for n in pieces(d.bit_ots_client_sends) {
            check_bit_ots(&c.bit_ots_sent(n).unwrap(), &s.bit_ots_received(n).unwrap());
        }
        for n in pieces(d.bit_ots_server_sends) {
            check_bit_ots(&s.bit_ots_sent(n).unwrap(), &c.bit_ots_received(n).unwrap());
        }
        for n in pieces(d.word_ots_client_sends) {
            check_word_ots(
                &c.word_ots_sent(n).unwrap(),
                &s.word_ots_received(n).unwrap(),
            );
        }
        for n in pieces(d.word_ots_server_sends) {
            check_word_ots(
                &s.word_ots_sent(n).unwrap(),
                &c.word_ots_received(n).unwrap(),
            );
        }
    }

    #[test]
    fn setup_and_several_batches_give_matching_stores() {
        let (mut client, mut server) = set_up_pair(1, BUDGET);
        let mut total = Demand::default();
        for k in 0..4 {
            run_batch(&mut client, &mut server, demand(k));
            total = total.plus(demand(k));
        }
        assert_eq!(client.batches(), 4);
        assert_eq!(server.batches(), 4);
        assert_eq!(client.store().available(), total);
        assert_eq!(server.store().available(), total);
        take_and_check(client.store_mut(), server.store_mut(), &total);
        assert_eq!(client.position().as_seen_by_peer(), server.position());
        assert!(client.store().available().is_zero());
        // more batches after the stores ran dry continue the same streams
        run_batch(&mut client, &mut server, demand(2));
        take_and_check(client.store_mut(), server.store_mut(), &demand(2));
    }

    #[test]
    fn an_empty_demand_is_a_batch_like_any_other() {
        let (mut client, mut server) = set_up_pair(2, BUDGET);
        run_batch(&mut client, &mut server, Demand::default());
        run_batch(&mut client, &mut server, demand(1));
        assert_eq!(server.batches(), 2);
        take_and_check(client.store_mut(), server.store_mut(), &demand(1));
    }

    /// What a batch of `d` takes on `engine`'s side: (stored, buffers).
    fn batch_bytes(engine: &OtEngine, d: &Demand) -> (u64, u64) {
        let counts = cot_counts(engine.role(), d).unwrap();
        (
            d.stored_bytes_for(engine.role()),
            engine.source.batch_buffer_bytes(counts),
        )
    }

    /// A server that accepts only some backends refuses a client naming
    /// another at its first flight, by name, and prices that flight for
    /// the backends it accepts; a client naming an accepted one is served.
    #[test]
    fn a_server_refuses_a_backend_it_does_not_accept_by_name() {
        for (accepted, other) in [
            (Backend::Silent, Backend::Iknp),
            (Backend::Iknp, Backend::Silent),
        ] {
            let mut server = OtEngine::server(&[accepted], BUDGET);
            let mut refused = OtEngine::client(other, BUDGET).unwrap();
            let first = refused.start_setup().unwrap();
            assert_eq!(server.growth_bound(&first), accepted.setup_buffer_bytes());
            let e = server.handle(first).unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "asks for OT backend {}, which this server does not accept (it accepts: {})",
                    other.name(),
                    accepted.name()
                )),
                "{e}"
            );
            let mut server = OtEngine::server(&[accepted], BUDGET);
            let mut client = OtEngine::client(accepted, BUDGET).unwrap();
            let mut next = Some(client.start_setup().unwrap());
            let mut to_server = true;
            while let Some(m) = next.take() {
                next = if to_server {
                    server.handle(m).unwrap()
                } else {
                    client.handle(m).unwrap()
                };
                to_server = !to_server;
            }
            assert!(client.is_ready() && server.is_ready(), "{accepted:?}");
        }
        assert!(Backend::Silent.setup_buffer_bytes() > Backend::Iknp.setup_buffer_bytes());
    }

    #[test]
    fn a_batch_is_priced_before_its_work_at_no_less_than_it_grows() {
        for backend in [Backend::Silent, Backend::Iknp] {
            let mut client = OtEngine::client(backend, BUDGET).unwrap();
            let mut server = OtEngine::new(Role::Server, BUDGET).unwrap();
            let held = |e: &OtEngine| e.store().bytes() as u64 + e.retained_bytes();
            // every setup flight is priced before its work at no less than
            // what the engine then holds (the peak during a flight, a few
            // MB, is within the bound by its terms: `setup_buffer_bytes`);
            // a flight out of order (the same one again) at nothing, since
            // it is refused
            let mut next = Some(client.start_setup().unwrap());
            let mut to_server = true;
            while let Some(m) = next.take() {
                let receiver = if to_server { &mut server } else { &mut client };
                let bound = receiver.growth_bound(&m);
                next = receiver.handle(m.clone()).unwrap();
                let kept = held(receiver);
                assert!(
                    bound > 0 && kept <= bound,
                    "{backend:?}: setup flight kept {kept}, priced {bound}"
                );
                assert_eq!(
                    receiver.growth_bound(&m),
                    0,
                    "{backend:?}: the flight again"
                );
                to_server = !to_server;
            }
            let late = OtMessage::Setup {
                flight: 0,
                payload: vec![1],
            };
            assert_eq!(
                server.growth_bound(&late),
                0,
                "{backend:?}: after the setup"
            );
            // a small batch, one past a whole LPN iteration each way, and a
            // small one again, whose source now keeps the large one's buffers
            for k in [1, 3000, 1] {
                let request = client.request(demand(k)).unwrap();
                let bound = server.growth_bound(&request);
                let before = held(&server);
                let answer = server.handle(request.clone()).unwrap().unwrap();
                // (a source that reuses a larger batch's buffers may shrink)
                let grown = held(&server).saturating_sub(before);
                assert!(
                    bound > 0 && grown <= bound,
                    "{backend:?}, k = {k}: grew {grown}, priced {bound}"
                );
                // the same request again would be refused: priced at nothing
                assert_eq!(server.growth_bound(&request), 0);
                assert_eq!(client.handle(answer).unwrap(), None);
            }
            // so are a demand over the per-batch cap and, under a budget
            // lowered to what the store holds, any batch
            let next = |demand| OtMessage::Extend {
                batch: client.batches(),
                demand,
                payload: vec![],
            };
            let greedy = Demand {
                word_ots_client_sends: MAX_BATCH_OTS + 1,
                ..Demand::default()
            };
            assert_eq!(server.growth_bound(&next(greedy)), 0, "{backend:?}: cap");
            assert!(server.growth_bound(&next(demand(1))) > 0);
            server.set_budget(server.store().bytes() as u64);
            assert_eq!(
                server.growth_bound(&next(demand(1))),
                0,
                "{backend:?}: over budget"
            );
        }
    }

    #[test]
    fn a_demand_over_budget_is_refused_before_any_work() {
        let small = demand(1);
        let probe = set_up_pair(3, BUDGET).1;
        let (stored, buffers) = batch_bytes(&probe, &small);
        assert!(buffers >= 2 * 4096, "both IKNP matrices: {buffers}");
        // room for two batches of `small` at rest and one running
        let budget = 2 * stored + buffers;
        let (mut client, mut server) = set_up_pair(3, budget);
        let request = client.request(small).unwrap();
        let OtMessage::Extend { batch, payload, .. } = request.clone() else {
            panic!("not an Extend: {request:?}");
        };
        // a demand far under the per-batch cap, over this small budget
        let greedy = demand(3);
        let err = server
            .handle(OtMessage::Extend {
                batch,
                demand: greedy,
                payload: payload.clone(),
            })
            .unwrap_err();
        let (want_stored, want_buffers) = batch_bytes(&server, &greedy);
        assert_eq!(
            err,
            OtError::OverBudget {
                batch: 0,
                requested: want_stored,
                stored: 0,
                transient: want_buffers,
                budget,
            }
        );
        assert!(format!("{err}").contains("over the budget"), "{err}");
        // a demand over the per-batch cap is refused as such, before the
        // budget is looked at
        let absurd = Demand {
            triples: u64::MAX / 2,
            ..Demand::default()
        };
        let err = server
            .handle(OtMessage::Extend {
                batch,
                demand: absurd,
                payload: payload.clone(),
            })
            .unwrap_err();
        assert!(
            format!("{err}").contains("more than 2097152 random OTs"),
            "{err}"
        );
        // the budget's own arithmetic does not wrap or saturate into a
        // pass: a sum past u64::MAX is over even the largest budget
        server.set_budget(u64::MAX);
        let err = server.check_budget(0, &absurd).unwrap_err();
        assert!(
            matches!(
                err,
                OtError::OverBudget {
                    transient: u64::MAX,
                    budget: u64::MAX,
                    ..
                }
            ),
            "{err}"
        );
        let huge_but_countable = Demand {
            word_ots_server_sends: u64::MAX / 17,
            ..Demand::default()
        };
        let (s, t) = batch_bytes(&server, &huge_but_countable);
        assert!(s < u64::MAX && s.checked_add(t).is_none(), "{s} + {t}");
        assert!(matches!(
            server.check_budget(0, &huge_but_countable),
            Err(OtError::OverBudget { .. })
        ));
        server.set_budget(budget);
        // the server did nothing: the honest request still matches the client
        let answer = server.handle(request).unwrap().unwrap();
        client.handle(answer).unwrap();
        take_and_check(client.store_mut(), server.store_mut(), &small);
        // the budget counts what is stored and not yet taken: two more fit
        // (the first was taken), a third does not
        run_batch(&mut client, &mut server, small);
        run_batch(&mut client, &mut server, small);
        assert_eq!(server.store().bytes() as u64, 2 * stored);
        let err = server.handle(client.request(small).unwrap()).unwrap_err();
        assert!(
            matches!(err, OtError::OverBudget { batch: 3, stored: s, .. } if s == 2 * stored),
            "{err}"
        );
        // and the client refuses to exceed its own budget
        let mut fresh = set_up_pair(4, BUDGET).0;
        fresh.set_budget(1);
        let err = fresh.request(small).unwrap_err();
        assert!(matches!(err, OtError::OverBudget { .. }), "{err}");
    }

    #[test]
    fn the_budget_counts_what_this_side_stores() {
        // word OTs the client sends: 16 bytes each for the client, 8 and a
        // bit for the server
        let lopsided = Demand {
            word_ots_client_sends: 10_000,
            ..Demand::default()
        };
        let probe = set_up_pair(12, BUDGET).1;
        let (server_stored, buffers) = batch_bytes(&probe, &lopsided);
        assert_eq!(server_stored, 10_000 * 8 + 10_000 / 8);
        assert_eq!(lopsided.stored_bytes(), 10_000 * 16);
        // exactly enough for the server's view: accepted
        let (mut client, mut server) = set_up_pair(12, server_stored + buffers);
        run_batch(&mut client, &mut server, lopsided);
        assert_eq!(server.store().bytes() as u64, server_stored);
        assert_eq!(
            client.store().bytes() as u64,
            lopsided.stored_bytes_for(Role::Client)
        );
        // one byte less: refused, naming the server's numbers
        let (mut client, mut server) = set_up_pair(12, server_stored + buffers - 1);
        let err = server
            .handle(client.request(lopsided).unwrap())
            .unwrap_err();
        assert!(
            matches!(err, OtError::OverBudget { requested, transient, .. }
                if requested == server_stored && transient == buffers),
            "{err}"
        );
        // the largest batch the client asks for fits the server's default
        // budget (512 MiB) with the client's default store (256 MiB) held
        let largest = Demand {
            word_ots_client_sends: MAX_BATCH_OTS,
            word_ots_server_sends: MAX_BATCH_OTS,
            ..Demand::default()
        };
        let (s, t) = batch_bytes(&probe, &largest);
        assert!(s + t + (256 << 20) <= 512 << 20, "{s} + {t}");
    }

    #[test]
    fn the_cot_numbering_fails_at_its_limit_instead_of_wrapping() {
        let d = demand(1);
        let counts = cot_counts(Role::Client, &d).unwrap();
        let (mut client, mut server) = set_up_pair(13, BUDGET);
        // exactly room for one batch in the client's sending direction
        // (the server's receiving one)
        let room = CotIndex {
            sent: u64::MAX - counts.sent as u64,
            received: 7,
        };
        client.set_next_cot(room);
        server.set_next_cot(CotIndex {
            sent: room.received,
            received: room.sent,
        });
        run_batch(&mut client, &mut server, d);
        assert_eq!(client.next_cot.sent, u64::MAX);
        assert_eq!(server.next_cot.received, u64::MAX);
        take_and_check(client.store_mut(), server.store_mut(), &d);
        // one more COT that way would pass 2^64 − 1: refused before any
        // work on both sides, naming the counter
        let one = Demand {
            bit_ots_client_sends: 1,
            ..Demand::default()
        };
        let err = client.request(one).unwrap_err();
        assert_eq!(
            err,
            OtError::CounterOverflow {
                counter: "the index of COTs this party sends",
                at: u128::from(u64::MAX),
                more: 1,
            }
        );
        assert!(format!("{err}").contains("would overflow"), "{err}");
        assert!(client.is_ready(), "a refused request changes nothing");
        let err = server
            .handle(OtMessage::Extend {
                batch: 1,
                demand: one,
                payload: vec![],
            })
            .unwrap_err();
        assert!(
            matches!(err, OtError::CounterOverflow { counter, .. }
                if counter == "the index of COTs this party receives"),
            "{err}"
        );
        // the other direction still has room
        run_batch(
            &mut client,
            &mut server,
            Demand {
                bit_ots_server_sends: 5,
                ..Demand::default()
            },
        );
    }

    fn message_of(e: OtError) -> String {
        match e {
            OtError::Message(m) => m,
            other => panic!("not a message error: {other}"),
        }
    }

    #[test]
    fn messages_in_the_wrong_phase_are_refused_by_name() {
        let (mut client, mut server) = engines(5, BUDGET);
        let extend = OtMessage::Extend {
            batch: 0,
            demand: demand(0),
            payload: vec![],
        };
        let e = message_of(server.handle(extend.clone()).unwrap_err());
        assert!(
            e.contains("Extend batch 0 before the setup is complete"),
            "{e}"
        );
        let e = message_of(client.request(demand(0)).unwrap_err());
        assert!(e.contains("before the setup is complete"), "{e}");
        let e = message_of(server.start_setup().unwrap_err());
        assert!(e.contains("the client does"), "{e}");
        let e = message_of(
            client
                .handle(OtMessage::Setup {
                    flight: 1,
                    payload: vec![],
                })
                .unwrap_err(),
        );
        assert!(e.contains("before the client started the setup"), "{e}");
        let e = message_of(
            server
                .handle(OtMessage::Setup {
                    flight: 1,
                    payload: vec![],
                })
                .unwrap_err(),
        );
        assert!(
            e.contains("setup flight 1 out of order: expected flight 0"),
            "{e}"
        );

        let f0 = client.start_setup().unwrap();
        let e = message_of(client.start_setup().unwrap_err());
        assert!(e.contains("setup started twice"), "{e}");
        let f1 = server.handle(f0.clone()).unwrap().unwrap();
        let e = message_of(server.handle(f0.clone()).unwrap_err());
        assert!(
            e.contains("setup flight 0 out of order: expected flight 2"),
            "{e}"
        );
        let f2 = client.handle(f1.clone()).unwrap().unwrap();
        let e = message_of(client.handle(f1).unwrap_err());
        assert!(e.contains("after the setup is complete"), "{e}");
        server.handle(f2.clone()).unwrap();
        let e = message_of(server.handle(f0).unwrap_err());
        assert!(
            e.contains("setup flight 0 after the setup is complete (setup twice)"),
            "{e}"
        );
        let e = message_of(server.handle(f2).unwrap_err());
        assert!(e.contains("setup twice"), "{e}");

        let e = message_of(client.handle(extend).unwrap_err());
        assert!(e.contains("only the server answers them"), "{e}");
        let round = |batch, round| OtMessage::ExtendRound {
            batch,
            round,
            payload: vec![],
        };
        let e = message_of(client.handle(round(0, 1)).unwrap_err());
        assert!(
            e.contains("ExtendRound 1 of batch 0, but no batch is running"),
            "{e}"
        );
        let e = message_of(server.request(demand(0)).unwrap_err());
        assert!(e.contains("the client does"), "{e}");

        // batch numbers: in order, never repeated, one at a time
        let request = client.request(demand(1)).unwrap();
        let e = message_of(client.request(demand(1)).unwrap_err());
        assert!(
            e.contains("a new batch requested while batch 0 is unfinished"),
            "{e}"
        );
        let OtMessage::Extend {
            demand: d, payload, ..
        } = request.clone()
        else {
            panic!("{request:?}");
        };
        let numbered = |batch| OtMessage::Extend {
            batch,
            demand: d,
            payload: payload.clone(),
        };
        let e = message_of(server.handle(numbered(1)).unwrap_err());
        assert!(
            e.contains("Extend batch 1 out of order: expected batch 0"),
            "{e}"
        );
        let answer = server.handle(request).unwrap().unwrap();
        let e = message_of(server.handle(numbered(0)).unwrap_err());
        assert!(e.contains("Extend batch 0 repeated"), "{e}");
        let e = message_of(server.handle(round(0, 2)).unwrap_err());
        assert!(e.contains("no batch is running"), "{e}");
        let e = message_of(client.handle(round(1, 1)).unwrap_err());
        assert!(
            e.contains("ExtendRound 1 of batch 1 out of order: expected round 1 of batch 0"),
            "{e}"
        );
        let e = message_of(client.handle(round(0, 3)).unwrap_err());
        assert!(e.contains("expected round 1 of batch 0"), "{e}");
        // none of the refusals above changed anything
        client.handle(answer).unwrap();
        take_and_check(client.store_mut(), server.store_mut(), &demand(1));
    }

    /// Expects `f` to fail with a message containing `needle`, and the
    /// engine to be over afterwards.
    fn refused_and_over(engine: &mut OtEngine, message: OtMessage, needle: &str) {
        let e = message_of(engine.handle(message.clone()).unwrap_err());
        assert!(e.contains(needle), "{needle:?} not in {e:?}");
        let e = message_of(engine.handle(message).unwrap_err());
        assert!(e.contains("failed earlier"), "{e}");
    }

    #[test]
    fn malformed_payloads_are_refused_by_name() {
        use curve25519_dalek::ristretto::RistrettoPoint;
        use curve25519_dalek::traits::Identity;
        let identity = RistrettoPoint::identity().compress().to_bytes();
        let setup = |flight, payload| OtMessage::Setup { flight, payload };

        // flight 0: length, encoding, identity
        let mut server = engines(6, BUDGET).1;
        refused_and_over(
            &mut server,
            setup(0, vec![1; 31]),
            "flight 0 (the client's A) must have 32 bytes, got 31",
        );
        let mut server = engines(6, BUDGET).1;
        refused_and_over(
            &mut server,
            setup(0, vec![0xff; 32]),
            "sender's point A is not a ristretto255 point",
        );
        let mut server = engines(6, BUDGET).1;
        refused_and_over(
            &mut server,
            setup(0, identity.to_vec()),
            "point A is the identity",
        );

        // flight 1: a bad B point names its base OT
        let (mut client, mut server) = engines(7, BUDGET);
        let f1 = server
            .handle(client.start_setup().unwrap())
            .unwrap()
            .unwrap();
        let OtMessage::Setup { payload, .. } = f1 else {
            panic!()
        };
        let mut bad = payload.clone();
        bad[32 + 7 * 32..32 + 8 * 32].copy_from_slice(&identity);
        refused_and_over(
            &mut client,
            setup(1, bad),
            "base OT 7: the receiver's point B is the identity",
        );
        let (mut client, mut server) = engines(7, BUDGET);
        server.handle(client.start_setup().unwrap()).unwrap();
        refused_and_over(&mut client, setup(1, payload[..100].to_vec()), "flight 1");

        // flight 2
        let (mut client, mut server) = engines(8, BUDGET);
        let f1 = server
            .handle(client.start_setup().unwrap())
            .unwrap()
            .unwrap();
        let OtMessage::Setup { mut payload, .. } = client.handle(f1).unwrap().unwrap() else {
            panic!()
        };
        payload[3 * 32..4 * 32].copy_from_slice(&[0xee; 32]);
        refused_and_over(
            &mut server,
            setup(2, payload),
            "base OT 3: the receiver's point B is not a ristretto255 point",
        );

        // batch matrices of the wrong length, both ways
        let (mut client, mut server) = set_up_pair(9, BUDGET);
        let OtMessage::Extend {
            batch,
            demand: d,
            mut payload,
        } = client.request(demand(1)).unwrap()
        else {
            panic!()
        };
        payload.pop();
        refused_and_over(
            &mut server,
            OtMessage::Extend {
                batch,
                demand: d,
                payload,
            },
            "IKNP matrix for 220 COTs must have 4096 bytes, got 4095",
        );
        let (mut client, mut server) = set_up_pair(10, BUDGET);
        let answer = server
            .handle(client.request(demand(1)).unwrap())
            .unwrap()
            .unwrap();
        let OtMessage::ExtendRound {
            batch,
            round,
            mut payload,
        } = answer
        else {
            panic!()
        };
        payload.push(0);
        refused_and_over(
            &mut client,
            OtMessage::ExtendRound {
                batch,
                round,
                payload,
            },
            "must have 4096 bytes, got 4097",
        );
    }

    #[test]
    fn reusing_or_skipping_correlations_is_refused_on_both_sides() {
        let (mut client, mut server) = set_up_pair(11, BUDGET);
        run_batch(&mut client, &mut server, demand(2));
        let run = Demand {
            triples: 50,
            bit_ots_client_sends: 10,
            bit_ots_server_sends: 20,
            word_ots_client_sends: 5,
            word_ots_server_sends: 6,
        };
        // The client leads: it takes at the server's (initial) position and
        // reports its own; the server takes at that.
        let (c0, s0) = (client.position(), server.position());
        let mut run_c = client.take_at(s0, &run).unwrap();
        let mut run_s = server.take_at(c0, &run).unwrap();
        take_and_check(&mut run_c, &mut run_s, &run);
        // replaying the old positions: reuse, refused on either side
        assert!(matches!(
            server.take_at(c0, &run),
            Err(OtError::Reused { .. })
        ));
        assert!(matches!(
            client.take_at(s0, &run),
            Err(OtError::Reused { .. })
        ));
        // a position ahead: skipped
        let c1 = client.position();
        let mut ahead = c1;
        ahead.triples += 1;
        assert!(matches!(
            server.take_at(ahead, &run),
            Err(OtError::Skipped { .. })
        ));
        // nothing was taken by the refusals; the next run lines up again
        let s1 = server.position();
        let mut run_s = server.take_at(c1, &run).unwrap();
        // a client naming the server's position after that run would skip it
        let ahead = client.take_at(server.position(), &run);
        assert!(matches!(ahead, Err(OtError::Skipped { .. })), "{ahead:?}");
        let mut run_c = client.take_at(s1, &run).unwrap();
        take_and_check(&mut run_c, &mut run_s, &run);
    }

    /// Both backends through the engines `new` and `client` make (the
    /// server following the client's choice): every correlation the runs
    /// take satisfies its relation, over several batches; and reuse of an
    /// expanded correlation is refused on both sides.
    #[test]
    fn both_backends_make_correct_single_use_correlations() {
        for backend in [Backend::Silent, Backend::Iknp] {
            let mut client = OtEngine::client(backend, BUDGET).unwrap();
            let mut server = OtEngine::new(Role::Server, BUDGET).unwrap();
            let mut next = Some(client.start_setup().unwrap());
            let mut flights = 0;
            while let Some(m) = next.take() {
                flights += 1;
                if let Some(reply) = server.handle(m).unwrap() {
                    next = client.handle(reply).unwrap();
                }
            }
            assert!(client.is_ready() && server.is_ready(), "{backend:?}");
            // silent OT's default set chains the small one: a third flight
            let expected = match backend {
                Backend::Silent => 3,
                Backend::Iknp => 2,
            };
            assert_eq!(
                flights, expected,
                "{backend:?}: setup flights from the client"
            );
            for k in [3, 200, 1] {
                run_batch(&mut client, &mut server, demand(k));
                let (c0, s0) = (client.position(), server.position());
                let d = demand(k);
                let mut run_c = client.take_at(s0, &d).unwrap();
                let mut run_s = server.take_at(c0, &d).unwrap();
                take_and_check(&mut run_c, &mut run_s, &d);
                assert!(matches!(
                    server.take_at(c0, &d),
                    Err(OtError::Reused { .. })
                ));
                assert!(matches!(
                    client.take_at(s0, &d),
                    Err(OtError::Reused { .. })
                ));
            }
        }
    }

    /// A first setup message naming an unknown backend, or none, is
    /// refused by name.
    #[test]
    fn an_unknown_backend_is_refused() {
        for (payload, named) in [(vec![7; 33], "OT backend 7"), (vec![], "empty first setup")] {
            let mut server = OtEngine::new(Role::Server, BUDGET).unwrap();
            let e = server
                .handle(OtMessage::Setup { flight: 0, payload })
                .unwrap_err()
                .to_string();
            assert!(e.contains(named), "{e}");
        }
    }
}
