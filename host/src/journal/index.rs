//! The in-memory index over the journal file: which plugin versions and devices exist, and
//! where each device's event and snapshot records live.
//!
//! It holds only durable records: recovery builds it from the file, and afterwards only the
//! writer changes it, after the fsync that made a batch durable. Its cost is 8 bytes per event
//! (the record's offset) plus a small entry per device and per snapshot.

use std::collections::HashMap;
use std::sync::Arc;

use super::record::Record;

/// A plugin version as recorded in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// JSON configuration given at provisioning.
    pub config: Arc<[u8]>,
    pub created_at_ms: u64,
    /// `events[i]` is the offset of the record with seq `i + 1`: seqs are dense from 1.
    pub events: Vec<u64>,
    /// `(seq, version, offset)` of each snapshot, in seq order.
    pub snapshots: Vec<SnapshotRef>,
    /// Offsets of the device's most recent dead letters (at most [`DEAD_LETTERS_KEPT`]).
    pub dead_letters: std::collections::VecDeque<u64>,
}

/// The most seqs one kind-8 record may stand for (salvage writes longer runs as several), so
/// a damaged run length cannot make the index allocate without bound.
pub const MAX_LOST_RUN: u64 = 1 << 24;

/// Dead letters indexed per device; older ones stay in the journal but are not listed.
pub const DEAD_LETTERS_KEPT: usize = 100;

/// Where a snapshot lives and what it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotRef {
    pub seq: u64,
    pub version: u32,
    pub offset: u64,
}

impl DeviceInfo {
    /// The seq of the device's last durable event (0 if none).
    pub fn seq(&self) -> u64 {
        self.events.len() as u64
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
    },
    /// Seqs `from..=to` lost to media damage (a salvage's kind-8 record).
    Lost {
        device: u32,
        from: u64,
        to: u64,
    },
}

/// The index proper. See the module docs. Cloned only by recovery, which checks the records
/// after a damaged one against a copy before deciding anything.
#[derive(Debug, Default, Clone)]
pub struct Index {
    pub versions: Vec<VersionInfo>,
    pub devices: HashMap<u32, DeviceInfo>,
    pub by_id: HashMap<Arc<str>, u32>,
    /// One past the highest device number ever recorded, removed devices included: numbers
    /// are never reused, so an old record can never be taken for a new device's.
    pub next_num: u32,
    /// Numbers of removed devices: a checkpoint that still lists one is not taken for a
    /// device whose records were lost.
    pub removed: std::collections::HashSet<u32>,
    /// Length of the durable prefix of the journal file.
    pub durable_len: u64,
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
                if self.by_id.get(id.as_str()).is_some_and(|n| n != num) {
                    return Err(Inconsistency::DuplicateDevice {
                        id: id.clone(),
                        num: *num,
                    });
                }
                IndexEffect::Device(DeviceInfo {
                    num: *num,
                    id: Arc::from(id.as_str()),
                    version: *version,
                    config: Arc::from(config.as_slice()),
                    created_at_ms: *at_ms,
                    events: Vec::new(),
                    snapshots: Vec::new(),
                    dead_letters: Default::default(),
                })
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
                IndexEffect::Event {
                    device: e.device,
                    seq: e.seq,
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
                IndexEffect::Removed { device: *device }
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
                        self.by_id.insert(d.id.clone(), d.num);
                        self.devices.insert(d.num, d);
                    }
                }
            }
            IndexEffect::Event { device, seq } => {
                if let Some(d) = self.devices.get_mut(&device) {
                    debug_assert_eq!(seq, d.seq() + 1, "writer appended out of order");
                    d.events.push(offset);
                }
            }
            IndexEffect::Snapshot {
                device,
                seq,
                version,
            } => {
                if let Some(d) = self.devices.get_mut(&device) {
                    d.snapshots.push(SnapshotRef {
                        seq,
                        version,
                        offset,
                    });
                }
            }
            IndexEffect::DeadLetter { device } => {
                if let Some(d) = self.devices.get_mut(&device) {
                    if d.dead_letters.len() == DEAD_LETTERS_KEPT {
                        d.dead_letters.pop_front();
                    }
                    d.dead_letters.push_back(offset);
                }
            }
            IndexEffect::Removed { device } => {
                if let Some(d) = self.devices.remove(&device) {
                    self.by_id.remove(&d.id);
                }
                self.removed.insert(device);
            }
            IndexEffect::Lost { device, from, to } => {
                if let Some(d) = self.devices.get_mut(&device) {
                    debug_assert_eq!(from, d.seq() + 1, "lost seqs out of order");
                    // Every lost seq points at the one kind-8 record that stands for them.
                    let n = (to - from + 1) as usize;
                    d.events.resize(d.events.len() + n, offset);
                }
            }
        }
    }

    /// The device with this id, if provisioned.
    pub fn device(&self, id: &str) -> Option<&DeviceInfo> {
        self.by_id.get(id).and_then(|n| self.devices.get(n))
    }

    /// The next free device number.
    pub fn next_device_num(&self) -> u32 {
        self.next_num
    }
}
