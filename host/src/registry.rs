//! The plugin registry: named, versioned, content-addressed device behaviors.
//!
//! A plugin *version* is immutable: its bytes are stored under their sha256 digest in
//! `<data>/plugins/<digest>.wasm`, its precompiled artifact next to it as `<digest>.cwasm`,
//! and a `Version` record in the journal binds `(plugin name, version number)` to the digest.
//! So the registry's durable state is the journal plus a directory of write-once files, and
//! registering the same bytes twice is a no-op that returns the existing version.
//!
//! Uploads are validated before anything is stored: the bytes must compile as a component,
//! import nothing Drover does not grant and export the `device` world.
//!
//! # The current version
//!
//! Each plugin has a *current* version: what new devices get, and what devices of the plugin
//! are moved to (live ones by a deploy, passivated ones lazily at their next activation; see
//! `crate::deploy`). Registering a version does not by itself change what running devices
//! execute. The first version of a plugin becomes current. After that:
//!
//! * an upload ([`Origin::Upload`]) never changes the current version: a deploy does;
//! * a start-up plugin (`--plugins DIR`, the embedded examples; [`Origin::Startup`]) becomes
//!   current only while the current version also came from start-up, so restarting a server
//!   never silently replaces a version that was uploaded (or deployed) over HTTP.
//!
//! The pointers live in `<data>/plugins/current.json` (written atomically), with the versions
//! each plugin was on before, which is what a rollback returns to.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::engine::{CompiledPlugin, Engine, PluginError};
use crate::error::{Error, validate_id};
use crate::journal::{Journal, VersionInfo};

/// A plugin version as shown to users.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PluginVersion {
    pub name: String,
    pub version: u32,
    pub digest: String,
    pub registered_at_ms: u64,
    /// A unit of work on a live instance of this version (an event, a read, a snapshot) used
    /// two epoch ticks (20 ms) of CPU time since the server started (see
    /// `engine::CompiledPlugin::ran_slow`): its devices' guest work runs on the slow lane
    /// (see `actor::ActorPool`). Forgotten at a restart, and after 10,000 fast units in a
    /// row there.
    pub slow_lane: bool,
    /// Its devices' activations, deploy folds and provisioning's trial `init`s run on the
    /// slow lane: `slow_lane`, or building a state (a `restore`, an `init`, a chunk of
    /// replayed `apply`s) used two epoch ticks since the server started (see
    /// `engine::CompiledPlugin::setup_runs_slow`); its events stay on the pool unless
    /// `slow_lane`. Forgotten as `slow_lane` is.
    pub slow_setup: bool,
}

/// Where a registration came from; decides whether it may become current (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// `POST /v1/plugins/{name}`, `drover plugin push`, or a deploy.
    Upload,
    /// Registered when the runtime opened: `--plugins DIR` or the embedded examples.
    Startup,
}

/// A plugin's current version and the ones it was on before (newest last).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Pointer {
    /// Journal-local id of the current version.
    current: u32,
    origin: Origin,
    previous: Vec<u32>,
}

/// How many earlier current versions a plugin remembers for rollback.
const PREVIOUS_KEPT: usize = 32;

impl Pointer {
    /// Keeps the history a stack of real steps back once versions left it: each rollback
    /// goes to another version than the one it leaves. Removing the version between two
    /// entries of one version made them neighbours (v1, v2, v3, v2 with v3 removed: v1, v2,
    /// v2), and removing the one after the current version's last entry left that entry on
    /// top, so the next rollback went to the version already current, changing nothing.
    fn tidy_history(&mut self) {
        self.previous.dedup();
        while self.previous.last() == Some(&self.current) {
            self.previous.pop();
        }
    }
}

impl PluginVersion {
    /// `slow`: the version's (`slow_lane`, `slow_setup`).
    fn from_info(v: &VersionInfo, slow: (bool, bool)) -> Self {
        PluginVersion {
            name: v.plugin.clone(),
            version: v.number,
            digest: format!("sha256:{}", hex::encode(v.digest)),
            registered_at_ms: v.at_ms,
            slow_lane: slow.0,
            slow_setup: slow.1,
        }
    }
}

