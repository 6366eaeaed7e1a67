//! Automatic compaction policy (etcd's `--auto-compaction-mode` and
//! `--auto-compaction-retention`), as a pure state machine: the driver
//! calls [`AutoCompactor::tick`] with the time and each table's revisions,
//! and proposes the compactions it returns through the table's Raft group
//! (on the node that leads it). Nothing here reads a clock.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::command::GroupId;

/// What history to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// No automatic compaction (the default, as in etcd).
    Off,
    /// Keep the last `n` revisions: compact to `current - n`.
    Revisions(u64),
    /// Keep `ms` milliseconds of history: compact to the revision that was
    /// current that long ago (sampled every tenth of the period).
    Period { ms: u64 },
}

impl Retention {
    /// How often the driver should call [`AutoCompactor::tick`].
    pub fn tick_ms(self) -> Option<u64> {
        match self {
            Retention::Off => None,
            // etcd's revision mode compacts every 5 minutes.
            Retention::Revisions(_) => Some(REVISION_MODE_INTERVAL_MS),
            Retention::Period { ms } => Some((ms / 10).max(PERIOD_SAMPLE_MIN_MS)),
        }
    }
}

/// How often revision-mode compaction runs (etcd: 5 minutes).
pub const REVISION_MODE_INTERVAL_MS: u64 = 5 * 60 * 1000;
/// Shortest sampling interval in periodic mode.
pub const PERIOD_SAMPLE_MIN_MS: u64 = 100;

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Retention::Off => write!(f, "off"),
            Retention::Revisions(n) => write!(f, "{n} revisions"),
            Retention::Period { ms } => write!(f, "{ms} ms"),
        }
    }
}

/// Parses etcd's pair of flags: `mode` is `periodic` or `revision`;
/// `retention` is `0` (off), a number (hours in periodic mode, revisions in
/// revision mode) or, in periodic mode, a duration with a unit (`90s`,
/// `30m`, `12h`).
pub fn parse_retention(mode: &str, retention: &str) -> Result<Retention, String> {
    let r = retention.trim();
    match mode {
        "periodic" => {
            let ms = parse_duration_ms(r)?;
            Ok(if ms == 0 { Retention::Off } else { Retention::Period { ms } })
        }
        "revision" => {
            let n = u64::from_str(r).map_err(|_| format!("{r:?} is not a number of revisions"))?;
            Ok(if n == 0 { Retention::Off } else { Retention::Revisions(n) })
        }
        other => Err(format!("unknown auto-compaction mode {other:?} (periodic or revision)")),
    }
}

fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a duration (a number of hours, or a number with s, m or h)");
    let (num, unit_ms) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1_000u64),
        Some((i, 'm')) => (&s[..i], 60_000),
        Some((i, 'h')) => (&s[..i], 3_600_000),
        Some(_) => (s, 3_600_000),
        None => return Err(bad()),
    };
    let v = f64::from_str(num).map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 || v * unit_ms as f64 > u64::MAX as f64 / 2.0 {
        return Err(bad());
    }
    Ok((v * unit_ms as f64).round() as u64)
}

/// Per table: revisions sampled over time (periodic mode).
#[derive(Debug, Default)]
struct Samples {
    /// (time ms, revision), oldest first.
    points: Vec<(u64, u64)>,
}

/// Decides, tick by tick, which tables to compact and to which revision.
#[derive(Debug)]
pub struct AutoCompactor {
    retention: Retention,
    samples: BTreeMap<GroupId, Samples>,
}

