//! The journal index's devices, by device number.
//!
//! Device numbers are handed out in order and never reused, so they are dense: a table indexed
//! by number holds a device in the size of its [`DeviceInfo`] (88 B), where the hash map it
//! replaces held ~190 B a device at a million of them (a table that doubles is up to half
//! empty, plus a control byte a slot). The table is cut into chunks of [`CHUNK`] slots
//! allocated as numbers reach them, so it never copies itself whole to grow, and a number far
//! beyond the others (a damaged or hand-made journal) costs one chunk and a pointer (8 B) per
//! skipped chunk, not a slot per skipped number. A removed device leaves an empty slot; a
//! chunk whose devices are all removed is freed, so a fleet that churns costs memory for the
//! devices it has, not for every number it ever handed out.
//!
//! Lookups by id go through a hash table of device numbers alone (4 B a slot, hashed and
//! compared through the device's own id), where a `HashMap<Arc<str>, u32>` kept a second
//! 24 B key per device.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use super::index::DeviceInfo;

/// Slots per chunk: 88 KiB of `DeviceInfo`s, small next to a fleet and large next to the
/// pointer that finds it.
const CHUNK: usize = 1024;

/// Devices by number, with the part of `HashMap<u32, DeviceInfo>`'s interface the index
/// uses, and by id. Iteration is in number order. Ids are unique: [`DeviceTable::insert`]
/// expects the caller to have checked (`num_of`).
#[derive(Debug, Default, Clone)]
pub struct DeviceTable {
    chunks: Vec<Option<Chunk>>,
    len: usize,
    by_id: HashTable<u32>,
    hasher: std::hash::RandomState,
}

/// A fixed-size chunk behind one thin pointer.
type Chunk = Box<[Option<DeviceInfo>; CHUNK]>;
type Chunks = [Option<Chunk>];

fn new_chunk() -> Chunk {
    // Built on the heap: a `[None; CHUNK]` on the stack first would be 88 KiB of it.
    let slots: Box<[Option<DeviceInfo>]> = (0..CHUNK).map(|_| None).collect();
    match slots.try_into() {
        Ok(chunk) => chunk,
        Err(_) => unreachable!("collected exactly CHUNK slots"),
    }
}

fn place(num: u32) -> (usize, usize) {
    let n = num as usize;
    (n / CHUNK, n % CHUNK)
}

fn slot(chunks: &Chunks, num: u32) -> Option<&DeviceInfo> {
    let (c, i) = place(num);
    chunks.get(c)?.as_ref()?[i].as_ref()
}

impl DeviceTable {
    pub fn get(&self, num: &u32) -> Option<&DeviceInfo> {
        slot(&self.chunks, *num)
    }

    /// The number of the device with this id.
    pub fn num_of(&self, id: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(id);
        let chunks = &self.chunks;
        self.by_id
            .find(hash, |n| slot(chunks, *n).is_some_and(|d| &*d.id == id))
            .copied()
    }

    /// The device with this id.
    pub fn by_id(&self, id: &str) -> Option<&DeviceInfo> {
        self.num_of(id).and_then(|n| self.get(&n))
    }

    pub fn contains_id(&self, id: &str) -> bool {
        self.num_of(id).is_some()
    }

    /// Takes `num` out of the id table, while its device is still in its slot.
    fn unfile(&mut self, num: u32) {
        let Some(id) = slot(&self.chunks, num).map(|d| d.id.clone()) else {
            return;
        };
        let hash = self.hasher.hash_one(&*id);
        if let Ok(entry) = self.by_id.find_entry(hash, |n| *n == num) {
            entry.remove();
        }
    }

    pub fn get_mut(&mut self, num: &u32) -> Option<&mut DeviceInfo> {
        let (c, i) = place(*num);
        self.chunks.get_mut(c)?.as_mut()?[i].as_mut()
    }

    pub fn contains_key(&self, num: &u32) -> bool {
        self.get(num).is_some()
    }

    /// Puts `info` in slot `num` (which must be `info.num`), returning what was there.
    pub fn insert(&mut self, num: u32, info: DeviceInfo) -> Option<DeviceInfo> {
        debug_assert_eq!(num, info.num, "a device is filed under its own number");
        debug_assert!(
            self.num_of(&info.id).is_none_or(|n| n == num),
            "device ids are unique"
        );
        self.unfile(num);
        let hash = self.hasher.hash_one(&*info.id);
        let (c, i) = place(num);
        if self.chunks.len() <= c {
            self.chunks.resize_with(c + 1, || None);
        }
        let chunk = self.chunks[c].get_or_insert_with(new_chunk);
        let old = chunk[i].replace(info);
        if old.is_none() {
            self.len += 1;
        }
        let (chunks, hasher) = (&self.chunks, &self.hasher);
        self.by_id.insert_unique(hash, num, |n| {
            slot(chunks, *n).map_or(0, |d| hasher.hash_one(&*d.id))
        });
        old
    }

