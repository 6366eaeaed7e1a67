//! History and replica checks other than linearizability.

use std::collections::BTreeMap;

use armada_core::GroupId;

use crate::history::{Op, OpKind, OpResult, Outcome};

/// S3 (client side): a client never sees a table's revision go backwards in
/// linearizable operations, and no two acknowledged changes share a revision.
pub fn revisions(history: &[Op]) -> Result<(), String> {
    let mut last: BTreeMap<(u32, &str), u64> = BTreeMap::new();
    let mut owners: BTreeMap<(&str, u64), usize> = BTreeMap::new();
    for (i, op) in history.iter().enumerate() {
        let Outcome::Ok(r) = &op.outcome else { continue };
        let linearizable = !matches!(op.kind, OpKind::Get { serializable: true, .. });
        if linearizable {
            let seen = last.entry((op.client, op.table.as_str())).or_insert(0);
            if r.revision() < *seen {
                return Err(format!(
                    "S3 client {} saw table {} go back from revision {} to {} ({:?})",
                    op.client,
                    op.table,
                    seen,
                    r.revision(),
                    op.kind
                ));
            }
            *seen = r.revision();
        }
        let changed = match r {
            OpResult::Put { .. } => true,
            OpResult::Delete { deleted, .. } => *deleted > 0,
            OpResult::Cas { succeeded, .. } => *succeeded,
            _ => false,
        };
        if changed {
            // The puts of one multi-key transaction (`put_many`) are recorded
            // as one op per key: same client, same invocation and completion.
            let same_txn = |j: usize| {
                let o = &history[j];
                o.client == op.client && o.invoke_ns == op.invoke_ns && o.complete_ns == op.complete_ns
            };
            if let Some(j) = owners.insert((op.table.as_str(), r.revision()), i).filter(|j| !same_txn(*j)) {
                return Err(format!(
                    "S3 two acknowledged writes got revision {} of table {}: {:?} and {:?}",
                    r.revision(),
                    op.table,
                    history[j].kind,
                    op.kind
                ));
            }
        }
    }
    Ok(())
}

/// Reads at a past revision return the latest acknowledged write at or
/// below that revision.
/// Acknowledged changes of one key: (revision, value or `None` for a delete).
type Changes<'a> = Vec<(u64, Option<&'a str>)>;

