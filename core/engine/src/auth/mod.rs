//! Access control: HTTP Digest authentication (RFC 7616: SHA-256 and MD5, `qop=auth`, signed
//! expiring nonces, nonce counts against replay, `stale=true`) and role-based authorization.
//!
//! Invariants: passwords are never stored, only HA1 hashes (`H(user:realm:password)`); a
//! replayed or tampered request is refused; anonymous requests get exactly what
//! `auth.anonymous` allows (read-only by default).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use digest_auth::{Algorithm, AlgorithmType, AuthorizationHeader};
use hmac::{Hmac, Mac};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
    Set,
};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::entities::user;
use crate::model::now_ms;
use crate::queue::Clock;

mod roles;
mod scope;
mod users;

pub use roles::{Anonymous, Family, Role};
pub use scope::{Scope, ScopeRefusal};
pub use users::{UserInfo, UserRecord, UserStore, validate_user_name};

/// Settings of access control (the `auth` section).
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Digest realm; part of every HA1, so changing it invalidates stored passwords.
    pub realm: String,
    /// What anonymous requests may do.
    pub anonymous: Anonymous,
    /// What anonymous requests may read when `anonymous` is `read`.
    pub anonymous_read: Vec<Family>,
    /// How long a nonce stays fresh.
    pub nonce_ttl: Duration,
    /// Users declared in the config file (in addition to those in the database).
    pub users: Vec<UserRecord>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            realm: "cloud48".into(),
            anonymous: Anonymous::Read,
            anonymous_read: Family::DEFAULT_ANONYMOUS.to_vec(),
            nonce_ttl: Duration::from_secs(300),
            users: Vec::new(),
        }
    }
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No credentials.
    Anonymous,
    /// An authenticated user.
    User {
        /// Name.
        name: String,
        /// Role.
        role: Role,
    },
}

/// The nonce counts a client used with one nonce. A browser sends requests in parallel with
/// counts 5, 6, 7 that may arrive 7, 5, 6: each count is accepted once, in any order, within a
/// window of the last 64 below the highest seen; older ones are refused as replays.
#[derive(Debug, Default, Clone, Copy)]
struct NonceCounts {
    /// Highest count accepted (0: none yet).
    highest: u32,
    /// Bit `i` set: count `highest - i` was accepted.
    seen: u64,
}

impl NonceCounts {
    /// Records `nc`; false when it was used already or is too old to tell.
    fn accept(&mut self, nc: u32) -> bool {
        if nc == 0 {
            return false;
        }
        if nc > self.highest {
            let shift = nc - self.highest;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.highest = nc;
            return true;
        }
        let back = self.highest - nc;
        if back >= 64 || self.seen & (1 << back) != 0 {
            return false;
        }
        self.seen |= 1 << back;
        true
    }
}

