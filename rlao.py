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
  train on some tasks, then optimise with the        -> --rounds R --task T: collect (w4s.py, validation data only,
  trained meta-agent                                   --test-size 0) -> train -> collect ..., a checkpoint per round
The training loop is the usual one: the model's own chat template, length-sorted micro-batches, AdamW with warmup +
cosine, gradient accumulation and clipping, bf16 with fp32 master weights, optional gradient checkpointing, an
optional hand-written LoRA (merged into the weights on save), DDP under torchrun, resume from OUT/train_state.pt. The output dir is an HF
checkpoint (config, tokenizer, model.safetensors) that `python w4s.py --meta-agent hf:OUT` loads.

Deliberately left out: PPO-style importance ratios and clipping (each round trains once on data its own policy just
produced, so the data is close to on-policy), a value function, sequence packing (length sorting gets most of the
padding back, see the log line), FSDP/ZeRO (DDP replicates the model: fine up to ~1.5B on one 80 GB GPU), per-task
weighting of mixed data, and models whose logits are not a plain linear map of the last hidden state (soft-capping).
"""
import argparse, contextlib, copy, hashlib, json, math, os, random, shlex, subprocess, sys, time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

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
    a("--batch-size", type=int, default=4, help="sequences per micro-batch per process")
    a("--grad-accum", type=int, default=4, help="micro-batches per optimiser step per process")
    a("--lr", type=float, default=1e-5, help="peak learning rate (try ~2e-4 with --lora-r)")
    a("--warmup", type=int, default=10, help="linear warmup steps, then cosine decay")
    a("--min-lr-frac", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (0 = off)")
    a("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="bf16: bf16 weights and activations, "
      "fp32 master weights in the optimiser; auto: bf16 on CUDA and on CPUs with avx512_bf16/amx, else fp32")
    a("--grad-ckpt", action="store_true", help="gradient checkpointing: less memory, ~30%% more compute")
    a("--lora-r", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    a("--lora-alpha", type=float, default=16.0, help="LoRA scale alpha (update = alpha/r * B A)")
    a("--no-sort", action="store_true", help="random micro-batches instead of length-sorted ones (for comparison)")
    a("--eval-every", type=int, default=25, help="validation loss every N steps (0 = only at the end)")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0 = only at the end)")
    a("--resume", action="store_true", help="continue from OUT/train_state.pt if it exists")
    a("--seed", type=int, default=0, help="seed for the split and the batch order")
    a("--rounds", type=int, default=0, help="R > 0: collect -> train, R times, then a final collect (needs --task)")
    a("--task", default=None, help="--rounds: the w4s task to collect trajectories on (validation data only)")
    a("--w4s-args", default="", help="--rounds: extra w4s.py flags for collection, e.g. '--executor ... --iterations 5'")
    return p.parse_args(argv)

def die(msg):
    raise SystemExit(f"rlao: error: {msg}")

# ----------------------------------------------------------------------------------------------------------- data
def load_examples(paths, invalid_reward=None):
    """One example per evaluated action: state messages -> action text, reward, group = (run, iteration). An action
    that never reached evaluation is left out, or kept with `invalid_reward` when one is given."""
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
    examples = []
    for f in files:
        for n, line in enumerate(open(f, encoding="utf-8"), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                die(f"{f}:{n}: not a JSON line ({e.msg})")
            if not isinstance(rec.get("reward"), (int, float)) or not rec.get("action") or not rec.get("messages"):
                continue  # nothing to learn from (no reward, or the meta-agent produced no reply)
            evaluated = rec.get("val_accuracy") is not None
            if not evaluated and invalid_reward is None:
                continue
            run = str(rec.get("run", f))
            reward = float(rec["reward"]) if evaluated else invalid_reward
            examples.append(dict(messages=rec["messages"], action=rec["action"], reward=reward,
                                 run=run, group=(run, rec.get("iteration", f"line{n}"))))
    return examples

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
    return dict(ids=ids, n_prompt=len(p_ids), reward=ex["reward"], advantage=ex.get("advantage", 0.0))

def make_batches(lengths, batch_size, seed, sort=True):
    """Micro-batches of similar length (little compute goes to padding), visited in random order."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if sort:
        order.sort(key=lambda i: lengths[i])  # stable: equal lengths stay shuffled
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches

