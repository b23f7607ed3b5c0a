//! The client's link to the server, as the client-side code sees it: one
//! blocking call per message exchange. The in-process channel
//! (`secinfer-tract-ext`) and the QUIC channel (`secinfer-transport`)
//! implement it; everything above (the client model, the preprocessing pool,
//! the bench) is written against this trait only.

use secinfer_ot::OtMessage;

use crate::private::PrivateMessage;
use crate::{MaskRequest, MaskedInput, MaskedOutput, OfflineHello, ProductReply};

/// The client's link to the server, both phases. Offline and online calls
/// may come from different threads (the pool runs offline in the background).
pub trait Channel: Send + Sync {
    /// Online: sends `x − r` and waits for `W·(x − r) + b + s`.
    fn round_trip(&self, request: MaskedInput) -> anyhow::Result<MaskedOutput>;
    /// Offline: sends the client's public key (once per session).
    fn hello(&self, hello: OfflineHello) -> anyhow::Result<()>;
    /// Offline: sends a chunk of encrypted masks; the server's reply parts
    /// (none until an op's chunks are complete) go to `on_reply` as they come.
    /// Returns when the server has answered the chunk completely.
    fn offline(
        &self,
        request: MaskRequest,
        on_reply: &mut dyn FnMut(ProductReply) -> anyhow::Result<()>,
    ) -> anyhow::Result<()>;
    /// Offline, correlations: sends a message of the OT engine and returns
    /// the server's answer, if it has one.
    fn ot(&self, message: OtMessage) -> anyhow::Result<Option<OtMessage>>;
    /// Online, private mode: sends a message of the batch in progress.
    fn send_private(&self, message: PrivateMessage) -> anyhow::Result<()>;
    /// Online, private mode: waits for the server's next message.
    fn recv_private(&self) -> anyhow::Result<PrivateMessage>;
    /// Bytes exchanged so far, per phase and direction.
    fn traffic(&self) -> Traffic;
    /// The largest message the channel carries; callers split online
    /// batches so that requests and answers stay below it.
    fn max_message_bytes(&self) -> usize {
        usize::MAX
    }
    /// The server's limit of preprocessed inferences (ready plus in
    /// flight) per session, if it said; callers keep below it.
    fn max_pending(&self) -> Option<usize> {
        None
    }
}

/// Bytes a [`Channel`] has carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// online, client to server
    pub online_up: u64,
    /// online, server to client
    pub online_down: u64,
    /// offline, client to server (public key and encrypted masks)
    pub offline_up: u64,
    /// offline, server to client
    pub offline_down: u64,
    /// correlations (OT) phase, client to server
    pub ot_up: u64,
    /// correlations (OT) phase, server to client
    pub ot_down: u64,
}
