//! Which control plane meshd behaves as. By default (`istiod`) it
//! reproduces istiod's delta xDS behaviour wherever the proxy depends on it
//! (docs/istiod-fidelity.md lists each behaviour and its istiod source);
//! `extended` turns on meshd's extensions, which istiod does not have.

use std::fmt;
use std::str::FromStr;

/// `sidetunnel-meshd serve --mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// istiod's behaviour (the default).
    #[default]
    Istiod,
    /// istiod's behaviour plus every extension in [`Extensions`].
    Extended,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Istiod, Mode::Extended];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Istiod => "istiod",
            Mode::Extended => "extended",
        }
    }

    pub fn extensions(self) -> Extensions {
        match self {
            Mode::Istiod => Extensions::NONE,
            Mode::Extended => Extensions::ALL,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "istiod" => Ok(Mode::Istiod),
            "extended" => Ok(Mode::Extended),
            other => Err(format!("unknown mode {other:?} (istiod, extended)")),
        }
    }
}

/// meshd's departures from istiod, each off in [`Mode::Istiod`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Extensions {
    /// An Authorization subscription to a workload uid resolves to the
    /// policies that apply to that workload, and a client receives only
    /// the policies its names resolve to (istiod: every client gets every
    /// policy; names that are not policies come back as removals).
    pub uid_scoped_authorization: bool,
    /// A name subscribed again while already subscribed is answered again,
    /// and subscription changes count in ACKs, NACKs and requests carrying
    /// an old nonce (istiod: no response unless the subscribed set changed;
    /// a NACK or an expired nonce drops the request's subscription changes).
    pub answer_repeated_subscriptions: bool,
    /// Authorization resources carry a content version, so an unchanged
    /// policy is not resent (istiod: no version on policies, every
    /// subscription request resends all of them).
    pub versioned_authorization: bool,
}

impl Extensions {
    pub const NONE: Extensions = Extensions {
        uid_scoped_authorization: false,
        answer_repeated_subscriptions: false,
        versioned_authorization: false,
    };
    pub const ALL: Extensions = Extensions {
        uid_scoped_authorization: true,
        answer_repeated_subscriptions: true,
        versioned_authorization: true,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_default() {
        assert_eq!(Mode::default(), Mode::Istiod);
        for m in Mode::ALL {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
        }
        assert!("envoy".parse::<Mode>().is_err());
        assert_eq!(Mode::Istiod.extensions(), Extensions::NONE);
        assert_eq!(Mode::Extended.extensions(), Extensions::ALL);
    }
}