impl AutoCompactor {
    pub fn new(retention: Retention) -> Self {
        Self { retention, samples: BTreeMap::new() }
    }

    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// One tick at `now_ms` for a table at revision `current`, compacted at
    /// `compacted`: the revision to compact to, if any. Call it for every
    /// table the node holds (a replica's samples are what it compacts with
    /// once it leads), and propose only for tables it leads; forget deleted
    /// tables with [`AutoCompactor::retain`].
    pub fn tick(&mut self, now_ms: u64, group: GroupId, current: u64, compacted: u64) -> Option<u64> {
        let target = match self.retention {
            Retention::Off => return None,
            Retention::Revisions(n) => current.saturating_sub(n),
            Retention::Period { ms } => {
                let s = self.samples.entry(group).or_default();
                s.points.push((now_ms, current));
                // The newest sample at least `ms` old: that revision was
                // current `ms` ago (or later).
                let cutoff = now_ms.saturating_sub(ms);
                let old = s.points.iter().rposition(|(t, _)| *t <= cutoff);
                match old {
                    Some(i) => {
                        let rev = s.points[i].1;
                        s.points.drain(..i);
                        if now_ms < ms {
                            return None;
                        }
                        rev
                    }
                    None => return None,
                }
            }
        };
        (target > compacted && target <= current).then_some(target)
    }

    /// Drops what is known of a table (deleted, or no longer led here: a
    /// new leader starts sampling afresh, so it compacts no sooner than a
    /// full period after taking over).
    pub fn forget(&mut self, group: GroupId) {
        self.samples.remove(&group);
    }

    /// Keeps what is known of the tables `keep` says to (drops deleted ones).
    pub fn retain(&mut self, mut keep: impl FnMut(GroupId) -> bool) {
        self.samples.retain(|g, _| keep(*g));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_like_etcds() {
        assert_eq!(parse_retention("periodic", "0"), Ok(Retention::Off));
        assert_eq!(parse_retention("periodic", "1"), Ok(Retention::Period { ms: 3_600_000 }));
        assert_eq!(parse_retention("periodic", "0.5"), Ok(Retention::Period { ms: 1_800_000 }));
        assert_eq!(parse_retention("periodic", "30m"), Ok(Retention::Period { ms: 1_800_000 }));
        assert_eq!(parse_retention("periodic", "90s"), Ok(Retention::Period { ms: 90_000 }));
        assert_eq!(parse_retention("periodic", "12h"), Ok(Retention::Period { ms: 43_200_000 }));
        assert_eq!(parse_retention("revision", "1000"), Ok(Retention::Revisions(1000)));
        assert_eq!(parse_retention("revision", "0"), Ok(Retention::Off));
        for (m, r) in [("revision", "1h"), ("periodic", "-1"), ("periodic", "x"), ("periodic", ""), ("daily", "1")] {
            assert!(parse_retention(m, r).is_err(), "{m} {r}");
        }
    }

    #[test]
    fn revision_mode_keeps_the_last_n_revisions() {
        let g = GroupId(3);
        let mut c = AutoCompactor::new(Retention::Revisions(100));
        assert_eq!(c.tick(0, g, 50, 0), None, "nothing to compact yet");
        assert_eq!(c.tick(1, g, 150, 0), Some(50));
        assert_eq!(c.tick(2, g, 150, 50), None, "already there");
        assert_eq!(c.tick(3, g, 400, 50), Some(300));
    }

    #[test]
    fn periodic_mode_compacts_to_the_revision_current_a_period_ago() {
        let g = GroupId(3);
        let mut c = AutoCompactor::new(Retention::Period { ms: 1000 });
        // Revision grows by 10 every 100 ms.
        let mut out = Vec::new();
        let mut compacted = 0;
        for step in 0..=30u64 {
            let now = step * 100;
            if let Some(t) = c.tick(now, g, 1 + step * 10, compacted) {
                out.push((now, t));
                compacted = t;
            }
        }
        assert_eq!(out.first(), Some(&(1000, 1)), "first compaction a full period in");
        for (now, t) in &out {
            // The revision current at `now - 1000`.
            assert_eq!(*t, 1 + (now - 1000) / 100 * 10, "at {now}");
        }
        assert_eq!(out.last(), Some(&(3000, 201)));
        // Samples do not pile up.
        assert!(c.samples[&g].points.len() <= 12);
        c.forget(g);
        assert_eq!(c.tick(3100, g, 400, compacted), None, "a new leader waits a full period");
    }
}
