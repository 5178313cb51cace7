//! The test kit shared by the integration tests (`tests/common`) and the benchmarks
//! (`load-tests`): Apache Kafka started by `scripts/broker.sh run` (dying with the process that
//! started it), a rivven-schema registry, tools installed by `scripts/tools.sh`, free ports,
//! topic creation and condition waits with deadlines. Nothing here skips: a tool that cannot
//! be installed or started fails the caller with the reason.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::Producer;

/// The workspace root (where `scripts/` and `config/` are).
pub const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// Waits until `cond` holds, polling every 50 ms; panics with `what` after `timeout`.
pub async fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut cond: F) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Like [`wait_until`] for conditions that must await (a scrape, a stats request).
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Blocking variant of [`wait_until`] for synchronous helpers.
pub fn wait_until_blocking<F: FnMut() -> bool>(what: &str, timeout: Duration, mut cond: F) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000
    )
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// The path of tool `name`: from the environment variable `env`, else installed (once,
/// cached) by `scripts/tools.sh`. Panics with the reason if it cannot be had.
pub fn tool(env: &str, name: &str) -> PathBuf {
    static CACHE: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap();
    if let Some(p) = cache.get(name) {
        return p.clone();
    }
    let path = match std::env::var(env) {
        Ok(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            let out = Command::new(Path::new(ROOT).join("scripts/tools.sh"))
                .arg(name)
                .stderr(Stdio::inherit())
                .output()
                .unwrap_or_else(|e| panic!("cannot run scripts/tools.sh {name}: {e}"));
            assert!(
                out.status.success(),
                "scripts/tools.sh {name} failed to install {name}; see its output above"
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
    };
    assert!(
        path.is_file(),
        "{name} binary not found at {} (from {env} or scripts/tools.sh)",
        path.display()
    );
    cache.insert(name.to_string(), path.clone());
    path
}

/// One `scripts/broker.sh run` child: Apache Kafka in the foreground.
pub struct BrokerProcess {
    child: Option<Child>,
    port: u16,
    controller_port: u16,
    dir: tempfile::TempDir,
}

impl BrokerProcess {
    /// Starts Apache Kafka on free loopback ports and waits until it answers metadata.
    pub fn start() -> BrokerProcess {
        Self::start_in(&std::env::temp_dir().join("spillway-test-brokers"))
    }

    /// [`BrokerProcess::start`] with its data directory under `base` (the integration tests
    /// use cargo's per-target temporary directory, so nothing is shared across checkouts).
    pub fn start_in(base: &Path) -> BrokerProcess {
        let mut p = BrokerProcess {
            child: None,
            port: free_port(),
            controller_port: free_port(),
            dir: broker_dir(base),
        };
        p.spawn();
        p
    }

    /// Its client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its bootstrap address.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's process id, while it runs (to charge its CPU in benchmarks).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    /// Starts the broker (again) on its ports and data directory, and waits until it answers.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("broker log file");
        let mut cmd = Command::new(Path::new(ROOT).join("scripts/broker.sh"));
        cmd.arg("run")
            .env("BROKER_PORT", self.port.to_string())
            .env("BROKER_CONTROLLER_PORT", self.controller_port.to_string())
            .env("BROKER_DIR", self.dir.path())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        self.child = Some(spawn_dying_with_us(cmd));
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        // The first start may install Kafka through Maven.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "Apache Kafka exited during start-up with {status}; its log:\n{}",
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            // The listener opens only once the broker is unfenced; then ask for metadata.
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
                    .set("bootstrap.servers", format!("127.0.0.1:{}", self.port))
                    .create()
                    .expect("metadata client");
                if producer
                    .client()
                    .fetch_metadata(None, Duration::from_secs(5))
                    .is_ok()
                {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "Apache Kafka did not answer metadata requests within 300 s; its log:\n{}",
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs the broker; its data stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A data directory under `base`, named after this process.
/// The shared broker's is never removed by its own process (the broker outlives every test),
/// so each new one first removes those of test processes that are gone.
fn broker_dir(base: &Path) -> tempfile::TempDir {
    std::fs::create_dir_all(base).expect("broker base directory");
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        for entry in std::fs::read_dir(base).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let pid = name
                .strip_prefix("broker-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<i32>().ok());
            // SAFETY: kill(pid, 0) only checks that the process exists. Only ESRCH means it
            // is gone (EPERM: it exists, as another user's).
            let gone = |pid: i32| {
                let result = unsafe { libc::kill(pid, 0) };
                result != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
            };
            if pid.is_some_and(gone) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
    tempfile::Builder::new()
        .prefix(&format!("broker-{}-", std::process::id()))
        .tempdir_in(base)
        .expect("broker data directory")
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `cmd` so that it is SIGKILLed when this test process exits, however it exits.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends, so every such
/// child is forked by one thread that lives as long as the process.
fn spawn_dying_with_us(cmd: Command) -> Child {
    type Job = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("broker-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    use std::os::unix::process::CommandExt;
                    // SAFETY: prctl and getppid are async-signal-safe; nothing else runs
                    // between fork and exec.
                    unsafe {
                        cmd.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong)
                                != 0
                            {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawner thread");
        Mutex::new(tx)
    });
    let (tx, rx) = std::sync::mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, tx))
        .expect("spawner thread alive");
    rx.recv()
        .expect("spawner reply")
        .unwrap_or_else(|e| panic!("cannot run scripts/broker.sh: {e}"))
}

/// Runs blocking Kafka client calls without starving the async runtime the test runs on.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(f),
        Err(_) => f(),
    }
}

/// Creates `topic` with `partitions` partitions (replication 1), or panics saying why.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let res = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create_topics request");
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e:?}"));
    }
}

/// A rivven-schema registry (Confluent-compatible REST API) on a loopback port.
pub struct Registry {
    child: Child,
    pub port: u16,
}

impl Registry {
    /// Starts rivven-schema on a free loopback port and waits until it accepts connections.
    pub fn start() -> Registry {
        blocking(|| {
            let bin = tool("SPILLWAY_RIVVEN_BIN", "rivven-schema");
            let port = free_port();
            let child = Command::new(&bin)
                .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let mut r = Registry { child, port };
            wait_until_blocking("schema registry answers", Duration::from_secs(30), || {
                if let Ok(Some(status)) = r.child.try_wait() {
                    panic!("rivven-schema exited during start-up: {status}");
                }
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            r
        })
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
