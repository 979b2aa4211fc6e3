//! Logging setup: tracing with text or JSON output on stderr and a filter
//! that the admin API can replace at run time. The settings (format, filter
//! grammar) are [`crate::config`]'s, so a bad filter fails at start.

use std::sync::{Arc, Mutex};

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{Registry, reload};

use crate::config::{LogFilterError, LogFormat, parse_log_filter};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Filter(#[from] LogFilterError),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
    #[error("the logging subscriber is gone")]
    Gone,
}

/// Handle to the live log filter.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<Targets, Registry>,
    /// The filter as given (`Targets` does not print itself back).
    text: Arc<Mutex<String>>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("filter", &self.current())
            .finish()
    }
}

impl LogControl {
    /// Installs the global subscriber (once per process).
    pub fn init(format: LogFormat, filter: &str) -> Result<LogControl, LogError> {
        let (control, subscriber) = Self::build(format, filter)?;
        tracing::subscriber::set_global_default(subscriber)
            .map_err(|_| LogError::AlreadyInstalled)?;
        Ok(control)
    }

    /// Builds a subscriber writing to stderr and its control, without
    /// installing it; the control works while the subscriber lives.
    pub fn build(
        format: LogFormat,
        filter: &str,
    ) -> Result<(LogControl, Box<dyn tracing::Subscriber + Send + Sync>), LogError> {
        let (layer, handle) = reload::Layer::new(parse_log_filter(filter)?);
        let registry = tracing_subscriber::registry().with(layer);
        let subscriber: Box<dyn tracing::Subscriber + Send + Sync> = match format {
            LogFormat::Text => Box::new(
                registry.with(
                    tracing_subscriber::fmt::layer()
                        // Colour codes only for a terminal: the shim copies
                        // this stream into CRI log files.
                        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                        .with_writer(std::io::stderr),
                ),
            ),
            LogFormat::Json => Box::new(
                registry.with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_writer(std::io::stderr),
                ),
            ),
        };
        let text = Arc::new(Mutex::new(filter.to_string()));
        Ok((LogControl { handle, text }, subscriber))
    }

    /// Replaces the filter (see [`parse_log_filter`]).
    pub fn set(&self, filter: &str) -> Result<(), LogError> {
        let f = parse_log_filter(filter)?;
        let mut text = self.text.lock().unwrap_or_else(|e| e.into_inner());
        self.handle.reload(f).map_err(|_| LogError::Gone)?;
        *text = filter.to_string();
        drop(text);
        tracing::info!(filter, "log filter changed");
        Ok(())
    }

    /// The current filter, as text.
    pub fn current(&self) -> String {
        self.text.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A filter that did not parse leaves the running one in place.
    #[test]
    fn set_replaces_only_with_a_valid_filter() {
        let (logs, _subscriber) = LogControl::build(LogFormat::Text, "info").unwrap();
        logs.set("debug,access=trace").unwrap();
        assert_eq!(logs.current(), "debug,access=trace");
        assert!(logs.set("access=[x]").is_err());
        assert_eq!(logs.current(), "debug,access=trace");
    }
}
