//! Linearizability checker for per-key registers: the history is split by
//! (table, key) (P-compositionality: a history is linearizable iff each
//! key's sub-history is), and each part is searched with the Wing–Gong
//! algorithm with Lowe's memoisation of (linearized set, state).
//!
//! Indefinite writes may be linearized at any point after their invocation,
//! or never. A search that exceeds its step budget is reported as a failure,
//! never as a pass.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::history::{Op, OpKind, OpResult, Outcome};

/// Steps allowed per key before the search gives up (and fails the seed).
pub const SEARCH_STEPS_MAX: u64 = 5_000_000;

type Sym = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KOp {
    Write(Option<Sym>),
    Delete,
    Read,
    /// Whether the key exists (a keys-only or count-only read).
    Exists,
    Cas(Sym, Sym),
    /// Put the value if the key is absent.
    CasAbsent(Sym),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KRes {
    None,
    Deleted(bool),
    Read(Option<Sym>),
    Exists(bool),
    Cas(bool),
}

#[derive(Debug, Clone, Copy)]
struct KeyOp {
    call: u64,
    /// `u64::MAX` for an indefinite operation.
    ret: u64,
    op: KOp,
    /// `None` when the outcome is unknown.
    res: Option<KRes>,
    /// Index into the full history (for reports).
    origin: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    NotLinearizable { table: String, key: String, ops: usize, detail: String },
    BudgetExceeded { table: String, key: String, ops: usize },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NotLinearizable { table, key, ops, detail } => {
                write!(f, "S1 not linearizable: table {table} key {key} ({ops} ops): {detail}")
            }
            Failure::BudgetExceeded { table, key, ops } => {
                write!(f, "S1 search budget exceeded: table {table} key {key} ({ops} ops)")
            }
        }
    }
}

/// Interns value strings as small integers.
#[derive(Default)]
struct Interner {
    ids: BTreeMap<String, Sym>,
}

impl Interner {
    fn id(&mut self, s: &str) -> Sym {
        let next = self.ids.len() as Sym;
        *self.ids.entry(s.to_string()).or_insert(next)
    }
}

/// Symbol shared by every value that no read returns and no compare names.
/// The register model only tests values for equality against observed
/// values, so unobserved values are interchangeable; giving them one symbol
/// lets the memoisation merge states that differ only in such values (the
/// difference between seconds and hours on histories with many indefinite
/// writes).
const UNOBSERVED: Sym = 0;

