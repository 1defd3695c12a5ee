import numpy as np, cupy as cp, torch, sys
dev = cp.cuda.Device(0)
print("device", cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "driver", cp.cuda.runtime.driverGetVersion(),
      "SMs", dev.attributes["MultiProcessorCount"])
mod = cp.RawModule(path="probe.ptx")  # PTX from NVRTC --gpu-architecture=compute_90a, JIT-compiled by the driver
rng = np.random.default_rng(1)
def bf16(a):  # round to bf16, return (uint16 bits, float64 values)
    t = torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16), t.to(torch.float64).numpy()
A_bits, A_val = bf16(rng.standard_normal((64, 64)))
X_bits, X_val = bf16(rng.standard_normal((64, 64)))
W8 = rng.integers(0, 256, (64, 64), dtype=np.uint8)
W8[(W8 & 0x7F) == 0x7F] = 0x11  # no NaN codes
W_val = torch.from_numpy(W8.copy()).view(torch.float8_e4m3fn).to(torch.float64).numpy()
dA, dX, dW = cp.asarray(A_bits), cp.asarray(X_bits), cp.asarray(W8)
check = mod.get_function("check")
for mode in (0, 1):
    D = cp.zeros((64, 64), dtype=cp.float32)
    check((1,), (128,), (dA, dW, dX, D, np.int32(mode)))
    cp.cuda.runtime.deviceSynchronize()
    got = D.get().astype(np.float64)
    ref = (A_val @ X_val.T) if mode == 0 else (W_val @ X_val.T) * 2.0 ** -56
    scale = np.abs(ref).max()
    print(f"check mode {mode}: max |err|/max|ref| = {np.abs(got - ref).max() / scale:.3e}")
out = cp.zeros(132 * 256, dtype=cp.float32)
iters = 4096
flops = 132 * 2 * iters * 4 * (64 * 128 * 16 * 2)
for name in ("peak_ss", "peak_rs", "peak_rs_decode"):
    f = mod.get_function(name)
    f.max_dynamic_shared_size_bytes = 40960
    for rep in range(2):
        s, e = cp.cuda.Event(), cp.cuda.Event()
        s.record(); f((132,), (256,), (out, np.int32(iters)), shared_mem=40960); e.record(); e.synchronize()
        ms = cp.cuda.get_elapsed_time(s, e)
    print(f"{name}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s (132 CTAs x 2 warpgroups, m64n128k16)")
