//! Effects as the journal records them, and the per-device state they leave behind: pending
//! timers, undelivered messages and the command outbox.
//!
//! An event handled by a plugin built against `drover:device@0.2.0` or later may produce effects
//! besides transitions (see `wit/device.wit`). They are part of the event's own journal record
//! (kind 9, which is kind 3 plus an [`Fx`] block), so they are durable exactly when the
//! transitions are, and replay, which folds transitions only, never sees them again.
//!
//! What is still owed after a record is durable is a function of the journal alone, kept per
//! device in the index ([`DeviceFx`]) and rebuilt by recovery like the rest of the index:
//!
//! * **timers**: set by a `SetTimer` effect, replaced by another under the same key, removed
//!   by `CancelTimer` or by the record of their own firing (a periodic timer moves on to its
//!   next due time instead);
//! * **messages sent and not yet handled**: added by a `Send` effect, removed when the
//!   target's record whose origin is that message is durable, or when the message is found
//!   undeliverable (kind 10);
//! * **commands not yet acknowledged**: added by a `Command` effect, removed by an
//!   acknowledgement (kind 11) or when their time to live has passed.
//!
//! Every effect has a stable id, [`EffectId`]: the seq of its record and its index among the
//! record's effects.

use std::num::NonZeroU64;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thin_vec::ThinVec;

use super::intern::TIMER_KEYS;

/// The stable id of one effect: the seq of the record that holds it and its place among that
/// record's effects. With the device id it names the effect across restarts, so receivers can
/// de-duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EffectId {
    pub seq: u64,
    pub index: u32,
}

/// Why an event was handled, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Origin {
    External,
    /// A message from device `sender` (device number `num` in this journal: an id removed
    /// and provisioned again is another device), effect `id` of its journal.
    Message {
        sender: String,
        num: u32,
        id: EffectId,
    },
    /// The firing of this device's timer `key`, set by effect `set`, due at `due_ms`;
    /// `missed` whole periods of a periodic timer are folded into it.
    Timer {
        key: String,
        set: EffectId,
        due_ms: u64,
        missed: u64,
    },
}

/// One effect, as recorded. Payloads (`payload`, `event`) are JSON texts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Effect {
    /// A command for the physical device (JSON), kept in the outbox until acknowledged or
    /// `ttl_ms` after the event.
    Command {
        payload: String,
        ttl_ms: Option<u64>,
    },
    /// A one-way message (an event, JSON) to device `to`.
    Send { to: String, event: String },
    /// Sets (or replaces) timer `key`.
    SetTimer {
        key: String,
        due_ms: u64,
        every_ms: Option<u64>,
        event: String,
    },
    /// Cancels timer `key`.
    CancelTimer { key: String },
}

/// The origin and effects of one event record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fx {
    pub origin: Origin,
    pub effects: Vec<Effect>,
}

impl Fx {
    /// Whether the record needs the effects block at all (an external event without effects
    /// is written as a plain kind-3 record).
    pub fn is_empty(&self) -> bool {
        self.origin == Origin::External && self.effects.is_empty()
    }

    /// Encodes the block: JSON, the same shape the journal API and exports show, so the
    /// record is readable with nothing but the format's description. Effects records are
    /// the minority; the few dozen bytes JSON costs over a binary encoding do not matter.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain owned data (strings, integers) into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a block written by [`Fx::encode`].
    pub fn decode(bytes: &[u8]) -> Option<Fx> {
        serde_json::from_slice(bytes).ok()
    }
}

/// A timer's key as the index keeps it: shared through a small cache (see `intern.rs`), so
/// the key most devices of a fleet use (a `heartbeat`) costs each of them a pointer. Read
/// from a checkpoint, a key is shared like any other.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimerKey(Arc<Box<str>>);

