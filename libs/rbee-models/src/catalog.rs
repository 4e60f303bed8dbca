//! The models on disk: listing, resolving references, hub layout, deletion.
//!
//! Layout: downloads land in the first directory as `<dir0>/<org>/<repo>/<file>` (the file
//! path may have `/` in it). Any `*.gguf` under any configured directory is listed.
//!
//! Model ids are URL-safe (`[A-Za-z0-9._~-]`) and stable: the path relative to its directory
//! with `/` replaced by `--` (`HuggingFaceTB--SmolLM2-135M-Instruct-GGUF--model.gguf`). When
//! that mapping could be ambiguous or lossy (a component with `--`, a leading or trailing `-`,
//! or a character outside `[A-Za-z0-9._-]`, which becomes `_`) or the file lives in a
//! directory other than the first, `~` and 12 hex digits of the SHA-256 of its full path are
//! appended, so ids never collide.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::reference::{parse_repo, validate_file};
use crate::{HfRef, ModelError, ModelRef};

/// How deep below a model directory the listing looks (the hub layout needs 3).
pub const MAX_DEPTH: usize = 6;

/// Reports free bytes for the filesystem holding a directory (injectable for tests).
pub type FreeSpaceFn = Arc<dyn Fn(&Path) -> io::Result<u64> + Send + Sync>;

/// The configured model directories. Every method does blocking filesystem work: call it
/// from `spawn_blocking` on a busy runtime.
#[derive(Clone)]
pub struct Catalog {
    dirs: Vec<PathBuf>,
    free_space: FreeSpaceFn,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("dirs", &self.dirs).finish()
    }
}

/// One model file on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelEntry {
    /// URL-safe id (see the module docs).
    pub id: String,
    /// Where the file is (as found under its directory, not canonicalised).
    pub path: PathBuf,
    /// File size.
    pub bytes: u64,
    /// `hf:org/repo:file` for the hub layout, else `file:<path>` (relative to the first
    /// directory when inside it, absolute otherwise). Resolves back to `path`.
    pub reference: String,
    /// Modification time, seconds since the Unix epoch.
    pub modified: Option<u64>,
}

impl Catalog {
    /// A catalog over `dirs` (made absolute). The first directory, where downloads go, is
    /// created if missing; the others may be absent (they are skipped).
    pub fn new(dirs: Vec<PathBuf>) -> Result<Catalog, ModelError> {
        if dirs.is_empty() {
            return Err(ModelError::InvalidConfig(
                "at least one model directory is needed".into(),
            ));
        }
        let mut abs = Vec::with_capacity(dirs.len());
        for d in dirs {
            let a = std::path::absolute(&d)
                .map_err(|e| ModelError::io("cannot make absolute", &d, e))?;
            abs.push(normalize(&a));
        }
        fs::create_dir_all(&abs[0])
            .map_err(|e| ModelError::io("cannot create model directory", &abs[0], e))?;
        Ok(Catalog {
            dirs: abs,
            free_space: Arc::new(free_space),
        })
    }

    /// Replaces the free-space probe (`statvfs` by default); for tests.
    pub fn with_free_space(mut self, f: FreeSpaceFn) -> Catalog {
        self.free_space = f;
        self
    }

    /// The directories, absolute; the first is where downloads go.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Free bytes for unprivileged users on the filesystem holding `dir`.
    pub fn free_bytes(&self, dir: &Path) -> io::Result<u64> {
        (self.free_space)(dir)
    }

    /// Where a hub file lands: `<dir0>/<org>/<name>/<file>`. Validates `repo` (`org/name`)
    /// and `file` so the result is always inside the first directory.
    pub fn hub_path(&self, repo: &str, file: &str) -> Result<PathBuf, ModelError> {
        let (org, name) = parse_repo(repo).map_err(|r| ModelError::invalid_ref(repo, r))?;
        validate_file(file).map_err(|r| ModelError::invalid_ref(file, r))?;
        Ok(self.dirs[0].join(org).join(name).join(file))
    }

