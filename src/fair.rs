//! Weighted fair sharing between classes of events (by default, their source), so one source's
//! backlog cannot hold back another's fresh events.
//!
//! * [`FairQueue`]: a queue of items in classes, served by stride scheduling: each class has a
//!   *pass*; the backlogged class with the lowest pass is served next and its pass grows by
//!   `STRIDE / weight`. Within a class, items keep their order. A class that was idle starts at
//!   the current virtual time, so idling earns no credit, and a class that just became
//!   backlogged is served after at most one item of every other class.
//! * [`Turnstile`]: an async lock whose waiters are granted the turn in that fair order. Each
//!   LLM account's admission takes turns through one.
//!
//! The scheduler's ready queue is a `FairQueue`, so the in-flight slots are shared the same way.
//! Only classes with something queued take memory; an empty class is forgotten.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use rdkafka::message::{Message, OwnedMessage};
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::codec::header_str;
use crate::config::ConfigError;

/// The pass a class with weight 1 advances by per item served.
const STRIDE: u64 = 1 << 20;

/// Largest weight a class may have.
pub const MAX_WEIGHT: u32 = 1_000;

/// The class an event is shared in, and its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The class: the event's source, its topic, or empty (one class: first come, first served).
    pub class: Arc<str>,
    /// Its weight: a backlogged class gets `weight / sum of backlogged weights` of the turns.
    pub weight: u32,
}

impl Default for Share {
    fn default() -> Self {
        Share {
            class: Arc::from(""),
            weight: 1,
        }
    }
}

/// What events are shared by (`processor.fairness.by`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FairBy {
    /// The `ce_source` header (the ingress sets `/webhooks/<source>`), else the topic.
    #[default]
    Source,
    /// The record's topic.
    Topic,
    /// No sharing: first come, first served.
    None,
}

/// `[processor.fairness]`: how the in-flight slots and each LLM account's admission are shared.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FairnessConfig {
    /// `source` (the `ce_source` header, else the topic), `topic`, or `none`.
    #[serde(default)]
    pub by: FairBy,
    /// Weight of a class by its name (a `ce_source` value such as `/webhooks/blog`, or a topic);
    /// classes not named have weight 1.
    #[serde(default)]
    pub weights: HashMap<String, u32>,
}

impl FairnessConfig {
    /// Checks the weights.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (class, w) in &self.weights {
            if *w == 0 || *w > MAX_WEIGHT {
                return Err(ConfigError::invalid(
                    format!("processor.fairness.weights.\"{class}\""),
                    format!("must be between 1 and {MAX_WEIGHT}"),
                ));
            }
        }
        if self.by == FairBy::None && !self.weights.is_empty() {
            return Err(ConfigError::invalid(
                "processor.fairness.weights",
                "has no effect with by = \"none\"",
            ));
        }
        Ok(())
    }

    /// The class a record is shared in, and its weight.
    pub fn share_of(&self, record: &OwnedMessage) -> Share {
        let class = match self.by {
            FairBy::None => return Share::default(),
            FairBy::Source => header_str(record, "ce_source").unwrap_or(record.topic()),
            FairBy::Topic => record.topic(),
        };
        Share {
            weight: self.weights.get(class).copied().unwrap_or(1),
            class: Arc::from(class),
        }
    }
}

struct Class<T> {
    items: VecDeque<T>,
    pass: u64,
}

/// Items in classes, served by weight (stride scheduling), in order within a class.
pub struct FairQueue<T> {
    classes: HashMap<Arc<str>, Class<T>>,
    /// Backlogged classes by (pass, arrival), the next to serve first.
    order: BTreeSet<(u64, u64, Arc<str>)>,
    /// Arrival number of each backlogged class, to find its entry in `order`.
    arrival: HashMap<Arc<str>, u64>,
    next_arrival: u64,
    /// The lowest pass backlogged (or of the item served last): where a newly backlogged
    /// class starts.
    vtime: u64,
    /// Where classes that drained would have been served next, until virtual time passes it:
    /// a class that comes back starts there, so draining and returning earns it nothing.
    drained: HashMap<Arc<str>, u64>,
    len: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        FairQueue {
            classes: HashMap::new(),
            order: BTreeSet::new(),
            arrival: HashMap::new(),
            next_arrival: 0,
            vtime: 0,
            drained: HashMap::new(),
            len: 0,
        }
    }
}