/// Values observed per (table, key): returned by a read or expected by a CAS.
fn observed(history: &[Op], keys: &[String]) -> BTreeSet<(String, String, String)> {
    let mut seen = BTreeSet::new();
    for op in history {
        match (&op.kind, &op.outcome) {
            (OpKind::Cas { key, expect, by, .. }, _) if !by.absent() => {
                seen.insert((op.table.clone(), key.clone(), expect.clone()));
            }
            (OpKind::Get { key, .. }, Outcome::Ok(OpResult::Get { value: Some((v, _)), .. })) => {
                seen.insert((op.table.clone(), key.clone(), v.clone()));
            }
            (OpKind::Range, Outcome::Ok(OpResult::Range { kvs, .. })) => {
                for (k, v, _) in kvs {
                    if keys.contains(k) {
                        seen.insert((op.table.clone(), k.clone(), v.clone()));
                    }
                }
            }
            (OpKind::PutPrev { key, .. }, Outcome::Ok(OpResult::PutPrev { prev: Some(kv), .. })) => {
                seen.insert((op.table.clone(), key.clone(), text(&kv.value)));
            }
            (OpKind::Query { req, .. }, Outcome::Ok(OpResult::Query(r))) if !req.keys_only => {
                for kv in &r.kvs {
                    seen.insert((op.table.clone(), text(&kv.key), text(&kv.value)));
                }
            }
            _ => {}
        }
    }
    seen
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether `key` is in the range a query names (etcd's conventions: no end
/// is one key, an end of "\0" is every key from `key` on).
fn in_query(req: &armada_core::kv::RangeRequest, key: &str) -> bool {
    let k = key.as_bytes();
    match req.range_end.as_slice() {
        [] => k == req.key.as_slice(),
        [0] => k >= req.key.as_slice(),
        end => k >= req.key.as_slice() && k < end,
    }
}

/// Projects the history onto per-(table, key) register operations.
///
/// Indefinite writes are resolved against `committed`, the values that the
/// replicas' state machines applied (S4 checks that they agree): a write
/// whose unique value was committed took effect, some time before the final
/// reads (everything that ever commits is committed before the liveness
/// phase's sentinel write); one whose value was not committed never took
/// effect. Indefinite deletes, which carry no unique value, stay indefinite.
fn project(history: &[Op], keys: &[String], committed: &BTreeSet<String>) -> BTreeMap<(String, String), Vec<KeyOp>> {
    let final_reads = history
        .iter()
        .filter(|o| o.client == FINAL_READER)
        .map(|o| o.invoke_ns)
        .min()
        .unwrap_or_else(|| history.iter().map(|o| o.complete_ns).max().unwrap_or(0) + 1);
    let mut out: BTreeMap<(String, String), Vec<KeyOp>> = BTreeMap::new();
    let seen = observed(history, keys);
    let mut names = Interner::default();
    names.id("\u{0}unobserved");
    let written = |table: &str, key: &str, v: &str, names: &mut Interner| -> Sym {
        if seen.contains(&(table.to_string(), key.to_string(), v.to_string())) {
            names.id(v)
        } else {
            UNOBSERVED
        }
    };
    for (i, op) in history.iter().enumerate() {
        let resolved_put = OpResult::Put { revision: 0 };
        let resolved_cas = OpResult::Cas { succeeded: true, revision: 0 };
        let (ret, res) = match (&op.outcome, &op.kind) {
            (Outcome::Failed(_), _) => continue,
            (Outcome::Indefinite(_), _) if !op.is_write() => continue,
            (Outcome::Indefinite(_), OpKind::Put { value, .. } | OpKind::PutPrev { value, .. }) => {
                if !committed.contains(value) {
                    continue;
                }
                (final_reads.max(op.invoke_ns), Some(&resolved_put))
            }
            (Outcome::Indefinite(_), OpKind::Cas { new, .. }) => {
                if !committed.contains(new) {
                    // Never applied, or applied with a failed compare: no effect either way.
                    continue;
                }
                (final_reads.max(op.invoke_ns), Some(&resolved_cas))
            }
            (Outcome::Indefinite(_), _) => (u64::MAX, None),
            (Outcome::Ok(r), _) => (op.complete_ns, Some(r)),
        };
        let mut push = |key: &str, kop: KOp, kres: Option<KRes>| {
            out.entry((op.table.clone(), key.to_string())).or_default().push(KeyOp {
                call: op.invoke_ns,
                ret,
                op: kop,
                res: kres,
                origin: i,
            });
        };
        match (&op.kind, res) {
            (OpKind::Put { key, value }, _) => {
                let v = written(&op.table, key, value, &mut names);
                push(key, KOp::Write(Some(v)), Some(KRes::None));
            }
            // A put-with-prev also reads: the value it replaced (M2 checks
            // the rest of the previous version against the model).
            (OpKind::PutPrev { key, value }, r) => {
                let v = written(&op.table, key, value, &mut names);
                let kres = match r {
                    Some(OpResult::PutPrev { prev, .. }) => {
                        Some(KRes::Read(prev.as_ref().map(|kv| names.id(&text(&kv.value)))))
                    }
                    _ => Some(KRes::None),
                };
                push(key, KOp::Write(Some(v)), kres);
            }
            (OpKind::Delete { key }, r) => {
                let kres = match r {
                    Some(OpResult::Delete { deleted, .. }) => Some(KRes::Deleted(*deleted > 0)),
                    _ => None,
                };
                push(key, KOp::Delete, kres);
            }
            (OpKind::Cas { key, expect, new, by }, r) => {
                let n = written(&op.table, key, new, &mut names);
                let kres = match r {
                    Some(OpResult::Cas { succeeded, .. }) => Some(KRes::Cas(*succeeded)),
                    _ => None,
                };
                // A mod-revision compare holds exactly when the value is the
                // one seen with that revision (every value is written once).
                let kop = if by.absent() { KOp::CasAbsent(n) } else { KOp::Cas(names.id(expect), n) };
                push(key, kop, kres);
            }
            // Each key of the range on its own: deleted (if present) at
            // one point of the call, like a single-key delete whose result
            // is not known per key.
            (OpKind::DeleteRange { from, to }, r) => {
                let kres = r.map(|_| KRes::None);
                for k in keys.iter().filter(|k| k.as_str() >= from.as_str() && k.as_str() < to.as_str()) {
                    push(k, KOp::Delete, kres);
                }
            }
            (OpKind::Get { key, serializable: false }, Some(OpResult::Get { value, .. })) => {
                let v = value.as_ref().map(|(v, _)| names.id(v));
                push(key, KOp::Read, Some(KRes::Read(v)));
            }
            (OpKind::Range, Some(OpResult::Range { kvs, .. })) => {
                for k in keys {
                    let v = kvs.iter().find(|(kk, _, _)| kk == k).map(|(_, v, _)| names.id(v));
                    push(k, KOp::Read, Some(KRes::Read(v)));
                }
            }
            // A linearizable query at the latest revision reads each key of
            // its range: present with its value (keys only: present), or
            // absent when the answer is whole (no key cut off by the limit).
            // Count-only answers say only how many keys exist: for a
            // one-key range that is whether the key exists.
            (OpKind::Query { req, serializable: false }, Some(OpResult::Query(r))) if req.revision == 0 => {
                for k in keys.iter().filter(|k| in_query(req, k)) {
                    if req.count_only {
                        if req.range_end.is_empty() {
                            push(k, KOp::Exists, Some(KRes::Exists(r.count > 0)));
                        }
                        continue;
                    }
                    match r.kvs.iter().find(|kv| kv.key == k.as_bytes()) {
                        Some(_) if req.keys_only => push(k, KOp::Exists, Some(KRes::Exists(true))),
                        Some(kv) => push(k, KOp::Read, Some(KRes::Read(Some(names.id(&text(&kv.value)))))),
                        None if !r.more => push(k, KOp::Read, Some(KRes::Read(None))),
                        None => {}
                    }
                }
            }
            // Serializable reads promise no recency; reads at a revision are
            // checked against revisions elsewhere.
            _ => {}
        }
    }
    out
}

/// Applies `op` to `state`; `None` if the recorded result is impossible.
fn step(state: Option<Sym>, op: KOp, res: Option<KRes>) -> Option<Option<Sym>> {
    match op {
        KOp::Write(v) => match res {
            // A put that returned the value it replaced.
            Some(KRes::Read(prev)) if prev != state => None,
            _ => Some(v),
        },
        KOp::Delete => match res {
            Some(KRes::Deleted(d)) if d != state.is_some() => None,
            _ => Some(None),
        },
        KOp::Read => match res {
            Some(KRes::Read(v)) if v != state => None,
            _ => Some(state),
        },
        KOp::Exists => match res {
            Some(KRes::Exists(e)) if e != state.is_some() => None,
            _ => Some(state),
        },
        KOp::CasAbsent(n) => {
            let ok = state.is_none();
            match res {
                Some(KRes::Cas(s)) if s != ok => None,
                _ => Some(if ok { Some(n) } else { state }),
            }
        }
        KOp::Cas(e, n) => {
            let ok = state == Some(e);
            match res {
                Some(KRes::Cas(s)) if s != ok => None,
                _ => Some(if ok { Some(n) } else { state }),
            }
        }
    }
}

/// Outcome of searching one key.
enum KeyVerdict {
    Ok,
    NotLinearizable,
    Budget,
}

fn search(ops: &[KeyOp], steps_max: u64) -> KeyVerdict {
    let n = ops.len();
    // Events: (time, 0 = return first at equal times, op index, is_call).
    let mut events: Vec<(u64, u8, usize, bool)> = Vec::with_capacity(2 * n);
    for (i, o) in ops.iter().enumerate() {
        events.push((o.call, 1, i, true));
        if o.ret != u64::MAX {
            events.push((o.ret, 0, i, false));
        }
    }
    events.sort();
    let len = events.len();
    let head = len; // sentinel
    let mut next: Vec<usize> = (1..=len + 1).collect();
    let mut prev: Vec<usize> = Vec::with_capacity(len + 1);
    for i in 0..len {
        prev.push(if i == 0 { head } else { i - 1 });
    }
    prev.push(len.saturating_sub(1));
    next[len] = if len == 0 { usize::MAX } else { 0 };
    if len > 0 {
        next[len - 1] = usize::MAX;
    }
    let end = usize::MAX;
    let mut call_ev = vec![0usize; n];
    let mut ret_ev = vec![usize::MAX; n];
    for (e, &(_, _, i, is_call)) in events.iter().enumerate() {
        if is_call {
            call_ev[i] = e;
        } else {
            ret_ev[i] = e;
        }
    }
    let unlink = |e: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[e], next[e]);
        next[p] = nx;
        if nx != usize::MAX {
            prev[nx] = p;
        }
    };
    let relink = |e: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[e], next[e]);
        next[p] = e;
        if nx != usize::MAX {
            prev[nx] = e;
        }
    };
    // Indefinite operations with the same effect are interchangeable: only
    // the earliest-invoked of a class that is not yet linearized may be
    // linearized next. (Whenever a later one is invoked, the earlier one is
    // too, and neither has a response to respect, so swapping them never
    // turns a valid order invalid.) Without this, k pending indefinite
    // writes cost 2^k subsets; with it, k + 1.
    let mut prev_same: Vec<Option<usize>> = vec![None; n];
    {
        let mut last: Vec<(KOp, usize)> = Vec::new();
        let mut order: Vec<usize> = (0..n).filter(|&i| ops[i].ret == u64::MAX).collect();
        order.sort_by_key(|&i| (ops[i].call, i));
        for i in order {
            match last.iter_mut().find(|(k, _)| *k == ops[i].op) {
                Some(slot) => {
                    prev_same[i] = Some(slot.1);
                    slot.1 = i;
                }
                None => last.push((ops[i].op, i)),
            }
        }
    }
    let completed = ops.iter().filter(|o| o.ret != u64::MAX).count();
    let words = n.div_ceil(64).max(1);
    let mut bits = vec![0u64; words];
    let mut lin_completed = 0usize;
    let mut state: Option<Sym> = None;
    let mut stack: Vec<(usize, Option<Sym>)> = Vec::new();
    let mut cache: HashSet<(Vec<u64>, Option<Sym>)> = HashSet::new();
    let mut cur = next[head];
    let mut steps = 0u64;
    loop {
        steps += 1;
        if steps > steps_max {
            return KeyVerdict::Budget;
        }
        if lin_completed == completed {
            return KeyVerdict::Ok;
        }
        let mut backtrack = cur == end;
        if !backtrack {
            let (_, _, i, is_call) = events[cur];
            let blocked = prev_same[i].is_some_and(|j| bits[j / 64] & (1 << (j % 64)) == 0);
            if is_call && !blocked {
                let o = &ops[i];
                if let Some(new_state) = step(state, o.op, o.res) {
                    bits[i / 64] |= 1 << (i % 64);
                    if cache.insert((bits.clone(), new_state)) {
                        stack.push((i, state));
                        state = new_state;
                        if o.ret != u64::MAX {
                            lin_completed += 1;
                        }
                        unlink(call_ev[i], &mut next, &mut prev);
                        if ret_ev[i] != usize::MAX {
                            unlink(ret_ev[i], &mut next, &mut prev);
                        }
                        cur = next[head];
                        continue;
                    }
                    bits[i / 64] &= !(1 << (i % 64));
                }
                cur = next[cur];
                continue;
            }
            if is_call {
                cur = next[cur];
                continue;
            }
            backtrack = true;
        }
        if backtrack {
            let Some((i, s)) = stack.pop() else {
                return KeyVerdict::NotLinearizable;
            };
            bits[i / 64] &= !(1 << (i % 64));
            if ops[i].ret != u64::MAX {
                lin_completed -= 1;
            }
            state = s;
            if ret_ev[i] != usize::MAX {
                relink(ret_ev[i], &mut next, &mut prev);
            }
            relink(call_ev[i], &mut next, &mut prev);
            cur = next[call_ev[i]];
        }
    }
}

