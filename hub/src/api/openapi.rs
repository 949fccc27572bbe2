//! The OpenAPI description, generated from the handlers' annotations.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

use super::{admin, artifact, deployments, devices, events, models, publishers, session, telemetry, upload, versions};
use crate::string_schema;

/// `{name}`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code, reason = "read by the OpenAPI derive only")]
pub struct ModelPath {
    /// Model name.
    #[param(
        min_length = 1,
        max_length = 128,
        pattern = r"^(?:[_-]|\.[_-])*\.?[A-Za-z0-9](?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$"
    )]
    name: String,
}

/// `{name}` and `{version}`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code, reason = "read by the OpenAPI derive only")]
pub struct VersionPath {
    /// Model name.
    #[param(
        min_length = 1,
        max_length = 128,
        pattern = r"^(?:[_-]|\.[_-])*\.?[A-Za-z0-9](?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$"
    )]
    name: String,
    /// Semantic version, e.g. `1.2.0`.
    #[param(min_length = 5, max_length = 128)]
    version: String,
}

/// `{name}`, `{version}` and the validation set's `{part}`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code, reason = "read by the OpenAPI derive only")]
pub struct ValidationPath {
    /// Model name.
    #[param(
        min_length = 1,
        max_length = 128,
        pattern = r"^(?:[_-]|\.[_-])*\.?[A-Za-z0-9](?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$"
    )]
    name: String,
    /// Semantic version, e.g. `1.2.0`.
    #[param(min_length = 5, max_length = 128)]
    version: String,
    /// `inputs` or `labels`.
    #[param(pattern = "^(inputs|labels)$")]
    part: String,
}

/// `{id}` of a device.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code, reason = "read by the OpenAPI derive only")]
pub struct DevicePath {
    /// Device id.
    #[param(min_length = 1, max_length = 128)]
    id: String,
}

/// `{id}` of a deployment or a token.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code, reason = "read by the OpenAPI derive only")]
pub struct IdPath {
    /// Numeric id.
    id: i64,
}

string_schema!(
    /// A model name (also a device id): letters, digits, '-', '_' and '.', at
    /// least one letter or digit, no `..`.
    ModelName,
    "^(?:[_-]|\\.[_-])*\\.?[A-Za-z0-9](?:[A-Za-z0-9_-]|\\.[A-Za-z0-9_-])*\\.?$",
    max_length = 128
);

string_schema!(
    /// A free-form tag: 1 to 64 characters, no commas or control characters.
    Tag,
    "^[^,\\x00-\\x1f\\x7f-\\x9f]{1,64}$");

string_schema!(
    /// A hardware tag: letters, digits, '-', '_' or '.', 1 to 63.
    HardwareTag,
    "^[A-Za-z0-9._-]{1,63}$");

string_schema!(
    /// A deployment target: `key=value` parts (or a bare word, short for
    /// `ring=WORD`) joined by commas, keys and values of letters, digits, '-',
    /// '_', '.' or '/' (1 to 63); or `*` for every device. The old key `stage`
    /// reads as `ring`, with a warning, until the next release.
    Target,
    "^(?: *\\* *|[ ,]* *[A-Za-z0-9._/-]{1,63} *(?:= *[A-Za-z0-9._/-]{1,63} *)?(?:,[ ,]* *[A-Za-z0-9._/-]{1,63} *(?:= *[A-Za-z0-9._/-]{1,63} *)?)*[ ,]*)$");

string_schema!(
    /// A token's name: 1 to 64 characters, no control characters.
    TokenName,
    "^[^\\x00-\\x1f\\x7f-\\x9f]{1,64}$");

/// Semantic versioning pattern of a new version (major, minor and patch of
/// at most 16 digits).
pub const SEMVER_PATTERN: &str = "^(?:0|[1-9][0-9]{0,15})\\.(?:0|[1-9][0-9]{0,15})\\.(?:0|[1-9][0-9]{0,15})(?:-(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)(?:\\.(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*)?(?:\\+[0-9A-Za-z-]+(?:\\.[0-9A-Za-z-]+)*)?$";

/// A stage name, as filters and uploads take it.
#[derive(Debug, ToSchema)]
#[schema(as = StageName)]
#[allow(dead_code, reason = "a schema only")]
pub enum StageName {
    #[schema(rename = "development")]
    Development,
    #[schema(rename = "dev")]
    Dev,
    #[schema(rename = "staging")]
    Staging,
    #[schema(rename = "production")]
    Production,
    #[schema(rename = "prod")]
    Prod,
    #[schema(rename = "archived")]
    Archived,
}

