//! `/api/v1/models/{name}/versions`: read and edit versions and their signed
//! manifests. Uploading lives in [`super::upload`].

use axum::Json;
use axum::extract::State;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use prost::Message as _;
use sentinel_proto::ManifestView;
use sentinel_proto::manifest::{AccuracyView, parse_stage, sign_manifest, stage_name};
use sentinel_proto::pb::{self, ModelManifest};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::AuditDetail;
use super::models::{check_lookup_name, check_tags};
use super::{ApiError, ApiJson, ApiPath, ApiQuery, Caller, PageParams, SharedState, page, page_of};
use crate::auth::Role;
use crate::store::VersionRecord;
use sentinel_proto::quote;

/// A stored version: the manifest's facts plus who registered it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VersionOut {
    pub model: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub stage: String,
    pub hardware: Vec<String>,
    pub key_id: String,
    pub created_at_ms: i64,
    pub created_by: String,
    /// The decoded signed manifest.
    pub manifest: ManifestView,
    /// What devices will meet: inputs with symbolic dims besides the batch
    /// that no serving shape fixes (devices refuse to load the version unless
    /// their `serving.input_shapes` fixes them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Inputs with symbolic non-batch dims that no signed serving shape fixes.
pub fn open_dims_warnings(m: &ModelManifest) -> Vec<String> {
    use sentinel_proto::pb::dimension::Kind;
    m.inputs
        .iter()
        .filter(|t| !m.serving_shapes.iter().any(|s| s.input == t.name))
        .filter(|t| t.shape.iter().skip(1).any(|d| !matches!(d.kind, Some(Kind::Fixed(_)))))
        .map(|t| {
            format!(
                "input `{}` has symbolic dims {} besides the batch: devices refuse to load this version unless \
                 their serving.input_shapes fixes them; push with --input-shape {}=... to fix them for every device",
                t.name,
                crate::onnx::show_shape(&t.shape),
                t.name
            )
        })
        .collect()
}

impl VersionOut {
    pub fn from_record(v: &VersionRecord) -> Result<Self, ApiError> {
        let manifest = ModelManifest::decode(v.manifest.as_slice())
            .map_err(|e| ApiError::internal("decoding a stored manifest", &e))?;
        Ok(Self {
            model: v.model.clone(),
            version: v.version.clone(),
            sha256: v.sha256.clone(),
            size: v.size,
            stage: v.stage.clone(),
            hardware: v.hardware.clone(),
            key_id: v.key_id.clone(),
            created_at_ms: v.created_at_ms,
            created_by: v.created_by.clone(),
            manifest: ManifestView::from(&manifest),
            warnings: (!manifest.check_skipped.is_empty())
                .then(|| manifest.check_skipped.clone())
                .into_iter()
                .chain(open_dims_warnings(&manifest))
                .collect(),
        })
    }
}

/// The signed manifest as a device receives it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SignedManifestOut {
    /// Protobuf `sentinel.v1.ModelManifest` bytes, standard base64. The
    /// signature covers `"sentinel-manifest-v1\0" || these bytes`.
    pub manifest: String,
    /// Ed25519 signature, standard base64.
    pub signature: String,
    pub key_id: String,
    /// The same manifest decoded, for people; never what is verified.
    pub decoded: ManifestView,
}

