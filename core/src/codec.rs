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

/// The format this build writes. Version 2 added lease ids to key-values,
/// versions, changelog mutations and puts (see [`added_in_2`]).
pub const FORMAT: u8 = 2;
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
    // Versions 1 and 2 differ only in fields version 2 added, which a
    // version-1 body lacks: the layout tells those fields (see
    // [`added_in_2`]) to take their defaults without reading.
    with_layout(version, || postcard::from_bytes(body)).map_err(|e| FormatError::Malformed {
        what: what.to_string(),
        version,
        reason: e.to_string(),
    })
}

thread_local! {
    /// The layout being encoded or decoded on this thread (see [`with_layout`]).
    static LAYOUT: std::cell::Cell<u8> = const { std::cell::Cell::new(FORMAT) };
}

/// Runs `f` (an encoding or a decoding) in the field layout of record format
/// `version`: fields added after `version` are neither written nor read
/// (decoded as their defaults). Encoding and decoding outside it use the
/// current layout. The wire formats map their versions onto these
/// (`armada_server::node::wire`).
pub fn with_layout<R>(version: u8, f: impl FnOnce() -> R) -> R {
    let before = LAYOUT.with(|l| l.replace(version));
    let out = f();
    LAYOUT.with(|l| l.set(before));
    out
}

/// The layout in effect (see [`with_layout`]).
pub fn current_layout() -> u8 {
    LAYOUT.with(|l| l.get())
}

/// `#[serde(default, with = "crate::codec::added_in_2")]` on a field that
/// format 2 added: in a compact (postcard) encoding under a layout before 2
/// the field takes no bytes and decodes as its default; in a human-readable
/// one (JSON) it is an ordinary field.
pub mod added_in_2 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    fn absent(human_readable: bool) -> bool {
        !human_readable && super::current_layout() < 2
    }

    pub fn serialize<T: Serialize, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        if absent(s.is_human_readable()) {
            // postcard writes nothing for a unit.
            return s.serialize_unit();
        }
        v.serialize(s)
    }

    pub fn deserialize<'de, T: Deserialize<'de> + Default, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        if absent(d.is_human_readable()) {
            return Ok(T::default());
        }
        T::deserialize(d)
    }
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
    /// A directory of an older format whose records this build reads as
    /// they are: only its marker was changed.
    Marked { from: u8 },
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
        // Records carry their own versions from 1 on: marking the directory
        // with the current format is the whole upgrade (a build that reads
        // only older formats then refuses it, as it must, since what this
        // build writes next it could not read).
        Some(v) if v.len() == 1 && (FORMAT_OLDEST..FORMAT).contains(&v[0]) => {
            let mut b = WriteBatch::new();
            b.put(FORMAT_KEY.to_vec(), vec![FORMAT]);
            engine.write(b)?;
            return Ok(Opened::Marked { from: v[0] });
        }
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
        assert!(e.to_string().contains("format version 3 is not one this build reads"), "{e}");
        bytes[0] = 0;
        assert!(matches!(decode::<Sample>(&bytes, "x"), Err(FormatError::Unknown { version: 0, .. })));
        assert!(matches!(decode::<Sample>(&[], "x"), Err(FormatError::Empty { .. })));
        assert!(matches!(decode::<Sample>(&[FORMAT, 9], "x"), Err(FormatError::Malformed { version: FORMAT, .. })));
    }

    #[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
    struct Grown {
        a: u64,
        #[serde(default, with = "added_in_2")]
        b: u64,
        c: Vec<u8>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct GrownV1 {
        a: u64,
        c: Vec<u8>,
    }

    /// A version-1 record of a type that version 2 grew decodes with the
    /// new field at its default, nested or not; under layout 1 the type
    /// encodes exactly as version 1 did (what a node answers a peer of the
    /// previous release).
    #[test]
    fn fields_added_in_2_are_absent_from_version_1_records() {
        let old = vec![GrownV1 { a: 7, c: vec![1, 2] }, GrownV1 { a: 8, c: vec![] }];
        let mut bytes = vec![1u8];
        bytes.extend(postcard::to_stdvec(&old).unwrap());
        let back: Vec<Grown> = decode(&bytes, "grown").unwrap();
        assert_eq!(back, vec![Grown { a: 7, b: 0, c: vec![1, 2] }, Grown { a: 8, b: 0, c: vec![] }]);
        let new = Grown { a: 1, b: 9, c: vec![3] };
        assert_eq!(decode::<Grown>(&encode(&new), "grown").unwrap(), new);
        let as_v1 = with_layout(1, || postcard::to_stdvec(&new).unwrap());
        assert_eq!(as_v1, postcard::to_stdvec(&GrownV1 { a: 1, c: vec![3] }).unwrap());
        assert_eq!(current_layout(), FORMAT, "the layout is restored");
    }

    #[test]
    fn a_version_1_directory_is_marked_with_the_current_format() {
        let e = MemEngine::new();
        let mut b = WriteBatch::new();
        b.put(FORMAT_KEY.to_vec(), vec![1]);
        e.write(b).unwrap();
        assert_eq!(open_storage(&e).unwrap(), Opened::Marked { from: 1 });
        assert_eq!(open_storage(&e).unwrap(), Opened::Current);
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
        assert!(err.to_string().contains("format version 3, which this build cannot read"), "{err}");
        let mut b = WriteBatch::new();
        b.put(FORMAT_KEY.to_vec(), b"bogus".to_vec());
        e.write(b).unwrap();
        assert!(matches!(open_storage(&e), Err(OpenError::Marker(_))));
    }
}
