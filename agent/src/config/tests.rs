use super::*;
use sentinel_worker_protocol::launch::{Engine, Provider, Providers};

use super::testing::{KEY, base};

#[test]
fn a_good_config_parses_with_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = AgentConfig::parse(&base(dir.path()), &BTreeMap::new(), dir.path()).expect("parses");
    assert_eq!(c.token, "snt_x");
    assert_eq!(c.state_dir, dir.path().join("state"));
    assert_eq!(c.backoff_cap, Duration::from_secs(60));
    assert_eq!(c.hardware, native_hardware());
    assert_eq!(c.control_socket(), dir.path().join("state/run/control.sock"));
    assert_eq!(c.serving.metrics_listen.as_deref(), Some(DEFAULT_METRICS_LISTEN));
}

#[test]
fn the_runtime_dir_comes_from_the_file_then_systemd_then_the_state_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env: BTreeMap<_, _> = [("RUNTIME_DIRECTORY".to_owned(), "/run/sentinel:/run/other".to_owned())].into();
    let c = AgentConfig::parse(&base(dir.path()), &env, dir.path()).expect("parses");
    assert_eq!(c.runtime_dir, Path::new("/run/sentinel"));
    let text = format!("runtime_dir = \"rt\"\n{}[serving]\nmetrics_listen = \"\"\n", base(dir.path()));
    let c = AgentConfig::parse(&text, &env, dir.path()).expect("parses");
    assert_eq!(c.runtime_dir, dir.path().join("rt"));
    assert_eq!(c.serving.metrics_listen, None);
}

#[test]
fn relative_paths_become_absolute_from_a_relative_config_path() {
    // Workers run in private working directories: every path handed to
    // them must be absolute, even when the agent was started as
    // `sentinel-agent run --config agent.toml` with `state_dir = "state"`.
    let dir = tempfile::tempdir_in(".").expect("tempdir in the working directory");
    std::fs::write(dir.path().join("agent.toml"), base(dir.path())).expect("write");
    let relative = Path::new(dir.path().file_name().expect("name")).join("agent.toml");
    let c = AgentConfig::load(&relative, &BTreeMap::new()).expect("loads");
    assert!(c.state_dir.is_absolute(), "{}", c.state_dir.display());
    assert_eq!(c.state_dir, std::path::absolute(dir.path()).expect("absolute").join("state"));
}

#[test]
fn serving_sizes_and_timeouts_are_bounded_and_named_when_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let parse = |serving: &str| {
        AgentConfig::parse(&format!("{}[serving]\n{serving}\n", base(dir.path())), &BTreeMap::new(), dir.path())
    };
    let c = parse("").expect("defaults");
    assert_eq!((c.serving.max_body_bytes, c.serving.max_inflight_bytes), (16 << 20, 64 << 20));
    assert_eq!(c.serving.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.serving.idle_timeout, Duration::from_secs(120));
    assert!(c.serving.max_connections >= 1 && c.serving.max_connections <= 1024);
    for (text, field) in [
        ("max_body_bytes = 0", "serving.max_body_bytes"),
        ("max_body_bytes = 2147483648", "serving.max_body_bytes"),
        ("max_body_bytes = 1048576\nmax_inflight_bytes = 1048575", "serving.max_inflight_bytes"),
        ("max_connections = 0", "serving.max_connections"),
        ("header_read_timeout_secs = 0", "serving.header_read_timeout_secs"),
        ("idle_timeout_secs = 86401", "serving.idle_timeout_secs"),
        ("memory_limit_mib = 18446744073709551615", "serving.memory_limit_mib"),
    ] {
        let err = parse(text).expect_err(text);
        assert_eq!(err.field, field, "{text}: {err}");
    }
}

#[test]
fn env_overrides_win() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env: BTreeMap<_, _> = [("SENTINEL_AGENT_DEVICE_ID".to_owned(), "edge-2".to_owned())].into();
    let c = AgentConfig::parse(&base(dir.path()), &env, dir.path()).expect("parses");
    assert_eq!(c.device_id, "edge-2");
}

#[test]
fn grpc_url_defaults_to_hub_url() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = base(dir.path()).replace("grpc_url = \"http://127.0.0.1:8081\"\n", "");
    let c = AgentConfig::parse(&text, &BTreeMap::new(), dir.path()).expect("parses");
    assert_eq!(c.grpc_url(), "http://127.0.0.1:8080");
}

