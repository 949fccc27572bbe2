//! The OpenAPI description, generated from the handlers' annotations.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{admin, artifact, deployments, devices, models, upload, versions};
use crate::web::{events, session};

#[derive(Debug)]
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Sentinel hub", description = "Signed ONNX model registry and deployments"),
    modifiers(&BearerAuth),
    paths(
        models::list, models::create, models::show, models::update, models::delete,
        upload::upload, versions::list, versions::show, versions::update, versions::manifest,
        artifact::model, artifact::validation,
        deployments::deploy, deployments::rollback, deployments::list, deployments::show,
        devices::enroll, devices::list, devices::show, devices::remove,
        admin::create_token, admin::list_tokens, admin::revoke_token, admin::keys, admin::rotate_key,
        admin::audit, admin::healthz, admin::readyz, spec,
        session::whoami, session::ticket, events::stream,
    ),
    // The event stream's `data` payloads: a `text/event-stream` body has no
    // JSON schema of its own, so its response description names these.
    components(schemas(events::Hello, events::Change, events::Heartbeat, events::Expired))
)]
pub struct ApiDoc;

/// The OpenAPI document as JSON.
#[utoipa::path(get, path = "/api/v1/openapi.json", responses((status = 200, description = "OpenAPI 3 document")))]
pub async fn spec() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
