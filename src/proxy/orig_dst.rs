//! The address a redirected connection was originally sent to.
//!
//! iptables `REDIRECT` rewrites the destination to the proxy's listener;
//! the kernel keeps the original in conntrack and returns it through
//! `SO_ORIGINAL_DST`. Without a redirect (loopback tests, static routes)
//! there is no entry and the socket's local address is returned instead,
//! which the callers recognise as "sent straight to the proxy".

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

use std::os::fd::BorrowedFd;

use nix::sys::socket::{SockaddrIn, SockaddrIn6, getsockopt, sockopt};

/// Where `socket` (bound locally to `local`) was headed before the
/// redirect, or `local`.
pub fn original_dst(socket: BorrowedFd<'_>, local: SocketAddr) -> SocketAddr {
    let original = match local {
        SocketAddr::V4(_) => getsockopt(&socket, sockopt::OriginalDst).ok().map(|raw| {
            let addr = SockaddrIn::from(raw);
            SocketAddr::V4(SocketAddrV4::new(addr.ip(), addr.port()))
        }),
        SocketAddr::V6(_) => getsockopt(&socket, sockopt::Ip6tOriginalDst)
            .ok()
            .map(|raw| {
                let addr = SockaddrIn6::from(raw);
                SocketAddr::V6(SocketAddrV6::new(
                    addr.ip(),
                    addr.port(),
                    addr.flowinfo(),
                    addr.scope_id(),
                ))
            }),
    };
    original.unwrap_or(local)
}
