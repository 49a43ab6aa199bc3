//! The in-memory index over the journal file: which plugin versions and devices exist, and
//! where each device's event and snapshot records live.
//!
//! It holds only durable records: recovery builds it from the file, and afterwards only the
//! writer changes it, after the fsync that made a batch durable (and the spiller, which moves
//! old offsets out to disk). Its memory: a small entry per device, its last
//! [`SNAPSHOTS_KEPT`] snapshots and [`DEAD_LETTERS_KEPT`] dead letters, and 8 bytes per
//! event for the recent events only: older offsets are spilled to run files (see
//! `journal/runs.rs`), which cost 24 bytes per device per run in memory.

use std::sync::Arc;

use thin_vec::ThinVec;

use super::device_table::DeviceTable;
use super::effects::{CommandEntry, DeviceFx, EffectId, Fx, Sent, TimerEntry, TimerKey, VecMap};
use super::record::Record;
use super::runs::{Run, Runs, Spill};

/// A plugin version as recorded in the journal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VersionInfo {
    /// Dense, journal-local id that event and snapshot records refer to.
    pub id: u32,
    pub plugin: String,
    /// Per-plugin version number (1, 2, ...), as shown to users.
    pub number: u32,
    /// sha256 of the component bytes.
    pub digest: [u8; 32],
    pub at_ms: u64,
}

/// A provisioned device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub num: u32,
    pub id: Arc<str>,
    /// The plugin version the device is bound to.
    pub version: u32,
    /// JSON configuration given at provisioning: one shared copy per distinct config (most
    /// devices of a fleet are provisioned alike; see `intern.rs`).
    pub config: Arc<[u8]>,
    pub created_at_ms: u64,
    /// The seq of the device's last durable event (0 if none). Seqs are dense from 1.
    pub seq: u64,
    /// Offsets of the records of the last `tail.len()` seqs (up to `seq`); those of earlier
    /// seqs are in the index's runs.
    ///
    /// This and the next two are `ThinVec`s (length and capacity in the allocation, one
    /// pointer here): a fleet holds one `DeviceInfo` per device (see `device_table.rs`).
    pub tail: ThinVec<u64>,
    /// `(seq, version, offset)` of the last [`SNAPSHOTS_KEPT`] snapshots, in seq order.
    pub snapshots: ThinVec<SnapshotRef>,
    /// Pending timers (see `journal/effects.rs`). In the entry rather than with the rest of
    /// the device's effects in [`Rare`]: a fleet where every device keeps a heartbeat timer
    /// would pay for that block on every device (24 B a timer of the 112 B it cost).
    pub timers: Timers,
    /// What few devices have (messages not yet handled, commands not yet acknowledged,
    /// dead letters); `None` for a device with none. See [`DeviceInfo::with_fx`].
    rare: Option<Box<Rare>>,
}

/// A device's pending timers by key (see `journal/effects.rs`).
pub type Timers = VecMap<TimerKey, TimerEntry>;

/// The part of a device's entry that most devices never need.
#[derive(Debug, Clone, Default)]
struct Rare {
    /// Messages this device sent whose target has not handled them yet.
    sent: VecMap<EffectId, Sent>,
    /// Commands not yet acknowledged (nor expired).
    outbox: VecMap<EffectId, CommandEntry>,
    /// Offsets of the device's most recent dead letters (at most [`DEAD_LETTERS_KEPT`]),
    /// undeliverable messages included, oldest first.
    dead_letters: ThinVec<u64>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.sent.is_empty() && self.outbox.is_empty() && self.dead_letters.is_empty()
    }
}

/// The most seqs one kind-8 record may stand for (salvage writes longer runs as several), so
/// a damaged run length cannot make the index allocate without bound.
pub const MAX_LOST_RUN: u64 = 1 << 24;

/// Dead letters indexed per device; older ones stay in the journal but are not listed.
pub const DEAD_LETTERS_KEPT: usize = 100;

/// Snapshots indexed per device. Older ones stay in the journal; a rebuild that needs the
/// state at an older seq replays from `init` instead (a rebuild tries at most three).
pub const SNAPSHOTS_KEPT: usize = 8;

/// Where a snapshot lives and what it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotRef {
    pub seq: u64,
    pub version: u32,
    pub offset: u64,
}

