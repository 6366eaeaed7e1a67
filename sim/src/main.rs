//! The scenario runner. Interface (a contract other tools rely on):
//!
//! - `run <scenario-file> --seed <N> [--canary NAME]`: one seed; prints a line
//!   with `seed=`, `verdict=` and `trace=`; exits 0 only on pass; on failure
//!   prints the one-line replay command;
//! - `sweep <scenario-files-or-dirs…> --seeds <N> [--start <S>]
//!   [--require-probes]`: one `probe=` line per coverage probe (seeds that
//!   reached it), a `probes:` line, and last
//!   `sweep: <passed>/<total> passed, sim/real <ratio>x`; with
//!   `--require-probes` a required probe no seed reached fails the sweep;
//! - `canaries --seeds <N>`: last line `canaries: <caught>/<total> caught`;
//! - `determinism <scenario-file> --seed <N>`: runs twice, compares traces.
//!
//! Exit codes: 0 pass, 1 safety, 2 liveness, 3 crash, 4 determinism
//! mismatch, 64 usage errors.

// The simulation allocates and frees small objects (futures, messages,
// keys) at a high rate; mimalloc spends a fraction of glibc malloc's time on
// them. Allocation addresses never feed outputs, so this does not touch
// determinism.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(not(madsim))]
fn main() {
    eprintln!("armada-sim must be built with --cfg madsim: use ci/sim");
    std::process::exit(64);
}

#[cfg(madsim)]
fn main() {
    std::process::exit(sim_main::main());
}

#[cfg(madsim)]
mod sim_main {
    use std::path::{Path, PathBuf};

    use armada_core::canary::Canary;
    use armada_core::probe::Probe;
    use armada_sim::scenario::{collect, Scenario};
    use armada_sim::world::{run, Report, Verdict};
    use clap::{Parser, Subcommand};

    #[derive(Parser)]
    #[command(name = "armada-sim", about = "Armada's deterministic simulation runner")]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Subcommand)]
    enum Cmd {
        /// Run one seed of one scenario.
        Run {
            scenario: PathBuf,
            #[arg(long)]
            seed: u64,
            /// Switch on a deliberate bug (see `canaries`).
            #[arg(long)]
            canary: Option<String>,
        },
        /// Run N seeds of every scenario.
        Sweep {
            #[arg(required = true)]
            paths: Vec<String>,
            #[arg(long)]
            seeds: u64,
            #[arg(long, default_value_t = 1)]
            start: u64,
            /// Parallel runs (each run is single-threaded and deterministic).
            #[arg(long)]
            jobs: Option<usize>,
            /// Fail when a required coverage probe was reached by no seed.
            #[arg(long)]
            require_probes: bool,
            /// Print a progress line (to stderr) every this many runs.
            #[arg(long)]
            progress: Option<usize>,
        },
        /// Run each canary until a checker catches it or N seeds pass.
        Canaries {
            #[arg(long)]
            seeds: u64,
            /// Directory with one `<canary-name>.toml` scenario per canary.
            #[arg(long, default_value = "scenarios/canaries")]
            dir: PathBuf,
            #[arg(long, default_value_t = 1)]
            start: u64,
        },
        /// Run one seed twice and compare the trace hashes.
        Determinism {
            scenario: PathBuf,
            #[arg(long)]
            seed: u64,
        },
        /// Check a history recorded elsewhere (real processes, containers)
        /// with the simulator's linearizability checker: one JSON `Op` per
        /// line (see `armada_sim::history`). Values read by successful reads
        /// count as committed. Exit 0: linearizable; 1: not; 4: unreadable.
        CheckHistory { file: PathBuf },
    }

    fn exit_code(v: Verdict) -> i32 {
        match v {
            Verdict::Pass => 0,
            Verdict::Safety => 1,
            Verdict::Liveness => 2,
            Verdict::Crash => 3,
        }
    }

