//! Where a model version's files are and which of them is the model: artifact
//! URIs, the `MLmodel` file's ONNX flavor, and the choice of the ONNX file.
//! Pure: the listing and the `MLmodel` text come from [`super::rest`].

/// What an artifact URI names, in the forms a tracking server hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactUri {
    /// `mlflow-artifacts:/PATH` (or `mlflow-artifacts://HOST/PATH`): a path
    /// under the server's artifact proxy, which `mlflow server
    /// --serve-artifacts` serves at `/api/2.0/mlflow-artifacts/artifacts/`.
    Proxy { authority: Option<String>, path: String },
    /// `runs:/RUN_ID/PATH`: a path under a run's artifact root.
    Run { run_id: String, path: String },
    /// `models:/m-ID`: an MLflow 3 logged model.
    LoggedModel { id: String },
    /// `models:/NAME/VERSION`: another registered model version (the source
    /// of a copied version).
    Registered { name: String, version: String },
}

/// Parses an artifact URI, refusing the schemes this import does not read
/// (`s3:`, `file:`, a bare path...) by name. The reason is the whole message.
pub fn parse_artifact_uri(uri: &str) -> Result<ArtifactUri, String> {
    let Some((scheme, rest)) = uri.split_once(':').filter(|(s, _)| !s.is_empty() && !s.contains('/')) else {
        return Err(unsupported(uri, "a local path"));
    };
    match scheme {
        "mlflow-artifacts" => {
            let (authority, path) = match rest.strip_prefix("//") {
                Some(r) => {
                    let (host, path) = r.split_once('/').unwrap_or((r, ""));
                    ((!host.is_empty()).then(|| host.to_owned()), path)
                }
                None => (None, rest),
            };
            Ok(ArtifactUri::Proxy { authority, path: clean_path(uri, path)? })
        }
        "runs" => {
            let rest = rest.trim_start_matches('/');
            let (run_id, path) = rest.split_once('/').unwrap_or((rest, ""));
            if run_id.is_empty() || !run_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(format!("artifact URI {uri} names no run"));
            }
            Ok(ArtifactUri::Run { run_id: run_id.to_owned(), path: clean_path(uri, path)? })
        }
        "models" => {
            let rest = rest.trim_start_matches('/');
            match rest.rsplit_once('/') {
                None if rest.starts_with("m-") && rest.len() > 2 => {
                    Ok(ArtifactUri::LoggedModel { id: rest.to_owned() })
                }
                Some((name, version)) if !name.is_empty() && version.bytes().all(|b| b.is_ascii_digit()) => {
                    Ok(ArtifactUri::Registered { name: name.to_owned(), version: version.to_owned() })
                }
                _ => Err(format!(
                    "artifact URI {uri} is a models: URI this import does not resolve (it reads models:/m-ID and \
                     models:/NAME/VERSION)"
                )),
            }
        }
        other => Err(unsupported(uri, &format!("the {other}: scheme"))),
    }
}

fn unsupported(uri: &str, what: &str) -> String {
    format!(
        "artifact URI {uri} is {what}, which this import does not read: it reads artifacts through the tracking \
         server's proxy (mlflow-artifacts:, runs: and models: URIs; run `mlflow server --serve-artifacts`)"
    )
}

/// A relative path without empty, `.` or `..` segments.
fn clean_path(uri: &str, path: &str) -> Result<String, String> {
    let mut out = Vec::new();
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        if seg == "." || seg == ".." {
            return Err(format!("artifact URI {uri} has a `{seg}` segment"));
        }
        out.push(seg);
    }
    Ok(out.join("/"))
}

/// Joins two relative artifact paths.
pub fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_owned(),
        (_, true) => a.to_owned(),
        _ => format!("{a}/{b}"),
    }
}

/// The model file an `MLmodel` file's `onnx` flavor names (`flavors: onnx:
/// data: model.onnx`), if it has one. A line scan of the one key it needs,
/// not a YAML parser: MLflow writes this file in block style, one key a line.
pub fn onnx_data_path(mlmodel: &str) -> Option<String> {
    // The indent of `flavors:`, of `onnx:` under it, and of the keys directly
    // under `onnx:` (set by the first of them).
    let mut flavors: Option<usize> = None;
    let mut onnx: Option<(usize, Option<usize>)> = None;
    for line in mlmodel.lines() {
        let body = line.trim_start();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let indent = line.len() - body.len();
        if onnx.is_some_and(|(o, _)| indent <= o) {
            onnx = None;
        }
        if flavors.is_some_and(|f| indent <= f) {
            flavors = None;
        }
        let Some((key, value)) = body.split_once(':') else { continue };
        let value = value.trim();
        match (flavors, &mut onnx) {
            (None, _) if indent == 0 && key == "flavors" && value.is_empty() => flavors = Some(indent),
            (Some(_), None) if key == "onnx" && value.is_empty() => onnx = Some((indent, None)),
            (Some(_), Some((_, child))) => {
                let child = *child.get_or_insert(indent);
                if indent == child && key == "data" {
                    let v = value.trim_matches(|c| c == '\'' || c == '"');
                    return (!v.is_empty()).then(|| v.to_owned());
                }
            }
            _ => {}
        }
    }
    None
}

