#!/usr/bin/env python3
"""Registers model versions in a real MLflow tracking server with MLflow's own
Python client, for the MLflow import test (hub/tests/it/mlflow.rs) and
benchmark (benches/src/bin/mlflow_import.rs). Run with the venv's python
(.ci/install-mlflow).

Usage: mlflow_register.py TRACKING_URI MODEL RESULT.json < SPEC.json

SPEC is a list of versions, registered in order, each an object with:
  onnx          an ONNX file, logged with mlflow.onnx.log_model in a new run
                (weights inline; "external_data": true keeps MLflow's default
                of writing them to a separate .data file)
  files         instead of onnx: plain files logged with mlflow.log_artifact
                under "model/", and that directory registered as the version
  accuracy      a run metric `accuracy` to log
  tags          {key: value} model version tags
  aliases       [alias, ...] set to this version
  stage         a legacy stage to move the version to (Staging, Production...)
RESULT (a file: MLflow prints its run links on stdout) is a list, one per version: {"version", "run_id", "sha256"} where
sha256 is that of the ONNX file as MLflow's client downloads it again (null
for "files" versions).
"""
import hashlib
import json
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")

import mlflow  # noqa: E402
import mlflow.onnx  # noqa: E402
import onnx  # noqa: E402
from mlflow import MlflowClient  # noqa: E402


def main():
    tracking_uri, model, result = sys.argv[1], sys.argv[2], sys.argv[3]
    spec = json.load(sys.stdin)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    out = []
    for v in spec:
        with mlflow.start_run() as run:
            if "accuracy" in v:
                mlflow.log_metric("accuracy", v["accuracy"])
            if "onnx" in v:
                info = mlflow.onnx.log_model(
                    onnx.load(v["onnx"]),
                    name="model",
                    registered_model_name=model,
                    save_as_external_data=bool(v.get("external_data", False)),
                    # Nothing to infer: the import reads only the model file.
                    pip_requirements=[],
                )
                version = str(info.registered_model_version)
            else:
                for f in v["files"]:
                    mlflow.log_artifact(f, "model")
                try:
                    client.get_registered_model(model)
                except mlflow.exceptions.MlflowException:
                    client.create_registered_model(model)
                mv = client.create_model_version(
                    model, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
                )
                version = str(mv.version)
        for key, value in v.get("tags", {}).items():
            client.set_model_version_tag(model, version, key, value)
        for alias in v.get("aliases", []):
            client.set_registered_model_alias(model, alias, version)
        if "stage" in v:
            client.transition_model_version_stage(model, version, v["stage"])
        sha256 = None
        if "onnx" in v:
            with tempfile.TemporaryDirectory() as d:
                local = mlflow.artifacts.download_artifacts(f"models:/{model}/{version}", dst_path=d)
                with open(os.path.join(local, "model.onnx"), "rb") as f:
                    sha256 = hashlib.sha256(f.read()).hexdigest()
        out.append({"version": version, "run_id": run.info.run_id, "sha256": sha256})
    with open(result, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
