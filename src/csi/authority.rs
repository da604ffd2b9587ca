//! Any `:authority` on the plugin's unix socket. The HTTP/2 server under
//! tonic (h2) resets every stream whose `:authority` is not a URI authority,
//! and gRPC clients disagree on what to send over a unix socket: grpc-go
//! (kubelet, csi-sanity) sends `localhost`, grpcio and grpc-java the
//! socket's path. The socket has one server, so the name means nothing:
//! each connection's incoming header blocks are decoded (HPACK, with the
//! client's dynamic table), an `:authority` that is not one becomes
//! `localhost`, and the block is encoded again for the server; every
//! other byte passes as it came. Writes go straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a client says first, before any frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer accepts (SETTINGS_MAX_FRAME_SIZE's
/// least): re-encoded blocks are cut to it.
const MAX_FRAME: usize = 16_384;
/// The largest frame a client may send: h2 advertises no more than
/// SETTINGS_MAX_FRAME_SIZE's default.
const MAX_INCOMING_FRAME: usize = 16_384;
/// The largest header block gathered, the largest header list it may
/// decode to (counted as SETTINGS_MAX_HEADER_LIST_SIZE counts: name, value
/// and 32 bytes a field), and so the most a block re-encoded may take: a
/// CSI request's headers are a few hundred bytes. With the frame limit
/// below, what one connection holds here is bounded by a few times this.
const MAX_BLOCK: usize = 64 * 1024;
/// What HTTP/2 counts for each field of a header list besides its name and
/// value (RFC 7540 §6.5.2): it also bounds the fields of a list, so that
/// many empty fields cost as much as a few long ones.
const FIELD_OVERHEAD: usize = 32;
/// The most bytes queued for the server at once. Frames are moved only
/// while less than a block's worth waits, and the last one moved adds at
/// most a block and its frames' headers: a block of one-byte references to
/// a long field the client indexed but our encoder did not can re-encode to
/// thousands of times its size, so what is ready must be bounded by itself,
/// not by what was read.
const MAX_READY: usize = 2 * MAX_BLOCK + (MAX_BLOCK / MAX_FRAME + 1) * FRAME_HEADER;
/// What one read from the client takes.
const READ_CHUNK: usize = 8192;
/// HPACK's dynamic table, as h2 advertises it (SETTINGS_HEADER_TABLE_SIZE).
const TABLE_SIZE: usize = 4096;

/// The authority the server sees where the client's is not one.
const STAND_IN: &[u8] = b"localhost";

/// A header block being gathered (HEADERS, then CONTINUATIONs).
struct Block {
    stream: u32,
    end_stream: bool,
    fragment: Vec<u8>,
}

/// A unix stream whose incoming header blocks carry a valid `:authority`.
pub struct AnyAuthority<S> {
    inner: S,
    /// Bytes read and not yet made into whole frames.
    incoming: Vec<u8>,
    /// Bytes ready for the server.
    ready: Vec<u8>,
    ready_from: usize,
    preface_left: usize,
    block: Option<Block>,
    decoder: fluke_hpack::Decoder<'static>,
    encoder: fluke_hpack::Encoder<'static>,
    /// Past a limit: what was ready before goes to the server, then the
    /// connection ends.
    failed: bool,
}

