//! The data-plane bench's workloads over a [`PodPair`]: servers in B, load
//! from A, the proxies' CPU and memory read from `/proc` around each run.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sidetunnel_tests::load::{self, Latencies, Server};
use sidetunnel_tests::topology::{APP_PORT, B_IP, PROXY_MARK, Pod, PodPair};
use sidetunnel_tests::{cmd, prereq, procstat};

use super::{Plan, Samples, Workload};

const MESH_SINK: u16 = APP_PORT;
const MESH_ECHO: u16 = 8081;
const MESH_IPERF: u16 = 8201;
const DIRECT_SINK: u16 = 9080;
const DIRECT_ECHO: u16 = 9081;
/// iperf3 cannot mark its socket: this port bypasses A's outbound capture.
pub const IPERF_DIRECT_PORT: u16 = 9201;
/// Ports B's ruleset leaves alone: the direct path's servers.
pub const DIRECT_PORTS: [u16; 3] = [DIRECT_SINK, DIRECT_ECHO, IPERF_DIRECT_PORT];
/// Concurrent bulk streams, the measure each one feeds, and its workload.
pub const STREAMS: [(usize, &str, Workload); 3] = [
    (1, "bulk_1_gbps", Workload::Bulk1),
    (10, "bulk_10_gbps", Workload::Bulk10),
    (100, "bulk_100_gbps", Workload::Bulk100),
];
const REQUEST: usize = 1024;
/// Request rate of the paced run (istio.io reports cost per 1000 req/s).
pub const PACED_RATE: f64 = 1000.0;
/// Idle connections held open to measure memory per proxied connection.
const IDLE_CONNS: usize = 1000;
const RSS_SAMPLE: Duration = Duration::from_millis(50);

/// Which way A's traffic goes to B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Same namespaces and wire, no proxies.
    Direct,
    /// Through A's and B's proxies (HBONE mTLS).
    Mesh,
}

impl Route {
    fn addr(port: u16) -> SocketAddr {
        SocketAddrV4::new(B_IP, port).into()
    }

    fn sink(self) -> SocketAddr {
        Self::addr(match self {
            Route::Direct => DIRECT_SINK,
            Route::Mesh => MESH_SINK,
        })
    }

    fn echo(self) -> SocketAddr {
        Self::addr(match self {
            Route::Direct => DIRECT_ECHO,
            Route::Mesh => MESH_ECHO,
        })
    }

    fn iperf_port(self) -> u16 {
        match self {
            Route::Direct => IPERF_DIRECT_PORT,
            Route::Mesh => MESH_IPERF,
        }
    }

    /// The proxy's mark makes A's ruleset let the socket pass.
    fn mark(self) -> Option<u32> {
        (self == Route::Direct).then_some(PROXY_MARK)
    }
}

/// CPU seconds each proxy (A, B) used during a run.
struct Cost {
    cpu: [f64; 2],
}

/// A child process killed on drop (iperf3 servers).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The running bench: servers and tools before the pair in drop order.
pub struct Bench<'p> {
    _servers: Vec<Server>,
    iperf3: Vec<Guard>,
    plan: &'p Plan,
    /// Highest VmRSS (KiB) of proxies A and B seen during any run.
    rss_peak: [u64; 2],
    pair: PodPair,
}

