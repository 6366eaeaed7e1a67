//! Record formats: every value Armada keeps in a node's engine starts with a
//! format version byte, followed by the value's postcard encoding. A
//! data directory records the version its values are in under
//! [`FORMAT_KEY`]; [`open_storage`] checks it when a node starts, and
//! upgrades a directory written before values carried versions.
//!
//! Rules (also in `docs/formats.md`):
//!
//! - [`encode`] writes [`FORMAT`]; [`decode`] reads every version from
//!   [`FORMAT_OLDEST`] to [`FORMAT`] and refuses anything else with
//!   [`FormatError::Unknown`] (a newer release's data: never guessed at).
//! - A change to an encoded type (a field added, a variant added) takes a new
//!   version number; [`decode`] keeps reading the old one and converts it.
//!   Enum variants are only ever appended.
//! - Version 0 is the format of releases before versions existed: no
//!   version byte. Only [`open_storage`] reads it, turning a version-0
//!   directory into version 1 (the same bytes behind a version byte).
//!
//! Invariant: a value is never decoded under a version it was not written
//! in; bytes a peer or a disk hands over never cause a panic.

use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineError, WriteBatch};

/// The format this build writes.
pub const FORMAT: u8 = 1;
/// The oldest format [`decode`] reads.
pub const FORMAT_OLDEST: u8 = 1;

/// The key under which a data directory records its format. It sorts before
/// every group namespace (`g` + id, see `crate::layout`).
pub const FORMAT_KEY: &[u8] = b"format";
/// Progress of an upgrade from version 0: the last key rewritten.
const UPGRADE_CURSOR_KEY: &[u8] = b"format-upgrade";
/// Bytes of values rewritten per batch while upgrading a directory.
pub const UPGRADE_BATCH_BYTES: usize = 4 << 20;

/// A value that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    #[error("{what}: empty value (no format version)")]
    Empty { what: String },
    /// Written by a newer release (or not Armada's).
    #[error(
        "{what}: format version {version} is not one this build reads (versions {FORMAT_OLDEST} to {FORMAT}); \
         was it written by a newer Armada?"
    )]
    Unknown { what: String, version: u8 },
    #[error("{what}: malformed format {version} value: {reason}")]
    Malformed { what: String, version: u8, reason: String },
}

impl From<FormatError> for EngineError {
    fn from(e: FormatError) -> Self {
        EngineError::Corrupt(e.to_string())
    }
}

/// The current format's encoding of `v`.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_extend(v, vec![FORMAT]).expect("postcard encodes owned, in-memory values without failing")
}

/// Decodes a value of any version this build reads; `what` names it in
/// errors.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, FormatError> {
    let (&version, body) = bytes.split_first().ok_or_else(|| FormatError::Empty { what: what.to_string() })?;
    if !(FORMAT_OLDEST..=FORMAT).contains(&version) {
        return Err(FormatError::Unknown { what: what.to_string(), version });
    }
    // Version 1 is the only one so far; a later version matches here and
    // converts what an older one decodes to.
    postcard::from_bytes(body).map_err(|e| FormatError::Malformed {
        what: what.to_string(),
        version,
        reason: e.to_string(),
    })
}

/// A version-0 value (written before formats had versions) as version 1:
/// the same postcard bytes behind the version byte.
pub fn upgrade_v0(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 1);
    out.push(1);
    out.extend_from_slice(value);
    out
}

/// What [`open_storage`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// An empty engine: it is marked with the current format.
    Fresh,
    /// Already in the current format.
    Current,
    /// A version-0 directory, rewritten into the current format: this many
    /// values (counting those a restart had already done).
    Upgraded { values: u64 },
}

/// Why storage could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error(
        "the data directory is in format version {found}, which this build cannot read (it reads versions \
         {FORMAT_OLDEST} to {FORMAT}); run the Armada release that wrote it, or a newer one"
    )]
    Unsupported { found: u8 },
    #[error("the data directory's format marker is malformed ({0:?})")]
    Marker(Vec<u8>),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Checks the engine's format before anything reads it: marks an empty
