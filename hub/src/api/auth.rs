//! Authentication, role checks and the audit log.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::Response;

use super::{ApiError, SharedState};
use crate::auth::{Role, hash_token};
use crate::store::{AuditEntry, AuditOutcome};
use sentinel_proto::quote;

pub use crate::auth::Caller;

/// What the middleware learned from the `Authorization` header.
#[derive(Debug, Clone)]
enum Authn {
    Missing,
    Invalid(&'static str),
    Valid(Caller),
}

/// A handler sets this on its response to say, for the audit log, what the
/// call did in domain terms ("version 1.0.0, sha256 …").
#[derive(Debug, Clone)]
pub struct AuditDetail(pub String);

/// Where the web UI asks for a change-feed ticket (not audited).
const TICKET_PATH: &str = "/api/v1/events/ticket";

fn bearer(headers: &HeaderMap) -> Result<Option<&str>, &'static str> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(None) };
    let value = value.to_str().map_err(|_| "the Authorization header is not ASCII")?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
            Ok(Some(token.trim()))
        }
        _ => Err("the Authorization header must be `Bearer <token>`"),
    }
}

async fn resolve(state: &SharedState, headers: &HeaderMap) -> Result<Authn, ApiError> {
    let token = match bearer(headers) {
        Ok(None) => return Ok(Authn::Missing),
        Ok(Some(t)) => t,
        Err(reason) => return Ok(Authn::Invalid(reason)),
    };
    let hash = hash_token(token);
    let (found, device) = state
        .meta(move |m| {
            let t = m.find_token(&hash)?;
            let d = if t.is_none() { m.device_by_token(&hash)? } else { None };
            Ok((t, d))
        })
        .await?;
    Ok(match (found, device) {
        (Some(t), _) => match t.role.parse::<Role>() {
            Ok(role) => Authn::Valid(Caller { token_id: t.id, name: t.name, role, device_id: None }),
            Err(_) => Authn::Invalid("the token has a role this hub does not know"),
        },
        (None, Some(d)) => Authn::Valid(Caller {
            token_id: 0,
            name: format!("device:{}", d.id),
            role: Role::Device,
            device_id: Some(d.id),
        }),
        (None, None) => Authn::Invalid("the token is not known to this hub or was revoked"),
    })
}

/// Resolves the caller, runs the request, and audits mutating calls.
pub async fn authenticate(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    // Proxies and clients disagree on which of two credentials counts; the
    // hub takes neither rather than guess.
    let count = req.headers().get_all(header::AUTHORIZATION).iter().count();
    if count > 1 {
        return axum::response::IntoResponse::into_response(ApiError::bad_request(format!(
            "the request has {count} Authorization headers; send exactly one `Authorization: Bearer <token>`"
        )));
    }
    let authn = match resolve(&state, req.headers()).await {
        Ok(a) => a,
        Err(e) => return axum::response::IntoResponse::into_response(e),
    };
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    req.extensions_mut().insert(authn.clone());
    let response = next.run(req).await;
    // A ticket for the change feed is a POST but a read, asked for by every
    // page load of the web UI: it would bury what the log is for.
    let read_only = matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) || path == TICKET_PATH;
    if !read_only {
        let (actor, role) = match &authn {
            Authn::Valid(c) => (c.name.clone(), c.role.as_str().to_owned()),
            _ => ("anonymous".to_owned(), String::new()),
        };
        let status = response.status();
        let outcome = if status.is_success() {
            AuditOutcome::Ok
        } else if status.as_u16() == 401 || status.as_u16() == 403 {
            AuditOutcome::Denied
        } else {
            AuditOutcome::Failed
        };
        let entry = AuditEntry {
            id: 0,
            at_ms: crate::now_ms(),
            actor,
            role,
            action: format!("{method} {path}"),
            status: status.as_u16(),
            outcome,
            detail: response.extensions().get::<AuditDetail>().map(|d| d.0.clone()).unwrap_or_default(),
        };
        if let Err(e) = state.meta(move |m| m.append_audit(&entry)).await {
            tracing::error!(error = %e, "writing the audit log failed");
        }
    }
    response
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        match parts.extensions.get::<Authn>() {
            Some(Authn::Valid(c)) => Ok(c.clone()),
            Some(Authn::Invalid(reason)) => Err(ApiError::unauthorized(*reason)),
            _ => Err(ApiError::unauthorized("this endpoint needs `Authorization: Bearer <token>`")),
        }
    }
}

impl Caller {
    /// Refuses with 403 unless the caller's role allows `needed`.
    pub fn require(&self, needed: Role, doing: &str) -> Result<(), ApiError> {
        if self.role.allows(needed) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "{doing} needs the {needed} role; token {} has role {}",
                quote(&self.name),
                self.role
            )))
        }
    }
}