impl SignedManifestOut {
    /// The signed manifest in wire form.
    pub fn to_signed(&self) -> Result<pb::SignedManifest, base64::DecodeError> {
        Ok(pb::SignedManifest {
            manifest: B64.decode(&self.manifest)?,
            signature: B64.decode(&self.signature)?,
            key_id: self.key_id.clone(),
        })
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVersion {
    #[schema(value_type = Option<super::openapi::StageName>)]
    pub stage: Option<String>,
    pub accuracy: Option<AccuracyView>,
    #[schema(value_type = Option<Vec<super::openapi::HardwareTag>>)]
    pub hardware: Option<Vec<String>>,
    #[schema(value_type = Option<Vec<super::openapi::Tag>>)]
    pub tags: Option<Vec<String>>,
}

/// The most digits of a major, minor or patch number, and the longest
/// version: what the OpenAPI description declares for a new version.
const MAX_VERSION_DIGITS: usize = 16;
const MAX_VERSION_LEN: usize = 128;

/// Checks the version of a new version: semver, with a message that says
/// what is expected.
pub fn check_version(version: &str) -> Result<(), ApiError> {
    semver::Version::parse(version)
        .map_err(|e| ApiError::bad_request(format!("version {} is not semver (e.g. 1.2.0): {e}", quote(version))))?;
    let core = version.split(['-', '+']).next().unwrap_or_default();
    if version.len() > MAX_VERSION_LEN || core.split('.').any(|n| n.len() > MAX_VERSION_DIGITS) {
        return Err(ApiError::bad_request(format!(
            "version {} is too long: at most {MAX_VERSION_LEN} characters, {MAX_VERSION_DIGITS} digits per number",
            quote(version)
        )));
    }
    Ok(())
}

/// Checks a version a caller looks up: one that is not valid semver cannot
/// exist, so it is not found (404) rather than malformed.
pub fn check_lookup_version(name: &str, version: &str) -> Result<(), ApiError> {
    semver::Version::parse(version).map(|_| ()).map_err(|e| {
        ApiError::not_found(format!("model {} has no version {}: not semver ({e})", quote(name), quote(version)))
    })
}

/// Checks hardware target tags.
pub fn check_hardware(tags: &[String]) -> Result<(), ApiError> {
    for t in tags {
        if t.is_empty() || t.len() > 63 || !t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(ApiError::bad_request(format!(
                "hardware tag {} is invalid: use letters, digits, '-', '_' or '.' (e.g. aarch64, jetson-orin)",
                quote(t)
            )));
        }
    }
    Ok(())
}

/// Checks a declared accuracy.
pub fn check_accuracy(a: &AccuracyView) -> Result<(), ApiError> {
    if !a.value.is_finite() || !(0.0..=1.0).contains(&a.value) {
        return Err(ApiError::bad_request(format!("accuracy {} must be a fraction between 0 and 1", a.value)));
    }
    if a.metric.trim().is_empty() {
        return Err(ApiError::unprocessable("invalid_accuracy", "accuracy needs a metric name, e.g. top1"));
    }
    Ok(())
}

pub async fn load_version(state: &SharedState, name: &str, version: &str) -> Result<VersionRecord, ApiError> {
    check_lookup_name(name)?;
    check_lookup_version(name, version)?;
    let (n, v) = (name.to_owned(), version.to_owned());
    let (model, found) = state.meta(move |m| Ok((m.get_model(&n)?, m.get_version(&n, &v)?))).await?;
    if model.is_none() {
        return Err(ApiError::not_found(format!("model {} is not registered", quote(name))));
    }
    found.ok_or_else(|| ApiError::not_found(format!("model {} has no version {version}", quote(name))))
}

/// Loads a version that a request body names (a deploy's or a rollback's
/// target version). The model is the resource in the path, so a missing model
/// is 404; a version it does not have is 422: the request is well formed, but
/// names nothing that can be deployed.
pub async fn load_named_version(state: &SharedState, name: &str, version: &str) -> Result<VersionRecord, ApiError> {
    check_lookup_name(name)?;
    let unknown = |why: String| {
        ApiError::unprocessable(
            "unknown_version",
            format!("model {} has no version {}{why}", quote(name), quote(version)),
        )
    };
    if let Err(e) = semver::Version::parse(version) {
        return Err(unknown(format!(": not semver ({e})")));
    }
    let (n, v) = (name.to_owned(), version.to_owned());
    let (model, found) = state.meta(move |m| Ok((m.get_model(&n)?, m.get_version(&n, &v)?))).await?;
    if model.is_none() {
        return Err(ApiError::not_found(format!("model {} is not registered", quote(name))));
    }
    found.ok_or_else(|| unknown(String::new()))
}

/// A page of a model's versions.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VersionList {
    pub versions: Vec<VersionOut>,
    pub total: u64,
    pub limit: u32,
    pub offset: u32,
}

/// List a model's versions, newest first, one page at a time.
#[utoipa::path(get, path = "/api/v1/models/{name}/versions", params(super::openapi::ModelPath, PageParams),
    security(("bearer" = [])),
    responses((status = 200, body = VersionList), (status = 404, body = super::error::ErrorBody)))]
pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    // A result, so the role check comes first.
    query: Result<ApiQuery<PageParams>, ApiError>,
) -> Result<Json<VersionList>, ApiError> {
    caller.require(Role::Viewer, "listing versions")?;
    let ApiQuery(p) = query?;
    let (limit, offset) = page(p.limit, p.offset)?;
    let (_, versions) = super::models::load_model(&state, &name).await?;
    let (versions, total) = page_of(versions, limit, offset);
    Ok(Json(VersionList { versions, total, limit, offset }))
}

