//! The checkpoint a clean close writes beside the journal: `journal.log.checkpoint`, the
//! file's length then and each device's last seq.
//!
//! The journal only grows (a failed commit is cut back only to its durable length), so the
//! checkpoint's length stays a lower bound of the file for good: recovery never takes
//! anything before it for a torn write, and a file found shorter was cut by something other
//! than a crash (see `journal/recovery.rs`). Its seqs are what salvage marks lost when that
//! happens. Periodic checkpoints of the whole index, so that a restart scans only what came
//! after one, are the next step (issue 9); this is the first half of that file.
//!
//! The file is the checkpoint's JSON, a line break, and the CRC-32 of the JSON in 8 hex
//! digits (format 2): a damaged checkpoint is ignored with a warning, never taken for a file
//! cut short. A format-1 checkpoint (no CRC, written by earlier builds) is still read.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::index::Index;
use super::recovery::side_file;
use super::storage::StorageBackend;

/// What a clean close records beside the journal (see the module docs).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Checkpoint {
    pub format: u32,
    /// The file's length at the close.
    pub len: u64,
    /// Every device.
    pub devices: Vec<CheckpointDevice>,
}

/// One device as a checkpoint records it: enough to provision it again, with its seqs, if its
/// records are lost.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct CheckpointDevice {
    pub num: u32,
    pub id: String,
    /// Plugin version (journal-local id).
    pub version: u32,
    /// The JSON configuration given at provisioning (as bytes: it was validated then).
    pub config: Vec<u8>,
    pub created_at_ms: u64,
    /// Last durable seq.
    pub seq: u64,
}

impl Checkpoint {
    /// Whether the file is shorter than at the close.
    pub fn cut_short(&self, file_len: u64) -> bool {
        self.len > file_len
    }
}

/// Writes the checkpoint of a cleanly closed journal of `len` bytes at `path` (atomically:
/// a new file, synced, renamed over the old one, the directory synced).
pub(super) fn write_checkpoint(path: &Path, index: &Index, len: u64) -> std::io::Result<()> {
    let checkpoint = Checkpoint {
        format: 2,
        len,
        devices: index
            .devices
            .values()
            .map(|d| CheckpointDevice {
                num: d.num,
                id: d.id.to_string(),
                version: d.version,
                config: d.config.to_vec(),
                created_at_ms: d.created_at_ms,
                seq: d.seq(),
            })
            .collect(),
    };
    let target = side_file(path, "checkpoint");
    let tmp = side_file(path, "checkpoint.tmp");
    let json = serde_json::to_vec(&checkpoint)?;
    let mut file = BufWriter::new(File::create(&tmp)?);
    file.write_all(&json)?;
    write!(file, "\n{:08x}\n", crc32fast::hash(&json))?;
    let file = file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &target)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

pub(super) fn read_checkpoint(storage: &dyn StorageBackend) -> Option<Checkpoint> {
    read_checkpoint_of(storage.path()?)
}

/// [`read_checkpoint`] of the journal whose first file is `origin`, before any backend is
/// open on it.
pub(super) fn read_checkpoint_of(origin: &Path) -> Option<Checkpoint> {
    let path = side_file(origin, "checkpoint");
    let bytes = std::fs::read(&path).ok()?;
    let trimmed = bytes.trim_ascii_end();
    let (json, crc) = match trimmed.rsplit(|b| *b == b'\n').next() {
        // `JSON \n CRC`: the CRC line is 8 hex digits after a line break.
        Some(last)
            if last.len() == 8 && trimmed.len() > 8 && trimmed[trimmed.len() - 9] == b'\n' =>
        {
            let json = &trimmed[..trimmed.len() - 9];
            let crc = std::str::from_utf8(last)
                .ok()
                .and_then(|h| u32::from_str_radix(h, 16).ok());
            (json, Some(crc))
        }
        _ => (&bytes[..], None),
    };
    match crc {
        Some(Some(crc)) if crc == crc32fast::hash(json) => {}
        Some(_) => {
            tracing::warn!(path = %path.display(), "damaged journal checkpoint ignored (checksum mismatch)");
            return None;
        }
        None => {}
    }
    match serde_json::from_slice::<Checkpoint>(json) {
        // Format 1 carries no checksum; format 2 must have had one.
        Ok(c) if (c.format == 1 && crc.is_none()) || (c.format == 2 && crc.is_some()) => Some(c),
        Ok(c) => {
            tracing::warn!(path = %path.display(), format = c.format, "journal checkpoint of an unknown format ignored");
            None
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "damaged journal checkpoint ignored");
            None
        }
    }
}
