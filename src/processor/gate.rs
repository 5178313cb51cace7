//! The intake gate. A step whose dependency is down (an LLM provider whose breaker is open)
//! registers a check here; while any check fails the gate is closed, and the scheduler pauses
//! every assigned partition and starts no new records. Events then wait in Kafka, with lag
//! visible, instead of being failed or dead-lettered. When the dependency may take work
//! again, the gate opens and consumption resumes.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

type Check = Box<dyn Fn() -> bool + Send + Sync>;

/// Shared handle to the gate; clones see the same state.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

struct Inner {
    checks: Mutex<Vec<Check>>,
    version: watch::Sender<u64>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

impl Gate {
    /// An open gate with no checks.
    pub fn new() -> Self {
        Gate {
            inner: Arc::new(Inner {
                checks: Mutex::new(Vec::new()),
                version: watch::Sender::new(0),
            }),
        }
    }

    /// Registers a dependency check: `available` answers whether the dependency can take work.
    pub fn add_check(&self, available: impl Fn() -> bool + Send + Sync + 'static) {
        self.lock().push(Box::new(available));
        self.notify();
    }

    /// Tells the scheduler that a dependency changed state, so it re-evaluates the gate.
    pub fn notify(&self) {
        self.inner.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Whether every registered dependency can take work.
    pub fn is_open(&self) -> bool {
        self.lock().iter().all(|available| available())
    }

    /// A receiver that changes whenever [`Gate::notify`] is called.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.version.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Check>> {
        // The checks are plain reads; a panic in one cannot leave the list inconsistent.
        self.inner.checks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn closes_while_any_dependency_is_down_and_wakes_subscribers() {
        let gate = Gate::new();
        let mut rx = gate.subscribe();
        assert!(gate.is_open());
        let up = Arc::new(AtomicBool::new(true));
        let u = up.clone();
        gate.add_check(move || u.load(Ordering::SeqCst));
        gate.add_check(|| true);
        rx.borrow_and_update();
        up.store(false, Ordering::SeqCst);
        gate.notify();
        rx.changed().await.unwrap();
        assert!(!gate.is_open());
        up.store(true, Ordering::SeqCst);
        gate.notify();
        rx.changed().await.unwrap();
        assert!(gate.is_open());
    }
}
