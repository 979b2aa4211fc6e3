//! The proxy's resource limits with real proxies in real network namespaces
//! (tests/src/topology.rs: meshd, pods A and B behind the redirection
//! ruleset, each running `sidetunnel-proxy`).
//!
//! Checked: with `--max-connections` N a proxy holds N connections, refuses
//! the next one at once (the client sees a reset, not a hang), counts it in
//! `sidetunnel_connections_refused_total`, keeps the held ones working, and
//! accepts again as soon as one closes; an inbound HBONE stream over the
//! limit is answered 503 (the client's proxy then resets its client).
//! With a tiny `--copy-buffer-budget`, many concurrent bulk streams still
//! arrive intact both ways, the grown copy buffers never exceed the budget
//! (`sidetunnel_copy_buffer_bytes`) and return to zero, and the sending
//! proxy's peak RSS stays well below an unbudgeted run's. With
//! `--memory-budget` alone, 100 bulk streams grow neither proxy past the
//! budget's buffer share.
//!
//! `measure_memory` (ignored; a measurement, run with `--ignored
//! --nocapture`, with `SIDETUNNEL_BIN_DIR=target/release` for release
//! figures) prints what docs/performance.md "## Memory" reports: idle RSS
//! split into anonymous and file-backed pages, threads, the RSS each idle
//! proxied connection adds to both proxies, and spawn → ready.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sidetunnel_tests::load::{self, Server};
use sidetunnel_tests::topology::{APP_PORT, B_IP, Options, Pod, PodPair};
use sidetunnel_tests::{bins, prereq, procstat};

fn gate(t: &str) -> bool {
    prereq::root(t) && prereq::binary(t, "ip") && prereq::binary(t, "nft")
}

/// The binaries under test: `SIDETUNNEL_BIN_DIR` or the current profile's.
fn bin_dir() -> PathBuf {
    std::env::var_os("SIDETUNNEL_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(bins::dir)
}

/// Opens `n` connections from A to `dst` through both proxies, each with a
/// one-byte exchange so both proxies hold the whole path.
fn hold(pair: &PodPair, dst: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut c = pair
                .ns(Pod::A)
                .run(|| load::connect(dst, None))
                .unwrap_or_else(|e| panic!("connection {i}: {e}\n{}", pair.logs()));
            c.write_all(b"x").unwrap();
            c.read_exact(&mut [0u8; 1])
                .unwrap_or_else(|e| panic!("echo on connection {i}: {e}\n{}", pair.logs()));
            c
        })
        .collect()
}

/// A metric's value in Prometheus text: the line starting with `series `.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Polls proxy `pod`'s metrics until `series` equals `want` (10 s bound).
fn wait_metric(pair: &PodPair, pod: Pod, series: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = pair.metrics(pod).unwrap();
        if metric(&m, series) == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never became {want} on proxy {}:\n{m}\n{}",
            pod.name(),
            pair.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A connection the proxy refused: it ends (reset or EOF) without echoing,
/// well before the client's I/O timeout.
fn assert_refused(pair: &PodPair, dst: SocketAddr) {
    let t0 = Instant::now();
    let outcome = pair.ns(Pod::A).run(|| {
        let mut c = load::connect(dst, None)?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        // The write may already fail if the reset arrived.
        let _ = c.write_all(b"x");
        let mut b = [0u8; 1];
        c.read(&mut b)
    });
    match outcome {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => panic!(
            "expected a refused connection (reset or EOF), got {other:?}\n{}",
            pair.logs()
        ),
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "refusal took {:?}",
        t0.elapsed()
    );
}

fn echo_ok(c: &mut TcpStream, what: &str) {
    c.write_all(what.as_bytes()).unwrap();
    let mut back = vec![0u8; what.len()];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, what.as_bytes());
}