impl DeviceInfo {
    /// A device provisioned with no records yet.
    pub fn new(
        num: u32,
        id: Arc<str>,
        version: u32,
        config: Arc<[u8]>,
        created_at_ms: u64,
    ) -> DeviceInfo {
        DeviceInfo {
            num,
            id,
            version,
            config,
            created_at_ms,
            seq: 0,
            tail: ThinVec::new(),
            snapshots: ThinVec::new(),
            timers: VecMap::default(),
            rare: None,
        }
    }

    /// Offsets of the device's most recent dead letters, oldest first.
    pub fn dead_letters(&self) -> &[u64] {
        self.rare.as_deref().map_or(&[], |r| &r.dead_letters)
    }

    /// Messages this device sent that are not handled yet, if any.
    pub fn sent(&self) -> Option<&VecMap<EffectId, Sent>> {
        self.rare.as_deref().map(|r| &r.sent)
    }

    /// Commands not yet acknowledged, if any.
    pub fn outbox(&self) -> Option<&VecMap<EffectId, CommandEntry>> {
        self.rare.as_deref().map(|r| &r.outbox)
    }

    /// What the device still owes, counted as its removal drops it: messages its targets
    /// have not handled, commands not acknowledged (a removal first drops those past their
    /// time to live, as a read of the outbox does), timers pending.
    fn owed_at_removal(&self) -> Cancelled {
        Cancelled {
            messages: self
                .sent()
                .map_or(0, |s| s.values().filter(|s| s.owed_to().is_some()).count()),
            commands: self.outbox().map_or(0, |o| o.len()),
            timers: self.timers.len(),
        }
    }

    /// A copy of what the device owes or is owed (`None`: nothing).
    pub fn fx(&self) -> Option<DeviceFx> {
        let fx = DeviceFx {
            timers: self.timers.clone(),
            sent: self.sent().cloned().unwrap_or_default(),
            outbox: self.outbox().cloned().unwrap_or_default(),
        };
        (!fx.is_empty()).then_some(fx)
    }

    /// Runs `f` on what the device owes or is owed, as one [`DeviceFx`], and keeps the
    /// result. The parts are moved out of the entry and back (pointers, no copy), however
    /// `f` ends (a panic included: the index outlives it), and a block left empty is freed.
    pub fn with_fx<R>(&mut self, f: impl FnOnce(&mut DeviceFx) -> R) -> R {
        struct Back<'a> {
            info: &'a mut DeviceInfo,
            fx: DeviceFx,
        }
        impl Drop for Back<'_> {
            fn drop(&mut self) {
                self.info.set_fx(std::mem::take(&mut self.fx));
            }
        }
        let mut fx = DeviceFx {
            timers: std::mem::take(&mut self.timers),
            ..DeviceFx::default()
        };
        if let Some(r) = self.rare.as_deref_mut() {
            fx.sent = std::mem::take(&mut r.sent);
            fx.outbox = std::mem::take(&mut r.outbox);
        }
        let mut back = Back { info: self, fx };
        f(&mut back.fx)
    }

    /// Replaces what the device owes or is owed.
    pub fn set_fx(&mut self, fx: DeviceFx) {
        let DeviceFx {
            timers,
            sent,
            outbox,
        } = fx;
        self.timers = timers;
        if sent.is_empty() && outbox.is_empty() && self.rare.is_none() {
            return;
        }
        let rare = self.rare.get_or_insert_with(Default::default);
        rare.sent = sent;
        rare.outbox = outbox;
        if rare.is_empty() {
            self.rare = None;
        }
    }

    /// Replaces the device's dead letters (offsets, oldest first).
    pub fn set_dead_letters(&mut self, dead_letters: ThinVec<u64>) {
        if dead_letters.is_empty() && self.rare.is_none() {
            return;
        }
        let rare = self.rare.get_or_insert_with(Default::default);
        rare.dead_letters = dead_letters;
        if rare.is_empty() {
            self.rare = None;
        }
    }

    /// The seq of the device's last durable event (0 if none).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The first seq whose offset is in [`DeviceInfo::tail`] rather than in a run.
    fn tail_from(&self) -> u64 {
        self.seq + 1 - self.tail.len() as u64
    }

    /// Indexes the dead letter at `offset`, forgetting the oldest past [`DEAD_LETTERS_KEPT`].
    fn keep_dead_letter(&mut self, offset: u64) {
        let letters = &mut self.rare.get_or_insert_with(Default::default).dead_letters;
        if letters.len() == DEAD_LETTERS_KEPT {
            letters.remove(0);
        }
        letters.push(offset);
    }

    /// The newest snapshot of `version` taken at or before `seq`.
    pub fn snapshot_at(&self, seq: u64, version: u32) -> Option<SnapshotRef> {
        self.snapshots
            .iter()
            .rev()
            .find(|s| s.seq <= seq && s.version == version)
            .copied()
    }
}

