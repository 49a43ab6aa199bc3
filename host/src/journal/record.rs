//! The on-disk record format.
//!
//! Every record is framed as
//!
//! ```text
//! +-----------+-----------+------------------------------+
//! | len: u32  | crc: u32  | body: `len` bytes            |
//! +-----------+-----------+------------------------------+
//! ```
//!
//! (little endian), where `crc` is the CRC-32 (IEEE, hardware-accelerated by crc32fast) of
//! `body`. The body starts with a one-byte kind; integers in the body
//! are LEB128 varints and byte strings are a varint length followed by the bytes. The frame is
//! what makes a torn write (short `len` or short body) and a flipped bit (crc mismatch)
//! detectable on open; the body format is what keeps a typical event record near 40 bytes of
//! overhead on top of the event and transition JSON.
//!
//! # File header
//!
//! Since format 2 the file starts with a 16-byte header, so the record format can change
//! again without guessing:
//!
//! ```text
//! +----------------------+----------------+------------------------+
//! | magic: b"DROVERJL"   | format: u32 LE | crc32 of the 12 before |
//! +----------------------+----------------+------------------------+
//! ```
//!
//! A file without the magic is format 1 (the first releases): the same records from offset 0.
//! A file with a newer format is refused, naming the format.
//!
//! Devices and plugin versions are interned: a `Device` record gives the device a dense number
//! and a `Version` record gives a plugin version one, and event and snapshot records refer to
//! those numbers instead of repeating names and 32-byte digests.

use std::fmt;

use super::effects::{EffectId, Fx};

/// Size of the `len` + `crc` frame header.
pub const HEADER_LEN: usize = 8;

/// Upper bound of one record's body. Larger bodies are refused before they are written, and a
/// header announcing more is treated as corruption on read.
pub const MAX_BODY_LEN: usize = 64 * 1024 * 1024;

/// The record format this build writes. Format 3 added record kind 6 (a removed device);
/// format 4 added kind 7 (the commit marker that ends every batch) and kind 8 (seqs lost to
/// media damage, written by salvage); format 5 added kinds 9 (an event with its origin and
/// effects), 10 (a message found undeliverable) and 11 (a command acknowledged). Formats 1
/// to 4 are read as they are; a format-2 to -4 file is marked with the newer format before
/// the first batch this build writes to it that needs it, so an older build refuses it by
/// name instead of misreading the new kinds.
pub const FORMAT_VERSION: u32 = 5;

/// The first format with effects (kinds 9 to 11).
pub const EFFECTS_FROM: u32 = 5;

/// Size of the file header.
pub const FILE_HEADER_LEN: usize = 16;

const FILE_MAGIC: [u8; 8] = *b"DROVERJL";

/// The file header of a journal written by this build.
pub fn file_header() -> [u8; FILE_HEADER_LEN] {
    file_header_of(FORMAT_VERSION)
}

