//! History and replica checks other than linearizability.

use std::collections::BTreeMap;

use armada_core::command::TableReply;
use armada_core::kv::KvError;
use armada_core::{Command, CommandResponse, GroupId};

use crate::history::{Op, OpKind, OpResult, Outcome};

/// S3 (client side): a client never sees a table's revision go backwards in
/// linearizable operations, and no two acknowledged changes share a revision.
pub fn revisions(history: &[Op]) -> Result<(), String> {
    let mut last: BTreeMap<(u32, &str), u64> = BTreeMap::new();
    let mut owners: BTreeMap<(&str, u64), usize> = BTreeMap::new();
    for (i, op) in history.iter().enumerate() {
        let Outcome::Ok(r) = &op.outcome else { continue };
        let linearizable =
            !matches!(op.kind, OpKind::Get { serializable: true, .. } | OpKind::Query { serializable: true, .. });
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
            OpResult::Put { .. } | OpResult::PutPrev { .. } => true,
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
            OpKind::Put { key, .. }
            | OpKind::PutPrev { key, .. }
            | OpKind::Delete { key }
            | OpKind::Cas { key, .. } => key.as_str(),
            _ => continue,
        };
        match (&op.kind, &op.outcome) {
            (OpKind::Put { value, .. }, Outcome::Ok(OpResult::Put { revision }))
            | (OpKind::PutPrev { value, .. }, Outcome::Ok(OpResult::PutPrev { revision, .. })) => {
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
#[derive(Clone)]
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
            OpKind::Put { value, .. } | OpKind::PutPrev { value, .. } => value,
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

impl ApplyLog {
    /// The groups (global ids) with `prefix` in their upper 32 bits (a
    /// cluster) that some replica applied an entry of.
    pub fn groups_with_prefix(&self, prefix: u64) -> Vec<GroupId> {
        let mut out: Vec<GroupId> = Vec::new();
        for (g, _) in self.applied.keys() {
            if g.0 >> 32 == prefix && out.last() != Some(g) {
                out.push(*g);
            }
        }
        out
    }

    /// S4d (S4 on persistent state): the Raft log a restarting node finds
    /// on its disk is a prefix of the committed log followed by at most
    /// entries that were never committed: its entries are contiguous; an
    /// entry at an index some replica applied is that committed entry, or
    /// one of another term (a leader that appended it and lost its term
    /// before replicating it; its term may even be higher than the
    /// committed entry's, committed later by a leader that held it) that no
    /// later entry on the disk follows with a committed one (log matching);
    /// and every entry up to the committed index the node recorded is still
    /// there (a crash loses only what was never synced, and an entry is
    /// committed only once a quorum synced it). Found while writing this
    /// check on lagging-3 seed 11: a node that led term 4 for a moment kept
    /// its own entry at an index where term 3's entry was committed in a
    /// later term; legal, so terms are not compared.
    pub fn check_stored_log(&mut self, node: u64, group: GroupId, log: &armada_core::raft::StoredLog) {
        let mut found = Vec::new();
        let mut stale: Option<(u64, u64)> = None;
        let mut prev: Option<u64> = None;
        for &(term, index, digest) in &log.entries {
            if let Some(p) = prev.filter(|p| index != p + 1) {
                found.push(format!("its log jumps from index {p} to {index}"));
            }
            prev = Some(index);
            let Some(c) = self.applied.get(&(group, index)) else { continue };
            if (c.term, c.digest) == (term, digest) {
                if let Some((si, st)) = stale {
                    found.push(format!(
                        "it holds the committed entry at index {index} after an entry of term {st} at index {si} that \
                         differs from the committed one (log matching)"
                    ));
                }
            } else if term == c.term {
                found.push(format!(
                    "it holds another entry of term {term} at index {index} than the committed one (a term has one \
                     entry per index)"
                ));
            } else {
                stale.get_or_insert((index, term));
            }
        }
        if let Some(c) = log.committed {
            let last = log.entries.last().map(|e| e.1).or(log.purged);
            if last.is_none_or(|l| l < c) {
                found.push(format!("it recorded index {c} as committed, but its log ends at {last:?}"));
            }
        }
        for f in found.into_iter().take(2) {
            if self.violations.len() < 20 {
                self.violations
                    .push(format!("S4d node {node} restarted on a disk where group {group}'s log is wrong: {f}"));
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

/// M1: every table command a leader-cluster replica applies gives the reply
/// the reference model ([`armada_core::model::KvModel`]) gives when it runs
/// the table's log in order, and leaves the table at the model's revision:
/// which commands create a revision (a delete that deletes nothing, a txn
/// whose branch writes nothing, create none), `prev_kv`, deleted counts,
/// each compare's outcome, the ranges inside transactions. The model runs
/// once per log index, the first time a replica applies it; later replicas
/// (and replays after a restart) are compared with what it predicted.
#[derive(Default)]
pub struct ModelLog {
    groups: BTreeMap<GroupId, GroupModel>,
    pub violations: Vec<String>,
    /// Table commands checked against the model.
    pub checked: u64,
}

struct GroupModel {
    model: armada_core::model::KvModel,
    /// The next log index the model runs.
    next: u64,
    /// Per index: the table's revision after it and the reply (`None`:
    /// not a command the model covers, or not a table command).
    predicted: BTreeMap<u64, (u64, Option<Result<TableReply, KvError>>)>,
}

impl ModelLog {
    /// A leader-cluster replica applied entry `index` of table group
    /// `group`, leaving the table at `revision`.
    pub fn applied(
        &mut self,
        node: u64,
        group: GroupId,
        index: u64,
        revision: u64,
        command: Option<&Command>,
        response: &CommandResponse,
    ) {
        let g = self.groups.entry(group).or_insert_with(|| GroupModel {
            model: armada_core::model::KvModel::new(),
            next: index,
            predicted: BTreeMap::new(),
        });
        if index == g.next {
            let reply = match command {
                Some(Command::Table(c)) => g.model.apply(c),
                _ => None,
            };
            g.predicted.insert(index, (g.model.current(), reply));
            g.next += 1;
        }
        let Some((want_rev, want)) = g.predicted.get(&index) else {
            if self.violations.len() < 5 {
                self.violations.push(format!(
                    "M1 node {node} applied index {index} of group {group} before any replica applied index {} \
                     (the model runs the log in order)",
                    g.next
                ));
            }
            return;
        };
        self.checked += 1;
        let got = match response {
            CommandResponse::Table(r) => Some(r),
            _ => None,
        };
        let reply_differs = match (want, got) {
            (Some(w), Some(g)) => w != g,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if (revision != *want_rev || reply_differs) && self.violations.len() < 5 {
            self.violations.push(format!(
                "M1 node {node} applied index {index} of group {group} ({}) and is at revision {revision} with \
                 reply {got:?}; the reference model is at revision {want_rev} with reply {want:?}",
                command.map_or("no command".to_string(), |c| c.to_string()),
            ));
        }
    }
}

impl ModelLog {
    /// M2: every read a client got (linearizable or serializable, latest or
    /// at a past revision, one key or a range) is the table as the
    /// reference model had it at the revision the read reports (its header
    /// revision, or the revision asked for): values and mod revisions, and
    /// no key too many or too few. `groups` maps each table to its
    /// leader-cluster group. Linearizability (S1) says a read is recent
    /// enough; this says it is a consistent image of one revision.
    pub fn check_reads(&self, history: &[Op], groups: &BTreeMap<String, GroupId>) -> Result<u64, String> {
        let mut checked = 0;
        for op in history {
            let Outcome::Ok(r) = &op.outcome else { continue };
            let Some(model) = groups.get(&op.table).and_then(|g| self.groups.get(g)).map(|g| &g.model) else {
                continue;
            };
            let header = r.revision();
            if header > model.current() {
                return Err(format!(
                    "M2 {:?} on table {} reported revision {header}; the table's log reached only {}",
                    op.kind,
                    op.table,
                    model.current()
                ));
            }
            match (&op.kind, r) {
                (OpKind::PutPrev { key, .. }, OpResult::PutPrev { revision, prev }) => {
                    let want = model.get_at(key.as_bytes(), revision.saturating_sub(1));
                    if *prev != want {
                        return Err(format!(
                            "M2 put of {key} at revision {revision} on table {} returned the previous version \
                             {prev:?}; the table held {want:?} before it",
                            op.table
                        ));
                    }
                    checked += 1;
                    continue;
                }
                (OpKind::Query { req, .. }, OpResult::Query(got)) => {
                    let want = model.range_at(req, header);
                    if *got != want {
                        return Err(format!(
                            "M2 range {req:?} by client {} on table {} answered {got:?}; the table at revision {} \
                             answers {want:?}",
                            op.client,
                            op.table,
                            if req.revision == 0 { header } else { req.revision }
                        ));
                    }
                    checked += 1;
                    continue;
                }
                _ => {}
            }
            let (key_range, at) = match (&op.kind, r) {
                (OpKind::Get { key, .. }, OpResult::Get { .. }) => ((key.clone(), String::new()), header),
                (OpKind::GetAt { key, revision }, OpResult::Get { .. }) => ((key.clone(), String::new()), *revision),
                (OpKind::Range, OpResult::Range { .. }) => (("k".to_string(), "l".to_string()), header),
                _ => continue,
            };
            if header > model.current() || at > header {
                return Err(format!(
                    "M2 {:?} on table {} reported revision {header} (read at {at}); the table's log reached only {}",
                    op.kind,
                    op.table,
                    model.current()
                ));
            }
            let want: Vec<(String, String, u64)> = model
                .live(key_range.0.as_bytes(), key_range.1.as_bytes(), at)
                .into_iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(&kv.key).into_owned(),
                        String::from_utf8_lossy(&kv.value).into_owned(),
                        kv.mod_revision,
                    )
                })
                .collect();
            let got: Vec<(String, String, u64)> = match r {
                OpResult::Get { value, .. } => {
                    value.iter().map(|(v, m)| (key_range.0.clone(), v.clone(), *m)).collect()
                }
                OpResult::Range { kvs, .. } => kvs.clone(),
                _ => continue,
            };
            if got != want {
                return Err(format!(
                    "M2 {:?} by client {} on table {} at revision {at} returned {got:?}; the table at {at} held \
                     {want:?}",
                    op.kind, op.client, op.table
                ));
            }
            checked += 1;
        }
        Ok(checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use armada_core::kv::{DeleteRangeRequest, PutRequest};
    use armada_core::TableCommand;

    fn put(k: &str, v: &str) -> Command {
        Command::Table(TableCommand::Put(PutRequest {
            key: k.into(),
            value: v.into(),
            prev_kv: false,
            ..Default::default()
        }))
    }

    /// The table log of one group as three replicas apply it: the model
    /// predicts each reply, and a replica that answers otherwise, or ends
    /// at another revision, is a violation.
    #[test]
    fn m1_compares_every_replica_with_the_model() {
        let g = GroupId(7);
        let mut log = ModelLog::default();
        let mut model = armada_core::model::KvModel::new();
        let cmds = [
            put("k0", "a"),
            put("k0", "b"),
            Command::Table(TableCommand::DeleteRange(DeleteRangeRequest { key: "k9".into(), ..Default::default() })),
        ];
        for (i, c) in cmds.iter().enumerate() {
            let Command::Table(tc) = c else { unreachable!() };
            let reply = model.apply(tc).expect("a modelled command");
            for node in 1..=3 {
                log.applied(node, g, i as u64 + 1, model.current(), Some(c), &CommandResponse::Table(reply.clone()));
            }
        }
        assert!(log.violations.is_empty(), "{:?}", log.violations);
        assert_eq!(log.checked, 9);
        // A delete of nothing that took a revision anyway.
        let bad =
            Command::Table(TableCommand::DeleteRange(DeleteRangeRequest { key: "k8".into(), ..Default::default() }));
        let Command::Table(tc) = &bad else { unreachable!() };
        let mut wrong = model.clone();
        let reply = wrong.apply(tc).expect("a modelled command");
        log.applied(1, g, 4, model.current() + 1, Some(&bad), &CommandResponse::Table(reply));
        assert_eq!(log.violations.len(), 1, "{:?}", log.violations);
    }

    /// S4d: a log that lost an entry it recorded as committed, one with a
    /// second entry for a (term, index), and one where a committed entry
    /// follows a divergent one all fail; a stale entry of another term
    /// after the committed prefix passes.
    #[test]
    fn s4d_checks_the_log_a_node_restarts_with() {
        use armada_core::raft::StoredLog;
        let g = GroupId(3);
        let mut log = ApplyLog::default();
        for (index, term, digest) in [(1, 1, 10), (2, 1, 20), (3, 2, 30)] {
            log.record(1, g, index, term, digest, Some(index), false);
        }
        let stored = |entries: Vec<(u64, u64, u64)>, committed| StoredLog { purged: None, committed, entries };
        let check = |s: StoredLog| {
            let mut l = ApplyLog { applied: log.applied.clone(), ..Default::default() };
            l.check_stored_log(2, g, &s);
            l.violations
        };
        assert!(check(stored(vec![(1, 1, 10), (1, 2, 20), (3, 3, 99)], Some(2))).is_empty(), "a stale tail");
        assert!(check(stored(vec![(1, 1, 10), (1, 2, 20), (2, 3, 30)], Some(3))).is_empty(), "the committed log");
        assert_eq!(check(stored(vec![(1, 1, 10), (1, 2, 20)], Some(3))).len(), 1, "a lost committed entry");
        assert_eq!(check(stored(vec![(1, 1, 10), (1, 2, 21)], Some(1))).len(), 1, "two entries for (1, 2)");
        assert_eq!(check(stored(vec![(1, 1, 10), (5, 2, 50), (2, 3, 30)], None)).len(), 1, "log matching");
        assert_eq!(check(stored(vec![(1, 1, 10), (2, 3, 30)], None)).len(), 1, "a hole");
    }

    /// M2 fails a read whose value is not the one the table held at the
    /// revision the read reports, and passes the right one.
    #[test]
    fn m2_fails_a_read_that_is_no_image_of_its_revision() {
        let g = GroupId(7);
        let mut log = ModelLog::default();
        let mut model = armada_core::model::KvModel::new();
        for (i, c) in [put("k0", "a"), put("k0", "b")].iter().enumerate() {
            let Command::Table(tc) = c else { unreachable!() };
            let reply = model.apply(tc).expect("a modelled command");
            log.applied(1, g, i as u64 + 1, model.current(), Some(c), &CommandResponse::Table(reply));
        }
        let groups = BTreeMap::from([("t0".to_string(), g)]);
        let read = |value: &str, mod_rev: u64, revision: u64| Op {
            client: 1,
            table: "t0".into(),
            kind: OpKind::Get { key: "k0".into(), serializable: true },
            invoke_ns: 0,
            complete_ns: 1,
            outcome: Outcome::Ok(OpResult::Get { value: Some((value.into(), mod_rev)), revision }),
        };
        assert_eq!(log.check_reads(&[read("b", 3, 3), read("a", 2, 2)], &groups), Ok(2));
        assert!(log.check_reads(&[read("a", 2, 3)], &groups).is_err(), "a stale value under a newer header");
        assert!(log.check_reads(&[read("b", 3, 4)], &groups).is_err(), "a header beyond the log");
        let range = Op {
            kind: OpKind::Range,
            outcome: Outcome::Ok(OpResult::Range { kvs: vec![], revision: 3 }),
            ..read("b", 3, 3)
        };
        assert!(log.check_reads(&[range], &groups).is_err(), "a range missing a live key");
    }
}
