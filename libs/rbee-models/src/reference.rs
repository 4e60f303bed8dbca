//! Model references: `hf:org/repo[@revision][:file]` and `file:PATH`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::ModelError;

/// The revision a `hf:` reference without `@revision` means.
pub const DEFAULT_REVISION: &str = "main";

/// Longest accepted org, repo name or revision (the hub's own limit is 96).
const MAX_NAME: usize = 96;
/// Longest accepted file path inside a repo, and longest path component.
const MAX_FILE: usize = 1024;
const MAX_COMPONENT: usize = 255;

/// Where a model comes from.
///
/// Parsed strictly with [`FromStr`]; [`Display`](fmt::Display) prints the canonical form
/// (`@main` is omitted), so `r.to_string().parse() == Ok(r)`. Serialises as that string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModelRef {
    /// A file (or a repo with a single `.gguf`) on a Hugging Face-style hub.
    Hf(HfRef),
    /// A local file: relative paths are relative to the first model directory. Parsing only
    /// rejects empty paths and control characters; [`Catalog::resolve`](crate::Catalog::resolve)
    /// enforces that the file lies inside the model directories.
    File(PathBuf),
}

/// `hf:org/name[@revision][:file]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HfRef {
    /// `org` (`[A-Za-z0-9._-]+`, not `.`/`..`).
    pub org: String,
    /// Repo name (same rules as `org`).
    pub name: String,
    /// Branch, tag or commit (`[A-Za-z0-9._-]+`); `main` by default.
    pub revision: String,
    /// A file in the repo (relative, `/`-separated `[A-Za-z0-9._-]+` components, no `.`/`..`);
    /// `None` means "the repo's only `.gguf`".
    pub file: Option<String>,
}

impl HfRef {
    /// Builds a reference, validating every part.
    pub fn new(repo: &str, revision: &str, file: Option<&str>) -> Result<HfRef, ModelError> {
        let (org, name) = parse_repo(repo).map_err(|r| ModelError::invalid_ref(repo, r))?;
        validate_name(revision, "revision").map_err(|r| ModelError::invalid_ref(revision, r))?;
        if let Some(f) = file {
            validate_file(f).map_err(|r| ModelError::invalid_ref(f, r))?;
        }
        Ok(HfRef {
            org,
            name,
            revision: revision.to_owned(),
            file: file.map(str::to_owned),
        })
    }

    /// `org/name`.
    pub fn repo(&self) -> String {
        format!("{}/{}", self.org, self.name)
    }

    /// The same repo and revision with `file` (validated).
    pub fn with_file(&self, file: &str) -> Result<HfRef, ModelError> {
        validate_file(file).map_err(|r| ModelError::invalid_ref(file, r))?;
        Ok(HfRef {
            file: Some(file.to_owned()),
            ..self.clone()
        })
    }
}

impl fmt::Display for HfRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hf:{}/{}", self.org, self.name)?;
        if self.revision != DEFAULT_REVISION {
            write!(f, "@{}", self.revision)?;
        }
        if let Some(file) = &self.file {
            write!(f, ":{file}")?;
        }
        Ok(())
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelRef::Hf(h) => h.fmt(f),
            ModelRef::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl FromStr for ModelRef {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ModelError::invalid_ref(s, reason);
        if let Some(rest) = s.strip_prefix("hf:") {
            let (repo_rev, file) = match rest.split_once(':') {
                Some((left, file)) => (left, Some(file)),
                None => (rest, None),
            };
            let (repo, revision) = match repo_rev.split_once('@') {
                Some((repo, rev)) => (repo, rev),
                None => (repo_rev, DEFAULT_REVISION),
            };
            let (org, name) = parse_repo(repo).map_err(err)?;
            validate_name(revision, "revision").map_err(err)?;
            if let Some(f) = file {
                validate_file(f).map_err(err)?;
            }
            Ok(ModelRef::Hf(HfRef {
                org,
                name,
                revision: revision.to_owned(),
                file: file.map(str::to_owned),
            }))
        } else if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err(err("the path after `file:` is empty".into()));
            }
            if path.chars().any(char::is_control) {
                return Err(err("the path contains control characters".into()));
            }
            Ok(ModelRef::File(PathBuf::from(path)))
        } else {
            Err(err(
                "expected `hf:org/repo[@revision][:file.gguf]` or `file:PATH`".into(),
            ))
        }
    }
}

impl serde::Serialize for ModelRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ModelRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// `[A-Za-z0-9._-]+`, not `.` or `..`, bounded length.
fn validate_name(s: &str, what: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if s.len() > MAX_NAME {
        return Err(format!("the {what} is longer than {MAX_NAME} characters"));
    }
    if let Some(c) = s.chars().find(|c| !is_name_char(*c)) {
        return Err(format!(
            "the {what} contains {:?}; only A-Z a-z 0-9 . _ - are allowed",
            c
        ));
    }
    if s == "." || s == ".." {
        return Err(format!("the {what} may not be `{s}`"));
    }
    Ok(())
}

/// `org/name`, each part a valid name.
pub(crate) fn parse_repo(repo: &str) -> Result<(String, String), String> {
    let Some((org, name)) = repo.split_once('/') else {
        return Err(format!(
            "the repo `{}` must be `org/name`",
            repo.escape_debug()
        ));
    };
    if name.contains('/') {
        return Err(format!(
            "the repo `{}` must be exactly `org/name`",
            repo.escape_debug()
        ));
    }
    validate_name(org, "repo org")?;
    validate_name(name, "repo name")?;
    Ok((org.to_owned(), name.to_owned()))
}

/// A relative, `/`-separated path of valid names.
pub(crate) fn validate_file(file: &str) -> Result<(), String> {
    if file.is_empty() {
        return Err("the file is empty".into());
    }
    if file.len() > MAX_FILE {
        return Err(format!(
            "the file path is longer than {MAX_FILE} characters"
        ));
    }
    if file.starts_with('/') {
        return Err("the file path must be relative (it starts with `/`)".into());
    }
    if file.contains('\\') {
        return Err("the file path contains a backslash".into());
    }
    if file.chars().any(char::is_control) {
        return Err("the file path contains control characters".into());
    }
    for part in file.split('/') {
        if part.is_empty() {
            return Err("the file path has an empty component (`//` or a trailing `/`)".into());
        }
        if part == "." || part == ".." {
            return Err(format!("the file path may not contain `{part}`"));
        }
        if part.len() > MAX_COMPONENT {
            return Err(format!(
                "a file path component is longer than {MAX_COMPONENT} characters"
            ));
        }
        if let Some(c) = part.chars().find(|c| !is_name_char(*c)) {
            return Err(format!(
                "the file path contains {c:?}; only A-Z a-z 0-9 . _ - and `/` are allowed"
            ));
        }
    }
    Ok(())
}
