//! Cross-cluster replication (hub and spoke).
//!
//! Leader side: [`ReplicationService`] serves the `armada.replication.v1`
//! API from any node of the leader cluster: the catalog, each table's change
//! stream (pushed as revisions apply on the serving node, batched, with
//! heartbeats), snapshots, and writes sent on by followers.
//!
//! Follower side: [`Follower::start`] makes a node part of a follower
//! cluster. Writes go upstream ([`UpstreamClient`]); a catalog worker (on the
//! follower's metadata leader) mirrors table creation and deletion; a table
//! worker per table (on the follower's leader of that table) tails the change
//! stream and proposes what arrives as `Replicate` commands into the local
//! group, or installs a snapshot when the leader no longer has the history.
//! Applying is idempotent and ordered by the state machine itself (a batch
//! applies only at `applied_revision + 1`), so a deposed worker or a
//! duplicated message can never apply twice.
//!
//! Modules: [`service`] (the leader side), [`follower`] (the follower
//! side's workers), [`upstream`] (the follower's client of the leader
//! cluster), and the message conversions both sides share, here.

pub mod follower;
pub mod service;
pub mod upstream;

pub use follower::Follower;
pub use service::{router, ReplicationService};
pub use upstream::UpstreamClient;

use std::pin::Pin;
use std::time::Duration;

use armada_core::mvcc::replication::{Mutation, RevisionChanges, RevisionPart};
use armada_proto::replication as pb;
use futures::Stream;
use tonic::Status;

pub use armada_core::mvcc::replication::{BATCH_BYTES_MAX, BATCH_REVISIONS_MAX};
/// Heartbeat interval of an idle change stream or catalog stream.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// Keys per snapshot chunk (and about the most bytes, below).
pub const SNAPSHOT_CHUNK_KEYS: usize = 1000;
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Reconnect backoff of follower workers.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often follower workers check whether they should run.
pub const WORKER_POLL: Duration = Duration::from_millis(100);
/// Largest replication message either end accepts (decoding) or sends
/// (encoding). gRPC's default of 4 MiB is below what one revision can
/// carry: a DeleteRange over 6,000 keys of 1 KiB is about 6 MiB, and with
/// the default the follower refused that message on every retry and
/// replication of the table stopped for good.
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;
/// To a follower that cannot put parts back together (an older version), a
/// revision larger than this is not sent on the change stream: it is told
/// to install a snapshot instead (snapshots stream in bounded pages). Half
/// of [`MESSAGE_BYTES_MAX`] leaves room for protobuf's framing overhead.
pub const STREAM_REVISION_BYTES_MAX: usize = MESSAGE_BYTES_MAX / 2;
/// The most a follower holds of one revision sent in parts. A revision is
/// one Raft entry of the leader cluster, so this is far above any revision
/// a leader cluster accepts; past it the follower installs a snapshot.
pub const ASSEMBLED_REVISION_BYTES_MAX: usize = 1 << 30;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn changes_out(c: RevisionChanges) -> pb::Revision {
    part_out(RevisionPart { revision: c.revision, mutations: c.mutations, continued: false })
}

fn part_out(c: RevisionPart) -> pb::Revision {
    pb::Revision {
        revision: c.revision,
        continued: c.continued,
        mutations: c
            .mutations
            .into_iter()
            .map(|m| pb::Mutation {
                deleted: m.value.is_none(),
                value: m.value.unwrap_or_default(),
                key: m.key,
                create_revision: m.create_revision,
                version: m.version,
                lease: m.lease,
            })
            .collect(),
    }
}

fn part_in(r: pb::Revision) -> RevisionPart {
    RevisionPart {
        revision: r.revision,
        continued: r.continued,
        mutations: r
            .mutations
            .into_iter()
            .map(|m| Mutation {
                key: m.key,
                value: if m.deleted { None } else { Some(m.value) },
                create_revision: m.create_revision,
                version: m.version,
                lease: m.lease,
            })
            .collect(),
    }
}