/// A's proxy with `--max-connections 4`: four held connections, the fifth
/// refused promptly and counted, the four unaffected, and a free entry
/// after one closes.
#[test]
fn full_connection_table_refuses_new_connections_and_recovers() {
    let t = "full_connection_table_refuses_new_connections_and_recovers";
    if !gate(t) {
        return;
    }
    const MAX: usize = 4;
    // The limit for A comes from a config file both proxies read; B
    // overrides it with a flag (flags win over the file) so only A's
    // table fills.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("limits.toml");
    std::fs::write(&file, format!("max-connections = {MAX}\n")).unwrap();
    let mut opts = Options::new(bin_dir());
    opts.proxy_args = vec!["--config".into(), file.display().to_string()];
    opts.b_args = vec!["--max-connections".into(), "1000".into()];
    let pair = PodPair::start(opts).expect("start the pair");
    let app: SocketAddr = SocketAddrV4::new(B_IP, APP_PORT).into();
    let _echo = Server::echo(pair.ns(Pod::B), app).unwrap();

    let mut held = hold(&pair, app, MAX);
    wait_metric(&pair, Pod::A, "sidetunnel_connections_open", MAX as f64);
    assert_refused(&pair, app);
    wait_metric(
        &pair,
        Pod::A,
        "sidetunnel_connections_refused_total{listener=\"outbound\"}",
        1.0,
    );
    for (i, c) in held.iter_mut().enumerate() {
        echo_ok(c, &format!("held connection {i} still works"));
    }

    drop(held.pop());
    wait_metric(
        &pair,
        Pod::A,
        "sidetunnel_connections_open",
        (MAX - 1) as f64,
    );
    let mut again = hold(&pair, app, 1);
    echo_ok(&mut again[0], "a freed entry is reused");
    assert_refused(&pair, app);
    wait_metric(
        &pair,
        Pod::A,
        "sidetunnel_connections_refused_total{listener=\"outbound\"}",
        2.0,
    );
    // B's table was never full.
    let b = pair.metrics(Pod::B).unwrap();
    assert_eq!(
        metric(
            &b,
            "sidetunnel_connections_refused_total{listener=\"hbone_stream\"}"
        ),
        None,
        "{b}"
    );
}

/// B's proxy with `--max-connections 2`: A's pooled HBONE connection takes
/// one entry and its first stream the other; the next stream is answered
/// 503, which A turns into a reset of its client, and the first connection
/// keeps working.
#[test]
fn full_table_refuses_hbone_streams_with_503() {
    let t = "full_table_refuses_hbone_streams_with_503";
    if !gate(t) {
        return;
    }
    let mut opts = Options::new(bin_dir());
    opts.b_args = vec!["--max-connections".into(), "2".into()];
    let pair = PodPair::start(opts).expect("start the pair");
    let app: SocketAddr = SocketAddrV4::new(B_IP, APP_PORT).into();
    let _echo = Server::echo(pair.ns(Pod::B), app).unwrap();

    let mut held = hold(&pair, app, 1);
    wait_metric(&pair, Pod::B, "sidetunnel_connections_open", 2.0);
    assert_refused(&pair, app);
    wait_metric(
        &pair,
        Pod::B,
        "sidetunnel_connections_refused_total{listener=\"hbone_stream\"}",
        1.0,
    );
    echo_ok(&mut held[0], "the held stream still works");
    drop(held);
    wait_metric(&pair, Pod::B, "sidetunnel_connections_open", 1.0);
    let mut again = hold(&pair, app, 1);
    echo_ok(&mut again[0], "a freed entry is reused");
}

/// Peak VmRSS (KiB) of `pids` while `work` runs, sampled every 20 ms.
fn peak_rss_during<T: Send>(pids: [i32; 2], work: impl FnOnce() -> T + Send) -> ([u64; 2], T) {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = [0u64; 2];
            while !done.load(Ordering::Relaxed) {
                for (p, pid) in peak.iter_mut().zip(pids) {
                    *p = (*p).max(procstat::status_kib(pid, "VmRSS").unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        let out = work();
        done.store(true, Ordering::Relaxed);
        (sampler.join().unwrap(), out)
    })
}

/// Byte `i` of stream `seed`'s data: position dependent, so a lost,
/// duplicated or reordered block shows.
fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        let i = offset + k as u64;
        *b = ((i ^ seed << 40).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8;
    }
}

