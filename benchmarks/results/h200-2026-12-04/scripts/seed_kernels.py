"""Device µs per kernel of one MoE layer forward + backward as the seed GPT runs it (8192 tokens, hidden 256,
fp32 parameters and input under bf16 autocast), against the dense MLP of the active width (relu²)."""
import sys
import torch
sys.path.insert(0, "benchmarks")
import harness
import triton_moe

def dense(width):
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.proj = torch.nn.Linear(256, width, bias=False), torch.nn.Linear(width, 256, bias=False)
        def forward(self, x):
            return self.proj(torch.relu(self.fc(x)).square())
    return MLP()

def table(name, layer, tokens=8192):
    layer = layer.cuda()
    x = torch.randn(tokens, 256, device="cuda", requires_grad=True)
    grad = torch.randn(tokens, 256, device="cuda")
    def step():
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            out = layer(x)
        out.backward(grad)
    for _ in range(3):
        step()
    rows, total = harness.kernel_launches(step)
    print(f"## {name}: {sum(r[1] for r in rows)} launches, {total:.1f} device µs")
    for kernel, count, micros in rows:
        print(f"  {micros:8.1f} µs  x{count}  {kernel[:110]}")

torch.manual_seed(0)
table("dense 768", dense(768))
for sizes in ("8x384", "4x512,4x256", "64x96"):
    cfg = triton_moe.MoEConfig(expert_sizes=sizes, num_active_experts=2 if sizes != "64x96" else 8, hidden_size=256)
    table(f"MoEMLP {sizes}", triton_moe.MoEMLP(cfg))
