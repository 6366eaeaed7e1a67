//! Lease clients of the etcd table in the simulated world, and checker L1.
//!
//! Each lease client, over and over: grants a lease of 2 to 5 seconds and
//! puts a key on it (through etcd's Lease and KV APIs, or in one armada.v1
//! put with a TTL), keeps it alive a few times through etcd's LeaseKeepAlive
//! at random nodes (of follower clusters too, which forward it), then
//! revokes it or lets it run out. Lease keys (`L..`) sort before the
//! workload's keys (`k....`), so no KV client's read covers them; the M1
//! model check runs over them like over every command.
//!
//! L1 (every seed), against every revocation as first applied on the
//! leader cluster (the simulator sees each `LeaseRevoke` apply):
//! - never early: a lease the client did not revoke is revoked no sooner
//!   than its TTL after the send of its grant or of its last acknowledged
//!   keep-alive (scaled by the fastest clock the scenario's clock faults
//!   allow; leases whose window saw a clock jump are skipped);
//! - no keep-alive sent after the revocation applied is acknowledged;
//! - never late once the world is calm: a lease whose last grant or
//!   keep-alive was sent after the faults ended (plus a recovery margin) is
//!   revoked within its TTL plus [`LATE_BOUND`] after that send.
//!
//! Follower clusters apply the revocation's deletions as ordinary
//! revisions; the replication checkers compare their histories with the
//! leader cluster's revision by revision, so the keys disappear at the same
//! revision everywhere.

use armada_proto::etcd as epb;

use super::*;

/// How much later than its deadline a lease may be revoked in a calm
/// world: the lease driver's tick, a Raft round trip and an apply.
pub(super) const LATE_BOUND: Duration = Duration::from_millis(1500);
/// After the faults end: time for crashed nodes to restart and groups to
/// elect, before lateness is held to [`LATE_BOUND`].
const RECOVERY: Duration = Duration::from_secs(4);
/// How long lease clients go on after the faults end, so that some leases
/// live entirely in the calm.
pub(super) const CALM_TAIL: Duration = Duration::from_secs(12);

/// A keep-alive's outcome as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeptAlive {
    /// Renewed for this TTL.
    Renewed(i64),
    /// The lease is gone (TTL 0).
    Gone,
    /// No answer (the renewal may or may not have happened).
    Unknown,
}

/// One lease as its client used it.
#[derive(Debug, Clone)]
pub(super) struct LeaseUse {
    pub client: u32,
    pub id: i64,
    pub ttl: i64,
    pub api: &'static str,
    pub key: String,
    /// When the grant (or the armada.v1 put with a TTL) was sent, and when
    /// its answer (or the put's after it) came.
    pub granted_ns: u64,
    pub granted_done_ns: u64,
    /// (sent, answered or given up, outcome) of each keep-alive.
    pub keep_alives: Vec<(u64, u64, KeptAlive)>,
    /// When the client sent its revocation, if it did.
    pub revoke_ns: Option<u64>,
}

/// What the lease clients did and what the leader cluster revoked.
#[derive(Debug, Default)]
pub(super) struct LeaseLog {
    pub uses: Vec<LeaseUse>,
    /// First apply on the leader cluster of each lease's revocation: (time,
    /// revision after it), by lease id (leases of the etcd table).
    pub revoked: BTreeMap<i64, (u64, u64)>,
    /// When each clock jump of the scenario's clock faults happened.
    pub clock_jumps: Vec<u64>,
    /// When the fault loops stop (and heal everything).
    pub faults_end_ns: u64,
}

impl LeaseLog {
    /// A leader-cluster replica applied a revocation of lease `id` at
    /// `now_ns` (the first apply of it counts).
    pub fn revoked(&mut self, id: i64, now_ns: u64, revision: u64) {
        self.revoked.entry(id).or_insert((now_ns, revision));
    }
}

/// The etcd API address of a random node: of the leader cluster, or (when
/// there are follower clusters, a third of the time) of a follower cluster.
fn random_host(sc: &Scenario, members: &BTreeMap<u64, ArmadaNode>, followers_too: bool) -> Option<String> {
    if let (Some(fl), true) = (&sc.followers, followers_too) {
        if rand_range(0, 2) == 0 {
            let c = rand_range(1, u64::from(fl.clusters));
            let n = rand_range(1, u64::from(fl.nodes));
            return Some(followers::cluster_ip(c, n));
        }
    }
    let node = rand_range(1, sc.nodes as u64);
    members.get(&node).and_then(|m| m.api_addr.split(':').next().map(str::to_string))
}

