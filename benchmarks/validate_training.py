"""Train the same small byte-level GPT twice, once with the stk reference MoE MLP and once with the Triton one,
from the same initial weights on the same batches, and check that the two loss curves agree.

    uv run python benchmarks/validate_training.py                  # CPU: tiny model, 40 steps; GPU: 300 steps
    uv run python benchmarks/validate_training.py --steps 3000 --activation swiglu --wandb

Reports per-step losses (cross-entropy + aux loss) of both runs, the Pearson correlation of the two curves,
the relative gap between their final losses (mean of the last 10 steps of each), tokens/s of each, and the experts'
load (triton_moe.expert_load: the busiest expert's share over its even share, per step; every layer's last loads);
writes a JSON and a PNG of both curves, their difference and the load to --out-dir (and the loads to wandb).
A loss curve cannot tell a correct backward from a broken one (w1's gradient x 0.3 still gives r = 0.9996), so
two measures that can:
- gradient check, at step 0 and every --grad-check-every steps of the reference run: the reference model's
  weights loaded into a twin with the Triton MLP, the step's batch through both, and for each MoE parameter
  name (router, w1, v1, w2; all layers together) and the MoE layers' input, the relative L2 error
  ||g_triton - g_ref|| / ||g_ref|| and the cosine;
- weight distance, at the end: ||θ_ref - θ_triton|| / ||θ_ref - θ_0||, the two trained models' distance relative
  to how far training moved the reference from the shared initial weights θ_0; over the MoE parameters and all.
`--control` trains the reference a second time, from the same weights on the same batches, and reports its r,
gap and weight distance against the first reference run: how far two runs of one implementation drift apart by
non-determinism alone (on a GPU the rest of the GPT and stk are not bitwise reproducible; on the CPU they are, and
the control matches exactly). It is a yardstick printed beside the triton numbers, not a check: the bounds below
stay as they are.
Exits non-zero when the correlation is below --min-correlation (0.999), the gap above --max-gap (1%), a
gradient's relative error above --max-grad-rel-l2 or a weight distance above --max-weight-distance (defaults
per dtype: THRESHOLDS). `--inject-fault NAME` runs the Triton model with a deliberate defect
(triton_moe.testing.faults); the run must then fail.
Defaults depend on the device: on a GPU a real convergence check in bf16 autocast, on the CPU (Triton's
interpreter, fp32) a tiny model that finishes in a few minutes. Every size flag overrides its default.
"""

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from triton_moe import reference
import triton_moe
from triton_moe.testing.gpt import GPT, GPTConfig, get_batch, load_bytes
from triton_moe import MoEConfig, MoELayer, enable_cuda_graphs, expert_load
from triton_moe.testing.faults import add_fault_argument, inject_fault
from triton_moe.testing.ground_truth import cosine, rel_l2_error

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / "data" / "classics.txt"
IMPLEMENTATIONS = {"reference": reference.MoEMLP, "triton": triton_moe.MoEMLP}
CONTROL = "control"  # --control: the reference trained again, as a yardstick of run-to-run drift
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPILE_MODES = ("none", "default", "reduce-overhead")
FINAL_WINDOW = 10  # steps averaged for the final loss
TIMING_SKIP = 3  # first steps left out of tokens/s: Triton compiles its kernels there
MOE_PARAMETERS = ("router.weight", "w1", "v1", "w2")  # names within a block's mlp
# Pass/fail bounds per dtype, from measurements (README, "How we know the checks work"). grad_rel_l2: largest
# relative L2 error of a gradient, Triton vs reference on the same weights and batch: fp32 (CPU) <= 5.4e-7 clean,
# >= 0.52 with any fault; bf16 (H100, default GPU model) <= 5.9e-2 clean (the MoE input's at step 0; the weights'
# <= 2.9e-2), >= 0.29 with any fault. weight_distance: fp32 <= 2.4e-5 clean, 4.8e-3 to 0.50 with a fault after 2
# steps; bf16 0.65 clean after 300 steps but 1.14 after 1000 (bf16 rounding differences grow chaotically under
# Adam), so in bf16 it only catches runs as far apart as unrelated ones, and holds for runs of the GPU default's
# length (300 steps); longer bf16 runs need a larger --max-weight-distance. The gradient check is the sharp test.
THRESHOLDS = {
    "float32": dict(grad_rel_l2=1e-5, weight_distance=1e-3),
    "bfloat16": dict(grad_rel_l2=0.1, weight_distance=1.0),
}

