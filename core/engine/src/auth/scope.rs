//! Where a caller may act: the projects its role or its grants reach.

use super::*;

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
            // (No user may be named `anonymous`: `validate_user_name`.)
            // Anonymous reads (`auth.anonymous = read`) see the project `default` and the
            // fleet: what other projects hold is for their members.
            Ok(()) if *who == Principal::Anonymous && self.config.anonymous == Anonymous::Read => {
                return Ok(Scope::Projects {
                    user: "anonymous".into(),
                    reads_all: false,
                    grants: BTreeMap::from([(
                        crate::projects::DEFAULT,
                        ("default".to_string(), Role::Viewer),
                    )]),
                    needed,
                });
            }
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
        Err(AuthError::Forbidden(
            if held.is_empty() && needed < Role::Admin {
                format!(
                    "{message} and no role in any project: an admin grants one with `cloud48 \
                 project grant PROJECT {name} {needed}`"
                )
            } else if held.is_empty() {
                message.clone()
            } else {
                format!("{message} (and only {})", held.join(", "))
            },
        ))
    }
}
