//! Armada's simulated world: topology, faults, workloads, history recording,
//! checkers and the scenario runner.
//!
//! Nothing depends on this crate. Everything that runs a world is compiled
//! only with `--cfg madsim` (use `ci/sim`); the checkers and scenario parser
//! are plain code and are unit-tested in both builds.

pub mod checks;
pub mod history;
pub mod linearizability;
pub mod scenario;
#[cfg(madsim)]
pub mod world;