def padding_fraction(batches, lengths):
    real = sum(lengths[i] for b in batches for i in b)
    return 1 - real / max(1, sum(len(b) * max(lengths[i] for i in b) for b in batches))

def collate(items, pad_id, device):
    T = max(len(x["ids"]) for x in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), T), dtype=torch.long)
    is_action = torch.zeros((len(items), T), dtype=torch.bool)  # right padding: positions stay 0..L-1
    for b, x in enumerate(items):
        L = len(x["ids"])
        ids[b, :L], attn[b, :L], is_action[b, x["n_prompt"]:L] = torch.tensor(x["ids"]), 1, True
    return ids.to(device), attn.to(device), is_action.to(device)

# ----------------------------------------------------------------------------------------------------------- loss
def rwr_weights(rewards, tau):
    """w_i = exp(r_i/tau), normalised to mean 1 over the whole training set. (Normalising inside each batch would
    turn a batch of equal rewards -- common, since batches are length-sorted -- into plain fine-tuning.)"""
    return torch.softmax(torch.tensor(rewards, dtype=torch.float64) / tau, 0) * len(rewards)

def rlao_loss(logp, mask, c, n, ref_logp=None, beta=0.0):
    """The RLAO loss of one micro-batch, as its share of an optimiser step over n examples (all micro-batches, all
    processes), so micro-batch losses simply add up. logp[b,t] = log pi_theta(y_bt | s_b, y_b<t); mask[b,t] = 1 on
    the action tokens (the reply + eos), 0 on the prompt (the state s_b) and on padding. With
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
    """log pi(token) at action positions only. The vocabulary projection skips the prompt (most of a W4S state),
    which saves compute and the B x T x V logits tensor. Assumes logits = lm_head(last hidden state)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, attn, is_action):
        h = self.lm.base_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        pick = is_action[:, 1:]  # the hidden state at t-1 predicts token t
        logits = self.lm.get_output_embeddings()(h[:, :-1][pick]).float()
        logp = h.new_zeros(pick.shape, dtype=torch.float32)
        logp[pick] = -F.cross_entropy(logits, ids[:, 1:][pick], reduction="none")
        return logp, pick.float()

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
def load_policy(spec):
    """Same model specs as w4s.py, loaded in fp32 (train() casts to bf16 where that is faster)."""
    try:
        import llm
        return llm.load_local_model(spec, dtype=torch.float32)
    except ImportError as e:  # llm.py missing or half-installed: plain transformers still reads an hf: dir
        if not spec.startswith("hf:"):
            die(f"--init {spec} needs llm.py ({e})")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(spec[3:], dtype=torch.float32), AutoTokenizer.from_pretrained(spec[3:])