/// The file header naming `format`.
pub fn file_header_of(format: u32) -> [u8; FILE_HEADER_LEN] {
    let mut h = [0u8; FILE_HEADER_LEN];
    h[..8].copy_from_slice(&FILE_MAGIC);
    h[8..12].copy_from_slice(&format.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What the start of a journal file says about its format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileHeader {
    /// A header with this format version.
    Present { format: u32 },
    /// No header: a format-1 journal, records from offset 0.
    Legacy,
    /// Empty, or a header cut short by a crash while the file was created.
    Missing,
    /// The magic is there but the checksum of the header does not match: media damage in
    /// the header (its format field cannot be trusted). Refused on open; salvage writes a
    /// new header.
    Damaged,
}

/// Reads and checks the file header of a journal of `len` bytes.
pub fn read_file_header(
    storage: &dyn super::StorageBackend,
    len: u64,
) -> std::io::Result<FileHeader> {
    let n = len.min(FILE_HEADER_LEN as u64) as usize;
    let mut buf = [0u8; FILE_HEADER_LEN];
    storage.read_exact_at(&mut buf[..n], 0)?;
    let expected = file_header();
    if n < FILE_HEADER_LEN && buf[..n.min(8)] == expected[..n.min(8)] {
        return Ok(FileHeader::Missing);
    }
    if buf[..8.min(n)] != FILE_MAGIC[..8.min(n)] || n < 8 {
        return Ok(FileHeader::Legacy);
    }
    let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidData, msg);
    let crc = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
    if crc32fast::hash(&buf[..12]) != crc {
        return Ok(FileHeader::Damaged);
    }
    let format = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if format == 0 || format > FORMAT_VERSION {
        return Err(invalid(format!(
            "the journal is in format {format}; this build reads formats 1 to {FORMAT_VERSION} \
             (was it written by a newer Drover?)"
        )));
    }
    Ok(FileHeader::Present { format })
}

const KIND_VERSION: u8 = 1;
const KIND_DEVICE: u8 = 2;
const KIND_EVENT: u8 = 3;
const KIND_SNAPSHOT: u8 = 4;
const KIND_DEAD_LETTER: u8 = 5;
const KIND_REMOVED: u8 = 6;
const KIND_COMMIT: u8 = 7;
const KIND_LOST: u8 = 8;
const KIND_EVENT_FX: u8 = 9;
const KIND_UNDELIVERABLE: u8 = 10;
const KIND_COMMAND_ACK: u8 = 11;

/// The largest framed commit marker: header, kind and two 10-byte varints.
pub const MAX_COMMIT_LEN: usize = HEADER_LEN + 1 + 10 + 10;

/// One journal record, decoded.
#[derive(Clone, PartialEq, Eq)]
pub enum Record {
    /// A plugin version became known: `id` is its dense number in this journal.
    Version {
        id: u32,
        plugin: String,
        number: u32,
        digest: [u8; 32],
        at_ms: u64,
    },
    /// A device was provisioned (or re-bound to another plugin version).
    Device {
        num: u32,
        id: String,
        version: u32,
        config: Vec<u8>,
        at_ms: u64,
    },
    /// One handled event and the transitions it produced.
    Event(EventRecord),
    /// The guest's snapshot of a device right after record `seq`.
    Snapshot {
        device: u32,
        seq: u64,
        version: u32,
        data: Vec<u8>,
    },
    /// An event the device's plugin failed on (trap, timeout, oversized output): not
    /// applied, no seq used, kept so the failure is visible and the event can be re-sent.
    DeadLetter(DeadLetter),
    /// Device `device` was removed (format 3): its earlier records stay in the file but no
    /// longer belong to any device, and its id may be provisioned again (as a new device).
    Removed { device: u32, at_ms: u64 },
    /// The end of one commit (format 4): the writer ends every batch with it, in the same
    /// write. `offset` is where this marker itself starts, `batch_start` where the batch's
    /// first record starts (equal to `offset` for the empty batch written at a clean close).
    /// A marker proves that the commit before its batch finished (the writer starts a batch
    /// only after the previous one's `fdatasync` returned), which is how recovery tells the
    /// bytes a crash could have torn from media damage (see `journal/recovery.rs`).
    Commit { offset: u64, batch_start: u64 },
    /// Seqs `from..=to` of `device` were acknowledged once but their records were destroyed
    /// by media damage; written by salvage (format 4) so the seqs are never used again.
    /// Replay applies nothing for them. `damaged_at` is the offset of the damage in the
    /// original file, `at_ms` when the salvage ran.
    Lost {
        device: u32,
        from: u64,
        to: u64,
        version: u32,
        damaged_at: u64,
        at_ms: u64,
    },
    /// Message `id` of device `device` could not be delivered to `to` (format 5): it is
    /// struck from the sender's undelivered messages and listed with its dead letters.
    Undeliverable {
        device: u32,
        id: EffectId,
        at_ms: u64,
        to: String,
        reason: String,
    },
    /// Command `id` of device `device` was acknowledged (format 5): it leaves the outbox.
    CommandAck {
        device: u32,
        id: EffectId,
        at_ms: u64,
    },
}

/// An event a plugin failed on; not applied, no seq used.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct DeadLetter {
    pub device: u32,
    /// The device's last durable seq when the event failed (the event came after it).
    pub after_seq: u64,
    pub at_ms: u64,
    /// The plugin version (journal-local id) that failed on it.
    pub version: u32,
    /// The input event, JSON text as received.
    pub event: Vec<u8>,
    /// The error's code (`trap`, `timeout`, ...).
    pub code: String,
    pub message: String,
}

