#!/usr/bin/env python3
"""Smoke test of a `sentinel-worker` binary, usually an aarch64 one under qemu-user.

Starts the worker on the digits model, reads its ready frame, sends one request
with one test sample from models/data/digits_test_x.bin and checks that the
returned label equals the one in digits_test_y.bin. Then it sends the other
test samples and checks the accuracy against the manifest's tract figure, so a
miscompiled kernel cannot pass on one lucky sample.

The worker is run confined first. Under qemu-user the seccomp syscall is not
emulated (ENOSYS): the worker either reports itself unconfined in its ready
frame or exits with the sandbox code 71. Both are reported as "seccomp
unavailable under qemu (expected)"; in the second case the check is re-run with
`--confinement off`. Any other failure exits non-zero.

Usage: aarch64_worker_smoke.py REPO_ROOT -- RUNNER... WORKER
(for example `-- qemu-aarch64 -L /usr/aarch64-linux-gnu target/.../sentinel-worker`).

Wire format (worker/protocol/src/frame.rs): every frame is a u32 LE length and
the payload; a tensor list is a u32 count, then per tensor a u8 dtype code
(1 = f32, 7 = i64), a u8 rank, rank x u64 dims, a u64 byte length and the bytes.
A response payload starts with a status byte (0 ok, 1 error).
"""

import json
import os
import signal
import struct
import subprocess
import sys
import tempfile

EXIT_SANDBOX = 71
F32, I64 = 1, 7
MODEL = "digits/digits_mlp_v1.onnx"
SAMPLE = 0
# One request per worker start is slow under qemu; a few hundred small ones are not.
TIMEOUT_S = 300


def tensor_list(tensors):
    out = struct.pack("<I", len(tensors))
    for code, shape, data in tensors:
        out += struct.pack("<BB", code, len(shape))
        out += b"".join(struct.pack("<Q", d) for d in shape)
        out += struct.pack("<Q", len(data)) + data
    return out


def parse_tensor_list(buf):
    (count,) = struct.unpack_from("<I", buf, 0)
    pos, tensors = 4, []
    for _ in range(count):
        code, rank = struct.unpack_from("<BB", buf, pos)
        pos += 2
        shape = list(struct.unpack_from("<%dQ" % rank, buf, pos))
        pos += 8 * rank
        (length,) = struct.unpack_from("<Q", buf, pos)
        pos += 8
        tensors.append((code, shape, buf[pos : pos + length]))
        pos += length
    if pos != len(buf):
        raise ValueError("%d trailing bytes in response" % (len(buf) - pos))
    return tensors


def read_exact(stream, n):
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def read_frame(stream):
    head = read_exact(stream, 4)
    if head is None:
        return None
    (length,) = struct.unpack("<I", head)
    return read_exact(stream, length)


def write_frame(stream, payload):
    stream.write(struct.pack("<I", len(payload)) + payload)
    stream.flush()


def label_of(response):
    """The i64 label output of one response (the model's second output)."""
    # Status 0: tensors follow; 2: a u64 compute time in ns, then tensors; 1: an error message.
    if not response or response[0] not in (0, 2):
        raise RuntimeError("worker answered with an error: %r" % response[1:].decode("utf-8", "replace"))
    body = response[1:] if response[0] == 0 else response[9:]
    labels = [t for t in parse_tensor_list(body) if t[0] == I64]
    if len(labels) != 1 or labels[0][1] != [1]:
        raise RuntimeError("expected one i64 [1] label output, got %r" % [(c, s) for c, s, _ in labels])
    return struct.unpack("<q", labels[0][2])[0]


def on_timeout(_signum, _frame):
    raise TimeoutError("worker smoke test took more than %d s" % TIMEOUT_S)


def run_worker(cmd, n_samples, xs):
    """Runs the worker once on the first `n_samples` samples of `xs`.
    Returns (exit code, stderr, ready frame, labels)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        ready, labels = None, []
        try:
            payload = read_frame(proc.stdout)
            if payload is not None:
                ready = json.loads(payload)
                for i in range(n_samples):
                    x = xs[i * 256 : (i + 1) * 256]
                    write_frame(proc.stdin, tensor_list([(F32, [1, 64], x)]))
                    response = read_frame(proc.stdout)
                    if response is None:
                        break
                    labels.append(label_of(response))
            proc.stdin.close()
            code = proc.wait(timeout=TIMEOUT_S)
        except BrokenPipeError:
            code = proc.wait(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        return code, err.read().decode("utf-8", "replace"), ready, labels


def main():
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit(__doc__)
    root, worker = sys.argv[1], sys.argv[3:]
    models = os.path.join(root, "models")
    with open(os.path.join(models, "data", "digits_test_x.bin"), "rb") as f:
        xs = f.read()
    with open(os.path.join(models, "data", "digits_test_y.bin"), "rb") as f:
        ys = f.read()
    with open(os.path.join(models, "manifest.json")) as f:
        manifest = json.load(f)["models"]["digits_mlp_v1"]
    expected_acc = next(c["accuracy_tract"] for c in manifest["runtime_checks"] if "accuracy_tract" in c)
    n = len(ys) // 8
    truth = list(struct.unpack("<%dq" % n, ys))
    base = worker + ["--model", os.path.join(models, MODEL), "--input-shape", "1,64"]

    signal.signal(signal.SIGALRM, on_timeout)
    signal.alarm(TIMEOUT_S)
    code, stderr, ready, labels = run_worker(base + ["--confinement", "on"], n_samples=n, xs=xs)
    # ENOSYS prints as "Function not implemented (os error 38)".
    if code == EXIT_SANDBOX and ("ENOSYS" in stderr or "os error 38" in stderr):
        print("worker (confined): exit %d: %s" % (code, stderr.strip()))
        print("seccomp unavailable under qemu (expected); re-running with --confinement off")
        code, stderr, ready, labels = run_worker(base + ["--confinement", "off"], n_samples=n, xs=xs)
    elif ready is not None and not ready.get("confined") and "seccomp" in (ready.get("reason") or ""):
        print("worker (confined): ready frame %s" % json.dumps(ready))
        print("seccomp unavailable under qemu (expected); the worker served unconfined")
    else:
        print("worker (confined): ready frame %s" % json.dumps(ready))
    if code != 0 or ready is None or len(labels) != n:
        sys.exit("FAIL: worker exit %s after %d/%d answers; stderr:\n%s" % (code, len(labels), n, stderr))

    if labels[SAMPLE] != truth[SAMPLE]:
        sys.exit("FAIL: sample %d: label %d, expected %d" % (SAMPLE, labels[SAMPLE], truth[SAMPLE]))
    print("sample %d: label %d == digits_test_y.bin's %d" % (SAMPLE, labels[SAMPLE], truth[SAMPLE]))
    acc = sum(a == b for a, b in zip(labels, truth)) / n
    print("accuracy on %d samples: %.4f (manifest, tract on x86_64: %.4f)" % (n, acc, expected_acc))
    # One sample either way is float rounding (FMA on aarch64); more is a broken build.
    if abs(acc - expected_acc) > 1.5 / n:
        sys.exit("FAIL: accuracy %.4f differs from the manifest's %.4f" % (acc, expected_acc))
    print("worker smoke: OK")


if __name__ == "__main__":
    main()