/// What a removed device still owed when its removal became durable, and so will never be
/// done: messages not yet handled by their targets (a target drops any copy that reaches it
/// afterwards), commands not yet acknowledged, timers pending. See `crate::removal`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Cancelled {
    pub messages: usize,
    pub commands: usize,
    pub timers: usize,
}

/// What the index learns when a record becomes durable.
#[derive(Debug, Default)]
pub enum IndexEffect {
    #[default]
    None,
    Version(VersionInfo),
    Device(DeviceInfo),
    Event {
        device: u32,
        seq: u64,
        /// The origin and effects of a kind-9 record, with the event's time.
        fx: Option<Box<(u64, Fx)>>,
    },
    Snapshot {
        device: u32,
        seq: u64,
        version: u32,
    },
    DeadLetter {
        device: u32,
    },
    Removed {
        device: u32,
        /// Where the removal learns what the device still owed as it left, read from its
        /// entry as the entry goes (`None` when records are folded at an open).
        cancelled: Option<Arc<std::sync::OnceLock<Cancelled>>>,
    },
    /// Seqs `from..=to` lost to media damage (a salvage's kind-8 record).
    Lost {
        device: u32,
        from: u64,
        to: u64,
    },
    /// Message `id` of `device` was undeliverable (kind 10).
    Undeliverable {
        device: u32,
        id: EffectId,
    },
    /// Command `id` of `device` was acknowledged (kind 11).
    CommandAck {
        device: u32,
        id: EffectId,
    },
}

/// The index proper. See the module docs. Cloned only by recovery, which checks the records
/// after a damaged one against a copy before deciding anything.
#[derive(Debug, Default, Clone)]
pub struct Index {
    pub versions: Vec<VersionInfo>,
    /// Devices by number and by id.
    pub devices: DeviceTable,
    /// One past the highest device number ever recorded, removed devices included: numbers
    /// are never reused, so an old record can never be taken for a new device's.
    pub next_num: u32,
    /// Numbers of removed devices: a checkpoint that still lists one is not taken for a
    /// device whose records were lost.
    pub removed: std::collections::HashSet<u32>,
    /// Length of the durable prefix of the journal file.
    pub durable_len: u64,
    /// The offsets spilled out of the devices' tails.
    pub runs: Runs,
    /// Offsets held in all devices' tails.
    pub tail_entries: u64,
    /// Where tails are spilled, and from how many entries on; `None`: never (a read-only
    /// journal, storage without a path, and recovery's copies).
    pub spill: Option<Arc<Spill>>,
    /// After a failed spill: the tail size at which to try again.
    pub spill_retry_at: u64,
    /// Records applied (commit markers are not records).
    pub records: u64,
    /// The commit marker that ends the durable prefix, if the last thing written was one.
    pub last_marker: Option<MarkerAt>,
    /// Position of the last index checkpoint written or loaded (or tried: a failed one
    /// waits for another interval too); see `journal/index_checkpoint.rs`.
    pub checkpoint_at: u64,
    /// Set by an open from an index checkpoint: what the scrub is to check, taken by the
    /// journal when it starts the scrub (see `journal/scrub.rs`).
    pub scrub: Option<super::scrub::Plan>,
}

/// Where a commit marker is, and whether it is known to be synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkerAt {
    /// Where the batch it closes started, as the marker says.
    pub batch_start: u64,
    /// The marker's own offset.
    pub at: u64,
    /// Its end.
    pub end: u64,
    /// Synced (an idle writer's marker is written without a sync, unless an index checkpoint
    /// is due).
    pub synced: bool,
}

/// Where the offsets of seqs `from..=to` of one device are: read with [`Located::offsets`]
/// after the index lock is released.
pub struct Located {
    runs: Runs,
    num: u32,
    from: u64,
    /// Last seq in the runs (those after it are in `tail`).
    runs_to: u64,
    tail: Vec<u64>,
}