/// One handled event: the unit of replay and of acknowledgement.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct EventRecord {
    pub device: u32,
    pub seq: u64,
    pub at_ms: u64,
    /// The plugin version (journal-local number) that decided on this event.
    pub version: u32,
    /// The input event, JSON text as received.
    pub event: Vec<u8>,
    /// The transitions, each one JSON document.
    pub transitions: Vec<Vec<u8>>,
    /// A seq whose record was destroyed by media damage and salvaged away (a kind-8 record):
    /// `event` is `null` and there are no transitions. Never set on records being written.
    pub lost: bool,
    /// Where the event came from and the effects it produced (kind 9); `None`: an external
    /// event without effects (kind 3).
    pub fx: Option<Fx>,
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Record::Version {
                id, plugin, number, ..
            } => write!(f, "Version({id}: {plugin} v{number})"),
            Record::Device {
                num, id, version, ..
            } => write!(f, "Device({num}: {id} @ version {version})"),
            Record::Event(e) => write!(f, "Event(device {} seq {})", e.device, e.seq),
            Record::Snapshot { device, seq, .. } => {
                write!(f, "Snapshot(device {device} seq {seq})")
            }
            Record::DeadLetter(d) => {
                write!(
                    f,
                    "DeadLetter(device {} after seq {})",
                    d.device, d.after_seq
                )
            }
            Record::Removed { device, .. } => write!(f, "Removed(device {device})"),
            Record::Commit {
                offset,
                batch_start,
            } => write!(f, "Commit(at {offset}, batch from {batch_start})"),
            Record::Lost {
                device, from, to, ..
            } => write!(f, "Lost(device {device} seqs {from}..={to})"),
            Record::Undeliverable { device, id, to, .. } => write!(
                f,
                "Undeliverable(device {device} message {}.{} to {to})",
                id.seq, id.index
            ),
            Record::CommandAck { device, id, .. } => {
                write!(
                    f,
                    "CommandAck(device {device} effect {}.{} settled)",
                    id.seq, id.index
                )
            }
        }
    }
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame or body ends before its announced end: a torn write.
    #[error("torn record: {0}")]
    Torn(&'static str),
    /// The bytes are complete but wrong: checksum mismatch, unknown kind, bad varint.
    #[error("corrupt record: {0}")]
    Corrupt(&'static str),
}

impl Record {
    /// Appends the framed record (header + body) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        match self {
            Record::Version {
                id,
                plugin,
                number,
                digest,
                at_ms,
            } => {
                out.push(KIND_VERSION);
                put_varint(out, u64::from(*id));
                put_bytes(out, plugin.as_bytes());
                put_varint(out, u64::from(*number));
                out.extend_from_slice(digest);
                put_varint(out, *at_ms);
            }
            Record::Device {
                num,
                id,
                version,
                config,
                at_ms,
            } => {
                out.push(KIND_DEVICE);
                put_varint(out, u64::from(*num));
                put_bytes(out, id.as_bytes());
                put_varint(out, u64::from(*version));
                put_bytes(out, config);
                put_varint(out, *at_ms);
            }
            Record::Event(e) => encode_event_body(
                out,
                EventHead {
                    device: e.device,
                    seq: e.seq,
                    at_ms: e.at_ms,
                    version: e.version,
                },
                &e.event,
                e.fx.as_ref().map(Fx::encode).as_deref(),
                e.transitions.iter().map(Vec::as_slice),
            ),
            Record::Snapshot {
                device,
                seq,
                version,
                data,
            } => {
                out.push(KIND_SNAPSHOT);
                put_varint(out, u64::from(*device));
                put_varint(out, *seq);
                put_varint(out, u64::from(*version));
                put_bytes(out, data);
            }
            Record::DeadLetter(d) => {
                out.push(KIND_DEAD_LETTER);
                put_varint(out, u64::from(d.device));
                put_varint(out, d.after_seq);
                put_varint(out, d.at_ms);
                put_varint(out, u64::from(d.version));
                put_bytes(out, &d.event);
                put_bytes(out, d.code.as_bytes());
                put_bytes(out, d.message.as_bytes());
            }
            Record::Removed { device, at_ms } => {
                out.push(KIND_REMOVED);
                put_varint(out, u64::from(*device));
                put_varint(out, *at_ms);
            }
            Record::Commit {
                offset,
                batch_start,
            } => {
                out.push(KIND_COMMIT);
                put_varint(out, *offset);
                put_varint(out, *batch_start);
            }
            Record::Lost {
                device,
                from,
                to,
                version,
                damaged_at,
                at_ms,
            } => {
                out.push(KIND_LOST);
                put_varint(out, u64::from(*device));
                put_varint(out, *from);
                put_varint(out, *to);
                put_varint(out, u64::from(*version));
                put_varint(out, *damaged_at);
                put_varint(out, *at_ms);
            }
            Record::Undeliverable {
                device,
                id,
                at_ms,
                to,
                reason,
            } => {
                out.push(KIND_UNDELIVERABLE);
                put_varint(out, u64::from(*device));
                put_varint(out, id.seq);
                put_varint(out, u64::from(id.index));
                put_varint(out, *at_ms);
                put_bytes(out, to.as_bytes());
                put_bytes(out, reason.as_bytes());
            }
            Record::CommandAck { device, id, at_ms } => {
                out.push(KIND_COMMAND_ACK);
                put_varint(out, u64::from(*device));
                put_varint(out, id.seq);
                put_varint(out, u64::from(id.index));
                put_varint(out, *at_ms);
            }
        }
        seal(out, start);
    }

    /// Decodes one record from the start of `buf`, returning it and the framed length.
    pub fn decode(buf: &[u8]) -> Result<(Record, usize), DecodeError> {
        let body = frame_body(buf)?;
        let record = decode_body(body, Payloads::Copy)?;
        Ok((record, HEADER_LEN + body.len()))
    }

    /// [`Record::decode`] checked exactly as strictly (frame, checksum, every field, the
    /// transition count), but an event's event and transitions and a snapshot's data come
    /// back empty: what the recovery scan needs (where and whose each record is), without
    /// copying every payload of the journal.
    pub fn decode_head(buf: &[u8]) -> Result<(Record, usize), DecodeError> {
        let body = frame_body(buf)?;
        let record = decode_body(body, Payloads::Skip)?;
        Ok((record, HEADER_LEN + body.len()))
    }

    /// Decodes a damaged record without checking its checksum, for salvage's best guess of
    /// which device and seq it held. What it returns is unverified.
    pub fn decode_unchecked(buf: &[u8]) -> Option<Record> {
        let header: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
        let len = body_len(header).ok()?;
        decode_body(buf.get(HEADER_LEN..HEADER_LEN + len)?, Payloads::Copy).ok()
    }

    /// Decodes a record body (no frame) without any checksum: salvage's guess for a damaged
    /// record whose length field may be the damaged part. Unverified.
    pub fn decode_body_unchecked(body: &[u8]) -> Option<Record> {
        decode_body(body, Payloads::Copy).ok()
    }

    /// The commit marker framed at the start of `buf`, if there is one and it says it sits
    /// at `offset`: the cheap test recovery runs at every byte while it looks for the next
    /// intact commit after damage.
    pub fn commit_at(buf: &[u8], offset: u64) -> Option<u64> {
        let header: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if !(3..=MAX_COMMIT_LEN - HEADER_LEN).contains(&len)
            || buf.get(HEADER_LEN) != Some(&KIND_COMMIT)
        {
            return None;
        }
        match Record::decode(buf.get(..HEADER_LEN + len)?) {
            Ok((
                Record::Commit {
                    offset: at,
                    batch_start,
                },
                _,
            )) if at == offset && batch_start <= offset => Some(batch_start),
            _ => None,
        }
    }

    /// Whether a record kind byte is one this build knows (a cheap filter for resync).
    pub fn known_kind(kind: u8) -> bool {
        (KIND_VERSION..=KIND_COMMAND_ACK).contains(&kind)
    }
}

