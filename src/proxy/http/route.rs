//! Which way a request travels upstream (pure): its own HTTP/1
//! connection, HTTP/1 carried over the mesh's HTTP/2, or HTTP/2.

use super::super::detect::Version;
use super::super::metrics::Direction;
use super::super::pool::Route;

/// What [`route`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct RouteFacts {
    /// The downstream connection's version.
    pub version: Version,
    pub direction: Direction,
    /// Inbound, from a peer proxy over mesh mTLS.
    pub from_mesh_peer: bool,
    /// An HTTP/1 `Upgrade` request.
    pub upgrade: bool,
    /// A `CONNECT` request.
    pub connect: bool,
    /// Outbound: the destination is not known to be without a proxy.
    pub mesh_http2_possible: bool,
    /// The request carries the header a peer proxy sets when it carries
    /// HTTP/1 over HTTP/2 (`mesh_proto::ORIG_PROTO_HEADER`).
    pub converted: bool,
}

/// How a request travels upstream.
pub fn route(f: RouteFacts) -> Route {
    match f.version {
        // Tunnels need an HTTP/1 connection of their own.
        Version::Http1 if f.upgrade || f.connect => Route::Http1 { upgrade: f.upgrade },
        // Between proxies, HTTP/1 rides one multiplexed HTTP/2
        // connection instead of a connection per concurrent request.
        Version::Http1 if f.direction == Direction::Outbound && f.mesh_http2_possible => {
            Route::Http1OverHttp2
        }
        Version::Http1 => Route::Http1 { upgrade: false },
        // The peer proxy carried an HTTP/1 request over HTTP/2: the
        // application gets it back as HTTP/1.
        Version::Http2 if f.from_mesh_peer && f.converted => Route::Http1 { upgrade: false },
        Version::Http2 => Route::Http2,
    }
}