impl Located {
    /// The offsets, in seq order.
    pub fn offsets(self) -> std::io::Result<Vec<u64>> {
        let mut out = Vec::with_capacity(
            (self.runs_to + 1).saturating_sub(self.from) as usize + self.tail.len(),
        );
        if self.from <= self.runs_to {
            self.runs
                .read(self.num, self.from, self.runs_to, &mut out)?;
            let want = (self.runs_to - self.from + 1) as usize;
            if out.len() != want {
                return Err(std::io::Error::other(format!(
                    "the index's runs hold {} of the {want} offsets of device {} from seq {}",
                    out.len(),
                    self.num,
                    self.from
                )));
            }
        }
        out.extend_from_slice(&self.tail);
        Ok(out)
    }
}

/// A spill in progress: the tail prefix of each device copied out of the index.
pub struct SpillPlan {
    devices: Vec<(u32, u64, Vec<u64>)>,
}

/// Why a well-formed record does not fit the records before it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Inconsistency {
    #[error("record refers to unknown device {0}")]
    UnknownDevice(u32),
    #[error("record refers to unknown plugin version {0}")]
    UnknownVersion(u32),
    #[error("device {device} expected seq {expected}, found {found}")]
    SeqGap {
        device: u32,
        expected: u64,
        found: u64,
    },
    #[error("plugin version id {0} recorded twice")]
    DuplicateVersion(u32),
    #[error("device `{id}` provisioned again under another number ({num})")]
    DuplicateDevice { id: String, num: u32 },
    /// More effects than an index can number (4,096; this host writes at most 1,024 per
    /// event), or a seq beyond what effect ids can hold (2^52; see `effects::indexable`): a
    /// record this host cannot have written.
    #[error(
        "device {device} record {seq} ({effects} effects) is beyond what can be indexed: \
         at most 4,096 effects and a seq below 2^52"
    )]
    Unindexable {
        device: u32,
        seq: u64,
        effects: usize,
    },
}

impl Index {
    /// Turns a decoded record into its index effect, checking it against what came before.
    /// Recovery uses this so that a record that decodes but does not fit is not applied.
    pub fn effect_of(&self, record: &Record) -> Result<IndexEffect, Inconsistency> {
        Ok(match record {
            Record::Version {
                id,
                plugin,
                number,
                digest,
                at_ms,
            } => {
                if (*id as usize) != self.versions.len() {
                    return Err(Inconsistency::DuplicateVersion(*id));
                }
                IndexEffect::Version(VersionInfo {
                    id: *id,
                    plugin: plugin.clone(),
                    number: *number,
                    digest: *digest,
                    at_ms: *at_ms,
                })
            }
            Record::Device {
                num,
                id,
                version,
                config,
                at_ms,
            } => {
                self.check_version(*version)?;
                if self.devices.num_of(id).is_some_and(|n| n != *num) {
                    return Err(Inconsistency::DuplicateDevice {
                        id: id.clone(),
                        num: *num,
                    });
                }
                IndexEffect::Device(DeviceInfo::new(
                    *num,
                    Arc::from(id.as_str()),
                    *version,
                    super::intern::CONFIGS.intern(config),
                    *at_ms,
                ))
            }
            Record::Event(e) => {
                self.check_version(e.version)?;
                let device = self
                    .devices
                    .get(&e.device)
                    .ok_or(Inconsistency::UnknownDevice(e.device))?;
                if e.seq != device.seq() + 1 {
                    return Err(Inconsistency::SeqGap {
                        device: e.device,
                        expected: device.seq() + 1,
                        found: e.seq,
                    });
                }
                if let Some(fx) = &e.fx
                    && !super::effects::indexable(e.seq, fx.effects.len())
                {
                    return Err(Inconsistency::Unindexable {
                        device: e.device,
                        seq: e.seq,
                        effects: fx.effects.len(),
                    });
                }
                IndexEffect::Event {
                    device: e.device,
                    seq: e.seq,
                    fx: e.fx.as_ref().map(|fx| Box::new((e.at_ms, fx.clone()))),
                }
            }
            // Written after the device's removal (an acknowledgement or an undeliverable
            // message racing it): about nothing any more, and no damage.
            Record::Undeliverable { device, .. } | Record::CommandAck { device, .. }
                if self.removed.contains(device) =>
            {
                IndexEffect::None
            }
            Record::Undeliverable { device, id, .. } => {
                if !self.devices.contains_key(device) {
                    return Err(Inconsistency::UnknownDevice(*device));
                }
                IndexEffect::Undeliverable {
                    device: *device,
                    id: *id,
                }
            }
            Record::CommandAck { device, id, .. } => {
                if !self.devices.contains_key(device) {
                    return Err(Inconsistency::UnknownDevice(*device));
                }
                IndexEffect::CommandAck {
                    device: *device,
                    id: *id,
                }
            }
            Record::Snapshot {
                device,
                seq,
                version,
                ..
            } => {
                self.check_version(*version)?;
                let info = self
                    .devices
                    .get(device)
                    .ok_or(Inconsistency::UnknownDevice(*device))?;
                if *seq > info.seq() {
                    return Err(Inconsistency::SeqGap {
                        device: *device,
                        expected: info.seq(),
                        found: *seq,
                    });
                }
                IndexEffect::Snapshot {
                    device: *device,
                    seq: *seq,
                    version: *version,
                }
            }
            Record::DeadLetter(d) => {
                self.check_version(d.version)?;
                if !self.devices.contains_key(&d.device) {
                    return Err(Inconsistency::UnknownDevice(d.device));
                }
                IndexEffect::DeadLetter { device: d.device }
            }
            Record::Removed { device, .. } => {
                if !self.devices.contains_key(device) {
                    return Err(Inconsistency::UnknownDevice(*device));
                }
                IndexEffect::Removed {
                    device: *device,
                    cancelled: None,
                }
            }
            // Where a marker sits is recovery's business; the index learns nothing from it.
            Record::Commit { .. } => IndexEffect::None,
            Record::Lost {
                device,
                from,
                to,
                version,
                ..
            } => {
                self.check_version(*version)?;
                let info = self
                    .devices
                    .get(device)
                    .ok_or(Inconsistency::UnknownDevice(*device))?;
                if *from != info.seq() + 1 || to < from || to - from >= MAX_LOST_RUN {
                    return Err(Inconsistency::SeqGap {
                        device: *device,
                        expected: info.seq() + 1,
                        found: *from,
                    });
                }
                IndexEffect::Lost {
                    device: *device,
                    from: *from,
                    to: *to,
                }
            }
        })
    }

