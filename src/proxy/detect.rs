//! Protocol detection: what the first bytes of a connection are.
//!
//! [`classify`] is pure and decides from a byte prefix whether a
//! connection carries a TLS ClientHello (and whether it asks for the mesh
//! ALPN), HTTP/1.x, HTTP/2 with prior knowledge, or something else.
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
/// An HTTP/1 request line longer than this is not worth waiting for.
const MAX_REQUEST_LINE: usize = 8 * 1024;
/// TLS records carry at most 2^14 bytes of plaintext (RFC 8446 §5.1).
const MAX_TLS_RECORD: usize = 16 * 1024 + 256;

/// What a connection's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// A TLS ClientHello, and what it offers for ALPN.
    Tls(Alpn),
    Http1,
    Http2,
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
            Self::Tls(_) | Self::Unknown => None,
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
    /// The client sent nothing (or not enough) before the deadline; the
    /// connection is treated as opaque.
    TimedOut,
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
    // METHOD SP request-target SP HTTP/1.x CRLF
    let line_end = prefix.iter().position(|&b| b == b'\n');
    let line = match line_end {
        Some(end) => &prefix[..end],
        None => prefix,
    };
    let method_end = line.iter().position(|&b| b == b' ');
    let method = &line[..method_end.unwrap_or(line.len())];
    // Reject early on the first byte that cannot be part of a method token,
    // so binary protocols are not held back waiting for a newline.
    if !method.iter().all(|&b| is_tchar(b)) || method.len() > 32 {
        return Progress::Done(Protocol::Unknown);
    }
    let Some(_) = line_end else {
        return if prefix.len() >= MAX_REQUEST_LINE {
            Progress::Done(Protocol::Unknown)
        } else {
            Progress::NeedMore
        };
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let version_start = line.iter().rposition(|&b| b == b' ');
    match (method_end, version_start) {
        (Some(m), Some(v)) if m > 0 && v > m + 1 => {
            let version = &line[v + 1..];
            if version == b"HTTP/1.1" || version == b"HTTP/1.0" {
                Progress::Done(Protocol::Http1)
            } else {
                Progress::Done(Protocol::Unknown)
            }
        }
        _ => Progress::Done(Protocol::Unknown),
    }
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

/// Reads into `buf` until [`classify`] decides, the deadline passes, the
/// peer closes, or `max` bytes are buffered.
pub async fn read_and_classify<T: AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut BytesMut,
    timeout: Duration,
    max: usize,
) -> io::Result<Detection> {
    let deadline = tokio::time::Instant::now() + timeout;
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
            Err(_elapsed) => return Ok(Detection::TimedOut),
            Ok(Ok(0)) if buf.is_empty() => return Ok(Detection::Closed),
            // The peer half-closed after a partial prefix: forward what we
            // have as opaque bytes rather than guess.
            Ok(Ok(0)) => return Ok(Detection::Detected(Protocol::Unknown)),
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// The application protocol of a connection after the mesh hop (or of an
/// outbound connection): `Unknown` at once on an opaque port, so
/// server-speaks-first protocols are not held back; otherwise what the
/// first bytes say within `timeout`, a timeout reported to `timed_out`
/// and treated as opaque. `None` when the client closed (or the read
/// failed) before anything could be decided.
pub async fn app_protocol<T: AsyncRead + Unpin>(
    io: &mut T,
    prefix: &mut BytesMut,
    opaque: bool,
    timeout: Duration,
    max: usize,
    timed_out: impl FnOnce(),
) -> Option<Protocol> {
    if opaque {
        return Some(Protocol::Unknown);
    }
    match read_and_classify(io, prefix, timeout, max).await {
        Ok(Detection::Detected(protocol)) => Some(protocol),
        Ok(Detection::TimedOut) => {
            timed_out();
            Some(Protocol::Unknown)
        }
        Ok(Detection::Closed) | Err(_) => None,
    }
}

#[cfg(test)]
mod tests;
