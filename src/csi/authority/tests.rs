//! Unit tests of `authority`, apart so the module reads as its model.

use super::*;
use proptest::prelude::*;

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

/// A client's bytes arriving `step` at a time.
struct Trickle {
    bytes: Vec<u8>,
    at: usize,
    step: usize,
}

impl AsyncRead for Trickle {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = this
            .step
            .min(buf.remaining())
            .min(this.bytes.len() - this.at);
        buf.put_slice(&this.bytes[this.at..this.at + n]);
        this.at += n;
        Poll::Ready(Ok(()))
    }
}

/// What the server reads through the shim, read by read as h2 reads
/// (`read_size` at a time), with the most the shim held at any point
/// checked against its bounds and each read timed.
fn pump(wire: Vec<u8>, step: usize, read_size: usize) -> (Vec<u8>, io::Result<()>) {
    use tokio::io::AsyncReadExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut stream = AnyAuthority::new(Trickle {
        bytes: wire,
        at: 0,
        step,
    });
    let mut out = Vec::new();
    let mut buf = vec![0u8; read_size];
    loop {
        let started = std::time::Instant::now();
        let read = rt.block_on(stream.read(&mut buf));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "one read took {:?}",
            started.elapsed()
        );
        assert!(stream.ready.len() <= MAX_READY, "{}", stream.ready.len());
        assert!(
            stream.incoming.len() < FRAME_HEADER + MAX_INCOMING_FRAME + READ_CHUNK,
            "{}",
            stream.incoming.len()
        );
        let fragment = stream.block.as_ref().map_or(0, |b| b.fragment.len());
        assert!(fragment <= MAX_BLOCK, "{fragment}");
        match read {
            Ok(0) => return (out, Ok(())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(error) => {
                assert_eq!(error.kind(), io::ErrorKind::InvalidData);
                return (out, Err(error));
            }
        }
    }
}

/// HPACK integers past what fits a usize: a decoder that trusted them
/// would overflow or loop.
fn long_integer() -> impl Strategy<Value = Vec<u8>> {
    (any::<u8>(), 0usize..24, any::<u8>()).prop_map(|(first, more, last)| {
        let mut out = vec![first | 0x0f];
        out.extend(std::iter::repeat_n(0xff, more));
        out.push(last);
        out
    })
}

/// A header block a real encoder made (fluke-hpack's, the one used
/// here), cut anywhere: garbage that is close to valid.
fn near_block() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(("[a-z:-]{0,12}", "[ -~]{0,64}"), 0..8),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(headers, cut)| {
            let block = fluke_hpack::Encoder::new()
                .encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
            let cut = cut.index(block.len() + 1);
            block[..cut].to_vec()
        })
}