impl<T> FairQueue<T> {
    /// Items queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Items queued in `class`.
    pub fn class_len(&self, class: &str) -> usize {
        self.classes.get(class).map_or(0, |c| c.items.len())
    }

    /// Classes with something queued.
    pub fn classes(&self) -> usize {
        self.classes.len()
    }

    /// Queues `item` at the back of its class.
    pub fn push(&mut self, class: &Arc<str>, item: T) {
        self.len += 1;
        if let Some(c) = self.classes.get_mut(class) {
            c.items.push_back(item);
            return;
        }
        let pass = (self.drained.remove(class)).map_or(self.vtime, |p| p.max(self.vtime));
        self.classes.insert(
            class.clone(),
            Class {
                items: VecDeque::from([item]),
                pass,
            },
        );
        self.activate(class.clone(), pass);
    }

    fn activate(&mut self, class: Arc<str>, pass: u64) {
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.arrival.insert(class.clone(), arrival);
        self.order.insert((pass, arrival, class));
    }

    /// Takes the next item: the front of the backlogged class with the lowest pass, whose pass
    /// then grows by `STRIDE / weight(item)`.
    pub fn pop(&mut self, weight: impl Fn(&T) -> u32) -> Option<T> {
        self.pop_where(weight, |_| true)
    }

    /// Like [`FairQueue::pop`], among the classes `allowed` accepts only (the others keep
    /// their place).
    pub fn pop_where(
        &mut self,
        weight: impl Fn(&T) -> u32,
        allowed: impl Fn(&str) -> bool,
    ) -> Option<T> {
        let entry = self.order.iter().find(|(_, _, c)| allowed(c)).cloned()?;
        self.order.remove(&entry);
        let (pass, _, class) = entry;
        self.arrival.remove(&class);
        let c = self.classes.get_mut(&class)?;
        let item = c.items.pop_front()?;
        self.len -= 1;
        c.pass = pass + STRIDE / u64::from(weight(&item).clamp(1, MAX_WEIGHT));
        let next = c.pass;
        if c.items.is_empty() {
            self.classes.remove(&class);
            self.drained.insert(class, next);
        } else {
            self.activate(class, next);
        }
        // Virtual time moves to the lowest pass still backlogged: a new class starts level
        // with the others.
        let at = self.order.first().map_or(next, |(p, _, _)| *p);
        self.vtime = self.vtime.max(at);
        // Bounded: a drained class's pass matters only while virtual time is below it.
        if self.drained.len() > 2 * self.classes.len() + 64 {
            let vtime = self.vtime;
            self.drained.retain(|_, p| *p > vtime);
        }
        Some(item)
    }

    /// Keeps only the items `keep` accepts; classes left empty are forgotten.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let mut emptied = Vec::new();
        for (name, c) in self.classes.iter_mut() {
            let before = c.items.len();
            c.items.retain(&mut keep);
            self.len -= before - c.items.len();
            if c.items.is_empty() {
                emptied.push(name.clone());
            }
        }
        for name in emptied {
            if let Some(c) = self.classes.remove(&name) {
                if let Some(arrival) = self.arrival.remove(&name) {
                    self.order.remove(&(c.pass, arrival, name));
                }
            }
        }
    }
}

struct Turns {
    busy: bool,
    waiting: FairQueue<(u32, oneshot::Sender<()>)>,
}

/// An async lock granted to its waiters in weighted fair order by [`Share`].
pub struct Turnstile {
    turns: Mutex<Turns>,
}

/// Holds the turn; dropping it passes the turn to the next waiter.
pub struct Turn<'a> {
    turnstile: &'a Turnstile,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.turnstile.pass_on();
    }
}

/// A waiter whose future may be dropped (its task aborted) just after the turn was passed to
/// it: the turn is then passed on rather than lost.
struct Waiting<'a> {
    turnstile: &'a Turnstile,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.turnstile.pass_on();
            }
        }
    }
}

impl Default for Turnstile {
    fn default() -> Self {
        Turnstile {
            turns: Mutex::new(Turns {
                busy: false,
                waiting: FairQueue::default(),
            }),
        }
    }
}