impl<'p> Bench<'p> {
    pub fn new(pair: PodPair, plan: &'p Plan) -> Result<Bench<'p>> {
        for pod in [Pod::A, Pod::B] {
            // Thousands of short connections per second would otherwise run
            // out of ephemeral ports while earlier ones sit in TIME_WAIT.
            pair.ns(pod).run(|| {
                std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
                std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65000")
            })?;
        }
        let b = pair.ns(Pod::B);
        let servers = vec![
            Server::sink(b, Route::Mesh.sink())?,
            Server::sink(b, Route::Direct.sink())?,
            Server::echo(b, Route::Mesh.echo())?,
            Server::echo(b, Route::Direct.echo())?,
        ];
        let mut iperf3 = Vec::new();
        if prereq::which("iperf3").is_some() {
            for route in [Route::Mesh, Route::Direct] {
                let mut c = Command::new("iperf3");
                c.args(["-s", "-p", &route.iperf_port().to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                iperf3.push(Guard(
                    b.run(move || c.spawn()).context("starting iperf3 -s")?,
                ));
                wait_listening(&pair, route.iperf_port())?;
            }
        } else {
            eprintln!("iperf3 not installed: the iperf3 row is skipped");
        }
        Ok(Bench {
            _servers: servers,
            iperf3,
            plan,
            rss_peak: [0; 2],
            pair,
        })
    }

    /// Keeps the processes' logs in `dir`.
    pub fn save_logs(&self, dir: &std::path::Path) -> Result<()> {
        self.pair.save_logs(dir)
    }

    pub fn has_iperf3(&self) -> bool {
        !self.iperf3.is_empty()
    }

    fn pid(&self, pod: Pod) -> Result<i32> {
        self.pair
            .proxy_pid(pod)
            .with_context(|| format!("proxy {} is not running", pod.name()))
    }

    fn pids(&self) -> Result<[i32; 2]> {
        Ok([self.pid(Pod::A)?, self.pid(Pod::B)?])
    }

    /// Connects from A.
    fn connect(&self, route: Route, dst: SocketAddr) -> Result<TcpStream> {
        self.pair
            .ns(Pod::A)
            .run(|| load::connect(dst, route.mark()))
            .with_context(|| format!("connecting from A to {dst} ({route:?})"))
    }

    /// Runs `f`, reading both proxies' CPU time around it and sampling
    /// their RSS while it runs.
    fn measured<T>(&mut self, f: impl FnOnce(&Self) -> Result<T>) -> Result<(T, Cost)> {
        let pids = self.pids()?;
        let cpu0 = [
            procstat::cpu_seconds(pids[0])?,
            procstat::cpu_seconds(pids[1])?,
        ];
        let done = AtomicBool::new(false);
        let (out, peak) = std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let mut peak = [0u64; 2];
                while !done.load(Ordering::Relaxed) {
                    for (p, pid) in peak.iter_mut().zip(pids) {
                        *p = (*p).max(procstat::status_kib(pid, "VmRSS").unwrap_or(0));
                    }
                    std::thread::sleep(RSS_SAMPLE);
                }
                peak
            });
            let out = f(self);
            done.store(true, Ordering::Relaxed);
            (out, sampler.join().unwrap_or_default())
        });
        let out = out.with_context(|| format!("proxy logs:\n{}", self.pair.logs()))?;
        let cpu1 = [
            procstat::cpu_seconds(pids[0])?,
            procstat::cpu_seconds(pids[1])?,
        ];
        for (p, seen) in self.rss_peak.iter_mut().zip(peak) {
            *p = (*p).max(seen);
        }
        Ok((
            out,
            Cost {
                cpu: [cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]],
            },
        ))
    }

    /// RSS of both proxies after start-up, before any traffic.
    pub fn idle_memory(&self, samples: &mut Samples) -> Result<()> {
        // Let start-up work (xDS, certificate) settle.
        std::thread::sleep(Duration::from_secs(1));
        for (pod, key) in [(Pod::A, "rss_idle_mib_a"), (Pod::B, "rss_idle_mib_b")] {
            let kib = procstat::status_kib(self.pid(pod)?, "VmRSS")?;
            samples.entry(key).or_default().push(Route::Mesh, mib(kib));
        }
        Ok(())
    }

    /// One short exchange on every route, so the first measured run finds
    /// B resolved (on demand) and the HBONE pool connected.
    pub fn warm_up(&mut self) -> Result<()> {
        for route in [Route::Direct, Route::Mesh] {
            let s = self.connect(route, route.sink())?;
            load::bulk(vec![s], Duration::from_millis(200))?;
            let mut s = self.connect(route, route.echo())?;
            load::request_response(&mut s, REQUEST, Duration::from_millis(200), None)?;
        }
        Ok(())
    }

    /// Every workload once per route, in `order`.
    pub fn round(&mut self, order: [Route; 2], samples: &mut Samples) -> Result<()> {
        let plan = self.plan;
        for (n, key, w) in STREAMS {
            if plan.runs_workload(w) {
                for route in order {
                    self.bulk(route, n, key, samples)?;
                }
            }
        }
        if self.has_iperf3() && plan.runs_workload(Workload::Iperf3) {
            for route in order {
                self.iperf3(route, samples)?;
            }
        }
        if plan.runs_workload(Workload::Rr) {
            for route in order {
                self.request_response(route, samples)?;
            }
        }
        if plan.runs_workload(Workload::Paced) {
            for route in order {
                self.paced(route, samples)?;
            }
        }
        if plan.runs_workload(Workload::Cpr) {
            for route in order {
                self.connection_per_request(route, samples)?;
            }
        }
        Ok(())
    }

    fn bulk(&mut self, route: Route, n: usize, key: &'static str, s: &mut Samples) -> Result<()> {
        let streams = (0..n)
            .map(|_| self.connect(route, route.sink()))
            .collect::<Result<Vec<_>>>()?;
        let d = self.plan.bulk;
        let (t, cost) = self.measured(|_| Ok(load::bulk(streams, d)?))?;
        s.entry(key).or_default().push(route, t.gbit_per_s());
        if route == Route::Mesh && n == 1 {
            let gb = t.bytes as f64 / 1e9;
            for (i, k) in ["cpu_s_per_gb_a", "cpu_s_per_gb_b"].into_iter().enumerate() {
                s.entry(k).or_default().push(route, cost.cpu[i] / gb);
            }
        }
        Ok(())
    }

    fn iperf3(&mut self, route: Route, s: &mut Samples) -> Result<()> {
        let secs = self.plan.bulk.as_secs_f64().ceil().max(1.0);
        let mut c = Command::new("iperf3");
        c.args([
            "-c",
            &B_IP.to_string(),
            "-p",
            &route.iperf_port().to_string(),
        ])
        .args(["-t", &format!("{secs}"), "-J"]);
        let timeout = Duration::from_secs_f64(secs + 30.0);
        let out = self
            .pair
            .ns(Pod::A)
            .run(move || cmd::run_ok(&mut c, timeout))
            .with_context(|| format!("iperf3 over the {route:?} path"))?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("iperf3 printed {out:?}"))?;
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("no end.sum_received.bits_per_second in {v}"))?;
        s.entry("iperf3_gbps").or_default().push(route, bps / 1e9);
        Ok(())
    }

    fn request_response(&mut self, route: Route, s: &mut Samples) -> Result<()> {
        let mut c = self.connect(route, route.echo())?;
        let d = self.plan.latency;
        let (l, cost) = self.measured(|_| Ok(load::request_response(&mut c, REQUEST, d, None)?))?;
        push_latency(s, route, &l, ["rr_p50_us", "rr_p90_us", "rr_p99_us"]);
        s.entry("rr_per_s").or_default().push(route, l.rate());
        if route == Route::Mesh {
            push_cpu_per_op(s, &cost, l.samples_ns.len(), ["rr_cpu_us_a", "rr_cpu_us_b"]);
        }
        Ok(())
    }

    fn paced(&mut self, route: Route, s: &mut Samples) -> Result<()> {
        let mut c = self.connect(route, route.echo())?;
        let d = self.plan.latency;
        let (l, cost) = self.measured(|_| {
            Ok(load::request_response(
                &mut c,
                REQUEST,
                d,
                Some(PACED_RATE),
            )?)
        })?;
        push_latency(
            s,
            route,
            &l,
            ["paced_p50_us", "paced_p90_us", "paced_p99_us"],
        );
        if route == Route::Mesh {
            // vCPU used, scaled to 1000 req/s by the rate really achieved.
            let per_krps = |cpu: f64| cpu / l.elapsed.as_secs_f64() / (l.rate() / 1000.0);
            s.entry("vcpu_per_krps_a")
                .or_default()
                .push(route, per_krps(cost.cpu[0]));
            s.entry("vcpu_per_krps_b")
                .or_default()
                .push(route, per_krps(cost.cpu[1]));
        }
        Ok(())
    }

    fn connection_per_request(&mut self, route: Route, s: &mut Samples) -> Result<()> {
        let (dst, mark, d) = (route.echo(), route.mark(), self.plan.latency);
        let (l, cost) = self.measured(|b| {
            Ok(b.pair
                .ns(Pod::A)
                .run(|| load::connection_per_request(|| load::connect(dst, mark), REQUEST, d))?)
        })?;
        push_latency(s, route, &l, ["cpr_p50_us", "cpr_p90_us", "cpr_p99_us"]);
        s.entry("cpr_per_s").or_default().push(route, l.rate());
        if route == Route::Mesh {
            push_cpu_per_op(
                s,
                &cost,
                l.samples_ns.len(),
                ["cpr_cpu_us_a", "cpr_cpu_us_b"],
            );
        }
        Ok(())
    }

    /// Peak RSS seen under load and the kernel's high-water mark.
    pub fn memory_after_load(&mut self, s: &mut Samples) -> Result<()> {
        let pids = self.pids()?;
        for (i, pod) in ["a", "b"].into_iter().enumerate() {
            let load_key = if pod == "a" {
                "rss_load_mib_a"
            } else {
                "rss_load_mib_b"
            };
            let hwm_key = if pod == "a" { "hwm_mib_a" } else { "hwm_mib_b" };
            s.entry(load_key)
                .or_default()
                .push(Route::Mesh, mib(self.rss_peak[i]));
            let hwm = procstat::status_kib(pids[i], "VmHWM")?;
            s.entry(hwm_key).or_default().push(Route::Mesh, mib(hwm));
        }
        Ok(())
    }

    /// The memory each idle proxied connection holds: RSS growth while
    /// `IDLE_CONNS` connections are open, each with one exchange done so
    /// both proxies hold the whole connection (HBONE stream and upstream).
    /// Runs before the load rounds, whose freed buffers the allocator would
    /// otherwise hand to these connections without growing RSS.
    pub fn idle_connections(&mut self, s: &mut Samples) -> Result<()> {
        let pids = self.pids()?;
        std::thread::sleep(Duration::from_millis(500));
        let before = [
            procstat::status_kib(pids[0], "VmRSS")?,
            procstat::status_kib(pids[1], "VmRSS")?,
        ];
        let n = IDLE_CONNS;
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let mut c = self.connect(Route::Mesh, Route::Mesh.echo())?;
            c.write_all(b"x")?;
            c.read_exact(&mut [0u8; 1])?;
            held.push(c);
        }
        std::thread::sleep(Duration::from_millis(500));
        for (i, k) in ["kib_per_idle_conn_a", "kib_per_idle_conn_b"]
            .into_iter()
            .enumerate()
        {
            let after = procstat::status_kib(pids[i], "VmRSS")?;
            // RSS can also shrink meanwhile (allocator returning pages):
            // then the connections cost nothing visible.
            let per = after.saturating_sub(before[i]) as f64 / n as f64;
            s.entry(k).or_default().push(Route::Mesh, per);
        }
        drop(held);
        Ok(())
    }

    /// Restarts proxy A `runs` times, timing spawn → `/healthz/ready`.
    pub fn start_to_ready(&mut self, s: &mut Samples) -> Result<()> {
        for _ in 0..self.plan.runs {
            if self
                .pair
                .stop_proxy(Pod::A, Duration::from_secs(10))
                .is_none()
            {
                bail!("proxy A did not exit after SIGTERM");
            }
            let t = self.pair.start_proxy(Pod::A)?;
            s.entry("start_ready_ms")
                .or_default()
                .push(Route::Mesh, t.as_secs_f64() * 1e3);
        }
        Ok(())
    }
}

