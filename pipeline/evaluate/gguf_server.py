"""Serve one GGUF file with llama-cpp-python's OpenAI-compatible server, for lm-eval's `gguf` model.

lm-eval's gguf model (lm_eval/models/gguf.py) posts to `<base_url>/v1/completions`: a
log-likelihood is the sum of the echoed prompt's token logprobs after the context (`echo`,
`logprobs`, `max_tokens=1`), generation uses `stop`. It has no `loglikelihood_rolling`, so
perplexity tasks cannot run through it (`gguf_tasks` leaves them out).

llama-cpp-python is not a project dependency (it compiles llama.cpp, ~10 min): it lives in a
separate environment whose interpreter the recipe names (`evaluate.gguf_server_python`).

Why the BOS override: llama-cpp-python pairs echoed token i with the scores row i, which is
right only when a BOS leads the prompt (Llama._create_completion drops the BOS from the tokens
but not from the scores); without one every logprob belongs to the next token. Our GGUF says
add_bos_token=false, so the server is started with that key overridden: the BOS is
<|endoftext|>, the token that precedes every document in training.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.ngrams import load_task_yaml

ROLLING = "loglikelihood_rolling"


def usable_python(python: str | None) -> str | None:
    """Why `python` cannot serve GGUF files (None when it can)."""
    if not python:
        return "evaluate.gguf_server_python is not set"
    if not Path(python).is_file():
        return f"evaluate.gguf_server_python: {python} does not exist"
    probe = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"evaluate.gguf_server_python: {python} cannot import llama_cpp.server ({last})"
    return None


def task_output_types(tm, names: list[str]) -> dict[str, str]:
    """lm-eval task name -> its output_type, read from the task YAMLs the task manager indexed."""
    out = {}
    for name in names:
        path = getattr(tm.task_index.get(name), "yaml_path", None)
        cfg = load_task_yaml(path) if path else {}
        out[name] = (cfg or {}).get("output_type", "generate_until")
    return out


def gguf_tasks(tm, names: list[str]) -> tuple[list[str], list[str]]:
    """(tasks lm-eval's gguf model can run, tasks it cannot: loglikelihood_rolling ones)."""
    types = task_output_types(tm, names)
    return [n for n in names if types[n] != ROLLING], [n for n in names if types[n] == ROLLING]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PipelineError(f"llama.cpp server exited with {proc.returncode} before serving; see {log}:\n"
                                + log.read_text(errors="replace")[-2000:])
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise PipelineError(f"llama.cpp server did not answer {url}/v1/models within {timeout_s:.0f} s; see {log}")


@contextlib.contextmanager
def served(python: str, gguf: Path, log: Path, n_ctx: int = 2048, threads: int = 2,
           timeout_s: float = 120) -> Iterator[str]:
    """Run `python -m llama_cpp.server` on `gguf` on a free local port; yields its base URL."""
    port = free_port()
    cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--logits_all", "true", "--kv_overrides", "tokenizer.ggml.add_bos_token=bool:true"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc, log, timeout_s)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
