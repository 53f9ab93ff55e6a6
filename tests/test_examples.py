"""examples/nanogpt: nanoGPT's model and training loop with MoEMLP train, checkpoint and resume on the CPU; on a GPU,
its MoE layers replayed from CUDA graphs train as eager ones."""

import pytest
import torch
from conftest import ON_GPU, gpu_only, load_script

from triton_moe import active_parameters

train = load_script("examples/nanogpt/train.py", siblings=("model",))
GPT, GPTConfig = train.GPT, train.GPTConfig

TINY = ["--device", "cpu", "--batch-size", "2", "--block-size", "16", "--n-layer", "1", "--n-embd", "32",
        "--moe-experts", "2x64,2x32", "--eval-interval", "2", "--eval-iters", "1"]


# The example's CPU runs need Triton's interpreter, which a process that sees a GPU does not take.
cpu_only = pytest.mark.skipif(ON_GPU, reason="runs the example on the CPU, through Triton's interpreter")


@cpu_only
def test_resumed_training_matches_uninterrupted(tmp_path):
    """4 steps in one run, against 2 steps, a checkpoint, and 2 more from it in a new model and optimizer: the same
    losses and weights (fp32 on the CPU is deterministic)."""
    straight = train.main([*TINY, "--max-iters", "4", "--out-dir", str(tmp_path / "straight")])
    first = train.main([*TINY, "--max-iters", "2", "--out-dir", str(tmp_path / "resumed")])
    second = train.main([*TINY, "--max-iters", "4", "--out-dir", str(tmp_path / "resumed"), "--resume"])
    assert straight["losses"] == first["losses"] + second["losses"]
    assert all(torch.isfinite(torch.tensor(straight["losses"])))
    for (name, want), got in zip(straight["model"].state_dict().items(), second["model"].state_dict().values()):
        assert torch.equal(got, want), name
    checkpoint = torch.load(tmp_path / "resumed" / "ckpt.pt")
    assert checkpoint["model_args"]["moe_experts"] == "2x64,2x32" and checkpoint["iter_num"] == 4


@cpu_only
def test_model_follows_nanogpt_init_and_optimizer_groups():
    model = GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=32, moe_experts="2x64,2x32"))
    mlp = model.transformer.h[0].mlp
    assert abs(mlp.w2.std().item() - 0.02 / 2) < 0.003  # scaled like c_proj: 0.02 / sqrt(2 * n_layer)
    assert abs(mlp.router.weight.std().item() - 0.02) < 0.006
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert id(mlp.w1) in decayed and id(mlp.router.weight) not in decayed
    # MFU counts the active parameters: 2 of 4 experts of mean width 48 in each layer
    dense_equivalent = sum(p.numel() for p in model.parameters()) - 2 * (2 * 64 + 2 * 32) * 32 * 2 \
        + 2 * (2 * 48 * 32 * 2)
    x = torch.randint(256, (2, 16))
    model.train()
    _, train_loss = model(x, x)
    model.eval()
    _, eval_loss = model(x, x)
    assert train_loss > eval_loss  # the aux loss in the training loss only
    assert active_parameters(model) == dense_equivalent


@gpu_only
def test_cuda_graphs_train_as_eager(tmp_path):
    """--cuda-graphs: the MoE layers replay from CUDA graphs in every training step (evaluation, without gradients,
    runs them eagerly), with the eager run's losses and weights bit for bit."""
    gpu = [*TINY, "--device", "cuda", "--max-iters", "6"]
    runs = [train.main([*gpu, "--out-dir", str(tmp_path / name), *flags])
            for name, flags in (("eager", []), ("eager_again", []), ("graphs", ["--cuda-graphs"]))]
    assert runs[0]["losses"] == runs[1]["losses"]  # the premise: an eager GPU run repeats itself bit for bit
    assert runs[2]["losses"] == runs[0]["losses"]
    for (name, want), got in zip(runs[0]["model"].state_dict().items(), runs[2]["model"].state_dict().values()):
        assert torch.equal(got, want), name
    replays = [block.mlp.cuda_graphs.replays for block in runs[2]["model"].transformer.h]
    assert replays == [6]


@cpu_only
def test_eval_reads_the_val_split_and_training_never_does(tmp_path, monkeypatch):
    """--data of 900 'a' bytes then 100 'b' bytes: the first 90% train, the last 10% give the val loss. Every forward
    is recorded with the bytes it reads (inputs and targets) and its loss: no training batch reads a 'b' (16 windows
    a step, of which some would if training drew from the whole file), and the val loss saved is the mean loss of the
    eval batches that read only 'b'."""
    data = tmp_path / "ab.txt"
    data.write_bytes(b"a" * 900 + b"b" * 100)
    splits = train.load_splits(data)
    assert bytes(splits["train"]) == b"a" * 900 and bytes(splits["val"]) == b"b" * 100  # disjoint, the whole file
    forwards = []  # (training, the byte values read, loss)
    gpt_forward = train.GPT.forward

    def recording_forward(self, idx, targets=None):
        logits, loss = gpt_forward(self, idx, targets)
        forwards.append((self.training, set(torch.cat([idx, targets]).unique().tolist()), loss.item()))
        return logits, loss

    monkeypatch.setattr(train.GPT, "forward", recording_forward)
    train.main([*TINY, "--data", str(data), "--batch-size", "16", "--max-iters", "2", "--eval-iters", "2",
                "--out-dir", str(tmp_path)])
    assert [seen for training, seen, _ in forwards if training] == [{ord("a")}] * 2
    eval_reads = [seen for training, seen, _ in forwards if not training]
    assert sorted(map(sorted, eval_reads)) == [[ord("a")]] * 2 + [[ord("b")]] * 2  # each split's eval_iters batches
    val_losses = [loss for training, seen, loss in forwards if not training and seen == {ord("b")}]
    assert torch.load(tmp_path / "ckpt.pt")["val_loss"] == pytest.approx(sum(val_losses) / len(val_losses))
