"""`fedhlm bench device`: what a device pays to run the SLM client, fp32 vs int8.

Per precision, in a fresh device process pinned to one core (`taskset -c 0`) that never
imports torch: cold start (process start to the first routed input), peak RSS, prompt
scoring (inputs/s, ms per input), greedy generation with the KV cache (tokens/s, ms per
token p50/p99), and the payload bytes a client sends per 1,000 inputs at the model's tau.
Once: the size of a fresh venv holding only the device dependencies (skipped, with a
message, when pip cannot install them).

    fedhlm bench device --model EXPORT_DIR [--json out.json]
    fedhlm bench device --export-from cache:slm      # export (fp32 + int8) to a temp folder first

The worker process (`python -m fedhlm.bench.device --worker`) imports no torch; the driver reads the
exported model's task's evaluation articles with the project's reader (`fedhlm.data`) and hands them
over as a file, so draft accuracy is measured on that task's own articles.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEVICE_DEPS = ["onnxruntime>=1.17", "tokenizers>=0.15", "numpy", "paho-mqtt>=2.1,<3", "msgpack", "pyyaml"]
REPO = Path(__file__).resolve().parents[3]
SAMPLE_TEXTS = [
    "stocks fell as oil prices rose and investors sold bank shares",
    "the home team won the championship final after extra time",
    "a new chip makes phones faster and uses less power say engineers",
    "leaders met at the summit to discuss trade and climate policy",
]


# -- the worker: runs in its own process --------------------------------------------------


def _inputs(path: str | None, n: int) -> list[tuple[int, str]]:
    """(label, prompt text) pairs the driver wrote (the model's task's evaluation articles), else sample sentences."""
    if path:
        pairs = json.loads(Path(path).read_text())
        return [(int(label), str(text)) for label, text in pairs[:n]]
    return [(i % 4, SAMPLE_TEXTS[i % 4] + f" report {i}") for i in range(n)]


def task_articles(task_name: str, n: int) -> tuple[list[tuple[int, str]], str]:
    """The first n evaluation articles of the task (the training file's when it has none), read and cleaned
    by the project's reader, as (label, prompt text); ([], why) when the task's files are not found."""
    from fedhlm.data.items import prompt_text
    from fedhlm.data.sources import resolve_corpus
    from fedhlm.data.task import load_task

    corpus = resolve_corpus(load_task(task_name), "auto")
    if corpus.name == "synthetic":
        return [], f"{task_name} files not found: sample sentences, no meaningful accuracy"
    items = list(corpus.eval or corpus.train)[:n]
    return [(it.label, prompt_text(it)) for it in items], str(corpus.eval_file or corpus.train_file)


def worker(model: str, precision: str, n_inputs: int, n_tokens: int, inputs_file: str | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    import resource

    import numpy as np

    from fedhlm.transport.codec import encode
    from fedhlm.transport.messages import ClientStatus, ThresholdUpdate, TokenRequest
    from fedhlm_device.runtime import ExportedSLM

    imported = time.perf_counter()
    slm = ExportedSLM(model, precision, threads=1)
    head = slm.head()
    rng = np.random.default_rng(0)
    items = _inputs(inputs_file, n_inputs)
    first = slm.token_inputs([items[0][1]], [0], rng)
    cold = time.perf_counter() - start
    print("READY", flush=True)

    t0 = time.perf_counter()
    drafted = first + [slm.token_inputs([text], [i], rng)[0] for i, (_, text) in enumerate(items[1:], 1)]
    per_input_ms = (time.perf_counter() - t0) * 1000.0 / max(1, len(items) - 1)
    accuracy = float(np.mean([slm.class_of(d.draft_token) == label for d, (label, _) in zip(drafted, items)]))

    # generation needs room under the position table: a prompt as long as it (BBC's 128) is cut first
    context = drafted[0].context_ids.tolist()[: max(1, slm.max_position - n_tokens)]
    gen = slm.generate(context, n_tokens)
    token_ms = np.array(gen.token_ms)

    # payload bytes per 1,000 inputs at the head's tau: offloaded tokens (+ 5 % exploration of the kept
    # ones), one update per round of 50 inputs and the two status messages of a session
    offload = np.array([head.route(d.features) for d in drafted])
    def request(d, reason: str) -> bytes:  # noqa: ANN001
        return encode(TokenRequest(client_id="c000", session_id=f"c000-{d.uid}", seq=d.uid + 1, round=0,
                                   context_ids=d.context_ids, draft_token=d.draft_token, topk_ids=d.topk_ids,
                                   topk_probs=d.topk_probs, tail_mass=d.tail_mass, features=d.features, reason=reason))
    sizes = np.array([len(request(d, "uncertain")) for d in drafted])
    update = len(encode(ThresholdUpdate("c000", "e0", 0, 50, head.params())))
    status = len(encode(ClientStatus("c000", True, "e0", time.time())))
    per_input = (offload * sizes + (~offload) * 0.05 * sizes).mean() + update / 50
    return {
        "precision": precision, "model_bytes": (Path(model) / slm.manifest["files"]["models"][precision]).stat().st_size,
        "import_s": imported - start, "cold_start_s": cold, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "inputs": len(drafted), "ms_per_input": per_input_ms, "inputs_per_s": 1000.0 / per_input_ms,
        "draft_accuracy": accuracy, "gen_tokens": len(gen.tokens), "prefill_ms": gen.prefill_ms,
        "ms_per_token_p50": float(np.percentile(token_ms, 50)), "ms_per_token_p99": float(np.percentile(token_ms, 99)),
        "tokens_per_s": 1000.0 / float(token_ms.mean()), "offload_rate": float(offload.mean()),
        "request_bytes_mean": float(sizes.mean()), "uplink_bytes_per_1000_inputs": float(per_input * 1000 + 2 * status),
        "uplink_bytes_per_1000_inputs_all_offloaded": float(sizes.mean() * 1000 + update * 20 + 2 * status),
        "torch_imported": "torch" in sys.modules,
    }


# -- the driver -------------------------------------------------------------------------------


def run_worker(model: Path, precision: str, n_inputs: int, n_tokens: int, core: int | None,
               inputs_file: Path | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fedhlm.bench.device", "--worker", "--model", str(model), "--precision", precision,
           "--inputs", str(n_inputs), "--tokens", str(n_tokens)]
    if inputs_file is not None:
        cmd += ["--inputs-file", str(inputs_file)]
    if core is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(core), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    ready = None
    lines = []
    for line in proc.stdout:
        if line.strip() == "READY" and ready is None:
            ready = time.perf_counter() - start
        lines.append(line)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0:
        raise RuntimeError(f"device worker failed: {err[-2000:]}")
    result = json.loads(lines[-1])
    result["cold_start_wall_s"] = ready  # interpreter start included
    result["pinned_core"] = core if shutil.which("taskset") else None
    return result


def venv_size(keep: bool = False) -> dict[str, Any]:
    """MiB of a fresh venv with only the device deps (+ this package without its deps)."""
    target = Path(tempfile.mkdtemp(prefix="fedhlm-device-venv-"))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, capture_output=True)
        py = target / "bin" / "python"
        empty = _du(target)
        install = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *DEVICE_DEPS],
                                 capture_output=True, text=True, timeout=600)
        if install.returncode != 0:
            return {"skipped": f"pip could not install the device deps: {install.stderr.strip()[-300:]}"}
        deps = _du(target)
        own = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", str(REPO)],
                             capture_output=True, text=True, timeout=300)
        total = _du(target)
        probe = subprocess.run([str(py), "-c", "import sys, fedhlm_device; print('torch' in sys.modules)"],
                               capture_output=True, text=True, cwd=str(target))
        return {"empty_venv_mib": empty, "with_device_deps_mib": deps, "with_fedhlm_mib": total if own.returncode == 0 else None,
                "device_deps_mib": deps - empty, "imports_ok": probe.returncode == 0,
                "torch_imported": probe.stdout.strip() == "True"}
    except (OSError, subprocess.SubprocessError) as err:
        return {"skipped": f"{type(err).__name__}: {err}"}
    finally:
        if not keep:
            shutil.rmtree(target, ignore_errors=True)


def _du(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


def table(results: list[dict[str, Any]]) -> str:
    cols = [("precision", "{}"), ("model_bytes", "{:.0f}"), ("cold_start_wall_s", "{:.2f}"), ("peak_rss_mib", "{:.0f}"),
            ("ms_per_input", "{:.2f}"), ("tokens_per_s", "{:.0f}"), ("ms_per_token_p50", "{:.2f}"),
            ("ms_per_token_p99", "{:.2f}"), ("draft_accuracy", "{:.3f}"), ("uplink_bytes_per_1000_inputs", "{:.0f}")]
    head = " | ".join(name for name, _ in cols)
    rows = [" | ".join(fmt.format(r[name]) if r.get(name) is not None else "-" for name, fmt in cols) for r in results]
    return "\n".join([head, "-" * len(head), *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedhlm bench device", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="folder written by `fedhlm export` (with --quantize int8 for the int8 row)")
    parser.add_argument("--export-from", help="SLM to export first (folder or cache:<name>), into a temp folder")
    parser.add_argument("--inputs", type=int, default=200, help="prompts scored one by one")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated with the KV cache")
    parser.add_argument("--core", type=int, default=0, help="pin the worker to this core (taskset); -1: no pinning")
    parser.add_argument("--skip-install", action="store_true", help="skip the fresh-venv install size")
    parser.add_argument("--json", type=Path, default=Path("bench_device.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--inputs-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.model, args.precision, args.inputs, args.tokens, args.inputs_file)), flush=True)
        return 0
    tmp = None
    if args.model:
        model = Path(args.model)
    elif args.export_from:
        from fedhlm.models.export import export

        tmp = tempfile.mkdtemp(prefix="fedhlm-export-")
        model = Path(tmp)
        export(args.export_from, model, quantize="int8")
    else:
        parser.error("give --model EXPORT_DIR or --export-from SLM")
    try:
        manifest = json.loads((model / "manifest.json").read_text())
        core = None if args.core < 0 else args.core
        task = manifest["prompt"].get("task", "ag_news")
        pairs, articles = task_articles(task, args.inputs)
        inputs_file = None
        if pairs:  # the worker imports no torch: it gets the articles as a file
            inputs_file = Path(tempfile.mkdtemp(prefix="fedhlm-bench-")) / "inputs.json"
            inputs_file.write_text(json.dumps(pairs))
        print(f"task {task}, articles: {articles}", flush=True)
        results = [run_worker(model, p, args.inputs, args.tokens, core, inputs_file) for p in manifest["files"]["models"]]
        for r in results:
            r.update(task=task, articles=articles)
        install = {"skipped": "--skip-install"} if args.skip_install else venv_size()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(results))
    print("install:", json.dumps(install))
    args.json.write_text(json.dumps({"model": str(model), "results": results, "install": install}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
