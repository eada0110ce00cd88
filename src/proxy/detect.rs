//! Protocol detection: what the first bytes of a connection are.
//!
//! [`classify`] is pure and decides from a byte prefix whether a
//! connection carries a TLS ClientHello (and whether it asks for the mesh
//! ALPN), HTTP/1.x, HTTP/2 with prior knowledge, or something else.
//!
//! One rule for ambiguous bytes: a stream whose first word could be an
//! HTTP method followed by whitespace is HTTP-shaped, and an HTTP-shaped
//! stream is either a request line we serve (strictly `METHOD SP target
//! SP HTTP/1.0|1.1`) or [`Protocol::MalformedHttp`], refused with 400 and
//! never relayed: lenient application servers parse what a strict
//! detector would pass through as opaque bytes, headers and all.
//! [`read_and_classify`] feeds it from a socket with a deadline, so a
//! client that never speaks costs at most the detection timeout;
//! [`app_protocol`] is the one rule for the application protocol after
//! the mesh hop, on both sides.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::tls::MESH_ALPN;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An HTTP/1 request line longer than this is refused.
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// The longest first word that may still be an HTTP method (the longest
/// registered one, `UPDATEREDIRECTREF`, has 17 letters).
const MAX_METHOD: usize = 32;
/// TLS records carry at most 2^14 bytes of plaintext (RFC 8446 §5.1).
const MAX_TLS_RECORD: usize = 16 * 1024 + 256;

/// What a connection's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// A TLS ClientHello, and what it offers for ALPN.
    Tls(Alpn),
    Http1,
    Http2,
    /// Starts the way an HTTP request does (a method-like word, then
    /// whitespace) but is not a request line this proxy serves: a bad
    /// version, odd separators, a request line over [`MAX_REQUEST_LINE`].
    /// Refused with 400; never relayed.
    MalformedHttp,
    /// Anything else: copied as opaque bytes.
    Unknown,
}

impl Protocol {
    /// The HTTP version hyper serves this protocol with; `None` for
    /// anything relayed as opaque bytes.
    pub fn http_version(self) -> Option<Version> {
        match self {
            Self::Http1 => Some(Version::Http1),
            Self::Http2 => Some(Version::Http2),
            Self::Tls(_) | Self::MalformedHttp | Self::Unknown => None,
        }
    }
}

/// The HTTP version of a downstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

impl Version {
    /// The `protocol_detections_total{protocol}` label of a connection
    /// served as HTTP with this version, or relayed opaque (`None`).
    pub fn label(version: Option<Self>) -> &'static str {
        match version {
            Some(Self::Http1) => "http1",
            Some(Self::Http2) => "http2",
            None => "opaque",
        }
    }
}

/// The ALPN extension of a ClientHello, as far as the mesh cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// Offers `outrider/1`: a peer proxy.
    Mesh,
    /// No ALPN extension at all.
    Absent,
    /// Offers only other protocols (`h2`, `http/1.1`, ...): the
    /// application's own TLS.
    Other,
}

/// The outcome of reading a connection's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    Detected(Protocol),
    /// The client stopped (the deadline passed, or it half-closed) with
    /// part of a prefix; what [`stalled`] makes of it.
    Stalled(Stalled),
    /// The client sent nothing before the deadline. It may be waiting for
    /// a server that speaks first; see `proxy::first_word`.
    Silent,
    /// The client closed before sending a byte.
    Closed,
}

/// Whether `prefix` is enough to decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    NeedMore,
    Done(Protocol),
}

/// Decides what `prefix` is, or asks for more bytes.
pub fn classify(prefix: &[u8]) -> Progress {
    match prefix.first() {
        None => Progress::NeedMore,
        Some(0x16) => classify_tls(prefix),
        Some(b'P') if H2_PREFACE.starts_with(&prefix[..prefix.len().min(H2_PREFACE.len())]) => {
            if prefix.len() >= H2_PREFACE.len() {
                Progress::Done(Protocol::Http2)
            } else {
                Progress::NeedMore
            }
        }
        Some(_) => classify_http1(prefix),
    }
}

