"""where the eager layer's forward and backward host time goes, line by line (H200 host)."""
import statistics, sys, time
from collections import defaultdict
import torch
sys.path.insert(0, "benchmarks")
from triton_moe import MoEMLP, ops, router_ops
from triton_moe.config import MoEConfig
from triton_moe.testing.shapes import SEED_CONFIGS
from triton_moe.router_ops import fused_sort_by_expert
from triton_moe.kernels.route import topk_softmax
from triton_moe.ops import expert_mlp

dev = torch.device("cuda")
T = defaultdict(list)
class Stamp:
    def __init__(self): self.t = time.perf_counter()
    def __call__(self, label):
        now = time.perf_counter(); T[label].append(now - self.t); self.t = now

class Timed(MoEMLP):
    def forward(self, x):
        s = Stamp()
        x_flat = self._flatten_input(x); s("flatten")
        self._check_aux_loss_reaches_autograd(); s("check_aux")
        routing = self._route(x_flat); s("route")
        self.aux_loss = routing.aux_loss; s("setattr aux")
        self.tokens_per_expert = self._count_tokens_per_expert(routing); s("setattr counts")
        output = self._experts_or_empty(x_flat, routing, None); s("experts")
        out = output.view(x.shape).to(x.dtype); s("view.to")
        return out
    def _experts(self, x, routing, intermediates):
        s = Stamp()
        cfg = self.config
        dtype = self.compute_dtype(x); s("  compute_dtype")
        sort = fused_sort_by_expert(routing.expert_indices, cfg.num_experts, routing.sort_tables); s("  sort")
        x = x.to(dtype); s("  x.to")
        w1, w2 = self.w1.to(dtype), self.w2.to(dtype); s("  w.to x2")
        rw = routing.routing_weights.flatten(); s("  flatten rw")
        output = expert_mlp(x, rw, w1, None, w2, sort, self.expert_width_offsets,
                            cfg.expert_widths, cfg.activation, cfg.keep_sorted_x); s("  expert_mlp")
        return output

# route internals
orig_route_forward = router_ops.route_forward
def timed_route_forward(x, router_weight, top_k, nw, lb, z):
    s = Stamp()
    logits = router_ops.router_gemm(x, router_weight); s("    router_gemm")
    out = topk_softmax(logits, top_k, nw, lb, z); s("    topk_softmax")
    return (logits, *out)
router_ops.route_forward = timed_route_forward
orig_expert_fwd = ops._expert_mlp_forward
def timed_expert_fwd(*a):
    s = Stamp(); r = orig_expert_fwd(*a); s("    _expert_mlp_forward"); return r
ops._expert_mlp_forward = timed_expert_fwd
orig_expert_bwd = ops._expert_mlp_backward
def timed_expert_bwd(*a):
    s = Stamp(); r = orig_expert_bwd(*a); s("B _expert_mlp_backward"); return r
ops._expert_mlp_backward = timed_expert_bwd
orig_route_bwd = router_ops.route_backward
def timed_route_bwd(*a):
    s = Stamp(); r = orig_route_bwd(*a); s("B route_backward"); return r
router_ops.route_backward = timed_route_bwd

for name in ("8exp_uniform", "8exp_variable"):
    torch.manual_seed(0)
    layer = Timed(MoEConfig(**SEED_CONFIGS[name])).to(dev)
    x = torch.randn(8192, 256, device=dev, requires_grad=True)
    g = torch.randn(8192, 256, device=dev, dtype=torch.bfloat16)
    for i in range(230):
        if i == 30: T.clear()
        layer.zero_grad(set_to_none=True); x.grad = None
        torch.cuda.synchronize()
        s = Stamp()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            s("autocast enter")
            y = layer(x); s("layer call")
        s("autocast exit")
        y.backward(g); s("B backward total")
    print(f"=== {name}: median us")
    for k, v in T.items():
        print(f"{k:28s} {statistics.median(v) * 1e6:8.1f}")

print("=== unit costs us")
def per_call(fn, n=2000):
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n): fn()
        ts.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(ts)
xb = torch.randn(8192, 256, device=dev, dtype=torch.bfloat16)
w = torch.randn(8, 256, device=dev)
m = torch.nn.Linear(4, 4)
class Empty(torch.nn.Module):
    def forward(self, x): return x
e = Empty()
def ac_off():
    with torch.autocast("cuda", enabled=False):
        pass
def toggle():
    prev = torch.is_autocast_enabled("cuda")
    torch.set_autocast_enabled("cuda", False)
    torch.set_autocast_enabled("cuda", prev)
with torch.autocast("cuda", dtype=torch.bfloat16):
    units = {
        "autocast(enabled=False) enter+exit": ac_off,
        "set_autocast_enabled toggle": toggle,
        "is_autocast_enabled": lambda: torch.is_autocast_enabled("cuda"),
        "get_autocast_dtype": lambda: torch.get_autocast_dtype("cuda"),
        "compiler.is_compiling": torch.compiler.is_compiling,
        "_current_graph_task_id": torch._C._current_graph_task_id,
        "is_grad_enabled": torch.is_grad_enabled,
        "module setattr plain attr": lambda: setattr(m, "aux", None),
        "empty module call": lambda: e(xb),
        "F.linear fp32 8192x256 @ 8x256": lambda: torch.nn.functional.linear(xb.float(), w),
        "xb.float()": lambda: xb.float(),
        "torch.mm bf16 out fp32": lambda: torch.mm(xb, w.to(torch.bfloat16).t(), out_dtype=torch.float32),
        "x.reshape(-1,256).contiguous()": lambda: xb.reshape(-1, 256).contiguous(),
        "torch.zeros(8)": lambda: torch.zeros(8, device=dev),
    }
    for k, fn in units.items():
        print(f"{k:40s} {per_call(fn):8.2f}")