/// The registry's table: every version by journal-local id, and each plugin's pointer.
#[derive(Debug, Default, Clone)]
struct Table {
    /// `versions[id]` is the version with that id: ids are dense from 0 (removed ones
    /// included: the journal's version records stay).
    versions: Vec<VersionInfo>,
    current: HashMap<String, Pointer>,
    /// Removed versions: not listed, not deployable, their files deleted.
    removed: std::collections::BTreeSet<u32>,
}

/// What `current.json` holds.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Saved {
    Now {
        /// In name order: the same table is the same bytes, so an unchanged one is not
        /// written again (see [`Registry::save`]).
        current: std::collections::BTreeMap<String, Pointer>,
        #[serde(default)]
        removed: std::collections::BTreeSet<u32>,
    },
    /// The first shape: the pointers alone.
    Pointers(HashMap<String, Pointer>),
}

impl Table {
    /// Adds a recorded version; the first of its plugin becomes current.
    fn add(&mut self, v: VersionInfo, origin: Origin) {
        self.current.entry(v.plugin.clone()).or_insert(Pointer {
            current: v.id,
            origin,
            previous: Vec::new(),
        });
        self.versions.push(v);
    }

    /// Makes version `id` current for its plugin, remembering the one it replaces.
    fn point(&mut self, id: u32, origin: Origin) {
        let Some(v) = self.versions.get(id as usize) else {
            return;
        };
        match self.current.get_mut(&v.plugin) {
            Some(p) if p.current == id => p.origin = origin,
            Some(p) => {
                p.previous.push(p.current);
                if p.previous.len() > PREVIOUS_KEPT {
                    p.previous.remove(0);
                }
                p.current = id;
                p.origin = origin;
            }
            None => {
                self.current.insert(
                    v.plugin.clone(),
                    Pointer {
                        current: id,
                        origin,
                        previous: Vec::new(),
                    },
                );
            }
        }
    }
}

/// File in the registry directory holding the current-version pointers.
const POINTERS_FILE: &str = "current.json";

/// See the module docs.
pub struct Registry {
    engine: Engine,
    journal: Journal,
    dir: PathBuf,
    table: parking_lot::RwLock<Table>,
    compiled: Mutex<HashMap<u32, CompiledPlugin>>,
    /// Versions this engine's limits cannot run (see `PluginError::Unfit`), and why: asked
    /// again, they fail at once instead of compiling again (~84 ms each time) to fail the same
    /// way. Limits only change with a restart.
    unfit: Mutex<HashMap<u32, String>>,
    /// Serializes registrations (and removals) so version ids and numbers are allocated,
    /// and stored files written or deleted, without races.
    registering: tokio::sync::Mutex<()>,
    /// Serializes changes of the table with their save (see [`Registry::update`]).
    saving: Mutex<()>,
}

