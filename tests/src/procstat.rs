//! What a process costs, from `/proc`: CPU time (user + system, all
//! threads, from `/proc/<pid>/stat`) and memory (`VmRSS`, `VmHWM`, … from
//! `/proc/<pid>/status`).

use std::io;

/// User + system CPU seconds the process has used so far (all threads,
/// including exited ones; clock-tick resolution, usually 10 ms).
pub fn cpu_seconds(pid: i32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = parse_stat_cpu_ticks(&stat)
        .ok_or_else(|| io::Error::other(format!("unparsable /proc/{pid}/stat: {stat:?}")))?;
    Ok(ticks as f64 / clock_ticks_per_second())
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is parenthesised and may contain spaces,
    // so count fields from the last ')': the next field is #3.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, …) in KiB.
pub fn status_kib(pid: i32, field: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status_kib(&status, field)
        .ok_or_else(|| io::Error::other(format!("no {field} in /proc/{pid}/status")))
}

/// Proportional set size (`Pss` of `/proc/<pid>/smaps_rollup`) in KiB: the
/// process's resident pages, each shared page divided among its sharers,
/// so the sum over processes is what they cost together.
pub fn pss_kib(pid: i32) -> io::Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    parse_status_kib(&rollup, "Pss")
        .ok_or_else(|| io::Error::other(format!("no Pss in /proc/{pid}/smaps_rollup")))
}

fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let v = l.strip_prefix(field)?.strip_prefix(':')?;
        v.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_counted_after_the_command_name() {
        let stat = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    731 269 0 0 20 0 3 0 1234 5678 90 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(1000));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn status_fields_by_exact_name() {
        let status = "Name:\tproxy\nVmHWM:\t   12000 kB\nVmRSS:\t    9876 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(9876));
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(12000));
        assert_eq!(parse_status_kib(status, "VmRS"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id() as i32;
        // Burn a little CPU so the counter is certainly non-zero.
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_seconds(me).unwrap() > 0.0);
        let rss = status_kib(me, "VmRSS").unwrap();
        assert!(rss > 0 && status_kib(me, "VmHWM").unwrap() >= rss);
    }
}
