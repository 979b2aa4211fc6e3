//! The shim's log: tracing records (and the shim kit's `log` records) written
//! to the `log` FIFO containerd reads from the bundle directory, so they show
//! up in containerd's own log tagged with the shim's id.

use std::sync::Mutex;

pub fn init(debug: bool, namespace: &str, id: &str) {
    let level = if debug {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    let builder = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(level)
        .with_target(true);
    let result = match std::fs::OpenOptions::new().write(true).open("log") {
        Ok(fifo) => builder.with_writer(Mutex::new(fifo)).try_init(),
        Err(_) => builder.with_writer(std::io::stderr).try_init(),
    };
    if let Err(e) = result {
        eprintln!("shim {namespace}/{id}: logging setup: {e}");
    }
}
