//! API errors as Kubernetes `Status` objects with the HTTP codes real clients expect.

use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A request the API server refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 404: the object does not exist.
    #[error("{resource} \"{name}\" not found")]
    NotFound {
        /// Plural resource.
        resource: String,
        /// Object name.
        name: String,
    },
    /// 404: no such path or resource type.
    #[error("the server could not find the requested resource ({0})")]
    NoSuchPath(String),
    /// 409: create of an existing name.
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists {
        /// Plural resource.
        resource: String,
        /// Object name.
        name: String,
    },
    /// 409: update with a stale resourceVersion.
    #[error(
        "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
    )]
    Conflict {
        /// Plural resource.
        resource: String,
        /// Object name.
        name: String,
    },
    /// 422: the object is invalid.
    #[error("{kind} \"{name}\" is invalid: {}", .causes.iter().map(|(f, m)| format!("{f}: {m}")).collect::<Vec<_>>().join(", "))]
    Invalid {
        /// Kind.
        kind: String,
        /// Object name.
        name: String,
        /// (field, message) pairs.
        causes: Vec<(String, String)>,
    },
    /// 400: the request itself is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 410: the requested resourceVersion is too old.
    #[error("too old resource version: {requested} ({oldest})")]
    Gone {
        /// The version asked for.
        requested: u64,
        /// The oldest still available.
        oldest: u64,
    },
    /// 403: e.g. new objects in a namespace being deleted.
    #[error("{0}")]
    Forbidden(String),
    /// 429: e.g. an eviction a PodDisruptionBudget forbids.
    #[error("{0}")]
    TooManyRequests(String),
    /// 405.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 415.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 500.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// HTTP status code.
    pub fn code(&self) -> u16 {
        match self {
            ApiError::NotFound { .. } | ApiError::NoSuchPath(_) => 404,
            ApiError::AlreadyExists { .. } | ApiError::Conflict { .. } => 409,
            ApiError::Invalid { .. } => 422,
            ApiError::BadRequest(_) => 400,
            ApiError::Gone { .. } => 410,
            ApiError::Forbidden(_) => 403,
            ApiError::TooManyRequests(_) => 429,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::Internal(_) => 500,
        }
    }

    /// The `reason` field of the Status.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } | ApiError::NoSuchPath(_) => "NotFound",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } => "Conflict",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Gone { .. } => "Expired",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::TooManyRequests(_) => "TooManyRequests",
            ApiError::MethodNotAllowed(_) => "MethodNotAllowed",
            ApiError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            ApiError::Internal(_) => "InternalError",
        }
    }

    /// The error as a `Status` object.
    pub fn status(&self) -> serde_json::Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        match self {
            ApiError::NotFound { resource, name }
            | ApiError::AlreadyExists { resource, name }
            | ApiError::Conflict { resource, name } => {
                status["details"] = json!({ "name": name, "kind": resource });
            }
            ApiError::Invalid { kind, name, causes } => {
                let causes: Vec<_> = causes
                    .iter()
                    .map(|(field, message)| json!({ "reason": "FieldValueInvalid", "message": message, "field": field }))
                    .collect();
                status["details"] = json!({ "name": name, "kind": kind, "causes": causes });
            }
            _ => {}
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = axum::http::StatusCode::from_u16(self.code())
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        let body = self.status().to_string();
        (
            code,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}