#[test]
fn hub_urls_may_list_replicas_tried_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = base(dir.path()).replace("grpc_url = \"http://127.0.0.1:8081\"\n", "").replace(
        "hub_url = \"http://127.0.0.1:8080\"",
        "hub_url = [\"http://127.0.0.1:8080/\", \"http://127.0.0.1:9090\"]",
    );
    let c = AgentConfig::parse(&text, &BTreeMap::new(), dir.path()).expect("parses");
    assert_eq!(c.hub_urls, ["http://127.0.0.1:8080", "http://127.0.0.1:9090"]);
    assert_eq!(c.grpc_urls, c.hub_urls, "gRPC on each replica's REST port");
    assert_eq!((c.hub_url(), c.grpc_url()), ("http://127.0.0.1:8080", "http://127.0.0.1:8080"));
    // The environment takes a comma-separated list.
    let env: BTreeMap<_, _> =
        [("SENTINEL_AGENT_HUB_URL".to_owned(), "http://127.0.0.1:1, http://127.0.0.1:2".to_owned())].into();
    let c = AgentConfig::parse(&text, &env, dir.path()).expect("parses");
    assert_eq!(c.hub_urls, ["http://127.0.0.1:1", "http://127.0.0.1:2"]);
    // Refused, naming the field: no URL, too many, a gRPC list that does not
    // pair with the REST one, and plain text off loopback anywhere in a list.
    let many: Vec<String> = (0..17).map(|i| format!("\"http://127.0.0.1:{}\"", 1000 + i)).collect();
    for (list, grpc, field) in [
        ("[]".to_owned(), None, "hub_url"),
        (format!("[{}]", many.join(", ")), None, "hub_url"),
        ("[\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"]".to_owned(), Some("\"http://127.0.0.1:3\""), "grpc_url"),
        ("[\"http://127.0.0.1:1\", \"http://hub.example:2\"]".to_owned(), None, "hub_url"),
    ] {
        let mut t = text.replace("[\"http://127.0.0.1:8080/\", \"http://127.0.0.1:9090\"]", &list);
        if let Some(g) = grpc {
            t = t.replace("hub_url =", &format!("grpc_url = {g}\nhub_url ="));
        }
        let err = AgentConfig::parse(&t, &BTreeMap::new(), dir.path()).expect_err(&list);
        assert_eq!(err.field, field, "{list}: {err}");
    }
}

#[test]
fn errors_name_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = base(dir.path());
    let cases: Vec<(String, &str)> = vec![
        (good.replace("device_id = \"edge-1\"\n", ""), "device_id"),
        (good.replace(KEY, "not-base64!"), "pinned_keys[0]"),
        (good.replace("pinned_keys = [\"", "pinned_keys = [] #"), "pinned_keys"),
        (good.replace("http://127.0.0.1:8080", "http://hub.example:8080"), "hub_url"),
        (good.replace("http://127.0.0.1:8081", "ftp://x"), "grpc_url"),
        (good.replace("token_file = \"token\"", "token_file = \"missing\""), "token_file"),
        (format!("{good}colour = 1\n"), "line"),
        (format!("{good}[sync]\nbackoff_cap_secs = 0\n"), "sync.backoff_cap_secs"),
        (format!("{good}[serving]\nlisten = \"localhost\"\n"), "serving.listen"),
        (format!("{good}[serving]\nmetrics_listen = \"9465\"\n"), "serving.metrics_listen"),
        (format!("{good}[serving]\nconfinement = \"maybe\"\n"), "serving.confinement"),
        (format!("{good}[serving.input_shapes]\nm = [\"1,x\"]\n"), "serving.input_shapes.m"),
    ];
    for (text, field) in cases {
        let err = AgentConfig::parse(&text, &BTreeMap::new(), dir.path()).expect_err(field);
        assert!(err.field.starts_with(field), "wanted {field}, got {err}");
    }
}

#[test]
fn plain_text_off_loopback_needs_the_explicit_switch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = base(dir.path()).replace("127.0.0.1", "10.0.0.9");
    assert!(AgentConfig::parse(&text, &BTreeMap::new(), dir.path()).is_err());
    let text = format!("transport = \"insecure-plaintext\"\n{text}");
    AgentConfig::parse(&text, &BTreeMap::new(), dir.path()).expect("allowed when asked for");
}

