//! Per-partition offset tracking: the only code that decides what may be committed.
//!
//! Records of a partition finish out of order (different keys run concurrently). The tracker
//! remembers every record received and which have finished (steps succeeded, dead-lettered or
//! skipped), and exposes only the contiguous low-watermark: the offset of the first record that
//! is not finished yet, or one past the last record when all are. Committing that offset can
//! never skip an unfinished record. Pure code, no I/O, property-tested below.

use std::collections::VecDeque;

/// Tracks received and finished offsets of one partition.
#[derive(Debug, Default, Clone)]
pub struct OffsetTracker {
    /// Received offsets not yet below the watermark, ascending, with their finished flag.
    pending: VecDeque<(i64, bool)>,
    /// One past the highest offset ever received.
    next: Option<i64>,
}

/// What [`OffsetTracker::track`] made of an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracked {
    /// A new offset, now pending.
    New,
    /// An offset at or below one already received (a redelivery); it must not run again here.
    Duplicate,
}

impl OffsetTracker {
    /// A tracker with nothing received yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a received record. Offsets arrive in ascending order per partition (with
    /// possible gaps from compaction or transaction markers); anything at or below the highest
    /// offset seen so far is reported as a duplicate and not tracked again.
    pub fn track(&mut self, offset: i64) -> Tracked {
        if matches!(self.next, Some(next) if offset < next) {
            return Tracked::Duplicate;
        }
        self.pending.push_back((offset, false));
        self.next = Some(offset + 1);
        Tracked::New
    }

    /// Marks a tracked record finished. Returns false if the offset is not pending (already
    /// finished, or never tracked), which callers treat as a bug worth logging, not a panic.
    pub fn finish(&mut self, offset: i64) -> bool {
        let Ok(i) = self.pending.binary_search_by_key(&offset, |(o, _)| *o) else {
            return false;
        };
        if self.pending[i].1 {
            return false;
        }
        self.pending[i].1 = true;
        while matches!(self.pending.front(), Some((_, true))) {
            self.pending.pop_front();
        }
        true
    }

    /// The offset to commit: the first unfinished offset, or one past the last received when
    /// everything finished. `None` before anything was received.
    pub fn committable(&self) -> Option<i64> {
        match self.pending.front() {
            Some((offset, _)) => Some(*offset),
            None => self.next,
        }
    }

    /// One past the highest offset received, if any.
    pub fn next_offset(&self) -> Option<i64> {
        self.next
    }

    /// Records received and not yet below the watermark (finished ones above a gap included).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn empty_tracker_commits_nothing() {
        assert_eq!(OffsetTracker::new().committable(), None);
    }

    #[test]
    fn commits_nothing_past_an_unfinished_record() {
        let mut t = OffsetTracker::new();
        for o in 10..15 {
            t.track(o);
        }
        for o in [11, 12, 14] {
            assert!(t.finish(o));
        }
        assert_eq!(t.committable(), Some(10), "offset 10 is still running");
        assert!(t.finish(10));
        assert_eq!(t.committable(), Some(13), "offset 13 is still running");
        assert!(t.finish(13));
        assert_eq!(t.committable(), Some(15));
    }

    #[test]
    fn gaps_from_compaction_do_not_block() {
        let mut t = OffsetTracker::new();
        t.track(5);
        t.track(9);
        t.finish(5);
        assert_eq!(t.committable(), Some(9));
        t.finish(9);
        assert_eq!(t.committable(), Some(10));
    }

    #[test]
    fn redelivered_offsets_are_duplicates() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.track(3), Tracked::New);
        assert_eq!(t.track(3), Tracked::Duplicate);
        t.finish(3);
        assert_eq!(t.track(2), Tracked::Duplicate);
        assert!(!t.finish(3), "finishing twice is reported");
        assert!(!t.finish(99), "finishing an unknown offset is reported");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Receive(u8),
        Finish(usize),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                (1u8..4).prop_map(Op::Receive),
                any::<usize>().prop_map(Op::Finish)
            ],
            0..300,
        )
    }

    proptest! {
        /// Under any interleaving of receives (with gaps) and out-of-order finishes, the
        /// committable offset is exactly the first unfinished offset, or one past the last
        /// received when all are finished, and it never moves backwards.
        #[test]
        fn watermark_never_passes_unfinished_work(ops in ops()) {
            let mut t = OffsetTracker::new();
            let mut received = Vec::new();
            let mut unfinished = BTreeSet::new();
            let mut next = 100i64;
            let mut last_commit = None;
            for op in ops {
                match op {
                    Op::Receive(gap) => {
                        next += i64::from(gap);
                        prop_assert_eq!(t.track(next), Tracked::New);
                        received.push(next);
                        unfinished.insert(next);
                    }
                    Op::Finish(i) => {
                        if unfinished.is_empty() { continue; }
                        let o = *unfinished.iter().nth(i % unfinished.len()).unwrap();
                        prop_assert!(t.finish(o));
                        unfinished.remove(&o);
                    }
                }
                let expected = match unfinished.iter().next() {
                    Some(first) => Some(*first),
                    None => received.last().map(|l| l + 1),
                };
                prop_assert_eq!(t.committable(), expected);
                if let (Some(prev), Some(now)) = (last_commit, t.committable()) {
                    prop_assert!(now >= prev, "watermark moved backwards");
                }
                last_commit = t.committable();
            }
        }
    }
}