/// One file of a version's artifacts, its path relative to the version's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub path: String,
    pub size: Option<u64>,
}

/// Picks the ONNX file among a version's files: the one the `MLmodel` file's
/// onnx flavor names (`onnx_data`), else the only `*.onnx` file. None, or
/// several with nothing to choose between them, is refused naming what was found.
pub fn choose_onnx<'a>(files: &'a [Listed], onnx_data: Option<&str>) -> Result<&'a Listed, String> {
    if let Some(data) = onnx_data {
        let data = data.trim_start_matches("./");
        return files.iter().find(|f| f.path == data).ok_or_else(|| {
            format!("the MLmodel file's onnx flavor names {data}, which is not among the artifacts ({})", found(files))
        });
    }
    let onnx: Vec<&Listed> = files.iter().filter(|f| f.path.to_ascii_lowercase().ends_with(".onnx")).collect();
    match onnx.as_slice() {
        [one] => Ok(one),
        [] => Err(format!("no ONNX file among the artifacts ({})", found(files))),
        several => Err(format!(
            "several ONNX files and no MLmodel onnx flavor to choose between them: {}",
            names(several.iter().copied())
        )),
    }
}

/// The publisher's model-signing bundle logged beside the ONNX file, if
/// any: `<stem>.sig` (`model.onnx` -> `model.sig`, model-signing's default
/// name) in the same directory.
pub fn signature_beside<'a>(files: &'a [Listed], onnx: &Listed) -> Option<&'a Listed> {
    let (dir, file) = onnx.path.rsplit_once('/').map_or(("", onnx.path.as_str()), |(d, f)| (d, f));
    let stem = file.len().checked_sub(".onnx".len()).and_then(|n| file.get(..n)).unwrap_or(file);
    let wanted = if dir.is_empty() { format!("{stem}.sig") } else { format!("{dir}/{stem}.sig") };
    files.iter().find(|f| f.path == wanted)
}

/// "found: a, b and 3 more", or "found nothing".
fn found(files: &[Listed]) -> String {
    if files.is_empty() { "found nothing".into() } else { format!("found: {}", names(files.iter())) }
}

