//! Bearer tokens for rbee.
//!
//! Tokens are loaded from files (refusing ones that group or others can
//! read), from systemd credentials, or from strings. They are compared in
//! constant time and only ever shown as a short SHA-256 fingerprint, so
//! logs and error messages never carry the secret.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Shortest accepted token, in bytes; shorter secrets are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a token could not be loaded or built. Messages never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token file could not be inspected or read.
    #[error("cannot read token file {}: {source}", path.display())]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The token file is readable by group or others.
    #[error(
        "token file {} has mode {mode:04o}, so group or others may read it; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    InsecureMode {
        /// The file that was refused.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The token was empty after trimming.
    #[error("token from {origin} is empty")]
    Empty {
        /// Where the token came from (a path, an env var name, ...).
        origin: String,
    },
    /// The token is malformed.
    #[error("token from {origin} is invalid: {reason}")]
    Invalid {
        /// Where the token came from.
        origin: String,
        /// What is wrong with it (never the token itself).
        reason: String,
    },
}

/// A bearer token secret.
///
/// `Debug` and `Display` print only `Token(fp:xxxxxxxx)`; there is
/// deliberately no serialisation.
#[derive(Clone)]
pub struct Token {
    secret: String,
    // Kept so each check hashes only the presented value.
    digest: [u8; 32],
}

