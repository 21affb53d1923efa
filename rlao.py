"""rlao.py -- RLAO: train the weak meta-agent on its own workflow-optimisation trajectories, in plain PyTorch.

Paper: "Weak-for-Strong: Training Weak Meta-Agent to Harness Strong Executors" (arXiv 2504.04785), section RLAO.
How this file maps onto it, top to bottom:
  logged turns {(s_t, a_t, r_t)} from w4s.py        -> load_examples(): one example per evaluated meta-agent action
                                                      (as the official pipeline: copies, unextractable and broken
                                                      replies are left out, since rwr cannot push a probability
                                                      down; --objective pg --invalid-reward -0.5 trains on them too);
                                                      its group = the m samples of the same turn, key (run, iteration)
  reward-weighted regression, max sum w log pi(a|s), -> --objective rwr: rwr_weights() + rlao_loss(), NLL of the
  w = exp(r/tau), tau = 0.4                            action tokens only, w normalised over the training set
  policy gradient with a group baseline              -> --objective pg: A = r - mean(r of the turn) [/ std], optional
                                                      KL penalty to the initial policy
  train on seen tasks, then optimise an unseen one   -> --rounds R --tasks A,B --eval-task T (run_rounds): measure
  with the trained meta-agent                          pi_k on T, collect on A and B (w4s.py, validation data only,
                                                       --test-size 0), train pi_{k+1}, measure again ...
The measure of a meta-agent on the unseen task, per checkpoint (measure()): the mean reward and best validation gain
of its evaluated candidates in a short W4S run (fixed seeds, same executor and budget), and the pre-screen pass rate:
over K sampled actions on each of a fixed set of states, the share that hold a workflow, do not nearly copy one the
state shows (or a seed) and survive w4s.prescreen's two dry runs, in which they must call the executor and return
what depends on its replies; no
real executor call, so K x states can be large; Wilson 95% CI (it treats the K samples of a state as independent, so
it is somewhat narrow when states differ a lot).
Mixed data of several seen tasks: each task carries an equal share of the loss (task_shares()), whatever its count.

Departures from the paper:
  - full fine-tuning leaves an untied input embedding frozen (freeze_untied_input_embedding: its master copy, moments
    and gradient are 1.9 GB of the 0.5B's; its measured peak fell 0.9-1.2 GiB, and with the policy loaded straight
    in bf16 to 10.65 GiB); the paper trains every weight.
  - warm-up (--warmup-k, on by default): where a seen task's collection evaluated no action -- an untrained 0.5B
    rarely writes a new workflow that works, so the paper's reward is missing -- K actions are sampled on each of its
    states and those that pass the free pre-screen join the training data with reward 0, the reward of an evaluated
    workflow that improved nothing (rejection-sampling fine-tuning: rwr weights them like plain fine-tuning). Once
    evaluated candidates exist, they are trained on with the paper's objective and weight (exp(r/tau): a reward-1
    action weighs e^2.5 = 12x a pre-screen pass); warm-up data of earlier rounds stays in the data.
The training loop is the usual one but for its micro-batches: the K actions sampled on one state are packed after
its prompt, which is encoded once for all of them (pack(): exact, not an approximation). Then the model's own chat
template, AdamW with warmup + cosine, gradient accumulation and clipping, bf16 with fp32 master weights, gradient
checkpointing (default), an optional hand-written LoRA (merged into the weights on save), DDP or FSDP2 (--fsdp:
fully_shard per decoder layer, bf16 compute over fp32 sharded weights) under torchrun, resume from
OUT/train_state.pt; the peak RSS of each step goes to the log. The output dir is an HF checkpoint (config,
tokenizer, model.safetensors) that `python w4s.py --meta-agent hf:OUT` loads.

Deliberately left out: PPO-style importance ratios and clipping (each round trains once on data its own policy just
produced, so the data is close to on-policy), a value function, packing different states into one sequence,
resuming an --fsdp run mid-way, and models whose logits are not a plain linear map
of the last hidden state (soft-capping).
"""
import argparse, contextlib, copy, dataclasses, hashlib, json, math, os, random, shlex, subprocess, sys, time
from collections import Counter, defaultdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

RECIPE = """Train on seen tasks, measure on an unseen one. E.g., offline on this machine:
  python rlao.py --rounds 2 --tasks gsm8k,mbpp --eval-task math --init embedded:qwen2.5-coder-0.5b --out runs/rl
      --w4s-args '--executor embedded:qwen2.5-coder-1.5b --iterations 2 --val-size 8' --steps 20
Round k: pi_k is measured on the unseen task (the pre-screen pass rate over K sampled actions on fixed states, free;
a short W4S run, its mean reward and best validation gain), then collects on every seen task, trains pi_{k+1}.
OUT/rounds.json and the printed table hold the figures per round; OUT/round{k}/ every run, sample and checkpoint."""

