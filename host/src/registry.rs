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

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::engine::{CompiledPlugin, Engine};
use crate::error::{Error, validate_id};
use crate::journal::{Journal, VersionInfo};

/// A plugin version as shown to users.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PluginVersion {
    pub name: String,
    pub version: u32,
    pub digest: String,
    pub registered_at_ms: u64,
}

impl PluginVersion {
    fn from_info(v: &VersionInfo) -> Self {
        PluginVersion {
            name: v.plugin.clone(),
            version: v.number,
            digest: format!("sha256:{}", hex::encode(v.digest)),
            registered_at_ms: v.at_ms,
        }
    }
}

/// The registry's table: every version by journal-local id, and the current version of each
/// plugin.
#[derive(Debug, Default)]
struct Table {
    /// `versions[id]` is the version with that id: ids are dense from 0.
    versions: Vec<VersionInfo>,
    /// Plugin name → id of its current version (for now the newest registered).
    current: HashMap<String, u32>,
}

impl Table {
    fn add(&mut self, v: VersionInfo) {
        self.current.insert(v.plugin.clone(), v.id);
        self.versions.push(v);
    }
}

/// See the module docs.
pub struct Registry {
    engine: Engine,
    journal: Journal,
    dir: PathBuf,
    table: parking_lot::RwLock<Table>,
    compiled: Mutex<HashMap<u32, CompiledPlugin>>,
    /// Serializes registrations so version ids and numbers are allocated without races.
    registering: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Opens the registry of the data directory `data_dir`, whose journal is `journal`.
    pub fn open(engine: Engine, journal: Journal, data_dir: &Path) -> std::io::Result<Registry> {
        let dir = data_dir.join("plugins");
        if !dir.exists() {
            std::fs::create_dir_all(&dir)?;
        }
        let mut table = Table::default();
        for v in journal.versions() {
            table.add(v);
        }
        Ok(Registry {
            engine,
            journal,
            dir,
            table: parking_lot::RwLock::new(table),
            compiled: Mutex::new(HashMap::new()),
            registering: tokio::sync::Mutex::new(()),
        })
    }

    /// Registers `bytes` as the newest version of plugin `name`, unless the newest version
    /// already has these exact bytes. Returns the version and whether it is new.
    pub async fn register(
        &self,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<(PluginVersion, bool), Error> {
        validate_id(name)?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let _guard = self.registering.lock().await;
        let (id, number) = {
            let table = self.table.read();
            let latest = table.versions.iter().rev().find(|v| v.plugin == name);
            if let Some(v) = latest.filter(|v| v.digest == digest) {
                return Ok((PluginVersion::from_info(v), false));
            }
            (
                table.versions.len() as u32,
                latest.map_or(1, |v| v.number + 1),
            )
        };

        let engine = self.engine.clone();
        let dir = self.dir.clone();
        let compiled = tokio::task::spawn_blocking(move || -> Result<CompiledPlugin, Error> {
            let compiled = engine.compile(&bytes)?;
            let hex = hex::encode(digest);
            write_once(&dir.join(format!("{hex}.wasm")), &bytes)
                .map_err(|e| Error::Internal(format!("storing plugin: {e}")))?;
            match engine.precompile(&bytes) {
                Ok(artifact) => {
                    if let Err(e) = write_once(&dir.join(format!("{hex}.cwasm")), &artifact) {
                        tracing::warn!(error = %e, "could not cache precompiled plugin");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not precompile plugin"),
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
        self.table.write().add(info.clone());
        tracing::info!(plugin = name, version = number, digest = %hex::encode(digest), "plugin registered");
        Ok((PluginVersion::from_info(&info), true))
    }

    /// The current version of `name`: what new devices get.
    pub fn current(&self, name: &str) -> Option<VersionInfo> {
        let table = self.table.read();
        let id = *table.current.get(name)?;
        table.versions.get(id as usize).cloned()
    }

    /// The version with journal-local id `id`.
    pub fn version(&self, id: u32) -> Option<VersionInfo> {
        self.table.read().versions.get(id as usize).cloned()
    }

    /// Every plugin with all its versions, oldest first, by name.
    pub fn list(&self) -> Vec<(String, Vec<PluginVersion>)> {
        let table = self.table.read();
        let mut out: Vec<(String, Vec<PluginVersion>)> = Vec::new();
        for v in &table.versions {
            match out.iter_mut().find(|(n, _)| *n == v.plugin) {
                Some((_, versions)) => versions.push(PluginVersion::from_info(v)),
                None => out.push((v.plugin.clone(), vec![PluginVersion::from_info(v)])),
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
            .map(PluginVersion::from_info)
    }

    /// The compiled plugin for version `id`: from memory, else the precompiled artifact, else
    /// compiled from the stored component.
    pub fn compiled(&self, id: u32) -> Result<CompiledPlugin, Error> {
        if let Some(c) = self.compiled.lock().get(&id) {
            return Ok(c.clone());
        }
        let digest = self
            .version(id)
            .map(|v| hex::encode(v.digest))
            .ok_or_else(|| Error::Internal(format!("plugin version id {id} is not recorded")))?;
        let cwasm = self.dir.join(format!("{digest}.cwasm"));
        let compiled = match self.engine.load_precompiled(&cwasm) {
            Ok(c) => c,
            Err(e) => {
                if cwasm.exists() {
                    tracing::info!(error = %e, "precompiled plugin unusable; recompiling");
                }
                let wasm = self.dir.join(format!("{digest}.wasm"));
                let bytes = std::fs::read(&wasm).map_err(|e| {
                    Error::Internal(format!(
                        "plugin artifact {} unreadable: {e}",
                        wasm.display()
                    ))
                })?;
                let c = self.engine.compile(&bytes)?;
                if let Ok(artifact) = self.engine.precompile(&bytes) {
                    let _ = std::fs::remove_file(&cwasm);
                    let _ = write_once(&cwasm, &artifact);
                }
                c
            }
        };
        self.compiled.lock().insert(id, compiled.clone());
        Ok(compiled)
    }

    /// Shared access to the engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// Writes a content-addressed file atomically (temp file, fsync, rename, fsync dir); a file
/// that already exists is left alone since its name is its content.
fn write_once(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}
