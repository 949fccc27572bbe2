//! Unit tests of [`super`].

use std::io::Cursor;

use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, TensorShapeProto, TypeProto,
    tensor_shape_proto::Dimension as PbDim,
};

use super::*;

fn value(name: &str, dims: &[i64]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| PbDim {
            value: Some(if d < 0 { DimValue::DimParam("N".into()) } else { DimValue::DimValue(d) }),
            ..PbDim::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: 1,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    }
}

fn relu(i: usize) -> NodeProto {
    NodeProto {
        op_type: "Relu".into(),
        input: vec![format!("t{i}")],
        output: vec![format!("t{}", i + 1)],
        ..NodeProto::default()
    }
}

fn model(graph: GraphProto) -> Vec<u8> {
    ModelProto { ir_version: 3, graph: Some(graph), ..ModelProto::default() }.encode_to_vec()
}

fn read(bytes: &[u8], max_nodes: u64) -> Result<OnnxSignature, OnnxError> {
    read_signature_from(Cursor::new(bytes), bytes.len() as u64, SignatureLimits { max_nodes })
}

#[test]
fn reads_the_signature_without_the_weights_declared_as_inputs() {
    let weight = TensorProto { name: "w".into(), raw_data: vec![7; 100_000], ..TensorProto::default() };
    let bytes = model(GraphProto {
        node: (0..3).map(relu).collect(),
        input: vec![value("x", &[-1, 64]), value("w", &[25_000])],
        output: vec![value("y", &[-1, 10])],
        initializer: vec![weight],
        ..GraphProto::default()
    });
    let sig = read(&bytes, 100).expect("reads");
    assert_eq!(sig.nodes, 3);
    assert_eq!(sig.inputs.len(), 1, "the initializer `w` is no input: {:?}", sig.inputs);
    assert_eq!(sig.inputs[0].name, "x");
    assert_eq!(sig.default_input_shapes(), vec![vec![1, 64]]);
    assert_eq!(sig.outputs[0].shape[1].kind, Some(Kind::Fixed(10)));
}

#[test]
fn reads_the_operators_and_their_domains() {
    let custom = NodeProto { op_type: "Odd".into(), domain: "com.example".into(), ..NodeProto::default() };
    let bytes = model(GraphProto {
        node: vec![relu(0), relu(1), custom],
        input: vec![value("x", &[1, 4])],
        output: vec![value("y", &[1, 4])],
        ..GraphProto::default()
    });
    let sig = read(&bytes, 100).expect("reads");
    let ops: Vec<_> = sig.operators.iter().map(|(d, o)| (d.as_str(), o.as_str())).collect();
    assert_eq!(ops, [("", "Relu"), ("com.example", "Odd")]);
    assert_eq!(sig.operator_domain("Relu"), Some("ai.onnx"));
    assert_eq!(sig.operator_domain("Odd"), Some("com.example"));
    assert_eq!(sig.operator_domain("Missing"), None);
}

#[test]
fn counts_nodes_in_subgraphs_and_refuses_past_the_limit() {
    let body = GraphProto { node: (0..5).map(relu).collect(), ..GraphProto::default() };
    let cond = NodeProto {
        op_type: "If".into(),
        attribute: vec![
            AttributeProto { name: "then_branch".into(), g: Some(body.clone()), ..AttributeProto::default() },
            AttributeProto { name: "else_branch".into(), graphs: vec![body], ..AttributeProto::default() },
        ],
        ..NodeProto::default()
    };
    let bytes = model(GraphProto {
        node: vec![cond],
        input: vec![value("x", &[1])],
        output: vec![value("y", &[1])],
        ..GraphProto::default()
    });
    assert_eq!(read(&bytes, 11).expect("at the limit").nodes, 11);
    let err = read(&bytes, 10).expect_err("over the limit");
    assert!(matches!(err, OnnxError::TooManyNodes { nodes: 11, limit: 10 }), "{err}");
    assert!(err.to_string().contains("11 nodes") && err.to_string().contains("limit of 10"), "{err}");
}

#[test]
fn truncated_garbage_and_graphless_files_are_refused() {
    let bytes = model(GraphProto {
        node: vec![relu(0)],
        input: vec![value("x", &[1])],
        output: vec![value("y", &[1])],
        ..GraphProto::default()
    });
    for cut in [1, bytes.len() / 2, bytes.len() - 1] {
        let err = read(&bytes[..cut], 10).expect_err("truncated");
        assert!(matches!(err, OnnxError::Decode(_) | OnnxError::NoGraph), "cut at {cut}: {err}");
    }
    assert!(matches!(read(b"this is a text file, not a model\n", 10), Err(OnnxError::Decode(_))));
    assert!(matches!(read(&ModelProto::default().encode_to_vec(), 10), Err(OnnxError::NoGraph)));
    let no_inputs = model(GraphProto { output: vec![value("y", &[1])], ..GraphProto::default() });
    assert!(matches!(read(&no_inputs, 10), Err(OnnxError::NoTensors("inputs"))));
}

#[test]
fn oversized_declarations_are_refused_before_they_are_read() {
    let mut huge = value("x", &[1]);
    huge.doc_string = "d".repeat(2 * MAX_VALUE_INFO_BYTES as usize);
    let bytes = model(GraphProto { input: vec![huge], output: vec![value("y", &[1])], ..GraphProto::default() });
    assert!(matches!(read(&bytes, 10), Err(OnnxError::SignatureTooLarge(_))));
}

/// A hub never lets an upload name files for the engine to open (tract
/// resolves external data beside the model, i.e. in the hub's staging dir).
#[test]
fn weights_in_external_files_are_refused_naming_the_initializer() {
    use tract_onnx::pb::StringStringEntryProto;
    let entry = |k: &str, v: &str| StringStringEntryProto { key: k.into(), value: v.into() };
    let graph = |weight: TensorProto| GraphProto {
        node: vec![relu(0)],
        input: vec![value("t0", &[-1, 4])],
        output: vec![value("t1", &[-1, 4])],
        initializer: vec![weight],
        ..GraphProto::default()
    };
    let external = TensorProto {
        name: "fc.weight".into(),
        external_data: vec![entry("location", "sha256/0123"), entry("offset", "0")],
        data_location: Some(1),
        ..TensorProto::default()
    };
    for weight in [
        external.clone(),
        TensorProto { data_location: None, ..external.clone() },
        TensorProto { external_data: Vec::new(), ..external },
    ] {
        let err = read(&model(graph(weight)), 100).expect_err("refused");
        assert!(matches!(&err, OnnxError::ExternalData { name } if name == "fc.weight"), "{err}");
        assert!(err.to_string().contains("save_as_external_data=False"), "{err}");
    }
    let inside =
        TensorProto { name: "w".into(), raw_data: vec![0; 16], data_location: Some(0), ..TensorProto::default() };
    read(&model(graph(inside)), 100).expect("weights inside the file are fine");
}
