//! How images and blobs are named: a sha256 [`Digest`] and an image [`Name`] (`repository:tag`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ImageError;

/// A blob's content address: `sha256:` and 64 lowercase hex digits. Only sha256 is accepted
/// (the algorithm every OCI tool writes by default).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// The digest of a finished sha256 hash.
    pub fn from_sha256(hash: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(hash)))
    }

    /// The 64 hex digits, which name the blob's file.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The first 12 hex digits, as `image list` shows them.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }

    /// The full `sha256:…` text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Digest {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| {
            ImageError::BadDigest(format!(
                "'{s}' is not a sha256 digest: expected 'sha256:' and 64 hex digits"
            ))
        })?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ImageError::BadDigest(format!(
                "'{s}' is not a sha256 digest: expected 64 lowercase hex digits after 'sha256:'"
            )));
        }
        Ok(Digest(s.to_string()))
    }
}

impl TryFrom<String> for Digest {
    type Error = ImageError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An image's name: a repository (`cloud48/nginx`) and a tag (`latest` when none is given),
/// written `repository:tag`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name {
    repository: String,
    tag: String,
}

/// The tag of a name that gives none.
pub const DEFAULT_TAG: &str = "latest";

impl Name {
    /// The repository part (`cloud48/nginx`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag part (`latest`).
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

fn repository_ok(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 255
        && r.split('/').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
                && part
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric())
        })
}

fn tag_ok(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && t.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl FromStr for Name {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // A colon after the last slash separates the tag.
        let (repository, tag) = match s.rfind(':') {
            Some(i) if !s[i..].contains('/') => (&s[..i], &s[i + 1..]),
            _ => (s, DEFAULT_TAG),
        };
        if !repository_ok(repository) {
            return Err(ImageError::BadName(format!(
                "'{s}' is not an image name: use lowercase letters, digits, '.', '_' and '-' in \
                 parts separated by '/', each starting with a letter or digit (e.g. cloud48/nginx)"
            )));
        }
        if !tag_ok(tag) {
            return Err(ImageError::BadName(format!(
                "'{s}' has a bad tag '{tag}': use at most 128 letters, digits, '.', '_' and '-', \
                 not starting with '.' or '-' (e.g. cloud48/nginx:1.0)"
            )));
        }
        Ok(Name {
            repository: repository.to_string(),
            tag: tag.to_string(),
        })
    }
}

impl TryFrom<String> for Name {
    type Error = ImageError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.to_string()
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.repository, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_sha256_with_64_lowercase_hex_digits() {
        let ok = format!("sha256:{}", "ab".repeat(32));
        let d: Digest = ok.parse().unwrap();
        assert_eq!(d.hex(), "ab".repeat(32));
        assert_eq!(d.short(), "abababababab");
        for bad in [
            "ab".repeat(32),
            format!("sha512:{}", "ab".repeat(32)),
            format!("sha256:{}", "AB".repeat(32)),
            format!("sha256:{}", "ab".repeat(31)),
            "sha256:../../etc/passwd".into(),
        ] {
            let err = bad.parse::<Digest>().unwrap_err().to_string();
            assert!(err.contains("not a sha256 digest"), "{bad}: {err}");
        }
    }

    #[test]
    fn names_default_to_latest_and_refuse_bad_parts() {
        let n: Name = "cloud48/nginx".parse().unwrap();
        assert_eq!((n.repository(), n.tag()), ("cloud48/nginx", "latest"));
        assert_eq!(n.to_string(), "cloud48/nginx:latest");
        let n: Name = "team/app:1.2".parse().unwrap();
        assert_eq!((n.repository(), n.tag()), ("team/app", "1.2"));
        for bad in [
            "",
            "Nginx",
            "a//b",
            "/a",
            "a:",
            "a:-x",
            "a b",
            "../x",
            "host:5000/x",
        ] {
            assert!(bad.parse::<Name>().is_err(), "{bad} was accepted");
        }
    }
}