/// Whose event a record is: the fixed fields of kinds 3 and 9.
#[derive(Debug, Clone, Copy)]
pub struct EventHead {
    pub device: u32,
    pub seq: u64,
    pub at_ms: u64,
    pub version: u32,
}

/// Encodes an event record straight from borrowed parts, so the hot path does not build an
/// owned [`EventRecord`] first. `fx`: the encoded [`Fx`] block (kind 9), if any.
pub fn encode_event<'a>(
    out: &mut Vec<u8>,
    head: EventHead,
    event: &[u8],
    fx: Option<&[u8]>,
    transitions: impl Iterator<Item = &'a [u8]>,
) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    encode_event_body(out, head, event, fx, transitions);
    seal(out, start);
}

fn encode_event_body<'a>(
    out: &mut Vec<u8>,
    head: EventHead,
    event: &[u8],
    fx: Option<&[u8]>,
    transitions: impl Iterator<Item = &'a [u8]>,
) {
    out.push(if fx.is_some() {
        KIND_EVENT_FX
    } else {
        KIND_EVENT
    });
    put_varint(out, u64::from(head.device));
    put_varint(out, head.seq);
    put_varint(out, head.at_ms);
    put_varint(out, u64::from(head.version));
    put_bytes(out, event);
    // Kind 9: the origin and effects, before the transitions (which run to the count).
    if let Some(fx) = fx {
        put_bytes(out, fx);
    }
    // The count goes after the transitions so they can be streamed without a first pass.
    let mut count = 0u64;
    for t in transitions {
        put_bytes(out, t);
        count += 1;
    }
    put_varint(out, count);
}

