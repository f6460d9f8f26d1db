//! Secrets containers receive: a type's workload names `${secret:NAME}` (the mysql type's
//! `MARIADB_PASSWORD`, the tomcat type's password to that database) and each container gets
//! the value of NAME in its scope: its environment, so that the members of one environment
//! share it (the database and its clients agree), or the container itself outside
//! environments. Values derive from the platform's key (HMAC-SHA256 of the scope and name):
//! nothing per secret is stored, every core of a cluster derives the same, and a container that
//! moves, is replaced or restarts gets the same value. Operators read one with
//! `GET /v1/containers/{id}/secrets/{name}`; the values appear nowhere else (not in commands,
//! views or the audit trail).

use hmac::{Hmac, Mac};
use sea_orm::{ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, Set};
use sha2::Sha256;

use crate::entities::platform;

/// The platform's key secrets derive from.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// Whose secret a value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretScope {
    /// Shared by the members of an environment.
    Environment(i64),
    /// A container outside environments.
    Container(i64),
}

impl SecretScope {
    /// The scope of a container in `environment` (or none) with this id.
    pub fn of(environment: Option<i64>, container: i64) -> SecretScope {
        environment.map_or(SecretScope::Container(container), SecretScope::Environment)
    }
}

impl SecretKey {
    /// A key from its stored hex; `None` if it is not 64 hex digits.
    pub fn from_hex(text: &str) -> Option<SecretKey> {
        let bytes = hex::decode(text).ok()?;
        Some(SecretKey(bytes.try_into().ok()?))
    }

    /// The value of secret `name` in `scope`: 32 lowercase hex digits (safe in a shell word,
    /// an SQL string and a URL).
    pub fn derive(&self, scope: SecretScope, name: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("any key length");
        let scope = match scope {
            SecretScope::Environment(id) => format!("environment/{id}"),
            SecretScope::Container(id) => format!("container/{id}"),
        };
        mac.update(scope.as_bytes());
        mac.update(b"\0");
        mac.update(name.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }
}

/// The key of the local platform `row`, made and stored on the first start (a conditional
/// write: of cores starting together on one database, the first one's key is everyone's).
pub(crate) async fn platform_key(
    db: &DatabaseConnection,
    row: &platform::Model,
) -> Result<SecretKey, DbErr> {
    let unreadable = |id| {
        DbErr::Custom(format!(
            "platform {id}: its secret key is not 64 hex digits; restore it from a backup of the database"
        ))
    };
    if let Some(text) = &row.secret {
        return SecretKey::from_hex(text).ok_or_else(|| unreadable(row.id));
    }
    platform::Entity::update_many()
        .set(platform::ActiveModel {
            secret: Set(Some(hex::encode(rand::random::<[u8; 32]>()))),
            ..Default::default()
        })
        .filter(platform::Column::Id.eq(row.id))
        .filter(platform::Column::Secret.is_null())
        .exec(db)
        .await?;
    let stored = platform::Entity::find_by_id(row.id)
        .one(db)
        .await?
        .and_then(|p| p.secret)
        .ok_or_else(|| DbErr::RecordNotFound(format!("platform {}", row.id)))?;
    SecretKey::from_hex(&stored).ok_or_else(|| unreadable(row.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_differ_by_scope_and_name_and_not_by_call() {
        let key = SecretKey([7; 32]);
        let env = SecretScope::Environment(3);
        let a = key.derive(env, "mysql");
        assert_eq!(a, key.derive(env, "mysql"));
        assert_eq!(a.len(), 32);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, key.derive(env, "redis"));
        assert_ne!(a, key.derive(SecretScope::Environment(4), "mysql"));
        assert_ne!(a, key.derive(SecretScope::Container(3), "mysql"));
        assert_ne!(a, SecretKey([8; 32]).derive(env, "mysql"));
        assert_eq!(SecretScope::of(Some(3), 9), env);
        assert_eq!(SecretScope::of(None, 9), SecretScope::Container(9));
    }

    #[test]
    fn keys_read_back_only_from_64_hex_digits() {
        let key = SecretKey::from_hex(&"ab".repeat(32)).unwrap();
        assert_eq!(key.0, [0xab; 32]);
        assert!(SecretKey::from_hex("abc").is_none());
        assert!(SecretKey::from_hex(&"zz".repeat(32)).is_none());
        assert!(format!("{key:?}").contains(".."));
    }
}