#[test]
fn the_default_pool_size_divides_the_cpus_among_the_models() {
    assert_eq!(pool_size(None, 8, 1), 8);
    assert_eq!(pool_size(None, 8, 3), 2);
    assert_eq!(pool_size(None, 2, 3), 1, "at least one worker");
    assert_eq!(pool_size(None, 4, 0), 4, "no model yet counts as one");
    assert_eq!(pool_size(Some(3), 8, 1), 3, "configured wins");
    assert_eq!(pool_size(None, 1024, 1), MAX_POOL_SIZE);
}

#[test]
fn pools_and_engines_are_set_per_model_and_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lib = dir.path().join("libonnxruntime.so");
    std::fs::write(&lib, b"not really").expect("lib");
    let parse = |serving: &str, env: &[(&str, &str)]| {
        let text = format!("{}[serving]\n{serving}", base(dir.path()));
        let env: BTreeMap<String, String> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        AgentConfig::parse(&text, &env, dir.path()).map(|c| c.serving)
    };
    let s = parse("", &[]).expect("defaults");
    assert_eq!((s.workers, s.engine, s.ort_library.clone()), (None, EngineChoice::Auto, None));
    assert_eq!(s.engine_of("digits"), Engine::Tract, "auto, and no library anywhere");
    assert_eq!(s.workers_of("digits", 4, 2), 2, "the CPUs divided among the models");
    assert_eq!(s.batch_of("digits"), (64, true), "64, kept only where it pays");
    assert_eq!(s.dynamic_batching_of("digits"), None, "dynamic batching is off by default");

    let s = parse(
        "workers = 3\nengine = \"auto\"\nmax_batch_size = 8\n[serving.models.textcls]\nworkers = 1\nengine = \"tract\"\nmax_batch_size = 1\n",
        &[("ORT_DYLIB_PATH", lib.to_str().expect("utf-8"))],
    )
    .expect("parses");
    assert_eq!(s.ort_library.as_deref(), Some(lib.as_path()), "auto finds the library through ORT_DYLIB_PATH");
    assert_eq!((s.engine_of("digits"), s.workers_of("digits", 8, 1)), (Engine::Ort, 3));
    assert_eq!((s.engine_of("textcls"), s.workers_of("textcls", 8, 1)), (Engine::Tract, 1));
    assert_eq!((s.batch_of("digits"), s.batch_of("textcls")), ((8, false), (1, false)), "as configured");
    let s = parse(
        "max_queue_delay_us = 500
[serving.models.t]
max_batch_size = 1
[serving.models.e]
max_queue_delay_us = 0
max_batch_size = 16
",
        &[],
    )
    .expect("dynamic batching");
    assert_eq!(s.dynamic_batching_of("d"), Some((64, std::time::Duration::from_micros(500))));
    assert_eq!(s.dynamic_batching_of("t"), None, "a model's max_batch_size of 1 turns it off");
    assert_eq!(s.dynamic_batching_of("e"), Some((16, std::time::Duration::ZERO)), "0: only what is queued joins");
    let s = parse("engine = \"auto\"\n", &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")]).expect("parses");
    assert_eq!(s.engine_of("digits"), Engine::Tract, "auto without the library is tract");
    let s = parse("ort_library = \"libonnxruntime.so\"\n[serving.models.d]\nengine = \"ort\"\n", &[]).expect("parses");
    assert_eq!((s.ort_library.as_deref(), s.engine_of("d")), (Some(lib.as_path()), Engine::Ort));

    for (serving, field, why) in [
        ("workers = 0\n", "serving.workers", "between 1 and 64"),
        ("workers = 65\n", "serving.workers", "between 1 and 64"),
        ("[serving.models.d]\nworkers = 0\n", "serving.models.d.workers", "between 1 and 64"),
        ("engine = \"gpu\"\n", "serving.engine", "\"tract\", \"ort\" or \"auto\""),
        ("[serving.models.d]\nengine = \"cuda\"\n", "serving.models.d.engine", "expected"),
        ("ort_library = \"missing.so\"\n", "serving.ort_library", "is not a file"),
        ("max_batch_size = 0\n", "serving.max_batch_size", "between 1 and 4096"),
        (
            "[serving.models.d]\nexecution_providers = [\"rocm\"]\n",
            "serving.models.d.execution_providers",
            "unknown execution provider \"rocm\"",
        ),
        (
            "[serving.models.d]\nexecution_providers = [\"cuda\", \"cuda\"]\n",
            "serving.models.d.execution_providers",
            "listed twice",
        ),
        (
            "[serving.models.d]\nengine = \"tract\"\nexecution_providers = [\"cuda\"]\n",
            "serving.models.d.execution_providers",
            "ONNX Runtime's",
        ),
        ("[serving.models.d]\nmax_batch_size = 5000\n", "serving.models.d.max_batch_size", "between 1 and 4096"),
        ("max_queue_delay_us = 1000001\n", "serving.max_queue_delay_us", "over 1000000 (1 s)"),
        ("[serving.models.d]\nmax_queue_delay_us = -1\n", "line", "expected u64"),
    ] {
        let e = parse(serving, &[]).expect_err(serving).to_string();
        assert!(e.contains(field) && e.contains(why), "{serving:?}: {e}");
    }
    let s = parse(
        "[serving.models.d]\nexecution_providers = [\"tensorrt\", \"cuda\", \"cpu\"]\nprovider_fallback = true\ndevice_id = 1\ntensorrt_fp16 = true\n",
        &[],
    )
    .expect("providers");
    let p = s.providers_of("d");
    assert_eq!(p.order, [Provider::TensorRt, Provider::Cuda, Provider::Cpu]);
    assert!(p.fallback && p.tensorrt_fp16 && p.device_id == Some(1));
    assert_eq!(s.providers_of("other"), Providers::default(), "CPU only");
    let env = [
        ("SENTINEL_AGENT_ENGINE", "ort"),
        ("SENTINEL_AGENT_WORKERS", "3"),
        ("SENTINEL_AGENT_MAX_QUEUE_DELAY_US", "250"),
    ];
    let s = parse("", &env).expect("env overrides");
    assert_eq!((s.engine, s.workers), (EngineChoice::Ort, Some(3)));
    assert_eq!(s.max_queue_delay, Some(std::time::Duration::from_micros(250)));
    let e = parse("", &[("SENTINEL_AGENT_WORKERS", "many")]).expect_err("not a number").to_string();
    assert!(e.contains("SENTINEL_AGENT_WORKERS") && e.contains("many"), "{e}");
    let e = parse("[serving.models.d]\nthreads = 2\n", &[]).expect_err("unknown key").to_string();
    assert!(e.contains("threads"), "{e}");
}