    /// Every `*.gguf` under the directories (depth ≤ [`MAX_DEPTH`], no `.part` files, no
    /// hidden entries, symlinked directories not entered, symlinked files only when they point
    /// inside the directories), sorted by id. Unreadable directories are skipped.
    pub fn list(&self) -> Vec<ModelEntry> {
        let roots = self.canonical_dirs();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for (index, dir) in self.dirs.iter().enumerate() {
            let mut files = Vec::new();
            walk(dir, 0, &mut files);
            for path in files {
                let Ok(canon) = fs::canonicalize(&path) else {
                    continue;
                };
                if !inside(&canon, &roots) || !seen.insert(path.clone()) {
                    continue;
                }
                let Ok(meta) = fs::metadata(&canon) else {
                    continue;
                };
                if !meta.is_file() {
                    continue;
                }
                let Ok(rel) = path.strip_prefix(dir) else {
                    continue;
                };
                out.push(ModelEntry {
                    id: model_id(index, rel, &path),
                    reference: reference_for(&self.dirs[..index], dir, rel),
                    bytes: meta.len(),
                    modified: meta
                        .modified()
                        .ok()
                        .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
                        .map(|d| d.as_secs()),
                    path,
                });
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The listed model with this id.
    pub fn find(&self, id: &str) -> Option<ModelEntry> {
        self.list().into_iter().find(|e| e.id == id)
    }

    /// The local file a reference names.
    ///
    /// `file:` paths (relative ones against the first directory) must lie inside a configured
    /// directory both lexically and after following symlinks, exist, be regular files and end
    /// in `.gguf`. `hf:` references look for `<dir>/<org>/<name>/<file>` in each directory in
    /// order (the revision is not part of the layout); without a file, the repo folder must
    /// hold exactly one `.gguf`.
    pub fn resolve(&self, r: &ModelRef) -> Result<PathBuf, ModelError> {
        match r {
            ModelRef::File(p) => self.resolve_file(p),
            ModelRef::Hf(h) => self.resolve_hf(h),
        }
    }

    fn resolve_file(&self, given: &Path) -> Result<PathBuf, ModelError> {
        let canon = self.contained(given)?;
        let meta = fs::metadata(&canon).map_err(|e| ModelError::io("cannot inspect", &canon, e))?;
        if !meta.is_file() {
            return Err(ModelError::invalid_ref(
                &given.display().to_string(),
                "not a regular file",
            ));
        }
        if !is_gguf(&canon) {
            return Err(ModelError::invalid_ref(
                &given.display().to_string(),
                "not a .gguf file",
            ));
        }
        Ok(canon)
    }

    /// `given` made absolute (a relative path names a file in the first directory that has
    /// it, else the first directory), checked lexically and canonically to lie inside the
    /// directories; the canonical path.
    fn contained(&self, given: &Path) -> Result<PathBuf, ModelError> {
        let outside = || ModelError::OutsideModelDirs {
            path: given.to_path_buf(),
        };
        let joined = self
            .dirs
            .iter()
            .map(|d| normalize(&d.join(given)))
            .find(|p| p.exists())
            .unwrap_or_else(|| normalize(&self.dirs[0].join(given)));
        let roots = self.canonical_dirs();
        if !inside(&joined, &self.dirs) && !inside(&joined, &roots) {
            return Err(outside());
        }
        let canon = match fs::canonicalize(&joined) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ModelError::ModelNotFound(format!(
                    "model file not found: {}",
                    given.display()
                )));
            }
            Err(e) => return Err(ModelError::io("cannot resolve", joined, e)),
        };
        if !inside(&canon, &roots) {
            return Err(outside());
        }
        Ok(canon)
    }

    fn resolve_hf(&self, h: &HfRef) -> Result<PathBuf, ModelError> {
        let roots = self.canonical_dirs();
        for dir in &self.dirs {
            let folder = dir.join(&h.org).join(&h.name);
            match &h.file {
                Some(file) => {
                    let path = folder.join(file);
                    if let Ok(canon) = fs::canonicalize(&path)
                        && canon.is_file()
                        && inside(&canon, &roots)
                    {
                        return Ok(canon);
                    }
                }
                None => {
                    let mut found = Vec::new();
                    walk(&folder, 2, &mut found);
                    let mut files: Vec<(PathBuf, PathBuf)> = found
                        .into_iter()
                        .filter_map(|p| Some((fs::canonicalize(&p).ok()?, p)))
                        .filter(|(c, _)| c.is_file() && inside(c, &roots))
                        .collect();
                    if files.len() == 1 {
                        if let Some((canon, _)) = files.pop() {
                            return Ok(canon);
                        }
                    } else if files.len() > 1 {
                        let mut candidates: Vec<String> = files
                            .iter()
                            .filter_map(|(_, p)| p.strip_prefix(&folder).ok())
                            .map(|r| r.to_string_lossy().into_owned())
                            .collect();
                        candidates.sort();
                        return Err(ModelError::AmbiguousModelFile {
                            repo: h.repo(),
                            candidates,
                        });
                    }
                }
            }
        }
        Err(ModelError::ModelNotFound(format!(
            "model {h} is not downloaded"
        )))
    }

