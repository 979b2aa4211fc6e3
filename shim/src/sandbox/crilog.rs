//! The proxy's output in the CRI container log format kubelet and node log
//! collectors read (`<RFC3339Nano> <stream> <P|F> <text>`), written under the
//! pod's log directory as if the proxy were a container named
//! `sidetunnel-proxy`.

use std::io::Write;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

/// CRI splits longer lines into partial (`P`) records, like containerd does.
pub const MAX_RECORD: usize = 16 * 1024;
pub const CONTAINER_NAME: &str = "sidetunnel-proxy";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// RFC 3339 with nanoseconds in UTC, as containerd's CRI logger writes it.
pub fn timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    )
}

/// Formats one line of output (without its newline) as CRI log records.
pub fn records(t: OffsetDateTime, stream: Stream, line: &[u8]) -> Vec<u8> {
    let ts = timestamp(t);
    let mut out = Vec::with_capacity(line.len() + 48);
    let mut chunks = line.chunks(MAX_RECORD).peekable();
    if chunks.peek().is_none() {
        let _ = writeln!(out, "{ts} {} F ", stream.as_str());
        return out;
    }
    while let Some(chunk) = chunks.next() {
        let tag = if chunks.peek().is_some() { "P" } else { "F" };
        let _ = write!(out, "{ts} {} {tag} ", stream.as_str());
        out.extend_from_slice(chunk);
        out.push(b'\n');
    }
    out
}

/// `<log_dir>/sidetunnel-proxy/0.log`, the path kubelet would use for a
/// container of that name on its first run.
pub fn log_path(log_dir: &Path) -> PathBuf {
    log_dir.join(CONTAINER_NAME).join("0.log")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_000_000_042).unwrap()
    }

    #[test]
    fn formats_a_full_line() {
        let r = records(t(), Stream::Stderr, b"proxy ready");
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "2023-11-14T22:13:20.000000042Z stderr F proxy ready\n"
        );
    }

    #[test]
    fn empty_line_is_one_full_record() {
        let r = records(t(), Stream::Stdout, b"");
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "2023-11-14T22:13:20.000000042Z stdout F \n"
        );
    }

    #[test]
    fn long_lines_are_split_into_partials() {
        let line = vec![b'x'; MAX_RECORD * 2 + 5];
        let r = String::from_utf8(records(t(), Stream::Stdout, &line)).unwrap();
        let tags: Vec<&str> = r.lines().map(|l| l.split(' ').nth(2).unwrap()).collect();
        assert_eq!(tags, ["P", "P", "F"]);
        let payload: usize = r
            .lines()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap().len())
            .sum();
        assert_eq!(payload, line.len());
    }

    #[test]
    fn log_path_is_kubelets_layout() {
        assert_eq!(
            log_path(Path::new("/var/log/pods/ns_p_u")),
            PathBuf::from("/var/log/pods/ns_p_u/sidetunnel-proxy/0.log")
        );
    }
}