    fn check_version(&self, version: u32) -> Result<(), Inconsistency> {
        if (version as usize) < self.versions.len() {
            Ok(())
        } else {
            Err(Inconsistency::UnknownVersion(version))
        }
    }

    /// Records that the record behind `effect` is durable at `offset`.
    pub fn apply(&mut self, effect: IndexEffect, offset: u64) {
        self.records += 1;
        match effect {
            IndexEffect::None => {}
            IndexEffect::Version(v) => self.versions.push(v),
            IndexEffect::Device(d) => {
                self.next_num = self.next_num.max(d.num.saturating_add(1));
                // A re-provisioned device keeps its history and rebinds its version.
                match self.devices.get_mut(&d.num) {
                    Some(existing) => {
                        existing.version = d.version;
                        existing.config = d.config;
                    }
                    None => {
                        self.devices.insert(d.num, d);
                    }
                }
            }
            IndexEffect::Event { device, seq, fx } => {
                if let Some(d) = self.devices.get_mut(&device) {
                    debug_assert_eq!(seq, d.seq() + 1, "writer appended out of order");
                    d.tail.push(offset);
                    d.seq += 1;
                    self.tail_entries += 1;
                    if let Some(fx) = fx {
                        let (at_ms, fx) = *fx;
                        d.with_fx(|state| state.fold(seq, at_ms, &fx));
                        if let Some((sender, id)) = fx.delivered() {
                            self.strike_sent(sender, id);
                        }
                    }
                }
            }
            IndexEffect::Undeliverable { device, id } => {
                if let Some(d) = self.devices.get_mut(&device) {
                    d.keep_dead_letter(offset);
                }
                self.strike_sent(device, id);
            }
            IndexEffect::CommandAck { device, id } => {
                // A command acknowledged, or a message settled by an import: ids are unique
                // per device, so at most one of the two maps holds it.
                if let Some(d) = self.devices.get_mut(&device)
                    && d.rare.is_some()
                {
                    d.with_fx(|fx| {
                        fx.outbox.remove(&id);
                        fx.sent.remove(&id);
                    });
                }
            }
            IndexEffect::Snapshot {
                device,
                seq,
                version,
            } => {
                if let Some(d) = self.devices.get_mut(&device) {
                    if d.snapshots.len() == SNAPSHOTS_KEPT {
                        d.snapshots.remove(0);
                    }
                    d.snapshots.push(SnapshotRef {
                        seq,
                        version,
                        offset,
                    });
                }
            }
            IndexEffect::DeadLetter { device } => {
                if let Some(d) = self.devices.get_mut(&device) {
                    d.keep_dead_letter(offset);
                }
            }
            IndexEffect::Removed { device, cancelled } => {
                if let Some(d) = self.devices.remove(&device) {
                    if let Some(slot) = cancelled {
                        let _ = slot.set(d.owed_at_removal());
                    }
                    self.tail_entries -= d.tail.len() as u64;
                }
                self.removed.insert(device);
            }
            IndexEffect::Lost { device, from, to } => {
                if let Some(d) = self.devices.get_mut(&device) {
                    debug_assert_eq!(from, d.seq() + 1, "lost seqs out of order");
                    // Every lost seq points at the one kind-8 record that stands for them.
                    let n = (to - from + 1) as usize;
                    d.tail.resize(d.tail.len() + n, offset);
                    d.seq += n as u64;
                    self.tail_entries += n as u64;
                }
            }
        }
    }