const CALL: Duration = Duration::from_secs(2);

async fn grant_etcd(host: &str, ttl: i64) -> Option<i64> {
    let mut c = epb::lease_client::LeaseClient::new(connect(&format!("{host}:{ETCD_PORT}")).await?);
    let r = tokio::time::timeout(CALL, c.lease_grant(epb::LeaseGrantRequest { ttl, id: 0 })).await.ok()?.ok()?;
    Some(r.into_inner().id)
}

async fn put_etcd(host: &str, key: &str, lease: i64) -> bool {
    let Some(ch) = connect(&format!("{host}:{ETCD_PORT}")).await else { return false };
    let mut c = epb::kv_client::KvClient::new(ch);
    let put = epb::PutRequest { key: key.as_bytes().to_vec(), value: b"leased".to_vec(), lease, ..Default::default() };
    matches!(tokio::time::timeout(CALL, c.put(put)).await, Ok(Ok(_)))
}

/// An armada.v1 put with a TTL: returns the lease it was given.
async fn put_v1_ttl(host: &str, key: &str, ttl: i64) -> Option<i64> {
    let mut c = pb::kv_client::KvClient::new(connect(&format!("{host}:8443")).await?);
    let put = pb::PutRequest {
        table: ETCD_TABLE.into(),
        key: key.as_bytes().to_vec(),
        value: b"leased".to_vec(),
        ttl,
        ..Default::default()
    };
    let r = tokio::time::timeout(CALL, c.put(put)).await.ok()?.ok()?;
    Some(r.into_inner().lease)
}

async fn keep_alive(host: &str, id: i64) -> KeptAlive {
    let Some(ch) = connect(&format!("{host}:{ETCD_PORT}")).await else { return KeptAlive::Unknown };
    let mut c = epb::lease_client::LeaseClient::new(ch);
    let requests = futures::stream::iter([epb::LeaseKeepAliveRequest { id }]);
    let call = async move {
        let mut s = c.lease_keep_alive(requests).await.ok()?.into_inner();
        s.message().await.ok()?
    };
    match tokio::time::timeout(CALL, call).await {
        Ok(Some(r)) if r.ttl > 0 => KeptAlive::Renewed(r.ttl),
        Ok(Some(_)) => KeptAlive::Gone,
        _ => KeptAlive::Unknown,
    }
}

async fn revoke(host: &str, id: i64) {
    let Some(ch) = connect(&format!("{host}:{ETCD_PORT}")).await else { return };
    let mut c = epb::lease_client::LeaseClient::new(ch);
    let _ = tokio::time::timeout(CALL, c.lease_revoke(epb::LeaseRevokeRequest { id })).await;
}

/// One lease client, until the faults have ended and [`CALM_TAIL`] passed.
pub(super) async fn lease_main(
    cid: u32,
    sc: Scenario,
    members: BTreeMap<u64, ArmadaNode>,
    shared: Arc<Shared>,
    until_ns: u64,
) {
    let stop_ns = until_ns + CALM_TAIL.as_nanos() as u64;
    let mut n = 0u32;
    while shared.now_ns() < stop_ns {
        n += 1;
        let key = format!("L{cid:02}-{n:04}");
        let ttl = rand_range(2, 5) as i64;
        let via_v1 = rand_range(0, 2) == 0;
        // Grants and puts go to the leader cluster (a follower cluster
        // forwards them too, but its answer waits for replication).
        let Some(host) = random_host(&sc, &members, false) else { return };
        let granted_ns = shared.now_ns();
        let id = if via_v1 {
            put_v1_ttl(&host, &key, ttl).await
        } else {
            match grant_etcd(&host, ttl).await {
                Some(id) => {
                    put_etcd(&host, &key, id).await;
                    Some(id)
                }
                None => None,
            }
        };
        let Some(id) = id.filter(|id| *id != 0) else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut lease = LeaseUse {
            client: cid,
            id,
            ttl,
            api: if via_v1 { "armada.v1" } else { "etcd" },
            key,
            granted_ns,
            granted_done_ns: shared.now_ns(),
            keep_alives: Vec::new(),
            revoke_ns: None,
        };
        for _ in 0..rand_range(0, 4) {
            // Well within the TTL, as clients do (etcd's: a third of it).
            tokio::time::sleep(Duration::from_millis(rand_range(300, ttl as u64 * 1000 / 2))).await;
            let Some(host) = random_host(&sc, &members, true) else { break };
            let sent = shared.now_ns();
            let r = keep_alive(&host, id).await;
            lease.keep_alives.push((sent, shared.now_ns(), r));
            if r == KeptAlive::Gone {
                break;
            }
        }
        if rand_range(0, 2) == 0 {
            let Some(host) = random_host(&sc, &members, true) else { return };
            lease.revoke_ns = Some(shared.now_ns());
            revoke(&host, id).await;
        }
        shared.leases.lock().unwrap_or_else(|p| p.into_inner()).uses.push(lease);
        tokio::time::sleep(Duration::from_millis(rand_range(100, 1000))).await;
    }
    // Outlive the last lease's deadline and bound.
    tokio::time::sleep(Duration::from_secs(5) + LATE_BOUND).await;
}