def save_checkpoint(model, tok, out, dtype=torch.bfloat16):
    """HF-format dir: config.json, tokenizer files, model.safetensors (LoRA merged, stored in bf16)."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in merged_state_dict(model).items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # safetensors refuses shared tensors; from_pretrained re-ties it
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model is already dense
        del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(out)
    tok.save_pretrained(out)

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

def use_bf16(precision, device):
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags

# ------------------------------------------------------------------------------------------------------ training
def train(args, rank=0, world=1, device=torch.device("cpu")):
    log = (lambda *m: print(*m, flush=True)) if rank == 0 else (lambda *m: None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "train_state.pt"
    state = torch.load(state_file, map_location="cpu") if args.resume and state_file.exists() else None
    if state and state["step"] >= args.steps:
        log(f"rlao: {out} already trained for {state['step']} steps")
        return
    torch.manual_seed(args.seed)

    # 1. data: logged actions -> (state, action, reward, advantage), filtered, split by run
    if not args.data:
        die("no --data given (w4s run dirs or trajectory.jsonl files)")
    if args.invalid_reward is not None and args.objective != "pg":
        die("--invalid-reward needs --objective pg (rwr weights are positive: it cannot push a probability down)")
    examples = load_examples(args.data, args.invalid_reward)
    group_advantages(examples, args.pg_std)
    kept = keep_examples(examples, args.keep)
    if not kept:
        die(f"no examples left after filtering ({len(examples)} evaluated actions loaded, --keep {args.keep}); "
            "actions that never reached evaluation (copies, no workflow, broken) are left out unless "
            "--objective pg --invalid-reward R")
    train_ex, val_ex = split_by_run(kept, args.val_frac, args.seed)

    # 2. the policy pi_theta (+ LoRA), its frozen initial copy pi_ref for the KL penalty
    model, tok = load_policy(args.init)
    if args.lora_r:
        add_lora(model, args.lora_r, args.lora_alpha)
    if args.grad_ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    bf16 = use_bf16(args.precision, device)
    model.to(device, torch.bfloat16 if bf16 else torch.float32).train()
    ref = copy.deepcopy(model).eval().requires_grad_(False) if args.kl > 0 and not args.lora_r else None
    trainable_named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable_named]
    # bf16: the optimiser steps fp32 master copies (a bf16 weight would round most small updates away); on these
    # CPUs pure bf16 trains several times faster than fp32 or autocast over fp32
    master = [p.detach().float().clone() for p in params] if bf16 else params
    policy = ActionLogProbs(model)
    ddp = nn.parallel.DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else policy

    # 3. tokenise with the chat template; length-sorted micro-batches
    enc = lambda exs: [x for x in (encode(tok, e, args.max_len) for e in exs) if x is not None]
    data, val = enc(train_ex), enc(val_ex)
    if not data:
        die(f"no training examples left (all {len(train_ex)} longer than --max-len {args.max_len}?)")
    lengths = [len(x["ids"]) for x in data]
    c = rwr_weights([x["reward"] for x in data], args.tau) if args.objective == "rwr" else [x["advantage"] for x in data]
    for x, ci in zip(data, c):
        x["c"] = float(ci)
    pads = [padding_fraction(make_batches(lengths, args.batch_size, args.seed, s), lengths) for s in (True, False)]
    log(f"rlao: {len(data)} train / {len(val)} val examples ({len(examples)} loaded, {len(kept)} kept by --keep "
        f"{args.keep}, {len(train_ex) + len(val_ex) - len(data) - len(val)} too long); mean length "
        f"{sum(lengths) / len(lengths):.0f} tokens; padding {pads[0]:.1%} length-sorted vs {pads[1]:.1%} random; "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable params; {'bf16' if bf16 else 'fp32'} on {device}, "
        f"{world} process(es)")

    # 4. optimiser; resume
    opt = torch.optim.AdamW(master, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    start = 0
    if state:
        for m, p, v in zip(master, params, state["trainable"].values()):
            m.data.copy_(v)
            p.data.copy_(v)
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        log(f"rlao: resumed from {state_file} at step {start}")

    def lr_at(step):  # linear warmup, then cosine down to min_lr_frac * lr
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))

    def micro_batches():  # the same endless stream on every process; each takes its own share per step
        epoch = 0
        while True:
            yield from make_batches(lengths, args.batch_size, args.seed + epoch, not args.no_sort)
            epoch += 1

    @torch.no_grad()
    def val_nll():  # mean NLL per action token on the held-out runs, sharded over processes
        if not val:
            return None
        tot = torch.zeros(2, device=device)
        vlen = [len(x["ids"]) for x in val]
        for b in make_batches(vlen, args.batch_size, 0)[rank::world]:
            logp, mask = policy(*collate([val[i] for i in b], tok.pad_token_id or 0, device))
            tot += torch.stack([-(logp * mask).sum(), mask.sum()])
        if world > 1:
            dist.all_reduce(tot)
        return (tot[0] / tot[1].clamp(min=1)).item()

    def save(step):
        if rank == 0:
            save_checkpoint(model, tok, out)
            torch.save(dict(step=step, optimizer=opt.state_dict(), args=vars(args),
                            trainable={k: m.detach().cpu() for (k, _), m in zip(trainable_named, master)}),
                       state_file)
        if world > 1:
            dist.barrier()

    # 5. the loop: a step = M = grad_accum * world micro-batches; its loss is the mean over all their examples
    from tqdm import tqdm
    M, stream, pad_id = args.grad_accum * world, micro_batches(), tok.pad_token_id or 0
    for _ in range(start * M):
        next(stream)
    logf = open(out / "log.jsonl", "a") if rank == 0 else None
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0, desc="rlao")
    for step in bar:
        t0, n_tok = time.time(), 0
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        mbs = [next(stream) for _ in range(M)]
        n = sum(len(b) for b in mbs)
        step_loss = torch.zeros((), device=device)
        mine = list(range(rank, M, world))
        for k, j in enumerate(mine):
            batch = collate([data[i] for i in mbs[j]], pad_id, device)
            c = torch.tensor([data[i]["c"] for i in mbs[j]], device=device)
            sync = ddp.no_sync() if world > 1 and k < len(mine) - 1 else contextlib.nullcontext()
            with sync:
                logp, mask = ddp(*batch)
                ref_logp = None
                if args.kl > 0:
                    with torch.no_grad(), (adapters_off(model) if args.lora_r else contextlib.nullcontext()):
                        ref_logp = (ActionLogProbs(ref) if ref is not None else policy)(*batch)[0]
                loss = rlao_loss(logp, mask, c, n, ref_logp, args.kl)
                (loss * world).backward()  # DDP averages gradients over processes; the step's loss is their sum
            step_loss += loss.detach()
            n_tok += int(batch[1].sum())
        if bf16:
            for m, p in zip(master, params):
                m.grad, p.grad = p.grad.float(), None
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(master, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if bf16:
            for m, p in zip(master, params):
                p.data.copy_(m)
        if world > 1:
            dist.all_reduce(step_loss)
        tok_s = n_tok * world / (time.time() - t0)  # this step's (prompt + action) tokens, all processes
        rec = dict(step=step + 1, loss=step_loss.item(), lr=lr_at(step), tok_s=round(tok_s, 1))
        if device.type == "cuda":
            rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        last = step + 1 == args.steps
        if (args.eval_every and (step + 1) % args.eval_every == 0) or last:
            rec["val_nll"] = val_nll()
        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{rec['lr']:.2e}")
        if logf:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            if "val_nll" in rec and rec["val_nll"] is not None:
                bar.write(f"step {step + 1}: loss {rec['loss']:.4f}, val NLL/token {rec['val_nll']:.4f}")
        if (args.save_every and (step + 1) % args.save_every == 0) or last:
            save(step + 1)
    if world > 1:  # a cheap guard against silent desynchronisation
        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in params)).hexdigest()[:16]
        digests = [None] * world
        dist.all_gather_object(digests, digest)
        log(f"rlao: ranks agree on weights: {len(set(digests)) == 1} ({digest})")
    log(f"rlao: saved {out} (use --meta-agent hf:{out})")

def run_rounds(args, rank, world, device):
    """--rounds R: collect with the current meta-agent -> train on everything collected so far -> collect again."""
    if not args.task:
        die("--rounds needs --task (the w4s task to collect trajectories on)")
    policy, data, history = args.init, list(args.data), []
    for k in range(args.rounds + 1):
        coll = Path(args.out) / f"round{k}" / "collect"
        if rank == 0 and not list(coll.rglob("trajectory.jsonl")):  # never the test split: --test-size 0
            # w4s.py in a process of its own: its models (executor and meta-agent) leave memory before training
            rc = subprocess.run([sys.executable, str(Path(__file__).with_name("w4s.py"))] + shlex.split(args.w4s_args)
                                + ["--task", args.task, "--meta-agent", policy, "--test-size", "0", "--out", str(coll)]
                                ).returncode
            if rc:
                die(f"w4s collection for round {k} failed (exit code {rc})")
        if world > 1:
            dist.barrier()
        rewards = [e["reward"] for e in load_examples([coll], invalid_reward=0.0)]  # every action, as logged
        history.append(dict(round=k, policy=policy, actions=len(rewards),
                            mean_reward=sum(rewards) / max(1, len(rewards))))
        if rank == 0:
            print(f"rlao: round {k}: {len(rewards)} actions by {policy}, mean reward "
                  f"{history[-1]['mean_reward']:.3f}", flush=True)
        if k == args.rounds:
            break
        data.append(str(coll))
        ckpt = Path(args.out) / f"round{k}" / "policy"
        train(argparse.Namespace(**{**vars(args), "data": data, "init": policy, "out": str(ckpt), "resume": True}),
              rank, world, device)
        policy = f"hf:{ckpt}"
    if rank == 0:
        (Path(args.out) / "rounds.json").write_text(json.dumps(history, indent=1))
        print("rlao: mean reward per round: " + ", ".join(f"{h['mean_reward']:.3f}" for h in history))

def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup_distributed()
    if device.type == "cpu" and world > 1:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        run_rounds(args, rank, world, device) if args.rounds else train(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0

if __name__ == "__main__":
    sys.exit(main())
