"""Drives the agent's KServe v2 API with the real tritonclient[http] package.

Usage: tritonclient_check.py HOST:PORT DATA_DIR
Run by tests/it/inference_api.rs; exits non-zero with a message on any mismatch.
"""

import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main() -> None:
    url, data = sys.argv[1], sys.argv[2]
    x = np.fromfile(f"{data}/digits_test_x.bin", dtype="<f4").reshape(-1, 64)
    y = np.fromfile(f"{data}/digits_test_y.bin", dtype="<i8")
    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    assert client.is_model_ready("digits"), "model not ready"
    meta = client.get_model_metadata("digits")
    assert meta["inputs"][0]["name"] == "input", meta
    assert meta["inputs"][0]["shape"] == [-1, 64], meta

    correct = 0
    for binary in (True, False):
        batch = x[:100]
        inp = httpclient.InferInput("input", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch, binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput("label", binary_data=binary),
            httpclient.InferRequestedOutput("probabilities", binary_data=binary),
        ]
        result = client.infer("digits", [inp], outputs=outputs)
        labels = result.as_numpy("label")
        probs = result.as_numpy("probabilities")
        assert labels.shape == (100,), labels.shape
        assert probs.shape == (100, 10), probs.shape
        assert (probs.argmax(axis=1) == labels).all(), "label is not the argmax"
        correct = int((labels == y[:100]).sum())
        response = result.get_response()
        assert response["model_version"] == "1.0.0", response
        print(f"binary={binary}: accuracy {correct / 100:.2f}, version {response['model_version']}")

    # Pinned version, and the default outputs (none requested).
    inp = httpclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x[:1])
    result = client.infer("digits", [inp], model_version="1.0.0")
    assert result.as_numpy("label") is not None

    # Bad input surfaces as an exception carrying the server's reason.
    bad = httpclient.InferInput("input", [1, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 63), dtype=np.float32))
    try:
        client.infer("digits", [bad])
    except InferenceServerException as e:
        assert "shape [1, 63]" in str(e), str(e)
        print(f"bad input refused: {e.message()}")
    else:
        raise AssertionError("a wrong shape was accepted")


if __name__ == "__main__":
    main()
