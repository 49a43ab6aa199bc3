//! Who is waiting for a device's commands.
//!
//! Commands themselves live in the journal: a `Command` effect is pending in the device's
//! outbox from its record until acknowledged (kind 11) or past its time to live (see
//! `journal/effects.rs`), and reads come from the journal's index plus the records. This
//! module only lets a long poll or a stream sleep until a command arrives: one [`Notify`]
//! per device that someone waits on, dropped when the last waiter goes.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// See the module docs.
#[derive(Default)]
pub struct Outbox {
    waiters: Mutex<HashMap<Arc<str>, Weak<Notify>>>,
    /// Set by [`Outbox::close`]: waits end at once from then on.
    closed: std::sync::atomic::AtomicBool,
}

impl Outbox {
    /// The notifier of `device`'s outbox, for a waiter to hold while it waits.
    pub fn waiter(&self, device: &Arc<str>) -> Arc<Notify> {
        let mut waiters = self.waiters.lock();
        if let Some(n) = waiters.get(device).and_then(Weak::upgrade) {
            return n;
        }
        // Forget the devices nobody waits on any more, so the map stays as small as the
        // number of waiters.
        waiters.retain(|_, w| w.strong_count() > 0);
        let n = Arc::new(Notify::new());
        waiters.insert(device.clone(), Arc::downgrade(&n));
        n
    }

    /// Whether [`Outbox::close`] was called: waiters answer at once.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The server or runtime is stopping: wake every waiter, so long polls and streams end
    /// now, and let no wait start any more.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        let waiters: Vec<Arc<Notify>> = self
            .waiters
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for n in waiters {
            n.notify_waiters();
        }
    }

    /// A command for `device` became durable: wake its waiters.
    pub fn notify(&self, device: &str) {
        let n = self.waiters.lock().get(device).and_then(Weak::upgrade);
        if let Some(n) = n {
            n.notify_waiters();
        }
    }
}