/// Sends `len` bytes of `seed`'s pattern on `c` (then half-closes) while
/// reading the echo back and comparing every byte.
fn echo_checked(c: TcpStream, seed: u64, len: u64) -> Result<(), String> {
    const BLOCK: usize = 64 * 1024;
    let mut w = c.try_clone().map_err(|e| e.to_string())?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; BLOCK];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(BLOCK as u64) as usize;
            pattern(seed, off, &mut buf[..n]);
            w.write_all(&buf[..n])?;
            off += n as u64;
        }
        w.shutdown(std::net::Shutdown::Write)
    });
    let (mut r, mut got, mut want) = (c, vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let mut off = 0u64;
    let read = loop {
        match r.read(&mut got) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                pattern(seed, off, &mut want[..n]);
                if got[..n] != want[..n] {
                    break Err(format!(
                        "stream {seed}: wrong bytes in {off}..{}",
                        off + n as u64
                    ));
                }
                off += n as u64;
            }
            Err(e) => break Err(format!("stream {seed}: reading at {off}: {e}")),
        }
    };
    let wrote = writer.join().map_err(|_| "writer panicked".to_string())?;
    read?;
    wrote.map_err(|e| format!("stream {seed}: writing: {e}"))?;
    if off != len {
        return Err(format!("stream {seed}: {off} of {len} bytes came back"));
    }
    Ok(())
}

/// Growth of proxy A's RSS (KiB, peak under load minus before) while
/// `streams` bulk streams run A → B's sink for `secs`.
fn bulk_rss_growth(pair: &PodPair, streams: usize, secs: u64) -> u64 {
    bulk_rss(pair, streams, secs).map(|r| r.peak.saturating_sub(r.before))[0]
}

/// RSS of one proxy around a bulk run (KiB).
#[derive(Debug, Clone, Copy)]
struct RssAround {
    /// VmRSS just before the streams start sending.
    before: u64,
    /// Peak sampled while they send.
    peak: u64,
    /// VmHWM afterwards: the exact peak of the proxy's life.
    hwm: u64,
}

/// RSS of proxies A and B while `streams` bulk streams run A → B's sink
/// for `secs`.
fn bulk_rss(pair: &PodPair, streams: usize, secs: u64) -> [RssAround; 2] {
    let sink: SocketAddr = SocketAddrV4::new(B_IP, APP_PORT + 1).into();
    let _sink = Server::sink(pair.ns(Pod::B), sink).unwrap();
    let pids = [Pod::A, Pod::B].map(|p| pair.proxy_pid(p).unwrap());
    let conns: Vec<TcpStream> = (0..streams)
        .map(|_| pair.ns(Pod::A).run(|| load::connect(sink, None)).unwrap())
        .collect();
    let before = pids.map(|pid| procstat::status_kib(pid, "VmRSS").unwrap());
    let (peak, moved) = peak_rss_during(pids, || load::bulk(conns, Duration::from_secs(secs)));
    // Every sink counted all bytes its stream sent (checked by `bulk`).
    let moved = moved.unwrap_or_else(|e| panic!("bulk: {e}\n{}", pair.logs()));
    assert!(moved.bytes > 0);
    [0, 1].map(|i| RssAround {
        before: before[i],
        peak: peak[i],
        hwm: procstat::status_kib(pids[i], "VmHWM").unwrap(),
    })
}