#[test]
fn each_provider_has_its_own_load_timeout_and_the_longest_listed_applies() {
    use std::time::Duration;
    let cpu = Duration::from_secs(60);
    let providers = |order: &[Provider]| Providers { order: order.to_vec(), ..Providers::default() };
    let none = LoadTimeouts::default();
    assert_eq!(load_timeout_for(&Providers::default(), cpu, &none), cpu, "CPU only");
    assert_eq!(load_timeout_for(&providers(&[Provider::Cuda, Provider::Cpu]), cpu, &none), Duration::from_secs(300));
    let trt = providers(&[Provider::TensorRt, Provider::Cuda, Provider::Cpu]);
    assert_eq!(load_timeout_for(&trt, cpu, &none), Duration::from_secs(1800), "TensorRT builds its engine");
    let own = LoadTimeouts { cpu: Some(Duration::from_secs(5)), cuda: None, tensorrt: Some(Duration::from_secs(7200)) };
    assert_eq!(load_timeout_for(&trt, cpu, &own), Duration::from_secs(7200));
    assert_eq!(load_timeout_for(&Providers::default(), cpu, &own), Duration::from_secs(5), "the model's own CPU one");

    let dir = tempfile::tempdir().expect("tempdir");
    let parse = |serving: &str| {
        let text = format!("{}[serving]\n{serving}", base(dir.path()));
        AgentConfig::parse(&text, &BTreeMap::new(), dir.path()).map(|c| c.serving)
    };
    let s = parse(
        "load_timeout_secs = 30\n[serving.models.det]\nengine = \"ort\"\nexecution_providers = [\"tensorrt\", \"cpu\"]\n\
         tensorrt_load_timeout_secs = 3600\n[serving.models.cls]\nload_timeout_secs = 90\n",
    )
    .expect("parses");
    assert_eq!(s.load_timeout_of("det"), Duration::from_secs(3600));
    assert_eq!(s.load_timeout_of("cls"), Duration::from_secs(90));
    assert_eq!(s.load_timeout_of("other"), Duration::from_secs(30));
    let e = parse("[serving.models.det]\ntensorrt_load_timeout_secs = 0\n").expect_err("zero").to_string();
    assert!(e.contains("serving.models.det.tensorrt_load_timeout_secs") && e.contains("positive"), "{e}");
}
