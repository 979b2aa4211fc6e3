//! A reader for Prometheus' text exposition format, enough to pick samples
//! by metric name and labels out of a proxy's `/metrics`.

use std::collections::BTreeMap;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map(String::as_str).unwrap_or_default()
    }
}

/// Parses every sample line (comments and malformed lines are skipped).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// Samples of metric `name` whose labels include every `(key, value)`.
pub fn select<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == *v))
        .collect()
}

/// Sum of the values of [`select`]ed samples.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    select(samples, name, labels).iter().map(|s| s.value).sum()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, rest) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, rest)
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            (name, BTreeMap::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",...}` and returns the labels and what follows the `}`.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (key, after) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        s = &after[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_values_and_escapes() {
        let text = "# HELP x y\n# TYPE x counter\n\
            istio_tcp_connections_opened_total{reporter=\"destination\",source_principal=\"spiffe://cluster.local/ns/a/sa/b\",x=\"q\\\"}\"} 3\n\
            plain_total 2.5\n\
            broken{a=\"b\" nan-ish\n";
        let s = parse(text);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].label("reporter"), "destination");
        assert_eq!(s[0].label("x"), "q\"}");
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].name, "plain_total");
        assert_eq!(
            sum(
                &s,
                "istio_tcp_connections_opened_total",
                &[("reporter", "destination")]
            ),
            3.0
        );
        assert!(select(&s, "plain_total", &[("reporter", "source")]).is_empty());
    }
}
