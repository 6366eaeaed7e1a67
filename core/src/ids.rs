//! The numbers that cross module boundaries, as distinct types: a table's
//! [`Revision`], a Raft [`LogIndex`], a [`NodeId`]. (A table's id is its
//! Raft group's: [`crate::GroupId`].) Each is a `u64` on the wire and on
//! disk (`serde(transparent)`), so using them changes no format; what they
//! change is that a revision can no longer be passed where a log index or a
//! node id is expected.
//!
//! Inside a module, code that does arithmetic on revisions (the MVCC store,
//! the changelog) works on the `u64` inside; the types are for signatures
//! between modules and crates.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The number inside.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<u64> for $name {
            fn from(v: u64) -> $name {
                $name(v)
            }
        }

        impl From<$name> for u64 {
            fn from(v: $name) -> u64 {
                v.0
            }
        }
    };
}

id!(
    /// A table's revision: 0 before its first write, then one more with
    /// every write that changes it (etcd's `revision`). A follower cluster
    /// uses the leader cluster's revisions.
    Revision
);
id!(
    /// The index of an entry in a Raft group's log (0: none).
    LogIndex
);
id!(
    /// A node's id, unique within its cluster (etcd's `member_id`).
    NodeId
);

impl Revision {
    /// The revision after this one.
    pub const fn next(self) -> Revision {
        Revision(self.0 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_as_the_number_inside() {
        let bytes = postcard::to_allocvec(&Revision(300)).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&300u64).unwrap());
        assert_eq!(postcard::from_bytes::<NodeId>(&bytes).unwrap(), NodeId(300));
        assert_eq!(Revision(4).next(), Revision(5));
        assert_eq!(LogIndex(7).to_string(), "7");
    }
}
