//! Frames: every message is a 4-byte big-endian length followed by that many
//! bytes of postcard-encoded [`ClientFrame`] or [`ServerFrame`]. The length is
//! checked against the reader's maximum before any of the body is read or
//! allocated, so an oversized frame costs the receiver four bytes.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use secinfer_ot::OtMessage;
use secinfer_protocol::private::PrivateMessage;
use secinfer_protocol::{MaskRequest, MaskedInput, MaskedOutput, OfflineHello, ProductReply};

/// Version of the wire protocol; both sides must agree exactly (2: the
/// reveal mode in the handshake, correlations and private batches; 3: the
/// offline phase's packings, named in every mask request; 4: the server's
/// per-session limit of preprocessed inferences in `Welcome`; 5: the OT
/// setup's first byte names the backend, silent OT by default; 6: silent
/// OT's setup chains its small LPN set, in five flights; 7: bit triples
/// carry a second product with the same `b`, and the comparison's carry
/// tree sends one masked `P_hi` for both ANDs of a merge).
pub const PROTOCOL_VERSION: u32 = 7;

/// Largest frame accepted by default: 64 MiB (an offline chunk is ~12 MiB; an
/// online batch of 100 CNN images ~0.6 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 << 20;

/// Bytes of a frame's body allocated before any arrive (more as they do).
const FIRST_BODY_CHUNK: usize = 64 << 10;

/// Largest handshake frame (token and digest are short).
pub const MAX_HELLO_BYTES: usize = 16 << 10;

/// Client to server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ClientFrame {
    /// First frame of a session, on the first stream.
    Hello {
        /// [`PROTOCOL_VERSION`] of the client
        version: u32,
        /// digest of the client's `client.onnx` (it must match the server's model)
        model_digest: String,
        /// what the client's model reveals (`logits`, `argmax`, `activations`)
        reveal: String,
        /// API token
        token: String,
    },
    /// Online: `x − r` for one op.
    Online(MaskedInput),
    /// Offline: the client's HE public key.
    OfflineHello(OfflineHello),
    /// Offline: a chunk of encrypted masks.
    Offline(MaskRequest),
    /// Offline, private modes: a message of the correlations' engine.
    Ot(OtMessage),
    /// Online, private modes: a message of a private batch.
    Private(PrivateMessage),
}

/// Server to client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ServerFrame {
    /// The handshake succeeded.
    Welcome {
        /// [`PROTOCOL_VERSION`] of the server
        version: u32,
        /// SecureLinear ops in the served model
        ops: u32,
        /// what the served model reveals
        reveal: String,
        /// preprocessed inferences (ready plus in flight) a session may
        /// hold; clients size their offline batches to stay within it
        max_pending: u64,
    },
    /// Online: `W·(x − r) + b + s`.
    Online(MaskedOutput),
    /// Offline, private modes: the engine's answer, if any.
    Ot(Option<OtMessage>),
    /// Online, private modes: a message of the server's run of a batch.
    Private(PrivateMessage),
    /// Offline: the public key is accepted.
    OfflineReady,
    /// Offline: part of an op's `Enc(W·r − s)`.
    OfflineReply(ProductReply),
    /// Offline: the last chunk is fully answered.
    OfflineDone,
}

/// What can go wrong with a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The declared length exceeds the maximum.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// declared length
        len: usize,
        /// the limit
        max: usize,
    },
    /// The body does not decode as the expected message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended inside a frame.
    #[error("the stream ended inside a frame")]
    Truncated,
    /// The rest of a frame did not arrive in time.
    #[error("a frame was not completed within {0:?}")]
    Stalled(std::time::Duration),
    /// Reading or writing failed (connection lost, reset, ...).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one frame (length prefix included), refusing to make a
/// frame the peer would refuse.
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    buf = postcard::to_extend(msg, buf).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = buf.len() - 4;
    if len > max.min(u32::MAX as usize) {
        return Err(FrameError::TooLarge { len, max });
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Decoding a frame allocates at most this many times its length at its
/// peak, plus a few kilobytes; `tests/decoder_fuzz.rs` holds every frame a
/// client can send to it. The worst case is a list of small integers: one
/// byte each on the wire, eight decoded, in a vector that grows by
/// doubling (up to 16 bytes per element while the last 8 are copied).
pub const DECODE_FACTOR: usize = 24;

/// The same for frames whose bulk is byte strings (keys, ciphertexts,
/// correlations and private-batch payloads): one byte decoded per byte
/// sent, in a vector that grows by doubling.
pub const BYTES_DECODE_FACTOR: usize = 3;

/// The most decoding a client's frame of `len` bytes whose body begins with
/// `prefix` may allocate (besides a few kilobytes), by its kind:
/// [`DECODE_FACTOR`] times its length for online requests and the start of
/// a private batch (lists of integers), [`BYTES_DECODE_FACTOR`] times for
/// the rest. The kind is in the body's first two bytes.
pub fn client_decode_bound(prefix: &[u8], len: usize) -> usize {
    // postcard writes an enum's variant index first (one byte below 128)
    let integers = match prefix {
        [1, ..] => true,    // Online(MaskedInput)
        [5, 0, ..] => true, // Private(Begin { ids, .. })
        _ => false,
    };
    let factor = if integers {
        DECODE_FACTOR
    } else {
        BYTES_DECODE_FACTOR
    };
    len.saturating_mul(factor)
}

/// Bytes a client's frame of `len` bytes whose body begins with `prefix`
/// (its first two bytes, or all of a shorter body) may take on the server
/// from its first byte to its decoded message: the body as it grows (a
/// buffer that doubles, old and new copies held at once while it grows,
/// at most twice the frame) plus what decoding may allocate
/// ([`client_decode_bound`]).
pub fn client_frame_bound(prefix: &[u8], len: usize) -> usize {
    len.saturating_mul(2)
        .saturating_add(client_decode_bound(prefix, len))
}

/// Bytes of a body [`client_frame_bound`] needs to see.
pub const BOUND_PREFIX: usize = 2;

/// Decodes a frame's body (without its length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(body).map_err(|e| {
        FrameError::Malformed(match e {
            // postcard drops the message of a check made while decoding
            postcard::Error::SerdeDeCustom => format!(
                "a value broke a check while decoding (an unknown variant, or more than {} ciphertexts in one message)",
                secinfer_protocol::offline::CIPHERTEXTS_PER_MESSAGE
            ),
            other => other.to_string(),
        })
    })
}