impl Principal {
    /// The name recorded in the audit trail (`anonymous` or the user).
    pub fn audit_name(&self) -> &str {
        match self {
            Principal::Anonymous => "anonymous",
            Principal::User { name, .. } => name,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Credentials are missing or wrong: answer 401 with a challenge.
    #[error("{message}")]
    Unauthorized {
        /// What was wrong.
        message: String,
        /// The nonce had expired but the credentials were right.
        stale: bool,
    },
    /// Authenticated (or anonymous) but not allowed: answer 403.
    #[error("{0}")]
    Forbidden(String),
    /// Too many failed sign-ins for this user or from this address: answer 429 with
    /// `Retry-After`.
    #[error("{message}")]
    Throttled {
        /// What is blocked and until when.
        message: String,
        /// Seconds until the client may try again.
        retry_after_secs: u64,
    },
}

fn unauthorized(message: impl Into<String>) -> AuthError {
    AuthError::Unauthorized {
        message: message.into(),
        stale: false,
    }
}

type HmacSha256 = Hmac<Sha256>;

/// Verifies Digest credentials and roles.
pub struct Authenticator {
    config: AuthConfig,
    db: DatabaseConnection,
    clock: Arc<dyn Clock>,
    key: [u8; 32],
    opaque: String,
    /// Highest nonce count seen per nonce.
    counts: Mutex<HashMap<String, NonceCounts>>,
    /// Failed sign-ins per user and per address.
    throttle: crate::throttle::Throttle,
}

impl Authenticator {
    /// An authenticator over the users of `config` and of the database.
    pub fn new(config: AuthConfig, db: DatabaseConnection, clock: Arc<dyn Clock>) -> Self {
        Authenticator {
            config,
            db,
            clock,
            key: rand::random(),
            opaque: hex::encode(rand::random::<[u8; 16]>()),
            counts: Mutex::new(HashMap::new()),
            throttle: crate::throttle::Throttle::new(Default::default()),
        }
    }

    /// The settings.
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    fn sign(&self, payload: &[u8]) -> Vec<u8> {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("any key length");
        mac.update(payload);
        mac.finalize().into_bytes()[..16].to_vec()
    }

    /// A fresh nonce: issue time and randomness, signed, so it cannot be forged or backdated.
    pub fn nonce(&self) -> String {
        let mut payload = self.clock.now_ms().to_be_bytes().to_vec();
        payload.extend_from_slice(&rand::random::<[u8; 8]>());
        let sig = self.sign(&payload);
        payload.extend_from_slice(&sig);
        hex::encode(payload)
    }

    /// Issue time of a nonce this core signed, or `None` for a forged one.
    fn nonce_time(&self, nonce: &str) -> Option<i64> {
        let bytes = hex::decode(nonce).ok()?;
        if bytes.len() != 32 {
            return None;
        }
        let (payload, sig) = bytes.split_at(16);
        if !constant_eq(&self.sign(payload), sig) {
            return None;
        }
        Some(i64::from_be_bytes(payload[..8].try_into().ok()?))
    }

    /// `WWW-Authenticate` values: SHA-256 first, MD5 for old clients.
    pub fn challenges(&self, stale: bool) -> Vec<String> {
        let nonce = self.nonce();
        ["SHA-256", "MD5"]
            .iter()
            .map(|alg| {
                format!(
                    "Digest realm=\"{}\", qop=\"auth\", algorithm={alg}, nonce=\"{nonce}\", opaque=\"{}\"{}",
                    self.config.realm,
                    self.opaque,
                    if stale { ", stale=true" } else { "" }
                )
            })
            .collect()
    }

    async fn user(&self, name: &str) -> Result<Option<UserRecord>, DbErr> {
        if let Some(u) = self.config.users.iter().find(|u| u.name == name) {
            return Ok(Some(u.clone()));
        }
        Ok(user::Entity::find()
            .filter(user::Column::Name.eq(name))
            .one(&self.db)
            .await?
            .map(|u| UserRecord {
                role: u.role.parse().unwrap_or(Role::Viewer),
                name: u.name,
                ha1_md5: u.ha1_md5,
                ha1_sha256: u.ha1_sha256,
            }))
    }

    /// `who` as the users are now: a user with its current role, `None` once it was
    /// removed (what a long-lived request such as the event stream checks again).
    pub async fn current(&self, who: &Principal) -> Result<Option<Principal>, DbErr> {
        match who {
            Principal::Anonymous => Ok(Some(Principal::Anonymous)),
            Principal::User { name, .. } => Ok(self.user(name).await?.map(|u| Principal::User {
                name: u.name,
                role: u.role,
            })),
        }
    }

    /// Whether a user of this name exists (in the configuration or the database).
    pub async fn knows(&self, name: &str) -> Result<bool, DbErr> {
        if self.config.users.iter().any(|u| u.name == name) {
            return Ok(true);
        }
        Ok(user::Entity::find()
            .filter(user::Column::Name.eq(name))
            .one(&self.db)
            .await?
            .is_some())
    }

    /// True when any user exists (in the file or the database).
    pub async fn has_users(&self) -> Result<bool, DbErr> {
        if !self.config.users.is_empty() {
            return Ok(true);
        }
        Ok(user::Entity::find().one(&self.db).await?.is_some())
    }

    /// Checks the `Authorization` header of a request for `method` and `uri` (path and query)
    /// from client address `addr`. A user or address with too many failed sign-ins is refused
    /// (`Throttled`) before its credentials are checked.
    pub async fn authenticate(
        &self,
        method: &str,
        uri: &str,
        header: &str,
        addr: Option<std::net::IpAddr>,
    ) -> Result<Principal, AuthError> {
        if !header.trim_start().starts_with("Digest") {
            return Err(unauthorized("only HTTP Digest authentication is accepted"));
        }
        let auth = AuthorizationHeader::parse(header)
            .map_err(|e| unauthorized(format!("malformed Digest credentials: {e}")))?;
        let now = self.clock.now_ms();
        if let Some(b) = self.throttle.check(&auth.username, addr, now) {
            let secs = (b.wait_ms as u64).div_ceil(1000).max(1);
            return Err(AuthError::Throttled {
                message: format!(
                    "too many failed sign-ins for {}; try again in {secs} s",
                    b.what
                ),
                retry_after_secs: secs,
            });
        }
        if auth.realm != self.config.realm {
            return Err(unauthorized(format!(
                "wrong realm '{}' (expected '{}')",
                auth.realm, self.config.realm
            )));
        }
        if auth.uri != uri {
            return Err(unauthorized(
                "the credentials were computed for another URI",
            ));
        }
        if auth.algorithm.sess || auth.algorithm.algo == AlgorithmType::SHA2_512_256 {
            return Err(unauthorized("unsupported algorithm: use SHA-256 or MD5"));
        }
        if auth.qop != Some(digest_auth::Qop::AUTH) {
            return Err(unauthorized("qop=auth is required"));
        }
        let cnonce = auth
            .cnonce
            .clone()
            .ok_or_else(|| unauthorized("cnonce is missing"))?;
        let Some(issued) = self.nonce_time(&auth.nonce) else {
            return Err(unauthorized("unknown nonce; authenticate again"));
        };
        let bad = || {
            self.throttle.failed(&auth.username, addr, now);
            unauthorized("wrong user name or password")
        };
        let record = self
            .user(&auth.username)
            .await
            .map_err(|e| unauthorized(format!("cannot check credentials: {e}")))?
            .ok_or_else(bad)?;
        let ha1 = match auth.algorithm.algo {
            AlgorithmType::MD5 => &record.ha1_md5,
            _ => &record.ha1_sha256,
        };
        let expected = expected_response(&auth, ha1, method, &cnonce);
        if !constant_eq(
            expected.as_bytes(),
            auth.response.to_ascii_lowercase().as_bytes(),
        ) {
            return Err(bad());
        }
        let age = self.clock.now_ms() - issued;
        if age > self.config.nonce_ttl.as_millis() as i64 {
            return Err(AuthError::Unauthorized {
                message: "the nonce expired; authenticate again".into(),
                stale: true,
            });
        }
        {
            let mut counts = self.counts.lock().unwrap();
            let seen = counts.entry(auth.nonce.clone()).or_default();
            if !seen.accept(auth.nc) {
                return Err(unauthorized(format!(
                    "replayed request: nonce count {} was already used, or is more than 64 \
                     below the highest this nonce has had; authenticate again",
                    auth.nc
                )));
            }
            let ttl = self.config.nonce_ttl.as_millis() as i64;
            if counts.len() > 10_000 {
                counts.retain(|n, _| self.nonce_time(n).is_some_and(|t| now - t <= ttl));
            }
        }
        self.throttle.succeeded(&record.name, addr);
        Ok(Principal::User {
            name: record.name,
            role: record.role,
        })
    }

    /// The families anonymous requests may read, for messages (`nothing` when none).
    fn anonymous_families(&self) -> String {
        let names: Vec<String> = self
            .config
            .anonymous_read
            .iter()
            .map(ToString::to_string)
            .collect();
        if names.is_empty() {
            "nothing".into()
        } else {
            names.join(", ")
        }
    }

    /// Decides whether `who` may do what needs `needed`, in `family` for reads (`None`: a read
    /// anonymous requests never make, or a change).
    pub async fn authorize(
        &self,
        who: &Principal,
        needed: Role,
        family: Option<Family>,
    ) -> Result<(), AuthError> {
        match who {
            Principal::User { name, role } => {
                if *role >= needed {
                    Ok(())
                } else {
                    Err(AuthError::Forbidden(format!(
                        "this needs role {needed}; user '{name}' has role {role}"
                    )))
                }
            }
            Principal::Anonymous => {
                let allowed = match self.config.anonymous {
                    Anonymous::Full => true,
                    Anonymous::Read => {
                        needed == Role::Viewer
                            && family.is_some_and(|f| self.config.anonymous_read.contains(&f))
                    }
                    Anonymous::None => false,
                };
                if allowed {
                    return Ok(());
                }
                let has_users = self.has_users().await.unwrap_or(true);
                let read = match family {
                    Some(_) if needed == Role::Viewer => format!(
                        "; anonymous requests may read only {} (auth.anonymous_read)",
                        self.anonymous_families()
                    ),
                    _ => String::new(),
                };
                if has_users {
                    Err(unauthorized(format!(
                        "authentication required: this needs role {needed}{read}"
                    )))
                } else {
                    Err(AuthError::Forbidden(format!(
                        "anonymous access is limited{read} and no users are configured: add one with `cloud48 user add NAME --role {needed}`, or set auth.anonymous = \"full\" for local development only"
                    )))
                }
            }
        }
    }
}

/// The response a client knowing `ha1` sends for `auth` (RFC 7616, qop=auth): hex of
/// `H(HA1:nonce:nc:cnonce:auth:H(method:uri))`.
fn expected_response(auth: &AuthorizationHeader, ha1: &str, method: &str, cnonce: &str) -> String {
    let h = |s: &str| auth.algorithm.hash_str(s);
    let ha2 = h(&format!("{method}:{}", auth.uri));
    h(&format!(
        "{ha1}:{}:{:08x}:{cnonce}:auth:{ha2}",
        auth.nonce, auth.nc
    ))
}

/// Compares secrets in time independent of where they differ.
pub fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7616, section 3.9.1: the same request with SHA-256 and with MD5.
    fn rfc_header(algorithm: &str, response: &str) -> String {
        format!(
            "Digest username=\"Mufasa\", realm=\"http-auth@example.org\", uri=\"/dir/index.html\", \
             algorithm={algorithm}, nonce=\"7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v\", nc=00000001, \
             cnonce=\"f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ\", qop=auth, response=\"{response}\", \
             opaque=\"FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS\""
        )
    }

    #[test]
    fn a_scope_lets_a_user_act_where_its_grants_allow_and_hides_the_rest() {
        let grants = BTreeMap::from([
            (2, ("shop".to_string(), Role::Operator)),
            (3, ("lab".to_string(), Role::Viewer)),
        ]);
        let member = Scope::Projects {
            user: "mo".into(),
            reads_all: false,
            grants: grants.clone(),
            needed: Role::Operator,
        };
        assert_eq!(member.check(2), Ok(()));
        assert!(
            matches!(member.check(3), Err(ScopeRefusal::Forbidden(m)) if m.contains("role operator in project 'lab'; user 'mo' has role viewer there"))
        );
        assert_eq!(member.check(4), Err(ScopeRefusal::Hidden));
        assert_eq!(member.readable(), Some(vec![2, 3]));
        // A global viewer reads every project, so another project's object is forbidden, not
        // hidden.
        let viewer = Scope::Projects {
            user: "mo".into(),
            reads_all: true,
            grants,
            needed: Role::Operator,
        };
        assert!(matches!(viewer.check(4), Err(ScopeRefusal::Forbidden(_))));
        assert_eq!(viewer.readable(), None);
        assert_eq!(Scope::All.check(4), Ok(()));
        assert_eq!(Scope::All.readable(), None);
    }

    #[test]
    fn nonce_counts_are_accepted_once_in_any_order_within_a_window() {
        let mut c = NonceCounts::default();
        assert!(!c.accept(0), "counts start at 1");
        assert!(c.accept(1));
        assert!(!c.accept(1), "a replay");
        assert!(c.accept(4), "a gap: 2 and 3 are still in flight");
        assert!(c.accept(3));
        assert!(c.accept(2));
        assert!(!c.accept(3) && !c.accept(2) && !c.accept(4));
        assert!(c.accept(100));
        assert!(c.accept(40), "within the 64 below the highest");
        assert!(!c.accept(36), "too old to tell: refused");
        assert!(!c.accept(40));
        assert!(c.accept(200), "a jump past the window forgets it");
        assert!(!c.accept(100) && c.accept(199));
    }

    #[test]
    fn digest_responses_match_the_rfc_7616_examples() {
        let record = UserRecord::with_password(
            "Mufasa",
            Role::Viewer,
            "http-auth@example.org",
            "Circle of Life",
        );
        for (algorithm, ha1, response) in [
            (
                "SHA-256",
                &record.ha1_sha256,
                "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
            ),
            ("MD5", &record.ha1_md5, "8ca523f5e9506fed4657c9700eebdbec"),
        ] {
            let auth = AuthorizationHeader::parse(&rfc_header(algorithm, response)).unwrap();
            assert_eq!(auth.nc, 1);
            assert_eq!(auth.qop, Some(digest_auth::Qop::AUTH));
            let cnonce = auth.cnonce.clone().unwrap();
            assert_eq!(
                expected_response(&auth, ha1, "GET", &cnonce),
                response,
                "{algorithm}"
            );
            // Another method or another password gives another response.
            assert_ne!(expected_response(&auth, ha1, "POST", &cnonce), response);
            let other = UserRecord::with_password(
                "Mufasa",
                Role::Viewer,
                "http-auth@example.org",
                "circle of life",
            );
            assert_ne!(
                expected_response(&auth, &other.ha1_md5, "GET", &cnonce),
                response
            );
        }
    }

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        assert!(constant_eq(b"token-123", b"token-123"));
        assert!(!constant_eq(b"token-123", b"token-124"));
        assert!(!constant_eq(b"token-123", b"token-1234"));
        assert!(!constant_eq(b"", b"x"));
    }

