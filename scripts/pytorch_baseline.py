#!/usr/bin/env python3
"""PyTorch baseline for vibeoffload: the same float8 checkpoint, the same N, side by side.

What it measures, for each offloader and each N (GPU-resident layers; the LAST N layers stay
on the GPU as in the original fork, layers 0..L-N-1 are streamed from host memory each pass):
  * test-speed: one forward pass over 1 x prompt-len seeded ids (no KV cache, no LM head),
    1 warm-up then 5 timed passes, mean ms;
  * decode: prefill prompt-len tokens, then greedy generation of gen-tokens tokens with a KV
    cache (LM head on the last position, argmax); ms/token excludes the first token;
  * peak VRAM: torch.cuda.max_memory_allocated and the mem_get_info "used" delta (which also
    counts the caching allocator's reserve and the CUDA context growth);
  * bytes copied host->device during the timed decode and the GB/s this achieves, next to the
    pinned host->device bandwidth measured once at start (256 MB, 5 copies, CUDA events).

Why: vibeoffload claims its streaming beats what one gets in PyTorch. Two offloaders are compared:
  fork   - mirrors the fork's hook offloader: before each streamed layer every parameter gets a
           fresh GPU tensor copied from its own pinned CPU tensor, then torch.cuda.synchronize();
           the copies are dropped after the layer. No prefetch, no overlap.
  stream - a best-effort PyTorch streamer: each streamed layer packed into one pinned buffer,
           two GPU slots, a copy stream and events, the next streamed layer prefetched while the
           current one computes (also across token boundaries).
The math is the fork's resident path in bf16: weights stay float8 and every matmul upcasts its
weight (w.to(bfloat16)) before F.linear. Everything but the streamed layers (embeddings, final
norm, LM head, resident layers) lives on the GPU. Prompt ids come from the same xorshift
generator as `vibeoffload run` (seed 0 by default), so both tools see the same prompt.

--device cpu runs the same code without streams or pinning (offloaders become plain copies) to
check correctness: the final-norm hidden-state checksum must match across offloaders and N.
Only torch, numpy and the standard library are used; the safetensors header is parsed here.
"""
import argparse, gc, hashlib, json, mmap, os, struct, sys, time
import numpy as np
import torch
import torch.nn.functional as F

BF16, F8 = torch.bfloat16, torch.float8_e4m3fn
LM = "model.language_model."
LAYER_PARAMS = ["input_layernorm.weight", "post_attention_layernorm.weight"] + [
    f"self_attn.{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")] + [
    "self_attn.o_proj.weight"] + [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]


class Checkpoint:
    """Zero-copy safetensors reader: tensors are views over a private (copy-on-write) mmap."""
    def __init__(self, path):
        self.file = open(path, "rb")
        self.mm = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_COPY)
        (n,) = struct.unpack("<Q", self.mm[:8])
        self.header = json.loads(self.mm[8:8 + n])
        self.header.pop("__metadata__", None)
        self.base = 8 + n

    def get(self, name):
        meta = self.header[name]
        if meta["dtype"] != "F8_E4M3":
            raise SystemExit(f"{name}: dtype {meta['dtype']}, expected F8_E4M3")
        start, end = meta["data_offsets"]
        raw = torch.frombuffer(self.mm, dtype=torch.uint8, count=end - start,
                               offset=self.base + start)
        return raw.view(F8).view(meta["shape"])


def load_config(ckpt_path):
    with open(os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "config.json")) as f:
        c = json.load(f)["decoder_config"]
    c.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
    return c


def random_ids(n, seed, vocab):
    """The xorshift64 prompt of vibeoffload's run::random_ids (ids < min(1000, vocab))."""
    limit, state, mask, out = min(vocab, 1000), seed ^ 0x9E3779B97F4A7C15, (1 << 64) - 1, []
    for _ in range(n):
        state ^= (state << 13) & mask
        state ^= state >> 7
        state ^= (state << 17) & mask
        out.append(state % limit)
    return out


def upcast(w):
    return None if w is None else w.to(BF16)