/// Fills in the frame header of the record that starts at `start`.
fn seal(out: &mut [u8], start: usize) {
    let body = &out[start + HEADER_LEN..];
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Length of the body announced by a frame header, if the header is plausible.
pub fn body_len(header: &[u8; HEADER_LEN]) -> Result<usize, DecodeError> {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len == 0 || len > MAX_BODY_LEN {
        return Err(DecodeError::Corrupt("implausible length"));
    }
    Ok(len)
}

fn frame_body(buf: &[u8]) -> Result<&[u8], DecodeError> {
    let header: &[u8; HEADER_LEN] = buf
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(DecodeError::Torn("short header"))?;
    let len = body_len(header)?;
    let body = buf
        .get(HEADER_LEN..HEADER_LEN + len)
        .ok_or(DecodeError::Torn("short body"))?;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if crc32fast::hash(body) != crc {
        return Err(DecodeError::Corrupt("checksum mismatch"));
    }
    Ok(body)
}

/// Whether [`decode_body`] copies the payloads of events and snapshots out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Payloads {
    Copy,
    Skip,
}

fn decode_body(body: &[u8], payloads: Payloads) -> Result<Record, DecodeError> {
    let copy = |b: &[u8]| {
        if payloads == Payloads::Copy {
            b.to_vec()
        } else {
            Vec::new()
        }
    };
    let mut r = Reader { buf: body };
    let kind = r.u8()?;
    let record = match kind {
        KIND_VERSION => Record::Version {
            id: r.u32()?,
            plugin: r.string()?,
            number: r.u32()?,
            digest: r.array32()?,
            at_ms: r.varint()?,
        },
        KIND_DEVICE => Record::Device {
            num: r.u32()?,
            id: r.string()?,
            version: r.u32()?,
            config: r.bytes()?.to_vec(),
            at_ms: r.varint()?,
        },
        KIND_EVENT | KIND_EVENT_FX => {
            let device = r.u32()?;
            let seq = r.varint()?;
            let at_ms = r.varint()?;
            let version = r.u32()?;
            let event = copy(r.bytes()?);
            // Decoded even when payloads are skipped: the index keeps what effects leave
            // pending (timers, messages, commands).
            let fx = if kind == KIND_EVENT_FX {
                Some(Fx::decode(r.bytes()?).ok_or(DecodeError::Corrupt("bad effects block"))?)
            } else {
                None
            };
            let mut transitions = Vec::new();
            let mut found = 0u64;
            // Transitions run up to the trailing count; a count that disagrees is corruption.
            while r.buf.len() > varint_len_at(r.buf) {
                let t = r.bytes()?;
                if payloads == Payloads::Copy {
                    transitions.push(t.to_vec());
                }
                found += 1;
            }
            let count = r.varint()?;
            if count != found {
                return Err(DecodeError::Corrupt("transition count mismatch"));
            }
            Record::Event(EventRecord {
                device,
                seq,
                at_ms,
                version,
                event,
                transitions,
                lost: false,
                fx,
            })
        }
        KIND_DEAD_LETTER => Record::DeadLetter(DeadLetter {
            device: r.u32()?,
            after_seq: r.varint()?,
            at_ms: r.varint()?,
            version: r.u32()?,
            event: r.bytes()?.to_vec(),
            code: r.string()?,
            message: r.string()?,
        }),
        KIND_SNAPSHOT => Record::Snapshot {
            device: r.u32()?,
            seq: r.varint()?,
            version: r.u32()?,
            data: copy(r.bytes()?),
        },
        KIND_REMOVED => Record::Removed {
            device: r.u32()?,
            at_ms: r.varint()?,
        },
        KIND_COMMIT => Record::Commit {
            offset: r.varint()?,
            batch_start: r.varint()?,
        },
        KIND_LOST => Record::Lost {
            device: r.u32()?,
            from: r.varint()?,
            to: r.varint()?,
            version: r.u32()?,
            damaged_at: r.varint()?,
            at_ms: r.varint()?,
        },
        KIND_UNDELIVERABLE => Record::Undeliverable {
            device: r.u32()?,
            id: EffectId {
                seq: r.varint()?,
                index: r.u32()?,
            },
            at_ms: r.varint()?,
            to: r.string()?,
            reason: r.string()?,
        },
        KIND_COMMAND_ACK => Record::CommandAck {
            device: r.u32()?,
            id: EffectId {
                seq: r.varint()?,
                index: r.u32()?,
            },
            at_ms: r.varint()?,
        },
        _ => return Err(DecodeError::Corrupt("unknown record kind")),
    };
    if !r.buf.is_empty() {
        return Err(DecodeError::Corrupt("trailing bytes"));
    }
    Ok(record)
}