    /// Message `id` of device `sender` was handled or found undeliverable: it is no longer
    /// owed. If the sender's record that sent it is not indexed yet (an import, see
    /// [`Sent::HandledAhead`]), it will not be owed when it is.
    fn strike_sent(&mut self, sender: u32, id: EffectId) {
        let Some(d) = self.devices.get_mut(&sender) else {
            return;
        };
        if id.seq > d.seq {
            d.with_fx(|fx| fx.sent.insert(id, Sent::HandledAhead));
            return;
        }
        if d.rare.is_some() {
            d.with_fx(|fx| fx.sent.remove(&id));
        }
    }

    /// The device with this id, if provisioned.
    pub fn device(&self, id: &str) -> Option<&DeviceInfo> {
        self.devices.by_id(id)
    }

    /// The next free device number.
    pub fn next_device_num(&self) -> u32 {
        self.next_num
    }

    /// Where the offsets of seqs `from..=to` of device `num` are (clamped to its seqs), or
    /// `None` for an unknown device or an empty range.
    pub fn locate(&self, num: u32, from: u64, to: u64) -> Option<Located> {
        let d = self.devices.get(&num)?;
        let (from, to) = (from.max(1), to.min(d.seq));
        if from > to {
            return None;
        }
        let tail_from = d.tail_from();
        let runs_to = to.min(tail_from - 1);
        let tail = if to >= tail_from {
            let start = (from.max(tail_from) - tail_from) as usize;
            d.tail[start..=(to - tail_from) as usize].to_vec()
        } else {
            Vec::new()
        };
        Some(Located {
            runs: if from <= runs_to {
                self.runs.clone()
            } else {
                Runs::default()
            },
            num,
            from,
            runs_to,
            tail,
        })
    }

    /// The offset of seq `seq` of device `num`, if it has one.
    #[cfg(test)]
    pub fn offset_of(&self, num: u32, seq: u64) -> Option<u64> {
        self.locate(num, seq, seq)?.offsets().ok()?.first().copied()
    }

    /// Whether the tails have grown to the spill size (and, after a failed spill, by another
    /// spill's worth since).
    pub fn wants_spill(&self) -> bool {
        self.spill
            .as_ref()
            .is_some_and(|s| self.tail_entries >= s.flush_at.max(self.spill_retry_at))
    }

    /// Whether an index checkpoint is due (see `journal/index_checkpoint.rs`).
    pub fn wants_checkpoint(&self) -> bool {
        self.spill
            .as_ref()
            .is_some_and(|s| s.checkpoints.due(self, false))
    }

    /// Step 1 of a spill: copies every device's tail out (under the read lock).
    pub fn spill_plan(&self) -> SpillPlan {
        let mut devices: Vec<(u32, u64, Vec<u64>)> = self
            .devices
            .values()
            .filter(|d| !d.tail.is_empty())
            .map(|d| (d.num, d.tail_from(), d.tail.to_vec()))
            .collect();
        devices.sort_unstable_by_key(|d| d.0);
        SpillPlan { devices }
    }

    /// A spill could not be written (logged here): the offsets stay in memory, and the next
    /// try waits for another spill's worth.
    pub fn spill_failed(&mut self, e: &std::io::Error) {
        tracing::warn!(error = %e, "journal index: spilling offsets to disk failed; they stay in memory");
        if let Some(spill) = &self.spill {
            self.spill_retry_at = self.tail_entries + spill.flush_at;
        }
    }

