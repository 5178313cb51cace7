//! The real `spillway` binary as a child process: spawn, signals, logs, metrics.

use super::*;

/// The real `spillway processor` binary as a child process.
pub struct SpillwayProc {
    child: Option<Child>,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl SpillwayProc {
    /// Writes `toml` (with its port-0 metrics address replaced by a free port) and starts
    /// the processor on it.
    pub fn spawn(toml: &str) -> SpillwayProc {
        Self::spawn_with_env(toml, &[])
    }

    /// Like [`SpillwayProc::spawn`], with extra environment variables (e.g. `SPILLWAY_FAULT`).
    pub fn spawn_with_env(toml: &str, env: &[(&str, &str)]) -> SpillwayProc {
        let port = free_port();
        Self::spawn_service_env(
            "processor",
            &toml.replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
            SocketAddr::from(([127, 0, 0, 1], port)),
            env,
        )
    }

    /// Starts `spillway <service> --config <toml>` as is; `metrics` is where its telemetry
    /// listener will be.
    pub fn spawn_service(service: &str, toml: &str, metrics: SocketAddr) -> SpillwayProc {
        Self::spawn_service_env(service, toml, metrics, &[])
    }

    fn spawn_service_env(
        service: &str,
        toml: &str,
        metrics: SocketAddr,
        env: &[(&str, &str)],
    ) -> SpillwayProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("spillway.toml");
        // Each process gets its own journal state directory unless the test gives one (to
        // restart on the same disk): two processes cannot share a store file.
        let toml = with_state_dir(toml, &dir.path().join("state"));
        std::fs::write(&cfg, toml).expect("write config");
        let log = dir.path().join("spillway.log");
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_spillway"))
            .args([service, "--config"])
            .arg(&cfg)
            .env(
                "RUST_LOG",
                std::env::var("SPILLWAY_TEST_CHILD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn spillway");
        SpillwayProc {
            child: Some(child),
            metrics,
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit; panics with its log after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "spillway did not exit within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then asserts a clean exit (status 0) within 30 s, showing the log if not.
    pub fn terminate(&mut self) {
        self.signal("TERM");
        let status = blocking(|| self.wait_exit(Duration::from_secs(30)));
        assert!(
            status.success(),
            "exit status {status}; log:\n{}",
            self.log_text()
        );
    }

    /// Like [`wait_until`], but a timeout panics with this process's log.
    pub async fn wait_until<F: FnMut() -> bool>(&self, what: &str, timeout: Duration, mut cond: F) {
        let deadline = Instant::now() + timeout;
        while !cond() {
            if Instant::now() > deadline {
                let log = self.log_text();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                panic!(
                    "timed out after {timeout:?} waiting for: {what}; spillway log tail:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The exit status if the process has exited, without waiting.
    pub fn wait_exit_nonblocking(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Records finished (`spillway_events_total`: succeeded, dead-lettered or skipped), or 0
    /// while /metrics is not up.
    pub async fn events_finished(&self) -> f64 {
        self.try_scrape()
            .await
            .map(|m| metric_sum(&m, "spillway_events_total"))
            .unwrap_or(0.0)
    }

    /// Waits until `count` records finished; after 90 s panics with the log.
    pub async fn wait_finished(&self, count: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.events_finished().await < count as f64 {
            assert!(
                Instant::now() < deadline,
                "{what}: timed out; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Scrapes /metrics, or None while the endpoint is not up.
    pub async fn try_scrape(&self) -> Option<String> {
        reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .ok()?
            .text()
            .await
            .ok()
    }
}

/// Runs the processor on `config` with `SPILLWAY_FAULT=<point>:<step>:<n>` and waits until it
/// has SIGKILLed itself at that crash point (the test fails with its log otherwise).
pub fn crash_at(config: &str, fault: &str) {
    use std::os::unix::process::ExitStatusExt;
    let mut p = SpillwayProc::spawn_with_env(config, &[("SPILLWAY_FAULT", fault)]);
    let status = blocking(|| p.wait_exit(Duration::from_secs(90)));
    assert_eq!(
        status.signal(),
        Some(9),
        "{fault}: the process should have killed itself; log:\n{}",
        p.log_text()
    );
    let point = fault.rsplit_once(':').map_or(fault, |(p, _)| p);
    assert!(
        p.log_text()
            .contains(&format!("fault point {point} reached")),
        "{fault}: log:\n{}",
        p.log_text()
    );
}

impl Drop for SpillwayProc {
    fn drop(&mut self) {
        self.kill9();
    }
}
