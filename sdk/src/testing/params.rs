//! Parameters on the fake platform: checked and filled in as the core does.

use std::collections::BTreeMap;

use crate::Metadata;

/// The parameters of a new container of `meta`: `given` checked, defaults filled in.
pub(super) fn resolve(
    meta: &Metadata,
    given: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    if let Some(unknown) = given
        .keys()
        .find(|k| !meta.params.iter().any(|p| &&p.name == k))
    {
        return Err(format!("{} has no parameter '{unknown}'", meta.name));
    }
    let mut out = BTreeMap::new();
    for p in &meta.params {
        let v = given
            .get(&p.name)
            .or(p.default.as_ref())
            .ok_or_else(|| format!("parameter '{}' of {} is required", p.name, meta.name))?;
        check_kind(p, v)?;
        out.insert(p.name.clone(), v.clone());
    }
    Ok(out)
}

fn check_kind(p: &crate::ParamSpec, v: &str) -> Result<(), String> {
    let ok = match p.kind {
        crate::ParamKind::Text => true,
        crate::ParamKind::Integer => v.parse::<i64>().is_ok(),
        crate::ParamKind::Boolean => v == "true" || v == "false",
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "parameter '{}' has a value of the wrong kind: '{v}'",
            p.name
        ))
    }
}

/// Checks that every parameter in `params` exists in `meta`, is settable and of its kind.
pub(super) fn check_settable(
    meta: &Metadata,
    params: &BTreeMap<String, String>,
) -> Result<(), String> {
    for (k, v) in params {
        let spec = meta
            .params
            .iter()
            .find(|p| &p.name == k)
            .ok_or_else(|| format!("{} has no parameter '{k}'", meta.name))?;
        if !spec.settable {
            return Err(format!(
                "parameter '{k}' of {} is not settable by other members",
                meta.name
            ));
        }
        check_kind(spec, v)?;
    }
    Ok(())
}