/// One frame of any kind, flags and stream, whose length may lie.
fn hostile_frame() -> impl Strategy<Value = Vec<u8>> {
    let kind = prop_oneof![
        3 => Just(HEADERS),
        2 => Just(CONTINUATION),
        1 => any::<u8>(),
    ];
    let payload = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(any::<u8>(), 0..4096),
        long_integer(),
        near_block(),
        prop::collection::vec(long_integer(), 1..8).prop_map(|v| v.concat()),
    ];
    let lie = prop_oneof![
        4 => Just(None),
        1 => (0u32..=0xff_ffff).prop_map(Some),
        1 => (16_000u32..17_000).prop_map(Some),
    ];
    (kind, any::<u8>(), 0u32..4, payload, lie).prop_map(|(kind, flags, stream, payload, lie)| {
        let mut out = frame(kind, flags, stream, &payload);
        if let Some(length) = lie {
            out[..3].copy_from_slice(&length.to_be_bytes()[1..]);
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any bytes a client sends: no panic, the shim never holds more
    /// than its bounds (checked in `pump`), every read returns within
    /// a bound, and an error is only ever "past the limits".
    #[test]
    fn hostile_bytes_never_panic_grow_past_the_bounds_or_stall(
        preface in prop_oneof![3 => Just(PREFACE.to_vec()), 1 => prop::collection::vec(any::<u8>(), 0..30)],
        frames in prop::collection::vec(hostile_frame(), 0..16),
        tail in prop::collection::vec(any::<u8>(), 0..32),
        step in prop_oneof![Just(1usize), 1usize..64, 1usize..20_000],
        read_size in prop_oneof![Just(1usize), 1usize..100_000],
    ) {
        let mut wire = preface;
        wire.extend(frames.concat());
        wire.extend(tail);
        let _ = pump(wire, step, read_size);
    }
}

/// A long field the client indexed, as `:path` (whose name our
/// encoder finds in the static table, so it does not index the value),
/// then thousands of one-byte blocks referring to it: each re-encodes
/// to the whole value. What waits for the server stays bounded; every
/// block still arrives.
#[test]
fn blocks_that_re_encode_thousands_of_times_larger_are_held_back() {
    let value = vec![b'p'; 4000];
    // Literal with incremental indexing, name index 4 (`:path`);
    // 4000 as a 7-bit-prefix integer.
    let mut first = vec![0x44, 0x7f, 0xa1, 0x1e];
    first.extend(&value);
    let mut wire = PREFACE.to_vec();
    wire.extend(frame(HEADERS, END_HEADERS, 1, &first));
    let blocks = 2_000;
    for n in 0..blocks {
        // Index 62: the newest entry of the dynamic table.
        wire.extend(frame(HEADERS, END_HEADERS, 3 + 2 * n, &[0xbe]));
    }
    let (out, outcome) = pump(wire, READ_CHUNK, 16 * 1024);
    outcome.unwrap();
    let mut server = fluke_hpack::Decoder::new();
    let mut at = PREFACE.len();
    let mut seen = 0;
    while at < out.len() {
        let length = u32::from_be_bytes([0, out[at], out[at + 1], out[at + 2]]) as usize;
        let decoded = server
            .decode(&out[at + FRAME_HEADER..at + FRAME_HEADER + length])
            .unwrap();
        assert_eq!(decoded, vec![(b":path".to_vec(), value.clone())]);
        seen += 1;
        at += FRAME_HEADER + length;
    }
    assert_eq!(seen, blocks + 1);
}

/// A client's dynamic table and the shim's encoder's differ as soon as
/// the client indexes a field the shim's encoder does not (a `:path`,
/// whose name is in the static table). A block past the bound that
/// went on as it came would be read against the server's table (the
/// shim's), not the client's: here 17 references to the client's long
/// `:path` would reach the server as 17 `x-a: 1`. It ends the
/// connection instead.
#[test]
fn a_list_past_the_bound_ends_the_connection_rather_than_being_misread() {
    // Block 1: `x-a: 1` (literal, indexed; both index it), then `:path`
    // of 4000 bytes (literal with name index 4, indexed by the client
    // only). The client's table: 62 `:path`, 63 `x-a`; the shim's: 62
    // `x-a`.
    let mut first = vec![0x40, 3, b'x', b'-', b'a', 1, b'1', 0x44, 0x7f, 0xa1, 0x1e];
    first.extend(vec![b'p'; 4000]);
    let mut wire = PREFACE.to_vec();
    wire.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &first));
    // Block 2: 17 times index 62, the client's `:path` (68 KiB decoded).
    wire.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &[0xbe; 17]));
    let (out, outcome) = pump(wire, READ_CHUNK, 16 * 1024);
    assert!(outcome.is_err(), "a list past the bound went on");
    let seen = h2_server_reads(&out);
    // Block 1 alone (a request without `:method`, which h2 resets).
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        !matches!(&seen[0], Seen::Headers { stream: 3, .. }),
        "{seen:?}"
    );
}

/// One request as a client builds it.
#[derive(Debug, Clone)]
struct Request {
    authority: Option<String>,
    path: String,
    fields: Vec<(String, Vec<u8>, bool)>,
    end_stream: bool,
}