fn classify_http1(prefix: &[u8]) -> Progress {
    let method = prefix.iter().take_while(|&&b| is_tchar(b)).count();
    // A first byte that cannot start a method, or a first word too long
    // to be one: some other protocol, decided at once so binary protocols
    // are not held back.
    if method == 0 || method > MAX_METHOD {
        return Progress::Done(Protocol::Unknown);
    }
    let Some(&after) = prefix.get(method) else {
        return Progress::NeedMore;
    };
    // `PING\r\n`, `SSH-2.0-...\r\n`: a word, but no request line.
    if !is_space(after) {
        return Progress::Done(Protocol::Unknown);
    }
    // HTTP-shaped from here on: served, or refused.
    let line = match prefix.iter().position(|&b| b == b'\n') {
        Some(end) if end <= MAX_REQUEST_LINE => &prefix[..end],
        Some(_) => return Progress::Done(Protocol::MalformedHttp),
        None if prefix.len() >= MAX_REQUEST_LINE => {
            return Progress::Done(Protocol::MalformedHttp);
        }
        None => return Progress::NeedMore,
    };
    if is_request_line(line.strip_suffix(b"\r").unwrap_or(line)) {
        Progress::Done(Protocol::Http1)
    } else {
        Progress::Done(Protocol::MalformedHttp)
    }
}

/// `METHOD SP request-target SP HTTP/1.x` to the letter of RFC 9112: one
/// space each, a visible-ASCII target, version 1.0 or 1.1, no stray CR.
fn is_request_line(line: &[u8]) -> bool {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !method.is_empty()
        && method.iter().all(|&b| is_tchar(b))
        && !target.is_empty()
        && target.iter().all(|&b| (0x21..=0x7e).contains(&b))
        && (version == b"HTTP/1.1" || version == b"HTTP/1.0")
}

/// Whitespace a lenient parser might take as the end of a method.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | 0x0b | 0x0c)
}

/// What to make of a client that stopped sending (for a while, or for
/// good) before [`classify`] could decide, from the prefix it sent.
pub fn stalled(prefix: &[u8]) -> Stalled {
    let word = prefix.iter().take_while(|&&b| is_tchar(b)).count();
    match prefix.first() {
        None => Stalled::Silent,
        // Part of a TLS record: the application's own TLS, or not TLS at
        // all; no HTTP server could read it as a request.
        Some(0x16) => Stalled::Opaque,
        // A bare word: not HTTP-shaped yet, but it may become so with the
        // next byte, so it is relayed watched (`Stalled::Word`).
        Some(_) if word == prefix.len() && word <= MAX_METHOD => Stalled::Word,
        // A word and whitespace: a request line that never ended.
        Some(_) if word > 0 && word <= MAX_METHOD && is_space(prefix[word]) => {
            Stalled::MalformedHttp
        }
        Some(_) => Stalled::Opaque,
    }
}

/// Whether the first byte after a bare word makes the stream HTTP-shaped
/// (whitespace), keeps it undecided (more of the word), or rules HTTP out.
pub fn after_word(byte: u8) -> AfterWord {
    if is_space(byte) {
        AfterWord::HttpShaped
    } else if is_tchar(byte) {
        AfterWord::StillAWord
    } else {
        AfterWord::NotHttp
    }
}

/// See [`after_word`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterWord {
    HttpShaped,
    StillAWord,
    NotHttp,
}

/// The verdict on a client that stalled mid-prefix; see [`stalled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stalled {
    /// Nothing was sent.
    Silent,
    /// Not HTTP: relayed.
    Opaque,
    /// One word so far, no whitespace: relayed, but the connection is cut
    /// if whitespace follows the word (it would become HTTP-shaped).
    Word,
    /// HTTP-shaped and unfinished: refused.
    MalformedHttp,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn classify_tls(prefix: &[u8]) -> Progress {
    if prefix.len() < 5 {
        return Progress::NeedMore;
    }
    if prefix[1] != 0x03 || prefix[2] > 0x04 {
        return Progress::Done(Protocol::Unknown);
    }
    let record_len = u16::from_be_bytes([prefix[3], prefix[4]]) as usize;
    if record_len == 0 || record_len > MAX_TLS_RECORD {
        return Progress::Done(Protocol::Unknown);
    }
    if prefix.len() < 5 + record_len {
        return Progress::NeedMore;
    }
    let record = &prefix[5..5 + record_len];
    match client_hello_alpn(record, MESH_ALPN) {
        Some(alpn) => Progress::Done(Protocol::Tls(alpn)),
        None => Progress::Done(Protocol::Unknown),
    }
}