impl TimerKey {
    pub fn new(key: &str) -> TimerKey {
        TimerKey(TIMER_KEYS.intern(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for TimerKey {
    fn from(key: &str) -> TimerKey {
        TimerKey::new(key)
    }
}

impl std::borrow::Borrow<str> for TimerKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for TimerKey {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<TimerKey> for String {
    fn from(key: TimerKey) -> String {
        key.0.to_string()
    }
}

impl std::fmt::Display for TimerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for TimerKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TimerKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TimerKey, D::Error> {
        /// Reads the key in place (no `String` per key when a checkpoint of a million
        /// timers is read back).
        struct Key;
        impl serde::de::Visitor<'_> for Key {
            type Value = TimerKey;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a timer key")
            }
            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<TimerKey, E> {
                Ok(TimerKey::new(key))
            }
        }
        d.deserialize_str(Key)
    }
}

/// A pending timer: 24 bytes, plus its key (a [`TimerKey`]). A fleet may hold a million of
/// them, so the event its firing hands to `handle` is not kept here: it is read from the
/// record that set the timer (effect [`TimerEntry::set`], see [`Fx::timer_event`]) when the
/// timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TimerImage", into = "TimerImage")]
pub struct TimerEntry {
    pub due_ms: u64,
    /// The period of a periodic timer (a period of 0 in a record is taken as 1 ms, as
    /// `decide` clamps what a guest asks for); non-zero so the option costs no extra word.
    pub every_ms: Option<NonZeroU64>,
    /// The effect that set it, in one word (see [`TimerEntry::set`]).
    set: u64,
}

/// Bits of a packed effect id ([`TimerEntry::set`]) that hold the effect's index: an event
/// has at most 1,024 effects (`decide::MAX_EFFECTS`).
const INDEX_BITS: u32 = 12;

/// The highest seq whose effects can set a timer: 2^52 - 1 (4.5 × 10^15 events of one
/// device, centuries at any rate a device can sustain). Recovery and import refuse a
/// record beyond it, or with more effects than [`INDEX_BITS`] can number, as one this host
/// cannot have written.
pub const MAX_EFFECT_SEQ: u64 = (1 << (64 - INDEX_BITS)) - 1;

/// Whether the effects of a record `seq` with `effects` effects can all be indexed.
pub fn indexable(seq: u64, effects: usize) -> bool {
    seq <= MAX_EFFECT_SEQ && effects <= 1 << INDEX_BITS
}

// Every event this host writes can be indexed: its effects are capped below what an index
// can number (the live fold has no way to refuse a record that is already durable).
const _: () = assert!(crate::decide::MAX_EFFECTS <= 1 << INDEX_BITS);

/// A timer as an index checkpoint writes it: the shape it had before its effect id was
/// packed, so checkpoints read the same either way.
#[derive(Serialize, Deserialize)]
struct TimerImage {
    due_ms: u64,
    /// Read leniently: a checkpoint written before periods were non-zero may hold a 0.
    #[serde(deserialize_with = "period_at_least_1ms")]
    every_ms: Option<NonZeroU64>,
    set: EffectId,
}

impl TryFrom<TimerImage> for TimerEntry {
    type Error = String;
    fn try_from(t: TimerImage) -> Result<TimerEntry, String> {
        TimerEntry::new(t.due_ms, t.every_ms, t.set).ok_or_else(|| {
            format!(
                "timer set by effect {:?}: beyond what can be indexed",
                t.set
            )
        })
    }
}

impl From<TimerEntry> for TimerImage {
    fn from(t: TimerEntry) -> TimerImage {
        TimerImage {
            due_ms: t.due_ms,
            every_ms: t.every_ms,
            set: t.set(),
        }
    }
}

/// A timer's period as the index keeps it: a 0 as 1 ms (see [`TimerEntry::every_ms`]).
fn period(every_ms: Option<u64>) -> Option<NonZeroU64> {
    every_ms.and_then(|p| NonZeroU64::new(p.max(1)))
}

/// Reads a period as the index stores it, through [`period`].
fn period_at_least_1ms<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<NonZeroU64>, D::Error> {
    Ok(period(Option::<u64>::deserialize(d)?))
}

impl TimerEntry {
    /// A timer set by effect `set`; `None` if `set` is beyond [`MAX_EFFECT_SEQ`] or its
    /// index does not fit [`INDEX_BITS`] (see [`indexable`]).
    pub fn new(due_ms: u64, every_ms: Option<NonZeroU64>, set: EffectId) -> Option<TimerEntry> {
        let fits = set.seq <= MAX_EFFECT_SEQ && u64::from(set.index) < 1 << INDEX_BITS;
        fits.then_some(TimerEntry {
            due_ms,
            every_ms,
            set: (set.seq << INDEX_BITS) | u64::from(set.index),
        })
    }

    /// The effect that set it: a firing names it, so a firing of a timer since replaced is
    /// recognised and dropped.
    pub fn set(&self) -> EffectId {
        EffectId {
            seq: self.set >> INDEX_BITS,
            index: (self.set & ((1 << INDEX_BITS) - 1)) as u32,
        }
    }

    /// Where a periodic timer goes after a firing at `due_ms` with `missed` periods folded in.
    pub fn next_due(&self, due_ms: u64, missed: u64) -> Option<u64> {
        let every = self.every_ms?.get();
        Some(due_ms.saturating_add(every.saturating_mul(missed.saturating_add(1))))
    }
}

/// One device's timers that fell due, as the journal's index has them: see
/// [`crate::journal::Journal::due_timers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueTimers {
    pub device: std::sync::Arc<str>,
    /// The timers due, by key.
    pub due: Vec<(TimerKey, TimerEntry)>,
    /// When the earliest of the device's other timers is due, if it has any.
    pub next_ms: Option<u64>,
}

/// A command waiting in the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandEntry {
    /// When the command was issued (its event's time).
    pub at_ms: u64,
    /// When it is dropped unacknowledged, if ever.
    pub expires_ms: Option<u64>,
}

