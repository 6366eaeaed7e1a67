//! Writes staged over an engine and read back before they reach it.
//!
//! A state machine applying a run of committed log entries executes each
//! against the table as the earlier ones left it, but writes the whole run
//! to the engine in one batch: one engine write (one WAL append) instead of
//! one per entry. [`Overlay`] is the table "as the earlier ones left it": an
//! [`Engine`] whose reads merge the staged writes over the base engine's
//! state, and whose writes are staged until [`Overlay::take`] hands them
//! over as one [`WriteBatch`] (in the order they were staged, so writing it
//! has exactly the effect of the staged batches written one by one).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::engine::{BatchOp, Engine, EngineError, EngineView, Pair, WriteBatch};

#[derive(Default)]
struct Staged {
    /// The staged value of every key a staged write touched (`None`:
    /// deleted), the last write winning.
    points: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Ranges a staged write deleted: base keys in them are hidden (a
    /// later staged put of a key in one is in `points`).
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
    batch: WriteBatch,
    bytes: usize,
}

impl Staged {
    fn hidden(&self, key: &[u8]) -> Option<&[u8]> {
        self.ranges.iter().find(|(s, e)| s.as_slice() <= key && key < e.as_slice()).map(|(s, _)| s.as_slice())
    }
}

/// Staged writes over `base` (see the module documentation).
pub struct Overlay {
    base: Arc<dyn Engine>,
    staged: Mutex<Staged>,
}

impl Overlay {
    pub fn new(base: Arc<dyn Engine>) -> Self {
        Self { base, staged: Mutex::default() }
    }

    fn lock(&self) -> MutexGuard<'_, Staged> {
        // Nothing panics while holding it; a poisoned lock still holds
        // consistent data.
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stages `batch`: later reads see it, the engine does not yet.
    pub fn stage(&self, batch: WriteBatch) {
        let mut s = self.lock();
        s.bytes += batch.size_bytes();
        for op in &batch.ops {
            match op {
                BatchOp::Put { key, value } => {
                    s.points.insert(key.clone(), Some(value.clone()));
                }
                BatchOp::Delete { key } => {
                    s.points.insert(key.clone(), None);
                }
                BatchOp::DeleteRange { start, end } => {
                    if start < end {
                        let inside: Vec<Vec<u8>> = s
                            .points
                            .range::<[u8], _>((Bound::Included(start.as_slice()), Bound::Excluded(end.as_slice())))
                            .map(|(k, _)| k.clone())
                            .collect();
                        for k in inside {
                            s.points.remove(&k);
                        }
                        s.ranges.push((start.clone(), end.clone()));
                    }
                }
            }
        }
        s.batch.extend(batch);
    }

    /// Bytes of keys and values staged since the last [`Overlay::take`].
    pub fn staged_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.lock().batch.is_empty()
    }

    /// Everything staged, as one batch with the effect of the staged
    /// batches written in order; the overlay is empty afterwards. Write the
    /// batch to the base engine before reading through the overlay again.
    ///
    /// Without range deletions the batch is the last write of each key, in
    /// key order: keys every entry rewrites (the table's revision, the
    /// applied log id) reach the engine once per batch, not once per entry.
    pub fn take(&self) -> WriteBatch {
        let staged = std::mem::take(&mut *self.lock());
        if !staged.ranges.is_empty() {
            return staged.batch;
        }
        let mut batch = WriteBatch::new();
        for (key, value) in staged.points {
            match value {
                Some(v) => batch.put(key, v),
                None => batch.delete(key),
            }
        }
        batch
    }

    /// Writes everything staged to the base engine.
    pub fn write_through(&self) -> Result<(), EngineError> {
        let batch = self.take();
        if batch.is_empty() {
            return Ok(());
        }
        self.base.write(batch)
    }
}

