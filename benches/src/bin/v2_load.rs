//! A KServe v2 load generator that is not the bottleneck: the Rust twin of
//! `../shared/peers/mlserver/load.py`'s load run, with the same arguments and
//! the same JSON line, so either can drive the agent or MLServer.
//!
//! Clients send pre-built JSON bodies back to back over kept-alive HTTP/1.1
//! connections (one per client) on one thread, for `--warmup` seconds
//! unmeasured and then `--duration` seconds measured. A request counts when
//! the answer is 200 and holds `"outputs"`. The line reports throughput,
//! latency percentiles and `client_cpu_s`, this process's own CPU time over
//! the measured run, which says whether the client kept up.
//!
//! `cargo build --release -p sentinel-benches --bin v2_load && target/release/v2_load \
//!   --url http://127.0.0.1:8620 --model digits --input-name input --shape 1,64 \
//!   --data models/data/digits_test_x.bin --concurrency 8 --duration 10`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use sentinel_benches::percentile;
use serde_json::{Value, json};

/// Arguments as `load.py` takes them (its load run only: FP32 data).
#[derive(Debug)]
struct Args {
    url: String,
    model: String,
    input_name: String,
    shape: Vec<usize>,
    data: Option<String>,
    textcls_u8: bool,
    concurrency: usize,
    duration: f64,
    warmup: f64,
    max_bodies: usize,
    timeout: f64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut given: HashMap<String, String> = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let Some(name) = flag.strip_prefix("--") else { bail!("unexpected argument {flag:?}; flags are --name value") };
        let value = it.next().with_context(|| format!("--{name} needs a value"))?;
        given.insert(name.to_owned(), value);
    }
    let mut take = |name: &str| given.remove(name);
    let number = |v: Option<String>, name: &str, default: f64| -> anyhow::Result<f64> {
        v.map_or(Ok(default), |s| s.parse().with_context(|| format!("--{name} {s:?} is not a number")))
    };
    let args = Args {
        url: take("url").context("--url is required")?,
        model: take("model").context("--model is required")?,
        input_name: take("input-name").context("--input-name is required")?,
        shape: take("shape")
            .context("--shape is required (batch first, e.g. 1,64)")?
            .split(',')
            .map(|d| d.trim().parse::<usize>().with_context(|| format!("--shape: {d:?} is not a dimension")))
            .collect::<anyhow::Result<_>>()?,
        data: take("data"),
        textcls_u8: match take("data-format").as_deref() {
            None | Some("raw") => false,
            Some("textcls-u8") => true,
            Some(other) => bail!("--data-format {other:?}: raw or textcls-u8"),
        },
        concurrency: number(take("concurrency"), "concurrency", 1.0)? as usize,
        duration: number(take("duration"), "duration", 20.0)?,
        warmup: number(take("warmup"), "warmup", 2.0)?,
        max_bodies: number(take("max-bodies"), "max-bodies", 4096.0)? as usize,
        timeout: number(take("timeout"), "timeout", 30.0)?,
    };
    if let Some(d) = take("datatype") {
        ensure!(d == "FP32", "--datatype {d}: this client sends FP32 only");
    }
    ensure!(given.is_empty(), "unknown flags: {:?}", given.keys().collect::<Vec<_>>());
    ensure!(args.shape.len() >= 2 && args.shape[0] > 0, "--shape needs a batch size and a row shape");
    ensure!(args.concurrency > 0 && args.max_bodies > 0, "--concurrency and --max-bodies must be positive");
    Ok(args)
}

/// The rows of `--data` as f32, each of the row shape (`shape[1..]`), or
/// random rows without it.
fn rows(args: &Args) -> anyhow::Result<Vec<Vec<f32>>> {
    let row_shape = &args.shape[1..];
    let per_row: usize = row_shape.iter().product();
    let Some(path) = &args.data else {
        // A fixed pseudo-random sequence: 64 rows of values in [-1, 1).
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        return Ok((0..64 * args.shape[0]).map(|_| (0..per_row).map(|_| next()).collect()).collect());
    };
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    let values: Vec<f32> = if args.textcls_u8 {
        // Grey u8 [N, H, W] -> (x/255 - 0.5)/0.5 repeated to C channels, as load.py does.
        ensure!(row_shape.len() == 3, "textcls-u8 needs a row shape C,H,W");
        let (c, hw) = (row_shape[0], row_shape[1] * row_shape[2]);
        ensure!(
            bytes.len().is_multiple_of(hw),
            "{path}: {} bytes is not a whole number of {hw}-pixel images",
            bytes.len()
        );
        bytes
            .chunks_exact(hw)
            .flat_map(|img| {
                let grey: Vec<f32> = img.iter().map(|&p| (f32::from(p) / 255.0 - 0.5) / 0.5).collect();
                std::iter::repeat_n(grey, c).flatten()
            })
            .collect()
    } else {
        ensure!(bytes.len().is_multiple_of(4), "{path}: {} bytes is not a whole number of f32", bytes.len());
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    };
    ensure!(
        !values.is_empty() && values.len().is_multiple_of(per_row),
        "{path}: {} values is not a whole number of rows of {row_shape:?}",
        values.len()
    );
    Ok(values.chunks_exact(per_row).map(<[f32]>::to_vec).collect())
}

