"""A short stand-in for nanoGPT's train.py around examples/nanogpt/model.py: AdamW, a val loss on held-out bytes,
checkpoints that resume, MFU of the active parameters, torch.compile, the MoE layers replayed from CUDA graphs.

It trains on the bytes of --data (default: the bundled data/classics.txt; byte-level, vocab 256, no download, no
tokenizer): the first 90% of them train, the last 10% give the val loss, as nanoGPT's prepare.py splits them.

    uv run python examples/nanogpt/train.py --max-iters 20                  # CPU: a tiny model, into runs/nanogpt
    uv run python examples/nanogpt/train.py --max-iters 40 --resume         # 20 more steps from runs/nanogpt
    python examples/nanogpt/train.py --device cuda --batch-size 64 --block-size 256 --n-layer 6 --n-head 6 \\
        --n-embd 384 --moe-experts 4x1536,4x768 --max-iters 5000 --eval-interval 250 --compile  # or --cuda-graphs

Its flags are its own (argparse, with dashes): nanoGPT's configurator and config files do not reach it. It leaves
out of nanoGPT's train.py:
- the learning-rate schedule: a constant --learning-rate, no warmup, no cosine decay;
- gradient accumulation, DDP (torchrun), init_from='gpt2', wandb, eval_only and log_interval (it logs every step);
- TF32 (the forward autocasts to --dtype as nanoGPT's does: bfloat16 by default on a GPU that has it, float16 with
  a GradScaler, float32 without autocast, the default on the CPU);
- best_val_loss: it saves a checkpoint at every eval, whether the val loss improved or not;
- random batches: a step's batch comes from a generator seeded by the step, so that a resumed run sees the batches
  an uninterrupted one does;
- prepare.py's train.bin and val.bin: it reads one text file and splits it itself.
A checkpoint keeps the training flags (train_args) and --resume takes them from it: --max-iters, --eval-interval,
--eval-iters, --device, --dtype, --compile and --cuda-graphs may change; any other flag given with another value is
a usage error, since it would change the model, the data, the batches or the optimizer of the run it continues.

What a nanoGPT train.py needs for MoE, marked `# MoE:`: the MoE keys go into model_args, so that a checkpoint
rebuilds and resumes the same model (nanoGPT's resume copies a fixed list of keys from the checkpoint: add them
there); the log line reports the aux loss and the experts' load.
"""

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from model import GPT, GPTConfig  # model.py beside this script, as in nanoGPT

from triton_moe import aux_loss, enable_cuda_graphs, expert_load

DATA = Path(__file__).resolve().parent.parent.parent / "data" / "classics.txt"
TRAIN_FRACTION = 0.9  # the first 90% of the bytes train, the last 10% give the val loss, as nanoGPT's prepare.py
# MoE: the model_args a checkpoint carries and a resume restores, the MoE keys among them
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout",
              "moe_experts", "moe_top_k", "moe_activation", "moe_load_balance_coef")
# MoEConfig's fields that train.py's flags set: a ValueError of MoEConfig starts with the field it is about
MOE_FLAGS = {"expert_sizes": "moe_experts", "num_active_experts": "moe_top_k", "activation": "moe_activation",
             "load_balance_coef": "moe_load_balance_coef", "hidden_size": "n_embd"}
# The flags a resume may change: how far it trains, how often and how long it evaluates, where and how a step runs.
# Every other flag shapes the model, the data, the batches or the optimizer: a checkpoint keeps those, and a resume
# takes them from it.
RESUME_MAY_CHANGE = ("resume", "out_dir", "max_iters", "eval_interval", "eval_iters", "device", "dtype", "compile",
                     "cuda_graphs")


def train_bytes(num_bytes: int) -> int:
    """How many of a file's bytes train: the first TRAIN_FRACTION of them; the rest give the val loss."""
    return int(num_bytes * TRAIN_FRACTION)


def flag(name: str) -> str:
    """An argument's command-line flag: "block_size" -> "--block-size"."""
    return "--" + name.replace("_", "-")


def training_args(args) -> dict:
    """The flags a checkpoint keeps (all but RESUME_MAY_CHANGE), as plain values: paths as text."""
    return {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()
            if name not in RESUME_MAY_CHANGE}


def new_model_args(args) -> dict:
    """GPTConfig's arguments for a new model of the flags: bytes (vocab 256), no biases."""
    return {**{key: getattr(args, key) for key in MODEL_ARGS if hasattr(args, key)}, "bias": False, "vocab_size": 256}


