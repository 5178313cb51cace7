//! Measuring one system at one rate: open-loop HTTP and raw-producer steps, latency percentiles, CPU per request, the sweep for the max rate at p99 within bound.

use super::*;

/// What one step of offered load gave.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepResult {
    pub(crate) offered: f64,
    pub(crate) achieved: f64,
    pub(crate) failed: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) cpu_us: f64,
    /// CPU µs per request of the broker (Apache Kafka) and of this load generator: on 2 cores the
    /// three share the machine, so these say what is left for the serving process.
    pub(crate) broker_cpu_us: f64,
    pub(crate) client_cpu_us: f64,
    /// Global indices of the requests answered 202 (HTTP systems only).
    pub(crate) accepted: Vec<usize>,
}

impl StepResult {
    fn sustainable(&self) -> bool {
        self.failed == 0 && self.p99_ms <= P99_BOUND_MS && self.achieved >= 0.97 * self.offered
    }
}

pub(crate) fn percentiles(mut lat_us: Vec<u32>) -> (f64, f64, f64) {
    if lat_us.is_empty() {
        return (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    }
    lat_us.sort_unstable();
    let at =
        |q: f64| lat_us[((lat_us.len() as f64 * q) as usize).min(lat_us.len() - 1)] as f64 / 1e3;
    (at(0.50), at(0.99), at(0.999))
}

/// The broker's process id, once started (its CPU is printed beside each step's).
pub(crate) static BROKER_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// CPU seconds so far of the broker, 0 before it started.
pub(crate) fn broker_cpu() -> f64 {
    BROKER_PID.get().map_or(0.0, |pid| process_cpu(*pid))
}

/// CPU seconds (user + system) of process `pid` so far.
pub(crate) fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Reads one HTTP/1.1 response (head plus a Content-Length body); returns its status.
pub(crate) async fn read_response(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<u16> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).unwrap_or("");
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            let total = end + 4 + len;
            while buf.len() < total {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..total);
            return Ok(status);
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Offers `requests` at `rate` per second over `CONNECTIONS` keep-alive connections.
/// `serving_pid` is the process whose CPU is charged to the requests.
pub(crate) async fn http_step(
    addr: SocketAddr,
    first: usize,
    requests: Vec<Bytes>,
    rate: f64,
    serving_pid: u32,
) -> StepResult {
    let n = requests.len();
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut streams = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        streams.push(s);
    }
    let cpu0 = process_cpu(serving_pid);
    let (broker0, client0) = (broker_cpu(), self_cpu());
    let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            let (requests, next) = (requests.clone(), next.clone());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(n / CONNECTIONS + 16);
                let (mut ok, mut failed) = (Vec::new(), 0usize);
                let mut buf = Vec::with_capacity(8192);
                let mut last = t0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let at = t0 + interval * i as u32;
                    tokio::time::sleep_until(at).await;
                    let sent = stream.write_all(&requests[i]).await;
                    let status = match sent {
                        Ok(()) => read_response(&mut stream, &mut buf).await.unwrap_or(0),
                        Err(_) => 0,
                    };
                    let now = tokio::time::Instant::now();
                    last = last.max(now);
                    lat.push(now.duration_since(at).as_micros().min(u32::MAX as u128) as u32);
                    if status == 202 {
                        ok.push(first + i);
                    } else {
                        failed += 1;
                        if status == 0 {
                            break; // the connection is gone; the others carry on
                        }
                    }
                }
                (lat, ok, failed, last)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    let (mut accepted, mut failed, mut last) = (Vec::with_capacity(n), 0, t0);
    for t in tasks {
        let (l, o, f, e) = t.await.expect("load task");
        all.extend(l);
        accepted.extend(o);
        failed += f;
        last = last.max(e);
    }
    let ok = accepted.len();
    let cpu = process_cpu(serving_pid) - cpu0;
    let (broker, client) = (broker_cpu() - broker0, self_cpu() - client0);
    let secs = last.duration_since(t0).as_secs_f64().max(1e-3);
    let (p50, p99, p999) = percentiles(all);
    StepResult {
        offered: rate,
        achieved: ok as f64 / secs,
        failed: failed + (n - ok - failed),
        p50_ms: p50,
        p99_ms: p99,
        p999_ms: p999,
        cpu_us: per_request(cpu, ok),
        broker_cpu_us: per_request(broker, ok),
        client_cpu_us: per_request(client, ok),
        accepted,
    }
}

pub(crate) fn per_request(cpu_secs: f64, requests: usize) -> f64 {
    if requests > 0 {
        cpu_secs * 1e6 / requests as f64
    } else {
        0.0
    }
}

