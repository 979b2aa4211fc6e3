//! Logging setup: tracing with text or JSON output on stderr and a filter
//! that the admin API can replace at run time.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log filter {filter:?}: {reason}")]
    Filter { filter: String, reason: String },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
    #[error("the logging subscriber is gone")]
    Gone,
}

/// Handle to the live log filter.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("filter", &self.current())
            .finish()
    }
}

fn parse(filter: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::builder()
        .parse(filter)
        .map_err(|e| LogError::Filter {
            filter: filter.to_string(),
            reason: e.to_string(),
        })
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
        let (layer, handle) = reload::Layer::new(parse(filter)?);
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
        Ok((LogControl { handle }, subscriber))
    }

    /// Replaces the filter (`tracing` EnvFilter syntax, e.g. `debug` or
    /// `info,access=debug`).
    pub fn set(&self, filter: &str) -> Result<(), LogError> {
        let f = parse(filter)?;
        self.handle.reload(f).map_err(|_| LogError::Gone)?;
        tracing::info!(filter, "log filter changed");
        Ok(())
    }

    /// The current filter, as text.
    pub fn current(&self) -> String {
        self.handle
            .with_current(|f| f.to_string())
            .unwrap_or_else(|_| "<gone>".into())
    }
}
