"""examples/nanogpt: nanoGPT's model and training loop with MoEMLP train, checkpoint and resume on the CPU; on a GPU,
its MoE layers replayed from CUDA graphs train as eager ones."""

import math
import re

import pytest
import torch
from conftest import ON_GPU, ROOT, gpu_only, load_script

from triton_moe import active_parameters

train = load_script("examples/nanogpt/train.py", siblings=("model",))
GPT, GPTConfig = train.GPT, train.GPTConfig
sample = load_script("examples/nanogpt/sample.py", siblings=("model",))

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
@pytest.mark.parametrize("flags, error", [
    (["--moe-experts", "4x"], "--moe-experts 4x: expert_sizes must look like"),
    (["--moe-top-k", "5"], "--moe-top-k 5: num_active_experts (top-k) must be <= num_experts = 4"),
    (["--moe-load-balance-coef", "-1"], "--moe-load-balance-coef -1.0: load_balance_coef must be >= 0"),
    (["--n-head", "3"], "--n-embd (32) must be a multiple of --n-head (3)"),
    (["--block-size", "0"], "--block-size must be >= 1"),
    (["--cuda-graphs"], "--cuda-graphs needs a CUDA --device and no --compile"),
    (["--data", "no_such_file.txt"], "no_such_file.txt is not a file"),
    (["--block-size", "80000"], "must hold --block-size + 2 = 80002 bytes"),
])
def test_bad_flags_are_usage_errors(flags, error, tmp_path, monkeypatch, capsys):
    """Before any folder is made: exit status 2 and a message that names the flag."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--out-dir", "run", *flags])
    assert exit_info.value.code == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """The out-dir of a run of TINY for 2 iterations: its checkpoint, which the tests below read but never write."""
    out_dir = tmp_path_factory.mktemp("two_steps")
    train.main([*TINY, "--max-iters", "2", "--out-dir", str(out_dir)])
    return out_dir


@cpu_only
def test_resume_takes_the_checkpoints_flags(two_steps, tmp_path):
    """A resume given none of TINY's flags trains on with the checkpoint's (block size 16, not the default 64)."""
    (tmp_path / "ckpt.pt").write_bytes((two_steps / "ckpt.pt").read_bytes())
    resumed = train.main(["--device", "cpu", "--max-iters", "3", "--out-dir", str(tmp_path), "--resume"])
    assert len(resumed["losses"]) == 1 and resumed["model"].config.block_size == 16
    saved, resumed_saved = (torch.load(path / "ckpt.pt") for path in (two_steps, tmp_path))
    assert resumed_saved["train_args"] == saved["train_args"] and resumed_saved["iter_num"] == 3


@cpu_only
def test_a_checkpoint_without_the_flags_resumes_with_the_command_lines(two_steps, tmp_path):
    """A checkpoint written before the training flags were kept has none: the resume takes the command line's."""
    checkpoint = torch.load(two_steps / "ckpt.pt")
    del checkpoint["train_args"]
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    resumed = train.main([*TINY, "--max-iters", "3", "--out-dir", str(tmp_path), "--resume"])
    assert len(resumed["losses"]) == 1 and torch.load(tmp_path / "ckpt.pt")["iter_num"] == 3


@cpu_only
@pytest.mark.parametrize("changed", [["--block-size", "32"], ["--batch-size", "3"], ["--seed", "1"],
                                     ["--moe-experts", "4x16"], ["--learning-rate", "0.01"], ["--data", "README.md"]])
