//! Files the tool writes, written so that nothing is lost: each goes to a hidden temporary file
//! in its target's directory and is renamed into place when complete; it never replaces a file
//! the tool read (a checkpoint, its `config.json`), never follows a link onto another file, and
//! never replaces something that is not a regular file; and if the process is interrupted
//! (Ctrl-C), the temporary files are removed (or, for files valid at every moment, like the
//! WAV `generate` writes, renamed into place as they are).

use anyhow::{anyhow, bail, Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The files read so far, with their identities (device and inode on Unix, canonical paths
/// elsewhere), once [`guard_process`] has been called.
static INPUTS: Mutex<Vec<(PathBuf, FileId)>> = Mutex::new(Vec::new());
static GUARDED: AtomicBool = AtomicBool::new(false);
/// Temporary files and directories, removed on an interrupt.
static TEMPS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Temporary files valid at every moment (a WAV flushed after each frame), renamed into place
/// on an interrupt: (temporary, final, whether an existing final file is kept).
static KEPT: Mutex<Vec<(PathBuf, PathBuf, bool)>> = Mutex::new(Vec::new());

#[derive(Clone, Debug, PartialEq, Eq)]
enum FileId {
    #[cfg(unix)]
    Inode(u64, u64),
    #[cfg(not(unix))]
    Path(PathBuf),
}

fn file_id(path: &Path) -> Option<FileId> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some(FileId::Inode(meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        path.canonicalize().ok().map(FileId::Path)
    }
}

/// Records that the tool read `path`: once the process is guarded, no output may replace it.
pub fn record_input(path: &Path) {
    if !GUARDED.load(Ordering::Relaxed) {
        return;
    }
    if let Some(id) = file_id(path) {
        INPUTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((path.to_path_buf(), id));
    }
}

/// Whether `id` is a file the tool read, still there under the name it was read by (so a
/// deleted input's reused inode is not taken for it).
fn is_input(id: &FileId) -> bool {
    let inputs = INPUTS.lock().unwrap_or_else(|e| e.into_inner());
    inputs
        .iter()
        .any(|(path, input)| input == id && file_id(path).as_ref() == Some(input))
}

/// Guards the process as a command-line tool: files it reads are never replaced by its
/// outputs, and on Ctrl-C (or SIGTERM) the temporary files being written are removed before it
/// exits with 130. The binary calls it once at start; a library user who writes over a model
/// it loaded, on purpose, does not.
pub fn guard_process() -> Result<()> {
    GUARDED.store(true, Ordering::Relaxed);
    ctrlc::set_handler(|| {
        for path in TEMPS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = match path.is_dir() {
                true => std::fs::remove_dir_all(path),
                false => std::fs::remove_file(path),
            };
        }
        for (temp, path, no_clobber) in KEPT.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let kept = !(*no_clobber && path.exists()) && std::fs::rename(temp, path).is_ok();
            match kept {
                true => eprintln!("interrupted; kept what was written in {}", path.display()),
                false => {
                    let _ = std::fs::remove_file(temp);
                }
            }
        }
        eprintln!("interrupted; unfinished files removed");
        std::process::exit(130);
    })
    .map_err(|e| anyhow!("cannot handle Ctrl-C: {e}"))
}

/// Checks that `path` may be written: not a link, not a directory or device, not an input.
/// Writers check again when they begin; a command checks its outputs early with this, so that
/// a long run is not wasted on an output it may not write.
pub fn check_target(path: &Path) -> Result<()> {
    let shown = path.display();
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if meta.file_type().is_symlink() {
        bail!("refusing to write {shown}: it is a link; name a plain file");
    }
    if !meta.is_file() {
        bail!("refusing to write {shown}: it is not a regular file");
    }
    if let Some(id) = file_id(path) {
        if is_input(&id) {
            bail!(
                "refusing to write {shown}: the tool reads it (a checkpoint, its config.json, \
                 a script, a voice, a baseline); name another file"
            );
        }
    }
    Ok(())
}

/// The directory `path` is in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Has a temporary directory (or file) the tool made removed if the process is interrupted
/// before it is dropped.
pub fn remove_on_interrupt(path: &Path) {
    TEMPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(path.to_path_buf());
}

/// A file being written.
pub struct Output {
    /// Always present until committed.
    file: Option<tempfile::NamedTempFile>,
    path: PathBuf,
}