    fn line(path: &Path, sc: &Scenario, r: &Report, canary: Option<Canary>) -> String {
        let ratio = if r.real_secs > 0.0 { r.sim_secs / r.real_secs } else { 0.0 };
        let mut extra = String::new();
        if r.installs_resumed > 0 {
            extra.push_str(&format!(" installs_resumed={}", r.installs_resumed));
        }
        extra.push_str(&format!(" m1_checked={} m2_checked={}", r.model_checked.0, r.model_checked.1));
        if r.leases.0 > 0 {
            extra.push_str(&format!(" leases={}/{}/{}", r.leases.0, r.leases.1, r.leases.2));
        }
        if r.auth_checked.0 > 0 || r.auth_checked.1 > 0 {
            let a = r.auth_checked;
            extra.push_str(&format!(" auth={}/{}/{}/{}", a.0, a.1, a.2, a.3));
        }
        if sc.spare_nodes > 0 {
            extra.push_str(&format!(" member_changes={} refused_early={}", r.members_checked.0, r.members_checked.1));
        }
        if r.watch_events > 0 {
            extra.push_str(&format!(" watch_events={} watch_progress={}", r.watch_events, r.watch_progress));
        }
        if let Some((p50, p99, n)) = r.follower_watch_ms {
            extra.push_str(&format!(" follower_watch_ms={p50:.1}/{p99:.1}/{n}"));
        }
        if r.etcd_ops > 0 {
            extra.push_str(&format!(" etcd_ops={}", r.etcd_ops));
        }
        if r.backups_checked > 0 {
            extra.push_str(&format!(" backups_checked={}", r.backups_checked));
        }
        let reached: Vec<String> =
            r.probes.iter().filter(|(_, n)| *n > 0).map(|(p, n)| format!("{}:{n}", p.name())).collect();
        if !reached.is_empty() {
            extra.push_str(&format!(" probes={}", reached.join(",")));
        }
        format!(
            "seed={} scenario={} verdict={} trace={:016x} ops={} ok={} indefinite={} applied={} snapshots={}{extra} sim_s={:.1} real_s={:.2} check_s={:.2} ratio={:.1}x{}{}{}",
            r.seed,
            sc.name,
            r.verdict.name(),
            r.trace,
            r.ops,
            r.ops_ok,
            r.indefinite,
            r.applied,
            r.snapshots,
            r.sim_secs,
            r.real_secs,
            r.check_secs,
            ratio,
            r.lag_ms
                .map(|(p50, p99, n)| format!(
                    " lag_p50_ms={p50:.1} lag_p99_ms={p99:.1} lag_samples={n} follower_snapshots={}",
                    r.follower_snapshots
                ))
                .unwrap_or_default(),
            canary.map(|c| format!(" canary={}", c.name())).unwrap_or_default(),
            if r.verdict == Verdict::Pass { String::new() } else { format!(" file={}", path.display()) }
        )
    }

    /// A seed's outcome as a child process reported it.
    struct ChildRun {
        verdict: Verdict,
        sim_secs: f64,
        real_secs: f64,
        output: String,
        /// Hits of each probe the run reached.
        probes: Vec<(Probe, u64)>,
    }