    /// Step 3 of a spill: `run` (written from `plan`, step 2, without a lock) takes over the
    /// tail prefixes it holds (under the write lock). A device removed meanwhile is skipped;
    /// its offsets in the run are never read.
    pub fn spilled(&mut self, plan: SpillPlan, run: Arc<Run>) {
        for (num, first_seq, offsets) in plan.devices {
            if let Some(d) = self.devices.get_mut(&num)
                && d.tail_from() == first_seq
                && d.tail.len() >= offsets.len()
            {
                d.tail.drain(..offsets.len());
                if d.tail.capacity() > 2 * d.tail.len() + 8 {
                    d.tail.shrink_to_fit();
                }
                self.tail_entries -= offsets.len() as u64;
            }
        }
        self.spill_retry_at = 0;
        self.runs = self.runs.with(run);
    }

    /// A whole spill at once, then any merge it calls for: for recovery, which owns its index
    /// alone. A failure (a full disk) is logged and leaves the offsets in memory, where they
    /// are as good: the journal still opens. The next try waits for another spill's worth.
    pub fn spill_now(&mut self) {
        let Some(spill) = self.spill.clone() else {
            return;
        };
        // Alone with the index: the tails are moved out, not copied.
        let mut devices: Vec<(u32, u64, ThinVec<u64>)> = self
            .devices
            .values_mut()
            .filter(|d| !d.tail.is_empty())
            .map(|d| (d.num, d.tail_from(), std::mem::take(&mut d.tail)))
            .collect();
        devices.sort_unstable_by_key(|d| d.0);
        match spill.write(devices.iter().map(|(n, f, o)| (*n, *f, o.as_slice()))) {
            Ok(run) => {
                self.tail_entries = 0;
                self.spill_retry_at = 0;
                self.runs = self.runs.with(run);
            }
            Err(e) => {
                for (num, _, tail) in devices {
                    if let Some(d) = self.devices.get_mut(&num) {
                        d.tail = tail;
                    }
                }
                self.spill_failed(&e);
                return;
            }
        }
        if let Some(merged) = spill.merge_tier(&self.runs, &self.removed, 0) {
            self.runs = merged;
        }
    }
}

