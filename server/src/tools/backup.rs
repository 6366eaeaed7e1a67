//! `armada backup take|verify` and `armada restore`: online backups of a
//! table to a file, checks of a file, and restore into a new data
//! directory (see `armada_core::backup` for the format).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use armada_core::backup::{BackupEvent, BackupHeader, BackupReader, Restorer};
use armada_proto::v1 as pb;

#[derive(Debug, clap::Subcommand)]
pub enum BackupCmd {
    /// Stream a consistent image of a table from a running node into FILE
    /// (written to FILE.partial, then renamed once complete and checked).
    Take {
        table: String,
        /// Where to write the backup.
        #[arg(long, short = 'f', value_name = "FILE")]
        file: PathBuf,
        /// The node to read from (its armada.v1 API address); the table's
        /// leader gives a backup holding every acknowledged write.
        #[arg(long, env = "ARMADA_ENDPOINT", default_value = "http://127.0.0.1:8443")]
        endpoint: String,
    },
    /// Check a backup file (format, framing, checksum) without restoring it.
    Verify { file: PathBuf },
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The backup file.
    pub file: PathBuf,
    /// A new, empty data directory for one member of the new cluster.
    /// Restore every member from the same file, then start them with the
    /// new cluster's members (`armada leader --data-dir ...`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
}

fn describe(h: &BackupHeader, pairs: u64, bytes: u64) -> String {
    format!(
        "table {:?} at revision {} (compacted at {}), {pairs} stored pairs, {bytes} bytes, from node {}",
        h.table, h.revision, h.compacted, h.source_node
    )
}

/// Reads a backup file through the checker, handing each event to `each`.
fn read_file(
    path: &Path,
    mut each: impl FnMut(BackupEvent) -> anyhow::Result<()>,
) -> anyhow::Result<(BackupHeader, u64, u64)> {
    let mut f = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let mut reader = BackupReader::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut header, mut pairs, mut bytes) = (None, 0u64, 0u64);
    loop {
        let n = f.read(&mut buf).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        for ev in reader.feed(&buf[..n]).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))? {
            match &ev {
                BackupEvent::Header(h) => header = Some(h.clone()),
                BackupEvent::Pairs(p) => pairs += p.len() as u64,
                BackupEvent::End { .. } => {}
            }
            each(ev)?;
        }
    }
    reader.finish().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if let Some(expected) = reader.etcd_sha256() {
        check_etcd_sha256(path, bytes, expected)?;
    }
    let header = header.ok_or_else(|| anyhow::anyhow!("{}: no header", path.display()))?;
    Ok((header, pairs, bytes))
}

/// A file saved by `etcdctl snapshot save` ends with a SHA-256 of all bytes
/// before it: check it.
fn check_etcd_sha256(path: &Path, len: u64, expected: &[u8]) -> anyhow::Result<()> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?.take(len - expected.len() as u64);
    let mut sha = sha2::Sha256::new();
    std::io::copy(&mut f, &mut sha)?;
    if sha.finalize().as_slice() != expected {
        anyhow::bail!("{}: the SHA-256 at its end does not match its contents", path.display());
    }
    Ok(())
}

pub async fn backup(cmd: BackupCmd) -> anyhow::Result<()> {
    match cmd {
        BackupCmd::Take { table, file, endpoint } => {
            let ch = crate::listen::endpoint(&endpoint)
                .map_err(|e| anyhow::anyhow!("invalid endpoint {endpoint:?}: {e}"))?
                .connect()
                .await
                .map_err(|e| anyhow::anyhow!("cannot connect to {endpoint}: {e}"))?;
            let mut client = pb::maintenance_client::MaintenanceClient::new(ch)
                .max_decoding_message_size(armada_core::backup::FRAME_BYTES_MAX + (1 << 20));
            let mut stream = client
                .backup(pb::BackupRequest { table: table.clone() })
                .await
                .map_err(|s| anyhow::anyhow!("backup of {table:?}: {}", s.message()))?
                .into_inner();
            let partial = file.with_extension("partial");
            let mut out = std::io::BufWriter::new(
                std::fs::File::create(&partial)
                    .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", partial.display()))?,
            );
            // Checked as it arrives: a broken stream never becomes FILE.
            let mut reader = BackupReader::new();
            let (mut header, mut pairs, mut bytes) = (None, 0u64, 0u64);
            while let Some(chunk) =
                stream.message().await.map_err(|s| anyhow::anyhow!("backup of {table:?} broke off: {}", s.message()))?
            {
                out.write_all(&chunk.data)?;
                bytes += chunk.data.len() as u64;
                for ev in reader.feed(&chunk.data)? {
                    match ev {
                        BackupEvent::Header(h) => header = Some(h),
                        BackupEvent::Pairs(p) => pairs += p.len() as u64,
                        BackupEvent::End { .. } => {}
                    }
                }
            }
            reader.finish()?;
            out.into_inner().map_err(|e| anyhow::anyhow!("writing {}: {e}", partial.display()))?.sync_all()?;
            std::fs::rename(&partial, &file)?;
            let header = header.ok_or_else(|| anyhow::anyhow!("the backup had no header"))?;
            println!("wrote {}: {}", file.display(), describe(&header, pairs, bytes));
            Ok(())
        }
        BackupCmd::Verify { file } => {
            let (header, pairs, bytes) = read_file(&file, |_| Ok(()))?;
            println!("{} is a complete backup: {}", file.display(), describe(&header, pairs, bytes));
            Ok(())
        }
    }
}

#[cfg(feature = "rocksdb")]
pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let db = args.data_dir.join("db");
    if db.exists() && std::fs::read_dir(&db).map(|mut d| d.next().is_some()).unwrap_or(true) {
        anyhow::bail!("{} already holds a database; restore into a new, empty data directory", db.display());
    }
    std::fs::create_dir_all(&args.data_dir)?;
    let engine =
        crate::storage::rocks::RocksEngine::open(&db).map_err(|e| anyhow::anyhow!("opening {}: {e}", db.display()))?;
    let mut restorer = Restorer::new(&engine)?;
    let mut table_id = None;
    let (header, pairs, bytes) = read_file(&args.file, |ev| {
        table_id = restorer.apply(ev)?.or(table_id);
        Ok(())
    })?;
    let id = table_id.ok_or_else(|| anyhow::anyhow!("the backup ended without its end frame"))?;
    println!(
        "restored into {}: {} (table id {id} in the new cluster)",
        args.data_dir.display(),
        describe(&header, pairs, bytes)
    );
    Ok(())
}