/// With `--memory-budget` alone (the windows and the copy budget derived
/// from it), 100 concurrent bulk streams A → B grow neither proxy's peak
/// RSS (VmHWM, exact) by more than the budget's buffer share (the budget
/// minus the reserve for the idle proxy): the senders wait instead of the
/// proxies buffering. The ztunnel windows and 32 MiB copy budget of before,
/// given as flags, grew A by 42 MiB in this test (debug build), so it fails
/// when the derivation stops bounding what A queues. 24 MiB rather than the
/// 16 MiB minimum: about 4 MiB of this load is per stream whatever the
/// budget, and at 16 MiB A used 6–7 of its 8 MiB share.
#[test]
fn memory_budget_bounds_peak_rss_under_100_bulk_streams() {
    let t = "memory_budget_bounds_peak_rss_under_100_bulk_streams";
    if !gate(t) {
        return;
    }
    const BUDGET_MIB: u64 = 24;
    let mut o = Options::new(bin_dir());
    o.log_level = "warn".into();
    o.proxy_args = vec![format!("--memory-budget={BUDGET_MIB}MiB")];
    let pair = PodPair::start(o).expect("start the pair");
    let rss = bulk_rss(&pair, 100, 3);
    let share = (BUDGET_MIB << 10) - (netproxy::config::MEMORY_BUDGET_RESERVE >> 10);
    for (pod, r) in [Pod::A, Pod::B].into_iter().zip(rss) {
        println!("proxy {}: {r:?} KiB, buffer share {share} KiB", pod.name());
        let grew = r.hwm.saturating_sub(r.before);
        assert!(
            grew <= share,
            "proxy {} grew {grew} KiB (peak {} KiB from {} KiB) under 100 bulk streams \
             with --memory-budget={BUDGET_MIB}MiB: more than its {share} KiB buffer share",
            pod.name(),
            r.hwm,
            r.before
        );
    }
}

/// Both proxies with `--copy-buffer-budget=1MiB` (and small HTTP/2
/// windows, so the receive side does not hide the send side): 50 echo
/// streams of 2 MiB each way arrive intact, the budget gauge never
/// exceeds 1 MiB and is refused (counted) on A, it drops to zero when
/// the streams end, and A's peak RSS under 100 bulk streams grows much
/// less than with an unlimited budget in the same test.
#[test]
fn copy_buffer_budget_bounds_bulk_memory_and_keeps_every_byte() {
    let t = "copy_buffer_budget_bounds_bulk_memory_and_keeps_every_byte";
    if !gate(t) {
        return;
    }
    const BUDGET: u64 = 1 << 20;
    const BULK_STREAMS: usize = 100;
    const ECHO_STREAMS: u64 = 50;
    const ECHO_BYTES: u64 = 2 << 20;
    let opts = |budget: &str| {
        let mut o = Options::new(bin_dir());
        o.log_level = "warn".into();
        o.proxy_args = vec![
            "--h2-stream-window=256KiB".into(),
            "--h2-connection-window=1MiB".into(),
            format!("--copy-buffer-budget={budget}"),
        ];
        o
    };
    let unlimited = {
        let pair = PodPair::start(opts("64GiB")).expect("start the unbudgeted pair");
        bulk_rss_growth(&pair, BULK_STREAMS, 3)
    };

    let pair = PodPair::start(opts("1MiB")).expect("start the budgeted pair");
    for pod in [Pod::A, Pod::B] {
        wait_metric(
            &pair,
            pod,
            "sidetunnel_copy_buffer_budget_bytes",
            BUDGET as f64,
        );
    }
    let budgeted = bulk_rss_growth(&pair, BULK_STREAMS, 3);

    let app: SocketAddr = SocketAddrV4::new(B_IP, APP_PORT).into();
    let _echo = Server::echo(pair.ns(Pod::B), app).unwrap();
    let conns: Vec<TcpStream> = (0..ECHO_STREAMS)
        .map(|_| pair.ns(Pod::A).run(|| load::connect(app, None)).unwrap())
        .collect();
    let done = AtomicBool::new(false);
    let (most_held, results) = std::thread::scope(|s| {
        // Scrapes both proxies while the streams run.
        let sampler = s.spawn(|| {
            let mut most = [0f64; 2];
            while !done.load(Ordering::Relaxed) {
                for (m, pod) in most.iter_mut().zip([Pod::A, Pod::B]) {
                    if let Ok(text) = pair.metrics(pod)
                        && let Some(v) = metric(&text, "sidetunnel_copy_buffer_bytes")
                    {
                        *m = m.max(v);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            most
        });
        let streams: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, c)| s.spawn(move || echo_checked(c, i as u64, ECHO_BYTES)))
            .collect();
        let results: Vec<_> = streams.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, Ordering::Relaxed);
        (sampler.join().unwrap(), results)
    });
    let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    assert!(failed.is_empty(), "{failed:#?}\n{}", pair.logs());

    for (pod, most) in [Pod::A, Pod::B].into_iter().zip(most_held) {
        assert!(
            most <= BUDGET as f64,
            "proxy {} held {most} bytes of grown copy buffers, budget {BUDGET}",
            pod.name()
        );
        // Every stream ended: every grown buffer was given back.
        wait_metric(&pair, pod, "sidetunnel_copy_buffer_bytes", 0.0);
    }
    let a = pair.metrics(Pod::A).unwrap();
    let refusals = metric(&a, "sidetunnel_copy_buffer_budget_refusals_total").unwrap_or(0.0);
    assert!(refusals > 0.0, "the budget was never full on A:\n{a}");

    println!(
        "peak RSS growth of proxy A with {BULK_STREAMS} bulk streams: \
         {budgeted} KiB with a 1 MiB budget, {unlimited} KiB unlimited"
    );
    // What the budgeted path may hold: the budget, what h2 queues (bounded
    // by B's 1 MiB connection window), two 16 KiB buffers and h2/TLS state
    // per stream; plus a generous allowance for allocator slack.
    let bound = (BUDGET >> 10) + 1024 + BULK_STREAMS as u64 * 64 + 16 * 1024;
    assert!(
        budgeted <= bound,
        "budgeted growth {budgeted} KiB above {bound} KiB"
    );
    assert!(
        budgeted * 10 < unlimited * 6,
        "budgeted growth {budgeted} KiB not well below unlimited {unlimited} KiB"
    );
}

