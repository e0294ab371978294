"""HuggingFace import -> megatron-twist -> export: logits equal the original model's (1e-4)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_twist.checkpoint.models import load_model
from megatron_twist.hf.io import export_hf, import_hf, load_hf_model
from megatron_twist.model.gpt import gpt_forward

TOKENS = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=512,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=160,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def _random_hf_model(config, path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor would show
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path), safe_serialization=True)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_import_then_export_keeps_the_logits(mcore, tmp_path, prepared512, family):
    original = _random_hf_model(_llama_config() if family == "llama" else _gpt2_config(), tmp_path / "hf")
    with torch.no_grad():
        want = original(input_ids=TOKENS).logits
    model = import_hf(str(tmp_path / "hf"), str(tmp_path / "central"))
    assert model.family == family
    megatron, meta = load_model(str(tmp_path / "central"))
    assert meta["origin"]["format"] == "huggingface" and meta["step"] == 0
    with torch.no_grad():
        got = gpt_forward(megatron.eval(), TOKENS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    export_hf(str(tmp_path / "central"), str(tmp_path / "out"), tokenizer=prepared512.data_dir)
    exported, _ = load_hf_model(str(tmp_path / "out"))
    with torch.no_grad():
        again = exported(input_ids=TOKENS).logits
    torch.testing.assert_close(again, want, atol=1e-4, rtol=0)
    assert type(exported).__name__ == type(original).__name__
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in config  # loads with no remote code


@pytest.mark.multiprocess
def test_twist_trained_cut_exports_with_reduced_sizes_and_same_perplexity(
    mcore, tmp_path, prepared512, run_twist, run_twist_many
):
    """TwIST-train a tiny Llama (GQA) on real text, cut at kappa 0.5, export: HF logits equal the
    in-framework cut model's, generate runs, config.json states the reduced sizes, and held-out
    perplexity is the same in all three forms (central vs its export, cut vs its export)."""
    from transformers import AutoModelForCausalLM

    from megatron_twist.data import load_token_stream
    from megatron_twist.evaluation import perplexity
    from megatron_twist.hf.io import hf_forward

    data = prepared512.data_dir
    run_twist(
        [
            "train",
            "--data-path",
            data,
            "--model-preset",
            "tiny",
            "--train-iters",
            "8",
            "--local-steps",
            "4",
            "--num-subnets",
            "2",
            "--keep-ratio",
            "0.5",
            "--micro-batch-size",
            "4",
            "--save",
            tmp_path / "central",
        ]
    )
    from megatron_twist.checkpoint.models import load_central, save_extracted
    from megatron_twist.twist.extraction import cut_model, select_plan

    central, twist, _ = load_central(str(tmp_path / "central"))  # in-process: what `twist extract` does
    plan = select_plan(central.config, twist, central.params, 0.5)
    module, _ = cut_model(central.config, twist, central.params, plan)
    save_extracted(
        str(tmp_path / "cut"),
        module,
        central.config,
        twist,
        plan,
        0.5,
        "magnitude",
        source={"data": json.loads((tmp_path / "central" / "meta.json").read_text())["data"]},
    )
    # export-hf (tokenizer from the data), then `twist eval` of its output: one process (start-up paid once)
    _, eval_out = run_twist_many(
        1,
        [
            ["export-hf", "--load", tmp_path / "cut", "--save", tmp_path / "hf-cut"],
            ["eval", "--load", tmp_path / "hf-cut", "--data-path", data, "--max-tokens", "4096"],
        ],
    )
    export_hf(str(tmp_path / "central"), str(tmp_path / "hf-central"))

    config = json.loads((tmp_path / "hf-cut" / "config.json").read_text())
    # tiny: 4 query heads in 2 KV groups, FFN 128; kappa 0.5 keeps 1 head per group and 64 neurons
    assert (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["intermediate_size"],
        config["head_dim"],
    ) == (2, 2, 64, 16)
    cut, _ = load_model(str(tmp_path / "cut"))
    hf_cut = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf-cut"), local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_cut(input_ids=TOKENS).logits, gpt_forward(cut.eval(), TOKENS), atol=1e-4, rtol=0)
        generated = hf_cut.generate(TOKENS[:1, :8], max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, 16)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf-cut"), local_files_only=True)
    text = "def main(argv):\n    return 0\n"
    from megatron_twist.data import load_tokenizer

    assert tok.encode(text, add_special_tokens=False) == load_tokenizer(data).tokenize(text)

    tokens = load_token_stream(data, "valid")[:4097]
    for ours, theirs in (("cut", "hf-cut"), ("central", "hf-central")):
        module, meta = load_model(str(tmp_path / ours))
        a = perplexity(module, tokens, meta["model"]["seq_length"])
        hf_model, hf_meta = load_hf_model(str(tmp_path / theirs))
        b = perplexity(hf_model, tokens, hf_meta["model"]["seq_length"], forward=hf_forward)
        assert a["tokens"] == b["tokens"] == 4096
        assert abs(a["perplexity"] - b["perplexity"]) <= 1e-4 * a["perplexity"], (ours, a, b)
        assert a["parameters"] == b["parameters"]
    # `twist eval` on the HF directory (run above) printed the same number (JSON on the last line)
    result = json.loads(eval_out.strip().splitlines()[-1])
    cut_ppl = perplexity(cut, tokens, 64)["perplexity"]
    assert result["kind"] == "huggingface" and abs(result["perplexity"] - cut_ppl) <= 1e-4 * cut_ppl


@pytest.mark.multiprocess
def test_imported_model_with_its_tokenizer_is_continued_by_twist_train(
    mcore, tmp_path, prepared512, run_twist, run_twist_many
):
    """import-hf, prepare-data with the model's own HF tokenizer, then `twist train --load`: training starts
    from the imported weights (same held-out perplexity as the HF model) and the loss falls."""
    from megatron_twist.hf.tokenizer import export_tokenizer

    _random_hf_model(_llama_config(), tmp_path / "hf")
    export_tokenizer(f"{prepared512.data_dir}/tokenizer.model", str(tmp_path / "hf"), 512)
    text = tmp_path / "corpus.jsonl"  # one record per document, text in the "code" field
    text.write_text(
        "\n".join(json.dumps({"code": f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 3}) for i in range(400))
    )
    # prepare-data and import-hf: two `twist` commands in one process (the start-up paid once)
    run_twist_many(
        1,
        [
            ["prepare-data", "--input", text, "--json-field", "code", "--hf-tokenizer", tmp_path / "hf"]
            + ["--output", tmp_path / "data"],
            ["import-hf", tmp_path / "hf", "--save", tmp_path / "central"],
        ],
    )
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["tokenizer_file"] == "hf_tokenizer" and manifest["vocab_size"] == 512
    from megatron_twist.data import load_token_stream
    from megatron_twist.evaluation import perplexity
    from megatron_twist.hf.io import hf_forward

    tokens = load_token_stream(str(tmp_path / "data"), "valid")
    imported, _ = load_model(str(tmp_path / "central"))
    hf_model, _ = load_hf_model(str(tmp_path / "hf"))
    before = [
        perplexity(imported, tokens, 64)["perplexity"],
        perplexity(hf_model, tokens, 64, forward=hf_forward)["perplexity"],
    ]
    assert abs(before[0] - before[1]) <= 1e-4 * before[0]  # the import IS the HF model
    out = run_twist(
        [
            "train",
            "--load",
            tmp_path / "central",
            "--data-path",
            tmp_path / "data",
            "--train-iters",
            "12",
            "--local-steps",
            "4",
            "--num-subnets",
            "2",
            "--keep-ratio",
            "0.5",
            "--micro-batch-size",
            "4",
            "--lr",
            "3e-3",
            "--save",
            tmp_path / "trained",
            "--metrics-file",
            tmp_path / "m.json",
        ]
    )
    assert "starting from the imported model" in out.stdout + out.stderr
    after = perplexity(load_model(str(tmp_path / "trained"))[0], tokens, 64)["perplexity"]
    assert after < before[0] / 2, (before, after)


@pytest.mark.multiprocess
def test_lm_eval_harness_on_an_exported_model_with_a_local_file(mcore, tmp_path, prepared512, launch):
    """examples/lm_eval/run_lm_eval.sh: lm-eval's hf model on an exported directory, a local JSON-lines
    task, offline. Each document fits one window, so its rolling log-likelihood is the sum of
    log p(token | end-of-text prefix, earlier tokens): recomputed here from the exported model and
    tokenizer, lm-eval's bits_per_byte must agree."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    _random_hf_model(_llama_config(), tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), str(tmp_path / "central"))
    export_hf(str(tmp_path / "central"), str(tmp_path / "export"), tokenizer=prepared512.data_dir)
    text = __import__("pathlib").Path(json.__file__).read_text()
    documents = [text[i * 50 : (i + 1) * 50] for i in range(4)]
    docs = tmp_path / "heldout.jsonl"
    docs.write_text("\n".join(json.dumps({"body": d}) for d in documents))
    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    proc = launch(
        [
            "bash",
            repo / "examples" / "lm_eval" / "run_lm_eval.sh",
            tmp_path / "export",
            docs,
            tmp_path / "results",
            "body",
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("results*.json")]
    assert len(results) == 1 and results[0]["n-samples"]["twist_heldout"]["effective"] == 4
    bpb = results[0]["results"]["twist_heldout"]["bits_per_byte,none"]

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "export"), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), local_files_only=True).eval()
    total_ll, total_bytes = 0.0, 0
    for d in documents:
        ids = tok.encode(d, add_special_tokens=False)
        assert len(ids) < 63  # one window
        inp = torch.tensor([[tok.eos_token_id] + ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=inp).logits[0, :-1].double(), dim=-1)
        total_ll += logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
        total_bytes += len(d.encode("utf-8"))
    expected = -total_ll / total_bytes / math.log(2)
    assert abs(bpb - expected) <= 1e-3 * expected, (bpb, expected)
