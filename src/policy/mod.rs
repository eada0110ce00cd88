//! Who may talk to this workload, and how.
pub mod crd;