def test_resume_refuses_a_changed_flag(two_steps, changed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--max-iters", "3", "--out-dir", str(two_steps), "--resume", *changed])
    assert exit_info.value.code == 2
    assert f"{changed[0]} {changed[1]} differs from" in capsys.readouterr().err
    assert torch.load(two_steps / "ckpt.pt")["iter_num"] == 2


@cpu_only
def test_resume_without_a_checkpoint_is_a_usage_error(tmp_path, capsys):
    out_dir = tmp_path / "never_trained"
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--out-dir", str(out_dir), "--resume"])
    assert exit_info.value.code == 2
    assert f"no checkpoint {out_dir / 'ckpt.pt'}" in capsys.readouterr().err
    assert not out_dir.exists()


@cpu_only
def test_resume_with_nothing_left_to_do_says_so(two_steps, capsys):
    resumed = train.main([*TINY, "--max-iters", "2", "--out-dir", str(two_steps), "--resume"])
    assert resumed["losses"] == []
    assert "nothing to train: the model is at iter 2 and --max-iters is 2" in capsys.readouterr().out


@cpu_only
def test_log_line_and_load_balance_coef(tmp_path, capsys):
    """Each step's line: the loss as cross-entropy + aux, the step's time, no MFU on the CPU, and the busiest
    expert's share against its ceiling E/k (6 experts, top-2: 3x). --moe-load-balance-coef reaches the layers (an
    aux loss of about 0.5 instead of about 0.01) and the checkpoint's model_args."""
    run = train.main([*TINY, "--moe-experts", "3x32,3x16", "--moe-load-balance-coef", "0.5", "--max-iters", "2",
                      "--out-dir", str(tmp_path)])
    lines = re.findall(r"^iter (\d+): loss ([\d.]+) = cross-entropy ([\d.]+) \+ aux ([\d.]+), time ([\d.]+)ms, "
                       r"busiest expert ([\d.]+)x its share \(max 3.00x\)$", capsys.readouterr().out, re.MULTILINE)
    assert [int(line[0]) for line in lines] == [0, 1]
    for _, loss, cross_entropy, aux, milliseconds, busiest in lines:
        assert float(cross_entropy) + float(aux) == pytest.approx(float(loss), abs=2e-4)
        assert 0.4 < float(aux) < 1.0 and float(milliseconds) > 0 and 1.0 <= float(busiest) <= 3.0
    assert torch.load(tmp_path / "ckpt.pt")["model_args"]["moe_load_balance_coef"] == 0.5
    assert all(block.mlp.config.load_balance_coef == 0.5 for block in run["model"].transformer.h)


@cpu_only
def test_dtype_autocasts_the_forward(tmp_path):
    """--dtype bfloat16 or float16 (with its GradScaler) autocasts the forward, as nanoGPT's train.py does: the first
    loss moves off fp32's by rounding, not more; on the CPU the default is float32, without autocast."""
    assert train.parse_args([*TINY])[0].dtype == "float32"
    first_losses = {}
    for dtype in ("float32", "bfloat16", "float16"):
        run = train.main([*TINY, "--dtype", dtype, "--max-iters", "2", "--out-dir", str(tmp_path / dtype)])
        assert len(run["losses"]) == 2 and all(math.isfinite(loss) for loss in run["losses"])
        first_losses[dtype] = run["losses"][0]
    for dtype in ("bfloat16", "float16"):
        assert first_losses[dtype] != first_losses["float32"]
        assert first_losses[dtype] == pytest.approx(first_losses["float32"], rel=2e-2)


@cpu_only
def test_sample_continues_the_start_text(two_steps, tmp_path, capsys):
    text = sample.main(["--out-dir", str(two_steps), "--device", "cpu", "--start", "ALICE", "--max-new-tokens", "3"])
    assert text.startswith("ALICE") and len(text) > len("ALICE") and text in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--out-dir", str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 2 and f"--out-dir {tmp_path} holds no ckpt.pt" in capsys.readouterr().err


def test_readme_use_snippet_runs_as_pasted():
    """README's "## Use" snippet defines what it uses, and its loss reaches the experts' weights."""
    snippet = re.search(r"^## Use\n\n```python\n(.*?)^```", (ROOT / "README.md").read_text(),
                        re.MULTILINE | re.DOTALL).group(1)
    namespace = {}
    exec(snippet, namespace)
    assert namespace["mlp"].w1.grad is not None and namespace["mlp"].w1.grad.abs().sum() > 0


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


@cpu_only
def test_model_prints_counts_and_keeps_nanogpts_attention_fallback_and_crop(monkeypatch, capsys):
    """nanoGPT's prints (parameters, decay groups, fused AdamW) beside the active parameters; its attention for a torch
    without scaled_dot_product_attention (a causal mask buffer) gives the flash path's logits; crop_block_size keeps
    the logits of the positions it keeps, on either path."""
    config = GPTConfig(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=32, moe_experts="2x64,2x32")
    model = GPT(config)
    printed = capsys.readouterr().out
    assert f"active parameters: {active_parameters(model) / 1e6:.2f}M of " in printed
    assert "number of parameters: " in printed
    model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert "num decayed parameter tensors: " in capsys.readouterr().out.splitlines()[0]
    with monkeypatch.context() as without_flash:
        without_flash.delattr(torch.nn.functional, "scaled_dot_product_attention")
        manual = GPT(GPTConfig(**vars(config)))
    loaded = manual.load_state_dict(model.state_dict(), strict=False)
    assert loaded.missing_keys == ["transformer.h.0.attn.bias"] and not loaded.unexpected_keys
    assert not manual.transformer.h[0].attn.flash and model.transformer.h[0].attn.flash
    x = torch.randint(256, (2, 16))
    model.eval()
    manual.eval()
    logits = model(x, x)[0]
    torch.testing.assert_close(manual(x, x)[0], logits)
    for cropped in (model, manual):
        cropped.crop_block_size(8)
        assert cropped.config.block_size == 8 and cropped.transformer.wpe.weight.shape[0] == 8
        assert cropped is model or cropped.transformer.h[0].attn.bias.shape == (1, 1, 8, 8)
        x_cropped = x[:, :8].contiguous()
        torch.testing.assert_close(cropped(x_cropped, x_cropped)[0], logits[:, :8])


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
