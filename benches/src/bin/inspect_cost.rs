//! Push-inspection benchmark: what checking an upload in a confined
//! `sentinel-worker --check` child costs against the in-process tract load
//! the hub used to do, and what a hostile upload costs the hub now.
//! - real models (digits v1, the text-direction vision model): median of 5 of
//!   the old in-process load + optimise (the worker's own loader, so the
//!   difference is the process, the sandbox and the probe) against
//!   [`Inspector::inspect`] (signature walk + child check);
//! - a constant-fold bomb (`ConstantOfShape [1000,1000,1000]` -> `ReduceSum`,
//!   4 GB to fold, three at once): time to refusal, and this process's
//!   `VmRSS`/`VmHWM` before and after (the inspector runs in this process, as
//!   in the hub);
//! - a 20,001-node Relu chain: time to refusal at the default node limit.
//!
//! `cargo build --release --workspace && target/release/inspect_cost`

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use prost::Message as _;
use sentinel_benches::{median, workspace_bin, workspace_root};
use sentinel_hub::config::InspectConfig;
use sentinel_hub::inspect::Inspector;
use sentinel_worker::model::optimise_tract;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto, tensor_shape_proto::Dimension, tensor_shape_proto::dimension::Value as DimValue, type_proto,
};

const RUNS: usize = 5;

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

fn value(name: &str, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension { value: Some(DimValue::DimValue(d)), ..Dimension::default() })
                        .collect(),
                }),
            })),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        input: inputs.iter().map(|s| (*s).to_owned()).collect(),
        output: vec![output.into()],
        attribute,
        ..NodeProto::default()
    }
}

fn model(graph: GraphProto) -> Vec<u8> {
    ModelProto {
        ir_version: 7,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 13 }],
        graph: Some(graph),
        ..ModelProto::default()
    }
    .encode_to_vec()
}

fn bomb(dims: &[i64]) -> Vec<u8> {
    let one = TensorProto { dims: vec![1], data_type: 1, float_data: vec![1.0], ..TensorProto::default() };
    let value_attr = AttributeProto { name: "value".into(), r#type: 4, t: Some(one), ..AttributeProto::default() };
    let keepdims = AttributeProto { name: "keepdims".into(), r#type: 2, i: 0, ..AttributeProto::default() };
    let shape = TensorProto {
        name: "shape".into(),
        dims: vec![dims.len() as i64],
        data_type: 7,
        int64_data: dims.to_vec(),
        ..TensorProto::default()
    };
    model(GraphProto {
        node: vec![
            node("ConstantOfShape", &["shape"], "big", vec![value_attr]),
            node("ReduceSum", &["big"], "s", vec![keepdims]),
            node("Add", &["x", "s"], "y", vec![]),
        ],
        initializer: vec![shape],
        input: vec![value("x", &[1])],
        output: vec![value("y", &[1])],
        ..GraphProto::default()
    })
}

fn relu_chain(n: usize) -> Vec<u8> {
    let name = |i: usize| {
        if i == 0 {
            "x".to_owned()
        } else if i == n {
            "y".to_owned()
        } else {
            format!("r{i}")
        }
    };
    model(GraphProto {
        node: (0..n).map(|i| node("Relu", &[&name(i)], &name(i + 1), vec![])).collect(),
        input: vec![value("x", &[1, 4])],
        output: vec![value("y", &[1, 4])],
        ..GraphProto::default()
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let config = InspectConfig { worker: Some(workspace_bin("sentinel-worker")?), ..InspectConfig::default() };
    let inspector = Inspector::new(config, tmp.path().join("inspect"))?;

    println!("== real models: in-process load+optimise (before) vs signature walk + confined check (after)");
    for (name, rel) in [
        ("digits v1", "models/digits/digits_mlp_v1.onnx"),
        ("text-direction", "models/vision/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    ] {
        let path = workspace_root().join(rel);
        let first = inspector.inspect(&path).await.with_context(|| format!("inspecting {name}"))?;
        let shapes: Vec<Vec<usize>> = first
            .signature
            .default_input_shapes()
            .iter()
            .map(|s| s.iter().map(|&d| usize::try_from(d).unwrap_or(1)).collect())
            .collect();
        let (mut before, mut after) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            // Alternate, so that noise from other load hits both alike.
            let started = Instant::now();
            optimise_tract(&path, &shapes)?;
            before.push(started.elapsed());
            let started = Instant::now();
            inspector.inspect(&path).await?;
            after.push(started.elapsed());
        }
        let (b, a) = (median(before), median(after));
        println!(
            "{name}: {} nodes; before {:.1} ms, after {:.1} ms: x{:.2}",
            first.signature.nodes,
            ms(b),
            ms(a),
            a.as_secs_f64() / b.as_secs_f64()
        );
    }

    println!("== constant-fold bomb: ConstantOfShape [1000,1000,1000] -> ReduceSum (4 GB), three at once");
    let bomb_path = tmp.path().join("bomb.onnx");
    let bytes = bomb(&[1000, 1000, 1000]);
    std::fs::write(&bomb_path, &bytes)?;
    let rss_before = status_kib("VmRSS:");
    std::fs::write("/proc/self/clear_refs", "5").context("resetting VmHWM")?;
    let started = Instant::now();
    let results = futures_util::future::join_all((0..3).map(|_| inspector.inspect(&bomb_path))).await;
    let took = started.elapsed();
    let (rss_after, peak) = (status_kib("VmRSS:"), status_kib("VmHWM:"));
    for r in &results {
        let e = r.as_ref().err().context("the bomb passed")?;
        ensure!(e.to_string().contains("exceeds the inspection limit"), "{e}");
    }
    println!(
        "{} bytes; refused: {}",
        bytes.len(),
        results[0].as_ref().err().map(ToString::to_string).unwrap_or_default()
    );
    println!(
        "three refused in {:.0} ms; RSS {rss_before} KiB before, {rss_after} KiB after, peak {peak} KiB (+{} KiB)",
        ms(took),
        peak.saturating_sub(rss_before)
    );

    println!("== 20,001-node Relu chain at the default node limit");
    let chain_path = tmp.path().join("chain.onnx");
    std::fs::write(&chain_path, relu_chain(20_001))?;
    let started = Instant::now();
    let refused = inspector.inspect(&chain_path).await.err().context("the chain passed")?;
    println!("refused in {:.1} ms: {refused}", ms(started.elapsed()));
    let chain_path = tmp.path().join("chain-ok.onnx");
    std::fs::write(&chain_path, relu_chain(5_000))?;
    let started = Instant::now();
    inspector.inspect(&chain_path).await?;
    println!("a 5,000-node chain passes in {:.0} ms", ms(started.elapsed()));
    Ok(())
}
