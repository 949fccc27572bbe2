#!/usr/bin/env python3
"""Builds the models of agent/tests/it/dtypes.rs at test time, with their
reference outputs from ONNX Runtime, using only public PyPI tools
(.ci/test installs them):

- onnx: the small graphs, one per dtype family;
- scikit-learn + skl2onnx: StandardScaler + LogisticRegression,
  + RandomForest and + MLPClassifier pipelines trained on the iris data that
  ships inside scikit-learn (nothing downloaded), converted with ai.onnx.ml
  operators, an int64 `label` output and float `probabilities`;
- onnxconverter-common: an fp16 classifier converted from a float32 graph;
- onnxruntime: the reference outputs and the accuracies declared at push.

Usage: make_dtype_models.py OUTDIR

Writes OUTDIR/<case>.onnx for every case and OUTDIR/cases.json:
  [{"name", "model", "engines" (only when not every engine runs it),
    "inputs": [{"name", "datatype", "shape", "data"}],
    "outputs": [{"name", "datatype", "shape", "data"}],
    "validation": {"inputs", "labels", "accuracy"} or null}]
with v2 datatypes and flat data (f16 as the numbers it holds, strings as
text); validation sets are raw little-endian samples in the input's dtype
(OUTDIR/<case>.inputs.bin) and int64 labels (OUTDIR/<case>.labels.bin).
"""
import json
import os
import sys
import warnings

missing = []
for module, package in [
    ("numpy", "numpy<3"),
    ("onnx", "onnx==1.23.2"),
    ("ml_dtypes", "ml-dtypes<=0.5.4"),
    ("onnxruntime", "onnxruntime==1.32.0"),
    ("sklearn", "scikit-learn==1.9.1"),
    ("skl2onnx", "skl2onnx==1.20.0"),
    ("onnxconverter_common", "onnxconverter-common==1.16.0"),
]:
    try:
        __import__(module)
    except ImportError:
        missing.append(package)
if missing:
    sys.exit(
        "make_dtype_models.py: missing Python packages: "
        + " ".join(missing)
        + "\ninstall them with: python3 -m pip install "
        + " ".join(f'"{p}"' for p in missing)
        + " (.ci/test does)"
    )

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

V2 = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.bool_): "BOOL",
}


def v2_tensor(name, value):
    import ml_dtypes

    value = np.asarray(value)
    if value.dtype == np.dtype(ml_dtypes.bfloat16):
        data = [float(v) for v in value.astype(np.float64).reshape(-1)]
        return {"name": name, "datatype": "BF16", "shape": list(value.shape), "data": data}
    if value.dtype.kind in ("U", "O", "S"):
        datatype, data = "BYTES", [str(v) for v in value.reshape(-1)]
    else:
        datatype = V2[value.dtype]
        data = value.reshape(-1).tolist()
        if value.dtype.kind == "f":
            data = [float(v) for v in value.astype(np.float64).reshape(-1)]
    return {"name": name, "datatype": datatype, "shape": list(value.shape), "data": data}


def save(model, out):
    onnx.checker.check_model(model)
    onnx.save(model, out)


