//! Benchmark of the linearizability checker on a generated linearizable
//! history: 2,000 operations by 50 clients over 10 keys (target: under one
//! second). Run with `cargo bench -p armada-sim --bench checker`.
//!
//! The generator executes operations against a true register at strictly
//! increasing linearization points and gives each an invocation and a
//! completion up to 240 time units around its point, so about fifty
//! operations overlap at any time; 5% of writes lose their response
//! (indefinite).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use armada_sim::history::{CasBy, Op, OpKind, OpResult, Outcome};
use armada_sim::linearizability::check;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The history and the values its writes committed.
fn generate(seed: u64, clients: u32, keys: u32, ops: u32) -> (Vec<Op>, BTreeSet<String>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut truth: BTreeMap<String, String> = BTreeMap::new();
    let mut committed = BTreeSet::new();
    let mut out = Vec::new();
    for j in 0..ops {
        let point = u64::from(j) * 10 + 1000;
        let invoke_ns = point - rng.random_range(0..240u64);
        let complete_ns = point + rng.random_range(0..240u64);
        let key = format!("k{}", rng.random_range(0..keys));
        let roll = rng.random_range(0..100u32);
        let (kind, result) = if roll < 40 {
            let value = format!("v{j}");
            truth.insert(key.clone(), value.clone());
            committed.insert(value.clone());
            (OpKind::Put { key, value }, OpResult::Put { revision: 0 })
        } else if roll < 80 {
            let value = truth.get(&key).map(|v| (v.clone(), 0));
            (OpKind::Get { key, serializable: false }, OpResult::Get { value, revision: 0 })
        } else if roll < 90 {
            let current = truth.get(&key).cloned();
            let expect = if rng.random_bool(0.5) { current.clone().unwrap_or_default() } else { "other".into() };
            let new = format!("v{j}");
            let ok = current.as_deref() == Some(expect.as_str());
            if ok {
                truth.insert(key.clone(), new.clone());
                committed.insert(new.clone());
            }
            (OpKind::Cas { key, expect, new, by: CasBy::Value }, OpResult::Cas { succeeded: ok, revision: 0 })
        } else {
            let deleted = u64::from(truth.remove(&key).is_some());
            (OpKind::Delete { key }, OpResult::Delete { deleted, revision: 0 })
        };
        let write = !matches!(kind, OpKind::Get { .. });
        let outcome =
            if write && rng.random_bool(0.05) { Outcome::Indefinite("lost".into()) } else { Outcome::Ok(result) };
        out.push(Op { client: j % clients, table: "t".into(), kind, invoke_ns, complete_ns, outcome });
    }
    (out, committed)
}

fn main() {
    let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    let mut worst = 0.0f64;
    for seed in 1..=5 {
        let (h, committed) = generate(seed, 50, 10, 2000);
        let t = Instant::now();
        let r = check(&h, &keys, &committed);
        let secs = t.elapsed().as_secs_f64();
        worst = worst.max(secs);
        assert!(r.is_ok(), "generated history must be linearizable: {r:?}");
        println!("checker seed={seed} ops=2000 keys=10 clients=50 secs={secs:.3}");
    }
    println!("checker worst={worst:.3}s (target <= 1s)");
}