def rms_norm(x, w, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return upcast(w) * xf.to(BF16)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def decoder_layer(c, w, x, cos, sin, cache, pos):
    """One Qwen2 layer on x [1, t, hidden] at positions pos..pos+t-1; cache = (k, v) or None."""
    b, t, _ = x.shape
    heads, kvh, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    h = rms_norm(x, w["input_layernorm.weight"], c["rms_norm_eps"])
    lin = lambda inp, n, bias=False: F.linear(inp, upcast(w[n + ".weight"]),
                                             upcast(w[n + ".bias"]) if bias else None)
    q = lin(h, "self_attn.q_proj", True).view(b, t, heads, hd).transpose(1, 2)
    k = lin(h, "self_attn.k_proj", True).view(b, t, kvh, hd).transpose(1, 2)
    v = lin(h, "self_attn.v_proj", True).view(b, t, kvh, hd).transpose(1, 2)
    cs, sn = cos[pos:pos + t], sin[pos:pos + t]
    q, k = q * cs + rotate_half(q) * sn, k * cs + rotate_half(k) * sn
    if cache is not None:
        cache[0][:, :, pos:pos + t] = k
        cache[1][:, :, pos:pos + t] = v
        k, v = cache[0][:, :, :pos + t], cache[1][:, :, :pos + t]
    rep = heads // kvh
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    # prefill starts at position 0 (causal square mask); a single decode token sees everything
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
    x = x + lin(attn.transpose(1, 2).reshape(b, t, heads * hd), "self_attn.o_proj")
    h = rms_norm(x, w["post_attention_layernorm.weight"], c["rms_norm_eps"])
    return x + lin(F.silu(lin(h, "mlp.gate_proj")) * lin(h, "mlp.up_proj"), "mlp.down_proj")


class ForkOffloader:
    """Per parameter: fresh GPU tensor from its own pinned CPU tensor, sync, drop after use."""
    def __init__(self, host_layers, device):
        self.device, self.cuda, self.bytes = device, device.type == "cuda", 0
        self.host = {}
        for i, layer in host_layers.items():
            self.host[i] = {}
            for n, t in layer.items():
                if self.cuda:  # own pinned tensor per parameter, as the hooks keep them
                    p = torch.empty(t.numel(), dtype=torch.uint8, pin_memory=True)
                    t = p.copy_(t.view(torch.uint8).reshape(-1)).view(F8).view(t.shape)
                self.host[i][n] = t

    def acquire(self, i):
        if self.cuda:
            w = {n: t.to(self.device, non_blocking=True) for n, t in self.host[i].items()}
            torch.cuda.synchronize()
        else:
            w = {n: t.clone() for n, t in self.host[i].items()}
        self.bytes += sum(t.numel() for t in w.values())
        return w

    def release(self, i):
        pass  # the caller drops its dict: the GPU copies go back to the caching allocator


class StreamOffloader:
    """Packed pinned layers, two GPU slots, a copy stream; load j+1 overlaps compute of j."""
    ALIGN = 256

    def __init__(self, host_layers, device):
        self.device, self.cuda, self.bytes = device, device.type == "cuda", 0
        self.order = sorted(host_layers)  # loads cycle through these, pass after pass
        self.packed, self.layout = {}, {}
        for i in self.order:
            lay, off = [], 0
            for n, t in host_layers[i].items():
                lay.append((n, off, t.numel(), tuple(t.shape)))
                off = (off + t.numel() + self.ALIGN - 1) // self.ALIGN * self.ALIGN
            buf = torch.empty(off, dtype=torch.uint8, pin_memory=self.cuda)
            for (n, o, sz, _), t in zip(lay, host_layers[i].values()):
                buf[o:o + sz].copy_(t.view(torch.uint8).reshape(-1))
            self.packed[i], self.layout[i] = buf, lay
        size = max((b.numel() for b in self.packed.values()), default=0)
        self.slots = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.copied = [None, None]   # event: load into slot s finished
        self.freed = [None, None]    # event: compute reading slot s finished
        self.issued = self.consumed = 0  # loads issued / layers handed out so far

    def _issue(self):
        j = self.issued
        s, src = j % 2, self.packed[self.order[j % len(self.order)]]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if self.freed[s] is not None:
                    self.copy_stream.wait_event(self.freed[s])
                self.slots[s][:src.numel()].copy_(src, non_blocking=True)
                self.copied[s] = torch.cuda.Event()
                self.copied[s].record(self.copy_stream)
        else:
            self.slots[s][:src.numel()].copy_(src)
        self.bytes += src.numel()
        self.issued += 1

    def acquire(self, i):
        j = self.consumed
        assert i == self.order[j % len(self.order)], "streamed layers must run in order"
        while self.issued <= j + 1:  # current load (first time only) and the prefetch of j+1
            self._issue()
        s = j % 2
        if self.cuda:
            torch.cuda.current_stream().wait_event(self.copied[s])
        slot = self.slots[s]
        return {n: slot[o:o + sz].view(F8).view(shape) for n, o, sz, shape in self.layout[i]}

    def release(self, i):
        s = self.consumed % 2
        if self.cuda:
            self.freed[s] = torch.cuda.Event()
            self.freed[s].record(torch.cuda.current_stream())
        self.consumed += 1


class Model:
    def __init__(self, ckpt, c, n_resident, offloader, device, max_len):
        self.c, self.device, L = c, device, c["num_hidden_layers"]
        self.first_resident = L - n_resident
        self.embed = ckpt.get(LM + "embed_tokens.weight").to(device)
        self.norm = ckpt.get(LM + "norm.weight").to(device)
        self.head = ckpt.get("lm_head.weight").to(device)
        layer = lambda i: {n: ckpt.get(f"{LM}layers.{i}.{n}") for n in LAYER_PARAMS}
        self.resident = {i: {n: t.to(device) for n, t in layer(i).items()}
                         for i in range(self.first_resident, L)}
        host = {i: layer(i) for i in range(self.first_resident)}
        self.offloader = {"fork": ForkOffloader, "stream": StreamOffloader}[offloader](host, device)
        hd = c["head_dim"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1).to(device)
        self.cos, self.sin = emb.cos().to(BF16), emb.sin().to(BF16)

    def new_cache(self, max_len):
        shape = (1, self.c["num_key_value_heads"], max_len, self.c["head_dim"])
        return [(torch.empty(shape, dtype=BF16, device=self.device),
                 torch.empty(shape, dtype=BF16, device=self.device))
                for _ in range(self.c["num_hidden_layers"])]

    def forward(self, ids, cache=None, pos=0):
        """ids [1, t] (device, long) -> hidden states after the final norm, [1, t, hidden]."""
        x = self.embed.view(torch.uint8)[ids].view(F8).to(BF16)  # upcast only the rows used
        for i in range(self.c["num_hidden_layers"]):
            streamed = i < self.first_resident
            w = self.offloader.acquire(i) if streamed else self.resident[i]
            x = decoder_layer(self.c, w, x, self.cos, self.sin,
                              cache[i] if cache is not None else None, pos)
            if streamed:
                del w
                self.offloader.release(i)
        return rms_norm(x, self.norm, self.c["rms_norm_eps"])

    def next_token(self, hidden):
        return int(F.linear(hidden[:, -1], upcast(self.head)).float().argmax(-1))


def sync(device):
    """Waits for the compute stream only: a prefetch still in flight on the copy stream keeps
    running, so the stream offloader gets no free copy time between timed passes."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def pinned_bandwidth(device, mb=256, reps=5):
    host = torch.empty(mb << 20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device=device)
    dev.copy_(host, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dev.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    return reps * host.numel() / (start.elapsed_time(end) / 1e3) / 1e9


def bench(args, ckpt, c, offloader, n, device):
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        getattr(torch._C, "_host_emptyCache", lambda: None)()  # cached pinned blocks
        torch.cuda.reset_peak_memory_stats(device)
        free0 = torch.cuda.mem_get_info(device)[0]
    min_free = [free0 if cuda else 0]

    def sample():  # lowest free VRAM seen, after each timed pass and after the decode
        if cuda:
            min_free[0] = min(min_free[0], torch.cuda.mem_get_info(device)[0])

    max_len = args.prompt_len + args.gen_tokens + 1
    t0 = time.perf_counter()
    model = Model(ckpt, c, n, offloader, device, max_len)
    sync(device)
    load_s = time.perf_counter() - t0
    prompt = torch.tensor([random_ids(args.prompt_len, args.seed, c["vocab_size"])],
                          dtype=torch.long, device=device)

    model.forward(prompt)  # test-speed: 1 warm-up, 5 timed passes, no cache, no LM head
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        hidden = model.forward(prompt)
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
        sample()
    digest = hashlib.sha256(hidden.float().cpu().numpy().tobytes()).hexdigest()[:16]
    hsum = float(hidden.float().sum())

    def generate(steps, cache):
        tok = model.next_token(model.forward(prompt, cache, 0))
        marks, toks = [time.perf_counter()], [tok]
        for k in range(1, steps):
            ids = torch.tensor([[tok]], dtype=torch.long, device=device)
            tok = model.next_token(model.forward(ids, cache, args.prompt_len + k - 1))
            toks.append(tok)
        marks.append(time.perf_counter())
        return toks, marks

    generate(3, model.new_cache(max_len))  # warm-up: prefill plus two decode steps
    cache = model.new_cache(max_len)
    sync(device)
    bytes0, t = model.offloader.bytes, time.perf_counter()
    toks, (t_first, t_end) = generate(args.gen_tokens, cache)
    copied = model.offloader.bytes - bytes0
    sample()
    row = dict(offloader=offloader, n_gpu_layers=n, load_s=round(load_s, 2),
               test_speed_ms=round(float(np.mean(times)), 3),
               ttft_ms=round((t_first - t) * 1e3, 3),
               ms_per_token=round((t_end - t_first) * 1e3 / (args.gen_tokens - 1), 3),
               decode_copied_gb=round(copied / 1e9, 3),
               decode_gbps=round(copied / (t_end - t) / 1e9, 2),
               hidden_sha256=digest, hidden_sum=hsum, tokens=toks)
    row["tokens_per_s"] = round(1e3 / row["ms_per_token"], 2)
    if cuda:
        row["peak_alloc_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        row["used_delta_mib"] = round((free0 - min_free[0]) / 2**20)
    del model
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--layers", default="28,20,12,8,4", help="GPU-resident layer counts N")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--device", default="cuda")
    p.add_argument("--offloaders", default="fork,stream")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    if args.gen_tokens < 2:
        p.error("--gen-tokens must be at least 2")
    device = torch.device(args.device)
    c, ckpt = load_config(args.checkpoint), Checkpoint(args.checkpoint)
    L = c["num_hidden_layers"]
    counts = [int(x) for x in args.layers.split(",")]
    if any(not 0 <= n <= L for n in counts):
        p.error(f"--layers: each N must lie in 0..{L}")
    info = dict(torch=torch.__version__, device=str(device), checkpoint=args.checkpoint,
                prompt_len=args.prompt_len, gen_tokens=args.gen_tokens, layers=L)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["pinned_h2d_gbps"] = round(pinned_bandwidth(device), 2)
    print(" ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    print(f"{'offloader':9} {'N':>3} {'load s':>7} {'test ms':>9} {'ttft ms':>9} {'ms/tok':>8} "
          f"{'tok/s':>7} {'GB/s':>6} {'peak MiB':>9} {'used MiB':>9}  checksum", flush=True)
    rows = []
    with torch.inference_mode():
        for off in args.offloaders.split(","):
            for n in counts:
                r = bench(args, ckpt, c, off, n, device)
                rows.append(r)
                print(f"{off:9} {n:>3} {r['load_s']:>7} {r['test_speed_ms']:>9} "
                      f"{r['ttft_ms']:>9} {r['ms_per_token']:>8} {r['tokens_per_s']:>7} "
                      f"{r['decode_gbps']:>6} {r.get('peak_alloc_mib', '-'):>9} "
                      f"{r.get('used_delta_mib', '-'):>9}  {r['hidden_sha256']} "
                      f"sum={r['hidden_sum']:.4f} tokens={r['tokens'][:6]}", flush=True)
    same = len({(r["hidden_sha256"], tuple(r["tokens"])) for r in rows}) == 1
    print("hidden states and tokens identical across runs:", same)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info, rows=rows, identical=same), f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