fn push_latency(s: &mut Samples, route: Route, l: &Latencies, keys: [&'static str; 3]) {
    for (q, k) in [0.5, 0.9, 0.99].into_iter().zip(keys) {
        s.entry(k).or_default().push(route, l.quantile_us(q));
    }
}

/// The proxies' CPU microseconds per operation (request or connection):
/// unlike latency, barely moved by other load on the machine, so the
/// figure to compare builds by.
fn push_cpu_per_op(s: &mut Samples, cost: &Cost, ops: usize, keys: [&'static str; 2]) {
    if ops == 0 {
        return;
    }
    for (cpu, k) in cost.cpu.iter().zip(keys) {
        s.entry(k)
            .or_default()
            .push(Route::Mesh, cpu * 1e6 / ops as f64);
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Waits until something listens on `port` in B (iperf3 starting up).
fn wait_listening(pair: &PodPair, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        // /proc/thread-self/net shows the namespace of the reading thread.
        let tables = pair.ns(Pod::B).run(|| {
            ["tcp", "tcp6"].map(|t| std::fs::read_to_string(format!("/proc/thread-self/net/{t}")))
        });
        for table in tables {
            if listening(&table?, port) {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on port {port} in B after 10 s (iperf3 -s failed?)")
}

/// True when a `/proc/net/tcp{,6}` table has a listener (state `0A`) on
/// local `port`.
fn listening(table: &str, port: u16) -> bool {
    let suffix = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&suffix) && f[3] == "0A"
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn listeners_found_in_proc_net_tables() {
        let tcp6 = "  sl  local_address                         remote_address                        st\n   \
            0: 00000000000000000000000000000000:2301 00000000000000000000000000000000:0000 0A 0\n   \
            1: 0300580A:1F90 0200580A:A000 01 0\n";
        assert!(super::listening(tcp6, 0x2301));
        assert!(
            !super::listening(tcp6, 0x1F90),
            "established, not listening"
        );
        assert!(!super::listening(tcp6, 0x2302));
    }
}