impl Turnstile {
    fn lock(&self) -> std::sync::MutexGuard<'_, Turns> {
        // A flag and a queue; a panic elsewhere cannot leave them inconsistent.
        self.turns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the turn. Waiters of different classes are granted it by weight; waiters of
    /// one class in arrival order.
    pub async fn turn(&self, share: &Share) -> Turn<'_> {
        let rx = {
            let mut t = self.lock();
            if !t.busy {
                t.busy = true;
                return Turn { turnstile: self };
            }
            let (tx, rx) = oneshot::channel();
            t.waiting.push(&share.class, (share.weight, tx));
            rx
        };
        let mut waiting = Waiting {
            turnstile: self,
            rx: Some(rx),
        };
        if let Some(rx) = waiting.rx.as_mut() {
            // The sender is dropped only after it sent: `pass_on` never drops one unsent.
            let _ = rx.await;
        }
        waiting.rx = None;
        Turn { turnstile: self }
    }

    /// Waiters queued.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    fn pass_on(&self) {
        let mut t = self.lock();
        while let Some((_, tx)) = t.waiting.pop(|(w, _)| *w) {
            if tx.send(()).is_ok() {
                return; // Still busy: the turn is the waiter's now.
            }
        }
        t.busy = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn share(class: &str, weight: u32) -> Share {
        Share {
            class: Arc::from(class),
            weight,
        }
    }

    #[test]
    fn a_class_that_arrives_behind_a_backlog_is_served_next() {
        let mut q = FairQueue::default();
        let spike: Arc<str> = Arc::from("/webhooks/campaign");
        let steady: Arc<str> = Arc::from("/webhooks/blog");
        for i in 0..10_000 {
            q.push(&spike, ("spike", i, 1));
        }
        assert_eq!(q.pop(|t| t.2), Some(("spike", 0, 1)));
        q.push(&steady, ("steady", 0, 1));
        let next: Vec<_> = (0..2).map(|_| q.pop(|t| t.2).unwrap().0).collect();
        assert!(next.contains(&"steady"), "served {next:?}");
        assert_eq!(q.len(), 9_998);
        assert_eq!(q.classes(), 1, "the drained class is forgotten");
    }

    #[test]
    fn retain_drops_items_and_forgets_emptied_classes() {
        let mut q = FairQueue::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        for i in 0..4 {
            q.push(&a, i);
            q.push(&b, 10 + i);
        }
        q.retain(|i| *i >= 10 || *i == 3);
        assert_eq!(q.len(), 5);
        assert_eq!(q.class_len("a"), 1);
        q.retain(|i| *i < 10);
        assert_eq!((q.len(), q.classes()), (1, 1));
        assert_eq!(q.pop(|_| 1), Some(3));
        assert!(q.pop(|_| 1).is_none());
        assert_eq!(q.classes(), 0);
    }

    #[test]
    fn a_class_that_drains_and_comes_back_just_in_time_gets_only_its_weight() {
        // `a` (weight 1) has one item at a time, refilled right after each pop, as a source
        // paced at the dispatch rate would; `b` (weight 2) is backlogged.
        let mut q = FairQueue::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        for _ in 0..1_000 {
            q.push(&b, ('b', 2));
        }
        q.push(&a, ('a', 1));
        let mut served_a = 0;
        for _ in 0..300 {
            let (who, _) = q.pop(|t| t.1).unwrap();
            if who == 'a' {
                served_a += 1;
                q.push(&a, ('a', 1));
            }
        }
        assert!((99..=101).contains(&served_a), "a served {served_a} of 300");
    }

    #[test]
    fn a_held_class_keeps_its_place_while_the_others_are_served() {
        let mut q = FairQueue::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        for i in 0..3 {
            q.push(&a, ('a', i));
            q.push(&b, ('b', i));
        }
        let not_a = |c: &str| c != "a";
        let served: Vec<_> = std::iter::from_fn(|| q.pop_where(|_| 1, not_a)).collect();
        assert_eq!(served, [('b', 0), ('b', 1), ('b', 2)]);
        assert_eq!((q.len(), q.class_len("a")), (3, 3));
        assert_eq!(q.pop(|_| 1), Some(('a', 0)));
    }

    #[test]
    fn drained_classes_are_forgotten_once_virtual_time_passes_them() {
        // A backlogged class and a stream of one-item classes (every event its own source).
        let mut q = FairQueue::default();
        let busy: Arc<str> = Arc::from("busy");
        for i in 0..20_000 {
            q.push(&busy, i);
        }
        for i in 0..10_000 {
            q.push(&Arc::from(format!("once-{i}")), i);
            q.pop(|_| 1);
            q.pop(|_| 1);
            assert!(
                q.drained.len() <= 2 * q.classes() + 64 + 1,
                "{}",
                q.drained.len()
            );
        }
    }

    proptest! {
        /// Backlogged classes are served in proportion to their weights (within one item each),
        /// and each class's items in the order they came.
        #[test]
        fn backlogged_classes_share_by_weight_in_order(
            weights in proptest::collection::vec(1u32..8, 1..5),
            rounds in 1usize..40,
        ) {
            let mut q = FairQueue::default();
            let names: Vec<Arc<str>> = (0..weights.len()).map(|i| Arc::from(format!("c{i}"))).collect();
            let total: u32 = weights.iter().sum();
            let n = rounds * total as usize;
            for (i, name) in names.iter().enumerate() {
                for seq in 0..n {
                    q.push(name, (i, seq, weights[i]));
                }
            }
            let mut served = vec![0usize; weights.len()];
            for _ in 0..n {
                let (i, seq, _) = q.pop(|t| t.2).unwrap();
                prop_assert_eq!(seq, served[i], "class {} out of order", i);
                served[i] += 1;
            }
            for (i, w) in weights.iter().enumerate() {
                let want = rounds * *w as usize;
                prop_assert!(served[i].abs_diff(want) <= 1, "class {} served {} of {}", i, served[i], want);
            }
        }
    }

    #[tokio::test]
    async fn the_turn_goes_to_a_late_class_before_the_backlog() {
        let ts = Arc::new(Turnstile::default());
        let first = ts.turn(&share("spike", 1)).await;
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (ts, done) = (ts.clone(), done_tx.clone());
            tasks.push(tokio::spawn(async move {
                let _t = ts.turn(&share("spike", 1)).await;
                done.send(format!("spike{i}")).unwrap();
            }));
        }
        while ts.waiting() < 20 {
            tokio::task::yield_now().await;
        }
        // A waiter whose task is aborted while it is queued is passed over.
        tasks[0].abort();
        let (ts2, done) = (ts.clone(), done_tx.clone());
        tasks.push(tokio::spawn(async move {
            let _t = ts2.turn(&share("steady", 1)).await;
            done.send("steady".to_string()).unwrap();
        }));
        while ts.waiting() < 21 {
            tokio::task::yield_now().await;
        }
        drop(first);
        drop(done_tx);
        let mut order = Vec::new();
        while let Some(who) = done_rx.recv().await {
            order.push(who);
        }
        assert_eq!(
            order.first().map(String::as_str),
            Some("steady"),
            "{order:?}"
        );
        assert_eq!(
            order.len(),
            20,
            "every waiter but the aborted one: {order:?}"
        );
        let spikes: Vec<_> = order[1..]
            .iter()
            .map(|s| s[5..].parse::<u32>().unwrap())
            .collect();
        assert_eq!(
            spikes,
            (1..20).collect::<Vec<_>>(),
            "one class in arrival order"
        );
        drop(ts.turn(&share("x", 1)).await);
    }

    #[tokio::test]
    async fn a_turn_passed_to_a_waiter_aborted_before_it_ran_goes_on_to_the_next() {
        let ts = Arc::new(Turnstile::default());
        let holder = ts.turn(&share("a", 1)).await;
        let spawn = |class: &'static str| {
            let ts = ts.clone();
            tokio::spawn(async move {
                let _t = ts.turn(&share(class, 1)).await;
            })
        };
        let (a, b) = (spawn("a"), spawn("b"));
        while ts.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        // The turn is sent to `a`'s waiter, which is aborted before it runs again.
        drop(holder);
        assert_eq!(ts.waiting(), 1);
        a.abort();
        tokio::time::timeout(std::time::Duration::from_secs(5), b)
            .await
            .expect("the turn reached the next waiter")
            .unwrap();
        assert!(a.await.unwrap_err().is_cancelled());
        drop(ts.turn(&share("c", 1)).await);
    }
}
