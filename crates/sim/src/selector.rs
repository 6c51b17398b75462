//! Label selectors (equality- and set-based) and field selectors, parsed from query strings the
//! way the API server parses them.

use std::collections::BTreeMap;

/// A selector string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse requirement {requirement:?}: {reason}")]
pub struct SelectorError {
    /// The offending requirement.
    pub requirement: String,
    /// Why.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

/// A parsed label selector; empty selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<(String, Op)>,
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(input: &str) -> Vec<&str> {
    let (mut depth, mut start, mut parts) = (0i32, 0usize, Vec::new());
    for (i, c) in input.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&input[start..]);
    parts
}

fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = key.rsplit_once('/').unwrap_or(("", key));
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.len() <= 253
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'));
    name_ok && prefix_ok && !(key.contains('/') && prefix.is_empty())
}

impl LabelSelector {
    /// Parses `app=web,tier!=db,env in (a,b),!legacy,gpu`.
    pub fn parse(input: &str) -> Result<LabelSelector, SelectorError> {
        let mut requirements = Vec::new();
        if input.trim().is_empty() {
            return Ok(LabelSelector { requirements });
        }
        for raw in split_top_level(input) {
            let req = raw.trim();
            let fail = |reason: &str| SelectorError {
                requirement: req.to_string(),
                reason: reason.to_string(),
            };
            let (key, op) = if let Some(key) = req.strip_prefix('!') {
                (key.trim().to_string(), Op::DoesNotExist)
            } else if let Some((key, value)) = req.split_once("!=") {
                (
                    key.trim().to_string(),
                    Op::NotEquals(value.trim().to_string()),
                )
            } else if let Some((key, value)) = req.split_once("==") {
                (key.trim().to_string(), Op::Equals(value.trim().to_string()))
            } else if let Some((key, value)) = req.split_once('=') {
                (key.trim().to_string(), Op::Equals(value.trim().to_string()))
            } else if let Some(open) = req.find('(') {
                let close = req
                    .rfind(')')
                    .filter(|c| *c > open)
                    .ok_or_else(|| fail("missing ')'"))?;
                if !req[close + 1..].trim().is_empty() {
                    return Err(fail("unexpected text after ')'"));
                }
                let head: Vec<&str> = req[..open].split_whitespace().collect();
                let values: Vec<String> = req[open + 1..close]
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .collect();
                match head.as_slice() {
                    [key, "in"] => (key.to_string(), Op::In(values)),
                    [key, "notin"] => (key.to_string(), Op::NotIn(values)),
                    _ => return Err(fail("expected `key in (...)` or `key notin (...)`")),
                }
            } else {
                (req.to_string(), Op::Exists)
            };
            if !valid_label_key(&key) {
                return Err(fail("invalid label key"));
            }
            requirements.push((key, op));
        }
        Ok(LabelSelector { requirements })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|(key, op)| {
            let value = labels.get(key);
            match op {
                Op::Equals(v) => value == Some(v),
                Op::NotEquals(v) => value != Some(v),
                Op::In(vs) => value.is_some_and(|x| vs.contains(x)),
                Op::NotIn(vs) => value.is_none_or(|x| !vs.contains(x)),
                Op::Exists => value.is_some(),
                Op::DoesNotExist => value.is_none(),
            }
        })
    }
}

/// A parsed field selector: `field=value` / `field!=value` requirements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    requirements: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses `spec.nodeName=n1,status.phase!=Running`, allowing only `supported` fields.
    pub fn parse(input: &str, supported: &[&str]) -> Result<FieldSelector, SelectorError> {
        let mut requirements = Vec::new();
        if input.trim().is_empty() {
            return Ok(FieldSelector { requirements });
        }
        for raw in input.split(',') {
            let req = raw.trim();
            let (field, equal, value) = if let Some((f, v)) = req.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = req.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = req.split_once('=') {
                (f, true, v)
            } else {
                return Err(SelectorError {
                    requirement: req.into(),
                    reason: "expected field=value or field!=value".into(),
                });
            };
            let field = field.trim();
            if !["metadata.name", "metadata.namespace"].contains(&field)
                && !supported.contains(&field)
            {
                return Err(SelectorError {
                    requirement: req.into(),
                    reason: format!("field label not supported: {field}"),
                });
            }
            requirements.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector { requirements })
    }

    /// Whether the object's indexed `fields` satisfy every requirement.
    pub fn matches(&self, fields: &dyn Fn(&str) -> Option<String>) -> bool {
        self.requirements.iter().all(|(field, equal, value)| {
            let actual = fields(field).unwrap_or_default();
            (actual == *value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn equality_and_set_based() {
        let l = labels(&[
            ("app", "web"),
            ("env", "prod"),
            ("shoal.dev/pool", "general"),
        ]);
        let yes = [
            "",
            "app=web",
            "app==web",
            "env!=dev",
            "env in (prod, staging)",
            "tier notin (db)",
            "shoal.dev/pool",
            "!legacy",
            "app=web,env in (prod)",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&l), "{s}");
        }
        let no = [
            "app=api",
            "env notin (prod)",
            "env in (dev)",
            "legacy",
            "!app",
            "app=web,env=dev",
        ];
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(&l), "{s}");
        }
    }

    #[test]
    fn malformed_selectors_are_rejected() {
        for s in ["env in (a", "env oops (a)", "bad key!", "/x=1"] {
            assert!(LabelSelector::parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn field_selectors_only_on_supported_fields() {
        let supported = ["spec.nodeName", "status.phase"];
        let s = FieldSelector::parse("spec.nodeName=n1,status.phase!=Running", &supported).unwrap();
        let get = |f: &str| match f {
            "spec.nodeName" => Some("n1".to_string()),
            "status.phase" => Some("Pending".to_string()),
            _ => None,
        };
        assert!(s.matches(&get));
        assert!(FieldSelector::parse("spec.schedulerName=x", &supported).is_err());
        assert!(FieldSelector::parse("metadata.name=a", &[]).is_ok());
    }

    proptest! {
        #[test]
        fn parsing_never_panics(s in ".{0,40}") {
            let _ = LabelSelector::parse(&s);
            let _ = FieldSelector::parse(&s, &["spec.nodeName"]);
        }
    }
}
