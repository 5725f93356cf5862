//! Which Kafka offset a partition may commit: the position just past the longest run of
//! records, from the last commit, that are all resolved (delivered or parked).
//!
//! Records are registered when they arrive and resolved in any order (parallel lanes,
//! partial batch responses); the committable position is the lowest unresolved offset,
//! or one past the highest offset seen when none is pending. Gaps in the offsets
//! (compaction, transaction markers) are therefore harmless.

use std::collections::BTreeSet;

#[derive(Debug, Default)]
pub struct OffsetTracker {
    pending: BTreeSet<u64>,
    /// One past the highest offset received.
    end: Option<u64>,
    /// The last position handed out for committing.
    committed: Option<u64>,
}

impl OffsetTracker {
    pub fn received(&mut self, offset: u64) {
        self.pending.insert(offset);
        self.end = Some(self.end.map_or(offset + 1, |e| e.max(offset + 1)));
    }

    pub fn resolved(&mut self, offset: u64) {
        self.pending.remove(&offset);
    }

    /// The position a commit may name now (the next offset to consume).
    pub fn committable(&self) -> Option<u64> {
        self.pending.first().copied().or(self.end)
    }

    /// The committable position if it moved since the last call.
    pub fn advance(&mut self) -> Option<u64> {
        let c = self.committable()?;
        if self.committed.is_some_and(|done| done >= c) {
            return None;
        }
        self.committed = Some(c);
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn commits_only_past_a_contiguous_resolved_run() {
        let mut t = OffsetTracker::default();
        assert_eq!(t.advance(), None);
        for o in [10, 11, 12, 15] {
            t.received(o);
        }
        assert_eq!(t.committable(), Some(10));
        t.resolved(11);
        t.resolved(15);
        assert_eq!(t.advance(), Some(10));
        assert_eq!(t.advance(), None, "nothing moved");
        t.resolved(10);
        assert_eq!(t.advance(), Some(12));
        t.resolved(12);
        // 13 and 14 never arrived (a gap): the run ends past 15.
        assert_eq!(t.advance(), Some(16));
    }

    proptest! {
        /// Whatever the order of resolution, the committable position never passes an
        /// unresolved offset and never moves backwards.
        #[test]
        fn never_passes_an_unresolved_record(
            offsets in proptest::collection::btree_set(0u64..500, 1..60),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 0..60),
        ) {
            let offsets: Vec<u64> = offsets.into_iter().collect();
            let mut t = OffsetTracker::default();
            for &o in &offsets {
                t.received(o);
            }
            let mut unresolved = offsets.clone();
            let mut last = 0;
            for ix in order {
                if unresolved.is_empty() {
                    break;
                }
                let o = unresolved.remove(ix.index(unresolved.len()));
                t.resolved(o);
                if let Some(c) = t.advance() {
                    prop_assert!(c >= last);
                    last = c;
                }
                let c = t.committable().unwrap();
                prop_assert!(unresolved.iter().all(|&u| u >= c));
            }
            if unresolved.is_empty() {
                prop_assert_eq!(t.committable(), Some(offsets.last().unwrap() + 1));
            }
        }
    }
}