/// What a device still owes or is owed, as one value: what folding a record changes, what
/// an index checkpoint writes, what the API reads. The index keeps it in two parts (the
/// timers in the device's entry, the rest in a block few devices need; see
/// `DeviceInfo::with_fx`), so a device that never used effects costs nothing for them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFx {
    pub timers: VecMap<TimerKey, TimerEntry>,
    /// Messages this device sent whose target has not handled them yet: id → target.
    pub sent: VecMap<EffectId, Sent>,
    /// Commands not yet acknowledged (nor expired): id → when issued and until when.
    pub outbox: VecMap<EffectId, CommandEntry>,
}

/// An entry of [`DeviceFx::sent`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sent {
    /// Sent to this device and not handled yet: owed.
    To(String),
    /// A target's record says it handled this message before the record that sent it was
    /// indexed: not owed when it is. Only an import writes records in that order (a
    /// device's records after another's, whatever their causal order); a live journal
    /// never does. Kept in this map so that it costs nothing per device.
    HandledAhead,
}

impl Sent {
    /// The target it is owed to, if it is owed.
    pub fn owed_to(&self) -> Option<&str> {
        match self {
            Sent::To(to) => Some(to),
            Sent::HandledAhead => None,
        }
    }
}

/// Where a message that reached its target stands (see `Journal::message_turn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageTurn {
    /// Owed, and every earlier message of its sender to this target has been handled: its
    /// turn.
    Next,
    /// Owed, but this earlier message of the same sender to the same target is still owed
    /// (it was not handled: it timed out, the target was quarantined, ...). Handling this
    /// one first would break the sender's order; both come again, in order.
    Behind(EffectId),
    /// Handled already, found undeliverable, or its sender is gone: dropped.
    NotOwed,
}

/// A small ordered map in one sorted vector. A device has a handful of timers and owed effects
/// at a time; a `BTreeMap` would allocate a whole node (11 slots, ~1 KiB for timers) for the
/// first one, and a fleet holds one per device. The map is one pointer (an empty one
/// allocates nothing): [`DeviceFx`], three maps, is 24 bytes instead of 72.
///
/// Most maps hold one entry (a device's heartbeat timer), so one entry is a box of just that
/// entry: 32 bytes for a timer, where a `ThinVec` of one (its length and capacity in the
/// allocation) took 48. From the second entry on, the box holds a `ThinVec`. Invariant:
/// `None` when empty, [`Entries::One`] for one entry, [`Entries::Many`] for two or more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VecMap<K, V>(Option<Box<Entries<K, V>>>);

/// The storage of a non-empty [`VecMap`]. An enum rather than a `ThinVec` of one: with a
/// pointer among the entry's fields, the variant tag sits in that pointer's niche, so `One`
/// is the entry's own size.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entries<K, V> {
    One((K, V)),
    Many(ThinVec<(K, V)>),
}

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap(None)
    }
}