impl Output {
    /// Starts writing `path` (checked as above) through a hidden temporary file beside it,
    /// which becomes a regular, world-readable file when committed.
    pub fn begin(path: &Path) -> Result<Output> {
        check_target(path)?;
        let dir = parent_dir(path);
        let mut builder = tempfile::Builder::new();
        builder.prefix(".vibeoffload-");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(0o644));
        }
        let file = builder
            .tempfile_in(dir)
            .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
        remove_on_interrupt(file.path());
        Ok(Output {
            file: Some(file),
            path: path.to_path_buf(),
        })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temporary file's path, for writers that take a path.
    pub fn temp_path(&self) -> &Path {
        self.temp().path()
    }

    fn temp(&self) -> &tempfile::NamedTempFile {
        self.file.as_ref().expect("present until committed")
    }

    /// The temporary file, to write into.
    pub fn file(&mut self) -> &mut File {
        self.file
            .as_mut()
            .expect("present until committed")
            .as_file_mut()
    }

    /// Has the file renamed into place as it is if the process is interrupted, for writers
    /// that keep it valid at every moment; `no_clobber`: unless something is there by then.
    pub fn keep_on_interrupt(&self, no_clobber: bool) {
        let temp = self.temp_path().to_path_buf();
        forget_temp(&temp);
        KEPT.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((temp, self.path.clone(), no_clobber));
    }

    /// Renames the finished file into place, replacing a regular file there (checked again
    /// now: it may have changed since `begin`).
    pub fn commit(self) -> Result<()> {
        check_target(&self.path)?;
        self.persist(false)
    }

    /// Renames the finished file into place only if nothing is there yet, atomically: of two
    /// writers racing for one name, one fails.
    pub fn commit_new(self) -> Result<()> {
        self.persist(true)
    }

    fn persist(mut self, no_clobber: bool) -> Result<()> {
        let shown = self.path.display().to_string();
        let file = self.file.take().expect("present until committed");
        forget_temp(file.path());
        let persisted = match no_clobber {
            true => file.persist_noclobber(&self.path),
            false => file.persist(&self.path),
        };
        match persisted {
            Ok(_) => Ok(()),
            Err(e) if no_clobber && e.error.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("{shown} appeared while it was being written; pass --force to replace it")
            }
            Err(e) => Err(anyhow!(
                "cannot rename the finished file to {shown}: {}",
                e.error
            )),
        }
    }
}

fn forget_temp(path: &Path) {
    TEMPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| p != path);
    KEPT.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(p, _, _)| p != path);
}

impl Drop for Output {
    fn drop(&mut self) {
        // The temporary file removes itself; it need not be removed on an interrupt any more.
        if let Some(file) = &self.file {
            forget_temp(file.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(path: &Path, text: &str) -> Result<()> {
        let mut out = Output::begin(path)?;
        out.file().write_all(text.as_bytes())?;
        out.commit()
    }

    #[test]
    fn writes_replace_outputs_but_never_inputs_links_or_directories() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.txt");
        write(&out, "one").unwrap();
        write(&out, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "two");

        let input = dir.path().join("model.safetensors");
        std::fs::write(&input, "weights").unwrap();
        GUARDED.store(true, Ordering::Relaxed);
        record_input(&input);
        let e = write(&input, "x").unwrap_err();
        assert!(e.to_string().contains("the tool reads it"), "{e}");
        // Through another name of the same file too.
        let hard = dir.path().join("hard.safetensors");
        std::fs::hard_link(&input, &hard).unwrap();
        assert!(write(&hard, "x").is_err());
        assert_eq!(std::fs::read_to_string(&input).unwrap(), "weights");

        #[cfg(unix)]
        {
            let link = dir.path().join("link.txt");
            std::os::unix::fs::symlink(&out, &link).unwrap();
            let e = write(&link, "x").unwrap_err();
            assert!(e.to_string().contains("is a link"), "{e}");
        }
        let e = write(dir.path(), "x").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        // Nothing but the files made here is left behind.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "hard.safetensors",
                "link.txt",
                "model.safetensors",
                "out.txt"
            ]
        );
    }

    #[test]
    fn a_new_file_is_never_clobbered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let first = Output::begin(&path).unwrap();
        let second = Output::begin(&path).unwrap();
        first.commit_new().unwrap();
        let e = second.commit_new().unwrap_err();
        assert!(
            e.to_string()
                .contains("appeared while it was being written"),
            "{e}"
        );
    }
}