def get_args(argv=None):
    p = argparse.ArgumentParser(description="RLAO trainer for the W4S meta-agent (see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", nargs="*", default=[], help="w4s run dirs (searched for trajectory.jsonl) or trajectory.jsonl files")
    a("--init", default="embedded:qwen2.5-coder-0.5b", help="starting policy: embedded:NAME or hf:PATH_OR_ID")
    a("--out", default="runs/rlao", help="output dir: HF checkpoint + train_state.pt + log.jsonl")
    a("--objective", choices=["rwr", "pg"], default="rwr", help="rwr: reward-weighted regression (paper); "
      "pg: policy gradient with the turn's group mean as baseline")
    a("--tau", type=float, default=0.4, help="rwr temperature: w = exp(r / tau)")
    a("--pg-std", action="store_true", help="pg: divide advantages by the group's reward std")
    a("--kl", type=float, default=0.0, help="pg/rwr: weight of the KL penalty to the initial policy (0 = off)")
    a("--invalid-reward", type=float, default=None, help="pg only: train on actions that never reached evaluation "
      "(near-copies, no workflow, broken) with this reward, e.g. -0.5; default: leave them out")
    a("--keep", choices=["all", "positive", "best"], default="all",
      help="which actions to train on: all, reward > 0, or the best of each turn")
    a("--val-frac", type=float, default=0.1, help="fraction of runs held out for the validation loss")
    a("--max-len", type=int, default=4096, help="drop examples longer than this many tokens (prompt + action)")
    a("--steps", type=int, default=100, help="optimiser steps")
    a("--batch-size", type=int, default=8, help="actions of one state per micro-batch per process: packed after "
      "the state's prompt, which is encoded once for them (activation memory grows with it)")
    a("--grad-accum", type=int, default=16, help="micro-batches per optimiser step per process")
    a("--lr", type=float, default=1e-5, help="peak learning rate (try ~2e-4 with --lora-r)")
    a("--warmup", type=int, default=10, help="linear warmup steps, then cosine decay")
    a("--min-lr-frac", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (0 = off)")
    a("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="bf16: bf16 weights and activations, "
      "fp32 master weights in the optimiser; auto: bf16 on CUDA and on CPUs with avx512_bf16/amx, else fp32")
    a("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True, help="gradient checkpointing: ~30%% more "
      "compute; without it the 0.5B needs ~4 GB of activations per 3.6k-token sequence")
    a("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP under torchrun: weights, gradients and "
      "optimiser state sharded over processes (the 7B meta-agent does not fit a DDP replica); bf16 compute with "
      "fp32 sharded master weights; the same checkpoint; no --lora-r, no mid-run --resume")
    a("--lora-r", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    a("--lora-alpha", type=float, default=16.0, help="LoRA scale alpha (update = alpha/r * B A)")
    a("--eval-every", type=int, default=25, help="validation loss every N steps (0 = only at the end)")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0 = only at the end)")
    a("--resume", action="store_true", help="continue from OUT/train_state.pt if it exists")
    a("--seed", type=int, default=0, help="seed for the split and the batch order")
    g = p.add_argument_group("seen -> unseen rounds (the paper's transfer experiment)", RECIPE).add_argument
    g("--rounds", type=int, default=0, help="R > 0: measure pi_0 on --eval-task, then R times: collect on --tasks -> "
      "train -> measure the new checkpoint")
    g("--tasks", default=None, help="seen tasks, comma-separated (built-in names or .jsonl files): collected on with "
      "w4s.py, validation data only, and trained on")
    g("--eval-task", default=None, help="the unseen task: measured before the first round and after each, never "
      "trained on")
    g("--eval-iterations", type=int, default=1, help="turns of the short W4S run on --eval-task per checkpoint (its "
      "mean reward and best validation gain); 0 = only the pre-screen pass rate")
    g("--eval-states", nargs="*", default=[], help="w4s runs on --eval-task (dirs or trajectory.jsonl) whose states "
      "join round 0's in the fixed set the pre-screen pass rate is measured on")
    g("--screen-k", type=int, default=16, help="K: actions sampled per state for the pre-screen pass rate and the "
      "warm-up")
    g("--meta-max-tokens", type=int, default=1024, help="reply budget of each sampled action (as w4s.py's flag)")
    g("--warmup-k", type=int, default=16, help="warm-up: in a round whose collection on a seen task evaluated no "
      "action, sample this many actions on each of its states and train on those that pass the pre-screen, with "
      "reward 0 (rejection-sampling fine-tuning, not in the paper); 0 = off")
    g("--w4s-args", default="", help="extra w4s.py flags for collection and the unseen-task runs, e.g. '--executor "
      "... --iterations 2 --val-size 8'")
    g("--screen", default=None, metavar="FILE", help="instead of training: sample --screen-k actions with --init on "
      "every state logged in --data, pre-screen them (no executor call), write them to FILE and their pass rate to "
      "FILE's .summary.json")
    return p.parse_args(argv)

def die(msg):
    raise SystemExit(f"rlao: error: {msg}")

# ----------------------------------------------------------------------------------------------------------- data
def load_examples(paths, invalid_reward=None):
    """One example per kept action (evaluated above 0.05 validation accuracy, or a warm-up pre-screen pass): state
    messages -> action text, reward, group = (run, iteration). Any other action (a copy, no workflow, broken, or
    discarded at <= 0.05) is left out, or kept with `invalid_reward` when one is given."""
    examples = []
    for f, n, rec in trajectory_rows(paths):
        if not rec.get("action") or not rec.get("messages"):
            continue  # nothing to learn from (the meta-agent produced no reply)
        kept = is_kept(rec)
        if not kept and invalid_reward is None:
            continue
        run = str(rec.get("run", f))
        reward = float(rec["reward"]) if kept else invalid_reward
        examples.append(dict(messages=rec["messages"], action=rec["action"], reward=reward, task=rec.get("task"),
                             run=run, group=(run, rec.get("iteration", f"line{n}"))))
    return examples


def is_kept(rec):
    """An action with a reward to learn from: a workflow kept after evaluation, or a warm-up pre-screen pass."""
    return isinstance(rec.get("reward"), (int, float)) and (rec.get("status") == "ok" or rec.get("warmup_pass", False))


def trajectory_rows(paths):
    """(file, line number, row) of every trajectory.jsonl under these run dirs / files."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("trajectory.jsonl"))
            if not found:
                die(f"no trajectory.jsonl under {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            die(f"no such file or directory: {p}")
    for f in files:
        for n, line in enumerate(open(f, encoding="utf-8"), 1):
            if not line.strip():
                continue
            try:
                yield f, n, json.loads(line)
            except json.JSONDecodeError as e:
                die(f"{f}:{n}: not a JSON line ({e.msg})")

def group_advantages(examples, use_std=False):
    """A_i = r_i - mean(r of the m samples of i's turn) [/ std]; computed before any --keep filtering."""
    groups = defaultdict(list)
    for e in examples:
        groups[e["group"]].append(e)
    for g in groups.values():
        r = torch.tensor([e["reward"] for e in g], dtype=torch.float64)
        adv = r - r.mean()
        if use_std and len(g) > 1:
            adv = adv / (r.std(unbiased=False) + 1e-6)
        for e, a in zip(g, adv.tolist()):
            e["advantage"] = a

def keep_examples(examples, keep):
    if keep == "positive":
        return [e for e in examples if e["reward"] > 0]
    if keep == "best":
        best = {}
        for e in examples:
            if e["group"] not in best or e["reward"] > best[e["group"]]["reward"]:
                best[e["group"]] = e
        return list(best.values())
    return examples

def task_shares(tasks):
    """Per-task weighting of mixed data: each task's examples carry an equal share of the loss, whatever its count
    (a task whose runs produced many actions must not drown out the others): factor N / (T * N_task)."""
    counts = Counter(tasks)
    return {t: len(tasks) / (len(counts) * n) for t, n in counts.items()}

def split_by_run(examples, val_frac, seed):
    """Hold out whole runs, so validation states never share an archive with training states."""
    runs = sorted({e["run"] for e in examples})
    random.Random(seed).shuffle(runs)
    n_val = min(len(runs) - 1, max(1, round(val_frac * len(runs)))) if val_frac > 0 else 0
    val = set(runs[:n_val])
    return [e for e in examples if e["run"] not in val], [e for e in examples if e["run"] in val]

def encode(tok, ex, max_len):
    """Prompt = the model's chat template over the state; target = the action text + eos. None if too long."""
    prompt = tok.apply_chat_template(ex["messages"], add_generation_prompt=True, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = p_ids + tok(ex["action"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if len(ids) > max_len:
        return None
    return dict(ids=ids, n_prompt=len(p_ids), reward=ex["reward"], advantage=ex.get("advantage", 0.0),
                task=ex.get("task"))

def make_batches(data, batch_size, seed):
    """Micro-batches of up to batch_size actions of one state (they share its prompt: see pack()), in random order."""
    by_state = defaultdict(list)
    for i, x in enumerate(data):
        by_state[tuple(x["ids"][:x["n_prompt"]])].append(i)
    batches = [idx[j:j + batch_size] for idx in by_state.values() for j in range(0, len(idx), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches

def pack(items, device):
    """One micro-batch as one sequence: the state's prompt once, then each action, [s, a_1, ..., a_k]. An action
    attends to the prompt and to its own earlier tokens only, at the positions it has alone, so its log-probs and
    their gradients (which reach the prompt through attention) are exactly those of the unshared computation, while
    the prompt, most of a W4S state, is encoded once instead of k times. Returns the model's inputs and, per action
    token: the position whose hidden state predicts it, its id, and its (action, index) in the output."""
    n_prompt = items[0]["n_prompt"]
    ids, pos, owner = list(items[0]["ids"][:n_prompt]), list(range(n_prompt)), [-1] * n_prompt
    pred, target, row, col = [], [], [], []
    for b, x in enumerate(items):
        action, start = x["ids"][n_prompt:], len(ids)
        pred += [n_prompt - 1] + list(range(start, start + len(action) - 1))
        target += action
        row += [b] * len(action)
        col += range(len(action))
        ids += action
        pos += range(n_prompt, n_prompt + len(action))
        owner += [b] * len(action)
    o = torch.tensor(owner)
    attend = torch.ones(len(ids), len(ids), dtype=torch.bool).tril() & ((o == -1)[None, :] | (o[None, :] == o[:, None]))
    t = lambda v: torch.tensor(v, device=device)
    return dict(ids=t([ids]), pos=t([pos]), attend=attend[None, None].to(device), pred=t(pred), target=t(target),
                row=t(row), col=t(col), n=len(items))

# ----------------------------------------------------------------------------------------------------------- loss
def rwr_weights(rewards, tau):
    """w_i = exp(r_i/tau), normalised to mean 1 over the whole training set. (Normalising inside each batch would
    turn a batch of equal rewards -- common, since a batch holds the actions of one state -- into plain fine-tuning.)"""
    return torch.softmax(torch.tensor(rewards, dtype=torch.float64) / tau, 0) * len(rewards)

def rlao_loss(logp, mask, c, n, ref_logp=None, beta=0.0):
    """The RLAO loss of one micro-batch, as its share of an optimiser step over n examples (all micro-batches, all
    processes), so micro-batch losses simply add up. logp[b,t] = log pi_theta(y_bt | s_b, y_b<t); mask[b,t] = 1 on
    the action tokens (the reply + eos), 0 past the end of a shorter action. With
    l_b = mean over b's action tokens of logp (a length-normalised log pi(a_b | s_b)):

        L = (1/n) sum_b [ -c_b l_b + beta KL_b ],   KL_b = mean_t (e^d - d - 1), d = logp_ref - logp  (k3 estimator)
        rwr (paper): c_b = w_b = exp(r_b/tau) / mean_j exp(r_j/tau)
        pg:          c_b = A_b = r_b - mean(r of b's turn) [/ std of them]
    """
    n_tok = mask.sum(1).clamp(min=1)
    loss = -(c * (logp * mask).sum(1) / n_tok).sum()
    if beta > 0 and ref_logp is not None:
        d = ref_logp - logp
        loss = loss + beta * (((d.exp() - d - 1) * mask).sum(1) / n_tok).sum()
    return loss / n

class ActionLogProbs(nn.Module):
    """log pi(token) at action positions only, over pack()'s sequence of one state's prompt and its actions, so the
    prompt is encoded once for all of them. The vocabulary projection skips the prompt (most of a W4S state) and
    runs on CHUNK action tokens at a time under checkpointing, so no (action tokens x vocabulary) fp32 logits tensor
    (0.6 GB per 1k tokens over Qwen's 152k vocabulary; 0.16 GB per chunk), nor its log-softmax, is kept for backward.
    Assumes logits = lm_head(last hidden state)."""
    CHUNK = 256

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, batch):
        """batch: pack()'s. Returns logp[b, t] of action b's token t and a mask of the tokens that exist."""
        h = self.lm.base_model(input_ids=batch["ids"], position_ids=batch["pos"], use_cache=False,
                               attention_mask=attention_bias(batch["attend"], self.lm)).last_hidden_state[0]
        hp, targets = h[batch["pred"]], batch["target"]
        head = self.lm.get_output_embeddings()
        token_logp = lambda x, y: -F.cross_entropy(head(x).float(), y, reduction="none")
        parts = [torch.utils.checkpoint.checkpoint(token_logp, hp[i:i + self.CHUNK], targets[i:i + self.CHUNK],
                                                   use_reentrant=False) for i in range(0, len(hp), self.CHUNK)]
        shape = (batch["n"], int(batch["col"].max()) + 1)
        logp, mask = h.new_zeros(shape, dtype=torch.float32), h.new_zeros(shape, dtype=torch.float32)
        logp[batch["row"], batch["col"]] = torch.cat(parts)
        mask[batch["row"], batch["col"]] = 1.0
        return logp, mask

def attention_bias(attend, lm):
    """pack()'s mask as the model's attention takes it: SDPA a boolean one, eager attention an additive one."""
    if lm.config._attn_implementation == "sdpa":
        return attend
    dtype = next(lm.parameters()).dtype
    return torch.zeros(attend.shape, dtype=dtype, device=attend.device).masked_fill(~attend, torch.finfo(dtype).min)

# ----------------------------------------------------------------------------------------------------------- LoRA
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

class LoRALinear(nn.Module):
    """y = W x + (alpha/r) B A x with W frozen; B starts at 0, so training starts from the base model."""

    def __init__(self, base: nn.Linear, r, alpha):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / r, True
        self.A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x):
        y = self.base(x)
        return y + self.scale * F.linear(F.linear(x, self.A), self.B) if self.enabled else y

    def merged_weight(self):
        return self.base.weight + self.scale * (self.B @ self.A).to(self.base.weight.dtype)

def add_lora(model, r, alpha):
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name in LORA_TARGETS:
                setattr(module, name, LoRALinear(child, r, alpha))

def freeze_untied_input_embedding(model):
    """An untied input embedding (the 0.5B's: 136M of its 630M weights) is not trained: an action touches a few
    thousand of its 152k rows, and full fine-tuning would keep 1.9 GB of fp32 master weight, AdamW moments and gradient
    for it. The output embedding (lm_head) is trained; a tied one is trained as that."""
    emb = model.get_input_embeddings().weight
    if emb is not model.get_output_embeddings().weight:
        emb.requires_grad_(False)

def merged_state_dict(model):
    """The plain model's state dict: every adapter folded into its weight, W <- W + (alpha/r) B A."""
    sd = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            for k in ("base.weight", "A", "B"):
                sd.pop(f"{name}.{k}")
            sd[f"{name}.weight"] = m.merged_weight()
            if m.base.bias is not None:
                sd[f"{name}.bias"] = sd.pop(f"{name}.base.bias")
    return sd

@contextlib.contextmanager
def adapters_off(model):
    """With LoRA the frozen base model IS the initial policy: the KL reference costs no extra memory."""
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in loras:
        m.enabled = False
    try:
        yield
    finally:
        for m in loras:
            m.enabled = True

# ------------------------------------------------------------------------------------------------- model and I/O
def load_policy(spec, dtype=torch.float32):
    """Same model specs as w4s.py, loaded straight in the dtype training computes in: an fp32 load cast to bf16
    afterwards left the 0.5B's peak RSS 1.6-2.2 GiB higher (the freed fp32 copy stays in the process's heap)."""
    try:
        import llm
        return llm.load_local_model(spec, dtype=dtype)
    except ImportError as e:  # llm.py missing or half-installed: plain transformers still reads an hf: dir
        if not spec.startswith("hf:"):
            die(f"--init {spec} needs llm.py ({e})")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(spec[3:], dtype=dtype), AutoTokenizer.from_pretrained(spec[3:])

def save_checkpoint(model, tok, out, dtype=torch.bfloat16, state_dict=None):
    """HF-format dir: config.json, tokenizer files, model.safetensors (LoRA merged, stored in bf16). --fsdp passes
    the gathered full state dict: the same format."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in (state_dict or merged_state_dict(model)).items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # safetensors refuses shared tensors; from_pretrained re-ties it
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model is already dense
        del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(out)
    tok.save_pretrained(out)

def step_one_at_a_time(opt, master, params, grad_clip):
    """The optimiser step over fp32 master weights, one parameter at a time: its fp32 gradient exists only while
    AdamW steps it (all of them at once were 2.5 GB of the 0.5B's 14 GB peak), then the bf16 weight takes the new
    value. The same update as clipping all master gradients and one opt.step(): AdamW treats parameters apart."""
    norm = torch.stack([p.grad.float().norm() for p in params if p.grad is not None]).norm()
    coef = min(1.0, grad_clip / (norm.item() + 1e-6)) if grad_clip > 0 else 1.0  # as clip_grad_norm_
    for m, p in zip(master, params):
        if p.grad is None:
            continue
        m.grad, p.grad = p.grad.float().mul_(coef), None
        opt.step()  # steps only the parameters that have a gradient: this one
        m.grad = None
        p.data.copy_(m)

def shard(policy, model, bf16):
    """FSDP2: each decoder layer is its own unit (its weights are gathered just before use and freed after), the
    rest (embeddings, final norm, head) is the root's; bf16 compute, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for layer in model.base_model.layers:
        fully_shard(layer, mp_policy=mp)
    return fully_shard(policy, mp_policy=mp)

def full_tensor(t):
    """The whole tensor on CPU: an FSDP2 shard (DTensor) is gathered from every rank (a collective), else as is."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()

def setup_distributed():
    """Under torchrun: one process per GPU (nccl) or per CPU slot (gloo). Returns rank, world size, device."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=3))  # rank 0 may collect for long
    rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return rank, world, torch.device(f"cuda:{local}" if cuda else "cpu")

def peak_rss_gib():
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)

def use_bf16(precision, device):
    if precision != "auto":
        return precision == "bf16"
    import llm
    return device.type == "cuda" or llm.cpu_has_bf16()

# ------------------------------------------------------------------------------------------------------ training
@dataclasses.dataclass
class Policy:
    """pi_theta as the training loop holds it: the model (+ LoRA), the module that gives action log-probs (`policy`,
    wrapped for DDP / FSDP2 in `ddp`), the frozen initial copy pi_ref for a full fine-tune's KL penalty, and the
    trainable parameters with their fp32 master copies (`master` is `params` itself without separate copies)."""
    model: nn.Module
    tok: object
    policy: nn.Module
    ddp: nn.Module
    ref: nn.Module | None
    named: list  # (name, parameter) of the trainable ones
    params: list
    master: list
    copies: bool  # bf16 weights stepped through fp32 master copies (step_one_at_a_time)
    bf16: bool

def load_data(args):
    """Step 1: logged actions -> (state, action, reward, advantage), filtered by --keep, split by run."""
    if not args.data:
        die("no --data given (w4s run dirs or trajectory.jsonl files)")
    if args.invalid_reward is not None and args.objective != "pg":
        die("--invalid-reward needs --objective pg (rwr weights are positive: it cannot push a probability down)")
    examples = load_examples(args.data, args.invalid_reward)
    group_advantages(examples, args.pg_std)
    kept = keep_examples(examples, args.keep)
    if not kept:
        die(f"no examples left after filtering ({len(examples)} kept actions loaded, --keep {args.keep}); "
            "actions that were not kept (copies, no workflow, broken, discarded) are left out unless "
            "--objective pg --invalid-reward R")
    return examples, kept, *split_by_run(kept, args.val_frac, args.seed)

def build_policy(args, world, device):
    """Step 2: the policy pi_theta (+ LoRA), its frozen initial copy pi_ref for the KL penalty, master weights."""
    bf16 = use_bf16(args.precision, device)
    # FSDP2 keeps the fp32 weights sharded (they are the master weights) and computes in bf16 (MixedPrecisionPolicy)
    dtype = torch.bfloat16 if bf16 and not args.fsdp else torch.float32
    model, tok = load_policy(args.init, dtype)
    if args.lora_r:
        add_lora(model, args.lora_r, args.lora_alpha)
    freeze_untied_input_embedding(model)
    if args.grad_ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.fsdp and (args.lora_r or not dist.is_initialized()):
        die("--fsdp runs under torchrun (even --nproc_per_node 1) and trains all weights (no --lora-r)")
    model.to(device, dtype).train()  # LoRA adapters are made in fp32: they take the compute dtype here
    ref = copy.deepcopy(model).eval().requires_grad_(False) if args.kl > 0 and not args.lora_r else None
    policy = ActionLogProbs(model)
    ddp = shard(policy, model, bf16) if args.fsdp else nn.parallel.DistributedDataParallel(
        policy, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else policy
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # bf16: the optimiser steps fp32 master copies (a bf16 weight would round most small updates away); on these
    # CPUs pure bf16 trains several times faster than fp32 or autocast over fp32
    copies = bf16 and not args.fsdp
    master = [p.detach().float().clone() for p in params] if copies else params
    return Policy(model, tok, policy, ddp, ref, named, params, master, copies, bf16)

def encode_all(args, tok, train_ex, val_ex):
    """Step 3: tokenise with the chat template; each training example's loss coefficient c (the rwr weight or the pg
    advantage, times its task's share)."""
    enc = lambda exs: [x for x in (encode(tok, e, args.max_len) for e in exs) if x is not None]
    data, val = enc(train_ex), enc(val_ex)
    if not data:
        die(f"no training examples left (all {len(train_ex)} longer than --max-len {args.max_len}?)")
    rewards, advantages = [x["reward"] for x in data], [x["advantage"] for x in data]
    c = rwr_weights(rewards, args.tau) if args.objective == "rwr" else advantages
    share = task_shares([x["task"] for x in data])
    for x, ci in zip(data, c):
        x["c"] = float(ci) * share[x["task"]]
    return data, val

def lr_at(args, step):
    """Linear warmup, then cosine down to min_lr_frac * lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))

def micro_batches(args, data):
    """The same endless stream of micro-batches on every process; each takes its own share per step."""
    epoch = 0
    while True:
        yield from make_batches(data, args.batch_size, args.seed + epoch)
        epoch += 1

def restore(args, p, opt, state, state_file, log):
    """--resume: the trainable weights and the optimiser state as saved; returns the step to continue from."""
    if not state:
        return 0
    if state["optimizer"] is None:
        die(f"{state_file} is from an --fsdp run stopped mid-way: resuming one is not supported (start anew)")
    for m, w, v in zip(p.master, p.params, state["trainable"].values()):
        m.data.copy_(v)
        w.data.copy_(v)
    opt.load_state_dict(state["optimizer"])
    log(f"rlao: resumed from {state_file} at step {state['step']}")
    return state["step"]

def accumulate(args, p, data, mbs, rank, world, device):
    """One optimiser step's forward and backward passes: this process's share of the step's micro-batches, each
    loss scaled as its share of the step (rlao_loss). Returns (this process's summed loss, action tokens trained)."""
    n = sum(len(b) for b in mbs)
    step_loss, n_tok = torch.zeros((), device=device), 0
    mine = list(range(rank, len(mbs), world))
    for k, j in enumerate(mine):
        batch = pack([data[i] for i in mbs[j]], device)
        c = torch.tensor([data[i]["c"] for i in mbs[j]], device=device)
        last_mb = k == len(mine) - 1
        if args.fsdp:  # reduce-scatter the gradients once per step, on the last micro-batch
            p.ddp.set_requires_gradient_sync(last_mb)
        sync = p.ddp.no_sync() if world > 1 and not args.fsdp and not last_mb else contextlib.nullcontext()
        with sync:
            logp, mask = p.ddp(batch)
            ref_logp = None
            if args.kl > 0:
                with torch.no_grad(), (adapters_off(p.model) if args.lora_r else contextlib.nullcontext()):
                    ref_logp = (ActionLogProbs(p.ref) if p.ref is not None else p.policy)(batch)[0]
            loss = rlao_loss(logp, mask, c, n, ref_logp, args.kl)
            (loss * world).backward()  # DDP averages gradients over processes; the step's loss is their sum
        step_loss += loss.detach()
        n_tok += len(batch["target"])
    return step_loss, n_tok

def optimizer_step(args, p, opt):
    if p.copies:
        step_one_at_a_time(opt, p.master, p.params, args.grad_clip)
        return
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(p.master, args.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)

@torch.no_grad()
def val_nll(args, p, val, rank, world, device):
    """Mean NLL per action token on the held-out runs, sharded over processes."""
    if not val:
        return None
    tot = torch.zeros(2, device=device)
    for b in make_batches(val, args.batch_size, 0)[rank::world]:
        logp, mask = p.policy(pack([val[i] for i in b], device))
        tot += torch.stack([-(logp * mask).sum(), mask.sum()])
    if world > 1:
        dist.all_reduce(tot)
    return (tot[0] / tot[1].clamp(min=1)).item()

def save(args, p, opt, step, out, state_file, rank, world):
    """The HF checkpoint and train_state.pt (step, optimiser, trainable weights); under FSDP2 every rank gathers."""
    full = {k: full_tensor(v) for k, v in p.model.state_dict().items()} if args.fsdp else None
    if rank == 0:
        save_checkpoint(p.model, p.tok, out, state_dict=full)
        torch.save(dict(step=step, optimizer=None if args.fsdp else opt.state_dict(), args=vars(args),
                        trainable={k: full[k] if full else m.detach().cpu() for (k, _), m in zip(p.named, p.master)}),
                   state_file)
    if world > 1:
        dist.barrier()

def train(args, rank=0, world=1, device=torch.device("cpu")):
    """RLAO training, steps 1-5: data, policy, tokens, optimiser, the loop. A step = M = grad_accum * world
    micro-batches; its loss is the mean over all their examples."""
    log = (lambda *m: print(*m, flush=True)) if rank == 0 else (lambda *m: None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "train_state.pt"
    state = torch.load(state_file, map_location="cpu") if args.resume and state_file.exists() else None
    if state and state["step"] >= args.steps:
        log(f"rlao: {out} already trained for {state['step']} steps")
        return
    torch.manual_seed(args.seed)
    examples, kept, train_ex, val_ex = load_data(args)
    p = build_policy(args, world, device)
    data, val = encode_all(args, p.tok, train_ex, val_ex)
    lengths = [len(x["ids"]) for x in data]
    packed = sum(len(data[b[0]]["ids"]) + sum(len(data[i]["ids"]) - data[i]["n_prompt"] for i in b[1:])
                 for b in make_batches(data, args.batch_size, args.seed))
    log(f"rlao: {len(data)} train / {len(val)} val examples ({len(examples)} loaded, {len(kept)} kept by --keep "
        f"{args.keep}, {len(train_ex) + len(val_ex) - len(data) - len(val)} too long); mean length "
        f"{sum(lengths) / len(lengths):.0f} tokens; a state's prompt shared by its actions: {packed} tokens "
        f"encoded instead of {sum(lengths)}; "
        f"{sum(w.numel() for w in p.params) / 1e6:.2f}M trainable params; {'bf16' if p.bf16 else 'fp32'} on {device}, "
        f"{world} process(es){', FSDP2' if args.fsdp else ''}")
    # step 4: FSDP2 is for models that barely fit: foreach AdamW's temporaries (a copy of the update of every shard at
    # once) put the 7B over one H200's 140 GiB
    opt = torch.optim.AdamW(p.master, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95),
                            foreach=False if args.fsdp else None)
    start = restore(args, p, opt, state, state_file, log)
    from tqdm import tqdm
    M, stream = args.grad_accum * world, micro_batches(args, data)
    for _ in range(start * M):
        next(stream)
    logf = open(out / "log.jsonl", "a") if rank == 0 else None
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0, desc="rlao")
    for step in bar:  # step 5: the loop
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(args, step)
        step_loss, n_tok = accumulate(args, p, data, [next(stream) for _ in range(M)], rank, world, device)
        optimizer_step(args, p, opt)
        if world > 1:
            dist.all_reduce(step_loss)
        tok_s = n_tok * world / (time.time() - t0)  # this step's action tokens, all processes
        rec = dict(step=step + 1, loss=step_loss.item(), lr=lr_at(args, step), action_tok_s=round(tok_s, 1),
                   peak_rss_gib=peak_rss_gib())
        if device.type == "cuda":
            rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        last = step + 1 == args.steps
        if (args.eval_every and (step + 1) % args.eval_every == 0) or last:
            rec["val_nll"] = val_nll(args, p, val, rank, world, device)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{rec['lr']:.2e}",
                        rss=f"{rec['peak_rss_gib']}G")
        if logf:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            if rec.get("val_nll") is not None:
                bar.write(f"step {step + 1}: loss {rec['loss']:.4f}, val NLL/token {rec['val_nll']:.4f}")
        if (args.save_every and (step + 1) % args.save_every == 0) or last:
            save(args, p, opt, step + 1, out, state_file, rank, world)
    if world > 1:  # a cheap guard against silent desynchronisation
        digest = hashlib.sha256(b"".join(full_tensor(w).numpy().tobytes() for w in p.params)).hexdigest()[:16]
        digests = [None] * world
        dist.all_gather_object(digests, digest)
        log(f"rlao: ranks agree on weights: {len(set(digests)) == 1} ({digest})")
    log(f"rlao: saved {out} (use --meta-agent hf:{out}); peak RSS of this process {peak_rss_gib()} GiB"
        + (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
           if device.type == "cuda" else ""))

# ================================================================================================================
# The experiment harness (not the trainer): the free pre-screen pass rate (--screen) and the seen -> unseen rounds
# -------------------------------------------------------------------------------- the free pre-screen (no executor)
def load_states(paths):
    """The distinct meta-agent states logged in these w4s runs, each with what w4s.prescreen needs: the workflows the
    state shows (a reply that nearly copies one of them, or a seed, is a near-copy) and the run's dry-run question
    (as w4s.py draws it)."""
    import benchmarks, w4s
    states, examples = {}, {}
    for f, _, rec in trajectory_rows(paths):
        key = json.dumps(rec.get("messages"))
        if not rec.get("messages") or key in states:
            continue
        if f not in examples:
            examples[f] = dry_run_example(f.parent / "config.json")
        shown = [b for m in rec["messages"] for b in benchmarks.code_blocks(m["content"])]
        known = [dict(name="a seed", code=c) for c in w4s.SEED_WORKFLOWS.values()] + \
                [dict(name="a workflow the state shows", code=c) for c in shown]
        states[key] = dict(messages=rec["messages"], task=rec.get("task"), known=known, example=examples[f])
    return list(states.values())

def dry_run_example(config_file):
    """The dry runs' question of the w4s run that wrote config_file, as w4s.py drew it."""
    import benchmarks, w4s
    cfg = json.loads(config_file.read_text())
    val = benchmarks.get_task(cfg["task"], cfg.get("scorer"), cfg.get("description")).load("val")
    return w4s.dry_run_example(val, cfg["seed"], cfg["val_size"])
def sample_and_screen(spec, states, k, max_tokens):
    """K sampled actions on each state (temperature 0.7, sample seeds 0..K-1, through w4s's LLM class: any meta-agent
    spec, cached), each pre-screened against the state's workflows only (not against its sibling samples, so each
    action's status is its own). Returns one row per action in trajectory.jsonl's shape, status None if it passed."""
    import llm, w4s
    meta = llm.LLM(spec, "meta_agent", llm.Ledger(), llm.Cache(os.path.join(llm.cache_root(), "calls.sqlite")))

    def one(job):
        s, j = job
        reply = meta.chat(s["messages"], temperature=0.7, max_tokens=max_tokens, sample=j, stop=w4s.META_STOP)
        code, status, reason = w4s.prescreen(reply, s["known"], s["example"], timeout=10)
        return dict(task=s["task"], messages=s["messages"], action=reply, sample=j, status=status, reason=reason,
                    reward=0.0, warmup_pass=status is None)

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(32) as pool:  # a local model batches them (llm.LocalEngine): one prefill per state
        return list(pool.map(one, [(s, j) for s in states for j in range(k)]))

def wilson(passed, n, z=1.96):
    """95% Wilson score interval of a pass rate (treats the K samples of a state as independent)."""
    if n == 0:
        return 0.0, 1.0
    p, d = passed / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)

def screen_summary(rows):
    passed = sum(r["status"] is None for r in rows)
    lo, hi = wilson(passed, len(rows))
    return dict(pass_rate=passed / max(1, len(rows)), ci=[round(lo, 4), round(hi, 4)], passed=passed, n=len(rows),
                states=len({json.dumps(r["messages"]) for r in rows}),
                status=dict(sorted(Counter(r["status"] or "passed" for r in rows).items())))

def run_screen(args):
    """--screen FILE: sample --screen-k actions on every state logged in --data, pre-screen them, write the rows."""
    states = load_states(args.data)
    if not states:
        die(f"no meta-agent states in {args.data}")
    t0 = time.time()
    rows = sample_and_screen(args.init, states, args.screen_k, args.meta_max_tokens)
    summary = dict(screen_summary(rows), seconds=round(time.time() - t0, 1), peak_rss_gib=peak_rss_gib())
    with open(args.screen, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(dict(r, run=f"screen:{args.init}", iteration=f"state{i // args.screen_k}")) + "\n"
                     for i, r in enumerate(rows))
    Path(args.screen).with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
    print(f"rlao: pre-screen pass rate of {args.init}: {summary['passed']}/{summary['n']} = {summary['pass_rate']:.3f} "
          f"[{summary['ci'][0]:.3f}, {summary['ci'][1]:.3f}] over {summary['states']} states x {args.screen_k}; "
          f"{summary['status']}; {summary['seconds']:.0f} s, peak RSS {summary['peak_rss_gib']} GiB", flush=True)
    return summary

# ----------------------------------------------------------------------------------------- seen -> unseen rounds
def run_rounds(args, rank, world, device):
    """--rounds R, the seen -> unseen experiment. Each policy pi_0 (= --init), ..., pi_R is first measured on the
    unseen --eval-task (never trained on); then, for k < R: collect with pi_k on every seen task (w4s.py, validation
    data only) -> [warm-up: sample and pre-screen where no action was evaluated] -> train pi_{k+1} on everything so far.
    Every model runs in a process of its own (w4s.py, rlao.py --screen), so it leaves memory before training."""
    tasks = [t for t in (args.tasks or "").split(",") if t]
    if not tasks or not args.eval_task:
        die("--rounds needs --tasks (seen tasks, comma-separated) and --eval-task (the unseen task)")
    if args.eval_task in tasks:
        die(f"--eval-task {args.eval_task} is also in --tasks: the unseen task must never be trained on")
    out, policy, data, history = Path(args.out), args.init, list(args.data), []
    for k in range(args.rounds + 1):
        rec, rdir = dict(round=k, policy=policy), out / f"round{k}"
        if rank == 0:
            rec["eval"] = measure(args, policy, rdir, fixed_states=[*args.eval_states, out / "round0" / "eval"])
        if k < args.rounds:
            rec["collect"], warm = {}, []
            for task in tasks:  # collection: w4s.py on validation data only (--test-size 0)
                coll = rdir / "collect" / task_dirname(task)
                if rank == 0:
                    t0 = time.time()
                    w4s_run(args, task, policy, coll, [])
                    rows = [r for _, _, r in trajectory_rows([coll])]
                    evaluated = [r["reward"] for r in rows if is_kept(r)]
                    rec["collect"][task] = dict(actions=len(rows), evaluated=len(evaluated),
                                                seconds=round(time.time() - t0),
                                                mean_reward=sum(evaluated) / len(evaluated) if evaluated else None)
                    if not evaluated and args.warmup_k:  # the paper's reward is missing: the pre-screen stands in
                        warm.append(coll)
                data.append(str(coll))
            if warm:  # one process samples on every such task's states
                t0 = time.time()
                rec["warmup"] = screen(args, policy, warm, rdir / "warmup" / "trajectory.jsonl", args.warmup_k)
                rec["warmup"]["seconds"] = round(time.time() - t0)
            if world > 1:
                dist.broadcast_object_list(box := [bool(warm)], 0)
                warm = box[0]
            if warm:
                data.append(str(rdir / "warmup"))
            ckpt, t0 = rdir / "policy", time.time()
            if keep_examples(load_examples(data, args.invalid_reward), args.keep):
                train(argparse.Namespace(**{**vars(args), "data": data, "init": policy, "out": str(ckpt),
                                            "resume": True}), rank, world, device)
                rec["train"] = dict(seconds=round(time.time() - t0), peak_rss_gib=peak_rss_gib())
                policy = f"hf:{ckpt}"
            else:  # nothing evaluated, nothing passed the pre-screen: the next round starts from the same policy
                rec["train"] = dict(skipped="no action was evaluated or passed the pre-screen")
        history.append(rec)
        if rank == 0:
            (out / "rounds.json").write_text(json.dumps(history, indent=1))
            print_rounds(history)

def measure(args, policy, rdir, fixed_states):
    """The two figures of a policy on the unseen task: a short W4S run (mean reward and best validation gain of its
    evaluated candidates; fixed seeds, same executor and budget each round) and the pre-screen pass rate over
    --screen-k sampled actions on each of a fixed set of states (--eval-states plus those of round 0's W4S run,
    whose first is the seed archive state of the unseen task)."""
    res = {}
    if args.eval_iterations:
        t0 = time.time()
        w4s_run(args, args.eval_task, policy, rdir / "eval", ["--iterations", str(args.eval_iterations)])
        rows = [r for _, _, r in trajectory_rows([rdir / "eval"])]
        rewards = [r["reward"] for r in rows if is_kept(r)]
        rep = json.loads((rdir / "eval" / "report.json").read_text())
        best_seed = max(s["val"] for s in rep["seeds"].values())
        res["w4s"] = dict(evaluated=len(rewards), actions=len(rows), seconds=round(time.time() - t0),
                          mean_reward=sum(rewards) / len(rewards) if rewards else None,
                          best_val_gain=rep["best"]["val"] - best_seed)
    states = [str(p) for p in fixed_states if Path(p).exists()]
    if not states:
        die("no states to measure the pre-screen pass rate on: give --eval-states (an earlier w4s run on "
            "--eval-task) or --eval-iterations > 0")
    t0 = time.time()
    res["screen"] = screen(args, policy, states, rdir / "screen.jsonl", args.screen_k)
    res["screen"]["seconds"] = round(time.time() - t0)
    return res

def task_dirname(task):
    return Path(task).stem if task.endswith(".jsonl") else task

def w4s_run(args, task, policy, out, extra):
    """w4s.py in a process of its own, never the test split; skipped when the run is already there (a rerun)."""
    if (out / "report.json").exists():
        return
    cmd = [sys.executable, str(Path(__file__).with_name("w4s.py")), *shlex.split(args.w4s_args), *extra,
           "--task", task, "--meta-agent", policy, "--test-size", "0", "--out", str(out)]
    if subprocess.run(cmd).returncode:
        die(f"w4s.py failed: {shlex.join(cmd)}")

def screen(args, policy, states, out, k):
    """rlao.py --screen in a process of its own: k actions on each state, pre-screened; returns the summary."""
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = out.with_suffix(".summary.json")
    if not summary.exists():
        cmd = [sys.executable, __file__, "--screen", str(out), "--init", policy, "--data", *map(str, states),
               "--screen-k", str(k), "--meta-max-tokens", str(args.meta_max_tokens)]
        if subprocess.run(cmd).returncode:
            die(f"pre-screen sampling failed: {shlex.join(cmd)}")
    return json.loads(summary.read_text())

def print_rounds(history):
    print("rlao: round | pre-screen pass rate [95% CI] (K x states) | unseen W4S: mean reward, best val gain | train",
          flush=True)
    for h in history:
        s, w = h["eval"]["screen"], h["eval"].get("w4s")
        fig2 = (f"{w['mean_reward'] if w['mean_reward'] is not None else float('nan'):.3f} over {w['evaluated']}, "
                f"{w['best_val_gain']:+.3f}") if w else "-"
        print(f"rlao: {h['round']:5d} | {s['pass_rate']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] ({s['n']}) | "
              f"{fig2} | "
              + train_cell(h.get("train", {})), flush=True)

def train_cell(t):
    """The training column of a round: its time and memory, or why it was skipped."""
    return f"{t['seconds']} s, peak RSS {t['peak_rss_gib']} GiB" if "seconds" in t else t.get("skipped", "-")

def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup_distributed()
    if device.type == "cpu" and world > 1:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        if args.screen:
            run_screen(args)
        elif args.rounds:
            run_rounds(args, rank, world, device)
        else:
            train(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0

if __name__ == "__main__":
    sys.exit(main())