impl<K, V> VecMap<K, V> {
    fn as_slice(&self) -> &[(K, V)] {
        match self.0.as_deref() {
            None => &[],
            Some(Entries::One(entry)) => std::slice::from_ref(entry),
            Some(Entries::Many(entries)) => entries,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [(K, V)] {
        match self.0.as_deref_mut() {
            None => &mut [],
            Some(Entries::One(entry)) => std::slice::from_mut(entry),
            Some(Entries::Many(entries)) => entries,
        }
    }

    /// Restores the invariant after entries left a `Many`.
    fn settle(&mut self) {
        let Some(Entries::Many(entries)) = self.0.as_deref_mut() else {
            return;
        };
        if entries.len() >= 2 {
            return;
        }
        match entries.pop() {
            // In the same box.
            Some(entry) => {
                if let Some(b) = self.0.as_deref_mut() {
                    *b = Entries::One(entry);
                }
            }
            None => self.0 = None,
        }
    }
}

impl<K: Ord, V> VecMap<K, V> {
    fn find<Q: Ord + ?Sized>(&self, key: &Q) -> Result<usize, usize>
    where
        K: std::borrow::Borrow<Q>,
    {
        self.as_slice()
            .binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    pub fn get<Q: Ord + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
    {
        self.find(key).ok().map(|i| &self.as_slice()[i].1)
    }

    pub fn get_mut<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: std::borrow::Borrow<Q>,
    {
        let i = self.find(key).ok()?;
        Some(&mut self.as_mut_slice()[i].1)
    }

    pub fn contains_key<Q: Ord + ?Sized>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
    {
        self.find(key).is_ok()
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let i = match self.find(&key) {
            Ok(i) => return Some(std::mem::replace(&mut self.as_mut_slice()[i].1, value)),
            Err(i) => i,
        };
        let Some(entries) = self.0.as_deref_mut() else {
            self.0 = Some(Box::new(Entries::One((key, value))));
            return None;
        };
        if let Entries::One(_) = entries {
            // The second entry: the same box now holds a vector of both.
            let many = Entries::Many(ThinVec::with_capacity(2));
            if let Entries::One(first) = std::mem::replace(entries, many)
                && let Entries::Many(vec) = entries
            {
                vec.push(first);
            }
        }
        if let Entries::Many(vec) = entries {
            // A vector's growth doubles; a device holds a handful of timers at most.
            if vec.len() < 4 {
                vec.reserve_exact(1);
            }
            vec.insert(i, (key, value));
        }
        None
    }

    pub fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
    {
        let i = self.find(key).ok()?;
        match self.0.as_deref_mut()? {
            Entries::One(_) => match self.0.take().map(|b| *b) {
                Some(Entries::One((_, v))) => Some(v),
                _ => None,
            },
            Entries::Many(vec) => {
                let (_, v) = vec.remove(i);
                self.settle();
                Some(v)
            }
        }
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        match self.0.as_deref_mut() {
            Some(Entries::One((k, v))) if !keep(k, v) => self.0 = None,
            None | Some(Entries::One(_)) => {}
            Some(Entries::Many(entries)) => {
                entries.retain(|(k, v)| keep(k, v));
                self.settle();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The entries whose key is below `key`, in key order.
    pub fn before<Q: Ord + ?Sized>(&self, key: &Q) -> impl Iterator<Item = (&K, &V)>
    where
        K: std::borrow::Borrow<Q>,
    {
        let end = self.find(key).unwrap_or_else(|i| i);
        self.as_slice()[..end].iter().map(|(k, v)| (k, v))
    }

    /// In key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.as_slice().iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.as_slice().iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.as_slice().iter().map(|(_, v)| v)
    }

    /// Whether the keys are strictly increasing (a map read from a checkpoint is checked).
    pub fn is_sorted(&self) -> bool {
        self.as_slice().windows(2).all(|w| w[0].0 < w[1].0)
    }
}

impl<K, V> IntoIterator for VecMap<K, V> {
    type Item = (K, V);
    type IntoIter = thin_vec::IntoIter<(K, V)>;

    /// In key order.
    fn into_iter(self) -> Self::IntoIter {
        match self.0.map(|b| *b) {
            None => ThinVec::new().into_iter(),
            Some(Entries::One(entry)) => thin_vec::thin_vec![entry].into_iter(),
            Some(Entries::Many(entries)) => entries.into_iter(),
        }
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for VecMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut map = VecMap::default();
        for (k, v) in iter {
            map.insert(k, v);
        }
        map
    }
}

/// The shape a `ThinVec` of pairs had (a sequence of `(key, value)`), so checkpoints written
/// before read the same. A map read back is checked with [`VecMap::is_sorted`] by its reader;
/// reading does not sort, so a damaged order is found rather than hidden.
impl<K: Serialize, V: Serialize> Serialize for VecMap<K, V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.as_slice())
    }
}

impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for VecMap<K, V> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut entries = ThinVec::<(K, V)>::deserialize(deserializer)?;
        let repr = match entries.len() {
            0 => None,
            1 => entries.pop().map(|entry| Box::new(Entries::One(entry))),
            _ => {
                entries.shrink_to_fit();
                Some(Box::new(Entries::Many(entries)))
            }
        };
        Ok(VecMap(repr))
    }
}

impl DeviceFx {
    pub fn is_empty(&self) -> bool {
        self.timers.is_empty() && self.sent.is_empty() && self.outbox.is_empty()
    }