impl<S> AnyAuthority<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            incoming: Vec::new(),
            ready: Vec::new(),
            ready_from: 0,
            preface_left: PREFACE.len(),
            block: None,
            decoder: {
                let mut decoder = fluke_hpack::Decoder::new();
                decoder.set_max_allowed_table_size(TABLE_SIZE);
                decoder
            },
            encoder: fluke_hpack::Encoder::new(),
            failed: false,
        }
    }

    /// `process`, whose failure is told once the frames before it are read.
    fn advance(&mut self) {
        if self.process().is_err() {
            self.failed = true;
        }
    }

    /// Moves whole frames of `incoming` to `ready`, rewriting header
    /// blocks, until a block's worth is ready (the rest waits for the
    /// server to take it). A block that does not decode goes on as it came:
    /// the server then answers it as it would have.
    fn process(&mut self) -> io::Result<()> {
        if self.preface_left > 0 {
            let take = self.preface_left.min(self.incoming.len());
            self.ready.extend(self.incoming.drain(..take));
            self.preface_left -= take;
            if self.preface_left > 0 {
                return Ok(());
            }
        }
        while self.ready.len() < MAX_BLOCK && self.incoming.len() >= FRAME_HEADER {
            let length =
                u32::from_be_bytes([0, self.incoming[0], self.incoming[1], self.incoming[2]])
                    as usize;
            if length > MAX_INCOMING_FRAME {
                return Err(too_large());
            }
            if self.incoming.len() < FRAME_HEADER + length {
                return Ok(());
            }
            let frame: Vec<u8> = self.incoming.drain(..FRAME_HEADER + length).collect();
            let (kind, flags) = (frame[3], frame[4]);
            let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            let payload = &frame[FRAME_HEADER..];
            match kind {
                // A block left open is a protocol error h2 would see too.
                HEADERS if self.block.is_some() => return Err(too_large()),
                HEADERS => {
                    let Some(fragment) = headers_fragment(flags, payload) else {
                        self.ready.extend_from_slice(&frame);
                        continue;
                    };
                    self.block = Some(Block {
                        stream,
                        end_stream: flags & END_STREAM != 0,
                        fragment: fragment.to_vec(),
                    });
                }
                CONTINUATION if self.block.as_ref().is_some_and(|b| b.stream == stream) => {
                    if let Some(block) = self.block.as_mut() {
                        if block.fragment.len() + payload.len() > MAX_BLOCK {
                            return Err(too_large());
                        }
                        block.fragment.extend_from_slice(payload);
                    }
                }
                _ => {
                    self.ready.extend_from_slice(&frame);
                    continue;
                }
            }
            if flags & END_HEADERS != 0 {
                let block = self.block.take().expect("gathered above");
                self.emit(block)?;
            }
        }
        debug_assert!(self.ready.len() <= MAX_READY, "{}", self.ready.len());
        Ok(())
    }

    /// Decodes a whole block, mends its `:authority`, and queues it again
    /// as HEADERS (and CONTINUATIONs) for the server.
    fn emit(&mut self, block: Block) -> io::Result<()> {
        let mut headers = Vec::new();
        let mut list_size = 0;
        let decoder = &mut self.decoder;
        // fluke-hpack panics on some malformed integers: caught, that block
        // goes on as it came and h2 refuses it.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decoder.decode_with_cb(&block.fragment, |name, value| {
                list_size += name.len() + value.len() + FIELD_OVERHEAD;
                if list_size <= MAX_BLOCK {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
        }));
        let encoded = match decoded {
            Ok(Ok(())) if list_size <= MAX_BLOCK => {
                for (name, value) in headers.iter_mut() {
                    if name.as_slice() == b":authority" && !is_authority(value) {
                        *value = STAND_IN.to_vec();
                    }
                }
                self.encoder
                    .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
            }
            // Valid, but past the limit: it cannot go on as it came, for
            // the server would decode it (h2 takes lists of up to 16 MiB)
            // with a table that is now ours, not the client's, and every
            // later block of the connection would mean something else.
            Ok(Ok(())) => return Err(too_large()),
            // The client's table and ours now differ: the server, which sees
            // the block as sent, says so on the connection.
            _ => block.fragment,
        };
        // Each field re-encoded takes at most its name, its value and a few
        // bytes of lengths, less than the 32 counted for it.
        if encoded.len() > MAX_BLOCK {
            return Err(too_large());
        }
        let chunks: Vec<&[u8]> = if encoded.is_empty() {
            vec![&[]]
        } else {
            encoded.chunks(MAX_FRAME).collect()
        };
        let last = chunks.len() - 1;
        for (index, chunk) in chunks.into_iter().enumerate() {
            let kind = if index == 0 { HEADERS } else { CONTINUATION };
            let mut flags = if index == last { END_HEADERS } else { 0 };
            if index == 0 && block.end_stream {
                flags |= END_STREAM;
            }
            let length = (chunk.len() as u32).to_be_bytes();
            self.ready.extend_from_slice(&length[1..]);
            self.ready.push(kind);
            self.ready.push(flags);
            self.ready.extend_from_slice(&block.stream.to_be_bytes());
            self.ready.extend_from_slice(chunk);
        }
        Ok(())
    }
}

/// The header block fragment of a HEADERS payload (padding and priority
/// left out; priority is advisory and gRPC sends none).
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let (mut start, mut end) = (0, payload.len());
    if flags & PADDED != 0 {
        let padding = *payload.first()? as usize;
        start += 1;
        end = end.checked_sub(padding)?;
    }
    if flags & PRIORITY != 0 {
        start += 5;
    }
    payload.get(start..end)
}

fn too_large() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "an HTTP/2 frame or header block past the plugin's limits",
    )
}

/// Whether h2 takes `value` as an `:authority`.
fn is_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

impl<S: AsyncRead + Unpin> AsyncRead for AnyAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_from < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_from);
                buf.put_slice(&this.ready[this.ready_from..this.ready_from + n]);
                this.ready_from += n;
                if this.ready_from == this.ready.len() {
                    this.ready.clear();
                    this.ready_from = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.failed {
                return Poll::Ready(Err(too_large()));
            }
            // Whole frames held back last time go before anything is read.
            if this.incoming.len() >= FRAME_HEADER {
                this.advance();
                if !this.ready.is_empty() || this.failed {
                    continue;
                }
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // The end: whatever is left is not a whole frame.
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => {
                    this.incoming.extend_from_slice(read.filled());
                    this.advance();
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AnyAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S> tonic::transport::server::Connected for AnyAuthority<S> {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

#[cfg(test)]
mod tests;
