//! Atomic file and directory writes: a temp name in the same directory, fsync, rename, fsync
//! of the directory. A reader sees the old file or the new one, never half of one.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::Error;

/// `Error::Io` for `path`.
pub fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        let why = std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path has no file name");
        return Err(io_error(path, why));
    };
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| io_error(path, e))
}

/// fsync of a directory, so a rename inside it is durable (a no-op where unsupported).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    match File::open(dir) {
        Ok(d) => {
            let _ = d.sync_all();
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Creates `dir` (and parents) or says why it cannot be written.
pub fn ensure_writable_dir(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    File::create(&probe).and_then(|_| fs::remove_file(&probe)).map_err(|e| io_error(dir, e))
}
