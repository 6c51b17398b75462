//! Validation errors that name the field (`grpc.addr`, `spec.limits.maxNodes`) and the reason,
//! collected so that a user sees every problem at once.

use std::fmt;

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path, e.g. `election.leaseTtl` or `spec.schedule[1].timezone`.
    pub path: String,
    /// What is wrong and, where possible, what would be right.
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Every invalid field found, in the order found.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors {
    /// The problems; never empty when returned as an error.
    pub errors: Vec<FieldError>,
}

impl ValidationErrors {
    /// Records a problem at `path`.
    pub fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            reason: reason.into(),
        });
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// `Ok(value)` when nothing was recorded, else `Err(self)`.
    pub fn into_result<T>(self, value: T) -> Result<T, ValidationErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} invalid field(s):", self.errors.len())?;
        for e in &self.errors {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_error_with_its_path() {
        let mut errs = ValidationErrors::default();
        assert!(errs.clone().into_result(()).is_ok());
        errs.add("grpc.addr", "not a socket address");
        errs.add("election.leaseTtl", "must be at least 1s");
        let text = errs.clone().into_result(()).unwrap_err().to_string();
        assert!(text.contains("2 invalid field(s)"));
        assert!(text.contains("grpc.addr: not a socket address"));
        assert!(text.contains("election.leaseTtl: must be at least 1s"));
    }
}