/// Writes one frame; returns the bytes written.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
    max: usize,
) -> Result<usize, FrameError> {
    let buf = encode(msg, max)?;
    w.write_all(&buf).await?;
    Ok(buf.len())
}

/// Reads one frame: `Ok(None)` if the stream ends cleanly before it, else the
/// message and the bytes read.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    read_frame_within(r, max, None).await
}

/// As [`read_frame`], but once a frame has begun, its remaining bytes must
/// arrive within `body_timeout` (a peer that stalls inside a frame would
/// otherwise hold the reader forever while keep-alives keep it connected).
pub async fn read_frame_within<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    max: usize,
    body_timeout: Option<std::time::Duration>,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some(len) = read_length(r, max, body_timeout).await? else {
        return Ok(None);
    };
    read_body(r, len, body_timeout).await.map(Some)
}

/// Reads a frame's length prefix: `Ok(None)` if the stream ends cleanly
/// before it; a length above `max` is refused. Once the first byte has
/// come, the rest must within `timeout`.
pub async fn read_length<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    timeout: Option<std::time::Duration>,
) -> Result<Option<usize>, FrameError> {
    let mut len = [0u8; 4];
    let first = r.read(&mut len).await?;
    if first == 0 {
        return Ok(None);
    }
    let rest = async {
        let mut got = first;
        while got < 4 {
            let n = r.read(&mut len[got..]).await?;
            if n == 0 {
                return Err(FrameError::Truncated);
            }
            got += n;
        }
        Ok(())
    };
    within(timeout, rest).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(Some(len))
}

/// Reads and decodes the body of a frame whose length prefix said `len`
/// (within `timeout`); returns the message and the frame's bytes.
pub async fn read_body<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    len: usize,
    timeout: Option<std::time::Duration>,
) -> Result<(T, usize), FrameError> {
    let body = read_body_bytes(r, len, timeout).await?;
    Ok((decode(&body)?, len + 4))
}

/// Reads the body of a frame whose length prefix said `len` (within
/// `timeout`), undecoded.
pub async fn read_body_bytes<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
    timeout: Option<std::time::Duration>,
) -> Result<Vec<u8>, FrameError> {
    read_body_rest(r, Vec::new(), len, timeout).await
}

/// Reads the rest of a body of `len` bytes whose first bytes are `body`
/// (within `timeout`).
pub async fn read_body_rest<R: AsyncRead + Unpin>(
    r: &mut R,
    mut body: Vec<u8>,
    len: usize,
    timeout: Option<std::time::Duration>,
) -> Result<Vec<u8>, FrameError> {
    // The buffer grows as bytes arrive: a peer that declares a large frame
    // and sends little costs what it sent, not what it declared.
    // (grown by hand: `read_to_end` doubles, up to twice the frame)
    within(timeout, async {
        body.reserve_exact(len.min(FIRST_BODY_CHUNK).saturating_sub(body.len()));
        while body.len() < len {
            let want = (len - body.len()).min(body.len().max(FIRST_BODY_CHUNK));
            let at = body.len();
            body.reserve_exact(want);
            body.resize(at + want, 0);
            let n = r.read(&mut body[at..]).await?;
            body.truncate(at + n);
            if n == 0 {
                return Err(FrameError::Truncated);
            }
        }
        Ok(body)
    })
    .await
}

