//! The per-pod sidetunnel proxy library. One module per concern.
