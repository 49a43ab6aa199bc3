//! One shared copy of the values most devices hold alike: timer keys and device configs.
//!
//! A fleet is mostly many devices of a few kinds: a million thermostats provisioned with the
//! same config, each with a `heartbeat` timer. The journal's index keeps these per device,
//! and as separate allocations they were the largest parts of its per-device entries after
//! the entry itself (a config of a few dozen bytes costs 48 with its `Arc` header; a key, 16).
//! [`Interner::intern`] hands out one `Arc` per distinct value instead, so they cost a
//! pointer each.
//!
//! # Release
//!
//! Values come from guests and clients (a key per order number, a config per device), so
//! the table must not keep what no device holds any more. It is swept when it has doubled
//! since the last sweep: values held only by the table are dropped. Memory stays within
//! twice what is in use (plus [`MIN_SWEEP`] entries), and a sweep's cost is paid for by the
//! insertions that made it due. Correctness never depends on sharing: values are compared
//! by content everywhere, so a value interned twice (after a sweep, or built elsewhere) is
//! only a copy.
//!
//! Crates such as `internment` free a value when its last holder drops it, which costs a
//! lookup in a global table on every drop; here a drop is a plain `Arc` drop and the table
//! catches up at its next sweep.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;

/// Below this many entries the table is not swept.
const MIN_SWEEP: usize = 1024;

/// See the module docs.
pub(crate) struct Interner<T: ?Sized + 'static> {
    table: LazyLock<Mutex<Table<T>>>,
}

struct Table<T: ?Sized> {
    values: HashSet<Arc<T>>,
    /// The size at which the next insertion sweeps first.
    sweep_at: usize,
}

impl<T: ?Sized + Hash + Eq> Interner<T> {
    pub(crate) const fn new() -> Interner<T> {
        Interner {
            table: LazyLock::new(|| {
                Mutex::new(Table {
                    values: HashSet::new(),
                    sweep_at: MIN_SWEEP,
                })
            }),
        }
    }

    /// The shared copy of `value`.
    pub(crate) fn intern(&self, value: &T) -> Arc<T>
    where
        for<'a> Arc<T>: From<&'a T>,
    {
        let mut table = self.table.lock();
        if let Some(shared) = table.values.get(value) {
            return shared.clone();
        }
        if table.values.len() >= table.sweep_at {
            // Under the lock a count of 1 cannot rise: the table's is the only copy left and
            // handing out another goes through this lock.
            table.values.retain(|v| Arc::strong_count(v) > 1);
            table.sweep_at = (2 * table.values.len()).max(MIN_SWEEP);
        }
        let shared: Arc<T> = Arc::from(value);
        table.values.insert(shared.clone());
        shared
    }

    /// Distinct values in the table (those no device holds any more included, until the
    /// next sweep).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().values.len()
    }
}

/// Device configs (see `DeviceInfo::config`).
pub(crate) static CONFIGS: Interner<[u8]> = Interner::new();

/// Timer keys (see `effects::TimerKey`).
pub(crate) static TIMER_KEYS: Interner<str> = Interner::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_copy_and_different_ones_do_not() {
        let table: Interner<str> = Interner::new();
        let a = table.intern("heartbeat");
        let b = table.intern("heartbeat");
        let c = table.intern("offline");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!((&*a, &*c), ("heartbeat", "offline"));
    }

    #[test]
    fn values_nobody_holds_are_released_by_the_next_sweep_and_held_ones_kept() {
        let table: Interner<[u8]> = Interner::new();
        let kept = table.intern(b"kept");
        // A client that gives every device its own config, each device removed later.
        for i in 0..10 * MIN_SWEEP {
            drop(table.intern(format!("config {i}").as_bytes()));
        }
        // Never more than twice what is held, plus the floor.
        assert!(table.len() <= MIN_SWEEP + 1, "{} entries", table.len());
        assert!(Arc::ptr_eq(&kept, &table.intern(b"kept")));
        // Many held at once are all kept through sweeps.
        let held: Vec<Arc<[u8]>> = (0..3 * MIN_SWEEP)
            .map(|i| table.intern(format!("held {i}").as_bytes()))
            .collect();
        for (i, h) in held.iter().enumerate() {
            assert!(Arc::ptr_eq(
                h,
                &table.intern(format!("held {i}").as_bytes())
            ));
        }
        assert!(table.len() <= 2 * (held.len() + 1) + MIN_SWEEP);
    }
}
