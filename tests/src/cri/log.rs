//! The CRI container log format containerd writes to a container's
//! `log_path`: `<RFC3339Nano time> <stdout|stderr> <P|F> <content>` per line,
//! `P` marking a partial line continued by the next record.

use std::path::Path;

use anyhow::{Context, Result, bail};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub time: String,
    pub stream: String,
    pub partial: bool,
    pub content: String,
}

pub fn parse_line(line: &str) -> Result<LogRecord> {
    let mut it = line.splitn(4, ' ');
    let (Some(time), Some(stream), Some(tag)) = (it.next(), it.next(), it.next()) else {
        bail!("CRI log line {line:?}: expected `<time> <stream> <tag> <content>`");
    };
    if stream != "stdout" && stream != "stderr" {
        bail!("CRI log line {line:?}: unknown stream {stream:?}");
    }
    let partial = match tag.split(':').next() {
        Some("P") => true,
        Some("F") => false,
        _ => bail!("CRI log line {line:?}: unknown tag {tag:?}"),
    };
    Ok(LogRecord {
        time: time.to_owned(),
        stream: stream.to_owned(),
        partial,
        content: it.next().unwrap_or_default().to_owned(),
    })
}

/// All records of a CRI log file.
pub fn read(path: &Path) -> Result<Vec<LogRecord>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading container log {}", path.display()))?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(parse_line)
        .collect()
}

/// Full lines of one stream (`"stdout"`/`"stderr"`), partial records joined.
pub fn lines(records: &[LogRecord], stream: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for r in records.iter().filter(|r| r.stream == stream) {
        cur.push_str(&r.content);
        if !r.partial {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_joins_partials() {
        let recs: Vec<_> = [
            "2025-01-01T00:00:00.1Z stdout P hel",
            "2025-01-01T00:00:00.2Z stderr F oops",
            "2025-01-01T00:00:00.3Z stdout F lo world",
            "2025-01-01T00:00:00.4Z stdout F ",
        ]
        .iter()
        .map(|l| parse_line(l).unwrap())
        .collect();
        assert_eq!(lines(&recs, "stdout"), ["hello world", ""]);
        assert_eq!(lines(&recs, "stderr"), ["oops"]);
        assert!(parse_line("garbage").is_err());
        assert!(parse_line("t stdin F x").is_err());
        assert!(parse_line("t stdout X x").is_err());
    }
}