async fn within<T>(
    timeout: Option<std::time::Duration>,
    f: impl std::future::Future<Output = Result<T, FrameError>>,
) -> Result<T, FrameError> {
    match timeout {
        None => f.await,
        Some(t) => tokio::time::timeout(t, f)
            .await
            .map_err(|_| FrameError::Stalled(t))?,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_payloads_encode_as_sequences_of_bytes_did() {
        // Payloads and ciphertexts go through serde as byte strings (one
        // copy). The bytes on the wire must be what a plain Vec<u8> gives,
        // and a frame written either way must decode the same.
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        enum PlainOt {
            Setup { flight: u32, payload: Vec<u8> },
        }
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct PlainReply {
            first_id: u64,
            op: u32,
            outputs: Vec<u32>,
            ciphertexts: Vec<Vec<u8>>,
        }
        let payload: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let ot = OtMessage::Setup {
            flight: 3,
            payload: payload.clone(),
        };
        let plain = PlainOt::Setup {
            flight: 3,
            payload: payload.clone(),
        };
        let bytes = postcard::to_allocvec(&ot).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&plain).unwrap());
        assert_eq!(postcard::from_bytes::<OtMessage>(&bytes).unwrap(), ot);

        let reply = ProductReply {
            first_id: secinfer_protocol::PreprocessingId(9),
            op: 2,
            outputs: vec![0, 5],
            ciphertexts: vec![payload.clone(), vec![], vec![1, 2, 3]],
        };
        let plain = PlainReply {
            first_id: 9,
            op: 2,
            outputs: vec![0, 5],
            ciphertexts: reply.ciphertexts.clone(),
        };
        let bytes = postcard::to_allocvec(&reply).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&plain).unwrap());
        assert_eq!(postcard::from_bytes::<ProductReply>(&bytes).unwrap(), reply);

        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct PlainStep {
            step: u32,
            seq: u32,
            payload: Vec<u8>,
        }
        let step = secinfer_mpc::Message {
            step: 4,
            seq: 1,
            payload: payload.clone(),
        };
        let plain = PlainStep {
            step: 4,
            seq: 1,
            payload,
        };
        let bytes = postcard::to_allocvec(&step).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&plain).unwrap());
        assert_eq!(
            postcard::from_bytes::<secinfer_mpc::Message>(&bytes).unwrap(),
            step
        );
    }

    fn hello() -> ClientFrame {
        ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            model_digest: "ab".repeat(32),
            reveal: "logits".into(),
            token: "t".into(),
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_count_bytes() {
        let buf = encode(&hello(), 1024).unwrap();
        let mut r = &buf[..];
        let (msg, n): (ClientFrame, usize) = read_frame(&mut r, 1024).await.unwrap().unwrap();
        assert_eq!(n, buf.len());
        assert!(matches!(
            msg,
            ClientFrame::Hello {
                version: PROTOCOL_VERSION,
                ..
            }
        ));
        let end: Option<(ClientFrame, usize)> = read_frame(&mut r, 1024).await.unwrap();
        assert!(end.is_none());
    }

    #[tokio::test]
    async fn oversized_truncated_and_garbage_frames_are_named() {
        let buf = encode(&hello(), 1024).unwrap();
        let mut r = &buf[..];
        let e = read_frame::<_, ClientFrame>(&mut r, 10).await.unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { max: 10, .. }), "{e}");
        let mut r = &buf[..buf.len() - 1];
        let e = read_frame::<_, ClientFrame>(&mut r, 1024)
            .await
            .unwrap_err();
        assert!(matches!(e, FrameError::Truncated), "{e}");
        use tokio::io::AsyncWriteExt;
        let (mut w, mut r2) = tokio::io::duplex(64);
        w.write_all(&[0, 0, 0, 9, 1]).await.unwrap();
        let e = read_frame_within::<_, ClientFrame>(
            &mut r2,
            1024,
            Some(std::time::Duration::from_millis(50)),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, FrameError::Stalled(_)), "{e}");
        let garbage = [0u8, 0, 0, 3, 0xff, 0xff, 0xff];
        let e = read_frame::<_, ClientFrame>(&mut &garbage[..], 1024)
            .await
            .unwrap_err();
        assert!(matches!(e, FrameError::Malformed(_)), "{e}");
        assert!(matches!(
            encode(&hello(), 8),
            Err(FrameError::TooLarge { max: 8, .. })
        ));
    }

    /// A frame of a million empty ciphertexts (~1 MB on the wire) would be
    /// ~24 MB of vector headers once decoded; the decoder stops at the
    /// message's limit instead.
    #[tokio::test]
    async fn a_frame_of_many_empty_ciphertexts_is_refused_while_decoding() {
        let request = |n: usize| {
            ClientFrame::Offline(MaskRequest {
                first_id: secinfer_protocol::PreprocessingId(0),
                count: 1,
                op: 0,
                offset: 0,
                layout: 0,
                ciphertexts: vec![Vec::new(); n],
            })
        };
        let limit = secinfer_protocol::offline::CIPHERTEXTS_PER_MESSAGE;
        let ok = encode(&request(limit), 1 << 24).unwrap();
        assert!(
            read_frame::<_, ClientFrame>(&mut &ok[..], 1 << 24)
                .await
                .is_ok()
        );
        let buf = encode(&request(1_000_000), 1 << 24).unwrap();
        let e = read_frame::<_, ClientFrame>(&mut &buf[..], 1 << 24)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, FrameError::Malformed(m) if m.contains("more than 64 ciphertexts in one message")),
            "{e}"
        );
    }
}
