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

/// What a user may do; each role includes the ones below it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Nothing of its own: reads and acts only in the projects where it is granted a role.
    Member,
    /// Read everything.
    Viewer,
    /// Also operate environments, containers and commands.
    Operator,
    /// Also manage servers, plugins and users.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Member => "member",
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "member" => Ok(Role::Member),
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!(
                "unknown role '{s}' (expected admin, operator, viewer or member)"
            )),
        }
    }
}

/// What anonymous requests may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymous {
    /// Nothing.
    None,
    /// Read (the default).
    Read,
    /// Everything: for local development only.
    Full,
}

impl std::str::FromStr for Anonymous {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Anonymous::None),
            "read" => Ok(Anonymous::Read),
            "full" => Ok(Anonymous::Full),
            _ => Err(format!(
                "unknown anonymous access '{s}' (expected none, read or full)"
            )),
        }
    }
}

/// A family of endpoints, for what anonymous requests may read (`auth.anonymous_read`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// Servers and their load (`/v1/servers`).
    Fleet,
    /// Environments and their members (`/v1/environments`).
    Environments,
    /// Containers (`/v1/containers`, without logs and export).
    Containers,
    /// Commands, with their parameters and results (exec output among them).
    Commands,
    /// Installed plugins.
    Plugins,
    /// The core's metrics (`/metrics`).
    Metrics,
}

impl Family {
    /// Every family, by its name in the configuration.
    pub const ALL: [(&'static str, Family); 6] = [
        ("fleet", Family::Fleet),
        ("environments", Family::Environments),
        ("containers", Family::Containers),
        ("commands", Family::Commands),
        ("plugins", Family::Plugins),
        ("metrics", Family::Metrics),
    ];

    /// What anonymous requests may read by default: fleet and environment summaries.
    pub const DEFAULT_ANONYMOUS: [Family; 2] = [Family::Fleet, Family::Environments];

    /// The family of a read of `path`; `None` for what anonymous requests never read: exports,
    /// secrets and logs (the core would pull them from an agent; what runs inside may print secrets),
    /// users, anything else.
    pub fn of(path: &str) -> Option<Family> {
        let under = |area: &str| path == area || path.starts_with(&format!("{area}/"));
        if under("/v1/servers") || under("/v1/cluster") {
            Some(Family::Fleet)
        } else if under("/v1/environments") {
            Some(Family::Environments)
        } else if under("/v1/containers") {
            if path.ends_with("/logs") || path.ends_with("/export") || path.contains("/secrets/") {
                None
            } else {
                Some(Family::Containers)
            }
        } else if under("/v1/commands") {
            Some(Family::Commands)
        } else if under("/v1/plugins") {
            Some(Family::Plugins)
        } else if path == "/metrics" {
            Some(Family::Metrics)
        } else {
            None
        }
    }

    /// The families named in a comma-separated list (`fleet,environments`); empty means none.
    pub fn parse_list(text: &str) -> Result<Vec<Family>, String> {
        let mut out = Vec::new();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let Some((_, f)) = Family::ALL.iter().find(|(n, _)| *n == name) else {
                let names: Vec<_> = Family::ALL.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "unknown endpoint family '{name}' (expected some of: {})",
                    names.join(", ")
                ));
            };
            if !out.contains(f) {
                out.push(*f);
            }
        }
        Ok(out)
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = Family::ALL
            .iter()
            .find(|(_, x)| x == self)
            .map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

/// A user and the hashes its password is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// User name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// `MD5(name:realm:password)`, hex.
    pub ha1_md5: String,
    /// `SHA-256(name:realm:password)`, hex.
    pub ha1_sha256: String,
}

impl UserRecord {
    /// Hashes a password for `realm`; the password itself is not kept.
    pub fn with_password(name: &str, role: Role, realm: &str, password: &str) -> Self {
        let a1 = format!("{name}:{realm}:{password}");
        UserRecord {
            name: name.to_string(),
            role,
            ha1_md5: Algorithm::new(AlgorithmType::MD5, false).hash_str(&a1),
            ha1_sha256: Algorithm::new(AlgorithmType::SHA2_256, false).hash_str(&a1),
        }
    }
}

/// Checks a user name: 1-64 of letters, digits, `-`, `_`, `.`.
pub fn validate_user_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a valid user name: use 1-64 letters, digits, '-', '_' or '.'"
        ))
    }
}

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
                    "replayed request: nonce count {} was already used",
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

/// Where a caller may act: everywhere (a global role that suffices, or anonymous access), or
/// only in the projects where its grants give it the role a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every project.
    All,
    /// Only by project grants.
    Projects {
        /// The user.
        user: String,
        /// Its global role reads every project (`viewer` or more).
        reads_all: bool,
        /// Its roles by project: id → (name, role).
        grants: BTreeMap<i64, (String, Role)>,
        /// The role the request needs.
        needed: Role,
    },
}

/// Why a scoped caller may not touch an object of a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeRefusal {
    /// It may not even read the project: the object is answered as missing.
    Hidden,
    /// It may read the project but lacks the needed role there.
    Forbidden(String),
}

impl Scope {
    /// The projects the caller may read; `None`: all.
    pub fn readable(&self) -> Option<Vec<i64>> {
        match self {
            Scope::All
            | Scope::Projects {
                reads_all: true, ..
            } => None,
            Scope::Projects { grants, .. } => Some(grants.keys().copied().collect()),
        }
    }