fn field() -> impl Strategy<Value = (String, Vec<u8>, bool)> {
    let name = prop_oneof![
        Just("content-type".to_string()),
        Just("te".to_string()),
        Just("user-agent".to_string()),
        Just("grpc-timeout".to_string()),
        Just("authorization".to_string()),
        "x-[a-z]{1,8}",
    ];
    let value = prop_oneof![
        8 => "[ -~]{0,40}".prop_map(String::into_bytes),
        1 => (1usize..6000, any::<u8>()).prop_map(|(n, c)| vec![b'a' + c % 26; n]),
    ];
    // h2 refuses a `te` other than `trailers`, but sees it or not
    // depending on where the block's frames are cut: gRPC's own.
    (name, value, any::<bool>()).prop_map(|(name, value, sensitive)| match name.as_str() {
        "te" => (name, b"trailers".to_vec(), sensitive),
        _ => (name, value, sensitive),
    })
}

fn request() -> impl Strategy<Value = Request> {
    let authority = prop_oneof![
        Just(None),
        Just(Some("localhost".to_string())),
        "[a-z]{1,10}(:[0-9]{1,5})?".prop_map(Some),
        // A unix socket's path, as grpcio and grpc-java send it.
        "(/[a-z0-9_.-]{1,12}){1,6}/csi\\.sock".prop_map(Some),
    ];
    (
        authority,
        "/csi\\.v1\\.(Node|Identity)/[A-Za-z]{1,24}",
        // A field repeated: h2 indexes it once and refers to it after,
        // so a list may decode to far more than its block's size.
        prop::collection::vec(
            (field(), prop_oneof![4 => Just(1usize), 1 => 1usize..16]),
            0..12,
        ),
        any::<bool>(),
    )
        .prop_map(|(authority, path, fields, end_stream)| Request {
            authority,
            path,
            fields: fields
                .into_iter()
                .flat_map(|(field, copies)| std::iter::repeat_n(field, copies))
                .collect(),
            end_stream,
        })
}

/// A frame as h2's server codec reads it.
#[derive(Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // a test's few frames
enum Seen {
    Headers {
        stream: u32,
        end_stream: bool,
        pseudo: h2::frame::Pseudo,
        fields: http::HeaderMap,
    },
    Data {
        stream: u32,
        payload: Vec<u8>,
    },
    Other(String),
}

/// The bytes h2's own client codec (HPACK encoder, CONTINUATION
/// splitting and all) sends for `requests`, after the preface.
fn h2_client_bytes(requests: &[Request], table_size: Option<usize>) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let (ours, mut theirs) = tokio::io::duplex(1 << 24);
        let mut codec: h2::Codec<_, bytes::Bytes> = h2::Codec::new(ours);
        if let Some(size) = table_size {
            codec.set_send_header_table_size(size);
        }
        for (n, request) in requests.iter().enumerate() {
            let stream = h2::frame::StreamId::from(1 + 2 * n as u32);
            let uri = match &request.authority {
                Some(a) if is_authority(a.as_bytes()) => format!("http://{a}{}", request.path),
                _ => format!("http://x{}", request.path),
            };
            let mut pseudo =
                h2::frame::Pseudo::request(http::Method::POST, uri.parse().unwrap(), None);
            match &request.authority {
                None => pseudo.authority = None,
                Some(a) if !is_authority(a.as_bytes()) => {
                    // h2 builds an `:authority` only from a URI; a
                    // path's string stands in for one that is not.
                    let holder = h2::frame::Pseudo::request(
                        http::Method::GET,
                        format!("http://x{a}").parse().unwrap(),
                        None,
                    );
                    pseudo.authority = holder.path;
                }
                Some(_) => {}
            }
            let mut fields = http::HeaderMap::new();
            for (name, value, sensitive) in &request.fields {
                let mut value = http::HeaderValue::from_bytes(value).unwrap();
                value.set_sensitive(*sensitive);
                fields.append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value,
                );
            }
            let mut headers = h2::frame::Headers::new(stream, pseudo, fields);
            if request.end_stream {
                headers.set_end_stream();
            }
            std::future::poll_fn(|cx| codec.poll_ready(cx))
                .await
                .unwrap();
            codec.buffer(headers.into()).unwrap();
            if !request.end_stream {
                let mut data =
                    h2::frame::Data::new(stream, bytes::Bytes::from_static(b"\0\0\0\0\0"));
                data.set_end_stream(true);
                std::future::poll_fn(|cx| codec.poll_ready(cx))
                    .await
                    .unwrap();
                codec.buffer(data.into()).unwrap();
            }
        }
        std::future::poll_fn(|cx| codec.flush(cx)).await.unwrap();
        drop(codec);
        let mut out = PREFACE.to_vec();
        theirs.read_to_end(&mut out).await.unwrap();
        out
    })
}