/// A role a token can be created with (device tokens come from enrolment).
#[derive(Debug, ToSchema)]
#[allow(dead_code, reason = "a schema only")]
pub enum CreatableRole {
    #[schema(rename = "viewer")]
    Viewer,
    #[schema(rename = "publisher")]
    Publisher,
    #[schema(rename = "deployer")]
    Deployer,
    #[schema(rename = "admin")]
    Admin,
}

/// A deployment state, as the list filter takes it.
#[derive(Debug, ToSchema)]
#[allow(dead_code, reason = "a schema only")]
pub enum DeploymentState {
    #[schema(rename = "active")]
    Active,
    #[schema(rename = "superseded")]
    Superseded,
    #[schema(rename = "rolled_back")]
    RolledBack,
    #[schema(rename = "halted")]
    Halted,
    #[schema(rename = "cancelled")]
    Cancelled,
}

#[derive(Debug)]
struct BearerAuth;

/// Adds the error answers every operation of a kind can give, so each one
/// a handler can return is documented: 400 (a malformed query, path or
/// header: two `Authorization` headers reach every route), 401 and 403 for
/// operations that need a token, 404 where the path names something, 413,
/// 415 and 422 where a JSON body is read.
#[derive(Debug)]
struct CommonErrors;

impl Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{HttpMethod, Operation};
        use utoipa::openapi::{ContentBuilder, Ref, Response, ResponseBuilder};
        let error = |description: &str| -> Response {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
                )
                .build()
        };
        let add = |op: &mut Operation, status: &str, description: &str| {
            if !op.responses.responses.contains_key(status) {
                op.responses.responses.insert(status.to_owned(), error(description).into());
            }
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            for method in [HttpMethod::Get, HttpMethod::Post, HttpMethod::Put, HttpMethod::Delete] {
                let op = match method {
                    HttpMethod::Get => item.get.as_mut(),
                    HttpMethod::Post => item.post.as_mut(),
                    HttpMethod::Put => item.put.as_mut(),
                    HttpMethod::Delete => item.delete.as_mut(),
                    _ => None,
                };
                let Some(op) = op else { continue };
                add(op, "400", "Malformed request: a query or path parameter, or a header, is invalid");
                if op.security.as_ref().is_some_and(|s| !s.is_empty()) {
                    add(op, "401", "No token, an unknown or revoked token, or a malformed Authorization header");
                    add(op, "403", "The token's role does not allow this");
                }
                if path.contains('{') {
                    add(op, "404", "What the path names does not exist");
                }
                let json_body =
                    op.request_body.as_ref().is_some_and(|b| b.content.keys().any(|k| k == "application/json"));
                if json_body {
                    add(op, "413", "The body is larger than a JSON body may be (2 MiB)");
                    add(op, "415", "The body is not sent as application/json");
                    add(op, "422", "The body is JSON but not what this operation takes");
                }
            }
        }
    }
}

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
    modifiers(&BearerAuth, &CommonErrors),
    paths(
        models::list, models::create, models::show, models::update, models::delete,
        upload::upload, versions::list, versions::show, versions::update, versions::manifest,
        artifact::model, artifact::validation, artifact::signature,
        deployments::deploy, deployments::rollback, deployments::list, deployments::show,
        devices::enroll, devices::list, devices::show, devices::remove,
        telemetry::device, telemetry::deployment,
        admin::create_token, admin::list_tokens, admin::revoke_token, admin::keys, admin::rotate_key,
        admin::audit, admin::healthz, admin::readyz, spec,
        publishers::add, publishers::list, publishers::remove,
        session::whoami, session::ticket, events::stream,
    ),
    // The event stream's `data` payloads: a `text/event-stream` body has no
    // JSON schema of its own, so its response description names these.
    components(schemas(events::Hello, events::Change, events::Heartbeat, events::Expired, super::error::ErrorBody,
        StageName, DeploymentState, CreatableRole, ModelName, Tag, HardwareTag, Target, TokenName, crate::rollout::policy::Phase))
)]
pub struct ApiDoc;

/// The OpenAPI document as JSON.
#[utoipa::path(get, path = "/api/v1/openapi.json", responses((status = 200, description = "OpenAPI 3 document")))]
pub async fn spec() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