def parse_args(argv=None):
    """(the checked flags, the checkpoint to resume or None). On --resume the flags outside RESUME_MAY_CHANGE come
    from the checkpoint; one given on the command line with another value is a usage error."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA,
                        help="a text file, read as bytes (vocab 256); default: the bundled data/classics.txt")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/nanogpt"))
    parser.add_argument("--resume", action="store_true",
                        help="continue from --out-dir/ckpt.pt with its flags; only " +
                             ", ".join(flag(name) for name in RESUME_MAY_CHANGE[2:]) + " may change")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-iters", type=int, default=20,
                        help="train up to this iteration (a resume counts on from the checkpoint's)")
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--eval-iters", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--moe-experts", default="2x128,2x64", help="count x width groups, e.g. 4x512,4x256")
    parser.add_argument("--moe-top-k", type=int, default=2)
    parser.add_argument("--moe-activation", default="gelu", choices=["gelu", "relu_squared", "swiglu"])
    parser.add_argument("--moe-load-balance-coef", type=float, default=0.01,
                        help="weight of the load-balancing loss in the aux loss (MoEConfig.load_balance_coef)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        default="bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                        else "float32",
                        help="autocast's dtype for the forward over fp32 weights, as nanoGPT (float32: no autocast); "
                             "default bfloat16 on a GPU that has it, else float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (as nanoGPT does)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the MoE layers from CUDA graphs in eager steps (triton_moe.enable_cuda_graphs): "
                             "less host time a step, the same results")
    args = parser.parse_args(argv)
    args.data = args.data.resolve()
    checkpoint = None
    if args.resume:
        checkpoint_path = args.out_dir / "ckpt.pt"
        if not checkpoint_path.is_file():
            parser.error(f"--resume: there is no checkpoint {checkpoint_path} (--out-dir {args.out_dir}) to resume")
        checkpoint = torch.load(checkpoint_path, map_location="cpu")
        # A namespace that holds an attribute keeps it where the command line leaves the flag out: parsed over
        # placeholders, the attributes that are not placeholders are the flags given
        unset = object()
        given = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args), unset)))
        current = training_args(args)
        # a checkpoint written before the flags were kept resumes with the command line's
        saved_args = checkpoint.get("train_args", current)
        for name, saved in saved_args.items():
            if getattr(given, name, unset) is not unset and current[name] != saved:
                parser.error(f"{flag(name)} {getattr(given, name)} differs from {saved} in {checkpoint_path}: a "
                             "resume trains on with the checkpoint's flags (leave it out, or start a new --out-dir)")
        vars(args).update(saved_args)
        args.data = Path(args.data)
    if args.max_iters < 0:
        parser.error(f"--max-iters must be >= 0, got {args.max_iters}")
    for name in ("eval_interval", "eval_iters", "batch_size", "block_size", "n_layer", "n_head", "n_embd"):
        if getattr(args, name) < 1:
            parser.error(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    if args.n_embd % args.n_head:
        parser.error(f"--n-embd ({args.n_embd}) must be a multiple of --n-head ({args.n_head})")
    try:
        GPTConfig(**new_model_args(args)).moe_config()
    except ValueError as error:
        names = [name for field, name in MOE_FLAGS.items() if str(error).startswith(field)] or MOE_FLAGS.values()
        parser.error(" ".join(f"{flag(name)} {getattr(args, name)}" for name in names) + f": {error}")
    if "cuda" in args.device and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but no CUDA device is visible")
    if args.cuda_graphs and ("cuda" not in args.device or args.compile):
        parser.error(f"--cuda-graphs needs a CUDA --device and no --compile (which graphs the model itself), got "
                     f"--device {args.device}" + (" and --compile" if args.compile else ""))
    if not args.data.is_file():
        parser.error(f"--data {args.data} is not a file")
    data_bytes = args.data.stat().st_size
    val_bytes = data_bytes - train_bytes(data_bytes)
    if val_bytes < args.block_size + 2:
        parser.error(f"--data {args.data}: its val split (the last {100 - round(100 * TRAIN_FRACTION)}%, "
                     f"{val_bytes} bytes) must hold --block-size + 2 = {args.block_size + 2} bytes")
    return args, checkpoint


def load_splits(path: Path) -> dict[str, np.ndarray]:
    """The file's bytes [N] uint8 as {"train": the first TRAIN_FRACTION of them, "val": the rest}."""
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    split = train_bytes(len(data))
    return {"train": data[:split], "val": data[split:]}


