//! API tokens. The server keeps a file of accepted tokens (one per line,
//! created with one fresh token on first start, readable by its owner only)
//! and compares SHA-256 digests of tokens in constant time, so neither the
//! content nor the length of a valid token leaks through timing.

use std::path::Path;

use anyhow::{Context, bail};
use rand::rngs::{ChaCha20Rng, SysRng};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

/// The tokens a server accepts (kept only as digests).
#[derive(Clone)]
pub struct TokenSet {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSet({} tokens)", self.digests.len())
    }
}

/// Shortest token accepted in a token file (hex characters).
pub const MIN_TOKEN_LEN: usize = 32;

impl TokenSet {
    /// A set of the given tokens.
    pub fn new<'a>(tokens: impl IntoIterator<Item = &'a str>) -> anyhow::Result<TokenSet> {
        let digests: Vec<[u8; 32]> = tokens
            .into_iter()
            .map(|t| {
                if t.len() < MIN_TOKEN_LEN {
                    bail!(
                        "API tokens must be at least {MIN_TOKEN_LEN} characters; one has {}",
                        t.len()
                    );
                }
                Ok(Sha256::digest(t.as_bytes()).into())
            })
            .collect::<anyhow::Result<_>>()?;
        if digests.is_empty() {
            bail!("no API tokens: every client would be refused");
        }
        Ok(TokenSet { digests })
    }

    /// Whether `token` is one of the set, in time independent of where (or
    /// whether) it matches.
    pub fn accepts(&self, token: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = 0u8;
        for known in &self.digests {
            let diff = known.iter().zip(&d).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found |= u8::from(diff == 0);
        }
        found == 1
    }

    /// Reads a token file (one token per line, `#` comments), creating it
    /// with one new token if it does not exist. Returns the set and, if the
    /// file was created, the new token.
    pub fn load_or_create(path: &Path) -> anyhow::Result<(TokenSet, Option<String>)> {
        if !path.exists() {
            let token = generate_token()?;
            write_private(path, format!("{token}\n").as_bytes())?;
            return Ok((TokenSet::new([token.as_str()])?, Some(token)));
        }
        check_private(path)?;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the token file {}", path.display()))?;
        let set = TokenSet::new(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#')),
        )
        .with_context(|| format!("token file {}", path.display()))?;
        Ok((set, None))
    }
}

/// A fresh token: 32 bytes from the OS CSPRNG, hex.
pub fn generate_token() -> anyhow::Result<String> {
    let mut rng = ChaCha20Rng::try_from_rng(&mut SysRng)
        .map_err(|e| anyhow::anyhow!("the OS random number generator failed: {e}"))?;
    let mut bytes = [0u8; 32];
    rng.fill_bytes(&mut bytes);
    Ok(crate::tls::hex(&bytes))
}

/// Reads the first token of a token file (for clients given `--token-file`).
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .with_context(|| format!("{} holds no token", path.display()))
}

/// Refuses a secret file (the server's token file or private key) that
/// others than its owner may read or write (on Unix): a server must not run
/// on secrets that have leaked to other local users, or that they can
/// change.
pub(crate) fn check_private(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("reading the permissions of {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "{} is accessible to other users (mode {:o}); it holds a secret: `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Writes a secret file readable only by its owner (on Unix).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn secret_files_open_to_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("secinfer-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        let _ = std::fs::remove_file(&path);
        // made by the server: 0600, accepted on the next start
        let (_, made) = TokenSet::load_or_create(&path).unwrap();
        assert!(made.is_some());
        assert!(TokenSet::load_or_create(&path).is_ok());
        for mode in [0o644, 0o640, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = format!("{:#}", TokenSet::load_or_create(&path).unwrap_err());
            assert!(
                e.contains("accessible to other users") && e.contains("chmod 600"),
                "{e}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn accepts_exactly_the_listed_tokens() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_ne!(a, b);
        let set = TokenSet::new([a.as_str()]).unwrap();
        assert!(set.accepts(&a));
        assert!(!set.accepts(&b));
        assert!(!set.accepts(""));
        assert!(!set.accepts(&a[..a.len() - 1]));
        assert!(TokenSet::new(["short"]).is_err());
        assert!(TokenSet::new(std::iter::empty()).is_err());
    }

    #[test]
    fn token_file_is_created_once_and_read_back() {
        let dir = std::env::temp_dir().join(format!("secinfer-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        let (set, new) = TokenSet::load_or_create(&path).unwrap();
        let token = new.expect("a token on first start");
        assert!(set.accepts(&token));
        let (again, none) = TokenSet::load_or_create(&path).unwrap();
        assert!(none.is_none());
        assert!(again.accepts(&token));
        assert_eq!(read_token(&path).unwrap(), token);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "token file must be private");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
