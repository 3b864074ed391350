"""The README's tour on the model a newcomer makes first, through the real CLI in subprocesses:
`lmforge quickstart` (scaled down: tiny preset, 1.5 MB of stdlib sources, the 20-step minimum) → `generate` →
`export --format hf` (transformers loads it: the same logits) → `export --format gguf` (gguf's reader: the
arcee graph, metadata and every tensor) → `serve` on 127.0.0.1 answering the `openai` client, then stopped.

The quickstart trains a squared-ReLU MLP (its recipe, lmforge/recipes/quickstart.yaml), which leaves lmforge
as Arcee (HF) / llama.cpp's arcee graph (GGUF); this test is what keeps that pipeline unbroken."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_VERBOSITY": "error"}
PROMPT = "import os\n"


def lmforge(*args: str, timeout: float = 600, ok: tuple[int, ...] = (0,)) -> dict:
    p = subprocess.run([sys.executable, "-m", "lmforge", *args, "--json"], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=timeout, check=False)
    assert p.returncode in ok, f"lmforge {' '.join(args)}:\n{p.stderr[-3000:]}"
    return json.loads(p.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    root = tmp_path_factory.mktemp("tour")
    # On a machine busier than when the quickstart timed its step, its time guard stops the run with a
    # checkpoint (exit 124) and, as the README says, running it again continues where it stopped.
    for _ in range(10):  # each try trains >= 3 minutes' worth before its guard; 20 steps take ~15 s when idle
        qs = lmforge("quickstart", "--out", str(root / "qs"), "--minutes", "0.1", "--preset", "tiny",
                     "--data-mb", "1.5", ok=(0, 124))
        if qs["exit_code"] == 0:
            break
    assert qs["exit_code"] == 0 and qs["model_dir"], qs
    return root, qs


@pytest.mark.slow
def test_readme_tour_quickstart_generate_export_serve(tour):
    from lmforge.artifacts.gguf.tensors import halves_to_pairs
    from lmforge.artifacts.hf.convert import read_hf_weights
    from lmforge.artifacts.model_dir import load_model_dir
    from lmforge.tokenizer.core import load_tokenizer

    root, qs = tour
    model_dir = Path(qs["model_dir"])
    assert qs["exit_code"] == 0 and qs["final_val_loss"] < qs["first_val_loss"]
    assert 0 < qs["mfu"] <= 1.0  # never above 100% (the peak is raised when a window beats it)
    ours = load_model_dir(model_dir).eval()
    cfg = ours.cfg
    assert cfg.activation == "relu2"  # the quickstart's recipe: what used to be refused by both exports

    # generate: greedy, what the server must answer below
    gen = lmforge("generate", "--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "12")
    completion = gen["completions"][0]
    assert gen["tokens"] > 0 and completion

    # export --format hf: transformers loads it with the same logits
    hf_info = lmforge("export", "--model", str(model_dir), "--format", "hf", "--out", str(root / "hf"))
    assert (hf_info["family"], hf_info["architecture"]) == ("arcee", "ArceeForCausalLM")
    transformers.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf"), dtype=torch.float32).eval()
    tok = load_tokenizer(model_dir)
    ids = torch.tensor([tok.encode(PROMPT + "def main():\n    return sys.argv\n")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(root / "hf"))
    assert hf_tok.encode(PROMPT, add_special_tokens=False) == tok.encode(PROMPT)

    # export --format gguf: llama.cpp's arcee graph; gguf's reader gets the metadata and every tensor back
    g = lmforge("export", "--model", str(model_dir), "--format", "gguf", "--dtype", "f32", "--out", str(root / "gguf"))
    assert g["architecture"] == "arcee"
    reader = gguf.GGUFReader(g["file"])
    field = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert field["general.architecture"] == "arcee"
    assert (field["arcee.block_count"], field["arcee.embedding_length"], field["arcee.feed_forward_length"]) == \
        (cfg.n_layers, cfg.dim, cfg.hidden_dim)
    assert (field["arcee.attention.head_count"], field["arcee.attention.head_count_kv"]) == (cfg.n_heads, cfg.n_kv_heads)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == cfg.vocab_size and tokens[:100] == [tok.id_to_token(i) for i in range(100)]
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.ARCEE, cfg.n_layers)
    expected = {}
    for key, t in read_hf_weights(root / "hf").items():  # llama.cpp's converter's view of the HF export
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            t = halves_to_pairs(t, cfg.n_heads if "q_proj" in key else cfg.n_kv_heads)
        expected[name_map.get_name(key, try_suffixes=(".weight", ".bias"))] = t.numpy()
    assert set(stored) == set(expected)
    assert all(np.array_equal(stored[k], v) for k, v in expected.items())

    # serve: the openai client on 127.0.0.1 gets the same greedy completion, then the server stops
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--port", str(port)],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused on localhost", max_retries=0,
                               timeout=120)
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                models = client.models.list().data
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "lmforge serve did not come up in 180 s"
                time.sleep(0.5)
        assert len(models) == 1
        reply = client.completions.create(model=models[0].id, prompt=PROMPT, max_tokens=12, temperature=0)
        assert reply.choices[0].text == completion
        chat = client.chat.completions.create(model=models[0].id, max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": "import os"}])
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens > 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
    assert server.returncode is not None
    with pytest.raises(openai.APIConnectionError):  # stopped: nothing answers on the port any more
        client.models.list()
