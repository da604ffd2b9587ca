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
/// The largest header block gathered, and the most its headers may decode
/// to: a CSI request's headers are a few hundred bytes.
const MAX_BLOCK: usize = 64 * 1024;
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
        }
    }

    /// Moves every whole frame of `incoming` to `ready`, rewriting header
    /// blocks. A block that does not decode goes on as it came: the server
    /// then answers it as it would have.
    fn process(&mut self) -> io::Result<()> {
        if self.preface_left > 0 {
            let take = self.preface_left.min(self.incoming.len());
            self.ready.extend(self.incoming.drain(..take));
            self.preface_left -= take;
            if self.preface_left > 0 {
                return Ok(());
            }
        }
        while self.incoming.len() >= FRAME_HEADER {
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
                        block.fragment.extend_from_slice(payload);
                        if block.fragment.len() > MAX_BLOCK {
                            return Err(too_large());
                        }
                    }
                }
                _ => {
                    self.ready.extend_from_slice(&frame);
                    continue;
                }
            }
            if flags & END_HEADERS != 0 {
                let block = self.block.take().expect("gathered above");
                self.emit(block);
            }
        }
        Ok(())
    }

    /// Decodes a whole block, mends its `:authority`, and queues it again
    /// as HEADERS (and CONTINUATIONs) for the server.
    fn emit(&mut self, block: Block) {
        let mut headers = Vec::new();
        let mut decoded_bytes = 0;
        let decoder = &mut self.decoder;
        // fluke-hpack panics on some malformed integers: caught, that block
        // goes on as it came and h2 refuses it.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decoder.decode_with_cb(&block.fragment, |name, value| {
                decoded_bytes += name.len() + value.len();
                if decoded_bytes <= MAX_BLOCK {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
        }));
        let decoded = match decoded {
            Ok(Ok(())) if decoded_bytes <= MAX_BLOCK => Ok(headers),
            _ => Err(()),
        };
        let encoded = match decoded {
            Ok(mut headers) => {
                for (name, value) in headers.iter_mut() {
                    if name.as_slice() == b":authority" && !is_authority(value) {
                        *value = STAND_IN.to_vec();
                    }
                }
                self.encoder
                    .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
            }
            // The client's table and ours now differ: the server, which sees
            // the block as sent, says so on the connection.
            Err(_) => block.fragment,
        };
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
            let mut chunk = [0u8; 8192];
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
                    this.process()?;
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
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    }

    #[test]
    fn a_path_as_authority_becomes_localhost_and_everything_else_passes() {
        let mut client = fluke_hpack::Encoder::new();
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":path", b"/csi.v1.Identity/Probe"),
            (b":authority", b"/var/lib/kubelet/plugins/x/csi.sock"),
            (b"content-type", b"application/grpc"),
        ];
        let block = client.encode(headers.clone());
        let (first, rest) = block.split_at(block.len() / 2);
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        wire.extend(frame(HEADERS, 0, 1, first));
        wire.extend(frame(CONTINUATION, END_HEADERS, 1, rest));
        wire.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0")); // DATA
        let mut stream = AnyAuthority::new(tokio::io::empty());
        // Fed a byte at a time: frames cut anywhere are gathered whole.
        for byte in wire {
            stream.incoming.push(byte);
            stream.process().unwrap();
        }
        let out = stream.ready;
        assert!(out.starts_with(PREFACE));
        let mut server = fluke_hpack::Decoder::new();
        let mut at = PREFACE.len() + FRAME_HEADER; // past SETTINGS
        let length = u32::from_be_bytes([0, out[at], out[at + 1], out[at + 2]]) as usize;
        assert_eq!((out[at + 3], out[at + 4]), (HEADERS, END_HEADERS));
        let decoded = server
            .decode(&out[at + FRAME_HEADER..at + FRAME_HEADER + length])
            .unwrap();
        let authority = decoded.iter().find(|(n, _)| n == b":authority").unwrap();
        assert_eq!(authority.1, b"localhost");
        assert_eq!(decoded.len(), headers.len());
        at += FRAME_HEADER + length;
        assert_eq!(&out[at + 3..at + 5], &[0x0, END_STREAM], "DATA passes");
        assert_eq!(&out[at + FRAME_HEADER..], b"\0\0\0\0\0");
    }

    #[test]
    fn a_valid_authority_is_kept() {
        assert!(is_authority(b"localhost"));
        assert!(is_authority(b"unix:9"));
        assert!(!is_authority(b"/run/csi/csi.sock"));
    }
}