    #[test]
    fn roles_and_user_names_read_and_refuse_clearly() {
        for role in [Role::Member, Role::Viewer, Role::Operator, Role::Admin] {
            assert_eq!(role.to_string().parse::<Role>(), Ok(role));
        }
        assert!(Role::Admin >= Role::Operator && Role::Operator >= Role::Viewer);
        assert!("root".parse::<Role>().unwrap_err().contains("admin"));
    }

    #[test]
    fn endpoint_families_of_paths_and_lists() {
        assert_eq!(Family::of("/v1/servers"), Some(Family::Fleet));
        assert_eq!(Family::of("/v1/servers/sim-1"), Some(Family::Fleet));
        assert_eq!(
            Family::of("/v1/environments/web"),
            Some(Family::Environments)
        );
        assert_eq!(Family::of("/v1/containers"), Some(Family::Containers));
        assert_eq!(Family::of("/v1/containers/3"), Some(Family::Containers));
        assert_eq!(Family::of("/v1/containers/3/logs"), None);
        assert_eq!(Family::of("/v1/containers/3/export"), None);
        assert_eq!(Family::of("/v1/commands/7"), Some(Family::Commands));
        assert_eq!(Family::of("/v1/plugins"), Some(Family::Plugins));
        assert_eq!(Family::of("/v1/serversx"), None);
        assert_eq!(Family::of("/v1/users"), None);
        assert_eq!(
            Family::parse_list(" fleet, commands,fleet ,").unwrap(),
            vec![Family::Fleet, Family::Commands]
        );
        assert!(
            Family::parse_list("logs").is_err(),
            "logs are never anonymous"
        );
        assert_eq!(Family::parse_list("").unwrap(), vec![]);
        let e = Family::parse_list("fleet,secrets").unwrap_err();
        assert!(e.contains("'secrets'") && e.contains("environments"), "{e}");
        for (name, f) in Family::ALL {
            assert_eq!(f.to_string(), name);
        }
        assert!(validate_user_name("ada.lovelace_1").is_ok());
        assert!(validate_user_name("").is_err());
        assert!(validate_user_name("a b").is_err());
        assert!(
            validate_user_name("Anonymous")
                .unwrap_err()
                .contains("without credentials")
        );
    }
}