impl Token {
    /// Builds a token from `secret`, trimming surrounding whitespace and
    /// newlines (files usually end in one). `origin` names the source in
    /// error messages.
    pub fn new(secret: impl Into<String>, origin: &str) -> Result<Token, AuthError> {
        let raw = secret.into();
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(AuthError::Empty {
                origin: origin.to_owned(),
            });
        }
        if trimmed.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(AuthError::Invalid {
                origin: origin.to_owned(),
                reason: "contains whitespace or control characters".to_owned(),
            });
        }
        if trimmed.len() < MIN_TOKEN_LEN {
            return Err(AuthError::Invalid {
                origin: origin.to_owned(),
                reason: format!("shorter than the minimum of {MIN_TOKEN_LEN} bytes"),
            });
        }
        let secret = trimmed.to_owned();
        let digest = sha256(&secret);
        Ok(Token { secret, digest })
    }

    /// First 8 lowercase hex characters of the SHA-256 of the secret; safe to log.
    pub fn fingerprint(&self) -> String {
        self.digest[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Whether `presented` equals the secret, in constant time.
    ///
    /// Digests are compared rather than the strings so that neither the
    /// length nor a common prefix shows up in the timing.
    pub fn matches(&self, presented: &str) -> bool {
        digest_eq(&self.digest, &sha256(presented))
    }

    /// A new random token: `prefix` and 64 hex characters (256 bits from the OS generator).
    pub fn generate(prefix: &str) -> Token {
        let bytes: [u8; 32] = rand::random();
        let secret = format!("{prefix}{}", hex(&bytes));
        let digest = sha256(&secret);
        Token { secret, digest }
    }

    /// The full SHA-256 of the secret in lowercase hex: what a verifier may store instead of
    /// the secret (see [`digest_hex_matches`]).
    pub fn digest_hex(&self) -> String {
        hex(&self.digest)
    }

    /// The raw secret, for sending it to a peer (an `Authorization` header).
    ///
    /// Never log, display or store the returned value.
    pub fn expose(&self) -> &str {
        &self.secret
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(fp:{})", self.fingerprint())
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Whether `presented` hashes to `stored_hex` (a [`Token::digest_hex`]), in constant time.
pub fn digest_hex_matches(stored_hex: &str, presented: &str) -> bool {
    let presented = hex(&sha256(presented));
    let (a, b) = (stored_hex.as_bytes(), presented.as_bytes());
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(u8::from(a.len() != b.len()), |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    // XOR fold with no early exit; black_box stops the optimiser from
    // turning it back into a short-circuiting compare.
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Loads a token from `path`.
///
/// Refuses files that group or others may access (`mode & 0o077 != 0`).
/// Symlinks are followed, so the mode checked is that of the real file.
pub fn load_token_file(path: &Path) -> Result<Token, AuthError> {
    read_token(path, 0o077)
}

/// A systemd credential: systemd decides the file's mode (0400, or 0440 with an ACL on newer
/// versions) inside a directory only the service can enter, so group bits are accepted; a file
/// anyone may read (a `CREDENTIALS_DIRECTORY` set by hand) is still refused.
fn load_credential(path: &Path) -> Result<Token, AuthError> {
    read_token(path, 0o007)
}

/// Reads a secret file other than a token (a hive's stored queen credential), with the same
/// rule as [`load_token_file`]: refused when group or others may access it.
pub fn read_private_file(path: &Path) -> Result<String, AuthError> {
    read_checked(path, 0o077)
}

/// Reads a file, refusing it when any of the `forbidden` mode bits is set.
fn read_checked(path: &Path, forbidden: u32) -> Result<String, AuthError> {
    let io_err = |source| AuthError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mode = fs::metadata(path).map_err(io_err)?.permissions().mode() & 0o7777;
    if mode & forbidden != 0 {
        return Err(AuthError::InsecureMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    fs::read_to_string(path).map_err(io_err)
}

/// Reads a token file, refusing it when any of the `forbidden` mode bits is set.
fn read_token(path: &Path, forbidden: u32) -> Result<Token, AuthError> {
    let contents = read_checked(path, forbidden)?;
    let token = Token::new(contents, &path.display().to_string())?;
    tracing::debug!(path = %path.display(), fingerprint = %token.fingerprint(), "loaded token file");
    Ok(token)
}

/// `$CREDENTIALS_DIRECTORY/<name>` when that variable is set and the file
/// exists, as provided by systemd's `LoadCredential=`.
pub fn credential_path(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    credential_path_in(Path::new(&dir), name)
}

fn credential_path_in(dir: &Path, name: &str) -> Option<PathBuf> {
    // A credential name is a single file name; refuse anything that could
    // step outside the directory.
    if dir.as_os_str().is_empty()
        || name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
    {
        return None;
    }
    let path = dir.join(name);
    path.exists().then_some(path)
}

/// Where a resolved token came from, for logs (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOrigin {
    File(PathBuf),
    Credential(PathBuf),
    Env(String),
}

impl std::fmt::Display for TokenOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenOrigin::File(p) => write!(f, "file {}", p.display()),
            TokenOrigin::Credential(p) => write!(f, "systemd credential {}", p.display()),
            TokenOrigin::Env(v) => write!(f, "environment variable {v}"),
        }
    }
}

/// The one token lookup every daemon uses: an explicit file (mode 0600), else the systemd
/// credential `credential` (`$CREDENTIALS_DIRECTORY/<credential>`), else a value the caller
/// took from an environment variable at start (`(name, value)`; the caller warns and removes
/// the variable so children do not inherit it). `Ok(None)` when none is configured.
pub fn resolve_token(
    file: Option<&Path>,
    credential: &str,
    env: Option<(&str, &str)>,
) -> Result<Option<(Token, TokenOrigin)>, AuthError> {
    if let Some(path) = file {
        return Ok(Some((
            load_token_file(path)?,
            TokenOrigin::File(path.to_path_buf()),
        )));
    }
    if let Some(path) = credential_path(credential) {
        return Ok(Some((
            load_credential(&path)?,
            TokenOrigin::Credential(path),
        )));
    }
    match env {
        Some((name, value)) => Ok(Some((
            Token::new(value, name)?,
            TokenOrigin::Env(name.to_owned()),
        ))),
        None => Ok(None),
    }
}

/// Extracts the token from an `Authorization` header value of the form
/// `Bearer <token>`. The scheme is case-insensitive and may be followed by
/// one or more spaces. Other schemes, an empty token, or a token with
/// inner whitespace give `None`.
pub fn bearer_from_header(value: &str) -> Option<&str> {
    let value = value.trim();
    let (scheme, rest) = value.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start_matches([' ', '\t']);
    if token.is_empty() || token.contains(char::is_whitespace) {
        return None;
    }
    Some(token)
}

/// Named tokens accepted by a server, e.g. one per client.
#[derive(Clone, Default)]
pub struct TokenSet {
    entries: Vec<(String, Token)>,
}

impl TokenSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `token` under `name`, replacing any token already under that name.
    pub fn insert(&mut self, name: impl Into<String>, token: Token) {
        let name = name.into();
        if let Some(entry) = self.entries.iter_mut().find(|(n, _)| *n == name) {
            entry.1 = token;
        } else {
            self.entries.push((name, token));
        }
    }

    /// Whether the set holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The name of the token equal to `presented`, if any.
    ///
    /// Every entry is checked, with no early return, so the timing does
    /// not reveal which one matched.
    pub fn verify(&self, presented: &str) -> Option<&str> {
        let digest = sha256(presented);
        let mut found = None;
        for (name, token) in &self.entries {
            let hit = digest_eq(&token.digest, &digest);
            if hit && found.is_none() {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// `(name, fingerprint)` pairs, for logging at start-up.
    pub fn fingerprints(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .map(|(name, token)| (name.clone(), token.fingerprint()))
            .collect()
    }
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.entries.iter().map(|(n, t)| (n, t)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SECRET: &str = "0123456789abcdef-secret";

    /// A fresh file in the temp dir with `contents` and `mode`.
    fn temp_file(contents: &str, mode: u32) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "rbee-auth-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        fs::write(&path, contents).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn group_readable_file_is_refused() {
        let path = temp_file(SECRET, 0o644);
        let err = load_token_file(&path).unwrap_err();
        fs::remove_file(&path).unwrap();
        match &err {
            AuthError::InsecureMode { mode, .. } => assert_eq!(*mode, 0o644),
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("chmod 600"), "{msg}");
        assert!(!msg.contains(SECRET));
    }

    #[test]
    fn private_files_are_accepted() {
        for mode in [0o600, 0o400] {
            let path = temp_file(&format!("{SECRET}\n"), mode);
            let token = load_token_file(&path);
            fs::remove_file(&path).unwrap();
            assert_eq!(token.unwrap().expose(), SECRET, "mode {mode:o}");
        }
    }

    #[test]
    fn symlink_is_judged_by_its_target() {
        let target = temp_file(SECRET, 0o644);
        let link = target.with_extension("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let res = load_token_file(&link);
        fs::remove_file(&link).unwrap();
        fs::remove_file(&target).unwrap();
        assert!(matches!(res, Err(AuthError::InsecureMode { .. })));
    }

    #[test]
    fn missing_file_is_io_error() {
        let path = std::env::temp_dir().join("rbee-auth-test-does-not-exist");
        assert!(matches!(load_token_file(&path), Err(AuthError::Io { .. })));
    }

    #[test]
    fn trims_surrounding_whitespace() {
        let token = Token::new(format!("  {SECRET}\r\n"), "test").unwrap();
        assert_eq!(token.expose(), SECRET);
    }

    #[test]
    fn empty_is_rejected() {
        assert!(matches!(
            Token::new(" \n", "test"),
            Err(AuthError::Empty { .. })
        ));
    }

    #[test]
    fn too_short_is_rejected() {
        let err = Token::new("short-secret", "env RBEE_TOKEN").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, AuthError::Invalid { .. }));
        assert!(msg.contains("16"), "{msg}");
        assert!(msg.contains("env RBEE_TOKEN"), "{msg}");
        assert!(!msg.contains("short-secret"), "{msg}");
        assert!(Token::new("a".repeat(16), "test").is_ok());
    }

    #[test]
    fn inner_whitespace_and_control_chars_are_rejected() {
        for bad in [
            "0123456789 abcdef",
            "0123456789\tabcdef",
            "0123456789\u{7}abcdef",
        ] {
            let err = Token::new(bad, "test").unwrap_err();
            assert!(matches!(err, AuthError::Invalid { .. }), "{bad:?}");
            assert!(!err.to_string().contains("abcdef"));
        }
    }

    #[test]
    fn matches_only_the_secret() {
        let token = Token::new(SECRET, "test").unwrap();
        assert!(token.matches(SECRET));
        assert!(!token.matches("0123456789abcdef-secreT"));
        assert!(!token.matches("0123456789abcdef"));
        assert!(!token.matches(&format!("{SECRET}x")));
        assert!(!token.matches(""));
    }

    #[test]
    fn debug_and_display_hide_the_secret() {
        let token = Token::new(SECRET, "test").unwrap();
        let fp = token.fingerprint();
        assert_eq!(fp.len(), 8);
        assert!(fp.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')));
        assert_eq!(format!("{token:?}"), format!("Token(fp:{fp})"));
        assert_eq!(token.to_string(), format!("Token(fp:{fp})"));
        let mut set = TokenSet::new();
        set.insert("alice", token);
        assert!(!format!("{set:?}").contains(SECRET));
    }

    #[test]
    fn fingerprint_is_sha256_prefix() {
        // sha256("aaaaaaaaaaaaaaaa") = 0c0beacef8877bbf2416eb00f2b5dc96354e26dd1df5517320459b1236860f8c
        let token = Token::new("a".repeat(16), "test").unwrap();
        assert_eq!(token.fingerprint(), "0c0beace");
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_from_header("Bearer abc"), Some("abc"));
        assert_eq!(bearer_from_header("bearer abc"), Some("abc"));
        assert_eq!(bearer_from_header("BEARER   abc"), Some("abc"));
        assert_eq!(bearer_from_header("  Bearer abc  "), Some("abc"));
        assert_eq!(bearer_from_header("Bearer"), None);
        assert_eq!(bearer_from_header("Bearer "), None);
        assert_eq!(bearer_from_header("Bearer    "), None);
        assert_eq!(bearer_from_header("Basic abc"), None);
        assert_eq!(bearer_from_header("Bearerabc"), None);
        assert_eq!(bearer_from_header("Bearer a b"), None);
        assert_eq!(bearer_from_header(""), None);
    }

    #[test]
    fn token_set_verify_returns_the_name() {
        let mut set = TokenSet::default();
        assert!(set.is_empty());
        assert_eq!(set.verify(SECRET), None);
        set.insert(
            "alice",
            Token::new("alice-token-0123456789", "test").unwrap(),
        );
        set.insert("bob", Token::new("bob-token-0123456789", "test").unwrap());
        assert_eq!(set.len(), 2);
        assert_eq!(set.verify("alice-token-0123456789"), Some("alice"));
        assert_eq!(set.verify("bob-token-0123456789"), Some("bob"));
        assert_eq!(set.verify("carol-token-0123456789"), None);
        assert_eq!(set.verify(""), None);

        set.insert("bob", Token::new("bob-token-rotated-0123", "test").unwrap());
        assert_eq!(set.len(), 2);
        assert_eq!(set.verify("bob-token-0123456789"), None);
        assert_eq!(set.verify("bob-token-rotated-0123"), Some("bob"));

        let fps = set.fingerprints();
        assert_eq!(fps.len(), 2);
        assert_eq!(fps[0].0, "alice");
        assert_eq!(fps[0].1.len(), 8);
    }

    #[test]
    fn credential_path_requires_existing_file() {
        let file = temp_file(SECRET, 0o600);
        let dir = file.parent().unwrap();
        let name = file.file_name().unwrap().to_str().unwrap();
        assert_eq!(credential_path_in(dir, name), Some(file.clone()));
        assert_eq!(
            credential_path_in(dir, "rbee-auth-test-no-such-credential"),
            None
        );
        assert_eq!(credential_path_in(dir, ".."), None);
        assert_eq!(credential_path_in(dir, "../etc"), None);
        assert_eq!(credential_path_in(Path::new(""), name), None);
        fs::remove_file(&file).unwrap();
    }

    #[test]
    fn a_credential_is_read_whatever_mode_systemd_gave_it() {
        // Newer systemd hands credentials over as 0440 with an ACL; a token file would be
        // refused with that mode, a credential is not.
        let file = temp_file(SECRET, 0o440);
        assert!(matches!(
            load_token_file(&file),
            Err(AuthError::InsecureMode { .. })
        ));
        assert!(load_credential(&file).unwrap().matches(SECRET));
        fs::remove_file(&file).unwrap();
        let open = temp_file(SECRET, 0o444);
        assert!(matches!(
            load_credential(&open),
            Err(AuthError::InsecureMode { .. })
        ));
        fs::remove_file(&open).unwrap();
    }
}
