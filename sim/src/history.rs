//! The recorded history of client operations.
//!
//! A history can be written and read back as JSON lines, one [`Op`] per
//! line (`armada-sim check-history FILE`): a harness running real processes
//! or containers records what its clients did in this format, and the same
//! linearizability checker judges it. Times are nanoseconds since the start
//! of the run; keys and values are strings; see `docs/simulation.md` for
//! an example line.

use serde::{Deserialize, Serialize};

/// What a client asked for. Keys and values are small strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpKind {
    Put {
        key: String,
        value: String,
    },
    /// A put that asks for the key's previous version (`prev_kv`): M2
    /// checks it is the key as the table held it just before the put's
    /// revision.
    PutPrev {
        key: String,
        value: String,
    },
    /// A range read with options (limit, count only, keys only, sorting,
    /// at a revision, serializable or not). Linearizability does not use
    /// it; M2 checks the whole answer (keys, values, create and mod
    /// revisions, versions, `count`, `more`) against the model.
    Query {
        req: armada_core::kv::RangeRequest,
        serializable: bool,
    },
    /// A linearizable (or serializable) read of one key at the latest revision.
    Get {
        key: String,
        serializable: bool,
    },
    /// A read of one key at an earlier revision.
    GetAt {
        key: String,
        revision: u64,
    },
    Delete {
        key: String,
    },
    /// Set `key` to `new` if its compare holds (see [`CasBy`]).
    Cas {
        key: String,
        /// The value compared (or seen with the compared mod revision);
        /// unused by the compares on a missing key.
        expect: String,
        new: String,
        by: CasBy,
    },
    /// Delete every key in `[from, to)` in one revision.
    DeleteRange {
        from: String,
        to: String,
    },
    /// A linearizable read of every key of the table.
    Range,
    /// Compact the table's history below `revision`.
    Compact {
        revision: u64,
    },
}

/// What a [`OpKind::Cas`] compares. Every written value is unique, so
/// "the mod revision is the one `expect` was seen with" holds exactly when
/// the value is `expect`; the two compares on a missing key hold exactly
/// when the key is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CasBy {
    /// `value == expect`.
    Value,
    /// `mod_revision == r`, where `r` is the mod revision `expect` was seen with.
    ModRevision(u64),
    /// `version == 0`: the key does not exist.
    VersionZero,
    /// `create_revision == 0`: the key does not exist.
    CreateZero,
}

impl CasBy {
    /// Whether the compare is "the key is absent" (else: "the value is `expect`").
    pub fn absent(self) -> bool {
        matches!(self, CasBy::VersionZero | CasBy::CreateZero)
    }
}

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    Put {
        revision: u64,
    },
    PutPrev {
        revision: u64,
        prev: Option<armada_core::kv::KeyValue>,
    },
    /// The answer's header revision, keys (with values unless keys only),
    /// `count` and `more`.
    Query(armada_core::kv::RangeResponse),
    /// `(value, mod_revision)` of the key, if present.
    Get {
        value: Option<(String, u64)>,
        revision: u64,
    },
    Delete {
        deleted: u64,
        revision: u64,
    },
    Cas {
        succeeded: bool,
        revision: u64,
    },
    Range {
        kvs: Vec<(String, String, u64)>,
        revision: u64,
    },
    Compact {
        revision: u64,
    },
}

impl OpResult {
    pub fn revision(&self) -> u64 {
        match self {
            OpResult::Put { revision }
            | OpResult::PutPrev { revision, .. }
            | OpResult::Query(armada_core::kv::RangeResponse { revision, .. })
            | OpResult::Get { revision, .. }
            | OpResult::Delete { revision, .. }
            | OpResult::Cas { revision, .. }
            | OpResult::Range { revision, .. }
            | OpResult::Compact { revision } => *revision,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Ok(OpResult),
    /// Definitely had no effect (refused before it was proposed).
    Failed(String),
    /// May or may not have taken effect (timeout, lost connection).
    Indefinite(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    pub client: u32,
    pub table: String,
    pub kind: OpKind,
    /// Simulated nanoseconds since the start of the run.
    pub invoke_ns: u64,
    pub complete_ns: u64,
    pub outcome: Outcome,
}

impl OpKind {
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            OpKind::Put { .. }
                | OpKind::PutPrev { .. }
                | OpKind::Delete { .. }
                | OpKind::Cas { .. }
                | OpKind::DeleteRange { .. }
        )
    }
}

impl Op {
    pub fn is_write(&self) -> bool {
        self.kind.is_write()
    }
}

/// Reads a history written as JSON lines (blank lines are skipped).
pub fn read_jsonl(text: &str) -> Result<Vec<Op>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

/// Writes a history as JSON lines.
pub fn write_jsonl(ops: &[Op]) -> String {
    let mut out = String::new();
    for op in ops {
        out.push_str(&serde_json::to_string(op).expect("a history serializes"));
        out.push('\n');
    }
    out
}