    /// Folds what record `seq` (at `at_ms`) says about this device's own effects: its
    /// origin when it is a timer firing, then each effect in order. A message origin
    /// concerns the sender's state (see [`Fx::delivered`]).
    pub fn fold(&mut self, seq: u64, at_ms: u64, fx: &Fx) {
        if let Origin::Timer {
            key,
            set,
            due_ms,
            missed,
        } = &fx.origin
            && let Some(timer) = self.timers.get_mut(key.as_str())
            && timer.set() == *set
            && timer.due_ms == *due_ms
        {
            match timer.next_due(*due_ms, *missed) {
                Some(next) => timer.due_ms = next,
                None => {
                    self.timers.remove(key.as_str());
                }
            }
        }
        for (index, effect) in fx.effects.iter().enumerate() {
            let id = EffectId {
                seq,
                index: index as u32,
            };
            match effect {
                Effect::Command { ttl_ms, .. } => {
                    self.outbox.insert(
                        id,
                        CommandEntry {
                            at_ms,
                            expires_ms: ttl_ms.map(|t| at_ms.saturating_add(t)),
                        },
                    );
                }
                Effect::Send { to, .. } => {
                    if self.sent.remove(&id) != Some(Sent::HandledAhead) {
                        self.sent.insert(id, Sent::To(to.clone()));
                    }
                }
                Effect::SetTimer {
                    key,
                    due_ms,
                    every_ms,
                    ..
                } => {
                    // Recovery and import refuse records beyond what can be indexed (see
                    // `indexable`) and a live event has at most 1,024 effects.
                    let Some(timer) = TimerEntry::new(*due_ms, period(*every_ms), id) else {
                        debug_assert!(false, "a timer set by {id:?}, beyond the index's bounds");
                        tracing::error!(?id, "a timer set beyond what the index can number");
                        continue;
                    };
                    // A timer set again (a heartbeat, every event) keeps its key: only a new
                    // key goes through the shared cache and its lock.
                    match self.timers.get_mut(key.as_str()) {
                        Some(pending) => *pending = timer,
                        None => {
                            self.timers.insert(TimerKey::new(key), timer);
                        }
                    }
                }
                Effect::CancelTimer { key } => {
                    self.timers.remove(key.as_str());
                }
            }
        }
    }

    /// Where message `id` of this device stands for its target `to`; an earlier message
    /// for which `in_flight` says yes counts as handled. See [`MessageTurn`].
    pub fn turn(
        &self,
        id: EffectId,
        to: &str,
        in_flight: impl Fn(EffectId) -> bool,
    ) -> MessageTurn {
        Self::turn_in(&self.sent, id, to, in_flight)
    }

    /// [`DeviceFx::turn`] over a device's messages sent ([`DeviceFx::sent`]) alone.
    pub fn turn_in(
        sent: &VecMap<EffectId, Sent>,
        id: EffectId,
        to: &str,
        in_flight: impl Fn(EffectId) -> bool,
    ) -> MessageTurn {
        if sent.get(&id).and_then(Sent::owed_to) != Some(to) {
            return MessageTurn::NotOwed;
        }
        match sent
            .before(&id)
            .find(|(earlier, sent)| sent.owed_to() == Some(to) && !in_flight(**earlier))
        {
            Some((earlier, _)) => MessageTurn::Behind(*earlier),
            None => MessageTurn::Next,
        }
    }

    /// Drops commands whose time to live has passed by `now_ms`; returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let before = self.outbox.len();
        self.outbox
            .retain(|_, c| c.expires_ms.is_none_or(|e| e > now_ms));
        before - self.outbox.len()
    }

    /// Whether every map is in key order (a checkpoint's copy is checked before use).
    pub fn is_well_formed(&self) -> bool {
        self.timers.is_sorted() && self.sent.is_sorted() && self.outbox.is_sorted()
    }
}

impl Fx {
    /// The event of the timer set by effect `index` of this record, if that effect set one.
    pub fn timer_event(&self, index: u32) -> Option<&str> {
        match self.effects.get(index as usize)? {
            Effect::SetTimer { event, .. } => Some(event),
            _ => None,
        }
    }

