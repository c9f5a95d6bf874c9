//! Run checkpoints: one directory per saved step under `checkpoints/`, holding the model, the
//! optimizer state and `state.json` (written last). A directory is built under a temp name and
//! renamed into place, so `checkpoints/` only ever holds complete checkpoints; a run killed at
//! any moment resumes from the newest one and loses at most the step in flight.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::{io_error, sync_dir, write_atomic};
use crate::Error;

/// Tag in `state.json`: a directory without it is not a squid checkpoint.
pub const CHECKPOINT_FORMAT: &str = "squid-train-checkpoint-v1";

/// Where a run was when it saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// [`CHECKPOINT_FORMAT`].
    pub format: String,
    /// `"sft"` (a warm-up step), `"warmup"` (the finished warm-up) or `"grpo"`.
    pub phase: String,
    /// Steps of the phase done (0 for the finished warm-up).
    pub step: u64,
    /// Fingerprint of the run configuration that wrote it: resuming with another one is refused.
    pub config_fingerprint: String,
}

impl CheckpointState {
    /// Orders checkpoints: warm-up steps, the finished warm-up, then GRPO steps.
    fn rank(&self) -> (u8, u64) {
        let phase = match self.phase.as_str() {
            "sft" => 0,
            "warmup" => 1,
            _ => 2,
        };
        (phase, self.step)
    }
}

/// The directory name of a checkpoint.
pub fn checkpoint_name(state: &CheckpointState) -> String {
    match state.phase.as_str() {
        "sft" => format!("sft-{:06}", state.step),
        "warmup" => "warmup".to_string(),
        _ => format!("step-{:06}", state.step),
    }
}

/// Saves a checkpoint: `write_files(dir)` writes the model and optimizer files into a fresh
/// temp directory, then `state.json` is written and the directory renamed into place
/// (replacing an older one of the same name). Returns the final path.
pub fn save_checkpoint(
    root: &Path,
    state: &CheckpointState,
    write_files: impl FnOnce(&Path) -> Result<(), Error>,
) -> Result<PathBuf, Error> {
    fs::create_dir_all(root).map_err(|e| io_error(root, e))?;
    let name = checkpoint_name(state);
    let final_dir = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| io_error(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| io_error(&tmp, e))?;
    let built = (|| {
        write_files(&tmp)?;
        let json = serde_json::to_vec_pretty(state).expect("checkpoint state serializes");
        write_atomic(&tmp.join("state.json"), &json)
    })();
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if final_dir.exists() {
        let old = root.join(format!(".{name}.old-{}", std::process::id()));
        fs::rename(&final_dir, &old).map_err(|e| io_error(&final_dir, e))?;
        fs::rename(&tmp, &final_dir).map_err(|e| io_error(&final_dir, e))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(&tmp, &final_dir).map_err(|e| io_error(&final_dir, e))?;
    }
    sync_dir(root).map_err(|e| io_error(root, e))?;
    Ok(final_dir)
}

/// Reads and checks `dir/state.json`.
pub fn read_state(dir: &Path) -> Result<CheckpointState, Error> {
    let path = dir.join("state.json");
    let bad = |reason: String| Error::Checkpoint { path: path.clone(), reason };
    let bytes = fs::read(&path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let state: CheckpointState =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a squid checkpoint state: {e}")))?;
    if state.format != CHECKPOINT_FORMAT {
        return Err(bad(format!("format {:?}, expected {CHECKPOINT_FORMAT:?}", state.format)));
    }
    Ok(state)
}

/// The newest complete checkpoint under `root` (temp and half-deleted directories skipped).
pub fn latest_checkpoint(root: &Path) -> Result<Option<(PathBuf, CheckpointState)>, Error> {
    Ok(checkpoints(root)?.found.into_iter().next())
}

/// Every checkpoint directory under `root`.
#[derive(Debug, Default)]
pub struct Checkpoints {
    /// Those with a valid `state.json`, newest first.
    pub found: Vec<(PathBuf, CheckpointState)>,
    /// Directories whose `state.json` cannot be read, with the reason (temp directories of
    /// unfinished saves are not listed: they start with a dot).
    pub unreadable: Vec<(PathBuf, String)>,
}

/// Lists the checkpoints under `root` (none when it does not exist).
pub fn checkpoints(root: &Path) -> Result<Checkpoints, Error> {
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Checkpoints::default()),
        Err(e) => return Err(io_error(root, e)),
    };
    let mut out = Checkpoints::default();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(root, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        match read_state(&entry.path()) {
            Ok(state) => out.found.push((entry.path(), state)),
            Err(e) => out.unreadable.push((entry.path(), e.to_string())),
        }
    }
    out.found.sort_by(|a, b| b.1.rank().cmp(&a.1.rank()).then_with(|| b.0.cmp(&a.0)));
    out.unreadable.sort();
    Ok(out)
}

/// Removes what killed saves left under `root`: `.NAME.tmp-PID` directories (a save in
/// flight) and `.NAME.old-PID` ones (a replaced checkpoint not yet deleted). Only call it while
/// holding the run's lock, so no live save is removed. Returns what was removed.
pub fn remove_stale_temps(root: &Path) -> Result<Vec<PathBuf>, Error> {
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(root, e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(root, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.contains(".tmp-") || name.contains(".old-")) {
            let path = entry.path();
            let gone = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            gone.map_err(|e| io_error(&path, e))?;
            removed.push(path);
        }
    }
    removed.sort();
    Ok(removed)
}

