"""End-to-end tests of `nanoseek generate`, `nanoseek chat` and `nanoseek serve` at tiny size (subprocesses).

The model is the tiny preset fitted to one R1-style chat transcript and one sentence, so greedy
outputs are known text and the chat reply carries a <think> block.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from nanoseek.infer import LLM, SamplingParams
from chat_model import ANSWER, QUESTION, REASONING, save_chat_model
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_chat_model(tmp_path_factory.mktemp("tiny_cli"))


def nanoseek_cli(*args, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoseek.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_generate_streams_the_greedy_completion(model_dir):
    r = nanoseek_cli("generate", model_dir, "--prompt", "The quick brown", "--max-tokens", "12", "--temperature", "0",
                     "--device", "cpu")
    assert r.returncode == 0, r.stderr
    offline = LLM(model_dir).generate("The quick brown", SamplingParams(max_tokens=12, temperature=0))
    assert r.stdout == offline[0].outputs[0].text + "\n"
    assert r.stdout.startswith(" fox jumps over")
    assert "12 tokens" in r.stderr and "tokens/s" in r.stderr


def test_generate_speculative_mtp_keeps_greedy_output(model_dir):
    r = nanoseek_cli("generate", model_dir, "--prompt", "The quick brown", "--max-tokens", "10", "--temperature", "0",
                     "--speculative", "mtp")
    assert r.returncode == 0, r.stderr
    offline = LLM(model_dir).generate("The quick brown", SamplingParams(max_tokens=10, temperature=0))
    assert r.stdout == offline[0].outputs[0].text + "\n"   # greedy speculative decoding is exact
    assert "MTP acceptance" in r.stderr


def test_generate_errors_are_reported(model_dir, tmp_path, capsys):
    from nanoseek.cli import main
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    assert main(["generate", model_dir, "--prompt", "x", "--temperature", "-1", "--device", "cpu"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_chat_repl_from_piped_stdin(model_dir):
    stdin = f"{QUESTION}\n/reset\n\n{QUESTION}\n{QUESTION}\n"   # no /exit: EOF ends the session
    r = nanoseek_cli("chat", model_dir, "--temperature", "0", "--max-tokens", "40", stdin=stdin)
    assert r.returncode == 0, r.stderr
    first, rest = r.stdout.split("(conversation cleared)\n")
    # reasoning is shown with a prefix when stdout is not a terminal, then the answer
    assert first == f"[reasoning] {REASONING}\n{ANSWER}\n"
    assert rest.startswith(first) and rest.count("[reasoning]") == 2 and rest.endswith("\n")
    assert "\x1b[" not in r.stdout  # no colour codes into a pipe


def test_chat_exit_command(model_dir, monkeypatch, capsys):
    import io
    from nanoseek.cli import main
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/exit\n{QUESTION}\n"))
    assert main(["chat", model_dir, "--device", "cpu"]) == 0
    assert capsys.readouterr().out == ""


def test_serve_answers_the_openai_client(model_dir):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "serve", model_dir, "--port", str(port),
                             "--served-model-name", "tiny", "--api-key", "k", "--max-num-seqs", "2",
                             "--log-level", "warning"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=30)
        deadline = time.time() + 60
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.2)
        assert [m.id for m in models.data] == ["tiny"]
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                           temperature=0, max_tokens=40)
        assert r.choices[0].message.content == ANSWER
        assert r.choices[0].message.reasoning_content == REASONING
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "serving 'tiny'" in err and "127.0.0.1" in err