/// `Threads:` of `/proc/<pid>/status`.
fn threads(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// RSS (KiB) per mapped file (or `[anon]`, `[heap]`, `[stack]`), largest first.
fn rss_by_mapping(pid: i32) -> Vec<(String, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by: std::collections::BTreeMap<String, u64> = Default::default();
    let mut current = String::new();
    for l in smaps.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.first()
            .is_some_and(|a| a.contains('-') && !a.ends_with(':'))
        {
            current = f.get(5).map_or("[anon]", |v| v).to_string();
        } else if f.first() == Some(&"Rss:") {
            *by.entry(current.clone()).or_default() += f[1].parse::<u64>().unwrap_or(0);
        }
    }
    let mut v: Vec<_> = by.into_iter().filter(|(_, k)| *k > 0).collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}

fn memory_line(pair: &PodPair, pod: Pod) -> String {
    let pid = pair.proxy_pid(pod).expect("proxy running");
    let kib = |f| procstat::status_kib(pid, f).unwrap_or(0);
    format!(
        "proxy {}: VmRSS {} KiB (RssAnon {}, RssFile {}), VmHWM {} KiB, threads {}",
        pod.name(),
        kib("VmRSS"),
        kib("RssAnon"),
        kib("RssFile"),
        kib("VmHWM"),
        threads(pid)
    )
}