# Defaults per device type. MoE widths and n_embd are multiples of 128 because the stk reference needs them.
PRESETS = {
    "cpu": dict(steps=40, batch_size=8, block_size=64, n_layer=2, n_head=4, n_embd=128, experts="2x256,2x128",
                top_k=2, lr=3e-3, dtype="float32", grad_check_every=10),
    "cuda": dict(steps=300, batch_size=32, block_size=256, n_layer=4, n_head=4, n_embd=256, experts="4x512,4x256",
                 top_k=2, lr=1e-3, dtype="bfloat16", grad_check_every=50),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--block-size", type=int, help="context length")
    parser.add_argument("--n-layer", type=int)
    parser.add_argument("--n-head", type=int)
    parser.add_argument("--n-embd", type=int)
    parser.add_argument("--experts", help="expert groups, count x width: '4x512,4x256'")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--activation", default="relu_squared", choices=["relu_squared", "swiglu", "gelu"])
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up, then cosine to lr/10 (default steps/10)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="float32, or bfloat16 autocast (GPU only)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the batch sampler")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a text file, read as bytes")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/validate_training"))
    parser.add_argument("--min-correlation", type=float, default=0.999)
    parser.add_argument("--max-gap", type=float, default=0.01, help="largest relative final-loss gap")
    parser.add_argument("--grad-check-every", type=int,
                        help="compare both implementations' gradients every N steps (and at step 0); 0: step 0 only")
    parser.add_argument("--max-grad-rel-l2", type=float, help="largest relative L2 error of a gradient "
                        "(default per dtype, THRESHOLDS)")
    parser.add_argument("--max-weight-distance", type=float, help="largest ||θ_ref - θ_triton|| / "
                        "||θ_ref - θ_0|| after training (default per dtype, THRESHOLDS)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="none",
                        help="train the Triton model under torch.compile: 'default', or 'reduce-overhead' (CUDA "
                             "graphs); the reference trains eagerly")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="train the Triton model eagerly with its MoE layers replayed from CUDA graphs "
                             "(triton_moe.enable_cuda_graphs); GPU only, with --compile none")
    parser.add_argument("--control", action="store_true", help="also train the reference a second time and report "
                        "how far it drifts from the first (the drift of non-determinism alone); no bound")
    add_fault_argument(parser)
    parser.add_argument("--wandb", action="store_true", help="log both runs to Weights & Biases (offline)")
    parser.add_argument("--wandb-online", action="store_true", help="with --wandb: sync online")
    parser.add_argument("--wandb-project", default="triton-moe-validate-training")
    args = parser.parse_args(argv)

    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    for name, value in PRESETS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "batch_size", "block_size", "n_layer", "n_head", "n_embd", "top_k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.n_embd % args.n_head:
        parser.error(f"--n-embd ({args.n_embd}) must be a multiple of --n-head ({args.n_head})")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    try:
        moe = MoEConfig(expert_sizes=args.experts, num_active_experts=args.top_k, hidden_size=args.n_embd,
                        activation=args.activation)
        reference.check_block_aligned(moe)
    except (TypeError, ValueError) as error:
        parser.error(f"--experts {args.experts!r} with --top-k {args.top_k} and --n-embd {args.n_embd}: {error}")
    args.expert_sizes = moe.expert_sizes
    if args.out_dir.exists() and not args.out_dir.is_dir():
        parser.error(f"--out-dir {args.out_dir} exists and is not a folder")
    if args.max_grad_rel_l2 is None:
        args.max_grad_rel_l2 = THRESHOLDS[args.dtype]["grad_rel_l2"]
    if args.max_weight_distance is None:
        args.max_weight_distance = THRESHOLDS[args.dtype]["weight_distance"]
    if args.warmup_steps is None:
        args.warmup_steps = args.steps // 10
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.grad_check_every < 0:
        parser.error(f"--grad-check-every must be >= 0, got {args.grad_check_every}")
    if args.dtype == "bfloat16" and args.device != "cuda":
        parser.error("--dtype bfloat16 needs a GPU (bf16 is broken in Triton's CPU interpreter)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    if args.cuda_graphs and (args.device != "cuda" or args.compile != "none"):
        parser.error(f"--cuda-graphs needs --device cuda and --compile none, got --device {args.device} and "
                     f"--compile {args.compile}")
    if not args.data.is_file():
        parser.error(f"--data {args.data} is not a file")
    if args.data.stat().st_size < args.block_size + 2:
        parser.error(f"--data {args.data} is shorter than block_size + 2 = {args.block_size + 2} bytes")
    if args.wandb and importlib.util.find_spec("wandb") is None:
        parser.error("--wandb needs the wandb package: `uv sync --extra wandb` (or `uv pip install wandb`)")
    return args


def learning_rate(step: int, args) -> float:
    """Linear warm-up to args.lr, then cosine decay to args.lr / 10 at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(args.steps - 1 - args.warmup_steps, 1)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """nanoGPT's AdamW: weight decay on matrices and embeddings, none on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=0.1),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def train(name: str, model: GPT, data: torch.Tensor, args, log=None, before_step=None, compile_mode="none") -> dict:
    """Train `model` for args.steps steps; return its per-step losses, learning rates and tokens/s.

    `before_step(step, model, inputs, targets)`, if given, runs before each step's forward (outside the timing).
    compile_mode: "none", or the forward through torch.compile(model) in that mode ("default", "reduce-overhead").
    """
    model.train()
    forward = model if compile_mode == "none" else torch.compile(
        model, mode=None if compile_mode == "default" else compile_mode)
    optimizer = make_optimizer(model, args.lr)
    generator = torch.Generator().manual_seed(args.seed)  # the same batches for every run
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    tokens_per_step = args.batch_size * args.block_size
    losses, lrs, step_seconds, imbalances = [], [], [], []
    progress = tqdm(range(args.steps), desc=name, file=sys.stderr, dynamic_ncols=True)
    for step in progress:
        start = time.perf_counter()
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = (t.to(args.device) for t in get_batch(data, args.batch_size, args.block_size, generator))
        if before_step is not None:
            before_step(step, model, inputs, targets)
            start = time.perf_counter()
        with autocast:
            _, loss = forward(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = loss.item()  # synchronises, so the step's time is complete
        step_seconds.append(time.perf_counter() - start)
        loads = {name: load.tolist() for name, load in expert_load(model).items()}  # per layer, [E] fractions
        imbalance = max(max(load) * len(load) for load in loads.values())  # 1: every expert its share
        losses.append(loss_value)
        lrs.append(lr)
        imbalances.append(imbalance)
        progress.set_postfix(loss=f"{loss_value:.4f}")
        if log is not None:
            log({"loss": loss_value, "lr": lr, "load_imbalance": imbalance,
                 **{f"load/{name}/expert_{expert}": fraction for name, load in loads.items()
                    for expert, fraction in enumerate(load)}}, step=step)
    timed = step_seconds[TIMING_SKIP:] if len(step_seconds) > TIMING_SKIP else step_seconds
    return dict(losses=losses, lrs=lrs, load_imbalance=imbalances, final_expert_load=loads,
                seconds=sum(step_seconds), tokens_per_s=tokens_per_step * len(timed) / sum(timed))


def moe_layers(model: GPT) -> list[MoELayer]:
    return [block.mlp for block in model.transformer.h]


def model_gradients(model: GPT, inputs, targets, args) -> dict:
    """Gradients of the loss on one batch: each MoE parameter name (all layers concatenated) and the MoE layers'
    input ("moe_input", captured by a forward pre-hook), flattened fp32 tensors. Leaves no .grad behind."""
    captured = []

    def keep_input(module, args_in):
        args_in[0].retain_grad()
        captured.append(args_in[0])

    hooks = [layer.register_forward_pre_hook(keep_input) for layer in moe_layers(model)]
    try:
        model.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            _, loss = model(inputs, targets)
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    grads = {}
    for name in MOE_PARAMETERS:
        if name == "v1" and not model.config.moe.is_gated:
            continue
        params = [layer.get_parameter(name) for layer in moe_layers(model)]
        grads[name.removesuffix(".weight")] = torch.cat([p.grad.float().flatten() for p in params])
    grads["moe_input"] = torch.cat([x.grad.float().flatten() for x in captured])
    model.zero_grad(set_to_none=True)
    return grads


class GradientCheck:
    """At chosen steps of the reference run: the reference model's weights loaded into a reference twin and a
    Triton twin (so that the training model is not touched; with --cuda-graphs, its MoE layers replayed), the step's
    batch through both, their gradients compared. Records one entry per checked step."""

    def __init__(self, config: GPTConfig, args):
        self.args = args
        self.twins = {name: GPT(config, mlp_cls).to(args.device) for name, mlp_cls in IMPLEMENTATIONS.items()}
        if args.cuda_graphs:  # the gradients compared are then the replayed layers'
            enable_cuda_graphs(self.twins["triton"])
        self.results = []

    def __call__(self, step: int, model: GPT, inputs, targets):
        every = self.args.grad_check_every
        if step != 0 and (every == 0 or step % every):
            return
        state = model.state_dict()
        grads = {}
        for name, twin in self.twins.items():
            twin.load_state_dict(state)
            with inject_fault(self.args.inject_fault if name == "triton" else None):
                grads[name] = model_gradients(twin, inputs, targets, self.args)
        errors = {key: dict(rel_l2=rel_l2_error(grads["triton"][key], want),
                            cosine=cosine(grads["triton"][key], want))
                  for key, want in grads["reference"].items()}
        self.results.append(dict(step=step, grads=errors))


def weight_distances(initial: dict, reference_final: dict, triton_final: dict) -> dict:
    """||θ_ref - θ_triton|| / ||θ_ref - θ_0|| over the MoE parameters and over all parameters."""
    def distance(names, a, b):
        return math.sqrt(sum((a[n].double() - b[n].double()).square().sum().item() for n in names))

    moe_names = [n for n in reference_final if ".mlp." in n]
    result = {}
    for label, names in (("moe", moe_names), ("all", list(reference_final))):
        moved = distance(names, reference_final, initial)
        result[label] = distance(names, reference_final, triton_final) / moved if moved > 0 else float("inf")
    return result


def compare(reference_losses: list[float], triton_losses: list[float]) -> dict:
    """Pearson r of the two curves and the relative gap of their final losses (mean of the last steps)."""
    ref, tri = np.asarray(reference_losses), np.asarray(triton_losses)
    pearson_r = float(np.corrcoef(ref, tri)[0, 1]) if len(ref) > 1 else float("nan")
    final_reference, final_triton = ref[-FINAL_WINDOW:].mean(), tri[-FINAL_WINDOW:].mean()
    return dict(pearson_r=pearson_r, final_loss_reference=float(final_reference),
                final_loss_triton=float(final_triton),
                final_loss_gap=float(abs(final_triton - final_reference) / final_reference),
                max_abs_diff=float(np.abs(tri - ref).max()), step0_abs_diff=float(abs(tri[0] - ref[0])))


def plot(path: Path, runs: dict, metrics: dict, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom, load) = plt.subplots(3, 1, figsize=(8, 9), sharex=True, height_ratios=[3, 1.4, 1.4])
    styles = {"reference": dict(linewidth=2.4, alpha=0.6), "triton": dict(linewidth=1.0, linestyle="--"),
              CONTROL: dict(linewidth=1.0, linestyle=":", color="tab:gray", label="reference again (control)")}
    for name, run in runs.items():
        top.plot(run["losses"], **{"label": name, **styles[name]})
    top.set_ylabel("training loss (CE + aux)")
    top.set_title(f"{title}\nPearson r = {metrics['pearson_r']:.6f}, "
                  f"final-loss gap = {100 * metrics['final_loss_gap']:.3f}%", fontsize=10)
    top.legend()
    top.grid(alpha=0.3)
    for name, color in (("triton", "tab:red"), (CONTROL, "tab:gray")):
        if name in runs:
            difference = np.asarray(runs[name]["losses"]) - np.asarray(runs["reference"]["losses"])
            bottom.plot(difference, color=color, linewidth=1.0, label=f"{name} - reference")
    bottom.axhline(0.0, color="black", linewidth=0.6)
    bottom.set_ylabel("minus reference")
    if CONTROL in runs:
        bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    for name, run in runs.items():
        load.plot(run["load_imbalance"], **{"label": name, **styles[name]})
    load.axhline(1.0, color="black", linewidth=0.6)
    load.set_ylabel("busiest expert's load\n÷ its even share")
    load.set_xlabel("step")
    load.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def wandb_logger(args, run_name: str, group: str):
    """A wandb run for one implementation (offline unless --wandb-online) and its log function."""
    import wandb

    run = wandb.init(project=args.wandb_project, group=group, name=run_name,
                     mode="online" if args.wandb_online else "offline", dir=str(args.out_dir),
                     config={**json_args(args), "implementation": run_name})
    return run, run.log


def json_args(args) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    moe = MoEConfig(expert_sizes=args.expert_sizes, num_active_experts=args.top_k, hidden_size=args.n_embd,
                    activation=args.activation)
    config = GPTConfig(moe=moe, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       block_size=args.block_size)
    data = load_bytes(args.data)

    # Model A (reference MLP) draws the initial weights; B (Triton MLP) loads them: the layouts are identical.
    model_a = GPT(config, reference.MoEMLP)
    initial_state = {key: value.clone() for key, value in model_a.state_dict().items()}
    num_params = sum(p.numel() for p in model_a.parameters())
    del model_a
    grad_check = GradientCheck(config, args)
    title = (f"GPT {args.n_layer}L {args.n_embd}d, experts {moe.expert_sizes} top-{args.top_k}, "
             f"{args.dtype} on {device_name(args.device)}")
    if args.compile != "none":
        title += f", triton under torch.compile (mode {args.compile})"
    if args.cuda_graphs:
        title += ", triton's MoE layers replayed from CUDA graphs"
    if args.inject_fault:
        title += f", fault {args.inject_fault} injected into triton"
    print(f"{title}; {num_params / 1e6:.2f}M parameters, {len(data) / 1e3:.0f} kB of {args.data.name}, "
          f"{args.steps} steps of {args.batch_size} x {args.block_size} tokens, lr {args.lr:g}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    group = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    runs, final_params = {}, {}
    trained = dict(IMPLEMENTATIONS, **({CONTROL: reference.MoEMLP} if args.control else {}))
    for name, mlp_cls in trained.items():
        model = GPT(config, mlp_cls)
        model.load_state_dict(initial_state)
        model.to(args.device)
        if args.cuda_graphs and name == "triton":
            enable_cuda_graphs(model)
        initial_params = {key: param.detach().clone() for key, param in model.named_parameters()}
        wandb_run, log = wandb_logger(args, name, group) if args.wandb else (None, None)
        with inject_fault(args.inject_fault if name == "triton" else None):
            runs[name] = train(name, model, data, args, log, grad_check if name == "reference" else None,
                               args.compile if name == "triton" else "none")
        final_params[name] = {key: param.detach().clone() for key, param in model.named_parameters()}
        if wandb_run is not None:
            wandb_run.summary["tokens_per_s"] = runs[name]["tokens_per_s"]
            wandb_run.finish()
        del model

    metrics = compare(runs["reference"]["losses"], runs["triton"]["losses"])
    metrics["grad_checks"] = grad_check.results
    metrics["max_grad_rel_l2"] = max(entry["rel_l2"] for check in grad_check.results
                                     for entry in check["grads"].values())
    metrics["weight_distance"] = weight_distances(initial_params, final_params["reference"], final_params["triton"])
    if args.control:
        control = compare(runs["reference"]["losses"], runs[CONTROL]["losses"])
        metrics[CONTROL] = dict(pearson_r=control["pearson_r"], final_loss_gap=control["final_loss_gap"],
                                max_abs_diff=control["max_abs_diff"],
                                weight_distance=weight_distances(initial_params, final_params["reference"],
                                                                 final_params[CONTROL]))
        metrics[f"final_loss_{CONTROL}"] = control["final_loss_triton"]  # compare() calls its second curve triton
    checks = dict(finite_losses=all(math.isfinite(loss) for run in runs.values() for loss in run["losses"]),
                  correlation=metrics["pearson_r"] >= args.min_correlation,
                  final_loss_gap=metrics["final_loss_gap"] <= args.max_gap,
                  grad_rel_l2=metrics["max_grad_rel_l2"] <= args.max_grad_rel_l2,
                  weight_distance=max(metrics["weight_distance"].values()) <= args.max_weight_distance)
    versions = dict(torch=torch.__version__, triton=importlib.metadata.version("triton"),
                    python=platform.python_version())
    result = dict(args=json_args(args), device=device_name(args.device),
                  date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), versions=versions,
                  num_params=num_params, runs=runs, metrics=metrics, checks=checks, passed=all(checks.values()))
    json_path, png_path = args.out_dir / "validate_training.json", args.out_dir / "validate_training.png"
    json_path.write_text(json.dumps(result, indent=1))
    plot(png_path, runs, metrics, title)
    print_summary(runs, metrics, checks, args)
    print(f"wrote {json_path} and {png_path}")
    return 0 if all(checks.values()) else 1


def print_summary(runs: dict, metrics: dict, checks: dict, args):
    # the busiest expert's share of the assignments over its even share, the mean of the last steps (1: balanced)
    busiest = f"busiest expert (last {FINAL_WINDOW})"
    print(f"\n| {'implementation':<14} | {'first loss':>10} | {f'final loss (last {FINAL_WINDOW})':>22} |"
          f" {busiest:>26} | {'tokens/s':>10} | {'time s':>8} |")
    print(f"|{'-' * 16}|{'-' * 12}|{'-' * 24}|{'-' * 28}|{'-' * 12}|{'-' * 10}|")
    for name, run in runs.items():
        final = metrics[f"final_loss_{name}"]
        imbalance = sum(run["load_imbalance"][-FINAL_WINDOW:]) / len(run["load_imbalance"][-FINAL_WINDOW:])
        print(f"| {name:<14} | {run['losses'][0]:>10.4f} | {final:>22.4f} | {f'{imbalance:.2f}x its share':>26} |"
              f" {run['tokens_per_s']:>10.0f} | {run['seconds']:>8.1f} |")
    verdict = {True: "ok", False: "FAIL"}
    print(f"\nPearson r of the loss curves  {metrics['pearson_r']:.6f}  (>= {args.min_correlation})  "
          f"{verdict[checks['correlation']]}")
    print(f"final-loss gap                {100 * metrics['final_loss_gap']:.4f}%  (<= {100 * args.max_gap:g}%)  "
          f"{verdict[checks['final_loss_gap']]}")
    print(f"step-0 loss difference        {metrics['step0_abs_diff']:.2e}; "
          f"largest per-step difference {metrics['max_abs_diff']:.2e}")
    distance = metrics["weight_distance"]
    print(f"weight distance |θ_ref - θ_triton| / |θ_ref - θ_0|  MoE {distance['moe']:.3e}, "
          f"all {distance['all']:.3e}  (<= {args.max_weight_distance:g})  {verdict[checks['weight_distance']]}")
    print(f"largest gradient rel L2 error {metrics['max_grad_rel_l2']:.3e}  (<= {args.max_grad_rel_l2:g})  "
          f"{verdict[checks['grad_rel_l2']]}")
    if CONTROL in metrics:
        control = metrics[CONTROL]
        print(f"control, the reference against itself (no bound): r {control['pearson_r']:.6f}, final-loss gap "
              f"{100 * control['final_loss_gap']:.4f}%, weight distance MoE {control['weight_distance']['moe']:.3e}, "
              f"all {control['weight_distance']['all']:.3e}")
    if not checks["finite_losses"]:
        print("a loss is NaN or infinite: the runs diverged (a learning rate too high?), and the comparisons above "
              "mean nothing")
    elif CONTROL not in metrics and not (checks["correlation"] and checks["weight_distance"]):
        print("r or the weight distance is out of bounds: --control measures how far the reference drifts from "
              "itself on this model (README, 'How far the reference drifts from itself')")
    print_grad_checks(metrics["grad_checks"], args.max_grad_rel_l2)


def print_grad_checks(grad_checks: list[dict], bound: float):
    """One row per checked step and gradient: rel L2 error and cosine, Triton vs reference (all layers)."""
    print("\nGradients on the reference's weights and the step's batch, triton vs reference (all layers together):")
    print(f"| {'step':>5} | {'gradient':<10} | {'rel L2':>10} | {'cosine':>12} | ok |")
    print(f"|{'-' * 7}|{'-' * 12}|{'-' * 12}|{'-' * 14}|----|")
    for check in grad_checks:
        for key, entry in check["grads"].items():
            ok = "ok" if entry["rel_l2"] <= bound else "NO"
            print(f"| {check['step']:>5} | {key:<10} | {entry['rel_l2']:>10.3e} | {entry['cosine']:>12.9f} |"
                  f" {ok:>2} |")


if __name__ == "__main__":
    sys.exit(main())
