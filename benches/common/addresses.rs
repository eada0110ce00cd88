//! The synthetic cluster's addresses, shared by the discovery benchmarks:
//! room for 16 endpoints per Service, and a ClusterIP per Service.

pub fn pod_ip(service: usize, endpoint: usize) -> String {
    let n = service * 16 + endpoint;
    format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff)
}

pub fn cluster_ip(service: usize) -> String {
    format!("10.96.{}.{}", (service >> 8) & 0xff, service & 0xff)
}