impl Registry {
    /// Opens the registry of the data directory `data_dir`, whose journal is `journal`.
    pub fn open(engine: Engine, journal: Journal, data_dir: &Path) -> std::io::Result<Registry> {
        let dir = data_dir.join("plugins");
        if !dir.exists() {
            std::fs::create_dir_all(&dir)?;
        }
        remove_stale_temporaries(&dir);
        let mut table = Table::default();
        let versions = journal.versions();
        // Before pointers were recorded, the newest version of a plugin was its current one.
        for v in &versions {
            table.add(v.clone(), Origin::Startup);
            table.point(v.id, Origin::Startup);
        }
        for p in table.current.values_mut() {
            p.previous.clear();
        }
        let pointers = dir.join(POINTERS_FILE);
        match std::fs::read(&pointers) {
            Ok(bytes) => {
                let saved: Saved = serde_json::from_slice(&bytes).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{} is damaged ({e}): it says which version of each plugin is \
                             current; restore it from a backup (deleted, each plugin's newest \
                             version is taken as current, and the rollback history is lost)",
                            pointers.display()
                        ),
                    )
                })?;
                let (saved, removed) = match saved {
                    Saved::Now { current, removed } => (current.into_iter().collect(), removed),
                    Saved::Pointers(current) => (current, Default::default()),
                };
                table.removed = removed;
                // A plugin whose versions are all removed has no pointer.
                for (name, p) in &mut table.current {
                    if !saved.contains_key(name) && table.removed.contains(&p.current) {
                        p.current = u32::MAX;
                    }
                }
                table.current.retain(|_, p| p.current != u32::MAX);
                for (name, p) in saved {
                    // Pointers to versions the journal does not have (a journal restored
                    // from an older backup) are ignored.
                    let known =
                        |id: u32| versions.get(id as usize).is_some_and(|v| v.plugin == name);
                    if known(p.current) {
                        let previous = p.previous.into_iter().filter(|id| known(*id)).collect();
                        let mut pointer = Pointer {
                            current: p.current,
                            origin: p.origin,
                            previous,
                        };
                        // An older server's removals could leave it untidy.
                        pointer.tidy_history();
                        table.current.insert(name, pointer);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Written at the first registration, so missing beside recorded versions
                // means deleted (or lost): each plugin's newest version stands, as if
                // deployed, so that no start-up file moves it back (it undid deploys made
                // over HTTP without a word).
                for p in table.current.values_mut() {
                    p.origin = Origin::Upload;
                }
                if !table.current.is_empty() {
                    tracing::warn!(
                        file = %pointers.display(),
                        "the record of each plugin's current version is missing: each plugin's newest version is taken as current and no start-up file moves it; the rollback history is lost (restore the file from a backup to get them back)"
                    );
                }
            }
            Err(e) => return Err(e),
        }
        check_components(&dir, &table);
        Ok(Registry {
            engine,
            journal,
            dir,
            table: parking_lot::RwLock::new(table),
            compiled: Mutex::new(HashMap::new()),
            unfit: Mutex::new(HashMap::new()),
            registering: tokio::sync::Mutex::new(()),
            saving: Mutex::new(()),
        })
    }

    /// Registers `bytes` as a version of plugin `name`, from `origin`. Bytes identical to an
    /// existing version of `name` answer that version (content addressing). Returns the
    /// version and whether it is new. Whether it becomes current: see the module docs.
    pub async fn register(
        &self,
        name: &str,
        bytes: Vec<u8>,
        origin: Origin,
    ) -> Result<(PluginVersion, bool), Error> {
        let (v, registered) = self.register_reporting(name, bytes, origin).await?;
        Ok((v, registered == Registered::New))
    }

    /// [`Registry::register`], saying also whether bytes of an existing version repaired its
    /// stored copy ([`Registered::Repaired`]).
    pub async fn register_reporting(
        &self,
        name: &str,
        bytes: Vec<u8>,
        origin: Origin,
    ) -> Result<(PluginVersion, Registered), Error> {
        validate_id(name)?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let _guard = self.registering.lock().await;
        let (id, number, existing) = {
            let table = self.table.read();
            let mine = || table.versions.iter().filter(|v| v.plugin == name);
            let live = |v: &&VersionInfo| !table.removed.contains(&v.id);
            let existing = mine().filter(live).find(|v| v.digest == digest).cloned();
            (
                table.versions.len() as u32,
                mine().next_back().map_or(1, |v| v.number + 1),
                existing,
            )
        };
        if let Some(v) = existing {
            // The bytes just given are the ones registered: a stored copy damaged or lost
            // since is written again from them (what the damaged copy's error advises). A
            // read and a hash of up to the upload limit: off the async threads.
            let wasm = self.dir.join(format!("{}.wasm", hex::encode(digest)));
            let rewritten =
                tokio::task::spawn_blocking(move || write_component(&wasm, &bytes, &digest, true))
                    .await
                    .map_err(|e| Error::Internal(format!("storing the plugin's component: {e}")))?
                    .map_err(|e| Error::writing("storing the plugin's component", e))?;
            if origin == Origin::Startup && self.startup_may_point(name) {
                self.point(v.id, Origin::Startup)?;
            }
            let registered = if rewritten {
                Registered::Repaired
            } else {
                Registered::Existing
            };
            return Ok((
                PluginVersion::from_info(&v, self.slow_marks(v.id)),
                registered,
            ));
        }

        let engine = self.engine.clone();
        let dir = self.dir.clone();
        let compiled = tokio::task::spawn_blocking(move || -> Result<CompiledPlugin, Error> {
            let (compiled, artifact) = engine.compile_with_artifact(&bytes)?;
            let hex = hex::encode(digest);
            write_component(&dir.join(format!("{hex}.wasm")), &bytes, &digest, false)
                .map_err(|e| Error::writing("storing the plugin's component", e))?;
            if !artifact.is_empty()
                && let Err(e) = write_once(
                    &dir.join(format!("{hex}.cwasm")),
                    &crate::engine::seal_artifact(&artifact),
                )
            {
                tracing::warn!(error = %e, "could not cache precompiled plugin");
            }
            Ok(compiled)
        })
        .await
        .map_err(|e| Error::Internal(format!("compile task: {e}")))??;

        let info = VersionInfo {
            id,
            plugin: name.to_string(),
            number,
            digest,
            at_ms: crate::clock::now_ms(),
        };
        self.journal.record_version(&info).await?;
        self.compiled.lock().insert(id, compiled);
        let first = !self.table.read().current.contains_key(name);
        let becomes_current = first || (origin == Origin::Startup && self.startup_may_point(name));
        let saved = self.update(|t| {
            t.add(info.clone(), origin);
            if becomes_current {
                t.point(id, origin);
            }
            Ok(())
        });
        if let Err(e) = saved {
            // The version is in the journal (it is listed again at the next open); only the
            // pointer change is lost.
            self.table.write().versions.push(info.clone());
            return Err(e);
        }
        tracing::info!(plugin = name, version = number, current = becomes_current, digest = %hex::encode(digest), "plugin registered");
        Ok((
            PluginVersion::from_info(&info, (false, false)),
            Registered::New,
        ))
    }

    /// Whether a start-up registration may move `name`'s current version: only while the
    /// current version came from start-up too.
    fn startup_may_point(&self, name: &str) -> bool {
        self.table
            .read()
            .current
            .get(name)
            .is_none_or(|p| p.origin == Origin::Startup)
    }

    /// Makes version `id` the current version of its plugin (durably).
    pub fn point(&self, id: u32, origin: Origin) -> Result<(), Error> {
        self.update(|t| {
            t.point(id, origin);
            Ok(())
        })
    }

    /// The version `name` was current on before its current one: what a rollback returns to.
    pub fn previous(&self, name: &str) -> Option<VersionInfo> {
        let table = self.table.read();
        let id = *table.current.get(name)?.previous.last()?;
        table.versions.get(id as usize).cloned()
    }

    /// Undoes the last [`Registry::point`] of `name` (a rollback): the previous version
    /// becomes current again and leaves the history.
    pub fn point_back(&self, name: &str) -> Result<Option<VersionInfo>, Error> {
        self.update(|table| {
            let Some(p) = table.current.get_mut(name) else {
                return Ok(None);
            };
            let Some(id) = p.previous.pop() else {
                return Ok(None);
            };
            p.current = id;
            p.origin = Origin::Upload;
            Ok(table.versions.get(id as usize).cloned())
        })
    }

    /// Version `number` of plugin `name`.
    pub fn find(&self, name: &str, number: u32) -> Result<VersionInfo, Error> {
        let table = self.table.read();
        if !table.current.contains_key(name) {
            return Err(Error::UnknownPlugin(name.to_string()));
        }
        table
            .versions
            .iter()
            .find(|v| v.plugin == name && v.number == number && !table.removed.contains(&v.id))
            .cloned()
            .ok_or_else(|| Error::UnknownVersion {
                plugin: name.to_string(),
                version: number,
            })
    }

    /// Removes versions `ids` of plugin `name` (the caller checked that no device runs them):
    /// they leave the list, cannot be deployed, and their files are deleted. Removing the
    /// current version is refused unless the caller removes the `whole` plugin, every version
    /// of it. The journal's version records stay (ids are dense).
    pub async fn remove_versions(&self, name: &str, ids: &[u32], whole: bool) -> Result<(), Error> {
        // No registration meanwhile: one could be about to reuse a file deleted here.
        let _no_registration = self.registering.lock().await;
        let digests: Vec<[u8; 32]> = self.update(|table| {
            let Some(pointer) = table.current.get(name).cloned() else {
                return Err(Error::UnknownPlugin(name.to_string()));
            };
            let remaining = table
                .versions
                .iter()
                .filter(|v| v.plugin == name && !table.removed.contains(&v.id))
                .filter(|v| !ids.contains(&v.id))
                .count();
            if ids.contains(&pointer.current) && (remaining > 0 || !whole) {
                // Removing the only version by its number used to remove the plugin: not
                // what was asked, and not what the API says.
                let number = table.versions[pointer.current as usize].number;
                return Err(Error::VersionInUse {
                    plugin: name.to_string(),
                    version: number,
                    why: if remaining > 0 {
                        "it is the current version: deploy another first".into()
                    } else {
                        format!(
                            "it is the plugin's only version: remove the plugin instead \
                             (`DELETE /v1/plugins/{name}`, `drover plugin remove {name}`)"
                        )
                    },
                });
            }
            table.removed.extend(ids.iter().copied());
            if remaining == 0 {
                table.current.remove(name);
            } else if let Some(p) = table.current.get_mut(name) {
                p.previous.retain(|id| !ids.contains(id));
                p.tidy_history();
            }
            // Files are content-addressed: keep those another live version (of any plugin)
            // has the same bytes as.
            let kept: std::collections::HashSet<[u8; 32]> = table
                .versions
                .iter()
                .filter(|v| !table.removed.contains(&v.id))
                .map(|v| v.digest)
                .collect();
            Ok(ids
                .iter()
                .filter_map(|id| table.versions.get(*id as usize).map(|v| v.digest))
                .filter(|d| !kept.contains(d))
                .collect())
        })?;
        {
            let mut compiled = self.compiled.lock();
            for id in ids {
                compiled.remove(id);
            }
        }
        for digest in digests {
            let hex = hex::encode(digest);
            for ext in ["wasm", "cwasm"] {
                let _ = std::fs::remove_file(self.dir.join(format!("{hex}.{ext}")));
            }
        }
        Ok(())
    }

    /// The ids of `name`'s versions that are not removed.
    pub fn version_ids(&self, name: &str) -> Vec<u32> {
        let table = self.table.read();
        table
            .versions
            .iter()
            .filter(|v| v.plugin == name && !table.removed.contains(&v.id))
            .map(|v| v.id)
            .collect()
    }

    /// The current version of the plugin that version `id` belongs to: where a device on
    /// `id` is headed (itself when it is current).
    pub fn target_of(&self, id: u32) -> Option<u32> {
        let table = self.table.read();
        let plugin = &table.versions.get(id as usize)?.plugin;
        table.current.get(plugin).map(|p| p.current)
    }

    /// Writes the pointers (temp file, fsync, rename, fsync directory), unless the file
    /// already says the same (see [`write_replace_if_changed`]).
    fn save(&self, table: &Table) -> Result<(), Error> {
        let bytes = serde_json::to_vec_pretty(&Saved::Now {
            current: table.current.clone().into_iter().collect(),
            removed: table.removed.clone(),
        })
        .map_err(|e| Error::Internal(format!("encoding plugin pointers: {e}")))?;
        write_replace_if_changed(&self.dir.join(POINTERS_FILE), &bytes)
            .map_err(|e| Error::writing("recording the current plugin versions", e))
    }

    /// Changes the table with `change` durably: on a copy, saved, then made the table. One
    /// change at a time (so saves cannot overtake each other), and a change whose save
    /// fails (or that `change` refuses) does not take effect.
    fn update<R>(&self, change: impl FnOnce(&mut Table) -> Result<R, Error>) -> Result<R, Error> {
        let _one_at_a_time = self.saving.lock();
        let mut next = self.table.read().clone();
        let out = change(&mut next)?;
        self.save(&next)?;
        *self.table.write() = next;
        Ok(out)
    }

    /// The current version of `name`: what new devices get.
    pub fn current(&self, name: &str) -> Option<VersionInfo> {
        let table = self.table.read();
        let id = table.current.get(name)?.current;
        table.versions.get(id as usize).cloned()
    }

    /// Every plugin's current version.
    pub fn currents(&self) -> Vec<VersionInfo> {
        let table = self.table.read();
        table
            .current
            .values()
            .filter_map(|p| table.versions.get(p.current as usize).cloned())
            .collect()
    }

    /// Why version `id` cannot run under this engine's limits (see `PluginError::Unfit`), as
    /// far as its precompiled artifact tells: loading one maps a file (~0.1 ms), where
    /// [`Registry::compiled`] would compile the component if the artifact is missing or
    /// stale (~84 ms and more each). `None` if it fits or the artifact cannot tell; the
    /// version is not kept loaded either way.
    pub fn unfit_by_artifact(&self, id: u32) -> Option<String> {
        if let Some(why) = self.unfit.lock().get(&id) {
            return Some(why.clone());
        }
        let version = self.version(id)?;
        let cwasm = self
            .dir
            .join(format!("{}.cwasm", hex::encode(version.digest)));
        match self.engine.load_precompiled(&cwasm) {
            Err(PluginError::Unfit(why)) => {
                self.unfit.lock().insert(id, why.clone());
                Some(why)
            }
            _ => None,
        }
    }

    /// The version with journal-local id `id`.
    pub fn version(&self, id: u32) -> Option<VersionInfo> {
        self.table.read().versions.get(id as usize).cloned()
    }

    /// Every plugin with all its versions, oldest first, by name.
    pub fn list(&self) -> Vec<(String, Vec<PluginVersion>)> {
        let table = self.table.read();
        let mut out: Vec<(String, Vec<PluginVersion>)> = Vec::new();
        for v in table
            .versions
            .iter()
            .filter(|v| !table.removed.contains(&v.id))
        {
            let shown = PluginVersion::from_info(v, self.slow_marks(v.id));
            match out.iter_mut().find(|(n, _)| *n == v.plugin) {
                Some((_, versions)) => versions.push(shown),
                None => out.push((v.plugin.clone(), vec![shown])),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Public description of the version with journal-local id `id`.
    pub fn describe(&self, id: u32) -> Option<PluginVersion> {
        self.table
            .read()
            .versions
            .get(id as usize)
            .map(|v| PluginVersion::from_info(v, self.slow_marks(id)))
    }

    /// Remembers that version `id` does not fit this engine's limits; the error to return.
    fn note_unfit(&self, id: u32, why: String) -> Error {
        self.unfit.lock().insert(id, why.clone());
        PluginError::Unfit(why).into()
    }

    /// The compiled plugin for version `id`: from memory, else the precompiled artifact, else
    /// compiled from the stored component.
    pub fn compiled(&self, id: u32) -> Result<CompiledPlugin, Error> {
        if let Some(c) = self.compiled.lock().get(&id) {
            return Ok(c.clone());
        }
        if let Some(why) = self.unfit.lock().get(&id) {
            return Err(PluginError::Unfit(why.clone()).into());
        }
        let version = self
            .version(id)
            .ok_or_else(|| Error::Internal(format!("plugin version id {id} is not recorded")))?;
        let digest = hex::encode(version.digest);
        let cwasm = self.dir.join(format!("{digest}.cwasm"));
        let compiled = match self.engine.load_precompiled(&cwasm) {
            Ok(c) => c,
            // Compiling it again would not make it fit.
            Err(PluginError::Unfit(why)) => return Err(self.note_unfit(id, why)),
            Err(e) => {
                if cwasm.exists() {
                    tracing::warn!(file = %cwasm.display(), error = %e, "precompiled plugin unusable; recompiling it from its component");
                }
                let wasm = self.dir.join(format!("{digest}.wasm"));
                let bytes = std::fs::read(&wasm).map_err(|e| {
                    tracing::error!(file = %wasm.display(), error = %e, plugin = %version.plugin, version = version.number, "plugin component unreadable");
                    Error::PluginUnavailable {
                        plugin: version.plugin.clone(),
                        version: version.number,
                        why: if e.kind() == std::io::ErrorKind::NotFound {
                            format!("its component (sha256 {digest}) is not in the data directory")
                        } else {
                            format!("its component (sha256 {digest}) cannot be read: {e}")
                        },
                    }
                })?;
                // Content-addressed: bytes that do not hash to their name are not the
                // component that was registered (damaged on disk), and must not run as it.
                if <[u8; 32]>::from(Sha256::digest(&bytes)) != version.digest {
                    tracing::error!(file = %wasm.display(), plugin = %version.plugin, version = version.number, "plugin component damaged: its bytes do not match their sha256");
                    return Err(Error::PluginUnavailable {
                        plugin: version.plugin.clone(),
                        version: version.number,
                        why: format!(
                            "its component (sha256 {digest}) is damaged in the data directory: \
                             its bytes no longer match their digest (restore \
                             plugins/{digest}.wasm from a backup)"
                        ),
                    });
                }
                let c = match self.engine.compile(&bytes) {
                    Err(PluginError::Unfit(why)) => return Err(self.note_unfit(id, why)),
                    other => other?,
                };
                if let Ok(artifact) = self.engine.precompile(&bytes) {
                    let _ = std::fs::remove_file(&cwasm);
                    let _ = write_once(&cwasm, &crate::engine::seal_artifact(&artifact));
                }
                c
            }
        };
        // Loaded twice at once, the copy already kept wins: instances share its state (such
        // as whether the version has run slow).
        Ok(self.compiled.lock().entry(id).or_insert(compiled).clone())
    }

    /// Whether version `id` is compiled and has run slow (see [`CompiledPlugin::ran_slow`]):
    /// its devices' events and reads then run on the slow lane (see `actor::ActorPool`).
    pub fn ran_slow(&self, id: u32) -> bool {
        self.compiled
            .lock()
            .get(&id)
            .is_some_and(CompiledPlugin::ran_slow)
    }

    /// Version `id`'s marks as `PluginVersion` shows them: (`slow_lane`, `slow_setup`).
    fn slow_marks(&self, id: u32) -> (bool, bool) {
        self.compiled
            .lock()
            .get(&id)
            .map_or((false, false), CompiledPlugin::slow_marks)
    }

    /// Whether version `id` is compiled and its activations, folds and trial `init`s run on
    /// the slow lane (see [`CompiledPlugin::setup_runs_slow`]).
    pub fn setup_runs_slow(&self, id: u32) -> bool {
        self.compiled
            .lock()
            .get(&id)
            .is_some_and(CompiledPlugin::setup_runs_slow)
    }

    /// Shared access to the engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// Replaces a file atomically: temp file, fsync, rename, fsync the directory. A failed write
/// leaves no temp file (a full disk keeps no half-written one).
pub(crate) fn write_replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// [`write_replace`], unless the file already holds `bytes`: a start records its settings
/// and plugin pointers again, and on a full disk those rewrites kept the server from
/// starting at all (its retention pass, which frees space, never ran).
pub(crate) fn write_replace_if_changed(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if std::fs::read(path).is_ok_and(|recorded| recorded == bytes) {
        return Ok(());
    }
    write_replace(path, bytes)
}

/// What a temporary file's extension starts with (`<digest>.tmp<pid>`), before the process id.
const TMP: &str = "tmp";

/// Removes the temporary files of plugin writes that a killed process left in `dir` (its
/// pid in the name, no longer running): each held the part of a component or artifact
/// written before the kill, and on a full disk kept the space an operator had just freed.
fn remove_stale_temporaries(dir: &Path) {
    let pid_of = |name: &str| {
        name.rsplit_once('.')
            .and_then(|(_, ext)| ext.strip_prefix(TMP))
            .and_then(|pid| pid.parse::<u32>().ok())
    };
    for entry in crate::leftovers::of_stopped_processes(dir, pid_of) {
        match std::fs::remove_file(entry.path()) {
            Ok(()) => {
                tracing::info!(file = %entry.path().display(), "removed a plugin file a stopped process left half written")
            }
            Err(e) => {
                tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove a plugin file a stopped process left half written")
            }
        }
    }
}

/// Says, at open, which stored components of versions not removed are missing or damaged
/// (their bytes no longer hash to their name). Their devices run on from the precompiled
/// artifact while it is intact (made from the bytes as registered), so without this the
/// damage showed only once the artifact had to be made again, or in a backup's copy.
fn check_components(dir: &Path, table: &Table) {
    let mut seen = std::collections::HashSet::new();
    for v in table
        .versions
        .iter()
        .filter(|v| !table.removed.contains(&v.id))
    {
        if !seen.insert(v.digest) {
            continue;
        }
        let hex = hex::encode(v.digest);
        let wasm = dir.join(format!("{hex}.wasm"));
        let damage = match std::fs::read(&wasm) {
            Ok(bytes) if <[u8; 32]>::from(Sha256::digest(&bytes)) == v.digest => continue,
            Ok(_) => "damaged: its bytes no longer match their sha256".to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "missing".to_string(),
            Err(e) => format!("unreadable: {e}"),
        };
        tracing::error!(
            file = %wasm.display(),
            plugin = %v.plugin,
            version = v.number,
            "plugin component {damage}; its devices run from its precompiled artifact while \
             that is intact, and answer 503 plugin-unavailable once it is not; upload the \
             same plugin file again (`drover plugin push`) or restore plugins/{hex}.wasm from \
             a backup to repair it"
        );
    }
}

/// Stores a component (`bytes`, whose sha256 is `digest`) at `path`, its content-addressed
/// name: left alone if a file there already holds exactly those bytes, written afresh (see
/// [`write_replace`]) if it is missing, or damaged (its bytes no longer hash to its name),
/// so an upload of the same bytes repairs it. `registered`: the version exists already, so
/// a missing file was lost, and its repair is logged as a damaged one's is. Returns whether
/// it wrote the file.
fn write_component(
    path: &Path,
    bytes: &[u8],
    digest: &[u8; 32],
    registered: bool,
) -> std::io::Result<bool> {
    match std::fs::read(path) {
        Ok(stored) if <[u8; 32]>::from(Sha256::digest(&stored)) == *digest => Ok(false),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        found => {
            if found.is_ok() {
                tracing::warn!(file = %path.display(), "plugin component damaged on disk: written again from the same plugin file, given again");
            } else if registered {
                tracing::warn!(file = %path.display(), "plugin component missing on disk: written again from the same plugin file, given again");
            }
            write_replace(path, bytes).map(|()| true)
        }
    }
}

/// What a registration did ([`Registry::register_reporting`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// A new version.
    New,
    /// The bytes of an existing version, whose stored copy was intact.
    Existing,
    /// The bytes of an existing version, whose stored copy was damaged or missing and is
    /// written again from them: what the damaged copy's error advises.
    Repaired,
}

/// Writes a content-addressed file atomically (temp file, fsync, rename, fsync dir); a file
/// that already exists is left alone since its name is its content.
fn write_once(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let tmp = path.with_extension(format!("{TMP}{}", std::process::id()));
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        // A part written (a full disk) would keep its space for ever: nothing else removes it.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a test's subscriber wrote.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A registered version's component lost from disk is written again by an upload of the
    /// same bytes, and the log says so, as it does for a damaged one (the client's answer is
    /// that of any upload of existing bytes; nothing said the repair had happened). A first
    /// upload writes it with nothing to say.
    #[test]
    fn a_lost_component_written_again_is_logged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = b"not really a component".to_vec();
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let path = dir.path().join(format!("{}.wasm", hex::encode(digest)));
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            write_component(&path, &bytes, &digest, false).expect("first write");
            write_component(&path, &bytes, &digest, true).expect("intact: kept");
            std::fs::remove_file(&path).expect("lose it");
            write_component(&path, &bytes, &digest, true).expect("written again");
            std::fs::write(&path, b"damaged").expect("damage it");
            write_component(&path, &bytes, &digest, true).expect("written again");
        });
        assert_eq!(std::fs::read(&path).expect("stored"), bytes);
        let text = String::from_utf8_lossy(&logs.0.lock()).into_owned();
        assert_eq!(
            (
                text.matches("plugin component missing on disk: written again")
                    .count(),
                text.matches("plugin component damaged on disk: written again")
                    .count(),
                text.lines().count(),
            ),
            (1, 1, 2),
            "{text}"
        );
    }
}
