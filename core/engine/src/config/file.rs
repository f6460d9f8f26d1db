//! Reading the settings file: walking its TOML tables into keys, resolving `${…}`
//! placeholders, checking each value against its declaration.

use super::declared::{Kind, SETTINGS, Spec};
use super::*;

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

pub(super) fn walk(
    text: &str,
    path: &Path,
    prefix: &str,
    table: &dyn toml_edit::TableLike,
    out: &mut FileValues,
    users: &mut UserTables,
) -> Result<(), ConfigError> {
    for (name, item) in table.iter() {
        let key = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        let line = table
            .key(name)
            .and_then(|k| k.span())
            .or_else(|| item.span())
            .map_or(0, |s| line_of(text, s.start));
        let at = || format!("{}:{line}", path.display());
        if key == "auth.users" {
            let Some(array) = item.as_array_of_tables() else {
                return Err(ConfigError(format!(
                    "{}: auth.users must be written as [[auth.users]] tables",
                    at()
                )));
            };
            for t in array.iter() {
                let tline = t.span().map_or(line, |s| line_of(text, s.start));
                let mut fields = HashMap::new();
                for (field, v) in t.iter() {
                    let fline = t
                        .key(field)
                        .and_then(|k| k.span())
                        .map_or(tline, |s| line_of(text, s.start));
                    let Some(s) = v.as_str() else {
                        return Err(ConfigError(format!(
                            "{}:{fline}: auth.users.{field} must be a string",
                            path.display()
                        )));
                    };
                    fields.insert(field.to_string(), (s.to_string(), fline));
                }
                users.push((fields, tline));
            }
            continue;
        }
        if let Some(t) = item.as_table_like() {
            walk(text, path, &key, t, out, users)?;
            continue;
        }
        let Some(spec) = SETTINGS.iter().find(|s| s.key == key) else {
            let known: Vec<&str> = SETTINGS.iter().map(|s| s.key).collect();
            return Err(ConfigError(format!(
                "{}: unknown key '{key}' (known keys: {}, auth.users)",
                at(),
                known.join(", ")
            )));
        };
        let value = match item.as_value() {
            Some(toml_edit::Value::String(s)) => s.value().clone(),
            Some(toml_edit::Value::Integer(i)) => i.value().to_string(),
            Some(toml_edit::Value::Float(f)) => f.value().to_string(),
            Some(toml_edit::Value::Boolean(b)) => b.value().to_string(),
            _ => {
                return Err(ConfigError(format!(
                    "{}: {} must be a string or a number",
                    at(),
                    spec.key
                )));
            }
        };
        out.insert(key, (value, line));
    }
    Ok(())
}

/// Resolves `${NAME}` and `${NAME:default}` in `raw` (`$$` is a literal `$`).
pub(super) fn resolve(
    raw: &str,
    key: &str,
    file: &FileValues,
    env: &dyn Fn(&str) -> Option<String>,
    depth: usize,
) -> Result<String, String> {
    if depth > 10 {
        return Err(format!(
            "placeholders in {key} refer to each other in a cycle"
        ));
    }
    let mut out = String::new();
    let mut rest = raw;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
            continue;
        }
        let Some(body) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let Some(end) = body.find('}') else {
            return Err(format!("unclosed placeholder '${{{body}' in {key}"));
        };
        let inner = &body[..end];
        let (name, default) = match inner.split_once(':') {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        let value = if let Some((v, _)) = file.get(name) {
            Some(resolve(v, name, file, env, depth + 1)?)
        } else {
            env(name)
        };
        match value.or_else(|| default.map(str::to_string)) {
            Some(v) => out.push_str(&v),
            None => {
                return Err(format!(
                    "unresolved placeholder ${{{name}}} in {key}: set the environment variable {name}, define the key {name}, or give a default as ${{{name}:value}}"
                ));
            }
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

pub(super) fn check(spec: &Spec, value: &str) -> Result<(), String> {
    match spec.kind {
        Kind::Text => Ok(()),
        // Agents refuse a shorter one (`cloud48 agent`), so a core given one would wait for
        // agents that never come.
        Kind::Token
            if value.is_empty() || value.chars().count() >= cloud48_model::MIN_AGENT_TOKEN =>
        {
            Ok(())
        }
        Kind::Token => Err(format!(
            "a token of {} characters: agents refuse tokens shorter than {}; choose a long \
             random one (such as the output of `openssl rand -hex 24`)",
            value.chars().count(),
            cloud48_model::MIN_AGENT_TOKEN
        )),
        Kind::Count => value
            .parse::<u64>()
            .map(|_| ())
            .map_err(|_| format!("'{value}' is not a whole number")),
        Kind::Range(least, most) => match value.parse::<u64>() {
            Ok(n) if (least..=most).contains(&n) => Ok(()),
            Ok(_) => Err(format!(
                "{value} is out of range: give a whole number from {least} to {most}"
            )),
            Err(_) => Err(format!(
                "'{value}' is not a whole number (from {least} to {most})"
            )),
        },
        Kind::Weight => match value.parse::<f64>() {
            Ok(w) if w.is_finite() && (0.0..=1000.0).contains(&w) => Ok(()),
            _ => Err(format!(
                "'{value}' is not a weight: give a decimal number from 0 to 1000, such as 0.5"
            )),
        },
        Kind::Address => value
            .parse::<std::net::SocketAddr>()
            .map(|_| ())
            .map_err(|_| format!("'{value}' is not an address like 127.0.0.1:4848")),
        Kind::Url if value.is_empty() => Ok(()),
        Kind::Url => crate::model::base_url(value).map(|_| ()),
        Kind::Families => crate::auth::Family::parse_list(value).map(|_| ()),
        Kind::Choice(options) => {
            if options.contains(&value) {
                Ok(())
            } else {
                Err(format!("'{value}' is not one of {}", options.join(", ")))
            }
        }
    }
}