    /// Whether the caller may act in `project` with the role its request needs.
    pub fn check(&self, project: i64) -> Result<(), ScopeRefusal> {
        let Scope::Projects {
            user,
            reads_all,
            grants,
            needed,
        } = self
        else {
            return Ok(());
        };
        match grants.get(&project) {
            Some((_, role)) if role >= needed => Ok(()),
            Some((name, role)) => Err(ScopeRefusal::Forbidden(format!(
                "this needs role {needed} in project '{name}'; user '{user}' has role {role} there"
            ))),
            None if *reads_all => Err(ScopeRefusal::Forbidden(format!(
                "this needs role {needed} in this object's project; user '{user}' has none there"
            ))),
            None => Err(ScopeRefusal::Hidden),
        }
    }
}

impl Authenticator {
    /// Where `who` may make a request that needs `needed` (reading `family`): everywhere when
    /// `authorize` allows it, else in the projects where the user's grants give that role;
    /// refused when there are none.
    pub async fn scope(
        &self,
        who: &Principal,
        needed: Role,
        family: Option<Family>,
    ) -> Result<Scope, AuthError> {
        let refusal = match self.authorize(who, needed, family).await {
            Ok(()) => return Ok(Scope::All),
            Err(e) => e,
        };
        let (Principal::User { name, role }, AuthError::Forbidden(message)) = (who, &refusal)
        else {
            return Err(refusal);
        };
        let grants = crate::projects::grants_of(&self.db, name)
            .await
            .map_err(|e| {
                AuthError::Forbidden(format!(
                    "{message} (its project roles could not be read: {e})"
                ))
            })?;
        if grants.values().any(|(_, r)| *r >= needed) {
            return Ok(Scope::Projects {
                user: name.clone(),
                reads_all: *role >= Role::Viewer,
                grants,
                needed,
            });
        }
        let held: Vec<String> = grants
            .values()
            .map(|(p, r)| format!("{r} in project '{p}'"))
            .collect();
        Err(AuthError::Forbidden(if held.is_empty() {
            message.clone()
        } else {
            format!("{message} (and only {})", held.join(", "))
        }))
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

/// Users stored in the database (`cloud48 user ...`).
pub struct UserStore<'a> {
    db: &'a DatabaseConnection,
    realm: &'a str,
}

/// A user as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserInfo {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at: i64,
}

impl<'a> UserStore<'a> {
    /// The users of `db`, hashed for `realm`.
    pub fn new(db: &'a DatabaseConnection, realm: &'a str) -> Self {
        UserStore { db, realm }
    }

    /// Adds a user; refuses an existing name.
    pub async fn add(&self, name: &str, role: Role, password: &str) -> Result<(), String> {
        validate_user_name(name)?;
        if password.len() < 8 {
            return Err("the password must have at least 8 characters".into());
        }
        if self.find(name).await?.is_some() {
            return Err(format!(
                "user '{name}' already exists; use `cloud48 user passwd {name}` to change the password"
            ));
        }
        let r = UserRecord::with_password(name, role, self.realm, password);
        user::ActiveModel {
            name: Set(r.name),
            role: Set(role.to_string()),
            ha1_md5: Set(r.ha1_md5),
            ha1_sha256: Set(r.ha1_sha256),
            created_at: Set(now_ms()),
            ..Default::default()
        }
        .insert(self.db)
        .await
        .map_err(|e| e.to_string())?;
        Ok(())
    }

    async fn find(&self, name: &str) -> Result<Option<user::Model>, String> {
        user::Entity::find()
            .filter(user::Column::Name.eq(name))
            .one(self.db)
            .await
            .map_err(|e| e.to_string())
    }

    /// Changes a user's password.
    pub async fn passwd(&self, name: &str, password: &str) -> Result<(), String> {
        if password.len() < 8 {
            return Err("the password must have at least 8 characters".into());
        }
        let row = self
            .find(name)
            .await?
            .ok_or_else(|| format!("user '{name}' does not exist"))?;
        let role: Role = row.role.parse()?;
        let r = UserRecord::with_password(name, role, self.realm, password);
        let mut am: user::ActiveModel = row.into();
        am.ha1_md5 = Set(r.ha1_md5);
        am.ha1_sha256 = Set(r.ha1_sha256);
        am.update(self.db).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Removes a user; refuses to remove the last admin while other users remain (nobody could
    /// manage servers, plugins or users any more).
    pub async fn remove(&self, name: &str) -> Result<(), String> {
        let row = self
            .find(name)
            .await?
            .ok_or_else(|| format!("user '{name}' does not exist"))?;
        if row.role == Role::Admin.to_string() {
            let others = user::Entity::find()
                .filter(user::Column::Name.ne(name))
                .all(self.db)
                .await
                .map_err(|e| e.to_string())?;
            let admins = others
                .iter()
                .filter(|u| u.role == Role::Admin.to_string())
                .count();
            if admins == 0 && !others.is_empty() {
                return Err(format!(
                    "user '{name}' is the last admin; add another first (`cloud48 user add NAME --role admin`), or remove the other users before this one"
                ));
            }
        }
        user::Entity::delete_by_id(row.id)
            .exec(self.db)
            .await
            .map_err(|e| e.to_string())?;
        // A user added later under the same name starts with no project roles.
        crate::entities::project_grant::Entity::delete_many()
            .filter(crate::entities::project_grant::Column::UserName.eq(name))
            .exec(self.db)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Every stored user, by name.
    pub async fn list(&self) -> Result<Vec<UserInfo>, String> {
        Ok(user::Entity::find()
            .order_by_asc(user::Column::Name)
            .all(self.db)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|u| UserInfo {
                role: u.role.parse().unwrap_or(Role::Viewer),
                name: u.name,
                created_at: u.created_at,
            })
            .collect())
    }
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
    }
}