/// engine, accepts the current format, upgrades version 0 (resuming an
/// upgrade a crash interrupted), and refuses a version it does not know.
/// The caller syncs the engine afterwards if it wants the upgrade durable
/// before serving (an upgrade interrupted by a crash is resumed anyway).
pub fn open_storage(engine: &dyn Engine) -> Result<Opened, OpenError> {
    match engine.get(FORMAT_KEY)? {
        Some(v) if v == [FORMAT] => return Ok(Opened::Current),
        Some(v) if v.len() == 1 => return Err(OpenError::Unsupported { found: v[0] }),
        Some(v) => return Err(OpenError::Marker(v)),
        None => {}
    }
    let cursor = engine.get(UPGRADE_CURSOR_KEY)?;
    if cursor.is_none() && engine.last(&[], &[0xff; 9])?.is_none() {
        let mut b = WriteBatch::new();
        b.put(FORMAT_KEY.to_vec(), vec![FORMAT]);
        engine.write(b)?;
        return Ok(Opened::Fresh);
    }
    let mut values = 0u64;
    // Resume after the last key an interrupted upgrade rewrote.
    let mut from = match cursor {
        Some(mut c) => {
            c.push(0);
            c
        }
        None => Vec::new(),
    };
    loop {
        let mut batch = WriteBatch::new();
        let mut last: Option<Vec<u8>> = None;
        engine.scan(&from, &[0xff; 9], &mut |k, v| {
            if k == FORMAT_KEY || k == UPGRADE_CURSOR_KEY {
                return true;
            }
            batch.put(k.to_vec(), upgrade_v0(v));
            last = Some(k.to_vec());
            batch.size_bytes() < UPGRADE_BATCH_BYTES
        })?;
        let Some(last) = last else { break };
        values += batch.ops.len() as u64;
        batch.put(UPGRADE_CURSOR_KEY.to_vec(), last.clone());
        engine.write(batch)?;
        from = last;
        from.push(0);
    }
    let mut b = WriteBatch::new();
    b.delete(UPGRADE_CURSOR_KEY.to_vec());
    b.put(FORMAT_KEY.to_vec(), vec![FORMAT]);
    engine.write(b)?;
    Ok(Opened::Upgraded { values })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::MemEngine;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Sample {
        A { id: u64, name: String },
        B(Vec<u8>),
    }

    fn sample() -> impl Strategy<Value = Sample> {
        prop_oneof![
            (any::<u64>(), ".{0,20}").prop_map(|(id, name)| Sample::A { id, name }),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(Sample::B),
        ]
    }

    proptest! {
        #[test]
        fn encode_round_trips(v in sample()) {
            let bytes = encode(&v);
            prop_assert_eq!(bytes[0], FORMAT);
            prop_assert_eq!(decode::<Sample>(&bytes, "sample").unwrap(), v);
        }

        /// Whatever the bytes, decoding returns (never panics).
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode::<Sample>(&bytes, "sample");
        }
    }

    #[test]
    fn unknown_versions_and_empty_values_are_refused() {
        let mut bytes = encode(&Sample::B(vec![1, 2]));
        bytes[0] = FORMAT + 1;
        let e = decode::<Sample>(&bytes, "a sample").unwrap_err();
        assert_eq!(e, FormatError::Unknown { what: "a sample".into(), version: FORMAT + 1 });
        assert!(e.to_string().contains("format version 2 is not one this build reads"), "{e}");
        bytes[0] = 0;
        assert!(matches!(decode::<Sample>(&bytes, "x"), Err(FormatError::Unknown { version: 0, .. })));
        assert!(matches!(decode::<Sample>(&[], "x"), Err(FormatError::Empty { .. })));
        assert!(matches!(decode::<Sample>(&[FORMAT, 9], "x"), Err(FormatError::Malformed { version: 1, .. })));
    }

    #[test]
    fn an_empty_engine_is_marked_and_then_current() {
        let e = MemEngine::new();
        assert_eq!(open_storage(&e).unwrap(), Opened::Fresh);
        assert_eq!(e.get(FORMAT_KEY).unwrap(), Some(vec![FORMAT]));
        assert_eq!(open_storage(&e).unwrap(), Opened::Current);
    }

    fn v0_engine(n: u8) -> MemEngine {
        let e = MemEngine::new();
        let mut b = WriteBatch::new();
        for i in 0..n {
            b.put(vec![b'g', i], postcard::to_stdvec(&Sample::A { id: i.into(), name: "v0".into() }).unwrap());
        }
        e.write(b).unwrap();
        e
    }

    #[test]
    fn a_version_0_directory_is_upgraded_in_place() {
        let e = v0_engine(50);
        assert_eq!(open_storage(&e).unwrap(), Opened::Upgraded { values: 50 });
        for i in 0..50u8 {
            let v = e.get(&[b'g', i]).unwrap().unwrap();
            assert_eq!(decode::<Sample>(&v, "sample").unwrap(), Sample::A { id: i.into(), name: "v0".into() });
        }
        assert_eq!(e.get(UPGRADE_CURSOR_KEY).unwrap(), None);
        assert_eq!(open_storage(&e).unwrap(), Opened::Current);
    }

    /// An upgrade cut off after some batches resumes where it stopped and
    /// never prefixes a value twice.
    #[test]
    fn an_interrupted_upgrade_resumes_after_its_cursor() {
        let e = v0_engine(30);
        // What an upgrade that stopped after key 11 left behind.
        let mut b = WriteBatch::new();
        for i in 0..12u8 {
            let v = e.get(&[b'g', i]).unwrap().unwrap();
            b.put(vec![b'g', i], upgrade_v0(&v));
        }
        b.put(UPGRADE_CURSOR_KEY.to_vec(), vec![b'g', 11]);
        e.write(b).unwrap();
        assert_eq!(open_storage(&e).unwrap(), Opened::Upgraded { values: 18 });
        for i in 0..30u8 {
            let v = e.get(&[b'g', i]).unwrap().unwrap();
            assert_eq!(decode::<Sample>(&v, "sample").unwrap(), Sample::A { id: i.into(), name: "v0".into() });
        }
    }

    #[test]
    fn a_newer_or_malformed_marker_is_refused() {
        let e = MemEngine::new();
        let mut b = WriteBatch::new();
        b.put(FORMAT_KEY.to_vec(), vec![FORMAT + 1]);
        e.write(b).unwrap();
        let err = open_storage(&e).unwrap_err();
        assert!(matches!(err, OpenError::Unsupported { found } if found == FORMAT + 1));
        assert!(err.to_string().contains("format version 2, which this build cannot read"), "{err}");
        let mut b = WriteBatch::new();
        b.put(FORMAT_KEY.to_vec(), b"bogus".to_vec());
        e.write(b).unwrap();
        assert!(matches!(open_storage(&e), Err(OpenError::Marker(_))));
    }
}
