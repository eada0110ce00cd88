//! Connections counted per source address, each holding a slot that
//! gives its place back when dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

/// Open connections per source address: for [`super::Caps::per_source`],
/// and for whoever counts a stage of a connection's life per source.
#[derive(Default)]
pub struct Sources(Mutex<HashMap<IpAddr, usize>>);

/// One connection's place in [`Sources`], given back when dropped.
pub struct SourceSlot {
    sources: Arc<Sources>,
    ip: IpAddr,
}

impl Sources {
    /// A place for one more connection from `ip`, unless it holds `cap`
    /// (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<SourceSlot> {
        let ip = ip.to_canonical();
        let mut open = self.0.lock();
        let count = open.entry(ip).or_default();
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            sources: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.sources.0.lock();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}