/// Show one version.
#[utoipa::path(get, path = "/api/v1/models/{name}/versions/{version}", params(super::openapi::VersionPath), security(("bearer" = [])),
    responses((status = 200, body = VersionOut), (status = 404, body = super::error::ErrorBody)))]
pub async fn show(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath((name, version)): ApiPath<(String, String)>,
) -> Result<Json<VersionOut>, ApiError> {
    caller.require(Role::Viewer, "reading a version")?;
    Ok(Json(VersionOut::from_record(&load_version(&state, &name, &version).await?)?))
}

/// The signed manifest: exact bytes, signature and key id.
#[utoipa::path(get, path = "/api/v1/models/{name}/versions/{version}/manifest", params(super::openapi::VersionPath), security(("bearer" = [])),
    responses((status = 200, body = SignedManifestOut), (status = 404, body = super::error::ErrorBody)))]
pub async fn manifest(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath((name, version)): ApiPath<(String, String)>,
) -> Result<Json<SignedManifestOut>, ApiError> {
    caller.require(Role::Viewer, "reading a manifest")?;
    let v = load_version(&state, &name, &version).await?;
    let decoded = VersionOut::from_record(&v)?.manifest;
    Ok(Json(SignedManifestOut {
        manifest: B64.encode(&v.manifest),
        signature: B64.encode(&v.signature),
        key_id: v.key_id,
        decoded,
    }))
}

/// Change a version's stage, accuracy, hardware or tags. The manifest is
/// re-signed with the hub's active key.
#[utoipa::path(put, path = "/api/v1/models/{name}/versions/{version}", params(super::openapi::VersionPath), request_body = UpdateVersion,
    security(("bearer" = [])),
    responses((status = 200, body = VersionOut), (status = 404, body = super::error::ErrorBody)))]
pub async fn update(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath((name, version)): ApiPath<(String, String)>,
    // A result, so the role check comes first: a caller without the role
    // gets 403 whatever the body holds.
    body: Result<ApiJson<UpdateVersion>, ApiError>,
) -> Result<axum::response::Response, ApiError> {
    caller.require(Role::Publisher, "editing a version")?;
    let ApiJson(body) = body?;
    let mut record = load_version(&state, &name, &version).await?;
    let mut m = ModelManifest::decode(record.manifest.as_slice())
        .map_err(|e| ApiError::internal("decoding a stored manifest", &e))?;
    let mut changed = Vec::new();
    if let Some(stage) = &body.stage {
        m.stage = parse_stage(stage).map_err(|e| ApiError::bad_request(e.to_string()))? as i32;
        changed.push(format!("stage={stage}"));
    }
    if let Some(a) = &body.accuracy {
        check_accuracy(a)?;
        m.accuracy = Some(pb::Accuracy { metric: a.metric.clone(), value: a.value, dataset: a.dataset.clone() });
        changed.push(format!("accuracy={}:{}", a.metric, a.value));
    }
    if let Some(hw) = &body.hardware {
        check_hardware(hw)?;
        m.hardware = hw.clone();
        changed.push(format!("hardware={}", hw.join(",")));
    }
    if let Some(tags) = &body.tags {
        check_tags("tag", tags)?;
        m.tags = tags.clone();
        changed.push(format!("tags={}", tags.join(",")));
    }
    let signer = state.keyring().active();
    let signed = sign_manifest(&signer, &m);
    record.stage = stage_name(m.stage()).to_owned();
    record.hardware = m.hardware.clone();
    record.manifest = signed.manifest;
    record.signature = signed.signature;
    record.key_id = signed.key_id;
    let stored = record.clone();
    state.meta(move |meta| meta.update_version(&stored)).await?;
    let mut resp = axum::response::IntoResponse::into_response(Json(VersionOut::from_record(&record)?));
    resp.extensions_mut().insert(AuditDetail(format!(
        "{name} {version}: {}; re-signed with {}",
        changed.join(" "),
        record.key_id
    )));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_version_is_semver_within_the_declared_bounds() {
        for good in ["1.2.3", "1.2.3-rc.1+build.5", &format!("{}.0.0", "9".repeat(16))] {
            assert!(check_version(good).is_ok(), "{good}");
        }
        for bad in ["1.2", "01.2.3", &format!("{}.0.0", "9".repeat(17)), &format!("1.0.0-{}", "a".repeat(130))] {
            assert_eq!(check_version(bad).unwrap_err().status, axum::http::StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(check_lookup_version("m", "latest").unwrap_err().status, axum::http::StatusCode::NOT_FOUND);
    }
}