/// Removes GRPO checkpoints older than the newest `keep` (the warm-up one always stays).
pub fn prune(root: &Path, keep: usize) -> Result<(), Error> {
    prune_phase(root, "grpo", keep)
}

/// Removes checkpoints of `phase` older than the newest `keep`.
pub fn prune_phase(root: &Path, phase: &str, keep: usize) -> Result<(), Error> {
    let mut steps: Vec<(u64, PathBuf)> = Vec::new();
    for entry in fs::read_dir(root).map_err(|e| io_error(root, e))? {
        let entry = entry.map_err(|e| io_error(root, e))?;
        if let Ok(state) = read_state(&entry.path()) {
            if state.phase == phase {
                steps.push((state.step, entry.path()));
            }
        }
    }
    steps.sort();
    let excess = steps.len().saturating_sub(keep);
    for (_, dir) in steps.into_iter().take(excess) {
        fs::remove_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(phase: &str, step: u64) -> CheckpointState {
        CheckpointState { format: CHECKPOINT_FORMAT.into(), phase: phase.into(), step, config_fingerprint: "f".into() }
    }

    fn write_marker(text: &'static str) -> impl FnOnce(&Path) -> Result<(), Error> {
        move |dir: &Path| write_atomic(&dir.join("model.txt"), text.as_bytes())
    }

    #[test]
    fn the_newest_complete_checkpoint_wins_and_failed_saves_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert!(latest_checkpoint(root).unwrap().is_none());
        save_checkpoint(root, &state("warmup", 0), write_marker("w")).unwrap();
        save_checkpoint(root, &state("grpo", 2), write_marker("2")).unwrap();
        save_checkpoint(root, &state("grpo", 10), write_marker("10")).unwrap();
        // A save that fails half way leaves no directory behind.
        let failed = save_checkpoint(root, &state("grpo", 11), |d: &Path| {
            write_atomic(&d.join("model.txt"), b"partial")?;
            Err(Error::Config("disk full (simulated)".into()))
        });
        assert!(failed.is_err());
        // A directory without a valid state (a crash between mkdir and state.json) is ignored.
        fs::create_dir(root.join("step-000012")).unwrap();
        fs::write(root.join("step-000012/state.json"), b"{ torn").unwrap();
        let (path, latest) = latest_checkpoint(root).unwrap().unwrap();
        assert_eq!(latest, state("grpo", 10));
        assert_eq!(fs::read_to_string(path.join("model.txt")).unwrap(), "10");
        assert!(fs::read_dir(root).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("tmp")));
    }

    #[test]
    fn resaving_a_step_replaces_it_and_prune_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        save_checkpoint(root, &state("warmup", 0), write_marker("w")).unwrap();
        for step in 1..=5 {
            save_checkpoint(root, &state("grpo", step), write_marker("old")).unwrap();
        }
        save_checkpoint(root, &state("grpo", 5), write_marker("new")).unwrap();
        prune(root, 2).unwrap();
        let mut names: Vec<String> =
            fs::read_dir(root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["step-000004", "step-000005", "warmup"]);
        assert_eq!(fs::read_to_string(root.join("step-000005/model.txt")).unwrap(), "new");
    }

    #[test]
    fn killed_saves_leave_temps_that_the_next_start_removes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        save_checkpoint(root, &state("grpo", 1), write_marker("1")).unwrap();
        // What a save killed before its rename leaves, and a replaced one not yet deleted.
        fs::create_dir(root.join(".step-000002.tmp-4242")).unwrap();
        fs::write(root.join(".step-000002.tmp-4242/model.txt"), b"half").unwrap();
        fs::create_dir(root.join(".step-000001.old-77")).unwrap();
        fs::write(root.join(".state.json.tmp-9"), b"{").unwrap();
        let removed = remove_stale_temps(root).unwrap();
        assert_eq!(removed.len(), 3, "{removed:?}");
        let names: Vec<String> =
            fs::read_dir(root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["step-000001"]);
        assert!(remove_stale_temps(&root.join("absent")).unwrap().is_empty());
    }

    #[test]
    fn checkpoints_are_listed_newest_first_with_the_unreadable_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        save_checkpoint(root, &state("warmup", 0), write_marker("w")).unwrap();
        save_checkpoint(root, &state("grpo", 1), write_marker("1")).unwrap();
        save_checkpoint(root, &state("grpo", 2), write_marker("2")).unwrap();
        fs::create_dir(root.join("step-000003")).unwrap();
        fs::write(root.join("step-000003/state.json"), b"{ torn").unwrap();
        let all = checkpoints(root).unwrap();
        let steps: Vec<(String, u64)> = all.found.iter().map(|(_, s)| (s.phase.clone(), s.step)).collect();
        assert_eq!(steps, [("grpo".into(), 2), ("grpo".into(), 1), ("warmup".into(), 0)]);
        assert_eq!(all.unreadable.len(), 1);
        assert!(all.unreadable[0].0.ends_with("step-000003"));
        assert!(all.unreadable[0].1.contains("not a squid checkpoint state"), "{}", all.unreadable[0].1);
    }

    #[test]
    fn a_foreign_state_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("state.json"),
            br#"{"format":"other","phase":"grpo","step":1,"config_fingerprint":""}"#,
        )
        .unwrap();
        match read_state(dir.path()) {
            Err(Error::Checkpoint { path, reason }) => {
                assert!(path.ends_with("state.json"));
                assert!(reason.contains("other"), "{reason}");
            }
            other => panic!("expected a checkpoint error, got {other:?}"),
        }
    }
}