/// Walks a ClientHello handshake message. `None` when it is not one;
/// otherwise what its ALPN extension says about `mesh`. A ClientHello
/// fragmented over several records is reported as [`Alpn::Other`]: our
/// own proxies never send one.
fn client_hello_alpn(record: &[u8], mesh: &[u8]) -> Option<Alpn> {
    let mut r = Reader(record);
    if r.u8()? != 0x01 {
        return None; // not a ClientHello
    }
    let body_len = r.u24()?;
    if body_len > r.0.len() {
        return Some(Alpn::Other);
    }
    let mut body = Reader(r.take(body_len)?);
    body.take(2 + 32)?; // legacy_version, random
    let session_id = body.u8()? as usize;
    body.take(session_id)?;
    let suites = body.u16()? as usize;
    body.take(suites)?;
    let compression = body.u8()? as usize;
    body.take(compression)?;
    if body.0.is_empty() {
        return Some(Alpn::Absent); // no extensions at all
    }
    let ext_len = body.u16()? as usize;
    let mut exts = Reader(body.take(ext_len.min(body.0.len()))?);
    while exts.0.len() >= 4 {
        let kind = exts.u16()?;
        let len = exts.u16()? as usize;
        let data = exts.take(len)?;
        if kind == 0x0010 {
            let mut alpn = Reader(data);
            let list_len = alpn.u16()? as usize;
            let mut list = Reader(alpn.take(list_len)?);
            while !list.0.is_empty() {
                let n = list.u8()? as usize;
                if list.take(n)? == mesh {
                    return Some(Alpn::Mesh);
                }
            }
            return Some(Alpn::Other);
        }
    }
    Some(Alpn::Absent)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize)
    }
}

/// Reads into `buf` until [`classify`] decides, `deadline` passes, the
/// peer closes, or `max` bytes are buffered.
pub async fn read_and_classify<T: AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
    max: usize,
) -> io::Result<Detection> {
    loop {
        if let Progress::Done(protocol) = classify(buf) {
            return Ok(Detection::Detected(protocol));
        }
        if buf.len() >= max {
            return Ok(Detection::Detected(Protocol::Unknown));
        }
        // Most prefixes (a request line, a ClientHello) fit in 1 KiB.
        buf.reserve(1024);
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Err(_) if buf.is_empty() => return Ok(Detection::Silent),
            Ok(Ok(0)) if buf.is_empty() => return Ok(Detection::Closed),
            // Part of a prefix, and no more coming (for now, or at all).
            Err(_) | Ok(Ok(0)) => return Ok(stalled_detection(buf)),
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => return Err(e),
        }
    }
}

fn stalled_detection(prefix: &[u8]) -> Detection {
    match stalled(prefix) {
        Stalled::Silent => Detection::Silent,
        verdict => Detection::Stalled(verdict),
    }
}

/// What to do with a connection, from what its first bytes were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Serve it as HTTP of this version.
    Serve(Version),
    /// Relay it as bytes.
    Relay,
    /// Relay it as bytes, but cut it if the client's bare first word is
    /// followed by whitespace ([`Stalled::Word`]).
    RelayWatchingTheWord,
    /// Answer 400 and close (shaped like HTTP, not a request we serve).
    Refuse,
    /// Connect upstream and see who speaks first (`proxy::first_word`).
    AwaitFirstWord,
}

impl Detection {
    /// The next step; `None` when the client closed.
    pub fn next(self) -> Option<Next> {
        match self {
            Self::Closed => None,
            Self::Silent | Self::Stalled(Stalled::Silent) => Some(Next::AwaitFirstWord),
            Self::Detected(Protocol::MalformedHttp) | Self::Stalled(Stalled::MalformedHttp) => {
                Some(Next::Refuse)
            }
            Self::Stalled(Stalled::Word) => Some(Next::RelayWatchingTheWord),
            Self::Stalled(Stalled::Opaque) => Some(Next::Relay),
            Self::Detected(protocol) => {
                Some(protocol.http_version().map_or(Next::Relay, Next::Serve))
            }
        }
    }
}

/// `timeout` from now, or as far as the clock goes: a configured
/// duration never overflows the clock (it used to panic).
pub fn deadline_after(timeout: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// The application protocol of a connection after the mesh hop (or of an
/// outbound connection): `Detected(Unknown)` at once on an opaque port,
/// so server-speaks-first protocols are not held back; otherwise what
/// [`read_and_classify`] finds by `deadline` (a read error counts as
/// `Closed`). `timed_out` hears of a client that was silent or stalled.
pub async fn app_protocol<T: AsyncRead + Unpin>(
    io: &mut T,
    prefix: &mut BytesMut,
    opaque: bool,
    deadline: tokio::time::Instant,
    max: usize,
    timed_out: impl FnOnce(),
) -> Detection {
    if opaque {
        return Detection::Detected(Protocol::Unknown);
    }
    let detection = read_and_classify(io, prefix, deadline, max)
        .await
        .unwrap_or(Detection::Closed);
    if matches!(detection, Detection::Silent | Detection::Stalled(_)) {
        timed_out();
    }
    detection
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod properties;
