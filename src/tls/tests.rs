//! Handshakes between the mesh's own configurations in memory.
