//! What a killed process left behind: files or directories named with the id of the process
//! that was writing them (a plugin's half-written component, a backup's links), found by
//! that id once the process is gone, so the space they hold comes back.

use std::path::Path;

/// The entries of `dir` whose name `pid_of` reads a process id from, that process no longer
/// running. Nothing is removed here: each caller says what its leftovers were. Only on
/// Linux (`/proc`) can a process be known gone; elsewhere nothing is.
pub(crate) fn of_stopped_processes(
    dir: &Path,
    pid_of: impl Fn(&str) -> Option<u32>,
) -> Vec<std::fs::DirEntry> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(&pid_of)
                .is_some_and(|pid| !running(pid))
        })
        .collect()
}

fn running(pid: u32) -> bool {
    pid == std::process::id()
        || !cfg!(target_os = "linux")
        || Path::new("/proc").join(pid.to_string()).exists()
}