fn names<'a>(files: impl ExactSizeIterator<Item = &'a Listed>) -> String {
    const SHOWN: usize = 10;
    let total = files.len();
    let mut s = files.take(SHOWN).map(|f| f.path.as_str()).collect::<Vec<_>>().join(", ");
    if total > SHOWN {
        s.push_str(&format!(" and {} more", total - SHOWN));
    }
    s
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_bundle_named_after_the_onnx_file_beside_it_is_its_signature() {
        let files: Vec<Listed> =
            ["model/model.onnx", "model/model.sig", "model.sig", "other/model.sig", "net.onnx", "net.sig"]
                .iter()
                .map(|p| Listed { path: (*p).to_owned(), size: Some(1) })
                .collect();
        let sig =
            |onnx: &str| signature_beside(&files, &Listed { path: onnx.into(), size: None }).map(|f| f.path.clone());
        assert_eq!(sig("model/model.onnx").as_deref(), Some("model/model.sig"));
        assert_eq!(sig("net.onnx").as_deref(), Some("net.sig"));
        assert_eq!(sig("model/other.onnx"), None);
    }
    use super::*;

    fn proxy(path: &str) -> ArtifactUri {
        ArtifactUri::Proxy { authority: None, path: path.into() }
    }

    #[test]
    fn the_uris_a_tracking_server_returns_resolve() {
        // What MLflow 3.17 returns: a logged model's source, its download URI,
        // and a version created from a run's artifact directory.
        assert_eq!(
            parse_artifact_uri("mlflow-artifacts:/0/models/m-c60c/artifacts"),
            Ok(proxy("0/models/m-c60c/artifacts"))
        );
        assert_eq!(parse_artifact_uri("models:/m-c60c114e"), Ok(ArtifactUri::LoggedModel { id: "m-c60c114e".into() }));
        assert_eq!(
            parse_artifact_uri("runs:/e68c7821/model"),
            Ok(ArtifactUri::Run { run_id: "e68c7821".into(), path: "model".into() })
        );
        assert_eq!(
            parse_artifact_uri("runs:/e68c7821"),
            Ok(ArtifactUri::Run { run_id: "e68c7821".into(), path: "".into() })
        );
        assert_eq!(
            parse_artifact_uri("models:/digits/3"),
            Ok(ArtifactUri::Registered { name: "digits".into(), version: "3".into() })
        );
        assert_eq!(
            parse_artifact_uri("mlflow-artifacts://mlflow.example:5000/1/abc/artifacts/"),
            Ok(ArtifactUri::Proxy { authority: Some("mlflow.example:5000".into()), path: "1/abc/artifacts".into() })
        );
    }

    #[test]
    fn other_schemes_are_refused_by_name() {
        for (uri, named) in [
            ("s3://bucket/1/abc/artifacts", "the s3: scheme"),
            ("file:///srv/mlruns/1/abc", "the file: scheme"),
            ("/srv/mlruns/1/abc/artifacts", "a local path"),
            ("gs://b/x", "the gs: scheme"),
        ] {
            let e = parse_artifact_uri(uri).unwrap_err();
            assert!(e.contains(named) && e.contains("--serve-artifacts"), "{uri}: {e}");
        }
        assert!(parse_artifact_uri("models:/digits@champion").unwrap_err().contains("does not resolve"));
        assert!(parse_artifact_uri("mlflow-artifacts:/0/../etc").unwrap_err().contains("`..`"));
        assert!(parse_artifact_uri("runs:/").unwrap_err().contains("names no run"));
    }

    const MLMODEL: &str = "artifact_path: mlflow-artifacts:/0/models/m-c60c/artifacts
flavors:
  onnx:
    code: null
    data: model.onnx
    onnx_version: 1.23.2
    providers:
    - CPUExecutionProvider
  python_function:
    data: other.onnx
    loader_module: mlflow.onnx
mlflow_version: 3.17.2
";

    #[test]
    fn the_mlmodel_onnx_flavor_names_the_file() {
        assert_eq!(onnx_data_path(MLMODEL).as_deref(), Some("model.onnx"));
        // Only the onnx flavor's `data`, not another flavor's or a top-level one.
        let pyfunc_only = "data: top.onnx\nflavors:\n  python_function:\n    data: x.onnx\nonnx:\n  data: y.onnx\n";
        assert_eq!(onnx_data_path(pyfunc_only), None);
        assert_eq!(onnx_data_path("flavors:\n  onnx:\n    data: 'sub/m.onnx'\n").as_deref(), Some("sub/m.onnx"));
        assert_eq!(onnx_data_path(""), None);
        assert_eq!(onnx_data_path("flavors:\n  onnx:\n  data: outside.onnx\n"), None);
        // A `data` key deeper down (an option's) is not the flavor's.
        let nested = "flavors:\n  onnx:\n    options:\n      data: deep.onnx\n    data: m.onnx\n";
        assert_eq!(onnx_data_path(nested).as_deref(), Some("m.onnx"));
    }

    fn files(paths: &[&str]) -> Vec<Listed> {
        paths.iter().map(|p| Listed { path: (*p).into(), size: Some(1) }).collect()
    }

    #[test]
    fn the_onnx_file_is_the_flavors_else_the_only_one() {
        let fs = files(&["MLmodel", "conda.yaml", "model.onnx", "extra/other.onnx"]);
        assert_eq!(choose_onnx(&fs, Some("model.onnx")).unwrap().path, "model.onnx");
        let e = choose_onnx(&fs, None).unwrap_err();
        assert!(e.contains("several ONNX files") && e.contains("model.onnx, extra/other.onnx"), "{e}");
        let e = choose_onnx(&fs, Some("gone.onnx")).unwrap_err();
        assert!(e.contains("names gone.onnx") && e.contains("found: MLmodel, conda.yaml"), "{e}");

        let fs = files(&["model/DIGITS.ONNX", "README.md"]);
        assert_eq!(choose_onnx(&fs, None).unwrap().path, "model/DIGITS.ONNX");

        let e = choose_onnx(&files(&["model.pkl", "requirements.txt"]), None).unwrap_err();
        assert_eq!(e, "no ONNX file among the artifacts (found: model.pkl, requirements.txt)");
        assert_eq!(choose_onnx(&[], None).unwrap_err(), "no ONNX file among the artifacts (found nothing)");
        let many: Vec<String> = (0..12).map(|i| format!("f{i}.txt")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(choose_onnx(&files(&many), None).unwrap_err().ends_with("f9.txt and 2 more)"));
    }
}
