//! metav1.LabelSelector, compiled once and validated as the API server would
//! (`LabelSelectorAsSelector`): unknown operators, missing or stray values and malformed keys
//! or values are errors, never "matches nothing".
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::enrich::model::{FieldError, Labels};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// A compiled selector; no requirements selects everything (`{}`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Compile; errors carry a field path relative to the selector.
    pub fn compile(sel: &LabelSelector) -> Result<Self, FieldError> {
        let mut requirements = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            let field = format!("matchLabels.{k}");
            check_key(k).map_err(|e| FieldError::new(&field, e))?;
            check_value(v).map_err(|e| FieldError::new(&field, e))?;
            requirements.push(Requirement::Equals(k.clone(), v.clone()));
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let field = format!("matchExpressions[{i}]");
            check_key(&e.key).map_err(|w| FieldError::new(format!("{field}.key"), w))?;
            let values = e.values.clone().unwrap_or_default();
            let needs_values = match e.operator.as_str() {
                "In" | "NotIn" => true,
                "Exists" | "DoesNotExist" => false,
                other => {
                    return Err(FieldError::new(
                        format!("{field}.operator"),
                        format!("unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"),
                    ));
                }
            };
            if needs_values && values.is_empty() {
                return Err(FieldError::new(
                    format!("{field}.values"),
                    format!("operator {} needs at least one value", e.operator),
                ));
            }
            if !needs_values && !values.is_empty() {
                return Err(FieldError::new(
                    format!("{field}.values"),
                    format!("operator {} takes no values", e.operator),
                ));
            }
            for (j, v) in values.iter().enumerate() {
                check_value(v).map_err(|w| FieldError::new(format!("{field}.values[{j}]"), w))?;
            }
            let key = e.key.clone();
            requirements.push(match e.operator.as_str() {
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                _ => Requirement::DoesNotExist(key),
            });
        }
        Ok(Self { requirements })
    }

    /// A selector of exactly these labels.
    pub fn from_labels(labels: &Labels) -> Self {
        Self {
            requirements: labels
                .iter()
                .map(|(k, v)| Requirement::Equals(k.clone(), v.clone()))
                .collect(),
        }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    pub fn selects_everything(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// A qualified name: optional DNS-subdomain prefix and `/`, then a name of at most 63
/// alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
pub fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err(format!(
                "invalid label key {key:?}: the prefix must be a DNS subdomain"
            ));
        }
    }
    if name.is_empty() {
        return Err(format!("invalid label key {key:?}: empty name"));
    }
    check_name(name).map_err(|why| format!("invalid label key {key:?}: {why}"))
}

/// Empty, or a name as in [`check_key`].
pub fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    check_name(value).map_err(|why| format!("invalid label value {value:?}: {why}"))
}

fn check_name(s: &str) -> Result<(), &'static str> {
    if s.len() > 63 {
        return Err("longer than 63 characters");
    }
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_alphanumeric();
    if !b.first().is_some_and(alnum) || !b.last().is_some_and(alnum) {
        return Err("must start and end with an alphanumeric character");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err("only alphanumerics, '-', '_' and '.' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    fn sel(exprs: Vec<LabelSelectorRequirement>) -> Result<Selector, FieldError> {
        Selector::compile(&LabelSelector {
            match_expressions: Some(exprs),
            match_labels: None,
        })
    }

    #[test]
    fn operators() {
        let l = labels(&[("app", "db"), ("tier", "back")]);
        assert!(
            sel(vec![expr("app", "In", &["db", "web"])])
                .unwrap()
                .matches(&l)
        );
        assert!(!sel(vec![expr("app", "In", &["web"])]).unwrap().matches(&l));
        assert!(
            sel(vec![expr("app", "NotIn", &["web"])])
                .unwrap()
                .matches(&l)
        );
        assert!(
            !sel(vec![expr("app", "NotIn", &["db"])])
                .unwrap()
                .matches(&l)
        );
        // NotIn matches pods without the key at all.
        assert!(
            sel(vec![expr("env", "NotIn", &["prod"])])
                .unwrap()
                .matches(&l)
        );
        assert!(sel(vec![expr("tier", "Exists", &[])]).unwrap().matches(&l));
        assert!(!sel(vec![expr("env", "Exists", &[])]).unwrap().matches(&l));
        assert!(
            sel(vec![expr("env", "DoesNotExist", &[])])
                .unwrap()
                .matches(&l)
        );
        assert!(
            !sel(vec![expr("app", "DoesNotExist", &[])])
                .unwrap()
                .matches(&l)
        );
        assert!(Selector::default().matches(&l));
    }

    #[test]
    fn invalid_selectors_are_errors() {
        let e = sel(vec![expr("app", "Equals", &["db"])]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "matchExpressions[0].operator: unknown operator \"Equals\" (In, NotIn, Exists, DoesNotExist)"
        );
        let e = sel(vec![expr("app", "In", &[])]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "matchExpressions[0].values: operator In needs at least one value"
        );
        let e = sel(vec![expr("app", "Exists", &["x"])]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "matchExpressions[0].values: operator Exists takes no values"
        );
        let e = Selector::compile(&LabelSelector {
            match_labels: Some(labels(&[("app", "bad value")])),
            match_expressions: None,
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "matchLabels.app: invalid label value \"bad value\": only alphanumerics, '-', '_' and '.' are allowed"
        );
    }

    #[test]
    fn label_keys() {
        assert!(check_key("app").is_ok());
        assert!(check_key("app.kubernetes.io/name").is_ok());
        assert!(check_key("kubernetes.io/metadata.name").is_ok());
        assert!(check_key("/name").is_err());
        assert!(check_key("Bad_Prefix/name").is_err());
        assert!(check_key("a/").is_err());
        assert!(check_key("-app").is_err());
        assert!(check_key(&"a".repeat(64)).is_err());
        assert!(check_value("").is_ok());
        assert!(check_value("v1.2_3-x").is_ok());
    }
}