    /// Runs one seed in a child process (`armada-sim run`): madsim does not
    /// free a finished runtime's tasks, so a long sweep in one process would
    /// grow by tens of MB per seed. The child's exit code is the verdict.
    fn run_in_child(path: &Path, seed: u64) -> ChildRun {
        let crashed = |output: String| ChildRun {
            verdict: Verdict::Crash,
            sim_secs: 0.0,
            real_secs: 0.0,
            output,
            probes: vec![],
        };
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => return crashed(format!("cannot find the runner: {e}\n{}\n", replay(path, seed, None))),
        };
        let out = match std::process::Command::new(exe)
            .arg("run")
            .arg(path)
            .args(["--seed", &seed.to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()
        {
            Ok(o) => o,
            Err(e) => return crashed(format!("cannot start the runner: {e}\n{}\n", replay(path, seed, None))),
        };
        let output = String::from_utf8_lossy(&out.stdout).into_owned();
        let field = |name: &str| -> f64 {
            output.split_whitespace().find_map(|t| t.strip_prefix(name)).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        };
        let verdict = match out.status.code() {
            Some(0) => Verdict::Pass,
            Some(1) => Verdict::Safety,
            Some(2) => Verdict::Liveness,
            _ => Verdict::Crash,
        };
        let (sim_secs, real_secs) = (field("sim_s="), field("real_s="));
        let probes = output
            .split_whitespace()
            .find_map(|t| t.strip_prefix("probes="))
            .map(|list| {
                list.split(',')
                    .filter_map(|e| {
                        let (name, n) = e.split_once(':')?;
                        Some((Probe::from_name(name)?, n.parse().ok()?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let output = if verdict == Verdict::Crash && !output.contains("replay:") {
            format!("{output}seed={seed} exited with {}\n{}\n", out.status, replay(path, seed, None))
        } else {
            output
        };
        ChildRun { verdict, sim_secs, real_secs, output, probes }
    }

    /// Prints how many seeds reached each probe; returns the required
    /// probes no seed reached.
    fn report_probes(results: &[ChildRun]) -> Vec<Probe> {
        let mut missing = Vec::new();
        let mut reached = 0;
        for p in Probe::ALL {
            let (mut seeds, mut hits) = (0usize, 0u64);
            for r in results {
                if let Some((_, n)) = r.probes.iter().find(|(q, n)| *q == p && *n > 0) {
                    seeds += 1;
                    hits += n;
                }
            }
            let required = armada_sim::world::probes::required(p);
            println!(
                "probe={} seeds={seeds}/{} hits={hits}{}",
                p.name(),
                results.len(),
                if required { "" } else { " (not required)" }
            );
            if seeds > 0 {
                reached += 1;
            } else if required {
                missing.push(p);
            }
        }
        let names: Vec<&str> = missing.iter().map(|p| p.name()).collect();
        println!(
            "probes: {reached}/{} reached{}",
            Probe::ALL.len(),
            if names.is_empty() { String::new() } else { format!("; required, never reached: {}", names.join(", ")) }
        );
        missing
    }

    fn replay(path: &Path, seed: u64, canary: Option<Canary>) -> String {
        format!(
            "replay: ci/sim run {} --seed {}{}",
            path.display(),
            seed,
            canary.map(|c| format!(" --canary {}", c.name())).unwrap_or_default()
        )
    }

    fn load(path: &Path) -> Result<Scenario, i32> {
        Scenario::load(path).map_err(|e| {
            eprintln!("error: {e:#}");
            64
        })
    }

    pub fn main() -> i32 {
        // Logs only when asked (they are large): ARMADA_SIM_LOG=armada_server=info,openraft=warn
        if let Ok(filter) = std::env::var("ARMADA_SIM_LOG") {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .init();
        }
        let cli = Cli::parse();
        match cli.cmd {
            Cmd::Run { scenario, seed, canary } => {
                let canary = match canary.as_deref().map(|n| Canary::from_name(n).ok_or(n)) {
                    None => None,
                    Some(Ok(c)) => Some(c),
                    Some(Err(n)) => {
                        let names: Vec<_> = Canary::ALL.iter().map(|c| c.name()).collect();
                        eprintln!("error: unknown canary {n:?}; known: {}", names.join(", "));
                        return 64;
                    }
                };
                let sc = match load(&scenario) {
                    Ok(s) => s,
                    Err(c) => return c,
                };
                let r = run(&sc, seed, canary);
                println!("{}", line(&scenario, &sc, &r, canary));
                for f in &r.failures {
                    println!("  {f}");
                }
                if r.verdict != Verdict::Pass {
                    println!("{}", replay(&scenario, seed, canary));
                }
                exit_code(r.verdict)
            }
            Cmd::CheckHistory { file } => {
                let ops = match std::fs::read_to_string(&file)
                    .map_err(|e| e.to_string())
                    .and_then(|t| armada_sim::history::read_jsonl(&t))
                {
                    Ok(o) => o,
                    Err(e) => {
                        eprintln!("error: {}: {e}", file.display());
                        return 4;
                    }
                };
                let (keys, committed) = armada_sim::linearizability::keys_and_read_values(&ops);
                let ok = ops.iter().filter(|o| matches!(o.outcome, armada_sim::history::Outcome::Ok(_))).count();
                match armada_sim::linearizability::check(&ops, &keys, &committed) {
                    Ok(()) => {
                        println!("check-history: {} ops ({ok} ok), {} keys: linearizable", ops.len(), keys.len());
                        0
                    }
                    Err(f) => {
                        println!("check-history: {} ops ({ok} ok), {} keys: {f}", ops.len(), keys.len());
                        1
                    }
                }
            }
            Cmd::Determinism { scenario, seed } => {
                let sc = match load(&scenario) {
                    Ok(s) => s,
                    Err(c) => return c,
                };
                let a = run(&sc, seed, None);
                let b = run(&sc, seed, None);
                println!("{}", line(&scenario, &sc, &a, None));
                println!("{}", line(&scenario, &sc, &b, None));
                if a.trace == b.trace && a.verdict == b.verdict {
                    println!("determinism: seed={seed} trace={:016x} equal", a.trace);
                    0
                } else {
                    println!("determinism: seed={seed} MISMATCH {:016x} != {:016x}", a.trace, b.trace);
                    println!("{}", replay(&scenario, seed, None));
                    4
                }
            }
            Cmd::Sweep { paths, seeds, start, jobs, require_probes, progress } => {
                let files = match collect(&paths) {
                    Ok(f) => f,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        return 64;
                    }
                };
                let mut scenarios = Vec::new();
                for f in &files {
                    match load(f) {
                        Ok(s) => scenarios.push((f.clone(), s)),
                        Err(c) => return c,
                    }
                }
                let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
                let work: Vec<(usize, u64)> =
                    (0..scenarios.len()).flat_map(|i| (start..start + seeds).map(move |s| (i, s))).collect();
                let next = std::sync::atomic::AtomicUsize::new(0);
                let results = std::sync::Mutex::new(Vec::new());
                std::thread::scope(|scope| {
                    for _ in 0..jobs {
                        scope.spawn(|| loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let Some(&(si, seed)) = work.get(i) else { break };
                            let (path, _) = &scenarios[si];
                            let r = run_in_child(path, seed);
                            if r.verdict != Verdict::Pass {
                                print!("{}", r.output);
                            }
                            let mut all = results.lock().unwrap_or_else(|p| p.into_inner());
                            all.push(r);
                            if progress.is_some_and(|every| every > 0 && all.len().is_multiple_of(every)) {
                                let failed = all.iter().filter(|r| r.verdict != Verdict::Pass).count();
                                eprintln!("sweep progress: {}/{} runs, {failed} failed", all.len(), work.len());
                            }
                        });
                    }
                });
                let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
                let missing = report_probes(&results);
                let passed = results.iter().filter(|r| r.verdict == Verdict::Pass).count();
                let sim: f64 = results.iter().map(|r| r.sim_secs).sum();
                let real: f64 = results.iter().map(|r| r.real_secs).sum();
                let ratio = if real > 0.0 { sim / real } else { 0.0 };
                println!("sweep: {}/{} passed, sim/real {:.1}x", passed, results.len(), ratio);
                if require_probes && !missing.is_empty() {
                    eprintln!("sweep: required probes never reached (see the probes: line)");
                    return 1;
                }
                if passed == results.len() {
                    0
                } else {
                    1
                }
            }
            Cmd::Canaries { seeds, dir, start } => {
                let mut caught = 0;
                for c in Canary::ALL {
                    let path = dir.join(format!("{}.toml", c.name()));
                    let sc = match load(&path) {
                        Ok(s) => s,
                        Err(code) => return code,
                    };
                    let mut found = None;
                    for seed in start..start + seeds {
                        let r = run(&sc, seed, Some(c));
                        if r.verdict != Verdict::Pass {
                            found = Some((seed, r));
                            break;
                        }
                    }
                    match found {
                        Some((seed, r)) => {
                            caught += 1;
                            println!(
                                "canary={} caught seed={} seeds_needed={} verdict={} by: {}",
                                c.name(),
                                seed,
                                seed - start + 1,
                                r.verdict.name(),
                                r.failures.first().map(String::as_str).unwrap_or("?")
                            );
                        }
                        None => println!("canary={} NOT caught in {} seeds ({})", c.name(), seeds, path.display()),
                    }
                }
                println!("canaries: {}/{} caught", caught, Canary::ALL.len());
                if caught == Canary::ALL.len() {
                    0
                } else {
                    1
                }
            }
        }
    }
}