/// L1 over everything the lease clients did (see the module docs).
/// Returns the failures, and (leases used, revoked by expiry, held to the
/// late bound).
pub(super) fn check(shared: &Shared, sc: &Scenario, end_ns: u64) -> (Vec<String>, (usize, usize, usize)) {
    let log = shared.leases.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::new();
    // The fastest a node's lease clock may run: a TTL passes that much
    // sooner in simulated time.
    let fastest = if sc.faults.clock > 0 { sc.faults.clock_rate_ppm[1].max(1_000_000) } else { 1_000_000 };
    let calm_from = if sc.faults.total() == 0 { 0 } else { log.faults_end_ns + RECOVERY.as_nanos() as u64 };
    let secs = |ns: u64| ns as f64 / 1e9;
    let (mut expired, mut calm) = (0, 0);
    for u in &log.uses {
        let ttl_ns = u.ttl as u64 * 1_000_000_000;
        let revoked = log.revoked.get(&u.id).copied();
        let acked = u
            .keep_alives
            .iter()
            .filter(|k| matches!(k.2, KeptAlive::Renewed(_)))
            .map(|k| k.0)
            .max()
            .unwrap_or(u.granted_ns)
            .max(u.granted_ns);
        // The latest the lease can have been renewed: when an answer came,
        // or, without one, when the call gave up (a request still in
        // flight then may renew it later, but not in a calm world).
        let sent = u
            .keep_alives
            .iter()
            .filter_map(|(s, done, r)| match r {
                KeptAlive::Renewed(_) => Some(*done),
                KeptAlive::Unknown => Some(s + CALL.as_nanos() as u64),
                KeptAlive::Gone => None,
            })
            .max()
            .unwrap_or(u.granted_done_ns)
            .max(u.granted_done_ns);
        let what = format!("lease {} ({} s, client {} via {}, key {})", u.id, u.ttl, u.client, u.api, u.key);
        if let Some((at, revision)) = revoked {
            let by_client = u.revoke_ns.is_some_and(|r| r <= at);
            expired += usize::from(!by_client);
            let earliest = acked + ttl_ns * 1_000_000 / fastest;
            let jumped = log.clock_jumps.iter().any(|j| *j >= acked && *j <= at);
            if !by_client && !jumped && at < earliest && out.len() < 5 {
                out.push(format!(
                    "L1 {what} was revoked at {:.3} s (revision {revision}), {:.3} s after the send of its last \
                     acknowledged grant or keep-alive at {:.3} s: sooner than its TTL",
                    secs(at),
                    secs(at - acked),
                    secs(acked)
                ));
            }
            for (s, _, r) in &u.keep_alives {
                if *s > at && matches!(r, KeptAlive::Renewed(_)) && out.len() < 5 {
                    out.push(format!(
                        "L1 {what}: a keep-alive sent at {:.3} s was acknowledged ({r:?}), but the lease's \
                         revocation had applied at {:.3} s",
                        secs(*s),
                        secs(at)
                    ));
                }
            }
        }
        if u.revoke_ns.is_none() && sent >= calm_from {
            calm += 1;
            let deadline = sent + ttl_ns + LATE_BOUND.as_nanos() as u64;
            let late = match revoked {
                Some((at, _)) => at > deadline,
                None => end_ns > deadline,
            };
            if late && out.len() < 5 {
                out.push(format!(
                    "L1 {what}: its last grant or keep-alive was answered by {:.3} s, in a calm world, but it was \
                     {} (bound: TTL + {:?})",
                    secs(sent),
                    match revoked {
                        Some((at, _)) => format!("revoked only at {:.3} s", secs(at)),
                        None => format!("still not revoked at {:.3} s", secs(end_ns)),
                    },
                    LATE_BOUND
                ));
            }
        }
    }
    (out, (log.uses.len(), expired, calm))
}