def get_batch(data: np.ndarray, args, step: int):
    """A batch drawn from a generator seeded by the step, so that a resumed run sees the batches it would have."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(len(data) - args.block_size - 1, (args.batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + args.block_size].astype(np.int64)) for i in starts])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + args.block_size].astype(np.int64)) for i in starts])
    return x.to(args.device), y.to(args.device)


def autocast(args, device_type: str):
    """The forward's context: autocast to --dtype (the MoE layers' expert GEMMs run in it too), or none for fp32."""
    if args.dtype == "float32":
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device_type, dtype=getattr(torch, args.dtype))


@torch.no_grad()
def estimate_loss(model, splits: dict[str, np.ndarray], args, step: int, device_type: str) -> dict[str, float]:
    """{split: mean cross-entropy over args.eval_iters batches of it}: eval mode, so no aux loss and no dropout."""
    model.eval()
    losses = {}
    for split, data in splits.items():
        split_losses = []
        for i in range(args.eval_iters):
            with autocast(args, device_type):
                split_losses.append(model(*get_batch(data, args, -1 - step * args.eval_iters - i))[1].item())
        losses[split] = float(np.mean(split_losses))
    model.train()
    return losses


def main(argv=None) -> dict:
    args, checkpoint = parse_args(argv)
    torch.manual_seed(args.seed)
    splits = load_splits(args.data)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = args.out_dir / "ckpt.pt"
    iter_num = 0
    if checkpoint is not None:
        model_args = checkpoint["model_args"]  # MoE: the expert layout comes back with the other model_args
        model = GPT(GPTConfig(**model_args))
        model.load_state_dict(checkpoint["model"])
        iter_num = checkpoint["iter_num"]
    else:
        model_args = new_model_args(args)
        model = GPT(GPTConfig(**model_args))
    if iter_num >= args.max_iters:
        print(f"nothing to train: the model is at iter {iter_num} and --max-iters is {args.max_iters}", flush=True)
        return dict(losses=[], model=model)
    model.to(args.device)
    device_type = "cuda" if "cuda" in args.device else "cpu"  # as nanoGPT: "cuda:1" too takes fused AdamW
    if args.cuda_graphs:
        enable_cuda_graphs(model)  # MoE: eager steps replay the MoE layers from CUDA graphs
    optimizer = model.configure_optimizers(args.weight_decay, args.learning_rate, (0.9, 0.95), device_type)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    scaler = torch.amp.GradScaler(device_type, enabled=args.dtype == "float16")  # as nanoGPT: fp16 only
    forward = torch.compile(model) if args.compile else model
    if args.compile:
        print("compiling the model: torch.compile builds it during the first step, which takes a while", flush=True)

    moe = model.config.moe_config()
    # MoE: a token's k slots go to k distinct experts, so an expert takes at most 1/k of the assignments: E/k times
    # its even share, 1/E
    busiest_ceiling = moe.num_experts / moe.num_active_experts
    losses = []
    local_iter_num = 0  # the steps this process has run
    running_mfu = None
    while iter_num < args.max_iters:
        started = time.perf_counter()
        x, y = get_batch(splits["train"], args, iter_num)
        with autocast(args, device_type):
            _, loss = forward(x, y)  # MoE: the training loss holds the aux loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())  # waits for the step, which step_seconds then covers
        step_seconds = time.perf_counter() - started
        moe_aux = aux_loss(model).item()  # MoE: the sum the loss holds, from the layers' last forward
        if device_type == "cuda" and local_iter_num >= 5:  # as nanoGPT: MFU on a GPU, past the first steps
            mfu = model.estimate_mfu(args.batch_size, step_seconds)
            running_mfu = mfu if running_mfu is None else 0.9 * running_mfu + 0.1 * mfu
        mfu_text = "" if running_mfu is None else f", mfu {100 * running_mfu:.2f}% (of an A100)"
        busiest = max(max(load.tolist()) * len(load) for load in expert_load(model).values())
        print(f"iter {iter_num}: loss {losses[-1]:.4f} = cross-entropy {losses[-1] - moe_aux:.4f} + aux "
              f"{moe_aux:.4f}, time {1000 * step_seconds:.2f}ms{mfu_text}, busiest expert {busiest:.2f}x its share "
              f"(max {busiest_ceiling:.2f}x)", flush=True)
        iter_num += 1
        local_iter_num += 1
        if iter_num % args.eval_interval == 0 or iter_num == args.max_iters:
            eval_losses = estimate_loss(model, splits, args, iter_num, device_type)
            print(f"step {iter_num}: train loss {eval_losses['train']:.4f}, val loss {eval_losses['val']:.4f}",
                  flush=True)
            torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), model_args=model_args,
                            train_args=training_args(args), iter_num=iter_num, val_loss=eval_losses["val"]),
                       checkpoint_path)
    return dict(losses=losses, model=model)


if __name__ == "__main__":
    sys.exit(0 if all(math.isfinite(loss) for loss in main()["losses"]) else 1)
