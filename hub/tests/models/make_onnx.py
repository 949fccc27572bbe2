#!/usr/bin/env python3
"""Builds the hostile and edge-case ONNX files of hub/tests/it/inspection.rs
at test time, with PyPI `onnx` (.ci/test installs it).

Usage: make_onnx.py KIND OUT [ARGS...]
  bomb OUT D0,D1,...   ConstantOfShape(D0,D1,...) -> ReduceSum: a few hundred
                       bytes that ask the engine to fold a D0*D1*...*4-byte
                       constant (the push-time "constant-fold bomb").
  relu_chain OUT N     input x[1,4] -> N Relu nodes -> y: graph size alone.
  unknown_op OUT       one node of an operator no engine knows.
  uint8_input OUT      x: uint8[1,4] -> Cast to float -> y: a non-float input.
  paddle_value_info OUT
                       x: float[N,64] -> MatMul(64x10) -> Relu -> y[N,10], whose
                       value_info types the intermediate `h` as
                       [DynamicDimension.0, 10], as PaddlePaddle->ONNX exports
                       do: tract cannot unify that with the fixed input facts.
  symbolic_hw OUT      x: float[N,3,H,W] -> Conv(4x3x3x3, pads 1) ->
                       GlobalAveragePool -> Flatten -> y[N,4]: a detector-like
                       input whose H and W only a serving shape can fix.
"""
import sys

import onnx
from onnx import TensorProto, helper


def save(graph, out):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, out)


def bomb(out, dims):
    shape = [int(d) for d in dims.split(",")]
    nodes = [
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["big"],
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
        ),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bomb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [len(shape)], shape)],
    )
    save(graph, out)


def relu_chain(out, n):
    n = int(n)
    names = ["x"] + [f"r{i}" for i in range(1, n)] + ["y"]
    nodes = [helper.make_node("Relu", [names[i]], [names[i + 1]]) for i in range(n)]
    graph = helper.make_graph(
        nodes,
        "relu_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    save(graph, out)


def unknown_op(out):
    graph = helper.make_graph(
        [helper.make_node("NoSuchOperator", ["x"], ["y"])],
        "unknown_op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    save(graph, out)


def uint8_input(out):
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        "uint8_input",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    save(graph, out)


def paddle_value_info(out):
    weights = [((i * 7 + j * 3) % 11 - 5) / 10.0 for i in range(64) for j in range(10)]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "paddle_value_info",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [64, 10], weights)],
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["DynamicDimension.0", 10])],
    )
    save(graph, out)


def symbolic_hw(out):
    weights = [((i * 5) % 7 - 3) / 10.0 for i in range(4 * 3 * 3 * 3)]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["c"], ["g"]),
            helper.make_node("Flatten", ["g"], ["y"]),
        ],
        "symbolic_hw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], weights)],
    )
    save(graph, out)


if __name__ == "__main__":
    kind, out, *args = sys.argv[1:]
    {"bomb": bomb, "relu_chain": relu_chain, "unknown_op": unknown_op, "uint8_input": uint8_input,
     "paddle_value_info": paddle_value_info, "symbolic_hw": symbolic_hw}[kind](out, *args)