/// Length of the varint at the start of `buf` (the whole buffer if it never terminates).
fn varint_len_at(buf: &[u8]) -> usize {
    buf.iter()
        .position(|b| b & 0x80 == 0)
        .map_or(buf.len(), |i| i + 1)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or(DecodeError::Corrupt("body too short"))?;
        self.buf = rest;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Corrupt("varint too long"))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        u32::try_from(self.varint()?).map_err(|_| DecodeError::Corrupt("number out of range"))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(self.varint()?)
            .map_err(|_| DecodeError::Corrupt("length out of range"))?;
        if len > self.buf.len() {
            return Err(DecodeError::Corrupt("length past end of body"));
        }
        let (b, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(b)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| DecodeError::Corrupt("bad utf-8"))
    }

    fn array32(&mut self) -> Result<[u8; 32], DecodeError> {
        if self.buf.len() < 32 {
            return Err(DecodeError::Corrupt("body too short"));
        }
        let (b, rest) = self.buf.split_at(32);
        self.buf = rest;
        b.try_into().map_err(|_| DecodeError::Corrupt("digest"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Record> {
        vec![
            Record::Version {
                id: 0,
                plugin: "thermostat".into(),
                number: 1,
                digest: [7; 32],
                at_ms: 1_700_000_000_000,
            },
            Record::Device {
                num: 3,
                id: "dev-1".into(),
                version: 0,
                config: br#"{"setpoint":21}"#.to_vec(),
                at_ms: 5,
            },
            Record::Event(EventRecord {
                device: 3,
                seq: 300,
                at_ms: 1_700_000_000_123,
                version: 0,
                event: br#"{"type":"reading","celsius":20.5}"#.to_vec(),
                transitions: vec![b"{}".to_vec(), br#"{"type":"heating_on"}"#.to_vec()],
                lost: false,
                fx: None,
            }),
            Record::Event(EventRecord {
                device: 1,
                seq: 1,
                at_ms: 0,
                version: 2,
                event: b"null".to_vec(),
                transitions: vec![],
                lost: false,
                fx: None,
            }),
            Record::Snapshot {
                device: 3,
                seq: 300,
                version: 0,
                data: vec![1, 2, 3],
            },
            Record::DeadLetter(DeadLetter {
                device: 3,
                after_seq: 300,
                at_ms: 1_700_000_000_999,
                version: 0,
                event: br#"{"type":"poison"}"#.to_vec(),
                code: "trap".into(),
                message: "guest trapped: unreachable".into(),
            }),
            Record::Removed {
                device: 3,
                at_ms: 1_700_000_001_000,
            },
            Record::Commit {
                offset: 1 << 40,
                batch_start: (1 << 40) - 123,
            },
            Record::Lost {
                device: 3,
                from: 301,
                to: 305,
                version: 0,
                damaged_at: 4096,
                at_ms: 1_700_000_002_000,
            },
            Record::Event(EventRecord {
                device: 4,
                seq: 2,
                at_ms: 1_700_000_003_000,
                version: 1,
                event: br#"{"type":"tick"}"#.to_vec(),
                transitions: vec![b"{}".to_vec()],
                lost: false,
                fx: Some(Fx {
                    origin: super::super::effects::Origin::Timer {
                        key: "hb".into(),
                        set: EffectId { seq: 1, index: 0 },
                        due_ms: 1_700_000_002_900,
                        missed: 2,
                    },
                    effects: vec![super::super::effects::Effect::Send {
                        to: "room-1".into(),
                        event: "{}".into(),
                    }],
                }),
            }),
            Record::Undeliverable {
                device: 4,
                id: EffectId { seq: 2, index: 0 },
                at_ms: 1_700_000_003_001,
                to: "room-1".into(),
                reason: "no such device".into(),
            },
            Record::CommandAck {
                device: 4,
                id: EffectId { seq: 2, index: 1 },
                at_ms: 1_700_000_003_002,
            },
        ]
    }

    #[test]
    fn round_trips_every_kind() {
        for record in samples() {
            let mut buf = Vec::new();
            record.encode_into(&mut buf);
            let (back, len) = Record::decode(&buf).expect("decodes");
            assert_eq!(back, record);
            assert_eq!(len, buf.len());
        }
    }

    #[test]
    fn borrowed_event_encoding_matches_owned() {
        for record in samples() {
            let Record::Event(e) = record else { continue };
            let mut a = Vec::new();
            Record::Event(e.clone()).encode_into(&mut a);
            let mut b = Vec::new();
            encode_event(
                &mut b,
                EventHead {
                    device: e.device,
                    seq: e.seq,
                    at_ms: e.at_ms,
                    version: e.version,
                },
                &e.event,
                e.fx.as_ref().map(Fx::encode).as_deref(),
                e.transitions.iter().map(Vec::as_slice),
            );
            assert_eq!(a, b);
        }
    }

    #[test]
    fn a_commit_marker_is_found_only_where_it_says_it_is() {
        let mut buf = vec![0xaa; 5];
        Record::Commit {
            offset: 5,
            batch_start: 2,
        }
        .encode_into(&mut buf);
        assert_eq!(Record::commit_at(&buf[5..], 5), Some(2));
        assert_eq!(Record::commit_at(&buf[5..], 6), None, "misplaced");
        assert_eq!(Record::commit_at(&buf[4..], 4), None);
        let mut largest = Vec::new();
        Record::Commit {
            offset: u64::MAX,
            batch_start: u64::MAX,
        }
        .encode_into(&mut largest);
        assert_eq!(largest.len(), MAX_COMMIT_LEN);
        assert_eq!(Record::commit_at(&largest, u64::MAX), Some(u64::MAX));
    }

    #[test]
    fn every_truncation_is_torn_and_every_flip_is_caught() {
        for record in samples() {
            let mut buf = Vec::new();
            record.encode_into(&mut buf);
            for cut in 0..buf.len() {
                assert!(
                    matches!(Record::decode(&buf[..cut]), Err(DecodeError::Torn(_))),
                    "cut at {cut} of {record:?}"
                );
            }
            for i in 0..buf.len() {
                for bit in 0..8 {
                    let mut bad = buf.clone();
                    bad[i] ^= 1 << bit;
                    assert!(
                        Record::decode(&bad).is_err(),
                        "flip of bit {bit} in byte {i} of {record:?} went unnoticed"
                    );
                }
            }
        }
    }

    /// The recovery scan's head-only decode accepts and refuses exactly what the full decode
    /// does, and differs from it only in leaving payloads out.
    #[test]
    fn decoding_heads_only_checks_as_strictly_and_drops_only_payloads() {
        for record in samples() {
            let mut buf = Vec::new();
            record.encode_into(&mut buf);
            let (head, len) = Record::decode_head(&buf).expect("decodes");
            assert_eq!(len, buf.len());
            let expected = match record.clone() {
                Record::Event(e) => Record::Event(EventRecord {
                    event: Vec::new(),
                    transitions: Vec::new(),
                    ..e
                }),
                Record::Snapshot {
                    device,
                    seq,
                    version,
                    ..
                } => Record::Snapshot {
                    device,
                    seq,
                    version,
                    data: Vec::new(),
                },
                other => other,
            };
            assert_eq!(head, expected);
            for cut in 0..buf.len() {
                assert_eq!(
                    Record::decode_head(&buf[..cut]).err(),
                    Record::decode(&buf[..cut]).err()
                );
            }
            for i in 0..buf.len() {
                let mut bad = buf.clone();
                bad[i] ^= 0x10;
                assert_eq!(
                    Record::decode_head(&bad).err(),
                    Record::decode(&bad).err(),
                    "byte {i} of {record:?}"
                );
            }
        }
        // A transition count that disagrees, behind a valid checksum, is refused by both.
        let Record::Event(e) = &samples()[2] else {
            unreachable!()
        };
        let mut body = Vec::new();
        Record::Event(e.clone()).encode_into(&mut body);
        let mut body = body[HEADER_LEN..].to_vec();
        *body.last_mut().expect("count") += 1;
        let mut framed = (body.len() as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        framed.extend_from_slice(&body);
        assert!(Record::decode(&framed).is_err());
        assert_eq!(
            Record::decode_head(&framed).err(),
            Record::decode(&framed).err()
        );
    }
}