/// Client id of the reads made after faults heal (see `world`).
pub const FINAL_READER: u32 = u32::MAX;

/// For a history recorded outside the simulator: every key it names, and
/// the values its successful reads saw (those writes committed; an
/// indefinite write whose value nobody read may or may not have).
pub fn keys_and_read_values(history: &[Op]) -> (Vec<String>, BTreeSet<String>) {
    use crate::history::{OpKind, OpResult, Outcome};
    let mut keys = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for op in history {
        match &op.kind {
            OpKind::Put { key, .. }
            | OpKind::PutPrev { key, .. }
            | OpKind::Get { key, .. }
            | OpKind::GetAt { key, .. }
            | OpKind::Delete { key }
            | OpKind::Cas { key, .. } => {
                keys.insert(key.clone());
            }
            _ => {}
        }
        match &op.outcome {
            Outcome::Ok(OpResult::Get { value: Some((v, _)), .. }) => {
                seen.insert(v.clone());
            }
            Outcome::Ok(OpResult::Range { kvs, .. }) => {
                for (k, v, _) in kvs {
                    keys.insert(k.clone());
                    seen.insert(v.clone());
                }
            }
            _ => {}
        }
    }
    (keys.into_iter().collect(), seen)
}

/// Checks the whole history. `keys` is the key set of every table (ranges
/// read all of them); `committed` the values committed writes wrote (see
/// [`project`]).
pub fn check(history: &[Op], keys: &[String], committed: &BTreeSet<String>) -> Result<(), Failure> {
    check_with_budget(history, keys, committed, SEARCH_STEPS_MAX)
}