    /// The message this record handled, if it handled one: (sender's device number, effect
    /// id), to be struck from the sender's [`DeviceFx::sent`].
    pub fn delivered(&self) -> Option<(u32, EffectId)> {
        match &self.origin {
            Origin::Message { num, id, .. } => Some((*num, *id)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_is_written_as_the_vector_it_was_before() {
        for n in 0..4u64 {
            let entries: Vec<(u64, u32)> = (1..=n).map(|k| (k, k as u32 * 10)).collect();
            let map: VecMap<u64, u32> = entries.iter().copied().collect();
            let bytes = postcard::to_allocvec(&map).expect("encodes");
            assert_eq!(bytes, postcard::to_allocvec(&entries).expect("encodes"));
            let back: VecMap<u64, u32> = postcard::from_bytes(&bytes).expect("decodes");
            assert_eq!(back, map, "{n} entries");
            assert_eq!(back.iter().count(), entries.len());
        }
    }

    /// Whether `map` is in the shape its length calls for (see [`VecMap`]).
    fn settled<K, V>(map: &VecMap<K, V>) -> bool {
        match (map.as_slice().len(), map.0.as_deref()) {
            (0, None) | (1, Some(Entries::One(_))) => true,
            (n, Some(Entries::Many(_))) => n >= 2,
            _ => false,
        }
    }

    #[test]
    fn a_map_of_one_timer_is_one_box_of_that_timer_and_keeps_its_shape_through_changes() {
        // The niche: a map of one timer allocates just the 32 bytes of key pointer and timer.
        assert_eq!(std::mem::size_of::<Entries<TimerKey, TimerEntry>>(), 32);
        assert_eq!(std::mem::size_of::<VecMap<TimerKey, TimerEntry>>(), 8);
        let t = |due_ms| TimerEntry::new(due_ms, None, EffectId { seq: 1, index: 0 }).expect("ok");
        let mut map = VecMap::<TimerKey, TimerEntry>::default();
        assert!(settled(&map) && map.is_empty());
        assert_eq!(map.insert("b".into(), t(2)), None);
        assert!(settled(&map) && matches!(map.0.as_deref(), Some(Entries::One(_))));
        assert_eq!(map.insert("b".into(), t(3)).map(|t| t.due_ms), Some(2));
        assert_eq!(map.len(), 1);
        // A key before and one after the first: kept in key order.
        map.insert("a".into(), t(1));
        map.insert("c".into(), t(4));
        assert!(settled(&map));
        let keys: Vec<&str> = map.keys().map(|k| &**k.0).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(map.get("b").map(|t| t.due_ms), Some(3));
        if let Some(t) = map.get_mut("c") {
            t.due_ms = 5;
        }
        assert_eq!(
            map.values().map(|t| t.due_ms).collect::<Vec<_>>(),
            [1, 3, 5]
        );
        assert_eq!(map.before("c").count(), 2);
        assert_eq!(map.remove("b").map(|t| t.due_ms), Some(3));
        assert_eq!(map.remove("b"), None);
        assert!(settled(&map) && map.len() == 2);
        // Back to one: a box of one again.
        assert_eq!(map.remove("a").map(|t| t.due_ms), Some(1));
        assert!(settled(&map) && matches!(map.0.as_deref(), Some(Entries::One(_))));
        assert_eq!(map.get("c").map(|t| t.due_ms), Some(5));
        assert_eq!(map.remove("c").map(|t| t.due_ms), Some(5));
        assert!(settled(&map) && map.is_empty());
        // Retain down to one and to none, from a box of one and from a vector.
        let mut map: VecMap<u64, u64> = (0..5).map(|k| (k, k)).collect();
        map.retain(|&k, _| k == 3);
        assert!(settled(&map) && map.iter().eq([(&3, &3)]));
        map.retain(|_, _| true);
        assert!(settled(&map) && map.len() == 1);
        map.retain(|_, _| false);
        assert!(settled(&map) && map.is_empty());
        let mut map: VecMap<u64, u64> = (0..5).map(|k| (k, k)).collect();
        map.retain(|_, _| false);
        assert!(settled(&map) && map.is_empty());
        let all: Vec<(u64, u64)> = (0..3)
            .map(|k| (k, k))
            .collect::<VecMap<_, _>>()
            .into_iter()
            .collect();
        assert_eq!(all, [(0, 0), (1, 1), (2, 2)]);
        let one: Vec<(u64, u64)> = [(7, 7)]
            .into_iter()
            .collect::<VecMap<_, _>>()
            .into_iter()
            .collect();
        assert_eq!(one, [(7, 7)]);
    }

    #[test]
    fn a_timer_entry_reads_as_it_was_written_before_its_period_was_non_zero() {
        // The shape an index checkpoint held before: the period a plain optional integer.
        #[derive(Serialize)]
        struct Before {
            due_ms: u64,
            every_ms: Option<u64>,
            set: EffectId,
        }
        let set = EffectId { seq: 7, index: 1 };
        for (every, read) in [(None, None), (Some(0), Some(1)), (Some(5_000), Some(5_000))] {
            let bytes = postcard::to_allocvec(&Before {
                due_ms: 42,
                every_ms: every,
                set,
            })
            .expect("encodes");
            let entry: TimerEntry = postcard::from_bytes(&bytes).expect("decodes");
            assert_eq!(entry.due_ms, 42);
            assert_eq!(entry.every_ms.map(NonZeroU64::get), read);
            assert_eq!(entry.set(), set);
            // And what it writes now is what it wrote then (for a period that was not 0).
            if every != Some(0) {
                assert_eq!(postcard::to_allocvec(&entry).expect("encodes"), bytes);
            }
        }
    }

    fn timer(key: &str, due_ms: u64, every_ms: Option<u64>) -> Effect {
        Effect::SetTimer {
            key: key.into(),
            due_ms,
            every_ms,
            event: "{}".into(),
        }
    }

    #[test]
    fn a_replaced_timer_ignores_the_old_ones_firing_and_a_periodic_one_moves_on() {
        let mut fx = DeviceFx::default();
        fx.fold(
            1,
            0,
            &Fx {
                origin: Origin::External,
                effects: vec![timer("a", 100, None), timer("p", 50, Some(10))],
            },
        );
        // Replaced by seq 2 before it fired.
        fx.fold(
            2,
            10,
            &Fx {
                origin: Origin::External,
                effects: vec![timer("a", 200, None)],
            },
        );
        let stale = Fx {
            origin: Origin::Timer {
                key: "a".into(),
                set: EffectId { seq: 1, index: 0 },
                due_ms: 100,
                missed: 0,
            },
            effects: vec![],
        };
        fx.fold(3, 100, &stale);
        assert_eq!(
            fx.timers.get("a").map(|t| t.due_ms),
            Some(200),
            "a stale firing changes nothing"
        );
        // The periodic one fires late, three periods missed: next due 50 + 4 * 10.
        fx.fold(
            4,
            85,
            &Fx {
                origin: Origin::Timer {
                    key: "p".into(),
                    set: EffectId { seq: 1, index: 1 },
                    due_ms: 50,
                    missed: 3,
                },
                effects: vec![],
            },
        );
        assert_eq!(fx.timers.get("p").map(|t| t.due_ms), Some(90));
        // Its own firing record cancels it.
        fx.fold(
            5,
            200,
            &Fx {
                origin: Origin::Timer {
                    key: "a".into(),
                    set: EffectId { seq: 2, index: 0 },
                    due_ms: 200,
                    missed: 0,
                },
                effects: vec![Effect::CancelTimer { key: "p".into() }],
            },
        );
        assert!(fx.timers.is_empty());
    }

    #[test]
    fn the_block_round_trips_and_commands_expire() {
        let block = Fx {
            origin: Origin::Message {
                sender: "room-1".into(),
                num: 3,
                id: EffectId { seq: 7, index: 2 },
            },
            effects: vec![
                Effect::Command {
                    payload: r#"{"heat":true}"#.into(),
                    ttl_ms: Some(1000),
                },
                Effect::Send {
                    to: "t-2".into(),
                    event: "{}".into(),
                },
            ],
        };
        assert_eq!(Fx::decode(&block.encode()), Some(block.clone()));
        assert_eq!(block.delivered(), Some((3, EffectId { seq: 7, index: 2 })));
        let mut fx = DeviceFx::default();
        fx.fold(9, 5000, &block);
        assert_eq!(fx.sent.len(), 1);
        assert_eq!(fx.expire(5999), 0);
        assert_eq!(fx.expire(6000), 1);
        assert!(!fx.is_empty());
    }

    #[test]
    fn a_message_takes_its_turn_only_after_every_earlier_one_to_its_target() {
        let send = |to: &str| Effect::Send {
            to: to.into(),
            event: "{}".into(),
        };
        let mut fx = DeviceFx::default();
        fx.fold(
            1,
            0,
            &Fx {
                origin: Origin::External,
                effects: vec![send("b"), send("c")],
            },
        );
        fx.fold(
            2,
            0,
            &Fx {
                origin: Origin::External,
                effects: vec![send("b")],
            },
        );
        let id = |seq, index| EffectId { seq, index };
        let none = |_| false;
        assert_eq!(fx.turn(id(1, 0), "b", none), MessageTurn::Next);
        // Another target's message does not hold this one back.
        assert_eq!(fx.turn(id(1, 1), "c", none), MessageTurn::Next);
        assert_eq!(fx.turn(id(2, 0), "b", none), MessageTurn::Behind(id(1, 0)));
        // Handled, its record on its way to disk: no longer in the way.
        assert_eq!(fx.turn(id(2, 0), "b", |e| e == id(1, 0)), MessageTurn::Next);
        // Wrong target, unknown id.
        assert_eq!(fx.turn(id(2, 0), "c", none), MessageTurn::NotOwed);
        assert_eq!(fx.turn(id(3, 0), "b", none), MessageTurn::NotOwed);
        // The target's record of the first is durable.
        fx.sent.remove(&id(1, 0));
        assert_eq!(fx.turn(id(2, 0), "b", none), MessageTurn::Next);
    }

    #[test]
    fn timer_keys_share_one_copy_however_they_arrive_and_read_back_as_plain_strings() {
        let set = TimerKey::new("heartbeat");
        // As an index checkpoint reads it back.
        let read: TimerKey = serde_json::from_str(r#""heartbeat""#).expect("a key");
        assert!(Arc::ptr_eq(&set.0, &read.0));
        assert_eq!(
            serde_json::to_string(&read).expect("json"),
            r#""heartbeat""#
        );
        let map: VecMap<TimerKey, u32> =
            serde_json::from_str(r#"[["heartbeat",1],["poll",2]]"#).expect("a map");
        assert_eq!(map.get("poll"), Some(&2));
        assert!(map.keys().any(|k| Arc::ptr_eq(&k.0, &set.0)));
    }

    #[test]
    fn a_timer_keeps_the_effect_that_set_it_exactly_up_to_the_bounds_and_refuses_beyond() {
        let max_index = (1 << INDEX_BITS) - 1;
        for set in [
            EffectId { seq: 0, index: 0 },
            EffectId {
                seq: 1,
                index: 1023,
            },
            EffectId {
                seq: MAX_EFFECT_SEQ,
                index: max_index,
            },
        ] {
            let t = TimerEntry::new(9, NonZeroU64::new(5), set).expect("indexable");
            assert_eq!(
                (t.set(), t.due_ms, t.every_ms),
                (set, 9, NonZeroU64::new(5))
            );
        }
        assert!(
            TimerEntry::new(
                0,
                None,
                EffectId {
                    seq: 1,
                    index: max_index + 1
                }
            )
            .is_none()
        );
        assert!(
            TimerEntry::new(
                0,
                None,
                EffectId {
                    seq: MAX_EFFECT_SEQ + 1,
                    index: 0
                }
            )
            .is_none()
        );
        assert_eq!(std::mem::size_of::<TimerEntry>(), 24);
        assert!(indexable(MAX_EFFECT_SEQ, 1 << INDEX_BITS));
        assert!(!indexable(MAX_EFFECT_SEQ + 1, 1));
        assert!(!indexable(1, (1 << INDEX_BITS) + 1));
    }

    #[test]
    fn index_checkpoints_hold_timers_in_the_shape_they_had_before_ids_were_packed() {
        // The entry as checkpoints wrote it before (postcard is positional: the fields and
        // their order are the format).
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Before {
            due_ms: u64,
            every_ms: Option<u64>,
            set: EffectId,
        }
        let before = Before {
            due_ms: 1_800_000_000_000,
            every_ms: Some(60_000),
            set: EffectId { seq: 77, index: 3 },
        };
        let bytes = postcard::to_stdvec(&before).expect("encode");
        let read: TimerEntry = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(read.set(), before.set);
        assert_eq!(
            (read.due_ms, read.every_ms),
            (before.due_ms, NonZeroU64::new(60_000))
        );
        assert_eq!(postcard::to_stdvec(&read).expect("encode"), bytes);
        // A 0 period of an older checkpoint reads as 1 ms, as before.
        let zero = Before {
            every_ms: Some(0),
            ..before
        };
        let read: TimerEntry =
            postcard::from_bytes(&postcard::to_stdvec(&zero).expect("encode")).expect("decode");
        assert_eq!(read.every_ms, NonZeroU64::new(1));
        // An id beyond what can be packed is refused, not wrapped.
        let beyond = Before {
            set: EffectId {
                seq: MAX_EFFECT_SEQ + 1,
                index: 0,
            },
            ..zero
        };
        let bytes = postcard::to_stdvec(&beyond).expect("encode");
        assert!(postcard::from_bytes::<TimerEntry>(&bytes).is_err());
    }
}
