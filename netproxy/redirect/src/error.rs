//! The crate's error type: every variant names what was wrong so a failed
//! sandbox creation explains itself.

use std::path::PathBuf;

/// Errors from parsing redirect settings or programming a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pod annotation carries a value we cannot honour. Sandbox creation
    /// must fail rather than run a pod with weaker redirection than asked.
    #[error("invalid pod annotation {key}={value:?}: {reason}")]
    Annotation {
        key: String,
        value: String,
        reason: String,
    },
    /// The configuration is internally inconsistent (ports clash, marks
    /// outside the mask, reserved routing table, ...).
    #[error("invalid redirect configuration: {0}")]
    Config(String),
    /// The network namespace file could not be opened or entered.
    #[error("cannot enter network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A netlink request inside the namespace failed: `what` names the
    /// step (which rule, route or policy rule), `detail` is the kernel's
    /// extended-ack text when it gave one.
    #[error("{what} in network namespace {netns} failed: {source}{}", if detail.is_empty() { String::new() } else { format!(" ({detail})") })]
    Netlink {
        what: String,
        netns: PathBuf,
        #[source]
        source: std::io::Error,
        detail: String,
    },
    /// A helper program (`nft`, `ip`) could not be started (`show` only).
    #[error("cannot run `{program}` (is it installed and on PATH?): {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A helper program ran inside the namespace and failed.
    #[error("`{command}` in network namespace {netns} failed ({status}): {stderr}")]
    Command {
        command: String,
        netns: PathBuf,
        status: String,
        stderr: String,
    },
}