pub fn check_with_budget(
    history: &[Op],
    keys: &[String],
    committed: &BTreeSet<String>,
    steps_max: u64,
) -> Result<(), Failure> {
    for ((table, key), ops) in project(history, keys, committed) {
        match search(&ops, steps_max) {
            KeyVerdict::Ok => {}
            KeyVerdict::Budget => return Err(Failure::BudgetExceeded { table, key, ops: ops.len() }),
            KeyVerdict::NotLinearizable => {
                let last = ops.iter().map(|o| o.origin).max().unwrap_or(0);
                // A debugging aid (read after the run, never inside the
                // world): the key's whole history, in invocation order.
                if std::env::var_os("ARMADA_SIM_DUMP").is_some() {
                    let mut mine: Vec<&Op> = ops.iter().filter_map(|o| history.get(o.origin)).collect();
                    mine.sort_by_key(|o| o.invoke_ns);
                    for o in mine {
                        eprintln!(
                            "  {:>9.3}-{:>9.3} c{} {:?} -> {:?}",
                            o.invoke_ns as f64 / 1e6,
                            o.complete_ns as f64 / 1e6,
                            o.client,
                            o.kind,
                            o.outcome
                        );
                    }
                }
                let detail = format!("no valid order; last op {:?}", history.get(last).map(|o| (&o.kind, &o.outcome)));
                return Err(Failure::NotLinearizable { table, key, ops: ops.len(), detail });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: u64, kind: OpKind, outcome: Outcome) -> Op {
        Op { client: 0, table: "t".into(), kind, invoke_ns: call, complete_ns: ret, outcome }
    }
    fn put(k: &str, v: &str) -> OpKind {
        OpKind::Put { key: k.into(), value: v.into() }
    }
    fn get(k: &str) -> OpKind {
        OpKind::Get { key: k.into(), serializable: false }
    }
    fn got(v: Option<&str>) -> Outcome {
        Outcome::Ok(OpResult::Get { value: v.map(|v| (v.to_string(), 0)), revision: 0 })
    }
    fn put_ok() -> Outcome {
        Outcome::Ok(OpResult::Put { revision: 0 })
    }

    #[test]
    fn a_history_read_back_from_json_lines_is_judged_the_same() {
        let good = vec![
            op(0, 10, put("k", "a"), put_ok()),
            op(5, 40, put("k", "b"), Outcome::Indefinite("timed out".into())),
            op(20, 30, get("k"), got(Some("a"))),
            op(50, 60, get("k"), got(Some("b"))),
        ];
        let bad = vec![
            op(0, 10, put("k", "a"), put_ok()),
            op(20, 30, put("k", "b"), put_ok()),
            op(40, 50, get("k"), got(Some("a"))),
        ];
        for (h, linearizable) in [(good, true), (bad, false)] {
            let text = crate::history::write_jsonl(&h);
            let back = crate::history::read_jsonl(&text).unwrap();
            assert_eq!(back.len(), h.len());
            let (keys, committed) = keys_and_read_values(&back);
            assert_eq!(keys, vec!["k".to_string()]);
            assert_eq!(check(&back, &keys, &committed).is_ok(), linearizable, "{text}");
        }
        assert!(crate::history::read_jsonl("{\"client\": 1}").unwrap_err().starts_with("line 1"));
    }

    #[test]
    fn sequential_history_passes_and_stale_read_fails() {
        let keys = vec!["k".to_string()];
        let h = vec![op(0, 10, put("k", "a"), put_ok()), op(20, 30, get("k"), got(Some("a")))];
        assert_eq!(check(&h, &keys, &BTreeSet::new()), Ok(()));
        let h = vec![
            op(0, 10, put("k", "a"), put_ok()),
            op(20, 30, put("k", "b"), put_ok()),
            op(40, 50, get("k"), got(Some("a"))),
        ];
        assert!(matches!(check(&h, &keys, &BTreeSet::new()), Err(Failure::NotLinearizable { .. })));
    }

    #[test]
    fn concurrent_ops_may_order_either_way() {
        let keys = vec!["k".to_string()];
        let h = vec![
            op(0, 100, put("k", "a"), put_ok()),
            op(10, 20, get("k"), got(Some("a"))),
            op(30, 40, get("k"), got(None)),
        ];
        // The read of "a" forces the put before t=20, so a later read of
        // nothing is impossible.
        assert!(check(&h, &keys, &BTreeSet::new()).is_err());
        let h = vec![
            op(0, 100, put("k", "a"), put_ok()),
            op(10, 20, get("k"), got(None)),
            op(30, 40, get("k"), got(Some("a"))),
        ];
        assert_eq!(check(&h, &keys, &BTreeSet::new()), Ok(()));
    }

    #[test]
    fn indefinite_writes_may_or_may_not_happen() {
        let keys = vec!["k".to_string()];
        let lost = Outcome::Indefinite("timeout".into());
        let h = vec![op(0, 10, put("k", "a"), lost.clone()), op(20, 30, get("k"), got(None))];
        assert_eq!(check(&h, &keys, &BTreeSet::new()), Ok(()), "never happened");
        let committed: BTreeSet<String> = ["a".to_string()].into();
        let h = vec![op(0, 10, put("k", "a"), lost.clone()), op(20, 30, get("k"), got(Some("a")))];
        assert_eq!(check(&h, &keys, &committed), Ok(()), "happened");
        let h =
            vec![op(0, 10, put("k", "a"), lost), op(20, 30, get("k"), got(Some("a"))), op(40, 50, get("k"), got(None))];
        assert!(check(&h, &keys, &BTreeSet::new()).is_err(), "cannot un-happen");
    }

    #[test]
    fn indefinite_writes_resolve_against_committed_values() {
        let keys = vec!["k".to_string()];
        let lost = Outcome::Indefinite("timeout".into());
        let committed: BTreeSet<String> = ["a".to_string()].into();
        // Committed: it must have happened before the final reads.
        let h = vec![
            op(0, 10, put("k", "a"), lost.clone()),
            Op { client: FINAL_READER, ..op(100, 110, get("k"), got(None)) },
        ];
        assert!(check(&h, &keys, &committed).is_err(), "a committed write cannot be missing");
        assert_eq!(check(&h, &keys, &BTreeSet::new()), Ok(()), "an uncommitted write never happened");
        let h = vec![op(0, 10, put("k", "a"), lost), op(20, 30, get("k"), got(Some("a")))];
        assert!(check(&h, &keys, &BTreeSet::new()).is_err(), "an uncommitted write cannot be read");
    }

    #[test]
    fn cas_results_are_checked() {
        let keys = vec!["k".to_string()];
        let cas = |e: &str, n: &str| OpKind::Cas {
            key: "k".into(),
            expect: e.into(),
            new: n.into(),
            by: crate::history::CasBy::Value,
        };
        let cas_res = |s: bool| Outcome::Ok(OpResult::Cas { succeeded: s, revision: 0 });
        let h = vec![
            op(0, 10, put("k", "a"), put_ok()),
            op(20, 30, cas("a", "b"), cas_res(true)),
            op(40, 50, get("k"), got(Some("b"))),
        ];
        assert_eq!(check(&h, &keys, &BTreeSet::new()), Ok(()));
        let h = vec![op(0, 10, put("k", "a"), put_ok()), op(20, 30, cas("x", "b"), cas_res(true))];
        assert!(check(&h, &keys, &BTreeSet::new()).is_err());
    }

    fn kv(k: &str, v: &str) -> armada_core::kv::KeyValue {
        armada_core::kv::KeyValue { key: k.into(), value: v.into(), ..Default::default() }
    }

    #[test]
    fn a_put_with_prev_reads_the_value_it_replaced() {
        let keys = vec!["k".to_string()];
        let put_prev = |v: &str| OpKind::PutPrev { key: "k".into(), value: v.into() };
        let replaced = |p: Option<&str>| Outcome::Ok(OpResult::PutPrev { revision: 0, prev: p.map(|p| kv("k", p)) });
        let h = vec![op(0, 10, put("k", "a"), put_ok()), op(20, 30, put_prev("b"), replaced(Some("a")))];
        assert_eq!(check(&h, &keys, &BTreeSet::new()), Ok(()));
        // The put of "b" replaced nothing although "a" was written before it.
        let h = vec![op(0, 10, put("k", "a"), put_ok()), op(20, 30, put_prev("b"), replaced(None))];
        assert!(check(&h, &keys, &BTreeSet::new()).is_err());
        // A put-with-prev is a write too: a later read sees its value.
        let h = vec![op(0, 10, put_prev("b"), replaced(None)), op(20, 30, get("k"), got(Some("b")))];
        assert_eq!(check(&h, &keys, &BTreeSet::new()), Ok(()));
    }

    #[test]
    fn a_linearizable_query_reads_every_key_of_its_range() {
        use armada_core::kv::{RangeRequest, RangeResponse};
        let keys = vec!["k0".to_string(), "k1".to_string(), "k2".to_string()];
        let query = |req: RangeRequest| OpKind::Query { req, serializable: false };
        let answer = |kvs: Vec<armada_core::kv::KeyValue>, more: bool, count: u64| {
            Outcome::Ok(OpResult::Query(RangeResponse { revision: 0, kvs, more, count }))
        };
        let prefix = RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() };
        let writes = || vec![op(0, 10, put("k0", "a"), put_ok()), op(0, 10, put("k2", "c"), put_ok())];
        // Whole answer: both keys with their values.
        let mut h = writes();
        h.push(op(20, 30, query(prefix.clone()), answer(vec![kv("k0", "a"), kv("k2", "c")], false, 2)));
        assert_eq!(check(&h, &keys, &BTreeSet::new()), Ok(()));
        // Whole answer that misses k2: stale.
        let mut h = writes();
        h.push(op(20, 30, query(prefix.clone()), answer(vec![kv("k0", "a")], false, 1)));
        assert!(check(&h, &keys, &BTreeSet::new()).is_err());
        // Cut by a limit: a missing key says nothing.
        let mut h = writes();
        let limited = RangeRequest { limit: 1, ..prefix.clone() };
        h.push(op(20, 30, query(limited), answer(vec![kv("k0", "a")], true, 2)));
        assert_eq!(check(&h, &keys, &BTreeSet::new()), Ok(()));
        // Keys only: presence is checked, not the value.
        let mut h = writes();
        let keys_only = RangeRequest { keys_only: true, ..prefix.clone() };
        h.push(op(20, 30, query(keys_only.clone()), answer(vec![kv("k0", ""), kv("k2", "")], false, 2)));
        assert_eq!(check(&h, &keys, &BTreeSet::new()), Ok(()));
        let mut h = writes();
        h.push(op(20, 30, query(keys_only), answer(vec![kv("k0", "")], false, 1)));
        assert!(check(&h, &keys, &BTreeSet::new()).is_err());
        // Count only on one key: whether it exists.
        let one = RangeRequest { key: b"k2".to_vec(), count_only: true, ..Default::default() };
        let mut h = writes();
        h.push(op(20, 30, query(one), answer(vec![], false, 0)));
        assert!(check(&h, &keys, &BTreeSet::new()).is_err());
        // A serializable query or one at a past revision promises no recency.
        let mut h = writes();
        h.push(op(20, 30, OpKind::Query { req: prefix.clone(), serializable: true }, answer(vec![], false, 0)));
        let past = RangeRequest { revision: 1, ..prefix };
        h.push(op(20, 30, query(past), answer(vec![], false, 0)));
        assert_eq!(check(&h, &keys, &BTreeSet::new()), Ok(()));
    }

    #[test]
    fn many_concurrent_indefinite_writes_stay_cheap() {
        let keys = vec!["k".to_string()];
        // 60 pending indefinite writes of unobserved values and reads
        // around them: exponential without the symmetry reduction.
        let mut h: Vec<Op> =
            (0..60).map(|i| op(i, i + 1, put("k", &format!("v{i}")), Outcome::Indefinite("timeout".into()))).collect();
        h.push(op(100, 110, put("k", "seen"), put_ok()));
        h.push(op(120, 130, get("k"), got(Some("seen"))));
        h.push(op(140, 150, get("k"), got(Some("zzz"))));
        assert!(matches!(
            check_with_budget(&h, &keys, &BTreeSet::new(), 200_000),
            Err(Failure::NotLinearizable { .. })
        ));
    }

    #[test]
    fn a_search_over_budget_fails() {
        let keys = vec!["k".to_string()];
        // Many concurrent writes and a read that matches none: the search
        // must explore many orders before giving up.
        let mut h: Vec<Op> = (0..12).map(|i| op(0, 1000, put("k", &format!("v{i}")), put_ok())).collect();
        h.push(op(2000, 2001, get("k"), got(Some("nope"))));
        assert!(matches!(check_with_budget(&h, &keys, &BTreeSet::new(), 50), Err(Failure::BudgetExceeded { .. })));
    }
}
