"""Drives the agent's KServe v2 API with the real tritonclient[http] package
for every dtype case of make_dtype_models.py: numpy arrays of each dtype in,
in JSON and in binary, and the answers compared with ONNX Runtime's.

Usage: tritonclient_dtypes.py HOST:PORT CASES_JSON NAME...
Run by tests/it/dtypes.rs; exits non-zero with a message on any mismatch.
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient

NUMPY = {
    "FP32": np.float32,
    "FP16": np.float16,
    "FP64": np.float64,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "INT16": np.int16,
    "UINT16": np.uint16,
    "INT32": np.int32,
    "UINT32": np.uint32,
    "INT64": np.int64,
    "UINT64": np.uint64,
    "BOOL": np.bool_,
}


def array(tensor):
    if tensor["datatype"] == "BYTES":
        values = [s.encode() for s in tensor["data"]]
        return np.array(values, dtype=np.object_).reshape(tensor["shape"])
    return np.array(tensor["data"], dtype=NUMPY[tensor["datatype"]]).reshape(tensor["shape"])


def same(case, how, name, got, want):
    what = f"{case} {how} output {name}"
    assert list(got.shape) == list(want.shape), f"{what}: shape {got.shape}, ONNX Runtime {want.shape}"
    if want.dtype == np.object_:
        got = [g if isinstance(g, bytes) else str(g).encode() for g in got.reshape(-1)]
        assert got == list(want.reshape(-1)), f"{what}: {got} vs {want}"
    elif want.dtype.kind == "f":
        rtol = 1e-2 if want.dtype == np.float16 else 1e-5
        assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, ONNX Runtime {want.dtype}"
        assert np.allclose(got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=1e-4), f"{what}: {got} vs {want}"
    else:
        assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, ONNX Runtime {want.dtype}"
        assert (got == want).all(), f"{what}: {got} vs {want}"


def main() -> None:
    url, cases_json, names = sys.argv[1], sys.argv[2], set(sys.argv[3:])
    client = httpclient.InferenceServerClient(url=url)
    cases = [c for c in json.load(open(cases_json)) if c["name"] in names]
    assert {c["name"] for c in cases} == names, names
    for case in cases:
        for binary in (True, False):
            inputs = []
            for tensor in case["inputs"]:
                i = httpclient.InferInput(tensor["name"], tensor["shape"], tensor["datatype"])
                i.set_data_from_numpy(array(tensor), binary_data=binary)
                inputs.append(i)
            outputs = [httpclient.InferRequestedOutput(o["name"], binary_data=binary) for o in case["outputs"]]
            result = client.infer(case["name"], inputs, outputs=outputs)
            for o in case["outputs"]:
                same(case["name"], "binary" if binary else "JSON", o["name"], result.as_numpy(o["name"]), array(o))
        print(f"{case['name']}: tritonclient agrees with ONNX Runtime, binary and JSON")


if __name__ == "__main__":
    main()
