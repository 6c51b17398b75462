//! [`Secret`]: a config value that must never be shown — a password, a token, a join token in a
//! class's environment. It is given inline, or as `{ fromFile: path }` (a mounted Secret) or
//! `{ fromEnv: NAME }`, and prints, logs and serializes as `<redacted>`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a redacted value is shown as.
pub const REDACTED: &str = "<redacted>";

/// A secret config value (see the module docs). Only [`Secret::expose`] gives the value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret with this value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that needs it (the call to the backend).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether no value is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { REDACTED })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { REDACTED })
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Source {
    Inline(String),
    Reference(Reference),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Reference {
    #[serde(default)]
    from_file: Option<std::path::PathBuf>,
    #[serde(default)]
    from_env: Option<String>,
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        use serde::de::Error;
        match Source::deserialize(d)? {
            Source::Inline(value) => {
                if value == REDACTED {
                    return Err(D::Error::custom(
                        "is the redacted placeholder printed by --print-config, not a value: give the secret, or { fromFile: path } / { fromEnv: NAME }",
                    ));
                }
                Ok(Secret(value))
            }
            Source::Reference(Reference {
                from_file: Some(path),
                from_env: None,
            }) => std::fs::read_to_string(&path)
                .map(|v| Secret(v.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|e| D::Error::custom(format!("fromFile {}: {e}", path.display()))),
            Source::Reference(Reference {
                from_file: None,
                from_env: Some(name),
            }) => std::env::var(&name)
                .map(Secret)
                .map_err(|_| D::Error::custom(format!("fromEnv {name}: not set"))),
            Source::Reference(_) => Err(D::Error::custom(
                "give exactly one of fromFile or fromEnv (or the value as a string)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_comes_from_inline_file_or_env_and_never_shows() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("token");
        std::fs::write(&file, "from-a-file\n").expect("write");
        let s: Secret =
            serde_json::from_value(serde_json::json!({ "fromFile": file })).expect("fromFile");
        assert_eq!(s.expose(), "from-a-file");
        let s: Secret = serde_json::from_value(serde_json::json!("inline")).expect("inline");
        assert_eq!(s.expose(), "inline");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(serde_json::to_string(&s).expect("json"), "\"<redacted>\"");
        let err = serde_json::from_value::<Secret>(
            serde_json::json!({ "fromEnv": "SHOAL_TEST_NOT_SET_EVER" }),
        )
        .expect_err("unset env");
        assert!(err.to_string().contains("SHOAL_TEST_NOT_SET_EVER"), "{err}");
        let err =
            serde_json::from_value::<Secret>(serde_json::json!(REDACTED)).expect_err("placeholder");
        assert!(err.to_string().contains("placeholder"), "{err}");
    }
}