impl Engine for Overlay {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        {
            let s = self.lock();
            if let Some(v) = s.points.get(key) {
                return Ok(v.clone());
            }
            if s.hidden(key).is_some() {
                return Ok(None);
            }
        }
        self.base.get(key)
    }

    fn scan(&self, start: &[u8], end: &[u8], visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), EngineError> {
        if start >= end {
            return Ok(());
        }
        let s = self.lock();
        let mut staged = s.points.range::<[u8], _>((Bound::Included(start), Bound::Excluded(end))).peekable();
        let mut go = true;
        self.base.scan(start, end, &mut |k, v| {
            // Staged keys before this one come first.
            while let Some((sk, sv)) = staged.next_if(|(sk, _)| sk.as_slice() < k) {
                if let Some(sv) = sv {
                    if !visit(sk, sv) {
                        go = false;
                        return false;
                    }
                }
            }
            go = match staged.next_if(|(sk, _)| sk.as_slice() == k) {
                Some((sk, Some(sv))) => visit(sk, sv),
                Some((_, None)) => true,
                None if s.hidden(k).is_some() => true,
                None => visit(k, v),
            };
            go
        })?;
        if go {
            for (sk, sv) in staged {
                if let Some(sv) = sv {
                    if !visit(sk, sv) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn last(&self, start: &[u8], end: &[u8]) -> Result<Option<Pair>, EngineError> {
        if start >= end {
            return Ok(None);
        }
        let s = self.lock();
        let from_staged = s
            .points
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .rev()
            .find_map(|(k, v)| v.as_ref().map(|v| (k.clone(), v.clone())));
        // The greatest base key that no staged write replaced or deleted:
        // each step either finds it or lowers the bound below a key that is
        // staged or inside a deleted range.
        let mut hi = end.to_vec();
        let from_base = loop {
            if start >= hi.as_slice() {
                break None;
            }
            match self.base.last(start, &hi)? {
                None => break None,
                Some((k, _)) if s.points.contains_key(&k) => hi = k,
                Some((k, v)) => match s.hidden(&k) {
                    Some(range_start) => hi = range_start.max(start).to_vec(),
                    None => break Some((k, v)),
                },
            }
        };
        Ok(match (from_staged, from_base) {
            (Some(a), Some(b)) => Some(if a.0 > b.0 { a } else { b }),
            (a, b) => a.or(b),
        })
    }

    /// Stages the batch (see [`Overlay::stage`]).
    fn write(&self, batch: WriteBatch) -> Result<(), EngineError> {
        self.stage(batch);
        Ok(())
    }

    /// Writes the staged batch to the base engine, then syncs it.
    fn sync(&self) -> Result<(), EngineError> {
        self.write_through()?;
        self.base.sync()
    }

    /// A view of the base engine after the staged writes reach it.
    fn view(&self, start: &[u8], end: &[u8]) -> Result<Arc<dyn EngineView>, EngineError> {
        self.write_through()?;
        self.base.view(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{conformance, MemEngine};
    use proptest::prelude::*;

    #[test]
    fn an_overlay_conforms_as_an_engine() {
        conformance::run_all(&mut || Box::new(Overlay::new(Arc::new(MemEngine::new()))));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, u8),
        Delete(u8),
        DeleteRange(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..16, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
            (0u8..16).prop_map(Op::Delete),
            (0u8..16, 0u8..17).prop_map(|(a, b)| Op::DeleteRange(a, b)),
        ]
    }

    fn batch_of(ops: &[Op]) -> WriteBatch {
        let mut b = WriteBatch::new();
        for o in ops {
            match *o {
                Op::Put(k, v) => b.put(vec![k], vec![v]),
                Op::Delete(k) => b.delete(vec![k]),
                Op::DeleteRange(a, c) => b.delete_range(vec![a], vec![c]),
            }
        }
        b
    }

    fn all(e: &dyn Engine, start: u8, end: u8) -> Vec<Pair> {
        let mut out = Vec::new();
        e.scan(&[start], &[end], &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            true
        })
        .unwrap();
        out
    }

    proptest! {
        /// Reads through the overlay equal reads of an engine the staged
        /// batches were written to, and writing the taken batch to the base
        /// gives that engine's state.
        #[test]
        fn reads_through_the_overlay_equal_reads_after_writing(
            base_ops in proptest::collection::vec(op(), 0..24),
            staged in proptest::collection::vec(proptest::collection::vec(op(), 0..8), 0..6),
            lo in 0u8..17,
            hi in 0u8..18,
        ) {
            let base = Arc::new(MemEngine::new());
            base.write(batch_of(&base_ops)).unwrap();
            let reference = MemEngine::new();
            reference.write(batch_of(&base_ops)).unwrap();
            let overlay = Overlay::new(base.clone());
            for b in &staged {
                overlay.stage(batch_of(b));
                reference.write(batch_of(b)).unwrap();
                for k in 0u8..16 {
                    prop_assert_eq!(overlay.get(&[k]).unwrap(), reference.get(&[k]).unwrap());
                }
                prop_assert_eq!(all(&overlay, lo, hi), all(&reference, lo, hi));
                prop_assert_eq!(overlay.last(&[lo], &[hi]).unwrap(), reference.last(&[lo], &[hi]).unwrap());
            }
            base.write(overlay.take()).unwrap();
            prop_assert_eq!(all(&*base, 0, 255), all(&reference, 0, 255));
            prop_assert!(overlay.is_empty());
        }
    }
}