/// Offers `n` 1 KB records at `rate` per second to an idempotent `acks=all` producer.
pub(crate) async fn raw_step(
    producer: &FutureProducer,
    topic: &str,
    first: usize,
    n: usize,
    rate: f64,
) -> StepResult {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let values: Vec<(String, Vec<u8>)> = (first..first + n)
        .map(|i| {
            let id = format!("raw:msg_{i}");
            let b = body(&id);
            (id, b)
        })
        .collect();
    let (cpu0, broker0) = (self_cpu(), broker_cpu());
    let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut pending = Vec::with_capacity(n);
    for (i, (key, value)) in values.iter().enumerate() {
        let at = t0 + interval * i as u32;
        tokio::time::sleep_until(at).await;
        let delivery = producer
            .send_result(FutureRecord::to(topic).key(key).payload(value))
            .map_err(|(e, _)| e);
        pending.push(tokio::spawn(async move {
            let ok = match delivery {
                Ok(f) => matches!(f.await, Ok(Ok(_))),
                Err(_) => false,
            };
            let now = tokio::time::Instant::now();
            (ok, now, now.duration_since(at).as_micros() as u32)
        }));
    }
    let (mut ok, mut failed, mut last, mut lat) = (0, 0, t0, Vec::with_capacity(n));
    let mut accepted = Vec::with_capacity(n);
    for (i, p) in pending.into_iter().enumerate() {
        let (good, at, l) = p.await.expect("delivery task");
        if good {
            accepted.push(first + i);
            ok += 1;
        } else {
            failed += 1;
        }
        last = last.max(at);
        lat.push(l);
    }
    let (cpu, broker) = (self_cpu() - cpu0, broker_cpu() - broker0);
    let secs = last.duration_since(t0).as_secs_f64().max(1e-3);
    let (p50, p99, p999) = percentiles(lat);
    StepResult {
        offered: rate,
        achieved: ok as f64 / secs,
        failed,
        p50_ms: p50,
        p99_ms: p99,
        p999_ms: p999,
        cpu_us: per_request(cpu, ok),
        broker_cpu_us: per_request(broker, ok),
        // The producer is this process: its CPU is the serving CPU.
        client_cpu_us: 0.0,
        accepted,
    }
}

pub(crate) fn self_cpu() -> f64 {
    process_cpu(std::process::id())
}

/// Climbs the offered rate by ×1.5 until a step is not sustainable, then bisects twice.
/// Returns the best sustainable step (if any) and every step's result.
pub(crate) async fn sweep<F, Fut>(
    name: &str,
    opts: &Opts,
    mut step: F,
) -> (Option<StepResult>, Vec<StepResult>)
where
    F: FnMut(f64, usize) -> Fut,
    Fut: std::future::Future<Output = StepResult>,
{
    let seconds = opts.seconds;
    let mut best: Option<StepResult> = None;
    let mut all = Vec::new();
    let mut fail: Option<f64> = None;
    let mut rate = opts.rate.unwrap_or(500.0);
    let mut tries = 0;
    println!(
        "  {name}: offered → achieved req/s, p50 / p99 / p99.9 ms, CPU µs/req (serving; broker, load generator)"
    );
    let mut retried = false;
    loop {
        tries += 1;
        let n = (rate * seconds) as usize;
        let r = step(rate, n).await;
        // One latency spike (the broker, the other processes on a small machine) should not
        // end the climb: a failed step is run once more before the rate counts as too high.
        let retry = !r.sustainable() && r.failed == 0 && !retried && opts.rate.is_none();
        println!(
            "    {:>8.0} → {:>8.0}  {:>6.2} / {:>6.2} / {:>6.2}  {:>6.1} ({:.1}, {:.1}){}",
            r.offered,
            r.achieved,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.cpu_us,
            r.broker_cpu_us,
            r.client_cpu_us,
            if r.sustainable() {
                String::new()
            } else if retry {
                "  ✗ (run again)".to_string()
            } else {
                format!("  ✗ ({} failed)", r.failed)
            }
        );
        all.push(r.clone());
        if retry {
            retried = true;
            continue;
        }
        retried = false;
        if r.sustainable() {
            best = Some(r.clone());
        } else {
            fail = Some(rate);
        }
        let lo = best.as_ref().map_or(0.0, |b| b.offered);
        rate = match fail {
            None => rate * 1.5,
            Some(hi) => (lo + hi) / 2.0,
        };
        // Two bisections after the first failure, or give up on a system that cannot even
        // sustain the lowest rate; a fixed rate is one step.
        if opts.rate.is_some()
            || tries >= 25
            || fail.is_some_and(|hi| (hi - lo) / hi < 0.12)
            || (best.is_none() && tries >= 3)
        {
            break;
        }
    }
    (best, all)
}