    /// Deletes a model given its id, a reference (`hf:…`/`file:…`) or a path (relative to the
    /// first directory), and its leftover `<file>.part`. Only files inside the directories are
    /// touched; a path whose model is gone but whose `.part` remains removes the `.part`.
    /// Empty hub-layout folders left behind are removed. Returns the path deleted.
    pub fn delete(&self, what: &str) -> Result<PathBuf, ModelError> {
        let path = if let Some(e) = self.find(what) {
            e.path
        } else if what.starts_with("hf:") || what.starts_with("file:") {
            let r: ModelRef = what.parse()?;
            match &r {
                ModelRef::Hf(h) => match (self.resolve_hf(h), &h.file) {
                    (Ok(p), _) => p,
                    (Err(ModelError::ModelNotFound(_)), Some(f)) => self.hub_path(&h.repo(), f)?,
                    (Err(e), _) => return Err(e),
                },
                ModelRef::File(p) => normalize(&self.dirs[0].join(p)),
            }
        } else {
            if what.is_empty() || what.chars().any(char::is_control) {
                return Err(ModelError::invalid_ref(
                    what,
                    "not a model id, reference or path",
                ));
            }
            normalize(&self.dirs[0].join(what))
        };
        let part = part_path(&path);
        let roots = self.canonical_dirs();
        // The folder holding the file must be inside the directories, whatever the file is.
        let parent = path.parent().unwrap_or(&path);
        let parent_ok = fs::canonicalize(parent)
            .map(|c| roots.iter().any(|r| c.starts_with(r)))
            .unwrap_or(false);
        if !parent_ok || (!inside(&path, &self.dirs) && !inside(&path, &roots)) {
            return Err(ModelError::OutsideModelDirs { path });
        }
        let mut removed = false;
        match fs::symlink_metadata(&path) {
            Ok(meta) => {
                if meta.is_dir() || !is_gguf(&path) {
                    return Err(ModelError::invalid_ref(what, "not a .gguf model file"));
                }
                if meta.file_type().is_symlink()
                    && !fs::canonicalize(&path)
                        .map(|c| inside(&c, &roots))
                        .unwrap_or(true)
                {
                    return Err(ModelError::OutsideModelDirs { path });
                }
                fs::remove_file(&path).map_err(|e| ModelError::io("cannot delete", &path, e))?;
                removed = true;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ModelError::io("cannot inspect", &path, e)),
        }
        match fs::remove_file(&part) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ModelError::io("cannot delete", &part, e)),
        }
        if !removed {
            return Err(ModelError::ModelNotFound(format!(
                "model not found: {what}"
            )));
        }
        self.prune_empty(&path);
        Ok(path)
    }

    /// Removes empty folders above `path`, stopping at the directory that holds it.
    fn prune_empty(&self, path: &Path) {
        let Some(root) = self.dirs.iter().find(|d| path.starts_with(d)) else {
            return;
        };
        let mut cur = path.parent();
        while let Some(dir) = cur {
            if dir == root.as_path() || !dir.starts_with(root) {
                break;
            }
            if fs::remove_dir(dir).is_err() {
                break; // not empty (or not ours to remove)
            }
            cur = dir.parent();
        }
    }

    fn canonical_dirs(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .filter_map(|d| fs::canonicalize(d).ok())
            .collect()
    }
}

/// `<path>.part`, where a download writes before the final rename.
pub fn part_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

fn is_gguf(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn inside(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| path.starts_with(r) && path != r)
}

/// Lexical normalisation of an absolute path: drops `.`, applies `..`.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Collects `*.gguf` files (not following symlinked dirs, skipping hidden entries).
fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > MAX_DEPTH {
        return;
    }
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let Ok(ft) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        if ft.is_dir() {
            walk(&path, depth + 1, out);
        } else if (ft.is_file() || ft.is_symlink()) && is_gguf(&path) {
            out.push(path);
        }
    }
}

/// The id of a file at `rel` under directory number `index` (see the module docs).
pub(crate) fn model_id(index: usize, rel: &Path, full: &Path) -> String {
    let mut clean = index == 0;
    let mut parts = Vec::new();
    for c in rel.components() {
        let s = c.as_os_str().to_string_lossy();
        if s.contains("--") || s.starts_with('-') || s.ends_with('-') {
            clean = false;
        }
        let mapped: String = s
            .chars()
            .map(|ch| {
                if ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-') {
                    ch
                } else {
                    clean = false;
                    '_'
                }
            })
            .collect();
        parts.push(mapped);
    }
    let mut id = parts.join("--");
    if !clean {
        let digest = Sha256::digest(full.as_os_str().as_encoded_bytes());
        let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        id.push('~');
        id.push_str(&hex);
    }
    id
}

/// The reference of `dir/rel`, given the directories listed before `dir`: relative (it
/// resolves to this file) unless an earlier directory has the same path, then absolute.
fn reference_for(earlier: &[PathBuf], dir: &Path, rel: &Path) -> String {
    let s = rel.to_string_lossy();
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() >= 3 {
        let repo = format!("{}/{}", parts[0], parts[1]);
        let file = parts[2..].join("/");
        if parse_repo(&repo).is_ok() && validate_file(&file).is_ok() {
            return format!("hf:{repo}:{file}");
        }
    }
    if !earlier.iter().any(|d| d.join(rel).exists()) {
        format!("file:{s}")
    } else {
        format!("file:{}", dir.join(rel).display())
    }
}

/// `statvfs(2)`: bytes available to unprivileged users.
pub fn free_space(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated string and `st` points to writable memory of the
    // right type; statvfs only writes into it.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised the struct (it was zeroed anyway).
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}