#[test]
#[ignore = "measurement: prints memory figures; run with --ignored --nocapture"]
fn measure_memory() {
    let t = "measure_memory";
    if !gate(t) {
        return;
    }
    let conns: usize = std::env::var("SIDETUNNEL_IDLE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let dir = bin_dir();
    println!("binaries: {}", dir.display());
    let mut opts = Options::new(dir);
    // `SIDETUNNEL_PROXY_LOG=debug` prints A's log after the last restart
    // (its timestamps give the start → ready breakdown).
    let show_log = std::env::var("SIDETUNNEL_PROXY_LOG").ok();
    opts.log_level = show_log.clone().unwrap_or_else(|| "warn".into());
    // E.g. `SIDETUNNEL_PROXY_ARGS="--h2-stream-window 1MiB"`.
    if let Ok(extra) = std::env::var("SIDETUNNEL_PROXY_ARGS") {
        opts.proxy_args = extra.split_whitespace().map(String::from).collect();
    }
    let mut pair = PodPair::start(opts).expect("start the pair");
    std::thread::sleep(Duration::from_secs(1));
    for pod in [Pod::A, Pod::B] {
        println!("idle {}", memory_line(&pair, pod));
    }
    let pid_a = pair.proxy_pid(Pod::A).unwrap();
    for (name, kib) in rss_by_mapping(pid_a).into_iter().take(8) {
        println!("  proxy a RSS {kib:>6} KiB  {name}");
    }

    let app: SocketAddr = SocketAddrV4::new(B_IP, APP_PORT).into();
    let _echo = Server::echo(pair.ns(Pod::B), app).unwrap();
    // Warm: B resolved on demand, the pooled HBONE connection open.
    drop(hold(&pair, app, 1));
    std::thread::sleep(Duration::from_millis(500));
    let pids = [Pod::A, Pod::B].map(|p| pair.proxy_pid(p).unwrap());
    let before = pids.map(|p| procstat::status_kib(p, "VmRSS").unwrap());
    let held = hold(&pair, app, conns);
    std::thread::sleep(Duration::from_millis(500));
    let after = pids.map(|p| procstat::status_kib(p, "VmRSS").unwrap());
    for (i, pod) in [Pod::A, Pod::B].into_iter().enumerate() {
        println!(
            "{conns} idle connections: proxy {} {} → {} KiB = {:.1} KiB per connection",
            pod.name(),
            before[i],
            after[i],
            after[i].saturating_sub(before[i]) as f64 / conns as f64
        );
    }
    for pod in [Pod::A, Pod::B] {
        println!("holding {}", memory_line(&pair, pod));
    }
    drop(held);
    std::thread::sleep(Duration::from_secs(1));
    for pod in [Pod::A, Pod::B] {
        println!("closed {}", memory_line(&pair, pod));
    }
    // The proxy hands freed heap back within its trim period (10 s).
    std::thread::sleep(Duration::from_secs(12));
    for pod in [Pod::A, Pod::B] {
        println!("closed +13 s {}", memory_line(&pair, pod));
    }

    // Peak RSS under 100 concurrent bulk streams (HTTP/2 windows and copy
    // chunks fill up).
    let sink: SocketAddr = SocketAddrV4::new(B_IP, APP_PORT + 1).into();
    let _sink = Server::sink(pair.ns(Pod::B), sink).unwrap();
    let streams: Vec<TcpStream> = (0..100)
        .map(|_| pair.ns(Pod::A).run(|| load::connect(sink, None)).unwrap())
        .collect();
    let (peak, t) = peak_rss_during(pids, || load::bulk(streams, Duration::from_secs(3)));
    println!("100 streams: {:.2} Gbit/s", t.expect("bulk").gbit_per_s());
    println!(
        "100 streams: peak RSS proxy a {} KiB, proxy b {} KiB",
        peak[0], peak[1]
    );

    let mut ready = Vec::new();
    for _ in 0..7 {
        pair.stop_proxy(Pod::A, Duration::from_secs(10));
        ready.push(pair.start_proxy(Pod::A).expect("restart A").as_secs_f64() * 1e3);
    }
    let all = format!("{ready:.1?}");
    ready.sort_by(f64::total_cmp);
    println!(
        "start → ready: median {:.1} ms, min {:.1} ms (all {all})",
        ready[ready.len() / 2],
        ready[0]
    );
    std::thread::sleep(Duration::from_secs(1));
    println!("restarted idle {}", memory_line(&pair, Pod::A));
    if show_log.is_some() {
        println!("{}", pair.logs());
    }
}