    pub fn remove(&mut self, num: &u32) -> Option<DeviceInfo> {
        self.unfile(*num);
        let (c, i) = place(*num);
        let chunk = self.chunks.get_mut(c)?.as_mut()?;
        let old = chunk[i].take();
        if old.is_some() {
            self.len -= 1;
            // Removals are rare (an operator's `DELETE`): a scan of the chunk is cheap next
            // to keeping a count in every chunk.
            if chunk.iter().all(Option::is_none) {
                self.chunks[c] = None;
            }
        }
        old
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn values(&self) -> impl Iterator<Item = &DeviceInfo> {
        self.chunks
            .iter()
            .flatten()
            .flat_map(|chunk| chunk.iter().flatten())
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut DeviceInfo> {
        self.chunks
            .iter_mut()
            .flatten()
            .flat_map(|chunk| chunk.iter_mut().flatten())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u32, &DeviceInfo)> {
        self.values().map(|d| (&d.num, d))
    }

    pub fn keys(&self) -> impl Iterator<Item = &u32> {
        self.values().map(|d| &d.num)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn device(num: u32) -> DeviceInfo {
        DeviceInfo::new(
            num,
            Arc::from(format!("d{num}")),
            0,
            Arc::from(&b"{}"[..]),
            0,
        )
    }

    #[test]
    fn files_finds_replaces_and_removes_by_number() {
        let mut t = DeviceTable::default();
        assert!(t.len() == 0 && t.get(&0).is_none() && t.remove(&7).is_none());
        for num in [0, 5, 1023, 1024, 3000] {
            assert!(t.insert(num, device(num)).is_none());
        }
        assert_eq!(t.len(), 5);
        assert_eq!(t.get(&1024).map(|d| &*d.id), Some("d1024"));
        assert_eq!(t.num_of("d3000"), Some(3000));
        assert_eq!(t.by_id("d5").map(|d| d.num), Some(5));
        assert!(!t.contains_id("d6") && !t.contains_id(""));
        assert!(t.get(&6).is_none() && t.get(&2048).is_none() && t.get(&9999).is_none());
        t.get_mut(&5).unwrap().seq = 9;
        assert_eq!(t.get(&5).unwrap().seq, 9);
        let mut again = device(5);
        again.version = 3;
        assert_eq!(t.insert(5, again).map(|d| d.seq), Some(9));
        assert_eq!((t.len(), t.get(&5).unwrap().version), (5, 3));
        assert_eq!(t.remove(&1023).map(|d| d.num), Some(1023));
        assert!(t.remove(&1023).is_none() && !t.contains_key(&1023));
        assert!(!t.contains_id("d1023") && t.contains_id("d1024"));
        assert_eq!(
            t.by_id.len(),
            t.len(),
            "a removed device leaves no id behind"
        );
        assert_eq!(t.len(), 4);
        assert_eq!(t.keys().copied().collect::<Vec<_>>(), [0, 5, 1024, 3000]);
        assert!(t.iter().all(|(n, d)| *n == d.num));
        for d in t.values_mut() {
            d.seq = 1;
        }
        assert!(t.values().all(|d| d.seq == 1));
    }

    #[test]
    fn ids_stay_found_as_the_table_grows_and_shrinks() {
        let mut t = DeviceTable::default();
        for num in 0..5000 {
            t.insert(num, device(num));
        }
        for num in (0..5000).step_by(3) {
            t.remove(&num);
        }
        for num in 0..5000u32 {
            let want = (num % 3 != 0).then_some(num);
            assert_eq!(t.num_of(&format!("d{num}")), want, "d{num}");
        }
        assert_eq!(t.by_id.len(), t.len());
        // A number filed again under another id answers to the new one only.
        let mut renamed = device(1);
        renamed.id = Arc::from("other");
        t.insert(1, renamed);
        assert_eq!((t.num_of("other"), t.num_of("d1")), (Some(1), None));
        assert_eq!(
            t.by_id.len(),
            t.len(),
            "the old id went with the old device"
        );
    }

    #[test]
    fn a_chunk_whose_devices_are_all_removed_is_freed() {
        let mut t = DeviceTable::default();
        for num in 0..3000 {
            t.insert(num, device(num));
        }
        for num in 1024..2048 {
            t.remove(&num);
        }
        assert_eq!(
            t.chunks.iter().flatten().count(),
            2,
            "the middle chunk went"
        );
        assert!(t.get(&1500).is_none() && t.get(&2048).is_some());
        t.insert(1500, device(1500));
        assert_eq!(t.chunks.iter().flatten().count(), 3);
        assert_eq!(t.keys().count(), 3000 - 1024 + 1);
    }

    #[test]
    fn a_number_far_beyond_the_others_costs_one_chunk() {
        let mut t = DeviceTable::default();
        t.insert(3, device(3));
        t.insert(50_000_000, device(50_000_000));
        assert_eq!(t.len(), 2);
        assert_eq!(t.chunks.iter().flatten().count(), 2);
        assert_eq!(t.keys().copied().collect::<Vec<_>>(), [3, 50_000_000]);
        // The pointers to skipped chunks are thin: 8 B each.
        assert_eq!(std::mem::size_of::<Option<Chunk>>(), 8);
    }
}