impl SpillPlan {
    /// The devices' tail prefixes, for [`Spill::write`].
    pub fn devices(&self) -> impl Iterator<Item = (u32, u64, &[u64])> {
        self.devices.iter().map(|(n, f, o)| (*n, *f, o.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provision(index: &mut Index, num: u32, id: &str) -> Result<(), Inconsistency> {
        let effect = index.effect_of(&Record::Device {
            num,
            id: id.into(),
            version: 0,
            config: b"{}".to_vec(),
            at_ms: 0,
        })?;
        index.apply(effect, 0);
        Ok(())
    }

    /// An index with plugin version 0 recorded.
    fn with_version() -> Index {
        let mut index = Index::default();
        let version = index
            .effect_of(&Record::Version {
                id: 0,
                plugin: "p".into(),
                number: 1,
                digest: [0; 32],
                at_ms: 0,
            })
            .unwrap();
        index.apply(version, 0);
        index
    }

    #[test]
    fn an_id_taken_by_another_device_number_is_refused_and_a_rebind_is_not() {
        let mut index = with_version();
        provision(&mut index, 0, "a").unwrap();
        provision(&mut index, 1, "b").unwrap();
        assert!(matches!(
            provision(&mut index, 2, "a"),
            Err(Inconsistency::DuplicateDevice { num: 2, .. })
        ));
        // The same id under its own number is a re-provisioning: kept, one device.
        provision(&mut index, 0, "a").unwrap();
        assert_eq!(index.devices.len(), 2);
        assert_eq!(index.device("a").map(|d| d.num), Some(0));
        assert_eq!(index.device("b").map(|d| d.num), Some(1));
        index.apply(
            IndexEffect::Removed {
                device: 0,
                cancelled: None,
            },
            0,
        );
        assert!(index.device("a").is_none());
        provision(&mut index, 2, "a").unwrap();
        assert_eq!(index.device("a").map(|d| d.num), Some(2));
    }

    #[test]
    fn timers_live_in_the_entry_and_the_rare_block_exists_only_while_it_holds_something() {
        use crate::journal::effects::{CommandEntry, Effect, Origin};
        let mut d = DeviceInfo::new(0, Arc::from("d"), 0, Arc::from(&b"{}"[..]), 0);
        // The entry did not grow for the timers it now holds.
        assert!(std::mem::size_of::<DeviceInfo>() <= 88);
        let fx = |effects| Fx {
            origin: Origin::External,
            effects,
        };
        let set = fx(vec![Effect::SetTimer {
            key: "heartbeat".into(),
            due_ms: 100,
            every_ms: None,
            event: "{}".into(),
        }]);
        d.with_fx(|state| state.fold(1, 0, &set));
        assert!(d.timers.contains_key("heartbeat"));
        assert!(d.rare.is_none(), "a timer alone needs no block");
        // A command and a dead letter need the block; the timer stays where it is.
        let command = fx(vec![Effect::Command {
            payload: "{}".into(),
            ttl_ms: None,
        }]);
        d.with_fx(|state| state.fold(2, 0, &command));
        d.keep_dead_letter(4096);
        assert_eq!(d.outbox().map(VecMap::len), Some(1));
        assert_eq!(d.dead_letters(), [4096]);
        assert!(d.timers.contains_key("heartbeat"));
        let copy = d.fx().expect("owes something");
        assert_eq!((copy.timers.len(), copy.outbox.len()), (1, 1));
        // The command acknowledged: the dead letter keeps the block.
        d.with_fx(|state| state.outbox.remove(&EffectId { seq: 2, index: 0 }));
        assert!(d.rare.is_some() && d.outbox().is_some_and(VecMap::is_empty));
        // Dead letters gone and nothing else in it: the block is freed.
        d.set_dead_letters(ThinVec::new());
        assert!(d.rare.is_none());
        // A checkpoint's copy put back whole.
        let mut whole = copy.clone();
        whole.outbox.insert(
            EffectId { seq: 3, index: 0 },
            CommandEntry {
                at_ms: 0,
                expires_ms: None,
            },
        );
        d.set_fx(whole.clone());
        assert_eq!(d.fx(), Some(whole));
        // A fold that panics half way leaves what it had in the entry, not nothing.
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            d.with_fx(|state| {
                state.outbox.retain(|_, _| false);
                panic!("a fold that fails");
            })
        }));
        assert!(caught.is_err());
        assert_eq!(d.timers.len(), 1, "the timers are back in the entry");
        d.set_fx(DeviceFx::default());
        assert!(d.rare.is_none() && d.timers.is_empty() && d.fx().is_none());
    }

    #[test]
    fn a_record_with_more_effects_or_a_higher_seq_than_ids_can_hold_is_refused() {
        use crate::journal::effects::{Effect, MAX_EFFECT_SEQ, Origin};
        use crate::journal::record::EventRecord;
        let mut index = with_version();
        provision(&mut index, 0, "a").unwrap();
        let timer = |key: &str| Effect::SetTimer {
            key: key.into(),
            due_ms: 1,
            every_ms: None,
            event: "{}".into(),
        };
        let record = |seq: u64, effects: Vec<Effect>| {
            Record::Event(EventRecord {
                device: 0,
                seq,
                at_ms: 0,
                version: 0,
                event: b"{}".to_vec(),
                transitions: vec![],
                lost: false,
                fx: Some(Fx {
                    origin: Origin::External,
                    effects,
                }),
            })
        };
        let many: Vec<Effect> = (0..5000).map(|i| timer(&format!("k{i}"))).collect();
        assert!(matches!(
            index.effect_of(&record(1, many)),
            Err(Inconsistency::Unindexable {
                device: 0,
                seq: 1,
                effects: 5000
            })
        ));
        // A seq beyond the bound (reached only by a record this host cannot have written;
        // here the device's seq is set so the record is otherwise the next one).
        index.devices.get_mut(&0).unwrap().seq = MAX_EFFECT_SEQ;
        assert!(matches!(
            index.effect_of(&record(MAX_EFFECT_SEQ + 1, vec![timer("k")])),
            Err(Inconsistency::Unindexable { .. })
        ));
        // Within bounds it is indexed, timer and all.
        index.devices.get_mut(&0).unwrap().seq = MAX_EFFECT_SEQ - 1;
        let ok = index
            .effect_of(&record(MAX_EFFECT_SEQ, vec![timer("k")]))
            .unwrap();
        index.apply(ok, 0);
        let d = index.devices.get(&0).unwrap();
        assert_eq!(d.timers.get("k").map(|t| t.set().seq), Some(MAX_EFFECT_SEQ));
    }
}
