//! Users: their records and password hashes, their names, and the store of them in the database.

use super::*;

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

/// Checks a user name: 1-64 of letters, digits, `-`, `_`, `.`; not `anonymous`, which names
/// callers without credentials (in the audit trail, scopes and events).
pub fn validate_user_name(name: &str) -> Result<(), String> {
    if name.eq_ignore_ascii_case("anonymous") {
        return Err(
            "'anonymous' is how callers without credentials are named; choose another user name"
                .into(),
        );
    }
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
