//! Shared support for sidetunnel's integration tests: prerequisite gates
//! (skip outside CI with a reason, fail under `CI=true`), paths of the
//! workspace binaries under test, network-namespace "pods", DNS test
//! clients and resolver, and a real
//! containerd driven over CRI with locally built images.

pub mod bins;
pub mod cmd;
pub mod containerd;
pub mod cri;
pub mod critest;
pub mod dns;
pub mod image;
pub mod load;
pub mod mesh;
pub mod netns;
pub mod prereq;
pub mod procstat;
pub mod topology;