/// What h2's server codec reads from `wire` (past the preface).
fn h2_server_reads(wire: &[u8]) -> Vec<Seen> {
    use tokio::io::AsyncWriteExt;
    assert!(wire.starts_with(PREFACE));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut ours, theirs) = tokio::io::duplex(wire.len() + 1);
        ours.write_all(&wire[PREFACE.len()..]).await.unwrap();
        drop(ours);
        let mut codec: h2::Codec<_, bytes::Bytes> = h2::Codec::new(theirs);
        let mut seen = Vec::new();
        while let Some(frame) = tokio_stream::StreamExt::next(&mut codec).await {
            seen.push(match frame {
                Ok(h2::frame::Frame::Headers(headers)) => {
                    let stream = u32::from(headers.stream_id());
                    let end_stream = headers.is_end_stream();
                    let (pseudo, fields) = headers.into_parts();
                    Seen::Headers {
                        stream,
                        end_stream,
                        pseudo,
                        fields,
                    }
                }
                Ok(h2::frame::Frame::Data(data)) => Seen::Data {
                    stream: u32::from(data.stream_id()),
                    payload: data.payload().to_vec(),
                },
                other => Seen::Other(format!("{other:?}")),
            });
        }
        seen
    })
}

/// A header list's size as HTTP/2 counts it (and the shim bounds it).
fn list_size(pseudo: &h2::frame::Pseudo, fields: &http::HeaderMap) -> usize {
    let mut pairs: Vec<(usize, usize)> = fields
        .iter()
        .map(|(n, v)| (n.as_str().len(), v.len()))
        .collect();
    if let Some(method) = &pseudo.method {
        pairs.push((":method".len(), method.as_str().len()));
    }
    for (name, value) in [
        (":scheme", &pseudo.scheme),
        (":authority", &pseudo.authority),
        (":path", &pseudo.path),
    ] {
        if let Some(value) = value {
            pairs.push((name.len(), value.len()));
        }
    }
    pairs.iter().map(|(n, v)| n + v + FIELD_OVERHEAD).sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Requests as h2's client encodes them (its dynamic table, its
    /// size updates, sensitive fields, CONTINUATIONs) reach h2's server
    /// decoder exactly as sent but for an `:authority` that is not one,
    /// which reads `localhost`. A list past the shim's bound ends the
    /// connection there: it is never passed on as it came.
    #[test]
    fn a_real_clients_header_blocks_round_trip_but_for_the_authority(
        requests in prop::collection::vec(request(), 1..5),
        table_size in prop_oneof![Just(None), Just(Some(0usize)), Just(Some(256)), Just(Some(4096))],
        step in prop_oneof![Just(READ_CHUNK), 1usize..20_000],
    ) {
        let wire = h2_client_bytes(&requests, table_size);
        let mut expected = h2_server_reads(&wire);
        let mut too_large = false;
        for (n, seen) in expected.iter_mut().enumerate() {
            if let Seen::Headers { pseudo, fields, .. } = seen {
                if list_size(pseudo, fields) > MAX_BLOCK {
                    too_large = true;
                    expected.truncate(n);
                    break;
                }
                if pseudo.authority.as_ref().is_some_and(|a| !is_authority(a.as_bytes())) {
                    pseudo.authority = h2::frame::Pseudo::request(
                        http::Method::GET,
                        "http://localhost/".parse().unwrap(),
                        None,
                    )
                    .authority;
                }
            }
        }
        let (out, outcome) = pump(wire, step, 16 * 1024);
        prop_assert_eq!(outcome.is_err(), too_large);
        let seen = h2_server_reads(&out);
        prop_assert_eq!(seen, expected);
    }
}