/// Pre-built request bodies: consecutive rows in batches of `shape[0]`.
fn bodies(args: &Args, rows: &[Vec<f32>]) -> anyhow::Result<Vec<bytes::Bytes>> {
    let batch = args.shape[0];
    let out: Vec<bytes::Bytes> = rows
        .chunks_exact(batch)
        .take(args.max_bodies)
        .map(|chunk| {
            let data: Vec<f32> = chunk.iter().flatten().copied().collect();
            let body =
                json!({"inputs": [{"name": args.input_name, "shape": args.shape, "datatype": "FP32", "data": data}]});
            bytes::Bytes::from(serde_json::to_vec(&body).expect("JSON of numbers"))
        })
        .collect();
    ensure!(!out.is_empty(), "not enough rows ({}) for one batch of {batch}", rows.len());
    Ok(out)
}

/// What one run of the clients saw.
#[derive(Debug, Default)]
struct Run {
    latencies: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
}

async fn run(url: &str, bodies: &[bytes::Bytes], args: &Args, seconds: f64) -> anyhow::Result<(Run, Duration)> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let clients = (0..args.concurrency)
        .map(|_| {
            reqwest::Client::builder()
                .tcp_nodelay(true)
                .http1_only()
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs_f64(args.timeout))
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    let counter = std::cell::Cell::new(0usize);
    let runs = futures_util::future::join_all(clients.iter().map(|http| async {
        let mut run = Run::default();
        while Instant::now() < deadline {
            let body = bodies[counter.get() % bodies.len()].clone();
            counter.set(counter.get() + 1);
            let t0 = Instant::now();
            let outcome = match http.post(url).header("content-type", "application/json").body(body).send().await {
                Ok(r) => {
                    let status = r.status();
                    match r.bytes().await {
                        Ok(b) if status == 200 && has_outputs(&b) => Ok(()),
                        Ok(b) => Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&b[..b.len().min(200)]))),
                        Err(e) => Err(e.to_string()),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(()) => run.latencies.push(t0.elapsed()),
                Err(e) => {
                    run.errors += 1;
                    run.first_error.get_or_insert(e);
                }
            }
        }
        run
    }))
    .await;
    let elapsed = started.elapsed();
    let mut all = Run::default();
    for r in runs {
        all.latencies.extend(r.latencies);
        all.errors += r.errors;
        if all.first_error.is_none() {
            all.first_error = r.first_error;
        }
    }
    Ok((all, elapsed))
}

/// Whether a response body holds `"outputs"`, as load.py checks.
fn has_outputs(body: &[u8]) -> bool {
    body.windows(9).any(|w| w == b"\"outputs\"")
}

/// This process's CPU time (user + system).
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the zeroed struct we own.
    #[allow(unsafe_code)]
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn main() -> anyhow::Result<()> {
    // reqwest is built on rustls without a provider: the workspace's is ring.
    sentinel_hub::install_crypto_provider();
    let args = parse_args()?;
    let url = format!("{}/v2/models/{}/infer", args.url.trim_end_matches('/'), args.model);
    let rows = rows(&args)?;
    let bodies = bodies(&args, &rows)?;
    // One thread: the client's CPU time is one core's at most, and the
    // server keeps the other.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut result = json!({
        "url": url, "model": args.model, "concurrency": args.concurrency, "batch": args.shape[0],
        "shape": args.shape, "request_bytes": bodies[0].len(), "distinct_bodies": bodies.len(),
        "client": "sentinel v2_load (reqwest, one tokio thread)",
    });
    if args.warmup > 0.0 {
        rt.block_on(run(&url, &bodies, &args, args.warmup))?;
    }
    let cpu0 = cpu_time();
    let (run, elapsed) = rt.block_on(run(&url, &bodies, &args, args.duration))?;
    let cpu = cpu_time() - cpu0;
    let ok = run.latencies.len();
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    let pct = |p: f64| if ok == 0 { Value::Null } else { json!(ms(percentile(run.latencies.clone(), p))) };
    let extra = json!({
        "duration_s": args.duration,
        "requests": ok + run.errors, "errors": run.errors,
        "req_per_s": (ok as f64 / elapsed.as_secs_f64() * 10.0).round() / 10.0,
        "p50_ms": pct(50.0), "p95_ms": pct(95.0), "p99_ms": pct(99.0),
        "mean_ms": if ok == 0 { Value::Null } else { json!(ms(run.latencies.iter().sum::<Duration>() / ok as u32)) },
        "max_ms": run.latencies.iter().max().map_or(Value::Null, |d| json!(ms(*d))),
        "elapsed_s": (elapsed.as_secs_f64() * 100.0).round() / 100.0,
        "client_cpu_s": (cpu.as_secs_f64() * 100.0).round() / 100.0,
    });
    let (Value::Object(r), Value::Object(e)) = (&mut result, extra) else { unreachable!("two objects") };
    r.extend(e);
    if let Some(err) = run.first_error {
        r.insert("first_error".into(), json!(err));
    }
    println!("{result}");
    Ok(())
}