def reference(path, feeds):
    """ONNX Runtime's outputs for `feeds`, by output name, in graph order."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, feeds)
    return [v2_tensor(n, v) for n, v in zip(names, values)]


def small(out_dir, cases, name, nodes, inputs, outputs, feeds, initializer=()):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializer))
    # Opset 14: Add and Sub on 8- and 16-bit integers.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 7
    path = os.path.join(out_dir, f"{name}.onnx")
    save(model, path)
    cases.append(
        {
            "name": name,
            "model": f"{name}.onnx",
            "inputs": [v2_tensor(k, v) for k, v in feeds.items()],
            "outputs": reference(path, feeds),
            "validation": None,
        }
    )


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def small_models(out_dir, cases):
    T = TensorProto
    # uint8 image in, uint8 and float out (the usual camera input).
    small(
        out_dir,
        cases,
        "uint8_image",
        [
            helper.make_node("Sub", ["full", "x"], ["inverted"]),
            helper.make_node("Cast", ["x"], ["xf"], to=T.FLOAT),
            helper.make_node("Div", ["xf", "scale"], ["scaled"]),
        ],
        [vi("x", T.UINT8, ["N", 2, 2, 3])],
        [vi("inverted", T.UINT8, ["N", 2, 2, 3]), vi("scaled", T.FLOAT, ["N", 2, 2, 3])],
        {"x": np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3) * 21},
        [helper.make_tensor("full", T.UINT8, [], [255]), helper.make_tensor("scale", T.FLOAT, [], [255.0])],
    )
    # Every integer width and float64, each through an arithmetic node.
    ints = [
        ("i8", T.INT8, np.int8, [-100, -1, 0, 50]),
        ("u16", T.UINT16, np.uint16, [0, 1, 30000, 32767]),
        ("i16", T.INT16, np.int16, [-16000, -1, 0, 16000]),
        ("i32", T.INT32, np.int32, [-1000000000, -7, 0, 1000000000]),
        ("u32", T.UINT32, np.uint32, [0, 1, 7, 2000000000]),
        ("u64", T.UINT64, np.uint64, [0, 1, 7, 4000000000000000000]),
        ("i64", T.INT64, np.int64, [-(2**62), -1, 0, 2**62 - 1]),
        ("f64", T.DOUBLE, np.float64, [-1.5e300, 0.1, 1.0 / 3.0, 2.5e-300]),
    ]
    small(
        out_dir,
        cases,
        "numbers",
        [helper.make_node("Add", [f"x_{n}", f"x_{n}"], [f"y_{n}"]) for n, *_ in ints]
        + [helper.make_node("Cast", ["x_i32"], ["i32_as_f64"], to=T.DOUBLE)],
        [vi(f"x_{n}", e, [1, 4]) for n, e, *_ in ints],
        [vi(f"y_{n}", e, [1, 4]) for n, e, *_ in ints] + [vi("i32_as_f64", T.DOUBLE, [1, 4])],
        # Halved so that doubling stays in range, except f64 which is doubled as is.
        {f"x_{n}": np.array([v if n == "f64" else v // 2 for v in vals], dtype=d).reshape(1, 4) for n, _, d, vals in ints},
    )
    # Booleans: Not, And, and a Cast from bool.
    small(
        out_dir,
        cases,
        "booleans",
        [
            helper.make_node("Not", ["a"], ["not_a"]),
            helper.make_node("And", ["a", "b"], ["a_and_b"]),
            helper.make_node("Cast", ["a"], ["a_as_i32"], to=T.INT32),
        ],
        [vi("a", T.BOOL, ["N", 4]), vi("b", T.BOOL, ["N", 4])],
        [vi("not_a", T.BOOL, ["N", 4]), vi("a_and_b", T.BOOL, ["N", 4]), vi("a_as_i32", T.INT32, ["N", 4])],
        {"a": np.array([[True, False, True, False]]), "b": np.array([[True, True, False, False]])},
    )
    # Strings in and out, and the input's shape (tract computes it as a
    # symbolic TDim, carried as int64).
    small(
        out_dir,
        cases,
        "strings",
        [helper.make_node("Identity", ["text"], ["same"]), helper.make_node("Shape", ["text"], ["shape"])],
        [vi("text", T.STRING, [1, 3])],
        [vi("same", T.STRING, [1, 3]), vi("shape", T.INT64, [2])],
        {"text": np.array([["", "héllo wörld", "a \"quoted\" \\ line\n"]], dtype=object)},
    )


def bfloat16_model(out_dir, cases):
    """bfloat16 in and out. tract has no bfloat16 tensors, so only ONNX
    Runtime workers serve it ("engines": ["ort"]). ONNX Runtime's Python API
    takes and gives bfloat16 only as OrtValues without a NumPy view: the
    reference for the bfloat16 outputs is ONNX Runtime's own float32
    `widened` output narrowed back, exact since every value is a bfloat16."""
    import ml_dtypes

    T = TensorProto
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["same"]),
            helper.make_node("Cast", ["x"], ["widened"], to=T.FLOAT),
            helper.make_node("Cast", ["widened"], ["narrowed"], to=T.BFLOAT16),
        ],
        "bfloat16",
        [vi("x", T.BFLOAT16, [1, 4])],
        [vi("same", T.BFLOAT16, [1, 4]), vi("widened", T.FLOAT, [1, 4]), vi("narrowed", T.BFLOAT16, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 7
    path = os.path.join(out_dir, "bfloat16.onnx")
    save(model, path)
    x = np.array([[1.5, -2.0, 3.0e38, 0.1]], dtype=ml_dtypes.bfloat16)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(x.view(np.uint16), T.BFLOAT16)
    same, widened, narrowed = session.run_with_ort_values(None, {"x": feed})
    assert [o.data_type() for o in (same, widened, narrowed)] == ["tensor(bfloat16)", "tensor(float)", "tensor(bfloat16)"]
    widened = widened.numpy()
    cases.append(
        {
            "name": "bfloat16",
            "model": "bfloat16.onnx",
            "engines": ["ort"],
            "inputs": [v2_tensor("x", x)],
            "outputs": [
                v2_tensor("same", widened.astype(ml_dtypes.bfloat16)),
                v2_tensor("widened", widened),
                v2_tensor("narrowed", widened.astype(ml_dtypes.bfloat16)),
            ],
            "validation": None,
        }
    )


def iris():
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split

    x, y = load_iris(return_X_y=True)
    return train_test_split(x.astype(np.float32), y.astype(np.int64), test_size=0.3, random_state=0, stratify=y)


def accuracy(path, x, y):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x})
    labels = out[0] if out[0].dtype == np.int64 else out[0].argmax(axis=1)
    return float((labels.reshape(-1) == y).mean())


def sklearn_models(out_dir, cases):
    from skl2onnx import to_onnx
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test = iris()
    for name, estimator in [
        ("sklearn_logreg", LogisticRegression(max_iter=500)),
        ("sklearn_forest", RandomForestClassifier(n_estimators=8, max_depth=4, random_state=0)),
        # Its label is ArgMax then ArrayFeatureExtractor over the classes,
        # which tract types as a TDim: the model the issue saw refused on
        # every device ("output 0 has type TDim").
        ("sklearn_mlp", MLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=0)),
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter; the accuracy is measured below
            pipe = make_pipeline(StandardScaler(), estimator).fit(x_train, y_train)
        # Plain tensors out (no ZipMap), and the scaler as Sub/Div: tract has
        # no ai.onnx.ml Scaler, while every device engine runs Sub and Div.
        options = {id(pipe.steps[0][1]): {"div": "div"}, id(estimator): {"zipmap": False}}
        model = to_onnx(pipe, x_train[:1], options=options, target_opset={"": 15, "ai.onnx.ml": 3})
        path = os.path.join(out_dir, f"{name}.onnx")
        save(model, path)
        write_validation(out_dir, cases, name, path, x_test, y_test)


def fp16_model(out_dir, cases):
    """A softmax classifier on iris in float16, converted from float32 by
    onnxconverter-common (inputs and outputs become float16 too)."""
    from onnxconverter_common import float16
    from sklearn.linear_model import LogisticRegression

    x_train, x_test, y_train, y_test = iris()
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    clf = LogisticRegression(max_iter=500).fit((x_train - mean) / std, y_train)
    T = TensorProto
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["x", "mean"], ["centred"]),
            helper.make_node("Div", ["centred", "std"], ["scaled"]),
            helper.make_node("MatMul", ["scaled", "w"], ["logits0"]),
            helper.make_node("Add", ["logits0", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "fp16_classifier",
        [vi("x", T.FLOAT, ["N", 4])],
        [vi("probabilities", T.FLOAT, ["N", 3])],
        initializer=[
            helper.make_tensor("mean", T.FLOAT, [4], mean.tolist()),
            helper.make_tensor("std", T.FLOAT, [4], std.tolist()),
            helper.make_tensor("w", T.FLOAT, [4, 3], clf.coef_.T.astype(np.float32).reshape(-1).tolist()),
            helper.make_tensor("b", T.FLOAT, [3], clf.intercept_.astype(np.float32).tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    model = float16.convert_float_to_float16(model, keep_io_types=False)
    # The converter records value_info for every intermediate with the
    # symbolic batch dim, which tract cannot unify with the batch of 1 it
    # serves at (issue 12, item 1: the loading fallback's case, tested there).
    # This test is about the dtype, so the value_info goes.
    del model.graph.value_info[:]
    path = os.path.join(out_dir, "fp16_classifier.onnx")
    save(model, path)
    write_validation(out_dir, cases, "fp16_classifier", path, x_test.astype(np.float16), y_test)


def write_validation(out_dir, cases, name, path, x_test, y_test):
    with open(os.path.join(out_dir, f"{name}.inputs.bin"), "wb") as f:
        f.write(np.ascontiguousarray(x_test).astype(x_test.dtype.newbyteorder("<")).tobytes())
    with open(os.path.join(out_dir, f"{name}.labels.bin"), "wb") as f:
        f.write(y_test.astype("<i8").tobytes())
    feeds = {"x" if name == "fp16_classifier" else onnx.load(path).graph.input[0].name: x_test[:5]}
    cases.append(
        {
            "name": name,
            "model": f"{name}.onnx",
            "inputs": [v2_tensor(k, v) for k, v in feeds.items()],
            "outputs": reference(path, feeds),
            "validation": {
                "inputs": f"{name}.inputs.bin",
                "labels": f"{name}.labels.bin",
                "accuracy": accuracy(path, x_test, y_test),
                "samples": len(y_test),
            },
        }
    )


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    cases = []
    small_models(out_dir, cases)
    sklearn_models(out_dir, cases)
    fp16_model(out_dir, cases)
    bfloat16_model(out_dir, cases)
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
