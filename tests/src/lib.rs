//! Shared support for sidetunnel's integration tests: prerequisite gates
//! (skip outside CI with a reason, fail under `CI=true`), paths of the
//! workspace binaries under test, and network-namespace "pods".

pub mod bins;
pub mod netns;
pub mod prereq;