pub fn reads_at_revision(history: &[Op]) -> Result<(), String> {
    // (table, key) -> [(revision, value or None for a delete)] of acknowledged changes.
    let mut writes: BTreeMap<(&str, &str), Changes> = BTreeMap::new();
    let mut indefinite: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    // Range deletes (any outcome): which of their keys they deleted is not
    // known, so a read finding nothing in their range is not checked.
    let mut range_deletes: Vec<(&str, &str, &str)> = Vec::new();
    for op in history {
        if let (OpKind::DeleteRange { from, to }, Outcome::Ok(_) | Outcome::Indefinite(_)) = (&op.kind, &op.outcome) {
            range_deletes.push((&op.table, from, to));
        }
        let key = match &op.kind {
            OpKind::Put { key, .. } | OpKind::Delete { key } | OpKind::Cas { key, .. } => key.as_str(),
            _ => continue,
        };
        match (&op.kind, &op.outcome) {
            (OpKind::Put { value, .. }, Outcome::Ok(OpResult::Put { revision })) => {
                writes.entry((&op.table, key)).or_default().push((*revision, Some(value.as_str())))
            }
            (OpKind::Delete { .. }, Outcome::Ok(OpResult::Delete { deleted, revision })) if *deleted > 0 => {
                writes.entry((&op.table, key)).or_default().push((*revision, None))
            }
            (OpKind::Cas { new, .. }, Outcome::Ok(OpResult::Cas { succeeded: true, revision })) => {
                writes.entry((&op.table, key)).or_default().push((*revision, Some(new.as_str())))
            }
            (_, Outcome::Indefinite(_)) => *indefinite.entry((&op.table, key)).or_default() += 1,
            _ => {}
        }
    }
    for op in history {
        let (OpKind::GetAt { key, revision }, Outcome::Ok(OpResult::Get { value, .. })) = (&op.kind, &op.outcome)
        else {
            continue;
        };
        let w = writes.get(&(op.table.as_str(), key.as_str()));
        let latest = w.and_then(|w| w.iter().filter(|(r, _)| r <= revision).max_by_key(|(r, _)| *r));
        match value {
            Some((v, mod_rev)) => {
                if mod_rev > revision {
                    return Err(format!("read of {key} at revision {revision} returned a version from {mod_rev}"));
                }
                // If the version read is an acknowledged write, nothing
                // acknowledged may lie between it and the revision read.
                if let Some((r, val)) = latest {
                    if *r > *mod_rev && w.is_some_and(|w| w.iter().any(|(wr, _)| wr == mod_rev)) {
                        return Err(format!(
                            "read of {key} at revision {revision} returned {v:?} from {mod_rev}, but {val:?} was written at {r}"
                        ));
                    }
                }
            }
            None => {
                let range_deleted = range_deletes
                    .iter()
                    .any(|(t, from, to)| *t == op.table && key.as_str() >= *from && key.as_str() < *to);
                if let Some((r, Some(val))) = latest.filter(|_| !range_deleted) {
                    if indefinite.get(&(op.table.as_str(), key.as_str())).copied().unwrap_or(0) == 0 {
                        return Err(format!(
                            "read of {key} at revision {revision} found nothing, but {val:?} was written at {r}"
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The first application of one log index.
struct Applied {
    digest: u64,
    /// Table revision after the entry.
    revision: Option<u64>,
    node: u64,
    term: u64,
}

/// S2: a write the client was told definitely failed must never be
/// committed (it would be a write the client believes lost, but applied).
pub fn failed_writes_not_applied(history: &[Op], committed: &std::collections::BTreeSet<String>) -> Result<(), String> {
    for op in history {
        let value = match &op.kind {
            OpKind::Put { value, .. } => value,
            OpKind::Cas { new, .. } => new,
            _ => continue,
        };
        if let Outcome::Failed(why) = &op.outcome {
            if committed.contains(value) {
                return Err(format!("S2 a write reported as failed ({why}) was committed: {:?}", op.kind));
            }
        }
    }
    Ok(())
}

/// What the replicas applied, reported by every node's state machines.
#[derive(Default)]
pub struct ApplyLog {
    applied: BTreeMap<(GroupId, u64), Applied>,
    pub violations: Vec<String>,
    pub applied_count: u64,
    pub snapshots_installed: u64,
    pub installs_resumed: u64,
    /// Every value a committed command wrote (values are unique per write).
    pub committed_values: std::collections::BTreeSet<String>,
}

impl ApplyLog {
    /// S4 (committed entries never change) and S3 (revisions gap-free and
    /// increasing): every replica applies the same entry and reaches the
    /// same revision at each index, and each entry moves the revision by 0
    /// or 1 from the entry before it.
    /// Returns whether this is the first application of `(group, index)`.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        node: u64,
        group: GroupId,
        index: u64,
        term: u64,
        digest: u64,
        revision: Option<u64>,
        replicated: bool,
    ) -> bool {
        // A follower cluster applies the leader's revisions in batches: its
        // revision may jump ahead by many, but never go back.
        let ok = |from: u64, to: u64| if replicated { to >= from } else { to == from || to == from + 1 };
        self.applied_count += 1;
        let first = !self.applied.contains_key(&(group, index));
        match self.applied.get(&(group, index)) {
            Some(a) => {
                if a.digest != digest || a.revision != revision {
                    self.violations.push(format!(
                        "S4 group {group} index {index}: node {node} applied term {term} revision {revision:?}, node {} applied term {} revision {:?}",
                        a.node, a.term, a.revision
                    ));
                }
            }
            None => {
                if let (Some(rev), Some(Applied { revision: Some(prev), .. })) =
                    (revision, index.checked_sub(1).and_then(|i| self.applied.get(&(group, i))))
                {
                    if !ok(*prev, rev) {
                        self.violations
                            .push(format!("S3 group {group} index {index}: revision went from {prev} to {rev}"));
                    }
                }
                self.applied.insert((group, index), Applied { digest, revision, node, term });
            }
        }
        if let (Some(rev), Some(Applied { revision: Some(next), .. })) =
            (revision, self.applied.get(&(group, index + 1)))
        {
            if !ok(rev, *next) {
                self.violations
                    .push(format!("S3 group {group} index {}: revision went from {rev} to {next}", index + 1));
            }
        }
        first
    }
}

impl ApplyLog {
    /// S9 snapshot seam: a replica that installs a snapshot taken at
    /// `index` must be at the revision every replica that replayed the log
    /// reached at that index.
    pub fn record_snapshot(&mut self, node: u64, group: GroupId, index: u64, revision: Option<u64>) {
        self.snapshots_installed += 1;
        if let Some(a) = self.applied.get(&(group, index)) {
            if a.revision != revision {
                self.violations.push(format!(
                    "S9 group {group}: node {node} installed a snapshot at index {index} with revision {revision:?}, replay gives {:?}",
                    a.revision
                ));
            }
        }
    }
}

/// S4 election safety: at most one leader per (group, term).
#[derive(Default)]
pub struct LeaderLog {
    leaders: BTreeMap<(GroupId, u64), u64>,
    pub violations: Vec<String>,
}

impl LeaderLog {
    pub fn record(&mut self, group: GroupId, term: u64, node: u64) {
        match self.leaders.get(&(group, term)) {
            Some(n) if *n != node => {
                self.violations.push(format!("S4 group {group} term {term}: nodes {n} and {node} both leaders"))
            }
            Some(_) => {}
            None => {
                self.leaders.insert((group, term), node);
            }
        }
    }
}
